//! The OTLP messages vmesh sends (`opentelemetry/proto/collector/trace/v1`, `trace/v1`,
//! `common/v1`, `resource/v1`), derived by hand with the fields it fills and their numbers
//! from the .proto files, and the conversion of a finished span.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prost::Message;

use super::span::Span;
use crate::telemetry::metrics::Direction;

/// `ExportTraceServiceRequest`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct ExportTraceServiceRequest {
    #[prost(message, repeated, tag = "1")]
    pub resource_spans: Vec<ResourceSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ResourceSpans {
    #[prost(message, optional, tag = "1")]
    pub resource: Option<Resource>,
    #[prost(message, repeated, tag = "2")]
    pub scope_spans: Vec<ScopeSpans>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct Resource {
    #[prost(message, repeated, tag = "1")]
    pub attributes: Vec<KeyValue>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct ScopeSpans {
    #[prost(message, optional, tag = "1")]
    pub scope: Option<InstrumentationScope>,
    #[prost(message, repeated, tag = "2")]
    pub spans: Vec<OtlpSpan>,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct InstrumentationScope {
    #[prost(string, tag = "1")]
    pub name: String,
    #[prost(string, tag = "2")]
    pub version: String,
}

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

/// `Span.Event`.
#[derive(Clone, PartialEq, prost::Message)]
pub struct Event {
    #[prost(fixed64, tag = "1")]
    pub time_unix_nano: u64,
    #[prost(string, tag = "2")]
    pub name: String,
}

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

/// The OTLP form of a finished span.
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
        name: format!("{} {}", s.method, service),
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

/// One export request: the spans under one resource and the `vmesh` scope.
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
