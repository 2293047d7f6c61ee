//! Telemetry: Prometheus metrics on atomics, the JSON access log, the live request tap, and log set-up.

pub mod access_log;
pub mod histogram;
pub mod host;
pub mod metrics;
pub mod tap;
pub mod trace;

pub use access_log::{AccessLog, AccessRecord};
pub use metrics::{Metrics, RequestMetrics};

/// Installs the `tracing` subscriber for the process (logs to stderr; the access log owns stdout).
pub fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("VMESH_LOG")
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(filter))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_target(false)
        .try_init();
}
