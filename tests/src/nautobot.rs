//! The real Nautobot that `scripts/nautobot.sh` installs, starts and seeds (PostgreSQL + Redis +
//! the Nautobot web server on 127.0.0.1:8089).
//!
//! Tests never skip when Nautobot is down: [`Nautobot::require`] fails with the command to run.
//! Changes a test makes go through the script (`set-field`, `stop`, `start`) and are undone by
//! drop guards ([`RestoreGuard`], [`OutageGuard`]) even when the test fails. The instance is
//! shared by every test of the process, so tests that use it hold [`Nautobot::exclusive`].
//!
//! Seeded VMs (tests/fixtures/nautobot/seed.py): `web-01` (orders/prod/z1/v3, weight 100, blue,
//! team-a), `web-02` (no vmesh_zone: the zone falls back to the cluster location `dc1-z1`,
//! weight 50, green), `old-01` (status Decommissioning), `bad-01` (empty vmesh_service).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::Duration;

use crate::http::Curl;
use crate::workspace_root;

/// The default URL (`NAUTOBOT_URL` overrides it).
pub const DEFAULT_URL: &str = "http://127.0.0.1:8089";
/// The fixed token of the test instance (`NAUTOBOT_TOKEN` overrides it).
pub const DEFAULT_TOKEN: &str = "0123456789abcdef0123456789abcdef01234567";

const HINT: &str = "start it with `bash scripts/nautobot.sh install && bash scripts/nautobot.sh start && \
                    bash scripts/nautobot.sh seed` (as root), or run `bash scripts/test.sh`";

/// How the tests reach Nautobot.
#[derive(Debug, Clone)]
pub struct Nautobot {
    url: String,
    token: String,
}

impl Nautobot {
    /// The instance of `NAUTOBOT_URL`/`NAUTOBOT_TOKEN` (defaults: the script's); panics with the
    /// command to run unless its API answers 200 with the token.
    pub fn require() -> Nautobot {
        let nb = Nautobot {
            url: std::env::var("NAUTOBOT_URL").unwrap_or_else(|_| DEFAULT_URL.to_string()),
            token: std::env::var("NAUTOBOT_TOKEN").unwrap_or_else(|_| DEFAULT_TOKEN.to_string()),
        };
        let r = nb.api_get("/api/status/");
        assert!(
            r.exit_code == 0 && r.status == 200,
            "Nautobot does not answer at {} (curl exit {}, HTTP {}): {HINT}",
            nb.url,
            r.exit_code,
            r.status
        );
        nb
    }

    /// Serializes the tests of this process that use (or stop, or change) the shared instance.
    pub fn exclusive() -> MutexGuard<'static, ()> {
        static LOCK: OnceLock<Mutex<()>> = OnceLock::new();
        LOCK.get_or_init(|| Mutex::new(()))
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    /// The shared instance held for this test alone ([`Nautobot::exclusive`]), answering
    /// ([`Nautobot::require`]), with web-01 as seeded ([`Nautobot::require_web01_seeded`]).
    pub fn exclusive_seeded() -> (MutexGuard<'static, ()>, Nautobot) {
        let lock = Nautobot::exclusive();
        let nb = Nautobot::require();
        nb.require_web01_seeded();
        (lock, nb)
    }

    /// The API root, for `[cmdb] url`.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The API token.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Writes the token to `dir/nautobot.token` (for `[cmdb] token_file`) and returns the path.
    pub fn token_file(&self, dir: &Path) -> PathBuf {
        let path = dir.join("nautobot.token");
        std::fs::write(&path, format!("{}\n", self.token)).expect("write the Nautobot token file");
        path
    }

    /// `GET <path>` on the API with the token.
    pub fn api_get(&self, path: &str) -> crate::CurlResponse {
        Curl::get(format!("{}{path}", self.url))
            .header(&format!("Authorization: Token {}", self.token))
            .header("Accept: application/json")
            .args(["--max-time", "20"])
            .run()
    }

    /// The custom fields of VM `vm` as Nautobot has them now.
    pub fn custom_fields(&self, vm: &str) -> serde_json::Value {
        let r = self.api_get(&format!("/api/virtualization/virtual-machines/?name={vm}"));
        r.expect_status(200);
        let doc = r.json();
        let results = doc["results"]
            .as_array()
            .unwrap_or_else(|| panic!("no results array for {vm}: {doc}"));
        assert_eq!(results.len(), 1, "expected one VM named {vm}: {doc}");
        results[0]["custom_fields"].clone()
    }

    /// The status name of VM `vm` (`Active`, `Decommissioning`, ...).
    pub fn vm_status(&self, vm: &str) -> String {
        let r = self.api_get(&format!("/api/virtualization/virtual-machines/?name={vm}&depth=1"));
        r.expect_status(200);
        let doc = r.json();
        doc["results"][0]["status"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("no status name for {vm}: {doc}"))
            .to_string()
    }

    /// Panics with the command to run unless the seeded custom field `key` of `vm` is `want`
    /// (a previous run that died mid-change would otherwise make the tests fail obscurely).
    pub fn require_seeded(&self, vm: &str, key: &str, want: &serde_json::Value) {
        let fields = self.custom_fields(vm);
        assert_eq!(
            &fields[key], want,
            "Nautobot's {vm}.{key} is not the seeded value: run `bash scripts/nautobot.sh seed`; fields: {fields}"
        );
    }

    /// Panics with the command to run unless web-01 is Active with its seeded service
    /// (`orders`) and environment (`prod`).
    pub fn require_web01_seeded(&self) {
        assert_eq!(
            self.vm_status("web-01"),
            "Active",
            "web-01 is not Active as seeded: run `bash scripts/nautobot.sh seed`"
        );
        self.require_seeded("web-01", "vmesh_service", &serde_json::json!("orders"));
        self.require_seeded("web-01", "vmesh_env", &serde_json::json!("prod"));
    }

    /// `scripts/nautobot.sh set-field VM KEY VALUE` (a PATCH through the REST API).
    pub fn set_field(&self, vm: &str, key: &str, value: &str) {
        self.script_ok(&["set-field", vm, key, value], Duration::from_secs(120));
    }

    /// Sets a custom field and returns a guard that sets it back to `restore` when dropped.
    pub fn set_field_guarded(&self, vm: &str, key: &str, value: &str, restore: &str) -> RestoreGuard {
        let guard = RestoreGuard {
            nautobot: self.clone(),
            args: ["set-field", vm, key, restore].map(str::to_string).to_vec(),
        };
        self.set_field(vm, key, value);
        guard
    }

    /// `scripts/nautobot.sh set-status VM STATUS` (Active, Staged, Decommissioning, ...).
    pub fn set_status(&self, vm: &str, status: &str) {
        self.script_ok(&["set-status", vm, status], Duration::from_secs(120));
    }

    /// Sets a VM's status and returns a guard that sets it back to `restore` when dropped.
    pub fn set_status_guarded(&self, vm: &str, status: &str, restore: &str) -> RestoreGuard {
        let guard = RestoreGuard {
            nautobot: self.clone(),
            args: ["set-status", vm, restore].map(str::to_string).to_vec(),
        };
        self.set_status(vm, status);
        guard
    }

    /// Stops the Nautobot web server (`nautobot.sh stop`); the guard starts it again when dropped.
    pub fn stop_guarded(&self) -> OutageGuard {
        let guard = OutageGuard {
            nautobot: self.clone(),
            active: true,
        };
        self.script_ok(&["stop"], Duration::from_secs(60));
        let r = self.api_get("/api/status/");
        assert_ne!(r.status, 200, "Nautobot still answers after `nautobot.sh stop`: {r}");
        guard
    }

    /// `nautobot.sh start` (bounded by the script); panics if the API does not answer after it.
    pub fn start(&self) {
        self.script_ok(&["start"], Duration::from_secs(400));
        let r = self.api_get("/api/status/");
        assert_eq!(r.status, 200, "Nautobot does not answer after `nautobot.sh start`: {r}");
    }

    /// [`Nautobot::script`], panicking with its output unless it succeeds.
    fn script_ok(&self, args: &[&str], limit: Duration) {
        let out = self.script(args, limit);
        assert!(
            out.status.success(),
            "nautobot.sh {} failed: {}{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Runs `bash scripts/nautobot.sh <args>` with this instance's URL and token, killed after `limit`.
    pub fn script(&self, args: &[&str], limit: Duration) -> Output {
        let script = workspace_root().join("scripts").join("nautobot.sh");
        let mut cmd = Command::new("timeout");
        cmd.arg(format!("{}", limit.as_secs()))
            .arg("bash")
            .arg(&script)
            .args(args)
            .env("NAUTOBOT_TOKEN", &self.token);
        if let Some(port) = self
            .url
            .rsplit(':')
            .next()
            .filter(|p| p.chars().all(|c| c.is_ascii_digit()))
        {
            cmd.env("NAUTOBOT_PORT", port);
        }
        cmd.output()
            .unwrap_or_else(|e| panic!("run {} {args:?}: {e}", script.display()))
    }
}

/// Undoes a change (runs `nautobot.sh <args>`) when dropped, also when the test panics.
pub struct RestoreGuard {
    nautobot: Nautobot,
    /// The script arguments that undo the change; empty once restored.
    args: Vec<String>,
}

impl RestoreGuard {
    /// Undoes the change now (and not again on drop); panics if that fails.
    pub fn restore(mut self) {
        let args = std::mem::take(&mut self.args);
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        self.nautobot.script_ok(&refs, Duration::from_secs(120));
    }
}

impl Drop for RestoreGuard {
    fn drop(&mut self) {
        if self.args.is_empty() {
            return;
        }
        let refs: Vec<&str> = self.args.iter().map(String::as_str).collect();
        let out = self.nautobot.script(&refs, Duration::from_secs(120));
        if !out.status.success() {
            eprintln!(
                "could not undo a Nautobot change: nautobot.sh {:?} failed (run `bash scripts/nautobot.sh seed`): {}",
                self.args,
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

/// Starts Nautobot again when dropped (also when the test panics).
pub struct OutageGuard {
    nautobot: Nautobot,
    active: bool,
}

impl OutageGuard {
    /// Ends the outage now: `nautobot.sh start`, and panics if the API does not come back.
    pub fn end(mut self) {
        self.active = false;
        self.nautobot.start();
    }
}

impl Drop for OutageGuard {
    fn drop(&mut self) {
        if !self.active {
            return;
        }
        let out = self.nautobot.script(&["start"], Duration::from_secs(400));
        if !out.status.success() {
            eprintln!(
                "could not start Nautobot again (run `bash scripts/nautobot.sh start`): {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
