//! The test peers themselves, without vmesh: proves a failure elsewhere is vmesh's, not a fixture's.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};

use vmesh_tests::{grpc_client, ws_client, Curl, TcpEcho, Upstream};

#[test]
fn python_upstream_echoes_and_identifies_itself() {
    let up = Upstream::python("py-a").spawn();
    let r = Curl::get(up.url("/hello?x=1")).header("X-Test: yes").run();
    r.expect_status(200);
    assert_eq!(r.header("x-upstream-name"), Some("py-a"));
    let doc = r.json();
    assert_eq!(doc["method"], "GET");
    assert_eq!(doc["path"], "/hello?x=1");
    assert_eq!(doc["headers"]["x-test"], "yes");

    let r = Curl::get(up.url("/echo")).body("payload").run();
    r.expect_status(200);
    assert_eq!(r.text(), "payload");
    Curl::get(up.url("/status/418")).run().expect_status(418);
    assert_eq!(up.requests_seen(), 3);
}

#[test]
fn python_upstream_fail_status_and_reset() {
    let sick = Upstream::python("sick").fail_status(503).spawn();
    Curl::get(sick.url("/")).run().expect_status(503);
    let r = Curl::get(sick.url("/reset")).run();
    // fail_status wins over /reset: every path fails with the status.
    r.expect_status(503);

    let up = Upstream::python("resetter").spawn();
    let r = Curl::get(up.url("/reset")).run();
    assert_ne!(r.exit_code, 0, "/reset must break the connection: {r}");
}

#[test]
fn nginx_upstreams_speak_http1_and_h2c() {
    let h1 = Upstream::nginx("ng1").spawn();
    let r = Curl::get(h1.url("/")).run();
    r.expect_status(200);
    assert_eq!(r.text(), "hello from ng1\n");
    assert_eq!(r.header("x-upstream-proto"), Some("HTTP/1.1"));

    let h2 = Upstream::nginx_h2c("ng2").spawn();
    let r = Curl::get(h2.url("/")).http2().run();
    r.expect_status(200);
    assert_eq!(r.header("x-upstream-proto"), Some("HTTP/2.0"));
}

#[test]
fn grpc_fixture_serves_every_call_kind() {
    let up = Upstream::grpc("g1").spawn();
    let run = grpc_client(up.addr(), &["--call", "all"]);
    assert!(run.success, "{}", run.output);
    assert_eq!(run.report["results"]["unary"]["upstream"], "g1");
}

#[test]
fn websocket_fixture_echoes() {
    let up = Upstream::websocket("ws1").spawn();
    let run = ws_client(up.addr(), "ws://example/chat", &[]);
    assert!(run.success, "{}", run.output);
    assert_eq!(run.report["whoami"]["path"], "/chat");
}

#[test]
fn tcp_echo_echoes_until_fin() {
    let echo = TcpEcho::spawn();
    let mut s = TcpStream::connect(echo.addr()).expect("connect tcp echo");
    s.write_all(b"ping").expect("write");
    s.shutdown(Shutdown::Write).expect("shutdown write");
    let mut got = Vec::new();
    s.read_to_end(&mut got).expect("read to end");
    assert_eq!(got, b"ping");
}
