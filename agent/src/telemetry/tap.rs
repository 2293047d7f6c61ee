//! The tap: a live, filtered stream of the requests passing through this agent, one JSON line
//! each, for `GET /tap` and `vmesh tap`.
//!
//! Cost: while no tap is attached, the request path does one relaxed atomic load (the subscriber
//! count, [`attached`]) and nothing else. With taps attached (at most [`MAX_TAPS`]), a request's
//! service and path are checked against their filters when it arrives ([`may_want`]; with the
//! access log on, the request is captured anyway) and the whole filter when it ends ([`offer`]); only a request that passes one is formatted, and the
//! line goes into that tap's bounded queue with `try_send`: a tap that reads too slowly loses
//! lines (counted, and reported to it), and never slows a request.
//!
//! Measured with callgrind (fastrel build, `wrk -t1 -c64` through one outbound, access log off):
//! 36,745-37,019 instructions per request with no tap, 36,922-36,926 with a tap attached that
//! filters every request out (checked on arrival: `may_want`, ~170 instructions), 46,892 with a
//! tap that takes every request. Before the arrival check, a filtered-out request was captured
//! for nothing: 38,102 (+5%).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::HeaderValue;
use serde::Serialize;
use tokio::sync::mpsc;

use super::metrics::Direction;
use super::AccessRecord;

/// Taps attached at once; one more is refused (`TAP_LIMIT`, HTTP 429).
pub const MAX_TAPS: usize = 4;
/// Lines a tap's queue holds for its reader; a line that does not fit is dropped and counted.
/// ~300 bytes a line: at most ~300 KiB per tap.
pub const QUEUE_LINES: usize = 1024;

/// The taps of this process (one agent per process).
static TAPS: Taps = Taps::new();

/// Whether a tap is attached: the request path's one relaxed load while none is.
#[inline]
pub fn attached() -> bool {
    TAPS.count.load(Ordering::Relaxed) != 0
}

/// Offers a finished request to the attached taps (see the module docs for the cost).
/// `env` and `colour` are the labels of the endpoint that answered, when one did.
pub fn offer(record: &AccessRecord, env: Option<&str>, colour: Option<&str>) {
    TAPS.offer(&Seen {
        start: record.start,
        direction: record.direction,
        service: &record.service,
        method: record.method.as_str(),
        authority: record.authority.as_ref(),
        path: record.uri.path(),
        status: record.status,
        duration: record.duration,
        upstream: record.upstream,
        env,
        colour,
        error: record.error,
    });
}

/// Whether an attached tap may want a request to `service` (`None`: not known yet) for `path`:
/// checked when the request arrives, so that a request every tap filters out costs nothing more.
pub fn may_want(service: Option<&str>, path: &str) -> bool {
    let guard = TAPS.subscribers.load();
    guard
        .as_deref()
        .is_some_and(|subs| subs.iter().any(|s| s.filter.may_match(service, path)))
}

/// Attaches a tap with `filter` (refused beyond [`MAX_TAPS`]); dropping it detaches it.
pub fn subscribe(filter: Filter) -> Result<Tap, TapError> {
    TAPS.subscribe(filter, QUEUE_LINES)
}

/// Why a tap was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TapError {
    #[error("{MAX_TAPS} taps are attached already; detach one first")]
    Limit,
    #[error("{0}")]
    BadFilter(String),
}

/// Which requests a tap wants; every part that is set must match.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Filter {
    /// The cluster's service (the inbound cluster is `inbound`).
    pub service: Option<String>,
    /// The request path starts with this.
    pub path_prefix: Option<String>,
    pub status: Option<StatusFilter>,
}

/// `2xx` (a class) or `503` (one status).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusFilter {
    Class(u16),
    Exact(u16),
}

/// An attached tap: the reading side of its queue. Dropping it detaches it.
pub struct Tap {
    rx: mpsc::Receiver<Bytes>,
    sub: Arc<Subscriber>,
    taps: &'static Taps,
}

/// The request path's side of one tap.
struct Subscriber {
    filter: Filter,
    tx: mpsc::Sender<Bytes>,
    /// Lines that passed the filter and did not fit into the queue.
    dropped: AtomicU64,
}

struct Taps {
    /// Subscribers attached: what [`attached`] reads.
    count: AtomicUsize,
    subscribers: ArcSwapOption<Vec<Arc<Subscriber>>>,
    /// Serializes attaching and detaching (never taken by the request path).
    change: Mutex<()>,
}

/// What a tap sees of a finished request.
struct Seen<'a> {
    start: SystemTime,
    direction: Direction,
    service: &'a str,
    method: &'a str,
    /// Read as text only for a line that is written.
    authority: Option<&'a HeaderValue>,
    path: &'a str,
    status: u16,
    duration: Duration,
    upstream: Option<SocketAddr>,
    env: Option<&'a str>,
    colour: Option<&'a str>,
    error: Option<&'static str>,
}

/// One tap line.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    direction: &'static str,
    service: &'a str,
    method: &'a str,
    authority: Option<&'a str>,
    path: &'a str,
    status: u16,
    latency_ms: f64,
    upstream: Option<SocketAddr>,
    env: Option<&'a str>,
    colour: Option<&'a str>,
    error: Option<&'static str>,
}

// === impl Filter ===

impl Filter {
    /// Reads `service=`, `path_prefix=` and `status=` from a URL query (percent-decoded);
    /// other keys are ignored. Empty values mean "any".
    pub fn from_query(query: &str) -> Result<Filter, TapError> {
        let mut f = Filter::default();
        for (k, v) in query_pairs(query) {
            let v = percent_decode(&v).ok_or_else(|| TapError::BadFilter(format!("{k}: bad percent-encoding")))?;
            if v.is_empty() {
                continue;
            }
            match k.as_str() {
                "service" => f.service = Some(v),
                "path_prefix" => f.path_prefix = Some(v),
                "status" => f.status = Some(StatusFilter::parse(&v)?),
                _ => {}
            }
        }
        Ok(f)
    }

    /// The service (when known) and path parts of [`Filter::matches`].
    fn may_match(&self, service: Option<&str>, path: &str) -> bool {
        service.is_none_or(|svc| self.service.as_deref().is_none_or(|s| s == svc))
            && self.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
    }

    fn matches(&self, service: &str, path: &str, status: u16) -> bool {
        self.service.as_deref().is_none_or(|s| s == service)
            && self.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
            && self.status.is_none_or(|s| s.matches(status))
    }
}

impl StatusFilter {
    /// `2xx`, `4XX`, `5xx` (a class) or a status `100`..=`599`.
    pub fn parse(s: &str) -> Result<StatusFilter, TapError> {
        let bad = || {
            TapError::BadFilter(format!(
                "status {s:?}: use 2xx, 4xx, 5xx (a class) or a status such as 503"
            ))
        };
        let b = s.as_bytes();
        if b.len() == 3 && b[1..].eq_ignore_ascii_case(b"xx") && (b'1'..=b'5').contains(&b[0]) {
            return Ok(StatusFilter::Class(u16::from(b[0] - b'0')));
        }
        match s.parse::<u16>() {
            Ok(n) if (100..=599).contains(&n) => Ok(StatusFilter::Exact(n)),
            _ => Err(bad()),
        }
    }

    fn matches(self, status: u16) -> bool {
        match self {
            StatusFilter::Class(c) => status / 100 == c,
            StatusFilter::Exact(n) => status == n,
        }
    }
}

fn query_pairs(query: &str) -> impl Iterator<Item = (String, String)> + '_ {
    query.split('&').filter(|kv| !kv.is_empty()).map(|kv| {
        let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
        (k.to_owned(), v.to_owned())
    })
}

/// `%2Fapi+x` -> `/api x`; `None` for a bad escape or bytes that are not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

// === impl Tap ===

impl Tap {
    /// The next line (a JSON object and `\n`), waiting for one; `None` once detached.
    pub async fn recv(&mut self) -> Option<Bytes> {
        self.rx.recv().await
    }

    /// Like [`Tap::recv`] for a body's `poll_frame`.
    pub fn poll_recv(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Option<Bytes>> {
        self.rx.poll_recv(cx)
    }

    /// Lines lost so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.sub.dropped.load(Ordering::Relaxed)
    }
}

impl Drop for Tap {
    fn drop(&mut self) {
        self.taps.detach(&self.sub);
    }
}

// === impl Taps ===

impl Taps {
    const fn new() -> Taps {
        Taps {
            count: AtomicUsize::new(0),
            subscribers: ArcSwapOption::const_empty(),
            change: Mutex::new(()),
        }
    }

    fn subscribe(&'static self, filter: Filter, queue: usize) -> Result<Tap, TapError> {
        let _change = self.change.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.subscribers.load_full();
        let mut list: Vec<Arc<Subscriber>> = current.as_deref().cloned().unwrap_or_default();
        if list.len() >= MAX_TAPS {
            return Err(TapError::Limit);
        }
        let (tx, rx) = mpsc::channel(queue.max(1));
        let sub = Arc::new(Subscriber {
            filter,
            tx,
            dropped: AtomicU64::new(0),
        });
        list.push(sub.clone());
        let n = list.len();
        self.subscribers.store(Some(Arc::new(list)));
        self.count.store(n, Ordering::Relaxed);
        Ok(Tap { rx, sub, taps: self })
    }

    fn detach(&self, sub: &Arc<Subscriber>) {
        let _change = self.change.lock().unwrap_or_else(PoisonError::into_inner);
        let current = self.subscribers.load_full();
        let list: Vec<Arc<Subscriber>> = current
            .as_deref()
            .into_iter()
            .flatten()
            .filter(|s| !Arc::ptr_eq(s, sub))
            .cloned()
            .collect();
        let n = list.len();
        self.subscribers.store((n > 0).then(|| Arc::new(list)));
        self.count.store(n, Ordering::Relaxed);
    }

    fn offer(&self, r: &Seen<'_>) {
        let guard = self.subscribers.load();
        let Some(subs) = guard.as_deref() else {
            return;
        };
        // Formatted once, for the first tap whose filter it passes.
        let mut line: Option<Bytes> = None;
        for sub in subs {
            if !sub.filter.matches(r.service, r.path, r.status) {
                continue;
            }
            let l = line.get_or_insert_with(|| format_line(r)).clone();
            if sub.tx.try_send(l).is_err() {
                sub.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

fn format_line(r: &Seen<'_>) -> Bytes {
    let line = Line {
        time: humantime::format_rfc3339_millis(r.start).to_string(),
        direction: r.direction.as_str(),
        service: r.service,
        method: r.method,
        authority: r.authority.and_then(|a| a.to_str().ok()),
        path: r.path,
        status: r.status,
        latency_ms: millis(r.duration),
        upstream: r.upstream,
        env: r.env.filter(|e| !e.is_empty()),
        colour: r.colour.filter(|c| !c.is_empty()),
        error: r.error,
    };
    let mut out = serde_json::to_vec(&line).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

/// Milliseconds with microsecond precision.
fn millis(d: Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// The line a tap reader gets when lines were dropped since its last report: the total so far.
pub fn dropped_line(total: u64) -> Bytes {
    let v = serde_json::json!({
        "dropped": total,
        "message": format!("{total} lines dropped (the tap reader was slower than the traffic)"),
    });
    let mut out = serde_json::to_vec(&v).unwrap_or_default();
    out.push(b'\n');
    Bytes::from(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    static ORDERS: HeaderValue = HeaderValue::from_static("orders");

    fn seen(path: &str, status: u16) -> Seen<'_> {
        Seen {
            start: SystemTime::UNIX_EPOCH,
            direction: Direction::Outbound,
            service: "orders",
            method: "GET",
            authority: Some(&ORDERS),
            path,
            status,
            duration: Duration::from_micros(1500),
            upstream: None,
            env: Some("vm"),
            colour: Some(""),
            error: None,
        }
    }

    fn taps() -> &'static Taps {
        Box::leak(Box::new(Taps::new()))
    }

    #[test]
    fn filters_parse_and_match() {
        let f = Filter::from_query("service=orders&path_prefix=%2Fapi%2Fv1&status=5xx&limit=3").unwrap();
        assert_eq!(f.service.as_deref(), Some("orders"));
        assert_eq!(f.path_prefix.as_deref(), Some("/api/v1"));
        assert_eq!(f.status, Some(StatusFilter::Class(5)));
        assert!(f.matches("orders", "/api/v1/x", 503));
        assert!(!f.matches("orders", "/api/v1/x", 200));
        assert!(!f.matches("users", "/api/v1/x", 503));
        assert!(!f.matches("orders", "/api/v2", 503));
        assert!(f.may_match(Some("orders"), "/api/v1/x") && f.may_match(None, "/api/v1/x"));
        assert!(!f.may_match(Some("users"), "/api/v1/x") && !f.may_match(None, "/x"));
        assert_eq!(StatusFilter::parse("404"), Ok(StatusFilter::Exact(404)));
        assert_eq!(StatusFilter::parse("2XX"), Ok(StatusFilter::Class(2)));
        for bad in ["6xx", "99", "600", "abc", "5x"] {
            assert!(StatusFilter::parse(bad).is_err(), "{bad}");
        }
        assert!(Filter::from_query("path_prefix=%zz").is_err());
        assert_eq!(Filter::from_query("service=&status=").unwrap(), Filter::default());
    }

    #[test]
    fn nothing_attached_means_a_zero_count_and_detach_restores_it() {
        let t = taps();
        assert_eq!(t.count.load(Ordering::Relaxed), 0);
        let a = t.subscribe(Filter::default(), 8).unwrap();
        assert_eq!(t.count.load(Ordering::Relaxed), 1);
        drop(a);
        assert_eq!(t.count.load(Ordering::Relaxed), 0);
        assert!(t.subscribers.load().is_none());
    }

    #[test]
    fn at_most_max_taps_attach() {
        let t = taps();
        let held: Vec<Tap> = (0..MAX_TAPS)
            .map(|_| t.subscribe(Filter::default(), 8).unwrap())
            .collect();
        assert_eq!(t.subscribe(Filter::default(), 8).err(), Some(TapError::Limit));
        drop(held);
        assert!(t.subscribe(Filter::default(), 8).is_ok());
    }

    #[tokio::test]
    async fn only_matching_requests_reach_a_tap_and_a_full_queue_counts_drops() {
        let t = taps();
        let mut five = t.subscribe(Filter::from_query("status=5xx").unwrap(), 2).unwrap();
        let mut all = t.subscribe(Filter::default(), 64).unwrap();
        for (i, status) in [200, 503, 200, 500, 502, 504].into_iter().enumerate() {
            t.offer(&seen(&format!("/r/{i}"), status));
        }
        // The 5xx tap's queue holds two lines: the third and fourth 5xx are dropped.
        let first: serde_json::Value = serde_json::from_slice(&five.recv().await.unwrap()).unwrap();
        assert_eq!(first["status"], 503);
        assert_eq!(first["path"], "/r/1");
        assert_eq!(first["env"], "vm");
        assert_eq!(first["colour"], serde_json::Value::Null);
        assert_eq!(first["latency_ms"], 1.5);
        assert_eq!(first["direction"], "outbound");
        let second: serde_json::Value = serde_json::from_slice(&five.recv().await.unwrap()).unwrap();
        assert_eq!(second["status"], 500);
        assert_eq!(five.dropped(), 2);
        assert!(five.rx.try_recv().is_err());
        // The unfiltered tap got all six and dropped none.
        for i in 0..6 {
            let v: serde_json::Value = serde_json::from_slice(&all.recv().await.unwrap()).unwrap();
            assert_eq!(v["path"], format!("/r/{i}"));
        }
        assert_eq!(all.dropped(), 0);
    }

    #[test]
    fn the_dropped_line_is_json_with_the_total() {
        let v: serde_json::Value = serde_json::from_slice(&dropped_line(7)).unwrap();
        assert_eq!(v["dropped"], 7);
        assert!(v["message"].as_str().unwrap().starts_with("7 lines dropped"));
    }
}
