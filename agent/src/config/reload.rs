//! What a reload may change: every key is either applied by a reload or read once at start-up.
//! One list says which ([`settle`]); start-up and reload both go through it (app.rs
//! `Runtime::prepare`).
//!
//! A reload that changes a start-up-only key keeps the running value of that key (so nothing
//! runs half on the old value and half on the new one), applies everything else, and names the
//! kept keys in a warning and in `/status` (`reload.pending_restart`). Every field of every
//! section is listed by destructuring: a new config field does not compile until it is
//! classified here.

use super::model::{AgentConfig, Config, InboundConfig, ProxyConfig, RegistryKind};

/// A reload that cannot be applied at all (the running config stays).
pub const RELOAD_REFUSED: &str = "RELOAD_REFUSED";

/// Why a reload cannot be applied, or `None`.
pub fn refusal(old: &Config, new: &Config) -> Option<String> {
    let listen = |c: &Config| c.inbound.as_ref().map(|i| i.listen);
    if old.registry.kind != RegistryKind::None && listen(old) != listen(new) {
        return Some(format!(
            "{RELOAD_REFUSED}: inbound.listen: the registered port cannot change on reload; restart \
             the agent (it deregisters and registers the new port)"
        ));
    }
    None
}

/// The config a reload puts in force: `new` with every start-up-only key that changed set back
/// to its running value in `old`, and the keys so kept (empty at start-up, `old = None`).
pub fn settle(old: Option<&Config>, mut new: Config) -> (Config, Vec<&'static str>) {
    let mut kept = Vec::new();
    let Some(old) = old else {
        return (new, kept);
    };
    let Config {
        agent,
        cmdb,
        registry,
        inbound,
        proxy,
        telemetry,
        tracing,
        outbound: _, // discovery tasks and routes follow it (Discovery::reconcile)
        kubernetes,
        route: _,  // route table
        colour: _, // route table
        tls,
    } = &mut new;
    settle_agent(&old.agent, agent, &mut kept);
    // The registrar and the discovery sources hold their clients from start-up.
    keep(&mut kept, "cmdb", &old.cmdb, cmdb);
    keep(&mut kept, "registry", &old.registry, registry);
    keep(&mut kept, "kubernetes", &old.kubernetes, kubernetes);
    // The access log writer and its buffer are made once.
    keep(&mut kept, "telemetry", &old.telemetry, telemetry);
    // The tracer and its exporter task are made once (telemetry::trace::start).
    keep(&mut kept, "tracing", &old.tracing, tracing);
    // The file paths and trust domain are read at start-up; the files' contents are reloaded
    // by the certificate watcher (tls/watch.rs), with no restart.
    keep(&mut kept, "tls", &old.tls, tls);
    settle_proxy(&old.proxy, proxy, &mut kept);
    match (&old.inbound, inbound.as_mut()) {
        (Some(o), Some(n)) => settle_inbound(o, n, &mut kept),
        (None, None) => {}
        // The health checker starts with the agent: with no inbound at start there is none,
        // and one started is not stopped.
        _ => kept.push("inbound (added or removed: its health check follows at restart)"),
    }
    (new, kept)
}

fn settle_agent(old: &AgentConfig, new: &mut AgentConfig, kept: &mut Vec<&'static str>) {
    let AgentConfig {
        node,
        data_dir,
        admin_listen,
        admin_token_file: _, // read on each admin call
        admin_tls,
        admin_socket,
        admin_socket_uids,
        worker_threads,
        drain_timeout: _, // read at shutdown
        drain_grace,
        log_level,
    } = new;
    keep(kept, "agent.node", &old.node, node);
    keep(kept, "agent.data_dir", &old.data_dir, data_dir);
    keep(kept, "agent.admin_listen", &old.admin_listen, admin_listen);
    keep(kept, "agent.admin_tls", &old.admin_tls, admin_tls);
    keep(kept, "agent.admin_socket", &old.admin_socket, admin_socket);
    keep(
        kept,
        "agent.admin_socket_uids",
        &old.admin_socket_uids,
        admin_socket_uids,
    );
    keep(kept, "agent.worker_threads", &old.worker_threads, worker_threads);
    keep(kept, "agent.drain_grace", &old.drain_grace, drain_grace);
    keep(kept, "agent.log_level", &old.log_level, log_level);
}

/// The downstream connection builder and the listener limits are made once.
fn settle_proxy(old: &ProxyConfig, new: &mut ProxyConfig, kept: &mut Vec<&'static str>) {
    let ProxyConfig {
        shared_outbound_listen: _, // listeners
        max_connections,
        max_header_bytes,
        header_read_timeout,
        idle_timeout,
        stream_idle_timeout,
        idle_park_after,
        request_body_timeout,
        h2_max_send_buffer,
        max_connections_total,
        max_requests_in_flight,
        h2_max_concurrent_streams,
        h2_max_pending_reset_streams,
        retry_buffer_bytes: _, // route table
        trust_forwarded_for,
        upgrades,
    } = new;
    keep(kept, "proxy.max_connections", &old.max_connections, max_connections);
    keep(kept, "proxy.max_header_bytes", &old.max_header_bytes, max_header_bytes);
    keep(
        kept,
        "proxy.header_read_timeout",
        &old.header_read_timeout,
        header_read_timeout,
    );
    keep(kept, "proxy.idle_timeout", &old.idle_timeout, idle_timeout);
    keep(
        kept,
        "proxy.stream_idle_timeout",
        &old.stream_idle_timeout,
        stream_idle_timeout,
    );
    keep(kept, "proxy.idle_park_after", &old.idle_park_after, idle_park_after);
    keep(
        kept,
        "proxy.request_body_timeout",
        &old.request_body_timeout,
        request_body_timeout,
    );
    keep(
        kept,
        "proxy.h2_max_send_buffer",
        &old.h2_max_send_buffer,
        h2_max_send_buffer,
    );
    keep(
        kept,
        "proxy.max_connections_total",
        &old.max_connections_total,
        max_connections_total,
    );
    keep(
        kept,
        "proxy.max_requests_in_flight",
        &old.max_requests_in_flight,
        max_requests_in_flight,
    );
    keep(
        kept,
        "proxy.h2_max_concurrent_streams",
        &old.h2_max_concurrent_streams,
        h2_max_concurrent_streams,
    );
    keep(
        kept,
        "proxy.h2_max_pending_reset_streams",
        &old.h2_max_pending_reset_streams,
        h2_max_pending_reset_streams,
    );
    keep(
        kept,
        "proxy.trust_forwarded_for",
        &old.trust_forwarded_for,
        trust_forwarded_for,
    );
    keep(kept, "proxy.upgrades", &old.upgrades, upgrades);
}

/// The health checker (app address, protocol, check) and the ramp start with the agent.
fn settle_inbound(old: &InboundConfig, new: &mut InboundConfig, kept: &mut Vec<&'static str>) {
    let InboundConfig {
        listen: _, // listeners (refused with a registry: see `refusal`)
        app,
        protocol,
        timeout: _,         // route table
        connect_timeout: _, // route table
        health,
        ramp,
        rate_limit: _, // route table
        adaptive: _,   // route table
        mode: _,       // listeners (retargeted: connections accepted from then on)
        authz: _,      // route table
    } = new;
    keep(kept, "inbound.app", &old.app, app);
    keep(kept, "inbound.protocol", &old.protocol, protocol);
    keep(kept, "inbound.health", &old.health, health);
    keep(kept, "inbound.ramp", &old.ramp, ramp);
}

fn keep<T: PartialEq + Clone>(kept: &mut Vec<&'static str>, key: &'static str, old: &T, new: &mut T) {
    if old != new {
        *new = old.clone();
        kept.push(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;

    const BASE: &str = r#"
        [agent]
        node = "vm-1"
        [registry]
        kind = "etcd"
        address = "http://127.0.0.1:2379"
        [inbound]
        listen = "127.0.0.1:15001"
        app = "127.0.0.1:8080"
        timeout = "5s"
        [[outbound]]
        service = "orders"
        listen = "127.0.0.1:15002"
        endpoints = ["127.0.0.1:9001"]
    "#;

    fn with(extra_edit: impl Fn(&mut Config)) -> (Config, Config) {
        let old = load_str(BASE).unwrap_or_else(|e| panic!("{e}"));
        let mut new = old.clone();
        extra_edit(&mut new);
        (old, new)
    }

    #[test]
    fn start_up_keeps_everything() {
        let (_, new) = with(|c| c.agent.node = Some("vm-2".into()));
        let (settled, kept) = settle(None, new.clone());
        assert_eq!(settled, new);
        assert!(kept.is_empty());
    }

    #[test]
    fn start_up_only_keys_keep_their_running_value_and_are_named() {
        type Edit = fn(&mut Config);
        let cases: &[(&str, Edit)] = &[
            ("agent.node", |c| c.agent.node = Some("vm-2".into())),
            ("agent.drain_grace", |c| {
                c.agent.drain_grace = crate::config::Dur::secs(9)
            }),
            ("proxy.idle_timeout", |c| {
                c.proxy.idle_timeout = crate::config::Dur::secs(9)
            }),
            ("proxy.h2_max_pending_reset_streams", |c| {
                c.proxy.h2_max_pending_reset_streams = 7
            }),
            ("registry", |c| c.registry.address = "http://127.0.0.1:2380".into()),
            ("telemetry", |c| c.telemetry.access_log = "off".into()),
            ("inbound.ramp", |c| {
                if let Some(i) = c.inbound.as_mut() {
                    i.ramp.aggression = 2.0;
                }
            }),
        ];
        for (key, edit) in cases {
            let (old, new) = with(edit);
            assert_ne!(old, new, "{key}: the edit changes nothing");
            let (settled, kept) = settle(Some(&old), new);
            assert_eq!(kept, vec![*key]);
            assert_eq!(settled, old, "{key}: the running value is kept");
        }
    }

    #[test]
    fn reloadable_keys_apply() {
        type Edit = fn(&mut Config);
        let cases: &[Edit] = &[
            |c| c.agent.drain_timeout = crate::config::Dur::secs(9),
            |c| c.outbound[0].timeout = crate::config::Dur::secs(9),
            |c| c.outbound.clear(),
            |c| {
                if let Some(i) = c.inbound.as_mut() {
                    i.timeout = crate::config::Dur::secs(9);
                }
            },
            |c| c.proxy.retry_buffer_bytes = crate::config::ByteSize(1),
        ];
        for edit in cases {
            let (old, new) = with(edit);
            let (settled, kept) = settle(Some(&old), new.clone());
            assert!(kept.is_empty(), "{kept:?}");
            assert_eq!(settled, new);
        }
    }

    #[test]
    fn a_new_registered_port_is_refused_with_a_registry_only() {
        let (old, mut new) = with(|c| {
            if let Some(i) = c.inbound.as_mut() {
                i.listen = "127.0.0.1:15009".parse().unwrap_or_else(|e| panic!("{e}"));
            }
        });
        let why = refusal(&old, &new).unwrap_or_default();
        assert!(why.starts_with("RELOAD_REFUSED: inbound.listen"), "{why}");
        let mut old = old;
        old.registry.kind = RegistryKind::None;
        new.registry.kind = RegistryKind::None;
        assert_eq!(refusal(&old, &new), None);
    }
}
