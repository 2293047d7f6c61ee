//! Failures vmesh answers itself: dead, missing, slow and resetting upstreams, malformed and
//! oversized requests, slow clients; and the failures it hides (connect retries, ejection).

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use vmesh_tests::{eventually, free_addr, raw_exchange, Agent, Curl, CurlResponse, Outbound, Upstream, DEFAULT_WAIT};

fn assert_proxy_error(r: &CurlResponse, status: u16, code: &str) {
    assert_eq!(r.exit_code, 0, "{r}");
    assert_eq!(
        (r.status, r.header("x-vmesh-error")),
        (status, Some(code)),
        "expected {status} with x-vmesh-error {code}: {r}"
    );
    assert!(!r.body.is_empty(), "a proxy error carries a short text body: {r}");
    assert!(r.body.len() < 1024, "the error body is short: {r}");
}

#[test]
fn killed_upstream_gives_502_connect_failed_then_recovers() {
    let mut up = Upstream::python("victim").spawn();
    let addr = up.addr();
    let agent = Agent::builder()
        .outbound(Outbound::new("orders").endpoint(addr))
        .start();
    let url = agent.outbound_url("orders", "/");
    Curl::get(url.clone()).run().expect_status(200);

    up.kill();
    // Fewer than the five failures that would eject the endpoint.
    for _ in 0..3 {
        let r = Curl::get(url.clone()).run();
        assert_proxy_error(&r, 502, "UPSTREAM_CONNECT_FAILED");
    }

    let _back = Upstream::python("victim-again").on(addr).spawn();
    eventually(DEFAULT_WAIT, "the restarted upstream to be used again", || {
        let r = Curl::get(url.clone()).run();
        match r.header("x-upstream-name") {
            Some("victim-again") if r.status == 200 => Ok(()),
            _ => Err(r.to_string()),
        }
    });
}

#[test]
fn repeated_failures_stay_502_or_503_with_a_code() {
    let mut up = Upstream::python("victim").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    up.kill();
    // Past the ejection threshold the answer may become NO_HEALTHY_ENDPOINT; never a hang or
    // a bare connection drop.
    for _ in 0..10 {
        let r = Curl::get(agent.outbound_url("orders", "/")).run();
        let code = r.header("x-vmesh-error").unwrap_or_default().to_string();
        assert!(
            (r.status == 502 && code == "UPSTREAM_CONNECT_FAILED")
                || (r.status == 503 && code == "NO_HEALTHY_ENDPOINT"),
            "{r}"
        );
    }
}

#[test]
fn empty_endpoint_set_gives_503_no_healthy_endpoint() {
    let agent = Agent::builder().outbound(Outbound::new("nobody")).start();
    let r = Curl::get(agent.outbound_url("nobody", "/")).run();
    assert_proxy_error(&r, 503, "NO_HEALTHY_ENDPOINT");
}

#[test]
fn slow_upstream_gives_504_upstream_timeout() {
    let up = Upstream::python("sloth").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("orders").timeout("500ms").endpoint(up.addr()))
        .start();
    let started = Instant::now();
    let r = Curl::get(agent.outbound_url("orders", "/slow?ms=5000")).run();
    let took = started.elapsed();
    assert_proxy_error(&r, 504, "UPSTREAM_TIMEOUT");
    assert!(took < Duration::from_secs(4), "a 500ms timeout answered after {took:?}");
    // A fast request on the same service still works.
    Curl::get(agent.outbound_url("orders", "/slow?ms=10"))
        .run()
        .expect_status(200);
}

#[test]
fn upstream_reset_gives_502_upstream_reset() {
    let up = Upstream::python("resetter").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    // POST is not idempotent: no retry, the reset is reported as is.
    let r = Curl::get(agent.outbound_url("orders", "/reset"))
        .method("POST")
        .body("x")
        .run();
    assert_proxy_error(&r, 502, "UPSTREAM_RESET");
    Curl::get(agent.outbound_url("orders", "/")).run().expect_status(200);
}

#[test]
fn malformed_requests_get_400_and_the_agent_keeps_serving() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    let addr = agent.outbound_addr("orders");
    for garbage in [
        &b"THIS IS NOT HTTP AT ALL\r\n\r\n"[..],
        &b"GET / HTTP/1.1\r\nHost: x\r\nNo-Colon-Here\r\n\r\n"[..],
        &b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n"[..],
    ] {
        let raw = raw_exchange(addr, garbage, Duration::from_secs(10))
            .unwrap_or_else(|e| panic!("exchange {:?}: {e}", String::from_utf8_lossy(garbage)));
        let text = String::from_utf8_lossy(&raw);
        assert!(
            text.starts_with("HTTP/1.1 400") || text.starts_with("HTTP/1.0 400"),
            "request {:?} got {text:?}",
            String::from_utf8_lossy(garbage)
        );
    }
    Curl::get(agent.outbound_url("orders", "/")).run().expect_status(200);
    assert_eq!(up.requests_seen(), 1, "no malformed request may reach the app");
}

#[test]
fn oversized_headers_get_431() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .proxy_set("max_header_bytes", "8KiB")
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    let url = agent.outbound_url("orders", "/");
    // Just under the limit passes.
    let r = Curl::get(url.clone())
        .header(&format!("X-Big: {}", "a".repeat(4000)))
        .run();
    r.expect_status(200);
    let r = Curl::get(url.clone())
        .header(&format!("X-Big: {}", "a".repeat(16_000)))
        .run();
    // hyper answers a head over its read buffer (max_header_bytes, at least 8 KiB) with 431
    // itself, before vmesh sees a request: no x-vmesh-error, and the connection is closed.
    assert_eq!(
        (r.exit_code, r.status, r.header("connection")),
        (0, 431, Some("close")),
        "16 kB of headers over an 8KiB limit: status {} headers {:?} body {:?}",
        r.status,
        r.headers,
        String::from_utf8_lossy(&r.body)
    );
    Curl::get(url).run().expect_status(200);
    assert_eq!(up.requests_seen(), 2, "the oversized request must not reach the app");
}

#[test]
fn slow_client_headers_are_cut_off() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .proxy_set("header_read_timeout", "500ms")
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    let mut s = TcpStream::connect(agent.outbound_addr("orders")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n")
        .expect("write a partial head");
    let started = Instant::now();
    let mut got = Vec::new();
    // The connection must end (EOF or reset, maybe after a 408) well before our 10 s timeout.
    let ended = match s.read_to_end(&mut got) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    let took = started.elapsed();
    assert!(
        ended && took < Duration::from_secs(5),
        "slowloris connection still open after {took:?} (got {:?})",
        String::from_utf8_lossy(&got)
    );
    let text = String::from_utf8_lossy(&got);
    assert!(text.is_empty() || text.starts_with("HTTP/1.1 408"), "{text:?}");
    assert_eq!(up.requests_seen(), 0);
}

#[test]
fn refusing_second_endpoint_is_retried_transparently() {
    let up = Upstream::python("alive").spawn();
    let dead = free_addr(); // nothing listens here: connections are refused
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("round-robin")
                .endpoint(up.addr())
                .endpoint(dead),
        )
        .start();
    for i in 0..20 {
        let r = Curl::get(agent.outbound_url("orders", "/")).run();
        assert_eq!(
            (r.status, r.header("x-upstream-name")),
            (200, Some("alive")),
            "request {i} must be retried onto the live endpoint: {r}"
        );
    }
    // POST is retried too: a refused connection never sent the request.
    let r = Curl::get(agent.outbound_url("orders", "/echo"))
        .method("POST")
        .body("once")
        .run();
    r.expect_status(200);
    assert_eq!(r.text(), "once");
}

#[test]
fn failing_endpoint_is_ejected() {
    let good = Upstream::python("good").spawn();
    let sick = Upstream::python("sick").fail_status(503).spawn();
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("round-robin")
                .endpoint(good.addr())
                .endpoint(sick.addr()),
        )
        .start();
    for _ in 0..30 {
        let r = Curl::get(agent.outbound_url("orders", "/")).run();
        assert!(r.exit_code == 0 && (r.status == 200 || r.status == 503), "{r}");
    }
    let sick_addr = sick.addr().to_string();
    let clusters = agent.admin_json("/clusters");
    let endpoint = clusters["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|c| c["endpoints"].as_array().into_iter().flatten())
        .find(|e| e["address"] == sick_addr.as_str())
        .cloned()
        .unwrap_or_else(|| panic!("{sick_addr} not in /clusters: {clusters}"));
    assert_eq!(
        endpoint["healthy"], false,
        "an endpoint answering 503 every time: {endpoint}"
    );
    // Once ejected, the sick endpoint gets no more traffic.
    let before = sick.requests_seen();
    for _ in 0..10 {
        Curl::get(agent.outbound_url("orders", "/")).run().expect_status(200);
    }
    assert_eq!(sick.requests_seen(), before, "an ejected endpoint got traffic");
}

#[test]
fn upstream_503_is_retried_for_idempotent_requests_only() {
    let good = Upstream::python("good").spawn();
    let sick = Upstream::python("sick").fail_status(503).spawn();
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("round-robin")
                .retry(2, 0.2)
                .endpoint(good.addr())
                .endpoint(sick.addr()),
        )
        .start();
    let url = agent.outbound_url("orders", "/echo");
    // Four POSTs alternate over both endpoints: the sick one's 503 comes back as is.
    let mut upstream_503 = 0;
    for _ in 0..4 {
        let r = Curl::get(url.clone()).method("POST").body("p").run();
        assert!(r.exit_code == 0 && (r.status == 200 || r.status == 503), "{r}");
        if r.status == 503 {
            assert_eq!(r.header("x-vmesh-error"), None, "the app's own 503, not vmesh's: {r}");
            assert_eq!(r.header("x-upstream-name"), Some("sick"), "{r}");
            upstream_503 += 1;
        }
    }
    assert!(upstream_503 >= 1, "round-robin POSTs never reached the sick endpoint");
    // GETs are idempotent: a 503 is retried on the other endpoint.
    for _ in 0..4 {
        let r = Curl::get(agent.outbound_url("orders", "/")).run();
        assert_eq!((r.status, r.header("x-upstream-name")), (200, Some("good")), "{r}");
    }
}

#[test]
fn idle_client_connections_are_closed() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .proxy_set("idle_timeout", "500ms")
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    let mut s = TcpStream::connect(agent.outbound_addr("orders")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    s.write_all(b"GET /healthz HTTP/1.1\r\nHost: orders\r\n\r\n")
        .expect("write");
    let mut buf = [0u8; 4096];
    // Read the whole response (head and body may arrive in separate reads).
    let mut got = Vec::new();
    loop {
        let n = s.read(&mut buf).expect("read the response");
        assert!(n > 0, "connection closed before the response ended");
        got.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&got).to_string();
        if let Some(head_end) = text.find("\r\n\r\n") {
            let len: usize = text[..head_end]
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse().unwrap_or(0))
                })
                .unwrap_or(0);
            if got.len() >= head_end + 4 + len {
                break;
            }
        }
    }
    assert!(String::from_utf8_lossy(&got).starts_with("HTTP/1.1 200"));
    let started = Instant::now();
    let read = s.read(&mut buf);
    let took = started.elapsed();
    let closed = match &read {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(
        closed && took < Duration::from_secs(5),
        "idle_timeout 500ms: after {took:?} the idle connection gave {read:?}"
    );
}
