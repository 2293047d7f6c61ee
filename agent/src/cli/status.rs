//! `vmesh status` and `vmesh clusters`: `GET /status` and `GET /clusters`, as a few lines for
//! people or (`--json`) the admin API's answer as it is.

use std::process::ExitCode;

use super::{exit, AdminArgs, AdminClient};

/// Runs `vmesh status` (`path = "/status"`) or `vmesh clusters` (`"/clusters"`).
pub async fn run(args: &AdminArgs, path: &str) -> ExitCode {
    let answer = match AdminClient::from_args(args) {
        Ok(c) => c.get(path).await,
        Err(e) => Err(e),
    };
    match answer {
        Ok(a) if a.status == 200 => {
            match serde_json::from_str::<serde_json::Value>(&a.body) {
                Ok(v) if !args.json => print!("{}", summary(path, &v)),
                _ => print!("{}", a.body),
            }
            ExitCode::SUCCESS
        }
        Ok(a) => {
            eprintln!("error: admin API answered {}: {}", a.status, a.body);
            ExitCode::from(exit::FAILED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ADMIN_UNREACHABLE)
        }
    }
}

/// A few lines for people; `--json` prints the admin API's answer as it is.
pub fn summary(path: &str, v: &serde_json::Value) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let s = |v: &serde_json::Value| match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => "-".to_owned(),
        other => other.to_string(),
    };
    if path == "/clusters" {
        for c in v["clusters"].as_array().into_iter().flatten() {
            let _ = writeln!(
                out,
                "{} {} ({}, {})",
                s(&c["direction"]),
                s(&c["service"]),
                s(&c["protocol"]),
                s(&c["balancer"])
            );
            if let Some(p) = c["shift"]["policy"].as_object() {
                let _ = writeln!(
                    out,
                    "  shift vm={} k8s={} ({})",
                    p["vm"],
                    p["k8s"],
                    s(&c["shift"]["source"])
                );
            }
            if c["discovery"]["stale"] == true {
                let _ = writeln!(out, "  discovery STALE: {}", s(&c["discovery"]["error"]));
            }
            for e in c["endpoints"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  {:<22} weight {:>3}  in-flight {:>4}  ewma {:>8} ms  {}  env {} zone {} version {} colour {} from {}",
                    s(&e["address"]),
                    s(&e["weight"]),
                    s(&e["in_flight"]),
                    s(&e["ewma_ms"]),
                    if e["healthy"] == true { "healthy" } else { "ejected" },
                    s(&e["env"]),
                    s(&e["zone"]),
                    s(&e["version"]),
                    s(&e["colour"]),
                    s(&e["source"])
                );
            }
        }
        return out;
    }
    let l = &v["lifecycle"];
    let _ = writeln!(
        out,
        "node:        {} (vmesh {}, up {} s)",
        s(&v["node"]),
        s(&v["version"]),
        s(&v["uptime_seconds"])
    );
    let _ = writeln!(out, "ready:       {} {}", s(&v["ready"]), s(&v["not_ready_reason"]));
    let _ = writeln!(
        out,
        "identity:    {} / {} (from {})",
        s(&l["identity"]["service"]),
        s(&l["identity"]["environment"]),
        s(&l["identity_source"])
    );
    let _ = writeln!(
        out,
        "registry:    {} registered={} id={}",
        s(&l["registry"]),
        s(&l["registered"]),
        s(&l["registration_id"])
    );
    let _ = writeln!(
        out,
        "weight:      advertised {} effective {}",
        s(&l["weight"]),
        s(&l["effective_weight"])
    );
    let _ = writeln!(out, "drain:       {} in-flight {}", s(&l["drain"]), s(&l["in_flight"]));
    let _ = writeln!(
        out,
        "app healthy: {} {}",
        s(&l["app"]["healthy"]),
        s(&l["app"]["last_error"])
    );
    for key in ["identity_error", "registry_error"] {
        if !l[key].is_null() {
            let _ = writeln!(out, "{key}: {}", s(&l[key]));
        }
    }
    out
}
