//! Connection shutdown at SIGTERM: a signal that listeners stop accepting and connections
//! finish their in-flight requests, and a wait until every connection has ended. (Taking the
//! instance out of traffic, `vmesh drain`, is `lifecycle/drain.rs` and `cli/drain.rs`.)

use tokio::sync::watch;

/// Owned by the agent; `drain` signals and waits.
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
}

/// Held by every listener and connection; dropping it says "I am done".
#[derive(Clone, Debug)]
pub struct DrainWatch {
    rx: watch::Receiver<bool>,
}

impl Drain {
    pub fn new() -> (Self, DrainWatch) {
        let (tx, rx) = watch::channel(false);
        (Self { tx }, DrainWatch { rx })
    }

    /// Signals every holder, then waits until all of them have dropped their watch.
    pub async fn drain(self) {
        let _ = self.tx.send(true);
        self.tx.closed().await;
    }

    /// Watches still held (open connections and listeners).
    pub fn holders(&self) -> usize {
        self.tx.receiver_count()
    }
}

impl DrainWatch {
    /// Resolves once draining has started.
    pub async fn signaled(&mut self) {
        let _ = self.rx.wait_for(|d| *d).await;
    }

    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn drain_waits_for_every_watch() {
        let (drain, watch) = Drain::new();
        let mut held = watch.clone();
        drop(watch);
        let task = tokio::spawn(async move {
            held.signaled().await;
            tokio::task::yield_now().await;
            drop(held);
        });
        drain.drain().await;
        task.await.unwrap();
    }
}
