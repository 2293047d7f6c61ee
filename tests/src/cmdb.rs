//! Shared pieces of the tests of the remote CMDB backends (`[cmdb] kind = "http"` and
//! `"nautobot"`): their `[cmdb]` keys, `vmesh identity` on a config, an instance in front of an
//! app, and what an agent registered in the Consul double shows once it followed a changed record.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use crate::agent::vmesh_command;
use crate::consul::ConsulDouble;
use crate::lifecycle::{agent_service, passing_ids, CliRun};
use crate::{Agent, AgentBuilder, Inbound};

/// `[cmdb] kind = <kind>` at `url` for VM `vm`, the token read from `token_file`, refreshed
/// every `refresh`, each request bounded by `timeout` (both whole seconds).
pub fn remote(
    builder: AgentBuilder,
    kind: &str,
    url: &str,
    token_file: &Path,
    vm: &str,
    refresh: Duration,
    timeout: Duration,
) -> AgentBuilder {
    builder
        .cmdb_set("kind", kind)
        .cmdb_set("url", url)
        .cmdb_set("token_file", token_file.display().to_string())
        .cmdb_set("vm_name", vm)
        .cmdb_set("refresh", format!("{}s", refresh.as_secs()))
        .cmdb_set("timeout", format!("{}s", timeout.as_secs()))
}

/// An agent on node `node` in front of the HTTP app at `app` (`/healthz` checked every 500 ms,
/// no slow start, a 1 s drain grace); its CMDB and registry are the caller's to add.
pub fn instance(node: &str, app: SocketAddr) -> AgentBuilder {
    AgentBuilder::new()
        .agent_set("node", node)
        .agent_set("drain_grace", "1s")
        .inbound(Inbound::new(app, "http").health("/healthz", "500ms").ramp("0s"))
}

/// `vmesh identity --config <path> [--json]`, with `config` written to `path` first.
pub fn identity_cli(config: &AgentBuilder, path: &Path, json: bool) -> CliRun {
    std::fs::write(path, config.to_toml()).expect("write config");
    let mut cmd = vmesh_command();
    cmd.arg("identity").arg("--config").arg(path);
    if json {
        cmd.arg("--json");
    }
    cmd.output().expect("run vmesh identity").into()
}

/// The `vmesh-environment` meta of instance `id` as registered in `consul`; `Err` while it is
/// not registered or carries no such meta.
pub fn registered_environment(consul: &ConsulDouble, id: &str) -> Result<String, String> {
    let svc = agent_service(consul, id).ok_or("not registered")?;
    svc["Meta"]["vmesh-environment"]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("no Meta.vmesh-environment in {svc}"))
}

/// Asserts what an agent shows once it followed a changed record of its CMDB: `id` is still the
/// one passing instance of "orders" (re-registered in place, no duplicate) and the agent logged
/// the change.
pub fn assert_followed_in_place(agent: &Agent, consul: &ConsulDouble, id: &str) {
    assert_eq!(passing_ids(consul, "orders"), [id], "same instance, no duplicate");
    assert!(
        agent.stderr().contains("identity changed in the CMDB"),
        "the change is logged:\n{}",
        agent.stderr()
    );
}
