//! Ansible from the tests: the `ansible-*` tools run from the workspace root with
//! `ansible/ansible.cfg` and a clean environment, and a finished `ansible-playbook` run read back
//! from its output (PLAY RECAP, the results of a task per host, the lines the playbooks print).
//!
//! A missing tool fails the test naming `scripts/install-ansible-deps.sh`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::{workspace_root, Process};

/// What to run when an Ansible tool is missing.
pub const INSTALL_HINT: &str = "run `bash scripts/install-ansible-deps.sh` (pinned ansible-core and ansible-lint)";

/// The absolute path of the Ansible tool `name` on `PATH`; panics naming the install script.
pub fn tool(name: &str) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| {
            p.metadata()
                .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
                .unwrap_or(false)
        })
        .unwrap_or_else(|| panic!("`{name}` is not installed: {INSTALL_HINT}"))
}

/// A command for the Ansible tool `name`, run from the workspace root with
/// `ansible/ansible.cfg`, no colours, its temp files under `tmp`, and neither proxies nor
/// `VMESH_*` overrides of the developer's shell.
pub fn command(name: &str, tmp: &Path) -> Command {
    let mut cmd = Command::new(tool(name));
    for (key, _) in std::env::vars_os() {
        let key = key.to_string_lossy().into_owned();
        if key.starts_with("VMESH_") || key.to_ascii_lowercase().ends_with("_proxy") {
            cmd.env_remove(key);
        }
    }
    let root = workspace_root();
    cmd.current_dir(&root)
        .env("ANSIBLE_CONFIG", root.join("ansible").join("ansible.cfg"))
        .env("ANSIBLE_NOCOLOR", "1")
        .env("ANSIBLE_FORCE_COLOR", "0")
        .env("ANSIBLE_LOCAL_TEMP", tmp.join("ansible-local"))
        .env("ANSIBLE_REMOTE_TEMP", tmp.join("ansible-remote"))
        .env("PYTHONDONTWRITEBYTECODE", "1");
    cmd
}

/// Runs `ansible-playbook -i <inventory> ansible/<playbook> <args>` with `cmd` (from
/// [`command`], with whatever else the caller set), its output captured under `dir`; kills it
/// and panics with its output if it still runs after `limit`.
pub fn run_playbook(
    mut cmd: Command,
    inventory: &Path,
    playbook: &str,
    args: &[&str],
    dir: &Path,
    limit: Duration,
) -> PlaybookRun {
    cmd.arg("-i")
        .arg(inventory)
        .arg(Path::new("ansible").join(playbook))
        .args(args);
    let name = playbook.trim_end_matches(".yml").to_owned();
    let mut process = Process::spawn(&name, cmd, dir);
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = process.try_exit() {
            break status;
        }
        if Instant::now() >= deadline {
            process.kill();
            panic!(
                "ansible-playbook {playbook} still running after {limit:?}\n--- stdout ---\n{}",
                process.stdout()
            );
        }
        // Paces the poll of a process that runs for minutes; waits for no state.
        std::thread::sleep(Duration::from_millis(100));
    };
    PlaybookRun {
        what: format!("ansible-playbook {playbook} {}", args.join(" ")),
        code: status.code(),
        stdout: process.stdout(),
        stderr: process.stderr(),
    }
}

/// The inventory variables of the fleet tests' hosts: each an instance of "orders" (identity
/// from the file CMDB at `identity_path`, refreshed every 2 s) registered in the Consul double
/// at `consul_url`, one worker thread, a 1 s drain grace and 10 s drain timeout, `/healthz`
/// checked every 500 ms, a 4 s slow start, and the role waiting for `/ready`; then the keys of
/// `extra` (an object), which win.
pub fn orders_vars(consul_url: &str, identity_path: &str, extra: Value) -> Value {
    let mut vars = json!({
        "vmesh_worker_threads": 1,
        "vmesh_drain_grace": "1s",
        "vmesh_drain_timeout": "10s",
        "vmesh_identity": {"service": "orders", "environment": "test", "zone": "z1", "version": "v1"},
        "vmesh_cmdb": {"kind": "file", "path": identity_path, "refresh": "2s"},
        "vmesh_registry_kind": "consul",
        "vmesh_registry_address": consul_url,
        "vmesh_inbound_health_path": "/healthz",
        "vmesh_inbound_health_interval": "500ms",
        "vmesh_inbound_ramp_window": "4s",
        "vmesh_config_overrides": {"registry": {"anti_entropy": "2s", "watch_wait": "5s"}},
        "vmesh_wait_ready": true,
    });
    if let (Some(vars), Value::Object(extra)) = (vars.as_object_mut(), extra) {
        vars.extend(extra);
    }
    vars
}

/// Writes `dir/inventory.yml`: the group `vmesh` with `hosts` (name -> host variables) and
/// `vars`, as JSON (JSON is YAML: the yaml inventory plugin reads it); returns its path.
pub fn write_inventory(dir: &Path, hosts: serde_json::Map<String, Value>, vars: Value) -> PathBuf {
    let inventory = json!({ "all": { "children": { "vmesh": { "hosts": hosts, "vars": vars } } } });
    let path = dir.join("inventory.yml");
    std::fs::write(&path, serde_json::to_string_pretty(&inventory).expect("inventory json")).expect("write inventory");
    path
}

/// A finished `ansible-playbook` run.
#[derive(Debug, Clone)]
pub struct PlaybookRun {
    /// The command line, for messages.
    pub what: String,
    /// The exit code (`None` if killed by a signal).
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl PlaybookRun {
    /// Panics with the output unless the run exited 0 and no host failed or was unreachable.
    pub fn expect_ok(&self) -> &PlaybookRun {
        let recap = self.recap();
        let clean = !recap.is_empty()
            && recap
                .iter()
                .all(|(_, line)| line.contains("unreachable=0") && line.contains("failed=0"));
        assert!(
            self.code == Some(0) && clean,
            "{} failed (exit {:?})\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what,
            self.code,
            self.stdout,
            self.stderr
        );
        self
    }

    /// The PLAY RECAP lines: `(host, line)`.
    pub fn recap(&self) -> Vec<(String, String)> {
        self.stdout
            .split("PLAY RECAP")
            .nth(1)
            .unwrap_or("")
            .lines()
            .filter_map(|l| {
                let (host, rest) = l.split_once(':')?;
                rest.contains("ok=")
                    .then(|| (host.trim().to_owned(), rest.trim().to_owned()))
            })
            .collect()
    }

    /// Byte offset of `needle` in the output; panics with the output when absent.
    pub fn position(&self, needle: &str) -> usize {
        self.stdout
            .find(needle)
            .unwrap_or_else(|| panic!("`{needle}` is not in the output of {}:\n{}", self.what, self.stdout))
    }

    /// Panics with the output unless every one of `steps` is in the output, in that order;
    /// `what` names the run in the message ("the rollout").
    pub fn assert_in_order(&self, what: &str, steps: &[&str]) {
        let positions: Vec<usize> = steps.iter().map(|s| self.position(s)).collect();
        assert!(
            positions.windows(2).all(|w| w[0] < w[1]),
            "{what} did not go host by host ({steps:?} at {positions:?}):\n{}",
            self.stdout
        );
    }

    /// The result lines (`ok: [host]`, `changed: [host]`, ...) of the task or handler named
    /// `task` (in the role or the playbook) for `host`.
    pub fn task_results(&self, task: &str, host: &str) -> Vec<String> {
        let (plain, in_role, tag) = (format!("{task}]"), format!(" : {task}]"), format!("[{host}]"));
        self.stdout
            .replace("RUNNING HANDLER [", "TASK [")
            .split("TASK [")
            .skip(1)
            .filter(|block| {
                let first = block.lines().next().unwrap_or("");
                first.starts_with(&plain) || first.contains(&in_role)
            })
            .flat_map(|block| {
                block
                    .lines()
                    .skip(1)
                    .filter(|l| l.contains(&tag))
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    /// Panics unless the task `task` ran exactly once for `host`, with a result line that
    /// starts with `outcome` (`"changed:"`, `"ok:"`).
    pub fn assert_one_result(&self, task: &str, host: &str, outcome: &str) {
        let results = self.task_results(task, host);
        assert!(
            results.len() == 1 && results[0].starts_with(outcome),
            "{host}: `{task}` should have one `{outcome}` result: {results:?}"
        );
    }

    /// The effective weights the playbooks reported for `host` ("vmesh HOST: serving,
    /// effective weight N").
    pub fn reported_weights(&self, host: &str) -> Vec<u64> {
        let needle = format!("vmesh {host}: serving, effective weight");
        self.stdout
            .match_indices(&needle)
            .filter_map(|(i, _)| {
                self.stdout[i + needle.len()..]
                    .split_whitespace()
                    .next()
                    .and_then(|w| w.parse().ok())
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::PlaybookRun;

    const OUTPUT: &str = "\
PLAY [Roll out] ****

TASK [vmesh : Drain (mark down)] ****
changed: [vm1]

TASK [Wait for health] ****
ok: [vm1]
ok: [vm2]

RUNNING HANDLER [vmesh : Drain (mark down)] ****
changed: [vm2]

TASK [Report] ****
ok: [vm1] => {\"msg\": \"vmesh vm1: serving, effective weight 55 of 100\"}

PLAY RECAP ****
vm1                        : ok=3    changed=1    unreachable=0    failed=0    skipped=0
vm2                        : ok=2    changed=1    unreachable=0    failed=1    skipped=0
";

    fn run(code: i32) -> PlaybookRun {
        PlaybookRun {
            what: "ansible-playbook test.yml".into(),
            code: Some(code),
            stdout: OUTPUT.into(),
            stderr: String::new(),
        }
    }

    #[test]
    fn the_output_is_read_per_task_and_host() {
        let run = run(0);
        assert_eq!(run.recap().len(), 2);
        assert_eq!(run.recap()[1].0, "vm2");
        assert_eq!(run.task_results("Drain (mark down)", "vm1"), ["changed: [vm1]"]);
        assert_eq!(run.task_results("Drain (mark down)", "vm2"), ["changed: [vm2]"]);
        assert_eq!(run.task_results("Wait for health", "vm2"), ["ok: [vm2]"]);
        assert_eq!(run.reported_weights("vm1"), [55]);
        assert!(run.reported_weights("vm2").is_empty());
        run.assert_one_result("Wait for health", "vm1", "ok:");
        run.assert_in_order("the run", &["Drain", "Wait for health", "PLAY RECAP"]);
    }

    #[test]
    #[should_panic(expected = "failed (exit Some(0))")]
    fn a_failed_host_fails_the_run_even_with_exit_0() {
        run(0).expect_ok();
    }

    #[test]
    #[should_panic(expected = "did not go host by host")]
    fn steps_out_of_order_fail() {
        run(0).assert_in_order("the run", &["PLAY RECAP", "Drain"]);
    }
}
