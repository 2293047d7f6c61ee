//! The `vmesh` binary: parses the command line and runs the agent or a client command.

use std::process::ExitCode;

use clap::Parser;
use vmesh_agent::cli::{self, drain, exit, Cli, Command};
use vmesh_agent::config::{self, Config, Source};
use vmesh_agent::{app, demo, telemetry};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Run { config } => run(Source::file(config), false),
        // The demo's state directory lives until `run` returns.
        Command::Demo => match demo::Demo::prepare() {
            Ok(d) => run(d.source.clone(), true),
            Err(e) => {
                eprintln!("error: {}: {e}", e.code());
                ExitCode::from(exit::FAILED)
            }
        },
        Command::CheckConfig { config } => cli::check::run(Source::file(config)),
        Command::Status(args) => client_runtime(|| cli::status::run(&args, "/status")),
        Command::Clusters(args) => client_runtime(|| cli::status::run(&args, "/clusters")),
        Command::Drain { admin, timeout } => client_runtime(|| drain::drain(&admin, timeout)),
        Command::Undrain {
            admin,
            timeout,
            wait_ramp,
        } => client_runtime(|| drain::undrain(&admin, timeout, wait_ramp)),
        Command::Tap(args) => client_runtime(|| cli::tap::run(&args)),
        Command::Doctor(args) => client_runtime(|| cli::doctor::run(&args)),
        Command::Identity { config, json } => client_runtime(|| cli::identity::run(config, json)),
        Command::Init(args) => client_runtime(|| cli::init::run(*args)),
        Command::Shift { admin, service, values } => client_runtime(|| cli::shift::run(&admin, &service, &values)),
    }
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

fn run(source: Source, demo_upstreams: bool) -> ExitCode {
    let config = match config::load(&source) {
        Ok(c) => c,
        Err(e) => {
            cli::check::print_problems(&e);
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
            demo::start_upstreams(&demo::upstreams(&config)).await?;
        }
        app::run(source, config, inherited).await
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
