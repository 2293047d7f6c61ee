//! Plain TCP forwarding: pick an endpoint (retrying connect failures on another one; each try
//! recorded by the same record stage as HTTP), then copy bytes both ways until either side
//! closes or the connection idles out.

use std::net::SocketAddr;
use std::time::Instant;

use tokio::net::TcpStream;

use super::error::ProxyError;
use super::record;
use super::{DrainWatch, ListenerCtx, Shared};
use crate::balance::PickCtx;
use crate::resilience::TryOutcome;

pub async fn proxy(
    mut client: TcpStream,
    peer: SocketAddr,
    shared: &Shared,
    listener: &ListenerCtx,
    _drain: DrainWatch,
) {
    let Some(cluster) = listener.cluster(&shared.routes.load(), None) else {
        return;
    };
    // The breaker's `max_connections` bounds TCP connections to the service; an open breaker
    // refuses new ones too, and whether an endpoint accepts feeds its error rate.
    let (_slot, admitted) = match &cluster.breaker {
        Some(b) => match b.connection().and_then(|slot| Ok((slot, b.admit(Instant::now())?))) {
            Ok((slot, g)) => (Some(slot), Some(g)),
            Err(r) => {
                cluster.metrics.proxy_error(r.code());
                cluster.metrics.no_endpoint.count_status(503);
                tracing::debug!(client = %peer, service = %cluster.service, code = r.code(), "tcp connection refused by the breaker");
                return;
            }
        },
        None => (None, None),
    };
    let set = cluster.endpoints.load_full();
    let mut exclude = None;
    let mut upstream = None;
    for _ in 0..=cluster.retry.attempts {
        // Uncoloured: a TCP connection carries no colour, so it keeps off test lanes.
        let Some(idx) = set.pick_lane(None, None, PickCtx { hash: None, exclude }) else {
            break;
        };
        let ep = &set.endpoints()[idx];
        let started = Instant::now();
        let outcome = match tokio::time::timeout(cluster.connect_timeout, TcpStream::connect(ep.addr)).await {
            Ok(Ok(s)) => {
                upstream = Some((s, ep.start()));
                TryOutcome::Connected
            }
            Ok(Err(e)) => {
                tracing::debug!(endpoint = %ep.addr, error = %e, "tcp connect failed");
                TryOutcome::ConnectFailed
            }
            Err(_) => {
                tracing::debug!(endpoint = %ep.addr, "tcp connect timed out");
                TryOutcome::Timeout
            }
        };
        let now = Instant::now();
        record::try_ended(&cluster, &set, ep, outcome, now.saturating_duration_since(started), now);
        if upstream.is_some() {
            break;
        }
        exclude = Some(idx);
    }
    if let Some(g) = admitted {
        g.record(upstream.is_some(), Instant::now());
    }
    let Some((mut up, in_flight)) = upstream else {
        let code = ProxyError::ConnectFailed.code();
        cluster.metrics.proxy_error(code);
        // Counted like an HTTP request the proxy failed: one connection, class 5xx.
        cluster.metrics.no_endpoint.count_status(502);
        tracing::debug!(client = %peer, service = %cluster.service, code, "no endpoint accepted the tcp connection");
        return;
    };
    // One connection counts as one request of class 2xx on the endpoint that took it (so the
    // observed split of a shift covers TCP services too).
    in_flight.endpoint().metrics.count_status(200);
    let _in_flight = in_flight;
    let _ = up.set_nodelay(true);
    let idle = shared.limits.idle_timeout.get();
    match super::splice::splice(&mut client, &mut up, idle).await {
        super::splice::End::Closed(Ok(_)) => {}
        super::splice::End::Closed(Err(e)) => {
            tracing::debug!(client = %peer, error = %e, "tcp stream ended with an error");
        }
        super::splice::End::Idle => tracing::debug!(client = %peer, ?idle, "tcp connection idle: closed"),
    }
}
