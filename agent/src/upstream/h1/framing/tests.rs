//! Response framing (every RFC 9112 §6.3 case), the body decoders on every split of their input,
//! request framing (hyper's rules) and the request body encoders.

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Version};
use proptest::prelude::*;

use super::super::head::ResponseHead;
use super::super::Limits;
use super::*;

fn headers(fields: &[(&str, &str)]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for (n, v) in fields {
        map.append(
            HeaderName::from_bytes(n.as_bytes()).unwrap(),
            HeaderValue::from_bytes(v.as_bytes()).unwrap(),
        );
    }
    map
}

/// The head with these fields, as the parser makes it from its bytes.
fn head(version: Version, status: u16, fields: &[(&str, &str)]) -> ResponseHead {
    let mut text = format!("{version:?} {status} X\r\n");
    for (n, v) in fields {
        text.push_str(&format!("{n}: {v}\r\n"));
    }
    text.push_str("\r\n");
    let mut buf = BytesMut::from(text.as_str());
    let h = super::super::head::HeadParser::new(Limits::default())
        .parse(&mut buf)
        .unwrap()
        .unwrap();
    assert_eq!(h.status, StatusCode::from_u16(status).unwrap());
    h
}

#[test]
fn response_framing_follows_rfc_9112_section_6_3() {
    use FramingError::*;
    use ResponseFraming::*;
    let (get, head_m, connect) = (Method::GET, Method::HEAD, Method::CONNECT);
    let v11 = Version::HTTP_11;
    let v10 = Version::HTTP_10;
    let max = (u64::MAX - 2).to_string();
    let over = (u64::MAX - 1).to_string();
    // (case, method, version, status, fields, framing, content-length kept)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        &str,
        &Method,
        Version,
        u16,
        Vec<(&str, &str)>,
        Result<ResponseFraming, FramingError>,
        bool,
    )> = vec![
        (
            "length",
            &get,
            v11,
            200,
            vec![("content-length", "5")],
            Ok(Length(5)),
            true,
        ),
        (
            "zero length",
            &get,
            v11,
            200,
            vec![("content-length", "0")],
            Ok(Length(0)),
            true,
        ),
        (
            "same length twice",
            &get,
            v11,
            200,
            vec![("content-length", "5"), ("content-length", "5")],
            Ok(Length(5)),
            true,
        ),
        (
            "same length in a list",
            &get,
            v11,
            200,
            vec![("content-length", "5, 5")],
            Ok(Length(5)),
            true,
        ),
        (
            "padded length",
            &get,
            v11,
            200,
            vec![("content-length", " 5 ")],
            Ok(Length(5)),
            true,
        ),
        (
            "largest length",
            &get,
            v11,
            200,
            vec![("content-length", &max)],
            Ok(Length(u64::MAX - 2)),
            true,
        ),
        (
            "differing lengths",
            &get,
            v11,
            200,
            vec![("content-length", "5"), ("content-length", "6")],
            Err(InvalidContentLength),
            true,
        ),
        (
            "differing lengths in a list",
            &get,
            v11,
            200,
            vec![("content-length", "5, 6")],
            Err(InvalidContentLength),
            true,
        ),
        (
            "signed length",
            &get,
            v11,
            200,
            vec![("content-length", "+5")],
            Err(InvalidContentLength),
            true,
        ),
        (
            "negative length",
            &get,
            v11,
            200,
            vec![("content-length", "-1")],
            Err(InvalidContentLength),
            true,
        ),
        (
            "hex length",
            &get,
            v11,
            200,
            vec![("content-length", "0x5")],
            Err(InvalidContentLength),
            true,
        ),
        (
            "empty length",
            &get,
            v11,
            200,
            vec![("content-length", "")],
            Err(InvalidContentLength),
            true,
        ),
        (
            "empty list item",
            &get,
            v11,
            200,
            vec![("content-length", "5,")],
            Err(InvalidContentLength),
            true,
        ),
        (
            "length past hyper's",
            &get,
            v11,
            200,
            vec![("content-length", &over)],
            Err(ContentLengthTooLarge),
            true,
        ),
        (
            "length past u64",
            &get,
            v11,
            200,
            vec![("content-length", "99999999999999999999")],
            Err(InvalidContentLength),
            true,
        ),
        (
            "obs-text length",
            &get,
            v11,
            200,
            vec![("content-length", "5\u{e9}")],
            Err(InvalidContentLength),
            true,
        ),
        (
            "chunked",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "chunked")],
            Ok(Chunked),
            false,
        ),
        (
            "Chunked",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "Chunked ")],
            Ok(Chunked),
            false,
        ),
        (
            "gzip, chunked",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "gzip, chunked")],
            Ok(Chunked),
            false,
        ),
        (
            "chunked over two fields",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "gzip"), ("transfer-encoding", "chunked")],
            Ok(Chunked),
            false,
        ),
        (
            "chunked not last",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "chunked, gzip")],
            Ok(CloseDelimited),
            false,
        ),
        (
            "chunked not in the last field",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "chunked"), ("transfer-encoding", "gzip")],
            Ok(CloseDelimited),
            false,
        ),
        (
            "trailing comma",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "chunked,")],
            Ok(CloseDelimited),
            false,
        ),
        (
            "obfuscated",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "xchunked")],
            Ok(CloseDelimited),
            false,
        ),
        (
            "obfuscated with a tab",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "chunked\tx")],
            Ok(CloseDelimited),
            false,
        ),
        (
            "chunked and a length: the length goes",
            &get,
            v11,
            200,
            vec![("content-length", "5"), ("transfer-encoding", "chunked")],
            Ok(Chunked),
            false,
        ),
        (
            "chunked and a bad length",
            &get,
            v11,
            200,
            vec![("content-length", "x"), ("transfer-encoding", "chunked")],
            Ok(Chunked),
            false,
        ),
        (
            "gzip and a length: close-delimited",
            &get,
            v11,
            200,
            vec![("transfer-encoding", "gzip"), ("content-length", "5")],
            Ok(CloseDelimited),
            false,
        ),
        (
            "transfer-encoding in HTTP/1.0",
            &get,
            v10,
            200,
            vec![("transfer-encoding", "chunked")],
            Err(TransferEncodingInHttp10),
            true,
        ),
        ("neither", &get, v11, 200, vec![], Ok(CloseDelimited), true),
        ("HTTP/1.0 neither", &get, v10, 200, vec![], Ok(CloseDelimited), true),
        (
            "HEAD with a length",
            &head_m,
            v11,
            200,
            vec![("content-length", "5")],
            Ok(Empty),
            true,
        ),
        (
            "HEAD with both",
            &head_m,
            v11,
            200,
            vec![("content-length", "5"), ("transfer-encoding", "chunked")],
            Ok(Empty),
            true,
        ),
        (
            "HEAD with a bad length",
            &head_m,
            v11,
            200,
            vec![("content-length", "x")],
            Ok(Empty),
            true,
        ),
        (
            "204 with a length",
            &get,
            v11,
            204,
            vec![("content-length", "5")],
            Ok(Empty),
            true,
        ),
        (
            "304 with chunked",
            &get,
            v11,
            304,
            vec![("transfer-encoding", "chunked")],
            Ok(Empty),
            true,
        ),
        (
            "204 in HTTP/1.0 with chunked",
            &get,
            v10,
            204,
            vec![("transfer-encoding", "chunked")],
            Ok(Empty),
            true,
        ),
        ("100", &get, v11, 100, vec![("content-length", "5")], Ok(Interim), true),
        ("103", &get, v11, 103, vec![], Ok(Interim), true),
        ("199", &head_m, v11, 199, vec![], Ok(Interim), true),
        ("101", &get, v11, 101, vec![("content-length", "5")], Ok(Upgrade), true),
        (
            "2xx to CONNECT",
            &connect,
            v11,
            200,
            vec![("content-length", "5")],
            Ok(Upgrade),
            true,
        ),
        (
            "4xx to CONNECT",
            &connect,
            v11,
            407,
            vec![("content-length", "3")],
            Ok(Length(3)),
            true,
        ),
        (
            "205 with a length",
            &get,
            v11,
            205,
            vec![("content-length", "5")],
            Ok(Length(5)),
            true,
        ),
    ];
    for (name, method, version, status, fields, want, cl_kept) in cases {
        let mut h = head(version, status, &fields);
        let had_cl = h.headers().contains_key(http::header::CONTENT_LENGTH);
        assert_eq!(response_framing(method, &mut h), want, "{name}");
        if had_cl {
            assert_eq!(
                h.headers().contains_key(http::header::CONTENT_LENGTH),
                cl_kept,
                "{name}"
            );
        }
    }
}

/// What decoding a body came to.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The whole body, the trailers, the bytes after it.
    Ended(Vec<u8>, Option<Vec<(String, String)>>, Vec<u8>),
    /// The input ran out first (with the data so far); at EOF, the outcome.
    Open(Vec<u8>, Box<Outcome>),
    Failed(BodyError),
}

fn body(data: &[u8], trailers: &[(&str, &str)], rest: &[u8]) -> Outcome {
    let t = (!trailers.is_empty()).then(|| trailers.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect());
    Outcome::Ended(data.to_vec(), t, rest.to_vec())
}

fn open(data: &[u8], at_eof: Outcome) -> Outcome {
    Outcome::Open(data.to_vec(), Box::new(at_eof))
}

fn incomplete(data: &[u8]) -> Outcome {
    open(data, Outcome::Failed(BodyError::Incomplete))
}

/// Decodes `input` fed in pieces cut at `cuts`.
fn decode(framing: ResponseFraming, limits: Limits, input: &[u8], cuts: &[usize]) -> Outcome {
    let mut decoder = BodyDecoder::new(framing, &limits);
    let mut buf = BytesMut::new();
    let mut data = Vec::new();
    let mut start = 0;
    for end in cuts.iter().copied().chain([input.len()]) {
        let end = end.clamp(start, input.len());
        buf.extend_from_slice(&input[start..end]);
        start = end;
        loop {
            match decoder.decode(&mut buf) {
                Ok(Decoded::Data(d)) => {
                    assert!(!d.is_empty(), "an empty data frame");
                    data.extend_from_slice(&d);
                }
                Ok(Decoded::End(t)) => {
                    buf.extend_from_slice(&input[start..]);
                    return Outcome::Ended(data, trailers(t), buf.to_vec());
                }
                Ok(Decoded::NeedMore) => {
                    assert!(buf.is_empty(), "NeedMore with bytes left");
                    break;
                }
                Err(e) => return Outcome::Failed(e),
            }
        }
    }
    let at_eof = match decoder.eof() {
        Ok(Decoded::End(t)) => Outcome::Ended(Vec::new(), trailers(t), Vec::new()),
        Ok(other) => panic!("eof gave {other:?}"),
        Err(e) => Outcome::Failed(e),
    };
    Outcome::Open(data, Box::new(at_eof))
}

fn trailers(t: Option<HeaderMap>) -> Option<Vec<(String, String)>> {
    t.map(|t| {
        t.iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_owned()))
            .collect()
    })
}

/// Decodes whole, byte by byte, and cut once at every place: all must agree.
fn check(name: &str, framing: ResponseFraming, limits: Limits, input: &[u8], want: &Outcome) {
    assert_eq!(&decode(framing, limits, input, &[]), want, "{name}: whole");
    let bytes: Vec<usize> = (1..input.len()).collect();
    assert_eq!(&decode(framing, limits, input, &bytes), want, "{name}: byte by byte");
    // Every cut of a short input; of a long one, the edges and a hundred cuts between.
    let step = (input.len() / 100).max(1);
    let cuts = (0..=input.len()).filter(|c| *c < 64 || input.len() - c < 64 || c % step == 0);
    for cut in cuts {
        assert_eq!(&decode(framing, limits, input, &[cut]), want, "{name}: cut at {cut}");
    }
}

#[test]
fn chunked_bodies_decode_as_hyper_decodes_them_on_every_split() {
    use BodyError::*;
    let limits = Limits::default();
    let long_zeros = format!("{}5\r\nhello\r\n0\r\n\r\n", "0".repeat(1023));
    let too_long_zeros = format!("{}5\r\nhello\r\n0\r\n\r\n", "0".repeat(1024));
    let long_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(16 * 1024 - 1));
    let too_long_ext = format!("5;{}\r\nhello\r\n0\r\n\r\n", "a".repeat(16 * 1024));
    let split_ext = format!(
        "1;{}\r\na\r\n1;{}\r\nb\r\n0\r\n\r\n",
        "a".repeat(8 * 1024),
        "b".repeat(8 * 1024)
    );
    let many_trailers = format!("0\r\n{}\r\n", "a: b\r\n".repeat(101));
    let hundred_trailers = format!("0\r\n{}\r\n", "a: b\r\n".repeat(100));
    let hundred: Vec<(&str, &str)> = vec![("a", "b"); 100];
    let big_trailer = format!("0\r\nx: {}\r\n\r\n", "a".repeat(16 * 1024));
    let cases: Vec<(&str, &[u8], Outcome)> = vec![
        ("one chunk", b"5\r\nhello\r\n0\r\n\r\n", body(b"hello", &[], b"")),
        (
            "two chunks",
            b"5\r\nhello\r\n1\r\n!\r\n0\r\n\r\n",
            body(b"hello!", &[], b""),
        ),
        ("no chunk", b"0\r\n\r\n", body(b"", &[], b"")),
        (
            "hex digits",
            b"A\r\n0123456789\r\na\r\nabcdefghij\r\n0\r\n\r\n",
            body(b"0123456789abcdefghij", &[], b""),
        ),
        (
            "leading zeros",
            b"005\r\nhello\r\n000\r\n\r\n",
            body(b"hello", &[], b""),
        ),
        ("1023 leading zeros", long_zeros.as_bytes(), body(b"hello", &[], b"")),
        (
            "1024 leading zeros",
            too_long_zeros.as_bytes(),
            Outcome::Failed(ChunkSizeLine(1024)),
        ),
        (
            "whitespace after the size",
            b"5 \t \r\nhello\r\n0\r\n\r\n",
            body(b"hello", &[], b""),
        ),
        (
            "an extension",
            b"5;a=b\r\nhello\r\n0;x\r\n\r\n",
            body(b"hello", &[], b""),
        ),
        (
            "an extension after whitespace",
            b"5 ;a=\"b c\"\r\nhello\r\n0\r\n\r\n",
            body(b"hello", &[], b""),
        ),
        (
            "extensions up to the limit",
            long_ext.as_bytes(),
            body(b"hello", &[], b""),
        ),
        (
            "extensions over the limit",
            too_long_ext.as_bytes(),
            Outcome::Failed(ChunkExtensions(16 * 1024)),
        ),
        (
            "the extension limit is for the whole body",
            split_ext.as_bytes(),
            Outcome::Failed(ChunkExtensions(16 * 1024)),
        ),
        (
            "trailers",
            b"0\r\nA: 1\r\nb: 2\r\n\r\n",
            body(b"", &[("a", "1"), ("b", "2")], b""),
        ),
        ("100 trailers", hundred_trailers.as_bytes(), body(b"", &hundred, b"")),
        (
            "bytes after the body",
            b"1\r\nx\r\n0\r\n\r\nHTTP/1.1",
            body(b"x", &[], b"HTTP/1.1"),
        ),
        ("no size", b"\r\nhello\r\n0\r\n\r\n", Outcome::Failed(ChunkSize)),
        (
            "whitespace before the size",
            b" 5\r\nhello\r\n0\r\n\r\n",
            Outcome::Failed(ChunkSize),
        ),
        (
            "a digit after whitespace",
            b"5 5\r\nhello\r\n0\r\n\r\n",
            Outcome::Failed(ChunkSize),
        ),
        ("not hex", b"5g\r\nhello\r\n0\r\n\r\n", Outcome::Failed(ChunkSize)),
        ("signed", b"+5\r\nhello\r\n0\r\n\r\n", Outcome::Failed(ChunkSize)),
        ("hex prefix", b"0x5\r\nhello\r\n0\r\n\r\n", Outcome::Failed(ChunkSize)),
        (
            "size over u64",
            b"10000000000000000\r\n",
            Outcome::Failed(ChunkSizeOverflow),
        ),
        (
            "bare LF after the size",
            b"5\nhello\r\n0\r\n\r\n",
            Outcome::Failed(ChunkSize),
        ),
        (
            "CR without LF after the size",
            b"5\rhello\r\n0\r\n\r\n",
            Outcome::Failed(ChunkCrlf),
        ),
        (
            "newline in an extension",
            b"5;a\nhello\r\n0\r\n\r\n",
            Outcome::Failed(ChunkExtensionNewline),
        ),
        (
            "data longer than its size",
            b"5\r\nhello!\r\n0\r\n\r\n",
            Outcome::Failed(ChunkCrlf),
        ),
        (
            "data shorter than its size",
            b"5\r\nhell\r\n0\r\n\r\n",
            Outcome::Failed(ChunkCrlf),
        ),
        (
            "bare LF after the data",
            b"5\r\nhello\n0\r\n\r\n",
            Outcome::Failed(ChunkCrlf),
        ),
        // hyper takes any byte but CR after the last chunk as the start of a trailer field.
        ("bare LF at the end", b"0\r\n\n", incomplete(b"")),
        ("bare LF at the end, then a CRLF", b"0\r\n\n\r\n", incomplete(b"")),
        ("CR then junk at the end", b"0\r\n\rx", Outcome::Failed(ChunkCrlf)),
        (
            "a trailer without a colon",
            b"0\r\nnot a field\r\n\r\n",
            Outcome::Failed(Trailers),
        ),
        (
            "an obs-fold trailer",
            b"0\r\nA: 1\r\n b\r\n\r\n",
            Outcome::Failed(Trailers),
        ),
        (
            "a trailer line with a bare LF inside",
            b"0\r\nA: 1\nB: 2\r\n\r\n",
            Outcome::Failed(Trailers),
        ),
        ("a trailer CR without LF", b"0\r\nA: 1\rx", Outcome::Failed(ChunkCrlf)),
        (
            "101 trailers",
            many_trailers.as_bytes(),
            Outcome::Failed(TooManyTrailers(100)),
        ),
        (
            "a trailer section over 16 KiB",
            big_trailer.as_bytes(),
            Outcome::Failed(TrailersTooLarge(16 * 1024)),
        ),
        ("cut in the data", b"5\r\nhel", incomplete(b"hel")),
        ("cut in the size", b"5", incomplete(b"")),
        ("cut after the last chunk", b"5\r\nhello\r\n0\r\n", incomplete(b"hello")),
        ("cut in the trailers", b"0\r\nA: 1\r\n", incomplete(b"")),
        ("the largest size", b"ffffffffffffffff\r\nab", incomplete(b"ab")),
    ];
    for (name, input, want) in cases {
        check(name, ResponseFraming::Chunked, limits, input, &want);
    }
}

#[test]
fn length_and_close_delimited_bodies_end_where_they_should() {
    use ResponseFraming::*;
    let limits = Limits::default();
    let cases: Vec<(&str, ResponseFraming, &[u8], Outcome)> = vec![
        ("exact", Length(5), b"hello", body(b"hello", &[], b"")),
        ("bytes after", Length(5), b"helloHTTP", body(b"hello", &[], b"HTTP")),
        ("short", Length(5), b"hel", incomplete(b"hel")),
        ("empty", Empty, b"tail", body(b"", &[], b"tail")),
        ("zero length", Length(0), b"", body(b"", &[], b"")),
        (
            "until close",
            CloseDelimited,
            b"all of it",
            open(b"all of it", body(b"", &[], b"")),
        ),
        (
            "nothing until close",
            CloseDelimited,
            b"",
            open(b"", body(b"", &[], b"")),
        ),
    ];
    for (name, framing, input, want) in cases {
        check(name, framing, limits, input, &want);
    }
}

#[test]
fn the_decoder_reports_what_remains() {
    let limits = Limits::default();
    let mut d = BodyDecoder::new(ResponseFraming::Length(10), &limits);
    assert_eq!(d.remaining(), Some(10));
    let mut buf = BytesMut::from(&b"abcd"[..]);
    assert_eq!(d.decode(&mut buf), Ok(Decoded::Data(Bytes::from_static(b"abcd"))));
    assert_eq!(d.remaining(), Some(6));
    assert!(!d.is_done());
    assert_eq!(BodyDecoder::new(ResponseFraming::Chunked, &limits).remaining(), None);
    assert!(BodyDecoder::new(ResponseFraming::CloseDelimited, &limits).is_close_delimited());
    assert!(BodyDecoder::new(ResponseFraming::Empty, &limits).is_done());
}

#[test]
fn request_bodies_are_framed_by_hyper_s_rules() {
    use BodyKind::*;
    let (get, post) = (Method::GET, Method::POST);
    let v11 = Version::HTTP_11;
    let v10 = Version::HTTP_10;
    let edits = |te: bool, cl: bool, set: Option<u64>, chunked: Option<ChunkedHeader>| HeaderEdits {
        drop_transfer_encoding: te,
        drop_content_length: cl,
        set_content_length: set,
        chunked,
    };
    let none = edits(false, false, None, None);
    // (case, method, version, fields, body, encoder, edits)
    #[allow(clippy::type_complexity)]
    let cases: Vec<(
        &str,
        &Method,
        Version,
        Vec<(&str, &str)>,
        BodyKind,
        BodyEncoder,
        HeaderEdits,
    )> = vec![
        (
            "empty",
            &get,
            v11,
            vec![],
            Empty,
            BodyEncoder::Length(0),
            edits(true, false, None, None),
        ),
        (
            "empty keeps a length",
            &post,
            v11,
            vec![("content-length", "0")],
            Empty,
            BodyEncoder::Length(0),
            edits(true, false, None, None),
        ),
        (
            "known length",
            &post,
            v11,
            vec![],
            Known(5),
            BodyEncoder::Length(5),
            edits(false, false, Some(5), None),
        ),
        (
            "the caller's length",
            &post,
            v11,
            vec![("content-length", "7")],
            Known(5),
            BodyEncoder::Length(7),
            none.clone(),
        ),
        (
            "a bad length is replaced",
            &post,
            v11,
            vec![("content-length", "x")],
            Known(5),
            BodyEncoder::Length(5),
            edits(false, false, Some(5), None),
        ),
        (
            "unknown length",
            &post,
            v11,
            vec![],
            Unknown,
            BodyEncoder::Chunked,
            edits(false, false, None, Some(ChunkedHeader::Add)),
        ),
        (
            "unknown length drops a bad length",
            &post,
            v11,
            vec![("content-length", "x")],
            Unknown,
            BodyEncoder::Chunked,
            edits(false, true, None, Some(ChunkedHeader::Add)),
        ),
        (
            "unknown length with the caller's length",
            &post,
            v11,
            vec![("content-length", "3")],
            Unknown,
            BodyEncoder::Length(3),
            none.clone(),
        ),
        (
            "unknown length on GET sends nothing",
            &get,
            v11,
            vec![],
            Unknown,
            BodyEncoder::Length(0),
            none.clone(),
        ),
        (
            "unknown length on HEAD sends nothing",
            &Method::HEAD,
            v11,
            vec![],
            Unknown,
            BodyEncoder::Length(0),
            none.clone(),
        ),
        (
            "transfer-encoding chunked",
            &post,
            v11,
            vec![("transfer-encoding", "chunked")],
            Known(5),
            BodyEncoder::Chunked,
            none.clone(),
        ),
        (
            "transfer-encoding gzip gets chunked",
            &post,
            v11,
            vec![("transfer-encoding", "gzip"), ("content-length", "5")],
            Known(5),
            BodyEncoder::Chunked,
            edits(false, true, None, Some(ChunkedHeader::Append)),
        ),
        (
            "HTTP/1.0 known length",
            &post,
            v10,
            vec![("transfer-encoding", "chunked")],
            Known(5),
            BodyEncoder::Length(5),
            edits(true, false, Some(5), None),
        ),
        (
            "HTTP/1.0 caller's length",
            &post,
            v10,
            vec![("content-length", "3")],
            Unknown,
            BodyEncoder::Length(3),
            edits(true, false, None, None),
        ),
        (
            "HTTP/1.0 unknown length sends nothing",
            &post,
            v10,
            vec![],
            Unknown,
            BodyEncoder::Length(0),
            edits(true, false, None, None),
        ),
    ];
    for (name, method, version, fields, kind, encoder, want) in cases {
        let got = request_framing(method, version, &headers(&fields), kind);
        assert_eq!(got, RequestFraming { encoder, edits: want }, "{name}");
    }
}

#[test]
fn request_bodies_are_encoded_by_length_or_in_chunks() {
    let mut dst = Vec::new();
    let mut chunked = BodyEncoder::Chunked;
    chunked.encode(&b"hello"[..], &mut dst);
    chunked.encode(&b""[..], &mut dst);
    chunked.encode(Bytes::from(vec![b'x'; 300]), &mut dst);
    assert_eq!(chunked.finish(&mut dst), Ok(()));
    let mut want = b"5\r\nhello\r\n12C\r\n".to_vec();
    want.extend_from_slice(&[b'x'; 300]);
    want.extend_from_slice(b"\r\n0\r\n\r\n");
    assert_eq!(dst, want);

    let mut dst = Vec::new();
    let mut length = BodyEncoder::Length(7);
    length.encode(&b"hello"[..], &mut dst);
    assert!(!length.is_full());
    assert_eq!(length.finish(&mut Vec::new()), Err(2));
    // More than owed: the rest is dropped, as hyper does.
    length.encode(&b"world"[..], &mut dst);
    assert!(length.is_full());
    assert_eq!(length.finish(&mut dst), Ok(()));
    assert_eq!(dst, b"hellowo");
}

#[test]
fn hex_sizes_are_written_without_the_formatter() {
    for n in [0u64, 1, 9, 10, 15, 16, 255, 4096, 0x1234_abcd, u64::MAX] {
        let mut dst = Vec::new();
        push_hex(&mut dst, n);
        assert_eq!(dst, format!("{n:X}").as_bytes());
    }
}

/// One chunk of a generated chunked body: data, whitespace after the size, extension text.
fn chunk() -> impl Strategy<Value = (Vec<u8>, usize, Option<String>, usize)> {
    (
        prop::collection::vec(any::<u8>(), 1..40),
        0usize..3,
        prop::option::of("[a-z=;\" ]{0,12}"),
        0usize..4,
    )
}

proptest! {
    /// Any chunked body, however encoded (leading zeros, whitespace, extensions, trailers) and
    /// however cut, decodes to its data and trailers.
    #[test]
    fn any_chunked_body_decodes_whatever_the_reads(
        chunks in prop::collection::vec(chunk(), 0..6),
        // Distinct names: a HeaderMap lists the values of a name together.
        trailers in prop::collection::btree_map("[a-z]{1,8}", "[a-zA-Z0-9 ]{0,10}", 0..3),
        cuts in prop::collection::vec(0usize..400, 0..4),
        tail in prop::collection::vec(any::<u8>(), 0..8),
    ) {
        let mut wire = Vec::new();
        let mut data = Vec::new();
        for (bytes, lws, ext, zeros) in &chunks {
            wire.extend_from_slice("0".repeat(*zeros).as_bytes());
            wire.extend_from_slice(format!("{:X}", bytes.len()).as_bytes());
            wire.extend_from_slice(" ".repeat(*lws).as_bytes());
            if let Some(ext) = ext {
                wire.push(b';');
                wire.extend_from_slice(ext.as_bytes());
            }
            wire.extend_from_slice(b"\r\n");
            wire.extend_from_slice(bytes);
            wire.extend_from_slice(b"\r\n");
            data.extend_from_slice(bytes);
        }
        wire.extend_from_slice(b"0\r\n");
        for (n, v) in &trailers {
            wire.extend_from_slice(format!("{n}: {v}\r\n").as_bytes());
        }
        wire.extend_from_slice(b"\r\n");
        wire.extend_from_slice(&tail);
        let want_trailers = (!trailers.is_empty()).then(|| {
            trailers.iter().map(|(n, v)| (n.clone(), v.trim().to_owned())).collect::<Vec<_>>()
        });
        let mut cuts = cuts;
        cuts.sort_unstable();
        let got = decode(ResponseFraming::Chunked, Limits::default(), &wire, &cuts);
        let want = Outcome::Ended(data, want_trailers, tail);
        prop_assert_eq!(got, want);
    }

    /// Any bytes at all: the decoder never panics, and a cut never changes its answer.
    #[test]
    fn any_bytes_decode_the_same_whatever_the_reads(
        input in prop::collection::vec(prop::sample::select(vec![
            &b"0"[..], b"5", b"a", b"F", b"\r", b"\n", b"\r\n", b" ", b";", b"x", b":", b"hello",
        ]), 0..30).prop_map(|p| p.concat()),
        cuts in prop::collection::vec(0usize..150, 0..4),
    ) {
        let mut cuts = cuts;
        cuts.sort_unstable();
        let limits = Limits { max_chunk_size_line: 8, max_trailer_bytes: 32, max_trailers: 3, max_chunk_extensions: 16, ..Limits::default() };
        let whole = decode(ResponseFraming::Chunked, limits, &input, &[]);
        prop_assert_eq!(decode(ResponseFraming::Chunked, limits, &input, &cuts), whole);
    }
}
