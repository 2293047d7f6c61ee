//! HTTP clients for tests: `curl` (the real client) and a tiny raw HTTP/1.1 client over std TCP
//! for the admin API and malformed-request cases.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use crate::tools;

// === Curl ===

/// One `curl` invocation, built up argument by argument.
#[derive(Debug, Clone)]
pub struct Curl {
    url: String,
    args: Vec<String>,
}

/// What `curl` gave back: final response status, headers and body, plus its `-v` trace.
#[derive(Debug, Clone)]
pub struct CurlResponse {
    /// curl's exit code (0 = transfer worked, 7 = connection refused, 28 = timeout, ...).
    pub exit_code: i32,
    /// Status of the final response (0 if none was received).
    pub status: u16,
    /// The status line of the final response, e.g. `HTTP/2 200`.
    pub status_line: String,
    /// Headers of the final response, names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    /// Every response head received (e.g. a `100 Continue` before the final one).
    pub all_heads: Vec<String>,
    /// The response body.
    pub body: Vec<u8>,
    /// curl's stderr (`-v` trace and errors).
    pub verbose: String,
}

impl Curl {
    /// A GET of `url`.
    pub fn get(url: impl Into<String>) -> Curl {
        Curl {
            url: url.into(),
            args: Vec::new(),
        }
    }

    /// Adds raw curl arguments.
    pub fn args<I, S>(mut self, args: I) -> Curl
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.args.extend(args.into_iter().map(Into::into));
        self
    }

    /// Adds a request header, `"Name: value"`.
    pub fn header(self, header: &str) -> Curl {
        self.args(["-H", header])
    }

    /// Sets the request method.
    pub fn method(self, method: &str) -> Curl {
        self.args(["-X", method])
    }

    /// Sends the file at `path` as the request body (POST unless a method is set).
    pub fn body_file(self, path: &Path) -> Curl {
        let arg = format!("@{}", path.display());
        self.args(["--data-binary".to_string(), arg])
    }

    /// Sends `text` as the request body (POST unless a method is set).
    pub fn body(self, text: &str) -> Curl {
        self.args(["--data-binary", text])
    }

    /// Speaks HTTP/2 without upgrade (prior knowledge).
    pub fn http2(self) -> Curl {
        self.args(["--http2-prior-knowledge"])
    }

    /// Runs curl (at most 30 s) and returns what it saw; never panics on HTTP errors.
    pub fn run(self) -> CurlResponse {
        let dir = tempfile::tempdir().expect("tempdir for curl output");
        let head_file = dir.path().join("head");
        let body_file = dir.path().join("body");
        let output = tools::command("curl")
            .args(["-sS", "-v", "--noproxy", "*", "--max-time", "30"])
            .arg("-D")
            .arg(&head_file)
            .arg("-o")
            .arg(&body_file)
            .args(&self.args)
            .arg(&self.url)
            .output()
            .expect("run curl");
        let heads = std::fs::read_to_string(&head_file).unwrap_or_default();
        let body = std::fs::read(&body_file).unwrap_or_default();
        let all_heads: Vec<String> = split_heads(&heads);
        let (status_line, status, headers) = all_heads.last().map(|h| parse_head(h)).unwrap_or_default();
        CurlResponse {
            exit_code: output.status.code().unwrap_or(-1),
            status,
            status_line,
            headers,
            all_heads,
            body,
            verbose: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }
}

impl CurlResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics with the response if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| panic!("response body is not JSON ({e}): {self}"))
    }

    /// Panics with the whole exchange unless the transfer worked and the status is `status`.
    pub fn expect_status(&self, status: u16) -> &CurlResponse {
        assert!(
            self.exit_code == 0 && self.status == status,
            "expected status {status}, got: {self}"
        );
        self
    }
}

impl std::fmt::Display for CurlResponse {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "curl exit {} status {} headers {:?} body {:?}\n--- curl -v ---\n{}",
            self.exit_code,
            self.status,
            self.headers,
            truncate(&self.text(), 2000),
            truncate(&self.verbose, 4000)
        )
    }
}

fn split_heads(dump: &str) -> Vec<String> {
    let mut heads = Vec::new();
    let mut current = String::new();
    for line in dump.split('\n') {
        let line = line.trim_end_matches('\r');
        if line.is_empty() {
            if !current.is_empty() {
                heads.push(std::mem::take(&mut current));
            }
        } else {
            current.push_str(line);
            current.push('\n');
        }
    }
    if !current.is_empty() {
        heads.push(current);
    }
    heads.retain(|h| h.starts_with("HTTP/"));
    heads
}

fn parse_head(head: &str) -> (String, u16, Vec<(String, String)>) {
    let mut lines = head.lines();
    let status_line = lines.next().unwrap_or_default().trim().to_string();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    (status_line, status, headers)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// === raw HTTP/1.1 ===

/// A response read by the raw client.
#[derive(Debug, Clone, Default)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body (de-chunked).
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers.iter().find(|(k, _)| *k == name).map(|(_, v)| v.as_str())
    }

    /// The body as (lossy) UTF-8.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body parsed as JSON; panics if it is not.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): status {} body {:?}", self.status, self.text()))
    }
}

/// `GET path` on `addr` with `Connection: close`; `Err` on any I/O or parse failure.
pub fn get(addr: SocketAddr, path: &str) -> Result<HttpResponse, String> {
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    let raw = raw_exchange(addr, request.as_bytes(), Duration::from_secs(10))?;
    parse_response(&raw)
}

/// Writes `request` to a new connection to `addr`, then reads until the peer closes (or
/// `timeout` passes without data) and returns every byte received.
pub fn raw_exchange(addr: SocketAddr, request: &[u8], timeout: Duration) -> Result<Vec<u8>, String> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    stream.set_write_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    // The peer may answer and close before it has read everything (e.g. a 400 on garbage):
    // a write error then is not a test failure, the answer is what counts.
    let _ = stream.write_all(request);
    let mut out = Vec::new();
    let mut buf = [0u8; 16 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if out.is_empty() && e.kind() != std::io::ErrorKind::ConnectionReset => {
                return Err(format!("read from {addr}: {e}"))
            }
            Err(_) => break,
        }
    }
    Ok(out)
}

fn parse_response(raw: &[u8]) -> Result<HttpResponse, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no end of head in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let rest = &raw[split + 4..];
    let (_, status, headers) = parse_head(&head.replace("\r\n", "\n"));
    if status == 0 {
        return Err(format!("bad status line in {head:?}"));
    }
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"));
    let body = if chunked { dechunk(rest)? } else { rest.to_vec() };
    Ok(HttpResponse { status, headers, body })
}

fn dechunk(mut data: &[u8]) -> Result<Vec<u8>, String> {
    let mut body = Vec::new();
    loop {
        let line_end = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .ok_or("truncated chunk size line")?;
        let size_text = String::from_utf8_lossy(&data[..line_end]);
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|e| format!("chunk size {size_text:?}: {e}"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(body);
        }
        if data.len() < size + 2 {
            return Err("truncated chunk".into());
        }
        body.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// `curl` as a plain `Command` (proxy variables removed), for invocations [`Curl`] cannot express
/// (several URLs in one run).
pub fn curl_command() -> Command {
    let mut cmd = tools::command("curl");
    cmd.args(["--noproxy", "*", "--max-time", "30"]);
    cmd
}
