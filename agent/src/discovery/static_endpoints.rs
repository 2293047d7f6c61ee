//! The `static` source: the `endpoints` of an `[[outbound]]`, labelled like discovered ones.

use std::sync::Arc;

use super::{Found, View};
use crate::config::OutboundConfig;
use crate::store::unix_now;

/// The config's endpoints as a view that never changes (a reload brings a new one).
pub fn view(out: &OutboundConfig) -> View {
    let found = out
        .endpoints
        .iter()
        .map(|e| {
            let (zone, version, colour) = e.labels();
            Found {
                address: e.address(),
                weight: e.weight(),
                env: e.env().to_owned(),
                zone: zone.to_owned(),
                version: version.to_owned(),
                colour: colour.to_owned(),
                ramp: None,
            }
        })
        .collect();
    View {
        endpoints: Some(Arc::new(found)),
        error: None,
        updated: Some(unix_now()),
    }
}
