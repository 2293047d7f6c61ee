//! Consul discovery in catalog mode (more watched services than `registry.max_watches`), against
//! the Consul double: two blocking queries (`/v1/health/state/any`, `/v1/catalog/services`)
//! detect changes for every service, and only the changed services are asked again. Instances
//! joining and leaving, a failing check and a failing node reach the caller within a second;
//! changes no check shows (a meta-only re-registration, an instance without checks) within a
//! sweep (`watch_wait`); an idle caller asks Consul almost nothing; with fewer services again
//! the caller goes back to one blocking query per service.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{self, wait_discovered, wait_discovered_within};
use vmesh_tests::shift::{cluster_endpoint, consul_register_k8s_pod, consul_register_vm, time_until_discovered};
use vmesh_tests::{assert_eventually, Agent, AgentBuilder, Outbound};

/// The longest a caller may take to see a change that a check shows.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(1);
/// `watch_wait` of [`lifecycle::consul`]: a sweep asks every service again within it.
const WATCH_WAIT: Duration = Duration::from_secs(5);

const SERVICES: [&str; 4] = ["alpha", "beta", "gamma", "delta"];

fn addr(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// A caller of the four services with `max_watches = 2`: catalog mode.
fn caller(consul: &ConsulDouble, services: &[&str]) -> Agent {
    let mut b = lifecycle::consul(AgentBuilder::new().agent_set("node", "caller"), consul)
        .registry_set("max_watches", 2)
        .shared_outbound();
    for s in services {
        b = b.outbound(Outbound::new(s).no_listen());
    }
    b.start()
}

#[test]
fn catalog_mode_sees_joins_leaves_and_failing_checks_within_a_second() {
    let consul = ConsulDouble::spawn();
    consul_register_vm(&consul, "alpha", "alpha-1", addr(21_001));
    consul_register_vm(&consul, "beta", "beta-1", addr(22_001));
    consul_register_vm(&consul, "gamma", "gamma-1", addr(23_001));
    let caller = caller(&consul, &SERVICES);
    wait_discovered(&caller, "alpha", &[addr(21_001)]);
    wait_discovered(&caller, "beta", &[addr(22_001)]);
    wait_discovered(&caller, "gamma", &[addr(23_001)]);
    wait_discovered(&caller, "delta", &[]);
    assert!(caller.stderr().contains("catalog mode"), "{}", caller.stderr());
    assert!(consul.arrived("health_state") >= 1 && consul.arrived("catalog_services") >= 1);

    let mut measured = Vec::new();
    let t = Instant::now();
    consul_register_vm(&consul, "alpha", "alpha-2", addr(21_002));
    let both = [addr(21_001), addr(21_002)];
    measured.push(("alpha-2 joins", time_until_discovered(&caller, "alpha", &both, t)));
    let t = Instant::now();
    consul_register_vm(&consul, "delta", "delta-1", addr(24_001));
    measured.push((
        "delta's first instance",
        time_until_discovered(&caller, "delta", &[addr(24_001)], t),
    ));
    let t = Instant::now();
    consul.control("check?id=service:alpha-2&status=critical");
    measured.push((
        "alpha-2 fails",
        time_until_discovered(&caller, "alpha", &[addr(21_001)], t),
    ));
    let t = Instant::now();
    consul.control("check?id=service:alpha-2&status=passing");
    measured.push(("alpha-2 passes", time_until_discovered(&caller, "alpha", &both, t)));
    let t = Instant::now();
    consul
        .put("/v1/agent/service/deregister/alpha-2", "")
        .expect_status(200);
    measured.push((
        "alpha-2 leaves",
        time_until_discovered(&caller, "alpha", &[addr(21_001)], t),
    ));
    // A node-level check: every instance of the node leaves the passing answers, and returns.
    let t = Instant::now();
    consul.control("check?id=serfHealth&status=critical");
    for s in SERVICES {
        measured.push(("the node fails", time_until_discovered(&caller, s, &[], t)));
    }
    let t = Instant::now();
    consul.control("check?id=serfHealth&status=passing");
    measured.push((
        "the node passes",
        time_until_discovered(&caller, "beta", &[addr(22_001)], t),
    ));
    wait_discovered(&caller, "gamma", &[addr(23_001)]);

    eprintln!("[consul catalog-mode propagation] {measured:?}");
    for (what, took) in &measured {
        assert!(*took < PROPAGATION_LIMIT, "{what}: the caller saw it after {took:?}");
    }

    // Idle, the caller asks Consul for no service: only the background sweep (one service in
    // ten minutes here) and the two blocking queries, answered when `watch_wait` runs out.
    let before = consul.arrived("health_service");
    std::thread::sleep(WATCH_WAIT + Duration::from_secs(1));
    let asked = consul.arrived("health_service") - before;
    assert!(asked <= 1, "{asked} health queries while idle");
}

#[test]
fn catalog_mode_sweeps_for_changes_no_check_shows() {
    let consul = ConsulDouble::spawn();
    consul_register_vm(&consul, "alpha", "alpha-1", addr(21_001));
    consul_register_vm(&consul, "beta", "beta-1", addr(22_001));
    let caller = caller(&consul, &SERVICES);
    wait_discovered(&caller, "alpha", &[addr(21_001)]);
    wait_discovered(&caller, "beta", &[addr(22_001)]);
    let zone = |c: &Agent| cluster_endpoint(c, "alpha", addr(21_001)).map(|e| e["zone"].clone());
    assert_eq!(zone(&caller), Some(json!("z1")));

    // A re-registration that changes only the meta moves the catalog index but no check.
    let body = json!({
        "ID": "alpha-1", "Name": "alpha", "Port": 21_001, "Address": "127.0.0.1",
        "Meta": {"vmesh-env": "vm", "vmesh-zone": "z2", "vmesh-weight": "100"},
        "Weights": {"Passing": 100, "Warning": 1},
        "Check": {"CheckID": "service:alpha-1", "Name": "vmesh: application health", "TTL": "300s",
                  "Status": "passing"},
    });
    let t = Instant::now();
    consul
        .put("/v1/agent/service/register", &body.to_string())
        .expect_status(200);
    let bound = WATCH_WAIT + Duration::from_secs(5);
    assert_eventually!(
        timeout = bound,
        zone(&caller) == Some(json!("z2")),
        "the meta-only change to reach the caller by a sweep"
    );
    let meta_only = t.elapsed();

    // An instance without any check, with the tags beta already has: no fingerprint moves.
    let t = Instant::now();
    let body = json!({
        "Node": "other-vm", "Address": "127.0.0.1",
        "Service": {"ID": "beta-2", "Service": "beta", "Port": 22_002, "Address": "127.0.0.1", "Tags": []},
    });
    consul.put("/v1/catalog/register", &body.to_string()).expect_status(200);
    wait_discovered_within(bound, &caller, "beta", &[addr(22_001), addr(22_002)]);
    let checkless = t.elapsed();
    // A pod published by consul-k8s catalog sync has no check either, but brings a new tag.
    let t = Instant::now();
    consul_register_k8s_pod(&consul, "beta", "beta-pod", addr(22_003));
    wait_discovered_within(bound, &caller, "beta", &[addr(22_001), addr(22_002), addr(22_003)]);
    eprintln!(
        "[consul catalog-mode sweeps] meta-only change seen after {meta_only:?}, a check-less instance after \
         {checkless:?}, a catalog-synced pod (new tag) after {:?}",
        t.elapsed()
    );
}

#[test]
fn fewer_services_than_max_watches_go_back_to_one_blocking_query_each() {
    let consul = ConsulDouble::spawn();
    consul_register_vm(&consul, "alpha", "alpha-1", addr(21_001));
    let mut caller = caller(&consul, &SERVICES);
    wait_discovered(&caller, "alpha", &[addr(21_001)]);
    assert!(caller.stderr().contains("catalog mode"), "{}", caller.stderr());

    // gamma and delta leave Consul for static endpoints: two services watched, max_watches 2.
    let mut fewer = caller.config();
    for s in ["gamma", "delta"] {
        let static_only = fewer
            .outbound_for(s)
            .set("sources", toml::Value::Array(vec!["static".into()]))
            .endpoint(addr(29_000));
        fewer = fewer.outbound(static_only);
    }
    caller.reload(fewer);
    assert_eventually!(
        caller.stderr().contains("one blocking query per service again"),
        "the caller to leave catalog mode"
    );
    let before = consul.arrived("health_state");
    let t = Instant::now();
    consul_register_vm(&consul, "alpha", "alpha-2", addr(21_002));
    let took = time_until_discovered(&caller, "alpha", &[addr(21_001), addr(21_002)], t);
    assert!(took < PROPAGATION_LIMIT, "alpha-2 seen after {took:?}");
    assert_eq!(
        consul.arrived("health_state"),
        before,
        "no checks query outside catalog mode"
    );
}
