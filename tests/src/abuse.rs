//! Helpers of the abuse tests (`tests/abuse.rs`): the steady client that must keep getting
//! answers while the inbound listener is abused, the agent's memory and descriptors read from
//! `/proc`, raw sockets that notice when the agent closes them, and the connection flood.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::tools;

/// How long the steady client waits for one answer before counting the request as failed.
const STEADY_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// The pause between two steady requests (about 40 requests a second: light next to the abuse).
const STEADY_PAUSE: Duration = Duration::from_millis(25);

/// A keep-alive HTTP/1.1 client sending `GET <path>` back to back on ONE connection, opened
/// before the abuse starts. Nothing is retried: an error, a non-200 or a connection the server
/// closed is a failure (the client then reconnects, so later failures are counted too).
pub struct Steady {
    stop: Arc<AtomicBool>,
    answers: Arc<AtomicUsize>,
    thread: JoinHandle<SteadyReport>,
}

/// What the steady client saw.
#[derive(Debug, Default)]
pub struct SteadyReport {
    /// Requests answered 200.
    pub answers: usize,
    /// Every failed request, with what went wrong.
    pub failures: Vec<String>,
    /// Connections opened (1 when the server never closed the first one).
    pub connections: usize,
    /// The slowest answer.
    pub max_latency: Duration,
}

/// What [`conn_flood`] counted, from the client's side.
#[derive(Debug, Clone, Default)]
pub struct FloodReport {
    /// `connect()` calls made.
    pub attempted: u64,
    /// Handshakes completed (the kernel may complete one the agent has not accepted yet).
    pub connected: u64,
    /// Refused (RST to the SYN).
    pub refused: u64,
    /// Still unanswered when the client gave up on them (SYN dropped: the backlog was full).
    pub unanswered: u64,
    /// Other connect errors, e.g. `EADDRNOTAVAIL`.
    pub other_errors: u64,
    /// The client's own descriptor limit after raising it.
    pub client_nofile: u64,
    /// Sockets the client held open at once, at most.
    pub max_open: u64,
    /// Wall time of the flood.
    pub seconds: f64,
}

// === impl Steady ===

impl Steady {
    /// Connects to `addr`, waits for a first 200 to `GET path`, then keeps sending from a thread.
    /// Panics if the first request fails: the abuse must not start before the client is in.
    pub fn start(addr: SocketAddr, path: &str) -> Steady {
        let mut conn = SteadyConn::open(addr).unwrap_or_else(|e| panic!("steady client: connect {addr}: {e}"));
        conn.get(path)
            .unwrap_or_else(|e| panic!("steady client: first GET {path} on {addr}: {e}"));
        let stop = Arc::new(AtomicBool::new(false));
        let answers = Arc::new(AtomicUsize::new(1));
        let thread = {
            let (stop, answers, path) = (stop.clone(), answers.clone(), path.to_string());
            std::thread::spawn(move || steady_loop(addr, &path, conn, &stop, &answers))
        };
        Steady { stop, answers, thread }
    }

    /// Answers so far.
    pub fn answers(&self) -> usize {
        self.answers.load(Ordering::SeqCst)
    }

    /// Stops the client and returns what it saw.
    pub fn stop(self) -> SteadyReport {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("steady client thread panicked")
    }
}

/// The steady client's thread: a request every [`STEADY_PAUSE`] until `stop`, on `conn` as long
/// as the server keeps it open.
fn steady_loop(
    addr: SocketAddr,
    path: &str,
    conn: SteadyConn,
    stop: &AtomicBool,
    answers: &AtomicUsize,
) -> SteadyReport {
    let mut report = SteadyReport {
        answers: 1,
        connections: 1,
        ..SteadyReport::default()
    };
    let mut conn = Some(conn);
    while !stop.load(Ordering::SeqCst) {
        std::thread::sleep(STEADY_PAUSE);
        let mut c = match conn.take() {
            Some(c) => c,
            None => match SteadyConn::open(addr) {
                Ok(c) => {
                    report.connections += 1;
                    c
                }
                Err(e) => {
                    report.failures.push(format!("reconnect: {e}"));
                    continue;
                }
            },
        };
        let started = Instant::now();
        match c.get(path) {
            Ok(()) => {
                report.max_latency = report.max_latency.max(started.elapsed());
                report.answers += 1;
                answers.fetch_add(1, Ordering::SeqCst);
                conn = Some(c);
            }
            Err(e) => report.failures.push(format!("after {:?}: {e}", started.elapsed())),
        }
    }
    report
}

impl SteadyReport {
    /// Panics unless every request was answered 200 on the first connection and at least
    /// `min_during` answers came while the abuse ran (`during` = answers in that window).
    pub fn assert_unaffected(&self, during: usize, min_during: usize) {
        assert!(
            self.failures.is_empty(),
            "the steady client had {} failed requests of {} (first: {:?})",
            self.failures.len(),
            self.failures.len() + self.answers,
            self.failures.first()
        );
        assert_eq!(self.connections, 1, "the agent closed the steady client's connection");
        assert!(
            during >= min_during,
            "the steady client got {during} answers during the abuse, fewer than {min_during} (slowest {:?})",
            self.max_latency
        );
    }
}

/// One keep-alive connection of the steady client.
struct SteadyConn {
    reader: BufReader<TcpStream>,
}

impl SteadyConn {
    fn open(addr: SocketAddr) -> io::Result<SteadyConn> {
        let stream = TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
        stream.set_read_timeout(Some(STEADY_READ_TIMEOUT))?;
        stream.set_write_timeout(Some(STEADY_READ_TIMEOUT))?;
        stream.set_nodelay(true)?;
        Ok(SteadyConn {
            reader: BufReader::new(stream),
        })
    }

    /// One `GET path`: `Ok` for a complete 200 answer that leaves the connection open.
    fn get(&mut self, path: &str) -> Result<(), String> {
        let request = format!("GET {path} HTTP/1.1\r\nHost: steady\r\n\r\n");
        self.reader
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| format!("write: {e}"))?;
        let (status, headers) = read_head(&mut self.reader)?;
        read_body(&mut self.reader, &headers)?;
        if status != 200 {
            return Err(format!("status {status}"));
        }
        if header(&headers, "connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            return Err("the agent asked to close the connection".into());
        }
        Ok(())
    }
}

// === HTTP/1.1 on raw sockets ===

/// Reads a response head: the status and the headers (names lower-cased).
pub fn read_head(reader: &mut impl BufRead) -> Result<(u16, Vec<(String, String)>), String> {
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(0) => return Err("closed before the answer".into()),
        Ok(_) => {}
        Err(e) => return Err(format!("read status line: {e}")),
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line {line:?}"))?;
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).map_err(|e| format!("read headers: {e}"))?;
        let line = line.trim_end();
        if line.is_empty() {
            return Ok((status, headers));
        }
        if let Some((name, value)) = line.split_once(':') {
            headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
        }
    }
}

/// Reads the body the head announced (Content-Length or chunked).
pub fn read_body(reader: &mut impl BufRead, headers: &[(String, String)]) -> Result<Vec<u8>, String> {
    let chunked = header(headers, "transfer-encoding").is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
    if !chunked {
        let length: usize = header(headers, "content-length")
            .map(|v| v.parse().map_err(|_| format!("bad content-length {v:?}")))
            .transpose()?
            .unwrap_or(0);
        let mut body = vec![0; length];
        reader.read_exact(&mut body).map_err(|e| format!("body: {e}"))?;
        return Ok(body);
    }
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).map_err(|e| format!("chunk size: {e}"))?;
        let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
            .map_err(|_| format!("bad chunk size {size:?}"))?;
        let mut chunk = vec![0; n + 2];
        reader.read_exact(&mut chunk).map_err(|e| format!("chunk: {e}"))?;
        if n == 0 {
            return Ok(body);
        }
        body.extend_from_slice(&chunk[..n]);
    }
}

/// The first value of `name` (lower-case) in `headers`.
pub fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// The status of every response in `raw` (bytes read from one connection until it closed):
/// each `HTTP/1.x NNN` at the start or after a blank line.
pub fn statuses(raw: &[u8]) -> Vec<u16> {
    let text = String::from_utf8_lossy(raw);
    text.match_indices("HTTP/1.")
        .filter(|(i, _)| *i == 0 || text[..*i].ends_with("\r\n"))
        .filter_map(|(i, _)| text[i..].split_whitespace().nth(1)?.parse().ok())
        .collect()
}

/// Writes `request` to a new connection to `addr` and reads until the peer closes or `timeout`
/// passes without data: (every byte received, whether the peer closed the connection).
pub fn exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> (Vec<u8>, bool) {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    stream.set_read_timeout(Some(timeout)).expect("set read timeout");
    stream.set_write_timeout(Some(timeout)).expect("set write timeout");
    // The peer may answer and close before it has read everything (a 400 on garbage): a
    // write error is not a failure, the answer is what counts.
    let _ = stream.write_all(request);
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return (out, true),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut) => return (out, false),
            Err(_) => return (out, true),
        }
    }
}

// === sockets ===

/// Whether the peer has closed `stream` (EOF or reset), without blocking; bytes the peer sent
/// (an error response before the close) are appended to `received`.
pub fn peer_closed(stream: &mut TcpStream, received: &mut Vec<u8>) -> bool {
    if stream.set_nonblocking(true).is_err() {
        return true;
    }
    let mut buf = [0u8; 4096];
    let closed = loop {
        match stream.read(&mut buf) {
            Ok(0) => break true,
            Ok(n) => received.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break false,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break true,
        }
    };
    let _ = stream.set_nonblocking(false);
    closed
}

/// What [`trickle`] saw on one connection.
#[derive(Debug, Clone, Default)]
pub struct Trickled {
    /// When the agent closed it, counted from the `since` given to [`trickle`].
    pub closed_after: Option<Duration>,
    /// What the agent sent before closing (e.g. a 408), if anything.
    pub received: Vec<u8>,
}

/// Sends each connection's `bytes` one byte per `every` (the rest of what the test wrote
/// already) and watches for the agent closing it; stops when every connection is closed or
/// `limit` has passed since `since`.
pub fn trickle(conns: &mut [(TcpStream, Vec<u8>)], every: Duration, since: Instant, limit: Duration) -> Vec<Trickled> {
    let mut seen = vec![Trickled::default(); conns.len()];
    let mut sent = vec![0usize; conns.len()];
    loop {
        for (i, (stream, bytes)) in conns.iter_mut().enumerate() {
            if seen[i].closed_after.is_some() {
                continue;
            }
            let gone = peer_closed(stream, &mut seen[i].received)
                || (sent[i] < bytes.len() && stream.write_all(&bytes[sent[i]..=sent[i]]).is_err());
            if gone {
                seen[i].closed_after = Some(since.elapsed());
            } else {
                sent[i] += 1;
            }
        }
        if seen.iter().all(|t| t.closed_after.is_some()) || since.elapsed() >= limit {
            return seen;
        }
        std::thread::sleep(every);
    }
}

// === /proc ===

/// A `kB` field of `/proc/<pid>/status` (`VmRSS`, `VmHWM`), in KiB; panics if unreadable.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|e| panic!("read /proc/{pid}/status: {e}"));
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The resident set size now, in MiB.
pub fn rss_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmRSS") as f64 / 1024.0
}

/// The highest resident set size since the process started (`VmHWM`), in MiB.
pub fn peak_rss_mib(pid: u32) -> f64 {
    proc_status_kib(pid, "VmHWM") as f64 / 1024.0
}

/// Open descriptors of `pid` (entries of `/proc/<pid>/fd`); 0 if unreadable.
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// The soft `Max open files` of `pid` from `/proc/<pid>/limits`.
pub fn nofile_limit(pid: u32) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix("Max open files"))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// Samples `sample()` every 50 ms on a thread until stopped; [`Sampler::stop`] gives the maximum.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    thread: JoinHandle<u64>,
}

impl Sampler {
    /// Starts sampling.
    pub fn start(sample: impl Fn() -> u64 + Send + 'static) -> Sampler {
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut max = 0;
                while !stop.load(Ordering::SeqCst) {
                    max = max.max(sample());
                    std::thread::sleep(Duration::from_millis(50));
                }
                max.max(sample())
            })
        };
        Sampler { stop, thread }
    }

    /// Stops sampling and returns the largest sample.
    pub fn stop(self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        self.thread.join().expect("sampler thread panicked")
    }
}

// === connection flood ===

/// Attempts `attempts` TCP connections to `target` from a Python client (std Rust can neither
/// bind before connecting nor connect without blocking): non-blocking connects from source
/// addresses `127.0.0.2`..`127.0.0.9` (so ephemeral ports never run out), at most `hold`
/// sockets open at once (the oldest closed with RST, so none lingers in TIME_WAIT), its own
/// `RLIMIT_NOFILE` raised to fit, everything closed at the end; stops early after `limit`.
pub fn conn_flood(target: SocketAddr, attempts: u64, hold: u64, limit: Duration) -> FloodReport {
    let output = tools::python_command(&[])
        .args(["-c", FLOOD_PY])
        .args([
            target.ip().to_string(),
            target.port().to_string(),
            attempts.to_string(),
            hold.to_string(),
            limit.as_secs_f64().to_string(),
        ])
        .output()
        .expect("run the connection flood (python3)");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "connection flood failed ({}): {}\n{stdout}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let doc: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("connection flood printed no JSON ({e}): {stdout}"));
    let n = |k: &str| doc[k].as_u64().unwrap_or_else(|| panic!("no {k} in {doc}"));
    FloodReport {
        attempted: n("attempted"),
        connected: n("connected"),
        refused: n("refused"),
        unanswered: n("unanswered"),
        other_errors: n("other_errors"),
        client_nofile: n("nofile"),
        max_open: n("max_open"),
        seconds: doc["seconds"].as_f64().unwrap_or(0.0),
    }
}

/// The flood client (see [`conn_flood`]); argv: host port attempts hold seconds.
const FLOOD_PY: &str = r#"
import collections, errno, json, resource, select, socket, struct, sys, time

host, port, attempts, hold, limit = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
sources = ["127.0.0.%d" % i for i in range(2, 10)]
want = hold + 256
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
try:
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), max(hard, want)))
except (ValueError, OSError):
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
hold = min(hold, nofile - 256)

counts = collections.Counter(attempted=0, connected=0, refused=0, unanswered=0, other_errors=0)
rst = struct.pack("ii", 1, 0)
ep = select.epoll()
held = collections.deque()
pending = {}
max_open = 0

def settle(sock, err):
    if err == 0:
        counts["connected"] += 1
    elif err == errno.ECONNREFUSED:
        counts["refused"] += 1
    else:
        counts["other_errors"] += 1

def reap(timeout):
    for fd, _ in ep.poll(timeout):
        sock = pending.pop(fd, None)
        if sock is None:
            continue
        ep.unregister(fd)
        settle(sock, sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))

def close(sock):
    fd = sock.fileno()
    if fd in pending:
        del pending[fd]
        ep.unregister(fd)
        counts["unanswered"] += 1
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, rst)
    except OSError:
        pass
    sock.close()

start = time.monotonic()
i = 0
while i < attempts and time.monotonic() - start < limit:
    while len(held) >= hold:
        close(held.popleft())
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        sock.bind((sources[i % len(sources)], 0))
        err = sock.connect_ex((host, port))
    except OSError as e:
        err = e.errno
    i += 1
    counts["attempted"] += 1
    if err == errno.EINPROGRESS:
        pending[sock.fileno()] = sock
        ep.register(sock.fileno(), select.EPOLLOUT)
        held.append(sock)
    elif err == 0:
        counts["connected"] += 1
        held.append(sock)
    else:
        settle(sock, err)
        sock.close()
    max_open = max(max_open, len(held))
    if i % 64 == 0:
        reap(0)

deadline = time.monotonic() + 2.0
while pending and time.monotonic() < deadline:
    reap(0.1)
while held:
    close(held.popleft())
counts["seconds"] = round(time.monotonic() - start, 2)
counts["nofile"] = nofile
counts["max_open"] = max_open
print(json.dumps(counts))
"#;
