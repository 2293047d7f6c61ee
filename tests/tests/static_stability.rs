//! Static stability: a caller keeps sending to the last endpoints it knew when the registry
//! dies (real etcd, and the Consul double), says so (`/status` discovery.stale, the
//! `vmesh_discovery_stale` gauge), and a caller restarted while the registry is still down
//! serves from the endpoint set it kept in its state store (`source: "store"`).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::etcd::Etcd;
use vmesh_tests::lifecycle::{self, wait_discovered};
use vmesh_tests::shift::{cluster, cluster_endpoints, consul_register_vm, etcd_put_instance, tally, Hit, SteadyLoad};
use vmesh_tests::{assert_eventually, Agent, AgentBuilder, Outbound, Signal, Upstream};

/// One request per PACE at most on the load's connection.
const PACE: Duration = Duration::from_millis(2);
/// The contract: the last known set is in the store within ~3 s of a change.
const STORE_LAG: Duration = Duration::from_millis(3_500);

const STALE: &str = "vmesh_discovery_stale{service=\"web\"}";

fn caller(registry: impl FnOnce(AgentBuilder) -> AgentBuilder) -> Agent {
    registry(
        AgentBuilder::new()
            .agent_set("node", "caller")
            .agent_set("drain_grace", "1s"),
    )
    .outbound(Outbound::new("web").balancer("round-robin").timeout("5s"))
    .start()
}

fn assert_clean(what: &str, hits: &[Hit], names: &[&str]) {
    let counts = tally(hits);
    eprintln!("[{what}] {} requests: {counts:?}", hits.len());
    assert!(
        hits.iter().all(|h| h.outcome.is_ok()),
        "{what}: failed requests: {counts:?}"
    );
    for n in names {
        let got = counts.get(*n).copied().unwrap_or(0);
        assert!(
            got * names.len() * 10 >= hits.len() * 8,
            "{what}: {n} answered {got} of {} (round-robin over {names:?})",
            hits.len()
        );
    }
}

/// The registry is down: the caller says its endpoints are stale, in `/status`, `/clusters` and
/// the gauge.
fn assert_stale(caller: &Agent) {
    assert_eventually!(
        caller.status_json()["discovery"]["stale"] == true,
        "/status discovery.stale to turn true"
    );
    let status = caller.status_json();
    assert_eq!(
        status["discovery"]["stale_services"],
        serde_json::json!(["web"]),
        "{status}"
    );
    assert_eq!(caller.metric(STALE), Some(1.0), "{STALE}");
    let c = cluster(caller, "web");
    assert_eq!(c["discovery"]["stale"], true, "{c}");
    assert!(c["discovery"]["error"].is_string(), "the error is shown: {c}");
}

/// After a restart with the registry still down: every endpoint from the store, stale, serving.
fn assert_serves_from_store(caller: &Agent, want: &[SocketAddr], names: &[&str], what: &str) {
    let eps = cluster_endpoints(caller, "web");
    let mut addrs: Vec<String> = eps
        .iter()
        .map(|e| e["address"].as_str().unwrap_or("").to_string())
        .collect();
    addrs.sort();
    let mut expected: Vec<String> = want.iter().map(SocketAddr::to_string).collect();
    expected.sort();
    assert_eq!(addrs, expected, "the stored endpoints: {eps:?}");
    for e in &eps {
        assert_eq!(e["source"], "store", "{e}");
    }
    assert_stale(caller);
    let load = SteadyLoad::start(caller.outbound_addr("web"), "/", PACE);
    load.wait_hits_since(Instant::now(), 500, Duration::from_secs(20));
    let hits = load.stop();
    assert_clean(what, &hits, names);
}

#[test]
fn etcd_down_under_load_then_a_restarted_caller_serves_from_the_store() {
    let etcd = Etcd::spawn();
    let a = Upstream::nginx("a").spawn();
    let b = Upstream::nginx("b").spawn();
    etcd_put_instance(&etcd, "web", "web-a", a.addr(), "vm");
    etcd_put_instance(&etcd, "web", "web-b", b.addr(), "vm");
    let mut caller = caller(|c| lifecycle::etcd(c, &etcd));
    wait_discovered(&caller, "web", &[a.addr(), b.addr()]);
    assert_eq!(caller.metric(STALE), Some(0.0));
    assert_eq!(caller.status_json()["discovery"]["stale"], false);

    let load = SteadyLoad::start(caller.outbound_addr("web"), "/", PACE);
    load.wait_hits_since(Instant::now(), 300, Duration::from_secs(20));
    // etcd dies (dropping it kills the process and removes its data).
    drop(etcd);
    let killed = Instant::now();
    assert_stale(&caller);
    eprintln!("[etcd down] stale reported {:?} after the kill", killed.elapsed());
    load.wait_hits_since(Instant::now(), 1_000, Duration::from_secs(20));
    let hits = load.stop();
    let after_kill: Vec<Hit> = hits.iter().filter(|h| h.start >= killed).cloned().collect();
    assert_clean("etcd down: all", &hits, &["a", "b"]);
    assert_clean("etcd down: after the kill", &after_kill, &["a", "b"]);
    assert_eq!(cluster_endpoints(&caller, "web").len(), 2, "the last endpoints stay");

    // An orderly restart (SIGTERM, as `systemctl restart` does) with etcd still down.
    caller.send_signal(Signal::SIGTERM);
    let status = caller.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "vmesh exits 0 on SIGTERM: {status}");
    caller.restart();
    assert_serves_from_store(&caller, &[a.addr(), b.addr()], &["a", "b"], "etcd down: restarted");
}

#[test]
fn consul_down_under_load_then_a_crashed_caller_serves_from_the_store() {
    let mut consul = ConsulDouble::spawn();
    let a = Upstream::nginx("a").spawn();
    let b = Upstream::nginx("b").spawn();
    consul_register_vm(&consul, "web", "web-a", a.addr());
    consul_register_vm(&consul, "web", "web-b", b.addr());
    let mut caller = caller(|c| lifecycle::consul(c, &consul));
    wait_discovered(&caller, "web", &[a.addr(), b.addr()]);
    let discovered = Instant::now();
    assert_eq!(caller.metric(STALE), Some(0.0));

    let load = SteadyLoad::start(caller.outbound_addr("web"), "/", PACE);
    load.wait_hits_since(Instant::now(), 300, Duration::from_secs(20));
    consul.kill();
    let killed = Instant::now();
    assert_stale(&caller);
    eprintln!("[consul down] stale reported {:?} after the kill", killed.elapsed());
    load.wait_hits_since(Instant::now(), 1_000, Duration::from_secs(20));
    let hits = load.stop();
    let after_kill: Vec<Hit> = hits.iter().filter(|h| h.start >= killed).cloned().collect();
    assert_clean("consul down: all", &hits, &["a", "b"]);
    assert_clean("consul down: after the kill", &after_kill, &["a", "b"]);

    // A crash (kill -9: no shutdown, no flush) with Consul still down, once the set has had the
    // time the contract gives the lazy store write (nothing outside the agent can see that
    // write, so this one wait is on the clock; the load above usually covers it already).
    if let Some(rest) = STORE_LAG.checked_sub(discovered.elapsed()) {
        std::thread::sleep(rest);
    }
    caller.kill9();
    caller.restart();
    assert_serves_from_store(
        &caller,
        &[a.addr(), b.addr()],
        &["a", "b"],
        "consul down: restarted after kill -9",
    );
}
