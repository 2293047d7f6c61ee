//! The .deb installed for real: on THIS machine with `dpkg -i` (upgraded, rolled back, removed
//! and purged again; a drop guard purges it whatever happens), and in a `systemd-nspawn`
//! container booted over this machine's root (`vmesh_tests::nspawn`) with systemd as PID 1:
//! the hardened unit runs the agent (Type=notify, watchdog, reload refusing a bad config), the
//! maintainer scripts' systemd branches run, and vmesh.socket restarts and upgrades the agent
//! under load without a failed request.
//!
//! Needs root and the tools of `scripts/install-packaging-deps.sh`; a missing tool fails the
//! test with that command, nothing is skipped.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Output;
use std::time::{Duration, Instant};

use vmesh_tests::nspawn::Overlay;
use vmesh_tests::packages::{
    assert_root, cmd, describe, host_lock, packages, read, repack_with_version, repo, require, run_ok, tempdir,
    INSTALL_HINT, VERSION,
};
use vmesh_tests::{eventually, free_addr, Process, Signal};

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

#[test]
fn deb_installs_upgrades_rolls_back_removes_and_purges_on_this_machine() {
    assert_root();
    let p = packages();
    let deb = p.deb.to_str().expect("utf-8 path");
    let _host = host_lock();
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
# The admin token made at install: root:vmesh 0640; a drain without it is refused, the CLI
# (root, reading the token through the config) drains and undrains.
r token_mode "$(stat -c %a:%U:%G /etc/vmesh/admin.token)"
r token_bytes "$(tr -d '\n' < /etc/vmesh/admin.token | wc -c)"
r drain_without_token "$(curl -s -o /dev/null -w '%{http_code}' -m 5 -X POST http://127.0.0.1:9901/drain)"
/usr/bin/vmesh drain --timeout 20s >/dev/null 2>&1; r cli_drain_rc $?
/usr/bin/vmesh undrain --timeout 20s >/dev/null 2>&1; r cli_undrain_rc $?
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
# The default unit, no socket unit: vmesh hands its sockets to systemd's fd store, so restarts
# refuse nothing either.
systemctl restart vmesh.service
load self_bound 8 & l=$!; sleep 2; systemctl restart vmesh.service; sleep 2; systemctl restart vmesh.service; wait $l
r self_adopted "$(journalctl -u vmesh.service --no-pager | grep -c 'passed by systemd')"

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
/// Boots this machine's own root file system (an overlay whose writes go to a tmpfs) as a
/// systemd container with its own network, installs the .deb there with systemd running, and
/// checks what the static checks cannot: the hardened unit really runs the agent (Type=notify,
/// watchdog pings, reload refuses an invalid config), the maintainer scripts' systemd branches
/// (enable on install, try-restart on upgrade, stop on remove, purge), and the optional
/// vmesh.socket; restarts under load fail no request with the default unit alone (the fd
/// store keeps the sockets) and with vmesh.socket, and neither does an upgrade.
#[test]
fn deb_runs_under_systemd_in_a_container() {
    assert_root();
    let p = packages();
    require("curl");
    assert!(
        Path::new("/usr/bin/python3").is_file(),
        "/usr/bin/python3 (the container's demo app) is missing: {INSTALL_HINT}"
    );
    let _host = host_lock();

    let pkgs = tempdir();
    fs::copy(&p.deb, pkgs.path().join("vmesh.deb")).expect("copy the .deb");
    let probe = Overlay::mount(&format!("vmesh-deb-{}", std::process::id()))
        .private_network()
        .bind_ro(pkgs.path(), "/pkgs")
        .run_probe(CONTAINER_PROBE, Duration::from_secs(300));
    let (get, num, report) = (|k: &str| probe.get(k), |k: &str| probe.num(k), &probe.report);
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
        ("token_mode", "640:root:vmesh"),
        ("token_bytes", "64"),
        ("drain_without_token", "401"),
        ("cli_drain_rc", "0"),
        ("cli_undrain_rc", "0"),
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
    assert!(
        num("self_adopted") >= 2,
        "restarts did not get the stored sockets back\n{report}"
    );
    assert!(num("adopted") >= 2, "vmesh did not adopt the sockets\n{report}");
    for load in ["self_bound", "socket_restart", "socket_upgrade"] {
        assert!(num(&format!("{load}_ok")) > 50, "{load}: too few requests\n{report}");
        assert_eq!(num(&format!("{load}_fails")), 0, "{load}: failed requests\n{report}");
    }
}
