//! Adaptive concurrency limit for inbound traffic: a gradient controller (after Envoy's adaptive
//! concurrency filter and Netflix's Gradient limits) that learns from round-trip times how many
//! requests the local app takes at once, plus CPU shedding (after Kratos BBR) while the host is hot.
//!
//! How the limit moves:
//! - Every `sample_interval`, the `percentile` of the interval's RTTs (`sample_rtt`) is compared
//!   with the minimum RTT: `gradient = min_rtt * (1 + buffer) / sample_rtt`, clamped to
//!   [0.5, 2.0], and `limit = floor(limit * gradient + sqrt(limit * gradient))`, clamped to
//!   [`min_limit`, `max_limit`]. The square root is burst headroom, and lets a limit grow while
//!   latency is flat.
//! - Every `min_rtt_interval` (plus up to `jitter_percent` of it, so a fleet does not re-measure
//!   in step), and after 5 intervals in a row at `min_limit` (the app got slower for good), the
//!   limit is pinned to `min_limit` until `min_rtt_requests` requests admitted after the pin
//!   complete; their `percentile` is the new min RTT, then the limit before the pin is restored.
//! - The first min RTT is measured at `initial_limit` rather than pinned: a new instance gets
//!   little traffic during its slow-start ramp anyway, and pinning would turn every restart into
//!   a burst of 503s.
//! - While host CPU is above `cpu_threshold_percent`, the limit is further capped by the
//!   capacity measured over `capacity_window` (Little's law: the most requests completed in one
//!   interval, times the lowest mean RTT of an interval, per interval), never below `min_limit`.
//!
//! The request path touches atomics only (`try_acquire`, dropping a `Guard`); `Guard::record`
//! takes a short mutex to store the sample, and the first record after an interval ends
//! recomputes the limit inline, so no task runs in the background and tests pass explicit times.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::cpu::CpuGauge;
use crate::config::Dur;

/// Adaptive concurrency limit of the inbound listener (a section of `[inbound]`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveConfig {
    /// Lowest concurrency limit, and the limit while the minimum RTT is re-measured.
    pub min_limit: u32,
    /// Highest concurrency limit.
    pub max_limit: u32,
    /// Limit from start-up until the first gradient step (the first min RTT is measured at it).
    pub initial_limit: u32,
    /// How often the limit is recomputed from the RTTs sampled during the interval.
    pub sample_interval: Dur,
    /// Percentile of an interval's RTTs taken as its RTT, and of the min-RTT samples taken as
    /// the minimum RTT; in (0, 100].
    pub percentile: f64,
    /// How often the minimum RTT is re-measured (plus jitter).
    pub min_rtt_interval: Dur,
    /// Requests sampled at `min_limit` per minimum-RTT measurement.
    pub min_rtt_requests: u32,
    /// Random delay added to `min_rtt_interval`, up to this percent of it (0..=100).
    pub jitter_percent: u32,
    /// How far, in percent of the minimum RTT, latency may rise before the limit falls (0..=100).
    pub buffer_percent: u32,
    /// Host CPU use (percent) above which admission is also capped by the measured capacity;
    /// 0 turns CPU shedding off.
    pub cpu_threshold_percent: u32,
    /// Window over which the capacity for CPU shedding is measured.
    pub capacity_window: Dur,
}

/// A point-in-time view of a limiter, for `/clusters` and metrics.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AdaptiveStatus {
    /// Limit from the gradient (`min_limit` while the minimum RTT is measured).
    pub limit: u32,
    /// Limit enforced now: `limit`, capped by `capacity` while the CPU is above threshold.
    pub effective_limit: u32,
    pub in_flight: u32,
    /// Last measured minimum RTT (None until the first measurement ends).
    pub min_rtt_ms: Option<f64>,
    /// RTT percentile of the last interval that had samples.
    pub sample_rtt_ms: Option<f64>,
    /// Requests refused since start (any reason).
    pub shed_total: u64,
    /// Of `shed_total`, the requests only the CPU cap refused.
    pub cpu_shed_total: u64,
    pub cpu_percent: u32,
    /// Measured concurrency capacity (None until an interval with samples has ended).
    pub capacity: Option<u32>,
    /// A minimum-RTT measurement is under way.
    pub measuring_min_rtt: bool,
}

/// The adaptive limiter of one listener, shared by its connections through an `Arc`.
#[derive(Debug)]
pub struct AdaptiveLimiter {
    params: Params,
    cpu: CpuGauge,
    /// Zero of the nanosecond clock used inside (the `now` given to `new`).
    epoch: Instant,
    in_flight: AtomicU32,
    /// The gradient limit, published from `State::limit`.
    limit: AtomicU32,
    /// Measured capacity (0: unknown).
    capacity: AtomicU32,
    /// Published from `State` for `status` (0: unknown).
    min_rtt_ns: AtomicU64,
    sample_rtt_ns: AtomicU64,
    measuring: AtomicBool,
    shed_total: AtomicU64,
    cpu_shed_total: AtomicU64,
    state: Mutex<State>,
}

/// One admitted request. Dropping it releases the slot; `record` also feeds its RTT.
#[derive(Debug)]
#[must_use = "dropping the guard releases the slot at once"]
pub struct Guard {
    limiter: Arc<AdaptiveLimiter>,
    /// When it was admitted (limiter clock), so a min-RTT measurement can skip requests that
    /// were admitted before the limit was pinned.
    admitted_ns: u64,
}

/// Sanitised `AdaptiveConfig` in the units the controller computes with.
#[derive(Debug)]
struct Params {
    min_limit: u32,
    max_limit: u32,
    initial_limit: u32,
    interval_ns: u64,
    percentile: f64,
    min_rtt_interval_ns: u64,
    min_rtt_requests: usize,
    jitter: f64,
    buffer: f64,
    /// 0: CPU shedding off.
    cpu_threshold_permille: u32,
    window_ns: u64,
}

/// What the recomputation needs, behind the limiter's mutex.
#[derive(Debug)]
struct State {
    limit: u32,
    phase: Phase,
    min_rtt_ns: Option<u64>,
    /// End of the current sample interval (limiter clock).
    interval_end_ns: u64,
    /// Reservoir of successful RTTs of the current interval (at most `RESERVOIR`).
    samples: Vec<u64>,
    /// Successful RTTs offered to the reservoir this interval.
    seen: u64,
    /// Successful completions and their RTT sum this interval (capacity estimate).
    passed: u32,
    rtt_sum_ns: u64,
    /// Ended intervals inside `capacity_window`, oldest first.
    buckets: VecDeque<Bucket>,
    /// Consecutive recomputations that ended at `min_limit`.
    at_min_streak: u32,
    rng: fastrand::Rng,
}

#[derive(Debug)]
enum Phase {
    /// Sampling the minimum RTT; `restore` is the limit to go back to.
    Measuring {
        since_ns: u64,
        restore: u32,
        samples: Vec<u64>,
    },
    /// Following the gradient until the next measurement.
    Normal { next_measure_ns: u64 },
}

#[derive(Clone, Copy, Debug)]
struct Bucket {
    end_ns: u64,
    passed: u32,
    rtt_sum_ns: u64,
}

/// Samples kept per interval; past this, reservoir sampling keeps a uniform subset, so a
/// percentile costs a selection over at most this many values once per interval.
const RESERVOIR: usize = 1024;
/// Recomputations in a row at `min_limit` that trigger a minimum-RTT measurement (Envoy's 5).
const MIN_STREAK_REMEASURE: u32 = 5;
/// Bounds of the gradient (Envoy's).
const GRADIENT_MIN: f64 = 0.5;
const GRADIENT_MAX: f64 = 2.0;
/// Upper bound of `min_rtt_requests` and of intervals per `capacity_window` (memory bound).
const MAX_SAMPLES_CONFIG: u64 = 10_000;

// === impl AdaptiveConfig ===

impl Default for AdaptiveConfig {
    fn default() -> Self {
        Self {
            min_limit: 3,
            max_limit: 1000,
            initial_limit: 20,
            sample_interval: Dur::millis(100),
            percentile: 90.0,
            min_rtt_interval: Dur::secs(30),
            min_rtt_requests: 50,
            jitter_percent: 15,
            buffer_percent: 25,
            cpu_threshold_percent: 80,
            capacity_window: Dur::secs(10),
        }
    }
}

impl AdaptiveConfig {
    /// Every problem of this section, each as `"{key}.{field}: {message}"` (`key` is the
    /// section's own dotted key, e.g. `inbound.adaptive`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut p = Vec::new();
        let mut bad = |field: &str, msg: String| p.push(format!("{key}.{field}: {msg}"));
        let interval = self.sample_interval.get();
        if self.min_limit == 0 {
            bad("min_limit", "must be at least 1".into());
        }
        if self.max_limit < self.min_limit {
            bad(
                "max_limit",
                format!("{} is below min_limit ({})", self.max_limit, self.min_limit),
            );
        }
        if self.initial_limit < self.min_limit || self.initial_limit > self.max_limit {
            bad(
                "initial_limit",
                format!(
                    "{} is outside min_limit..=max_limit ({}..={})",
                    self.initial_limit, self.min_limit, self.max_limit
                ),
            );
        }
        if interval < Duration::from_millis(1) {
            bad("sample_interval", format!("{} is below 1ms", self.sample_interval));
        }
        // Written so that NaN fails too.
        if !(self.percentile > 0.0 && self.percentile <= 100.0) {
            bad("percentile", format!("{} is outside (0, 100]", self.percentile));
        }
        if self.min_rtt_interval.get() < interval || self.min_rtt_interval.get().is_zero() {
            bad(
                "min_rtt_interval",
                format!(
                    "{} is shorter than sample_interval ({})",
                    self.min_rtt_interval, self.sample_interval
                ),
            );
        }
        if self.min_rtt_requests == 0 || u64::from(self.min_rtt_requests) > MAX_SAMPLES_CONFIG {
            bad(
                "min_rtt_requests",
                format!("{} is out of range 1..={MAX_SAMPLES_CONFIG}", self.min_rtt_requests),
            );
        }
        for (field, v) in [
            ("jitter_percent", self.jitter_percent),
            ("buffer_percent", self.buffer_percent),
            ("cpu_threshold_percent", self.cpu_threshold_percent),
        ] {
            if v > 100 {
                bad(field, format!("{v} is out of range 0..=100"));
            }
        }
        let window = self.capacity_window.get();
        if window < interval {
            bad(
                "capacity_window",
                format!(
                    "{} is shorter than sample_interval ({})",
                    self.capacity_window, self.sample_interval
                ),
            );
        } else if !interval.is_zero() && window.as_nanos() / interval.as_nanos() > u128::from(MAX_SAMPLES_CONFIG) {
            bad(
                "capacity_window",
                format!(
                    "{} holds more than {MAX_SAMPLES_CONFIG} sample intervals",
                    self.capacity_window
                ),
            );
        }
        p
    }
}

// === impl Params ===

impl Params {
    /// Clamps what `validate` would refuse into something that works, so a limiter built from
    /// an unvalidated config still never panics or divides by zero.
    fn new(c: &AdaptiveConfig) -> Self {
        let min_limit = c.min_limit.max(1);
        let max_limit = c.max_limit.max(min_limit);
        let interval_ns = nanos(c.sample_interval.get()).max(1_000_000);
        let percentile = if c.percentile > 0.0 && c.percentile <= 100.0 {
            c.percentile
        } else {
            90.0
        };
        let cap = usize::try_from(MAX_SAMPLES_CONFIG).unwrap_or(usize::MAX);
        Self {
            min_limit,
            max_limit,
            initial_limit: c.initial_limit.clamp(min_limit, max_limit),
            interval_ns,
            percentile,
            min_rtt_interval_ns: nanos(c.min_rtt_interval.get()).max(interval_ns),
            min_rtt_requests: usize::try_from(c.min_rtt_requests).unwrap_or(cap).clamp(1, cap),
            jitter: f64::from(c.jitter_percent.min(100)) / 100.0,
            buffer: f64::from(c.buffer_percent.min(100)) / 100.0,
            cpu_threshold_permille: c.cpu_threshold_percent.min(100) * 10,
            window_ns: nanos(c.capacity_window.get())
                .clamp(interval_ns, interval_ns.saturating_mul(MAX_SAMPLES_CONFIG)),
        }
    }

    /// The next gradient limit from the current one and the interval's RTT.
    fn next_limit(&self, limit: u32, min_rtt_ns: u64, sample_rtt_ns: u64) -> u32 {
        let target = min_rtt_ns as f64 * (1.0 + self.buffer);
        let gradient = (target / sample_rtt_ns.max(1) as f64).clamp(GRADIENT_MIN, GRADIENT_MAX);
        let scaled = f64::from(limit) * gradient;
        // Truncated like Envoy and Netflix: with `ceil`, 5 would be a fixed point of the
        // steepest fall (ceil(2.5 + 1.58) = 5), so a min_limit below it could never be reached.
        let next = (scaled + scaled.sqrt()).floor();
        // In [min_limit, max_limit] after the clamp, so the cast is exact.
        next.clamp(f64::from(self.min_limit), f64::from(self.max_limit)) as u32
    }

    /// When the next min-RTT measurement starts, measured from `now_ns`.
    fn next_measure(&self, now_ns: u64, rng: &mut fastrand::Rng) -> u64 {
        let jitter = (self.min_rtt_interval_ns as f64 * self.jitter * rng.f64()) as u64;
        now_ns.saturating_add(self.min_rtt_interval_ns).saturating_add(jitter)
    }
}

// === impl AdaptiveLimiter ===

impl AdaptiveLimiter {
    /// A limiter starting at `initial_limit` at time `now`, reading host CPU from `cpu`. The
    /// config should have passed `validate`; out-of-range values are clamped.
    pub fn new(config: &AdaptiveConfig, cpu: CpuGauge, now: Instant) -> Arc<Self> {
        let params = Params::new(config);
        let state = State {
            limit: params.initial_limit,
            phase: Phase::Measuring {
                since_ns: 0,
                restore: params.initial_limit,
                samples: Vec::with_capacity(params.min_rtt_requests),
            },
            min_rtt_ns: None,
            interval_end_ns: params.interval_ns,
            samples: Vec::with_capacity(RESERVOIR),
            seen: 0,
            passed: 0,
            rtt_sum_ns: 0,
            buckets: VecDeque::new(),
            at_min_streak: 0,
            rng: fastrand::Rng::new(),
        };
        Arc::new(Self {
            limit: AtomicU32::new(params.initial_limit),
            params,
            cpu,
            epoch: now,
            in_flight: AtomicU32::new(0),
            capacity: AtomicU32::new(0),
            min_rtt_ns: AtomicU64::new(0),
            sample_rtt_ns: AtomicU64::new(0),
            measuring: AtomicBool::new(true),
            shed_total: AtomicU64::new(0),
            cpu_shed_total: AtomicU64::new(0),
            state: Mutex::new(state),
        })
    }

    /// Admits one request if fewer than `limit()` are in flight; None means shed it now (the
    /// caller answers 503 `OVERLOADED`). Lock-free.
    pub fn try_acquire(self: &Arc<Self>, now: Instant) -> Option<Guard> {
        let gradient_limit = self.limit.load(Ordering::Relaxed);
        let limit = self.effective(gradient_limit);
        let mut cur = self.in_flight.load(Ordering::Relaxed);
        loop {
            if cur >= limit {
                self.shed_total.fetch_add(1, Ordering::Relaxed);
                if cur < gradient_limit {
                    self.cpu_shed_total.fetch_add(1, Ordering::Relaxed);
                }
                return None;
            }
            match self
                .in_flight
                .compare_exchange_weak(cur, cur + 1, Ordering::AcqRel, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => cur = actual,
            }
        }
        Some(Guard {
            limiter: self.clone(),
            admitted_ns: self.clock(now),
        })
    }

    /// The limit enforced now: the gradient limit, capped by the measured capacity while the
    /// CPU is above the threshold.
    pub fn limit(&self) -> u32 {
        self.effective(self.limit.load(Ordering::Relaxed))
    }

    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    pub fn status(&self) -> AdaptiveStatus {
        let limit = self.limit.load(Ordering::Relaxed);
        let ms = |ns: u64| (ns != 0).then(|| ns as f64 / 1e6);
        let capacity = self.capacity.load(Ordering::Relaxed);
        AdaptiveStatus {
            limit,
            effective_limit: self.effective(limit),
            in_flight: self.in_flight(),
            min_rtt_ms: ms(self.min_rtt_ns.load(Ordering::Relaxed)),
            sample_rtt_ms: ms(self.sample_rtt_ns.load(Ordering::Relaxed)),
            shed_total: self.shed_total.load(Ordering::Relaxed),
            cpu_shed_total: self.cpu_shed_total.load(Ordering::Relaxed),
            cpu_percent: self.cpu.percent(),
            capacity: (capacity != 0).then_some(capacity),
            measuring_min_rtt: self.measuring.load(Ordering::Relaxed),
        }
    }

    fn effective(&self, gradient_limit: u32) -> u32 {
        let threshold = self.params.cpu_threshold_permille;
        if threshold == 0 || self.cpu.permille() <= threshold {
            return gradient_limit;
        }
        match self.capacity.load(Ordering::Relaxed) {
            // Nothing measured yet: nothing to cap by.
            0 => gradient_limit,
            cap => gradient_limit.min(cap.max(self.params.min_limit)),
        }
    }

    /// `t` on the limiter's nanosecond clock (times before `epoch` read as 0).
    fn clock(&self, t: Instant) -> u64 {
        nanos(t.saturating_duration_since(self.epoch))
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // Nothing in the critical sections panics short of a bug; should one, every field is
        // still a usable value, so the state is taken over rather than the request path failing.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn publish_limit(&self, st: &mut State, limit: u32) {
        st.limit = limit;
        self.limit.store(limit, Ordering::Relaxed);
    }

    /// One completed request: rolls the interval if it ended, then stores the sample.
    fn on_sample(&self, admitted_ns: u64, rtt: Duration, ok: bool, now: Instant) {
        let now_ns = self.clock(now);
        let rtt_ns = nanos(rtt);
        let mut guard = self.lock();
        let st = &mut *guard;
        if now_ns >= st.interval_end_ns {
            self.end_interval(st, now_ns);
        }
        if let Phase::Normal { next_measure_ns } = st.phase {
            if now_ns >= next_measure_ns {
                self.start_measuring(st, now_ns);
            }
        }
        // A failed request's RTT says nothing about the app's queue (a refused connection is
        // fast, a timeout is the deadline): it only releases its slot.
        if !ok {
            return;
        }
        st.passed = st.passed.saturating_add(1);
        st.rtt_sum_ns = st.rtt_sum_ns.saturating_add(rtt_ns);
        let measured_enough = match &mut st.phase {
            // Requests admitted before the pin ran at the old concurrency: not a minimum.
            Phase::Measuring { since_ns, samples, .. } => {
                if admitted_ns >= *since_ns {
                    samples.push(rtt_ns);
                }
                samples.len() >= self.params.min_rtt_requests
            }
            Phase::Normal { .. } => {
                st.seen += 1;
                if st.samples.len() < RESERVOIR {
                    st.samples.push(rtt_ns);
                } else {
                    let j = st.rng.u64(0..st.seen);
                    if let Some(slot) = usize::try_from(j).ok().and_then(|j| st.samples.get_mut(j)) {
                        *slot = rtt_ns;
                    }
                }
                false
            }
        };
        if measured_enough {
            self.finish_measuring(st, now_ns);
        }
    }

    /// Closes the sample interval that ended before `now_ns`: capacity bucket, gradient step.
    fn end_interval(&self, st: &mut State, now_ns: u64) {
        let p = &self.params;
        st.buckets.push_back(Bucket {
            end_ns: st.interval_end_ns,
            passed: st.passed,
            rtt_sum_ns: st.rtt_sum_ns,
        });
        st.passed = 0;
        st.rtt_sum_ns = 0;
        while st
            .buckets
            .front()
            .is_some_and(|b| b.end_ns.saturating_add(p.window_ns) <= now_ns)
        {
            st.buckets.pop_front();
        }
        self.capacity
            .store(capacity(&st.buckets, p.interval_ns), Ordering::Relaxed);

        let following = matches!(st.phase, Phase::Normal { .. });
        if let (true, Some(min_rtt)) = (following, st.min_rtt_ns) {
            // An interval without samples leaves the limit alone.
            if let Some(sample) = percentile(&mut st.samples, p.percentile) {
                self.sample_rtt_ns.store(sample, Ordering::Relaxed);
                let next = p.next_limit(st.limit, min_rtt, sample);
                self.publish_limit(st, next);
                st.at_min_streak = if next == p.min_limit { st.at_min_streak + 1 } else { 0 };
                if st.at_min_streak >= MIN_STREAK_REMEASURE {
                    self.start_measuring(st, now_ns);
                }
            }
        }
        st.samples.clear();
        st.seen = 0;
        // The next interval follows on if `now` falls in it; after an idle gap it starts now.
        let follow = st.interval_end_ns.saturating_add(p.interval_ns);
        st.interval_end_ns = if now_ns < follow {
            follow
        } else {
            now_ns.saturating_add(p.interval_ns)
        };
    }

    fn start_measuring(&self, st: &mut State, now_ns: u64) {
        let restore = st.limit;
        st.phase = Phase::Measuring {
            since_ns: now_ns,
            restore,
            samples: Vec::with_capacity(self.params.min_rtt_requests),
        };
        st.at_min_streak = 0;
        st.samples.clear();
        st.seen = 0;
        self.publish_limit(st, self.params.min_limit);
        self.measuring.store(true, Ordering::Relaxed);
    }

    fn finish_measuring(&self, st: &mut State, now_ns: u64) {
        let next_measure_ns = self.params.next_measure(now_ns, &mut st.rng);
        let Phase::Measuring {
            restore, mut samples, ..
        } = std::mem::replace(&mut st.phase, Phase::Normal { next_measure_ns })
        else {
            return;
        };
        let min_rtt = percentile(&mut samples, self.params.percentile).unwrap_or(1).max(1);
        st.min_rtt_ns = Some(min_rtt);
        self.min_rtt_ns.store(min_rtt, Ordering::Relaxed);
        self.publish_limit(st, restore);
        self.measuring.store(false, Ordering::Relaxed);
    }
}

// === impl Guard ===

impl Guard {
    /// Feeds the request's round-trip time and releases the slot. `ok = false` (an error or a
    /// timeout) releases the slot without sampling the RTT.
    pub fn record(self, rtt: Duration, ok: bool, now: Instant) {
        self.limiter.on_sample(self.admitted_ns, rtt, ok, now);
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

// === helpers ===

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// The nearest-rank `p`-th percentile (reorders `samples`); None when empty.
fn percentile(samples: &mut [u64], p: f64) -> Option<u64> {
    if samples.is_empty() {
        return None;
    }
    let rank = (p / 100.0 * samples.len() as f64).ceil() as usize;
    let idx = rank.clamp(1, samples.len()) - 1;
    Some(*samples.select_nth_unstable(idx).1)
}

/// Little's law over the window: the most completions of one interval, spread over the
/// interval, times the lowest mean RTT of an interval. 0 when no interval had completions.
fn capacity(buckets: &VecDeque<Bucket>, interval_ns: u64) -> u32 {
    let mut max_pass = 0u32;
    let mut min_rt = u64::MAX;
    for b in buckets.iter().filter(|b| b.passed > 0) {
        max_pass = max_pass.max(b.passed);
        min_rt = min_rt.min(b.rtt_sum_ns / u64::from(b.passed));
    }
    if max_pass == 0 {
        return 0;
    }
    let cap = (f64::from(max_pass) * min_rt as f64 / interval_ns as f64).ceil();
    // Saturating float-to-int cast; at least 1 so that "measured" stays distinct from 0.
    (cap as u32).max(1)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> AdaptiveConfig {
        AdaptiveConfig {
            max_limit: 200,
            min_rtt_requests: 10,
            jitter_percent: 0,
            ..AdaptiveConfig::default()
        }
    }

    /// Admits up to `n` requests at `at` and completes them all at `at + rtt`; returns how many
    /// were admitted.
    fn wave(l: &Arc<AdaptiveLimiter>, at: Instant, n: u32, rtt: Duration) -> u32 {
        let guards: Vec<_> = (0..n).filter_map(|_| l.try_acquire(at)).collect();
        let admitted = guards.len() as u32;
        for g in guards {
            g.record(rtt, true, at + rtt);
        }
        admitted
    }

    /// A limiter whose first min RTT (10 ms) is measured at `t0`.
    fn measured(c: &AdaptiveConfig, cpu: CpuGauge, t0: Instant) -> Arc<AdaptiveLimiter> {
        let l = AdaptiveLimiter::new(c, cpu, t0);
        assert!(l.status().measuring_min_rtt);
        assert_eq!(wave(&l, t0, c.min_rtt_requests, 10 * MS), c.min_rtt_requests);
        let s = l.status();
        assert!(!s.measuring_min_rtt);
        assert_eq!((s.limit, s.min_rtt_ms), (c.initial_limit, Some(10.0)));
        l
    }

    /// Runs full waves at the limit, one per sample interval from `from`; returns the limit
    /// after each wave's samples were counted, and the time after the last wave.
    fn run(l: &Arc<AdaptiveLimiter>, from: Instant, waves: u32, rtt: Duration) -> (Vec<u32>, Instant) {
        let mut at = from;
        let mut limits = Vec::new();
        for _ in 0..waves {
            let limit = l.limit();
            assert_eq!(wave(l, at, limit + 5, rtt), limit, "admits stop at the limit");
            limits.push(l.status().limit);
            at += 100 * MS;
        }
        (limits, at)
    }

    #[test]
    fn defaults_match_the_documented_ones() {
        let c: AdaptiveConfig = toml::from_str("").unwrap();
        assert_eq!(c, AdaptiveConfig::default());
        assert_eq!((c.min_limit, c.max_limit, c.initial_limit), (3, 1000, 20));
        assert_eq!(
            (c.sample_interval, c.min_rtt_interval),
            (Dur::millis(100), Dur::secs(30))
        );
        assert_eq!((c.percentile, c.min_rtt_requests, c.jitter_percent), (90.0, 50, 15));
        assert_eq!(
            (c.buffer_percent, c.cpu_threshold_percent, c.capacity_window),
            (25, 80, Dur::secs(10))
        );
        assert!(c.validate("inbound.adaptive").is_empty());
    }

    #[test]
    fn config_reads_human_units_and_refuses_unknown_keys() {
        let c: AdaptiveConfig =
            toml::from_str("sample_interval = \"250ms\"\nmin_rtt_interval = \"1m\"\npercentile = 99").unwrap();
        assert_eq!(c.sample_interval, Dur::millis(250));
        assert_eq!(c.min_rtt_interval, Dur::secs(60));
        assert_eq!(c.percentile, 99.0);
        let e = toml::from_str::<AdaptiveConfig>("min_limt = 3")
            .unwrap_err()
            .to_string();
        assert!(e.contains("min_limt"), "{e}");
        assert!(toml::from_str::<AdaptiveConfig>("sample_interval = \"soon\"").is_err());
    }

    #[test]
    fn validate_names_every_bad_key() {
        let c = AdaptiveConfig {
            min_limit: 0,
            max_limit: 0,
            initial_limit: 5,
            sample_interval: Dur::millis(0),
            percentile: f64::NAN,
            min_rtt_requests: 0,
            jitter_percent: 101,
            buffer_percent: 200,
            cpu_threshold_percent: 101,
            ..AdaptiveConfig::default()
        };
        let p = c.validate("inbound.adaptive");
        for key in [
            "min_limit",
            "initial_limit",
            "sample_interval",
            "percentile",
            "min_rtt_requests",
            "jitter_percent",
            "buffer_percent",
            "cpu_threshold_percent",
        ] {
            let want = format!("inbound.adaptive.{key}: ");
            assert!(p.iter().any(|m| m.starts_with(&want)), "{key} missing from {p:#?}");
        }
        let c = AdaptiveConfig {
            max_limit: 2,
            sample_interval: Dur::secs(1),
            min_rtt_interval: Dur::millis(500),
            capacity_window: Dur::millis(500),
            ..AdaptiveConfig::default()
        };
        let p = c.validate("a");
        let keys: Vec<_> = p.iter().filter_map(|m| m.split(':').next()).collect();
        assert_eq!(
            keys,
            [
                "a.max_limit",
                "a.initial_limit",
                "a.min_rtt_interval",
                "a.capacity_window"
            ]
        );
        let c = AdaptiveConfig {
            sample_interval: Dur::millis(1),
            capacity_window: Dur::secs(60),
            ..AdaptiveConfig::default()
        };
        assert_eq!(c.validate("a").len(), 1);
    }

    #[test]
    fn gradient_formula() {
        let p = Params::new(&config());
        // Flat latency: gradient 1.25 (the buffer), plus sqrt headroom.
        assert_eq!(p.next_limit(20, 10_000_000, 10_000_000), 30);
        // Latency tripled: gradient clamped at 0.5.
        assert_eq!(p.next_limit(200, 10_000_000, 30_000_000), 110);
        // Far faster than the minimum: gradient clamped at 2, then max_limit.
        assert_eq!(p.next_limit(50, 10_000_000, 1), 110);
        assert_eq!(p.next_limit(150, 10_000_000, 1), 200);
        // Never below min_limit.
        assert_eq!(p.next_limit(3, 10_000_000, 1_000_000_000), 3);
    }

    #[test]
    fn percentile_is_nearest_rank() {
        let mut v: Vec<u64> = (1..=10).rev().collect();
        assert_eq!(percentile(&mut v, 90.0), Some(9));
        assert_eq!(percentile(&mut v, 50.0), Some(5));
        assert_eq!(percentile(&mut v, 100.0), Some(10));
        assert_eq!(percentile(&mut v, 0.1), Some(1));
        assert_eq!(percentile(&mut [7], 90.0), Some(7));
        assert_eq!(percentile(&mut [], 90.0), None);
    }

    #[test]
    fn stable_rtt_grows_the_limit_to_max() {
        let t0 = Instant::now();
        let l = measured(&config(), CpuGauge::new(), t0);
        let (limits, _) = run(&l, t0 + 100 * MS, 12, 10 * MS);
        // The first wave closes the measuring interval (no gradient samples), then x1.25+sqrt.
        assert_eq!(&limits[..8], &[20, 30, 43, 61, 84, 115, 155, 200], "{limits:?}");
        assert!(limits[8..].iter().all(|&x| x == 200), "{limits:?}");
        assert_eq!(l.status().sample_rtt_ms, Some(10.0));
    }

    #[test]
    fn tripled_rtt_drops_the_limit_by_the_gradient() {
        let t0 = Instant::now();
        let l = measured(&config(), CpuGauge::new(), t0);
        let (_, at) = run(&l, t0 + 100 * MS, 10, 10 * MS);
        assert_eq!(l.limit(), 200);
        let (limits, _) = run(&l, at, 4, 30 * MS);
        // The first slow wave is counted when the next one completes.
        assert_eq!(&limits[..4], &[200, 110, 62, 36], "{limits:?}");
        assert_eq!(l.status().sample_rtt_ms, Some(30.0));
    }

    #[test]
    fn a_lasting_slowdown_remeasures_the_min_rtt() {
        let t0 = Instant::now();
        let l = measured(&config(), CpuGauge::new(), t0);
        let (limits, at) = run(&l, t0 + 100 * MS, 12, 40 * MS);
        // Down to min_limit, five intervals there, then a measurement at min_limit.
        let first_min = limits.iter().position(|&x| x == 3).unwrap();
        assert!(first_min + MIN_STREAK_REMEASURE as usize <= limits.len(), "{limits:?}");
        assert!(l.status().measuring_min_rtt, "{limits:?}");
        let (_, at) = run(&l, at, 4, 40 * MS);
        let s = l.status();
        assert!(!s.measuring_min_rtt);
        assert_eq!(s.min_rtt_ms, Some(40.0));
        // With the new minimum, 40 ms is normal again and the limit grows.
        let (limits, _) = run(&l, at, 4, 40 * MS);
        assert!(limits.windows(2).all(|w| w[1] >= w[0]) && limits[3] > 3, "{limits:?}");
    }

    #[test]
    fn in_flight_never_exceeds_the_limit() {
        let t0 = Instant::now();
        let l = AdaptiveLimiter::new(&config(), CpuGauge::new(), t0);
        let mut held: Vec<_> = (0..100).filter_map(|_| l.try_acquire(t0)).collect();
        assert_eq!(held.len(), 20);
        assert_eq!(l.in_flight(), 20);
        assert_eq!(l.status().shed_total, 80);
        assert_eq!(l.status().cpu_shed_total, 0);
        drop(held.pop());
        held.push(l.try_acquire(t0).expect("a slot was freed"));
        assert!(l.try_acquire(t0).is_none());
        drop(held);
        assert_eq!(l.in_flight(), 0);
    }

    #[test]
    fn failed_requests_release_without_sampling() {
        let t0 = Instant::now();
        let l = AdaptiveLimiter::new(&config(), CpuGauge::new(), t0);
        for _ in 0..30 {
            let g = l.try_acquire(t0).unwrap();
            g.record(5 * MS, false, t0 + 5 * MS);
        }
        let s = l.status();
        assert_eq!((s.in_flight, s.min_rtt_ms), (0, None));
        assert!(s.measuring_min_rtt);
    }

    #[test]
    fn periodic_min_rtt_measurement_pins_then_restores() {
        let c = AdaptiveConfig {
            min_rtt_interval: Dur::secs(1),
            ..config()
        };
        let t0 = Instant::now();
        let l = measured(&c, CpuGauge::new(), t0);
        // Next measurement due at 1.01 s (the first one ended at 10 ms).
        let (_, at) = run(&l, t0 + 100 * MS, 8, 10 * MS);
        assert_eq!(at, t0 + 900 * MS);
        let before = l.limit();
        assert!(before > c.initial_limit);
        // A request admitted before the pin completes after it: not a min-RTT sample.
        let old = l.try_acquire(at).unwrap();
        assert_eq!(wave(&l, at, before, 10 * MS), before - 1);
        let at = at + 100 * MS;
        assert_eq!(wave(&l, at, before, 10 * MS), before - 1);
        let s = l.status();
        assert!(s.measuring_min_rtt);
        assert_eq!(s.limit, c.min_limit);
        old.record(MS, true, at + 20 * MS);

        // Pinned: three at a time, 20 ms each, until ten samples.
        let mut at = at + 100 * MS;
        for _ in 0..3 {
            assert_eq!(wave(&l, at, 10, 20 * MS), 3);
            assert!(l.status().measuring_min_rtt);
            at += 100 * MS;
        }
        assert_eq!(wave(&l, at, 10, 20 * MS), 3);
        let s = l.status();
        assert!(!s.measuring_min_rtt);
        assert_eq!(
            s.min_rtt_ms,
            Some(20.0),
            "the 1 ms sample of the old request was skipped"
        );
        assert_eq!(s.limit, before);
    }

    #[test]
    fn hot_cpu_caps_admits_at_the_measured_capacity() {
        let c = AdaptiveConfig {
            max_limit: 1000,
            ..config()
        };
        let cpu = CpuGauge::new();
        let t0 = Instant::now();
        let l = measured(&c, cpu.clone(), t0);
        // Hot before anything was measured: no cap.
        cpu.set(95);
        assert_eq!(l.limit(), 20);
        cpu.set(10);
        // At most 200 completions per 100 ms at 10 ms: capacity 200 * 10 / 100 = 20 in flight.
        let mut at = t0 + 100 * MS;
        for _ in 0..10 {
            wave(&l, at, 200, 10 * MS);
            at += 100 * MS;
        }
        let s = l.status();
        assert_eq!(s.capacity, Some(20));
        assert!(s.limit > 200, "{s:?}");
        assert_eq!(l.limit(), s.limit);

        cpu.set(95);
        assert_eq!(l.limit(), 20);
        let held: Vec<_> = (0..100).filter_map(|_| l.try_acquire(at)).collect();
        assert_eq!(held.len(), 20);
        let s = l.status();
        assert_eq!((s.cpu_percent, s.effective_limit, s.cpu_shed_total), (95, 20, 80));
        drop(held);

        cpu.set(80);
        assert_eq!(l.limit(), s.limit, "at the threshold is not above it");

        let off = AdaptiveConfig {
            cpu_threshold_percent: 0,
            ..c
        };
        let l = measured(&off, cpu.clone(), t0);
        wave(&l, t0 + 100 * MS, 20, 10 * MS);
        wave(&l, t0 + 200 * MS, 20, 10 * MS);
        cpu.set(100);
        assert!(l.status().capacity.is_some());
        assert_eq!(l.limit(), l.status().limit);
    }

    #[test]
    fn intervals_without_samples_leave_the_limit_alone() {
        let t0 = Instant::now();
        let l = measured(&config(), CpuGauge::new(), t0);
        let (_, at) = run(&l, t0 + 100 * MS, 3, 10 * MS);
        // A failed request closes the last interval that had samples.
        l.try_acquire(at).unwrap().record(MS, false, at + MS);
        let before = l.limit();
        // Then only failures for 20 s: the intervals that close are empty.
        for secs in [1, 5, 20] {
            let t = at + Duration::from_secs(secs);
            l.try_acquire(t).unwrap().record(MS, false, t);
        }
        assert_eq!(l.limit(), before);
    }

    #[derive(Clone, Debug)]
    enum Op {
        Acquire,
        Record { idx: usize, rtt_ms: u64, ok: bool },
        Drop { idx: usize },
        Advance { ms: u64 },
        Cpu { percent: u32 },
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => Just(Op::Acquire),
            4 => (any::<usize>(), 0u64..2_000, any::<bool>()).prop_map(|(idx, rtt_ms, ok)| Op::Record { idx, rtt_ms, ok }),
            1 => any::<usize>().prop_map(|idx| Op::Drop { idx }),
            2 => (0u64..700).prop_map(|ms| Op::Advance { ms }),
            1 => (0u32..=100).prop_map(|percent| Op::Cpu { percent }),
        ]
    }

    proptest! {
        #[test]
        fn limit_stays_in_bounds_and_admits_respect_it(
            min_limit in 1u32..6,
            span in 0u32..40,
            initial in 0u32..50,
            min_rtt_requests in 1u32..8,
            jitter_percent in 0u32..=100,
            ops in proptest::collection::vec(op(), 1..400),
        ) {
            let c = AdaptiveConfig {
                min_limit,
                max_limit: min_limit + span,
                initial_limit: min_limit + initial % (span + 1),
                min_rtt_interval: Dur::secs(2),
                min_rtt_requests,
                jitter_percent,
                capacity_window: Dur::secs(1),
                ..AdaptiveConfig::default()
            };
            prop_assert!(c.validate("a").is_empty());
            let cpu = CpuGauge::new();
            let t0 = Instant::now();
            let l = AdaptiveLimiter::new(&c, cpu.clone(), t0);
            let mut now = t0;
            let mut held: Vec<Guard> = Vec::new();
            for op in ops {
                match op {
                    Op::Acquire => {
                        let limit = l.limit();
                        if let Some(g) = l.try_acquire(now) {
                            held.push(g);
                            prop_assert!(l.in_flight() <= limit, "{} in flight, limit {}", l.in_flight(), limit);
                        } else {
                            prop_assert!(l.in_flight() >= limit);
                        }
                    }
                    Op::Record { idx, rtt_ms, ok } if !held.is_empty() => {
                        let g = held.swap_remove(idx % held.len());
                        g.record(Duration::from_millis(rtt_ms), ok, now);
                    }
                    Op::Drop { idx } if !held.is_empty() => drop(held.swap_remove(idx % held.len())),
                    Op::Advance { ms } => now += Duration::from_millis(ms),
                    Op::Cpu { percent } => cpu.set(percent),
                    Op::Record { .. } | Op::Drop { .. } => {}
                }
                let s = l.status();
                prop_assert!((c.min_limit..=c.max_limit).contains(&s.limit), "{s:?}");
                prop_assert!(s.effective_limit >= c.min_limit && s.effective_limit <= s.limit, "{s:?}");
                prop_assert_eq!(s.in_flight as usize, held.len());
            }
        }
    }
}
