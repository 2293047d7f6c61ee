//! The admin API (`/live`, `/ready`, `/status`, `/clusters`, `/config`), `/metrics` checked by
//! promtool, and the JSON access log.

use vmesh_tests::clients::promtool_check_metrics;
use vmesh_tests::{assert_eventually, eventually, Agent, Curl, Inbound, Outbound, Upstream, DEFAULT_WAIT};

#[test]
fn live_ready_and_status_answer() {
    let agent = Agent::builder().start();
    assert_eq!(agent.admin_get("/live").status, 200);
    assert_eq!(agent.admin_get("/ready").status, 200);
    let status = agent.admin_get("/status");
    assert_eq!(status.status, 200, "{}", status.text());
    assert_eq!(agent.admin_get("/no-such-admin-path").status, 404);
}

#[test]
fn clusters_lists_endpoints_with_weight_in_flight_and_ewma() {
    let a = Upstream::python("a").spawn();
    let b = Upstream::python("b").spawn();
    let agent = Agent::builder()
        .inbound(Inbound::new(a.addr(), "http"))
        .outbound(
            Outbound::new("orders")
                .balancer("weighted")
                .weighted_endpoint(a.addr(), 3)
                .weighted_endpoint(b.addr(), 1),
        )
        .start();
    let doc = agent.admin_json("/clusters");
    let clusters = doc["clusters"]
        .as_array()
        .unwrap_or_else(|| panic!("no clusters array: {doc}"));
    let orders = clusters
        .iter()
        .find(|c| c["service"] == "orders" && c["direction"] == "outbound")
        .unwrap_or_else(|| panic!("no outbound orders cluster: {doc}"));
    assert_eq!(orders["balancer"], "weighted", "{orders}");
    let endpoints = orders["endpoints"].as_array().expect("endpoints array");
    assert_eq!(endpoints.len(), 2, "{orders}");
    for e in endpoints {
        for key in [
            "address",
            "weight",
            "in_flight",
            "ewma_ms",
            "healthy",
            "idle_connections",
        ] {
            assert!(e.get(key).is_some(), "endpoint lacks `{key}`: {e}");
        }
        assert!(
            e["in_flight"].is_u64() && e["ewma_ms"].is_number() && e["healthy"].is_boolean(),
            "{e}"
        );
        let want = if e["address"] == a.addr().to_string().as_str() {
            3
        } else {
            1
        };
        assert_eq!(e["weight"], want, "{e}");
    }
    assert!(
        clusters.iter().any(|c| c["direction"] == "inbound"),
        "the inbound app should be listed too: {doc}"
    );

    // in_flight counts a request while it is at the upstream.
    let url = agent.outbound_url("orders", "/slow?ms=1500");
    let slow = std::thread::spawn(move || Curl::get(url).run());
    let in_flight_total = || endpoint_values(&agent, "orders", "in_flight").iter().sum::<f64>();
    assert_eventually!(in_flight_total() == 1.0, "/clusters to show the slow request in flight");
    slow.join().expect("slow request").expect_status(200);
    assert_eventually!(in_flight_total() == 0.0, "in_flight to drop back to 0");
    // ...and the latency estimate has seen that request: the endpoint that served it reports
    // about 1.5 s (peak EWMA takes the spike at once, then fades with a 10 s time constant, so
    // a read within ~5 s is above 0.9 s), the other one is still unmeasured (0.1 ms, the value
    // every endpoint starts with).
    let doc = agent.admin_json("/clusters?service=orders");
    let ewma_of = |addr: std::net::SocketAddr| {
        doc["clusters"][0]["endpoints"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|e| e["address"] == addr.to_string().as_str())
            .and_then(|e| e["ewma_ms"].as_f64())
            .unwrap_or_else(|| panic!("no ewma_ms for {addr}: {doc}"))
    };
    let (served, idle) = if a.requests_seen() == 1 { (&a, &b) } else { (&b, &a) };
    assert_eq!(
        served.requests_seen(),
        1,
        "exactly one upstream served the slow request"
    );
    let measured = ewma_of(served.addr());
    assert!(
        (900.0..=3_000.0).contains(&measured),
        "ewma_ms of the endpoint that took 1.5 s to answer: {measured} ({doc})"
    );
    let unmeasured = ewma_of(idle.addr());
    assert!(
        unmeasured < 1.0,
        "ewma_ms of the endpoint that served nothing: {unmeasured} ({doc})"
    );
    // The upstream connection of that request went back to the endpoint's pool.
    let idle_total = || {
        endpoint_values(&agent, "orders", "idle_connections")
            .iter()
            .sum::<f64>()
    };
    assert_eventually!(idle_total() == 1.0, "/clusters to show one idle pooled connection");
}

/// Field `key` of every endpoint of the clusters of `service` in `/clusters`.
fn endpoint_values(agent: &Agent, service: &str, key: &str) -> Vec<f64> {
    let doc = agent.admin_json("/clusters");
    doc["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["service"] == service)
        .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
        .filter_map(|e| e[key].as_f64())
        .collect()
}

#[test]
fn config_endpoint_shows_the_config_with_secrets_redacted() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "token-file-content-s3cr3t\n").expect("write token");
    let agent = Agent::builder()
        .agent_set("admin_token_file", token_file.display().to_string())
        .outbound(Outbound::new("orders").endpoint(vmesh_tests::free_addr()))
        .start();
    // The token is in force: the agent read the file (a mutating call without it is refused,
    // with it the call gets past the check to the router's 404).
    let call = |auth: Option<&str>| {
        let curl = Curl::get(agent.admin_url("/no-such-call")).method("POST");
        match auth {
            Some(a) => curl.header(a),
            None => curl,
        }
        .run()
    };
    let refused = call(None);
    assert_eq!(refused.status, 401, "no token: {refused}");
    assert!(refused.text().contains("ADMIN_UNAUTHORIZED"), "{refused}");
    assert_eq!(call(Some("Authorization: Bearer wrong")).status, 401);
    let passed = call(Some("Authorization: Bearer token-file-content-s3cr3t"));
    assert_eq!(passed.status, 404, "the right token passes the check: {passed}");

    let response = agent.admin_get("/config");
    assert_eq!(response.status, 200);
    let doc = response.json();
    assert!(doc.get("config").is_some(), "{doc}");
    assert!(doc.get("last_reload_error").is_some(), "{doc}");
    assert!(doc.get("reloads").is_some(), "{doc}");
    assert!(doc["config"].to_string().contains("orders"), "{doc}");
    // The file's path is shown (an operator checks which file is used), its content never.
    assert_eq!(
        doc["config"]["agent"]["admin_token_file"],
        token_file.display().to_string().as_str(),
        "{doc}"
    );
    assert!(
        !response.text().contains("token-file-content-s3cr3t"),
        "/config leaks the admin token: {}",
        response.text()
    );
}

#[test]
fn config_endpoint_redacts_credentials_in_urls() {
    // A password in the registry address (kind stays "none": the address is never dialled).
    let agent = Agent::builder()
        .registry_set("address", "http://vmesh:pa55-s3cr3t@127.0.0.1:1")
        .start();
    let text = agent.admin_get("/config").text();
    assert!(!text.contains("pa55-s3cr3t"), "/config leaks a password: {text}");
    assert!(
        text.contains("127.0.0.1:1"),
        "the address itself is still shown: {text}"
    );
}

/// Sum of the samples of `name` whose label set contains every `label="value"` in `labels`.
fn sample_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn metrics_pass_promtool_and_count_requests() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .inbound(Inbound::new(up.addr(), "http"))
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .outbound(Outbound::new("gone").endpoint(vmesh_tests::free_addr()))
        .start();
    for _ in 0..5 {
        Curl::get(agent.outbound_url("orders", "/")).run().expect_status(200);
    }
    Curl::get(agent.outbound_url("orders", "/status/404"))
        .run()
        .expect_status(404);
    Curl::get(agent.inbound_url("/")).run().expect_status(200);
    Curl::get(agent.outbound_url("gone", "/")).run().expect_status(502);

    let metrics = eventually(DEFAULT_WAIT, "request counters in /metrics", || {
        let r = agent.admin_get("/metrics");
        let text = r.text();
        let outbound = sample_sum(
            &text,
            "vmesh_requests_total",
            &["service=\"orders\"", "direction=\"outbound\""],
        );
        if r.status == 200 && outbound >= 6.0 {
            Ok(text)
        } else {
            Err(format!("status {} outbound orders = {outbound}", r.status))
        }
    });
    let (ok, report) = promtool_check_metrics(&metrics);
    assert!(
        ok,
        "promtool check metrics rejected /metrics:\n{report}\n--- metrics ---\n{metrics}"
    );

    assert!(metrics.contains("vmesh_proxy_overhead_seconds_bucket"), "{metrics}");
    assert_eq!(
        sample_sum(
            &metrics,
            "vmesh_requests_total",
            &["service=\"orders\"", "direction=\"outbound\""]
        ),
        6.0,
        "{metrics}"
    );
    assert!(
        sample_sum(&metrics, "vmesh_requests_total", &["direction=\"inbound\""]) >= 1.0,
        "inbound requests are counted: {metrics}"
    );
    assert!(
        sample_sum(&metrics, "vmesh_requests_total", &["service=\"gone\""]) >= 1.0,
        "proxy errors are counted: {metrics}"
    );
    assert!(
        sample_sum(&metrics, "vmesh_proxy_overhead_seconds_count", &[]) >= 6.0,
        "every proxied request observes the overhead histogram: {metrics}"
    );
}

#[test]
fn access_log_has_one_json_line_per_request() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .inbound(Inbound::new(up.addr(), "http"))
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    Curl::get(agent.outbound_url("orders", "/a?q=1"))
        .header("X-Request-Id: log-out-1")
        .run()
        .expect_status(200);
    Curl::get(agent.outbound_url("orders", "/slow?ms=300"))
        .header("X-Request-Id: log-out-slow")
        .run()
        .expect_status(200);
    Curl::get(agent.outbound_url("orders", "/echo"))
        .header("X-Request-Id: log-out-post")
        .body(&"p".repeat(5000))
        .run()
        .expect_status(200);
    Curl::get(agent.inbound_url("/b"))
        .header("X-Request-Id: log-in-1")
        .run()
        .expect_status(200);

    let ids = ["log-out-1", "log-out-slow", "log-out-post", "log-in-1"];
    let lines = eventually(DEFAULT_WAIT, "an access-log line for each request", || {
        let log = agent.access_log();
        if ids.iter().all(|id| log.iter().any(|l| l["request_id"] == *id)) {
            Ok(log)
        } else {
            Err(agent.stdout())
        }
    });
    let keys = [
        "method",
        "authority",
        "path",
        "status",
        "upstream",
        "bytes_sent",
        "bytes_received",
        "duration_us",
        "upstream_us",
        "overhead_us",
        "request_id",
        "direction",
        "service",
    ];
    for line in &lines {
        for key in keys {
            assert!(line.get(key).is_some(), "access-log line lacks `{key}`: {line}");
        }
    }
    let by_id = |id: &str| {
        let found: Vec<_> = lines.iter().filter(|l| l["request_id"] == id).collect();
        assert_eq!(found.len(), 1, "exactly one line for {id}: {found:?}");
        found[0].clone()
    };
    let up_addr = up.addr().to_string();

    let l = by_id("log-out-1");
    assert_eq!(
        (l["method"].as_str(), l["path"].as_str()),
        (Some("GET"), Some("/a?q=1")),
        "{l}"
    );
    assert_eq!(l["status"], 200, "{l}");
    assert_eq!(l["direction"], "outbound", "{l}");
    assert_eq!(l["service"], "orders", "{l}");
    assert_eq!(l["upstream"], up_addr.as_str(), "{l}");
    assert!(l["bytes_sent"].as_u64().unwrap_or(0) > 0, "{l}");

    let l = by_id("log-out-slow");
    let duration = l["duration_us"].as_u64().unwrap_or(0);
    let upstream = l["upstream_us"].as_u64().unwrap_or(0);
    let overhead = l["overhead_us"].as_u64().unwrap_or(u64::MAX);
    // Upstream time covers the app's 300 ms; the proxy's own share (time to the response head
    // minus upstream time) is small beside it: well under 150 ms even on a loaded 2-core
    // machine, and far below what it would be if it counted the upstream's 300 ms.
    assert!(upstream >= 300_000, "the upstream slept 300 ms: {l}");
    assert!(upstream < 2_000_000, "upstream time of a 300 ms request: {l}");
    assert!(
        overhead < 150_000,
        "the proxy's own time next to a 300 ms upstream: {l}"
    );
    assert!(duration >= 300_000, "the total covers the upstream's 300 ms: {l}");

    let l = by_id("log-out-post");
    assert_eq!(l["method"], "POST", "{l}");
    assert!(
        l["bytes_received"].as_u64().unwrap_or(0) >= 5000,
        "request body bytes: {l}"
    );
    assert!(
        l["bytes_sent"].as_u64().unwrap_or(0) >= 5000,
        "response body bytes: {l}"
    );

    let l = by_id("log-in-1");
    assert_eq!(l["direction"], "inbound", "{l}");
    assert_eq!(l["path"], "/b", "{l}");
}

#[test]
fn access_log_can_go_to_a_file() {
    let up = Upstream::python("app").spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let log = dir.path().join("access.log");
    let agent = Agent::builder()
        .telemetry_set("access_log", log.display().to_string())
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    Curl::get(agent.outbound_url("orders", "/to-file"))
        .header("X-Request-Id: file-log-1")
        .run()
        .expect_status(200);
    let line = eventually(DEFAULT_WAIT, "the access-log line in the file", || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["request_id"] == "file-log-1")
            .ok_or(text)
    });
    assert_eq!(line["path"], "/to-file", "{line}");
    assert!(
        agent.access_log().is_empty(),
        "access log also went to stdout: {}",
        agent.stdout()
    );
}
