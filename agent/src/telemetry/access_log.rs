//! The access log: one JSON line per request. The request path formats the line into its
//! thread's staging buffer (reused: no allocation per line); a staging buffer that reaches
//! 32 KiB goes to the writer's queue, and the `vmesh-access-log` thread comes every 100 ms for
//! the queue and for partly filled buffers and writes them, one `write` per buffer. What waits
//! to be written is bounded in lines and in bytes; a line beyond either bound is dropped and
//! counted (`vmesh_access_log_dropped_total`), never waited for.
//!
//! The costs this is built around (callgrind and CPU time per request, docs/performance.md):
//! formatting through `serde_json` and `Display` cost ~11,000 instructions per line, and one
//! channel send per line woke the writer for nearly every request (2.6 context switches per
//! request). The line is now ~1,400 instructions of table-driven formatting, and the writer
//! wakes ~10 times a second.

use std::fmt;
use std::io::Write;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant, SystemTime};

use http::{HeaderValue, Method, Uri};
use prometheus_client::metrics::counter::Counter;

use super::metrics::Direction;

mod format;
#[cfg(test)]
mod tests;

/// What the request path records; cheap to build (reference-counted parts, no formatting).
#[derive(Debug)]
pub struct AccessRecord {
    pub start: SystemTime,
    pub direction: Direction,
    pub service: Arc<str>,
    pub method: Method,
    pub authority: Option<HeaderValue>,
    pub uri: Uri,
    pub status: u16,
    pub upstream: Option<SocketAddr>,
    pub error: Option<&'static str>,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub upstream_time: Duration,
    pub overhead: Duration,
    pub attempts: u32,
    pub request_id: Option<HeaderValue>,
    pub client: SocketAddr,
    /// The caller's verified identity (`spiffe://...`), when it came over mutual TLS.
    pub caller: Option<Arc<str>>,
}

/// The recording side, cloned into every listener. When the last clone goes, the writer writes
/// what is left and stops (the drop waits for it).
#[derive(Clone)]
pub struct AccessLog {
    inner: Option<Arc<Handle>>,
}

/// How much may wait for the writer, and how it is batched.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Lines formatted and not yet written (`telemetry.access_log_buffer`).
    lines: usize,
    /// Bytes formatted and not yet written. Both bounds count what was handed to the writer and
    /// the recording thread's own staging buffer; the other threads' staging buffers (each less
    /// than a batch and a line) come on top. A line longer than the bound still goes when
    /// nothing else waits.
    bytes: usize,
    /// A staging buffer this full goes to the writer at once.
    batch: usize,
    /// How often the writer collects partly filled staging buffers: the longest a line waits.
    interval: Duration,
    /// How long the last handle's drop waits for the writer to write what is left.
    stop_wait: Duration,
}

/// The last clone's link to the writer thread.
struct Handle {
    state: Arc<State>,
    writer: Option<JoinHandle<()>>,
}

/// What the request path and the writer share.
struct State {
    /// One staging buffer per thread (threads beyond the count share them by index).
    shards: Box<[Shard]>,
    /// Full buffers handed over, oldest first.
    queue: Mutex<Vec<Batch>>,
    /// Lines and bytes that left the staging buffers and are not yet written.
    queued_lines: AtomicUsize,
    queued_bytes: AtomicUsize,
    /// Emptied buffers, kept to be staged into again.
    spare: Mutex<Vec<Vec<u8>>>,
    limits: Limits,
    /// The writer parked with nothing staged or queued: the next first line of a buffer, or a
    /// batch handed over, wakes it. The writer sets it before it looks at the queue and the
    /// buffers under their locks, and the request path reads it after changing them under the
    /// same locks, so either the writer sees the line or the request path sees `idle`.
    idle: AtomicBool,
    /// Set by the last handle's drop: write everything and stop.
    closing: AtomicBool,
    /// Set by the writer when it has stopped.
    stopped: (Mutex<bool>, Condvar),
    writer: OnceLock<Thread>,
    dropped: Counter,
}

/// A staging buffer on its own cache lines, so that two threads' buffers do not share one.
#[repr(align(128))]
struct Shard(Mutex<Staging>);

struct Staging {
    buf: Vec<u8>,
    lines: usize,
    cache: format::Cache,
}

/// Whole lines on their way to the output.
struct Batch {
    buf: Vec<u8>,
    lines: usize,
}

/// Staging buffers that fill up go to the writer's queue: ~100 lines of ~330 bytes, one `write`
/// for all of them.
const BATCH_BYTES: usize = 32 * 1024;
/// The longest a line waits in a partly filled buffer.
const SWEEP_INTERVAL: Duration = Duration::from_millis(100);
/// Bytes that may wait per line of `telemetry.access_log_buffer`, and at least this many bytes
/// in all: 8,192 lines allow 8 MiB, room for the average line (~330 bytes) and for 128 lines that
/// carry a 64 KiB URI.
const BYTES_PER_LINE: usize = 1024;
const MIN_BYTES: usize = 1024 * 1024;
/// How long the last handle's drop waits for the writer to write what is left.
const STOP_WAIT: Duration = Duration::from_secs(2);
/// Spare buffers kept beyond one per shard; a buffer grown past twice the batch (a huge line)
/// is freed rather than kept.
const SPARE_EXTRA: usize = 4;

// === impl AccessLog ===

impl AccessLog {
    /// A log that records nothing.
    pub fn off() -> Self {
        Self { inner: None }
    }

    /// Starts the writer thread for `target` (`stdout` or a file path); at most `buffer` lines
    /// (and `buffer` KiB, at least 1 MiB) wait to be written.
    pub fn start(target: &str, buffer: usize, dropped: Counter) -> std::io::Result<Self> {
        let out: Box<dyn Write + Send> = match target {
            "off" => return Ok(Self::off()),
            "stdout" => Box::new(std::io::stdout()),
            path => Box::new(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        let limits = Limits {
            lines: buffer.max(1),
            bytes: buffer.saturating_mul(BYTES_PER_LINE).max(MIN_BYTES),
            batch: BATCH_BYTES,
            interval: SWEEP_INTERVAL,
            stop_wait: STOP_WAIT,
        };
        Self::with_writer(out, limits, dropped)
    }

    fn with_writer(out: Box<dyn Write + Send>, limits: Limits, dropped: Counter) -> std::io::Result<Self> {
        let shards = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 32);
        let state = Arc::new(State {
            shards: (0..shards)
                .map(|_| {
                    Shard(Mutex::new(Staging {
                        buf: Vec::new(),
                        lines: 0,
                        cache: format::Cache::new(),
                    }))
                })
                .collect(),
            queue: Mutex::new(Vec::new()),
            queued_lines: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            spare: Mutex::new(Vec::new()),
            limits,
            idle: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            stopped: (Mutex::new(false), Condvar::new()),
            writer: OnceLock::new(),
            dropped,
        });
        let for_writer = state.clone();
        let writer = std::thread::Builder::new()
            .name("vmesh-access-log".into())
            .spawn(move || {
                for_writer.write_loop(out);
                *lock(&for_writer.stopped.0) = true;
                for_writer.stopped.1.notify_all();
            })?;
        // Until this is set, a line cannot wake the writer; it needs no waking then: it starts
        // with a sweep interval.
        let _ = state.writer.set(writer.thread().clone());
        Ok(Self {
            inner: Some(Arc::new(Handle {
                state,
                writer: Some(writer),
            })),
        })
    }

    pub fn enabled(&self) -> bool {
        self.inner.is_some()
    }

    /// Formats `r` into this thread's staging buffer, or drops and counts it when the lines and
    /// bytes waiting for the writer are at their bound. Never blocks on the writer.
    pub fn record(&self, r: AccessRecord) {
        if let Some(h) = &self.inner {
            h.state.record(&r);
        }
    }
}

impl fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AccessLog").field("enabled", &self.enabled()).finish()
    }
}

// === impl Handle ===

impl Drop for Handle {
    /// The last recorder is gone (shutdown): the writer writes what is staged and stops. Waiting
    /// for it keeps the last lines from being lost when the process exits right after; waiting
    /// at most `Limits::stop_wait` keeps an output that takes no writes (a full pipe) from
    /// holding up the exit.
    fn drop(&mut self) {
        self.state.closing.store(true, Ordering::Release);
        let Some(writer) = self.writer.take() else { return };
        writer.thread().unpark();
        let wait = self.state.limits.stop_wait;
        let deadline = Instant::now() + wait;
        let mut stopped = lock(&self.state.stopped.0);
        while !*stopped {
            let now = Instant::now();
            if now >= deadline {
                tracing::warn!(?wait, "access log writer did not finish; last lines may be lost");
                return;
            }
            stopped = self
                .state
                .stopped
                .1
                .wait_timeout(stopped, deadline - now)
                .map_or_else(|e| e.into_inner().0, |(g, _)| g);
        }
        drop(stopped);
        let _ = writer.join();
    }
}

// === impl State ===

impl State {
    fn record(&self, r: &AccessRecord) {
        let mut s = lock(&self.shards[shard_index(self.shards.len())].0);
        let start = s.buf.len();
        let waiting = start + self.queued_bytes.load(Ordering::Relaxed);
        if s.lines + self.queued_lines.load(Ordering::Relaxed) >= self.limits.lines
            || (waiting > 0 && waiting >= self.limits.bytes)
        {
            drop(s);
            self.dropped.inc();
            return;
        }
        let Staging { buf, cache, .. } = &mut *s;
        format::line(buf, cache, r);
        if waiting > 0 && waiting + (buf.len() - start) > self.limits.bytes {
            buf.truncate(start);
            drop(s);
            self.dropped.inc();
            return;
        }
        s.lines += 1;
        if s.buf.len() >= self.limits.batch {
            let (batch, queued) = self.take_staged(&mut s);
            lock(&self.queue).push(batch);
            drop(s);
            // The writer comes for the queue every interval; it is woken before that only when
            // a quarter of the byte bound waits (each wake-up is two context switches on a busy
            // core), or when it sleeps without a deadline (read after the push: see `idle`).
            if queued >= self.wake_bytes() || self.idle.load(Ordering::Relaxed) {
                self.wake_writer();
            }
        } else if start == 0 && self.idle.load(Ordering::Relaxed) {
            // The first line of an empty buffer while the writer sleeps without a deadline.
            drop(s);
            self.wake_writer();
        }
    }

    /// Queued bytes that wake the writer before its interval is over.
    fn wake_bytes(&self) -> usize {
        (self.limits.bytes / 4).max(self.limits.batch)
    }

    fn wake_writer(&self) {
        if let Some(t) = self.writer.get() {
            t.unpark();
        }
    }

    /// Takes the lines out of a staging buffer, leaving a spare buffer in its place, and counts
    /// them as queued (before the staging buffer's lock is released, so that the bounds hold
    /// for the next line). Returns them and the bytes queued now.
    fn take_staged(&self, s: &mut Staging) -> (Batch, usize) {
        let buf = std::mem::replace(&mut s.buf, self.spare());
        let lines = std::mem::take(&mut s.lines);
        self.queued_lines.fetch_add(lines, Ordering::Relaxed);
        let queued = self.queued_bytes.fetch_add(buf.len(), Ordering::Relaxed) + buf.len();
        (Batch { buf, lines }, queued)
    }

    fn spare(&self) -> Vec<u8> {
        lock(&self.spare)
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(self.limits.batch + 1024))
    }

    /// Runs on the writer thread until the last handle is dropped.
    fn write_loop(&self, mut out: Box<dyn Write + Send>) {
        let mut batches = Vec::new();
        let mut failing = false;
        loop {
            // Read before the last sweep: once it is set no line can be added, so the sweep
            // after it finds everything.
            let closing = self.closing.load(Ordering::Acquire);
            let deadline = Instant::now() + self.limits.interval;
            let mut wrote = false;
            while !closing && !self.closing.load(Ordering::Acquire) {
                wrote |= self.write_queued(&mut *out, &mut batches, &mut failing);
                let now = Instant::now();
                if now >= deadline {
                    break;
                }
                std::thread::park_timeout(deadline - now);
            }
            self.sweep();
            wrote |= self.write_queued(&mut *out, &mut batches, &mut failing);
            if closing {
                return;
            }
            if !wrote {
                self.idle.store(true, Ordering::SeqCst);
                if !self.anything_waiting() && !self.closing.load(Ordering::Acquire) {
                    std::thread::park();
                }
                self.idle.store(false, Ordering::SeqCst);
            }
        }
    }

    /// Moves every non-empty staging buffer to the queue, behind the full ones: a thread's
    /// lines are written in the order it recorded them.
    fn sweep(&self) {
        for shard in self.shards.iter() {
            let mut s = lock(&shard.0);
            if s.lines == 0 {
                continue;
            }
            let (batch, _) = self.take_staged(&mut s);
            lock(&self.queue).push(batch);
        }
    }

    fn anything_waiting(&self) -> bool {
        !lock(&self.queue).is_empty() || self.shards.iter().any(|s| lock(&s.0).lines > 0)
    }

    /// Writes the queued batches (taken into `batches`, kept for its allocation) and returns
    /// their buffers to the spares. A failed write loses its lines: they are counted as dropped
    /// and the failure is logged once, until a write succeeds again.
    fn write_queued(&self, out: &mut dyn Write, batches: &mut Vec<Batch>, failing: &mut bool) -> bool {
        batches.append(&mut lock(&self.queue));
        if batches.is_empty() {
            return false;
        }
        for Batch { mut buf, lines } in batches.drain(..) {
            match out.write_all(&buf) {
                Ok(()) => *failing = false,
                Err(e) => {
                    self.dropped.inc_by(lines as u64);
                    if !*failing {
                        tracing::warn!(error = %e, lines, "access log write failed; lines dropped");
                    }
                    *failing = true;
                }
            }
            self.queued_lines.fetch_sub(lines, Ordering::Relaxed);
            self.queued_bytes.fetch_sub(buf.len(), Ordering::Relaxed);
            buf.clear();
            let mut spare = lock(&self.spare);
            if buf.capacity() <= 2 * self.limits.batch + 2048 && spare.len() < self.shards.len() + SPARE_EXTRA {
                spare.push(buf);
            }
        }
        if let Err(e) = out.flush() {
            if !*failing {
                tracing::warn!(error = %e, "access log flush failed");
            }
        }
        true
    }
}

/// The staging buffer index of the calling thread: threads take indexes in turn, the first
/// time they record.
fn shard_index(shards: usize) -> usize {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: usize = NEXT.fetch_add(1, Ordering::Relaxed);
    }
    INDEX.with(|i| *i) % shards
}

/// A panic cannot happen while one of these locks is held (formatting into a `Vec` does not
/// panic, allocation failure aborts), so a poisoned lock still guards consistent data.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}
