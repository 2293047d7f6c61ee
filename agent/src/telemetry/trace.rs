//! Distributed tracing (docs/tracing.md): a span per proxied request, W3C and B3 context in,
//! W3C (and B3 where it came in) out, ratio and parent-based sampling, OTLP/HTTP export in
//! batches from a bounded queue.
//!
//! The request path reaches the tracer through [`tracer`], a `OnceLock` set once at start-up:
//! with `[tracing]` off it is one load and one branch, nothing is allocated and every trace
//! header passes through untouched. With tracing on, every request gets a span ID and a
//! `traceparent` for the next hop (about 1,100 instructions with the export of 1 % of them,
//! docs/tracing.md#cost); only a sampled request allocates its [`Span`], which the completion
//! ends and queues.

mod config;
mod context;
mod export;
mod otlp;
mod span;
#[cfg(test)]
mod tests;

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use http::header::HeaderMap;
use http::uri::PathAndQuery;
use http::Method;

pub use config::{Sampler, TracingConfig};
pub use context::{Context, TRACEPARENT, TRACESTATE};
pub use span::{Ended, Span, Split};

use super::metrics::{Direction, Metrics};

/// The process's tracer, set by [`start`] when `[tracing]` is enabled.
static TRACER: OnceLock<Tracer> = OnceLock::new();

/// Samples requests, writes their context for the next hop, and queues their spans.
pub struct Tracer {
    sampler: Sampler,
    /// `sample_ratio` as a threshold on the trace ID.
    threshold: u64,
    queue: export::Queue,
}

/// The local service's name for the exported resource (the identity's, once known).
pub type ServiceFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Why the tracer could not start.
#[derive(Debug, thiserror::Error)]
#[error("TRACE_EXPORTER: cannot build the OTLP HTTP client: {0}")]
pub struct StartError(reqwest::Error);

/// The tracer, when tracing is on.
#[inline]
pub fn tracer() -> Option<&'static Tracer> {
    TRACER.get()
}

/// Starts the tracer and its exporter task on the current tokio runtime when `cfg.enabled`;
/// the first call of a process wins (tracing settings change on restart only).
pub fn start(cfg: &TracingConfig, node: &str, metrics: &Metrics, service: ServiceFn) -> Result<(), StartError> {
    if !cfg.enabled || TRACER.get().is_some() {
        return Ok(());
    }
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(2)
        .build()
        .map_err(StartError)?;
    let (queue, rx, full) = export::Queue::new(
        cfg.queue_size,
        cfg.batch_size,
        metrics.trace_spans_dropped("queue_full"),
    );
    let resource = resource_fn(cfg.service_name.clone(), node.to_owned(), service);
    let exporter = export::Exporter {
        rx,
        full,
        client,
        url: format!("{}/v1/traces", cfg.endpoint.trim_end_matches('/')),
        batch_size: cfg.batch_size,
        batch_interval: cfg.batch_interval.get(),
        export_timeout: cfg.export_timeout.get(),
        resource,
        exported: metrics.trace_spans_exported.clone(),
        dropped_failed: metrics.trace_spans_dropped("export_failed"),
    };
    if TRACER.set(Tracer::new(cfg.sampler, cfg.sample_ratio, queue)).is_ok() {
        tokio::spawn(exporter.run());
        tracing::info!(endpoint = %cfg.endpoint, sample_ratio = cfg.sample_ratio, sampler = ?cfg.sampler, "tracing on");
    }
    Ok(())
}

fn resource_fn(
    name: Option<String>,
    node: String,
    service: ServiceFn,
) -> Arc<dyn Fn() -> Vec<otlp::KeyValue> + Send + Sync> {
    Arc::new(move || {
        let service_name = name.clone().or_else(|| service()).unwrap_or_else(|| "vmesh".to_owned());
        vec![
            otlp::string("service.name", service_name),
            otlp::string("host.name", node.as_str()),
            otlp::string("telemetry.sdk.name", "vmesh"),
        ]
    })
}

// === impl Tracer ===

impl Tracer {
    /// A tracer whose spans go to `queue` (the exporter's, or a test's).
    fn new(sampler: Sampler, ratio: f64, queue: export::Queue) -> Self {
        Self {
            sampler,
            threshold: context::ratio_threshold(ratio),
            queue,
        }
    }

    /// Continues the caller's trace (or starts one) for a request arriving at `start`: writes
    /// this hop's `traceparent` into `headers` for the next hop, and returns the span to fill
    /// when the request is sampled.
    ///
    /// One walk over the header names first: a request with no trace header (the first hop)
    /// then costs one hashed insert, one with W3C headers only a look-up and an insert.
    pub fn begin(
        &'static self,
        headers: &mut HeaderMap,
        direction: Direction,
        start: Instant,
        method: &Method,
        path: &PathAndQuery,
    ) -> Option<Box<Span>> {
        let present = context::present(headers);
        if present.b3 {
            return self.begin_b3(headers, direction, start, method, path);
        }
        let parent = match present.traceparent {
            true => headers
                .get(&TRACEPARENT)
                .and_then(|v| context::parse_traceparent(v.as_bytes())),
            false => None,
        };
        let ctx = self.decide(parent.as_ref());
        headers.insert(TRACEPARENT, context::traceparent(&ctx));
        let trace_state = match (present.tracestate, parent) {
            (true, Some(_)) if ctx.sampled => headers.get(&TRACESTATE).cloned(),
            // A malformed traceparent starts a new trace: a vendor's state of no trace goes.
            (true, None) if present.traceparent => {
                headers.remove(&TRACESTATE);
                None
            }
            _ => None,
        };
        self.span(ctx, parent, trace_state, direction, start, method, path)
    }

    /// [`Tracer::begin`] for a request with B3 headers (or several `traceparent`s): the
    /// look-ups of [`context::extract`], and [`context::inject`] rewriting the B3 headers too.
    fn begin_b3(
        &'static self,
        headers: &mut HeaderMap,
        direction: Direction,
        start: Instant,
        method: &Method,
        path: &PathAndQuery,
    ) -> Option<Box<Span>> {
        let parent = context::extract(headers);
        let ctx = self.decide(parent.as_ref());
        context::inject(headers, &ctx, parent.as_ref());
        let trace_state = parent
            .filter(|p| ctx.sampled && p.format == context::Format::W3c)
            .and_then(|_| headers.get(&TRACESTATE).cloned());
        self.span(ctx, parent, trace_state, direction, start, method, path)
    }

    /// This hop's context: the caller's trace (or a new one), a new span ID, and the sampling
    /// decision (the caller's under `parent_based`, else the ratio's on the trace ID).
    fn decide(&self, parent: Option<&context::Parent>) -> Context {
        let trace_id = parent.map_or_else(context::new_trace_id, |p| p.trace_id);
        let sampled = match (self.sampler, parent.and_then(|p| p.sampled)) {
            (Sampler::ParentBased, Some(decided)) => decided,
            _ => context::ratio_sampled(&trace_id, self.threshold),
        };
        Context {
            trace_id,
            span_id: context::new_span_id(),
            sampled,
        }
    }

    /// The span of a sampled request (allocated only then).
    #[allow(clippy::too_many_arguments)]
    fn span(
        &'static self,
        ctx: Context,
        parent: Option<context::Parent>,
        trace_state: Option<http::HeaderValue>,
        direction: Direction,
        start: Instant,
        method: &Method,
        path: &PathAndQuery,
    ) -> Option<Box<Span>> {
        if !ctx.sampled {
            return None;
        }
        Some(Box::new(Span::new(
            self,
            ctx,
            parent.map(|p| p.span_id),
            trace_state,
            direction,
            start,
            method.clone(),
            path.clone(),
        )))
    }
}
