//! Differential test of vmesh's upstream HTTP/1.1 client (`vmesh_agent::upstream::h1`) against
//! hyper's (`hyper::client::conn::http1`, the client vmesh used before): the same response bytes,
//! cut into the same reads, go through both, and both must agree on whether the response is
//! accepted, its status, version, reason phrase and header fields, the body bytes and trailers,
//! how the body ends (complete, failed, still waiting) and whether the connection can carry
//! another request. The requests both write are compared too.
//!
//! The inputs are named cases (valid, truncated, duplicate and conflicting Content-Length,
//! Content-Length with Transfer-Encoding, obfuscated Transfer-Encoding, bad chunk sizes, huge
//! heads, 1xx before the final response, HEAD, 204/304 with a body-ish tail, pipelined extra
//! bytes...) cut at every place into two reads and at sampled places into three, plus responses
//! generated from parts with a fixed seed. Each runs twice: the upstream closes after its bytes,
//! or keeps the connection open (then a party that waits for more is `Waiting`).
//!
//! Where the two differ on purpose, RFC 9112 decides, and the difference is written down here:
//!
//! 1. Content-Length is removed from a response whose framing Transfer-Encoding decides (RFC 9112
//!    §6.3 rule 3: an intermediary "MUST first remove the received Content-Length field ... prior
//!    to forwarding"); hyper keeps it. The comparison removes it from hyper's fields
//!    (`te_decides_framing`), and `content_length_goes_when_transfer_encoding_decides` shows it.
//! 2. A chunk-size (digits and the whitespace after them) longer than 1 KiB is refused; hyper
//!    reads any number of leading zeros. RFC 9112 §7.1 sets no length, and a limit is what a
//!    recipient may impose on what it parses (RFC 9110 §2.3). Case `Expect::LongChunkSize`.
//! 3. A response head larger than `max_head_bytes` (hyper's 408 KiB) is refused exactly; hyper checks
//!    its limit after each read, and a read may fill the buffer's spare capacity past it, so it
//!    accepts some heads a little over the limit depending on allocation sizes. Case
//!    `Expect::OverHeadLimit`.
//! 4. Requests: hyper removes a field with `HeaderMap::remove`, which moves the last field into the
//!    hole; vmesh writes the fields in their order minus the removed one. Same fields, same values,
//!    same order per name: request heads are compared field by field, sorted by name.

use std::collections::VecDeque;
use std::future::{poll_fn, Future};
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Empty};
use hyper::client::conn::http1;
use hyper::ext::ReasonPhrase;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use vmesh_agent::upstream::h1::{fields_into_map, Conn, Limits};

/// Polls that a future gets, with a yield to the other tasks (hyper's connection task) between
/// two, before it counts as waiting for bytes that will not come. Everything is in memory on one
/// thread: what can happen happens within a few rounds.
const ROUNDS: usize = 64;

/// How the upstream's side ends after its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum End {
    Close,
    Open,
}

/// An upstream connection: the response cut into reads, then closed or silent; writes kept.
/// Like a server, it answers once a request came (hyper refuses bytes on an idle connection).
struct Script {
    reads: VecDeque<Vec<u8>>,
    end: End,
    written: Arc<Mutex<Vec<u8>>>,
    asked: Option<Waker>,
}

/// What one client made of a response.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// No response: refused, or the connection failed before a whole head.
    Refused,
    /// The head never completed and the connection stays open.
    Waiting,
    Response(Resp),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Resp {
    status: u16,
    version: Version,
    reason: Option<Vec<u8>>,
    fields: Vec<(String, Vec<u8>)>,
    body: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
    end: BodyEnd,
    reusable: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyEnd {
    Complete,
    Failed,
    Waiting,
}

/// What a case expects of the two clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Same,
    /// Difference 2: hyper reads the body, vmesh refuses the chunk-size line.
    LongChunkSize,
    /// Difference 3: vmesh refuses the head; hyper may not, depending on its buffer.
    OverHeadLimit,
}

struct Case {
    name: String,
    method: Method,
    bytes: Vec<u8>,
    expect: Expect,
}

// === the two clients ===

impl Script {
    fn new(input: &[u8], cuts: &[usize], end: End) -> Self {
        let mut reads = VecDeque::new();
        let mut start = 0;
        for c in cuts.iter().copied().chain([input.len()]) {
            let c = c.clamp(start, input.len());
            if c > start {
                reads.push_back(input[start..c].to_vec());
            }
            start = c;
        }
        Self {
            reads,
            end,
            written: Arc::default(),
            asked: None,
        }
    }
}

impl AsyncRead for Script {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.written.lock().expect("not poisoned").is_empty() {
            self.asked = Some(cx.waker().clone());
            return Poll::Pending;
        }
        match self.reads.pop_front() {
            Some(mut r) => {
                let n = r.len().min(buf.remaining());
                buf.put_slice(&r[..n]);
                if n < r.len() {
                    self.reads.push_front(r.split_off(n));
                }
                Poll::Ready(Ok(()))
            }
            None if self.end == End::Close => Poll::Ready(Ok(())),
            // Nothing will ever come: no waker to keep.
            None => Poll::Pending,
        }
    }
}

impl AsyncWrite for Script {
    fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.written.lock().expect("not poisoned").extend_from_slice(buf);
        if let Some(w) = self.asked.take() {
            w.wake();
        }
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

/// Polls `fut` until it is ready or `ROUNDS` polls found it waiting.
async fn settle<F: Future + Unpin>(fut: &mut F) -> Option<F::Output> {
    for _ in 0..ROUNDS {
        if let Poll::Ready(v) = poll_fn(|cx| Poll::Ready(Pin::new(&mut *fut).poll(cx))).await {
            return Some(v);
        }
        tokio::task::yield_now().await;
    }
    None
}

/// Lets the other tasks run until they have nothing left to do.
async fn quiesce() {
    for _ in 0..ROUNDS {
        tokio::task::yield_now().await;
    }
}

/// Reads a body frame by frame: its bytes, its trailers, how it ended.
async fn read_body<B>(mut body: B) -> (Vec<u8>, Option<Vec<(String, Vec<u8>)>>, BodyEnd)
where
    B: Body<Data = Bytes> + Unpin,
{
    let mut data = Vec::new();
    let mut trailers = None;
    loop {
        let mut next = body.frame();
        match settle(&mut next).await {
            None => return (data, trailers, BodyEnd::Waiting),
            Some(None) => return (data, trailers, BodyEnd::Complete),
            Some(Some(Err(_))) => return (data, trailers, BodyEnd::Failed),
            Some(Some(Ok(frame))) => match frame.into_data() {
                Ok(d) => data.extend_from_slice(&d),
                Err(frame) => trailers = frame.into_trailers().ok().map(|t| fields(&t)),
            },
        }
    }
}

fn fields(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

fn request(method: &Method) -> Request<Empty<Bytes>> {
    Request::builder()
        .method(method.clone())
        .uri("/")
        .header("host", "upstream")
        .body(Empty::new())
        .expect("a valid request")
}

fn head<B>(resp: &Response<B>) -> Resp {
    Resp {
        status: resp.status().as_u16(),
        version: resp.version(),
        reason: resp.extensions().get::<ReasonPhrase>().map(|r| r.as_bytes().to_vec()),
        fields: fields(resp.headers()),
        body: Vec::new(),
        trailers: None,
        end: BodyEnd::Complete,
        reusable: false,
    }
}

/// The response through hyper's client, as `proxy/pool.rs` (now `upstream/pool.rs`) set it up.
async fn through_hyper(method: &Method, script: Script) -> Outcome {
    let Ok((mut sender, conn)) = http1::Builder::new()
        .writev(false)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(script))
        .await
    else {
        return Outcome::Refused;
    };
    let driver = tokio::spawn(conn.with_upgrades());
    let mut sent = Box::pin(sender.send_request(request(method)));
    let outcome = match settle(&mut sent).await {
        None => Outcome::Waiting,
        Some(Err(_)) => Outcome::Refused,
        Some(Ok(resp)) => {
            let mut r = head(&resp);
            (r.body, r.trailers, r.end) = read_body(resp.into_body()).await;
            if r.end == BodyEnd::Complete {
                quiesce().await;
                r.reusable = sender.is_ready();
            }
            Outcome::Response(r)
        }
    };
    driver.abort();
    outcome
}

/// The response through vmesh's client; reusable: given back, and still usable once every
/// byte the upstream sent has arrived (the pool's check when it hands the connection out).
async fn through_vmesh(method: &Method, script: Script) -> Outcome {
    let back: Arc<Mutex<Option<Conn<Script>>>> = Arc::default();
    let slot = back.clone();
    let recycle = move |c| *slot.lock().expect("not poisoned") = Some(c);
    let mut sent = Box::pin(Conn::new(script).send(request(method), recycle));
    match settle(&mut sent).await {
        None => Outcome::Waiting,
        Some(Err(_)) => Outcome::Refused,
        Some(Ok(resp)) => {
            // Every field kept as it came, put into a map (the request path then leaves out the
            // hop-by-hop and `x-vmesh-*` ones; hyper's client keeps them all too).
            let resp = fields_into_map(resp);
            let mut r = head(&resp);
            (r.body, r.trailers, r.end) = read_body(resp.into_body()).await;
            let returned = back.lock().expect("not poisoned").take();
            r.reusable = r.end == BodyEnd::Complete && returned.is_some_and(|mut c| c.is_reusable());
            Outcome::Response(r)
        }
    }
}

/// Whether Transfer-Encoding decides this response's framing (difference 1).
fn te_decides_framing(method: &Method, r: &Resp) -> bool {
    let no_body = matches!(r.status, 100..=199 | 204 | 304) || *method == Method::HEAD;
    let tunnel = *method == Method::CONNECT && (200..300).contains(&r.status);
    !no_body && !tunnel && r.fields.iter().any(|(n, _)| n == "transfer-encoding")
}

/// Runs one case with one cut and one end through both, and checks they agree.
async fn compare(case: &Case, cuts: &[usize], end: End) {
    let hyper = through_hyper(&case.method, Script::new(&case.bytes, cuts, end)).await;
    let vmesh = through_vmesh(&case.method, Script::new(&case.bytes, cuts, end)).await;
    let mut expected = hyper.clone();
    if let Outcome::Response(r) = &mut expected {
        if te_decides_framing(&case.method, r) {
            r.fields.retain(|(n, _)| n != "content-length");
        }
        if case.expect == Expect::LongChunkSize {
            assert_eq!(r.end, BodyEnd::Complete, "{}: hyper reads long chunk sizes", case.name);
            (r.body, r.trailers, r.end, r.reusable) = (Vec::new(), None, BodyEnd::Failed, false);
        }
    }
    if case.expect == Expect::OverHeadLimit {
        expected = Outcome::Refused;
    }
    if vmesh != expected {
        panic!(
            "{} ({:?}, reads cut at {cuts:?}, upstream {end:?}):\n  input: {}\n  hyper: {}\n  vmesh: {}",
            case.name,
            case.method,
            short(&case.bytes),
            show(&hyper),
            show(&vmesh),
        );
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

fn show(o: &Outcome) -> String {
    let Outcome::Response(r) = o else {
        return format!("{o:?}");
    };
    let list = |f: &[(String, Vec<u8>)]| {
        f.iter()
            .map(|(n, v)| format!("{n}: {}", short(v)))
            .collect::<Vec<_>>()
            .join(", ")
    };
    format!(
        "{} {:?} reason {:?} [{}] body {:?} trailers {:?} {:?} reusable {}",
        r.status,
        r.version,
        r.reason.as_deref().map(short),
        list(&r.fields),
        short(&r.body),
        r.trailers.as_deref().map(list),
        r.end,
        r.reusable
    )
}

/// Cuts to try: every single cut of a short input (a hundred of a longer one, sixteen of a head of
/// hundreds of KiB), and random pairs.
fn cuts_of(len: usize, rng: &mut Rng) -> Vec<Vec<usize>> {
    let mut all = vec![vec![]];
    let singles = if len > 64 * 1024 { 16 } else { 100 };
    all.extend((1..len).step_by((len / singles).max(1)).map(|c| vec![c]));
    let pairs = if len > 64 * 1024 { 4 } else { 24 };
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

fn case(name: &str, method: Method, bytes: impl Into<Vec<u8>>) -> Case {
    Case {
        name: name.to_owned(),
        method,
        bytes: bytes.into(),
        expect: Expect::Same,
    }
}

fn named_cases() -> Vec<Case> {
    use Method as M;
    let ok = "HTTP/1.1 200 OK\r\n";
    let mut cases = vec![
        // Valid.
        case("length", M::GET, format!("{ok}Content-Length: 5\r\n\r\nhello")),
        case("zero length", M::GET, format!("{ok}Content-Length: 0\r\n\r\n")),
        case("chunked", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")),
        case("chunked with extensions and whitespace", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n5 ;a=b\r\nhello\r\n0;c\r\n\r\n")),
        case("chunked with trailers", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n1\r\nx\r\n0\r\nA: 1\r\nB: 2\r\n\r\n")),
        case("close-delimited", M::GET, format!("{ok}\r\nuntil the end")),
        case("HTTP/1.0", M::GET, "HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nhi"),
        case("HTTP/1.0 keep-alive", M::GET, "HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"),
        case("connection close", M::GET, format!("{ok}Connection: close\r\nContent-Length: 2\r\n\r\nhi")),
        case("close then keep-alive", M::GET, format!("{ok}Connection: close\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi")),
        case("custom reason", M::GET, "HTTP/1.1 200 Fine Thanks\r\nContent-Length: 0\r\n\r\n"),
        case("no reason", M::GET, "HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n"),
        case("obs-text reason", M::GET, b"HTTP/1.1 200 Gr\xfc\xdf\r\nContent-Length: 0\r\n\r\n".to_vec()),
        case("unknown status", M::GET, "HTTP/1.1 599 Whatever\r\nContent-Length: 0\r\n\r\n"),
        case("leading empty lines", M::GET, format!("\r\n\r\n{ok}Content-Length: 0\r\n\r\n")),
        case("bare LF line ends", M::GET, "HTTP/1.1 200 OK\nContent-Length: 2\n\nhi"),
        case("obs-text value", M::GET, b"HTTP/1.1 200 OK\r\nX: caf\xe9\r\nContent-Length: 0\r\n\r\n".to_vec()),
        case("repeated fields", M::GET, format!("{ok}Set-Cookie: a\r\nX: 1\r\nSet-Cookie: b\r\nContent-Length: 0\r\n\r\n")),
        // Truncated.
        case("cut in the head", M::GET, format!("{ok}Content-Len")),
        case("cut in the status line", M::GET, "HTTP/1.1 20"),
        case("cut in the body", M::GET, format!("{ok}Content-Length: 10\r\n\r\nhello")),
        case("cut in a chunk", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n5\r\nhel")),
        case("cut before the last chunk", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")),
        case("cut in the trailers", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n0\r\nA: 1\r\n")),
        case("nothing", M::GET, ""),
        // Content-Length.
        case("same length twice", M::GET, format!("{ok}Content-Length: 2\r\nContent-Length: 2\r\n\r\nhi")),
        case("same length in a list", M::GET, format!("{ok}Content-Length: 2, 2\r\n\r\nhi")),
        case("differing lengths", M::GET, format!("{ok}Content-Length: 2\r\nContent-Length: 3\r\n\r\nhi!")),
        case("differing lengths in a list", M::GET, format!("{ok}Content-Length: 2, 3\r\n\r\nhi!")),
        case("signed length", M::GET, format!("{ok}Content-Length: +2\r\n\r\nhi")),
        case("hex length", M::GET, format!("{ok}Content-Length: 0x2\r\n\r\nhi")),
        case("empty length", M::GET, format!("{ok}Content-Length:\r\n\r\nhi")),
        case("length past u64", M::GET, format!("{ok}Content-Length: 18446744073709551616\r\n\r\nhi")),
        case("length past hyper's largest", M::GET, format!("{ok}Content-Length: 18446744073709551614\r\n\r\nhi")),
        // Transfer-Encoding with or without Content-Length.
        case("chunked and a length", M::GET, format!("{ok}Content-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("length after chunked", M::GET, format!("{ok}Transfer-Encoding: chunked\r\nContent-Length: 300\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("chunked and a bad length", M::GET, format!("{ok}Transfer-Encoding: chunked\r\nContent-Length: x\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("gzip, chunked", M::GET, format!("{ok}Transfer-Encoding: gzip, chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("chunked over two fields", M::GET, format!("{ok}Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("chunked, gzip", M::GET, format!("{ok}Transfer-Encoding: chunked, gzip\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("chunked then gzip field", M::GET, format!("{ok}Transfer-Encoding: chunked\r\nTransfer-Encoding: gzip\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("gzip and a length", M::GET, format!("{ok}Transfer-Encoding: gzip\r\nContent-Length: 2\r\n\r\nhi")),
        case("CHUNKED", M::GET, format!("{ok}Transfer-Encoding: CHUNKED\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("xchunked", M::GET, format!("{ok}Transfer-Encoding: xchunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("chunked with a trailing comma", M::GET, format!("{ok}Transfer-Encoding: chunked,\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("chunked in quotes", M::GET, format!("{ok}Transfer-Encoding: \"chunked\"\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("chunked with a tab inside", M::GET, format!("{ok}Transfer-Encoding: chun\tked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("obs-text transfer-encoding", M::GET, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\xff\r\n\r\n2\r\nhi\r\n0\r\n\r\n".to_vec()),
        case("transfer-encoding with a space before the colon", M::GET, format!("{ok}Transfer-Encoding : chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n")),
        case("transfer-encoding in HTTP/1.0", M::GET, "HTTP/1.0 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n"),
        // Chunk sizes and chunk framing.
        case("chunk size not hex", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\nzz\r\nhi\r\n0\r\n\r\n")),
        case("chunk size with a sign", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n+2\r\nhi\r\n0\r\n\r\n")),
        case("chunk size with 0x", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n0x2\r\nhi\r\n0\r\n\r\n")),
        case("empty chunk size", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n\r\nhi\r\n0\r\n\r\n")),
        case("space before the chunk size", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n 2\r\nhi\r\n0\r\n\r\n")),
        case("digit after chunk whitespace", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n2 2\r\nhi\r\n0\r\n\r\n")),
        case("chunk size overflow", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n10000000000000000\r\nhi\r\n0\r\n\r\n")),
        case("largest chunk size", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\nFFFFFFFFFFFFFFFF\r\nhi")),
        case("chunk longer than its size", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n2\r\nhi!\r\n0\r\n\r\n")),
        case("chunk shorter than its size", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n3\r\nhi\r\n0\r\n\r\n")),
        case("bare LF after a chunk size", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n2\nhi\r\n0\r\n\r\n")),
        case("bare LF after chunk data", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n2\r\nhi\n0\r\n\r\n")),
        case("newline in a chunk extension", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n2;a\nhi\r\n0\r\n\r\n")),
        case("bad trailer", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n0\r\nno colon\r\n\r\n")),
        case("bare LF after the last chunk", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n0\r\n\n")),
        case("long leading zeros", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n{}2\r\nhi\r\n0\r\n\r\n", "0".repeat(1000))),
        case("long chunk extensions", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n2;{}\r\nhi\r\n0\r\n\r\n", "e".repeat(16 * 1024))),
        case("many trailers", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n0\r\n{}\r\n", "t: v\r\n".repeat(101))),
        case("large trailers", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n0\r\nt: {}\r\n\r\n", "v".repeat(16 * 1024))),
        // Malformed heads.
        case("obs-fold", M::GET, format!("{ok}X: a\r\n b\r\nContent-Length: 0\r\n\r\n")),
        case("space before the colon", M::GET, format!("{ok}Content-Length : 2\r\n\r\nhi")),
        case("space before the first field", M::GET, format!("{ok} X: a\r\nContent-Length: 0\r\n\r\n")),
        case("NUL in a value", M::GET, format!("{ok}X: a\0b\r\nContent-Length: 0\r\n\r\n")),
        case("DEL in a value", M::GET, format!("{ok}X: a\x7fb\r\nContent-Length: 0\r\n\r\n")),
        case("CR in a value", M::GET, format!("{ok}X: a\rb\r\nContent-Length: 0\r\n\r\n")),
        case("empty field name", M::GET, format!("{ok}: a\r\nContent-Length: 0\r\n\r\n")),
        case("field name with a slash", M::GET, format!("{ok}X/Y: a\r\nContent-Length: 0\r\n\r\n")),
        case("HTTP/2.0", M::GET, "HTTP/2.0 200 OK\r\nContent-Length: 0\r\n\r\n"),
        case("HTTP/1.2", M::GET, "HTTP/1.2 200 OK\r\nContent-Length: 0\r\n\r\n"),
        case("lower-case http", M::GET, "http/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        case("HTTP/0.9", M::GET, "hello world\r\n\r\n"),
        case("two spaces after the version", M::GET, "HTTP/1.1  200 OK\r\nContent-Length: 0\r\n\r\n"),
        case("four-digit status", M::GET, "HTTP/1.1 2000 OK\r\nContent-Length: 0\r\n\r\n"),
        case("status under 100", M::GET, "HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n"),
        case("status with letters", M::GET, "HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n"),
        case("NUL in the reason", M::GET, "HTTP/1.1 200 O\0K\r\nContent-Length: 0\r\n\r\n"),
        // 1xx before the final response.
        case("100 continue", M::GET, format!("HTTP/1.1 100 Continue\r\n\r\n{ok}Content-Length: 2\r\n\r\nhi")),
        case("103 with fields", M::GET, format!("HTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n{ok}Content-Length: 2\r\n\r\nhi")),
        case("several 1xx", M::GET, format!("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 102 Processing\r\n\r\nHTTP/1.1 199 X\r\nContent-Length: 5\r\n\r\n{ok}Content-Length: 0\r\n\r\n")),
        case("1xx only", M::GET, "HTTP/1.1 100 Continue\r\n\r\n"),
        case("malformed 1xx", M::GET, format!("HTTP/1.1 100 Continue\r\nX : y\r\n\r\n{ok}Content-Length: 0\r\n\r\n")),
        case("101", M::GET, "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\nframes"),
        // HEAD, 204, 304.
        case("HEAD with a length", M::HEAD, format!("{ok}Content-Length: 5\r\n\r\n")),
        case("HEAD with a length and a body", M::HEAD, format!("{ok}Content-Length: 5\r\n\r\nhello")),
        case("HEAD with chunked", M::HEAD, format!("{ok}Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n")),
        case("HEAD with a bad length", M::HEAD, format!("{ok}Content-Length: x\r\n\r\n")),
        case("204", M::GET, "HTTP/1.1 204 No Content\r\n\r\n"),
        case("204 with a body-ish tail", M::GET, "HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\nhello"),
        case("204 with chunked", M::GET, "HTTP/1.1 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"),
        case("304 with a length", M::GET, "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\n"),
        case("304 with a body-ish tail", M::GET, "HTTP/1.1 304 Not Modified\r\nContent-Length: 5\r\n\r\nhello"),
        case("204 in HTTP/1.0 with chunked", M::GET, "HTTP/1.0 204 No Content\r\nTransfer-Encoding: chunked\r\n\r\n"),
        // Pipelined extra bytes.
        case("a second response after the first", M::GET, format!("{ok}Content-Length: 2\r\n\r\nhi{ok}Content-Length: 0\r\n\r\n")),
        case("junk after a chunked body", M::GET, format!("{ok}Transfer-Encoding: chunked\r\n\r\n0\r\n\r\njunk")),
        case("an empty line after the body", M::GET, format!("{ok}Content-Length: 2\r\n\r\nhi\r\n")),
    ];
    // The long chunk-size line: difference 2.
    let mut long = case(
        "chunk size over 1 KiB",
        M::GET,
        format!(
            "{ok}Transfer-Encoding: chunked\r\n\r\n{}2\r\nhi\r\n0\r\n\r\n",
            "0".repeat(1100)
        ),
    );
    long.expect = Expect::LongChunkSize;
    cases.push(long);
    // Limits on the head.
    let fields = |n: usize| "A: b\r\n".repeat(n);
    cases.push(case(
        "100 fields",
        M::GET,
        format!("{ok}{}Content-Length: 0\r\n\r\n", fields(99)),
    ));
    cases.push(case(
        "101 fields",
        M::GET,
        format!("{ok}{}Content-Length: 0\r\n\r\n", fields(100)),
    ));
    let max = Limits::default().max_head_bytes;
    let value = |len: usize| "v".repeat(len);
    // The head ends exactly at the limit, one byte over it, far over it.
    let at = max - ok.len() - "X: \r\n\r\n".len();
    cases.push(case(
        "a head as large as allowed",
        M::GET,
        format!("{ok}X: {}\r\n\r\n", value(at)),
    ));
    for (name, len) in [("a head one byte too large", at + 1), ("a huge head", 2 * max)] {
        let mut over = case(name, M::GET, format!("{ok}X: {}\r\n\r\n", value(len)));
        over.expect = Expect::OverHeadLimit;
        cases.push(over);
    }
    cases.push(case(
        "a huge field name",
        M::GET,
        format!("{ok}{}: v\r\n\r\n", "n".repeat(70_000)),
    ));
    cases
}

/// Responses assembled from parts: interim answers, status lines, framing fields, bodies and
/// what follows, drawn with a fixed seed.
fn generated_cases(rng: &mut Rng, count: usize) -> Vec<Case> {
    let interim = [
        "",
        "HTTP/1.1 100 Continue\r\n\r\n",
        "HTTP/1.1 103 Early Hints\r\nLink: </s>\r\n\r\n",
    ];
    let status = [
        "HTTP/1.1 200 OK",
        "HTTP/1.0 200 OK",
        "HTTP/1.1 204 No Content",
        "HTTP/1.1 304 Not Modified",
        "HTTP/1.1 101 Switching Protocols",
        "HTTP/1.1 404 Custom",
        "HTTP/1.1 200",
        "HTTP/1.1 500 Internal Server Error",
    ];
    let framing = [
        "",
        "Content-Length: 5\r\n",
        "Content-Length: 0\r\n",
        "Content-Length: 5\r\nContent-Length: 5\r\n",
        "Content-Length: 5\r\nContent-Length: 6\r\n",
        "Content-Length: 5, 5\r\n",
        "Content-Length: 5x\r\n",
        "Transfer-Encoding: chunked\r\n",
        "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n",
        "Content-Length: 11\r\nTransfer-Encoding: chunked\r\n",
        "Transfer-Encoding: gzip\r\n",
        "Transfer-Encoding: gzip, chunked\r\n",
        "Transfer-Encoding: chunked, gzip\r\n",
        "Transfer-Encoding: xchunked\r\n",
        "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n",
    ];
    let other = [
        "",
        "Connection: close\r\n",
        "Connection: keep-alive\r\n",
        "X-A: 1\r\nX-A: 2\r\n",
        "Server: t\r\n",
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
    ];
    let after = ["", "", "HTTP/1.1 200 OK\r\n\r\n", "\r\n", "x"];
    (0..count)
        .map(|i| {
            let method = if rng.below(5) == 0 { Method::HEAD } else { Method::GET };
            let bytes = [
                *rng.pick(&interim),
                *rng.pick(&status),
                "\r\n",
                *rng.pick(&other),
                *rng.pick(&framing),
                "\r\n",
                *rng.pick(&body),
                *rng.pick(&after),
            ]
            .concat();
            case(&format!("generated #{i}"), method, bytes)
        })
        .collect()
}

// === the tests ===

#[tokio::test]
async fn hyper_and_vmesh_agree_on_named_responses_cut_anywhere() {
    let mut rng = Rng(0x5eed_0001);
    let mut runs = 0;
    for case in named_cases() {
        for cuts in cuts_of(case.bytes.len(), &mut rng) {
            for end in [End::Close, End::Open] {
                compare(&case, &cuts, end).await;
                runs += 1;
            }
        }
    }
    assert!(runs > 10_000, "{runs} runs");
}

#[tokio::test]
async fn hyper_and_vmesh_agree_on_generated_responses_cut_anywhere() {
    let mut rng = Rng(0x5eed_0002);
    let mut runs = 0;
    for case in generated_cases(&mut rng, 600) {
        let mut cuts = vec![vec![]];
        for _ in 0..6 {
            cuts.push(vec![1 + rng.below(case.bytes.len() - 1)]);
        }
        for _ in 0..3 {
            let (a, b) = (1 + rng.below(case.bytes.len() - 1), 1 + rng.below(case.bytes.len() - 1));
            cuts.push(vec![a.min(b), a.max(b)]);
        }
        for cut in cuts {
            for end in [End::Close, End::Open] {
                compare(&case, &cut, end).await;
                runs += 1;
            }
        }
    }
    assert_eq!(runs, 600 * 10 * 2);
}

#[tokio::test]
async fn content_length_goes_when_transfer_encoding_decides() {
    let bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n0\r\n\r\n";
    let hyper = through_hyper(&Method::GET, Script::new(bytes, &[], End::Open)).await;
    let vmesh = through_vmesh(&Method::GET, Script::new(bytes, &[], End::Open)).await;
    let (Outcome::Response(h), Outcome::Response(v)) = (hyper, vmesh) else {
        panic!("both answer")
    };
    assert!(h.fields.iter().any(|(n, _)| n == "content-length"), "hyper keeps it");
    assert!(!v.fields.iter().any(|(n, _)| n == "content-length"), "vmesh drops it");
    assert_eq!((h.body, h.reusable), (v.body, v.reusable));
}

// === requests ===

/// A request body of given frames, with an unknown length unless one is given.
struct Frames(VecDeque<Bytes>, Option<u64>);

impl Body for Frames {
    type Data = Bytes;
    type Error = io::Error;

    fn poll_frame(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, io::Error>>> {
        Poll::Ready(self.0.pop_front().map(|d| Ok(Frame::data(d))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        self.1.map_or_else(SizeHint::default, SizeHint::with_exact)
    }
}

/// What a client wrote for `req`: the request line, the fields sorted by name (same-name order
/// kept; difference 3) and the body bytes.
fn wire_view(wire: &[u8]) -> (String, Vec<(String, String)>, Vec<u8>) {
    let end = wire.windows(4).position(|w| w == b"\r\n\r\n").expect("a whole head") + 4;
    let head = String::from_utf8(wire[..end].to_vec()).expect("an ASCII head");
    let mut lines = head.split("\r\n");
    let line = lines.next().expect("a request line").to_owned();
    let mut fields: Vec<(String, String)> = lines
        .filter(|l| !l.is_empty())
        .map(|l| {
            let (n, v) = l.split_once(": ").expect("a field");
            (n.to_owned(), v.to_owned())
        })
        .collect();
    fields.sort_by(|a, b| a.0.cmp(&b.0));
    (line, fields, wire[end..].to_vec())
}

type RequestCase = (
    &'static str,
    Method,
    &'static str,
    Version,
    Vec<(&'static str, &'static str)>,
    Vec<&'static str>,
    Option<u64>,
);

fn request_cases() -> Vec<RequestCase> {
    use Method as M;
    let v11 = Version::HTTP_11;
    vec![
        (
            "GET",
            M::GET,
            "/p?q=1",
            v11,
            vec![("host", "h"), ("accept", "*/*")],
            vec![],
            None,
        ),
        (
            "GET with a streamed body sends none",
            M::GET,
            "/",
            v11,
            vec![],
            vec!["x"],
            None,
        ),
        (
            "POST with a known body",
            M::POST,
            "/",
            v11,
            vec![("host", "h")],
            vec!["hello"],
            Some(5),
        ),
        (
            "POST with the caller's length",
            M::POST,
            "/",
            v11,
            vec![("content-length", "5")],
            vec!["hel", "lo"],
            None,
        ),
        (
            "POST with a streamed body",
            M::POST,
            "/",
            v11,
            vec![("host", "h")],
            vec!["hello", " ", "world of 17 bytes"],
            None,
        ),
        (
            "POST with a bad length and a streamed body",
            M::POST,
            "/",
            v11,
            vec![("content-length", "x"), ("a", "1")],
            vec!["abc"],
            None,
        ),
        (
            "POST with transfer-encoding gzip",
            M::POST,
            "/",
            v11,
            vec![("transfer-encoding", "gzip"), ("content-length", "3"), ("z", "1")],
            vec!["abc"],
            Some(3),
        ),
        (
            "POST with transfer-encoding chunked",
            M::POST,
            "/",
            v11,
            vec![("transfer-encoding", "chunked")],
            vec!["abc"],
            Some(3),
        ),
        (
            "PUT with an empty body and a length",
            M::PUT,
            "/",
            v11,
            vec![("content-length", "0"), ("transfer-encoding", "chunked")],
            vec![],
            Some(0),
        ),
        (
            "HTTP/1.0 POST",
            M::POST,
            "/",
            Version::HTTP_10,
            vec![("transfer-encoding", "chunked")],
            vec!["abc"],
            Some(3),
        ),
        ("absolute form", M::GET, "http://h:8/a", v11, vec![], vec![], None),
        ("OPTIONS *", M::OPTIONS, "*", v11, vec![], vec![], None),
        (
            "a body longer than its length",
            M::POST,
            "/",
            v11,
            vec![("content-length", "2")],
            vec!["abcdef"],
            None,
        ),
    ]
}

#[tokio::test]
async fn hyper_and_vmesh_write_the_same_requests() {
    for (name, method, uri, version, fields, frames, known) in request_cases() {
        let build = || {
            let mut b = Request::builder().method(method.clone()).uri(uri).version(version);
            for (n, v) in &fields {
                b = b.header(*n, *v);
            }
            let frames = frames.iter().map(|f| Bytes::from_static(f.as_bytes())).collect();
            b.body(Frames(frames, known)).unwrap()
        };
        let answer = b"HTTP/1.1 204 No Content\r\n\r\n";

        let script = Script::new(answer, &[], End::Open);
        let hyper_wire = script.written.clone();
        let (mut sender, conn) = http1::Builder::new()
            .writev(false)
            .handshake::<_, Frames>(TokioIo::new(script))
            .await
            .unwrap();
        let driver = tokio::spawn(conn);
        let mut sent = Box::pin(sender.send_request(build()));
        settle(&mut sent)
            .await
            .expect("hyper answered")
            .expect("hyper's exchange");
        quiesce().await;
        driver.abort();

        let script = Script::new(answer, &[], End::Open);
        let vmesh_wire = script.written.clone();
        let mut sent = Box::pin(Conn::new(script).send(build(), |_| {}));
        settle(&mut sent)
            .await
            .expect("vmesh answered")
            .expect("vmesh's exchange");

        let (h, v) = (hyper_wire.lock().unwrap().clone(), vmesh_wire.lock().unwrap().clone());
        assert_eq!(wire_view(&v), wire_view(&h), "{name}");
    }
}
