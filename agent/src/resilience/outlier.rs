//! Outlier ejection with safe defaults: an endpoint that fails to connect or answers
//! 502/503/504 five times in a row is ejected for 30 s, doubling on repeat (at most 5 min),
//! and never more than half of a cluster is ejected at once.

use std::time::Duration;

use crate::balance::{Endpoint, EndpointSet};

#[derive(Clone, Debug)]
pub struct Outlier {
    pub consecutive_failures: u32,
    pub base_ejection: Duration,
    pub max_ejection: Duration,
    pub max_ejected_percent: usize,
}

impl Default for Outlier {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(30),
            max_ejection: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl Outlier {
    /// Whether a try's result counts as a failure of the endpoint.
    pub fn is_failure(status: Option<u16>) -> bool {
        matches!(status, None | Some(502..=504))
    }

    /// Records a result; returns the ejection time when the endpoint was just ejected.
    pub fn record(&self, set: &EndpointSet, ep: &Endpoint, failed: bool) -> Option<Duration> {
        if !failed {
            ep.stats.success();
            ep.stats.reset_ejections();
            return None;
        }
        if ep.stats.failure() < self.consecutive_failures || ep.stats.is_ejected() {
            return None;
        }
        let n = set.endpoints().len();
        let ejected = set.endpoints().iter().filter(|e| e.stats.is_ejected()).count();
        if (ejected + 1) * 100 > n * self.max_ejected_percent {
            return None;
        }
        Some(ep.stats.eject(self.base_ejection, self.max_ejection))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::endpoints;
    use crate::config::BalancerKind;

    #[test]
    fn five_failures_eject_and_success_resets() {
        let set = EndpointSet::new(BalancerKind::RoundRobin, endpoints(&[1, 1, 1, 1]));
        let o = Outlier::default();
        let e = &set.endpoints()[0];
        for _ in 0..4 {
            assert_eq!(o.record(&set, e, true), None);
        }
        o.record(&set, e, false);
        for _ in 0..4 {
            assert_eq!(o.record(&set, e, true), None);
        }
        assert_eq!(o.record(&set, e, true), Some(Duration::from_secs(30)));
        assert!(e.stats.is_ejected());
    }

    #[test]
    fn at_most_half_of_the_cluster_is_ejected() {
        let set = EndpointSet::new(BalancerKind::RoundRobin, endpoints(&[1, 1, 1, 1]));
        let o = Outlier::default();
        for e in set.endpoints() {
            for _ in 0..5 {
                o.record(&set, e, true);
            }
        }
        let ejected = set.endpoints().iter().filter(|e| e.stats.is_ejected()).count();
        assert_eq!(ejected, 2);
    }

    #[test]
    fn failure_classes() {
        assert!(Outlier::is_failure(None));
        assert!(Outlier::is_failure(Some(503)));
        assert!(!Outlier::is_failure(Some(500)));
        assert!(!Outlier::is_failure(Some(404)));
    }
}
