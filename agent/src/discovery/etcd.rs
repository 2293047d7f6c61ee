//! The etcd source: one watch stream on `/vmesh/` for every service and every shift policy.
//! A full read of the prefix happens at start and after a compaction only, in pages of
//! [`PAGE_KEYS`] keys all read at the revision of the first page (one consistent snapshot);
//! the watch then starts at the next revision. Events are applied one by one, and after a
//! broken stream the watch resumes from the last revision seen. The client's HTTP/2 keep-alive
//! (registry/etcd.rs) makes a silently dead connection fail the stream.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use etcd_client::{Compare, CompareOp, EventType, GetOptions, Txn, TxnOp, WatchOptions};
use serde_json::Value;
use tokio::sync::watch;

use super::hub::{Endpoints, Hub};
use super::shift::{self, Policies, Policy, PolicyWatch, PolicyWriter, ShiftError};
use super::{EndpointSource, Found, RampInfo, View, Want};
use crate::registry::etcd::{Etcd, EtcdEndpoint};
use crate::registry::{backoff, BoxFuture, RegistryError};
use crate::store::unix_now;

const ROOT: &str = "/vmesh/";
const SERVICES: &str = "/vmesh/services/";
/// Keys per page of the full read: ~115 KB of the bench's records, ~250 KB of the ones vmesh
/// writes (docs/registry.md), so a page stays far below the decoding limit below.
const PAGE_KEYS: i64 = 1_000;
/// Largest gRPC message decoded from etcd (tonic's default is 4 MiB). A read page is bounded
/// by [`PAGE_KEYS`] but its values are not (etcd accepts values up to `--max-request-bytes`,
/// 1.5 MiB by default), and a watch response that catches up after a disconnection carries
/// the events of up to 1,000 revisions at once.
const MAX_MESSAGE: usize = 64 << 20;
/// Where central shift policies live in etcd.
pub const SHIFT_PREFIX: &str = "/vmesh/shift/";

/// Watches every service under `/vmesh/services/`.
pub struct EtcdSource {
    state: Arc<Mutex<State>>,
}

/// service -> instance key -> endpoint (malformed values are left out).
type Instances = HashMap<String, BTreeMap<String, Found>>;

type State = Hub<Instances>;

impl Endpoints for Instances {
    fn endpoints(&self, service: &str) -> Vec<Found> {
        self.get(service)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

impl EtcdSource {
    /// Starts the watch; returns the source and the shift policies it reads.
    pub fn start(etcd: Arc<Etcd>) -> (Arc<Self>, PolicyWatch) {
        let state = Arc::new(Mutex::new(State::default()));
        let (ptx, prx) = watch::channel(Arc::new(Policies::default()));
        tokio::spawn(run(etcd.clone(), state.clone(), ptx));
        (
            Arc::new(Self { state }),
            PolicyWatch::new(prx, Arc::new(EtcdPolicies(etcd))),
        )
    }
}

impl EndpointSource for EtcdSource {
    fn subscribe(&self, want: &Want) -> watch::Receiver<View> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .subscribe(&want.service)
    }
}

/// The watch loop: read everything, then follow events; resume after errors.
async fn run(etcd: Arc<Etcd>, state: Arc<Mutex<State>>, policies: watch::Sender<Arc<Policies>>) {
    let mut revision: Option<i64> = None;
    let mut errors = 0u32;
    loop {
        let result = async {
            let rev = match revision {
                Some(r) => r,
                None => {
                    let r = read_all(&etcd, &state, &policies).await?;
                    revision = Some(r);
                    r
                }
            };
            follow(&etcd, &state, &policies, rev, &mut revision).await
        }
        .await;
        match result {
            Ok(Resume::Compacted) => {
                tracing::warn!("etcd watch revision compacted: reading the prefix again");
                revision = None;
            }
            Err(e) => {
                errors += 1;
                let pause = backoff(errors, Duration::from_secs(10));
                tracing::warn!(error = %e, ?pause, "etcd discovery watch failed; keeping the last endpoints");
                {
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    st.error = Some(e.to_string());
                    st.publish(None);
                }
                policies.send_modify(|p| Arc::make_mut(p).error = Some(e.to_string()));
                tokio::time::sleep(pause).await;
                continue;
            }
        }
        errors = 0;
    }
}

enum Resume {
    Compacted,
}

/// Reads the whole `/vmesh/` prefix, page by page at one revision; returns that revision.
async fn read_all(
    etcd: &Etcd,
    state: &Mutex<State>,
    policies: &watch::Sender<Arc<Policies>>,
) -> Result<i64, RegistryError> {
    let c = etcd.client().await?;
    let mut reader = c.kv_client().max_decoding_message_size(MAX_MESSAGE);
    let mut services: HashMap<String, BTreeMap<String, Found>> = HashMap::new();
    let mut pol = Policies {
        synced: true,
        ..Policies::default()
    };
    let end = prefix_end(ROOT.as_bytes());
    let mut from = ROOT.as_bytes().to_vec();
    // 0 for the first page (the newest revision); then the first page's revision, so that
    // every page shows the same snapshot and the watch misses nothing after it. A revision
    // compacted meanwhile fails the page: the caller backs off and reads again from scratch.
    let mut rev = 0i64;
    let mut pages = 0u32;
    loop {
        let opts = GetOptions::new()
            .with_range(end.clone())
            .with_limit(PAGE_KEYS)
            .with_revision(rev);
        let resp = etcd
            .with_deadline("get /vmesh/", reader.get(from.clone(), Some(opts)))
            .await?;
        pages += 1;
        if rev == 0 {
            rev = resp.header().map_or(0, |h| h.revision());
        }
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if let Some((service, instance)) = instance_key(&key) {
                if let Some(f) = parse_logged(&key, kv.value()) {
                    services.entry(service).or_default().insert(instance, f);
                }
            } else if let Some(service) = policy_key(&key) {
                let entry = pol.by_service.entry(service.clone()).or_default();
                shift::apply_value(
                    entry,
                    &service,
                    kv.value(),
                    u64::try_from(kv.mod_revision()).unwrap_or(0),
                );
            }
        }
        match resp.kvs().last() {
            Some(last) if resp.more() => from = key_after(last.key()),
            _ => break,
        }
    }
    tracing::debug!(revision = rev, pages, services = services.len(), "etcd prefix read");
    // Keep the last valid policy of a service whose value turned invalid meanwhile.
    let previous = policies.borrow().clone();
    for (s, c) in pol.by_service.iter_mut() {
        if c.policy.is_none() {
            c.policy = previous.by_service.get(s).and_then(|p| p.policy);
        }
    }
    policies.send_replace(Arc::new(pol));
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    st.data = services;
    st.synced = true;
    st.error = None;
    st.updated = Some(unix_now());
    st.publish(None);
    Ok(rev)
}

/// The end of the range of keys that start with `prefix` (etcd's `--prefix`): the prefix with
/// its last byte below 0xff incremented.
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Only 0xff bytes: every key from the prefix on ("\0" is etcd's "to the end").
    vec![0]
}

/// The smallest key after `key`: where the next page starts.
fn key_after(key: &[u8]) -> Vec<u8> {
    let mut next = Vec::with_capacity(key.len() + 1);
    next.extend_from_slice(key);
    next.push(0);
    next
}

/// Follows events after `from`; updates `revision` as they come.
async fn follow(
    etcd: &Etcd,
    state: &Mutex<State>,
    policies: &watch::Sender<Arc<Policies>>,
    from: i64,
    revision: &mut Option<i64>,
) -> Result<Resume, RegistryError> {
    let mut c = etcd
        .client()
        .await?
        .watch_client()
        .max_decoding_message_size(MAX_MESSAGE);
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(from + 1)
        .with_progress_notify();
    let (_watcher, mut stream) = etcd.with_deadline("watch", c.watch(ROOT, Some(opts))).await?;
    {
        // The stream is up: what we hold is current again.
        state.lock().unwrap_or_else(|p| p.into_inner()).connected();
        policies.send_if_modified(|p| Arc::make_mut(p).error.take().is_some());
    }
    loop {
        let resp = stream
            .message()
            .await
            .map_err(|e| RegistryError::Unreachable(format!("etcd watch: {e}")))?
            .ok_or_else(|| RegistryError::Unreachable("etcd watch stream ended".into()))?;
        if resp.compact_revision() > 0 {
            return Ok(Resume::Compacted);
        }
        if resp.canceled() {
            return Err(RegistryError::BadResponse(format!(
                "etcd watch canceled: {}",
                resp.cancel_reason()
            )));
        }
        let mut touched: Vec<String> = Vec::new();
        let mut pol: Option<Policies> = None;
        {
            let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
            for ev in resp.events() {
                let Some(kv) = ev.kv() else { continue };
                let key = String::from_utf8_lossy(kv.key()).into_owned();
                if let Some((service, instance)) = instance_key(&key) {
                    let set = st.data.entry(service.clone()).or_default();
                    match ev.event_type() {
                        // A malformed rewrite keeps the instance's last good value.
                        EventType::Put => {
                            if let Some(f) = parse_logged(&key, kv.value()) {
                                set.insert(instance, f);
                            }
                        }
                        EventType::Delete => {
                            set.remove(&instance);
                        }
                    }
                    if set.is_empty() {
                        st.data.remove(&service);
                    }
                    touched.push(service);
                } else if let Some(service) = policy_key(&key) {
                    let p = pol.get_or_insert_with(|| (**policies.borrow()).clone());
                    match ev.event_type() {
                        EventType::Put => {
                            let entry = p.by_service.entry(service.clone()).or_default();
                            shift::apply_value(
                                entry,
                                &service,
                                kv.value(),
                                u64::try_from(kv.mod_revision()).unwrap_or(0),
                            );
                        }
                        EventType::Delete => {
                            p.by_service.remove(&service);
                        }
                    }
                }
            }
            if let Some(h) = resp.header() {
                *revision = Some(h.revision());
            }
            st.updated = Some(unix_now());
            touched.sort();
            touched.dedup();
            st.publish(Some(&touched));
        }
        if let Some(p) = pol {
            policies.send_replace(Arc::new(p));
        }
    }
}

/// `/vmesh/services/<service>/<instance>` -> (service, instance).
fn instance_key(key: &str) -> Option<(String, String)> {
    let rest = key.strip_prefix(SERVICES)?;
    let (service, instance) = rest.split_once('/')?;
    (!service.is_empty() && !instance.is_empty()).then(|| (service.to_owned(), instance.to_owned()))
}

/// `/vmesh/shift/<service>` -> service.
fn policy_key(key: &str) -> Option<String> {
    let s = key.strip_prefix(SHIFT_PREFIX)?;
    (!s.is_empty() && !s.contains('/')).then(|| s.to_owned())
}

fn parse_logged(key: &str, value: &[u8]) -> Option<Found> {
    match parse(value) {
        Ok(f) => Some(f),
        Err(e) => {
            tracing::warn!(key, error = %e, "etcd instance value skipped");
            None
        }
    }
}

/// Largest instance value read; an endpoint record is a few hundred bytes.
const MAX_VALUE: usize = 64 << 10;

/// An instance value (design.md "Registry data") as an endpoint.
fn parse(value: &[u8]) -> Result<Found, String> {
    if value.len() > MAX_VALUE {
        return Err(format!("{} bytes: larger than {} KiB", value.len(), MAX_VALUE >> 10));
    }
    let v: EtcdEndpoint = serde_json::from_slice(value).map_err(|e| format!("not an endpoint: {e}"))?;
    let ip: std::net::IpAddr = v
        .address
        .parse()
        .map_err(|_| format!("address {:?} is not an IP", v.address))?;
    if v.port == 0 {
        return Err("port 0".into());
    }
    let meta = |k: &str| {
        v.meta.get(k).map(|x| match x {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
    };
    Ok(Found {
        address: std::net::SocketAddr::new(ip, v.port),
        weight: v.weight.clamp(1, 10_000),
        env: meta("env").unwrap_or_else(|| "vm".to_owned()),
        zone: meta("zone").unwrap_or_default(),
        version: meta("version").unwrap_or_default(),
        colour: meta("colour").unwrap_or_default(),
        ramp: RampInfo::from_meta(meta),
    })
}

struct EtcdPolicies(Arc<Etcd>);

impl PolicyWriter for EtcdPolicies {
    fn write<'a>(&'a self, service: &'a str, policy: Policy, cas: u64) -> BoxFuture<'a, Result<(), ShiftError>> {
        Box::pin(async move {
            let key = format!("{SHIFT_PREFIX}{service}");
            let mut c = self.0.client().await.map_err(ShiftError::from)?;
            // mod_revision 0 compares equal for an absent key: cas 0 is "only if absent".
            let txn = Txn::new()
                .when(vec![Compare::mod_revision(
                    key.clone(),
                    CompareOp::Equal,
                    i64::try_from(cas).unwrap_or(i64::MAX),
                )])
                .and_then(vec![TxnOp::put(key, policy.to_json(), None)]);
            let resp = self
                .0
                .with_deadline("txn", c.txn(txn))
                .await
                .map_err(ShiftError::from)?;
            if resp.succeeded() {
                Ok(())
            } else {
                Err(ShiftError::Conflict(cas))
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_values_parse() {
        assert_eq!(
            instance_key("/vmesh/services/web/web-01"),
            Some(("web".into(), "web-01".into()))
        );
        assert_eq!(instance_key("/vmesh/services/web/"), None);
        assert_eq!(instance_key("/vmesh/shift/web"), None);
        assert_eq!(policy_key("/vmesh/shift/web"), Some("web".into()));
        assert_eq!(policy_key("/vmesh/shift/a/b"), None);
        let f = parse(br#"{"address":"127.0.0.1","port":80,"weight":33,"meta":{"env":"k8s","zone":"z1","ramp_start":1764200000,"ramp_window":60}}"#).unwrap();
        assert_eq!((f.weight, f.env.as_str(), f.zone.as_str()), (33, "k8s", "z1"));
        assert_eq!(f.ramp.map(|r| (r.start, r.window)), Some((1764200000, 60)));
        assert_eq!(parse(br#"{"address":"127.0.0.2","port":1}"#).unwrap().env, "vm");
        assert!(parse(b"junk").unwrap_err().contains("not an endpoint"));
        assert!(parse(br#"{"address":"host","port":1}"#)
            .unwrap_err()
            .contains("not an IP"));
        assert!(parse(br#"{"port":1}"#).is_err());
        let huge = format!(
            r#"{{"address":"127.0.0.1","port":80,"meta":{{"pad":"{}"}}}}"#,
            "x".repeat(1 << 20)
        );
        assert!(parse(huge.as_bytes()).unwrap_err().contains("larger than"));
    }

    #[test]
    fn page_bounds() {
        assert_eq!(prefix_end(b"/vmesh/"), b"/vmesh0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(key_after(b"/vmesh/services/a/1"), b"/vmesh/services/a/1\0".to_vec());
        // The next page starts strictly after the last key and before any longer key.
        assert!(key_after(b"k").as_slice() > b"k".as_slice());
        assert!(key_after(b"k").as_slice() < b"k\x01".as_slice());
    }
}
