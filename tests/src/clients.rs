//! Real clients other than curl: h2load, wrk, the Python gRPC and WebSocket clients, and
//! `promtool check metrics`.

use std::io::Write;
use std::net::SocketAddr;
use std::process::{Output, Stdio};

use crate::fixture;
use crate::tools;

/// The Python gRPC client's verdict and report.
#[derive(Debug, Clone)]
pub struct ClientRun {
    /// Whether the client exited 0 (every call as expected).
    pub success: bool,
    /// The JSON document it printed (`Null` if it printed none).
    pub report: serde_json::Value,
    /// stdout + stderr, for failure messages.
    pub output: String,
}

/// Runs `tests/fixtures/grpc_client.py --target <target> <args>`.
pub fn grpc_client(target: SocketAddr, args: &[&str]) -> ClientRun {
    let output = tools::python_command(&["grpc"])
        .arg(fixture("grpc_client.py"))
        .arg("--target")
        .arg(target.to_string())
        .args(args)
        .output()
        .expect("run grpc_client.py");
    client_run(output)
}

/// Runs `tests/fixtures/ws_client.py --connect <connect> --url <url> <args>`.
pub fn ws_client(connect: SocketAddr, url: &str, args: &[&str]) -> ClientRun {
    let output = tools::python_command(&["websockets"])
        .arg(fixture("ws_client.py"))
        .arg("--connect")
        .arg(connect.to_string())
        .arg("--url")
        .arg(url)
        .args(args)
        .output()
        .expect("run ws_client.py");
    client_run(output)
}

fn client_run(output: Output) -> ClientRun {
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let report = stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str(l).ok())
        .unwrap_or(serde_json::Value::Null);
    ClientRun {
        success: output.status.success(),
        report,
        output: format!(
            "exit {}\n--- stdout ---\n{stdout}\n--- stderr ---\n{stderr}",
            output.status
        ),
    }
}

/// The counts of an `h2load` run.
#[derive(Debug, Clone, Default)]
pub struct H2loadSummary {
    /// Requests that got a response.
    pub succeeded: u64,
    /// Requests that failed.
    pub failed: u64,
    /// Requests that ended with a response, whatever its status (h2load's `done`).
    pub done: u64,
    /// Responses with a 2xx status.
    pub status_2xx: u64,
    /// Responses with a 5xx status (h2load counts them as `failed`).
    pub status_5xx: u64,
    /// h2load's whole output.
    pub output: String,
}

/// Runs `h2load <args> <url>` (HTTP/2 prior knowledge for `http://` URLs) and parses its summary.
pub fn h2load(url: &str, args: &[&str]) -> H2loadSummary {
    let output = tools::command("h2load")
        .args(args)
        .arg(url)
        .output()
        .expect("run h2load");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    let mut summary = H2loadSummary {
        output: text.clone(),
        ..H2loadSummary::default()
    };
    for line in text.lines() {
        let line = line.trim();
        if let Some(rest) = line.strip_prefix("requests:") {
            summary.succeeded = count_before(rest, "succeeded");
            summary.failed = count_before(rest, "failed");
            summary.done = count_before(rest, "done");
        } else if let Some(rest) = line.strip_prefix("status codes:") {
            summary.status_2xx = count_before(rest, "2xx");
            summary.status_5xx = count_before(rest, "5xx");
        }
    }
    summary
}

/// In `"200 total, 200 succeeded, 0 failed"`, the number before `word`.
fn count_before(text: &str, word: &str) -> u64 {
    text.split(',')
        .map(str::trim)
        .find_map(|part| {
            let (n, w) = part.split_once(' ')?;
            (w.trim() == word).then(|| n.parse().ok()).flatten()
        })
        .unwrap_or(0)
}

/// The summary of a `wrk` run.
#[derive(Debug, Clone, Default)]
pub struct WrkSummary {
    /// Requests completed (`N requests in ...`).
    pub requests: u64,
    /// Socket errors of every kind (connect, read, write, timeout), summed.
    pub socket_errors: u64,
    /// Answers with a status other than 2xx or 3xx.
    pub non_2xx: u64,
    /// wrk's stdout (its report).
    pub output: String,
}

impl WrkSummary {
    /// Parses wrk's report `out`; a count that is absent is 0.
    pub fn parse(out: &str) -> WrkSummary {
        let requests = out
            .lines()
            .find_map(|l| {
                l.trim()
                    .split_once(" requests in ")
                    .and_then(|(n, _)| n.trim().parse().ok())
            })
            .unwrap_or(0);
        let socket_errors = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Socket errors:"))
            .map(|rest| {
                rest.split(',')
                    .filter_map(|kv| kv.split_whitespace().last().and_then(|n| n.parse::<u64>().ok()))
                    .sum()
            })
            .unwrap_or(0);
        let non_2xx = out
            .lines()
            .find_map(|l| l.trim().strip_prefix("Non-2xx or 3xx responses:"))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        WrkSummary {
            requests,
            socket_errors,
            non_2xx,
            output: out.to_owned(),
        }
    }

    /// The latency percentile `p` (`"99%"`, from `--latency`) in milliseconds; infinite when
    /// the report has none.
    pub fn latency_ms(&self, p: &str) -> f64 {
        self.output
            .lines()
            .find_map(|l| l.trim().strip_prefix(p).map(str::trim))
            .and_then(|v| {
                let (n, unit) = v.split_at(v.find(|c: char| c.is_ascii_alphabetic())?);
                let n: f64 = n.parse().ok()?;
                Some(match unit {
                    "us" => n / 1000.0,
                    "ms" => n,
                    "s" => n * 1000.0,
                    "m" => n * 60_000.0,
                    _ => return None,
                })
            })
            .unwrap_or(f64::INFINITY)
    }
}

/// Runs `wrk <args> <url>` to its end and parses its report.
pub fn wrk(url: &str, args: &[&str]) -> WrkSummary {
    let out = tools::command("wrk").args(args).arg(url).output().expect("run wrk");
    WrkSummary::parse(&String::from_utf8_lossy(&out.stdout))
}

/// `promtool check metrics` on the Prometheus text `metrics`: whether it passed, and its
/// stdout + stderr.
pub fn promtool_check_metrics(metrics: &str) -> (bool, String) {
    let mut child = tools::command("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn promtool");
    child
        .stdin
        .take()
        .expect("promtool stdin")
        .write_all(metrics.as_bytes())
        .expect("feed promtool");
    let out = child.wait_with_output().expect("promtool output");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), report)
}
