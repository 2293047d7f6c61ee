//! Pure validation of a typed config: every problem, each naming its key.

use std::collections::HashMap;
use std::net::SocketAddr;

use super::{BalancerKind, CmdbKind, Config, OutboundConfig, RegistryKind, SourceKind};

type Problems = Vec<(String, String)>;

/// Returns every semantic problem of `config` as `(key, message)`.
pub fn validate(config: &Config) -> Problems {
    let mut p = Problems::new();
    let mut listeners: HashMap<SocketAddr, String> = HashMap::new();
    let mut claim = |p: &mut Problems, addr: SocketAddr, key: String| {
        if let Some(other) = listeners.get(&addr) {
            p.push((key, format!("address {addr} is already used by {other}")));
        } else {
            listeners.insert(addr, key);
        }
    };

    let agent = &config.agent;
    claim(&mut p, agent.admin_listen, "agent.admin_listen".into());
    let admin_locked = agent.admin_tls && agent.admin_token_file.is_some();
    if !(agent.admin_listen.ip().is_loopback() || admin_locked) {
        // Off loopback the admin API (drain, undrain, the shift dial, the tap) is reachable
        // from the network: it must not be plaintext or open.
        p.push((
            "agent.admin_listen".into(),
            format!(
                "{} is not a loopback address: set agent.admin_tls = true and agent.admin_token_file, or keep it on 127.0.0.1 (agent.admin_socket for local tools)",
                agent.admin_listen
            ),
        ));
    }
    if let Some(path) = &agent.admin_socket {
        if !path.is_absolute() {
            p.push((
                "agent.admin_socket".into(),
                format!("{} is not an absolute path", path.display()),
            ));
        }
    }
    if let Some(n) = agent.worker_threads {
        if n == 0 || n > 1024 {
            p.push(("agent.worker_threads".into(), format!("{n} is out of range 1..=1024")));
        }
    }
    if let Some(node) = &agent.node {
        if node.trim().is_empty() {
            p.push(("agent.node".into(), "must not be empty".into()));
        }
    }
    if let Err(e) = tracing_subscriber::EnvFilter::try_new(&agent.log_level) {
        p.push(("agent.log_level".into(), format!("invalid filter: {e}")));
    }

    match config.cmdb.kind {
        CmdbKind::File => {}
        CmdbKind::Http => match &config.cmdb.url {
            Some(u) if !u.contains("{vm}") => p.push(("cmdb.url".into(), format!("{u:?} has no {{vm}} placeholder"))),
            Some(u) if !is_http_url(u) => {
                p.push(("cmdb.url".into(), format!("{u:?} is not an http:// or https:// URL")))
            }
            Some(_) => {}
            None => p.push(("cmdb.url".into(), "required for kind = \"http\"".into())),
        },
        CmdbKind::Nautobot | CmdbKind::Netbox => match &config.cmdb.url {
            Some(u) if !is_http_url(u) => {
                p.push(("cmdb.url".into(), format!("{u:?} is not an http:// or https:// URL")))
            }
            Some(_) => {}
            None => p.push((
                "cmdb.url".into(),
                format!("required for kind = {:?}", config.cmdb.kind).to_lowercase(),
            )),
        },
        CmdbKind::Env => {}
    }
    if config.cmdb.refresh.get().is_zero() {
        p.push(("cmdb.refresh".into(), "must be greater than 0".into()));
    }

    if config.registry.kind == RegistryKind::Etcd
        && config.registry.advertise_address.is_none()
        && config.inbound.as_ref().is_some_and(|i| i.listen.ip().is_unspecified())
    {
        p.push((
            "registry.advertise_address".into(),
            "required with etcd when inbound.listen is a wildcard address: callers need an address to reach".into(),
        ));
    }
    if config.registry.check_ttl.get() < std::time::Duration::from_secs(1) {
        p.push(("registry.check_ttl".into(), "must be at least 1s".into()));
    }
    if config.registry.lease_ttl.get() < std::time::Duration::from_secs(2) {
        p.push(("registry.lease_ttl".into(), "must be at least 2s".into()));
    }
    if config.registry.anti_entropy.get().is_zero() {
        p.push(("registry.anti_entropy".into(), "must be greater than 0".into()));
    }
    match (
        config.registry.kind,
        &config.registry.username,
        &config.registry.token_file,
    ) {
        (RegistryKind::Etcd, None, Some(_)) => p.push((
            "registry.token_file".into(),
            "etcd authenticates a user: set registry.username (the token file holds its password)".into(),
        )),
        (RegistryKind::Etcd, Some(u), None) if !u.is_empty() => p.push((
            "registry.username".into(),
            "needs registry.token_file (the file holding the user's password)".into(),
        )),
        (RegistryKind::Etcd, Some(u), _) if u.is_empty() => {
            p.push(("registry.username".into(), "must not be empty".into()))
        }
        (kind, Some(_), _) if kind != RegistryKind::Etcd => {
            p.push(("registry.username".into(), "only etcd authenticates a user".into()))
        }
        _ => {}
    }
    // `memory` has no address: the table is in the agent's own memory.
    if !matches!(config.registry.kind, RegistryKind::None | RegistryKind::Memory)
        && !is_http_url(&config.registry.address)
    {
        p.push((
            "registry.address".into(),
            format!("{:?} is not an http:// or https:// URL", config.registry.address),
        ));
    }

    if let Some(inb) = &config.inbound {
        claim(&mut p, inb.listen, "inbound.listen".into());
        if inb.app == inb.listen {
            p.push(("inbound.app".into(), "must differ from inbound.listen (a loop)".into()));
        }
        if inb.timeout.get().is_zero() {
            p.push(("inbound.timeout".into(), "must be greater than 0".into()));
        }
        if inb.connect_timeout.get().is_zero() {
            p.push(("inbound.connect_timeout".into(), "must be greater than 0".into()));
        }
        if let Some(path) = &inb.health.path {
            if !path.starts_with('/') {
                p.push(("inbound.health.path".into(), format!("{path:?} must start with '/'")));
            }
        }
        if inb.health.interval.get().is_zero() {
            p.push(("inbound.health.interval".into(), "must be greater than 0".into()));
        }
        if inb.health.unhealthy_threshold == 0 {
            p.push(("inbound.health.unhealthy_threshold".into(), "must be at least 1".into()));
        }
        let ramp = &inb.ramp;
        if !(ramp.aggression > 0.0 && ramp.aggression <= 10.0) {
            p.push((
                "inbound.ramp.aggression".into(),
                format!("{} is out of range (0, 10]", ramp.aggression),
            ));
        }
        if ramp.steps.is_empty()
            || ramp.steps.windows(2).any(|w| w[0] >= w[1])
            || ramp.steps.first().is_some_and(|&s| s < 1)
            || ramp.steps.last() != Some(&100)
        {
            p.push((
                "inbound.ramp.steps".into(),
                format!("{:?} must rise strictly from >= 1 and end at 100", ramp.steps),
            ));
        }
        if ramp.steps.len() > 10 {
            p.push((
                "inbound.ramp.steps".into(),
                "at most 10 registry writes per ramp (each is a Raft write)".into(),
            ));
        }
    }

    let proxy = &config.proxy;
    if let Some(addr) = proxy.shared_outbound_listen {
        claim(&mut p, addr, "proxy.shared_outbound_listen".into());
    }
    if proxy.max_connections == 0 {
        p.push(("proxy.max_connections".into(), "must be at least 1".into()));
    }
    if !(1024..=(16 << 20)).contains(&proxy.max_header_bytes.0) {
        p.push((
            "proxy.max_header_bytes".into(),
            format!("{} is out of range 1KiB..=16MiB", proxy.max_header_bytes),
        ));
    }
    if proxy.h2_max_concurrent_streams == 0 {
        p.push(("proxy.h2_max_concurrent_streams".into(), "must be at least 1".into()));
    }
    if proxy.header_read_timeout.get().is_zero() {
        p.push(("proxy.header_read_timeout".into(), "must be greater than 0".into()));
    }
    for (key, d) in [
        ("proxy.idle_timeout", proxy.idle_timeout),
        ("proxy.stream_idle_timeout", proxy.stream_idle_timeout),
        ("proxy.request_body_timeout", proxy.request_body_timeout),
    ] {
        if d.get().is_zero() {
            p.push((key.into(), "must be greater than 0".into()));
        }
    }
    if !(16 << 10..=16 << 20).contains(&proxy.h2_max_send_buffer.0) {
        p.push((
            "proxy.h2_max_send_buffer".into(),
            format!("{} is out of range 16KiB..=16MiB", proxy.h2_max_send_buffer),
        ));
    }
    if proxy.max_connections_total == 0 {
        p.push(("proxy.max_connections_total".into(), "must be at least 1".into()));
    }
    if proxy.max_requests_in_flight == 0 {
        p.push(("proxy.max_requests_in_flight".into(), "must be at least 1".into()));
    }
    if config.telemetry.access_log_buffer == 0 {
        p.push(("telemetry.access_log_buffer".into(), "must be at least 1".into()));
    }
    if config.telemetry.access_log.trim().is_empty() {
        p.push((
            "telemetry.access_log".into(),
            "use \"off\", \"stdout\" or a file path".into(),
        ));
    }

    let mut services: HashMap<&str, usize> = HashMap::new();
    for (i, out) in config.outbound.iter().enumerate() {
        let key = |k: &str| format!("outbound[{i}].{k}");
        if !is_service_name(&out.service) {
            p.push((
                key("service"),
                format!(
                    "{:?} is not a valid service name (letters, digits, '-', '_', '.')",
                    out.service
                ),
            ));
        } else if let Some(first) = services.insert(&out.service, i) {
            p.push((
                key("service"),
                format!("{:?} is already defined by outbound[{first}]", out.service),
            ));
        }
        if let Some(addr) = out.listen {
            claim(&mut p, addr, key("listen"));
        }
        if out.timeout.get().is_zero() {
            p.push((key("timeout"), "must be greater than 0".into()));
        }
        if let Some(per_try) = out.per_try_timeout {
            if per_try.get().is_zero() || per_try > out.timeout {
                p.push((
                    key("per_try_timeout"),
                    format!("must be in (0, timeout = {}]", out.timeout),
                ));
            }
        }
        if out.connect_timeout.get().is_zero() {
            p.push((key("connect_timeout"), "must be greater than 0".into()));
        }
        for (j, ep) in out.endpoints.iter().enumerate() {
            if !(1..=10_000).contains(&ep.weight()) {
                p.push((
                    format!("outbound[{i}].endpoints[{j}].weight"),
                    format!("{} is out of range 1..=10000", ep.weight()),
                ));
            }
            if !matches!(ep.env(), "vm" | "k8s") {
                p.push((
                    format!("outbound[{i}].endpoints[{j}].env"),
                    format!("{:?} must be \"vm\" or \"k8s\"", ep.env()),
                ));
            }
        }
        match (&out.balancer, &out.hash_header) {
            (BalancerKind::RingHash, Some(h)) if http::HeaderName::from_bytes(h.as_bytes()).is_err() => {
                p.push((key("hash_header"), format!("{h:?} is not a valid header name")));
            }
            (BalancerKind::RingHash, None) => {
                p.push((key("hash_header"), "required by balancer = \"ring-hash\"".into()));
            }
            (b, Some(_)) if *b != BalancerKind::RingHash => {
                p.push((key("hash_header"), "only used by balancer = \"ring-hash\"".into()));
            }
            _ => {}
        }
        if !(0.0..=1.0).contains(&out.retry.budget_ratio) {
            p.push((
                key("retry.budget_ratio"),
                format!("{} is out of range 0..=1", out.retry.budget_ratio),
            ));
        }
        if out.retry.attempts > 10 {
            p.push((key("retry.attempts"), format!("{} is more than 10", out.retry.attempts)));
        }
        validate_sources(config, out, &key, &mut p);
        if let Some(shift) = &out.shift {
            if let Err(e) = crate::discovery::shift::Policy::new(shift.vm, shift.k8s) {
                p.push((key("shift"), e.to_string()));
            }
        }
        if out.locality.min_healthy_percent > 100 {
            p.push((
                key("locality.min_healthy_percent"),
                format!("{} is out of range 0..=100", out.locality.min_healthy_percent),
            ));
        }
        p.extend(governance_problems(
            &key(""),
            Some(&out.outlier),
            out.breaker.as_ref(),
            out.fallback.as_ref(),
            out.rate_limit.as_ref(),
        ));
    }
    let names: Vec<&str> = config.outbound.iter().map(|o| o.service.as_str()).collect();
    p.extend(crate::governance::routing::validate(&config.route, Some(&names)));
    p.extend(config.tracing.validate("tracing"));
    if let Some(c) = &config.colour {
        p.extend(c.validate("colour"));
    }
    if let Some(inb) = &config.inbound {
        if let Some(rl) = &inb.rate_limit {
            p.extend(crate::governance::keyed(rl.validate("inbound.rate_limit")));
        }
        if let Some(a) = &inb.adaptive {
            p.extend(crate::governance::keyed(a.validate("inbound.adaptive")));
        }
    }
    p.extend(tls_problems(config));
    if !matches!(config.registry.advertise_env.as_str(), "vm" | "k8s") {
        p.push((
            "registry.advertise_env".into(),
            format!("{:?} must be \"vm\" or \"k8s\"", config.registry.advertise_env),
        ));
    }
    if config.registry.max_watches == 0 {
        p.push(("registry.max_watches".into(), "must be at least 1".into()));
    }
    if let Some(api) = &config.kubernetes.api {
        if !is_http_url(api) {
            p.push((
                "kubernetes.api".into(),
                format!("{api:?} is not an http:// or https:// URL"),
            ));
        }
    }
    p
}

/// Problems of `[tls]`, the modes and `[[inbound.authz]]` (docs/security.md).
fn tls_problems(config: &Config) -> Problems {
    use super::{Protocol, TlsMode};
    let mut lines = Vec::new();
    let mut needed_by = None;
    if config.agent.admin_tls {
        needed_by = Some("agent.admin_tls".to_owned());
    }
    if let Some(inb) = &config.inbound {
        if inb.mode != TlsMode::Plaintext {
            needed_by = Some("inbound.mode".to_owned());
            if inb.protocol == Protocol::Tcp {
                lines.push(
                    "inbound.mode: TLS modes need protocol http, http2 or grpc (tcp listeners are plaintext)"
                        .to_owned(),
                );
            }
        }
        if !inb.authz.is_empty() && inb.mode == TlsMode::Plaintext {
            lines.push("inbound.authz: callers are identified by their certificates: needs inbound.mode \"strict\" or \"permissive\"".to_owned());
        }
        crate::governance::authz::validate("inbound.authz", &inb.authz, &mut lines);
    }
    for (i, out) in config.outbound.iter().enumerate() {
        match out.mode {
            TlsMode::Plaintext => {}
            TlsMode::Permissive => lines.push(format!(
                "outbound[{i}].mode: \"permissive\" is for listeners; an upstream is \"strict\" (mutual TLS) or \"plaintext\""
            )),
            TlsMode::Strict => {
                needed_by.get_or_insert_with(|| format!("outbound[{i}].mode"));
                if out.protocol == Protocol::Tcp {
                    lines.push(format!("outbound[{i}].mode: TLS modes need protocol http, http2 or grpc"));
                }
            }
        }
    }
    config.tls.validate(needed_by.as_deref(), &mut lines);
    if config.tls.source == crate::tls::TlsSource::Consul {
        if config.registry.kind != RegistryKind::Consul {
            lines.push("tls.source: \"consul\" fetches certificates through the Consul client: needs [registry] kind = \"consul\"".to_owned());
        }
        if config.cmdb.kind == CmdbKind::File && config.cmdb.path.is_none() {
            lines.push(
                "tls.source: \"consul\" fetches the leaf of the workload's service: needs an identity from [cmdb]"
                    .to_owned(),
            );
        }
    }
    crate::governance::keyed(lines)
}

/// Problems of a service's governance sections; `prefix` ends with `.` (`outbound[0].`) or
/// is empty (a central policy).
pub fn governance_problems(
    prefix: &str,
    outlier: Option<&crate::resilience::outlier::OutlierConfig>,
    breaker: Option<&crate::resilience::breaker::BreakerConfig>,
    fallback: Option<&crate::governance::FallbackConfig>,
    rate_limit: Option<&crate::resilience::rate_limit::RateLimitConfig>,
) -> Problems {
    let mut p = Problems::new();
    if let Some(o) = outlier {
        p.extend(o.validate(&format!("{prefix}outlier")));
    }
    if let Some(b) = breaker {
        p.extend(crate::governance::keyed(b.validate(&format!("{prefix}breaker"))));
    }
    if let Some(f) = fallback {
        p.extend(crate::governance::validate_fallback(&format!("{prefix}fallback"), f));
    }
    if let Some(rl) = rate_limit {
        p.extend(crate::governance::keyed(rl.validate(&format!("{prefix}rate_limit"))));
    }
    p
}

/// The sources of one outbound service must each have what they read from.
fn validate_sources(config: &Config, out: &OutboundConfig, key: &dyn Fn(&str) -> String, p: &mut Problems) {
    // No source at all is allowed (the cluster answers 503 NO_HEALTHY_ENDPOINT, with a warning).
    let sources = out.sources(config.registry.kind);
    let mut seen = Vec::new();
    for s in &sources {
        if seen.contains(s) {
            p.push((key("sources"), format!("{s:?} is listed twice").to_lowercase()));
        }
        seen.push(*s);
        let wanted = match s {
            SourceKind::Static if out.endpoints.is_empty() => {
                p.push((key("sources"), "\"static\" needs endpoints".into()));
                continue;
            }
            SourceKind::Consul => RegistryKind::Consul,
            SourceKind::Etcd => RegistryKind::Etcd,
            SourceKind::Memory => RegistryKind::Memory,
            SourceKind::Static | SourceKind::Kubernetes => continue,
        };
        if config.registry.kind != wanted {
            p.push((
                key("sources"),
                format!("{s:?} needs [registry] kind = {wanted:?}",).to_lowercase(),
            ));
        }
    }
    if !out.endpoints.is_empty() && !sources.contains(&SourceKind::Static) {
        p.push((
            key("endpoints"),
            "static endpoints are set but \"static\" is not in sources".into(),
        ));
    }
    if out.tag.as_deref().is_some_and(str::is_empty) {
        p.push((key("tag"), "must not be empty".into()));
    }
}

fn is_http_url(s: &str) -> bool {
    s.strip_prefix("http://")
        .or_else(|| s.strip_prefix("https://"))
        .is_some_and(|rest| !rest.is_empty())
}

fn is_service_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

#[cfg(test)]
mod tests {
    use crate::config::load_str;

    #[test]
    fn minimal_design_schema_loads() {
        let text = include_str!("../../tests/fixtures/design-minimal.toml");
        let c = load_str(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.outbound.len(), 1);
        assert_eq!(c.agent.worker_threads, Some(1));
        assert_eq!(c.inbound.as_ref().map(|i| i.ramp.window.get().as_secs()), Some(60));
    }

    #[test]
    fn every_problem_is_reported_with_its_key() {
        let text = r#"
[agent]
admin_listen = "127.0.0.1:9901"
colour = "red"

[proxy]
max_conections = 5
max_header_bytes = "12 parsecs"

[[outbound]]
service = "a b"
listen = "127.0.0.1:9901"
balancer = "fastest"
timeout = "soon"
endpoints = ["127.0.0.1:1"]

[[outbound]]
service = "b"
balancer = "ring-hash"
endpoints = ["127.0.0.1:2"]
[outbound.retry]
budget_ratio = 3.0
"#;
        let err = load_str(text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "agent.colour",
            "proxy.max_conections",
            "proxy.max_header_bytes",
            "outbound[0].balancer",
            "outbound[0].timeout",
        ] {
            assert!(keys.contains(&want), "missing {want} in {keys:?}");
        }
        let colour = err.problems.iter().find(|p| p.key == "agent.colour").unwrap();
        assert_eq!(colour.line, Some(4));
        assert!(colour.message.contains("unknown field"), "{}", colour.message);
    }

    #[test]
    fn semantic_problems_are_all_reported() {
        let text = r#"
[agent]
admin_listen = "127.0.0.1:9901"
[[outbound]]
service = "a b"
listen = "127.0.0.1:9901"
endpoints = [{ address = "127.0.0.1:1", weight = 0 }]
[[outbound]]
service = "b"
balancer = "ring-hash"
endpoints = ["127.0.0.1:2"]
[outbound.retry]
budget_ratio = 3.0
"#;
        let err = load_str(text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "outbound[0].service",
                "outbound[0].listen",
                "outbound[0].endpoints[0].weight",
                "outbound[1].hash_header",
                "outbound[1].retry.budget_ratio",
            ]
        );
        assert_eq!(err.problems[1].line, Some(6));
    }

    #[test]
    fn env_overrides_file_values() {
        let src = crate::config::Source {
            path: None,
            text: Some("[agent]\nnode = \"a\"\n".into()),
            env: [
                ("VMESH_AGENT__NODE".to_owned(), "b".to_owned()),
                ("VMESH_AGENT__WORKER_THREADS".to_owned(), "3".to_owned()),
                ("VMESH_PROXY__MAX_CONNECTIONS".to_owned(), "7".to_owned()),
            ]
            .into_iter()
            .collect(),
        };
        let c = crate::config::load(&src).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.agent.node.as_deref(), Some("b"));
        assert_eq!(c.agent.worker_threads, Some(3));
        assert_eq!(c.proxy.max_connections, 7);
    }

    #[test]
    fn durations_beyond_a_day_are_refused_with_their_key() {
        let text = r#"
[agent]
drain_timeout = "2d"
[inbound]
listen = "127.0.0.1:15006"
app = "127.0.0.1:8080"
timeout = "18446744073709551615s"
[inbound.ramp]
window = "30d"
[colour]
propagate_ttl = "1y"
[[outbound]]
service = "a"
endpoints = ["127.0.0.1:1"]
timeout = "24h 1s"
[outbound.breaker]
open_for = "100000000y"
[[route]]
timeout = "9999999999h"
"#;
        let err = load_str(text).unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        for want in [
            "agent.drain_timeout",
            "inbound.timeout",
            "inbound.ramp.window",
            "colour.propagate_ttl",
            "outbound[0].timeout",
            "outbound[0].breaker.open_for",
            "route[0].timeout",
        ] {
            assert!(keys.contains(&want), "missing {want} in {:?}", err.problems);
        }
        // Exactly a day is the longest accepted.
        let c =
            load_str("[agent]\ndrain_timeout = \"1d\"\n[cmdb]\nrefresh = \"24h\"\n").unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(c.agent.drain_timeout, crate::config::Dur::MAX);
    }

    #[test]
    fn central_policies_from_the_registry_are_capped_too() {
        let huge = br#"{"routes": [{"timeout": "500000000y"}], "breaker": {"open_for": "3d"}}"#;
        let problems = crate::governance::central::parse("orders", huge).unwrap_err();
        assert!(problems[0].contains("invalid duration"), "{problems:?}");
    }

    #[test]
    fn trusted_forwarders_parse_as_networks() {
        let c = load_str("").unwrap_or_else(|e| panic!("{e}"));
        let lo = &c.proxy.trust_forwarded_for;
        assert!(lo.iter().any(|n| n.contains("127.0.0.1".parse().unwrap())));
        assert!(lo.iter().any(|n| n.contains("::1".parse().unwrap())));
        assert!(!lo.iter().any(|n| n.contains("10.0.0.1".parse().unwrap())));
        let c = load_str("[proxy]\ntrust_forwarded_for = []\n").unwrap_or_else(|e| panic!("{e}"));
        assert!(c.proxy.trust_forwarded_for.is_empty());
        let err = load_str("[proxy]\ntrust_forwarded_for = [\"10.0.0.0/8\", \"10.0.0.0/40\"]\n").unwrap_err();
        assert_eq!(err.problems[0].key, "proxy.trust_forwarded_for[1]", "{err}");
        assert!(err.problems[0].message.contains("prefix length"), "{err}");
    }

    #[test]
    fn syntax_errors_name_the_line() {
        let err = load_str("[agent]\nnode = \n").unwrap_err();
        assert_eq!(err.problems[0].line, Some(2), "{err}");
    }
}
