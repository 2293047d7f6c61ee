//! Header rewriting between hops: hop-by-hop removal, `x-forwarded-for`, `x-request-id`, and
//! vmesh's own `x-vmesh-*` namespace (no client or upstream can speak for the proxy).

use std::cell::RefCell;

use bytes::BytesMut;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::upstream::h1::{FieldKind, RawFields};

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

/// Whether a response field (as it came: name in any case, kind by name) passes to the client:
/// not one that describes the connection (RFC 9110 §7.6.1, [`fixed_hop_by_hop`]), not one of
/// vmesh's own `x-vmesh-*` (see [`strip_vmesh`]). The fields a `Connection` field names are not
/// judged here: see [`names_more_hop_by_hop`].
pub fn passes(name: &[u8], kind: FieldKind) -> bool {
    !kind.is_hop_by_hop() && !is_vmesh_bytes(name)
}

/// [`is_vmesh`] for a name as it came (any case).
fn is_vmesh_bytes(name: &[u8]) -> bool {
    name.get(..VMESH_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(VMESH_PREFIX.as_bytes()))
}

/// Whether a `Connection` field of `fields` names a field other than the fixed hop-by-hop ones,
/// which must then go too (RFC 9110 §7.6.1): [`strip_hop_by_hop`] on a map does that.
pub fn names_more_hop_by_hop(fields: &RawFields) -> bool {
    fields.iter().any(|(_, value, kind)| {
        kind == FieldKind::Connection
            && value
                .split(|&b| b == b',')
                .map(<[u8]>::trim_ascii)
                .any(|t| !t.is_empty() && !is_fixed_token(t))
    })
}

/// What one pass over a message's fields found, by name comparison only (no hashing): the
/// stages after it look up, remove or check a field only when it is there, and most requests
/// have none of these.
#[derive(Debug, Clone, Copy, Default)]
pub struct Fields {
    /// Bits of [`fixed_hop_by_hop`] present.
    hop: u8,
    /// A `TE` field lists `trailers`.
    pub te_trailers: bool,
    /// A `Connection` field lists `upgrade`.
    connection_upgrade: bool,
    /// A `Connection` field lists a name that is not one of the fixed hop-by-hop ones.
    pub connection_names: bool,
    pub expect: bool,
    pub host: bool,
    pub forwarded_for: bool,
    /// `x-request-id` fields (counted up to 2).
    request_ids: u8,
    /// The only `x-request-id` is usable as it came ([`MAX_REQUEST_ID`], visible ASCII).
    pub request_id_usable: bool,
    /// Some `x-vmesh-*` field.
    pub vmesh: bool,
}

impl Fields {
    /// Whether the message asks for a protocol upgrade (`Upgrade` and `Connection: upgrade`).
    pub fn is_upgrade(&self) -> bool {
        self.hop & (1 << UPGRADE_BIT) != 0 && self.connection_upgrade
    }
}

const CONNECTION_BIT: usize = 0;
const TE_BIT: usize = 4;
const UPGRADE_BIT: usize = 6;

/// One pass over the fields of `h`: see [`Fields`].
pub fn scan(h: &HeaderMap) -> Fields {
    let mut f = Fields::default();
    for (name, value) in h.iter() {
        if let Some(i) = hop_index(name) {
            f.hop |= 1 << i;
            // Bytes, not `str`: no UTF-8 pass, and a token with obs-text names no header anyway.
            let tokens = || value.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii);
            if i == TE_BIT {
                f.te_trailers |= tokens().any(|t| t.eq_ignore_ascii_case(b"trailers"));
            } else if i == CONNECTION_BIT {
                for t in tokens() {
                    if t.eq_ignore_ascii_case(b"upgrade") {
                        f.connection_upgrade = true;
                    } else if !t.is_empty() && !is_fixed_token(t) {
                        f.connection_names = true;
                    }
                }
            }
        } else if name == header::HOST {
            f.host = true;
        } else if name == header::EXPECT {
            f.expect = true;
        } else if *name == X_FORWARDED_FOR {
            f.forwarded_for = true;
        } else if *name == X_REQUEST_ID {
            f.request_ids = f.request_ids.saturating_add(1).min(2);
            f.request_id_usable = f.request_ids == 1 && is_usable_request_id(value.as_bytes());
        } else if is_vmesh(name) {
            f.vmesh = true;
        }
    }
    f
}

/// Whether a `Connection` token names one of [`fixed_hop_by_hop`] (case-insensitively; the
/// length picks the candidates).
fn is_fixed_token(t: &[u8]) -> bool {
    let names: &[&[u8]] = match t.len() {
        2 => &[b"te"],
        7 => &[b"trailer", b"upgrade"],
        10 => &[b"connection", b"keep-alive"],
        16 => &[b"proxy-connection"],
        17 => &[b"transfer-encoding"],
        _ => return false,
    };
    names.iter().any(|n| n.eq_ignore_ascii_case(t))
}

/// Removes hop-by-hop headers, including those named by `Connection`, as [`scan`] found them in
/// `h` (`fields`): only those present are removed, so a message without any costs nothing
/// more. With `keep_upgrade` the `Upgrade` header and a `Connection: upgrade` survive (a
/// WebSocket handshake). Whether the message asked for `TE: trailers` (gRPC needs it
/// forwarded) is `fields.te_trailers`.
pub fn strip_hop_by_hop(h: &mut HeaderMap, keep_upgrade: bool, fields: &Fields) {
    let fixed = fixed_hop_by_hop();
    if fields.connection_names {
        // Tokens listed in Connection are hop-by-hop too (the fixed ones are handled below).
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|&b| b == b',').map(<[u8]>::trim_ascii))
            .filter(|t| !t.is_empty() && !is_fixed_token(t))
            .filter_map(|t| HeaderName::from_bytes(t).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
    }
    for (i, name) in fixed.iter().enumerate() {
        if keep_upgrade && (*name == header::UPGRADE || *name == header::CONNECTION) {
            continue;
        }
        if fields.hop & (1 << i) != 0 {
            h.remove(*name);
        }
    }
    if keep_upgrade {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
}

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

/// Sets `x-forwarded-for` for the next hop. From a `trusted` client (`[proxy]
/// trust_forwarded_for`) the chain it sent (`fields.forwarded_for`: one was sent) is kept, every
/// `x-forwarded-for` line of it in order, and its address appended; from any other client, or
/// without a chain, the chain is the client's address alone (no lookup), so an app that reads
/// the leftmost entry gets an address vmesh saw, not one a caller wrote.
pub fn set_forwarded_for(h: &mut HeaderMap, client: &HeaderValue, trusted: bool, fields: &Fields) {
    if !(trusted && fields.forwarded_for) {
        h.insert(X_FORWARDED_FOR.clone(), client.clone());
        return;
    }
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
/// one in its place (whether the client's is usable is `fields.request_id_usable`, from
/// [`scan`]). With `copy`, a fresh id is also returned (for the access log: no lookup after).
pub fn ensure_request_id(h: &mut HeaderMap, fields: &Fields, copy: bool) -> Option<HeaderValue> {
    if fields.request_id_usable {
        return None;
    }
    let id = new_request_id();
    let fresh = copy.then(|| id.clone());
    h.insert(X_REQUEST_ID.clone(), id);
    fresh
}

fn is_usable_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID).contains(&id.len()) && id.iter().all(|b| (b'!'..=b'~').contains(b))
}

/// vmesh's own header namespace: `x-vmesh-error` and `x-vmesh-fallback` on the answers it
/// makes, the colour header on requests.
const VMESH_PREFIX: &str = "x-vmesh-";

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
    // The id's bytes share a per-thread slab (one allocation per ~56 ids instead of one per
    // id; a slab is freed once its last id is). Hex digits and dashes are valid header bytes.
    let bytes = ID_SLAB.with(|slab| {
        let mut slab = slab.borrow_mut();
        if slab.capacity() - slab.len() < out.len() {
            *slab = BytesMut::with_capacity(ID_SLAB_BYTES);
        }
        slab.extend_from_slice(&out);
        slab.split().freeze()
    });
    HeaderValue::from_maybe_shared(bytes).unwrap_or_else(|_| HeaderValue::from_static("invalid"))
}

/// The size of a request-id slab: 56 ids.
const ID_SLAB_BYTES: usize = 36 * 56;

thread_local! {
    static ID_SLAB: RefCell<BytesMut> = RefCell::new(BytesMut::new());
}

#[cfg(test)]
mod tests;
