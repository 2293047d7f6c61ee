//! systemd readiness: with `NOTIFY_SOCKET` set (as systemd does for `Type=notify`), the agent
//! sends READY=1 once it is up, WATCHDOG=1 pings when `WATCHDOG_USEC` asks for them, and
//! STOPPING=1 when it drains on SIGTERM. The test plays systemd's side of the socket.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use vmesh_tests::agent::{vmesh_command, AgentBuilder, Outbound};
use vmesh_tests::process::Process;
use vmesh_tests::upstream::Upstream;

/// Messages received on the socket until `until` matches one or `timeout` passes.
fn receive(sock: &UnixDatagram, timeout: Duration, until: impl Fn(&str) -> bool) -> Vec<String> {
    let deadline = Instant::now() + timeout;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = sock.recv(&mut buf) {
            let msg = String::from_utf8_lossy(&buf[..n]).to_string();
            let done = until(&msg);
            got.push(msg);
            if done {
                break;
            }
        }
    }
    got
}

#[test]
fn ready_watchdog_and_stopping_reach_systemd() {
    let up = Upstream::python("app").spawn();
    let dir = tempfile::tempdir().expect("temp dir");
    let builder = AgentBuilder::new()
        .telemetry_set("access_log", "off")
        .agent_set("data_dir", dir.path().join("data").display().to_string())
        .outbound(Outbound::new("orders").endpoint(up.addr()));
    let config = dir.path().join("vmesh.toml");
    std::fs::write(&config, builder.to_toml()).expect("write config");
    let socket_path = dir.path().join("notify.sock");
    let sock = UnixDatagram::bind(&socket_path).expect("bind the notify socket");
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .expect("read timeout");

    let mut cmd = vmesh_command();
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "1000000");
    let mut agent = Process::spawn("vmesh", cmd, dir.path());

    let first = receive(&sock, Duration::from_secs(15), |m| m.contains("READY=1"));
    assert!(
        first.iter().any(|m| m.contains("READY=1")),
        "READY=1 was sent: {first:?}\n{}",
        agent.stderr_tail(20)
    );
    // Pings at half the watchdog period (1 s): wait (bounded) for five of them, then check
    // their rhythm. The median gap must stay within the period (systemd would kill the service
    // otherwise) and no gap may be tiny (pings are paced, not sent in a burst); the median
    // ignores one late wake-up on a loaded machine.
    let mut at = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while at.len() < 5 && Instant::now() < deadline {
        let got = receive(&sock, Duration::from_millis(200), |m| m.contains("WATCHDOG=1"));
        if got.iter().any(|m| m.contains("WATCHDOG=1")) {
            at.push(Instant::now());
        }
    }
    assert_eq!(
        at.len(),
        5,
        "five WATCHDOG=1 pings within 20 s (one every 500 ms expected)"
    );
    let mut gaps: Vec<Duration> = at.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.sort();
    assert!(
        gaps[gaps.len() / 2] < Duration::from_secs(1),
        "median gap between pings {:?} is not within WATCHDOG_USEC (1 s): {gaps:?}",
        gaps[gaps.len() / 2]
    );
    assert!(gaps[0] >= Duration::from_millis(100), "pings in a burst: {gaps:?}");

    agent.signal(Signal::SIGTERM);
    let last = receive(&sock, Duration::from_secs(10), |m| m.contains("STOPPING=1"));
    assert!(
        last.iter().any(|m| m.contains("STOPPING=1")),
        "STOPPING=1 on SIGTERM: {last:?}"
    );
    assert!(
        agent.wait_exit(Duration::from_secs(15)).success(),
        "{}",
        agent.stderr_tail(20)
    );
}
