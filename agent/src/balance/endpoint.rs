//! An upstream endpoint and its live statistics (in-flight, peak-EWMA latency, failures,
//! ejection state for outlier detection).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::Authority;

use crate::telemetry::metrics::RequestMetrics;
use crate::upstream::pool::ConnPool;

/// One endpoint of a cluster. Shared (`Arc`) between endpoint-set snapshots so its statistics
/// survive a config reload or a discovery update.
#[derive(Debug)]
pub struct Endpoint {
    pub addr: SocketAddr,
    /// `addr` as an URI authority, built once.
    pub authority: Authority,
    pub weight: u32,
    /// Environment, zone, version, colour and source.
    pub labels: Arc<Labels>,
    /// Shared with the same endpoint in later sets (a new weight keeps the statistics).
    pub stats: Arc<EndpointStats>,
    /// Request metrics labelled with this endpoint's direction, service and env.
    pub metrics: RequestMetrics,
    /// Idle HTTP/1.1 connections to this endpoint, shared like `stats`.
    pub pool: Arc<ConnPool>,
}

/// The environment an endpoint runs in. Anything a registry says besides `vm` and `k8s` is
/// `Other`, so registry metadata never reaches a metric label unmapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub enum Env {
    #[default]
    Vm,
    K8s,
    Other,
}

/// Where an endpoint was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Source {
    #[default]
    Static,
    Consul,
    Etcd,
    Kubernetes,
    /// The agent's in-process registry (`[registry] kind = "memory"`).
    Memory,
    /// The last known set kept in the state store (the registry has not answered yet).
    Store,
}

/// What callers know of an endpoint besides its address and weight.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Labels {
    pub env: Env,
    /// Locality (empty: unknown).
    pub zone: Box<str>,
    pub version: Box<str>,
    pub colour: Box<str>,
    pub source: Source,
}

/// Lock-free statistics read by the balancers and written by the request path.
///
/// Ejection state is a deadline (nanoseconds since the stats' creation), so an endpoint
/// returns to service by itself when the deadline passes; the `*_at(now)` methods take the
/// time explicitly so tests drive it without sleeping.
#[derive(Debug)]
pub struct EndpointStats {
    in_flight: AtomicU64,
    /// Peak-EWMA round-trip time in nanoseconds, as f64 bits.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, nanoseconds since `epoch`.
    ewma_stamp: AtomicU64,
    /// Consecutive gateway failures (connect failure, reset, timeout, 502/503/504).
    consecutive_failures: AtomicU32,
    /// Consecutive 5xx of any kind, local failures included.
    consecutive_5xx: AtomicU32,
    /// The ejection multiplier: ejections not yet forgiven.
    ejections: AtomicU32,
    /// Ejected until this many nanoseconds since `epoch` (0: never ejected).
    ejected_until: AtomicU64,
    /// Ejections ever (admin status).
    ejected_total: AtomicU64,
    /// [`EjectionReason::code`] of the latest ejection (0: none yet).
    last_reason: AtomicU8,
    /// This interval's tries for the statistical outlier modes: total in the high 32 bits,
    /// successes in the low 32, in one word so a sweep takes both at once.
    interval: AtomicU64,
    epoch: Instant,
}

/// Why an endpoint was ejected: a bounded set, usable as a metric label.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EjectionReason {
    /// Consecutive gateway failures (connect failure, reset, timeout, 502/503/504).
    ConsecutiveGateway,
    /// Consecutive 5xx responses (500 included) or local failures.
    Consecutive5xx,
    /// Success rate below the cluster's mean by more than `stdev_factor` deviations.
    SuccessRate,
    /// Failure percentage at or above the threshold.
    FailurePercentage,
}

/// An endpoint's ejection state, for the admin API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EjectionStatus {
    /// When the current ejection ends; `None` when not ejected.
    pub ejected_until: Option<Instant>,
    /// Time left of the current ejection; `None` when not ejected.
    pub remaining: Option<Duration>,
    /// Ejections since the endpoint was first seen.
    pub times_ejected: u64,
    /// The current ejection multiplier (the next ejection lasts `base * (multiplier + 1)`).
    pub multiplier: u32,
    /// Why it was last ejected; `None` if never.
    pub last_reason: Option<EjectionReason>,
}

/// An interval's tries of one endpoint, taken by an outlier sweep.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IntervalCounts {
    pub success: u64,
    pub total: u64,
}

/// The consecutive-failure counts after a try.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Consecutive {
    pub gateway: u32,
    pub five_xx: u32,
}

/// Decay time of the peak-EWMA (Finagle/Linkerd use 10 s).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint never measured (and the value an idle endpoint's
/// estimate decays to): optimistic, so new and recovered endpoints get probed.
const EWMA_DEFAULT_NS: f64 = 100_000.0;

// === impl Env ===

impl Env {
    /// `vm` and `k8s` as they are; everything else is `Other`.
    pub fn parse(s: &str) -> Self {
        match s {
            "vm" => Self::Vm,
            "k8s" => Self::K8s,
            _ => Self::Other,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Vm => "vm",
            Self::K8s => "k8s",
            Self::Other => "other",
        }
    }
}

impl Source {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Static => "static",
            Self::Consul => "consul",
            Self::Etcd => "etcd",
            Self::Kubernetes => "kubernetes",
            Self::Memory => "memory",
            Self::Store => "store",
        }
    }
}

impl Labels {
    /// Labels with only an environment.
    pub fn env(env: Env) -> Self {
        Self { env, ..Self::default() }
    }
}

// === impl Endpoint ===

impl Endpoint {
    pub fn new(addr: SocketAddr, weight: u32, labels: Arc<Labels>, metrics: RequestMetrics) -> Self {
        // A SocketAddr always renders as a valid authority.
        let authority = Authority::try_from(addr.to_string()).unwrap_or_else(|_| Authority::from_static("invalid"));
        Self {
            addr,
            authority,
            weight,
            labels,
            stats: Arc::new(EndpointStats::new()),
            metrics,
            pool: Arc::new(ConnPool::new(addr)),
        }
    }

    /// The same endpoint (statistics and metrics shared) with another weight.
    pub fn reweighted(&self, weight: u32) -> Self {
        Self {
            addr: self.addr,
            authority: self.authority.clone(),
            weight,
            labels: self.labels.clone(),
            stats: self.stats.clone(),
            metrics: self.metrics.clone(),
            pool: self.pool.clone(),
        }
    }

    pub fn env(&self) -> Env {
        self.labels.env
    }

    /// Counts a request to this endpoint until the guard drops.
    pub fn start(self: &Arc<Self>) -> InFlight {
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }
}

// === impl EndpointStats ===

impl EndpointStats {
    pub fn new() -> Self {
        Self {
            in_flight: AtomicU64::new(0),
            ewma_ns: AtomicU64::new(EWMA_DEFAULT_NS.to_bits()),
            ewma_stamp: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            consecutive_5xx: AtomicU32::new(0),
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            ejected_total: AtomicU64::new(0),
            last_reason: AtomicU8::new(0),
            interval: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// `now` as nanoseconds since `epoch` (0 for an instant before it).
    fn ns_at(&self, now: Instant) -> u64 {
        nanos(now.saturating_duration_since(self.epoch))
    }

    /// The decayed peak-EWMA latency now, in nanoseconds.
    pub fn ewma_ns(&self) -> f64 {
        self.decayed(self.now_ns())
    }

    /// The decayed peak-EWMA latency at `now` (one clock read for several endpoints).
    pub fn ewma_ns_at(&self, now: Instant) -> f64 {
        self.decayed(self.ns_at(now))
    }

    fn decayed(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let stamp = self.ewma_stamp.load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(stamp) as f64;
        // Decay towards the default, not towards zero, so an idle endpoint is not idealised.
        let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
        EWMA_DEFAULT_NS + (ewma - EWMA_DEFAULT_NS) * w
    }

    /// Records the round-trip time of a try that ended at `at` (the caller's clock read): a peak
    /// jumps in at once, lower values are averaged in.
    pub fn observe_rtt(&self, rtt: Duration, at: Instant) {
        let now = self.ns_at(at);
        let rtt = rtt.as_nanos() as f64;
        let cur = self.decayed(now);
        let next = if rtt > cur {
            rtt
        } else {
            let stamp = self.ewma_stamp.load(Ordering::Relaxed);
            let elapsed = now.saturating_sub(stamp) as f64;
            let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
            cur * w + rtt * (1.0 - w)
        };
        // Races between two writers lose one sample; the estimate stays sound.
        self.ewma_ns.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_stamp.store(now, Ordering::Relaxed);
    }

    pub fn is_ejected(&self) -> bool {
        // Never ejected (the common case): no clock read.
        self.ejected_until.load(Ordering::Relaxed) != 0 && self.is_ejected_at(Instant::now())
    }

    /// Whether the endpoint is ejected at `now`.
    pub fn is_ejected_at(&self, now: Instant) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && self.ns_at(now) < until
    }

    /// Ejects from `now` for `base * multiplier`, capped at `max`, as Envoy: the multiplier
    /// grows by one per ejection while `base * multiplier` is below `max` (so it decays from
    /// the cap in a bounded number of intervals, see [`Self::forgive_at`]). Returns the duration.
    pub fn eject_at(&self, now: Instant, base: Duration, max: Duration, reason: EjectionReason) -> Duration {
        let below_cap = |m: u32| base.saturating_mul(m) < max;
        let prev = self
            .ejections
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| {
                Some(if below_cap(m) { m.saturating_add(1) } else { m })
            })
            .unwrap_or_else(|m| m); // the closure always returns Some
        let m = if below_cap(prev) { prev.saturating_add(1) } else { prev };
        let d = base.saturating_mul(m.max(1)).min(max);
        self.set_ejected(self.ns_at(now), d, reason);
        d
    }

    fn set_ejected(&self, from_ns: u64, d: Duration, reason: EjectionReason) {
        let until = from_ns.saturating_add(nanos(d));
        self.ejected_until.store(until.max(1), Ordering::Relaxed);
        self.ejected_total.fetch_add(1, Ordering::Relaxed);
        self.last_reason.store(reason.code(), Ordering::Relaxed);
        // Back in service, the endpoint starts from clean counts (as Envoy on unejection).
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.consecutive_5xx.store(0, Ordering::Relaxed);
    }

    /// Forgives one ejection when the endpoint has been back in service for at least `quiet`
    /// at `now` (Envoy decrements the multiplier once per healthy sweep interval).
    pub fn forgive_at(&self, now: Instant, quiet: Duration) {
        let until = self.ejected_until.load(Ordering::Relaxed);
        if until != 0 && self.ns_at(now) >= until.saturating_add(nanos(quiet)) {
            // Err: already 0, nothing to forgive.
            let _ = self
                .ejections
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |m| m.checked_sub(1));
        }
    }

    /// Counts a try for the consecutive modes: a gateway failure (connect failure, reset,
    /// timeout, 502/503/504) and/or a server failure (any 5xx or local failure). A try that is
    /// not a failure of a kind resets that kind's count.
    pub fn count_consecutive(&self, gateway: bool, server: bool) -> Consecutive {
        let bump = |c: &AtomicU32, failed: bool| {
            if failed {
                c.fetch_add(1, Ordering::Relaxed).saturating_add(1)
            } else {
                if c.load(Ordering::Relaxed) != 0 {
                    c.store(0, Ordering::Relaxed);
                }
                0
            }
        };
        Consecutive {
            gateway: bump(&self.consecutive_failures, gateway),
            five_xx: bump(&self.consecutive_5xx, server),
        }
    }

    /// Counts a try in this interval's success/total counts. Whoever counts takes the counts
    /// each interval ([`Self::take_interval`]): 2^32 tries in one interval would overflow.
    pub fn count_interval(&self, success: bool) {
        self.interval
            .fetch_add((1 << 32) | u64::from(success), Ordering::Relaxed);
    }

    /// Takes this interval's counts and starts the next interval from zero.
    pub fn take_interval(&self) -> IntervalCounts {
        let v = self.interval.swap(0, Ordering::Relaxed);
        IntervalCounts {
            success: v & u64::from(u32::MAX),
            total: v >> 32,
        }
    }

    /// The ejection state at `now`.
    pub fn ejection_status(&self, now: Instant) -> EjectionStatus {
        let until = self.ejected_until.load(Ordering::Relaxed);
        let now_ns = self.ns_at(now);
        let ejected = until != 0 && now_ns < until;
        EjectionStatus {
            ejected_until: ejected.then(|| self.epoch + Duration::from_nanos(until)),
            remaining: ejected.then(|| Duration::from_nanos(until - now_ns)),
            times_ejected: self.ejected_total.load(Ordering::Relaxed),
            multiplier: self.ejections.load(Ordering::Relaxed),
            last_reason: EjectionReason::from_code(self.last_reason.load(Ordering::Relaxed)),
        }
    }
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self::new()
    }
}

// === impl EjectionReason ===

impl EjectionReason {
    pub const ALL: [Self; 4] = [
        Self::ConsecutiveGateway,
        Self::Consecutive5xx,
        Self::SuccessRate,
        Self::FailurePercentage,
    ];

    /// The metric label and admin API value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ConsecutiveGateway => "consecutive_gateway",
            Self::Consecutive5xx => "consecutive_5xx",
            Self::SuccessRate => "success_rate",
            Self::FailurePercentage => "failure_percentage",
        }
    }

    fn code(self) -> u8 {
        match self {
            Self::ConsecutiveGateway => 1,
            Self::Consecutive5xx => 2,
            Self::SuccessRate => 3,
            Self::FailurePercentage => 4,
        }
    }

    fn from_code(code: u8) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.code() == code)
    }
}

impl std::fmt::Display for EjectionReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

// === impl InFlight ===

/// A request in flight to an endpoint; decrements the endpoint's count on drop.
#[derive(Debug)]
pub struct InFlight(Arc<Endpoint>);

impl InFlight {
    pub fn endpoint(&self) -> &Arc<Endpoint> {
        &self.0
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A duration in nanoseconds, saturating (u64 nanoseconds last 584 years).
fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let s = EndpointStats::new();
        s.observe_rtt(Duration::from_millis(50), Instant::now());
        assert!((s.ewma_ns() - 50e6).abs() < 1e6, "{}", s.ewma_ns());
        s.observe_rtt(Duration::from_micros(10), Instant::now());
        assert!(s.ewma_ns() <= 50e6);
    }

    #[test]
    fn eject_at_grows_by_base_caps_and_ends_at_the_deadline() {
        let s = EndpointStats::new();
        let (base, max) = (Duration::from_secs(30), Duration::from_secs(100));
        let t = Instant::now();
        let got: Vec<u64> = (0..5)
            .map(|_| s.eject_at(t, base, max, EjectionReason::SuccessRate).as_secs())
            .collect();
        assert_eq!(got, [30, 60, 90, 100, 100]);
        assert!(s.is_ejected_at(t + Duration::from_secs(99)));
        assert!(!s.is_ejected_at(t + Duration::from_secs(100)));
        let status = s.ejection_status(t);
        assert_eq!((status.times_ejected, status.multiplier), (5, 4));
        assert_eq!(status.last_reason, Some(EjectionReason::SuccessRate));
        // Forgiven once per quiet interval after the deadline, down to zero.
        let quiet = Duration::from_secs(10);
        s.forgive_at(t + Duration::from_secs(105), quiet);
        assert_eq!(s.ejection_status(t).multiplier, 4);
        for k in 0..6 {
            s.forgive_at(t + Duration::from_secs(110 + 10 * k), quiet);
        }
        assert_eq!(s.ejection_status(t).multiplier, 0);
    }

    #[test]
    fn consecutive_counts_reset_per_kind() {
        let s = EndpointStats::new();
        assert_eq!(s.count_consecutive(true, true), Consecutive { gateway: 1, five_xx: 1 });
        assert_eq!(s.count_consecutive(false, true), Consecutive { gateway: 0, five_xx: 2 });
        assert_eq!(s.count_consecutive(true, true), Consecutive { gateway: 1, five_xx: 3 });
        assert_eq!(s.count_consecutive(false, false), Consecutive::default());
        s.count_consecutive(true, true);
        s.eject_at(
            Instant::now(),
            Duration::from_secs(1),
            Duration::from_secs(1),
            EjectionReason::Consecutive5xx,
        );
        assert_eq!(s.count_consecutive(true, true), Consecutive { gateway: 1, five_xx: 1 });
    }

    #[test]
    fn interval_counts_are_taken_whole() {
        let s = EndpointStats::new();
        for k in 0..10 {
            s.count_interval(k % 5 != 0);
        }
        assert_eq!(s.take_interval(), IntervalCounts { success: 8, total: 10 });
        assert_eq!(s.take_interval(), IntervalCounts::default());
    }

    #[test]
    fn in_flight_guard_counts() {
        let e = &crate::balance::test_support::endpoints(&[1])[0];
        let a = e.start();
        let b = e.start();
        assert_eq!(e.stats.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(e.stats.in_flight(), 0);
    }
}
