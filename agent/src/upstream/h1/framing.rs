//! Message framing of HTTP/1.1 (RFC 9112 §6): how a response body ends, the body decoders
//! (content-length, chunked, close-delimited), and how a request body is framed and encoded.
//!
//! The response rules are RFC 9112 §6.3 in hyper's order: 1xx, 204 and 304 answers and answers
//! to HEAD have no body; a 2xx to CONNECT and a 101 leave HTTP; Transfer-Encoding wins over
//! Content-Length (refused in HTTP/1.0), and ends the body by chunked coding when its last
//! coding is `chunked`, by the close of the connection otherwise; Content-Length values must all
//! agree and be digits; without either the body ends with the connection.
//!
//! One difference from hyper on purpose: when Transfer-Encoding decides the framing, the
//! response's Content-Length is removed (§6.3 rule 3: an intermediary "MUST first remove the
//! received Content-Length field ... prior to forwarding"), where hyper keeps it.
//!
//! The chunked decoder is a byte-level state machine with hyper's acceptance (hex size, then
//! optional SP/HTAB, extensions to CR, CRLF everywhere, trailers), so that it gives the same
//! answer whatever the reads look like. Memory is bounded: nothing but the trailer section
//! (`max_trailer_bytes`) is held. The chunk-size line is bounded too (`max_chunk_size_line`,
//! 1 KiB by default), where hyper accepts any number of leading zeros or spaces.

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Version};

use super::head::{FieldKind, ResponseHead};
use super::Limits;

/// How a response's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResponseFraming {
    /// A 1xx other than 101: an interim response, the final one follows on the connection.
    Interim,
    /// A 101, or a 2xx to CONNECT: the connection leaves HTTP after the head.
    Upgrade,
    /// No body whatever the fields say: an answer to HEAD, a 204, a 304.
    Empty,
    /// Content-Length bytes.
    Length(u64),
    /// Chunked transfer coding.
    Chunked,
    /// Until the upstream closes the connection.
    CloseDelimited,
}

/// Why a response's framing cannot be decided: the caller answers 502, the connection closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum FramingError {
    #[error("transfer-encoding in an HTTP/1.0 response")]
    TransferEncodingInHttp10,
    #[error("invalid or conflicting content-length")]
    InvalidContentLength,
    #[error("content-length too large")]
    ContentLengthTooLarge,
}

/// Why a response body could not be read to its end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error("connection closed before the end of the body")]
    Incomplete,
    #[error("invalid chunk size")]
    ChunkSize,
    #[error("chunk size overflows")]
    ChunkSizeOverflow,
    #[error("chunk-size line longer than {0} bytes")]
    ChunkSizeLine(usize),
    #[error("newline in a chunk extension")]
    ChunkExtensionNewline,
    #[error("chunk extensions over {0} bytes")]
    ChunkExtensions(u64),
    #[error("missing CRLF in chunked coding")]
    ChunkCrlf,
    #[error("trailer section over {0} bytes")]
    TrailersTooLarge(usize),
    #[error("more than {0} trailer fields")]
    TooManyTrailers(usize),
    #[error("invalid trailer section")]
    Trailers,
}

/// What a body decoder found in the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Decoded {
    /// Body bytes (never empty).
    Data(Bytes),
    /// The end of the body, with the trailer fields of a chunked body that had some.
    End(Option<HeaderMap>),
    /// The buffer is used up; read more.
    NeedMore,
}

/// Decodes one response body from the connection's read buffer.
#[derive(Debug, Clone)]
pub struct BodyDecoder {
    kind: Kind,
}

#[derive(Debug, Clone)]
enum Kind {
    Length(u64),
    Chunked(ChunkedDecoder),
    Close,
    Done,
}

/// The chunked transfer coding (RFC 9112 §7.1), decoded incrementally from any split of input.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: Chunked,
    /// The chunk size being read, then what is left of the chunk's data.
    size: u64,
    /// Bytes of the current chunk-size (digits and whitespace).
    line: usize,
    /// Extension bytes over the whole body, as hyper counts them.
    extensions: u64,
    /// The trailer section as received, once a trailer field began.
    trailers: Option<BytesMut>,
    trailer_lines: usize,
    limits: ChunkLimits,
}

/// The limits a chunked decoder applies, kept small: a response body carries its decoder.
#[derive(Debug, Clone, Copy)]
struct ChunkLimits {
    size_line: u32,
    extensions: u32,
    trailer_bytes: u32,
    trailers: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Chunked {
    Start,
    Size,
    SizeLws,
    Extension,
    SizeLf,
    Data,
    DataCr,
    DataLf,
    EndCr,
    Trailer,
    TrailerLf,
    EndLf,
    End,
}

/// What the request body is known to be, from `http_body::Body` (`is_end_stream`, `size_hint`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    Empty,
    Known(u64),
    Unknown,
}

/// How a request body goes out, and the framing fields to write for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestFraming {
    pub encoder: BodyEncoder,
    pub edits: HeaderEdits,
}

/// Changes to the request's framing fields, applied while the head is written (the caller's
/// `HeaderMap` is not touched).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HeaderEdits {
    pub drop_transfer_encoding: bool,
    pub drop_content_length: bool,
    /// Content-Length to write in place of the first one (the others dropped), or at the end.
    pub set_content_length: Option<u64>,
    pub chunked: Option<ChunkedHeader>,
}

/// How `chunked` gets into the request's Transfer-Encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkedHeader {
    /// `, chunked` after the last Transfer-Encoding field's value.
    Append,
    /// A `transfer-encoding: chunked` field at the end.
    Add,
}

/// Encodes request body bytes for the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEncoder {
    /// This many bytes are still owed.
    Length(u64),
    Chunked,
}

/// What the response framing reads of a head's fields, gathered while the head is parsed (no
/// lookup afterwards).
#[derive(Debug, Clone, Copy, Default)]
pub struct FramingFields {
    /// A `Transfer-Encoding` field is present.
    pub transfer_encoding: bool,
    /// The last coding of the last `Transfer-Encoding` field is `chunked` ([`is_chunked`]).
    pub chunked: bool,
    /// The `Content-Length` fields.
    pub length: Length,
}

impl FramingFields {
    /// Adds one field of the head (of kind `kind`, found by the parse), in order.
    pub fn add(&mut self, kind: FieldKind, value: &[u8]) {
        match kind {
            FieldKind::TransferEncoding => {
                self.transfer_encoding = true;
                self.chunked = last_coding_is_chunked(value);
            }
            FieldKind::ContentLength => self.length.add_bytes(value),
            _ => {}
        }
    }
}

/// Decides how the response to `method` whose head is `head` is framed; removes the head's
/// Content-Length when Transfer-Encoding overrides it.
pub fn response_framing(method: &Method, head: &mut ResponseHead) -> Result<ResponseFraming, FramingError> {
    match head.status.as_u16() {
        101 => return Ok(ResponseFraming::Upgrade),
        100..=199 => return Ok(ResponseFraming::Interim),
        204 | 304 => return Ok(ResponseFraming::Empty),
        _ => {}
    }
    if *method == Method::HEAD {
        return Ok(ResponseFraming::Empty);
    }
    if *method == Method::CONNECT && head.status.is_success() {
        return Ok(ResponseFraming::Upgrade);
    }
    if head.framing.transfer_encoding {
        // RFC 9112 §6.1: framing of an HTTP/1.0 message with Transfer-Encoding is faulty.
        if head.version == Version::HTTP_10 {
            return Err(FramingError::TransferEncodingInHttp10);
        }
        if head.framing.length.is_present() {
            head.fields.drop_content_length();
        }
        return Ok(if head.framing.chunked {
            ResponseFraming::Chunked
        } else {
            ResponseFraming::CloseDelimited
        });
    }
    Ok(match head.framing.length.get()? {
        Some(len) => ResponseFraming::Length(len),
        None => ResponseFraming::CloseDelimited,
    })
}

/// Whether the last coding of the last Transfer-Encoding field is `chunked`.
pub fn is_chunked(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .next_back()
        .is_some_and(|v| last_coding_is_chunked(v.as_bytes()))
}

/// Whether the last coding of one Transfer-Encoding value is `chunked`; a value that is not
/// visible ASCII (obs-text) names none (hyper reads it with `HeaderValue::to_str`).
fn last_coding_is_chunked(value: &[u8]) -> bool {
    value.iter().all(|&b| b == b'\t' || (b' '..0x7f).contains(&b))
        && value
            .rsplit(|&b| b == b',')
            .next()
            .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"))
}

/// The Content-Length of `headers`: `None` without one; an error when a value is not digits
/// (comma-separated lists allowed), when values differ, or past hyper's largest length.
pub fn content_length(headers: &HeaderMap) -> Result<Option<u64>, FramingError> {
    let mut len = Length::default();
    for value in headers.get_all(header::CONTENT_LENGTH) {
        len.add(value);
    }
    len.get()
}

/// [`content_length`] read field by field, for a caller that passes over the fields anyway
/// (no lookup): `add` each `Content-Length` value in order, then `get`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Length {
    len: Option<u64>,
    invalid: bool,
}

impl Length {
    /// Whether a `Content-Length` field was added (valid or not).
    pub fn is_present(&self) -> bool {
        self.len.is_some() || self.invalid
    }

    pub fn add(&mut self, value: &HeaderValue) {
        self.add_bytes(value.as_bytes());
    }

    /// [`add`](Self::add) for a value's bytes.
    pub fn add_bytes(&mut self, value: &[u8]) {
        if !self.invalid && self.fold(value).is_none() {
            self.invalid = true;
        }
    }

    fn fold(&mut self, value: &[u8]) -> Option<()> {
        // The usual field: digits alone, read without the list and whitespace handling.
        if let Some(n) = digits(value) {
            return self.one(n);
        }
        // A list: its parts are digits with optional whitespace around them; anything else
        // (obs-text included, which hyper's `to_str` refuses) is invalid.
        for part in value.split(|&b| b == b',') {
            self.one(digits(part.trim_ascii())?)?;
        }
        Some(())
    }

    fn one(&mut self, n: u64) -> Option<()> {
        if self.len.is_some_and(|l| l != n) {
            return None;
        }
        self.len = Some(n);
        Some(())
    }

    /// The length: `None` without a field; an error when a value was not digits (lists
    /// allowed), when values differed, or past hyper's largest length.
    pub fn get(self) -> Result<Option<u64>, FramingError> {
        match self.len {
            _ if self.invalid => Err(FramingError::InvalidContentLength),
            // hyper keeps the two values above for its own markers.
            Some(n) if n > u64::MAX - 2 => Err(FramingError::ContentLengthTooLarge),
            len => Ok(len),
        }
    }
}

/// A decimal number of ASCII digits only (no sign, no space), without overflow.
pub(crate) fn digits(s: &[u8]) -> Option<u64> {
    if s.is_empty() {
        return None;
    }
    s.iter().try_fold(0u64, |n, &b| {
        b.is_ascii_digit()
            .then(|| n.checked_mul(10)?.checked_add(u64::from(b - b'0')))
            .flatten()
    })
}

// === impl BodyDecoder ===

impl BodyDecoder {
    /// The decoder of a body framed by `framing` (`Interim` and `Upgrade` have no body).
    pub fn new(framing: ResponseFraming, limits: &Limits) -> Self {
        let kind = match framing {
            ResponseFraming::Length(0)
            | ResponseFraming::Empty
            | ResponseFraming::Interim
            | ResponseFraming::Upgrade => Kind::Done,
            ResponseFraming::Length(n) => Kind::Length(n),
            ResponseFraming::Chunked => Kind::Chunked(ChunkedDecoder::new(*limits)),
            ResponseFraming::CloseDelimited => Kind::Close,
        };
        Self { kind }
    }

    /// Takes what it can from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        match &mut self.kind {
            Kind::Done => Ok(Decoded::End(None)),
            Kind::Length(left) => {
                if buf.is_empty() {
                    return Ok(Decoded::NeedMore);
                }
                let n = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                *left = left.saturating_sub(n as u64);
                if *left == 0 {
                    self.kind = Kind::Done;
                }
                Ok(Decoded::Data(buf.split_to(n).freeze()))
            }
            Kind::Close if buf.is_empty() => Ok(Decoded::NeedMore),
            Kind::Close => Ok(Decoded::Data(buf.split().freeze())),
            Kind::Chunked(c) => {
                let decoded = c.decode(buf)?;
                if matches!(decoded, Decoded::End(_)) {
                    self.kind = Kind::Done;
                }
                Ok(decoded)
            }
        }
    }

    /// The connection closed: the end of a close-delimited body, an error for the others.
    pub fn eof(&mut self) -> Result<Decoded, BodyError> {
        match self.kind {
            Kind::Done => Ok(Decoded::End(None)),
            Kind::Close => {
                self.kind = Kind::Done;
                Ok(Decoded::End(None))
            }
            Kind::Length(_) | Kind::Chunked(_) => Err(BodyError::Incomplete),
        }
    }

    /// Whether the whole body was decoded.
    pub fn is_done(&self) -> bool {
        matches!(self.kind, Kind::Done)
    }

    /// Whether the body ends only with the connection.
    pub fn is_close_delimited(&self) -> bool {
        matches!(self.kind, Kind::Close)
    }

    /// Body bytes still to come, when known.
    pub fn remaining(&self) -> Option<u64> {
        match self.kind {
            Kind::Length(n) => Some(n),
            Kind::Done => Some(0),
            Kind::Chunked(_) | Kind::Close => None,
        }
    }
}

// === impl ChunkedDecoder ===

impl ChunkedDecoder {
    pub fn new(limits: Limits) -> Self {
        let small = |n: usize| u32::try_from(n).unwrap_or(u32::MAX);
        Self {
            state: Chunked::Start,
            size: 0,
            line: 0,
            extensions: 0,
            trailers: None,
            trailer_lines: 0,
            limits: ChunkLimits {
                size_line: small(limits.max_chunk_size_line),
                extensions: u32::try_from(limits.max_chunk_extensions).unwrap_or(u32::MAX),
                trailer_bytes: small(limits.max_trailer_bytes),
                trailers: small(limits.max_trailers),
            },
        }
    }

    /// Takes what it can from the front of `buf`: chunk data as it comes, or the end (with the
    /// trailers) once the last CRLF is in. `NeedMore` when `buf` was used up before either.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, BodyError> {
        loop {
            match self.state {
                Chunked::End => return Ok(Decoded::End(None)),
                Chunked::Data => {
                    if buf.is_empty() {
                        return Ok(Decoded::NeedMore);
                    }
                    let n = usize::try_from(self.size).unwrap_or(usize::MAX).min(buf.len());
                    self.size = self.size.saturating_sub(n as u64);
                    if self.size == 0 {
                        self.state = Chunked::DataCr;
                    }
                    return Ok(Decoded::Data(buf.split_to(n).freeze()));
                }
                _ => {}
            }
            // Framing bytes, one at a time, up to the next data or the end.
            let mut used = 0;
            for &b in buf.iter() {
                used += 1;
                self.step(b)?;
                if matches!(self.state, Chunked::Data | Chunked::End) {
                    break;
                }
            }
            buf.advance(used);
            match self.state {
                Chunked::End => return Ok(Decoded::End(self.take_trailers()?)),
                Chunked::Data => continue,
                _ => return Ok(Decoded::NeedMore),
            }
        }
    }

    /// Whether the last chunk and the trailer section were read.
    pub fn is_done(&self) -> bool {
        self.state == Chunked::End
    }

    fn step(&mut self, b: u8) -> Result<(), BodyError> {
        use Chunked::*;
        self.state = match (self.state, b) {
            (Start, _) => {
                self.size = 0;
                self.line = 0;
                self.size_digit(b).ok_or(BodyError::ChunkSize)??;
                Size
            }
            (Size, b' ' | b'\t') => self.lws()?,
            (Size, b';') | (SizeLws, b';') => Extension,
            (Size, b'\r') | (SizeLws, b'\r') | (Extension, b'\r') => SizeLf,
            (Size, _) => {
                self.size_digit(b).ok_or(BodyError::ChunkSize)??;
                Size
            }
            (SizeLws, b' ' | b'\t') => self.lws()?,
            (SizeLws, _) => return Err(BodyError::ChunkSize),
            (Extension, b'\n') => return Err(BodyError::ChunkExtensionNewline),
            (Extension, _) => {
                self.extensions = self.extensions.saturating_add(1);
                if self.extensions >= u64::from(self.limits.extensions) {
                    return Err(BodyError::ChunkExtensions(self.limits.extensions.into()));
                }
                Extension
            }
            (SizeLf, b'\n') if self.size == 0 => EndCr,
            (SizeLf, b'\n') => Data,
            (DataCr, b'\r') => DataLf,
            (DataLf, b'\n') => Start,
            (EndCr, b'\r') => {
                self.push_trailer(b)?;
                EndLf
            }
            (EndCr, _) => {
                match &mut self.trailers {
                    Some(_) => self.push_trailer(b)?,
                    // As hyper: the first byte starts the section unchecked (limits are > 1).
                    None => self.trailers = Some(BytesMut::from(&[b][..])),
                }
                Trailer
            }
            (Trailer, _) => {
                self.push_trailer(b)?;
                if b == b'\r' {
                    TrailerLf
                } else {
                    Trailer
                }
            }
            (TrailerLf, b'\n') => {
                if self.trailer_lines >= self.limits.trailers as usize {
                    return Err(BodyError::TooManyTrailers(self.limits.trailers as usize));
                }
                self.trailer_lines += 1;
                self.push_trailer(b)?;
                EndCr
            }
            (EndLf, b'\n') => {
                self.push_trailer(b)?;
                End
            }
            (SizeLf | DataCr | DataLf | TrailerLf | EndLf, _) => return Err(BodyError::ChunkCrlf),
            (Data | End, _) => self.state,
        };
        Ok(())
    }

    /// Adds a hex digit to the size; `None` for a byte that is not one.
    fn size_digit(&mut self, b: u8) -> Option<Result<(), BodyError>> {
        let d = char::from(b).to_digit(16)?;
        Some(self.count_line().and_then(|()| {
            self.size = self
                .size
                .checked_mul(16)
                .and_then(|s| s.checked_add(u64::from(d)))
                .ok_or(BodyError::ChunkSizeOverflow)?;
            Ok(())
        }))
    }

    fn lws(&mut self) -> Result<Chunked, BodyError> {
        self.count_line()?;
        Ok(Chunked::SizeLws)
    }

    fn count_line(&mut self) -> Result<(), BodyError> {
        self.line = self.line.saturating_add(1);
        if self.line > self.limits.size_line as usize {
            return Err(BodyError::ChunkSizeLine(self.limits.size_line as usize));
        }
        Ok(())
    }

    /// Keeps a byte of the trailer section (when one began), within the size limit.
    fn push_trailer(&mut self, b: u8) -> Result<(), BodyError> {
        if let Some(t) = &mut self.trailers {
            t.extend_from_slice(&[b]);
            if t.len() >= self.limits.trailer_bytes as usize {
                return Err(BodyError::TrailersTooLarge(self.limits.trailer_bytes as usize));
            }
        }
        Ok(())
    }

    /// The trailer fields, parsed as hyper does (httparse, then `http`'s checks).
    fn take_trailers(&mut self) -> Result<Option<HeaderMap>, BodyError> {
        let Some(section) = self.trailers.take() else {
            return Ok(None);
        };
        let mut slots = [httparse::EMPTY_HEADER; super::head::MAX_HEADERS];
        let count = self.trailer_lines.min(slots.len());
        let slots = slots.get_mut(..count).unwrap_or_default();
        let fields = match httparse::parse_headers(&section, slots) {
            Ok(httparse::Status::Complete((_, fields))) => fields,
            _ => return Err(BodyError::Trailers),
        };
        let mut map = HeaderMap::with_capacity(fields.len());
        for f in fields.iter() {
            let name = HeaderName::from_bytes(f.name.as_bytes()).map_err(|_| BodyError::Trailers)?;
            let value = HeaderValue::from_bytes(f.value).map_err(|_| BodyError::Trailers)?;
            map.append(name, value);
        }
        Ok(Some(map))
    }
}

/// How a request goes out (hyper's client rules, `Client::set_length`): a body known to be
/// empty sends nothing and no Transfer-Encoding; a valid Content-Length the caller set is
/// respected; HTTP/1.1 uses chunked coding when Transfer-Encoding is set (adding `chunked` as the
/// last coding) or the length is unknown (except for GET, HEAD and CONNECT, which then send no
/// body); a known length becomes the Content-Length. HTTP/1.0 never chunks.
pub fn request_framing(method: &Method, version: Version, headers: &HeaderMap, body: BodyKind) -> RequestFraming {
    let mut edits = HeaderEdits::default();
    if body == BodyKind::Empty {
        // The common case (GET, HEAD): no field lookup.
        edits.drop_transfer_encoding = true;
        return RequestFraming {
            encoder: BodyEncoder::Length(0),
            edits,
        };
    }
    let valid_length = content_length(headers).ok().flatten();
    let has_length = headers.contains_key(header::CONTENT_LENGTH);
    let encoder = match body {
        _ if version != Version::HTTP_11 => {
            edits.drop_transfer_encoding = true;
            match (valid_length, body) {
                (Some(n), _) => BodyEncoder::Length(n),
                (None, BodyKind::Known(n)) => {
                    edits.set_content_length = Some(n);
                    BodyEncoder::Length(n)
                }
                _ => BodyEncoder::Length(0),
            }
        }
        _ if headers.contains_key(header::TRANSFER_ENCODING) => {
            edits.drop_content_length = has_length;
            if !is_chunked(headers) {
                edits.chunked = Some(ChunkedHeader::Append);
            }
            BodyEncoder::Chunked
        }
        _ => match (valid_length, body) {
            (Some(n), _) => BodyEncoder::Length(n),
            (None, BodyKind::Unknown) if matches!(*method, Method::GET | Method::HEAD | Method::CONNECT) => {
                BodyEncoder::Length(0)
            }
            (None, BodyKind::Unknown) => {
                edits.chunked = Some(ChunkedHeader::Add);
                edits.drop_content_length = has_length;
                BodyEncoder::Chunked
            }
            (None, BodyKind::Known(n)) => {
                edits.set_content_length = Some(n);
                BodyEncoder::Length(n)
            }
            (None, BodyKind::Empty) => BodyEncoder::Length(0),
        },
    };
    RequestFraming { encoder, edits }
}

// === impl BodyEncoder ===

impl BodyEncoder {
    /// Appends `data` encoded. A length encoder takes no more than it is still owed (the rest is
    /// dropped, as hyper does).
    pub fn encode(&mut self, mut data: impl Buf, dst: &mut Vec<u8>) {
        let len = data.remaining();
        if len == 0 {
            // An empty chunk would end a chunked body.
            return;
        }
        match self {
            Self::Length(left) => {
                let mut take = usize::try_from(*left).unwrap_or(usize::MAX).min(len);
                *left = left.saturating_sub(take as u64);
                while take > 0 && data.has_remaining() {
                    let chunk = data.chunk();
                    let n = chunk.len().min(take);
                    if n == 0 {
                        break;
                    }
                    dst.extend_from_slice(chunk.get(..n).unwrap_or_default());
                    data.advance(n);
                    take -= n;
                }
            }
            Self::Chunked => {
                push_hex(dst, len as u64);
                dst.extend_from_slice(b"\r\n");
                while data.has_remaining() {
                    let chunk = data.chunk();
                    let n = chunk.len();
                    if n == 0 {
                        break;
                    }
                    dst.extend_from_slice(chunk);
                    data.advance(n);
                }
                dst.extend_from_slice(b"\r\n");
            }
        }
    }

    /// Whether no more body can go out (a length encoder that got all it was owed).
    pub fn is_full(&self) -> bool {
        matches!(self, Self::Length(0))
    }

    /// Appends the end of the body. A length encoder still owed bytes fails with how many.
    pub fn finish(&mut self, dst: &mut Vec<u8>) -> Result<(), u64> {
        match *self {
            Self::Length(0) => Ok(()),
            Self::Length(left) => Err(left),
            Self::Chunked => {
                // Request trailers are not sent: hyper sends only those the request's Trailer
                // field names, and the proxy removes Trailer as hop-by-hop.
                dst.extend_from_slice(b"0\r\n\r\n");
                *self = Self::Length(0);
                Ok(())
            }
        }
    }
}

/// Appends `n` in upper-case hexadecimal (as hyper writes chunk sizes).
fn push_hex(dst: &mut Vec<u8>, n: u64) {
    const HEX: &[u8; 16] = b"0123456789ABCDEF";
    let mut started = false;
    for shift in (0..16).rev() {
        let d = ((n >> (shift * 4)) & 0xf) as usize;
        if d != 0 || started || shift == 0 {
            started = true;
            dst.push(HEX.get(d).copied().unwrap_or(b'0'));
        }
    }
}

#[cfg(test)]
mod tests;
