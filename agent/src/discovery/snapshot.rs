//! Static stability: the last known endpoint set of every service, kept in the state store so
//! that an agent restarted while the registry is down still has somewhere to send traffic.
//! Written lazily (sled's background flush makes it durable within a second; no fsync per change) and at
//! most once per [`MIN_INTERVAL`] per service; read once, before the first answer of a source.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::shift::Policy;
use super::Found;
use crate::store::{unix_now, Store};

/// A service's set is written at most this often.
pub const MIN_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize)]
struct Snapshot {
    saved_at: u64,
    endpoints: Vec<Found>,
    /// The central shift policy in force when saved (a rollback survives a restart during a
    /// registry outage).
    #[serde(default)]
    policy: Option<Policy>,
}

/// What the store keeps of a service.
pub struct Stored {
    pub endpoints: Vec<Found>,
    pub saved_at: u64,
    pub policy: Option<Policy>,
}

fn key(service: &str) -> String {
    format!("endpoints/{service}")
}

/// The stored set of `service` and when it was saved; `None` when absent or unreadable.
pub fn load(store: &dyn Store, service: &str) -> Option<Stored> {
    let raw = match store.get_raw(&key(service)) {
        Ok(Some(raw)) => raw,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(service, error = %e, "cannot read the stored endpoints");
            return None;
        }
    };
    match serde_json::from_slice::<Snapshot>(&raw) {
        Ok(s) => Some(Stored {
            endpoints: s.endpoints,
            saved_at: s.saved_at,
            policy: s.policy,
        }),
        Err(e) => {
            tracing::warn!(service, error = %e, "stored endpoints unreadable: ignored");
            None
        }
    }
}

/// Stores `endpoints` and the central `policy` as the last known state of `service` (not flushed).
pub fn save(store: &dyn Store, service: &str, endpoints: &[Found], policy: Option<Policy>) {
    let snap = Snapshot {
        saved_at: unix_now(),
        endpoints: endpoints.to_vec(),
        policy,
    };
    let Ok(bytes) = serde_json::to_vec(&snap) else {
        return;
    };
    if let Err(e) = store.put_raw_lazy(&key(service), &bytes) {
        tracing::warn!(service, error = %e, "cannot store the endpoints");
    }
}
