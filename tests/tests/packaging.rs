//! The .deb and .rpm, for real: `packaging/build.sh` builds them (or they are reused when
//! newer than the release binary and every packaging input), `dpkg-deb` and `rpm -qp` inspect
//! them, the .deb is installed into THIS machine with `dpkg -i` (upgraded, rolled back, removed
//! and purged again: a drop guard purges it whatever happens), the .rpm is installed into a
//! temporary root with `rpm --root`, `lintian` must report no error, and `systemd-analyze`
//! verifies the units and scores their hardening.
//!
//! Needs root and the tools of `scripts/install-packaging-deps.sh`; a missing tool fails the
//! test with that command, nothing is skipped. `VMESH_PACKAGING_REBUILD=1` forces a rebuild.

use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime};

use vmesh_tests::{eventually, free_addr, workspace_root, Process, Signal};

const INSTALL_HINT: &str = "run `bash scripts/install-packaging-deps.sh` as root";
const VERSION: &str = env!("CARGO_PKG_VERSION");

// === tools ===

/// The absolute path of `tool` (PATH, /usr/sbin, /sbin, ~/.cargo/bin); panics with the install
/// command when it is missing.
fn require(tool: &str) -> PathBuf {
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

fn cmd(tool: &str) -> Command {
    let mut c = Command::new(require(tool));
    c.stdin(Stdio::null()).env("LC_ALL", "C");
    c
}

fn describe(what: &str, out: &Output) -> String {
    format!(
        "{what}: {}\n--- stdout ---\n{}\n--- stderr ---\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Runs `c`, panics with its output unless it exits 0; returns stdout.
fn run_ok(what: &str, c: &mut Command) -> String {
    let out = c.output().unwrap_or_else(|e| panic!("{what}: cannot run {c:?}: {e}"));
    assert!(out.status.success(), "{}", describe(what, &out));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn assert_root() {
    let uid = fs::metadata("/proc/self").map(|m| m.uid()).unwrap_or(u32::MAX);
    assert_eq!(
        uid, 0,
        "the packaging test installs packages for real and must run as root"
    );
}

fn repo(path: &str) -> PathBuf {
    workspace_root().join(path)
}

fn read(path: &Path) -> String {
    fs::read_to_string(path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmesh-packaging-")
        .tempdir()
        .expect("create a temporary directory")
}

// === the packages ===

struct Packages {
    deb: PathBuf,
    rpm: PathBuf,
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
/// are newer than the release binary and every packaging input.
fn packages() -> &'static Packages {
    static BUILT: OnceLock<Result<Packages, String>> = OnceLock::new();
    static BUILDING: Mutex<()> = Mutex::new(());
    let _one_at_a_time = BUILDING.lock().unwrap_or_else(|e| e.into_inner());
    match BUILT.get_or_init(build_or_reuse) {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

fn build_or_reuse() -> Result<Packages, String> {
    let root = workspace_root();
    let deb_arch = run_ok("dpkg --print-architecture", cmd("dpkg").arg("--print-architecture"));
    let rpm_arch = run_ok("uname -m", cmd("uname").arg("-m"));
    let out = root.join("target/packages");
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

/// The .deb's files, extracted into a temporary directory.
fn extracted_deb() -> tempfile::TempDir {
    let dir = tempdir();
    run_ok(
        "dpkg-deb -x",
        cmd("dpkg-deb").arg("-x").arg(&packages().deb).arg(dir.path()),
    );
    dir
}

// === dpkg-deb: contents and control data ===

#[test]
fn deb_contents_and_control() {
    let p = packages();
    let listing = run_ok("dpkg-deb -c", cmd("dpkg-deb").arg("-c").arg(&p.deb));
    let mut files = BTreeSet::new();
    for line in listing.lines() {
        // -rwxr-xr-x root/root   4242 2026-11-27 04:30 ./usr/bin/vmesh
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert!(fields.len() >= 6, "unexpected dpkg-deb -c line: {line}");
        assert_eq!(fields[1], "root/root", "every file belongs to root: {line}");
        files.insert((fields[5].trim_start_matches('.').to_owned(), fields[0].to_owned()));
    }
    for (path, mode) in [
        ("/usr/bin/vmesh", "-rwxr-xr-x"),
        ("/etc/vmesh/vmesh.toml", "-rw-r--r--"),
        ("/lib/systemd/system/vmesh.service", "-rw-r--r--"),
        ("/lib/systemd/system/vmesh.socket", "-rw-r--r--"),
        ("/usr/share/doc/vmesh/copyright", "-rw-r--r--"),
        ("/usr/share/doc/vmesh/changelog.gz", "-rw-r--r--"),
        ("/usr/share/doc/vmesh/install.md", "-rw-r--r--"),
        ("/usr/share/doc/vmesh/config.md", "-rw-r--r--"),
        ("/usr/share/doc/vmesh/operations.md", "-rw-r--r--"),
        ("/usr/share/vmesh/hooks/pre-stop", "-rwxr-xr-x"),
        ("/usr/share/vmesh/hooks/post-start", "-rwxr-xr-x"),
    ] {
        assert!(
            files.contains(&(path.to_owned(), mode.to_owned())),
            "{path} ({mode}) is not in the .deb:\n{listing}"
        );
    }

    let field = |name: &str| {
        run_ok("dpkg-deb -f", cmd("dpkg-deb").arg("-f").arg(&p.deb).arg(name))
            .trim()
            .to_owned()
    };
    assert_eq!(field("Package"), "vmesh");
    assert_eq!(field("Version"), VERSION);
    let arch = run_ok("dpkg --print-architecture", cmd("dpkg").arg("--print-architecture"));
    assert_eq!(field("Architecture"), arch.trim());
    assert_eq!(field("Section"), "net");
    let depends = field("Depends");
    for dep in ["adduser", "libc6"] {
        assert!(depends.contains(dep), "Depends lacks {dep}: {depends}");
    }
    assert!(
        !depends.contains("systemd"),
        "the package must install without systemd: {depends}"
    );
    assert!(field("Maintainer").contains('@'), "Maintainer: {}", field("Maintainer"));

    let info = run_ok("dpkg-deb -I", cmd("dpkg-deb").arg("-I").arg(&p.deb));
    for member in ["conffiles", "md5sums", "postinst", "prerm", "postrm"] {
        assert!(
            info.contains(&format!(" {member}")),
            "control member {member} missing:\n{info}"
        );
    }
    let conffiles = run_ok(
        "dpkg-deb -I conffiles",
        cmd("dpkg-deb").arg("-I").arg(&p.deb).arg("conffiles"),
    );
    assert_eq!(conffiles.trim(), "/etc/vmesh/vmesh.toml", "conffiles");

    // The packaged files are the repository's.
    let x = extracted_deb();
    for (inside, source) in [
        ("etc/vmesh/vmesh.toml", "packaging/vmesh.toml"),
        ("lib/systemd/system/vmesh.service", "systemd/vmesh.service"),
        ("lib/systemd/system/vmesh.socket", "systemd/vmesh.socket"),
        ("usr/share/doc/vmesh/copyright", "packaging/copyright"),
    ] {
        assert_eq!(
            read(&x.path().join(inside)),
            read(&repo(source)),
            "{inside} differs from {source}"
        );
    }
    // The binary is stripped (the release profile keeps line tables; packages do not ship them).
    let sections = run_ok(
        "readelf -S",
        cmd("readelf")
            .args(["-S", "--wide"])
            .arg(x.path().join("usr/bin/vmesh")),
    );
    for section in [".symtab", ".debug_info", ".debug_line"] {
        assert!(
            !sections.contains(section),
            "usr/bin/vmesh is not stripped: it has {section}"
        );
    }
    let version = run_ok(
        "vmesh --version",
        Command::new(x.path().join("usr/bin/vmesh")).arg("--version"),
    );
    assert!(version.contains(VERSION), "vmesh --version: {version}");
}

// === the default config ===

/// The shipped config is valid as is, and so is every commented key uncommented (the comments
/// are a reference: a typo or a removed key would make this fail).
#[test]
fn default_config_is_valid_and_its_commented_keys_too() {
    let x = extracted_deb();
    let vmesh = x.path().join("usr/bin/vmesh");
    let shipped = x.path().join("etc/vmesh/vmesh.toml");
    let out = run_ok(
        "check-config on the shipped config",
        Command::new(&vmesh).arg("check-config").arg("--config").arg(&shipped),
    );
    assert!(out.starts_with("ok:"), "{out}");

    // Uncomment `# key = value` and `# [section]` lines; leave out the alternatives that
    // need another setting (url: kind = "http"/"nautobot"; hash_header: ring-hash).
    let mut uncommented = String::new();
    let mut keys = 0;
    for line in read(&shipped).lines() {
        let Some(rest) = line.strip_prefix("# ") else {
            if !line.starts_with('#') {
                uncommented.push_str(line);
                uncommented.push('\n');
            }
            continue;
        };
        let header = rest.starts_with('[')
            && rest
                .split('#')
                .next()
                .is_some_and(|h| h.trim_end().ends_with(']') && !h.contains(':'));
        let key = rest
            .split_once(" = ")
            .is_some_and(|(k, _)| !k.is_empty() && k.chars().all(|c| c.is_ascii_lowercase() || c == '_'));
        if header || key {
            if rest.starts_with("url ") || rest.starts_with("hash_header ") {
                continue;
            }
            keys += usize::from(key);
            uncommented.push_str(rest);
            uncommented.push('\n');
        }
    }
    assert!(keys > 50, "expected the commented reference of every key, found {keys}");
    let dir = tempdir();
    let all = dir.path().join("all-keys.toml");
    fs::write(&all, &uncommented).expect("write all-keys.toml");
    let out = Command::new(&vmesh)
        .arg("check-config")
        .arg("--config")
        .arg(&all)
        .output()
        .expect("run vmesh check-config");
    assert!(
        out.status.success(),
        "{}\n--- uncommented config ---\n{uncommented}",
        describe("check-config with every key uncommented", &out)
    );
}

// === dpkg: install, upgrade, rollback, remove, purge on this machine ===

/// Retries dpkg while another dpkg/apt holds the lock (at most 2 minutes).
fn dpkg(args: &[&str]) -> Output {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let out = cmd("dpkg")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .output()
            .expect("run dpkg");
        let stderr = String::from_utf8_lossy(&out.stderr);
        let locked = !out.status.success() && stderr.contains("lock");
        if !locked || Instant::now() >= deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn dpkg_ok(args: &[&str]) -> String {
    let out = dpkg(args);
    assert!(
        out.status.success(),
        "{}",
        describe(&format!("dpkg {}", args.join(" ")), &out)
    );
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// `dpkg-query`'s status abbreviation of vmesh ("ii ", "rc ", ...), or None when unknown.
fn dpkg_status() -> Option<String> {
    let out = cmd("dpkg-query")
        .args(["-W", "-f=${db:Status-Abbrev}|${Version}", "vmesh"])
        .output()
        .expect("run dpkg-query");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.starts_with("un")).then_some(text)
}

/// Serializes the tests that install vmesh on this machine or boot a container over its root
/// file system (the container would see a half-installed vmesh in its lower layer).
fn system_lock() -> std::sync::MutexGuard<'static, ()> {
    static SYSTEM: Mutex<()> = Mutex::new(());
    SYSTEM.lock().unwrap_or_else(|e| e.into_inner())
}

/// Purges vmesh when dropped, so a failing test leaves the machine clean.
struct PurgeOnDrop;

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        let out = dpkg(&["--purge", "vmesh"]);
        if !out.status.success() {
            eprintln!("{}", describe("cleanup: dpkg --purge vmesh", &out));
        }
    }
}

struct Passwd {
    uid: u32,
    gid: u32,
    home: String,
    shell: String,
}

fn getent(db: &str, name: &str) -> Option<String> {
    let out = cmd("getent").args([db, name]).output().expect("run getent");
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

fn vmesh_user() -> Passwd {
    let line = getent("passwd", "vmesh").expect("user vmesh exists");
    let f: Vec<&str> = line.split(':').collect();
    assert_eq!(f.len(), 7, "passwd line: {line}");
    Passwd {
        uid: f[2].parse().expect("uid"),
        gid: f[3].parse().expect("gid"),
        home: f[5].to_owned(),
        shell: f[6].to_owned(),
    }
}

fn assert_owned_dir(path: &str, user: &Passwd) {
    let meta = fs::metadata(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    assert!(meta.is_dir(), "{path} is not a directory");
    assert_eq!(
        (meta.uid(), meta.gid()),
        (user.uid, user.gid),
        "{path} is not owned by vmesh:vmesh"
    );
    assert_eq!(meta.mode() & 0o7777, 0o750, "{path} mode");
}

/// Everything a configured install must have, at `version`.
fn assert_installed(version: &str) {
    let status = dpkg_status().expect("vmesh is known to dpkg");
    assert_eq!(status, format!("ii |{version}"), "dpkg status of vmesh");

    let user = vmesh_user();
    assert!(user.uid < 1000, "vmesh is a system user (uid {})", user.uid);
    assert_eq!(user.home, "/var/lib/vmesh");
    assert!(user.shell.ends_with("nologin"), "shell {}", user.shell);
    let group = getent("group", "vmesh").expect("group vmesh exists");
    assert!(group.starts_with(&format!("vmesh:x:{}:", user.gid)), "group {group}");
    assert_owned_dir("/var/lib/vmesh", &user);
    assert_owned_dir("/var/log/vmesh", &user);

    let bin = fs::metadata("/usr/bin/vmesh").expect("/usr/bin/vmesh");
    assert_eq!(bin.mode() & 0o7777, 0o755);
    assert_eq!(
        read(Path::new("/lib/systemd/system/vmesh.service")),
        read(&repo("systemd/vmesh.service"))
    );
    assert_eq!(
        read(Path::new("/lib/systemd/system/vmesh.socket")),
        read(&repo("systemd/vmesh.socket"))
    );
    let conffiles = run_ok(
        "dpkg-query Conffiles",
        cmd("dpkg-query").args(["-W", "-f=${Conffiles}", "vmesh"]),
    );
    assert!(conffiles.contains("/etc/vmesh/vmesh.toml"), "conffiles: {conffiles}");

    // The service user can read and validate the config, as ExecStartPre does.
    let out = run_ok(
        "vmesh check-config as the vmesh user",
        cmd("setpriv")
            .args(["--reuid=vmesh", "--regid=vmesh", "--init-groups", "--"])
            .args(["/usr/bin/vmesh", "check-config", "--config", "/etc/vmesh/vmesh.toml"]),
    );
    assert!(out.starts_with("ok: /etc/vmesh/vmesh.toml"), "{out}");

    // Without systemd as PID 1 (a chroot, a container, this sandbox) the scripts call no
    // systemctl, so nothing was enabled.
    if !Path::new("/run/systemd/system").exists() {
        assert!(
            !Path::new("/etc/systemd/system/multi-user.target.wants/vmesh.service").exists(),
            "postinst enabled vmesh.service although systemd is not running"
        );
    }
}

/// Runs the installed agent as the vmesh user on the installed config (admin API on a free
/// port), waits for /live, then SIGTERM: it must open its state store in /var/lib/vmesh.
fn run_installed_agent_as_vmesh() {
    let admin = free_addr();
    let logs = tempdir();
    let mut c = cmd("setpriv");
    c.args(["--reuid=vmesh", "--regid=vmesh", "--init-groups", "--"])
        .args(["/usr/bin/vmesh", "run", "--config", "/etc/vmesh/vmesh.toml"])
        .env("VMESH_AGENT__ADMIN_LISTEN", admin.to_string())
        .env("VMESH_AGENT__WORKER_THREADS", "1");
    let mut agent = Process::spawn("installed-vmesh", c, logs.path());
    eventually(Duration::from_secs(20), "the installed agent's /live", || {
        if let Some(status) = agent.try_exit() {
            return Err(format!("exited {status}: {}", agent.stderr_tail(20)));
        }
        match vmesh_tests::http::get(admin, "/live") {
            Ok(r) if r.status == 200 => Ok(()),
            Ok(r) => Err(format!("status {}", r.status)),
            Err(e) => Err(e),
        }
    });
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(40));
    assert!(status.success(), "agent exit {status}: {}", agent.stderr_tail(30));
    let user = vmesh_user();
    let mut state_files = 0;
    for entry in fs::read_dir("/var/lib/vmesh").expect("read /var/lib/vmesh").flatten() {
        let meta = entry.metadata().expect("stat");
        assert_eq!(meta.uid(), user.uid, "{} not owned by vmesh", entry.path().display());
        state_files += 1;
    }
    assert!(state_files > 0, "the agent wrote no state into /var/lib/vmesh");
}

/// A copy of the .deb with a higher version and the same files: the upgrade path.
fn repack_with_version(deb: &Path, version: &str, dir: &Path) -> PathBuf {
    let tree = dir.join("tree");
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
    out
}

#[test]
fn deb_installs_upgrades_rolls_back_removes_and_purges_on_this_machine() {
    assert_root();
    let p = packages();
    let deb = p.deb.to_str().expect("utf-8 path");
    let _system = system_lock();
    if let Some(status) = dpkg_status() {
        panic!(
            "vmesh is already known to dpkg on this machine ({status}); this test installs and \
             purges it for real: run `dpkg --purge vmesh` first"
        );
    }
    let _purge = PurgeOnDrop;

    // Fresh install.
    dpkg_ok(&["-i", deb]);
    assert_installed(VERSION);
    let first_uid = vmesh_user().uid;
    assert_eq!(
        read(Path::new("/etc/vmesh/vmesh.toml")),
        read(&repo("packaging/vmesh.toml"))
    );

    // The maintainer scripts are idempotent: configure again changes nothing.
    run_ok(
        "postinst configure, a second time",
        cmd("sh").args(["/var/lib/dpkg/info/vmesh.postinst", "configure", VERSION]),
    );
    assert_installed(VERSION);
    assert_eq!(vmesh_user().uid, first_uid);

    // The installed layout runs: the vmesh user opens its state store in /var/lib/vmesh.
    run_installed_agent_as_vmesh();

    // A local edit of the conffile survives a reinstall, an upgrade and a rollback.
    let edited =
        read(Path::new("/etc/vmesh/vmesh.toml")).replace("# node = \"web-01\"", "node = \"edited-by-packaging-test\"");
    assert!(
        edited.contains("\nnode = \"edited-by-packaging-test\""),
        "the default has `# node = \"web-01\"`"
    );
    fs::write("/etc/vmesh/vmesh.toml", &edited).expect("edit the conffile");
    let conffile_kept = |when: &str| {
        assert_eq!(
            read(Path::new("/etc/vmesh/vmesh.toml")),
            edited,
            "local edit lost by {when}"
        );
        for leftover in ["/etc/vmesh/vmesh.toml.dpkg-new", "/etc/vmesh/vmesh.toml.dpkg-dist"] {
            assert!(!Path::new(leftover).exists(), "{leftover} after {when}");
        }
    };

    dpkg_ok(&["-i", deb]);
    assert_installed(VERSION);
    conffile_kept("a reinstall");

    let dir = tempdir();
    let newer_version = format!("{VERSION}+upgradetest1");
    let newer = repack_with_version(&p.deb, &newer_version, dir.path());
    dpkg_ok(&["-i", newer.to_str().expect("utf-8 path")]);
    assert_installed(&newer_version);
    conffile_kept("an upgrade");
    assert_eq!(vmesh_user().uid, first_uid, "the upgrade kept the user");

    // Rollback = install the previous package again.
    let rollback = dpkg_ok(&["-i", deb]);
    assert!(rollback.contains("downgrading"), "dpkg output: {rollback}");
    assert_installed(VERSION);
    conffile_kept("a rollback");

    // Remove: program and units go, the conffile, the state and the user stay.
    dpkg_ok(&["-r", "vmesh"]);
    assert_eq!(
        dpkg_status().as_deref(),
        Some(format!("rc |{VERSION}").as_str()),
        "status after -r"
    );
    for gone in [
        "/usr/bin/vmesh",
        "/lib/systemd/system/vmesh.service",
        "/lib/systemd/system/vmesh.socket",
    ] {
        assert!(!Path::new(gone).exists(), "{gone} still there after dpkg -r");
    }
    conffile_kept("dpkg -r");
    assert!(Path::new("/var/lib/vmesh").is_dir(), "dpkg -r keeps the state");
    assert!(getent("passwd", "vmesh").is_some(), "dpkg -r keeps the user");

    // Purge: conffile, /etc/vmesh, state, logs, user and group go.
    dpkg_ok(&["--purge", "vmesh"]);
    assert_eq!(dpkg_status(), None, "dpkg still knows vmesh after --purge");
    for gone in ["/etc/vmesh", "/var/lib/vmesh", "/var/log/vmesh"] {
        assert!(!Path::new(gone).exists(), "{gone} still there after dpkg --purge");
    }
    assert_eq!(getent("passwd", "vmesh"), None, "user vmesh still there after purge");
    assert_eq!(getent("group", "vmesh"), None, "group vmesh still there after purge");

    // The purge script is idempotent: on a clean machine it succeeds and changes nothing.
    let control = dir.path().join("control");
    run_ok("dpkg-deb -e", cmd("dpkg-deb").arg("-e").arg(&p.deb).arg(&control));
    run_ok(
        "postrm purge, again",
        cmd("sh").arg(control.join("postrm")).arg("purge"),
    );
    run_ok(
        "prerm remove, again",
        cmd("sh").arg(control.join("prerm")).arg("remove"),
    );
    assert_eq!(getent("passwd", "vmesh"), None);
}

// === lintian ===

#[test]
fn lintian_reports_no_errors() {
    let p = packages();
    let out = cmd("lintian")
        .args(["--tag-display-limit", "0", "--display-level", ">=warning"])
        .arg(&p.deb)
        .output()
        .expect("run lintian");
    let text = String::from_utf8_lossy(&out.stdout);
    let errors: Vec<&str> = text.lines().filter(|l| l.starts_with("E: ")).collect();
    eprintln!(
        "lintian {}:\n{text}{}",
        p.deb.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(errors.is_empty(), "lintian errors:\n{}", errors.join("\n"));
    assert!(out.status.success(), "{}", describe("lintian", &out));
}

// === rpm ===

fn rpm_query(rpm: &Path, args: &[&str]) -> String {
    run_ok(
        &format!("rpm -qp {}", args.join(" ")),
        cmd("rpm").arg("-qp").args(args).arg(rpm),
    )
}

#[test]
fn rpm_metadata_scripts_and_dependencies() {
    let p = packages();
    let arch = run_ok("uname -m", cmd("uname").arg("-m"));
    let nvra = rpm_query(&p.rpm, &["--qf", "%{NAME} %{VERSION} %{RELEASE} %{ARCH}"]);
    assert_eq!(nvra, format!("vmesh {VERSION} 1 {}", arch.trim()));

    let list = rpm_query(&p.rpm, &["--list"]);
    for path in [
        "/usr/bin/vmesh",
        "/etc/vmesh/vmesh.toml",
        "/usr/lib/systemd/system/vmesh.service",
        "/usr/lib/systemd/system/vmesh.socket",
        "/usr/share/doc/vmesh/copyright",
        "/usr/share/vmesh/hooks/pre-stop",
        "/usr/share/vmesh/hooks/post-start",
    ] {
        assert!(list.lines().any(|l| l == path), "{path} is not in the .rpm:\n{list}");
    }
    let config = rpm_query(&p.rpm, &["--configfiles"]);
    assert_eq!(config.trim(), "/etc/vmesh/vmesh.toml", "config files");
    // %config(noreplace): file flags c (config) and n (noreplace).
    let flags = rpm_query(&p.rpm, &["--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]"]);
    let conf_flags = flags
        .lines()
        .find_map(|l| l.strip_prefix("/etc/vmesh/vmesh.toml "))
        .expect("flags of vmesh.toml");
    assert!(
        conf_flags.contains('c') && conf_flags.contains('n'),
        "vmesh.toml flags {conf_flags}"
    );
    // Owners and modes as the scripts expect them.
    let owners = rpm_query(
        &p.rpm,
        &[
            "--qf",
            "[%{FILENAMES} %{FILEUSERNAME}:%{FILEGROUPNAME} %{FILEMODES:perms}\n]",
        ],
    );
    for expected in [
        "/usr/bin/vmesh root:root -rwxr-xr-x",
        "/etc/vmesh/vmesh.toml root:root -rw-r--r--",
        "/usr/lib/systemd/system/vmesh.service root:root -rw-r--r--",
    ] {
        assert!(
            owners.lines().any(|l| l == expected),
            "missing `{expected}` in:\n{owners}"
        );
    }

    let scripts = rpm_query(&p.rpm, &["--scripts"]);
    for (section, needle) in [
        ("preinstall scriptlet", "useradd -r -g vmesh"),
        ("postinstall scriptlet", "install -d -o vmesh -g vmesh -m 0750 \"$dir\""),
        ("postinstall scriptlet", "systemctl enable vmesh.service"),
        ("preuninstall scriptlet", "disable --now vmesh.socket vmesh.service"),
        ("postuninstall scriptlet", "daemon-reload"),
        ("posttrans scriptlet", "try-restart vmesh.service"),
    ] {
        assert!(scripts.contains(section), "no {section}:\n{scripts}");
        assert!(scripts.contains(needle), "{section} lacks `{needle}`:\n{scripts}");
    }
    assert!(
        scripts.contains("[ -d /run/systemd/system ]"),
        "systemctl only with systemd running"
    );

    let requires = rpm_query(&p.rpm, &["--requires"]);
    for needle in ["/bin/sh", "shadow-utils", "libc.so.6"] {
        assert!(requires.contains(needle), "Requires lacks {needle}:\n{requires}");
    }
    assert!(
        !requires.lines().any(|l| l.starts_with("systemd")),
        "must not require systemd:\n{requires}"
    );
}

#[test]
fn rpm_installs_into_a_temporary_root() {
    let p = packages();
    let root = tempdir();
    let r = root.path().to_str().expect("utf-8 path");
    let rpm_path = p.rpm.to_str().expect("utf-8 path");
    // Debian's rpm refuses to install unless told it is on purpose.
    let force_debian = run_ok("rpm --help", cmd("rpm").arg("--help")).contains("--force-debian");
    let rpm = |args: &[&str]| {
        let mut c = cmd("rpm");
        c.arg("--root").arg(r);
        if force_debian && (args.contains(&"-i") || args.contains(&"-U")) {
            c.arg("--force-debian");
        }
        c.args(args);
        run_ok(&format!("rpm --root {r} {}", args.join(" ")), &mut c)
    };
    rpm(&["--initdb"]);
    // No /bin/sh, useradd or systemd in an empty root: the scriptlets are not run here (their
    // logic is run with stand-ins by `maintainer_scripts_*` below).
    rpm(&["-i", "--nodeps", "--noscripts", rpm_path]);
    assert_eq!(
        rpm(&["-q", "vmesh"]).trim(),
        format!("vmesh-{VERSION}-1.{}", std::env::consts::ARCH)
    );

    let at = |path: &str| root.path().join(path.trim_start_matches('/'));
    let bin = fs::metadata(at("/usr/bin/vmesh")).expect("usr/bin/vmesh installed");
    assert_eq!(bin.mode() & 0o7777, 0o755);
    assert_eq!(read(&at("/etc/vmesh/vmesh.toml")), read(&repo("packaging/vmesh.toml")));
    assert_eq!(
        read(&at("/usr/lib/systemd/system/vmesh.service")),
        read(&repo("systemd/vmesh.service"))
    );
    assert_eq!(
        read(&at("/usr/lib/systemd/system/vmesh.socket")),
        read(&repo("systemd/vmesh.socket"))
    );
    let out = run_ok(
        "the rpm's vmesh check-config on the rpm's config",
        Command::new(at("/usr/bin/vmesh"))
            .args(["check-config", "--config"])
            .arg(at("/etc/vmesh/vmesh.toml")),
    );
    assert!(out.starts_with("ok:"), "{out}");

    // %config(noreplace): a local edit survives a reinstall and is saved as .rpmsave on erase.
    let edited = format!(
        "{}\n# edited by the packaging test\n",
        read(&at("/etc/vmesh/vmesh.toml"))
    );
    fs::write(at("/etc/vmesh/vmesh.toml"), &edited).expect("edit config");
    rpm(&["-U", "--replacepkgs", "--nodeps", "--noscripts", rpm_path]);
    assert_eq!(
        read(&at("/etc/vmesh/vmesh.toml")),
        edited,
        "local edit lost by rpm -U --replacepkgs"
    );
    rpm(&["-e", "--nodeps", "--noscripts", "vmesh"]);
    assert!(!at("/usr/bin/vmesh").exists(), "rpm -e left usr/bin/vmesh");
    assert_eq!(
        read(&at("/etc/vmesh/vmesh.toml.rpmsave")),
        edited,
        "rpm -e saves the edited config"
    );
}

// === maintainer scripts, run with stand-ins ===

#[test]
fn maintainer_scripts_are_valid_shell() {
    let scripts = [
        "packaging/deb/postinst",
        "packaging/deb/prerm",
        "packaging/deb/postrm",
        "packaging/rpm/pre.sh",
        "packaging/rpm/post.sh",
        "packaging/rpm/preun.sh",
        "packaging/rpm/postun.sh",
        "packaging/rpm/posttrans.sh",
    ];
    for s in scripts {
        run_ok(&format!("sh -n {s}"), cmd("sh").arg("-n").arg(repo(s)));
    }
    for s in ["packaging/build.sh", "scripts/install-packaging-deps.sh"] {
        run_ok(&format!("bash -n {s}"), cmd("bash").arg("-n").arg(repo(s)));
    }
}

/// The rpm scriptlets with stand-ins for getent/useradd/groupadd/systemctl that log their
/// arguments: a first install creates the group and the user; an upgrade only marks the restart
/// for %posttrans; without systemd running no systemctl is called.
#[test]
fn maintainer_scripts_rpm_logic_with_stand_ins() {
    let dir = tempdir();
    let bin = dir.path().join("bin");
    fs::create_dir(&bin).expect("mkdir bin");
    let log = dir.path().join("calls.log");
    let users = dir.path().join("users");
    fs::create_dir(&users).expect("mkdir users");
    let stub = |name: &str, body: &str| {
        let path = bin.join(name);
        fs::write(
            &path,
            format!("#!/bin/sh\necho \"{name} $*\" >> {}\n{body}\n", log.display()),
        )
        .expect("write stub");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod stub");
    };
    // getent DB NAME: known when a file users/DB-NAME exists.
    stub("getent", &format!("[ -e {}/\"$1-$2\" ]", users.display()));
    stub("groupadd", &format!("touch {}/\"group-$2\"", users.display()));
    stub(
        "useradd",
        &format!("for a; do last=$a; done; touch {}/\"passwd-$last\"", users.display()),
    );
    stub("systemctl", "exit 0");
    stub("install", "exit 0");
    let run = |script: &str, arg: &str| {
        let out = Command::new("/bin/sh")
            .arg(repo(&format!("packaging/rpm/{script}")))
            .arg(arg)
            .env("PATH", format!("{}:/usr/bin:/bin", bin.display()))
            .stdin(Stdio::null())
            .output()
            .expect("run scriptlet");
        assert!(out.status.success(), "{}", describe(script, &out));
        let calls = fs::read_to_string(&log).unwrap_or_default();
        let _ = fs::remove_file(&log);
        calls
    };
    let calls = run("pre.sh", "1");
    assert!(calls.contains("groupadd -r vmesh"), "{calls}");
    assert!(
        calls.contains("useradd -r -g vmesh -d /var/lib/vmesh -M -s /sbin/nologin"),
        "{calls}"
    );
    // Idempotent: the user exists now, nothing is created again.
    let calls = run("pre.sh", "1");
    assert!(!calls.contains("useradd") && !calls.contains("groupadd"), "{calls}");

    let systemd_running = Path::new("/run/systemd/system").exists();
    for (script, arg) in [
        ("post.sh", "1"),
        ("post.sh", "2"),
        ("preun.sh", "0"),
        ("postun.sh", "0"),
    ] {
        let calls = run(script, arg);
        assert_eq!(calls.contains("systemctl"), systemd_running, "{script} {arg}: {calls}");
        if script == "post.sh" {
            for dir in ["/var/lib/vmesh", "/var/log/vmesh"] {
                assert!(
                    calls.contains(&format!("install -d -o vmesh -g vmesh -m 0750 {dir}")),
                    "{calls}"
                );
            }
        }
    }

    // Upgrade: %pre marks, %posttrans restarts (with systemd) and clears the mark.
    let rpm_state = Path::new("/var/lib/rpm-state");
    let rpm_state_existed = rpm_state.exists();
    let marker = Path::new("/var/lib/rpm-state/vmesh/restart");
    run("pre.sh", "2");
    assert!(marker.exists(), "%pre of an upgrade marks the restart");
    let calls = run("posttrans.sh", "");
    assert!(!marker.exists(), "%posttrans clears the mark");
    assert_eq!(
        calls.contains("systemctl try-restart vmesh.service"),
        systemd_running,
        "{calls}"
    );
    let calls = run("posttrans.sh", "");
    assert!(
        !calls.contains("systemctl"),
        "no restart after a fresh install: {calls}"
    );
    if !rpm_state_existed {
        let _ = fs::remove_dir(rpm_state);
    }
}

// === systemd units ===

/// A root for `systemd-analyze --root`: the host's unit directory (for the targets), /bin/kill,
/// and the .deb extracted over it (so /usr/bin/vmesh and the units are the packaged ones).
fn analyze_root() -> tempfile::TempDir {
    let root = tempdir();
    let lib = root.path().join("lib/systemd");
    fs::create_dir_all(&lib).expect("mkdir lib/systemd");
    run_ok(
        "copy the host's units",
        cmd("cp").args(["-a", "/lib/systemd/system"]).arg(&lib),
    );
    for f in ["vmesh.service", "vmesh.socket"] {
        let _ = fs::remove_file(lib.join("system").join(f));
    }
    fs::create_dir_all(root.path().join("bin")).expect("mkdir bin");
    fs::copy("/bin/kill", root.path().join("bin/kill")).expect("copy /bin/kill");
    run_ok(
        "dpkg-deb -x into the analyze root",
        cmd("dpkg-deb").arg("-x").arg(&packages().deb).arg(root.path()),
    );
    root
}

#[test]
fn systemd_analyze_verify_passes_on_the_units() {
    let root = analyze_root();
    let r = format!("--root={}", root.path().display());
    let out = cmd("systemd-analyze")
        .args(["verify", "--man=no", &r, "vmesh.service", "vmesh.socket"])
        .output()
        .expect("run systemd-analyze verify");
    assert!(out.status.success(), "{}", describe("systemd-analyze verify", &out));
    // Unknown keys and bad values are only warnings to verify: there must be none.
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(all.trim().is_empty(), "systemd-analyze verify warned:\n{all}");

    // The harness catches a broken unit (a missing binary, an unknown key).
    let broken = root.path().join("etc/systemd/system/vmesh-broken.service");
    fs::create_dir_all(broken.parent().expect("parent")).expect("mkdir etc/systemd/system");
    fs::write(
        &broken,
        read(&repo("systemd/vmesh.service"))
            .replace("ExecStart=/usr/bin/vmesh run", "ExecStart=/usr/bin/vmesh-missing run")
            .replace("[Service]\n", "[Service]\nNoSuchKey=1\n"),
    )
    .expect("write broken unit");
    let out = cmd("systemd-analyze")
        .args(["verify", "--man=no", &r, "vmesh-broken.service"])
        .output()
        .expect("run systemd-analyze verify");
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !out.status.success(),
        "verify passed a unit with a missing ExecStart binary:\n{all}"
    );
    assert!(
        all.contains("NoSuchKey"),
        "verify did not report the unknown key:\n{all}"
    );

    // The service works without the socket; the socket feeds the service.
    let service = read(&repo("systemd/vmesh.service"));
    for line in service.lines() {
        let key = line.split('=').next().unwrap_or("");
        assert!(
            !(["Requires", "BindsTo", "Requisite", "Sockets", "Wants"].contains(&key) && line.contains("vmesh.socket")),
            "vmesh.service must not depend on vmesh.socket: {line}"
        );
    }
    for needle in [
        "Type=notify",
        "WatchdogSec=30s",
        "ExecStartPre=/usr/bin/vmesh check-config --config /etc/vmesh/vmesh.toml",
        "ExecStart=/usr/bin/vmesh run --config /etc/vmesh/vmesh.toml",
        "ExecReload=/usr/bin/vmesh check-config --config /etc/vmesh/vmesh.toml",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=vmesh",
        "User=vmesh",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "SystemCallFilter=@system-service",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
    ] {
        assert!(service.lines().any(|l| l == needle), "vmesh.service lacks `{needle}`");
    }
    let socket = read(&repo("systemd/vmesh.socket"));
    for needle in [
        "Service=vmesh.service",
        "FileDescriptorName=vmesh",
        "WantedBy=sockets.target",
    ] {
        assert!(socket.lines().any(|l| l == needle), "vmesh.socket lacks `{needle}`");
    }
}

/// TimeoutStopSec must leave the agent's drain (agent.drain_timeout, default 30s) room to end.
#[test]
fn stop_timeout_exceeds_the_drain_timeout() {
    let service = read(&repo("systemd/vmesh.service"));
    let stop = service
        .lines()
        .find_map(|l| l.strip_prefix("TimeoutStopSec="))
        .expect("TimeoutStopSec=");
    let secs: u64 = stop.trim_end_matches('s').parse().expect("TimeoutStopSec in seconds");
    assert!(
        secs > 30 + 5,
        "TimeoutStopSec={stop} must exceed drain_timeout 30s + drain_grace 5s"
    );
}

/// The hardening score of `systemd-analyze security` (offline: no running systemd needed).
#[test]
fn systemd_analyze_security_exposure_is_low() {
    let root = analyze_root();
    let out = cmd("systemd-analyze")
        .args(["security", "--offline=true", "--no-pager", "--threshold=20"])
        .arg(format!("--root={}", root.path().display()))
        .arg("vmesh.service")
        .output()
        .expect("run systemd-analyze security");
    let text = String::from_utf8_lossy(&out.stdout);
    let overall = text
        .lines()
        .find(|l| l.contains("Overall exposure level for vmesh.service"))
        .unwrap_or_else(|| panic!("{}", describe("systemd-analyze security", &out)))
        .to_owned();
    eprintln!("{overall}");
    assert!(
        out.status.success(),
        "exposure above 2.0: {}",
        describe("systemd-analyze security", &out)
    );
    let score: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("cannot parse: {overall}"));
    assert!(score <= 2.0, "{overall}");
}

// === under a real systemd: the .deb in a container booted over this machine's root ===

/// The script the container's systemd runs (as `vmesh-probe.service`) once booted: installs the
/// .deb with systemd running, drives vmesh.service and vmesh.socket with systemctl, sends
/// requests across restarts, and writes `key=value` results to /probe/out/result.
const CONTAINER_PROBE: &str = r#"#!/bin/bash
out=/probe/out/result
r() { echo "$1=$2" >> "$out"; }
r pid1 "$(cat /proc/1/comm)"
DEBIAN_FRONTEND=noninteractive dpkg -i /pkgs/vmesh.deb >/dev/null 2>&1; r install_rc $?
r enabled_after_install "$(systemctl is-enabled vmesh.service)"
r active_after_install "$(systemctl is-active vmesh.service)"
# A short watchdog for the test: with WatchdogSec=3s, an agent that does not ping is killed.
mkdir -p /etc/systemd/system/vmesh.service.d
printf '[Service]\nWatchdogSec=3s\n' > /etc/systemd/system/vmesh.service.d/test-watchdog.conf
systemctl daemon-reload
systemctl start vmesh.service; r start_rc $?
r start_state "$(systemctl show -p ActiveState --value vmesh.service)"
r live "$(curl -s -o /dev/null -w '%{http_code}' -m 5 http://127.0.0.1:9901/live)"
r state_owner "$(stat -c %U:%G /var/lib/vmesh)"
r state_files "$(find /var/lib/vmesh -mindepth 1 | wc -l)"
pid=$(systemctl show -p MainPID --value vmesh.service)
sleep 8
r watchdog_restarts "$(systemctl show -p NRestarts --value vmesh.service)"
r watchdog_same_pid "$([ "$pid" = "$(systemctl show -p MainPID --value vmesh.service)" ] && echo yes || echo no)"
rm -r /etc/systemd/system/vmesh.service.d; systemctl daemon-reload
systemctl reload vmesh.service; r reload_rc $?
cp /etc/vmesh/vmesh.toml /tmp/good.toml
echo 'no_such_key = 1' >> /etc/vmesh/vmesh.toml
systemctl reload vmesh.service >/dev/null 2>&1; r bad_reload_rc $?
r bad_reload_state "$(systemctl is-active vmesh.service)"
cp /tmp/good.toml /etc/vmesh/vmesh.toml

# A config with an inbound and an outbound listener, an app behind them.
cat > /etc/vmesh/vmesh.toml <<'TOML'
[agent]
node = "probe"
[inbound]
listen = "127.0.0.1:15006"
app = "127.0.0.1:18080"
[[outbound]]
service = "orders"
listen = "127.0.0.1:15001"
endpoints = ["127.0.0.1:18080"]
TOML
/usr/bin/python3 -m http.server 18080 --bind 127.0.0.1 >/dev/null 2>&1 &
load() {  # $1: name, $2: seconds of sequential requests through the outbound port
  local fails=0 ok=0 end=$((SECONDS+$2))
  while [ $SECONDS -lt $end ]; do
    if curl -s -f -m 10 -o /dev/null http://127.0.0.1:15001/; then ok=$((ok+1)); else fails=$((fails+1)); fi
  done
  r "${1}_ok" $ok; r "${1}_fails" $fails
}
systemctl restart vmesh.service
load self_bound 8 & l=$!; sleep 2; systemctl restart vmesh.service; sleep 2; systemctl restart vmesh.service; wait $l

# Switch to socket activation as docs/install.md says.
mkdir -p /etc/systemd/system/vmesh.socket.d
printf '[Socket]\nListenStream=\nListenStream=127.0.0.1:15006\nListenStream=127.0.0.1:15001\n' \
  > /etc/systemd/system/vmesh.socket.d/ports.conf
systemctl daemon-reload
systemctl stop vmesh.service
systemctl enable --now vmesh.socket >/dev/null 2>&1; r socket_rc $?
systemctl start vmesh.service; r socket_service_rc $?
r adopted "$(journalctl -u vmesh.service --no-pager | grep -c 'passed by systemd')"
load socket_restart 8 & l=$!; sleep 2; systemctl restart vmesh.service; sleep 2; systemctl restart vmesh.service; wait $l
pid=$(systemctl show -p MainPID --value vmesh.service)
load socket_upgrade 6 & l=$!; sleep 2
DEBIAN_FRONTEND=noninteractive dpkg -i --force-confold /pkgs/vmesh.deb >/dev/null 2>&1; r upgrade_rc $?
wait $l
r upgrade_restarted "$([ "$pid" != "$(systemctl show -p MainPID --value vmesh.service)" ] && echo yes || echo no)"
r upgrade_enabled "$(systemctl is-enabled vmesh.service)"
systemctl stop vmesh.service 2>/dev/null
r reactivated "$(curl -s -o /dev/null -w '%{http_code}' -m 10 http://127.0.0.1:15001/)"

DEBIAN_FRONTEND=noninteractive dpkg -r vmesh >/dev/null 2>&1; r remove_rc $?
r removed_service "$(systemctl is-active vmesh.service)"
r removed_socket "$(systemctl is-active vmesh.socket)"
DEBIAN_FRONTEND=noninteractive dpkg --purge vmesh >/dev/null 2>&1; r purge_rc $?
r purged_wants "$(ls /etc/systemd/system/*.wants/ | grep -c vmesh)"
r purged_user "$(getent passwd vmesh | wc -l)"
journalctl -u vmesh.service -u vmesh.socket --no-pager | grep -v '"direction"' > /probe/out/journal.txt
r done yes
"#;

/// Unmounts the container's overlay and tmpfs when dropped.
struct Mounts(Vec<PathBuf>);

impl Drop for Mounts {
    fn drop(&mut self) {
        for m in self.0.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// Boots this machine's own root file system (an overlay whose writes go to a tmpfs) as a
/// systemd container with its own network, installs the .deb there with systemd running, and
/// checks what the static checks cannot: the hardened unit really runs the agent (Type=notify,
/// watchdog pings, reload refuses an invalid config), the maintainer scripts' systemd branches
/// (enable on install, try-restart on upgrade, stop on remove, purge), and the optional
/// vmesh.socket: restarts and an upgrade under load fail no request.
#[test]
fn deb_runs_under_systemd_in_a_container() {
    assert_root();
    let p = packages();
    let nspawn = require("systemd-nspawn");
    require("curl");
    assert!(
        Path::new("/usr/bin/python3").is_file(),
        "/usr/bin/python3 (the container's demo app) is missing: {INSTALL_HINT}"
    );
    let _system = system_lock();

    let dir = tempdir();
    let base = dir.path().join("tmpfs");
    fs::create_dir(&base).expect("mkdir tmpfs");
    let mut mounts = Mounts(Vec::new());
    run_ok(
        "mount tmpfs",
        cmd("mount").args(["-t", "tmpfs", "-o", "size=2g", "tmpfs"]).arg(&base),
    );
    mounts.0.push(base.clone());
    for d in ["upper", "work", "root", "probe/out", "pkgs"] {
        fs::create_dir_all(base.join(d)).expect("mkdir");
    }
    let root = base.join("root");
    run_ok(
        "mount overlay",
        cmd("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir=/,upperdir={},workdir={}",
                base.join("upper").display(),
                base.join("work").display()
            ))
            .arg(&root),
    );
    mounts.0.push(root.clone());
    let probe = base.join("probe");
    fs::write(probe.join("run.sh"), CONTAINER_PROBE).expect("write probe");
    fs::write(
        probe.join("vmesh-probe.service"),
        "[Unit]\nDescription=vmesh packaging probe\nAfter=basic.target\n\n[Service]\nType=oneshot\n\
         ExecStart=/bin/bash /probe/run.sh\nStandardOutput=file:/probe/out/probe.log\n\
         StandardError=file:/probe/out/probe.err\nExecStopPost=/bin/systemctl --no-block poweroff\n",
    )
    .expect("write probe unit");
    fs::copy(&p.deb, base.join("pkgs/vmesh.deb")).expect("copy the .deb");

    let started = Instant::now();
    let console = fs::File::create(dir.path().join("console.log")).expect("console log");
    let status = Command::new("timeout")
        .arg("300")
        .arg(nspawn)
        .arg("--quiet")
        .arg("-D")
        .arg(&root)
        .args(["--private-network", "--register=no", "--keep-unit"])
        .arg(format!("--machine=vmesh-test-{}", std::process::id()))
        .arg(format!("--bind={}:/probe", probe.display()))
        .arg(format!("--bind-ro={}:/pkgs", base.join("pkgs").display()))
        .arg(format!(
            "--bind-ro={}:/etc/systemd/system/vmesh-probe.service",
            probe.join("vmesh-probe.service").display()
        ))
        .args(["--boot", "--", "--unit=vmesh-probe.service"])
        .stdin(Stdio::null())
        .stdout(console.try_clone().expect("dup"))
        .stderr(console)
        .status()
        .expect("run systemd-nspawn");
    let read_out = |name: &str| fs::read_to_string(probe.join("out").join(name)).unwrap_or_default();
    let result = read_out("result");
    let report = format!(
        "container {status} after {:?}\n--- result ---\n{result}\n--- probe stderr ---\n{}\n--- journal ---\n{}\n\
         --- console (tail) ---\n{}",
        started.elapsed(),
        read_out("probe.err"),
        read_out("journal.txt"),
        fs::read_to_string(dir.path().join("console.log"))
            .unwrap_or_default()
            .lines()
            .rev()
            .take(30)
            .collect::<Vec<_>>()
            .join("\n")
    );
    let get = |key: &str| {
        result
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no `{key}` in the probe's result\n{report}"))
            .to_owned()
    };
    let num = |key: &str| {
        get(key)
            .trim()
            .parse::<u64>()
            .unwrap_or_else(|_| panic!("{key}\n{report}"))
    };
    eprintln!("container {status} after {:?}:\n{result}", started.elapsed());
    assert_eq!(get("done"), "yes", "{report}");
    for (key, want) in [
        ("pid1", "systemd"),
        ("install_rc", "0"),
        // First install: enabled, not started (the VM's config comes first).
        ("enabled_after_install", "enabled"),
        ("active_after_install", "inactive"),
        // Type=notify: `systemctl start` returns once vmesh sent READY=1.
        ("start_rc", "0"),
        ("start_state", "active"),
        ("live", "200"),
        ("state_owner", "vmesh:vmesh"),
        // WatchdogSec=3s and 8 s later no restart: vmesh pings.
        ("watchdog_restarts", "0"),
        ("watchdog_same_pid", "yes"),
        ("reload_rc", "0"),
        ("bad_reload_state", "active"),
        ("socket_rc", "0"),
        ("socket_service_rc", "0"),
        ("upgrade_rc", "0"),
        ("upgrade_restarted", "yes"),
        ("upgrade_enabled", "enabled"),
        // A stopped service with its socket active starts on the next connection.
        ("reactivated", "200"),
        ("remove_rc", "0"),
        ("removed_service", "inactive"),
        ("removed_socket", "inactive"),
        ("purge_rc", "0"),
        ("purged_wants", "0"),
        ("purged_user", "0"),
    ] {
        assert_eq!(get(key), want, "{key}\n{report}");
    }
    assert_ne!(get("bad_reload_rc"), "0", "reload accepted an invalid config\n{report}");
    assert!(num("state_files") > 0, "no state written\n{report}");
    assert!(num("adopted") >= 2, "vmesh did not adopt the sockets\n{report}");
    for load in ["socket_restart", "socket_upgrade"] {
        assert!(num(&format!("{load}_ok")) > 50, "{load}: too few requests\n{report}");
        assert_eq!(num(&format!("{load}_fails")), 0, "{load}: failed requests\n{report}");
    }
    drop(mounts);
}
