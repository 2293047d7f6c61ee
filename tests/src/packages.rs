//! The vmesh .deb and .rpm for the packaging and fleet tests: `packaging/build.sh` builds them
//! once (a lock in `target/packages` keeps two test binaries from building at the same time),
//! later test binaries reuse them while they are newer than the release binary and every
//! packaging input; the system tools the tests drive (`dpkg-deb`, `rpm`, `systemd-analyze`...)
//! are found here, and a missing one fails naming `scripts/install-packaging-deps.sh`.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use crate::workspace_root;

pub const INSTALL_HINT: &str = "run `bash scripts/install-packaging-deps.sh` as root";

/// The version of the workspace, which is the version of the packages.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

// === tools ===

/// The absolute path of `tool` (PATH, /usr/sbin, /sbin, ~/.cargo/bin); panics with the install
/// command when it is missing.
pub fn require(tool: &str) -> PathBuf {
    let path_var = std::env::var_os("PATH").unwrap_or_default();
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|d| d.join("bin"));
    let dirs = std::env::split_paths(&path_var)
        .chain([PathBuf::from("/usr/sbin"), PathBuf::from("/sbin")])
        .chain(cargo_bin);
    for dir in dirs {
        let candidate = dir.join(tool);
        if candidate
            .metadata()
            .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
            .unwrap_or(false)
        {
            return candidate;
        }
    }
    panic!("required tool `{tool}` is not installed: {INSTALL_HINT}");
}

/// A command for `tool` (see [`require`]) with no stdin and the C locale.
pub fn cmd(tool: &str) -> Command {
    let mut c = Command::new(require(tool));
    c.stdin(Stdio::null()).env("LC_ALL", "C");
    c
}

/// `what`, the exit status and both outputs, for assertion messages.
pub fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `c`, panics with its output unless it exits 0; returns stdout.
pub fn run_ok(what: &str, c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: cannot run {c:?}: {e}"));
    assert!(out.status.success(), "{}", describe(what, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Panics unless this process runs as root (the tests install packages and boot containers).
pub fn assert_root() {
    let uid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    assert_eq!(
        uid, 0,
        "this test installs packages or boots containers for real and must run as root"
    );
}

/// A path of the repository.
pub fn repo(path: &str) -> PathBuf {
    workspace_root().join(path)
}

pub fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

pub fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmesh-packaging-")
        .tempdir()
        .expect("create a temporary directory")
}

// === locks shared by the test binaries ===

/// A lock held across processes: a directory created atomically with the holder's pid inside;
/// a directory whose holder is dead is taken over. Released when dropped.
pub struct DirLock {
    path: PathBuf,
}

impl DirLock {
    /// Waits (at most `limit`) for the lock at `path`.
    pub fn acquire(path: &Path, limit: Duration) -> DirLock {
        if let Some(parent) = path.parent() {
            fs::create_dir_all(parent).unwrap_or_else(|e| panic!("mkdir {}: {e}", parent.display()));
        }
        let deadline = Instant::now() + limit;
        loop {
            match fs::create_dir(path) {
                Ok(()) => {
                    fs::write(path.join("pid"), std::process::id().to_string()).expect("write the lock's pid");
                    return DirLock { path: path.to_owned() };
                }
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(path.join("pid")).unwrap_or_default();
                    let alive = holder
                        .trim()
                        .parse::<u32>()
                        .is_ok_and(|pid| Path::new(&format!("/proc/{pid}")).exists());
                    // A lock without a pid is being created right now, unless it stays so for 10 s.
                    let young = fs::metadata(path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age < Duration::from_secs(10));
                    let stale = if holder.is_empty() { !young } else { !alive };
                    if stale {
                        let _ = fs::remove_dir_all(path);
                        continue;
                    }
                    assert!(
                        Instant::now() < deadline,
                        "{} is still held by pid {holder:?} after {limit:?}",
                        path.display()
                    );
                    std::thread::sleep(Duration::from_millis(200));
                }
                Err(e) => panic!("lock {}: {e}", path.display()),
            }
        }
    }
}

impl Drop for DirLock {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// Serializes, across threads and test binaries, what changes this machine's root file system
/// (installing the .deb with this machine's dpkg) or reads it as the lower layer of a container
/// (a container would see a half-installed vmesh). Held while such a test runs.
pub fn host_lock() -> (MutexGuard<'static, ()>, DirLock) {
    static HOST: Mutex<()> = Mutex::new(());
    let guard = HOST.lock().unwrap_or_else(|e| e.into_inner());
    let lock = DirLock::acquire(&packages_dir().join(".host.lock"), Duration::from_secs(1800));
    (guard, lock)
}

// === the packages ===

/// The .deb and .rpm of `packaging/build.sh`.
pub struct Packages {
    pub deb: PathBuf,
    pub rpm: PathBuf,
}

/// Inputs of the packages: when one is newer than a package, the packages are rebuilt.
const PACKAGING_INPUTS: &[&str] = &[
    "packaging",
    "systemd",
    "agent/Cargo.toml",
    "README.md",
    "docs/install.md",
    "docs/config.md",
    "docs/cli.md",
    "docs/operations.md",
    "docs/identity.md",
    "docs/registry.md",
];

fn packages_dir() -> PathBuf {
    workspace_root().join("target/packages")
}

fn newest_mtime(path: &Path) -> SystemTime {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("stat {}: {e}", path.display()));
    let mut newest = meta.modified().expect("mtime");
    if meta.is_dir() {
        for entry in fs::read_dir(path).expect("read_dir").flatten() {
            newest = newest.max(newest_mtime(&entry.path()));
        }
    }
    newest
}

fn mtime(path: &Path) -> Option<SystemTime> {
    fs::metadata(path).and_then(|m| m.modified()).ok()
}

/// The .deb and .rpm: built once per test process by `packaging/build.sh`, or reused when both
/// are newer than the release binary and every packaging input. `VMESH_PACKAGING_REBUILD=1`
/// forces one build per test process.
pub fn packages() -> &'static Packages {
    static BUILT: OnceLock<Result<Packages, String>> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    let built = BUILT.get_or_init(|| {
        // A release build on a loaded 2-core machine takes minutes; another test binary may be
        // building right now.
        let _lock = DirLock::acquire(&packages_dir().join(".build.lock"), Duration::from_secs(3600));
        build_or_reuse()
    });
    match built {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn build_or_reuse() -> Result<Packages, String> {
    let root = workspace_root();
    let deb_arch = run_ok("dpkg --print-architecture", cmd("dpkg").arg("--print-architecture"));
    let rpm_arch = run_ok("uname -m", cmd("uname").arg("-m"));
    let out = packages_dir();
    let deb = out.join(format!("vmesh_{VERSION}_{}.deb", deb_arch.trim()));
    let rpm = out.join(format!("vmesh-{VERSION}-1.{}.rpm", rpm_arch.trim()));

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let binary = target.join("release/vmesh");
    let fresh = match (mtime(&deb), mtime(&rpm), mtime(&binary)) {
        (Some(d), Some(r), Some(b)) => {
            let oldest_package = d.min(r);
            let newest_input = PACKAGING_INPUTS
                .iter()
                .map(|p| newest_mtime(&root.join(p)))
                .fold(b, SystemTime::max);
            oldest_package > newest_input
        }
        _ => false,
    };
    let forced = std::env::var_os("VMESH_PACKAGING_REBUILD").is_some_and(|v| v == "1");
    if fresh && !forced {
        eprintln!("packaging: reusing {} and {}", deb.display(), rpm.display());
    } else {
        for tool in ["cargo-deb", "cargo-generate-rpm", "dpkg-shlibdeps", "strip"] {
            require(tool);
        }
        eprintln!("packaging: running packaging/build.sh (a release build takes minutes)");
        let started = Instant::now();
        let output = Command::new("bash")
            .arg(root.join("packaging/build.sh"))
            .current_dir(&root)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("cannot run packaging/build.sh: {e}"))?;
        if !output.status.success() {
            return Err(describe("packaging/build.sh failed", &output));
        }
        eprintln!("packaging: built in {:?}", started.elapsed());
    }
    for p in [&deb, &rpm] {
        if !p.is_file() {
            return Err(format!("{} is missing after packaging/build.sh", p.display()));
        }
    }
    Ok(Packages { deb, rpm })
}

/// A copy of the .deb at `deb` with the version `version` and the same files, written into
/// `dir`: the next version for an upgrade (the control file rewritten with `dpkg-deb -R`/`-b`).
pub fn repack_with_version(deb: &Path, version: &str, dir: &Path) -> PathBuf {
    let tree = dir.join(format!("tree-{version}"));
    run_ok("dpkg-deb -R", cmd("dpkg-deb").arg("-R").arg(deb).arg(&tree));
    let control = tree.join("DEBIAN/control");
    let text = read(&control)
        .lines()
        .map(|l| {
            if l.starts_with("Version: ") {
                format!("Version: {version}")
            } else {
                l.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    fs::write(&control, text + "\n").expect("write control");
    let out = dir.join(format!("vmesh_{version}.deb"));
    run_ok(
        "dpkg-deb -b",
        cmd("dpkg-deb")
            .args(["--root-owner-group", "-Zxz", "-b"])
            .arg(&tree)
            .arg(&out),
    );
    let _ = fs::remove_dir_all(&tree);
    out
}
