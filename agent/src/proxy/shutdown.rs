//! Connection shutdown at SIGTERM: a signal that listeners stop accepting and connections
//! finish their in-flight requests, and a wait until every connection has ended. (Taking the
//! instance out of traffic, `vmesh drain`, is `lifecycle/drain.rs` and `cli/drain.rs`.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::Waker;

use tokio::sync::watch;

/// Owned by the agent; `drain` signals and waits.
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
    signal: Arc<Signal>,
}

/// Held by every listener and connection; dropping it says "I am done".
#[derive(Clone, Debug)]
pub struct DrainWatch {
    rx: watch::Receiver<bool>,
    signal: Arc<Signal>,
}

/// The signal as a flag and a wake: what an HTTP/1.1 connection checks at each of its wakes
/// (one load), and the wakers of the connections' tasks (registered once each): a connection
/// holds a key (16 bytes with its reference), not a waiter of its own, nor a watch channel's
/// lock at each wake.
#[derive(Debug, Default)]
struct Signal {
    draining: AtomicBool,
    wakers: Mutex<Wakers>,
}

#[derive(Debug, Default)]
struct Wakers {
    slots: Vec<Option<Waker>>,
    free: Vec<usize>,
}

/// A task's registration for the wake at drain ([`DrainWatch::register`]); dropping it
/// unregisters.
#[derive(Debug)]
pub struct DrainWake<'a> {
    signal: &'a Signal,
    key: usize,
}

impl Signal {
    fn wakers(&self) -> MutexGuard<'_, Wakers> {
        // A panic while holding the lock leaves the slots as they were: still usable.
        self.wakers.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl Drain {
    pub fn new() -> (Self, DrainWatch) {
        let (tx, rx) = watch::channel(false);
        let signal = Arc::new(Signal::default());
        (
            Self {
                tx,
                signal: signal.clone(),
            },
            DrainWatch { rx, signal },
        )
    }

    /// Signals every holder, then waits until all of them have dropped their watch.
    pub async fn drain(self) {
        self.signal.draining.store(true, Ordering::SeqCst);
        let woken: Vec<Waker> = self.signal.wakers().slots.iter_mut().filter_map(Option::take).collect();
        woken.into_iter().for_each(Waker::wake);
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

    /// Whether draining has started, as one atomic load (for a check at every wake; the wake
    /// itself comes from [`DrainWatch::register`]).
    pub fn draining_now(&self) -> bool {
        self.signal.draining.load(Ordering::Relaxed)
    }

    /// Registers `waker` to be woken when the agent starts draining. Registered before the
    /// flag is checked ([`DrainWatch::draining_now`]), no signal is missed.
    pub fn register(&self, waker: &Waker) -> DrainWake<'_> {
        let mut wakers = self.signal.wakers();
        let key = match wakers.free.pop() {
            Some(key) => key,
            None => {
                wakers.slots.push(None);
                wakers.slots.len() - 1
            }
        };
        if let Some(slot) = wakers.slots.get_mut(key) {
            *slot = Some(waker.clone());
        }
        DrainWake {
            signal: &self.signal,
            key,
        }
    }
}

impl Drop for DrainWake<'_> {
    fn drop(&mut self) {
        let mut wakers = self.signal.wakers();
        if let Some(slot) = wakers.slots.get_mut(self.key) {
            *slot = None;
            wakers.free.push(self.key);
        }
        // The last connection gone: the lists are freed (a flood's peak is not kept for good).
        if wakers.free.len() == wakers.slots.len() {
            *wakers = Wakers::default();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn drain_wake_slots_are_reused_and_freed_with_the_last_connection() {
        let (_drain, watch) = Drain::new();
        let waker = Waker::noop();
        let a = watch.register(waker);
        let b = watch.register(waker);
        assert_eq!((a.key, b.key), (0, 1));
        drop(a);
        let c = watch.register(waker);
        assert_eq!(c.key, 0, "a freed slot is reused");
        drop((b, c));
        let wakers = watch.signal.wakers();
        assert!(wakers.slots.is_empty() && wakers.free.is_empty());
    }

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

    #[tokio::test]
    async fn the_flag_and_the_wake_tell_a_connection_that_the_agent_drains() {
        let (drain, watch) = Drain::new();
        assert!(!watch.draining_now());
        let probe = watch.clone();
        let task = tokio::spawn(async move {
            // Registered before the signal, the flag checked at each wake.
            let mut wake = None;
            std::future::poll_fn(|cx| {
                wake.get_or_insert_with(|| watch.register(cx.waker()));
                if watch.draining_now() {
                    std::task::Poll::Ready(())
                } else {
                    std::task::Poll::Pending
                }
            })
            .await;
            drop(wake);
            // Unregistered, and the last one: the lists are freed.
            let wakers = watch.signal.wakers();
            assert!(wakers.slots.is_empty() && wakers.free.is_empty());
        });
        // The task waits, registered, before the agent drains: only the wake can end its wait.
        while !probe.signal.wakers().slots.iter().any(Option::is_some) {
            tokio::task::yield_now().await;
        }
        drop(probe);
        // (Bounded: a wake that never comes fails the test instead of hanging it.)
        let drained = tokio::time::timeout(std::time::Duration::from_secs(10), drain.drain()).await;
        assert!(drained.is_ok(), "the connection was not woken");
        task.await.unwrap();
    }
}
