//! The identity of a VM read from a real Nautobot (`scripts/nautobot.sh`: PostgreSQL, Redis and
//! Nautobot from PyPI, seeded through its REST API), end to end: `vmesh identity`, registration
//! in Consul (the test double) under that identity, a change in Nautobot re-registered within
//! one refresh, a VM decommissioned in Nautobot withdrawn (and not brought back from the cache),
//! and a Nautobot outage at boot (identity from the cache, or no registration and a reason when
//! there is no cache).
//!
//! Nautobot is shared by the whole process: every test holds `Nautobot::exclusive()`, so the
//! one that stops Nautobot or changes a VM never runs next to another. Changes are undone by
//! drop guards, also when a test fails. A Nautobot that does not answer fails the tests with
//! the command to run; nothing is skipped.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use vmesh_tests::cmdb;
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{self, agent_service, meta, passing_ids, wait_registered, CliRun};
use vmesh_tests::nautobot::Nautobot;
use vmesh_tests::{eventually, Agent, AgentBuilder, Signal, Upstream, DEFAULT_WAIT};

/// The `[cmdb] refresh` and `timeout` of the agents below.
const REFRESH: Duration = Duration::from_secs(2);
const CMDB_TIMEOUT: Duration = Duration::from_secs(5);
/// "Within one refresh": the next refresh starts within REFRESH, its request may take up to
/// CMDB_TIMEOUT (a loaded Nautobot is slow), then the registry write follows (a few seconds
/// more on a loaded 2-core machine).
const ONE_REFRESH: Duration = Duration::from_secs(2 + 5 + 5);

/// `[cmdb] kind = "nautobot"` for VM `vm` (token in a file under `dir`), refreshed every 2 s.
fn nautobot_cmdb(builder: AgentBuilder, nb: &Nautobot, dir: &Path, vm: &str) -> AgentBuilder {
    cmdb::remote(
        builder,
        "nautobot",
        nb.url(),
        &nb.token_file(dir),
        vm,
        REFRESH,
        CMDB_TIMEOUT,
    )
}

/// An instance on node `node` whose identity is Nautobot's VM `vm`, registering in `consul`.
fn instance(nb: &Nautobot, dir: &Path, node: &str, vm: &str, app: SocketAddr, consul: &ConsulDouble) -> AgentBuilder {
    lifecycle::consul(nautobot_cmdb(cmdb::instance(node, app), nb, dir, vm), consul)
}

/// `vmesh identity --config F [--json]` for VM `vm`.
fn identity_cli(nb: &Nautobot, dir: &Path, vm: &str, json: bool) -> CliRun {
    let config = nautobot_cmdb(AgentBuilder::new().agent_set("node", vm), nb, dir, vm);
    cmdb::identity_cli(&config, &dir.join(format!("identity-{vm}.toml")), json)
}

fn wait_passing(consul: &ConsulDouble, want: &[&str]) {
    lifecycle::wait_passing(consul, "orders", want, DEFAULT_WAIT);
}

/// Sends SIGTERM to `agent` and asserts that it exits 0 within 15 s.
fn stop(agent: &mut Agent) {
    agent.send_signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "{status}");
}

/// Waits until the agent has finished start-up, first registration attempt included (it logs
/// "vmesh started" after that), so that "not registered" is an outcome, not "not yet".
fn wait_started(agent: &Agent) {
    eventually(DEFAULT_WAIT, "the agent to finish its start-up", || {
        if agent.stderr().contains("vmesh started") {
            Ok(())
        } else {
            Err("no `vmesh started` log line yet".to_string())
        }
    });
}

/// web-01 (seeded in Nautobot) with its app and a Consul double, its agent started; the fields
/// are bound in the order they must be dropped in reverse (the Nautobot lock last).
struct Web01 {
    _lock: std::sync::MutexGuard<'static, ()>,
    nb: Nautobot,
    consul: ConsulDouble,
    dir: tempfile::TempDir,
    app: vmesh_tests::RunningUpstream,
    agent: Agent,
}

impl Web01 {
    fn start() -> Self {
        let (_lock, nb) = Nautobot::exclusive_seeded();
        let consul = ConsulDouble::spawn();
        let dir = tempfile::tempdir().expect("tempdir");
        let app = Upstream::python("app").spawn();
        let agent = instance(&nb, dir.path(), "web-01", "web-01", app.addr(), &consul).start();
        Self {
            _lock,
            nb,
            consul,
            dir,
            app,
            agent,
        }
    }
}

#[test]
fn vmesh_identity_prints_what_nautobot_says_and_names_what_is_wrong() {
    let (_lock, nb) = Nautobot::exclusive_seeded();
    let dir = tempfile::tempdir().expect("tempdir");

    // web-01: every custom field set.
    let run = identity_cli(&nb, dir.path(), "web-01", false);
    assert_eq!(run.code, 0, "{run}");
    for line in [
        "service:     orders",
        "environment: prod",
        "zone:        z1",
        "version:     v3",
        "weight:      100",
        "colour:      blue",
        "owner:       team-a",
    ] {
        assert!(run.stdout.contains(line), "`{line}` missing: {run}");
    }
    assert!(run.stdout.contains("nautobot"), "names the source: {run}");
    let run = identity_cli(&nb, dir.path(), "web-01", true);
    assert_eq!(run.code, 0, "{run}");
    let id: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("--json is not JSON ({e}): {run}"));
    assert_eq!(
        id,
        json!({"service": "orders", "environment": "prod", "zone": "z1", "version": "v3",
               "weight": 100, "colour": "blue", "owner": "team-a", "tags": []}),
        "{run}"
    );

    // web-02: no vmesh_zone, so the zone is the cluster's location.
    let run = identity_cli(&nb, dir.path(), "web-02", true);
    assert_eq!(run.code, 0, "{run}");
    let id: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("not JSON ({e}): {run}"));
    assert_eq!(id["zone"], "dc1-z1", "zone falls back to the location: {run}");
    assert_eq!(id["weight"], 50, "{run}");
    assert_eq!(id["colour"], "green", "{run}");

    // old-01: Decommissioning is refused.
    let run = identity_cli(&nb, dir.path(), "old-01", false);
    assert_eq!(run.code, 4, "{run}");
    assert!(run.stderr.contains("CMDB_VM_DECOMMISSIONED"), "{run}");
    assert!(
        run.stderr.contains("old-01") && run.stderr.contains("Decommissioning"),
        "{run}"
    );
    assert!(run.stdout.is_empty(), "no identity printed: {run}");

    // bad-01: empty vmesh_service; the error names the VM and the field.
    let run = identity_cli(&nb, dir.path(), "bad-01", false);
    assert_eq!(run.code, 4, "{run}");
    assert!(run.stderr.contains("CMDB_BAD_FIELD"), "{run}");
    assert!(
        run.stderr.contains("bad-01") && run.stderr.contains("service") && run.stderr.contains("vmesh_service"),
        "the error must name the VM and the field: {run}"
    );

    // A VM Nautobot does not know.
    let run = identity_cli(&nb, dir.path(), "no-such-vm-01", false);
    assert_eq!(run.code, 4, "{run}");
    assert!(run.stderr.contains("CMDB_VM_NOT_FOUND"), "{run}");
}

#[test]
fn the_agent_registers_the_nautobot_identity_and_follows_a_change_within_one_refresh() {
    let Web01 {
        _lock,
        nb,
        consul,
        dir,
        app: _app,
        agent,
    } = Web01::start();

    let svc = wait_registered(&consul, "orders-web-01");
    for (key, want) in [
        ("vmesh-env", "vm"),
        ("vmesh-environment", "prod"),
        ("vmesh-zone", "z1"),
        ("vmesh-version", "v3"),
        ("vmesh-colour", "blue"),
        ("vmesh-owner", "team-a"),
        ("vmesh-weight", "100"),
    ] {
        assert_eq!(meta(&svc, key), want, "Meta.{key} from Nautobot: {svc}");
    }
    assert_eq!(svc["Port"], agent.inbound_addr().port());
    wait_passing(&consul, &["orders-web-01"]);
    let lc = agent.lifecycle();
    assert_eq!(lc["identity_source"], "cmdb", "{lc}");
    assert_eq!(lc["identity"]["environment"], "prod", "{lc}");

    // web-02 on another node: zone from the location, weight 50.
    let app2 = Upstream::python("app2").spawn();
    let mut agent2 = instance(&nb, dir.path(), "web-02", "web-02", app2.addr(), &consul).start();
    let svc2 = wait_registered(&consul, "orders-web-02");
    assert_eq!(meta(&svc2, "vmesh-zone"), "dc1-z1", "{svc2}");
    assert_eq!(meta(&svc2, "vmesh-weight"), "50", "{svc2}");
    assert_eq!(svc2["Weights"]["Passing"], 50, "{svc2}");
    stop(&mut agent2);
    assert!(
        agent_service(&consul, "orders-web-02").is_none(),
        "deregistered on SIGTERM"
    );

    // The CMDB moves web-01 to staging: re-registered within one refresh.
    let guard = nb.set_field_guarded("web-01", "vmesh_env", "staging", "prod");
    let changed = Instant::now();
    eventually(
        ONE_REFRESH,
        "the registration to show environment staging within one refresh",
        || match cmdb::registered_environment(&consul, "orders-web-01")?.as_str() {
            "staging" => Ok(()),
            other => Err(format!("vmesh-environment {other:?}")),
        },
    );
    eprintln!("staging registered {:?} after the change", changed.elapsed());
    let svc = agent_service(&consul, "orders-web-01").expect("registered");
    let tags: Vec<&str> = svc["Tags"]
        .as_array()
        .expect("Tags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        tags.contains(&"staging") && !tags.contains(&"prod"),
        "tags follow: {tags:?}"
    );
    assert_eq!(agent.lifecycle()["identity"]["environment"], "staging");
    cmdb::assert_followed_in_place(&agent, &consul, "orders-web-01");

    // And back.
    guard.restore();
    eventually(
        ONE_REFRESH,
        "environment back to prod",
        || match cmdb::registered_environment(&consul, "orders-web-01")?.as_str() {
            "prod" => Ok(()),
            other => Err(format!("vmesh-environment {other:?}")),
        },
    );
}

#[test]
fn with_nautobot_down_the_agent_starts_from_its_cache_or_says_why_it_cannot() {
    let Web01 {
        _lock,
        nb,
        consul,
        dir,
        app: _app,
        mut agent,
    } = Web01::start();
    wait_passing(&consul, &["orders-web-01"]);
    assert_eq!(agent.lifecycle()["identity_source"], "cmdb");

    // Stop the agent (it deregisters), stop Nautobot, start the agent on the same data_dir.
    stop(&mut agent);
    assert!(
        agent_service(&consul, "orders-web-01").is_none(),
        "deregistered on SIGTERM"
    );
    let outage = nb.stop_guarded();
    agent.restart();

    eventually(DEFAULT_WAIT, "the agent to register from its cached identity", || {
        let lc = agent.lifecycle();
        if lc["registered"] == true && lc["identity_source"] == "cache" {
            Ok(())
        } else {
            Err(lc.to_string())
        }
    });
    wait_passing(&consul, &["orders-web-01"]);
    let svc = agent_service(&consul, "orders-web-01").expect("registered");
    assert_eq!(meta(&svc, "vmesh-environment"), "prod", "the cached identity: {svc}");
    assert_eq!(meta(&svc, "vmesh-zone"), "z1", "{svc}");
    let lc = agent.lifecycle();
    assert_eq!(lc["identity"]["service"], "orders", "{lc}");
    let why = lc["identity_error"].as_str().unwrap_or_default().to_string();
    assert!(
        why.contains("CMDB_UNREACHABLE"),
        "/status says why the cache is used: {lc}"
    );
    assert_eq!(agent.metric("vmesh_identity_from_cache"), Some(1.0));
    assert!(
        agent
            .metric("vmesh_cmdb_errors_total{code=\"CMDB_UNREACHABLE\"}")
            .unwrap_or(0.0)
            >= 1.0,
        "{}",
        agent.metrics_text()
    );
    assert_eq!(agent.admin_get("/ready").status, 200, "serving from the cache is ready");

    // `vmesh identity` asks Nautobot itself: exit 4, CMDB_UNREACHABLE.
    let run = identity_cli(&nb, dir.path(), "web-01", false);
    assert_eq!(run.code, 4, "{run}");
    assert!(run.stderr.contains("CMDB_UNREACHABLE"), "{run}");

    // A new VM (empty data_dir) with Nautobot down: nothing to register, and /status says why.
    let fresh_dir = tempfile::tempdir().expect("tempdir");
    let app2 = Upstream::python("app2").spawn();
    let fresh = instance(&nb, fresh_dir.path(), "web-01-new", "web-01", app2.addr(), &consul).start();
    wait_started(&fresh);
    let lc = eventually(DEFAULT_WAIT, "/status to explain the missing identity", || {
        let lc = fresh.lifecycle();
        match lc["identity_error"].as_str() {
            Some(e) if e.contains("CMDB_UNREACHABLE") => Ok(lc),
            _ => Err(lc.to_string()),
        }
    });
    assert_eq!(lc["registered"], false, "{lc}");
    assert_eq!(lc["identity_source"], "none", "{lc}");
    assert!(lc["identity"].is_null(), "{lc}");
    assert!(
        lc["identity_error"]
            .as_str()
            .unwrap_or_default()
            .contains("no cached identity"),
        "{lc}"
    );
    let status = fresh.status_json();
    assert_eq!(status["ready"], false, "{status}");
    assert!(
        status["not_ready_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("CMDB_UNREACHABLE"),
        "{status}"
    );
    assert_eq!(fresh.admin_get("/ready").status, 503);
    assert_eq!(fresh.metric("vmesh_registered"), Some(0.0));
    assert!(
        agent_service(&consul, "orders-web-01-new").is_none(),
        "nothing registered without an identity"
    );

    // Nautobot back: the new VM registers, the cached one confirms its identity.
    let back = Instant::now();
    outage.end();
    eprintln!("nautobot.sh start took {:?}", back.elapsed());
    eventually(
        Duration::from_secs(20),
        "the new VM to register once Nautobot is back",
        || {
            agent_service(&consul, "orders-web-01-new")
                .map(drop)
                .ok_or_else(|| fresh.lifecycle().to_string())
        },
    );
    eventually(DEFAULT_WAIT, "the cached identity to be confirmed by Nautobot", || {
        let lc = agent.lifecycle();
        if lc["identity_source"] == "cmdb" && lc["identity_error"].is_null() {
            Ok(())
        } else {
            Err(lc.to_string())
        }
    });
    assert_eq!(agent.metric("vmesh_identity_from_cache"), Some(0.0));
    assert_eq!(fresh.lifecycle()["identity_source"], "cmdb");
}

#[test]
fn a_vm_decommissioned_in_nautobot_is_not_brought_back_from_the_cache() {
    let Web01 {
        _lock,
        nb,
        consul,
        dir: _dir,
        app: _app,
        mut agent,
    } = Web01::start();
    wait_passing(&consul, &["orders-web-01"]);

    // The VM is taken out of service in the CMDB while its agent is stopped.
    stop(&mut agent);
    let guard = nb.set_status_guarded("web-01", "Decommissioning", "Active");
    agent.restart();

    // Nautobot answered (it is not down): the cache stands in for an outage, not for a "no".
    wait_started(&agent);
    let lc = eventually(DEFAULT_WAIT, "/status to report the decommissioned VM", || {
        let lc = agent.lifecycle();
        match lc["identity_error"].as_str() {
            Some(e) if e.contains("CMDB_VM_DECOMMISSIONED") => Ok(lc),
            _ => Err(lc.to_string()),
        }
    });
    let registered_anyway = agent_service(&consul, "orders-web-01");
    guard.restore();
    assert!(
        registered_anyway.is_none() && lc["registered"] == false,
        "a VM that Nautobot reports as Decommissioning was registered from the cached identity \
         (identity_source {}): {lc}",
        lc["identity_source"]
    );
    assert_ne!(lc["identity_source"], "cache", "{lc}");
}

#[test]
fn a_vm_decommissioned_while_its_agent_runs_is_withdrawn_and_returns_when_active_again() {
    let Web01 {
        _lock,
        nb,
        consul,
        dir: _dir,
        app: _app,
        agent,
    } = Web01::start();
    wait_passing(&consul, &["orders-web-01"]);

    // Nautobot answers "Decommissioning": an explicit no, not an outage.
    let guard = nb.set_status_guarded("web-01", "Decommissioning", "Active");
    eventually(
        ONE_REFRESH,
        "the registration to be withdrawn within one refresh",
        || match agent_service(&consul, "orders-web-01") {
            None => Ok(()),
            Some(svc) => Err(format!("still registered: {svc}")),
        },
    );
    let lc = agent.lifecycle();
    assert_eq!(lc["registered"], false, "{lc}");
    assert!(
        lc["identity_error"]
            .as_str()
            .is_some_and(|e| e.contains("CMDB_VM_DECOMMISSIONED")),
        "/status says why: {lc}"
    );
    assert!(
        agent.stderr().contains("withdrawing the registration"),
        "the withdrawal is logged:\n{}",
        agent.stderr()
    );
    // The proxy goes on serving: a caller that still holds the address does not fail.
    let r = vmesh_tests::Curl::get(agent.inbound_url("/")).run();
    assert_eq!(r.status, 200, "{r:?}");

    // Back to Active: registered again within one refresh (the agent asks every `refresh`
    // while it has no identity, as it is shorter than 5 s), under the same instance ID.
    guard.restore();
    eventually(ONE_REFRESH, "the instance to be registered again", || {
        agent_service(&consul, "orders-web-01")
            .map(|_| ())
            .ok_or_else(|| "not registered".to_owned())
    });
    assert_eq!(passing_ids(&consul, "orders"), ["orders-web-01"], "no duplicate");
    assert_eq!(agent.lifecycle()["identity_source"], "cmdb");
}
