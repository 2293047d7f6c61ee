//! The command line: `vmesh run | demo | check-config | status | clusters | shift | drain | undrain | identity`. Commands other
//! than `run` and `demo` talk to the local admin API.

use std::net::SocketAddr;
use std::path::PathBuf;

use bytes::Bytes;
use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

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

/// The admin token from the config's `agent.admin_token_file`, if one is set and readable.
pub fn admin_token(config: &std::path::Path) -> Option<String> {
    let c = crate::config::load(&crate::config::Source::file(config)).ok()?;
    crate::config::read_secret("agent.admin_token_file", &c.agent.admin_token_file?).ok()
}

/// POSTs to `path` on the admin API (with the admin token when given); returns status and body.
pub async fn admin_post(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    wait: std::time::Duration,
) -> anyhow::Result<(u16, String)> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req = http::Request::post(format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(Empty::new())?;
    let resp = tokio::time::timeout(wait, client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("ADMIN_UNREACHABLE: admin API at {addr} did not answer in {wait:?}"))?
        .map_err(|e| anyhow::anyhow!("ADMIN_UNREACHABLE: admin API at {addr}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// PUTs `body` to `path` on the admin API (with the admin token when given).
pub async fn admin_put(
    addr: SocketAddr,
    path: &str,
    token: Option<&str>,
    body: String,
) -> anyhow::Result<(u16, String)> {
    let client: Client<_, http_body_util::Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let mut req =
        http::Request::put(format!("http://{addr}{path}")).header(http::header::CONTENT_TYPE, "application/json");
    if let Some(t) = token {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = req.body(http_body_util::Full::new(Bytes::from(body)))?;
    let wait = std::time::Duration::from_secs(15);
    let resp = tokio::time::timeout(wait, client.request(req))
        .await
        .map_err(|_| anyhow::anyhow!("ADMIN_UNREACHABLE: admin API at {addr} did not answer in {wait:?}"))?
        .map_err(|e| anyhow::anyhow!("ADMIN_UNREACHABLE: admin API at {addr}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// GETs `path` from the admin API; returns status and body.
pub async fn admin_get(addr: SocketAddr, path: &str) -> anyhow::Result<(u16, String)> {
    let client: Client<_, Empty<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
    let uri: http::Uri = format!("http://{addr}{path}").parse()?;
    let resp = tokio::time::timeout(std::time::Duration::from_secs(10), client.get(uri))
        .await
        .map_err(|_| anyhow::anyhow!("ADMIN_UNREACHABLE: admin API at {addr} did not answer in 10s"))?
        .map_err(|e| anyhow::anyhow!("ADMIN_UNREACHABLE: admin API at {addr}: {e}"))?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
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
