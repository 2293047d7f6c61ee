//! A minimal raw HTTP/2 client for the abuse tests: frames written and read by hand, so a test
//! can do what no well-behaved client does (a zero window, thousands of HEADERS each followed by
//! RST_STREAM, CONTINUATION frames without end).
//!
//! HPACK on the way out is literal-without-indexing with plain (non-Huffman) strings, so no
//! state is shared with the server's decoder. On the way in, [`status`] reads only `:status`
//! (static-table entries and literal values whose digits are Huffman-coded, as h2 sends them).

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// The client connection preface (RFC 9113 §3.4).
pub const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Frame types (RFC 9113 §6).
pub mod kind {
    pub const DATA: u8 = 0x0;
    pub const HEADERS: u8 = 0x1;
    pub const RST_STREAM: u8 = 0x3;
    pub const SETTINGS: u8 = 0x4;
    pub const PING: u8 = 0x6;
    pub const GOAWAY: u8 = 0x7;
    pub const WINDOW_UPDATE: u8 = 0x8;
    pub const CONTINUATION: u8 = 0x9;
}

/// Frame flags.
pub mod flag {
    pub const END_STREAM: u8 = 0x1;
    /// SETTINGS and PING.
    pub const ACK: u8 = 0x1;
    pub const END_HEADERS: u8 = 0x4;
}

/// SETTINGS identifiers.
pub mod setting {
    pub const MAX_CONCURRENT_STREAMS: u16 = 0x3;
    pub const INITIAL_WINDOW_SIZE: u16 = 0x4;
}

/// Error codes of RST_STREAM and GOAWAY.
pub mod error {
    pub const NO_ERROR: u32 = 0x0;
    pub const PROTOCOL_ERROR: u32 = 0x1;
    pub const REFUSED_STREAM: u32 = 0x7;
    pub const CANCEL: u32 = 0x8;
    pub const COMPRESSION_ERROR: u32 = 0x9;
    pub const ENHANCE_YOUR_CALM: u32 = 0xb;
}

/// One frame as read from the wire.
#[derive(Debug, Clone)]
pub struct Frame {
    pub kind: u8,
    pub flags: u8,
    pub stream: u32,
    pub payload: Vec<u8>,
}

/// What [`Conn::recv`] saw.
#[derive(Debug)]
pub enum Event {
    Frame(Frame),
    /// The peer closed the connection (EOF or reset).
    Closed(String),
    /// Nothing complete arrived in time.
    Timeout,
}

/// A client connection: a `TcpStream` and the bytes read but not yet framed.
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
}

// === frames ===

/// The 9-byte header and the payload of one frame.
pub fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = u32::try_from(payload.len()).expect("frame payload under 16 MiB");
    assert!(len < 1 << 24, "frame payload under 16 MiB");
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

/// A SETTINGS frame with `settings` (id, value).
pub fn settings(settings: &[(u16, u32)]) -> Vec<u8> {
    let payload: Vec<u8> = settings
        .iter()
        .flat_map(|(id, value)| id.to_be_bytes().into_iter().chain(value.to_be_bytes()))
        .collect();
    frame(kind::SETTINGS, 0, 0, &payload)
}

/// A HEADERS frame carrying `block` (see [`header_block`]).
pub fn headers(stream: u32, block: &[u8], end_stream: bool, end_headers: bool) -> Vec<u8> {
    let mut flags = 0;
    if end_stream {
        flags |= flag::END_STREAM;
    }
    if end_headers {
        flags |= flag::END_HEADERS;
    }
    frame(kind::HEADERS, flags, stream, block)
}

/// A CONTINUATION frame carrying more of a header block.
pub fn continuation(stream: u32, block: &[u8], end_headers: bool) -> Vec<u8> {
    let flags = if end_headers { flag::END_HEADERS } else { 0 };
    frame(kind::CONTINUATION, flags, stream, block)
}

/// RST_STREAM with `code`.
pub fn rst_stream(stream: u32, code: u32) -> Vec<u8> {
    frame(kind::RST_STREAM, 0, stream, &code.to_be_bytes())
}

/// WINDOW_UPDATE of `increment` on `stream` (0: the connection).
pub fn window_update(stream: u32, increment: u32) -> Vec<u8> {
    frame(kind::WINDOW_UPDATE, 0, stream, &increment.to_be_bytes())
}

/// A GET request's header block for `path` (`:authority` = `authority`) plus `extra` fields.
pub fn get_block(authority: &str, path: &str, extra: &[(&str, &str)]) -> Vec<u8> {
    let mut fields = vec![
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", authority),
        (":path", path),
    ];
    fields.extend_from_slice(extra);
    header_block(&fields)
}

// === HPACK ===

/// An HPACK block of `fields`, each a literal without indexing, new name, no Huffman.
pub fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (name, value) in fields {
        literal(name.as_bytes(), value.as_bytes(), &mut out);
    }
    out
}

/// One literal field without indexing (RFC 7541 §6.2.2): `0000 0000`, name, value.
pub fn literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0x00);
    string(name, out);
    string(value, out);
}

fn string(s: &[u8], out: &mut Vec<u8>) {
    integer(s.len(), 7, 0x00, out);
    out.extend_from_slice(s);
}

/// An HPACK integer with an `prefix_bits` prefix; `first` holds the bits above the prefix.
fn integer(mut n: usize, prefix_bits: u32, first: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if n < max {
        // n < 2^prefix_bits <= 128: fits the prefix.
        out.push(first | n as u8);
        return;
    }
    out.push(first | max as u8);
    n -= max;
    while n >= 128 {
        out.push((n % 128) as u8 | 0x80);
        n /= 128;
    }
    out.push(n as u8);
}

/// The `:status` of a response header block when it is the block's first field (as servers
/// send it) in a form this reader knows: a static-table entry (200, 204, 206, 304, 400, 404,
/// 500) or a literal value (plain, or Huffman-coded digits). `None` otherwise (e.g. a reference
/// into the server's dynamic table).
pub fn status(block: &[u8]) -> Option<u16> {
    const STATIC: [u16; 7] = [200, 204, 206, 304, 400, 404, 500];
    let first = *block.first()?;
    if first & 0x80 != 0 {
        let index = usize::from(first & 0x7f);
        return STATIC.get(index.checked_sub(8)?).copied();
    }
    // Literal with incremental indexing (01xx xxxx: 6-bit name index) or without / never
    // indexed (000x xxxx: 4-bit name index); names 8..=14 are all `:status`.
    let index = if first & 0xc0 == 0x40 {
        first & 0x3f
    } else {
        first & 0x0f
    };
    if !(8..=14).contains(&index) {
        return None;
    }
    let head = *block.get(1)?;
    let len = usize::from(head & 0x7f);
    let value = block.get(2..2 + len)?;
    let digits = if head & 0x80 != 0 {
        huffman_digits(value)?
    } else {
        String::from_utf8(value.to_vec()).ok()?
    };
    digits.parse().ok()
}

/// Decodes a Huffman string made of digits only (RFC 7541 Appendix B: `0`-`2` are the 5-bit
/// codes 00000-00010, `3`-`9` the 6-bit codes 011001-011111; padding is all ones).
fn huffman_digits(bytes: &[u8]) -> Option<String> {
    let bits: Vec<u8> = bytes
        .iter()
        .flat_map(|b| (0..8).rev().map(move |i| (b >> i) & 1))
        .collect();
    let mut out = String::new();
    let mut i = 0;
    let code = |from: usize, n: usize| bits[from..from + n].iter().fold(0u8, |acc, b| acc << 1 | b);
    while i < bits.len() {
        let rest = bits.len() - i;
        if rest < 8 && bits[i..].iter().all(|b| *b == 1) {
            break;
        }
        if rest >= 5 && code(i, 5) <= 2 {
            out.push(char::from(b'0' + code(i, 5)));
            i += 5;
        } else if rest >= 6 && (0x19..=0x1f).contains(&code(i, 6)) {
            out.push(char::from(b'0' + code(i, 6) - 0x16));
            i += 6;
        } else {
            return None;
        }
    }
    Some(out)
}

// === impl Frame ===

impl Frame {
    /// GOAWAY: (last stream id, error code).
    pub fn goaway(&self) -> Option<(u32, u32)> {
        if self.kind != kind::GOAWAY || self.payload.len() < 8 {
            return None;
        }
        let last = u32::from_be_bytes(self.payload[0..4].try_into().ok()?) & 0x7fff_ffff;
        let code = u32::from_be_bytes(self.payload[4..8].try_into().ok()?);
        Some((last, code))
    }

    /// RST_STREAM: the error code.
    pub fn rst_code(&self) -> Option<u32> {
        if self.kind != kind::RST_STREAM || self.payload.len() != 4 {
            return None;
        }
        Some(u32::from_be_bytes(self.payload[0..4].try_into().ok()?))
    }

    /// HEADERS: the `:status` when [`status`] can read it.
    pub fn status(&self) -> Option<u16> {
        (self.kind == kind::HEADERS).then(|| status(&self.payload)).flatten()
    }

    /// Whether `flag` is set.
    pub fn has(&self, flag: u8) -> bool {
        self.flags & flag != 0
    }
}

// === impl Conn ===

impl Conn {
    /// Connects to `addr`, writes the preface and a SETTINGS frame with `settings`, and waits
    /// (5 s at most) for the server's SETTINGS, which it acknowledges: after this no ACK is
    /// owed, so a test can send a header block that nothing may interrupt.
    pub fn connect(addr: SocketAddr, client_settings: &[(u16, u32)]) -> io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_nodelay(true)?;
        stream.set_write_timeout(Some(Duration::from_secs(10)))?;
        let mut conn = Conn {
            stream,
            buf: Vec::new(),
        };
        let mut hello = PREFACE.to_vec();
        hello.extend(settings(client_settings));
        conn.send(&hello)?;
        let server_settings = |f: &Frame| (f.kind == kind::SETTINGS && !f.has(flag::ACK)).then_some(());
        conn.recv_until(Duration::from_secs(5), &mut Vec::new(), server_settings)
            .map_err(|e| io::Error::other(format!("no SETTINGS from the server: {e:?}")))?;
        Ok(conn)
    }

    /// Writes raw bytes (one or more encoded frames).
    pub fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.stream.write_all(bytes)
    }

    /// The next frame within `timeout`. A SETTINGS or PING from the server is acknowledged
    /// (and still returned); nothing else is answered, so no WINDOW_UPDATE is ever sent.
    pub fn recv(&mut self, timeout: Duration) -> Event {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(frame) = self.take_frame() {
                let ack = match frame.kind {
                    kind::SETTINGS if !frame.has(flag::ACK) => Some(self::frame(kind::SETTINGS, flag::ACK, 0, &[])),
                    kind::PING if !frame.has(flag::ACK) => Some(self::frame(kind::PING, flag::ACK, 0, &frame.payload)),
                    _ => None,
                };
                if let Some(ack) = ack {
                    // A peer that is closing may refuse the ACK: the frame still counts.
                    let _ = self.send(&ack);
                }
                return Event::Frame(frame);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Event::Timeout;
            }
            if let Err(e) = self.stream.set_read_timeout(Some(left)) {
                return Event::Closed(e.to_string());
            }
            let mut chunk = [0u8; 16 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return Event::Closed("eof".into()),
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => {}
                Err(e) => return Event::Closed(e.to_string()),
            }
        }
    }

    /// Reads frames until `pick` returns `Some`, the connection closes, or `timeout` passes;
    /// every frame read is appended to `seen`.
    pub fn recv_until<T>(
        &mut self,
        timeout: Duration,
        seen: &mut Vec<Frame>,
        mut pick: impl FnMut(&Frame) -> Option<T>,
    ) -> Result<T, Event> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.recv(deadline.saturating_duration_since(Instant::now())) {
                Event::Frame(f) => {
                    let picked = pick(&f);
                    seen.push(f);
                    if let Some(t) = picked {
                        return Ok(t);
                    }
                }
                other => return Err(other),
            }
        }
    }

    /// The underlying socket.
    pub fn socket(&self) -> &TcpStream {
        &self.stream
    }

    fn take_frame(&mut self) -> Option<Frame> {
        if self.buf.len() < 9 {
            return None;
        }
        let len = usize::from(self.buf[0]) << 16 | usize::from(self.buf[1]) << 8 | usize::from(self.buf[2]);
        if self.buf.len() < 9 + len {
            return None;
        }
        let rest = self.buf.split_off(9 + len);
        let raw = std::mem::replace(&mut self.buf, rest);
        Some(Frame {
            kind: raw[3],
            flags: raw[4],
            stream: u32::from_be_bytes([raw[5], raw[6], raw[7], raw[8]]) & 0x7fff_ffff,
            payload: raw[9..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_follow_rfc_7541_c_1() {
        let mut out = Vec::new();
        integer(10, 5, 0, &mut out);
        assert_eq!(out, [10]);
        out.clear();
        integer(1337, 5, 0, &mut out);
        assert_eq!(out, [31, 154, 10]);
    }

    #[test]
    fn status_reads_static_and_huffman_literals() {
        assert_eq!(status(&[0x88]), Some(200));
        assert_eq!(status(&[0x8e]), Some(500));
        // "431" Huffman-coded: 011010 011001 00001, padded with ones to whole bytes.
        let mut bits = "01101001100100001".to_string();
        while bits.len() % 8 != 0 {
            bits.push('1');
        }
        let bytes: Vec<u8> = bits
            .as_bytes()
            .chunks(8)
            .map(|c| u8::from_str_radix(std::str::from_utf8(c).unwrap(), 2).unwrap())
            .collect();
        let mut block = vec![0x08, 0x80 | bytes.len() as u8];
        block.extend(&bytes);
        assert_eq!(status(&block), Some(431));
        assert_eq!(status(&[0x08, 0x03, b'5', b'0', b'2']), Some(502));
    }
}
