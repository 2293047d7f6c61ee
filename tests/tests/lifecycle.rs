//! Process lifecycle: SIGHUP reloads (good and bad configs), `check-config`, SIGTERM drain.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use vmesh_tests::agent::check_config;
use vmesh_tests::{assert_eventually, eventually, Agent, AgentBuilder, Curl, Outbound, Signal, Upstream, DEFAULT_WAIT};

fn reload_state(agent: &Agent) -> (u64, serde_json::Value) {
    let doc = agent.admin_json("/config");
    (doc["reloads"].as_u64().unwrap_or(0), doc["last_reload_error"].clone())
}

#[test]
fn sighup_applies_a_changed_valid_config() {
    let u1 = Upstream::python("u1").spawn();
    let u2 = Upstream::python("u2").spawn();
    let mut agent = Agent::builder()
        .outbound(Outbound::new("orders").endpoint(u1.addr()))
        .start();
    let r = Curl::get(agent.outbound_url("orders", "/")).run();
    assert_eq!(r.header("x-upstream-name"), Some("u1"), "{r}");
    let (reloads_before, _) = reload_state(&agent);

    // New endpoint for orders, and a new outbound with its own port.
    let config = agent.config();
    let orders = config.outbound_for("orders").clear_endpoints().endpoint(u2.addr());
    let config = config
        .outbound(orders)
        .outbound(Outbound::new("billing").endpoint(u1.addr()));
    agent.reload(config);

    let orders_url = agent.outbound_url("orders", "/");
    eventually(DEFAULT_WAIT, "orders to move to u2 after SIGHUP", || {
        let r = Curl::get(orders_url.clone()).run();
        match r.header("x-upstream-name") {
            Some("u2") => Ok(()),
            _ => Err(r.to_string()),
        }
    });
    let billing_url = agent.outbound_url("billing", "/");
    eventually(DEFAULT_WAIT, "the new billing port to serve after SIGHUP", || {
        let r = Curl::get(billing_url.clone()).run();
        match (r.status, r.header("x-upstream-name")) {
            (200, Some("u1")) => Ok(()),
            _ => Err(r.to_string()),
        }
    });
    let (reloads, error) = reload_state(&agent);
    assert!(reloads > reloads_before, "reloads counter did not move: {reloads}");
    assert!(error.is_null(), "a good reload left last_reload_error = {error}");
    let shown = agent.admin_json("/config")["config"].to_string();
    assert!(
        shown.contains("billing"),
        "/config does not show the reloaded config: {shown}"
    );
    agent.send_signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "SIGTERM after a reload: {status}");
}

#[test]
fn sighup_with_an_invalid_config_keeps_serving_the_old_one() {
    let u1 = Upstream::python("u1").spawn();
    let u2 = Upstream::python("u2").spawn();
    let mut agent = Agent::builder()
        .outbound(Outbound::new("orders").endpoint(u1.addr()))
        .start();
    let url = agent.outbound_url("orders", "/");
    Curl::get(url.clone()).run().expect_status(200);

    // Valid TOML, invalid config: an unknown key (and a changed endpoint that must NOT apply).
    let bad = agent
        .config()
        .agent_set("no_such_key", true)
        .outbound(Outbound::new("orders").clear_endpoints().endpoint(u2.addr()));
    agent.write_raw_config(&bad.to_toml());
    agent.send_signal(Signal::SIGHUP);
    let error = eventually(
        DEFAULT_WAIT,
        "/config to report the failed reload",
        || match reload_state(&agent).1 {
            serde_json::Value::String(e) => Ok(e),
            other => Err(format!("last_reload_error = {other}")),
        },
    );
    assert!(
        error.contains("no_such_key"),
        "the reload error must name the key: {error}"
    );
    for _ in 0..5 {
        let r = Curl::get(url.clone()).run();
        assert_eq!((r.status, r.header("x-upstream-name")), (200, Some("u1")), "{r}");
    }
    assert!(agent.try_exit().is_none(), "a bad reload must not stop the agent");

    // Broken TOML syntax: same story.
    agent.write_raw_config("[agent\nthis is not toml");
    agent.send_signal(Signal::SIGHUP);
    let first_error = error;
    eventually(
        DEFAULT_WAIT,
        "/config to report the unparsable file",
        || match reload_state(&agent).1 {
            serde_json::Value::String(e) if e != first_error => Ok(()),
            other => Err(format!("last_reload_error = {other}")),
        },
    );
    Curl::get(url.clone()).run().expect_status(200);

    // A good config afterwards applies and clears the error.
    let good = agent.config();
    agent.reload(good);
    assert_eventually!(
        reload_state(&agent).1.is_null(),
        "a good reload to clear last_reload_error"
    );
    Curl::get(url).run().expect_status(200);
    // Two refused reloads leave nothing behind that spoils the stop.
    agent.send_signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(15));
    assert_eq!(status.code(), Some(0), "SIGTERM after refused reloads: {status}");
}

#[test]
fn check_config_reports_every_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let good = Agent::builder().outbound(Outbound::new("orders").endpoint(vmesh_tests::free_addr()));
    let good_path = dir.path().join("good.toml");
    std::fs::write(&good_path, good.to_toml()).expect("write good config");
    let out = check_config(&good_path);
    assert!(
        out.status.success(),
        "a valid config must pass check-config: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let bad = good.agent_set("colour_of_sky", "blue").outbound(
        Outbound::new("orders")
            .balancer("fastest-possible")
            .timeout("soon")
            .endpoint(vmesh_tests::free_addr()),
    );
    let bad_path = dir.path().join("bad.toml");
    std::fs::write(&bad_path, bad.to_toml()).expect("write bad config");
    let out = check_config(&bad_path);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(2), "invalid config must exit 2: {text}");
    for key in ["colour_of_sky", "balancer", "timeout"] {
        assert!(text.contains(key), "check-config must name `{key}`:\n{text}");
    }
    let errors = text.lines().filter(|l| l.trim_start().starts_with("error:")).count();
    assert!(
        errors >= 3,
        "one `error:` line per problem expected, got {errors}:\n{text}"
    );
}

#[test]
fn sigterm_finishes_in_flight_requests_refuses_new_ones_and_exits_zero() {
    let up = Upstream::python("slowpoke").spawn();
    let mut agent = Agent::builder()
        .outbound(Outbound::new("orders").timeout("20s").endpoint(up.addr()))
        .start();
    let addr = agent.outbound_addr("orders");
    let url = agent.outbound_url("orders", "/slow?ms=2500");
    let in_flight = std::thread::spawn(move || Curl::get(url).run());
    assert_eventually!(up.in_flight() == 1, "the slow request to reach the upstream");

    agent.send_signal(Signal::SIGTERM);
    eventually(
        Duration::from_secs(2),
        "the listener to refuse new connections",
        || match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Ok(()),
            other => Err(format!("{other:?}")),
        },
    );
    assert!(
        !in_flight.is_finished(),
        "the in-flight request ended before the listener closed: the drain did not wait for it"
    );

    let r = in_flight.join().expect("in-flight curl thread");
    r.expect_status(200);
    assert_eq!(r.header("x-upstream-name"), Some("slowpoke"));
    let status = agent.wait_exit(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "vmesh must exit 0 after draining: {status}");
}

#[test]
fn sigterm_with_idle_keep_alive_connections_exits_promptly() {
    let up = Upstream::python("app").spawn();
    let mut agent = Agent::builder()
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    // An idle keep-alive client connection after one complete request.
    let mut idle = TcpStream::connect(agent.outbound_addr("orders")).expect("connect");
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: orders\r\n\r\n")
        .expect("write");
    idle.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).expect("read response");
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));

    let started = Instant::now();
    agent.send_signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(8));
    assert_eq!(status.code(), Some(0), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "an idle connection held the exit for {:?} (drain_timeout is 10s)",
        started.elapsed()
    );
}

#[test]
fn drain_timeout_bounds_the_shutdown() {
    let up = Upstream::python("glacier").spawn();
    let mut agent = Agent::builder()
        .agent_set("drain_timeout", "1s")
        .outbound(Outbound::new("orders").timeout("30s").endpoint(up.addr()))
        .start();
    let url = agent.outbound_url("orders", "/slow?ms=15000");
    let _in_flight = std::thread::spawn(move || Curl::get(url).run());
    assert_eventually!(up.in_flight() == 1, "the slow request to reach the upstream");
    let started = Instant::now();
    agent.send_signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(6));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "drain_timeout 1s, but exit took {:?}",
        started.elapsed()
    );
    // A drain cut short by its timeout is still an orderly stop (docs/config.md: exits 0).
    assert_eq!(status.code(), Some(0), "exit after the drain timeout: {status}");
}

/// Starts `vmesh run --config <config>` and returns its exit status (bounded wait) and stderr.
fn run_until_exit(config: &str) -> (std::process::ExitStatus, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("vmesh.toml");
    std::fs::write(&path, config).expect("write config");
    let mut cmd = vmesh_tests::agent::vmesh_command();
    cmd.arg("run").arg("--config").arg(&path);
    let mut process = vmesh_tests::Process::spawn("vmesh", cmd, dir.path());
    let status = process.wait_exit(Duration::from_secs(15));
    (status, process.stderr())
}

/// Runs the agent of `builder` with an outbound "orders" whose listen port another socket holds,
/// asserts it exits 1, and returns that port and the agent's stderr.
fn run_with_a_taken_port(builder: AgentBuilder) -> (std::net::SocketAddr, String) {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().expect("local addr");
    let config = builder
        .outbound(
            Outbound::new("orders")
                .set("listen", port.to_string())
                .endpoint(vmesh_tests::free_addr()),
        )
        .to_toml();
    let (status, stderr) = run_until_exit(&config);
    assert_eq!(status.code(), Some(1), "port in use: {status}\n{stderr}");
    (port, stderr)
}

#[test]
fn run_exits_2_on_an_invalid_config_and_1_when_a_port_is_taken() {
    // An invalid config: the check-config report, exit 2, nothing started.
    let bad = Agent::builder().agent_set("colour_of_sky", "blue").to_toml();
    let (status, stderr) = run_until_exit(&bad);
    assert_eq!(status.code(), Some(2), "invalid config: {status}\n{stderr}");
    assert!(stderr.contains("colour_of_sky"), "the report names the key: {stderr}");

    // A valid config whose outbound port is already bound: a start-up failure, exit 1.
    let (port, stderr) = run_with_a_taken_port(Agent::builder());
    assert!(
        stderr.contains(&port.to_string()),
        "the error names the address: {stderr}"
    );
}

#[test]
fn a_port_in_use_fails_the_start_before_anything_is_registered() {
    use vmesh_tests::consul::ConsulDouble;
    use vmesh_tests::lifecycle::{self, all_instances, Identity};
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    run_with_a_taken_port(lifecycle::consul(
        lifecycle::instance("web-01", &identity, app.addr(), "0s"),
        &consul,
    ));
    assert!(
        all_instances(&consul).is_empty(),
        "registered before failing: {:?}",
        all_instances(&consul)
    );
    assert_eq!(
        consul.writes()["register"].as_u64().unwrap_or(0),
        0,
        "{}",
        consul.writes()
    );
}
