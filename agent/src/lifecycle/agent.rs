//! The running agent: binds listeners, serves the admin API, reloads on SIGHUP (validate, then
//! swap atomically; a bad config keeps the old one serving), drains on SIGTERM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use anyhow::Context as _;
use arc_swap::ArcSwap;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;

use super::signals::{self, Event};
use crate::admin;
use crate::config::{self, Config, Source};
use crate::proxy::listener::{bind, Running};
use crate::proxy::{Drain, DrainWatch, ListenerSpec, Shared};
use crate::route::RouteTable;
use crate::telemetry::{AccessLog, Metrics};

/// What the admin API reads and the lifecycle writes.
pub struct AgentState {
    pub source: Source,
    pub config: ArcSwap<Config>,
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub reload: Mutex<ReloadStatus>,
    pub draining: AtomicBool,
    pub started: Instant,
    pub listeners: Mutex<Vec<ListenerSpec>>,
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub reloads: u64,
    pub last_reload_error: Option<String>,
    pub last_reload_at: Option<String>,
}

struct Runtime {
    state: Arc<AgentState>,
    shared: Arc<Shared>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    listeners: Vec<Running>,
    drain_watch: DrainWatch,
}

/// Runs the agent until SIGTERM/SIGINT, then drains and returns.
pub async fn run(source: Source, config: Config) -> anyhow::Result<()> {
    let metrics = Metrics::new();
    let access_log = AccessLog::start(
        &config.telemetry.access_log,
        config.telemetry.access_log_buffer,
        metrics.access_log_dropped.clone(),
    )
    .with_context(|| format!("telemetry.access_log: cannot open {:?}", config.telemetry.access_log))?;
    let routes = Arc::new(ArcSwap::from_pointee(RouteTable::build(&config, None, &metrics)));
    let (drain, drain_watch) = Drain::new();
    let shared = Arc::new(Shared {
        routes: routes.clone(),
        metrics: metrics.clone(),
        access_log,
        limits: config.proxy.clone(),
    });
    let state = Arc::new(AgentState {
        source,
        config: ArcSwap::from_pointee(config.clone()),
        routes,
        metrics,
        reload: Mutex::new(ReloadStatus::default()),
        draining: AtomicBool::new(false),
        started: Instant::now(),
        listeners: Mutex::new(Vec::new()),
    });

    let admin_listener = bind(config.agent.admin_listen)
        .with_context(|| format!("agent.admin_listen: cannot bind {}", config.agent.admin_listen))?;
    let mut rt = Runtime {
        state: state.clone(),
        builder: Arc::new(crate::proxy::http_builder(&config.proxy)),
        shared,
        listeners: Vec::new(),
        drain_watch,
    };
    for spec in ListenerSpec::from_config(&config) {
        let l = bind(spec.addr).with_context(|| format!("{}: cannot bind {}", spec.name(), spec.addr))?;
        rt.start(spec, l);
    }
    rt.publish_listeners();
    let mut events = signals::spawn().context("cannot install signal handlers")?;
    tokio::spawn(admin::serve(admin_listener, state.clone()));
    tracing::info!(node = %config.node_name(), admin = %config.agent.admin_listen, "vmesh started");

    while let Some(ev) = events.recv().await {
        match ev {
            Event::Reload => rt.reload(),
            Event::Shutdown => break,
        }
    }

    // Drain: stop accepting, let in-flight requests finish, up to the drain timeout.
    let timeout = state.config.load().agent.drain_timeout.get();
    state.draining.store(true, Ordering::SeqCst);
    tracing::info!(?timeout, "shutting down: draining connections");
    for l in rt.listeners.drain(..) {
        l.stop();
    }
    drop(rt.drain_watch);
    let holders = drain.holders();
    match tokio::time::timeout(timeout, drain.drain()).await {
        Ok(()) => tracing::info!("drained: all connections closed"),
        Err(_) => tracing::warn!(
            ?timeout,
            connections_at_start = holders,
            "drain timeout: closing remaining connections"
        ),
    }
    Ok(())
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

    /// Reloads the config: the new one is validated in full and its new listeners bound
    /// before anything changes; any failure keeps the running config and records why.
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
        warn_restart_only(&old, &new);
        let specs = ListenerSpec::from_config(&new);
        let mut fresh = Vec::new();
        for spec in &specs {
            if !self.listeners.iter().any(|r| r.spec.addr == spec.addr) {
                let l = bind(spec.addr).map_err(|e| format!("{}: cannot bind {}: {e}", spec.name(), spec.addr))?;
                fresh.push((spec.clone(), l));
            }
        }
        // Everything is validated and bound: swap.
        let routes = RouteTable::build(&new, Some(&self.state.routes.load()), &self.state.metrics);
        self.state.routes.store(Arc::new(routes));
        self.state.config.store(Arc::new(new));
        let mut kept = Vec::new();
        for mut running in std::mem::take(&mut self.listeners) {
            match specs.iter().find(|s| s.addr == running.spec.addr) {
                Some(s) if *s == running.spec => kept.push(running),
                Some(s) => {
                    running.retarget(s.clone());
                    kept.push(running);
                }
                None => running.stop(),
            }
        }
        self.listeners = kept;
        for (spec, l) in fresh {
            self.start(spec, l);
        }
        self.publish_listeners();
        Ok(())
    }
}

fn result_label(result: &'static str) -> crate::telemetry::metrics::ResultLabels {
    crate::telemetry::metrics::ResultLabels { result }
}

/// Settings read once at start-up: a reload that changes them says they wait for a restart.
fn warn_restart_only(old: &Config, new: &Config) {
    for (key, changed) in [
        ("agent", old.agent != new.agent),
        (
            "proxy limits",
            old.proxy.max_connections != new.proxy.max_connections
                || old.proxy.max_header_bytes != new.proxy.max_header_bytes
                || old.proxy.header_read_timeout != new.proxy.header_read_timeout
                || old.proxy.h2_max_concurrent_streams != new.proxy.h2_max_concurrent_streams,
        ),
        ("telemetry", old.telemetry != new.telemetry),
    ] {
        if changed {
            tracing::warn!(section = key, "changed settings take effect at the next restart");
        }
    }
}
