//! The end of a request: status counters, latency histograms and the access-log line, written
//! once when the response body finishes (or the client goes away).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Uri};

use crate::balance::InFlight;
use crate::route::Cluster;
use crate::telemetry::metrics::Direction;
use crate::telemetry::{AccessLog, AccessRecord};

/// What is known about a request when its response headers go out.
pub struct Completion {
    pub start: Instant,
    pub direction: Direction,
    pub cluster: Option<Arc<Cluster>>,
    /// The endpoint that answered; holds its in-flight count until the body ends.
    pub endpoint: Option<InFlight>,
    pub status: u16,
    pub upstream_time: Duration,
    /// Time from the request's arrival to the response headers.
    pub headers_time: Duration,
    pub attempts: u32,
    pub error: Option<&'static str>,
    /// Present only when the access log is on or a tap was attached when the request came.
    pub log: Option<Box<LogParts>>,
    /// Keeps the downstream connection from counting as idle until the response ends.
    pub active: Option<crate::proxy::ActiveRequest>,
    /// The span of a sampled request when `[tracing]` is on (`record::trace_ended`).
    pub trace: Option<Box<crate::telemetry::trace::Span>>,
}

/// The request's identity for the access log, captured before the request went upstream.
pub struct LogParts {
    pub sink: AccessLog,
    pub wall_start: SystemTime,
    pub method: Method,
    pub uri: Uri,
    pub authority: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
    pub client: SocketAddr,
    /// The caller's verified identity (`spiffe://...`; inbound mutual TLS).
    pub caller: Option<Arc<str>>,
    pub received: Received,
}

/// Request body bytes: known up front, or counted while streaming.
pub enum Received {
    Known(u64),
    Counted(Arc<AtomicU64>),
}

impl Completion {
    pub fn set_error(&mut self, code: &'static str) {
        self.error.get_or_insert(code);
    }

    pub fn finish(mut self, bytes_sent: u64) {
        let total = self.start.elapsed();
        if let Some(span) = self.trace.take() {
            super::record::trace_ended(span, &self, total);
        }
        let overhead = self.headers_time.saturating_sub(self.upstream_time);
        let metrics = match (&self.endpoint, &self.cluster) {
            (Some(ep), _) => Some(&ep.endpoint().metrics),
            (None, Some(c)) => Some(&c.metrics.no_endpoint),
            (None, None) => None,
        };
        if let Some(m) = metrics {
            m.count_status(self.status);
            m.duration.observe(total);
            m.overhead.observe(overhead);
            if self.endpoint.is_some() {
                m.upstream.observe(self.upstream_time);
            }
        }
        if let Some(log) = self.log {
            let service = self
                .cluster
                .as_ref()
                .map(|c| c.service.clone())
                .unwrap_or_else(|| Arc::from(""));
            let record = AccessRecord {
                start: log.wall_start,
                direction: self.direction,
                service,
                method: log.method,
                authority: log.authority,
                uri: log.uri,
                status: self.status,
                upstream: self.endpoint.as_ref().map(|e| e.endpoint().addr),
                error: self.error,
                bytes_received: match log.received {
                    Received::Known(n) => n,
                    Received::Counted(c) => c.load(Ordering::Relaxed),
                },
                bytes_sent,
                duration: total,
                upstream_time: self.upstream_time,
                overhead,
                attempts: self.attempts,
                request_id: log.request_id,
                client: log.client,
                caller: log.caller,
            };
            super::record::tap(&record, self.endpoint.as_ref().map(|e| &**e.endpoint()));
            log.sink.record(record);
        }
    }
}
