//! External tools the tests drive (curl, nginx, h2load, promtool, python3 + modules).
//!
//! A missing tool is a failure with the install command, never a skipped test.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

const INSTALL_HINT: &str = "run `bash scripts/install-test-deps.sh` as root (or `bash scripts/test.sh`)";

/// Proxy variables that would send curl or grpcio somewhere other than loopback.
const PROXY_VARS: &[&str] = &[
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "no_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
    "NO_PROXY",
    "grpc_proxy",
];

/// The absolute path of `tool`, found on `PATH` or in `/usr/sbin` and `/sbin`; panics if absent.
pub fn require(tool: &str) -> PathBuf {
    static FOUND: OnceLock<Mutex<HashMap<String, PathBuf>>> = OnceLock::new();
    let cache = FOUND.get_or_init(|| Mutex::new(HashMap::new()));
    let mut cache = cache.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(path) = cache.get(tool) {
        return path.clone();
    }
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path_var).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")]);
    for dir in dirs {
        let candidate = dir.join(tool);
        if is_executable(&candidate) {
            cache.insert(tool.to_string(), candidate.clone());
            return candidate;
        }
    }
    panic!("required tool `{tool}` is not installed: {INSTALL_HINT}");
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// A `Command` for `tool` (checked with [`require`]) with proxy variables removed.
pub fn command(tool: &str) -> Command {
    let mut cmd = Command::new(require(tool));
    for var in PROXY_VARS {
        cmd.env_remove(var);
    }
    cmd
}

/// The Python interpreter: `$VMESH_TEST_PYTHON` or `python3`.
pub fn python() -> String {
    std::env::var("VMESH_TEST_PYTHON").unwrap_or_else(|_| "python3".to_string())
}

/// A `Command` running Python with `modules` checked importable first (panics otherwise).
pub fn python_command(modules: &[&str]) -> Command {
    let py = python();
    for module in modules {
        require_python_module(&py, module);
    }
    let mut cmd = command(&py);
    cmd.env("PYTHONUNBUFFERED", "1").env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

fn require_python_module(py: &str, module: &str) {
    static CHECKED: OnceLock<Mutex<HashMap<String, bool>>> = OnceLock::new();
    let checked = CHECKED.get_or_init(|| Mutex::new(HashMap::new()));
    let key = format!("{py}:{module}");
    let mut checked = checked.lock().unwrap_or_else(|e| e.into_inner());
    let ok = *checked.entry(key).or_insert_with(|| {
        command(py)
            .args(["-c", &format!("import {module}")])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    });
    assert!(
        ok,
        "Python module `{module}` is not importable by `{py}`: {INSTALL_HINT}"
    );
}
