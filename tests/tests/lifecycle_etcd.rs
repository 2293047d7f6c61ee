//! Registration in a real etcd (Debian's etcd-server): the instance key on a lease, the slow
//! start written in steps, the key following the app's health, drain and undrain seen by a
//! caller vmesh that watches the prefix, and a killed agent's key expiring with its lease.

use std::time::{Duration, Instant};

use serde_json::Value;
use vmesh_tests::drain_load::{self, Client, Registry};
use vmesh_tests::etcd::Etcd;
use vmesh_tests::lifecycle::{self, etcd_key, Identity};
use vmesh_tests::{eventually, Upstream, DEFAULT_WAIT};

const STEPS: [u64; 5] = [1, 10, 33, 66, 100];

fn wait_key(etcd: &Etcd, key: &str) -> Value {
    eventually(DEFAULT_WAIT, &format!("etcd key {key} to appear"), || {
        etcd.json(key).ok_or_else(|| "absent".to_string())
    })
}

fn wait_no_key(etcd: &Etcd, key: &str, within: Duration) {
    eventually(within, &format!("etcd key {key} to be deleted"), || {
        match etcd.value(key) {
            None => Ok(()),
            Some(v) => Err(v),
        }
    });
}

/// Checks `holds` every 100 ms for `period` (an observation window over which a state must
/// hold, not a wait for one); panics the first time it is false.
fn stays(period: Duration, what: &str, mut holds: impl FnMut() -> bool) {
    let begin = Instant::now();
    while begin.elapsed() < period {
        assert!(holds(), "expected {what}, broken after {:?}", begin.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_instance_key_is_leased_and_its_weight_steps_up_to_100() {
    let etcd = Etcd::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let t0 = lifecycle::unix_now();
    let agent = lifecycle::etcd(lifecycle::instance("web-01", &identity, app.addr(), "10s"), &etcd).start();
    let key = etcd_key("orders", "orders-web-01");

    // Sample the value until the weight is 100 (bounded: 25 s). The 200 ms pause paces the
    // sampling (a weight lasts seconds); it waits for no state.
    let begin = Instant::now();
    let mut samples: Vec<(f64, u64)> = Vec::new();
    let mut first_value = None;
    while begin.elapsed() < Duration::from_secs(25) {
        if let Some(v) = etcd.json(&key) {
            let w = v["weight"].as_u64().unwrap_or(0);
            samples.push((lifecycle::unix_now_f64(), w));
            first_value.get_or_insert(v);
            if w == 100 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let weights: Vec<u64> = samples.iter().map(|s| s.1).collect();
    let first = samples.first().unwrap_or_else(|| panic!("the key never appeared")).1;
    let last = samples.last().expect("samples").1;
    assert!(first <= 10, "the ramp must start low: {samples:?}");
    assert_eq!(last, 100, "the weight must reach 100 within 25 s: {samples:?}");
    assert!(
        weights.windows(2).all(|w| w[0] <= w[1]),
        "the weight went down during the ramp: {samples:?}"
    );
    assert!(weights.iter().all(|w| STEPS.contains(w)), "{samples:?}");
    for step in [33, 66] {
        assert!(weights.contains(&step), "step {step} never written: {samples:?}");
    }

    // The value follows design.md §4: address, port (the inbound port), weight, meta.
    let v = first_value.expect("a value was sampled");
    assert_eq!(v["address"], "127.0.0.1", "{v}");
    assert_eq!(v["port"], agent.inbound_addr().port(), "{v}");
    assert_eq!(v["meta"]["env"], "vm", "{v}");
    assert_eq!(v["meta"]["zone"], "z1", "{v}");
    assert_eq!(v["meta"]["version"], "v3", "{v}");
    assert_eq!(v["meta"]["colour"], "blue", "{v}");
    assert_eq!(v["meta"]["ramp_window"], 10, "{v}");
    let start = v["meta"]["ramp_start"]
        .as_u64()
        .unwrap_or_else(|| panic!("numeric ramp_start: {v}"));
    assert!(
        start >= t0 && start <= lifecycle::unix_now(),
        "ramp_start {start}, test began {t0}"
    );
    // Each step no sooner than the 10 s curve reaches it, and 100 at most 8 s late.
    lifecycle::assert_ramp_on_schedule(&samples, start, Duration::from_secs(10), Duration::from_secs(8));

    // On a lease of lease_ttl (3 s), kept alive; a handful of writes for the whole ramp.
    let kv = etcd.get(&key).expect("key present");
    assert_ne!(kv.lease, 0, "the instance key must be bound to a lease: {kv:?}");
    let (granted, remaining) = etcd.lease_ttl(kv.lease).expect("the lease is alive");
    assert_eq!(granted, 3, "lease granted with lease_ttl");
    assert!(remaining >= 1, "{remaining}");
    // Still there all along, well past one lease TTL: the keep-alive works.
    stays(
        Duration::from_secs(4),
        "the key to outlive its lease TTL while the agent runs",
        || etcd.value(&key).is_some(),
    );
    let later = etcd.get(&key).expect("key present");
    assert_eq!(later.lease, kv.lease, "same lease, kept alive");
    assert_eq!(etcd.keys("/vmesh/services/"), [key.as_str()]);
    let lc = agent.lifecycle();
    assert_eq!(lc["registered"], true, "{lc}");
    assert_eq!(lc["weight"], 100, "{lc}");
    assert!(lc["registry"].as_str().unwrap_or("").starts_with("etcd"), "{lc}");

    // Each put is a Raft write that wakes every watcher of the prefix: one per weight step
    // (1, 10, 33, 66, 100), not more (the key's version counts the puts since it was created).
    let versions = later.version;
    assert!(
        (3..=6).contains(&versions),
        "the instance key was put {versions} times for one ramp of 5 weight steps (want <= 6)"
    );
}

#[test]
fn health_moves_the_key_and_the_caller_follows() {
    let etcd = Etcd::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let mut app_a = Upstream::python("app-a").spawn();
    let app_a_addr = app_a.addr();
    let app_b = Upstream::python("app-b").spawn();
    let a = lifecycle::etcd(lifecycle::instance("node-a", &identity, app_a_addr, "0s"), &etcd).start();
    let b = lifecycle::etcd(lifecycle::instance("node-b", &identity, app_b.addr(), "0s"), &etcd).start();
    let key_a = etcd_key("orders", "orders-node-a");
    let key_b = etcd_key("orders", "orders-node-b");
    wait_key(&etcd, &key_a);
    wait_key(&etcd, &key_b);

    // The caller watches /vmesh/services/orders/ (it is itself an instance of "frontend").
    let caller = lifecycle::Caller::start(|b| lifecycle::etcd(b, &etcd));
    lifecycle::wait_discovered(&caller, "orders", &[a.inbound_addr(), b.inbound_addr()]);

    // The app dies: its key goes, and the caller drops the endpoint.
    app_a.kill();
    wait_no_key(&etcd, &key_a, DEFAULT_WAIT);
    assert!(etcd.value(&key_b).is_some(), "B's key must stay");
    lifecycle::wait_discovered(&caller, "orders", &[b.inbound_addr()]);
    assert_eq!(a.lifecycle()["app"]["healthy"], false);
    // ...and comes back.
    let _app_a = Upstream::python("app-a").on(app_a_addr).spawn();
    wait_key(&etcd, &key_a);
    lifecycle::wait_discovered(&caller, "orders", &[a.inbound_addr(), b.inbound_addr()]);
}

#[test]
fn drain_undrain_and_sigterm_under_load_lose_no_request() {
    // The scenario shared with the Consul double (tests/src/drain_load.rs): the key deleted on
    // drain and kept deleted by anti-entropy, back with a new ramp_start on undrain, deleted at
    // once on SIGTERM (not left to the lease), the caller following, no request failing.
    let etcd = Etcd::spawn();
    drain_load::run(&Registry::Etcd(&etcd), Client::ConnectionPerRequest);
    assert!(etcd
        .keys("/vmesh/services/orders/")
        .iter()
        .all(|k| !k.ends_with("orders-node-a")));
}

#[test]
fn a_killed_agent_s_key_expires_with_its_lease() {
    let etcd = Etcd::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let mut agent = lifecycle::etcd(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &etcd).start();
    let key = etcd_key("orders", "orders-web-01");
    wait_key(&etcd, &key);
    let lease = etcd.get(&key).expect("key").lease;

    agent.kill9();
    let killed = Instant::now();
    // Nobody deleted it: it is still there right after the kill...
    assert!(
        etcd.value(&key).is_some(),
        "the key vanished at once: kill -9 cannot deregister, only the lease can remove it"
    );
    // ...and gone once the 3 s lease runs out (plus etcd's expiry check).
    wait_no_key(&etcd, &key, Duration::from_secs(8));
    let gone_after = killed.elapsed();
    assert!(
        gone_after >= Duration::from_millis(1000),
        "the key went after {gone_after:?}: sooner than a lease expiry"
    );
    assert!(etcd.lease_ttl(lease).is_none(), "the lease must have expired");
}
