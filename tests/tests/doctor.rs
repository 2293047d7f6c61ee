//! "Is it the sidecar?": `vmesh doctor` and `GET /doctor` on the real binary. CPU pressure made
//! by busy loops while light traffic flows names `host`; an upstream that turns slow names
//! `upstream`; `/metrics` carries the host gauges (checked by promtool) and every access-log
//! line the `host` object; an unreachable admin API exits 3.

use std::net::SocketAddr;
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmesh_tests::agent::vmesh_command;
use vmesh_tests::clients::promtool_check_metrics;
use vmesh_tests::{eventually, free_addr, http, tools, Agent, Outbound, Process, RunningUpstream, Upstream};

/// The tests of this file run one at a time: the busy loops of one would press the host of
/// another.
static SERIAL: Mutex<()> = Mutex::new(());

/// Longest wait for a verdict: the window fills a second at a time and PSI's `avg10` needs
/// ~10 s to follow a change; this leaves room on a loaded 2-core machine.
const VERDICT_WAIT: Duration = Duration::from_secs(100);

/// How long the busy loops spin at most, whatever happens to the test.
const BUSY_SECONDS: u32 = 150;

#[test]
fn busy_loops_make_doctor_name_the_host() {
    let (_one, _upstream, agent) = orders_agent();
    let traffic = Traffic::start(agent.outbound_addr("orders"), "/");

    // Twice as many spinning shells as CPUs, and two more: every CPU always has someone
    // waiting (PSI `some` near 1, a run queue above 2 per CPU). At nice 19, so that the agent
    // and the upstream keep their share of the CPU and only the host is the culprit.
    let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
    let busy = BusyLoops::start(2 * cpus + 2);

    // A verdict on seconds the loops spun in, with traffic in them and the agent's own share
    // measured (not the first second of a window).
    let doc = eventually(VERDICT_WAIT, "vmesh doctor --json to name the host", || {
        let doc = doctor_json(&agent)?;
        let seconds = doc["window_seconds"].as_u64().unwrap_or(0);
        let recent = doc["overhead"]["last_10s"]["requests"].as_u64().unwrap_or(0);
        if seconds < 12 || recent < 5 || doc["host"]["agent_cpu"]["mean"].is_null() {
            return Err(format!("{seconds} s, {recent} recent request(s): {doc}"));
        }
        if doc["verdict"] == "host" {
            Ok(doc)
        } else {
            Err(format!("verdict {}: {}", doc["verdict"], doc["reason"]))
        }
    });
    let host = &doc["host"];
    let pressure = host["cpu_pressure_last_10s"]["max"].as_f64().unwrap_or(0.0);
    let run_queue = host["run_queue"]["max"].as_f64().unwrap_or(0.0);
    assert!(
        pressure >= 0.25 || run_queue >= 2.0 * cpus as f64,
        "the evidence shows the pressure: {doc}"
    );
    let reason = doc["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("CPU pressure") || reason.contains("run queue"),
        "the reason carries the numbers: {reason}"
    );
    assert!(doc["overhead"]["minute"]["requests"].as_u64().unwrap_or(0) > 0, "{doc}");

    // The text form: one screen with the verdict line last.
    let text = eventually(
        Duration::from_secs(20),
        "vmesh doctor to print the host verdict",
        || {
            let text = doctor(&agent, &[])?;
            text.lines()
                .last()
                .is_some_and(|l| l.starts_with("verdict: host: "))
                .then_some(text.clone())
                .ok_or(text)
        },
    );
    assert!(
        text.contains("CPU pressure") && text.contains("sidecar overhead"),
        "{text}"
    );
    assert!(text.lines().count() <= 24, "one screen: {text}");

    drop(busy);
    let sent = traffic.stop();
    assert!(sent > 0, "light traffic flowed");
}

#[test]
fn a_slowed_upstream_makes_doctor_name_the_upstream() {
    let (_one, _upstream, agent) = orders_agent();
    let traffic = Traffic::start(agent.outbound_addr("orders"), "/");

    // A baseline first: some seconds of fast answers. Upstream time dominates the proxy's own
    // time already (an HTTP app is slower than a proxy), and that alone is not a culprit.
    let before = eventually(Duration::from_secs(60), "a baseline of fast answers in /doctor", || {
        let doc = doctor_json(&agent)?;
        let seconds = doc["window_seconds"].as_u64().unwrap_or(0);
        let requests = doc["upstream"]["minute"]["requests"].as_u64().unwrap_or(0);
        if seconds >= 13 && requests >= 30 {
            Ok(doc)
        } else {
            Err(format!("{seconds} s, {requests} request(s)"))
        }
    });
    assert_ne!(before["verdict"], "upstream", "fast answers are no culprit: {before}");

    // Now every answer takes 500 ms (the upstream is slow, the host is not).
    traffic.set_path("/slow?ms=500");
    let doc = eventually(VERDICT_WAIT, "vmesh doctor --json to name the upstream", || {
        let doc = doctor_json(&agent)?;
        if doc["verdict"] == "upstream" {
            Ok(doc)
        } else {
            Err(format!("verdict {}: {}", doc["verdict"], doc["reason"]))
        }
    });
    let now = doc["upstream"]["last_10s"]["p50_ms"].as_f64().unwrap_or(0.0);
    let baseline = doc["upstream"]["baseline_p50_ms"].as_f64().unwrap_or(f64::MAX);
    assert!(now >= 250.0, "the recent p50 is the slow one: {doc}");
    assert!(baseline < 50.0, "the baseline is the fast one: {doc}");
    assert!(
        doc["reason"].as_str().is_some_and(|r| r.contains("upstream p50 rose")),
        "{doc}"
    );

    let out = agent.run_cli(&["doctor"]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("upstream time"), "{text}");
    traffic.stop();
}

#[test]
fn host_gauges_in_metrics_and_the_access_log_and_exit_3_when_unreachable() {
    let (_one, _upstream, agent) = orders_agent();

    // The sampler's second reading gives the shares over a second (steal, the agent's CPU).
    let metrics = eventually(Duration::from_secs(20), "the host gauges in /metrics", || {
        let text = agent.metrics_text();
        let missing: Vec<&str> = [
            "vmesh_host_cpu_pressure_ratio",
            "vmesh_host_cpu_steal_ratio ",
            "vmesh_host_run_queue ",
            "vmesh_agent_cpu_ratio ",
        ]
        .into_iter()
        .filter(|name| !text.lines().any(|l| l.starts_with(name)))
        .collect();
        if missing.is_empty() {
            Ok(text)
        } else {
            Err(format!("missing {missing:?}"))
        }
    });
    // This machine has /proc/pressure/cpu (Linux 4.20+ with PSI on): the host series is there.
    let pressure = value(&metrics, "vmesh_host_cpu_pressure_ratio{scope=\"host\"}");
    assert!((0.0..=1.0).contains(&pressure), "{pressure}");
    let run_queue = value(&metrics, "vmesh_host_run_queue");
    assert!(run_queue >= 1.0, "the sampler itself runs: {run_queue}");
    for name in ["vmesh_host_cpu_steal_ratio", "vmesh_agent_cpu_ratio"] {
        let v = value(&metrics, name);
        assert!((0.0..=1.0).contains(&v), "{name} {v}");
    }
    let (ok, report) = promtool_check_metrics(&metrics);
    assert!(ok, "promtool check metrics failed:\n{report}");

    // Every access-log line carries the host object.
    let response = http::get(agent.outbound_addr("orders"), "/").expect("request through the agent");
    assert_eq!(response.status, 200);
    let line = eventually(Duration::from_secs(10), "the access-log line", || {
        agent
            .access_log()
            .into_iter()
            .find(|l| l["service"] == "orders")
            .ok_or_else(|| "no line yet".to_string())
    });
    let host = &line["host"];
    for key in ["cpu_pressure", "cpu_steal", "run_queue", "agent_cpu"] {
        assert!(host.get(key).is_some(), "host.{key} missing: {line}");
    }
    assert!(host["run_queue"].as_u64().is_some_and(|q| q >= 1), "{line}");

    // An admin API nobody listens on: exit 3, like the other client commands.
    let out: Output = vmesh_command()
        .args(["doctor", "--admin", &free_addr().to_string()])
        .output()
        .expect("run vmesh doctor");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ADMIN_UNREACHABLE"));
}

// === helpers ===

/// One test at a time ([`SERIAL`]), an upstream "orders" and an agent whose outbound "orders"
/// is that upstream; bind them in this order so that they drop in reverse.
fn orders_agent() -> (MutexGuard<'static, ()>, RunningUpstream, Agent) {
    let one = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let upstream = Upstream::python("orders").spawn();
    let agent = Agent::builder()
        .outbound(Outbound::new("orders").endpoint(upstream.addr()))
        .start();
    (one, upstream, agent)
}

/// `vmesh doctor <args>` for `agent`: its stdout, or `Err` with the exit status and stderr
/// unless it exits 0.
fn doctor(agent: &Agent, args: &[&str]) -> Result<String, String> {
    let out = agent.run_cli(&[&["doctor"], args].concat());
    if out.status.code() != Some(0) {
        return Err(format!(
            "exit {:?}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `vmesh doctor --json` for `agent`, parsed; `Err` on another exit code or bad JSON.
fn doctor_json(agent: &Agent) -> Result<serde_json::Value, String> {
    let text = doctor(agent, &["--json"])?;
    serde_json::from_str(&text).map_err(|e| format!("not JSON ({e}): {text}"))
}

fn value(metrics: &str, series: &str) -> f64 {
    vmesh_tests::agent::metric_value(metrics, series).unwrap_or_else(|| panic!("no {series} in:\n{metrics}"))
}

/// Light traffic: one request every 100 ms to `addr`, from a thread, at most 3 minutes or
/// 2,000 requests.
struct Traffic {
    path: Arc<Mutex<String>>,
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicU64>,
    thread: Option<JoinHandle<()>>,
}

impl Traffic {
    fn start(addr: SocketAddr, path: &str) -> Traffic {
        let path = Arc::new(Mutex::new(path.to_string()));
        let stop = Arc::new(AtomicBool::new(false));
        let sent = Arc::new(AtomicU64::new(0));
        let (p, s, n) = (path.clone(), stop.clone(), sent.clone());
        let thread = std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(180);
            while !s.load(Ordering::Relaxed) && Instant::now() < deadline && n.load(Ordering::Relaxed) < 2_000 {
                let path = p.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let _ = http::get(addr, &path);
                n.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Traffic {
            path,
            stop,
            sent,
            thread: Some(thread),
        }
    }

    fn set_path(&self, path: &str) {
        *self.path.lock().unwrap_or_else(|e| e.into_inner()) = path.to_string();
    }

    /// Stops the thread; returns the requests sent.
    fn stop(mut self) -> u64 {
        self.halt();
        self.sent.load(Ordering::Relaxed)
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for Traffic {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Shells spinning at nice 19, each ending by itself after [`BUSY_SECONDS`], killed on drop.
struct BusyLoops {
    _dir: tempfile::TempDir,
    loops: Vec<Process>,
}

impl BusyLoops {
    fn start(n: usize) -> BusyLoops {
        let dir = tempfile::tempdir().expect("tempdir");
        let loops = (0..n)
            .map(|i| {
                let mut cmd = Command::new(tools::require("nice"));
                cmd.args(["-n", "19", "bash", "-c"])
                    .arg(format!("while [ $SECONDS -lt {BUSY_SECONDS} ]; do :; done"));
                Process::spawn(&format!("busy-{i}"), cmd, dir.path())
            })
            .collect();
        BusyLoops { _dir: dir, loops }
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for p in &mut self.loops {
            p.kill();
        }
    }
}
