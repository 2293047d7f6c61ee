//! Power of two choices over peak-EWMA latency weighted by load (Finagle, Linkerd): the cost of
//! an endpoint is its decayed peak latency times (in-flight + 1). Weights act on the draw of
//! the two candidates (see `two_choices`), not on the cost: dividing the cost by the weight too
//! would make a ramping instance at weight 10 look ten times cheaper whenever it is drawn.

use std::sync::Arc;
use std::time::Instant;

use super::random::WeightedRandom;
use super::{two_choices, Endpoint};

/// How much cheaper the second candidate must be to beat the first under uneven weights. Peak
/// EWMA jumps to every latency spike and takes ~10 s to fade: between two identical upstreams
/// on loopback the estimates were seen 5-9x apart for seconds (tests/tests/discovery_etcd.rs),
/// which at 1.5x handed a ramping instance twice its share. An endpoint 10x slower is sick.
const CLEARLY_CHEAPER: f64 = 10.0;

fn cost(e: &Endpoint, now: Instant) -> f64 {
    e.stats.ewma_ns_at(now) * (e.stats.in_flight() as f64 + 1.0)
}

pub fn pick(endpoints: &[Arc<Endpoint>], by_weight: Option<&WeightedRandom>) -> usize {
    if endpoints.len() == 1 {
        return 0;
    }
    let (a, b) = two_choices(endpoints.len(), by_weight);
    let now = Instant::now();
    if by_weight.is_none() {
        return if cost(&endpoints[b], now) < cost(&endpoints[a], now) {
            b
        } else {
            a
        };
    }
    // With uneven weights the draw carries the weights: the second candidate wins only when it
    // is an order of magnitude cheaper, so that endpoints of comparable latency share by weight
    // (a ramping instance gets its ramp's share) instead of by noise in their estimates; and
    // only when it weighs at least as much as the first. Latency moves traffic off a lighter
    // endpoint, never onto it beyond its weight's share: a ramping instance gets few requests,
    // so its estimate sees few spikes and decays towards 0.1 ms while the busy ones keep
    // jumping to theirs (on a loaded host 15x apart was seen), and a cold instance must not be
    // handed extra traffic for looking cheap.
    if endpoints[b].weight >= endpoints[a].weight
        && cost(&endpoints[b], now) * CLEARLY_CHEAPER < cost(&endpoints[a], now)
    {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use crate::balance::test_support::*;
    use crate::balance::{EndpointSet, PickCtx};
    use crate::config::BalancerKind;

    /// A p2c-ewma set of endpoints with these weights, each having measured its latency once.
    fn measured(weights: &[u32], rtts_us: &[u64]) -> EndpointSet {
        let set = EndpointSet::new(BalancerKind::P2cEwma, endpoints(weights));
        let now = Instant::now();
        for (e, &us) in set.endpoints().iter().zip(rtts_us) {
            e.stats.observe_rtt(Duration::from_micros(us), now);
        }
        set
    }

    #[test]
    fn slow_endpoint_gets_least_traffic() {
        fastrand::seed(3);
        let set = measured(&[1, 1, 1], &[200_000, 500, 500]);
        let c = histogram(&set, 3_000, |_| PickCtx::default());
        assert_eq!(c[0], 0, "the slow endpoint loses every comparison: {c:?}");
        // Between the two fast ones, microscopic EWMA differences decide; both get traffic.
        assert!(c[1] > 900 && c[2] > 900, "{c:?}");
    }

    #[test]
    fn equal_latency_endpoints_share_by_weight() {
        fastrand::seed(5);
        let set = measured(&[100, 25], &[1_000, 1_000]);
        let c = histogram(&set, 10_000, |_| PickCtx::default());
        assert!((7_600..8_400).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn a_lighter_endpoint_that_looks_cheaper_gets_no_more_than_its_weight_share() {
        fastrand::seed(6);
        // The busy endpoint's estimate jumped to a spike; the ramping one's sat at 0.1 ms.
        let set = measured(&[100, 25], &[5_000, 100]);
        let c = histogram(&set, 10_000, |_| PickCtx::default());
        // 25 of 125 is 20 %; were the cheaper second candidate to win, 36 %.
        assert!((1_600..2_400).contains(&c[1]), "{c:?}");
    }

    #[test]
    fn a_lighter_endpoint_that_is_clearly_slower_gets_less_than_its_weight_share() {
        fastrand::seed(7);
        let set = measured(&[100, 25], &[500, 50_000]);
        let c = histogram(&set, 10_000, |_| PickCtx::default());
        // Drawn first it loses to the heavier one whenever that is drawn second: 20 % x 20 %.
        assert!((200..700).contains(&c[1]), "{c:?}");
    }

    #[test]
    fn load_counts_against_fast_endpoints() {
        fastrand::seed(4);
        let set = measured(&[1, 1], &[1_000, 3_000]);
        // Five requests in flight make endpoint 0 cost 6 ms > 3 ms.
        let _load: Vec<_> = (0..5).map(|_| set.endpoints()[0].start()).collect();
        let c = histogram(&set, 1_000, |_| PickCtx::default());
        assert_eq!(c, [0, 1_000]);
    }
}
