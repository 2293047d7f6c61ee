//! The access log: one JSON line per request, formatted and written on its own thread. The
//! request path only hands a record to a bounded channel; when the writer falls behind, lines
//! are dropped and counted (`vmesh_access_log_dropped_total`) rather than slowing requests.

use std::io::Write;
use std::net::SocketAddr;
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderValue, Method, Uri};
use prometheus_client::metrics::counter::Counter;
use serde::Serialize;

use super::metrics::Direction;

/// What the request path records; cheap to build (reference-counted parts, no formatting).
#[derive(Debug)]
pub struct AccessRecord {
    pub start: SystemTime,
    pub direction: Direction,
    pub service: Arc<str>,
    pub method: Method,
    pub authority: Option<HeaderValue>,
    pub uri: Uri,
    pub status: u16,
    pub upstream: Option<SocketAddr>,
    pub error: Option<&'static str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_time: Duration,
    pub overhead: Duration,
    pub attempts: u32,
    pub request_id: Option<HeaderValue>,
    pub client: SocketAddr,
}

/// The sending side, cloned into every listener.
#[derive(Clone, Debug)]
pub struct AccessLog {
    tx: Option<SyncSender<AccessRecord>>,
    dropped: Counter,
}

#[derive(Serialize)]
struct Line<'a> {
    ts: String,
    direction: &'static str,
    service: &'a str,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    status: u16,
    upstream: Option<String>,
    error: Option<&'static str>,
    bytes_received: u64,
    bytes_sent: u64,
    duration_us: u128,
    upstream_us: u128,
    overhead_us: u128,
    attempts: u32,
    request_id: &'a str,
    client: String,
}

impl AccessLog {
    /// A log that records nothing.
    pub fn off() -> Self {
        Self {
            tx: None,
            dropped: Counter::default(),
        }
    }

    /// Starts the writer thread for `target` (`stdout` or a file path).
    pub fn start(target: &str, buffer: usize, dropped: Counter) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            "off" => return Ok(Self { tx: None, dropped }),
            "stdout" => Box::new(std::io::stdout()),
            path => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let (tx, rx) = sync_channel(buffer);
        std::thread::Builder::new()
            .name("vmesh-access-log".into())
            .spawn(move || write_loop(rx, out))?;
        Ok(Self { tx: Some(tx), dropped })
    }

    pub fn enabled(&self) -> bool {
        self.tx.is_some()
    }

    pub fn record(&self, r: AccessRecord) {
        if let Some(tx) = &self.tx {
            match tx.try_send(r) {
                Ok(()) => {}
                Err(TrySendError::Full(_)) | Err(TrySendError::Disconnected(_)) => {
                    self.dropped.inc();
                }
            }
        }
    }
}

fn write_loop(rx: Receiver<AccessRecord>, out: Box<dyn Write + Send>) {
    let mut out = std::io::BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        while let Some(r) = next {
            if let Err(e) = write_line(&mut out, &r) {
                tracing::warn!(error = %e, "access log write failed");
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
}

fn write_line(out: &mut impl Write, r: &AccessRecord) -> std::io::Result<()> {
    let authority = r
        .authority
        .as_ref()
        .and_then(|h| h.to_str().ok())
        .or_else(|| r.uri.authority().map(|a| a.as_str()))
        .unwrap_or("");
    let line = Line {
        ts: humantime::format_rfc3339_micros(r.start).to_string(),
        direction: r.direction.as_str(),
        service: &r.service,
        method: r.method.as_str(),
        authority,
        path: r.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        status: r.status,
        upstream: r.upstream.map(|a| a.to_string()),
        error: r.error,
        bytes_received: r.bytes_received,
        bytes_sent: r.bytes_sent,
        duration_us: r.duration.as_micros(),
        upstream_us: r.upstream_time.as_micros(),
        overhead_us: r.overhead.as_micros(),
        attempts: r.attempts,
        request_id: r.request_id.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
        client: r.client.to_string(),
    };
    serde_json::to_writer(&mut *out, &line)?;
    out.write_all(b"\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_is_one_json_line_with_every_field() {
        let r = AccessRecord {
            start: SystemTime::UNIX_EPOCH,
            direction: Direction::Outbound,
            service: "orders".into(),
            method: Method::POST,
            authority: Some(HeaderValue::from_static("orders:80")),
            uri: Uri::from_static("/a/b?c=1"),
            status: 201,
            upstream: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
            error: None,
            bytes_received: 3,
            bytes_sent: 10,
            duration: Duration::from_micros(1500),
            upstream_time: Duration::from_micros(1200),
            overhead: Duration::from_micros(300),
            attempts: 1,
            request_id: Some(HeaderValue::from_static("abc")),
            client: SocketAddr::from(([127, 0, 0, 2], 5555)),
        };
        let mut buf = Vec::new();
        write_line(&mut buf, &r).unwrap();
        let text = String::from_utf8(buf).unwrap();
        assert!(text.ends_with('\n') && text.matches('\n').count() == 1);
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["authority"], "orders:80");
        assert_eq!(v["path"], "/a/b?c=1");
        assert_eq!(v["status"], 201);
        assert_eq!(v["upstream"], "127.0.0.1:8080");
        assert_eq!(v["duration_us"], 1500);
        assert_eq!(v["upstream_us"], 1200);
        assert_eq!(v["overhead_us"], 300);
        assert_eq!(v["request_id"], "abc");
    }

    #[test]
    fn a_full_buffer_drops_and_counts() {
        let (tx, _rx) = sync_channel(0);
        let log = AccessLog {
            tx: Some(tx),
            dropped: Counter::default(),
        };
        log.record(AccessRecord {
            start: SystemTime::UNIX_EPOCH,
            direction: Direction::Inbound,
            service: "s".into(),
            method: Method::GET,
            authority: None,
            uri: Uri::from_static("/"),
            status: 200,
            upstream: None,
            error: None,
            bytes_received: 0,
            bytes_sent: 0,
            duration: Duration::ZERO,
            upstream_time: Duration::ZERO,
            overhead: Duration::ZERO,
            attempts: 1,
            request_id: None,
            client: SocketAddr::from(([127, 0, 0, 1], 1)),
        });
        assert_eq!(log.dropped.get(), 1);
    }
}
