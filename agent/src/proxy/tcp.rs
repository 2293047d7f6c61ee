//! Plain TCP forwarding: pick an endpoint (retrying connect failures on another one; each try
//! recorded by the same record stage as HTTP), then copy bytes both ways until either side
//! closes or the connection idles out.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
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
    let activity = Arc::new(Activity::new());
    let mut a = Tracked {
        io: &mut client,
        activity: &activity,
    };
    let mut b = Tracked {
        io: &mut up,
        activity: &activity,
    };
    tokio::select! {
        r = tokio::io::copy_bidirectional(&mut a, &mut b) => {
            if let Err(e) = r {
                tracing::debug!(client = %peer, error = %e, "tcp stream ended with an error");
            }
        }
        () = activity.idle_for(idle) => {
            tracing::debug!(client = %peer, ?idle, "tcp connection idle: closed");
        }
    }
}

/// Last time bytes moved, in milliseconds since the connection started.
struct Activity {
    start: Instant,
    last_ms: AtomicU64,
}

impl Activity {
    fn new() -> Self {
        Self {
            start: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }

    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// Resolves once no byte has moved for `idle`.
    async fn idle_for(&self, idle: Duration) {
        loop {
            let last = self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
            let due = last + idle;
            if Instant::now() >= due {
                return;
            }
            tokio::time::sleep_until(due.into()).await;
        }
    }
}

/// A stream that records activity on every read or write that moved bytes.
struct Tracked<'a> {
    io: &'a mut TcpStream,
    activity: &'a Activity,
}

impl AsyncRead for Tracked<'_> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut *self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        r
    }
}

impl AsyncWrite for Tracked<'_> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.io).poll_write(cx, data);
        if matches!(r, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.io).poll_shutdown(cx)
    }
}
