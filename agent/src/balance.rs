//! Load balancing over an endpoint set: the stages that choose an endpoint, and the set they
//! choose from.
//!
//! A pick runs three stages, each in its own file: [`subset`] (the environment split of a shift
//! policy: a weighted choice among label subsets that falls back to a non-empty one),
//! [`locality`] (the caller's own zone while enough of it is healthy), then the balancer.
//! An [`EndpointSet`] is immutable once built (the schedules, rings and pools are built with
//! it); a change of endpoints or policy builds a new set that is swapped in atomically.
//!
//! Ejected endpoints are skipped. Below the set's healthy panic threshold (Envoy's
//! `healthy_panic_threshold`, off by default) the set is in panic: too few endpoints are left
//! to carry the load, so picks ignore ejection and spread over every endpoint with the
//! balancer, bypassing the subset and locality stages (Envoy also drops zone-aware routing in
//! panic).

pub mod endpoint;
pub mod lane;
mod least_request;
pub mod locality;
mod p2c_ewma;
mod random;
mod ring_hash;
mod round_robin;
pub mod subset;
pub mod weighted;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

pub use endpoint::{Endpoint, EndpointStats, Env, InFlight, Labels, Source};
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

/// How a set splits and orders its endpoints besides the balancer.
#[derive(Clone, Debug, Default)]
pub struct SetPolicy {
    /// Percent of requests per environment (a shift policy); `None`: one pool for all.
    pub split: Option<Vec<(Env, u32)>>,
    /// The caller's zone and the healthy share its endpoints need to keep traffic local.
    pub locality: Option<locality::Locality>,
    /// Counts requests that the split sent to another environment than it chose.
    pub fallbacks: Option<prometheus_client::metrics::counter::Counter>,
}

/// The endpoints of one cluster with the stage and balancer state built for them.
#[derive(Debug)]
pub struct EndpointSet {
    endpoints: Vec<Arc<Endpoint>>,
    subsets: subset::Subsets,
    kind: BalancerKind,
    /// Healthy panic threshold in percent of endpoints not ejected (0: off).
    panic_threshold: AtomicU32,
    /// Every endpoint under one balancer: where picks go in panic. Built when a threshold is set.
    panic_pool: OnceLock<Pool>,
    /// The split and locality the set was built with (lanes are built with them too).
    policy: SetPolicy,
    /// Whether some endpoint carries a colour (uncoloured requests then keep off them).
    coloured: bool,
    /// Colour and version lanes, built on the first request that asks for one.
    lanes: OnceLock<lane::Lanes>,
}

/// Some endpoints of a set (global indexes into the set) with a balancer over them.
#[derive(Debug)]
pub struct Pool {
    members: Vec<usize>,
    endpoints: Vec<Arc<Endpoint>>,
    picker: Picker,
}

#[derive(Debug)]
enum Picker {
    RoundRobin(round_robin::RoundRobin),
    Weighted(weighted::SmoothWeighted),
    Random(random::WeightedRandom),
    /// Candidates drawn by weight (`None`: all weights equal, drawn uniformly).
    LeastRequest(Option<random::WeightedRandom>),
    P2cEwma(Option<random::WeightedRandom>),
    RingHash(ring_hash::Ring),
}

// === impl EndpointSet ===

impl EndpointSet {
    /// A set with one pool for all endpoints.
    pub fn new(kind: BalancerKind, endpoints: Vec<Arc<Endpoint>>) -> Self {
        Self::with_policy(kind, endpoints, &SetPolicy::default())
    }

    pub fn with_policy(kind: BalancerKind, endpoints: Vec<Arc<Endpoint>>, policy: &SetPolicy) -> Self {
        let subsets = subset::Subsets::build(kind, &endpoints, policy);
        let coloured = endpoints.iter().any(|e| !e.labels.colour.is_empty());
        Self {
            endpoints,
            subsets,
            kind,
            panic_threshold: AtomicU32::new(0),
            panic_pool: OnceLock::new(),
            coloured,
            policy: policy.clone(),
            lanes: OnceLock::new(),
        }
    }

    /// Picks an endpoint for a request of `colour` that a route's split sent to `version`:
    /// the lane stage, then [`EndpointSet::pick`]'s stages inside the lane; a lane with nothing
    /// usable falls back to the whole set.
    pub fn pick_lane(&self, colour: Option<&[u8]>, version: Option<&str>, ctx: PickCtx) -> Option<usize> {
        if version.is_none() && !self.coloured {
            return self.pick(ctx);
        }
        let lanes = self
            .lanes
            .get_or_init(|| lane::Lanes::build(self.kind, &self.endpoints, &self.policy));
        lanes.pick(colour, version, ctx).or_else(|| self.pick(ctx))
    }

    /// Sets the healthy panic threshold (percent, capped at 100; 0 turns panic mode off): while
    /// fewer than this share of the endpoints are available (not ejected), picks ignore
    /// ejection. A setter on `&self` so a reload can change it on the set in force.
    pub fn set_panic_threshold(&self, percent: u32) {
        let percent = percent.min(100);
        if percent > 0 {
            self.panic_pool();
        }
        self.panic_threshold.store(percent, Ordering::Relaxed);
    }

    pub fn panic_threshold(&self) -> u32 {
        self.panic_threshold.load(Ordering::Relaxed)
    }

    /// Endpoints not ejected at `now`.
    pub fn available_at(&self, now: Instant) -> usize {
        self.endpoints.iter().filter(|e| !e.stats.is_ejected_at(now)).count()
    }

    /// Whether the set is in panic at `now`: available share below the panic threshold.
    pub fn in_panic_at(&self, now: Instant) -> bool {
        let threshold = self.panic_threshold();
        // available / len < threshold / 100, in integers.
        threshold > 0 && (self.available_at(now) as u64) * 100 < u64::from(threshold) * self.endpoints.len() as u64
    }

    fn panic_pool(&self) -> &Pool {
        self.panic_pool
            .get_or_init(|| Pool::new(self.kind, &self.endpoints, (0..self.endpoints.len()).collect()))
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// Whether some endpoint carries a colour (the set has colour lanes).
    pub fn is_coloured(&self) -> bool {
        self.coloured
    }

    /// The split in force: `(env, percent, endpoints)` per environment; empty without a split.
    pub fn split(&self) -> Vec<(Env, u32, usize)> {
        self.subsets.describe()
    }

    /// Picks an endpoint index: environment, then locality, then the balancer. Ejected
    /// endpoints are skipped unless every endpoint of the pool is ejected, or the set is below
    /// its panic threshold (then the balancer picks among all endpoints, as Envoy's panic mode).
    pub fn pick(&self, ctx: PickCtx) -> Option<usize> {
        if self.endpoints.is_empty() {
            return None;
        }
        // The threshold check costs a pass over the endpoints, so only when one is set.
        if self.panic_threshold() > 0 && self.in_panic_at(Instant::now()) {
            return self.panic_pool().pick_where(ctx, false);
        }
        self.subsets.pick(ctx)
    }
}

// === impl Pool ===

impl Pool {
    pub fn new(kind: BalancerKind, all: &[Arc<Endpoint>], members: Vec<usize>) -> Self {
        let endpoints: Vec<Arc<Endpoint>> = members.iter().map(|&i| all[i].clone()).collect();
        let weights: Vec<u32> = endpoints.iter().map(|e| e.weight.max(1)).collect();
        let uneven = weights.windows(2).any(|w| w[0] != w[1]);
        let by_weight = || uneven.then(|| random::WeightedRandom::new(&weights));
        let picker = match kind {
            BalancerKind::RoundRobin if uneven => Picker::Weighted(weighted::SmoothWeighted::new(&weights)),
            BalancerKind::RoundRobin => Picker::RoundRobin(round_robin::RoundRobin::default()),
            BalancerKind::Weighted => Picker::Weighted(weighted::SmoothWeighted::new(&weights)),
            BalancerKind::Random => Picker::Random(random::WeightedRandom::new(&weights)),
            BalancerKind::LeastRequest => Picker::LeastRequest(by_weight()),
            BalancerKind::P2cEwma => Picker::P2cEwma(by_weight()),
            BalancerKind::RingHash => {
                let keys: Vec<String> = endpoints.iter().map(|e| e.addr.to_string()).collect();
                Picker::RingHash(ring_hash::Ring::new(&keys, &weights))
            }
        };
        Self {
            members,
            endpoints,
            picker,
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Whether some member other than `exclude` is not ejected.
    pub fn has_usable(&self, exclude: Option<usize>) -> bool {
        self.members
            .iter()
            .zip(&self.endpoints)
            .any(|(&g, e)| Some(g) != exclude && !e.stats.is_ejected())
    }

    /// Members not ejected.
    pub fn healthy(&self) -> usize {
        self.endpoints.iter().filter(|e| !e.stats.is_ejected()).count()
    }

    /// The balancer's choice when usable, else the next usable member, else (all ejected)
    /// any member but `exclude`. Returns a global index.
    pub fn pick(&self, ctx: PickCtx) -> Option<usize> {
        self.pick_where(ctx, true)
    }

    /// [`Self::pick`], with ejected members usable unless `skip_ejected`.
    fn pick_where(&self, ctx: PickCtx, skip_ejected: bool) -> Option<usize> {
        let n = self.members.len();
        if n == 0 {
            return None;
        }
        let exclude = ctx.exclude.and_then(|g| self.members.iter().position(|&m| m == g));
        let usable = |i: usize| Some(i) != exclude && !(skip_ejected && self.endpoints[i].stats.is_ejected());
        for _ in 0..2 {
            let i = self.choose(ctx.hash);
            if usable(i) {
                return Some(self.members[i]);
            }
        }
        let start = fastrand::usize(..n);
        let local = (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| usable(i))
            .or_else(|| (0..n).map(|k| (start + k) % n).find(|&i| Some(i) != exclude))
            .unwrap_or(start);
        Some(self.members[local])
    }

    fn choose(&self, hash: Option<u64>) -> usize {
        let n = self.endpoints.len();
        match &self.picker {
            Picker::RoundRobin(rr) => rr.next(n),
            Picker::Weighted(w) => w.next(),
            Picker::Random(r) => r.next(),
            Picker::LeastRequest(w) => least_request::pick(&self.endpoints, w.as_ref()),
            Picker::P2cEwma(w) => p2c_ewma::pick(&self.endpoints, w.as_ref()),
            Picker::RingHash(ring) => match hash {
                Some(h) => ring.lookup(h),
                None => fastrand::usize(..n),
            },
        }
    }
}

/// Two random indexes of `0..n` (n >= 2) for power-of-two-choices: distinct when weights are
/// even; drawn by weight with replacement otherwise, so that with equal load each endpoint's
/// share is its weight's share (a ramping instance gets its ramp's share).
fn two_choices(n: usize, by_weight: Option<&random::WeightedRandom>) -> (usize, usize) {
    match by_weight {
        Some(w) => (w.next(), w.next()),
        None => {
            let a = fastrand::usize(..n);
            let b = (a + 1 + fastrand::usize(..n - 1)) % n;
            (a, b)
        }
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use super::*;
    use crate::telemetry::metrics::RequestMetrics;

    /// `vm` endpoints with these weights, on 127.0.0.1:10000 and up.
    pub fn endpoints(weights: &[u32]) -> Vec<Arc<Endpoint>> {
        labelled(weights.iter().map(|&w| (w, Labels::env(Env::Vm))))
    }

    /// Ejects `e` for 30 s from now (as five gateway failures would).
    pub fn eject(e: &Endpoint) {
        e.stats.eject_at(
            std::time::Instant::now(),
            std::time::Duration::from_secs(30),
            std::time::Duration::from_secs(30),
            endpoint::EjectionReason::ConsecutiveGateway,
        );
    }

    /// Endpoints with these weights and labels, on 127.0.0.1:10000 and up.
    pub fn labelled(eps: impl IntoIterator<Item = (u32, Labels)>) -> Vec<Arc<Endpoint>> {
        eps.into_iter()
            .enumerate()
            .map(|(i, (w, labels))| {
                let addr = std::net::SocketAddr::from(([127, 0, 0, 1], 10_000 + i as u16));
                Arc::new(Endpoint::new(addr, w, Arc::new(labels), RequestMetrics::detached()))
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
            test_support::eject(&set.endpoints()[1]);
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
            test_support::eject(e);
        }
        assert!(set.pick(PickCtx::default()).is_some());
    }

    #[test]
    fn below_the_panic_threshold_picks_ignore_ejection() {
        let ctx = |k: usize| PickCtx {
            hash: Some(ring_hash_key(&k.to_le_bytes())),
            exclude: None,
        };
        for kind in [
            BalancerKind::RoundRobin,
            BalancerKind::Weighted,
            BalancerKind::Random,
            BalancerKind::LeastRequest,
            BalancerKind::P2cEwma,
            BalancerKind::RingHash,
        ] {
            let set = EndpointSet::new(kind, endpoints(&[100, 100, 100, 100]));
            for e in &set.endpoints()[..3] {
                test_support::eject(e);
            }
            let now = Instant::now();
            // (threshold, in panic): 1 of 4 available is 25%.
            for (threshold, panic) in [(0, false), (25, false), (26, true), (50, true), (100, true)] {
                set.set_panic_threshold(threshold);
                assert_eq!(set.in_panic_at(now), panic, "{kind:?} at {threshold}%");
                let counts = histogram(&set, 400, ctx);
                if panic {
                    assert!(counts.iter().all(|&c| c > 0), "{kind:?} at {threshold}%: {counts:?}");
                } else {
                    assert_eq!(counts, [0, 0, 0, 400], "{kind:?} at {threshold}%");
                }
            }
        }
    }

    #[test]
    fn panic_mode_still_avoids_the_excluded_endpoint_and_ends_with_the_ejections() {
        let set = EndpointSet::new(BalancerKind::RoundRobin, endpoints(&[1, 1, 1]));
        set.set_panic_threshold(200);
        assert_eq!(set.panic_threshold(), 100);
        for e in &set.endpoints()[..2] {
            test_support::eject(e);
        }
        for _ in 0..30 {
            let i = set.pick(PickCtx {
                hash: None,
                exclude: Some(0),
            });
            assert_ne!(i, Some(0));
        }
        // Half an hour later nothing is ejected: out of panic.
        let later = Instant::now() + Duration::from_secs(1800);
        assert_eq!(set.available_at(later), 3);
        assert!(!set.in_panic_at(later));
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
