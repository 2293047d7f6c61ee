//! The watches of one HTTP/1.1 client connection on one timer: the head's
//! `proxy.header_read_timeout`, `proxy.idle_timeout`, the stall watch
//! (`proxy.stream_idle_timeout`), the agent's drain, and when an idle connection parks
//! (`proxy.idle_park_after`, `park.rs`).
//!
//! Every idle keep-alive connection holds these, so they are kept small: one `Sleep` (not one per
//! deadline), armed for the earliest deadline that matters and moved on when it fires (the next
//! one is worked out then, not at every request), and the drain signal as a flag checked at each
//! wake plus one registration that wakes the task. Between its timer's firings a watch costs a
//! few loads per wake of the connection: nothing is polled that did not fire.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::time::Sleep;

use crate::proxy::shutdown::DrainWake;
use crate::proxy::ConnCtx;

/// How long a connection that is idle when the agent starts draining may still send a last
/// request (answered with `Connection: close`) before it is closed.
pub const DRAIN_LINGER: Duration = Duration::from_millis(1000);

pin_project_lite::pin_project! {
    /// The watches of a connection; [`Watch::poll_end`] at each wake of its task (with the
    /// connection's context, not kept here).
    pub struct Watch<'c> {
        #[pin]
        timer: Sleep,
        // The task's registration for the drain's wake, made at the first poll.
        drain: Option<DrainWake<'c>>,
        phase: Phase,
        // When the head waited for is due, if one is.
        head: Option<Instant>,
        // The timer is set for a deadline that matters (else it is left as it fired).
        armed: bool,
        // The timer was set and not yet polled (its waker is not registered yet).
        fresh: bool,
    }
}

/// Why a watch ends its connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum End {
    /// The head waited for was not complete by its deadline: the connection answers it.
    HeadTimedOut,
    /// No request in progress for `proxy.idle_timeout`.
    Idle,
    /// Requests in progress, and nothing moved for a whole `proxy.stream_idle_timeout`.
    Stalled,
    /// The agent drains, and the connection was idle at the end of [`DRAIN_LINGER`].
    Drained,
    /// Idle for `proxy.idle_park_after` where the caller said it could park: the connection
    /// parks (`park.rs`).
    Park,
}

enum Phase {
    /// Idle and stall watches. `stall`: while requests are in progress, the progress count seen
    /// and since when it has not moved.
    Serving { stall: Option<(u64, Instant)> },
    /// The agent drains: the connection closes at `until` if it is idle then.
    Lingering { until: Instant },
    /// The agent drains and the connection was busy at the end of the linger: only the head
    /// timeout is left (each response says `Connection: close`).
    Finishing,
}

impl<'c> Watch<'c> {
    /// The watches of the connection of `ctx`.
    pub fn new(ctx: &ConnCtx) -> Self {
        let limits = &ctx.shared.limits;
        let idle = limits.idle_timeout.get();
        let stall = limits.stream_idle_timeout.get();
        // (A connection resumed after it parked has been idle since before its task began.)
        let idle_left = idle.saturating_sub(ctx.activity.idle_for().unwrap_or_default());
        Self {
            timer: tokio::time::sleep_until((Instant::now() + idle_left.min(stall)).into()),
            drain: None,
            phase: Phase::Serving { stall: None },
            head: None,
            armed: true,
            fresh: true,
        }
    }

    /// Sets when the head waited for is due (`None`: no head is waited for), and when the
    /// connection may park if it is idle then (`park`: the timer is set for it; whether it parks
    /// is worked out when it fires).
    pub fn head_due(self: Pin<&mut Self>, due: Option<Instant>, park: Option<Instant>) {
        let this = self.project();
        *this.head = due;
        if let Some(at) = due.into_iter().chain(park).min() {
            arm(this.timer, this.armed, this.fresh, at);
        }
    }

    /// When the head waited for is due, if one is.
    pub fn head(&self) -> Option<Instant> {
        self.head
    }

    /// `Ready` when the connection must end, or park (`park`: the caller can park it now).
    /// Cheap unless the timer fired, the deadline moved up, or the agent began draining.
    pub fn poll_end(self: Pin<&mut Self>, cx: &mut Context<'_>, ctx: &'c ConnCtx, park: bool) -> Poll<End> {
        let mut this = self.project();
        let head_due = *this.head;
        if this.drain.is_none() {
            // The task's waker (the same at every wake of a tokio task), registered before the
            // flag below is first checked.
            *this.drain = Some(ctx.activity.drain.register(cx.waker()));
        }
        if matches!(this.phase, Phase::Serving { .. }) && ctx.activity.drain.draining_now() {
            let until = Instant::now() + DRAIN_LINGER;
            *this.phase = Phase::Lingering { until };
            arm(this.timer.as_mut(), this.armed, this.fresh, until);
        }
        // The timer is looked at only when it was just set (to register its waker) or fired.
        let look = *this.fresh || (*this.armed && this.timer.is_elapsed());
        if !look {
            return Poll::Pending;
        }
        loop {
            if this.timer.as_mut().poll(cx).is_pending() {
                *this.fresh = false;
                return Poll::Pending;
            }
            let now = Instant::now();
            if head_due.is_some_and(|due| now >= due) {
                // Told once: the connection may still answer (408) under the other watches.
                *this.head = None;
                return Poll::Ready(End::HeadTimedOut);
            }
            let next = match next(this.phase, ctx, now, park) {
                Ok(next) => next,
                Err(end) => {
                    ended(ctx, end);
                    return Poll::Ready(end);
                }
            };
            let Some(next) = next.into_iter().chain(head_due).min() else {
                // Nothing to wait for until a head is: left as it fired.
                *this.armed = false;
                *this.fresh = false;
                return Poll::Pending;
            };
            this.timer.as_mut().reset(next.into());
            *this.armed = true;
        }
    }
}

/// Moves the timer up to `at` when it is not armed or armed for later.
fn arm(timer: Pin<&mut Sleep>, armed: &mut bool, fresh: &mut bool, at: Instant) {
    if !*armed || at < timer.deadline().into_std() {
        timer.reset(at.into());
        *armed = true;
        *fresh = true;
    }
}

/// The timer fired at `now`: the end of the connection (or its parking, where `park` says it
/// can), or the next deadline of `phase`.
fn next(phase: &mut Phase, ctx: &ConnCtx, now: Instant, park: bool) -> Result<Option<Instant>, End> {
    let limits = &ctx.shared.limits;
    let idle = limits.idle_timeout.get();
    let stall_after = limits.stream_idle_timeout.get();
    let park_after = limits.idle_park_after.get();
    let activity = &ctx.activity;
    match phase {
        Phase::Serving { stall } => match activity.idle_for() {
            Some(d) if d >= idle => Err(End::Idle),
            Some(d) if park && !park_after.is_zero() && d >= park_after => Err(End::Park),
            Some(d) => {
                *stall = None;
                // (Looked at again within `stall_after`: a request that starts meanwhile is
                // watched for stalls from then.)
                let mut at = now + (idle - d).min(stall_after);
                if park && !park_after.is_zero() {
                    at = at.min(now + (park_after - d));
                }
                Ok(Some(at))
            }
            None => {
                // Requests in progress: looked at again every `idle` at most (the last one may
                // end soon), stalled once nothing moved for a whole `stall_after` (found within
                // `stall_after` to twice that: one timer per connection, not one per request or
                // per byte).
                let progress = activity.progress();
                match *stall {
                    Some((seen, since)) if seen == progress => {
                        let waited = now.saturating_duration_since(since);
                        if waited >= stall_after {
                            return Err(End::Stalled);
                        }
                        Ok(Some(now + (stall_after - waited).min(idle)))
                    }
                    _ => {
                        *stall = Some((progress, now));
                        Ok(Some(now + stall_after.min(idle)))
                    }
                }
            }
        },
        Phase::Lingering { until } if now >= *until => {
            if activity.idle_for().is_some() {
                return Err(End::Drained);
            }
            *phase = Phase::Finishing;
            Ok(None)
        }
        Phase::Lingering { until } => Ok(Some(*until)),
        Phase::Finishing => Ok(None),
    }
}

/// Logs and counts the end of a connection by its watch.
fn ended(ctx: &ConnCtx, end: End) {
    let limits = &ctx.shared.limits;
    match end {
        End::Idle => {
            tracing::debug!(idle_timeout = ?limits.idle_timeout.get(), "downstream connection idle: closing");
        }
        End::Stalled => {
            tracing::debug!(stall_timeout = ?limits.stream_idle_timeout.get(), "downstream connection stalled: closing");
            ctx.activity.stalled.store(true, std::sync::atomic::Ordering::Relaxed);
            ctx.shared
                .metrics
                .downstream_closed(&ctx.listener.name, "stream_idle_timeout");
        }
        End::HeadTimedOut | End::Drained | End::Park => {}
    }
}
