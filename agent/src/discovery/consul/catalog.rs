//! Catalog mode of the Consul source: while more services are watched than
//! `registry.max_watches`, two blocking queries detect changes for all of them at once (as
//! Fabio and Traefik's Consul catalog provider do) instead of one blocking query per service:
//!
//! - `/v1/health/state/any`: every check (`Node`, `CheckID`, `Status`, `ModifyIndex`); its
//!   index is Consul's checks table index, which moves on any check write and on every
//!   service deregistration;
//! - `/v1/catalog/services`: every service's tags; its index is the services table index,
//!   which moves on any registration change (a new instance, new meta, a deregistration).
//!
//! Each answer gives every watched service a fingerprint (the hash of its checks, with the
//! node-level checks of its nodes; of its tags), and only the services whose fingerprint
//! changed are asked again, with one non-blocking `/v1/health/service` each. A catalog index
//! move that no check event explains (a meta-only re-registration, an instance without
//! checks) starts a sweep: every watched service asked again, spread over `watch_wait`. A
//! background sweep asks every service again once per [`BACKGROUND_SWEEP`] whatever happens,
//! for the changes neither index shows (a node's address). docs/registry.md has the costs.

use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::de::{DeserializeSeed, Deserializer, SeqAccess, Visitor};
use tokio::sync::{mpsc, watch, Notify};
use tokio::time::Instant;

use super::entry::CheckRow;
use super::{Inner, Slot};
use crate::registry::backoff;
use crate::registry::consul::next_index;

/// Every watched service is asked again once per this period, spread evenly over it, also
/// when nothing seems to change: the bound on how long a change neither index shows can stay
/// unseen. 5,000 services: 8 non-blocking queries per second.
const BACKGROUND_SWEEP: Duration = Duration::from_secs(600);
/// How long a catalog index move waits for the checks answer that may explain it.
const EXPLAIN_WAIT: Duration = Duration::from_secs(2);
/// How long a service entering catalog mode waits for the detector's first answers before it
/// asks Consul anyway (it is then asked again once they are in).
pub(super) const BASELINE_WAIT: Duration = Duration::from_secs(5);
/// Checks answers remembered to explain catalog index moves.
const WINDOWS: usize = 256;
const HEALTH_PATH: &str = "/v1/health/state/any";
/// Largest checks answer read: ~330 bytes per check, so ~400,000 checks.
const MAX_CHECKS_ANSWER: usize = 128 << 20;
const CATALOG_PATH: &str = "/v1/catalog/services";

/// What the change detector knows; one per Consul source.
#[derive(Default)]
pub struct Catalog {
    state: Mutex<Detector>,
    /// The last `/v1/health/state/any` index applied (0: none in this period).
    health_index: watch::Sender<u64>,
    /// The detector has read both queries once in this catalog-mode period.
    ready: watch::Sender<bool>,
    /// An unexplained catalog change: sweep every watched service soon.
    sweep: Notify,
}

#[derive(Default)]
struct Detector {
    health_ready: bool,
    catalog_ready: bool,
    baseline_done: bool,
    /// Per service with checks (and per watched service): the fingerprint of its checks and of
    /// its nodes' node-level checks. Every service, not only the watched ones: a service
    /// watched from now on (a task started after the detector's first answers) compares with
    /// what it had, instead of counting as changed.
    health_fp: HashMap<String, u64>,
    /// Per service in the catalog: the fingerprint of its tags.
    tags_fp: HashMap<String, u64>,
    /// Checks in the last answer.
    checks: usize,
    /// Recent checks answers, oldest first.
    windows: VecDeque<Window>,
    /// The nodes each watched service's answers named, for the node-level checks of nodes
    /// where it has no check of its own.
    nodes: HashMap<String, BTreeSet<String>>,
    filtered_warned: bool,
}

/// What one checks answer saw happen between two indexes.
#[derive(Debug)]
struct Window {
    /// Exclusive.
    from: u64,
    to: u64,
    /// `ModifyIndex` of every check written in the window, sorted.
    writes: Vec<u64>,
    /// Some check disappeared in the window (a deregistration).
    deletions: bool,
}

/// One checks answer, folded check by check as it is read.
struct Checks<'a, 'w> {
    watched: &'w HashSet<String>,
    prev: u64,
    index: u64,
    /// Node -> the sum of its node-level checks' hashes.
    node_fp: HashMap<Cow<'a, str>, u64>,
    /// Service -> the sum of its checks' hashes, and the nodes of those checks.
    own: HashMap<Cow<'a, str>, (u64, Vec<Cow<'a, str>>)>,
    /// `ModifyIndex` of the checks written in (prev, index].
    writes: Vec<u64>,
    /// Checks created at or before `prev` (fewer than last time: some were deleted).
    kept: usize,
    total: usize,
}

// === impl Catalog ===

impl Catalog {
    /// Records the nodes named by an answer of `service` (for its node-level checks).
    pub fn note_nodes<'a>(&self, service: &str, nodes: impl IntoIterator<Item = &'a str>) {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        let set = match st.nodes.get_mut(service) {
            Some(s) => s,
            None => st.nodes.entry(service.to_owned()).or_default(),
        };
        for n in nodes {
            if !set.contains(n) {
                set.insert(n.to_owned());
            }
        }
    }

    /// Whether the detector has read both queries once in this period (a service entering
    /// catalog mode waits for it).
    pub fn ready(&self) -> watch::Receiver<bool> {
        self.ready.subscribe()
    }

    /// A new catalog-mode period: nothing read yet.
    fn reset(&self) {
        self.ready.send_replace(false);
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        st.health_ready = false;
        st.catalog_ready = false;
        st.baseline_done = false;
        st.health_fp.clear();
        st.tags_fp.clear();
        st.windows.clear();
        st.checks = 0;
        self.health_index.send_replace(0);
    }
}

// === impl Detector ===

impl Detector {
    /// Applies one checks answer (`body`, index `index`, the previous one `prev`); returns the
    /// watched services whose fingerprint changed. The checks are folded one by one as they
    /// are read: no list of them is built (50,000 checks would take ~9 MB).
    fn apply_checks(
        &mut self,
        watched: &HashSet<String>,
        prev: u64,
        index: u64,
        body: &[u8],
    ) -> Result<Vec<String>, serde_json::Error> {
        let mut checks = Checks::new(watched, prev, index);
        let mut de = serde_json::Deserializer::from_slice(body);
        (&mut checks).deserialize(&mut de)?;
        de.end()?;
        Ok(self.fold(checks))
    }

    /// The fingerprints of folded checks against the last ones; records their window.
    fn fold(&mut self, checks: Checks) -> Vec<String> {
        let Checks {
            watched,
            prev,
            index,
            node_fp,
            mut own,
            mut writes,
            kept,
            total,
        } = checks;
        // Watched services without any check count too (their nodes' checks may).
        for name in watched {
            if !own.contains_key(name.as_str()) {
                own.insert(Cow::Borrowed(name.as_str()), (0, Vec::new()));
            }
        }
        let mut fps = HashMap::with_capacity(own.len());
        let mut changed = Vec::new();
        for (name, (mut fp, mut nodes)) in own.drain() {
            if let Some(known) = self.nodes.get(&*name) {
                nodes.extend(known.iter().map(|n| Cow::Borrowed(n.as_str())));
            }
            nodes.sort_unstable();
            nodes.dedup();
            // Only nodes with node-level checks count: a node joining the set of a service's
            // nodes changes nothing by itself.
            for n in &nodes {
                if let Some(nfp) = node_fp.get(n) {
                    fp = fp.wrapping_add(hash(&(&**n, *nfp)));
                }
            }
            // A service absent from an answer (no checks) has fingerprint 0: a watched
            // service whose checks all went away is iterated (inserted above) and changes.
            let before = self.health_fp.get(&*name).copied().unwrap_or(0);
            if self.health_ready && before != fp && watched.contains(&*name) {
                changed.push(name.clone().into_owned());
            }
            if fp != 0 {
                fps.insert(name.into_owned(), fp);
            }
        }
        if index < prev {
            // An index reset (a snapshot restore): what came before says nothing any more.
            self.windows.clear();
        } else if self.health_ready && index > prev {
            writes.sort_unstable();
            writes.dedup();
            self.windows.push_back(Window {
                from: prev,
                to: index,
                writes,
                deletions: kept < self.checks,
            });
            if self.windows.len() > WINDOWS {
                self.windows.pop_front();
            }
        }
        self.nodes.retain(|s, _| watched.contains(s));
        self.checks = total;
        self.health_fp = fps;
        self.health_ready = true;
        changed
    }

    /// Applies one catalog answer; returns the watched services whose tags (or presence)
    /// changed.
    fn apply_catalog(
        &mut self,
        watched: &HashSet<String>,
        services: &HashMap<String, Option<Vec<String>>>,
    ) -> Vec<String> {
        let fps: HashMap<String, u64> = services
            .iter()
            .map(|(name, tags)| {
                let mut tags: Vec<&str> = tags.iter().flatten().map(String::as_str).collect();
                tags.sort_unstable();
                (name.clone(), hash(&tags))
            })
            .collect();
        let mut changed = Vec::new();
        if self.catalog_ready {
            for name in watched {
                if self.tags_fp.get(name) != fps.get(name) {
                    changed.push(name.clone());
                }
            }
        }
        self.tags_fp = fps;
        self.catalog_ready = true;
        changed
    }

    /// Whether a checks answer saw a write at raft index `x`: a check written at `x`, or a
    /// check deleted in a window holding `x`.
    fn explained(&self, x: u64) -> bool {
        self.windows
            .iter()
            .any(|w| w.from < x && x <= w.to && (w.deletions || w.writes.binary_search(&x).is_ok()))
    }
}

// === impl Checks ===

impl<'a, 'w> Checks<'a, 'w> {
    fn new(watched: &'w HashSet<String>, prev: u64, index: u64) -> Self {
        Self {
            watched,
            prev,
            index,
            node_fp: HashMap::new(),
            own: HashMap::new(),
            writes: Vec::new(),
            kept: 0,
            total: 0,
        }
    }

    fn add(&mut self, r: CheckRow<'a>) {
        self.total += 1;
        if r.modify_index > self.prev && r.modify_index <= self.index {
            self.writes.push(r.modify_index);
        }
        if r.create_index <= self.prev {
            self.kept += 1;
        }
        let one = hash(&(&*r.node, &*r.check_id, &*r.status, r.modify_index));
        if r.service_id.is_empty() {
            let fp = self.node_fp.entry(r.node).or_default();
            *fp = fp.wrapping_add(one);
        } else {
            let e = self.own.entry(r.service_name).or_default();
            e.0 = e.0.wrapping_add(one);
            e.1.push(r.node);
        }
    }
}

impl<'de: 'a, 'a> DeserializeSeed<'de> for &mut Checks<'a, '_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_seq(self)
    }
}

impl<'de: 'a, 'a> Visitor<'de> for &mut Checks<'a, '_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("an array of checks")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while let Some(row) = seq.next_element::<CheckRow<'a>>()? {
            self.add(row);
        }
        Ok(())
    }
}

// === the detector's tasks ===

/// Runs the detector while the source is in catalog mode; idle otherwise.
pub async fn run(src: Arc<Inner>) {
    let mut mode = src.mode.subscribe();
    loop {
        while !*mode.borrow_and_update() {
            if mode.changed().await.is_err() {
                return;
            }
        }
        src.catalog.reset();
        let (unexplained, to_explain) = mpsc::unbounded_channel();
        tokio::select! {
            () = async {
                tokio::join!(
                    health_loop(&src),
                    catalog_loop(&src, unexplained),
                    explainer(&src, to_explain),
                    sweeper(&src),
                );
            } => {}
            () = until_off(&mut mode) => {}
        }
        src.catalog.ready.send_replace(false);
        tracing::debug!("consul catalog-mode detector stopped");
    }
}

async fn until_off(mode: &mut watch::Receiver<bool>) {
    while *mode.borrow_and_update() {
        if mode.changed().await.is_err() {
            return;
        }
    }
}

/// The blocking query on every check.
async fn health_loop(src: &Inner) {
    let mut index = 0u64;
    let mut errors = 0u32;
    let mut last: Option<u64> = None;
    // Tens of MB at 50,000 checks, read again at least every `watch_wait`: one buffer.
    let mut body = Vec::new();
    loop {
        let sent = Instant::now();
        match src
            .consul
            .blocking_get_into(HEALTH_PATH, index, src.wait, MAX_CHECKS_ANSWER, &mut body)
            .await
        {
            Ok(a) => {
                errors = 0;
                let prev = index;
                index = next_index(index, a.index);
                let digest = hash(&body);
                if last != Some(digest) || a.index < prev {
                    let watched = src.watched_services();
                    let applied = {
                        let mut st = src.catalog.state.lock().unwrap_or_else(|p| p.into_inner());
                        if a.filtered_by_acls && !st.filtered_warned {
                            st.filtered_warned = true;
                            tracing::warn!("consul catalog mode: ACLs hide some checks from this token (it needs node:read and service:read): changes to those services are only seen by sweeps");
                        }
                        st.apply_checks(&watched, prev, a.index, &body)
                            .map(|changed| (changed, src.baseline_check(&mut st)))
                    };
                    last = match applied {
                        Ok((changed, baseline)) => {
                            src.refresh(&changed);
                            if let Some(before) = baseline {
                                src.refresh_sent_before(before);
                            }
                            Some(digest)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "consul catalog mode: /v1/health/state/any answer unreadable: sweeping instead");
                            src.catalog.sweep.notify_one();
                            None
                        }
                    };
                }
                src.catalog.health_index.send_replace(a.index);
                if index == prev && sent.elapsed() < Duration::from_millis(100) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(e) => {
                errors += 1;
                let pause = backoff(errors, Duration::from_secs(30));
                tracing::warn!(error = %e, ?pause, "consul catalog mode: the checks query failed; sweeping instead");
                if errors == 1 {
                    src.catalog.sweep.notify_one();
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// The blocking query on the services and their tags. A move no tag explains goes to the
/// [`explainer`] (which may wait for the checks answer), so that this loop asks again at once.
async fn catalog_loop(src: &Inner, unexplained: mpsc::UnboundedSender<(u64, Instant)>) {
    let mut index = 0u64;
    let mut errors = 0u32;
    let mut last: Option<u64> = None;
    loop {
        let sent = Instant::now();
        match src.consul.blocking_get(CATALOG_PATH, index, src.wait).await {
            Ok(a) => {
                errors = 0;
                let prev = index;
                index = next_index(index, a.index);
                let body = hash(&a.body);
                let moved = a.index > prev && prev > 0;
                if last != Some(body) || moved || a.index < prev {
                    last = match serde_json::from_slice::<HashMap<String, Option<Vec<String>>>>(&a.body) {
                        Ok(services) => {
                            let watched = src.watched_services();
                            let (changed, baseline) = {
                                let mut st = src.catalog.state.lock().unwrap_or_else(|p| p.into_inner());
                                let changed = st.apply_catalog(&watched, &services);
                                (changed, src.baseline_check(&mut st))
                            };
                            src.refresh(&changed);
                            if let Some(before) = baseline {
                                src.refresh_sent_before(before);
                            }
                            if a.index < prev && prev > 0 {
                                tracing::info!(
                                    from = prev,
                                    to = a.index,
                                    "consul catalog index went backwards: sweeping every watched service"
                                );
                                src.catalog.sweep.notify_one();
                            } else if moved && changed.is_empty() {
                                let _ = unexplained.send((a.index, Instant::now()));
                            }
                            Some(body)
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "consul catalog mode: /v1/catalog/services answer unreadable: sweeping instead");
                            src.catalog.sweep.notify_one();
                            None
                        }
                    };
                }
                if index == prev && sent.elapsed() < Duration::from_millis(100) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(e) => {
                errors += 1;
                let pause = backoff(errors, Duration::from_secs(30));
                tracing::warn!(error = %e, ?pause, "consul catalog mode: the services query failed; sweeping instead");
                if errors == 1 {
                    src.catalog.sweep.notify_one();
                }
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// For each catalog index move no tag explained, in order: waits (until [`EXPLAIN_WAIT`] after
/// the move was seen) for the checks answer that covers it, and sweeps unless a check event
/// explains it.
async fn explainer(src: &Inner, mut moves: mpsc::UnboundedReceiver<(u64, Instant)>) {
    let mut seen = src.catalog.health_index.subscribe();
    while let Some((x, at)) = moves.recv().await {
        let _ = tokio::time::timeout_at(at + EXPLAIN_WAIT, seen.wait_for(|h| *h >= x)).await;
        let explained = src.catalog.state.lock().unwrap_or_else(|p| p.into_inner()).explained(x);
        if !explained {
            tracing::debug!(index = x, "consul catalog changed without a check event: sweeping");
            src.catalog.sweep.notify_one();
        }
    }
}

/// Asks every watched service again: once per [`BACKGROUND_SWEEP`], and once per `watch_wait`
/// after an unexplained change (one sweep at a time: a change during a sweep extends it).
async fn sweeper(src: &Inner) {
    let mut urgent_left = 0usize;
    let mut i = 0usize;
    loop {
        // The services in a stable order, taken again whenever the set changes (it grows by
        // thousands while the agent starts); the position carries over.
        let slots = src.slots();
        let n = slots.len();
        if n == 0 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        while src.watch_count() == n {
            if i >= n {
                i = 0;
            }
            let period = if urgent_left > 0 { src.wait } else { BACKGROUND_SWEEP };
            // One wake-up per 10 ms at most: several services per step when many are due.
            let each = period.as_secs_f64() / n as f64;
            let (step, batch) = if each >= 0.01 {
                (Duration::from_secs_f64(each), 1)
            } else {
                (Duration::from_millis(10), (0.01 / each).ceil() as usize)
            };
            tokio::select! {
                () = tokio::time::sleep(step) => {
                    for slot in slots.iter().skip(i).take(batch) {
                        slot.refresh.notify_one();
                    }
                    i += batch;
                    urgent_left = urgent_left.saturating_sub(batch);
                }
                () = src.catalog.sweep.notified() => {
                    if urgent_left == 0 {
                        tracing::debug!(services = n, "consul catalog mode: sweep started");
                    }
                    urgent_left = n;
                }
            }
        }
    }
}

// === impl Inner (catalog mode) ===

impl Inner {
    /// The names of the services watched now.
    fn watched_services(&self) -> HashSet<String> {
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.keys().map(|w| w.service.clone()).collect()
    }

    /// How many watches there are.
    fn watch_count(&self) -> usize {
        self.watches.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Every watch's slot, in a stable order (by service).
    fn slots(&self) -> Vec<Arc<Slot>> {
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        let mut v: Vec<_> = watches
            .iter()
            .map(|(w, s)| (w.service.clone(), s.slot.clone()))
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v.into_iter().map(|(_, s)| s).collect()
    }

    /// Asks the watches of `services` again.
    fn refresh(&self, services: &[String]) {
        if services.is_empty() {
            return;
        }
        tracing::debug!(
            services = services.len(),
            "consul catalog mode: asking changed services again"
        );
        let names: HashSet<&str> = services.iter().map(String::as_str).collect();
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        for (w, s) in watches.iter() {
            if names.contains(w.service.as_str()) {
                s.slot.refresh.notify_one();
            }
        }
    }

    /// Once both queries have answered in this period, the baseline: returns the time (ms
    /// since the source's epoch) before which a service's last query may predate it.
    fn baseline_check(&self, st: &mut Detector) -> Option<u64> {
        if st.baseline_done || !(st.health_ready && st.catalog_ready) {
            return None;
        }
        st.baseline_done = true;
        self.catalog.ready.send_replace(true);
        tracing::debug!("consul catalog mode: change detector ready");
        Some(self.now_ms())
    }

    /// Asks again the services whose last query was sent before `before` (ms): what changed
    /// between that query and the detector's first answers would go unseen otherwise.
    fn refresh_sent_before(&self, before: u64) {
        let watches = self.watches.lock().unwrap_or_else(|p| p.into_inner());
        for s in watches.values() {
            let sent = s.slot.sent_ms.load(Ordering::Relaxed);
            if sent != 0 && sent < before {
                s.slot.refresh.notify_one();
            }
        }
    }
}

fn hash<T: Hash + ?Sized>(t: &T) -> u64 {
    let mut h = DefaultHasher::new();
    t.hash(&mut h);
    h.finish()
}

#[cfg(test)]
mod tests;
