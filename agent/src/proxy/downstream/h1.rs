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
use std::task::Poll;
use std::time::Instant;

use bytes::{Buf, Bytes, BytesMut};
use http::{Method, Request, Response, StatusCode};
use http_body::{Body, Frame};
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::body::{ClientBody, H1Body, Return};
use super::io::{ReadSide, Transport, Upgraded};
use super::request::{Framing, HeadError, HeadParser, RequestHead};
use super::response::{self, Answering, Out};
use crate::proxy::body::ResponseBody;
use crate::proxy::forward::InjectedReset;
use crate::proxy::ConnCtx;

/// What runs each request.
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

/// Serves HTTP/1.1 on `io` (with `prefix`, bytes already read from it since `opened`) until the
/// client closes, a request asks to close, a timeout, or an error. `handle` runs each request.
pub fn serve<'a, T, H>(
    io: T,
    prefix: BytesMut,
    opened: Instant,
    ctx: &'a ConnCtx,
    handle: &'a H,
) -> impl Future<Output = ()> + Send + 'a
where
    T: Transport,
    H: Handle,
{
    // The connection is set up here, outside the future: the future holds the connection
    // once, not also the transport and the bytes it was made from.
    let (read, write) = io.split();
    let conn = Conn {
        ctx,
        read: Some(ReadSide::new(read, prefix)),
        write: Some(write),
        opened: Some(opened),
        client_gate: super::aside::WakeGate::new(),
        unfinished: false,
        out: Vec::new(),
        parser: HeadParser::default(),
        home: None,
        max_head: usize::try_from(ctx.shared.limits.max_header_bytes.0)
            .unwrap_or(usize::MAX)
            .max(8192),
        timer: Box::pin(tokio::time::sleep_until(tokio::time::Instant::now())),
        timer_at: None,
    };
    async move {
        let mut conn = conn;
        conn.run(handle).await;
    }
}

struct Conn<'c, W> {
    ctx: &'c ConnCtx,
    /// `None` while a request body holds it, or once it is gone (the connection closes).
    read: Option<ReadSide>,
    /// `None` once handed to an upgrade tunnel.
    write: Option<W>,
    /// When the connection began waiting for its first bytes; taken by the first head.
    opened: Option<Instant>,
    /// Filters the wakes of the client watch during a request (`client_gone`).
    client_gate: super::aside::WakeGate,
    /// The read side came back from a request body dropped before its end: the connection
    /// only drains it before closing.
    unfinished: bool,
    out: Vec<u8>,
    parser: HeadParser,
    /// Where request bodies put the read side back; made at the first request with a body.
    home: Option<Arc<Return>>,
    max_head: usize,
    /// The header-read deadline of the head being waited for (or of an earlier one).
    timer: Pin<Box<tokio::time::Sleep>>,
    /// The deadline `timer` is armed for; `None` before the first wait.
    timer_at: Option<Instant>,
}

/// How waiting for a head ended without one.
enum NoHead {
    /// The client closed, or the connection cannot read any more.
    Closed,
    /// `proxy.header_read_timeout` passed: counted, and a head begun is answered 408.
    TimedOut,
    Refused(HeadError),
}

impl<W: AsyncWrite + Send + Unpin + 'static> Conn<'_, W> {
    async fn run<H>(&mut self, handle: &H)
    where
        H: Handle,
    {
        let mut served = 0u64;
        loop {
            let head = match self.read_head().await {
                Ok(h) => h,
                Err(NoHead::Closed) => return,
                Err(NoHead::TimedOut) => {
                    let begun = self.read.as_ref().is_some_and(|r| !r.buf.is_empty());
                    // A head begun and not finished, or a connection that never sent a whole
                    // request, is counted; a keep-alive connection that stayed idle is not.
                    if begun || served == 0 {
                        self.ctx
                            .shared
                            .metrics
                            .downstream_closed(&self.ctx.listener.name, "header_read_timeout");
                    }
                    if begun {
                        Box::pin(self.refuse(StatusCode::REQUEST_TIMEOUT, false)).await;
                    }
                    return;
                }
                Err(NoHead::Refused(e)) => {
                    tracing::debug!(error = %e, "malformed request head: refused");
                    Box::pin(self.refuse(e.status(), true)).await;
                    return;
                }
            };
            served += 1;
            // Boxed, one allocation per request: what a request needs while it runs (the
            // handler's whole state) is not part of an idle connection's future.
            match Box::pin(self.exchange(head, handle)).await {
                Next::KeepAlive => {}
                Next::Close => {
                    // A request body dropped unread hands the read side back now (its exchange
                    // is over): what the client still sends is read and dropped for a moment.
                    if self.read.is_none() {
                        self.take_back();
                    }
                    if self.unfinished {
                        Box::pin(self.linger_close()).await;
                    } else {
                        Box::pin(self.shut_write()).await;
                    }
                    return;
                }
                Next::Gone => return,
            }
        }
    }

    /// Reads the next head: from what is buffered (a pipelined request), else from the socket,
    /// within `proxy.header_read_timeout`.
    async fn read_head(&mut self) -> Result<RequestHead, NoHead> {
        let Some(side) = self.read.as_mut() else {
            return Err(NoHead::Closed);
        };
        // The first head's time counts from the connection's first byte wait (the version
        // detection's), not again from zero.
        let started = self.opened.take().unwrap_or_else(Instant::now);
        loop {
            match self.parser.parse(&mut side.buf, self.max_head) {
                Ok(Some(head)) => return Ok(head),
                Ok(None) => {}
                Err(e) => return Err(NoHead::Refused(e)),
            }
            let out = &mut self.out;
            let timer = &mut self.timer;
            let timer_at = &mut self.timer_at;
            let deadline = started + self.ctx.shared.limits.header_read_timeout.get();
            let filled = poll_fn(|cx| {
                if side.buf.is_empty() {
                    // Idle: no buffer held while the client sends nothing.
                    if out.capacity() > 0 {
                        super::io::give_out(std::mem::take(out));
                    }
                    if let Poll::Ready(r) = side.poll_wait(cx) {
                        if let Err(e) = r {
                            return Poll::Ready(Err(Some(e)));
                        }
                        match side.poll_fill(cx) {
                            Poll::Ready(r) => return Poll::Ready(r.map_err(Some)),
                            Poll::Pending => side.release(),
                        }
                    }
                } else if let Poll::Ready(r) = side.poll_fill(cx) {
                    return Poll::Ready(r.map_err(Some));
                }
                // The timer stays armed from wait to wait: armed for an earlier deadline, it
                // fires early and is moved on then, instead of being moved at every request.
                if timer_at.is_none_or(|at| at > deadline) {
                    timer.as_mut().reset(deadline.into());
                    *timer_at = Some(deadline);
                }
                loop {
                    match timer.as_mut().poll(cx) {
                        Poll::Pending => return Poll::Pending,
                        Poll::Ready(()) if Instant::now() >= deadline => return Poll::Ready(Err(None)),
                        Poll::Ready(()) => {
                            timer.as_mut().reset(deadline.into());
                            *timer_at = Some(deadline);
                        }
                    }
                }
            })
            .await;
            match filled {
                Ok(0) | Err(Some(_)) => return Err(NoHead::Closed),
                Ok(_) => {}
                Err(None) => return Err(NoHead::TimedOut),
            }
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
        let (parts, mut body) = resp.into_parts();

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
        let (out, closing) = response::encode_head(&mut self.out, &parts, body_len, answering);

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
