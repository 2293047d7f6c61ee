//! Exchanges over in-memory connections: when a connection is given back and when it closes,
//! 1xx and 101 answers, request bodies (length, chunked, early answers, errors), the failures
//! the caller sees, and the head read's cancel safety.

use std::collections::VecDeque;
use std::io;
use std::pin::{pin, Pin};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, Empty, Full};
use tokio::io::{duplex, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::sync::mpsc;

use super::super::framing::BodyError;
use super::super::head::HeadError;
use super::super::Limits;
use super::*;

type Slot<S> = Arc<Mutex<Option<Conn<S>>>>;

/// A recycler that keeps the connection it is given, to look at.
fn keep<S>() -> (Slot<S>, impl FnOnce(Conn<S>) + Unpin) {
    let slot: Slot<S> = Arc::new(Mutex::new(None));
    let s = slot.clone();
    (slot, move |c| *s.lock().unwrap() = Some(c))
}

fn get(method: Method) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method)
        .uri("/x")
        .header("host", "up")
        .body(Empty::new())
        .unwrap()
}

/// A request body fed from a channel: unknown length, pending until sent to.
struct ChanBody(mpsc::Receiver<Result<Bytes, io::Error>>);

impl Body for ChanBody {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        self.0.poll_recv(cx).map(|o| o.map(|r| r.map(Frame::data)))
    }
}

/// Reads one request head (and `body` more bytes) from the server side.
async fn read_request(server: &mut DuplexStream, body: usize) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        assert_eq!(server.read(&mut byte).await.unwrap(), 1, "request cut: {got:?}");
        got.push(byte[0]);
    }
    let mut rest = vec![0u8; body];
    server.read_exact(&mut rest).await.unwrap();
    got.extend_from_slice(&rest);
    String::from_utf8(got).unwrap()
}

async fn text<B: Body<Data = Bytes>>(body: B) -> Result<String, B::Error> {
    let bytes = body.collect().await?.to_bytes();
    Ok(String::from_utf8(bytes.to_vec()).unwrap())
}

#[tokio::test]
async fn a_response_read_to_the_end_gives_the_connection_back_for_the_next_request() {
    let (client, mut server) = duplex(1 << 16);
    let (slot, back) = keep();
    server
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello")
        .await
        .unwrap();
    let resp = Conn::new(client).send(get(Method::GET), back).await.unwrap();
    assert_eq!(
        read_request(&mut server, 0).await,
        "GET /x HTTP/1.1\r\nhost: up\r\n\r\n"
    );
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(slot.lock().unwrap().is_none(), "given back before the body was read");
    assert_eq!(text(resp.into_body()).await.unwrap(), "hello");

    let mut conn = slot.lock().unwrap().take().expect("given back at the end of the body");
    assert!(conn.is_reusable());
    server
        .write_all(b"HTTP/1.1 201 Created\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        .await
        .unwrap();
    let (slot, back) = keep();
    let resp = conn.send(get(Method::GET), back).await.unwrap();
    assert_eq!(resp.status(), StatusCode::CREATED);
    assert_eq!(text(resp.into_body()).await.unwrap(), "abc");
    assert!(slot.lock().unwrap().is_some());
}

/// Sends a GET (or HEAD) answered by `response`, reads the body, and says whether the
/// connection was given back and still usable, with the body (or its error).
async fn outcome(method: Method, response: &[u8], close_after: bool) -> (Result<String, String>, bool) {
    let (client, mut server) = duplex(1 << 16);
    let (slot, back) = keep();
    server.write_all(response).await.unwrap();
    if close_after {
        server.shutdown().await.unwrap();
    }
    let resp = Conn::new(client).send(get(method), back).await.unwrap();
    let body = text(resp.into_body()).await.map_err(|e| e.to_string());
    let reused = slot.lock().unwrap().take().is_some_and(|mut c| c.is_reusable());
    (body, reused)
}

#[tokio::test]
async fn the_connection_is_reused_only_when_everything_lines_up() {
    let ok = |s: &str| Ok(s.to_owned());
    // (case, method, response, closed after it, body, reused)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(&str, Method, &[u8], bool, Result<String, String>, bool)> = vec![
        (
            "content-length",
            Method::GET,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            false,
            ok("hi"),
            true,
        ),
        (
            "chunked",
            Method::GET,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n",
            false,
            ok("hi"),
            true,
        ),
        (
            "empty 204",
            Method::GET,
            b"HTTP/1.1 204 No Content\r\n\r\n",
            false,
            ok(""),
            true,
        ),
        (
            "HEAD with a length",
            Method::HEAD,
            b"HTTP/1.1 200 OK\r\ncontent-length: 99\r\n\r\n",
            false,
            ok(""),
            true,
        ),
        (
            "HTTP/1.0 keep-alive",
            Method::GET,
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 2\r\n\r\nhi",
            false,
            ok("hi"),
            true,
        ),
        (
            "HTTP/1.0",
            Method::GET,
            b"HTTP/1.0 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            false,
            ok("hi"),
            false,
        ),
        (
            "connection: close",
            Method::GET,
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 2\r\n\r\nhi",
            false,
            ok("hi"),
            false,
        ),
        (
            "bytes after the response",
            Method::GET,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhiHTTP/1.1",
            false,
            ok("hi"),
            false,
        ),
        (
            "a body after a 204",
            Method::GET,
            b"HTTP/1.1 204 No Content\r\ncontent-length: 2\r\n\r\nhi",
            false,
            ok(""),
            false,
        ),
        (
            "closed after the response",
            Method::GET,
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nhi",
            true,
            ok("hi"),
            false,
        ),
        (
            "close-delimited",
            Method::GET,
            b"HTTP/1.1 200 OK\r\n\r\nuntil the end",
            true,
            ok("until the end"),
            false,
        ),
        (
            "cut short",
            Method::GET,
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhi",
            true,
            Err(Error::Body(BodyError::Incomplete).to_string()),
            false,
        ),
        (
            "bad chunk",
            Method::GET,
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
            false,
            Err(Error::Body(BodyError::ChunkSize).to_string()),
            false,
        ),
    ];
    for (name, method, response, close_after, body, reused) in cases {
        assert_eq!(outcome(method, response, close_after).await, (body, reused), "{name}");
    }
}

#[tokio::test]
async fn a_body_dropped_before_its_end_closes_the_connection() {
    let (client, mut server) = duplex(1 << 16);
    let (slot, back) = keep();
    server
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhello")
        .await
        .unwrap();
    let resp = Conn::new(client).send(get(Method::GET), back).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, "hello");
    drop(body);
    assert!(slot.lock().unwrap().is_none());
    read_request(&mut server, 0).await;
    assert_eq!(
        server.read(&mut [0u8; 8]).await.unwrap(),
        0,
        "the upstream sees the close"
    );
}

#[tokio::test]
async fn interim_responses_are_skipped_and_a_101_hands_over_the_connection() {
    let (client, mut server) = duplex(1 << 16);
    server
        .write_all(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    let resp = fields_into_map(Conn::new(client).send(get(Method::GET), Discard).await.unwrap());
    assert_eq!(resp.status(), StatusCode::OK);
    assert!(resp.headers().get("link").is_none());
    assert_eq!(resp.headers()["content-length"], "0");

    let (client, mut server) = duplex(1 << 16);
    server
        .write_all(b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\nearly frame")
        .await
        .unwrap();
    let resp = Conn::new(client).send(get(Method::GET), Discard).await.unwrap();
    assert_eq!(resp.status(), StatusCode::SWITCHING_PROTOCOLS);
    let mut body = resp.into_body();
    assert!(body.is_end_stream());
    let mut tunnel = body.take_upgraded().expect("the connection after a 101");
    assert!(body.take_upgraded().is_none());
    let mut early = [0u8; 11];
    tunnel.read_exact(&mut early).await.unwrap();
    assert_eq!(&early, b"early frame");
    tunnel.write_all(b"ping").await.unwrap();
    assert!(read_request(&mut server, 4).await.ends_with("\r\n\r\nping"));
    server.write_all(b"pong").await.unwrap();
    let mut pong = [0u8; 4];
    tunnel.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"pong");
}

#[tokio::test]
async fn a_streamed_request_body_goes_out_chunked_and_a_known_one_with_its_length() {
    let (client, mut server) = duplex(1 << 16);
    let (tx, rx) = mpsc::channel(4);
    let req = Request::post("/up").body(ChanBody(rx)).unwrap();
    let mut exchange = Conn::new(client).request(req);
    tx.send(Ok(Bytes::from_static(b"hello"))).await.unwrap();
    tx.send(Ok(Bytes::from_static(b" world"))).await.unwrap();
    drop(tx);
    server
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    exchange.read_head().await.unwrap();
    let wire = read_request(&mut server, 26).await;
    assert_eq!(
        wire,
        "POST /up HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    );
    let (slot, back) = keep();
    drop(exchange.into_response(back).unwrap());
    assert!(slot.lock().unwrap().is_some(), "the request went out whole: reusable");

    let (client, mut server) = duplex(1 << 16);
    let req = Request::put("/k").body(Full::new(Bytes::from_static(b"abc"))).unwrap();
    server
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
        .await
        .unwrap();
    Conn::new(client).send(req, Discard).await.unwrap();
    assert_eq!(
        read_request(&mut server, 3).await,
        "PUT /k HTTP/1.1\r\ncontent-length: 3\r\n\r\nabc"
    );
}

/// An in-memory connection: canned reads (then pending, or EOF), writes counted or refused.
struct Mock {
    reads: VecDeque<Vec<u8>>,
    eof: bool,
    refuse_writes: bool,
    writes: Arc<Mutex<Vec<Vec<u8>>>>,
}

impl Mock {
    fn new(reads: &[&str], eof: bool) -> (Self, Arc<Mutex<Vec<Vec<u8>>>>) {
        let writes = Arc::new(Mutex::new(Vec::new()));
        let mock = Self {
            reads: reads.iter().map(|r| r.as_bytes().to_vec()).collect(),
            eof,
            refuse_writes: false,
            writes: writes.clone(),
        };
        (mock, writes)
    }
}

impl AsyncRead for Mock {
    fn poll_read(mut self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.reads.pop_front() {
            Some(mut r) => {
                let n = r.len().min(buf.remaining());
                buf.put_slice(&r[..n]);
                if n < r.len() {
                    self.reads.push_front(r.split_off(n));
                }
                Poll::Ready(Ok(()))
            }
            None if self.eof => Poll::Ready(Ok(())),
            None => Poll::Pending,
        }
    }
}

impl AsyncWrite for Mock {
    fn poll_write(self: Pin<&mut Self>, _cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        if self.refuse_writes {
            return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into()));
        }
        self.writes.lock().unwrap().push(buf.to_vec());
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn the_head_and_a_ready_body_go_out_in_one_write() {
    let (mock, writes) = Mock::new(&["HTTP/1.1 204 No Content\r\n\r\n"], false);
    let req = Request::post("/p")
        .header("host", "h")
        .body(Full::new(Bytes::from(vec![b'x'; 1000])))
        .unwrap();
    Conn::new(mock).send(req, Discard).await.unwrap();
    let writes = writes.lock().unwrap();
    let mut want = b"POST /p HTTP/1.1\r\nhost: h\r\ncontent-length: 1000\r\n\r\n".to_vec();
    want.extend_from_slice(&[b'x'; 1000]);
    assert_eq!(*writes, [want], "one write for head and body");
}

#[tokio::test]
async fn an_answer_that_comes_while_the_request_body_is_still_going_out_is_read() {
    let (client, mut server) = duplex(1 << 16);
    let (tx, rx) = mpsc::channel(4);
    let req = Request::post("/slow").body(ChanBody(rx)).unwrap();
    tx.send(Ok(Bytes::from_static(b"part"))).await.unwrap();
    server
        .write_all(b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 3\r\n\r\nbig")
        .await
        .unwrap();
    let (slot, back) = keep();
    let resp = Conn::new(client).send(req, back).await.unwrap();
    assert_eq!(resp.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(text(resp.into_body()).await.unwrap(), "big");
    assert!(
        slot.lock().unwrap().is_none(),
        "the request did not go out whole: closed"
    );
    drop(tx);
}

#[tokio::test]
async fn a_write_error_still_lets_the_answer_through_and_is_reported_without_one() {
    let (mut mock, _) = Mock::new(&["HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n"], false);
    mock.refuse_writes = true;
    let (slot, back) = keep();
    let resp = Conn::new(mock).send(get(Method::GET), back).await.unwrap();
    assert_eq!(resp.status(), StatusCode::BAD_REQUEST);
    assert!(slot.lock().unwrap().is_none());

    let (mut mock, _) = Mock::new(&[], true);
    mock.refuse_writes = true;
    let err = Conn::new(mock).send(get(Method::GET), Discard).await.unwrap_err();
    assert!(
        matches!(&err, Error::Write(e) if e.kind() == io::ErrorKind::BrokenPipe),
        "{err:?}"
    );
}

#[tokio::test]
async fn request_body_failures_fail_the_exchange() {
    let (mock, _) = Mock::new(&[], false);
    let req = Request::post("/")
        .header("content-length", "10")
        .body(Full::new(Bytes::from_static(b"abc")))
        .unwrap();
    let err = Conn::new(mock).send(req, Discard).await.unwrap_err();
    assert!(matches!(err, Error::RequestBodyShort { missing: 7 }), "{err:?}");

    let (mock, _) = Mock::new(&[], false);
    let (tx, rx) = mpsc::channel(1);
    tx.send(Err(io::Error::other("client went away"))).await.unwrap();
    let req = Request::post("/").body(ChanBody(rx)).unwrap();
    let err = Conn::new(mock).send(req, Discard).await.unwrap_err();
    assert!(
        matches!(&err, Error::RequestBody(e) if e.to_string() == "client went away"),
        "{err:?}"
    );
}

#[tokio::test]
async fn what_the_caller_sees_when_the_upstream_fails() {
    let closed = Conn::new(Mock::new(&[], true).0)
        .send(get(Method::GET), Discard)
        .await
        .unwrap_err();
    assert!(matches!(closed, Error::Closed { read: 0 }), "{closed:?}");
    assert!(closed.is_closed_without_answer() && !closed.is_malformed());

    let cut = Conn::new(Mock::new(&["HTTP/1.1 200 OK\r\n"], true).0)
        .send(get(Method::GET), Discard)
        .await
        .unwrap_err();
    assert!(matches!(cut, Error::Closed { read: 17 }), "{cut:?}");
    assert!(!cut.is_closed_without_answer());

    let bad = Conn::new(Mock::new(&["HTTP/1.1 200 OK\r\nbad header\r\n\r\n"], false).0)
        .send(get(Method::GET), Discard)
        .await
        .unwrap_err();
    assert!(
        matches!(bad, Error::Head(HeadError::Syntax(_))) && bad.is_malformed(),
        "{bad:?}"
    );

    let lengths = Conn::new(
        Mock::new(
            &["HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\n"],
            false,
        )
        .0,
    )
    .send(get(Method::GET), Discard)
    .await
    .unwrap_err();
    assert!(
        matches!(lengths, Error::Framing(_)) && lengths.is_malformed(),
        "{lengths:?}"
    );

    let small = Limits {
        max_head_bytes: 32,
        ..Limits::default()
    };
    let big = Conn::with_limits(Mock::new(&["HTTP/1.1 200 OK\r\nx: 0123456789abcdef"], false).0, small)
        .send(get(Method::GET), Discard)
        .await
        .unwrap_err();
    assert!(matches!(big, Error::Head(HeadError::TooLarge(32))), "{big:?}");
}

#[tokio::test]
async fn reading_the_head_can_be_abandoned_and_taken_up_again() {
    let (client, mut server) = duplex(1 << 16);
    let mut exchange = Conn::new(client).request(get(Method::GET));
    server.write_all(b"HTTP/1.1 200 OK\r\ncontent-").await.unwrap();
    {
        // One poll reads the first half and finds no head; then the future is dropped.
        let mut read = pin!(exchange.read_head());
        let polled = std::future::poll_fn(|cx| Poll::Ready(read.as_mut().poll(cx))).await;
        assert!(polled.is_pending());
    }
    server.write_all(b"length: 2\r\n\r\nok").await.unwrap();
    exchange.read_head().await.unwrap();
    let resp = fields_into_map(exchange.into_response(Discard).unwrap());
    assert_eq!(resp.headers()["content-length"], "2");
    assert_eq!(text(resp.into_body()).await.unwrap(), "ok");
}

#[tokio::test]
async fn an_idle_connection_closed_by_the_upstream_is_not_reusable() {
    let (client, server) = duplex(1 << 16);
    let mut conn = Conn::new(client);
    assert!(conn.is_reusable());
    drop(server);
    assert!(!conn.is_reusable());

    let (mock, _) = Mock::new(&["unsolicited"], false);
    assert!(!Conn::new(mock).is_reusable());
}

#[tokio::test]
async fn into_response_before_the_head_is_an_error() {
    let exchange = Conn::new(Mock::new(&[], false).0).request(get(Method::GET));
    assert!(matches!(exchange.into_response(Discard), Err(Error::NoHead)));
}
