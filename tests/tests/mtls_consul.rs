//! Mutual TLS with certificates from Consul Connect's CA (`tls.source = "consul"`, issue 11 item
//! 1's option), against the Consul double: the test is the CA (tests/src/pki.rs) and hands the
//! double the roots and each service's leaf (URI SAN
//! `spiffe://<td>/ns/default/dc/dc1/svc/<service>`), which the sidecars fetch through their
//! Consul client with blocking queries. Two sidecars carry requests in mutual TLS with the
//! caller's Connect identity in `x-vmesh-caller`; a leaf rotated in Consul is picked up under
//! keep-alive load with no failed request; a caller refuses a callee whose Connect leaf names
//! another service; a `tls.trust_domain` that is not Consul's refuses the material. The double's
//! two Connect endpoints are checked on their own first.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use toml::Table;
use vmesh_tests::consul::{consul_index, ConsulDouble};
use vmesh_tests::lifecycle::{self, Identity};
use vmesh_tests::pki::{leaf_serial, s_client, Leaf, Pki};
use vmesh_tests::{
    eventually, h2load, tools, Agent, AgentBuilder, Curl, Inbound, Outbound, RunningUpstream, Upstream, DEFAULT_WAIT,
};

/// The trust domain of the test's Connect CA, shaped like Consul's (`<cluster id>.consul`).
const TD: &str = "11111111-2222-3333-4444-555555555555.consul";

/// A Connect CA (the test's) behind a Consul double, and the sidecars' identity files.
struct Connect {
    dir: tempfile::TempDir,
    pki: Pki,
    consul: ConsulDouble,
}

impl Connect {
    /// A double with the CA's roots handed to it.
    fn new() -> Connect {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(dir.path(), "Consul CA 7");
        let consul = ConsulDouble::spawn();
        let c = Connect { dir, pki, consul };
        let root = std::fs::read_to_string(c.pki.ca()).expect("read the CA");
        let body = serde_json::json!({"TrustDomain": TD, "Roots": [{"RootCert": root}]});
        c.control_put("connect-roots", &body);
        c
    }

    fn control_put(&self, what: &str, body: &serde_json::Value) {
        self.consul
            .request("PUT", &format!("/_double/{what}"))
            .body(&body.to_string())
            .run()
            .expect_status(200);
    }

    /// A leaf for `service` as Consul issues it: the Connect URI SAN only (no DNS name, no IP).
    fn issue(&self, file: &str, service: &str) -> Leaf {
        self.pki.issue(file, &[&format!("URI:{}", uri(service))])
    }

    /// Hands the double `leaf` as the Connect leaf of `service` (a rotation when it had one).
    fn hand_leaf(&self, service: &str, leaf: &Leaf) {
        let read = |p: &Path| std::fs::read_to_string(p).expect("read PEM");
        let (after, before) = validity(&leaf.cert);
        let body = serde_json::json!({
            "CertPEM": read(&leaf.cert),
            "PrivateKeyPEM": read(&leaf.key),
            "SerialNumber": consul_serial(&leaf.serial()),
            "ValidAfter": after,
            "ValidBefore": before,
        });
        self.control_put(&format!("connect-leaf?service={service}"), &body);
    }

    /// A sidecar of `service` (node `node`, identity from a CMDB file, registered in the double)
    /// with `tls.source = "consul"`, its inbound listener in `mode` in front of `app`.
    fn sidecar(&self, node: &str, service: &str, app: SocketAddr, mode: &str) -> AgentBuilder {
        let dir = self.dir.path().join(node);
        std::fs::create_dir_all(&dir).expect("mkdir");
        let identity = Identity::orders().set("service", service).write_in(&dir);
        let inbound = Inbound::new(app, "http")
            .health("/healthz", "500ms")
            .ramp("0s")
            .set("mode", mode);
        let builder = lifecycle::instance(node, &identity, app, "0s").inbound(inbound);
        lifecycle::consul(builder, &self.consul).tls(tls_consul())
    }

    /// `openssl s_client` arguments presenting `probe` (a mesh certificate) and trusting the CA.
    fn probe_args(&self, probe: &Leaf) -> Vec<String> {
        vec![
            "-CAfile".into(),
            self.pki.ca().display().to_string(),
            "-cert".into(),
            probe.cert.display().to_string(),
            "-key".into(),
            probe.key.display().to_string(),
            "-showcerts".into(),
        ]
    }
}

/// `[tls] source = "consul"`; a leaf past its refresh point is asked for every 200 ms.
impl Connect {
    /// The callee "orders" (inbound strict, presenting `orders_leaf` in front of `app`) and the
    /// caller "web" (inbound permissive so that its certificate shows, outbound "orders" in
    /// strict mode), both with their leaves from the double and presenting them; and a probe
    /// identity to look with.
    fn pair(&self, orders_leaf: &Leaf, app: SocketAddr) -> (Agent, Agent, RunningUpstream, Leaf) {
        let web_leaf = self.issue("web-1", "web");
        self.hand_leaf("web", &web_leaf);
        let orders = self.sidecar("orders-01", "orders", app, "strict").start();
        let front = Upstream::python("front").spawn();
        let web = self
            .sidecar("web-01", "web", front.addr(), "permissive")
            .outbound(
                Outbound::new("orders")
                    .endpoint(orders.inbound_addr())
                    .set("mode", "strict"),
            )
            .start();
        let probe = self.issue("probe", "probe");
        wait_for_serial(
            self,
            orders.inbound_addr(),
            &probe,
            &orders_leaf.serial(),
            "the callee to present its Connect leaf",
        );
        wait_for_serial(
            self,
            web.inbound_addr(),
            &probe,
            &web_leaf.serial(),
            "the caller to present its Connect leaf",
        );
        (orders, web, front, probe)
    }
}

fn tls_consul() -> Table {
    let mut tls = Table::new();
    tls.insert("source".into(), "consul".into());
    tls.insert("reload_interval".into(), "200ms".into());
    tls
}

fn uri(service: &str) -> String {
    format!("spiffe://{TD}/ns/default/dc/dc1/svc/{service}")
}

/// `3F2A...` (openssl) as Consul writes serials: `3f:2a:...`.
fn consul_serial(hex: &str) -> String {
    hex.as_bytes()
        .chunks(2)
        .map(|c| String::from_utf8_lossy(c).to_lowercase())
        .collect::<Vec<_>>()
        .join(":")
}

/// The certificate's notBefore and notAfter in RFC 3339, as Consul's ValidAfter and ValidBefore.
fn validity(cert: &Path) -> (String, String) {
    let out = Command::new(tools::require("openssl"))
        .args(["x509", "-noout", "-dates", "-dateopt", "iso_8601", "-in"])
        .arg(cert)
        .output()
        .expect("run openssl x509 -dates");
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .replacen(' ', "T", 1)
    };
    (field("notBefore="), field("notAfter="))
}

/// The caller's completed requests to "orders", whatever their class.
fn outbound_requests(caller: &Agent) -> f64 {
    caller
        .metrics_text()
        .lines()
        .filter(|l| l.starts_with(r#"vmesh_requests_total{direction="outbound",service="orders""#))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until the TLS listener at `addr` presents the certificate with `serial`: the
/// material from Consul is in force.
fn wait_for_serial(connect: &Connect, addr: SocketAddr, probe: &Leaf, serial: &str, what: &str) {
    let args = connect.probe_args(probe);
    eventually(DEFAULT_WAIT, what, || {
        let out = s_client(addr, &args);
        match leaf_serial(&out) {
            Some(s) if s == serial => Ok(()),
            Some(s) => Err(format!("presents serial {s}")),
            None => Err(format!("no certificate presented:\n{out}")),
        }
    });
}

#[test]
fn the_consul_double_serves_connect_roots_and_leaves_with_blocking_queries() {
    let connect = Connect::new();
    let consul = &connect.consul;
    let roots = consul.get("/v1/agent/connect/ca/roots");
    roots.expect_status(200);
    let body = roots.json();
    assert_eq!(body["TrustDomain"], TD, "{body}");
    assert_eq!(body["Roots"][0]["Active"], true, "{body}");
    assert_eq!(body["ActiveRootID"], body["Roots"][0]["ID"], "{body}");
    assert!(body["Roots"][0]["RootCert"]
        .as_str()
        .is_some_and(|p| p.starts_with("-----BEGIN CERTIFICATE-----")));

    // No leaf handed for the service yet: 500, as a Consul that cannot sign.
    assert_eq!(consul.get("/v1/agent/connect/ca/leaf/web").status, 500);
    let first = connect.issue("web-1", "web");
    connect.hand_leaf("web", &first);
    let leaf = consul.get("/v1/agent/connect/ca/leaf/web");
    leaf.expect_status(200);
    let index = consul_index(&leaf);
    let body = leaf.json();
    assert_eq!(body["Service"], "web");
    assert_eq!(body["ServiceURI"], uri("web").as_str());
    assert_eq!(body["SerialNumber"], consul_serial(&first.serial()).as_str());
    assert_eq!(body["ModifyIndex"], index);
    assert!(body["ValidBefore"].as_str().is_some_and(|t| t.ends_with('Z')), "{body}");

    // A blocking query on the current index waits out its `wait` and answers the same leaf.
    let started = Instant::now();
    let same = consul.get(&format!("/v1/agent/connect/ca/leaf/web?index={index}&wait=1s"));
    assert!(started.elapsed() >= Duration::from_millis(900), "did not block");
    assert_eq!(consul_index(&same), index);
    // A rotation wakes a blocked query of that service, not of another one.
    let url = consul.url(&format!("/v1/agent/connect/ca/leaf/web?index={index}&wait=30s"));
    let blocked = std::thread::spawn(move || Curl::get(url).run());
    eventually(DEFAULT_WAIT, "the blocking leaf query to arrive", || {
        match consul.arrived("connect_leaf") {
            n if n >= 4 => Ok(()),
            n => Err(format!("{n} leaf queries arrived")),
        }
    });
    let second = connect.issue("web-2", "web");
    connect.hand_leaf("web", &second);
    let woken = blocked.join().expect("blocked query");
    woken.expect_status(200);
    assert!(consul_index(&woken) > index, "{woken}");
    assert_eq!(woken.json()["SerialNumber"], consul_serial(&second.serial()).as_str());
}

#[test]
fn two_sidecars_carry_requests_in_mutual_tls_with_certificates_from_consul_connect() {
    let connect = Connect::new();
    let orders_leaf = connect.issue("orders-1", "orders");
    connect.hand_leaf("orders", &orders_leaf);
    let app = Upstream::python("app").spawn();
    let (orders, web, _front, _probe) = connect.pair(&orders_leaf, app.addr());

    let r = Curl::get(web.outbound_url("orders", "/connect")).run();
    r.expect_status(200);
    assert_eq!(r.header("x-upstream-name"), Some("app"), "{}", r.verbose);
    assert_eq!(
        r.json()["headers"]["x-vmesh-caller"],
        uri("web").as_str(),
        "{}",
        r.text()
    );
    let line = eventually(DEFAULT_WAIT, "the callee's access-log line of /connect", || {
        orders
            .access_log()
            .into_iter()
            .find(|l| l["path"] == "/connect")
            .ok_or_else(|| orders.stdout())
    });
    assert_eq!(line["caller"], uri("web").as_str(), "{line}");
    // Both leaves and the roots came from the Connect endpoints, with the agents' token rules.
    assert!(connect.consul.arrived("connect_leaf") >= 2);
    assert!(connect.consul.arrived("connect_roots") >= 2);
    // A client with a certificate of another CA is refused by the strict callee.
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other = Pki::new(other_dir.path(), "other-ca").issue("web", &[&format!("URI:{}", uri("web"))]);
    let foreign = s_client(orders.inbound_addr(), &connect.probe_args(&other));
    assert!(
        !foreign.contains(" 200 OK"),
        "served another CA's certificate:\n{foreign}"
    );
}

#[test]
fn a_leaf_rotated_in_consul_is_picked_up_under_keep_alive_load_without_a_failed_request() {
    let connect = Connect::new();
    let first = connect.issue("orders-v1", "orders");
    connect.hand_leaf("orders", &first);
    let app = Upstream::nginx("app").spawn();
    let (orders, web, _front, probe) = connect.pair(&first, app.addr());
    Curl::get(web.outbound_url("orders", "/warm")).run().expect_status(200);

    // Steady keep-alive load through both sidecars, bounded in time (12 s) and connections.
    let url = web.outbound_url("orders", "/");
    let load = std::thread::spawn(move || h2load(&url, &["--h1", "-c", "4", "-D", "12"]));
    let before = outbound_requests(&web);
    eventually(
        DEFAULT_WAIT,
        "the load to flow through both sidecars",
        || match outbound_requests(&web) {
            n if n >= before + 50.0 => Ok(()),
            n => Err(format!("{n} requests, {before} before the load")),
        },
    );
    let second = connect.issue("orders-v2", "orders");
    connect.hand_leaf("orders", &second);
    wait_for_serial(
        &connect,
        orders.inbound_addr(),
        &probe,
        &second.serial(),
        "new handshakes to present the rotated leaf",
    );
    assert!(!load.is_finished(), "the rotation was seen only after the load ended");
    let summary = load.join().expect("h2load thread");
    assert!(summary.succeeded > 100, "{}", summary.output);
    assert_eq!(summary.failed, 0, "{}", summary.output);
    assert_eq!(summary.status_2xx, summary.succeeded, "{}", summary.output);
    assert_eq!(
        orders.metric(r#"vmesh_tls_reloads_total{result="ok"}"#),
        Some(1.0),
        "{}",
        orders.stderr()
    );
    assert_eq!(
        orders
            .metric(r#"vmesh_tls_reloads_total{result="failed"}"#)
            .unwrap_or(0.0),
        0.0,
        "{}",
        orders.stderr()
    );
}

#[test]
fn a_caller_refuses_a_callee_whose_connect_leaf_names_another_service() {
    let connect = Connect::new();
    let billing_leaf = connect.issue("billing-1", "billing");
    connect.hand_leaf("billing", &billing_leaf);
    let web_leaf = connect.issue("web-1", "web");
    connect.hand_leaf("web", &web_leaf);
    let app = Upstream::python("app").spawn();
    // The endpoint "orders" is dialled at is a sidecar of billing.
    let billing = connect.sidecar("billing-01", "billing", app.addr(), "strict").start();
    let front = Upstream::python("front").spawn();
    let web = connect
        .sidecar("web-01", "web", front.addr(), "permissive")
        .outbound(
            Outbound::new("orders")
                .endpoint(billing.inbound_addr())
                .set("mode", "strict"),
        )
        .start();
    let probe = connect.issue("probe", "probe");
    wait_for_serial(
        &connect,
        billing.inbound_addr(),
        &probe,
        &billing_leaf.serial(),
        "the callee to present its leaf",
    );
    wait_for_serial(
        &connect,
        web.inbound_addr(),
        &probe,
        &web_leaf.serial(),
        "the caller to present its leaf",
    );
    let r = Curl::get(web.outbound_url("orders", "/")).run();
    assert_eq!(r.status, 502, "{}", r.verbose);
    assert_eq!(r.header("x-vmesh-error"), Some("UPSTREAM_IDENTITY_MISMATCH"));
    assert_eq!(
        web.metric(
            r#"vmesh_proxy_errors_total{direction="outbound",service="orders",code="UPSTREAM_IDENTITY_MISMATCH"}"#
        ),
        Some(1.0)
    );
    // Nothing reached the app but the probes' requests.
    let reached: Vec<_> = billing
        .access_log()
        .into_iter()
        .filter(|l| l["path"] != "/s-client")
        .collect();
    assert!(reached.is_empty(), "{reached:?}");
}

#[test]
fn a_trust_domain_other_than_consuls_refuses_the_material() {
    let connect = Connect::new();
    connect.hand_leaf("orders", &connect.issue("orders-1", "orders"));
    let app = Upstream::python("app").spawn();
    let mut tls = tls_consul();
    tls.insert("trust_domain".into(), "corp.example".into());
    let orders: Agent = connect
        .sidecar("orders-01", "orders", app.addr(), "strict")
        .tls(tls)
        .start();
    eventually(DEFAULT_WAIT, "the refusal to be counted", || {
        match orders.metric(r#"vmesh_tls_reloads_total{result="failed"}"#) {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let log = orders.stderr();
    assert!(log.contains("TLS_MATERIAL_INVALID"), "{log}");
    let why = format!("tls.trust_domain is \"corp.example\" but Consul's CA names the trust domain \"{TD}\"");
    assert!(log.contains(&why), "{log}");
    // Nothing is in force: the strict listener presents no certificate.
    let probe = connect.issue("probe", "probe");
    let out = s_client(orders.inbound_addr(), &connect.probe_args(&probe));
    assert_eq!(leaf_serial(&out), None, "{out}");
}
