//! The composition root: puts the agent together from its parts and runs it. Opens the store,
//! builds the one registry client, starts the registrar, discovery, telemetry and the admin API,
//! binds the listeners (start-up and SIGHUP reload share `Runtime::prepare` then `commit`: a bad
//! config keeps the old one serving), and drains on SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use crate::admin::{self, AgentState, ReloadStatus};
use crate::config::{self, Config, Source};
use crate::discovery::{self, Discovery};
use crate::lifecycle::health;
use crate::lifecycle::registrar::{Handle, Registrar};
use crate::lifecycle::signals::{self, Event};
use crate::proxy::activation::Inherited;
use crate::proxy::listener::{take_or_bind, Running};
use crate::proxy::{Drain, DrainWatch, ListenerSpec, Shared};
use crate::registry::RegistryClient;
use crate::route::RouteTable;
use crate::store::{Reopening, State};
use crate::telemetry::{AccessLog, Metrics};

struct Runtime {
    state: Arc<AgentState>,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    listeners: Vec<Running>,
    drain_watch: DrainWatch,
    /// Sockets passed by systemd that no listener claimed yet (a reload may add one).
    inherited: Inherited,
}

/// Runs the agent until SIGTERM/SIGINT, then drains and returns.
pub async fn run(source: Source, config: Config, mut inherited: Inherited) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    // Host pressure for the access log, /metrics and /doctor, once a second.
    crate::telemetry::host::spawn_sampler(metrics.clone());
    let access_log = AccessLog::start(
        &config.telemetry.access_log,
        config.telemetry.access_log_buffer,
        metrics.access_log_dropped.clone(),
    )
    .with_context(|| format!("telemetry.access_log: cannot open {:?}", config.telemetry.access_log))?;
    // Certificates before listeners: a TLS listener must not accept without them.
    // One statement each: a family's guard lives to the end of its statement, and a second
    // `get_or_create` in the same one would wait for it forever.
    let ok = metrics.tls_reloads.get_or_create(&result_label("ok")).clone();
    let failed = metrics.tls_reloads.get_or_create(&result_label("failed")).clone();
    // With `tls.source = "consul"` the certificate comes later (`follow_connect`, below).
    let tls = crate::tls::start(&config.tls, crate::tls::ReloadCounters { ok, failed })
        .with_context(|| format!("{}: [tls] cannot be used", crate::tls::TLS_MATERIAL_INVALID))?;
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::build(&config, None, &metrics)));
    let (drain, drain_watch) = Drain::new();
    let shared = Arc::new(Shared::new(
        routes.clone(),
        metrics.clone(),
        access_log,
        config.proxy.clone(),
    ));

    // Bind everything first: a port in use fails the start, before anything is registered.
    let admin_listener = take_or_bind(&mut inherited, config.agent.admin_listen)
        .with_context(|| format!("agent.admin_listen: cannot bind {}", config.agent.admin_listen))?;
    let admin_socket = match &config.agent.admin_socket {
        Some(path) => Some(
            admin::bind_unix(path).with_context(|| format!("agent.admin_socket: cannot bind {}", path.display()))?,
        ),
        None => None,
    };
    let prepared = prepare(config.clone(), None, &[], &mut inherited).map_err(anyhow::Error::msg)?;
    inherited.release_unclaimed_stored();
    if !inherited.is_empty() {
        tracing::warn!(unclaimed = ?inherited.unclaimed(), "systemd passed sockets that no listener of the config uses (kept for a reload)");
    }

    let registry = RegistryClient::from_config(&config).map_err(anyhow::Error::msg)?;
    let lifecycle = start_lifecycle(&config, &source.env, registry.as_ref(), &routes, &metrics)?;
    let service_of = lifecycle.handle.status.clone();
    let service: crate::telemetry::trace::ServiceFn = Arc::new(move || {
        service_of
            .lock()
            .ok()
            .and_then(|s| s.identity.as_ref().map(|i| i.service.clone()))
    });
    // Connect's leaf is the identity's service's: fetched once the registrar knows it.
    tls.follow_connect(registry.as_ref(), service.clone(), config.registry.watch_wait.get());
    crate::telemetry::trace::start(&config.tracing, &config.node_name(), &metrics, service)?;
    let zone_of = lifecycle.handle.status.clone();
    let zone: discovery::ZoneFn = Arc::new(move || {
        zone_of
            .lock()
            .ok()
            .and_then(|s| s.identity.as_ref().map(|i| i.zone.clone()))
    });
    let discovery = Discovery::start(
        &config,
        registry.as_ref(),
        &routes,
        &metrics,
        Some(lifecycle.store.clone()),
        zone,
    )
    .map_err(anyhow::Error::msg)?;
    let state = Arc::new(AgentState {
        source,
        config: ArcSwap::from_pointee(config.clone()),
        routes: routes.clone(),
        metrics: metrics.clone(),
        reload: Mutex::new(ReloadStatus::default()),
        draining: AtomicBool::new(false),
        started: Instant::now(),
        listeners: Mutex::new(Vec::new()),
        lifecycle: lifecycle.handle.clone(),
        discovery,
        rebuild: Mutex::new(()),
    });
    spawn_central_policy_watch(state.clone());
    spawn_governance_ticks(state.clone(), shared.clone());
    let mut rt = Runtime {
        state: state.clone(),
        builder: Arc::new(crate::proxy::http_builder(&config.proxy)),
        shared,
        listeners: Vec::new(),
        drain_watch,
        inherited,
    };
    rt.commit(prepared);
    let mut events = signals::spawn().context("cannot install signal handlers")?;
    tokio::spawn(admin::serve(admin_listener, state.clone(), config.agent.admin_tls));
    if let Some(unix) = admin_socket {
        tokio::spawn(admin::serve_unix(
            unix,
            state.clone(),
            config.agent.admin_socket_uids.clone(),
        ));
    }
    // READY=1 once the first registration was attempted (systemd Type=notify).
    let _ = lifecycle.ready.await;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Ready]);
    spawn_watchdog();
    tracing::info!(node = %config.node_name(), admin = %config.agent.admin_listen, "vmesh started");

    while let Some(ev) = events.recv().await {
        match ev {
            Event::Reload => {
                crate::tls::reload_now();
                rt.reload();
            }
            Event::Shutdown => break,
        }
    }

    // Drain: mark the instance down and let callers notice (requests still arriving are
    // served, HTTP/1.1 answers carry `Connection: close`), stop accepting (with systemd's
    // socket the next run takes the backlog), let every connection finish its requests, then
    // deregister; all within the drain timeout, with a second kept for the deregistration.
    // Waiting for "no request in flight" while still accepting would never end under steady
    // load from clients that do not read the registry.
    let timeout = state.config.load().agent.drain_timeout.get();
    let deadline = tokio::time::Instant::now() + timeout;
    let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Stopping]);
    state.draining.store(true, Ordering::SeqCst);
    rt.shared.draining.store(true, Ordering::SeqCst);
    tracing::info!(?timeout, "shutting down: draining");
    state.lifecycle.shutdown(timeout).await;
    for l in rt.listeners.drain(..) {
        l.stop();
    }
    drop(rt.drain_watch);
    let holders = drain.holders();
    let connections_deadline = deadline - DEREGISTER_RESERVE.min(timeout / 2);
    match tokio::time::timeout_at(connections_deadline, drain.drain()).await {
        Ok(()) => tracing::info!("drained: all connections closed"),
        Err(_) => tracing::warn!(
            ?timeout,
            connections_at_start = holders,
            "drain timeout: closing remaining connections"
        ),
    }
    let left = deadline
        .saturating_duration_since(tokio::time::Instant::now())
        .max(DEREGISTER_RESERVE);
    state.lifecycle.deregister_at_exit(left).await;
    Ok(())
}

/// The part of `agent.drain_timeout` kept for the deregistration at shutdown (and its least
/// time, when closing the connections used up the rest).
const DEREGISTER_RESERVE: std::time::Duration = std::time::Duration::from_secs(1);

struct Lifecycle {
    handle: Handle,
    ready: tokio::sync::oneshot::Receiver<()>,
    /// The state store, shared with discovery.
    store: Arc<dyn crate::store::Store>,
}

/// The store, CMDB, registry, health checker and registrar.
fn start_lifecycle(
    config: &Config,
    env: &std::collections::HashMap<String, String>,
    registry: Option<&RegistryClient>,
    routes: &Arc<ArcSwap<RouteTable>>,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<Lifecycle> {
    let store = Reopening::open(&config.agent.data_dir).with_context(|| {
        format!(
            "agent.data_dir: cannot open the state store in {}",
            config.agent.data_dir.display()
        )
    })?;
    let cmdb = crate::identity::cmdb(config, env).map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    let registry = registry.map(RegistryClient::as_registry);
    let store: Arc<dyn crate::store::Store> = Arc::new(store);
    let health = config.inbound.as_ref().map(|inb| {
        health::spawn(
            health::Check::from_config(inb),
            inb.health.interval.get(),
            inb.health.timeout.get(),
            inb.health.unhealthy_threshold,
        )
    });
    let (ready_tx, ready) = tokio::sync::oneshot::channel();
    let handle = Registrar::spawn(
        Arc::new(config.clone()),
        cmdb,
        registry,
        State::new(store.clone()),
        routes.clone(),
        metrics.clone(),
        health,
        ready_tx,
    );
    Ok(Lifecycle { handle, ready, store })
}

/// Applies central governance policies as they change (a refused one keeps the previous).
fn spawn_central_policy_watch(state: Arc<AgentState>) {
    let mut rx = state.discovery.governance_policies();
    tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            state.rebuild_routes();
            tracing::info!("central governance policies applied");
        }
    });
}

/// Once a second: publishes the identity's colour to the request path (it can change with a
/// CMDB refresh), runs outlier detection's statistical sweeps, and sets the breaker and
/// adaptive-limit gauges.
fn spawn_governance_ticks(state: Arc<AgentState>, shared: Arc<Shared>) {
    // Until the identity is known, look for it every 20 ms: a VM of a test lane must stamp
    // its colour on its first calls, not a second later.
    let early = state.clone();
    let early_shared = shared.clone();
    tokio::spawn(async move {
        let deadline = Instant::now() + std::time::Duration::from_secs(60);
        while Instant::now() < deadline {
            if publish_own_colour(&early, &early_shared) {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    });
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            publish_own_colour(&state, &shared);
            let now = Instant::now();
            let table = state.routes.load();
            for cluster in table.services.values().chain(table.inbound.iter()) {
                cluster.sweep_outliers(now);
                cluster.publish_gauges(&state.metrics, now);
            }
        }
    });
}

/// Publishes the identity's colour to the request path; returns whether an identity is known.
fn publish_own_colour(state: &AgentState, shared: &Shared) -> bool {
    let Some(colour) = state
        .lifecycle
        .status
        .lock()
        .ok()
        .and_then(|s| s.identity.as_ref().map(|i| i.colour.clone()))
    else {
        return false;
    };
    let colour = Some(colour)
        .filter(|c| !c.is_empty())
        .and_then(|c| http::HeaderValue::from_str(&c).ok());
    if shared.own_colour.load().as_deref() != colour.as_ref() {
        shared.own_colour.store(colour.map(Arc::new));
    }
    true
}

/// Pings systemd's watchdog at half its period when the unit asks for one: `WATCHDOG_USEC`
/// set and `WATCHDOG_PID`, when present, naming this process (sd_watchdog_enabled(3)).
fn spawn_watchdog() {
    let usec: u64 = std::env::var("WATCHDOG_USEC")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let for_us = std::env::var("WATCHDOG_PID")
        .ok()
        .and_then(|p| p.parse::<u32>().ok())
        .is_none_or(|p| p == std::process::id());
    if usec > 0 && for_us {
        let every = std::time::Duration::from_micros(usec / 2);
        tracing::info!(?every, "systemd watchdog enabled");
        tokio::spawn(async move {
            loop {
                let _ = sd_notify::notify(false, &[sd_notify::NotifyState::Watchdog]);
                tokio::time::sleep(every).await;
            }
        });
    }
}

impl Runtime {
    fn start(&mut self, spec: ListenerSpec, listener: tokio::net::TcpListener) {
        let running = Running::start(
            spec,
            listener,
            self.shared.clone(),
            self.builder.clone(),
            self.drain_watch.clone(),
        );
        self.listeners.push(running);
    }

    fn publish_listeners(&self) {
        let specs = self.listeners.iter().map(|l| l.spec.clone()).collect();
        if let Ok(mut l) = self.state.listeners.lock() {
            *l = specs;
        }
    }

    /// Reloads the config through the start-up path (`prepare`, then `commit`): the new one is
    /// validated in full and its new listeners bound before anything changes; any failure keeps
    /// the running config and records why.
    fn reload(&mut self) {
        let result = self.try_reload();
        let now = humantime::format_rfc3339_seconds(SystemTime::now()).to_string();
        let mut status = self.state.reload.lock().unwrap_or_else(|p| p.into_inner());
        status.last_reload_at = Some(now);
        match result {
            Ok(()) => {
                status.reloads += 1;
                status.last_reload_error = None;
                self.state
                    .metrics
                    .config_reloads
                    .get_or_create(&result_label("ok"))
                    .inc();
                tracing::info!("config reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload failed: keeping the running config");
                status.last_reload_error = Some(e);
                self.state
                    .metrics
                    .config_reloads
                    .get_or_create(&result_label("error"))
                    .inc();
            }
        }
    }

    fn try_reload(&mut self) -> Result<(), String> {
        let new = config::load(&self.state.source).map_err(|e| e.to_string())?;
        let old = self.state.config.load_full();
        let prepared = prepare(new, Some(&old), &self.listeners, &mut self.inherited)?;
        self.commit(prepared);
        Ok(())
    }

    /// Phase two of start-up and reload: puts a prepared config in force. Nothing here can
    /// fail: the routes are rebuilt (keeping the state of unchanged parts), discovery follows
    /// the outbound services, listeners are kept, retargeted, stopped or started.
    fn commit(&mut self, p: Prepared) {
        let Prepared {
            config,
            fresh,
            pending_restart,
        } = p;
        self.state.config.store(config.clone());
        self.state.rebuild_routes();
        self.state.discovery.reconcile(&config);
        let specs = ListenerSpec::from_config(&config);
        let mut kept = Vec::new();
        for mut running in std::mem::take(&mut self.listeners) {
            match specs.iter().find(|s| s.addr == running.spec.addr) {
                Some(s) if *s == running.spec => kept.push(running),
                Some(s) => {
                    running.retarget(s.clone());
                    kept.push(running);
                }
                None => running.remove(),
            }
        }
        self.listeners = kept;
        for (spec, l) in fresh {
            self.start(spec, l);
        }
        self.publish_listeners();
        if !pending_restart.is_empty() {
            tracing::warn!(
                keys = ?pending_restart,
                "changed settings are read at start-up only: the running values stay until the next restart"
            );
        }
        let mut status = self.state.reload.lock().unwrap_or_else(|p| p.into_inner());
        status.pending_restart = pending_restart.iter().map(|k| (*k).to_owned()).collect();
    }
}

/// A config ready to be put in force: settled against the running one (start-up-only keys
/// keep their running values) and with every listener it adds already bound.
struct Prepared {
    config: Arc<Config>,
    fresh: Vec<(ListenerSpec, tokio::net::TcpListener)>,
    /// Start-up-only keys the new config changed, kept at their running values.
    pending_restart: Vec<&'static str>,
}

/// Phase one of start-up (`previous = None`) and reload: everything that can fail happens
/// here, before anything changes. A refused reload, a port that cannot be bound, leave the
/// running config untouched; at start-up they stop the agent before it registers.
fn prepare(
    new: Config,
    previous: Option<&Config>,
    running: &[Running],
    inherited: &mut Inherited,
) -> Result<Prepared, String> {
    if let Some(why) = previous.and_then(|old| config::reload::refusal(old, &new)) {
        return Err(why);
    }
    let (config, pending_restart) = config::reload::settle(previous, new);
    let mut fresh = Vec::new();
    for spec in ListenerSpec::from_config(&config) {
        if !running.iter().any(|r| r.spec.addr == spec.addr) {
            let l = take_or_bind(inherited, spec.addr)
                .map_err(|e| format!("{}: cannot bind {}: {e}", spec.name(), spec.addr))?;
            fresh.push((spec, l));
        }
    }
    Ok(Prepared {
        config: Arc::new(config),
        fresh,
        pending_restart,
    })
}

fn result_label(result: &'static str) -> crate::telemetry::metrics::ResultLabels {
    crate::telemetry::metrics::ResultLabels { result }
}
