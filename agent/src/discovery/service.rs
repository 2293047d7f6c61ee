//! One task per outbound service, the only writer of its endpoint set: it merges the views of
//! the service's sources, interpolates slow starts (suspending them when more than half of the
//! service ramps at once), applies the shift policy and locality, keeps the last known set in the
//! store and swaps the new set into the cluster. It rebuilds on any source change, policy
//! change, reload, and every [`TICK`](super::TICK) (ramps move, stale flags clear).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use super::shift::{self, Policies, Policy};
use super::{snapshot, static_endpoints, DiscoveryStatus, Found, SourceStatus, Sources, View, Want, ZoneFn};
use crate::balance::locality::Locality;
use crate::balance::{Endpoint, EndpointSet, Env, Labels, SetPolicy, Source};
use crate::config::{BalancerKind, Config, LocalityConfig, OutboundConfig, SourceKind};
use crate::route::RouteTable;
use crate::store::{unix_now, Store};
use crate::telemetry::metrics::{ClusterLabels, Direction, OutboundLabels, ShiftLabels};
use crate::telemetry::Metrics;

/// What a service task needs of the config.
#[derive(Clone, Debug)]
pub struct Spec {
    pub service: String,
    pub balancer: BalancerKind,
    pub sources: Vec<SourceKind>,
    pub want: Want,
    pub static_view: Option<View>,
    pub local_shift: Option<Policy>,
    pub locality: LocalityConfig,
}

impl Spec {
    pub fn new(out: &OutboundConfig, config: &Config) -> Self {
        let sources = out.sources(config.registry.kind);
        Self {
            service: out.service.clone(),
            balancer: out.balancer,
            static_view: sources
                .contains(&SourceKind::Static)
                .then(|| static_endpoints::view(out)),
            sources,
            want: Want {
                service: out.service.clone(),
                passing_only: out.passing_only,
                tag: out.tag.clone(),
            },
            // Validated at load: an invalid local policy never gets here.
            local_shift: out.shift.and_then(|s| Policy::new(s.vm, s.k8s).ok()),
            locality: out.locality.clone(),
        }
    }
}

/// Shared with every task.
pub struct Context {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub store: Option<Arc<dyn Store>>,
    pub sources: Sources,
    pub policies: watch::Receiver<Arc<Policies>>,
    pub zone: ZoneFn,
}

/// The reconciler's side of a task; dropping it stops the task.
pub struct Handle {
    spec: watch::Sender<Arc<Spec>>,
    status: Arc<Mutex<DiscoveryStatus>>,
}

impl Handle {
    pub fn update(&self, spec: Arc<Spec>) {
        let _ = self.spec.send(spec);
    }

    pub fn status(&self) -> DiscoveryStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Starts the task of `spec.service`.
pub fn spawn(spec: Arc<Spec>, ctx: Context) -> Handle {
    let (tx, rx) = watch::channel(spec);
    let status = Arc::new(Mutex::new(DiscoveryStatus::default()));
    let task = Task::new(rx, ctx, status.clone());
    tokio::spawn(task.run());
    Handle { spec: tx, status }
}

struct Subscription {
    source: Source,
    rx: watch::Receiver<View>,
}

struct Task {
    spec_rx: watch::Receiver<Arc<Spec>>,
    spec: Arc<Spec>,
    ctx: Context,
    status: Arc<Mutex<DiscoveryStatus>>,
    subs: Vec<Subscription>,
    /// The stored set, until a registry source answers.
    stored: Option<snapshot::Stored>,
    /// The stored central policy, until the policy watch has read the registry.
    stored_policy: Option<Policy>,
    /// What was installed last: endpoints (with their effective weights), the policy, and
    /// the set itself (a reload that rebuilt the cluster must get it again).
    installed: Option<Installed>,
    /// The last set and central policy written to the store, and when.
    saved: Option<(Vec<Found>, Option<Policy>)>,
    saved_at: Option<Instant>,
    ramp_suspended: bool,
    /// Environments the policy sends traffic to that have no endpoint (warned once).
    empty_envs: Vec<Env>,
    labels: OutboundLabels,
}

/// An endpoint as installed: what was found, where, and its effective weight.
type Placed = (Found, Source, u32);

/// The last install: the endpoints, the policy, and the set built from them.
type Installed = (Vec<Placed>, SetPolicyKey, Arc<EndpointSet>);

/// What decides the subsets and pools besides the endpoints.
#[derive(Clone, Debug, PartialEq)]
struct SetPolicyKey {
    split: Option<Policy>,
    locality: Option<Locality>,
    balancer: BalancerKind,
}

impl Task {
    fn new(spec_rx: watch::Receiver<Arc<Spec>>, ctx: Context, status: Arc<Mutex<DiscoveryStatus>>) -> Self {
        let spec = spec_rx.borrow().clone();
        let stored = ctx.store.as_deref().and_then(|s| snapshot::load(s, &spec.service));
        let labels = OutboundLabels {
            service: spec.service.clone(),
        };
        let subs = subscribe(&spec, &ctx.sources);
        ctx.metrics.ramp_suspended.get_or_create(&labels).set(0);
        Self {
            spec_rx,
            spec,
            ctx,
            status,
            subs,
            stored_policy: stored.as_ref().and_then(|s| s.policy),
            stored,
            installed: None,
            saved: None,
            saved_at: None,
            ramp_suspended: false,
            empty_envs: Vec::new(),
            labels,
        }
    }

    async fn run(mut self) {
        let mut tick = tokio::time::interval(super::TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let timed = self.rebuild();
            tokio::select! {
                changed = self.spec_rx.changed() => {
                    if changed.is_err() {
                        // The service left the config.
                        self.ctx.metrics.discovery_stale.remove(&self.labels);
                        self.ctx.metrics.ramp_suspended.remove(&self.labels);
                        return;
                    }
                    self.spec = self.spec_rx.borrow_and_update().clone();
                    self.subs = subscribe(&self.spec, &self.ctx.sources);
                }
                () = any_changed(&mut self.subs) => {}
                () = changed_or_pending(&mut self.ctx.policies) => {}
                // Only while something moves with time: an idle service costs no wake-ups.
                _ = tick.tick(), if timed => {}
            }
        }
    }

    /// Builds the set from the sources' views and installs it when something changed. Returns
    /// whether the set must be rebuilt again as time passes (a ramp in progress or just ended,
    /// a store write held back by the interval).
    fn rebuild(&mut self) -> bool {
        let now = unix_now();
        let views: Vec<(Source, View)> = self.subs.iter().map(|s| (s.source, s.rx.borrow().clone())).collect();
        // Static endpoints answer at once: the store stands in for the registry sources only.
        let registry_views = || views.iter().filter(|(s, _)| *s != Source::Static);
        let answered = registry_views().next().is_none() || registry_views().any(|(_, v)| v.endpoints.is_some());
        if answered {
            self.stored = None;
        }
        let from_store = !answered && self.stored.is_some();
        let mut merged: Vec<(Found, Source)> = super::merge::merge(views.iter().map(|(s, v)| (*s, v)));
        if let (Some(stored), true) = (&self.stored, from_store) {
            for f in &stored.endpoints {
                if !merged.iter().any(|(m, _)| m.address == f.address) {
                    merged.push((f.clone(), Source::Store));
                }
            }
        }

        // Slow start seen by callers, unless most of the service is new.
        let ramping = merged.iter().filter(|(f, _)| ramping(f, now)).count();
        let suspend = ramping > 0 && ramping * 2 > merged.len();
        if suspend != self.ramp_suspended {
            if suspend {
                tracing::warn!(service = %self.spec.service, ramping, endpoints = merged.len(),
                    "more than half of the endpoints are ramping: slow start suspended (full weight)");
            } else {
                tracing::info!(service = %self.spec.service, "slow start resumed");
            }
            self.ramp_suspended = suspend;
            self.ctx
                .metrics
                .ramp_suspended
                .get_or_create(&self.labels)
                .set(i64::from(suspend));
        }
        let weighted: Vec<Placed> = merged
            .into_iter()
            .map(|(f, s)| {
                let w = if suspend {
                    f.ramp.map_or(f.weight, |r| r.target.max(1))
                } else {
                    effective_weight(&f, now)
                };
                (f, s, w)
            })
            .collect();

        // The shift policy and locality.
        let policies = self.ctx.policies.borrow().clone();
        if policies.synced {
            self.stored_policy = None;
        }
        // Until the registry has been read, the central policy saved with the endpoints.
        let stored_central = self.stored_policy.map(|p| shift::Central {
            policy: Some(p),
            index: 0,
            error: None,
        });
        let central = policies.by_service.get(&self.spec.service).or(stored_central.as_ref());
        let shift = shift::resolve(central, self.spec.local_shift, policies.error.as_deref());
        let zone = (self.ctx.zone)().filter(|z| !z.is_empty());
        let key = SetPolicyKey {
            split: shift.policy,
            locality: zone.filter(|_| self.spec.locality.enabled).map(|z| Locality {
                zone: z.into(),
                min_healthy_percent: self.spec.locality.min_healthy_percent,
            }),
            balancer: self.spec.balancer,
        };
        self.warn_empty_envs(&weighted, shift.policy);
        self.install(&weighted, &key);
        let central_policy = (shift.source == "central").then_some(shift.policy).flatten();
        self.save(&weighted, from_store, central_policy);

        // Status and metrics.
        let stale = from_store || views.iter().any(|(_, v)| v.error.is_some());
        self.ctx
            .metrics
            .discovery_stale
            .get_or_create(&self.labels)
            .set(i64::from(stale));
        for (env, pct) in [("vm", shift.policy.map(|p| p.vm)), ("k8s", shift.policy.map(|p| p.k8s))] {
            let labels = ShiftLabels {
                service: self.spec.service.clone(),
                env,
            };
            match pct {
                Some(p) => {
                    self.ctx.metrics.shift_weight.get_or_create(&labels).set(i64::from(p));
                }
                None => {
                    self.ctx.metrics.shift_weight.remove(&labels);
                }
            }
        }
        let status = DiscoveryStatus {
            stale,
            last_update: views
                .iter()
                .filter_map(|(_, v)| v.updated)
                .max()
                .or(self.stored.as_ref().map(|s| s.saved_at)),
            error: views
                .iter()
                .find_map(|(s, v)| v.error.as_ref().map(|e| format!("{}: {e}", s.as_str())))
                .or_else(|| from_store.then(|| "no source has answered yet: serving the stored endpoints".to_owned())),
            sources: views
                .iter()
                .map(|(s, v)| SourceStatus {
                    source: s.as_str(),
                    endpoints: v.endpoints.as_ref().map(|e| e.len()),
                    error: v.error.clone(),
                    updated: v.updated,
                })
                .collect(),
            shift,
            ramp_suspended: suspend,
        };
        if let Ok(mut s) = self.status.lock() {
            *s = status;
        }
        let ramp_moving = weighted.iter().any(|(f, _, _)| {
            f.ramp
                .is_some_and(|r| now <= r.start.saturating_add(r.window).saturating_add(1))
        });
        let save_pending = self.ctx.store.is_some()
            && !from_store
            && self.saved.as_ref().is_some_and(|(s, p)| {
                *p != central_policy || s.len() != weighted.len() || s.iter().zip(&weighted).any(|(a, b)| *a != b.0)
            });
        ramp_moving || save_pending
    }

    fn warn_empty_envs(&mut self, found: &[Placed], policy: Option<Policy>) {
        let empty: Vec<Env> = policy
            .map(|p| {
                [(Env::Vm, p.vm), (Env::K8s, p.k8s)]
                    .into_iter()
                    .filter(|&(env, pct)| pct > 0 && !found.iter().any(|(f, _, _)| Env::parse(&f.env) == env))
                    .map(|(env, _)| env)
                    .collect()
            })
            .unwrap_or_default();
        for env in &empty {
            if !self.empty_envs.contains(env) && !found.is_empty() {
                tracing::warn!(service = %self.spec.service, env = env.as_str(),
                    "the shift policy sends traffic to an environment without endpoints: it goes to the other one");
            }
        }
        self.empty_envs = empty;
    }

    /// Builds and swaps in the set when endpoints, weights or policy changed, reusing
    /// endpoints (and their statistics and pools) that stayed.
    fn install(&mut self, found: &[Placed], key: &SetPolicyKey) {
        let routes = self.ctx.routes.load();
        let Some(cluster) = routes.services.get(self.spec.service.as_str()) else {
            return;
        };
        let old = cluster.endpoints.load();
        let same_as_installed = self
            .installed
            .as_ref()
            .is_some_and(|(f, k, set)| f.as_slice() == found && k == key && Arc::ptr_eq(set, &old));
        if same_as_installed {
            return;
        }
        let endpoints: Vec<Arc<Endpoint>> = found
            .iter()
            .map(|(f, source, weight)| {
                let labels = labels(f, *source);
                match old
                    .endpoints()
                    .iter()
                    .find(|e| e.addr == f.address && *e.labels == labels)
                {
                    Some(e) if e.weight == *weight => e.clone(),
                    Some(e) => Arc::new(e.reweighted(*weight)),
                    None => Arc::new(Endpoint::new(
                        f.address,
                        *weight,
                        Arc::new(labels.clone()),
                        self.ctx
                            .metrics
                            .request(Direction::Outbound, &self.spec.service, labels.env.as_str()),
                    )),
                }
            })
            .collect();
        let membership_changed = self.installed.as_ref().is_none_or(|(f, _, _)| {
            f.len() != found.len() || f.iter().zip(found).any(|(a, b)| a.0.address != b.0.address)
        });
        let policy = SetPolicy {
            split: key.split.map(|p| vec![(Env::Vm, p.vm), (Env::K8s, p.k8s)]),
            locality: key.locality.clone(),
            fallbacks: key
                .split
                .map(|_| self.ctx.metrics.shift_fallbacks.get_or_create(&self.labels).clone()),
        };
        let set = Arc::new(EndpointSet::with_policy(key.balancer, endpoints, &policy));
        set.set_panic_threshold(cluster.outlier.panic_threshold_percent());
        cluster.endpoints.store(set.clone());
        // A reload may have swapped the route table meanwhile: install into the new one too.
        if !Arc::ptr_eq(&*routes, &*self.ctx.routes.load()) {
            drop(routes);
            self.installed = None;
            return self.install(found, key);
        }
        if membership_changed {
            tracing::info!(service = %self.spec.service, endpoints = found.len(), "endpoints changed");
            self.ctx
                .metrics
                .discovery_updates
                .get_or_create(&ClusterLabels {
                    direction: Direction::Outbound,
                    service: self.spec.service.clone(),
                })
                .inc();
        }
        self.installed = Some((found.to_vec(), key.clone(), set));
    }

    /// Keeps the last set a source gave in the store, at most every `snapshot::MIN_INTERVAL`.
    fn save(&mut self, found: &[Placed], from_store: bool, policy: Option<Policy>) {
        let Some(store) = self.ctx.store.as_deref() else {
            return;
        };
        // Only what sources found (static endpoints come back with the config).
        if from_store || self.spec.sources.iter().all(|s| *s == SourceKind::Static) {
            return;
        }
        let set: Vec<Found> = found.iter().map(|(f, _, _)| f.clone()).collect();
        if self.saved.as_ref().is_some_and(|(s, p)| *s == set && *p == policy) {
            return;
        }
        if self.saved_at.is_some_and(|at| at.elapsed() < snapshot::MIN_INTERVAL) {
            // Written on a later tick.
            return;
        }
        // Never overwrite a good stored set with "nothing answered" (no source has a view).
        if set.is_empty() && self.subs.iter().all(|s| s.rx.borrow().endpoints.is_none()) {
            return;
        }
        snapshot::save(store, &self.spec.service, &set, policy);
        self.saved = Some((set, policy));
        self.saved_at = Some(Instant::now());
    }
}

fn labels(f: &Found, source: Source) -> Labels {
    Labels {
        env: Env::parse(&f.env),
        zone: f.zone.as_str().into(),
        version: f.version.as_str().into(),
        colour: f.colour.as_str().into(),
        source,
    }
}

fn subscribe(spec: &Spec, sources: &Sources) -> Vec<Subscription> {
    spec.sources
        .iter()
        .map(|kind| {
            let (source, rx) = match kind {
                SourceKind::Static => {
                    let (tx, rx) = watch::channel(spec.static_view.clone().unwrap_or_default());
                    drop(tx);
                    (Source::Static, rx)
                }
                SourceKind::Consul => (
                    Source::Consul,
                    source_or_missing(
                        sources.consul.as_deref().map(|s| s as &dyn super::EndpointSource),
                        spec,
                        "consul",
                    ),
                ),
                SourceKind::Etcd => (
                    Source::Etcd,
                    source_or_missing(
                        sources.etcd.as_deref().map(|s| s as &dyn super::EndpointSource),
                        spec,
                        "etcd",
                    ),
                ),
                SourceKind::Kubernetes => (
                    Source::Kubernetes,
                    source_or_missing(
                        sources.kubernetes.as_deref().map(|s| s as &dyn super::EndpointSource),
                        spec,
                        "kubernetes",
                    ),
                ),
                SourceKind::Memory => (
                    Source::Memory,
                    source_or_missing(
                        sources.memory.as_deref().map(|s| s as &dyn super::EndpointSource),
                        spec,
                        "memory",
                    ),
                ),
            };
            Subscription { source, rx }
        })
        .collect()
}

/// A subscription, or (a reload added a source the agent was started without) a view that
/// says a restart is needed.
fn source_or_missing(src: Option<&dyn super::EndpointSource>, spec: &Spec, name: &str) -> watch::Receiver<View> {
    match src {
        Some(s) => s.subscribe(&spec.want),
        None => {
            let (tx, rx) = watch::channel(View {
                endpoints: None,
                error: Some(format!("the {name} source starts with the agent: restart to use it")),
                updated: None,
            });
            drop(tx);
            rx
        }
    }
}

/// Resolves when any subscription's view changed; never when there is none (or all ended).
async fn any_changed(subs: &mut [Subscription]) {
    if subs.is_empty() {
        return std::future::pending().await;
    }
    let waits = subs.iter_mut().map(|s| Box::pin(changed_or_pending(&mut s.rx)));
    futures_util::future::select_all(waits).await;
}

/// `changed()`, except that a closed channel (its value is final) never resolves.
async fn changed_or_pending<T>(rx: &mut watch::Receiver<T>) {
    if rx.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

fn ramping(f: &Found, now: u64) -> bool {
    f.ramp.is_some_and(|r| now < r.start.saturating_add(r.window))
}

/// The weight to balance with now: the source's weight, or during a slow start the point on the
/// ramp's curve between the registry's step writes.
pub fn effective_weight(f: &Found, now_unix: u64) -> u32 {
    match f.ramp {
        Some(r) if now_unix < r.start.saturating_add(r.window) => {
            let elapsed = Duration::from_secs(now_unix.saturating_sub(r.start));
            let w = crate::ramp::weight_at(Duration::from_secs(r.window), r.aggression, elapsed);
            crate::ramp::scale(w, r.target).max(1)
        }
        _ => f.weight,
    }
}
