//! Discovery from a real etcd (Debian's etcd-server) by a caller vmesh: instances joining and
//! leaving are seen within a second, malformed and oversized values are skipped without
//! disturbing the endpoints in use, a ramping instance gets the share its slow-start curve
//! gives it (round-robin and p2c-ewma alike), and a service where most instances ramp at once
//! runs them at full weight instead.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::json;
use vmesh_tests::etcd::Etcd;
use vmesh_tests::lifecycle::{self, discovered, etcd_key, wait_discovered};
use vmesh_tests::shift::{
    cluster, cluster_endpoint, etcd_delete, etcd_meta, etcd_put_instance, etcd_put_stdin, etcd_value, ramp_share,
    ramp_weight, sleep_until_unix, tally, time_until_discovered, unix_now_f64, Hit, KeepAlive, SteadyLoad,
};
use vmesh_tests::{assert_eventually, Agent, AgentBuilder, Outbound, RunningUpstream, Upstream};

/// The longest a caller may take to see a registry change.
const PROPAGATION_LIMIT: Duration = Duration::from_secs(1);

/// A caller of "web" discovering it from `etcd`, balancing with `balancer`.
fn caller(etcd: &Etcd, balancer: &str) -> Agent {
    lifecycle::etcd(AgentBuilder::new().agent_set("node", "caller"), etcd)
        .outbound(Outbound::new("web").balancer(balancer).timeout("5s"))
        .start()
}

#[test]
fn instances_joining_and_leaving_etcd_reach_the_caller_within_a_second() {
    let etcd = Etcd::spawn();
    let a = Upstream::nginx("a").spawn();
    let b = Upstream::nginx("b").spawn();
    let caller = caller(&etcd, "round-robin");
    wait_discovered(&caller, "web", &[]);

    let mut measured = Vec::new();
    let t = Instant::now();
    etcd_put_instance(&etcd, "web", "web-a", a.addr(), "vm");
    measured.push(("a joins", time_until_discovered(&caller, "web", &[a.addr()], t)));
    let t = Instant::now();
    etcd_put_instance(&etcd, "web", "web-b", b.addr(), "vm");
    measured.push((
        "b joins",
        time_until_discovered(&caller, "web", &[a.addr(), b.addr()], t),
    ));
    // Traffic follows: both answer.
    let mut client = KeepAlive::new(caller.outbound_addr("web"));
    let names: Vec<String> = (0..20)
        .map(|_| {
            let r = client.get("/").expect("request through the caller");
            assert_eq!(r.status, 200, "{}", r.text());
            r.header("x-upstream-name").unwrap_or_default().to_string()
        })
        .collect();
    assert_eq!(names.iter().filter(|n| *n == "a").count(), 10, "{names:?}");
    let t = Instant::now();
    etcd_delete(&etcd, &etcd_key("web", "web-a"));
    measured.push(("a leaves", time_until_discovered(&caller, "web", &[b.addr()], t)));
    let t = Instant::now();
    etcd_delete(&etcd, &etcd_key("web", "web-b"));
    measured.push(("b leaves", time_until_discovered(&caller, "web", &[], t)));

    // Each measure runs from before `etcdctl` starts (its own start-up included) to the
    // first /clusters poll (every 25 ms) that shows the change.
    eprintln!("[etcd propagation] {measured:?}");
    for (what, took) in &measured {
        assert!(*took < PROPAGATION_LIMIT, "{what}: the caller saw it after {took:?}");
    }
    let updates = caller.metric("vmesh_discovery_updates_total{direction=\"outbound\",service=\"web\"}");
    assert!(updates.is_some_and(|n| n >= 4.0), "one update per change: {updates:?}");
}

#[test]
fn malformed_and_oversized_values_are_skipped_and_the_endpoints_keep_serving() {
    let etcd = Etcd::spawn();
    let a = Upstream::nginx("a").spawn();
    let b = Upstream::nginx("b").spawn();
    // Instances the bad values name: they must never get traffic.
    let trap = Upstream::nginx("trap").spawn();
    let late = Upstream::nginx("late").spawn();
    etcd_put_instance(&etcd, "web", "web-a", a.addr(), "vm");
    etcd_put_instance(&etcd, "web", "web-b", b.addr(), "vm");
    let caller = caller(&etcd, "round-robin");
    wait_discovered(&caller, "web", &[a.addr(), b.addr()]);
    let load = SteadyLoad::start(caller.outbound_addr("web"), "/", Duration::from_millis(2));
    load.wait_hits_since(Instant::now(), 100, Duration::from_secs(10));

    let bad: Vec<(&str, Vec<u8>)> = vec![
        ("web-junk", b"{not json".to_vec()),
        (
            "web-no-ip",
            etcd_value(trap.addr(), 100, etcd_meta("vm"))
                .replace("127.0.0.1", "trap.example")
                .into_bytes(),
        ),
        (
            "web-port-0",
            br#"{"address":"127.0.0.1","port":0,"weight":100}"#.to_vec(),
        ),
        ("web-array", br#"[1,2,3]"#.to_vec()),
        // 1 MiB: an endpoint record is a few hundred bytes; this one is not a plausible record.
        (
            "web-huge",
            etcd_value(trap.addr(), 100, json!({"env": "vm", "pad": "x".repeat(1 << 20)})).into_bytes(),
        ),
    ];
    for (id, value) in &bad {
        etcd_put_stdin(&etcd, &etcd_key("web", id), value);
    }
    // A good instance written after the bad ones: the watch survived them.
    let t = Instant::now();
    etcd_put_instance(&etcd, "web", "web-late", late.addr(), "vm");
    let late_addr = late.addr().to_string();
    assert_eventually!(
        discovered(&caller, "web").contains(&late_addr),
        "the instance written after the bad values to be discovered"
    );
    eprintln!(
        "[etcd bad values] a good instance after the bad values seen in {:?}",
        t.elapsed()
    );
    let mut want = vec![a.addr().to_string(), b.addr().to_string(), late_addr];
    want.sort();
    let found = discovered(&caller, "web");
    assert!(
        !found.contains(&trap.addr().to_string()),
        "a skipped value became an endpoint: {} (named only by the 1 MiB value) is listed in {found:?}",
        trap.addr()
    );
    assert_eq!(found, want);
    let after = Instant::now();
    let hits = load.wait_hits_since(after, 300, Duration::from_secs(20));
    let all = load.stop();
    let counts = tally(&all);
    eprintln!("[etcd bad values] load: {counts:?}");
    assert!(all.iter().all(|h| h.outcome.is_ok()), "no request may fail: {counts:?}");
    assert!(!counts.contains_key("trap"), "a skipped value got traffic: {counts:?}");
    for name in ["a", "b", "late"] {
        let n = hits.iter().filter(|h| h.by(name)).count();
        assert!(
            (90..=110).contains(&n),
            "{name} answered {n} of 300: {:?}",
            tally(&hits)
        );
    }
    let c = cluster(&caller, "web");
    assert_eq!(c["discovery"]["stale"], false, "{c}");
    assert_eq!(caller.admin_get("/live").status, 200);
}

/// Samples the share of a ramping instance next to one at full weight at t = 5, 10, 15 s of a
/// 20 s window; each within 10 points of `w / (w + 100)`, `w = 100 t / 20`.
fn ramp_share_follows_the_curve(balancer: &str) {
    const WINDOW: u64 = 20;
    const SAMPLE: usize = 300;
    let etcd = Etcd::spawn();
    let old = Upstream::nginx("old").spawn();
    let new = Upstream::nginx("new").spawn();
    etcd_put_instance(&etcd, "web", "web-old", old.addr(), "vm");
    let caller = caller(&etcd, balancer);
    wait_discovered(&caller, "web", &[old.addr()]);
    // Warm the one connection (and p2c-ewma's latency estimate of `old`).
    let mut client = KeepAlive::new(caller.outbound_addr("web"));
    for _ in 0..50 {
        assert_eq!(client.get("/").map(|r| r.status), Ok(200));
    }

    let start = lifecycle::unix_now();
    let meta = json!({"env": "vm", "zone": "z1", "version": "v2", "ramp_start": start, "ramp_window": WINDOW});
    etcd.put(&etcd_key("web", "web-new"), &etcd_value(new.addr(), 100, meta));
    wait_discovered(&caller, "web", &[old.addr(), new.addr()]);
    let early = cluster_endpoint(&caller, "web", new.addr()).expect("new is listed");
    let early_weight = early["weight"].as_u64().unwrap_or(0);
    assert!(early_weight < 30, "a fresh ramp starts low: {early}");

    let mut samples = Vec::new();
    for t in [5u64, 10, 15] {
        // The caller moves along its curve on a one-second tick of its own phase: wait for the
        // weight of second t in /clusters, then sample before the next tick (one weight for the
        // whole sample, not the one of second t - 1 for part of it).
        sleep_until_unix(start as f64 + t as f64);
        let curve_weight = ramp_weight(t as f64, WINDOW as f64).floor() as u64;
        assert_eventually!(
            weight_of(&caller, new.addr()) >= curve_weight,
            "/clusters shows new at weight {curve_weight} (t={t}s)"
        );
        let began = unix_now_f64() - start as f64;
        let hits: Vec<Hit> = (0..SAMPLE)
            .map(|_| {
                let s = Instant::now();
                let outcome = match client.get("/") {
                    Ok(r) if r.status == 200 => Ok(r.header("x-upstream-name").unwrap_or_default().to_string()),
                    Ok(r) => Err(format!("HTTP {}", r.status)),
                    Err(e) => Err(e),
                };
                Hit {
                    start: s,
                    end: Instant::now(),
                    outcome,
                }
            })
            .collect();
        let ended = unix_now_f64() - start as f64;
        let shown = |addr: SocketAddr| {
            cluster_endpoint(&caller, "web", addr).map(|e| (e["weight"].clone(), e["ewma_ms"].clone()))
        };
        let (weight_shown, ewma) = (shown(new.addr()), shown(old.addr()));
        assert!(hits.iter().all(|h| h.outcome.is_ok()), "{:?}", tally(&hits));
        let share = hits.iter().filter(|h| h.by("new")).count() as f64 / SAMPLE as f64;
        let want = ramp_share(ramp_weight(t as f64, WINDOW as f64), 1);
        eprintln!(
            "[ramp {balancer}] t={began:.2}..{ended:.2}s: new got {:.1}% (curve {:.1}%); /clusters (weight, ewma_ms): new {weight_shown:?}, old {ewma:?}",
            100.0 * share,
            100.0 * want
        );
        samples.push((t, share, want));
    }
    for (t, share, want) in &samples {
        assert!(
            (share - want).abs() <= 0.10,
            "{balancer}: at t={t}s the ramping instance got {:.1}%, the curve says {:.1}% (samples {samples:?})",
            100.0 * share,
            100.0 * want
        );
    }
    assert!(
        samples.windows(2).all(|w| w[0].1 < w[1].1),
        "{balancer}: the share grows along the ramp: {samples:?}"
    );
}

#[test]
fn a_ramping_instance_gets_its_curve_share_with_round_robin() {
    ramp_share_follows_the_curve("round-robin");
}

#[test]
fn a_ramping_instance_gets_its_curve_share_with_p2c_ewma() {
    ramp_share_follows_the_curve("p2c-ewma");
}

fn put_ramping(etcd: &Etcd, id: &str, addr: SocketAddr, start: u64) {
    let meta = json!({"env": "vm", "zone": "z1", "version": "v2", "ramp_start": start, "ramp_window": 60});
    etcd.put(&etcd_key("web", id), &etcd_value(addr, 100, meta));
}

fn weight_of(caller: &Agent, addr: SocketAddr) -> u64 {
    cluster_endpoint(caller, "web", addr)
        .and_then(|e| e["weight"].as_u64())
        .unwrap_or(0)
}

#[test]
fn when_most_instances_ramp_at_once_the_ramps_are_suspended() {
    let etcd = Etcd::spawn();
    let ups: Vec<RunningUpstream> = ["old", "new1", "new2", "new3"]
        .iter()
        .map(|n| Upstream::nginx(n).spawn())
        .collect();
    let addrs: Vec<SocketAddr> = ups.iter().map(RunningUpstream::addr).collect();
    etcd_put_instance(&etcd, "web", "web-old", addrs[0], "vm");
    let caller = caller(&etcd, "round-robin");
    wait_discovered(&caller, "web", &addrs[..1]);
    let suspended = "vmesh_ramp_suspended{service=\"web\"}";

    // One of two ramping: not more than half, the ramp applies.
    let start = lifecycle::unix_now();
    put_ramping(&etcd, "web-new1", addrs[1], start);
    wait_discovered(&caller, "web", &addrs[..2]);
    // Never suspended yet: the gauge reads 0 (or is not exported yet).
    assert_eventually!(caller.metric(suspended).unwrap_or(0.0) == 0.0, "{suspended} 0");
    let w = weight_of(&caller, addrs[1]);
    assert!(w < 20, "new1 ramps (weight {w})");
    assert_eq!(cluster(&caller, "web")["discovery"]["ramp_suspended"], false);

    // Three of four ramping: suspended, everyone at full weight.
    put_ramping(&etcd, "web-new2", addrs[2], start);
    put_ramping(&etcd, "web-new3", addrs[3], start);
    wait_discovered(&caller, "web", &addrs);
    assert_eventually!(caller.metric(suspended) == Some(1.0), "{suspended} 1");
    assert_eventually!(
        addrs.iter().all(|a| weight_of(&caller, *a) == 100),
        "every endpoint at weight 100 in /clusters"
    );
    let c = cluster(&caller, "web");
    assert_eq!(c["discovery"]["ramp_suspended"], true, "{c}");
    // The balancer uses the full weights: a quarter each.
    let mut client = KeepAlive::new(caller.outbound_addr("web"));
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..400 {
        let r = client.get("/").expect("request through the caller");
        assert_eq!(r.status, 200, "{}", r.text());
        *counts
            .entry(r.header("x-upstream-name").unwrap_or_default().to_string())
            .or_insert(0usize) += 1;
    }
    eprintln!("[ramp suspended] 400 requests: {counts:?}");
    for name in ["old", "new1", "new2", "new3"] {
        let n = counts.get(name).copied().unwrap_or(0);
        assert!((80..=120).contains(&n), "{name} got {n} of 400: {counts:?}");
    }

    // Back to one of four ramping: resumed.
    etcd_delete(&etcd, &etcd_key("web", "web-new2"));
    etcd_delete(&etcd, &etcd_key("web", "web-new3"));
    etcd_put_instance(&etcd, "web", "web-old2", addrs[2], "vm");
    etcd_put_instance(&etcd, "web", "web-old3", addrs[3], "vm");
    assert_eventually!(caller.metric(suspended) == Some(0.0), "{suspended} back to 0");
    assert_eventually!(weight_of(&caller, addrs[1]) < 50, "new1 ramps again");
}
