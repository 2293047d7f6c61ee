//! Load balancing over static endpoints, counted by the `x-upstream-name` each answer carries.

use std::collections::{BTreeMap, HashSet};

use vmesh_tests::{assert_eventually, Agent, Curl, Outbound, RunningUpstream, Upstream};

fn upstreams(names: &[&str]) -> Vec<RunningUpstream> {
    names.iter().map(|n| Upstream::python(n).spawn()).collect()
}

/// Sends `n` sequential GETs to `url` (with `headers`) and counts answers per upstream name.
fn spread(url: &str, n: usize, headers: &[&str]) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for i in 0..n {
        let r = headers.iter().fold(Curl::get(url), |c, h| c.header(h)).run();
        r.expect_status(200);
        let name = r
            .header("x-upstream-name")
            .unwrap_or_else(|| panic!("request {i}: no x-upstream-name: {r}"));
        *counts.entry(name.to_string()).or_default() += 1;
    }
    counts
}

#[test]
fn round_robin_spreads_evenly() {
    let ups = upstreams(&["rr-a", "rr-b", "rr-c"]);
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("round-robin")
                .endpoints(ups.iter().map(RunningUpstream::addr)),
        )
        .start();
    let counts = spread(&agent.outbound_url("orders", "/"), 30, &[]);
    assert_eq!(counts.len(), 3, "every endpoint must be used: {counts:?}");
    for (name, n) in &counts {
        assert!(
            (8..=12).contains(n),
            "round-robin over 3 x 30: {name} got {n}: {counts:?}"
        );
    }
}

#[test]
fn weighted_follows_the_weights() {
    let ups = upstreams(&["heavy", "light"]);
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("weighted")
                .weighted_endpoint(ups[0].addr(), 3)
                .weighted_endpoint(ups[1].addr(), 1),
        )
        .start();
    let counts = spread(&agent.outbound_url("orders", "/"), 40, &[]);
    let heavy = counts.get("heavy").copied().unwrap_or(0);
    let light = counts.get("light").copied().unwrap_or(0);
    assert_eq!(heavy + light, 40, "{counts:?}");
    assert!(
        (26..=34).contains(&heavy),
        "weights 3:1 over 40 requests gave {counts:?}"
    );
}

#[test]
fn ring_hash_keeps_a_header_value_on_one_endpoint() {
    let ups = upstreams(&["rh-a", "rh-b", "rh-c"]);
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("ring-hash")
                .set("hash_header", "x-user")
                .endpoints(ups.iter().map(RunningUpstream::addr)),
        )
        .start();
    let url = agent.outbound_url("orders", "/");
    let mut used = HashSet::new();
    for user in 0..20 {
        let header = format!("X-User: user-{user}");
        let counts = spread(&url, 4, &[&header]);
        assert_eq!(counts.len(), 1, "user-{user} was spread over {counts:?}");
        used.extend(counts.into_keys());
    }
    assert!(
        used.len() >= 2,
        "20 users all hashed to {used:?}: the ring does not spread"
    );
}

#[test]
fn random_least_request_and_p2c_ewma_serve_every_request() {
    let ups = upstreams(&["any-a", "any-b", "any-c"]);
    for balancer in ["random", "least-request", "p2c-ewma"] {
        let agent = Agent::builder()
            .outbound(
                Outbound::new("orders")
                    .balancer(balancer)
                    .endpoints(ups.iter().map(RunningUpstream::addr)),
            )
            .start();
        let counts = spread(&agent.outbound_url("orders", "/"), 30, &[]);
        assert_eq!(counts.values().sum::<usize>(), 30, "{balancer}: {counts:?}");
        if balancer == "random" {
            assert!(counts.len() >= 2, "random over 3 endpoints used only {counts:?}");
        }
    }
}

#[test]
fn least_request_avoids_the_busy_endpoint() {
    let ups = upstreams(&["lr-a", "lr-b"]);
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("least-request")
                .endpoints(ups.iter().map(RunningUpstream::addr)),
        )
        .start();
    let slow_url = agent.outbound_url("orders", "/slow?ms=3000");
    let slow = std::thread::spawn(move || Curl::get(slow_url).run());
    assert_eventually!(
        ups.iter().map(RunningUpstream::in_flight).sum::<u64>() == 1,
        "the slow request to reach an upstream"
    );
    let busy = ups
        .iter()
        .find(|u| u.in_flight() == 1)
        .map(|u| u.name().to_string())
        .expect("one upstream is busy");
    let counts = spread(&agent.outbound_url("orders", "/"), 10, &[]);
    assert_eq!(
        counts.get(&busy),
        None,
        "least-request sent to the busy {busy}: {counts:?}"
    );
    slow.join().expect("slow request").expect_status(200);
}
