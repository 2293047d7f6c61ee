//! The access-log line, written by hand: byte for byte what `serde_json` made of the same fields
//! (a property test holds it to that), without the general formatter and without allocating.
//! Integers go through a two-digit table, addresses through the same digits, the timestamp's
//! date and time of day are computed once per second and copied from then on.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::HeaderValue;

use super::AccessRecord;
use crate::telemetry::host;
use crate::telemetry::metrics::Direction;

/// What repeats from line to line, kept per staging buffer: the `ts` text up to the second's dot
/// (`2026-11-27T04:11:59.`) for the second it was made for, and the host part of the last
/// upstream and client addresses. One date computation per second instead of one per line, and
/// an address is formatted again only when it changes. The same for the `host` object: made
/// again only when the host sampler has stored a new sample (once a second).
#[derive(Debug)]
pub(super) struct Cache {
    sec: u64,
    prefix: [u8; 20],
    upstream: HostText,
    client: HostText,
    /// The host sample's generation `host_text` was made from.
    host_generation: u64,
    host_text: Vec<u8>,
}

/// `a.b.c.d`, `[v6]` or `[v6%scope]`: an address's text before `:port`.
#[derive(Debug)]
struct HostText {
    key: Option<(IpAddr, u32)>,
    text: [u8; 64],
    len: usize,
}

/// 9999-12-31T23:59:59: the last second a four-digit year can show; later times are clamped.
const MAX_SECS: u64 = 253_402_300_799;

/// Room for a line's fixed text and numbers; strings longer than usual grow the buffer once.
const LINE_BYTES: usize = 512;

/// `"00" "01" .. "99"`: two digits per table lookup.
const DIGITS: [u8; 200] = {
    let mut t = [0u8; 200];
    let mut i = 0;
    while i < 100 {
        t[2 * i] = b'0' + (i / 10) as u8;
        t[2 * i + 1] = b'0' + (i % 10) as u8;
        i += 1;
    }
    t
};

/// JSON string escapes, as `serde_json` writes them: `0` for a byte copied as it is, else the
/// letter after the backslash (`u` for `\u00XX`).
const ESCAPE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut i = 0;
    while i < 0x20 {
        t[i] = b'u';
        i += 1;
    }
    t[0x08] = b'b';
    t[0x09] = b't';
    t[0x0a] = b'n';
    t[0x0c] = b'f';
    t[0x0d] = b'r';
    t[b'"' as usize] = b'"';
    t[b'\\' as usize] = b'\\';
    t
};

/// Appends the JSON line for `r`, ending in `\n`, to `out`. The fields, their order and their
/// escaping are the documented format (docs/request-lifecycle.md#access-log).
pub(super) fn line(out: &mut Vec<u8>, cache: &mut Cache, r: &AccessRecord) {
    let path = r.uri.path_and_query().map_or("/", |p| p.as_str());

    out.reserve(LINE_BYTES + r.service.len() + path.len());
    out.extend_from_slice(b"{\"ts\":\"");
    cache.ts(out, r.start);
    out.extend_from_slice(match r.direction {
        Direction::Inbound => b"\",\"direction\":\"inbound\",\"service\":",
        Direction::Outbound => b"\",\"direction\":\"outbound\",\"service\":",
    });
    string(out, &r.service);
    out.extend_from_slice(b",\"method\":\"");
    // A method is an HTTP token (`http` checks extension methods), which never needs escaping.
    out.extend_from_slice(r.method.as_str().as_bytes());
    out.extend_from_slice(b"\",\"authority\":");
    if !r.authority.as_ref().is_some_and(|h| header_string(out, h)) {
        string(out, r.uri.authority().map_or("", |a| a.as_str()));
    }
    out.extend_from_slice(b",\"path\":");
    string(out, path);
    out.extend_from_slice(b",\"status\":");
    uint(out, u64::from(r.status));
    match r.upstream {
        Some(a) => {
            out.extend_from_slice(b",\"upstream\":\"");
            cache.upstream.write(out, a);
            out.push(b'"');
        }
        None => out.extend_from_slice(b",\"upstream\":null"),
    }
    match r.error {
        Some(e) => {
            out.extend_from_slice(b",\"error\":");
            string(out, e);
        }
        None => out.extend_from_slice(b",\"error\":null"),
    }
    out.extend_from_slice(b",\"bytes_received\":");
    uint(out, r.bytes_received);
    out.extend_from_slice(b",\"bytes_sent\":");
    uint(out, r.bytes_sent);
    out.extend_from_slice(b",\"duration_us\":");
    micros(out, r.duration);
    out.extend_from_slice(b",\"upstream_us\":");
    micros(out, r.upstream_time);
    out.extend_from_slice(b",\"overhead_us\":");
    micros(out, r.overhead);
    out.extend_from_slice(b",\"attempts\":");
    uint(out, u64::from(r.attempts));
    out.extend_from_slice(b",\"request_id\":");
    if !r.request_id.as_ref().is_some_and(|h| header_string(out, h)) {
        out.extend_from_slice(b"\"\"");
    }
    out.extend_from_slice(b",\"client\":\"");
    cache.client.write(out, r.client);
    match &r.caller {
        Some(c) => {
            out.extend_from_slice(b"\",\"caller\":");
            string(out, c);
            out.extend_from_slice(b",\"host\":");
        }
        None => out.extend_from_slice(b"\",\"caller\":null,\"host\":"),
    }
    cache.host(out);
    out.extend_from_slice(b"}\n");
}

// === impl Cache ===

impl Cache {
    pub(super) fn new() -> Self {
        Self {
            sec: u64::MAX,
            prefix: [0; 20],
            upstream: HostText::new(),
            client: HostText::new(),
            host_generation: u64::MAX,
            host_text: Vec::with_capacity(128),
        }
    }

    /// The access log's `host` object of the latest host sample (telemetry/host.rs): one
    /// atomic load per line, formatted again once a second.
    fn host(&mut self, out: &mut Vec<u8>) {
        let gauges = host::monitor().gauges();
        let generation = gauges.generation();
        if generation != self.host_generation {
            self.host_text.clear();
            host::write_log_object(&mut self.host_text, &gauges.load());
            self.host_generation = generation;
        }
        out.extend_from_slice(&self.host_text);
    }

    /// `2026-11-27T04:11:59.172908Z`: RFC 3339 in UTC with microseconds (truncated), as
    /// `humantime::format_rfc3339_micros` wrote it. A time before 1970 shows as the epoch.
    fn ts(&mut self, out: &mut Vec<u8>, t: SystemTime) {
        let since = t.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let sec = since.as_secs().min(MAX_SECS);
        if sec != self.sec {
            self.prefix = prefix(sec);
            self.sec = sec;
        }
        let us = if sec == since.as_secs() {
            since.subsec_micros()
        } else {
            999_999
        };
        let mut ts = *b"0000-00-00T00:00:00.000000Z";
        ts[..20].copy_from_slice(&self.prefix);
        ts[20..22].copy_from_slice(&pair(u64::from(us / 10_000)));
        ts[22..24].copy_from_slice(&pair(u64::from(us / 100 % 100)));
        ts[24..26].copy_from_slice(&pair(u64::from(us % 100)));
        out.extend_from_slice(&ts);
    }
}

// === impl HostText ===

impl HostText {
    fn new() -> Self {
        Self {
            key: None,
            text: [0; 64],
            len: 0,
        }
    }

    /// `a` as `SocketAddr`'s `Display` writes it: `a.b.c.d:port`, `[v6]:port`, `[v6%scope]:port`.
    #[inline(always)]
    fn write(&mut self, out: &mut Vec<u8>, a: SocketAddr) {
        let key = match a {
            SocketAddr::V4(v4) => (IpAddr::V4(*v4.ip()), 0),
            SocketAddr::V6(v6) => (IpAddr::V6(*v6.ip()), v6.scope_id()),
        };
        if self.key != Some(key) {
            self.fill(key);
        }
        out.extend_from_slice(&self.text[..self.len]);
        out.push(b':');
        uint(out, u64::from(a.port()));
    }

    fn fill(&mut self, key: (IpAddr, u32)) {
        self.len = match key {
            (IpAddr::V4(ip), _) => {
                let mut at = 0;
                for (i, octet) in ip.octets().into_iter().enumerate() {
                    if i > 0 {
                        self.text[at] = b'.';
                        at += 1;
                    }
                    let (digits, n) = match octet {
                        100.. => ([b'0' + octet / 100, b'0' + octet / 10 % 10, b'0' + octet % 10], 3),
                        10.. => ([b'0' + octet / 10, b'0' + octet % 10, 0], 2),
                        _ => ([b'0' + octet, 0, 0], 1),
                    };
                    self.text[at..at + n].copy_from_slice(&digits[..n]);
                    at += n;
                }
                at
            }
            // IPv6 text (zero compression, embedded IPv4) comes from the general formatter, once
            // per address; at most `[` + 45 (IPv4-mapped) + `%` + 10 + `]` = 58 bytes fit.
            (IpAddr::V6(ip), scope) => {
                let mut text = std::io::Cursor::new(&mut self.text[..]);
                let _ = match scope {
                    0 => write!(text, "[{ip}]"),
                    _ => write!(text, "[{ip}%{scope}]"),
                };
                text.position() as usize
            }
        };
        self.key = Some(key);
    }
}

/// `YYYY-MM-DDTHH:MM:SS.` for `sec` seconds after the epoch (`sec <= MAX_SECS`).
fn prefix(sec: u64) -> [u8; 20] {
    let (year, month, day) = civil_from_days(sec / 86_400);
    let of_day = sec % 86_400;
    let mut p = *b"0000-00-00T00:00:00.";
    p[0..2].copy_from_slice(&pair(year / 100));
    p[2..4].copy_from_slice(&pair(year % 100));
    p[5..7].copy_from_slice(&pair(month));
    p[8..10].copy_from_slice(&pair(day));
    p[11..13].copy_from_slice(&pair(of_day / 3600));
    p[14..16].copy_from_slice(&pair(of_day / 60 % 60));
    p[17..19].copy_from_slice(&pair(of_day % 60));
    p
}

/// (year, month, day) of the proleptic Gregorian calendar, `days` after 1970-01-01 (Howard
/// Hinnant's `civil_from_days`, for days on or after the epoch).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468; // days since 0000-03-01
    let era = z / 146_097;
    let doe = z - era * 146_097; // [0, 146096]
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365], from March 1st
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

// === JSON values ===

/// A JSON string: quoted, with `"`, `\` and control characters escaped as `serde_json` does.
/// Nearly always nothing needs escaping, which `classify` finds out eight bytes at a time; then
/// the bytes are copied at once.
#[inline(always)]
fn string(out: &mut Vec<u8>, s: &str) {
    let bytes = s.as_bytes();
    quoted(out, bytes, classify(bytes) & (CONTROL | SPECIAL) != 0);
}

/// A header value as a JSON string, when it is visible ASCII or tab (what
/// `HeaderValue::to_str` accepts); else nothing is written and the answer is false. The check
/// and the search for bytes to escape are the same pass.
#[inline(always)]
fn header_string(out: &mut Vec<u8>, value: &HeaderValue) -> bool {
    let bytes = value.as_bytes();
    let class = classify(bytes);
    if class & HIGH != 0 || (class & CONTROL != 0 && bytes.iter().any(|&b| b < 0x20 && b != b'\t')) {
        return false;
    }
    quoted(out, bytes, class & (CONTROL | SPECIAL) != 0);
    true
}

/// `classify` bits: a byte below 0x20; a `"` or `\`; a byte of 0x7f or above.
const CONTROL: u8 = 1;
const SPECIAL: u8 = 2;
const HIGH: u8 = 4;

/// Which kinds of bytes `bytes` holds, looked at a 64-bit word at a time (the last word overlaps
/// the one before it when the length is not a multiple of 8) with the usual bit tricks: per
/// byte lane, `(w - n) & !w & 0x80` is set for a byte below `n <= 0x80` (a borrow only runs on
/// from a lane that is itself below), and `(w + 1 | w) & 0x80` for a byte of 0x7f or above.
#[inline(always)]
pub(super) fn classify(bytes: &[u8]) -> u8 {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGHS: u64 = 0x8080_8080_8080_8080;
    fn below(w: u64, n: u8) -> u64 {
        w.wrapping_sub(ONES * u64::from(n)) & !w & HIGHS
    }
    if bytes.len() < 8 {
        return bytes.iter().fold(0, |class, &b| {
            class
                | (u8::from(b < 0x20) * CONTROL)
                | (u8::from(b == b'"' || b == b'\\') * SPECIAL)
                | (u8::from(b >= 0x7f) * HIGH)
        });
    }
    let (mut control, mut special, mut high) = (0, 0, 0);
    let mut word = |w: u64| {
        control |= below(w, 0x20);
        special |= below(w ^ (ONES * u64::from(b'"')), 1) | below(w ^ (ONES * u64::from(b'\\')), 1);
        high |= (w.wrapping_add(ONES) | w) & HIGHS;
    };
    let chunks = bytes.chunks_exact(8);
    let tail = !chunks.remainder().is_empty();
    // `chunks_exact(8)` gives 8-byte slices, so the conversions cannot fail; a failure would
    // read as a control byte, which only costs the byte-by-byte path.
    for c in chunks {
        word(c.try_into().map_or(0, u64::from_le_bytes));
    }
    if tail {
        word(bytes[bytes.len() - 8..].try_into().map_or(0, u64::from_le_bytes));
    }
    (u8::from(control != 0) * CONTROL) | (u8::from(special != 0) * SPECIAL) | (u8::from(high != 0) * HIGH)
}

/// `bytes` (UTF-8) between quotes; escaped byte by byte when `escape`.
#[inline(always)]
fn quoted(out: &mut Vec<u8>, bytes: &[u8], escape: bool) {
    out.push(b'"');
    if !escape {
        out.extend_from_slice(bytes);
        out.push(b'"');
        return;
    }
    let mut run = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc = ESCAPE[b as usize];
        if esc == 0 {
            continue;
        }
        out.extend_from_slice(&bytes[run..i]);
        run = i + 1;
        if esc == b'u' {
            const HEX: &[u8; 16] = b"0123456789abcdef";
            out.extend_from_slice(&[b'\\', b'u', b'0', b'0', HEX[(b >> 4) as usize], HEX[(b & 0xf) as usize]]);
        } else {
            out.extend_from_slice(&[b'\\', esc]);
        }
    }
    out.extend_from_slice(&bytes[run..]);
    out.push(b'"');
}

/// `n` as two digits (`n < 100`).
#[inline(always)]
fn pair(n: u64) -> [u8; 2] {
    let i = 2 * n as usize;
    [DIGITS[i], DIGITS[i + 1]]
}

/// Decimal digits of `n`. Up to six digits (statuses, ports, byte counts and durations of
/// requests that are not huge) are written as one fixed-size piece.
#[inline(always)]
fn uint(out: &mut Vec<u8>, n: u64) {
    if n < 10 {
        out.push(b'0' + n as u8);
    } else if n < 100 {
        out.extend_from_slice(&pair(n));
    } else if n < 10_000 {
        let (hi, lo) = (pair(n / 100), pair(n % 100));
        if n < 1000 {
            out.extend_from_slice(&[hi[1], lo[0], lo[1]]);
        } else {
            out.extend_from_slice(&[hi[0], hi[1], lo[0], lo[1]]);
        }
    } else if n < 1_000_000 {
        let (hi, mid, lo) = (pair(n / 10_000), pair(n / 100 % 100), pair(n % 100));
        if n < 100_000 {
            out.extend_from_slice(&[hi[1], mid[0], mid[1], lo[0], lo[1]]);
        } else {
            out.extend_from_slice(&[hi[0], hi[1], mid[0], mid[1], lo[0], lo[1]]);
        }
    } else {
        let mut buf = [0u8; 20];
        let mut at = buf.len();
        let mut n = n;
        while n >= 100 {
            at -= 2;
            buf[at..at + 2].copy_from_slice(&pair(n % 100));
            n /= 100;
        }
        if n >= 10 {
            at -= 2;
            buf[at..at + 2].copy_from_slice(&pair(n));
        } else {
            at -= 1;
            buf[at] = b'0' + n as u8;
        }
        out.extend_from_slice(&buf[at..]);
    }
}

/// Whole microseconds, as `Duration::as_micros` counts them.
#[inline(always)]
fn micros(out: &mut Vec<u8>, d: Duration) {
    match u64::try_from(d.as_micros()) {
        Ok(n) => uint(out, n),
        // Past u64::MAX µs (584,000 years): only a forged duration; the general formatter will do.
        // Writing into a Vec cannot fail.
        Err(_) => {
            let _ = write!(out, "{}", d.as_micros());
        }
    }
}
