//! The `vmesh` agent under test: a typed config builder, and the running process.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::time::Duration;

use nix::sys::signal::Signal;
use tempfile::TempDir;
use toml::{Table, Value};

use crate::eventually::eventually;
use crate::http::{self, HttpResponse};
use crate::ports::free_addr;
use crate::process::Process;
use crate::vmesh_bin;

/// How long `vmesh run` may take to answer `GET /live` with 200.
const START_TIMEOUT: Duration = Duration::from_secs(20);

// === config pieces ===

/// One `[[outbound]]` entry. Listens on a fresh loopback port unless [`Outbound::no_listen`].
#[derive(Debug, Clone)]
pub struct Outbound {
    service: String,
    listen: Option<SocketAddr>,
    table: Table,
    endpoints: Vec<Value>,
}

/// The `[inbound]` section: a fresh loopback listen port in front of the local app.
#[derive(Debug, Clone)]
pub struct Inbound {
    listen: SocketAddr,
    table: Table,
}

/// Builds a config, writes it to a temp dir and starts `vmesh run --config FILE`.
#[derive(Debug, Clone)]
pub struct AgentBuilder {
    admin: SocketAddr,
    agent: Table,
    cmdb: Table,
    registry: Table,
    proxy: Table,
    shared_outbound: Option<SocketAddr>,
    telemetry: Table,
    inbound: Option<Inbound>,
    outbounds: Vec<Outbound>,
    /// Top-level `[[route]]` rules, in order.
    routes: Vec<Table>,
    /// The `[colour]` section (written only when set).
    colour: Option<Table>,
    /// `agent.data_dir` chosen by the test (default: `<agent temp dir>/data`).
    data_dir: Option<PathBuf>,
    /// The `[tls]` section (written only when set).
    tls: Option<Table>,
}

/// A running `vmesh run`, killed on drop (its logs are printed if the test is failing).
pub struct Agent {
    process: Process,
    config: AgentBuilder,
    config_path: PathBuf,
    dir: TempDir,
    /// How many times the process was started (names the log files of each run).
    runs: u32,
}

// === impl Outbound ===

impl Outbound {
    /// An HTTP outbound for `service` with its own listen port and no endpoints yet.
    pub fn new(service: &str) -> Outbound {
        let mut table = Table::new();
        table.insert("protocol".into(), "http".into());
        Outbound {
            service: service.to_string(),
            listen: Some(free_addr()),
            table,
            endpoints: Vec::new(),
        }
    }

    /// Sets `protocol` (`http`, `http2`, `grpc`, `tcp`).
    pub fn protocol(self, protocol: &str) -> Outbound {
        self.set("protocol", protocol)
    }

    /// Sets `balancer`.
    pub fn balancer(self, balancer: &str) -> Outbound {
        self.set("balancer", balancer)
    }

    /// Sets `timeout` (a duration string such as `"500ms"`).
    pub fn timeout(self, timeout: &str) -> Outbound {
        self.set("timeout", timeout)
    }

    /// Adds a plain endpoint.
    pub fn endpoint(mut self, addr: SocketAddr) -> Outbound {
        self.endpoints.push(Value::String(addr.to_string()));
        self
    }

    /// Adds several plain endpoints.
    pub fn endpoints<I: IntoIterator<Item = SocketAddr>>(self, addrs: I) -> Outbound {
        addrs.into_iter().fold(self, Outbound::endpoint)
    }

    /// Adds an endpoint with a weight (`{ address = .., weight = .. }`).
    pub fn weighted_endpoint(mut self, addr: SocketAddr, weight: u32) -> Outbound {
        let mut t = Table::new();
        t.insert("address".into(), addr.to_string().into());
        t.insert("weight".into(), i64::from(weight).into());
        self.endpoints.push(Value::Table(t));
        self
    }

    /// Adds an endpoint with labels (`{ address = .., version = "v2", colour = "blue" }`; any
    /// key of a static endpoint: `weight`, `env`, `zone`, `version`, `colour`).
    pub fn labelled_endpoint(mut self, addr: SocketAddr, labels: &[(&str, &str)]) -> Outbound {
        let mut t = Table::new();
        t.insert("address".into(), addr.to_string().into());
        for (k, v) in labels {
            t.insert((*k).to_string(), (*v).into());
        }
        self.endpoints.push(Value::Table(t));
        self
    }

    /// Removes every endpoint.
    pub fn clear_endpoints(mut self) -> Outbound {
        self.endpoints.clear();
        self
    }

    /// No own port: the service is reachable only through the shared outbound port.
    pub fn no_listen(mut self) -> Outbound {
        self.listen = None;
        self
    }

    /// Sets any other key of the entry (`retry` takes a table, see [`Outbound::retry`]).
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Outbound {
        self.table.insert(key.to_string(), value.into());
        self
    }

    /// Sets `[outbound.retry]` `attempts` and `budget_ratio`.
    pub fn retry(self, attempts: u32, budget_ratio: f64) -> Outbound {
        let mut t = Table::new();
        t.insert("attempts".into(), i64::from(attempts).into());
        t.insert("budget_ratio".into(), budget_ratio.into());
        self.set("retry", Value::Table(t))
    }

    /// The service name.
    pub fn service(&self) -> &str {
        &self.service
    }

    /// The port the app calls, if the entry has one.
    pub fn listen_addr(&self) -> Option<SocketAddr> {
        self.listen
    }

    fn to_table(&self) -> Table {
        let mut t = Table::new();
        t.insert("service".into(), self.service.clone().into());
        if let Some(listen) = self.listen {
            t.insert("listen".into(), listen.to_string().into());
        }
        for (k, v) in &self.table {
            t.insert(k.clone(), v.clone());
        }
        t.insert("endpoints".into(), Value::Array(self.endpoints.clone()));
        t
    }
}

// === impl Inbound ===

impl Inbound {
    /// An inbound listener on a fresh port forwarding to the app at `app` with `protocol`.
    pub fn new(app: SocketAddr, protocol: &str) -> Inbound {
        let mut table = Table::new();
        table.insert("app".into(), app.to_string().into());
        table.insert("protocol".into(), protocol.into());
        Inbound {
            listen: free_addr(),
            table,
        }
    }

    /// Sets any other key of `[inbound]`.
    pub fn set(mut self, key: &str, value: impl Into<Value>) -> Inbound {
        self.table.insert(key.to_string(), value.into());
        self
    }

    /// Sets a key of the sub-table `[inbound.<section>]` (e.g. `health`, `ramp`).
    pub fn section_set(mut self, section: &str, key: &str, value: impl Into<Value>) -> Inbound {
        let entry = self
            .table
            .entry(section.to_string())
            .or_insert_with(|| Value::Table(Table::new()));
        if !entry.is_table() {
            *entry = Value::Table(Table::new());
        }
        if let Value::Table(t) = entry {
            t.insert(key.to_string(), value.into());
        }
        self
    }

    /// `[inbound.health]`: an HTTP check of `path` every `interval` (e.g. `"500ms"`).
    pub fn health(self, path: &str, interval: &str) -> Inbound {
        self.section_set("health", "path", path)
            .section_set("health", "interval", interval)
    }

    /// `[inbound.ramp] window` (slow start; `"0s"` disables it).
    pub fn ramp(self, window: &str) -> Inbound {
        self.section_set("ramp", "window", window)
    }

    fn to_table(&self) -> Table {
        let mut t = self.table.clone();
        t.insert("listen".into(), self.listen.to_string().into());
        t
    }
}

// === impl AgentBuilder ===

impl Default for AgentBuilder {
    fn default() -> Self {
        AgentBuilder::new()
    }
}

impl AgentBuilder {
    /// `[agent]` with a fresh admin port, one worker thread and a 10 s drain timeout;
    /// `[registry] kind = "none"`; access log on stdout.
    pub fn new() -> AgentBuilder {
        let admin = free_addr();
        let mut agent = Table::new();
        agent.insert("node".into(), "test".into());
        agent.insert("admin_listen".into(), admin.to_string().into());
        agent.insert("worker_threads".into(), 1.into());
        agent.insert("drain_timeout".into(), "10s".into());
        let mut telemetry = Table::new();
        telemetry.insert("access_log".into(), "stdout".into());
        let mut registry = Table::new();
        registry.insert("kind".into(), "none".into());
        AgentBuilder {
            admin,
            agent,
            cmdb: Table::new(),
            registry,
            proxy: Table::new(),
            shared_outbound: None,
            telemetry,
            inbound: None,
            outbounds: Vec::new(),
            routes: Vec::new(),
            colour: None,
            data_dir: None,
            tls: None,
        }
    }

    /// Sets the `[tls]` section (certificate files, trust domain).
    pub fn tls(mut self, tls: Table) -> AgentBuilder {
        self.tls = Some(tls);
        self
    }

    /// Sets a key of `[agent]`.
    pub fn agent_set(mut self, key: &str, value: impl Into<Value>) -> AgentBuilder {
        self.agent.insert(key.to_string(), value.into());
        self
    }

    /// Sets a key of `[cmdb]` (the section is written only when a key is set).
    pub fn cmdb_set(mut self, key: &str, value: impl Into<Value>) -> AgentBuilder {
        self.cmdb.insert(key.to_string(), value.into());
        self
    }

    /// `[cmdb] kind = "file"` reading the identity TOML at `path`.
    pub fn cmdb_file(self, path: &Path) -> AgentBuilder {
        self.cmdb_set("kind", "file")
            .cmdb_set("path", path.display().to_string())
    }

    /// Uses `dir` as `agent.data_dir` (the state store) instead of a fresh one in the agent's
    /// temp dir: to start a second agent on the state an earlier one left behind.
    pub fn data_dir(mut self, dir: &Path) -> AgentBuilder {
        self.data_dir = Some(dir.to_path_buf());
        self
    }

    /// Sets a key of `[registry]` (`kind` stays `"none"` unless set here).
    pub fn registry_set(mut self, key: &str, value: impl Into<Value>) -> AgentBuilder {
        self.registry.insert(key.to_string(), value.into());
        self
    }

    /// Sets a key of `[proxy]` (e.g. `max_header_bytes`).
    pub fn proxy_set(mut self, key: &str, value: impl Into<Value>) -> AgentBuilder {
        self.proxy.insert(key.to_string(), value.into());
        self
    }

    /// Sets a key of `[telemetry]`.
    pub fn telemetry_set(mut self, key: &str, value: impl Into<Value>) -> AgentBuilder {
        self.telemetry.insert(key.to_string(), value.into());
        self
    }

    /// Opens the shared outbound port (routes by `Host` = service name) on a fresh port.
    pub fn shared_outbound(mut self) -> AgentBuilder {
        self.shared_outbound = Some(free_addr());
        self
    }

    /// Sets `[inbound]`.
    pub fn inbound(mut self, inbound: Inbound) -> AgentBuilder {
        self.inbound = Some(inbound);
        self
    }

    /// Appends a top-level `[[route]]` rule (see [`toml_table`] to write one inline).
    pub fn route(mut self, route: Table) -> AgentBuilder {
        self.routes.push(route);
        self
    }

    /// Removes every `[[route]]` rule.
    pub fn clear_routes(mut self) -> AgentBuilder {
        self.routes.clear();
        self
    }

    /// Sets the `[colour]` section (see [`toml_table`]).
    pub fn colour(mut self, colour: Table) -> AgentBuilder {
        self.colour = Some(colour);
        self
    }

    /// Adds an `[[outbound]]`, or replaces the one for the same service.
    pub fn outbound(mut self, outbound: Outbound) -> AgentBuilder {
        self.outbounds.retain(|o| o.service != outbound.service);
        self.outbounds.push(outbound);
        self
    }

    /// The `[[outbound]]` entry for `service`, to change and put back with [`AgentBuilder::outbound`].
    pub fn outbound_for(&self, service: &str) -> Outbound {
        self.outbounds
            .iter()
            .find(|o| o.service == service)
            .cloned()
            .unwrap_or_else(|| panic!("no outbound for service {service}"))
    }

    /// The config as TOML text.
    pub fn to_toml(&self) -> String {
        let mut root = Table::new();
        root.insert("agent".into(), Value::Table(self.agent.clone()));
        if !self.cmdb.is_empty() {
            root.insert("cmdb".into(), Value::Table(self.cmdb.clone()));
        }
        root.insert("registry".into(), Value::Table(self.registry.clone()));
        let mut proxy = self.proxy.clone();
        if let Some(shared) = self.shared_outbound {
            proxy.insert("shared_outbound_listen".into(), shared.to_string().into());
        }
        if !proxy.is_empty() {
            root.insert("proxy".into(), Value::Table(proxy));
        }
        root.insert("telemetry".into(), Value::Table(self.telemetry.clone()));
        if let Some(inbound) = &self.inbound {
            root.insert("inbound".into(), Value::Table(inbound.to_table()));
        }
        if !self.outbounds.is_empty() {
            let list = self.outbounds.iter().map(|o| Value::Table(o.to_table())).collect();
            root.insert("outbound".into(), Value::Array(list));
        }
        if !self.routes.is_empty() {
            let list = self.routes.iter().cloned().map(Value::Table).collect();
            root.insert("route".into(), Value::Array(list));
        }
        if let Some(colour) = &self.colour {
            root.insert("colour".into(), Value::Table(colour.clone()));
        }
        if let Some(tls) = &self.tls {
            root.insert("tls".into(), Value::Table(tls.clone()));
        }
        toml::to_string(&root).expect("a toml::Table always serializes")
    }

    /// Writes the config and starts `vmesh run`; returns once `/live` answers 200 and every
    /// configured listener accepts connections.
    pub fn start(self) -> Agent {
        let dir = tempfile::Builder::new()
            .prefix("vmesh-agent-")
            .tempdir()
            .expect("create agent temp dir");
        let config_path = dir.path().join("vmesh.toml");
        let data_dir = self.data_dir.clone().unwrap_or_else(|| dir.path().join("data"));
        let config = self.agent_set("data_dir", data_dir.display().to_string());
        std::fs::write(&config_path, config.to_toml()).expect("write agent config");
        let process = Process::spawn("vmesh", run_command(&config_path), dir.path());
        let mut agent = Agent {
            process,
            config,
            config_path,
            dir,
            runs: 1,
        };
        agent.wait_live();
        agent
    }
}

/// `vmesh run --config <path>` with the test's log filter.
fn run_command(config_path: &Path) -> Command {
    let mut cmd = vmesh_command();
    cmd.arg("run").arg("--config").arg(config_path);
    // The agent's log filter (`VMESH_LOG`), e.g. VMESH_TEST_LOG=debug for a failing test.
    if let Ok(filter) = std::env::var("VMESH_TEST_LOG") {
        cmd.env("VMESH_LOG", filter);
    }
    cmd
}

// === impl Agent ===

impl Agent {
    /// A builder with the defaults of [`AgentBuilder::new`].
    pub fn builder() -> AgentBuilder {
        AgentBuilder::new()
    }

    fn wait_live(&mut self) {
        let admin = self.config.admin;
        let listeners = self.listeners();
        eventually(START_TIMEOUT, "vmesh to answer GET /live with 200", || {
            if let Some(status) = self.process.try_exit() {
                panic!(
                    "vmesh exited during start-up with {status}\n--- config ---\n{}\n--- stderr ---\n{}",
                    self.config.to_toml(),
                    self.process.stderr_tail(60)
                );
            }
            let response = http::get(admin, "/live")?;
            if response.status != 200 {
                return Err(format!("status {}", response.status));
            }
            for addr in &listeners {
                TcpStream::connect_timeout(addr, Duration::from_secs(1))
                    .map_err(|e| format!("listener {addr}: {e}"))?;
            }
            Ok(())
        });
    }

    fn listeners(&self) -> Vec<SocketAddr> {
        let c = &self.config;
        c.inbound
            .iter()
            .map(|i| i.listen)
            .chain(c.shared_outbound)
            .chain(c.outbounds.iter().filter_map(|o| o.listen))
            .collect()
    }

    /// The admin address.
    pub fn admin_addr(&self) -> SocketAddr {
        self.config.admin
    }

    /// `http://<admin><path>`.
    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.config.admin)
    }

    /// `GET <path>` on the admin port; panics if the request fails at the transport level.
    pub fn admin_get(&self, path: &str) -> HttpResponse {
        http::get(self.config.admin, path).unwrap_or_else(|e| panic!("GET {path} on admin: {e}"))
    }

    /// `GET <path>` on the admin port, expecting 200 and a JSON body.
    pub fn admin_json(&self, path: &str) -> serde_json::Value {
        let response = self.admin_get(path);
        assert_eq!(response.status, 200, "GET {path}: {}", response.text());
        response.json()
    }

    /// The listen address of the outbound for `service`.
    pub fn outbound_addr(&self, service: &str) -> SocketAddr {
        self.config
            .outbound_for(service)
            .listen
            .unwrap_or_else(|| panic!("outbound {service} has no listen port"))
    }

    /// `http://<outbound listen of service><path>`.
    pub fn outbound_url(&self, service: &str, path: &str) -> String {
        format!("http://{}{path}", self.outbound_addr(service))
    }

    /// The inbound listen address.
    pub fn inbound_addr(&self) -> SocketAddr {
        self.config
            .inbound
            .as_ref()
            .map(|i| i.listen)
            .expect("agent has no [inbound]")
    }

    /// `http://<inbound listen><path>`.
    pub fn inbound_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.inbound_addr())
    }

    /// The shared outbound address.
    pub fn shared_addr(&self) -> SocketAddr {
        self.config.shared_outbound.expect("agent has no shared outbound port")
    }

    /// `http://<shared outbound><path>`.
    pub fn shared_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.shared_addr())
    }

    /// The config the agent was started (or last re-configured) with.
    pub fn config(&self) -> AgentBuilder {
        self.config.clone()
    }

    /// The config file path.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The agent's temp dir (config, logs, data).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Overwrites the config file with `config` (same admin port) without signalling.
    pub fn write_config(&mut self, config: AgentBuilder) {
        assert_eq!(config.admin, self.config.admin, "a reload cannot move the admin port");
        let data_dir = config
            .data_dir
            .clone()
            .or_else(|| self.config.data_dir.clone())
            .unwrap_or_else(|| self.dir.path().join("data"));
        let config = config.agent_set("data_dir", data_dir.display().to_string());
        std::fs::write(&self.config_path, config.to_toml()).expect("write agent config");
        self.config = config;
    }

    /// Overwrites the config file with raw text (e.g. an invalid config) without signalling.
    pub fn write_raw_config(&self, text: &str) {
        std::fs::write(&self.config_path, text).expect("write agent config");
    }

    /// Writes `config` and sends SIGHUP.
    pub fn reload(&mut self, config: AgentBuilder) {
        self.write_config(config);
        self.send_signal(Signal::SIGHUP);
    }

    /// Sends `signal` to the agent.
    pub fn send_signal(&self, signal: Signal) {
        self.process.signal(signal);
    }

    /// Waits at most `timeout` for the agent to exit.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        self.process.wait_exit(timeout)
    }

    /// The exit status if the agent has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        self.process.try_exit()
    }

    /// `kill -9`: the agent gets no chance to deregister or flush anything.
    pub fn kill9(&mut self) {
        self.process.kill();
    }

    /// Starts `vmesh run` again with the same config file, ports and data_dir (after
    /// [`Agent::kill9`] or a SIGTERM exit; a still-running process is killed first) and waits
    /// until it is live. Each run logs to its own files (`vmesh.stderr`, `vmesh-run2.stderr`, ...).
    pub fn restart(&mut self) {
        self.process.kill();
        self.runs += 1;
        let name = format!("vmesh-run{}", self.runs);
        self.process = Process::spawn(&name, run_command(&self.config_path), self.dir.path());
        self.wait_live();
    }

    /// [`Agent::restart`] with a changed config (same admin port; the data_dir is kept unless
    /// `config` names another one).
    pub fn restart_with(&mut self, config: AgentBuilder) {
        self.process.kill();
        self.write_config(config);
        self.restart();
    }

    /// The state store directory (`agent.data_dir`).
    pub fn data_dir(&self) -> PathBuf {
        self.config
            .data_dir
            .clone()
            .unwrap_or_else(|| self.dir.path().join("data"))
    }

    /// `GET /status` on the admin port, as JSON.
    pub fn status_json(&self) -> serde_json::Value {
        self.admin_json("/status")
    }

    /// The `lifecycle` object of `GET /status` (identity, registration, ramp, drain, app health).
    pub fn lifecycle(&self) -> serde_json::Value {
        self.status_json()["lifecycle"].clone()
    }

    /// `GET /metrics` as text.
    pub fn metrics_text(&self) -> String {
        let response = self.admin_get("/metrics");
        assert_eq!(response.status, 200, "GET /metrics: {}", response.text());
        response.text()
    }

    /// The value of one series, named exactly as exposed (`vmesh_registered` or
    /// `vmesh_registry_writes_total{op="register"}`); `None` when absent.
    pub fn metric(&self, series: &str) -> Option<f64> {
        metric_value(&self.metrics_text(), series)
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Everything written to stdout (the access log).
    pub fn stdout(&self) -> String {
        self.process.stdout()
    }

    /// Everything written to stderr (the agent's own log).
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// The access log: every stdout line that parses as a JSON object.
    pub fn access_log(&self) -> Vec<serde_json::Value> {
        self.stdout()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l.trim()).ok())
            .filter(serde_json::Value::is_object)
            .collect()
    }

    /// Runs another `vmesh` subcommand with this agent's config (`vmesh <args> --config FILE`).
    pub fn run_cli(&self, args: &[&str]) -> Output {
        vmesh_command()
            .args(args)
            .arg("--config")
            .arg(&self.config_path)
            .output()
            .expect("run vmesh")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "=== vmesh (pid {}) config ===\n{}\n=== vmesh stderr (tail) ===\n{}\n=== vmesh stdout (tail) ===\n{}",
                self.process.pid(),
                std::fs::read_to_string(&self.config_path).unwrap_or_default(),
                self.process.stderr_tail(60),
                self.process.stdout_tail(20)
            );
            for run in 1..self.runs {
                let name = if run == 1 {
                    "vmesh".to_string()
                } else {
                    format!("vmesh-run{run}")
                };
                let log = std::fs::read_to_string(self.dir.path().join(format!("{name}.stderr"))).unwrap_or_default();
                let lines: Vec<&str> = log.lines().collect();
                eprintln!(
                    "=== vmesh stderr of earlier run {run} (tail) ===\n{}",
                    lines[lines.len().saturating_sub(30)..].join("\n")
                );
            }
        }
        self.process.kill();
    }
}

/// The value of `series` (name plus labels exactly as exposed) in Prometheus text `text`.
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .find(|(name, _)| name.trim() == series)
        .and_then(|(_, value)| value.trim().parse().ok())
}

/// A TOML table written inline, for config pieces the builders have no method for (an
/// `[outbound.outlier]` section, a whole `[[route]]` rule). Panics on bad TOML.
pub fn toml_table(text: &str) -> Table {
    text.parse::<Table>()
        .unwrap_or_else(|e| panic!("bad TOML in a test config piece: {e}\n{text}"))
}

/// Runs `vmesh check-config --config <path>` and returns its output.
pub fn check_config(path: &Path) -> Output {
    vmesh_command()
        .arg("check-config")
        .arg("--config")
        .arg(path)
        .output()
        .expect("run vmesh check-config")
}

/// A `Command` for the vmesh binary with every `VMESH_*` variable of the test environment
/// removed: the agent reads `VMESH_<SECTION>__<KEY>` as config overrides and `VMESH_LOG` as its
/// log filter, and a developer's shell must not change what a test configured.
pub fn vmesh_command() -> Command {
    let mut cmd = Command::new(vmesh_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("VMESH_") {
            cmd.env_remove(key);
        }
    }
    cmd
}
