//! Slow start: a new instance's weight goes 1 -> 100 over a window, linear or curved as Envoy's
//! slow start. The registry gets only a few step writes (each is a Raft write on the Consul
//! servers); callers interpolate between them from the ramp start and window in metadata.

use std::time::Duration;

use crate::store::RampRecord;

/// A ramp's shape.
#[derive(Clone, Debug, PartialEq)]
pub struct Ramp {
    pub window: Duration,
    pub aggression: f64,
    /// Weights written to the registry, rising, ending at 100.
    pub steps: Vec<u32>,
}

impl Ramp {
    /// The weight (1..=100) `elapsed` into the ramp.
    pub fn weight_at(&self, elapsed: Duration) -> u32 {
        weight_at(self.window, self.aggression, elapsed)
    }

    /// When each step weight is reached, from the ramp's start.
    pub fn step_times(&self) -> Vec<(Duration, u32)> {
        self.steps
            .iter()
            .map(|&w| {
                let f = (f64::from(w.saturating_sub(1)) / 99.0).clamp(0.0, 1.0);
                // In [0, 1] for a validated aggression; a NaN or infinite share (an aggression
                // no validated config has) reaches the step at the window's end.
                let share = f.powf(self.aggression);
                let share = if share.is_finite() { share.clamp(0.0, 1.0) } else { 1.0 };
                // `mul_f64` panics when the product does not fit (`window * 1.0` of a window
                // near `Duration::MAX` rounds up past it); this falls back to the window.
                let at = Duration::try_from_secs_f64(self.window.as_secs_f64() * share)
                    .map_or(self.window, |d| d.min(self.window));
                (at, w)
            })
            .collect()
    }

    /// The step weight to advertise `elapsed` into the ramp: the last step already reached.
    pub fn advertised_at(&self, elapsed: Duration) -> u32 {
        self.step_times()
            .iter()
            .rev()
            .find(|(t, _)| *t <= elapsed)
            .map_or(1, |&(_, w)| w)
    }

    /// The next step after `elapsed`, if any: (time from start, weight).
    pub fn next_step(&self, elapsed: Duration) -> Option<(Duration, u32)> {
        self.step_times().into_iter().find(|(t, _)| *t > elapsed)
    }

    /// The next step of the ramp `rec` (from the store or the registry) after `now_unix`: how
    /// long from now until it is due, and its weight; `None` when no step is left. Saturating
    /// throughout, and the wait is at most the window plus [`RampRecord::MAX_START_AHEAD_SECS`]
    /// (what a plausible record can need), so that `Instant::now() + wait` cannot overflow
    /// whatever the record says (a start of `u64::MAX` included).
    pub fn next_step_in(&self, rec: RampRecord, now_unix: u64) -> Option<(Duration, u32)> {
        let elapsed = Duration::from_secs(now_unix.saturating_sub(rec.start));
        let (at, weight) = self.next_step(elapsed)?;
        let due = Duration::from_secs(rec.start).saturating_add(at);
        let wait = due.saturating_sub(Duration::from_secs(now_unix));
        let longest = self
            .window
            .saturating_add(Duration::from_secs(RampRecord::MAX_START_AHEAD_SECS));
        Some((wait.min(longest), weight))
    }
}

// === impl RampBook ===

/// This instance's slow start: its shape from `[inbound.ramp]` and its start (from the store,
/// the registry, or begun by this run). The registrar keeps one; it does no I/O.
#[derive(Clone, Debug, Default)]
pub struct RampBook {
    shape: Option<Ramp>,
    record: Option<RampRecord>,
}

impl RampBook {
    /// No `[inbound]` (a caller-only agent): no shape, every weight is the target's.
    pub fn new(inbound: Option<&crate::config::InboundConfig>, record: Option<RampRecord>) -> Self {
        let shape = inbound.map(|i| Ramp {
            window: i.ramp.window.get(),
            aggression: i.ramp.aggression,
            steps: i.ramp.steps.clone(),
        });
        Self { shape, record }
    }

    pub fn record(&self) -> Option<RampRecord> {
        self.record
    }

    pub fn set(&mut self, record: RampRecord) {
        self.record = Some(record);
    }

    /// A new ramp from weight 1 starting at `now_unix`: the record to store, or `None` without
    /// a shape.
    pub fn begin(&mut self, now_unix: u64) -> Option<RampRecord> {
        let shape = self.shape.as_ref()?;
        let record = RampRecord {
            start: now_unix,
            window_secs: shape.window.as_secs(),
        };
        self.record = Some(record);
        Some(record)
    }

    pub fn window(&self) -> Option<Duration> {
        self.shape.as_ref().map(|s| s.window)
    }

    fn elapsed(&self, now_unix: u64) -> Option<Duration> {
        Some(Duration::from_secs(now_unix.saturating_sub(self.record?.start)))
    }

    /// The step weight (1..=100) to advertise now: 1 before a ramp began (when there is one to
    /// begin), 100 without a ramp.
    pub fn advertised(&self, now_unix: u64) -> u32 {
        match (&self.shape, self.elapsed(now_unix)) {
            (Some(shape), Some(elapsed)) => shape.advertised_at(elapsed),
            (Some(shape), None) if !shape.window.is_zero() => 1,
            _ => 100,
        }
    }

    /// The weight callers interpolate to now, scaled to `target` (the CMDB's weight).
    pub fn effective(&self, now_unix: u64, target: u32) -> u32 {
        match (&self.shape, self.elapsed(now_unix)) {
            (Some(shape), Some(elapsed)) => scale(shape.weight_at(elapsed), target),
            _ => target,
        }
    }

    /// How long until the next step write is due, if a step is left.
    pub fn next_step_in(&self, now_unix: u64) -> Option<Duration> {
        let (wait, _) = self.shape.as_ref()?.next_step_in(self.record?, now_unix)?;
        Some(wait)
    }

    /// The registry metadata callers read the ramp from (`vmesh-ramp-*`), empty without one.
    pub fn meta(&self) -> Vec<(&'static str, String)> {
        let (Some(r), Some(shape)) = (self.record, &self.shape) else {
            return Vec::new();
        };
        let mut meta = vec![
            ("vmesh-ramp-start", r.start.to_string()),
            ("vmesh-ramp-window", r.window_secs.to_string()),
        ];
        if (shape.aggression - 1.0).abs() > f64::EPSILON {
            meta.push(("vmesh-ramp-aggression", shape.aggression.to_string()));
        }
        meta
    }
}

/// The weight (1..=100) of a ramp of `window` and `aggression` at `elapsed`.
pub fn weight_at(window: Duration, aggression: f64, elapsed: Duration) -> u32 {
    if window.is_zero() || elapsed >= window {
        return 100;
    }
    let f = (elapsed.as_secs_f64() / window.as_secs_f64()).powf(1.0 / aggression.max(0.01));
    (1.0 + 99.0 * f).floor().clamp(1.0, 100.0) as u32
}

/// Scales a 1..=100 ramp weight to a target weight (the CMDB's `weight`).
pub fn scale(weight: u32, target: u32) -> u32 {
    ((u64::from(weight) * u64::from(target)) / 100).clamp(1, u64::from(target.max(1))) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ramp(aggression: f64) -> Ramp {
        Ramp {
            window: Duration::from_secs(99),
            aggression,
            steps: vec![1, 10, 33, 66, 100],
        }
    }

    #[test]
    fn linear_ramp_is_linear_and_ends_at_100() {
        let r = ramp(1.0);
        assert_eq!(r.weight_at(Duration::ZERO), 1);
        assert_eq!(r.weight_at(Duration::from_secs(9)), 10);
        assert_eq!(r.weight_at(Duration::from_secs(49)), 50);
        assert_eq!(r.weight_at(Duration::from_secs(99)), 100);
        assert_eq!(r.weight_at(Duration::from_secs(500)), 100);
    }

    #[test]
    fn weights_never_fall_over_the_window() {
        for aggression in [0.5, 1.0, 2.0, 4.0] {
            let r = ramp(aggression);
            let mut prev = 0;
            for s in 0..=120 {
                let w = r.weight_at(Duration::from_secs(s));
                assert!(
                    w >= prev && (1..=100).contains(&w),
                    "aggression {aggression} at {s}s: {w} < {prev}"
                );
                prev = w;
            }
            assert_eq!(prev, 100);
        }
    }

    #[test]
    fn steps_are_reached_when_the_curve_reaches_them() {
        let r = ramp(1.0);
        let t = r.step_times();
        assert_eq!(t[0], (Duration::ZERO, 1));
        assert_eq!(t[1], (Duration::from_secs(9), 10));
        assert_eq!(t[4], (Duration::from_secs(99), 100));
        assert_eq!(r.advertised_at(Duration::from_secs(40)), 33);
        assert_eq!(
            r.next_step(Duration::from_secs(40)),
            Some((Duration::from_secs(65), 66))
        );
        assert_eq!(r.next_step(Duration::from_secs(99)), None);
        // A more aggressive curve reaches every step earlier.
        let fast = ramp(2.0).step_times();
        for (a, b) in fast.iter().zip(&t).skip(1).take(3) {
            assert!(a.0 < b.0, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn at_most_five_writes_per_default_ramp() {
        assert_eq!(ramp(1.0).step_times().len(), 5);
    }

    #[test]
    fn next_step_waits_from_the_record() {
        let r = ramp(1.0);
        let rec = |start| RampRecord { start, window_secs: 99 };
        assert_eq!(r.next_step_in(rec(1000), 1040), Some((Duration::from_secs(25), 66)));
        assert_eq!(r.next_step_in(rec(1000), 1000), Some((Duration::from_secs(9), 10)));
        assert_eq!(r.next_step_in(rec(1000), 2000), None);
        // A start a little ahead (the clock stepped back): the wait includes the gap.
        assert_eq!(r.next_step_in(rec(1010), 1000), Some((Duration::from_secs(19), 10)));
    }

    #[test]
    fn extreme_records_and_shapes_do_not_panic() {
        let longest = Duration::from_secs(99 + RampRecord::MAX_START_AHEAD_SECS);
        for start in [0, 1, u64::MAX / 2, u64::MAX - 1, u64::MAX] {
            for now in [0, 1_764_200_000, u64::MAX] {
                let rec = RampRecord {
                    start,
                    window_secs: u64::MAX,
                };
                if let Some((wait, w)) = ramp(1.0).next_step_in(rec, now) {
                    assert!(wait <= longest && (1..=100).contains(&w), "{start} {now}: {wait:?}");
                    // What the registrar does with it.
                    let _ = std::time::Instant::now() + wait;
                }
            }
        }
        for window in [
            Duration::ZERO,
            Duration::from_nanos(1),
            Duration::from_secs(u64::MAX),
            Duration::MAX,
        ] {
            for aggression in [f64::NAN, f64::INFINITY, -1.0, 0.0, f64::MIN_POSITIVE, 10.0, f64::MAX] {
                let r = Ramp {
                    window,
                    aggression,
                    steps: vec![1, 10, 33, 66, 100],
                };
                for (at, _) in r.step_times() {
                    assert!(at <= window, "{window:?} {aggression}: {at:?}");
                }
                for elapsed in [Duration::ZERO, window / 2, window, Duration::MAX] {
                    assert!((1..=100).contains(&r.weight_at(elapsed)));
                    assert!((1..=100).contains(&r.advertised_at(elapsed)));
                }
            }
        }
    }

    proptest::proptest! {
        /// Any ramp record (from the registry or the store) and clock: no panic, a wait the
        /// registrar can add to an `Instant`, and a weight in range.
        #[test]
        fn any_record_gives_a_bounded_wait(start: u64, window_secs: u64, now: u64, window in 0u64..=86_400, aggression in 0.01f64..=10.0) {
            let r = Ramp { window: Duration::from_secs(window), aggression, steps: vec![1, 10, 33, 66, 100] };
            if let Some((wait, w)) = r.next_step_in(RampRecord { start, window_secs }, now) {
                proptest::prop_assert!(wait <= Duration::from_secs(window + RampRecord::MAX_START_AHEAD_SECS));
                proptest::prop_assert!((1..=100).contains(&w));
            }
            let elapsed = Duration::from_secs(now.saturating_sub(start));
            proptest::prop_assert!((1..=100).contains(&r.weight_at(elapsed)));
        }
    }

    #[test]
    fn scaling_to_target() {
        assert_eq!(scale(100, 40), 40);
        assert_eq!(scale(1, 40), 1);
        assert_eq!(scale(50, 100), 50);
    }
}
