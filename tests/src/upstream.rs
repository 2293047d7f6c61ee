//! Real upstream servers as child processes: the Python HTTP/1.1 app, nginx (HTTP/1.1 or h2c),
//! the grpcio server and the WebSocket echo server.

use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::Duration;

use tempfile::TempDir;

use crate::eventually::eventually;
use crate::fixture;
use crate::http;
use crate::ports::free_addr;
use crate::process::Process;
use crate::tools;

/// How long an upstream may take to accept connections (grpcio's import is the slow one).
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// Which server an [`Upstream`] runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum UpstreamKind {
    /// `tests/fixtures/upstream.py`: echo JSON, `/slow`, `/gate`, `/status/N`, `/echo`, `/stream`,
    /// `/call`, `/__stats`, `/__control`; optionally failing, hanging, slow or of bounded capacity.
    Python,
    /// nginx answering every path with `body`; `h2c` = HTTP/2 prior knowledge only.
    Nginx {
        /// Serve HTTP/2 cleartext (prior knowledge) instead of HTTP/1.1.
        h2c: bool,
        /// The fixed response body.
        body: String,
    },
    /// `tests/fixtures/grpc_server.py`: service `echo.Echo` over h2c.
    Grpc,
    /// `tests/fixtures/ws_echo.py`: WebSocket echo.
    WebSocket,
}

/// A spec for an upstream, started by [`Upstream::spawn`].
#[derive(Debug, Clone)]
pub struct Upstream {
    kind: UpstreamKind,
    name: String,
    addr: Option<SocketAddr>,
    extra_args: Vec<String>,
}

/// A running upstream, killed on drop.
pub struct RunningUpstream {
    kind: UpstreamKind,
    name: String,
    addr: SocketAddr,
    process: Process,
    _dir: TempDir,
}

// === impl Upstream ===

impl Upstream {
    /// The Python HTTP/1.1 upstream, identified by `x-upstream-name: <name>`.
    pub fn python(name: &str) -> Upstream {
        Upstream::of(UpstreamKind::Python, name)
    }

    /// nginx serving HTTP/1.1, answering `hello from <name>\n`, with headers
    /// `x-upstream-name: <name>` and `x-upstream-proto: <protocol nginx received>`.
    pub fn nginx(name: &str) -> Upstream {
        let body = format!("hello from {name}\n");
        Upstream::of(UpstreamKind::Nginx { h2c: false, body }, name)
    }

    /// Like [`Upstream::nginx`] but serving HTTP/2 cleartext (prior knowledge) only.
    pub fn nginx_h2c(name: &str) -> Upstream {
        let body = format!("hello from {name}\n");
        Upstream::of(UpstreamKind::Nginx { h2c: true, body }, name)
    }

    /// The grpcio `echo.Echo` server.
    pub fn grpc(name: &str) -> Upstream {
        Upstream::of(UpstreamKind::Grpc, name)
    }

    /// The WebSocket echo server.
    pub fn websocket(name: &str) -> Upstream {
        Upstream::of(UpstreamKind::WebSocket, name)
    }

    fn of(kind: UpstreamKind, name: &str) -> Upstream {
        Upstream {
            kind,
            name: name.to_string(),
            addr: None,
            extra_args: Vec::new(),
        }
    }

    /// Python upstream only: answer every request (but `/__stats`) with `status`.
    pub fn fail_status(mut self, status: u16) -> Upstream {
        assert_eq!(self.kind, UpstreamKind::Python, "fail_status needs the Python upstream");
        self.extra_args
            .extend(["--fail-status".to_string(), status.to_string()]);
        self
    }

    /// Python upstream only: answer `percent`% of requests (but `/__stats`) with the
    /// [`Upstream::fail_status`] status, 500 unless set, spread evenly (50: every second request).
    pub fn fail_percent(self, percent: u8) -> Upstream {
        self.python_flag("fail_percent", &["--fail-percent".to_string(), percent.to_string()])
    }

    /// Python upstream only: read every request (but `/__stats`) and never answer it: a hung
    /// endpoint that accepts connections.
    pub fn hang(self) -> Upstream {
        self.python_flag("hang", &["--hang".to_string()])
    }

    /// Python upstream only: wait `ms` before answering every request (but `/__stats`).
    pub fn delay_ms(self, ms: u32) -> Upstream {
        self.python_flag("delay_ms", &["--delay-ms".to_string(), ms.to_string()])
    }

    /// Python upstream only: serve at most `n` requests at once (the rest wait their turn), so
    /// with [`Upstream::delay_ms`] its latency grows with load like a saturated app's.
    pub fn capacity(self, n: u32) -> Upstream {
        self.python_flag("capacity", &["--capacity".to_string(), n.to_string()])
    }

    fn python_flag(mut self, what: &str, args: &[String]) -> Upstream {
        assert_eq!(self.kind, UpstreamKind::Python, "{what} needs the Python upstream");
        self.extra_args.extend_from_slice(args);
        self
    }

    /// gRPC upstream only: also serve `grpc.health.v1.Health` (grpcio-health-checking), SERVING
    /// for `""` and `echo.Echo` until [`RunningUpstream::set_grpc_health`] says otherwise.
    pub fn grpc_health(mut self) -> Upstream {
        assert_eq!(self.kind, UpstreamKind::Grpc, "grpc_health needs the gRPC upstream");
        self.extra_args.push("--health".to_string());
        self
    }

    /// Listens on `addr` instead of a fresh port (e.g. to bring a killed upstream back).
    pub fn on(mut self, addr: SocketAddr) -> Upstream {
        self.addr = Some(addr);
        self
    }

    /// Starts the server and waits (bounded) until it accepts connections.
    pub fn spawn(self) -> RunningUpstream {
        let addr = self.addr.unwrap_or_else(free_addr);
        let dir = tempfile::Builder::new()
            .prefix("vmesh-upstream-")
            .tempdir()
            .expect("create upstream temp dir");
        let port = addr.port().to_string();
        let mut cmd = match &self.kind {
            UpstreamKind::Python => python_script(&[], "upstream.py", &port, &self.name),
            UpstreamKind::Grpc if self.extra_args.iter().any(|a| a == "--health") => {
                python_script(&["grpc", "grpc_health.v1.health"], "grpc_server.py", &port, &self.name)
            }
            UpstreamKind::Grpc => python_script(&["grpc"], "grpc_server.py", &port, &self.name),
            UpstreamKind::WebSocket => python_script(&["websockets"], "ws_echo.py", &port, &self.name),
            UpstreamKind::Nginx { h2c, body } => {
                let conf = nginx_conf(dir.path(), addr, &self.name, *h2c, body);
                let conf_path = dir.path().join("nginx.conf");
                std::fs::write(&conf_path, conf).expect("write nginx.conf");
                let mut cmd = tools::command("nginx");
                cmd.arg("-p")
                    .arg(dir.path())
                    .arg("-e")
                    .arg(dir.path().join("error.log"))
                    .arg("-c")
                    .arg(&conf_path);
                cmd
            }
        };
        cmd.args(&self.extra_args);
        let process = Process::spawn(&self.name, cmd, dir.path());
        let mut running = RunningUpstream {
            kind: self.kind,
            name: self.name,
            addr,
            process,
            _dir: dir,
        };
        running.wait_accepting();
        running
    }
}

fn python_script(modules: &[&str], script: &str, port: &str, name: &str) -> Command {
    let mut cmd = tools::python_command(modules);
    cmd.arg(fixture(script)).args(["--port", port, "--name", name]);
    cmd
}

fn nginx_conf(dir: &std::path::Path, addr: SocketAddr, name: &str, h2c: bool, body: &str) -> String {
    let d = dir.display();
    let listen = if h2c { format!("{addr} http2") } else { addr.to_string() };
    let body = body.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n");
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    keepalive_requests 100000;
    server {{
        listen {listen};
        location / {{
            add_header x-upstream-name {name} always;
            add_header x-upstream-proto $server_protocol always;
            default_type text/plain;
            return 200 "{body}";
        }}
    }}
}}
"#
    )
}

// === impl RunningUpstream ===

impl RunningUpstream {
    fn wait_accepting(&mut self) {
        let addr = self.addr;
        let what = format!("upstream {} ({:?}) to accept on {addr}", self.name, self.kind);
        eventually(READY_TIMEOUT, &what, || {
            if let Some(status) = self.process.try_exit() {
                panic!(
                    "upstream {} exited with {status} before accepting on {addr}; stderr:\n{}",
                    self.name,
                    self.process.stderr_tail(40)
                );
            }
            TcpStream::connect_timeout(&addr, Duration::from_millis(500))
                .map(drop)
                .map_err(|e| e.to_string())
        });
    }

    /// The listen address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The name it reports in `x-upstream-name`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `http://<addr><path>` (direct, bypassing vmesh).
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Kills the server and waits until its port refuses connections.
    pub fn kill(&mut self) {
        self.process.kill();
        let addr = self.addr;
        eventually(
            READY_TIMEOUT,
            &format!("{addr} to refuse connections"),
            || match TcpStream::connect_timeout(&addr, Duration::from_millis(500)) {
                Ok(_) => Err("still accepting".to_string()),
                Err(_) => Ok(()),
            },
        );
    }

    /// The Python upstream's counters: `{"requests": n, "in_flight": n, "by_path": {path: n}}`.
    pub fn stats(&self) -> serde_json::Value {
        assert_eq!(self.kind, UpstreamKind::Python, "stats() needs the Python upstream");
        http::get(self.addr, "/__stats")
            .unwrap_or_else(|e| panic!("GET /__stats on {}: {e}", self.name))
            .json()
    }

    /// Requests the Python upstream has seen (excluding `/__stats`).
    pub fn requests_seen(&self) -> u64 {
        self.stats()["requests"].as_u64().unwrap_or(0)
    }

    /// Requests the Python upstream has seen for `path` (without query), e.g. a load's path
    /// apart from the agent's health checks.
    pub fn requests_to(&self, path: &str) -> u64 {
        self.stats()["by_path"][path].as_u64().unwrap_or(0)
    }

    /// Requests the Python upstream is serving right now.
    pub fn in_flight(&self) -> u64 {
        self.stats()["in_flight"].as_u64().unwrap_or(0)
    }

    /// Changes the Python upstream's behaviour at run time (`/__control`): keys `fail_status`,
    /// `fail_percent`, `hang` (0/1), `delay_ms`. Returns the behaviour now in force.
    pub fn control(&self, settings: &[(&str, u32)]) -> serde_json::Value {
        assert_eq!(self.kind, UpstreamKind::Python, "control() needs the Python upstream");
        let query: Vec<String> = settings.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let path = format!("/__control?{}", query.join("&"));
        let response = http::get(self.addr, &path).unwrap_or_else(|e| panic!("GET {path} on {}: {e}", self.name));
        assert_eq!(response.status, 200, "GET {path} on {}: {}", self.name, response.text());
        response.json()
    }

    /// gRPC upstream with [`Upstream::grpc_health`] only: what `grpc.health.v1` answers for
    /// `service` (`""`: the whole server) from now on, e.g. `"NOT_SERVING"`.
    pub fn set_grpc_health(&self, service: &str, status: &str) {
        assert_eq!(self.kind, UpstreamKind::Grpc, "set_grpc_health needs the gRPC upstream");
        let health = format!("{service}={status}");
        let run = crate::grpc_client(self.addr, &["--call", "set-health", "--health", &health]);
        assert!(run.success, "SetHealth {health} on {}: {}", self.name, run.output);
    }

    /// Python upstream only: lets every request held at `/gate` answer now.
    pub fn release_gates(&self) {
        self.control(&[("release", 1)]);
    }

    /// The server's stderr (its request log).
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }
}
