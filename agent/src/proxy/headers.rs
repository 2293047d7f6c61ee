//! Header rewriting between hops: hop-by-hop removal, `x-forwarded-for`, `x-request-id`.

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
        let tokens = || value.to_str().unwrap_or("").split(',').map(str::trim);
        if *fixed[i] == header::TE {
            te_trailers |= tokens().any(|t| t.eq_ignore_ascii_case("trailers"));
        } else if *fixed[i] == header::CONNECTION {
            for t in tokens() {
                let is_fixed = fixed.iter().any(|f| f.as_str().eq_ignore_ascii_case(t));
                if !t.is_empty() && !is_fixed {
                    if let Ok(n) = HeaderName::from_bytes(t.as_bytes()) {
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
pub fn is_upgrade(h: &HeaderMap) -> bool {
    h.contains_key(header::UPGRADE)
        && h.get_all(header::CONNECTION).iter().any(|v| {
            v.to_str()
                .unwrap_or("")
                .split(',')
                .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
        })
}

/// Appends the client's address to `x-forwarded-for`.
pub fn append_forwarded_for(h: &mut HeaderMap, client: &HeaderValue) {
    match h.get(&X_FORWARDED_FOR) {
        None => {
            h.insert(X_FORWARDED_FOR.clone(), client.clone());
        }
        Some(prev) => {
            let mut v = Vec::with_capacity(prev.len() + 2 + client.len());
            v.extend_from_slice(prev.as_bytes());
            v.extend_from_slice(b", ");
            v.extend_from_slice(client.as_bytes());
            if let Ok(v) = HeaderValue::from_bytes(&v) {
                h.insert(X_FORWARDED_FOR.clone(), v);
            }
        }
    }
}

/// Ensures the request carries an `x-request-id`.
pub fn ensure_request_id(h: &mut HeaderMap) {
    if !h.contains_key(&X_REQUEST_ID) {
        h.insert(X_REQUEST_ID.clone(), new_request_id());
    }
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
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("keep-alive, x-secret"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("proxy-connection", HeaderValue::from_static("close"));
        h.insert("upgrade", HeaderValue::from_static("h2c"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        assert!(strip_hop_by_hop(&mut h, false));
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn hop_index_knows_every_fixed_name() {
        for (i, name) in fixed_hop_by_hop().iter().enumerate() {
            assert_eq!(hop_index(name), Some(i), "{name}");
        }
        assert_eq!(hop_index(&header::HOST), None);
    }

    #[test]
    fn messages_without_hop_by_hop_headers_are_untouched() {
        let mut h = HeaderMap::new();
        h.insert("host", HeaderValue::from_static("svc"));
        h.append("x-a", HeaderValue::from_static("1"));
        h.append("x-a", HeaderValue::from_static("2"));
        let before = h.clone();
        assert!(!strip_hop_by_hop(&mut h, false));
        assert_eq!(h, before);
    }

    #[test]
    fn connection_tokens_across_several_headers_are_removed() {
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("X-One"));
        h.append("connection", HeaderValue::from_static("x-two, keep-alive"));
        h.insert("x-one", HeaderValue::from_static("1"));
        h.insert("x-two", HeaderValue::from_static("2"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-keep", HeaderValue::from_static("yes"));
        assert!(!strip_hop_by_hop(&mut h, false));
        assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
    }

    #[test]
    fn upgrade_handshake_keeps_upgrade() {
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_static("Upgrade"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        assert!(is_upgrade(&h));
        strip_hop_by_hop(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        let ip = HeaderValue::from_static("127.0.0.1");
        append_forwarded_for(&mut h, &ip);
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1");
        append_forwarded_for(&mut h, &HeaderValue::from_static("127.0.0.2"));
        assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1, 127.0.0.2");
    }

    #[test]
    fn request_ids_are_kept_or_made() {
        let mut h = HeaderMap::new();
        ensure_request_id(&mut h);
        let id = h[&X_REQUEST_ID].clone();
        assert_eq!(id.len(), 36);
        assert_eq!(id.as_bytes()[14], b'4');
        ensure_request_id(&mut h);
        assert_eq!(h[&X_REQUEST_ID], id);
        let mut other = HeaderMap::new();
        ensure_request_id(&mut other);
        assert_ne!(other[&X_REQUEST_ID], id);
    }
}
