//! A poll function kept aside: run only when its own waker fired, not at every wake of the task
//! it shares with a busier future ([`WakeGate`]).
//!
//! While a request runs, an HTTP/1.1 connection also watches its client (a close drops the
//! request). The request wakes the task several times (the client's bytes, the upstream's
//! answer, the write); the client watch would be polled each time for nothing (the socket's
//! readiness, under its lock). Behind a [`WakeGate`] it costs one flag check per wake instead,
//! as a branch of `FuturesUnordered` does. (The connection's other watches, timers and drain,
//! are `watch.rs`: they check a flag of their own.)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

struct Flag {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// A filter for a poll function that runs again and again (one per request): `poll` runs `f`
/// only on the first call after [`WakeGate::arm`] and after a wake of the waker `f`
/// registered; every other call costs a flag check. (The waker is made when `f` runs, not kept:
/// a connection holds the gate while idle, and `f` runs about once per request.)
pub struct WakeGate {
    flag: Arc<Flag>,
}

impl WakeGate {
    pub fn new() -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Self { flag }
    }

    /// The next `poll` runs its function.
    pub fn arm(&self) {
        self.flag.woken.store(true, Ordering::Release);
    }

    pub fn poll<T>(&self, cx: &mut Context<'_>, f: impl FnOnce(&mut Context<'_>) -> Poll<T>) -> Poll<T> {
        self.flag.task.register(cx.waker());
        if !self.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(self.flag.clone());
        f(&mut Context::from_waker(&waker))
    }
}

impl Default for WakeGate {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;
    use std::sync::Mutex;

    #[test]
    fn run_when_armed_and_then_only_after_its_own_wake() {
        let gate = WakeGate::new();
        let runs = AtomicUsize::new(0);
        let inner_waker: Mutex<Option<Waker>> = Mutex::new(None);
        let mut cx = Context::from_waker(Waker::noop());
        let mut poll = |ready: bool| {
            gate.poll(&mut cx, |cx| {
                runs.fetch_add(1, Ordering::SeqCst);
                *inner_waker.lock().unwrap() = Some(cx.waker().clone());
                if ready {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
        };
        assert!(poll(false).is_pending());
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Wakes of the task for other reasons: not run.
        for _ in 0..5 {
            assert!(poll(false).is_pending());
        }
        assert_eq!(runs.load(Ordering::SeqCst), 1);
        // Its own wake: run once more.
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert!(poll(true).is_ready());
        assert_eq!(runs.load(Ordering::SeqCst), 2);
        // Armed (a new request): run again.
        gate.arm();
        assert!(poll(true).is_ready());
        assert_eq!(runs.load(Ordering::SeqCst), 3);
    }
}
