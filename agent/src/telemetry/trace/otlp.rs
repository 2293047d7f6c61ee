//! The OTLP messages vmesh sends (`opentelemetry/proto/collector/trace/v1`, `trace/v1`,
//! `common/v1`, `resource/v1`), derived by hand with the fields it fills and their numbers
//! from the .proto files, and the conversion of a finished span.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[cfg(test)]
use prost::Message;

use super::span::Span;
use crate::telemetry::metrics::Direction;

#[cfg(test)]
/// `ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<OtlpSpan>,
}

#[cfg(test)]
#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

#[cfg(test)]
/// `Span`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct OtlpSpan {
    #[prost(bytes = "vec", tag = "1")]
    pub trace_id: Vec<u8>,
    #[prost(bytes = "vec", tag = "2")]
    pub span_id: Vec<u8>,
    #[prost(string, tag = "3")]
    pub trace_state: String,
    #[prost(bytes = "vec", tag = "4")]
    pub parent_span_id: Vec<u8>,
    #[prost(string, tag = "5")]
    pub name: String,
    /// `SpanKind`: 2 server, 3 client.
    #[prost(int32, tag = "6")]
    pub kind: i32,
    #[prost(fixed64, tag = "7")]
    pub start_time_unix_nano: u64,
    #[prost(fixed64, tag = "8")]
    pub end_time_unix_nano: u64,
    #[prost(message, repeated, tag = "9")]
    pub attributes: Vec<KeyValue>,
    #[prost(message, repeated, tag = "11")]
    pub events: Vec<Event>,
    #[prost(message, optional, tag = "15")]
    pub status: Option<Status>,
    /// W3C trace flags in the low byte.
    #[prost(fixed32, tag = "16")]
    pub flags: u32,
}

#[cfg(test)]
/// `Span.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    #[prost(string, tag = "2")]
    pub name: String,
}

#[cfg(test)]
/// `Status`: code 0 unset, 1 ok, 2 error.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Status {
    #[prost(string, tag = "2")]
    pub message: String,
    #[prost(int32, tag = "3")]
    pub code: i32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct KeyValue {
    #[prost(string, tag = "1")]
    pub key: String,
    #[prost(message, optional, tag = "2")]
    pub value: Option<AnyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct AnyValue {
    #[prost(oneof = "Value", tags = "1, 3")]
    pub value: Option<Value>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
pub enum Value {
    #[prost(string, tag = "1")]
    String(String),
    #[prost(int64, tag = "3")]
    Int(i64),
}

const SPAN_KIND_SERVER: i32 = 2;
const SPAN_KIND_CLIENT: i32 = 3;
const STATUS_ERROR: i32 = 2;

pub fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::String(value.into())),
        }),
    }
}

#[cfg(test)]
pub fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(Value::Int(value)),
        }),
    }
}

fn nanos(d: Duration) -> i64 {
    i64::try_from(d.as_nanos()).unwrap_or(i64::MAX)
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// The OTLP form of a finished span (the tests' reference for [`encode_batch`]).
#[cfg(test)]
pub fn span(s: &Span) -> OtlpSpan {
    let e = &s.ended;
    let split = s.split();
    let service = e.service.as_deref().unwrap_or("");
    let mut attributes = vec![
        string("vmesh.direction", s.direction.as_str()),
        string("vmesh.service", service),
        string("http.request.method", s.method.as_str()),
        string("url.path", s.path.path()),
        int("http.response.status_code", i64::from(e.status)),
        int("vmesh.attempts", i64::from(e.attempts)),
        int("vmesh.time.admission_ns", nanos(split.admission)),
        int("vmesh.time.upstream_ns", nanos(split.upstream)),
        int("vmesh.time.overhead_ns", nanos(split.overhead)),
        int("vmesh.time.response_body_ns", nanos(split.response_body)),
    ];
    if let Some(route) = &s.route {
        attributes.push(string("vmesh.route", &**route));
    }
    if let Some((addr, env)) = e.upstream {
        attributes.push(string("vmesh.upstream", addr.to_string()));
        attributes.push(string("vmesh.env", env));
    }
    if let Some(c) = s.colour.as_ref().and_then(|c| c.to_str().ok()) {
        attributes.push(string("vmesh.colour", c));
    }
    if let Some(code) = e.error {
        attributes.push(string("vmesh.error", code));
    }
    let start = unix_nanos(s.wall_start);
    let at = |d: Duration| start.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    let mut events = Vec::with_capacity(2);
    if let Some(sent) = s.first_sent_offset() {
        events.push(Event {
            time_unix_nano: at(sent),
            name: "upstream request sent".to_owned(),
        });
    }
    events.push(Event {
        time_unix_nano: at(e.headers_time.min(e.total)),
        name: "response headers".to_owned(),
    });
    let failed = e.error.is_some() || e.status >= 500 || e.status == 0;
    OtlpSpan {
        trace_id: s.ctx.trace_id.to_vec(),
        span_id: s.ctx.span_id.to_vec(),
        trace_state: s
            .trace_state
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned(),
        parent_span_id: s.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
        name: [s.method.as_str(), service].join(" "),
        kind: match s.direction {
            Direction::Inbound => SPAN_KIND_SERVER,
            Direction::Outbound => SPAN_KIND_CLIENT,
        },
        start_time_unix_nano: start,
        end_time_unix_nano: at(e.total),
        attributes,
        events,
        status: failed.then(|| Status {
            message: e.error.unwrap_or("").to_owned(),
            code: STATUS_ERROR,
        }),
        flags: u32::from(s.ctx.sampled),
    }
}

/// One export request from the message structs (the tests' reference for [`encode_batch`]).
#[cfg(test)]
pub fn encode(resource: Vec<KeyValue>, spans: Vec<OtlpSpan>) -> Vec<u8> {
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource { attributes: resource }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "vmesh".to_owned(),
                    version: env!("CARGO_PKG_VERSION").to_owned(),
                }),
                spans,
            }],
        }],
    }
    .encode_to_vec()
}

/// One export request: the spans under one resource and the `vmesh` scope, written straight
/// into the body (protobuf wire format) with no message structs in between: a span costs no
/// allocation but the body's growth (the struct form allocated each attribute's key and
/// value, and measured nested messages once per level).
pub fn encode_batch(resource: &[KeyValue], spans: &[Box<Span>]) -> Vec<u8> {
    let mut all = Vec::with_capacity(spans.len() * 600);
    let mut one = Vec::with_capacity(600);
    for s in spans {
        one.clear();
        write_span(&mut one, s);
        wire::bytes(&mut all, 2, &one);
    }
    // ScopeSpans { scope = 1, spans = 2 }
    let mut scope = Vec::with_capacity(32);
    wire::string(&mut scope, 1, "vmesh");
    wire::string(&mut scope, 2, env!("CARGO_PKG_VERSION"));
    let mut scope_spans = Vec::with_capacity(all.len() + 48);
    wire::bytes(&mut scope_spans, 1, &scope);
    scope_spans.extend_from_slice(&all);
    // ResourceSpans { resource = 1 { attributes = 1 }, scope_spans = 2 }
    let mut res = Vec::new();
    for kv in resource {
        prost::encoding::message::encode(1, kv, &mut res);
    }
    let mut resource_spans = Vec::with_capacity(scope_spans.len() + res.len() + 16);
    wire::bytes(&mut resource_spans, 1, &res);
    wire::bytes(&mut resource_spans, 2, &scope_spans);
    // ExportTraceServiceRequest { resource_spans = 1 }
    let mut body = Vec::with_capacity(resource_spans.len() + 8);
    wire::bytes(&mut body, 1, &resource_spans);
    body
}

/// `Span` (trace/v1), the fields of [`span`] in field order.
fn write_span(b: &mut Vec<u8>, s: &Span) {
    let e = &s.ended;
    let split = s.split();
    let service = e.service.as_deref().unwrap_or("");
    wire::bytes(b, 1, &s.ctx.trace_id);
    wire::bytes(b, 2, &s.ctx.span_id);
    let trace_state = s.trace_state.as_ref().and_then(|v| v.to_str().ok()).unwrap_or("");
    wire::string(b, 3, trace_state);
    if let Some(p) = &s.parent_span_id {
        wire::bytes(b, 4, p);
    }
    let method = s.method.as_str();
    wire::key(b, 5, wire::LEN);
    wire::varint(b, (method.len() + 1 + service.len()) as u64);
    b.extend_from_slice(method.as_bytes());
    b.push(b' ');
    b.extend_from_slice(service.as_bytes());
    let kind = match s.direction {
        Direction::Inbound => SPAN_KIND_SERVER,
        Direction::Outbound => SPAN_KIND_CLIENT,
    };
    wire::int(b, 6, i64::from(kind));
    let start = unix_nanos(s.wall_start);
    let at = |d: Duration| start.saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
    wire::fixed64(b, 7, start);
    wire::fixed64(b, 8, at(e.total));
    wire::attr_str(b, "vmesh.direction", s.direction.as_str());
    wire::attr_str(b, "vmesh.service", service);
    wire::attr_str(b, "http.request.method", method);
    wire::attr_str(b, "url.path", s.path.path());
    wire::attr_int(b, "http.response.status_code", i64::from(e.status));
    wire::attr_int(b, "vmesh.attempts", i64::from(e.attempts));
    wire::attr_int(b, "vmesh.time.admission_ns", nanos(split.admission));
    wire::attr_int(b, "vmesh.time.upstream_ns", nanos(split.upstream));
    wire::attr_int(b, "vmesh.time.overhead_ns", nanos(split.overhead));
    wire::attr_int(b, "vmesh.time.response_body_ns", nanos(split.response_body));
    if let Some(route) = &s.route {
        wire::attr_str(b, "vmesh.route", route);
    }
    if let Some((addr, env)) = e.upstream {
        let mut text = [0u8; 64];
        let n = {
            use std::io::Write;
            let mut w = &mut text[..];
            // A socket address fits in 64 bytes (an IPv6 one with scope and port in 56).
            let _ = write!(w, "{addr}");
            64 - w.len()
        };
        wire::attr_bytes_as_str(b, "vmesh.upstream", &text[..n]);
        wire::attr_str(b, "vmesh.env", env);
    }
    if let Some(c) = s.colour.as_ref().and_then(|c| c.to_str().ok()) {
        wire::attr_str(b, "vmesh.colour", c);
    }
    if let Some(code) = e.error {
        wire::attr_str(b, "vmesh.error", code);
    }
    if let Some(sent) = s.first_sent_offset() {
        wire::event(b, at(sent), "upstream request sent");
    }
    wire::event(b, at(e.headers_time.min(e.total)), "response headers");
    let failed = e.error.is_some() || e.status >= 500 || e.status == 0;
    if failed {
        // Status { message = 2, code = 3 }
        let message = e.error.unwrap_or("");
        let len = wire::string_len(2, message) + 2;
        wire::key(b, 15, wire::LEN);
        wire::varint(b, len as u64);
        wire::string(b, 2, message);
        wire::int(b, 3, i64::from(STATUS_ERROR));
    }
    let flags = u32::from(s.ctx.sampled);
    if flags != 0 {
        wire::key(b, 16, wire::FIXED32);
        b.extend_from_slice(&flags.to_le_bytes());
    }
}

/// Protobuf wire format, proto3 rules: a field holding its default value is left out.
mod wire {
    pub const VARINT: u8 = 0;
    pub const FIXED64: u8 = 1;
    pub const LEN: u8 = 2;
    pub const FIXED32: u8 = 5;

    pub fn varint(b: &mut Vec<u8>, mut v: u64) {
        while v >= 0x80 {
            b.push((v as u8) | 0x80);
            v >>= 7;
        }
        b.push(v as u8);
    }

    pub fn varint_len(v: u64) -> usize {
        (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
    }

    pub fn key(b: &mut Vec<u8>, field: u32, wire_type: u8) {
        varint(b, (u64::from(field) << 3) | u64::from(wire_type));
    }

    fn key_len(field: u32) -> usize {
        varint_len(u64::from(field) << 3)
    }

    pub fn bytes(b: &mut Vec<u8>, field: u32, v: &[u8]) {
        if v.is_empty() {
            return;
        }
        key(b, field, LEN);
        varint(b, v.len() as u64);
        b.extend_from_slice(v);
    }

    pub fn string(b: &mut Vec<u8>, field: u32, v: &str) {
        bytes(b, field, v.as_bytes());
    }

    /// The encoded length of [`string`] for `v`.
    pub fn string_len(field: u32, v: &str) -> usize {
        match v.len() {
            0 => 0,
            n => key_len(field) + varint_len(n as u64) + n,
        }
    }

    /// An `int32`/`int64` field (negative values as ten-byte varints, as protobuf does).
    pub fn int(b: &mut Vec<u8>, field: u32, v: i64) {
        if v != 0 {
            key(b, field, VARINT);
            varint(b, v as u64);
        }
    }

    pub fn fixed64(b: &mut Vec<u8>, field: u32, v: u64) {
        if v != 0 {
            key(b, field, FIXED64);
            b.extend_from_slice(&v.to_le_bytes());
        }
    }

    /// `attributes` (field 9): `KeyValue { key = 1, value = 2 AnyValue { string_value = 1 } }`.
    pub fn attr_str(b: &mut Vec<u8>, k: &str, v: &str) {
        attr_bytes_as_str(b, k, v.as_bytes());
    }

    /// [`attr_str`] for UTF-8 held as bytes.
    pub fn attr_bytes_as_str(b: &mut Vec<u8>, k: &str, v: &[u8]) {
        // An empty string is the oneof's value all the same: written, with length 0.
        let any = 1 + varint_len(v.len() as u64) + v.len();
        kv_head(b, k, any);
        key(b, 1, LEN);
        varint(b, v.len() as u64);
        b.extend_from_slice(v);
    }

    /// `attributes` (field 9): `KeyValue { key = 1, value = 2 AnyValue { int_value = 3 } }`.
    pub fn attr_int(b: &mut Vec<u8>, k: &str, v: i64) {
        let any = 1 + varint_len(v as u64);
        kv_head(b, k, any);
        key(b, 3, VARINT);
        varint(b, v as u64);
    }

    /// A `KeyValue`'s tag, length, key and the `AnyValue`'s tag and length (`any` bytes).
    fn kv_head(b: &mut Vec<u8>, k: &str, any: usize) {
        let kv = string_len(1, k) + 1 + varint_len(any as u64) + any;
        key(b, 9, LEN);
        varint(b, kv as u64);
        string(b, 1, k);
        key(b, 2, LEN);
        varint(b, any as u64);
    }

    /// `events` (field 11): `Event { time_unix_nano = 1 (fixed64), name = 2 }`.
    pub fn event(b: &mut Vec<u8>, time: u64, name: &str) {
        let len = if time != 0 { 9 } else { 0 } + string_len(2, name);
        key(b, 11, LEN);
        varint(b, len as u64);
        fixed64(b, 1, time);
        string(b, 2, name);
    }
}
