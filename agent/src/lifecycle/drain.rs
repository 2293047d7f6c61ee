//! `vmesh drain` / `vmesh undrain` and SIGTERM's shutdown, as a state machine: where the
//! instance is in its drain cycle and when a draining instance counts as drained. The registrar
//! (registrar.rs) drives it and does the registry writes each transition asks for; this file
//! decides, it does no I/O. (Closing connections at SIGTERM is `proxy/shutdown.rs`.)
//!
//! ```text
//!            drain                      grace passed, 0 in flight, registry written
//! Serving ─────────▶ Draining ──────────────────────────────────────────▶ Drained
//!    ▲                  │                                                    │
//!    └──────────────────┴───────────── undrain (after a fresh health pass) ─┘
//! ```

use std::time::{Duration, Instant};

use serde::Serialize;

/// Where the instance is in its drain cycle.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainPhase {
    #[default]
    Serving,
    Draining,
    Drained,
}

/// The drain cycle of this instance.
#[derive(Clone, Copy, Debug, Default)]
pub struct DrainState {
    phase: DrainPhase,
    since: Option<Instant>,
}

impl DrainState {
    /// At start-up: drained when the store's drain flag says so (an earlier `vmesh drain`
    /// survives a restart), else serving.
    pub fn from_flag(drained: bool) -> Self {
        Self {
            phase: if drained {
                DrainPhase::Drained
            } else {
                DrainPhase::Serving
            },
            since: None,
        }
    }

    pub fn phase(&self) -> DrainPhase {
        self.phase
    }

    /// Whether the registry should show the instance in maintenance (not passing).
    pub fn out_of_traffic(&self) -> bool {
        self.phase != DrainPhase::Serving
    }

    /// `vmesh drain`: returns whether this starts a drain (the flag must be stored first and
    /// the registry told); draining or drained already is a no-op.
    pub fn drain(&mut self, now: Instant) -> bool {
        if self.phase != DrainPhase::Serving {
            return false;
        }
        self.phase = DrainPhase::Draining;
        self.since = Some(now);
        true
    }

    /// A drained state found in the registry while the store had none (a lost store).
    pub fn adopt_drained(&mut self) {
        self.phase = DrainPhase::Drained;
        self.since = None;
    }

    /// Whether a draining instance is drained now: callers had `grace` to see it marked down
    /// (counted from the drain request), no inbound request is in flight, and the registry
    /// holds the maintenance state (`registry_behind` is false). Returns true on the
    /// transition.
    pub fn progress(&mut self, now: Instant, grace: Duration, in_flight: u64, registry_behind: bool) -> bool {
        if self.phase != DrainPhase::Draining {
            return false;
        }
        let since = *self.since.get_or_insert(now);
        if now.saturating_duration_since(since) >= grace && in_flight == 0 && !registry_behind {
            self.phase = DrainPhase::Drained;
            return true;
        }
        false
    }

    /// `vmesh undrain`: back to serving. Returns whether anything changed (serving already:
    /// the ramp in progress is kept).
    pub fn undrain(&mut self) -> bool {
        if self.phase == DrainPhase::Serving {
            return false;
        }
        self.phase = DrainPhase::Serving;
        self.since = None;
        true
    }

    /// SIGTERM: marks a serving instance down for the rest of the process's life; returns
    /// whether callers need the grace period to notice (they do unless it was already down).
    pub fn shutdown(&mut self, now: Instant) -> bool {
        self.drain(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(5);

    #[test]
    fn drain_waits_for_the_grace_the_requests_and_the_registry() {
        let t0 = Instant::now();
        let mut d = DrainState::from_flag(false);
        assert!(!d.out_of_traffic());
        assert!(d.drain(t0));
        assert!(!d.drain(t0), "a second drain is a no-op");
        assert!(d.out_of_traffic());
        // (elapsed, in flight, registry behind) -> drained?
        for (elapsed, in_flight, behind, drained) in [
            (0, 0, false, false),
            (4, 0, false, false),
            (5, 1, false, false),
            (5, 0, true, false),
            (5, 0, false, true),
        ] {
            let mut d = d;
            let now = t0 + Duration::from_secs(elapsed);
            assert_eq!(
                d.progress(now, GRACE, in_flight, behind),
                drained,
                "{elapsed}s, {in_flight} in flight, behind={behind}"
            );
            assert_eq!(d.phase() == DrainPhase::Drained, drained);
        }
    }

    #[test]
    fn undrain_from_any_drain_phase_and_not_from_serving() {
        let t0 = Instant::now();
        let mut serving = DrainState::from_flag(false);
        assert!(!serving.undrain(), "serving already: nothing to do (the ramp is kept)");
        let mut draining = DrainState::from_flag(false);
        draining.drain(t0);
        assert!(draining.undrain());
        assert_eq!(draining.phase(), DrainPhase::Serving);
        let mut drained = DrainState::from_flag(true);
        assert_eq!(drained.phase(), DrainPhase::Drained);
        assert!(
            !drained.progress(t0, GRACE, 0, false),
            "only a draining instance progresses"
        );
        assert!(drained.undrain());
        assert!(!drained.out_of_traffic());
    }

    #[test]
    fn shutdown_needs_the_grace_only_when_serving() {
        let t0 = Instant::now();
        assert!(DrainState::from_flag(false).shutdown(t0));
        assert!(!DrainState::from_flag(true).shutdown(t0));
        let mut adopted = DrainState::from_flag(false);
        adopted.adopt_drained();
        assert!(!adopted.shutdown(t0));
    }
}
