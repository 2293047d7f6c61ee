//! Ring hash (ketama-style consistent hashing) on a request header: the same key goes to the
//! same endpoint, and a change of endpoints moves only about 1/n of the keys.

use std::hash::{DefaultHasher, Hash, Hasher};

/// Virtual nodes per unit of weight share; the ring has at most `MAX_RING` entries.
const VNODES_PER_ENDPOINT: u64 = 160;
const MAX_RING: u64 = 64 * 1024;

#[derive(Debug)]
pub struct Ring {
    /// Sorted by hash.
    points: Vec<(u64, u32)>,
}

/// The stable 64-bit hash used for ring points and keys (SipHash with fixed keys).
pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h = DefaultHasher::new();
    b.hash(&mut h);
    h.finish()
}

impl Ring {
    pub fn new(keys: &[String], weights: &[u32]) -> Self {
        let total: u64 = weights.iter().map(|&w| u64::from(w.max(1))).sum::<u64>().max(1);
        let budget = (VNODES_PER_ENDPOINT * keys.len() as u64).min(MAX_RING);
        let mut points = Vec::with_capacity(budget as usize);
        for (i, (key, &w)) in keys.iter().zip(weights).enumerate() {
            let vnodes = (budget * u64::from(w.max(1)) / total).max(1);
            for v in 0..vnodes {
                let p = hash_bytes(format!("{key}-{v}").as_bytes());
                points.push((p, u32::try_from(i).unwrap_or(0)));
            }
        }
        points.sort_unstable();
        Self { points }
    }

    pub fn lookup(&self, hash: u64) -> usize {
        if self.points.is_empty() {
            return 0;
        }
        let i = self.points.partition_point(|&(p, _)| p < hash);
        self.points[i % self.points.len()].1 as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn same_key_same_endpoint_and_spread() {
        let ring = Ring::new(&keys(4), &[1, 1, 1, 1]);
        let mut counts = [0usize; 4];
        for u in 0..8_000 {
            let h = hash_bytes(format!("user-{u}").as_bytes());
            let a = ring.lookup(h);
            assert_eq!(a, ring.lookup(h));
            counts[a] += 1;
        }
        for c in counts {
            assert!((1_400..2_600).contains(&c), "{counts:?}");
        }
    }

    #[test]
    fn adding_an_endpoint_moves_few_keys() {
        let before = Ring::new(&keys(4), &[1; 4]);
        let after = Ring::new(&keys(5), &[1; 5]);
        let moved = (0..10_000)
            .filter(|u| {
                let h = hash_bytes(format!("user-{u}").as_bytes());
                before.lookup(h) != after.lookup(h)
            })
            .count();
        // Ideal is 1/5 = 2000.
        assert!(moved < 3_000, "{moved} keys moved");
    }

    #[test]
    fn weights_shift_share() {
        let ring = Ring::new(&keys(2), &[3, 1]);
        let c0 = (0..8_000)
            .filter(|u| ring.lookup(hash_bytes(format!("k{u}").as_bytes())) == 0)
            .count();
        assert!((5_400..6_600).contains(&c0), "{c0}");
    }
}
