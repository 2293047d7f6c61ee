//! HTTP/1.1 to an upstream without a connection task: the request's own task writes the request
//! and reads the response on a connection it holds for the exchange (`conn`), with response heads
//! parsed on httparse as strictly as hyper's client (`head`) and message framing per RFC 9112 §6
//! (`framing`).
//!
//! hyper's client splits an exchange between the caller's task and a connection task joined by
//! a dispatch channel: every request crosses the channel, and every response wakes the caller a
//! second time. Here there is one task and no channel: `Conn::send` writes the head (and a body
//! that is ready) in one write, reads the head in the same poll, and the response body reads the
//! rest when the caller polls it, handing the connection to a `Recycle` (the endpoint's pool)
//! once the last byte is read.
//!
//! ```text
//!  Conn ──request()──► Exchange ──read_head()──► Response<ResponseBody> ──last byte──► Recycle
//!   ▲                   writes head + body        1xx skipped, framing      (keep-alive,
//!   └──────────────────── pool ◄──────────────── decided (RFC 9112 §6.3)     nothing unread)
//! ```

pub mod conn;
pub mod framing;
pub mod head;

pub use conn::{fields_into_map, Conn, Discard, Error, Exchange, HeadRef, Recycle, ResponseBody, Upgraded};
pub use head::{FieldKind, RawFields};

/// Bounds on what an upstream can make the client hold. The defaults are hyper's client
/// defaults, except the chunk-size line, which hyper does not bound (see `framing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest response head (status line, headers, final CRLF) in bytes: hyper's read buffer
    /// limit, 8 KiB + 100 × 4 KiB.
    pub max_head_bytes: usize,
    /// Most header fields in a response head; at most [`head::MAX_HEADERS`].
    pub max_headers: usize,
    /// Longest chunk-size of a chunked body (hex digits and the whitespace after them).
    pub max_chunk_size_line: usize,
    /// Most chunk-extension bytes in one chunked body (hyper: 16 KiB, over the whole body).
    pub max_chunk_extensions: u64,
    /// Largest trailer section of a chunked body (hyper: 16 KiB).
    pub max_trailer_bytes: usize,
    /// Most trailer fields of a chunked body (hyper: 100); at most [`head::MAX_HEADERS`].
    pub max_trailers: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_head_bytes: 8192 + 4096 * 100,
            max_headers: head::MAX_HEADERS,
            max_chunk_size_line: 1024,
            max_chunk_extensions: 16 * 1024,
            max_trailer_bytes: 16 * 1024,
            max_trailers: 100,
        }
    }
}
