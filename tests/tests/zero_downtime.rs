//! Agent restarts under load: with the listening sockets held across the restart (systemd
//! socket activation, emulated by tests/fixtures/socket_activate.py where PID 1 is not
//! systemd), a restart refuses and fails no request.

use std::process::Command;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use vmesh_tests::agent::{AgentBuilder, Outbound};
use vmesh_tests::binary::{fixture, vmesh_bin};
use vmesh_tests::clients::{wrk, WrkSummary};
use vmesh_tests::eventually::eventually;
use vmesh_tests::lifecycle::{self, summary, Identity, Load};
use vmesh_tests::ports::free_addr;
use vmesh_tests::process::Process;
use vmesh_tests::tools::{python, require};
use vmesh_tests::upstream::Upstream;

#[test]
fn restart_under_load_fails_no_request() {
    require("wrk");
    let up = Upstream::nginx("app").spawn();
    let listen = free_addr();
    let builder = AgentBuilder::new()
        .telemetry_set("access_log", "off")
        .agent_set("drain_timeout", "5s")
        .outbound(
            Outbound::new("orders")
                .endpoint(up.addr())
                .set("listen", listen.to_string()),
        );
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("vmesh.toml");
    let builder = builder.agent_set("data_dir", dir.path().join("data").display().to_string());
    std::fs::write(&config, builder.to_toml()).expect("write config");
    let admin = builder.to_toml().lines().find_map(|l| {
        l.strip_prefix("admin_listen = ")
            .map(|v| v.trim_matches('"').to_owned())
    });
    let admin = admin.expect("admin_listen in the config");

    let mut cmd = Command::new(python());
    cmd.arg(fixture("socket_activate.py"))
        .args(["--listen", &listen.to_string(), "--listen", &admin, "--"])
        .arg(vmesh_bin())
        .args(["run", "--config"])
        .arg(&config);
    let mut launcher = Process::spawn("socket-activate", cmd, dir.path());
    let live = format!("http://{admin}/live");
    let curl = |url: &str| {
        Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", url])
            .output()
    };
    eventually(Duration::from_secs(15), "the agent answers /live", || {
        match curl(&live) {
            Ok(o) if o.stdout == b"200" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });

    // 8 s of load on 16 keep-alive connections; the agent restarts after 2 s.
    let url = format!("http://{listen}/");
    let load = std::thread::spawn(move || wrk(&url, &["-t2", "-c16", "-d8s"]));
    std::thread::sleep(Duration::from_secs(2));
    launcher.signal(Signal::SIGHUP);
    let summary = load.join().expect("wrk thread");
    let text = &summary.output;
    let starts = launcher.stdout().matches("started ").count();

    launcher.signal(Signal::SIGTERM);
    launcher.wait_exit(Duration::from_secs(15));

    let (requests, socket_errors, non_2xx) = (summary.requests, summary.socket_errors, summary.non_2xx);
    assert_eq!(starts, 2, "the agent was restarted once: {}", launcher.stdout());
    assert!(requests > 1000, "load ran: {text}");
    assert_eq!(
        (socket_errors, non_2xx),
        (0, 0),
        "no refused or failed request across the restart:\n{text}"
    );
}

/// A registered instance restarted under steady keep-alive load from clients that do not read
/// the registry (they send to the port itself, as a local client or a health checker would):
/// there is always a request in flight, so a drain that waited for "none in flight" before it
/// stopped accepting used up `drain_timeout` and then cut the requests in flight. The drain
/// stops accepting after the grace, lets the connections finish, then deregisters: no request
/// fails, and the old agent says it drained every connection.
#[test]
fn restart_of_a_registered_instance_under_steady_direct_load_cuts_no_request() {
    let dir = tempfile::tempdir().expect("temp dir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let builder = lifecycle::instance("vm1", &identity, app.addr(), "0s")
        .registry_set("kind", "memory")
        .agent_set("drain_timeout", "6s")
        .agent_set("worker_threads", 1)
        .agent_set("data_dir", dir.path().join("data").display().to_string())
        .telemetry_set("access_log", "off");
    let toml = builder.to_toml();
    let config = dir.path().join("vmesh.toml");
    std::fs::write(&config, &toml).expect("write config");
    let parsed: toml::Table = toml.parse().expect("the config is TOML");
    let text = |section: &str, key: &str| {
        parsed[section][key]
            .as_str()
            .unwrap_or_else(|| panic!("{section}.{key} in the config"))
            .to_owned()
    };
    let (admin, inbound) = (text("agent", "admin_listen"), text("inbound", "listen"));

    let mut cmd = Command::new(python());
    cmd.arg(fixture("socket_activate.py"))
        .args(["--listen", &inbound, "--listen", &admin, "--"])
        .arg(vmesh_bin())
        .args(["run", "--config"])
        .arg(&config);
    let mut launcher = Process::spawn("socket-activate", cmd, dir.path());
    let admin: std::net::SocketAddr = admin.parse().expect("admin address");
    let registered = |what: &str| {
        eventually(Duration::from_secs(30), what, || {
            match vmesh_tests::http::get(admin, "/status").map(|r| r.json()) {
                Ok(s) if s["lifecycle"]["registered"] == true => Ok(()),
                other => Err(format!("{other:?}")),
            }
        })
    };
    registered("the instance registered");

    // 12 clients, 40 ms per request: some request is always in flight.
    let t0 = Instant::now();
    let load = Load::keep_alive(
        inbound.parse().expect("inbound"),
        "/slow?ms=40",
        12,
        Duration::from_secs(120),
        1_000_000,
    );
    load.wait_answered_by(&["app"], 100, t0, Duration::from_secs(30), "before the restart");
    launcher.signal(Signal::SIGHUP);
    eventually(Duration::from_secs(30), "the agent restarted", || {
        if launcher.stdout().matches("started ").count() >= 2 {
            Ok(())
        } else {
            Err(launcher.stdout())
        }
    });
    let t1 = Instant::now();
    registered("the new agent registered");
    load.wait_answered_by(&["app"], 100, t1, Duration::from_secs(30), "after the restart");
    let records = load.stop();
    launcher.signal(Signal::SIGTERM);
    launcher.wait_exit(Duration::from_secs(20));

    let log = format!("{}{}", launcher.stdout(), launcher.stderr());
    let failed: Vec<_> = records.iter().filter(|r| r.outcome.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the restart: first {:?}; {:?}\n{log}",
        failed.len(),
        records.len(),
        failed.first(),
        summary(&records)
    );
    assert!(
        log.contains("drained: all connections closed") && !log.contains("drain timeout"),
        "the old agent closed its connections within the drain: {log}"
    );
}

#[test]
fn wrk_summary_is_parsed() {
    let out = "  80000 requests in 8.00s, 10.00MB read\n  Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 4\n";
    let summary = WrkSummary::parse(out);
    assert_eq!(
        (summary.requests, summary.socket_errors, summary.non_2xx),
        (80000, 6, 4)
    );
}
