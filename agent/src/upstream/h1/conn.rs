//! One upstream HTTP/1.1 connection and the exchange on it, driven by the caller's task: the
//! request goes out and the response comes in through the caller's own polls, and the response
//! body hands the connection to a [`Recycle`] (the endpoint's pool) once its last byte is read.
//!
//! The request head and a body that is ready go out in one write (flattened, as hyper's
//! `writev(false)`); a streamed body keeps going out while the response head, and then the
//! response body, are read (an upstream may answer before the request ends). The connection is
//! reused only when everything lines up: the upstream keeps it alive, the request did not ask to
//! close, the request went out whole, the body was framed by length or chunks and read to the
//! end, and no byte follows the response. Otherwise it closes when the body is dropped.
//!
//! Two differences from hyper's client, on purpose: a response that ends before the request
//! body was sent whole stops the request there and closes the connection (hyper's connection
//! task would keep writing the body nobody waits for); and a write error while the response head
//! is awaited does not fail the exchange before the upstream's answer is read (RFC 9112 §9.5:
//! a client sending a body should watch for an error response and stop sending).

use std::future::{poll_fn, Future};
use std::io;
use std::pin::{pin, Pin};
use std::task::{ready, Context, Poll, Waker};

use bytes::{BufMut, Bytes, BytesMut};
use http::{Method, Request, Response};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

use super::framing::{self, BodyDecoder, BodyEncoder, BodyError, BodyKind, Decoded, FramingError, ResponseFraming};
use super::head::{self, HeadError, HeadParser, RawFields, ResponseHead};
use super::Limits;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Request body bytes gathered before they are written.
const WRITE_BATCH: usize = 64 * 1024;
/// The read buffer grows by this much when less than `READ_MIN` is free.
const READ_CHUNK: usize = 16 * 1024;
const READ_MIN: usize = 2 * 1024;
/// Buffers larger than this are let go when the connection goes idle.
const IDLE_BUFFER: usize = 16 * 1024;

/// One HTTP/1.1 connection to an upstream over `S` (a `TcpStream`, a TLS stream). A handle: the
/// state is allocated once per connection, so that handing a connection from the pool to an
/// exchange, into a response body and back moves a pointer, not the buffers.
pub struct Conn<S> {
    inner: Box<Inner<S>>,
}

struct Inner<S> {
    io: S,
    /// Bytes received and not yet used; empty between exchanges.
    read_buf: BytesMut,
    /// The request being written: the head, then body bytes; reused from one request to the next.
    write_buf: Vec<u8>,
    written: usize,
    unflushed: bool,
    /// The response head parser, with the limits.
    parser: HeadParser,
}

/// Where a connection goes when its exchange ended cleanly and it can carry another request.
pub trait Recycle<S> {
    fn recycle(self, conn: Conn<S>);
}

/// Closes every connection (no pool).
#[derive(Debug, Clone, Copy, Default)]
pub struct Discard;

/// An exchange under way: the request is going out, the final response head is awaited.
pub struct Exchange<S, B> {
    conn: Conn<S>,
    writer: Writer<B>,
    method: Method,
    /// The request asked to close the connection after this exchange.
    close: bool,
    received: usize,
    head: Option<(ResponseHead, ResponseFraming)>,
}

/// The body of an upstream response. Reads from the connection when polled; at the end hands
/// the connection to its `Recycle` when it can be reused, else closes it; dropped early, closes.
/// It carries the head's fields as they came (the response's header map is empty): see
/// [`ResponseBody::fields`] and [`fields_into_map`].
pub struct ResponseBody<S, B, P> {
    state: State<S, B, P>,
    fields: RawFields,
}

/// The connection of a 101 (or a 2xx to CONNECT), past the response head: the bytes the
/// upstream sent after the head are read first.
pub struct Upgraded<S> {
    io: S,
    read_buf: Bytes,
}

/// Why an exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("writing the request: {0}")]
    Write(io::Error),
    #[error("reading the response: {0}")]
    Read(io::Error),
    /// The upstream closed the connection before a whole response head; `read` bytes came.
    #[error("connection closed before the response head ({read} bytes received)")]
    Closed { read: usize },
    #[error(transparent)]
    Head(#[from] HeadError),
    #[error(transparent)]
    Framing(#[from] FramingError),
    #[error("response body: {0}")]
    Body(#[from] BodyError),
    /// The request body failed (the client's connection, a body timeout): the error is the
    /// source, so that a cause can be found by walking the chain.
    #[error("request body: {0}")]
    RequestBody(#[source] BoxError),
    #[error("request body ended {missing} bytes short of its content-length")]
    RequestBodyShort { missing: u64 },
    /// `Exchange::into_response` before `read_head` finished.
    #[error("response head not read yet")]
    NoHead,
}

enum Writer<B> {
    /// Body frames still to come, encoded as they arrive.
    Body(B, BodyEncoder),
    /// All encoded: what is in the write buffer still goes out.
    Flush,
    Done,
    /// A write failed; the error until it is reported.
    Failed(Option<io::Error>),
}

enum WriteError {
    Io(io::Error),
    Body(BoxError),
    Short(u64),
}

// A response body is in `Reading` nearly all its life: boxing it would cost an allocation per
// response to save bytes in the rare other states.
#[allow(clippy::large_enum_variant)]
enum State<S, B, P> {
    Reading(Reading<S, B, P>),
    Upgrade(Option<Upgraded<S>>),
    Done,
}

struct Reading<S, B, P> {
    conn: Conn<S>,
    decoder: BodyDecoder,
    writer: Writer<B>,
    keep_alive: bool,
    recycle: P,
}

/// What one poll of a response body came to.
enum Step {
    Data(Bytes),
    End(Option<http::HeaderMap>),
    Fail(Error),
}

/// A request head lent to an exchange, which encodes it at once.
#[derive(Debug, Clone, Copy)]
pub struct HeadRef<'a> {
    pub method: &'a http::Method,
    pub uri: &'a http::Uri,
    pub version: http::Version,
    pub headers: &'a http::HeaderMap,
}

impl<'a> HeadRef<'a> {
    pub fn of(parts: &'a http::request::Parts) -> Self {
        Self {
            method: &parts.method,
            uri: &parts.uri,
            version: parts.version,
            headers: &parts.headers,
        }
    }
}

// === impl Conn ===

impl<S> Conn<S> {
    pub fn new(io: S) -> Self {
        Self::with_limits(io, Limits::default())
    }

    pub fn with_limits(io: S, limits: Limits) -> Self {
        Self {
            inner: Box::new(Inner {
                io,
                read_buf: BytesMut::new(),
                write_buf: Vec::new(),
                written: 0,
                unflushed: false,
                parser: HeadParser::new(limits),
            }),
        }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner.io
    }

    pub fn get_mut(&mut self) -> &mut S {
        &mut self.inner.io
    }

    /// Lets go of buffers a large exchange grew, so that an idle connection stays small.
    fn shrink(&mut self) {
        if self.inner.write_buf.capacity() > IDLE_BUFFER {
            self.inner.write_buf = Vec::new();
        }
        if self.inner.read_buf.capacity() > IDLE_BUFFER {
            self.inner.read_buf = BytesMut::new();
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> Conn<S> {
    /// Whether an idle connection can carry a request: nothing unread, and the upstream did not
    /// close it or send anything since. Does not wait (one non-blocking read at most; none on a
    /// tokio socket with no event since its last read).
    pub fn is_reusable(&mut self) -> bool {
        if !self.inner.read_buf.is_empty() {
            return false;
        }
        let mut cx = Context::from_waker(Waker::noop());
        let mut probe = [0u8; 1];
        let mut buf = ReadBuf::new(&mut probe);
        Pin::new(&mut self.inner.io).poll_read(&mut cx, &mut buf).is_pending()
    }

    /// Starts an exchange: frames the request body and encodes the head (nothing is written
    /// until the exchange is polled).
    pub fn request<B>(self, req: Request<B>) -> Exchange<S, B>
    where
        B: Body,
    {
        let (parts, body) = req.into_parts();
        self.request_ref(HeadRef::of(&parts), body)
    }

    /// As [`Conn::request`], with the head borrowed: it is encoded at once, and the caller keeps
    /// it (for another try) without a copy.
    pub fn request_ref<B>(mut self, head: HeadRef<'_>, body: B) -> Exchange<S, B>
    where
        B: Body,
    {
        let parts = head;
        let kind = if body.is_end_stream() {
            BodyKind::Empty
        } else {
            body.size_hint().exact().map_or(BodyKind::Unknown, BodyKind::Known)
        };
        let framing = framing::request_framing(parts.method, parts.version, parts.headers, kind);
        self.inner.write_buf.clear();
        self.inner.written = 0;
        self.inner.parser.reset();
        let close = head::encode_request(
            &mut self.inner.write_buf,
            parts.method,
            parts.uri,
            parts.version,
            parts.headers,
            &framing.edits,
        );
        let writer = if kind == BodyKind::Empty || framing.encoder.is_full() {
            Writer::Flush
        } else {
            Writer::Body(body, framing.encoder)
        };
        Exchange {
            conn: self,
            writer,
            method: parts.method.clone(),
            close,
            received: 0,
            head: None,
        }
    }

    /// Sends `req` and waits for the final response head: `request`, `read_head`,
    /// `into_response`. Dropping the future closes the connection.
    pub async fn send<B, P>(self, req: Request<B>, recycle: P) -> Result<Response<ResponseBody<S, B, P>>, Error>
    where
        B: Body + Unpin,
        B::Error: Into<BoxError>,
        P: Recycle<S>,
    {
        let mut exchange = self.request(req);
        exchange.read_head().await?;
        exchange.into_response(recycle)
    }

    /// As [`Conn::send`], with the head borrowed ([`Conn::request_ref`]).
    pub async fn send_ref<B, P>(
        self,
        head: HeadRef<'_>,
        body: B,
        recycle: P,
    ) -> Result<Response<ResponseBody<S, B, P>>, Error>
    where
        B: Body + Unpin,
        B::Error: Into<BoxError>,
        P: Recycle<S>,
    {
        let mut exchange = self.request_ref(head, body);
        exchange.read_head().await?;
        exchange.into_response(recycle)
    }

    /// Reads more into the read buffer, at most `limit` bytes (> 0). `Ok(0)`: the upstream closed.
    fn poll_fill(&mut self, cx: &mut Context<'_>, limit: usize) -> Poll<io::Result<usize>> {
        if self.inner.read_buf.capacity().saturating_sub(self.inner.read_buf.len()) < READ_MIN {
            self.inner.read_buf.reserve(READ_CHUNK);
        }
        let mut room = (&mut self.inner.read_buf).limit(limit);
        pin!(self.inner.io.read_buf(&mut room)).poll(cx)
    }
}

impl<S> std::fmt::Debug for Conn<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Conn")
            .field("buffered", &self.inner.read_buf.len())
            .field("limits", self.inner.parser.limits())
            .finish_non_exhaustive()
    }
}

// === impl Recycle ===

impl<S> Recycle<S> for Discard {
    fn recycle(self, _conn: Conn<S>) {}
}

impl<S, F: FnOnce(Conn<S>)> Recycle<S> for F {
    fn recycle(self, conn: Conn<S>) {
        self(conn)
    }
}

// === impl Exchange ===

impl<S, B> Exchange<S, B>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Writes the request and reads until the final response head (1xx answers are skipped).
    /// Cancel-safe: dropping the future loses nothing, bytes read stay buffered, and calling it
    /// again goes on where it stopped.
    pub async fn read_head(&mut self) -> Result<(), Error> {
        poll_fn(|cx| self.poll_head(cx)).await
    }

    /// `read_head` as a poll.
    pub fn poll_head(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Error>> {
        if self.head.is_some() {
            return Poll::Ready(Ok(()));
        }
        loop {
            if let Poll::Ready(Err(e)) = self.writer.poll(&mut self.conn.inner, cx) {
                match e {
                    // Keep reading: the upstream may have answered before it stopped reading.
                    WriteError::Io(e) => self.writer = Writer::Failed(Some(e)),
                    WriteError::Body(e) => return Poll::Ready(Err(Error::RequestBody(e))),
                    WriteError::Short(missing) => return Poll::Ready(Err(Error::RequestBodyShort { missing })),
                }
            }
            if let Some(mut head) = self.conn.inner.parser.parse(&mut self.conn.inner.read_buf)? {
                let framing = framing::response_framing(&self.method, &mut head)?;
                if framing != ResponseFraming::Interim {
                    self.head = Some((head, framing));
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            let max = self.conn.inner.parser.limits().max_head_bytes;
            let room = max.saturating_sub(self.conn.inner.read_buf.len());
            if room == 0 {
                return Poll::Ready(Err(HeadError::TooLarge(max).into()));
            }
            match ready!(self.conn.poll_fill(cx, room)) {
                Ok(0) => {
                    let closed = Error::Closed { read: self.received };
                    return Poll::Ready(Err(self.writer.take_error().map_or(closed, Error::Write)));
                }
                Ok(n) => self.received = self.received.saturating_add(n),
                Err(e) => return Poll::Ready(Err(self.writer.take_error().map_or(Error::Read(e), Error::Write))),
            }
        }
    }

    /// The response, once `read_head` finished, with a body that reads the rest and then gives
    /// the connection to `recycle` when it can be reused.
    pub fn into_response<P: Recycle<S>>(self, recycle: P) -> Result<Response<ResponseBody<S, B, P>>, Error> {
        let Exchange {
            conn,
            writer,
            close,
            head,
            ..
        } = self;
        let (head, framing) = head.ok_or(Error::NoHead)?;
        let state = if framing == ResponseFraming::Upgrade {
            let inner = *conn.inner;
            State::Upgrade(Some(Upgraded {
                io: inner.io,
                read_buf: inner.read_buf.freeze(),
            }))
        } else {
            let decoder = BodyDecoder::new(framing, conn.inner.parser.limits());
            let reading = Reading {
                keep_alive: head.keep_alive && !close && !decoder.is_close_delimited(),
                conn,
                decoder,
                writer,
                recycle,
            };
            if reading.decoder.is_done() {
                reading.finish();
                State::Done
            } else {
                State::Reading(reading)
            }
        };
        let (resp, fields) = head.into_response(());
        Ok(resp.map(|()| ResponseBody { state, fields }))
    }
}

// === impl Writer ===

impl<B> Writer<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    /// Gathers body frames into the write buffer and writes it, until the request is out (then
    /// flushed) or both the body and the connection are pending.
    fn poll<S: AsyncWrite + Unpin>(
        &mut self,
        conn: &mut Inner<S>,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        if matches!(self, Self::Done | Self::Failed(_)) {
            return Poll::Ready(Ok(()));
        }
        loop {
            let mut body_pending = false;
            let mut ended = false;
            if let Self::Body(body, encoder) = self {
                while conn.write_buf.len().saturating_sub(conn.written) < WRITE_BATCH {
                    match Pin::new(&mut *body).poll_frame(cx) {
                        Poll::Pending => {
                            body_pending = true;
                            break;
                        }
                        Poll::Ready(Some(Ok(frame))) => {
                            // Trailers are not sent (see `BodyEncoder::finish`).
                            if let Ok(data) = frame.into_data() {
                                encoder.encode(data, &mut conn.write_buf);
                            }
                            if encoder.is_full() {
                                ended = true;
                                break;
                            }
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(WriteError::Body(e.into()))),
                        Poll::Ready(None) => {
                            encoder.finish(&mut conn.write_buf).map_err(WriteError::Short)?;
                            ended = true;
                            break;
                        }
                    }
                }
            }
            if ended {
                *self = Self::Flush;
            }
            while conn.written < conn.write_buf.len() {
                let pending = conn.write_buf.get(conn.written..).unwrap_or_default();
                match ready!(Pin::new(&mut conn.io).poll_write(cx, pending)) {
                    Ok(0) => return Poll::Ready(Err(WriteError::Io(io::ErrorKind::WriteZero.into()))),
                    Ok(n) => {
                        conn.written = conn.written.saturating_add(n);
                        conn.unflushed = true;
                    }
                    Err(e) => return Poll::Ready(Err(WriteError::Io(e))),
                }
            }
            conn.write_buf.clear();
            conn.written = 0;
            if conn.unflushed {
                ready!(Pin::new(&mut conn.io).poll_flush(cx)).map_err(WriteError::Io)?;
                conn.unflushed = false;
            }
            match self {
                Self::Body(..) if body_pending => return Poll::Pending,
                Self::Body(..) => continue,
                Self::Flush => {
                    *self = Self::Done;
                    return Poll::Ready(Ok(()));
                }
                Self::Done | Self::Failed(_) => return Poll::Ready(Ok(())),
            }
        }
    }

    fn take_error(&mut self) -> Option<io::Error> {
        match self {
            Self::Failed(e) => e.take(),
            _ => None,
        }
    }
}

// === impl ResponseBody ===

/// `resp` with its head's fields moved into its header map, for a caller that reads them there.
pub fn fields_into_map<S, B, P>(mut resp: Response<ResponseBody<S, B, P>>) -> Response<ResponseBody<S, B, P>> {
    let fields = resp.body_mut().take_fields();
    fields.append_to(resp.headers_mut(), |_, _| true);
    resp
}

impl<S, B, P> ResponseBody<S, B, P> {
    /// The response head's fields as they came.
    pub fn fields(&self) -> &RawFields {
        &self.fields
    }

    /// The response head's fields, once (empty after).
    pub fn take_fields(&mut self) -> RawFields {
        std::mem::take(&mut self.fields)
    }

    /// The connection after a 101 (or a 2xx to CONNECT), once.
    pub fn take_upgraded(&mut self) -> Option<Upgraded<S>> {
        match &mut self.state {
            State::Upgrade(u) => u.take(),
            _ => None,
        }
    }
}

impl<S, B, P> Body for ResponseBody<S, B, P>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
    P: Recycle<S> + Unpin,
{
    type Data = Bytes;
    type Error = Error;

    fn poll_frame(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Error>>> {
        let this = self.get_mut();
        let State::Reading(reading) = &mut this.state else {
            return Poll::Ready(None);
        };
        let step = ready!(reading.poll_step(cx));
        let done = match &step {
            Step::Data(_) => reading.decoder.is_done(),
            Step::End(_) | Step::Fail(_) => true,
        };
        if done {
            if let State::Reading(reading) = std::mem::replace(&mut this.state, State::Done) {
                if !matches!(step, Step::Fail(_)) {
                    reading.finish();
                }
            }
        }
        Poll::Ready(match step {
            Step::Data(data) => Some(Ok(Frame::data(data))),
            Step::End(trailers) => trailers.map(|t| Ok(Frame::trailers(t))),
            Step::Fail(e) => Some(Err(e)),
        })
    }

    fn is_end_stream(&self) -> bool {
        !matches!(self.state, State::Reading(_))
    }

    fn size_hint(&self) -> SizeHint {
        match &self.state {
            State::Reading(r) => r
                .decoder
                .remaining()
                .map_or_else(SizeHint::default, SizeHint::with_exact),
            State::Upgrade(_) | State::Done => SizeHint::with_exact(0),
        }
    }
}

impl<S, B, P> std::fmt::Debug for ResponseBody<S, B, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match &self.state {
            State::Reading(r) => format!("reading {:?}", r.decoder),
            State::Upgrade(_) => "upgrade".to_owned(),
            State::Done => "done".to_owned(),
        };
        f.debug_struct("ResponseBody").field("state", &state).finish()
    }
}

// === impl Reading ===

impl<S, B, P> Reading<S, B, P>
where
    S: AsyncRead + AsyncWrite + Unpin,
    B: Body + Unpin,
    B::Error: Into<BoxError>,
    P: Recycle<S>,
{
    /// Moves the request on (if still going out) and the response body to its next frame.
    fn poll_step(&mut self, cx: &mut Context<'_>) -> Poll<Step> {
        if let Poll::Ready(Err(e)) = self.writer.poll(&mut self.conn.inner, cx) {
            match e {
                // The upstream stopped reading; its answer may still come whole.
                WriteError::Io(_) => self.writer = Writer::Failed(None),
                WriteError::Body(e) => return Poll::Ready(Step::Fail(Error::RequestBody(e))),
                WriteError::Short(missing) => return Poll::Ready(Step::Fail(Error::RequestBodyShort { missing })),
            }
        }
        loop {
            match self.decoder.decode(&mut self.conn.inner.read_buf) {
                Ok(Decoded::Data(data)) => return Poll::Ready(Step::Data(data)),
                Ok(Decoded::End(trailers)) => return Poll::Ready(Step::End(trailers)),
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Step::Fail(e.into())),
            }
            match ready!(self.conn.poll_fill(cx, usize::MAX)) {
                Ok(0) => {
                    return Poll::Ready(match self.decoder.eof() {
                        Ok(Decoded::End(trailers)) => Step::End(trailers),
                        Ok(_) => Step::End(None),
                        Err(e) => Step::Fail(e.into()),
                    })
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Step::Fail(Error::Read(e))),
            }
        }
    }
}

impl<S, B, P: Recycle<S>> Reading<S, B, P> {
    /// The response ended: the connection goes to its pool if it can carry another request.
    fn finish(self) {
        let reusable = self.keep_alive
            && self.decoder.is_done()
            && matches!(self.writer, Writer::Done)
            && self.conn.inner.read_buf.is_empty();
        if reusable {
            let mut conn = self.conn;
            conn.shrink();
            self.recycle.recycle(conn);
        }
    }
}

// === impl Upgraded ===

impl<S> Upgraded<S> {
    /// The connection and the bytes the upstream sent after the response head.
    pub fn into_parts(self) -> (S, Bytes) {
        (self.io, self.read_buf)
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Upgraded<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if !self.read_buf.is_empty() {
            let n = self.read_buf.len().min(buf.remaining());
            let early = self.read_buf.split_to(n);
            buf.put_slice(&early);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Upgraded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

impl<S> std::fmt::Debug for Upgraded<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upgraded")
            .field("buffered", &self.read_buf.len())
            .finish_non_exhaustive()
    }
}

// === impl Error ===

impl Error {
    /// The upstream's answer is not valid HTTP/1.1 (a 502 for the caller).
    pub fn is_malformed(&self) -> bool {
        match self {
            Self::Head(_) | Self::Framing(_) => true,
            Self::Body(e) => *e != BodyError::Incomplete,
            _ => false,
        }
    }

    /// The upstream closed the connection without a byte of answer. On a connection taken from
    /// the pool this is the keep-alive race (the upstream closed it while idle): RFC 9112 §9.3.1
    /// lets an idempotent request be sent again.
    pub fn is_closed_without_answer(&self) -> bool {
        matches!(self, Self::Closed { read: 0 })
    }
}

#[cfg(test)]
mod tests;
