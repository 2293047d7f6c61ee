//! A real etcd server (Debian's `etcd-server`, v3.4) as a child process, and `etcdctl` to look
//! at what the agent wrote.
//!
//! Each [`Etcd`] listens on fresh loopback client and peer ports with its own temporary
//! `--data-dir`, so tests never share keys. Reads go through `etcdctl` (API v3), the tool an
//! operator would use.
//!
//! ```text
//! let etcd = Etcd::spawn();
//! let agent = Agent::builder().registry_set("kind", "etcd")
//!     .registry_set("address", etcd.url()).start();
//! let value = etcd.get("/vmesh/services/orders/orders-test");
//! ```

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::eventually::eventually;
use crate::http;
use crate::ports::free_addr;
use crate::process::Process;
use crate::tools;

/// How long etcd may take to answer `GET /health`.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// A running single-member etcd, killed on drop.
pub struct Etcd {
    client: SocketAddr,
    process: Process,
    /// Client TLS: the server's certificate and the CA that `etcdctl` trusts.
    tls: Option<EtcdTls>,
    /// `user:password` for `etcdctl` once authentication is on.
    user: Option<String>,
    _dir: TempDir,
}

/// TLS on etcd's client port.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
}

/// One key as `etcdctl get -w json` reports it.
#[derive(Debug, Clone, PartialEq)]
pub struct EtcdKey {
    /// The value (UTF-8).
    pub value: String,
    /// The lease the key is bound to (0: none).
    pub lease: i64,
    /// How many times the key was written since it was (last) created.
    pub version: i64,
    /// The store revision of the last write.
    pub mod_revision: i64,
}

impl Etcd {
    /// Starts etcd on fresh loopback ports and waits (bounded) until it reports healthy.
    pub fn spawn() -> Etcd {
        Etcd::spawn_with(None)
    }

    /// [`Etcd::spawn`] with TLS on the client port (`https://`).
    pub fn spawn_tls(tls: EtcdTls) -> Etcd {
        Etcd::spawn_with(Some(tls))
    }

    fn spawn_with(tls: Option<EtcdTls>) -> Etcd {
        let client = free_addr();
        let peer = free_addr();
        let dir = tempfile::Builder::new()
            .prefix("vmesh-etcd-")
            .tempdir()
            .expect("create etcd temp dir");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://{client}");
        let peer_url = format!("http://{peer}");
        let mut cmd = tools::command("etcd");
        cmd.arg("--name")
            .arg("default")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client_url)
            .arg("--advertise-client-urls")
            .arg(&client_url)
            .arg("--listen-peer-urls")
            .arg(&peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer_url)
            .arg("--initial-cluster")
            .arg(format!("default={peer_url}"))
            .arg("--log-level")
            .arg("warn");
        if let Some(t) = &tls {
            cmd.arg("--cert-file").arg(&t.cert).arg("--key-file").arg(&t.key);
        }
        // Debian's etcd reads ETCD_* variables as flags: a developer's shell must not change the test.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCD") {
                cmd.env_remove(key);
            }
        }
        let mut process = Process::spawn("etcd", cmd, dir.path());
        eventually(READY_TIMEOUT, &format!("etcd to report healthy on {client}"), || {
            if let Some(status) = process.try_exit() {
                panic!(
                    "etcd exited with {status} before it was healthy; stderr:\n{}",
                    process.stderr_tail(40)
                );
            }
            let (status, body) = match &tls {
                None => {
                    let r = http::get(client, "/health")?;
                    (r.status, r.text())
                }
                Some(t) => {
                    let out = Command::new("curl")
                        .args(["-s", "--max-time", "2", "--cacert"])
                        .arg(&t.ca)
                        .arg(format!("https://{client}/health"))
                        .output()
                        .map_err(|e| e.to_string())?;
                    (200, String::from_utf8_lossy(&out.stdout).into_owned())
                }
            };
            if status == 200 && body.contains("\"health\":\"true\"") {
                Ok(())
            } else {
                Err(format!("status {status} body {body}"))
            }
        });
        Etcd {
            client,
            process,
            tls,
            user: None,
            _dir: dir,
        }
    }

    /// `http(s)://127.0.0.1:<client port>`, for `[registry] address`.
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.client)
    }

    /// Turns on etcd's authentication: a `root` user (password `root-pw`, used by this
    /// helper's `etcdctl` from then on) and the user `name` with `password`, allowed to read
    /// and write everything under `/vmesh/`.
    pub fn enable_auth(&mut self, name: &str, password: &str) {
        self.ctl(&["user", "add", "root:root-pw"]);
        self.ctl(&["role", "add", "vmesh-agent"]);
        self.ctl(&[
            "role",
            "grant-permission",
            "vmesh-agent",
            "--prefix=true",
            "readwrite",
            "/vmesh/",
        ]);
        self.ctl(&["user", "add", &format!("{name}:{password}")]);
        self.ctl(&["user", "grant-role", name, "vmesh-agent"]);
        self.ctl(&["auth", "enable"]);
        self.user = Some("root:root-pw".into());
    }

    /// An `etcdctl` (API v3) command aimed at this server.
    pub fn etcdctl(&self) -> Command {
        let mut cmd = tools::command("etcdctl");
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("ETCDCTL") {
                cmd.env_remove(key);
            }
        }
        cmd.env("ETCDCTL_API", "3")
            .arg("--endpoints")
            .arg(self.url())
            .arg("--dial-timeout")
            .arg("3s")
            .arg("--command-timeout")
            .arg("5s");
        if let Some(t) = &self.tls {
            cmd.arg("--cacert").arg(&t.ca);
        }
        if let Some(u) = &self.user {
            cmd.arg("--user").arg(u);
        }
        cmd
    }

    /// Runs `etcdctl <args>` and returns stdout; panics (with stderr) if it fails.
    pub fn ctl(&self, args: &[&str]) -> String {
        let out = self.etcdctl().args(args).output().expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed with {}: {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The key `key` with its lease and version, or `None` when absent.
    pub fn get(&self, key: &str) -> Option<EtcdKey> {
        let text = self.ctl(&["get", key, "-w", "json"]);
        let doc: serde_json::Value =
            serde_json::from_str(&text).unwrap_or_else(|e| panic!("etcdctl get -w json is not JSON ({e}): {text}"));
        let kv = doc["kvs"].as_array()?.first()?.clone();
        let value = self.value(key)?;
        Some(EtcdKey {
            value,
            lease: kv["lease"].as_i64().unwrap_or(0),
            version: kv["version"].as_i64().unwrap_or(0),
            mod_revision: kv["mod_revision"].as_i64().unwrap_or(0),
        })
    }

    /// The value of `key` (UTF-8), or `None` when absent.
    pub fn value(&self, key: &str) -> Option<String> {
        let text = self.ctl(&["get", key, "--print-value-only"]);
        let value = text.strip_suffix('\n').unwrap_or(&text);
        if text.is_empty() {
            None
        } else {
            Some(value.to_string())
        }
    }

    /// The value of `key` parsed as JSON, or `None` when absent.
    pub fn json(&self, key: &str) -> Option<serde_json::Value> {
        self.value(key)
            .map(|v| serde_json::from_str(&v).unwrap_or_else(|e| panic!("value of {key} is not JSON ({e}): {v}")))
    }

    /// The keys under `prefix`, sorted.
    pub fn keys(&self, prefix: &str) -> Vec<String> {
        let text = self.ctl(&["get", prefix, "--prefix", "--keys-only"]);
        let mut keys: Vec<String> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        keys.sort();
        keys
    }

    /// The granted TTL and the remaining TTL (seconds) of `lease`, or `None` if it expired.
    pub fn lease_ttl(&self, lease: i64) -> Option<(i64, i64)> {
        let text = self.ctl(&["lease", "timetolive", &format!("{lease:x}"), "-w", "json"]);
        let doc: serde_json::Value = serde_json::from_str(&text)
            .unwrap_or_else(|e| panic!("etcdctl lease timetolive -w json is not JSON ({e}): {text}"));
        let ttl = doc["ttl"].as_i64()?;
        let granted = doc["granted-ttl"].as_i64().unwrap_or(0);
        (ttl > 0).then_some((granted, ttl))
    }

    /// Writes `key` = `value` (no lease), as another writer would.
    pub fn put(&self, key: &str, value: &str) {
        self.ctl(&["put", key, value]);
    }

    /// etcd's own log (stderr).
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }
}
