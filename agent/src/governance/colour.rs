//! The colour stage (染色): `[colour]` rules mark matching requests with a colour header
//! (`x-vmesh-colour` by default); a VM whose identity carries a colour stamps it on its own
//! outbound calls; the balance stage sends a coloured request to endpoints of that colour and
//! falls back to uncoloured ones. Configured headers (the colour, `traceparent`, a tenant) are
//! carried from an inbound request to the app's outbound calls made for it, matched by the
//! `x-request-id` or the trace id the app forwards ([`Propagation`]).

use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use serde::{Deserialize, Serialize};

use crate::config::{Cidr, Dur};

/// The colour header when `[colour]` does not name another.
pub static DEFAULT_HEADER: HeaderName = HeaderName::from_static("x-vmesh-colour");

/// `[colour]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ColourConfig {
    /// The header that carries a request's colour.
    pub header: String,
    /// Rules that colour a request that has no colour yet; the first match wins.
    pub rules: Vec<ColourRule>,
    /// Headers carried from an inbound request to the app's outbound calls for it (matched by
    /// the `x-request-id` or the `traceparent` trace id the app forwards). The colour header is
    /// always carried.
    pub propagate: Vec<String>,
    /// How long an inbound request's headers are kept for its outbound calls.
    pub propagate_ttl: Dur,
    /// Most inbound requests remembered at once (oldest dropped beyond).
    pub propagate_max: usize,
}

/// One `[[colour.rules]]` entry: the colour, and conditions that must all hold (at least one).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ColourRule {
    /// The colour given to matching requests.
    pub colour: String,
    /// A request header with this exact value: `{ name = "x-user", value = "tester-1" }`.
    #[serde(default)]
    pub header: Option<NameValue>,
    /// A cookie with this exact value.
    #[serde(default)]
    pub cookie: Option<NameValue>,
    /// A query parameter with this exact value.
    #[serde(default)]
    pub query: Option<NameValue>,
    /// The caller's address: an IP or a CIDR block (`10.1.0.0/16`).
    #[serde(default)]
    pub caller: Option<String>,
}

/// A name and the exact value it must have.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct NameValue {
    pub name: String,
    pub value: String,
}

/// The compiled `[colour]` section.
#[derive(Debug)]
pub struct Colouring {
    pub header: HeaderName,
    rules: Vec<Rule>,
    /// Carried headers (the colour header first).
    pub propagate: Vec<HeaderName>,
}

#[derive(Debug)]
struct Rule {
    colour: HeaderValue,
    header: Option<(HeaderName, String)>,
    cookie: Option<(String, String)>,
    query: Option<(String, String)>,
    caller: Option<Cidr>,
}

// === impl ColourConfig ===

impl Default for ColourConfig {
    fn default() -> Self {
        Self {
            header: "x-vmesh-colour".to_owned(),
            rules: Vec::new(),
            propagate: Vec::new(),
            propagate_ttl: Dur::secs(30),
            propagate_max: 100_000,
        }
    }
}

impl ColourConfig {
    pub fn validate(&self, key: &str) -> Vec<(String, String)> {
        let mut p = Vec::new();
        if HeaderName::from_bytes(self.header.as_bytes()).is_err() {
            p.push((
                format!("{key}.header"),
                format!("{:?} is not a header name", self.header),
            ));
        }
        for (i, h) in self.propagate.iter().enumerate() {
            if HeaderName::from_bytes(h.as_bytes()).is_err() {
                p.push((format!("{key}.propagate[{i}]"), format!("{h:?} is not a header name")));
            }
        }
        if self.propagate_max == 0 {
            p.push((format!("{key}.propagate_max"), "must be at least 1".to_owned()));
        }
        for (i, r) in self.rules.iter().enumerate() {
            let k = format!("{key}.rules[{i}]");
            if r.colour.is_empty() || HeaderValue::from_str(&r.colour).is_err() {
                p.push((format!("{k}.colour"), format!("{:?} is not a usable colour", r.colour)));
            }
            if r.header.is_none() && r.cookie.is_none() && r.query.is_none() && r.caller.is_none() {
                p.push((
                    k.clone(),
                    "needs a condition: header, cookie, query or caller".to_owned(),
                ));
            }
            if let Some(h) = &r.header {
                if HeaderName::from_bytes(h.name.as_bytes()).is_err() {
                    p.push((format!("{k}.header.name"), format!("{:?} is not a header name", h.name)));
                }
            }
            if let Some(c) = &r.caller {
                if Cidr::parse(c).is_err() {
                    p.push((format!("{k}.caller"), format!("{c:?} is not an IP or CIDR block")));
                }
            }
        }
        p
    }
}

// === impl Colouring ===

impl Colouring {
    /// Compiles a validated section.
    pub fn new(c: &ColourConfig) -> Self {
        let header = HeaderName::from_bytes(c.header.as_bytes()).unwrap_or_else(|_| DEFAULT_HEADER.clone());
        let mut propagate = vec![header.clone()];
        for h in &c.propagate {
            if let Ok(n) = HeaderName::from_bytes(h.as_bytes()) {
                if !propagate.contains(&n) {
                    propagate.push(n);
                }
            }
        }
        let rules = c
            .rules
            .iter()
            .filter_map(|r| {
                Some(Rule {
                    colour: HeaderValue::from_str(&r.colour).ok()?,
                    header: r
                        .header
                        .as_ref()
                        .and_then(|h| Some((HeaderName::from_bytes(h.name.as_bytes()).ok()?, h.value.clone()))),
                    cookie: r.cookie.as_ref().map(|c| (c.name.clone(), c.value.clone())),
                    query: r.query.as_ref().map(|q| (q.name.clone(), q.value.clone())),
                    caller: r.caller.as_deref().and_then(|c| Cidr::parse(c).ok()),
                })
            })
            .collect();
        Self {
            header,
            rules,
            propagate,
        }
    }

    /// The colour the rules give a request that has none.
    pub fn classify(&self, headers: &HeaderMap, query: Option<&str>, caller: IpAddr) -> Option<&HeaderValue> {
        self.rules
            .iter()
            .find(|r| r.matches(headers, query, caller))
            .map(|r| &r.colour)
    }

    /// Colours the request in `headers` when it has no colour: by the rules, else `own` (the
    /// VM's identity colour). Returns the request's colour.
    pub fn apply<'h>(
        &self,
        headers: &'h mut HeaderMap,
        query: Option<&str>,
        caller: IpAddr,
        own: Option<&HeaderValue>,
    ) -> Option<&'h HeaderValue> {
        if !headers.contains_key(&self.header) {
            let c = self.classify(headers, query, caller).or(own).cloned();
            if let Some(c) = c {
                headers.insert(self.header.clone(), c);
            }
        }
        headers.get(&self.header).filter(|v| !v.is_empty())
    }
}

impl Rule {
    fn matches(&self, headers: &HeaderMap, query: Option<&str>, caller: IpAddr) -> bool {
        if let Some((name, value)) = &self.header {
            if headers.get(name).is_none_or(|v| v.as_bytes() != value.as_bytes()) {
                return false;
            }
        }
        if let Some((name, value)) = &self.cookie {
            let found = headers
                .get_all(http::header::COOKIE)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .flat_map(|v| v.split(';'))
                .filter_map(|kv| kv.trim().split_once('='))
                .any(|(k, v)| k == name && v == value);
            if !found {
                return false;
            }
        }
        if let Some((name, value)) = &self.query {
            let found = query.unwrap_or("").split('&').any(|kv| {
                let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                k == name && v == value
            });
            if !found {
                return false;
            }
        }
        if let Some(net) = &self.caller {
            if !net.contains(caller) {
                return false;
            }
        }
        true
    }
}

// === Propagation ===

/// Headers of inbound requests, kept for the app's outbound calls of the same request: a
/// bounded map in 16 shards (a lock per shard, never a global one), entries expiring after a
/// TTL. Keyed by the `x-request-id` and by the trace id of `traceparent`.
#[derive(Debug)]
pub struct Propagation {
    shards: Vec<Mutex<HashMap<u64, Entry>>>,
    hasher: RandomState,
    ttl: Duration,
    per_shard: usize,
    headers: Vec<HeaderName>,
}

#[derive(Debug)]
struct Entry {
    expires: Instant,
    headers: Arc<[(HeaderName, HeaderValue)]>,
}

const SHARDS: usize = 16;
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

impl Propagation {
    pub fn new(headers: Vec<HeaderName>, ttl: Duration, max: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            hasher: RandomState::new(),
            ttl,
            per_shard: max.div_ceil(SHARDS).max(1),
            headers,
        }
    }

    fn keys(&self, headers: &HeaderMap) -> [Option<u64>; 2] {
        let rid = headers
            .get(&X_REQUEST_ID)
            .map(|v| self.hasher.hash_one((0u8, v.as_bytes())));
        // traceparent: version "-" trace-id (32 hex) "-" parent-id "-" flags.
        let trace = headers
            .get(&TRACEPARENT)
            .and_then(|v| v.as_bytes().get(3..35))
            .map(|t| self.hasher.hash_one((1u8, t)));
        [rid, trace]
    }

    fn shard(&self, key: u64) -> &Mutex<HashMap<u64, Entry>> {
        &self.shards[(key as usize) % SHARDS]
    }

    /// Remembers an inbound request's carried headers (if it has any, and a key).
    pub fn remember(&self, headers: &HeaderMap, now: Instant) {
        let carried: Vec<(HeaderName, HeaderValue)> = self
            .headers
            .iter()
            .filter_map(|n| Some((n.clone(), headers.get(n)?.clone())))
            .collect();
        if carried.is_empty() {
            return;
        }
        let carried: Arc<[(HeaderName, HeaderValue)]> = carried.into();
        for key in self.keys(headers).into_iter().flatten() {
            let mut shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
            if shard.len() >= self.per_shard && !shard.contains_key(&key) {
                shard.retain(|_, e| e.expires > now);
                if shard.len() >= self.per_shard {
                    // Still full of live entries: drop the one closest to expiry.
                    if let Some(oldest) = shard.iter().min_by_key(|(_, e)| e.expires).map(|(k, _)| *k) {
                        shard.remove(&oldest);
                    }
                }
            }
            shard.insert(
                key,
                Entry {
                    expires: now + self.ttl,
                    headers: carried.clone(),
                },
            );
        }
    }

    /// Adds to an outbound request the carried headers it lacks, found by its request id or
    /// trace id.
    pub fn restore(&self, headers: &mut HeaderMap, now: Instant) {
        let found = self.keys(headers).into_iter().flatten().find_map(|key| {
            let shard = self.shard(key).lock().unwrap_or_else(|p| p.into_inner());
            shard.get(&key).filter(|e| e.expires > now).map(|e| e.headers.clone())
        });
        if let Some(carried) = found {
            for (n, v) in carried.iter() {
                if !headers.contains_key(n) {
                    headers.insert(n.clone(), v.clone());
                }
            }
        }
    }

    /// Entries held (live or not yet purged).
    pub fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().map(|m| m.len()).unwrap_or(0)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests;
