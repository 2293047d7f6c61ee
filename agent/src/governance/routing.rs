//! The route stage: `[[route]]` rules matched against an outbound request (path, method,
//! headers, query), first match wins. A rule names the service to send to, a canary split among
//! version subsets, and per-route timeout, retry, fallback, fault and rate limit. Rules are
//! compiled once per config generation (regexes included) and grouped by the service a request
//! was addressed to, so a service without rules pays nothing.

use std::collections::HashMap;
use std::sync::Arc;

use http::request::Parts;
use http::{HeaderName, Method};
use serde::{Deserialize, Serialize};

use super::fault::{Fault, FaultConfig};
use super::split::{Split, SplitConfig};
use super::{Fallback, FallbackConfig, RateLimit};
use crate::config::Dur;
use crate::config::RetryConfig;
use crate::resilience::rate_limit::RateLimitConfig;
use crate::resilience::RetryPolicy;

/// `[[route]]`: a rule for outbound requests; the first rule whose `match` holds wins.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Name in logs, `/clusters` and errors; default `route[<n>]`.
    #[serde(default)]
    pub name: Option<String>,
    /// Which requests the rule takes; an empty match takes every request of its service.
    #[serde(default, rename = "match")]
    pub matches: MatchConfig,
    /// The outbound service to send to; default: the service the request was addressed to.
    #[serde(default)]
    pub service: Option<String>,
    /// Weighted choice among version subsets (a canary), percent summing to 100.
    #[serde(default)]
    pub split: Vec<SplitConfig>,
    /// Deadline of the response headers, retries included (default: the service's).
    #[serde(default)]
    pub timeout: Option<Dur>,
    /// Deadline of one try (default: the service's).
    #[serde(default)]
    pub per_try_timeout: Option<Dur>,
    /// Retry policy (default: the service's).
    #[serde(default)]
    pub retry: Option<RetryConfig>,
    /// The answer given instead of a proxy error (default: the service's `[outbound.fallback]`).
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
    /// Delays and aborts injected into a share of the requests (drills).
    #[serde(default)]
    pub fault: Option<FaultConfig>,
    /// A token bucket for this route's requests (per caller with `by`).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
}

/// `[route.match]`
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MatchConfig {
    /// The outbound service the request was addressed to (its listener or `Host`); absent: any.
    #[serde(default)]
    pub service: Option<String>,
    /// The request path: `{ exact = "/a" }`, `{ prefix = "/api/" }` or `{ regex = "^/v[0-9]+/" }`.
    #[serde(default)]
    pub path: Option<PathMatch>,
    /// Any of these methods (upper case); empty: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Every header condition must hold.
    #[serde(default)]
    pub headers: Vec<ValueMatch>,
    /// Every query-parameter condition must hold.
    #[serde(default)]
    pub query: Vec<ValueMatch>,
}

/// How a path is matched: exactly one of the three keys.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PathMatch {
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

/// A condition on one header or query parameter: at most one of `exact`, `prefix`, `regex`,
/// `present` (none: present).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValueMatch {
    /// Header or parameter name (headers: case-insensitive).
    pub name: String,
    #[serde(default)]
    pub exact: Option<String>,
    #[serde(default)]
    pub prefix: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
    /// `true`: the name must be there; `false`: it must not be.
    #[serde(default)]
    pub present: Option<bool>,
}

/// The compiled rules of one config generation, by addressed service.
#[derive(Debug, Default)]
pub struct RouteRules {
    by_service: HashMap<Box<str>, Arc<[Arc<Route>]>>,
    /// Rules without `match.service`, for services that have no rule of their own.
    any: Arc<[Arc<Route>]>,
}

/// One compiled rule.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    matcher: Matcher,
    /// Send to this service instead of the addressed one.
    pub service: Option<Arc<str>>,
    pub split: Option<Split>,
    pub timeout: Option<std::time::Duration>,
    pub per_try_timeout: Option<std::time::Duration>,
    pub retry: Option<RetryPolicy>,
    pub fallback: Option<Arc<Fallback>>,
    pub fault: Option<Fault>,
    pub rate_limit: Option<Arc<RateLimit>>,
    /// The config it was compiled from: a reload keeps the limiter of an unchanged rule.
    config: RouteConfig,
}

#[derive(Debug, Default)]
struct Matcher {
    path: Option<Text>,
    methods: Vec<Method>,
    headers: Vec<(HeaderName, Cond)>,
    query: Vec<(String, Cond)>,
}

#[derive(Debug)]
enum Text {
    Exact(String),
    Prefix(String),
    Regex(regex::Regex),
}

#[derive(Debug)]
enum Cond {
    Present(bool),
    Is(Text),
}

// === impl RouteRules ===

impl RouteRules {
    /// Compiles `rules` (already validated); `previous` lends the rate limiters of rules whose
    /// config did not change.
    pub fn compile(rules: &[RouteConfig], previous: Option<&RouteRules>) -> Self {
        let compiled: Vec<(Option<String>, Arc<Route>)> = rules
            .iter()
            .enumerate()
            .filter_map(|(i, r)| {
                let kept = previous.and_then(|p| p.find(r));
                let route = Route::compile(i, r, kept.as_deref()).ok()?;
                Some((r.matches.service.clone(), Arc::new(route)))
            })
            .collect();
        let mut services: Vec<&str> = compiled.iter().filter_map(|(s, _)| s.as_deref()).collect();
        services.sort_unstable();
        services.dedup();
        let by_service = services
            .into_iter()
            .map(|s| {
                let list: Vec<Arc<Route>> = compiled
                    .iter()
                    .filter(|(m, _)| m.as_deref().is_none_or(|m| m == s))
                    .map(|(_, r)| r.clone())
                    .collect();
                (Box::from(s), Arc::from(list))
            })
            .collect();
        let any: Vec<Arc<Route>> = compiled
            .iter()
            .filter(|(m, _)| m.is_none())
            .map(|(_, r)| r.clone())
            .collect();
        Self {
            by_service,
            any: Arc::from(any),
        }
    }

    /// The rules a request addressed to `service` is matched against, in order.
    pub fn for_service(&self, service: &str) -> Arc<[Arc<Route>]> {
        self.by_service
            .get(service)
            .cloned()
            .unwrap_or_else(|| self.any.clone())
    }

    pub fn is_empty(&self) -> bool {
        self.by_service.is_empty() && self.any.is_empty()
    }

    fn find(&self, config: &RouteConfig) -> Option<Arc<Route>> {
        self.any
            .iter()
            .chain(self.by_service.values().flat_map(|l| l.iter()))
            .find(|r| r.config == *config)
            .cloned()
    }
}

/// The first rule of `rules` that takes the request.
pub fn select<'a>(rules: &'a [Arc<Route>], parts: &Parts) -> Option<&'a Arc<Route>> {
    rules.iter().find(|r| r.matcher.matches(parts))
}

// === impl Route ===

impl Route {
    fn compile(index: usize, c: &RouteConfig, kept: Option<&Route>) -> Result<Self, Vec<(String, String)>> {
        let key = format!("route[{index}]");
        let problems = validate_route(&key, c);
        if !problems.is_empty() {
            return Err(problems);
        }
        let text = |m: &PathMatch| -> Option<Text> {
            if let Some(e) = &m.exact {
                return Some(Text::Exact(e.clone()));
            }
            if let Some(p) = &m.prefix {
                return Some(Text::Prefix(p.clone()));
            }
            m.regex
                .as_deref()
                .and_then(|r| regex::Regex::new(r).ok())
                .map(Text::Regex)
        };
        let cond = |v: &ValueMatch| -> Cond {
            let as_path = PathMatch {
                exact: v.exact.clone(),
                prefix: v.prefix.clone(),
                regex: v.regex.clone(),
            };
            match text(&as_path) {
                Some(t) => Cond::Is(t),
                None => Cond::Present(v.present.unwrap_or(true)),
            }
        };
        let matcher = Matcher {
            path: c.matches.path.as_ref().and_then(text),
            methods: c
                .matches
                .methods
                .iter()
                .filter_map(|m| Method::from_bytes(m.as_bytes()).ok())
                .collect(),
            headers: c
                .matches
                .headers
                .iter()
                .filter_map(|h| Some((HeaderName::from_bytes(h.name.as_bytes()).ok()?, cond(h))))
                .collect(),
            query: c.matches.query.iter().map(|q| (q.name.clone(), cond(q))).collect(),
        };
        let rate_limit = c
            .rate_limit
            .as_ref()
            .map(|rl| RateLimit::reuse(rl, kept.and_then(|k| k.rate_limit.as_ref())));
        Ok(Self {
            name: c.name.clone().unwrap_or(key).into(),
            matcher,
            service: c.service.as_deref().map(Arc::from),
            split: (!c.split.is_empty()).then(|| Split::new(&c.split)),
            timeout: c.timeout.map(Dur::get),
            per_try_timeout: c.per_try_timeout.map(Dur::get),
            retry: c.retry.as_ref().map(RetryPolicy::from_config),
            fallback: c.fallback.as_ref().map(|f| Arc::new(Fallback::new(f))),
            fault: c.fault.as_ref().map(Fault::new),
            rate_limit,
            config: c.clone(),
        })
    }
}

// === impl Matcher ===

impl Matcher {
    fn matches(&self, parts: &Parts) -> bool {
        if !self.methods.is_empty() && !self.methods.contains(&parts.method) {
            return false;
        }
        if let Some(p) = &self.path {
            if !p.matches(parts.uri.path()) {
                return false;
            }
        }
        for (name, cond) in &self.headers {
            let value = parts.headers.get(name).and_then(|v| v.to_str().ok());
            if !cond.holds(value) {
                return false;
            }
        }
        if !self.query.is_empty() {
            let q = parts.uri.query().unwrap_or("");
            for (name, cond) in &self.query {
                if !cond.holds(query_param(q, name).as_deref()) {
                    return false;
                }
            }
        }
        true
    }
}

impl Text {
    fn matches(&self, s: &str) -> bool {
        match self {
            Self::Exact(e) => s == e,
            Self::Prefix(p) => s.starts_with(p.as_str()),
            Self::Regex(r) => r.is_match(s),
        }
    }
}

impl Cond {
    fn holds(&self, value: Option<&str>) -> bool {
        match (self, value) {
            (Self::Present(want), v) => v.is_some() == *want,
            (Self::Is(t), Some(v)) => t.matches(v),
            (Self::Is(_), None) => false,
        }
    }
}

/// The first value of query parameter `name`, percent-decoded where it is valid UTF-8.
fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (decode(k) == name).then(|| decode(v))
    })
}

fn decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"), 16) {
                    Ok(b) => {
                        out.push(b);
                        i += 2;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).unwrap_or_else(|_| s.to_owned())
}

// === validation ===

const METHODS: &[&str] = &[
    "GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "CONNECT",
];

/// Every problem of the rule list, each naming its key: bad regexes, matches that name no or
/// several kinds, splits that do not sum to 100, and rules that an earlier rule makes
/// unreachable (same scope and a match that takes everything, or the identical match).
/// `services`: the configured outbound services (`None`: a central policy, not checked).
pub fn validate(rules: &[RouteConfig], services: Option<&[&str]>) -> Vec<(String, String)> {
    let mut p = Vec::new();
    for (i, r) in rules.iter().enumerate() {
        let key = format!("route[{i}]");
        p.extend(validate_route(&key, r));
        for (what, name) in [("match.service", &r.matches.service), ("service", &r.service)] {
            if let (Some(s), Some(services)) = (name, services) {
                if !services.contains(&s.as_str()) {
                    p.push((format!("{key}.{what}"), format!("{s:?} is not an [[outbound]] service")));
                }
            }
        }
        for (j, earlier) in rules[..i].iter().enumerate() {
            let same_scope = earlier.matches.service.is_none() || earlier.matches.service == r.matches.service;
            if !same_scope {
                continue;
            }
            let catch_all = earlier.matches
                == MatchConfig {
                    service: earlier.matches.service.clone(),
                    ..MatchConfig::default()
                };
            if catch_all || earlier.matches == r.matches {
                p.push((
                    format!("{key}.match"),
                    format!(
                        "unreachable: route[{j}] ({}) takes every request this rule would",
                        earlier.name.as_deref().unwrap_or("unnamed")
                    ),
                ));
                break;
            }
        }
    }
    p
}

/// A regex error on one line: the crate's message draws the pattern with a caret over several
/// lines and ends with the reason.
fn regex_error(e: &regex::Error) -> String {
    let text = e.to_string();
    let last = text
        .lines()
        .map(str::trim)
        .rfind(|l| !l.is_empty())
        .unwrap_or("invalid");
    last.strip_prefix("error: ").unwrap_or(last).to_owned()
}

fn validate_route(key: &str, r: &RouteConfig) -> Vec<(String, String)> {
    let mut p = Vec::new();
    if let Some(path) = &r.matches.path {
        let n = [path.exact.is_some(), path.prefix.is_some(), path.regex.is_some()]
            .iter()
            .filter(|b| **b)
            .count();
        if n != 1 {
            p.push((
                format!("{key}.match.path"),
                "give exactly one of exact, prefix, regex".to_owned(),
            ));
        }
        for s in [&path.exact, &path.prefix].into_iter().flatten() {
            if !s.starts_with('/') {
                p.push((format!("{key}.match.path"), format!("{s:?} does not start with /")));
            }
        }
        if let Some(re) = &path.regex {
            if let Err(e) = regex::Regex::new(re) {
                p.push((
                    format!("{key}.match.path.regex"),
                    format!("bad regex {re:?}: {}", regex_error(&e)),
                ));
            }
        }
    }
    for m in &r.matches.methods {
        if !METHODS.contains(&m.as_str()) {
            p.push((
                format!("{key}.match.methods"),
                format!("{m:?} is not an HTTP method (upper case: {})", METHODS.join(", ")),
            ));
        }
    }
    for (what, list) in [("headers", &r.matches.headers), ("query", &r.matches.query)] {
        for (j, v) in list.iter().enumerate() {
            let k = format!("{key}.match.{what}[{j}]");
            if what == "headers" && HeaderName::from_bytes(v.name.as_bytes()).is_err() {
                p.push((format!("{k}.name"), format!("{:?} is not a header name", v.name)));
            }
            if v.name.is_empty() {
                p.push((format!("{k}.name"), "must not be empty".to_owned()));
            }
            let n = [
                v.exact.is_some(),
                v.prefix.is_some(),
                v.regex.is_some(),
                v.present.is_some(),
            ]
            .iter()
            .filter(|b| **b)
            .count();
            if n > 1 {
                p.push((
                    k.clone(),
                    "give at most one of exact, prefix, regex, present".to_owned(),
                ));
            }
            if let Some(re) = &v.regex {
                if let Err(e) = regex::Regex::new(re) {
                    p.push((format!("{k}.regex"), format!("bad regex {re:?}: {}", regex_error(&e))));
                }
            }
        }
    }
    p.extend(super::split::validate(&format!("{key}.split"), &r.split));
    if let (Some(t), Some(pt)) = (r.timeout, r.per_try_timeout) {
        if pt > t {
            p.push((
                format!("{key}.per_try_timeout"),
                format!("{pt} is longer than the route's timeout {t}"),
            ));
        }
    }
    if let Some(f) = &r.fallback {
        p.extend(super::validate_fallback(&format!("{key}.fallback"), f));
    }
    if let Some(f) = &r.fault {
        p.extend(f.validate(&format!("{key}.fault")));
    }
    if let Some(rl) = &r.rate_limit {
        p.extend(super::keyed(rl.validate(&format!("{key}.rate_limit"))));
    }
    p
}

#[cfg(test)]
mod tests;
