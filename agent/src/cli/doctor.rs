//! `vmesh doctor`: "is it the sidecar?" on one screen: the last minute's proxy overhead and
//! upstream time, host CPU pressure, and the agent's verdict (`GET /doctor`). Exit 0 whatever
//! the verdict, 2 when the admin API answers with an error, 3 when it cannot be reached.

use std::fmt::Write as _;
use std::process::ExitCode;

use serde_json::Value;

use super::{exit, AdminArgs, AdminClient};

/// Runs `vmesh doctor [--json]`.
pub async fn run(args: &AdminArgs) -> ExitCode {
    let admin = match AdminClient::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: ADMIN_UNREACHABLE: {e:#}");
            return ExitCode::from(exit::ADMIN_UNREACHABLE);
        }
    };
    match admin.get("/doctor").await {
        Ok(a) if a.status == 200 => {
            match serde_json::from_str::<Value>(&a.body) {
                Ok(v) if !args.json => print!("{}", summary(&v)),
                _ => print!("{}", a.body),
            }
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!(
                "error: admin API answered {} to GET /doctor: {}",
                a.status,
                a.body.trim()
            );
            ExitCode::from(exit::FAILED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ADMIN_UNREACHABLE)
        }
    }
}

/// The one-screen text of a `/doctor` answer.
pub fn summary(v: &Value) -> String {
    let mut out = String::new();
    let ms = |v: &Value| v.as_f64().map_or_else(|| "-".to_owned(), |m| format!("{m:.3} ms"));
    let num = |v: &Value| v.as_f64().map_or_else(|| "-".to_owned(), |r| format!("{r:.2}"));
    let _ = writeln!(
        out,
        "vmesh doctor: the last {} s, {} request(s)",
        v["window_seconds"], v["overhead"]["minute"]["requests"]
    );
    for (name, key) in [("sidecar overhead", "overhead"), ("upstream time", "upstream")] {
        let t = &v[key];
        let _ = writeln!(
            out,
            "  {name:<17} p50 {:>12}  p99 {:>12}   last 10 s: p50 {:>12}  p99 {:>12}",
            ms(&t["minute"]["p50_ms"]),
            ms(&t["minute"]["p99_ms"]),
            ms(&t["last_10s"]["p50_ms"]),
            ms(&t["last_10s"]["p99_ms"]),
        );
    }
    let _ = writeln!(out, "  upstream baseline p50 {}", ms(&v["upstream"]["baseline_p50_ms"]));
    let h = &v["host"];
    let _ = writeln!(
        out,
        "  CPU pressure      mean {}  max {}  (last 10 s {}, cgroup {})",
        num(&h["cpu_pressure"]["mean"]),
        num(&h["cpu_pressure"]["max"]),
        num(&h["cpu_pressure_last_10s"]["mean"]),
        num(&h["cgroup_cpu_pressure"]["mean"]),
    );
    let _ = writeln!(
        out,
        "  CPU steal         mean {}  max {}",
        num(&h["cpu_steal"]["mean"]),
        num(&h["cpu_steal"]["max"]),
    );
    let _ = writeln!(
        out,
        "  run queue         mean {}  max {}  on {} CPU(s)",
        num(&h["run_queue"]["mean"]),
        num(&h["run_queue"]["max"]),
        h["cpus"],
    );
    let _ = writeln!(
        out,
        "  CPU busy          mean {}   vmesh's own CPU mean {}  max {}",
        num(&h["cpu_busy"]["mean"]),
        num(&h["agent_cpu"]["mean"]),
        num(&h["agent_cpu"]["max"]),
    );
    let _ = writeln!(
        out,
        "verdict: {}: {}",
        v["verdict"].as_str().unwrap_or("-"),
        v["reason"].as_str().unwrap_or("")
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_names_the_verdict_and_its_numbers() {
        let v = serde_json::json!({
            "window_seconds": 60,
            "verdict": "host",
            "reason": "CPU pressure 0.87 (PSI some avg10) while vmesh used 0.01 of the CPUs (1% of the busy time)",
            "overhead": {"minute": {"requests": 600, "p50_ms": 0.075, "p99_ms": 2.4}, "last_10s": {"requests": 100, "p50_ms": 0.08, "p99_ms": 3.0}},
            "upstream": {"minute": {"requests": 600, "p50_ms": 0.75, "p99_ms": 4.0}, "last_10s": {"requests": 100, "p50_ms": 0.9, "p99_ms": 4.5}, "baseline_p50_ms": 0.7},
            "host": {"cpus": 2, "cpu_pressure": {"mean": 0.87, "max": 1.0}, "cpu_pressure_last_10s": {"mean": 0.99, "max": 1.0},
                     "cgroup_cpu_pressure": {"mean": null, "max": null}, "cpu_steal": {"mean": 0.0, "max": 0.0},
                     "run_queue": {"mean": 6.5, "max": 8.0}, "cpu_busy": {"mean": 1.0, "max": 1.0}, "agent_cpu": {"mean": 0.01, "max": 0.02}},
        });
        let text = summary(&v);
        assert!(
            text.starts_with("vmesh doctor: the last 60 s, 600 request(s)\n"),
            "{text}"
        );
        assert!(
            text.contains("sidecar overhead  p50     0.075 ms  p99     2.400 ms"),
            "{text}"
        );
        assert!(
            text.contains("CPU pressure      mean 0.87  max 1.00  (last 10 s 0.99, cgroup -)"),
            "{text}"
        );
        assert!(
            text.contains("run queue         mean 6.50  max 8.00  on 2 CPU(s)"),
            "{text}"
        );
        assert!(text.ends_with("verdict: host: CPU pressure 0.87 (PSI some avg10) while vmesh used 0.01 of the CPUs (1% of the busy time)\n"), "{text}");
        assert!(text.lines().count() <= 12, "one screen: {text}");
    }
}
