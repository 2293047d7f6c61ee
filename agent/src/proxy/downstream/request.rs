//! Request heads from clients, parsed on httparse with hyper's server strictness, and the framing
//! of the body that follows (RFC 9112 §6.1-6.3).
//!
//! As hyper 1.x's server (`proto/h1/role.rs`): httparse's default configuration (no obs-fold, no
//! space before a colon, no HTTP/0.9), at most [`MAX_HEADERS`] fields, names valid for `http`,
//! values sliced from one frozen buffer (not copied), the target parsed by `http::Uri`.
//! Stricter than hyper where request smuggling lives: a `Transfer-Encoding` must be exactly one
//! `chunked` (any other coding, list or repetition is refused), never beside a `Content-Length`,
//! never in HTTP/1.0; `Content-Length` values must all be the same digits.

use std::mem::MaybeUninit;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Uri, Version};

use crate::upstream::h1::head::has_token;

/// The most header fields a request head may carry (hyper's default).
pub const MAX_HEADERS: usize = 100;

/// The longest request target (`http::Uri`'s limit; hyper answers 414 beyond it too).
pub const MAX_TARGET: usize = 65534;

/// A parsed request head and what the connection needs to know of it.
#[derive(Debug)]
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub version: Version,
    pub headers: HeaderMap,
    pub framing: Framing,
    /// HTTP/1.1 unless a `Connection` field says `close`; HTTP/1.0 only with `keep-alive`.
    pub keep_alive: bool,
    /// `Expect: 100-continue` (HTTP/1.1 with a body): the client waits for a 100 before its body.
    pub expect_continue: bool,
    /// An HTTP/1.1 request with an `Upgrade` field: a 101 answer hands the connection over.
    pub upgrade: bool,
}

/// How the request body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body (no `Content-Length`, or 0, and no `Transfer-Encoding`).
    Empty,
    Length(u64),
    Chunked,
}

/// Why a request head was refused: answered (400 or 431) and the connection closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    #[error("malformed request head: {0}")]
    Syntax(httparse::Error),
    #[error("request head larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {MAX_HEADERS} request header fields")]
    TooManyHeaders,
    #[error("invalid request target")]
    Target,
    #[error("request target longer than {MAX_TARGET} bytes")]
    TargetTooLong,
    #[error("invalid request method")]
    Method,
    #[error("invalid request header field")]
    Field,
    #[error("invalid or conflicting content-length")]
    ContentLength,
    #[error("transfer-encoding other than one `chunked`")]
    TransferEncoding,
    #[error("transfer-encoding in an HTTP/1.0 request")]
    TransferEncodingInHttp10,
    #[error("both transfer-encoding and content-length")]
    BothFramings,
}

impl HeadError {
    /// The status the client is answered with.
    pub fn status(self) -> http::StatusCode {
        match self {
            Self::TooLarge(_) | Self::TooManyHeaders => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Self::TargetTooLong => http::StatusCode::URI_TOO_LONG,
            _ => http::StatusCode::BAD_REQUEST,
        }
    }
}

/// Where one field's name and value are in the head's bytes.
#[derive(Debug, Clone, Copy)]
struct Field {
    name: (usize, usize),
    value: (usize, usize),
}

/// Parses the request heads arriving on one connection; keeps how far an incomplete head was
/// looked at (a head arriving in many reads is parsed once it is complete, not once per read).
#[derive(Debug, Default)]
pub struct HeadParser {
    partial: Option<usize>,
}

thread_local! {
    /// Where the fields of the head being parsed are: one index per thread, reused (no
    /// allocation per head, and none held by an idle connection).
    static FIELDS: std::cell::RefCell<Vec<Field>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl HeadParser {
    /// Parses the head at the front of `buf`. Complete: removed from `buf` (what follows stays).
    /// Incomplete: `Ok(None)`, `buf` untouched, unless it already holds `max_head` bytes.
    pub fn parse(&mut self, buf: &mut BytesMut, max_head: usize) -> Result<Option<RequestHead>, HeadError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(prev) = self.partial {
            if !crate::upstream::h1::head::has_end_after(buf, prev) {
                return self.incomplete(buf.len(), max_head);
            }
        }
        let parsed = FIELDS.with(|f| match f.try_borrow_mut() {
            Ok(mut fields) => parse_head(buf, max_head, &mut fields),
            // Not reentrant; a fresh index all the same.
            Err(_) => parse_head(buf, max_head, &mut Vec::new()),
        });
        match parsed? {
            Some(head) => {
                self.partial = None;
                Ok(Some(head))
            }
            None => self.incomplete(buf.len(), max_head),
        }
    }

    fn incomplete(&mut self, len: usize, max_head: usize) -> Result<Option<RequestHead>, HeadError> {
        if len >= max_head {
            return Err(HeadError::TooLarge(max_head));
        }
        self.partial = Some(len);
        Ok(None)
    }
}

fn parse_head(buf: &mut BytesMut, max_head: usize, fields: &mut Vec<Field>) -> Result<Option<RequestHead>, HeadError> {
    fields.clear();
    let (len, method, target, version) = {
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut req = httparse::Request::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_request_with_uninit_headers(&mut req, buf, &mut headers)
        {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders),
            Err(e) => return Err(HeadError::Syntax(e)),
        };
        if len > max_head {
            return Err(HeadError::TooLarge(max_head));
        }
        let base = buf.as_ptr() as usize;
        let offset = |s: &[u8]| (s.as_ptr() as usize).saturating_sub(base);
        for h in req.headers.iter() {
            if h.name.len() >= 1 << 16 {
                return Err(HeadError::TooLarge(max_head));
            }
            let (n, v) = (offset(h.name.as_bytes()), offset(h.value));
            fields.push(Field {
                name: (n, n.saturating_add(h.name.len())),
                value: (v, v.saturating_add(h.value.len())),
            });
        }
        let method = Method::from_bytes(req.method.unwrap_or_default().as_bytes()).map_err(|_| HeadError::Method)?;
        let path = req.path.unwrap_or_default();
        let t = offset(path.as_bytes());
        let version = if req.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        (len, method, (t, t.saturating_add(path.len())), version)
    };
    let head = buf.split_to(len).freeze();
    if head.get(target.0..target.1).is_none() {
        return Err(HeadError::Target);
    }
    if target.1 - target.0 > MAX_TARGET {
        return Err(HeadError::TargetTooLong);
    }
    let uri = Uri::from_maybe_shared(head.slice(target.0..target.1)).map_err(|_| HeadError::Target)?;

    // Room for the two fields the proxy adds (x-forwarded-for, x-request-id).
    let mut headers = crate::upstream::maps::take(fields.len() + 2);
    let mut keep_alive = version == Version::HTTP_11;
    let mut saw_close = false;
    let mut length: Option<u64> = None;
    let mut te_lines = 0u32;
    let mut te_chunked = false;
    let mut expect_continue = false;
    let mut upgrade = false;
    for f in fields.iter() {
        let name = head.get(f.name.0..f.name.1).ok_or(HeadError::Field)?;
        let name = crate::upstream::names::name(name).map_err(|_| HeadError::Field)?;
        if head.get(f.value.0..f.value.1).is_none() {
            return Err(HeadError::Field);
        }
        // httparse allows only visible ASCII, obs-text, SP and HTAB in values: what
        // `HeaderValue` allows (checked again here, as hyper's client does, for one pass of
        // a few bytes per field).
        let value = HeaderValue::from_maybe_shared(head.slice(f.value.0..f.value.1)).map_err(|_| HeadError::Field)?;
        match name {
            ref n if *n == header::CONTENT_LENGTH => {
                let n = parse_length(value.as_bytes()).ok_or(HeadError::ContentLength)?;
                if length.is_some_and(|l| l != n) {
                    return Err(HeadError::ContentLength);
                }
                length = Some(n);
            }
            ref n if *n == header::TRANSFER_ENCODING => {
                if version == Version::HTTP_10 {
                    return Err(HeadError::TransferEncodingInHttp10);
                }
                te_lines += 1;
                te_chunked = value.as_bytes().trim_ascii().eq_ignore_ascii_case(b"chunked");
            }
            ref n if *n == header::CONNECTION => {
                if saw_close || has_token(&value, "close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token(&value, "keep-alive");
                }
            }
            ref n if *n == header::EXPECT => {
                expect_continue = value.as_bytes().eq_ignore_ascii_case(b"100-continue");
            }
            ref n if *n == header::UPGRADE => upgrade = version == Version::HTTP_11,
            _ => {}
        }
        headers.append(name, value);
    }
    let framing = match (te_lines, length) {
        (0, None | Some(0)) => Framing::Empty,
        (0, Some(n)) => Framing::Length(n),
        (1, None) if te_chunked => Framing::Chunked,
        (1, Some(_)) if te_chunked => return Err(HeadError::BothFramings),
        _ => return Err(HeadError::TransferEncoding),
    };
    Ok(Some(RequestHead {
        method,
        uri,
        version,
        headers,
        framing,
        keep_alive,
        expect_continue: expect_continue && version == Version::HTTP_11 && framing != Framing::Empty,
        upgrade,
    }))
}

/// A `Content-Length` value: digits only (no sign, no list), below `u64::MAX - 1` (hyper's
/// largest, which keeps the two values above for its own markers).
fn parse_length(s: &[u8]) -> Option<u64> {
    crate::upstream::h1::framing::digits(s).filter(|&n| n < u64::MAX - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &str) -> Result<Option<RequestHead>, HeadError> {
        let mut buf = BytesMut::from(raw.as_bytes());
        HeadParser::default().parse(&mut buf, 64 << 10)
    }

    fn framing(raw: &str) -> Result<Framing, HeadError> {
        parse(raw).map(|h| h.expect("complete").framing)
    }

    #[test]
    fn a_plain_get_keeps_alive_with_no_body() {
        let h = parse("GET /a?b=1 HTTP/1.1\r\nHost: x\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.method, Method::GET);
        assert_eq!(h.uri, "/a?b=1");
        assert_eq!(h.framing, Framing::Empty);
        assert!(h.keep_alive);
        assert_eq!(h.headers["host"], "x");
    }

    #[test]
    fn a_partial_head_asks_for_more_and_leaves_the_buffer() {
        let mut p = HeadParser::default();
        let mut buf = BytesMut::from(&b"GET / HTTP/1.1\r\nHo"[..]);
        assert!(p.parse(&mut buf, 1024).unwrap().is_none());
        assert_eq!(buf.len(), 18);
        buf.extend_from_slice(b"st: x\r\n\r\nNEXT");
        assert!(p.parse(&mut buf, 1024).unwrap().is_some());
        assert_eq!(&buf[..], b"NEXT");
    }

    #[test]
    fn a_head_over_the_limit_is_too_large() {
        let mut buf = BytesMut::from(format!("GET / HTTP/1.1\r\nX: {}", "a".repeat(2000)).as_bytes());
        assert_eq!(
            HeadParser::default().parse(&mut buf, 1024).unwrap_err(),
            HeadError::TooLarge(1024)
        );
    }

    #[test]
    fn framing_follows_rfc_9112_and_refuses_smuggling_shapes() {
        let req = |lines: &str| format!("POST / HTTP/1.1\r\nHost: x\r\n{lines}\r\n");
        assert_eq!(framing(&req("Content-Length: 5\r\n")), Ok(Framing::Length(5)));
        assert_eq!(framing(&req("Content-Length: 0\r\n")), Ok(Framing::Empty));
        assert_eq!(
            framing(&req("Content-Length: 5\r\nContent-Length: 5\r\n")),
            Ok(Framing::Length(5))
        );
        assert_eq!(framing(&req("Transfer-Encoding: chunked\r\n")), Ok(Framing::Chunked));
        assert_eq!(framing(&req("Transfer-Encoding:\tChunked \r\n")), Ok(Framing::Chunked));
        for bad in [
            "Content-Length: 0\r\nContent-Length: 5\r\n",
            "Content-Length: 0, 5\r\n",
            "Content-Length: +5\r\n",
            "Content-Length: abc\r\n",
            "Content-Length: 99999999999999999999999\r\n",
            "Content-Length: 18446744073709551614\r\n",
        ] {
            assert_eq!(framing(&req(bad)), Err(HeadError::ContentLength), "{bad:?}");
        }
        for bad in [
            "Transfer-Encoding: xchunked\r\n",
            "Transfer-Encoding: chunked, identity\r\n",
            "Transfer-Encoding: chunked, chunked\r\n",
            "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: identity\r\nTransfer-Encoding: chunked\r\n",
            "Transfer-Encoding: gzip\r\n",
        ] {
            assert_eq!(framing(&req(bad)), Err(HeadError::TransferEncoding), "{bad:?}");
        }
        assert_eq!(
            framing(&req("Transfer-Encoding: chunked\r\nContent-Length: 4\r\n")),
            Err(HeadError::BothFramings)
        );
        assert_eq!(
            framing("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(HeadError::TransferEncodingInHttp10)
        );
        // A space before the colon, and obs-fold, are syntax errors (httparse's defaults).
        assert!(matches!(
            parse(&req("Transfer-Encoding : chunked\r\n")),
            Err(HeadError::Syntax(_))
        ));
        assert!(matches!(
            parse(&req("Transfer-Encoding: identity\r\n chunked\r\n")),
            Err(HeadError::Syntax(_))
        ));
    }

    #[test]
    fn keep_alive_follows_the_version_and_connection() {
        let ka = |raw: &str| parse(raw).unwrap().unwrap().keep_alive;
        assert!(!ka("GET / HTTP/1.1\r\nConnection: close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.1\r\nConnection: Keep-Alive, close\r\n\r\n"));
        assert!(!ka("GET / HTTP/1.0\r\n\r\n"));
        assert!(ka("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"));
    }

    #[test]
    fn expect_continue_only_with_a_body_in_http_11() {
        let ec = |raw: &str| parse(raw).unwrap().unwrap().expect_continue;
        assert!(ec(
            "PUT / HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"
        ));
        assert!(!ec("GET / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n"));
    }

    #[test]
    fn too_many_fields_and_bad_targets_are_refused() {
        let many: String = (0..101).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            parse(&format!("GET / HTTP/1.1\r\n{many}\r\n")).unwrap_err(),
            HeadError::TooManyHeaders
        );
        assert!(parse("GET /a b HTTP/1.1\r\n\r\n").is_err());
        assert!(parse("THIS IS NOT HTTP AT ALL\r\n\r\n").is_err());
        let h = parse("GET http://app:8080/x HTTP/1.1\r\n\r\n").unwrap().unwrap();
        assert_eq!(h.uri.authority().unwrap().as_str(), "app:8080");
    }
}
