//! The fleet path on real systemd hosts: two `systemd-nspawn` containers booted with systemd
//! (`vm1`, `vm2`, each over this machine's root under an overlay: `vmesh_tests::nspawn`), each
//! with the .deb installed by the Ansible role (`ansible/install.yml`, apt from the package
//! file), the app as a systemd service (`fleet-app.service`: `tests/fixtures/upstream.py`
//! answering `x-upstream-name: vm1|vm2`), vmesh.service behind vmesh.socket (the role's
//! default) registered as "orders" in the Consul double on this machine. A caller on this
//! machine (a vmesh whose outbound "orders" is discovered from Consul) carries steady
//! keep-alive load: persistent HTTP/1.1 connections from the clients to the caller, pooled ones
//! from the caller to the hosts.
//!
//! Then, under that load: `systemctl restart vmesh` on a host that is NOT drained, with
//! keep-alive clients on its inbound port (the socket keeps the port open: no failed request);
//! `rollout.yml` upgrades the package to the next version (serial 1: drain, apt, restart,
//! health, undrain, ramp); `app-restart.yml` restarts the app service on each host. No request
//! fails; each host is drained (exit 0) before it is touched and the next host is drained only
//! after the previous one is back at 50% of its weight; Consul sees each drain and both hosts
//! passing at the end; each host runs the new version.
//!
//! How Ansible reaches the containers: there is no sshd here and ansible-core has no
//! nspawn/machinectl connection plugin (community.general is not installed), so each host is a
//! `local` connection whose `ansible_python_interpreter` is a wrapper that `nsenter`s into the
//! container's namespaces and root before it runs the container's python3
//! ([`vmesh_tests::nspawn::Container::python_wrapper`]); modules are piped to it
//! (pipelining), and files the modules read (templates, the package) go through Ansible's
//! remote temp directory, bound into each container at the same path. The containers share
//! this machine's network namespace: every port is a loopback port of this machine chosen at
//! run time, so the caller, the registry and the hosts reach each other on 127.0.0.1.
//!
//! Needs root, systemd-nspawn (`scripts/install-packaging-deps.sh`) and ansible-playbook
//! (`scripts/install-ansible-deps.sh`); a missing tool fails the test naming its script.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{self, passing_ids, summary, Record};
use vmesh_tests::nspawn::{Container, Overlay};
use vmesh_tests::packages::{assert_root, host_lock, packages, repack_with_version, require, VERSION};
use vmesh_tests::{eventually, fixture, free_addr, workspace_root, Process};

const ANSIBLE_HINT: &str = "run `bash scripts/install-ansible-deps.sh` (pinned ansible-core and ansible-lint)";

// === keep-alive load ===

/// Client threads, each sending `GET <path>` back to back on ONE persistent HTTP/1.1
/// connection (a new one only when the server closes it), for at most `max_duration` and
/// `max_requests` in total. Like every keep-alive client (RFC 9112 §9.3.1), a request that
/// finds its reused connection closed before a byte of the answer came is sent again once on a
/// new connection; those are counted in `stale_retries`. Any other error, or a status other than
/// 200, is a failed request.
struct KeepAliveLoad {
    stop: Arc<AtomicBool>,
    records: Arc<Mutex<Vec<Record>>>,
    counters: Arc<Counters>,
    threads: Vec<JoinHandle<()>>,
}

/// A failed exchange: whether the server might just have closed an idle reused connection.
struct ExchangeError {
    stale: bool,
    what: String,
}

/// What the clients of a [`KeepAliveLoad`] count.
#[derive(Default)]
struct Counters {
    /// Connections opened.
    connections: AtomicUsize,
    /// Answers that came on a reused connection.
    reused: AtomicUsize,
    /// Requests sent again after a reused connection was found closed.
    stale_retries: AtomicUsize,
}

fn exchange(
    conn: &mut Option<BufReader<TcpStream>>,
    addr: SocketAddr,
    path: &str,
    counters: &Counters,
) -> Result<String, ExchangeError> {
    let reused = conn.is_some();
    let fail = |stale: bool, what: String| ExchangeError {
        stale: stale && reused,
        what,
    };
    if conn.is_none() {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .map_err(|e| fail(false, format!("connect: {e}")))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| fail(false, e.to_string()))?;
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .map_err(|e| fail(false, e.to_string()))?;
        counters.connections.fetch_add(1, Ordering::SeqCst);
        *conn = Some(BufReader::new(stream));
    }
    let Some(reader) = conn.as_mut() else {
        return Err(fail(false, "no connection".into()));
    };
    let request = format!("GET {path} HTTP/1.1\r\nHost: orders\r\n\r\n");
    reader
        .get_mut()
        .write_all(request.as_bytes())
        .map_err(|e| fail(true, format!("write: {e}")))?;
    let mut status_line = String::new();
    match reader.read_line(&mut status_line) {
        Ok(0) => return Err(fail(true, "closed before the answer".into())),
        Ok(_) => {}
        Err(e) => return Err(fail(true, format!("read: {e}"))),
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail(false, format!("bad status line {status_line:?}")))?;
    let (mut length, mut chunked, mut close, mut upstream) = (0usize, false, false, String::new());
    loop {
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .map_err(|e| fail(false, format!("read headers: {e}")))?;
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
        match name.as_str() {
            "content-length" => length = value.parse().unwrap_or(0),
            "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
            "connection" => close = value.eq_ignore_ascii_case("close"),
            "x-upstream-name" => upstream = value.to_owned(),
            _ => {}
        }
    }
    if chunked {
        loop {
            let mut size = String::new();
            reader
                .read_line(&mut size)
                .map_err(|e| fail(false, format!("chunk: {e}")))?;
            let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                .map_err(|_| fail(false, format!("bad chunk size {size:?}")))?;
            let mut body = vec![0; n + 2];
            reader
                .read_exact(&mut body)
                .map_err(|e| fail(false, format!("chunk: {e}")))?;
            if n == 0 {
                break;
            }
        }
    } else {
        let mut body = vec![0; length];
        reader
            .read_exact(&mut body)
            .map_err(|e| fail(false, format!("body: {e}")))?;
    }
    if close {
        *conn = None;
    }
    if reused {
        counters.reused.fetch_add(1, Ordering::SeqCst);
    }
    if status == 200 {
        Ok(upstream)
    } else {
        Err(fail(false, format!("status {status}")))
    }
}

impl KeepAliveLoad {
    fn start(
        addr: SocketAddr,
        path: &str,
        threads: usize,
        max_duration: Duration,
        max_requests: usize,
    ) -> KeepAliveLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let counters = Arc::new(Counters::default());
        let deadline = Instant::now() + max_duration;
        let threads = (0..threads)
            .map(|_| {
                let (stop, records, path) = (stop.clone(), records.clone(), path.to_owned());
                let counters = counters.clone();
                std::thread::spawn(move || {
                    let mut conn = None;
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                        if records.lock().map(|r| r.len()).unwrap_or(usize::MAX) >= max_requests {
                            break;
                        }
                        let start = Instant::now();
                        let mut outcome = exchange(&mut conn, addr, &path, &counters);
                        if let Err(ExchangeError { stale: true, .. }) = outcome {
                            counters.stale_retries.fetch_add(1, Ordering::SeqCst);
                            conn = None;
                            outcome = exchange(&mut conn, addr, &path, &counters);
                        }
                        let outcome = outcome.map_err(|e| {
                            conn = None;
                            e.what
                        });
                        let end = Instant::now();
                        if let Ok(mut r) = records.lock() {
                            r.push(Record { start, end, outcome });
                        }
                    }
                })
            })
            .collect();
        KeepAliveLoad {
            stop,
            records,
            counters,
            threads,
        }
    }

    fn records(&self) -> Vec<Record> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    fn answered_by_since(&self, upstream: &str, since: Instant) -> usize {
        self.records()
            .iter()
            .filter(|r| r.start >= since && r.outcome.as_deref() == Ok(upstream))
            .count()
    }

    fn is_finished(&self) -> bool {
        self.threads.iter().all(JoinHandle::is_finished)
    }

    /// Stops the clients; every record and what the clients counted.
    fn stop(self) -> (Vec<Record>, Arc<Counters>) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load client thread");
        }
        let records = self.records.lock().map(|r| r.clone()).unwrap_or_default();
        (records, self.counters)
    }
}

/// Panics unless every request of `records` succeeded, there were at least `min`, and at
/// least `min_reused` were answered on a reused connection.
fn assert_no_failure(
    what: &str,
    records: &[Record],
    counters: &Counters,
    min: usize,
    min_reused: usize,
    context: &str,
) {
    let failed: Vec<&Record> = records.iter().filter(|r| r.outcome.is_err()).collect();
    let (connections, reused, stale) = (
        counters.connections.load(Ordering::SeqCst),
        counters.reused.load(Ordering::SeqCst),
        counters.stale_retries.load(Ordering::SeqCst),
    );
    eprintln!(
        "{what}: {} requests on {connections} connections, {reused} answered on a reused connection, \
         {stale} resent after a closed keep-alive connection: {:?}",
        records.len(),
        summary(records)
    );
    assert!(
        failed.is_empty(),
        "{what}: {} of {} requests failed: first {:?}; all {:?}\n{context}",
        failed.len(),
        records.len(),
        failed.first(),
        summary(records)
    );
    assert!(
        records.len() >= min,
        "{what}: too little load to prove anything: {:?}",
        summary(records)
    );
    assert!(
        reused >= min_reused,
        "{what}: only {reused} answers on a reused connection ({connections} connections): not keep-alive"
    );
}

// === ansible-playbook ===

/// A finished `ansible-playbook` run.
struct PlaybookRun {
    what: String,
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl PlaybookRun {
    /// Panics with the output unless the run exited 0 and no host failed or was unreachable.
    fn expect_ok(&self) -> &PlaybookRun {
        let recap: Vec<&str> = self
            .stdout
            .split("PLAY RECAP")
            .nth(1)
            .unwrap_or("")
            .lines()
            .filter(|l| l.contains("ok="))
            .collect();
        let clean = !recap.is_empty()
            && recap
                .iter()
                .all(|l| l.contains("unreachable=0") && l.contains("failed=0"));
        assert!(
            self.code == Some(0) && clean,
            "{} failed (exit {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    /// Byte offset of `needle` in the output; panics with the output when absent.
    fn position(&self, needle: &str) -> usize {
        self.stdout
            .find(needle)
            .unwrap_or_else(|| panic!("`{needle}` is not in the output of {}:\n{}", self.what, self.stdout))
    }

    /// The result lines (`ok: [host]`, `changed: [host]`, ...) of the task named `task` (in
    /// the role or the playbook) for `host`.
    fn task_results(&self, task: &str, host: &str) -> Vec<String> {
        let (plain, in_role, tag) = (format!("{task}]"), format!(" : {task}]"), format!("[{host}]"));
        self.stdout
            .replace("RUNNING HANDLER [", "TASK [")
            .split("TASK [")
            .skip(1)
            .filter(|block| {
                let first = block.lines().next().unwrap_or("");
                first.starts_with(&plain) || first.contains(&in_role)
            })
            .flat_map(|block| {
                block
                    .lines()
                    .skip(1)
                    .filter(|l| l.contains(&tag))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// The effective weights the rollout reported for `host` ("serving, effective weight N").
    fn reported_weights(&self, host: &str) -> Vec<u64> {
        let needle = format!("vmesh {host}: serving, effective weight");
        self.stdout
            .match_indices(&needle)
            .filter_map(|(i, _)| {
                self.stdout[i + needle.len()..]
                    .split_whitespace()
                    .next()
                    .and_then(|w| w.parse().ok())
            })
            .collect()
    }
}

// === the hosts ===

/// One booted host: its container and its loopback addresses (ports of this machine, which
/// the containers share).
struct Host {
    name: String,
    container: Container,
    admin: SocketAddr,
    inbound: SocketAddr,
    app: SocketAddr,
}

impl Host {
    /// `systemctl show -p <property> --value <unit>` in the host.
    fn unit_property(&self, unit: &str, property: &str) -> String {
        self.container
            .sh(&format!("systemctl show -p {property} --value {unit}"))
            .trim()
            .to_owned()
    }

    fn agent_pid(&self) -> String {
        self.unit_property("vmesh.service", "MainPID")
    }

    fn app_pid(&self) -> String {
        self.unit_property("fleet-app.service", "MainPID")
    }

    fn installed_version(&self) -> String {
        self.container
            .sh("dpkg-query -W -f='${Version}' vmesh")
            .trim()
            .to_owned()
    }

    fn status(&self) -> Value {
        vmesh_tests::http::get(self.admin, "/status")
            .map(|r| r.json())
            .unwrap_or_else(|e| panic!("GET /status of {}: {e}", self.name))
    }

    /// The inventory variables of this host.
    fn hostvars(&self, python: &Path) -> Value {
        json!({
            "ansible_python_interpreter": python,
            "vmesh_node": self.name,
            "vmesh_admin_listen": self.admin.to_string(),
            "vmesh_inbound_listen": self.inbound.to_string(),
            "vmesh_inbound_app": self.app.to_string(),
        })
    }

    /// What went on in the host, for a failing test.
    fn report(&self) -> String {
        format!(
            "=== {} vmesh.service (journal tail) ===\n{}\n=== {} vmesh.socket ===\n{}\n=== {} fleet-app.service ===\n{}",
            self.name,
            self.container.journal("vmesh.service", 40),
            self.name,
            self.container.journal("vmesh.socket", 10),
            self.name,
            self.container.journal("fleet-app.service", 10)
        )
    }
}

/// The app unit of a host: the Python upstream named after the host, on `app`.
fn app_unit(name: &str, app: SocketAddr) -> String {
    format!(
        "[Unit]\nDescription=the application of test host {name}\n\n[Service]\n\
         Environment=PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1\n\
         ExecStart=/usr/bin/python3 {} --host {} --port {} --name {name}\n\n\
         [Install]\nWantedBy=vmesh-test-host.target\n",
        fixture("upstream.py").display(),
        app.ip(),
        app.port()
    )
}

/// The fleet: the hosts, the inventory and Ansible's directories.
struct Fleet {
    hosts: Vec<Host>,
    dir: tempfile::TempDir,
    inventory: PathBuf,
}

impl Fleet {
    /// Boots one container per name (in parallel) with its app service enabled.
    fn boot(names: &[&str], consul: &ConsulDouble, deb: &Path) -> Fleet {
        let dir = tempfile::Builder::new()
            .prefix("vmesh-fleet-")
            .tempdir()
            .expect("create the fleet's directory");
        let remote_tmp = dir.path().join("ansible-remote");
        std::fs::create_dir_all(&remote_tmp).expect("mkdir ansible-remote");
        let booting: Vec<_> = names
            .iter()
            .map(|name| {
                let (admin, inbound, app) = (free_addr(), free_addr(), free_addr());
                let overlay = Overlay::mount(&format!("{name}-{}", std::process::id()));
                overlay.write("/etc/systemd/system/fleet-app.service", &app_unit(name, app), 0o644);
                overlay.symlink(
                    "/etc/systemd/system/fleet-app.service",
                    "/etc/systemd/system/vmesh-test-host.target.wants/fleet-app.service",
                );
                let remote_tmp_inside = remote_tmp.display().to_string();
                (
                    (*name).to_owned(),
                    admin,
                    inbound,
                    app,
                    overlay.bind(&remote_tmp, &remote_tmp_inside).boot(),
                )
            })
            .collect();
        let hosts: Vec<Host> = booting
            .into_iter()
            .map(|(name, admin, inbound, app, booting)| Host {
                name,
                container: booting.wait(Duration::from_secs(240)),
                admin,
                inbound,
                app,
            })
            .collect();

        let vars = json!({
            // Reached by a wrapper interpreter (see the module documentation); we are root.
            "ansible_connection": "local",
            "ansible_become": false,
            "vmesh_install_method": "package",
            "vmesh_package_file": deb,
            "vmesh_service_manager": "systemd",
            "vmesh_worker_threads": 1,
            "vmesh_drain_grace": "1s",
            "vmesh_drain_timeout": "10s",
            "vmesh_identity": {"service": "orders", "environment": "test", "zone": "z1", "version": "v1"},
            "vmesh_cmdb": {"kind": "file", "path": "/etc/vmesh/identity.toml", "refresh": "2s"},
            "vmesh_registry_kind": "consul",
            "vmesh_registry_address": consul.base_url(),
            "vmesh_inbound_health_path": "/healthz",
            "vmesh_inbound_health_interval": "500ms",
            "vmesh_inbound_ramp_window": "4s",
            "vmesh_config_overrides": {"registry": {"anti_entropy": "2s", "watch_wait": "5s"}},
            "vmesh_wait_ready": true,
            "rollout_app_restart_command": "systemctl restart fleet-app.service",
        });
        let hostmap: serde_json::Map<String, Value> = hosts
            .iter()
            .map(|h| (h.name.clone(), h.hostvars(&h.container.python_wrapper())))
            .collect();
        let inventory = json!({ "all": { "children": { "vmesh": { "hosts": hostmap, "vars": vars } } } });
        let path = dir.path().join("inventory.yml");
        std::fs::write(&path, serde_json::to_string_pretty(&inventory).expect("inventory json"))
            .expect("write inventory");
        Fleet {
            hosts,
            dir,
            inventory: path,
        }
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).expect("host")
    }

    /// `ansible-playbook -i <inventory> ansible/<playbook> <args>`, bounded by `limit`.
    fn playbook(&self, playbook: &str, args: &[&str], limit: Duration) -> PlaybookRun {
        let tool =
            which("ansible-playbook").unwrap_or_else(|| panic!("`ansible-playbook` is not installed: {ANSIBLE_HINT}"));
        let mut cmd = Command::new(tool);
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy().into_owned();
            if key.starts_with("VMESH_") || key.to_ascii_lowercase().ends_with("_proxy") {
                cmd.env_remove(key);
            }
        }
        let root = workspace_root();
        cmd.current_dir(&root)
            .env("ANSIBLE_CONFIG", root.join("ansible").join("ansible.cfg"))
            .env("ANSIBLE_NOCOLOR", "1")
            .env("ANSIBLE_FORCE_COLOR", "0")
            .env("ANSIBLE_PIPELINING", "1")
            .env("ANSIBLE_LOCAL_TEMP", self.dir.path().join("ansible-local"))
            .env("ANSIBLE_REMOTE_TEMP", self.dir.path().join("ansible-remote"))
            .env("PYTHONDONTWRITEBYTECODE", "1")
            .arg("-i")
            .arg(&self.inventory)
            .arg(Path::new("ansible").join(playbook))
            .args(args);
        let name = playbook.trim_end_matches(".yml").to_owned();
        let mut process = Process::spawn(&name, cmd, self.dir.path());
        let deadline = Instant::now() + limit;
        let status = loop {
            if let Some(status) = process.try_exit() {
                break status;
            }
            if Instant::now() >= deadline {
                process.kill();
                panic!(
                    "ansible-playbook {playbook} still running after {limit:?}\n--- stdout ---\n{}",
                    process.stdout()
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        PlaybookRun {
            what: format!("ansible-playbook {playbook} {}", args.join(" ")),
            code: status.code(),
            stdout: process.stdout(),
            stderr: process.stderr(),
        }
    }

    fn report(&self) -> String {
        self.hosts.iter().map(Host::report).collect::<Vec<_>>().join("\n")
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.report());
        }
    }
}

fn which(tool: &str) -> Option<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path).map(|d| d.join(tool)).find(|p| {
        p.metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
    })
}

/// Waits (bounded) until Consul lists exactly `want` as passing instances of "orders".
fn wait_passing(consul: &ConsulDouble, want: &[&str], limit: Duration) {
    eventually(limit, &format!("passing instances {want:?} in Consul"), || {
        let ids = passing_ids(consul, "orders");
        if ids == want {
            Ok(())
        } else {
            Err(format!("{ids:?}"))
        }
    });
}

// === the test ===

#[test]
fn two_systemd_hosts_upgrade_and_restart_under_keep_alive_load_without_a_failed_request() {
    assert_root();
    require("nsenter");
    which("ansible-playbook").unwrap_or_else(|| panic!("`ansible-playbook` is not installed: {ANSIBLE_HINT}"));
    let p = packages();
    let next_version = format!("{VERSION}+fleet1");
    let debs = tempfile::tempdir().expect("tempdir");
    let first_deb = debs.path().join(format!("vmesh_{VERSION}.deb"));
    std::fs::copy(&p.deb, &first_deb).expect("copy the .deb");
    let next_deb = repack_with_version(&p.deb, &next_version, debs.path());

    let consul = ConsulDouble::spawn();
    let _host = host_lock();
    let fleet = Fleet::boot(&["vm1", "vm2"], &consul, &first_deb);
    let (vm1, vm2) = (fleet.host("vm1"), fleet.host("vm2"));

    // install.yml: the .deb by apt, config, identity, vmesh.socket on the inbound port, agent
    // started; both registered and passing.
    let install = fleet.playbook("install.yml", &[], Duration::from_secs(600));
    install.expect_ok();
    wait_passing(&consul, &["orders-vm1", "orders-vm2"], Duration::from_secs(60));
    for h in &fleet.hosts {
        assert_eq!(h.installed_version(), VERSION, "{}", h.name);
        assert_eq!(h.unit_property("vmesh.socket", "ActiveState"), "active", "{}", h.name);
        assert_eq!(
            h.unit_property("vmesh.socket", "UnitFileState"),
            "enabled",
            "{}",
            h.name
        );
        assert_eq!(
            h.unit_property("vmesh.socket", "Listen"),
            format!("{} (Stream)", h.inbound),
            "{}: the socket listens on the inbound address of vmesh.toml",
            h.name
        );
        assert!(
            h.container.journal("vmesh.service", 200).contains("passed by systemd"),
            "{}: the agent did not adopt the socket\n{}",
            h.name,
            h.report()
        );
        let lc = h.status()["lifecycle"].clone();
        assert_eq!(lc["registered"], true, "{}: {lc}", h.name);
        assert_eq!(lc["drain"], "serving", "{}: {lc}", h.name);
    }

    // The caller on this machine, and steady keep-alive load through it: 2 clients, each
    // request ~20 ms at the app; bounded in time and count.
    let caller = lifecycle::Caller::start(|b| lifecycle::consul(b, &consul));
    lifecycle::wait_discovered_within(Duration::from_secs(30), &caller, "orders", &[vm1.inbound, vm2.inbound]);
    let load = KeepAliveLoad::start(
        caller.outbound_addr("orders"),
        "/slow?ms=20",
        2,
        Duration::from_secs(900),
        200_000,
    );
    let both_serve = |when: &str, since: Instant| {
        eventually(Duration::from_secs(60), &format!("vm1 and vm2 to serve {when}"), || {
            let (a, b) = (
                load.answered_by_since("vm1", since),
                load.answered_by_since("vm2", since),
            );
            if a >= 10 && b >= 10 {
                Ok(())
            } else {
                Err(format!("vm1 {a}, vm2 {b}; {:?}", summary(&load.records())))
            }
        });
    };
    both_serve("the load", Instant::now());

    // Zero-loss restart by default: `systemctl restart vmesh` on vm1, NOT drained, with
    // keep-alive clients on vm1's inbound port itself (not through the caller, which would
    // route around vm1 while it drains). vmesh.socket keeps the port open.
    let t_direct = Instant::now();
    let direct = KeepAliveLoad::start(vm1.inbound, "/slow?ms=5", 2, Duration::from_secs(300), 100_000);
    eventually(Duration::from_secs(30), "the direct load on vm1", || {
        let n = direct.answered_by_since("vm1", t_direct);
        if n >= 20 {
            Ok(())
        } else {
            Err(format!("{n} answered"))
        }
    });
    let pid_before = vm1.agent_pid();
    vm1.container.sh("systemctl restart vmesh.service");
    let t_restarted = Instant::now();
    assert_ne!(vm1.agent_pid(), pid_before, "systemctl restart did not restart vmesh");
    eventually(
        Duration::from_secs(30),
        "the restarted vm1 to answer the direct load",
        || {
            let n = direct.answered_by_since("vm1", t_restarted);
            if n >= 50 {
                Ok(())
            } else {
                Err(format!("{n} answered since the restart"))
            }
        },
    );
    // While it drains, the old agent answers with `Connection: close` (and the clients
    // reconnect, to the old agent until it stops accepting, then into the socket's queue): many
    // connections, but before and after the restart each carries many requests.
    let (records, counters) = direct.stop();
    assert_no_failure(
        "systemctl restart vmesh under keep-alive load",
        &records,
        &counters,
        100,
        50,
        &vm1.report(),
    );
    wait_passing(&consul, &["orders-vm1", "orders-vm2"], Duration::from_secs(60));

    // rollout.yml: the next package version, host by host: drain (exit 0) -> apt -> restart ->
    // health -> undrain -> 50% of the weight.
    let agents_before: Vec<String> = fleet.hosts.iter().map(Host::agent_pid).collect();
    let maintenance_before = consul.writes()["maintenance"].as_u64().unwrap_or(0);
    let next = format!("vmesh_package_file={}", next_deb.display());
    let rollout = fleet.playbook("rollout.yml", &["-e", &next], Duration::from_secs(900));
    rollout.expect_ok();
    let steps = [
        "vmesh vm1: drained",
        "vmesh vm1: undrained",
        "vmesh vm1: serving, effective weight",
        "vmesh vm2: drained",
        "vmesh vm2: undrained",
        "vmesh vm2: serving, effective weight",
    ];
    let positions: Vec<usize> = steps.iter().map(|s| rollout.position(s)).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "the rollout did not go host by host ({steps:?} at {positions:?}):\n{}",
        rollout.stdout
    );
    for (i, h) in fleet.hosts.iter().enumerate() {
        // The gates: `vmesh drain` exited 0 (a non-zero exit fails the host), the package
        // changed while drained, the health wait and the ramp wait passed.
        let drain = rollout.task_results("Drain (mark down, wait for callers and in-flight requests)", &h.name);
        assert!(
            drain.len() == 1 && drain[0].starts_with("changed:"),
            "{}: drain {drain:?}",
            h.name
        );
        let apt = rollout.task_results("Install the .deb file", &h.name);
        assert!(
            apt.len() == 1 && apt[0].starts_with("changed:"),
            "{}: apt {apt:?}",
            h.name
        );
        let health = rollout.task_results("Wait for the application's health check", &h.name);
        assert!(
            health.len() == 1 && health[0].starts_with("ok:"),
            "{}: {health:?}",
            h.name
        );
        let weights = rollout.reported_weights(&h.name);
        assert!(
            weights.len() == 1 && weights[0] >= 50,
            "{}: the ramp gate let the rollout go on at weight {weights:?}",
            h.name
        );
        assert_eq!(h.installed_version(), next_version, "{}: not upgraded", h.name);
        assert_ne!(
            h.agent_pid(),
            agents_before[i],
            "{}: the agent was not restarted",
            h.name
        );
        assert_eq!(h.unit_property("vmesh.socket", "ActiveState"), "active", "{}", h.name);
        let lc = h.status()["lifecycle"].clone();
        assert_eq!(lc["drain"], "serving", "{} after the rollout: {lc}", h.name);
        assert_eq!(lc["registered"], true, "{} after the rollout: {lc}", h.name);
    }
    let maintenance = consul.writes()["maintenance"].as_u64().unwrap_or(0);
    assert!(
        maintenance >= maintenance_before + 2,
        "expected a maintenance write per drained host: {maintenance_before} -> {maintenance}"
    );
    wait_passing(&consul, &["orders-vm1", "orders-vm2"], Duration::from_secs(60));
    both_serve("after the rollout", Instant::now());

    // app-restart.yml: the app service restarted host by host, the agent left alone.
    let agents: Vec<String> = fleet.hosts.iter().map(Host::agent_pid).collect();
    let apps: Vec<String> = fleet.hosts.iter().map(Host::app_pid).collect();
    let restart = fleet.playbook("app-restart.yml", &[], Duration::from_secs(600));
    restart.expect_ok();
    let steps = [
        "vmesh vm1: drained",
        "vmesh vm1: serving, effective weight",
        "vmesh vm2: drained",
        "vmesh vm2: serving, effective weight",
    ];
    let positions: Vec<usize> = steps.iter().map(|s| restart.position(s)).collect();
    assert!(
        positions.windows(2).all(|w| w[0] < w[1]),
        "app-restart.yml did not go host by host ({steps:?} at {positions:?}):\n{}",
        restart.stdout
    );
    for (i, h) in fleet.hosts.iter().enumerate() {
        assert_ne!(h.app_pid(), apps[i], "{}: the app service was not restarted", h.name);
        assert_eq!(
            h.agent_pid(),
            agents[i],
            "{}: app-restart.yml must leave the agent alone",
            h.name
        );
        let weights = restart.reported_weights(&h.name);
        assert!(weights.len() == 1 && weights[0] >= 50, "{}: {weights:?}", h.name);
    }
    wait_passing(&consul, &["orders-vm1", "orders-vm2"], Duration::from_secs(60));
    both_serve("after app-restart.yml", Instant::now());

    assert!(
        !load.is_finished(),
        "the load ended early (bound reached): {:?}",
        summary(&load.records())
    );
    let (records, counters) = load.stop();
    let connections = counters.connections.load(Ordering::SeqCst);
    assert!(
        connections * 10 <= records.len(),
        "{connections} connections for {} requests to the caller is not keep-alive",
        records.len()
    );
    assert_no_failure(
        "the caller's load during the rollout and the app restarts",
        &records,
        &counters,
        300,
        300,
        &format!(
            "--- rollout ---\n{}\n--- app-restart ---\n{}",
            rollout.stdout, restart.stdout
        ),
    );
    drop(caller);
}
