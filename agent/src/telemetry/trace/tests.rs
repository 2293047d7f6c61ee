use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::Method;
use prometheus_client::metrics::counter::Counter;
use prost::Message;
use tokio::sync::mpsc;

use super::context::{self, Format};
use super::export::Queue;
use super::otlp;
use super::{Ended, Sampler, Span, Tracer, TracingConfig, TRACEPARENT, TRACESTATE};
use crate::telemetry::metrics::Direction;

const PARENT: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (k, v) in pairs {
        h.insert(*k, HeaderValue::from_str(v).unwrap());
    }
    h
}

/// A tracer with its own queue (leaked: the request path holds `&'static Tracer`).
fn tracer(sampler: Sampler, ratio: f64, bound: usize) -> (&'static Tracer, mpsc::Receiver<Box<Span>>, Counter) {
    let dropped = Counter::default();
    let (queue, rx, _full) = Queue::new(bound, bound, dropped.clone());
    (Box::leak(Box::new(Tracer::new(sampler, ratio, queue))), rx, dropped)
}

fn begin(t: &'static Tracer, h: &mut HeaderMap) -> Option<Box<Span>> {
    t.begin(
        h,
        Direction::Outbound,
        Instant::now(),
        &Method::GET,
        &PathAndQuery::from_static("/a?b=1"),
    )
}

#[test]
fn traceparent_parsing_follows_the_w3c_rules() {
    let ok = context::parse_traceparent(PARENT.as_bytes()).unwrap();
    assert_eq!(context::hex(&ok.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(context::hex(&ok.span_id), "00f067aa0ba902b7");
    assert_eq!(ok.sampled, Some(true));
    assert_eq!(ok.format, Format::W3c);
    let unsampled = PARENT.replace("-01", "-00");
    assert_eq!(
        context::parse_traceparent(unsampled.as_bytes()).unwrap().sampled,
        Some(false)
    );
    // A later version may append fields.
    let future = format!("{}-extra", PARENT.replacen("00", "01", 1));
    assert!(context::parse_traceparent(future.as_bytes()).is_some());
    for bad in [
        "",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-0",
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
        "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
        "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        "00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
    ] {
        assert_eq!(context::parse_traceparent(bad.as_bytes()), None, "{bad:?}");
    }
}

#[test]
fn b3_single_and_multi_are_read() {
    let single = headers(&[(
        "b3",
        "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1-05e3ac9a4f6e3b90",
    )]);
    let p = context::extract(&single).unwrap();
    assert_eq!(context::hex(&p.trace_id), "80f198ee56343ba864fe8b2a57d3eff7");
    assert_eq!(context::hex(&p.span_id), "e457b5a2e4d86bd1");
    assert_eq!((p.sampled, p.format), (Some(true), Format::B3Single));

    // A 64-bit trace ID is the low half; no sampling state defers the decision.
    let short = headers(&[("b3", "64fe8b2a57d3eff7-e457b5a2e4d86bd1")]);
    let p = context::extract(&short).unwrap();
    assert_eq!(context::hex(&p.trace_id), "000000000000000064fe8b2a57d3eff7");
    assert_eq!(p.sampled, None);
    assert_eq!(context::extract(&headers(&[("b3", "0")])), None);
    assert_eq!(context::extract(&headers(&[("b3", "zz-e457b5a2e4d86bd1-1")])), None);

    let multi = headers(&[
        ("x-b3-traceid", "80F198EE56343BA864FE8B2A57D3EFF7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-sampled", "0"),
    ]);
    let p = context::extract(&multi).unwrap();
    assert_eq!((p.sampled, p.format), (Some(false), Format::B3Multi));
    let debug = headers(&[
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-flags", "1"),
    ]);
    assert_eq!(context::extract(&debug).unwrap().sampled, Some(true));
    // traceparent wins over B3.
    let both = headers(&[
        ("traceparent", PARENT),
        ("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-0"),
    ]);
    assert_eq!(context::extract(&both).unwrap().format, Format::W3c);
}

#[test]
fn the_next_hop_gets_this_span_as_its_parent() {
    let (t, _rx, _) = tracer(Sampler::ParentBased, 0.0, 16);
    let mut h = headers(&[("traceparent", PARENT), ("tracestate", "vendor=x")]);
    let span = begin(t, &mut h).expect("the caller sampled it");
    let out = context::parse_traceparent(h[&TRACEPARENT].as_bytes()).unwrap();
    assert_eq!(context::hex(&out.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(out.span_id, span.context().span_id);
    assert_ne!(context::hex(&out.span_id), "00f067aa0ba902b7");
    assert_eq!(out.sampled, Some(true));
    assert_eq!(
        span.parent_span_id.map(|p| context::hex(&p)).as_deref(),
        Some("00f067aa0ba902b7")
    );
    assert_eq!(h[&TRACESTATE], "vendor=x");
    assert_eq!(span.trace_state.as_ref().unwrap(), "vendor=x");

    // A malformed traceparent starts a new trace: the tracestate of no trace is dropped.
    let mut h = headers(&[("traceparent", "00-zz"), ("tracestate", "vendor=x")]);
    assert!(begin(t, &mut h).is_none(), "ratio 0");
    assert!(h.get(&TRACESTATE).is_none());
    let out = context::parse_traceparent(h[&TRACEPARENT].as_bytes()).unwrap();
    assert_eq!(out.sampled, Some(false));
}

#[test]
fn b3_callers_get_their_headers_rewritten_too() {
    let (t, _rx, _) = tracer(Sampler::ParentBased, 1.0, 16);
    let mut h = headers(&[("b3", "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1")]);
    let span = begin(t, &mut h).unwrap();
    let own = context::hex(&span.context().span_id);
    assert_eq!(
        h["b3"],
        format!("80f198ee56343ba864fe8b2a57d3eff7-{own}-1-e457b5a2e4d86bd1").as_str()
    );
    assert!(h[&TRACEPARENT].to_str().unwrap().contains(&own));

    let mut h = headers(&[
        ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ("x-b3-spanid", "e457b5a2e4d86bd1"),
        ("x-b3-sampled", "0"),
    ]);
    assert!(begin(t, &mut h).is_none(), "the caller's 0 wins over ratio 1");
    assert_eq!(h["x-b3-parentspanid"], "e457b5a2e4d86bd1");
    assert_eq!(h["x-b3-sampled"], "0");
    assert_ne!(h["x-b3-spanid"], "e457b5a2e4d86bd1");
    assert_eq!(h["x-b3-traceid"], "80f198ee56343ba864fe8b2a57d3eff7");
}

#[test]
fn samplers_decide_by_the_parent_or_by_the_ratio() {
    let unsampled_parent = PARENT.replace("-01", "-00");
    // parent_based: the caller decides both ways.
    let (t, _rx, _) = tracer(Sampler::ParentBased, 1.0, 16);
    assert!(begin(t, &mut headers(&[("traceparent", &unsampled_parent)])).is_none());
    let (t, _rx, _) = tracer(Sampler::ParentBased, 0.0, 16);
    assert!(begin(t, &mut headers(&[("traceparent", PARENT)])).is_some());
    // ratio: the caller's flag is ignored.
    let (t, _rx, _) = tracer(Sampler::Ratio, 1.0, 16);
    assert!(begin(t, &mut headers(&[("traceparent", &unsampled_parent)])).is_some());
    let (t, _rx, _) = tracer(Sampler::Ratio, 0.0, 16);
    assert!(begin(t, &mut headers(&[("traceparent", PARENT)])).is_none());
}

#[test]
fn the_ratio_is_deterministic_per_trace_and_close_to_its_share() {
    for ratio in [0.0, 0.01, 0.25, 0.5, 1.0] {
        let threshold = context::ratio_threshold(ratio);
        let n = 40_000;
        let mut sampled = 0;
        for _ in 0..n {
            let id = context::new_trace_id();
            let first = context::ratio_sampled(&id, threshold);
            assert_eq!(first, context::ratio_sampled(&id, threshold), "same trace, same answer");
            sampled += u32::from(first);
        }
        let share = f64::from(sampled) / f64::from(n);
        assert!((share - ratio).abs() < 0.01, "ratio {ratio}: sampled {share}");
    }
}

fn ended(total_ms: u64, headers_ms: u64, upstream_ms: u64) -> Ended {
    Ended {
        service: Some("orders".into()),
        status: 200,
        error: None,
        upstream: Some(("127.0.0.1:8080".parse().unwrap(), "vm")),
        attempts: 1,
        total: Duration::from_millis(total_ms),
        headers_time: Duration::from_millis(headers_ms),
        upstream_time: Duration::from_millis(upstream_ms),
    }
}

#[test]
fn the_time_split_sums_to_the_duration() {
    let (t, _rx, _) = tracer(Sampler::Ratio, 1.0, 16);
    let cases = [
        // (sent after ms, total, headers, upstream)
        (Some(2), 50, 40, 30),
        (None, 5, 5, 0),
        (Some(1), 10, 10, 10),
        // Clock readings that disagree a little must not underflow.
        (Some(9), 10, 8, 20),
    ];
    for (sent, total, headers_ms, upstream) in cases {
        let mut span = begin(t, &mut HeaderMap::new()).unwrap();
        if let Some(ms) = sent {
            span.sent(span.start + Duration::from_millis(ms));
            span.sent(span.start + Duration::from_millis(ms + 100)); // a retry: the first counts
        }
        span.ended = ended(total, headers_ms, upstream);
        let s = span.split();
        assert_eq!(
            s.admission + s.upstream + s.overhead + s.response_body,
            Duration::from_millis(total),
            "{s:?}"
        );
        if sent == Some(2) {
            assert_eq!(s.admission, Duration::from_millis(2));
            assert_eq!(s.upstream, Duration::from_millis(30));
            assert_eq!(s.overhead, Duration::from_millis(8));
            assert_eq!(s.response_body, Duration::from_millis(10));
        }
    }
}

#[test]
fn a_finished_span_encodes_as_otlp_with_its_attributes() {
    let (t, mut rx, _) = tracer(Sampler::ParentBased, 0.0, 16);
    let mut span = begin(t, &mut headers(&[("traceparent", PARENT)])).unwrap();
    span.route = Some("canary".into());
    span.colour = Some(HeaderValue::from_static("blue"));
    span.sent(span.start + Duration::from_millis(1));
    span.end(Ended {
        error: Some("UPSTREAM_TIMEOUT"),
        status: 504,
        ..ended(30, 25, 20)
    });
    let span = rx.try_recv().expect("queued");
    let resource = vec![otlp::string("service.name", "web")];
    let body = otlp::encode_batch(&resource, std::slice::from_ref(&span));
    let req = otlp::ExportTraceServiceRequest::decode(body.as_slice()).unwrap();
    // The body written directly says what the message structs say, for this failed span with
    // a parent and for a successful root span.
    let (t1, mut rx1, _) = tracer(Sampler::Ratio, 1.0, 16);
    begin(t1, &mut HeaderMap::new()).unwrap().end(ended(3, 2, 1));
    let root = rx1.try_recv().expect("queued");
    let both = [span, root];
    let direct = otlp::encode_batch(&resource, &both);
    let reference = otlp::encode(resource, both.iter().map(|s| otlp::span(s)).collect());
    assert_eq!(
        otlp::ExportTraceServiceRequest::decode(direct.as_slice()).unwrap(),
        otlp::ExportTraceServiceRequest::decode(reference.as_slice()).unwrap()
    );
    assert_eq!(direct, reference, "the same bytes, field for field");
    let s = &req.resource_spans[0].scope_spans[0].spans[0];
    assert_eq!(context::hex(&s.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(context::hex(&s.parent_span_id), "00f067aa0ba902b7");
    assert_eq!(s.end_time_unix_nano - s.start_time_unix_nano, 30_000_000);
    assert_eq!(s.kind, 3);
    assert_eq!(s.status.as_ref().unwrap().code, 2);
    let attr = |k: &str| {
        s.attributes
            .iter()
            .find(|a| a.key == k)
            .and_then(|a| a.value.clone())
            .and_then(|v| v.value)
    };
    let text = |k: &str| match attr(k) {
        Some(otlp::Value::String(s)) => s,
        other => panic!("{k}: {other:?}"),
    };
    let num = |k: &str| match attr(k) {
        Some(otlp::Value::Int(i)) => i,
        other => panic!("{k}: {other:?}"),
    };
    assert_eq!(text("vmesh.service"), "orders");
    assert_eq!(text("vmesh.route"), "canary");
    assert_eq!(text("vmesh.colour"), "blue");
    assert_eq!(text("vmesh.error"), "UPSTREAM_TIMEOUT");
    assert_eq!(text("vmesh.upstream"), "127.0.0.1:8080");
    assert_eq!(text("vmesh.env"), "vm");
    assert_eq!(text("url.path"), "/a");
    assert_eq!(num("http.response.status_code"), 504);
    let parts: i64 = ["admission", "upstream", "overhead", "response_body"]
        .iter()
        .map(|p| num(&format!("vmesh.time.{p}_ns")))
        .sum();
    assert_eq!(parts, 30_000_000);
    assert_eq!(s.events.len(), 2);
}

#[test]
fn a_full_queue_drops_and_counts_without_waiting() {
    let (t, _rx, dropped) = tracer(Sampler::Ratio, 1.0, 2);
    for _ in 0..5 {
        begin(t, &mut HeaderMap::new()).unwrap().end(ended(1, 1, 1));
    }
    assert_eq!(dropped.get(), 3);
}

#[test]
fn config_problems_are_all_named() {
    assert!(TracingConfig::default().validate("tracing").is_empty());
    let bad = TracingConfig {
        endpoint: "localhost:4318".into(),
        sample_ratio: 1.5,
        batch_size: 0,
        queue_size: 0,
        batch_interval: crate::config::Dur::secs(0),
        export_timeout: crate::config::Dur::secs(0),
        service_name: Some(" ".into()),
        ..TracingConfig::default()
    };
    let keys: Vec<String> = bad.validate("tracing").into_iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [
            "tracing.endpoint",
            "tracing.sample_ratio",
            "tracing.queue_size",
            "tracing.batch_size",
            "tracing.batch_interval",
            "tracing.export_timeout",
            "tracing.service_name"
        ]
    );
    let loaded = crate::config::load_str(
        "[tracing]\nenabled = true\nendpoint = \"http://127.0.0.1:4318\"\nsample_ratio = 0.5\nsampler = \"ratio\"\nbatch_interval = \"200ms\"\n",
    );
    let c = loaded.expect("valid [tracing]");
    assert!(c.tracing.enabled);
    assert_eq!(c.tracing.sampler, Sampler::Ratio);
    assert_eq!(c.tracing.batch_interval.get(), Duration::from_millis(200));
    let unknown = crate::config::load_str("[tracing]\nenable = true\n").unwrap_err();
    assert!(
        unknown.problems.iter().any(|p| p.key.starts_with("tracing")),
        "{unknown:?}"
    );
}

#[test]
fn traceparents_cut_from_shared_blocks_stay_intact() {
    // Enough values to fill several blocks; each must keep its own bytes after the block it
    // came from is left behind, after a clone, and after its neighbours are dropped.
    let mut kept = Vec::new();
    for i in 0..300u64 {
        let ctx = context::Context {
            trace_id: context::new_trace_id(),
            span_id: (i + 1).to_be_bytes(),
            sampled: i % 2 == 0,
        };
        let v = context::traceparent(&ctx);
        if i % 3 == 0 {
            kept.push((ctx, v.clone()));
        }
    }
    for (ctx, v) in &kept {
        let p = context::parse_traceparent(v.as_bytes()).expect("a valid traceparent");
        assert_eq!(
            (p.trace_id, p.span_id, p.sampled),
            (ctx.trace_id, ctx.span_id, Some(ctx.sampled))
        );
    }
}

#[test]
fn one_pass_and_b3_paths_agree_on_what_the_next_hop_sees() {
    let (t, _rx, _) = tracer(Sampler::ParentBased, 0.0, 16);
    // No trace header: a new unsampled trace, still propagated with flags 00.
    let mut h = headers(&[("host", "a"), ("x-request-id", "1")]);
    assert!(begin(t, &mut h).is_none());
    let v = h[&TRACEPARENT].to_str().unwrap();
    assert!(v.starts_with("00-") && v.ends_with("-00"), "{v}");
    assert_eq!(h.get_all(&TRACEPARENT).iter().count(), 1);
    // Two traceparents: the first continues, and only this hop's goes on.
    let mut h = HeaderMap::new();
    h.append(TRACEPARENT, HeaderValue::from_static(PARENT));
    h.append(TRACEPARENT, HeaderValue::from_static("00-zz"));
    assert!(begin(t, &mut h).is_some(), "the first, sampled, parent decides");
    assert_eq!(h.get_all(&TRACEPARENT).iter().count(), 1);
    let out = context::parse_traceparent(h[&TRACEPARENT].as_bytes()).unwrap();
    assert_eq!(context::hex(&out.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
    // traceparent and b3 both: W3C wins, the b3 header stays as it came.
    let b3 = "80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-1";
    let mut h = headers(&[("b3", b3), ("traceparent", PARENT)]);
    assert!(begin(t, &mut h).is_some());
    assert_eq!(h["b3"], b3);
    let out = context::parse_traceparent(h[&TRACEPARENT].as_bytes()).unwrap();
    assert_eq!(context::hex(&out.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
}
