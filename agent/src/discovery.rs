//! Discovery: where every outbound service's endpoints come from. Each source (one file here:
//! `static`, Consul, etcd, Kubernetes) publishes what it knows of a service as a [`View`]; one
//! task per outbound service ([`service`]) is the only writer of that service's endpoint set: it
//! merges its sources ([`merge`]), interpolates slow starts, applies the shift policy
//! ([`shift`]) and locality, keeps the last known set in the state store ([`snapshot`]) and
//! swaps the set into the cluster.
//!
//! Architecture invariant: the request path never waits for discovery; it reads the last set.

pub mod consul;
pub mod etcd;
mod hub;
pub mod kubernetes;
pub mod merge;
pub mod service;
pub mod shift;
pub mod snapshot;
mod static_endpoints;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::config::{Config, SourceKind};
use crate::registry::RegistryClient;
use crate::route::RouteTable;
use crate::store::Store;
use crate::telemetry::Metrics;

/// What one source currently knows of one service.
#[derive(Clone, Debug, Default)]
pub struct View {
    /// `None` until the source has answered once.
    pub endpoints: Option<Arc<Vec<Found>>>,
    /// The last error since the last good answer: the endpoints are then stale.
    pub error: Option<String>,
    /// Unix seconds of the last good answer.
    pub updated: Option<u64>,
}

/// An endpoint as a source found it, with the labels it carried.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Found {
    pub address: SocketAddr,
    /// Weight advertised by the source (1..=10000).
    pub weight: u32,
    /// Environment as the source said it (mapped to `vm`, `k8s` or `other` before it is used).
    pub env: String,
    #[serde(default)]
    pub zone: String,
    #[serde(default)]
    pub version: String,
    #[serde(default)]
    pub colour: String,
    /// Slow start in progress, for caller-side interpolation.
    #[serde(default)]
    pub ramp: Option<RampInfo>,
}

/// A ramp advertised in registry metadata.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RampInfo {
    /// Unix seconds.
    pub start: u64,
    pub window: u64,
    /// The weight at the end of the ramp.
    pub target: u32,
    pub aggression: f64,
}

impl RampInfo {
    /// Reads ramp metadata through `get` (keys `ramp_start`, `ramp_window`, optional `weight`
    /// and `ramp_aggression`); `None` without a start and a window, or with nonsense values.
    pub fn from_meta(get: impl Fn(&str) -> Option<String>) -> Option<Self> {
        let aggression = get("ramp_aggression")
            .and_then(|a| a.parse::<f64>().ok())
            .filter(|a| *a > 0.0 && *a <= 10.0)
            .unwrap_or(1.0);
        Some(Self {
            start: get("ramp_start")?.parse().ok()?,
            // A window beyond a day is not a slow start.
            window: get("ramp_window")?.parse().ok().filter(|w| *w <= 86_400)?,
            target: get("weight")
                .and_then(|w| w.parse::<u32>().ok())
                .map_or(100, |w| w.clamp(1, 10_000)),
            aggression,
        })
    }
}

/// What a service task asks of a source.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Want {
    pub service: String,
    /// Consul: passing instances only.
    pub passing_only: bool,
    /// Consul: instances with this tag only.
    pub tag: Option<String>,
}

/// A source of endpoints: a subscription is a watch of one service's [`View`]; dropping the
/// receiver ends it.
pub trait EndpointSource: Send + Sync {
    fn subscribe(&self, want: &Want) -> watch::Receiver<View>;
}

/// The sources an agent has, built once from the config.
#[derive(Clone, Default)]
pub struct Sources {
    pub consul: Option<Arc<consul::ConsulSource>>,
    pub etcd: Option<Arc<etcd::EtcdSource>>,
    pub kubernetes: Option<Arc<kubernetes::KubernetesSource>>,
}

/// What the admin API shows of one service's discovery.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DiscoveryStatus {
    /// Some source has failed since its last answer, or the set came from the store.
    pub stale: bool,
    /// Unix seconds of the newest good answer of any source.
    pub last_update: Option<u64>,
    pub error: Option<String>,
    /// Per source: `{source, endpoints, error, updated}`.
    pub sources: Vec<SourceStatus>,
    /// The shift policy in force and where it came from.
    pub shift: shift::ShiftStatus,
    /// Ramping endpoints run at full weight because more than half of the service ramps.
    pub ramp_suspended: bool,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct SourceStatus {
    pub source: &'static str,
    pub endpoints: Option<usize>,
    pub error: Option<String>,
    pub updated: Option<u64>,
}

/// The caller's own zone (from its identity), read when sets are built.
pub type ZoneFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// Every service task and the shared sources.
pub struct Discovery {
    routes: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
    store: Option<Arc<dyn Store>>,
    sources: Sources,
    policies: shift::PolicyWatch,
    /// Central governance policies (`vmesh/policy/<service>`), for the route table.
    governance: tokio::sync::watch::Receiver<Arc<crate::governance::central::CentralPolicies>>,
    zone: ZoneFn,
    tasks: Mutex<HashMap<String, service::Handle>>,
}

/// No registry: no central governance policies (the receiver keeps the empty value).
fn none_governance() -> tokio::sync::watch::Receiver<Arc<crate::governance::central::CentralPolicies>> {
    let (_tx, rx) = tokio::sync::watch::channel(Arc::default());
    rx
}

/// How often a service task rebuilds its set without news (ramps, stale flags, store writes).
pub const TICK: Duration = Duration::from_secs(1);

impl Discovery {
    /// Builds the sources the config needs and starts a task per outbound service.
    pub fn start(
        config: &Config,
        registry: Option<&RegistryClient>,
        routes: &Arc<ArcSwap<RouteTable>>,
        metrics: &Arc<Metrics>,
        store: Option<Arc<dyn Store>>,
        zone: ZoneFn,
    ) -> Result<Arc<Self>, String> {
        let mut sources = Sources::default();
        let wanted = |k: SourceKind| {
            config
                .outbound
                .iter()
                .any(|o| o.sources(config.registry.kind).contains(&k))
        };
        let policies = match registry {
            Some(RegistryClient::Consul(c)) => {
                if wanted(SourceKind::Consul) {
                    sources.consul = Some(consul::ConsulSource::new(
                        c.clone(),
                        config.registry.watch_wait.get(),
                        config.registry.max_watches,
                    ));
                }
                consul::watch_policies(c.clone(), config.registry.watch_wait.get())
            }
            Some(RegistryClient::Etcd(e)) => {
                let (src, policies) = etcd::EtcdSource::start(e.clone());
                sources.etcd = Some(src);
                policies
            }
            None => shift::PolicyWatch::none(),
        };
        if wanted(SourceKind::Kubernetes) {
            sources.kubernetes = Some(kubernetes::KubernetesSource::start(&config.kubernetes)?);
        }
        let governance = none_governance();
        let d = Arc::new(Self {
            routes: routes.clone(),
            metrics: metrics.clone(),
            store,
            sources,
            policies,
            governance,
            zone,
            tasks: Mutex::new(HashMap::new()),
        });
        d.reconcile(config);
        Ok(d)
    }

    /// Brings the tasks in line with `config`: new services get a task, changed ones their new
    /// settings, removed ones stop. A source the agent was started without is reported in the
    /// service's status (it needs a restart).
    pub fn reconcile(&self, config: &Config) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.retain(|s, _| config.outbound.iter().any(|o| &o.service == s));
        for out in &config.outbound {
            let spec = Arc::new(service::Spec::new(out, config));
            match tasks.get(&out.service) {
                Some(h) => h.update(spec),
                None => {
                    let h = service::spawn(spec, self.context());
                    tasks.insert(out.service.clone(), h);
                }
            }
        }
    }

    fn context(&self) -> service::Context {
        service::Context {
            routes: self.routes.clone(),
            metrics: self.metrics.clone(),
            store: self.store.clone(),
            sources: self.sources.clone(),
            policies: self.policies.subscribe(),
            zone: self.zone.clone(),
        }
    }

    /// The central governance policies as they change.
    pub fn governance_policies(
        &self,
    ) -> tokio::sync::watch::Receiver<Arc<crate::governance::central::CentralPolicies>> {
        self.governance.clone()
    }

    /// The discovery status of `service`, if it is an outbound service.
    pub fn status(&self, service: &str) -> Option<DiscoveryStatus> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        tasks.get(service).map(service::Handle::status)
    }

    /// Whether any outbound service is running on stale endpoints.
    pub fn stale_services(&self) -> Vec<String> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<String> = tasks
            .iter()
            .filter(|(_, h)| h.status().stale)
            .map(|(s, _)| s.clone())
            .collect();
        v.sort();
        v
    }

    /// The central policies as last read (for `GET /shift`).
    pub fn policies(&self) -> &shift::PolicyWatch {
        &self.policies
    }
}
