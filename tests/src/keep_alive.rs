//! A keep-alive HTTP/1.1 client for the steady loads of [`crate::lifecycle::Load`]: `GET`s back
//! to back on ONE persistent connection (a new one only when the server closes it), counting
//! connections, reuses and resends.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// What the keep-alive clients of one load count (shared by its threads).
#[derive(Debug, Default)]
pub struct Counters {
    /// Connections opened.
    pub connections: AtomicUsize,
    /// Answers that came on a reused connection.
    pub reused: AtomicUsize,
    /// Requests sent again after a reused connection was found closed.
    pub stale_retries: AtomicUsize,
}

impl Counters {
    /// `(connections, reused, stale_retries)` now.
    pub fn snapshot(&self) -> (usize, usize, usize) {
        (
            self.connections.load(Ordering::SeqCst),
            self.reused.load(Ordering::SeqCst),
            self.stale_retries.load(Ordering::SeqCst),
        )
    }
}

/// One client: `GET <path>` to `addr` (`Host: orders`) on its persistent connection. Like every
/// keep-alive client (RFC 9112 §9.3.1), a request that finds its reused connection closed before
/// a byte of the answer came is sent again once on a new connection (counted in
/// [`Counters::stale_retries`]). Any other error, or a status other than 200, fails the request.
pub struct Client {
    addr: SocketAddr,
    path: String,
    conn: Option<BufReader<TcpStream>>,
    counters: Arc<Counters>,
}

/// A failed exchange: whether the server might just have closed an idle reused connection.
struct ExchangeError {
    stale: bool,
    what: String,
}

impl Client {
    /// A client with no connection yet.
    pub fn new(addr: SocketAddr, path: &str, counters: Arc<Counters>) -> Client {
        Client {
            addr,
            path: path.to_owned(),
            conn: None,
            counters,
        }
    }

    /// One request: `Ok(x-upstream-name)` of a 200 answer, `Err(what went wrong)` otherwise.
    pub fn request(&mut self) -> Result<String, String> {
        let mut outcome = self.exchange();
        if let Err(ExchangeError { stale: true, .. }) = outcome {
            self.counters.stale_retries.fetch_add(1, Ordering::SeqCst);
            self.conn = None;
            outcome = self.exchange();
        }
        outcome.map_err(|e| {
            self.conn = None;
            e.what
        })
    }

    fn exchange(&mut self) -> Result<String, ExchangeError> {
        let reused = self.conn.is_some();
        let fail = |stale: bool, what: String| ExchangeError {
            stale: stale && reused,
            what,
        };
        if self.conn.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, Duration::from_secs(5))
                .map_err(|e| fail(false, format!("connect: {e}")))?;
            stream
                .set_read_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| fail(false, e.to_string()))?;
            stream
                .set_write_timeout(Some(Duration::from_secs(20)))
                .map_err(|e| fail(false, e.to_string()))?;
            self.counters.connections.fetch_add(1, Ordering::SeqCst);
            self.conn = Some(BufReader::new(stream));
        }
        let Some(reader) = self.conn.as_mut() else {
            return Err(fail(false, "no connection".into()));
        };
        let request = format!("GET {} HTTP/1.1\r\nHost: orders\r\n\r\n", self.path);
        reader
            .get_mut()
            .write_all(request.as_bytes())
            .map_err(|e| fail(true, format!("write: {e}")))?;
        let mut status_line = String::new();
        match reader.read_line(&mut status_line) {
            Ok(0) => return Err(fail(true, "closed before the answer".into())),
            Ok(_) => {}
            Err(e) => return Err(fail(true, format!("read: {e}"))),
        }
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| fail(false, format!("bad status line {status_line:?}")))?;
        let (mut length, mut chunked, mut close, mut upstream) = (0usize, false, false, String::new());
        loop {
            let mut line = String::new();
            reader
                .read_line(&mut line)
                .map_err(|e| fail(false, format!("read headers: {e}")))?;
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
            match name.as_str() {
                "content-length" => length = value.parse().unwrap_or(0),
                "transfer-encoding" => chunked = value.eq_ignore_ascii_case("chunked"),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                "x-upstream-name" => upstream = value.to_owned(),
                _ => {}
            }
        }
        if chunked {
            loop {
                let mut size = String::new();
                reader
                    .read_line(&mut size)
                    .map_err(|e| fail(false, format!("chunk: {e}")))?;
                let n = usize::from_str_radix(size.trim().split(';').next().unwrap_or(""), 16)
                    .map_err(|_| fail(false, format!("bad chunk size {size:?}")))?;
                let mut body = vec![0; n + 2];
                reader
                    .read_exact(&mut body)
                    .map_err(|e| fail(false, format!("chunk: {e}")))?;
                if n == 0 {
                    break;
                }
            }
        } else {
            let mut body = vec![0; length];
            reader
                .read_exact(&mut body)
                .map_err(|e| fail(false, format!("body: {e}")))?;
        }
        if close {
            self.conn = None;
        }
        if reused {
            self.counters.reused.fetch_add(1, Ordering::SeqCst);
        }
        if status == 200 {
            Ok(upstream)
        } else {
            Err(fail(false, format!("status {status}")))
        }
    }
}
