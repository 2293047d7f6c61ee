//! Shared pieces of the traffic-shift, discovery and static-stability tests: a keep-alive
//! HTTP/1.1 client and a steady load over one connection, instance records written the way
//! vmesh (etcd, Consul) and consul-k8s catalog sync (Consul) write them, an agent whose config
//! has a `[kubernetes]` section, the admin API's `/shift` calls (with the admin token), and the
//! arithmetic of splits and ramps.
//!
//! ```text
//! let load = SteadyLoad::start(caller.outbound_addr("web"), "/", PACE);
//! let run = shift_cli(&operator, "web", &["vm=80", "k8s=20"]);
//! let hits = load.wait_hits_since(after, 2_000, Duration::from_secs(30));
//! let split = Split::of(&hits, &["vm-1"], &["k8s-1"]);
//! ```

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::consul::ConsulDouble;
use crate::etcd::Etcd;
use crate::eventually::eventually;
use crate::http::HttpResponse;
use crate::k8s::K8sDouble;
use crate::lifecycle::CliRun;
use crate::{free_addr, Agent, AgentBuilder};

/// How long one request of the keep-alive client may take (connect, write, read).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The longest a [`SteadyLoad`] runs if nobody stops it (a test bound, not a pace).
const LOAD_MAX: Duration = Duration::from_secs(90);

// === keep-alive client ===

/// One HTTP/1.1 connection reused request after request (a client holding a keep-alive
/// connection). A request that fails drops the connection; the next one opens a new one.
pub struct KeepAlive {
    addr: SocketAddr,
    conn: Option<BufReader<TcpStream>>,
    connections: u32,
}

impl KeepAlive {
    /// A client for `addr`; the connection is opened by the first request.
    pub fn new(addr: SocketAddr) -> KeepAlive {
        KeepAlive {
            addr,
            conn: None,
            connections: 0,
        }
    }

    /// How many connections the client has opened so far.
    pub fn connections(&self) -> u32 {
        self.connections
    }

    /// `GET path` on the kept connection; `Err` on any transport or parse failure.
    pub fn get(&mut self, path: &str) -> Result<HttpResponse, String> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: {}\r\n\r\n", self.addr);
        self.exchange(request.as_bytes())
    }

    /// Sends one raw request on the kept connection and reads one response.
    pub fn exchange(&mut self, request: &[u8]) -> Result<HttpResponse, String> {
        if self.conn.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, REQUEST_TIMEOUT)
                .map_err(|e| format!("connect {}: {e}", self.addr))?;
            stream
                .set_read_timeout(Some(REQUEST_TIMEOUT))
                .map_err(|e| e.to_string())?;
            stream
                .set_write_timeout(Some(REQUEST_TIMEOUT))
                .map_err(|e| e.to_string())?;
            stream.set_nodelay(true).map_err(|e| e.to_string())?;
            self.connections += 1;
            self.conn = Some(BufReader::new(stream));
        }
        let result = match self.conn.as_mut() {
            Some(conn) => exchange_on(conn, request),
            None => Err("no connection".to_string()),
        };
        match &result {
            Ok(r) if !r.header("connection").is_some_and(|c| c.eq_ignore_ascii_case("close")) => {}
            _ => self.conn = None,
        }
        result
    }
}

fn exchange_on(conn: &mut BufReader<TcpStream>, request: &[u8]) -> Result<HttpResponse, String> {
    conn.get_mut().write_all(request).map_err(|e| format!("write: {e}"))?;
    read_response(conn)
}

/// Reads one HTTP/1.1 response (head, then a `content-length` or chunked body) from `r`.
pub fn read_response(r: &mut impl BufRead) -> Result<HttpResponse, String> {
    let mut status = 0u16;
    let mut headers = Vec::new();
    let mut line = String::new();
    loop {
        line.clear();
        let n = r.read_line(&mut line).map_err(|e| format!("read head: {e}"))?;
        if n == 0 {
            return Err(if status == 0 {
                "connection closed before a response".to_string()
            } else {
                "connection closed inside the response head".to_string()
            });
        }
        let l = line.trim_end();
        if status == 0 {
            status = l
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| format!("bad status line {l:?}"))?;
            continue;
        }
        if l.is_empty() {
            if status < 200 {
                // An interim answer (100 Continue): the real one follows.
                status = 0;
                headers.clear();
                continue;
            }
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    let header = |name: &str| headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
    let chunked = header("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    let mut body = Vec::new();
    if chunked {
        loop {
            line.clear();
            r.read_line(&mut line).map_err(|e| format!("read chunk size: {e}"))?;
            let size_text = line.trim().split(';').next().unwrap_or_default().to_string();
            let size = usize::from_str_radix(&size_text, 16).map_err(|e| format!("chunk size {size_text:?}: {e}"))?;
            if size == 0 {
                // Trailers, then the empty line.
                loop {
                    line.clear();
                    let n = r.read_line(&mut line).map_err(|e| format!("read trailers: {e}"))?;
                    if n == 0 || line.trim().is_empty() {
                        break;
                    }
                }
                break;
            }
            let mut chunk = vec![0u8; size + 2];
            r.read_exact(&mut chunk).map_err(|e| format!("read chunk: {e}"))?;
            body.extend_from_slice(&chunk[..size]);
        }
    } else if let Some(len) = header("content-length") {
        let len: usize = len.parse().map_err(|e| format!("content-length {len:?}: {e}"))?;
        body = vec![0u8; len];
        r.read_exact(&mut body).map_err(|e| format!("read body: {e}"))?;
    } else if status != 204 && status != 304 {
        // Delimited by close.
        r.read_to_end(&mut body).map_err(|e| format!("read body: {e}"))?;
    }
    Ok(HttpResponse { status, headers, body })
}

// === steady load ===

/// One request of a [`SteadyLoad`].
#[derive(Debug, Clone)]
pub struct Hit {
    /// When the request was written.
    pub start: Instant,
    /// When its answer (or error) was complete.
    pub end: Instant,
    /// `Ok(x-upstream-name)` for a 200 answer, `Err(what went wrong)` otherwise.
    pub outcome: Result<String, String>,
}

impl Hit {
    /// Whether `upstream` answered it.
    pub fn by(&self, upstream: &str) -> bool {
        self.outcome.as_deref() == Ok(upstream)
    }
}

/// One client thread sending `GET path` over one keep-alive connection, one request at a time,
/// at most one per `pace`, until stopped (bounded: 90 s).
pub struct SteadyLoad {
    stop: Arc<AtomicBool>,
    hits: Arc<Mutex<Vec<Hit>>>,
    connections: Arc<AtomicU32>,
    thread: Option<JoinHandle<()>>,
}

impl SteadyLoad {
    /// Starts the client thread.
    pub fn start(addr: SocketAddr, path: &str, pace: Duration) -> SteadyLoad {
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicU32::new(0));
        let (stop2, hits2, conns2, path) = (stop.clone(), hits.clone(), connections.clone(), path.to_string());
        let thread = std::thread::spawn(move || {
            let mut client = KeepAlive::new(addr);
            let begin = Instant::now();
            while !stop2.load(Ordering::SeqCst) && begin.elapsed() < LOAD_MAX {
                let start = Instant::now();
                let outcome = crate::lifecycle::classify(client.get(&path));
                let end = Instant::now();
                conns2.store(client.connections(), Ordering::SeqCst);
                if let Ok(mut h) = hits2.lock() {
                    h.push(Hit { start, end, outcome });
                }
                if let Some(rest) = pace.checked_sub(end - start) {
                    std::thread::sleep(rest);
                }
            }
        });
        SteadyLoad {
            stop,
            hits,
            connections,
            thread: Some(thread),
        }
    }

    /// How many requests have finished.
    pub fn len(&self) -> usize {
        self.hits.lock().map(|h| h.len()).unwrap_or(0)
    }

    /// Whether no request has finished yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The requests sent at or after `since`.
    pub fn since(&self, since: Instant) -> Vec<Hit> {
        let hits = self.hits.lock().map(|h| h.clone()).unwrap_or_default();
        let from = hits.partition_point(|h| h.start < since);
        hits[from..].to_vec()
    }

    /// Every request so far.
    pub fn all(&self) -> Vec<Hit> {
        self.hits.lock().map(|h| h.clone()).unwrap_or_default()
    }

    /// Waits (at most `timeout`) until `n` requests sent at or after `since` have finished;
    /// returns the first `n`.
    pub fn wait_hits_since(&self, since: Instant, n: usize, timeout: Duration) -> Vec<Hit> {
        eventually(timeout, &format!("{n} requests of the load after the mark"), || {
            let count = self.count_since(since);
            if count >= n {
                Ok(())
            } else {
                Err(format!("{count} so far ({} in all)", self.len()))
            }
        });
        let mut hits = self.since(since);
        hits.truncate(n);
        hits
    }

    fn count_since(&self, since: Instant) -> usize {
        self.hits
            .lock()
            .map(|h| h.len() - h.partition_point(|x| x.start < since))
            .unwrap_or(0)
    }

    /// How many connections the client has opened.
    pub fn connections(&self) -> u32 {
        self.connections.load(Ordering::SeqCst)
    }

    /// The failed requests so far.
    pub fn failures(&self) -> Vec<Hit> {
        self.hits
            .lock()
            .map(|h| h.iter().filter(|x| x.outcome.is_err()).cloned().collect())
            .unwrap_or_default()
    }

    /// Stops the client, waits for it, and returns every request.
    pub fn stop(mut self) -> Vec<Hit> {
        self.halt();
        self.all()
    }

    fn halt(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for SteadyLoad {
    fn drop(&mut self) {
        self.halt();
    }
}

/// Outcome counts (`upstream` or `ERROR <why>`), for assertion messages.
pub fn tally(hits: &[Hit]) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for h in hits {
        let key = match &h.outcome {
            Ok(name) => name.clone(),
            Err(e) => format!("ERROR {e}"),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

// === splits ===

/// Requests per environment in a window of requests.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Split {
    pub vm: usize,
    pub k8s: usize,
    pub failed: usize,
    pub other: usize,
}

impl Split {
    /// Counts `hits` answered by one of `vm` (the vm upstreams' names) or of `k8s`.
    pub fn of(hits: &[Hit], vm: &[&str], k8s: &[&str]) -> Split {
        let mut s = Split {
            vm: 0,
            k8s: 0,
            failed: 0,
            other: 0,
        };
        for h in hits {
            match h.outcome.as_deref() {
                Ok(n) if vm.contains(&n) => s.vm += 1,
                Ok(n) if k8s.contains(&n) => s.k8s += 1,
                Ok(_) => s.other += 1,
                Err(_) => s.failed += 1,
            }
        }
        s
    }

    /// The percentage of the window that went to vm.
    pub fn vm_percent(&self) -> f64 {
        let total = self.vm + self.k8s + self.failed + self.other;
        if total == 0 {
            0.0
        } else {
            100.0 * self.vm as f64 / total as f64
        }
    }

    /// The percentage of the window that went to k8s.
    pub fn k8s_percent(&self) -> f64 {
        let total = self.vm + self.k8s + self.failed + self.other;
        if total == 0 {
            0.0
        } else {
            100.0 * self.k8s as f64 / total as f64
        }
    }
}

/// The curve of a linear slow start (aggression 1): the weight `100 * t / window`, at least 1.
pub fn ramp_weight(elapsed_secs: f64, window_secs: f64) -> f64 {
    (100.0 * elapsed_secs / window_secs).clamp(1.0, 100.0)
}

/// The share of requests a ramping instance at weight `w` gets next to `full` instances at 100.
pub fn ramp_share(w: f64, full: usize) -> f64 {
    w / (w + 100.0 * full as f64)
}

/// The current unix time in seconds, with the fraction.
pub fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Sleeps until the unix time `at` (seconds). For ramps, whose contract is the clock itself.
pub fn sleep_until_unix(at: f64) {
    let now = unix_now_f64();
    if at > now {
        std::thread::sleep(Duration::from_secs_f64(at - now));
    }
}

// === registry records ===

/// An etcd instance value as vmesh writes it: `{"address", "port", "weight", "meta"}`.
pub fn etcd_value(addr: SocketAddr, weight: u32, meta: Value) -> String {
    json!({
        "address": addr.ip().to_string(),
        "port": addr.port(),
        "weight": weight,
        "meta": meta,
    })
    .to_string()
}

/// The meta of an instance in environment `env` (`vm`, `k8s`), zone `z1`, version `v1`.
pub fn etcd_meta(env: &str) -> Value {
    json!({"env": env, "zone": "z1", "version": "v1", "colour": ""})
}

/// Puts `/vmesh/services/<service>/<id>` for an instance at `addr` in `env` at weight 100.
pub fn etcd_put_instance(etcd: &Etcd, service: &str, id: &str, addr: SocketAddr, env: &str) {
    etcd.put(
        &crate::lifecycle::etcd_key(service, id),
        &etcd_value(addr, 100, etcd_meta(env)),
    );
}

/// Puts `key` with a value read from stdin (values too long for one command-line argument).
pub fn etcd_put_stdin(etcd: &Etcd, key: &str, value: &[u8]) {
    let mut child = etcd
        .etcdctl()
        .args(["put", key])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run etcdctl put");
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(value).expect("write the value to etcdctl");
    }
    let out = child.wait_with_output().expect("wait for etcdctl put");
    assert!(
        out.status.success(),
        "etcdctl put {key} (stdin, {} bytes) failed: {}{}",
        value.len(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Deletes `key` (`etcdctl del`).
pub fn etcd_delete(etcd: &Etcd, key: &str) {
    etcd.ctl(&["del", key]);
}

/// Registers a vm instance of `service` through the Consul agent API the way vmesh does
/// (`vmesh-*` meta, `Weights.Passing` = the weight, a TTL check named after the instance)
/// with its check passing. The TTL (5 min) outlives every test.
pub fn consul_register_vm(consul: &ConsulDouble, service: &str, id: &str, addr: SocketAddr) {
    let body = json!({
        "ID": id,
        "Name": service,
        "Tags": [],
        "Port": addr.port(),
        "Address": addr.ip().to_string(),
        "Meta": {
            "vmesh-env": "vm",
            "vmesh-environment": "prod",
            "vmesh-zone": "z1",
            "vmesh-version": "v1",
            "vmesh-colour": "",
            "vmesh-owner": "team-a",
            "vmesh-weight": "100",
            "vmesh-node": id,
        },
        "Weights": {"Passing": 100, "Warning": 1},
        "Check": {
            "CheckID": format!("service:{id}"),
            "Name": "vmesh: application health",
            "TTL": "300s",
            "DeregisterCriticalServiceAfter": "60s",
            "Status": "passing",
        },
    });
    let r = consul.put("/v1/agent/service/register", &body.to_string());
    r.expect_status(200);
}

/// Registers a pod of `service` in the catalog the way consul-k8s catalog sync does: node
/// `k8s-sync`, `Meta.external-source = "kubernetes"`, no checks, Consul's default weight.
pub fn consul_register_k8s_pod(consul: &ConsulDouble, service: &str, pod: &str, addr: SocketAddr) {
    let body = json!({
        "Node": "k8s-sync",
        "Address": "127.0.0.1",
        "NodeMeta": {"external-source": "kubernetes"},
        "Service": {
            "ID": format!("{pod}-{service}"),
            "Service": service,
            "Tags": ["k8s"],
            "Port": addr.port(),
            "Address": addr.ip().to_string(),
            "Meta": {
                "external-source": "kubernetes",
                "external-k8s-ns": "default",
                "external-k8s-ref-kind": "pod",
                "external-k8s-ref-name": pod,
                "port-http": addr.port().to_string(),
            },
        },
    });
    let r = consul.put("/v1/catalog/register", &body.to_string());
    r.expect_status(200);
}

// === agents ===

/// The `[kubernetes]` section for the API server double (namespace `default`, no token).
pub fn kubernetes_section(k8s: &K8sDouble) -> String {
    let mut t = toml::Table::new();
    t.insert("api".into(), k8s.url().into());
    t.insert("namespace".into(), "default".into());
    let mut root = toml::Table::new();
    root.insert("kubernetes".into(), toml::Value::Table(t));
    toml::to_string(&root).expect("a toml::Table always serializes")
}

/// Starts `builder` with a `[kubernetes]` section pointing at `k8s` appended to its config.
///
/// `AgentBuilder` writes only the sections it knows, so the agent first starts with the
/// outbounds in `k8s_services` on a placeholder static endpoint (a config valid without
/// `[kubernetes]`), then the full config plus the section is written and the agent restarted
/// on the same ports.
pub fn start_with_kubernetes(builder: AgentBuilder, k8s_services: &[&str], k8s: &K8sDouble) -> Agent {
    let mut bootstrap = builder.clone();
    for service in k8s_services {
        let out = bootstrap
            .outbound_for(service)
            .set("sources", toml::Value::Array(vec!["static".into()]))
            .endpoint(free_addr());
        bootstrap = bootstrap.outbound(out);
    }
    let mut agent = bootstrap.start();
    agent.write_config(builder);
    let text = format!("{}\n{}", agent.config().to_toml(), kubernetes_section(k8s));
    agent.write_raw_config(&text);
    agent.restart();
    agent
}

/// `vmesh <args> --config <the agent's config>`.
pub fn cli(agent: &Agent, args: &[&str]) -> CliRun {
    agent.run_cli(args).into()
}

/// `vmesh shift <service> <values...>`, timed: the run and when it returned.
pub fn shift_cli(agent: &Agent, service: &str, values: &[&str]) -> (CliRun, Instant, Instant) {
    let mut args = vec!["shift", service];
    args.extend_from_slice(values);
    let began = Instant::now();
    let run = cli(agent, &args);
    (run, began, Instant::now())
}

/// `GET /shift/<service>` on the admin API, expecting 200.
pub fn shift_get(agent: &Agent, service: &str) -> Value {
    agent.admin_json(&format!("/shift/{service}"))
}

/// `PUT <path>` on the admin API with `body`, and `Authorization: Bearer <token>` when given.
pub fn admin_put(agent: &Agent, path: &str, body: &str, token: Option<&str>) -> HttpResponse {
    let auth = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let request = format!(
        "PUT {path} HTTP/1.1\r\nHost: {}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        agent.admin_addr(),
        body.len()
    );
    let mut client = KeepAlive::new(agent.admin_addr());
    client
        .exchange(request.as_bytes())
        .unwrap_or_else(|e| panic!("PUT {path} on admin: {e}"))
}

/// The cluster of outbound `service` in `GET /clusters`.
pub fn cluster(agent: &Agent, service: &str) -> Value {
    let doc = agent.admin_json("/clusters");
    doc["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["service"] == service && c["direction"] == "outbound")
        .cloned()
        .unwrap_or_else(|| panic!("no outbound cluster {service} in /clusters: {doc}"))
}

/// The endpoints of outbound `service` in `GET /clusters`, sorted by address.
pub fn cluster_endpoints(agent: &Agent, service: &str) -> Vec<Value> {
    let mut eps = cluster(agent, service)["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    eps.sort_by_key(|e| e["address"].as_str().unwrap_or_default().to_string());
    eps
}

/// The endpoint of `service` at `addr` in `/clusters`, if listed.
pub fn cluster_endpoint(agent: &Agent, service: &str, addr: SocketAddr) -> Option<Value> {
    cluster_endpoints(agent, service)
        .into_iter()
        .find(|e| e["address"] == addr.to_string())
}

/// Waits (bounded: [`DEFAULT_WAIT`](crate::DEFAULT_WAIT)) until `caller` balances `service`
/// over exactly `want`; returns how long that took from `since`, for the test to judge.
pub fn time_until_discovered(caller: &Agent, service: &str, want: &[SocketAddr], since: Instant) -> Duration {
    crate::lifecycle::wait_discovered(caller, service, want);
    since.elapsed()
}
