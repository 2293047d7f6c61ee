//! The Kubernetes API server double (`tests/fixtures/k8s_double.py`) itself, checked with the
//! real `kubectl` and `curl`: the behaviours vmesh's EndpointSlice discovery relies on must hold
//! before any vmesh test trusts the double.

use std::time::Duration;

use serde_json::{json, Value};
use vmesh_tests::assert_eventually;
use vmesh_tests::k8s::{endpoint_slice, K8sDouble, SliceEndpoint, SERVICE_NAME_LABEL};

/// The bound on any single wait in these tests.
const WAIT: Duration = Duration::from_secs(10);

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .unwrap_or_else(|| panic!("no items in {list}"))
        .iter()
        .map(|item| item["metadata"]["name"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn rv_of(object: &Value) -> u64 {
    object["metadata"]["resourceVersion"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no resourceVersion in {object}"))
}

fn event_is(event: &Value, kind: &str, name: &str) -> bool {
    event["type"] == kind && event["object"]["metadata"]["name"] == name
}

/// `kubectl get` table rows as whitespace-separated fields (header included).
fn rows(stdout: &str) -> Vec<Vec<String>> {
    stdout
        .lines()
        .map(|l| l.split_whitespace().map(str::to_string).collect())
        .collect()
}

#[test]
fn kubectl_get_lists_created_slices_and_json_round_trips() {
    let k8s = K8sDouble::spawn();
    let web = [
        SliceEndpoint::ready("10.1.2.3").zone("z1").node("n1"),
        SliceEndpoint::ready("10.1.2.4").terminating(),
    ];
    let stored = k8s.apply_slice("default", "web-abc12", "web", &web, 8080);
    let many: Vec<SliceEndpoint> = (1..=5).map(|i| SliceEndpoint::ready(&format!("10.0.0.{i}"))).collect();
    k8s.apply_slice("default", "api-xyz98", "api", &many, 9090);
    k8s.apply_slice("other", "web-other", "web", &web, 8080);

    let table = rows(&k8s.kubectl_ok(&["get", "endpointslices", "-n", "default"]));
    assert_eq!(
        table[0],
        ["NAME", "ADDRESSTYPE", "PORTS", "ENDPOINTS", "AGE"],
        "{table:?}"
    );
    // Rows in key order, endpoints as the real printer writes them (three, then "+ N more...").
    assert_eq!(
        table[1][..6],
        ["api-xyz98", "IPv4", "9090", "10.0.0.1,10.0.0.2,10.0.0.3", "+", "2"]
    );
    assert_eq!(
        table[2][..4],
        ["web-abc12", "IPv4", "8080", "10.1.2.3,10.1.2.4"],
        "{table:?}"
    );
    assert_eq!(table.len(), 3, "only namespace default: {table:?}");

    let all = rows(&k8s.kubectl_ok(&["get", "endpointslices", "-A", "-l", "kubernetes.io/service-name=web"]));
    assert_eq!(all[0][..2], ["NAMESPACE", "NAME"], "{all:?}");
    let found: Vec<(&str, &str)> = all[1..].iter().map(|r| (r[0].as_str(), r[1].as_str())).collect();
    assert_eq!(found, [("default", "web-abc12"), ("other", "web-other")]);

    // `-o json` is the stored object, field for field.
    let one: Value = serde_json::from_str(&k8s.kubectl_ok(&["get", "endpointslice", "web-abc12", "-o", "json"]))
        .expect("kubectl -o json prints JSON");
    assert_eq!(one, stored);
    assert_eq!(one["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
    assert_eq!(one["endpoints"][0]["zone"], "z1");
    assert_eq!(
        one["endpoints"][1]["conditions"],
        json!({"ready": false, "serving": true, "terminating": true})
    );
    assert_eq!(one["ports"], json!([{"name": "http", "protocol": "TCP", "port": 8080}]));
    assert_eq!(one["metadata"]["generation"], 1);
    assert!(one["metadata"]["uid"].as_str().is_some_and(|u| u.len() == 36), "{one}");

    let list: Value = serde_json::from_str(&k8s.kubectl_ok(&[
        "get",
        "endpointslices",
        "-l",
        "kubernetes.io/service-name=web",
        "-o",
        "json",
    ]))
    .expect("kubectl -o json prints JSON");
    assert_eq!(names(&list), ["web-abc12"]);
    assert_eq!(list["items"][0], stored);

    let missing = k8s.kubectl(&["get", "endpointslice", "nope"]);
    assert!(!missing.status.success());
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains(r#"endpointslices.discovery.k8s.io "nope" not found"#),
        "{missing:?}"
    );
}

#[test]
fn kubectl_get_watch_shows_slices_changed_after_it_started() {
    let k8s = K8sDouble::spawn();
    k8s.apply_slice("default", "old-1", "old", &[SliceEndpoint::ready("10.9.9.9")], 80);
    let mut watch = k8s.kubectl_stream(&[
        "get",
        "endpointslices",
        "--watch",
        "--output-watch-events",
        "-n",
        "default",
    ]);
    watch.wait_for_line(WAIT, "the existing slice", |l| {
        l.starts_with("ADDED") && l.contains("old-1")
    });
    assert_eventually!(k8s.state()["watches_open"] == 1, "kubectl's watch to be open");

    k8s.apply_slice("default", "web-1", "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    watch.wait_for_line(WAIT, "web-1 added", |l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        f[..5] == ["ADDED", "web-1", "IPv4", "80", "10.0.0.1"]
    });
    let two = [SliceEndpoint::ready("10.0.0.1"), SliceEndpoint::ready("10.0.0.2")];
    k8s.apply_slice("default", "web-1", "web", &two, 80);
    watch.wait_for_line(WAIT, "web-1 modified", |l| {
        l.starts_with("MODIFIED") && l.contains("web-1") && l.contains("10.0.0.1,10.0.0.2")
    });
    k8s.apply_slice("other", "elsewhere", "web", &two, 80);
    k8s.delete_slice("default", "web-1");
    let deleted = watch.wait_for_line(WAIT, "web-1 deleted", |l| l.starts_with("DELETED"));
    assert!(deleted.contains("web-1"), "{deleted}");
    assert!(
        !watch.seen().iter().any(|l| l.contains("elsewhere")),
        "a namespaced watch shows only its namespace: {:?}",
        watch.seen()
    );
}

#[test]
fn token_is_required_and_kubectl_sends_it_over_tls() {
    let k8s = K8sDouble::builder().token("s3cret").tls().spawn();
    k8s.apply_slice("default", "web-1", "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    assert!(k8s.url().starts_with("https://"), "{}", k8s.url());

    let table = rows(&k8s.kubectl_ok(&["get", "endpointslices"]));
    assert_eq!(table[1][..4], ["web-1", "IPv4", "80", "10.0.0.1"], "{table:?}");

    let wrong = k8s.kubectl(&["--token=wrong", "get", "endpointslices"]);
    assert!(!wrong.status.success(), "{wrong:?}");
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("Unauthorized"),
        "{wrong:?}"
    );

    // Without a token (curl, trusting the double's CA): the real server's 401 Status.
    let anonymous = vmesh_tests::Curl::get(format!("{}/apis/discovery.k8s.io/v1/endpointslices", k8s.url()))
        .args([
            "--cacert".to_string(),
            k8s.ca_cert().expect("tls").display().to_string(),
        ])
        .run();
    anonymous.expect_status(401);
    assert_eq!(
        anonymous.json(),
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": "Unauthorized", "reason": "Unauthorized", "code": 401})
    );
    let with_token = k8s.list_slices(Some("default"), Some("web"));
    assert_eq!(names(&with_token), ["web-1"]);
}

#[test]
fn watch_from_a_compacted_resource_version_gets_410_expired() {
    let k8s = K8sDouble::spawn();
    let first = k8s.apply_slice("default", "web-1", "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    let second = k8s.apply_slice("default", "web-2", "web", &[SliceEndpoint::ready("10.0.0.2")], 80);
    let old_rv = rv_of(&first);

    // Before compaction the history replays what happened after the given rv.
    let mut replay = k8s.watch(Some("default"), &format!("resourceVersion={old_rv}&timeoutSeconds=1"));
    let events = replay.events_until_end(WAIT);
    assert_eq!(events.len(), 1, "{events:?}");
    assert!(event_is(&events[0], "ADDED", "web-2"), "{events:?}");
    assert_eq!(events[0]["object"], second);

    let compacted = k8s.compact();
    let mut expired = k8s.watch(Some("default"), &format!("resourceVersion={old_rv}"));
    let events = expired.events_until_end(WAIT);
    assert_eq!(
        events,
        [json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {old_rv} ({compacted})"),
            "reason": "Expired", "code": 410}})]
    );
    assert!(
        expired.exit_status(WAIT).success(),
        "the stream ends cleanly after the ERROR"
    );

    // From the compaction point on, watching works and sees new changes.
    let mut fresh = k8s.watch(Some("default"), &format!("resourceVersion={compacted}"));
    let third = k8s.apply_slice("default", "web-3", "web", &[SliceEndpoint::ready("10.0.0.3")], 80);
    let added = fresh.wait_for_event(WAIT, "web-3 added", |e| event_is(e, "ADDED", "web-3"));
    assert_eq!(added["object"], third);
    assert_eq!(rv_of(&third), compacted + 1);
}

#[test]
fn bookmarks_arrive_only_when_allowed() {
    let k8s = K8sDouble::builder()
        .bookmark_interval(Duration::from_millis(200))
        .spawn();
    let rv = k8s.resource_version();
    let mut watch = k8s.watch(
        Some("default"),
        &format!("resourceVersion={rv}&allowWatchBookmarks=true"),
    );
    let bookmark = watch.wait_for_event(WAIT, "a bookmark", |e| e["type"] == "BOOKMARK");
    let object = &bookmark["object"];
    assert_eq!(object["kind"], "EndpointSlice", "{bookmark}");
    assert_eq!(object["apiVersion"], "discovery.k8s.io/v1", "{bookmark}");
    assert_eq!(rv_of(object), rv, "{bookmark}");
    assert!(
        object["metadata"].get("name").is_none(),
        "only the resourceVersion: {bookmark}"
    );

    let created = k8s.apply_slice("default", "web-1", "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    watch.wait_for_event(WAIT, "web-1 added", |e| event_is(e, "ADDED", "web-1"));
    watch.wait_for_event(WAIT, "a bookmark at the new rv", |e| {
        e["type"] == "BOOKMARK" && e["object"]["metadata"]["resourceVersion"] == created["metadata"]["resourceVersion"]
    });

    let mut plain = k8s.watch(Some("default"), &format!("resourceVersion={rv}&timeoutSeconds=1"));
    let events = plain.events_until_end(WAIT);
    assert_eq!(
        events.len(),
        1,
        "only web-1, no bookmark without allowWatchBookmarks: {events:?}"
    );
    assert!(event_is(&events[0], "ADDED", "web-1"), "{events:?}");
}

#[test]
fn lists_select_by_service_and_page_with_continue_tokens() {
    let k8s = K8sDouble::spawn();
    for name in ["web-a", "web-b", "web-c"] {
        k8s.apply_slice("default", name, "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    }
    k8s.apply_slice("default", "api-a", "api", &[SliceEndpoint::ready("10.0.0.2")], 80);
    k8s.apply_slice("other", "web-z", "web", &[SliceEndpoint::ready("10.0.0.3")], 80);

    let web = k8s.list_slices(Some("default"), Some("web"));
    assert_eq!(web["kind"], "EndpointSliceList");
    assert_eq!(web["apiVersion"], "discovery.k8s.io/v1");
    assert_eq!(names(&web), ["web-a", "web-b", "web-c"]);
    assert_eq!(rv_of(&web), k8s.resource_version());
    assert!(web["items"][0].get("kind").is_none(), "list items carry no kind: {web}");
    assert_eq!(
        names(&k8s.list_slices(None, Some("web"))),
        ["web-a", "web-b", "web-c", "web-z"]
    );
    assert_eq!(names(&k8s.list_slices(None, None)).len(), 5);

    let path = K8sDouble::slices_path(Some("default"));
    let page1 = k8s.get(&format!("{path}?limit=3")).json();
    assert_eq!(names(&page1), ["api-a", "web-a", "web-b"]);
    assert_eq!(page1["metadata"]["remainingItemCount"], 1, "{page1}");
    let token = page1["metadata"]["continue"]
        .as_str()
        .expect("a continue token")
        .to_string();
    // A write between pages does not show: the pages are one consistent snapshot.
    k8s.apply_slice("default", "web-d", "web", &[SliceEndpoint::ready("10.0.0.4")], 80);
    let page2 = k8s.get(&format!("{path}?limit=3&continue={token}")).json();
    assert_eq!(names(&page2), ["web-c"]);
    assert!(page2["metadata"].get("continue").is_none(), "{page2}");
    assert_eq!(
        page2["metadata"]["resourceVersion"],
        page1["metadata"]["resourceVersion"]
    );

    k8s.compact();
    let too_old = k8s.get(&format!("{path}?limit=3&continue={token}"));
    too_old.expect_status(410);
    assert_eq!(too_old.json()["reason"], "Expired");
}

#[test]
fn watch_starts_with_the_current_state_and_follows_selector_transitions() {
    let k8s = K8sDouble::spawn();
    k8s.apply_slice("default", "web-a", "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    k8s.apply_slice("default", "api-a", "api", &[SliceEndpoint::ready("10.0.0.2")], 80);
    let selector = format!("labelSelector={SERVICE_NAME_LABEL}%3Dweb");
    let mut watch = k8s.watch(Some("default"), &format!("resourceVersion=0&{selector}"));
    let first = watch.wait_for_event(WAIT, "the synthetic ADDED", |e| e["type"] == "ADDED");
    assert!(event_is(&first, "ADDED", "web-a"), "{first}");

    // web-a leaves the selection: DELETED with its previous content and the new rv.
    let moved = k8s.apply_slice("default", "web-a", "api", &[SliceEndpoint::ready("10.0.0.1")], 80);
    let gone = watch.wait_for_event(WAIT, "web-a deleted", |e| e["type"] != "BOOKMARK");
    assert!(event_is(&gone, "DELETED", "web-a"), "{gone}");
    assert_eq!(gone["object"]["metadata"]["labels"][SERVICE_NAME_LABEL], "web");
    assert_eq!(rv_of(&gone["object"]), rv_of(&moved));
    // api-a joins it: ADDED.
    k8s.apply_slice("default", "api-a", "web", &[SliceEndpoint::ready("10.0.0.2")], 80);
    let joined = watch.wait_for_event(WAIT, "api-a added", |e| e["type"] != "BOOKMARK");
    assert!(event_is(&joined, "ADDED", "api-a"), "{joined}");
    // An endpoint change: MODIFIED; then a real delete: DELETED with the deletion's rv.
    let changed = k8s.apply_slice("default", "api-a", "web", &[SliceEndpoint::not_ready("10.0.0.2")], 80);
    assert_eq!(changed["metadata"]["generation"], 2);
    let modified = watch.wait_for_event(WAIT, "api-a modified", |e| e["type"] != "BOOKMARK");
    assert!(event_is(&modified, "MODIFIED", "api-a"), "{modified}");
    assert_eq!(modified["object"], changed);
    k8s.delete_slice("default", "api-a");
    let deleted = watch.wait_for_event(WAIT, "api-a deleted", |e| e["type"] != "BOOKMARK");
    assert!(event_is(&deleted, "DELETED", "api-a"), "{deleted}");
    assert_eq!(rv_of(&deleted["object"]), k8s.resource_version());
}

#[test]
fn writes_are_validated_but_raw_objects_are_not() {
    let k8s = K8sDouble::spawn();
    let path = K8sDouble::slices_path(Some("default"));
    let mut bad = endpoint_slice("web-1", "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    bad.as_object_mut().expect("an object").remove("addressType");
    bad["endpoints"][0]
        .as_object_mut()
        .expect("an object")
        .remove("addresses");
    let r = k8s.send("POST", &path, &bad);
    r.expect_status(422);
    let status = r.json();
    assert_eq!(status["reason"], "Invalid", "{status}");
    assert_eq!(
        status["message"],
        "EndpointSlice.discovery.k8s.io \"web-1\" is invalid: [addressType: Required value, \
         endpoints[0].addresses: Required value: must contain at least 1 address]"
    );
    let fields: Vec<&str> = status["details"]["causes"]
        .as_array()
        .expect("causes")
        .iter()
        .map(|c| c["field"].as_str().unwrap_or_default())
        .collect();
    assert_eq!(fields, ["addressType", "endpoints[0].addresses"]);

    let created = k8s.apply_slice("default", "web-1", "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    let again = k8s.send("POST", &path, &endpoint_slice("web-1", "web", &[], 80));
    again.expect_status(409);
    assert_eq!(again.json()["reason"], "AlreadyExists");
    let mut stale = endpoint_slice("web-1", "web", &[SliceEndpoint::ready("10.0.0.9")], 80);
    stale["metadata"]["resourceVersion"] = json!((rv_of(&created) - 1).to_string());
    let conflict = k8s.send("PUT", &format!("{path}/web-1"), &stale);
    conflict.expect_status(409);
    assert_eq!(conflict.json()["reason"], "Conflict");
    // Replacing with the same content writes nothing: no new resourceVersion.
    let same = k8s.apply_slice("default", "web-1", "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    assert_eq!(same, created);

    let mut watch = k8s.watch(Some("default"), &format!("resourceVersion={}", rv_of(&created)));
    let raw = k8s.put_raw(
        "default",
        r#"{"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": "web-broken", "labels": {"kubernetes.io/service-name": "web"}},
            "endpoints": [{"addresses": []}, {"conditions": {"ready": "yes"}}], "ports": "x"}"#,
    );
    assert_eq!(rv_of(&raw), rv_of(&created) + 1);
    let event = watch.wait_for_event(WAIT, "the raw slice", |e| event_is(e, "ADDED", "web-broken"));
    assert_eq!(event["object"], raw);
    assert!(event["object"].get("addressType").is_none(), "stored as given: {event}");
    assert_eq!(
        names(&k8s.list_slices(Some("default"), Some("web"))),
        ["web-1", "web-broken"]
    );
    // kubectl still prints it.
    let table = k8s.kubectl_ok(&["get", "endpointslices"]);
    assert!(table.lines().any(|l| l.starts_with("web-broken")), "{table}");
}

#[test]
fn injected_failures_and_dropped_watches() {
    let k8s = K8sDouble::spawn();
    k8s.apply_slice("default", "web-1", "web", &[SliceEndpoint::ready("10.0.0.1")], 80);
    let path = K8sDouble::slices_path(Some("default"));

    k8s.fail(2, 503);
    for _ in 0..2 {
        let r = k8s.get(&path);
        r.expect_status(503);
        assert_eq!(r.json()["reason"], "ServiceUnavailable", "{r}");
    }
    k8s.get(&path).expect_status(200);

    let mut one = k8s.watch(Some("default"), "resourceVersion=0");
    let mut two = k8s.watch(None, "resourceVersion=0");
    one.wait_for_event(WAIT, "web-1", |e| event_is(e, "ADDED", "web-1"));
    two.wait_for_event(WAIT, "web-1", |e| event_is(e, "ADDED", "web-1"));
    let state = k8s.state();
    assert_eq!(state["watches_open"], 2, "{state}");
    assert_eq!(state["watches_started"], 2, "{state}");
    assert_eq!(k8s.drop_watches(), 2);
    // Cut without the terminal chunk: curl reports a partial transfer (exit 18).
    assert_eq!(one.exit_status(WAIT).code(), Some(18));
    assert_eq!(two.exit_status(WAIT).code(), Some(18));
    assert_eventually!(k8s.state()["watches_open"] == 0, "the dropped watches to be gone");

    let state = k8s.state();
    assert_eq!(state["requests"][path.as_str()], 5, "POST, 3 GETs, 1 watch: {state}");
    let recent = state["recent"].as_array().expect("recent requests");
    assert!(
        recent
            .iter()
            .any(|r| r["watch"] == true && r["query"].as_str().is_some_and(|q| q.contains("resourceVersion=0"))),
        "{state}"
    );
}
