//! `GET /doctor`: "is it the sidecar?" for the last minute. The proxy's own time and the
//! upstream's (percentiles of the per-second histogram increments the host sampler keeps), the
//! host's CPU pressure, and a verdict naming the likeliest culprit, `upstream`, `host`,
//! `sidecar` or `healthy`, with the numbers that decided it.
//!
//! The rules, in order (docs/operations.md, "Is it the sidecar?"):
//! 1. `upstream`: the upstream's time dominates (its p99 at least 4x the overhead's p99 over the
//!    last 10 s) and rose: its p50 over the last 10 s is at least 3x, and 2 ms more than, the
//!    lowest p50 of an earlier 10 s slice of the minute, and more than CPU pressure explains.
//!    A task that waits for a CPU a share `p` of the time runs about `1/(1-p)` slower; a rise
//!    beyond `4/(1-p)` (at most 80x) is the upstream's own.
//! 2. `host`: CPU pressure (PSI, host or cgroup) of at least 0.25, steal of at least 0.10 or a
//!    run queue of at least 2 per CPU (mean over the minute or over the last 10 s), while the
//!    agent's own CPU time is at most half of the host's busy time.
//! 3. `sidecar`: the host is pressed and the agent is the larger half of its busy time; or the
//!    overhead's p99 is at least 1 ms and at least the upstream's p99 while the host is calm.
//! 4. `healthy`: none of these.

use serde_json::{json, Value};

use crate::telemetry::histogram::BUCKETS;
use crate::telemetry::host::{self, HostSample, Second};
use crate::telemetry::metrics::TIMING_BUCKETS;

/// The slice "now" is measured on, and the slices the baseline is chosen from.
const SLICE_SECONDS: u64 = 10;
/// Fewer requests than this in a slice give no percentile for it.
const MIN_REQUESTS: u64 = 5;
/// PSI `some avg10` from which the host counts as pressed: a quarter of the time some runnable
/// task waited for a CPU.
const PRESSURE_HIGH: f64 = 0.25;
/// Steal from which the host counts as pressed: the hypervisor took a tenth of the CPU time.
const STEAL_HIGH: f64 = 0.10;
/// Runnable tasks per CPU from which the host counts as pressed.
const RUN_QUEUE_PER_CPU_HIGH: f64 = 2.0;
/// The agent's share of the host's busy CPU time up to which it is not the one pressing it.
const AGENT_SHARE_MODEST: f64 = 0.5;
/// The upstream's p99 must be this many times the overhead's p99 to dominate.
const UPSTREAM_DOMINATES: f64 = 4.0;
/// The upstream's p50 must rise at least this many times over its baseline...
const UPSTREAM_RISE: f64 = 3.0;
/// ...and by at least this much (seconds), so microsecond jitter does not count...
const UPSTREAM_RISE_MIN: f64 = 0.002;
/// ...and by more than this many times what CPU pressure explains (`1/(1-p)`).
const PRESSURE_EXPLAINS: f64 = 4.0;
/// Pressure is capped here in that formula (PSI reads 1.0 on a saturated host).
const PRESSURE_CAP: f64 = 0.95;
/// The overhead's p99 from which the sidecar can be the culprit.
const SIDECAR_MIN: f64 = 0.001;

/// The likeliest culprit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Culprit {
    Upstream,
    Host,
    Sidecar,
    Healthy,
}

/// p50 and p99 in seconds (None without enough requests).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Percentiles {
    pub requests: u64,
    pub p50: Option<f64>,
    pub p99: Option<f64>,
}

/// Mean and max of one host value over some seconds (None when unknown in all of them).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Stat {
    pub mean: Option<f64>,
    pub max: Option<f64>,
}

/// The host over the minute and over the last 10 s.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct HostSummary {
    /// The higher of the host's and the cgroup's PSI, per second.
    pub pressure: Stat,
    pub recent_pressure: Stat,
    pub cgroup_pressure: Stat,
    pub steal: Stat,
    pub recent_steal: Stat,
    pub run_queue: Stat,
    pub recent_run_queue: Stat,
    pub busy: Stat,
    pub agent_cpu: Stat,
    pub cpus: u32,
}

/// Everything `/doctor` reports.
#[derive(Clone, Debug, PartialEq)]
pub struct Diagnosis {
    pub seconds: usize,
    pub overhead: Percentiles,
    pub upstream: Percentiles,
    pub recent_overhead: Percentiles,
    pub recent_upstream: Percentiles,
    /// The lowest upstream p50 of the earlier 10 s slices.
    pub upstream_baseline_p50: Option<f64>,
    pub host: HostSummary,
    pub verdict: Culprit,
    pub reason: String,
}

/// `GET /doctor`: the diagnosis of the last minute as JSON.
pub fn report() -> Value {
    to_json(&diagnose(&host::monitor().last_minute()))
}

/// Diagnoses `seconds` (oldest first, at most a minute).
pub fn diagnose(seconds: &[Second]) -> Diagnosis {
    let newest = seconds.last().map_or(0, |s| s.unix_secs);
    let age = |s: &Second| newest.saturating_sub(s.unix_secs);
    let recent: Vec<&Second> = seconds.iter().filter(|s| age(s) < SLICE_SECONDS).collect();
    let all: Vec<&Second> = seconds.iter().collect();

    let overhead = percentiles(&merge(&all, |s| &s.overhead));
    let upstream = percentiles(&merge(&all, |s| &s.upstream));
    let recent_overhead = percentiles(&merge(&recent, |s| &s.overhead));
    let recent_upstream = percentiles(&merge(&recent, |s| &s.upstream));
    let upstream_baseline_p50 = (1..host::WINDOW_SECONDS as u64 / SLICE_SECONDS)
        .filter_map(|k| {
            let slice: Vec<&Second> = seconds.iter().filter(|s| age(s) / SLICE_SECONDS == k).collect();
            percentiles(&merge(&slice, |s| &s.upstream)).p50
        })
        .min_by(f64::total_cmp);

    let host = summarize(&all, &recent);
    let mut d = Diagnosis {
        seconds: seconds.len(),
        overhead,
        upstream,
        recent_overhead,
        recent_upstream,
        upstream_baseline_p50,
        host,
        verdict: Culprit::Healthy,
        reason: String::new(),
    };
    (d.verdict, d.reason) = verdict(&d);
    d
}

/// The rules of the module's header, in order.
fn verdict(d: &Diagnosis) -> (Culprit, String) {
    let h = &d.host;
    let pressure_now = h
        .recent_pressure
        .mean
        .unwrap_or(0.0)
        .max(h.recent_steal.mean.unwrap_or(0.0));
    let explained = PRESSURE_EXPLAINS / (1.0 - pressure_now.min(PRESSURE_CAP));

    if let (Some(up99), Some(up50), Some(base)) =
        (d.recent_upstream.p99, d.recent_upstream.p50, d.upstream_baseline_p50)
    {
        let over99 = d.recent_overhead.p99.unwrap_or(0.0);
        let rise = if base > 0.0 { up50 / base } else { f64::INFINITY };
        if up99 >= UPSTREAM_DOMINATES * over99
            && rise >= UPSTREAM_RISE.max(explained)
            && up50 - base >= UPSTREAM_RISE_MIN
        {
            return (
                Culprit::Upstream,
                format!(
                    "upstream p50 rose {} to {} over the last 10 s (baseline {}), p99 {} against a proxy overhead p99 of {}; CPU pressure {} explains at most {:.1}x",
                    times(rise),
                    ms(Some(up50)),
                    ms(Some(base)),
                    ms(Some(up99)),
                    ms(Some(over99)),
                    ratio(Some(pressure_now)),
                    explained
                ),
            );
        }
    }

    let pressed = pressed_by(h);
    let agent_share = match (h.agent_cpu.mean, h.busy.mean) {
        (Some(a), Some(b)) if b > 0.0 => Some((a / b).min(1.0)),
        _ => None,
    };
    let agent_modest = match (agent_share, h.agent_cpu.mean) {
        (Some(share), _) => share <= AGENT_SHARE_MODEST,
        (None, Some(a)) => a < AGENT_SHARE_MODEST / 2.0,
        (None, None) => true,
    };
    let agent_text = format!(
        "vmesh used {} of the CPUs ({} of the busy time)",
        ratio(h.agent_cpu.mean),
        agent_share.map_or_else(|| "-".to_owned(), |s| format!("{:.0}%", s * 100.0))
    );
    if let Some(why) = &pressed {
        if agent_modest {
            return (Culprit::Host, format!("{why} while {agent_text}"));
        }
        return (
            Culprit::Sidecar,
            format!("{why} and {agent_text}: the agent is the one pressing the host"),
        );
    }
    if let Some(over99) = d.overhead.p99 {
        let up99 = d.upstream.p99.unwrap_or(0.0);
        if over99 >= SIDECAR_MIN && over99 >= up99 {
            return (
                Culprit::Sidecar,
                format!(
                    "proxy overhead p99 {} is not below upstream p99 {} while the host is calm (CPU pressure {}); {agent_text}",
                    ms(Some(over99)),
                    ms(Some(up99)),
                    ratio(h.pressure.mean)
                ),
            );
        }
    }
    (
        Culprit::Healthy,
        format!(
            "no host pressure (CPU pressure {}, steal {}), proxy overhead p99 {}, upstream p99 {} (last 10 s p50 {}, baseline {})",
            ratio(h.pressure.mean),
            ratio(h.steal.mean),
            ms(d.overhead.p99),
            ms(d.upstream.p99),
            ms(d.recent_upstream.p50),
            ms(d.upstream_baseline_p50)
        ),
    )
}

/// Why the host counts as pressed, if it does: the first of pressure, steal and run queue over
/// its threshold, over the minute or the last 10 s.
fn pressed_by(h: &HostSummary) -> Option<String> {
    let worse = |a: Stat, b: Stat| a.mean.into_iter().chain(b.mean).reduce(f64::max);
    if let Some(p) = worse(h.pressure, h.recent_pressure).filter(|&p| p >= PRESSURE_HIGH) {
        return Some(format!("CPU pressure {} (PSI some avg10)", ratio(Some(p))));
    }
    if let Some(s) = worse(h.steal, h.recent_steal).filter(|&s| s >= STEAL_HIGH) {
        return Some(format!("CPU steal {}", ratio(Some(s))));
    }
    let cpus = f64::from(h.cpus.max(1));
    if let Some(q) = worse(h.run_queue, h.recent_run_queue).filter(|&q| q / cpus >= RUN_QUEUE_PER_CPU_HIGH) {
        return Some(format!("run queue {q:.1} on {} CPU(s)", h.cpus));
    }
    None
}

fn summarize(all: &[&Second], recent: &[&Second]) -> HostSummary {
    let pressure = |s: &HostSample| match (s.cpu_pressure, s.cgroup_cpu_pressure) {
        (Some(a), Some(b)) => Some(a.max(b)),
        (a, b) => a.or(b),
    };
    HostSummary {
        pressure: stat(all, pressure),
        recent_pressure: stat(recent, pressure),
        cgroup_pressure: stat(all, |s| s.cgroup_cpu_pressure),
        steal: stat(all, |s| s.cpu_steal),
        recent_steal: stat(recent, |s| s.cpu_steal),
        run_queue: stat(all, |s| s.run_queue.map(f64::from)),
        recent_run_queue: stat(recent, |s| s.run_queue.map(f64::from)),
        busy: stat(all, |s| s.cpu_busy),
        agent_cpu: stat(all, |s| s.agent_cpu),
        cpus: all.last().map_or(0, |s| s.host.cpus),
    }
}

fn stat(seconds: &[&Second], value: impl Fn(&HostSample) -> Option<f64>) -> Stat {
    let values: Vec<f64> = seconds.iter().filter_map(|s| value(&s.host)).collect();
    if values.is_empty() {
        return Stat::default();
    }
    Stat {
        mean: Some(values.iter().sum::<f64>() / values.len() as f64),
        max: values.iter().copied().reduce(f64::max),
    }
}

fn merge(seconds: &[&Second], pick: impl Fn(&Second) -> &[u64; TIMING_BUCKETS]) -> [u64; TIMING_BUCKETS] {
    let mut sum = [0; TIMING_BUCKETS];
    for s in seconds {
        for (t, n) in sum.iter_mut().zip(pick(s)) {
            *t += n;
        }
    }
    sum
}

fn percentiles(counts: &[u64; TIMING_BUCKETS]) -> Percentiles {
    let requests = counts.iter().sum();
    if requests < MIN_REQUESTS {
        return Percentiles {
            requests,
            ..Percentiles::default()
        };
    }
    Percentiles {
        requests,
        p50: quantile(counts, 0.5),
        p99: quantile(counts, 0.99),
    }
}

/// The `q` quantile of bucket counts (+Inf last), interpolated linearly inside its bucket as
/// Prometheus' `histogram_quantile` does; a quantile in +Inf is the highest finite bound.
pub fn quantile(counts: &[u64; TIMING_BUCKETS], q: f64) -> Option<f64> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q.clamp(0.0, 1.0) * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            let lower = if i == 0 { 0.0 } else { BUCKETS[i - 1] };
            let Some(&upper) = BUCKETS.get(i) else {
                return Some(lower);
            };
            return Some(lower + (upper - lower) * (rank - below as f64).max(0.0) / n as f64);
        }
        below += n;
    }
    BUCKETS.last().copied()
}

// === JSON and text ===

fn culprit_str(c: Culprit) -> &'static str {
    match c {
        Culprit::Upstream => "upstream",
        Culprit::Host => "host",
        Culprit::Sidecar => "sidecar",
        Culprit::Healthy => "healthy",
    }
}

/// Seconds as milliseconds with three decimals.
fn ms_value(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |s| json!((s * 1e6).round() / 1e3))
}

fn ratio_value(v: Option<f64>) -> Value {
    v.map_or(Value::Null, |r| json!((r * 1e4).round() / 1e4))
}

fn percentiles_json(p: &Percentiles) -> Value {
    json!({"requests": p.requests, "p50_ms": ms_value(p.p50), "p99_ms": ms_value(p.p99)})
}

fn stat_json(s: &Stat) -> Value {
    json!({"mean": ratio_value(s.mean), "max": ratio_value(s.max)})
}

pub fn to_json(d: &Diagnosis) -> Value {
    let h = &d.host;
    json!({
        "window_seconds": d.seconds,
        "verdict": culprit_str(d.verdict),
        "reason": d.reason,
        "overhead": {
            "minute": percentiles_json(&d.overhead),
            "last_10s": percentiles_json(&d.recent_overhead),
        },
        "upstream": {
            "minute": percentiles_json(&d.upstream),
            "last_10s": percentiles_json(&d.recent_upstream),
            "baseline_p50_ms": ms_value(d.upstream_baseline_p50),
        },
        "host": {
            "cpus": h.cpus,
            "cpu_pressure": stat_json(&h.pressure),
            "cpu_pressure_last_10s": stat_json(&h.recent_pressure),
            "cgroup_cpu_pressure": stat_json(&h.cgroup_pressure),
            "cpu_steal": stat_json(&h.steal),
            "run_queue": stat_json(&h.run_queue),
            "cpu_busy": stat_json(&h.busy),
            "agent_cpu": stat_json(&h.agent_cpu),
        },
    })
}

fn ms(v: Option<f64>) -> String {
    match v {
        None => "-".to_owned(),
        Some(s) if s < 0.001 => format!("{:.3} ms", s * 1e3),
        Some(s) => format!("{:.1} ms", s * 1e3),
    }
}

fn ratio(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"))
}

fn times(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.0}x")
    } else {
        "from zero".to_owned()
    }
}

#[cfg(test)]
mod tests;
