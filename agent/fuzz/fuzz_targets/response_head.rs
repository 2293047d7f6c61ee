//! Fuzz target: response heads. Any bytes, whole or cut into up to three reads, go through the
//! head parser and the framing decision (1xx answers skipped, as a connection does): no panic,
//! the framing fields are consistent, and a cut never changes the answer.
#![no_main]

use bytes::BytesMut;
use http::{header, Method};
use libfuzzer_sys::fuzz_target;
use vmesh_agent::upstream::h1::framing::{response_framing, FramingError, ResponseFraming};
use vmesh_agent::upstream::h1::head::HeadParser;
use vmesh_agent::upstream::h1::{Limits, RawFields};

#[derive(Debug, PartialEq)]
enum Outcome {
    Final {
        status: u16,
        keep_alive: bool,
        fields: Vec<(String, Vec<u8>)>,
        reason: Option<Vec<u8>>,
        framing: Result<ResponseFraming, FramingError>,
        rest: Vec<u8>,
    },
    Incomplete,
    Refused,
}

fn run(input: &[u8], cuts: &[usize], method: &Method, limits: Limits) -> Outcome {
    let mut parser = HeadParser::new(limits);
    let mut buf = BytesMut::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([input.len()]) {
        let end = end.clamp(start, input.len());
        buf.extend_from_slice(&input[start..end]);
        start = end;
        loop {
            match parser.parse(&mut buf) {
                Err(_) => return Outcome::Refused,
                Ok(None) => break,
                Ok(Some(mut head)) => {
                    let framing = response_framing(method, &mut head);
                    if framing == Ok(ResponseFraming::Interim) {
                        continue;
                    }
                    let headers = head.headers();
                    // The fields kept as they came read as the map holds them.
                    assert_eq!(head.fields.iter().count(), headers.len());
                    if matches!(framing, Ok(ResponseFraming::Chunked | ResponseFraming::CloseDelimited))
                        && headers.contains_key(header::TRANSFER_ENCODING)
                    {
                        assert!(!headers.contains_key(header::CONTENT_LENGTH), "content-length kept");
                    }
                    assert!(headers.len() <= limits.max_headers);
                    written_fields_parse_back(&head.fields, &headers);
                    buf.extend_from_slice(&input[start..]);
                    return Outcome::Final {
                        status: head.status.as_u16(),
                        keep_alive: head.keep_alive,
                        fields: headers
                            .iter()
                            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
                            .collect(),
                        reason: head.reason.map(|r| r.as_bytes().to_vec()),
                        framing,
                        rest: buf.to_vec(),
                    };
                }
            }
        }
    }
    Outcome::Incomplete
}

/// The fields as an HTTP/1.1 client is sent them (`RawFields::write_to`) are `name: value`
/// CRLF lines only, and parse back into the same map.
fn written_fields_parse_back(fields: &RawFields, headers: &http::HeaderMap) {
    let mut out = b"HTTP/1.1 200 OK\r\n".to_vec();
    fields.write_to(&mut out, |_, _| true);
    for (i, b) in out.iter().enumerate() {
        assert!(*b != b'\n' || (i > 0 && out[i - 1] == b'\r'), "a bare LF written");
        assert!(*b != b'\r' || out.get(i + 1) == Some(&b'\n'), "a bare CR written");
    }
    out.extend_from_slice(b"\r\n");
    let mut again = BytesMut::from(&out[..]);
    let limits = Limits {
        max_head_bytes: usize::MAX,
        max_headers: usize::MAX,
        ..Limits::default()
    };
    let parsed = HeadParser::new(limits)
        .parse(&mut again)
        .expect("written fields parse")
        .expect("written fields are a whole head");
    assert_eq!(&parsed.headers(), headers, "written fields read back differently");
}

fuzz_target!(|data: &[u8]| {
    // [method, head limit, field limit, cut, cut, input...]
    let [m, size, fields, c1, c2, input @ ..] = data else {
        return;
    };
    let method = match m % 3 {
        0 => Method::GET,
        1 => Method::HEAD,
        _ => Method::CONNECT,
    };
    let limits = Limits {
        max_head_bytes: 32 + usize::from(*size) * 4,
        max_headers: 1 + usize::from(*fields) % 100,
        ..Limits::default()
    };
    let whole = run(input, &[], &method, limits);
    let len = input.len().max(1);
    let (a, b) = (usize::from(*c1) * len / 256, usize::from(*c2) * len / 256);
    for cuts in [vec![a], vec![a.min(b), a.max(b)]] {
        let split = run(input, &cuts, &method, limits);
        match (&whole, &split) {
            (w, s) if w == s => {}
            // A refusal may show only once the head ends (hyper's fast end check waits for an
            // end before parsing again), and size and syntax refusals may trade places.
            (Outcome::Refused, Outcome::Incomplete | Outcome::Refused) => {}
            _ => panic!("whole {whole:?} but cut at {cuts:?} {split:?}"),
        }
    }
});
