//! Who may call the admin API: `check-config` refuses an `admin_listen` off loopback without
//! TLS and a token; `agent.admin_tls` serves the API over TLS (the `[tls]` certificate) and still
//! wants the token for a drain; the unix socket `agent.admin_socket` serves root and the users
//! it names without a token, refuses every other user by its peer credentials, and is what the
//! CLI uses when it exists.

use std::os::unix::fs::PermissionsExt;
use std::process::Command;
use std::time::Duration;

use toml::{Table, Value};
use vmesh_tests::binary::vmesh_bin;
use vmesh_tests::http::Curl;
use vmesh_tests::pki::Pki;
use vmesh_tests::process::Process;
use vmesh_tests::{eventually, free_addr, AgentBuilder, Outbound, Upstream};

/// A user id that is not root and not the agent's (`nobody`).
const NOBODY: u32 = 65534;

fn check_config(text: &str) -> std::process::Output {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vmesh.toml");
    std::fs::write(&path, text).expect("write config");
    Command::new(vmesh_bin())
        .args(["check-config", "--config"])
        .arg(&path)
        .output()
        .expect("run check-config")
}

fn tls_table(pki: &Pki) -> Table {
    let leaf = pki.issue("admin", &["IP:127.0.0.1", "URI:spiffe://mesh.test/ns/prod/sa/web"]);
    let mut t = Table::new();
    t.insert("trust_domain".into(), "mesh.test".into());
    t.insert("cert_file".into(), leaf.cert.display().to_string().into());
    t.insert("key_file".into(), leaf.key.display().to_string().into());
    t.insert("ca_file".into(), pki.ca().display().to_string().into());
    t
}

#[test]
fn check_config_refuses_a_non_loopback_admin_listen_without_tls_and_a_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-token-of-the-test\n").expect("token");
    let open = "[agent]\nadmin_listen = \"0.0.0.0:9901\"\n";
    let out = check_config(open);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "accepted: {err}");
    assert!(
        err.contains("agent.admin_listen") && err.contains("not a loopback address"),
        "{err}"
    );
    // A token alone is not enough: it would cross the network in plaintext.
    let out = check_config(&format!(
        "[agent]\nadmin_listen = \"0.0.0.0:9901\"\nadmin_token_file = \"{}\"\n",
        token.display()
    ));
    assert!(!out.status.success(), "accepted without TLS");
    // TLS without the [tls] files is refused too, naming what needs them.
    let out = check_config(&format!(
        "[agent]\nadmin_listen = \"0.0.0.0:9901\"\nadmin_tls = true\nadmin_token_file = \"{}\"\n",
        token.display()
    ));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("agent.admin_tls"), "{err}");
    // TLS and a token: accepted.
    let pki = Pki::new(dir.path(), "admin-test-ca");
    let mut root = Table::new();
    let mut agent = Table::new();
    agent.insert("admin_listen".into(), "0.0.0.0:9901".into());
    agent.insert("admin_tls".into(), true.into());
    agent.insert("admin_token_file".into(), token.display().to_string().into());
    root.insert("agent".into(), Value::Table(agent));
    root.insert("tls".into(), Value::Table(tls_table(&pki)));
    let out = check_config(&toml::to_string(&root).expect("toml"));
    assert!(
        out.status.success(),
        "refused: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn the_admin_api_over_tls_answers_https_only_and_still_wants_the_token() {
    let dir = tempfile::tempdir().expect("tempdir");
    let pki = Pki::new(dir.path(), "admin-test-ca");
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-token-of-the-test\n").expect("token");
    let app = Upstream::nginx("a").spawn();
    let admin = free_addr();
    let builder = AgentBuilder::new()
        .agent_set("admin_listen", admin.to_string())
        .agent_set("admin_tls", true)
        .agent_set("admin_token_file", token.display().to_string())
        .agent_set("data_dir", dir.path().join("data").display().to_string())
        .tls(tls_table(&pki))
        .outbound(Outbound::new("web").endpoint(app.addr()));
    let config = dir.path().join("vmesh.toml");
    std::fs::write(&config, builder.to_toml()).expect("config");
    let mut cmd = Command::new(vmesh_bin());
    cmd.args(["run", "--config"]).arg(&config);
    let mut agent = Process::spawn("vmesh", cmd, dir.path());
    let ca = pki.ca().display().to_string();
    let https = |path: &str| Curl::get(format!("https://{admin}{path}")).args(["--cacert", &ca]);
    eventually(Duration::from_secs(15), "the admin API answers over TLS", || {
        let r = https("/live").run();
        if r.status == 200 {
            Ok(())
        } else {
            Err(format!("{} {}", r.status, r.text()))
        }
    });
    // Plain HTTP on the TLS port gets no answer.
    let plain = Curl::get(format!("http://{admin}/live")).run();
    assert_ne!(plain.status, 200, "plain HTTP answered on the TLS admin port");
    // A drain without the token is refused, with it accepted.
    let r = https("/drain").method("POST").run();
    assert_eq!(r.status, 401, "{}", r.text());
    let r = https("/drain")
        .method("POST")
        .header("Authorization: Bearer s3cret-token-of-the-test")
        .run();
    assert_eq!(r.status, 202, "{}", r.text());
    agent.signal(nix::sys::signal::Signal::SIGTERM);
    agent.wait_exit(Duration::from_secs(20));
}

#[test]
fn the_admin_socket_serves_root_and_named_users_without_a_token_and_refuses_others() {
    let dir = tempfile::tempdir().expect("tempdir");
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod dir");
    let token = dir.path().join("admin.token");
    std::fs::write(&token, "s3cret-token-of-the-test\n").expect("token");
    std::fs::set_permissions(&token, std::fs::Permissions::from_mode(0o600)).expect("chmod token");
    let socket = dir.path().join("admin.sock");
    let app = Upstream::nginx("a").spawn();
    let agent = AgentBuilder::new()
        .agent_set("admin_token_file", token.display().to_string())
        .agent_set("admin_socket", socket.display().to_string())
        .agent_set(
            "admin_socket_uids",
            Value::Array(vec![Value::Integer(i64::from(NOBODY - 1))]),
        )
        .outbound(Outbound::new("web").endpoint(app.addr()))
        .start();
    let mode = std::fs::metadata(&socket)
        .expect("the socket exists")
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o660, "socket mode {mode:o}");
    let sock = socket.display().to_string();

    // Root (this test) drains through the socket without a token; TCP without it is refused.
    let tcp = Curl::get(agent.admin_url("/drain")).method("POST").run();
    assert_eq!(tcp.status, 401, "{}", tcp.text());
    let r = Curl::get("http://localhost/drain")
        .args(["--unix-socket", &sock])
        .method("POST")
        .run();
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(agent.status_json()["draining"], false, "a drain is not a shutdown");
    assert_ne!(agent.lifecycle()["drain"], "serving", "{}", agent.lifecycle());

    // Another user: refused by its peer credentials (the socket is opened for it here, so
    // only the agent's check stands in the way), no answer.
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o666)).expect("chmod socket");
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "curl",
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            &sock,
            "http://localhost/status",
        ])
        .output()
        .expect("run curl as nobody");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "000",
        "a user the socket does not name got an answer"
    );

    // The CLI prefers the socket: `vmesh undrain` as a named user who cannot read the token
    // (0600 root) succeeds only through it.
    let config = dir.path().join("vmesh.toml");
    std::fs::copy(agent.config_path(), &config).expect("copy the config where the user can read it");
    std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o644)).expect("chmod config");
    let config = config.display().to_string();
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={}", NOBODY - 1),
            &format!("--regid={}", NOBODY - 1),
            "--clear-groups",
        ])
        .arg(vmesh_bin())
        .args(["undrain", "--config", &config, "--timeout", "20s"])
        .output()
        .expect("run vmesh undrain as a named user");
    assert!(
        out.status.success(),
        "undrain through the socket: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eventually(Duration::from_secs(10), "serving again", || {
        match agent.lifecycle()["drain"].as_str() {
            Some("serving") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
}
