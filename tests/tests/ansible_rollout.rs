//! Fleet operations for real: the Ansible role and playbooks in `ansible/` and the CD hooks in
//! `packaging/hooks/`.
//!
//! - `ansible_lint_passes_the_production_profile`: `ansible-lint` on `ansible/` with the
//!   production profile; the static test inventory parses.
//! - `install_and_rolling_rollout_under_load_lose_no_request`: two test hosts on this machine,
//!   `vm1` and `vm2` (local connections with their own ports, directories and node names), each
//!   running its app (`tests/fixtures/upstream.py` answering `x-upstream-name: vm1|vm2`) behind a
//!   vmesh registered as "orders" in the Consul double. `install.yml` brings both up
//!   registered; run again with a changed variable it reloads the agents (no restart); a third
//!   vmesh started by the test (the caller, whose outbound "orders" is
//!   discovered from Consul) carries steady traffic while `rollout.yml` (serial 1, restarting
//!   the agent and the app on each host) and then `app-restart.yml` (one host) run: no request
//!   fails, each host is drained and undrained in turn, and both hosts serve afterwards.
//! - `cd_hooks_drain_undrain_and_exit_codes`: `pre-stop` and `post-start` against a real agent.
//!
//! The hosts run vmesh with `vmesh_service_manager=process` (PID 1 here is not systemd) and
//! install it with `vmesh_install_method=binary` from `target/debug/vmesh`: both hosts share
//! this machine's single dpkg database, which can hold one vmesh installation, not two with
//! their own paths, and installing the .deb would also put a `vmesh` user and unit on the
//! developer's machine (the packaging tests own that). The role's package path (apt/dnf from a
//! file or a repository) is covered by ansible-lint and the playbooks' syntax check.
//!
//! A missing `ansible-playbook` or `ansible-lint` fails the test naming
//! `scripts/install-ansible-deps.sh`.

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};
use tempfile::TempDir;
use vmesh_tests::ansible::{self, PlaybookRun};
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{self, passing_ids, summary, CliRun, Identity, Load};
use vmesh_tests::{eventually, fixture, free_addr, tools, vmesh_bin, workspace_root, Upstream};

/// The config change the rollout test makes after the first install (and keeps).
const LOG_LEVEL: &str = "vmesh_log_level=info,vmesh_agent::lifecycle=debug";

/// The playbooks drive processes on shared ports and CPUs: one test of this file at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

// === tools ===

/// The interpreter that runs the fixtures, as an absolute path (`ansible_python_interpreter`).
fn python_executable() -> String {
    let out = tools::command(&tools::python())
        .args(["-c", "import sys; print(sys.executable)"])
        .output()
        .expect("run python");
    assert!(out.status.success(), "python -c sys.executable failed");
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

// === the test hosts ===

/// One test "host": its directories, ports and app, all on this machine.
struct TestHost {
    name: String,
    dir: PathBuf,
    admin: SocketAddr,
    inbound: SocketAddr,
    app: SocketAddr,
}

impl TestHost {
    fn new(root: &Path, name: &str) -> TestHost {
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("create host dir");
        let host = TestHost {
            name: name.to_string(),
            dir,
            admin: free_addr(),
            inbound: free_addr(),
            app: free_addr(),
        };
        host.write_app_ctl();
        host
    }

    /// The host's stand-in for `systemctl restart <app>`: the Python upstream named after the
    /// host, as a background process with a pid file.
    fn write_app_ctl(&self) {
        let d = self.dir.display();
        let script = format!(
            r#"#!/bin/sh
# Test host {name}: its application (tests/fixtures/upstream.py, x-upstream-name: {name}).
# app.sh start|stop|restart; what rollout_app_restart_command runs on this host.
set -u
PIDFILE='{d}/app.pid'
stop() {{
  [ -s "$PIDFILE" ] || return 0
  pid=$(cat "$PIDFILE")
  kill -TERM "$pid" 2>/dev/null
  i=0
  while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 100 ]; do sleep 0.05; i=$((i + 1)); done
  kill -KILL "$pid" 2>/dev/null
  rm -f "$PIDFILE"
}}
start() {{
  PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 setsid '{python}' '{upstream}' --port {port} --name {name} </dev/null >>'{d}/app.log' 2>&1 &
  echo $! >"$PIDFILE"
}}
case "${{1:-}}" in
  start) start ;;
  stop) stop ;;
  restart) stop; start ;;
  *) echo "usage: $0 start|stop|restart" >&2; exit 64 ;;
esac
"#,
            name = self.name,
            python = python_executable(),
            upstream = fixture("upstream.py").display(),
            port = self.app.port(),
        );
        let path = self.app_ctl();
        std::fs::write(&path, script).expect("write app.sh");
        let status = Command::new("chmod").arg("+x").arg(&path).status().expect("chmod");
        assert!(status.success());
    }

    fn app_ctl(&self) -> PathBuf {
        self.dir.join("app.sh")
    }

    /// Runs `app.sh <action>` and, for a start, waits until the app accepts connections.
    fn app(&self, action: &str) {
        let status = Command::new(self.app_ctl()).arg(action).status().expect("run app.sh");
        assert!(status.success(), "app.sh {action} on {} failed", self.name);
        if action != "stop" {
            let addr = self.app;
            eventually(
                Duration::from_secs(20),
                &format!("{}'s app to accept on {addr}", self.name),
                || {
                    TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                        .map(drop)
                        .map_err(|e| e.to_string())
                },
            );
        }
    }

    fn pid(&self, file: &str) -> Option<i32> {
        std::fs::read_to_string(self.dir.join(file))
            .ok()
            .and_then(|s| s.trim().parse().ok())
    }

    /// The pid of the agent started by the role (its vmeshctl pid file).
    fn agent_pid(&self) -> Option<i32> {
        self.pid("run/vmesh.pid")
    }

    fn app_pid(&self) -> Option<i32> {
        self.pid("app.pid")
    }

    fn config_file(&self) -> PathBuf {
        self.dir.join("etc").join("vmesh.toml")
    }

    /// `GET /status` of the host's agent.
    fn status(&self) -> Value {
        vmesh_tests::http::get(self.admin, "/status")
            .map(|r| r.json())
            .unwrap_or_else(|e| panic!("GET /status of {}: {e}", self.name))
    }

    /// The inventory variables of this host.
    fn hostvars(&self) -> Value {
        let d = &self.dir;
        json!({
            "vmesh_node": self.name,
            "vmesh_bin": d.join("bin").join("vmesh"),
            "vmesh_config_dir": d.join("etc"),
            "vmesh_data_dir": d.join("data"),
            "vmesh_run_dir": d.join("run"),
            "vmesh_admin_listen": self.admin.to_string(),
            "vmesh_inbound_listen": self.inbound.to_string(),
            "vmesh_inbound_app": self.app.to_string(),
            "rollout_app_restart_command": format!("{} restart", self.app_ctl().display()),
        })
    }

    /// Kills whatever the host runs (agent started by Ansible, app), by pid file; a pid is
    /// only killed while its command line still names this host's directory.
    fn kill_all(&self) {
        for file in ["run/vmesh.pid", "app.pid"] {
            let Some(pid) = self.pid(file) else { continue };
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            let mine = cmdline.contains(&self.dir.display().to_string())
                || cmdline.contains(&format!("--port {}", self.app.port()));
            if mine {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }

    fn log_tail(&self, file: &str, lines: usize) -> String {
        let text = std::fs::read_to_string(self.dir.join(file)).unwrap_or_default();
        let all: Vec<&str> = text.lines().filter(|l| !l.starts_with('{')).collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The test hosts, their temp dir and the inventory; everything they run dies with them.
struct Fleet {
    hosts: Vec<TestHost>,
    inventory: PathBuf,
    dir: TempDir,
}

impl Fleet {
    fn new(names: &[&str], consul: &ConsulDouble) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("vmesh-ansible-")
            .tempdir()
            .expect("create fleet temp dir");
        let hosts: Vec<TestHost> = names.iter().map(|n| TestHost::new(dir.path(), n)).collect();
        let mut vars = ansible::orders_vars(
            &consul.base_url(),
            "{{ vmesh_config_dir }}/identity.toml",
            json!({
                "ansible_connection": "local",
                "ansible_python_interpreter": python_executable(),
                "ansible_become": false,
                "vmesh_service_manager": "process",
                "vmesh_install_method": "binary",
                "vmesh_binary_src": vmesh_bin(),
                "vmesh_process_stop_timeout": 20,
            }),
        );
        if let Ok(filter) = std::env::var("VMESH_TEST_LOG") {
            vars["vmesh_process_env"] = json!({ "VMESH_LOG": filter });
        }
        let hostmap: serde_json::Map<String, Value> = hosts.iter().map(|h| (h.name.clone(), h.hostvars())).collect();
        let path = ansible::write_inventory(dir.path(), hostmap, vars);
        Fleet {
            hosts,
            inventory: path,
            dir,
        }
    }

    fn host(&self, name: &str) -> &TestHost {
        self.hosts.iter().find(|h| h.name == name).expect("host")
    }

    /// `ansible-playbook -i <inventory> ansible/<playbook> <args>`, bounded by `timeout`.
    fn playbook(&self, playbook: &str, args: &[&str], timeout: Duration) -> PlaybookRun {
        let cmd = ansible::command("ansible-playbook", self.dir.path());
        ansible::run_playbook(cmd, &self.inventory, playbook, args, self.dir.path(), timeout)
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for h in &self.hosts {
                eprintln!(
                    "=== {} vmesh.toml ===\n{}\n=== {} agent log (tail, access log lines left out) ===\n{}\n=== {} app log (tail) ===\n{}",
                    h.name,
                    std::fs::read_to_string(h.config_file()).unwrap_or_default(),
                    h.name,
                    h.log_tail("run/vmesh.log", 40),
                    h.name,
                    h.log_tail("app.log", 10)
                );
            }
        }
        for h in &self.hosts {
            h.kill_all();
        }
    }
}

// === tests ===

#[test]
fn ansible_lint_passes_the_production_profile() {
    let _serial = serial();
    let tmp = tempfile::tempdir().expect("tempdir");
    let out = ansible::command("ansible-lint", tmp.path())
        .args(["-c", "ansible/.ansible-lint", "--nocolor", "ansible/"])
        .output()
        .expect("run ansible-lint");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ansible-lint ansible/ is not clean:\n{text}");
    assert!(
        text.contains("Profile 'production' was required, and it passed"),
        "ansible-lint did not check the production profile:\n{text}"
    );

    // The static test inventory (for trying the playbooks by hand) parses and has both hosts.
    let out = ansible::command("ansible-inventory", tmp.path())
        .args(["-i", "ansible/tests/inventory.yml", "--list"])
        .output()
        .expect("run ansible-inventory");
    assert!(
        out.status.success(),
        "ansible-inventory: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let inventory: Value = serde_json::from_slice(&out.stdout).expect("ansible-inventory --list prints JSON");
    let hosts = &inventory["vmesh"]["hosts"];
    assert_eq!(hosts, &json!(["vm1", "vm2"]), "{inventory}");
}

#[test]
fn install_and_rolling_rollout_under_load_lose_no_request() {
    let _serial = serial();
    ansible::tool("ansible-playbook");
    let consul = ConsulDouble::spawn();
    let fleet = Fleet::new(&["vm1", "vm2"], &consul);
    for h in &fleet.hosts {
        h.app("start");
    }

    // install.yml: binary, config, identity, agent started; both registered and passing.
    let install = fleet.playbook("install.yml", &[], Duration::from_secs(180));
    install.expect_ok();
    lifecycle::wait_passing(
        &consul,
        "orders",
        &["orders-vm1", "orders-vm2"],
        Duration::from_secs(20),
    );
    for h in &fleet.hosts {
        let lc = h.status()["lifecycle"].clone();
        assert_eq!(lc["registered"], true, "{} after install.yml: {lc}", h.name);
        assert_eq!(lc["drain"], "serving", "{} after install.yml: {lc}", h.name);
        assert!(h.agent_pid().is_some(), "{}: no pid file from vmeshctl", h.name);
    }

    // A changed config reloads the agents (check-config + SIGHUP), it does not restart them.
    let pids: Vec<Option<i32>> = fleet.hosts.iter().map(TestHost::agent_pid).collect();
    let reloads = |h: &TestHost| h.status()["reload"]["reloads"].as_u64().unwrap_or(0);
    let reloads_before: Vec<u64> = fleet.hosts.iter().map(reloads).collect();
    let changed = fleet.playbook("install.yml", &["-e", LOG_LEVEL], Duration::from_secs(120));
    changed.expect_ok();
    for (i, h) in fleet.hosts.iter().enumerate() {
        assert_eq!(
            h.agent_pid(),
            pids[i],
            "{}: a config change must not restart the agent",
            h.name
        );
        assert_eq!(
            reloads(h),
            reloads_before[i] + 1,
            "{}: the agent was not reloaded once",
            h.name
        );
        let reload = changed.task_results("Reload the vmesh process (check-config, then SIGHUP)", &h.name);
        assert!(
            reload.iter().any(|l| l.starts_with("changed:")),
            "{}: no reload in the output: {reload:?}\n{}",
            h.name,
            changed.stdout
        );
    }

    // The caller: a third vmesh (itself an instance of "frontend": an agent with a registry
    // needs an inbound) whose outbound "orders" has no endpoints: discovered from Consul.
    let caller = lifecycle::Caller::start(|b| lifecycle::consul(b, &consul));
    let want: Vec<SocketAddr> = fleet.hosts.iter().map(|h| h.inbound).collect();
    lifecycle::wait_discovered_within(Duration::from_secs(20), &caller, "orders", &want);

    // Steady traffic through the caller for the whole rollout: 2 clients, each request ~20 ms
    // at the app; bounded in time and count.
    let load = Load::start(
        caller.outbound_addr("orders"),
        "/slow?ms=20",
        2,
        Duration::from_secs(300),
        60_000,
    );
    load.wait_answered_by(&["vm1", "vm2"], 10, Instant::now(), Duration::from_secs(20), "the load");

    let agents_before: Vec<Option<i32>> = fleet.hosts.iter().map(TestHost::agent_pid).collect();
    let apps_before: Vec<Option<i32>> = fleet.hosts.iter().map(TestHost::app_pid).collect();
    let maintenance_before = consul.writes()["maintenance"].as_u64().unwrap_or(0);

    // rollout.yml: serial 1; per host drain -> role (nothing to change) -> agent restart ->
    // app restart -> wait healthy -> undrain -> wait for 50% of the ramp.
    let t_rollout = Instant::now();
    let rollout = fleet.playbook(
        "rollout.yml",
        &["-e", LOG_LEVEL, "-e", "rollout_restart_agent=true"],
        Duration::from_secs(240),
    );
    rollout.expect_ok();
    let rollout_took = t_rollout.elapsed();
    eprintln!("rollout.yml took {rollout_took:?}");

    // Each host drained, undrained and ramped before the next one was touched.
    let steps = [
        "vmesh vm1: drained",
        "vmesh vm1: undrained",
        "vmesh vm1: serving, effective weight",
        "vmesh vm2: drained",
        "vmesh vm2: undrained",
        "vmesh vm2: serving, effective weight",
    ];
    rollout.assert_in_order("the rollout", &steps);
    // The role ran on each host with nothing to change in vmesh.toml (no reload), and the
    // agent and the app were restarted on each host.
    for h in &fleet.hosts {
        let results = rollout.task_results("Write vmesh.toml (validated with vmesh check-config)", &h.name);
        assert!(
            !results.is_empty() && results.iter().all(|l| l.starts_with("ok:")),
            "{}: vmesh.toml should be unchanged by the rollout: {results:?}",
            h.name
        );
    }
    for (i, h) in fleet.hosts.iter().enumerate() {
        assert!(
            h.agent_pid().is_some() && h.agent_pid() != agents_before[i],
            "{}: the agent was not restarted ({:?} -> {:?})",
            h.name,
            agents_before[i],
            h.agent_pid()
        );
        assert!(
            h.app_pid().is_some() && h.app_pid() != apps_before[i],
            "{}: the app was not restarted",
            h.name
        );
        let lc = h.status()["lifecycle"].clone();
        assert_eq!(lc["drain"], "serving", "{} after the rollout: {lc}", h.name);
        assert_eq!(lc["registered"], true, "{} after the rollout: {lc}", h.name);
    }
    // The registry saw each host go into maintenance (the drain); both pass again.
    let maintenance = consul.writes()["maintenance"].as_u64().unwrap_or(0);
    assert!(
        maintenance >= maintenance_before + 2,
        "expected a maintenance write per drained host: {maintenance_before} -> {maintenance}"
    );
    assert_eq!(passing_ids(&consul, "orders"), ["orders-vm1", "orders-vm2"]);

    // Both hosts take traffic after the rollout.
    load.wait_answered_by(
        &["vm1", "vm2"],
        10,
        Instant::now(),
        Duration::from_secs(30),
        "after the rollout",
    );

    // app-restart.yml for a CD pipeline, on one host: drain -> restart the app -> undrain.
    let vm2 = fleet.host("vm2");
    let (agent_vm2, app_vm2) = (vm2.agent_pid(), vm2.app_pid());
    let restart = fleet.playbook("app-restart.yml", &["--limit", "vm2"], Duration::from_secs(120));
    restart.expect_ok();
    assert!(
        restart.position("vmesh vm2: drained") < restart.position("vmesh vm2: undrained"),
        "{}",
        restart.stdout
    );
    assert!(
        !restart.stdout.contains("vmesh vm1:"),
        "--limit vm2 touched vm1:\n{}",
        restart.stdout
    );
    assert_ne!(vm2.app_pid(), app_vm2, "app-restart.yml did not restart vm2's app");
    assert_eq!(vm2.agent_pid(), agent_vm2, "app-restart.yml must leave the agent alone");
    load.wait_answered_by(
        &["vm2"],
        10,
        Instant::now(),
        Duration::from_secs(30),
        "after app-restart.yml",
    );

    assert!(
        !load.is_finished(),
        "the load ended early (bound reached): {:?}",
        summary(&load.records())
    );
    let records = load.stop();
    eprintln!("load through the caller: {:?}", summary(&records));
    let failed: Vec<_> = records.iter().filter(|r| r.outcome.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed during the rollout: first {:?}; all: {:?}\n--- rollout output ---\n{}",
        failed.len(),
        records.len(),
        failed.first(),
        summary(&records),
        rollout.stdout
    );
    assert!(
        records.len() >= 300,
        "too little load to prove anything: {:?}",
        summary(&records)
    );
    drop(caller);
}

/// Runs a CD hook from packaging/hooks with `env`, returning its exit code and output.
fn hook(name: &str, env: &[(&str, &str)]) -> CliRun {
    let mut cmd = Command::new("bash");
    cmd.arg(workspace_root().join("packaging").join("hooks").join(name));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("VMESH_") {
            cmd.env_remove(key);
        }
    }
    cmd.env("VMESH_BIN", vmesh_bin());
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run hook").into()
}

#[test]
fn cd_hooks_drain_undrain_and_exit_codes() {
    let _serial = serial();
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let mut app = Upstream::python("app").spawn();
    let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "2s"), &consul).start();
    let config = agent.config_path().display().to_string();
    let wait_ids = |want: &[&str]| lifecycle::wait_passing(&consul, "orders", want, Duration::from_secs(10));
    wait_ids(&["orders-web-01"]);

    // pre-stop: drained, out of the registry.
    let r = hook("pre-stop", &[("VMESH_CONFIG", &config), ("VMESH_DRAIN_TIMEOUT", "10s")]);
    assert_eq!(r.code, 0, "pre-stop: {r}");
    assert!(
        r.stdout.contains("drained"),
        "pre-stop prints the drain's progress: {r}"
    );
    assert_eq!(agent.lifecycle()["drain"], "drained");
    assert!(passing_ids(&consul, "orders").is_empty(), "drained: not passing");

    // post-start: healthy app -> registered, and it waits for the slow start to reach 50.
    let r = hook(
        "post-start",
        &[
            ("VMESH_CONFIG", &config),
            ("VMESH_RAMP_THRESHOLD", "50"),
            ("VMESH_RAMP_TIMEOUT", "30"),
        ],
    );
    assert_eq!(r.code, 0, "post-start: {r}");
    let lc = agent.lifecycle();
    assert_eq!(lc["drain"], "serving", "{lc}");
    assert!(
        lc["effective_weight"].as_u64().unwrap_or(0) >= 50,
        "post-start returned before the ramp reached 50: {lc}"
    );
    wait_ids(&["orders-web-01"]);

    // Exit codes: 3 unreachable admin API, 64 usage, 2 unreadable config.
    let nowhere = free_addr().to_string();
    let r = hook("pre-stop", &[("VMESH_CONFIG", &config), ("VMESH_ADMIN", &nowhere)]);
    assert_eq!(r.code, 3, "pre-stop with no agent at the admin address: {r}");
    let r = hook(
        "pre-stop",
        &[("VMESH_CONFIG", &config), ("VMESH_DRAIN_TIMEOUT", "soon")],
    );
    assert_eq!(r.code, 64, "pre-stop with a malformed timeout: {r}");
    let r = hook(
        "post-start",
        &[("VMESH_CONFIG", &config), ("VMESH_RAMP_THRESHOLD", "101")],
    );
    assert_eq!(r.code, 64, "post-start with a threshold above 100: {r}");
    let missing = dir.path().join("missing.toml").display().to_string();
    let r = hook("pre-stop", &[("VMESH_CONFIG", &missing)]);
    assert_eq!(r.code, 2, "pre-stop with an unreadable config: {r}");
    assert_eq!(agent.lifecycle()["drain"], "serving", "a failed hook must not drain");

    // The app is down after the deploy: post-start gives up after its timeout with exit 1 and
    // the instance stays drained.
    let r = hook("pre-stop", &[("VMESH_CONFIG", &config)]);
    assert_eq!(r.code, 0, "pre-stop: {r}");
    app.kill();
    // The app stays down long enough for the agent's health check to see it (2 failed checks
    // 500 ms apart). `vmesh undrain` trusts the agent's last health state, so an undrain within
    // that window would still pass: reported as an agent issue, not covered here.
    eventually(
        Duration::from_secs(10),
        "the agent to see the app down",
        || match agent.lifecycle()["app"]["healthy"].as_bool() {
            Some(false) => Ok(()),
            other => Err(format!("app.healthy = {other:?}")),
        },
    );
    let t = Instant::now();
    let r = hook(
        "post-start",
        &[("VMESH_CONFIG", &config), ("VMESH_UNDRAIN_TIMEOUT", "2s")],
    );
    assert_eq!(r.code, 1, "post-start with the app down: {r}");
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "post-start overran its timeout: {:?}",
        t.elapsed()
    );
    assert_eq!(agent.lifecycle()["drain"], "drained", "an unhealthy app stays drained");
    assert!(passing_ids(&consul, "orders").is_empty());
}
