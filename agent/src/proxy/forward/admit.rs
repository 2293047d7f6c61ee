//! The admit stage: what may refuse a request before any endpoint is tried — the route's or
//! the service's rate limit (429 `RATE_LIMITED`), the inbound adaptive concurrency limit (503
//! `OVERLOADED`), and the service's circuit breaker (503 `CIRCUIT_OPEN`, or the fallback).
//! What it admits it also closes: the breaker and the adaptive limiter learn each request's
//! result through [`Admitted`].

use std::time::{Duration, Instant};

use http::header::HeaderValue;
use http::request::Parts;
use http::Response;

use super::super::body::ResponseBody;
use super::super::complete::Completion;
use super::super::error::{ProxyError, X_VMESH_ERROR};
use crate::governance::routing::Route;
use crate::governance::Fallback;
use crate::resilience::breaker::{RequestGuard, RetryGuard};
use crate::resilience::retry_budget::RetryToken;
use crate::route::Cluster;

/// Why a request was refused.
pub enum Refused {
    /// Over a rate limit: a token comes back after this long.
    RateLimited(Duration),
    Error(ProxyError),
}

/// An admitted request's hold on the breaker and the adaptive limiter.
pub struct Admitted {
    breaker: Option<RequestGuard>,
    adaptive: Option<crate::resilience::adaptive::Guard>,
}

pub fn admit(cluster: &Cluster, route: Option<&Route>, parts: &Parts, now: Instant) -> Result<Admitted, Refused> {
    let limit = route
        .and_then(|r| r.rate_limit.as_deref())
        .or(cluster.rate_limit.as_deref());
    if let Some(l) = limit {
        l.check(&parts.headers, now).map_err(Refused::RateLimited)?;
    }
    let adaptive = match &cluster.adaptive {
        Some(a) => Some(a.try_acquire(now).ok_or(Refused::Error(ProxyError::Overloaded))?),
        None => None,
    };
    let breaker = match &cluster.breaker {
        Some(b) => Some(b.admit(now).map_err(|r| {
            Refused::Error(match r.code() {
                "CIRCUIT_OPEN" => ProxyError::CircuitOpen,
                _ => ProxyError::CircuitFull,
            })
        })?),
        None => None,
    };
    Ok(Admitted { breaker, adaptive })
}

impl Admitted {
    /// The upstream answered `status` at `answered_at` to a request that arrived at `start`: a
    /// 5xx counts as a failure.
    pub fn finish(self, status: u16, start: Instant, answered_at: Instant) {
        let ok = status < 500;
        if let Some(g) = self.breaker {
            g.record(ok, answered_at);
        }
        if let Some(g) = self.adaptive {
            g.record(answered_at.saturating_duration_since(start), ok, answered_at);
        }
    }

    /// The request ends with the proxy's own error answer `resp` (a failure).
    pub fn finish_with_error(self, resp: Response<ResponseBody>) -> Response<ResponseBody> {
        if let Some(g) = self.breaker {
            g.record(false, Instant::now());
        }
        // A failed request says nothing about the app's latency: the slot is released
        // without a sample.
        drop(self.adaptive);
        resp
    }
}

/// What a retry holds: a retry-budget token and, with a breaker, one of its retry slots.
pub struct RetryTokens {
    _budget: RetryToken,
    _breaker: Option<RetryGuard>,
}

/// Tokens for one more try, if both the retry budget and the breaker's `max_retries` allow.
pub fn retry_tokens(cluster: &Cluster, admitted: &Admitted) -> Option<RetryTokens> {
    let breaker = match (&cluster.breaker, &admitted.breaker) {
        (Some(b), Some(_)) => Some(b.retry()?),
        _ => None,
    };
    Some(RetryTokens {
        _budget: cluster.budget.try_retry()?,
        _breaker: breaker,
    })
}

/// 429 `RATE_LIMITED` with `retry-after` in whole seconds (or the fallback that covers it).
pub fn rate_limited(
    wait: Duration,
    grpc: bool,
    fallback: Option<&Fallback>,
    completion: Completion,
) -> Response<ResponseBody> {
    let mut r = super::fail_or_fallback(ProxyError::RateLimited, grpc, fallback, completion);
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    if let Ok(v) = HeaderValue::from_str(&secs.max(1).to_string()) {
        r.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    r
}

/// The answer of an injected abort: `status`, code `FAULT_INJECTED`.
pub fn fault_answer(status: u16, grpc: bool, mut completion: Completion) -> Response<ResponseBody> {
    let status = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::SERVICE_UNAVAILABLE);
    completion.status = if grpc { 200 } else { status.as_u16() };
    completion.headers_time = completion.start.elapsed();
    completion.set_error("FAULT_INJECTED");
    if let Some(c) = &completion.cluster {
        c.metrics.proxy_error("FAULT_INJECTED");
    }
    let body = if grpc {
        // gRPC trailers-only: no body.
        bytes::Bytes::new()
    } else {
        bytes::Bytes::from_static(b"FAULT_INJECTED: fault injected by a route rule\n")
    };
    let mut r = Response::new(ResponseBody::full(body, Some(completion)));
    if grpc {
        let h = r.headers_mut();
        h.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
        h.insert("grpc-status", HeaderValue::from_static("14"));
        h.insert("grpc-message", HeaderValue::from_static("FAULT_INJECTED"));
    } else {
        *r.status_mut() = status;
    }
    r.headers_mut()
        .insert(X_VMESH_ERROR.clone(), HeaderValue::from_static("FAULT_INJECTED"));
    r
}
