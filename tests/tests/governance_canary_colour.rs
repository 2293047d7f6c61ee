//! Canary splits, colour lanes (染色) and colour-limited fault injection, end to end: a route's
//! `split` sends 10% of 2,000 requests to the v2 subset; a coloured request (by a `[colour]`
//! rule or its own header) reaches only endpoints of its colour and falls back to uncoloured
//! ones when that lane has none usable, while uncoloured requests never touch the lane; a VM
//! whose CMDB identity has a colour stamps it on its outbound calls with no header from the
//! app; the colour and `propagate`d headers of an inbound request follow the app's outbound
//! calls for it; and a fault drill limited to one colour aborts all of that colour's requests
//! and none of the others.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value as Json;
use vmesh_tests::agent::toml_table;
use vmesh_tests::governance::{governance, metric_sum, tally, Client, Load, Reply};
use vmesh_tests::lifecycle::Identity;
use vmesh_tests::{eventually, Agent, Inbound, Outbound, Upstream};

const COLOUR: &str = "x-vmesh-colour";

/// Replies by answering upstream (`ERR ...`/status for the rest), for split arithmetic.
fn by_upstream(replies: &[Reply]) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for r in replies {
        let key = match r.upstream() {
            Some(u) if r.status() == 200 => u.to_string(),
            _ => r.label(),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// Sends `n` requests one at a time with `headers`; returns the replies.
fn send(client: &mut Client, n: usize, path: &str, headers: &[(&str, &str)]) -> Vec<Reply> {
    (0..n).map(|_| client.get(path, headers)).collect()
}

/// Every reply is a 200 from one of `names`.
fn assert_all_from(what: &str, replies: &[Reply], names: &[&str]) {
    assert!(
        replies
            .iter()
            .all(|r| r.status() == 200 && r.upstream().is_some_and(|u| names.contains(&u))),
        "{what}: expected only 200s from {names:?}, got {:?}",
        by_upstream(replies)
    );
}

/// The headers an echoing Python upstream received, from its JSON answer.
fn echoed_headers(r: &Reply) -> Json {
    let body: Json =
        serde_json::from_str(&r.text()).unwrap_or_else(|e| panic!("not the echo JSON ({e}): {:?}", r.result));
    body["headers"].clone()
}

#[test]
fn canary_split_sends_ten_percent_of_2000_requests_to_v2() {
    let v1a = Upstream::nginx("v1-a").spawn();
    let v1b = Upstream::nginx("v1-b").spawn();
    let v2 = Upstream::nginx("v2-a").spawn();
    let shop = Outbound::new("shop")
        .timeout("5s")
        .labelled_endpoint(v1a.addr(), &[("version", "v1")])
        .labelled_endpoint(v1b.addr(), &[("version", "v1")])
        .labelled_endpoint(v2.addr(), &[("version", "v2")]);
    let agent = Agent::builder()
        .outbound(shop)
        .route(toml_table(
            r#"
name = "shop-canary"
match = { service = "shop" }
split = [{ version = "v2", weight = 10 }, { version = "v1", weight = 90 }]
"#,
        ))
        .start();
    let routes = governance(&agent, "shop")["routes"].clone();
    assert_eq!(routes[0]["name"], "shop-canary", "{routes}");
    assert_eq!(
        routes[0]["split"],
        serde_json::json!([{"version": "v2", "weight": 10}, {"version": "v1", "weight": 90}])
    );

    let replies = Load::new(agent.outbound_addr("shop"), "/")
        .threads(4)
        .requests_per_thread(500)
        .max_time(Duration::from_secs(50))
        .run();
    let counts = by_upstream(&replies);
    eprintln!("[canary] {} requests: {counts:?}", replies.len());
    assert_eq!(replies.len(), 2_000, "the load was cut short: {counts:?}");
    assert_all_from("canary", &replies, &["v1-a", "v1-b", "v2-a"]);
    let v2_share = 100.0 * counts.get("v2-a").copied().unwrap_or(0) as f64 / replies.len() as f64;
    assert!(
        (v2_share - 10.0).abs() <= 3.0,
        "v2 got {v2_share:.1}% of 2,000 requests, expected 10 +- 3: {counts:?}"
    );
    // v1's 90% goes to both v1 endpoints (how evenly is the balancer's business: p2c-ewma
    // follows latency).
    assert!(
        counts.get("v1-a").is_some_and(|n| *n > 0) && counts.get("v1-b").is_some_and(|n| *n > 0),
        "both v1 endpoints serve the v1 share: {counts:?}"
    );
}

#[test]
fn coloured_requests_stay_in_their_lane_and_fall_back_when_it_is_empty() {
    let plain1 = Upstream::python("plain-1").spawn();
    let plain2 = Upstream::python("plain-2").spawn();
    let mut blue = Upstream::python("blue-1").spawn();
    let shop = Outbound::new("shop")
        .balancer("round-robin")
        .timeout("5s")
        .endpoint(plain1.addr())
        .endpoint(plain2.addr())
        .labelled_endpoint(blue.addr(), &[("colour", "blue")]);
    let agent = Agent::builder()
        .outbound(shop)
        .colour(toml_table(
            r#"rules = [{ colour = "blue", header = { name = "x-user", value = "tester" } }]"#,
        ))
        .start();
    let eps = vmesh_tests::shift::cluster_endpoints(&agent, "shop");
    let blue_ep = eps.iter().find(|e| e["address"] == blue.addr().to_string()).cloned();
    assert_eq!(blue_ep.map(|e| e["colour"].clone()), Some("blue".into()), "{eps:?}");
    let mut client = Client::new(agent.outbound_addr("shop"));
    let plain = ["plain-1", "plain-2"];

    // A rule colours the tester's requests: only the blue endpoint, which sees the colour.
    let tester = send(&mut client, 40, "/", &[("x-user", "tester")]);
    assert_all_from("rule-coloured", &tester, &["blue-1"]);
    assert_eq!(
        echoed_headers(&tester[0])[COLOUR],
        "blue",
        "the colour header is forwarded"
    );
    // A request that arrives coloured keeps its colour.
    let coloured = send(&mut client, 40, "/", &[(COLOUR, "blue")]);
    assert_all_from("header-coloured", &coloured, &["blue-1"]);
    // Uncoloured requests never touch the blue lane, and get no colour header.
    let blue_seen = blue.requests_seen();
    let uncoloured = send(&mut client, 60, "/", &[("x-user", "someone-else")]);
    assert_all_from("uncoloured", &uncoloured, &plain);
    assert!(uncoloured.iter().all(|r| echoed_headers(r).get(COLOUR).is_none()));
    assert_eq!(
        blue.requests_seen(),
        blue_seen,
        "an uncoloured request reached the blue endpoint"
    );
    // A colour with no endpoint of its own falls back to the uncoloured ones.
    let green = send(&mut client, 40, "/", &[(COLOUR, "green")]);
    assert_all_from("green (no green endpoint)", &green, &plain);
    assert_eq!(echoed_headers(&green[0])[COLOUR], "green", "the colour travels on");
    assert_eq!(blue.requests_seen(), blue_seen);

    // The blue lane empties (its only endpoint dies): blue requests fall back to uncoloured
    // endpoints, the first ones by retrying their refused connection there.
    blue.kill();
    let stranded = send(&mut client, 40, "/", &[("x-user", "tester")]);
    assert_all_from("blue lane down", &stranded, &plain);
}

#[test]
fn a_coloured_vm_stamps_its_colour_on_outbound_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().set("colour", "blue").write_in(dir.path());
    let app = Upstream::python("vm-app").spawn();
    let plain = Upstream::python("plain-1").spawn();
    let blue = Upstream::python("blue-1").spawn();
    // No [colour] section: the identity's colour alone marks the VM's calls.
    let agent = Agent::builder()
        .cmdb_file(&identity)
        .inbound(Inbound::new(app.addr(), "http"))
        .outbound(
            Outbound::new("shop")
                .timeout("5s")
                .endpoint(plain.addr())
                .labelled_endpoint(blue.addr(), &[("colour", "blue")]),
        )
        .start();
    // The identity is read shortly after start (GET /status shows it); from then on the VM's
    // calls carry its colour. (Calls made before it is read go out uncoloured: /ready does not
    // wait for the identity when there is no registry.)
    eventually(
        Duration::from_secs(10),
        "the agent to read its identity",
        || match agent.lifecycle()["identity"]["colour"].as_str() {
            Some("blue") => Ok(()),
            _ => Err(agent.lifecycle().to_string()),
        },
    );
    let mut client = Client::new(agent.outbound_addr("shop"));
    eventually(Duration::from_secs(5), "the VM's calls to carry its colour", || {
        let r = client.get("/", &[]);
        match (r.upstream(), echoed_headers(&r).get(COLOUR).cloned()) {
            (Some("blue-1"), Some(c)) if c == "blue" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    // The app sends no colour header; every call is stamped and stays in the blue lane.
    let plain_before = plain.requests_seen();
    let calls = send(&mut client, 30, "/", &[]);
    assert_all_from("the blue VM's calls", &calls, &["blue-1"]);
    assert!(
        calls.iter().all(|r| echoed_headers(r)[COLOUR] == "blue"),
        "every call carries x-vmesh-colour: blue"
    );
    assert_eq!(
        plain.requests_seen(),
        plain_before,
        "a blue VM's call reached the uncoloured endpoint"
    );
}

#[test]
fn inbound_colour_and_propagated_headers_follow_the_apps_outbound_calls() {
    let app = Upstream::python("app").spawn();
    let backend = Upstream::python("backend").spawn();
    let backend_blue = Upstream::python("backend-blue").spawn();
    let agent = Agent::builder()
        .inbound(Inbound::new(app.addr(), "http"))
        .outbound(
            Outbound::new("backend")
                .timeout("5s")
                .endpoint(backend.addr())
                .labelled_endpoint(backend_blue.addr(), &[("colour", "blue")]),
        )
        .colour(toml_table(r#"propagate = ["x-tenant"]"#))
        .start();
    let outbound = agent.outbound_addr("backend");
    let mut client = Client::new(agent.inbound_addr());
    // The app's handler calls the backend through vmesh, forwarding only x-request-id.
    let path = format!("/call?to={outbound}&path=/orders");
    let r = client.get(
        &path,
        &[
            ("x-request-id", "rid-governance-1"),
            (COLOUR, "blue"),
            ("x-tenant", "acme"),
        ],
    );
    assert_eq!(r.status(), 200, "{:?}", r.result);
    let call: Json = serde_json::from_str(&r.text()).expect("the app's /call JSON");
    assert_eq!(call["status"], 200, "{call}");
    assert_eq!(
        call["body"]["name"], "backend-blue",
        "the call stays in the request's blue lane: {call}"
    );
    let seen = &call["body"]["headers"];
    assert_eq!(seen[COLOUR], "blue", "{call}");
    assert_eq!(seen["x-tenant"], "acme", "{call}");
    assert_eq!(seen["x-request-id"], "rid-governance-1", "{call}");

    // A call for another request id carries nothing of it.
    let mut direct = Client::new(outbound);
    let other = direct.get("/orders", &[("x-request-id", "rid-unrelated")]);
    assert_eq!(other.upstream(), Some("backend"), "{:?}", other.result);
    let seen = echoed_headers(&other);
    assert!(seen.get("x-tenant").is_none() && seen.get(COLOUR).is_none(), "{seen}");
}

#[test]
fn a_fault_drill_limited_to_one_colour_touches_no_other_request() {
    let up = Upstream::python("shop-1").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("shop").timeout("5s").endpoint(up.addr()))
        .route(toml_table(
            r#"
name = "drill"
match = { service = "shop" }
fault = { abort_status = 503, abort_percent = 100, colour = "drill" }
"#,
        ))
        .start();
    assert_eq!(governance(&agent, "shop")["routes"][0]["fault"], true);
    let addr = agent.outbound_addr("shop");
    // Drill, uncoloured and blue traffic at the same time, on separate connections.
    let drill = Load::new(addr, "/")
        .header(COLOUR, "drill")
        .threads(2)
        .requests_per_thread(100)
        .spawn();
    let plain = Load::new(addr, "/").threads(2).requests_per_thread(100).spawn();
    let blue = Load::new(addr, "/")
        .header(COLOUR, "blue")
        .threads(1)
        .requests_per_thread(50)
        .spawn();
    let (drill, plain, blue) = (drill.wait(), plain.wait(), blue.wait());
    eprintln!(
        "[fault] drill {:?}, uncoloured {:?}, blue {:?}",
        tally(&drill),
        tally(&plain),
        tally(&blue)
    );
    assert_eq!((drill.len(), plain.len(), blue.len()), (200, 200, 50));
    assert!(
        drill
            .iter()
            .all(|r| r.status() == 503 && r.error_code() == Some("FAULT_INJECTED") && r.upstream().is_none()),
        "every drill request must be aborted with 503 FAULT_INJECTED: {:?}",
        tally(&drill)
    );
    assert_all_from("uncoloured during the drill", &plain, &["shop-1"]);
    assert_all_from("blue during the drill", &blue, &["shop-1"]);
    assert_eq!(up.requests_seen(), 250, "no drill request may reach the upstream");
    let injected = metric_sum(
        &agent.metrics_text(),
        "vmesh_proxy_errors_total",
        &[("service", "shop"), ("code", "FAULT_INJECTED")],
    );
    assert_eq!(injected, 200.0);
}
