use super::*;

/// The bucket index of a latency of `secs`.
fn bucket(secs: f64) -> usize {
    BUCKETS.iter().position(|&b| secs <= b).unwrap_or(BUCKETS.len())
}

fn calm() -> HostSample {
    HostSample {
        cpu_pressure: Some(0.01),
        cgroup_cpu_pressure: None,
        cpu_steal: Some(0.0),
        cpu_busy: Some(0.2),
        run_queue: Some(1),
        agent_cpu: Some(0.01),
        cpus: 2,
    }
}

/// A minute of seconds (unix 1000..1060), `per_second` requests each; `phase(age)` gives the
/// host and the overhead and upstream latency of the second `age` seconds before the newest.
fn minute(per_second: u64, phase: impl Fn(u64) -> (HostSample, f64, f64)) -> Vec<Second> {
    (0..60u64)
        .map(|i| {
            let age = 59 - i;
            let (host, overhead, upstream) = phase(age);
            let mut s = Second {
                unix_secs: 1000 + i,
                host,
                overhead: [0; TIMING_BUCKETS],
                upstream: [0; TIMING_BUCKETS],
            };
            s.overhead[bucket(overhead)] += per_second;
            s.upstream[bucket(upstream)] += per_second;
            s
        })
        .collect()
}

fn pressed(p: f64) -> HostSample {
    HostSample {
        cpu_pressure: Some(p),
        cpu_busy: Some(1.0),
        run_queue: Some(6),
        ..calm()
    }
}

#[test]
fn verdicts() {
    let cases: Vec<(&str, Vec<Second>, Culprit)> = vec![
        (
            "calm and steady",
            minute(10, |_| (calm(), 50e-6, 1e-3)),
            Culprit::Healthy,
        ),
        (
            "no traffic, nothing known",
            minute(0, |_| (HostSample::default(), 0.0, 0.0)),
            Culprit::Healthy,
        ),
        (
            "upstream slowed in the last 10 s",
            minute(10, |age| (calm(), 50e-6, if age < 10 { 0.4 } else { 1e-3 })),
            Culprit::Upstream,
        ),
        (
            "upstream slow all minute did not rise",
            minute(10, |_| (calm(), 50e-6, 0.4)),
            Culprit::Healthy,
        ),
        (
            "upstream rose 300x on a half-pressed host: more than pressure explains",
            minute(10, |age| (pressed(0.5), 50e-6, if age < 10 { 0.3 } else { 1e-3 })),
            Culprit::Upstream,
        ),
        (
            "upstream rose 3x under heavy pressure: the host",
            minute(10, |age| (pressed(0.9), 2e-3, if age < 10 { 4e-3 } else { 1e-3 })),
            Culprit::Host,
        ),
        (
            "pressure with no traffic at all",
            minute(0, |_| (pressed(0.6), 0.0, 0.0)),
            Culprit::Host,
        ),
        (
            "steal",
            minute(10, |_| {
                (
                    HostSample {
                        cpu_steal: Some(0.2),
                        ..calm()
                    },
                    50e-6,
                    1e-3,
                )
            }),
            Culprit::Host,
        ),
        (
            "run queue of 3 per CPU, PSI unknown",
            minute(10, |_| {
                (
                    HostSample {
                        cpu_pressure: None,
                        run_queue: Some(6),
                        ..calm()
                    },
                    50e-6,
                    1e-3,
                )
            }),
            Culprit::Host,
        ),
        (
            "cgroup pressure only",
            minute(10, |_| {
                (
                    HostSample {
                        cgroup_cpu_pressure: Some(0.5),
                        ..calm()
                    },
                    50e-6,
                    1e-3,
                )
            }),
            Culprit::Host,
        ),
        (
            "pressed by the agent itself",
            minute(10, |_| {
                (
                    HostSample {
                        agent_cpu: Some(0.8),
                        ..pressed(0.5)
                    },
                    3e-3,
                    1e-3,
                )
            }),
            Culprit::Sidecar,
        ),
        (
            "overhead above upstream on a calm host",
            minute(10, |_| (calm(), 5e-3, 1e-3)),
            Culprit::Sidecar,
        ),
        (
            "overhead above upstream but both tiny",
            minute(10, |_| (calm(), 80e-6, 30e-6)),
            Culprit::Healthy,
        ),
        (
            "pressure only in the last 10 s counts",
            minute(10, |age| (if age < 10 { pressed(0.8) } else { calm() }, 50e-6, 1e-3)),
            Culprit::Host,
        ),
    ];
    for (name, seconds, want) in cases {
        let d = diagnose(&seconds);
        assert_eq!(d.verdict, want, "{name}: {}", d.reason);
        assert!(!d.reason.is_empty(), "{name}");
    }
}

#[test]
fn evidence_numbers_come_with_the_verdict() {
    let d = diagnose(&minute(10, |age| (calm(), 50e-6, if age < 10 { 0.4 } else { 1e-3 })));
    assert_eq!(d.seconds, 60);
    assert_eq!(d.overhead.requests, 600);
    assert_eq!(d.recent_upstream.requests, 100);
    // 1 ms sits in the (0.5 ms, 1 ms] bucket, 0.4 s in (0.25 s, 0.5 s].
    let base = d.upstream_baseline_p50.unwrap();
    assert!((0.0005..=0.001).contains(&base), "{base}");
    let now = d.recent_upstream.p50.unwrap();
    assert!((0.25..=0.5).contains(&now), "{now}");
    assert!(d.reason.contains("upstream p50 rose"), "{}", d.reason);
    let v = to_json(&d);
    assert_eq!(v["verdict"], "upstream");
    assert_eq!(v["overhead"]["minute"]["requests"], 600);
    assert!(v["upstream"]["last_10s"]["p50_ms"].as_f64().unwrap() > 250.0, "{v}");
    assert_eq!(v["host"]["cpus"], 2);
    assert_eq!(v["host"]["cpu_pressure"]["mean"], 0.01);
}

#[test]
fn a_short_window_has_no_baseline() {
    // Five seconds of slow answers since the start: nothing to compare with.
    let seconds: Vec<Second> = minute(10, |_| (calm(), 50e-6, 0.4)).split_off(55);
    let d = diagnose(&seconds);
    assert_eq!(d.upstream_baseline_p50, None);
    assert_eq!(d.verdict, Culprit::Healthy, "{}", d.reason);
    assert_eq!(diagnose(&[]).verdict, Culprit::Healthy);
}

#[test]
fn quantiles_interpolate_inside_the_bucket() {
    let mut c = [0; TIMING_BUCKETS];
    assert_eq!(quantile(&c, 0.5), None);
    // Ten requests in (1 ms, 2.5 ms]: the median halfway through it.
    c[bucket(2e-3)] = 10;
    let p50 = quantile(&c, 0.5).unwrap();
    assert!((p50 - 0.00175).abs() < 1e-9, "{p50}");
    assert!((quantile(&c, 1.0).unwrap() - 0.0025).abs() < 1e-12);
    // One request past the last bound: the highest finite bound.
    c[TIMING_BUCKETS - 1] = 1_000;
    assert_eq!(quantile(&c, 0.99), Some(10.0));
    // Fewer than MIN_REQUESTS: no percentiles.
    let mut few = [0; TIMING_BUCKETS];
    few[3] = 4;
    assert_eq!(percentiles(&few).p50, None);
}
