//! Discovery: where every outbound service's endpoints come from. Each source (one file here:
//! `static`, Consul, etcd, Kubernetes, the in-process `memory` registry) publishes what it knows
//! of a service as a [`View`]; one task per outbound service ([`service`]) is the only writer of
//! that service's endpoint set: it merges its sources ([`merge`]), interpolates slow starts,
//! applies the shift policy ([`shift`]) and locality, keeps the last known set in the state store
//! ([`snapshot`]) and swaps the set into the cluster.
//!
//! Architecture invariant: the request path never waits for discovery; it reads the last set.

pub mod consul;
pub mod etcd;
pub mod governance_kv;
mod hub;
pub mod kubernetes;
pub mod memory;
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
use crate::store::{RampRecord, Store};
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
        Self::from_meta_at(get, crate::store::unix_now())
    }

    /// [`Self::from_meta`] by the clock `now_unix`. A ramp no agent could have advertised (see
    /// [`RampRecord::plausible_at`]: a window beyond a day, a start more than five minutes
    /// ahead, `u64::MAX` included) is not a ramp: the endpoint keeps the registry's weight, the
    /// step its agent last wrote, instead of sitting at weight 1 until the year 584 billion.
    pub fn from_meta_at(get: impl Fn(&str) -> Option<String>, now_unix: u64) -> Option<Self> {
        let aggression = get("ramp_aggression")
            .and_then(|a| a.parse::<f64>().ok())
            .filter(|a| *a > 0.0 && *a <= 10.0)
            .unwrap_or(1.0);
        let start: u64 = get("ramp_start")?.parse().ok()?;
        let window: u64 = get("ramp_window")?.parse().ok()?;
        if !(RampRecord {
            start,
            window_secs: window,
        })
        .plausible_at(now_unix)
        {
            return None;
        }
        Some(Self {
            start,
            window,
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
    pub memory: Option<Arc<memory::MemorySource>>,
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
    /// Builds the sources the config needs; `reconcile` then starts a task per outbound service.
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
            // The in-process table holds instances only: no central policies.
            Some(RegistryClient::Memory(m)) => {
                sources.memory = Some(Arc::new(memory::MemorySource::new(m.clone())));
                shift::PolicyWatch::none()
            }
            None => shift::PolicyWatch::none(),
        };
        if wanted(SourceKind::Kubernetes) {
            sources.kubernetes = Some(kubernetes::KubernetesSource::start(&config.kubernetes)?);
        }
        let governance = match registry {
            Some(RegistryClient::Consul(c)) => governance_kv::watch_consul(c.clone(), config.registry.watch_wait.get()),
            Some(RegistryClient::Etcd(e)) => governance_kv::watch_etcd(e.clone()),
            Some(RegistryClient::Memory(_)) | None => none_governance(),
        };
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
        // The service tasks start with the first `reconcile`, which start-up and reload both
        // call once the config is settled (app.rs `Runtime::commit`).
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

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_764_200_000;

    fn ramp(meta: &[(&str, &str)]) -> Option<RampInfo> {
        let meta: HashMap<String, String> = meta.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        RampInfo::from_meta_at(|k| meta.get(k).cloned(), NOW)
    }

    #[test]
    fn ramp_metadata_is_read() {
        let r = ramp(&[("ramp_start", "1764199990"), ("ramp_window", "60"), ("weight", "40")]);
        assert_eq!(
            r,
            Some(RampInfo {
                start: 1_764_199_990,
                window: 60,
                target: 40,
                aggression: 1.0
            })
        );
        assert_eq!(ramp(&[("ramp_start", "1764199990")]), None, "no window");
        assert_eq!(ramp(&[("ramp_window", "60")]), None, "no start");
    }

    #[test]
    fn extreme_ramp_metadata_is_no_ramp_and_no_panic() {
        let max = u64::MAX.to_string();
        let ahead = (NOW + RampRecord::MAX_START_AHEAD_SECS + 1).to_string();
        for (start, window) in [
            (max.as_str(), "60"),
            (ahead.as_str(), "60"),
            ("1764199990", "86401"),
            ("1764199990", max.as_str()),
            ("-1", "60"),
            ("1764199990", "-60"),
            ("1e9", "60"),
            ("18446744073709551616", "60"),
            ("", "60"),
        ] {
            let r = ramp(&[("ramp_start", start), ("ramp_window", window)]);
            assert_eq!(r, None, "start {start:?} window {window:?}");
        }
        // A zero window and a start a little ahead are plausible, and weigh in range.
        for (start, window) in [("1764200000", "0"), ("1764200100", "60"), ("0", "0"), ("0", "86400")] {
            let r = ramp(&[
                ("ramp_start", start),
                ("ramp_window", window),
                ("ramp_aggression", "NaN"),
            ]);
            let r = r.unwrap_or_else(|| panic!("start {start:?} window {window:?}"));
            assert_eq!(r.aggression, 1.0, "NaN aggression falls back to linear");
            let found = Found {
                address: "127.0.0.1:1".parse().unwrap(),
                weight: 100,
                env: "vm".into(),
                zone: String::new(),
                version: String::new(),
                colour: String::new(),
                ramp: Some(r),
            };
            for now in [0, NOW, u64::MAX] {
                let w = service::effective_weight(&found, now);
                assert!((1..=100).contains(&w), "{start} {window} at {now}: {w}");
            }
        }
    }

    proptest::proptest! {
        /// Whatever the registry says and whatever the clock, the weight is in range.
        #[test]
        fn any_ramp_metadata_weighs_in_range(start: u64, window: u64, weight: u32, aggression: f64, now: u64) {
            let meta: HashMap<&str, String> = [
                ("ramp_start", start.to_string()),
                ("ramp_window", window.to_string()),
                ("weight", weight.to_string()),
                ("ramp_aggression", aggression.to_string()),
            ]
            .into_iter()
            .collect();
            let r = RampInfo::from_meta_at(|k| meta.get(k).cloned(), now);
            if let Some(r) = r {
                proptest::prop_assert!(r.window <= RampRecord::MAX_WINDOW_SECS);
                let found = Found {
                    address: "127.0.0.1:1".parse().unwrap(),
                    weight: r.target,
                    env: "vm".into(),
                    zone: String::new(),
                    version: String::new(),
                    colour: String::new(),
                    ramp: Some(r),
                };
                for at in [now, now.saturating_add(1), u64::MAX, 0] {
                    let w = service::effective_weight(&found, at);
                    proptest::prop_assert!((1..=10_000).contains(&w));
                }
            }
        }
    }
}
