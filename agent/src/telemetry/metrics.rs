//! The agent's Prometheus metrics. Label sets are bounded (direction, service, env, class,
//! code); the request path holds pre-resolved handles and never touches a family's lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue, LabelValueEncoder};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::histogram::LatencyHistogram;
use super::host::HostMetric;

#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq)]
pub enum Direction {
    Inbound,
    Outbound,
}

impl EncodeLabelValue for Direction {
    fn encode(&self, encoder: &mut LabelValueEncoder<'_>) -> Result<(), std::fmt::Error> {
        use std::fmt::Write;
        encoder.write_str(self.as_str())
    }
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub direction: Direction,
    pub service: String,
    pub env: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabels {
    pub direction: Direction,
    pub service: String,
    pub env: String,
    pub class: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ErrorLabels {
    pub direction: Direction,
    pub service: String,
    pub code: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ClusterLabels {
    pub direction: Direction,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct EjectionLabels {
    pub direction: Direction,
    pub service: String,
    /// Which detector ejected: `consecutive_gateway`, `consecutive_5xx`, `success_rate`,
    /// `failure_percentage`.
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ShiftLabels {
    pub service: String,
    pub env: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabels {
    pub listener: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerReasonLabels {
    pub listener: String,
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    pub op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CodeLabels {
    pub code: &'static str,
}

/// Every metric family of the agent, registered once.
pub struct Metrics {
    registry: Registry,
    requests: Family<StatusLabels, Counter>,
    request_duration: Family<ServiceLabels, LatencyHistogram>,
    upstream_duration: Family<ServiceLabels, LatencyHistogram>,
    overhead: Family<ServiceLabels, LatencyHistogram>,
    proxy_errors: Family<ErrorLabels, Counter>,
    retries: Family<ClusterLabels, Counter>,
    retries_budget_exhausted: Family<ClusterLabels, Counter>,
    ejections: Family<EjectionLabels, Counter>,
    fallbacks: Family<ClusterLabels, Counter>,
    /// Circuit breaker state per service: 0 closed, 1 half-open, 2 open (set once a second).
    pub breaker_state: Family<ClusterLabels, Gauge>,
    /// The inbound adaptive concurrency limit now (set once a second).
    pub adaptive_limit: Family<ClusterLabels, Gauge>,
    pub connections_active: Family<ListenerLabels, Gauge>,
    /// Idle HTTP/1.1 client connections parked outside the runtime (`proxy.idle_park_after`).
    pub connections_parked: Gauge,
    pub connections: Family<ListenerLabels, Counter>,
    /// Downstream connections the agent closed to protect itself, by reason
    /// (`stream_idle_timeout`).
    pub downstream_closed: Family<ListenerReasonLabels, Counter>,
    /// Requests answered 503 `AGENT_OVERLOADED` at `proxy.max_requests_in_flight`.
    pub requests_shed: Counter,
    pub config_reloads: Family<ResultLabels, Counter>,
    /// Plaintext connections accepted by a `permissive` listener (callers not yet on mTLS).
    pub inbound_plaintext_connections: Family<ListenerLabels, Counter>,
    /// Connections a TLS listener closed without serving, by code (`TLS_PLAINTEXT_REFUSED`,
    /// `TLS_HANDSHAKE_FAILED`, `TLS_HANDSHAKE_TIMEOUT`, `TLS_NOT_CONFIGURED`).
    pub tls_refused: Family<CodeLabels, Counter>,
    /// Certificate reloads by result (`ok`, `failed`).
    pub tls_reloads: Family<ResultLabels, Counter>,
    pub access_log_dropped: Counter,
    /// Spans sent to the OTLP receiver (`[tracing]`).
    pub trace_spans_exported: Counter,
    /// Spans lost, by reason: `queue_full`, `export_failed`.
    trace_spans_dropped: Family<ReasonLabels, Counter>,
    /// Registry writes by operation (register, health, maintenance, deregister, anti-entropy).
    pub registry_writes: Family<OpLabels, Counter>,
    pub registry_errors: Family<CodeLabels, Counter>,
    pub cmdb_errors: Family<CodeLabels, Counter>,
    /// 1 while the identity in use came from the cache because the CMDB failed.
    pub identity_from_cache: Gauge,
    /// Weight advertised in the registry now (0: not registered).
    pub weight: Gauge,
    /// 1 while the instance is registered.
    pub registered: Gauge,
    /// Registry discovery updates applied, by service.
    pub discovery_updates: Family<ClusterLabels, Counter>,
    /// 1 while a service's endpoints are stale (a source failing, or the stored set in use).
    pub discovery_stale: Family<OutboundLabels, Gauge>,
    /// Percent of requests the shift policy in force sends to each environment.
    pub shift_weight: Family<ShiftLabels, Gauge>,
    /// Requests the shift sent to another environment because the chosen one had no usable
    /// endpoint.
    pub shift_fallbacks: Family<OutboundLabels, Counter>,
    /// 1 while a service's slow starts are suspended (more than half its endpoints ramping).
    pub ramp_suspended: Family<OutboundLabels, Gauge>,
    /// Every (upstream, overhead) histogram pair handed out, by labels: the host sampler sums
    /// them once a second for `/doctor` (a family cannot be iterated).
    timings: Mutex<HashMap<ServiceLabels, (LatencyHistogram, LatencyHistogram)>>,
}

/// Buckets of a latency histogram: `histogram::BUCKETS` and +Inf.
pub const TIMING_BUCKETS: usize = super::histogram::BUCKETS.len() + 1;

/// Bucket counts (not cumulative, +Inf last) of all upstream and all overhead histograms
/// summed, since the start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TimingTotals {
    pub upstream: [u64; TIMING_BUCKETS],
    pub overhead: [u64; TIMING_BUCKETS],
}

/// Handles for one (direction, service, env): what the request path updates.
#[derive(Clone, Debug, Default)]
pub struct RequestMetrics {
    /// Indexed by status class: 1xx..5xx at 0..=4.
    by_class: [Counter; 5],
    pub duration: LatencyHistogram,
    pub upstream: LatencyHistogram,
    pub overhead: LatencyHistogram,
}

/// Handles for one cluster (direction, service).
#[derive(Clone, Debug, Default)]
pub struct ClusterMetrics {
    pub retries: Counter,
    pub retries_budget_exhausted: Counter,
    /// Ejections by reason, resolved on first use (off the fast path).
    ejections: Option<(Family<EjectionLabels, Counter>, ClusterLabels)>,
    /// Answers given by a fallback instead of a proxy error.
    pub fallbacks: Counter,
    /// Proxy errors by code, resolved on first use (errors are off the fast path).
    errors: Option<(Family<ErrorLabels, Counter>, ClusterLabels)>,
    /// Metrics for requests that never reached an endpoint.
    pub no_endpoint: RequestMetrics,
}

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

// === impl Metrics ===

impl Metrics {
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("vmesh");
        let m = Self {
            requests: Family::default(),
            request_duration: Family::default(),
            upstream_duration: Family::default(),
            overhead: Family::default(),
            proxy_errors: Family::default(),
            retries: Family::default(),
            retries_budget_exhausted: Family::default(),
            ejections: Family::default(),
            fallbacks: Family::default(),
            breaker_state: Family::default(),
            adaptive_limit: Family::default(),
            connections_active: Family::default(),
            connections: Family::default(),
            config_reloads: Family::default(),
            inbound_plaintext_connections: Family::default(),
            downstream_closed: Family::default(),
            requests_shed: Counter::default(),
            tls_refused: Family::default(),
            tls_reloads: Family::default(),
            access_log_dropped: Counter::default(),
            trace_spans_exported: Counter::default(),
            trace_spans_dropped: Family::default(),
            registry_writes: Family::default(),
            registry_errors: Family::default(),
            cmdb_errors: Family::default(),
            identity_from_cache: Gauge::default(),
            connections_parked: Gauge::default(),
            weight: Gauge::default(),
            registered: Gauge::default(),
            discovery_updates: Family::default(),
            discovery_stale: Family::default(),
            shift_weight: Family::default(),
            shift_fallbacks: Family::default(),
            ramp_suspended: Family::default(),
            timings: Mutex::default(),
            registry: Registry::default(),
        };
        registry.register(
            "requests",
            "Requests proxied, by response status class",
            m.requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from request received to response body sent",
            m.request_duration.clone(),
        );
        registry.register(
            "upstream_duration_seconds",
            "Time the upstream took to answer with headers, all tries",
            m.upstream_duration.clone(),
        );
        registry.register(
            "proxy_overhead_seconds",
            "The proxy's own time: time to response headers minus upstream time",
            m.overhead.clone(),
        );
        registry.register(
            "proxy_errors",
            "Responses generated by the proxy, by x-vmesh-error code",
            m.proxy_errors.clone(),
        );
        registry.register("retries", "Retries sent", m.retries.clone());
        registry.register(
            "retries_budget_exhausted",
            "Retries not sent because the retry budget was spent",
            m.retries_budget_exhausted.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoints ejected by outlier detection, by detector",
            m.ejections.clone(),
        );
        registry.register(
            "fallbacks",
            "Requests answered by a configured fallback instead of a proxy error",
            m.fallbacks.clone(),
        );
        registry.register(
            "breaker_state",
            "Circuit breaker state per service: 0 closed, 1 half-open, 2 open",
            m.breaker_state.clone(),
        );
        registry.register(
            "adaptive_concurrency_limit",
            "The inbound adaptive concurrency limit in force",
            m.adaptive_limit.clone(),
        );
        registry.register(
            "downstream_connections_active",
            "Open downstream connections",
            m.connections_active.clone(),
        );
        registry.register(
            "downstream_connections_parked",
            "Idle HTTP/1.1 downstream connections parked outside the runtime until the client sends",
            m.connections_parked.clone(),
        );
        registry.register(
            "downstream_connections",
            "Downstream connections accepted",
            m.connections.clone(),
        );
        registry.register(
            "downstream_closed",
            "Downstream connections the agent closed to protect itself, by reason",
            m.downstream_closed.clone(),
        );
        registry.register(
            "requests_shed",
            "Requests answered 503 AGENT_OVERLOADED because proxy.max_requests_in_flight were in progress",
            m.requests_shed.clone(),
        );
        registry.register("config_reloads", "Config reloads by result", m.config_reloads.clone());
        registry.register(
            "inbound_plaintext_connections",
            "Plaintext connections accepted by a permissive (mTLS and plaintext) listener",
            m.inbound_plaintext_connections.clone(),
        );
        registry.register(
            "tls_connections_refused",
            "Connections a TLS listener closed without serving, by code",
            m.tls_refused.clone(),
        );
        registry.register("tls_reloads", "Certificate reloads by result", m.tls_reloads.clone());
        registry.register(
            "access_log_dropped",
            "Access-log lines dropped: more waiting for the writer than its bound, or a failed write",
            m.access_log_dropped.clone(),
        );
        registry.register(
            "trace_spans_exported",
            "Spans accepted by the OTLP receiver",
            m.trace_spans_exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans lost, by reason: queue_full (more waiting than tracing.queue_size) or export_failed",
            m.trace_spans_dropped.clone(),
        );
        registry.register(
            "registry_writes",
            "Writes to the service registry, by operation",
            m.registry_writes.clone(),
        );
        registry.register(
            "registry_errors",
            "Failed registry calls, by error code",
            m.registry_errors.clone(),
        );
        registry.register("cmdb_errors", "Failed CMDB reads, by error code", m.cmdb_errors.clone());
        registry.register(
            "identity_from_cache",
            "1 while the service identity comes from the local cache because the CMDB failed",
            m.identity_from_cache.clone(),
        );
        registry.register(
            "registered_weight",
            "Weight advertised in the registry (0: not registered)",
            m.weight.clone(),
        );
        registry.register("registered", "1 while the instance is registered", m.registered.clone());
        registry.register(
            "discovery_updates",
            "Endpoint-set updates from the registry",
            m.discovery_updates.clone(),
        );
        registry.register(
            "discovery_stale",
            "1 while a service's endpoints are stale (a source failing, or the stored set in use)",
            m.discovery_stale.clone(),
        );
        registry.register(
            "shift_weight",
            "Percent of requests the shift policy in force sends to each environment",
            m.shift_weight.clone(),
        );
        registry.register(
            "shift_fallbacks",
            "Requests sent to another environment because the chosen one had no usable endpoint",
            m.shift_fallbacks.clone(),
        );
        registry.register(
            "ramp_suspended",
            "1 while slow starts are suspended because more than half of the service ramps",
            m.ramp_suspended.clone(),
        );
        registry.register(
            "host_cpu_pressure_ratio",
            "Share of the last 10 s in which a runnable task waited for a CPU (PSI cpu some avg10), for the host or the agent's cgroup",
            HostMetric::CpuPressure,
        );
        registry.register(
            "host_cpu_steal_ratio",
            "Share of CPU time stolen by the hypervisor over the last second",
            HostMetric::CpuSteal,
        );
        registry.register("host_run_queue", "Tasks running or runnable now", HostMetric::RunQueue);
        registry.register(
            "agent_cpu_ratio",
            "The agent's own CPU time over the last second, as a share of all CPUs",
            HostMetric::AgentCpu,
        );
        Arc::new(Self { registry, ..m })
    }

    /// Handles for requests of one (direction, service, env).
    pub fn request(&self, direction: Direction, service: &str, env: &str) -> RequestMetrics {
        let labels = ServiceLabels {
            direction,
            service: service.to_owned(),
            env: env.to_owned(),
        };
        let by_class = CLASSES.map(|class| {
            self.requests
                .get_or_create(&StatusLabels {
                    direction,
                    service: service.to_owned(),
                    env: env.to_owned(),
                    class,
                })
                .clone()
        });
        let upstream = self.upstream_duration.get_or_create(&labels).clone();
        let overhead = self.overhead.get_or_create(&labels).clone();
        self.timings
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(labels.clone())
            .or_insert_with(|| (upstream.clone(), overhead.clone()));
        RequestMetrics {
            by_class,
            duration: self.request_duration.get_or_create(&labels).clone(),
            upstream,
            overhead,
        }
    }

    /// The bucket counts of every upstream and every overhead histogram, summed.
    pub fn timing_totals(&self) -> TimingTotals {
        let mut t = TimingTotals::default();
        let timings = self.timings.lock().unwrap_or_else(PoisonError::into_inner);
        for (upstream, overhead) in timings.values() {
            for (sum, h) in [(&mut t.upstream, upstream), (&mut t.overhead, overhead)] {
                for (i, (_, n)) in h.snapshot().2.into_iter().enumerate().take(TIMING_BUCKETS) {
                    sum[i] += n;
                }
            }
        }
        t
    }

    pub fn cluster(&self, direction: Direction, service: &str) -> ClusterMetrics {
        let labels = ClusterLabels {
            direction,
            service: service.to_owned(),
        };
        ClusterMetrics {
            retries: self.retries.get_or_create(&labels).clone(),
            retries_budget_exhausted: self.retries_budget_exhausted.get_or_create(&labels).clone(),
            ejections: Some((self.ejections.clone(), labels.clone())),
            fallbacks: self.fallbacks.get_or_create(&labels).clone(),
            errors: Some((self.proxy_errors.clone(), labels)),
            no_endpoint: self.request(direction, service, "none"),
        }
    }

    /// The counter of spans dropped for `reason` (resolved once, by the tracer's start).
    pub fn trace_spans_dropped(&self, reason: &'static str) -> Counter {
        self.trace_spans_dropped.get_or_create(&ReasonLabels { reason }).clone()
    }

    /// Counts a downstream connection closed for `reason` (rare: resolved when it happens).
    pub fn downstream_closed(&self, listener: &str, reason: &'static str) {
        self.downstream_closed
            .get_or_create(&ListenerReasonLabels {
                listener: listener.to_owned(),
                reason,
            })
            .inc();
    }

    pub fn listener(&self, name: &str) -> (Gauge, Counter) {
        let labels = ListenerLabels {
            listener: name.to_owned(),
        };
        (
            self.connections_active.get_or_create(&labels).clone(),
            self.connections.get_or_create(&labels).clone(),
        )
    }

    /// The OpenMetrics text exposition.
    pub fn encode_openmetrics(&self) -> String {
        let mut out = String::with_capacity(16 * 1024);
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// The Prometheus text exposition (format 0.0.4), which every scraper and `promtool`
    /// read: counters are described under their `_total` sample name, and no `# EOF`.
    pub fn encode_prometheus(&self) -> String {
        to_prometheus_text(&self.encode_openmetrics())
    }
}

/// Rewrites OpenMetrics text as Prometheus text format 0.0.4.
fn to_prometheus_text(om: &str) -> String {
    let counters: std::collections::HashSet<&str> = om
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(om.len() + 64);
    for line in om.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let meta = line
            .strip_prefix("# HELP ")
            .map(|r| ("# HELP ", r))
            .or_else(|| line.strip_prefix("# TYPE ").map(|r| ("# TYPE ", r)));
        match meta {
            Some((kind, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                out.push_str(kind);
                out.push_str(name);
                if counters.contains(name) {
                    out.push_str("_total");
                }
                out.push(' ');
                out.push_str(tail);
            }
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

// === impl RequestMetrics ===

impl RequestMetrics {
    /// Handles not registered anywhere (unit tests).
    /// Requests counted so far, every status class.
    pub fn total(&self) -> u64 {
        self.by_class.iter().map(Counter::get).sum()
    }

    pub fn detached() -> Self {
        Self::default()
    }

    pub fn count_status(&self, status: u16) {
        let i = usize::from(status / 100).clamp(1, 5) - 1;
        self.by_class[i].inc();
    }
}

// === impl ClusterMetrics ===

impl ClusterMetrics {
    /// Counts an ejection by outlier detection (`reason`: the detector).
    pub fn ejected(&self, reason: &'static str) {
        if let Some((family, labels)) = &self.ejections {
            family
                .get_or_create(&EjectionLabels {
                    direction: labels.direction,
                    service: labels.service.clone(),
                    reason,
                })
                .inc();
        }
    }

    pub fn proxy_error(&self, code: &'static str) {
        if let Some((family, labels)) = &self.errors {
            family
                .get_or_create(&ErrorLabels {
                    direction: labels.direction,
                    service: labels.service.clone(),
                    code,
                })
                .inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prometheus_text_names_counters_by_their_samples() {
        let m = Metrics::new();
        let r = m.request(Direction::Outbound, "orders", "vm");
        r.count_status(200);
        r.overhead.observe(std::time::Duration::from_micros(30));
        let text = m.encode_prometheus();
        assert!(text.contains("# TYPE vmesh_requests_total counter\n"), "{text}");
        assert!(text.contains("# HELP vmesh_requests_total "), "{text}");
        assert!(
            text.contains("vmesh_requests_total{direction=\"outbound\",service=\"orders\",env=\"vm\",class=\"2xx\"} 1")
        );
        assert!(text.contains("# TYPE vmesh_proxy_overhead_seconds histogram"));
        assert!(!text.contains("# EOF"));
    }
}
