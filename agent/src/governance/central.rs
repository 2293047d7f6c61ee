//! Central governance policy: a JSON document per service in the registry's KV store
//! (`vmesh/policy/<service>` in Consul, `/vmesh/policy/<service>` in etcd) carrying routes,
//! outlier detection, breaker, fallback and rate limit for calls to that service. A policy
//! replaces the local config's section of the same name for that service; its routes come
//! before the local rules of the service. A policy that does not parse or validate is refused
//! with every problem named, and the previous policy of the service stays in force.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::routing::RouteConfig;
use super::FallbackConfig;
use crate::config::{BreakerConfig, Config, OutlierConfig, RateLimitConfig};

/// Largest policy document accepted (a route table of a few hundred rules fits).
pub const MAX_POLICY_BYTES: usize = 256 * 1024;

/// The policy document of one service.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServicePolicy {
    /// Route rules for requests addressed to the service (`match.service` is implied).
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    #[serde(default)]
    pub outlier: Option<OutlierConfig>,
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// Every central policy seen, by service.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct CentralPolicies {
    pub by_service: BTreeMap<String, Entry>,
    /// The watch's own error (the registry unreachable), if any.
    pub error: Option<String>,
}

/// One service's policy in force and the state of its key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Entry {
    /// The policy in force (the last valid one).
    pub policy: Option<Arc<ServicePolicy>>,
    /// The key's modify index / revision when last read.
    pub index: u64,
    /// Why the key's current value was refused (the previous policy stays).
    pub error: Option<String>,
}

impl CentralPolicies {
    /// Applies a key's new value, parsed and validated.
    pub fn apply_value(&mut self, service: &str, value: &[u8], index: u64) {
        let entry = self.by_service.entry(service.to_owned()).or_default();
        entry.index = index;
        match parse(service, value) {
            Ok(p) => {
                entry.policy = Some(Arc::new(p));
                entry.error = None;
            }
            Err(problems) => {
                let error = problems.join("; ");
                tracing::warn!(service, error = %error, "central policy refused: keeping the previous one");
                entry.error = Some(error);
            }
        }
    }

    /// The key of `service` is gone: its policy no longer applies.
    pub fn remove(&mut self, service: &str) {
        self.by_service.remove(service);
    }

    /// The policies in force, for the route table.
    pub fn in_force(&self) -> impl Iterator<Item = (&str, &ServicePolicy)> {
        self.by_service
            .iter()
            .filter_map(|(s, e)| Some((s.as_str(), e.policy.as_deref()?)))
    }
}

/// Parses and validates a policy document; every problem is named with its key. A route may
/// name a service this agent does not call (agents differ): its requests get 404
/// `UNKNOWN_SERVICE` here.
pub fn parse(service: &str, value: &[u8]) -> Result<ServicePolicy, Vec<String>> {
    if value.len() > MAX_POLICY_BYTES {
        return Err(vec![format!(
            "policy of {service} is {} bytes, over the {MAX_POLICY_BYTES}-byte limit",
            value.len()
        )]);
    }
    let mut policy: ServicePolicy = serde_json::from_slice(value)
        .map_err(|e| vec![format!("policy of {service} is not a valid policy document: {e}")])?;
    for r in &mut policy.routes {
        r.matches.service = Some(service.to_owned());
    }
    let mut problems = super::routing::validate(&policy.routes, None);
    problems.extend(crate::config::governance_problems(
        "",
        policy.outlier.as_ref(),
        policy.breaker.as_ref(),
        policy.fallback.as_ref(),
        policy.rate_limit.as_ref(),
    ));
    if problems.is_empty() {
        Ok(policy)
    } else {
        Err(problems
            .into_iter()
            .map(|(k, m)| if k.is_empty() { m } else { format!("{k}: {m}") })
            .collect())
    }
}

/// The config with the central policies laid over it: a policy's sections replace the local
/// ones of its service, its routes go before the local rules.
pub fn overlay(config: &Config, central: &CentralPolicies) -> Config {
    let mut c = config.clone();
    let mut routes = Vec::new();
    for (service, p) in central.in_force() {
        let Some(out) = c.outbound.iter_mut().find(|o| o.service == service) else {
            continue;
        };
        if let Some(o) = &p.outlier {
            out.outlier = o.clone();
        }
        if p.breaker.is_some() {
            out.breaker.clone_from(&p.breaker);
        }
        if p.fallback.is_some() {
            out.fallback.clone_from(&p.fallback);
        }
        if p.rate_limit.is_some() {
            out.rate_limit.clone_from(&p.rate_limit);
        }
        routes.extend(p.routes.iter().cloned());
    }
    routes.append(&mut c.route);
    c.route = routes;
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"{
        "routes": [{"name": "canary", "split": [{"version": "v2", "weight": 10}, {"version": "v1", "weight": 90}]}],
        "breaker": {"error_rate_percent": 40, "min_requests": 10},
        "fallback": {"status": 200, "body": "{}"}
    }"#;

    #[test]
    fn a_policy_overrides_its_service_and_its_routes_come_first() {
        let config = crate::config::load_str(
            r#"
[[outbound]]
service = "orders"
endpoints = ["127.0.0.1:9"]
[outbound.breaker]
error_rate_percent = 90

[[outbound]]
service = "users"
endpoints = ["127.0.0.1:9"]

[[route]]
name = "local"
match = { service = "orders", path = { prefix = "/x" } }
"#,
        )
        .unwrap();
        let mut central = CentralPolicies::default();
        central.apply_value("orders", GOOD.as_bytes(), 7);
        let c = overlay(&config, &central);
        assert_eq!(c.outbound[0].breaker.as_ref().map(|b| b.error_rate_percent), Some(40));
        assert!(c.outbound[1].breaker.is_none());
        let names: Vec<_> = c.route.iter().map(|r| r.name.clone().unwrap_or_default()).collect();
        assert_eq!(names, ["canary", "local"]);
        assert_eq!(c.route[0].matches.service.as_deref(), Some("orders"));
    }

    #[test]
    fn a_bad_policy_keeps_the_previous_one_and_names_every_problem() {
        let mut central = CentralPolicies::default();
        central.apply_value("orders", GOOD.as_bytes(), 7);
        central.apply_value(
            "orders",
            br#"{"routes": [{"split": [{"version": "v2", "weight": 10}]}], "breaker": {"error_rate_percent": 400}, "fallback": {"on": ["NOPE"]}}"#,
            8,
        );
        let e = &central.by_service["orders"];
        assert_eq!(e.index, 8);
        assert!(e
            .policy
            .as_ref()
            .is_some_and(|p| p.breaker.as_ref().unwrap().error_rate_percent == 40));
        let err = e.error.as_deref().unwrap();
        for want in ["route[0].split", "breaker.error_rate_percent", "fallback.on"] {
            assert!(err.contains(want), "{want} missing from {err}");
        }
        central.apply_value("orders", b"not json", 9);
        assert!(central.by_service["orders"]
            .error
            .as_deref()
            .unwrap()
            .contains("not a valid policy"));
        central.apply_value("orders", br#"{"unknown": 1}"#, 10);
        assert!(central.by_service["orders"]
            .error
            .as_deref()
            .unwrap()
            .contains("unknown"));
        assert!(central.by_service["orders"].policy.is_some());
        central.apply_value("orders", &vec![b' '; MAX_POLICY_BYTES + 1], 11);
        assert!(central.by_service["orders"].error.as_deref().unwrap().contains("limit"));
    }

    proptest::proptest! {
        /// Any bytes from the registry give a policy or an error, never a panic.
        #[test]
        fn any_value_is_handled(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..200)) {
            let mut central = CentralPolicies::default();
            central.apply_value("orders", &bytes, 1);
        }
    }
}
