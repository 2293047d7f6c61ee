//! Static stability: the last known endpoint set of every service, kept in the state store so
//! that an agent restarted while the registry is down still has somewhere to send traffic.
//! Written lazily (sled flushes on its own within half a second; no fsync per change) and at
//! most once per [`MIN_INTERVAL`] per service; read once, before the first answer of a source.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Found;
use crate::store::{unix_now, Store};

/// A service's set is written at most this often.
pub const MIN_INTERVAL: Duration = Duration::from_secs(2);

#[derive(Serialize, Deserialize)]
struct Snapshot {
    saved_at: u64,
    endpoints: Vec<Found>,
}

fn key(service: &str) -> String {
    format!("endpoints/{service}")
}

/// The stored set of `service` and when it was saved; `None` when absent or unreadable.
pub fn load(store: &dyn Store, service: &str) -> Option<(Vec<Found>, u64)> {
    let raw = match store.get_raw(&key(service)) {
        Ok(Some(raw)) => raw,
        Ok(None) => return None,
        Err(e) => {
            tracing::warn!(service, error = %e, "cannot read the stored endpoints");
            return None;
        }
    };
    match serde_json::from_slice::<Snapshot>(&raw) {
        Ok(s) => Some((s.endpoints, s.saved_at)),
        Err(e) => {
            tracing::warn!(service, error = %e, "stored endpoints unreadable: ignored");
            None
        }
    }
}

/// Stores `endpoints` as the last known set of `service` (not flushed).
pub fn save(store: &dyn Store, service: &str, endpoints: &[Found]) {
    let snap = Snapshot {
        saved_at: unix_now(),
        endpoints: endpoints.to_vec(),
    };
    let Ok(bytes) = serde_json::to_vec(&snap) else {
        return;
    };
    if let Err(e) = store.put_raw_lazy(&key(service), &bytes) {
        tracing::warn!(service, error = %e, "cannot store the endpoints");
    }
}
