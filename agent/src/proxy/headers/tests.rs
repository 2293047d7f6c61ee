//! Tests of header rewriting.

use super::*;

/// The request path's steps, each after one scan of the head as it is now.
fn strip(h: &mut HeaderMap, keep_upgrade: bool) -> bool {
    let f = scan(h);
    strip_hop_by_hop(h, keep_upgrade, &f);
    f.te_trailers
}

fn forwarded(h: &mut HeaderMap, client: &HeaderValue, trusted: bool) {
    let f = scan(h);
    set_forwarded_for(h, client, trusted, &f);
}

fn ensure(h: &mut HeaderMap) {
    let f = scan(h);
    ensure_request_id(h, &f, false);
}

#[test]
fn a_fresh_request_id_is_returned_only_when_asked_and_a_kept_one_never() {
    let mut h = HeaderMap::new();
    let f = scan(&h);
    let copy = ensure_request_id(&mut h, &f, true).expect("a fresh id, copied");
    assert_eq!(h.get(&X_REQUEST_ID), Some(&copy));
    let mut none = HeaderMap::new();
    let f = scan(&none);
    assert!(ensure_request_id(&mut none, &f, false).is_none());
    assert!(none.contains_key(&X_REQUEST_ID));
    // A usable id of the client's stays, and nothing is returned.
    let f = scan(&h);
    assert!(ensure_request_id(&mut h, &f, true).is_none());
    assert_eq!(h.get(&X_REQUEST_ID), Some(&copy));
}

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
    assert!(strip(&mut h, false));
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
fn every_fixed_name_is_a_fixed_token_in_any_case() {
    for name in fixed_hop_by_hop() {
        assert!(is_fixed_token(name.as_str().as_bytes()), "{name}");
        assert!(is_fixed_token(name.as_str().to_ascii_uppercase().as_bytes()), "{name}");
    }
    for other in ["x-hop", "host", "t", "upgrades", ""] {
        assert!(!is_fixed_token(other.as_bytes()), "{other}");
    }
}

#[test]
fn messages_without_hop_by_hop_headers_are_untouched() {
    let mut h = HeaderMap::new();
    h.insert("host", HeaderValue::from_static("svc"));
    h.append("x-a", HeaderValue::from_static("1"));
    h.append("x-a", HeaderValue::from_static("2"));
    let before = h.clone();
    assert!(!strip(&mut h, false));
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
    assert!(!strip(&mut h, false));
    assert_eq!(h.keys().map(|k| k.as_str()).collect::<Vec<_>>(), ["x-keep"]);
}

#[test]
fn upgrade_handshake_keeps_upgrade() {
    let mut h = HeaderMap::new();
    h.insert("connection", HeaderValue::from_static("Upgrade"));
    h.insert("upgrade", HeaderValue::from_static("websocket"));
    assert!(scan(&h).is_upgrade());
    strip(&mut h, true);
    assert_eq!(h["upgrade"], "websocket");
    assert_eq!(h["connection"], "upgrade");
}

#[test]
fn forwarded_for_appends_to_a_trusted_chain() {
    let mut h = HeaderMap::new();
    let ip = HeaderValue::from_static("127.0.0.1");
    forwarded(&mut h, &ip, true);
    assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1");
    forwarded(&mut h, &HeaderValue::from_static("127.0.0.2"), true);
    assert_eq!(h[&X_FORWARDED_FOR], "127.0.0.1, 127.0.0.2");
}

#[test]
fn forwarded_for_joins_every_line_of_a_trusted_chain() {
    let mut h = HeaderMap::new();
    h.append(&X_FORWARDED_FOR, HeaderValue::from_static("203.0.113.7"));
    h.append(&X_FORWARDED_FOR, HeaderValue::from_static("198.51.100.1, 10.0.0.2"));
    forwarded(&mut h, &HeaderValue::from_static("127.0.0.1"), true);
    let all: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
    assert_eq!(all, ["203.0.113.7, 198.51.100.1, 10.0.0.2, 127.0.0.1"]);
}

#[test]
fn forwarded_for_from_an_untrusted_client_is_its_address_only() {
    let mut h = HeaderMap::new();
    h.append(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
    h.append(&X_FORWARDED_FOR, HeaderValue::from_static("5.6.7.8"));
    forwarded(&mut h, &HeaderValue::from_static("10.1.2.3"), false);
    let all: Vec<_> = h.get_all(&X_FORWARDED_FOR).iter().collect();
    assert_eq!(all, ["10.1.2.3"]);
    let mut none = HeaderMap::new();
    forwarded(&mut none, &HeaderValue::from_static("10.1.2.3"), false);
    assert_eq!(none[&X_FORWARDED_FOR], "10.1.2.3");
}

#[test]
fn request_ids_are_kept_or_made() {
    let mut h = HeaderMap::new();
    ensure(&mut h);
    let id = h[&X_REQUEST_ID].clone();
    assert_eq!(id.len(), 36);
    assert_eq!(id.as_bytes()[14], b'4');
    ensure(&mut h);
    assert_eq!(h[&X_REQUEST_ID], id);
    let mut other = HeaderMap::new();
    ensure(&mut other);
    assert_ne!(other[&X_REQUEST_ID], id);
}

#[test]
fn bad_request_ids_are_replaced() {
    let long = "a".repeat(MAX_REQUEST_ID + 1);
    // Bytes a `HeaderValue` holds (hyper refuses other controls before vmesh sees them).
    let cases: [&[u8]; 8] = [
        b"",
        b"has space",
        b" leading",
        b"tab\there",
        b"caf\xc3\xa9",
        b"\x80\xff",
        long.as_bytes(),
        &[b'x'; 10 << 10],
    ];
    for bad in cases {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_bytes(bad).unwrap());
        ensure(&mut h);
        let ids: Vec<_> = h.get_all(&X_REQUEST_ID).iter().collect();
        assert_eq!(ids.len(), 1, "{bad:?}");
        assert_eq!(ids[0].len(), 36, "{bad:?} -> {:?}", ids[0]);
        assert_ne!(ids[0].as_bytes(), bad);
    }
}

#[test]
fn good_request_ids_are_kept() {
    let longest = "Z".repeat(MAX_REQUEST_ID);
    for good in [
        "1",
        "test-rid-0042",
        "Root=1-67891233-abcdef012345678912345678;Parent=53995c3f42cd8ad8;Sampled=1",
        "!~{}[]\"'",
        longest.as_str(),
    ] {
        let mut h = HeaderMap::new();
        h.insert(&X_REQUEST_ID, HeaderValue::from_str(good).unwrap());
        ensure(&mut h);
        assert_eq!(h[&X_REQUEST_ID], good);
    }
}

#[test]
fn two_request_ids_become_one_fresh_one() {
    let mut h = HeaderMap::new();
    h.append(&X_REQUEST_ID, HeaderValue::from_static("a"));
    h.append(&X_REQUEST_ID, HeaderValue::from_static("b"));
    ensure(&mut h);
    let ids: Vec<_> = h.get_all(&X_REQUEST_ID).iter().collect();
    assert_eq!(ids.len(), 1);
    assert_eq!(ids[0].len(), 36);
}

#[test]
fn vmesh_headers_are_stripped_unless_kept() {
    let mut h = HeaderMap::new();
    h.insert("x-vmesh-error", HeaderValue::from_static("CIRCUIT_OPEN"));
    h.insert("x-vmesh-fallback", HeaderValue::from_static("1"));
    h.append("x-vmesh-colour", HeaderValue::from_static("blue"));
    h.append("x-vmesh-colour", HeaderValue::from_static("green"));
    h.insert("x-vmeshy", HeaderValue::from_static("not ours"));
    h.insert("x-other", HeaderValue::from_static("kept"));
    assert!(scan(&h).vmesh);
    strip_vmesh(&mut h, |n| n == "x-vmesh-colour");
    let mut names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["x-other", "x-vmesh-colour", "x-vmeshy"]);
    assert_eq!(h.get_all("x-vmesh-colour").iter().count(), 2);
    strip_vmesh(&mut h, |_| false);
    assert!(!scan(&h).vmesh);
    assert_eq!(h.len(), 2);
}

proptest::proptest! {
    /// Whatever a client sends as `x-request-id`, one id goes upstream, and it is usable:
    /// the client's own when it already was.
    #[test]
    fn any_request_id_leaves_one_usable_id(
        ids in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 0..300), 0..3),
    ) {
        let mut h = HeaderMap::new();
        for id in &ids {
            if let Ok(v) = HeaderValue::from_bytes(id) {
                h.append(&X_REQUEST_ID, v);
            }
        }
        let sent: Vec<HeaderValue> = h.get_all(&X_REQUEST_ID).iter().cloned().collect();
        ensure(&mut h);
        let out: Vec<_> = h.get_all(&X_REQUEST_ID).iter().collect();
        proptest::prop_assert_eq!(out.len(), 1);
        proptest::prop_assert!(is_usable_request_id(out[0].as_bytes()), "{:?}", out[0]);
        if sent.len() == 1 && is_usable_request_id(sent[0].as_bytes()) {
            proptest::prop_assert_eq!(out[0], &sent[0]);
        }
    }
}

#[test]
fn only_listed_upgrade_protocols_are_allowed() {
    let allowed = vec!["websocket".to_owned()];
    for (upgrade, ok) in [
        ("websocket", true),
        ("WebSocket", true),
        ("websocket/13", true),
        ("h2c", false),
        ("h2c, websocket", false),
        ("", false),
    ] {
        let mut h = HeaderMap::new();
        h.insert(
            header::UPGRADE,
            HeaderValue::from_str(upgrade).unwrap_or_else(|e| panic!("{e}")),
        );
        assert_eq!(upgrade_allowed(&h, &allowed), ok, "{upgrade:?}");
    }
    assert!(!upgrade_allowed(&HeaderMap::new(), &allowed), "no Upgrade header");
}

#[test]
fn one_scan_finds_the_fields_the_request_path_acts_on() {
    let f = scan(&headers(&[("host", "a")]));
    assert!(f.host && !f.expect && !f.forwarded_for && !f.vmesh && !f.is_upgrade());
    assert_eq!((f.request_ids, f.request_id_usable), (0, false));

    let f = scan(&headers(&[
        ("expect", "100-continue"),
        ("x-forwarded-for", "1.2.3.4"),
        ("x-request-id", "abc"),
        ("x-vmesh-colour", "blue"),
        ("connection", "Upgrade, x-hop"),
        ("upgrade", "websocket"),
        ("te", "trailers"),
    ]));
    assert!(f.expect && f.forwarded_for && f.vmesh && f.is_upgrade() && f.te_trailers && !f.host);
    assert_eq!((f.request_ids, f.request_id_usable), (1, true));

    // Two ids, or one with a space, are not kept.
    let f = scan(&headers(&[("x-request-id", "a"), ("x-request-id", "b")]));
    assert_eq!((f.request_ids, f.request_id_usable), (2, false));
    assert!(!scan(&headers(&[("x-request-id", "a b")])).request_id_usable);
    // `Upgrade` without `Connection: upgrade` is no upgrade.
    assert!(!scan(&headers(&[("upgrade", "websocket")])).is_upgrade());
}

#[test]
fn a_scanned_strip_removes_what_the_scan_found_and_nothing_else() {
    let mut h = headers(&[
        ("connection", "keep-alive, x-hop"),
        ("keep-alive", "timeout=5"),
        ("x-hop", "1"),
        ("x-keep", "1"),
    ]);
    let f = scan(&h);
    strip_hop_by_hop(&mut h, false, &f);
    let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
    assert_eq!(left, ["x-keep"]);
}

fn headers(fields: &[(&'static str, &'static str)]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for (n, v) in fields {
        h.append(*n, HeaderValue::from_static(v));
    }
    h
}

#[test]
fn fresh_request_ids_are_distinct_uuids_across_slabs() {
    // More ids than one slab holds: every one is a version-4 UUID and none repeats.
    let ids: Vec<HeaderValue> = (0..200).map(|_| new_request_id()).collect();
    let distinct: std::collections::HashSet<&[u8]> = ids.iter().map(HeaderValue::as_bytes).collect();
    assert_eq!(distinct.len(), ids.len());
    for id in &ids {
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36, "{s}");
        assert_eq!(&s[14..15], "4", "{s}");
        assert!(s.chars().all(|c| c == '-' || c.is_ascii_hexdigit()), "{s}");
    }
}
