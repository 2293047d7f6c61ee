//! Registration on the app's behalf: identity (CMDB, or the cached one during an outage),
//! registry writes that follow the app's health, the slow-start ramp, drain and undrain,
//! anti-entropy, and the state kept in the store across restarts.
//!
//! One task owns all of it; the admin API and signals talk to it through [`Handle`].

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use vmesh_cmdb::{Cmdb, ServiceIdentity};

use super::health::Health;
use super::ramp::{self, Ramp};
use crate::config::{Config, RegistryKind};
use crate::registry::{Registration, Registry, RegistryError};
use crate::route::RouteTable;
use crate::store::{unix_now, RampRecord, RegistrationRecord, State};
use crate::telemetry::Metrics;

/// Where the instance is in its drain cycle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainPhase {
    #[default]
    Serving,
    Draining,
    Drained,
}

/// What `/status` shows of the lifecycle.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LifecycleStatus {
    pub identity: Option<ServiceIdentity>,
    /// `cmdb`, `cache` (the CMDB was unreachable), or `none`.
    pub identity_source: &'static str,
    pub identity_error: Option<String>,
    pub registry: String,
    pub registered: bool,
    pub registration_id: Option<String>,
    pub registry_error: Option<String>,
    /// Weight advertised in the registry now.
    pub weight: u32,
    /// Weight callers interpolate to now (1..=target).
    pub effective_weight: u32,
    pub ramp: Option<RampRecord>,
    pub drain: DrainPhase,
    pub app: Option<Health>,
    /// Inbound requests in flight.
    pub in_flight: u64,
}

pub enum Command {
    Drain(oneshot::Sender<Result<(), String>>),
    Undrain(Duration, oneshot::Sender<Result<(), String>>),
    /// SIGTERM: mark down, wait for callers and in-flight requests, deregister.
    Shutdown(Duration, oneshot::Sender<()>),
}

/// The admin side of the registrar.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    pub status: Arc<Mutex<LifecycleStatus>>,
}

impl Handle {
    pub fn status(&self) -> LifecycleStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    async fn call(&self, make: impl FnOnce(oneshot::Sender<Result<(), String>>) -> Command) -> Result<(), String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| "the registrar has stopped".to_owned())?;
        rx.await.map_err(|_| "the registrar has stopped".to_owned())?
    }

    pub async fn drain(&self) -> Result<(), String> {
        self.call(Command::Drain).await
    }

    pub async fn undrain(&self, timeout: Duration) -> Result<(), String> {
        self.call(|tx| Command::Undrain(timeout, tx)).await
    }

    pub async fn shutdown(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(timeout, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

pub struct Registrar {
    config: Arc<Config>,
    cmdb: Option<Box<dyn Cmdb>>,
    registry: Option<Arc<dyn Registry>>,
    store: State,
    routes: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
    health: Option<watch::Receiver<Health>>,
    status: Arc<Mutex<LifecycleStatus>>,
    identity: Option<ServiceIdentity>,
    /// What the registry holds now, as far as we know.
    written: Option<Registration>,
    /// The registry must be brought in line with `desired()` (a write failed or is due).
    dirty: bool,
    ramp: Option<RampRecord>,
    drain: DrainPhase,
    draining_since: Option<Instant>,
    /// Registry writes wait until start-up has read the store and the first health check.
    started: bool,
    /// The app's health at the last check (None before the first).
    last_healthy: Option<bool>,
}

/// Retry period of failed registry writes and of a CMDB that has not answered yet.
const RETRY: Duration = Duration::from_secs(2);

impl Registrar {
    #[allow(clippy::too_many_arguments)]
    pub fn spawn(
        config: Arc<Config>,
        cmdb: Option<Box<dyn Cmdb>>,
        registry: Option<Arc<dyn Registry>>,
        store: State,
        routes: Arc<ArcSwap<RouteTable>>,
        metrics: Arc<Metrics>,
        health: Option<watch::Receiver<Health>>,
        ready: oneshot::Sender<()>,
    ) -> Handle {
        let (tx, rx) = mpsc::channel(16);
        let status = Arc::new(Mutex::new(LifecycleStatus {
            identity_source: "none",
            registry: registry.as_ref().map_or_else(|| "none".to_owned(), |r| r.describe()),
            ..LifecycleStatus::default()
        }));
        let r = Self {
            config,
            cmdb,
            registry,
            store,
            routes,
            metrics,
            health,
            status: status.clone(),
            identity: None,
            written: None,
            dirty: true,
            ramp: None,
            drain: DrainPhase::Serving,
            draining_since: None,
            started: false,
            last_healthy: None,
        };
        tokio::spawn(r.run(rx, ready));
        Handle { tx, status }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>, ready: oneshot::Sender<()>) {
        self.start().await;
        let _ = ready.send(());
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + self.refresh_period(),
            self.config.cmdb.refresh.get(),
        );
        let mut anti_entropy = tokio::time::interval(self.config.registry.anti_entropy.get());
        let ttl_every = (self.config.registry.check_ttl.get() / 3).max(Duration::from_millis(500));
        let mut ttl = tokio::time::interval(ttl_every);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut retry_at = tokio::time::Instant::now() + RETRY;
        loop {
            let next_step = self.next_ramp_step();
            let health_changed = async {
                match self.health.as_mut() {
                    Some(h) => h.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Drain(reply)) => { let _ = reply.send(self.drain().await); }
                    Some(Command::Undrain(timeout, reply)) => { let _ = reply.send(self.undrain(timeout).await); }
                    Some(Command::Shutdown(timeout, reply)) => { self.shutdown(timeout).await; let _ = reply.send(()); return; }
                    None => return,
                },
                changed = health_changed => {
                    if changed {
                        self.on_health().await;
                    }
                }
                () = sleep_until(next_step) => {
                    tracing::info!(weight = self.advertised_weight(), "slow start: next weight step");
                    self.dirty = true;
                    self.sync("ramp").await;
                }
                _ = refresh.tick() => {
                    self.refresh_identity().await;
                    if self.identity.is_none() {
                        refresh.reset_after(self.refresh_period());
                    }
                }
                _ = anti_entropy.tick() => self.anti_entropy().await,
                _ = ttl.tick() => self.keep_ttl().await,
                _ = tick.tick() => {
                    self.drain_progress();
                    if self.dirty && tokio::time::Instant::now() >= retry_at {
                        self.sync("retry").await;
                        retry_at = tokio::time::Instant::now() + RETRY;
                    }
                    self.publish();
                }
            }
        }
    }

    /// The CMDB is asked every `cmdb.refresh`; without an identity at least every 5 s.
    fn refresh_period(&self) -> Duration {
        let refresh = self.config.cmdb.refresh.get();
        if self.identity.is_some() {
            refresh
        } else {
            refresh.min(Duration::from_secs(5))
        }
    }

    /// Start-up: identity, stored state, then the first registration.
    async fn start(&mut self) {
        match self.store.drained() {
            Ok(true) => {
                tracing::info!("drain flag set in the store: staying drained (run `vmesh undrain` to serve)");
                self.drain = DrainPhase::Drained;
            }
            Ok(false) => {}
            Err(e) => tracing::error!(error = %e, "cannot read the drain flag"),
        }
        self.ramp = self.store.ramp().unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot read the ramp record");
            None
        });
        self.refresh_identity().await;
        if matches!(self.store.registration(), Ok(None)) {
            self.recover_from_registry().await;
        }
        // A registration left by an earlier run: adopt it if it is ours now, else remove it.
        if let (Ok(Some(old)), Some(registry)) = (self.store.registration(), self.registry.clone()) {
            let current = self.desired().map(|d| d.id);
            if current.as_deref() != Some(old.id.as_str()) {
                tracing::info!(id = %old.id, "removing the registration of an earlier run (identity changed)");
                if let Err(e) = self.deregister(registry.as_ref(), &old.service, &old.id).await {
                    tracing::warn!(error = %e, "cannot remove the earlier registration; will retry");
                }
            } else {
                tracing::info!(id = %old.id, "adopting the registration of an earlier run");
            }
        }
        if let Some(h) = &self.health {
            // Give the first health check a moment so a healthy app registers as passing.
            let mut h = h.clone();
            let _ = tokio::time::timeout(Duration::from_secs(3), h.wait_for(|h| h.checks > 0)).await;
        }
        self.started = true;
        self.on_health().await;
        self.publish();
    }

    /// No registration record in the store (a new VM, or a store lost or moved aside): what the
    /// registry still holds of this instance stands in, so a drained instance stays drained and
    /// a running slow start is not restarted.
    async fn recover_from_registry(&mut self) {
        let (Some(registry), Some(want)) = (self.registry.clone(), self.desired()) else {
            return;
        };
        let found = match registry.recover(&want.id).await {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(id = %want.id, error = %e, "cannot read this instance's state from the registry");
                return;
            }
        };
        tracing::warn!(id = %want.id, maintenance = found.maintenance, ramp = ?found.ramp,
            "the store has no registration record but the registry has this instance: taking its state from the registry");
        if found.maintenance && self.drain == DrainPhase::Serving {
            tracing::warn!(
                "the registry shows the instance in maintenance: staying drained (run `vmesh undrain` to serve)"
            );
            if let Err(e) = self.store.set_drained(true) {
                tracing::error!(error = %e, "cannot store the drain flag");
            }
            self.drain = DrainPhase::Drained;
        }
        // A ramp from the registry is data from the network: an implausible one (a start far
        // in the future, a window over a day) is not adopted, so it cannot reach the store.
        let found_ramp = found.ramp.map(|(start, window_secs)| RampRecord { start, window_secs });
        if let (Some(rec), None) = (found_ramp.filter(|r| r.plausible_at(unix_now())), self.ramp) {
            self.set_ramp(rec);
        }
        self.record_registration(registry.as_ref(), &want);
    }

    /// Stores which instance this agent owns, so a later run adopts or removes it.
    fn record_registration(&self, registry: &dyn Registry, want: &Registration) {
        let record = RegistrationRecord {
            registry: registry.describe(),
            id: want.id.clone(),
            service: want.service.clone(),
        };
        if let Err(e) = self.store.set_registration(Some(&record)) {
            tracing::error!(error = %e, "cannot store the registration record");
        }
    }

    fn app_healthy(&self) -> bool {
        self.health.as_ref().is_none_or(|h| h.borrow().healthy)
    }

    async fn on_health(&mut self) {
        let healthy = self.app_healthy();
        let recovered = healthy && self.last_healthy == Some(false);
        // A new ramp for a new instance, and for an app that comes back cold after a failure.
        if healthy && (self.ramp.is_none() || recovered) && self.drain == DrainPhase::Serving && self.identity.is_some()
        {
            self.start_ramp();
        }
        if self.health.as_ref().is_some_and(|h| h.borrow().checks > 0) {
            self.last_healthy = Some(healthy);
        }
        self.sync("health").await;
    }

    fn ramp_shape(&self) -> Option<Ramp> {
        let r = &self.config.inbound.as_ref()?.ramp;
        Some(Ramp {
            window: r.window.get(),
            aggression: r.aggression,
            steps: r.steps.clone(),
        })
    }

    fn start_ramp(&mut self) {
        let Some(shape) = self.ramp_shape() else { return };
        tracing::info!(window = ?shape.window, "slow start: ramp begins at weight 1");
        self.set_ramp(RampRecord {
            start: unix_now(),
            window_secs: shape.window.as_secs(),
        });
    }

    fn set_ramp(&mut self, rec: RampRecord) {
        if let Err(e) = self.store.set_ramp(Some(rec)) {
            tracing::error!(error = %e, "cannot store the ramp start");
        }
        self.ramp = Some(rec);
    }

    fn ramp_elapsed(&self) -> Option<Duration> {
        let r = self.ramp?;
        Some(Duration::from_secs(unix_now().saturating_sub(r.start)))
    }

    /// The step weight (1..=100) to advertise now.
    fn advertised_weight(&self) -> u32 {
        match (self.ramp_shape(), self.ramp_elapsed()) {
            (Some(shape), Some(elapsed)) => shape.advertised_at(elapsed),
            (Some(shape), None) if !shape.window.is_zero() => 1,
            _ => 100,
        }
    }

    fn next_ramp_step(&self) -> Option<tokio::time::Instant> {
        let (wait, _) = self.ramp_shape()?.next_step_in(self.ramp?, unix_now())?;
        Some(tokio::time::Instant::now() + wait + Duration::from_millis(50))
    }

    /// The registration the registry should hold now, if any.
    fn desired(&self) -> Option<Registration> {
        let id = self.identity.as_ref()?;
        let inbound = self.config.inbound.as_ref()?;
        self.registry.as_ref()?;
        let node = self.config.node_name();
        let address = match (self.config.registry.advertise_address, inbound.listen.ip()) {
            (Some(a), _) => a.to_string(),
            (None, ip) if !ip.is_unspecified() => ip.to_string(),
            (None, _) if self.config.registry.kind == RegistryKind::Etcd => IpAddr::from([127, 0, 0, 1]).to_string(),
            (None, _) => String::new(),
        };
        let mut tags: Vec<String> = [&id.environment, &id.zone, &id.version, &id.colour]
            .into_iter()
            .filter(|t| !t.is_empty())
            .cloned()
            .chain(id.tags.iter().cloned())
            .collect();
        tags.dedup();
        let mut meta = BTreeMap::from([
            ("vmesh-env".to_owned(), self.config.registry.advertise_env.clone()),
            ("vmesh-environment".to_owned(), id.environment.clone()),
            ("vmesh-zone".to_owned(), id.zone.clone()),
            ("vmesh-version".to_owned(), id.version.clone()),
            ("vmesh-colour".to_owned(), id.colour.clone()),
            ("vmesh-owner".to_owned(), id.owner.clone()),
            ("vmesh-weight".to_owned(), id.weight.to_string()),
            ("vmesh-node".to_owned(), node.clone()),
        ]);
        if let (Some(r), Some(shape)) = (self.ramp, self.ramp_shape()) {
            meta.insert("vmesh-ramp-start".into(), r.start.to_string());
            meta.insert("vmesh-ramp-window".into(), r.window_secs.to_string());
            if (shape.aggression - 1.0).abs() > f64::EPSILON {
                meta.insert("vmesh-ramp-aggression".into(), shape.aggression.to_string());
            }
        }
        Some(Registration {
            id: format!("{}-{node}", id.service),
            service: id.service.clone(),
            address,
            port: inbound.listen.port(),
            tags,
            meta,
            weight: ramp::scale(self.advertised_weight(), id.weight),
            healthy: self.app_healthy(),
            maintenance: self.drain != DrainPhase::Serving,
            check_ttl: self.config.registry.check_ttl.get(),
            deregister_critical_after: self.config.registry.deregister_critical_after.get(),
        })
    }

    /// Brings the registry in line with `desired()`, with the smallest write that does it.
    async fn sync(&mut self, why: &'static str) {
        if !self.started {
            return;
        }
        let Some(registry) = self.registry.clone() else {
            self.dirty = false;
            return;
        };
        let Some(want) = self.desired() else {
            // Nothing to advertise (no identity): remove what an earlier identity registered.
            self.withdraw(registry.as_ref()).await;
            return;
        };
        let op = match &self.written {
            Some(have) if *have == want && !self.dirty => return,
            Some(have) if *have == want => "register",
            Some(have)
                if Registration {
                    healthy: want.healthy,
                    ..have.clone()
                } == want =>
            {
                "health"
            }
            Some(have)
                if Registration {
                    maintenance: want.maintenance,
                    ..have.clone()
                } == want =>
            {
                "maintenance"
            }
            _ => "register",
        };
        if let Some(have) = &self.written {
            if have.id != want.id {
                tracing::info!(old = %have.id, new = %want.id, "identity changed: replacing the registration");
                if registry.deregister(&have.service, &have.id).await.is_ok() {
                    self.count_write("deregister");
                }
            }
        }
        // Recorded before the write: a crash right after it must still know what to clean up.
        self.record_registration(registry.as_ref(), &want);
        let result = match op {
            "health" => registry.set_health(&want).await,
            "maintenance" => registry.set_maintenance(&want).await,
            _ => self.register(registry.as_ref(), &want).await,
        };
        match result {
            Ok(()) => {
                self.count_write(op);
                tracing::info!(id = %want.id, why, op, weight = want.weight, healthy = want.healthy,
                    maintenance = want.maintenance, "registry updated");
                self.written = Some(want);
                self.dirty = false;
                self.set_status(|s| s.registry_error = None);
            }
            Err(e) => {
                tracing::warn!(error = %e, code = e.code(), why, "registry write failed; will retry");
                self.metrics.registry_errors.get_or_create(&code_label(e.code())).inc();
                self.dirty = true;
                self.set_status(|s| s.registry_error = Some(format!("{}: {e}", e.code())));
            }
        }
        self.publish();
    }

    /// A full registration, then what a registration does not carry over: Consul keeps an
    /// existing check's status and maintenance across a re-register, so both are set
    /// explicitly when they changed (or are unknown, on the first registration of this run).
    async fn register(
        &self,
        registry: &dyn Registry,
        want: &Registration,
    ) -> Result<(), crate::registry::RegistryError> {
        let have = self.written.as_ref();
        registry.register(want).await?;
        if registry.register_sets_state() {
            return Ok(());
        }
        if have.is_none_or(|h| h.maintenance != want.maintenance) {
            registry.set_maintenance(want).await?;
            self.count_write("maintenance");
        }
        if have.is_none_or(|h| h.healthy != want.healthy) {
            registry.set_health(want).await?;
            self.count_write("health");
        }
        Ok(())
    }

    fn count_write(&self, op: &'static str) {
        self.metrics.registry_writes.get_or_create(&op_label(op)).inc();
    }

    async fn keep_ttl(&mut self) {
        // Consul's TTL check needs a pass within every TTL; etcd's lease has its own keep-alive.
        if self.config.registry.kind != RegistryKind::Consul {
            return;
        }
        let (Some(registry), Some(have)) = (self.registry.clone(), self.written.clone()) else {
            return;
        };
        if let Err(e) = registry.set_health(&have).await {
            tracing::debug!(error = %e, "ttl check update failed");
            self.dirty = true;
        }
    }

    async fn anti_entropy(&mut self) {
        let (Some(registry), Some(have)) = (self.registry.clone(), self.written.clone()) else {
            return;
        };
        match registry.is_registered(&have).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(id = %have.id, "registration missing from the registry (agent restarted?): registering again");
                self.metrics
                    .registry_writes
                    .get_or_create(&op_label("anti-entropy"))
                    .inc();
                self.written = None;
                self.dirty = true;
                self.sync("anti-entropy").await;
            }
            Err(e) => tracing::debug!(error = %e, "anti-entropy check failed"),
        }
    }

    async fn refresh_identity(&mut self) {
        let Some(cmdb) = &self.cmdb else { return };
        let vm = crate::identity::vm_name(&self.config);
        match cmdb.identity(&vm).await {
            Ok(id) => {
                if let Some(old) = &self.identity {
                    let diff = old.diff(&id);
                    if !diff.is_empty() {
                        tracing::info!(vm = %vm, changes = %diff.join("; "), "identity changed in the CMDB: re-registering");
                    }
                }
                if let Err(e) = self.store.set_identity(&id) {
                    tracing::error!(error = %e, "cannot cache the identity");
                }
                self.metrics.identity_from_cache.set(0);
                self.identity = Some(id);
                self.set_status(|s| {
                    s.identity_source = "cmdb";
                    s.identity_error = None;
                });
            }
            Err(e) => {
                self.metrics.cmdb_errors.get_or_create(&code_label(e.code())).inc();
                if matches!(e, vmesh_cmdb::CmdbError::Decommissioned { .. }) {
                    // An explicit answer, not an outage: nothing is advertised (the sync below
                    // withdraws a registration) and the cache may not bring it back. The proxy
                    // keeps serving: callers that still hold the address do not fail.
                    if self.identity.take().is_some() {
                        tracing::error!(error = %e, code = e.code(),
                            "the CMDB marks this VM decommissioned: withdrawing the registration");
                    } else {
                        tracing::error!(error = %e, code = e.code(),
                            "the CMDB marks this VM decommissioned: refusing to register (the cached identity is not used)");
                    }
                    if let Err(e) = self.store.clear_identity() {
                        tracing::error!(error = %e, "cannot forget the cached identity");
                    }
                    self.metrics.identity_from_cache.set(0);
                    self.set_status(|s| s.identity_source = "none");
                } else if self.identity.is_none() && !e.keeps_cache() {
                    tracing::error!(error = %e, code = e.code(),
                        "the CMDB says this VM must not serve: refusing to register (the cached identity is not used)");
                } else if self.identity.is_none() {
                    match self.store.identity() {
                        Ok(Some(cached)) => {
                            tracing::warn!(error = %e, code = e.code(), "CMDB failed at start: using the cached identity");
                            self.identity = Some(cached.identity);
                            self.metrics.identity_from_cache.set(1);
                            self.set_status(|s| s.identity_source = "cache");
                        }
                        _ => tracing::error!(error = %e, code = e.code(),
                            "CMDB failed and no identity is cached: refusing to register"),
                    }
                } else {
                    tracing::warn!(error = %e, code = e.code(), "CMDB refresh failed: keeping the current identity");
                }
                let why = if self.identity.is_none() {
                    format!("{}: {e}; no cached identity: not registering", e.code())
                } else {
                    format!("{}: {e}", e.code())
                };
                self.set_status(|s| s.identity_error = Some(why));
            }
        }
        self.sync("identity").await;
    }

    fn in_flight(&self) -> u64 {
        let routes = self.routes.load();
        routes.inbound.as_ref().map_or(0, |c| {
            c.endpoints.load().endpoints().iter().map(|e| e.stats.in_flight()).sum()
        })
    }

    async fn drain(&mut self) -> Result<(), String> {
        if self.drain == DrainPhase::Serving {
            self.store.set_drained(true).map_err(|e| format!("STORE_ERROR: {e}"))?;
            self.drain = DrainPhase::Draining;
            self.draining_since = Some(Instant::now());
            tracing::info!("drain requested: marking the instance down");
            self.sync("drain").await;
        }
        self.publish();
        Ok(())
    }

    fn drain_progress(&mut self) {
        if self.drain != DrainPhase::Draining {
            return;
        }
        let grace = self.config.agent.drain_grace.get();
        let since = *self.draining_since.get_or_insert_with(Instant::now);
        // Not drained while the registry may still send callers here (the write failed).
        if since.elapsed() >= grace && self.in_flight() == 0 && !self.dirty {
            tracing::info!("drained: no request in flight");
            self.drain = DrainPhase::Drained;
        }
    }

    async fn undrain(&mut self, timeout: Duration) -> Result<(), String> {
        if self.drain == DrainPhase::Serving {
            // Already serving (a re-run CD hook): keep the ramp where it is.
            return Ok(());
        }
        if let Some(h) = &self.health {
            let mut h = h.clone();
            // A check that ran after this request and passed itself: the last verdict may be
            // stale (an app killed a moment ago still counts as healthy until the threshold).
            let asked_at = h.borrow().checks;
            tokio::time::timeout(
                timeout,
                h.wait_for(|h| h.checks > asked_at && h.healthy && h.last_error.is_none()),
            )
            .await
            .map_err(|_| format!("APP_UNHEALTHY: the application did not pass its health check within {timeout:?}"))?
            .map_err(|_| "the health checker stopped".to_owned())?;
        }
        self.store.set_drained(false).map_err(|e| format!("STORE_ERROR: {e}"))?;
        self.drain = DrainPhase::Serving;
        self.draining_since = None;
        self.start_ramp();
        tracing::info!("undrain: serving again, slow start begins");
        self.dirty = true;
        self.sync("undrain").await;
        if self.registry.is_some() && self.identity.is_none() {
            let why = self.status().identity_error.unwrap_or_else(|| "no identity".into());
            return Err(format!("NOT_REGISTERED: no service identity: {why}"));
        }
        if self.dirty {
            let why = self
                .status()
                .registry_error
                .unwrap_or_else(|| "registration failed".into());
            return Err(format!("REGISTRY_WRITE_FAILED: {why} (the agent keeps retrying)"));
        }
        self.publish();
        Ok(())
    }

    /// Deregisters what this agent registered (no identity to advertise any more). A failure
    /// keeps the record and is retried by the next sync (every identity retry, at most 5 s).
    async fn withdraw(&mut self, registry: &dyn Registry) {
        let Some(have) = self.written.clone() else {
            self.dirty = false;
            return;
        };
        match self.deregister(registry, &have.service, &have.id).await {
            Ok(()) => {
                self.written = None;
                self.dirty = false;
                tracing::info!(id = %have.id, "deregistered: no identity to advertise");
                self.set_status(|s| s.registry_error = None);
            }
            Err(e) => {
                tracing::warn!(id = %have.id, error = %e, "deregistration failed: retrying");
                self.set_status(|s| s.registry_error = Some(format!("deregister: {e}")));
            }
        }
        self.publish();
    }

    async fn shutdown(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let Some(registry) = self.registry.clone() else { return };
        let Some(have) = self.written.clone() else { return };
        if self.drain == DrainPhase::Serving {
            self.drain = DrainPhase::Draining;
            self.sync("shutdown").await;
            let grace = self.config.agent.drain_grace.get().min(timeout / 2);
            tracing::info!(?grace, "shutdown: instance marked down; waiting for callers to notice");
            tokio::time::sleep(grace).await;
        }
        while self.in_flight() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        match self.deregister(registry.as_ref(), &have.service, &have.id).await {
            Ok(()) => tracing::info!(id = %have.id, "deregistered"),
            Err(e) => tracing::warn!(error = %e, "deregistration failed at shutdown"),
        }
    }

    /// Removes instance `id` and the store's record of it.
    async fn deregister(&self, registry: &dyn Registry, service: &str, id: &str) -> Result<(), RegistryError> {
        registry.deregister(service, id).await?;
        self.count_write("deregister");
        if let Err(e) = self.store.set_registration(None) {
            tracing::error!(error = %e, "cannot delete the registration record");
        }
        Ok(())
    }

    fn set_status(&self, f: impl FnOnce(&mut LifecycleStatus)) {
        if let Ok(mut s) = self.status.lock() {
            f(&mut s);
        }
    }

    fn status(&self) -> LifecycleStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn publish(&self) {
        let advertised = self.written.as_ref().map_or(0, |w| w.weight);
        let target = self.identity.as_ref().map_or(100, |i| i.weight);
        let effective = match (self.ramp_shape(), self.ramp_elapsed()) {
            (Some(shape), Some(e)) => ramp::scale(shape.weight_at(e), target),
            _ => target,
        };
        self.metrics.weight.set(i64::from(advertised));
        self.metrics.registered.set(i64::from(self.written.is_some()));
        let in_flight = self.in_flight();
        self.set_status(|s| {
            s.identity = self.identity.clone();
            s.registered = self.written.is_some();
            s.registration_id = self.written.as_ref().map(|w| w.id.clone());
            s.weight = advertised;
            s.effective_weight = effective;
            s.ramp = self.ramp;
            s.drain = self.drain;
            s.app = self.health.as_ref().map(|h| h.borrow().clone());
            s.in_flight = in_flight;
        });
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn op_label(op: &'static str) -> crate::telemetry::metrics::OpLabels {
    crate::telemetry::metrics::OpLabels { op }
}

fn code_label(code: &'static str) -> crate::telemetry::metrics::CodeLabels {
    crate::telemetry::metrics::CodeLabels { code }
}
