//! Shared pieces of the lifecycle tests (registration, slow start, drain, crash recovery):
//! identity files for `[cmdb] kind = "file"`, an agent set up as one registered instance of a
//! service, what the Consul double holds for it, and the output of the `vmesh` CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;

use serde_json::Value;
use toml::Table;

use crate::consul::ConsulDouble;
use crate::etcd::Etcd;
use crate::{AgentBuilder, Inbound};

// === identity files ===

/// A service identity as the file CMDB reads it (design.md §4a).
#[derive(Debug, Clone)]
pub struct Identity {
    table: Table,
}

impl Identity {
    /// `orders` / `prod` / `z1` / `v3`, weight 100, colour `blue`, owner `team-a`, tag `pci`.
    pub fn orders() -> Identity {
        Identity { table: Table::new() }
            .set("service", "orders")
            .set("environment", "prod")
            .set("zone", "z1")
            .set("version", "v3")
            .set("weight", 100)
            .set("colour", "blue")
            .set("owner", "team-a")
            .set("tags", toml::Value::Array(vec!["pci".into()]))
    }

    /// Sets a field.
    pub fn set(mut self, key: &str, value: impl Into<toml::Value>) -> Identity {
        self.table.insert(key.to_string(), value.into());
        self
    }

    /// The TOML text.
    pub fn to_toml(&self) -> String {
        toml::to_string(&self.table).expect("a toml::Table always serializes")
    }

    /// Writes the identity to `path` (replacing the file atomically, so an agent never reads
    /// half of it).
    pub fn write(&self, path: &Path) {
        let tmp = path.with_extension("toml.tmp");
        std::fs::write(&tmp, self.to_toml()).expect("write identity file");
        std::fs::rename(&tmp, path).expect("move identity file in place");
    }

    /// Writes the identity to `dir/identity.toml` and returns the path.
    pub fn write_in(&self, dir: &Path) -> PathBuf {
        let path = dir.join("identity.toml");
        self.write(&path);
        path
    }
}

// === an instance ===

/// An agent that is one instance of the service named in the identity file: node `node`,
/// `[cmdb] kind = "file"` (refresh 2 s), the inbound port in front of the HTTP app at `app`
/// with a `/healthz` check every 500 ms, slow start `ramp` (e.g. `"10s"`, `"0s"`), a 1 s
/// drain grace and 10 s drain timeout. No registry yet: see [`consul`] and [`etcd`].
pub fn instance(node: &str, identity: &Path, app: SocketAddr, ramp: &str) -> AgentBuilder {
    AgentBuilder::new()
        .agent_set("node", node)
        .agent_set("drain_grace", "1s")
        .agent_set("drain_timeout", "10s")
        .cmdb_file(identity)
        .cmdb_set("refresh", "2s")
        .inbound(Inbound::new(app, "http").health("/healthz", "500ms").ramp(ramp))
}

/// A caller of "orders": a vmesh that is itself an instance of "frontend" (an agent with a
/// registry needs an inbound) whose outbound "orders" has no endpoints, so it discovers them
/// through the registry that `registry` configures ([`consul`] or [`etcd`]). Derefs to its
/// [`crate::Agent`]; its app and identity file live as long as it does.
pub struct Caller {
    agent: crate::Agent,
    _app: crate::RunningUpstream,
    _dir: tempfile::TempDir,
}

impl Caller {
    pub fn start(registry: impl FnOnce(AgentBuilder) -> AgentBuilder) -> Caller {
        let dir = tempfile::tempdir().expect("tempdir");
        let identity = Identity::orders().set("service", "frontend").write_in(dir.path());
        let app = crate::Upstream::python("front").spawn();
        let agent = registry(
            instance("caller", &identity, app.addr(), "0s")
                .outbound(crate::Outbound::new("orders").balancer("round-robin").timeout("5s")),
        )
        .start();
        Caller {
            agent,
            _app: app,
            _dir: dir,
        }
    }
}

impl std::ops::Deref for Caller {
    type Target = crate::Agent;

    fn deref(&self) -> &crate::Agent {
        &self.agent
    }
}

/// `[registry] kind = "consul"` at the double, anti-entropy every 2 s, 5 s blocking queries.
pub fn consul(builder: AgentBuilder, consul: &ConsulDouble) -> AgentBuilder {
    builder
        .registry_set("kind", "consul")
        .registry_set("address", consul.base_url())
        .registry_set("anti_entropy", "2s")
        .registry_set("watch_wait", "5s")
}

/// `[registry] kind = "etcd"` at `etcd`, a 3 s lease, anti-entropy every 2 s.
pub fn etcd(builder: AgentBuilder, etcd: &Etcd) -> AgentBuilder {
    builder
        .registry_set("kind", "etcd")
        .registry_set("address", etcd.url())
        .registry_set("lease_ttl", "3s")
        .registry_set("anti_entropy", "2s")
        .registry_set("watch_wait", "5s")
}

/// The etcd key of instance `id` of `service`.
pub fn etcd_key(service: &str, id: &str) -> String {
    format!("/vmesh/services/{service}/{id}")
}

// === what the Consul double holds ===

/// `GET /v1/agent/service/:id`: the instance as the agent registered it, `None` on 404.
pub fn agent_service(consul: &ConsulDouble, id: &str) -> Option<Value> {
    let r = consul.get(&format!("/v1/agent/service/{id}"));
    match r.status {
        200 => Some(r.json()),
        404 => None,
        _ => panic!("GET /v1/agent/service/{id}: {r}"),
    }
}

/// `GET /v1/health/service/:service` (`?passing=1` when `passing`): the entries.
pub fn health(consul: &ConsulDouble, service: &str, passing: bool) -> Vec<Value> {
    let query = if passing { "?passing=1" } else { "" };
    let r = consul.get(&format!("/v1/health/service/{service}{query}"));
    r.expect_status(200);
    r.json()
        .as_array()
        .cloned()
        .unwrap_or_else(|| panic!("health answer is not an array: {r}"))
}

/// The service IDs of health entries.
pub fn ids(entries: &[Value]) -> Vec<String> {
    let mut ids: Vec<String> = entries
        .iter()
        .map(|e| e["Service"]["ID"].as_str().unwrap_or_default().to_string())
        .collect();
    ids.sort();
    ids
}

/// The IDs of the passing instances of `service`.
pub fn passing_ids(consul: &ConsulDouble, service: &str) -> Vec<String> {
    ids(&health(consul, service, true))
}

/// Waits (bounded by `limit`) until the passing instances of `service` are exactly `want`
/// (sorted IDs).
pub fn wait_passing(consul: &ConsulDouble, service: &str, want: &[&str], limit: std::time::Duration) {
    wait_for_value(
        limit,
        &format!("passing instances of {service} to be {want:?}"),
        &want,
        || passing_ids(consul, service),
    );
}

/// Waits (bounded by `limit`, described by `what`) until `read` gives `want`; the last value
/// read is in the timeout's message.
fn wait_for_value<T, W>(limit: std::time::Duration, what: &str, want: &W, mut read: impl FnMut() -> T)
where
    T: PartialEq<W> + std::fmt::Debug,
    W: ?Sized,
{
    crate::eventually(limit, what, || {
        let found = read();
        if found == *want {
            Ok(())
        } else {
            Err(format!("{found:?}"))
        }
    });
}

/// Waits (bounded by [`crate::DEFAULT_WAIT`]) until instance `id` is registered; returns it as
/// [`agent_service`] gives it.
pub fn wait_registered(consul: &ConsulDouble, id: &str) -> Value {
    crate::eventually(crate::DEFAULT_WAIT, &format!("{id} to be registered"), || {
        agent_service(consul, id).ok_or_else(|| "not registered".to_string())
    })
}

/// The IDs of every instance of `service`, passing or not.
pub fn all_ids(consul: &ConsulDouble, service: &str) -> Vec<String> {
    ids(&health(consul, service, false))
}

/// The check `check_id` of instance `id` of `service` in the health answer, if present.
pub fn check(consul: &ConsulDouble, service: &str, id: &str, check_id: &str) -> Option<Value> {
    health(consul, service, false)
        .into_iter()
        .find(|e| e["Service"]["ID"] == id)?["Checks"]
        .as_array()?
        .iter()
        .find(|c| c["CheckID"] == check_id)
        .cloned()
}

/// Every service instance the double holds (any service, any node), as `(service, id)`, sorted.
pub fn all_instances(consul: &ConsulDouble) -> Vec<(String, String)> {
    let state = consul.inspect("state");
    let mut out: Vec<(String, String)> = state["services"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|s| s["Service"] != "consul")
        .map(|s| {
            (
                s["Service"].as_str().unwrap_or_default().to_string(),
                s["ID"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    out.sort();
    out
}

/// `Meta[key]` of an instance as a string.
pub fn meta<'a>(service: &'a Value, key: &str) -> &'a str {
    service["Meta"][key]
        .as_str()
        .unwrap_or_else(|| panic!("no Meta.{key} in {service}"))
}

// === the CLI ===

/// A finished CLI run: exit code and output, printable in assertion messages.
#[derive(Debug, Clone)]
pub struct CliRun {
    /// The exit code (-1 if killed by a signal).
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl From<Output> for CliRun {
    fn from(o: Output) -> CliRun {
        CliRun {
            code: o.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

impl std::fmt::Display for CliRun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The current unix time in seconds, with the fraction.
pub fn unix_now_f64() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Checks weights sampled from the registry during a linear slow start against its schedule:
/// each `(unix time the sample was read, weight)` must not be ahead of the curve, i.e. weight w
/// is only seen once `w / 100 * window` has passed since `ramp_start` (the advertised unix
/// second, which is at or before the real start, so the check needs no slack but 0.5 s for the
/// clock); and 100 must have been reached within `window + late` of the start. Early steps
/// prove the weights follow time; `late` is the margin a loaded machine needs for the writes.
pub fn assert_ramp_on_schedule(
    samples: &[(f64, u64)],
    ramp_start: u64,
    window: std::time::Duration,
    late: std::time::Duration,
) {
    let window = window.as_secs_f64();
    for &(at, weight) in samples {
        let elapsed = at - ramp_start as f64;
        let due = weight as f64 / 100.0 * window;
        assert!(
            elapsed + 0.5 >= due,
            "weight {weight} seen {elapsed:.1} s into a {window} s ramp: ahead of the curve ({due:.1} s); samples {samples:?}"
        );
    }
    let full = samples
        .iter()
        .find(|s| s.1 == 100)
        .unwrap_or_else(|| panic!("the weight never reached 100: {samples:?}"));
    let took = full.0 - ramp_start as f64;
    assert!(
        took <= window + late.as_secs_f64(),
        "100 reached {took:.1} s into a {window} s ramp (allowed {:?} late): {samples:?}",
        late
    );
}

/// The current unix time in seconds.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

// === steady load ===

/// One request of a [`Load`].
#[derive(Debug, Clone)]
pub struct Record {
    /// When the request was sent.
    pub start: std::time::Instant,
    /// When its answer (or error) was complete.
    pub end: std::time::Instant,
    /// `Ok(x-upstream-name)` for a 200 answer, `Err(what went wrong)` otherwise.
    pub outcome: Result<String, String>,
}

/// Client threads sending `GET <path>` to `addr` back to back until stopped, for at most
/// `max_duration` and `max_requests` in total: a bounded steady load. [`Load::start`] opens a
/// connection per request; [`Load::keep_alive`] keeps one persistent HTTP/1.1 connection per
/// client ([`crate::keep_alive::Client`]).
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    records: std::sync::Arc<std::sync::Mutex<Vec<Record>>>,
    counters: std::sync::Arc<crate::keep_alive::Counters>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Load {
    /// Starts `threads` client threads, each request on a new connection.
    pub fn start(
        addr: SocketAddr,
        path: &str,
        threads: usize,
        max_duration: std::time::Duration,
        max_requests: usize,
    ) -> Load {
        let path = path.to_string();
        Load::spawn(threads, max_duration, max_requests, Default::default(), |_| {
            let path = path.clone();
            move || classify(crate::http::get(addr, &path))
        })
    }

    /// Starts `threads` keep-alive client threads (see [`crate::keep_alive::Client`]); what
    /// they count is in [`Load::counters`].
    pub fn keep_alive(
        addr: SocketAddr,
        path: &str,
        threads: usize,
        max_duration: std::time::Duration,
        max_requests: usize,
    ) -> Load {
        Load::spawn(threads, max_duration, max_requests, Default::default(), |counters| {
            let mut client = crate::keep_alive::Client::new(addr, path, counters);
            move || client.request()
        })
    }

    /// The client threads: each runs the request function `client` made for it back to back.
    fn spawn<F>(
        threads: usize,
        max_duration: std::time::Duration,
        max_requests: usize,
        counters: std::sync::Arc<crate::keep_alive::Counters>,
        client: impl Fn(std::sync::Arc<crate::keep_alive::Counters>) -> F,
    ) -> Load
    where
        F: FnMut() -> Result<String, String> + Send + 'static,
    {
        use std::sync::atomic::{AtomicBool, Ordering};
        use std::sync::{Arc, Mutex};
        let stop = Arc::new(AtomicBool::new(false));
        let records = Arc::new(Mutex::new(Vec::new()));
        let deadline = std::time::Instant::now() + max_duration;
        let threads = (0..threads)
            .map(|_| {
                let (stop, records) = (stop.clone(), records.clone());
                let mut request = client(counters.clone());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) && std::time::Instant::now() < deadline {
                        if records.lock().map(|r| r.len()).unwrap_or(usize::MAX) >= max_requests {
                            break;
                        }
                        let start = std::time::Instant::now();
                        let outcome = request();
                        let end = std::time::Instant::now();
                        if let Ok(mut r) = records.lock() {
                            r.push(Record { start, end, outcome });
                        }
                    }
                })
            })
            .collect();
        Load {
            stop,
            records,
            counters,
            threads,
        }
    }

    /// What the keep-alive clients counted (all zero for [`Load::start`]).
    pub fn counters(&self) -> std::sync::Arc<crate::keep_alive::Counters> {
        self.counters.clone()
    }

    /// Every request finished so far.
    pub fn records(&self) -> Vec<Record> {
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Requests sent at or after `since` that `upstream` answered.
    pub fn answered_by_since(&self, upstream: &str, since: std::time::Instant) -> usize {
        self.records()
            .iter()
            .filter(|r| r.start >= since && r.outcome.as_deref() == Ok(upstream))
            .count()
    }

    /// Waits (bounded by `limit`) until each of `upstreams` has answered at least `at_least`
    /// requests sent at or after `since`; `when` ends the description ("after the rollout").
    pub fn wait_answered_by(
        &self,
        upstreams: &[&str],
        at_least: usize,
        since: std::time::Instant,
        limit: std::time::Duration,
        when: &str,
    ) {
        crate::eventually(limit, &format!("{} to answer {when}", upstreams.join(" and ")), || {
            let counts: Vec<usize> = upstreams.iter().map(|u| self.answered_by_since(u, since)).collect();
            if counts.iter().all(|&n| n >= at_least) {
                Ok(())
            } else {
                let seen: Vec<String> = upstreams.iter().zip(&counts).map(|(u, n)| format!("{u} {n}")).collect();
                Err(format!("{}; {:?}", seen.join(", "), summary(&self.records())))
            }
        });
    }

    /// Requests sent at or after `since` that finished (any outcome).
    pub fn finished_since(&self, since: std::time::Instant) -> usize {
        self.records().iter().filter(|r| r.start >= since).count()
    }

    /// Whether every client thread has ended (time or request bound reached).
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(std::thread::JoinHandle::is_finished)
    }

    /// Stops the clients, waits for them and returns every record.
    pub fn stop(self) -> Vec<Record> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load client thread");
        }
        self.records.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

/// Counts of a load's outcomes: `(upstream or error, count)`, for assertion messages.
pub fn summary(records: &[Record]) -> std::collections::BTreeMap<String, usize> {
    let mut out = std::collections::BTreeMap::new();
    for r in records {
        let key = match &r.outcome {
            Ok(name) => name.clone(),
            Err(e) => format!("ERROR {e}"),
        };
        *out.entry(key).or_insert(0) += 1;
    }
    out
}

/// The endpoint addresses the agent `caller` balances `service` over now (its `/clusters`), sorted.
pub fn discovered(caller: &crate::Agent, service: &str) -> Vec<String> {
    let doc = caller.admin_json("/clusters");
    let mut found: Vec<String> = doc["clusters"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|c| c["service"] == service && c["direction"] == "outbound")
        .flat_map(|c| c["endpoints"].as_array().cloned().unwrap_or_default())
        .filter_map(|e| e["address"].as_str().map(str::to_string))
        .collect();
    found.sort();
    found
}

/// Waits (bounded) until `caller` balances `service` over exactly `want` (any order).
pub fn wait_discovered(caller: &crate::Agent, service: &str, want: &[SocketAddr]) {
    wait_discovered_within(crate::DEFAULT_WAIT, caller, service, want);
}

/// [`wait_discovered`] with another bound.
pub fn wait_discovered_within(limit: std::time::Duration, caller: &crate::Agent, service: &str, want: &[SocketAddr]) {
    let mut want: Vec<String> = want.iter().map(SocketAddr::to_string).collect();
    want.sort();
    wait_for_value(
        limit,
        &format!("the caller to balance {service} over {want:?}"),
        &want,
        || discovered(caller, service),
    );
}

/// A caller's view of Consul: a thread running blocking queries on the passing instances of a
/// service (`?passing=1&index=N&wait=2s`, as vmesh's discovery does) and keeping every answer
/// that listed an instance. A blocking query wakes on every write, so it sees states that last
/// only between two writes.
pub struct PassingWatcher {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Vec<String>>>,
}

impl PassingWatcher {
    /// Starts watching `service` (bounded: it ends by itself after 60 s).
    pub fn start(consul: &ConsulDouble, service: &str) -> PassingWatcher {
        let path = format!("/v1/health/service/{service}?passing=1");
        let first = consul.get(&path);
        first.expect_status(200);
        let mut index = crate::consul::consul_index(&first);
        let mut seen = Vec::new();
        let initial = ids(first.json().as_array().map(Vec::as_slice).unwrap_or_default());
        if !initial.is_empty() {
            seen.push(initial);
        }
        let url = consul.url(&path);
        let token = consul.acl_token().map(str::to_string);
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let begin = std::time::Instant::now();
            while !flag.load(std::sync::atomic::Ordering::SeqCst)
                && begin.elapsed() < std::time::Duration::from_secs(60)
            {
                let mut curl = crate::Curl::get(format!("{url}&index={index}&wait=2s"));
                if let Some(t) = &token {
                    curl = curl.header(&format!("X-Consul-Token: {t}"));
                }
                let r = curl.run();
                if r.status != 200 {
                    // Paces the retry of a failed query (a fault the test injected); waits for
                    // no state.
                    std::thread::sleep(std::time::Duration::from_millis(50));
                    continue;
                }
                index = crate::consul::consul_index(&r);
                let found = ids(r.json().as_array().map(Vec::as_slice).unwrap_or_default());
                if !found.is_empty() {
                    seen.push(found);
                }
            }
            seen
        });
        PassingWatcher { stop, thread }
    }

    /// Stops watching (after the current query returns, at most ~2 s) and gives every
    /// answer that listed a passing instance.
    pub fn stop(self) -> Vec<Vec<String>> {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.thread.join().expect("watcher thread")
    }
}

/// A load request's outcome: the answering upstream's name (`x-upstream-name`), or why it failed.
pub fn classify(r: Result<crate::http::HttpResponse, String>) -> Result<String, String> {
    match r {
        Ok(r) if r.status == 200 => r
            .header("x-upstream-name")
            .map(str::to_string)
            .ok_or_else(|| "200 without x-upstream-name".to_string()),
        Ok(r) => Err(format!(
            "HTTP {} x-vmesh-error {:?} body {:?}",
            r.status,
            r.header("x-vmesh-error"),
            r.text()
        )),
        Err(e) => Err(e),
    }
}
