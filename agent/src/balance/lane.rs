//! The lane stage, before the subset stage: label subsets a request may ask for. A coloured
//! request (染色) goes to the endpoints of its colour and falls back to uncoloured ones; an
//! uncoloured request stays off coloured endpoints (a test lane gets only its own traffic)
//! unless nothing else is usable; a route's canary split picks a version among the uncoloured
//! endpoints and falls back to all of them. Each lane is a full [`Subsets`] (environment shift,
//! locality, balancer) over its members, built on the first request that needs it.

use std::sync::Arc;

use super::subset::Subsets;
use super::{Endpoint, PickCtx, SetPolicy};
use crate::config::BalancerKind;

/// The lanes of one endpoint set.
#[derive(Debug)]
pub struct Lanes {
    /// Uncoloured endpoints; `None` when the set has no coloured endpoint (the set's own
    /// subsets then serve uncoloured requests).
    uncoloured: Option<Subsets>,
    by_colour: Vec<(Box<str>, Subsets)>,
    /// Versions among the uncoloured endpoints (all endpoints when none is coloured).
    by_version: Vec<(Box<str>, Subsets)>,
}

impl Lanes {
    pub fn build(kind: BalancerKind, endpoints: &[Arc<Endpoint>], policy: &SetPolicy) -> Self {
        let coloured = endpoints.iter().any(|e| !e.labels.colour.is_empty());
        let plain: Vec<usize> = (0..endpoints.len())
            .filter(|&i| endpoints[i].labels.colour.is_empty())
            .collect();
        let mut colours: Vec<Box<str>> = endpoints
            .iter()
            .filter(|e| !e.labels.colour.is_empty())
            .map(|e| e.labels.colour.clone())
            .collect();
        colours.sort_unstable();
        colours.dedup();
        let by_colour = colours
            .into_iter()
            .map(|c| {
                let members: Vec<usize> = (0..endpoints.len())
                    .filter(|&i| endpoints[i].labels.colour == c)
                    .collect();
                let lane = Subsets::build_over(kind, endpoints, &members, policy);
                (c, lane)
            })
            .collect();
        let mut versions: Vec<Box<str>> = plain
            .iter()
            .map(|&i| endpoints[i].labels.version.clone())
            .filter(|v| !v.is_empty())
            .collect();
        versions.sort_unstable();
        versions.dedup();
        let by_version = versions
            .into_iter()
            .map(|v| {
                let members: Vec<usize> = plain
                    .iter()
                    .copied()
                    .filter(|&i| endpoints[i].labels.version == v)
                    .collect();
                let lane = Subsets::build_over(kind, endpoints, &members, policy);
                (v, lane)
            })
            .collect();
        Self {
            uncoloured: coloured.then(|| Subsets::build_over(kind, endpoints, &plain, policy)),
            by_colour,
            by_version,
        }
    }

    /// Picks in the lane of `colour` and `version`; `None` from a lane with nothing usable
    /// sends the caller to the set's own subsets (every endpoint).
    pub fn pick(&self, colour: Option<&[u8]>, version: Option<&str>, ctx: PickCtx) -> Option<usize> {
        if let Some(c) = colour {
            if let Some((_, lane)) = self.by_colour.iter().find(|(name, _)| name.as_bytes() == c) {
                if lane.has_usable(ctx.exclude) {
                    return lane.pick(ctx);
                }
            }
        }
        if let Some(v) = version {
            if let Some((_, lane)) = self.by_version.iter().find(|(name, _)| &**name == v) {
                if lane.has_usable(ctx.exclude) {
                    return lane.pick(ctx);
                }
            }
        }
        match &self.uncoloured {
            Some(lane) if lane.has_usable(ctx.exclude) => lane.pick(ctx),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {

    use super::super::test_support::labelled;
    use super::super::{EndpointSet, Env, Labels, PickCtx};
    use crate::config::BalancerKind;

    fn label(colour: &str, version: &str) -> Labels {
        Labels {
            colour: colour.into(),
            version: version.into(),
            ..Labels::env(Env::Vm)
        }
    }

    /// 0, 1: uncoloured v1; 2: uncoloured v2; 3: blue v1.
    fn set() -> EndpointSet {
        EndpointSet::new(
            BalancerKind::RoundRobin,
            labelled([
                (100, label("", "v1")),
                (100, label("", "v1")),
                (100, label("", "v2")),
                (100, label("blue", "v1")),
            ]),
        )
    }

    fn picks(set: &EndpointSet, colour: Option<&[u8]>, version: Option<&str>, n: usize) -> Vec<usize> {
        let mut counts = vec![0; set.endpoints().len()];
        for _ in 0..n {
            if let Some(i) = set.pick_lane(colour, version, PickCtx::default()) {
                counts[i] += 1;
            }
        }
        counts
    }

    fn eject(set: &EndpointSet, i: usize) {
        super::super::test_support::eject(&set.endpoints()[i]);
    }

    #[test]
    fn a_coloured_request_stays_in_its_lane_and_uncoloured_ones_stay_out() {
        let s = set();
        assert_eq!(picks(&s, Some(b"blue"), None, 30), [0, 0, 0, 30]);
        let plain = picks(&s, None, None, 30);
        assert_eq!(plain[3], 0, "uncoloured requests keep off the blue lane: {plain:?}");
        assert_eq!(plain.iter().sum::<usize>(), 30);
    }

    #[test]
    fn an_empty_or_unusable_lane_falls_back_to_uncoloured_endpoints() {
        let s = set();
        let unknown = picks(&s, Some(b"green"), None, 30);
        assert_eq!(unknown[3], 0, "{unknown:?}");
        eject(&s, 3);
        let blue = picks(&s, Some(b"blue"), None, 30);
        assert_eq!((blue[3], blue.iter().sum::<usize>()), (0, 30), "{blue:?}");
    }

    #[test]
    fn a_version_split_picks_inside_the_uncoloured_endpoints() {
        let s = set();
        assert_eq!(picks(&s, None, Some("v2"), 20), [0, 0, 20, 0]);
        let v1 = picks(&s, None, Some("v1"), 20);
        assert_eq!(
            (v1[2], v1[3]),
            (0, 0),
            "blue v1 is not in the uncoloured v1 lane: {v1:?}"
        );
        eject(&s, 2);
        let fallback = picks(&s, None, Some("v2"), 20);
        assert_eq!((fallback[2], fallback[3], fallback.iter().sum::<usize>()), (0, 0, 20));
    }

    #[test]
    fn without_coloured_endpoints_a_colour_changes_nothing() {
        let s = EndpointSet::new(
            BalancerKind::RoundRobin,
            labelled([(100, label("", "")), (100, label("", ""))]),
        );
        assert_eq!(picks(&s, Some(b"blue"), None, 10), [5, 5]);
        assert!(
            s.lanes.get().is_none(),
            "no lanes are built for a set without colours or versions"
        );
    }

    #[test]
    fn only_ejected_everywhere_still_answers() {
        let s = set();
        for i in 0..4 {
            eject(&s, i);
        }
        assert_eq!(
            picks(&s, Some(b"blue"), None, 4).iter().sum::<usize>(),
            4,
            "panic mode, as a plain pick"
        );
    }
}
