//! Bounded polling: wait for a condition instead of sleeping a fixed time.

use std::time::{Duration, Instant};

/// How long [`eventually`] and [`assert_eventually!`](crate::assert_eventually) wait by default.
pub const DEFAULT_WAIT: Duration = Duration::from_secs(10);

/// The pause between two polls.
const POLL_INTERVAL: Duration = Duration::from_millis(25);

/// Calls `check` until it returns `Ok`, for at most `timeout`; panics naming `what` and the last
/// error otherwise. Returns the `Ok` value.
pub fn eventually<T>(timeout: Duration, what: &str, mut check: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(value) => return value,
            Err(last) => {
                if Instant::now() >= deadline {
                    panic!("timed out after {timeout:?} waiting for {what}; last: {last}");
                }
            }
        }
        std::thread::sleep(POLL_INTERVAL);
    }
}

/// Polls a boolean expression until it is true, for at most [`DEFAULT_WAIT`] (or `timeout = d,`).
///
/// ```text
/// assert_eventually!(agent.admin_get("/ready").status == 200, "agent ready");
/// assert_eventually!(timeout = Duration::from_secs(3), up.stats()["requests"] == 1, "request seen");
/// ```
#[macro_export]
macro_rules! assert_eventually {
    (timeout = $timeout:expr, $cond:expr, $($msg:tt)+) => {
        $crate::eventually::eventually($timeout, &format!($($msg)+), || {
            if $cond { Ok(()) } else { Err(format!("`{}` was false", stringify!($cond))) }
        })
    };
    ($cond:expr, $($msg:tt)+) => {
        $crate::assert_eventually!(timeout = $crate::eventually::DEFAULT_WAIT, $cond, $($msg)+)
    };
}
