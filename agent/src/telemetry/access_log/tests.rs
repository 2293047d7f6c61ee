use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use http::{HeaderValue, Method, Uri};
use prometheus_client::metrics::counter::Counter;
use proptest::prelude::*;
use serde::Serialize;

use super::format::{self, Cache};
use super::{AccessLog, AccessRecord, Limits};
use crate::telemetry::metrics::Direction;

/// The line as it was made before the hand-written formatter (`serde_json` over this struct,
/// `humantime` for the time): the format the hand-written one must reproduce byte for byte.
#[derive(Serialize)]
struct Reference<'a> {
    ts: String,
    direction: &'static str,
    service: &'a str,
    method: &'a str,
    authority: &'a str,
    path: &'a str,
    status: u16,
    upstream: Option<String>,
    error: Option<&'static str>,
    bytes_received: u64,
    bytes_sent: u64,
    duration_us: u128,
    upstream_us: u128,
    overhead_us: u128,
    attempts: u32,
    request_id: &'a str,
    client: String,
    caller: Option<&'a str>,
    host: HostRef,
}

/// The `host` object: the host sampler's latest values (none run in unit tests: all null).
#[derive(Serialize)]
struct HostRef {
    cpu_pressure: Option<f64>,
    cpu_steal: Option<f64>,
    run_queue: Option<u32>,
    agent_cpu: Option<f64>,
}

fn reference(r: &AccessRecord) -> Vec<u8> {
    let line = Reference {
        ts: humantime::format_rfc3339_micros(r.start).to_string(),
        direction: r.direction.as_str(),
        service: &r.service,
        method: r.method.as_str(),
        authority: r
            .authority
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .or_else(|| r.uri.authority().map(|a| a.as_str()))
            .unwrap_or(""),
        path: r.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        status: r.status,
        upstream: r.upstream.map(|a| a.to_string()),
        error: r.error,
        bytes_received: r.bytes_received,
        bytes_sent: r.bytes_sent,
        duration_us: r.duration.as_micros(),
        upstream_us: r.upstream_time.as_micros(),
        overhead_us: r.overhead.as_micros(),
        attempts: r.attempts,
        request_id: r.request_id.as_ref().and_then(|h| h.to_str().ok()).unwrap_or(""),
        client: r.client.to_string(),
        caller: r.caller.as_deref(),
        host: {
            let h = crate::telemetry::host::monitor().gauges().load();
            HostRef {
                cpu_pressure: h.cpu_pressure,
                cpu_steal: h.cpu_steal,
                run_queue: h.run_queue,
                agent_cpu: h.agent_cpu,
            }
        },
    };
    let mut out = serde_json::to_vec(&line).unwrap();
    out.push(b'\n');
    out
}

/// `r`'s line, formatted with `cache` after an earlier line.
fn line_with(cache: &mut Cache, r: &AccessRecord) -> Vec<u8> {
    let mut buf = b"an earlier line\n".to_vec();
    format::line(&mut buf, cache, r);
    buf.split_off(16)
}

fn formatted(r: &AccessRecord) -> String {
    String::from_utf8(line_with(&mut Cache::new(), r)).unwrap()
}

fn record(uri: &str) -> AccessRecord {
    AccessRecord {
        start: UNIX_EPOCH + Duration::from_micros(1_764_400_000_123_456),
        direction: Direction::Outbound,
        service: "orders".into(),
        method: Method::POST,
        authority: Some(HeaderValue::from_static("orders:80")),
        uri: Uri::try_from(uri).unwrap(),
        status: 201,
        upstream: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
        error: None,
        bytes_received: 3,
        bytes_sent: 10,
        duration: Duration::from_micros(1500),
        upstream_time: Duration::from_micros(1200),
        overhead: Duration::from_micros(300),
        attempts: 1,
        request_id: Some(HeaderValue::from_static("abc")),
        client: SocketAddr::from(([127, 0, 0, 2], 5555)),
        caller: None,
    }
}

#[test]
fn a_record_is_one_json_line_with_every_field() {
    let text = formatted(&record("/a/b?c=1"));
    assert_eq!(
        text,
        concat!(
            r#"{"ts":"2025-11-29T07:06:40.123456Z","direction":"outbound","service":"orders","#,
            r#""method":"POST","authority":"orders:80","path":"/a/b?c=1","status":201,"#,
            r#""upstream":"127.0.0.1:8080","error":null,"bytes_received":3,"bytes_sent":10,"#,
            r#""duration_us":1500,"upstream_us":1200,"overhead_us":300,"attempts":1,"#,
            r#""request_id":"abc","client":"127.0.0.2:5555","caller":null,"#,
            r#""host":{"cpu_pressure":null,"cpu_steal":null,"run_queue":null,"agent_cpu":null}}"#,
            "\n"
        )
    );
    assert_eq!(text.as_bytes(), reference(&record("/a/b?c=1")));
}

#[test]
fn timestamps_match_rfc3339_at_calendar_edges() {
    let cases = [
        0,               // the epoch
        951_782_399,     // 2000-02-28T23:59:59
        951_782_400,     // 2000-02-29 (a leap day of a year divisible by 400)
        4_107_542_400,   // 2100-03-01 (2100 is not a leap year)
        1_709_251_199,   // 2024-02-29T23:59:59
        253_402_300_799, // 9999-12-31T23:59:59, the last four-digit second
    ];
    let mut cache = Cache::new();
    for secs in cases {
        for nanos in [0, 999, 1_000, 999_999_999] {
            let mut r = record("/");
            r.start = UNIX_EPOCH + Duration::new(secs, nanos);
            let buf = line_with(&mut cache, &r);
            assert_eq!(
                String::from_utf8(buf).unwrap(),
                String::from_utf8(reference(&r)).unwrap()
            );
        }
    }
}

#[test]
fn ipv6_addresses_and_absent_fields() {
    let mut r = record("http://host.example:8443/p");
    r.authority = None; // the URI's authority stands in
    r.request_id = Some(HeaderValue::from_bytes(b"caf\xc3\xa9").unwrap()); // not visible ASCII: ""
    r.upstream = Some("[2001:db8::1]:443".parse().unwrap());
    r.client = "[fe80::1%3]:40000".parse().unwrap();
    r.error = Some("UPSTREAM_RESET");
    r.duration = Duration::new(u64::MAX, 0); // beyond u64 microseconds
    let text = formatted(&r);
    assert_eq!(text.as_bytes(), reference(&r));
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["authority"], "host.example:8443");
    assert_eq!(v["request_id"], "");
    assert_eq!(v["upstream"], "[2001:db8::1]:443");
    assert_eq!(v["client"], "[fe80::1%3]:40000");
}

#[test]
fn the_longest_fields_fit_the_room_made() {
    let mut r = record("/");
    r.service = "\u{1}".repeat(100).into();
    r.method = Method::from_bytes(&[b'X'; 40]).unwrap();
    r.authority = Some(HeaderValue::from_bytes(&[b'\t'; 50]).unwrap());
    r.uri = Uri::try_from(format!("http://{}/{}", "h".repeat(30), "\"".repeat(200))).unwrap();
    r.status = u16::MAX;
    r.upstream = Some(
        "[ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff%4294967295]:65535"
            .parse()
            .unwrap(),
    );
    r.client = "[::ffff:255.255.255.255%4294967295]:65535".parse().unwrap();
    r.error = Some("\u{0}\u{0}\u{0}");
    r.bytes_received = u64::MAX;
    r.bytes_sent = u64::MAX;
    (r.duration, r.upstream_time, r.overhead) = (Duration::MAX, Duration::MAX, Duration::MAX);
    r.attempts = u32::MAX;
    r.request_id = Some(HeaderValue::from_bytes(&[b'\\'; 64]).unwrap());
    assert_eq!(formatted(&r).as_bytes(), reference(&r));
}

// === the line format, for any record ===

fn header_value() -> impl Strategy<Value = Option<HeaderValue>> {
    prop_oneof![
        Just(None),
        "[ -~\t]{0,40}".prop_map(|s| HeaderValue::from_str(&s).ok()),
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|b| HeaderValue::from_bytes(&b).ok()),
    ]
}

fn uri() -> impl Strategy<Value = Uri> {
    prop_oneof![
        "/[!-~]{0,80}",
        "[a-z]{1,5}://[a-z0-9.]{1,20}(:[0-9]{1,5})?/[!-~]{0,40}",
        proptest::collection::vec(any::<u8>(), 0..80).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
    ]
    .prop_map(|s| Uri::try_from(s.as_str()).unwrap_or_else(|_| Uri::from_static("/")))
}

fn method() -> impl Strategy<Value = Method> {
    prop_oneof![
        Just(Method::GET),
        Just(Method::POST),
        Just(Method::CONNECT),
        "[A-Za-z0-9!#$%&'*+.^_`|~-]{1,20}".prop_map(|s| Method::from_bytes(s.as_bytes()).unwrap()),
    ]
}

fn duration() -> impl Strategy<Value = Duration> {
    prop_oneof![
        any::<u64>().prop_map(Duration::from_nanos),
        (any::<u64>(), 0..1_000_000_000u32).prop_map(|(s, n)| Duration::new(s, n)),
    ]
}

/// An address from a small pool (so that lines of one case repeat hosts with other ports, as
/// the cached host text sees them) or any address.
fn socket_addr() -> impl Strategy<Value = SocketAddr> {
    let hosts: Vec<std::net::IpAddr> = vec![
        [127, 0, 0, 1].into(),
        [10, 20, 0, 255].into(),
        "::1".parse().unwrap(),
        "::ffff:192.0.2.1".parse().unwrap(),
    ];
    prop_oneof![
        (prop::sample::select(hosts), any::<u16>()).prop_map(SocketAddr::from),
        any::<SocketAddr>(),
    ]
}

/// A record starting `offset_ms` after `base`; lines of one case share a cache, so consecutive
/// offsets within a second exercise the cached prefix and crossings exercise its renewal.
fn any_record(base: u64) -> impl Strategy<Value = AccessRecord> {
    (
        (
            0..3_000u64,
            0..1_000_000u32,
            any::<bool>(),
            any::<String>(),
            method(),
            header_value(),
            uri(),
        ),
        (
            any::<u16>(),
            proptest::option::of(socket_addr()),
            prop::sample::select(vec![None, Some("UPSTREAM_RESET"), Some("x\"\\\n\u{1}é")]),
        ),
        (
            any::<u64>(),
            any::<u64>(),
            duration(),
            duration(),
            duration(),
            any::<u32>(),
            header_value(),
            socket_addr(),
        ),
    )
        .prop_map(move |(a, b, c)| {
            let (offset_ms, nanos, inbound, service, method, authority, uri) = a;
            let (status, upstream, error) = b;
            let (bytes_received, bytes_sent, duration, upstream_time, overhead, attempts, request_id, client) = c;
            AccessRecord {
                start: UNIX_EPOCH
                    + Duration::new(
                        base + offset_ms / 1000,
                        nanos % 1_000_000 + (offset_ms % 1000) as u32 * 1_000_000,
                    ),
                direction: if inbound {
                    Direction::Inbound
                } else {
                    Direction::Outbound
                },
                service: service.into(),
                method,
                authority,
                uri,
                status,
                upstream,
                error,
                bytes_received,
                bytes_sent,
                duration,
                upstream_time,
                overhead,
                attempts,
                request_id,
                caller: (client.port() % 2 == 0).then(|| Arc::from("spiffe://td/ns/prod/sa/web")),
                client,
            }
        })
}

fn records() -> impl Strategy<Value = Vec<AccessRecord>> {
    (0..253_402_300_797u64).prop_flat_map(|base| proptest::collection::vec(any_record(base), 1..6))
}

/// An object's keys in the order they come (`serde_json::Map` sorts them).
struct Keys(Vec<String>);

impl<'de> serde::Deserialize<'de> for Keys {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = Keys;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Keys, A::Error> {
                let mut keys = Vec::new();
                while let Some((k, _)) = map.next_entry::<String, serde::de::IgnoredAny>()? {
                    keys.push(k);
                }
                Ok(Keys(keys))
            }
        }
        d.deserialize_map(Visitor)
    }
}

proptest! {
    /// Byte for byte what `serde_json` and `humantime` made of the same record, and a JSON object
    /// whose fields give the record back.
    #[test]
    fn any_record_is_the_same_valid_json_line(rs in records()) {
        let mut cache = Cache::new();
        for r in &rs {
            let buf = line_with(&mut cache, r);
            prop_assert_eq!(String::from_utf8(buf.clone()).unwrap(), String::from_utf8(reference(r)).unwrap());
            prop_assert_eq!(buf.iter().filter(|&&b| b == b'\n').count(), 1);
            let Keys(keys) = serde_json::from_slice(&buf).unwrap();
            let v: serde_json::Value = serde_json::from_slice(&buf).unwrap();
            prop_assert_eq!(keys, vec![
                "ts", "direction", "service", "method", "authority", "path", "status", "upstream",
                "error", "bytes_received", "bytes_sent", "duration_us", "upstream_us",
                "overhead_us", "attempts", "request_id", "client", "caller", "host",
            ]);
            let since = r.start.duration_since(UNIX_EPOCH).unwrap();
            let ts = humantime::parse_rfc3339(v["ts"].as_str().unwrap()).unwrap();
            prop_assert_eq!(ts, UNIX_EPOCH + Duration::new(since.as_secs(), since.subsec_micros() * 1000));
            prop_assert_eq!(&v["service"], &*r.service);
            prop_assert_eq!(&v["method"], r.method.as_str());
            prop_assert_eq!(&v["path"], r.uri.path_and_query().map_or("/", |p| p.as_str()));
            let authority = r.authority.as_ref().and_then(|h| h.to_str().ok())
                .or_else(|| r.uri.authority().map(|a| a.as_str())).unwrap_or("");
            prop_assert_eq!(&v["authority"], authority);
            prop_assert_eq!(&v["status"], r.status);
            // Addresses as `Display` writes them (an IPv6 flow label is not part of the text).
            prop_assert_eq!(v["upstream"].as_str().map(str::to_owned), r.upstream.map(|a| a.to_string()));
            prop_assert_eq!(v["error"].as_str(), r.error);
            prop_assert_eq!(&v["bytes_received"], r.bytes_received);
            prop_assert_eq!(&v["bytes_sent"], r.bytes_sent);
            let durations =
                [("duration_us", r.duration), ("upstream_us", r.upstream_time), ("overhead_us", r.overhead)];
            for (key, d) in durations {
                match u64::try_from(d.as_micros()) {
                    Ok(us) => prop_assert_eq!(&v[key], us),
                    // serde_json reads integers past u64 as floats, not always to the nearest
                    // (the exact text is checked above).
                    Err(_) => {
                        let (got, want) = (v[key].as_f64().unwrap(), d.as_micros() as f64);
                        prop_assert!((got - want).abs() <= want * 1e-12, "{key}: {got} vs {want}");
                    }
                }
            }
            prop_assert_eq!(&v["attempts"], r.attempts);
            let request_id = r.request_id.as_ref().and_then(|h| h.to_str().ok()).unwrap_or("");
            prop_assert_eq!(&v["request_id"], request_id);
            prop_assert_eq!(&v["client"], &r.client.to_string());
        }
    }
}

fn classify_bytewise(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0, |c, &b| {
        c | u8::from(b < 0x20) | (u8::from(b == b'"' || b == b'\\') << 1) | (u8::from(b >= 0x7f) << 2)
    })
}

#[test]
fn classify_finds_every_byte_at_every_place() {
    for len in 1..=24 {
        for at in 0..len {
            for b in 0..=255u8 {
                let mut bytes = vec![b'a'; len];
                bytes[at] = b;
                assert_eq!(
                    format::classify(&bytes),
                    classify_bytewise(&bytes),
                    "byte {b:#x} at {at} of {len}"
                );
            }
        }
    }
}

proptest! {
    #[test]
    fn classify_is_the_bytewise_answer(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
        prop_assert_eq!(format::classify(&bytes), classify_bytewise(&bytes));
    }
}

// === the writer: batches, bounds, drops ===

/// An output whose writes wait while the gate is closed, and that can be made to fail.
#[derive(Clone, Default)]
struct Output {
    bytes: Arc<Mutex<Vec<u8>>>,
    gate: Arc<(Mutex<bool>, Condvar)>,
    fail: bool,
}

impl Output {
    fn closed() -> Self {
        let o = Self::default();
        *o.gate.0.lock().unwrap() = true;
        o
    }

    fn open(&self) {
        *self.gate.0.lock().unwrap() = false;
        self.gate.1.notify_all();
    }

    fn lines(&self) -> Vec<serde_json::Value> {
        let bytes = self.bytes.lock().unwrap();
        assert!(bytes.is_empty() || bytes.ends_with(b"\n"), "a partial line was written");
        bytes
            .split(|&b| b == b'\n')
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_slice(l).unwrap())
            .collect()
    }
}

impl io::Write for Output {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut closed = self.gate.0.lock().unwrap();
        while *closed {
            closed = self.gate.1.wait(closed).unwrap();
        }
        if self.fail {
            return Err(io::Error::other("disk full"));
        }
        self.bytes.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn start(out: &Output, limits: Limits) -> (AccessLog, Counter) {
    let dropped = Counter::default();
    let log = AccessLog::with_writer(Box::new(out.clone()), limits, dropped.clone()).unwrap();
    (log, dropped)
}

const HOUR: Duration = Duration::from_secs(3600);

fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "not within 10 s: {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn waiting_lines_are_bounded_by_count() {
    let out = Output::default();
    let limits = Limits {
        lines: 5,
        bytes: 1 << 20,
        batch: 1 << 20,
        interval: HOUR,
        stop_wait: HOUR,
    };
    let (log, dropped) = start(&out, limits);
    for i in 0..20 {
        log.record(record(&format!("/{i}")));
    }
    assert_eq!(dropped.get(), 15);
    drop(log); // writes what is staged
    let paths: Vec<_> = out
        .lines()
        .iter()
        .map(|l| l["path"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(paths, ["/0", "/1", "/2", "/3", "/4"]);
}

#[test]
fn waiting_lines_are_bounded_by_bytes_not_count() {
    // Lines of ~2.3 KiB against a 10,000-byte bound, each handed to a writer stuck in its
    // first write: what the writer holds still counts until it is written.
    let out = Output::closed();
    let limits = Limits {
        lines: 1000,
        bytes: 10_000,
        batch: 1,
        interval: HOUR,
        stop_wait: HOUR,
    };
    let (log, dropped) = start(&out, limits);
    let long = format!("/{}", "a".repeat(2000));
    let len = formatted(&record(&long)).len();
    for _ in 0..20 {
        log.record(record(&long));
    }
    let kept = 10_000 / len;
    assert_eq!(dropped.get(), (20 - kept) as u64);
    out.open();
    drop(log);
    assert_eq!(out.lines().len(), kept);
}

#[test]
fn a_line_longer_than_the_bound_goes_when_nothing_waits() {
    let out = Output::default();
    let limits = Limits {
        lines: 10,
        bytes: 100,
        batch: 1 << 20,
        interval: HOUR,
        stop_wait: HOUR,
    };
    let (log, dropped) = start(&out, limits);
    log.record(record("/first"));
    log.record(record("/second"));
    assert_eq!(dropped.get(), 1);
    drop(log);
    assert_eq!(out.lines().len(), 1);
}

#[test]
fn a_partly_filled_buffer_is_written_within_the_interval_also_after_the_writer_idled() {
    let out = Output::default();
    let limits = Limits {
        lines: 100,
        bytes: 1 << 20,
        batch: 1 << 20,
        interval: Duration::from_millis(20),
        stop_wait: HOUR,
    };
    let (log, dropped) = start(&out, limits);
    let state = log.inner.as_ref().unwrap().state.clone();
    log.record(record("/1"));
    eventually("the first line is written", || out.lines().len() == 1);
    eventually("the writer sleeps without a deadline", || {
        state.idle.load(Ordering::SeqCst)
    });
    log.record(record("/2"));
    eventually("the second line is written", || out.lines().len() == 2);
    assert_eq!(dropped.get(), 0);
}

#[test]
fn the_writer_comes_before_the_interval_when_a_quarter_of_the_byte_bound_waits() {
    let out = Output::default();
    let len = formatted(&record("/1")).len();
    let limits = Limits {
        lines: 100,
        bytes: 8 * len,
        batch: 1,
        interval: HOUR,
        stop_wait: HOUR,
    };
    let (log, _) = start(&out, limits);
    log.record(record("/1"));
    log.record(record("/2"));
    eventually("both lines are written", || out.lines().len() == 2);
}

#[test]
fn failed_writes_count_their_lines_as_dropped() {
    let out = Output {
        fail: true,
        ..Output::default()
    };
    let limits = Limits {
        lines: 100,
        bytes: 1 << 20,
        batch: 1 << 20,
        interval: HOUR,
        stop_wait: HOUR,
    };
    let (log, dropped) = start(&out, limits);
    for _ in 0..3 {
        log.record(record("/"));
    }
    drop(log);
    assert_eq!(dropped.get(), 3);
}

#[test]
fn lines_from_many_threads_are_written_whole() {
    let out = Output::default();
    let limits = Limits {
        lines: 100_000,
        bytes: 64 << 20,
        batch: 4096,
        interval: Duration::from_millis(5),
        stop_wait: HOUR,
    };
    let (log, dropped) = start(&out, limits);
    std::thread::scope(|s| {
        for t in 0..4 {
            let log = log.clone();
            s.spawn(move || {
                for i in 0..2000 {
                    log.record(record(&format!("/{t}/{i}")));
                }
            });
        }
    });
    drop(log);
    let lines = out.lines();
    assert_eq!(dropped.get(), 0);
    assert_eq!(lines.len(), 8000);
    for t in 0..4 {
        let mine: Vec<_> = lines
            .iter()
            .filter_map(|l| l["path"].as_str()?.strip_prefix(&format!("/{t}/"))?.parse::<u32>().ok())
            .collect();
        assert_eq!(mine, (0..2000).collect::<Vec<_>>(), "thread {t}'s lines, in order");
    }
}

#[test]
fn off_records_nothing() {
    let log = AccessLog::off();
    assert!(!log.enabled());
    log.record(record("/"));
}

#[test]
fn quotes_backslashes_and_control_characters_are_escaped() {
    let mut r = record("/a\"b\\c{d}|é");
    r.service = "s\"\\\n\t\u{0}\u{1f}\u{7f}é".into();
    r.authority = Some(HeaderValue::from_static("h\"\\\tx"));
    r.request_id = Some(HeaderValue::from_static("id\"\\"));
    let text = formatted(&r);
    assert_eq!(text.as_bytes(), reference(&r));
    assert!(text.contains(r#""service":"s\"\\\n\t\u0000\u001f"#), "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(v["service"], "s\"\\\n\t\u{0}\u{1f}\u{7f}é");
    assert_eq!(v["authority"], "h\"\\\tx");
    assert_eq!(v["path"], r.uri.path_and_query().unwrap().as_str());
    assert_eq!(v["request_id"], "id\"\\");
}

#[test]
fn an_output_that_takes_no_writes_does_not_hold_up_the_last_drop() {
    let out = Output::closed();
    let limits = Limits {
        lines: 100,
        bytes: 1 << 20,
        batch: 1,
        interval: HOUR,
        stop_wait: Duration::from_millis(50),
    };
    let (log, _) = start(&out, limits);
    log.record(record("/stuck"));
    drop(log); // returns after `stop_wait` although the writer is stuck in its write
    out.open(); // and the writer then finishes
    eventually("the stuck line is written once the output takes it", || {
        out.lines().len() == 1
    });
}
