use std::time::{Duration, Instant};

use proptest::prelude::*;

use super::*;
use crate::balance::test_support::endpoints;
use crate::config::BalancerKind;

fn set_of(n: usize) -> EndpointSet {
    EndpointSet::new(BalancerKind::RoundRobin, endpoints(&vec![1; n]))
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

/// Every endpoint of `set` ejected at `now`.
fn ejected(set: &EndpointSet, now: Instant) -> Vec<usize> {
    (0..set.endpoints().len())
        .filter(|&i| set.endpoints()[i].stats.is_ejected_at(now))
        .collect()
}

/// Counts `tries` tries of every endpoint in this interval, `failures[i]` of them failed for
/// endpoint `i` (straight into the counts, so no consecutive mode interferes).
fn traffic(set: &EndpointSet, tries: u32, failures: &[u32]) {
    for (e, &f) in set.endpoints().iter().zip(failures) {
        for k in 0..tries {
            e.stats.count_interval(k >= f);
        }
    }
}

// === config ===

#[test]
fn defaults_are_the_first_versions_behaviour() {
    let c: OutlierConfig = toml::from_str("").unwrap();
    assert_eq!(c, OutlierConfig::default());
    assert_eq!(c.consecutive_gateway_failures, 5);
    assert_eq!(c.consecutive_5xx, 0);
    assert_eq!(c.base_ejection_time.get(), secs(30));
    assert_eq!(c.max_ejection_time.get(), secs(300));
    assert_eq!(c.max_ejection_percent, 50);
    assert_eq!(c.panic_threshold_percent, 0);
    assert_eq!(c.interval.get(), secs(10));
    assert_eq!((c.success_rate, c.failure_percentage), (None, None));
    assert!(OutlierConfig::default().validate("outlier").is_empty());
}

#[test]
fn config_reads_human_units_and_tables_with_their_defaults() {
    let c: OutlierConfig = toml::from_str(
        r#"
        consecutive_5xx = 3
        base_ejection_time = "10s"
        max_ejection_time = "2m"
        panic_threshold_percent = 30
        [success_rate]
        stdev_factor = 1.0
        [failure_percentage]
        "#,
    )
    .unwrap();
    assert_eq!(c.consecutive_5xx, 3);
    assert_eq!(c.base_ejection_time.get(), secs(10));
    assert_eq!(c.max_ejection_time.get(), secs(120));
    assert_eq!(
        c.success_rate,
        Some(SuccessRateConfig {
            min_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.0
        })
    );
    assert_eq!(c.failure_percentage, Some(FailurePercentageConfig::default()));
    assert!(c.validate("outlier").is_empty());
    let back: OutlierConfig = toml::from_str(&toml::to_string(&c).unwrap()).unwrap();
    assert_eq!(back, c);
}

#[test]
fn config_rejects_unknown_keys() {
    for text in [
        "consecutive_failures = 5",
        "[success_rate]\nfactor = 2.0",
        "[failure_percentage]\nmin = 1",
    ] {
        assert!(toml::from_str::<OutlierConfig>(text).is_err(), "{text}");
    }
}

#[test]
fn validation_names_every_bad_key() {
    let c = OutlierConfig {
        base_ejection_time: Dur::secs(0),
        max_ejection_time: Dur::secs(0),
        max_ejection_percent: 101,
        panic_threshold_percent: 200,
        interval: Dur::secs(0),
        success_rate: Some(SuccessRateConfig {
            min_hosts: 0,
            request_volume: 0,
            stdev_factor: f64::NAN,
        }),
        failure_percentage: Some(FailurePercentageConfig {
            threshold: 101,
            min_hosts: 0,
            request_volume: 0,
        }),
        ..OutlierConfig::default()
    };
    let keys: Vec<String> = c.validate("outbound[2].outlier").into_iter().map(|(k, _)| k).collect();
    let want = [
        "base_ejection_time",
        "max_ejection_percent",
        "panic_threshold_percent",
        "interval",
        "success_rate.min_hosts",
        "success_rate.request_volume",
        "success_rate.stdev_factor",
        "failure_percentage.threshold",
        "failure_percentage.min_hosts",
        "failure_percentage.request_volume",
    ];
    let want: Vec<String> = want.iter().map(|k| format!("outbound[2].outlier.{k}")).collect();
    assert_eq!(keys, want);
    let short = OutlierConfig {
        base_ejection_time: Dur::secs(60),
        max_ejection_time: Dur::secs(30),
        ..OutlierConfig::default()
    };
    let problems = short.validate("o");
    assert_eq!(problems.len(), 1);
    assert_eq!(problems[0].0, "o.max_ejection_time");
    assert!(problems[0].1.contains("base_ejection_time"), "{}", problems[0].1);
}

// === classification ===

#[test]
fn outcome_classes() {
    // (outcome, gateway failure, server failure)
    let cases = [
        (Outcome::Response(200), false, false),
        (Outcome::Response(404), false, false),
        (Outcome::Response(429), false, false),
        (Outcome::Response(500), false, true),
        (Outcome::Response(501), false, true),
        (Outcome::Response(502), true, true),
        (Outcome::Response(503), true, true),
        (Outcome::Response(504), true, true),
        (Outcome::Response(599), false, true),
        (Outcome::Connected, false, false),
        (Outcome::ConnectFailed, true, true),
        (Outcome::Reset, true, true),
        (Outcome::Timeout, true, true),
    ];
    for (o, gateway, failure) in cases {
        assert_eq!((o.is_gateway_failure(), o.is_failure()), (gateway, failure), "{o:?}");
    }
    assert_eq!(Outcome::of_try(TryOutcome::PerTryTimeout), Some(Outcome::Timeout));
    assert_eq!(Outcome::of_try(TryOutcome::Timeout), Some(Outcome::Timeout));
    assert_eq!(Outcome::of_try(TryOutcome::Status(503)), Some(Outcome::Response(503)));
    assert_eq!(
        Outcome::of_try(TryOutcome::Refused),
        None,
        "a refused dial is not the endpoint's"
    );
    assert_eq!(Outcome::of_try(TryOutcome::ConnectFailed), Some(Outcome::ConnectFailed));
    assert_eq!(Outcome::of_try(TryOutcome::Reset), Some(Outcome::Reset));
    assert_eq!(Outcome::of_try(TryOutcome::Connected), Some(Outcome::Connected));
}

// === consecutive modes ===

#[test]
fn consecutive_modes_table() {
    use Outcome::*;
    let c5 = |n| OutlierConfig {
        consecutive_5xx: n,
        ..OutlierConfig::default()
    };
    let gw_off = OutlierConfig {
        consecutive_gateway_failures: 0,
        ..OutlierConfig::default()
    };
    /// Name, config, tries, the try that ejects (0-based) and why.
    type Case = (
        &'static str,
        OutlierConfig,
        Vec<Outcome>,
        Option<(usize, EjectionReason)>,
    );
    let cases: Vec<Case> = vec![
        (
            "a hanging endpoint: five timeouts",
            OutlierConfig::default(),
            vec![Timeout; 5],
            Some((4, EjectionReason::ConsecutiveGateway)),
        ),
        (
            "mixed gateway failures",
            OutlierConfig::default(),
            vec![ConnectFailed, Reset, Response(502), Timeout, Response(504)],
            Some((4, EjectionReason::ConsecutiveGateway)),
        ),
        (
            "four timeouts are not enough",
            OutlierConfig::default(),
            vec![Timeout; 4],
            None,
        ),
        (
            "a success resets the count",
            OutlierConfig::default(),
            vec![
                Timeout,
                Timeout,
                Timeout,
                Timeout,
                Response(200),
                Timeout,
                Timeout,
                Timeout,
                Timeout,
            ],
            None,
        ),
        (
            "a 500 resets the gateway count (as Envoy)",
            OutlierConfig::default(),
            vec![
                Response(503),
                Response(503),
                Response(503),
                Response(503),
                Response(500),
                Response(503),
            ],
            None,
        ),
        (
            "500s never count by default",
            OutlierConfig::default(),
            vec![Response(500); 20],
            None,
        ),
        (
            "500s count with consecutive_5xx",
            c5(3),
            vec![Response(500), Response(501), Response(500)],
            Some((2, EjectionReason::Consecutive5xx)),
        ),
        (
            "a 4xx resets consecutive_5xx",
            c5(3),
            vec![
                Response(500),
                Response(500),
                Response(404),
                Response(500),
                Response(500),
            ],
            None,
        ),
        (
            "local failures count towards consecutive_5xx",
            OutlierConfig {
                consecutive_5xx: 3,
                consecutive_gateway_failures: 0,
                ..OutlierConfig::default()
            },
            vec![Response(500), Timeout, ConnectFailed],
            Some((2, EjectionReason::Consecutive5xx)),
        ),
        (
            "gateway wins when both reach their thresholds",
            c5(5),
            vec![Response(503); 5],
            Some((4, EjectionReason::ConsecutiveGateway)),
        ),
        ("gateway mode off", gw_off, vec![Timeout; 20], None),
    ];
    for (name, config, tries, want) in cases {
        let set = set_of(4);
        let o = Outlier::from_config(&config);
        let now = Instant::now();
        let mut got = None;
        for (k, &t) in tries.iter().enumerate() {
            if let Some(e) = o.observe(&set, &set.endpoints()[0], t, now) {
                assert!(got.is_none(), "{name}: ejected twice");
                got = Some((k, e.reason));
                assert_eq!(e.duration, secs(30), "{name}");
            }
        }
        assert_eq!(got, want, "{name}");
        assert_eq!(ejected(&set, now) == [0], want.is_some(), "{name}");
    }
}

#[test]
fn ejection_time_grows_per_ejection_caps_ends_and_is_forgiven() {
    let set = set_of(4);
    let o = Outlier::default();
    let e = &set.endpoints()[0];
    let mut now = Instant::now();
    let mut durations = Vec::new();
    for _ in 0..12 {
        let mut ejection = None;
        for _ in 0..5 {
            ejection = ejection.or(o.observe(&set, e, Outcome::Timeout, now));
        }
        let d = ejection.map(|x| x.duration).unwrap_or_default();
        durations.push(d.as_secs());
        // Still ejected just before the deadline, back in service at it.
        assert!(e.stats.is_ejected_at(now + d - Duration::from_millis(1)));
        assert!(!e.stats.is_ejected_at(now + d));
        now += d;
    }
    assert_eq!(durations, [30, 60, 90, 120, 150, 180, 210, 240, 270, 300, 300, 300]);
    // A success does not forgive (Envoy); each interval back in service forgives one.
    o.observe(&set, e, Outcome::Response(200), now);
    assert_eq!(e.stats.ejection_status(now).multiplier, 10);
    o.sweep(&set, now + secs(5)); // back for less than an interval
    assert_eq!(e.stats.ejection_status(now).multiplier, 10);
    for k in 1..=8 {
        o.sweep(&set, now + secs(10 * k));
    }
    assert_eq!(e.stats.ejection_status(now).multiplier, 2);
    now += secs(80);
    let mut d = None;
    for _ in 0..5 {
        d = d.or(o.observe(&set, e, Outcome::Timeout, now));
    }
    assert_eq!(d.map(|x| x.duration), Some(secs(90)));
}

#[test]
fn status_reports_the_ejection() {
    let set = set_of(2);
    let o = Outlier::default();
    let e = &set.endpoints()[1];
    let now = Instant::now();
    let none = e.stats.ejection_status(now);
    assert_eq!(
        (none.ejected_until, none.times_ejected, none.last_reason),
        (None, 0, None)
    );
    for _ in 0..5 {
        o.observe(&set, e, Outcome::ConnectFailed, now);
    }
    let s = e.stats.ejection_status(now + secs(10));
    assert_eq!(s.remaining, Some(secs(20)));
    assert_eq!(s.ejected_until, Some(now + secs(30)));
    assert_eq!(s.times_ejected, 1);
    assert_eq!(s.multiplier, 1);
    assert_eq!(s.last_reason.map(EjectionReason::as_str), Some("consecutive_gateway"));
    let after = e.stats.ejection_status(now + secs(30));
    assert_eq!(
        (after.ejected_until, after.remaining, after.times_ejected),
        (None, None, 1)
    );
}

// === max ejection percent ===

#[test]
fn max_ejected_table() {
    // (endpoints, percent, may be ejected)
    let cases = [
        (0, 50, 0),
        (1, 50, 0),
        (1, 100, 1),
        (2, 50, 1),
        (3, 50, 1),
        (4, 50, 2),
        (5, 50, 2),
        (10, 50, 5),
        (3, 10, 1),
        (20, 10, 2),
        (4, 0, 0),
        (4, 100, 4),
        (4, 150, 4),
    ];
    for (n, pct, want) in cases {
        assert_eq!(max_ejected(n, pct), want, "{n} endpoints at {pct}%");
    }
}

#[test]
fn at_most_half_of_the_cluster_is_ejected() {
    let set = set_of(4);
    let o = Outlier::default();
    let now = Instant::now();
    for e in set.endpoints() {
        for _ in 0..5 {
            o.observe(&set, e, Outcome::Timeout, now);
        }
    }
    assert_eq!(ejected(&set, now), [0, 1]);
    // Once one returns, the next failure of a waiting endpoint ejects it.
    let later = now + secs(30);
    assert_eq!(ejected(&set, later), Vec::<usize>::new());
    assert!(o.observe(&set, &set.endpoints()[2], Outcome::Timeout, later).is_some());
}

// === statistical modes ===

fn sr_config(min_hosts: u32) -> OutlierConfig {
    OutlierConfig {
        consecutive_gateway_failures: 0,
        success_rate: Some(SuccessRateConfig {
            min_hosts,
            request_volume: 100,
            stdev_factor: 1.9,
        }),
        ..OutlierConfig::default()
    }
}

fn fp_config(threshold: u32) -> OutlierConfig {
    OutlierConfig {
        consecutive_gateway_failures: 0,
        failure_percentage: Some(FailurePercentageConfig {
            threshold,
            min_hosts: 5,
            request_volume: 50,
        }),
        ..OutlierConfig::default()
    }
}

#[test]
fn success_rate_table() {
    /// Name, tries per endpoint, failures per endpoint, min_hosts, ejected worst first.
    type Case = (&'static str, u32, Vec<u32>, u32, Vec<usize>);
    let cases: [Case; 7] = [
        ("a clear outlier among five", 100, vec![0, 1, 0, 2, 50], 5, vec![4]),
        ("all equal: nobody", 100, vec![10, 10, 10, 10, 10], 5, vec![]),
        ("all perfect: nobody", 100, vec![0; 6], 5, vec![]),
        ("too few hosts", 100, vec![0, 0, 0, 50], 5, vec![]),
        ("too little volume", 99, vec![0, 0, 0, 0, 50], 5, vec![]),
        // Rates 1.0 x8, 0.70, 0.68: mean 0.938, stdev 0.124, threshold 0.702.
        (
            "two outliers, worst first",
            200,
            vec![0, 0, 0, 0, 0, 0, 0, 0, 60, 64],
            5,
            vec![9, 8],
        ),
        // Rates 1.0 x8, 0.5, 0.9: threshold 0.656 spares the milder one.
        (
            "a mild host is spared",
            200,
            vec![0, 0, 0, 0, 0, 0, 0, 0, 100, 20],
            5,
            vec![8],
        ),
    ];
    for (name, tries, failures, min_hosts, want) in cases {
        let set = set_of(failures.len());
        let o = Outlier::from_config(&sr_config(min_hosts));
        let now = Instant::now();
        traffic(&set, tries, &failures);
        let got: Vec<usize> = o.sweep(&set, now).into_iter().map(|(i, _)| i).collect();
        assert_eq!(got, want, "{name}");
        assert_eq!(ejected(&set, now).len(), want.len(), "{name}");
    }
}

#[test]
fn success_rate_counts_come_from_observe_and_reset_each_sweep() {
    let set = set_of(5);
    let o = Outlier::from_config(&sr_config(5));
    let now = Instant::now();
    for (i, e) in set.endpoints().iter().enumerate() {
        for k in 0..100 {
            let outcome = if i == 3 && k % 2 == 0 {
                Outcome::Response(500)
            } else {
                Outcome::Response(200)
            };
            assert_eq!(o.observe(&set, e, outcome, now), None);
        }
    }
    let got = o.sweep(&set, now);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, 3);
    assert_eq!(got[0].1.reason, EjectionReason::SuccessRate);
    assert_eq!(got[0].1.duration, secs(30));
    // The next interval starts from zero: no volume, no judgement.
    assert!(o.sweep(&set, now + secs(10)).is_empty());
    assert_eq!(set.endpoints()[0].stats.take_interval(), IntervalCounts::default());
}

#[test]
fn tries_are_not_counted_per_interval_without_a_statistical_mode() {
    let set = set_of(1);
    let o = Outlier::default();
    o.observe(&set, &set.endpoints()[0], Outcome::Response(200), Instant::now());
    assert_eq!(set.endpoints()[0].stats.take_interval(), IntervalCounts::default());
}

#[test]
fn failure_percentage_table() {
    // (name, threshold, failures of 100 tries per endpoint, ejected worst first)
    let cases: [(&str, u32, Vec<u32>, Vec<usize>); 6] = [
        ("above the threshold", 85, vec![0, 0, 90, 0, 0], vec![2]),
        ("at the threshold", 85, vec![0, 85, 0, 0, 0], vec![1]),
        ("below the threshold", 85, vec![84, 84, 84, 84, 84], vec![]),
        ("worst first", 50, vec![60, 0, 100, 0, 0, 0], vec![2, 0]),
        ("too few hosts", 85, vec![100, 0, 0, 0], vec![]),
        ("all fail: the worst half", 85, vec![90, 100, 95, 99, 85], vec![1, 3]),
    ];
    for (name, threshold, failures, want) in cases {
        let set = set_of(failures.len());
        let o = Outlier::from_config(&fp_config(threshold));
        let now = Instant::now();
        traffic(&set, 100, &failures);
        let got: Vec<(usize, EjectionReason)> = o.sweep(&set, now).into_iter().map(|(i, e)| (i, e.reason)).collect();
        let want: Vec<(usize, EjectionReason)> = want
            .into_iter()
            .map(|i| (i, EjectionReason::FailurePercentage))
            .collect();
        assert_eq!(got, want, "{name}");
    }
}

#[test]
fn failure_percentage_ignores_endpoints_below_the_volume() {
    let set = set_of(5);
    let o = Outlier::from_config(&fp_config(85));
    let now = Instant::now();
    traffic(&set, 49, &[49, 0, 0, 0, 0]);
    assert!(o.sweep(&set, now).is_empty());
}

// === properties ===

#[derive(Clone, Debug)]
enum Op {
    Try(usize, Outcome),
    Advance(u64),
    Sweep,
}

fn outcome() -> impl Strategy<Value = Outcome> {
    prop_oneof![
        (200u16..600).prop_map(Outcome::Response),
        Just(Outcome::Response(503)),
        Just(Outcome::ConnectFailed),
        Just(Outcome::Reset),
        Just(Outcome::Timeout),
    ]
}

fn op(n: usize) -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => (0..n, outcome()).prop_map(|(i, o)| Op::Try(i, o)),
        1 => (0u64..120).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
    ]
}

fn config() -> impl Strategy<Value = OutlierConfig> {
    (
        0u32..4,
        0u32..4,
        1u64..60,
        0u64..600,
        0u32..=100,
        prop::option::of((1u32..4, 1u32..5, 0.0f64..3.0)),
        prop::option::of((0u32..=100, 1u32..4, 1u32..5)),
    )
        .prop_map(|(gw, c5, base, extra, pct, sr, fp)| OutlierConfig {
            consecutive_gateway_failures: gw,
            consecutive_5xx: c5,
            base_ejection_time: Dur::secs(base),
            max_ejection_time: Dur::secs(base + extra),
            max_ejection_percent: pct,
            panic_threshold_percent: 0,
            interval: Dur::secs(10),
            success_rate: sr.map(|(min_hosts, request_volume, stdev_factor)| SuccessRateConfig {
                min_hosts,
                request_volume,
                stdev_factor,
            }),
            failure_percentage: fp.map(|(threshold, min_hosts, request_volume)| FailurePercentageConfig {
                threshold,
                min_hosts,
                request_volume,
            }),
        })
}

fn scenario() -> impl Strategy<Value = (usize, OutlierConfig, Vec<Op>)> {
    (1usize..8, config()).prop_flat_map(|(n, c)| (Just(n), Just(c), prop::collection::vec(op(n), 0..200)))
}

proptest! {
    #[test]
    fn never_more_than_max_ejection_percent_and_durations_stay_in_bounds((n, config, ops) in scenario()) {
        prop_assert!(config.validate("o").is_empty());
        let set = set_of(n);
        let o = Outlier::from_config(&config);
        let limit = max_ejected(n, config.max_ejection_percent);
        let (base, max) = (config.base_ejection_time.get(), config.max_ejection_time.get());
        let mut now = Instant::now();
        for op in ops {
            let ejections: Vec<(usize, Ejection)> = match op {
                Op::Try(i, outcome) => {
                    let was_ejected = set.endpoints()[i].stats.is_ejected_at(now);
                    let e = o.observe(&set, &set.endpoints()[i], outcome, now);
                    prop_assert!(!(was_ejected && e.is_some()), "an ejected endpoint was ejected again");
                    if e.is_some() {
                        prop_assert!(outcome.is_failure());
                    }
                    e.map(|e| (i, e)).into_iter().collect()
                }
                Op::Advance(s) => {
                    now += secs(s);
                    Vec::new()
                }
                Op::Sweep => o.sweep(&set, now),
            };
            for (i, e) in ejections {
                prop_assert!(e.duration >= base && e.duration <= max, "{:?} outside {:?}..={:?}", e.duration, base, max);
                prop_assert!(set.endpoints()[i].stats.is_ejected_at(now));
            }
            let count = ejected(&set, now).len();
            prop_assert!(count <= limit, "{} ejected of {} at {}%", count, n, config.max_ejection_percent);
        }
    }

    #[test]
    fn equal_endpoints_are_never_success_rate_outliers(n in 1usize..20, success in 0u64..200, extra in 0u64..200, factor in 0.0f64..3.0) {
        let counts = vec![IntervalCounts { success, total: success + extra }; n];
        let cfg = SuccessRateConfig { min_hosts: 1, request_volume: 1, stdev_factor: factor };
        prop_assert!(success_rate_outliers(&counts, &cfg).is_empty());
    }

    #[test]
    fn max_ejected_keeps_one_in_service(n in 0usize..1000, pct in 0u32..100) {
        let m = max_ejected(n, pct);
        prop_assert!(m <= (n * pct as usize / 100).max(1));
        prop_assert!(n == 0 || m < n);
    }
}
