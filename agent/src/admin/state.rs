//! What the admin API reads of the running agent: the config in force, the route table, the
//! reload status, the listeners, and handles on the registrar and discovery. The composition
//! root (`app.rs`) builds it and writes it; the admin API only reads it.

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::config::{Config, Source};
use crate::discovery::Discovery;
use crate::lifecycle::registrar::Handle;
use crate::proxy::ListenerSpec;
use crate::route::RouteTable;
use crate::telemetry::Metrics;

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
    /// Identity, registration, ramp and drain.
    pub lifecycle: Handle,
    /// Endpoint sets, their sources and the shift policies.
    pub discovery: Arc<Discovery>,
    /// Serialises route-table rebuilds (reload, central policy change).
    pub(crate) rebuild: Mutex<()>,
}

impl AgentState {
    /// Rebuilds the route table for the running config with the central policies in force
    /// laid over it, keeping the state of every part whose settings did not change. A reload
    /// and a central policy change both come here.
    pub fn rebuild_routes(&self) {
        let _one_at_a_time = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let config = self.config.load_full();
        let central = self.discovery.governance_policies().borrow().clone();
        let effective = crate::governance::central::overlay(&config, &central);
        let table = RouteTable::build(&effective, Some(&self.routes.load()), &self.metrics);
        self.routes.store(Arc::new(table));
    }
}

#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct ReloadStatus {
    pub reloads: u64,
    pub last_reload_error: Option<String>,
    pub last_reload_at: Option<String>,
    /// Start-up-only keys the running config file changed: their running values stay until a
    /// restart (config/reload.rs).
    pub pending_restart: Vec<String>,
}
