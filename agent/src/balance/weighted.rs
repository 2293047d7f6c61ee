//! Smooth weighted round-robin (nginx's algorithm), precomputed into a schedule so that a pick
//! is one atomic increment instead of a locked update of every endpoint's current weight.

use std::sync::atomic::{AtomicUsize, Ordering};

/// Longest schedule kept; larger weight sums are scaled down (ratios kept within 1%).
const MAX_SCHEDULE: u64 = 4096;

#[derive(Debug)]
pub struct SmoothWeighted {
    schedule: Vec<u32>,
    next: AtomicUsize,
}

impl SmoothWeighted {
    pub fn new(weights: &[u32]) -> Self {
        Self {
            schedule: smooth_schedule(&scale(weights)),
            next: AtomicUsize::new(0),
        }
    }

    pub fn next(&self) -> usize {
        if self.schedule.is_empty() {
            return 0;
        }
        let k = self.next.fetch_add(1, Ordering::Relaxed) % self.schedule.len();
        self.schedule[k] as usize
    }
}

/// Divides by the GCD, then scales down proportionally if the sum is still too large.
/// Nginx's smooth weighted round-robin unrolled: one index per unit of weight, spread so that no
/// index comes in runs longer than its share requires. `weights` sum to the schedule's length.
pub fn smooth_schedule(weights: &[u32]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut schedule = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        schedule.push(u32::try_from(best).unwrap_or(0));
    }
    schedule
}

fn scale(weights: &[u32]) -> Vec<u32> {
    let g = weights.iter().copied().fold(0, gcd).max(1);
    let mut w: Vec<u32> = weights.iter().map(|&x| (x / g).max(1)).collect();
    let sum: u64 = w.iter().map(|&x| u64::from(x)).sum();
    if sum > MAX_SCHEDULE {
        let f = MAX_SCHEDULE as f64 / sum as f64;
        w = w.iter().map(|&x| ((f64::from(x) * f).round() as u32).max(1)).collect();
    }
    w
}

fn gcd(a: u32, b: u32) -> u32 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::test_support::*;
    use crate::balance::{EndpointSet, PickCtx};
    use crate::config::BalancerKind;

    #[test]
    fn distribution_follows_weights_exactly_per_cycle() {
        let set = EndpointSet::new(BalancerKind::Weighted, endpoints(&[300, 100, 200]));
        assert_eq!(histogram(&set, 600, |_| PickCtx::default()), [300, 100, 200]);
    }

    #[test]
    fn schedule_is_smooth() {
        // nginx's example: weights 5,1,1 give a a b a c a a, never five a in a row.
        let w = SmoothWeighted::new(&[5, 1, 1]);
        let seq: Vec<usize> = (0..7).map(|_| w.next()).collect();
        assert_eq!(seq, [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn huge_weights_are_scaled() {
        let w = SmoothWeighted::new(&[10_000, 9_999, 1]);
        assert!(w.schedule.len() as u64 <= MAX_SCHEDULE + 3);
    }
}
