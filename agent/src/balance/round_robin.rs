//! Round-robin: each endpoint in turn, ignoring weights.

use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug, Default)]
pub struct RoundRobin {
    next: AtomicUsize,
}

impl RoundRobin {
    pub fn next(&self, n: usize) -> usize {
        self.next.fetch_add(1, Ordering::Relaxed) % n
    }
}

#[cfg(test)]
mod tests {
    use crate::balance::test_support::*;
    use crate::balance::{EndpointSet, PickCtx};
    use crate::config::BalancerKind;

    #[test]
    fn distribution_is_exactly_even() {
        let set = EndpointSet::new(BalancerKind::RoundRobin, endpoints(&[1, 5, 9]));
        assert_eq!(histogram(&set, 300, |_| PickCtx::default()), [100, 100, 100]);
    }
}
