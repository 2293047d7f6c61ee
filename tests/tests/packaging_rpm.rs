//! The .rpm: its metadata, files and scriptlets as built (`rpm -qp`), installed into an empty
//! root with `rpm --root` (files, %config(noreplace)), the scriptlets' logic with stand-ins for
//! getent/useradd/systemctl, and the scriptlets run FOR REAL by Debian's `rpm` in a
//! `systemd-nspawn` container booted over this machine's root with systemd as PID 1 (install,
//! upgrade to the next release, erase): the user, the directories and the unit states.
//!
//! Needs root and the tools of `scripts/install-packaging-deps.sh`; a missing tool fails the
//! test with that command, nothing is skipped.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use vmesh_tests::nspawn::Overlay;
use vmesh_tests::packages::{
    assert_root, cmd, describe, host_lock, packages, read, repo, require, run_ok, tempdir, VERSION,
};

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
    // No /bin/sh, useradd or systemd in an empty root: the scriptlets are not run here (they run
    // for real in `rpm_scriptlets_run_under_systemd_in_a_container`, with stand-ins below).
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

// === the scriptlets for real: Debian's rpm in a container booted with systemd ===

/// The next release of the .rpm (same version, release 2, same files): generated by
/// `cargo generate-rpm` from agent/Cargo.toml's metadata with `release = "2"` and the stripped
/// binary taken from the .deb (packaging/build.sh removes its staging copy).
fn next_release_rpm(dir: &Path) -> std::path::PathBuf {
    let p = packages();
    let x = dir.join("deb");
    run_ok("dpkg-deb -x", cmd("dpkg-deb").arg("-x").arg(&p.deb).arg(&x));
    let manifest: toml::Value = toml::from_str(&read(&repo("agent/Cargo.toml"))).expect("agent/Cargo.toml");
    let mut meta = manifest["package"]["metadata"]["generate-rpm"].clone();
    meta["release"] = toml::Value::String("2".into());
    let binary = x.join("usr/bin/vmesh").display().to_string();
    let assets = meta["assets"].as_array_mut().expect("generate-rpm assets");
    let mut replaced = 0;
    for asset in assets.iter_mut() {
        if asset["dest"].as_str() == Some("/usr/bin/vmesh") {
            asset["source"] = toml::Value::String(binary.clone());
            replaced += 1;
        }
    }
    assert_eq!(replaced, 1, "one /usr/bin/vmesh asset in agent/Cargo.toml");
    let overwrite = dir.join("release-2.toml");
    fs::write(&overwrite, toml::to_string(&meta).expect("serialize the rpm metadata")).expect("write the overwrite");
    let arch = run_ok("uname -m", cmd("uname").arg("-m"));
    let out = dir.join(format!("vmesh-{VERSION}-2.{}.rpm", arch.trim()));
    let mut c = Command::new("cargo");
    c.current_dir(vmesh_tests::workspace_root())
        .args(["generate-rpm", "-p", "agent", "--metadata-overwrite"])
        .arg(&overwrite)
        .arg("--output")
        .arg(&out)
        .stdin(Stdio::null());
    require("cargo-generate-rpm");
    run_ok("cargo generate-rpm (release 2)", &mut c);
    out
}

/// Runs in the container (systemd is PID 1) as `vmesh-probe.service`. Debian's rpm installs
/// with `--force-debian`, and `--nodeps`: no package in its (empty) database provides /bin/sh,
/// shadow-utils or libc, which Debian's dpkg owns here.
const RPM_PROBE: &str = r#"#!/bin/bash
out=/probe/out/result
r() { echo "$1=$2" >> "$out"; }
rpmi() { rpm --force-debian --nodeps "$@" >> /probe/out/rpm.log 2>&1; }
r pid1 "$(cat /proc/1/comm)"
r systemd_running "$([ -d /run/systemd/system ] && echo yes || echo no)"
r user_before "$(getent passwd vmesh | wc -l)"
rpm --initdb; rpmi -i /pkgs/vmesh.rpm; r install_rc $?
r installed "$(rpm -q --qf '%{VERSION}-%{RELEASE}' vmesh)"
pw="$(getent passwd vmesh)"
r user_home_shell "$(echo "$pw" | cut -d: -f6,7)"
r user_uid "$(echo "$pw" | cut -d: -f3)"
r user_group "$(id -gn vmesh)"
r state_dir "$(stat -c '%U:%G %a' /var/lib/vmesh)"
r log_dir "$(stat -c '%U:%G %a' /var/log/vmesh)"
r enabled_after_install "$(systemctl is-enabled vmesh.service)"
r active_after_install "$(systemctl is-active vmesh.service)"
r socket_after_install "$(systemctl is-enabled vmesh.socket)"
systemctl start vmesh.service; r start_rc $?
r live "$(curl -s -o /dev/null -w '%{http_code}' -m 5 http://127.0.0.1:9901/live)"
r token_mode "$(stat -c %a:%U:%G /etc/vmesh/admin.token)"
r drain_without_token "$(curl -s -o /dev/null -w '%{http_code}' -m 5 -X POST http://127.0.0.1:9901/drain)"
pid=$(systemctl show -p MainPID --value vmesh.service)
rpmi -U /pkgs/vmesh-next.rpm; r upgrade_rc $?
r upgraded "$(rpm -q --qf '%{VERSION}-%{RELEASE}' vmesh)"
r upgrade_restarted "$([ "$pid" != "$(systemctl show -p MainPID --value vmesh.service)" ] && echo yes || echo no)"
r upgrade_active "$(systemctl is-active vmesh.service)"
r upgrade_enabled "$(systemctl is-enabled vmesh.service)"
r upgrade_mark_left "$([ -e /var/lib/rpm-state/vmesh ] && echo yes || echo no)"
r upgrade_uid "$(id -u vmesh)"
rpmi -e vmesh; r erase_rc $?
r erased_active "$(systemctl is-active vmesh.service)"
r erased_wants "$(ls /etc/systemd/system/*.wants/ | grep -c vmesh)"
r erased_bin "$([ -e /usr/bin/vmesh ] && echo yes || echo no)"
r erased_unit "$([ -e /usr/lib/systemd/system/vmesh.service ] && echo yes || echo no)"
r erased_etc "$([ -e /etc/vmesh ] && echo yes || echo no)"
r kept_state "$([ -d /var/lib/vmesh ] && echo yes || echo no)"
r kept_user "$(getent passwd vmesh | wc -l)"
journalctl -u vmesh.service --no-pager | grep -v '"direction"' > /probe/out/journal.txt
{ echo "--- rpm output ---"; cat /probe/out/rpm.log; } >> /probe/out/journal.txt
r done yes
"#;

/// The rpm scriptlets for real, under systemd: %pre creates the system user and group, %post
/// the directories and enables (does not start) vmesh.service; an upgrade to the next release
/// restarts the running agent in %posttrans and clears its mark; an erase stops and disables
/// the units (%preun), keeps the state and the user (RPM has no purge) and removes the empty
/// /etc/vmesh (%postun).
#[test]
fn rpm_scriptlets_run_under_systemd_in_a_container() {
    assert_root();
    require("rpm");
    let p = packages();
    let pkgs = tempdir();
    fs::copy(&p.rpm, pkgs.path().join("vmesh.rpm")).expect("copy the .rpm");
    let next = next_release_rpm(pkgs.path());
    fs::rename(&next, pkgs.path().join("vmesh-next.rpm")).expect("stage the next release");
    let _host = host_lock();
    assert!(
        !Path::new("/var/lib/rpm/vmesh").exists(),
        "this machine's rpm database must not hold vmesh"
    );
    let probe = Overlay::mount(&format!("vmesh-rpm-{}", std::process::id()))
        .private_network()
        .bind_ro(pkgs.path(), "/pkgs")
        .run_probe(RPM_PROBE, Duration::from_secs(300));
    let report = &probe.report;
    assert_eq!(probe.get("done"), "yes", "{report}");
    for (key, want) in [
        ("pid1", "systemd"),
        ("systemd_running", "yes"),
        ("user_before", "0"),
        ("install_rc", "0"),
        ("installed", &format!("{VERSION}-1")),
        ("user_home_shell", "/var/lib/vmesh:/sbin/nologin"),
        ("user_group", "vmesh"),
        ("state_dir", "vmesh:vmesh 750"),
        ("log_dir", "vmesh:vmesh 750"),
        // %post of a first install: enabled, not started; the socket is left alone.
        ("enabled_after_install", "enabled"),
        ("active_after_install", "inactive"),
        ("socket_after_install", "disabled"),
        ("start_rc", "0"),
        ("live", "200"),
        ("token_mode", "640:root:vmesh"),
        ("drain_without_token", "401"),
        ("upgrade_rc", "0"),
        ("upgraded", &format!("{VERSION}-2")),
        // %pre marked the upgrade, %posttrans restarted the running agent and cleared the mark.
        ("upgrade_restarted", "yes"),
        ("upgrade_active", "active"),
        ("upgrade_enabled", "enabled"),
        ("upgrade_mark_left", "no"),
        ("erase_rc", "0"),
        ("erased_active", "inactive"),
        ("erased_wants", "0"),
        ("erased_bin", "no"),
        ("erased_unit", "no"),
        ("erased_etc", "no"),
        ("kept_state", "yes"),
        ("kept_user", "1"),
    ] {
        assert_eq!(probe.get(key), want, "{key}\n{report}");
    }
    let uid = probe.num("user_uid");
    assert!(uid < 1000, "vmesh is a system user (uid {uid})\n{report}");
    assert_eq!(probe.num("upgrade_uid"), uid, "the upgrade kept the user\n{report}");
}
