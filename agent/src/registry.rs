//! Service registries behind one [`Registry`] trait: Consul (HTTP API on reqwest), etcd
//! (leases) and the in-process table of the demo (`memory`). The agent registers the local app
//! on its behalf, pointing at the inbound port.

pub mod consul;
pub mod etcd;
pub mod memory;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::config::{read_secret, Config, RegistryKind};

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// One instance as registered.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Registration {
    /// `<service>-<node>`.
    pub id: String,
    pub service: String,
    /// Empty: the registry's node address applies (Consul).
    pub address: String,
    pub port: u16,
    pub tags: Vec<String>,
    /// `vmesh-env`, `vmesh-zone`, `vmesh-version`, `vmesh-colour`, `vmesh-ramp-start`, ...
    pub meta: BTreeMap<String, String>,
    /// Advertised weight 1..=100 (the current step of the ramp).
    pub weight: u32,
    /// Whether the app currently passes its health check.
    pub healthy: bool,
    /// Whether the instance is in maintenance (drained).
    pub maintenance: bool,
    pub check_ttl: Duration,
    pub deregister_critical_after: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("registry unreachable: {0}")]
    Unreachable(String),
    #[error("registry refused the request: {0}")]
    Denied(String),
    #[error("registry answered something unexpected: {0}")]
    BadResponse(String),
}

impl RegistryError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "REGISTRY_UNREACHABLE",
            Self::Denied(_) => "REGISTRY_DENIED",
            Self::BadResponse(_) => "REGISTRY_BAD_RESPONSE",
        }
    }
}

/// A registry the agent writes its instance to.
pub trait Registry: Send + Sync {
    /// Creates or replaces the instance with everything in `r` (weight, meta, health,
    /// maintenance). Idempotent.
    fn register<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Reports the app's health between registrations (Consul: the TTL check).
    fn set_health<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Marks the instance down for callers (drain) or back up.
    fn set_maintenance<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Removes the instance `id` of `service`; an absent instance is not an error.
    fn deregister<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<(), RegistryError>>;

    /// Whether the instance still exists (anti-entropy after a registry restart).
    fn is_registered<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<bool, RegistryError>>;

    /// What the registry still holds of instance `id` from an earlier run, for an agent whose
    /// state store was lost: `None` when the instance is not there, or the registry keeps
    /// nothing beyond the agent's life (etcd: the key dies with its lease).
    fn recover<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Recovered>, RegistryError>> {
        let _ = id;
        Box::pin(async { Ok(None) })
    }

    /// `consul http://...` / `etcd http://...`.
    fn describe(&self) -> String;

    /// Whether `register` alone sets health and maintenance too (etcd: the key is there or
    /// not); otherwise they are set separately after a registration (Consul keeps a check's
    /// status across re-registrations).
    fn register_sets_state(&self) -> bool {
        false
    }
}

/// An instance's state as an earlier run left it in the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Recovered {
    /// The instance is in maintenance (it was drained).
    pub maintenance: bool,
    /// The slow start it advertised: start (unix seconds) and window (seconds).
    pub ramp: Option<(u64, u64)>,
}

/// The one registry client of an agent, built once from the config and shared by the
/// registrar (as a [`Registry`]) and discovery (blocking queries, watches, policy writes).
#[derive(Clone)]
pub enum RegistryClient {
    Consul(Arc<consul::Consul>),
    Etcd(Arc<etcd::Etcd>),
    /// `kind = "memory"`: the in-process table (demo, single host).
    Memory(Arc<memory::Memory>),
}

impl RegistryClient {
    /// The client `config.registry` names, or `None` for `kind = "none"`.
    pub fn from_config(config: &Config) -> Result<Option<Self>, String> {
        let token = match &config.registry.token_file {
            Some(p) => Some(read_secret("registry.token_file", p).map_err(|e| e.to_string())?),
            None => None,
        };
        let ca = match &config.registry.ca_file {
            Some(p) => {
                Some(std::fs::read(p).map_err(|e| format!("registry.ca_file: cannot read {}: {e}", p.display()))?)
            }
            None => None,
        };
        Ok(match config.registry.kind {
            RegistryKind::None => None,
            RegistryKind::Consul => Some(Self::Consul(Arc::new(
                consul::Consul::new(&config.registry.address, token, ca.as_deref()).map_err(|e| e.to_string())?,
            ))),
            RegistryKind::Etcd => {
                let auth = config.registry.username.clone().zip(token);
                Some(Self::Etcd(Arc::new(etcd::Etcd::new(
                    &config.registry.address,
                    config.registry.lease_ttl.get(),
                    auth,
                    ca,
                ))))
            }
            RegistryKind::Memory => Some(Self::Memory(Arc::new(memory::Memory::new()))),
        })
    }

    pub fn as_registry(&self) -> Arc<dyn Registry> {
        match self {
            Self::Consul(c) => c.clone(),
            Self::Etcd(e) => e.clone(),
            Self::Memory(m) => m.clone(),
        }
    }
}

/// Exponential backoff with jitter for retries: 200 ms doubling to `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1 << attempt.min(10)).min(max);
    base.mul_f64(0.5 + fastrand::f64() * 0.5)
}
