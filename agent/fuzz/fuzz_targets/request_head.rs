//! Fuzz target: requests from clients. Any bytes, whole or cut into two reads at a place the
//! fuzzer chooses, go through the downstream head parser and then the body decoder, request after
//! request as a connection reads them (`proxy/downstream/h1.rs`, `body.rs`): no panic, a head's
//! framing agrees with its fields (never both Content-Length and Transfer-Encoding), and the cut
//! never changes the answer.
#![no_main]

use bytes::BytesMut;
use http::{header, HeaderMap, Version};
use libfuzzer_sys::fuzz_target;
use vmesh_agent::proxy::downstream::request::{Framing, HeadParser, RequestHead, MAX_HEADERS};
use vmesh_agent::upstream::h1::framing::{BodyDecoder, Decoded, ResponseFraming};
use vmesh_agent::upstream::h1::Limits;

#[derive(Debug, PartialEq)]
struct Req {
    method: String,
    uri: String,
    version: Version,
    fields: Vec<(String, Vec<u8>)>,
    framing: Framing,
    keep_alive: bool,
    body: Vec<u8>,
    trailers: Option<Vec<(String, Vec<u8>)>>,
    body_ok: bool,
}

#[derive(Debug, PartialEq)]
enum End {
    /// The input ended between two requests, or a request asked to close.
    Closed,
    /// The input ended in the middle of a head.
    Incomplete,
    Refused,
    BodyFailed,
}

fn fields(h: &HeaderMap) -> Vec<(String, Vec<u8>)> {
    h.iter()
        .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
        .collect()
}

/// What a head's framing may be, given its fields (RFC 9112 §6.1-6.3 as vmesh reads them).
fn check_framing(head: &RequestHead) {
    let te: Vec<_> = head.headers.get_all(header::TRANSFER_ENCODING).iter().collect();
    let cl: Vec<_> = head.headers.get_all(header::CONTENT_LENGTH).iter().collect();
    assert!(te.is_empty() || cl.is_empty(), "both framings: {head:?}");
    assert!(head.headers.len() <= MAX_HEADERS);
    let length = |v: &http::HeaderValue| -> u64 {
        let s = v.to_str().expect("digits");
        assert!(!s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()), "length {s:?}");
        s.parse().expect("a u64")
    };
    match head.framing {
        Framing::Chunked => {
            assert_eq!(head.version, Version::HTTP_11);
            assert_eq!(te.len(), 1, "{head:?}");
            assert!(te[0].as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        Framing::Length(n) => {
            assert!(n > 0 && te.is_empty() && !cl.is_empty());
            assert!(cl.iter().all(|v| length(v) == n), "{head:?}");
        }
        Framing::Empty => {
            assert!(te.is_empty());
            assert!(cl.iter().all(|v| length(v) == 0), "{head:?}");
        }
    }
    if head.expect_continue {
        assert!(head.version == Version::HTTP_11 && head.framing != Framing::Empty);
    }
    if head.upgrade {
        assert_eq!(head.version, Version::HTTP_11);
    }
}

fn run(input: &[u8], cut: usize, max_head: usize) -> (Vec<Req>, End) {
    let mut reads = [&input[..cut], &input[cut..]].into_iter().filter(|r| !r.is_empty());
    let mut buf = BytesMut::new();
    let mut parser = HeadParser::default();
    let mut requests = Vec::new();
    loop {
        let head = loop {
            match parser.parse(&mut buf, max_head) {
                Ok(Some(head)) => break head,
                Ok(None) => match reads.next() {
                    Some(r) => buf.extend_from_slice(r),
                    None if buf.is_empty() => return (requests, End::Closed),
                    None => {
                        assert!(buf.len() < max_head, "{} bytes held, limit {max_head}", buf.len());
                        return (requests, End::Incomplete);
                    }
                },
                Err(_) => return (requests, End::Refused),
            }
        };
        check_framing(&head);
        let framing = match head.framing {
            Framing::Empty => ResponseFraming::Empty,
            Framing::Length(n) => ResponseFraming::Length(n),
            Framing::Chunked => ResponseFraming::Chunked,
        };
        let mut decoder = BodyDecoder::new(framing, &Limits::default());
        let (mut body, mut trailers) = (Vec::new(), None);
        let body_ok = loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => {
                    assert!(!d.is_empty());
                    body.extend_from_slice(&d);
                }
                Ok(Decoded::End(t)) => {
                    trailers = t.map(|t| fields(&t));
                    break true;
                }
                Ok(Decoded::NeedMore) => match reads.next() {
                    Some(r) => buf.extend_from_slice(r),
                    None => break matches!(decoder.eof(), Ok(Decoded::End(_))),
                },
                Err(_) => break false,
            }
        };
        if let Framing::Length(n) = head.framing {
            assert!(body.len() as u64 <= n);
            assert!(!body_ok || body.len() as u64 == n);
        }
        let keep_alive = head.keep_alive;
        requests.push(Req {
            method: head.method.to_string(),
            uri: head.uri.to_string(),
            version: head.version,
            fields: fields(&head.headers),
            framing: head.framing,
            keep_alive,
            body,
            trailers,
            body_ok,
        });
        if !body_ok {
            return (requests, End::BodyFailed);
        }
        if !keep_alive {
            return (requests, End::Closed);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    // [head limit, cut (two bytes), input...]
    let [limit, c1, c2, input @ ..] = data else {
        return;
    };
    let max_head = 64 + usize::from(*limit) * 64;
    let cut = usize::from(u16::from_be_bytes([*c1, *c2])) % (input.len() + 1);
    let whole = run(input, 0, max_head);
    let split = run(input, cut, max_head);
    match (&whole, &split) {
        (w, s) if w == s => {}
        // After an incomplete head, the parser looks again only once a head's end arrived (as
        // hyper does): a refusal the whole input shows at once may wait for an end that never
        // comes.
        ((wr, End::Refused), (sr, End::Incomplete)) if wr == sr => {}
        _ => panic!("whole {whole:?} but cut at {cut} {split:?}"),
    }
});
