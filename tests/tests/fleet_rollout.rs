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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmesh_tests::ansible::{self, PlaybookRun};
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::keep_alive::Counters;
use vmesh_tests::lifecycle::{self, summary, wait_passing, Load, Record};
use vmesh_tests::nspawn::{Container, Overlay};
use vmesh_tests::packages::{assert_root, host_lock, packages, repack_with_version, require, VERSION};
use vmesh_tests::{fixture, free_addr};

// === keep-alive load ===

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
    let (connections, reused, stale) = counters.snapshot();
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
            "=== {} vmesh.service (journal tail, access-log lines left out) ===\n{}\n=== {} vmesh.socket ===\n{}\n=== {} fleet-app.service ===\n{}",
            self.name,
            agent_events(&self.container.journal("vmesh.service", 20_000), 60),
            self.name,
            self.container.journal("vmesh.socket", 10),
            self.name,
            self.container.journal("fleet-app.service", 10)
        )
    }
}

/// The last `keep` lines of an agent's journal that are not access-log records: the agent's
/// own events (start, drain, shutdown) are what explains a failed request.
fn agent_events(journal: &str, keep: usize) -> String {
    let events: Vec<&str> = journal.lines().filter(|l| !l.contains("\"direction\":")).collect();
    events[events.len().saturating_sub(keep)..].join("\n")
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

        let vars = ansible::orders_vars(
            &consul.base_url(),
            "/etc/vmesh/identity.toml",
            json!({
                // Reached by a wrapper interpreter (see the module documentation); we are root.
                "ansible_connection": "local",
                "ansible_become": false,
                "vmesh_install_method": "package",
                "vmesh_package_file": deb,
                "vmesh_service_manager": "systemd",
                "rollout_app_restart_command": "systemctl restart fleet-app.service",
            }),
        );
        let hostmap: serde_json::Map<String, Value> = hosts
            .iter()
            .map(|h| (h.name.clone(), h.hostvars(&h.container.python_wrapper())))
            .collect();
        let path = ansible::write_inventory(dir.path(), hostmap, vars);
        Fleet {
            hosts,
            dir,
            inventory: path,
        }
    }

    fn host(&self, name: &str) -> &Host {
        self.hosts.iter().find(|h| h.name == name).expect("host")
    }

    /// `ansible-playbook -i <inventory> ansible/<playbook> <args>` (pipelined: see the module
    /// documentation), bounded by `limit`.
    fn playbook(&self, playbook: &str, args: &[&str], limit: Duration) -> PlaybookRun {
        let mut cmd = ansible::command("ansible-playbook", self.dir.path());
        cmd.env("ANSIBLE_PIPELINING", "1");
        ansible::run_playbook(cmd, &self.inventory, playbook, args, self.dir.path(), limit)
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

// === the test ===

#[test]
fn two_systemd_hosts_upgrade_and_restart_under_keep_alive_load_without_a_failed_request() {
    assert_root();
    require("nsenter");
    ansible::tool("ansible-playbook");
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
    wait_passing(
        &consul,
        "orders",
        &["orders-vm1", "orders-vm2"],
        Duration::from_secs(60),
    );
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
    let load = Load::keep_alive(
        caller.outbound_addr("orders"),
        "/slow?ms=20",
        2,
        Duration::from_secs(900),
        200_000,
    );
    let both_serve = |when: &str, since: Instant| {
        load.wait_answered_by(&["vm1", "vm2"], 10, since, Duration::from_secs(60), when);
    };
    both_serve("the load", Instant::now());

    // Zero-loss restart by default: `systemctl restart vmesh` on vm1, NOT drained, with
    // keep-alive clients on vm1's inbound port itself (not through the caller, which would
    // route around vm1 while it drains). vmesh.socket keeps the port open.
    let t_direct = Instant::now();
    let direct = Load::keep_alive(vm1.inbound, "/slow?ms=5", 2, Duration::from_secs(300), 100_000);
    direct.wait_answered_by(&["vm1"], 20, t_direct, Duration::from_secs(30), "the direct load");
    let pid_before = vm1.agent_pid();
    vm1.container.sh("systemctl restart vmesh.service");
    let t_restarted = Instant::now();
    assert_ne!(vm1.agent_pid(), pid_before, "systemctl restart did not restart vmesh");
    direct.wait_answered_by(
        &["vm1"],
        50,
        t_restarted,
        Duration::from_secs(30),
        "the direct load after the restart",
    );
    // While it drains, the old agent answers with `Connection: close` (and the clients
    // reconnect, to the old agent until it stops accepting, then into the socket's queue): many
    // connections, but before and after the restart each carries many requests.
    let counters = direct.counters();
    let records = direct.stop();
    assert_no_failure(
        "systemctl restart vmesh under keep-alive load",
        &records,
        &counters,
        100,
        50,
        &vm1.report(),
    );
    wait_passing(
        &consul,
        "orders",
        &["orders-vm1", "orders-vm2"],
        Duration::from_secs(60),
    );

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
    rollout.assert_in_order("the rollout", &steps);
    for (i, h) in fleet.hosts.iter().enumerate() {
        // The gates: `vmesh drain` exited 0 (a non-zero exit fails the host), the package
        // changed while drained, the health wait and the ramp wait passed.
        rollout.assert_one_result(
            "Drain (mark down, wait for callers and in-flight requests)",
            &h.name,
            "changed:",
        );
        rollout.assert_one_result("Install the .deb file", &h.name, "changed:");
        rollout.assert_one_result("Wait for the application's health check", &h.name, "ok:");
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
    wait_passing(
        &consul,
        "orders",
        &["orders-vm1", "orders-vm2"],
        Duration::from_secs(60),
    );
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
    restart.assert_in_order("app-restart.yml", &steps);
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
    wait_passing(
        &consul,
        "orders",
        &["orders-vm1", "orders-vm2"],
        Duration::from_secs(60),
    );
    both_serve("after app-restart.yml", Instant::now());

    assert!(
        !load.is_finished(),
        "the load ended early (bound reached): {:?}",
        summary(&load.records())
    );
    let counters = load.counters();
    let records = load.stop();
    let (connections, _, _) = counters.snapshot();
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
