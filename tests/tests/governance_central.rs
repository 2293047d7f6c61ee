//! Central governance policy from the registry's KV store (`/vmesh/policy/<service>` in real
//! etcd, `vmesh/policy/<service>` in the Consul double): applied hot without a reload, a bad
//! document refused with its problems in `/status` and the previous policy kept, and a deleted
//! key giving the service back to its local config.

use std::net::SocketAddr;

use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::etcd::Etcd;
use vmesh_tests::http::get;
use vmesh_tests::lifecycle;
use vmesh_tests::{assert_eventually, Agent, AgentBuilder, Outbound, Upstream};

/// A policy that aborts every request with 418 (FAULT_INJECTED), so its effect is plain.
const ABORT_ALL: &str =
    r#"{"routes": [{"name": "central-drill", "fault": {"abort_status": 418, "abort_percent": 100}}]}"#;

/// A policy that cannot apply: a split that does not sum to 100 and an unknown fallback code.
const BAD: &str = r#"{"routes": [{"split": [{"version": "v2", "weight": 10}]}], "fallback": {"on": ["NOPE"]}}"#;

fn status_of(addr: SocketAddr) -> u16 {
    get(addr, "/").map(|r| r.status).unwrap_or(0)
}

fn policy_state(agent: &Agent) -> serde_json::Value {
    agent.status_json()["governance"]["policies"]["web"].clone()
}

/// The sequence both registries must pass: hot apply, refusal keeping the previous, delete.
fn check_central_policy(agent: &Agent, put: &dyn Fn(&str), delete: &dyn Fn()) {
    let web = agent.outbound_addr("web");
    assert_eq!(status_of(web), 200, "no policy yet: the local config serves");
    assert_eventually!(
        agent.admin_get("/ready").status == 200,
        "a caller-only agent (no [inbound]) is ready without registering anything"
    );

    put(ABORT_ALL);
    assert_eventually!(status_of(web) == 418, "the central fault rule applies without a reload");
    let state = policy_state(agent);
    assert_eq!(state["in_force"], true, "{state}");
    assert!(state["error"].is_null(), "{state}");
    let clusters = agent.admin_json("/clusters?service=web");
    let routes = &clusters["clusters"][0]["governance"]["routes"];
    assert_eq!(routes[0]["name"], "central-drill", "{clusters}");

    put(BAD);
    assert_eventually!(
        !policy_state(agent)["error"].is_null(),
        "the refused policy's problems reach /status"
    );
    let state = policy_state(agent);
    let error = state["error"].as_str().unwrap_or_default().to_owned();
    for want in ["route[0].split", "fallback.on"] {
        assert!(error.contains(want), "{want} missing from {error}");
    }
    assert_eq!(state["in_force"], true, "{state}");
    for _ in 0..20 {
        assert_eq!(status_of(web), 418, "the previous policy stays in force");
    }

    delete();
    assert_eventually!(
        status_of(web) == 200,
        "a deleted policy gives the service back to the local config"
    );
    assert!(policy_state(agent).is_null(), "{}", agent.status_json()["governance"]);
}

#[test]
fn an_etcd_policy_is_applied_hot_a_bad_one_refused_and_a_deleted_one_forgotten() {
    let etcd = Etcd::spawn();
    let app = Upstream::nginx("a").spawn();
    let agent = lifecycle::etcd(AgentBuilder::new().agent_set("node", "caller"), &etcd)
        .outbound(Outbound::new("web").endpoint(app.addr()))
        .start();
    check_central_policy(&agent, &|doc| etcd.put("/vmesh/policy/web", doc), &|| {
        etcd.ctl(&["del", "/vmesh/policy/web"]);
    });
}

#[test]
fn a_consul_policy_is_applied_hot_a_bad_one_refused_and_a_deleted_one_forgotten() {
    let consul = ConsulDouble::spawn();
    let app = Upstream::nginx("a").spawn();
    let agent = lifecycle::consul(AgentBuilder::new().agent_set("node", "caller"), &consul)
        .outbound(Outbound::new("web").endpoint(app.addr()))
        .start();
    check_central_policy(
        &agent,
        &|doc| {
            let r = consul.put("/v1/kv/vmesh/policy/web", doc);
            assert_eq!(r.status, 200, "{}", r.text());
        },
        &|| {
            let r = consul.request("DELETE", "/v1/kv/vmesh/policy/web").run();
            assert_eq!(r.status, 200, "{}", r.text());
        },
    );
}
