//! The Consul source. Each watched service (a [`Want`]: name, `passing_only`, `tag`) has one
//! task that asks `/v1/health/service/<name>`; how it learns that something changed depends
//! on how many services are watched:
//!
//! - up to `registry.max_watches`: each task runs its own blocking query with the full
//!   `watch_wait` (a change arrives with Consul's answer);
//! - beyond ("catalog mode", [`catalog`]): two blocking queries detect changes for every
//!   service at once, and a task asks Consul (non-blocking) only when its service changed or
//!   a sweep comes by.
//!
//! Consul allows 200 concurrent HTTP connections per client address by default
//! (`limits.http_max_conns_per_client`): at most `max_watches` discovery queries are in
//! flight at once (a permit each). One more blocking query on `vmesh/shift/` reads every shift
//! policy. An answer whose body did not change since the last one applied is not parsed again.

mod catalog;
mod entry;

use std::collections::hash_map::DefaultHasher;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use tokio::sync::{watch, Notify, Semaphore};

use self::catalog::Catalog;
use self::entry::HealthEntry;
use super::shift::{self, Policies, Policy, PolicyWatch, PolicyWriter, ShiftError};
use super::{EndpointSource, Found, RampInfo, View, Want};
use crate::registry::consul::{next_index, Blocking, Consul};
use crate::registry::{backoff, BoxFuture, RegistryError};
use crate::store::unix_now;

/// Where central shift policies live in Consul's KV store.
pub const SHIFT_PREFIX: &str = "vmesh/shift/";

/// Watches services in Consul.
pub struct ConsulSource {
    inner: Arc<Inner>,
}

struct Inner {
    consul: Arc<Consul>,
    wait: Duration,
    permits: Arc<Semaphore>,
    max: usize,
    watches: Mutex<HashMap<Want, Watched>>,
    /// `true` while more services are watched than `max`: catalog mode.
    mode: watch::Sender<bool>,
    /// The catalog-mode detector task has been started (it idles outside catalog mode).
    detector: AtomicBool,
    catalog: Catalog,
    /// Time origin of [`Slot::sent_ms`].
    epoch: Instant,
}

/// One watched service: its view and how the catalog-mode detector reaches its task.
struct Watched {
    tx: watch::Sender<View>,
    slot: Arc<Slot>,
}

/// What the catalog-mode detector shares with one service task.
#[derive(Default)]
struct Slot {
    /// Catalog mode: ask Consul again now.
    refresh: Notify,
    /// When the task last sent a health query (ms since [`Inner::epoch`], 0: never).
    sent_ms: AtomicU64,
}

/// The state of one service's task.
struct Task {
    want: Want,
    path: String,
    slot: Arc<Slot>,
    tx: watch::Sender<View>,
    /// The index to block on (blocking mode).
    index: u64,
    errors: u32,
    /// Hash of the last answer applied (its status, ACL flag and body); `None` after an error
    /// or a refused answer, so that the next answer is applied in full.
    applied: Option<u64>,
}

/// Why a mode's loop returned.
#[derive(PartialEq)]
enum Next {
    /// The mode changed.
    Switch,
    /// Nobody watches the service any more.
    End,
}

// === impl ConsulSource ===

impl ConsulSource {
    pub fn new(consul: Arc<Consul>, wait: Duration, max_watches: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::new(Inner {
                consul,
                wait,
                permits: Arc::new(Semaphore::new(max_watches)),
                max: max_watches,
                watches: Mutex::new(HashMap::new()),
                mode: watch::Sender::new(false),
                detector: AtomicBool::new(false),
                catalog: Catalog::default(),
                epoch: Instant::now(),
            }),
        })
    }
}

impl EndpointSource for ConsulSource {
    fn subscribe(&self, want: &Want) -> watch::Receiver<View> {
        let mut watches = self.inner.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.retain(|_, w| !w.tx.is_closed());
        if let Some(w) = watches.get(want) {
            return w.tx.subscribe();
        }
        let (tx, rx) = watch::channel(View::default());
        let slot = Arc::new(Slot::default());
        watches.insert(
            want.clone(),
            Watched {
                tx: tx.clone(),
                slot: slot.clone(),
            },
        );
        let live = watches.len();
        drop(watches);
        self.inner.update_mode(live);
        tokio::spawn(watch_service(self.inner.clone(), want.clone(), slot, tx));
        rx
    }
}

// === impl Inner ===

impl Inner {
    /// Switches between per-service blocking queries and catalog mode for `live` watches.
    fn update_mode(self: &Arc<Self>, live: usize) {
        let catalog = live > self.max;
        let switched = self.mode.send_if_modified(|m| {
            let changed = *m != catalog;
            *m = catalog;
            changed
        });
        if !switched {
            return;
        }
        if catalog {
            tracing::info!(
                services = live,
                max_watches = self.max,
                "consul discovery: more services than max_watches: catalog mode (two blocking queries detect changes for all)"
            );
            if !self.detector.swap(true, Ordering::AcqRel) {
                tokio::spawn(catalog::run(self.clone()));
            }
        } else {
            tracing::info!(
                services = live,
                max_watches = self.max,
                "consul discovery: one blocking query per service again"
            );
        }
    }

    /// A watch ended: forget it (and every other ended one) and update the mode.
    fn forget_ended(self: &Arc<Self>) {
        let live = {
            let mut watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
            watches.retain(|_, w| !w.tx.is_closed());
            watches.len()
        };
        self.update_mode(live);
    }

    /// Milliseconds since [`Inner::epoch`], at least 1.
    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .max(1)
    }
}

// === impl Task ===

/// The task of one watched service; ends when nobody watches it any more.
async fn watch_service(src: Arc<Inner>, want: Want, slot: Arc<Slot>, tx: watch::Sender<View>) {
    let mut task = Task {
        path: health_path(&want),
        want,
        slot,
        tx,
        index: 0,
        errors: 0,
        applied: None,
    };
    let mut mode = src.mode.subscribe();
    loop {
        let catalog = *mode.borrow_and_update();
        let next = if catalog {
            task.catalog_mode(&src, &mut mode).await
        } else {
            task.blocking_mode(&src, &mut mode).await
        };
        if next == Next::End {
            break;
        }
    }
    tracing::debug!(service = %task.want.service, "consul watch ended");
    src.forget_ended();
}

fn health_path(want: &Want) -> String {
    let mut path = format!("/v1/health/service/{}", want.service);
    let mut q = Vec::new();
    if want.passing_only {
        q.push("passing=true".to_owned());
    }
    if let Some(tag) = &want.tag {
        q.push(format!("tag={tag}"));
    }
    if !q.is_empty() {
        path = format!("{path}?{}", q.join("&"));
    }
    path
}

impl Task {
    /// Per-service blocking queries, until the mode changes.
    async fn blocking_mode(&mut self, src: &Inner, mode: &mut watch::Receiver<bool>) -> Next {
        loop {
            if self.tx.is_closed() {
                return Next::End;
            }
            let sent = Instant::now();
            let answer = tokio::select! {
                r = self.ask(src, self.index) => match r {
                    Some(r) => r,
                    None => return Next::End,
                },
                _ = mode.changed() => return Next::Switch,
                () = self.tx.closed() => return Next::End,
            };
            match answer {
                Ok(a) => {
                    let next = next_index(self.index, a.index);
                    let unchanged = next == self.index;
                    self.index = next;
                    self.apply(src, &a);
                    // Never spin: an answer that came back at once with the same index is a
                    // misbehaving server; pause before asking again.
                    if unchanged && sent.elapsed() < Duration::from_millis(100) {
                        tokio::time::sleep(Duration::from_secs(1)).await;
                    }
                }
                Err(e) => self.failed(e).await,
            }
        }
    }

    /// Catalog mode: a non-blocking query now, then one each time the detector or a sweep
    /// asks, until the mode changes.
    async fn catalog_mode(&mut self, src: &Inner, mode: &mut watch::Receiver<bool>) -> Next {
        // A query sent before the detector's first answers could miss a change made between
        // the two: wait for them (bounded; a query sent meanwhile is asked again after them).
        let mut ready = src.catalog.ready();
        tokio::select! {
            _ = tokio::time::timeout(catalog::BASELINE_WAIT, ready.wait_for(|r| *r)) => {}
            _ = mode.changed() => return Next::Switch,
            () = self.tx.closed() => return Next::End,
        }
        // Back in blocking mode later, the first query must not block on an old index.
        self.index = 0;
        loop {
            let answer = tokio::select! {
                r = self.ask(src, 0) => match r {
                    Some(r) => r,
                    None => return Next::End,
                },
                _ = mode.changed() => return Next::Switch,
                () = self.tx.closed() => return Next::End,
            };
            match answer {
                Ok(a) => self.apply(src, &a),
                Err(e) => {
                    self.failed(e).await;
                    continue;
                }
            }
            tokio::select! {
                () = self.slot.refresh.notified() => {}
                _ = mode.changed() => return Next::Switch,
                () = self.tx.closed() => return Next::End,
            }
        }
    }

    /// One health query with a permit (`index` 0: answered at once). `None` when the
    /// permits are gone (never: the semaphore is not closed).
    async fn ask(&self, src: &Inner, index: u64) -> Option<Result<Blocking, RegistryError>> {
        let _permit = src.permits.acquire().await.ok()?;
        self.slot.sent_ms.store(src.now_ms(), Ordering::Relaxed);
        Some(src.consul.blocking_get(&self.path, index, src.wait).await)
    }

    /// Applies an answer, unless it is the one applied last (then only `updated` moves).
    fn apply(&mut self, src: &Inner, a: &Blocking) {
        self.errors = 0;
        let digest = {
            let mut h = DefaultHasher::new();
            (a.found, a.filtered_by_acls, &a.body).hash(&mut h);
            h.finish()
        };
        if self.applied == Some(digest) {
            self.tx.send_if_modified(|v| {
                v.updated = Some(unix_now());
                false
            });
            return;
        }
        self.applied = apply_answer(&self.tx, &self.want.service, &a.body, a.found, a.filtered_by_acls).map(|nodes| {
            src.catalog
                .note_nodes(&self.want.service, nodes.iter().map(String::as_str));
            digest
        });
    }

    async fn failed(&mut self, e: RegistryError) {
        self.errors += 1;
        self.applied = None;
        let pause = backoff(self.errors, Duration::from_secs(30));
        tracing::warn!(service = %self.want.service, error = %e, ?pause, "consul discovery failed; keeping the last endpoints");
        self.tx.send_modify(|v| v.error = Some(e.to_string()));
        tokio::time::sleep(pause).await;
    }
}

// === health answers ===

/// Applies one health answer to the view: malformed entries are skipped (and logged); an
/// answer that is not a JSON array, or empty because ACLs filtered it, keeps the last set.
/// Returns the nodes the answer named, or `None` when it was refused.
fn apply_answer(
    tx: &watch::Sender<View>,
    service: &str,
    body: &[u8],
    found: bool,
    filtered_by_acls: bool,
) -> Option<Vec<String>> {
    let entries: Vec<HealthEntry> = if found {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                let error = format!("health answer for {service} is not a JSON array: {e}");
                tracing::warn!(service, error = %error, "consul answer refused: keeping the last endpoints");
                tx.send_modify(|v| v.error = Some(error));
                return None;
            }
        }
    } else {
        Vec::new()
    };
    if entries.is_empty() && filtered_by_acls {
        let error = "the answer is empty because ACLs filtered it (X-Consul-Results-Filtered-By-ACLs): check the token's service:read".to_owned();
        tracing::warn!(service, "{error}; keeping the last endpoints");
        tx.send_modify(|v| v.error = Some(error));
        return None;
    }
    let mut eps: Vec<Found> = Vec::with_capacity(entries.len());
    let mut nodes: Vec<String> = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.checks.0 {
            // With `passing_only = false` Consul answers instances in maintenance too: a
            // drained instance (or node) gets no traffic whatever its other checks say.
            tracing::debug!(service, entry = i, "consul instance in maintenance: not an endpoint");
        } else {
            match parse_entry(e) {
                Ok(f) => eps.push(f),
                Err(why) => tracing::warn!(service, entry = i, error = %why, "consul health entry skipped"),
            }
        }
        if let Some(n) = e.node.0.as_ref().and_then(|n| n.name.as_str()) {
            if !nodes.iter().any(|m| m == n) {
                nodes.push(n.to_owned());
            }
        }
    }
    eps.sort_by_key(|f| f.address);
    let new = Arc::new(eps);
    tx.send_if_modified(|v| {
        let changed = v.endpoints.as_deref() != Some(&*new) || v.error.is_some();
        v.updated = Some(unix_now());
        if changed {
            v.endpoints = Some(new.clone());
            v.error = None;
        }
        changed
    });
    Some(nodes)
}

/// One `/v1/health/service` entry as an endpoint: the service address, else the node's.
fn parse_entry(e: &HealthEntry) -> Result<Found, String> {
    let svc = e.service.0.as_ref().ok_or("no Service object")?;
    let port = svc
        .port
        .as_u64()
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
        .ok_or("Service.Port missing or not a port")?;
    let host = match svc.address.as_str() {
        Some(a) if !a.is_empty() => a,
        _ => e
            .node
            .0
            .as_ref()
            .and_then(|n| n.address.as_str())
            .ok_or("no Service.Address nor Node.Address")?,
    };
    let ip: std::net::IpAddr = host.parse().map_err(|_| format!("address {host:?} is not an IP"))?;
    let meta = |k: &str| -> Option<String> { svc.meta.0.as_ref()?.get(k).map(str::to_owned) };
    // consul-k8s catalog sync marks the pods it publishes.
    let env = if meta("external-source").as_deref() == Some("kubernetes") {
        "k8s".to_owned()
    } else {
        meta("vmesh-env").unwrap_or_else(|| "vm".to_owned())
    };
    // Instances not registered by vmesh (no vmesh-weight meta, e.g. consul-k8s pods) carry
    // Consul's default weight 1: count them at vmesh's full weight instead.
    let weight = if meta("vmesh-weight").is_some() {
        svc.weights
            .0
            .as_ref()
            .and_then(|w| w.passing.as_u64())
            .map_or(100, |w| u32::try_from(w.clamp(1, 10_000)).unwrap_or(100))
    } else {
        100
    };
    Ok(Found {
        address: std::net::SocketAddr::new(ip, port),
        weight,
        env,
        zone: meta("vmesh-zone").unwrap_or_default(),
        version: meta("vmesh-version").unwrap_or_default(),
        colour: meta("vmesh-colour").unwrap_or_default(),
        ramp: RampInfo::from_meta(|k| meta(&format!("vmesh-{}", k.replace('_', "-")))),
    })
}

// === shift policies ===

/// Starts the one watch of every shift policy under `vmesh/shift/`.
pub fn watch_policies(consul: Arc<Consul>, wait: Duration) -> PolicyWatch {
    let (tx, rx) = watch::channel(Arc::new(Policies::default()));
    tokio::spawn(policy_loop(consul.clone(), wait, tx));
    PolicyWatch::new(rx, Arc::new(ConsulPolicies(consul)))
}

async fn policy_loop(consul: Arc<Consul>, wait: Duration, tx: watch::Sender<Arc<Policies>>) {
    watch_kv_prefix(consul, wait, SHIFT_PREFIX, "shift policies", tx, apply_kv).await;
}

/// What a KV-prefix watch keeps: the entries it applied, and the watch's own error.
pub(crate) trait KvState: Clone + Send + Sync + 'static {
    /// An answer was applied (`Ok`) or refused (`Err`, the previous entries kept).
    fn set_result(&mut self, result: Result<(), String>);
    /// The watch itself failed (the entries in force stay).
    fn set_watch_error(&mut self, error: String);
    /// Whether `other` holds the same entries and errors (no need to publish).
    fn same_as(&self, other: &Self) -> bool;
}

impl KvState for Policies {
    fn set_result(&mut self, result: Result<(), String>) {
        self.synced |= result.is_ok();
        self.error = result.err();
    }

    fn set_watch_error(&mut self, error: String) {
        self.error = Some(error);
    }

    fn same_as(&self, o: &Self) -> bool {
        self.synced == o.synced && self.error == o.error && self.by_service == o.by_service
    }
}

/// Publishes `p` unless it holds what is published already (nobody is woken for nothing).
pub(crate) fn publish<T: KvState>(tx: &watch::Sender<Arc<T>>, p: T) {
    tx.send_if_modified(|cur| {
        let same = cur.same_as(&p);
        if !same {
            *cur = Arc::new(p);
        }
        !same
    });
}

/// One blocking recurse query on a KV prefix for as long as anyone watches: each answer goes
/// through `apply`; only real changes are published; errors back off and keep what is in
/// force. Shared by the shift and governance policy watches.
pub(crate) async fn watch_kv_prefix<T: KvState>(
    consul: Arc<Consul>,
    wait: Duration,
    prefix: &str,
    what: &'static str,
    tx: watch::Sender<Arc<T>>,
    apply: fn(&mut T, &[u8], bool) -> Result<(), String>,
) {
    let path = format!("/v1/kv/{prefix}?recurse=true");
    let mut index = 0u64;
    let mut errors = 0u32;
    loop {
        let sent = Instant::now();
        match consul.blocking_get(&path, index, wait).await {
            Ok(a) => {
                errors = 0;
                let next = next_index(index, a.index);
                let unchanged = next == index;
                index = next;
                let mut p = (**tx.borrow()).clone();
                let result = apply(&mut p, &a.body, a.found);
                if let Err(e) = &result {
                    tracing::warn!(error = %e, "{what} unreadable: keeping the previous ones");
                }
                p.set_result(result);
                publish(&tx, p);
                // Never spin on a server that answers at once without moving the index.
                if unchanged && sent.elapsed() < Duration::from_millis(100) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(e) => {
                errors += 1;
                let pause = backoff(errors, Duration::from_secs(30));
                tracing::warn!(error = %e, ?pause, "{what}: watch failed; keeping the ones in force");
                let mut p = (**tx.borrow()).clone();
                p.set_watch_error(e.to_string());
                publish(&tx, p);
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Applies a recurse answer: every key a policy (or its error); keys gone are forgotten.
fn apply_kv(p: &mut Policies, body: &[u8], found: bool) -> Result<(), String> {
    let mut seen = Vec::new();
    for_each_kv(body, found, SHIFT_PREFIX, |service, index, value| {
        let entry = p.by_service.entry(service.to_owned()).or_default();
        shift::apply_value(entry, service, &value(), index);
        seen.push(service.to_owned());
    })?;
    p.by_service.retain(|s, _| seen.contains(s));
    Ok(())
}

/// Calls `f(service, modify_index, value)` for each key `<prefix><service>` (one path segment)
/// of a KV recurse answer; `found` false (a 404) is an empty prefix. The value is decoded
/// from base64 only when `f` asks for it (an undecodable one reads as its raw text).
pub(crate) fn for_each_kv(
    body: &[u8],
    found: bool,
    prefix: &str,
    mut f: impl FnMut(&str, u64, &mut dyn FnMut() -> Vec<u8>),
) -> Result<(), String> {
    let entries: Vec<Value> = if found {
        serde_json::from_slice(body).map_err(|e| format!("KV answer is not a JSON array: {e}"))?
    } else {
        Vec::new()
    };
    for e in &entries {
        let Some(service) = e
            .get("Key")
            .and_then(Value::as_str)
            .and_then(|k| k.strip_prefix(prefix))
            .filter(|s| !s.is_empty() && !s.contains('/'))
        else {
            continue;
        };
        let index = e.get("ModifyIndex").and_then(Value::as_u64).unwrap_or(0);
        let mut value = || match e.get("Value") {
            Some(Value::String(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_else(|_| b64.as_bytes().to_vec()),
            _ => Vec::new(),
        };
        f(service, index, &mut value);
    }
    Ok(())
}

struct ConsulPolicies(Arc<Consul>);

impl PolicyWriter for ConsulPolicies {
    fn write<'a>(&'a self, service: &'a str, policy: Policy, cas: u64) -> BoxFuture<'a, Result<(), ShiftError>> {
        Box::pin(async move {
            let key = format!("{SHIFT_PREFIX}{service}");
            match self.0.kv_cas(&key, policy.to_json(), cas).await {
                Ok(true) => Ok(()),
                Ok(false) => Err(ShiftError::Conflict(cas)),
                Err(e) => Err(e.into()),
            }
        })
    }
}

#[cfg(test)]
mod tests;
