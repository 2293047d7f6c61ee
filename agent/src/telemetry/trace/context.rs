//! Trace context on the wire: W3C `traceparent` (its `tracestate` passes through), and B3
//! single (`b3`) and multi (`X-B3-*`) headers read on input. The next hop gets a
//! `traceparent` naming this hop's span as its parent; B3 headers that came in are rewritten
//! the same way, so a B3-only app downstream sees the chain too.

use std::cell::RefCell;

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};

pub const TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub const TRACESTATE: HeaderName = HeaderName::from_static("tracestate");
const B3: HeaderName = HeaderName::from_static("b3");
const B3_TRACE_ID: HeaderName = HeaderName::from_static("x-b3-traceid");
const B3_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-spanid");
const B3_PARENT_SPAN_ID: HeaderName = HeaderName::from_static("x-b3-parentspanid");
const B3_SAMPLED: HeaderName = HeaderName::from_static("x-b3-sampled");
const B3_FLAGS: HeaderName = HeaderName::from_static("x-b3-flags");

/// Which headers carried the caller's context.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    W3c,
    B3Single,
    B3Multi,
}

/// The caller's span, read from a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    /// The caller's decision; `None` when it deferred it (B3 without a sampling state).
    pub sampled: Option<bool>,
    pub format: Format,
}

/// The context of this hop's span.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Context {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub sampled: bool,
}

/// Which trace headers a request carries, by name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Present {
    pub traceparent: bool,
    pub tracestate: bool,
    /// `b3` or an `x-b3-*` header.
    pub b3: bool,
}

/// Finds the trace headers by one walk over the map's names: a request has few headers, and
/// comparing each name (most fail on the length) costs less than hashing the six trace header
/// names for look-ups that mostly miss.
pub fn present(h: &HeaderMap) -> Present {
    let mut p = Present::default();
    for name in h.keys() {
        match name.as_str().as_bytes() {
            b"traceparent" => p.traceparent = true,
            b"tracestate" => p.tracestate = true,
            b"b3" => p.b3 = true,
            n if n.starts_with(b"x-b3-") => p.b3 = true,
            _ => {}
        }
    }
    p
}

/// Reads the caller's context: `traceparent` first, then `b3`, then `X-B3-*`. A malformed
/// header counts as absent.
pub fn extract(h: &HeaderMap) -> Option<Parent> {
    if let Some(v) = h.get(&TRACEPARENT) {
        return parse_traceparent(v.as_bytes());
    }
    if let Some(v) = h.get(&B3) {
        return parse_b3_single(v.as_bytes());
    }
    let trace = h.get(&B3_TRACE_ID)?;
    let span = h.get(&B3_SPAN_ID)?;
    let debug = h.get(&B3_FLAGS).is_some_and(|f| f.as_bytes() == b"1");
    let sampled = match h.get(&B3_SAMPLED).map(HeaderValue::as_bytes) {
        _ if debug => Some(true),
        Some(b"1" | b"true") => Some(true),
        Some(b"0" | b"false") => Some(false),
        _ => None,
    };
    Some(Parent {
        trace_id: trace_id(trace.as_bytes())?,
        span_id: span_id(span.as_bytes())?,
        sampled,
        format: Format::B3Multi,
    })
}

/// `version-traceid-spanid-flags` (W3C Trace Context level 1; later versions may append
/// fields after a `-`).
pub fn parse_traceparent(v: &[u8]) -> Option<Parent> {
    if v.len() < 55 || (v.len() > 55 && v[55] != b'-') {
        return None;
    }
    let version = hex_fixed::<1>(&v[0..2], true)?[0];
    if version == 0xff || (version == 0 && v.len() != 55) || v[2] != b'-' || v[35] != b'-' || v[52] != b'-' {
        return None;
    }
    let trace_id = hex_fixed::<16>(&v[3..35], true)?;
    let span_id = hex_fixed::<8>(&v[36..52], true)?;
    let flags = hex_fixed::<1>(&v[53..55], true)?[0];
    if trace_id == [0; 16] || span_id == [0; 8] {
        return None;
    }
    Some(Parent {
        trace_id,
        span_id,
        sampled: Some(flags & 1 == 1),
        format: Format::W3c,
    })
}

/// `traceid-spanid[-sampling[-parentspanid]]`. A header with only a sampling state carries no
/// span to continue and counts as absent.
fn parse_b3_single(v: &[u8]) -> Option<Parent> {
    let mut parts = v.split(|&b| b == b'-');
    let trace_id = trace_id(parts.next()?)?;
    let span_id = span_id(parts.next()?)?;
    let sampled = match parts.next() {
        None => None,
        Some(b"1" | b"d") => Some(true),
        Some(b"0") => Some(false),
        Some(_) => return None,
    };
    Some(Parent {
        trace_id,
        span_id,
        sampled,
        format: Format::B3Single,
    })
}

/// A B3 trace ID: 16 or 32 hex digits (a 64-bit ID is the low half).
fn trace_id(v: &[u8]) -> Option<[u8; 16]> {
    let id = match v.len() {
        32 => hex_fixed::<16>(v, false)?,
        16 => {
            let low = hex_fixed::<8>(v, false)?;
            let mut id = [0; 16];
            id[8..].copy_from_slice(&low);
            id
        }
        _ => return None,
    };
    (id != [0; 16]).then_some(id)
}

fn span_id(v: &[u8]) -> Option<[u8; 8]> {
    hex_fixed::<8>(v, false).filter(|id| *id != [0; 8])
}

/// Decodes exactly `2 * N` hex digits (lower case only when `strict`, as W3C requires).
fn hex_fixed<const N: usize>(v: &[u8], strict: bool) -> Option<[u8; N]> {
    if v.len() != 2 * N {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' if !strict => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (digit(v[2 * i])? << 4) | digit(v[2 * i + 1])?;
    }
    Some(out)
}

/// Lower-case hex digit pairs of every byte value: one load per byte.
const HEX_PAIRS: [[u8; 2]; 256] = {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut t = [[0u8; 2]; 256];
    let mut i = 0;
    while i < 256 {
        t[i] = [DIGITS[i >> 4], DIGITS[i & 0xf]];
        i += 1;
    }
    t
};

fn hex_into(out: &mut [u8], bytes: &[u8]) {
    for (o, b) in out.chunks_exact_mut(2).zip(bytes) {
        o.copy_from_slice(&HEX_PAIRS[usize::from(*b)]);
    }
}

/// Lower-case hex of `bytes`.
#[cfg(test)]
pub fn hex(bytes: &[u8]) -> String {
    let mut out = vec![0u8; bytes.len() * 2];
    hex_into(&mut out, bytes);
    String::from_utf8_lossy(&out).into_owned()
}

/// The `traceparent` value of `ctx`: 55 bytes written straight into this thread's block
/// (see [`cut`]).
pub fn traceparent(ctx: &Context) -> HeaderValue {
    let bytes = cut(b"00-00000000000000000000000000000000-0000000000000000-00", |v| {
        hex_into(&mut v[3..35], &ctx.trace_id);
        hex_into(&mut v[36..52], &ctx.span_id);
        v[54] = if ctx.sampled { b'1' } else { b'0' };
    });
    // SAFETY: the template and `hex_into` write lower-case hex digits and dashes only: ASCII,
    // so valid UTF-8 (the function's contract) and a valid header value. Skips the byte-by-
    // byte check of `HeaderValue::from_bytes` on every request (debug builds still check).
    #[allow(unsafe_code)]
    unsafe {
        HeaderValue::from_maybe_shared_unchecked(bytes)
    }
}

/// Size of the blocks [`cut`] takes values from: 74 `traceparent`s.
const BLOCK: usize = 4096;

thread_local! {
    /// What is left of this thread's current block.
    static BLOCK_REST: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

/// A copy of `template`, changed in place by `fill`, cut from this thread's block of
/// [`BLOCK`] bytes: a share of a reference-counted buffer, so neither making the value, nor
/// cloning it with the request's headers (for a retry), nor dropping it allocates or frees,
/// but once per block. A block is freed when the last value cut from it is dropped.
fn cut(template: &[u8], fill: impl FnOnce(&mut [u8])) -> Bytes {
    BLOCK_REST.with(|rest| {
        let mut rest = rest.borrow_mut();
        if rest.capacity() < template.len() {
            *rest = BytesMut::with_capacity(BLOCK.max(template.len()));
        }
        rest.extend_from_slice(template);
        fill(&mut rest[..]);
        rest.split().freeze()
    })
}

/// Writes `ctx` into the request for the next hop: `traceparent` always; with a B3 caller, its
/// B3 headers too (same trace, this span, the caller's span as parent). A `tracestate` stays
/// only when it belongs to the trace continued.
pub fn inject(h: &mut HeaderMap, ctx: &Context, parent: Option<&Parent>) {
    let had_traceparent = h.insert(TRACEPARENT, traceparent(ctx)).is_some();
    let Some(parent) = parent else {
        // A new trace: a vendor's state of another trace means nothing. (Only looked for when
        // the caller sent a traceparent, malformed: a tracestate alone is rare, and looking
        // costs a hash of the name on every request.)
        if had_traceparent {
            h.remove(&TRACESTATE);
        }
        return;
    };
    let mut span = [0u8; 16];
    hex_into(&mut span, &ctx.span_id);
    let sampled: &[u8] = if ctx.sampled { b"1" } else { b"0" };
    match parent.format {
        Format::W3c => {}
        Format::B3Single => {
            // trace(32)-span(16)-sampled(1)-parent(16)
            let mut v = [0u8; 32 + 1 + 16 + 1 + 1 + 1 + 16];
            hex_into(&mut v[..32], &ctx.trace_id);
            v[32] = b'-';
            v[33..49].copy_from_slice(&span);
            v[49] = b'-';
            v[50] = sampled[0];
            v[51] = b'-';
            hex_into(&mut v[52..], &parent.span_id);
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                h.insert(B3, v);
            }
        }
        Format::B3Multi => {
            let mut p = [0u8; 16];
            hex_into(&mut p, &parent.span_id);
            if let (Ok(s), Ok(p)) = (HeaderValue::from_bytes(&span), HeaderValue::from_bytes(&p)) {
                h.insert(B3_SPAN_ID, s);
                h.insert(B3_PARENT_SPAN_ID, p);
            }
            h.insert(
                B3_SAMPLED,
                HeaderValue::from_static(if ctx.sampled { "1" } else { "0" }),
            );
            h.remove(&B3_FLAGS);
        }
    }
}

/// The ratio as a threshold on the trace ID's low 56 bits (W3C level 2's random part).
pub fn ratio_threshold(ratio: f64) -> u64 {
    const SCALE: f64 = (1u64 << 56) as f64;
    // In range after the clamp: 0 ..= 2^56.
    (ratio.clamp(0.0, 1.0) * SCALE) as u64
}

/// Whether `trace_id` falls under `threshold`: the same answer on every hop of the trace.
pub fn ratio_sampled(trace_id: &[u8; 16], threshold: u64) -> bool {
    let mut low = [0u8; 8];
    low[1..].copy_from_slice(&trace_id[9..]);
    u64::from_be_bytes(low) < threshold
}

/// A new random trace ID (never all zeros). The full range, zero moved to one: a range of
/// `1..` costs a 128-bit division per call.
pub fn new_trace_id() -> [u8; 16] {
    fastrand::u128(..).max(1).to_be_bytes()
}

/// A new random span ID (never all zeros).
pub fn new_span_id() -> [u8; 8] {
    fastrand::u64(..).max(1).to_be_bytes()
}
