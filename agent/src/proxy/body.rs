//! Bodies on the request path: the client's request body as streamed upstream (counted, its
//! deadline kept; `upstream::body::RequestBody` carries it), and the response body that
//! records the request's completion when the last byte is sent or the client goes away.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::Response;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use super::complete::Completion;
use super::downstream::ClientBody;
use super::ConnActivity;
pub use crate::upstream::body::BoxError;
use crate::upstream::h1::RawFields;
use crate::upstream::pool::H1Body;

/// A request body streamed from the client: counts its bytes when asked to, marks the
/// connection's progress for the stall watch, and fails once `proxy.request_body_timeout`
/// has passed since the request arrived.
#[derive(Debug)]
pub struct StreamBody {
    body: ClientBody,
    counter: Option<Arc<AtomicU64>>,
    deadline: Instant,
    /// Weak: a body can outlive its connection (hyper's HTTP/2 client pipes it from a task of
    /// its own), and the connection's activity holds its places under the connection caps.
    activity: Weak<ConnActivity>,
}

/// The request body did not arrive by `proxy.request_body_timeout`.
#[derive(Debug, thiserror::Error)]
#[error("request body timeout: the client did not send the whole body in time")]
pub struct BodyTimedOut;

/// Whether `e` or an error it wraps is [`BodyTimedOut`].
pub fn is_body_timeout(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if err.is::<BodyTimedOut>() {
            return true;
        }
        cur = err.source();
    }
    false
}

impl StreamBody {
    pub fn new(
        body: ClientBody,
        counter: Option<Arc<AtomicU64>>,
        deadline: Instant,
        activity: &Arc<ConnActivity>,
    ) -> Self {
        Self {
            body,
            counter,
            deadline,
            activity: Arc::downgrade(activity),
        }
    }
}

impl Body for StreamBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.body).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(activity) = this.activity.upgrade() {
                    activity.moved();
                }
                if Instant::now() > this.deadline {
                    return Poll::Ready(Some(Err(BodyTimedOut.into())));
                }
                if let (Some(counter), Some(d)) = (&this.counter, frame.data_ref()) {
                    counter.fetch_add(d.len() as u64, Ordering::Relaxed);
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

/// The body of an upstream response: HTTP/1.1 from the endpoint's pool (it hands its
/// connection back to the pool once read to the end; abandoned halfway, the connection
/// closes), or HTTP/2 from the cluster's client.
pub enum UpstreamBody {
    H1(H1Body),
    H2(Incoming),
}

/// The body of a response sent to the client.
pub struct ResponseBody {
    inner: Inner,
    bytes: u64,
    completion: Option<Completion>,
    ended: bool,
}

enum Inner {
    H1(H1Body),
    H2(Incoming),
    Full(Option<Bytes>),
}

impl ResponseBody {
    pub fn upstream(body: UpstreamBody, completion: Option<Completion>) -> Self {
        Self {
            inner: match body {
                UpstreamBody::H1(b) => Inner::H1(b),
                UpstreamBody::H2(b) => Inner::H2(b),
            },
            bytes: 0,
            completion,
            ended: false,
        }
    }

    pub fn full(data: Bytes, completion: Option<Completion>) -> Self {
        Self {
            inner: Inner::Full((!data.is_empty()).then_some(data)),
            bytes: 0,
            completion,
            ended: false,
        }
    }

    /// An HTTP/1.1 upstream's response fields as they came (the response's header map does not
    /// hold them): an HTTP/1.1 client is sent them from here, hop-by-hop and `x-vmesh-*` fields
    /// left out (`downstream::response`); [`fields_into_map`] moves them into the map.
    pub fn upstream_fields(&self) -> Option<&RawFields> {
        match &self.inner {
            Inner::H1(b) => Some(b.fields()),
            _ => None,
        }
    }

    /// Drops an HTTP/1.1 upstream's fields once they are written: they share the upstream
    /// connection's read buffer, which a long body would otherwise keep from being reused.
    pub fn drop_upstream_fields(&mut self) {
        if let Inner::H1(b) = &mut self.inner {
            drop(b.take_fields());
        }
    }

    fn finish(&mut self) {
        if !self.ended && !self.is_end_stream() {
            // Cut short: by the client, or by the stall watch (`proxy.stream_idle_timeout`).
            if let Some(c) = self.completion.as_mut() {
                if c.active.as_ref().is_some_and(|a| a.conn().stalled()) {
                    c.set_error("STREAM_IDLE_TIMEOUT");
                }
            }
        }
        if let Some(c) = self.completion.take() {
            c.finish(self.bytes);
        }
    }
}

/// `resp` with an HTTP/1.1 upstream's fields (see [`ResponseBody::upstream_fields`]) moved into
/// its header map, for a client whose protocol reads them there (HTTP/2): hop-by-hop and
/// `x-vmesh-*` fields are left out, as for an HTTP/1.1 client.
pub fn fields_into_map(mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
    if let Inner::H1(b) = &mut resp.body_mut().inner {
        let fields = b.take_fields();
        fields.append_to(resp.headers_mut(), super::headers::passes);
    }
    resp
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = match &mut this.inner {
            Inner::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Full(b) => Poll::Ready(b.take().map(|d| Ok(Frame::data(d)))),
        };
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(d) = frame.data_ref() {
                    this.bytes += d.len() as u64;
                }
                if let Some(active) = this.completion.as_ref().and_then(|c| c.active.as_ref()) {
                    active.conn().moved();
                }
                if this.is_end_stream() {
                    this.finish();
                }
            }
            Poll::Ready(None) => {
                this.ended = true;
                this.finish();
            }
            Poll::Ready(Some(Err(_))) => {
                if let Some(c) = this.completion.as_mut() {
                    c.set_error("UPSTREAM_RESET");
                }
                this.finish();
            }
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::H1(b) => b.is_end_stream(),
            Inner::H2(b) => b.is_end_stream(),
            Inner::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::H1(b) => b.size_hint(),
            Inner::H2(b) => b.size_hint(),
            Inner::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64)),
        }
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The client went away before the end, or the body was never polled (HEAD, 204).
        self.finish();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A request body can outlive its connection (hyper's HTTP/2 client pipes it from a task of
    /// its own): it must not keep the connection's activity, which holds the connection's
    /// places under the caps, its active count and the drain's wait.
    #[tokio::test]
    async fn a_streamed_body_does_not_keep_its_connections_activity_alive() {
        let permits = (
            Arc::new(tokio::sync::Semaphore::new(1)).acquire_owned().await.unwrap(),
            Arc::new(tokio::sync::Semaphore::new(1)).acquire_owned().await.unwrap(),
        );
        let (_drain, drain) = super::super::Drain::new();
        let activity = ConnActivity::new(super::super::InFlightCap::new(8), permits, Default::default(), drain);
        let body = StreamBody::new(ClientBody::Empty, None, Instant::now(), &activity);
        assert_eq!(Arc::strong_count(&activity), 1);
        drop(activity);
        assert!(body.activity.upgrade().is_none());
    }
}
