//! Why a lifecycle request (`drain`, `undrain`) failed, with the stable code operators see in the
//! admin API's answer (body `<CODE>: <message>` and header `x-vmesh-error`), the CLI's message
//! and its exit code.

use std::time::Duration;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// `undrain`: the app did not pass a fresh health check in time.
    #[error("the application did not pass its health check within {0:?}")]
    AppUnhealthy(Duration),
    /// The drain flag could not be written: nothing changed.
    #[error("{0}")]
    Store(#[from] StoreError),
    /// `undrain`: serving again, but there is no identity to register under.
    #[error("no service identity: {0}")]
    NotRegistered(String),
    /// `undrain`: serving again, but the registry write failed (it is retried).
    #[error("{0} (the agent keeps retrying)")]
    RegistryWriteFailed(String),
    /// The registrar or the health checker has stopped (the agent is shutting down).
    #[error("the {0} has stopped")]
    Stopped(&'static str),
}

impl LifecycleError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::AppUnhealthy(_) => "APP_UNHEALTHY",
            Self::Store(e) => e.code(),
            Self::NotRegistered(_) => "NOT_REGISTERED",
            Self::RegistryWriteFailed(_) => "REGISTRY_WRITE_FAILED",
            Self::Stopped(_) => "AGENT_STOPPING",
        }
    }
}
