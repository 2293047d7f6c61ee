//! Agent restarts under load: with the listening sockets held across the restart (systemd
//! socket activation, emulated by tests/fixtures/socket_activate.py where PID 1 is not
//! systemd), a restart refuses and fails no request.

use std::process::Command;
use std::time::Duration;

use nix::sys::signal::Signal;
use vmesh_tests::agent::{AgentBuilder, Outbound};
use vmesh_tests::binary::{fixture, vmesh_bin};
use vmesh_tests::clients::{wrk, WrkSummary};
use vmesh_tests::eventually::eventually;
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

#[test]
fn wrk_summary_is_parsed() {
    let out = "  80000 requests in 8.00s, 10.00MB read\n  Socket errors: connect 1, read 2, write 0, timeout 3\n  Non-2xx or 3xx responses: 4\n";
    let summary = WrkSummary::parse(out);
    assert_eq!(
        (summary.requests, summary.socket_errors, summary.non_2xx),
        (80000, 6, 4)
    );
}
