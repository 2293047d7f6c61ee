//! Unix signals (signal-hook) turned into agent events on a channel.

use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;
use tokio::sync::mpsc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// SIGHUP: reload the config.
    Reload,
    /// SIGTERM or SIGINT: drain and exit.
    Shutdown,
}

/// Starts a thread that forwards signals as events.
pub fn spawn() -> std::io::Result<mpsc::UnboundedReceiver<Event>> {
    let mut signals = Signals::new([SIGHUP, SIGTERM, SIGINT])?;
    let (tx, rx) = mpsc::unbounded_channel();
    std::thread::Builder::new()
        .name("vmesh-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let ev = if sig == SIGHUP { Event::Reload } else { Event::Shutdown };
                if tx.send(ev).is_err() {
                    break;
                }
            }
        })?;
    Ok(rx)
}
