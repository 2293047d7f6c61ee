//! An upstream endpoint and its live statistics (in-flight, peak-EWMA latency, failures).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::uri::Authority;

use crate::proxy::pool::ConnPool;
use crate::telemetry::metrics::RequestMetrics;

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
#[derive(Debug)]
pub struct EndpointStats {
    in_flight: AtomicU64,
    /// Peak-EWMA round-trip time in nanoseconds, as f64 bits.
    ewma_ns: AtomicU64,
    /// When `ewma_ns` was last updated, nanoseconds since `epoch`.
    ewma_stamp: AtomicU64,
    consecutive_failures: AtomicU32,
    ejections: AtomicU32,
    /// Ejected until this many nanoseconds since `epoch` (0: not ejected).
    ejected_until: AtomicU64,
    epoch: Instant,
}

/// Decay time of the peak-EWMA (Finagle/Linkerd use 10 s).
const EWMA_DECAY: Duration = Duration::from_secs(10);
/// The latency assumed for an endpoint never measured (and the value an idle endpoint's
/// estimate decays to): optimistic, so new and recovered endpoints get probed.
const EWMA_DEFAULT_NS: f64 = 100_000.0;

// === impl Endpoint ===

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
            ejections: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }

    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    fn now_ns(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
    }

    /// The decayed peak-EWMA latency now, in nanoseconds.
    pub fn ewma_ns(&self) -> f64 {
        self.decayed(self.now_ns())
    }

    fn decayed(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma_ns.load(Ordering::Relaxed));
        let stamp = self.ewma_stamp.load(Ordering::Relaxed);
        let elapsed = now.saturating_sub(stamp) as f64;
        // Decay towards the default, not towards zero, so an idle endpoint is not idealised.
        let w = (-elapsed / EWMA_DECAY.as_nanos() as f64).exp();
        EWMA_DEFAULT_NS + (ewma - EWMA_DEFAULT_NS) * w
    }

    /// Records a round-trip time: a peak jumps in at once, lower values are averaged in.
    pub fn observe_rtt(&self, rtt: Duration) {
        let now = self.now_ns();
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

    /// Counts a success: resets the consecutive-failure count.
    pub fn success(&self) {
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
    }

    /// Counts a failure; returns the consecutive count.
    pub fn failure(&self) -> u32 {
        self.consecutive_failures.fetch_add(1, Ordering::Relaxed) + 1
    }

    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until.load(Ordering::Relaxed);
        until != 0 && self.now_ns() < until
    }

    /// Ejects for `base * 2^(ejections so far)`, capped at `max`; returns the duration.
    pub fn eject(&self, base: Duration, max: Duration) -> Duration {
        let n = self.ejections.fetch_add(1, Ordering::Relaxed).min(16);
        let d = base.saturating_mul(1 << n).min(max);
        let until = self
            .now_ns()
            .saturating_add(u64::try_from(d.as_nanos()).unwrap_or(u64::MAX));
        self.ejected_until.store(until.max(1), Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        d
    }

    /// Ends an ejection early (the endpoint answered well after its ejection ended).
    pub fn reset_ejections(&self) {
        if self.ejections.load(Ordering::Relaxed) != 0 && !self.is_ejected() {
            self.ejections.store(0, Ordering::Relaxed);
        }
    }
}

impl Default for EndpointStats {
    fn default() -> Self {
        Self::new()
    }
}

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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let s = EndpointStats::new();
        s.observe_rtt(Duration::from_millis(50));
        assert!((s.ewma_ns() - 50e6).abs() < 1e6, "{}", s.ewma_ns());
        s.observe_rtt(Duration::from_micros(10));
        assert!(s.ewma_ns() <= 50e6);
    }

    #[test]
    fn ejection_doubles_and_caps() {
        let s = EndpointStats::new();
        let base = Duration::from_secs(30);
        let max = Duration::from_secs(300);
        assert_eq!(s.eject(base, max), base);
        assert!(s.is_ejected());
        assert_eq!(s.eject(base, max), base * 2);
        assert_eq!(s.eject(base, max), base * 4);
        for _ in 0..10 {
            s.eject(base, max);
        }
        assert_eq!(s.eject(base, max), max);
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
