//! `vmesh check-config`: the same loader and validation as `run` and a reload; every problem
//! printed with its key and line.

use std::process::ExitCode;

use super::exit;
use crate::config::{self, Source};

pub fn run(source: Source) -> ExitCode {
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
            ExitCode::from(exit::FAILED)
        }
    }
}

pub fn print_problems(e: &config::ConfigErrors) {
    eprintln!("error: invalid config {}: {} problem(s)", e.origin, e.problems.len());
    for p in &e.problems {
        eprintln!("error: {p}");
    }
}
