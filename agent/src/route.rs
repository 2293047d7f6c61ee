//! The route table: which cluster serves a listener or a `Host`, built from config and swapped
//! whole on reload. Clusters keep their endpoints' statistics and connection pools across a
//! reload when the endpoint or the pool settings did not change.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderName;

use crate::balance::{Endpoint, EndpointSet, Env, Labels, Source};
use crate::config::{BalancerKind, Config, EndpointConfig, InboundConfig, OutboundConfig, Protocol, RetryConfig};
use crate::proxy::client::{self, UpstreamClient};
use crate::resilience::{Outlier, RetryBudget, RetryPolicy};
use crate::telemetry::metrics::{ClusterMetrics, Direction, Metrics};

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
}

/// Every cluster of one config generation.
#[derive(Default)]
pub struct RouteTable {
    pub inbound: Option<Arc<Cluster>>,
    /// Outbound clusters by service name.
    pub services: HashMap<Box<str>, Arc<Cluster>>,
}

// === impl RouteTable ===

impl RouteTable {
    /// Builds the table for `config`, reusing what `previous` already has.
    pub fn build(config: &Config, previous: Option<&RouteTable>, metrics: &Metrics) -> Self {
        let retry_buffer = config.proxy.retry_buffer_bytes.0;
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
                (
                    Box::from(out.service.as_str()),
                    Arc::new(Cluster::outbound(out, prev, metrics, retry_buffer)),
                )
            })
            .collect();
        Self { inbound, services }
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
            },
            prev,
            metrics,
            retry_buffer,
        )
    }

    fn outbound(c: &OutboundConfig, prev: Option<&Cluster>, metrics: &Metrics, retry_buffer: u64) -> Self {
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
        let client = match prev {
            Some(p) if p.protocol == spec.protocol && p.connect_timeout == spec.connect_timeout => p.client.clone(),
            _ => client::build(spec.protocol, spec.connect_timeout),
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
                _ => ArcSwap::from_pointee(EndpointSet::new(spec.balancer, endpoints)),
            },
            timeout: spec.timeout,
            per_try_timeout: spec.per_try_timeout,
            connect_timeout: spec.connect_timeout,
            retry: RetryPolicy::from_config(spec.retry),
            budget: RetryBudget::new(spec.retry.budget_ratio, spec.retry.budget_min_concurrency),
            outlier: Outlier::default(),
            client,
            metrics: metrics.cluster(spec.direction, spec.service),
            retry_buffer,
        }
    }

    pub fn is_grpc(&self) -> bool {
        self.protocol == Protocol::Grpc
    }
}
