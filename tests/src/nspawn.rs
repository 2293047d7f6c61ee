//! Booted systemd hosts for the packaging and fleet tests: `systemd-nspawn` containers whose
//! root is this machine's own root file system under an overlay (writes go to a tmpfs, so
//! nothing a container does reaches this machine), with systemd as PID 1.
//!
//! [`Overlay::mount`] prepares a root the test can write files into before the boot;
//! [`Overlay::run_to_poweroff`] boots it until its default unit powers it off (a probe script
//! that writes its results to a bound directory); [`Overlay::boot`] boots it in the background
//! for a test that drives it with [`Container::exec`] (`nsenter` into the container's
//! namespaces) and powers it off when dropped. Needs root and `systemd-nspawn`
//! (`scripts/install-packaging-deps.sh`); the caller holds [`crate::packages::host_lock`].

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::packages::{cmd, require, run_ok};

/// The default unit of a background container: basic.target and nothing of this machine's
/// multi-user.target (its nginx, etcd, postgres... would start, and with a shared network
/// namespace they would take this machine's ports).
const HOST_TARGET: &str =
    "[Unit]\nDescription=vmesh test host\nRequires=basic.target\nAfter=basic.target\nAllowIsolate=yes\n";

/// Units of this machine masked in every container: timers (apt-daily would take the dpkg lock
/// in the middle of a test).
const MASKED: &[&str] = &["timers.target", "apt-daily.service", "apt-daily-upgrade.service"];

/// A tmpfs with an overlay of `/` on it: the root of one container. Unmounted when dropped.
pub struct Overlay {
    name: String,
    dir: tempfile::TempDir,
    root: PathBuf,
    mounts: Vec<PathBuf>,
    binds: Vec<String>,
    private_network: bool,
}

impl Overlay {
    /// Mounts a tmpfs and the overlay for the container `name` (also its machine name).
    pub fn mount(name: &str) -> Overlay {
        require("systemd-nspawn");
        let dir = tempfile::Builder::new()
            .prefix(&format!("vmesh-nspawn-{name}-"))
            .tempdir()
            .expect("create the container's directory");
        let base = dir.path().join("tmpfs");
        fs::create_dir(&base).expect("mkdir tmpfs");
        let mut overlay = Overlay {
            name: name.to_owned(),
            root: base.join("root"),
            dir,
            mounts: Vec::new(),
            binds: Vec::new(),
            private_network: false,
        };
        run_ok(
            "mount tmpfs",
            cmd("mount").args(["-t", "tmpfs", "-o", "size=2g", "tmpfs"]).arg(&base),
        );
        overlay.mounts.push(base.clone());
        for d in ["upper", "work", "root"] {
            fs::create_dir_all(base.join(d)).expect("mkdir");
        }
        run_ok(
            "mount overlay",
            cmd("mount")
                .args(["-t", "overlay", "overlay", "-o"])
                .arg(format!(
                    "lowerdir=/,upperdir={},workdir={}",
                    base.join("upper").display(),
                    base.join("work").display()
                ))
                .arg(&overlay.root),
        );
        overlay.mounts.push(overlay.root.clone());
        for unit in MASKED {
            overlay.symlink("/dev/null", &format!("/etc/systemd/system/{unit}"));
        }
        overlay.write("/etc/systemd/system/vmesh-test-host.target", HOST_TARGET, 0o644);
        overlay
    }

    /// The container's root as this machine sees it.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// A scratch directory of this machine that lives as long as the container.
    pub fn scratch(&self) -> &Path {
        self.dir.path()
    }

    /// `path` inside the container, as this machine sees it.
    pub fn path(&self, inside: &str) -> PathBuf {
        self.root.join(inside.trim_start_matches('/'))
    }

    /// Writes `contents` to `inside` (parents created) with `mode`.
    pub fn write(&self, inside: &str, contents: &str, mode: u32) {
        let path = self.path(inside);
        fs::create_dir_all(path.parent().expect("a file has a parent")).expect("mkdir in the container");
        fs::write(&path, contents).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        fs::set_permissions(&path, fs::Permissions::from_mode(mode)).expect("chmod in the container");
    }

    /// A symbolic link `inside` -> `target` (parents created).
    pub fn symlink(&self, target: &str, inside: &str) {
        let path = self.path(inside);
        fs::create_dir_all(path.parent().expect("a link has a parent")).expect("mkdir in the container");
        let _ = fs::remove_file(&path);
        std::os::unix::fs::symlink(target, &path).unwrap_or_else(|e| panic!("symlink {}: {e}", path.display()));
    }

    /// Binds this machine's `host` directory at `inside` (read-write).
    pub fn bind(mut self, host: &Path, inside: &str) -> Overlay {
        self.binds.push(format!("--bind={}:{inside}", host.display()));
        self
    }

    /// Binds this machine's `host` file or directory at `inside`, read-only.
    pub fn bind_ro(mut self, host: &Path, inside: &str) -> Overlay {
        self.binds.push(format!("--bind-ro={}:{inside}", host.display()));
        self
    }

    /// Gives the container its own network namespace (loopback only). Without it the
    /// container shares this machine's network: its ports are this machine's ports.
    pub fn private_network(mut self) -> Overlay {
        self.private_network = true;
        self
    }

    fn nspawn(&self, default_unit: &str, console: &Path) -> Command {
        let mut c = Command::new(require("systemd-nspawn"));
        c.arg("--quiet")
            .arg("-D")
            .arg(&self.root)
            // No systemd-machined here (PID 1 of the test machine is not systemd): no
            // registration, and the container runs in the test's own cgroup.
            .args(["--register=no", "--keep-unit"])
            .arg(format!("--machine={}", self.name));
        if self.private_network {
            c.arg("--private-network");
        }
        let console = fs::File::create(console).expect("create the console log");
        c.args(&self.binds)
            .args(["--boot", "--"])
            .arg(format!("--unit={default_unit}"))
            .stdin(Stdio::null())
            .stdout(console.try_clone().expect("dup the console log"))
            .stderr(console);
        c
    }

    /// Boots the container with `default_unit` as its default target and waits (at most
    /// `limit`) for it to power off; the status of `systemd-nspawn`.
    pub fn run_to_poweroff(&self, default_unit: &str, limit: Duration) -> ExitStatus {
        let mut child = self
            .nspawn(default_unit, &self.console_path())
            .spawn()
            .expect("run systemd-nspawn");
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().expect("wait for systemd-nspawn") {
                return status;
            }
            if Instant::now() >= deadline {
                stop_nspawn(&mut child, Duration::from_secs(30));
                panic!(
                    "container {} still running after {limit:?}\n--- console (tail) ---\n{}",
                    self.name,
                    self.console_tail(30)
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Starts the boot of the container in the background (up to `vmesh-test-host.target`:
    /// basic.target and nothing else); [`Booting::wait`] waits for it. Start several boots
    /// before waiting for the first: they proceed in parallel.
    pub fn boot(self) -> Booting {
        let child = self
            .nspawn("vmesh-test-host.target", &self.console_path())
            .spawn()
            .expect("run systemd-nspawn");
        Booting {
            container: Container {
                overlay: self,
                child: Some(child),
                leader: 0,
            },
        }
    }

    fn console_path(&self) -> PathBuf {
        self.dir.path().join("console.log")
    }

    /// The last `lines` lines of the container's console.
    pub fn console_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(self.console_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }
}

/// The results of a probe container: the `key=value` lines its script wrote, and a report
/// (results, the script's stderr, the console) for assertion messages.
pub struct Probe {
    pub result: String,
    pub report: String,
}

impl Probe {
    /// The value of `key`; panics with the report when the probe did not write it.
    pub fn get(&self, key: &str) -> String {
        self.result
            .lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
            .unwrap_or_else(|| panic!("no `{key}` in the probe's result\n{}", self.report))
            .to_owned()
    }

    /// The value of `key` as a number.
    pub fn num(&self, key: &str) -> u64 {
        self.get(key)
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key} is not a number\n{}", self.report))
    }
}

impl Overlay {
    /// Boots the container to run `script` (bash) once as `vmesh-probe.service` with systemd
    /// up, then power off; the script writes `key=value` lines to /probe/out/result (and may
    /// leave more files in /probe/out, e.g. journal.txt, which the report includes).
    pub fn run_probe(self, script: &str, limit: Duration) -> Probe {
        let probe = self.scratch().join("probe");
        fs::create_dir_all(probe.join("out")).expect("mkdir probe/out");
        fs::write(probe.join("run.sh"), script).expect("write the probe script");
        self.write(
            "/etc/systemd/system/vmesh-probe.service",
            "[Unit]\nDescription=vmesh test probe\nAfter=basic.target\n\n[Service]\nType=oneshot\n\
             ExecStart=/bin/bash /probe/run.sh\nStandardOutput=file:/probe/out/probe.log\n\
             StandardError=file:/probe/out/probe.err\nExecStopPost=/bin/systemctl --no-block poweroff\n",
            0o644,
        );
        let overlay = self.bind(&probe, "/probe");
        let started = Instant::now();
        let status = overlay.run_to_poweroff("vmesh-probe.service", limit);
        let read_out = |name: &str| fs::read_to_string(probe.join("out").join(name)).unwrap_or_default();
        let result = read_out("result");
        let report = format!(
            "container {status} after {:?}\n--- result ---\n{result}\n--- probe stderr ---\n{}\n--- journal ---\n{}\n\
             --- console (tail) ---\n{}",
            started.elapsed(),
            read_out("probe.err"),
            read_out("journal.txt"),
            overlay.console_tail(30)
        );
        eprintln!(
            "container {} {status} after {:?}:\n{result}",
            overlay.name,
            started.elapsed()
        );
        Probe { result, report }
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        for m in self.mounts.iter().rev() {
            let _ = Command::new("umount").arg("-l").arg(m).status();
        }
    }
}

/// A container whose boot was started.
pub struct Booting {
    container: Container,
}

impl Booting {
    /// Waits (at most `limit`) until systemd in the container has reached its default target.
    pub fn wait(mut self, limit: Duration) -> Container {
        let c = &mut self.container;
        let deadline = Instant::now() + limit;
        let mut last = String::new();
        loop {
            if let Some(status) = c.child.as_mut().and_then(|ch| ch.try_wait().ok().flatten()) {
                panic!(
                    "container {} exited {status} while booting\n--- console (tail) ---\n{}",
                    c.overlay.name,
                    c.overlay.console_tail(40)
                );
            }
            if c.leader == 0 {
                c.leader = c.child.as_ref().and_then(|ch| container_leader(ch.id())).unwrap_or(0);
            }
            if c.leader != 0 {
                let out = c.exec(&["systemctl", "is-active", "vmesh-test-host.target"]);
                last = String::from_utf8_lossy(&out.stdout).trim().to_owned();
                if last == "active" {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "container {} not booted after {limit:?} (target: {last:?})\n--- console (tail) ---\n{}",
                c.overlay.name,
                c.overlay.console_tail(40)
            );
            std::thread::sleep(Duration::from_millis(250));
        }
        self.container
    }
}

/// The PID (in this machine's namespace) of the container's PID 1: the child of
/// `systemd-nspawn` that is PID 1 of its own PID namespace.
fn container_leader(nspawn: u32) -> Option<u32> {
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(status) = fs::read_to_string(format!("/proc/{pid}/status")) else {
            continue;
        };
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.split_whitespace().map(str::to_owned).collect::<Vec<_>>())
                .unwrap_or_default()
        };
        let child_of_nspawn = field("PPid:") == [nspawn.to_string()];
        let ns_pid_1 = field("NSpid:").last().is_some_and(|p| p == "1");
        if child_of_nspawn && ns_pid_1 {
            return Some(pid);
        }
    }
    None
}

/// Asks `systemd-nspawn` to power the container off (SIGTERM), SIGKILL after `limit`.
fn stop_nspawn(child: &mut Child, limit: Duration) {
    if matches!(child.try_wait(), Ok(Some(_))) {
        return;
    }
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if matches!(child.try_wait(), Ok(Some(_))) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// A booted container; powered off and unmounted when dropped.
pub struct Container {
    overlay: Overlay,
    child: Option<Child>,
    leader: u32,
}

impl Container {
    pub fn name(&self) -> &str {
        &self.overlay.name
    }

    pub fn overlay(&self) -> &Overlay {
        &self.overlay
    }

    /// The command `nsenter` into every namespace, the root and the working directory of the
    /// container's PID 1, then `argv`: a process of the container (outside its cgroup tree).
    pub fn command(&self, argv: &[&str]) -> Command {
        let mut c = cmd("nsenter");
        c.args(["--target", &self.leader.to_string(), "--all", "--root", "--wd", "--"])
            .args(argv);
        c
    }

    /// Runs `argv` in the container.
    pub fn exec(&self, argv: &[&str]) -> Output {
        self.command(argv)
            .output()
            .unwrap_or_else(|e| panic!("nsenter into {}: {e}", self.overlay.name))
    }

    /// Runs a `/bin/sh -c` script in the container; panics unless it exits 0; its stdout.
    pub fn sh(&self, script: &str) -> String {
        run_ok(
            &format!("in {}: {script}", self.overlay.name),
            &mut self.command(&["/bin/sh", "-c", script]),
        )
    }

    /// A script on this machine that runs the container's `/usr/bin/python3` inside the
    /// container, with its arguments: an `ansible_python_interpreter` that makes a `local`
    /// connection run every module in the container.
    pub fn python_wrapper(&self) -> PathBuf {
        let path = self.overlay.scratch().join("python3-in-container");
        let script = format!(
            "#!/bin/sh\n# Runs python3 inside the container {} (its PID 1 is {} here).\nexec nsenter --target {} --all --root --wd -- /usr/bin/python3 \"$@\"\n",
            self.overlay.name, self.leader, self.leader
        );
        fs::write(&path, script).expect("write the python wrapper");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).expect("chmod the python wrapper");
        path
    }

    /// The journal of `unit` in the container (empty when it cannot be read).
    pub fn journal(&self, unit: &str, lines: usize) -> String {
        let out = self.exec(&[
            "journalctl",
            "--no-pager",
            "-o",
            "short-monotonic",
            "-n",
            &lines.to_string(),
            "-u",
            unit,
        ]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            stop_nspawn(&mut child, Duration::from_secs(60));
        }
    }
}
