//! Serving one downstream HTTP connection (HTTP/1.1 or HTTP/2 prior knowledge, detected per
//! connection) and routing each request to its cluster.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::BytesMut;
use http::{header, Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;

use super::body::{fields_into_map, ResponseBody};
use super::downstream::io::{Prefixed, Transport};
use super::downstream::watch::DRAIN_LINGER;
use super::downstream::{self, ClientBody};
use super::error::ProxyError;
use super::forward::{early_completion, fail, forward, is_grpc, InjectedReset};
use super::ConnCtx;
use crate::config::ProxyConfig;

/// The connection builder for downstream HTTP, with the configured limits.
pub fn server_builder(limits: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1()
        .timer(TokioTimer::new())
        // One buffer per write: a head and a small body in one `write` (~3% fewer instructions
        // per request than hyper's vectored queue, by callgrind); big bodies cost a memcpy.
        .writev(false)
        // Also bounds the idle time between keep-alive requests.
        .header_read_timeout(limits.header_read_timeout.get())
        .max_buf_size(
            usize::try_from(limits.max_header_bytes.0)
                .unwrap_or(usize::MAX)
                .max(8192),
        )
        .keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.h2_max_concurrent_streams)
        .max_pending_accept_reset_streams(limits.h2_max_pending_reset_streams)
        .max_local_error_reset_streams(Some(1024))
        .max_header_list_size(u32::try_from(limits.max_header_bytes.0).unwrap_or(u32::MAX))
        // hyper's default is 400 KiB per stream: a client that never reads (or opens a zero
        // window) would hold that much per stream until the stall watch closes it.
        .max_send_buf_size(usize::try_from(limits.h2_max_send_buffer.0).unwrap_or(64 << 10))
        .keep_alive_interval(Some(limits.idle_timeout.get() / 2))
        .keep_alive_timeout(std::time::Duration::from_secs(20));
    b
}

/// Serves `stream` (TCP, or TLS over TCP) until it closes, or until draining has let its
/// in-flight requests finish: HTTP/2 when the client opens with the HTTP/2 preface (hyper's
/// server), HTTP/1.1 otherwise (vmesh's own, `downstream/h1.rs`, with its watches).
///
/// This is (inside the spawned task) the future every idle HTTP/1.1 connection holds: what only
/// the version detection or HTTP/2 needs is boxed, and freed or never made.
pub fn serve<S: Transport>(stream: S, ctx: Arc<ConnCtx>) -> impl Future<Output = ()> + Send {
    // The detection is boxed before the future is made (freed once the version is known), and
    // the future is an async block on what it needs, not an async fn: the transport is not kept
    // (as an async fn's argument would be) beside the connection made from it.
    let detect = Box::pin(detect_version(stream, ctx.clone()));
    async move {
        let Some((stream, h2, prefix)) = detect.await else {
            return;
        };
        if h2 {
            // Boxed, as is the HTTP/2 path as a whole: an HTTP/1.1 connection's future stays
            // small.
            Box::pin(serve_h2(stream, prefix, ctx)).await;
            return;
        }
        if let Some(p) = downstream::h1::serve(stream, prefix, &ctx, Proxy).await {
            downstream::park::park(p, ctx);
        }
    }
}

/// Serves an HTTP/1.1 connection that was parked (`downstream/park.rs`) again: its context
/// says since when its next head is waited for (`ConnCtx::opened`). It may park again.
pub fn resume(stream: tokio::net::TcpStream, ctx: Arc<ConnCtx>) -> impl Future<Output = ()> + Send {
    // Boxed until the connection is made from it: a stream the future captured would stay in
    // it, beside the connection (the future every resumed connection holds while idle).
    let stream = Box::new(stream);
    async move {
        if let Some(p) = downstream::h1::serve(*stream, BytesMut::new(), &ctx, Proxy).await {
            downstream::park::park(p, ctx);
        }
    }
}

/// The version: the HTTP/2 preface, or anything else (HTTP/1.1), within the head timeout; the
/// stream comes back with the bytes read. `None`: the client closed, failed or sent nothing in
/// time (counted), or the agent drained.
async fn detect_version<S: Transport>(mut stream: S, ctx: Arc<ConnCtx>) -> Option<(S, bool, BytesMut)> {
    let head_timeout = ctx.shared.limits.header_read_timeout.get();
    let mut drain = ctx.activity.drain.clone();
    let detected = {
        let first = tokio::time::timeout(head_timeout, detect(&mut stream));
        tokio::pin!(first);
        tokio::select! {
            d = &mut first => d,
            // A client that connected just before the agent stopped accepting still gets the
            // drain linger to send its request (answered with `Connection: close`).
            () = drain.signaled() => tokio::time::timeout(DRAIN_LINGER, &mut first).await.ok()?,
        }
    };
    match detected {
        Ok(Ok(Some((h2, prefix)))) => Some((stream, h2, prefix)),
        Ok(Ok(None) | Err(_)) => None,
        Err(_) => {
            tracing::debug!(?head_timeout, "downstream connection sent no request: closing");
            ctx.shared
                .metrics
                .downstream_closed(&ctx.listener.name, "header_read_timeout");
            None
        }
    }
}

/// The HTTP/2 connection, on hyper's server, with the preface already read in `prefix`.
async fn serve_h2<S: Transport>(stream: S, prefix: BytesMut, ctx: Arc<ConnCtx>) {
    let builder = ctx.listener.http.clone();
    let mut drain = ctx.activity.drain.clone();
    let activity = ctx.activity.clone();
    let idle_timeout = ctx.shared.limits.idle_timeout.get();
    let stall_timeout = ctx.shared.limits.stream_idle_timeout.get();
    let shared = ctx.shared.clone();
    let listener = ctx.listener.clone();
    let service = ProxyService(ctx);
    let stream = Prefixed {
        prefix: prefix.freeze(),
        io: stream,
    };
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
    tokio::pin!(conn);
    tokio::select! {
        res = conn.as_mut() => {
            if let Err(e) = res {
                tracing::debug!(error = %e, "downstream connection error");
            }
        }
        () = drain.signaled() => {
            let linger = tokio::time::sleep(DRAIN_LINGER);
            tokio::pin!(linger);
            tokio::select! {
                _ = conn.as_mut() => return,
                () = &mut linger => {}
            }
            conn.as_mut().graceful_shutdown();
            let _ = conn.await;
        }
        quiet = quiet(&activity, idle_timeout, stall_timeout) => match quiet {
            Quiet::Idle => {
                tracing::debug!(?idle_timeout, "downstream connection idle: closing");
                conn.as_mut().graceful_shutdown();
                // An HTTP/2 client that never opens its window keeps finished streams (their
                // answers buffered) from ending: bounded, then dropped.
                if tokio::time::timeout(stall_timeout, conn).await.is_err() {
                    shared.metrics.downstream_closed(&listener.name, "stream_idle_timeout");
                }
            }
            Quiet::Stalled => {
                // Requests are in progress but nothing has moved for a whole period: the
                // client stopped sending its body or stopped reading. Closing the connection
                // (dropping it) frees the stream, its buffers and the upstream connection.
                tracing::debug!(?stall_timeout, "downstream connection stalled: closing");
                activity.stalled.store(true, std::sync::atomic::Ordering::Relaxed);
                shared.metrics.downstream_closed(&listener.name, "stream_idle_timeout");
            }
        }
    }
}

/// The HTTP/2 connection preface.
const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads until the first bytes tell HTTP/2 (the whole preface) from HTTP/1.1 (a byte that
/// differs from it). `None`: the client closed first. The bytes read are returned (and not
/// lost). They are read onto the stack first: a connection that closes or resets before
/// sending anything (a flood, a port scan) never takes a buffer.
async fn detect<S: Transport>(stream: &mut S) -> std::io::Result<Option<(bool, BytesMut)>> {
    use tokio::io::AsyncReadExt;
    let mut first = [0u8; PREFACE.len()];
    let mut got = 0;
    loop {
        let n = stream.read(first.get_mut(got..).unwrap_or_default()).await?;
        if n == 0 {
            return Ok(None);
        }
        got += n;
        let seen = first.get(..got).unwrap_or_default();
        let h2 = got == PREFACE.len() && seen == PREFACE;
        if h2 || seen != PREFACE.get(..got).unwrap_or_default() {
            let mut buf = downstream::io::take_buffer();
            buf.extend_from_slice(seen);
            return Ok(Some((h2, buf)));
        }
    }
}

/// Why an HTTP/2 connection's watch ended.
enum Quiet {
    /// No request in progress for `proxy.idle_timeout`.
    Idle,
    /// Requests in progress, and nothing moved for a whole `proxy.stream_idle_timeout`.
    Stalled,
}

/// Resolves once the connection has had no request in progress for `idle`, or has had
/// requests in progress on which nothing moved for `stall` (found within `stall` to
/// `2 x stall`: one timer per connection, not one per request or per byte).
async fn quiet(activity: &super::ConnActivity, idle: std::time::Duration, stall: std::time::Duration) -> Quiet {
    loop {
        match activity.idle_for() {
            Some(d) if d >= idle => return Quiet::Idle,
            Some(d) => tokio::time::sleep((idle - d).min(stall)).await,
            None => {
                // Requests in progress: looked at again every `idle` at most (the last one may
                // end soon), stalled once nothing moved for a whole `stall`.
                let seen = activity.progress();
                let since = std::time::Instant::now();
                loop {
                    tokio::time::sleep(stall.saturating_sub(since.elapsed()).min(idle)).await;
                    if activity.idle_for().is_some() || activity.progress() != seen {
                        break;
                    }
                    if since.elapsed() >= stall {
                        return Quiet::Stalled;
                    }
                }
            }
        }
    }
}

/// The request path, for the HTTP/1.1 server.
#[derive(Clone, Copy)]
struct Proxy;

impl downstream::h1::Handle for Proxy {
    fn call<'a>(
        &'a self,
        ctx: &'a ConnCtx,
        req: Request<ClientBody>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, InjectedReset>> + Send + 'a {
        handle(ctx, req)
    }
}

#[derive(Clone)]
struct ProxyService(Arc<ConnCtx>);

impl hyper::service::Service<Request<Incoming>> for ProxyService {
    type Response = Response<ResponseBody>;
    /// Only an injected fault resets a request; hyper then closes the HTTP/1.1 connection or
    /// resets the HTTP/2 stream.
    type Error = InjectedReset;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, InjectedReset>> + Send>>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        let ctx = self.0.clone();
        // HTTP/2 sends the fields from the response's map: an HTTP/1.1 upstream's go there.
        Box::pin(async move { handle(&ctx, req.map(ClientBody::H2)).await.map(fields_into_map) })
    }
}

async fn handle(ctx: &ConnCtx, req: Request<ClientBody>) -> Result<Response<ResponseBody>, InjectedReset> {
    let start = Instant::now();
    if ctx.activity.agent_full() {
        ctx.shared.metrics.requests_shed.inc();
        let grpc = is_grpc(&req);
        return Ok(fail(
            ProxyError::AgentOverloaded,
            grpc,
            early_completion(ctx, &req, start, None),
        ));
    }
    // Framing was checked where the request was read: `downstream::request` refuses every
    // Transfer-Encoding but one `chunked` (400, connection closed), and h2 refuses the field as
    // connection-specific.
    let table = ctx.shared.routes.load_full();
    let cluster = {
        let host = req
            .headers()
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .or_else(|| req.uri().host());
        ctx.listener.cluster(&table, host)
    };
    match cluster {
        Some(cluster) => forward(ctx, &table, cluster, req, start).await,
        None => {
            let grpc = is_grpc(&req);
            Ok(fail(
                ProxyError::UnknownService,
                grpc,
                early_completion(ctx, &req, start, None),
            ))
        }
    }
}
