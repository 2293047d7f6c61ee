//! Header hygiene through the real agent: no upstream and no client can speak for vmesh
//! (`x-vmesh-*`), `x-forwarded-for` follows `[proxy] trust_forwarded_for`, and a client's
//! `x-request-id` goes upstream only when it is a usable id.

use vmesh_tests::{free_addr, Agent, AgentBuilder, Curl, CurlResponse, Inbound, Outbound, RunningUpstream, Upstream};

/// One Python app behind an inbound listener and an outbound service `orders`.
fn agent_with_app(builder: AgentBuilder) -> (Agent, RunningUpstream) {
    let app = Upstream::python("app").spawn();
    let agent = builder
        .inbound(Inbound::new(app.addr(), "http"))
        .outbound(Outbound::new("orders").endpoint(app.addr()))
        .start();
    (agent, app)
}

/// The outbound and inbound URLs of `path`, labelled.
fn both_directions(agent: &Agent, path: &str) -> [(&'static str, String); 2] {
    [
        ("outbound", agent.outbound_url("orders", path)),
        ("inbound", agent.inbound_url(path)),
    ]
}

/// Every value of the request header `name` as the app received it, one per header line.
fn lines_seen(r: &CurlResponse, name: &str) -> Vec<String> {
    let doc = r.json();
    doc["header_list"]
        .as_array()
        .unwrap_or_else(|| panic!("no header_list in {doc}"))
        .iter()
        .filter(|kv| kv[0].as_str().is_some_and(|k| k.eq_ignore_ascii_case(name)))
        .map(|kv| kv[1].as_str().unwrap_or_default().to_string())
        .collect()
}

fn is_uuid_v4(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 36
        && b.iter().enumerate().all(|(i, c)| match i {
            8 | 13 | 18 | 23 => *c == b'-',
            14 => *c == b'4',
            _ => c.is_ascii_hexdigit(),
        })
}

#[test]
fn an_upstreams_vmesh_headers_do_not_reach_the_client() {
    let (agent, _app) = agent_with_app(Agent::builder());
    let path = "/respond?status=503&header=x-vmesh-error:CIRCUIT_OPEN&header=x-vmesh-fallback:1\
                &header=X-Vmesh-Whatever:x&header=x-app-header:kept";
    for (direction, url) in both_directions(&agent, path) {
        for http2 in [false, true] {
            let curl = Curl::get(url.clone());
            let r = if http2 { curl.http2() } else { curl }.run();
            // The app's own 503, as the app sent it, but without the headers that would make it
            // look like the proxy's CIRCUIT_OPEN (or a fallback).
            r.expect_status(503);
            assert_eq!(r.header("x-upstream-name"), Some("app"), "{direction}: {r}");
            assert_eq!(r.header("x-app-header"), Some("kept"), "{direction}: {r}");
            let vmesh: Vec<_> = r.headers.iter().filter(|(k, _)| k.starts_with("x-vmesh-")).collect();
            assert!(
                vmesh.is_empty(),
                "{direction} (h2: {http2}): {vmesh:?} reached the client: {r}"
            );
        }
    }
    // The agent counted no CIRCUIT_OPEN of its own.
    let metrics = agent.admin_get("/metrics").text();
    assert!(!metrics.contains("code=\"CIRCUIT_OPEN\""), "{metrics}");
}

/// The fields of an HTTP/1.1 upstream's response go to the client as they came (names in their
/// case) without the ones that describe the upstream's connection: the fixed hop-by-hop ones
/// and, when its `Connection` names more, those too. (Over HTTP/2, hyper's server drops the
/// connection-specific fields itself but for `Trailer`: that one shows the map made for an
/// HTTP/2 client is filtered; `an_upstreams_vmesh_headers_do_not_reach_the_client` shows it
/// for `x-vmesh-*`.)
#[test]
fn an_upstreams_hop_by_hop_fields_do_not_reach_the_client() {
    let (agent, _app) = agent_with_app(Agent::builder());
    let fixed = "header=Keep-Alive:timeout=5&header=Proxy-Connection:keep-alive&header=Upgrade:foo/1\
                 &header=Trailer:x-t&header=TE:trailers&header=X-App-Header:kept";
    let cases = [
        // The fields kept as they came, written to the client from there.
        (
            format!("/respond?{fixed}"),
            vec!["keep-alive", "proxy-connection", "upgrade", "trailer", "te"],
        ),
        // A `Connection` field naming another field: the fields go through the header map.
        (
            format!("/respond?{fixed}&header=Connection:X-App-Secret&header=X-App-Secret:s"),
            vec![
                "keep-alive",
                "proxy-connection",
                "upgrade",
                "trailer",
                "te",
                "x-app-secret",
                "connection",
            ],
        ),
    ];
    for (path, dropped) in &cases {
        for (direction, url) in both_directions(&agent, path) {
            for http2 in [false, true] {
                let curl = Curl::get(url.clone());
                let r = if http2 { curl.http2() } else { curl }.run();
                r.expect_status(200);
                assert_eq!(r.header("x-app-header"), Some("kept"), "{direction} (h2: {http2}): {r}");
                assert_eq!(
                    r.header("x-upstream-name"),
                    Some("app"),
                    "{direction} (h2: {http2}): {r}"
                );
                for name in dropped {
                    assert!(
                        r.header(name).is_none(),
                        "{direction} (h2: {http2}): the upstream's `{name}` reached the client: {r}"
                    );
                }
            }
        }
    }
}

#[test]
fn the_agents_own_errors_still_carry_their_code() {
    let dead = free_addr();
    let agent = Agent::builder().outbound(Outbound::new("gone").endpoint(dead)).start();
    let r = Curl::get(agent.outbound_url("gone", "/")).run();
    assert_eq!(r.status, 502, "{r}");
    assert_eq!(r.header("x-vmesh-error"), Some("UPSTREAM_CONNECT_FAILED"), "{r}");
}

#[test]
fn a_clients_vmesh_headers_reach_the_app_only_when_vmesh_reads_them() {
    let (agent, _app) = agent_with_app(Agent::builder());
    for (direction, url) in both_directions(&agent, "/echo-headers") {
        let r = Curl::get(url)
            .header("x-vmesh-error: CIRCUIT_OPEN")
            .header("x-vmesh-fallback: 1")
            .header("x-vmesh-whatever: x")
            .header("x-vmesh-colour: blue")
            .run();
        r.expect_status(200);
        let seen = &r.json()["headers"];
        for gone in ["x-vmesh-error", "x-vmesh-fallback", "x-vmesh-whatever"] {
            assert!(seen.get(gone).is_none(), "{direction}: {gone} reached the app: {seen}");
        }
        // The colour header is honoured from callers by design: it is how a lane crosses hops.
        assert_eq!(seen["x-vmesh-colour"], "blue", "{direction}: {seen}");
    }
}

/// A client's `Connection` header can name end-to-end fields as hop-by-hop; they are removed,
/// and what the proxy adds in their place is still added: a fresh `x-request-id` for one
/// named so, and the upstream's `Host` for a `Host` named so.
#[test]
fn fields_a_connection_header_names_are_removed_and_replaced() {
    let (agent, _app) = agent_with_app(Agent::builder());
    for (direction, url) in both_directions(&agent, "/conn") {
        let r = Curl::get(url.clone())
            .header("Connection: x-request-id, host")
            .header("X-Request-Id: client-chosen")
            .run();
        r.expect_status(200);
        let ids = lines_seen(&r, "x-request-id");
        assert!(ids.len() == 1 && is_uuid_v4(&ids[0]), "{direction}: {ids:?}");
        let hosts = lines_seen(&r, "host");
        assert_eq!(hosts.len(), 1, "{direction}: {hosts:?}");
    }
}

#[test]
fn bogus_request_ids_are_replaced_and_good_ones_kept() {
    let (agent, _app) = agent_with_app(Agent::builder());
    let huge = "r".repeat(10 << 10);
    let too_long = "r".repeat(129);
    for (direction, url) in both_directions(&agent, "/rid") {
        for bogus in [
            huge.as_str(),
            too_long.as_str(),
            "has space",
            "tab\there",
            "caf\u{e9}-\u{2603}",
        ] {
            let r = Curl::get(url.clone()).header(&format!("X-Request-Id: {bogus}")).run();
            r.expect_status(200);
            let ids = lines_seen(&r, "x-request-id");
            assert_eq!(ids.len(), 1, "{direction}: {ids:?}");
            assert!(
                is_uuid_v4(&ids[0]),
                "{direction}: {:.40}... was not replaced by a fresh id: {:.80}",
                bogus,
                ids[0]
            );
        }
        // Two ids are one too many: one fresh id instead.
        let r = Curl::get(url.clone())
            .header("X-Request-Id: first")
            .header("X-Request-Id: second")
            .run();
        let ids = lines_seen(&r, "x-request-id");
        assert!(ids.len() == 1 && is_uuid_v4(&ids[0]), "{direction}: {ids:?}");

        let longest = "k".repeat(128);
        for good in [
            "test-rid-0042",
            longest.as_str(),
            "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1",
        ] {
            let r = Curl::get(url.clone()).header(&format!("X-Request-Id: {good}")).run();
            assert_eq!(lines_seen(&r, "x-request-id"), [good], "{direction}");
        }
    }
}

#[test]
fn forwarded_for_from_loopback_is_kept_by_default() {
    let (agent, _app) = agent_with_app(Agent::builder());
    for (direction, url) in both_directions(&agent, "/xff") {
        let r = Curl::get(url)
            .header("X-Forwarded-For: 203.0.113.7")
            .header("X-Forwarded-For: 198.51.100.1")
            .run();
        r.expect_status(200);
        // Both lines of the chain, joined in order, and the client (loopback) appended: one line.
        assert_eq!(
            lines_seen(&r, "x-forwarded-for"),
            ["203.0.113.7, 198.51.100.1, 127.0.0.1"],
            "{direction}"
        );
    }
}

#[test]
fn forwarded_for_from_an_untrusted_client_is_replaced() {
    // Only 127.0.0.1 is trusted: a client connecting from 127.0.0.2 stands for a remote caller.
    let (agent, _app) = agent_with_app(Agent::builder().proxy_set("trust_forwarded_for", vec!["127.0.0.1/32"]));
    for (direction, url) in both_directions(&agent, "/xff") {
        let untrusted = Curl::get(url.clone())
            .args(["--interface", "127.0.0.2"])
            .header("X-Forwarded-For: 203.0.113.7")
            .run();
        untrusted.expect_status(200);
        assert_eq!(lines_seen(&untrusted, "x-forwarded-for"), ["127.0.0.2"], "{direction}");

        let trusted = Curl::get(url).header("X-Forwarded-For: 203.0.113.7").run();
        trusted.expect_status(200);
        assert_eq!(
            lines_seen(&trusted, "x-forwarded-for"),
            ["203.0.113.7, 127.0.0.1"],
            "{direction}"
        );
    }
}

#[test]
fn forwarded_for_trusts_nobody_when_told() {
    let (agent, _app) = agent_with_app(Agent::builder().proxy_set("trust_forwarded_for", Vec::<String>::new()));
    for (direction, url) in both_directions(&agent, "/xff") {
        let r = Curl::get(url.clone()).header("X-Forwarded-For: 203.0.113.7").run();
        r.expect_status(200);
        assert_eq!(lines_seen(&r, "x-forwarded-for"), ["127.0.0.1"], "{direction}");
        // Without a chain the header is the client's address, as before.
        let r = Curl::get(url).run();
        assert_eq!(lines_seen(&r, "x-forwarded-for"), ["127.0.0.1"], "{direction}");
    }
}
