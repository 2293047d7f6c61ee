//! The colour, route and pick stages: mark the request's colour, find its route rule, and
//! choose an endpoint — colour lane, then the route's canary split, then the set's own
//! stages (environment shift, locality, balancer).

use std::sync::Arc;
use std::time::Instant;

use http::header::HeaderValue;
use http::request::Parts;

use super::super::ConnCtx;
use crate::balance::{EndpointSet, PickCtx};
use crate::governance::routing::{self, Route};
use crate::route::{Cluster, RouteTable};
use crate::telemetry::metrics::Direction;

/// The label subset a request asks for.
pub struct Lane<'a> {
    /// The request's colour: endpoints of that colour first, then uncoloured ones.
    pub colour: Option<&'a [u8]>,
    /// The version the route's split chose (falls back to the rest when it has none usable).
    pub version: Option<&'a str>,
}

/// Colours the request: headers carried from the inbound request it serves (outbound), the
/// `[colour]` rules, and the VM's own colour (outbound). Returns the request's colour when
/// `[colour]` is configured; without it the colour header is only read where a later stage
/// needs it ([`header_colour`]).
pub fn colour(ctx: &ConnCtx, table: &RouteTable, cluster: &Cluster, parts: &mut Parts) -> Option<HeaderValue> {
    let inbound = cluster.direction == Direction::Inbound;
    let Some(c) = &table.colouring else {
        // No [colour] section: a VM of a lane still stamps its colour on outbound calls.
        if !inbound {
            if let Some(own) = ctx.shared.own_colour.load().as_deref() {
                parts
                    .headers
                    .entry(&crate::governance::colour::DEFAULT_HEADER)
                    .or_insert_with(|| own.clone());
            }
        }
        return None;
    };
    let now = Instant::now();
    if !inbound {
        if let Some(p) = &table.propagation {
            p.restore(&mut parts.headers, now);
        }
    }
    let own = if inbound {
        None
    } else {
        ctx.shared.own_colour.load_full()
    };
    let colour = c
        .apply(&mut parts.headers, parts.uri.query(), ctx.client.ip(), own.as_deref())
        .cloned();
    if inbound {
        if let Some(p) = &table.propagation {
            p.remember(&parts.headers, now);
        }
    }
    colour
}

/// The colour a request carries in the default header, for a stage that needs it when no
/// `[colour]` section decided it (a colour that arrives is honoured without one).
pub fn header_colour(table: &RouteTable, colour: &Option<HeaderValue>, parts: &Parts) -> Option<HeaderValue> {
    if colour.is_some() || table.colouring.is_some() {
        return colour.clone();
    }
    parts
        .headers
        .get(&crate::governance::colour::DEFAULT_HEADER)
        .filter(|v| !v.is_empty())
        .cloned()
}

/// The first route rule of the addressed service that takes the request.
pub fn route(cluster: &Cluster, parts: &Parts) -> Option<Arc<Route>> {
    if cluster.routes.is_empty() {
        return None;
    }
    routing::select(&cluster.routes, parts).cloned()
}

/// An endpoint for the request's lane.
pub fn pick(set: &EndpointSet, lane: &Lane<'_>, ctx: PickCtx) -> Option<usize> {
    set.pick_lane(lane.colour, lane.version, ctx)
}
