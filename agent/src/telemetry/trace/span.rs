//! One proxied request's span: opened by the prepare stage when the request is sampled, given
//! its route, colour and first send by the forward stages, and ended by the request's
//! completion with the clock readings the access log and the latency metrics use, then handed
//! to the exporter's queue.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::HeaderValue;
use http::uri::PathAndQuery;
use http::Method;

use super::context::Context;
use super::Tracer;
use crate::telemetry::metrics::Direction;

/// A sampled request's span while the request runs.
pub struct Span {
    pub(super) ctx: Context,
    /// The caller's span (absent: this span starts the trace).
    pub(super) parent_span_id: Option<[u8; 8]>,
    pub(super) trace_state: Option<HeaderValue>,
    pub(super) direction: Direction,
    pub(super) start: Instant,
    /// `start` on the wall clock.
    pub(super) wall_start: SystemTime,
    pub(super) method: Method,
    pub(super) path: PathAndQuery,
    /// The `[[route]]` rule that matched.
    pub route: Option<Arc<str>>,
    /// The request's colour header, where it has one.
    pub colour: Option<HeaderValue>,
    /// When the first try went upstream.
    first_sent: Option<Instant>,
    pub(super) ended: Ended,
    tracer: &'static Tracer,
}

/// What the completion knows when the response ends.
#[derive(Debug, Default)]
pub struct Ended {
    /// The service of the cluster that served (after routing).
    pub service: Option<Arc<str>>,
    pub status: u16,
    /// The `x-vmesh-error` code, when vmesh answered or a fallback replaced its answer.
    pub error: Option<&'static str>,
    /// The endpoint that answered, and its environment.
    pub upstream: Option<(SocketAddr, &'static str)>,
    pub attempts: u32,
    /// From the request's arrival to the end of the response body: the span's duration.
    pub total: Duration,
    /// From the arrival to the response headers going out.
    pub headers_time: Duration,
    /// Every try's time from sending to the response headers (connection set-up included).
    pub upstream_time: Duration,
}

/// Where a span's time went; the parts sum to its duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Split {
    /// Arrival to the first try: prepare, colour, route, fault delay, admission, buffering a
    /// replayable body (the whole answer time when no try was made).
    pub admission: Duration,
    /// The tries, sent to response headers, connection set-up included.
    pub upstream: Duration,
    /// vmesh's own time after the first try was sent: between retries and shaping the answer.
    pub overhead: Duration,
    /// Response headers out to the body's end (streaming the body to the client).
    pub response_body: Duration,
}

// === impl Span ===

impl Span {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        tracer: &'static Tracer,
        ctx: Context,
        parent_span_id: Option<[u8; 8]>,
        trace_state: Option<HeaderValue>,
        direction: Direction,
        start: Instant,
        method: Method,
        path: PathAndQuery,
    ) -> Self {
        let (now, wall) = (Instant::now(), SystemTime::now());
        Self {
            ctx,
            parent_span_id,
            trace_state,
            direction,
            start,
            wall_start: wall.checked_sub(now.saturating_duration_since(start)).unwrap_or(wall),
            method,
            path,
            route: None,
            colour: None,
            first_sent: None,
            ended: Ended::default(),
            tracer,
        }
    }

    /// Notes a try sent at `at` (only the first counts).
    pub fn sent(&mut self, at: Instant) {
        self.first_sent.get_or_insert(at);
    }

    /// Ends the span and queues it for export; never waits (a full queue drops it, counted).
    pub fn end(mut self: Box<Self>, ended: Ended) {
        self.ended = ended;
        let tracer = self.tracer;
        tracer.queue.push(self);
    }

    /// This hop's trace ID and span ID.
    pub fn context(&self) -> Context {
        self.ctx
    }

    /// The split of the span's duration.
    pub fn split(&self) -> Split {
        let e = &self.ended;
        let headers = e.headers_time.min(e.total);
        let admission = self
            .first_sent
            .map_or(headers, |t| t.saturating_duration_since(self.start))
            .min(headers);
        let upstream = e.upstream_time.min(headers - admission);
        Split {
            admission,
            upstream,
            overhead: headers - admission - upstream,
            response_body: e.total - headers,
        }
    }

    /// When the first try was sent, from the span's start.
    pub(super) fn first_sent_offset(&self) -> Option<Duration> {
        self.first_sent.map(|t| t.saturating_duration_since(self.start))
    }
}
