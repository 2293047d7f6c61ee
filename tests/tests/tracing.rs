//! Distributed tracing through real agents (docs/tracing.md): a caller sidecar's outbound span
//! and the callee sidecar's inbound span reach a real OTLP/HTTP receiver
//! (`fixtures/otlp_receiver.py`, decoding with the official protobuf definitions) linked in one
//! trace, with a time split that sums to each span's duration and a caller span as long as the
//! client's own measurement; sampling ratio 0 exports nothing but still propagates; a receiver
//! that is down costs spans (counted), never requests; B3 callers are continued.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use tempfile::TempDir;
use vmesh_tests::agent::metric_value;
use vmesh_tests::{
    eventually, fixture, free_addr, http, raw_exchange, tools, Agent, AgentBuilder, Curl, Inbound, Outbound, Process,
    Upstream,
};

/// The client's span: the caller sidecar's parent.
const CLIENT_TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
const CLIENT_SPAN: &str = "b7ad6b7169203331";

/// The OTLP receiver as a child process.
struct Receiver {
    addr: SocketAddr,
    _process: Process,
    _dir: TempDir,
}

impl Receiver {
    fn spawn() -> Receiver {
        let addr = free_addr();
        let dir = tempfile::tempdir().expect("receiver temp dir");
        let mut cmd = tools::python_command(&["opentelemetry.proto.collector.trace.v1.trace_service_pb2"]);
        cmd.arg(fixture("otlp_receiver.py")).arg(addr.port().to_string());
        let mut process = Process::spawn("otlp-receiver", cmd, dir.path());
        eventually(Duration::from_secs(15), "the OTLP receiver to answer", || {
            if let Some(status) = process.try_exit() {
                panic!("otlp_receiver.py exited with {status}: {}", process.stderr_tail(30));
            }
            http::get(addr, "/spans").map(drop)
        });
        Receiver {
            addr,
            _process: process,
            _dir: dir,
        }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    fn spans(&self) -> Vec<Value> {
        let r = http::get(self.addr, "/spans").expect("GET /spans of the receiver");
        r.json()["spans"].as_array().cloned().unwrap_or_default()
    }

    /// Waits for `n` spans of `trace` and returns them.
    fn wait_trace(&self, trace: &str, n: usize) -> Vec<Value> {
        eventually(Duration::from_secs(15), &format!("{n} spans of trace {trace}"), || {
            let spans: Vec<Value> = self.spans().into_iter().filter(|s| s["trace_id"] == trace).collect();
            if spans.len() >= n {
                Ok(spans)
            } else {
                Err(format!("{} so far: {spans:?}", spans.len()))
            }
        })
    }
}

/// Starts `builder` with a `[tracing]` section (the builder has no method for one: the config
/// file gets it appended and the agent is started again on it).
fn start_traced(builder: AgentBuilder, tracing: &str) -> Agent {
    let mut agent = builder.start();
    let text = std::fs::read_to_string(agent.config_path()).expect("read the agent config");
    agent.write_raw_config(&format!("{text}\n[tracing]\n{tracing}\n"));
    agent.restart();
    agent
}

fn tracing_section(receiver: &Receiver, service: &str, ratio: f64) -> String {
    format!(
        "enabled = true\nendpoint = \"{}\"\nsample_ratio = {ratio:?}\nbatch_interval = \"100ms\"\nservice_name = \"{service}\"",
        receiver.endpoint()
    )
}

fn attr<'a>(span: &'a Value, key: &str) -> &'a Value {
    &span["attributes"][key]
}

fn nanos(span: &Value, key: &str) -> i64 {
    attr(span, key).as_i64().unwrap_or_else(|| panic!("no {key} in {span}"))
}

fn duration_ns(span: &Value) -> i64 {
    let start = span["start"].as_i64().expect("start");
    let end = span["end"].as_i64().expect("end");
    end - start
}

/// The four parts of the split and their sum.
fn split_sum(span: &Value) -> i64 {
    ["admission", "upstream", "overhead", "response_body"]
        .iter()
        .map(|p| nanos(span, &format!("vmesh.time.{p}_ns")))
        .sum()
}

/// The JSON body of a raw HTTP/1.1 answer (the Python app's echo).
fn echo_body(raw: &[u8]) -> Value {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no head in {text:?}"));
    assert!(head.starts_with("HTTP/1.1 200"), "answer: {text}");
    let json = &body[body.find('{').expect("a JSON body")..=body.rfind('}').expect("a JSON body")];
    serde_json::from_str(json).unwrap_or_else(|e| panic!("echo body {json:?}: {e}"))
}

/// `traceparent` as the app received it: (trace, parent span, flags).
fn seen_traceparent(echo: &Value) -> (String, String, String) {
    let tp = echo["headers"]["traceparent"]
        .as_str()
        .unwrap_or_else(|| panic!("the app got no traceparent: {echo}"));
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {tp:?}");
    (parts[1].to_string(), parts[2].to_string(), parts[3].to_string())
}

#[test]
fn a_call_through_two_sidecars_yields_two_linked_spans_whose_time_adds_up() {
    let receiver = Receiver::spawn();
    let app = Upstream::python("app").spawn();
    let callee = start_traced(
        Agent::builder().inbound(Inbound::new(app.addr(), "http")),
        &tracing_section(&receiver, "callee-svc", 0.0),
    );
    let caller = start_traced(
        Agent::builder().outbound(Outbound::new("callee").endpoint(callee.inbound_addr())),
        &tracing_section(&receiver, "caller-svc", 0.0),
    );

    // The client's own span is sampled: parent-based sampling records both hops at ratio 0.
    let request = format!(
        "GET /slow?ms=200 HTTP/1.1\r\nHost: callee\r\ntraceparent: 00-{CLIENT_TRACE}-{CLIENT_SPAN}-01\r\n\
         Connection: close\r\n\r\n"
    );
    let sent = Instant::now();
    let raw = raw_exchange(
        caller.outbound_addr("callee"),
        request.as_bytes(),
        Duration::from_secs(10),
    )
    .expect("the call through both sidecars");
    let client_ns = i64::try_from(sent.elapsed().as_nanos()).unwrap();
    let echo = echo_body(&raw);

    let spans = receiver.wait_trace(CLIENT_TRACE, 2);
    assert_eq!(spans.len(), 2, "one span per sidecar: {spans:#?}");
    let find = |dir: &str| {
        spans
            .iter()
            .find(|s| attr(s, "vmesh.direction") == dir)
            .unwrap_or_else(|| panic!("no {dir} span in {spans:#?}"))
    };
    let (out, inb) = (find("outbound"), find("inbound"));

    // Linked: client -> caller span -> callee span -> the app.
    assert_eq!(out["parent_span_id"], CLIENT_SPAN, "{out:#}");
    assert_eq!(inb["parent_span_id"], out["span_id"], "callee span's parent: {inb:#}");
    let (trace, parent, flags) = seen_traceparent(&echo);
    assert_eq!((trace.as_str(), flags.as_str()), (CLIENT_TRACE, "01"));
    assert_eq!(
        parent,
        inb["span_id"].as_str().unwrap(),
        "the app's parent is the callee span"
    );
    assert_eq!(out["kind"], 3, "client span");
    assert_eq!(inb["kind"], 2, "server span");
    assert_eq!(out["resource"]["service.name"], "caller-svc");
    assert_eq!(inb["resource"]["service.name"], "callee-svc");

    // Attributes.
    for s in [out, inb] {
        assert_eq!(attr(s, "http.request.method"), "GET");
        assert_eq!(attr(s, "http.response.status_code"), 200);
        assert_eq!(attr(s, "url.path"), "/slow");
        assert_eq!(attr(s, "vmesh.env"), "vm");
        assert_eq!(attr(s, "vmesh.attempts"), 1);
        assert!(attr(s, "vmesh.error").is_null(), "{s:#}");
        assert_eq!(s["status"]["code"], 0);
    }
    assert_eq!(attr(out, "vmesh.service"), "callee");
    assert_eq!(attr(out, "vmesh.upstream"), callee.inbound_addr().to_string().as_str());
    assert_eq!(attr(inb, "vmesh.upstream"), app.addr().to_string().as_str());

    // The split sums to each span's duration, and the upstream part holds the app's 200 ms.
    for s in [out, inb] {
        let d = duration_ns(s);
        let sum = split_sum(s);
        assert!((sum - d).abs() * 20 <= d, "split {sum} ns vs duration {d} ns: {s:#}");
        assert!(nanos(s, "vmesh.time.upstream_ns") >= 200_000_000, "{s:#}");
    }
    // The callee's span up to its response headers happens inside the caller's upstream time
    // (the caller's upstream time ends at the response headers; the callee's span goes on while
    // it sends the body).
    assert!(
        nanos(out, "vmesh.time.upstream_ns") >= duration_ns(inb) - nanos(inb, "vmesh.time.response_body_ns"),
        "{out:#}\n{inb:#}"
    );

    // The caller's span is as long as the client measured (5%, plus 10 ms for the loopback
    // connection and the client's own reads on a loaded machine).
    let d = duration_ns(out);
    assert!(
        (d - client_ns).abs() <= client_ns / 20 + 10_000_000,
        "caller span {d} ns, client measured {client_ns} ns"
    );
    assert_eq!(caller.metric("vmesh_trace_spans_exported_total"), Some(1.0));
}

#[test]
fn sampling_ratio_zero_exports_nothing_but_still_propagates() {
    let receiver = Receiver::spawn();
    let app = Upstream::python("app").spawn();
    let agent = start_traced(
        Agent::builder().outbound(Outbound::new("orders").endpoint(app.addr())),
        &tracing_section(&receiver, "web", 0.0),
    );

    let mut traces = std::collections::HashSet::new();
    for _ in 0..20 {
        let r = Curl::get(agent.outbound_url("orders", "/x")).run();
        r.expect_status(200);
        let (trace, parent, flags) = seen_traceparent(&r.json());
        assert_eq!(flags, "00", "not sampled, and told so");
        assert_eq!(parent.len(), 16);
        traces.insert(trace);
    }
    assert_eq!(traces.len(), 20, "every request starts its own trace");

    // A sampled caller's request after them: once its span is in, nothing else came.
    let marker = "11111111111111111111111111111111";
    Curl::get(agent.outbound_url("orders", "/x"))
        .header(&format!("traceparent: 00-{marker}-2222222222222222-01"))
        .run()
        .expect_status(200);
    receiver.wait_trace(marker, 1);
    let all = receiver.spans();
    assert_eq!(all.len(), 1, "only the sampled caller's span: {all:#?}");
    assert_eq!(agent.metric("vmesh_trace_spans_exported_total"), Some(1.0));
}

#[test]
fn a_receiver_that_is_down_costs_spans_not_requests() {
    let down = free_addr(); // nothing listens there
    let app = Upstream::python("app").spawn();
    let agent = start_traced(
        Agent::builder().outbound(Outbound::new("orders").endpoint(app.addr())),
        &format!(
            "enabled = true\nendpoint = \"http://{down}\"\nsample_ratio = 1.0\nbatch_interval = \"50ms\"\n\
             batch_size = 8\nexport_timeout = \"1s\""
        ),
    );
    let n = 40;
    for i in 0..n {
        let started = Instant::now();
        let r = Curl::get(agent.outbound_url("orders", "/x")).run();
        r.expect_status(200);
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "request {i} took {:?}",
            started.elapsed()
        );
    }
    let series = "vmesh_trace_spans_dropped_total{reason=\"export_failed\"}";
    eventually(Duration::from_secs(15), "every span counted as dropped", || {
        let text = agent.metrics_text();
        match metric_value(&text, series) {
            Some(v) if v >= f64::from(n) => Ok(()),
            other => Err(format!("{series} = {other:?}")),
        }
    });
    assert_eq!(agent.metric("vmesh_trace_spans_exported_total"), Some(0.0));
    assert_eq!(
        agent.metric("vmesh_trace_spans_dropped_total{reason=\"queue_full\"}"),
        Some(0.0)
    );
}

#[test]
fn b3_callers_are_continued() {
    let receiver = Receiver::spawn();
    let app = Upstream::python("app").spawn();
    let agent = start_traced(
        Agent::builder().outbound(Outbound::new("orders").endpoint(app.addr())),
        &tracing_section(&receiver, "web", 0.0),
    );

    // Single header.
    let trace = "80f198ee56343ba864fe8b2a57d3eff7";
    let r = Curl::get(agent.outbound_url("orders", "/b3"))
        .header(&format!("b3: {trace}-e457b5a2e4d86bd1-1"))
        .run();
    r.expect_status(200);
    let span = receiver.wait_trace(trace, 1).remove(0);
    assert_eq!(span["parent_span_id"], "e457b5a2e4d86bd1");
    let echo = r.json();
    let (seen_trace, parent, flags) = seen_traceparent(&echo);
    let own = span["span_id"].as_str().unwrap();
    assert_eq!(
        (seen_trace.as_str(), parent.as_str(), flags.as_str()),
        (trace, own, "01")
    );
    assert_eq!(
        echo["headers"]["b3"],
        format!("{trace}-{own}-1-e457b5a2e4d86bd1").as_str(),
        "the B3 app downstream sees this span too"
    );

    // Multi headers, with a 64-bit trace ID.
    let r = Curl::get(agent.outbound_url("orders", "/b3"))
        .header("X-B3-TraceId: 463ac35c9f6413ad")
        .header("X-B3-SpanId: a2fb4a1d1a96d312")
        .header("X-B3-Sampled: 1")
        .run();
    r.expect_status(200);
    let span = receiver.wait_trace("0000000000000000463ac35c9f6413ad", 1).remove(0);
    assert_eq!(span["parent_span_id"], "a2fb4a1d1a96d312");
    let echo = r.json();
    assert_eq!(echo["headers"]["x-b3-spanid"], span["span_id"]);
    assert_eq!(echo["headers"]["x-b3-parentspanid"], "a2fb4a1d1a96d312");
}
