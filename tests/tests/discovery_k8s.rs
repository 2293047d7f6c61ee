//! Discovery from Kubernetes EndpointSlices, end to end: the real `vmesh` binary lists and
//! watches the Kubernetes API double (`tests/fixtures/k8s_double.py`, with a bearer token) and
//! sends traffic to real nginx upstreams. The endpoints of one slice share its ports, so the
//! upstreams listen on one port at 127.0.0.2, 127.0.0.3, ... (all of 127/8 is loopback).

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmesh_tests::http::{self, Curl};
use vmesh_tests::k8s::{endpoint_slice, K8sDouble, SliceEndpoint, SERVICE_NAME_LABEL};
use vmesh_tests::{eventually, free_port, Agent, Outbound, RunningUpstream, Upstream, DEFAULT_WAIT};

const NS: &str = "default";
const SERVICE: &str = "orders";
const SLICE: &str = "orders-abc12";
const TOKEN: &str = "k8s-e2e-token";

/// The double, the caller agent, and upstreams `ep2`, `ep3`, ... at 127.0.0.N:`port`.
struct Setup {
    k8s: K8sDouble,
    agent: Agent,
    port: u16,
    _upstreams: Vec<RunningUpstream>,
    _dir: tempfile::TempDir,
}

impl Setup {
    /// Starts the double (token required), `hosts` nginx upstreams (127.0.0.2 onwards), applies
    /// the slices `before` wants, then the agent with outbound `orders` (and `extra` services)
    /// discovered from Kubernetes only.
    fn start(hosts: u8, extra: &[&str], before: impl FnOnce(&K8sDouble, u16)) -> Setup {
        let k8s = K8sDouble::builder().token(TOKEN).spawn();
        let port = free_port();
        let upstreams = (2..2 + hosts)
            .map(|n| Upstream::nginx(&format!("ep{n}")).on(addr(n, port)).spawn())
            .collect();
        before(&k8s, port);
        let dir = tempfile::tempdir().expect("tempdir");
        let token_file = dir.path().join("token");
        std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write token file");
        let mut services = vec![SERVICE];
        services.extend_from_slice(extra);
        let agent = start_agent(&k8s, &token_file, &services);
        Setup {
            k8s,
            agent,
            port,
            _upstreams: upstreams,
            _dir: dir,
        }
    }

    /// `127.0.0.N:port`.
    fn addr(&self, n: u8) -> String {
        addr(n, self.port).to_string()
    }

    /// Replaces slice `name` of `orders` with `endpoints` on the shared port.
    fn apply(&self, name: &str, endpoints: &[SliceEndpoint]) {
        self.k8s.apply_slice(NS, name, SERVICE, endpoints, self.port);
    }

    /// The endpoint addresses `/clusters` lists for `orders`, sorted.
    fn addresses(&self) -> Vec<String> {
        let mut v: Vec<String> = cluster_endpoints(&self.agent, SERVICE)
            .iter()
            .map(|e| e["address"].as_str().unwrap_or_default().to_string())
            .collect();
        v.sort();
        v
    }

    /// Waits (at most `within`) until `/clusters` lists exactly `want` (sorted) for `orders`;
    /// returns how long that took.
    fn wait_addresses(&self, want: &[String], within: Duration) -> Duration {
        let begin = Instant::now();
        eventually(within, &format!("/clusters to list {want:?} for {SERVICE}"), || {
            let got = self.addresses();
            if got == want {
                Ok(())
            } else {
                Err(format!("{got:?}"))
            }
        });
        begin.elapsed()
    }

    /// Sends `n` requests through the agent; returns the upstream that answered each.
    fn served_by(&self, n: usize) -> Vec<String> {
        (0..n).map(|_| self.one_request()).collect()
    }

    /// One GET through the outbound port: the `x-upstream-name` of a 200 answer.
    fn one_request(&self) -> String {
        let r =
            http::get(self.agent.outbound_addr(SERVICE), "/").unwrap_or_else(|e| panic!("GET through the agent: {e}"));
        assert_eq!(r.status, 200, "GET through the agent: {}", r.text());
        r.header("x-upstream-name").unwrap_or_default().to_string()
    }

    /// Waits until requests through the agent have reached every upstream in `names`.
    fn wait_traffic_to(&self, names: &[&str]) {
        let mut seen: Vec<String> = Vec::new();
        eventually(DEFAULT_WAIT, &format!("requests to reach {names:?}"), || {
            seen.push(self.one_request());
            match names.iter().find(|n| !seen.iter().any(|s| s == *n)) {
                None => Ok(()),
                Some(missing) => Err(format!("{missing} not reached yet; answers so far: {seen:?}")),
            }
        });
    }

    /// `discovery.stale` of `orders` in `/clusters`.
    fn stale(&self) -> bool {
        cluster(&self.agent, SERVICE)["discovery"]["stale"]
            .as_bool()
            .unwrap_or_else(|| panic!("no discovery.stale in /clusters"))
    }
}

fn addr(n: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, n], port))
}

fn ip(n: u8) -> String {
    format!("127.0.0.{n}")
}

/// Starts a vmesh whose outbound `services` (round-robin) are discovered from Kubernetes only,
/// with `[kubernetes]` pointing at the double (namespace `default`, the token from `token_file`).
///
/// `AgentBuilder` has no setter for the `[kubernetes]` section: the agent starts with the
/// outbounds but no source (start-up needs no `[kubernetes]`), then restarts on the full config
/// (the builder's TOML plus the section). A kubernetes source cannot be added by a reload.
fn start_agent(k8s: &K8sDouble, token_file: &Path, services: &[&str]) -> Agent {
    let outbounds: Vec<Outbound> = services
        .iter()
        .map(|s| Outbound::new(s).balancer("round-robin").timeout("5s"))
        .collect();
    let mut agent = outbounds
        .iter()
        .fold(Agent::builder(), |b, o| b.outbound(o.clone()))
        .start();
    let config = outbounds
        .into_iter()
        .fold(agent.config(), |b, o| b.outbound(o.set("sources", vec!["kubernetes"])));
    agent.write_config(config);
    let mut section = toml::Table::new();
    section.insert("api".into(), k8s.url().into());
    section.insert("namespace".into(), NS.into());
    section.insert("token_file".into(), token_file.display().to_string().into());
    let mut root = toml::Table::new();
    root.insert("kubernetes".into(), toml::Value::Table(section));
    let text = format!(
        "{}\n{}",
        agent.config().to_toml(),
        toml::to_string(&root).expect("a toml::Table always serializes")
    );
    agent.write_raw_config(&text);
    agent.restart();
    agent
}

/// The outbound cluster of `service` in `/clusters`.
fn cluster(agent: &Agent, service: &str) -> Value {
    let all = agent.admin_json(&format!("/clusters?service={service}"));
    all["clusters"]
        .as_array()
        .and_then(|c| c.first())
        .cloned()
        .unwrap_or_else(|| panic!("no cluster for {service} in /clusters: {all}"))
}

fn cluster_endpoints(agent: &Agent, service: &str) -> Vec<Value> {
    cluster(agent, service)["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Forgets the faults armed with [`K8sDouble::fail`].
fn clear_faults(k8s: &K8sDouble) {
    Curl::get(format!("{}/_double/clear_faults", k8s.url()))
        .method("POST")
        .run()
        .expect_status(200);
}

fn count(state: &Value, key: &str) -> u64 {
    state[key]
        .as_u64()
        .unwrap_or_else(|| panic!("no {key} in the double's state: {state}"))
}

#[test]
fn endpoints_of_a_slice_get_traffic_and_an_added_endpoint_is_seen_within_a_second() {
    let s = Setup::start(2, &["payments"], |k8s, port| {
        k8s.apply_slice(NS, SLICE, SERVICE, &[SliceEndpoint::ready(&ip(2)).zone("z1")], port);
        // Another service in the namespace: the same list and watch carry it.
        k8s.apply_slice(NS, "payments-x1", "payments", &[SliceEndpoint::ready(&ip(3))], port);
    });
    s.wait_addresses(&[s.addr(2)], DEFAULT_WAIT);
    let ep = &cluster_endpoints(&s.agent, SERVICE)[0];
    assert_eq!(
        (&ep["env"], &ep["source"], &ep["zone"]),
        (&Value::from("k8s"), &Value::from("kubernetes"), &Value::from("z1")),
        "{ep}"
    );
    let payments: Vec<Value> = cluster_endpoints(&s.agent, "payments")
        .iter()
        .map(|e| e["address"].clone())
        .collect();
    assert_eq!(payments, [Value::from(s.addr(3))]);
    assert!(s.served_by(5).iter().all(|n| n == "ep2"));

    // One list and one watch for both services (the token was accepted: a 401 lists nothing).
    let state = s.k8s.state();
    assert_eq!(
        (count(&state, "lists"), count(&state, "watches_open")),
        (1, 1),
        "{state}"
    );

    // The slice gains an endpoint: seen within a second of the write.
    let begin = Instant::now();
    s.apply(
        SLICE,
        &[
            SliceEndpoint::ready(&ip(2)).zone("z1"),
            SliceEndpoint::ready(&ip(3)).zone("z2"),
        ],
    );
    let written = begin.elapsed();
    let seen = s.wait_addresses(&[s.addr(2), s.addr(3)], Duration::from_secs(1)) + written;
    eprintln!("slice update seen in /clusters {seen:?} after the write began (the write took {written:?})");
    s.wait_traffic_to(&["ep2", "ep3"]);
    // Nothing was listed again for it: the watch carried the change.
    assert_eq!(count(&s.k8s.state(), "lists"), 1);
}

#[test]
fn a_terminating_endpoint_gets_no_new_requests() {
    let s = Setup::start(2, &[], |k8s, port| {
        let eps = [SliceEndpoint::ready(&ip(2)), SliceEndpoint::ready(&ip(3))];
        k8s.apply_slice(NS, SLICE, SERVICE, &eps, port);
    });
    s.wait_addresses(&[s.addr(2), s.addr(3)], DEFAULT_WAIT);
    s.wait_traffic_to(&["ep2", "ep3"]);

    // The pod behind 127.0.0.3 is being deleted: not ready, still serving, terminating.
    s.apply(
        SLICE,
        &[SliceEndpoint::ready(&ip(2)), SliceEndpoint::ready(&ip(3)).terminating()],
    );
    s.wait_addresses(&[s.addr(2)], DEFAULT_WAIT);
    let answers = s.served_by(30);
    assert!(
        answers.iter().all(|n| n == "ep2"),
        "a terminating endpoint got requests: {answers:?}"
    );
    // It still serves (a request straight to it works): it is left out, not dead.
    let direct = http::get(addr(3, s.port), "/").unwrap_or_else(|e| panic!("GET ep3 directly: {e}"));
    assert_eq!((direct.status, direct.header("x-upstream-name")), (200, Some("ep3")));
}

#[test]
fn after_a_compaction_and_a_dropped_watch_the_agent_lists_again_and_follows() {
    let s = Setup::start(2, &[], |k8s, port| {
        k8s.apply_slice(NS, SLICE, SERVICE, &[SliceEndpoint::ready(&ip(2))], port);
    });
    s.wait_addresses(&[s.addr(2)], DEFAULT_WAIT);
    let lists_before = count(&s.k8s.state(), "lists");

    // The API fails every request and the watch is cut: the agent keeps its endpoints, stale.
    s.k8s.fail(100_000, 503);
    assert!(s.k8s.drop_watches() >= 1, "the agent had no watch open");
    eventually(DEFAULT_WAIT, "the agent to report orders stale", || {
        if s.stale() {
            Ok(())
        } else {
            Err("not stale".into())
        }
    });
    assert_eq!(s.addresses(), [s.addr(2)]);
    assert!(s.served_by(3).iter().all(|n| n == "ep2"));

    // Meanwhile the slice changes (through the control API, which faults do not touch) and the
    // history it would resume from is compacted away.
    let changed = endpoint_slice(
        SLICE,
        SERVICE,
        &[SliceEndpoint::ready(&ip(2)), SliceEndpoint::ready(&ip(3))],
        s.port,
    );
    s.k8s.put_raw(NS, &changed.to_string());
    s.k8s.compact();
    clear_faults(&s.k8s);

    // The watch from the old resourceVersion gets 410: the agent lists again.
    s.wait_addresses(&[s.addr(2), s.addr(3)], DEFAULT_WAIT);
    let state = s.k8s.state();
    assert!(count(&state, "lists") > lists_before, "no new list: {state}");
    assert!(
        s.agent.stderr().contains("listing the EndpointSlices again"),
        "the agent did not log the relist"
    );
    eventually(DEFAULT_WAIT, "orders to be fresh again", || {
        if s.stale() {
            Err("still stale".into())
        } else {
            Ok(())
        }
    });

    // And it follows changes again through the new watch.
    s.apply(SLICE, &[SliceEndpoint::ready(&ip(3))]);
    s.wait_addresses(&[s.addr(3)], DEFAULT_WAIT);
    assert!(s.served_by(5).iter().all(|n| n == "ep3"));
}

#[test]
fn a_malformed_slice_is_skipped_and_the_rest_keeps_serving() {
    let mut s = Setup::start(3, &[], |k8s, port| {
        k8s.apply_slice(NS, SLICE, SERVICE, &[SliceEndpoint::ready(&ip(2))], port);
    });
    s.wait_addresses(&[s.addr(2)], DEFAULT_WAIT);
    let label = format!("\"{SERVICE_NAME_LABEL}\": \"{SERVICE}\"");
    let port = s.port;

    // No addressType and no ports: refused as a whole.
    s.k8s.put_raw(
        NS,
        &format!(r#"{{"metadata": {{"name": "orders-bad1", "labels": {{{label}}}}}, "endpoints": [{{"addresses": ["127.0.0.3"]}}]}}"#),
    );
    // Endpoints without addresses, or with one that is not an IP: those endpoints are skipped.
    s.k8s.put_raw(
        NS,
        &format!(
            r#"{{"metadata": {{"name": "orders-bad2", "labels": {{{label}}}}}, "addressType": "IPv4",
                "endpoints": [{{"conditions": {{"ready": true}}}}, {{"addresses": ["not-an-ip"]}}],
                "ports": [{{"port": {port}, "protocol": "TCP"}}]}}"#
        ),
    );
    // A broken new version of the good slice: its previous version stays.
    s.k8s.put_raw(
        NS,
        &format!(r#"{{"metadata": {{"name": "{SLICE}", "labels": {{{label}}}}}, "addressType": "IPv4", "endpoints": "oops"}}"#),
    );
    // A valid slice after them is still followed.
    s.apply("orders-def34", &[SliceEndpoint::ready(&ip(4))]);
    s.wait_addresses(&[s.addr(2), s.addr(4)], DEFAULT_WAIT);
    let answers = s.served_by(10);
    assert!(answers.iter().all(|n| n == "ep2" || n == "ep4"), "{answers:?}");
    assert!(
        answers.iter().any(|n| n == "ep2") && answers.iter().any(|n| n == "ep4"),
        "{answers:?}"
    );

    // Alive, and each refusal is in the log with the slice's name.
    assert!(s.agent.try_exit().is_none(), "the agent exited");
    assert_eq!(s.agent.admin_get("/live").status, 200);
    eventually(DEFAULT_WAIT, "the refusals in the agent's log", || {
        let log = s.agent.stderr();
        let logged = |name: &str, what: &str| log.lines().any(|l| l.contains(name) && l.contains(what));
        let expected = [
            ("orders-bad1", "EndpointSlice refused"),
            (SLICE, "EndpointSlice refused"),
            ("orders-bad2", "not an IP"),
        ];
        match expected.iter().find(|(name, what)| !logged(name, what)) {
            None => Ok(()),
            Some(missing) => Err(format!("no log line with {missing:?}")),
        }
    });
    assert!(!s.stale(), "a malformed slice must not make the service stale");
}
