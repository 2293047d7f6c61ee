//! HTTP/1.1 upstream connections, pooled per endpoint.
//!
//! Each endpoint keeps a stack of idle keep-alive connections (last in, first out: the warm
//! ones are reused, the surplus ages out). A request takes one, or dials a new one; the
//! response body gives it back when the upstream's last byte has been read (a connection whose
//! body was abandoned is closed, never reused). There is no per-request hashing, spawning or
//! boxing: the request path pays one short uncontended lock to pop and one to push.
//!
//! The exchange is `upstream::h1`'s, driven by the request's own task: no connection task and
//! no dispatch channel. A connection the upstream closed while idle is seen when popped
//! (`is_reusable`) and skipped; one it closes just as the request goes out (the keep-alive
//! race) sends the request again, once, on a new connection when the body can be replayed.
//!
//! HTTP/2 clusters use `client.rs` (one multiplexed connection serves every request).
//!
//! An upstream in `mode = "strict"` dials mutual TLS (`tls::connect`, identity checked at the
//! handshake); idle connections remember whether they are TLS, so a reload that changes the
//! mode never reuses a connection of the other kind.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::Response;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::body::{BoxError, RequestBody};
use crate::upstream::h1;
use crate::upstream::h1::HeadRef;

/// An upstream HTTP/1.1 connection (driven in the request's own task, no connection task).
pub type Conn = h1::Conn<Stream>;

/// The body of an HTTP/1.1 upstream response: reads in the caller's task and hands its
/// connection back to the pool after the last byte.
pub type H1Body = h1::ResponseBody<Stream, RequestBody, Return>;

/// The transport of an upstream HTTP/1.1 connection: plain TCP, or mutual TLS.
#[derive(Debug)]
pub enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
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
    /// Whether the connection is mutual TLS.
    tls: bool,
    since: Instant,
}

/// Hands a connection whose response was read to the end back to its endpoint's pool.
#[derive(Debug)]
pub struct Return {
    pool: Arc<ConnPool>,
}

/// Why a request could not be sent.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// No connection could be made (refused, unreachable, connect timeout).
    #[error("connect: {0}")]
    Connect(std::io::Error),
    /// The connection failed while the request was on it (reset, closed, bad response).
    #[error("{0}")]
    Http(h1::Error),
    /// A new connection was needed and the dial gate (the breaker's `max_pending_requests`)
    /// refused it.
    #[error("{0}")]
    Pending(BoxError),
    /// The mutual TLS handshake failed, or the endpoint's certificate names another service.
    #[error("{0}")]
    Tls(crate::tls::ConnectError),
}

/// A limit on requests waiting for a new connection: a cluster's `max_pending_requests`,
/// kept by `resilience::breaker` (this layer does not know it). Asked only when a request must
/// dial; the guard counts the request as pending until it is dropped.
pub trait DialGate {
    type Guard;
    type Refused: std::error::Error + Send + Sync + 'static;
    fn enter(&self) -> Result<Self::Guard, Self::Refused>;
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

    /// Sends a request (`head`, borrowed: encoded at once, kept by the caller for another try,
    /// and `body`) on an idle connection, or a new one, and waits for the response head.
    /// Pooled connections the upstream closed (or sent something on) while idle are skipped.
    /// A pooled connection the upstream closes without a byte of answer (the keep-alive
    /// race) sends the request once more on a new connection, when its body can be replayed
    /// (the head is lent again: no copy is kept for it).
    /// With a `gate`, a request that must dial counts as pending while it dials (Envoy's
    /// `max_pending_requests`: requests waiting for a connection). With `tls` (the service an
    /// mTLS upstream must prove to be), connections are mutual TLS.
    pub async fn send<G: DialGate>(
        self: &Arc<Self>,
        head: HeadRef<'_>,
        body: RequestBody,
        connect_timeout: Duration,
        gate: Option<&G>,
        tls: Option<&Arc<str>>,
    ) -> Result<Response<H1Body>, SendError> {
        let dial = || async {
            let _pending = gate
                .map(|g| g.enter())
                .transpose()
                .map_err(|e| SendError::Pending(e.into()))?;
            self.connect(connect_timeout, tls).await
        };
        let Some(conn) = self.pop(tls.is_some()) else {
            let conn = dial().await?;
            return conn.send_ref(head, body, self.giver()).await.map_err(SendError::Http);
        };
        // The body again for the keep-alive race, when it can be sent again.
        let again = body.replay();
        match conn.send_ref(head, body, self.giver()).await {
            Ok(resp) => Ok(resp),
            Err(e) if e.is_closed_without_answer() => match again {
                Some(body) => {
                    tracing::debug!(upstream = %self.addr, "pooled connection closed unanswered: sent again");
                    let conn = dial().await?;
                    conn.send_ref(head, body, self.giver()).await.map_err(SendError::Http)
                }
                None => Err(SendError::Http(e)),
            },
            Err(e) => Err(SendError::Http(e)),
        }
    }

    fn giver(self: &Arc<Self>) -> Return {
        Return { pool: self.clone() }
    }

    /// Returns a connection whose last response was read to the end.
    pub fn put(self: &Arc<Self>, conn: Conn) {
        let tls = matches!(conn.get_ref(), Stream::Tls(_));
        let Ok(mut idle) = self.idle.lock() else { return };
        if idle.len() >= MAX_IDLE {
            return;
        }
        idle.push(Idle {
            conn,
            tls,
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
        while let Some(mut i) = idle.pop() {
            if i.tls == tls && i.conn.is_reusable() {
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
            return Ok(h1::Conn::new(Stream::Tls(Box::new(tls))));
        }
        Ok(h1::Conn::new(Stream::Plain(stream)))
    }

    /// Closes connections idle for longer than `IDLE_TIMEOUT`; returns how many are left.
    fn expire(&self, now: Instant) -> usize {
        let Ok(mut idle) = self.idle.lock() else { return 0 };
        // The stack is oldest first: the expired ones are a prefix.
        let mut expired = 0;
        for i in idle.iter_mut() {
            if now.duration_since(i.since) < IDLE_TIMEOUT && i.conn.is_reusable() {
                break;
            }
            expired += 1;
        }
        idle.drain(..expired);
        idle.len()
    }
}

impl h1::Recycle<Stream> for Return {
    fn recycle(self, conn: Conn) {
        self.pool.put(conn);
    }
}

impl AsyncRead for Stream {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Self::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_flush(cx),
            Self::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Self::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Self::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
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

    /// Sends a GET to `addr` through `pool` (`Pool::send` with the head lent).
    async fn send_get(
        pool: &Arc<ConnPool>,
        addr: SocketAddr,
        timeout: Duration,
        gate: Option<&Gate>,
        tls: Option<&Arc<str>>,
    ) -> Result<Response<H1Body>, SendError> {
        let (parts, body) = get(addr).into_parts();
        pool.send(HeadRef::of(&parts), body, timeout, gate, tls).await
    }

    /// A dial gate that admits `max` dials at a time.
    struct Gate {
        max: usize,
        now: Arc<std::sync::atomic::AtomicUsize>,
    }

    struct Dialling(Arc<std::sync::atomic::AtomicUsize>);

    impl Drop for Dialling {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    #[derive(Debug, thiserror::Error)]
    #[error("too many dials")]
    struct TooMany;

    impl DialGate for Gate {
        type Guard = Dialling;
        type Refused = TooMany;
        fn enter(&self) -> Result<Dialling, TooMany> {
            if self.now.fetch_add(1, Ordering::SeqCst) < self.max {
                Ok(Dialling(self.now.clone()))
            } else {
                self.now.fetch_sub(1, Ordering::SeqCst);
                Err(TooMany)
            }
        }
    }

    fn get(addr: SocketAddr) -> http::Request<RequestBody> {
        http::Request::builder()
            .uri("/")
            .header("host", addr.to_string())
            .body(RequestBody::empty())
            .unwrap()
    }

    async fn body(resp: Response<H1Body>) -> String {
        use http_body_util::BodyExt;
        String::from_utf8(resp.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
    }

    #[tokio::test]
    async fn a_returned_connection_is_reused() {
        let (addr, conns) = server().await;
        let pool = Arc::new(ConnPool::new(addr));
        for _ in 0..3 {
            let resp = send_get(&pool, addr, Duration::from_secs(1), None, None).await.unwrap();
            assert_eq!(body(resp).await, "conn1");
        }
        assert_eq!(conns.load(Ordering::SeqCst), 1);
        assert_eq!(pool.idle(), 1);
    }

    #[tokio::test]
    async fn a_connection_not_returned_is_not_reused() {
        let (addr, conns) = server().await;
        let pool = Arc::new(ConnPool::new(addr));
        let resp = send_get(&pool, addr, Duration::from_secs(1), None, None).await.unwrap();
        drop(resp);
        let resp = send_get(&pool, addr, Duration::from_secs(1), None, None).await.unwrap();
        assert_eq!(body(resp).await, "conn2");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    /// An upstream that answers one request per connection, then closes it without a word.
    async fn one_shot_server() -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let conns = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counter = conns.clone();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = l.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let mut have = Vec::new();
                    while !have.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(r) => have.extend_from_slice(&buf[..r]),
                        }
                    }
                    let _ = s.write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
                    // Waits for the next request, then closes without answering it.
                    let _ = s.read(&mut buf).await;
                });
            }
        });
        (addr, conns)
    }

    #[tokio::test]
    async fn a_pooled_connection_closed_unanswered_sends_again_on_a_new_one() {
        let (addr, conns) = one_shot_server().await;
        let pool = Arc::new(ConnPool::new(addr));
        let resp = send_get(&pool, addr, Duration::from_secs(1), None, None).await.unwrap();
        assert_eq!(body(resp).await, "ok");
        assert_eq!(pool.idle(), 1);
        let resp = send_get(&pool, addr, Duration::from_secs(1), None, None).await.unwrap();
        assert_eq!(body(resp).await, "ok");
        assert_eq!(conns.load(Ordering::SeqCst), 2);
    }

    #[tokio::test]
    async fn a_refused_connect_is_a_connect_error() {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        drop(l);
        let pool = Arc::new(ConnPool::new(addr));
        let err = send_get(&pool, addr, Duration::from_secs(1), None, None)
            .await
            .unwrap_err();
        assert!(matches!(err, SendError::Connect(_)), "{err:?}");
    }

    #[tokio::test]
    async fn expired_connections_are_closed() {
        let (addr, _) = server().await;
        let pool = Arc::new(ConnPool::new(addr));
        let resp = send_get(&pool, addr, Duration::from_secs(1), None, None).await.unwrap();
        body(resp).await;
        assert_eq!(pool.expire(Instant::now()), 1);
        assert_eq!(pool.expire(Instant::now() + IDLE_TIMEOUT), 0);
        assert_eq!(pool.idle(), 0);
    }

    #[tokio::test]
    async fn a_dial_past_max_pending_is_refused_but_an_idle_connection_is_used() {
        let (addr, _) = server().await;
        let pool = Arc::new(ConnPool::new(addr));
        let breaker = Gate {
            max: 1,
            now: Default::default(),
        };
        // One request is dialling: the next one that must dial is refused...
        let dialling = breaker.enter().unwrap();
        let err = send_get(&pool, addr, Duration::from_secs(1), Some(&breaker), None)
            .await
            .unwrap_err();
        assert!(matches!(err, SendError::Pending(_)), "{err:?}");
        drop(dialling);
        // ...while one that finds an idle connection needs no pending slot.
        let resp = send_get(&pool, addr, Duration::from_secs(1), Some(&breaker), None)
            .await
            .unwrap();
        body(resp).await;
        let _dialling = breaker.enter().unwrap();
        let resp = send_get(&pool, addr, Duration::from_secs(1), Some(&breaker), None)
            .await
            .unwrap();
        assert_eq!(body(resp).await, "conn1");
    }
}
