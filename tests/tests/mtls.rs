//! Mutual TLS between sidecars, workload identity and inbound authorization (issue 11, items
//! 1-3), with real clients: `openssl s_client` and curl with and without client certificates
//! against a strict inbound listener, plaintext on strict and permissive ones, two sidecars
//! carrying HTTP/1.1 and HTTP/2 in mTLS, a callee whose certificate names another service,
//! authorization rules with the caller in the access log and as a rate-limit key, and a
//! certificate rotation under steady keep-alive load.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use toml::{Table, Value};
use vmesh_tests::pki::{leaf_serial, s_client, Leaf, Pki};
use vmesh_tests::{
    eventually, h2load, keep_alive, Agent, AgentBuilder, Curl, CurlResponse, Inbound, Outbound, Upstream, DEFAULT_WAIT,
};

const TD: &str = "mesh.test";

/// A CA in a temporary directory, and the identities it issues.
struct Mesh {
    dir: tempfile::TempDir,
    pki: Pki,
}

impl Mesh {
    fn new() -> Mesh {
        let dir = tempfile::tempdir().expect("tempdir");
        let pki = Pki::new(dir.path(), "mesh-test-ca");
        Mesh { dir, pki }
    }

    /// A leaf for `service` in `prod`, usable as server (127.0.0.1) and client.
    fn leaf(&self, file: &str, service: &str) -> Leaf {
        self.pki.issue(file, &["IP:127.0.0.1", &uri(service)])
    }

    /// `[tls]` for a sidecar presenting `leaf`, rotated files checked every 200 ms.
    fn tls(&self, leaf: &Leaf) -> Table {
        let mut t = Table::new();
        t.insert("trust_domain".into(), TD.into());
        t.insert("cert_file".into(), leaf.cert.display().to_string().into());
        t.insert("key_file".into(), leaf.key.display().to_string().into());
        t.insert("ca_file".into(), self.pki.ca().display().to_string().into());
        t.insert("reload_interval".into(), "200ms".into());
        t
    }
}

fn uri(service: &str) -> String {
    format!("URI:spiffe://{TD}/ns/prod/sa/{service}")
}

fn spiffe(service: &str) -> String {
    format!("spiffe://{TD}/ns/prod/sa/{service}")
}

/// A sidecar of `service` whose inbound listener, in `mode`, fronts `app`.
fn callee(mesh: &Mesh, service: &str, app: SocketAddr, mode: &str, inbound: impl FnOnce(Inbound) -> Inbound) -> Agent {
    let leaf = mesh.leaf(&format!("{service}-sidecar"), service);
    AgentBuilder::new()
        .inbound(inbound(Inbound::new(app, "http").set("mode", mode)))
        .tls(mesh.tls(&leaf))
        .start()
}

/// A sidecar of "web" calling `service` at `endpoint` in mutual TLS over `protocol`.
fn caller(mesh: &Mesh, service: &str, endpoint: SocketAddr, protocol: &str) -> Agent {
    let leaf = mesh.leaf("web-sidecar", "web");
    AgentBuilder::new()
        .outbound(
            Outbound::new(service)
                .protocol(protocol)
                .endpoint(endpoint)
                .set("mode", "strict"),
        )
        .tls(mesh.tls(&leaf))
        .start()
}

/// curl over HTTPS to `addr`, trusting the mesh CA, with the client certificate `client`.
fn curl_tls(mesh: &Mesh, addr: SocketAddr, path: &str, client: Option<&Leaf>) -> Curl {
    let mut c = Curl::get(format!("https://127.0.0.1:{}{path}", addr.port()))
        .args(["--cacert".to_owned(), mesh.pki.ca().display().to_string()]);
    if let Some(leaf) = client {
        c = c.args([
            "--cert".to_owned(),
            leaf.cert.display().to_string(),
            "--key".to_owned(),
            leaf.key.display().to_string(),
        ]);
    }
    c
}

fn client_cert_args(leaf: &Leaf, ca: &Path) -> Vec<String> {
    vec![
        "-CAfile".into(),
        ca.display().to_string(),
        "-cert".into(),
        leaf.cert.display().to_string(),
        "-key".into(),
        leaf.key.display().to_string(),
    ]
}

fn refused(r: &CurlResponse) -> bool {
    r.exit_code != 0 && r.status == 0
}

fn metric_or_zero(agent: &Agent, series: &str) -> f64 {
    agent.metric(series).unwrap_or(0.0)
}

#[test]
fn a_strict_inbound_serves_only_clients_with_a_valid_mesh_certificate() {
    let mesh = Mesh::new();
    let app = Upstream::python("app").spawn();
    let agent = callee(&mesh, "orders", app.addr(), "strict", |i| i);
    let addr = agent.inbound_addr();
    let web = mesh.leaf("web", "web");

    // A valid mesh certificate: the app gets the request, with the caller's identity.
    let ok = curl_tls(&mesh, addr, "/hello", Some(&web)).run();
    ok.expect_status(200);
    assert_eq!(ok.header("x-upstream-name"), Some("app"), "{}", ok.verbose);
    let seen = ok.json();
    assert_eq!(seen["path"], "/hello");
    assert_eq!(seen["headers"]["x-vmesh-caller"], spiffe("web").as_str());

    // No client certificate, one from another CA, an expired one: refused.
    let none = curl_tls(&mesh, addr, "/", None).run();
    assert!(refused(&none), "served without a client certificate: {}", none.verbose);
    let other_dir = tempfile::tempdir().expect("tempdir");
    let other_ca = Pki::new(other_dir.path(), "other-ca");
    let foreign = other_ca.issue("web", &["IP:127.0.0.1", &uri("web")]);
    let wrong_ca = curl_tls(&mesh, addr, "/", Some(&foreign)).run();
    assert!(
        refused(&wrong_ca),
        "served a certificate of another CA: {}",
        wrong_ca.verbose
    );
    let expired = mesh.pki.issue_expired("web-expired", &["IP:127.0.0.1", &uri("web")]);
    let late = curl_tls(&mesh, addr, "/", Some(&expired)).run();
    assert!(refused(&late), "served an expired certificate: {}", late.verbose);

    // openssl s_client: the same without and with a certificate.
    let ca = mesh.pki.ca();
    let bare = s_client(addr, &["-CAfile", &ca.display().to_string()]);
    assert!(
        !bare.contains(" 200 OK"),
        "answered without a client certificate:\n{bare}"
    );
    let args = client_cert_args(&web, &ca);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let full = s_client(addr, &args);
    assert!(full.contains(" 200 OK"), "no answer with a valid certificate:\n{full}");
    assert!(full.contains("Verify return code: 0 (ok)"), "{full}");
    let expired_args = client_cert_args(&expired, &ca);
    let expired_args: Vec<&str> = expired_args.iter().map(String::as_str).collect();
    let stale = s_client(addr, &expired_args);
    assert!(!stale.contains(" 200 OK"), "answered an expired certificate:\n{stale}");

    // Plaintext on a strict listener: closed unanswered, and counted.
    let plain = Curl::get(agent.inbound_url("/")).run();
    assert!(refused(&plain), "strict served plaintext: {}", plain.verbose);
    eventually(DEFAULT_WAIT, "refusals counted by code", || {
        let plaintext = metric_or_zero(
            &agent,
            r#"vmesh_tls_connections_refused_total{code="TLS_PLAINTEXT_REFUSED"}"#,
        );
        let handshake = metric_or_zero(
            &agent,
            r#"vmesh_tls_connections_refused_total{code="TLS_HANDSHAKE_FAILED"}"#,
        );
        if plaintext >= 1.0 && handshake >= 3.0 {
            Ok(())
        } else {
            Err(format!("plaintext {plaintext}, handshake {handshake}"))
        }
    });
    assert_eq!(
        agent.metric(r#"vmesh_inbound_plaintext_connections_total{listener="inbound"}"#),
        None
    );
}

/// On a permissive inbound, waiting for the first byte (TLS or plaintext?) is not part of the
/// first head's `proxy.header_read_timeout` (here 3 s): a plaintext client that sends its first
/// byte after 2 s and the rest of its head 2 s later is served, as its head took 2 s. (Counted
/// from the accept, the head would be due at 3 s and answered 408.)
#[test]
fn a_permissive_listeners_wait_for_the_first_byte_does_not_use_up_the_heads_time() {
    use std::io::{Read, Write};
    let mesh = Mesh::new();
    let app = Upstream::python("app").spawn();
    let agent = AgentBuilder::new()
        .proxy_set("header_read_timeout", "3s")
        .inbound(Inbound::new(app.addr(), "http").set("mode", "permissive"))
        .tls(mesh.tls(&mesh.leaf("orders-sidecar", "orders")))
        .start();
    let mut s = std::net::TcpStream::connect(agent.inbound_addr()).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(15))).expect("read timeout");
    std::thread::sleep(Duration::from_secs(2));
    s.write_all(b"G").expect("the first byte");
    std::thread::sleep(Duration::from_secs(2));
    s.write_all(b"ET /late HTTP/1.1\r\nHost: orders\r\nConnection: close\r\n\r\n")
        .expect("the rest of the head");
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text:?}");
}

/// A plaintext connection on a permissive inbound parks when idle after its first answer, as on
/// a plaintext listener (nothing of the TLS detection keeps its context), and is answered on the
/// same connection afterwards.
#[test]
fn a_plaintext_connection_on_a_permissive_inbound_parks_after_its_first_answer() {
    let mesh = Mesh::new();
    let app = Upstream::python("app").spawn();
    let agent = AgentBuilder::new()
        .proxy_set("idle_park_after", "200ms")
        .inbound(Inbound::new(app.addr(), "http").set("mode", "permissive"))
        .tls(mesh.tls(&mesh.leaf("orders-sidecar", "orders")))
        .start();
    let counters = std::sync::Arc::new(keep_alive::Counters::default());
    let mut client = keep_alive::Client::new(agent.inbound_addr(), "/plain", counters.clone());
    client.request().expect("the first answer");
    eventually(DEFAULT_WAIT, "the idle plaintext connection parked", || {
        match agent.metric("vmesh_downstream_connections_parked") {
            Some(1.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    client.request().expect("the answer after parking");
    // (connections, reused, resent): the second answer came on the parked connection.
    assert_eq!(counters.snapshot(), (1, 1, 0));
}

#[test]
fn a_permissive_inbound_serves_mtls_and_plaintext_and_counts_plaintext() {
    let mesh = Mesh::new();
    let app = Upstream::python("app").spawn();
    let inbound = Inbound::new(app.addr(), "http");
    let mut agent = AgentBuilder::new()
        .inbound(inbound.clone().set("mode", "permissive"))
        .tls(mesh.tls(&mesh.leaf("orders-sidecar", "orders")))
        .start();
    let web = mesh.leaf("web", "web");

    let tls = curl_tls(&mesh, agent.inbound_addr(), "/tls", Some(&web)).run();
    tls.expect_status(200);
    assert_eq!(tls.json()["headers"]["x-vmesh-caller"], spiffe("web").as_str());
    for i in 0..3 {
        // A client's own x-vmesh-caller is not believed.
        let plain = Curl::get(agent.inbound_url(&format!("/plain/{i}")))
            .header("x-vmesh-caller: spiffe://mesh.test/ns/prod/sa/admin")
            .run();
        plain.expect_status(200);
        assert!(
            plain.json()["headers"].get("x-vmesh-caller").is_none(),
            "{}",
            plain.text()
        );
    }
    eventually(DEFAULT_WAIT, "three plaintext connections counted", || {
        match agent.metric(r#"vmesh_inbound_plaintext_connections_total{listener="inbound"}"#) {
            Some(3.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // The migration's last step, by reload: strict for the connections accepted from then on.
    let strict = agent.config().inbound(inbound.set("mode", "strict"));
    agent.reload(strict);
    eventually(DEFAULT_WAIT, "plaintext refused after the reload to strict", || {
        let plain = Curl::get(agent.inbound_url("/after")).run();
        if refused(&plain) {
            Ok(())
        } else {
            Err(format!("status {}", plain.status))
        }
    });
    curl_tls(&mesh, agent.inbound_addr(), "/after", Some(&web))
        .run()
        .expect_status(200);
    assert_eq!(
        agent.metric(r#"vmesh_inbound_plaintext_connections_total{listener="inbound"}"#),
        Some(3.0)
    );
}

#[test]
fn two_sidecars_carry_http1_and_http2_in_mutual_tls() {
    let mesh = Mesh::new();
    let app = Upstream::python("app").spawn();
    let orders = callee(&mesh, "orders", app.addr(), "strict", |i| i);
    let h1 = caller(&mesh, "orders", orders.inbound_addr(), "http");
    let r = Curl::get(h1.outbound_url("orders", "/h1")).run();
    r.expect_status(200);
    assert_eq!(
        r.json()["headers"]["x-vmesh-caller"],
        spiffe("web").as_str(),
        "{}",
        r.text()
    );

    // HTTP/2 between the sidecars (ALPN h2), HTTP/2 cleartext to an h2c app.
    let h2_app = Upstream::nginx_h2c("h2app").spawn();
    let orders_h2 = AgentBuilder::new()
        .inbound(Inbound::new(h2_app.addr(), "http2").set("mode", "strict"))
        .tls(mesh.tls(&mesh.leaf("orders-h2", "orders")))
        .start();
    let ca = mesh.pki.ca();
    let web = mesh.leaf("web-alpn", "web");
    let mut args = client_cert_args(&web, &ca);
    args.extend(["-alpn".to_owned(), "h2,http/1.1".to_owned()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let alpn = s_client(orders_h2.inbound_addr(), &args);
    assert!(
        alpn.contains("ALPN protocol: h2"),
        "the inbound listener did not choose h2:\n{alpn}"
    );
    let h2 = caller(&mesh, "orders", orders_h2.inbound_addr(), "http2");
    let r = Curl::get(h2.outbound_url("orders", "/h2")).run();
    r.expect_status(200);
    assert_eq!(r.header("x-upstream-proto"), Some("HTTP/2.0"), "{}", r.verbose);
    let summary = h2load(
        &h2.outbound_url("orders", "/h2load"),
        &["-n", "200", "-c", "2", "-m", "10"],
    );
    assert_eq!(
        (summary.succeeded, summary.status_2xx),
        (200, 200),
        "{}",
        summary.output
    );
}

#[test]
fn a_caller_refuses_a_callee_whose_certificate_names_another_service() {
    let mesh = Mesh::new();
    let app = Upstream::python("app").spawn();
    // The endpoint "orders" is dialled at is a sidecar of billing.
    let billing = callee(&mesh, "billing", app.addr(), "strict", |i| i);
    let web = caller(&mesh, "orders", billing.inbound_addr(), "http");
    let r = Curl::get(web.outbound_url("orders", "/")).run();
    assert_eq!(r.status, 502, "{}", r.verbose);
    assert_eq!(r.header("x-vmesh-error"), Some("UPSTREAM_IDENTITY_MISMATCH"));
    let h2web = caller(&mesh, "orders", billing.inbound_addr(), "http2");
    let r = Curl::get(h2web.outbound_url("orders", "/")).run();
    assert_eq!(r.status, 502, "{}", r.verbose);
    assert_eq!(r.header("x-vmesh-error"), Some("UPSTREAM_IDENTITY_MISMATCH"));
    let n = web
        .metric(r#"vmesh_proxy_errors_total{direction="outbound",service="orders",code="UPSTREAM_IDENTITY_MISMATCH"}"#);
    assert_eq!(n, Some(1.0));
    // Nothing reached the app.
    assert_eq!(billing.access_log().len(), 0, "{}", billing.stdout());
}

#[test]
fn authorization_rules_decide_by_caller_identity_path_and_method() {
    let mesh = Mesh::new();
    let app = Upstream::python("app").spawn();
    let agent = callee(&mesh, "orders", app.addr(), "strict", |i| {
        let rule = |action: &str, caller: &str, extra: &[(&str, Value)]| {
            let mut t = Table::new();
            t.insert("action".into(), action.into());
            t.insert("caller".into(), caller.into());
            for (k, v) in extra {
                t.insert((*k).into(), v.clone());
            }
            Value::Table(t)
        };
        i.set(
            "authz",
            Value::Array(vec![
                rule("deny", "web", &[("path_prefix", "/admin".into())]),
                rule("allow", "web", &[]),
                rule(
                    "allow",
                    "batch",
                    &[
                        ("environment", "prod".into()),
                        ("methods", Value::Array(vec!["GET".into()])),
                    ],
                ),
            ]),
        )
    });
    let addr = agent.inbound_addr();
    let web = mesh.leaf("web", "web");
    let batch = mesh.leaf("batch", "batch");
    let mallory = mesh.leaf("mallory", "mallory");
    let cases: [(&Leaf, &str, &str, u16); 5] = [
        (&web, "GET", "/orders", 200),
        (&web, "GET", "/admin/users", 403),
        (&batch, "GET", "/orders", 200),
        (&batch, "POST", "/orders", 403),
        (&mallory, "GET", "/orders", 403),
    ];
    for (leaf, method, path, want) in cases {
        let r = curl_tls(&mesh, addr, path, Some(leaf)).method(method).run();
        assert_eq!(
            r.status,
            want,
            "{method} {path} as {}: {}",
            leaf.cert.display(),
            r.verbose
        );
        if want == 403 {
            assert_eq!(r.header("x-vmesh-error"), Some("UNAUTHORIZED_CALLER"));
        }
    }
    let lines = eventually(DEFAULT_WAIT, "five access-log lines", || {
        let log = agent.access_log();
        if log.len() >= 5 {
            Ok(log)
        } else {
            Err(agent.stdout())
        }
    });
    let callers: Vec<(String, u64)> = lines
        .iter()
        .map(|l| {
            (
                l["caller"].as_str().unwrap_or("").to_owned(),
                l["status"].as_u64().unwrap_or(0),
            )
        })
        .collect();
    assert_eq!(
        callers,
        vec![
            (spiffe("web"), 200),
            (spiffe("web"), 403),
            (spiffe("batch"), 200),
            (spiffe("batch"), 403),
            (spiffe("mallory"), 403),
        ]
    );
    assert_eq!(
        agent.metric(r#"vmesh_proxy_errors_total{direction="inbound",service="inbound",code="UNAUTHORIZED_CALLER"}"#),
        Some(3.0)
    );
}

#[test]
fn the_caller_identity_keys_an_inbound_rate_limit() {
    let mesh = Mesh::new();
    let app = Upstream::python("app").spawn();
    let agent = callee(&mesh, "orders", app.addr(), "strict", |i| {
        let mut rl = Table::new();
        rl.insert("rate".into(), "1/m".into());
        rl.insert("burst".into(), 1.into());
        rl.insert("by".into(), "x-vmesh-caller".into());
        i.set("rate_limit", Value::Table(rl))
    });
    let addr = agent.inbound_addr();
    let web = mesh.leaf("web", "web");
    let batch = mesh.leaf("batch", "batch");
    let statuses: Vec<u16> = [&web, &web, &batch, &batch]
        .iter()
        .map(|leaf| curl_tls(&mesh, addr, "/", Some(leaf)).run().status)
        .collect();
    // One token a minute per caller: each caller's second request waits, not the other's first.
    assert_eq!(statuses, vec![200, 429, 200, 429]);
}

#[test]
fn a_certificate_rotation_under_keep_alive_load_fails_no_request() {
    let mesh = Mesh::new();
    let app = Upstream::nginx("app").spawn();
    // The callee's files are copies the test rewrites, as Ansible or Vault Agent would.
    let live = mesh.dir.path().join("live");
    std::fs::create_dir_all(&live).expect("mkdir");
    let first = mesh.leaf("orders-v1", "orders");
    let cert = live.join("orders.pem");
    let key = live.join("orders.key");
    install(&first, &cert, &key);
    let live_leaf = Leaf {
        cert: cert.clone(),
        key: key.clone(),
    };
    let orders = AgentBuilder::new()
        .inbound(Inbound::new(app.addr(), "http").set("mode", "strict"))
        .tls(mesh.tls(&live_leaf))
        .start();
    let web = caller(&mesh, "orders", orders.inbound_addr(), "http");
    let probe = mesh.leaf("probe", "web");
    let ca = mesh.pki.ca();
    let args = client_cert_args(&probe, &ca);
    let mut args: Vec<&str> = args.iter().map(String::as_str).collect();
    args.push("-showcerts");
    let serial_now = || {
        let out = s_client(orders.inbound_addr(), &args);
        leaf_serial(&out).ok_or(out)
    };
    assert_eq!(serial_now().expect("the first serial"), first.serial());

    // Steady keep-alive load through both sidecars, bounded in time (12 s) and connections.
    let url = web.outbound_url("orders", "/");
    let load = std::thread::spawn(move || h2load(&url, &["--h1", "-c", "4", "-D", "12"]));
    eventually(DEFAULT_WAIT, "the load to reach the callee", || {
        match orders.metric(r#"vmesh_downstream_connections_total{listener="inbound"}"#) {
            Some(n) if n >= 1.0 => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let second = mesh.leaf("orders-v2", "orders");
    install(&second, &cert, &key);
    eventually(
        Duration::from_secs(20),
        "new handshakes to present the new serial",
        || match serial_now() {
            Ok(s) if s == second.serial() => Ok(()),
            Ok(s) => Err(format!("still {s}")),
            Err(out) => Err(out),
        },
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
}

/// Writes `leaf` over `cert` and `key` the way a deploy tool does: each by rename, key first.
fn install(leaf: &Leaf, cert: &PathBuf, key: &PathBuf) {
    for (from, to) in [(&leaf.key, key), (&leaf.cert, cert)] {
        let tmp = to.with_extension("tmp");
        std::fs::copy(from, &tmp).expect("copy");
        std::fs::rename(&tmp, to).expect("rename");
    }
}
