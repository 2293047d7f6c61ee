//! `GET /tap`: the live request stream ([`crate::telemetry::tap`]) as newline-delimited JSON in
//! a chunked response, until the client goes away or `limit` lines were sent.
//!
//! It shows request paths, so it needs the admin token when one is configured, although it is a
//! GET. A reader slower than the traffic loses lines; the stream then carries
//! `{"dropped": N, ...}` (the total lost so far) before the next line. A blank line goes out
//! after [`KEEPALIVE`] without traffic, so a client that went away is noticed and its tap
//! detached.

use std::convert::Infallible;
use std::future::Future;
use std::os::fd::OwnedFd;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::{Either, Full};
use hyper::body::Incoming;
use serde_json::json;

use super::AgentState;
use crate::telemetry::tap::{self, Filter, Tap, TapError};

/// An admin answer: whole, or the tap's stream.
pub(super) type Body = Either<Full<Bytes>, Stream>;

/// The longest the stream stays silent: then a blank line goes out.
const KEEPALIVE: Duration = Duration::from_secs(10);

/// The socket send buffer of a tap's connection (the kernel doubles it).
const SEND_BUFFER: usize = 32 * 1024;

/// The body of a `/tap` answer.
pub(super) struct Stream {
    tap: Tap,
    /// Lines still to send (`None`: until the client goes away).
    left: Option<u64>,
    /// The drop total last reported to the client.
    reported: u64,
    keepalive: Pin<Box<tokio::time::Sleep>>,
}

/// `GET /tap?service=&path_prefix=&status=&limit=` on the connection of `socket`; `trusted`
/// (a checked peer of the admin socket) needs neither the token nor the browser checks.
pub(super) fn serve(
    state: &AgentState,
    req: &Request<Incoming>,
    socket: Option<&OwnedFd>,
    trusted: bool,
) -> Response<Body> {
    if !trusted {
        if let Err(r) = super::check_origin(state, req) {
            return (*r).map(Either::Left);
        }
    }
    if req.method() != Method::GET {
        return super::text(StatusCode::METHOD_NOT_ALLOWED, "use GET\n").map(Either::Left);
    }
    // The stream shows request paths: the token is needed for this read too.
    if !trusted {
        if let Err(r) = super::authorize(state, req) {
            return (*r).map(Either::Left);
        }
    }
    let query = req.uri().query().unwrap_or("");
    let filter = match Filter::from_query(query) {
        Ok(f) => f,
        Err(e) => return error(StatusCode::BAD_REQUEST, "TAP_BAD_FILTER", &e.to_string()),
    };
    let left = match super::query_param(req, "limit").filter(|l| !l.is_empty()) {
        None => None,
        Some(l) => match l.parse::<u64>() {
            Ok(0) => None,
            Ok(n) => Some(n),
            Err(_) => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "TAP_BAD_FILTER",
                    &format!("limit {l:?}: a number of lines"),
                )
            }
        },
    };
    let tap = match tap::subscribe(filter) {
        Ok(t) => t,
        Err(e @ TapError::Limit) => return error(StatusCode::TOO_MANY_REQUESTS, "TAP_LIMIT", &e.to_string()),
        Err(e) => return error(StatusCode::BAD_REQUEST, "TAP_BAD_FILTER", &e.to_string()),
    };
    // A reader slower than the traffic must fall behind in the tap's queue, where lines are
    // counted when dropped, not in the kernel: on loopback the send buffer grows to megabytes
    // (3.6 MB, some 12,000 lines, were seen buffered for a reader that read nothing).
    if let Some(s) = socket {
        let _ = socket2::SockRef::from(s).set_send_buffer_size(SEND_BUFFER);
    }
    let mut r = Response::new(Either::Right(Stream {
        tap,
        left,
        reported: 0,
        keepalive: Box::pin(tokio::time::sleep(KEEPALIVE)),
    }));
    for (name, value) in [
        (header::CONTENT_TYPE, "application/x-ndjson"),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        r.headers_mut().insert(name, header::HeaderValue::from_static(value));
    }
    r
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Body> {
    let mut r = super::json_response(json!({"error": code, "message": message})).map(Either::Left);
    *r.status_mut() = status;
    r
}

// === impl Stream ===

impl Stream {
    fn frame(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let deadline = tokio::time::Instant::now() + KEEPALIVE;
        self.keepalive.as_mut().reset(deadline);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl http_body::Body for Stream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if this.left == Some(0) {
            return Poll::Ready(None);
        }
        let dropped = this.tap.dropped();
        if dropped > this.reported {
            this.reported = dropped;
            return this.frame(tap::dropped_line(dropped));
        }
        match this.tap.poll_recv(cx) {
            Poll::Ready(Some(line)) => {
                if let Some(n) = &mut this.left {
                    *n -= 1;
                }
                this.frame(line)
            }
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.keepalive.as_mut().poll(cx) {
                Poll::Ready(()) => this.frame(Bytes::from_static(b"\n")),
                Poll::Pending => Poll::Pending,
            },
        }
    }
}
