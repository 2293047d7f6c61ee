//! The drain-under-load scenario, written once and run per registry (the Consul double, etcd)
//! and per client (a connection per request, HTTP/1.1 keep-alive with wrk, HTTP/2 with h2load):
//! two instances of "orders" behind a caller vmesh that discovers them from the registry; under
//! steady load through the caller, `vmesh drain` takes instance A out (nothing new reaches it,
//! the registry keeps it out across anti-entropy), `vmesh undrain` brings it back with a new
//! slow start, and a SIGTERM stops it (exit 0, deregistered): no request fails at any point.
//!
//! ```text
//! drain_load::run(&Registry::Consul(&consul), Client::Http1KeepAlive);
//! ```

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use crate::consul::ConsulDouble;
use crate::etcd::Etcd;
use crate::eventually::{eventually, DEFAULT_WAIT};
use crate::lifecycle::{self, agent_service, etcd_key, meta, passing_ids, summary, Caller, CliRun, Identity, Load};
use crate::process::Process;
use crate::{h2load, tools, Agent, AgentBuilder, Upstream};

/// The path every client requests: ~30 ms at the app, so requests are in flight during a drain.
const LOAD_PATH: &str = "/slow";
const LOAD_URL_PATH: &str = "/slow?ms=30";
/// Upper bounds of any load (time, and requests for the per-request client).
const LOAD_MAX: Duration = Duration::from_secs(90);
const LOAD_MAX_REQUESTS: usize = 50_000;
/// Concurrent client connections.
const CONNECTIONS: usize = 4;

/// The registry the instances and the caller use.
pub enum Registry<'a> {
    /// The Consul test double.
    Consul(&'a ConsulDouble),
    /// A real etcd.
    Etcd(&'a Etcd),
}

/// How the load reaches the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Client {
    /// A new connection per request (threads in this process).
    ConnectionPerRequest,
    /// HTTP/1.1 keep-alive: `wrk`, 4 connections kept open for the whole run.
    Http1KeepAlive,
    /// HTTP/2 prior knowledge: back-to-back `h2load` runs of 4 connections x 200 requests, so
    /// connections stay open across each step of the scenario.
    Http2,
}

/// What a load saw, once stopped.
#[derive(Debug, Clone)]
pub struct LoadResult {
    /// Requests that got an answer or failed.
    pub requests: u64,
    /// Requests that failed: a transport error, or any status but 200.
    pub failed: u64,
    /// The client's own report, for messages.
    pub report: String,
}

/// A running load of one of the [`Client`] kinds.
pub enum RunningLoad {
    PerRequest(Load),
    Wrk(Process, tempfile::TempDir),
    H2load {
        stop: Arc<AtomicBool>,
        thread: JoinHandle<LoadResult>,
    },
}

// === impl Registry ===

impl Registry<'_> {
    /// Points an agent at this registry.
    pub fn configure(&self, builder: AgentBuilder) -> AgentBuilder {
        match self {
            Registry::Consul(c) => lifecycle::consul(builder, c),
            Registry::Etcd(e) => lifecycle::etcd(builder, e),
        }
    }

    /// Whether instance `id` of "orders" is offered to callers (Consul: passing; etcd: its key).
    pub fn offers(&self, id: &str) -> bool {
        match self {
            Registry::Consul(c) => passing_ids(c, "orders").iter().any(|i| i == id),
            Registry::Etcd(e) => e.value(&etcd_key("orders", id)).is_some(),
        }
    }

    /// Whether instance `id` is registered at all (Consul: passing or not; etcd: its key).
    pub fn holds(&self, id: &str) -> bool {
        match self {
            Registry::Consul(c) => agent_service(c, id).is_some(),
            Registry::Etcd(e) => e.value(&etcd_key("orders", id)).is_some(),
        }
    }

    /// The ramp start (unix seconds) instance `id` advertises.
    pub fn ramp_start(&self, id: &str) -> u64 {
        match self {
            Registry::Consul(c) => {
                let svc = agent_service(c, id).unwrap_or_else(|| panic!("{id} not registered"));
                meta(&svc, "vmesh-ramp-start")
                    .parse()
                    .unwrap_or_else(|e| panic!("vmesh-ramp-start of {id}: {e}"))
            }
            Registry::Etcd(e) => {
                let v = e
                    .json(&etcd_key("orders", id))
                    .unwrap_or_else(|| panic!("{id} not registered"));
                v["meta"]["ramp_start"]
                    .as_u64()
                    .unwrap_or_else(|| panic!("no numeric ramp_start: {v}"))
            }
        }
    }

    /// Waits until exactly `want` are offered (in any order).
    pub fn wait_offered(&self, want: &[&str]) {
        eventually(DEFAULT_WAIT, &format!("the registry to offer {want:?}"), || {
            let offered: Vec<&str> = ["orders-node-a", "orders-node-b"]
                .into_iter()
                .filter(|id| self.offers(id))
                .collect();
            let mut want = want.to_vec();
            want.sort_unstable();
            if offered == want {
                Ok(())
            } else {
                Err(format!("{offered:?}"))
            }
        });
    }
}

// === impl Client ===

impl Client {
    /// Starts the load on `addr` (the caller's outbound port for "orders").
    pub fn start(self, addr: SocketAddr) -> RunningLoad {
        let url = format!("http://{addr}{LOAD_URL_PATH}");
        match self {
            Client::ConnectionPerRequest => RunningLoad::PerRequest(Load::start(
                addr,
                LOAD_URL_PATH,
                CONNECTIONS,
                LOAD_MAX,
                LOAD_MAX_REQUESTS,
            )),
            Client::Http1KeepAlive => {
                let dir = tempfile::tempdir().expect("tempdir");
                let mut cmd = tools::command("wrk");
                cmd.args(["-t", "1", "-c", &CONNECTIONS.to_string()])
                    .args(["-d", &format!("{}s", LOAD_MAX.as_secs()), "--timeout", "10s"])
                    .arg(&url);
                RunningLoad::Wrk(Process::spawn("wrk", cmd, dir.path()), dir)
            }
            Client::Http2 => {
                let stop = Arc::new(AtomicBool::new(false));
                let flag = stop.clone();
                let thread = std::thread::spawn(move || {
                    let begin = Instant::now();
                    let mut result = LoadResult {
                        requests: 0,
                        failed: 0,
                        report: String::new(),
                    };
                    while !flag.load(Ordering::SeqCst) && begin.elapsed() < LOAD_MAX {
                        let run = h2load(&url, &["-n", "200", "-c", &CONNECTIONS.to_string(), "-m", "1"]);
                        let answered_200 = run.status_2xx.min(run.done);
                        result.requests += 200;
                        result.failed += 200 - answered_200;
                        if answered_200 < 200 && result.report.is_empty() {
                            result.report = run.output;
                        }
                    }
                    result
                });
                RunningLoad::H2load { stop, thread }
            }
        }
    }
}

// === impl RunningLoad ===

impl RunningLoad {
    /// Stops the load (bounded) and returns what it saw.
    pub fn stop(self) -> LoadResult {
        match self {
            RunningLoad::PerRequest(load) => {
                let records = load.stop();
                let failed = records.iter().filter(|r| r.outcome.is_err()).count();
                LoadResult {
                    requests: records.len() as u64,
                    failed: failed as u64,
                    report: format!(
                        "first failure {:?}; all: {:?}",
                        records.iter().find(|r| r.outcome.is_err()),
                        summary(&records)
                    ),
                }
            }
            RunningLoad::Wrk(mut process, _dir) => {
                // wrk stops and prints its report on SIGINT.
                process.signal(Signal::SIGINT);
                let status = process.wait_exit(Duration::from_secs(15));
                let out = process.stdout();
                let report = format!("wrk exited {status}:\n{out}\n{}", process.stderr());
                let number_before = |word: &str| -> Option<u64> {
                    let at = out.find(word)?;
                    out[..at].split_whitespace().last()?.parse().ok()
                };
                let requests = number_before(" requests in").unwrap_or_else(|| panic!("no request count in {report}"));
                let after = |prefix: &str| -> u64 {
                    out.lines()
                        .find_map(|l| l.trim().strip_prefix(prefix))
                        .map(|rest| {
                            rest.split(',')
                                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                                .sum()
                        })
                        .unwrap_or(0)
                };
                let failed = after("Socket errors:") + after("Non-2xx or 3xx responses:");
                LoadResult {
                    requests,
                    failed,
                    report,
                }
            }
            RunningLoad::H2load { stop, thread } => {
                stop.store(true, Ordering::SeqCst);
                thread.join().expect("h2load thread")
            }
        }
    }
}

fn cli(agent: &Agent, args: &[&str]) -> CliRun {
    agent.run_cli(args).into()
}

/// Checks `holds` every 100 ms for `period` (an observation window, not a wait for state);
/// panics the first time it is false.
pub fn stays(period: Duration, what: &str, mut holds: impl FnMut() -> bool) {
    let begin = Instant::now();
    while begin.elapsed() < period {
        assert!(holds(), "expected {what}, broken after {:?}", begin.elapsed());
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Waits until the load has brought `n` more requests to `app` (counted at the app, on the
/// load's path only: the agent's health checks do not count).
fn wait_served(app: &crate::RunningUpstream, n: u64, what: &str) {
    let from = app.requests_to(LOAD_PATH);
    eventually(DEFAULT_WAIT, what, || {
        let now = app.requests_to(LOAD_PATH);
        if now >= from + n {
            Ok(())
        } else {
            Err(format!("{} of {n}", now - from))
        }
    });
}

/// The whole scenario (see the module doc) with `client` on `registry`.
pub fn run(registry: &Registry<'_>, client: Client) {
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app_a = Upstream::python("app-a").spawn();
    let app_b = Upstream::python("app-b").spawn();
    let mut a = registry
        .configure(lifecycle::instance("node-a", &identity, app_a.addr(), "0s"))
        .start();
    let b = registry
        .configure(lifecycle::instance("node-b", &identity, app_b.addr(), "0s"))
        .start();
    registry.wait_offered(&["orders-node-a", "orders-node-b"]);
    let ramp_before = registry.ramp_start("orders-node-a");

    // The caller: a third vmesh whose outbound "orders" is discovered from the registry.
    let caller = Caller::start(|builder| registry.configure(builder));
    lifecycle::wait_discovered(&caller, "orders", &[a.inbound_addr(), b.inbound_addr()]);

    let load = client.start(caller.outbound_addr("orders"));
    wait_served(&app_a, 10, "app-a to serve the load");
    wait_served(&app_b, 10, "app-b to serve the load");

    // Drain A while the traffic flows.
    let t_drain = Instant::now();
    let drained = cli(&a, &["drain", "--timeout", "30s"]);
    let drain_took = t_drain.elapsed();
    assert_eq!(drained.code, 0, "vmesh drain must exit 0 once drained: {drained}");
    assert!(
        drained.stdout.contains("request(s) in flight") && drained.stdout.contains("drained"),
        "drain prints its progress: {drained}"
    );
    assert!(
        drain_took >= Duration::from_secs(1),
        "drain must wait the 1 s propagation grace before reporting drained (took {drain_took:?})"
    );
    let lc = a.lifecycle();
    assert_eq!(lc["drain"], "drained", "{lc}");
    assert_eq!(lc["in_flight"], 0, "drained means nothing in flight: {lc}");
    assert_eq!(a.admin_get("/ready").status, 503, "/ready while drained");
    assert!(
        !registry.offers("orders-node-a"),
        "a drained instance must not be offered"
    );
    assert!(registry.offers("orders-node-b"));

    // After drained: the caller sends A nothing new, over at least one anti-entropy interval
    // (2 s), which must not put the drained instance back either.
    let a_at_drain = app_a.requests_to(LOAD_PATH);
    wait_served(&app_b, 100, "the load to go on after the drain");
    stays(Duration::from_millis(2500), "the drained instance to stay out", || {
        !registry.offers("orders-node-a")
    });
    assert_eq!(
        app_a.requests_to(LOAD_PATH),
        a_at_drain,
        "requests sent after `vmesh drain` returned still reached the drained instance"
    );
    assert_eq!(lifecycle::discovered(&caller, "orders"), [b.inbound_addr().to_string()]);

    // Undrain: offered again, with a new slow start, and the caller sends to A again.
    let undrained = cli(&a, &["undrain", "--timeout", "30s"]);
    assert_eq!(undrained.code, 0, "vmesh undrain: {undrained}");
    registry.wait_offered(&["orders-node-a", "orders-node-b"]);
    let ramp_after = registry.ramp_start("orders-node-a");
    assert!(
        ramp_after > ramp_before,
        "undrain must start a new ramp: ramp start {ramp_before} -> {ramp_after}"
    );
    assert_eq!(a.lifecycle()["drain"], "serving");
    assert_eq!(a.admin_get("/ready").status, 200);
    wait_served(&app_a, 10, "the caller to send to A again");

    // SIGTERM under load: marked down, in-flight requests finished, deregistered, exit 0; the
    // caller's pooled connections to A close without failing a request.
    a.send_signal(Signal::SIGTERM);
    let status = a.wait_exit(Duration::from_secs(15));
    assert_eq!(
        status.code(),
        Some(0),
        "vmesh must exit 0 after a SIGTERM drain: {status}"
    );
    assert!(!registry.holds("orders-node-a"), "SIGTERM must deregister A");
    assert!(registry.offers("orders-node-b"));
    wait_served(&app_b, 50, "the load to go on after A stopped");

    let result = load.stop();
    eprintln!(
        "{client:?} load through the caller: {} requests, {} failed",
        result.requests, result.failed
    );
    assert_eq!(
        result.failed, 0,
        "{} of {} requests failed during drain, undrain and stop ({client:?}): {}",
        result.failed, result.requests, result.report
    );
    assert!(
        result.requests >= 200,
        "too little load to prove anything: {}",
        result.report
    );
    drop(b);
}
