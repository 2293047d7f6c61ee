//! Fault injection for drills: per route, a delay and an abort (a status or a connection
//! reset) for a percentage of requests, optionally only for requests of one colour, so that a
//! drill runs on a test lane's real traffic without touching customers'.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::Dur;

/// `[route.fault]`
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Delay added before the request is sent upstream.
    #[serde(default)]
    pub delay: Option<Dur>,
    /// Percent of requests delayed (0-100).
    #[serde(default)]
    pub delay_percent: f64,
    /// Status answered instead of forwarding (`abort_reset = true`: the connection is reset).
    #[serde(default)]
    pub abort_status: Option<u16>,
    /// Reset the downstream request instead of answering.
    #[serde(default)]
    pub abort_reset: bool,
    /// Percent of requests aborted (0-100).
    #[serde(default)]
    pub abort_percent: f64,
    /// Only requests of this colour; absent: every request the route takes.
    #[serde(default)]
    pub colour: Option<String>,
}

/// A compiled fault.
#[derive(Clone, Debug)]
pub struct Fault {
    delay: Option<(Duration, f64)>,
    abort: Option<(Abort, f64)>,
    colour: Option<Box<str>>,
}

/// What an injected abort does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Abort {
    Status(u16),
    Reset,
}

/// The fault drawn for one request.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Injected {
    pub delay: Option<Duration>,
    pub abort: Option<Abort>,
}

impl Fault {
    pub fn new(c: &FaultConfig) -> Self {
        let abort = if c.abort_reset {
            Some(Abort::Reset)
        } else {
            c.abort_status.map(Abort::Status)
        };
        Self {
            delay: c.delay.map(|d| (d.get(), c.delay_percent)),
            abort: abort.map(|a| (a, c.abort_percent)),
            colour: c.colour.as_deref().map(Box::from),
        }
    }

    /// Draws this request's fault; `colour` is the request's colour.
    pub fn draw(&self, colour: Option<&[u8]>, mut roll: impl FnMut() -> f64) -> Injected {
        if let Some(want) = &self.colour {
            if colour != Some(want.as_bytes()) {
                return Injected::default();
            }
        }
        Injected {
            delay: self.delay.and_then(|(d, pct)| (roll() * 100.0 < pct).then_some(d)),
            abort: self.abort.and_then(|(a, pct)| (roll() * 100.0 < pct).then_some(a)),
        }
    }
}

impl FaultConfig {
    pub fn validate(&self, key: &str) -> Vec<(String, String)> {
        let mut p = Vec::new();
        for (k, v) in [
            ("delay_percent", self.delay_percent),
            ("abort_percent", self.abort_percent),
        ] {
            if !(0.0..=100.0).contains(&v) {
                p.push((format!("{key}.{k}"), format!("{v} is not a percentage (0-100)")));
            }
        }
        if self.delay_percent > 0.0 && self.delay.is_none() {
            p.push((format!("{key}.delay"), "delay_percent is set but no delay".to_owned()));
        }
        if self.abort_percent > 0.0 && self.abort_status.is_none() && !self.abort_reset {
            p.push((
                format!("{key}.abort_status"),
                "abort_percent is set but neither abort_status nor abort_reset".to_owned(),
            ));
        }
        if let Some(s) = self.abort_status {
            if !(200..=599).contains(&s) {
                p.push((
                    format!("{key}.abort_status"),
                    format!("{s} is not an HTTP status 200-599"),
                ));
            }
            if self.abort_reset {
                p.push((
                    format!("{key}.abort_reset"),
                    "give abort_status or abort_reset, not both".to_owned(),
                ));
            }
        }
        if self.colour.as_deref() == Some("") {
            p.push((format!("{key}.colour"), "must not be empty".to_owned()));
        }
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fault(colour: Option<&str>) -> Fault {
        Fault::new(&FaultConfig {
            delay: Some(Dur::millis(100)),
            delay_percent: 50.0,
            abort_status: Some(503),
            abort_percent: 10.0,
            colour: colour.map(str::to_owned),
            ..FaultConfig::default()
        })
    }

    #[test]
    fn a_colour_limited_fault_touches_no_other_request() {
        let f = fault(Some("drill"));
        let mut rng = fastrand::Rng::with_seed(7);
        for _ in 0..10_000 {
            assert_eq!(f.draw(None, || rng.f64()), Injected::default());
            assert_eq!(f.draw(Some(b"blue"), || rng.f64()), Injected::default());
        }
        let hit = (0..10_000)
            .filter(|_| f.draw(Some(b"drill"), || rng.f64()).abort.is_some())
            .count();
        assert!((800..1200).contains(&hit), "{hit} of 10,000 aborted at 10%");
    }

    #[test]
    fn percentages_follow_the_config() {
        let f = fault(None);
        let mut rng = fastrand::Rng::with_seed(3);
        let delayed = (0..10_000)
            .filter(|_| f.draw(None, || rng.f64()).delay.is_some())
            .count();
        assert!((4_700..5_300).contains(&delayed), "{delayed}");
    }

    #[test]
    fn bad_faults_are_named() {
        let c = FaultConfig {
            delay_percent: 120.0,
            abort_percent: 5.0,
            ..FaultConfig::default()
        };
        let p = format!("{:?}", c.validate("route[1].fault"));
        assert!(p.contains("route[1].fault.delay_percent"), "{p}");
        assert!(p.contains("route[1].fault.delay\""), "{p}");
        assert!(p.contains("route[1].fault.abort_status"), "{p}");
    }
}
