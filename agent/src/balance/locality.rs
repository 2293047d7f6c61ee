//! The locality stage: inside a subset, prefer endpoints in the caller's zone while at least
//! `min_healthy_percent` of them are healthy (not ejected); spill over to the whole subset
//! otherwise. A subset whose endpoints are all in one zone (or none in the caller's) skips it.

use std::sync::Arc;

use super::{Endpoint, PickCtx, Pool};
use crate::config::BalancerKind;

/// The caller's zone and how healthy its share must stay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Locality {
    pub zone: Box<str>,
    pub min_healthy_percent: u32,
}

/// A subset's pool, with its local part when locality applies.
#[derive(Debug)]
pub struct Local {
    all: Pool,
    local: Option<(Pool, u32)>,
}

impl Local {
    pub fn build(kind: BalancerKind, endpoints: &[Arc<Endpoint>], members: Vec<usize>, loc: Option<&Locality>) -> Self {
        let local = loc.and_then(|l| {
            let in_zone: Vec<usize> = members
                .iter()
                .copied()
                .filter(|&i| *endpoints[i].labels.zone == *l.zone)
                .collect();
            (!in_zone.is_empty() && in_zone.len() < members.len())
                .then(|| (Pool::new(kind, endpoints, in_zone), l.min_healthy_percent))
        });
        Self {
            all: Pool::new(kind, endpoints, members),
            local,
        }
    }

    pub fn len(&self) -> usize {
        self.all.len()
    }

    pub fn is_empty(&self) -> bool {
        self.all.is_empty()
    }

    pub fn has_usable(&self, exclude: Option<usize>) -> bool {
        self.all.has_usable(exclude)
    }

    pub fn pick(&self, ctx: PickCtx) -> Option<usize> {
        if let Some((local, min)) = &self.local {
            // healthy / len >= min / 100, in integers.
            if local.healthy() as u64 * 100 >= u64::from(*min) * local.len() as u64 && local.has_usable(ctx.exclude) {
                return local.pick(ctx);
            }
        }
        self.all.pick(ctx)
    }
}

#[cfg(test)]
mod tests {

    use super::*;
    use crate::balance::test_support;
    use crate::balance::{EndpointSet, Env, Labels, SetPolicy};

    fn zoned(zones: &[&str]) -> Vec<Arc<Endpoint>> {
        test_support::labelled(zones.iter().map(|z| {
            let labels = Labels {
                env: Env::Vm,
                zone: (*z).into(),
                ..Labels::default()
            };
            (100, labels)
        }))
    }

    fn set(zones: &[&str], min: u32) -> EndpointSet {
        EndpointSet::with_policy(
            BalancerKind::RoundRobin,
            zoned(zones),
            &SetPolicy {
                split: None,
                locality: Some(Locality {
                    zone: "z1".into(),
                    min_healthy_percent: min,
                }),
                fallbacks: None,
            },
        )
    }

    fn zone_counts(set: &EndpointSet, picks: usize) -> usize {
        (0..picks)
            .filter(|_| &*set.endpoints()[set.pick(PickCtx::default()).unwrap()].labels.zone == "z1")
            .count()
    }

    #[test]
    fn traffic_stays_in_the_callers_zone() {
        let s = set(&["z1", "z1", "z2", "z2"], 70);
        assert_eq!(zone_counts(&s, 100), 100);
    }

    #[test]
    fn traffic_spills_over_below_the_healthy_threshold() {
        let s = set(&["z1", "z1", "z1", "z2", "z2", "z2"], 70);
        // One of three local endpoints ejected: 66% < 70%, spill over to all six.
        crate::balance::test_support::eject(&s.endpoints()[0]);
        let local = zone_counts(&s, 600);
        assert!(local < 400, "spilled over: {local} of 600 stayed local");
        // At 60% it stays local.
        let s = set(&["z1", "z1", "z1", "z2"], 60);
        crate::balance::test_support::eject(&s.endpoints()[0]);
        assert_eq!(zone_counts(&s, 100), 100);
    }

    #[test]
    fn no_local_endpoints_uses_all() {
        let s = set(&["z2", "z3"], 70);
        assert_eq!(zone_counts(&s, 10), 0);
        assert!(s.pick(PickCtx::default()).is_some());
    }
}
