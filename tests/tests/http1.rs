//! HTTP/1.1 through vmesh: outbound port, inbound listener and shared outbound port; keep-alive,
//! pooling, chunked bodies, `Expect: 100-continue`, hop-by-hop removal, forwarding headers.

use std::collections::HashSet;
use std::io::Write;

use vmesh_tests::http::curl_command;
use vmesh_tests::{Agent, Curl, Inbound, Outbound, RunningUpstream, Upstream};

/// One Python app reached three ways: outbound `orders` (own port), inbound, shared port.
fn agent_with_app() -> (Agent, RunningUpstream) {
    let app = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .inbound(Inbound::new(app.addr(), "http"))
        .shared_outbound()
        .outbound(Outbound::new("orders").endpoint(app.addr()))
        .start();
    (agent, app)
}

/// The outbound and inbound URLs of `path`, labelled, for tests that check both directions.
fn both_directions(agent: &Agent, path: &str) -> [(&'static str, String); 2] {
    [
        ("outbound", agent.outbound_url("orders", path)),
        ("inbound", agent.inbound_url(path)),
    ]
}

fn body_file(dir: &std::path::Path, size: usize) -> (std::path::PathBuf, Vec<u8>) {
    let data: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let path = dir.join(format!("body-{size}"));
    let mut f = std::fs::File::create(&path).expect("create body file");
    f.write_all(&data).expect("write body file");
    (path, data)
}

#[test]
fn get_reaches_the_app_through_outbound_and_inbound() {
    let (agent, _app) = agent_with_app();
    for (direction, url) in both_directions(&agent, "/some/path?x=1&y=two") {
        let r = Curl::get(url).header("X-End-To-End: kept").run();
        r.expect_status(200);
        assert_eq!(r.header("x-upstream-name"), Some("app"), "{direction}: {r}");
        let doc = r.json();
        assert_eq!(doc["method"], "GET", "{direction}");
        assert_eq!(doc["path"], "/some/path?x=1&y=two", "{direction}");
        assert_eq!(doc["headers"]["x-end-to-end"], "kept", "{direction}");
    }
}

#[test]
fn methods_statuses_and_chunked_responses_pass_through() {
    let (agent, _app) = agent_with_app();
    for (direction, url) in both_directions(&agent, "/thing") {
        for method in ["PUT", "DELETE", "PATCH", "OPTIONS"] {
            let r = Curl::get(url.clone()).method(method).run();
            r.expect_status(200);
            assert_eq!(r.json()["method"], method, "{direction}");
        }
    }
    // The app's own error statuses are not proxy errors: no x-vmesh-error, the app's body.
    for status in [404u16, 500, 418] {
        let r = Curl::get(agent.outbound_url("orders", &format!("/status/{status}"))).run();
        r.expect_status(status);
        assert_eq!(r.header("x-vmesh-error"), None, "{r}");
        assert_eq!(r.text(), format!("status {status}\n"));
    }
    let r = Curl::get(agent.outbound_url("orders", "/status/204")).run();
    r.expect_status(204);
    assert!(r.body.is_empty());
    // A chunked response from the app arrives whole.
    let r = Curl::get(agent.outbound_url("orders", "/stream?chunks=5")).run();
    r.expect_status(200);
    assert_eq!(r.text(), "chunk 0\nchunk 1\nchunk 2\nchunk 3\nchunk 4\n");
}

#[test]
fn keep_alive_serves_several_requests_on_one_client_connection() {
    let (agent, _app) = agent_with_app();
    for (direction, url) in both_directions(&agent, "/ka") {
        let out = curl_command()
            .args(["-sv", "-w", "%{http_code}\n"])
            .args([
                "-o",
                "/dev/null",
                &url,
                "-o",
                "/dev/null",
                &url,
                "-o",
                "/dev/null",
                &url,
            ])
            .output()
            .expect("run curl");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{direction}: curl failed: {stderr}");
        assert_eq!(stdout, "200\n200\n200\n", "{direction}: {stderr}");
        assert_eq!(
            stderr.matches("Re-using existing connection").count(),
            2,
            "{direction}: the 2nd and 3rd request must reuse the connection:\n{stderr}"
        );
        assert_eq!(
            stderr.matches("* Connected to").count(),
            1,
            "{direction}: exactly one TCP connection expected:\n{stderr}"
        );
    }
}

#[test]
fn upstream_connections_are_pooled() {
    let (agent, _app) = agent_with_app();
    // Separate client connections (one curl each); vmesh should reuse its upstream connection.
    let mut peers = HashSet::new();
    for _ in 0..6 {
        let r = Curl::get(agent.outbound_url("orders", "/pool")).run();
        r.expect_status(200);
        peers.insert(r.header("x-upstream-peer").expect("x-upstream-peer").to_string());
    }
    assert!(
        peers.len() <= 2,
        "6 sequential requests used {} upstream connections ({peers:?}): no pooling",
        peers.len()
    );
}

#[test]
fn chunked_request_body_is_echoed() {
    let (agent, _app) = agent_with_app();
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, data) = body_file(dir.path(), 256 * 1024);
    for (direction, url) in both_directions(&agent, "/echo") {
        let r = Curl::get(url)
            .header("Transfer-Encoding: chunked")
            .header("Content-Type: application/octet-stream")
            .body_file(&path)
            .run();
        r.expect_status(200);
        assert_eq!(r.body.len(), data.len(), "{direction}: echoed length");
        assert!(r.body == data, "{direction}: echoed body differs");
    }
    // HTTP/2 client, same body.
    let r = Curl::get(agent.outbound_url("orders", "/echo"))
        .http2()
        .body_file(&path)
        .run();
    r.expect_status(200);
    assert!(r.body == data, "h2 echoed body differs");
}

#[test]
fn expect_100_continue_gets_100_then_the_echo() {
    let (agent, _app) = agent_with_app();
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, data) = body_file(dir.path(), 64 * 1024);
    for (direction, url) in both_directions(&agent, "/echo") {
        // curl waits up to --expect100-timeout for the 100; without it the body goes late but
        // the check below still fails, so the wait only shows up as time.
        let r = Curl::get(url)
            .header("Expect: 100-continue")
            .args(["--expect100-timeout", "10"])
            .body_file(&path)
            .run();
        r.expect_status(200);
        assert!(
            r.all_heads.iter().any(|h| h.starts_with("HTTP/1.1 100")),
            "{direction}: no `100 Continue` before the response: {:?}",
            r.all_heads
        );
        assert!(r.body == data, "{direction}: echoed body differs");
    }
}

#[test]
fn hop_by_hop_headers_are_removed() {
    let (agent, _app) = agent_with_app();
    for (direction, url) in both_directions(&agent, "/hop") {
        let r = Curl::get(url)
            .header("Connection: keep-alive, X-Hop-Custom")
            .header("X-Hop-Custom: must-not-pass")
            .header("Keep-Alive: timeout=5, max=100")
            .header("TE: trailers")
            .header("Proxy-Connection: keep-alive")
            .header("Upgrade: foo/1")
            .header("X-End-To-End: kept")
            .run();
        r.expect_status(200);
        let doc = r.json();
        let seen = &doc["headers"];
        for name in ["keep-alive", "te", "proxy-connection", "upgrade", "x-hop-custom"] {
            assert!(
                seen.get(name).is_none(),
                "{direction}: hop-by-hop `{name}` reached the app: {seen}"
            );
        }
        if let Some(conn) = seen.get("connection").and_then(|v| v.as_str()) {
            assert!(
                !conn.to_ascii_lowercase().contains("x-hop-custom"),
                "{direction}: client's Connection header forwarded: {conn}"
            );
        }
        assert_eq!(seen["x-end-to-end"], "kept", "{direction}: {seen}");
    }
}

#[test]
fn transfer_encoding_is_not_forwarded_as_a_header() {
    let (agent, _app) = agent_with_app();
    // A body-less request that carries a stray `Transfer-Encoding: chunked` header: curl sends
    // the header and a terminating empty chunk. vmesh must frame the upstream request itself.
    let r = Curl::get(agent.outbound_url("orders", "/te"))
        .method("POST")
        .header("Transfer-Encoding: chunked")
        .body("")
        .run();
    r.expect_status(200);
    let doc = r.json();
    assert_eq!(doc["body_bytes"], 0, "{doc}");
    if let Some(te) = doc["headers"].get("transfer-encoding").and_then(|v| v.as_str()) {
        assert_eq!(te, "chunked", "only vmesh's own framing may reach the app: {doc}");
    }
}

#[test]
fn x_forwarded_for_carries_the_client_address() {
    let (agent, _app) = agent_with_app();
    for (direction, url) in both_directions(&agent, "/xff") {
        let doc = Curl::get(url.clone()).run().expect_status(200).json();
        let xff = doc["headers"]["x-forwarded-for"].as_str().unwrap_or_default();
        assert!(xff.contains("127.0.0.1"), "{direction}: x-forwarded-for = {xff:?}");

        // An existing chain is kept and the client appended.
        let doc = Curl::get(url)
            .header("X-Forwarded-For: 203.0.113.7")
            .run()
            .expect_status(200)
            .json();
        let xff = doc["headers"]["x-forwarded-for"].as_str().unwrap_or_default();
        assert!(
            xff.starts_with("203.0.113.7") && xff.contains("127.0.0.1"),
            "{direction}: x-forwarded-for = {xff:?}"
        );
    }
}

#[test]
fn x_request_id_is_generated_when_absent_and_kept_when_given() {
    let (agent, _app) = agent_with_app();
    for (direction, url) in both_directions(&agent, "/rid") {
        let first = Curl::get(url.clone()).run().expect_status(200).json();
        let second = Curl::get(url.clone()).run().expect_status(200).json();
        let a = first["headers"]["x-request-id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        let b = second["headers"]["x-request-id"]
            .as_str()
            .unwrap_or_default()
            .to_string();
        assert!(!a.is_empty(), "{direction}: no x-request-id generated: {first}");
        assert_ne!(a, b, "{direction}: two requests got the same generated x-request-id");

        let given = Curl::get(url)
            .header("X-Request-Id: test-rid-0042")
            .run()
            .expect_status(200)
            .json();
        assert_eq!(given["headers"]["x-request-id"], "test-rid-0042", "{direction}");
    }
}

#[test]
fn shared_outbound_port_routes_by_host() {
    let orders = Upstream::python("orders-app").spawn();
    let billing = Upstream::python("billing-app").spawn();
    let agent = Agent::builder()
        .shared_outbound()
        .outbound(Outbound::new("orders").no_listen().endpoint(orders.addr()))
        .outbound(Outbound::new("billing").no_listen().endpoint(billing.addr()))
        .start();
    let url = agent.shared_url("/route");
    for (host, want) in [
        ("orders", "orders-app"),
        ("orders:8080", "orders-app"),
        ("billing", "billing-app"),
        ("billing:15001", "billing-app"),
    ] {
        let r = Curl::get(url.clone()).header(&format!("Host: {host}")).run();
        r.expect_status(200);
        assert_eq!(r.header("x-upstream-name"), Some(want), "Host: {host}: {r}");
    }
    // HTTP/2: curl turns Host into :authority.
    let r = Curl::get(url.clone()).http2().header("Host: billing").run();
    r.expect_status(200);
    assert_eq!(r.header("x-upstream-name"), Some("billing-app"), "{r}");

    let r = Curl::get(url).header("Host: nosuchservice").run();
    r.expect_status(404);
    assert_eq!(r.header("x-vmesh-error"), Some("UNKNOWN_SERVICE"), "{r}");
    assert!(!r.body.is_empty(), "a proxy error carries a short text body");
    assert_eq!(orders.requests_seen() + billing.requests_seen(), 5);
}

/// Reads from `s` until the end of a response head (or more); what was read, as text.
fn read_answer_head(s: &mut std::net::TcpStream) -> String {
    use std::io::Read;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\r\n\r\n") {
        let n = s.read(&mut buf).expect("read the answer");
        assert!(n > 0, "closed before the answer: {:?}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&got).into_owned()
}

/// An answer given before the request body was read (here 404 UNKNOWN_SERVICE on the shared
/// port, for a 4 MiB upload) closes the connection, but vmesh first reads and drops what the
/// client still sends for a moment (a lingering close, as nginx's `lingering_close`): closing
/// a socket with unread bytes resets it, and the reset reaches a client that is still
/// uploading before it reads the answer. Here the client goes on writing after it read the
/// answer: every write succeeds, and then the connection ends.
#[test]
fn an_early_answer_to_an_upload_closes_after_draining_what_the_client_still_sends() {
    use std::io::Read;
    let agent = Agent::builder().shared_outbound().start();
    let mut s = std::net::TcpStream::connect(agent.shared_addr()).expect("connect");
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("read timeout");
    s.write_all(b"POST /upload HTTP/1.1\r\nHost: nosuchservice\r\nContent-Length: 4194304\r\n\r\n")
        .expect("write the head");
    s.write_all(&[b'x'; 16 * 1024])
        .expect("write the first part of the body");
    // The answer comes without the rest of the body.
    let text = read_answer_head(&mut s);
    assert!(text.starts_with("HTTP/1.1 404"), "{text}");
    assert!(text.to_ascii_lowercase().contains("connection: close"), "{text}");
    // The client, which had not seen the answer yet, keeps uploading: vmesh still reads.
    for i in 0..16 {
        if let Err(e) = s.write_all(&[b'y'; 8 * 1024]) {
            panic!("write {i} after the answer failed (the connection was reset, not drained): {e}");
        }
    }
    // And the connection ends (the answer's body, then EOF or a reset once the drain is over).
    let mut rest = Vec::new();
    let ended = match s.read_to_end(&mut rest) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
    };
    assert!(ended, "the connection did not end after the answer");
}

/// A malformed head is answered 400 and the connection closed after a lingering close, which
/// `proxy.header_read_timeout` (here 2 s) does not cut short: the head's deadline is over once
/// the head is refused. The client goes on sending a byte every 200 ms for 3.5 s after its bad
/// head: every write succeeds (the linger reads for up to 5 s while bytes keep coming). Cut at
/// the head's deadline, a write after ~2 s meets a reset.
#[test]
fn a_refused_heads_lingering_close_outlives_the_header_read_timeout() {
    use std::time::{Duration, Instant};
    let agent = Agent::builder()
        .proxy_set("header_read_timeout", "2s")
        .shared_outbound()
        .start();
    let mut s = std::net::TcpStream::connect(agent.shared_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("read timeout");
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nBad Name: y\r\n\r\n")
        .expect("write a malformed head");
    let started = Instant::now();
    let text = read_answer_head(&mut s);
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    let mut i = 0;
    while started.elapsed() < Duration::from_millis(3500) {
        if let Err(e) = s.write_all(b"z") {
            panic!(
                "write {i} at {:?} failed: the lingering close was cut short: {e}",
                started.elapsed()
            );
        }
        i += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A client that closes its connection while its request waits on the upstream (a `/gate` the
/// app holds) is noticed: the request is dropped, its upstream try with it, and the endpoint's
/// `in_flight` in `/clusters` falls back to 0 while the app still holds the request (as hyper's
/// server did; before, the try lived on until the upstream answered or timed out).
#[test]
fn a_client_that_closes_mid_request_cancels_the_upstream_try() {
    use std::time::Duration;
    let app = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("orders").endpoint(app.addr()))
        .start();
    let in_flight = || {
        agent.admin_json("/clusters?service=orders")["clusters"][0]["endpoints"][0]["in_flight"]
            .as_u64()
            .unwrap_or(u64::MAX)
    };
    let mut s = std::net::TcpStream::connect(agent.outbound_addr("orders")).expect("connect");
    s.write_all(b"GET /gate HTTP/1.1\r\nHost: orders\r\n\r\n")
        .expect("write the request");
    vmesh_tests::eventually(
        Duration::from_secs(10),
        "the request in flight to the app",
        || match in_flight() {
            1 => Ok(()),
            n => Err(format!("in_flight {n}")),
        },
    );
    drop(s);
    vmesh_tests::eventually(
        Duration::from_secs(5),
        "the try dropped with its client",
        || match in_flight() {
            0 => Ok(()),
            n => Err(format!("in_flight {n}")),
        },
    );
    // The app still held the request: the answer did not end it.
    let stats = Curl::get(format!("http://{}/__stats", app.addr())).run().json();
    assert_eq!(stats["in_flight"], 1, "the app's /gate was released early: {stats}");
    Curl::get(format!("http://{}/__control?release=1", app.addr())).run();
}

/// A request that began before the agent started to drain (SIGTERM) is answered with
/// `Connection: close`, and its connection ends right after the answer: shutdown waits for that
/// request, not for `agent.drain_timeout` (30 s here) to cut a keep-alive connection it left
/// open.
#[test]
fn a_request_in_flight_at_sigterm_is_answered_with_connection_close() {
    use std::io::Read;
    use std::time::{Duration, Instant};
    let app = Upstream::python("app").spawn();
    let mut agent = Agent::builder()
        .agent_set("drain_timeout", "30s")
        .outbound(Outbound::new("orders").endpoint(app.addr()))
        .start();
    let mut s = std::net::TcpStream::connect(agent.outbound_addr("orders")).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    s.write_all(b"GET /gate HTTP/1.1\r\nHost: orders\r\n\r\n")
        .expect("write the request");
    vmesh_tests::eventually(Duration::from_secs(10), "the request held by the app", || {
        let stats = Curl::get(format!("http://{}/__stats", app.addr())).run().json();
        match stats["in_flight"].as_u64() {
            Some(1) => Ok(()),
            other => Err(format!("in_flight {other:?}")),
        }
    });
    agent.send_signal(nix::sys::signal::Signal::SIGTERM);
    // The drain has begun once the agent says so on /live or stops answering new clients; the
    // request is still held. Release it now.
    vmesh_tests::eventually(Duration::from_secs(10), "the agent draining", || {
        let r = agent.admin_get("/ready");
        if r.status == 200 {
            Err(format!("/ready {}", r.status))
        } else {
            Ok(())
        }
    });
    Curl::get(format!("http://{}/__control?release=1", app.addr())).run();
    let released = Instant::now();
    let mut got = Vec::new();
    s.read_to_end(&mut got)
        .expect("the answer, then the end of the connection");
    let took = released.elapsed();
    let text = String::from_utf8_lossy(&got).to_ascii_lowercase();
    assert!(text.starts_with("http/1.1 200"), "{text}");
    assert!(text.contains("connection: close"), "{text}");
    assert!(
        took < Duration::from_secs(15),
        "the connection ended {took:?} after the answer was released (drain_timeout is 30 s)"
    );
    agent.wait_exit(Duration::from_secs(20));
}
