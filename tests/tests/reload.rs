//! SIGHUP reload through the start-up path: keys read at start-up only keep their running value
//! and are named in `reload.pending_restart`, while the rest of the same file applies at once.

use vmesh_tests::{eventually, Agent, Curl, Inbound, Outbound, Upstream, DEFAULT_WAIT};

fn upstream_name(url: &str) -> Option<String> {
    Curl::get(url.to_owned())
        .run()
        .header("x-upstream-name")
        .map(str::to_owned)
}

#[test]
fn sighup_keeps_start_up_only_keys_and_names_them_while_the_rest_applies() {
    let u1 = Upstream::python("u1").spawn();
    let u2 = Upstream::python("u2").spawn();
    let app = Upstream::python("app").spawn();
    // One inbound listen address throughout (a new one would be a new listener).
    let inbound = Inbound::new(app.addr(), "http").health("/", "1s");
    let mut agent = Agent::builder()
        .agent_set("node", "vm-a")
        .proxy_set("idle_timeout", "60s")
        .inbound(inbound.clone())
        .outbound(Outbound::new("orders").endpoint(u1.addr()))
        .start();
    let url = agent.outbound_url("orders", "/");
    assert_eq!(upstream_name(&url).as_deref(), Some("u1"));

    // One file changes a reloadable key (orders' endpoint), two start-up-only keys and the
    // inbound health check (start-up only as well).
    let config = agent.config();
    let orders = config.outbound_for("orders").clear_endpoints().endpoint(u2.addr());
    let changed = config
        .agent_set("node", "vm-b")
        .proxy_set("idle_timeout", "7s")
        .inbound(inbound.clone().health("/other", "2s"))
        .outbound(orders);
    agent.reload(changed.clone());
    eventually(
        DEFAULT_WAIT,
        "orders to move to u2 after SIGHUP",
        || match upstream_name(&url).as_deref() {
            Some("u2") => Ok(()),
            other => Err(format!("answered by {other:?}")),
        },
    );
    let doc = agent.admin_json("/config");
    assert!(doc["last_reload_error"].is_null(), "{doc}");
    let pending: Vec<String> = serde_json::from_value(doc["pending_restart"].clone()).unwrap_or_default();
    assert_eq!(pending, ["agent.node", "proxy.idle_timeout", "inbound.health"], "{doc}");
    // What is shown is what runs: the running values, not the file's.
    assert_eq!(doc["config"]["agent"]["node"], "vm-a", "{doc}");
    assert_eq!(doc["config"]["proxy"]["idle_timeout"], "1m", "{doc}");
    assert_eq!(doc["config"]["inbound"]["health"]["path"], "/", "{doc}");
    let status = agent.admin_json("/status");
    assert_eq!(status["node"], "vm-a", "{status}");
    assert_eq!(status["reload"]["pending_restart"], doc["pending_restart"], "{status}");

    // Putting the start-up-only keys back clears the list; a restart takes the file as it is.
    let reverted = agent
        .config()
        .agent_set("node", "vm-a")
        .proxy_set("idle_timeout", "60s")
        .inbound(inbound);
    let reloads = agent.admin_json("/config")["reloads"].as_u64().unwrap_or(0);
    agent.reload(reverted);
    eventually(DEFAULT_WAIT, "the second reload to apply", || {
        let doc = agent.admin_json("/config");
        match (doc["reloads"].as_u64(), doc["pending_restart"].as_array().map(Vec::len)) {
            (Some(n), Some(0)) if n > reloads => Ok(()),
            _ => Err(doc.to_string()),
        }
    });
    agent.restart_with(changed);
    let doc = agent.admin_json("/config");
    assert_eq!(doc["config"]["agent"]["node"], "vm-b", "{doc}");
    assert_eq!(doc["pending_restart"], serde_json::json!([]), "{doc}");
}
