//! Circuit breaking per upstream service: Envoy's concurrency thresholds (connections, pending
//! requests, requests, retries) and an error-rate breaker that opens, probes and closes.
//!
//! The error-rate breaker is closed while the share of failed results over a sliding window
//! stays below `error_rate_percent` (or there are fewer than `min_requests` results). Once it
//! opens, every request is refused with `CIRCUIT_OPEN` for `open_for`; then it is half-open and
//! lets `half_open_probes` requests through. All of them succeeding closes it (window cleared);
//! one failing opens it again for twice as long as the last time, at most `max_open_for`.
//!
//! Admission and results are lock-free: the state, the probe counts and a generation live in one
//! atomic word, the window is a ring of atomic buckets. A small mutex is taken only on the rare
//! transitions into open and closed. A result counts only for the state episode (generation) that
//! admitted its request, so a slow request admitted before the breaker opened cannot close it.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::config::Dur;

/// `[outbound.breaker]`: circuit-breaker thresholds of one upstream service.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Connections to the service's endpoints open at once (Envoy `max_connections`).
    pub max_connections: u32,
    /// Requests waiting for a connection at once (Envoy `max_pending_requests`).
    pub max_pending_requests: u32,
    /// Requests in flight at once (Envoy `max_requests`).
    pub max_requests: u32,
    /// Retries in flight at once (Envoy `max_retries`); 0 allows none.
    pub max_retries: u32,
    /// Failed results per 100 in the window that open the breaker; 0 disables the error-rate
    /// breaker (the concurrency thresholds still apply).
    pub error_rate_percent: u32,
    /// The breaker never opens on fewer results than this in the window.
    pub min_requests: u32,
    /// The sliding window the error rate is measured over (ten buckets of a tenth each).
    pub window: Dur,
    /// How long the breaker stays open the first time; doubles on each consecutive re-open.
    pub open_for: Dur,
    /// The longest the breaker stays open however often it re-opens.
    pub max_open_for: Dur,
    /// Probe requests let through while half-open; all must succeed to close, one failure
    /// re-opens.
    pub half_open_probes: u32,
}

/// The state of the error-rate breaker.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// Why the breaker refused something; each has a stable code.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Rejected {
    /// The error-rate breaker is open (or half-open with every probe slot taken).
    #[error("circuit open: the upstream failed too often, requests are refused while it recovers")]
    Open,
    /// `max_requests` requests are in flight.
    #[error("circuit breaker: max_requests requests already in flight")]
    MaxRequests,
    /// `max_pending_requests` requests are waiting for a connection.
    #[error("circuit breaker: max_pending_requests requests already waiting for a connection")]
    MaxPending,
    /// `max_connections` connections are open.
    #[error("circuit breaker: max_connections connections already open")]
    MaxConnections,
}

/// The circuit breaker of one upstream service, shared (`Arc`) by every task that calls it.
#[derive(Debug)]
pub struct Breaker {
    limits: Limits,
    /// Times are milliseconds since this instant.
    epoch: Instant,
    /// A packed [`Word`]: state, probe counts and generation.
    word: AtomicU64,
    /// While open: milliseconds since `epoch` when probes may start. Written (under
    /// `transition`) before the open word is published, read only after seeing it.
    open_until: AtomicU64,
    window: Window,
    active: AtomicU32,
    pending: AtomicU32,
    connections: AtomicU32,
    retries: AtomicU32,
    opened_total: AtomicU64,
    rejected_total: AtomicU64,
    retries_rejected_total: AtomicU64,
    /// Taken on transitions into open and closed; holds the consecutive re-opens (the open
    /// time doubles with each).
    transition: Mutex<u32>,
}

/// What the admin API shows of a breaker.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct BreakerStatus {
    /// `closed`, `open` or `half_open` (an open breaker whose open time is over shows
    /// `half_open`: its next request is a probe).
    pub state: BreakerState,
    /// Requests in flight.
    pub active: u32,
    /// Requests waiting for a connection.
    pub pending: u32,
    /// Connections open.
    pub connections: u32,
    /// Retries in flight.
    pub retries: u32,
    /// Failed results per 100 in the window (0 when the window is empty).
    pub error_rate_percent: f64,
    /// Results in the window.
    pub window_results: u64,
    /// Milliseconds until an open breaker lets probes through (0 unless open).
    pub open_remaining_ms: u64,
    /// Times the breaker opened (from closed or half-open).
    pub opened_total: u64,
    /// Requests, pending requests and connections refused.
    pub rejected_total: u64,
    /// Retries refused by `max_retries`.
    pub retries_rejected_total: u64,
}

/// A request admitted by [`Breaker::admit`]; counts as in flight until dropped. Dropped without
/// [`record`](Self::record) it counts as cancelled: neither success nor failure.
#[derive(Debug)]
#[must_use = "the request counts as in flight until the guard is dropped"]
pub struct RequestGuard {
    breaker: Arc<Breaker>,
    generation: u32,
    probe: bool,
    recorded: bool,
}

/// A request waiting for a connection; counts until dropped.
#[derive(Debug)]
#[must_use = "the request counts as pending until the guard is dropped"]
pub struct PendingGuard(Arc<Breaker>);

/// An open connection; counts until dropped.
#[derive(Debug)]
#[must_use = "the connection counts as open until the guard is dropped"]
pub struct ConnGuard(Arc<Breaker>);

/// A retry in flight; counts until dropped.
#[derive(Debug)]
#[must_use = "the retry counts as in flight until the guard is dropped"]
pub struct RetryGuard(Arc<Breaker>);

/// The numbers of a [`BreakerConfig`] as the breaker uses them, clamped to workable values
/// (`validate` reports the out-of-range ones to the operator).
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_connections: u32,
    max_pending: u32,
    max_requests: u32,
    max_retries: u32,
    error_rate_percent: u64,
    min_requests: u64,
    open_for_ms: u64,
    max_open_for_ms: u64,
    probes: u32,
}

/// The breaker's state in one atomic word, so admission and probe counting are single CASes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Word {
    state: BreakerState,
    /// Half-open: probe slots taken (admitted and not cancelled).
    taken: u32,
    /// Half-open: probes that succeeded.
    ok: u32,
    /// Incremented on every transition; a result counts only in its own generation.
    generation: u32,
}

/// The error-rate window: a ring of buckets, each one atomic word holding the bucket's index
/// (modulo 2^24) and its success and failure counts, so a bucket is reused without a lock and
/// without losing a count.
#[derive(Debug)]
struct Window {
    bucket_ms: u64,
    buckets: [AtomicU64; BUCKETS],
}

const BUCKETS: usize = 10;
/// Probes admitted while half-open are counted in 16 bits of the state word.
const MAX_PROBES: u32 = 1000;
/// The shortest window: one millisecond per bucket.
const MIN_WINDOW: Duration = Duration::from_millis(BUCKETS as u64);

const STATE_BITS: u32 = 2;
const PROBE_BITS: u32 = 16;
const PROBE_MASK: u64 = (1 << PROBE_BITS) - 1;
const GENERATION_SHIFT: u32 = STATE_BITS + 2 * PROBE_BITS;
const GENERATION_MASK: u32 = (1 << (64 - GENERATION_SHIFT)) - 1;

/// Bucket word: tag (24 bits) | successes (20 bits) | failures (20 bits).
const COUNT_BITS: u32 = 20;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const TAG_BITS: u32 = 24;
const TAG_MASK: u64 = (1 << TAG_BITS) - 1;
/// A bucket whose tag is up to this many buckets ahead of a result's was reused by a later
/// time; the result (from a task whose clock reading is older) is dropped instead of wiping it.
const TAG_SKEW: u64 = 4 * BUCKETS as u64;

// === impl BreakerConfig ===

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            max_connections: 1024,
            max_pending_requests: 1024,
            max_requests: 1024,
            max_retries: 3,
            error_rate_percent: 50,
            min_requests: 20,
            window: Dur::secs(10),
            open_for: Dur::secs(5),
            max_open_for: Dur::secs(60),
            half_open_probes: 3,
        }
    }
}

impl BreakerConfig {
    /// Every problem of this section, each naming its key under `key` (e.g. `outbound[0].breaker`).
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut bad = |field: &str, message: String| problems.push(format!("{key}.{field}: {message}"));
        for (field, value) in [
            ("max_connections", self.max_connections),
            ("max_pending_requests", self.max_pending_requests),
            ("max_requests", self.max_requests),
        ] {
            if value == 0 {
                bad(field, "must be at least 1".into());
            }
        }
        if self.error_rate_percent > 100 {
            bad(
                "error_rate_percent",
                format!("must be 0..=100 (0 disables), got {}", self.error_rate_percent),
            );
        }
        if self.min_requests == 0 {
            bad("min_requests", "must be at least 1".into());
        }
        if self.window.get() < MIN_WINDOW {
            bad(
                "window",
                format!("must be at least {}, got {}", Dur(MIN_WINDOW), self.window),
            );
        }
        if self.open_for.get().is_zero() {
            bad("open_for", "must be greater than 0".into());
        }
        if self.max_open_for < self.open_for {
            bad(
                "max_open_for",
                format!(
                    "must be at least open_for ({}), got {}",
                    self.open_for, self.max_open_for
                ),
            );
        }
        if !(1..=MAX_PROBES).contains(&self.half_open_probes) {
            bad(
                "half_open_probes",
                format!("must be 1..={MAX_PROBES}, got {}", self.half_open_probes),
            );
        }
        problems
    }
}

// === impl DialGate ===

/// The upstream pool asks the breaker before it dials: a request waiting for a new
/// connection counts against `max_pending_requests`.
impl crate::upstream::pool::DialGate for Arc<Breaker> {
    type Guard = PendingGuard;
    type Refused = Rejected;

    fn enter(&self) -> Result<PendingGuard, Rejected> {
        self.pending()
    }
}

// === impl Rejected ===

impl Rejected {
    /// The stable error code (log field, metric label, `x-vmesh-error`).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Open => "CIRCUIT_OPEN",
            Self::MaxRequests => "CIRCUIT_MAX_REQUESTS",
            Self::MaxPending => "CIRCUIT_MAX_PENDING",
            Self::MaxConnections => "CIRCUIT_MAX_CONNECTIONS",
        }
    }
}

// === impl Breaker ===

impl Breaker {
    /// A closed breaker.
    pub fn new(config: &BreakerConfig) -> Arc<Self> {
        Self::starting_at(config, Instant::now())
    }

    /// A closed breaker that counts time from `now` (tests pass their own clock).
    pub fn starting_at(config: &BreakerConfig, now: Instant) -> Arc<Self> {
        let open_for_ms = millis(config.open_for.get()).max(1);
        let limits = Limits {
            max_connections: config.max_connections,
            max_pending: config.max_pending_requests,
            max_requests: config.max_requests,
            max_retries: config.max_retries,
            error_rate_percent: u64::from(config.error_rate_percent.min(100)),
            min_requests: u64::from(config.min_requests.max(1)),
            open_for_ms,
            max_open_for_ms: millis(config.max_open_for.get()).max(open_for_ms),
            probes: config.half_open_probes.clamp(1, MAX_PROBES),
        };
        Arc::new(Self {
            limits,
            epoch: now,
            word: AtomicU64::new(Word::closed(0).pack()),
            open_until: AtomicU64::new(0),
            window: Window::new(config.window.get()),
            active: AtomicU32::new(0),
            pending: AtomicU32::new(0),
            connections: AtomicU32::new(0),
            retries: AtomicU32::new(0),
            opened_total: AtomicU64::new(0),
            rejected_total: AtomicU64::new(0),
            retries_rejected_total: AtomicU64::new(0),
            transition: Mutex::new(0),
        })
    }

    /// Admits a request, or says why not. While half-open the admitted requests are the probes.
    pub fn admit(self: &Arc<Self>, now: Instant) -> Result<RequestGuard, Rejected> {
        let now_ms = self.ms(now);
        loop {
            let raw = self.word.load(Ordering::Acquire);
            let word = Word::unpack(raw);
            let next = match word.state {
                BreakerState::Closed => None,
                BreakerState::Open if now_ms < self.open_until.load(Ordering::Acquire) => {
                    return Err(self.reject(Rejected::Open));
                }
                // The open time is over: this request is the first probe.
                BreakerState::Open => Some(Word {
                    state: BreakerState::HalfOpen,
                    taken: 1,
                    ok: 0,
                    generation: word.next_generation(),
                }),
                BreakerState::HalfOpen if word.taken >= self.limits.probes => {
                    return Err(self.reject(Rejected::Open));
                }
                BreakerState::HalfOpen => Some(Word {
                    taken: word.taken + 1,
                    ..word
                }),
            };
            if !acquire(&self.active, self.limits.max_requests) {
                return Err(self.reject(Rejected::MaxRequests));
            }
            let won = match next {
                // Still the closed episode read above (a closed word changes only by a transition).
                None => self.word.load(Ordering::Acquire) == raw,
                Some(next) => self
                    .word
                    .compare_exchange(raw, next.pack(), Ordering::AcqRel, Ordering::Acquire)
                    .is_ok(),
            };
            if won {
                return Ok(RequestGuard {
                    breaker: self.clone(),
                    generation: next.map_or(word.generation, |n| n.generation),
                    probe: next.is_some(),
                    recorded: false,
                });
            }
            self.active.fetch_sub(1, Ordering::Release);
        }
    }

    /// Counts a request waiting for a connection, unless `max_pending_requests` wait already.
    pub fn pending(self: &Arc<Self>) -> Result<PendingGuard, Rejected> {
        if acquire(&self.pending, self.limits.max_pending) {
            Ok(PendingGuard(self.clone()))
        } else {
            Err(self.reject(Rejected::MaxPending))
        }
    }

    /// Counts an open connection, unless `max_connections` are open already.
    pub fn connection(self: &Arc<Self>) -> Result<ConnGuard, Rejected> {
        if acquire(&self.connections, self.limits.max_connections) {
            Ok(ConnGuard(self.clone()))
        } else {
            Err(self.reject(Rejected::MaxConnections))
        }
    }

    /// A retry slot, unless `max_retries` retries are in flight already.
    pub fn retry(self: &Arc<Self>) -> Option<RetryGuard> {
        if acquire(&self.retries, self.limits.max_retries) {
            Some(RetryGuard(self.clone()))
        } else {
            self.retries_rejected_total.fetch_add(1, Ordering::Relaxed);
            None
        }
    }

    /// The state as the next request would find it.
    pub fn state(&self, now: Instant) -> BreakerState {
        let word = Word::unpack(self.word.load(Ordering::Acquire));
        if word.state == BreakerState::Open && self.ms(now) >= self.open_until.load(Ordering::Acquire) {
            BreakerState::HalfOpen
        } else {
            word.state
        }
    }

    pub fn status(&self, now: Instant) -> BreakerStatus {
        let now_ms = self.ms(now);
        let state = self.state(now);
        let (ok, failed) = self.window.sum(now_ms);
        let results = ok + failed;
        let open_remaining_ms = if state == BreakerState::Open {
            self.open_until.load(Ordering::Acquire).saturating_sub(now_ms)
        } else {
            0
        };
        BreakerStatus {
            state,
            active: self.active.load(Ordering::Relaxed),
            pending: self.pending.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
            error_rate_percent: if results == 0 {
                0.0
            } else {
                failed as f64 * 100.0 / results as f64
            },
            window_results: results,
            open_remaining_ms,
            opened_total: self.opened_total.load(Ordering::Relaxed),
            rejected_total: self.rejected_total.load(Ordering::Relaxed),
            retries_rejected_total: self.retries_rejected_total.load(Ordering::Relaxed),
        }
    }

    fn ms(&self, now: Instant) -> u64 {
        millis(now.saturating_duration_since(self.epoch))
    }

    fn reject(&self, why: Rejected) -> Rejected {
        self.rejected_total.fetch_add(1, Ordering::Relaxed);
        why
    }

    /// A result of a request admitted while closed.
    fn closed_result(&self, generation: u32, success: bool, now_ms: u64) {
        let word = Word::unpack(self.word.load(Ordering::Acquire));
        if word.state != BreakerState::Closed || word.generation != generation {
            return;
        }
        self.window.record(now_ms, success);
        // Only a failure can raise the error rate.
        if success || self.limits.error_rate_percent == 0 {
            return;
        }
        let (ok, failed) = self.window.sum(now_ms);
        let results = ok + failed;
        if results >= self.limits.min_requests && failed * 100 >= self.limits.error_rate_percent * results {
            self.open(generation, now_ms);
        }
    }

    /// A result of a probe admitted while half-open.
    fn probe_result(&self, generation: u32, success: bool, now_ms: u64) {
        if !success {
            self.open(generation, now_ms);
            return;
        }
        let mut raw = self.word.load(Ordering::Acquire);
        loop {
            let word = Word::unpack(raw);
            if word.state != BreakerState::HalfOpen || word.generation != generation {
                return;
            }
            let next = Word {
                ok: word.ok + 1,
                ..word
            };
            match self
                .word
                .compare_exchange(raw, next.pack(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    if next.ok >= self.limits.probes {
                        self.close(generation);
                    }
                    return;
                }
                Err(current) => raw = current,
            }
        }
    }

    /// A probe dropped without a result frees its slot for another probe.
    fn cancel_probe(&self, generation: u32) {
        let mut raw = self.word.load(Ordering::Acquire);
        loop {
            let word = Word::unpack(raw);
            if word.state != BreakerState::HalfOpen || word.generation != generation {
                return;
            }
            let next = Word {
                taken: word.taken.saturating_sub(1),
                ..word
            };
            match self
                .word
                .compare_exchange(raw, next.pack(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => return,
                Err(current) => raw = current,
            }
        }
    }

    /// Closed or half-open (in `generation`) -> open.
    fn open(&self, generation: u32, now_ms: u64) {
        // The mutex guards a plain counter; a panic while holding it cannot leave it torn.
        let mut reopens = self.transition.lock().unwrap_or_else(PoisonError::into_inner);
        let mut raw = self.word.load(Ordering::Acquire);
        loop {
            let word = Word::unpack(raw);
            if word.generation != generation || word.state == BreakerState::Open {
                return;
            }
            let n = if word.state == BreakerState::HalfOpen {
                *reopens + 1
            } else {
                0
            };
            // Nobody reads `open_until` unless the word says open, and it does not yet: a task
            // holding an older open word fails its exchange.
            self.open_until
                .store(now_ms.saturating_add(self.open_for_ms(n)), Ordering::Release);
            let next = Word {
                state: BreakerState::Open,
                taken: 0,
                ok: 0,
                generation: word.next_generation(),
            };
            match self
                .word
                .compare_exchange(raw, next.pack(), Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    *reopens = n;
                    self.opened_total.fetch_add(1, Ordering::Relaxed);
                    return;
                }
                // Half-open probe counts moved; look again.
                Err(current) => raw = current,
            }
        }
    }

    /// Half-open (in `generation`) with every probe succeeded -> closed.
    fn close(&self, generation: u32) {
        let mut reopens = self.transition.lock().unwrap_or_else(PoisonError::into_inner);
        let raw = self.word.load(Ordering::Acquire);
        let word = Word::unpack(raw);
        if word.state != BreakerState::HalfOpen || word.generation != generation {
            return;
        }
        // The word cannot change under us: every probe slot is taken and has succeeded, so no
        // admission, result or cancellation applies to it. The window is cleared before the
        // closed word is published, so the new episode starts from nothing.
        self.window.clear();
        *reopens = 0;
        let next = Word::closed(word.next_generation());
        let _ = self
            .word
            .compare_exchange(raw, next.pack(), Ordering::AcqRel, Ordering::Acquire);
    }

    /// `open_for * 2^reopens`, at most `max_open_for`.
    fn open_for_ms(&self, reopens: u32) -> u64 {
        let factor = 1u64 << reopens.min(32);
        self.limits
            .open_for_ms
            .saturating_mul(factor)
            .min(self.limits.max_open_for_ms)
    }
}

// === impl guards ===

impl RequestGuard {
    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records the request's result and ends it.
    pub fn record(mut self, success: bool, now: Instant) {
        self.recorded = true;
        let now_ms = self.breaker.ms(now);
        if self.probe {
            self.breaker.probe_result(self.generation, success, now_ms);
        } else {
            self.breaker.closed_result(self.generation, success, now_ms);
        }
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.breaker.active.fetch_sub(1, Ordering::Release);
        if self.probe && !self.recorded {
            self.breaker.cancel_probe(self.generation);
        }
    }
}

impl Drop for PendingGuard {
    fn drop(&mut self) {
        self.0.pending.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for ConnGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Release);
    }
}

impl Drop for RetryGuard {
    fn drop(&mut self) {
        self.0.retries.fetch_sub(1, Ordering::Release);
    }
}

// === impl Word ===

impl Word {
    fn closed(generation: u32) -> Self {
        Self {
            state: BreakerState::Closed,
            taken: 0,
            ok: 0,
            generation,
        }
    }

    fn next_generation(self) -> u32 {
        self.generation.wrapping_add(1) & GENERATION_MASK
    }

    fn pack(self) -> u64 {
        let state = match self.state {
            BreakerState::Closed => 0,
            BreakerState::Open => 1,
            BreakerState::HalfOpen => 2,
        };
        state
            | (u64::from(self.taken) & PROBE_MASK) << STATE_BITS
            | (u64::from(self.ok) & PROBE_MASK) << (STATE_BITS + PROBE_BITS)
            | u64::from(self.generation & GENERATION_MASK) << GENERATION_SHIFT
    }

    fn unpack(raw: u64) -> Self {
        let state = match raw & ((1 << STATE_BITS) - 1) {
            0 => BreakerState::Closed,
            1 => BreakerState::Open,
            // Only 2 is ever packed.
            _ => BreakerState::HalfOpen,
        };
        // The masks make each narrowing exact.
        Self {
            state,
            taken: ((raw >> STATE_BITS) & PROBE_MASK) as u32,
            ok: ((raw >> (STATE_BITS + PROBE_BITS)) & PROBE_MASK) as u32,
            generation: (raw >> GENERATION_SHIFT) as u32 & GENERATION_MASK,
        }
    }
}

// === impl Window ===

impl Window {
    fn new(window: Duration) -> Self {
        Self {
            bucket_ms: (millis(window) / BUCKETS as u64).max(1),
            buckets: std::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    fn record(&self, now_ms: u64, success: bool) {
        let index = now_ms / self.bucket_ms;
        let tag = index & TAG_MASK;
        let slot = &self.buckets[(index % BUCKETS as u64) as usize];
        let mut raw = slot.load(Ordering::Relaxed);
        loop {
            let (current_tag, mut ok, mut failed) = unpack_bucket(raw);
            if current_tag != tag {
                let ahead = current_tag.wrapping_sub(tag) & TAG_MASK;
                if ahead <= TAG_SKEW {
                    return;
                }
                (ok, failed) = (0, 0);
            }
            // Halving both keeps the ratio when a bucket saturates (a million results).
            if ok == COUNT_MAX || failed == COUNT_MAX {
                (ok, failed) = (ok / 2, failed / 2);
            }
            if success {
                ok += 1;
            } else {
                failed += 1;
            }
            match slot.compare_exchange_weak(raw, pack_bucket(tag, ok, failed), Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return,
                Err(current) => raw = current,
            }
        }
    }

    /// Successes and failures in the buckets of the last window.
    fn sum(&self, now_ms: u64) -> (u64, u64) {
        let tag = (now_ms / self.bucket_ms) & TAG_MASK;
        self.buckets.iter().fold((0, 0), |(ok, failed), slot| {
            let (bucket_tag, b_ok, b_failed) = unpack_bucket(slot.load(Ordering::Relaxed));
            if tag.wrapping_sub(bucket_tag) & TAG_MASK < BUCKETS as u64 {
                (ok + b_ok, failed + b_failed)
            } else {
                (ok, failed)
            }
        })
    }

    fn clear(&self) {
        for slot in &self.buckets {
            slot.store(0, Ordering::Relaxed);
        }
    }
}

fn pack_bucket(tag: u64, ok: u64, failed: u64) -> u64 {
    tag << (2 * COUNT_BITS) | ok << COUNT_BITS | failed
}

fn unpack_bucket(raw: u64) -> (u64, u64, u64) {
    (
        raw >> (2 * COUNT_BITS),
        (raw >> COUNT_BITS) & COUNT_MAX,
        raw & COUNT_MAX,
    )
}

/// Takes one unit of `counter` unless it is at `max`.
fn acquire(counter: &AtomicU32, max: u32) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .is_ok()
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(f: impl FnOnce(&mut BreakerConfig)) -> BreakerConfig {
        let mut c = BreakerConfig::default();
        f(&mut c);
        c
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// Admits and records `n` results at `at`.
    fn results(b: &Arc<Breaker>, at: Instant, n: usize, success: bool) {
        for _ in 0..n {
            b.admit(at).unwrap().record(success, at);
        }
    }

    /// Opens a default-configured breaker at `t0` with 20 failures.
    fn opened(t0: Instant) -> Arc<Breaker> {
        let b = Breaker::starting_at(&BreakerConfig::default(), t0);
        results(&b, t0, 20, false);
        assert_eq!(b.state(t0), BreakerState::Open);
        b
    }

    #[test]
    fn error_rate_opens_only_at_threshold() {
        // (successes, failures, state after, in that order at one instant)
        let cases: &[(&str, usize, usize, BreakerState)] = &[
            ("below min_requests", 0, 19, BreakerState::Closed),
            ("min_requests all failed", 0, 20, BreakerState::Open),
            ("exactly 50%", 10, 10, BreakerState::Open),
            ("49% of 100", 51, 49, BreakerState::Closed),
            ("all succeed", 1000, 0, BreakerState::Closed),
        ];
        for &(name, ok, failed, want) in cases {
            let t0 = Instant::now();
            let b = Breaker::starting_at(&BreakerConfig::default(), t0);
            results(&b, t0, ok, true);
            results(&b, t0, failed, false);
            assert_eq!(b.state(t0), want, "{name}");
            assert_eq!(
                b.status(t0).opened_total,
                u64::from(want == BreakerState::Open),
                "{name}"
            );
        }
    }

    #[test]
    fn disabled_error_rate_never_opens() {
        let t0 = Instant::now();
        let b = Breaker::starting_at(&config(|c| c.error_rate_percent = 0), t0);
        results(&b, t0, 500, false);
        assert_eq!(b.state(t0), BreakerState::Closed);
    }

    #[test]
    fn old_results_leave_the_window() {
        let t0 = Instant::now();
        let b = Breaker::starting_at(&BreakerConfig::default(), t0);
        results(&b, t0, 19, false);
        // 10 s later the 19 failures are out of the window: one more failure is 1 result.
        let later = t0 + ms(10_000);
        results(&b, later, 1, false);
        assert_eq!(b.state(later), BreakerState::Closed);
        assert_eq!(b.status(later).window_results, 1);
        // Within the window they add up.
        let b = Breaker::starting_at(&BreakerConfig::default(), t0);
        results(&b, t0, 19, false);
        results(&b, t0 + ms(8_999), 1, false);
        assert_eq!(b.state(t0 + ms(8_999)), BreakerState::Open);
    }

    #[test]
    fn open_rejects_until_open_for_then_probes() {
        let t0 = Instant::now();
        let b = opened(t0);
        let e = b.admit(t0 + ms(4_999)).unwrap_err();
        assert_eq!((e, e.code()), (Rejected::Open, "CIRCUIT_OPEN"));
        assert_eq!(b.status(t0 + ms(1_000)).open_remaining_ms, 4_000);
        let t = t0 + ms(5_000);
        assert_eq!(b.state(t), BreakerState::HalfOpen);
        let probes: Vec<_> = (0..3).map(|_| b.admit(t).unwrap()).collect();
        assert!(probes.iter().all(RequestGuard::is_probe));
        assert_eq!(b.admit(t).unwrap_err(), Rejected::Open);
        for p in probes {
            p.record(true, t);
        }
        assert_eq!(b.state(t), BreakerState::Closed);
        // The window was cleared: 19 new failures do not re-open.
        results(&b, t, 19, false);
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn probe_failure_reopens_for_twice_as_long_capped() {
        let t0 = Instant::now();
        let b = opened(t0);
        let mut t = t0;
        // Open times: 5 s, then re-opens of 10, 20, 40, 60 (cap), 60 s.
        for open_for in [5_000, 10_000, 20_000, 40_000, 60_000, 60_000] {
            assert_eq!(b.admit(t + ms(open_for - 1)).unwrap_err(), Rejected::Open, "{open_for}");
            t += ms(open_for);
            b.admit(t).unwrap().record(false, t);
            assert_eq!(b.state(t), BreakerState::Open);
        }
        // Closing resets the doubling.
        t += ms(60_000);
        results(&b, t, 3, true);
        assert_eq!(b.state(t), BreakerState::Closed);
        results(&b, t, 20, false);
        assert_eq!(b.admit(t + ms(4_999)).unwrap_err(), Rejected::Open);
        assert!(b.admit(t + ms(5_000)).unwrap().is_probe());
    }

    #[test]
    fn cancelled_probe_frees_its_slot() {
        let t0 = Instant::now();
        let b = opened(t0);
        let t = t0 + ms(5_000);
        let p: Vec<_> = (0..3).map(|_| b.admit(t).unwrap()).collect();
        assert_eq!(b.admit(t).unwrap_err(), Rejected::Open);
        let mut p = p.into_iter();
        drop(p.next());
        let replacement = b.admit(t).unwrap();
        assert!(replacement.is_probe());
        for g in p.chain([replacement]) {
            g.record(true, t);
        }
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn stale_results_do_not_count() {
        let t0 = Instant::now();
        let b = Breaker::starting_at(&BreakerConfig::default(), t0);
        let slow: Vec<_> = (0..5).map(|_| b.admit(t0).unwrap()).collect();
        results(&b, t0, 20, false);
        let t = t0 + ms(5_000);
        let probes: Vec<_> = (0..3).map(|_| b.admit(t).unwrap()).collect();
        // Results of requests admitted while closed neither close nor re-open it.
        let mut slow = slow.into_iter();
        slow.next().unwrap().record(false, t);
        assert_eq!(b.state(t), BreakerState::HalfOpen);
        for g in slow {
            g.record(true, t);
        }
        assert_eq!(b.state(t), BreakerState::HalfOpen);
        for g in probes {
            g.record(true, t);
        }
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn concurrency_limits_and_codes() {
        let t0 = Instant::now();
        let b = Breaker::starting_at(
            &config(|c| {
                c.max_requests = 2;
                c.max_pending_requests = 1;
                c.max_connections = 1;
                c.max_retries = 1;
            }),
            t0,
        );
        let r: Vec<_> = (0..2).map(|_| b.admit(t0).unwrap()).collect();
        let e = b.admit(t0).unwrap_err();
        assert_eq!(e.code(), "CIRCUIT_MAX_REQUESTS");
        let p = b.pending().unwrap();
        assert_eq!(b.pending().unwrap_err().code(), "CIRCUIT_MAX_PENDING");
        // The pool's dial gate is the same count.
        use crate::upstream::pool::DialGate;
        assert_eq!(b.enter().unwrap_err().code(), "CIRCUIT_MAX_PENDING");
        let c = b.connection().unwrap();
        assert_eq!(b.connection().unwrap_err().code(), "CIRCUIT_MAX_CONNECTIONS");
        let retry = b.retry().unwrap();
        assert!(b.retry().is_none());
        let s = b.status(t0);
        assert_eq!((s.active, s.pending, s.connections, s.retries), (2, 1, 1, 1));
        assert_eq!((s.rejected_total, s.retries_rejected_total), (4, 1));
        drop((r, p, c, retry));
        let s = b.status(t0);
        assert_eq!((s.active, s.pending, s.connections, s.retries), (0, 0, 0, 0));
        assert!(b.admit(t0).is_ok() && b.pending().is_ok() && b.connection().is_ok() && b.retry().is_some());
    }

    #[test]
    fn concurrent_callers_respect_the_limits() {
        let t0 = Instant::now();
        let b = Breaker::starting_at(&config(|c| c.max_requests = 4), t0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..2_000 {
                        if let Ok(g) = b.admit(t0) {
                            assert!(b.status(t0).active <= 4);
                            g.record(true, t0);
                        }
                    }
                });
            }
        });
        assert_eq!(b.status(t0).active, 0);
        // Half-open: however many race, exactly `half_open_probes` get through.
        let b = opened(t0);
        let t = t0 + ms(5_000);
        let probes: Vec<RequestGuard> = std::thread::scope(|s| {
            let tasks: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..100).filter_map(|_| b.admit(t).ok()).collect::<Vec<_>>()))
                .collect();
            tasks.into_iter().flat_map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(probes.len(), 3);
        std::thread::scope(|s| {
            for p in probes {
                s.spawn(move || p.record(true, t));
            }
        });
        assert_eq!(b.state(t), BreakerState::Closed);
    }

    #[test]
    fn guards_outlive_the_caller_in_spawned_tasks() {
        fn assert_static_send<T: Send + Sync + 'static>(_: &T) {}
        let t0 = Instant::now();
        let b = Breaker::starting_at(&BreakerConfig::default(), t0);
        let g = b.admit(t0).unwrap();
        assert_static_send(&g);
        assert_static_send(&b.pending().unwrap());
        assert_static_send(&b.connection().unwrap());
        assert_static_send(&b.retry().unwrap());
        drop(b);
        g.record(true, t0);
    }

    #[test]
    fn status_serialises_for_the_admin_api() {
        let t0 = Instant::now();
        let b = opened(t0);
        let v = serde_json::to_value(b.status(t0)).unwrap();
        assert_eq!(v["state"], "open");
        assert_eq!(v["error_rate_percent"], 100.0);
        assert_eq!(v["opened_total"], 1);
        let v = serde_json::to_value(b.status(t0 + ms(5_000))).unwrap();
        assert_eq!(v["state"], "half_open");
    }

    #[test]
    fn config_defaults_units_and_unknown_keys() {
        let c: BreakerConfig = toml::from_str("").unwrap();
        assert_eq!(c, BreakerConfig::default());
        assert!(c.validate("outbound[0].breaker").is_empty());
        let c: BreakerConfig = toml::from_str("window = \"30s\"\nopen_for = \"250ms\"\nmax_requests = 10").unwrap();
        assert_eq!(
            (c.window.get(), c.open_for.get(), c.max_requests),
            (ms(30_000), ms(250), 10)
        );
        assert!(toml::from_str::<BreakerConfig>("max_request = 10").is_err());
        assert!(toml::from_str::<BreakerConfig>("window = \"soon\"").is_err());
    }

    #[test]
    fn validate_reports_every_problem() {
        let c = BreakerConfig {
            max_connections: 0,
            max_pending_requests: 0,
            max_requests: 0,
            max_retries: 0,
            error_rate_percent: 101,
            min_requests: 0,
            window: Dur::millis(5),
            open_for: Dur::secs(0),
            max_open_for: Dur::secs(0),
            half_open_probes: 0,
        };
        let p = c.validate("outbound.breaker");
        for key in [
            "max_connections",
            "max_pending_requests",
            "max_requests",
            "error_rate_percent",
            "min_requests",
            "window",
            "open_for",
            "half_open_probes",
        ] {
            let prefix = format!("outbound.breaker.{key}: ");
            assert!(p.iter().any(|m| m.starts_with(&prefix)), "{key} missing in {p:?}");
        }
        assert_eq!(p.len(), 8, "{p:?}");
        assert!(p.contains(&"outbound.breaker.error_rate_percent: must be 0..=100 (0 disables), got 101".to_owned()));
        let c = config(|c| c.max_open_for = Dur::secs(1));
        assert_eq!(
            c.validate("b"),
            ["b.max_open_for: must be at least open_for (5s), got 1s"]
        );
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        #[derive(Clone, Debug)]
        enum Op {
            Admit,
            /// Drops the i-th live guard (modulo their number) without a result.
            Drop(usize),
            /// Records a result for the i-th live guard.
            Record(usize, bool),
            Advance(u64),
        }

        fn op() -> impl Strategy<Value = Op> {
            prop_oneof![
                4 => Just(Op::Admit),
                1 => any::<usize>().prop_map(Op::Drop),
                3 => any::<usize>().prop_map(|i| Op::Record(i, true)),
                3 => any::<usize>().prop_map(|i| Op::Record(i, false)),
                2 => (0u64..1_500).prop_map(Op::Advance),
            ]
        }

        fn small_config() -> impl Strategy<Value = BreakerConfig> {
            (1u32..6, 1u32..=100, 1u32..8, 1u32..4, 100u64..3_000, 100u64..2_000).prop_map(
                |(max_requests, rate, min_requests, probes, window, open_for)| BreakerConfig {
                    max_requests,
                    error_rate_percent: rate,
                    min_requests,
                    half_open_probes: probes,
                    window: Dur::millis(window),
                    open_for: Dur::millis(open_for),
                    max_open_for: Dur::millis(open_for * 4),
                    ..BreakerConfig::default()
                },
            )
        }

        /// A live guard and what the model knows of it.
        struct Live {
            guard: RequestGuard,
            /// `opened_total` when it was admitted: the half-open episode of a probe.
            episode: u64,
            /// The closed episode it was admitted in, if admitted while closed.
            closed_episode: Option<u64>,
        }

        proptest! {
            #[test]
            fn breaker_invariants(cfg in small_config(), ops in prop::collection::vec(op(), 1..300)) {
                let t0 = Instant::now();
                let b = Breaker::starting_at(&cfg, t0);
                let window = cfg.window.get();
                let mut now = t0;
                let mut live: Vec<Live> = Vec::new();
                let mut state = BreakerState::Closed;
                let mut closed_episode = 0u64;
                // Results of the current closed episode, by time.
                let mut closed_results: Vec<Instant> = Vec::new();
                let mut opened_at: Option<Instant> = None;
                for op in ops {
                    let opened_before = b.status(now).opened_total;
                    match op {
                        Op::Admit => {
                            let before = b.state(now);
                            match b.admit(now) {
                                Ok(guard) => {
                                    prop_assert_eq!(guard.is_probe(), before != BreakerState::Closed);
                                    if let Some(at) = opened_at {
                                        prop_assert!(before == BreakerState::Closed || now >= at + cfg.open_for.get(),
                                            "admitted while open");
                                    }
                                    let closed = (before == BreakerState::Closed).then_some(closed_episode);
                                    live.push(Live { guard, episode: opened_before, closed_episode: closed });
                                }
                                Err(Rejected::Open) => prop_assert!(before != BreakerState::Closed),
                                Err(Rejected::MaxRequests) => prop_assert_eq!(live.len(), cfg.max_requests as usize),
                                Err(e) => return Err(TestCaseError::fail(format!("unexpected {e:?}"))),
                            }
                        }
                        Op::Drop(i) if !live.is_empty() => {
                            let n = live.len();
                            drop(live.swap_remove(i % n));
                        }
                        Op::Record(i, success) if !live.is_empty() => {
                            let n = live.len();
                            let l = live.swap_remove(i % n);
                            if l.closed_episode == Some(closed_episode) && state == BreakerState::Closed {
                                closed_results.push(now);
                            }
                            l.guard.record(success, now);
                        }
                        Op::Advance(d) => now += ms(d),
                        Op::Drop(_) | Op::Record(..) => {}
                    }
                    let s = b.status(now);
                    // Active never exceeds max_requests and matches the live guards.
                    prop_assert!(s.active <= cfg.max_requests);
                    prop_assert_eq!(s.active as usize, live.len());
                    // Half-open admits at most half_open_probes at once.
                    let probes = live.iter().filter(|l| l.guard.is_probe() && l.episode == s.opened_total).count();
                    prop_assert!(probes <= cfg.half_open_probes as usize);
                    if s.opened_total != opened_before {
                        opened_at = Some(now);
                        if state == BreakerState::Closed {
                            // Opening from closed needs min_requests results in the window.
                            let in_window = closed_results.iter().filter(|&&t| t + window > now).count();
                            prop_assert!(in_window >= cfg.min_requests as usize,
                                "opened on {} results", in_window);
                        }
                    }
                    let new_state = b.state(now);
                    if new_state == BreakerState::Closed && state != BreakerState::Closed {
                        closed_episode += 1;
                        closed_results.clear();
                        opened_at = None;
                    }
                    state = new_state;
                }
            }

            #[test]
            fn all_successes_never_open(cfg in small_config(), ops in prop::collection::vec(op(), 1..300)) {
                let t0 = Instant::now();
                let b = Breaker::starting_at(&cfg, t0);
                let mut now = t0;
                let mut live: Vec<RequestGuard> = Vec::new();
                for op in ops {
                    match op {
                        Op::Admit => {
                            if let Ok(g) = b.admit(now) {
                                live.push(g);
                            }
                        }
                        Op::Drop(i) if !live.is_empty() => {
                            let n = live.len();
                            drop(live.swap_remove(i % n));
                        }
                        // Every result is a success.
                        Op::Record(i, _) if !live.is_empty() => {
                            let n = live.len();
                            live.swap_remove(i % n).record(true, now);
                        }
                        Op::Advance(d) => now += ms(d),
                        Op::Drop(_) | Op::Record(..) => {}
                    }
                    prop_assert_eq!(b.state(now), BreakerState::Closed);
                    prop_assert_eq!(b.status(now).opened_total, 0);
                }
            }

            #[test]
            fn word_round_trips(state in 0u8..3, taken in 0u32..=MAX_PROBES, ok in 0u32..=MAX_PROBES, generation in 0u32..=GENERATION_MASK) {
                let state = [BreakerState::Closed, BreakerState::Open, BreakerState::HalfOpen][state as usize];
                let w = Word { state, taken, ok, generation };
                prop_assert_eq!(Word::unpack(w.pack()), w);
            }
        }
    }
}
