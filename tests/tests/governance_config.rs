//! Bad governance input is refused whole: `vmesh check-config` names every problem (a bad
//! regex, split weights not summing to 100, an unknown fallback code, a rule an earlier one
//! makes unreachable), and a SIGHUP reload with such a config keeps the running config (its
//! endpoints, routes and faults) and reports the problems on `/config`.

use std::net::SocketAddr;
use std::time::Duration;

use vmesh_tests::agent::{check_config, toml_table};
use vmesh_tests::governance::{metric_sum, Client};
use vmesh_tests::{eventually, free_addr, Agent, AgentBuilder, Outbound, Signal, Upstream, DEFAULT_WAIT};

/// Each problem of [`bad_governance`]: the key that must be named, and a word of the reason.
const PROBLEMS: &[(&str, &str)] = &[
    ("route[0].match.path.regex", "regex"),
    ("route[1].split", "90"),
    ("outbound[0].fallback.on", "NOT_A_CODE"),
    ("route[3].match", "unreachable"),
];

/// `config` with four governance mistakes: shop's endpoints moved to `endpoints`, a fallback
/// for an unknown code, and four rules (bad regex, a split summing to 90, a catch-all, and a
/// rule after the catch-all that can never match).
fn bad_governance(config: AgentBuilder, endpoints: [SocketAddr; 2]) -> AgentBuilder {
    let shop = config
        .outbound_for("shop")
        .clear_endpoints()
        .labelled_endpoint(endpoints[0], &[("version", "v1")])
        .labelled_endpoint(endpoints[1], &[("version", "v2")])
        .set(
            "fallback",
            toml::Value::Table(toml_table(
                r#"body = "cached"
on = ["CIRCUIT_OPEN", "NOT_A_CODE"]"#,
            )),
        );
    config
        .outbound(shop)
        .clear_routes()
        .route(toml_table(
            r#"name = "bad-regex"
match = { service = "shop", path = { regex = "^/(unclosed" } }"#,
        ))
        .route(toml_table(
            r#"name = "bad-split"
match = { service = "shop", path = { prefix = "/canary" } }
split = [{ version = "v2", weight = 10 }, { version = "v1", weight = 80 }]"#,
        ))
        .route(toml_table(
            r#"name = "catch-all"
match = { service = "shop" }
timeout = "2s""#,
        ))
        .route(toml_table(
            r#"name = "never"
match = { service = "shop", path = { prefix = "/late" } }"#,
        ))
}

/// shop -> `endpoint` (version v1), and a drill fault: colour `drill` is always aborted.
fn good(endpoint: SocketAddr) -> AgentBuilder {
    Agent::builder()
        .outbound(
            Outbound::new("shop")
                .timeout("5s")
                .labelled_endpoint(endpoint, &[("version", "v1")]),
        )
        .route(toml_table(
            r#"name = "drill"
match = { service = "shop" }
fault = { abort_status = 503, abort_percent = 100, colour = "drill" }"#,
        ))
}

fn assert_names_every_problem(what: &str, text: &str) {
    for (key, reason) in PROBLEMS {
        assert!(
            text.lines().any(|l| l.contains(key) && l.contains(reason)),
            "{what} must name `{key}` ({reason}):\n{text}"
        );
    }
}

#[test]
fn check_config_names_every_governance_problem() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = good(free_addr());
    let good_path = dir.path().join("good.toml");
    std::fs::write(&good_path, config.to_toml()).expect("write good config");
    let out = check_config(&good_path);
    assert!(
        out.status.success(),
        "the good config must pass: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = bad_governance(config, [free_addr(), free_addr()]);
    let bad_path = dir.path().join("bad.toml");
    std::fs::write(&bad_path, bad.to_toml()).expect("write bad config");
    let out = check_config(&bad_path);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("[check-config]\n{text}");
    assert_eq!(out.status.code(), Some(2), "an invalid config exits 2:\n{text}");
    assert_names_every_problem("check-config", &text);
}

#[test]
fn sighup_with_bad_governance_keeps_the_running_config() {
    let u1 = Upstream::python("u1").spawn();
    let u2 = Upstream::python("u2").spawn();
    let mut agent = good(u1.addr()).start();
    let mut client = Client::new(agent.outbound_addr("shop"));
    let assert_running_config = |client: &mut Client, when: &str| {
        for _ in 0..10 {
            let r = client.get("/", &[]);
            assert_eq!((r.status(), r.upstream()), (200, Some("u1")), "{when}: {:?}", r.result);
            let d = client.get("/", &[("x-vmesh-colour", "drill")]);
            assert_eq!(
                d.error_code(),
                Some("FAULT_INJECTED"),
                "{when}: the drill fault: {:?}",
                d.result
            );
        }
    };
    assert_running_config(&mut client, "before the reload");
    let reloads = |agent: &Agent| agent.admin_json("/config")["reloads"].as_u64().unwrap_or(0);
    let reloads_before = reloads(&agent);

    let running = agent.config();
    agent.write_raw_config(&bad_governance(running.clone(), [u2.addr(), u2.addr()]).to_toml());
    agent.send_signal(Signal::SIGHUP);
    let error = eventually(DEFAULT_WAIT, "/config to report the refused reload", || {
        match &agent.admin_json("/config")["last_reload_error"] {
            serde_json::Value::String(e) => Ok(e.clone()),
            other => Err(format!("last_reload_error = {other}")),
        }
    });
    eprintln!("[reload] last_reload_error: {error}");
    assert_names_every_problem("the refused reload's error", &error.replace("; ", "\n"));
    assert!(agent.try_exit().is_none(), "a bad reload must not stop the agent");
    assert_eq!(
        reloads(&agent),
        reloads_before,
        "a refused reload is not counted as applied"
    );
    assert!(
        metric_sum(
            &agent.metrics_text(),
            "vmesh_config_reloads_total",
            &[("result", "error")]
        ) >= 1.0,
        "{}",
        agent.metrics_text()
    );
    assert_running_config(&mut client, "after the refused reload");
    let shown = agent.admin_json("/config")["config"].to_string();
    assert!(
        !shown.contains("bad-split"),
        "/config shows the refused config: {shown}"
    );

    // The same change without the mistakes applies: the old config stayed by choice.
    agent.reload(
        running
            .clone()
            .outbound(running.outbound_for("shop").clear_endpoints().endpoint(u2.addr())),
    );
    eventually(Duration::from_secs(10), "a good reload to move shop to u2", || {
        let r = client.get("/", &[]);
        match r.upstream() {
            Some("u2") => Ok(()),
            _ => Err(r.label()),
        }
    });
    assert!(agent.admin_json("/config")["last_reload_error"].is_null());
}
