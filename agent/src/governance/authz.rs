//! Inbound authorization: allow and deny rules by the caller's verified identity (its SPIFFE
//! service and environment, from its client certificate) and the request's path and method.
//! Rules are tried in order and the first match decides; with rules configured, a request no
//! rule matches is refused (403 `UNAUTHORIZED_CALLER`), and so is a caller without an identity
//! (plaintext on a permissive listener, a certificate without a SPIFFE URI). No rules: every
//! caller the listener accepts is allowed.

use http::Method;
use serde::{Deserialize, Serialize};

use crate::tls::SpiffeId;

/// Stable code of a request refused by an authorization rule.
pub const UNAUTHORIZED_CALLER: &str = "UNAUTHORIZED_CALLER";

/// `[[inbound.authz]]`: one rule.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AuthzRule {
    /// `allow` or `deny` the requests the rule matches.
    pub action: AuthzAction,
    /// The caller's service (the `sa` of its SPIFFE identity), or `"*"` for any identified caller.
    pub caller: String,
    /// The caller's environment (the `ns` of its identity); absent: any.
    #[serde(default)]
    pub environment: Option<String>,
    /// Only requests whose path starts with this (e.g. `"/api/"`); absent: every path.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Only these methods (e.g. `["GET", "HEAD"]`); empty: every method.
    #[serde(default)]
    pub methods: Vec<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum AuthzAction {
    Allow,
    Deny,
}

/// The compiled rules of one inbound listener.
#[derive(Debug, PartialEq)]
pub struct Authz {
    rules: Box<[Rule]>,
}

#[derive(Debug, PartialEq)]
struct Rule {
    allow: bool,
    caller: Option<Box<str>>,
    environment: Option<Box<str>>,
    path_prefix: Option<Box<str>>,
    methods: Box<[Method]>,
}

impl Authz {
    /// The compiled form of `rules`; `None` when there are none (everything allowed).
    pub fn compile(rules: &[AuthzRule]) -> Option<Self> {
        if rules.is_empty() {
            return None;
        }
        let rules = rules
            .iter()
            .map(|r| Rule {
                allow: r.action == AuthzAction::Allow,
                caller: (r.caller != "*").then(|| r.caller.as_str().into()),
                environment: r.environment.as_deref().map(Into::into),
                path_prefix: r.path_prefix.as_deref().map(Into::into),
                // Invalid names are reported by `validate`; here they match nothing.
                methods: r
                    .methods
                    .iter()
                    .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                    .collect(),
            })
            .collect();
        Some(Self { rules })
    }

    /// Whether `caller` may send `method path`.
    pub fn allows(&self, caller: Option<&SpiffeId>, method: &Method, path: &str) -> bool {
        let Some(caller) = caller else {
            return false;
        };
        self.rules
            .iter()
            .find(|r| r.matches(caller, method, path))
            .is_some_and(|r| r.allow)
    }
}

impl Rule {
    fn matches(&self, caller: &SpiffeId, method: &Method, path: &str) -> bool {
        self.caller.as_deref().is_none_or(|c| c == &*caller.service)
            && self.environment.as_deref().is_none_or(|e| e == &*caller.environment)
            && self.path_prefix.as_deref().is_none_or(|p| path.starts_with(p))
            && (self.methods.is_empty() || self.methods.contains(method))
    }
}

/// Problems of `rules` (at `key`, e.g. `inbound.authz`), each naming its key.
pub fn validate(key: &str, rules: &[AuthzRule], problems: &mut Vec<String>) {
    for (i, r) in rules.iter().enumerate() {
        if r.caller.is_empty() {
            problems.push(format!("{key}[{i}].caller: a service name, or \"*\" for any caller"));
        }
        if r.environment.as_deref().is_some_and(str::is_empty) {
            problems.push(format!("{key}[{i}].environment: empty (leave it out to match any)"));
        }
        if let Some(p) = &r.path_prefix {
            if !p.starts_with('/') {
                problems.push(format!("{key}[{i}].path_prefix: {p:?} must start with '/'"));
            }
        }
        for m in &r.methods {
            if m.is_empty() || Method::from_bytes(m.as_bytes()).is_err() || m.bytes().any(|b| b.is_ascii_lowercase()) {
                problems.push(format!("{key}[{i}].methods: {m:?} is not an upper-case HTTP method"));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(toml_rules: &str) -> Authz {
        #[derive(Deserialize)]
        struct W {
            authz: Vec<AuthzRule>,
        }
        let w: W = toml::from_str(toml_rules).unwrap_or_else(|e| panic!("{e}"));
        let mut p = Vec::new();
        validate("inbound.authz", &w.authz, &mut p);
        assert!(p.is_empty(), "{p:?}");
        Authz::compile(&w.authz).unwrap_or_else(|| panic!("no rules"))
    }

    fn id(env: &str, svc: &str) -> SpiffeId {
        SpiffeId::new("td", env, svc)
    }

    #[test]
    fn first_match_decides_and_no_match_is_denied() {
        let a = rules(
            r#"
            [[authz]]
            action = "deny"
            caller = "web"
            path_prefix = "/admin"
            [[authz]]
            action = "allow"
            caller = "web"
            [[authz]]
            action = "allow"
            caller = "batch"
            environment = "prod"
            methods = ["GET"]
            "#,
        );
        let get = Method::GET;
        let cases = [
            (Some(id("prod", "web")), &get, "/orders", true),
            (Some(id("prod", "web")), &get, "/admin/x", false),
            (Some(id("prod", "batch")), &get, "/orders", true),
            (Some(id("prod", "batch")), &Method::POST, "/orders", false),
            (Some(id("staging", "batch")), &get, "/orders", false),
            (Some(id("prod", "other")), &get, "/orders", false),
            (None, &get, "/orders", false),
        ];
        for (caller, method, path, want) in cases {
            assert_eq!(
                a.allows(caller.as_ref(), method, path),
                want,
                "{caller:?} {method} {path}"
            );
        }
    }

    #[test]
    fn a_wildcard_matches_identified_callers_only() {
        let a = rules("[[authz]]\naction = \"allow\"\ncaller = \"*\"");
        assert!(a.allows(Some(&id("x", "y")), &Method::GET, "/"));
        assert!(!a.allows(None, &Method::GET, "/"));
        assert_eq!(Authz::compile(&[]), None);
    }

    #[test]
    fn every_problem_is_named() {
        let w: Vec<AuthzRule> = vec![AuthzRule {
            action: AuthzAction::Allow,
            caller: String::new(),
            environment: Some(String::new()),
            path_prefix: Some("api".into()),
            methods: vec!["get".into()],
        }];
        let mut p = Vec::new();
        validate("inbound.authz", &w, &mut p);
        assert_eq!(p.len(), 4, "{p:?}");
        assert!(p[0].starts_with("inbound.authz[0].caller"));
        assert!(p[3].starts_with("inbound.authz[0].methods"));
    }
}
