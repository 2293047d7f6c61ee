//! The Consul test double (`tests/fixtures/consul_double.py`) as a child process.
//!
//! Consul itself cannot be installed on the test machines; the double speaks the part of
//! Consul's HTTP API that vmesh uses (agent service registration, health, KV, blocking queries,
//! ACL tokens) and offers a control API under `/_double/` to inject faults (500s, latency,
//! dropped connections), restart the agent without its data, reset the index and set check
//! statuses. The file header of the fixture documents every endpoint and every choice.
//!
//! ```text
//! let consul = ConsulDouble::spawn();
//! let agent = Agent::builder().registry_set("kind", "consul")
//!     .registry_set("address", consul.base_url()).start();
//! consul.control("check?id=service:orders-test&status=passing");
//! ```

use std::net::SocketAddr;
use std::time::Duration;

use tempfile::TempDir;

use crate::eventually::eventually;
use crate::fixture;
use crate::http::{Curl, CurlResponse};
use crate::ports::free_addr;
use crate::process::Process;
use crate::tools;

/// How long the double may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Options for [`ConsulDouble::spawn_with`].
#[derive(Debug, Clone, Default)]
pub struct ConsulDoubleBuilder {
    acl_token: Option<String>,
    args: Vec<String>,
}

/// A running Consul double on a fresh loopback port, killed on drop.
pub struct ConsulDouble {
    addr: SocketAddr,
    acl_token: Option<String>,
    process: Process,
    _dir: TempDir,
}

impl ConsulDoubleBuilder {
    /// Enables ACLs: only requests carrying `token` (X-Consul-Token, Bearer or `?token=`) pass.
    pub fn acl_token(mut self, token: &str) -> ConsulDoubleBuilder {
        self.acl_token = Some(token.to_string());
        self
    }

    /// Adds a raw command-line argument (e.g. `--reap-interval`, `1s`, `--start-index`, `500`).
    pub fn arg(mut self, arg: &str) -> ConsulDoubleBuilder {
        self.args.push(arg.to_string());
        self
    }

    /// Starts the double and waits (bounded) until it prints `ready`.
    pub fn spawn(self) -> ConsulDouble {
        let addr = free_addr();
        let dir = tempfile::Builder::new()
            .prefix("vmesh-consul-")
            .tempdir()
            .expect("create consul double temp dir");
        let mut cmd = tools::python_command(&[]);
        cmd.arg(fixture("consul_double.py"))
            .arg("--port")
            .arg(addr.port().to_string());
        if let Some(token) = &self.acl_token {
            cmd.arg("--acl-token").arg(token);
        }
        cmd.args(&self.args);
        let mut process = Process::spawn("consul-double", cmd, dir.path());
        eventually(READY_TIMEOUT, &format!("the consul double to listen on {addr}"), || {
            if let Some(status) = process.try_exit() {
                panic!(
                    "the consul double exited with {status} before it was ready; stderr:\n{}",
                    process.stderr_tail(40)
                );
            }
            if process.stdout().lines().any(|l| l.trim() == "ready") {
                Ok(())
            } else {
                Err("no `ready` on stdout yet".to_string())
            }
        });
        ConsulDouble {
            addr,
            acl_token: self.acl_token,
            process,
            _dir: dir,
        }
    }
}

impl ConsulDouble {
    /// Options: ACL token, extra arguments.
    pub fn builder() -> ConsulDoubleBuilder {
        ConsulDoubleBuilder::default()
    }

    /// A double without ACLs.
    pub fn spawn() -> ConsulDouble {
        ConsulDouble::builder().spawn()
    }

    /// The listen address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:port`, for `[registry] address`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:port<path>`.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// The ACL token the double was started with, if any.
    pub fn acl_token(&self) -> Option<&str> {
        self.acl_token.as_deref()
    }

    /// A `curl` for `method path` on the double, with the ACL token (if any) in `X-Consul-Token`.
    pub fn request(&self, method: &str, path: &str) -> Curl {
        let curl = Curl::get(self.url(path)).method(method);
        match &self.acl_token {
            Some(token) => curl.header(&format!("X-Consul-Token: {token}")),
            None => curl,
        }
    }

    /// `GET path` with the token, returning the response whatever its status.
    pub fn get(&self, path: &str) -> CurlResponse {
        self.request("GET", path).run()
    }

    /// `PUT path` with `body` and the token, returning the response whatever its status.
    pub fn put(&self, path: &str, body: &str) -> CurlResponse {
        self.request("PUT", path).body(body).run()
    }

    /// `POST /_double/<what>` (the control API) expecting 200; returns its JSON answer.
    pub fn control(&self, what: &str) -> serde_json::Value {
        let r = Curl::get(self.url(&format!("/_double/{what}"))).method("POST").run();
        r.expect_status(200);
        r.json()
    }

    /// `GET /_double/<what>` (`state`, `writes`, `requests`, `index`) expecting 200, as JSON.
    pub fn inspect(&self, what: &str) -> serde_json::Value {
        let r = Curl::get(self.url(&format!("/_double/{what}"))).run();
        r.expect_status(200);
        r.json()
    }

    /// Writes received per endpoint (`register`, `deregister`, `maintenance`, `check_update`,
    /// `kv_put`, `kv_delete`, `kv`, `total`, and the same under `ok` for 2xx answers).
    pub fn writes(&self) -> serde_json::Value {
        self.inspect("writes")
    }

    /// How many requests for `endpoint` (e.g. `health_service`, `kv_get`, `register`) arrived,
    /// counted on arrival, so a blocking query is counted while it is still waiting.
    pub fn arrived(&self, endpoint: &str) -> u64 {
        self.inspect("requests")["counts"][endpoint].as_u64().unwrap_or(0)
    }

    /// The double's request log (stderr).
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    /// Kills the double (its port then refuses connections).
    pub fn kill(&mut self) {
        self.process.kill();
    }
}

/// The `X-Consul-Index` of a response; panics (with the response) if absent or not a number.
pub fn consul_index(response: &CurlResponse) -> u64 {
    response
        .header("x-consul-index")
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no numeric X-Consul-Index in: {response}"))
}
