//! `vmesh tap`: follows the agent's `GET /tap` stream and prints one line per request (the
//! JSON lines as they come with `--json`). Lines the agent dropped for a slow reader are
//! reported on stderr.

use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Empty};
use serde_json::Value;

use super::{exit, AdminArgs, AdminClient};
use crate::telemetry::tap::StatusFilter;

/// `vmesh tap` options.
#[derive(Debug, clap::Args)]
pub struct TapArgs {
    #[command(flatten)]
    pub admin: AdminArgs,
    /// Only requests of this service (the inbound cluster's is `inbound`).
    #[arg(long)]
    pub service: Option<String>,
    /// Only requests whose path starts with this.
    #[arg(long)]
    pub path_prefix: Option<String>,
    /// Only these statuses: `2xx`, `4xx`, `5xx` or one status such as `503`.
    #[arg(long, value_parser = parse_status)]
    pub status: Option<String>,
    /// Stop after this many requests.
    #[arg(long)]
    pub limit: Option<u64>,
}

/// How long the agent may take to answer the request's head.
const HEAD_WAIT: Duration = Duration::from_secs(10);

fn parse_status(s: &str) -> Result<String, String> {
    StatusFilter::parse(s).map(|_| s.to_owned()).map_err(|e| e.to_string())
}

/// The query of `GET /tap` for these options.
fn query(args: &TapArgs) -> String {
    let mut q = Vec::new();
    for (k, v) in [
        ("service", args.service.as_deref()),
        ("path_prefix", args.path_prefix.as_deref()),
        ("status", args.status.as_deref()),
    ] {
        if let Some(v) = v {
            q.push(format!("{k}={}", encode(v)));
        }
    }
    if let Some(n) = args.limit {
        q.push(format!("limit={n}"));
    }
    q.join("&")
}

/// Percent-encodes a query value (unreserved characters and `/` stay).
fn encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// `vmesh tap`: exit 0 when the stream ends (`--limit` reached), 2 when refused (401 without the
/// token, 429 `TAP_LIMIT`, 400 `TAP_BAD_FILTER`), 3 when the admin API is unreachable or the
/// stream broke (the agent stopped).
pub async fn run(args: &TapArgs) -> ExitCode {
    let admin = match AdminClient::from_args(&args.admin) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let addr = admin.addr();
    // A streamed answer, read line by line: not the admin client's whole-body `get`.
    let mut req = http::Request::get(format!("/tap?{}", query(args)));
    if let Some(t) = admin.token() {
        req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let req = match req.body(Empty::<Bytes>::new()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let resp = match tokio::time::timeout(HEAD_WAIT, admin.request(req)).await {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => {
            eprintln!("error: ADMIN_UNREACHABLE: admin API at {addr}: {e}");
            return ExitCode::from(exit::ADMIN_UNREACHABLE);
        }
        Err(_) => {
            eprintln!("error: ADMIN_UNREACHABLE: admin API at {addr} did not answer in {HEAD_WAIT:?}");
            return ExitCode::from(exit::ADMIN_UNREACHABLE);
        }
    };
    let status = resp.status();
    let mut body = resp.into_body();
    if status != http::StatusCode::OK {
        let text = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let text = String::from_utf8_lossy(&text);
        let v: Value = serde_json::from_str(&text).unwrap_or_default();
        match (v["error"].as_str(), v["message"].as_str()) {
            (Some(code), Some(m)) => eprintln!("error: {code}: {m}"),
            _ => eprintln!("error: tap refused: {}: {}", status.as_u16(), text.trim()),
        }
        return ExitCode::from(exit::FAILED);
    }
    let mut out = std::io::stdout().lock();
    let mut pending = BytesMut::new();
    loop {
        let frame = match body.frame().await {
            Some(Ok(f)) => f,
            Some(Err(e)) => {
                eprintln!("error: ADMIN_UNREACHABLE: the tap stream broke: {e}");
                return ExitCode::from(exit::ADMIN_UNREACHABLE);
            }
            None => break,
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        pending.extend_from_slice(&data);
        while let Some(i) = pending.iter().position(|b| *b == b'\n') {
            let line = pending.split_to(i + 1);
            if show(&mut out, &line[..i], args.admin.json).is_err() {
                // stdout closed (`| head`): nothing more to do.
                return ExitCode::SUCCESS;
            }
        }
    }
    ExitCode::SUCCESS
}

/// Prints one line of the stream: a request (readable, or as it came with `json`), or the
/// report of dropped lines (on stderr). Blank keep-alive lines print nothing.
fn show(out: &mut impl Write, line: &[u8], json: bool) -> std::io::Result<()> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    let v: Value = serde_json::from_slice(line).unwrap_or_default();
    if let Some(n) = v["dropped"].as_u64() {
        eprintln!("vmesh tap: {n} lines dropped (this reader was slower than the traffic)");
        return Ok(());
    }
    if json {
        out.write_all(line)?;
        out.write_all(b"\n")?;
    } else {
        writeln!(out, "{}", readable(&v))?;
    }
    out.flush()
}

/// `19:30:01.234 outbound orders GET orders /api/x 200 1.52ms -> 127.0.0.1:8080 env=vm colour=blue error=CODE`.
fn readable(v: &Value) -> String {
    let s = |k: &str| v[k].as_str().unwrap_or("-");
    let time = s("time");
    let time = time.get(11..23).unwrap_or(time);
    let mut line = format!(
        "{time} {} {} {} {} {} {} {}ms",
        s("direction"),
        s("service"),
        s("method"),
        s("authority"),
        s("path"),
        v["status"],
        v["latency_ms"]
    );
    if let Some(u) = v["upstream"].as_str() {
        line.push_str(&format!(" -> {u}"));
    }
    for k in ["env", "colour", "error"] {
        if let Some(x) = v[k].as_str() {
            line.push_str(&format!(" {k}={x}"));
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_is_encoded() {
        let args = TapArgs {
            admin: AdminArgs {
                config: "/dev/null".into(),
                admin: None,
                json: false,
            },
            service: Some("orders".into()),
            path_prefix: Some("/api/a b&c".into()),
            status: Some("5xx".into()),
            limit: Some(50),
        };
        assert_eq!(
            query(&args),
            "service=orders&path_prefix=/api/a%20b%26c&status=5xx&limit=50"
        );
        let f = crate::telemetry::tap::Filter::from_query(&query(&args)).unwrap();
        assert_eq!(f.path_prefix.as_deref(), Some("/api/a b&c"));
    }

    #[test]
    fn lines_are_shown_readable_or_as_they_came() {
        let line = br#"{"time":"2026-11-29T19:30:01.234Z","direction":"outbound","service":"orders","method":"GET","authority":"orders","path":"/x","status":503,"latency_ms":1.5,"upstream":"127.0.0.1:8080","env":"vm","colour":null,"error":"CONNECT_FAILED"}"#;
        let mut out = Vec::new();
        show(&mut out, line, false).unwrap();
        show(&mut out, b"", false).unwrap();
        show(&mut out, br#"{"dropped":3,"message":"x"}"#, false).unwrap();
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "19:30:01.234 outbound orders GET orders /x 503 1.5ms -> 127.0.0.1:8080 env=vm error=CONNECT_FAILED\n"
        );
        let mut out = Vec::new();
        show(&mut out, line, true).unwrap();
        assert_eq!(out, [&line[..], b"\n"].concat());
    }
}
