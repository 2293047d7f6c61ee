//! The `vmesh` binary: parses the command line and runs the agent or a client command.

use std::process::ExitCode;

use clap::Parser;
use vmesh_agent::cli::{admin_get, AdminArgs, Cli, Command};
use vmesh_agent::config::{self, Config, Source};
use vmesh_agent::{demo, lifecycle, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(Source::file(config), false),
        Command::Demo => run(Source::embedded(demo::QUICKSTART), true),
        Command::CheckConfig { config } => check_config(Source::file(config)),
        Command::Status(args) => admin_command(&args, "/status"),
        Command::Clusters(args) => admin_command(&args, "/clusters"),
        Command::Drain { admin, timeout } => client_runtime(|| drain(&admin, timeout)),
        Command::Undrain { admin, timeout } => client_runtime(|| undrain(&admin, timeout)),
        Command::Identity { config, json } => client_runtime(|| identity(config, json)),
        Command::Shift { admin, service, values } => client_runtime(|| shift(&admin, &service, &values)),
    }
}

/// Exit codes of the client commands, for scripts and CD hooks.
mod exit {
    pub const TIMEOUT: u8 = 1;
    pub const FAILED: u8 = 2;
    pub const ADMIN_UNREACHABLE: u8 = 3;
    pub const CMDB_ERROR: u8 = 4;
    /// `vmesh shift`: the policy changed since it was read.
    pub const CONFLICT: u8 = 1;
}

fn client_runtime<F: std::future::Future<Output = ExitCode>>(f: impl FnOnce() -> F) -> ExitCode {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt.block_on(f()),
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// The admin address and token for a mutating client command.
fn admin_target(args: &AdminArgs) -> Result<(std::net::SocketAddr, Option<String>), ExitCode> {
    match args.admin_addr() {
        Ok(a) => Ok((a, vmesh_agent::cli::admin_token(&args.config))),
        Err(e) => {
            eprintln!("error: {e:#}");
            Err(ExitCode::from(exit::FAILED))
        }
    }
}

async fn drain(args: &AdminArgs, timeout: std::time::Duration) -> ExitCode {
    let (addr, token) = match admin_target(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    match vmesh_agent::cli::admin_post(addr, "/drain", token.as_deref(), std::time::Duration::from_secs(30)).await {
        Ok((202 | 200, _)) => {}
        Ok((status, body)) => {
            eprintln!("error: drain refused: {status}: {}", body.trim());
            return ExitCode::from(exit::FAILED);
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(exit::ADMIN_UNREACHABLE);
        }
    }
    let deadline = std::time::Instant::now() + timeout;
    let mut last = None;
    loop {
        let status = admin_get(addr, "/status")
            .await
            .ok()
            .and_then(|(_, b)| serde_json::from_str::<serde_json::Value>(&b).ok());
        let Some(s) = status else {
            eprintln!("error: ADMIN_UNREACHABLE: lost the admin API while draining");
            return ExitCode::from(exit::ADMIN_UNREACHABLE);
        };
        let phase = s["lifecycle"]["drain"].as_str().unwrap_or("").to_owned();
        let in_flight = s["lifecycle"]["in_flight"].as_u64().unwrap_or(0);
        if last != Some(in_flight) {
            println!("draining: {in_flight} request(s) in flight");
            last = Some(in_flight);
        }
        if phase == "drained" {
            println!("drained");
            return ExitCode::SUCCESS;
        }
        if std::time::Instant::now() >= deadline {
            eprintln!("error: DRAIN_TIMEOUT: {in_flight} request(s) still in flight after {timeout:?} (the instance stays marked down)");
            return ExitCode::from(exit::TIMEOUT);
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `vmesh shift SERVICE [vm=N k8s=N]`: shows the shift, or writes it with compare-and-set
/// against the index just read.
async fn shift(args: &AdminArgs, service: &str, values: &[String]) -> ExitCode {
    let (addr, token) = match admin_target(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let path = format!("/shift/{service}");
    let answer = if values.is_empty() {
        admin_get(addr, &path).await
    } else {
        let policy = match vmesh_agent::discovery::shift::Policy::from_args(values) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(exit::FAILED);
            }
        };
        let index = match admin_get(addr, &path).await {
            Ok((200, body)) => serde_json::from_str::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v["shift"]["index"].as_u64())
                .unwrap_or(0),
            Ok((_, body)) => {
                let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                eprintln!("error: {}", v["message"].as_str().unwrap_or(body.trim()));
                return ExitCode::from(exit::FAILED);
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                return ExitCode::from(exit::ADMIN_UNREACHABLE);
            }
        };
        vmesh_agent::cli::admin_put(addr, &format!("{path}?cas={index}"), token.as_deref(), policy.to_json()).await
    };
    match answer {
        Ok((200, body)) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            if args.json {
                print!("{body}");
            } else {
                print!("{}", shift_summary(&v));
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            eprintln!("error: {}", v["message"].as_str().unwrap_or(body.trim()));
            ExitCode::from(if status == 409 && v["error"] == "SHIFT_CONFLICT" {
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

async fn undrain(args: &AdminArgs, timeout: std::time::Duration) -> ExitCode {
    let (addr, token) = match admin_target(args) {
        Ok(t) => t,
        Err(code) => return code,
    };
    let path = format!("/undrain?timeout={}s", timeout.as_secs().max(1));
    match vmesh_agent::cli::admin_post(
        addr,
        &path,
        token.as_deref(),
        timeout + std::time::Duration::from_secs(10),
    )
    .await
    {
        Ok((200, _)) => {
            println!("undrained: registered, slow start begins");
            ExitCode::SUCCESS
        }
        Ok((_, body)) if body.starts_with("APP_UNHEALTHY") => {
            eprintln!("error: {}", body.trim());
            ExitCode::from(exit::TIMEOUT)
        }
        Ok((status, body)) => {
            eprintln!("error: undrain failed: {status}: {}", body.trim());
            ExitCode::from(exit::FAILED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ADMIN_UNREACHABLE)
        }
    }
}

async fn identity(path: std::path::PathBuf, json: bool) -> ExitCode {
    let source = Source::file(path);
    let config = match config::load(&source) {
        Ok(c) => c,
        Err(e) => {
            print_problems(&e);
            return ExitCode::from(exit::FAILED);
        }
    };
    let vm = vmesh_agent::identity::vm_name(&config);
    let cmdb = match vmesh_agent::identity::cmdb(&config, &source.env) {
        Ok(Some(c)) => c,
        Ok(None) => {
            eprintln!("error: CMDB_CONFIG: no identity source configured ([cmdb] kind = \"file\" needs a path)");
            return ExitCode::from(exit::CMDB_ERROR);
        }
        Err(e) => {
            eprintln!("error: {}: {e}", e.code());
            return ExitCode::from(exit::CMDB_ERROR);
        }
    };
    match cmdb.identity(&vm).await {
        Ok(id) if json => {
            println!("{}", serde_json::to_string_pretty(&id).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Ok(id) => {
            println!("vm:          {vm} ({})", cmdb.describe());
            println!("service:     {}", id.service);
            println!("environment: {}", id.environment);
            println!("zone:        {}", id.zone);
            println!("version:     {}", id.version);
            println!("weight:      {}", id.weight);
            println!("colour:      {}", id.colour);
            println!("owner:       {}", id.owner);
            println!("tags:        {}", id.tags.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {}: {e}", e.code());
            ExitCode::from(exit::CMDB_ERROR)
        }
    }
}

fn check_config(source: Source) -> ExitCode {
    match config::load(&source) {
        Ok(c) => {
            println!(
                "ok: {} ({} outbound services)",
                source
                    .path
                    .as_ref()
                    .map_or("embedded".into(), |p| p.display().to_string()),
                c.outbound.len()
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            print_problems(&e);
            ExitCode::from(2)
        }
    }
}

fn print_problems(e: &config::ConfigErrors) {
    eprintln!("error: invalid config {}: {} problem(s)", e.origin, e.problems.len());
    for p in &e.problems {
        eprintln!("error: {p}");
    }
}

fn run(source: Source, demo_upstreams: bool) -> ExitCode {
    let config = match config::load(&source) {
        Ok(c) => c,
        Err(e) => {
            print_problems(&e);
            return ExitCode::from(2);
        }
    };
    telemetry::init_logging(&config.agent.log_level);
    // Before any thread exists: taking the sockets unsets LISTEN_FDS/LISTEN_PID.
    let inherited = match vmesh_agent::proxy::activation::Inherited::from_systemd() {
        Ok(i) => i,
        Err(e) => {
            eprintln!("error: cannot take the sockets passed by systemd: {e}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match build_runtime(&config) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        if demo_upstreams {
            demo::start_upstreams(&demo::quickstart_upstreams()).await?;
        }
        lifecycle::run(source, config, inherited).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "vmesh failed");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn build_runtime(config: &Config) -> std::io::Result<tokio::runtime::Runtime> {
    let threads = config
        .agent
        .worker_threads
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    if threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    }
}

fn admin_command(args: &AdminArgs, path: &str) -> ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async {
        let addr = args.admin_addr()?;
        admin_get(addr, path).await
    });
    match result {
        Ok((200, body)) => {
            match serde_json::from_str::<serde_json::Value>(&body) {
                Ok(v) if !args.json => print!("{}", summary(path, &v)),
                _ => print!("{body}"),
            }
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("error: admin API answered {status}: {body}");
            ExitCode::from(exit::FAILED)
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(exit::ADMIN_UNREACHABLE)
        }
    }
}

/// A few lines for people; `--json` prints the admin API's answer as it is.
fn summary(path: &str, v: &serde_json::Value) -> String {
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
