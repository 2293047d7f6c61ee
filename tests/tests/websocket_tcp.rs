//! WebSocket upgrades and plain TCP forwarding through vmesh.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::Duration;

use vmesh_tests::{ws_client, Agent, Inbound, Outbound, TcpEcho, Upstream};

#[test]
fn websocket_upgrade_echoes_through_outbound_inbound_and_shared_port() {
    let ws = Upstream::websocket("ws-a").spawn();
    let agent = Agent::builder()
        .shared_outbound()
        .inbound(Inbound::new(ws.addr(), "http"))
        .outbound(Outbound::new("chat").endpoint(ws.addr()))
        .start();
    let out = agent.outbound_addr("chat");
    for (via, connect, url) in [
        ("outbound", out, format!("ws://{out}/room/1")),
        (
            "inbound",
            agent.inbound_addr(),
            format!("ws://{}/room/1", agent.inbound_addr()),
        ),
        ("shared", agent.shared_addr(), "ws://chat/room/1".to_string()),
    ] {
        let run = ws_client(connect, &url, &["--count", "10"]);
        assert!(run.success, "{via}: WebSocket through vmesh:\n{}", run.output);
        assert_eq!(run.report["whoami"]["name"], "ws-a", "{via}");
        assert_eq!(run.report["whoami"]["path"], "/room/1", "{via}");
        assert_eq!(run.report["echoed"], 20, "{via}");
    }
}

/// Writes `data` on one thread while reading the echo on this one; returns what came back
/// after the client's FIN (so the FIN must travel through vmesh and back).
fn echo_round_trip(addr: std::net::SocketAddr, data: Vec<u8>) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).expect("connect to the tcp outbound");
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .expect("set read timeout");
    let mut writer = stream.try_clone().expect("clone stream");
    let sender = std::thread::spawn(move || {
        writer.write_all(&data).expect("write through vmesh");
        writer.shutdown(Shutdown::Write).expect("half-close");
    });
    let mut got = Vec::new();
    stream
        .read_to_end(&mut got)
        .expect("read the echo until vmesh forwards the upstream's FIN");
    sender.join().expect("writer thread");
    got
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[test]
fn tcp_outbound_echoes_bytes_and_half_close() {
    let echo = TcpEcho::spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("raw").protocol("tcp").endpoint(echo.addr()))
        .start();
    let data = pattern(7, 1 << 20);
    let got = echo_round_trip(agent.outbound_addr("raw"), data.clone());
    assert_eq!(got.len(), data.len(), "bytes echoed through the tcp outbound");
    assert!(got == data, "echoed bytes differ");
}

#[test]
fn tcp_outbound_serves_parallel_connections() {
    let echo = TcpEcho::spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("raw").protocol("tcp").endpoint(echo.addr()))
        .start();
    let addr = agent.outbound_addr("raw");
    let workers: Vec<_> = (0..8u8)
        .map(|i| {
            std::thread::spawn(move || {
                let data = pattern(i, 64 * 1024 + usize::from(i));
                (echo_round_trip(addr, data.clone()) == data, i)
            })
        })
        .collect();
    for w in workers {
        let (same, i) = w.join().expect("connection thread");
        assert!(same, "connection {i}: echo differs");
    }
    assert!(
        echo.connections() >= 8,
        "every client connection gets its own upstream connection"
    );
}

#[test]
fn tcp_inbound_forwards_to_the_app() {
    let echo = TcpEcho::spawn();
    let agent = Agent::builder().inbound(Inbound::new(echo.addr(), "tcp")).start();
    let data = pattern(3, 200_000);
    assert!(echo_round_trip(agent.inbound_addr(), data.clone()) == data);
}

/// Sends a raw HTTP/1.1 request head and returns everything read until `until` matches or the
/// connection closes (bounded by `wait`), and whether it closed.
fn exchange(addr: std::net::SocketAddr, head: &str, wait: Duration, until: impl Fn(&str) -> bool) -> (String, bool) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(wait)).expect("read timeout");
    s.write_all(head.as_bytes()).expect("write head");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (String::from_utf8_lossy(&got).into_owned(), true),
            Ok(n) => {
                got.extend_from_slice(&buf[..n]);
                if until(&String::from_utf8_lossy(&got)) {
                    return (String::from_utf8_lossy(&got).into_owned(), false);
                }
            }
            Err(_) => return (String::from_utf8_lossy(&got).into_owned(), false),
        }
    }
}

#[test]
fn only_websocket_upgrades_are_tunnelled_others_go_on_as_plain_requests() {
    let app = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("web").endpoint(app.addr()))
        .start();
    let out = agent.outbound_addr("web");
    // h2c (or any protocol not in proxy.upgrades): a plain request, Upgrade stripped.
    let head = format!(
        "GET /plain HTTP/1.1\r\nHost: {out}\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n\
         HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n"
    );
    let (answer, _) = exchange(out, &head, Duration::from_secs(10), |a| a.contains("\"header_list\""));
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let body = &answer[answer.find("\r\n\r\n").map_or(0, |i| i + 4)..];
    let echo: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
    assert!(
        echo["headers"]["upgrade"].is_null(),
        "the app saw an Upgrade header: {answer}"
    );
    assert!(echo["headers"]["http2-settings"].is_null(), "{answer}");
}

#[test]
fn an_idle_websocket_tunnel_is_closed_after_the_idle_timeout() {
    let ws = Upstream::websocket("ws-idle").spawn();
    let agent = Agent::builder()
        .proxy_set("idle_timeout", "1s")
        .outbound(Outbound::new("chat").endpoint(ws.addr()))
        .start();
    let out = agent.outbound_addr("chat");
    let head = format!(
        "GET /room/1 HTTP/1.1\r\nHost: {out}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
         Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
    );
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(out).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(20))).expect("read timeout");
    s.write_all(head.as_bytes()).expect("write head");
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let closed = loop {
        match s.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) => panic!(
                "the tunnel was not closed within 20 s ({e}): {}",
                String::from_utf8_lossy(&got)
            ),
        }
    };
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 101"), "{text}");
    assert!(closed);
    // Closed by the idle timeout (1 s of silence), not at once.
    assert!(
        start.elapsed() >= Duration::from_millis(900),
        "closed after {:?}",
        start.elapsed()
    );
}
