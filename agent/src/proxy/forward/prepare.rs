//! The prepare stage: the request head rewritten for the next hop (hop-by-hop headers out,
//! `x-forwarded-for` and `x-request-id` in, `Host`/`:authority` for the upstream protocol),
//! and the body made replayable when it is small enough to retry.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Instant;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::Version;
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;

use super::super::body::RequestBody;
use super::super::complete::{Completion, Received};
use super::super::error::ProxyError;
use super::super::{headers, ConnCtx};

/// A request ready to be routed and sent.
pub struct Prepared {
    pub parts: Parts,
    /// Origin-form target (`/path?query`).
    pub path: PathAndQuery,
    pub upgrade: bool,
    pub on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    /// Send `Connection: close` after the response (the agent drains).
    pub close_after: bool,
}

/// Rewrites the head of `parts` for an upstream speaking HTTP/2 (`h2`) or HTTP/1.1.
pub fn head(ctx: &ConnCtx, mut parts: Parts, h2: bool, completion: &mut Completion) -> Result<Prepared, ProxyError> {
    let upgrade = parts.version == Version::HTTP_11 && headers::is_upgrade(&parts.headers);
    // While the agent drains, HTTP/1.1 clients are told to reconnect (to the next agent on
    // the same socket) after this response, instead of finding their connection closed.
    let close_after =
        parts.version <= Version::HTTP_11 && ctx.shared.draining.load(std::sync::atomic::Ordering::Relaxed);
    let path = match parts.uri.path_and_query() {
        Some(p) => p.clone(),
        None if parts.method != http::Method::CONNECT => PathAndQuery::from_static("/"),
        // CONNECT tunnels are not a sidecar's job.
        None => return Err(ProxyError::BadRequest),
    };
    let on_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };
    let te_trailers = headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    if te_trailers && h2 {
        parts.headers.insert(header::TE, HeaderValue::from_static("trailers"));
    }
    parts.headers.remove(header::EXPECT);
    // Room for x-forwarded-for and x-request-id in one step: the map hyper parsed is sized
    // for the headers it found, and growing it twice costs two reallocations and rehashes.
    parts.headers.reserve(2);
    headers::append_forwarded_for(&mut parts.headers, &ctx.client_ip);
    headers::ensure_request_id(&mut parts.headers);
    if let Some(log) = completion.log.as_mut() {
        log.request_id = parts.headers.get(&headers::X_REQUEST_ID).cloned();
        log.authority = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
    }
    set_authority(&mut parts, h2);
    Ok(Prepared {
        parts,
        path,
        upgrade,
        on_upgrade,
        close_after,
    })
}

/// HTTP/2 carries the authority in `:authority`; a `host` header beside it is a duplicate
/// that servers such as nginx reject. HTTP/1.1 needs `Host`.
pub fn set_authority(parts: &mut Parts, h2: bool) {
    if h2 {
        parts.headers.remove(header::HOST);
    } else if !parts.headers.contains_key(header::HOST) {
        if let Some(a) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            parts.headers.insert(header::HOST, a);
        }
    }
}

/// The body: empty and small bodies can be replayed for a retry; others stream once.
pub async fn body(
    body: Incoming,
    headers: &http::HeaderMap,
    retries: u32,
    retry_buffer: u64,
    upgrade: bool,
    deadline: Instant,
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
        match tokio::time::timeout_at(deadline.into(), body.collect()).await {
            Ok(Ok(collected)) => RequestBody::Buffered(Some(collected.to_bytes())),
            Ok(Err(_)) => return Err(ProxyError::BodyError),
            Err(_) => return Err(ProxyError::Timeout),
        }
    } else {
        let counter = completion.log.as_ref().map(|_| Arc::new(AtomicU64::new(0)));
        if let (Some(log), Some(c)) = (completion.log.as_mut(), &counter) {
            log.received = Received::Counted(c.clone());
        }
        RequestBody::Stream(body, counter)
    };
    if let (Some(log), RequestBody::Buffered(b)) = (completion.log.as_mut(), &body) {
        log.received = Received::Known(b.as_ref().map_or(0, |b| b.len() as u64));
    }
    Ok(body)
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}
