//! The Consul source: one blocking health query per watched service (passing instances only
//! unless `passing_only = false`, optionally one `tag`), at most `registry.max_watches` in flight
//! at once; and one blocking recurse query on `vmesh/shift/` for every shift policy.
//!
//! Consul allows 200 concurrent HTTP connections per client address by default
//! (`limits.http_max_conns_per_client`), and each blocking query holds one for up to `wait`. With
//! more watched services than `max_watches`, queries queue for a permit and their `wait` shrinks
//! to `watch_wait * max_watches / services` (at least 1 s) so that every service is asked again
//! within about `watch_wait`; docs/registry.md has the numbers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use serde_json::Value;
use tokio::sync::{watch, Semaphore};

use super::shift::{self, Policies, Policy, PolicyWatch, PolicyWriter, ShiftError};
use super::{EndpointSource, Found, RampInfo, View, Want};
use crate::registry::consul::{next_index, Consul};
use crate::registry::{backoff, BoxFuture};
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
    watches: Mutex<HashMap<Want, watch::Sender<View>>>,
}

impl ConsulSource {
    pub fn new(consul: Arc<Consul>, wait: Duration, max_watches: usize) -> Arc<Self> {
        Arc::new(Self {
            inner: Arc::new(Inner {
                consul,
                wait,
                permits: Arc::new(Semaphore::new(max_watches)),
                max: max_watches,
                watches: Mutex::new(HashMap::new()),
            }),
        })
    }
}

impl Inner {
    fn live_watches(&self) -> usize {
        self.watches.lock().map(|w| w.len()).unwrap_or(1)
    }
}

impl EndpointSource for ConsulSource {
    fn subscribe(&self, want: &Want) -> watch::Receiver<View> {
        let mut watches = self.inner.watches.lock().unwrap_or_else(|p| p.into_inner());
        watches.retain(|_, tx| !tx.is_closed());
        if let Some(tx) = watches.get(want) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(View::default());
        watches.insert(want.clone(), tx.clone());
        tokio::spawn(watch_service(self.inner.clone(), want.clone(), tx));
        rx
    }
}

/// The blocking-query loop of one service; ends when nobody watches it any more.
async fn watch_service(src: Arc<Inner>, want: Want, tx: watch::Sender<View>) {
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
    let mut index = 0u64;
    let mut errors = 0u32;
    loop {
        if tx.is_closed() {
            break;
        }
        let services = src.live_watches();
        let wait = if services > src.max {
            src.wait
                .mul_f64(src.max as f64 / services as f64)
                .max(Duration::from_secs(1))
        } else {
            src.wait
        };
        let answer = {
            let Ok(_permit) = src.permits.acquire().await else {
                return;
            };
            if tx.is_closed() {
                break;
            }
            let sent = Instant::now();
            tokio::select! {
                r = src.consul.blocking_get(&path, index, wait) => r.map(|a| (a, sent)),
                () = tx.closed() => break,
            }
        };
        match answer {
            Ok((a, sent)) => {
                errors = 0;
                let next = next_index(index, a.index);
                let unchanged = next == index;
                index = next;
                apply_answer(&tx, &want.service, &a.body, a.found, a.filtered_by_acls);
                // Never spin: an answer that came back at once with the same index is a
                // misbehaving server; pause before asking again.
                if unchanged && sent.elapsed() < Duration::from_millis(100) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(e) => {
                errors += 1;
                let pause = backoff(errors, Duration::from_secs(30));
                tracing::warn!(service = %want.service, error = %e, ?pause, "consul discovery failed; keeping the last endpoints");
                tx.send_modify(|v| v.error = Some(e.to_string()));
                tokio::time::sleep(pause).await;
            }
        }
    }
    tracing::debug!(service = %want.service, "consul watch ended");
}

/// Applies one health answer to the view: malformed entries are skipped (and logged); an
/// answer that is not a JSON array, or empty because ACLs filtered it, keeps the last set.
fn apply_answer(tx: &watch::Sender<View>, service: &str, body: &[u8], found: bool, filtered_by_acls: bool) {
    let entries: Vec<Value> = if found {
        match serde_json::from_slice(body) {
            Ok(v) => v,
            Err(e) => {
                let error = format!("health answer for {service} is not a JSON array: {e}");
                tracing::warn!(service, error = %error, "consul answer refused: keeping the last endpoints");
                tx.send_modify(|v| v.error = Some(error));
                return;
            }
        }
    } else {
        Vec::new()
    };
    if entries.is_empty() && filtered_by_acls {
        let error = "the answer is empty because ACLs filtered it (X-Consul-Results-Filtered-By-ACLs): check the token's service:read".to_owned();
        tracing::warn!(service, "{error}; keeping the last endpoints");
        tx.send_modify(|v| v.error = Some(error));
        return;
    }
    let total = entries.len();
    let mut eps: Vec<Found> = Vec::with_capacity(total);
    for (i, e) in entries.iter().enumerate() {
        match parse_entry(e) {
            Ok(f) => eps.push(f),
            Err(why) => tracing::warn!(service, entry = i, error = %why, "consul health entry skipped"),
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
}

/// One `/v1/health/service` entry as an endpoint: the service address, else the node's.
fn parse_entry(e: &Value) -> Result<Found, String> {
    let svc = e.get("Service").filter(|s| s.is_object()).ok_or("no Service object")?;
    let port = svc
        .get("Port")
        .and_then(Value::as_u64)
        .and_then(|p| u16::try_from(p).ok())
        .filter(|&p| p != 0)
        .ok_or("Service.Port missing or not a port")?;
    let host = match svc.get("Address").and_then(Value::as_str) {
        Some(a) if !a.is_empty() => a,
        _ => e
            .get("Node")
            .and_then(|n| n.get("Address"))
            .and_then(Value::as_str)
            .ok_or("no Service.Address nor Node.Address")?,
    };
    let ip: std::net::IpAddr = host.parse().map_err(|_| format!("address {host:?} is not an IP"))?;
    let meta = |k: &str| -> Option<String> { svc.get("Meta")?.get(k)?.as_str().map(str::to_owned) };
    // consul-k8s catalog sync marks the pods it publishes.
    let env = if meta("external-source").as_deref() == Some("kubernetes") {
        "k8s".to_owned()
    } else {
        meta("vmesh-env").unwrap_or_else(|| "vm".to_owned())
    };
    // Instances not registered by vmesh (no vmesh-weight meta, e.g. consul-k8s pods) carry
    // Consul's default weight 1: count them at vmesh's full weight instead.
    let weight = if meta("vmesh-weight").is_some() {
        svc.get("Weights")
            .and_then(|w| w.get("Passing"))
            .and_then(Value::as_u64)
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
    let path = format!("/v1/kv/{SHIFT_PREFIX}?recurse=true");
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
                match apply_kv(&mut p, &a.body, a.found) {
                    Ok(()) => {
                        p.synced = true;
                        p.error = None;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "shift policies unreadable: keeping the previous ones");
                        p.error = Some(e);
                    }
                }
                tx.send_replace(Arc::new(p));
                if unchanged && sent.elapsed() < Duration::from_millis(100) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
            Err(e) => {
                errors += 1;
                let pause = backoff(errors, Duration::from_secs(30));
                tracing::warn!(error = %e, ?pause, "shift policy watch failed; keeping the previous policies");
                let mut p = (**tx.borrow()).clone();
                p.error = Some(e.to_string());
                tx.send_replace(Arc::new(p));
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// Applies a recurse answer: every key a policy (or its error); keys gone are forgotten.
fn apply_kv(p: &mut Policies, body: &[u8], found: bool) -> Result<(), String> {
    let entries: Vec<Value> = if found {
        serde_json::from_slice(body).map_err(|e| format!("KV answer is not a JSON array: {e}"))?
    } else {
        Vec::new()
    };
    let mut seen = Vec::new();
    for e in &entries {
        let Some(key) = e.get("Key").and_then(Value::as_str) else {
            continue;
        };
        let Some(service) = key
            .strip_prefix(SHIFT_PREFIX)
            .filter(|s| !s.is_empty() && !s.contains('/'))
        else {
            continue;
        };
        let index = e.get("ModifyIndex").and_then(Value::as_u64).unwrap_or(0);
        let value = match e.get("Value") {
            Some(Value::String(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .unwrap_or_else(|_| b64.as_bytes().to_vec()),
            _ => Vec::new(),
        };
        let entry = p.by_service.entry(service.to_owned()).or_default();
        shift::apply_value(entry, service, &value, index);
        seen.push(service.to_owned());
    }
    p.by_service.retain(|s, _| seen.contains(s));
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
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn health_entries_map_to_labelled_endpoints() {
        let (tx, rx) = watch::channel(View::default());
        let body = json!([
            {"Node": {"Address": "127.0.0.5"}, "Service": {"Address": "", "Port": 80, "Meta": {"vmesh-weight": "100", "vmesh-zone": "z1", "vmesh-version": "v2", "vmesh-colour": "blue", "vmesh-ramp-start": "100", "vmesh-ramp-window": "60"}, "Weights": {"Passing": 10, "Warning": 1}}},
            {"Node": {"Address": "127.0.0.5"}, "Service": {"Address": "127.0.0.6", "Port": 81, "Meta": {"external-source": "kubernetes"}, "Weights": {"Passing": 1}}},
            {"Node": {"Address": "127.0.0.5"}, "Service": {"Address": "not-an-ip", "Port": 82}},
            {"Node": {}, "Service": {"Port": 83}},
            {"Service": "junk"},
            {"Node": {"Address": "127.0.0.7"}, "Service": {"Port": 70000}},
            {"Node": {"Address": "127.0.0.8"}, "Service": {"Port": 84, "Meta": {"vmesh-env": "ecs"}}},
        ])
        .to_string();
        apply_answer(&tx, "web", body.as_bytes(), true, false);
        let v = rx.borrow().clone();
        let eps = v.endpoints.unwrap();
        assert_eq!(eps.len(), 3, "malformed entries are skipped: {eps:?}");
        assert_eq!(eps[0].address.to_string(), "127.0.0.5:80");
        assert_eq!(
            (eps[0].weight, &*eps[0].zone, &*eps[0].version, &*eps[0].colour),
            (10, "z1", "v2", "blue")
        );
        assert_eq!(eps[0].ramp.map(|r| (r.start, r.window, r.target)), Some((100, 60, 100)));
        assert_eq!(
            (eps[1].address.to_string().as_str(), eps[1].env.as_str(), eps[1].weight),
            ("127.0.0.6:81", "k8s", 100)
        );
        assert_eq!(eps[2].env, "ecs", "mapped to `other` when labelled");
    }

    #[test]
    fn bad_answers_keep_the_last_set() {
        let (tx, rx) = watch::channel(View::default());
        let good = json!([{"Node": {"Address": "127.0.0.5"}, "Service": {"Port": 80}}]).to_string();
        apply_answer(&tx, "web", good.as_bytes(), true, false);
        apply_answer(&tx, "web", b"{\"not\": \"an array\"}", true, false);
        assert_eq!(rx.borrow().endpoints.as_ref().map(|e| e.len()), Some(1));
        assert!(rx
            .borrow()
            .error
            .as_deref()
            .is_some_and(|e| e.contains("not a JSON array")));
        apply_answer(&tx, "web", b"[]", true, true);
        assert_eq!(rx.borrow().endpoints.as_ref().map(|e| e.len()), Some(1));
        assert!(rx.borrow().error.as_deref().is_some_and(|e| e.contains("ACL")));
        apply_answer(&tx, "web", b"[]", true, false);
        assert_eq!(
            rx.borrow().endpoints.as_ref().map(|e| e.len()),
            Some(0),
            "a real empty answer empties"
        );
        assert_eq!(rx.borrow().error, None);
    }

    #[test]
    fn kv_answers_become_policies() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut p = Policies::default();
        let body = json!([
            {"Key": "vmesh/shift/web", "Value": b64(r#"{"vm": 80, "k8s": 20}"#), "ModifyIndex": 7},
            {"Key": "vmesh/shift/api", "Value": b64("junk"), "ModifyIndex": 8},
            {"Key": "vmesh/shift/", "Value": null, "ModifyIndex": 3},
        ])
        .to_string();
        apply_kv(&mut p, body.as_bytes(), true).unwrap();
        assert_eq!(p.by_service["web"].policy, Some(Policy { vm: 80, k8s: 20 }));
        assert_eq!(p.by_service["web"].index, 7);
        assert!(p.by_service["api"].error.is_some());
        apply_kv(&mut p, b"", false).unwrap();
        assert!(p.by_service.is_empty(), "a 404 (no keys) forgets every policy");
        assert!(apply_kv(&mut p, b"<html>", true).is_err());
    }
}
