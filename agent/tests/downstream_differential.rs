//! Differential test of vmesh's HTTP/1.1 server's request reading (`proxy::downstream::request`'s
//! head parser, then the body decoded by `upstream::h1::framing::BodyDecoder` as
//! `proxy::downstream::body` does) against hyper's HTTP/1.1 server
//! (`hyper::server::conn::http1`, the server vmesh used before): the same request bytes, cut into
//! the same reads, go through both, and both must agree on each request they accept (method,
//! target, version, header fields, the body bytes and trailers, whether the body failed), on
//! whether a pipelined request that follows is read (keep-alive), and on how the connection ends:
//! refused with which status (400, 431), closed between requests, closed in the middle of a head.
//!
//! hyper runs over an in-memory IO that hands out the reads one by one, then the end of the
//! stream; its service records each request and reads its body to the end before it answers.
//! vmesh's side is the loop of `downstream/h1.rs` without the sockets: the reads go into one
//! `BytesMut`, `HeadParser::parse` after each, the body decoded from the same buffer, the next
//! head read only when the request kept the connection alive.
//!
//! The inputs are named cases (valid, pipelined, truncated, duplicate, conflicting, listed and
//! signed Content-Length, obfuscated Transfer-Encoding, space before a colon, obs-fold, bad
//! methods, targets and versions, huge heads, too many fields, control bytes, bare LF...) cut at
//! every place into two reads (sampled places for inputs over 1 KiB) and at sampled places into
//! three, and requests assembled from parts with a fixed seed.
//!
//! Where the two differ on purpose, RFC 9112 decides, and the difference is written down here:
//!
//! 1. A request whose Transfer-Encoding is anything but exactly one `chunked` field (another
//!    coding, a list, a second field) is refused with 400, and so is one with both
//!    Transfer-Encoding and Content-Length. hyper accepts a Transfer-Encoding whose last coding is
//!    `chunked` (`gzip, chunked`, two fields), reads the body as chunked and drops the
//!    Content-Length. RFC 9112 §6.1: a server "MAY reject a request that contains both
//!    Content-Length and Transfer-Encoding" ("... or process such a request in accordance with
//!    the Transfer-Encoding alone"), and a proxy only forwards codings its upstream understands;
//!    the strict reading closes the request-smuggling shapes. `Expect::TransferEncoding`, and
//!    every generated request that vmesh refuses for this reason.
//! 2. A repeated Content-Length with the same value is kept as it came (one field per line);
//!    hyper keeps the first line. The comparison keeps the first of vmesh's (`one_length`).
//! 3. A chunk-size (digits and the whitespace after them) longer than 1 KiB is refused, where
//!    hyper reads any number of leading zeros (the decoder is the upstream client's; see
//!    `upstream_differential.rs`, difference 2). `Expect::LongChunkSize`.
//! 4. A request head larger than `proxy.max_header_bytes` is refused (431) exactly; hyper checks
//!    its `max_buf_size` only while a head is incomplete, after each read, and a read may fill
//!    the buffer past the limit, so it accepts some heads over it depending on how the bytes
//!    arrived. `Expect::OverHeadLimit`.
//!
//! 5. A Content-Length of 18446744073709551614 or 18446744073709551615 (u64::MAX - 1, u64::MAX)
//!    is refused by both: vmesh with 400 (an invalid length), hyper with 431 (it keeps those two
//!    values as markers for chunked and close-delimited bodies). `Expect::HugeLength`.
//! 6. A request target longer than 65534 bytes (`http::Uri`'s limit) is refused by both with 414
//!    URI Too Long (only possible under a `proxy.max_header_bytes` over 64 KiB): no difference
//!    left, kept as a named case. `Expect::UriTooLong`.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::{header, HeaderMap, Request, Response, Version};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vmesh_agent::proxy::downstream::request::{Framing, HeadError, HeadParser};
use vmesh_agent::upstream::h1::framing::{BodyDecoder, Decoded, ResponseFraming};
use vmesh_agent::upstream::h1::Limits;

/// `proxy.max_header_bytes` by default: vmesh's head limit, hyper's `max_buf_size`.
const MAX_HEAD: usize = 64 << 10;

/// Polls hyper's connection gets before it counts as waiting for bytes that will not come.
/// Everything is in memory and the IO always answers: hyper only pauses to yield.
const ROUNDS: usize = 4096;

/// The status the recording service answers every request with (not 2xx: a 2xx to CONNECT
/// would leave HTTP; not 1xx: hyper's own `100 Continue`).
const ANSWER: u16 = 404;

/// A client connection: the requests cut into reads, then the end of the stream; writes kept.
struct Client {
    reads: VecDeque<Vec<u8>>,
    written: Arc<Mutex<Vec<u8>>>,
}

/// What a server made of a connection's bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Exchange {
    requests: Vec<Req>,
    end: End,
}

/// One request a server accepted.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Req {
    method: String,
    uri: String,
    version: Version,
    /// Sorted by name, the order of one name's values kept.
    fields: Vec<(String, Vec<u8>)>,
    /// The body bytes, up to the failure if it failed.
    body: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
    body_end: BodyEnd,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    Complete,
    Failed,
    /// hyper dropped the request before its body ended.
    Unfinished,
}

/// How the connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// Closed between two requests (the client's end, or a request that asked to close).
    Closed,
    /// The client's bytes ended in the middle of a head.
    Incomplete,
    /// A head was refused with this status.
    Refused(u16),
    /// The last request's body failed.
    BodyFailed,
    /// hyper stopped some other way, or never stopped.
    Other(String),
}

/// What a case expects of the two servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Same,
    /// Difference 1: hyper reads the request, vmesh refuses its Transfer-Encoding.
    TransferEncoding,
    /// Difference 3: hyper reads the body, vmesh refuses the chunk-size line.
    LongChunkSize,
    /// Difference 4: vmesh refuses the head; hyper may not, depending on how the bytes arrived.
    OverHeadLimit,
    /// Difference 5: both refuse the length, hyper with 431, vmesh with 400.
    HugeLength,
    /// Case 6: both refuse the target with 414.
    UriTooLong,
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    expect: Expect,
    /// vmesh's head limit and hyper's `max_buf_size`.
    max_head: usize,
}

/// vmesh's answer, and why it refused a head (not compared; difference 1 is recognised by it).
struct Vmesh {
    exchange: Exchange,
    refused: Option<HeadError>,
}

// === the two servers ===

impl Client {
    fn new(input: &[u8], cuts: &[usize]) -> Self {
        Self {
            reads: pieces(input, cuts).into_iter().map(<[u8]>::to_vec).collect(),
            written: Arc::default(),
        }
    }
}

/// `input` cut at `cuts` (clamped, in order), without empty pieces.
fn pieces<'a>(input: &'a [u8], cuts: &[usize]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    for c in cuts.iter().copied().chain([input.len()]) {
        let c = c.clamp(start, input.len());
        if c > start {
            out.push(&input[start..c]);
        }
        start = c;
    }
    out
}

impl AsyncRead for Client {
    fn poll_read(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if let Some(mut r) = self.reads.pop_front() {
            let n = r.len().min(buf.remaining());
            buf.put_slice(&r[..n]);
            if n < r.len() {
                self.reads.push_front(r.split_off(n));
            }
        }
        // Nothing left: the end of the stream.
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for Client {
    fn poll_write(self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.written.lock().expect("not poisoned").extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

fn fields(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    let mut f: Vec<(String, Vec<u8>)> = h
        .iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect();
    // Stable: one name's values stay in their order.
    f.sort_by(|a, b| a.0.cmp(&b.0));
    f
}

/// The requests through hyper's server, as `proxy/http.rs` set it up for HTTP/1.1.
async fn through_hyper(input: &[u8], cuts: &[usize], max_head: usize) -> Exchange {
    let client = Client::new(input, cuts);
    let written = client.written.clone();
    let log: Arc<Mutex<Vec<Req>>> = Arc::default();
    let seen = log.clone();
    let service = service_fn(move |req: Request<Incoming>| {
        // Recorded when hyper hands the request over, before its future is first polled.
        let log = seen.clone();
        let (parts, mut body) = req.into_parts();
        let index = {
            let mut log = log.lock().expect("not poisoned");
            log.push(Req {
                method: parts.method.to_string(),
                uri: parts.uri.to_string(),
                version: parts.version,
                fields: fields(&parts.headers),
                body: Vec::new(),
                trailers: None,
                body_end: BodyEnd::Unfinished,
            });
            log.len() - 1
        };
        async move {
            let (mut data, mut trailers) = (Vec::new(), None);
            let end = loop {
                match body.frame().await {
                    None => break BodyEnd::Complete,
                    Some(Err(_)) => break BodyEnd::Failed,
                    Some(Ok(frame)) => match frame.into_data() {
                        Ok(d) => data.extend_from_slice(&d),
                        Err(frame) => trailers = frame.into_trailers().ok().map(|t| fields(&t)),
                    },
                }
            };
            {
                let mut log = log.lock().expect("not poisoned");
                let r = &mut log[index];
                (r.body, r.trailers, r.body_end) = (data, trailers, end);
            }
            let mut resp = Response::new(Empty::<Bytes>::new());
            *resp.status_mut() = http::StatusCode::from_u16(ANSWER).expect("a valid status");
            Ok::<_, Infallible>(resp)
        }
    });
    let mut conn = Box::pin(
        http1::Builder::new()
            .writev(false)
            .max_buf_size(max_head)
            .keep_alive(true)
            // A client that ends its stream after its last request still gets the answer.
            .half_close(true)
            .serve_connection(TokioIo::new(client), service),
    );
    let mut result = None;
    for _ in 0..ROUNDS {
        if let Poll::Ready(r) = poll_fn(|cx| Poll::Ready(conn.as_mut().poll(cx))).await {
            result = Some(r);
            break;
        }
        tokio::task::yield_now().await;
    }
    drop(conn);
    let requests = log.lock().expect("not poisoned").clone();
    let refusal = statuses(&written.lock().expect("not poisoned"))
        .into_iter()
        .rev()
        .find(|s| *s != ANSWER && *s != 100);
    let end = if requests.last().is_some_and(|r| r.body_end != BodyEnd::Complete) {
        End::BodyFailed
    } else if let Some(status) = refusal {
        End::Refused(status)
    } else {
        match result {
            Some(Ok(())) => End::Closed,
            Some(Err(e)) if e.is_incomplete_message() => End::Incomplete,
            Some(Err(e)) => End::Other(format!("hyper: {e}")),
            None => End::Other("hyper still running".into()),
        }
    };
    Exchange { requests, end }
}

/// The statuses of the (bodiless) responses hyper wrote.
fn statuses(written: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(written);
    text.split("\r\n\r\n")
        .filter_map(|head| head.strip_prefix("HTTP/1.")?.get(2..5)?.parse().ok())
        .collect()
}

/// The requests through vmesh's head parser and body decoder, as `downstream/h1.rs` and
/// `downstream/body.rs` read them.
fn through_vmesh(input: &[u8], cuts: &[usize], max_head: usize) -> Vmesh {
    let mut reads = pieces(input, cuts).into_iter();
    let mut buf = BytesMut::new();
    let mut parser = HeadParser::default();
    let mut requests = Vec::new();
    let done = |requests, end| Vmesh {
        exchange: Exchange { requests, end },
        refused: None,
    };
    loop {
        let head = loop {
            match parser.parse(&mut buf, max_head) {
                Ok(Some(head)) => break head,
                Ok(None) => match reads.next() {
                    Some(r) => buf.extend_from_slice(r),
                    // Line ends alone are no message (hyper's `consume_leading_lines`); vmesh
                    // closes without an answer either way.
                    None if buf.iter().all(|b| matches!(b, b'\r' | b'\n')) => return done(requests, End::Closed),
                    None => return done(requests, End::Incomplete),
                },
                Err(e) => {
                    return Vmesh {
                        exchange: Exchange {
                            requests,
                            end: End::Refused(e.status().as_u16()),
                        },
                        refused: Some(e),
                    }
                }
            }
        };
        let framing = match head.framing {
            Framing::Empty => ResponseFraming::Empty,
            Framing::Length(n) => ResponseFraming::Length(n),
            Framing::Chunked => ResponseFraming::Chunked,
        };
        let mut decoder = BodyDecoder::new(framing, &Limits::default());
        let (mut body, mut trailers) = (Vec::new(), None);
        let body_end = loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => body.extend_from_slice(&d),
                Ok(Decoded::End(t)) => {
                    trailers = t.map(|t| fields(&t));
                    break BodyEnd::Complete;
                }
                Ok(Decoded::NeedMore) => match reads.next() {
                    Some(r) => buf.extend_from_slice(r),
                    None => match decoder.eof() {
                        Ok(Decoded::End(_)) => break BodyEnd::Complete,
                        _ => break BodyEnd::Failed,
                    },
                },
                Err(_) => break BodyEnd::Failed,
            }
        };
        requests.push(Req {
            method: head.method.to_string(),
            uri: head.uri.to_string(),
            version: head.version,
            fields: fields(&head.headers),
            body,
            trailers,
            body_end,
        });
        if body_end != BodyEnd::Complete {
            return done(requests, End::BodyFailed);
        }
        if !head.keep_alive {
            return done(requests, End::Closed);
        }
    }
}

/// Difference 2: the first of repeated Content-Length fields (vmesh refuses differing ones).
fn one_length(e: &mut Exchange) {
    for r in &mut e.requests {
        let mut seen = false;
        r.fields
            .retain(|(n, _)| n != header::CONTENT_LENGTH.as_str() || !std::mem::replace(&mut seen, true));
    }
}

/// Whether vmesh refused a head for its Transfer-Encoding rule (difference 1): a refused
/// Transfer-Encoding, both framings, or a Content-Length that hyper skips because a
/// Transfer-Encoding came first.
fn refused_for_te(v: &Vmesh, input: &[u8]) -> bool {
    let te = input
        .windows(b"transfer-encoding".len())
        .any(|w| w.eq_ignore_ascii_case(b"transfer-encoding"));
    match v.refused {
        Some(HeadError::TransferEncoding | HeadError::BothFramings) => true,
        Some(HeadError::ContentLength) => te,
        _ => false,
    }
}

/// Runs one case with one set of cuts through both, and checks they agree.
async fn compare(case: &Case, cuts: &[usize], generated: bool) {
    let hyper = through_hyper(&case.bytes, cuts, case.max_head).await;
    let vmesh = through_vmesh(&case.bytes, cuts, case.max_head);
    let mut ours = vmesh.exchange.clone();
    one_length(&mut ours);
    let mut expected = hyper.clone();
    let fail = |why: &str| -> ! {
        panic!(
            "{}: {why} (reads cut at {cuts:?}):\n  input: {}\n  hyper: {}\n  vmesh: {}",
            case.name,
            short(&case.bytes),
            show(&hyper),
            show(&vmesh.exchange),
        )
    };
    match case.expect {
        Expect::Same if generated && refused_for_te(&vmesh, &case.bytes) => {
            // Difference 1, when the parts made such a request: hyper read it (or refused it too).
            let k = ours.requests.len();
            if expected.requests.len() > k {
                expected.requests.truncate(k);
                expected.end = ours.end.clone();
            }
        }
        Expect::Same => {}
        Expect::TransferEncoding => {
            let k = ours.requests.len();
            if !refused_for_te(&vmesh, &case.bytes) || expected.requests.len() <= k {
                fail("expected vmesh to refuse the transfer-encoding that hyper reads");
            }
            expected.requests.truncate(k);
            expected.end = End::Refused(400);
        }
        Expect::LongChunkSize => {
            let Some(r) = expected.requests.last_mut() else {
                fail("expected hyper to read the request");
            };
            if r.body_end != BodyEnd::Complete {
                fail("expected hyper to read long chunk sizes");
            }
            (r.body, r.trailers, r.body_end) = (Vec::new(), None, BodyEnd::Failed);
            expected.end = End::BodyFailed;
        }
        Expect::OverHeadLimit => {
            expected = Exchange {
                requests: Vec::new(),
                end: End::Refused(431),
            };
        }
        Expect::UriTooLong => {
            if expected.end != End::Refused(414) {
                fail("expected hyper to answer 414");
            }
        }
        Expect::HugeLength => {
            if expected.end != End::Refused(431) || !expected.requests.is_empty() {
                fail("expected hyper to refuse the length with 431");
            }
            expected.end = End::Refused(400);
        }
    }
    if ours != expected {
        fail("hyper and vmesh differ");
    }
}

/// Bytes for a failure message: escaped, at most 300 of them.
fn short(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(&bytes[..bytes.len().min(300)])
        .escape_debug()
        .to_string();
    if bytes.len() > 300 {
        format!("{text}... ({} bytes)", bytes.len())
    } else {
        text
    }
}

fn show(e: &Exchange) -> String {
    let list = |f: &[(String, Vec<u8>)]| {
        f.iter()
            .map(|(n, v)| format!("{n}: {}", short(v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let reqs: Vec<String> = e
        .requests
        .iter()
        .map(|r| {
            format!(
                "[{} {} {:?} [{}] body {:?} trailers {:?} {:?}]",
                r.method,
                short(r.uri.as_bytes()),
                r.version,
                list(&r.fields),
                short(&r.body),
                r.trailers.as_deref().map(list),
                r.body_end
            )
        })
        .collect();
    format!("{} then {:?}", reqs.join(" "), e.end)
}

/// Cuts to try: none; every single cut of an input up to 1 KiB (a hundred of a longer one,
/// sixteen of one over 64 KiB); and sampled pairs.
fn cuts_of(len: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut all = vec![vec![]];
    let step = match len {
        0..=1024 => 1,
        1025..=65536 => len / 100,
        _ => len / 16,
    };
    all.extend((1..len).step_by(step.max(1)).map(|c| vec![c]));
    let pairs = if len > 64 * 1024 { 4 } else { 16 };
    if len > 2 {
        for _ in 0..pairs {
            let (a, b) = (1 + rng.below(len - 1), 1 + rng.below(len - 1));
            all.push(vec![a.min(b), a.max(b)]);
        }
    }
    all
}

/// A small deterministic generator (xorshift64*), so that a failure reproduces.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

// === the inputs ===

fn case(name: &str, bytes: impl Into<Vec<u8>>) -> Case {
    Case {
        name: name.to_owned(),
        bytes: bytes.into(),
        expect: Expect::Same,
        max_head: MAX_HEAD,
    }
}

fn differs(expect: Expect, name: &str, bytes: impl Into<Vec<u8>>) -> Case {
    Case {
        expect,
        ..case(name, bytes)
    }
}

#[rustfmt::skip] // One case a line.
fn named_cases() -> Vec<Case> {
    let get = "GET /a?b=1 HTTP/1.1\r\nHost: x\r\n";
    let post = "POST /p HTTP/1.1\r\nHost: x\r\n";
    let te = "POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n";
    let body = "5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";
    let next = "GET /next HTTP/1.1\r\nHost: x\r\n\r\n";
    let mut cases = vec![
        // Valid.
        case("GET", format!("{get}\r\n")),
        case("GET in HTTP/1.0", "GET / HTTP/1.0\r\n\r\n"),
        case("length", format!("{post}Content-Length: 5\r\n\r\nhello")),
        case("zero length", format!("{post}Content-Length: 0\r\n\r\n")),
        case("length with leading zeros", format!("{post}Content-Length: 005\r\n\r\nhello")),
        case("length on a GET", format!("{get}Content-Length: 2\r\n\r\nhi")),
        case("length in HTTP/1.0", "POST / HTTP/1.0\r\nContent-Length: 2\r\n\r\nhi"),
        case("chunked", format!("{te}\r\n{body}")),
        case("Chunked, tabs around", format!("{post}Transfer-Encoding:\tChunked \r\n\r\n{body}")),
        case("chunked with extensions", format!("{te}\r\n5;a=b\r\nhello\r\n6 ; c=\"d;e\"\r\n world\r\n0;f\r\n\r\n")),
        case("chunked with trailers", format!("{te}\r\n5\r\nhello\r\n0\r\nT: 1\r\nU: 2\r\n\r\n")),
        case("chunked with hex sizes", format!("{te}\r\na\r\n0123456789\r\nB\r\n0123456789a\r\n00\r\n\r\n")),
        case("chunked, only the last chunk", format!("{te}\r\n0\r\n\r\n")),
        case("expect 100-continue", format!("{post}Expect: 100-continue\r\nContent-Length: 2\r\n\r\nhi")),
        case("websocket upgrade", format!("{get}Upgrade: websocket\r\nConnection: Upgrade\r\n\r\n")),
        case("CONNECT", "CONNECT app:443 HTTP/1.1\r\nHost: app:443\r\n\r\n"),
        case("OPTIONS *", "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n"),
        case("absolute form", "GET http://app:8080/x?y=1 HTTP/1.1\r\nHost: app:8080\r\n\r\n"),
        case("absolute form, https, no path", "GET https://app HTTP/1.1\r\n\r\n"),
        case("authority form on GET", "GET app:80 HTTP/1.1\r\n\r\n"),
        case("lower-case method", "get / HTTP/1.1\r\n\r\n"),
        case("extension method", "PURGE /x HTTP/1.1\r\n\r\n"),
        case("repeated fields", format!("{get}Cookie: a\r\nX: 1\r\nCookie: b\r\n\r\n")),
        case("empty value", format!("{get}X:\r\nY: \r\n\r\n")),
        case("obs-text in a value", b"GET / HTTP/1.1\r\nX: caf\xe9\r\n\r\n".to_vec()),
        case("tab in a value", format!("{get}X: a\tb\r\n\r\n")),
        case("leading empty lines", format!("\r\n\r\n{get}\r\n")),
        case("percent-encoded target", "GET /a%20b/%E2%82%AC HTTP/1.1\r\n\r\n"),
        case("braces and pipes in the target", "GET /{a}|b^c HTTP/1.1\r\n\r\n"),
        // Pipelined.
        case("two GETs", format!("{get}\r\n{next}")),
        case("a body then a GET", format!("{post}Content-Length: 5\r\n\r\nhello{next}")),
        case("a chunked body then a GET", format!("{te}\r\n{body}{next}")),
        case("three requests", format!("{get}\r\n{post}Content-Length: 1\r\n\r\nx{next}")),
        case("close, then a GET not read", format!("{get}Connection: close\r\n\r\n{next}")),
        case("keep-alive, close", format!("{get}Connection: keep-alive, close\r\n\r\n{next}")),
        case("close in a second Connection field", format!("{get}Connection: close\r\nConnection: keep-alive\r\n\r\n{next}")),
        case("HTTP/1.0, then a GET not read", format!("GET / HTTP/1.0\r\n\r\n{next}")),
        case("HTTP/1.0 keep-alive, then a GET", format!("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n{next}")),
        case("an empty line between requests", format!("{get}\r\n\r\n{next}")),
        case("junk after a request", format!("{get}\r\njunk")),
        case("a body longer than its length", format!("{post}Content-Length: 2\r\n\r\nhello")),
        case("a second request refused", format!("{get}\r\nGET /a b HTTP/1.1\r\n\r\n")),
        // Truncated.
        case("nothing", ""),
        case("cut in the request line", "GET /a HTT"),
        case("cut in the head", format!("{get}Content-Len")),
        case("cut before the empty line", format!("{get}X: 1\r\n")),
        case("cut in the body", format!("{post}Content-Length: 10\r\n\r\nhello")),
        case("cut in a chunk", format!("{te}\r\n5\r\nhel")),
        case("cut after a chunk", format!("{te}\r\n5\r\nhello\r\n")),
        case("cut before the last CRLF", format!("{te}\r\n5\r\nhello\r\n0\r\n")),
        case("cut in the trailers", format!("{te}\r\n0\r\nT: 1\r\n")),
        // Content-Length.
        case("same length twice", format!("{post}Content-Length: 5\r\nContent-Length: 5\r\n\r\nhello")),
        case("same length twice, other case", format!("{post}Content-Length: 2\r\ncontent-length: 2\r\n\r\nhi")),
        case("differing lengths", format!("{post}Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!")),
        case("zero then a length", format!("{post}Content-Length: 0\r\nContent-Length: 5\r\n\r\nhello")),
        case("same length in a list", format!("{post}Content-Length: 5, 5\r\n\r\nhello")),
        case("differing lengths in a list", format!("{post}Content-Length: 5,6\r\n\r\nhello!")),
        case("plus sign", format!("{post}Content-Length: +5\r\n\r\nhello")),
        case("minus sign", format!("{post}Content-Length: -5\r\n\r\nhello")),
        case("hex length", format!("{post}Content-Length: 0x5\r\n\r\nhello")),
        case("empty length", format!("{post}Content-Length:\r\n\r\nhello")),
        case("length with a letter", format!("{post}Content-Length: 5x\r\n\r\nhello")),
        case("length with inner space", format!("{post}Content-Length: 1 0\r\n\r\nhello")),
        case("length with trailing space", format!("{post}Content-Length: 5 \r\n\r\nhello")),
        case("length past u64", format!("{post}Content-Length: 18446744073709551616\r\n\r\nhi")),
        case("length at hyper's largest", format!("{post}Content-Length: 18446744073709551613\r\n\r\nhi")),
        differs(Expect::HugeLength, "length past hyper's largest", format!("{post}Content-Length: 18446744073709551614\r\n\r\nhi")),
        differs(Expect::HugeLength, "length of u64::MAX", format!("{post}Content-Length: 18446744073709551615\r\n\r\nhi")),
        // Transfer-Encoding.
        differs(Expect::TransferEncoding, "chunked and a length", format!("{te}Content-Length: 3\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        differs(Expect::TransferEncoding, "a length and chunked", format!("{post}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        differs(Expect::TransferEncoding, "chunked and a bad length", format!("{te}Content-Length: x\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        differs(Expect::TransferEncoding, "identity, chunked", format!("{post}Transfer-Encoding: identity, chunked\r\n\r\n{body}")),
        differs(Expect::TransferEncoding, "gzip, chunked", format!("{post}Transfer-Encoding: gzip, chunked\r\n\r\n{body}")),
        differs(Expect::TransferEncoding, "chunked, chunked", format!("{post}Transfer-Encoding: chunked, chunked\r\n\r\n{body}")),
        differs(Expect::TransferEncoding, "chunked twice", format!("{te}Transfer-Encoding: chunked\r\n\r\n{body}")),
        differs(Expect::TransferEncoding, "gzip then chunked fields", format!("{post}Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n{body}")),
        differs(Expect::TransferEncoding, "a comma before chunked", format!("{post}Transfer-Encoding: , chunked\r\n\r\n{body}")),
        case("chunked then identity fields", format!("{te}Transfer-Encoding: identity\r\n\r\n{body}")),
        case("chunked, identity", format!("{post}Transfer-Encoding: chunked, identity\r\n\r\n{body}")),
        case("xchunked", format!("{post}Transfer-Encoding: xchunked\r\n\r\n{body}")),
        case("gzip", format!("{post}Transfer-Encoding: gzip\r\n\r\n{body}")),
        case("gzip and a length", format!("{post}Transfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nhi")),
        case("empty transfer-encoding", format!("{post}Transfer-Encoding:\r\n\r\n{body}")),
        case("chunked with a trailing comma", format!("{post}Transfer-Encoding: chunked,\r\n\r\n{body}")),
        case("chunked in quotes", format!("{post}Transfer-Encoding: \"chunked\"\r\n\r\n{body}")),
        case("chunked with a tab inside", format!("{post}Transfer-Encoding: chun\tked\r\n\r\n{body}")),
        case("chunked with obs-text", b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\xff\r\n\r\n0\r\n\r\n".to_vec()),
        case("chunked in HTTP/1.0", format!("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n{body}")),
        case("chunked and a length in HTTP/1.0", format!("POST / HTTP/1.0\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n{body}")),
        case("transfer-encoding with a space before the colon", format!("{post}Transfer-Encoding : chunked\r\n\r\n{body}")),
        case("transfer-encoding folded", format!("{post}Transfer-Encoding:\r\n chunked\r\n\r\n{body}")),
        case("transfer_encoding", format!("{post}Transfer_Encoding: chunked\r\n\r\n{body}")),
        case("transfer-encoding with a vertical tab", format!("{post}Transfer-Encoding:\x0bchunked\r\n\r\n{body}")),
        // Chunk framing.
        case("chunked with 100-continue", format!("{te}Expect: 100-continue\r\n\r\n{body}{next}")),
        case("a length on CONNECT", "CONNECT app:443 HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi"),
        case("CONNECT without a port", "CONNECT app HTTP/1.1\r\n\r\n"),
        case("absolute form with userinfo", "GET http://u:p@app/ HTTP/1.1\r\n\r\n"),
        case("absolute form, no path, a port", "GET http://app:80 HTTP/1.1\r\n\r\n"),
        case("absolute form, IPv6", "GET http://[::1]:8080/x HTTP/1.1\r\n\r\n"),
        case("unknown scheme", "GET ftp://app/x HTTP/1.1\r\n\r\n"),
        case("trailing whitespace in values", format!("{get}X: a \t \r\n\r\n")),
        case("space before the method", " GET / HTTP/1.1\r\n\r\n"),
        case("LF before the request line", "\nGET / HTTP/1.1\r\n\r\n"),
        case("forbidden trailers", format!("{te}\r\n2\r\nhi\r\n0\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\nHost: y\r\n\r\n")),
        case("large trailers", format!("{te}\r\n0\r\nt: {}\r\n\r\n", "v".repeat(16 * 1024))),
        case("long chunk extensions", format!("{te}\r\n2;{}\r\nhi\r\n0\r\n\r\n", "e".repeat(16 * 1024))),
        case("many small chunks", format!("{te}\r\n{}0\r\n\r\n", "1\r\nx\r\n".repeat(300))),
        case("a chunk split from its CRLF", format!("{te}\r\n2\r\nhi\r\r\n0\r\n\r\n")),
        case("chunk size not hex", format!("{te}\r\nzz\r\nhi\r\n0\r\n\r\n")),
        case("chunk size with a sign", format!("{te}\r\n+2\r\nhi\r\n0\r\n\r\n")),
        case("chunk size with 0x", format!("{te}\r\n0x2\r\nhi\r\n0\r\n\r\n")),
        case("empty chunk size", format!("{te}\r\n\r\nhi\r\n0\r\n\r\n")),
        case("space before the chunk size", format!("{te}\r\n 2\r\nhi\r\n0\r\n\r\n")),
        case("chunk size overflow", format!("{te}\r\n10000000000000000\r\nhi\r\n0\r\n\r\n")),
        case("chunk longer than its size", format!("{te}\r\n2\r\nhi!\r\n0\r\n\r\n")),
        case("bare LF after a chunk size", format!("{te}\r\n2\nhi\r\n0\r\n\r\n")),
        case("bare LF after chunk data", format!("{te}\r\n2\r\nhi\n0\r\n\r\n")),
        case("bare LF chunked body", format!("{te}\r\n5\nhello\n0\n\n")),
        case("newline in a chunk extension", format!("{te}\r\n2;a\nhi\r\n0\r\n\r\n")),
        case("bad trailer", format!("{te}\r\n0\r\nno colon\r\n\r\n")),
        case("long leading zeros", format!("{te}\r\n{}2\r\nhi\r\n0\r\n\r\n", "0".repeat(1000))),
        differs(Expect::LongChunkSize, "chunk size over 1 KiB", format!("{te}\r\n{}2\r\nhi\r\n0\r\n\r\n", "0".repeat(1100))),
        case("many trailers", format!("{te}\r\n0\r\n{}\r\n", "t: v\r\n".repeat(101))),
        // Malformed heads.
        case("space before the colon", format!("{get}Host : x\r\n\r\n")),
        case("tab before the colon", format!("{get}X\t: a\r\n\r\n")),
        case("obs-fold", format!("{get}X: a\r\n b\r\n\r\n")),
        case("space before the first field", "GET / HTTP/1.1\r\n X: a\r\n\r\n"),
        case("no colon", format!("{get}X a\r\n\r\n")),
        case("empty field name", format!("{get}: a\r\n\r\n")),
        case("field name with a slash", format!("{get}X/Y: a\r\n\r\n")),
        case("NUL in a field name", format!("{get}X\0Y: a\r\n\r\n")),
        case("NUL in a value", format!("{get}X: a\0b\r\n\r\n")),
        case("SOH in a value", format!("{get}X: a\x01b\r\n\r\n")),
        case("DEL in a value", format!("{get}X: a\x7fb\r\n\r\n")),
        case("CR in a value", format!("{get}X: a\rb\r\n\r\n")),
        case("bad method", "G@T / HTTP/1.1\r\n\r\n"),
        case("method with a space", "GE T / HTTP/1.1\r\n\r\n"),
        case("method with a slash", "GET/ / HTTP/1.1\r\n\r\n"),
        case("no method", " / HTTP/1.1\r\n\r\n"),
        case("non-ASCII method", b"G\xc9T / HTTP/1.1\r\n\r\n".to_vec()),
        case("space in the target", "GET /a b HTTP/1.1\r\n\r\n"),
        case("two spaces before the target", "GET  / HTTP/1.1\r\n\r\n"),
        case("two spaces before the version", "GET /  HTTP/1.1\r\n\r\n"),
        case("tab as a separator", "GET\t/\tHTTP/1.1\r\n\r\n"),
        case("DEL in the target", "GET /\x7f HTTP/1.1\r\n\r\n"),
        case("non-ASCII target", b"GET /\xff HTTP/1.1\r\n\r\n".to_vec()),
        case("fragment in the target", "GET /a#b HTTP/1.1\r\n\r\n"),
        case("relative target", "GET a/b HTTP/1.1\r\n\r\n"),
        case("empty authority", "GET http:// HTTP/1.1\r\n\r\n"),
        case("bad port", "GET http://a:99999/ HTTP/1.1\r\n\r\n"),
        case("HTTP/1.2", "GET / HTTP/1.2\r\n\r\n"),
        case("HTTP/2.0", "GET / HTTP/2.0\r\n\r\n"),
        // (The whole HTTP/2 preface never gets here: `proxy/http.rs` gives it to hyper's HTTP/2.)
        case("PRI in HTTP/1.1", "PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n"),
        case("lower-case version", "GET / http/1.1\r\n\r\n"),
        case("HTTP/0.9", "GET /\r\n\r\n"),
        case("space after the version", "GET / HTTP/1.1 \r\n\r\n"),
        case("not HTTP", "THIS IS NOT HTTP AT ALL\r\n\r\n"),
        case("binary", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n".to_vec()),
        // Line endings.
        case("bare LF head", "GET / HTTP/1.1\nHost: x\n\n"),
        case("bare LF head, then a GET", format!("GET / HTTP/1.1\nHost: x\n\n{next}")),
        case("bare LF body after", "POST / HTTP/1.1\nContent-Length: 2\n\nhi"),
        case("mixed line ends", "GET / HTTP/1.1\r\nHost: x\n\r\n"),
        case("LF then CRLF end", "GET / HTTP/1.1\nHost: x\r\n\n"),
        case("bare CR line ends", "GET / HTTP/1.1\rHost: x\r\r"),
        case("CR in the request line", "GET /\r HTTP/1.1\r\n\r\n"),
    ];
    // Limits on the head.
    let many = |n: usize| (0..n).map(|i| format!("X-{i}: v\r\n")).collect::<String>();
    cases.push(case("100 fields", format!("GET / HTTP/1.1\r\n{}\r\n", many(100))));
    cases.push(case("101 fields", format!("GET / HTTP/1.1\r\n{}\r\n", many(101))));
    cases.push(case("101 fields, cut", format!("GET / HTTP/1.1\r\n{}", many(101))));
    let line = "GET / HTTP/1.1\r\n";
    let at = MAX_HEAD - line.len() - "X: \r\n\r\n".len();
    let value = |len: usize| "v".repeat(len);
    cases.push(case(
        "a head as large as allowed",
        format!("{line}X: {}\r\n\r\n", value(at)),
    ));
    cases.push(case(
        "a head as large as allowed, then a GET",
        format!("{line}X: {}\r\n\r\n{next}", value(at)),
    ));
    for (name, len) in [("a head one byte too large", at + 1), ("a huge head", 2 * MAX_HEAD)] {
        cases.push(differs(
            Expect::OverHeadLimit,
            name,
            format!("{line}X: {}\r\n\r\n", value(len)),
        ));
    }
    cases.push(case("an endless head", format!("{line}X: {}", value(MAX_HEAD + 100))));
    cases.push(differs(
        Expect::OverHeadLimit,
        "a huge target",
        format!("GET /{} HTTP/1.1\r\n\r\n", "t".repeat(MAX_HEAD)),
    ));
    cases.push(differs(
        Expect::OverHeadLimit,
        "a huge field name",
        format!("{line}{}: v\r\n\r\n", "n".repeat(70_000)),
    ));
    // Under a larger `proxy.max_header_bytes`: the limits of a target and of a field name.
    let large = |name: &str, bytes: String| Case {
        max_head: 1 << 20,
        ..case(name, bytes)
    };
    cases.push(large(
        "a target as long as allowed",
        format!("GET /{} HTTP/1.1\r\n\r\n", "t".repeat(65_533)),
    ));
    cases.push(Case {
        expect: Expect::UriTooLong,
        ..large(
        "a target too long",
        format!("GET /{} HTTP/1.1\r\n\r\n", "t".repeat(65_534)),
    )});
    cases.push(large(
        "a field name too long",
        format!("{line}{}: v\r\n\r\n", "n".repeat(1 << 16)),
    ));
    cases
}

/// Requests assembled from parts: request lines, framing fields, other fields, bodies and what
/// follows, drawn with a fixed seed.
fn generated_cases(rng: &mut Rng, count: usize) -> Vec<Case> {
    let line = [
        "GET / HTTP/1.1",
        "POST /p?q=1 HTTP/1.1",
        "PUT http://h/x HTTP/1.1",
        "POST / HTTP/1.0",
        "CONNECT h:443 HTTP/1.1",
        "get / HTTP/1.1",
        "POST /a b HTTP/1.1",
        "PATCH * HTTP/1.1",
        "\r\nDELETE /d HTTP/1.1",
    ];
    let framing = [
        "",
        "Content-Length: 5\r\n",
        "Content-Length: 0\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 5\r\n",
        "Content-Length: 5x\r\n",
        "Content-Length: +5\r\n",
        "Transfer-Encoding: chunked\r\n",
        "Transfer-Encoding: Chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Content-Length: 11\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked, gzip\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
        "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding : chunked\r\n",
        "Transfer-Encoding:\r\n chunked\r\n",
        "Content-Length:05\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: x\r\n",
        "Transfer-Encoding: CHUNKED \r\n",
        "Content-Length: 5\r\nTransfer-Encoding: gzip\r\n",
    ];
    let other = [
        "",
        "Host: h\r\n",
        "Connection: close\r\n",
        "Connection: keep-alive\r\n",
        "Expect: 100-continue\r\n",
        "X-A: 1\r\nX-A: 2\r\n",
        "Upgrade: websocket\r\nConnection: upgrade\r\n",
        "X: a\0b\r\n",
        "Connection: close, keep-alive\r\n",
        "Expect: 100-continue\r\nConnection: close\r\n",
        "X : y\r\n",
        "X: a\r\n b\r\n",
    ];
    let body = [
        "",
        "hello",
        "hello world",
        "hel",
        "5\r\nhello\r\n0\r\n\r\n",
        "5\r\nhello\r\n0\r\nT: 1\r\n\r\n",
        "5\r\nhel",
        "5\r\nhello\r\n",
        "0\r\n\r\n",
        "zz\r\n",
        "5;x\r\nhello\r\n0\r\n\r\n",
        "5\nhello\n0\n\n",
        "2\r\nhi\r\n0\r\n\r\n\r\n",
    ];
    let after = [
        "",
        "",
        "GET /next HTTP/1.1\r\n\r\n",
        "POST /n HTTP/1.1\r\nContent-Length: 2\r\n\r\nhi",
        "\r\n",
        "x",
    ];
    (0..count)
        .map(|i| {
            let bytes = [
                *rng.pick(&line),
                "\r\n",
                *rng.pick(&other),
                *rng.pick(&framing),
                "\r\n",
                *rng.pick(&body),
                *rng.pick(&after),
            ]
            .concat();
            case(&format!("generated #{i}"), bytes)
        })
        .collect()
}

// === the tests ===

#[tokio::test]
async fn hyper_and_vmesh_agree_on_named_requests_cut_anywhere() {
    let mut rng = Rng(0x5eed_0101);
    let mut runs = 0;
    for case in named_cases() {
        for cuts in cuts_of(case.bytes.len(), &mut rng) {
            compare(&case, &cuts, false).await;
            runs += 1;
        }
    }
    eprintln!("named requests: {runs} comparisons");
    assert!(runs > 10_000, "{runs} runs");
}

#[tokio::test]
async fn hyper_and_vmesh_agree_on_generated_requests_cut_anywhere() {
    let mut rng = Rng(0x5eed_0102);
    let mut runs = 0;
    let count = 1500;
    for case in generated_cases(&mut rng, count) {
        let len = case.bytes.len();
        let mut cuts = vec![vec![]];
        for _ in 0..6 {
            cuts.push(vec![1 + rng.below(len - 1)]);
        }
        for _ in 0..3 {
            let (a, b) = (1 + rng.below(len - 1), 1 + rng.below(len - 1));
            cuts.push(vec![a.min(b), a.max(b)]);
        }
        for cut in cuts {
            compare(&case, &cut, true).await;
            runs += 1;
        }
    }
    eprintln!("generated requests: {runs} comparisons");
    assert_eq!(runs, count * 10);
}

#[tokio::test]
async fn transfer_encoding_with_content_length_is_refused_where_hyper_reads_it() {
    // Difference 1 shown whole: hyper frames by Transfer-Encoding and drops the length.
    let bytes = b"POST / HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
    let hyper = through_hyper(bytes, &[], MAX_HEAD).await;
    let vmesh = through_vmesh(bytes, &[], MAX_HEAD);
    assert_eq!(hyper.requests.len(), 1, "{}", show(&hyper));
    assert_eq!(hyper.requests[0].body, b"hi");
    assert!(!hyper.requests[0].fields.iter().any(|(n, _)| n == "content-length"));
    assert_eq!(vmesh.refused, Some(HeadError::BothFramings));
    assert_eq!(vmesh.exchange.end, End::Refused(400));
}
