//! The record stage, shared by HTTP and TCP: after each try, the endpoint's latency estimate
//! and outlier detection learn how it went; an ejection is counted by reason and logged. A
//! finished HTTP request is offered to the live taps ([`tap`]).

use std::time::{Duration, Instant};

use crate::balance::{Endpoint, EndpointSet};
use crate::resilience::outlier::Outcome;
use crate::resilience::TryOutcome;
use crate::route::Cluster;
use crate::telemetry::tap;
use crate::telemetry::trace::{Ended, Span};
use crate::telemetry::AccessRecord;

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
        endpoint.stats.observe_rtt(rtt, now);
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

/// Whether a request to `cluster` for `path` should be captured for the live taps: a tap is
/// attached (one relaxed atomic load while none is) and its service and path filters may pass
/// it. A cluster with route rules may hand the request to another service, so its service is
/// not checked then.
#[inline]
pub fn tap_wants(cluster: Option<&Cluster>, path: &str) -> bool {
    tap::attached() && tap::may_want(cluster.filter(|c| c.routes.is_empty()).map(|c| &*c.service), path)
}

/// Offers a finished request to the live taps (`GET /tap`, `vmesh tap`) with the labels of the
/// endpoint that answered. While no tap is attached this is one relaxed atomic load.
#[inline]
pub fn tap(record: &AccessRecord, endpoint: Option<&Endpoint>) {
    if tap::attached() {
        tap::offer(
            record,
            endpoint.map(|e| e.env().as_str()),
            endpoint.map(|e| &*e.labels.colour),
        );
    }
}

/// Ends a sampled request's span with the clock readings the metrics and the access log use
/// (docs/tracing.md): total, headers and upstream time, and the endpoint that answered.
pub fn trace_ended(span: Box<Span>, c: &super::complete::Completion, total: Duration) {
    span.end(Ended {
        service: c.cluster.as_ref().map(|c| c.service.clone()),
        status: c.status,
        error: c.error,
        upstream: c
            .endpoint
            .as_ref()
            .map(|e| (e.endpoint().addr, e.endpoint().env().as_str())),
        attempts: c.attempts,
        total,
        headers_time: c.headers_time,
        upstream_time: c.upstream_time,
    });
}
