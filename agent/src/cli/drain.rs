//! `vmesh drain` and `vmesh undrain`: the call to the admin API, then progress until the outcome.
//! On a terminal one line updates in place; otherwise a timestamped line is printed when the
//! state changes; with `--json` one JSON object per change, the last one with the outcome. Exit
//! codes and error messages are the contract of docs/cli.md (CD hooks read only the code).

use std::io::{IsTerminal, Write};
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{json, Map, Value};

use super::{exit, AdminArgs, AdminClient};

/// How often `/status` is read while waiting.
const POLL: Duration = Duration::from_millis(200);

/// How progress is shown.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// One line rewritten in place (stdout is a terminal).
    Terminal,
    /// A line with a timestamp for each change (a pipe, a log, a CI job).
    Plain,
    /// One JSON object per change (`--json`).
    Json,
}

/// The progress of one command on `out`.
pub struct Progress<W: Write> {
    style: Style,
    out: W,
    command: &'static str,
    started: Instant,
    /// The state last shown (for `Plain` and `Json`: only changes are printed).
    last: Option<Value>,
    /// A terminal line is open (not ended by a newline).
    open: bool,
}

// === impl Style ===

impl Style {
    /// `Json` with `--json`, else `Terminal` when stdout is one, else `Plain`.
    pub fn detect(json: bool) -> Style {
        if json {
            Style::Json
        } else if std::io::stdout().is_terminal() {
            Style::Terminal
        } else {
            Style::Plain
        }
    }
}

// === impl Progress ===

impl Progress<std::io::Stdout> {
    fn stdout(command: &'static str, json: bool) -> Self {
        Progress::new(command, Style::detect(json), std::io::stdout())
    }
}

impl<W: Write> Progress<W> {
    pub fn new(command: &'static str, style: Style, out: W) -> Self {
        Progress {
            style,
            out,
            command,
            started: Instant::now(),
            last: None,
            open: false,
        }
    }

    /// Shows `state` (an object of JSON fields) as `text`: a terminal's line is rewritten on
    /// every call (its elapsed time moves); a plain or JSON line is printed only when `state`
    /// differs from the last one shown.
    pub fn update(&mut self, state: Value, text: &str) {
        match self.style {
            Style::Terminal => {
                let elapsed = self.started.elapsed().as_secs_f64();
                let _ = write!(self.out, "\r\x1b[2K{text} ({elapsed:.1} s)");
                self.open = true;
            }
            Style::Plain if self.last.as_ref() != Some(&state) => {
                let _ = writeln!(self.out, "{} {text}", timestamp());
            }
            Style::Json if self.last.as_ref() != Some(&state) => {
                let _ = writeln!(self.out, "{}", self.object(&state));
            }
            Style::Plain | Style::Json => {}
        }
        let _ = self.out.flush();
        self.last = Some(state);
    }

    /// The command succeeded: `text` on stdout (the JSON outcome with `--json`).
    pub fn done(&mut self, outcome: &str, text: &str, fields: Value) -> ExitCode {
        self.end(outcome, 0, Some(text), fields);
        ExitCode::SUCCESS
    }

    /// The command failed: `error` on stderr (as without progress), then the JSON outcome with
    /// `--json`.
    pub fn fail(&mut self, outcome: &str, code: u8, error: &str, fields: Value) -> ExitCode {
        self.close_line();
        eprintln!("error: {error}");
        self.end(outcome, code, None, fields);
        ExitCode::from(code)
    }

    fn end(&mut self, outcome: &str, code: u8, text: Option<&str>, fields: Value) {
        self.close_line();
        match (self.style, text) {
            (Style::Terminal, Some(t)) => {
                let _ = writeln!(self.out, "{t}");
            }
            (Style::Plain, Some(t)) => {
                let _ = writeln!(self.out, "{} {t}", timestamp());
            }
            (Style::Json, _) => {
                let mut state = fields;
                if let Some(m) = state.as_object_mut() {
                    m.insert("outcome".into(), outcome.into());
                    m.insert("exit".into(), code.into());
                }
                let _ = writeln!(self.out, "{}", self.object(&state));
            }
            (_, None) => {}
        }
        let _ = self.out.flush();
    }

    fn close_line(&mut self) {
        if self.open {
            let _ = writeln!(self.out);
            let _ = self.out.flush();
            self.open = false;
        }
    }

    /// `{"time", "command", "elapsed_ms", ...state}`.
    fn object(&self, state: &Value) -> Value {
        let mut m = Map::new();
        m.insert("time".into(), timestamp().into());
        m.insert("command".into(), self.command.into());
        m.insert(
            "elapsed_ms".into(),
            u64::try_from(self.started.elapsed().as_millis())
                .unwrap_or(u64::MAX)
                .into(),
        );
        if let Some(s) = state.as_object() {
            m.extend(s.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        Value::Object(m)
    }
}

fn timestamp() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

/// `/status`, or `None` when the admin API does not answer with a JSON document.
async fn status(admin: &AdminClient) -> Option<Value> {
    let a = admin.get("/status").await.ok()?;
    (a.status == 200).then(|| serde_json::from_str(&a.body).ok()).flatten()
}

// === drain ===

/// `vmesh drain`: `POST /drain`, then `/status` every 200 ms until drained or `timeout`.
pub async fn drain(args: &AdminArgs, timeout: Duration) -> ExitCode {
    let mut p = Progress::stdout("drain", args.json);
    let admin = match AdminClient::from_args(args) {
        Ok(c) => c,
        Err(e) => return p.fail("failed", exit::FAILED, &format!("{e:#}"), json!({})),
    };
    match admin.post("/drain", Duration::from_secs(30)).await {
        Ok(a) if matches!(a.status, 200 | 202) => {}
        Ok(a) => {
            let error = format!("drain refused: {}: {}", a.status, a.body.trim());
            return p.fail(
                "refused",
                exit::FAILED,
                &error,
                json!({ "status": a.status, "code": a.code }),
            );
        }
        Err(e) => return p.fail("unreachable", exit::ADMIN_UNREACHABLE, &format!("{e:#}"), json!({})),
    }
    let deadline = Instant::now() + timeout;
    loop {
        let Some(s) = status(&admin).await else {
            let error = "ADMIN_UNREACHABLE: lost the admin API while draining";
            return p.fail("unreachable", exit::ADMIN_UNREACHABLE, error, json!({}));
        };
        let phase = s["lifecycle"]["drain"].as_str().unwrap_or("").to_owned();
        let in_flight = s["lifecycle"]["in_flight"].as_u64().unwrap_or(0);
        let state = json!({ "phase": phase, "in_flight": in_flight });
        p.update(state.clone(), &format!("draining: {in_flight} request(s) in flight"));
        if phase == "drained" {
            return p.done("drained", "drained", state);
        }
        if Instant::now() >= deadline {
            let error = format!(
                "DRAIN_TIMEOUT: {in_flight} request(s) still in flight after {timeout:?} (the instance stays marked down)"
            );
            let mut fields = state;
            fields["code"] = "DRAIN_TIMEOUT".into();
            return p.fail("timeout", exit::TIMEOUT, &error, fields);
        }
        tokio::time::sleep(POLL).await;
    }
}

// === undrain ===

/// What `vmesh undrain` shows of `/status`: the drain phase, the app's health, and once
/// registered the slow start (effective weight, percent of the target weight).
fn undrain_state(s: &Value) -> (Value, String) {
    let l = &s["lifecycle"];
    let phase = l["drain"].as_str().unwrap_or("");
    let healthy = l["app"]["healthy"].as_bool();
    let error = l["app"]["last_error"].as_str();
    let effective = l["effective_weight"].as_u64().unwrap_or(0);
    let target = l["identity"]["weight"].as_u64().filter(|w| *w > 0).unwrap_or(100);
    let percent = (effective * 100 / target).min(100);
    let registered = l["registered"].as_bool().unwrap_or(false);
    if phase == "serving" {
        let text = format!("slow start: effective weight {effective} of {target} ({percent}%)");
        let state = json!({
            "phase": phase,
            "registered": registered,
            "effective_weight": effective,
            "ramp_percent": percent,
        });
        return (state, text);
    }
    let health = match (healthy, error) {
        (Some(true), _) => "passing".to_owned(),
        (Some(false), Some(e)) => format!("failing: {e}"),
        (Some(false), None) => "failing".to_owned(),
        (None, _) => "no check yet".to_owned(),
    };
    let text = format!("undraining ({phase}): app health check {health}");
    let state = json!({ "phase": phase, "healthy": healthy, "health_error": error, "registered": registered });
    (state, text)
}

/// `vmesh undrain`: `POST /undrain?timeout=` (answered once the app passed a health check and the
/// instance was registered), showing `/status` every 200 ms while it waits; with `wait_ramp`,
/// then the slow start until the full weight (`follow_ramp`).
pub async fn undrain(args: &AdminArgs, timeout: Duration, wait_ramp: bool) -> ExitCode {
    let mut p = Progress::stdout("undrain", args.json);
    let admin = match AdminClient::from_args(args) {
        Ok(c) => c,
        Err(e) => return p.fail("failed", exit::FAILED, &format!("{e:#}"), json!({})),
    };
    let path = format!("/undrain?timeout={}s", timeout.as_secs().max(1));
    let mut post = std::pin::pin!(admin.post(&path, timeout + Duration::from_secs(10)));
    let answer = loop {
        tokio::select! {
            a = &mut post => break a,
            () = tokio::time::sleep(POLL) => {
                // The POST goes on meanwhile: the connection is driven by its own task.
                if let Some(s) = status(&admin).await {
                    let (state, text) = undrain_state(&s);
                    p.update(state, &text);
                }
            }
        }
    };
    match answer {
        Ok(a) if a.status == 200 => {
            let fields = match status(&admin).await {
                Some(s) => {
                    let (state, text) = undrain_state(&s);
                    p.update(state.clone(), &text);
                    state
                }
                None => json!({}),
            };
            if wait_ramp {
                return follow_ramp(&mut p, &admin, fields).await;
            }
            p.done("undrained", "undrained: registered, slow start begins", fields)
        }
        Ok(a) if a.code.as_deref() == Some("APP_UNHEALTHY") => {
            let fields = json!({ "code": "APP_UNHEALTHY" });
            p.fail("unhealthy", exit::TIMEOUT, a.body.trim(), fields)
        }
        Ok(a) => {
            let (status, body) = (a.status, a.body.trim());
            let error = format!("undrain failed: {status}: {body}");
            let code = a.code.as_deref().unwrap_or("");
            p.fail(
                "failed",
                exit::FAILED,
                &error,
                json!({ "status": status, "code": code }),
            )
        }
        Err(e) => p.fail("unreachable", exit::ADMIN_UNREACHABLE, &format!("{e:#}"), json!({})),
    }
}

/// `vmesh undrain --wait-ramp`: `/status` every 200 ms until the effective weight reaches the
/// identity's weight (exit 0), for at most the ramp window + 10 s (exit 1, `RAMP_TIMEOUT`: the
/// instance is in traffic all the same).
async fn follow_ramp<W: Write>(p: &mut Progress<W>, admin: &AdminClient, mut fields: Value) -> ExitCode {
    let mut deadline = None;
    loop {
        let Some(s) = status(admin).await else {
            let error = "ADMIN_UNREACHABLE: lost the admin API during the slow start";
            return p.fail("unreachable", exit::ADMIN_UNREACHABLE, error, fields);
        };
        let window = s["lifecycle"]["ramp"]["window_secs"].as_u64().unwrap_or(0);
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + Duration::from_secs(window.min(86_400) + 10));
        let (state, text) = undrain_state(&s);
        p.update(state.clone(), &text);
        fields = state;
        if fields["ramp_percent"].as_u64() == Some(100) {
            return p.done("ramped", "undrained: registered, slow start done (full weight)", fields);
        }
        if Instant::now() >= deadline {
            let error = format!("RAMP_TIMEOUT: {text} after the {window} s ramp window (the instance is in traffic)");
            fields["code"] = "RAMP_TIMEOUT".into();
            return p.fail("timeout", exit::TIMEOUT, &error, fields);
        }
        tokio::time::sleep(POLL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(p: &Progress<Vec<u8>>) -> Vec<String> {
        String::from_utf8_lossy(&p.out).lines().map(str::to_owned).collect()
    }

    #[test]
    fn plain_lines_are_timestamped_and_printed_only_on_change() {
        let mut p = Progress::new("drain", Style::Plain, Vec::new());
        for n in [3, 3, 2, 2, 0] {
            p.update(json!({"in_flight": n}), &format!("draining: {n} request(s) in flight"));
        }
        let _ = p.done("drained", "drained", json!({"in_flight": 0}));
        let l = lines(&p);
        assert_eq!(l.len(), 4, "{l:?}");
        assert!(l[0].ends_with(" draining: 3 request(s) in flight"), "{l:?}");
        assert!(l[2].ends_with(" draining: 0 request(s) in flight"), "{l:?}");
        assert!(l[3].ends_with(" drained"), "{l:?}");
        // An RFC 3339 timestamp first.
        assert!(
            humantime::parse_rfc3339(l[0].split(' ').next().unwrap()).is_ok(),
            "{l:?}"
        );
    }

    #[test]
    fn json_lines_carry_each_change_and_the_outcome_last() {
        let mut p = Progress::new("drain", Style::Json, Vec::new());
        for n in [2, 2, 1, 0] {
            p.update(json!({"phase": "draining", "in_flight": n}), "ignored");
        }
        let _ = p.fail("timeout", 1, "DRAIN_TIMEOUT: test", json!({"in_flight": 0}));
        let v: Vec<Value> = lines(&p).iter().map(|l| serde_json::from_str(l).unwrap()).collect();
        let in_flight: Vec<u64> = v.iter().map(|o| o["in_flight"].as_u64().unwrap()).collect();
        assert_eq!(in_flight, [2, 1, 0, 0]);
        assert!(v.iter().all(|o| o["command"] == "drain" && o["time"].is_string()));
        assert_eq!(v[3]["outcome"], "timeout");
        assert_eq!(v[3]["exit"], 1);
        assert!(v[..3].iter().all(|o| o.get("outcome").is_none()));
    }

    #[test]
    fn a_terminal_line_is_rewritten_in_place_and_ended_once() {
        let mut p = Progress::new("drain", Style::Terminal, Vec::new());
        p.update(json!({"in_flight": 1}), "draining: 1 request(s) in flight");
        p.update(json!({"in_flight": 1}), "draining: 1 request(s) in flight");
        let _ = p.done("drained", "drained", json!({}));
        let out = String::from_utf8_lossy(&p.out).into_owned();
        assert_eq!(out.matches("\r\x1b[2K").count(), 2, "{out:?}");
        assert_eq!(out.matches('\n').count(), 2, "{out:?}");
        assert!(out.ends_with("\ndrained\n"), "{out:?}");
    }

    #[test]
    fn undrain_shows_health_then_the_slow_start() {
        let waiting = json!({"lifecycle": {"drain": "drained", "registered": false,
            "app": {"healthy": false, "last_error": "connection refused"}}});
        let (state, text) = undrain_state(&waiting);
        assert_eq!(
            text,
            "undraining (drained): app health check failing: connection refused"
        );
        assert_eq!(state["healthy"], false);
        let ramping = json!({"lifecycle": {"drain": "serving", "registered": true, "effective_weight": 20,
            "identity": {"weight": 40}, "app": {"healthy": true}}});
        let (state, text) = undrain_state(&ramping);
        assert_eq!(text, "slow start: effective weight 20 of 40 (50%)");
        assert_eq!(state["ramp_percent"], 50);
    }
}
