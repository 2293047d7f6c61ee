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
