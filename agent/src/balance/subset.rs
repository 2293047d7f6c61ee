//! The subset stage: a weighted choice among label subsets of a set (today: environments, for
//! a shift policy such as `vm` 80 / `k8s` 20), falling back to a subset that has usable
//! endpoints when the chosen one has none. The choice follows a 100-slot smooth schedule, so a
//! split of 80/20 is exact over every 100 requests rather than only on average.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use prometheus_client::metrics::counter::Counter;

use super::locality::Local;
use super::{Endpoint, Env, PickCtx, SetPolicy};
use crate::config::BalancerKind;

/// The subsets of one set and the schedule that chooses among them.
#[derive(Debug)]
pub struct Subsets {
    subsets: Vec<Subset>,
    /// Subset index per slot; empty with a single subset.
    schedule: Vec<u8>,
    next: AtomicUsize,
    fallbacks: Option<Counter>,
}

#[derive(Debug)]
struct Subset {
    env: Env,
    percent: u32,
    pool: Local,
}

impl Subsets {
    pub fn build(kind: BalancerKind, endpoints: &[Arc<Endpoint>], policy: &SetPolicy) -> Self {
        let all: Vec<usize> = (0..endpoints.len()).collect();
        Self::build_over(kind, endpoints, &all, policy)
    }

    /// Subsets of the endpoints at `members` (global indexes into `endpoints`): a lane.
    pub fn build_over(kind: BalancerKind, endpoints: &[Arc<Endpoint>], members: &[usize], policy: &SetPolicy) -> Self {
        let Some(split) = &policy.split else {
            let all = members.to_vec();
            return Self {
                subsets: vec![Subset {
                    env: Env::Vm,
                    percent: 100,
                    pool: Local::build(kind, endpoints, all, policy.locality.as_ref()),
                }],
                schedule: Vec::new(),
                next: AtomicUsize::new(0),
                fallbacks: None,
            };
        };
        // One subset per environment of the policy, even an empty one (a request the schedule
        // sends there falls back and is counted), then environments outside the policy at 0%.
        let mut envs: Vec<(Env, u32)> = split.clone();
        for &i in members {
            let e = &endpoints[i];
            if !envs.iter().any(|(env, _)| *env == e.env()) {
                envs.push((e.env(), 0));
            }
        }
        let subsets: Vec<Subset> = envs
            .iter()
            .map(|&(env, percent)| {
                let members = members.iter().copied().filter(|&i| endpoints[i].env() == env).collect();
                Subset {
                    env,
                    percent,
                    pool: Local::build(kind, endpoints, members, policy.locality.as_ref()),
                }
            })
            .collect();
        let weights: Vec<u32> = subsets.iter().map(|s| s.percent).collect();
        Self {
            schedule: schedule(&weights),
            subsets,
            next: AtomicUsize::new(0),
            fallbacks: policy.fallbacks.clone(),
        }
    }

    /// `(env, percent, endpoints)` of each subset; empty without a split.
    pub fn describe(&self) -> Vec<(Env, u32, usize)> {
        if self.schedule.is_empty() && self.subsets.len() == 1 && self.fallbacks.is_none() {
            return Vec::new();
        }
        self.subsets.iter().map(|s| (s.env, s.percent, s.pool.len())).collect()
    }

    /// Whether some subset has an endpoint a pick may use.
    pub fn has_usable(&self, exclude: Option<usize>) -> bool {
        self.subsets.iter().any(|s| s.pool.has_usable(exclude))
    }

    pub fn pick(&self, ctx: PickCtx) -> Option<usize> {
        if self.subsets.len() == 1 {
            return self.subsets[0].pool.pick(ctx);
        }
        let chosen = match self.schedule.len() {
            0 => 0,
            n => usize::from(self.schedule[self.next.fetch_add(1, Ordering::Relaxed) % n]),
        };
        let want = &self.subsets[chosen];
        if want.pool.has_usable(ctx.exclude) {
            return want.pool.pick(ctx);
        }
        // Fall back to the subset with the largest share that has a usable endpoint (of equal
        // shares, the first).
        let other = self
            .subsets
            .iter()
            .filter(|s| s.pool.has_usable(ctx.exclude))
            .rev()
            .max_by_key(|s| s.percent);
        if let Some(other) = other {
            if let Some(c) = &self.fallbacks {
                c.inc();
            }
            return other.pool.pick(ctx);
        }
        // Nothing usable anywhere: panic mode in the chosen subset, else any non-empty one.
        if !want.pool.is_empty() {
            return want.pool.pick(ctx);
        }
        self.subsets.iter().find(|s| !s.pool.is_empty())?.pool.pick(ctx)
    }
}

/// The subsets' smooth weighted schedule (100 slots for a policy in percent); all-zero
/// weights: the subsets in turn.
fn schedule(weights: &[u32]) -> Vec<u8> {
    if weights.iter().all(|&w| w == 0) {
        return (0..weights.len()).map(|i| u8::try_from(i).unwrap_or(u8::MAX)).collect();
    }
    super::weighted::smooth_schedule(weights)
        .into_iter()
        .map(|i| u8::try_from(i).unwrap_or(u8::MAX))
        .collect()
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::balance::test_support;
    use crate::balance::{EndpointSet, Labels};

    fn labelled(envs: &[Env]) -> Vec<Arc<Endpoint>> {
        test_support::labelled(envs.iter().map(|&env| (100, Labels::env(env))))
    }

    fn split_of(set: &EndpointSet, picks: usize) -> (usize, usize) {
        let mut vm = 0;
        let mut k8s = 0;
        for _ in 0..picks {
            let i = set.pick(PickCtx::default()).unwrap();
            match set.endpoints()[i].env() {
                Env::Vm => vm += 1,
                _ => k8s += 1,
            }
        }
        (vm, k8s)
    }

    fn policy(vm: u32, k8s: u32, fallbacks: Option<Counter>) -> SetPolicy {
        SetPolicy {
            split: Some(vec![(Env::Vm, vm), (Env::K8s, k8s)]),
            locality: None,
            fallbacks,
        }
    }

    #[test]
    fn the_split_is_exact_per_hundred_for_every_balancer() {
        for kind in [
            BalancerKind::RoundRobin,
            BalancerKind::Weighted,
            BalancerKind::Random,
            BalancerKind::LeastRequest,
            BalancerKind::P2cEwma,
            BalancerKind::RingHash,
        ] {
            for (vm, k8s) in [(100, 0), (80, 20), (50, 50), (1, 99), (0, 100)] {
                let eps = labelled(&[Env::Vm, Env::Vm, Env::K8s, Env::K8s, Env::K8s]);
                let set = EndpointSet::with_policy(kind, eps, &policy(vm, k8s, None));
                let got = split_of(&set, 1_000);
                assert_eq!(got, (vm as usize * 10, k8s as usize * 10), "{kind:?} {vm}/{k8s}");
            }
        }
    }

    #[test]
    fn an_environment_without_endpoints_falls_back_and_counts() {
        let fallbacks = Counter::default();
        let set = EndpointSet::with_policy(
            BalancerKind::RoundRobin,
            labelled(&[Env::K8s, Env::K8s]),
            &policy(80, 20, Some(fallbacks.clone())),
        );
        assert_eq!(split_of(&set, 100), (0, 100));
        assert_eq!(fallbacks.get(), 80);
    }

    #[test]
    fn an_environment_all_ejected_falls_back_to_the_other() {
        let set = EndpointSet::with_policy(
            BalancerKind::P2cEwma,
            labelled(&[Env::Vm, Env::K8s]),
            &policy(50, 50, None),
        );
        crate::balance::test_support::eject(&set.endpoints()[1]);
        assert_eq!(split_of(&set, 100), (100, 0));
    }

    #[test]
    fn other_environments_only_take_traffic_as_a_fallback() {
        let set = EndpointSet::with_policy(
            BalancerKind::RoundRobin,
            labelled(&[Env::Vm, Env::Other]),
            &policy(100, 0, None),
        );
        assert_eq!(split_of(&set, 50), (50, 0));
        let only_other =
            EndpointSet::with_policy(BalancerKind::RoundRobin, labelled(&[Env::Other]), &policy(50, 50, None));
        assert!(only_other.pick(PickCtx::default()).is_some());
    }

    #[test]
    fn retries_leave_the_excluded_endpoint_across_subsets() {
        let set = EndpointSet::with_policy(
            BalancerKind::RoundRobin,
            labelled(&[Env::Vm, Env::K8s]),
            &policy(100, 0, None),
        );
        for _ in 0..20 {
            assert_eq!(
                set.pick(PickCtx {
                    hash: None,
                    exclude: Some(0)
                }),
                Some(1)
            );
        }
    }

    #[test]
    fn schedules_interleave() {
        assert_eq!(schedule(&[80, 20]).len(), 100);
        assert_eq!(schedule(&[80, 20]).iter().filter(|&&s| s == 1).count(), 20);
        // Never two k8s slots in a row at 80/20.
        assert!(!schedule(&[80, 20]).windows(2).any(|w| w == [1, 1]));
        assert_eq!(schedule(&[0, 0]), vec![0, 1]);
    }
}
