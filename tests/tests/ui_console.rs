//! The web console (`GET /ui`) in a real browser: Debian's headless Chromium driven by Playwright
//! for Python (`tests/fixtures/ui_check.py`) against the real `vmesh` binary, registered in the
//! Consul double (which also keeps the central shift policy) with an admin token and an outbound
//! service on two static endpoints, one `vm` and one `k8s` (both in the `blue` lane of this VM's
//! identity, so the colour stage keeps both and the shift decides).
//!
//! The page loads and shows the cluster and its endpoints with their labels, the breaker and the
//! inbound adaptive limit; the shift dial,
//! confirmed without the token, is refused (401) and the page says so; confirmed with it, it
//! writes the policy, which this test then reads back from the admin API and from Consul's KV;
//! drain and undrain go the same way. A screenshot is kept in `target/test-artefacts/ui.png`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{json, Value};
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{self, Identity};
use vmesh_tests::process::Process;
use vmesh_tests::shift::{admin_put, shift_get, KeepAlive};
use vmesh_tests::{eventually, fixture, tools, workspace_root, Agent, Inbound, Outbound, Upstream, DEFAULT_WAIT};

const TOKEN: &str = "ui-admin-s3cret";
/// The browser session of ui_check.py takes about 20 s; this bounds a hung browser.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(180);
/// Debian's Chromium (package `chromium`, installed by scripts/install-test-deps.sh).
const CHROMIUM: &str = "/usr/bin/chromium";

/// Where the screenshots go: `<target dir>/test-artefacts`.
fn artefacts_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
        .join("test-artefacts")
}

/// `POST <path>` on the admin API without a body, with `Authorization: Bearer <token>` if given.
fn admin_post(agent: &Agent, path: &str, token: Option<&str>) -> vmesh_tests::HttpResponse {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Length: 0\r\nConnection: close\r\n\r\n",
        agent.admin_addr()
    );
    KeepAlive::new(agent.admin_addr())
        .exchange(request.as_bytes())
        .unwrap_or_else(|e| panic!("POST {path} on admin: {e}"))
}

/// The `REPORT {...}` line ui_check.py prints.
fn report_of(stdout: &str) -> Value {
    stdout
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("REPORT "))
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or(Value::Null)
}

#[test]
fn the_console_shows_the_mesh_and_its_shift_dial_writes_the_policy_only_with_the_token() {
    assert!(
        std::path::Path::new(CHROMIUM).is_file(),
        "{CHROMIUM} is missing: run `bash scripts/install-test-deps.sh` as root"
    );
    let consul = ConsulDouble::spawn();
    let app = Upstream::python("app").spawn();
    let vm = Upstream::nginx("vm-1").spawn();
    let k8s = Upstream::nginx("k8s-1").spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().set("service", "shop").write_in(dir.path());
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the admin token");

    // An inbound with an adaptive concurrency limit and an outbound with a breaker: the console
    // shows their live state.
    let inbound = Inbound::new(app.addr(), "http")
        .health("/healthz", "500ms")
        .ramp("60s")
        .set("adaptive", toml::Value::Table(toml::Table::new()));
    let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "60s"), &consul)
        .inbound(inbound)
        .agent_set("admin_token_file", token_file.display().to_string())
        .outbound(
            Outbound::new("web")
                .balancer("round-robin")
                .set("breaker", toml::Value::Table(toml::Table::new()))
                .labelled_endpoint(
                    vm.addr(),
                    &[("env", "vm"), ("zone", "z1"), ("version", "v1"), ("colour", "blue")],
                )
                .labelled_endpoint(
                    k8s.addr(),
                    &[("env", "k8s"), ("zone", "z2"), ("version", "v2"), ("colour", "blue")],
                ),
        )
        .start();
    eventually(DEFAULT_WAIT, "the agent registered in Consul", || {
        let lc = agent.lifecycle();
        if lc["registered"] == true {
            Ok(())
        } else {
            Err(lc.to_string())
        }
    });
    assert_eq!(
        shift_get(&agent, "web")["shift"]["policy"],
        Value::Null,
        "no policy before the UI writes one"
    );

    // The page: HTML, never cached, and a CSP that lets it talk to its own origin only.
    let page = agent.admin_get("/ui");
    assert_eq!(page.status, 200, "{}", page.text());
    assert_eq!(page.header("content-type"), Some("text/html; charset=utf-8"));
    assert_eq!(page.header("cache-control"), Some("no-store"));
    let csp = page.header("content-security-policy").unwrap_or_default().to_string();
    for directive in [
        "default-src 'none'",
        "connect-src 'self'",
        "frame-ancestors 'none'",
        "form-action 'none'",
    ] {
        assert!(csp.contains(directive), "CSP {csp:?} lacks {directive:?}");
    }
    assert!(!csp.contains("http"), "the CSP names no other origin: {csp:?}");
    let html = page.text();
    assert!(
        !html.contains(" src=") && !html.contains("stylesheet"),
        "the page loads no script or style from a file or a CDN"
    );
    // Only GET serves it; any other method needs the token first, like every write.
    assert_eq!(admin_post(&agent, "/ui", None).status, 401);
    assert_eq!(admin_post(&agent, "/ui", Some(TOKEN)).status, 405);
    // The calls the console makes are refused without the token, straight at the API too.
    let r = admin_put(&agent, "/shift/web", r#"{"vm": 80, "k8s": 20}"#, None);
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(admin_post(&agent, "/drain", None).status, 401);
    assert_eq!(admin_post(&agent, "/undrain", None).status, 401);
    assert_eq!(agent.lifecycle()["drain"], "serving");

    // The browser session.
    let artefacts = artefacts_dir();
    std::fs::create_dir_all(&artefacts).expect("create target/test-artefacts");
    let shot = artefacts.join("ui.png");
    let _ = std::fs::remove_file(&shot);
    let endpoints = json!([
        {"address": vm.addr().to_string(), "env": "vm", "zone": "z1", "version": "v1", "colour": "blue", "weight": 100},
        {"address": k8s.addr().to_string(), "env": "k8s", "zone": "z2", "version": "v2", "colour": "blue", "weight": 100},
    ]);
    let mut cmd = tools::python_command(&["playwright"]);
    cmd.arg(fixture("ui_check.py"))
        .args(["--admin", &agent.admin_url("")])
        .args(["--token", TOKEN])
        .args(["--service", "web"])
        .args(["--identity", "shop"])
        .args(["--endpoints", &endpoints.to_string()])
        .args(["--outbound", &agent.outbound_url("web", "")])
        .args(["--vm", "80", "--requests", "200"])
        .args(["--chromium", CHROMIUM])
        .arg("--artefacts")
        .arg(&artefacts);
    let mut browser = Process::spawn("ui_check", cmd, dir.path());
    let exit = browser.wait_exit(BROWSER_TIMEOUT);
    let stdout = browser.stdout();
    let stderr = browser.stderr();
    eprintln!("--- ui_check.py ---\n{stderr}");
    assert!(
        exit.success(),
        "ui_check.py failed ({exit}); a screenshot is in {}/ui-failure.png\n{stderr}\n{stdout}",
        artefacts.display()
    );
    let report = report_of(&stdout);
    assert_eq!(report["ok"], true, "{report}");

    // What the browser did, as the agent saw it: the refused write changed nothing, the
    // confirmed one sent the dial's split with the token.
    assert_eq!(report["unauthorized_status"], 401, "{report}");
    assert_eq!(report["authorized_status"], 200, "{report}");
    assert_eq!(report["put_body"], json!({"vm": 80, "k8s": 20}), "{report}");
    assert_eq!(report["drain_unauthorized_status"], 401, "{report}");
    eprintln!(
        "[ui] refused: {}; written: {}; observed in the page {} = API {}; live split {:?}",
        report["unauthorized_message"],
        report["written_message"],
        report["observed_ui"],
        report["observed_api"],
        report["live_split"]
    );

    // The policy changed, for the agent and in the registry every agent watches.
    let shown = shift_get(&agent, "web");
    assert_eq!(shown["shift"]["policy"], json!({"vm": 80, "k8s": 20}), "{shown}");
    assert_eq!(shown["shift"]["source"], "central", "{shown}");
    let stored = consul.get("/v1/kv/vmesh/shift/web?raw");
    stored.expect_status(200);
    assert_eq!(stored.json(), json!({"vm": 80, "k8s": 20}), "{stored}");
    assert_eq!(
        agent.metric("vmesh_shift_weight{service=\"web\",env=\"vm\"}"),
        Some(80.0),
        "the caller applies the policy the dial wrote"
    );
    // The page counted the requests it sent like the API does, split by the new policy.
    let observed = &report["observed_api"];
    let (vm_n, k8s_n) = (
        observed["vm"].as_u64().unwrap_or(0),
        observed["k8s"].as_u64().unwrap_or(0),
    );
    assert_eq!(report["observed_ui"], *observed, "{report}");
    assert_eq!(vm_n + k8s_n, 200, "{report}");
    assert!(
        (140..=180).contains(&vm_n),
        "200 requests at vm=80: {vm_n} to vm, {k8s_n} to k8s"
    );
    // Drained and undrained from the page: back in traffic.
    assert_eq!(agent.lifecycle()["drain"], "serving");

    let png = std::fs::read(&shot).unwrap_or_else(|e| panic!("screenshot {}: {e}", shot.display()));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 20_000,
        "{} is not a real screenshot ({} bytes)",
        shot.display(),
        png.len()
    );
    eprintln!("[ui] screenshot: {} ({} bytes)", shot.display(), png.len());
}
