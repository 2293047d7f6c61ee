//! Request governance beyond balancing: routing rules and canary splits, colouring (染色) and
//! header propagation, fault injection, fallback answers, and the per-service policy that a
//! registry KV key may set centrally. Everything here is compiled once per config (or policy)
//! generation; the request path only reads the compiled form.

pub mod authz;
pub mod central;
pub mod colour;
pub mod fault;
pub mod routing;
pub mod split;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use serde::{Deserialize, Serialize};

/// Marks an answer that vmesh gave instead of the upstream's.
pub static X_VMESH_FALLBACK: HeaderName = HeaderName::from_static("x-vmesh-fallback");

/// The proxy error codes a fallback may stand in for.
pub const FALLBACK_CODES: &[&str] = &[
    "CIRCUIT_OPEN",
    "NO_HEALTHY_ENDPOINT",
    "UPSTREAM_CONNECT_FAILED",
    "UPSTREAM_TIMEOUT",
    "UPSTREAM_RESET",
    "RATE_LIMITED",
];

/// A rate limit as the request path uses it: the buckets (per caller when `by` is set) and
/// the config they were built from, so that a reload keeps the buckets of an unchanged limit.
#[derive(Debug)]
pub struct RateLimit {
    buckets: crate::resilience::rate_limit::KeyedLimiter,
    config: crate::resilience::rate_limit::RateLimitConfig,
}

impl RateLimit {
    /// Keeps `previous` (and its buckets) when its config is unchanged.
    pub fn reuse(
        c: &crate::resilience::rate_limit::RateLimitConfig,
        previous: Option<&std::sync::Arc<Self>>,
    ) -> std::sync::Arc<Self> {
        match previous {
            Some(p) if p.config == *c => p.clone(),
            _ => std::sync::Arc::new(Self {
                buckets: crate::resilience::rate_limit::KeyedLimiter::new(c),
                config: c.clone(),
            }),
        }
    }

    /// Takes a token for a request with `headers`; `Err`: the wait until one is available.
    pub fn check(&self, headers: &HeaderMap, now: Instant) -> Result<(), Duration> {
        self.buckets.check(headers, now)
    }
}

/// `[outbound.fallback]` (or a route's `fallback`): the answer given instead of a proxy error.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FallbackConfig {
    /// Status of the answer.
    #[serde(default = "default_status")]
    pub status: u16,
    /// Headers of the answer (`x-vmesh-fallback: 1` is always added).
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    /// Body of the answer.
    #[serde(default)]
    pub body: String,
    /// The proxy errors it answers for (codes of docs/admin-api.md).
    #[serde(default = "default_on")]
    pub on: Vec<String>,
}

fn default_status() -> u16 {
    200
}

fn default_on() -> Vec<String> {
    vec!["CIRCUIT_OPEN".to_owned()]
}

/// A compiled fallback.
#[derive(Debug)]
pub struct Fallback {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    on: Vec<&'static str>,
}

impl Fallback {
    pub fn new(c: &FallbackConfig) -> Self {
        let mut headers = HeaderMap::new();
        for (k, v) in &c.headers {
            if let (Ok(k), Ok(v)) = (HeaderName::from_bytes(k.as_bytes()), HeaderValue::from_str(v)) {
                headers.insert(k, v);
            }
        }
        headers.insert(X_VMESH_FALLBACK.clone(), HeaderValue::from_static("1"));
        Self {
            status: StatusCode::from_u16(c.status).unwrap_or(StatusCode::OK),
            headers,
            body: Bytes::from(c.body.clone()),
            on: FALLBACK_CODES
                .iter()
                .copied()
                .filter(|code| c.on.iter().any(|o| o == code))
                .collect(),
        }
    }

    /// Whether this fallback answers for the proxy error `code`.
    pub fn covers(&self, code: &str) -> bool {
        self.on.contains(&code)
    }
}

/// `"key: message"` lines (as the resilience configs report them) as `(key, message)` pairs.
pub fn keyed(lines: Vec<String>) -> Vec<(String, String)> {
    lines
        .into_iter()
        .map(|l| match l.split_once(": ") {
            Some((k, m)) if !k.contains(' ') => (k.to_owned(), m.to_owned()),
            _ => (String::new(), l),
        })
        .collect()
}

/// Problems of a fallback, each naming its key.
pub fn validate_fallback(key: &str, c: &FallbackConfig) -> Vec<(String, String)> {
    let mut p = Vec::new();
    if !(200..=599).contains(&c.status) {
        p.push((
            format!("{key}.status"),
            format!("{} is not an HTTP status 200-599", c.status),
        ));
    }
    for (k, v) in &c.headers {
        if HeaderName::from_bytes(k.as_bytes()).is_err() {
            p.push((format!("{key}.headers"), format!("{k:?} is not a header name")));
        }
        if HeaderValue::from_str(v).is_err() {
            p.push((format!("{key}.headers.{k}"), format!("{v:?} is not a header value")));
        }
    }
    if c.on.is_empty() {
        p.push((format!("{key}.on"), "must name at least one error code".to_owned()));
    }
    for o in &c.on {
        if !FALLBACK_CODES.contains(&o.as_str()) {
            p.push((
                format!("{key}.on"),
                format!("{o:?} is not one of {}", FALLBACK_CODES.join(", ")),
            ));
        }
    }
    p
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fallback_covers_its_codes_and_marks_itself() {
        let f = Fallback::new(&FallbackConfig {
            status: 200,
            headers: BTreeMap::from([("content-type".to_owned(), "application/json".to_owned())]),
            body: "{}".to_owned(),
            on: vec!["CIRCUIT_OPEN".to_owned(), "UPSTREAM_TIMEOUT".to_owned()],
        });
        assert!(f.covers("CIRCUIT_OPEN") && f.covers("UPSTREAM_TIMEOUT"));
        assert!(!f.covers("NO_HEALTHY_ENDPOINT"));
        assert_eq!(f.headers[&X_VMESH_FALLBACK], "1");
    }

    #[test]
    fn bad_fallbacks_are_named() {
        let c = FallbackConfig {
            status: 99,
            headers: BTreeMap::from([("bad header".to_owned(), "x".to_owned())]),
            body: String::new(),
            on: vec!["NOPE".to_owned()],
        };
        let p = format!("{:?}", validate_fallback("outbound[0].fallback", &c));
        assert!(p.contains("outbound[0].fallback.status"), "{p}");
        assert!(p.contains("not a header name"), "{p}");
        assert!(p.contains("\\\"NOPE\\\" is not one of"), "{p}");
    }
}
