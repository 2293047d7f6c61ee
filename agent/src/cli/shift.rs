//! `vmesh shift SERVICE [vm=N k8s=N]`: shows an outbound service's traffic shift between
//! environments, or writes the central policy with compare-and-set against the index just read.

use std::process::ExitCode;

use super::{exit, AdminArgs, AdminClient};

/// `vmesh shift SERVICE [vm=N k8s=N]`: shows the shift, or writes it with compare-and-set
/// against the index just read.
pub async fn run(args: &AdminArgs, service: &str, values: &[String]) -> ExitCode {
    let admin = match AdminClient::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::FAILED);
        }
    };
    let path = format!("/shift/{service}");
    let answer = if values.is_empty() {
        admin.get(&path).await
    } else {
        let policy = match crate::discovery::shift::Policy::from_args(values) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(exit::FAILED);
            }
        };
        let index = match admin.get(&path).await {
            Ok(a) if a.status == 200 => a.json()["shift"]["index"].as_u64().unwrap_or(0),
            Ok(a) => {
                eprintln!("error: {}", a.message());
                return ExitCode::from(exit::FAILED);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(exit::ADMIN_UNREACHABLE);
            }
        };
        admin.put_json(&format!("{path}?cas={index}"), policy.to_json()).await
    };
    match answer {
        Ok(a) if a.status == 200 => {
            if args.json {
                print!("{}", a.body);
            } else {
                print!("{}", shift_summary(&a.json()));
            }
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!("error: {}", a.message());
            ExitCode::from(if a.status == 409 && a.json()["error"] == "SHIFT_CONFLICT" {
                exit::CONFLICT
            } else {
                exit::FAILED
            })
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ADMIN_UNREACHABLE)
        }
    }
}

fn shift_summary(v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let sh = &v["shift"];
    let policy = match sh["policy"].as_object() {
        Some(p) => format!("vm={} k8s={}", p["vm"], p["k8s"]),
        None => "none (one pool for every environment)".to_owned(),
    };
    let _ = writeln!(
        out,
        "{}: {policy} (source {}, index {})",
        v["service"].as_str().unwrap_or("-"),
        sh["source"].as_str().unwrap_or("-"),
        sh["index"]
    );
    for s in sh["split"].as_array().into_iter().flatten() {
        let _ = writeln!(
            out,
            "  {:<5} {:>3}%  {} endpoint(s)",
            s["env"].as_str().unwrap_or("-"),
            s["percent"],
            s["endpoints"]
        );
    }
    if let Some(obs) = v["observed"].as_object() {
        let total: u64 = obs.values().filter_map(serde_json::Value::as_u64).sum();
        for (env, n) in obs {
            let n = n.as_u64().unwrap_or(0);
            let pct = (n * 100).checked_div(total).unwrap_or(0);
            let _ = writeln!(out, "  observed {env}: {n} request(s) ({pct}%)");
        }
    }
    if let Some(e) = sh["error"].as_str() {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}
