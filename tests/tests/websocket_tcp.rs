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
