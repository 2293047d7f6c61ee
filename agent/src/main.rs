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
        lifecycle::run(source, config).await
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
            print!("{body}");
            ExitCode::SUCCESS
        }
        Ok((status, body)) => {
            eprintln!("error: admin API answered {status}: {body}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(3)
        }
    }
}
