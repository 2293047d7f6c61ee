//! Least request: of two random endpoints, the one with fewer requests in flight (Envoy's P2C
//! variant, which approaches a full scan's quality at O(1) cost).

use std::sync::Arc;

use super::random::WeightedRandom;
use super::{two_choices, Endpoint};

pub fn pick(endpoints: &[Arc<Endpoint>], by_weight: Option<&WeightedRandom>) -> usize {
    if endpoints.len() == 1 {
        return 0;
    }
    let (a, b) = two_choices(endpoints.len(), by_weight);
    // Under uneven weights (both candidates drawn by weight) the second wins only when it weighs
    // at least as much as the first: a ramping instance has fewer requests in flight because it
    // gets fewer, and winning on that would hand it more than its ramp's share.
    if (by_weight.is_none() || endpoints[b].weight >= endpoints[a].weight)
        && endpoints[b].stats.in_flight() < endpoints[a].stats.in_flight()
    {
        b
    } else {
        a
    }
}

#[cfg(test)]
mod tests {
    use crate::balance::test_support::*;
    use crate::balance::{EndpointSet, PickCtx};
    use crate::config::BalancerKind;

    /// How `picks` picks of a least-request set with these weights fall while endpoint `busy`
    /// has five requests in flight.
    fn picks_with_one_busy(weights: &[u32], busy: usize, picks: usize) -> Vec<usize> {
        let set = EndpointSet::new(BalancerKind::LeastRequest, endpoints(weights));
        let _busy: Vec<_> = (0..5).map(|_| set.endpoints()[busy].start()).collect();
        histogram(&set, picks, |_| PickCtx::default())
    }

    #[test]
    fn busy_endpoints_get_fewer_requests() {
        fastrand::seed(11);
        let c = picks_with_one_busy(&[1, 1, 1], 0, 3_000);
        // Endpoint 0 only wins when both choices... never: both others are idle.
        assert_eq!(c[0], 0, "{c:?}");
        assert!(c[1] > 1_200 && c[2] > 1_200, "{c:?}");
    }

    #[test]
    fn idle_endpoints_share_by_weight() {
        fastrand::seed(13);
        let set = EndpointSet::new(BalancerKind::LeastRequest, endpoints(&[100, 25]));
        let c = histogram(&set, 10_000, |_| PickCtx::default());
        // 100:25 is 80% : 20%.
        assert!((7_600..8_400).contains(&c[0]), "{c:?}");
    }

    #[test]
    fn a_lighter_endpoint_with_fewer_in_flight_gets_no_more_than_its_weight_share() {
        fastrand::seed(14);
        let c = picks_with_one_busy(&[100, 25], 0, 10_000);
        // 25 of 125 is 20 %; were the idler second candidate to win, 36 %.
        assert!((1_600..2_400).contains(&c[1]), "{c:?}");
    }

    #[test]
    fn a_busy_lighter_endpoint_gets_less_than_its_weight_share() {
        fastrand::seed(15);
        let c = picks_with_one_busy(&[100, 25], 1, 10_000);
        // Drawn first it loses whenever the heavier one is drawn second: 20 % x 20 %.
        assert!((200..700).contains(&c[1]), "{c:?}");
    }

    #[test]
    fn idle_endpoints_share_evenly() {
        fastrand::seed(12);
        let set = EndpointSet::new(BalancerKind::LeastRequest, endpoints(&[1, 1]));
        let c = histogram(&set, 10_000, |_| PickCtx::default());
        assert!((4_500..5_500).contains(&c[0]), "{c:?}");
    }
}
