//! Outlier ejection with the governance settings: among healthy endpoints, one refusing (a
//! closed port), one hanging (accepts, never answers; its tries end at `per_try_timeout`) and
//! one failing every second request with 500 are each ejected by their own detector within its
//! threshold (`/clusters` healthy = false, `vmesh_outlier_ejections_total` by reason, the
//! agent's "outlier ejected" log line); with retries on, clients then see under 1% errors; and
//! every ejected endpoint is back (healthy) once its ejection time is over.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use toml::Value;
use vmesh_tests::agent::toml_table;
use vmesh_tests::governance::{endpoint_health, metric_sum, tally, Client, Load};
use vmesh_tests::{eventually, free_addr, Agent, Outbound, RunningUpstream, Upstream};

/// `[outbound.outlier] consecutive_gateway_failures`: refused connections and per-try timeouts.
const GATEWAY_FAILURES: u64 = 3;
/// `failure_percentage.request_volume`: tries in one interval before an endpoint is judged.
const REQUEST_VOLUME: u64 = 10;
/// `base_ejection_time`: long enough that the error-rate load below runs inside it.
const BASE_EJECTION: Duration = Duration::from_secs(10);
/// `max_ejection_time`: an endpoint ejected twice is out for at most this long.
const MAX_EJECTION: Duration = Duration::from_secs(20);
/// How late the admin API may show a state change we poll for (polls, a loaded machine).
const POLL_SLACK: Duration = Duration::from_secs(1);

const EJECTIONS: &str = "vmesh_outlier_ejections_total";

fn outlier_section() -> Value {
    Value::Table(toml_table(&format!(
        r#"
consecutive_gateway_failures = {GATEWAY_FAILURES}
consecutive_5xx = 0
base_ejection_time = "{}s"
max_ejection_time = "{}s"
max_ejection_percent = 50
interval = "1s"
failure_percentage = {{ threshold = 30, min_hosts = 3, request_volume = {REQUEST_VOLUME} }}
"#,
        BASE_EJECTION.as_secs(),
        MAX_EJECTION.as_secs()
    )))
}

fn retry_on() -> Value {
    Value::Table(toml_table("attempts = 2\non_503 = true\non_reset = true"))
}

/// The agent's "outlier ejected" log lines for `addr` (the detector is in `reason=`).
fn ejection_log(agent: &Agent, addr: SocketAddr) -> Vec<String> {
    let needle = format!("endpoint={addr}");
    agent
        .stderr()
        .lines()
        .filter(|l| l.contains("outlier ejected") && l.contains(&needle))
        .map(str::to_string)
        .collect()
}

fn ejections(agent: &Agent, reason: &str) -> f64 {
    metric_sum(
        &agent.metrics_text(),
        EJECTIONS,
        &[("service", "web"), ("reason", reason)],
    )
}

#[test]
fn refusing_hanging_and_half_failing_endpoints_are_ejected_then_return() {
    let good: Vec<RunningUpstream> = (1..=3).map(|i| Upstream::nginx(&format!("good-{i}")).spawn()).collect();
    let refusing = free_addr(); // nothing listens: every connection is refused
    let hanging = Upstream::python("hanging").hang().spawn();
    let flaky = Upstream::python("flaky").fail_percent(50).spawn();
    let bad = [
        ("refusing", refusing, "consecutive_gateway"),
        ("hanging", hanging.addr(), "consecutive_gateway"),
        ("flaky", flaky.addr(), "failure_percentage"),
    ];
    let web = Outbound::new("web")
        .balancer("round-robin")
        .timeout("5s")
        .set("per_try_timeout", "300ms")
        .set("retry", retry_on())
        .set("outlier", outlier_section())
        .endpoints(good.iter().map(RunningUpstream::addr))
        .endpoint(refusing)
        .endpoint(hanging.addr())
        .endpoint(flaky.addr());
    let agent = Agent::builder().outbound(web).start();
    let url_addr = agent.outbound_addr("web");

    // Phase 1: one client, one request at a time, until all three are ejected. Sequential, so
    // the hanging endpoint's request count at its ejection is exactly the threshold.
    let mut client = Client::new(url_addr);
    let mut ejected_at: BTreeMap<&str, Instant> = BTreeMap::new();
    let mut seen_at_ejection: BTreeMap<&str, u64> = BTreeMap::new();
    let mut phase1 = Vec::new();
    let began = Instant::now();
    while ejected_at.len() < bad.len() {
        assert!(
            began.elapsed() < Duration::from_secs(40) && phase1.len() < 3_000,
            "not every bad endpoint was ejected after {} requests in {:?}: ejected {ejected_at:?}, \
             health {:?}, replies {:?}",
            phase1.len(),
            began.elapsed(),
            endpoint_health(&agent, "web"),
            tally(&phase1)
        );
        phase1.push(client.get("/", &[]));
        let health = endpoint_health(&agent, "web");
        for (name, addr, _) in bad {
            if health.get(&addr.to_string()) == Some(&false) && !ejected_at.contains_key(name) {
                ejected_at.insert(name, Instant::now());
                match name {
                    "hanging" => seen_at_ejection.insert(name, hanging.requests_seen()),
                    "flaky" => seen_at_ejection.insert(name, flaky.requests_seen()),
                    _ => None,
                };
            }
        }
    }
    eprintln!(
        "[phase 1] all three ejected after {} requests in {:?}: {:?}; upstream counts at ejection {seen_at_ejection:?}",
        phase1.len(),
        began.elapsed(),
        tally(&phase1)
    );

    // Each by its own detector, within its threshold.
    let health = endpoint_health(&agent, "web");
    for g in &good {
        assert_eq!(
            health.get(&g.addr().to_string()),
            Some(&true),
            "{} must stay in: {health:?}",
            g.name()
        );
    }
    assert_eq!(
        seen_at_ejection["hanging"], GATEWAY_FAILURES,
        "the hanging endpoint must be ejected by its {GATEWAY_FAILURES}th timed-out try"
    );
    assert!(
        seen_at_ejection["flaky"] >= REQUEST_VOLUME,
        "failure_percentage judged the flaky endpoint on {} tries, below request_volume {REQUEST_VOLUME}",
        seen_at_ejection["flaky"]
    );
    assert_eq!(ejections(&agent, "consecutive_gateway"), 2.0, "refusing + hanging");
    assert_eq!(ejections(&agent, "failure_percentage"), 1.0, "flaky");
    assert_eq!(ejections(&agent, "consecutive_5xx"), 0.0, "consecutive_5xx is off");
    for (name, addr, reason) in bad {
        let lines = ejection_log(&agent, addr);
        assert!(
            lines
                .iter()
                .any(|l| l.contains(&format!("reason={reason}")) || l.contains(&format!("reason=\"{reason}\""))),
            "{name} ({addr}) must be logged as ejected for {reason}: {lines:?}"
        );
    }

    // Phase 2: 300 requests from three clients while the three are out: under 1% errors. The
    // main thread watches the ejected upstreams meanwhile: while one is still ejected (its
    // request count read before /clusters shows it unhealthy), its count must not move.
    let before = [
        ("hanging", &hanging, hanging.requests_seen()),
        ("flaky", &flaky, flaky.requests_seen()),
    ];
    let load_start = Instant::now();
    let load = Load::new(url_addr, "/").threads(3).requests_per_thread(100).spawn();
    let mut watched: Vec<_> = before.to_vec();
    while !load.finished() {
        let counts: Vec<u64> = watched.iter().map(|(_, up, _)| up.requests_seen()).collect();
        let health = endpoint_health(&agent, "web");
        let mut still = Vec::new();
        for ((name, up, was), now) in watched.into_iter().zip(counts) {
            if health.get(&up.addr().to_string()) != Some(&false) {
                continue; // back in service: no longer watched
            }
            assert_eq!(now, was, "the ejected {name} endpoint got traffic during its ejection");
            still.push((name, up, was));
        }
        watched = still;
        std::thread::sleep(Duration::from_millis(20));
    }
    let replies = load.wait();
    let load_time = load_start.elapsed();
    let errors = replies.iter().filter(|r| !r.is_ok()).count();
    eprintln!(
        "[phase 2] {} requests in {load_time:?}: {:?}; still watched at the end: {:?}",
        replies.len(),
        tally(&replies),
        watched.iter().map(|(n, _, _)| *n).collect::<Vec<_>>()
    );
    assert_eq!(replies.len(), 300);
    assert!(
        errors * 100 < replies.len(),
        "{errors} of {} requests failed after the ejections: {:?}",
        replies.len(),
        tally(&replies)
    );

    // Phase 3: no traffic; each comes back once its ejection time is over (a second ejection,
    // had the load outlasted the first, lasts at most max_ejection_time).
    let mut back_at: BTreeMap<&str, Instant> = BTreeMap::new();
    eventually(
        MAX_EJECTION + Duration::from_secs(5),
        "every ejected endpoint to be healthy again",
        || {
            let health = endpoint_health(&agent, "web");
            for (name, addr, _) in bad {
                if health.get(&addr.to_string()) == Some(&true) {
                    back_at.entry(name).or_insert_with(Instant::now);
                }
            }
            if back_at.len() == bad.len() {
                Ok(())
            } else {
                Err(format!("{health:?}"))
            }
        },
    );
    for (name, _, _) in bad {
        let out_for = back_at[name] - ejected_at[name];
        eprintln!("[phase 3] {name} back after {out_for:?}");
        assert!(
            out_for + POLL_SLACK >= BASE_EJECTION,
            "{name} was back after {out_for:?}, before base_ejection_time {BASE_EJECTION:?}"
        );
    }
    assert!(endpoint_health(&agent, "web").values().all(|h| *h));
}
