use super::*;

fn colouring() -> Colouring {
    Colouring::new(&ColourConfig {
        rules: vec![
            ColourRule {
                colour: "blue".to_owned(),
                header: Some(NameValue {
                    name: "x-user".to_owned(),
                    value: "tester".to_owned(),
                }),
                ..ColourRule::default()
            },
            ColourRule {
                colour: "green".to_owned(),
                cookie: Some(NameValue {
                    name: "lane".to_owned(),
                    value: "green".to_owned(),
                }),
                ..ColourRule::default()
            },
            ColourRule {
                colour: "red".to_owned(),
                query: Some(NameValue {
                    name: "lane".to_owned(),
                    value: "red".to_owned(),
                }),
                caller: Some("10.1.0.0/16".to_owned()),
                ..ColourRule::default()
            },
        ],
        propagate: vec!["x-tenant".to_owned()],
        ..ColourConfig::default()
    })
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn rules_colour_uncoloured_requests() {
    let c = colouring();
    let mut h = HeaderMap::new();
    h.insert("x-user", HeaderValue::from_static("tester"));
    assert_eq!(c.apply(&mut h, None, ip("127.0.0.1"), None).unwrap(), "blue");
    let mut h = HeaderMap::new();
    h.insert("cookie", HeaderValue::from_static("a=b; lane=green"));
    assert_eq!(c.apply(&mut h, None, ip("127.0.0.1"), None).unwrap(), "green");
    let mut h = HeaderMap::new();
    assert_eq!(
        c.apply(&mut h, Some("lane=red"), ip("127.0.0.1"), None),
        None,
        "caller outside the block"
    );
    assert_eq!(c.apply(&mut h, Some("lane=red"), ip("10.1.2.3"), None).unwrap(), "red");
}

#[test]
fn an_existing_colour_wins_and_the_vm_colour_is_the_default() {
    let c = colouring();
    let own = HeaderValue::from_static("lane-7");
    let mut h = HeaderMap::new();
    h.insert("x-vmesh-colour", HeaderValue::from_static("yellow"));
    h.insert("x-user", HeaderValue::from_static("tester"));
    assert_eq!(c.apply(&mut h, None, ip("127.0.0.1"), Some(&own)).unwrap(), "yellow");
    let mut h = HeaderMap::new();
    assert_eq!(c.apply(&mut h, None, ip("127.0.0.1"), Some(&own)).unwrap(), "lane-7");
    assert_eq!(h["x-vmesh-colour"], "lane-7");
}

#[test]
fn headers_travel_from_inbound_to_outbound_by_request_id_or_trace() {
    let c = colouring();
    let p = Propagation::new(c.propagate.clone(), Duration::from_secs(30), 1000);
    let now = Instant::now();
    let mut inbound = HeaderMap::new();
    inbound.insert("x-request-id", HeaderValue::from_static("req-1"));
    inbound.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    );
    inbound.insert("x-vmesh-colour", HeaderValue::from_static("blue"));
    inbound.insert("x-tenant", HeaderValue::from_static("acme"));
    p.remember(&inbound, now);

    let mut by_id = HeaderMap::new();
    by_id.insert("x-request-id", HeaderValue::from_static("req-1"));
    p.restore(&mut by_id, now);
    assert_eq!(
        (&by_id["x-vmesh-colour"], &by_id["x-tenant"]),
        (&HeaderValue::from_static("blue"), &HeaderValue::from_static("acme"))
    );

    let mut by_trace = HeaderMap::new();
    by_trace.insert(
        "traceparent",
        HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-1111111111111111-01"),
    );
    by_trace.insert("x-tenant", HeaderValue::from_static("own"));
    p.restore(&mut by_trace, now);
    assert_eq!(by_trace["x-vmesh-colour"], "blue");
    assert_eq!(by_trace["x-tenant"], "own", "a header the app set is kept");

    let mut late = HeaderMap::new();
    late.insert("x-request-id", HeaderValue::from_static("req-1"));
    p.restore(&mut late, now + Duration::from_secs(31));
    assert!(!late.contains_key("x-vmesh-colour"), "expired");
}

proptest::proptest! {
    /// However many requests pass, the map stays within its bound.
    #[test]
    fn the_map_is_bounded(n in 1usize..3000, max in 16usize..200) {
        let p = Propagation::new(vec![HeaderName::from_static("x-vmesh-colour")], Duration::from_secs(30), max);
        let now = Instant::now();
        for i in 0..n {
            let mut h = HeaderMap::new();
            h.insert("x-request-id", HeaderValue::from_str(&format!("r{i}")).unwrap());
            h.insert("x-vmesh-colour", HeaderValue::from_static("blue"));
            p.remember(&h, now);
        }
        proptest::prop_assert!(p.len() <= max.div_ceil(SHARDS) * SHARDS);
    }
}
