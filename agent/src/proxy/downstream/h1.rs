//! One HTTP/1.1 client connection: read a head, run the request, write the response, again.
//!
//! The connection's task does it all; there is no second task and no channel. Between
//! requests it holds no buffer: it waits for the socket to become readable, then takes a read
//! buffer from the thread's pool, and gives it back (with the write buffer) once a response is
//! out and nothing more is buffered. A request body takes the read side with it while it is
//! read (`body.rs`) and puts it back on its last byte.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use tokio::io::AsyncWriteExt;

use super::body::{ClientBody, H1Body, Return};
use super::io::{ReadHalf, ReadSide, Transport, Upgraded, WriteHalf};
use super::request::{Framing, HeadError, HeadParser, RequestHead};
use super::response::{self, Answering, Out};
use super::watch::{End, Watch};
use crate::proxy::body::ResponseBody;
use crate::proxy::forward::InjectedReset;
use crate::proxy::ConnCtx;

/// What runs each request (held by value: a unit struct costs the connection nothing).
pub trait Handle: Send + Sync {
    fn call<'a>(
        &'a self,
        ctx: &'a ConnCtx,
        req: Request<ClientBody>,
    ) -> impl Future<Output = Result<Response<ResponseBody>, InjectedReset>> + Send + 'a;
}

/// The client's side of an upgrade (WebSocket): the connection once the 101 is out. (Shared and
/// taken once: request extensions must be `Clone`.)
#[derive(Clone)]
pub struct ClientUpgrade(Arc<std::sync::Mutex<Option<tokio::sync::oneshot::Receiver<Upgraded>>>>);

impl ClientUpgrade {
    /// The client's connection after the 101; an error if no 101 went out.
    pub async fn upgraded(self) -> Result<Upgraded, tokio::sync::oneshot::error::RecvError> {
        let rx = self.0.lock().ok().and_then(|mut r| r.take());
        match rx {
            Some(rx) => rx.await,
            None => {
                // Already taken: behave as a closed channel.
                let (_, rx) = tokio::sync::oneshot::channel();
                rx.await
            }
        }
    }
}

/// A lingering close (after a refused head or an answer given before the request body was read)
/// reads and drops what the client still sends until it stops for `LINGER_QUIET`, at most
/// `LINGER_TOTAL` and `LINGER_BYTES` in all (nginx: `lingering_timeout` 5 s, `lingering_time`
/// 30 s; shorter here, a sidecar's clients are local).
const LINGER_QUIET: std::time::Duration = std::time::Duration::from_secs(1);
const LINGER_TOTAL: std::time::Duration = std::time::Duration::from_secs(5);
const LINGER_BYTES: usize = 1 << 20;

/// Above this much, the write buffer goes out before more of the body is added to it.
const WRITE_HIGH: usize = 64 * 1024;

/// Serves HTTP/1.1 on `io` (with `prefix`, bytes already read from it) until the client closes,
/// a request asks to close, a timeout, the agent's drain, or an error, or until the connection
/// parks (idle for `proxy.idle_park_after` with nothing buffered: the TCP stream comes back, for
/// `park.rs`). `handle` runs each request. The connection's watches (`watch.rs`: header read,
/// idle and stall timeouts, drain, parking) run in the same future, on one timer; the first head
/// is due `proxy.header_read_timeout` after serving began (`ConnCtx::opened`, after a TLS
/// handshake; for a resumed connection, when it began to wait before it parked).
pub fn serve<'a, T, H>(
    io: T,
    prefix: BytesMut,
    ctx: &'a ConnCtx,
    handle: H,
) -> impl Future<Output = Option<Parking>> + Send + 'a
where
    T: Transport,
    H: Handle + 'a,
{
    // The connection is set up here, outside the future: the future holds the connection
    // once (borrowed in place by `run`), not also the transport and the bytes it was made from.
    let (read, write) = io.split();
    let mut conn = Conn {
        ctx,
        read: Some(ReadSide::new(read, prefix)),
        write: Some(write),
        client_gate: super::wake_gate::WakeGate::new(),
        unfinished: false,
        out: Vec::new(),
        parser: HeadParser::default(),
        home: None,
    };
    async move { conn.run(handle).await }
}

/// A connection that parks: its stream, when its next head is due, when it closes if the client
/// sends nothing (`header_read_timeout` or `idle_timeout`, whichever is first), and since when it
/// has had no request.
pub struct Parking {
    pub stream: tokio::net::TcpStream,
    pub head_due: Instant,
    pub close_at: Instant,
    pub idle_since: Instant,
}

struct Conn<'c, W> {
    ctx: &'c ConnCtx,
    /// `None` while a request body holds it, or once it is gone (the connection closes).
    read: Option<ReadSide>,
    /// `None` once handed to an upgrade tunnel.
    write: Option<W>,
    /// Filters the wakes of the client watch during a request (`client_gone`).
    client_gate: super::wake_gate::WakeGate,
    /// The read side came back from a request body dropped before its end: the connection
    /// only drains it before closing.
    unfinished: bool,
    out: Vec<u8>,
    parser: HeadParser,
    /// Where request bodies put the read side back; made at the first request with a body.
    home: Option<Arc<Return>>,
}

/// How waiting for a head ended without one.
enum NoHead {
    /// The client closed, or the connection cannot read any more.
    Closed,
    /// `proxy.header_read_timeout` passed: counted, and a head begun is answered 408.
    TimedOut,
    /// The watch ended the connection (idle, drained).
    Ended,
    /// Idle for `proxy.idle_park_after` with nothing buffered: the connection parks.
    Park,
    Refused(HeadError),
}

impl<'c, W: WriteHalf> Conn<'c, W> {
    async fn run<H>(&mut self, handle: H) -> Option<Parking>
    where
        H: Handle,
    {
        let mut watch = std::pin::pin!(Watch::new(self.ctx));
        // Whether a head was read on this connection (one that parked was, after a request).
        let mut served = self.ctx.activity.parked_once();
        // The first head's time counts from when serving began (the version detection waited
        // for its first bytes; a TLS handshake before it had its own time), not again from
        // zero; a resumed connection's from when it began to wait, before it parked. (Each
        // later head's is set after the response before it. What is kept across the awaits
        // below is part of every idle connection's future: the deadlines live in the watch.)
        let first = self.ctx.opened + self.ctx.shared.limits.header_read_timeout.get();
        watch.as_mut().head_due(Some(first), None);
        'heads: loop {
            // Boxed, one allocation per request: what a request needs while it runs (the
            // handler's whole state) is not part of an idle connection's future. (The head goes
            // into it at once, and no await follows in the match: a head in a local or a
            // match's scrutinee across an await would be part of it.)
            let no_head = 'served: {
                let ctx = self.ctx;
                // Only between requests.
                let parkable = served && self.park_after().is_some();
                let exchange = match poll_fn(|cx| self.poll_head(cx, watch.as_mut(), parkable)).await {
                    Ok(head) => Box::pin(self.exchange(head, &handle)),
                    Err(no) => break 'served no,
                };
                watch.as_mut().head_due(None, None);
                served = true;
                let next = guarded(watch.as_mut(), ctx, exchange).await;
                match next {
                    Some(Next::KeepAlive) => {
                        let now = Instant::now();
                        let head_due = now + self.ctx.shared.limits.header_read_timeout.get();
                        let park = self.park_after().map(|d| now + d);
                        watch.as_mut().head_due(Some(head_due), park);
                        continue 'heads;
                    }
                    Some(Next::Close) => {
                        // A request body dropped unread hands the read side back now (its
                        // exchange is over): what the client still sends is read and dropped
                        // for a moment.
                        if self.read.is_none() {
                            self.take_back();
                        }
                        if self.unfinished {
                            guarded(watch.as_mut(), self.ctx, Box::pin(self.linger_close())).await;
                        } else {
                            guarded(watch.as_mut(), self.ctx, Box::pin(self.shut_write())).await;
                        }
                        return None;
                    }
                    Some(Next::Gone) | None => return None,
                }
            };
            // (What the refusal needs is worked out first: nothing of the head's error is
            // kept across the await.)
            let (status, linger) = match no_head {
                NoHead::Closed | NoHead::Ended => return None,
                NoHead::Park => return self.park(watch.head()),
                NoHead::TimedOut => {
                    let begun = self.read.as_ref().is_some_and(|r| !r.buf.is_empty());
                    // A head begun and not finished, or a connection that never sent a whole
                    // request, is counted; a keep-alive connection that stayed idle is not.
                    if begun || !served {
                        self.ctx
                            .shared
                            .metrics
                            .downstream_closed(&self.ctx.listener.name, "header_read_timeout");
                    }
                    if !begun {
                        return None;
                    }
                    (StatusCode::REQUEST_TIMEOUT, false)
                }
                NoHead::Refused(e) => {
                    tracing::debug!(error = %e, "malformed request head: refused");
                    (e.status(), true)
                }
            };
            // The answer and its lingering close run under the other watches only: the head's
            // deadline must not cut the linger short (a reset could destroy the answer).
            watch.as_mut().head_due(None, None);
            guarded(watch.as_mut(), self.ctx, Box::pin(self.refuse(status, linger))).await;
            return None;
        }
    }

    /// How long the connection waits idle before it parks: only a plain TCP connection parks,
    /// and not at all with `proxy.idle_park_after` 0.
    fn park_after(&self) -> Option<std::time::Duration> {
        let d = self.ctx.shared.limits.idle_park_after.get();
        (W::PARKS && !d.is_zero()).then_some(d)
    }

    /// The connection's stream, to park with its head `due`: idle, nothing buffered (the read
    /// buffer and the write buffer are back in the thread's pools).
    fn park(&mut self, head_due: Option<Instant>) -> Option<Parking> {
        let head_due = head_due?;
        let (mut side, write) = (self.read.take()?, self.write.take()?);
        side.release();
        let stream = write.rejoin(side.io)?;
        // Closed when the unparked connection would have been: at its head's deadline, or
        // `proxy.idle_timeout` after its last request, whichever is first.
        let idle = self.ctx.shared.limits.idle_timeout.get();
        let idle_for = self.ctx.activity.idle_for().unwrap_or_default();
        let now = Instant::now();
        let idle_since = now.checked_sub(idle_for).unwrap_or(now);
        let close_at = head_due.min(idle_since + idle);
        Some(Parking {
            stream,
            head_due,
            close_at,
            idle_since,
        })
    }

    /// Reads the next head: from what is buffered (a pipelined request), else from the socket,
    /// before the watch's head deadline (`proxy.header_read_timeout`). (A poll function, not an
    /// async one: an idle connection waits here, and its future holds no more than it needs.)
    fn poll_head(
        &mut self,
        cx: &mut Context<'_>,
        watch: Pin<&mut Watch<'c>>,
        parkable: bool,
    ) -> Poll<Result<RequestHead, NoHead>> {
        let Some(side) = self.read.as_mut() else {
            return Poll::Ready(Err(NoHead::Closed));
        };
        let max_head = usize::try_from(self.ctx.shared.limits.max_header_bytes.0)
            .unwrap_or(usize::MAX)
            .max(8192);
        loop {
            match self.parser.parse(&mut side.buf, max_head) {
                Ok(Some(head)) => return Poll::Ready(Ok(head)),
                Ok(None) => {}
                Err(e) => return Poll::Ready(Err(NoHead::Refused(e))),
            }
            let filled = if side.buf.is_empty() {
                // Idle: no buffer held while the client sends nothing.
                if self.out.capacity() > 0 {
                    super::io::give_out(std::mem::take(&mut self.out));
                }
                match side.poll_wait(cx) {
                    Poll::Ready(Ok(())) => match side.poll_fill(cx) {
                        Poll::Ready(r) => Some(r),
                        Poll::Pending => {
                            side.release();
                            None
                        }
                    },
                    Poll::Ready(Err(_)) => return Poll::Ready(Err(NoHead::Closed)),
                    Poll::Pending => None,
                }
            } else {
                match side.poll_fill(cx) {
                    Poll::Ready(r) => Some(r),
                    Poll::Pending => None,
                }
            };
            match filled {
                Some(Ok(0) | Err(_)) => return Poll::Ready(Err(NoHead::Closed)),
                Some(Ok(_)) => continue,
                None => {}
            }
            let park = parkable && side.buf.is_empty();
            return watch.poll_end(cx, self.ctx, park).map(|end| match end {
                End::HeadTimedOut => Err(NoHead::TimedOut),
                End::Park => Err(NoHead::Park),
                _ => Err(NoHead::Ended),
            });
        }
    }

    /// One request and its response.
    async fn exchange<H>(&mut self, head: RequestHead, handle: &H) -> Next
    where
        H: Handle,
    {
        let RequestHead {
            method,
            uri,
            version,
            headers,
            framing,
            keep_alive,
            expect_continue,
            upgrade,
        } = head;
        let head_request = method == Method::HEAD;
        let has_body = framing != Framing::Empty;
        let body = if has_body {
            let Some(side) = self.read.take() else {
                return Next::Gone;
            };
            let home = self.home.get_or_insert_with(Default::default).clone();
            if expect_continue {
                // A signal left by an earlier request's body must not answer this one's.
                let _ = futures_util::FutureExt::now_or_never(home.continue_wanted.notified());
            }
            ClientBody::H1(Box::new(H1Body::new(side, framing, home, expect_continue)))
        } else {
            ClientBody::Empty
        };
        let mut req = Request::new(body);
        *req.method_mut() = method;
        *req.uri_mut() = uri;
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        let upgrade_tx = upgrade.then(|| {
            let (tx, rx) = tokio::sync::oneshot::channel();
            req.extensions_mut()
                .insert(ClientUpgrade(Arc::new(std::sync::Mutex::new(Some(rx)))));
            tx
        });

        let handler = handle.call(self.ctx, req);
        tokio::pin!(handler);
        let mut continue_sent = !expect_continue;
        // While the request runs with the read side here (no body, as most requests), a client
        // that closes is noticed and the request dropped (its upstream try with it), as hyper's
        // server does; bytes that arrive instead are a pipelined request, kept for later.
        let mut watch_client = self.read.is_some();
        // (Polled only when the socket's readiness wakes it, not at each of the request's wakes.)
        let gate = &self.client_gate;
        gate.arm();
        let resp = loop {
            let home = self.home.as_ref().filter(|_| !continue_sent);
            let read = self.read.as_mut().filter(|_| watch_client);
            tokio::select! {
                biased;
                r = &mut handler => break r,
                () = async { match home { Some(h) => h.continue_wanted.notified().await, None => std::future::pending().await } } => {
                    continue_sent = true;
                    let Some(w) = self.write.as_mut() else { return Next::Gone };
                    if w.write_all(response::CONTINUE).await.is_err() || w.flush().await.is_err() {
                        return Next::Gone;
                    }
                }
                gone = async { match read { Some(side) => poll_fn(|cx| gate.poll(cx, |cx| client_gone(side, cx))).await, None => std::future::pending().await } } => {
                    if gone {
                        tracing::debug!("client closed its connection during the request: dropped");
                        return Next::Gone;
                    }
                    watch_client = false;
                }
            }
        };
        let Ok(resp) = resp else {
            // An injected reset: the connection closes with no answer.
            return Next::Gone;
        };
        let (mut parts, mut body) = resp.into_parts();

        // The request body must have been read to its end for the connection to carry another.
        if has_body && self.read.is_none() {
            self.take_back();
        }
        // (A 101 hands the connection over: its `Connection: upgrade` stays as it is.)
        let switching = parts.status == StatusCode::SWITCHING_PROTOCOLS;
        if (switching && upgrade_tx.is_none()) || (parts.status.is_informational() && !switching) {
            // A 101 to a request that asked for no upgrade, or an interim status as the final
            // answer: nothing a client can follow (hyper's server refused these too).
            tracing::debug!(status = %parts.status, "unusable final status from upstream: 502");
            drop(body);
            Box::pin(self.refuse(StatusCode::BAD_GATEWAY, false)).await;
            return Next::Gone;
        }
        // While the agent drains, every response says `Connection: close` (a request that began
        // before the drain included), so that busy connections end after it.
        let draining = self.ctx.shared.draining.load(std::sync::atomic::Ordering::Relaxed);
        let closing = !switching && (!keep_alive || self.read.is_none() || self.unfinished || draining);
        let answering = Answering {
            head_request,
            version,
            closing,
        };
        let body_len = body.size_hint().exact();
        if self.out.capacity() == 0 {
            self.out = super::io::take_out();
        }
        let (out, closing) = response::encode_head(&mut self.out, &parts, body.upstream_fields(), body_len, answering);
        // The head is written: its map is emptied and kept for the next head this thread parses,
        // and an HTTP/1.1 upstream's fields let go of that connection's read buffer.
        crate::upstream::maps::give(std::mem::take(&mut parts.headers));
        body.drop_upstream_fields();

        if parts.status == StatusCode::SWITCHING_PROTOCOLS {
            return self.upgrade(upgrade_tx, body).await;
        }
        let complete = match out {
            Out::None => {
                let written = self.flush_out().await;
                drop(body);
                if !written {
                    return Next::Gone;
                }
                true
            }
            Out::Framed(mut encoder) => match self.write_body(&mut body, |data, dst| encoder.encode(data, dst)).await {
                Ok(()) => {
                    let ended = encoder.finish(&mut self.out).is_ok();
                    if !self.flush_out().await {
                        return Next::Gone;
                    }
                    ended
                }
                Err(()) => return Next::Gone,
            },
            Out::Close => {
                let r = self
                    .write_body(&mut body, |mut data, dst| {
                        while data.has_remaining() {
                            let c = data.chunk();
                            dst.extend_from_slice(c);
                            let n = c.len();
                            data.advance(n);
                        }
                    })
                    .await;
                let _ = self.flush_out().await;
                drop(body);
                return if r.is_ok() { Next::Close } else { Next::Gone };
            }
        };
        if !complete {
            // The body ended short of its Content-Length: the client must not read on.
            return Next::Gone;
        }
        // `closing` covers a request body not read to its end when the head went out, and the
        // agent's drain (the request path answers `Connection: close` then). A connection is
        // never closed after a response that did not say so: the client may have sent its next
        // request already.
        if closing {
            Next::Close
        } else {
            Next::KeepAlive
        }
    }

    /// Writes the body's frames after the head in the write buffer: frames that are ready are
    /// gathered into one write; the buffer goes out when the body has nothing ready.
    async fn write_body(
        &mut self,
        body: &mut ResponseBody,
        mut encode: impl FnMut(Bytes, &mut Vec<u8>),
    ) -> Result<(), ()> {
        enum Next {
            Frame(Option<Result<Frame<Bytes>, crate::proxy::body::BoxError>>),
            Flush,
        }
        loop {
            let pending_out = !self.out.is_empty();
            let next = poll_fn(|cx| match Pin::new(&mut *body).poll_frame(cx) {
                Poll::Pending if pending_out => Poll::Ready(Next::Flush),
                Poll::Pending => Poll::Pending,
                Poll::Ready(f) => Poll::Ready(Next::Frame(f)),
            })
            .await;
            match next {
                Next::Flush => {
                    if !self.flush_out().await {
                        return Err(());
                    }
                }
                Next::Frame(None) => return Ok(()),
                Next::Frame(Some(Ok(frame))) => {
                    if let Ok(data) = frame.into_data() {
                        encode(data, &mut self.out);
                        if self.out.len() >= WRITE_HIGH && !self.flush_out().await {
                            return Err(());
                        }
                    }
                    // Trailers: not sent to HTTP/1.1 clients (hyper's default).
                }
                Next::Frame(Some(Err(e))) => {
                    // The upstream failed mid-body: what was sent stays sent, and the client
                    // sees the connection close before the body's end.
                    tracing::debug!(error = %e, "response body failed: closing the client connection");
                    let _ = self.flush_out().await;
                    return Err(());
                }
            }
        }
    }

    /// Writes out the write buffer; `false` when the client is gone.
    async fn flush_out(&mut self) -> bool {
        if self.out.is_empty() {
            return true;
        }
        let ok = match self.write.as_mut() {
            Some(w) => w.write_all(&self.out).await.is_ok() && w.flush().await.is_ok(),
            None => false,
        };
        self.out.clear();
        ok
    }

    /// A 101 to an upgrade request: the head goes out, then the connection goes to the tunnel.
    async fn upgrade(&mut self, tx: Option<tokio::sync::oneshot::Sender<Upgraded>>, body: ResponseBody) -> Next {
        let written = self.flush_out().await;
        drop(body);
        let (Some(tx), true) = (tx, written) else {
            return Next::Gone;
        };
        let Some(side) = self.read.take() else {
            return Next::Gone;
        };
        // The write half moves to the tunnel.
        match self.write.take() {
            Some(w) => {
                let _ = tx.send(Upgraded::new(side, Box::pin(w)));
            }
            None => return Next::Gone,
        }
        Next::Gone
    }

    /// Takes the read side back from the request body: `read` again when the body was read to
    /// its end; else kept only to drain before closing (`unfinished`).
    fn take_back(&mut self) {
        match self.home.as_ref().and_then(|h| h.take()) {
            Some((side, true)) => self.read = Some(side),
            Some((side, false)) => {
                self.read = Some(side);
                self.unfinished = true;
            }
            None => {}
        }
    }

    // The ends of a connection are boxed (allocated when they happen): the connection's own
    // future, which every idle connection holds, stays the size of reading heads.

    /// Answers `status` to a head that will not be served and closes; `linger`: read and drop
    /// what the client still sends for a moment first ([`Conn::linger_close`]).
    async fn refuse(&mut self, status: StatusCode, linger: bool) {
        self.out.clear();
        self.out.extend_from_slice(&response::refusal(status));
        self.flush_out().await;
        if linger {
            self.linger_close().await;
        }
    }

    /// Shuts the write side (FIN) after a last response.
    async fn shut_write(&mut self) {
        if let Some(w) = self.write.as_mut() {
            let _ = w.shutdown().await;
        }
    }

    /// After a refused head or an answer given before the request body was read: the answer is
    /// out; the write side is shut, and what the client still sends is read and dropped
    /// (bounded: `LINGER_*`), so that the close does not reset the connection before the client
    /// has read the answer.
    async fn linger_close(&mut self) {
        if let Some(w) = self.write.as_mut() {
            let _ = w.shutdown().await;
        }
        let Some(side) = self.read.as_mut() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + LINGER_TOTAL;
        let mut seen = 0usize;
        while seen < LINGER_BYTES {
            side.buf.clear();
            let wait = deadline.min(tokio::time::Instant::now() + LINGER_QUIET);
            match tokio::time::timeout_at(wait, poll_fn(|cx| side.poll_fill(cx))).await {
                Ok(Ok(n)) if n > 0 => seen += n,
                _ => break,
            }
        }
    }
}

/// Runs `fut` (a step of the connection, boxed) under its watch: `None` when the watch ended the
/// connection first. The step is polled first; the watch costs a few loads unless it fired. (A
/// poll function on the two, not an async fn: a busy connection waits here.)
fn guarded<'w, 'c, F: Future + Unpin>(
    mut watch: Pin<&'w mut Watch<'c>>,
    ctx: &'c ConnCtx,
    mut fut: F,
) -> impl Future<Output = Option<F::Output>> + use<'w, 'c, F> {
    poll_fn(move |cx| {
        if let Poll::Ready(out) = Pin::new(&mut fut).poll(cx) {
            return Poll::Ready(Some(out));
        }
        watch.as_mut().poll_end(cx, ctx, false).map(|_| None)
    })
}

/// Watches the client while a request runs: `true` once it closed (or failed), `false` when it
/// sent bytes (a pipelined request, kept in the buffer) or had some buffered already.
fn client_gone(side: &mut ReadSide, cx: &mut std::task::Context<'_>) -> Poll<bool> {
    if !side.buf.is_empty() {
        return Poll::Ready(false);
    }
    // The buffer is kept (not given back to the pool): the request's header values still share
    // it, so the pool could not take it whole, and the next head would need a new one.
    match side.io.poll_ready(cx) {
        Poll::Ready(Ok(())) => {}
        Poll::Ready(Err(_)) => return Poll::Ready(true),
        Poll::Pending => return Poll::Pending,
    }
    match side.poll_fill(cx) {
        Poll::Ready(Ok(0) | Err(_)) => Poll::Ready(true),
        Poll::Ready(Ok(_)) => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    }
}

/// What the connection does after an exchange.
enum Next {
    KeepAlive,
    /// Shut the write side (FIN) and end.
    Close,
    /// End now (the client is gone, or the connection was handed over).
    Gone,
}
