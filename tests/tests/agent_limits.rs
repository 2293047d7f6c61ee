//! The agent's own bounds, end to end: requests over `proxy.max_requests_in_flight` are shed
//! with 503 `AGENT_OVERLOADED`; connections over `proxy.max_connections_total` (all listeners
//! together) wait in the backlog until one closes; a request body slower than
//! `proxy.request_body_timeout` gets 408 `REQUEST_BODY_TIMEOUT`; an upload that stops is cut
//! after `proxy.stream_idle_timeout`; an upgrade (WebSocket) tunnel holds its connection slot
//! and is closed, and waited for, at shutdown.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use vmesh_tests::{eventually, Agent, Outbound, Signal, Upstream};

/// Sends `head` on a new connection and returns it (the answer not read yet).
fn send(addr: SocketAddr, head: &str) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    s.write_all(head.as_bytes()).expect("write");
    s
}

/// Reads until the peer closes or `limit` passes; the bytes and whether it closed.
fn read_until_close(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    s.set_read_timeout(Some(limit)).expect("read timeout");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break true,
            Err(_) => break false,
        }
    };
    (String::from_utf8_lossy(&got).into_owned(), closed)
}

/// Reads one response head (and what came with it) on `s`.
fn read_head(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!("no answer: {e}; so far {:?}", String::from_utf8_lossy(&got)),
        }
    }
    String::from_utf8_lossy(&got).into_owned()
}

fn get(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n")
}

#[test]
fn requests_over_max_requests_in_flight_are_shed_with_503_agent_overloaded() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .proxy_set("max_requests_in_flight", 2)
        .outbound(Outbound::new("api").endpoint(up.addr()).timeout("30s"))
        .start();
    let out = agent.outbound_addr("api");
    let mut held: Vec<TcpStream> = (0..2).map(|_| send(out, &get("/gate"))).collect();
    eventually(Duration::from_secs(10), "two requests held at the app", || {
        let stats = vmesh_tests::http::get(up.addr(), "/__stats").map(|r| r.json());
        match stats {
            Ok(s) if s["in_flight"] == 2 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    let mut third = send(out, &get("/third"));
    let answer = read_head(&mut third);
    assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
    assert!(answer.contains("x-vmesh-error: AGENT_OVERLOADED"), "{answer}");
    assert_eq!(agent.metric("vmesh_requests_shed_total"), Some(1.0));

    vmesh_tests::http::get(up.addr(), "/__control?release=1").expect("release the held requests");
    for s in &mut held {
        let answer = read_head(s);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }
    // Below the cap again: served.
    let mut fourth = send(out, &get("/fourth"));
    let answer = read_head(&mut fourth);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn connections_over_max_connections_total_wait_until_one_closes() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .proxy_set("max_connections_total", 2)
        .agent_set("log_level", "info,vmesh_agent::proxy=debug")
        .outbound(Outbound::new("a").endpoint(up.addr()))
        .outbound(Outbound::new("b").endpoint(up.addr()))
        .start();
    // The start-up check's probe connections hold slots until the agent has seen them close
    // (on a loaded machine that can take a while): begin with both listeners empty.
    let open = |l: &str| {
        agent
            .metric(&format!(
                "vmesh_downstream_connections_active{{listener=\"outbound:{l}\"}}"
            ))
            .unwrap_or(0.0)
    };
    eventually(Duration::from_secs(30), "the probe connections closed", || {
        if open("a") + open("b") == 0.0 {
            Ok(())
        } else {
            Err(format!("a {} b {}", open("a"), open("b")))
        }
    });
    // One keep-alive connection on each listener: the agent's two slots.
    let mut first = send(agent.outbound_addr("a"), &get("/one"));
    assert!(read_head(&mut first).starts_with("HTTP/1.1 200"));
    let mut second = send(agent.outbound_addr("b"), &get("/two"));
    assert!(read_head(&mut second).starts_with("HTTP/1.1 200"));
    eventually(Duration::from_secs(5), "two connections open", || {
        let open = agent
            .metric("vmesh_downstream_connections_active{listener=\"outbound:a\"}")
            .unwrap_or(0.0)
            + agent
                .metric("vmesh_downstream_connections_active{listener=\"outbound:b\"}")
                .unwrap_or(0.0);
        if open == 2.0 {
            Ok(())
        } else {
            Err(agent.stderr().lines().rev().take(30).collect::<Vec<_>>().join("\n")
                + &agent
                    .metrics_text()
                    .lines()
                    .filter(|l| l.starts_with("vmesh_downstream"))
                    .collect::<Vec<_>>()
                    .join("; "))
        }
    });

    // A third waits in the backlog: its request is not read while both slots are held.
    let accepted = |l: &str| {
        agent
            .metric(&format!(
                "vmesh_downstream_connections_total{{listener=\"outbound:{l}\"}}"
            ))
            .unwrap_or(0.0)
    };
    let accepted_before = accepted("a");
    let mut third = send(agent.outbound_addr("a"), &get("/three"));
    third
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .expect("read timeout");
    let mut buf = [0u8; 64];
    match third.read(&mut buf) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
        other => panic!("the third connection was served over the cap: {other:?}"),
    }
    assert_eq!(
        accepted("a"),
        accepted_before,
        "the third connection was accepted over the cap"
    );

    // One closes: the third is accepted and answered.
    drop(second);
    third
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("read timeout");
    let answer = read_head(&mut third);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[test]
fn a_request_body_slower_than_request_body_timeout_gets_408() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .proxy_set("request_body_timeout", "2s")
        .outbound(Outbound::new("api").endpoint(up.addr()).timeout("30s"))
        .start();
    let out = agent.outbound_addr("api");
    // Small (buffered for retries) and large (streamed) bodies, trickled a byte per 200 ms:
    // they keep moving (no stall), they just do not finish in time.
    for length in [100usize, 1 << 20] {
        let mut s = send(
            out,
            &format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {length}\r\n\r\n"),
        );
        let started = Instant::now();
        s.set_nonblocking(false).expect("blocking");
        let answer = loop {
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "no answer after 20 s of a {length}-byte body trickled"
            );
            if s.write_all(b"x").is_err() {
                break read_until_close(&mut s, Duration::from_secs(10)).0;
            }
            // Anything to read yet? (the answer comes before the body ends)
            s.set_read_timeout(Some(Duration::from_millis(200)))
                .expect("read timeout");
            let mut buf = [0u8; 4096];
            match s.read(&mut buf) {
                Ok(n) if n > 0 => {
                    let mut text = String::from_utf8_lossy(&buf[..n]).into_owned();
                    text.push_str(&read_until_close(&mut s, Duration::from_secs(2)).0);
                    break text;
                }
                Ok(_) => break String::new(),
                Err(_) => {}
            }
        };
        assert!(answer.starts_with("HTTP/1.1 408"), "{length}-byte body: {answer:?}");
        assert!(answer.contains("x-vmesh-error: REQUEST_BODY_TIMEOUT"), "{answer}");
        assert!(
            started.elapsed() >= Duration::from_millis(1900),
            "408 before the timeout"
        );
    }
    assert_eq!(
        agent.metric("vmesh_proxy_errors_total{direction=\"outbound\",service=\"api\",code=\"REQUEST_BODY_TIMEOUT\"}"),
        Some(2.0)
    );
    // The endpoint is not blamed: a normal request still goes through.
    let mut s = send(out, &get("/after"));
    assert!(read_head(&mut s).starts_with("HTTP/1.1 200"));
}

#[test]
fn an_upload_that_stops_is_cut_after_stream_idle_timeout() {
    let up = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .proxy_set("stream_idle_timeout", "1s")
        .outbound(Outbound::new("api").endpoint(up.addr()).timeout("60s"))
        .start();
    let out = agent.outbound_addr("api");
    // 1 MiB announced (streamed upstream), 10 bytes sent, then nothing.
    let mut s = send(
        out,
        "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 1048576\r\n\r\n0123456789",
    );
    let started = Instant::now();
    let (got, closed) = read_until_close(&mut s, Duration::from_secs(20));
    assert!(closed, "the stalled upload was not cut within 20 s: {got:?}");
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "cut after {:?}, before the timeout",
        started.elapsed()
    );
    assert_eq!(
        agent.metric("vmesh_downstream_closed_total{listener=\"outbound:api\",reason=\"stream_idle_timeout\"}"),
        Some(1.0)
    );
    // A request that keeps moving is not cut: a slow but steady download of 3 s.
    let mut s = send(out, &get("/stream?chunks=6&interval_ms=500"));
    let (got, _) = read_until_close(&mut s, Duration::from_secs(10));
    assert!(got.starts_with("HTTP/1.1 200"), "{got}");
}

#[test]
fn a_websocket_tunnel_holds_its_connection_slot_and_is_closed_at_shutdown() {
    let ws = Upstream::websocket("ws").spawn();
    let mut agent = Agent::builder()
        .agent_set("drain_timeout", "10s")
        .proxy_set("max_connections_total", 1)
        .outbound(Outbound::new("chat").endpoint(ws.addr()))
        .start();
    let out = agent.outbound_addr("chat");
    let mut s = send(
        out,
        &format!(
            "GET /room/1 HTTP/1.1\r\nHost: {out}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
             Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
        ),
    );
    let head = read_head(&mut s);
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The tunnel holds the agent's one connection slot after the HTTP connection handed it
    // over: another client waits in the backlog, not accepted.
    let accepted = || {
        agent
            .metric("vmesh_downstream_connections_total{listener=\"outbound:chat\"}")
            .unwrap_or(0.0)
    };
    let accepted_before = accepted();
    let other = TcpStream::connect(out).expect("connect");
    let waited = Instant::now();
    while waited.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            accepted(),
            accepted_before,
            "a second connection was accepted while the tunnel held the only slot"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    drop(other);
    assert_eq!(
        agent.metric("vmesh_downstream_connections_active{listener=\"outbound:chat\"}"),
        Some(1.0),
        "the tunnel is not counted as an open connection"
    );
    agent.send_signal(Signal::SIGTERM);
    let (_, closed) = read_until_close(&mut s, Duration::from_secs(15));
    assert!(closed, "the tunnel was not closed at shutdown");
    let status = agent.wait_exit(Duration::from_secs(20));
    assert!(status.success(), "exit {status:?}");
    let log = agent.stderr() + &agent.stdout();
    assert!(
        log.contains("drained: all connections closed"),
        "the drain did not wait for the tunnel: {log}"
    );
}
