//! Response heads parsed on httparse with hyper's client strictness, and request heads encoded
//! into a reused buffer without the formatter.
//!
//! Parsing follows hyper 1.x's client (`proto/h1/role.rs`) so that what reaches the caller is
//! what hyper would have let through: httparse's default configuration (no obs-fold, no space
//! before a colon, no HTTP/0.9), at most [`MAX_HEADERS`] fields and `max_head_bytes` in all, a
//! status code of 100-999, header names valid for `http`, values valid for `HeaderValue`. The
//! fields stay as they came ([`RawFields`]: the head's own bytes, names in their case), written to
//! an HTTP/1.1 client from there; a `HeaderMap` is built only for a caller that asks for one.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderValue};
use http::{Method, Response, StatusCode, Uri, Version};
use hyper::ext::ReasonPhrase;

use super::framing::{ChunkedHeader, FramingFields, HeaderEdits};
use super::Limits;

/// The most header fields a response head may carry (hyper's default).
pub const MAX_HEADERS: usize = 100;

/// A parsed response head.
#[derive(Debug)]
pub struct ResponseHead {
    pub version: Version,
    pub status: StatusCode,
    /// The reason phrase when it is not the status's canonical one (hyper keeps it the same
    /// way, and its server repeats it downstream).
    pub reason: Option<ReasonPhrase>,
    /// The fields as they came.
    pub fields: RawFields,
    /// Whether the upstream lets the connection carry another request after this response:
    /// HTTP/1.1 unless a `Connection` field says `close`, HTTP/1.0 only with `keep-alive`.
    pub keep_alive: bool,
    /// The fields the framing decision reads, seen while parsing.
    pub framing: FramingFields,
}

/// Why a response head was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum HeadError {
    /// Not HTTP/1.x syntax (status line, field syntax, obs-fold, a space before a colon...).
    #[error("malformed response head: {0}")]
    Syntax(httparse::Error),
    #[error("response head larger than {0} bytes")]
    TooLarge(usize),
    #[error("more than {0} response header fields")]
    TooManyHeaders(usize),
    #[error("status code outside 100-999")]
    Status,
    #[error("invalid response header field")]
    Field,
}

/// Parses the response heads arriving on one connection. Keeps how far the buffer was looked at,
/// so that a head arriving in many reads is parsed once it is complete (hyper's fast end check),
/// not once per read.
#[derive(Debug, Clone)]
pub struct HeadParser {
    limits: Limits,
    /// Length of the buffer at the last incomplete parse.
    partial: Option<usize>,
    /// Where the fields of the head being parsed are: goes with the parsed head
    /// ([`RawFields`]), replaced by an emptied list kept per thread (no allocation per response
    /// once the thread's lists have grown to the usual count).
    fields: Vec<Field>,
}

/// A response head's fields as they came: the head's own bytes and where each field's name and
/// value are in them (as httparse found them: the value without the whitespace around it). The
/// parse checked them as hyper does (httparse accepts exactly the names `HeaderName` and the
/// values `HeaderValue` accept: `tests::httparse_accepts_what_http_accepts`), so an HTTP/1.1
/// client can be sent them as they are, names in their case, without a `HeaderMap` built and
/// encoded again. The list of places is kept per thread when dropped ([`KEEP_LISTS`]).
#[derive(Debug, Default)]
pub struct RawFields {
    head: Bytes,
    fields: Vec<Field>,
    /// The `Content-Length` fields are left out (a Transfer-Encoding overrides them).
    drop_length: bool,
}

/// Emptied lists of field places kept per thread, so that a response head allocates none.
const KEEP_LISTS: usize = 64;
/// A list with room for more fields than this is freed, not kept.
const KEEP_LIST_ROOM: usize = 128;

thread_local! {
    static LISTS: std::cell::RefCell<Vec<Vec<Field>>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// An empty list of field places: one of this thread's, else a new one.
fn take_list() -> Vec<Field> {
    // (`try_with`: a thread's locals may be gone while it exits.)
    LISTS
        .try_with(|l| l.try_borrow_mut().ok().and_then(|mut l| l.pop()))
        .ok()
        .flatten()
        .unwrap_or_default()
}

/// Whether `name` (token characters) is `lower` (lower-case letters and `-`) in any case, without
/// a branch per byte: a token character ORed with 0x20 is a lower-case letter only if it is that
/// letter in either case, and `-` only if it is `-` (0x0d, the other byte that gives `-`, is no
/// token character).
fn is_name(name: &[u8], lower: &[u8]) -> bool {
    name.len() == lower.len() && name.iter().zip(lower).fold(0, |diff, (a, b)| diff | ((a | 0x20) ^ b)) == 0
}

// === impl ResponseHead ===

impl ResponseHead {
    /// The head as an `http::Response` around `body` (the reason phrase as hyper's extension),
    /// with an empty header map: the fields are returned beside it.
    pub fn into_response<B>(self, body: B) -> (Response<B>, RawFields) {
        let mut resp = Response::new(body);
        *resp.status_mut() = self.status;
        *resp.version_mut() = self.version;
        if let Some(reason) = self.reason {
            resp.extensions_mut().insert(reason);
        }
        (resp, self.fields)
    }

    /// The fields in a map, as hyper's client would have given them.
    pub fn headers(&self) -> HeaderMap {
        let mut map = HeaderMap::with_capacity(self.fields.len());
        self.fields.append_to(&mut map, |_, _| true);
        map
    }
}

// === impl RawFields ===

impl RawFields {
    /// How many fields (the Content-Length fields counted even when left out).
    pub fn len(&self) -> usize {
        self.fields.len()
    }

    pub fn is_empty(&self) -> bool {
        self.fields.is_empty()
    }

    /// The fields, in order: name as it came, value without the OWS around it, kind.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &[u8], FieldKind)> {
        self.kept().map(|f| (self.bytes(f.name), self.bytes(f.value), f.kind))
    }

    /// The fields not left out (see [`drop_content_length`](Self::drop_content_length)).
    fn kept(&self) -> impl Iterator<Item = &Field> {
        let drop_length = self.drop_length;
        self.fields
            .iter()
            .filter(move |f| !(drop_length && f.kind == FieldKind::ContentLength))
    }

    /// The head's bytes at `place` (httparse's, checked by the parse; empty if one were not).
    fn bytes(&self, (start, end): (usize, usize)) -> &[u8] {
        self.head.get(start..end).unwrap_or_default()
    }

    /// Leaves the `Content-Length` fields out from now on.
    pub fn drop_content_length(&mut self) {
        self.drop_length = true;
    }

    /// Appends the fields `keep` accepts (by name as it came, and kind) to `map`.
    pub fn append_to(&self, map: &mut HeaderMap, keep: impl Fn(&[u8], FieldKind) -> bool) {
        for (name, value, kind) in self.iter() {
            if !keep(name, kind) {
                continue;
            }
            // Checked by the parse (see the type's doc), so neither fails; a field that did
            // would be left out rather than panic.
            let Ok(name) = crate::upstream::names::name(name) else {
                continue;
            };
            if let Ok(value) = HeaderValue::from_maybe_shared(self.head.slice_ref(value)) {
                map.append(name, value);
            }
        }
    }

    /// Appends the fields `keep` accepts (by name as it came, and kind) to `dst` as
    /// `name: value` lines: the lines that came that way are copied as they are, neighbours
    /// together, the others written from their name and value (CRLF, one space).
    pub fn write_to(&self, dst: &mut Vec<u8>, mut keep: impl FnMut(&[u8], FieldKind) -> bool) {
        // The lines of the head copied next, in one piece.
        let mut run: Option<(usize, usize)> = None;
        let flush = |dst: &mut Vec<u8>, run: &mut Option<(usize, usize)>| {
            if let Some((a, b)) = run.take() {
                dst.extend_from_slice(self.head.get(a..b).unwrap_or_default());
            }
        };
        for f in self.kept() {
            let name = self.bytes(f.name);
            if !keep(name, f.kind) {
                continue;
            }
            if f.canonical {
                // `value.1 + 2` is the line's end (after its CRLF), inside the head.
                let end = f.value.1.saturating_add(2);
                match &mut run {
                    Some((_, b)) if *b == f.name.0 => *b = end,
                    _ => {
                        flush(dst, &mut run);
                        run = Some((f.name.0, end));
                    }
                }
                continue;
            }
            flush(dst, &mut run);
            dst.extend_from_slice(name);
            dst.extend_from_slice(b": ");
            dst.extend_from_slice(self.bytes(f.value));
            dst.extend_from_slice(b"\r\n");
        }
        flush(dst, &mut run);
    }
}

impl Drop for RawFields {
    fn drop(&mut self) {
        let mut list = std::mem::take(&mut self.fields);
        if list.capacity() == 0 || list.capacity() > KEEP_LIST_ROOM {
            return;
        }
        list.clear();
        // A drop while the thread exits, its locals gone, frees the list.
        let _ = LISTS.try_with(|l| {
            if let Ok(mut l) = l.try_borrow_mut() {
                if l.len() < KEEP_LISTS {
                    l.push(list);
                }
            }
        });
    }
}

// === impl HeadParser ===

impl HeadParser {
    pub fn new(limits: Limits) -> Self {
        Self {
            limits,
            partial: None,
            fields: Vec::new(),
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Forgets an incomplete head (a new exchange starts).
    pub fn reset(&mut self) {
        self.partial = None;
    }

    /// Parses the head at the front of `buf`. Complete: the head is removed from `buf` (what
    /// follows stays). Incomplete: `Ok(None)` and `buf` untouched; more bytes are needed, unless
    /// `buf` already holds `max_head_bytes`, which is `TooLarge`.
    pub fn parse(&mut self, buf: &mut BytesMut) -> Result<Option<ResponseHead>, HeadError> {
        if buf.is_empty() {
            return Ok(None);
        }
        if let Some(prev) = self.partial {
            if !has_end_after(buf, prev) {
                return self.incomplete(buf.len());
            }
        }
        match parse_head(buf, &self.limits, &mut self.fields)? {
            Some(head) => {
                self.partial = None;
                Ok(Some(head))
            }
            None => self.incomplete(buf.len()),
        }
    }

    fn incomplete(&mut self, len: usize) -> Result<Option<ResponseHead>, HeadError> {
        if len >= self.limits.max_head_bytes {
            return Err(HeadError::TooLarge(self.limits.max_head_bytes));
        }
        self.partial = Some(len);
        Ok(None)
    }
}

/// Whether bytes from `prev` on (with the 3 before, where an end may have begun) hold the end of
/// a head: `\n\n` or `\n\r\n`. A head never completes without one, so parsing can wait for it.
pub(crate) fn has_end_after(buf: &[u8], prev: usize) -> bool {
    let tail = buf.get(prev.saturating_sub(3)..).unwrap_or_default();
    tail.windows(2)
        .enumerate()
        .any(|(i, w)| w == b"\n\n" || (w == b"\n\r" && tail.get(i + 2) == Some(&b'\n')))
}

/// Where one field's name and value are in the head's bytes, and what the field is.
#[derive(Debug, Clone, Copy)]
struct Field {
    name: (usize, usize),
    value: (usize, usize),
    kind: FieldKind,
    /// The field's line is `name: value\r\n` exactly (one space, CRLF, a value): it can be
    /// copied as it is, with the lines of its neighbours.
    canonical: bool,
}

/// What a field is to the message's framing and to a proxy, by its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    ContentLength,
    TransferEncoding,
    Connection,
    Date,
    /// Another field that describes the connection, not the message (RFC 9110 §7.6.1):
    /// `Keep-Alive`, `Proxy-Connection`, `TE`, `Trailer`, `Upgrade`. (`Connection` and
    /// `Transfer-Encoding` are too.)
    HopByHop,
    Other,
}

impl FieldKind {
    /// The kind of the field named `name`: as it came (any case), token characters only (what
    /// httparse accepts in a name).
    pub fn of(name: &[u8]) -> Self {
        let is = |n: &[u8]| is_name(name, n);
        match name.len() {
            2 if is(b"te") => Self::HopByHop,
            4 if is(b"date") => Self::Date,
            7 if is(b"trailer") || is(b"upgrade") => Self::HopByHop,
            10 if is(b"connection") => Self::Connection,
            10 if is(b"keep-alive") => Self::HopByHop,
            14 if is(b"content-length") => Self::ContentLength,
            16 if is(b"proxy-connection") => Self::HopByHop,
            17 if is(b"transfer-encoding") => Self::TransferEncoding,
            _ => Self::Other,
        }
    }

    /// Whether a field of this kind describes the connection, not the message.
    pub fn is_hop_by_hop(self) -> bool {
        matches!(self, Self::Connection | Self::TransferEncoding | Self::HopByHop)
    }
}

/// One head at the front of `buf`: removed from it and returned when complete.
fn parse_head(buf: &mut BytesMut, limits: &Limits, fields: &mut Vec<Field>) -> Result<Option<ResponseHead>, HeadError> {
    let max_headers = limits.max_headers.min(MAX_HEADERS);
    fields.clear();
    let (len, code, reason, version) = {
        // httparse fills what it parses; nothing to initialise (3 KiB of zeroes per head).
        let mut headers = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let slots = headers.get_mut(..max_headers).unwrap_or_default();
        let mut res = httparse::Response::new(&mut []);
        let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(&mut res, buf, slots) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooManyHeaders(max_headers)),
            Err(e) => return Err(HeadError::Syntax(e)),
        };
        if len > limits.max_head_bytes {
            return Err(HeadError::TooLarge(limits.max_head_bytes));
        }
        let base = buf.as_ptr() as usize;
        // Offsets of slices httparse took from `buf`: each lies inside it.
        let offset = |s: &[u8]| (s.as_ptr() as usize).saturating_sub(base);
        for h in res.headers.iter() {
            // hyper refuses names of 64 KiB or more as too large (so does `HeaderName`).
            if h.name.len() >= 1 << 16 {
                return Err(HeadError::TooLarge(limits.max_head_bytes));
            }
            let (n, v) = (offset(h.name.as_bytes()), offset(h.value));
            let (name, value) = (
                (n, n.saturating_add(h.name.len())),
                (v, v.saturating_add(h.value.len())),
            );
            let canonical = !h.value.is_empty()
                && v == name.1.saturating_add(2)
                && buf.get(name.1..v) == Some(b": ")
                && buf.get(value.1..value.1.saturating_add(2)) == Some(b"\r\n");
            fields.push(Field {
                name,
                value,
                kind: FieldKind::of(h.name.as_bytes()),
                canonical,
            });
        }
        // A reason phrase httparse found invalid or absent is empty, and not in `buf`.
        let reason = res.reason.unwrap_or_default();
        let reason = (!reason.is_empty()).then(|| {
            let r = offset(reason.as_bytes());
            (r, r.saturating_add(reason.len()))
        });
        let version = if res.version == Some(1) {
            Version::HTTP_11
        } else {
            Version::HTTP_10
        };
        (len, res.code.unwrap_or(0), reason, version)
    };
    let status = StatusCode::from_u16(code).map_err(|_| HeadError::Status)?;
    let head = buf.split_to(len).freeze();

    let reason = match reason {
        // hyper keeps an empty phrase too: it differs from every canonical one.
        None => Some(ReasonPhrase::from_static(b"")),
        Some((a, b)) => match head.get(a..b) {
            Some(text) if status.canonical_reason().map(str::as_bytes) == Some(text) => None,
            Some(_) => ReasonPhrase::try_from(head.slice(a..b)).ok(),
            None => return Err(HeadError::Field),
        },
    };

    let mut framing = FramingFields::default();
    let mut keep_alive = version == Version::HTTP_11;
    let mut saw_close = false;
    for f in fields.iter() {
        // Every place is checked here, once: `RawFields` reads them unchecked after.
        let (Some(_), Some(value)) = (head.get(f.name.0..f.name.1), head.get(f.value.0..f.value.1)) else {
            return Err(HeadError::Field);
        };
        // httparse checked the bytes of both as `HeaderName` and `HeaderValue` would; only the
        // framing fields are looked at here.
        match f.kind {
            FieldKind::Connection => {
                // Once any `Connection` field says close, a later keep-alive does not undo it.
                if saw_close || has_token_bytes(value, "close") {
                    saw_close = true;
                    keep_alive = false;
                } else if !keep_alive {
                    keep_alive = has_token_bytes(value, "keep-alive");
                }
            }
            kind => framing.add(kind, value),
        }
    }
    // The places go with the head; the parser keeps an empty list for the next one.
    let fields = std::mem::replace(fields, take_list());
    Ok(Some(ResponseHead {
        version,
        status,
        reason,
        fields: RawFields {
            head,
            fields,
            drop_length: false,
        },
        keep_alive,
        framing,
    }))
}

/// Whether a comma-separated field value lists `token` (case-insensitively).
pub(crate) fn has_token(value: &HeaderValue, token: &str) -> bool {
    has_token_bytes(value.as_bytes(), token)
}

/// [`has_token`] on a value's bytes.
pub(crate) fn has_token_bytes(value: &[u8], token: &str) -> bool {
    // Bytes, not `str`: a token with obs-text matches no ASCII token either way.
    value
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Appends the request head to `dst`: the request line (the target as `Uri`'s `Display` writes
/// it), the fields in `headers` order with `edits` applied (the framing fields), the blank line.
/// Byte copies only: no formatter, no allocation beyond `dst`'s growth. Returns whether a
/// `Connection` field asks to close the connection after this exchange.
pub fn encode_request(
    dst: &mut Vec<u8>,
    method: &Method,
    uri: &Uri,
    version: Version,
    headers: &HeaderMap,
    edits: &HeaderEdits,
) -> bool {
    dst.reserve(64 + headers.len() * 32);
    dst.extend_from_slice(method.as_str().as_bytes());
    dst.push(b' ');
    if let Some(scheme) = uri.scheme_str() {
        dst.extend_from_slice(scheme.as_bytes());
        dst.extend_from_slice(b"://");
    }
    if let Some(authority) = uri.authority() {
        dst.extend_from_slice(authority.as_str().as_bytes());
    }
    dst.extend_from_slice(uri.path().as_bytes());
    if let Some(query) = uri.query() {
        dst.push(b'?');
        dst.extend_from_slice(query.as_bytes());
    }
    // hyper writes HTTP/2 requests as HTTP/1.1 (and panics on the others).
    dst.extend_from_slice(if version == Version::HTTP_10 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });

    let append_chunked = edits.chunked == Some(ChunkedHeader::Append);
    let te_count = if append_chunked {
        headers.get_all(header::TRANSFER_ENCODING).iter().count()
    } else {
        0
    };
    let mut te_seen = 0;
    let mut length_written = false;
    let mut close = false;
    for (name, value) in headers {
        if *name == header::CONNECTION {
            close |= has_token(value, "close");
        } else if *name == header::TRANSFER_ENCODING {
            if edits.drop_transfer_encoding {
                continue;
            }
            te_seen += 1;
            if append_chunked && te_seen == te_count {
                field(dst, name.as_str().as_bytes(), value.as_bytes());
                dst.truncate(dst.len().saturating_sub(2));
                dst.extend_from_slice(b", chunked\r\n");
                continue;
            }
        } else if *name == header::CONTENT_LENGTH {
            if edits.drop_content_length {
                continue;
            }
            if let Some(len) = edits.set_content_length {
                // The first field takes the length, the others go (`HeaderMap::insert`).
                if !length_written {
                    length_written = true;
                    content_length(dst, len);
                }
                continue;
            }
        }
        field(dst, name.as_str().as_bytes(), value.as_bytes());
    }
    if let (Some(len), false) = (edits.set_content_length, length_written) {
        content_length(dst, len);
    }
    if edits.chunked == Some(ChunkedHeader::Add) {
        dst.extend_from_slice(b"transfer-encoding: chunked\r\n");
    }
    dst.extend_from_slice(b"\r\n");
    close
}

fn field(dst: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    dst.extend_from_slice(name);
    dst.extend_from_slice(b": ");
    dst.extend_from_slice(value);
    dst.extend_from_slice(b"\r\n");
}

fn content_length(dst: &mut Vec<u8>, len: u64) {
    dst.extend_from_slice(b"content-length: ");
    push_decimal(dst, len);
    dst.extend_from_slice(b"\r\n");
}

/// Appends `n` in decimal.
pub(super) fn push_decimal(dst: &mut Vec<u8>, mut n: u64) {
    // 20 places hold u64::MAX.
    let mut digits = [0u8; 20];
    let mut start = digits.len();
    for slot in digits.iter_mut().rev() {
        // `n % 10` is one digit.
        *slot = b'0' + (n % 10) as u8;
        n /= 10;
        start -= 1;
        if n == 0 {
            break;
        }
    }
    dst.extend_from_slice(digits.get(start..).unwrap_or_default());
}

#[cfg(test)]
mod tests;
