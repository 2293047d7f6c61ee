//! Response heads encoded for an HTTP/1.1 client into the connection's write buffer, with the
//! framing of the body (hyper's server rules): no body for HEAD, 1xx, 204 and 304; a valid
//! `Content-Length` is kept; a body of known size gets one; else chunked coding for HTTP/1.1,
//! the connection's close for HTTP/1.0. `Date` is added when missing, `Connection: close` when
//! the connection closes after this response, `Connection: keep-alive` for an HTTP/1.0 client
//! that keeps it.

use std::cell::RefCell;
use std::time::{SystemTime, UNIX_EPOCH};

use http::header;
use http::response::Parts;
use http::{StatusCode, Version};
use hyper::ext::ReasonPhrase;

use crate::proxy::headers;
use crate::upstream::h1::framing::{BodyEncoder, Length};
use crate::upstream::h1::{FieldKind, RawFields};

/// How the response body goes out.
#[derive(Debug)]
pub enum Out {
    /// No body is sent (HEAD, 1xx, 204, 304).
    None,
    /// Content-Length or chunked.
    Framed(BodyEncoder),
    /// Until the connection closes (an HTTP/1.0 client, a body of unknown length).
    Close,
}

/// What the connection knows of the request a response answers.
#[derive(Debug, Clone, Copy)]
pub struct Answering {
    pub head_request: bool,
    pub version: Version,
    /// The connection closes after this response.
    pub closing: bool,
}

/// Appends the head of `parts` to `dst`, with an HTTP/1.1 upstream's fields as they came after
/// the map's (`raw`: those [`headers::passes`] lets through, names in their case); `body_len` is
/// the body's exact size when known. Returns how the body goes out, and whether the connection
/// must close after it (a body delimited by the close, or a `Connection: close` the response
/// carries in its map).
pub fn encode_head(
    dst: &mut Vec<u8>,
    parts: &Parts,
    raw: Option<&RawFields>,
    body_len: Option<u64>,
    req: Answering,
) -> (Out, bool) {
    let status = parts.status;
    // One pass for what the framing needs (no lookups): `Connection: close`, a valid length.
    // (The length of fields as they came is the upstream body's, `body_len`: the upstream's
    // framing read it, or refused the response.)
    let mut closing = req.closing;
    let mut has_connection = false;
    let mut length = Length::default();
    for (name, value) in &parts.headers {
        if *name == header::CONNECTION {
            has_connection = true;
            closing |= crate::upstream::h1::head::has_token(value, "close");
        } else if *name == header::CONTENT_LENGTH {
            length.add(value);
        }
    }
    let bodyless_status = status.is_informational() || status == StatusCode::NO_CONTENT;
    let out = if bodyless_status || status == StatusCode::NOT_MODIFIED || req.head_request {
        Out::None
    } else if let Ok(Some(n)) = length.get() {
        Out::Framed(BodyEncoder::Length(n))
    } else if let Some(n) = body_len {
        Out::Framed(BodyEncoder::Length(n))
    } else if req.version == Version::HTTP_11 {
        Out::Framed(BodyEncoder::Chunked)
    } else {
        closing = true;
        Out::Close
    };

    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.push(b' ');
    match parts.extensions.get::<ReasonPhrase>() {
        Some(reason) => dst.extend_from_slice(reason.as_bytes()),
        None => dst.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes()),
    }
    dst.extend_from_slice(b"\r\n");

    let mut has_date = false;
    let mut has_length = false;
    for (name, value) in &parts.headers {
        if *name == header::TRANSFER_ENCODING {
            // Framing is the connection's: hop-by-hop, never passed on as received.
            continue;
        }
        if *name == header::CONTENT_LENGTH {
            if bodyless_status || !matches!(out, Out::Framed(BodyEncoder::Length(_)) | Out::None) {
                continue;
            }
            has_length = true;
        }
        if *name == header::CONNECTION && closing {
            // Written once below.
            continue;
        }
        has_date |= *name == header::DATE;
        put_field(dst, name.as_str().as_bytes(), value.as_bytes());
    }
    // The same rules for the fields as they came (`passes` leaves out the hop-by-hop ones,
    // Transfer-Encoding and Connection among them); lines that came as `name: value` CRLF go
    // out as they are.
    if let Some(raw) = raw {
        raw.write_to(dst, |name, kind| {
            if !headers::passes(name, kind) {
                return false;
            }
            match kind {
                FieldKind::ContentLength => {
                    if bodyless_status || !matches!(out, Out::Framed(BodyEncoder::Length(_)) | Out::None) {
                        return false;
                    }
                    has_length = true;
                }
                FieldKind::Date => has_date = true,
                _ => {}
            }
            true
        });
    }
    match &out {
        Out::Framed(BodyEncoder::Length(n)) if !has_length => {
            dst.extend_from_slice(b"content-length: ");
            let mut digits = itoa_buf();
            dst.extend_from_slice(format_u64(&mut digits, *n));
            dst.extend_from_slice(b"\r\n");
        }
        Out::Framed(BodyEncoder::Chunked) => dst.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        _ => {}
    }
    if closing {
        dst.extend_from_slice(b"connection: close\r\n");
    } else if req.version == Version::HTTP_10 && !has_connection {
        dst.extend_from_slice(b"connection: keep-alive\r\n");
    }
    if !has_date {
        dst.extend_from_slice(b"date: ");
        push_date(dst);
        dst.extend_from_slice(b"\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    (out, closing)
}

fn put_field(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

fn itoa_buf() -> [u8; 20] {
    [0; 20]
}

/// `n` in decimal, written at the end of `buf`.
fn format_u64(buf: &mut [u8; 20], mut n: u64) -> &[u8] {
    let mut i = buf.len();
    loop {
        i -= 1;
        if let Some(d) = buf.get_mut(i) {
            *d = b'0' + (n % 10) as u8;
        }
        n /= 10;
        if n == 0 || i == 0 {
            break;
        }
    }
    buf.get(i..).unwrap_or_default()
}

thread_local! {
    /// The `Date` value of the current second (IMF-fixdate, 29 bytes), per thread.
    static DATE: RefCell<(u64, Vec<u8>)> = const { RefCell::new((u64::MAX, Vec::new())) };
}

/// Appends the current time as an HTTP date, formatted once per second per thread.
fn push_date(dst: &mut Vec<u8>) {
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    DATE.with(|d| {
        let mut d = d.borrow_mut();
        if d.0 != secs {
            d.1 = httpdate::fmt_http_date(now).into_bytes();
            d.0 = secs;
        }
        dst.extend_from_slice(&d.1);
    });
}

/// The fixed answer to a head that cannot be parsed (hyper's: status line, no body).
pub fn refusal(status: StatusCode) -> Vec<u8> {
    let mut dst = Vec::with_capacity(128);
    dst.extend_from_slice(b"HTTP/1.1 ");
    dst.extend_from_slice(status.as_str().as_bytes());
    dst.push(b' ');
    dst.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    dst.extend_from_slice(b"\r\ncontent-length: 0\r\nconnection: close\r\ndate: ");
    push_date(&mut dst);
    dst.extend_from_slice(b"\r\n\r\n");
    dst
}

/// `HTTP/1.1 100 Continue`, for a client that sent `Expect: 100-continue` once its body is read.
pub const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

#[cfg(test)]
mod tests {
    use super::*;

    fn encode(resp: http::Response<()>, body_len: Option<u64>, req: Answering) -> (String, bool) {
        let (parts, ()) = resp.into_parts();
        let mut dst = Vec::new();
        let (_, closing) = encode_head(&mut dst, &parts, None, body_len, req);
        (String::from_utf8(dst).unwrap(), closing)
    }

    /// The fields of an HTTP/1.1 upstream's response head, framed as for a GET.
    fn upstream_fields(head: &str) -> RawFields {
        use crate::upstream::h1::{framing, head::HeadParser, Limits};
        let mut buf = bytes::BytesMut::from(head);
        let mut parsed = HeadParser::new(Limits::default()).parse(&mut buf).unwrap().unwrap();
        framing::response_framing(&http::Method::GET, &mut parsed).unwrap();
        parsed.fields
    }

    #[test]
    fn an_upstreams_fields_go_out_as_they_came_without_the_hop_by_hop_and_vmesh_ones() {
        let raw = upstream_fields(concat!(
            "HTTP/1.1 200 OK\r\nServer: nginx\r\nDate: Mon, 30 Nov 2026 08:49:43 GMT\r\n",
            "Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Vmesh-Error: FAKE\r\n",
            "x-vmesh-fallback: 1\r\nContent-Length: 20\r\nX-Multi: a\r\nx-multi: \t b \r\n",
            "Upgrade: h2c\r\nProxy-Connection: x\r\nTE: trailers\r\nTrailer: x\r\n\r\n",
        ));
        let mut resp = http::Response::new(());
        resp.headers_mut()
            .insert("x-added", http::HeaderValue::from_static("1"));
        let (parts, ()) = resp.into_parts();
        let mut dst = Vec::new();
        let (out, closing) = encode_head(&mut dst, &parts, Some(&raw), Some(20), KEEP);
        assert_eq!(
            String::from_utf8(dst).unwrap(),
            concat!(
                "HTTP/1.1 200 OK\r\nx-added: 1\r\nServer: nginx\r\n",
                "Date: Mon, 30 Nov 2026 08:49:43 GMT\r\nContent-Length: 20\r\n",
                "X-Multi: a\r\nx-multi: b\r\n\r\n",
            )
        );
        assert!(matches!(out, Out::Framed(BodyEncoder::Length(20))) && !closing);
    }

    #[test]
    fn an_upstreams_transfer_encoding_drops_its_content_length_and_the_body_is_chunked_anew() {
        let raw = upstream_fields("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\nA: 1\r\n\r\n");
        // Left out of the fields themselves (an HTTP/2 client's map is made from them), not only
        // by the framing below.
        assert!(raw.iter().all(|(_, _, kind)| kind != FieldKind::ContentLength));
        let (parts, ()) = http::Response::new(()).into_parts();
        let mut dst = Vec::new();
        let (out, closing) = encode_head(&mut dst, &parts, Some(&raw), None, KEEP);
        let head = String::from_utf8(dst).unwrap();
        assert!(matches!(out, Out::Framed(BodyEncoder::Chunked)) && !closing, "{head}");
        assert!(
            head.starts_with("HTTP/1.1 200 OK\r\nA: 1\r\ntransfer-encoding: chunked\r\ndate: "),
            "{head}"
        );
        assert!(!head.to_ascii_lowercase().contains("content-length"), "{head}");
        assert_eq!(head.matches("chunked").count(), 1, "{head}");
    }

    const KEEP: Answering = Answering {
        head_request: false,
        version: Version::HTTP_11,
        closing: false,
    };

    #[test]
    fn a_known_length_gets_content_length_and_a_date() {
        let (head, closing) = encode(http::Response::new(()), Some(12), KEEP);
        assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
        assert!(head.contains("content-length: 12\r\n"), "{head}");
        assert!(head.contains("date: "), "{head}");
        assert!(head.ends_with("\r\n\r\n"));
        assert!(!closing);
    }

    #[test]
    fn an_unknown_length_is_chunked_for_11_and_close_delimited_for_10() {
        let (head, closing) = encode(http::Response::new(()), None, KEEP);
        assert!(head.contains("transfer-encoding: chunked\r\n") && !closing, "{head}");
        let (head, closing) = encode(
            http::Response::new(()),
            None,
            Answering {
                version: Version::HTTP_10,
                ..KEEP
            },
        );
        assert!(head.contains("connection: close\r\n") && closing, "{head}");
    }

    #[test]
    fn no_content_drops_framing_fields_and_head_keeps_the_length() {
        let r = http::Response::builder()
            .status(204)
            .header("content-length", "5")
            .body(())
            .unwrap();
        let (head, _) = encode(r, Some(0), KEEP);
        assert!(!head.contains("content-length"), "{head}");
        let r = http::Response::builder()
            .header("content-length", "5")
            .body(())
            .unwrap();
        let (head, _) = encode(
            r,
            None,
            Answering {
                head_request: true,
                ..KEEP
            },
        );
        assert!(head.contains("content-length: 5\r\n"), "{head}");
    }

    #[test]
    fn the_upstream_reason_phrase_is_repeated() {
        let mut r = http::Response::builder().status(299).body(()).unwrap();
        r.extensions_mut().insert(ReasonPhrase::from_static(b"Fine Anyway"));
        let (head, _) = encode(r, Some(0), KEEP);
        assert!(head.starts_with("HTTP/1.1 299 Fine Anyway\r\n"), "{head}");
    }

    #[test]
    fn decimal_formatting() {
        for n in [0u64, 7, 10, 12345, u64::MAX] {
            let mut b = itoa_buf();
            assert_eq!(format_u64(&mut b, n), n.to_string().as_bytes());
        }
    }
}
