//! `paced-load ADDR --rate R --duration S [--conns C] [--path P] [--grace S]`: open-loop
//! HTTP/1.1 load at a fixed request rate (wrk2's model), for tests/bench/run.sh.
//!
//! Request i is due at `start + i / rate`, whatever happened to the requests before it. A due
//! request goes out on the first idle connection (C keep-alive connections, all opened before the
//! start); when every connection is busy it waits in a queue, and that wait counts: each latency
//! runs from the request's scheduled send time to the last byte of its response. A server that
//! stalls is charged for every request a real client would have sent during the stall, not only
//! for the one it was answering (no coordinated omission).
//!
//! The pacer sleeps on a timerfd with the thread's timer slack set to 1 ns: tokio's timer wheel
//! rounds every sleep up to a whole millisecond, which would add up to 1 ms to each sample.
//!
//! Prints one line of `key=value` pairs: the counts (scheduled, completed, non-2xx, errors,
//! incomplete = still unanswered `--grace` after the last send), the achieved rate, latency
//! percentiles in microseconds (p50, p90, p99, p99.9, max), and `lag_*`: how long after its
//! scheduled time a request was written (queueing behind busy connections plus the client's own
//! delay; against an idle fast server, the client's own floor).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::process::ExitCode;
use std::rc::Rc;
use std::time::{Duration, Instant};

use nix::sys::time::TimeSpec;
use nix::sys::timerfd::{ClockId, Expiration, TimerFd, TimerFlags, TimerSetTimeFlags};
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::task::LocalSet;

/// Largest response head plus body read before the response is called broken.
const MAX_RESPONSE: usize = 1 << 20;

struct Args {
    addr: SocketAddr,
    rate: f64,
    duration: Duration,
    conns: usize,
    path: String,
    grace: Duration,
}

/// State shared by the pacer and the connection tasks (one thread: `Rc`, `Cell`, `RefCell`).
struct Shared {
    /// Scheduled send times of the requests that are due and not yet taken by a connection.
    due: RefCell<VecDeque<Instant>>,
    /// Wakes an idle connection when a request falls due.
    wake: Notify,
    /// Set once the pacer has released the last request.
    finished: Cell<bool>,
    /// Scheduled send time -> last byte of the response, in nanoseconds.
    latency_ns: RefCell<Vec<u64>>,
    /// Scheduled send time -> the request was written, in nanoseconds.
    lag_ns: RefCell<Vec<u64>>,
    non_2xx: Cell<u64>,
    errors: Cell<u64>,
    first_error: RefCell<Option<String>>,
}

/// A timerfd that tokio can poll (`AsyncFd` wants `AsRawFd`).
struct Timer(TimerFd);

struct Report {
    scheduled: u64,
    completed: u64,
    non_2xx: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
    latency_ns: Vec<u64>,
    lag_ns: Vec<u64>,
}

// === impl Args ===

impl Args {
    fn parse(mut argv: impl Iterator<Item = String>) -> Result<Args, String> {
        let mut addr = None;
        let mut rate = None;
        let mut duration = None;
        let mut conns = 64;
        let mut path = "/".to_string();
        let mut grace = Duration::from_secs(5);
        while let Some(arg) = argv.next() {
            let mut value = |name: &str| argv.next().ok_or_else(|| format!("{name} needs a value"));
            match arg.as_str() {
                "--rate" => rate = Some(parse_positive(&value("--rate")?, "--rate")?),
                "--duration" => duration = Some(parse_secs(&value("--duration")?, "--duration")?),
                "--conns" => {
                    conns = value("--conns")?
                        .parse()
                        .ok()
                        .filter(|&n| n > 0)
                        .ok_or("--conns must be a positive integer")?;
                }
                "--path" => path = value("--path")?,
                "--grace" => grace = parse_secs(&value("--grace")?, "--grace")?,
                _ if arg.starts_with("--") => return Err(format!("unknown option {arg}")),
                _ => addr = Some(arg.parse().map_err(|_| format!("ADDR must be ip:port, got {arg}"))?),
            }
        }
        Ok(Args {
            addr: addr.ok_or("ADDR (ip:port) is required")?,
            rate: rate.ok_or("--rate is required")?,
            duration: duration.ok_or("--duration is required")?,
            conns,
            path,
            grace,
        })
    }

    /// Request i is due this long after the start.
    fn offset(&self, i: u64) -> Duration {
        Duration::from_secs_f64(i as f64 / self.rate)
    }
}

fn parse_positive(s: &str, name: &str) -> Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .ok_or_else(|| format!("{name} must be a positive number, got {s}"))
}

/// Seconds as `4`, `4s` or `2.5`.
fn parse_secs(s: &str, name: &str) -> Result<Duration, String> {
    parse_positive(s.strip_suffix('s').unwrap_or(s), name).map(Duration::from_secs_f64)
}

// === impl Timer ===

impl AsRawFd for Timer {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_fd().as_raw_fd()
    }
}

// === impl Shared ===

impl Shared {
    fn error(&self, e: &io::Error) {
        self.errors.set(self.errors.get() + 1);
        let mut first = self.first_error.borrow_mut();
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }

    /// The scheduled time of the next due request, waiting for one; `None` once the pacer is
    /// done and the queue is empty.
    async fn next_due(&self) -> Option<Instant> {
        loop {
            let next = self.due.borrow_mut().pop_front();
            if next.is_some() {
                return next;
            }
            if self.finished.get() {
                return None;
            }
            // One thread: nothing can be queued between the check above and this wait.
            self.wake.notified().await;
        }
    }
}

// === impl Report ===

impl Report {
    fn line(mut self, args: &Args) -> String {
        self.latency_ns.sort_unstable();
        self.lag_ns.sort_unstable();
        let lat = |p: f64| percentile_us(&self.latency_ns, p);
        let lag = |p: f64| percentile_us(&self.lag_ns, p);
        let incomplete = self.scheduled.saturating_sub(self.completed + self.errors);
        let first_error = self
            .first_error
            .as_deref()
            .map(|e| format!(" first_error=\"{}\"", e.replace('"', "'")))
            .unwrap_or_default();
        format!(
            "rate={:.0} conns={} scheduled={} completed={} non2xx={} errors={} incomplete={} \
             achieved_rps={:.0} p50_us={} p90_us={} p99_us={} p999_us={} max_us={} \
             lag_p50_us={} lag_p99_us={}{first_error}",
            args.rate,
            args.conns,
            self.scheduled,
            self.completed,
            self.non_2xx,
            self.errors,
            incomplete,
            self.completed as f64 / self.elapsed.as_secs_f64().max(1e-9),
            lat(50.0),
            lat(90.0),
            lat(99.0),
            lat(99.9),
            lat(100.0),
            lag(50.0),
            lag(99.0),
        )
    }
}

/// Nearest-rank percentile of sorted nanoseconds, in whole microseconds ("NaN" when empty).
fn percentile_us(sorted_ns: &[u64], p: f64) -> String {
    if sorted_ns.is_empty() {
        return "NaN".to_string();
    }
    let rank = ((p / 100.0) * sorted_ns.len() as f64).ceil() as usize;
    let v = sorted_ns[rank.clamp(1, sorted_ns.len()) - 1];
    format!("{}", (v + 500) / 1000)
}

// === the load ===

fn main() -> ExitCode {
    let args = match Args::parse(std::env::args().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("paced-load: {e}");
            eprintln!("usage: paced-load ADDR --rate R --duration S [--conns C] [--path P] [--grace S]");
            return ExitCode::from(2);
        }
    };
    // The default 50 us of timer slack would let every timerfd wake-up come up to 50 us late.
    if let Err(e) = nix::sys::prctl::set_timerslack(1) {
        eprintln!("paced-load: warning: timer slack stays at its default: {e}");
    }
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("paced-load: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match LocalSet::new().block_on(&rt, run(&args)) {
        Ok(report) => {
            println!("{}", report.line(&args));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("paced-load: {}: {e}", args.addr);
            ExitCode::FAILURE
        }
    }
}

async fn run(args: &Args) -> io::Result<Report> {
    let request: Rc<[u8]> = format!("GET {} HTTP/1.1\r\nHost: {}\r\n\r\n", args.path, args.addr)
        .into_bytes()
        .into();
    let scheduled = (args.rate * args.duration.as_secs_f64()).round() as u64;
    let mut streams = Vec::with_capacity(args.conns);
    for _ in 0..args.conns {
        streams.push(connect(args.addr).await?);
    }
    let shared = Rc::new(Shared {
        due: RefCell::new(VecDeque::new()),
        wake: Notify::new(),
        finished: Cell::new(false),
        latency_ns: RefCell::new(Vec::with_capacity(scheduled as usize)),
        lag_ns: RefCell::new(Vec::with_capacity(scheduled as usize)),
        non_2xx: Cell::new(0),
        errors: Cell::new(0),
        first_error: RefCell::new(None),
    });
    let tasks: Vec<_> = streams
        .into_iter()
        .map(|s| tokio::task::spawn_local(connection(shared.clone(), args.addr, request.clone(), s)))
        .collect();
    let start = Instant::now() + Duration::from_millis(10);
    pace(&shared, args, scheduled, start).await?;
    // The last requests get `grace` to finish; whatever is still open then counts as incomplete.
    let deadline = tokio::time::Instant::now() + args.grace;
    for task in tasks {
        if tokio::time::timeout_at(deadline, task).await.is_err() {
            break;
        }
    }
    let elapsed = start.elapsed();
    let latency_ns = shared.latency_ns.take();
    let lag_ns = shared.lag_ns.take();
    Ok(Report {
        scheduled,
        completed: latency_ns.len() as u64,
        non_2xx: shared.non_2xx.get(),
        errors: shared.errors.get(),
        first_error: shared.first_error.take(),
        elapsed,
        latency_ns,
        lag_ns,
    })
}

/// Releases request i at `start + i / rate` into the queue of due requests.
async fn pace(shared: &Shared, args: &Args, scheduled: u64, start: Instant) -> io::Result<()> {
    let timer = TimerFd::new(
        ClockId::CLOCK_MONOTONIC,
        TimerFlags::TFD_NONBLOCK | TimerFlags::TFD_CLOEXEC,
    )
    .map_err(io::Error::from)?;
    // `AsyncFd::new` is deprecated because an fd borrowed by `T` could be closed while
    // registered; `Timer` owns its fd, which lives exactly as long as the registration.
    #[allow(deprecated)]
    let timer = AsyncFd::new(Timer(timer))?;
    let mut i = 0;
    while i < scheduled {
        let now = Instant::now();
        let mut released = 0;
        while i < scheduled && start + args.offset(i) <= now {
            shared.due.borrow_mut().push_back(start + args.offset(i));
            i += 1;
            released += 1;
        }
        for _ in 0..released {
            shared.wake.notify_one();
        }
        if i == scheduled {
            break;
        }
        let wait = (start + args.offset(i)).saturating_duration_since(Instant::now());
        if wait.is_zero() {
            continue;
        }
        timer
            .get_ref()
            .0
            .set(
                Expiration::OneShot(TimeSpec::from_duration(wait)),
                TimerSetTimeFlags::empty(),
            )
            .map_err(io::Error::from)?;
        loop {
            let mut ready = timer.readable().await?;
            match ready.try_io(|t| t.get_ref().0.wait().map_err(io::Error::from)) {
                Ok(res) => break res?,
                Err(_would_block) => continue,
            }
        }
    }
    shared.finished.set(true);
    shared.wake.notify_waiters();
    Ok(())
}

async fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr).await?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// One keep-alive connection: takes due requests one at a time until the pacer is done.
async fn connection(shared: Rc<Shared>, addr: SocketAddr, request: Rc<[u8]>, stream: TcpStream) {
    let mut stream = Some(stream);
    let mut buf = Vec::with_capacity(4096);
    while let Some(due) = shared.next_due().await {
        let mut s = match stream.take() {
            Some(s) => s,
            None => match connect(addr).await {
                Ok(s) => s,
                Err(e) => {
                    shared.error(&e);
                    continue;
                }
            },
        };
        let sent = Instant::now();
        match exchange(&mut s, &request, &mut buf).await {
            Ok(status) => {
                let done = Instant::now();
                shared.latency_ns.borrow_mut().push(nanos(done - due));
                shared
                    .lag_ns
                    .borrow_mut()
                    .push(nanos(sent.saturating_duration_since(due)));
                if !(200..300).contains(&status) {
                    shared.non_2xx.set(shared.non_2xx.get() + 1);
                }
                stream = Some(s);
            }
            // The connection is dropped; the next request opens a new one.
            Err(e) => shared.error(&e),
        }
    }
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}

/// Writes the request and reads one whole response (Content-Length framing); its status.
async fn exchange(s: &mut TcpStream, request: &[u8], buf: &mut Vec<u8>) -> io::Result<u16> {
    s.write_all(request).await?;
    buf.clear();
    let mut head: Option<(usize, u16, usize)> = None; // (head length, status, body length)
    loop {
        if head.is_none() {
            if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let (status, body) = parse_head(&buf[..end])?;
                head = Some((end + 4, status, body));
            }
        }
        if let Some((head_len, status, body)) = head {
            match buf.len().cmp(&(head_len + body)) {
                std::cmp::Ordering::Equal => return Ok(status),
                std::cmp::Ordering::Greater => return Err(broken("bytes after the response")),
                std::cmp::Ordering::Less => {}
            }
        }
        if buf.len() > MAX_RESPONSE {
            return Err(broken("response larger than 1 MiB"));
        }
        buf.reserve(4096);
        if s.read_buf(buf).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed mid-response",
            ));
        }
    }
}

/// Status and body length of a response head (without its final CRLF CRLF).
fn parse_head(head: &[u8]) -> io::Result<(u16, usize)> {
    let text = std::str::from_utf8(head).map_err(|_| broken("response head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let status: u16 = lines
        .next()
        .and_then(|l| l.strip_prefix("HTTP/1.1 ").or_else(|| l.strip_prefix("HTTP/1.0 ")))
        .and_then(|rest| rest.get(..3))
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| broken("bad status line"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse().map_err(|_| broken("bad content-length"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(broken("chunked responses are not supported"));
        }
    }
    match length {
        Some(n) => Ok((status, n)),
        None if status == 204 || status == 304 || status < 200 => Ok((status, 0)),
        None => Err(broken("response without content-length")),
    }
}

fn broken(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, what.to_string())
}
