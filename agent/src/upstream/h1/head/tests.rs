//! Response head parsing (accepted, refused, incomplete; every split of the input) and request
//! head encoding.

use bytes::BytesMut;
use http::header::{HeaderMap, HeaderValue};
use http::{Method, StatusCode, Uri, Version};
use proptest::prelude::*;

use super::super::framing::{ChunkedHeader, HeaderEdits};
use super::super::Limits;
use super::*;

/// What parsing one input came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    Head {
        status: u16,
        version: Version,
        keep_alive: bool,
        reason: Option<Vec<u8>>,
        fields: Vec<(String, Vec<u8>)>,
        rest: Vec<u8>,
    },
    Incomplete,
    Refused(HeadError),
}

fn parse_all(input: &[u8], limits: Limits) -> Outcome {
    let mut buf = BytesMut::from(input);
    match HeadParser::new(limits).parse(&mut buf) {
        Ok(Some(h)) => head_outcome(h, &buf),
        Ok(None) => Outcome::Incomplete,
        Err(e) => Outcome::Refused(e),
    }
}

/// Feeds `input` in pieces cut at `cuts`, parsing after each, as a connection would.
fn parse_split(input: &[u8], cuts: &[usize], limits: Limits) -> Outcome {
    let mut parser = HeadParser::new(limits);
    let mut buf = BytesMut::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([input.len()]) {
        let end = end.clamp(start, input.len());
        buf.extend_from_slice(&input[start..end]);
        start = end;
        match parser.parse(&mut buf) {
            Ok(Some(h)) => {
                buf.extend_from_slice(&input[start..]);
                return head_outcome(h, &buf);
            }
            Ok(None) => {}
            Err(e) => return Outcome::Refused(e),
        }
    }
    Outcome::Incomplete
}

fn head_outcome(h: ResponseHead, rest: &[u8]) -> Outcome {
    Outcome::Head {
        status: h.status.as_u16(),
        version: h.version,
        keep_alive: h.keep_alive,
        reason: h.reason.as_ref().map(|r| r.as_bytes().to_vec()),
        fields: h
            .headers()
            .iter()
            .map(|(n, v)| (n.as_str().to_owned(), v.as_bytes().to_vec()))
            .collect(),
        rest: rest.to_vec(),
    }
}

fn ok(status: u16, version: Version, keep_alive: bool, fields: &[(&str, &str)], rest: &str) -> Outcome {
    Outcome::Head {
        status,
        version,
        keep_alive,
        reason: None,
        fields: fields
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect(),
        rest: rest.as_bytes().to_vec(),
    }
}

fn syntax(e: httparse::Error) -> Outcome {
    Outcome::Refused(HeadError::Syntax(e))
}

const V11: Version = Version::HTTP_11;
const V10: Version = Version::HTTP_10;

#[test]
fn response_heads_are_accepted_refused_or_awaited_as_hyper_does() {
    let many = format!("HTTP/1.1 200 OK\r\n{}\r\n", "a: b\r\n".repeat(101));
    let hundred = format!("HTTP/1.1 200 OK\r\n{}\r\n", "a: b\r\n".repeat(100));
    let hundred_fields: Vec<(&str, &str)> = vec![("a", "b"); 100];
    let cases: Vec<(&str, &[u8], Outcome)> = vec![
        (
            "a plain head, the body stays",
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello",
            ok(200, V11, true, &[("content-length", "5")], "hello"),
        ),
        (
            "HTTP/1.0 closes by default",
            b"HTTP/1.0 200 OK\r\n\r\n",
            ok(200, V10, false, &[], ""),
        ),
        (
            "HTTP/1.0 with keep-alive",
            b"HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\n\r\n",
            ok(200, V10, true, &[("connection", "Keep-Alive")], ""),
        ),
        (
            "close among tokens",
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\n\r\n",
            ok(200, V11, false, &[("connection", "keep-alive, Close")], ""),
        ),
        (
            "a later keep-alive does not undo close",
            b"HTTP/1.0 200 OK\r\nConnection: close\r\nConnection: keep-alive\r\n\r\n",
            ok(
                200,
                V10,
                false,
                &[("connection", "close"), ("connection", "keep-alive")],
                "",
            ),
        ),
        (
            "leading empty lines are skipped",
            b"\r\n\nHTTP/1.1 204 No Content\r\n\r\n",
            ok(204, V11, true, &[], ""),
        ),
        (
            "bare LF line ends",
            b"HTTP/1.1 200 OK\nA: b\n\n",
            ok(200, V11, true, &[("a", "b")], ""),
        ),
        (
            "value whitespace is trimmed, obs-text kept",
            b"HTTP/1.1 200 OK\r\nX:  caf\xe9 \t\r\n\r\n",
            Outcome::Head {
                status: 200,
                version: V11,
                keep_alive: true,
                reason: None,
                fields: vec![("x".into(), b"caf\xe9".to_vec())],
                rest: vec![],
            },
        ),
        (
            "100 fields",
            hundred.as_bytes(),
            ok(200, V11, true, &hundred_fields, ""),
        ),
        (
            "101 fields",
            many.as_bytes(),
            Outcome::Refused(HeadError::TooManyHeaders(100)),
        ),
        (
            "obs-fold",
            b"HTTP/1.1 200 OK\r\nX: a\r\n b\r\n\r\n",
            syntax(httparse::Error::HeaderName),
        ),
        (
            "space before the colon",
            b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\n",
            syntax(httparse::Error::HeaderName),
        ),
        (
            "space before the first field",
            b"HTTP/1.1 200 OK\r\n X: a\r\n\r\n",
            syntax(httparse::Error::HeaderName),
        ),
        (
            "empty field name",
            b"HTTP/1.1 200 OK\r\n: a\r\n\r\n",
            syntax(httparse::Error::HeaderName),
        ),
        (
            "NUL in a value",
            b"HTTP/1.1 200 OK\r\nX: a\0b\r\n\r\n",
            syntax(httparse::Error::HeaderValue),
        ),
        ("HTTP/2.0", b"HTTP/2.0 200 OK\r\n\r\n", syntax(httparse::Error::Version)),
        (
            "HTTP/0.9 body",
            b"hello world\r\n\r\n",
            syntax(httparse::Error::Version),
        ),
        (
            "two spaces",
            b"HTTP/1.1  200 OK\r\n\r\n",
            syntax(httparse::Error::Status),
        ),
        (
            "four digits",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            syntax(httparse::Error::Status),
        ),
        (
            "status under 100",
            b"HTTP/1.1 099 X\r\n\r\n",
            Outcome::Refused(HeadError::Status),
        ),
        ("incomplete", b"HTTP/1.1 200 OK\r\nContent-Le", Outcome::Incomplete),
        ("nothing", b"", Outcome::Incomplete),
    ];
    for (name, input, want) in cases {
        assert_eq!(parse_all(input, Limits::default()), want, "{name}");
        for cut in 0..=input.len() {
            assert_eq!(
                parse_split(input, &[cut], Limits::default()),
                want,
                "{name}, cut at {cut}"
            );
        }
    }
}

#[test]
fn a_non_canonical_reason_phrase_is_kept_and_a_canonical_one_is_not() {
    let cases: [(&[u8], Option<&[u8]>); 5] = [
        (b"HTTP/1.1 200 OK\r\n\r\n", None),
        (b"HTTP/1.1 200 Fine\r\n\r\n", Some(b"Fine")),
        (b"HTTP/1.1 200\r\n\r\n", Some(b"")),
        (b"HTTP/1.1 599 Whatever it is\r\n\r\n", Some(b"Whatever it is")),
        // httparse reports a phrase with obs-text as empty; hyper keeps the empty one.
        (b"HTTP/1.1 200 Gr\xfc\xdf\r\n\r\n", Some(b"")),
    ];
    for (input, want) in cases {
        match parse_all(input, Limits::default()) {
            Outcome::Head { reason, .. } => assert_eq!(reason.as_deref(), want, "{input:?}"),
            other => panic!("{input:?}: {other:?}"),
        }
    }
}

#[test]
fn a_head_is_refused_once_the_buffer_reaches_the_limit_without_its_end() {
    let limits = Limits {
        max_head_bytes: 64,
        ..Limits::default()
    };
    let fits = format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "a".repeat(64 - 24));
    assert_eq!(fits.len(), 64);
    assert!(matches!(parse_all(fits.as_bytes(), limits), Outcome::Head { .. }));
    let over = format!("HTTP/1.1 200 OK\r\nx: {}\r\n\r\n", "a".repeat(64 - 23));
    assert_eq!(
        parse_all(over.as_bytes(), limits),
        Outcome::Refused(HeadError::TooLarge(64))
    );
    assert_eq!(
        parse_all(&over.as_bytes()[..64], limits),
        Outcome::Refused(HeadError::TooLarge(64))
    );
    assert_eq!(parse_all(&over.as_bytes()[..63], limits), Outcome::Incomplete);
}

#[test]
fn the_end_check_finds_every_way_a_head_can_end() {
    for (buf, prev, want) in [
        (&b"HTTP/1.1 200 OK\r\n\r\n"[..], 0, true),
        (b"HTTP/1.1 200 OK\r\n\r\n", 16, true),
        (b"HTTP/1.1 200 OK\r\n\r\n", 17, true),
        (b"HTTP/1.1 200 OK\n\n", 16, true),
        (b"HTTP/1.1 200 OK\n\r\n", 17, true),
        (b"HTTP/1.1 200 OK\r\nA: b\r\n", 0, false),
        (b"HTTP/1.1 200 OK\r\n\r\nA", 100, false),
    ] {
        assert_eq!(has_end_after(buf, prev), want, "{buf:?} from {prev}");
    }
}

fn encode(method: Method, uri: &str, version: Version, headers: &[(&str, &str)], edits: HeaderEdits) -> String {
    let mut map = HeaderMap::new();
    for (n, v) in headers {
        map.append(
            http::header::HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_str(v).unwrap(),
        );
    }
    let mut dst = Vec::new();
    encode_request(&mut dst, &method, &uri.parse::<Uri>().unwrap(), version, &map, &edits);
    String::from_utf8(dst).unwrap()
}

#[test]
fn request_heads_are_written_field_by_field_with_the_framing_edits() {
    let none = HeaderEdits::default();
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "origin form",
            encode(
                Method::GET,
                "/a/b?c=d",
                V11,
                &[("host", "h"), ("x", "1"), ("x", "2")],
                none.clone(),
            ),
            "GET /a/b?c=d HTTP/1.1\r\nhost: h\r\nx: 1\r\nx: 2\r\n\r\n",
        ),
        (
            "absolute form, HTTP/1.0",
            encode(Method::GET, "http://h:8080/p?q", V10, &[], none.clone()),
            "GET http://h:8080/p?q HTTP/1.0\r\n\r\n",
        ),
        (
            "authority form",
            encode(Method::CONNECT, "h:443", V11, &[], none.clone()),
            "CONNECT h:443 HTTP/1.1\r\n\r\n",
        ),
        (
            "HTTP/2 goes as HTTP/1.1",
            encode(Method::GET, "/", Version::HTTP_2, &[], none.clone()),
            "GET / HTTP/1.1\r\n\r\n",
        ),
        (
            "a length replaces the first content-length and drops the others",
            encode(
                Method::POST,
                "/",
                V11,
                &[("content-length", "x"), ("a", "1"), ("content-length", "y")],
                HeaderEdits {
                    set_content_length: Some(12345),
                    ..Default::default()
                },
            ),
            "POST / HTTP/1.1\r\ncontent-length: 12345\r\na: 1\r\n\r\n",
        ),
        (
            "a length is added last",
            encode(
                Method::PUT,
                "/",
                V11,
                &[("a", "1")],
                HeaderEdits {
                    set_content_length: Some(0),
                    ..Default::default()
                },
            ),
            "PUT / HTTP/1.1\r\na: 1\r\ncontent-length: 0\r\n\r\n",
        ),
        (
            "chunked appended to the last transfer-encoding, content-length dropped",
            encode(
                Method::POST,
                "/",
                V11,
                &[
                    ("transfer-encoding", "gzip"),
                    ("content-length", "3"),
                    ("transfer-encoding", "br"),
                ],
                HeaderEdits {
                    drop_content_length: true,
                    chunked: Some(ChunkedHeader::Append),
                    ..Default::default()
                },
            ),
            "POST / HTTP/1.1\r\ntransfer-encoding: gzip\r\ntransfer-encoding: br, chunked\r\n\r\n",
        ),
        (
            "chunked added, transfer-encoding dropped",
            encode(
                Method::POST,
                "/",
                V11,
                &[("transfer-encoding", "gzip")],
                HeaderEdits {
                    drop_transfer_encoding: true,
                    chunked: Some(ChunkedHeader::Add),
                    ..Default::default()
                },
            ),
            "POST / HTTP/1.1\r\ntransfer-encoding: chunked\r\n\r\n",
        ),
    ];
    for (name, got, want) in cases {
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn decimals_are_written_without_the_formatter() {
    for n in [0u64, 7, 10, 99, 100, 12345, u64::MAX] {
        let mut dst = Vec::new();
        push_decimal(&mut dst, n);
        assert_eq!(dst, n.to_string().as_bytes());
    }
}

#[test]
fn a_parsed_head_becomes_a_response_with_its_reason_phrase() {
    let mut buf = BytesMut::from(&b"HTTP/1.0 418 Short And Stout\r\nA: 1\r\n\r\n"[..]);
    let head = HeadParser::new(Limits::default()).parse(&mut buf).unwrap().unwrap();
    let (resp, fields) = head.into_response(());
    assert_eq!(resp.status(), StatusCode::IM_A_TEAPOT);
    assert_eq!(resp.version(), V10);
    assert!(resp.headers().is_empty());
    assert_eq!(
        fields.iter().collect::<Vec<_>>(),
        [(&b"A"[..], &b"1"[..], FieldKind::Other)]
    );
    assert_eq!(
        resp.extensions().get::<hyper::ext::ReasonPhrase>().unwrap().as_bytes(),
        b"Short And Stout"
    );
}

proptest! {
    /// Any head, cut anywhere into up to three reads, parses as it does in one.
    #[test]
    fn any_split_of_a_head_parses_as_the_whole(
        input in prop::collection::vec(prop::sample::select(vec![
            &b"HTTP/1.1 "[..], b"HTTP/1.0 ", b"200", b"101", b" OK", b"\r\n", b"\n", b"\r", b" ",
            b"Content-Length: 5", b"Connection: close", b"X:", b"\t", b"a", b"\xff", b":", b"\0",
        ]), 0..24).prop_map(|parts| parts.concat()),
        cuts in prop::collection::vec(0usize..200, 0..3),
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let limits = Limits { max_head_bytes: 96, ..Limits::default() };
        let whole = parse_all(&input, limits);
        let split = parse_split(&input, &cuts, limits);
        // A head refused for its size in one piece may be refused for its syntax first when
        // cut (httparse stops at the first bad byte), and the other way round: both refuse.
        match (&whole, &split) {
            (Outcome::Refused(_), Outcome::Refused(_)) => {}
            // The fast end check waits for an end before reparsing: an error after a cut shows
            // only once the head ends, or not at all (then the connection's close refuses it).
            (Outcome::Refused(_), Outcome::Incomplete) => {}
            _ => prop_assert_eq!(whole, split),
        }
    }
}

/// The fields are kept as they came, unchecked after the parse (`RawFields`): that is sound only
/// if httparse accepts exactly the name and value bytes `HeaderName` and `HeaderValue` accept.
#[test]
fn httparse_accepts_what_http_accepts() {
    for b in 0..=255u8 {
        let mut name = b"HTTP/1.1 200 OK\r\nx".to_vec();
        name.extend([b, b':', b' ', b'1', b'\r', b'\n', b'\r', b'\n']);
        let mut buf = BytesMut::from(&name[..]);
        let parsed = HeadParser::new(Limits::default()).parse(&mut buf);
        let valid = http::HeaderName::from_bytes(&[b'x', b]).is_ok();
        // (A colon ends the name: `x` with the value `: 1`.)
        if b != b':' {
            assert_eq!(matches!(parsed, Ok(Some(_))), valid, "name byte {b:#04x}");
        }

        let mut value = b"HTTP/1.1 200 OK\r\nx: a".to_vec();
        value.extend([b, b'a', b'\r', b'\n', b'\r', b'\n']);
        let mut buf = BytesMut::from(&value[..]);
        let parsed = HeadParser::new(Limits::default()).parse(&mut buf);
        let valid = HeaderValue::from_bytes(&[b'a', b, b'a']).is_ok();
        assert_eq!(matches!(parsed, Ok(Some(_))), valid, "value byte {b:#04x}");
        if let Ok(Some(h)) = parsed {
            assert_eq!(h.headers()["x"].as_bytes(), [b'a', b, b'a'], "value byte {b:#04x}");
        }
    }
}

#[test]
fn kept_fields_read_as_httparse_read_them_and_are_written_as_name_colon_value_lines() {
    let input = b"HTTP/1.1 200 OK\r\nA:1\r\nB: \t two words \t\r\nC:\r\nd-E:  x:y \nContent-Length: 3\r\n\r\nrest";
    let mut buf = BytesMut::from(&input[..]);
    let mut head = HeadParser::new(Limits::default()).parse(&mut buf).unwrap().unwrap();
    let other = FieldKind::Other;
    let want: Vec<(&[u8], &[u8], FieldKind)> = vec![
        (b"A", b"1", other),
        (b"B", b"two words", other),
        (b"C", b"", other),
        (b"d-E", b"x:y", other),
        (b"Content-Length", b"3", FieldKind::ContentLength),
    ];
    assert_eq!(head.fields.iter().collect::<Vec<_>>(), want);
    assert_eq!(head.fields.len(), 5);
    assert_eq!(&buf[..], b"rest");
    let mut out = Vec::new();
    head.fields.write_to(&mut out, |_, _| true);
    assert_eq!(out, b"A: 1\r\nB: two words\r\nC: \r\nd-E: x:y\r\nContent-Length: 3\r\n");

    head.fields.drop_content_length();
    assert_eq!(head.fields.iter().collect::<Vec<_>>(), want[..4]);
    let map = head.headers();
    assert_eq!(map.len(), 4);
    assert_eq!(map["d-e"], "x:y");
    out.clear();
    head.fields.write_to(&mut out, |name, _| name != b"B");
    assert_eq!(out, b"A: 1\r\nC: \r\nd-E: x:y\r\n");
}

#[test]
fn lines_that_came_canonical_are_copied_in_runs_around_the_fields_left_out() {
    let input = concat!(
        "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: today\r\nConnection: keep-alive\r\n",
        "Content-Type: text/plain\r\nX-A:  1\r\nX-B: 2\r\nKeep-Alive: timeout=5\r\nX-C: 3\r\n\r\n",
    );
    let mut buf = BytesMut::from(input);
    let head = HeadParser::new(Limits::default()).parse(&mut buf).unwrap().unwrap();
    let kinds: Vec<FieldKind> = head.fields.iter().map(|(_, _, k)| k).collect();
    use FieldKind::*;
    assert_eq!(kinds, [Other, Date, Connection, Other, Other, Other, HopByHop, Other]);
    let mut out = Vec::new();
    head.fields.write_to(&mut out, |_, kind| !kind.is_hop_by_hop());
    assert_eq!(
        String::from_utf8(out).unwrap(),
        "Server: nginx\r\nDate: today\r\nContent-Type: text/plain\r\nX-A: 1\r\nX-B: 2\r\nX-C: 3\r\n"
    );
}

#[test]
fn field_kinds_are_found_in_any_case() {
    use FieldKind::*;
    for (name, kind) in [
        ("content-length", ContentLength),
        ("Content-Length", ContentLength),
        ("TRANSFER-ENCODING", TransferEncoding),
        ("Connection", Connection),
        ("date", Date),
        ("Keep-Alive", HopByHop),
        ("proxy-connection", HopByHop),
        ("TE", HopByHop),
        ("Trailer", HopByHop),
        ("upgrade", HopByHop),
        ("content-type", Other),
        ("dates", Other),
        ("t", Other),
        ("x-vmesh-error", Other),
    ] {
        assert_eq!(FieldKind::of(name.as_bytes()), kind, "{name}");
    }
    // Every other token character in every place of a name of that length: never a match.
    let tchar = (0..=255u8).filter(|&b| http::HeaderName::from_bytes(&[b]).is_ok());
    for b in tchar {
        for name in [
            "content-length",
            "transfer-encoding",
            "connection",
            "keep-alive",
            "date",
            "te",
        ] {
            for i in 0..name.len() {
                let mut other = name.as_bytes().to_vec();
                if other[i].eq_ignore_ascii_case(&b) {
                    continue;
                }
                other[i] = b;
                assert_eq!(FieldKind::of(&other), Other, "{}", String::from_utf8_lossy(&other));
            }
        }
    }
    assert!(Connection.is_hop_by_hop() && TransferEncoding.is_hop_by_hop() && HopByHop.is_hop_by_hop());
    assert!(!ContentLength.is_hop_by_hop() && !Date.is_hop_by_hop() && !Other.is_hop_by_hop());
}
