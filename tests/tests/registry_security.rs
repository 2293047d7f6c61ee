//! The registry clients hold credentials and so are careful with them (issue 11, "Clients"):
//! etcd with authentication (a user and its password from `registry.token_file`) and with TLS
//! trusted through `registry.ca_file`; a Consul address that redirects is not followed with the
//! ACL token.

use std::net::SocketAddr;

use vmesh_tests::etcd::{Etcd, EtcdTls};
use vmesh_tests::lifecycle::{self, Identity};
use vmesh_tests::pki::Pki;
use vmesh_tests::{eventually, fixture, free_addr, tools, Agent, AgentBuilder, Process, Upstream, DEFAULT_WAIT};

const KEY: &str = "/vmesh/services/orders/orders-web-01";

fn registry_error(agent: &Agent) -> Option<String> {
    agent.admin_json("/status")["lifecycle"]["registry_error"]
        .as_str()
        .map(str::to_owned)
}

/// An instance of "orders" whose registry is etcd at `etcd`, set up by `registry`.
fn etcd_instance(
    dir: &std::path::Path,
    app: SocketAddr,
    etcd: &Etcd,
    registry: impl FnOnce(AgentBuilder) -> AgentBuilder,
) -> Agent {
    let identity = Identity::orders().write_in(dir);
    registry(lifecycle::etcd(
        lifecycle::instance("web-01", &identity, app, "0s"),
        etcd,
    ))
    .start()
}

#[test]
fn etcd_with_authentication_takes_the_user_and_its_password_and_refuses_without() {
    let mut etcd = Etcd::spawn();
    etcd.enable_auth("vmesh-agent", "agent-pw");
    let dir = tempfile::tempdir().expect("tempdir");
    let app = Upstream::python("app").spawn();

    // Without credentials the writes are refused: reported, nothing written.
    let anonymous = etcd_instance(dir.path(), app.addr(), &etcd, |b| b);
    let why = eventually(DEFAULT_WAIT, "the refused registration to be reported", || {
        registry_error(&anonymous).ok_or_else(|| "no registry_error yet".to_owned())
    });
    assert!(etcd.get(KEY).is_none(), "written without credentials ({why})");
    drop(anonymous);

    let password = dir.path().join("etcd-password");
    std::fs::write(&password, "agent-pw\n").expect("write password");
    let agent = etcd_instance(dir.path(), app.addr(), &etcd, |b| {
        b.registry_set("username", "vmesh-agent")
            .registry_set("token_file", password.display().to_string())
    });
    eventually(DEFAULT_WAIT, "the instance key written as vmesh-agent", || {
        match (etcd.json(KEY), registry_error(&agent)) {
            (Some(v), None) if v["port"].as_u64().is_some() => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

#[test]
fn etcd_over_tls_is_trusted_through_registry_ca_file_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "test-etcd-ca");
    let leaf = pki.issue("etcd", &["IP:127.0.0.1", "DNS:localhost"]);
    let etcd = Etcd::spawn_tls(EtcdTls {
        cert: leaf.cert,
        key: leaf.key,
        ca: pki.ca(),
    });
    assert!(etcd.url().starts_with("https://"));
    let app = Upstream::python("app").spawn();

    // The test CA is in no system store: without ca_file the handshake fails.
    let untrusting = etcd_instance(dir.path(), app.addr(), &etcd, |b| b);
    eventually(DEFAULT_WAIT, "the failed TLS connection to be reported", || {
        registry_error(&untrusting).ok_or_else(|| "no registry_error yet".to_owned())
    });
    assert!(etcd.get(KEY).is_none());
    drop(untrusting);

    let agent = etcd_instance(dir.path(), app.addr(), &etcd, |b| {
        b.registry_set("ca_file", pki.ca().display().to_string())
    });
    eventually(DEFAULT_WAIT, "the instance key written over TLS", || {
        match (etcd.json(KEY), registry_error(&agent)) {
            (Some(_), None) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}

#[test]
fn a_consul_address_that_redirects_is_not_followed_with_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (redirect, trap) = (free_addr(), free_addr());
    let mut cmd = tools::python_command(&[]);
    cmd.arg(fixture("redirect_trap.py"))
        .arg("--redirect")
        .arg(redirect.port().to_string())
        .arg("--trap")
        .arg(trap.port().to_string());
    let _servers = Process::spawn("redirect-trap", cmd, dir.path());
    eventually(DEFAULT_WAIT, "the redirect trap to listen", || {
        vmesh_tests::http::get(trap, "/__seen").map(|_| ())
    });
    let token = dir.path().join("consul-token");
    std::fs::write(&token, "s3cret-acl-token\n").expect("write token");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let agent = lifecycle::instance("web-01", &identity, app.addr(), "0s")
        .registry_set("kind", "consul")
        .registry_set("address", format!("http://{redirect}"))
        .registry_set("token_file", token.display().to_string())
        .start();
    let why = eventually(DEFAULT_WAIT, "the redirected registration to fail", || {
        registry_error(&agent).ok_or_else(|| "no registry_error yet".to_owned())
    });
    let seen = vmesh_tests::http::get(trap, "/__seen").expect("trap answers");
    assert_eq!(seen.text().trim(), "[]", "the agent followed a redirect ({why})");
}
