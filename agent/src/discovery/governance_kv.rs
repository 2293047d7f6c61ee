//! The watch of central governance policies in the registry's KV store: one blocking recurse
//! query on `vmesh/policy/` (Consul) or one watch on `/vmesh/policy/` (etcd) for every service.
//! Each key's value goes through [`CentralPolicies::apply_value`] (a refused one keeps the
//! previous policy); a deleted key forgets its policy. A failing watch keeps every policy and
//! says why in [`CentralPolicies::error`].

use std::sync::Arc;
use std::time::Duration;

use etcd_client::{EventType, GetOptions, WatchOptions};
use tokio::sync::watch;

use crate::governance::central::{CentralPolicies, MAX_POLICY_BYTES};
use crate::registry::backoff;
use crate::registry::consul::Consul;
use crate::registry::etcd::Etcd;

/// Where policies live in Consul's KV store.
pub const CONSUL_PREFIX: &str = "vmesh/policy/";
/// Where policies live in etcd.
pub const ETCD_PREFIX: &str = "/vmesh/policy/";

/// The policies as they change.
pub type PolicyRx = watch::Receiver<Arc<CentralPolicies>>;

/// `<prefix><service>` -> service (one path segment, not empty).
fn service_of<'a>(key: &'a str, prefix: &str) -> Option<&'a str> {
    key.strip_prefix(prefix).filter(|s| !s.is_empty() && !s.contains('/'))
}

// === Consul ===

/// Starts the blocking recurse query on `vmesh/policy/`.
pub fn watch_consul(consul: Arc<Consul>, wait: Duration) -> PolicyRx {
    let (tx, rx) = watch::channel(Arc::new(CentralPolicies::default()));
    tokio::spawn(consul_loop(consul, wait, tx));
    rx
}

async fn consul_loop(consul: Arc<Consul>, wait: Duration, tx: watch::Sender<Arc<CentralPolicies>>) {
    super::consul::watch_kv_prefix(consul, wait, CONSUL_PREFIX, "central policies", tx, apply_consul).await;
}

impl super::consul::KvState for CentralPolicies {
    fn set_result(&mut self, result: Result<(), String>) {
        self.error = result.err();
    }

    fn set_watch_error(&mut self, error: String) {
        self.error = Some(error);
    }

    fn same_as(&self, other: &Self) -> bool {
        self == other
    }
}

/// Applies a recurse answer: every key a policy (or its refusal); keys gone are forgotten.
fn apply_consul(p: &mut CentralPolicies, body: &[u8], found: bool) -> Result<(), String> {
    let mut seen = Vec::new();
    super::consul::for_each_kv(body, found, CONSUL_PREFIX, |service, index, value| {
        // An unchanged key is not parsed again.
        let unchanged = p
            .by_service
            .get(service)
            .is_some_and(|x| x.index == index && index != 0);
        if !unchanged {
            p.apply_value(service, &value(), index);
        }
        seen.push(service.to_owned());
    })?;
    p.by_service.retain(|s, _| seen.contains(s));
    Ok(())
}

// === etcd ===

/// Starts the read and watch of `/vmesh/policy/`.
pub fn watch_etcd(etcd: Arc<Etcd>) -> PolicyRx {
    let (tx, rx) = watch::channel(Arc::new(CentralPolicies::default()));
    tokio::spawn(etcd_loop(etcd, tx));
    rx
}

async fn etcd_loop(etcd: Arc<Etcd>, tx: watch::Sender<Arc<CentralPolicies>>) {
    let mut errors = 0u32;
    loop {
        match etcd_session(&etcd, &tx).await {
            Ok(()) => errors = 0,
            Err(e) => {
                errors += 1;
                let pause = backoff(errors, Duration::from_secs(30));
                tracing::warn!(error = %e, ?pause, "central policy watch failed; keeping the policies in force");
                tx.send_modify(|cur| {
                    let mut p = (**cur).clone();
                    p.error = Some(e.clone());
                    *cur = Arc::new(p);
                });
                tokio::time::sleep(pause).await;
            }
        }
    }
}

/// One read of every policy, then a watch from the read's revision until the stream ends.
async fn etcd_session(etcd: &Etcd, tx: &watch::Sender<Arc<CentralPolicies>>) -> Result<(), String> {
    let c = etcd.client().await.map_err(|e| e.to_string())?;
    let mut kv = c.kv_client();
    let resp = etcd
        .with_deadline(
            "get /vmesh/policy/",
            kv.get(ETCD_PREFIX, Some(GetOptions::new().with_prefix())),
        )
        .await
        .map_err(|e| e.to_string())?;
    let revision = resp.header().map_or(0, |h| h.revision());
    let mut p = (**tx.borrow()).clone();
    let mut seen = Vec::new();
    for kv in resp.kvs() {
        let Some(service) = kv.key_str().ok().and_then(|k| service_of(k, ETCD_PREFIX)) else {
            continue;
        };
        apply_etcd_value(
            &mut p,
            service,
            kv.value(),
            u64::try_from(kv.mod_revision()).unwrap_or(0),
        );
        seen.push(service.to_owned());
    }
    p.by_service.retain(|s, _| seen.contains(s));
    p.error = None;
    super::consul::publish(tx, p);

    let mut watcher = c.watch_client();
    let opts = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision.saturating_add(1));
    let (_w, mut stream) = etcd
        .with_deadline("watch /vmesh/policy/", watcher.watch(ETCD_PREFIX, Some(opts)))
        .await
        .map_err(|e| e.to_string())?;
    while let Some(msg) = stream.message().await.map_err(|e| e.to_string())? {
        if msg.canceled() {
            // Compacted past our revision, or refused: read everything again.
            return Err(format!("watch canceled: {}", msg.cancel_reason()));
        }
        let mut p = (**tx.borrow()).clone();
        for ev in msg.events() {
            let Some(kv) = ev.kv() else { continue };
            let Some(service) = kv.key_str().ok().and_then(|k| service_of(k, ETCD_PREFIX)) else {
                continue;
            };
            match ev.event_type() {
                EventType::Put => apply_etcd_value(
                    &mut p,
                    service,
                    kv.value(),
                    u64::try_from(kv.mod_revision()).unwrap_or(0),
                ),
                EventType::Delete => p.remove(service),
            }
        }
        p.error = None;
        super::consul::publish(tx, p);
    }
    Err("watch stream ended".to_owned())
}

fn apply_etcd_value(p: &mut CentralPolicies, service: &str, value: &[u8], revision: u64) {
    // Oversized values are refused by `apply_value` too; this keeps the message short.
    let value = if value.len() > MAX_POLICY_BYTES {
        &value[..MAX_POLICY_BYTES + 1]
    } else {
        value
    };
    p.apply_value(service, value, revision);
}

#[cfg(test)]
mod tests {
    use super::*;
    use base64::Engine as _;
    use serde_json::json;

    #[test]
    fn consul_answers_become_policies_and_gone_keys_are_forgotten() {
        let b64 = |s: &str| base64::engine::general_purpose::STANDARD.encode(s);
        let mut p = CentralPolicies::default();
        let body = json!([
            {"Key": "vmesh/policy/web", "Value": b64(r#"{"breaker": {"min_requests": 5}}"#), "ModifyIndex": 7},
            {"Key": "vmesh/policy/api", "Value": b64("junk"), "ModifyIndex": 8},
            {"Key": "vmesh/policy/a/b", "Value": b64("{}"), "ModifyIndex": 9},
            {"Key": "vmesh/policy/", "Value": null, "ModifyIndex": 3},
        ])
        .to_string();
        apply_consul(&mut p, body.as_bytes(), true).unwrap();
        assert!(p.by_service["web"].policy.is_some());
        assert!(p.by_service["api"].error.is_some() && p.by_service["api"].policy.is_none());
        assert_eq!(p.by_service.len(), 2, "nested and empty keys are not services");
        apply_consul(&mut p, b"", false).unwrap();
        assert!(p.by_service.is_empty(), "a 404 forgets every policy");
        assert!(apply_consul(&mut p, b"<html>", true).is_err());
    }

    #[test]
    fn service_names_are_one_segment() {
        assert_eq!(service_of("/vmesh/policy/web", ETCD_PREFIX), Some("web"));
        assert_eq!(service_of("/vmesh/policy/", ETCD_PREFIX), None);
        assert_eq!(service_of("/vmesh/policy/a/b", ETCD_PREFIX), None);
        assert_eq!(service_of("/vmesh/shift/web", ETCD_PREFIX), None);
    }
}
