//! The .deb and .rpm as built, without installing them: `packaging/build.sh` builds them once
//! (`vmesh_tests::packages`), `dpkg-deb` inspects the .deb's files and control data, the shipped
//! config is valid (with every commented key uncommented too), `lintian` reports no error, the
//! maintainer scripts are valid shell, and `systemd-analyze` verifies the units and scores their
//! hardening (offline, no running systemd needed).
//!
//! Needs the tools of `scripts/install-packaging-deps.sh` (root for the build's tools only);
//! a missing tool fails the test with that command, nothing is skipped.
//! `VMESH_PACKAGING_REBUILD=1` forces a rebuild.

use std::collections::BTreeSet;
use std::fs;
use std::process::Command;

use vmesh_tests::packages::{cmd, describe, packages, read, repo, run_ok, tempdir, VERSION};

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

// === maintainer scripts ===

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

/// The unit's resource bounds fit the proxy's limits: two descriptors per connection for the
/// default `proxy.max_connections` on a dozen listeners, and memory and tasks bounded.
#[test]
fn the_unit_bounds_files_memory_and_tasks() {
    let service = read(&repo("systemd/vmesh.service"));
    let value = |key: &str| {
        service
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("{key}= missing in vmesh.service"))
            .to_owned()
    };
    let nofile: u64 = value("LimitNOFILE").parse().expect("LimitNOFILE is a number");
    assert!(
        nofile >= 2 * 10_000 * 12,
        "LimitNOFILE={nofile}: below 2 x 10,000 x 12 listeners"
    );
    for key in ["MemoryHigh", "MemoryMax", "TasksMax"] {
        assert!(!value(key).is_empty(), "{key}");
    }
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
