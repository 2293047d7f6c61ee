//! Abuse of the inbound listener (issue 11): slowloris heads and bodies, a zero-window HTTP/2
//! client, header floods, HTTP/2 rapid reset and CONTINUATION floods, request smuggling shapes
//! and 100,000 connections attempted. Each runs against the real agent in front of the Python
//! app while a steady keep-alive client (connected before the abuse) must get every answer, and
//! the agent's peak resident memory (`VmHWM`) must stay under the bound each test states.
//!
//! The tests run one at a time: their margins assume the two cores are theirs.

use std::collections::{BTreeMap, HashSet};
use std::io::{BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use toml::Value;
use vmesh_tests::abuse::{self, Steady};
use vmesh_tests::h2raw::{self, error, kind, setting, Conn, Event, Frame};
use vmesh_tests::{eventually, Agent, Inbound, RunningUpstream, Upstream};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The agent in front of the Python app on an inbound listener, with `proxy` settings, and the
/// steady client already connected through it (`GET /steady`).
struct Rig {
    app: RunningUpstream,
    agent: Agent,
    steady: Steady,
    /// Steady answers when the abuse began.
    answers_before: usize,
    /// The agent's RSS once started and serving the steady client, in MiB.
    start_rss: f64,
}

impl Rig {
    fn start(proxy: &[(&str, Value)]) -> Rig {
        let app = Upstream::python("app").spawn();
        let builder = proxy
            .iter()
            .fold(Agent::builder(), |b, (k, v)| b.proxy_set(k, v.clone()))
            .telemetry_set("access_log", "off")
            .inbound(Inbound::new(app.addr(), "http"));
        let agent = builder.start();
        let steady = Steady::start(agent.inbound_addr(), "/steady");
        Rig {
            start_rss: abuse::rss_mib(agent.pid()),
            app,
            agent,
            answers_before: steady.answers(),
            steady,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.agent.inbound_addr()
    }

    /// Marks the start of the abuse (for the steady client's count).
    fn abuse_begins(&mut self) {
        self.answers_before = self.steady.answers();
    }

    /// Stops the steady client; asserts it saw no failure and at least `min_answers` answers
    /// since [`Rig::abuse_begins`]; asserts the agent's peak RSS (`VmHWM`) grew less than
    /// `max_growth_mib` over its RSS at start, and that it is alive and answers `/live`.
    fn finish(self, what: &str, min_answers: usize, max_growth_mib: f64) {
        let pid = self.agent.pid();
        let during = self.steady.answers() - self.answers_before;
        let report = self.steady.stop();
        let peak = abuse::peak_rss_mib(pid);
        let growth = peak - self.start_rss;
        eprintln!(
            "{what}: steady answers {} ({during} during the abuse), failures {}, slowest {:?}; agent RSS at start {:.1} MiB, now {:.1} MiB, peak {peak:.1} MiB: growth {growth:.1} MiB (bound {max_growth_mib} MiB)",
            report.answers,
            report.failures.len(),
            report.max_latency,
            self.start_rss,
            abuse::rss_mib(pid),
        );
        report.assert_unaffected(during, min_answers);
        assert!(
            growth < max_growth_mib,
            "{what}: the agent's RSS grew {growth:.1} MiB (start {:.1}, peak {peak:.1}), over the bound {max_growth_mib} MiB",
            self.start_rss
        );
        assert_eq!(
            self.agent.admin_get("/live").status,
            200,
            "{what}: agent not live afterwards"
        );
    }
}

fn s(v: &str) -> Value {
    Value::String(v.into())
}

/// `n` connections to `addr`, each with `bytes` to trickle.
fn connections(addr: SocketAddr, n: usize, bytes: &[u8]) -> Vec<(TcpStream, Vec<u8>)> {
    (0..n)
        .map(|i| {
            let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("connection {i} to {addr}: {e}"));
            stream
                .set_write_timeout(Some(Duration::from_secs(5)))
                .expect("set write timeout");
            (stream, bytes.to_vec())
        })
        .collect()
}

/// What the agent did to trickled connections: how many it closed, the first and the last close
/// (from the start of the trickle), and the answers it sent before closing (status: count;
/// 0 = closed without a word).
#[derive(Debug)]
struct Closes {
    closed: usize,
    first: Duration,
    last: Duration,
    answers: BTreeMap<u16, usize>,
}

fn closes(seen: &[abuse::Trickled]) -> Closes {
    let times: Vec<Duration> = seen.iter().filter_map(|t| t.closed_after).collect();
    let mut answers = BTreeMap::new();
    for t in seen.iter().filter(|t| t.closed_after.is_some()) {
        let status = abuse::statuses(&t.received).first().copied().unwrap_or(0);
        *answers.entry(status).or_insert(0) += 1;
    }
    Closes {
        closed: times.len(),
        first: times.iter().min().copied().unwrap_or_default(),
        last: times.iter().max().copied().unwrap_or_default(),
        answers,
    }
}

// === slowloris ===

/// Slowloris heads: 300 connections each sending a request head one byte every 250 ms (the
/// head would take 15 s) are all closed by `proxy.header_read_timeout` (2 s): none before 1 s,
/// all by 6 s. The app sees none of them; the steady client is unaffected.
/// RSS growth bound 16 MiB (measured 4.7 MiB).
#[test]
fn slowloris_heads_are_closed_after_header_read_timeout() {
    let _serial = one_at_a_time();
    let mut rig = Rig::start(&[("header_read_timeout", s("2s"))]);
    let head = format!(
        "GET /slowloris HTTP/1.1\r\nHost: app\r\nX-Pad: {}\r\n\r\n",
        "a".repeat(20)
    );
    let mut conns = connections(rig.addr(), 300, head.as_bytes());
    rig.abuse_begins();
    let seen = abuse::trickle(
        &mut conns,
        Duration::from_millis(250),
        Instant::now(),
        Duration::from_secs(10),
    );
    let c = closes(&seen);
    eprintln!("slowloris heads (300): {c:?}");
    assert_eq!(c.closed, 300, "slowloris heads still open after 10 s: {c:?}");
    assert!(
        c.first >= Duration::from_secs(1),
        "a slow head was closed before the timeout: {c:?}"
    );
    assert!(c.last <= Duration::from_secs(6), "slow heads closed too late: {c:?}");
    assert_eq!(rig.app.requests_to("/slowloris"), 0, "a partial head reached the app");
    rig.finish("slowloris heads", 20, 16.0);
}

/// The HTTP/2 connection preface trickled one byte every 500 ms (it would take 12 s) on 50
/// connections: closed by `proxy.header_read_timeout` (2 s) like an HTTP/1.1 head, all by 6 s.
/// RSS growth bound 8 MiB.
#[test]
fn slowloris_h2_preface_is_closed_after_header_read_timeout() {
    let _serial = one_at_a_time();
    let mut rig = Rig::start(&[("header_read_timeout", s("2s"))]);
    let mut conns = connections(rig.addr(), 50, h2raw::PREFACE);
    rig.abuse_begins();
    let seen = abuse::trickle(
        &mut conns,
        Duration::from_millis(500),
        Instant::now(),
        Duration::from_secs(10),
    );
    let c = closes(&seen);
    eprintln!("slowloris h2 preface (50): {c:?}");
    assert_eq!(c.closed, 50, "trickled h2 prefaces still open after 10 s: {c:?}");
    assert!(
        c.last <= Duration::from_secs(6),
        "trickled prefaces closed too late: {c:?}"
    );
    rig.finish("slowloris h2 preface", 20, 8.0);
}

/// Slowloris bodies: 50 POSTs announcing 1 MiB that send a byte every 500 ms are cut once
/// `proxy.request_body_timeout` (3 s) passes: not before 2.5 s, all by 8 s (answered 408 when
/// anything); then, on a second agent whose body timeout is long (60 s), 50 bodies that stop
/// after 10 bytes are cut by `proxy.stream_idle_timeout` (2 s): all by 7 s. The steady client
/// is unaffected.
/// RSS growth bound 8 MiB (measured 2.1 MiB).
#[test]
fn slowloris_bodies_are_cut_by_body_and_idle_timeouts() {
    let _serial = one_at_a_time();
    let head = "POST /upload HTTP/1.1\r\nHost: app\r\nContent-Length: 1048576\r\n\r\n";

    let mut rig = Rig::start(&[("request_body_timeout", s("3s")), ("stream_idle_timeout", s("2s"))]);
    let mut conns = connections(rig.addr(), 50, &[b'x'; 64]);
    for (c, _) in &mut conns {
        c.write_all(head.as_bytes()).expect("write POST head");
    }
    rig.abuse_begins();
    let seen = abuse::trickle(
        &mut conns,
        Duration::from_millis(500),
        Instant::now(),
        Duration::from_secs(12),
    );
    let c = closes(&seen);
    eprintln!("slowloris bodies, trickled (50): {c:?}");
    assert_eq!(c.closed, 50, "trickled bodies still open after 12 s: {c:?}");
    assert!(
        c.first >= Duration::from_millis(2500),
        "a trickled body was cut before the body timeout: {c:?}"
    );
    assert!(c.last <= Duration::from_secs(8), "trickled bodies cut too late: {c:?}");
    assert!(
        c.answers.keys().all(|s| *s == 0 || *s == 408),
        "trickled bodies answered other than 408: {c:?}"
    );
    rig.finish("slowloris bodies (trickled)", 20, 8.0);

    let mut rig = Rig::start(&[("request_body_timeout", s("60s")), ("stream_idle_timeout", s("2s"))]);
    let mut conns = connections(rig.addr(), 50, &[]);
    for (c, _) in &mut conns {
        c.write_all(head.as_bytes()).expect("write POST head");
        c.write_all(&[b'x'; 10]).expect("write 10 body bytes");
    }
    rig.abuse_begins();
    let seen = abuse::trickle(
        &mut conns,
        Duration::from_millis(100),
        Instant::now(),
        Duration::from_secs(12),
    );
    let c = closes(&seen);
    eprintln!("slowloris bodies, stalled (50): {c:?}");
    assert_eq!(c.closed, 50, "stalled bodies still open after 12 s: {c:?}");
    assert!(c.last <= Duration::from_secs(7), "stalled bodies cut too late: {c:?}");
    rig.finish("slowloris bodies (stalled)", 20, 8.0);
}

// === HTTP/2 flow control ===

/// A zero-window HTTP/2 client: h2c prior knowledge with `SETTINGS_INITIAL_WINDOW_SIZE = 0` and
/// never a WINDOW_UPDATE, on two connections at once: 200 streams each asking for a ~120 KB
/// answer (the app echoes a 60 KB request header twice), and 200 streams each asking for an
/// 11-byte answer (`/status/200`, which fits the agent's send buffer whole). On both, every
/// stream is reset, or the connection closed, by 8 s after the requests: the big answers once
/// `proxy.stream_idle_timeout` (2 s) passes without a byte moving; the small ones (finished
/// from the proxy's side, waiting in hyper's send buffer) once `proxy.idle_timeout` (3 s) has
/// sent GOAWAY and a further `stream_idle_timeout` has passed. No DATA is sent into the zero
/// window.
/// RSS growth bound 96 MiB (measured 43.5 MiB for the 400 streams: ~110 KB each, the 60 KB
/// request head and the answer buffered toward the client).
#[test]
fn zero_window_h2_streams_are_reset_after_stream_idle_timeout() {
    let _serial = one_at_a_time();
    let mut rig = Rig::start(&[("stream_idle_timeout", s("2s")), ("idle_timeout", s("3s"))]);
    let addr = rig.addr();
    rig.abuse_begins();
    let big = std::thread::spawn(move || zero_window(addr, "/zero-window", 200));
    let small = std::thread::spawn(move || zero_window(addr, "/status/200", 200));
    let big = big.join().expect("zero-window client (big answers)");
    let small = small.join().expect("zero-window client (small answers)");
    let peak = abuse::peak_rss_mib(rig.agent.pid());
    eprintln!(
        "zero window: agent RSS peak {peak:.1} MiB, {:.1} MiB over its start",
        peak - rig.start_rss
    );
    for (what, outcome) in [("~120 KB answers", big), ("11-byte answers", small)] {
        eprintln!("zero window, {what}: {outcome:?}");
        assert_eq!(outcome.data_bytes, 0, "{what}: the agent sent DATA into a zero window");
        assert!(
            outcome.reset == outcome.streams || outcome.closed.is_some(),
            "{what}: after {:?}, {} of {} zero-window streams were reset and the connection is open \
             ({} answered with HEADERS; GOAWAY: {:?})",
            outcome.took,
            outcome.reset,
            outcome.streams,
            outcome.answered,
            outcome.goaway
        );
        assert!(
            outcome.took <= Duration::from_secs(8),
            "{what}: streams given up only after {:?}",
            outcome.took
        );
    }
    rig.finish("zero window", 20, 96.0);
}

/// What one zero-window connection saw.
#[derive(Debug)]
struct ZeroWindow {
    streams: usize,
    /// Streams whose response HEADERS came (HEADERS are not flow-controlled).
    answered: usize,
    reset: usize,
    data_bytes: usize,
    goaway: Option<(Option<(u32, u32)>, Duration)>,
    closed: Option<String>,
    took: Duration,
}

/// Opens `streams` streams asking for `path` (with a 60 KB request header) on a connection
/// with a zero initial window, and watches (12 s at most) until every stream is reset or the
/// connection closes.
fn zero_window(addr: SocketAddr, path: &str, streams: u32) -> ZeroWindow {
    let mut conn = Conn::connect(addr, &[(setting::INITIAL_WINDOW_SIZE, 0)]).expect("h2 connect");
    let big = "b".repeat(60_000);
    let block = h2raw::get_block("app", path, &[("x-big", &big)]);
    for i in 0..streams {
        conn.send(&headers_in_frames(1 + 2 * i, &block, true))
            .expect("send HEADERS");
    }
    let sent = Instant::now();
    let (mut answered, mut reset) = (HashSet::new(), HashSet::new());
    let (mut data_bytes, mut goaway, mut closed) = (0, None, None);
    while reset.len() < streams as usize && sent.elapsed() < Duration::from_secs(12) {
        match conn.recv(Duration::from_millis(200)) {
            Event::Frame(f) => match f.kind {
                kind::HEADERS => {
                    answered.insert(f.stream);
                }
                kind::DATA => data_bytes += f.payload.len(),
                kind::RST_STREAM => {
                    reset.insert(f.stream);
                }
                // A graceful GOAWAY frees nothing while the streams stay open: keep watching.
                kind::GOAWAY => goaway = Some((f.goaway(), sent.elapsed())),
                _ => {}
            },
            Event::Closed(why) => {
                closed = Some(why);
                break;
            }
            Event::Timeout => {}
        }
    }
    ZeroWindow {
        streams: streams as usize,
        answered: answered.len(),
        reset: reset.len(),
        data_bytes,
        goaway,
        closed,
        took: sent.elapsed(),
    }
}

/// A header block as HEADERS plus CONTINUATION frames of at most 16 KiB (the default
/// SETTINGS_MAX_FRAME_SIZE), the last one with END_HEADERS.
fn headers_in_frames(stream: u32, block: &[u8], end_stream: bool) -> Vec<u8> {
    let mut out = Vec::new();
    let pieces: Vec<&[u8]> = block.chunks(16 * 1024).collect();
    for (i, piece) in pieces.iter().enumerate() {
        let last = i + 1 == pieces.len();
        if i == 0 {
            out.extend(h2raw::headers(stream, piece, end_stream, last));
        } else {
            out.extend(h2raw::continuation(stream, piece, last));
        }
    }
    out
}

// === header floods ===

/// How long the quick abuse shapes are repeated, so the steady client's answers during the
/// abuse mean something.
const ABUSE_FOR: Duration = Duration::from_secs(3);

/// Header floods, repeated for 3 s: HTTP/1.1 heads with a 100 KB header (over
/// `proxy.max_header_bytes`, 64 KiB) and with 3,000 small headers each get 431 and a closed
/// connection; HTTP/2 HEADERS whose list decodes to ~100 KB end in a stream error (RST_STREAM,
/// or a 431) or a connection error (GOAWAY). None reaches the app (not even its request log);
/// the steady client is unaffected.
/// RSS growth bound 8 MiB (measured 0.5 MiB).
#[test]
fn header_floods_get_431_or_a_stream_error() {
    let _serial = one_at_a_time();
    let mut rig = Rig::start(&[]);
    rig.abuse_begins();
    let big = format!(
        "GET /flood HTTP/1.1\r\nHost: app\r\nX-Big: {}\r\n\r\n",
        "b".repeat(100_000)
    );
    let many: String = (0..3000).map(|i| format!("X-H{i}: v\r\n")).collect();
    let many = format!("GET /flood HTTP/1.1\r\nHost: app\r\n{many}\r\n");
    let mut block = h2raw::get_block("app", "/flood", &[]);
    for i in 0..3000 {
        h2raw::literal(format!("x-h{i}").as_bytes(), b"v", &mut block);
    }
    let mut outcomes = BTreeMap::new();
    let start = Instant::now();
    while start.elapsed() < ABUSE_FOR {
        for (what, head) in [("one 100 KB header", &big), ("3,000 headers", &many)] {
            let (raw, closed) = abuse::exchange(rig.addr(), head.as_bytes(), Duration::from_secs(10));
            let statuses = abuse::statuses(&raw);
            assert_eq!(
                statuses,
                [431],
                "HTTP/1.1 head with {what}: {:?}",
                String::from_utf8_lossy(&raw)
            );
            assert!(
                closed,
                "HTTP/1.1 head with {what}: the connection stayed open after the 431"
            );
            *outcomes.entry(format!("HTTP/1.1 {what}: 431, closed")).or_insert(0) += 1;
        }
        let outcome = h2_oversized_headers(rig.addr(), &block);
        *outcomes.entry(format!("HTTP/2 3,000 fields: {outcome}")).or_insert(0) += 1;
        std::thread::sleep(Duration::from_millis(10));
    }
    eprintln!("header floods: {outcomes:#?}");
    // The app's own 431s (a header line over 64 KiB, over 100 headers) would look the same:
    // its request log shows whether a flooded head got that far.
    assert!(
        !rig.app.stderr().contains("/flood"),
        "a flooded head reached the app:\n{}",
        rig.app.stderr()
    );
    rig.finish("header floods", 20, 8.0);
}

/// Sends `block` (over the header list limit) as one request on a new HTTP/2 connection and
/// returns how the agent refused it; panics on any other answer.
fn h2_oversized_headers(addr: SocketAddr, block: &[u8]) -> String {
    let mut conn = Conn::connect(addr, &[]).expect("h2 connect");
    conn.send(&headers_in_frames(1, block, true)).expect("send HEADERS");
    let mut seen = Vec::new();
    let outcome = conn.recv_until(Duration::from_secs(10), &mut seen, |f| match f.kind {
        kind::RST_STREAM if f.stream == 1 => Some(format!("RST_STREAM {:?}", f.rst_code())),
        kind::HEADERS if f.stream == 1 => Some(format!("HEADERS {:?}", f.status())),
        kind::GOAWAY => Some(format!("GOAWAY {:?}", f.goaway())),
        _ => None,
    });
    let outcome = match outcome {
        Ok(o) => o,
        Err(Event::Closed(why)) => format!("closed: {why}"),
        Err(e) => panic!("HTTP/2 header flood: no answer to an oversized header list: {e:?}"),
    };
    assert!(
        !outcome.starts_with("HEADERS") || outcome == "HEADERS Some(431)",
        "HTTP/2 header flood answered {outcome}"
    );
    outcome
}

// === HTTP/2 rapid reset and CONTINUATION ===

/// HTTP/2 rapid reset (CVE-2023-44487), on new connections for 3 s: HEADERS each followed at
/// once by RST_STREAM, up to 10,000 streams a connection: the agent answers GOAWAY
/// ENHANCE_YOUR_CALM (or closes) near `proxy.h2_max_pending_reset_streams` (64: the GOAWAY's
/// last stream id under 1,000), and the app sees under 5% of the streams opened. The steady
/// client is unaffected.
/// RSS growth bound 8 MiB (measured 0.4 MiB).
#[test]
fn h2_rapid_reset_gets_goaway_and_spares_the_app() {
    let _serial = one_at_a_time();
    const STREAMS: u32 = 10_000;
    let mut rig = Rig::start(&[]);
    rig.abuse_begins();
    let block = h2raw::get_block("app", "/rapid", &[]);
    let (mut opened, mut connections) = (0u32, 0);
    let mut ends = BTreeMap::new();
    let start = Instant::now();
    while start.elapsed() < ABUSE_FOR {
        connections += 1;
        let mut conn = Conn::connect(rig.addr(), &[]).expect("h2 connect");
        let mut sent = 0u32;
        let mut end = None;
        while sent < STREAMS && end.is_none() {
            let mut batch = Vec::new();
            for _ in 0..100 {
                let id = 1 + 2 * sent;
                batch.extend(h2raw::headers(id, &block, true, true));
                batch.extend(h2raw::rst_stream(id, error::CANCEL));
                sent += 1;
            }
            if conn.send(&batch).is_err() {
                break;
            }
            while let Event::Frame(f) = conn.recv(Duration::ZERO) {
                end = end.or(f.goaway());
            }
        }
        opened += sent;
        let end = match end {
            Some(g) => Ok(g),
            None => conn.recv_until(Duration::from_secs(10), &mut Vec::new(), Frame::goaway),
        };
        let end = match end {
            Ok((last, code)) => {
                assert_eq!(code, error::ENHANCE_YOUR_CALM, "rapid reset: GOAWAY with code {code}");
                assert!(
                    last < 1000,
                    "rapid reset: the agent took streams up to {last} before its GOAWAY"
                );
                format!("GOAWAY ENHANCE_YOUR_CALM, last stream {}", last / 100 * 100)
            }
            Err(Event::Closed(_)) => "closed".to_string(),
            Err(e) => panic!("rapid reset: {sent} streams opened and reset, no GOAWAY ({e:?})"),
        };
        *ends.entry(end).or_insert(0) += 1;
        std::thread::sleep(Duration::from_millis(50));
    }
    let seen = rig.app.requests_to("/rapid");
    eprintln!("rapid reset: {opened} streams opened on {connections} connections, the app saw {seen}; ends {ends:?}");
    assert!(
        seen * 20 < u64::from(opened),
        "rapid reset: the app saw {seen} requests of {opened} streams opened"
    );
    rig.finish("rapid reset", 20, 8.0);
}

/// CONTINUATION floods (CVE-2024-27316 and kin), on new connections for 3 s: HEADERS without
/// END_HEADERS, then CONTINUATION frames without end, 8 at a time, with 1 KiB of header fields
/// each or empty: the agent ends each connection with GOAWAY (or a close) within the first 256
/// frames offered (h2 allows `max_header_bytes / 16 KiB` + 25% frames, at least 5: 5 with the
/// default 64 KiB); no request reaches the app; the steady client is unaffected.
/// RSS growth bound 8 MiB (measured 0.3 MiB).
#[test]
fn h2_continuation_flood_is_cut() {
    let _serial = one_at_a_time();
    const MAX_FRAMES: usize = 256;
    let mut rig = Rig::start(&[]);
    rig.abuse_begins();
    let fields: Vec<u8> = (0..10).fold(Vec::new(), |mut b, i| {
        h2raw::literal(format!("x-c{i}").as_bytes(), &[b'c'; 90], &mut b);
        b
    });
    let mut ends = BTreeMap::new();
    let mut most_frames = 0;
    let start = Instant::now();
    while start.elapsed() < ABUSE_FOR {
        for (what, piece) in [("1 KiB frames", fields.as_slice()), ("empty frames", &[][..])] {
            let mut conn = Conn::connect(rig.addr(), &[]).expect("h2 connect");
            let headers = h2raw::headers(1, &h2raw::get_block("app", "/continuation", &[]), true, false);
            conn.send(&headers).expect("send HEADERS");
            let batch: Vec<u8> = (0..8).flat_map(|_| h2raw::continuation(1, piece, false)).collect();
            let mut frames = 0;
            let end = loop {
                if frames >= 4 * MAX_FRAMES || conn.send(&batch).is_err() {
                    break conn.recv_until(Duration::from_secs(10), &mut Vec::new(), Frame::goaway);
                }
                frames += 8;
                match conn.recv_until(Duration::from_millis(20), &mut Vec::new(), Frame::goaway) {
                    Err(Event::Timeout) => {}
                    other => break other,
                }
            };
            let end = match end {
                Ok((_, code)) => format!("GOAWAY code {code}"),
                Err(Event::Closed(_)) => "closed".to_string(),
                Err(e) => panic!("continuation flood ({what}): {frames} frames taken, connection open ({e:?})"),
            };
            assert!(
                frames <= MAX_FRAMES,
                "continuation flood ({what}): {frames} CONTINUATION frames offered before the agent ended it ({end})"
            );
            most_frames = most_frames.max(frames);
            *ends.entry(format!("{what}: {end}")).or_insert(0) += 1;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!("continuation flood: ends {ends:?}; at most {most_frames} frames offered on a connection");
    assert_eq!(
        rig.app.requests_to("/continuation"),
        0,
        "a flooded header block reached the app"
    );
    rig.finish("continuation flood", 20, 8.0);
}

// === request smuggling ===

/// A request smuggled in the body of another: if any hop frames the outer request differently,
/// this one reaches the app.
const SMUGGLED: &str = "GET /smuggled HTTP/1.1\r\nHost: app\r\n\r\n";

/// How the agent must answer a smuggling shape.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Strict {
    /// 400 (or 501 for a transfer coding it does not implement), connection closed.
    Reject,
    /// Framed by Transfer-Encoding alone (RFC 9112 §6.3 allows it when both headers come):
    /// one answer, then the connection closed (which §6.3 requires), or 400.
    ChunkedThenClose,
}

/// The shapes: (name, request bytes, what is strict).
fn smuggling_shapes() -> Vec<(&'static str, String, Strict)> {
    use Strict::*;
    // CL.TE: a Content-Length hop reads the whole thing, a chunked hop stops at `0` and sees
    // /smuggled next.
    let te_body = format!("0\r\n\r\n{SMUGGLED}");
    let cl_te = |te_lines: &str| {
        format!(
            "POST /target HTTP/1.1\r\nHost: app\r\nContent-Length: {}\r\n{te_lines}\r\n{te_body}",
            te_body.len()
        )
    };
    // TE.CL: a chunked hop reads one chunk holding /smuggled, a Content-Length hop reads 4
    // bytes and sees /smuggled next (its own Content-Length swallows the chunk's end).
    let inner = "GET /smuggled HTTP/1.1\r\nHost: app\r\nContent-Length: 7\r\n\r\n";
    let te_cl = format!(
        "POST /target HTTP/1.1\r\nHost: app\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n{:x}\r\n{inner}\r\n0\r\n\r\n",
        inner.len()
    );
    let dup_cl = |first: usize, second: usize| {
        format!(
            "POST /target HTTP/1.1\r\nHost: app\r\nContent-Length: {first}\r\nContent-Length: {second}\r\n\r\n{SMUGGLED}"
        )
    };
    vec![
        ("CL.TE", cl_te("Transfer-Encoding: chunked\r\n"), ChunkedThenClose),
        ("TE.CL", te_cl, ChunkedThenClose),
        ("duplicate Content-Length 0 then N", dup_cl(0, SMUGGLED.len()), Reject),
        ("duplicate Content-Length N then 0", dup_cl(SMUGGLED.len(), 0), Reject),
        (
            "Content-Length list `0, N`",
            format!(
                "POST /target HTTP/1.1\r\nHost: app\r\nContent-Length: 0, {}\r\n\r\n{SMUGGLED}",
                SMUGGLED.len()
            ),
            Reject,
        ),
        (
            "Transfer-Encoding: xchunked",
            cl_te("Transfer-Encoding: xchunked\r\n"),
            Reject,
        ),
        (
            "Transfer-Encoding: chunked, identity",
            cl_te("Transfer-Encoding: chunked, identity\r\n"),
            Reject,
        ),
        (
            "Transfer-Encoding : chunked (space before colon)",
            cl_te("Transfer-Encoding : chunked\r\n"),
            Reject,
        ),
        (
            "Transfer-Encoding:<tab>chunked",
            cl_te("Transfer-Encoding:\tchunked\r\n"),
            ChunkedThenClose,
        ),
        (
            "Transfer-Encoding:<3 spaces>chunked",
            cl_te("Transfer-Encoding:   chunked\r\n"),
            ChunkedThenClose,
        ),
        (
            "two Transfer-Encoding, chunked then identity",
            cl_te("Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n"),
            Reject,
        ),
        (
            "two Transfer-Encoding, identity then chunked",
            cl_te("Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n"),
            Reject,
        ),
        (
            "Transfer-Encoding: chunked, chunked",
            cl_te("Transfer-Encoding: chunked, chunked\r\n"),
            Reject,
        ),
        (
            "Transfer-Encoding folded onto a second line",
            cl_te("Transfer-Encoding: identity\r\n chunked\r\n"),
            Reject,
        ),
        (
            "Transfer-Encoding in HTTP/1.0",
            cl_te("Transfer-Encoding: chunked\r\n").replacen("HTTP/1.1", "HTTP/1.0", 1),
            Reject,
        ),
    ]
}

/// Request smuggling shapes (CL.TE, TE.CL, duplicate Content-Length, obfuscated
/// Transfer-Encoding): each is refused with 400 and a closed connection, or (when RFC 9112
/// lets a server frame by Transfer-Encoding alone) answered once and the connection closed;
/// the app never sees `/smuggled`, and never a request carrying both Content-Length and
/// Transfer-Encoding. The steady client is unaffected.
/// RSS growth bound 8 MiB (measured 0 MiB).
#[test]
fn request_smuggling_shapes_are_refused_or_framed_once() {
    let _serial = one_at_a_time();
    let mut rig = Rig::start(&[]);
    rig.abuse_begins();
    let mut wrong = Vec::new();
    let start = Instant::now();
    let mut rounds = 0;
    while rounds == 0 || start.elapsed() < Duration::from_secs(3) {
        rounds += 1;
        for (name, request, strict) in smuggling_shapes() {
            std::thread::sleep(Duration::from_millis(20));
            let (raw, closed) = abuse::exchange(rig.addr(), request.as_bytes(), Duration::from_secs(5));
            let statuses = abuse::statuses(&raw);
            let ok = match strict {
                Strict::Reject => (statuses == [400] || statuses == [501]) && closed,
                Strict::ChunkedThenClose => {
                    closed && (statuses == [400] || (statuses == [200] && app_framed_once(&raw)))
                }
            };
            if rounds == 1 {
                eprintln!(
                    "smuggling, {name}: statuses {statuses:?}, closed {closed}, strict {strict:?}: {}",
                    if ok { "ok" } else { "WRONG" }
                );
            }
            if !ok && rounds == 1 {
                wrong.push(format!(
                    "{name}: statuses {statuses:?}, closed {closed}, want {strict:?}:\n{}",
                    String::from_utf8_lossy(&raw)
                ));
            }
        }
    }
    let smuggled = rig.app.requests_to("/smuggled");
    eprintln!(
        "smuggling: {rounds} rounds of {} shapes, the app saw /smuggled {smuggled} times and /target {} times",
        smuggling_shapes().len(),
        rig.app.requests_to("/target")
    );
    assert_eq!(smuggled, 0, "a smuggled request reached the app");
    assert!(
        wrong.is_empty(),
        "smuggling shapes not handled strictly:\n{}",
        wrong.join("\n---\n")
    );
    rig.finish("request smuggling", 20, 8.0);
}

/// Whether the app's echo (the 200 in `raw`) shows a request framed one way only: not both
/// Content-Length and Transfer-Encoding.
fn app_framed_once(raw: &[u8]) -> bool {
    let mut reader = BufReader::new(raw);
    let Ok((_, headers)) = abuse::read_head(&mut reader) else {
        return false;
    };
    let Ok(body) = abuse::read_body(&mut reader, &headers) else {
        return false;
    };
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(&body) else {
        return false;
    };
    let names: Vec<String> = doc["header_list"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|kv| kv[0].as_str().map(str::to_ascii_lowercase))
        .collect();
    let framed_by = names
        .iter()
        .filter(|n| *n == "content-length" || *n == "transfer-encoding")
        .count();
    framed_by <= 1
}

// === connection flood ===

/// 100,000 connections attempted (from 127.0.0.2-9, at most 8,000 held open at once, the
/// oldest closed with RST) against an inbound listener with `proxy.max_connections = 2000`:
/// the agent never holds more than 2,000 client connections (its descriptors stay under
/// 2,000 + what it had before + 64), the rest wait in the backlog or go unanswered; the steady
/// client connected beforehand gets every answer; once the flood ends every socket is closed
/// (the agent's descriptors back to where they were) and it answers `/live`. At most 60 s.
/// RSS growth bound 24 MiB (measured 7.4 MiB: 2,000 connections' buffers and tasks).
#[test]
fn connection_flood_of_100k_is_capped_by_max_connections() {
    let _serial = one_at_a_time();
    const CAP: usize = 2000;
    let mut rig = Rig::start(&[
        ("max_connections", Value::Integer(CAP as i64)),
        ("header_read_timeout", s("2s")),
    ]);
    let pid = rig.agent.pid();
    let fds_before = abuse::open_fds(pid);
    let nofile = abuse::nofile_limit(pid);
    rig.abuse_begins();
    let fds = abuse::Sampler::start(move || abuse::open_fds(pid) as u64);
    let flood = abuse::conn_flood(rig.addr(), 100_000, 8000, Duration::from_secs(60));
    let max_fds = fds.stop() as usize;
    eprintln!("connection flood: {flood:?}; agent fds before {fds_before}, max during {max_fds}, limit {nofile}");
    assert_eq!(
        flood.attempted, 100_000,
        "the flood did not attempt 100,000 connections in 60 s: {flood:?}"
    );
    assert!(
        max_fds <= CAP + fds_before + 64,
        "the agent held {max_fds} descriptors (before: {fds_before}) with max_connections = {CAP}"
    );
    assert!(
        max_fds >= CAP,
        "the agent never reached max_connections ({max_fds} descriptors): the flood did not load it"
    );
    assert!(
        nofile as usize > CAP + fds_before + 64,
        "the agent's own descriptor limit ({nofile}) would bind before max_connections"
    );
    eventually(
        Duration::from_secs(15),
        "the agent's descriptors back to where they were",
        || {
            let now = abuse::open_fds(pid);
            if now <= fds_before + 2 {
                Ok(())
            } else {
                Err(format!("{now} open, {fds_before} before"))
            }
        },
    );
    rig.finish("connection flood", 40, 24.0);
}
