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
/// `[colour]` rules, and the VM's own colour (outbound). Returns the request's colour.
pub fn colour(ctx: &ConnCtx, table: &RouteTable, cluster: &Cluster, parts: &mut Parts) -> Option<HeaderValue> {
    let inbound = cluster.direction == Direction::Inbound;
    let Some(c) = &table.colouring else {
        // No [colour] section: a VM of a lane still stamps its colour on outbound calls, and
        // a colour that arrives is still honoured.
        let header = &crate::governance::colour::DEFAULT_HEADER;
        if !inbound && !parts.headers.contains_key(header) {
            if let Some(own) = ctx.shared.own_colour.load().as_deref() {
                parts.headers.insert(header.clone(), own.clone());
            }
        }
        return parts.headers.get(header).filter(|v| !v.is_empty()).cloned();
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
