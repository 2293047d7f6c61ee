//! `vmesh drain` and `vmesh undrain` progress with the real binary, an instance registered in
//! the Consul double and slow requests in flight through its inbound port: `--json` prints one
//! object per change with the in-flight count falling and the outcome last; without a terminal,
//! timestamped lines only when something changes; on a terminal (`script` gives it one), one
//! line rewritten in place; `undrain --wait-ramp` follows the slow start to the full weight.
//! Exit codes stay those of docs/cli.md.

use std::process::Command;
use std::thread::JoinHandle;

use serde_json::Value;
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{self, CliRun, Identity};
use vmesh_tests::tools::require;
use vmesh_tests::{eventually, Agent, Curl, CurlResponse, RunningUpstream, Upstream, DEFAULT_WAIT};

/// A registered, passing instance of `orders` with a slow start of `ramp`, with its registry,
/// identity file and app; fields drop in order, the agent first.
struct Instance {
    agent: Agent,
    _app: RunningUpstream,
    _dir: tempfile::TempDir,
    _consul: ConsulDouble,
}

impl Instance {
    fn start(ramp: &str) -> Instance {
        let consul = ConsulDouble::spawn();
        let dir = tempfile::tempdir().expect("tempdir");
        let app = Upstream::python("app").spawn();
        let identity = Identity::orders().write_in(dir.path());
        let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), ramp), &consul).start();
        lifecycle::wait_passing(&consul, "orders", &["orders-web-01"], DEFAULT_WAIT);
        Instance {
            agent,
            _app: app,
            _dir: dir,
            _consul: consul,
        }
    }
}

/// Slow requests through the inbound port, one per duration, all in flight when this returns.
fn in_flight(agent: &Agent, ms: &[u64]) -> Vec<JoinHandle<CurlResponse>> {
    let requests: Vec<_> = ms
        .iter()
        .map(|ms| {
            let url = agent.inbound_url(&format!("/slow?ms={ms}"));
            std::thread::spawn(move || Curl::get(url).run())
        })
        .collect();
    let want = ms.len() as u64;
    eventually(DEFAULT_WAIT, "the slow requests to be in flight", || {
        match agent.lifecycle()["in_flight"].as_u64() {
            Some(n) if n == want => Ok(()),
            other => Err(format!("in_flight {other:?}")),
        }
    });
    requests
}

fn cli(agent: &Agent, args: &[&str]) -> CliRun {
    agent.run_cli(args).into()
}

fn json_lines(run: &CliRun) -> Vec<Value> {
    run.stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not a JSON line ({e}): {l:?}\n{run}")))
        .collect()
}

/// `2026-11-29T19:30:01.234Z` (RFC 3339, UTC, milliseconds).
fn is_timestamp(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 24
        && b.iter().enumerate().all(|(i, c)| match i {
            4 | 7 => *c == b'-',
            10 => *c == b'T',
            13 | 16 => *c == b':',
            19 => *c == b'.',
            23 => *c == b'Z',
            _ => c.is_ascii_digit(),
        })
}

#[test]
fn drain_json_shows_in_flight_falling_and_the_outcome_and_undrain_the_slow_start() {
    let instance = Instance::start("20s");
    let agent = &instance.agent;
    let requests = in_flight(agent, &[2000, 4000, 6000]);

    // Too short: exit 1, the outcome says why.
    let short = cli(agent, &["drain", "--json", "--timeout", "500ms"]);
    assert_eq!(short.code, 1, "{short}");
    assert!(short.stderr.contains("error: DRAIN_TIMEOUT"), "{short}");
    let last = json_lines(&short).pop().expect("an outcome line");
    assert_eq!(last["outcome"], "timeout", "{short}");
    assert_eq!(last["exit"], 1, "{short}");
    assert_eq!(last["code"], "DRAIN_TIMEOUT", "{short}");

    // Long enough: the count falls as the requests finish, 2 s apart.
    let run = cli(agent, &["drain", "--json", "--timeout", "30s"]);
    assert_eq!(run.code, 0, "{run}");
    let lines = json_lines(&run);
    assert!(
        lines.iter().all(|l| l["command"] == "drain" && l["time"].is_string()),
        "{run}"
    );
    let counts: Vec<u64> = lines.iter().map(|l| l["in_flight"].as_u64().unwrap_or(99)).collect();
    assert!(counts[0] >= 2, "in flight at the start: {counts:?}\n{run}");
    assert!(
        counts.windows(2).all(|w| w[0] >= w[1]),
        "never rising: {counts:?}\n{run}"
    );
    let mut distinct = counts.clone();
    distinct.dedup();
    assert!(distinct.len() >= 3, "falling step by step: {counts:?}\n{run}");
    let (progress, outcome) = lines.split_at(lines.len() - 1);
    assert!(progress.iter().all(|l| l.get("outcome").is_none()), "{run}");
    assert_eq!(outcome[0]["outcome"], "drained", "{run}");
    assert_eq!(outcome[0]["exit"], 0, "{run}");
    assert_eq!(outcome[0]["in_flight"], 0, "{run}");
    for r in requests {
        r.join().expect("slow request").expect_status(200);
    }

    // Undrain: the slow start begins; the outcome carries its percent.
    let run = cli(agent, &["undrain", "--json", "--timeout", "30s"]);
    assert_eq!(run.code, 0, "{run}");
    let lines = json_lines(&run);
    let last = lines.last().expect("an outcome line");
    assert_eq!(last["command"], "undrain", "{run}");
    assert_eq!(last["outcome"], "undrained", "{run}");
    assert_eq!(last["exit"], 0, "{run}");
    assert_eq!(last["phase"], "serving", "{run}");
    assert_eq!(last["registered"], true, "{run}");
    let percent = last["ramp_percent"].as_u64().expect("ramp_percent");
    assert!(percent < 100, "a 20 s slow start has just begun: {run}");
}

#[test]
fn drain_prints_timestamped_lines_without_a_terminal_and_one_line_on_a_terminal() {
    let script = require("script");
    let instance = Instance::start("20s");
    let agent = &instance.agent;

    // Not a terminal (a pipe): a timestamped line per change.
    let requests = in_flight(agent, &[1500, 3000]);
    let run = cli(agent, &["drain", "--timeout", "30s"]);
    assert_eq!(run.code, 0, "{run}");
    let lines: Vec<(&str, &str)> = run
        .stdout
        .lines()
        .map(|l| l.split_once(' ').unwrap_or_else(|| panic!("{l:?}\n{run}")))
        .collect();
    assert!(lines.iter().all(|(t, _)| is_timestamp(t)), "{run}");
    let texts: Vec<&str> = lines.iter().map(|(_, text)| *text).collect();
    assert!(texts.windows(2).all(|w| w[0] != w[1]), "only changes: {texts:?}");
    assert!(
        texts[0].starts_with("draining: ") && texts[0].ends_with(" request(s) in flight"),
        "{run}"
    );
    assert!(texts.contains(&"draining: 1 request(s) in flight"), "{run}");
    assert_eq!(texts.last(), Some(&"drained"), "{run}");
    assert!(!run.stdout.contains('\r'), "{run}");
    for r in requests {
        r.join().expect("slow request").expect_status(200);
    }
    assert_eq!(cli(agent, &["undrain", "--timeout", "30s"]).code, 0);

    // On a terminal: one line rewritten in place, then the outcome on its own line.
    let requests = in_flight(agent, &[1500]);
    let command = format!(
        "{} drain --config {} --timeout 30s",
        vmesh_tests::vmesh_bin().display(),
        agent.config_path().display()
    );
    let run: CliRun = Command::new(script)
        .args(["-qec", &command, "/dev/null"])
        .output()
        .expect("run script")
        .into();
    assert_eq!(run.code, 0, "{run}");
    assert!(
        run.stdout.contains("\r\x1b[2Kdraining: 1 request(s) in flight ("),
        "{run}"
    );
    assert!(run.stdout.trim_end().ends_with("drained"), "{run}");
    let updates = run.stdout.matches("\r\x1b[2K").count();
    let newlines = run.stdout.matches('\n').count();
    assert!(
        updates > newlines,
        "rewritten in place ({updates} updates, {newlines} lines): {run}"
    );
    for r in requests {
        r.join().expect("slow request").expect_status(200);
    }
}

#[test]
fn undrain_wait_ramp_shows_the_slow_start_climbing_to_the_full_weight() {
    let instance = Instance::start("4s");
    let agent = &instance.agent;
    assert_eq!(cli(agent, &["drain", "--timeout", "30s"]).code, 0);

    let run = cli(agent, &["undrain", "--json", "--wait-ramp", "--timeout", "30s"]);
    assert_eq!(run.code, 0, "{run}");
    let lines = json_lines(&run);
    let percents: Vec<u64> = lines.iter().filter_map(|l| l["ramp_percent"].as_u64()).collect();
    assert!(
        percents.windows(2).all(|w| w[0] <= w[1]),
        "climbing: {percents:?}\n{run}"
    );
    let mut distinct = percents.clone();
    distinct.dedup();
    assert!(distinct.len() >= 3, "step by step: {percents:?}\n{run}");
    let last = lines.last().expect("an outcome line");
    assert_eq!(last["outcome"], "ramped", "{run}");
    assert_eq!(last["ramp_percent"], 100, "{run}");
    assert_eq!(last["effective_weight"], 100, "{run}");
    assert_eq!(last["exit"], 0, "{run}");
}
