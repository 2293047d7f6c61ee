//! Host CPU usage for load shedding: pure parsers of `/proc/stat` and cgroup v2 `cpu.stat` /
//! `cpu.max`, and `CpuGauge`, a per-mille value that one background task keeps fresh.
//!
//! The request path only loads an atomic; the sampler task is the one place that reads files.
//! In a container with a CPU quota (cgroup v2 `cpu.max` is not `max`) usage is relative to the
//! quota, so a container limited to 1.5 CPUs that burns 1.5 CPUs reads 100 %; elsewhere (a VM,
//! or a cgroup without a quota) it is the whole host's busy share from `/proc/stat`.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

/// How often `spawn_sampler` is meant to read, unless told otherwise.
pub const DEFAULT_SAMPLE_INTERVAL: Duration = Duration::from_millis(250);

/// Time constant of the EWMA that smooths the readings: a sample taken `dt` after the previous
/// one weighs `1 - exp(-dt / EWMA_TAU)` (22 % at the 250 ms default interval), so a step change
/// shows 63 % of its height after 1 s and 95 % after 3 s. Fast enough to shed within a second
/// of a CPU spike, slow enough that one busy tick (a GC pause) does not shed at all.
pub const EWMA_TAU: Duration = Duration::from_secs(1);

/// The shortest interval `spawn_sampler` accepts (a zero interval would spin).
const MIN_SAMPLE_INTERVAL: Duration = Duration::from_millis(10);

/// Host (or cgroup) CPU usage in per-mille, shared by clones. 0 until the first reading.
#[derive(Clone, Debug, Default)]
pub struct CpuGauge(Arc<AtomicU32>);

/// Cumulative CPU time from the aggregate `cpu` line of `/proc/stat`, in jiffies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuTimes {
    /// user + nice + system + irq + softirq + steal.
    pub busy: u64,
    /// busy + idle + iowait.
    pub total: u64,
}

/// A cgroup v2 CPU quota from `cpu.max`: `quota_usec` of CPU time per `period_usec`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuQuota {
    pub quota_usec: u64,
    pub period_usec: u64,
}

/// Malformed `/proc/stat`, `cpu.stat` or `cpu.max` text.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParseError {
    #[error("no aggregate `cpu` line")]
    NoCpuLine,
    #[error("the `cpu` line has {0} counters, expected at least 4")]
    TooFewFields(usize),
    #[error("{field}: {value:?} is not a non-negative integer")]
    NotANumber { field: &'static str, value: String },
    #[error("no `usage_usec` line")]
    NoUsage,
    #[error("expected \"max <period>\" or \"<quota> <period>\" with a non-zero period, got {0:?}")]
    BadMax(String),
}

/// A sampler tick that produced no reading.
#[derive(Debug, thiserror::Error)]
pub enum SampleError {
    #[error("cpu sampler: {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("cpu sampler: {}: {source}", path.display())]
    Parse { path: PathBuf, source: ParseError },
}

/// Reads the CPU files and turns successive readings into a smoothed per-mille value.
#[derive(Debug)]
struct Sampler {
    proc_stat: PathBuf,
    cgroup_dir: PathBuf,
    /// `cpu.stat` existed at start: a cgroup v2 hierarchy is mounted at `cgroup_dir`.
    cgroup_v2: bool,
    prev: Option<Reading>,
    /// Smoothed per-mille, as f64 (None until two readings).
    smoothed: Option<f64>,
}

/// One raw reading, kept to compute the next delta.
#[derive(Clone, Copy, Debug)]
struct Reading {
    at: Instant,
    kind: ReadingKind,
}

#[derive(Clone, Copy, Debug)]
enum ReadingKind {
    Proc(CpuTimes),
    Cgroup { usage_usec: u64, quota: CpuQuota },
}

// === impl CpuGauge ===

impl CpuGauge {
    /// A gauge reading 0 that nothing updates but `set` (tests, or shedding disabled).
    pub fn new() -> Self {
        Self::default()
    }

    /// Usage in percent, 0..=100 (rounded down).
    pub fn percent(&self) -> u32 {
        self.permille() / 10
    }

    /// Usage in per-mille, 0..=1000.
    pub fn permille(&self) -> u32 {
        self.0.load(Ordering::Relaxed)
    }

    /// Sets the usage in percent (clamped to 100).
    pub fn set(&self, percent: u32) {
        self.set_permille(percent.saturating_mul(10));
    }

    /// Sets the usage in per-mille (clamped to 1000).
    pub fn set_permille(&self, permille: u32) {
        self.0.store(permille.min(1000), Ordering::Relaxed);
    }

    /// A gauge kept fresh by a tokio task that samples every `interval` (at least 10 ms;
    /// `DEFAULT_SAMPLE_INTERVAL` is the usual choice) and smooths with `EWMA_TAU`. The task ends
    /// when the last clone of the gauge is dropped. A failed read keeps the last value and is
    /// logged at debug once per run of failures. Outside a tokio runtime no task can start: the
    /// gauge then stays at 0 (no CPU shedding) and a warning says so.
    pub fn spawn_sampler(interval: Duration) -> CpuGauge {
        let gauge = CpuGauge::new();
        let handle = match tokio::runtime::Handle::try_current() {
            Ok(h) => h,
            Err(e) => {
                tracing::warn!(error = %e, "cpu sampler not started: CPU-based shedding is off");
                return gauge;
            }
        };
        let weak = Arc::downgrade(&gauge.0);
        let sampler = Sampler::new(Path::new("/proc/stat"), Path::new("/sys/fs/cgroup"));
        handle.spawn(run_sampler(sampler, weak, interval.max(MIN_SAMPLE_INTERVAL)));
        gauge
    }
}

async fn run_sampler(mut sampler: Sampler, gauge: Weak<AtomicU32>, interval: Duration) {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        ticker.tick().await;
        let Some(cell) = gauge.upgrade() else {
            tracing::debug!("cpu sampler stopped: no gauge left");
            return;
        };
        // Reading procfs/sysfs never waits on a disk: a few microseconds, fine on a runtime
        // thread, and cheaper than a `spawn_blocking` hop every tick.
        match sampler.tick(Instant::now()) {
            Ok(Some(permille)) => {
                cell.store(permille, Ordering::Relaxed);
                failing = false;
            }
            Ok(None) => failing = false,
            Err(e) => {
                if !failing {
                    tracing::debug!(error = %e, "cpu reading failed; keeping the last value");
                }
                failing = true;
            }
        }
    }
}

// === impl Sampler ===

impl Sampler {
    fn new(proc_stat: &Path, cgroup_dir: &Path) -> Self {
        Self {
            proc_stat: proc_stat.to_path_buf(),
            cgroup_dir: cgroup_dir.to_path_buf(),
            cgroup_v2: cgroup_dir.join("cpu.stat").is_file(),
            prev: None,
            smoothed: None,
        }
    }

    /// Takes one reading at `now`; returns the new smoothed per-mille once two readings of the
    /// same kind exist. `cpu.max` is read every tick, so a quota changed at run time (a resized
    /// container) counts from the next tick on.
    fn tick(&mut self, now: Instant) -> Result<Option<u32>, SampleError> {
        let cur = self.read(now)?;
        let Some(prev) = self.prev.replace(cur) else {
            return Ok(None);
        };
        let elapsed = cur.at.saturating_duration_since(prev.at);
        let raw = match (prev.kind, cur.kind) {
            (ReadingKind::Proc(a), ReadingKind::Proc(b)) => proc_permille(a, b),
            (ReadingKind::Cgroup { usage_usec: a, .. }, ReadingKind::Cgroup { usage_usec: b, quota }) => {
                cgroup_permille(a, b, elapsed, quota)
            }
            // The source changed (a quota appeared or went): start over from this reading.
            _ => None,
        };
        let Some(raw) = raw else { return Ok(None) };
        let next = match self.smoothed {
            None => raw,
            Some(last) => ewma(last, raw, elapsed),
        };
        self.smoothed = Some(next);
        // `raw` and every average of such values lie in 0..=1000.
        Ok(Some(next.round().clamp(0.0, 1000.0) as u32))
    }

    fn read(&self, now: Instant) -> Result<Reading, SampleError> {
        if self.cgroup_v2 {
            let max_path = self.cgroup_dir.join("cpu.max");
            match std::fs::read_to_string(&max_path) {
                Ok(text) => {
                    let quota =
                        parse_cgroup_max(&text).map_err(|source| SampleError::Parse { path: max_path, source })?;
                    if let Some(quota) = quota {
                        let stat_path = self.cgroup_dir.join("cpu.stat");
                        let text = read(&stat_path)?;
                        let usage_usec = parse_cgroup_usage(&text).map_err(|source| SampleError::Parse {
                            path: stat_path,
                            source,
                        })?;
                        return Ok(Reading {
                            at: now,
                            kind: ReadingKind::Cgroup { usage_usec, quota },
                        });
                    }
                }
                // The root cgroup has no cpu.max: no quota, the host's numbers apply.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(SampleError::Read { path: max_path, source }),
            }
        }
        let text = read(&self.proc_stat)?;
        let times = parse_proc_stat(&text).map_err(|source| SampleError::Parse {
            path: self.proc_stat.clone(),
            source,
        })?;
        Ok(Reading {
            at: now,
            kind: ReadingKind::Proc(times),
        })
    }
}

fn read(path: &Path) -> Result<String, SampleError> {
    std::fs::read_to_string(path).map_err(|source| SampleError::Read {
        path: path.to_path_buf(),
        source,
    })
}

/// One EWMA step from `prev` towards `sample`, weighted by the time since the last sample.
fn ewma(prev: f64, sample: f64, elapsed: Duration) -> f64 {
    let w = 1.0 - (-elapsed.as_secs_f64() / EWMA_TAU.as_secs_f64()).exp();
    prev + (sample - prev) * w
}

// === parsers ===

/// Parses the aggregate `cpu` line of `/proc/stat` (`cpu user nice system idle iowait irq
/// softirq steal guest guest_nice`). Counters past the fourth may be missing (old kernels) and
/// count as 0; guest time is already inside user and nice, so it is not added again.
pub fn parse_proc_stat(text: &str) -> Result<CpuTimes, ParseError> {
    const NAMES: [&str; 8] = ["user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal"];
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("cpu"))
        .ok_or(ParseError::NoCpuLine)?;
    let mut v = [0u64; 8];
    let mut n = 0;
    for (i, field) in line.split_whitespace().skip(1).take(8).enumerate() {
        v[i] = number(NAMES[i], field)?;
        n = i + 1;
    }
    if n < 4 {
        return Err(ParseError::TooFewFields(n));
    }
    let [user, nice, system, idle, iowait, irq, softirq, steal] = v;
    let busy = [user, nice, system, irq, softirq, steal]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b));
    Ok(CpuTimes {
        busy,
        total: busy.saturating_add(idle).saturating_add(iowait),
    })
}

/// Parses `usage_usec` out of a cgroup v2 `cpu.stat`.
pub fn parse_cgroup_usage(text: &str) -> Result<u64, ParseError> {
    let line = text
        .lines()
        .find(|l| l.split_whitespace().next() == Some("usage_usec"))
        .ok_or(ParseError::NoUsage)?;
    let value = line.split_whitespace().nth(1).unwrap_or("");
    number("usage_usec", value)
}

/// Parses a cgroup v2 `cpu.max`: `"max 100000"` is no quota (`None`), `"150000 100000"` is
/// 1.5 CPUs. A lone `"max"` (some kernels omit the period) is also no quota.
pub fn parse_cgroup_max(text: &str) -> Result<Option<CpuQuota>, ParseError> {
    let bad = || ParseError::BadMax(text.trim().to_owned());
    let mut fields = text.split_whitespace();
    let quota = fields.next().ok_or_else(bad)?;
    let period = fields.next();
    if fields.next().is_some() {
        return Err(bad());
    }
    let period_usec = match period {
        Some(p) => p.parse::<u64>().map_err(|_| bad())?,
        None if quota == "max" => return Ok(None),
        None => return Err(bad()),
    };
    if period_usec == 0 {
        return Err(bad());
    }
    if quota == "max" {
        return Ok(None);
    }
    let quota_usec = quota.parse::<u64>().map_err(|_| bad())?;
    if quota_usec == 0 {
        return Err(bad());
    }
    Ok(Some(CpuQuota {
        quota_usec,
        period_usec,
    }))
}

fn number(field: &'static str, value: &str) -> Result<u64, ParseError> {
    value.parse().map_err(|_| ParseError::NotANumber {
        field,
        value: value.to_owned(),
    })
}

/// Busy share between two `/proc/stat` readings, in per-mille; None when no time passed.
pub fn proc_permille(prev: CpuTimes, cur: CpuTimes) -> Option<f64> {
    let total = cur.total.checked_sub(prev.total).filter(|t| *t > 0)?;
    let busy = cur.busy.saturating_sub(prev.busy).min(total);
    Some(busy as f64 * 1000.0 / total as f64)
}

/// Usage between two `cpu.stat` readings `elapsed` apart relative to `quota`, in per-mille
/// (clamped to 1000: a window misaligned with the quota period can read a little over).
pub fn cgroup_permille(prev_usec: u64, cur_usec: u64, elapsed: Duration, quota: CpuQuota) -> Option<f64> {
    let elapsed_usec = elapsed.as_micros() as f64;
    if elapsed_usec <= 0.0 || quota.period_usec == 0 {
        return None;
    }
    let cpus = quota.quota_usec as f64 / quota.period_usec as f64;
    let used = cur_usec.saturating_sub(prev_usec) as f64;
    Some((used * 1000.0 / (elapsed_usec * cpus)).clamp(0.0, 1000.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    const PROC_STAT: &str = "cpu  448130 25838 94224 838078 5942 0 16974 248 0 0\n\
        cpu0 100 0 0 0 0 0 0 0 0 0\n\
        intr 123\n";

    #[test]
    fn proc_stat_sums_busy_and_total() {
        let t = parse_proc_stat(PROC_STAT).unwrap();
        assert_eq!(t.busy, 448130 + 25838 + 94224 + 16974 + 248);
        assert_eq!(t.total, t.busy + 838078 + 5942);
    }

    #[test]
    fn proc_stat_old_kernel_four_counters() {
        let t = parse_proc_stat("cpu 10 0 10 80\n").unwrap();
        assert_eq!(t, CpuTimes { busy: 20, total: 100 });
    }

    #[test]
    fn proc_stat_malformed_is_an_error() {
        let cases: [(&str, ParseError); 5] = [
            ("", ParseError::NoCpuLine),
            ("cpu0 1 2 3 4\n", ParseError::NoCpuLine),
            ("cpu 1 2 3\n", ParseError::TooFewFields(3)),
            (
                "cpu 1 2 x 4\n",
                ParseError::NotANumber {
                    field: "system",
                    value: "x".into(),
                },
            ),
            (
                "cpu 1 2 3 -4\n",
                ParseError::NotANumber {
                    field: "idle",
                    value: "-4".into(),
                },
            ),
        ];
        for (text, want) in cases {
            assert_eq!(parse_proc_stat(text), Err(want), "{text:?}");
        }
        // Huge counters saturate instead of overflowing.
        let max = u64::MAX;
        let t = parse_proc_stat(&format!("cpu {max} {max} 0 {max}\n")).unwrap();
        assert_eq!(t.busy, u64::MAX);
    }

    #[test]
    fn cgroup_stat_usage() {
        let text = "usage_usec 123456\nuser_usec 100000\nsystem_usec 23456\nnr_periods 0\n";
        assert_eq!(parse_cgroup_usage(text), Ok(123456));
        assert_eq!(parse_cgroup_usage("user_usec 1\n"), Err(ParseError::NoUsage));
        assert_eq!(
            parse_cgroup_usage("usage_usec\n"),
            Err(ParseError::NotANumber {
                field: "usage_usec",
                value: String::new()
            })
        );
        assert!(parse_cgroup_usage("usage_usec 1.5\n").is_err());
    }

    #[test]
    fn cgroup_max_quota_or_none() {
        assert_eq!(parse_cgroup_max("max 100000\n"), Ok(None));
        assert_eq!(parse_cgroup_max("max\n"), Ok(None));
        assert_eq!(
            parse_cgroup_max("150000 100000\n"),
            Ok(Some(CpuQuota {
                quota_usec: 150000,
                period_usec: 100000
            }))
        );
        for bad in [
            "",
            "\n",
            "150000",
            "abc 100000",
            "max 0",
            "100 0",
            "0 100000",
            "1 2 3",
            "max x",
        ] {
            assert!(matches!(parse_cgroup_max(bad), Err(ParseError::BadMax(_))), "{bad:?}");
        }
    }

    #[test]
    fn permille_from_deltas() {
        let a = CpuTimes { busy: 100, total: 1000 };
        let b = CpuTimes { busy: 350, total: 2000 };
        assert_eq!(proc_permille(a, b), Some(250.0));
        assert_eq!(proc_permille(a, a), None);
        // A counter that went backwards (CPU unplugged) gives no reading, not a panic.
        assert_eq!(proc_permille(b, a), None);

        // 1.5 CPUs of quota, 1.5 CPUs busy over one second: 100 %.
        let q = CpuQuota {
            quota_usec: 150_000,
            period_usec: 100_000,
        };
        assert_eq!(cgroup_permille(0, 1_500_000, Duration::from_secs(1), q), Some(1000.0));
        assert_eq!(cgroup_permille(0, 750_000, Duration::from_secs(1), q), Some(500.0));
        assert_eq!(cgroup_permille(0, 9_000_000, Duration::from_secs(1), q), Some(1000.0));
        assert_eq!(cgroup_permille(0, 1, Duration::ZERO, q), None);
    }

    #[test]
    fn ewma_follows_the_documented_time_constant() {
        let after_tau = ewma(0.0, 1000.0, EWMA_TAU);
        assert!((after_tau - 632.1).abs() < 0.1, "{after_tau}");
        let mut v = 0.0;
        for _ in 0..12 {
            v = ewma(v, 1000.0, DEFAULT_SAMPLE_INTERVAL);
        }
        assert!((v - 950.2).abs() < 0.1, "3 s of 250 ms ticks: {v}");
    }

    #[test]
    fn gauge_set_and_read() {
        let g = CpuGauge::new();
        let h = g.clone();
        assert_eq!(g.percent(), 0);
        h.set(85);
        assert_eq!((g.percent(), g.permille()), (85, 850));
        h.set(250);
        assert_eq!(g.percent(), 100);
        h.set_permille(999);
        assert_eq!(g.percent(), 99);
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    #[test]
    fn sampler_uses_proc_stat_without_a_quota() {
        let dir = tempfile::tempdir().unwrap();
        let proc_stat = dir.path().join("stat");
        let cgroup = dir.path().join("cgroup");
        std::fs::create_dir(&cgroup).unwrap();
        write(&cgroup, "cpu.stat", "usage_usec 0\n");
        write(&cgroup, "cpu.max", "max 100000\n");
        write(dir.path(), "stat", "cpu 100 0 0 900 0 0 0 0\n");
        let mut s = Sampler::new(&proc_stat, &cgroup);
        let t0 = Instant::now();
        assert_eq!(s.tick(t0).unwrap(), None);
        write(dir.path(), "stat", "cpu 600 0 0 1400 0 0 0 0\n");
        assert_eq!(s.tick(t0 + DEFAULT_SAMPLE_INTERVAL).unwrap(), Some(500));
    }

    #[test]
    fn sampler_prefers_the_cgroup_quota_and_keeps_value_on_errors() {
        let dir = tempfile::tempdir().unwrap();
        let proc_stat = dir.path().join("stat");
        write(dir.path(), "stat", "cpu 0 0 0 100 0 0 0 0\n");
        write(dir.path(), "cpu.stat", "usage_usec 1000000\n");
        write(dir.path(), "cpu.max", "150000 100000\n");
        let mut s = Sampler::new(&proc_stat, dir.path());
        let t0 = Instant::now();
        assert_eq!(s.tick(t0).unwrap(), None);
        // 1.5 CPUs busy for one second against a 1.5-CPU quota.
        write(dir.path(), "cpu.stat", "usage_usec 2500000\n");
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(s.tick(t1).unwrap(), Some(1000));
        // A malformed file is an error and leaves the smoothed value alone.
        write(dir.path(), "cpu.stat", "garbage\n");
        assert!(matches!(
            s.tick(t1 + DEFAULT_SAMPLE_INTERVAL),
            Err(SampleError::Parse { .. })
        ));
        // Half load from here on: smoothed down by one EWMA step of 1 s.
        write(dir.path(), "cpu.stat", "usage_usec 3250000\n");
        let t2 = t1 + Duration::from_secs(1);
        assert_eq!(
            s.tick(t2).unwrap(),
            Some(ewma(1000.0, 500.0, Duration::from_secs(1)).round() as u32)
        );
        // The quota removed: back to /proc/stat, which needs two readings again.
        write(dir.path(), "cpu.max", "max 100000\n");
        assert_eq!(s.tick(t2 + Duration::from_secs(1)).unwrap(), None);
    }

    #[test]
    fn sampler_missing_file_is_a_read_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Sampler::new(&dir.path().join("nope"), &dir.path().join("nocgroup"));
        assert!(matches!(s.tick(Instant::now()), Err(SampleError::Read { .. })));
    }
}
