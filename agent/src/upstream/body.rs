//! The body of a request sent upstream: streamed from the client (cannot be replayed), or held
//! in memory (empty or small) so that another try can send it again.

use std::fmt;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

/// Errors of a request body (the client's connection, or the proxy's own deadline).
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A streamed request body: whatever the proxy reads from the client. Boxed, so this layer
/// does not know the client side (one allocation per streamed body; a request without a body,
/// or one held in memory, allocates nothing here).
pub type Streamed = Pin<Box<dyn Body<Data = Bytes, Error = BoxError> + Send>>;

/// The body of a request sent upstream.
pub enum RequestBody {
    /// Streamed from the client; cannot be replayed.
    Stream(Streamed),
    /// Held in memory (empty or small): can be sent again on a retry.
    Buffered(Option<Bytes>),
}

impl fmt::Debug for RequestBody {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Stream(_) => f.write_str("RequestBody::Stream"),
            Self::Buffered(b) => f
                .debug_tuple("RequestBody::Buffered")
                .field(&b.as_ref().map(Bytes::len))
                .finish(),
        }
    }
}

impl RequestBody {
    pub fn empty() -> Self {
        Self::Buffered(None)
    }

    /// A body streamed from `body`.
    pub fn stream(body: impl Body<Data = Bytes, Error = BoxError> + Send + 'static) -> Self {
        Self::Stream(Box::pin(body))
    }

    /// A copy for another try, when the body can be replayed.
    pub fn replay(&self) -> Option<Self> {
        match self {
            Self::Stream(..) => None,
            Self::Buffered(b) => Some(Self::Buffered(b.clone())),
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match &mut *self {
            Self::Stream(b) => b.as_mut().poll_frame(cx),
            Self::Buffered(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            Self::Stream(b) => b.is_end_stream(),
            Self::Buffered(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            Self::Stream(b) => b.size_hint(),
            Self::Buffered(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

#[cfg(test)]
mod tests {
    use http_body_util::{BodyExt, Full};

    use super::*;

    #[tokio::test]
    async fn a_buffered_body_replays_and_a_streamed_one_does_not() {
        let body = RequestBody::Buffered(Some(Bytes::from_static(b"abc")));
        let again = body.replay().expect("a buffered body replays");
        assert_eq!(again.collect().await.unwrap().to_bytes(), "abc");
        assert_eq!(body.size_hint().exact(), Some(3));

        let streamed = RequestBody::stream(Full::new(Bytes::from_static(b"xy")).map_err(|e| match e {}));
        assert!(streamed.replay().is_none());
        assert_eq!(streamed.collect().await.unwrap().to_bytes(), "xy");
        assert!(RequestBody::empty().is_end_stream());
    }
}
