//! Weighted random: a binary search over cumulative weights.

#[derive(Debug)]
pub struct WeightedRandom {
    cumulative: Vec<u64>,
}

impl WeightedRandom {
    pub fn new(weights: &[u32]) -> Self {
        let mut sum = 0u64;
        let cumulative = weights
            .iter()
            .map(|&w| {
                sum += u64::from(w.max(1));
                sum
            })
            .collect();
        Self { cumulative }
    }

    pub fn next(&self) -> usize {
        let Some(&total) = self.cumulative.last() else {
            return 0;
        };
        let r = fastrand::u64(..total);
        self.cumulative.partition_point(|&c| c <= r)
    }
}

#[cfg(test)]
mod tests {
    use crate::balance::test_support::*;
    use crate::balance::{EndpointSet, PickCtx};
    use crate::config::BalancerKind;

    #[test]
    fn distribution_follows_weights() {
        fastrand::seed(7);
        let set = EndpointSet::new(BalancerKind::Random, endpoints(&[100, 300]));
        let c = histogram(&set, 40_000, |_| PickCtx::default());
        // Expected 10_000 / 30_000; a 5-sigma band is about +-430.
        assert!((9_500..10_500).contains(&c[0]), "{c:?}");
    }
}
