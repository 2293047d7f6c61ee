//! The state store on a failing disk (issue 11: "store failures are not corruption"): `data_dir`
//! on a small tmpfs that the test remounts read-only or fills up. The agent keeps proxying, never
//! registers an instance whose drain flag it cannot read, leaves the store's files where they
//! are, and takes the store back without a restart once the disk recovers. Needs root (mount).

use std::path::{Path, PathBuf};
use std::process::Command;

use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{self, all_ids, passing_ids, Identity, PassingWatcher};
use vmesh_tests::{eventually, Agent, Curl, Outbound, Upstream, DEFAULT_WAIT};

/// A tmpfs mounted for the test's data_dir, unmounted when dropped.
struct Tmpfs {
    dir: PathBuf,
    _parent: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(size: &str) -> Tmpfs {
        let parent = tempfile::tempdir().expect("tempdir");
        let dir = parent.path().join("data");
        std::fs::create_dir(&dir).expect("mkdir");
        mount(&["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs", path(&dir)]);
        Tmpfs { dir, _parent: parent }
    }

    fn read_only(&self, ro: bool) {
        let opt = if ro { "remount,ro" } else { "remount,rw" };
        mount(&["-o", opt, path(&self.dir)]);
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

fn path(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn mount(args: &[&str]) {
    let out = Command::new("mount")
        .args(args)
        .output()
        .expect("run mount (needs root)");
    assert!(
        out.status.success(),
        "mount {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn store_error(agent: &Agent) -> Option<String> {
    agent.admin_json("/status")["lifecycle"]["store_error"]
        .as_str()
        .map(str::to_owned)
}

/// An agent with `data_dir` on `disk`, which `fault` has made unusable: the store is reported
/// unusable (`STORE_ERROR`), proxying goes on, the instance counts as drained and registers
/// nothing over several store retries, nothing is moved aside as corrupt; once `clear` ends the
/// fault, the store opens in place and the instance registers, without a restart.
fn survives_a_disk_fault(disk: &Tmpfs, fault: &str, clear: impl FnOnce()) {
    let consul = ConsulDouble::spawn();
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let upstream = Upstream::python("pay").spawn();
    let agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &consul)
        .data_dir(&disk.dir)
        .outbound(Outbound::new("payments").endpoint(upstream.addr()))
        .start();

    let why = eventually(DEFAULT_WAIT, "/status to report the unusable store", || {
        store_error(&agent).ok_or_else(|| agent.admin_json("/status").to_string())
    });
    assert!(why.starts_with("STORE_ERROR"), "{fault}: {why}");
    // Proxying does not need the store.
    let r = Curl::get(agent.outbound_url("payments", "/")).run();
    assert_eq!((r.status, r.header("x-upstream-name")), (200, Some("pay")), "{r}");
    assert_eq!(agent.admin_json("/status")["lifecycle"]["drain"], "drained", "{fault}");
    // Give the registrar several store retries (every 2 s): it must not register meanwhile.
    eventually(DEFAULT_WAIT, &format!("the agent to run 6 s on the {fault}"), || {
        let up = agent.admin_json("/status")["uptime_seconds"].as_u64().unwrap_or(0);
        if up >= 6 {
            Ok(())
        } else {
            Err(format!("uptime {up} s"))
        }
    });
    assert!(store_error(&agent).is_some());
    assert!(
        all_ids(&consul, "orders").is_empty(),
        "{fault}: registered with a store it cannot use"
    );
    let moved_aside = std::fs::read_dir(&disk.dir)
        .expect("list the data dir")
        .filter_map(Result::ok)
        .any(|e| e.file_name().to_string_lossy().contains("corrupt"));
    assert!(!moved_aside, "the {fault} was taken for corruption");

    clear();
    eventually(DEFAULT_WAIT, "the agent to open the store and register", || {
        match (store_error(&agent), passing_ids(&consul, "orders").as_slice()) {
            (None, [id]) if id == "orders-web-01" => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    assert!(disk.dir.join("state").exists(), "the store is created in place");
}

#[test]
fn a_read_only_data_dir_keeps_the_proxy_up_registers_nothing_and_recovers_without_a_restart() {
    let disk = Tmpfs::mount("16m");
    disk.read_only(true);
    survives_a_disk_fault(&disk, "read-only disk", || disk.read_only(false));
}

/// A full disk (ENOSPC) under `data_dir`, as a small tmpfs filled to the last byte, freed by
/// deleting the filler.
#[test]
fn a_full_data_dir_keeps_the_proxy_up_registers_nothing_and_recovers_when_space_is_freed() {
    let disk = Tmpfs::mount("4m");
    let filler = disk.dir.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("create the filler");
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    survives_a_disk_fault(&disk, "full disk", || {
        std::fs::remove_file(&filler).expect("free the space");
    });
}

#[test]
fn a_drained_instance_whose_store_cannot_be_read_at_start_is_never_passing() {
    let consul = ConsulDouble::spawn();
    let disk = Tmpfs::mount("16m");
    let dir = tempfile::tempdir().expect("tempdir");
    let identity = Identity::orders().write_in(dir.path());
    let app = Upstream::python("app").spawn();
    let mut agent = lifecycle::consul(lifecycle::instance("web-01", &identity, app.addr(), "0s"), &consul)
        .data_dir(&disk.dir)
        .start();
    eventually(DEFAULT_WAIT, "registered and passing", || {
        let ids = passing_ids(&consul, "orders");
        if ids == ["orders-web-01"] {
            Ok(())
        } else {
            Err(format!("{ids:?}"))
        }
    });
    let drained = agent.run_cli(&["drain", "--timeout", "20s"]);
    assert!(drained.status.success(), "{drained:?}");
    agent.kill9();
    let before: Vec<String> = passing_ids(&consul, "orders");
    assert!(before.is_empty(), "drained yet passing: {before:?}");

    // Restarted on a read-only disk: the flag cannot be read, so the instance counts as drained.
    disk.read_only(true);
    let watcher = PassingWatcher::start(&consul, "orders");
    agent.restart();
    eventually(DEFAULT_WAIT, "/status to report the unusable store", || {
        store_error(&agent).ok_or_else(|| "no store_error yet".to_owned())
    });
    // The disk comes back: the flag says drained, and drained it stays.
    disk.read_only(false);
    eventually(DEFAULT_WAIT, "the store to be read again", || {
        match store_error(&agent) {
            None => Ok(()),
            Some(e) => Err(e),
        }
    });
    assert_eq!(agent.admin_json("/status")["lifecycle"]["drain"], "drained");
    let seen = watcher.stop();
    assert!(seen.is_empty(), "a drained instance showed as passing: {seen:?}");
    assert!(passing_ids(&consul, "orders").is_empty());
}
