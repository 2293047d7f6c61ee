//! Idle connection parking (`proxy.idle_park_after`): a plaintext HTTP/1.1 client connection
//! that was answered and then sends nothing for `idle_park_after` leaves its task and tokio's
//! reactor (`vmesh_downstream_connections_parked`), and comes back, on the same TCP connection,
//! at the client's next bytes or close, at its keep-alive deadline (`header_read_timeout` or
//! `idle_timeout` after its last answer, whichever first; a head begun after parking keeps that
//! deadline) and at the drain (the usual 1 s linger). A head begun is never parked; `"0s"` turns
//! parking off.
//!
//! Every client here is a raw socket that is never reopened: an answer read on it was served
//! on the same connection that was parked.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use vmesh_tests::agent::metric_value;
use vmesh_tests::drain_load::stays;
use vmesh_tests::h2raw::{self, kind};
use vmesh_tests::{eventually, Agent, AgentBuilder, Outbound, RunningUpstream, Signal, TcpEcho, Upstream};

/// The gauge of parked connections.
const PARKED: &str = "vmesh_downstream_connections_parked";

/// Open connections of the `orders` outbound (parked ones included).
const ACTIVE: &str = "vmesh_downstream_connections_active{listener=\"outbound:orders\"}";

/// How long a connection may take to show as parked once idle (`idle_park_after` is 200 ms).
const PARK_WAIT: Duration = Duration::from_secs(10);

// === the agent ===

/// The Python app behind an agent whose `orders` outbound forwards to it, with `proxy` keys set
/// (durations as strings).
fn agent_with(proxy: &[(&str, &str)]) -> (Agent, RunningUpstream) {
    agent_from(Agent::builder(), proxy)
}

/// [`agent_with`] from `builder` (other sections set).
fn agent_from(builder: AgentBuilder, proxy: &[(&str, &str)]) -> (Agent, RunningUpstream) {
    let app = Upstream::python("app").spawn();
    let mut builder = builder.outbound(Outbound::new("orders").endpoint(app.addr()));
    for (key, value) in proxy {
        builder = builder.proxy_set(key, *value);
    }
    (builder.start(), app)
}

/// `(parked, active)` from one scrape of `/metrics`; panics if the gauge is missing.
fn counts(agent: &Agent) -> (f64, f64) {
    let text = agent.metrics_text();
    let parked = metric_value(&text, PARKED).unwrap_or_else(|| panic!("no `{PARKED}` in /metrics:\n{text}"));
    // The listener's series appears with its first connection (the start-up probe at least).
    let active = metric_value(&text, ACTIVE).unwrap_or(0.0);
    (parked, active)
}

/// Waits (at most `limit`) until the gauge reads `want`.
fn wait_parked(agent: &Agent, want: f64, limit: Duration, what: &str) {
    eventually(limit, what, || match counts(agent) {
        (parked, _) if parked == want => Ok(()),
        (parked, active) => Err(format!("parked {parked}, active {active}")),
    });
}

/// Waits until neither a parked nor any open connection is left on `orders`.
fn wait_all_closed(agent: &Agent, limit: Duration, what: &str) {
    eventually(limit, what, || match counts(agent) {
        (0.0, 0.0) => Ok(()),
        (parked, active) => Err(format!("parked {parked}, active {active}")),
    });
}

/// Waits until the start-up check's probe connections are gone: `active` then counts only the
/// test's own connections (on a loaded machine the agent may take a while to see them close).
fn wait_no_connection(agent: &Agent) {
    wait_all_closed(agent, Duration::from_secs(30), "the start-up probe connections closed");
}

// === a raw keep-alive client ===

/// One client connection, kept for the whole test (never reopened).
struct Conn {
    stream: TcpStream,
    /// Bytes read past the last answer.
    buf: Vec<u8>,
}

/// An answer read on a [`Conn`].
#[derive(Debug)]
struct Answer {
    status: u16,
    /// The head, names and values lower-cased.
    head: String,
    body: Vec<u8>,
}

impl Conn {
    fn open(addr: SocketAddr) -> Conn {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).expect("connect to the outbound");
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .expect("read timeout");
        stream
            .set_write_timeout(Some(Duration::from_secs(20)))
            .expect("write timeout");
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .unwrap_or_else(|e| panic!("write {:?}: {e}", String::from_utf8_lossy(bytes)));
    }

    /// `GET path` and its answer.
    fn get(&mut self, path: &str) -> Answer {
        self.send(request(path).as_bytes());
        self.answer()
    }

    fn fill(&mut self, what: &str) {
        let mut chunk = [0u8; 16 * 1024];
        match self.stream.read(&mut chunk) {
            Ok(0) => panic!(
                "connection closed while reading {what}; so far {:?}",
                String::from_utf8_lossy(&self.buf)
            ),
            Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            Err(e) => panic!("read {what}: {e}; so far {:?}", String::from_utf8_lossy(&self.buf)),
        }
    }

    /// Reads one answer (Content-Length or chunked body).
    fn answer(&mut self) -> Answer {
        let end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            self.fill("an answer head");
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).to_ascii_lowercase();
        self.buf.drain(..end);
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line in {head:?}"));
        let header = |name: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_string())
        };
        let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            self.chunked_body()
        } else {
            let length: usize = header("content-length").and_then(|v| v.parse().ok()).unwrap_or(0);
            while self.buf.len() < length {
                self.fill("an answer body");
            }
            self.buf.drain(..length).collect()
        };
        Answer { status, head, body }
    }

    fn chunked_body(&mut self) -> Vec<u8> {
        let mut body = Vec::new();
        loop {
            let line_end = loop {
                if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break i;
                }
                self.fill("a chunk size");
            };
            let size_line = String::from_utf8_lossy(&self.buf[..line_end]).into_owned();
            let size = usize::from_str_radix(size_line.split(';').next().unwrap_or("").trim(), 16)
                .unwrap_or_else(|e| panic!("chunk size {size_line:?}: {e}"));
            self.buf.drain(..line_end + 2);
            while self.buf.len() < size + 2 {
                self.fill("a chunk");
            }
            body.extend(self.buf.drain(..size));
            self.buf.drain(..2);
            if size == 0 {
                // (No trailers from the app.)
                return body;
            }
        }
    }

    /// Whether the agent has neither closed the connection nor sent anything (no wait).
    fn still_open(&mut self) -> bool {
        self.stream.set_nonblocking(true).expect("nonblocking");
        let outcome = self.stream.peek(&mut [0u8; 1]);
        self.stream.set_nonblocking(false).expect("blocking");
        match outcome {
            Err(e) if e.kind() == ErrorKind::WouldBlock => true,
            Ok(0) => false,
            Ok(_) => panic!("the agent sent bytes nobody asked for"),
            Err(e) => panic!("peek: {e}"),
        }
    }

    /// Reads until the agent closes the connection, at most `limit`: what came before the end,
    /// or `Err` (with what came) if it was still open at `limit`. A reset fails the test: the
    /// agent must close with a FIN.
    fn until_closed(&mut self, limit: Duration) -> Result<String, String> {
        self.stream.set_read_timeout(Some(limit)).expect("read timeout");
        let started = Instant::now();
        let mut chunk = [0u8; 4096];
        let got = loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => break Ok(()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    if started.elapsed() >= limit {
                        break Err(());
                    }
                }
                Err(e) => panic!(
                    "the connection ended with an error instead of a FIN: {e}; got {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
            }
        };
        let text = String::from_utf8_lossy(&std::mem::take(&mut self.buf)).into_owned();
        match got {
            Ok(()) => Ok(text),
            Err(()) => Err(text),
        }
    }
}

fn request(path: &str) -> String {
    format!("GET {path} HTTP/1.1\r\nHost: orders\r\n\r\n")
}

/// Asserts `answer` is the app's 200 echo of `GET path`.
fn assert_echo(answer: &Answer, path: &str) {
    let text = String::from_utf8_lossy(&answer.body);
    assert_eq!(answer.status, 200, "GET {path}: {}{text}", answer.head);
    assert!(
        answer.head.contains("x-upstream-name: app"),
        "GET {path}: not the app's answer: {}",
        answer.head
    );
    let doc: serde_json::Value =
        serde_json::from_slice(&answer.body).unwrap_or_else(|e| panic!("GET {path}: body not JSON ({e}): {text}"));
    assert_eq!(doc["path"], path, "GET {path}: the app saw another request: {doc}");
}

// === the other kinds of connection ===

/// An HTTP/2 stream's answer status on `conn` (its HEADERS frame), within 10 s.
fn h2_get(conn: &mut h2raw::Conn, stream: u32, path: &str) -> Option<u16> {
    conn.send(&h2raw::headers(
        stream,
        &h2raw::get_block("orders", path, &[]),
        true,
        true,
    ))
    .unwrap_or_else(|e| panic!("send HEADERS of stream {stream}: {e}"));
    let answer = conn.recv_until(Duration::from_secs(10), &mut Vec::new(), |f| {
        (f.kind == kind::HEADERS && f.stream == stream).then(|| f.status())
    });
    answer.unwrap_or_else(|e| panic!("no answer to HTTP/2 stream {stream}: {e:?}"))
}

/// A TCP-proxied connection's round trip of `bytes` through the echo server.
fn tcp_round_trip(conn: &mut TcpStream, bytes: &[u8]) {
    conn.write_all(bytes).expect("write to the tcp outbound");
    let mut back = vec![0u8; bytes.len()];
    conn.read_exact(&mut back).expect("read the echo");
    assert_eq!(back, bytes, "the echo through the tcp outbound");
}

// === tests ===

#[test]
fn an_idle_keep_alive_connection_is_parked_and_its_next_request_is_answered_on_it() {
    let (agent, app) = agent_with(&[("idle_park_after", "200ms")]);
    let mut conn = Conn::open(agent.outbound_addr("orders"));
    assert_echo(&conn.get("/one"), "/one");
    wait_parked(&agent, 1.0, PARK_WAIT, "the idle connection parked");
    assert!(conn.still_open(), "parking closed the connection");

    // The next request resumes it: while the app holds it (`/gate`), the connection is back in
    // a task and no longer parked; the answer comes on the same socket.
    conn.send(request("/gate").as_bytes());
    eventually(
        Duration::from_secs(10),
        "the resumed request at the app",
        || match app.in_flight() {
            1 => Ok(()),
            n => Err(format!("in flight at the app: {n}")),
        },
    );
    wait_parked(
        &agent,
        0.0,
        Duration::from_secs(5),
        "the busy connection out of the lot",
    );
    app.release_gates();
    assert_echo(&conn.answer(), "/gate");

    // Idle again: parked again, and answered again.
    wait_parked(
        &agent,
        1.0,
        PARK_WAIT,
        "the connection parked after its next idle spell",
    );
    assert_echo(&conn.get("/three"), "/three");
    assert_eq!(
        app.requests_to("/one") + app.requests_to("/gate") + app.requests_to("/three"),
        3
    );
}

/// The keep-alive deadline of a parked connection: with `proxy` keys making `deadline` the
/// earlier of `header_read_timeout` and `idle_timeout`, a parked connection is closed (FIN, no
/// answer) at `deadline` after its answer, not before and not much after.
fn a_parked_connection_closes_at(proxy: &[(&str, &str)], deadline: Duration) {
    let (agent, _app) = agent_with(proxy);
    wait_no_connection(&agent);
    let mut conn = Conn::open(agent.outbound_addr("orders"));
    assert_echo(&conn.get("/one"), "/one");
    let answered = Instant::now();
    // Seen parked well before its deadline, and still open then.
    wait_parked(
        &agent,
        1.0,
        deadline - Duration::from_millis(500),
        "the idle connection parked",
    );
    assert!(
        conn.still_open(),
        "closed {:?} after its answer, before the deadline ({deadline:?})",
        answered.elapsed()
    );
    let ended = conn.until_closed(deadline + Duration::from_secs(8));
    let took = answered.elapsed();
    match ended {
        Ok(text) => assert!(text.is_empty(), "the agent answered an idle connection: {text:?}"),
        Err(_) => panic!("the parked connection was still open {took:?} after its answer (deadline {deadline:?})"),
    }
    // (The agent's clock starts when it sent the answer, a little before the client read it.)
    assert!(
        took >= deadline - Duration::from_millis(300),
        "closed {took:?} after its answer, before the deadline {deadline:?}"
    );
    assert!(
        took <= deadline + Duration::from_millis(2500),
        "closed {took:?} after its answer, long after the deadline {deadline:?}"
    );
    wait_all_closed(
        &agent,
        Duration::from_secs(5),
        "the closed connection gone from the gauges",
    );
}

#[test]
fn a_parked_connection_is_closed_at_its_keep_alive_deadline() {
    a_parked_connection_closes_at(
        &[("idle_park_after", "200ms"), ("header_read_timeout", "3s")],
        Duration::from_secs(3),
    );
}

#[test]
fn a_parked_connection_is_closed_at_its_idle_timeout_when_that_comes_first() {
    a_parked_connection_closes_at(
        &[
            ("idle_park_after", "200ms"),
            ("header_read_timeout", "30s"),
            ("idle_timeout", "3s"),
        ],
        Duration::from_secs(3),
    );
}

#[test]
fn a_parked_connection_the_client_closes_leaves_the_lot() {
    // The keep-alive deadline (10 s by default) is far: only the client's close ends it.
    let (agent, _app) = agent_with(&[("idle_park_after", "200ms")]);
    wait_no_connection(&agent);
    let mut conn = Conn::open(agent.outbound_addr("orders"));
    assert_echo(&conn.get("/one"), "/one");
    // Parked, and still counted among the listener's open connections.
    eventually(
        PARK_WAIT,
        "the idle connection parked and counted open",
        || match counts(&agent) {
            (1.0, 1.0) => Ok(()),
            (parked, active) => Err(format!("parked {parked}, active {active}")),
        },
    );
    drop(conn);
    wait_all_closed(
        &agent,
        Duration::from_secs(5),
        "the closed connection gone from the lot",
    );
}

#[test]
fn a_head_begun_is_not_parked_and_still_answered() {
    let (agent, _app) = agent_with(&[("idle_park_after", "500ms")]);
    let mut conn = Conn::open(agent.outbound_addr("orders"));
    assert_echo(&conn.get("/one"), "/one");
    // Half a head at once (well within `idle_park_after`), then nothing for 4x that.
    conn.send(b"GET /two HTTP/1.1\r\nHost: orders\r\n");
    stays(
        Duration::from_secs(2),
        "a connection with a head begun never parked",
        || counts(&agent).0 == 0.0,
    );
    conn.send(b"\r\n");
    assert_echo(&conn.answer(), "/two");
    // The same connection idle with nothing buffered does park (the check above could fail).
    wait_parked(&agent, 1.0, PARK_WAIT, "the idle connection parked after its answer");
}

/// A parked connection sent half a head `at` after its answer: what it got before the agent
/// closed it, and when that was (after the answer). Both gauges are back to 0 afterwards.
fn half_head_after_parking(proxy: &[(&str, &str)], at: Duration) -> (String, Duration) {
    let (agent, _app) = agent_with(proxy);
    let mut conn = Conn::open(agent.outbound_addr("orders"));
    assert_echo(&conn.get("/one"), "/one");
    let answered = Instant::now();
    wait_parked(&agent, 1.0, at, "the idle connection parked");
    // (The stimulus's timing, not a wait for state.)
    std::thread::sleep(at.saturating_sub(answered.elapsed()));
    assert!(
        conn.still_open(),
        "closed {:?} after its answer, before the half head",
        answered.elapsed()
    );
    conn.send(b"GET /late HTTP/1.1\r\nHost: orders\r\n");
    let ended = conn.until_closed(Duration::from_secs(15));
    let took = answered.elapsed();
    let text = ended.unwrap_or_else(|text| panic!("still open {took:?} after the answer; got {text:?}"));
    wait_all_closed(
        &agent,
        Duration::from_secs(5),
        "the closed connection gone from the gauges",
    );
    (text, took)
}

#[test]
fn a_head_begun_after_parking_keeps_the_keep_alive_deadline() {
    let deadline = Duration::from_secs(6);
    // Late in its idle time: a deadline counted again from the half head would come at 10 s.
    let (text, took) = half_head_after_parking(
        &[("idle_park_after", "200ms"), ("header_read_timeout", "6s")],
        Duration::from_secs(4),
    );
    assert!(
        text.starts_with("HTTP/1.1 408"),
        "a head begun and cut at its deadline is answered 408: {text:?}"
    );
    assert!(
        took >= deadline - Duration::from_millis(500) && took <= deadline + Duration::from_millis(2500),
        "the head was cut {took:?} after the last answer, not at its deadline ({deadline:?})"
    );
}

/// The idle timeout counts from the last answer, parked or not: a connection woken by half a
/// head is still closed at it, not `idle_timeout` after it was resumed.
#[test]
fn a_resumed_connection_keeps_the_idle_timeout_of_its_last_answer() {
    let deadline = Duration::from_secs(4);
    // Halfway through its idle time: an idle time counted again from there would end at 6 s.
    let (_, took) = half_head_after_parking(
        &[
            ("idle_park_after", "200ms"),
            ("idle_timeout", "4s"),
            ("header_read_timeout", "30s"),
        ],
        Duration::from_secs(2),
    );
    assert!(
        took >= deadline - Duration::from_millis(500) && took <= deadline + Duration::from_millis(1400),
        "closed {took:?} after the last answer, not at its idle timeout ({deadline:?})"
    );
}

#[test]
fn draining_resumes_parked_connections() {
    // A drain held to its timeout would show: 30 s here.
    let builder = Agent::builder().agent_set("drain_timeout", "30s");
    let (mut agent, _app) = agent_from(builder, &[("idle_park_after", "200ms")]);
    let addr = agent.outbound_addr("orders");
    let mut asks = Conn::open(addr);
    let mut silent = Conn::open(addr);
    assert_echo(&asks.get("/one"), "/one");
    assert_echo(&silent.get("/one"), "/one");
    wait_parked(&agent, 2.0, PARK_WAIT, "both idle connections parked");

    let sigterm = Instant::now();
    agent.send_signal(Signal::SIGTERM);
    // The drain takes both out of the lot; the admin port answers until the agent exits.
    wait_parked(
        &agent,
        0.0,
        Duration::from_secs(5),
        "the drain to resume the parked connections",
    );
    // Within the 1 s linger: answered, with `Connection: close`, then closed.
    let answer = asks.get("/two");
    assert_echo(&answer, "/two");
    assert!(
        answer.head.contains("connection: close"),
        "an answer during the drain must say `Connection: close`: {}",
        answer.head
    );
    match asks.until_closed(Duration::from_secs(10)) {
        Ok(rest) => assert!(rest.is_empty(), "bytes after the last answer: {rest:?}"),
        Err(_) => panic!("the connection stayed open after its `Connection: close` answer"),
    }
    // The silent one is closed by the agent at the end of its linger.
    match silent.until_closed(Duration::from_secs(10)) {
        Ok(rest) => assert!(rest.is_empty(), "the agent answered an idle connection: {rest:?}"),
        Err(_) => panic!(
            "the silent connection was still open {:?} after SIGTERM",
            sigterm.elapsed()
        ),
    }
    let closed = sigterm.elapsed();
    assert!(
        closed >= Duration::from_millis(800),
        "the silent connection was closed {closed:?} after SIGTERM: no 1 s linger"
    );
    let status = agent.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "exit after the drain: {status}");
    assert!(
        sigterm.elapsed() < Duration::from_secs(10),
        "the agent took {:?} to exit: the drain waited on a connection (drain_timeout 30 s)",
        sigterm.elapsed()
    );
}

#[test]
fn parking_off_keeps_the_connection_in_its_task() {
    let (agent, _app) = agent_with(&[("idle_park_after", "0s")]);
    let mut conn = Conn::open(agent.outbound_addr("orders"));
    assert_echo(&conn.get("/one"), "/one");
    // Past the default `idle_park_after` (1 s) too.
    stays(
        Duration::from_millis(2500),
        "no connection parked with parking off",
        || counts(&agent).0 == 0.0,
    );
    assert!(conn.still_open(), "the idle connection was closed");
    assert_echo(&conn.get("/two"), "/two");
}

#[test]
fn only_plaintext_http1_connections_park() {
    let echo = TcpEcho::spawn();
    let app = Upstream::python("app").spawn();
    let agent = Agent::builder()
        .proxy_set("idle_park_after", "200ms")
        .outbound(Outbound::new("orders").endpoint(app.addr()))
        .outbound(Outbound::new("echo").protocol("tcp").endpoint(echo.addr()))
        .start();
    // An HTTP/2 (prior knowledge) connection and a TCP-proxied one, each used once, then idle
    // for five times `idle_park_after`: neither parks.
    let mut h2 = h2raw::Conn::connect(agent.outbound_addr("orders"), &[]).expect("h2 connect");
    assert_eq!(h2_get(&mut h2, 1, "/h2-one"), Some(200));
    let mut tcp = TcpStream::connect_timeout(&agent.outbound_addr("echo"), Duration::from_secs(5))
        .expect("connect to the tcp outbound");
    tcp.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    tcp_round_trip(&mut tcp, b"ping\n");
    stays(
        Duration::from_secs(1),
        "no HTTP/2 or TCP-proxied connection parked",
        || counts(&agent).0 == 0.0,
    );
    // An HTTP/1.1 connection next to them parks, and it alone.
    let mut h1 = Conn::open(agent.outbound_addr("orders"));
    assert_echo(&h1.get("/h1-one"), "/h1-one");
    wait_parked(&agent, 1.0, PARK_WAIT, "the HTTP/1.1 connection parked");
    stays(
        Duration::from_millis(600),
        "only the HTTP/1.1 connection parked",
        || counts(&agent).0 == 1.0,
    );
    assert_eq!(h2_get(&mut h2, 3, "/h2-two"), Some(200));
    tcp_round_trip(&mut tcp, b"pong\n");
    assert_echo(&h1.get("/h1-two"), "/h1-two");
}
