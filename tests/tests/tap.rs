//! `vmesh tap` and `GET /tap` with the real binary: under a bounded load to two services, taps
//! print only the requests their filters pass (service, path prefix, status class); a tap
//! reader that does not read loses lines (reported to it) and never slows the requests; the
//! admin token is needed when one is configured; at most four taps at once.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Child, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmesh_tests::agent::vmesh_command;
use vmesh_tests::clients::wrk;
use vmesh_tests::lifecycle::CliRun;
use vmesh_tests::tools::require;
use vmesh_tests::{eventually, http, Agent, Outbound, Upstream, DEFAULT_WAIT};

/// Requests of the background load, at most.
const MAX_REQUESTS: u64 = 20_000;
/// How long the background load runs, at most.
const MAX_LOAD: Duration = Duration::from_secs(60);

/// A `vmesh tap` running in the background.
fn spawn_tap(agent: &Agent, args: &[&str]) -> Child {
    vmesh_command()
        .arg("tap")
        .args(args)
        .arg("--config")
        .arg(agent.config_path())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run vmesh tap")
}

/// Sends `GET` requests round the `targets` (address, path) from two threads until `done` or
/// the bounds; returns how many were sent.
fn load_until(targets: Vec<(SocketAddr, String)>, done: Arc<AtomicBool>) -> std::thread::JoinHandle<u64> {
    std::thread::spawn(move || {
        let sent = Arc::new(AtomicU64::new(0));
        let deadline = Instant::now() + MAX_LOAD;
        let threads: Vec<_> = (0..2)
            .map(|t| {
                let (targets, done, sent) = (targets.clone(), done.clone(), sent.clone());
                std::thread::spawn(move || {
                    let mut i = t;
                    while !done.load(Ordering::SeqCst)
                        && Instant::now() < deadline
                        && sent.fetch_add(1, Ordering::SeqCst) < MAX_REQUESTS
                    {
                        let (addr, path) = &targets[i % targets.len()];
                        let _ = http::get(*addr, &format!("{path}/{i}"));
                        i += 1;
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().expect("load thread");
        }
        sent.load(Ordering::SeqCst)
    })
}

fn wait_output(mut child: Child, what: &str) -> Output {
    let deadline = Instant::now() + MAX_LOAD;
    while child.try_wait().expect("poll vmesh tap").is_none() {
        if Instant::now() >= deadline {
            let _ = child.kill();
            let out = child.wait_with_output().expect("vmesh tap output");
            panic!("{what} did not end in {MAX_LOAD:?}: {}", CliRun::from(out));
        }
        std::thread::sleep(Duration::from_millis(25));
    }
    child.wait_with_output().expect("vmesh tap output")
}

fn json_lines(run: &CliRun) -> Vec<Value> {
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{run}")))
        .collect()
}

#[test]
fn taps_print_only_the_requests_their_filters_pass() {
    let orders = Upstream::nginx("orders-app").spawn();
    // Every second answer is a 500: a mix of 2xx and 5xx.
    let users = Upstream::python("users-app").fail_percent(50).spawn();
    // No access log: the tap captures the request's head by itself.
    let agent = Agent::builder()
        .telemetry_set("access_log", "off")
        .outbound(Outbound::new("orders").endpoint(orders.addr()))
        .outbound(Outbound::new("users").endpoint(users.addr()))
        .start();
    let (o, u) = (agent.outbound_addr("orders"), agent.outbound_addr("users"));

    let five = spawn_tap(
        &agent,
        &["--json", "--limit", "50", "--service", "users", "--status", "5xx"],
    );
    let keep = spawn_tap(
        &agent,
        &[
            "--json",
            "--limit",
            "50",
            "--service",
            "orders",
            "--path-prefix",
            "/keep",
        ],
    );
    let readable = spawn_tap(&agent, &["--limit", "5", "--status", "2xx", "--service", "users"]);
    let done = Arc::new(AtomicBool::new(false));
    let load = load_until(
        vec![
            (o, "/keep".to_owned()),
            (o, "/skip".to_owned()),
            (u, "/users".to_owned()),
            (o, "/keeper".to_owned()),
        ],
        done.clone(),
    );
    let five = CliRun::from(wait_output(five, "tap --service users --status 5xx"));
    let keep = CliRun::from(wait_output(keep, "tap --service orders --path-prefix /keep"));
    let readable = CliRun::from(wait_output(readable, "tap --status 2xx"));
    done.store(true, Ordering::SeqCst);
    let sent = load.join().expect("load");

    assert_eq!(five.code, 0, "{five}");
    let lines = json_lines(&five);
    assert_eq!(lines.len(), 50, "--limit 50: {five}");
    for l in &lines {
        assert_eq!(l["service"], "users", "{l}");
        let status = l["status"].as_u64().unwrap_or(0);
        assert!((500..600).contains(&status), "only 5xx: {l}");
        assert_eq!(l["direction"], "outbound", "{l}");
        assert_eq!(l["method"], "GET", "{l}");
        assert!(l["path"].as_str().unwrap_or("").starts_with("/users/"), "{l}");
        assert_eq!(l["upstream"], users.addr().to_string(), "{l}");
        assert_eq!(l["env"], "vm", "{l}");
        assert!(l["latency_ms"].as_f64().is_some_and(|ms| ms > 0.0), "{l}");
        assert!(l["time"].is_string() && l["authority"].is_string(), "{l}");
    }

    assert_eq!(keep.code, 0, "{keep}");
    let lines = json_lines(&keep);
    assert_eq!(lines.len(), 50, "--limit 50: {keep}");
    let mut keeper = 0;
    for l in &lines {
        assert_eq!(l["service"], "orders", "{l}");
        assert_eq!(l["status"], 200, "{l}");
        let path = l["path"].as_str().unwrap_or("");
        assert!(path.starts_with("/keep"), "only /keep...: {l}");
        keeper += usize::from(path.starts_with("/keeper/"));
    }
    assert!(
        keeper > 0 && keeper < 50,
        "both /keep/ and /keeper/ pass a prefix: {keeper} of 50"
    );

    assert_eq!(readable.code, 0, "{readable}");
    let lines: Vec<&str> = readable.stdout.lines().collect();
    assert_eq!(lines.len(), 5, "{readable}");
    for l in lines {
        assert!(
            l.contains(" outbound users GET ") && l.contains(" 200 ") && l.contains(&format!("-> {}", users.addr())),
            "a readable line per request: {l:?}\n{readable}"
        );
    }
    assert!(sent < MAX_REQUESTS, "the taps ended before the load's bound: {sent}");
}

/// One raw `GET /tap` connection that reads the answer's head and then nothing.
fn raw_tap(admin: SocketAddr, query: &str, token: Option<&str>) -> (TcpStream, String) {
    let mut s = TcpStream::connect(admin).expect("connect admin");
    s.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    write!(s, "GET /tap?{query} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}\r\n").expect("send");
    // The head, byte by byte: nothing of the body is read.
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        match s.read(&mut b) {
            Ok(1) => head.push(b[0]),
            _ => break,
        }
    }
    (s, String::from_utf8_lossy(&head).into_owned())
}

fn status_of(head: &str) -> u16 {
    head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

#[test]
fn a_tap_reader_that_does_not_read_loses_lines_and_never_slows_requests() {
    require("wrk");
    let up = Upstream::nginx("app").spawn();
    let agent = Agent::builder()
        .telemetry_set("access_log", "off")
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    let url = agent.outbound_url("orders", "/");

    // Attached, and then never read: its queue and the socket's buffers fill up.
    let (mut stalled, head) = raw_tap(agent.admin_addr(), "", None);
    assert_eq!(status_of(&head), 200, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("transfer-encoding: chunked"),
        "{head}"
    );

    // A bounded load (6 s) through the agent meanwhile.
    let summary = wrk(&url, &["-t1", "-c4", "-d6s", "--latency"]);
    let text = &summary.output;
    let (requests, errors, non_2xx, p99) = (
        summary.requests,
        summary.socket_errors,
        summary.non_2xx,
        summary.latency_ms("99%"),
    );
    assert!(
        requests > 3000,
        "the load ran (far more lines than a tap holds): {text}"
    );
    assert_eq!((errors, non_2xx), (0, 0), "every request answered: {text}");
    // A request never waits for the tap: its latency stays that of the proxy alone (~1 ms;
    // the bound leaves room for a loaded 2-core machine).
    assert!(p99 < 250.0, "p99 {p99} ms with a stalled tap: {text}");

    // Now it reads: the stream reports the lines it lost.
    stalled.set_read_timeout(Some(Duration::from_secs(2))).expect("timeout");
    let mut seen = Vec::new();
    let mut buf = [0u8; 64 * 1024];
    let dropped = eventually(Duration::from_secs(30), "a {\"dropped\": N} line on the stream", || {
        match stalled.read(&mut buf) {
            Ok(0) => return Err("the agent closed the tap".to_owned()),
            Ok(n) => seen.extend_from_slice(&buf[..n]),
            Err(e) => return Err(format!("read: {e}")),
        }
        let text = String::from_utf8_lossy(&seen);
        text.lines()
            .find_map(|l| {
                let v: Value = serde_json::from_str(l.trim()).ok()?;
                v["dropped"].as_u64()
            })
            .ok_or_else(|| format!("{} bytes read, no dropped line yet", seen.len()))
    });
    assert!(dropped > 0, "dropped {dropped}");
    assert!(dropped < requests, "dropped {dropped} of {requests}");
}

#[test]
fn a_tap_needs_the_admin_token_and_at_most_four_attach() {
    let up = Upstream::nginx("app").spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("admin-token");
    std::fs::write(&token_file, "s3cret\n").expect("write token");
    let agent = Agent::builder()
        .agent_set("admin_token_file", token_file.display().to_string())
        .outbound(Outbound::new("orders").endpoint(up.addr()))
        .start();
    let admin = agent.admin_addr();

    // No token: 401, from the API and through the CLI (a config without the token file).
    let (_s, head) = raw_tap(admin, "", None);
    assert_eq!(status_of(&head), 401, "{head}");
    let (_s, head) = raw_tap(admin, "", Some("wrong"));
    assert_eq!(status_of(&head), 401, "{head}");
    let refused: CliRun = vmesh_command()
        .args([
            "tap",
            "--admin",
            &admin.to_string(),
            "--config",
            "/nonexistent.toml",
            "--limit",
            "1",
        ])
        .output()
        .expect("run vmesh tap")
        .into();
    assert_eq!(refused.code, 2, "{refused}");
    assert!(refused.stderr.contains("ADMIN_UNAUTHORIZED"), "{refused}");

    // A bad filter: 400 with its code.
    let (_s, head) = raw_tap(admin, "status=6xx", Some("s3cret"));
    assert_eq!(status_of(&head), 400, "{head}");

    // Four taps attach; the fifth is refused with 429 TAP_LIMIT.
    let mut held: Vec<TcpStream> = (0..4)
        .map(|i| {
            let (s, head) = raw_tap(admin, "", Some("s3cret"));
            assert_eq!(status_of(&head), 200, "tap {i}: {head}");
            s
        })
        .collect();
    let (mut fifth, head) = raw_tap(admin, "", Some("s3cret"));
    assert_eq!(status_of(&head), 429, "{head}");
    let mut body = String::new();
    let _ = fifth.read_to_string(&mut body);
    assert!(body.contains("TAP_LIMIT"), "{body}");

    // One tap goes away; once the agent noticed (its next line fails to go out), a new one
    // attaches, and the CLI with the token from the config gets its line.
    drop(held.pop());
    let url = agent.outbound_url("orders", "/");
    eventually(DEFAULT_WAIT, "a tap slot to be free again", || {
        let _ = http::get(agent.outbound_addr("orders"), "/");
        let (_s, head) = raw_tap(admin, "", Some("s3cret"));
        match status_of(&head) {
            200 => Ok(()),
            s => Err(format!("{s}: {url}")),
        }
    });
    drop(held);
    let tap = spawn_tap(&agent, &["--json", "--limit", "1", "--service", "orders"]);
    let done = Arc::new(AtomicBool::new(false));
    let load = load_until(vec![(agent.outbound_addr("orders"), "/x".to_owned())], done.clone());
    let run = CliRun::from(wait_output(tap, "tap with the token"));
    done.store(true, Ordering::SeqCst);
    load.join().expect("load");
    assert_eq!(run.code, 0, "{run}");
    assert_eq!(json_lines(&run).len(), 1, "{run}");
}
