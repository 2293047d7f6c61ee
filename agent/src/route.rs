//! The route table: which cluster serves a listener or a `Host`, built from config and swapped
//! whole on reload. Clusters keep their endpoints' statistics and connection pools across a
//! reload when the endpoint or the pool settings did not change.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use http::HeaderName;
use rustc_hash::FxHashMap;

use crate::balance::{Endpoint, EndpointSet, Env, Labels, Source};
use crate::config::{
    BalancerKind, ColourConfig, Config, EndpointConfig, InboundConfig, OutboundConfig, Protocol, RetryConfig,
};
use crate::governance::colour::{Colouring, Propagation};
use crate::governance::routing::{Route, RouteRules};
use crate::governance::{Fallback, RateLimit};
use crate::resilience::adaptive::AdaptiveLimiter;
use crate::resilience::breaker::Breaker;
use crate::resilience::cpu::CpuGauge;
use crate::resilience::{Outlier, RetryBudget, RetryPolicy};
use crate::telemetry::metrics::{ClusterMetrics, Direction, Metrics};
use crate::upstream::client::{self, UpstreamClient};

/// A named group of endpoints and the policy for sending to them.
pub struct Cluster {
    pub service: Arc<str>,
    pub direction: Direction,
    pub protocol: Protocol,
    pub balancer: BalancerKind,
    pub hash_header: Option<HeaderName>,
    /// Swapped whole when endpoints change; the request path loads a snapshot.
    pub endpoints: ArcSwap<EndpointSet>,
    pub timeout: Duration,
    pub per_try_timeout: Option<Duration>,
    pub connect_timeout: Duration,
    pub retry: RetryPolicy,
    pub budget: Arc<RetryBudget>,
    pub outlier: Outlier,
    pub client: UpstreamClient,
    pub metrics: ClusterMetrics,
    /// Request bodies up to this size are buffered for retries.
    pub retry_buffer: u64,
    /// Route rules for requests addressed to this cluster (outbound), in order.
    pub routes: Arc<[Arc<Route>]>,
    pub breaker: Option<Arc<Breaker>>,
    pub fallback: Option<Arc<Fallback>>,
    pub rate_limit: Option<Arc<RateLimit>>,
    /// The adaptive concurrency limit (inbound).
    pub adaptive: Option<Arc<AdaptiveLimiter>>,
    /// Outbound `mode = "strict"`: connections are mutual TLS and the endpoints' certificates
    /// must name this service (the `Arc` the connectors check against).
    pub mtls: Option<Arc<str>>,
    /// Inbound authorization rules (`[[inbound.authz]]`); `None`: every caller allowed.
    pub authz: Option<Arc<crate::governance::authz::Authz>>,
    /// The settings the governance parts were built from.
    pub policy: ClusterPolicy,
    /// When outlier detection last ran its statistical sweep.
    last_sweep: std::sync::Mutex<Instant>,
}

/// Every cluster of one config generation, and the rules that steer requests among them.
#[derive(Default)]
pub struct RouteTable {
    pub inbound: Option<Arc<Cluster>>,
    /// Outbound clusters by service name, looked up once per request (FxHash: names from the
    /// config; a client's `Host` on the shared port only looks up, it cannot grow a chain).
    pub services: FxHashMap<Box<str>, Arc<Cluster>>,
    /// `[[route]]` rules, compiled.
    pub rules: RouteRules,
    /// `[colour]`, compiled.
    pub colouring: Option<Arc<Colouring>>,
    /// Headers carried from inbound requests to the app's outbound calls (with `[colour]`).
    pub propagation: Option<Arc<Propagation>>,
    /// The config the colouring was built from (a reload keeps the propagation map when equal).
    colour_config: Option<ColourConfig>,
}

// === impl RouteTable ===

impl RouteTable {
    /// Builds the table for `config`, reusing what `previous` already has.
    pub fn build(config: &Config, previous: Option<&RouteTable>, metrics: &Metrics) -> Self {
        let retry_buffer = config.proxy.retry_buffer_bytes.0;
        let rules = RouteRules::compile(&config.route, previous.map(|p| &p.rules));
        let inbound = config.inbound.as_ref().map(|inb| {
            let prev = previous.and_then(|p| p.inbound.as_deref());
            Arc::new(Cluster::inbound(inb, prev, metrics, retry_buffer))
        });
        let services = config
            .outbound
            .iter()
            .map(|out| {
                let prev = previous
                    .and_then(|p| p.services.get(out.service.as_str()))
                    .map(|c| &**c);
                let routes = rules.for_service(&out.service);
                (
                    Box::from(out.service.as_str()),
                    Arc::new(Cluster::outbound(out, routes, prev, metrics, retry_buffer)),
                )
            })
            .collect();
        let colouring = config.colour.as_ref().map(|c| Arc::new(Colouring::new(c)));
        let propagation = config.colour.as_ref().zip(colouring.as_ref()).map(|(c, compiled)| {
            let kept = previous
                .filter(|p| p.colour_config.as_ref() == Some(c))
                .and_then(|p| p.propagation.clone());
            kept.unwrap_or_else(|| {
                Arc::new(Propagation::new(
                    compiled.propagate.clone(),
                    c.propagate_ttl.get(),
                    c.propagate_max,
                ))
            })
        });
        Self {
            inbound,
            services,
            rules,
            colouring,
            propagation,
            colour_config: config.colour.clone(),
        }
    }

    pub fn by_host(&self, host: &str) -> Option<&Arc<Cluster>> {
        self.services.get(host)
    }
}

// === impl Cluster ===

struct Spec<'a> {
    service: &'a str,
    direction: Direction,
    protocol: Protocol,
    balancer: BalancerKind,
    hash_header: Option<&'a str>,
    timeout: Duration,
    per_try_timeout: Option<Duration>,
    connect_timeout: Duration,
    retry: &'a RetryConfig,
    endpoints: Vec<(std::net::SocketAddr, u32, Labels)>,
    routes: Arc<[Arc<Route>]>,
    policy: ClusterPolicy,
    mtls: bool,
    authz: Option<crate::governance::authz::Authz>,
}

/// The governance settings of one cluster, kept to tell whether a reload changed them (an
/// unchanged breaker or limiter keeps its state across the reload).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ClusterPolicy {
    pub outlier: crate::config::OutlierConfig,
    pub breaker: Option<crate::config::BreakerConfig>,
    pub fallback: Option<crate::config::FallbackConfig>,
    pub rate_limit: Option<crate::config::RateLimitConfig>,
    pub adaptive: Option<crate::config::AdaptiveConfig>,
}

/// Host CPU use, sampled by one task for the whole process (adaptive limits read it).
fn cpu_gauge() -> CpuGauge {
    static CPU: std::sync::OnceLock<CpuGauge> = std::sync::OnceLock::new();
    if tokio::runtime::Handle::try_current().is_err() {
        // No runtime (unit tests building tables): a gauge that reads 0.
        return CPU.get().cloned().unwrap_or_default();
    }
    CPU.get_or_init(|| CpuGauge::spawn_sampler(Duration::from_millis(250)))
        .clone()
}

impl Cluster {
    fn inbound(c: &InboundConfig, prev: Option<&Cluster>, metrics: &Metrics, retry_buffer: u64) -> Self {
        // Inbound forwards to one local application; retries only cover connect failures
        // (the app restarting), never a second delivery.
        let retry = RetryConfig {
            attempts: 2,
            on_503: false,
            on_reset: false,
            ..RetryConfig::default()
        };
        Self::build(
            Spec {
                service: "inbound",
                direction: Direction::Inbound,
                protocol: c.protocol,
                balancer: BalancerKind::RoundRobin,
                hash_header: None,
                timeout: c.timeout.get(),
                per_try_timeout: None,
                connect_timeout: c.connect_timeout.get(),
                retry: &retry,
                endpoints: vec![(c.app, 100, Labels::env(Env::Vm))],
                routes: Arc::from(Vec::new()),
                policy: ClusterPolicy {
                    rate_limit: c.rate_limit.clone(),
                    adaptive: c.adaptive.clone(),
                    ..ClusterPolicy::default()
                },
                // The inbound side of TLS is the listener's (proxy/listener.rs); the app is local.
                mtls: false,
                authz: crate::governance::authz::Authz::compile(&c.authz),
            },
            prev,
            metrics,
            retry_buffer,
        )
    }

    fn outbound(
        c: &OutboundConfig,
        routes: Arc<[Arc<Route>]>,
        prev: Option<&Cluster>,
        metrics: &Metrics,
        retry_buffer: u64,
    ) -> Self {
        Self::build(
            Spec {
                service: &c.service,
                direction: Direction::Outbound,
                protocol: c.protocol,
                balancer: c.balancer,
                hash_header: c.hash_header.as_deref(),
                timeout: c.timeout.get(),
                per_try_timeout: c.per_try_timeout.map(|d| d.get()),
                connect_timeout: c.connect_timeout.get(),
                retry: &c.retry,
                endpoints: c
                    .endpoints
                    .iter()
                    .map(|e: &EndpointConfig| {
                        let (zone, version, colour) = e.labels();
                        let labels = Labels {
                            env: Env::parse(e.env()),
                            zone: zone.into(),
                            version: version.into(),
                            colour: colour.into(),
                            source: Source::Static,
                        };
                        (e.address(), e.weight(), labels)
                    })
                    .collect(),
                routes,
                policy: ClusterPolicy {
                    outlier: c.outlier.clone(),
                    breaker: c.breaker.clone(),
                    fallback: c.fallback.clone(),
                    rate_limit: c.rate_limit.clone(),
                    adaptive: None,
                },
                mtls: c.mode == crate::config::TlsMode::Strict,
                authz: None,
            },
            prev,
            metrics,
            retry_buffer,
        )
    }

    fn build(spec: Spec<'_>, prev: Option<&Cluster>, metrics: &Metrics, retry_buffer: u64) -> Self {
        let old = prev.map(|p| p.endpoints.load_full());
        // An outbound cluster's endpoints are written by its discovery task (static ones
        // included); a reload keeps the set in force until the task installs the new one. A
        // new cluster starts from its static endpoints, so it serves before the task runs.
        let endpoints = match old {
            Some(set) if spec.direction == Direction::Outbound => set.endpoints().to_vec(),
            _ => spec
                .endpoints
                .into_iter()
                .map(|(addr, weight, labels)| {
                    let reused = old.as_ref().and_then(|set| {
                        set.endpoints()
                            .iter()
                            .find(|e| e.addr == addr && e.weight == weight && *e.labels == labels)
                            .cloned()
                    });
                    reused.unwrap_or_else(|| {
                        let m = metrics.request(spec.direction, spec.service, labels.env.as_str());
                        Arc::new(Endpoint::new(addr, weight, Arc::new(labels), m))
                    })
                })
                .collect(),
        };
        if endpoints.is_empty() && spec.direction == Direction::Outbound {
            tracing::warn!(
                service = spec.service,
                "no endpoints yet: requests get 503 NO_HEALTHY_ENDPOINT until some are discovered"
            );
        }
        let mtls: Option<Arc<str>> = spec.mtls.then(|| spec.service.into());
        let client = match prev {
            Some(p)
                if p.protocol == spec.protocol
                    && p.connect_timeout == spec.connect_timeout
                    && p.mtls.is_some() == spec.mtls =>
            {
                p.client.clone()
            }
            _ => client::build(spec.protocol, spec.connect_timeout, mtls.clone()),
        };
        Self {
            service: spec.service.into(),
            direction: spec.direction,
            protocol: spec.protocol,
            balancer: spec.balancer,
            hash_header: spec.hash_header.and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            endpoints: match (prev, spec.direction) {
                // Same balancer: the set in force stays as it is (with its shift subsets) until
                // the discovery task installs the next one.
                (Some(p), Direction::Outbound) if p.balancer == spec.balancer => ArcSwap::new(p.endpoints.load_full()),
                _ => {
                    let set = EndpointSet::new(spec.balancer, endpoints);
                    set.set_panic_threshold(spec.policy.outlier.panic_threshold_percent);
                    ArcSwap::from_pointee(set)
                }
            },
            timeout: spec.timeout,
            per_try_timeout: spec.per_try_timeout,
            connect_timeout: spec.connect_timeout,
            retry: RetryPolicy::from_config(spec.retry),
            budget: RetryBudget::new(spec.retry.budget_ratio, spec.retry.budget_min_concurrency),
            outlier: Outlier::from_config(&spec.policy.outlier),
            client,
            metrics: metrics.cluster(spec.direction, spec.service),
            retry_buffer,
            routes: spec.routes,
            // An unchanged section keeps its live state (breaker window, limiter samples).
            breaker: spec.policy.breaker.as_ref().map(|b| {
                prev.filter(|p| p.policy.breaker.as_ref() == Some(b))
                    .and_then(|p| p.breaker.clone())
                    .unwrap_or_else(|| Breaker::new(b))
            }),
            fallback: spec.policy.fallback.as_ref().map(|f| Arc::new(Fallback::new(f))),
            rate_limit: spec
                .policy
                .rate_limit
                .as_ref()
                .map(|rl| RateLimit::reuse(rl, prev.and_then(|p| p.rate_limit.as_ref()))),
            adaptive: spec.policy.adaptive.as_ref().map(|a| {
                prev.filter(|p| p.policy.adaptive.as_ref() == Some(a))
                    .and_then(|p| p.adaptive.clone())
                    .unwrap_or_else(|| AdaptiveLimiter::new(a, cpu_gauge(), Instant::now()))
            }),
            policy: spec.policy,
            mtls,
            authz: spec.authz.map(Arc::new),
            last_sweep: std::sync::Mutex::new(Instant::now()),
        }
    }

    /// Runs outlier detection's sweep (statistical modes, forgiveness) when its interval has
    /// passed; returns the ejections it made.
    pub fn sweep_outliers(&self, now: Instant) -> usize {
        // Every interval, even without a statistical mode: the sweep also forgives ejections.
        {
            let mut last = self.last_sweep.lock().unwrap_or_else(|p| p.into_inner());
            if now.duration_since(*last) < self.outlier.interval() {
                return 0;
            }
            *last = now;
        }
        let set = self.endpoints.load();
        // A threshold changed by a reload reaches the set in force here (new sets get it when
        // they are built).
        set.set_panic_threshold(self.outlier.panic_threshold_percent());
        let ejected = self.outlier.sweep(&set, now);
        for (i, ej) in &ejected {
            self.metrics.ejected(ej.reason.as_str());
            if let Some(ep) = set.endpoints().get(*i) {
                tracing::warn!(service = %self.service, endpoint = %ep.addr, reason = %ej.reason.as_str(), ejected_for = ?ej.duration, "outlier ejected");
            }
        }
        ejected.len()
    }

    /// Sets the cluster's breaker-state and adaptive-limit gauges from their live state.
    pub fn publish_gauges(&self, metrics: &Metrics, now: Instant) {
        let labels = crate::telemetry::metrics::ClusterLabels {
            direction: self.direction,
            service: self.service.to_string(),
        };
        if let Some(b) = &self.breaker {
            let v = match b.state(now) {
                crate::resilience::breaker::BreakerState::Closed => 0,
                crate::resilience::breaker::BreakerState::HalfOpen => 1,
                crate::resilience::breaker::BreakerState::Open => 2,
            };
            metrics.breaker_state.get_or_create(&labels).set(v);
        }
        if let Some(a) = &self.adaptive {
            metrics.adaptive_limit.get_or_create(&labels).set(i64::from(a.limit()));
        }
    }

    pub fn is_grpc(&self) -> bool {
        self.protocol == Protocol::Grpc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = r#"
[inbound]
listen = "127.0.0.1:7000"
app = "127.0.0.1:7001"
[inbound.adaptive]
min_limit = 2
[inbound.rate_limit]
rate = "10/s"

[[outbound]]
service = "orders"
endpoints = ["127.0.0.1:9"]
[outbound.breaker]
error_rate_percent = 50
[outbound.rate_limit]
rate = "5/s"

[colour]
propagate = ["x-tenant"]
"#;

    fn table(text: &str, previous: Option<&RouteTable>) -> RouteTable {
        let config = crate::config::load_str(text).unwrap();
        RouteTable::build(&config, previous, &Metrics::new())
    }

    #[test]
    fn unchanged_governance_state_survives_a_reload_and_changed_state_is_rebuilt() {
        let a = table(BASE, None);
        let b = table(BASE, Some(&a));
        let (ao, bo) = (&a.services["orders"], &b.services["orders"]);
        assert!(Arc::ptr_eq(ao.breaker.as_ref().unwrap(), bo.breaker.as_ref().unwrap()));
        assert!(Arc::ptr_eq(
            ao.rate_limit.as_ref().unwrap(),
            bo.rate_limit.as_ref().unwrap()
        ));
        let (ai, bi) = (a.inbound.as_ref().unwrap(), b.inbound.as_ref().unwrap());
        assert!(Arc::ptr_eq(
            ai.adaptive.as_ref().unwrap(),
            bi.adaptive.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(
            ai.rate_limit.as_ref().unwrap(),
            bi.rate_limit.as_ref().unwrap()
        ));
        assert!(Arc::ptr_eq(
            a.propagation.as_ref().unwrap(),
            b.propagation.as_ref().unwrap()
        ));

        let changed = BASE
            .replace("error_rate_percent = 50", "error_rate_percent = 60")
            .replace("min_limit = 2", "min_limit = 3")
            .replace("propagate = [\"x-tenant\"]", "propagate = []");
        let c = table(&changed, Some(&b));
        let co = &c.services["orders"];
        assert!(!Arc::ptr_eq(bo.breaker.as_ref().unwrap(), co.breaker.as_ref().unwrap()));
        assert!(Arc::ptr_eq(
            bo.rate_limit.as_ref().unwrap(),
            co.rate_limit.as_ref().unwrap()
        ));
        let ci = c.inbound.as_ref().unwrap();
        assert!(!Arc::ptr_eq(
            bi.adaptive.as_ref().unwrap(),
            ci.adaptive.as_ref().unwrap()
        ));
        assert!(!Arc::ptr_eq(
            b.propagation.as_ref().unwrap(),
            c.propagation.as_ref().unwrap()
        ));
    }
}
