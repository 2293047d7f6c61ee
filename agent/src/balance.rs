//! Load balancing over an endpoint set: the algorithms, and the set they pick from.
//!
//! An [`EndpointSet`] is immutable once built (the balancer's precomputed schedule or ring is
//! built with it); a change of endpoints builds a new set that is swapped in atomically.

pub mod endpoint;
mod least_request;
mod p2c_ewma;
mod random;
mod ring_hash;
mod round_robin;
mod weighted;

use std::sync::Arc;

pub use endpoint::{Endpoint, EndpointStats, InFlight};
pub use ring_hash::hash_bytes as ring_hash_key;

use crate::config::BalancerKind;

/// What a pick may depend on besides the endpoints.
#[derive(Clone, Copy, Debug, Default)]
pub struct PickCtx {
    /// Hash of the request's hash key (ring hash).
    pub hash: Option<u64>,
    /// An endpoint already tried by this request (retries go elsewhere when they can).
    pub exclude: Option<usize>,
}

/// The endpoints of one cluster with the balancer state built for them.
#[derive(Debug)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    picker: Picker,
}

#[derive(Debug)]
enum Picker {
    RoundRobin(round_robin::RoundRobin),
    Weighted(weighted::SmoothWeighted),
    Random(random::WeightedRandom),
    LeastRequest,
    P2cEwma,
    RingHash(ring_hash::Ring),
}

// === impl EndpointSet ===

impl EndpointSet {
    pub fn new(kind: BalancerKind, endpoints: Vec<Arc<Endpoint>>) -> Self {
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight.max(1)).collect();
        let picker = match kind {
            BalancerKind::RoundRobin => Picker::RoundRobin(round_robin::RoundRobin::default()),
            BalancerKind::Weighted => Picker::Weighted(weighted::SmoothWeighted::new(&weights)),
            BalancerKind::Random => Picker::Random(random::WeightedRandom::new(&weights)),
            BalancerKind::LeastRequest => Picker::LeastRequest,
            BalancerKind::P2cEwma => Picker::P2cEwma,
            BalancerKind::RingHash => {
                let keys: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
                Picker::RingHash(ring_hash::Ring::new(&keys, &weights))
            }
        };
        Self { endpoints, picker }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Picks an endpoint index: the balancer's choice when usable, else the next usable one.
    /// Ejected endpoints are skipped unless every endpoint is ejected (panic mode, as Envoy).
    pub fn pick(&self, ctx: PickCtx) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let usable = |i: usize| Some(i) != ctx.exclude && !self.endpoints[i].stats.is_ejected();
        for _ in 0..2 {
            let i = self.choose(ctx);
            if usable(i) {
                return Some(i);
            }
        }
        let start = fastrand::usize(..n);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| usable(i))
            .or_else(|| (0..n).map(|k| (start + k) % n).find(|&i| Some(i) != ctx.exclude))
            .or(Some(start))
    }

    fn choose(&self, ctx: PickCtx) -> usize {
        let n = self.endpoints.len();
        match &self.picker {
            Picker::RoundRobin(rr) => rr.next(n),
            Picker::Weighted(w) => w.next(),
            Picker::Random(r) => r.next(),
            Picker::LeastRequest => least_request::pick(&self.endpoints),
            Picker::P2cEwma => p2c_ewma::pick(&self.endpoints),
            Picker::RingHash(ring) => match ctx.hash {
                Some(h) => ring.lookup(h),
                None => fastrand::usize(..n),
            },
        }
    }
}

/// Two distinct random indexes of `0..n` (n >= 2), for power-of-two-choices.
fn two_choices(n: usize) -> (usize, usize) {
    let a = fastrand::usize(..n);
    let b = (a + 1 + fastrand::usize(..n - 1)) % n;
    (a, b)
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::telemetry::metrics::RequestMetrics;

    pub fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
                Arc::new(Endpoint::new(addr, w, "vm".into(), RequestMetrics::detached()))
            })
            .collect()
    }

    pub fn histogram(set: &EndpointSet, picks: usize, ctx: impl Fn(usize) -> PickCtx) -> Vec<usize> {
        let mut counts = vec![0; set.endpoints().len()];
        for k in 0..picks {
            counts[set.pick(ctx(k)).unwrap()] += 1;
        }
        counts
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use std::time::Duration;

    #[test]
    fn every_balancer_skips_ejected_endpoints() {
        for kind in [
            BalancerKind::RoundRobin,
            BalancerKind::Weighted,
            BalancerKind::Random,
            BalancerKind::LeastRequest,
            BalancerKind::P2cEwma,
            BalancerKind::RingHash,
        ] {
            let set = EndpointSet::new(kind, endpoints(&[100, 100, 100]));
            set.endpoints()[1]
                .stats
                .eject(Duration::from_secs(30), Duration::from_secs(30));
            let counts = histogram(&set, 600, |k| PickCtx {
                hash: Some(k as u64 * 7919),
                exclude: None,
            });
            assert_eq!(counts[1], 0, "{kind:?}: {counts:?}");
            assert_eq!(counts.iter().sum::<usize>(), 600);
        }
    }

    #[test]
    fn all_ejected_still_picks_panic_mode() {
        let set = EndpointSet::new(BalancerKind::RoundRobin, endpoints(&[1, 1]));
        for e in set.endpoints() {
            e.stats.eject(Duration::from_secs(30), Duration::from_secs(30));
        }
        assert!(set.pick(PickCtx::default()).is_some());
    }

    #[test]
    fn retries_avoid_the_excluded_endpoint() {
        let set = EndpointSet::new(BalancerKind::P2cEwma, endpoints(&[1, 1, 1]));
        for _ in 0..300 {
            assert_ne!(
                set.pick(PickCtx {
                    hash: None,
                    exclude: Some(2)
                }),
                Some(2)
            );
        }
        let one = EndpointSet::new(BalancerKind::P2cEwma, endpoints(&[1]));
        assert_eq!(
            one.pick(PickCtx {
                hash: None,
                exclude: Some(0)
            }),
            Some(0)
        );
        assert_eq!(
            EndpointSet::new(BalancerKind::Random, vec![]).pick(PickCtx::default()),
            None
        );
    }
}
