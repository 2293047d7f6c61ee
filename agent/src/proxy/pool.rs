//! HTTP/1.1 upstream connections, pooled per endpoint.
//!
//! Each endpoint keeps a stack of idle keep-alive connections (last in, first out: the warm
//! ones are reused, the surplus ages out). A request takes one, or dials a new one; the
//! response body gives it back when the upstream's last byte has been read (a connection whose
//! body was abandoned is closed, never reused). There is no per-request hashing, spawning or
//! boxing: the request path pays one short uncontended lock to pop and one to push.
//!
//! HTTP/2 clusters use `client.rs` (one multiplexed connection serves every request).
//!
//! An upstream in `mode = "strict"` dials mutual TLS (`tls::connect`, identity checked at the
//! handshake); idle connections remember whether they are TLS, so a reload that changes the
//! mode never reuses a connection of the other kind.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use http::{Request, Response};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::body::RequestBody;

/// A sender on one upstream HTTP/1.1 connection, and whether it is mutual TLS.
#[derive(Debug)]
pub struct Conn {
    sender: http1::SendRequest<RequestBody>,
    tls: bool,
}

/// Idle connections of one endpoint.
#[derive(Debug)]
pub struct ConnPool {
    addr: SocketAddr,
    idle: Mutex<Vec<Idle>>,
    sweeping: AtomicBool,
}

#[derive(Debug)]
struct Idle {
    conn: Conn,
    since: Instant,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (refused, unreachable, connect timeout).
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The connection failed while the request was on it (reset, closed, bad response).
    #[error("{0}")]
    Http(hyper::Error),
    /// A new connection was needed and the breaker's `max_pending_requests` refused it.
    #[error("{0}")]
    Pending(crate::resilience::breaker::Rejected),
    /// The mutual TLS handshake failed, or the endpoint's certificate names another service.
    #[error("{0}")]
    Tls(crate::tls::ConnectError),
}

/// How long an idle connection is kept before it is closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// The most idle connections kept per endpoint; more are closed when they come back.
pub const MAX_IDLE: usize = 1024;

impl ConnPool {
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            idle: Mutex::new(Vec::new()),
            sweeping: AtomicBool::new(false),
        }
    }

    /// Sends `req` on an idle connection, or a new one. A pooled connection found closed
    /// before the request went out is dropped and the request goes on the next one. With a
    /// `breaker`, a request that must dial counts as pending while it dials (Envoy's
    /// `max_pending_requests`: requests waiting for a connection). With `tls` (the service an
    /// mTLS upstream must prove to be), connections are mutual TLS.
    pub async fn send(
        self: &Arc<Self>,
        mut req: Request<RequestBody>,
        connect_timeout: Duration,
        breaker: Option<&Arc<crate::resilience::breaker::Breaker>>,
        tls: Option<&Arc<str>>,
    ) -> Result<(Response<Incoming>, Conn), SendError> {
        loop {
            let (mut conn, reused) = match self.pop(tls.is_some()) {
                Some(c) => (c, true),
                None => {
                    let _pending = breaker.map(|b| b.pending()).transpose().map_err(SendError::Pending)?;
                    (self.connect(connect_timeout, tls).await?, false)
                }
            };
            if let Err(e) = conn.sender.ready().await {
                if reused {
                    continue;
                }
                // A new connection that closed before its first request: a failed connect.
                return Err(SendError::Connect(std::io::Error::other(e)));
            }
            match conn.sender.try_send_request(req).await {
                Ok(resp) => return Ok((resp, conn)),
                Err(mut e) => match e.take_message() {
                    // Never written: safe to send again on another connection.
                    Some(r) if reused => req = r,
                    _ => return Err(SendError::Http(e.into_error())),
                },
            }
        }
    }

    /// Returns a connection whose last response was read to the end.
    pub fn put(self: &Arc<Self>, conn: Conn) {
        if conn.sender.is_closed() {
            return;
        }
        let Ok(mut idle) = self.idle.lock() else { return };
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push(Idle {
            conn,
            since: Instant::now(),
        });
        drop(idle);
        // The common case (a sweeper runs) costs one load. A body dropped while the runtime
        // shuts down has no runtime to sweep on.
        if !self.sweeping.load(Ordering::Relaxed) {
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                if !self.sweeping.swap(true, Ordering::Relaxed) {
                    rt.spawn(sweep(Arc::downgrade(self)));
                }
            }
        }
    }

    /// Idle connections now.
    pub fn idle(&self) -> usize {
        self.idle.lock().map_or(0, |i| i.len())
    }

    fn pop(&self, tls: bool) -> Option<Conn> {
        let mut idle = self.idle.lock().ok()?;
        while let Some(i) = idle.pop() {
            if !i.conn.sender.is_closed() && i.conn.tls == tls {
                return Some(i.conn);
            }
        }
        None
    }

    async fn connect(&self, timeout: Duration, tls: Option<&Arc<str>>) -> Result<Conn, SendError> {
        let stream = match tokio::time::timeout(timeout, TcpStream::connect(self.addr)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(SendError::Connect(e)),
            Err(_) => {
                return Err(SendError::Connect(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!("connect to {} timed out after {timeout:?}", self.addr),
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        if let Some(service) = tls {
            let tls = crate::tls::connect(stream, self.addr, false, service)
                .await
                .map_err(SendError::Tls)?;
            return self.handshake(tls, true).await;
        }
        self.handshake(stream, false).await
    }

    async fn handshake<S>(&self, stream: S, tls: bool) -> Result<Conn, SendError>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        // Flattened writes, as on the downstream side (see http.rs).
        let (conn, driver) = http1::Builder::new()
            .writev(false)
            .handshake(TokioIo::new(stream))
            .await
            .map_err(SendError::Http)?;
        let addr = self.addr;
        tokio::spawn(async move {
            if let Err(e) = driver.with_upgrades().await {
                tracing::debug!(upstream = %addr, error = %e, "upstream connection error");
            }
        });
        Ok(Conn { sender: conn, tls })
    }

    /// Closes connections idle for longer than `IDLE_TIMEOUT`; returns how many are left.
    fn expire(&self, now: Instant) -> usize {
        let Ok(mut idle) = self.idle.lock() else { return 0 };
        // The stack is oldest first: the expired ones are a prefix.
        let expired = idle
            .iter()
            .take_while(|i| now.duration_since(i.since) >= IDLE_TIMEOUT || i.conn.sender.is_closed())
            .count();
        idle.drain(..expired);
        idle.len()
    }
}

/// Runs while the pool has idle connections, closing those that aged out.
async fn sweep(pool: Weak<ConnPool>) {
    loop {
        tokio::time::sleep(IDLE_TIMEOUT / 4).await;
        let Some(pool) = pool.upgrade() else { return };
        if pool.expire(Instant::now()) == 0 {
            pool.sweeping.store(false, Ordering::Relaxed);
            // A connection put back between the check and the flag starts its own sweep.
            if pool.idle() == 0 || pool.sweeping.swap(true, Ordering::Relaxed) {
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A keep-alive HTTP/1.1 server answering every request with 200 and its connection number.
    async fn server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    loop {
                        let Ok(r) = s.read(&mut buf).await else { return };
                        if r == 0 {
                            return;
                        }
                        have.extend_from_slice(&buf[..r]);
                        while let Some(end) = have.windows(4).position(|w| w == b"\r\n\r\n") {
                            have.drain(..end + 4);
                            let body = format!("conn{n}");
                            let resp = format!("HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}", body.len());
                            if s.write_all(resp.as_bytes()).await.is_err() {
                                return;
                            }
                        }
                    }
                });
            }
        });
        (addr, conns)
    }

    fn get(addr: SocketAddr) -> Request<RequestBody> {
        Request::builder()
            .uri("/")
            .header("host", addr.to_string())
            .body(RequestBody::empty())
            .unwrap()
    }

    async fn body(resp: Response<Incoming>) -> String {
        use http_body_util::BodyExt;
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_returned_connection_is_reused() {
        let (addr, conns) = server().await;
        let pool = Arc::new(ConnPool::new(addr));
        for _ in 0..3 {
            let (resp, conn) = pool.send(get(addr), Duration::from_secs(1), None, None).await.unwrap();
            assert_eq!(body(resp).await, "conn1");
            pool.put(conn);
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn a_connection_not_returned_is_not_reused() {
        let (addr, conns) = server().await;
        let pool = Arc::new(ConnPool::new(addr));
        let (resp, conn) = pool.send(get(addr), Duration::from_secs(1), None, None).await.unwrap();
        drop((resp, conn));
        let (resp, conn) = pool.send(get(addr), Duration::from_secs(1), None, None).await.unwrap();
        assert_eq!(body(resp).await, "conn2");
        pool.put(conn);
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = Arc::new(ConnPool::new(addr));
        let err = pool
            .send(get(addr), Duration::from_secs(1), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    }

    #[tokio::test]
    async fn expired_connections_are_closed() {
        let (addr, _) = server().await;
        let pool = Arc::new(ConnPool::new(addr));
        let (resp, conn) = pool.send(get(addr), Duration::from_secs(1), None, None).await.unwrap();
        body(resp).await;
        pool.put(conn);
        assert_eq!(pool.expire(Instant::now()), 1);
        assert_eq!(pool.expire(Instant::now() + IDLE_TIMEOUT), 0);
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn a_dial_past_max_pending_is_refused_but_an_idle_connection_is_used() {
        let (addr, _) = server().await;
        let pool = Arc::new(ConnPool::new(addr));
        let breaker = crate::resilience::breaker::Breaker::new(&crate::resilience::breaker::BreakerConfig {
            max_pending_requests: 1,
            ..Default::default()
        });
        // One request is dialling: the next one that must dial is refused...
        let dialling = breaker.pending().unwrap();
        let err = pool
            .send(get(addr), Duration::from_secs(1), Some(&breaker), None)
            .await
            .unwrap_err();
        assert!(matches!(err, SendError::Pending(_)), "{err:?}");
        drop(dialling);
        // ...while one that finds an idle connection needs no pending slot.
        let (resp, conn) = pool
            .send(get(addr), Duration::from_secs(1), Some(&breaker), None)
            .await
            .unwrap();
        body(resp).await;
        pool.put(conn);
        let _dialling = breaker.pending().unwrap();
        let (resp, _) = pool
            .send(get(addr), Duration::from_secs(1), Some(&breaker), None)
            .await
            .unwrap();
        assert_eq!(body(resp).await, "conn1");
    }
}
