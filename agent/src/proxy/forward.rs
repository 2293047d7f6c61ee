//! Forwarding one HTTP request to a cluster: pick an endpoint, send with deadlines, retry
//! within the policy and the budget, feed outlier detection and latency, shape the response.

use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use super::body::{RequestBody, ResponseBody};
use super::complete::{Completion, LogParts, Received};
use super::error::ProxyError;
use super::headers;
use super::pool::SendError;
use super::ConnCtx;
use crate::balance::ring_hash_key;
use crate::balance::PickCtx;
use crate::config::Protocol;
use crate::resilience::TryOutcome;
use crate::route::Cluster;

/// Whether a request is gRPC (answered with `grpc-status` on proxy errors).
pub fn is_grpc(req: &Request<Incoming>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A completion for a request that ends before reaching a cluster's endpoint.
pub fn early_completion(
    ctx: &ConnCtx,
    req: &Request<Incoming>,
    start: Instant,
    cluster: Option<Arc<Cluster>>,
) -> Completion {
    Completion {
        start,
        direction: ctx.listener.direction,
        cluster,
        endpoint: None,
        status: 0,
        upstream_time: Duration::ZERO,
        headers_time: Duration::ZERO,
        attempts: 0,
        error: None,
        active: Some(ctx.activity.begin()),
        log: ctx.shared.access_log.enabled().then(|| {
            Box::new(LogParts {
                sink: ctx.shared.access_log.clone(),
                wall_start: SystemTime::now(),
                method: req.method().clone(),
                uri: req.uri().clone(),
                authority: req.headers().get(header::HOST).cloned(),
                request_id: req.headers().get(&headers::X_REQUEST_ID).cloned(),
                client: ctx.client,
                received: Received::Known(0),
            })
        }),
    }
}

/// Answers `err` for a request, recording it like any other response.
pub fn fail(err: ProxyError, grpc: bool, mut completion: Completion) -> Response<ResponseBody> {
    completion.status = if grpc { 200 } else { err.status().as_u16() };
    completion.headers_time = completion.start.elapsed();
    completion.set_error(err.code());
    if let Some(c) = &completion.cluster {
        c.metrics.proxy_error(err.code());
    }
    err.response(grpc, Some(completion))
}

/// Forwards `req` to `cluster`.
pub async fn forward(
    ctx: &ConnCtx,
    cluster: Arc<Cluster>,
    req: Request<Incoming>,
    start: Instant,
) -> Response<ResponseBody> {
    let grpc = is_grpc(&req) || cluster.is_grpc();
    let mut completion = early_completion(ctx, &req, start, Some(cluster.clone()));
    let upgrade = req.version() == Version::HTTP_11 && headers::is_upgrade(req.headers());
    // While the agent drains, HTTP/1.1 clients are told to reconnect (to the next agent on
    // the same socket) after this response, instead of finding their connection closed.
    let close_after =
        req.version() <= Version::HTTP_11 && ctx.shared.draining.load(std::sync::atomic::Ordering::Relaxed);
    let (mut parts, body) = req.into_parts();
    let path = match parts.uri.path_and_query() {
        Some(p) => p.clone(),
        None if parts.method != http::Method::CONNECT => PathAndQuery::from_static("/"),
        // CONNECT tunnels are not a sidecar's job.
        None => return fail(ProxyError::BadRequest, grpc, completion),
    };
    let on_upgrade = if upgrade {
        parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
    } else {
        None
    };

    // Rewrite the request head for the next hop.
    let h2_upstream = matches!(cluster.protocol, Protocol::Http2 | Protocol::Grpc);
    let te_trailers = headers::strip_hop_by_hop(&mut parts.headers, upgrade);
    if te_trailers && h2_upstream {
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
    if h2_upstream {
        // HTTP/2 carries the authority in `:authority`; a `host` header beside it is a
        // duplicate that servers such as nginx reject.
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
    let deadline = start + cluster.timeout;

    // The body: empty and small bodies can be replayed for a retry; others stream once.
    let body = if body.is_end_stream() {
        RequestBody::empty()
    } else if !upgrade
        // A known, small length is a finite body (gRPC streams never declare one): buffering it
        // lets a refused connection be retried, and an early error answer the whole request.
        && cluster.retry.attempts > 0
        && content_length(&parts.headers).is_some_and(|n| n <= cluster.retry_buffer)
    {
        match tokio::time::timeout_at(deadline.into(), body.collect()).await {
            Ok(Ok(collected)) => RequestBody::Buffered(Some(collected.to_bytes())),
            Ok(Err(_)) => return fail(ProxyError::BodyError, grpc, completion),
            Err(_) => return fail(ProxyError::Timeout, grpc, completion),
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

    let _request_token = cluster.budget.request();
    let set = cluster.endpoints.load();
    let hash = cluster
        .hash_header
        .as_ref()
        .and_then(|h| parts.headers.get(h))
        .map(|v| ring_hash_key(v.as_bytes()));
    let version = if h2_upstream { Version::HTTP_2 } else { Version::HTTP_11 };
    let mut body = Some(body);
    let mut exclude = None;
    let mut _retry_token = None;
    loop {
        completion.attempts += 1;
        let Some(idx) = set.pick(PickCtx { hash, exclude }) else {
            return fail(ProxyError::NoHealthyEndpoint, grpc, completion);
        };
        let endpoint = &set.endpoints()[idx];
        let in_flight = endpoint.start();
        let Some(this_body) = body.take() else {
            return fail(ProxyError::BodyError, grpc, completion);
        };
        let next_body = this_body.replay();
        let may_retry = completion.attempts <= cluster.retry.attempts && next_body.is_some();
        let head = if may_retry {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let mut upstream_req = Request::new(this_body);
        *upstream_req.method_mut() = parts.method.clone();
        *upstream_req.version_mut() = version;
        *upstream_req.headers_mut() = head;

        let now = Instant::now();
        let try_deadline = cluster.per_try_timeout.map_or(deadline, |d| (now + d).min(deadline));
        let sent = if h2_upstream {
            // One multiplexed connection per endpoint, from the cluster's HTTP/2 client.
            *upstream_req.uri_mut() = upstream_uri(&endpoint.authority, &path);
            tokio::time::timeout_at(try_deadline.into(), cluster.client.request(upstream_req))
                .await
                .map(|r| match r {
                    Ok(resp) => Ok((resp, None)),
                    Err(e) => {
                        tracing::debug!(upstream = %endpoint.addr, error = %e, "upstream try failed");
                        Err(if e.is_connect() {
                            TryOutcome::ConnectFailed
                        } else {
                            TryOutcome::Reset
                        })
                    }
                })
        } else {
            // HTTP/1.1: origin-form target on a pooled keep-alive connection.
            *upstream_req.uri_mut() = Uri::from(path.clone());
            if !upstream_req.headers().contains_key(header::HOST) {
                if let Ok(h) = HeaderValue::from_str(endpoint.authority.as_str()) {
                    upstream_req.headers_mut().insert(header::HOST, h);
                }
            }
            tokio::time::timeout_at(
                try_deadline.into(),
                endpoint.pool.send(upstream_req, cluster.connect_timeout),
            )
            .await
            .map(|r| match r {
                Ok((resp, conn)) => Ok((resp, Some(conn))),
                Err(e) => {
                    tracing::debug!(upstream = %endpoint.addr, error = %e, "upstream try failed");
                    Err(match e {
                        SendError::Connect(_) => TryOutcome::ConnectFailed,
                        SendError::Http(_) => TryOutcome::Reset,
                    })
                }
            })
        };
        let rtt = now.elapsed();
        completion.upstream_time += rtt;

        let result = match sent {
            Ok(r) => r,
            Err(_) if try_deadline < deadline => Err(TryOutcome::PerTryTimeout),
            Err(_) => Err(TryOutcome::Timeout),
        };
        let status = result.as_ref().ok().map(|(r, _)| r.status().as_u16());
        if status.is_some() {
            endpoint.stats.observe_rtt(rtt);
        }
        if !matches!(result, Err(TryOutcome::Timeout | TryOutcome::PerTryTimeout)) {
            let failed = crate::resilience::Outlier::is_failure(status);
            if let Some(d) = cluster.outlier.record(&set, endpoint, failed) {
                cluster.metrics.ejections.inc();
                tracing::warn!(service = %cluster.service, endpoint = %endpoint.addr, ejected_for = ?d, "outlier ejected");
            }
        }
        let outcome = status.map_or_else(
            || result.as_ref().err().copied().unwrap_or(TryOutcome::Reset),
            TryOutcome::Status,
        );
        if may_retry && Instant::now() < deadline && cluster.retry.retryable(&parts.method, outcome) {
            if let Some(token) = cluster.budget.try_retry() {
                cluster.metrics.retries.inc();
                _retry_token = Some(token);
                exclude = Some(idx);
                body = next_body;
                continue;
            }
            cluster.metrics.retries_budget_exhausted.inc();
        }

        completion.endpoint = Some(in_flight);
        return match result {
            Ok((resp, conn)) => respond(resp, conn, completion, on_upgrade, close_after),
            Err(TryOutcome::ConnectFailed) => fail(ProxyError::ConnectFailed, grpc, completion),
            Err(TryOutcome::Timeout | TryOutcome::PerTryTimeout) => fail(ProxyError::Timeout, grpc, completion),
            Err(_) => fail(ProxyError::Reset, grpc, completion),
        };
    }
}

fn upstream_uri(authority: &http::uri::Authority, path: &PathAndQuery) -> Uri {
    let mut p = http::uri::Parts::default();
    p.scheme = Some(Scheme::HTTP);
    p.authority = Some(authority.clone());
    p.path_and_query = Some(path.clone());
    // Scheme, authority and path are all present and valid.
    Uri::from_parts(p).unwrap_or_default()
}

fn content_length(h: &http::HeaderMap) -> Option<u64> {
    h.get(header::CONTENT_LENGTH)?.to_str().ok()?.parse().ok()
}

/// Shapes the upstream response for the client and attaches the completion to its body.
fn respond(
    mut resp: Response<Incoming>,
    conn: Option<super::pool::Conn>,
    mut completion: Completion,
    on_upgrade: Option<hyper::upgrade::OnUpgrade>,
    close_after: bool,
) -> Response<ResponseBody> {
    completion.status = resp.status().as_u16();
    completion.headers_time = completion.start.elapsed();
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(client) = on_upgrade {
            let upstream = hyper::upgrade::on(&mut resp);
            let in_flight = completion.endpoint.take();
            if let Some(ep) = &in_flight {
                completion.endpoint = Some(ep.endpoint().start());
            }
            tokio::spawn(async move {
                let _in_flight = in_flight;
                if let (Ok(client), Ok(upstream)) = tokio::join!(client, upstream) {
                    let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(client), &mut TokioIo::new(upstream)).await;
                }
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, ResponseBody::full(bytes::Bytes::new(), Some(completion)));
        }
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false);
    if close_after {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Response::from_parts(parts, ResponseBody::upstream(body, Some(completion), conn))
}
