//! Shared pieces of the governance tests (outlier ejection, circuit breaking, canary splits,
//! colouring, fault injection, rate and adaptive limits): a keep-alive client that sends
//! headers and times each answer, a bounded multi-threaded load, tallies of who (or what)
//! answered, Prometheus series matched by labels, and the `/clusters` governance view.
//!
//! ```text
//! let replies = Load::new(agent.outbound_addr("web"), "/").threads(4).requests_per_thread(75).run();
//! let t = tally(&replies);                      // {"200 a": 150, "200 b": 150}
//! let state = breaker_state(&agent, "pay");     // "open"
//! let n = metric_sum(&agent.metrics_text(), "vmesh_fallbacks_total", &[("service", "pay")]);
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::http::HttpResponse;
use crate::shift::KeepAlive;
use crate::Agent;

/// The longest any [`Load`] runs, whatever it was asked (a test bound, not a pace).
const LOAD_MAX: Duration = Duration::from_secs(60);

// === one request ===

/// One request's answer (or transport failure) and how long it took.
#[derive(Debug, Clone)]
pub struct Reply {
    /// When the request was written.
    pub start: Instant,
    /// Time to the complete answer (or the failure).
    pub latency: Duration,
    /// The answer, or what went wrong on the wire.
    pub result: Result<HttpResponse, String>,
}

impl Reply {
    /// The status (0 when no answer arrived).
    pub fn status(&self) -> u16 {
        self.result.as_ref().map_or(0, |r| r.status)
    }

    /// The first value of response header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.result.as_ref().ok().and_then(|r| r.header(name))
    }

    /// `x-upstream-name`: which upstream answered (absent on vmesh's own answers).
    pub fn upstream(&self) -> Option<&str> {
        self.header("x-upstream-name")
    }

    /// `x-vmesh-error`: the code of an answer vmesh gave itself.
    pub fn error_code(&self) -> Option<&str> {
        self.header("x-vmesh-error")
    }

    /// A 200 from an upstream.
    pub fn is_ok(&self) -> bool {
        self.status() == 200 && self.upstream().is_some()
    }

    /// The body as (lossy) UTF-8 ("" on a transport failure).
    pub fn text(&self) -> String {
        self.result.as_ref().map(HttpResponse::text).unwrap_or_default()
    }

    /// A short label for tallies: `200 a`, `503 OVERLOADED`, `500 sick`, `200 fallback`,
    /// `ERR <why>`.
    pub fn label(&self) -> String {
        match &self.result {
            Err(e) => format!("ERR {e}"),
            Ok(r) => {
                let who = if r.header("x-vmesh-fallback").is_some() {
                    "fallback"
                } else {
                    r.header("x-vmesh-error")
                        .or_else(|| r.header("x-upstream-name"))
                        .unwrap_or("?")
                };
                format!("{} {who}", r.status)
            }
        }
    }
}

/// A keep-alive HTTP/1.1 client for one address that can send request headers.
pub struct Client {
    addr: SocketAddr,
    conn: KeepAlive,
}

impl Client {
    /// A client for `addr`; connects on the first request, reconnects after a failure.
    pub fn new(addr: SocketAddr) -> Client {
        Client {
            addr,
            conn: KeepAlive::new(addr),
        }
    }

    /// `GET path` with `headers` (`("x-user", "tester")`), timed.
    pub fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> Reply {
        let mut request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n", self.addr);
        for (k, v) in headers {
            request.push_str(&format!("{k}: {v}\r\n"));
        }
        request.push_str("\r\n");
        let start = Instant::now();
        let result = self.conn.exchange(request.as_bytes());
        Reply {
            start,
            latency: start.elapsed(),
            result,
        }
    }
}

// === load ===

/// A bounded load: `threads` clients, each on its own keep-alive connection sending `GET path`
/// one request at a time, until each has sent `requests_per_thread` or `max_time` has passed.
#[derive(Debug, Clone)]
pub struct Load {
    addr: SocketAddr,
    path: String,
    headers: Vec<(String, String)>,
    threads: usize,
    per_thread: usize,
    max_time: Duration,
    backoff: Duration,
}

/// A [`Load`] running in the background.
pub struct RunningLoad {
    stop: Arc<AtomicBool>,
    replies: Arc<Mutex<Vec<Reply>>>,
    threads: Vec<JoinHandle<()>>,
}

impl Load {
    /// One thread, 100 requests, at most 30 s, no backoff.
    pub fn new(addr: SocketAddr, path: &str) -> Load {
        Load {
            addr,
            path: path.to_string(),
            headers: Vec::new(),
            threads: 1,
            per_thread: 100,
            max_time: Duration::from_secs(30),
            backoff: Duration::ZERO,
        }
    }

    /// Client threads (connections) sending at once.
    pub fn threads(mut self, n: usize) -> Load {
        self.threads = n.max(1);
        self
    }

    /// Requests each thread sends at most.
    pub fn requests_per_thread(mut self, n: usize) -> Load {
        self.per_thread = n;
        self
    }

    /// The longest the load runs (capped at 60 s).
    pub fn max_time(mut self, d: Duration) -> Load {
        self.max_time = d.min(LOAD_MAX);
        self
    }

    /// Adds a request header.
    pub fn header(mut self, name: &str, value: &str) -> Load {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    /// A thread pauses this long after an answer that is not a 2xx (a client backing off
    /// after a refusal, instead of spinning on it).
    pub fn backoff(mut self, d: Duration) -> Load {
        self.backoff = d;
        self
    }

    /// Runs the load to its end and returns every reply, in start order.
    pub fn run(self) -> Vec<Reply> {
        self.spawn().wait()
    }

    /// Starts the load in the background.
    pub fn spawn(self) -> RunningLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let replies = Arc::new(Mutex::new(Vec::new()));
        let began = Instant::now();
        let threads = (0..self.threads)
            .map(|_| {
                let (stop, replies, load) = (stop.clone(), replies.clone(), self.clone());
                std::thread::spawn(move || {
                    let headers: Vec<(&str, &str)> =
                        load.headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    let mut client = Client::new(load.addr);
                    for _ in 0..load.per_thread {
                        if stop.load(Ordering::SeqCst) || began.elapsed() >= load.max_time {
                            break;
                        }
                        let reply = client.get(&load.path, &headers);
                        let refused = !(200..300).contains(&reply.status());
                        if let Ok(mut r) = replies.lock() {
                            r.push(reply);
                        }
                        if refused && !load.backoff.is_zero() {
                            std::thread::sleep(load.backoff);
                        }
                    }
                })
            })
            .collect();
        RunningLoad { stop, replies, threads }
    }
}

impl RunningLoad {
    /// Replies so far.
    pub fn len(&self) -> usize {
        self.replies.lock().map(|r| r.len()).unwrap_or(0)
    }

    /// Whether no reply has arrived yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether every thread has finished.
    pub fn finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Waits for the threads to end (they are bounded) and returns every reply in start order.
    pub fn wait(mut self) -> Vec<Reply> {
        self.join();
        let mut all = self.replies.lock().map(|r| r.clone()).unwrap_or_default();
        all.sort_by_key(|r| r.start);
        all
    }

    /// Stops the threads after their current request and returns every reply.
    pub fn stop(self) -> Vec<Reply> {
        self.stop.store(true, Ordering::SeqCst);
        self.wait()
    }

    fn join(&mut self) {
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for RunningLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.join();
    }
}

/// Replies by [`Reply::label`], for assertion messages and counts.
pub fn tally(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in replies {
        *out.entry(r.label()).or_insert(0) += 1;
    }
    out
}

/// How many replies carry `label` (see [`Reply::label`]).
pub fn count(replies: &[Reply], label: &str) -> usize {
    replies.iter().filter(|r| r.label() == label).count()
}

/// The nearest-rank `p`-th percentile of `latencies` (zero when empty).
pub fn percentile(latencies: &[Duration], p: f64) -> Duration {
    if latencies.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = latencies.to_vec();
    sorted.sort();
    let rank = (p / 100.0 * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

// === metrics ===

/// The sum of every series of metric `name` whose labels include all of `labels` (0 when
/// none): `metric_sum(text, "vmesh_proxy_errors_total", &[("code", "FAULT_INJECTED")])`.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(parse_series)
        .filter(|(n, ls, _)| n == name && labels.iter().all(|(k, v)| ls.iter().any(|(lk, lv)| lk == k && lv == v)))
        .map(|(_, _, v)| v)
        .sum()
}

/// One Prometheus sample: name, labels, value.
type Series = (String, Vec<(String, String)>, f64);

/// `name{k="v",...} value` -> (name, labels, value).
fn parse_series(line: &str) -> Option<Series> {
    let (series, value) = line.trim().rsplit_once(' ')?;
    let value: f64 = value.trim().parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        Some((n, rest)) => {
            let body = rest.strip_suffix('}')?;
            let mut labels = Vec::new();
            for pair in split_labels(body) {
                let (k, v) = pair.split_once('=')?;
                labels.push((k.trim().to_string(), v.trim().trim_matches('"').to_string()));
            }
            (n.to_string(), labels)
        }
        None => (series.to_string(), Vec::new()),
    };
    Some((name, labels, value))
}

/// Splits `a="x",b="y,z"` on the commas outside quotes.
fn split_labels(body: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in body.char_indices() {
        if escaped {
            escaped = false;
            continue;
        }
        match c {
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&body[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < body.len() {
        out.push(&body[start..]);
    }
    out
}

// === /clusters ===

/// The cluster of `direction` (`inbound`, `outbound`) and `service` in `GET /clusters`; for the
/// inbound cluster pass `None` as the service.
pub fn cluster_of(agent: &Agent, direction: &str, service: Option<&str>) -> Value {
    let doc = agent.admin_json("/clusters");
    doc["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["direction"] == direction && service.is_none_or(|s| c["service"] == s))
        .cloned()
        .unwrap_or_else(|| panic!("no {direction} cluster {service:?} in /clusters: {doc}"))
}

/// `governance` of the outbound cluster `service`.
pub fn governance(agent: &Agent, service: &str) -> Value {
    cluster_of(agent, "outbound", Some(service))["governance"].clone()
}

/// The breaker state of outbound `service` (`closed`, `open`, `half_open`).
pub fn breaker_state(agent: &Agent, service: &str) -> String {
    let g = governance(agent, service);
    g["breaker"]["status"]["state"]
        .as_str()
        .unwrap_or_else(|| panic!("no breaker status for {service}: {g}"))
        .to_string()
}

/// `governance.adaptive` of the inbound cluster.
pub fn adaptive_status(agent: &Agent) -> Value {
    let c = cluster_of(agent, "inbound", None);
    let a = c["governance"]["adaptive"].clone();
    assert!(a.is_object(), "the inbound cluster has no adaptive status: {c}");
    a
}

/// `address -> healthy` of every endpoint of outbound `service`.
pub fn endpoint_health(agent: &Agent, service: &str) -> BTreeMap<String, bool> {
    cluster_of(agent, "outbound", Some(service))["endpoints"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["address"].as_str().unwrap_or_default().to_string(),
                e["healthy"].as_bool().unwrap_or(false),
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_are_matched_by_label_subset() {
        let text = "# HELP x\nvmesh_outlier_ejections_total{direction=\"outbound\",service=\"web\",reason=\"consecutive_gateway\"} 2\n\
                    vmesh_outlier_ejections_total{direction=\"outbound\",service=\"web\",reason=\"failure_percentage\"} 1\n\
                    vmesh_up 1\n";
        assert_eq!(
            metric_sum(text, "vmesh_outlier_ejections_total", &[("service", "web")]),
            3.0
        );
        assert_eq!(
            metric_sum(
                text,
                "vmesh_outlier_ejections_total",
                &[("reason", "failure_percentage")]
            ),
            1.0
        );
        assert_eq!(metric_sum(text, "vmesh_up", &[]), 1.0);
        assert_eq!(metric_sum(text, "vmesh_none", &[]), 0.0);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let ms: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&ms, 99.0), Duration::from_millis(99));
        assert_eq!(percentile(&ms, 50.0), Duration::from_millis(50));
        assert_eq!(percentile(&[], 99.0), Duration::ZERO);
    }
}
