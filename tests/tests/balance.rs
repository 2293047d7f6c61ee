//! Load balancing over static endpoints, counted by the `x-upstream-name` each answer carries.

use std::collections::{BTreeMap, HashSet};

use vmesh_tests::{assert_eventually, Agent, Curl, CurlResponse, Outbound, RunningUpstream, Upstream};

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

#[test]
fn p2c_ewma_sends_a_slow_endpoint_measurably_less() {
    // One endpoint answers in 400 ms, two at once. Round-robin or random would give the slow one
    // a third (20 of 60); p2c-ewma sends it a request, measures 400 ms, and then loses it every
    // comparison while the estimate fades (10 s time constant): it gets the first probe and
    // at most the odd request after a fast endpoint's hiccup on a loaded machine.
    let slow = Upstream::python("pe-slow").delay_ms(400).spawn();
    let fast = upstreams(&["pe-fast-1", "pe-fast-2"]);
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("p2c-ewma")
                .endpoint(slow.addr())
                .endpoints(fast.iter().map(RunningUpstream::addr)),
        )
        .start();
    let counts = spread(&agent.outbound_url("orders", "/"), 60, &[]);
    assert_eq!(counts.values().sum::<usize>(), 60, "{counts:?}");
    let to_slow = counts.get("pe-slow").copied().unwrap_or(0);
    assert!(
        to_slow <= 6,
        "p2c-ewma sent {to_slow} of 60 requests to the endpoint 400 ms slower (a third would be 20): {counts:?}"
    );
    assert_eq!(
        slow.requests_seen(),
        to_slow as u64,
        "the slow upstream saw what the answers say"
    );
}

#[test]
fn least_request_follows_the_in_flight_counts() {
    // Requests held at the upstreams' `/gate` stay in flight until released, so the in-flight
    // counts are exactly what the test makes them.
    const N: u64 = 4;
    let ups = upstreams(&["lr-a", "lr-b"]);
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("least-request")
                .timeout("60s")
                .endpoints(ups.iter().map(RunningUpstream::addr)),
        )
        .start();
    let gate_url = agent.outbound_url("orders", "/gate");
    let in_flight = || (ups[0].in_flight(), ups[1].in_flight());
    let mut held: Vec<std::thread::JoinHandle<CurlResponse>> = Vec::new();
    let hold = |held: &mut Vec<std::thread::JoinHandle<CurlResponse>>, total: u64| {
        let url = gate_url.clone();
        held.push(std::thread::spawn(move || Curl::get(url).run()));
        assert_eventually!(
            in_flight().0 + in_flight().1 == total,
            "held request {total} to reach an upstream"
        );
        in_flight()
    };

    // 2N held requests sent one by one: each goes where fewer are in flight, so they level out.
    for k in 1..=2 * N {
        let (a, b) = hold(&mut held, k);
        assert!(a.abs_diff(b) <= 1, "after {k} held requests: lr-a {a}, lr-b {b}");
    }
    assert_eq!(in_flight(), (N, N));

    // lr-b's requests finish: lr-a holds N, lr-b none. Every new request goes to lr-b.
    ups[1].release_gates();
    assert_eventually!(in_flight() == (N, 0), "lr-b's held requests to finish");
    let finished_b = held_finished(&mut held, N as usize);
    assert_eventually!(
        endpoint_in_flight(&agent, &ups) == (N, 0),
        "/clusters to show what the upstreams hold"
    );
    let counts = spread(&agent.outbound_url("orders", "/"), 20, &[]);
    assert_eq!(
        counts.get("lr-a"),
        None,
        "least-request sent to lr-a holding {N} while lr-b held none: {counts:?}"
    );

    // Held requests now fill lr-b up to lr-a's count: N - 1 more all go to lr-b (each time lr-b
    // has fewer in flight), and lr-a keeps its N.
    for k in 1..N {
        let (a, b) = hold(&mut held, N + k);
        assert_eq!((a, b), (N, k), "held request {k} after the release must go to lr-b");
    }

    for up in &ups {
        up.release_gates();
    }
    for h in held {
        h.join().expect("held request").expect_status(200);
    }
    for r in finished_b {
        r.expect_status(200);
    }
}

/// Joins the held requests that have finished (expecting `n` of them, bounded wait); keeps
/// the rest in `held`.
fn held_finished(held: &mut Vec<std::thread::JoinHandle<CurlResponse>>, n: usize) -> Vec<CurlResponse> {
    assert_eventually!(
        held.iter().filter(|h| h.is_finished()).count() == n,
        "{n} released requests to finish"
    );
    let (done, rest): (Vec<_>, Vec<_>) = held.drain(..).partition(|h| h.is_finished());
    *held = rest;
    done.into_iter().map(|h| h.join().expect("held request")).collect()
}

/// `in_flight` of the two endpoints in `/clusters`, in the order of `ups`.
fn endpoint_in_flight(agent: &Agent, ups: &[RunningUpstream]) -> (u64, u64) {
    let doc = agent.admin_json("/clusters?service=orders");
    let of = |up: &RunningUpstream| {
        doc["clusters"][0]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["address"] == up.addr().to_string().as_str())
            .and_then(|e| e["in_flight"].as_u64())
            .unwrap_or_else(|| panic!("no in_flight for {}: {doc}", up.addr()))
    };
    (of(&ups[0]), of(&ups[1]))
}
