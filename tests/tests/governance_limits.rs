//! Rate limits and the adaptive concurrency limit, end to end: an outbound rate limit keyed by
//! a caller header refuses one caller (429 `RATE_LIMITED` with `retry-after`) without touching
//! another; an inbound rate limit keeps excess requests off the app; and when the app behind
//! `[inbound]` slows down under load (a saturated app: latency grows several-fold with
//! concurrency), the adaptive limit falls and sheds the excess with 503 `OVERLOADED` instead
//! of queueing it. Loads are bounded by count and time.

use std::time::{Duration, Instant};

use toml::Value;
use vmesh_tests::agent::toml_table;
use vmesh_tests::governance::{adaptive_status, governance, metric_sum, percentile, tally, Client, Load, Reply};
use vmesh_tests::{eventually, Agent, Inbound, Outbound, Upstream};

/// The outbound limit: a bucket of BURST per caller, refilled at RATE_PER_SEC.
const BURST: usize = 5;
const RATE_PER_SEC: f64 = 2.0;

fn assert_rate_limited(r: &Reply) {
    assert_eq!(
        (r.status(), r.error_code()),
        (429, Some("RATE_LIMITED")),
        "a refused request: {:?}",
        r.result
    );
    assert_eq!(r.upstream(), None, "a refused request must not reach the upstream");
    let after: u64 = r
        .header("retry-after")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("429 without a whole-seconds retry-after: {:?}", r.result));
    assert!((1..=5).contains(&after), "retry-after {after} for a 2/s bucket");
}

#[test]
fn outbound_rate_limit_refuses_one_caller_without_touching_another() {
    let up = Upstream::python("api-1").spawn();
    let rate_limit = toml_table(&format!(
        r#"rate = "{RATE_PER_SEC}/s"
burst = {BURST}
by = "x-caller""#
    ));
    let agent = Agent::builder()
        .outbound(
            Outbound::new("api")
                .timeout("5s")
                .endpoint(up.addr())
                .set("rate_limit", Value::Table(rate_limit)),
        )
        .start();
    assert_eq!(governance(&agent, "api")["rate_limit"]["by"], "x-caller");
    let mut client = Client::new(agent.outbound_addr("api"));

    // Caller A sends three buckets' worth at once: the burst passes, the rest is refused.
    let began = Instant::now();
    let a: Vec<Reply> = (0..3 * BURST)
        .map(|_| client.get("/", &[("x-caller", "team-a")]))
        .collect();
    let took = began.elapsed();
    let passed = a.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<&Reply> = a.iter().filter(|r| !r.is_ok()).collect();
    eprintln!("[rate] caller A in {took:?}: {:?}", tally(&a));
    // The burst, plus what the bucket refilled while the requests were sent.
    let refilled = (took.as_secs_f64() * RATE_PER_SEC).ceil() as usize;
    assert!(
        passed >= BURST && passed <= BURST + refilled,
        "caller A: {passed} passed in {took:?} (burst {BURST}, {RATE_PER_SEC}/s)"
    );
    assert!(!refused.is_empty(), "caller A was never refused: {:?}", tally(&a));
    refused.iter().for_each(|r| assert_rate_limited(r));

    // Caller B has its own bucket: unaffected by A.
    let b: Vec<Reply> = (0..BURST).map(|_| client.get("/", &[("x-caller", "team-b")])).collect();
    assert!(
        b.iter().all(Reply::is_ok),
        "caller B must be unaffected by caller A: {:?}",
        tally(&b)
    );

    assert_eq!(
        up.requests_seen() as usize,
        passed + BURST,
        "refused requests reached the upstream"
    );
    let limited = metric_sum(
        &agent.metrics_text(),
        "vmesh_proxy_errors_total",
        &[("service", "api"), ("code", "RATE_LIMITED")],
    );
    assert_eq!(limited as usize, refused.len());

    // Caller A gets through again once its bucket refills (as retry-after said).
    eventually(Duration::from_secs(5), "caller A to be admitted again", || {
        let r = client.get("/", &[("x-caller", "team-a")]);
        if r.is_ok() {
            Ok(())
        } else {
            Err(r.label())
        }
    });
}

#[test]
fn inbound_rate_limit_keeps_the_excess_off_the_app() {
    let app = Upstream::python("app").spawn();
    let rate_limit = toml_table("rate = \"1/s\"\nburst = 3");
    let agent = Agent::builder()
        .inbound(Inbound::new(app.addr(), "http").set("rate_limit", Value::Table(rate_limit)))
        .start();
    let mut client = Client::new(agent.inbound_addr());
    let began = Instant::now();
    let replies: Vec<Reply> = (0..10).map(|_| client.get("/", &[])).collect();
    let took = began.elapsed();
    let passed = replies.iter().filter(|r| r.is_ok()).count();
    eprintln!("[inbound rate] {took:?}: {:?}", tally(&replies));
    let refilled = took.as_secs_f64().ceil() as usize;
    assert!(
        passed >= 3 && passed <= 3 + refilled,
        "{passed} passed: {:?}",
        tally(&replies)
    );
    for r in replies.iter().filter(|r| !r.is_ok()) {
        assert_eq!(
            (r.status(), r.error_code()),
            (429, Some("RATE_LIMITED")),
            "{:?}",
            r.result
        );
        assert!(r.header("retry-after").is_some(), "{:?}", r.result);
    }
    assert_eq!(app.requests_seen() as usize, passed);
}

/// The app serves 4 requests at once, 50 ms each: alone a request takes ~50 ms, with 24 at
/// once ~300 ms (the latency of a saturated app grows with load, here six-fold). 50 ms, not
/// less, so that a busy test machine's scheduling noise stays small next to it.
const APP_CAPACITY: u32 = 4;
const APP_DELAY_MS: u32 = 50;
/// Clients of the load, each one request at a time.
const CLIENTS: usize = 24;

fn adaptive_section() -> Value {
    // CPU shedding is off (threshold 0) so that only the latency gradient moves the limit on
    // a busy test machine; the min RTT is measured once (min_rtt_interval outlasts the test);
    // the median RTT (percentile 50) shrugs off the odd request a loaded machine delays.
    Value::Table(toml_table(
        r#"
min_limit = 2
max_limit = 64
initial_limit = 32
sample_interval = "100ms"
percentile = 50
min_rtt_interval = "120s"
min_rtt_requests = 20
jitter_percent = 0
buffer_percent = 25
cpu_threshold_percent = 0
capacity_window = "2s"
"#,
    ))
}

fn limit_metric(agent: &Agent) -> f64 {
    metric_sum(
        &agent.metrics_text(),
        "vmesh_adaptive_concurrency_limit",
        &[("direction", "inbound")],
    )
}

#[test]
fn adaptive_limit_falls_when_the_app_slows_under_load_and_sheds_instead_of_queueing() {
    let app = Upstream::python("app")
        .delay_ms(APP_DELAY_MS)
        .capacity(APP_CAPACITY)
        .spawn();
    let agent = Agent::builder()
        .inbound(Inbound::new(app.addr(), "http").set("adaptive", adaptive_section()))
        .start();
    let inbound = agent.inbound_addr();

    // Warm-up, one request at a time: the first minimum RTT is measured, then the limit
    // follows the flat latency up.
    let mut client = Client::new(inbound);
    let mut warm = Vec::new();
    eventually(
        Duration::from_secs(30),
        "the adaptive limiter to measure its min RTT",
        || {
            warm.push(client.get("/", &[]));
            let s = adaptive_status(&agent);
            if s["min_rtt_ms"].is_number() && s["measuring_min_rtt"] == false {
                Ok(())
            } else {
                Err(s.to_string())
            }
        },
    );
    warm.extend((0..40).map(|_| client.get("/", &[])));
    assert!(warm.iter().all(Reply::is_ok), "warm-up: {:?}", tally(&warm));
    let before = adaptive_status(&agent);
    let limit_before = before["limit"].as_u64().expect("limit");
    eventually(
        Duration::from_secs(5),
        "the limit gauge to show the warm limit",
        || match limit_metric(&agent) {
            v if v == limit_before as f64 => Ok(()),
            v => Err(format!("gauge {v}, /clusters {limit_before}")),
        },
    );
    let warm_lat: Vec<Duration> = warm.iter().map(|r| r.latency).collect();
    eprintln!(
        "[adaptive] warm: limit {limit_before}, min RTT {} ms, p50 {:?}, p99 {:?}",
        before["min_rtt_ms"],
        percentile(&warm_lat, 50.0),
        percentile(&warm_lat, 99.0)
    );

    // The load: more clients than the app serves at once, for 5 s (every client runs to the
    // time bound; the count bound only caps a runaway). A shed client backs off 20 ms (a
    // client honouring a 503) instead of spinning.
    let load = Load::new(inbound, "/")
        .threads(CLIENTS)
        .requests_per_thread(1_000)
        .max_time(Duration::from_secs(5))
        .backoff(Duration::from_millis(20))
        .spawn();
    // The limit while the load runs (after it does, latency is flat again and the limit
    // climbs back, as it should): /clusters every 100 ms, the gauge (set once a second) too.
    let load_start = Instant::now();
    let mut under_load: Vec<u64> = Vec::new();
    let mut gauge_lowest = f64::MAX;
    let mut series = Vec::new();
    while !load.finished() {
        let l = adaptive_status(&agent)["limit"].as_u64().unwrap_or(limit_before);
        series.push(l);
        // The first second is the fall itself; the rest is the limit the app's latency holds.
        if load_start.elapsed() >= Duration::from_secs(1) && !load.finished() {
            under_load.push(l);
            gauge_lowest = gauge_lowest.min(limit_metric(&agent));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let replies = load.wait();
    let after = adaptive_status(&agent);
    under_load.sort_unstable();
    let limit_loaded = under_load.get(under_load.len() / 2).copied().unwrap_or(limit_before);
    eprintln!("[adaptive] limit every 100 ms under load: {series:?}");

    let admitted: Vec<&Reply> = replies.iter().filter(|r| r.is_ok()).collect();
    let shed: Vec<&Reply> = replies
        .iter()
        .filter(|r| r.status() == 503 && r.error_code() == Some("OVERLOADED"))
        .collect();
    let lat = |rs: &[&Reply]| rs.iter().map(|r| r.latency).collect::<Vec<_>>();
    // Once the limit has fallen (the first second admitted everyone, at full queueing latency).
    let settled: Vec<&Reply> = admitted
        .iter()
        .copied()
        .filter(|r| r.start >= load_start + Duration::from_secs(1))
        .collect();
    eprintln!(
        "[adaptive] load of {CLIENTS} clients: {:?}; limit {limit_before} before, median {limit_loaded} under load \
         (gauge lowest {gauge_lowest}); admitted p50 {:?} p99 {:?}, after the first second p50 {:?} p99 {:?}; \
         shed p50 {:?}; status after {after}",
        tally(&replies),
        percentile(&lat(&admitted), 50.0),
        percentile(&lat(&admitted), 99.0),
        percentile(&lat(&settled), 50.0),
        percentile(&lat(&settled), 99.0),
        percentile(&lat(&shed), 50.0),
    );
    assert_eq!(
        admitted.len() + shed.len(),
        replies.len(),
        "every request is either served or shed with 503 OVERLOADED: {:?}",
        tally(&replies)
    );
    assert!(!shed.is_empty(), "nothing was shed: {:?}", tally(&replies));
    assert!(!admitted.is_empty(), "nothing was admitted: {:?}", tally(&replies));
    assert!(
        under_load.len() >= 5,
        "too few limit samples under load ({}): the load ended early? {:?}",
        under_load.len(),
        tally(&replies)
    );
    assert!(
        limit_loaded < limit_before,
        "under load the limit must fall below its warm value {limit_before}: median {limit_loaded}, \
         series {series:?}"
    );
    assert!(
        gauge_lowest < limit_before as f64,
        "vmesh_adaptive_concurrency_limit never fell under load: lowest {gauge_lowest}, before {limit_before}"
    );
    assert_eq!(after["shed_total"].as_u64(), Some(shed.len() as u64), "{after}");
}
