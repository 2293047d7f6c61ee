//! Outlier detection (Envoy's semantics): endpoints that fail in a row, or whose success rate
//! or failure percentage over an interval stands out from the cluster, are ejected for a while.
//!
//! Two inline modes run on every try ([`Outlier::observe`]): `consecutive_gateway_failures`
//! (connect failure, reset, timeout, 502/503/504; on by default at 5) and `consecutive_5xx`
//! (any 5xx including 500, and local failures; off by default). Two statistical modes run in
//! [`Outlier::sweep`], which the owner calls every `interval`: `success_rate` (below the mean
//! by more than `stdev_factor` standard deviations) and `failure_percentage` (at or above a
//! threshold). Both are off by default.
//!
//! An ejection lasts `base_ejection_time * multiplier`, capped at `max_ejection_time`; the
//! multiplier grows by one per ejection and shrinks by one per sweep interval the endpoint
//! spends back in service (Envoy's rule; a single success does not forgive, so a flapping
//! endpoint keeps its longer ejections). An ejection ends by itself at its deadline.
//!
//! At most `max_ejection_percent` of a cluster is ejected at once, rounded down, but at least
//! one endpoint of a cluster of two or more (as Envoy since 1.24, so that small percentages
//! still act on small clusters); 0 turns ejection off. The check and the ejection are two
//! atomic steps, so tries ending at the same instant on different threads may overshoot the
//! limit by one each; a sweep never does.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

pub use crate::balance::endpoint::EjectionReason;
use crate::balance::endpoint::IntervalCounts;
use crate::balance::{Endpoint, EndpointSet};
use crate::config::Dur;
use crate::resilience::TryOutcome;

/// `[outbound.outlier]`: outlier detection for one cluster. The defaults are the first
/// version's: 5 consecutive gateway failures eject for 30 s, at most half the cluster.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutlierConfig {
    /// Consecutive gateway failures (connect failure, reset, timeout, 502/503/504) that eject
    /// an endpoint; 0 disables the mode.
    pub consecutive_gateway_failures: u32,
    /// Consecutive 5xx responses of any kind (500 included) or local failures that eject an
    /// endpoint; 0 (the default) disables the mode.
    pub consecutive_5xx: u32,
    /// The first ejection's length; the n-th lasts n times as long.
    pub base_ejection_time: Dur,
    /// The longest an ejection lasts.
    pub max_ejection_time: Dur,
    /// At most this percent of the cluster's endpoints are ejected at once (rounded down, but
    /// at least one of two or more); 0 disables ejection.
    pub max_ejection_percent: u32,
    /// Healthy panic threshold: while fewer than this percent of the endpoints are available
    /// (not ejected), picks ignore ejection and use every endpoint; 0 (the default) is off.
    pub panic_threshold_percent: u32,
    /// Time between sweeps: the statistical modes' measuring window, and the time an endpoint
    /// must stay in service to have one ejection forgiven.
    pub interval: Dur,
    /// Eject endpoints whose success rate is far below the cluster's; absent: off.
    pub success_rate: Option<SuccessRateConfig>,
    /// Eject endpoints whose failure percentage reaches a threshold; absent: off.
    pub failure_percentage: Option<FailurePercentageConfig>,
}

/// `[outbound.outlier.success_rate]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct SuccessRateConfig {
    /// Endpoints with `request_volume` tries in the interval needed to run the mode.
    pub min_hosts: u32,
    /// Tries in the interval for an endpoint to be judged (and to count towards `min_hosts`).
    pub request_volume: u32,
    /// Eject below `mean - stdev_factor * stdev` of the judged endpoints' success rates.
    pub stdev_factor: f64,
}

/// `[outbound.outlier.failure_percentage]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FailurePercentageConfig {
    /// Eject an endpoint whose failures are at least this percent of its tries in the interval.
    pub threshold: u32,
    /// Endpoints the cluster needs to run the mode.
    pub min_hosts: u32,
    /// Tries in the interval for an endpoint to be judged.
    pub request_volume: u32,
}

/// How a try ended, as outlier detection sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status (a 5xx is a failure, the rest a success).
    Response(u16),
    /// A TCP connection was made (TCP proxying: a success).
    Connected,
    /// The connection could not be made.
    ConnectFailed,
    /// The connection closed or reset before a response.
    Reset,
    /// No response in time (the try's or the request's deadline).
    Timeout,
}

/// An endpoint just ejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ejection {
    pub duration: Duration,
    pub reason: EjectionReason,
}

/// Outlier detection for one cluster: its settings; the state lives in the endpoints' stats.
#[derive(Clone, Debug)]
pub struct Outlier {
    config: OutlierConfig,
}

// === impl OutlierConfig ===

impl Default for OutlierConfig {
    fn default() -> Self {
        Self {
            consecutive_gateway_failures: 5,
            consecutive_5xx: 0,
            base_ejection_time: Dur::secs(30),
            max_ejection_time: Dur::secs(300),
            max_ejection_percent: 50,
            panic_threshold_percent: 0,
            interval: Dur::secs(10),
            success_rate: None,
            failure_percentage: None,
        }
    }
}

impl OutlierConfig {
    /// Every problem as `(key, message)`, keys under `key` (e.g. `outbound[0].outlier`).
    pub fn validate(&self, key: &str) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let mut bad = |k: &str, msg: String| p.push((format!("{key}.{k}"), msg));
        if self.base_ejection_time.get().is_zero() {
            bad("base_ejection_time", "must be greater than 0".into());
        }
        if self.max_ejection_time < self.base_ejection_time {
            bad(
                "max_ejection_time",
                format!(
                    "{} is less than base_ejection_time {}",
                    self.max_ejection_time, self.base_ejection_time
                ),
            );
        }
        for (k, v) in [
            ("max_ejection_percent", self.max_ejection_percent),
            ("panic_threshold_percent", self.panic_threshold_percent),
        ] {
            if v > 100 {
                bad(k, format!("{v} is out of range 0..=100"));
            }
        }
        if self.interval.get().is_zero() {
            bad("interval", "must be greater than 0".into());
        }
        if let Some(sr) = &self.success_rate {
            if sr.min_hosts == 0 {
                bad("success_rate.min_hosts", "must be at least 1".into());
            }
            if sr.request_volume == 0 {
                bad("success_rate.request_volume", "must be at least 1".into());
            }
            if !sr.stdev_factor.is_finite() || sr.stdev_factor < 0.0 {
                bad(
                    "success_rate.stdev_factor",
                    format!("{} must be a finite number >= 0", sr.stdev_factor),
                );
            }
        }
        if let Some(fp) = &self.failure_percentage {
            if fp.threshold > 100 {
                bad(
                    "failure_percentage.threshold",
                    format!("{} is out of range 0..=100", fp.threshold),
                );
            }
            if fp.min_hosts == 0 {
                bad("failure_percentage.min_hosts", "must be at least 1".into());
            }
            if fp.request_volume == 0 {
                bad("failure_percentage.request_volume", "must be at least 1".into());
            }
        }
        p
    }

    /// Whether a statistical mode is on (tries are then counted per interval).
    fn statistical(&self) -> bool {
        self.success_rate.is_some() || self.failure_percentage.is_some()
    }
}

impl Default for SuccessRateConfig {
    fn default() -> Self {
        Self {
            min_hosts: 5,
            request_volume: 100,
            stdev_factor: 1.9,
        }
    }
}

impl Default for FailurePercentageConfig {
    fn default() -> Self {
        Self {
            threshold: 85,
            min_hosts: 5,
            request_volume: 50,
        }
    }
}

// === impl Outcome ===

impl Outcome {
    /// A gateway failure: connect failure, reset, timeout, 502/503/504.
    pub fn is_gateway_failure(self) -> bool {
        match self {
            Self::Response(s) => (502..=504).contains(&s),
            Self::Connected => false,
            Self::ConnectFailed | Self::Reset | Self::Timeout => true,
        }
    }

    /// A server failure: any 5xx, or a local failure (counted as a 5xx, as Envoy does when it
    /// does not split local and upstream errors).
    pub fn is_failure(self) -> bool {
        match self {
            Self::Response(s) => (500..=599).contains(&s),
            Self::Connected => false,
            Self::ConnectFailed | Self::Reset | Self::Timeout => true,
        }
    }
}

impl Outcome {
    /// How outlier detection sees a try; `None` when the endpoint played no part (the
    /// breaker refused to dial: nothing was sent). The request's overall deadline counts as a
    /// timeout of the endpoint too: the try was in flight for the whole of the time left.
    pub fn of_try(t: TryOutcome) -> Option<Self> {
        Some(match t {
            TryOutcome::ConnectFailed => Self::ConnectFailed,
            TryOutcome::Reset => Self::Reset,
            TryOutcome::Timeout | TryOutcome::PerTryTimeout => Self::Timeout,
            TryOutcome::Status(s) => Self::Response(s),
            TryOutcome::Connected => Self::Connected,
            TryOutcome::Refused | TryOutcome::ClientBodyTimeout => return None,
        })
    }
}

// === impl Outlier ===

impl Default for Outlier {
    fn default() -> Self {
        Self::from_config(&OutlierConfig::default())
    }
}

impl Outlier {
    pub fn from_config(config: &OutlierConfig) -> Self {
        Self { config: config.clone() }
    }

    pub fn config(&self) -> &OutlierConfig {
        &self.config
    }

    /// The healthy panic threshold for the cluster's endpoint sets.
    pub fn panic_threshold_percent(&self) -> u32 {
        self.config.panic_threshold_percent
    }

    /// Time between [`Self::sweep`]s.
    pub fn interval(&self) -> Duration {
        self.config.interval.get()
    }

    /// `(base_ejection_time, max_ejection_time)`.
    fn ejection_times(&self) -> (Duration, Duration) {
        (
            self.config.base_ejection_time.get(),
            self.config.max_ejection_time.get(),
        )
    }

    /// Records how a try to `ep` (an endpoint of `set`) ended at `now`; returns the ejection
    /// when this try's consecutive failures ejected it.
    pub fn observe(&self, set: &EndpointSet, ep: &Endpoint, outcome: Outcome, now: Instant) -> Option<Ejection> {
        let failed = outcome.is_failure();
        if self.config.statistical() {
            ep.stats.count_interval(!failed);
        }
        let counts = ep.stats.count_consecutive(outcome.is_gateway_failure(), failed);
        if !failed || ep.stats.is_ejected_at(now) {
            return None;
        }
        let reached = |threshold: u32, count: u32| threshold > 0 && count >= threshold;
        let reason = if reached(self.config.consecutive_gateway_failures, counts.gateway) {
            EjectionReason::ConsecutiveGateway
        } else if reached(self.config.consecutive_5xx, counts.five_xx) {
            EjectionReason::Consecutive5xx
        } else {
            return None;
        };
        self.eject(set, ep, reason, now)
    }

    /// Runs the statistical modes over the interval's counts and starts the next interval;
    /// forgives one ejection of each endpoint back in service for a whole interval. The owner
    /// calls it every [`Self::interval`], whether or not a statistical mode is on. Returns
    /// the endpoints ejected (indexes into `set`), worst first per mode.
    pub fn sweep(&self, set: &EndpointSet, now: Instant) -> Vec<(usize, Ejection)> {
        let eps = set.endpoints();
        let counts: Vec<IntervalCounts> = eps.iter().map(|e| e.stats.take_interval()).collect();
        for e in eps {
            e.stats.forgive_at(now, self.interval());
        }
        let mut out = Vec::new();
        let mut candidates = Vec::new();
        if let Some(sr) = &self.config.success_rate {
            candidates.extend(
                success_rate_outliers(&counts, sr)
                    .into_iter()
                    .map(|i| (i, EjectionReason::SuccessRate)),
            );
        }
        if let Some(fp) = &self.config.failure_percentage {
            candidates.extend(
                failure_percentage_outliers(&counts, fp)
                    .into_iter()
                    .map(|i| (i, EjectionReason::FailurePercentage)),
            );
        }
        for (i, reason) in candidates {
            if eps[i].stats.is_ejected_at(now) {
                continue;
            }
            if let Some(e) = self.eject(set, &eps[i], reason, now) {
                out.push((i, e));
            }
        }
        out
    }

    /// Ejects `ep` unless that would eject more of `set` than allowed.
    fn eject(&self, set: &EndpointSet, ep: &Endpoint, reason: EjectionReason, now: Instant) -> Option<Ejection> {
        let limit = max_ejected(set.endpoints().len(), self.config.max_ejection_percent);
        let ejected = set.endpoints().iter().filter(|e| e.stats.is_ejected_at(now)).count();
        if ejected >= limit {
            return None;
        }
        let (base, max) = self.ejection_times();
        let duration = ep.stats.eject_at(now, base, max, reason);
        Some(Ejection { duration, reason })
    }
}

/// How many of `n` endpoints may be ejected at once: `percent` of them rounded down, but at
/// least one of two or more; none at 0%.
pub fn max_ejected(n: usize, percent: u32) -> usize {
    let share = n * percent.min(100) as usize / 100;
    if percent > 0 && n >= 2 {
        share.max(1)
    } else {
        share
    }
}

/// Endpoints whose success rate is below `mean - stdev_factor * stdev` of those with
/// `request_volume` tries, when at least `min_hosts` have; lowest rate first.
fn success_rate_outliers(counts: &[IntervalCounts], cfg: &SuccessRateConfig) -> Vec<usize> {
    let judged: Vec<(usize, f64)> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| c.total > 0 && c.total >= u64::from(cfg.request_volume))
        .map(|(i, c)| (i, c.success as f64 / c.total as f64))
        .collect();
    if judged.is_empty() || judged.len() < cfg.min_hosts as usize {
        return Vec::new();
    }
    let n = judged.len() as f64;
    let mean = judged.iter().map(|(_, r)| r).sum::<f64>() / n;
    let stdev = (judged.iter().map(|(_, r)| (r - mean).powi(2)).sum::<f64>() / n).sqrt();
    // Rates are in 0..=1; the margin keeps rounding noise from ejecting among equals.
    let threshold = mean - cfg.stdev_factor * stdev - 1e-9;
    let mut out: Vec<(usize, f64)> = judged.into_iter().filter(|&(_, r)| r < threshold).collect();
    out.sort_by(|a, b| a.1.total_cmp(&b.1));
    out.into_iter().map(|(i, _)| i).collect()
}

/// Endpoints with `request_volume` tries whose failures reach `threshold` percent, when the
/// cluster has `min_hosts` endpoints (Envoy counts the cluster here, not the judged ones);
/// highest percentage first.
fn failure_percentage_outliers(counts: &[IntervalCounts], cfg: &FailurePercentageConfig) -> Vec<usize> {
    if counts.len() < cfg.min_hosts as usize {
        return Vec::new();
    }
    let mut out: Vec<(usize, u64, u64)> = counts
        .iter()
        .enumerate()
        .filter(|(_, c)| c.total > 0 && c.total >= u64::from(cfg.request_volume))
        .map(|(i, c)| (i, c.total - c.success.min(c.total), c.total))
        // failures / total >= threshold / 100, in integers.
        .filter(|&(_, f, t)| u128::from(f) * 100 >= u128::from(cfg.threshold) * u128::from(t))
        .collect();
    // Highest failure share first: a/b > c/d <=> a*d > c*b.
    out.sort_by(|a, b| (u128::from(b.1) * u128::from(a.2)).cmp(&(u128::from(a.1) * u128::from(b.2))));
    out.into_iter().map(|(i, _, _)| i).collect()
}

#[cfg(test)]
mod tests;
