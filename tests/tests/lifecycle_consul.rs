//! Registration on the app's behalf in Consul (the test double), end to end with real
//! processes: identity -> register (ID, port, meta, tags, TTL check), slow start 1 -> 100 in a
//! few weight writes, health following the app, drain under steady load through a second vmesh
//! that discovers the instances from Consul (the scenario of `tests/src/drain_load.rs`), undrain,
//! anti-entropy and SIGTERM.

use std::time::{Duration, Instant};

use serde_json::Value;
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::drain_load::{self, Client, Registry};
use vmesh_tests::lifecycle::{
    self, agent_service, all_ids, check, meta, passing_ids, CliRun, Identity, PassingWatcher,
};
use vmesh_tests::{eventually, free_addr, Agent, Signal, Upstream, DEFAULT_WAIT};

/// The steps of the default ramp, as `[inbound.ramp] steps` has them.
const STEPS: [u64; 5] = [1, 10, 33, 66, 100];

fn registered(consul: &ConsulDouble, id: &str) -> Value {
    eventually(DEFAULT_WAIT, &format!("{id} to be registered in Consul"), || {
        agent_service(consul, id).ok_or_else(|| "not registered".to_string())
    })
}

fn wait_passing(consul: &ConsulDouble, service: &str, want: &[&str]) {
    eventually(
        DEFAULT_WAIT,
        &format!("passing instances of {service} to be {want:?}"),
        || {
            let ids = passing_ids(consul, service);
            if ids == want {
                Ok(())
            } else {
                Err(format!("{ids:?}"))
            }
        },
    );
}

fn cli(agent: &Agent, args: &[&str]) -> CliRun {
    agent.run_cli(args).into()
}

fn writes(consul: &ConsulDouble, endpoint: &str) -> u64 {
    consul.writes()[endpoint].as_u64().unwrap_or(0)
}

#[test]
fn registers_the_identity_with_meta_tags_weight_and_a_passing_ttl_check() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().set("weight", 40).write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let agent = lifecycle::consul(
        lifecycle::instance("web-01", &identity, app.addr(), "0s").registry_set("check_ttl", "15s"),
        &consul,
    )
    .start();
    let inbound = agent.inbound_addr();

    let svc = registered(&consul, "orders-web-01");
    assert_eq!(svc["ID"], "orders-web-01", "{svc}");
    assert_eq!(svc["Service"], "orders", "{svc}");
    assert_eq!(svc["Port"], inbound.port(), "Port must be the inbound port: {svc}");
    assert_eq!(svc["Address"], "127.0.0.1", "{svc}");
    for (key, want) in [
        ("vmesh-env", "vm"),
        ("vmesh-environment", "prod"),
        ("vmesh-zone", "z1"),
        ("vmesh-version", "v3"),
        ("vmesh-colour", "blue"),
        ("vmesh-owner", "team-a"),
        ("vmesh-weight", "40"),
        ("vmesh-ramp-window", "0"),
    ] {
        assert_eq!(meta(&svc, key), want, "Meta.{key}: {svc}");
    }
    let ramp_start: u64 = meta(&svc, "vmesh-ramp-start").parse().expect("numeric ramp start");
    assert!(
        ramp_start <= lifecycle::unix_now() && ramp_start + 60 > lifecycle::unix_now(),
        "vmesh-ramp-start {ramp_start} is not a recent unix time"
    );
    let tags: Vec<&str> = svc["Tags"]
        .as_array()
        .expect("Tags")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for tag in ["prod", "z1", "v3", "blue", "pci"] {
        assert!(tags.contains(&tag), "tag {tag} missing: {tags:?}");
    }
    // No ramp: the full CMDB weight at once (100% of 40).
    assert_eq!(svc["Weights"]["Passing"], 40, "{svc}");

    // The TTL check the agent passes while the app is healthy.
    eventually(DEFAULT_WAIT, "the TTL check to be passing", || {
        let c = check(&consul, "orders", "orders-web-01", "service:orders-web-01").ok_or("no check")?;
        if c["Status"] == "passing" {
            Ok(())
        } else {
            Err(c.to_string())
        }
    });
    let state = consul.inspect("state");
    let ttl_check = state["checks"]
        .as_array()
        .expect("checks")
        .iter()
        .find(|c| c["CheckID"] == "service:orders-web-01")
        .unwrap_or_else(|| panic!("no TTL check in {state}"))
        .clone();
    assert_eq!(ttl_check["TTL"], "15s", "a TTL check with check_ttl: {ttl_check}");
    assert_eq!(passing_ids(&consul, "orders"), ["orders-web-01"]);

    // The agent says the same.
    let lc = agent.lifecycle();
    assert_eq!(lc["registered"], true, "{lc}");
    assert_eq!(lc["registration_id"], "orders-web-01", "{lc}");
    assert_eq!(lc["identity_source"], "cmdb", "{lc}");
    assert_eq!(lc["identity"]["service"], "orders", "{lc}");
    assert_eq!(lc["weight"], 40, "{lc}");
    assert_eq!(lc["drain"], "serving", "{lc}");
    assert_eq!(lc["app"]["healthy"], true, "{lc}");
    assert!(lc["registry"].as_str().unwrap_or("").starts_with("consul"), "{lc}");
    assert_eq!(
        agent.admin_get("/ready").status,
        200,
        "{}",
        agent.admin_get("/ready").text()
    );
    assert_eq!(agent.metric("vmesh_registered"), Some(1.0));
    assert_eq!(agent.metric("vmesh_registered_weight"), Some(40.0));
    assert!(
        agent
            .metric("vmesh_registry_writes_total{op=\"register\"}")
            .unwrap_or(0.0)
            >= 1.0
    );
    assert_eq!(agent.metric("vmesh_identity_from_cache"), Some(0.0));

    // The registered port really leads to the app.
    let r = vmesh_tests::Curl::get(agent.inbound_url("/")).run();
    r.expect_status(200);
    assert_eq!(r.header("x-upstream-name"), Some("app"));
}

#[test]
fn weight_ramps_from_1_to_100_in_at_most_six_registry_writes() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let t0 = lifecycle::unix_now();
    let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "10s"), &consul).start();

    // Sample the advertised weight until it reaches 100 (bounded: 25 s). The 200 ms pause
    // paces the sampling (a weight lasts seconds); it waits for no state.
    let begin = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut first_meta = None;
    while begin.elapsed() < Duration::from_secs(25) {
        if let Some(svc) = agent_service(&consul, "orders-web-01") {
            let w = svc["Weights"]["Passing"].as_u64().unwrap_or(0);
            samples.push((lifecycle::unix_now_f64(), w));
            first_meta.get_or_insert(svc);
            if w == 100 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let weights: Vec<u64> = samples.iter().map(|s| s.1).collect();
    let first = samples.first().unwrap_or_else(|| panic!("never registered")).1;
    let last = samples.last().expect("samples").1;
    assert!(
        first <= 10,
        "the ramp must start low (1, or 10 after ~1 s): {samples:?}"
    );
    assert_eq!(last, 100, "the weight must reach 100 within 25 s: {samples:?}");
    assert!(
        weights.windows(2).all(|w| w[0] <= w[1]),
        "the weight went down during the ramp: {samples:?}"
    );
    assert!(
        weights.iter().all(|w| STEPS.contains(w)),
        "only the configured steps are written: {samples:?}"
    );
    for step in [33, 66] {
        assert!(weights.contains(&step), "step {step} never advertised: {samples:?}");
    }

    // The ramp is in the metadata, for callers to interpolate between writes.
    let svc = first_meta.expect("a registration was sampled");
    assert_eq!(meta(&svc, "vmesh-ramp-window"), "10", "{svc}");
    let start: u64 = meta(&svc, "vmesh-ramp-start").parse().expect("numeric ramp start");
    assert!(
        start >= t0 && start <= lifecycle::unix_now(),
        "ramp start {start} (test began {t0})"
    );
    // Each step no sooner than the 10 s curve reaches it (so the weights follow time), and
    // 100 at most 8 s late (a loaded machine delays writes, never brings them forward).
    lifecycle::assert_ramp_on_schedule(&samples, start, Duration::from_secs(10), Duration::from_secs(8));

    // At most ~5 weight writes per ramp (Raft writes on the Consul servers): 1, 10, 33, 66, 100.
    let registers = writes(&consul, "register");
    assert!(
        (3..=6).contains(&registers),
        "{registers} register writes during one ramp (want <= 6): {}",
        consul.writes()
    );
    let counted = agent
        .metric("vmesh_registry_writes_total{op=\"register\"}")
        .expect("register write metric");
    assert_eq!(
        counted as u64, registers,
        "the metric counts the writes the registry got"
    );

    let lc = agent.lifecycle();
    assert_eq!(lc["weight"], 100, "{lc}");
    assert_eq!(lc["effective_weight"], 100, "{lc}");
    assert_eq!(lc["ramp"]["window_secs"], 10, "{lc}");
    assert_eq!(lc["ramp"]["start"], start, "{lc}");
    assert_eq!(agent.metric("vmesh_registered_weight"), Some(100.0));
}

#[test]
fn an_unhealthy_app_turns_the_check_critical_and_a_recovered_one_passes_again() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let mut app = Upstream::python("app").spawn();
    let app_addr = app.addr();
    let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app_addr, "0s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    assert_eq!(agent.admin_get("/ready").status, 200);

    app.kill();
    eventually(DEFAULT_WAIT, "the TTL check to turn critical", || {
        let c = check(&consul, "orders", "orders-web-01", "service:orders-web-01").ok_or("no check")?;
        if c["Status"] == "critical" {
            Ok(())
        } else {
            Err(c.to_string())
        }
    });
    assert!(
        passing_ids(&consul, "orders").is_empty(),
        "an unhealthy instance must leave the passing results"
    );
    assert_eq!(
        all_ids(&consul, "orders"),
        ["orders-web-01"],
        "it stays registered (critical), ready to come back"
    );
    let lc = agent.lifecycle();
    assert_eq!(lc["app"]["healthy"], false, "{lc}");
    assert!(lc["app"]["last_error"].is_string(), "{lc}");
    let ready = agent.admin_get("/ready");
    assert_eq!(ready.status, 503, "{}", ready.text());
    assert!(ready.text().contains("unhealthy"), "{}", ready.text());

    let _app = Upstream::python("app").on(app_addr).spawn();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    vmesh_tests::assert_eventually!(agent.admin_get("/ready").status == 200, "/ready to answer 200 again");
    assert_eq!(agent.lifecycle()["app"]["healthy"], true);
}

#[test]
fn drain_under_steady_load_loses_no_request_and_undrain_brings_the_instance_back() {
    // The scenario shared with etcd (tests/src/drain_load.rs), with a new connection per
    // request; tests/drain_keepalive.rs runs it with keep-alive HTTP/1.1 and HTTP/2 clients.
    let consul = ConsulDouble::spawn();
    drain_load::run(&Registry::Consul(&consul), Client::ConnectionPerRequest);
}

#[test]
fn drain_waits_for_in_flight_requests_and_the_cli_exit_codes_follow_the_contract() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let mut app = Upstream::python("app").spawn();
    let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);

    // A slow request in flight at the app through the inbound port.
    let url = agent.inbound_url("/slow?ms=4000");
    let slow_sent = Instant::now();
    let slow = std::thread::spawn(move || vmesh_tests::Curl::get(url).run());
    eventually(DEFAULT_WAIT, "the slow request to be in flight", || {
        match agent.lifecycle()["in_flight"].as_u64() {
            Some(1) => Ok(()),
            other => Err(format!("in_flight {other:?}")),
        }
    });

    // Too short a timeout: exit 1, the instance stays marked down.
    let short = cli(&agent, &["drain", "--timeout", "1s"]);
    assert_eq!(
        short.code, 1,
        "drain with a request still in flight after the timeout: {short}"
    );
    assert!(short.stderr.contains("DRAIN_TIMEOUT"), "{short}");
    assert_eq!(agent.lifecycle()["drain"], "draining");
    assert!(passing_ids(&consul, "orders").is_empty(), "marked down while draining");
    assert_eq!(agent.admin_get("/ready").status, 503, "/ready is 503 while draining");

    // Long enough: returns only after the slow request finished, which was not cut.
    let full = cli(&agent, &["drain", "--timeout", "30s"]);
    assert_eq!(full.code, 0, "{full}");
    assert!(
        slow_sent.elapsed() >= Duration::from_secs(4),
        "drain reported drained {:?} after the 4 s request was sent: it was still in flight: {full}",
        slow_sent.elapsed()
    );
    let r = slow.join().expect("slow request thread");
    r.expect_status(200);

    // The admin API unreachable: exit 3.
    let unreachable: CliRun = vmesh_tests::agent::vmesh_command()
        .args(["drain", "--admin", &free_addr().to_string(), "--timeout", "2s"])
        .output()
        .expect("run vmesh drain")
        .into();
    assert_eq!(unreachable.code, 3, "{unreachable}");

    // Undrain while the app is down: exit 1 (the app did not pass its health check).
    app.kill();
    eventually(DEFAULT_WAIT, "the agent to see the app down", || {
        match agent.lifecycle()["app"]["healthy"].as_bool() {
            Some(false) => Ok(()),
            other => Err(format!("healthy {other:?}")),
        }
    });
    let unhealthy = cli(&agent, &["undrain", "--timeout", "2s"]);
    assert_eq!(unhealthy.code, 1, "undrain with the app down: {unhealthy}");
    assert!(unhealthy.stderr.contains("APP_UNHEALTHY"), "{unhealthy}");
    assert_eq!(
        agent.lifecycle()["drain"],
        "drained",
        "still drained after a failed undrain"
    );
}

#[test]
fn undrain_fails_with_exit_2_while_the_registry_refuses_the_registration() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    let drained = cli(&agent, &["drain", "--timeout", "30s"]);
    assert_eq!(drained.code, 0, "{drained}");

    // Consul answers 500 to every registration and maintenance change for a while.
    consul.control("fail?count=40&status=500&path=/v1/agent/service/register");
    consul.control("fail?count=40&status=500&path=/v1/agent/service/maintenance");
    let undrained = cli(&agent, &["undrain", "--timeout", "30s"]);
    let still_down = passing_ids(&consul, "orders").is_empty();
    consul.control("clear-faults");
    assert!(
        still_down,
        "the faults must keep the instance out of the passing results"
    );
    assert_eq!(
        undrained.code, 2,
        "undrain must not report success while the registry refused the registration \
         (exit 2 = failed): {undrained}"
    );

    // Once Consul accepts writes again, the agent gets there on its own.
    wait_passing(&consul, "orders", &["orders-web-01"]);
}

#[test]
fn a_drained_instance_stays_out_of_the_passing_results_while_its_ramp_goes_on() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "10s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);

    // Drained early in its slow start (a deploy right after the previous undrain).
    let drained = cli(&agent, &["drain", "--timeout", "30s"]);
    assert_eq!(drained.code, 0, "{drained}");
    assert!(passing_ids(&consul, "orders").is_empty());
    let watcher = PassingWatcher::start(&consul, "orders");
    // Wait until the ramp's time is over: the agent's advertised weight (set once the registry
    // acknowledged it) reaches 100, so every step write has been answered.
    eventually(Duration::from_secs(20), "the ramp window to pass", || {
        let lc = agent.lifecycle();
        if lc["effective_weight"] == 100 && lc["weight"] == 100 {
            Ok(())
        } else {
            Err(format!("weight {} effective {}", lc["weight"], lc["effective_weight"]))
        }
    });
    let seen = watcher.stop();
    assert_eq!(agent.lifecycle()["drain"], "drained");
    assert!(passing_ids(&consul, "orders").is_empty());
    assert!(
        seen.is_empty(),
        "the drained instance came back into the passing results {} time(s) during its ramp \
         (weight writes while drained: {}): {:?}",
        seen.len(),
        writes(&consul, "register") - 1,
        seen
    );
}

#[test]
fn anti_entropy_registers_again_after_the_consul_agent_lost_its_services() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    // A long TTL: the TTL pass (which would also notice) stays out of the way of anti-entropy.
    let agent = lifecycle::consul(
        lifecycle::instance("web-01", &identity, app.addr(), "0s").registry_set("check_ttl", "300s"),
        &consul,
    )
    .start();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    // Wait until the start-up writes are done (the registration, the TTL pass that follows the
    // first health check, the sync after the next check): a restart among them would be
    // noticed by a failing TTL update, not by anti-entropy, which is what this test is about.
    let checks_at_pass = eventually(DEFAULT_WAIT, "the first TTL pass", || {
        let passes = consul.writes()["ok"]["check_update"].as_u64().unwrap_or(0);
        let checks = agent.lifecycle()["app"]["checks"].as_u64().unwrap_or(0);
        if passes >= 1 && checks >= 1 {
            Ok(checks)
        } else {
            Err(format!("{passes} TTL passes, {checks} health checks"))
        }
    });
    eventually(DEFAULT_WAIT, "two more health checks after the TTL pass", || {
        let checks = agent.lifecycle()["app"]["checks"].as_u64().unwrap_or(0);
        if checks >= checks_at_pass + 2 {
            Ok(())
        } else {
            Err(format!("{checks} health checks"))
        }
    });
    let registers = writes(&consul, "register");

    consul.control("restart");
    let t = Instant::now();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    assert!(
        t.elapsed() <= Duration::from_secs(6),
        "anti-entropy every 2 s took {:?}",
        t.elapsed()
    );
    assert!(writes(&consul, "register") > registers, "{}", consul.writes());
    let svc = registered(&consul, "orders-web-01");
    assert_eq!(meta(&svc, "vmesh-environment"), "prod", "re-registered in full: {svc}");
    assert_eq!(svc["Port"], agent.inbound_addr().port());
    eventually(DEFAULT_WAIT, "the anti-entropy write to be counted", || {
        match agent.metric("vmesh_registry_writes_total{op=\"anti-entropy\"}") {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert_eq!(agent.lifecycle()["registered"], true);
}

#[test]
fn sigterm_marks_the_instance_down_then_deregisters_and_exits_zero() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let mut agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);
    consul.control("reset-counters");

    agent.send_signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "vmesh must exit 0 after SIGTERM: {status}");
    assert!(
        agent_service(&consul, "orders-web-01").is_none(),
        "SIGTERM must deregister: {:?}",
        lifecycle::all_instances(&consul)
    );
    assert!(lifecycle::all_instances(&consul).is_empty());

    // First marked down (maintenance), then deregistered.
    let requests = consul.inspect("requests?path=/v1/agent/service");
    let order: Vec<String> = requests["recent"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|r| r["method"] == "PUT")
        .map(|r| r["endpoint"].as_str().unwrap_or_default().to_string())
        .collect();
    let maintenance = order.iter().position(|e| e == "maintenance");
    let deregister = order.iter().position(|e| e == "deregister");
    assert!(
        matches!((maintenance, deregister), (Some(m), Some(d)) if m < d),
        "expected a maintenance write before the deregistration, got {order:?}"
    );
}

/// A registry that hangs (every call held 30 s, past the registrar's 15 s call deadline): the
/// agent keeps proxying, a drain made meanwhile is kept (the flag is local), and once the
/// registry answers again the instance is written in maintenance and never shows as passing.
#[test]
fn a_hanging_registry_keeps_the_proxy_serving_and_a_drain_made_meanwhile_holds() {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &consul).start();
    wait_passing(&consul, "orders", &["orders-web-01"]);

    consul.control("delay?ms=30000&count=100000");
    // Proxying does not wait on the registry.
    let started = Instant::now();
    let r = vmesh_tests::http::get(agent.inbound_addr(), "/").expect("request through the inbound");
    assert_eq!(r.status, 200, "{r:?}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the request waited on the registry"
    );
    // A drain while the registry hangs: the flag is set at once; the write waits for the registry.
    let drained = cli(&agent, &["drain", "--timeout", "5s"]);
    assert_ne!(agent.lifecycle()["drain"], "serving", "drain ignored: {drained}");

    consul.control("clear-faults");
    eventually(
        Duration::from_secs(60),
        "the maintenance written once the registry answers",
        || {
            let lifecycle = agent.lifecycle();
            match (
                lifecycle["registry_error"].is_null(),
                all_ids(&consul, "orders").as_slice(),
                passing_ids(&consul, "orders").is_empty(),
            ) {
                (true, [id], true) if id == "orders-web-01" && lifecycle["drain"] == "drained" => Ok(()),
                other => Err(format!("{other:?} {lifecycle}")),
            }
        },
    );
    // And it stays out: a TTL pass or anti-entropy must not bring it back.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        assert!(
            passing_ids(&consul, "orders").is_empty(),
            "a drained instance showed as passing after the registry came back"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}
