//! The body of a client's request: read from the HTTP/1.1 connection by whoever polls it (the
//! request's task, or an HTTP/2 upstream's stream task), or hyper's HTTP/2 stream.
//!
//! An HTTP/1.1 body takes the connection's read side (the transport's read half and the bytes
//! already read) for as long as it is being read, and puts it back in the connection's
//! [`Return`] slot on its last byte: the connection then reads the next request. A body dropped
//! before its end puts it back marked unfinished: the connection closes after the response,
//! reading and dropping what the client still sends for a moment (so that the close does not
//! reset the answer away).

use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use super::io::ReadSide;
use crate::upstream::h1::framing::{BodyDecoder, Decoded, ResponseFraming};

/// Errors of a client's request body.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The body of a request from a client.
#[derive(Debug)]
pub enum ClientBody {
    /// No body (HTTP/1.1 without Content-Length or Transfer-Encoding, or a length of 0).
    Empty,
    /// Boxed: the upstream client's request writer embeds the body it sends.
    H1(Box<H1Body>),
    H2(hyper::body::Incoming),
}

/// Where an HTTP/1.1 body puts the connection's read side back once read to its end.
#[derive(Debug, Default)]
pub struct Return {
    /// The read side, and whether the body was read to its end.
    slot: Mutex<Option<(ReadSide, bool)>>,
    /// Set by the body's first poll when the client waits for `100 Continue`.
    pub continue_wanted: tokio::sync::Notify,
}

impl Return {
    /// The read side, if a body handed it back, and whether the body was read to its end.
    pub fn take(&self) -> Option<(ReadSide, bool)> {
        self.slot.lock().ok()?.take()
    }

    fn put(&self, side: ReadSide, finished: bool) {
        if let Ok(mut slot) = self.slot.lock() {
            *slot = Some((side, finished));
        }
    }
}

/// An HTTP/1.1 request body, decoded from the connection (`Content-Length` or chunked).
pub struct H1Body {
    side: Option<ReadSide>,
    decoder: BodyDecoder,
    home: Arc<Return>,
    /// `Expect: 100-continue` not yet answered: the first poll asks the connection for it.
    expects_continue: bool,
}

impl std::fmt::Debug for H1Body {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("H1Body")
            .field("remaining", &self.decoder.remaining())
            .finish_non_exhaustive()
    }
}

/// The client's connection closed or sent a malformed chunked body.
#[derive(Debug, thiserror::Error)]
pub enum H1BodyError {
    #[error("client request body: {0}")]
    Framing(#[from] crate::upstream::h1::framing::BodyError),
    #[error("client request body: {0}")]
    Read(#[from] std::io::Error),
}

impl H1Body {
    pub fn new(side: ReadSide, framing: super::request::Framing, home: Arc<Return>, expects_continue: bool) -> Self {
        let limits = crate::upstream::h1::Limits::default();
        let decoder = match framing {
            super::request::Framing::Empty => BodyDecoder::new(ResponseFraming::Empty, &limits),
            super::request::Framing::Length(n) => BodyDecoder::new(ResponseFraming::Length(n), &limits),
            super::request::Framing::Chunked => BodyDecoder::new(ResponseFraming::Chunked, &limits),
        };
        Self {
            side: Some(side),
            decoder,
            home,
            expects_continue,
        }
    }

    fn end(&mut self) {
        if let Some(side) = self.side.take() {
            self.home.put(side, true);
        }
    }
}

impl Drop for H1Body {
    fn drop(&mut self) {
        // Dropped before its end (an early answer, a failed upstream): the connection gets its
        // read side back to drain for a moment before it closes.
        if let Some(side) = self.side.take() {
            self.home.put(side, false);
        }
    }
}

impl Body for H1Body {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.expects_continue {
            this.expects_continue = false;
            this.home.continue_wanted.notify_one();
        }
        loop {
            let Some(side) = this.side.as_mut() else {
                return Poll::Ready(None);
            };
            match this.decoder.decode(&mut side.buf) {
                Ok(Decoded::Data(d)) => {
                    if this.decoder.is_done() {
                        this.end();
                    }
                    return Poll::Ready(Some(Ok(Frame::data(d))));
                }
                Ok(Decoded::End(trailers)) => {
                    this.end();
                    return Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t))));
                }
                Ok(Decoded::NeedMore) => {}
                Err(e) => return Poll::Ready(Some(Err(H1BodyError::from(e).into()))),
            }
            match side.poll_fill(cx) {
                Poll::Ready(Ok(0)) => {
                    let e = this
                        .decoder
                        .eof()
                        .err()
                        .unwrap_or(crate::upstream::h1::framing::BodyError::Incomplete);
                    return Poll::Ready(Some(Err(H1BodyError::from(e).into())));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => return Poll::Ready(Some(Err(H1BodyError::from(e).into()))),
                Poll::Pending => return Poll::Pending,
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.side.is_none() || self.decoder.is_done()
    }

    fn size_hint(&self) -> SizeHint {
        match self.decoder.remaining() {
            Some(n) => SizeHint::with_exact(n),
            None => SizeHint::default(),
        }
    }
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            Self::Empty => Poll::Ready(None),
            Self::H1(b) => Pin::new(&mut **b).poll_frame(cx),
            Self::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Empty => true,
            Self::H1(b) => b.is_end_stream(),
            Self::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Empty => SizeHint::with_exact(0),
            Self::H1(b) => b.size_hint(),
            Self::H2(b) => b.size_hint(),
        }
    }
}
