//! Host pressure, for "is it the sidecar?": CPU pressure (PSI), CPU steal, the run queue and the
//! agent's own CPU share, read from `/proc` and cgroup v2 once a second by one background task
//! and kept in atomics (the access log and `/metrics` read them with a load), and the last
//! minute of per-second samples (these values plus the increments of the overhead and upstream
//! histograms) that `GET /doctor` reads.
//!
//! A file that is missing or unreadable (no PSI in a container or on an old kernel, no cgroup
//! v2) gives "unknown": `None`, `null` in JSON, no metric sample; never an error.
//!
//! The values live in one process-wide [`HostMonitor`] ([`monitor`]): the host is one per
//! process, and the access-log formatter reads it without a handle passed down the request path.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use prometheus_client::encoding::{EncodeMetric, MetricEncoder};
use prometheus_client::metrics::{MetricType, TypedMetric};

use super::metrics::{Metrics, TimingTotals, TIMING_BUCKETS};

/// Seconds of samples `/doctor` looks back over.
pub const WINDOW_SECONDS: usize = 60;

/// How often the sampler reads: the resolution of the window, and PSI's `avg10` changes
/// little faster.
const SAMPLE_INTERVAL: Duration = Duration::from_secs(1);

/// Ratios are kept as ten-thousandths in the atomics (four decimals are plenty for a share of
/// CPU time); this value means unknown.
const UNKNOWN: u32 = u32::MAX;
const SCALE: f64 = 10_000.0;

/// One reading of the host, ratios in 0..=1 rounded to four decimals.
#[derive(Clone, Copy, Debug, Default, PartialEq, serde::Serialize)]
pub struct HostSample {
    /// `/proc/pressure/cpu` `some avg10` as a ratio: the share of the last 10 s in which at least
    /// one runnable task waited for a CPU.
    pub cpu_pressure: Option<f64>,
    /// The same for the agent's own cgroup (cgroup v2 `cpu.pressure`); unknown in the root
    /// cgroup, whose pressure is the host's.
    pub cgroup_cpu_pressure: Option<f64>,
    /// Share of all CPUs' time over the last second that the hypervisor gave to someone else
    /// while this VM wanted to run (`steal` of `/proc/stat`).
    pub cpu_steal: Option<f64>,
    /// Share of all CPUs' time over the last second spent busy (user, nice, system, irq,
    /// softirq).
    pub cpu_busy: Option<f64>,
    /// Tasks running or runnable now (`procs_running` of `/proc/stat`, the sampler included).
    pub run_queue: Option<u32>,
    /// The agent's own CPU time (all its threads) over the last second, as a share of all
    /// CPUs' time: 0.5 on a 2-CPU host is one CPU busy with vmesh.
    pub agent_cpu: Option<f64>,
    /// Online CPUs (`cpuN` lines of `/proc/stat`); 0 when unknown.
    pub cpus: u32,
}

/// The access log's `host` object: the few values that say whether the host was under CPU
/// pressure when the request was served.
#[derive(Debug, serde::Serialize)]
struct LogHost {
    cpu_pressure: Option<f64>,
    cpu_steal: Option<f64>,
    run_queue: Option<u32>,
    agent_cpu: Option<f64>,
}

/// The latest [`HostSample`] in atomics, and a generation that changes with every sample.
#[derive(Debug)]
pub struct HostGauges {
    cpu_pressure: AtomicU32,
    cgroup_cpu_pressure: AtomicU32,
    cpu_steal: AtomicU32,
    cpu_busy: AtomicU32,
    run_queue: AtomicU32,
    agent_cpu: AtomicU32,
    cpus: AtomicU32,
    generation: AtomicU64,
}

/// One second of the window.
#[derive(Clone, Debug, PartialEq)]
pub struct Second {
    /// Unix time of the sample, in seconds.
    pub unix_secs: u64,
    pub host: HostSample,
    /// Requests of this second by bucket of their proxy overhead (bounds of
    /// `telemetry::histogram::BUCKETS`, +Inf last).
    pub overhead: [u64; TIMING_BUCKETS],
    /// The same for their upstream time (requests that reached an endpoint).
    pub upstream: [u64; TIMING_BUCKETS],
}

/// The host gauges and the last minute of seconds.
#[derive(Debug)]
pub struct HostMonitor {
    gauges: HostGauges,
    window: Mutex<Window>,
}

#[derive(Debug)]
struct Window {
    seconds: VecDeque<Second>,
    /// The histogram totals at the previous sample, to take the increments from.
    last: Option<TimingTotals>,
}

/// The four host gauges of `/metrics`, read from [`monitor`] at scrape time; an unknown value
/// has no sample.
#[derive(Clone, Copy, Debug)]
pub enum HostMetric {
    /// `vmesh_host_cpu_pressure_ratio{scope="host"|"cgroup"}`.
    CpuPressure,
    /// `vmesh_host_cpu_steal_ratio`.
    CpuSteal,
    /// `vmesh_host_run_queue`.
    RunQueue,
    /// `vmesh_agent_cpu_ratio`.
    AgentCpu,
}

/// Where the sampler reads; fixed at start.
#[derive(Clone, Debug)]
struct Sources {
    pressure: PathBuf,
    stat: PathBuf,
    self_stat: PathBuf,
    /// The agent's cgroup's `cpu.pressure`, when cgroup v2 is mounted.
    cgroup_pressure: Option<PathBuf>,
}

/// Cumulative CPU counters of `/proc/stat`, in USER_HZ ticks summed over all CPUs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcStat {
    pub busy: u64,
    pub steal: u64,
    /// busy + idle + iowait + steal.
    pub total: u64,
    pub procs_running: Option<u32>,
    pub cpus: u32,
}

/// Turns successive readings of the counters into a [`HostSample`].
#[derive(Debug)]
struct Sampler {
    sources: Sources,
    prev: Option<(ProcStat, Option<u64>)>,
}

static MONITOR: HostMonitor = HostMonitor::new();

/// The process's host monitor, written by the sampler [`spawn_sampler`] starts.
pub fn monitor() -> &'static HostMonitor {
    &MONITOR
}

/// Starts the once-a-second sampler: reads the host files, publishes the gauges and appends a
/// second (with `metrics`' histogram increments) to the window. Runs until the runtime stops.
pub fn spawn_sampler(metrics: Arc<Metrics>) {
    let mut sampler = Sampler::new(Sources::system());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(SAMPLE_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let host = sampler.sample();
            monitor().record(host, metrics.timing_totals(), unix_now());
        }
    });
}

/// Appends the access log's `host` object for `s`, e.g.
/// `{"cpu_pressure":0.0161,"cpu_steal":0.0,"run_queue":2,"agent_cpu":0.0012}` (`null` for an
/// unknown value). The access log caches the text and makes it again only when the generation
/// changes, once a second.
pub fn write_log_object(out: &mut Vec<u8>, s: &HostSample) {
    let object = LogHost {
        cpu_pressure: s.cpu_pressure,
        cpu_steal: s.cpu_steal,
        run_queue: s.run_queue,
        agent_cpu: s.agent_cpu,
    };
    // Serializing four numbers into a Vec cannot fail.
    let _ = serde_json::to_writer(out, &object);
}

fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing panics while the window is locked (pushes and copies), so a poisoned lock still
    // guards consistent data.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

// === impl HostGauges ===

impl HostGauges {
    const fn new() -> Self {
        Self {
            cpu_pressure: AtomicU32::new(UNKNOWN),
            cgroup_cpu_pressure: AtomicU32::new(UNKNOWN),
            cpu_steal: AtomicU32::new(UNKNOWN),
            cpu_busy: AtomicU32::new(UNKNOWN),
            run_queue: AtomicU32::new(UNKNOWN),
            agent_cpu: AtomicU32::new(UNKNOWN),
            cpus: AtomicU32::new(0),
            generation: AtomicU64::new(0),
        }
    }

    /// The latest sample: seven relaxed loads.
    pub fn load(&self) -> HostSample {
        let ratio = |a: &AtomicU32| match a.load(Ordering::Relaxed) {
            UNKNOWN => None,
            v => Some(f64::from(v) / SCALE),
        };
        HostSample {
            cpu_pressure: ratio(&self.cpu_pressure),
            cgroup_cpu_pressure: ratio(&self.cgroup_cpu_pressure),
            cpu_steal: ratio(&self.cpu_steal),
            cpu_busy: ratio(&self.cpu_busy),
            run_queue: Some(self.run_queue.load(Ordering::Relaxed)).filter(|&v| v != UNKNOWN),
            agent_cpu: ratio(&self.agent_cpu),
            cpus: self.cpus.load(Ordering::Relaxed),
        }
    }

    /// Changes with every sample stored.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    fn store(&self, s: &HostSample) {
        let ratio = |a: &AtomicU32, v: Option<f64>| a.store(v.map_or(UNKNOWN, to_ten_thousandths), Ordering::Relaxed);
        ratio(&self.cpu_pressure, s.cpu_pressure);
        ratio(&self.cgroup_cpu_pressure, s.cgroup_cpu_pressure);
        ratio(&self.cpu_steal, s.cpu_steal);
        ratio(&self.cpu_busy, s.cpu_busy);
        ratio(&self.agent_cpu, s.agent_cpu);
        self.run_queue
            .store(s.run_queue.map_or(UNKNOWN, |v| v.min(UNKNOWN - 1)), Ordering::Relaxed);
        self.cpus.store(s.cpus, Ordering::Relaxed);
        self.generation.fetch_add(1, Ordering::Release);
    }
}

/// A ratio as ten-thousandths, clamped to 0..=1.
fn to_ten_thousandths(v: f64) -> u32 {
    if v.is_nan() {
        return UNKNOWN;
    }
    // In 0..=10_000 after the clamp, so the cast is exact.
    (v.clamp(0.0, 1.0) * SCALE).round() as u32
}

/// `v` rounded to what the gauges keep (four decimals, clamped to 0..=1).
fn rounded(v: f64) -> f64 {
    f64::from(to_ten_thousandths(v)) / SCALE
}

// === impl HostMonitor ===

impl HostMonitor {
    const fn new() -> Self {
        Self {
            gauges: HostGauges::new(),
            window: Mutex::new(Window {
                seconds: VecDeque::new(),
                last: None,
            }),
        }
    }

    pub fn gauges(&self) -> &HostGauges {
        &self.gauges
    }

    /// The seconds of the last minute, oldest first.
    pub fn last_minute(&self) -> Vec<Second> {
        lock(&self.window).seconds.iter().cloned().collect()
    }

    /// Publishes `host` and appends a second: `host` and the histograms' increments since the
    /// previous call (`totals` are cumulative). The window keeps [`WINDOW_SECONDS`] seconds.
    fn record(&self, host: HostSample, totals: TimingTotals, unix_secs: u64) {
        self.gauges.store(&host);
        let host = self.gauges.load();
        let mut w = lock(&self.window);
        let (overhead, upstream) = match &w.last {
            Some(last) => (
                increments(&totals.overhead, &last.overhead),
                increments(&totals.upstream, &last.upstream),
            ),
            None => (totals.overhead, totals.upstream),
        };
        w.last = Some(totals);
        w.seconds.push_back(Second {
            unix_secs,
            host,
            overhead,
            upstream,
        });
        while w.seconds.len() > WINDOW_SECONDS {
            w.seconds.pop_front();
        }
    }
}

fn increments(now: &[u64; TIMING_BUCKETS], before: &[u64; TIMING_BUCKETS]) -> [u64; TIMING_BUCKETS] {
    std::array::from_fn(|i| now[i].saturating_sub(before[i]))
}

// === impl HostMetric ===

impl TypedMetric for HostMetric {
    const TYPE: MetricType = MetricType::Gauge;
}

impl EncodeMetric for HostMetric {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        let s = monitor().gauges.load();
        match self {
            Self::CpuPressure => {
                for (scope, v) in [("host", s.cpu_pressure), ("cgroup", s.cgroup_cpu_pressure)] {
                    if let Some(v) = v {
                        encoder.encode_family(&[("scope", scope)])?.encode_gauge(&v)?;
                    }
                }
                Ok(())
            }
            Self::CpuSteal => s.cpu_steal.map_or(Ok(()), |v| encoder.encode_gauge(&v)),
            Self::RunQueue => s.run_queue.map_or(Ok(()), |v| encoder.encode_gauge(&v)),
            Self::AgentCpu => s.agent_cpu.map_or(Ok(()), |v| encoder.encode_gauge(&v)),
        }
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

// === impl Sources ===

impl Sources {
    /// The running system's files: `/proc`, and the cgroup v2 directory of this process (the
    /// unified hierarchy at `/sys/fs/cgroup`, or `/sys/fs/cgroup/unified` on a hybrid host).
    fn system() -> Self {
        // The root cgroup's pressure is the host's: read only a cgroup of the agent's own.
        let cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|t| cgroup_v2_path(&t).map(str::to_owned))
            .filter(|p| p != "/");
        let root = ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"]
            .into_iter()
            .map(Path::new)
            .find(|r| r.join("cgroup.controllers").exists() || r.join("cgroup.procs").exists());
        let cgroup_pressure = match (root, cgroup) {
            (Some(root), Some(path)) => Some(root.join(path.trim_start_matches('/')).join("cpu.pressure")),
            _ => None,
        };
        Self::at(Path::new("/proc"), cgroup_pressure)
    }

    fn at(proc: &Path, cgroup_pressure: Option<PathBuf>) -> Self {
        Self {
            pressure: proc.join("pressure/cpu"),
            stat: proc.join("stat"),
            self_stat: proc.join("self/stat"),
            cgroup_pressure,
        }
    }
}

// === impl Sampler ===

impl Sampler {
    fn new(sources: Sources) -> Self {
        Self { sources, prev: None }
    }

    /// Reads every file once. Shares over the last second need two readings: the first sample
    /// has none.
    fn sample(&mut self) -> HostSample {
        let read = |p: &Path| std::fs::read_to_string(p).ok();
        let cpu_pressure = read(&self.sources.pressure).and_then(|t| parse_psi_some_avg10(&t));
        let cgroup_cpu_pressure = self
            .sources
            .cgroup_pressure
            .as_deref()
            .and_then(read)
            .and_then(|t| parse_psi_some_avg10(&t));
        let stat = read(&self.sources.stat).and_then(|t| parse_proc_stat(&t));
        let agent = read(&self.sources.self_stat).and_then(|t| parse_self_cpu_ticks(&t));
        let mut s = HostSample {
            cpu_pressure: cpu_pressure.map(rounded),
            cgroup_cpu_pressure: cgroup_cpu_pressure.map(rounded),
            run_queue: stat.and_then(|s| s.procs_running),
            cpus: stat.map_or(0, |s| s.cpus),
            ..HostSample::default()
        };
        if let (Some(now), Some((before, agent_before))) = (stat, self.prev) {
            let ticks = now.total.saturating_sub(before.total);
            if ticks > 0 {
                let share = |a: u64, b: u64| rounded(a.saturating_sub(b) as f64 / ticks as f64);
                s.cpu_steal = Some(share(now.steal, before.steal));
                s.cpu_busy = Some(share(now.busy, before.busy));
                if let (Some(a), Some(b)) = (agent, agent_before) {
                    s.agent_cpu = Some(share(a, b));
                }
            }
        }
        self.prev = stat.map(|s| (s, agent));
        s
    }
}

// === parsers ===

/// `some avg10=1.61 avg60=3.71 avg300=3.86 total=4426114931` (a PSI file) -> 0.0161.
pub fn parse_psi_some_avg10(text: &str) -> Option<f64> {
    let line = text.lines().find(|l| l.starts_with("some "))?;
    let v: f64 = line
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix("avg10="))?
        .parse()
        .ok()?;
    (v.is_finite() && v >= 0.0).then(|| (v / 100.0).min(1.0))
}

/// The aggregate `cpu` line, the `cpuN` lines and `procs_running` of `/proc/stat`.
pub fn parse_proc_stat(text: &str) -> Option<ProcStat> {
    let mut out = ProcStat::default();
    let mut seen_cpu = false;
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("cpu ") {
            let f: Vec<u64> = rest.split_whitespace().map(str::parse).collect::<Result<_, _>>().ok()?;
            // user nice system idle iowait irq softirq steal [guest guest_nice]; guest time is
            // already in user and nice.
            let at = |i: usize| f.get(i).copied().unwrap_or(0);
            if f.len() < 4 {
                return None;
            }
            out.busy = at(0) + at(1) + at(2) + at(5) + at(6);
            out.steal = at(7);
            out.total = out.busy + at(3) + at(4) + out.steal;
            seen_cpu = true;
        } else if line.starts_with("cpu") && line.as_bytes().get(3).is_some_and(u8::is_ascii_digit) {
            out.cpus += 1;
        } else if let Some(n) = line.strip_prefix("procs_running ") {
            out.procs_running = n.trim().parse().ok();
        }
    }
    seen_cpu.then_some(out)
}

/// utime + stime of `/proc/self/stat`, in USER_HZ ticks (fields 14 and 15; the command name in
/// parentheses may hold spaces, so fields are counted after its closing parenthesis).
pub fn parse_self_cpu_ticks(text: &str) -> Option<u64> {
    let (_, rest) = text.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

/// The cgroup v2 path of `/proc/self/cgroup` (the `0::/path` line).
pub fn cgroup_v2_path(text: &str) -> Option<&str> {
    text.lines().find_map(|l| l.strip_prefix("0::")).map(str::trim)
}

#[cfg(test)]
mod tests;
