//! The command line: `vmesh run | demo | check-config | status | clusters | shift | drain |
//! undrain | tap | doctor | identity | init`. `main.rs` runs the agent (`run`, `demo`); each client
//! command lives in `cli/<command>.rs`, and those that talk to the local admin API share one
//! client (`cli/admin.rs`).

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Parser, Subcommand};

pub mod admin;
pub mod check;
pub mod doctor;
pub mod drain;
pub mod identity;
pub mod init;
pub mod shift;
pub mod status;
pub mod tap;

pub use admin::{AdminClient, Answer};

/// vmesh: the service-mesh agent for virtual machines.
#[derive(Debug, Parser)]
#[command(name = "vmesh", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the agent.
    Run {
        #[arg(long, short, default_value = "/etc/vmesh/vmesh.toml")]
        config: PathBuf,
    },
    /// Run the agent on the embedded quickstart config, with demo upstreams.
    Demo,
    /// Validate a config file; prints every problem (exit 0 valid, 2 invalid).
    CheckConfig {
        #[arg(long, short, default_value = "/etc/vmesh/vmesh.toml")]
        config: PathBuf,
    },
    /// Show the agent's status.
    Status(AdminArgs),
    /// Show clusters and endpoints with their live statistics.
    Clusters(AdminArgs),
    /// Take this instance out of traffic: mark it down in the registry, wait for callers to
    /// notice and for in-flight requests to finish. Exit 0 when drained, 1 on timeout.
    Drain {
        #[command(flatten)]
        admin: AdminArgs,
        /// Longest wait for in-flight requests to reach zero.
        #[arg(long, default_value = "30s", value_parser = parse_timeout)]
        timeout: std::time::Duration,
    },
    /// Put this instance back: wait for the app's health, register, start a new slow start.
    Undrain {
        #[command(flatten)]
        admin: AdminArgs,
        /// Longest wait for the application to pass its health check.
        #[arg(long, default_value = "60s", value_parser = parse_timeout)]
        timeout: std::time::Duration,
        /// Then show the slow start until the full weight (at most the ramp window + 10 s;
        /// exit 1 `RAMP_TIMEOUT` past it).
        #[arg(long)]
        wait_ramp: bool,
    },
    /// Show or set the traffic shift of an outbound service between environments:
    /// `vmesh shift orders` shows it, `vmesh shift orders vm=80 k8s=20` writes the central policy
    /// (compare-and-set against the policy just read). Exit 0 done, 1 conflict, 2 invalid.
    Shift {
        #[command(flatten)]
        admin: AdminArgs,
        /// The outbound service.
        service: String,
        /// New percentages, e.g. `vm=80 k8s=20` (integers summing to 100).
        values: Vec<String>,
    },
    /// Print this VM's identity as the CMDB has it (asks the CMDB directly).
    Identity {
        #[arg(long, short, default_value = "/etc/vmesh/vmesh.toml")]
        config: PathBuf,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stream the requests passing through the agent, live, one line each (`--json`: the JSON
    /// lines of `GET /tap`). Exit 0 at `--limit`, 2 refused, 3 unreachable or the stream broke.
    Tap(tap::TapArgs),
    /// Onboard this VM: write the config from a few flags, check the CMDB's custom fields and
    /// this VM's identity, print the Ansible host vars. Exit 0 done, 2 invalid or refused, 4 CMDB.
    Init(Box<init::InitArgs>),
    /// Is it the sidecar? The last minute's proxy overhead and upstream time, host CPU pressure
    /// and a verdict: `host`, `upstream`, `sidecar` or `healthy`. Exit 0 whatever the verdict,
    /// 3 unreachable.
    Doctor(AdminArgs),
}

#[derive(Debug, clap::Args)]
pub struct AdminArgs {
    /// Config file naming the admin address.
    #[arg(long, short, default_value = "/etc/vmesh/vmesh.toml")]
    pub config: PathBuf,
    /// Admin address (overrides --config).
    #[arg(long)]
    pub admin: Option<SocketAddr>,
    /// Print the raw JSON.
    #[arg(long)]
    pub json: bool,
}

impl AdminArgs {
    /// The admin address: `--admin`, else the config's `agent.admin_listen`.
    pub fn admin_addr(&self) -> anyhow::Result<SocketAddr> {
        if let Some(a) = self.admin {
            return Ok(a);
        }
        let config =
            crate::config::load(&crate::config::Source::file(&self.config)).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(config.agent.admin_listen)
    }
}

/// Exit codes of the client commands, for scripts and CD hooks (docs/cli.md).
pub mod exit {
    /// `drain`, `undrain`: timed out.
    pub const TIMEOUT: u8 = 1;
    pub const FAILED: u8 = 2;
    pub const ADMIN_UNREACHABLE: u8 = 3;
    pub const CMDB_ERROR: u8 = 4;
    /// `vmesh shift`: the policy changed since it was read.
    pub const CONFLICT: u8 = 1;
}

/// The admin token from the config's `agent.admin_token_file`, if one is set and readable.
pub fn admin_token(config: &std::path::Path) -> Option<String> {
    let c = crate::config::load(&crate::config::Source::file(config)).ok()?;
    crate::config::read_secret("agent.admin_token_file", &c.agent.admin_token_file?).ok()
}

/// A command's `--timeout`: a human duration of at most one day (no deadline arithmetic can
/// overflow).
fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > std::time::Duration::from_secs(86_400) {
        return Err(format!("{s} is longer than one day"));
    }
    Ok(d)
}
