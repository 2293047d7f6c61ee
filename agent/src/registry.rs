//! Service registries behind one [`Registry`] trait: Consul (HTTP API on reqwest) and etcd
//! (leases). The agent registers the local app on its behalf, pointing at the inbound port.

pub mod consul;
pub mod etcd;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

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

/// An endpoint of a service as found in a registry.
#[derive(Clone, Debug, PartialEq)]
pub struct Discovered {
    pub address: std::net::SocketAddr,
    /// Weight advertised in the registry.
    pub weight: u32,
    /// `vm` or `k8s`.
    pub env: String,
    /// Slow start in progress, for caller-side interpolation.
    pub ramp: Option<RampInfo>,
}

/// A ramp advertised in registry metadata.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RampInfo {
    /// Unix seconds.
    pub start: u64,
    pub window: u64,
    /// The weight at the end of the ramp.
    pub target: u32,
    pub aggression: f64,
}

impl Discovered {
    /// The weight to balance with now: the registry's weight, or during a slow start the
    /// point on the ramp's curve between the registry's step writes.
    pub fn effective_weight(&self, now_unix: u64) -> u32 {
        match self.ramp {
            Some(r) if now_unix < r.start.saturating_add(r.window) => {
                let elapsed = Duration::from_secs(now_unix.saturating_sub(r.start));
                let w = crate::lifecycle::ramp::weight_at(Duration::from_secs(r.window), r.aggression, elapsed);
                crate::lifecycle::ramp::scale(w, r.target).max(1)
            }
            _ => self.weight,
        }
    }

    pub fn ramping(&self, now_unix: u64) -> bool {
        self.ramp.is_some_and(|r| now_unix < r.start.saturating_add(r.window))
    }
}

/// Reads ramp metadata: start and window, and optional target weight and aggression.
pub fn ramp_info(get: impl Fn(&str) -> Option<String>) -> Option<RampInfo> {
    Some(RampInfo {
        start: get("ramp_start")?.parse().ok()?,
        window: get("ramp_window")?.parse().ok()?,
        target: get("weight").and_then(|w| w.parse().ok()).unwrap_or(100),
        aggression: get("ramp_aggression").and_then(|a| a.parse().ok()).unwrap_or(1.0),
    })
}

/// Exponential backoff with jitter for retries: 200 ms doubling to `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    let base = Duration::from_millis(200).saturating_mul(1 << attempt.min(10)).min(max);
    base.mul_f64(0.5 + fastrand::f64() * 0.5)
}
