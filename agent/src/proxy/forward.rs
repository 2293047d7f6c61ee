//! Forwarding one HTTP request to a cluster, as a pipeline of named stages (each in its own
//! file under `forward/`, drawn in docs/request-lifecycle.md):
//!
//! prepare (head, body) -> colour -> route -> fault -> admit (rate limit, adaptive limit,
//! breaker) -> pick (colour lane, canary split, environment shift, locality, balancer) -> try
//! -> record (outlier, EWMA; shared with TCP) -> retry or respond.

mod admit;
mod attempt;
mod authorize;
mod prepare;
mod select;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{self, HeaderValue};
use http::{Request, Response, StatusCode};

use super::body::{ResponseBody, UpstreamBody};
use super::complete::{Completion, LogParts, Received};
use super::downstream::{ClientBody, ClientUpgrade};
use super::error::ProxyError;
use super::headers;
use super::record;
use super::ConnCtx;
use crate::balance::ring_hash_key;
use crate::balance::PickCtx;
use crate::config::Protocol;
use crate::governance::fault::Abort;
use crate::governance::Fallback;
use crate::resilience::TryOutcome;
use crate::route::{Cluster, RouteTable};

/// A request the fault stage resets instead of answering (hyper then closes the HTTP/1.1
/// connection or resets the HTTP/2 stream).
#[derive(Debug)]
pub struct InjectedReset;

impl std::fmt::Display for InjectedReset {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("reset injected by a fault rule")
    }
}

impl std::error::Error for InjectedReset {}

/// Whether a request is gRPC (answered with `grpc-status` on proxy errors).
pub fn is_grpc<B>(req: &Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

/// A completion for a request that ends before reaching a cluster's endpoint.
pub fn early_completion<B>(
    ctx: &ConnCtx,
    req: &Request<B>,
    start: Instant,
    cluster: Option<Arc<Cluster>>,
) -> Completion {
    let mut completion = new_completion(ctx, req, start, cluster);
    if let Some(log) = completion.log.as_mut() {
        log.authority = req.headers().get(header::HOST).cloned();
        log.request_id = req.headers().get(&headers::X_REQUEST_ID).cloned();
    }
    completion
}

/// The completion of a request `forward` serves: the access log's authority and request id
/// are left to the prepare stage, which settles the request id (no lookups twice).
fn new_completion<B>(ctx: &ConnCtx, req: &Request<B>, start: Instant, cluster: Option<Arc<Cluster>>) -> Completion {
    // Captured for the access log, or for a tap attached now whose filter may pass it.
    let capture = ctx.shared.access_log.enabled() || record::tap_wants(cluster.as_deref(), req.uri().path());
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
        trace: None,
        log: capture.then(|| {
            Box::new(LogParts {
                sink: ctx.shared.access_log.clone(),
                wall_start: SystemTime::now(),
                method: req.method().clone(),
                uri: req.uri().clone(),
                authority: None,
                request_id: None,
                client: ctx.client,
                caller: ctx.peer.as_ref().map(|p| p.uri.clone()),
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

/// Answers `err`, or the fallback when one covers it (marked `x-vmesh-fallback: 1`).
fn fail_or_fallback(
    err: ProxyError,
    grpc: bool,
    fallback: Option<&Fallback>,
    mut completion: Completion,
) -> Response<ResponseBody> {
    // A gRPC caller expects length-prefixed protobuf frames and a grpc-status: a configured
    // body cannot be that, so gRPC requests get the gRPC error instead.
    let Some(fb) = fallback.filter(|f| !grpc && f.covers(err.code())) else {
        return fail(err, grpc, completion);
    };
    completion.status = fb.status.as_u16();
    completion.headers_time = completion.start.elapsed();
    completion.set_error(err.code());
    if let Some(c) = &completion.cluster {
        c.metrics.proxy_error(err.code());
        c.metrics.fallbacks.inc();
    }
    let mut r = Response::new(ResponseBody::full(fb.body.clone(), Some(completion)));
    *r.status_mut() = fb.status;
    *r.headers_mut() = fb.headers.clone();
    r
}

/// Forwards `req` to `cluster` (chosen by listener or `Host`; a route rule may send it to
/// another cluster of `table`).
pub async fn forward(
    ctx: &ConnCtx,
    table: &RouteTable,
    cluster: Arc<Cluster>,
    req: Request<ClientBody>,
    start: Instant,
) -> Result<Response<ResponseBody>, InjectedReset> {
    let grpc = is_grpc(&req) || cluster.is_grpc();
    let mut completion = new_completion(ctx, &req, start, Some(cluster.clone()));
    let (parts, body) = req.into_parts();
    let h2 = matches!(cluster.protocol, Protocol::Http2 | Protocol::Grpc);

    // Stage prepare: the head for the next hop.
    let mut p = match prepare::head(ctx, parts, h2, &mut completion) {
        Ok(p) => p,
        Err(e) => return Ok(fail(e, grpc, completion)),
    };

    // Stage authorize (inbound with mTLS): the caller's identity against the rules, then on
    // to the app as `x-vmesh-caller`. Plaintext listeners pay one branch.
    if ctx.peer.is_some() || cluster.authz.is_some() {
        if !authorize::allowed(ctx, &cluster, &p.parts) {
            return Ok(fail(ProxyError::UnauthorizedCaller, grpc, completion));
        }
        authorize::stamp_caller(ctx, &mut p.parts);
    }

    // Stage colour: mark the request (rules, the VM's own colour, headers carried from the
    // inbound request it serves) before routes match, so rules can match the colour.
    let colour = select::colour(ctx, table, &cluster, &mut p.parts);

    // Stage route: the first matching rule of the addressed service.
    let route = select::route(&cluster, &p.parts);
    if let Some(span) = completion.trace.as_mut() {
        span.route = route.as_ref().map(|r| r.name.clone());
        span.colour = select::header_colour(table, &colour, &p.parts);
    }
    let cluster = match route.as_ref().and_then(|r| r.service.as_deref()) {
        Some(s) if *s != *cluster.service => match table.services.get(s) {
            Some(c) => {
                completion.cluster = Some(c.clone());
                let now_h2 = matches!(c.protocol, Protocol::Http2 | Protocol::Grpc);
                if now_h2 != h2 {
                    p.host = prepare::set_authority(&mut p.parts, now_h2);
                }
                c.clone()
            }
            None => return Ok(fail(ProxyError::UnknownService, grpc, completion)),
        },
        _ => cluster,
    };
    let h2 = matches!(cluster.protocol, Protocol::Http2 | Protocol::Grpc);
    let fallback = route
        .as_ref()
        .and_then(|r| r.fallback.as_deref())
        .or(cluster.fallback.as_deref());

    // Stage fault: drills on real traffic.
    if let Some(f) = route.as_ref().and_then(|r| r.fault.as_ref()) {
        let colour = select::header_colour(table, &colour, &p.parts);
        let injected = f.draw(colour.as_ref().map(HeaderValue::as_bytes), fastrand::f64);
        if let Some(d) = injected.delay {
            tokio::time::sleep(d).await;
        }
        match injected.abort {
            Some(Abort::Reset) => {
                cluster.metrics.proxy_error("FAULT_INJECTED");
                // No response: counted and logged with status 0.
                completion.set_error("FAULT_INJECTED");
                completion.headers_time = completion.start.elapsed();
                completion.finish(0);
                return Err(InjectedReset);
            }
            Some(Abort::Status(s)) => return Ok(admit::fault_answer(s, grpc, completion)),
            None => {}
        }
    }

    // Stage admit: rate limits, the adaptive limit, the breaker (on the request's arrival
    // time: no clock read for a service without them).
    let admitted = match admit::admit(&cluster, route.as_deref(), &p.parts, start) {
        Ok(a) => a,
        Err(admit::Refused::RateLimited(wait)) => return Ok(admit::rate_limited(wait, grpc, fallback, completion)),
        Err(admit::Refused::Error(e)) => return Ok(fail_or_fallback(e, grpc, fallback, completion)),
    };

    let timeout = route.as_ref().and_then(|r| r.timeout).unwrap_or(cluster.timeout);
    let per_try_timeout = route
        .as_ref()
        .and_then(|r| r.per_try_timeout)
        .or(cluster.per_try_timeout);
    let retry = route.as_ref().and_then(|r| r.retry.as_ref()).unwrap_or(&cluster.retry);
    let deadline = start + timeout;

    // The body: small ones are buffered so that a retry can replay them.
    let body = match prepare::body(
        body,
        &p.parts.headers,
        retry.attempts,
        cluster.retry_buffer,
        p.upgrade,
        deadline,
        start + ctx.shared.limits.request_body_timeout.get(),
        &ctx.activity,
        &mut completion,
    )
    .await
    {
        Ok(b) => b,
        Err(e) => return Ok(fail(e, grpc, completion)),
    };

    let _request_token = cluster.budget.request();
    let set = cluster.endpoints.load();
    let hash = cluster
        .hash_header
        .as_ref()
        .and_then(|h| p.parts.headers.get(h))
        .map(|v| ring_hash_key(v.as_bytes()));
    let version = route.as_ref().and_then(|r| r.split.as_ref()).map(|s| s.choose());
    // The colour header is read only when the set has colour lanes.
    let colour = if set.is_coloured() {
        select::header_colour(table, &colour, &p.parts)
    } else {
        None
    };
    let lane = select::Lane {
        colour: colour.as_ref().map(HeaderValue::as_bytes),
        version,
    };
    let http_version = if h2 {
        http::Version::HTTP_2
    } else {
        http::Version::HTTP_11
    };
    let mut body = Some(body);
    let mut exclude = None;
    let mut _retry_tokens = None;
    let mut identity_mismatch = false;
    loop {
        completion.attempts += 1;
        // Stage pick.
        let Some(idx) = select::pick(&set, &lane, PickCtx { hash, exclude }) else {
            return Ok(admitted.finish_with_error(fail_or_fallback(
                ProxyError::NoHealthyEndpoint,
                grpc,
                fallback,
                completion,
            )));
        };
        let endpoint = &set.endpoints()[idx];
        let in_flight = endpoint.start();
        let Some(this_body) = body.take() else {
            return Ok(admitted.finish_with_error(fail(ProxyError::BodyError, grpc, completion)));
        };
        let next_body = this_body.replay();
        let may_retry = completion.attempts <= retry.attempts && next_body.is_some();
        let out = attempt::Outgoing {
            parts: &mut p.parts,
            host: p.host,
            version: http_version,
            body: this_body,
            keep: may_retry,
        };

        // Stage try.
        let sent_at = Instant::now();
        if let Some(span) = completion.trace.as_mut() {
            span.sent(sent_at);
        }
        let try_deadline = per_try_timeout.map_or(deadline, |d| (sent_at + d).min(deadline));
        let result = attempt::send(
            &cluster,
            endpoint,
            out,
            &p.path,
            h2,
            try_deadline,
            deadline,
            &mut identity_mismatch,
        )
        .await;
        let answered_at = Instant::now();
        let rtt = answered_at.saturating_duration_since(sent_at);
        completion.upstream_time += rtt;

        // Stage record.
        let outcome = match &result {
            Ok(r) => TryOutcome::Status(r.status().as_u16()),
            Err(o) => *o,
        };
        record::try_ended(&cluster, &set, endpoint, outcome, rtt, answered_at);

        if may_retry && retry.retryable(&p.parts.method, outcome) && answered_at < deadline {
            if let Some(tokens) = admit::retry_tokens(&cluster, &admitted) {
                cluster.metrics.retries.inc();
                _retry_tokens = Some(tokens);
                exclude = Some(idx);
                body = next_body;
                continue;
            }
            cluster.metrics.retries_budget_exhausted.inc();
        }

        completion.endpoint = Some(in_flight);
        let answer = match result {
            Ok(resp) => {
                admitted.finish(resp.status().as_u16(), start, answered_at);
                let tunnel = p.on_upgrade.map(|client| Tunnel {
                    client,
                    idle: ctx.shared.limits.idle_timeout.get(),
                    slot: ctx.activity.clone(),
                });
                respond(resp, completion, tunnel, answered_at)
            }
            // A callee that is not the service asked for is never a fallback's case.
            Err(TryOutcome::ConnectFailed) if identity_mismatch => {
                admitted.finish_with_error(fail(ProxyError::IdentityMismatch, grpc, completion))
            }
            Err(TryOutcome::ConnectFailed) => {
                admitted.finish_with_error(fail_or_fallback(ProxyError::ConnectFailed, grpc, fallback, completion))
            }
            Err(TryOutcome::Refused) => {
                admitted.finish_with_error(fail_or_fallback(ProxyError::CircuitPending, grpc, fallback, completion))
            }
            Err(TryOutcome::ClientBodyTimeout) => {
                admitted.finish_with_error(fail(ProxyError::RequestBodyTimeout, grpc, completion))
            }
            Err(TryOutcome::Timeout | TryOutcome::PerTryTimeout) => {
                admitted.finish_with_error(fail_or_fallback(ProxyError::Timeout, grpc, fallback, completion))
            }
            Err(_) => admitted.finish_with_error(fail_or_fallback(ProxyError::Reset, grpc, fallback, completion)),
        };
        // The request's header map is emptied and kept for the next head this thread parses.
        crate::upstream::maps::give(std::mem::take(&mut p.parts.headers));
        return Ok(answer);
    }
}

/// An upgrade the client asked for, to be joined to the upstream's if it agrees.
struct Tunnel {
    client: ClientUpgrade,
    /// `proxy.idle_timeout`: the tunnel closes after this long without a byte either way.
    idle: std::time::Duration,
    slot: Arc<super::listener::ConnSlot>,
}

/// Shapes the upstream response (its head arrived at `answered_at`) for the client and attaches
/// the completion to its body.
fn respond(
    mut resp: Response<UpstreamBody>,
    mut completion: Completion,
    tunnel: Option<Tunnel>,
    answered_at: Instant,
) -> Response<ResponseBody> {
    completion.status = resp.status().as_u16();
    completion.headers_time = answered_at.saturating_duration_since(completion.start);
    // An HTTP/1.1 upstream's fields stay as they came, in its body: the client's side leaves
    // out the hop-by-hop and `x-vmesh-*` ones as it writes them (`headers::passes`). A 101,
    // whose body is replaced below, and a `Connection` field that names more fields to drop
    // put them into the map for the steps below.
    let switching = resp.status() == StatusCode::SWITCHING_PROTOCOLS;
    if let UpstreamBody::H1(b) = resp.body_mut() {
        if switching || headers::names_more_hop_by_hop(b.fields()) {
            let raw = b.take_fields();
            raw.append_to(resp.headers_mut(), |_, _| true);
        }
    }
    // One pass over the fields; then only vmesh speaks for vmesh: an upstream's
    // `x-vmesh-error` or `x-vmesh-fallback` would pass for the proxy's own answer with
    // clients, dashboards and runbooks that act on it.
    let fields = headers::scan(resp.headers());
    if fields.vmesh {
        headers::strip_vmesh(resp.headers_mut(), |_| false);
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        // The upstream's side of a 101 is the HTTP/1.1 connection, past the response head.
        let upstream = match (tunnel.is_some(), resp.body_mut()) {
            (true, UpstreamBody::H1(b)) => b.take_upgraded(),
            _ => None,
        };
        if let (Some(Tunnel { client, idle, slot }), Some(mut upstream)) = (tunnel, upstream) {
            let in_flight = completion.endpoint.take();
            if let Some(ep) = &in_flight {
                completion.endpoint = Some(ep.endpoint().start());
            }
            tokio::spawn(async move {
                // The tunnel keeps the connection's slot (caps, active count) and its drain
                // watch: shutdown waits for it and closes it.
                let _in_flight = in_flight;
                let mut drain = slot.drain.clone();
                if let Ok(mut client) = client.upgraded().await {
                    // A tunnel (WebSocket) ends when either side closes, after
                    // `proxy.idle_timeout` with no byte either way (as a TCP connection does),
                    // or when the agent shuts down.
                    tokio::select! {
                        end = super::splice::splice(&mut client, &mut upstream, idle) => {
                            if let super::splice::End::Idle = end {
                                tracing::debug!(?idle, "upgrade tunnel idle: closed");
                            }
                        }
                        () = drain.signaled() => tracing::debug!("upgrade tunnel closed: shutting down"),
                    }
                }
                drop(slot);
            });
            let (parts, _) = resp.into_parts();
            return Response::from_parts(parts, ResponseBody::full(bytes::Bytes::new(), Some(completion)));
        }
    }
    let (mut parts, body) = resp.into_parts();
    headers::strip_hop_by_hop(&mut parts.headers, false, &fields);
    Response::from_parts(parts, ResponseBody::upstream(body, Some(completion)))
}
