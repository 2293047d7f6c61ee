//! The identity in use: read from the CMDB every `cmdb.refresh`, cached in the store, and the
//! cached copy used when the CMDB cannot be reached at start. An explicit "must not serve"
//! answer (decommissioned, a status outside `allowed_status`) is not an outage: the cache does
//! not stand in for it.

use vmesh_cmdb::{Cmdb, CmdbError, ServiceIdentity};

use crate::store::State;
use crate::telemetry::metrics::CodeLabels;
use crate::telemetry::Metrics;

/// Where the identity in use came from (`/status` `lifecycle.identity_source`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IdentitySource {
    Cmdb,
    /// The CMDB failed at start: the copy stored by an earlier run.
    Cache,
    None,
}

impl IdentitySource {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Cmdb => "cmdb",
            Self::Cache => "cache",
            Self::None => "none",
        }
    }
}

/// The identity this agent registers under, and the CMDB it refreshes it from.
pub struct IdentityKeeper {
    cmdb: Option<Box<dyn Cmdb>>,
    vm: String,
    current: Option<ServiceIdentity>,
    source: IdentitySource,
    /// The last CMDB failure as `<CODE>: <message>`; `None` after a successful read.
    error: Option<String>,
}

impl IdentityKeeper {
    /// `cmdb = None`: no identity source is configured; the instance is never registered.
    pub fn new(cmdb: Option<Box<dyn Cmdb>>, vm: String) -> Self {
        Self {
            cmdb,
            vm,
            current: None,
            source: IdentitySource::None,
            error: None,
        }
    }

    pub fn current(&self) -> Option<&ServiceIdentity> {
        self.current.as_ref()
    }

    pub fn source(&self) -> IdentitySource {
        self.source
    }

    pub fn error(&self) -> Option<&str> {
        self.error.as_deref()
    }

    /// Asks the CMDB once and updates the identity in use, the cache and the metrics. Returns
    /// false when there is no CMDB to ask.
    pub async fn refresh(&mut self, store: &State, metrics: &Metrics) -> bool {
        let Some(cmdb) = &self.cmdb else { return false };
        match cmdb.identity(&self.vm).await {
            Ok(id) => {
                if let Some(old) = &self.current {
                    let diff = old.diff(&id);
                    if !diff.is_empty() {
                        tracing::info!(vm = %self.vm, changes = %diff.join("; "), "identity changed in the CMDB: re-registering");
                    }
                }
                if let Err(e) = store.set_identity(&id) {
                    tracing::error!(error = %e, code = e.code(), "cannot cache the identity");
                }
                metrics.identity_from_cache.set(0);
                self.current = Some(id);
                self.source = IdentitySource::Cmdb;
                self.error = None;
            }
            Err(e) => {
                metrics.cmdb_errors.get_or_create(&CodeLabels { code: e.code() }).inc();
                self.on_error(&e, store, metrics);
                self.error = Some(if self.current.is_none() {
                    format!("{}: {e}; no cached identity: not registering", e.code())
                } else {
                    format!("{}: {e}", e.code())
                });
            }
        }
        true
    }

    fn on_error(&mut self, e: &CmdbError, store: &State, metrics: &Metrics) {
        if matches!(e, CmdbError::Decommissioned { .. }) {
            // An explicit answer, not an outage: nothing is advertised (the registrar withdraws
            // a registration) and the cache may not bring it back. The proxy keeps serving:
            // callers that still hold the address do not fail.
            if self.current.take().is_some() {
                tracing::error!(error = %e, code = e.code(),
                    "the CMDB marks this VM decommissioned: withdrawing the registration");
            } else {
                tracing::error!(error = %e, code = e.code(),
                    "the CMDB marks this VM decommissioned: refusing to register (the cached identity is not used)");
            }
            if let Err(e) = store.clear_identity() {
                tracing::error!(error = %e, code = e.code(), "cannot forget the cached identity");
            }
            metrics.identity_from_cache.set(0);
            self.source = IdentitySource::None;
        } else if self.current.is_none() && !e.keeps_cache() {
            tracing::error!(error = %e, code = e.code(),
                "the CMDB says this VM must not serve: refusing to register (the cached identity is not used)");
        } else if self.current.is_none() {
            match store.identity() {
                Ok(Some(cached)) => {
                    tracing::warn!(error = %e, code = e.code(), "CMDB failed at start: using the cached identity");
                    self.current = Some(cached.identity);
                    metrics.identity_from_cache.set(1);
                    self.source = IdentitySource::Cache;
                }
                _ => tracing::error!(error = %e, code = e.code(),
                    "CMDB failed and no identity is cached: refusing to register"),
            }
        } else {
            tracing::warn!(error = %e, code = e.code(), "CMDB refresh failed: keeping the current identity");
        }
    }
}
