//! Round-robin: each endpoint in turn. With uneven weights the set uses the smooth weighted
//! schedule instead (`weighted.rs`), so a ramping endpoint gets its share (Envoy does the same).

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
    fn equal_weights_are_exactly_even() {
        let set = EndpointSet::new(BalancerKind::RoundRobin, endpoints(&[7, 7, 7]));
        assert_eq!(histogram(&set, 300, |_| PickCtx::default()), [100, 100, 100]);
    }

    #[test]
    fn weights_are_honoured_so_a_ramping_endpoint_gets_its_share() {
        let set = EndpointSet::new(BalancerKind::RoundRobin, endpoints(&[1, 5, 9]));
        assert_eq!(histogram(&set, 150, |_| PickCtx::default()), [10, 50, 90]);
        let ramping = EndpointSet::new(BalancerKind::RoundRobin, endpoints(&[100, 25]));
        assert_eq!(histogram(&ramping, 500, |_| PickCtx::default()), [400, 100]);
    }
}
