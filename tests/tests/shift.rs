//! Traffic shift between the vm and k8s environments, end to end: an operator runs the real
//! `vmesh shift` CLI against one agent, the central policy goes through the registry (real etcd,
//! or the Consul double's KV) and a second agent, the caller, applies it to a steady keep-alive
//! load: each step (100/0, 80/20, 0/100) holds its split over 2,000 requests, no request fails
//! across the changes, and the caller is on the new split within 1 s of the CLI returning.
//! Then the refusals: invalid and unknown policies, unknown services, stale compare-and-set,
//! no registry, garbage written straight into the registry, and a missing admin token.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::Value;
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::etcd::Etcd;
use vmesh_tests::k8s::{K8sDouble, SliceEndpoint};
use vmesh_tests::lifecycle::{self, wait_discovered, CliRun};
use vmesh_tests::shift::{
    admin_put, cli, cluster, cluster_endpoints, consul_register_k8s_pod, consul_register_vm, etcd_put_instance,
    shift_cli, shift_get, start_with_kubernetes, tally, Hit, KeepAlive, Split, SteadyLoad,
};
use vmesh_tests::{assert_eventually, eventually, Agent, AgentBuilder, Outbound, TcpEcho, Upstream, DEFAULT_WAIT};

/// At most one request per PACE on the load's one connection (about 1,000 requests a second).
const PACE: Duration = Duration::from_millis(1);
/// Requests per step whose split is judged.
const STEP_REQUESTS: usize = 2_000;
/// How far (percentage points) a step's split may be from its policy.
const SPLIT_TOLERANCE: f64 = 5.0;
/// The longest a caller may take to apply a new central policy, from the CLI returning.
const SWITCH_LIMIT: Duration = Duration::from_secs(1);

/// A policy step: percent to vm and to k8s.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Policy {
    vm: u32,
    k8s: u32,
}

/// What one step measured.
#[derive(Debug)]
struct StepReport {
    policy: Policy,
    split: Split,
    /// From the CLI returning to the first request on the new split (0 when before it).
    after_return: Option<Duration>,
    /// From the CLI starting to the first request on the new split.
    after_start: Option<Duration>,
    cli_took: Duration,
}

const STEPS: [Policy; 3] = [
    Policy { vm: 100, k8s: 0 },
    Policy { vm: 80, k8s: 20 },
    Policy { vm: 0, k8s: 100 },
];

/// When the load went on the new split: the first answer from an environment that had no
/// traffic before, or the end of the last answer from one that has none now; `None` when
/// neither applies (both environments keep some traffic).
fn switch_point(hits: &[Hit], before: Policy, after: Policy, vm: &str, k8s: &str) -> Option<Instant> {
    let gains = |b: u32, a: u32| b == 0 && a > 0;
    let loses = |b: u32, a: u32| b > 0 && a == 0;
    if gains(before.k8s, after.k8s) {
        return hits.iter().find(|h| h.by(k8s)).map(|h| h.start);
    }
    if gains(before.vm, after.vm) {
        return hits.iter().find(|h| h.by(vm)).map(|h| h.start);
    }
    let gone = if loses(before.k8s, after.k8s) {
        k8s
    } else if loses(before.vm, after.vm) {
        vm
    } else {
        return None;
    };
    match hits.iter().rposition(|h| h.by(gone)) {
        // The request after the last answer of the environment that lost its traffic.
        Some(i) => hits.get(i + 1).map(|h| h.start),
        None => hits.first().map(|h| h.start),
    }
}

/// Runs the three steps through `operator`'s CLI while `load` goes through `caller`.
fn run_steps(operator: &Agent, caller: &Agent, load: &SteadyLoad, vm: &str, k8s: &str) -> Vec<StepReport> {
    // No policy yet: one pool for both environments (round-robin: half each).
    let mut before = Policy { vm: 50, k8s: 50 };
    let mut last_index = shift_get(caller, "web")["shift"]["index"].as_u64().unwrap_or(0);
    let mut reports = Vec::new();
    for policy in STEPS {
        let (run, began, returned) = shift_cli(
            operator,
            "web",
            &[&format!("vm={}", policy.vm), &format!("k8s={}", policy.k8s)],
        );
        assert_eq!(
            run.code, 0,
            "vmesh shift web vm={} k8s={}: {run}",
            policy.vm, policy.k8s
        );
        assert!(
            run.stdout.contains(&format!("vm={} k8s={}", policy.vm, policy.k8s)),
            "the CLI prints the policy in force: {run}"
        );
        // The requests of the change itself, then STEP_REQUESTS more after it.
        let around = load.wait_hits_since(began, STEP_REQUESTS, Duration::from_secs(30));
        let switched = switch_point(&around, before, policy, vm, k8s);
        let from = switched.map_or(returned, |s| s.max(returned));
        let window = load.wait_hits_since(from, STEP_REQUESTS, Duration::from_secs(30));
        let split = Split::of(&window, &[vm], &[k8s]);
        let report = StepReport {
            policy,
            split,
            after_return: switched.map(|s| s.saturating_duration_since(returned)),
            after_start: switched.map(|s| s.saturating_duration_since(began)),
            cli_took: returned - began,
        };

        // The caller shows the central policy it applies, with a newer index.
        let shown = shift_get(caller, "web");
        let s = &shown["shift"];
        assert_eq!(s["source"], "central", "{shown}");
        assert_eq!(s["policy"]["vm"], policy.vm, "{shown}");
        assert_eq!(s["policy"]["k8s"], policy.k8s, "{shown}");
        assert_eq!(s["error"], Value::Null, "{shown}");
        let index = s["index"].as_u64().unwrap_or(0);
        assert!(
            index > last_index,
            "the policy's index moves on each write: {last_index} -> {shown}"
        );
        last_index = index;
        for (env, pct) in [("vm", policy.vm), ("k8s", policy.k8s)] {
            let series = format!("vmesh_shift_weight{{service=\"web\",env=\"{env}\"}}");
            assert_eq!(caller.metric(&series), Some(f64::from(pct)), "{series}");
        }

        assert_eq!(
            split.failed,
            0,
            "failed requests in step {policy:?}: {:?}",
            tally(&window)
        );
        assert!(
            (split.vm_percent() - f64::from(policy.vm)).abs() <= SPLIT_TOLERANCE
                && (split.k8s_percent() - f64::from(policy.k8s)).abs() <= SPLIT_TOLERANCE,
            "step {policy:?}: split {split:?} ({:.1}% vm, {:.1}% k8s) is more than {SPLIT_TOLERANCE} points off",
            split.vm_percent(),
            split.k8s_percent()
        );
        if let Some(after) = report.after_return {
            assert!(
                after < SWITCH_LIMIT,
                "step {policy:?}: the caller took {after:?} after the CLI returned to go on the new split"
            );
        }
        reports.push(report);
        before = policy;
    }
    reports
}

fn print_reports(what: &str, reports: &[StepReport], load: &[Hit], connections: u32) {
    for r in reports {
        eprintln!(
            "[{what}] vm={} k8s={}: {:.1}% vm / {:.1}% k8s of {} requests ({} failed); new split {} after the CLI returned, {} after it started (CLI took {:?})",
            r.policy.vm,
            r.policy.k8s,
            r.split.vm_percent(),
            r.split.k8s_percent(),
            r.split.vm + r.split.k8s + r.split.failed + r.split.other,
            r.split.failed,
            r.after_return.map_or("n/a".to_string(), |d| format!("{d:?}")),
            r.after_start.map_or("n/a".to_string(), |d| format!("{d:?}")),
            r.cli_took
        );
    }
    eprintln!(
        "[{what}] load: {} requests on {connections} connection(s): {:?}",
        load.len(),
        tally(load)
    );
}

fn assert_load_clean(load: &[Hit], connections: u32) {
    let failed: Vec<&Hit> = load.iter().filter(|h| h.outcome.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} requests failed across the policy changes: {:?}",
        failed.len(),
        load.len(),
        tally(load)
    );
    assert_eq!(
        connections, 1,
        "the load must run on one keep-alive connection from start to end (the shift applies per request)"
    );
}

/// `GET /shift/web` counts what each environment answered: exactly the load's answers.
fn assert_observed(caller: &Agent, load: &[Hit]) {
    let shown = shift_get(caller, "web");
    let count = |name: &str| load.iter().filter(|h| h.by(name)).count() as u64;
    assert_eq!(shown["observed"]["vm"].as_u64(), Some(count("vm-1")), "{shown}");
    assert_eq!(shown["observed"]["k8s"].as_u64(), Some(count("k8s-1")), "{shown}");
}

/// The endpoint of `addr` in `caller`'s `/clusters` carries `env` and `source`.
fn assert_labels(caller: &Agent, addr: SocketAddr, env: &str, source: &str) {
    let eps = cluster_endpoints(caller, "web");
    let e = eps
        .iter()
        .find(|e| e["address"] == addr.to_string())
        .unwrap_or_else(|| panic!("{addr} not in /clusters: {eps:?}"));
    assert_eq!(e["env"], env, "{e}");
    assert_eq!(e["source"], source, "{e}");
}

#[test]
fn shift_steps_with_vm_from_etcd_and_k8s_from_kubernetes_hold_their_split_under_load() {
    let etcd = Etcd::spawn();
    let k8s = K8sDouble::spawn();
    let vm_up = Upstream::nginx("vm-1").spawn();
    let k8s_up = Upstream::nginx("k8s-1").spawn();
    etcd_put_instance(&etcd, "web", "web-vm-1", vm_up.addr(), "vm");
    k8s.apply_slice(
        "default",
        "web-x7k2p",
        "web",
        &[SliceEndpoint::ready("127.0.0.1")],
        k8s_up.addr().port(),
    );

    // The operator's agent (where `vmesh shift` runs) and the caller under load.
    let operator = lifecycle::etcd(AgentBuilder::new().agent_set("node", "operator"), &etcd)
        .outbound(Outbound::new("web").set("sources", vec!["etcd"]))
        .start();
    let caller_config = lifecycle::etcd(AgentBuilder::new().agent_set("node", "caller"), &etcd).outbound(
        Outbound::new("web")
            .balancer("round-robin")
            .set("sources", vec!["etcd", "kubernetes"]),
    );
    let caller = start_with_kubernetes(caller_config, &["web"], &k8s);
    wait_discovered(&caller, "web", &[vm_up.addr(), k8s_up.addr()]);
    assert_labels(&caller, vm_up.addr(), "vm", "etcd");
    assert_labels(&caller, k8s_up.addr(), "k8s", "kubernetes");

    let load = SteadyLoad::start(caller.outbound_addr("web"), "/", PACE);
    let reports = run_steps(&operator, &caller, &load, "vm-1", "k8s-1");
    let connections = load.connections();
    let hits = load.stop();
    print_reports("etcd+kubernetes", &reports, &hits, connections);
    assert_load_clean(&hits, connections);
    assert_observed(&caller, &hits);
    // The central value is the CLI's last write.
    let stored = etcd.json("/vmesh/shift/web").expect("the policy key exists");
    assert_eq!(stored, serde_json::json!({"vm": 0, "k8s": 100}), "{stored}");
}

#[test]
fn shift_steps_with_consul_vm_instances_and_catalog_synced_pods_hold_their_split_under_load() {
    let consul = ConsulDouble::spawn();
    let vm_up = Upstream::nginx("vm-1").spawn();
    let k8s_up = Upstream::nginx("k8s-1").spawn();
    consul_register_vm(&consul, "web", "web-vm-1", vm_up.addr());
    consul_register_k8s_pod(&consul, "web", "web-7d4b9-x2k4q", k8s_up.addr());

    let operator = lifecycle::consul(AgentBuilder::new().agent_set("node", "operator"), &consul)
        .outbound(Outbound::new("web"))
        .start();
    let caller = lifecycle::consul(AgentBuilder::new().agent_set("node", "caller"), &consul)
        .outbound(
            Outbound::new("web")
                .balancer("round-robin")
                .set("sources", vec!["consul"]),
        )
        .start();
    wait_discovered(&caller, "web", &[vm_up.addr(), k8s_up.addr()]);
    assert_labels(&caller, vm_up.addr(), "vm", "consul");
    assert_labels(&caller, k8s_up.addr(), "k8s", "consul");

    let load = SteadyLoad::start(caller.outbound_addr("web"), "/", PACE);
    let reports = run_steps(&operator, &caller, &load, "vm-1", "k8s-1");
    let connections = load.connections();
    let hits = load.stop();
    print_reports("consul", &reports, &hits, connections);
    assert_load_clean(&hits, connections);
    assert_observed(&caller, &hits);
    let stored = consul.get("/v1/kv/vmesh/shift/web?raw");
    stored.expect_status(200);
    assert_eq!(stored.json(), serde_json::json!({"vm": 0, "k8s": 100}), "{stored}");
}

/// One connection through the TCP outbound: write a line, read it back, close.
fn tcp_round_trip(addr: SocketAddr) -> Result<(), String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"ping\n").map_err(|e| e.to_string())?;
    s.shutdown(std::net::Shutdown::Write).map_err(|e| e.to_string())?;
    let mut got = Vec::new();
    s.read_to_end(&mut got).map_err(|e| e.to_string())?;
    if got == b"ping\n" {
        Ok(())
    } else {
        Err(format!("echoed {got:?}"))
    }
}

#[test]
fn a_tcp_outbound_splits_its_connections_by_the_policy() {
    let etcd = Etcd::spawn();
    let vm_echo = TcpEcho::spawn();
    let k8s_echo = TcpEcho::spawn();
    etcd_put_instance(&etcd, "raw", "raw-vm-1", vm_echo.addr(), "vm");
    etcd_put_instance(&etcd, "raw", "raw-k8s-1", k8s_echo.addr(), "k8s");
    let agent = lifecycle::etcd(AgentBuilder::new(), &etcd)
        .outbound(Outbound::new("raw").protocol("tcp").balancer("round-robin"))
        .start();
    wait_discovered(&agent, "raw", &[vm_echo.addr(), k8s_echo.addr()]);
    let run = cli(&agent, &["shift", "raw", "vm=80", "k8s=20"]);
    assert_eq!(run.code, 0, "{run}");
    let (vm0, k8s0) = (vm_echo.connections(), k8s_echo.connections());
    for i in 0..200 {
        tcp_round_trip(agent.outbound_addr("raw")).unwrap_or_else(|e| panic!("connection {i}: {e}"));
    }
    let (vm, k8s) = (vm_echo.connections() - vm0, k8s_echo.connections() - k8s0);
    eprintln!("[tcp] 200 connections at vm=80 k8s=20: {vm} vm, {k8s} k8s");
    assert!((150..=170).contains(&vm) && vm + k8s == 200, "vm {vm}, k8s {k8s}");
}

#[test]
fn a_policy_towards_an_environment_without_endpoints_sends_everything_to_the_other() {
    let etcd = Etcd::spawn();
    let vm_up = Upstream::nginx("vm-1").spawn();
    etcd_put_instance(&etcd, "web", "web-vm-1", vm_up.addr(), "vm");
    let agent = lifecycle::etcd(AgentBuilder::new(), &etcd)
        .outbound(Outbound::new("web").balancer("round-robin"))
        .start();
    wait_discovered(&agent, "web", &[vm_up.addr()]);
    let run = cli(&agent, &["shift", "web", "vm=20", "k8s=80"]);
    assert_eq!(run.code, 0, "{run}");
    let split = split_of(&agent, 200);
    let fallbacks = agent.metric("vmesh_shift_fallbacks_total{service=\"web\"}");
    eprintln!("[fallback] vm=20 k8s=80 without k8s endpoints: {split:?}, vmesh_shift_fallbacks_total {fallbacks:?}");
    assert_eq!((split.vm, split.failed), (200, 0), "{split:?}");
    assert!(
        fallbacks.is_some_and(|n| (150.0..=170.0).contains(&n)),
        "the 80% meant for k8s counted as fallbacks: {fallbacks:?}"
    );
    let shown = shift_get(&agent, "web");
    let k8s = shown["shift"]["split"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|s| s["env"] == "k8s")
        .cloned();
    eprintln!("[fallback] GET /shift/web split: {}", shown["shift"]["split"]);
    assert!(k8s.is_none_or(|s| s["endpoints"] == 0), "{shown}");
}

// === refusals ===

const TOKEN: &str = "admin-s3cret";

/// An agent on `registry` with the admin token set and outbound "web" as `web` makes it.
fn token_agent(
    registry: impl FnOnce(AgentBuilder) -> AgentBuilder,
    web: impl FnOnce(Outbound) -> Outbound,
) -> (Agent, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let token_file = dir.path().join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n")).expect("write the admin token");
    let agent = registry(AgentBuilder::new().agent_set("admin_token_file", token_file.display().to_string()))
        .outbound(web(Outbound::new("web").balancer("round-robin")))
        .start();
    (agent, dir)
}

fn error_of(r: &vmesh_tests::HttpResponse) -> (u16, String) {
    let v: Value = serde_json::from_slice(&r.body).unwrap_or(Value::Null);
    (r.status, v["error"].as_str().unwrap_or_default().to_string())
}

fn assert_cli_refused(run: &CliRun, code: i32, words: &[&str]) {
    assert_eq!(run.code, code, "{run}");
    for w in words {
        assert!(run.stderr.contains(w), "expected {w:?} in the CLI's error: {run}");
    }
}

/// `n` requests on one connection through `agent`'s outbound "web": the split.
fn split_of(agent: &Agent, n: usize) -> Split {
    let mut client = KeepAlive::new(agent.outbound_addr("web"));
    let hits: Vec<Hit> = (0..n)
        .map(|_| {
            let start = Instant::now();
            let outcome = match client.get("/") {
                Ok(r) if r.status == 200 => r
                    .header("x-upstream-name")
                    .map(str::to_string)
                    .ok_or_else(|| "no x-upstream-name".to_string()),
                Ok(r) => Err(format!("HTTP {}", r.status)),
                Err(e) => Err(e),
            };
            Hit {
                start,
                end: Instant::now(),
                outcome,
            }
        })
        .collect();
    Split::of(&hits, &["vm-1"], &["k8s-1"])
}

#[test]
fn invalid_unknown_stale_and_unauthorized_shifts_are_refused_with_etcd() {
    let etcd = Etcd::spawn();
    let vm_up = Upstream::nginx("vm-1").spawn();
    let k8s_up = Upstream::nginx("k8s-1").spawn();
    etcd_put_instance(&etcd, "web", "web-vm-1", vm_up.addr(), "vm");
    etcd_put_instance(&etcd, "web", "web-k8s-1", k8s_up.addr(), "k8s");
    let (agent, _token_dir) = token_agent(|b| lifecycle::etcd(b, &etcd), |web| web);
    wait_discovered(&agent, "web", &[vm_up.addr(), k8s_up.addr()]);

    // Bad values never reach the registry: the CLI refuses them (exit 2, SHIFT_INVALID).
    let run = cli(&agent, &["shift", "web", "vm=80", "k8s=30"]);
    assert_cli_refused(&run, 2, &["SHIFT_INVALID", "sum to 110"]);
    let run = cli(&agent, &["shift", "web", "vm=50", "ecs=50"]);
    assert_cli_refused(&run, 2, &["SHIFT_INVALID", "ecs"]);
    let run = cli(&agent, &["shift", "web", "vm=eighty"]);
    assert_cli_refused(&run, 2, &["SHIFT_INVALID"]);
    assert_eq!(etcd.value("/vmesh/shift/web"), None, "nothing was written");
    // ... and so does the admin API (400), for a body the CLI would never send.
    for body in [
        r#"{"vm": 80, "k8s": 30}"#,
        r#"{"vm": 50, "ecs": 50}"#,
        "vm=80",
        r#"{"vm": 50.5, "k8s": 49.5}"#,
    ] {
        let r = admin_put(&agent, "/shift/web", body, Some(TOKEN));
        assert_eq!(error_of(&r), (400, "SHIFT_INVALID".into()), "PUT {body}: {}", r.text());
    }

    // An outbound the agent does not have: 404 UNKNOWN_SERVICE (API), exit 2 (CLI).
    let r = admin_put(&agent, "/shift/nope", r#"{"vm": 80, "k8s": 20}"#, Some(TOKEN));
    assert_eq!(error_of(&r), (404, "UNKNOWN_SERVICE".into()), "{}", r.text());
    let run = cli(&agent, &["shift", "nope", "vm=80", "k8s=20"]);
    assert_cli_refused(&run, 2, &["UNKNOWN_SERVICE"]);

    // Without the admin token, or with a wrong one: 401, nothing written.
    let r = admin_put(&agent, "/shift/web", r#"{"vm": 80, "k8s": 20}"#, None);
    assert_eq!(r.status, 401, "{}", r.text());
    let r = admin_put(&agent, "/shift/web", r#"{"vm": 80, "k8s": 20}"#, Some("wrong"));
    assert_eq!(r.status, 401, "{}", r.text());
    assert_eq!(etcd.value("/vmesh/shift/web"), None, "nothing was written");

    // A good write through the CLI (which reads the token from the config's token file).
    let run = cli(&agent, &["shift", "web", "vm=80", "k8s=20"]);
    assert_eq!(run.code, 0, "{run}");
    let first = shift_get(&agent, "web");
    let first_index = first["shift"]["index"].as_u64().unwrap_or(0);
    assert!(first_index > 0, "{first}");
    assert_eq!(first["shift"]["source"], "central", "{first}");
    // A second write moves the index: the first index is now stale.
    let r = admin_put(
        &agent,
        &format!("/shift/web?cas={first_index}"),
        r#"{"vm": 70, "k8s": 30}"#,
        Some(TOKEN),
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let answer: Value = serde_json::from_slice(&r.body).expect("JSON answer");
    assert_eq!(
        answer["shift"]["policy"],
        serde_json::json!({"vm": 70, "k8s": 30}),
        "in force when answered: {answer}"
    );
    let r = admin_put(
        &agent,
        &format!("/shift/web?cas={first_index}"),
        r#"{"vm": 10, "k8s": 90}"#,
        Some(TOKEN),
    );
    assert_eq!(error_of(&r), (409, "SHIFT_CONFLICT".into()), "{}", r.text());
    let r = admin_put(&agent, "/shift/web?cas=x", r#"{"vm": 10, "k8s": 90}"#, Some(TOKEN));
    assert_eq!(error_of(&r), (400, "SHIFT_INVALID".into()), "{}", r.text());
    assert_eq!(
        etcd.json("/vmesh/shift/web"),
        Some(serde_json::json!({"vm": 70, "k8s": 30}))
    );

    // Garbage written straight into etcd: refused, the previous policy stays, the error shows.
    etcd.put("/vmesh/shift/web", "{vm: 80");
    let shown = refused_value_shown(&agent);
    assert_eq!(
        shown["shift"]["policy"],
        serde_json::json!({"vm": 70, "k8s": 30}),
        "{shown}"
    );
    assert_eq!(shown["shift"]["source"], "central", "{shown}");
    let c = cluster(&agent, "web");
    assert!(
        c["shift"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("SHIFT_INVALID")),
        "/clusters shows the error too: {c}"
    );
    // A well-formed but invalid value (sum 110) is refused the same way.
    etcd.put("/vmesh/shift/web", r#"{"vm": 80, "k8s": 30}"#);
    assert_eventually!(
        shift_get(&agent, "web")["shift"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("110")),
        "the sum error in GET /shift/web"
    );
    // Still serving, on the previous split (70/30 over 300 requests, exact per 100).
    let split = split_of(&agent, 300);
    eprintln!("[refusals/etcd] split after the garbage: {split:?}");
    assert_eq!(split.failed, 0, "{split:?}");
    assert!((split.vm_percent() - 70.0).abs() <= SPLIT_TOLERANCE, "{split:?}");
    // A good value clears the error.
    etcd.put("/vmesh/shift/web", r#"{"vm": 100, "k8s": 0}"#);
    assert_eventually!(
        {
            let s = shift_get(&agent, "web");
            s["shift"]["error"].is_null() && s["shift"]["policy"]["vm"] == 100
        },
        "a valid value to replace the policy and clear the error"
    );
    assert_eq!(agent.admin_get("/live").status, 200);
}

#[test]
fn shifts_without_a_registry_and_garbage_in_consul_kv_are_refused() {
    let vm_up = Upstream::nginx("vm-1").spawn();
    let k8s_up = Upstream::nginx("k8s-1").spawn();

    // No registry: nowhere to keep a central policy.
    let (alone, _dir) = token_agent(|b| b, |web| web.endpoint(vm_up.addr()));
    let r = admin_put(&alone, "/shift/web", r#"{"vm": 80, "k8s": 20}"#, Some(TOKEN));
    assert_eq!(error_of(&r), (409, "SHIFT_NO_REGISTRY".into()), "{}", r.text());
    let run = cli(&alone, &["shift", "web", "vm=80", "k8s=20"]);
    assert_cli_refused(&run, 2, &["SHIFT_NO_REGISTRY"]);
    let shown = shift_get(&alone, "web");
    assert_eq!(shown["shift"]["source"], "none", "{shown}");
    assert_eq!(shown["shift"]["policy"], Value::Null, "{shown}");
    // Showing needs no token and no registry.
    let run = cli(&alone, &["shift", "web", "--json"]);
    assert_eq!(run.code, 0, "{run}");
    let doc: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("--json prints JSON ({e}): {run}"));
    assert_eq!(doc["service"], "web", "{doc}");
    drop(alone);

    // Consul: a stale cas, then garbage straight into the KV store.
    let consul = ConsulDouble::spawn();
    consul_register_vm(&consul, "web", "web-vm-1", vm_up.addr());
    consul_register_k8s_pod(&consul, "web", "web-7d4b9-x2k4q", k8s_up.addr());
    let (agent, _dir) = token_agent(|b| lifecycle::consul(b, &consul), |web| web);
    wait_discovered(&agent, "web", &[vm_up.addr(), k8s_up.addr()]);
    let run = cli(&agent, &["shift", "web", "vm=80", "k8s=20"]);
    assert_eq!(run.code, 0, "{run}");
    let index = shift_get(&agent, "web")["shift"]["index"].as_u64().unwrap_or(0);
    assert!(index > 0);
    consul
        .put("/v1/kv/vmesh/shift/web", r#"{"vm": 60, "k8s": 40}"#)
        .expect_status(200);
    assert_eventually!(
        shift_get(&agent, "web")["shift"]["policy"]["vm"] == 60,
        "the agent to follow a value written by someone else"
    );
    let r = admin_put(
        &agent,
        &format!("/shift/web?cas={index}"),
        r#"{"vm": 10, "k8s": 90}"#,
        Some(TOKEN),
    );
    assert_eq!(error_of(&r), (409, "SHIFT_CONFLICT".into()), "{}", r.text());

    consul
        .put("/v1/kv/vmesh/shift/web", "not json at all")
        .expect_status(200);
    let shown = refused_value_shown(&agent);
    assert_eq!(
        shown["shift"]["policy"],
        serde_json::json!({"vm": 60, "k8s": 40}),
        "{shown}"
    );
    let c = cluster(&agent, "web");
    assert!(
        c["shift"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("SHIFT_INVALID")),
        "/clusters shows the error too: {c}"
    );
    let split = split_of(&agent, 300);
    eprintln!("[refusals/consul] split after the garbage: {split:?}");
    assert_eq!(split.failed, 0, "{split:?}");
    assert!((split.vm_percent() - 60.0).abs() <= SPLIT_TOLERANCE, "{split:?}");
    let run = cli(&agent, &["shift", "web"]);
    assert_eq!(run.code, 0, "showing a refused value is not an error: {run}");
    // An admin API nobody listens on: exit 3.
    let nowhere = vmesh_tests::free_addr().to_string();
    let run = cli(&agent, &["shift", "web", "vm=80", "k8s=20", "--admin", &nowhere]);
    assert_cli_refused(&run, 3, &["ADMIN_UNREACHABLE"]);
    assert_eq!(agent.admin_get("/live").status, 200);
}

/// Waits until `GET /shift/web` shows the error of a refused central value; returns the answer.
fn refused_value_shown(agent: &Agent) -> serde_json::Value {
    eventually(DEFAULT_WAIT, "the refused value's error in GET /shift/web", || {
        let v = shift_get(agent, "web");
        if v["shift"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("SHIFT_INVALID"))
        {
            Ok(v)
        } else {
            Err(v.to_string())
        }
    })
}
