//! Retries end to end: `per_try_timeout` cuts a hanging try and the retry succeeds on another
//! endpoint within the overall `timeout`; the retry budget caps retries when every try fails.

use std::time::{Duration, Instant};

use toml::Value;
use vmesh_tests::agent::toml_table;
use vmesh_tests::{eventually, h2load, Agent, Curl, Outbound, Upstream, DEFAULT_WAIT};

/// Outlier ejection off (`max_ejection_percent = 0`): every endpoint keeps getting tries, so
/// what the test sees is the retry logic alone.
fn no_ejection() -> Value {
    Value::Table(toml_table("max_ejection_percent = 0"))
}

/// Sum of the samples of `name` whose labels contain every `label="value"` of `labels`.
fn sample_sum(metrics: &str, name: &str, labels: &[&str]) -> f64 {
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter(|l| labels.iter().all(|lab| l.contains(lab)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[test]
fn per_try_timeout_cuts_a_hanging_try_and_the_retry_answers_from_another_endpoint() {
    let hung = Upstream::python("hung").hang().spawn();
    let good = Upstream::python("good").spawn();
    // Round-robin: the hanging endpoint gets (at least) every second first try.
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .balancer("round-robin")
                .timeout("5s")
                .set("per_try_timeout", "300ms")
                .set("outlier", no_ejection())
                .endpoint(hung.addr())
                .endpoint(good.addr()),
        )
        .start();
    let url = agent.outbound_url("orders", "/");
    let mut cut = 0;
    for i in 0..8 {
        let sent = Instant::now();
        let r = Curl::get(url.clone()).run();
        let took = sent.elapsed();
        assert_eq!(
            (r.status, r.header("x-upstream-name")),
            (200, Some("good")),
            "request {i} (after {took:?}): {r}"
        );
        // Without per_try_timeout the try at the hanging endpoint would take the whole 5 s
        // and end in 504; with it, the retry starts after 300 ms.
        assert!(took < Duration::from_millis(2_500), "request {i} took {took:?}");
        if took >= Duration::from_millis(300) {
            cut += 1;
        }
    }
    // Round-robin counts the retry's pick too, so every first try lands on the hanging one.
    let hung_tries = hung.requests_seen();
    assert!(
        hung_tries >= 4,
        "round-robin gives the hanging endpoint at least every second first try, saw {hung_tries} of 8"
    );
    assert_eq!(
        cut, hung_tries,
        "each cut try cost its request at least the 300 ms per-try timeout"
    );

    // The access log and the metrics say the same: those requests took two tries.
    let log = eventually(DEFAULT_WAIT, "an access-log line per request", || {
        let log = agent.access_log();
        if log.len() >= 8 {
            Ok(log)
        } else {
            Err(agent.stdout())
        }
    });
    let retried = log.iter().filter(|l| l["attempts"] == 2).count() as u64;
    assert_eq!(retried, hung_tries, "lines with attempts = 2: {log:?}");
    let metrics = agent.metrics_text();
    let retries = sample_sum(&metrics, "vmesh_retries_total", &["service=\"orders\""]);
    assert_eq!(retries as u64, hung_tries, "vmesh_retries_total: {metrics}");
}

#[test]
fn per_try_timeout_with_every_endpoint_hanging_ends_in_504_at_the_overall_timeout() {
    let hung = Upstream::python("hung").hang().spawn();
    let agent = Agent::builder()
        .outbound(
            Outbound::new("orders")
                .timeout("1500ms")
                .set("per_try_timeout", "400ms")
                .set("outlier", no_ejection())
                .endpoint(hung.addr()),
        )
        .start();
    let sent = Instant::now();
    let r = Curl::get(agent.outbound_url("orders", "/")).run();
    let took = sent.elapsed();
    assert_eq!(
        (r.status, r.header("x-vmesh-error")),
        (504, Some("UPSTREAM_TIMEOUT")),
        "{r}"
    );
    // Default 2 retries: three tries of 400 ms fit in 1.5 s, so the request ends after the
    // third try (~1.2 s), never before its per-try timeouts and never long after the overall one.
    assert!(
        took >= Duration::from_millis(1_100) && took < Duration::from_millis(3_000),
        "504 after {took:?}"
    );
    eventually(DEFAULT_WAIT, "the three tries to reach the upstream", || {
        match hung.requests_seen() {
            3 => Ok(()),
            n => Err(format!("{n} tries")),
        }
    });
}

#[test]
fn the_retry_budget_caps_retries_when_every_try_fails() {
    // Two endpoints answering 503 to everything after 100 ms. Without a budget each request
    // would make 1 + 3 tries (600 retries for 200 requests); the budget lets retries in flight
    // be at most 20% of requests in flight, or 1 whatever the load.
    const REQUESTS: u64 = 200;
    const RATIO: f64 = 0.2;
    const MIN_RETRIES: f64 = 1.0;
    const TRY_MS: f64 = 100.0;
    let a = Upstream::python("fail-a").fail_status(503).delay_ms(100).spawn();
    let b = Upstream::python("fail-b").fail_status(503).delay_ms(100).spawn();
    let retry = toml_table(&format!(
        "attempts = 3\nbudget_ratio = {RATIO}\nbudget_min_concurrency = {MIN_RETRIES}\n"
    ));
    let agent = Agent::builder()
        .telemetry_set("access_log", "off")
        .outbound(
            Outbound::new("orders")
                .timeout("10s")
                .set("retry", Value::Table(retry))
                .set("outlier", no_ejection())
                .endpoint(a.addr())
                .endpoint(b.addr()),
        )
        .start();

    // 20 concurrent clients, 200 requests (HTTP/2 to the outbound port, one stream at a time).
    let started = Instant::now();
    let run = h2load(
        &agent.outbound_url("orders", "/"),
        &["-n", &REQUESTS.to_string(), "-c", "20", "-m", "1"],
    );
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(
        (run.done, run.status_5xx),
        (REQUESTS, REQUESTS),
        "every request answered, with the upstreams' 503: {}",
        run.output
    );

    let metrics = eventually(DEFAULT_WAIT, "the requests in /metrics", || {
        let text = agent.metrics_text();
        let n = sample_sum(
            &text,
            "vmesh_requests_total",
            &["service=\"orders\"", "direction=\"outbound\""],
        );
        if n as u64 == REQUESTS {
            Ok(text)
        } else {
            Err(format!("{n} requests counted"))
        }
    });
    let retries = sample_sum(&metrics, "vmesh_retries_total", &["service=\"orders\""]);
    let refused = sample_sum(
        &metrics,
        "vmesh_retries_budget_exhausted_total",
        &["service=\"orders\""],
    );
    // Every try reached an upstream: the first tries plus the retries.
    let tries = a.requests_seen() + b.requests_seen();
    assert_eq!(
        tries,
        REQUESTS + retries as u64,
        "tries at the upstreams vs. retries counted: {metrics}"
    );

    // The bound: retries in flight r(t) <= max(RATIO * R(t), MIN) with R(t) the requests in
    // flight. Each try lasts at least TRY_MS and a request lasts as long as its tries, so
    // retries <= RATIO * (requests + retries) + MIN * elapsed / TRY_MS.
    let floor = MIN_RETRIES * elapsed * 1000.0 / TRY_MS;
    let bound = (RATIO * REQUESTS as f64 + floor) / (1.0 - RATIO);
    eprintln!(
        "{REQUESTS} requests in {elapsed:.2} s: {retries} retries (bound {bound:.0}), {refused} refused by the budget"
    );
    assert!(
        retries <= bound,
        "{retries} retries for {REQUESTS} requests over {elapsed:.1} s: the budget allows at most {bound:.0}"
    );
    assert!(
        retries >= 1.0 && refused >= 1.0,
        "some retries sent ({retries}) and some refused by the budget ({refused})"
    );
    assert!(
        retries < REQUESTS as f64,
        "{retries} retries: the budget must keep them far below the 600 that 3 attempts would make"
    );
}
