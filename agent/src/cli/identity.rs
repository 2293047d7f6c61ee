//! `vmesh identity`: this VM's identity as the CMDB has it, asked directly (no agent needed).

use std::process::ExitCode;

use super::exit;
use crate::config::{self, Source};

pub async fn run(path: std::path::PathBuf, json: bool) -> ExitCode {
    let source = Source::file(path);
    let config = match config::load(&source) {
        Ok(c) => c,
        Err(e) => {
            super::check::print_problems(&e);
            return ExitCode::from(exit::FAILED);
        }
    };
    let vm = crate::identity::vm_name(&config);
    let cmdb = match crate::identity::cmdb(&config, &source.env) {
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
