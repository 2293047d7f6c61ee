//! Header rewriting between hops: hop-by-hop removal, `x-forwarded-for`, `x-request-id`, and
//! vmesh's own `x-vmesh-*` namespace (no client or upstream can speak for the proxy).

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1).
fn fixed_hop_by_hop() -> [&'static HeaderName; 7] {
    [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TRANSFER_ENCODING,
        &header::TE,
        &header::TRAILER,
        &header::UPGRADE,
    ]
}

/// The position of `name` in [`fixed_hop_by_hop`] (names are lower case in a `HeaderMap`).
fn hop_index(name: &HeaderName) -> Option<usize> {
    match name.as_str() {
        "connection" => Some(0),
        "keep-alive" => Some(1),
        "proxy-connection" => Some(2),
        "transfer-encoding" => Some(3),
        "te" => Some(4),
        "trailer" => Some(5),
        "upgrade" => Some(6),
        _ => None,
    }
}

/// Removes hop-by-hop headers, including those named by `Connection`. With `keep_upgrade`
/// the `Upgrade` header and a `Connection: upgrade` survive (a WebSocket handshake).
/// Returns whether the message asked for `TE: trailers` (gRPC needs it forwarded).
///
/// One pass over the headers finds which hop-by-hop ones are present, the `Connection` tokens
/// and `TE: trailers` (no hashing); only those present are removed, so a message without any
/// costs a scan of its names.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool) -> bool {
    let fixed = fixed_hop_by_hop();
    let mut present = 0u8;
    let mut te_trailers = false;
    // Tokens listed in Connection are hop-by-hop too (the fixed ones are handled below).
    let mut named: Vec<HeaderName> = Vec::new();
    for (name, value) in h.iter() {
        let Some(i) = hop_index(name) else { continue };
        present |= 1 << i;
        // Bytes, not `str`: no UTF-8 pass, and a token with obs-text names no header anyway.
        let tokens = || value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii);
        if *fixed[i] == header::TE {
            te_trailers |= tokens().any(|t| t.eq_ignore_ascii_case(b"trailers"));
        } else if *fixed[i] == header::CONNECTION {
            for t in tokens() {
                let is_fixed = fixed.iter().any(|f| f.as_str().as_bytes().eq_ignore_ascii_case(t));
                if !t.is_empty() && !is_fixed {
                    if let Ok(n) = HeaderName::from_bytes(t) {
                        named.push(n);
                    }
                }
            }
        }
    }
    for n in named {
        h.remove(n);
    }
    for (i, name) in fixed.iter().enumerate() {
        if keep_upgrade && (*name == header::UPGRADE || *name == header::CONNECTION) {
            continue;
        }
        if present & (1 << i) != 0 {
            h.remove(*name);
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    te_trailers
}

/// Whether a request asks for a protocol upgrade (HTTP/1.1 `Connection: upgrade` + `Upgrade`).
/// Whether the request's `Upgrade` protocol (its first, the one a server picks by default) is one
/// of `allowed` (`proxy.upgrades`), case-insensitively; the version after `/` does not count.
pub fn upgrade_allowed(h: &HeaderMap, allowed: &[String]) -> bool {
    let Some(first) = h
        .get(header::UPGRADE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(',').next())
    else {
        return false;
    };
    let protocol = first.trim().split('/').next().unwrap_or("");
    allowed.iter().any(|a| a.eq_ignore_ascii_case(protocol))
}

pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// Sets `x-forwarded-for` for the next hop. From a `trusted` client (`[proxy]
/// trust_forwarded_for`) the chain it sent is kept, every `x-forwarded-for` line of it in order,
/// and its address appended; from any other client the chain is replaced by its address, so an
/// app that reads the leftmost entry gets an address vmesh saw, not one a caller wrote.
pub fn set_forwarded_for(h: &mut HeaderMap, client: &HeaderValue, trusted: bool) {
    let mut chain = h.get_all(&X_FORWARDED_FOR).iter();
    let value = match (trusted, chain.next()) {
        (true, Some(first)) => {
            let rest: Vec<&HeaderValue> = chain.collect();
            let len = first.len() + rest.iter().map(|v| v.len() + 2).sum::<usize>() + 2 + client.len();
            let mut v = Vec::with_capacity(len);
            v.extend_from_slice(first.as_bytes());
            for r in rest {
                v.extend_from_slice(b", ");
                v.extend_from_slice(r.as_bytes());
            }
            v.extend_from_slice(b", ");
            v.extend_from_slice(client.as_bytes());
            // Valid header bytes joined by ", " are valid header bytes; the fallback only keeps
            // the client's address should that ever change.
            HeaderValue::from_bytes(&v).unwrap_or_else(|_| client.clone())
        }
        _ => client.clone(),
    };
    h.insert(X_FORWARDED_FOR.clone(), value);
}

/// The longest `x-request-id` kept as it came: a UUID is 36 bytes, a W3C trace id 32, an AWS
/// `X-Amzn-Trace-Id` about 80; anything longer is not an id, and it is copied into every log
/// line and the colour propagation map.
pub const MAX_REQUEST_ID: usize = 128;

/// Ensures the request carries one usable `x-request-id`: the client's when it sent exactly one
/// of 1..=[`MAX_REQUEST_ID`] visible ASCII characters (`!`..=`~`: no spaces, controls or
/// non-ASCII bytes, which would break log lines and the tools that split them), else a fresh
/// one in its place.
pub fn ensure_request_id(h: &mut HeaderMap) {
    let mut ids = h.get_all(&X_REQUEST_ID).iter();
    let usable = match (ids.next(), ids.next()) {
        (Some(id), None) => is_usable_request_id(id.as_bytes()),
        _ => false,
    };
    if !usable {
        h.insert(X_REQUEST_ID.clone(), new_request_id());
    }
}

fn is_usable_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len()) && id.iter().all(|b| (b'!'..=b'~').contains(b))
}

/// vmesh's own header namespace: `x-vmesh-error` and `x-vmesh-fallback` on the answers it
/// makes, the colour header on requests.
const VMESH_PREFIX: &str = "x-vmesh-";

/// Whether the message has any `x-vmesh-*` header (one scan of the names, no allocation).
pub fn has_vmesh(h: &HeaderMap) -> bool {
    h.keys().any(is_vmesh)
}

/// Removes every `x-vmesh-*` header for which `keep` is false. Upstream responses lose them
/// all (an app must not pass for the proxy: a fake `x-vmesh-error: CIRCUIT_OPEN` would be
/// counted and acted on by callers as vmesh's), requests all but the headers vmesh reads.
pub fn strip_vmesh(h: &mut HeaderMap, keep: impl Fn(&HeaderName) -> bool) {
    // Collecting nothing allocates nothing: a message without such headers costs a scan.
    let doomed: Vec<HeaderName> = h.keys().filter(|n| is_vmesh(n) && !keep(n)).cloned().collect();
    for n in doomed {
        h.remove(n);
    }
}

fn is_vmesh(name: &HeaderName) -> bool {
    // Names in a `HeaderMap` are lower case.
    name.as_str().starts_with(VMESH_PREFIX)
}

/// A random version-4 UUID, formatted without allocation before the header value itself.
fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut r = fastrand::u128(..).to_be_bytes();
    r[6] = (r[6] & 0x0f) | 0x40;
    r[8] = (r[8] & 0x3f) | 0x80;
    let mut out = [0u8; 36];
    let mut o = 0;
    for (i, b) in r.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            out[o] = b'-';
            o += 1;
        }
        out[o] = HEX[usize::from(b >> 4)];
        out[o + 1] = HEX[usize::from(b & 0xf)];
        o += 2;
    }
    // Hex digits and dashes are valid header bytes.
    HeaderValue::from_bytes(&out).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

#[cfg(test)]
mod tests;
