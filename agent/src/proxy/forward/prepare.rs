//! The prepare stage: the request head rewritten for the next hop (hop-by-hop headers and
//! `x-vmesh-*` headers vmesh does not read out, `x-forwarded-for` by the client's trust and a
//! valid `x-request-id` in, `Host`/`:authority` for the upstream protocol), and the body made
//! replayable when it is small enough to retry.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::Version;
use http_body::Body;
use http_body_util::BodyExt;

use super::super::body::{is_body_timeout, StreamBody};
use super::super::complete::{Completion, Received};
use super::super::downstream::{ClientBody, ClientUpgrade};
use super::super::error::ProxyError;
use super::super::{headers, ConnActivity, ConnCtx};
use crate::governance::colour::DEFAULT_HEADER;
use crate::upstream::body::RequestBody;

/// A request ready to be routed and sent.
pub struct Prepared {
    pub parts: Parts,
    /// Origin-form target (`/path?query`).
    pub path: PathAndQuery,
    pub upgrade: bool,
    pub on_upgrade: Option<ClientUpgrade>,
    /// The head has a `Host` field (HTTP/1.1 upstreams; see [`set_authority`]).
    pub host: bool,
}

/// Rewrites the head of `parts` for an upstream speaking HTTP/2 (`h2`) or HTTP/1.1.
pub fn head(ctx: &ConnCtx, mut parts: Parts, h2: bool, completion: &mut Completion) -> Result<Prepared, ProxyError> {
    // One pass over the fields: each step below looks a field up only when it is there.
    let fields = headers::scan(&parts.headers);
    // Only the upgrades of `proxy.upgrades` (WebSocket) are tunnelled; any other (h2c, an
    // unknown protocol) goes on as a plain request with its Upgrade header stripped.
    let upgrade = parts.version == Version::HTTP_11
        && fields.is_upgrade()
        && headers::upgrade_allowed(&parts.headers, &ctx.shared.limits.upgrades);
    // (While the agent drains, HTTP/1.1 clients are told `Connection: close` by the server,
    // `downstream::h1`, for every response.)
    let path = match parts.uri.path_and_query() {
        Some(p) => p.clone(),
        None if parts.method != http::Method::CONNECT => PathAndQuery::from_static("/"),
        // CONNECT tunnels are not a sidecar's job.
        None => {
            if let Some(log) = completion.log.as_mut() {
                log.authority = parts.headers.get(header::HOST).cloned();
                log.request_id = parts.headers.get(&headers::X_REQUEST_ID).cloned();
            }
            return Err(ProxyError::BadRequest);
        }
    };
    let on_upgrade = if upgrade {
        parts.extensions.remove::<ClientUpgrade>()
    } else {
        None
    };
    headers::strip_hop_by_hop(&mut parts.headers, upgrade, &fields);
    let te_trailers = fields.te_trailers;
    // Fields a `Connection` token named (`Host`, `x-request-id`, ...) are gone now: looked at
    // again (rare), so that what follows does not count on them.
    let fields = if fields.connection_names {
        headers::scan(&parts.headers)
    } else {
        fields
    };
    if te_trailers && h2 {
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    if fields.expect {
        parts.headers.remove(header::EXPECT);
    }
    if fields.vmesh {
        strip_vmesh(ctx, &mut parts.headers);
    }
    // Room for x-forwarded-for and x-request-id in one step: the map hyper parsed is sized
    // for the headers it found, and growing it twice costs two reallocations and rehashes.
    parts.headers.reserve(2);
    let trusted = ctx
        .shared
        .limits
        .trust_forwarded_for
        .iter()
        .any(|net| net.contains(ctx.client.ip()));
    headers::set_forwarded_for(&mut parts.headers, &ctx.client_ip, trusted, &fields);
    let fresh_id = headers::ensure_request_id(&mut parts.headers, &fields, completion.log.is_some());
    if let Some(log) = completion.log.as_mut() {
        log.request_id = fresh_id.or_else(|| parts.headers.get(&headers::X_REQUEST_ID).cloned());
        log.authority = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
    }
    let host = set_authority_known(&mut parts, h2, fields.host);
    // Tracing off: one load and one branch. On: this hop's `traceparent` for the next.
    if let Some(tracer) = crate::telemetry::trace::tracer() {
        let direction = ctx.listener.direction;
        completion.trace = tracer.begin(&mut parts.headers, direction, completion.start, &parts.method, &path);
    }
    Ok(Prepared {
        parts,
        path,
        upgrade,
        on_upgrade,
        host,
    })
}

/// Removes the request's `x-vmesh-*` headers but those vmesh reads: the colour header and the
/// headers `[colour] propagate` carries (a caller's colour is honoured by design, and is how a
/// lane crosses hops). The others (`x-vmesh-error`, `x-vmesh-fallback`, any other name) mean
/// nothing in a request, and an app must not take them for the proxy's word.
fn strip_vmesh(ctx: &ConnCtx, h: &mut http::HeaderMap) {
    let table = ctx.shared.routes.load();
    match table.colouring.as_deref() {
        // `propagate` starts with the colour header.
        Some(c) => headers::strip_vmesh(h, |n| c.propagate.contains(n)),
        None => headers::strip_vmesh(h, |n| *n == DEFAULT_HEADER),
    }
}

/// HTTP/2 carries the authority in `:authority`; a `host` header beside it is a duplicate
/// that servers such as nginx reject. HTTP/1.1 needs `Host`. Returns whether the head has a
/// `Host` field now.
pub fn set_authority(parts: &mut Parts, h2: bool) -> bool {
    let host = parts.headers.contains_key(header::HOST);
    set_authority_known(parts, h2, host)
}

/// [`set_authority`] when whether the head has a `Host` field (`host`) is known.
fn set_authority_known(parts: &mut Parts, h2: bool, host: bool) -> bool {
    if h2 {
        if host {
            parts.headers.remove(header::HOST);
        }
        return false;
    }
    if host {
        return true;
    }
    match parts
        .uri
        .authority()
        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
    {
        Some(a) => {
            parts.headers.insert(header::HOST, a);
            true
        }
        None => false,
    }
}

/// The body: empty and small bodies can be replayed for a retry; others stream once. Either
/// way the client has until `body_deadline` (`proxy.request_body_timeout` after the
/// request's arrival) to send it all.
#[allow(clippy::too_many_arguments)] // the body's inputs, each used once
pub async fn body(
    body: ClientBody,
    headers: &http::HeaderMap,
    retries: u32,
    retry_buffer: u64,
    upgrade: bool,
    deadline: Instant,
    body_deadline: Instant,
    activity: &Arc<ConnActivity>,
    completion: &mut Completion,
) -> Result<RequestBody, ProxyError> {
    let body = if body.is_end_stream() {
        RequestBody::empty()
    } else if !upgrade
        // A known, small length is a finite body (gRPC streams never declare one): buffering it
        // lets a refused connection be retried, and an early error answer the whole request.
        && retries > 0
        && content_length(headers).is_some_and(|n| n <= retry_buffer)
    {
        let stream = StreamBody::new(body, None, body_deadline, activity);
        match tokio::time::timeout_at(deadline.min(body_deadline).into(), stream.collect()).await {
            Ok(Ok(collected)) => RequestBody::Buffered(Some(collected.to_bytes())),
            Ok(Err(e)) if is_body_timeout(e.as_ref()) => return Err(ProxyError::RequestBodyTimeout),
            Ok(Err(_)) => return Err(ProxyError::BodyError),
            Err(_) if body_deadline <= deadline => return Err(ProxyError::RequestBodyTimeout),
            Err(_) => return Err(ProxyError::Timeout),
        }
    } else {
        let counter = completion.log.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
        if let (Some(log), Some(c)) = (completion.log.as_mut(), &counter) {
            log.received = Received::Counted(c.clone());
        }
        RequestBody::stream(StreamBody::new(body, counter, body_deadline, activity))
    };
    if let (Some(log), RequestBody::Buffered(b)) = (completion.log.as_mut(), &body) {
        log.received = Received::Known(b.as_ref().map_or(0, |b| b.len() as u64));
    }
    Ok(body)
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
