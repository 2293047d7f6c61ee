//! The registrar: one task keeps the registry in line with what this instance should advertise
//! (the identity from `identity::IdentityKeeper`, the app's health, the ramp from
//! `ramp::RampBook`, the drain state from `drain::DrainState`), with the smallest write
//! `plan::write` finds; it steps the ramp, runs anti-entropy, and keeps the state in the store
//! across restarts. The admin API and signals talk to it through [`Handle`].
//!
//! Nothing here waits long inside the task: every registry call has a deadline
//! ([`CALL_DEADLINE`]), Consul's TTL passes run on their own task, and `undrain`'s wait for a
//! fresh health check runs in the caller's task ([`Handle::undrain`]).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};
use vmesh_cmdb::{Cmdb, ServiceIdentity};

pub use super::drain::DrainPhase;
use super::drain::DrainState;
use super::error::LifecycleError;
use super::health::Health;
use super::plan::{self, Write};
use crate::config::{Config, RegistryKind};
use crate::identity::IdentityKeeper;
use crate::ramp::RampBook;
use crate::registry::{Registration, Registry, RegistryError};
use crate::route::RouteTable;
use crate::store::{unix_now, RampRecord, RegistrationRecord, State};
use crate::telemetry::metrics::{CodeLabels, OpLabels};
use crate::telemetry::Metrics;

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
    /// Why the state store cannot be read (`STORE_ERROR: ...`): the instance counts as drained
    /// and is not registered until it can; `None` when it is fine.
    pub store_error: Option<String>,
}

enum Command {
    Drain(oneshot::Sender<Result<(), LifecycleError>>),
    Undrain(oneshot::Sender<Result<(), LifecycleError>>),
    /// SIGTERM: mark down, wait for callers and in-flight requests, deregister.
    /// SIGTERM, first half: mark the instance down and wait the grace.
    Shutdown(Duration, oneshot::Sender<()>),
    /// SIGTERM, second half (connections closed): deregister within the time given; the
    /// registrar ends.
    Deregister(Duration, oneshot::Sender<()>),
}

/// The admin side of the registrar.
#[derive(Clone)]
pub struct Handle {
    tx: mpsc::Sender<Command>,
    pub status: Arc<Mutex<LifecycleStatus>>,
    health: Option<watch::Receiver<Health>>,
}

impl Handle {
    pub fn status(&self) -> LifecycleStatus {
        self.status.lock().map(|s| s.clone()).unwrap_or_default()
    }

    async fn call(
        &self,
        make: impl FnOnce(oneshot::Sender<Result<(), LifecycleError>>) -> Command,
    ) -> Result<(), LifecycleError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| LifecycleError::Stopped("registrar"))?;
        rx.await.map_err(|_| LifecycleError::Stopped("registrar"))?
    }

    /// `vmesh drain`: the drain flag is stored and the registry told before this returns.
    pub async fn drain(&self) -> Result<(), LifecycleError> {
        self.call(Command::Drain).await
    }

    /// `vmesh undrain`: waits (here, not in the registrar's task) for a health check that ran
    /// after the request and passed, at most `timeout`, then serves again with a new ramp.
    /// An instance serving already keeps its ramp.
    pub async fn undrain(&self, timeout: Duration) -> Result<(), LifecycleError> {
        if self.status().drain == DrainPhase::Serving {
            return Ok(());
        }
        if let Some(h) = &self.health {
            let mut h = h.clone();
            // The last verdict may be stale: an app killed a moment ago still counts as
            // healthy until the threshold.
            let asked_at = h.borrow().checks;
            tokio::time::timeout(
                timeout,
                h.wait_for(|h| h.checks > asked_at && h.healthy && h.last_error.is_none()),
            )
            .await
            .map_err(|_| LifecycleError::AppUnhealthy(timeout))?
            .map_err(|_| LifecycleError::Stopped("health checker"))?;
        }
        self.call(Command::Undrain).await
    }

    /// SIGTERM, first half: marks a serving instance down and waits `agent.drain_grace`
    /// (at most half of `timeout`) for callers to notice. The listeners keep serving.
    pub async fn shutdown(&self, timeout: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Shutdown(timeout, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }

    /// SIGTERM, second half, once the connections are closed: deregisters the instance
    /// (waiting at most `left`); the registrar ends.
    pub async fn deregister_at_exit(&self, left: Duration) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Command::Deregister(left, tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// The longest any one registry call (or the calls of one write) may take before the registrar
/// gives up on it and retries later: a hung registry cannot stop ramp steps, drains or shutdown.
pub const CALL_DEADLINE: Duration = Duration::from_secs(15);

/// Retry period of failed registry writes and of a CMDB that has not answered yet.
const RETRY: Duration = Duration::from_secs(2);

pub struct Registrar {
    config: Arc<Config>,
    identity: IdentityKeeper,
    registry: Option<Arc<dyn Registry>>,
    store: State,
    routes: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
    health: Option<watch::Receiver<Health>>,
    status: Arc<Mutex<LifecycleStatus>>,
    /// What the registry holds now, as far as we know (shared with the TTL task).
    written: watch::Sender<Option<Registration>>,
    /// The registry must be brought in line with `desired()` (a write failed or is due).
    dirty: bool,
    /// Set by the TTL task when a pass failed: the registry may have lost the instance.
    ttl_failed: Arc<AtomicBool>,
    ramp: RampBook,
    drain: DrainState,
    /// Registry writes wait until start-up has read the store and the first health check.
    started: bool,
    /// The app's health at the last check (None before the first).
    last_healthy: Option<bool>,
    /// The drain flag could not be read: counted as drained, nothing registered, the store
    /// asked again every [`RETRY`] until it answers.
    store_blocked: Option<String>,
}

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
        let (written, _) = watch::channel(None);
        let r = Self {
            identity: IdentityKeeper::new(cmdb, crate::identity::vm_name(&config)),
            ramp: RampBook::new(config.inbound.as_ref(), None),
            config,
            registry,
            store,
            routes,
            metrics,
            health: health.clone(),
            status: status.clone(),
            written,
            dirty: true,
            ttl_failed: Arc::new(AtomicBool::new(false)),
            drain: DrainState::default(),
            started: false,
            last_healthy: None,
            store_blocked: None,
        };
        tokio::spawn(r.run(rx, ready));
        Handle { tx, status, health }
    }

    async fn run(mut self, mut rx: mpsc::Receiver<Command>, ready: oneshot::Sender<()>) {
        self.start().await;
        let _ = ready.send(());
        self.spawn_ttl_passes();
        let mut refresh = tokio::time::interval_at(
            tokio::time::Instant::now() + self.refresh_period(),
            self.config.cmdb.refresh.get(),
        );
        let mut anti_entropy = tokio::time::interval(self.config.registry.anti_entropy.get());
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let mut retry_at = tokio::time::Instant::now() + RETRY;
        let mut store_retry_at = tokio::time::Instant::now() + RETRY;
        loop {
            let next_step = self
                .ramp
                .next_step_in(unix_now())
                .map(|wait| tokio::time::Instant::now() + wait + Duration::from_millis(50));
            let health_changed = async {
                match self.health.as_mut() {
                    Some(h) => h.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                cmd = rx.recv() => match cmd {
                    Some(Command::Drain(reply)) => { let _ = reply.send(self.drain().await); }
                    Some(Command::Undrain(reply)) => { let _ = reply.send(self.undrain().await); }
                    Some(Command::Shutdown(timeout, reply)) => { self.shutdown(timeout).await; let _ = reply.send(()); }
                    Some(Command::Deregister(left, reply)) => { self.deregister_at_exit(left).await; let _ = reply.send(()); return; }
                    None => return,
                },
                changed = health_changed => {
                    if changed {
                        self.on_health().await;
                    }
                }
                () = sleep_until(next_step) => {
                    tracing::info!(weight = self.ramp.advertised(unix_now()), "slow start: next weight step");
                    self.dirty = true;
                    self.sync("ramp").await;
                }
                _ = refresh.tick() => {
                    self.refresh_identity().await;
                    if self.identity.current().is_none() {
                        refresh.reset_after(self.refresh_period());
                    }
                }
                _ = anti_entropy.tick() => self.anti_entropy().await,
                _ = tick.tick() => {
                    if self.store_blocked.is_some() && tokio::time::Instant::now() >= store_retry_at {
                        self.read_store().await;
                        store_retry_at = tokio::time::Instant::now() + RETRY;
                    }
                    self.drain_progress();
                    if self.ttl_failed.swap(false, Ordering::Relaxed) {
                        self.dirty = true;
                    }
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
        if self.identity.current().is_some() {
            refresh
        } else {
            refresh.min(Duration::from_secs(5))
        }
    }

    /// Reads the drain flag and the ramp record. An unreadable drain flag counts as drained
    /// (and blocks registration) until the store answers: a drained instance must never be
    /// registered as serving because its flag could not be read.
    fn read_drain_state(&mut self) -> bool {
        match self.store.drained() {
            Ok(drained) => {
                if drained {
                    tracing::info!("drain flag set in the store: staying drained (run `vmesh undrain` to serve)");
                }
                self.drain = DrainState::from_flag(drained);
                if self.store_blocked.take().is_some() {
                    tracing::info!(drained, "state store readable again");
                }
            }
            Err(e) => {
                if self.store_blocked.is_none() {
                    tracing::error!(error = %e, code = e.code(),
                        "cannot read the drain flag: counting the instance as drained and not registering until the store answers");
                }
                self.drain = DrainState::from_flag(true);
                self.store_blocked = Some(format!("{}: {e}", e.code()));
                return false;
            }
        }
        match self.store.ramp() {
            Ok(Some(rec)) => self.ramp.set(rec),
            Ok(None) => {}
            Err(e) => tracing::error!(error = %e, code = e.code(), "cannot read the ramp record"),
        }
        true
    }

    /// The store answered again after failing at start: take its state and register.
    async fn read_store(&mut self) {
        if self.read_drain_state() {
            self.dirty = true;
            self.on_health().await;
        }
        self.publish();
    }

    /// Start-up: identity, stored state, then the first registration.
    async fn start(&mut self) {
        self.read_drain_state();
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
        let found = match bounded(registry.recover(&want.id)).await {
            Ok(Some(found)) => found,
            Ok(None) => return,
            Err(e) => {
                tracing::warn!(id = %want.id, error = %e, "cannot read this instance's state from the registry");
                return;
            }
        };
        tracing::warn!(id = %want.id, maintenance = found.maintenance, ramp = ?found.ramp,
            "the store has no registration record but the registry has this instance: taking its state from the registry");
        if found.maintenance && self.drain.phase() == DrainPhase::Serving {
            tracing::warn!(
                "the registry shows the instance in maintenance: staying drained (run `vmesh undrain` to serve)"
            );
            if let Err(e) = self.store.set_drained(true) {
                tracing::error!(error = %e, code = e.code(), "cannot store the drain flag");
            }
            self.drain.adopt_drained();
        }
        // A ramp from the registry is data from the network: an implausible one (a start far
        // in the future, a window over a day) is not adopted, so it cannot reach the store.
        let found_ramp = found.ramp.map(|(start, window_secs)| RampRecord { start, window_secs });
        if let (Some(rec), None) = (found_ramp.filter(|r| r.plausible_at(unix_now())), self.ramp.record()) {
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
            tracing::error!(error = %e, code = e.code(), "cannot store the registration record");
        }
    }

    fn app_healthy(&self) -> bool {
        self.health.as_ref().is_none_or(|h| h.borrow().healthy)
    }

    async fn on_health(&mut self) {
        let healthy = self.app_healthy();
        let recovered = healthy && self.last_healthy == Some(false);
        // A new ramp for a new instance, and for an app that comes back cold after a failure.
        if healthy
            && (self.ramp.record().is_none() || recovered)
            && !self.drain.out_of_traffic()
            && self.identity.current().is_some()
        {
            self.start_ramp();
        }
        if self.health.as_ref().is_some_and(|h| h.borrow().checks > 0) {
            self.last_healthy = Some(healthy);
        }
        self.sync("health").await;
    }

    fn start_ramp(&mut self) {
        if let Some(rec) = self.ramp.begin(unix_now()) {
            tracing::info!(window_secs = rec.window_secs, "slow start: ramp begins at weight 1");
            self.store_ramp(rec);
        }
    }

    fn set_ramp(&mut self, rec: RampRecord) {
        self.ramp.set(rec);
        self.store_ramp(rec);
    }

    fn store_ramp(&self, rec: RampRecord) {
        if let Err(e) = self.store.set_ramp(Some(rec)) {
            tracing::error!(error = %e, code = e.code(), "cannot store the ramp start");
        }
    }

    /// The registration the registry should hold now, if any.
    fn desired(&self) -> Option<Registration> {
        self.registry.as_ref()?;
        if self.store_blocked.is_some() {
            return None;
        }
        let now = plan::Now {
            unix: unix_now(),
            healthy: self.app_healthy(),
            maintenance: self.drain.out_of_traffic(),
        };
        plan::desired(&self.config, self.identity.current()?, &self.ramp, now)
    }

    /// With certificates from Consul Connect and an inbound in a TLS mode, until the first
    /// leaf is in force.
    fn awaiting_certificate(&self) -> bool {
        self.config.tls.source == crate::tls::TlsSource::Consul
            && self
                .config
                .inbound
                .as_ref()
                .is_some_and(|i| i.mode != crate::tls::TlsMode::Plaintext)
            && crate::tls::current().is_none()
    }

    fn written(&self) -> Option<Registration> {
        self.written.borrow().clone()
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
        if self.awaiting_certificate() {
            // Callers in mutual TLS would find no certificate: wait (retried every RETRY)
            // rather than advertise an instance that cannot complete a handshake.
            self.dirty = true;
            return;
        }
        let Some(want) = self.desired() else {
            // Nothing to advertise (no identity): remove what an earlier identity registered.
            self.withdraw(registry.as_ref()).await;
            return;
        };
        let have = self.written();
        let Some(op) = plan::write(have.as_ref(), &want, self.dirty) else {
            return;
        };
        if let Some(have) = &have {
            if have.id != want.id {
                tracing::info!(old = %have.id, new = %want.id, "identity changed: replacing the registration");
                if bounded(registry.deregister(&have.service, &have.id)).await.is_ok() {
                    self.count_write("deregister");
                }
            }
        }
        // Recorded before the write: a crash right after it must still know what to clean up.
        self.record_registration(registry.as_ref(), &want);
        let result = match op {
            Write::Health => bounded(registry.set_health(&want)).await,
            Write::Maintenance => bounded(registry.set_maintenance(&want)).await,
            Write::Register => bounded(self.register(registry.as_ref(), &want)).await,
        };
        match result {
            Ok(()) => {
                self.count_write(op.label());
                tracing::info!(id = %want.id, why, op = op.label(), weight = want.weight, healthy = want.healthy,
                    maintenance = want.maintenance, "registry updated");
                self.written.send_replace(Some(want));
                self.dirty = false;
                self.set_status(|s| s.registry_error = None);
            }
            Err(e) => {
                tracing::warn!(error = %e, code = e.code(), why, "registry write failed; will retry");
                self.metrics
                    .registry_errors
                    .get_or_create(&CodeLabels { code: e.code() })
                    .inc();
                self.dirty = true;
                self.set_status(|s| s.registry_error = Some(format!("{}: {e}", e.code())));
            }
        }
        self.publish();
    }

    /// A full registration, then what a registration does not carry over: Consul keeps an
    /// existing check's status and maintenance across a re-register, so both are set
    /// explicitly when they changed (or are unknown, on the first registration of this run).
    async fn register(&self, registry: &dyn Registry, want: &Registration) -> Result<(), RegistryError> {
        let have = self.written();
        registry.register(want).await?;
        if registry.register_sets_state() {
            return Ok(());
        }
        if have.as_ref().is_none_or(|h| h.maintenance != want.maintenance) {
            registry.set_maintenance(want).await?;
            self.count_write("maintenance");
        }
        if have.as_ref().is_none_or(|h| h.healthy != want.healthy) {
            registry.set_health(want).await?;
            self.count_write("health");
        }
        Ok(())
    }

    fn count_write(&self, op: &'static str) {
        self.metrics.registry_writes.get_or_create(&OpLabels { op }).inc();
    }

    /// Consul's TTL check needs a pass within every TTL (etcd's lease has its own keep-alive):
    /// on a task of its own, so a slow registry write or a long command never lets the check
    /// go critical. It passes what the registrar last wrote; a failed pass makes the registrar
    /// write the registration again.
    fn spawn_ttl_passes(&self) {
        let Some(registry) = self.registry.clone() else { return };
        if self.config.registry.kind != RegistryKind::Consul {
            return;
        }
        let every = (self.config.registry.check_ttl.get() / 3).max(Duration::from_millis(500));
        let written = self.written.subscribe();
        let failed = self.ttl_failed.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if written.has_changed().is_err() {
                    return; // the registrar has stopped
                }
                let Some(have) = written.borrow().clone() else { continue };
                if let Err(e) = bounded(registry.set_health(&have)).await {
                    tracing::debug!(error = %e, "ttl check update failed");
                    failed.store(true, Ordering::Relaxed);
                }
            }
        });
    }

    async fn anti_entropy(&mut self) {
        let (Some(registry), Some(have)) = (self.registry.clone(), self.written()) else {
            return;
        };
        match bounded(registry.is_registered(&have)).await {
            Ok(true) => {}
            Ok(false) => {
                tracing::warn!(id = %have.id, "registration missing from the registry (agent restarted?): registering again");
                self.metrics
                    .registry_writes
                    .get_or_create(&OpLabels { op: "anti-entropy" })
                    .inc();
                self.written.send_replace(None);
                self.dirty = true;
                self.sync("anti-entropy").await;
            }
            Err(e) => tracing::debug!(error = %e, "anti-entropy check failed"),
        }
    }

    async fn refresh_identity(&mut self) {
        if self.identity.refresh(&self.store, &self.metrics).await {
            self.publish();
            self.sync("identity").await;
        }
    }

    fn in_flight(&self) -> u64 {
        let routes = self.routes.load();
        routes.inbound.as_ref().map_or(0, |c| {
            c.endpoints.load().endpoints().iter().map(|e| e.stats.in_flight()).sum()
        })
    }

    async fn drain(&mut self) -> Result<(), LifecycleError> {
        if self.drain.phase() == DrainPhase::Serving {
            // Stored first: a crash after this point restarts drained.
            self.store.set_drained(true)?;
            self.drain.drain(Instant::now());
            tracing::info!("drain requested: marking the instance down");
            self.sync("drain").await;
        }
        self.publish();
        Ok(())
    }

    fn drain_progress(&mut self) {
        if self.drain.phase() != DrainPhase::Draining {
            return;
        }
        let grace = self.config.agent.drain_grace.get();
        // Not drained while the registry may still send callers here (the write failed).
        if self.drain.progress(Instant::now(), grace, self.in_flight(), self.dirty) {
            tracing::info!("drained: no request in flight");
        }
    }

    /// Serves again once [`Handle::undrain`] saw the app healthy: clears the stored flag, starts
    /// a new ramp and registers.
    async fn undrain(&mut self) -> Result<(), LifecycleError> {
        if self.drain.phase() == DrainPhase::Serving {
            // Already serving (a re-run CD hook): keep the ramp where it is.
            return Ok(());
        }
        self.store.set_drained(false)?;
        self.drain.undrain();
        self.start_ramp();
        tracing::info!("undrain: serving again, slow start begins");
        self.dirty = true;
        self.sync("undrain").await;
        self.publish();
        if self.registry.is_some() && self.identity.current().is_none() {
            let why = self.identity.error().unwrap_or("no identity").to_owned();
            return Err(LifecycleError::NotRegistered(why));
        }
        if self.dirty {
            let why = self
                .status()
                .registry_error
                .unwrap_or_else(|| "registration failed".into());
            return Err(LifecycleError::RegistryWriteFailed(why));
        }
        Ok(())
    }

    /// Deregisters what this agent registered (no identity to advertise any more). A failure
    /// keeps the record and is retried by the next sync (every identity retry, at most 5 s).
    async fn withdraw(&mut self, registry: &dyn Registry) {
        let Some(have) = self.written() else {
            self.dirty = false;
            return;
        };
        match self.deregister(registry, &have.service, &have.id).await {
            Ok(()) => {
                self.written.send_replace(None);
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

    /// SIGTERM, first half: marks the instance down and gives callers the grace to notice
    /// (at most half of `timeout`). Requests still arriving are served meanwhile; the agent
    /// then stops accepting and lets its connections finish before [`Self::deregister_at_exit`].
    async fn shutdown(&mut self, timeout: Duration) {
        if self.registry.is_none() || self.written().is_none() {
            return;
        }
        if self.drain.shutdown(Instant::now()) {
            self.sync("shutdown").await;
            let grace = self.config.agent.drain_grace.get().min(timeout / 2);
            tracing::info!(?grace, "shutdown: instance marked down; waiting for callers to notice");
            tokio::time::sleep(grace).await;
        }
    }

    /// SIGTERM, second half: deregisters within `left`.
    async fn deregister_at_exit(&mut self, left: Duration) {
        let Some(registry) = self.registry.clone() else { return };
        let Some(have) = self.written() else { return };
        let deregister = self.deregister(registry.as_ref(), &have.service, &have.id);
        match tokio::time::timeout(left, deregister).await {
            Ok(Ok(())) => tracing::info!(id = %have.id, "deregistered"),
            Ok(Err(e)) => tracing::warn!(error = %e, code = e.code(), "deregistration failed at shutdown"),
            Err(_) => tracing::warn!(?left, "deregistration at shutdown got no answer in time"),
        }
    }

    /// Removes instance `id` and the store's record of it.
    async fn deregister(&self, registry: &dyn Registry, service: &str, id: &str) -> Result<(), RegistryError> {
        bounded(registry.deregister(service, id)).await?;
        self.count_write("deregister");
        if let Err(e) = self.store.set_registration(None) {
            tracing::error!(error = %e, code = e.code(), "cannot delete the registration record");
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
        let written = self.written.borrow();
        let advertised = written.as_ref().map_or(0, |w| w.weight);
        let target = self.identity.current().map_or(100, |i| i.weight);
        let effective = self.ramp.effective(unix_now(), target);
        self.metrics.weight.set(i64::from(advertised));
        self.metrics.registered.set(i64::from(written.is_some()));
        let in_flight = self.in_flight();
        self.set_status(|s| {
            s.identity = self.identity.current().cloned();
            s.identity_source = self.identity.source().as_str();
            s.identity_error = self.identity.error().map(str::to_owned);
            s.registered = written.is_some();
            s.registration_id = written.as_ref().map(|w| w.id.clone());
            s.weight = advertised;
            s.effective_weight = effective;
            s.ramp = self.ramp.record();
            s.drain = self.drain.phase();
            s.app = self.health.as_ref().map(|h| h.borrow().clone());
            s.in_flight = in_flight;
            s.store_error = self.store_blocked.clone();
        });
    }
}

/// A registry call cut at [`CALL_DEADLINE`].
async fn bounded<T>(call: impl std::future::Future<Output = Result<T, RegistryError>>) -> Result<T, RegistryError> {
    tokio::time::timeout(CALL_DEADLINE, call).await.unwrap_or_else(|_| {
        Err(RegistryError::Unreachable(format!(
            "no answer within {CALL_DEADLINE:?}"
        )))
    })
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
