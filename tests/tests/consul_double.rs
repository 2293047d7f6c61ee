//! The Consul test double itself (`tests/fixtures/consul_double.py`), checked with curl: the
//! behaviours vmesh's Consul client relies on must hold before any vmesh test trusts the double.

use std::time::{Duration, Instant};

use serde_json::Value;
use vmesh_tests::consul::{consul_index, ConsulDouble};
use vmesh_tests::{assert_eventually, Curl, CurlResponse};

const WEB: &str = r#"{
    "ID": "web-test", "Name": "web", "Address": "10.0.0.5", "Port": 15006, "Tags": ["vm"],
    "Meta": {"vmesh-env": "vm", "vmesh-zone": "z1"},
    "Weights": {"Passing": 10, "Warning": 1},
    "Check": {"HTTP": "http://127.0.0.1:15006/healthz", "Interval": "5s"}
}"#;

fn api(id: &str) -> String {
    format!(r#"{{"ID": "{id}", "Name": "api", "Port": 8080, "Check": {{"TTL": "60s", "Status": "passing"}}}}"#)
}

fn ok(r: CurlResponse) -> CurlResponse {
    r.expect_status(200);
    r
}

fn health(consul: &ConsulDouble, query: &str) -> (u64, Vec<Value>) {
    let r = ok(consul.get(&format!("/v1/health/service/{query}")));
    let entries = r
        .json()
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("not an array: {r}"));
    (consul_index(&r), entries)
}

fn ids(entries: &[Value]) -> Vec<String> {
    entries
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn check<'a>(entry: &'a Value, id: &str) -> &'a Value {
    entry["Checks"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["CheckID"] == id))
        .unwrap_or_else(|| panic!("no check {id} in {entry}"))
}

/// Runs a blocking GET of `path` on another thread; returns (elapsed, response).
fn spawn_blocking_get(consul: &ConsulDouble, path: &str) -> std::thread::JoinHandle<(Duration, CurlResponse)> {
    let curl = consul.request("GET", path);
    std::thread::spawn(move || {
        let start = Instant::now();
        let r = curl.run();
        (start.elapsed(), r)
    })
}

#[test]
fn registered_service_shows_in_health_once_its_check_passes() {
    let consul = ConsulDouble::spawn();
    ok(consul.put("/v1/agent/service/register", WEB));

    let services = ok(consul.get("/v1/agent/services")).json();
    assert_eq!(services["web-test"]["Service"], "web", "{services}");
    assert_eq!(services["web-test"]["Port"], 15006, "{services}");

    // An HTTP check starts critical (the double never runs it): not in passing results yet.
    let (_, passing) = health(&consul, "web?passing=true");
    assert!(passing.is_empty(), "{passing:?}");
    let (index, all) = health(&consul, "web");
    assert_eq!(ids(&all), ["web-test"]);
    let entry = &all[0];
    assert_eq!(check(entry, "service:web-test")["Status"], "critical");
    assert_eq!(
        check(entry, "serfHealth")["Status"],
        "passing",
        "the node's serf check is listed"
    );
    assert_eq!(entry["Node"]["Address"], "127.0.0.1");
    assert_eq!(entry["Service"]["Address"], "10.0.0.5");
    assert_eq!(entry["Service"]["Meta"]["vmesh-zone"], "z1");
    assert_eq!(entry["Service"]["Weights"]["Passing"], 10);
    assert_eq!(entry["Service"]["Tags"][0], "vm");

    consul.control("check?id=service:web-test&status=passing");
    let (after, passing) = health(&consul, "web?passing=1");
    assert_eq!(ids(&passing), ["web-test"]);
    assert!(after > index, "a status change moves the index: {index} -> {after}");

    // `passing` excludes warning as well as critical, as Consul's filter does.
    consul.control("check?id=service:web-test&status=warning");
    assert!(health(&consul, "web?passing").1.is_empty());
    // Tag filtering.
    consul.control("check?id=service:web-test&status=passing");
    assert_eq!(ids(&health(&consul, "web?passing&tag=vm").1), ["web-test"]);
    assert!(health(&consul, "web?tag=k8s").1.is_empty());
}

#[test]
fn registration_is_validated_like_consul() {
    let consul = ConsulDouble::spawn();
    let cases = [
        (r#"{"Port": 1}"#, "Missing service name"),
        (r#"{"Name": "x", "Port": "80"}"#, "cannot unmarshal string"),
        (r#"{"Name": "x", "Meta": {"a": 1}}"#, "cannot unmarshal number"),
        (
            r#"{"Name": "x", "Weights": {"Passing": 0, "Warning": 1}}"#,
            "Passing must be greater than 0",
        ),
        (r#"{"Name": "x", "Bogus": true}"#, r#"unknown field "Bogus""#),
        (
            r#"{"Name": "x", "Check": {"HTTP": "http://x/"}}"#,
            "Interval must be > 0",
        ),
        (r#"{"Name": "x", "Check": {"TTL": "10"}}"#, "missing unit in duration"),
    ];
    for (body, expected) in cases {
        let r = consul.put("/v1/agent/service/register", body);
        assert_eq!(r.status, 400, "{body}: {r}");
        assert!(
            r.text().contains(expected),
            "{body}: expected {expected:?} in {:?}",
            r.text()
        );
    }
    // Field names match case-insensitively, as Go's encoding/json does.
    ok(consul.put("/v1/agent/service/register", r#"{"name": "lower", "port": 1}"#));
    let r = consul.put("/v1/agent/service/deregister/nope", "");
    assert_eq!(r.status, 404, "{r}");
    assert!(r.text().starts_with("Unknown service ID \"nope\""), "{}", r.text());
    let r = consul.put("/v1/agent/check/pass/nope", "");
    assert_eq!(r.status, 404, "{r}");
    assert_eq!(consul.get("/v1/agent/service/register").status, 405);
    assert_eq!(
        consul.get("/v1/health/service/x?index=1&wait=5").text(),
        "Invalid wait time"
    );
    assert_eq!(writes(&consul, "register"), cases.len() as u64 + 1);
}

#[test]
fn maintenance_removes_an_instance_from_passing_results_until_disabled() {
    let consul = ConsulDouble::spawn();
    ok(consul.put("/v1/agent/service/register", &api("api-1")));
    ok(consul.put("/v1/agent/service/register", &api("api-2")));
    assert_eq!(ids(&health(&consul, "api?passing=true").1), ["api-1", "api-2"]);

    ok(consul.put("/v1/agent/service/maintenance/api-1?enable=true&reason=deploy", ""));
    assert_eq!(ids(&health(&consul, "api?passing=true").1), ["api-2"]);
    let (_, all) = health(&consul, "api");
    let maint = check(&all[0], "_service_maintenance:api-1");
    assert_eq!(maint["Status"], "critical", "{maint}");
    assert_eq!(maint["Notes"], "deploy", "{maint}");

    ok(consul.put("/v1/agent/service/maintenance/api-1?enable=false", ""));
    assert_eq!(ids(&health(&consul, "api?passing=true").1), ["api-1", "api-2"]);
    assert_eq!(
        consul.put("/v1/agent/service/maintenance/nope?enable=true", "").status,
        404
    );
    assert_eq!(writes(&consul, "maintenance"), 3);
}

#[test]
fn blocking_query_wakes_on_change_and_times_out_without_one() {
    let consul = ConsulDouble::spawn();
    ok(consul.put("/v1/agent/service/register", &api("api-1")));
    let (index, _) = health(&consul, "api");

    // A write to the service wakes a query blocked on its index, well before `wait`.
    let before = consul.arrived("health_service");
    let waiter = spawn_blocking_get(&consul, &format!("/v1/health/service/api?index={index}&wait=20s"));
    assert_eventually!(
        consul.arrived("health_service") > before,
        "the blocking query to arrive"
    );
    ok(consul.put("/v1/agent/service/register", &api("api-2")));
    let (elapsed, r) = waiter.join().expect("blocking query thread");
    r.expect_status(200);
    assert!(
        elapsed < Duration::from_secs(10),
        "woke after {elapsed:?}, not on the change"
    );
    let woke_index = consul_index(&r);
    assert!(woke_index > index, "index must move past {index}: {r}");
    assert_eq!(ids(r.json().as_array().expect("array")), ["api-1", "api-2"]);

    // Nothing changes for this service (a KV write moves only the KV index): the query returns
    // after `wait` (+ at most wait/16 of jitter) with the same index.
    let before = consul.arrived("health_service");
    let waiter = spawn_blocking_get(&consul, &format!("/v1/health/service/api?index={woke_index}&wait=1s"));
    assert_eventually!(
        consul.arrived("health_service") > before,
        "the blocking query to arrive"
    );
    ok(consul.put("/v1/kv/unrelated", "x"));
    let (elapsed, r) = waiter.join().expect("blocking query thread");
    r.expect_status(200);
    assert!(
        elapsed >= Duration::from_secs(1),
        "returned after {elapsed:?}, before wait=1s"
    );
    assert!(
        elapsed < Duration::from_secs(5),
        "returned after {elapsed:?}, long after wait=1s"
    );
    assert_eq!(consul_index(&r), woke_index, "no change, same index: {r}");
    for header in ["x-consul-knownleader", "x-consul-lastcontact"] {
        assert!(r.header(header).is_some(), "no {header}: {r}");
    }
}

#[test]
fn index_reset_returns_blocked_queries_with_a_lower_index() {
    let consul = ConsulDouble::builder().arg("--start-index").arg("500").spawn();
    ok(consul.put("/v1/kv/vmesh/shift/orders", r#"{"vm": 100}"#));
    let index = consul_index(&ok(consul.get("/v1/kv/vmesh/shift/orders")));
    assert!(index > 500, "{index}");
    let before = consul.arrived("kv_get");
    let waiter = spawn_blocking_get(&consul, &format!("/v1/kv/vmesh/shift/orders?index={index}&wait=20s"));
    assert_eventually!(consul.arrived("kv_get") > before, "the blocking query to arrive");
    consul.control("reset-index?to=3");
    let (elapsed, r) = waiter.join().expect("blocking query thread");
    r.expect_status(200);
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert!(consul_index(&r) <= 3, "the index went backwards: {r}");
}

#[test]
fn kv_put_honours_cas() {
    let consul = ConsulDouble::spawn();
    let key = "/v1/kv/vmesh/shift/orders";
    assert_eq!(ok(consul.put(&format!("{key}?cas=0"), "v1")).text(), "true");
    assert_eq!(
        ok(consul.put(&format!("{key}?cas=0"), "v2")).text(),
        "false",
        "cas=0: only if absent"
    );

    let r = ok(consul.get(key));
    let entry = &r.json()[0];
    assert_eq!(entry["Key"], "vmesh/shift/orders");
    assert_eq!(entry["Value"], "djE=", "base64 of v1: {entry}");
    let modify = entry["ModifyIndex"].as_u64().expect("ModifyIndex");
    assert_eq!(consul_index(&r), modify);
    assert_eq!(ok(consul.get(&format!("{key}?raw"))).text(), "v1");

    assert_eq!(ok(consul.put(&format!("{key}?cas={modify}"), "v3")).text(), "true");
    assert_eq!(
        ok(consul.put(&format!("{key}?cas={modify}"), "v4")).text(),
        "false",
        "stale cas"
    );
    assert_eq!(ok(consul.get(&format!("{key}?raw"))).text(), "v3");
    let modify2 = ok(consul.get(key)).json()[0]["ModifyIndex"]
        .as_u64()
        .expect("ModifyIndex");
    assert!(modify2 > modify);

    let missing = consul.get("/v1/kv/vmesh/shift/nope");
    assert_eq!(missing.status, 404, "{missing}");
    assert!(consul_index(&missing) >= 1);

    let delete = |q: &str| consul.request("DELETE", &format!("{key}{q}")).run();
    assert_eq!(ok(delete(&format!("?cas={modify}"))).text(), "false");
    assert_eq!(ok(delete(&format!("?cas={modify2}"))).text(), "true");
    assert_eq!(consul.get(key).status, 404);
    assert_eq!(writes(&consul, "kv"), 6);
}

#[test]
fn acl_token_is_enforced() {
    let consul = ConsulDouble::builder().acl_token("s3cret").spawn();
    let register = |header: Option<&str>| {
        let curl = Curl::get(consul.url("/v1/agent/service/register"))
            .method("PUT")
            .body(WEB);
        match header {
            Some(h) => curl.header(h).run(),
            None => curl.run(),
        }
    };
    let denied = register(None);
    assert_eq!(denied.status, 403, "{denied}");
    assert!(denied.text().starts_with("Permission denied"), "{:?}", denied.text());
    let wrong = register(Some("X-Consul-Token: wrong"));
    assert_eq!(wrong.status, 403, "{wrong}");
    assert_eq!(wrong.text(), "ACL not found");
    ok(register(Some("X-Consul-Token: s3cret")));
    ok(register(Some("Authorization: Bearer s3cret")));

    // Anonymous list reads are filtered (an empty answer), single reads denied, as in Consul.
    let anonymous = ok(Curl::get(consul.url("/v1/health/service/web")).run());
    assert_eq!(anonymous.json(), serde_json::json!([]));
    assert_eq!(ids(&health(&consul, "web").1), ["web-test"], "with the token");
    assert_eq!(Curl::get(consul.url("/v1/kv/x")).run().status, 403);
}

#[test]
fn restart_forgets_agent_services_but_keeps_kv() {
    let consul = ConsulDouble::spawn();
    ok(consul.put("/v1/agent/service/register", &api("api-1")));
    ok(consul.put("/v1/kv/keep", "me"));
    let (index, _) = health(&consul, "api");

    let before = consul.arrived("health_service");
    let waiter = spawn_blocking_get(&consul, &format!("/v1/health/service/api?index={index}&wait=20s"));
    assert_eventually!(
        consul.arrived("health_service") > before,
        "the blocking query to arrive"
    );
    consul.control("restart");
    let (elapsed, cut) = waiter.join().expect("blocking query thread");
    assert!(elapsed < Duration::from_secs(10), "{elapsed:?}");
    assert_eq!(cut.status, 0, "an in-flight query is cut by the restart: {cut}");

    assert_eq!(ok(consul.get("/v1/agent/services")).json(), serde_json::json!({}));
    let (after, entries) = health(&consul, "api");
    assert!(entries.is_empty(), "{entries:?}");
    assert!(after > index, "the index moves: {index} -> {after}");
    assert_eq!(ok(consul.get("/v1/kv/keep?raw")).text(), "me");

    ok(consul.put("/v1/agent/service/register", &api("api-1")));
    assert_eq!(
        ids(&health(&consul, "api?passing").1),
        ["api-1"],
        "re-registration works"
    );
}

#[test]
fn faults_answer_500_drop_and_delay_then_recover() {
    let consul = ConsulDouble::spawn();
    consul.control("fail?count=2&status=500");
    for _ in 0..2 {
        let r = consul.put("/v1/agent/service/register", &api("api-1"));
        assert_eq!(r.status, 500, "{r}");
    }
    ok(consul.put("/v1/agent/service/register", &api("api-1")));
    let w = consul.writes();
    assert_eq!(
        (w["register"].as_u64(), w["ok"]["register"].as_u64()),
        (Some(3), Some(1)),
        "{w}"
    );

    consul.control("drop?count=1");
    let dropped = consul.get("/v1/agent/services");
    assert_eq!(dropped.status, 0, "{dropped}");
    ok(consul.get("/v1/agent/services"));

    consul.control("delay?ms=400&count=1");
    let start = Instant::now();
    ok(consul.get("/v1/agent/services"));
    assert!(start.elapsed() >= Duration::from_millis(400), "{:?}", start.elapsed());
}

#[test]
fn ttl_check_goes_critical_when_not_refreshed() {
    let consul = ConsulDouble::spawn();
    ok(consul.put(
        "/v1/agent/service/register",
        r#"{"ID": "t-1", "Name": "t", "Check": {"TTL": "1s"}}"#,
    ));
    ok(consul.put("/v1/agent/check/pass/service:t-1?note=alive", ""));
    assert_eq!(ids(&health(&consul, "t?passing").1), ["t-1"]);
    let status = || ok(consul.get("/v1/agent/checks")).json()["service:t-1"].clone();
    assert_eventually!(
        timeout = Duration::from_secs(5),
        status()["Status"] == "critical",
        "the TTL check to expire"
    );
    assert!(status()["Output"]
        .as_str()
        .unwrap_or_default()
        .starts_with("TTL expired"));
    assert!(health(&consul, "t?passing").1.is_empty());
}

fn writes(consul: &ConsulDouble, endpoint: &str) -> u64 {
    let w = consul.writes();
    w[endpoint].as_u64().unwrap_or_else(|| panic!("no {endpoint} in {w}"))
}
