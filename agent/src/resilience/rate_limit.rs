//! Token-bucket rate limits: a lock-free bucket, and per-caller buckets keyed by a request
//! header in a bounded, sharded map.
//!
//! The bucket is kept as GCRA does (the "theoretical arrival time"): one atomic word says when
//! the bucket will be full again, which is the same as a token count and a refill time but fits
//! a single compare-and-swap with no lost refills and no packing limits.

use std::borrow::Cow;
use std::collections::hash_map::RandomState;
use std::collections::HashMap;
use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName};
use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize, Serializer};

/// The stable error code of a request refused by a rate limit (answered 429 with `retry-after`).
pub const RATE_LIMITED: &str = "RATE_LIMITED";

/// A rate limit (`rate_limit = { rate = "100/s", burst = 20, by = "x-caller" }`).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained rate, a count per unit: `"100/s"`, `"6000/min"` (or `/m`), `"10/h"`, `"5/ms"`.
    pub rate: Rate,
    /// Requests admitted at once after an idle spell (the bucket size); default: one second of
    /// `rate`, at least 1.
    #[serde(default)]
    pub burst: Option<u32>,
    /// Request header naming the caller: one bucket per distinct value, and one shared bucket
    /// for requests without it; absent: one bucket for every request.
    #[serde(default)]
    pub by: Option<String>,
    /// At most this many per-caller buckets are kept (idle ones, then the least recently used,
    /// make room for new callers).
    #[serde(default = "default_max_keys")]
    pub max_keys: usize,
}

/// A count per unit of time, as written in the config (`"6000/min"`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rate {
    count: f64,
    per: Per,
}

/// A malformed rate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    #[error("invalid rate {0:?}: expected <count>/<unit> such as \"100/s\", \"6000/min\" or \"10/h\"")]
    Format(String),
    #[error("invalid rate {value:?}: {count:?} is not a finite number")]
    Count { value: String, count: String },
    #[error("invalid rate {value:?}: unknown unit {unit:?} (use ms, s, m or min, h)")]
    Unit { value: String, unit: String },
}

/// A token bucket shared through `&self`: `rate` tokens a second, at most `burst` at once; a new
/// bucket is full.
#[derive(Debug)]
pub struct TokenBucket {
    /// Nanoseconds since `epoch` at which the bucket is full again (the GCRA "theoretical
    /// arrival time"); at or before now: full.
    full_at: AtomicU64,
    /// Nanoseconds per token.
    interval: u64,
    /// `burst * interval`: how far `full_at` may run ahead of now.
    capacity: u64,
    epoch: Instant,
}

/// Buckets per caller (the `by` header's value), bounded by `max_keys`, behind 16 shard locks so
/// callers rarely wait on each other; requests without a caller share one lock-free bucket.
#[derive(Debug)]
pub struct KeyedLimiter {
    rate: f64,
    burst: u32,
    by: Option<HeaderName>,
    shared: TokenBucket,
    shards: Box<[Shard]>,
    hasher: RandomState,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Per {
    Millisecond,
    Second,
    Minute,
    Hour,
}

#[derive(Debug)]
struct Shard {
    /// This shard's part of `max_keys`.
    capacity: usize,
    buckets: Mutex<HashMap<Box<str>, Keyed>>,
}

#[derive(Debug)]
struct Keyed {
    bucket: TokenBucket,
    last_used: Instant,
}

const SHARDS: usize = 16;
/// The highest rate accepted: one token a nanosecond.
const MAX_RATE: f64 = 1e9;
const MAX_KEYS: usize = 1_000_000;
/// Longer caller keys are cut to this many bytes, so `max_keys` bounds memory as well.
const MAX_KEY_BYTES: usize = 256;
/// Bounds on the bucket's times, far beyond any real use (2^61 ns is 73 years), so the
/// arithmetic never overflows: a rate below one token per 73 years is that rate.
const MAX_INTERVAL: u64 = 1 << 61;
const MAX_CAPACITY: u64 = 1 << 62;

fn default_max_keys() -> usize {
    10_000
}

// === impl RateLimitConfig ===

impl RateLimitConfig {
    /// `burst`, or its default: one second of `rate`, at least 1.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or_else(|| {
            let per_second = self.rate.per_second();
            if per_second.is_finite() && per_second > 1.0 {
                // Saturating float-to-int conversion; the ceiling of a value > 1 is >= 2.
                per_second.ceil().min(f64::from(u32::MAX)) as u32
            } else {
                1
            }
        })
    }

    /// Every problem of this section, each naming its key under `key`.
    pub fn validate(&self, key: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let per_second = self.rate.per_second();
        if per_second.is_nan() || per_second <= 0.0 {
            problems.push(format!("{key}.rate: must be greater than 0, got \"{}\"", self.rate));
        } else if per_second > MAX_RATE {
            problems.push(format!("{key}.rate: \"{}\" is more than {MAX_RATE}/s", self.rate));
        }
        if self.burst == Some(0) {
            problems.push(format!("{key}.burst: must be at least 1"));
        }
        if let Some(by) = &self.by {
            if HeaderName::from_bytes(by.as_bytes()).is_err() {
                problems.push(format!("{key}.by: {by:?} is not a valid header name"));
            }
        }
        if !(1..=MAX_KEYS).contains(&self.max_keys) {
            problems.push(format!("{key}.max_keys: must be 1..={MAX_KEYS}, got {}", self.max_keys));
        }
        problems
    }
}

// === impl Rate ===

impl Rate {
    pub fn parse(s: &str) -> Result<Self, RateError> {
        let (count, unit) = s.split_once('/').ok_or_else(|| RateError::Format(s.to_owned()))?;
        let (count, unit) = (count.trim(), unit.trim());
        if count.is_empty() || unit.is_empty() {
            return Err(RateError::Format(s.to_owned()));
        }
        let n: f64 = count
            .parse()
            .ok()
            .filter(|n: &f64| n.is_finite())
            .ok_or_else(|| RateError::Count {
                value: s.to_owned(),
                count: count.to_owned(),
            })?;
        let per = match unit {
            "ms" => Per::Millisecond,
            "s" => Per::Second,
            "m" | "min" => Per::Minute,
            "h" => Per::Hour,
            _ => {
                return Err(RateError::Unit {
                    value: s.to_owned(),
                    unit: unit.to_owned(),
                })
            }
        };
        Ok(Self { count: n, per })
    }

    /// `count` per `per_second` seconds.
    pub fn per_second(self) -> f64 {
        match self.per {
            Per::Millisecond => self.count * 1000.0,
            Per::Second => self.count,
            Per::Minute => self.count / 60.0,
            Per::Hour => self.count / 3600.0,
        }
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match self.per {
            Per::Millisecond => "ms",
            Per::Second => "s",
            Per::Minute => "min",
            Per::Hour => "h",
        };
        write!(f, "{}/{unit}", self.count)
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate such as \"100/s\", \"6000/min\" or \"10/h\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Rate, E> {
                Rate::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

// === impl TokenBucket ===

impl TokenBucket {
    /// A full bucket of `burst` tokens (at least 1) refilled at `rate` tokens a second; `now`
    /// is the base of the times it is later given. A rate that is not positive refills never.
    pub fn new(rate: f64, burst: u32, now: Instant) -> Self {
        let interval = if rate > 0.0 {
            // Rounded up: the bucket never admits more than `rate`. The float-to-int conversion
            // saturates.
            ((1e9 / rate).ceil() as u64).clamp(1, MAX_INTERVAL)
        } else {
            MAX_INTERVAL
        };
        Self {
            full_at: AtomicU64::new(0),
            interval,
            capacity: interval.saturating_mul(u64::from(burst.max(1))).min(MAX_CAPACITY),
            epoch: now,
        }
    }

    /// Takes a token, or says how long until one is available.
    pub fn take(&self, now: Instant) -> Result<(), Duration> {
        let now = self.ns(now);
        let mut full_at = self.full_at.load(Ordering::Relaxed);
        loop {
            // Cannot overflow: full_at <= now + capacity, and all three are below 2^62.
            let next = full_at.max(now) + self.interval;
            let ahead = next - now;
            if ahead > self.capacity {
                return Err(Duration::from_nanos(ahead - self.capacity));
            }
            match self
                .full_at
                .compare_exchange_weak(full_at, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => full_at = current,
            }
        }
    }

    /// Whole tokens available at `now`.
    pub fn available(&self, now: Instant) -> u32 {
        let owed = self.full_at.load(Ordering::Relaxed).saturating_sub(self.ns(now));
        u32::try_from(self.capacity.saturating_sub(owed) / self.interval).unwrap_or(u32::MAX)
    }

    /// Whether the bucket has refilled completely: then it is as good as a new one.
    fn is_full(&self, now: Instant) -> bool {
        self.full_at.load(Ordering::Relaxed) <= self.ns(now)
    }

    fn ns(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos())
            .unwrap_or(u64::MAX)
            .min(MAX_CAPACITY)
    }
}

// === impl KeyedLimiter ===

impl KeyedLimiter {
    pub fn new(config: &RateLimitConfig) -> Self {
        Self::starting_at(config, Instant::now())
    }

    /// A limiter whose shared bucket counts time from `now` (tests pass their own clock).
    pub fn starting_at(config: &RateLimitConfig, now: Instant) -> Self {
        let rate = config.rate.per_second();
        let burst = config.burst();
        // Shard capacities add up to exactly max_keys; no shard is without room.
        let max_keys = config.max_keys.max(1);
        let shards = max_keys.min(SHARDS);
        let shards = (0..shards)
            .map(|i| Shard {
                capacity: max_keys / shards + usize::from(i < max_keys % shards),
                buckets: Mutex::new(HashMap::new()),
            })
            .collect();
        Self {
            rate,
            burst,
            // An invalid name (reported by `validate`) limits every request with one bucket.
            by: config
                .by
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            shared: TokenBucket::new(rate, burst, now),
            shards,
            hasher: RandomState::new(),
        }
    }

    /// The header that names the caller, if the limit is per caller.
    pub fn by(&self) -> Option<&HeaderName> {
        self.by.as_ref()
    }

    /// Takes a token for the request with these headers (per caller with `by`).
    pub fn check(&self, headers: &HeaderMap, now: Instant) -> Result<(), Duration> {
        let value = self.by.as_ref().and_then(|h| headers.get(h));
        match value.map(|v| String::from_utf8_lossy(v.as_bytes())) {
            Some(key) => self.take(Some(&*key), now),
            None => self.take(None, now),
        }
    }

    /// Takes a token from `key`'s bucket (`None`, or a limiter without `by`: the shared one), or
    /// says how long until one is available.
    pub fn take(&self, key: Option<&str>, now: Instant) -> Result<(), Duration> {
        let Some(key) = key.filter(|_| self.by.is_some()) else {
            return self.shared.take(now);
        };
        let key = truncate(key, MAX_KEY_BYTES);
        let shard = self.shard(&key);
        // The lock guards a plain map; a panic while holding it cannot leave it torn.
        let mut buckets = shard.buckets.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(k) = buckets.get_mut(&*key) {
            k.last_used = k.last_used.max(now);
            return k.bucket.take(now);
        }
        if buckets.len() >= shard.capacity {
            make_room(&mut buckets, shard.capacity, now);
        }
        let bucket = TokenBucket::new(self.rate, self.burst, now);
        let taken = bucket.take(now);
        buckets.insert(key.into(), Keyed { bucket, last_used: now });
        taken
    }

    /// Per-caller buckets kept.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.buckets.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn shard(&self, key: &str) -> &Shard {
        // The modulo keeps the index below the shard count, so the narrowing is exact.
        let i = (self.hasher.hash_one(key) % self.shards.len() as u64) as usize;
        &self.shards[i]
    }
}

/// Frees at least one place in a full shard: first every bucket that has refilled completely
/// (idle for `burst / rate` or longer: dropping it loses nothing), else the least recently used.
fn make_room(buckets: &mut HashMap<Box<str>, Keyed>, capacity: usize, now: Instant) {
    buckets.retain(|_, k| !k.bucket.is_full(now));
    while buckets.len() >= capacity {
        let Some(oldest) = buckets
            .iter()
            .min_by_key(|(_, k)| k.last_used)
            .map(|(key, _)| key.clone())
        else {
            return;
        };
        buckets.remove(&oldest);
    }
}

/// `key` cut to at most `max` bytes, at a character boundary.
fn truncate(key: &str, max: usize) -> Cow<'_, str> {
    if key.len() <= max {
        return Cow::Borrowed(key);
    }
    let mut end = max;
    while !key.is_char_boundary(end) {
        end -= 1;
    }
    Cow::Owned(key[..end].to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limit(toml_text: &str) -> RateLimitConfig {
        toml::from_str(toml_text).unwrap()
    }

    #[test]
    fn rates_parse_with_units() {
        for (s, per_second) in [
            ("100/s", 100.0),
            ("6000/min", 100.0),
            ("6000/m", 100.0),
            ("36 / h", 0.01),
            ("5/ms", 5000.0),
            ("0.5/s", 0.5),
        ] {
            let r = Rate::parse(s).unwrap();
            assert!((r.per_second() - per_second).abs() < 1e-9, "{s}: {}", r.per_second());
            assert_eq!(Rate::parse(&r.to_string()), Ok(r), "{s} round trip");
        }
        for (s, err) in [
            (
                "100",
                r#"invalid rate "100": expected <count>/<unit> such as "100/s", "6000/min" or "10/h""#,
            ),
            (
                "/s",
                r#"invalid rate "/s": expected <count>/<unit> such as "100/s", "6000/min" or "10/h""#,
            ),
            ("ten/s", r#"invalid rate "ten/s": "ten" is not a finite number"#),
            ("inf/s", r#"invalid rate "inf/s": "inf" is not a finite number"#),
            (
                "100/day",
                r#"invalid rate "100/day": unknown unit "day" (use ms, s, m or min, h)"#,
            ),
        ] {
            assert_eq!(Rate::parse(s).unwrap_err().to_string(), err);
        }
        let e = toml::from_str::<RateLimitConfig>("rate = \"5/fortnight\"").unwrap_err();
        assert!(e.to_string().contains("\"5/fortnight\""), "{e}");
    }

    #[test]
    fn config_defaults_and_unknown_keys() {
        let c = limit("rate = \"6000/min\"");
        assert_eq!((c.burst(), c.by.as_deref(), c.max_keys), (100, None, 10_000));
        assert_eq!(limit("rate = \"10/h\"").burst(), 1);
        assert_eq!(limit("rate = \"2.5/s\"").burst(), 3);
        assert_eq!(limit("rate = \"5/s\"\nburst = 50").burst(), 50);
        assert!(c.validate("route[0].rate_limit").is_empty());
        assert!(toml::from_str::<RateLimitConfig>("rate = \"5/s\"\nbrust = 5").is_err());
        assert!(
            toml::from_str::<RateLimitConfig>("burst = 5").is_err(),
            "rate is required"
        );
        let json = serde_json::to_string(&limit("rate = \"6000/m\"\nby = \"x-caller\"")).unwrap();
        assert!(json.contains(r#""rate":"6000/min""#), "{json}");
    }

    #[test]
    fn validate_reports_every_problem() {
        let c = limit("rate = \"0/s\"\nburst = 0\nby = \"x caller\"\nmax_keys = 0");
        assert_eq!(
            c.validate("outbound[1].rate_limit"),
            [
                r#"outbound[1].rate_limit.rate: must be greater than 0, got "0/s""#,
                "outbound[1].rate_limit.burst: must be at least 1",
                r#"outbound[1].rate_limit.by: "x caller" is not a valid header name"#,
                "outbound[1].rate_limit.max_keys: must be 1..=1000000, got 0",
            ]
        );
        assert_eq!(
            limit("rate = \"2/ms\"\nburst = 1").validate("k").len(),
            0,
            "2000/s is fine"
        );
        assert_eq!(
            limit("rate = \"2000000/ms\"").validate("k"),
            [r#"k.rate: "2000000/ms" is more than 1000000000/s"#]
        );
    }

    #[test]
    fn bucket_starts_full_drains_and_refills() {
        let t0 = Instant::now();
        let b = TokenBucket::new(2.0, 3, t0);
        assert_eq!(b.available(t0), 3);
        for _ in 0..3 {
            assert_eq!(b.take(t0), Ok(()));
        }
        assert_eq!(b.take(t0), Err(ms(500)));
        assert_eq!(b.take(t0 + ms(200)), Err(ms(300)));
        assert_eq!(b.take(t0 + ms(500)), Ok(()));
        assert_eq!(b.take(t0 + ms(500)), Err(ms(500)));
        // Refills to burst, never beyond.
        assert_eq!(b.available(t0 + ms(60_000)), 3);
        for _ in 0..3 {
            assert_eq!(b.take(t0 + ms(60_000)), Ok(()));
        }
        assert!(b.take(t0 + ms(60_000)).is_err());
    }

    #[test]
    fn concurrent_takes_admit_exactly_the_burst() {
        let t0 = Instant::now();
        let b = TokenBucket::new(1.0, 100, t0);
        let admitted: usize = std::thread::scope(|s| {
            let tasks: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..1_000).filter(|_| b.take(t0).is_ok()).count()))
                .collect();
            tasks.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(admitted, 100);
    }

    #[test]
    fn degenerate_rates_do_not_overflow() {
        let t0 = Instant::now();
        for rate in [0.0, -1.0, f64::NAN, 1e-30, 1e12, f64::INFINITY] {
            let b = TokenBucket::new(rate, u32::MAX, t0);
            assert_eq!(b.take(t0), Ok(()), "{rate}");
            let b = TokenBucket::new(rate, 1, t0);
            assert_eq!(b.take(t0), Ok(()), "{rate}");
            let later = t0 + ms(1);
            if rate > 1e9 {
                assert_eq!(b.take(later), Ok(()), "{rate}");
            } else {
                assert!(b.take(later).is_err(), "{rate}");
            }
        }
    }

    #[test]
    fn callers_do_not_share_buckets() {
        let t0 = Instant::now();
        let l = KeyedLimiter::starting_at(&limit("rate = \"1/s\"\nby = \"x-caller\""), t0);
        assert_eq!(l.take(Some("a"), t0), Ok(()));
        assert_eq!(l.take(Some("b"), t0), Ok(()));
        assert_eq!(l.take(Some("a"), t0), Err(ms(1000)));
        // Requests without the header share one bucket, kept outside the map.
        assert_eq!(l.take(None, t0), Ok(()));
        assert!(l.take(None, t0).is_err());
        assert_eq!(l.len(), 2);
        // Through headers.
        let mut h = HeaderMap::new();
        h.insert("x-caller", "c".parse().unwrap());
        assert_eq!(l.check(&h, t0), Ok(()));
        assert!(l.check(&h, t0).is_err());
        assert!(l.check(&HeaderMap::new(), t0).is_err(), "the shared bucket");
        assert_eq!(l.by().map(HeaderName::as_str), Some("x-caller"));
    }

    #[test]
    fn without_by_everyone_shares_one_bucket() {
        let t0 = Instant::now();
        let l = KeyedLimiter::starting_at(&limit("rate = \"1/s\""), t0);
        assert_eq!(l.take(Some("a"), t0), Ok(()));
        assert!(l.take(Some("b"), t0).is_err());
        assert!(l.is_empty());
    }

    #[test]
    fn a_full_shard_evicts_rather_than_grows() {
        let t0 = Instant::now();
        // One shard of one key.
        let l = KeyedLimiter::starting_at(&limit("rate = \"1/s\"\nby = \"x-caller\"\nmax_keys = 1"), t0);
        assert_eq!(l.take(Some("a"), t0), Ok(()));
        // "a" is still empty: evicted as least recently used, "b" gets a fresh bucket.
        assert_eq!(l.take(Some("b"), t0), Ok(()));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn make_room_drops_refilled_buckets_first_then_the_least_recently_used() {
        let t0 = Instant::now();
        let keyed = |last_used: u64, drained: bool| {
            let bucket = TokenBucket::new(1.0, 1, t0);
            if drained {
                bucket.take(t0 + ms(last_used)).unwrap();
            }
            Keyed {
                bucket,
                last_used: t0 + ms(last_used),
            }
        };
        let now = t0 + ms(500);
        // Entries (name, last used ms, drained), and what stays after making room in a shard of 3.
        type Case = (&'static [(&'static str, u64, bool)], &'static [&'static str]);
        let cases: &[Case] = &[
            (
                &[("old", 0, true), ("idle", 100, false), ("busy", 400, true)],
                &["busy", "old"],
            ),
            (
                &[("old", 0, true), ("mid", 100, true), ("busy", 400, true)],
                &["busy", "mid"],
            ),
            (&[("a", 0, false), ("b", 100, false), ("c", 400, false)], &[]),
        ];
        for (entries, kept) in cases {
            let mut map: HashMap<Box<str>, Keyed> = entries
                .iter()
                .map(|&(k, at, drained)| (k.into(), keyed(at, drained)))
                .collect();
            make_room(&mut map, 3, now);
            let mut left: Vec<&str> = map.keys().map(|k| &**k).collect();
            left.sort_unstable();
            assert_eq!(&left, kept, "{entries:?}");
        }
    }

    #[test]
    fn long_keys_are_cut() {
        let t0 = Instant::now();
        let l = KeyedLimiter::starting_at(&limit("rate = \"1/s\"\nby = \"x\""), t0);
        let long = "é".repeat(200);
        l.take(Some(&long), t0).unwrap();
        assert_eq!(truncate(&long, MAX_KEY_BYTES).len(), MAX_KEY_BYTES);
        let other = format!("{}tail", &long[..MAX_KEY_BYTES]);
        assert!(l.take(Some(&other), t0).is_err(), "same first 256 bytes: same caller");
        assert_eq!(truncate("é", 1), "");
    }

    mod properties {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn admitted_never_exceed_burst_plus_refill(
                rate in 0.1f64..1000.0,
                burst in 1u32..50,
                steps in prop::collection::vec(0u64..50_000_000, 1..400),
            ) {
                let t0 = Instant::now();
                let b = TokenBucket::new(rate, burst, t0);
                let mut now = t0;
                let mut admitted = 0u64;
                for step in steps {
                    now += Duration::from_nanos(step);
                    match b.take(now) {
                        Ok(()) => admitted += 1,
                        Err(wait) => {
                            // The wait is exact: a token is there after it, not before.
                            prop_assert!(wait > Duration::ZERO);
                            prop_assert!(b.available(now + wait) >= 1);
                            prop_assert_eq!(b.available(now + wait - Duration::from_nanos(1)), 0);
                        }
                    }
                    let elapsed = (now - t0).as_secs_f64();
                    prop_assert!(admitted as f64 <= f64::from(burst) + rate * elapsed + 1.0,
                        "{} admitted in {}s", admitted, elapsed);
                }
            }

            #[test]
            fn keyed_map_stays_within_max_keys(
                max_keys in 1usize..40,
                takes in prop::collection::vec((0u32..200, 0u64..300), 1..500),
            ) {
                let t0 = Instant::now();
                let c = RateLimitConfig {
                    rate: Rate::parse("5/s").unwrap(),
                    burst: Some(2),
                    by: Some("x-caller".into()),
                    max_keys,
                };
                let l = KeyedLimiter::starting_at(&c, t0);
                let mut now = t0;
                for (key, step) in takes {
                    now += ms(step);
                    let _ = l.take(Some(&key.to_string()), now);
                    prop_assert!(l.len() <= max_keys);
                }
            }

            #[test]
            fn a_caller_is_limited_alone(burst in 1u32..10, others in 0usize..50) {
                let t0 = Instant::now();
                let c = RateLimitConfig {
                    rate: Rate::parse("1/h").unwrap(),
                    burst: Some(burst),
                    by: Some("x-caller".into()),
                    max_keys: 1000,
                };
                let l = KeyedLimiter::starting_at(&c, t0);
                for i in 0..others {
                    let other = format!("other-{i}");
                    prop_assert!(l.take(Some(&other), t0).is_ok());
                }
                let mine = (0..burst + 5).filter(|_| l.take(Some("me"), t0).is_ok()).count();
                prop_assert_eq!(mine, burst as usize);
            }
        }
    }
}
