//! The record stage, shared by HTTP and TCP: after each try, the endpoint's latency estimate
//! and outlier detection learn how it went; an ejection is counted by reason and logged.

use std::time::{Duration, Instant};

use crate::balance::{Endpoint, EndpointSet};
use crate::resilience::outlier::Outcome;
use crate::resilience::TryOutcome;
use crate::route::Cluster;

/// Records one try of `endpoint` that ended with `outcome` after `rtt`, at `now`.
pub fn try_ended(
    cluster: &Cluster,
    set: &EndpointSet,
    endpoint: &Endpoint,
    outcome: TryOutcome,
    rtt: Duration,
    now: Instant,
) {
    if matches!(outcome, TryOutcome::Status(_)) {
        endpoint.stats.observe_rtt(rtt);
    }
    // A try that ran out of time counts against the endpoint (a hanging endpoint is ejected
    // like a refusing one); a TCP connection made is a success.
    let Some(outcome) = Outcome::of_try(outcome) else {
        return;
    };
    if let Some(ej) = cluster.outlier.observe(set, endpoint, outcome, now) {
        cluster.metrics.ejected(ej.reason.as_str());
        tracing::warn!(
            service = %cluster.service,
            endpoint = %endpoint.addr,
            reason = %ej.reason.as_str(),
            ejected_for = ?ej.duration,
            "outlier ejected"
        );
    }
}
