//! The error-rate circuit breaker end to end: every endpoint of a service answers 500, the
//! breaker opens once `min_requests` results are in, and the service's fallback answers in its
//! place (`x-vmesh-fallback: 1`; without a fallback: 503 `CIRCUIT_OPEN`) while no request
//! reaches the upstream; when the upstream recovers, the half-open probes close the breaker
//! and 200s flow again; a failing probe re-opens it for twice as long.

use std::time::Duration;

use toml::Value;
use vmesh_tests::agent::toml_table;
use vmesh_tests::governance::{breaker_state, governance, metric_sum, tally, Client, Reply};
use vmesh_tests::{eventually, Agent, Outbound, RunningUpstream, Upstream};

/// `[outbound.breaker] min_requests`: results in the window before the breaker may open.
const MIN_REQUESTS: usize = 10;
/// `open_for`: how long the breaker stays open the first time.
const OPEN_FOR: Duration = Duration::from_secs(2);
/// `half_open_probes`.
const PROBES: usize = 2;

const FALLBACK_BODY: &str = r#"{"price":0,"source":"fallback"}"#;

fn breaker_section() -> Value {
    Value::Table(toml_table(&format!(
        r#"
error_rate_percent = 50
min_requests = {MIN_REQUESTS}
window = "30s"
open_for = "{}s"
max_open_for = "8s"
half_open_probes = {PROBES}
"#,
        OPEN_FOR.as_secs()
    )))
}

fn fallback_section() -> Value {
    let mut t = toml_table(
        r#"status = 200
headers = { "content-type" = "application/json" }"#,
    );
    t.insert("body".into(), FALLBACK_BODY.into());
    Value::Table(t)
}

/// Two endpoints, both answering 500 until told otherwise.
fn sick_pair() -> (RunningUpstream, RunningUpstream) {
    (
        Upstream::python("sick-1").fail_status(500).spawn(),
        Upstream::python("sick-2").fail_status(500).spawn(),
    )
}

fn pay(a: &RunningUpstream, b: &RunningUpstream) -> Outbound {
    Outbound::new("pay")
        .balancer("round-robin")
        .timeout("5s")
        .set("breaker", breaker_section())
        .endpoint(a.addr())
        .endpoint(b.addr())
}

fn upstream_requests(a: &RunningUpstream, b: &RunningUpstream) -> u64 {
    a.requests_seen() + b.requests_seen()
}

/// Sends requests one at a time until one is not the upstream's own 500 (bounded); returns the
/// upstream 500s before it, and that reply.
fn until_the_breaker_answers(client: &mut Client) -> (Vec<Reply>, Reply) {
    let mut failures = Vec::new();
    for _ in 0..(MIN_REQUESTS * 5) {
        let r = client.get("/", &[]);
        if r.status() == 500 && r.upstream().is_some() && r.error_code().is_none() {
            failures.push(r);
            continue;
        }
        return (failures, r);
    }
    panic!(
        "the breaker never opened: {} upstream 500s in a row: {:?}",
        failures.len(),
        tally(&failures)
    );
}

fn metric(agent: &Agent, name: &str, labels: &[(&str, &str)]) -> f64 {
    metric_sum(&agent.metrics_text(), name, labels)
}

#[test]
fn breaker_opens_serves_the_fallback_and_a_probe_closes_it() {
    let (a, b) = sick_pair();
    let agent = Agent::builder()
        .outbound(pay(&a, &b).set("fallback", fallback_section()))
        .start();
    let mut client = Client::new(agent.outbound_addr("pay"));
    assert_eq!(breaker_state(&agent, "pay"), "closed");

    // Every endpoint fails: the breaker opens after min_requests results.
    let (failures, first) = until_the_breaker_answers(&mut client);
    assert_eq!(
        failures.len(),
        MIN_REQUESTS,
        "the breaker must open on the {MIN_REQUESTS}th failed result (min_requests), not before or after"
    );
    assert_eq!(upstream_requests(&a, &b), MIN_REQUESTS as u64);
    assert_fallback(&first);
    let g = governance(&agent, "pay");
    assert_eq!(g["breaker"]["status"]["state"], "open", "{g}");
    assert_eq!(g["breaker"]["status"]["opened_total"], 1, "{g}");
    assert_eq!(g["fallback"], true, "{g}");

    // While open: the fallback every time, and the upstream sees nothing.
    for _ in 0..5 {
        assert_fallback(&client.get("/", &[]));
    }
    assert_eq!(
        upstream_requests(&a, &b),
        MIN_REQUESTS as u64,
        "an open breaker let a request through"
    );
    let labels = [("service", "pay")];
    wait_breaker_gauge(&agent, 2.0);
    assert_eq!(
        metric(&agent, "vmesh_fallbacks_total", &labels),
        6.0,
        "one fallback per refused request"
    );
    assert_eq!(
        metric(
            &agent,
            "vmesh_proxy_errors_total",
            &[("service", "pay"), ("code", "CIRCUIT_OPEN")]
        ),
        6.0
    );

    // The upstream recovers; once open_for is over the breaker is half-open and its probes
    // (the next requests) close it.
    a.control(&[("fail_status", 0)]);
    b.control(&[("fail_status", 0)]);
    eventually(
        OPEN_FOR + Duration::from_secs(5),
        "the breaker to turn half-open",
        || match breaker_state(&agent, "pay").as_str() {
            "half_open" => Ok(()),
            s => Err(s.to_string()),
        },
    );
    for i in 0..PROBES {
        let r = client.get("/", &[]);
        assert!(
            r.is_ok() && r.header("x-vmesh-fallback").is_none(),
            "probe {i}: {}",
            r.label()
        );
    }
    assert_eq!(
        breaker_state(&agent, "pay"),
        "closed",
        "{PROBES} good probes must close the breaker"
    );
    let after: Vec<Reply> = (0..20).map(|_| client.get("/", &[])).collect();
    assert!(after.iter().all(Reply::is_ok), "after closing: {:?}", tally(&after));
    wait_breaker_gauge(&agent, 0.0);
    assert_eq!(metric(&agent, "vmesh_fallbacks_total", &labels), 6.0);
}

/// Waits (the gauge is set once a second) until `vmesh_breaker_state` of pay is `value`
/// (0 closed, 1 half-open, 2 open).
fn wait_breaker_gauge(agent: &Agent, value: f64) {
    eventually(
        Duration::from_secs(5),
        &format!("vmesh_breaker_state to be {value}"),
        || {
            let v = metric(agent, "vmesh_breaker_state", &[("service", "pay")]);
            if v == value {
                Ok(())
            } else {
                Err(format!("{v}"))
            }
        },
    );
}

fn assert_fallback(r: &Reply) {
    assert_eq!(r.status(), 200, "the fallback's status: {}", r.label());
    assert_eq!(r.header("x-vmesh-fallback"), Some("1"), "{:?}", r.result);
    assert_eq!(r.header("content-type"), Some("application/json"), "{:?}", r.result);
    assert_eq!(r.text(), FALLBACK_BODY);
    assert_eq!(r.upstream(), None, "a fallback is vmesh's own answer: {:?}", r.result);
}

#[test]
fn without_a_fallback_an_open_breaker_answers_503_circuit_open_and_a_failed_probe_reopens_it() {
    let (a, b) = sick_pair();
    let agent = Agent::builder().outbound(pay(&a, &b)).start();
    let mut client = Client::new(agent.outbound_addr("pay"));

    let (failures, first) = until_the_breaker_answers(&mut client);
    assert_eq!(failures.len(), MIN_REQUESTS);
    assert_circuit_open(&first);
    assert_eq!(governance(&agent, "pay")["fallback"], false);

    // Half-open with the upstream still failing: one probe reaches it, fails, and the breaker
    // opens again for twice as long.
    eventually(
        OPEN_FOR + Duration::from_secs(5),
        "the breaker to turn half-open",
        || match breaker_state(&agent, "pay").as_str() {
            "half_open" => Ok(()),
            s => Err(s.to_string()),
        },
    );
    let probe = client.get("/", &[]);
    assert_eq!(
        (probe.status(), probe.error_code()),
        (500, None),
        "the probe reaches the upstream: {}",
        probe.label()
    );
    assert_eq!(upstream_requests(&a, &b), MIN_REQUESTS as u64 + 1);
    let status = governance(&agent, "pay")["breaker"]["status"].clone();
    assert_eq!(status["state"], "open", "{status}");
    assert_eq!(status["opened_total"], 2, "{status}");
    let remaining = status["open_remaining_ms"].as_u64().unwrap_or(0);
    assert!(
        remaining > OPEN_FOR.as_millis() as u64,
        "a re-opened breaker stays open twice as long (4 s): {remaining} ms left"
    );
    assert_circuit_open(&client.get("/", &[]));
    assert_eq!(upstream_requests(&a, &b), MIN_REQUESTS as u64 + 1);
}

fn assert_circuit_open(r: &Reply) {
    assert_eq!(
        (r.status(), r.error_code()),
        (503, Some("CIRCUIT_OPEN")),
        "an open breaker without a fallback: {:?}",
        r.result
    );
    assert_eq!(r.header("x-vmesh-fallback"), None);
}
