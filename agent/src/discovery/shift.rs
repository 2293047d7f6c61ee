//! Traffic shift policies: how callers split a service's requests between environments
//! (`{"vm": 80, "k8s": 20}`). A policy is kept centrally (Consul KV `vmesh/shift/<service>`, etcd
//! `/vmesh/shift/<service>`) and watched by every agent with one watch for all services; the
//! `[outbound.shift]` of the config is the local default. An invalid central value is refused
//! with its error shown, and the previous policy stays in force.

use std::collections::HashMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

use crate::registry::BoxFuture;

/// Percent of requests per environment; integers 0..=100 summing to 100.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Policy {
    pub vm: u32,
    pub k8s: u32,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShiftError {
    #[error("SHIFT_INVALID: {0}")]
    Invalid(String),
    #[error("UNKNOWN_SERVICE: {0:?} is not an outbound service of this agent")]
    UnknownService(String),
    #[error("SHIFT_CONFLICT: the policy changed since index {0}; read it again and retry")]
    Conflict(u64),
    #[error("SHIFT_NO_REGISTRY: no registry holds central policies ([registry] kind = \"none\" or \"memory\")")]
    NoRegistry,
    #[error("REGISTRY_UNREACHABLE: {0}")]
    Unreachable(String),
    #[error("REGISTRY_DENIED: {0}")]
    Denied(String),
}

impl From<crate::registry::RegistryError> for ShiftError {
    /// A write the registry refused keeps its cause: denied (ACL) or not reached.
    fn from(e: crate::registry::RegistryError) -> Self {
        match e {
            crate::registry::RegistryError::Denied(m) => Self::Denied(m),
            other => Self::Unreachable(other.to_string()),
        }
    }
}

impl ShiftError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid(_) => "SHIFT_INVALID",
            Self::UnknownService(_) => "UNKNOWN_SERVICE",
            Self::Conflict(_) => "SHIFT_CONFLICT",
            Self::NoRegistry => "SHIFT_NO_REGISTRY",
            Self::Unreachable(_) => "REGISTRY_UNREACHABLE",
            Self::Denied(_) => "REGISTRY_DENIED",
        }
    }

    /// The HTTP status the admin API answers with.
    pub fn status(&self) -> u16 {
        match self {
            Self::Invalid(_) => 400,
            Self::UnknownService(_) => 404,
            Self::Conflict(_) | Self::NoRegistry => 409,
            Self::Unreachable(_) => 503,
            Self::Denied(_) => 403,
        }
    }
}

impl Policy {
    pub fn new(vm: u32, k8s: u32) -> Result<Self, ShiftError> {
        for (env, v) in [("vm", vm), ("k8s", k8s)] {
            if v > 100 {
                return Err(ShiftError::Invalid(format!("{env} = {v} is out of range 0..=100")));
            }
        }
        if vm + k8s != 100 {
            return Err(ShiftError::Invalid(format!(
                "vm = {vm} and k8s = {k8s} sum to {}, not 100",
                vm + k8s
            )));
        }
        Ok(Self { vm, k8s })
    }

    /// Parses `{"vm": 80, "k8s": 20}`: known environments only, integers, a missing one is 0.
    pub fn from_json(bytes: &[u8]) -> Result<Self, ShiftError> {
        let v: serde_json::Value =
            serde_json::from_slice(bytes).map_err(|e| ShiftError::Invalid(format!("not JSON: {e}")))?;
        let obj = v.as_object().ok_or_else(|| {
            ShiftError::Invalid(format!("expected an object like {{\"vm\": 80, \"k8s\": 20}}, got {v}"))
        })?;
        let (mut vm, mut k8s) = (0, 0);
        for (k, v) in obj {
            let n = v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| ShiftError::Invalid(format!("{k} = {v} is not an integer 0..=100")))?;
            match k.as_str() {
                "vm" => vm = n,
                "k8s" => k8s = n,
                other => {
                    return Err(ShiftError::Invalid(format!(
                        "unknown environment {other:?} (known: vm, k8s)"
                    )))
                }
            }
        }
        Self::new(vm, k8s)
    }

    /// Parses the CLI's `vm=80 k8s=20`.
    pub fn from_args(args: &[String]) -> Result<Self, ShiftError> {
        let mut map = serde_json::Map::new();
        for a in args {
            let (k, v) = a
                .split_once('=')
                .ok_or_else(|| ShiftError::Invalid(format!("{a:?}: expected ENV=PERCENT, e.g. vm=80")))?;
            let n: u64 = v
                .parse()
                .map_err(|_| ShiftError::Invalid(format!("{a:?}: {v:?} is not an integer 0..=100")))?;
            map.insert(k.to_owned(), n.into());
        }
        Self::from_json(serde_json::Value::Object(map).to_string().as_bytes())
    }

    pub fn to_json(self) -> String {
        format!("{{\"vm\":{},\"k8s\":{}}}", self.vm, self.k8s)
    }
}

/// One service's central policy as last read.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Central {
    /// The last valid policy (kept when a later value is invalid).
    pub policy: Option<Policy>,
    /// The registry's index of the value (Consul ModifyIndex, etcd mod_revision); the CAS
    /// token of the next write.
    pub index: u64,
    /// Why the current value was refused.
    pub error: Option<String>,
}

/// Every central policy, as one snapshot.
#[derive(Clone, Debug, Default)]
pub struct Policies {
    pub by_service: HashMap<String, Central>,
    /// The watch has read the registry at least once.
    pub synced: bool,
    /// The watch's last error (the policies are then stale).
    pub error: Option<String>,
}

/// Writes a policy with compare-and-set: `cas` 0 means "only if absent".
pub trait PolicyWriter: Send + Sync {
    fn write<'a>(&'a self, service: &'a str, policy: Policy, cas: u64) -> BoxFuture<'a, Result<(), ShiftError>>;
}

/// The central policies and the way to write them.
#[derive(Clone)]
pub struct PolicyWatch {
    rx: watch::Receiver<Arc<Policies>>,
    writer: Option<Arc<dyn PolicyWriter>>,
}

impl PolicyWatch {
    pub fn new(rx: watch::Receiver<Arc<Policies>>, writer: Arc<dyn PolicyWriter>) -> Self {
        Self {
            rx,
            writer: Some(writer),
        }
    }

    /// No registry: no central policies, and writes are refused.
    pub fn none() -> Self {
        let (tx, rx) = watch::channel(Arc::new(Policies {
            synced: true,
            ..Policies::default()
        }));
        // The sender may go: receivers keep the last value.
        drop(tx);
        Self { rx, writer: None }
    }

    pub fn subscribe(&self) -> watch::Receiver<Arc<Policies>> {
        self.rx.clone()
    }

    pub fn current(&self) -> Arc<Policies> {
        self.rx.borrow().clone()
    }

    /// Writes `policy` for `service`; `cas` absent: against the index this agent last saw.
    pub async fn write(&self, service: &str, policy: Policy, cas: Option<u64>) -> Result<(), ShiftError> {
        let writer = self.writer.as_ref().ok_or(ShiftError::NoRegistry)?;
        let cas = cas.unwrap_or_else(|| self.current().by_service.get(service).map_or(0, |c| c.index));
        writer.write(service, policy, cas).await
    }

    /// Waits until the watch has seen index `index` or later for `service` (bounded by the
    /// caller), so a write's answer shows the new policy.
    pub async fn seen(&self, service: &str, policy: Policy) {
        let mut rx = self.rx.clone();
        let _ = rx
            .wait_for(|p| p.by_service.get(service).and_then(|c| c.policy) == Some(policy))
            .await;
    }
}

/// Applies one central value read for `service` at `index`: a valid value replaces the policy;
/// an invalid one keeps the previous policy and records why (logged once per value).
pub fn apply_value(entry: &mut Central, service: &str, value: &[u8], index: u64) {
    if entry.index == index && index != 0 {
        return;
    }
    entry.index = index;
    match Policy::from_json(value) {
        Ok(p) => {
            if entry.policy != Some(p) {
                tracing::info!(service, vm = p.vm, k8s = p.k8s, "central shift policy changed");
            }
            entry.policy = Some(p);
            entry.error = None;
        }
        Err(e) => {
            tracing::warn!(service, error = %e, "central shift policy refused: keeping the previous one");
            entry.error = Some(e.to_string());
        }
    }
}

/// What the admin API shows of a service's shift.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ShiftStatus {
    /// The policy in force (`None`: no split).
    pub policy: Option<Policy>,
    /// `central`, `local` (the config's `[outbound.shift]`) or `none`.
    pub source: &'static str,
    /// The central value's index (the CAS token), 0 when absent.
    pub index: u64,
    /// Why the central value was refused, or why central policies cannot be read.
    pub error: Option<String>,
}

/// The policy in force for a service: central, else the local default.
pub fn resolve(central: Option<&Central>, local: Option<Policy>, watch_error: Option<&str>) -> ShiftStatus {
    let error = central
        .and_then(|c| c.error.clone())
        .or_else(|| watch_error.map(str::to_owned));
    let index = central.map_or(0, |c| c.index);
    match (central.and_then(|c| c.policy), local) {
        (Some(p), _) => ShiftStatus {
            policy: Some(p),
            source: "central",
            index,
            error,
        },
        (None, Some(p)) => ShiftStatus {
            policy: Some(p),
            source: "local",
            index,
            error,
        },
        (None, None) => ShiftStatus {
            policy: None,
            source: "none",
            index,
            error,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_validate() {
        assert_eq!(
            Policy::from_json(br#"{"vm": 80, "k8s": 20}"#),
            Ok(Policy { vm: 80, k8s: 20 })
        );
        assert_eq!(Policy::from_json(br#"{"k8s": 100}"#), Ok(Policy { vm: 0, k8s: 100 }));
        for (bad, why) in [
            (&br#"{"vm": 80, "k8s": 30}"#[..], "sum to 110"),
            (br#"{"vm": 101, "k8s": 0}"#, "out of range"),
            (br#"{"vm": -1, "k8s": 101}"#, "not an integer"),
            (br#"{"vm": 50.5, "k8s": 49.5}"#, "not an integer"),
            (br#"{"vm": 50, "ecs": 50}"#, "unknown environment \"ecs\""),
            (br#"[80, 20]"#, "expected an object"),
            (b"vm=80", "not JSON"),
            (br#"{"vm": 99999999999, "k8s": 0}"#, "not an integer"),
        ] {
            let e = Policy::from_json(bad).unwrap_err().to_string();
            assert!(e.starts_with("SHIFT_INVALID") && e.contains(why), "{e}");
        }
        assert_eq!(
            Policy::from_args(&["vm=80".into(), "k8s=20".into()]),
            Ok(Policy { vm: 80, k8s: 20 })
        );
        assert!(Policy::from_args(&["vm".into()]).is_err());
    }

    #[test]
    fn an_invalid_central_value_keeps_the_previous_policy() {
        let mut c = Central::default();
        apply_value(&mut c, "web", br#"{"vm": 80, "k8s": 20}"#, 5);
        apply_value(&mut c, "web", b"not json", 6);
        assert_eq!(c.policy, Some(Policy { vm: 80, k8s: 20 }));
        assert_eq!(c.index, 6);
        assert!(c.error.as_deref().is_some_and(|e| e.contains("not JSON")));
        let s = resolve(Some(&c), Some(Policy { vm: 100, k8s: 0 }), None);
        assert_eq!((s.source, s.policy), ("central", Some(Policy { vm: 80, k8s: 20 })));
        apply_value(&mut c, "web", br#"{"vm": 0, "k8s": 100}"#, 7);
        assert_eq!(c.error, None);
        assert_eq!(resolve(None, None, None).source, "none");
    }
}
