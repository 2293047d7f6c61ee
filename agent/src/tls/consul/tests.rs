//! Unit tests of the Connect follower: times, the refresh point, and which material is refused.
//!
//! `testdata/`: a CA of trust domain `11111111-2222-3333-4444-555555555555.consul` (`ca.pem`),
//! the leaf it issued to `web` (`web.pem`, `web.key`: URI SAN
//! `spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web`, serial
//! 2A), another CA (`other-ca.pem`) and a key of nothing (`stray.key`); EC P-256, valid 100
//! years, made with `openssl req -x509` and `openssl x509 -req` as tests/src/pki.rs does.

use super::*;

fn at(s: &str) -> SystemTime {
    parse_time(s).unwrap_or_else(|| panic!("{s}"))
}

#[test]
fn consul_times_parse_with_z_fractions_and_offsets() {
    let z = at("2018-05-24T16:33:28Z");
    assert_eq!(at("2018-05-24T16:33:28.000000000Z"), z);
    assert_eq!(at("2018-05-24T18:33:28+02:00"), z);
    assert_eq!(at("2018-05-24T11:03:28-05:30"), z);
    for bad in ["", "yesterday", "2018-05-24T16:33:28+2:00", "2018-13-24T16:33:28Z"] {
        assert_eq!(parse_time(bad), None, "{bad}");
    }
}

fn leaf(after: &str, before: &str) -> ConnectLeaf {
    ConnectLeaf {
        serial_number: "01".into(),
        cert_pem: String::new(),
        private_key_pem: String::new(),
        service: "web".into(),
        service_uri: String::new(),
        valid_after: after.into(),
        valid_before: before.into(),
    }
}

#[test]
fn the_refresh_point_is_nine_tenths_of_the_lifetime() {
    let l = leaf("2024-01-01T00:00:00Z", "2024-01-01T10:00:00Z");
    assert_eq!(refresh_point(&l), Some(at("2024-01-01T09:00:00Z")));
    assert_eq!(refresh_point(&leaf("", "2024-01-01T10:00:00Z")), None);
    assert_eq!(
        refresh_point(&leaf("2024-01-02T00:00:00Z", "2024-01-01T00:00:00Z")),
        None,
        "ValidBefore before ValidAfter"
    );
}

#[test]
fn queries_block_until_the_refresh_point_then_ask_afresh() {
    let wait = Duration::from_secs(30);
    let poll = Duration::from_secs(5);
    let now = at("2024-01-01T08:00:00Z");
    // Validity unknown: block the whole wait.
    assert_eq!(next_query(now, None, 7, wait, poll), Query::Block { index: 7, wait });
    // Far from the refresh point: the whole wait.
    let refresh = Some(at("2024-01-01T09:00:00Z"));
    assert_eq!(next_query(now, refresh, 7, wait, poll), Query::Block { index: 7, wait });
    // Ten seconds before it: the query ends by then.
    let near = at("2024-01-01T08:59:50Z");
    assert_eq!(
        next_query(near, refresh, 7, wait, poll),
        Query::Block {
            index: 7,
            wait: Duration::from_secs(10)
        }
    );
    // Never under a second.
    let nearer = at("2024-01-01T08:59:59.900Z");
    assert_eq!(
        next_query(nearer, refresh, 7, wait, poll),
        Query::Block {
            index: 7,
            wait: Duration::from_secs(1)
        }
    );
    // Past it: fresh answers every poll.
    let late = at("2024-01-01T09:00:01Z");
    assert_eq!(next_query(late, refresh, 7, wait, poll), Query::Fresh { pause: poll });
}

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";
const CA: &str = include_str!("testdata/ca.pem");
const OTHER_CA: &str = include_str!("testdata/other-ca.pem");
const WEB_CERT: &str = include_str!("testdata/web.pem");
const WEB_KEY: &str = include_str!("testdata/web.key");
const STRAY_KEY: &str = include_str!("testdata/stray.key");

fn roots(td: &str, pems: &[&str]) -> ConnectRoots {
    ConnectRoots {
        active_root_id: "a".into(),
        trust_domain: td.into(),
        roots: pems
            .iter()
            .enumerate()
            .map(|(i, pem)| crate::registry::consul::ConnectRoot {
                id: format!("root-{i}"),
                root_cert: (*pem).to_owned(),
                intermediate_certs: Vec::new(),
                active: i == 0,
            })
            .collect(),
    }
}

fn web_leaf(key: &str) -> ConnectLeaf {
    ConnectLeaf {
        cert_pem: WEB_CERT.into(),
        private_key_pem: key.into(),
        serial_number: "2a".into(),
        service_uri: format!("spiffe://{TD}/ns/default/dc/dc1/svc/web"),
        ..leaf("", "")
    }
}

fn refusal(config: &TlsConfig, roots: &ConnectRoots, service: &str, leaf: &ConnectLeaf) -> String {
    match material(config, roots, service, leaf) {
        Ok(m) => panic!("accepted: serial {}", m.serial),
        Err(e) => e.to_string(),
    }
}

#[test]
fn a_connect_leaf_and_its_roots_make_material_with_the_consul_identity() {
    let config = TlsConfig {
        source: super::super::TlsSource::Consul,
        ..TlsConfig::default()
    };
    let m = material(&config, &roots(TD, &[CA]), "web", &web_leaf(WEB_KEY)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(m.serial, "2A");
    assert_eq!(&*m.trust_domain, TD, "learned from the roots");
    let own = m.own.unwrap_or_else(|| panic!("no identity"));
    assert_eq!(own.to_string(), format!("spiffe://{TD}/ns/default/dc/dc1/svc/web"));
    // During a CA rotation the roots hold the new root too: still fine.
    assert!(material(&config, &roots(TD, &[OTHER_CA, CA]), "web", &web_leaf(WEB_KEY)).is_ok());
    // A trust domain set to Consul's own is fine.
    let same = TlsConfig {
        trust_domain: Some(TD.into()),
        ..config.clone()
    };
    assert!(material(&same, &roots(TD, &[CA]), "web", &web_leaf(WEB_KEY)).is_ok());
}

#[test]
fn material_that_peers_would_refuse_or_that_names_another_workload_is_refused() {
    let config = TlsConfig {
        source: super::super::TlsSource::Consul,
        ..TlsConfig::default()
    };
    let leaf = web_leaf(WEB_KEY);
    let good = roots(TD, &[CA]);

    let other_td = TlsConfig {
        trust_domain: Some("corp.example".into()),
        ..config.clone()
    };
    let e = refusal(&other_td, &good, "web", &leaf);
    assert!(
        e.contains("tls.trust_domain is \"corp.example\" but Consul's CA names the trust domain"),
        "{e}"
    );

    let e = refusal(&config, &good, "orders", &leaf);
    assert!(e.contains("asked for service \"orders\""), "{e}");

    // Roots of another trust domain than the leaf's URI: the leaf carries no identity of it.
    let e = refusal(&config, &roots("other.consul", &[CA]), "web", &leaf);
    assert!(e.contains("no spiffe:// identity of the trust domain"), "{e}");

    let e = refusal(&config, &roots(TD, &[OTHER_CA]), "web", &leaf);
    assert!(e.contains("does not verify against the CA roots"), "{e}");

    let e = refusal(&config, &roots(TD, &[]), "web", &leaf);
    assert!(e.contains("no certificate"), "{e}");

    let e = refusal(&config, &roots("Bad TD", &[CA]), "web", &leaf);
    assert!(e.contains("is not a trust domain"), "{e}");

    let e = refusal(&config, &good, "web", &web_leaf(STRAY_KEY));
    assert!(e.starts_with("tls:"), "a key that does not match the certificate: {e}");

    let e = refusal(&config, &good, "web", &web_leaf("not a key"));
    assert!(e.contains("no PEM private key"), "{e}");
}
