//! A future kept aside: polled only when its own waker fired, not at every wake of the task it
//! shares with a busier future ([`Aside`]; [`WakeGate`] for a poll function).
//!
//! A connection's task selects over the connection and its watches (the drain signal, the idle
//! and stall timers). `select!` polls every branch at every wake, and the connection wakes the
//! task several times per request (the client's bytes, the upstream's answer, the write); the
//! watches would be polled each time for nothing (a watch channel's lock, a timer's state).
//! Behind [`Aside`] a watch costs one flag check per wake instead, as a branch of
//! `FuturesUnordered` does.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;

/// `fut`, polled only on its first poll and after its own waker fired.
pub struct Aside<F> {
    fut: Pin<Box<F>>,
    flag: Arc<Flag>,
}

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

impl<F: Future> Aside<F> {
    pub fn new(fut: F) -> Self {
        Self {
            fut: Box::pin(fut),
            flag: Arc::new(Flag {
                woken: AtomicBool::new(true),
                task: AtomicWaker::new(),
            }),
        }
    }
}

impl<F: Future> Future for Aside<F> {
    type Output = F::Output;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = &mut *self;
        this.flag.task.register(cx.waker());
        if !this.flag.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        let waker = Waker::from(this.flag.clone());
        this.fut.as_mut().poll(&mut Context::from_waker(&waker))
    }
}

/// The same filter for a poll function that runs again and again (one per request), with its
/// waker made once: `poll` runs `f` only on the first call after [`WakeGate::arm`] and after a
/// wake of the waker `f` registered; every other call costs a flag check.
pub struct WakeGate {
    flag: Arc<Flag>,
    waker: Waker,
}

impl WakeGate {
    pub fn new() -> Self {
        let flag = Arc::new(Flag {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(flag.clone());
        Self { flag, waker }
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
        f(&mut Context::from_waker(&self.waker))
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

    /// Counts its polls; ready once `ready` is set, and wakes itself when asked to.
    struct Probe {
        polls: Arc<AtomicUsize>,
        ready: Arc<AtomicBool>,
        waker: Arc<std::sync::Mutex<Option<Waker>>>,
    }

    impl Future for Probe {
        type Output = ();
        fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
            self.polls.fetch_add(1, Ordering::SeqCst);
            *self.waker.lock().unwrap() = Some(cx.waker().clone());
            if self.ready.load(Ordering::SeqCst) {
                Poll::Ready(())
            } else {
                Poll::Pending
            }
        }
    }

    #[test]
    fn polled_first_and_then_only_after_its_own_wake() {
        let polls = Arc::new(AtomicUsize::new(0));
        let ready = Arc::new(AtomicBool::new(false));
        let inner_waker = Arc::new(std::sync::Mutex::new(None));
        let mut aside = Box::pin(Aside::new(Probe {
            polls: polls.clone(),
            ready: ready.clone(),
            waker: inner_waker.clone(),
        }));
        let mut cx = Context::from_waker(Waker::noop());
        assert!(aside.as_mut().poll(&mut cx).is_pending());
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Wakes of the task for other reasons: not polled.
        for _ in 0..5 {
            assert!(aside.as_mut().poll(&mut cx).is_pending());
        }
        assert_eq!(polls.load(Ordering::SeqCst), 1);
        // Its own wake: polled once more.
        ready.store(true, Ordering::SeqCst);
        inner_waker.lock().unwrap().take().unwrap().wake();
        assert!(aside.as_mut().poll(&mut cx).is_ready());
        assert_eq!(polls.load(Ordering::SeqCst), 2);
    }
}
