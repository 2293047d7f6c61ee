//! Which failed tries are retried.

use http::Method;

use crate::config::RetryConfig;

/// How a try ended, as far as retrying is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TryOutcome {
    /// The TCP connection could not be made: the request was never sent.
    ConnectFailed,
    /// The connection closed or reset before a response.
    Reset,
    /// The request's overall deadline passed.
    Timeout,
    /// The try's own deadline (`per_try_timeout`) passed, with time left for another try.
    PerTryTimeout,
    /// A response with this status.
    Status(u16),
    /// A TCP connection was made (TCP proxying: the try succeeded).
    Connected,
    /// The breaker's `max_pending_requests` refused to dial a new connection: nothing was
    /// sent, and the endpoint is not to blame.
    Refused,
    /// The client did not send the request body in time (`proxy.request_body_timeout`): the
    /// endpoint is not to blame, and the request cannot be sent again.
    ClientBodyTimeout,
}

#[derive(Clone, Debug)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub on_503: bool,
    pub on_reset: bool,
}

impl RetryPolicy {
    pub fn from_config(c: &RetryConfig) -> Self {
        Self {
            attempts: c.attempts,
            on_503: c.on_503,
            on_reset: c.on_reset,
        }
    }

    /// Whether a try that ended with `outcome` may be retried. A request that was never sent
    /// is always safe to send again; one that may have reached the application only when its
    /// method is idempotent.
    pub fn retryable(&self, method: &Method, outcome: TryOutcome) -> bool {
        match outcome {
            TryOutcome::ConnectFailed => true,
            TryOutcome::Reset | TryOutcome::PerTryTimeout => self.on_reset && is_idempotent(method),
            TryOutcome::Status(503) => self.on_503 && is_idempotent(method),
            TryOutcome::Status(_)
            | TryOutcome::Timeout
            | TryOutcome::Connected
            | TryOutcome::Refused
            | TryOutcome::ClientBodyTimeout => false,
        }
    }
}

pub fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_table() {
        let p = RetryPolicy::from_config(&RetryConfig::default());
        let cases = [
            (Method::GET, TryOutcome::ConnectFailed, true),
            (Method::POST, TryOutcome::ConnectFailed, true),
            (Method::GET, TryOutcome::Reset, true),
            (Method::POST, TryOutcome::Reset, false),
            (Method::PUT, TryOutcome::Status(503), true),
            (Method::POST, TryOutcome::Status(503), false),
            (Method::GET, TryOutcome::Status(500), false),
            (Method::GET, TryOutcome::Status(200), false),
            (Method::GET, TryOutcome::Timeout, false),
            (Method::GET, TryOutcome::PerTryTimeout, true),
            (Method::POST, TryOutcome::PerTryTimeout, false),
        ];
        for (m, o, want) in cases {
            assert_eq!(p.retryable(&m, o), want, "{m} {o:?}");
        }
    }
}
