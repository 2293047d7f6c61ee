//! The Kubernetes API server double (`tests/fixtures/k8s_double.py`) as a child process, with
//! the real `kubectl` and `curl` pointed at it.
//!
//! A Kubernetes API server cannot be installed on the test machines; the double serves
//! `discovery.k8s.io/v1` EndpointSlices the way kube-apiserver does (lists with label selectors
//! and `continue` pages, watches with resource versions, bookmarks and `410 Expired`, Table
//! output for `kubectl get`, bearer tokens, TLS) and offers a control API under `/_double/` to
//! compact history, store malformed slices, inject failures and cut watches. The fixture's file
//! header documents every endpoint and every deviation from the real server.
//!
//! ```text
//! let k8s = K8sDouble::spawn();
//! k8s.apply_slice("default", "web-abc12", "web", &[SliceEndpoint::ready("127.0.0.1")], port);
//! // The agent reads it with `sources = ["kubernetes"]` on the outbound and a `[kubernetes]`
//! // section (`api = k8s.url()`, `namespace`, `token_file`): see tests/tests/discovery_k8s.rs.
//! k8s.apply_slice("default", "web-abc12", "web", &[SliceEndpoint::ready("127.0.0.1").terminating()], port);
//! ```
//!
//! client-go (so `kubectl`) sends kubeconfig credentials only over TLS: a double started with
//! [`K8sDoubleBuilder::token`] must also use [`K8sDoubleBuilder::tls`] for `kubectl` to pass it.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tempfile::TempDir;

use crate::eventually::eventually;
use crate::fixture;
use crate::http::{curl_command, Curl, CurlResponse};
use crate::ports::free_addr;
use crate::process::Process;
use crate::tools;

/// The label tying an EndpointSlice to its Service (what vmesh selects on).
pub const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";
/// The label the EndpointSlice controller puts on the slices it manages.
pub const MANAGED_BY_LABEL: &str = "endpointslice.kubernetes.io/managed-by";
/// The EndpointSlice controller's name, the value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_CONTROLLER: &str = "endpointslice-controller.k8s.io";

/// How long the double may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(20);
/// kubectl's own bound on one request, so a wedged double fails a test instead of hanging it.
const KUBECTL_REQUEST_TIMEOUT: &str = "10s";

/// Options for [`K8sDouble`]: bearer token, TLS, bookmark interval, raw arguments.
#[derive(Debug, Clone, Default)]
pub struct K8sDoubleBuilder {
    token: Option<String>,
    tls: bool,
    bookmark_interval: Option<Duration>,
    args: Vec<String>,
}

/// A running API server double on a fresh loopback port, killed on drop.
pub struct K8sDouble {
    addr: SocketAddr,
    token: Option<String>,
    ca_cert: Option<PathBuf>,
    kubeconfig: PathBuf,
    process: Process,
    dir: TempDir,
}

/// One endpoint of a slice built by [`K8sDouble::apply_slice`] / [`endpoint_slice`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// The address (`addresses[0]`); IPv4 unless it contains a `:`.
    pub ip: String,
    /// `conditions.ready`.
    pub ready: bool,
    /// `conditions.serving`.
    pub serving: bool,
    /// `conditions.terminating`.
    pub terminating: bool,
    /// `zone`, if any.
    pub zone: Option<String>,
    /// `nodeName`, if any.
    pub node: Option<String>,
}

/// Lines a child process writes on stdout, read as they come; the process is killed on drop.
pub struct LineStream {
    what: String,
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
    ended: bool,
    stderr: Arc<Mutex<String>>,
}

/// A watch on the double's EndpointSlices (`curl -N`), one parsed WatchEvent per line.
pub struct WatchStream {
    lines: LineStream,
}

// === impl K8sDoubleBuilder ===

impl K8sDoubleBuilder {
    /// Requires `Authorization: Bearer <token>` on every API request (401 Status otherwise).
    pub fn token(mut self, token: &str) -> K8sDoubleBuilder {
        self.token = Some(token.to_string());
        self
    }

    /// Serves HTTPS with a fresh self-signed certificate for 127.0.0.1 (see
    /// [`K8sDouble::ca_cert`]); needs `openssl`.
    pub fn tls(mut self) -> K8sDoubleBuilder {
        self.tls = true;
        self
    }

    /// How often watches with `allowWatchBookmarks=true` get a BOOKMARK (default 1 s).
    pub fn bookmark_interval(mut self, every: Duration) -> K8sDoubleBuilder {
        self.bookmark_interval = Some(every);
        self
    }

    /// Adds a raw command-line argument (e.g. `--min-request-timeout`, `5`).
    pub fn arg(mut self, arg: &str) -> K8sDoubleBuilder {
        self.args.push(arg.to_string());
        self
    }

    /// Starts the double and waits (bounded) until it prints `ready`.
    pub fn spawn(self) -> K8sDouble {
        let addr = free_addr();
        let dir = tempfile::Builder::new()
            .prefix("vmesh-k8s-")
            .tempdir()
            .expect("create k8s double temp dir");
        let mut cmd = tools::python_command(&[]);
        cmd.arg(fixture("k8s_double.py")).arg("--listen").arg(addr.to_string());
        if let Some(token) = &self.token {
            cmd.arg("--token").arg(token);
        }
        let ca_cert = self.tls.then(|| {
            let (cert, key) = self_signed_cert(dir.path());
            cmd.arg("--tls-cert").arg(&cert).arg("--tls-key").arg(key);
            cert
        });
        if let Some(every) = self.bookmark_interval {
            cmd.arg("--bookmark-interval").arg(format!("{}ms", every.as_millis()));
        }
        cmd.args(&self.args);
        let mut process = Process::spawn("k8s-double", cmd, dir.path());
        eventually(READY_TIMEOUT, &format!("the k8s double to listen on {addr}"), || {
            if let Some(status) = process.try_exit() {
                panic!(
                    "the k8s double exited with {status} before it was ready; stderr:\n{}",
                    process.stderr_tail(40)
                );
            }
            if process.stdout().lines().any(|l| l.trim() == "ready") {
                Ok(())
            } else {
                Err("no `ready` on stdout yet".to_string())
            }
        });
        let mut double = K8sDouble {
            addr,
            token: self.token,
            ca_cert,
            kubeconfig: PathBuf::new(),
            process,
            dir,
        };
        double.kubeconfig = double.kubeconfig(double.dir.path());
        double
    }
}

/// A self-signed EC certificate (CA:TRUE, SAN 127.0.0.1 and localhost) and its key in `dir`.
fn self_signed_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("k8s-double.crt");
    let key = dir.join("k8s-double.key");
    let out = tools::command("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .args(["-days", "2", "-subj", "/CN=k8s-double"])
        .args(["-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost"])
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl could not make the k8s double's certificate: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

// === impl K8sDouble ===

impl K8sDouble {
    /// Options: token, TLS, bookmark interval.
    pub fn builder() -> K8sDoubleBuilder {
        K8sDoubleBuilder::default()
    }

    /// A plain-HTTP double without authentication.
    pub fn spawn() -> K8sDouble {
        K8sDouble::builder().spawn()
    }

    /// The listen address (127.0.0.1:port).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The API server URL: `http://127.0.0.1:port` (`https://` with TLS).
    pub fn url(&self) -> String {
        let scheme = if self.ca_cert.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The bearer token the double requires, if any.
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// The PEM certificate to trust (it is its own CA) when the double serves TLS.
    pub fn ca_cert(&self) -> Option<&Path> {
        self.ca_cert.as_deref()
    }

    /// Writes `dir/kubeconfig` (server, CA, token, namespace `default`) and returns its path.
    pub fn kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        // JSON strings are valid YAML double-quoted scalars: no escaping surprises.
        let quote = |s: &str| Value::String(s.to_string()).to_string();
        let mut cluster = format!("    server: {}\n", quote(&self.url()));
        if let Some(ca) = &self.ca_cert {
            cluster.push_str(&format!(
                "    certificate-authority: {}\n",
                quote(&ca.to_string_lossy())
            ));
        }
        let user = match &self.token {
            Some(token) => format!("  user:\n    token: {}\n", quote(token)),
            None => "  user: {}\n".to_string(),
        };
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: k8s-double\n  cluster:\n{cluster}\
             users:\n- name: k8s-double\n{user}contexts:\n- name: k8s-double\n  context:\n    \
             cluster: k8s-double\n    user: k8s-double\n    namespace: default\n\
             current-context: k8s-double\n"
        );
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("write {}: {e}", path.display()));
        path
    }

    /// A `kubectl` command with `args`, using this double's kubeconfig and a private cache dir.
    pub fn kubectl_command(&self, args: &[&str]) -> Command {
        assert!(
            self.token.is_none() || self.ca_cert.is_some(),
            "kubectl (client-go) sends kubeconfig credentials only over TLS: build the double with \
             .tls() as well as .token()"
        );
        require_kubectl();
        let mut cmd = tools::command("kubectl");
        cmd.env_remove("KUBECONFIG")
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .arg("--cache-dir")
            .arg(self.dir.path().join("kube-cache"))
            .arg(format!("--request-timeout={KUBECTL_REQUEST_TIMEOUT}"))
            .args(args);
        cmd
    }

    /// Runs `kubectl args` to completion against the double.
    pub fn kubectl(&self, args: &[&str]) -> Output {
        self.kubectl_command(args)
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("run kubectl {args:?}: {e}"))
    }

    /// Runs `kubectl args`, panics (with its output) unless it succeeds; returns its stdout.
    pub fn kubectl_ok(&self, args: &[&str]) -> String {
        let out = self.kubectl(args);
        assert!(
            out.status.success(),
            "kubectl {args:?} failed ({}):\nstdout: {}\nstderr: {}\ndouble log:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            self.process.stderr_tail(20)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Starts a long-running `kubectl args` (e.g. `get endpointslices --watch`) whose stdout
    /// lines can be awaited.
    pub fn kubectl_stream(&self, args: &[&str]) -> LineStream {
        LineStream::spawn(&format!("kubectl {}", args.join(" ")), self.kubectl_command(args))
    }

    /// The EndpointSlice collection path: of namespace `ns`, or of all namespaces.
    pub fn slices_path(ns: Option<&str>) -> String {
        match ns {
            Some(ns) => format!("/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices"),
            None => "/apis/discovery.k8s.io/v1/endpointslices".to_string(),
        }
    }

    /// A `curl` for `method path` on the double, with the token and CA when there are.
    pub fn request(&self, method: &str, path: &str) -> Curl {
        let mut curl = Curl::get(format!("{}{path}", self.url())).method(method);
        if let Some(ca) = &self.ca_cert {
            curl = curl.args(["--cacert".to_string(), ca.to_string_lossy().into_owned()]);
        }
        match &self.token {
            Some(token) => curl.header(&format!("Authorization: Bearer {token}")),
            None => curl,
        }
    }

    /// `GET path`, whatever the answer.
    pub fn get(&self, path: &str) -> CurlResponse {
        self.request("GET", path).run()
    }

    /// `method path` with a JSON `body`, whatever the answer.
    pub fn send(&self, method: &str, path: &str, body: &Value) -> CurlResponse {
        self.request(method, path)
            .header("Content-Type: application/json")
            .body(&body.to_string())
            .run()
    }

    /// The slice `ns/name`, or `None` when the double answers 404.
    pub fn slice(&self, ns: &str, name: &str) -> Option<Value> {
        let r = self.get(&format!("{}/{name}", Self::slices_path(Some(ns))));
        if r.status == 404 {
            return None;
        }
        r.expect_status(200);
        Some(r.json())
    }

    /// The EndpointSliceList of `ns` (all namespaces when `None`) for `service` (all when `None`).
    pub fn list_slices(&self, ns: Option<&str>, service: Option<&str>) -> Value {
        let mut path = Self::slices_path(ns);
        if let Some(service) = service {
            path.push_str(&format!("?labelSelector={SERVICE_NAME_LABEL}%3D{service}"));
        }
        let r = self.get(&path);
        r.expect_status(200);
        r.json()
    }

    /// Creates `slice` in `ns`, or replaces the existing one of that name; returns what the
    /// double stored. Panics unless the double accepts it.
    pub fn apply(&self, ns: &str, slice: &Value) -> Value {
        let name = slice["metadata"]["name"]
            .as_str()
            .unwrap_or_else(|| panic!("a slice to apply needs metadata.name: {slice}"));
        let r = match self.slice(ns, name) {
            None => self.send("POST", &Self::slices_path(Some(ns)), slice),
            Some(current) => {
                let mut body = slice.clone();
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"].clone();
                self.send("PUT", &format!("{}/{name}", Self::slices_path(Some(ns))), &body)
            }
        };
        assert!(
            r.exit_code == 0 && (r.status == 200 || r.status == 201),
            "apply {ns}/{name}: {r}"
        );
        r.json()
    }

    /// Creates or replaces slice `ns/name` of `service` with `endpoints`, all on TCP `port`
    /// (named `http`); returns the stored object (see [`endpoint_slice`]).
    pub fn apply_slice(&self, ns: &str, name: &str, service: &str, endpoints: &[SliceEndpoint], port: u16) -> Value {
        self.apply(ns, &endpoint_slice(name, service, endpoints, port))
    }

    /// Deletes slice `ns/name`; panics unless the double answers 200.
    pub fn delete_slice(&self, ns: &str, name: &str) {
        let r = self
            .request("DELETE", &format!("{}/{name}", Self::slices_path(Some(ns))))
            .run();
        r.expect_status(200);
    }

    /// Stores `json` (an object with metadata.name) in `ns` without validation, defaulting or
    /// pruning, and announces it to watchers; returns the stored object.
    pub fn put_raw(&self, ns: &str, json: &str) -> Value {
        let r = Curl::get(format!("{}/_double/raw?ns={ns}", self.url()))
            .args(self.curl_tls_args())
            .method("POST")
            .header("Content-Type: application/json")
            .body(json)
            .run();
        r.expect_status(200);
        r.json()
    }

    /// Drops the history: watches (and continued lists) from an older resourceVersion now get
    /// `410 Expired`. Returns the compaction resourceVersion.
    pub fn compact(&self) -> u64 {
        let answer = self.control("compact");
        parse_rv(&answer["compactedResourceVersion"])
    }

    /// The next `count` API requests (`/api*`, `/apis*`) are answered with a Status `status`.
    pub fn fail(&self, count: u32, status: u16) {
        self.control(&format!("fail?count={count}&status={status}"));
    }

    /// Like [`fail`](Self::fail), only for requests whose path starts with `path_prefix`
    /// (e.g. [`K8sDouble::slices_path`]).
    pub fn fail_path(&self, count: u32, status: u16, path_prefix: &str) {
        self.control(&format!("fail?count={count}&status={status}&path={path_prefix}"));
    }

    /// Closes every open watch abruptly (no terminal chunk); returns how many there were.
    pub fn drop_watches(&self) -> u64 {
        self.control("drop_watches")["dropped"].as_u64().unwrap_or(0)
    }

    /// The double's counters: `resourceVersion`, `compactedResourceVersion`, `objects`, `lists`,
    /// `gets`, `watches_open`, `watches_started`, `writes`, `requests` (per path), `recent`
    /// (the last 200 requests: method, path, query, status, watch), `faults`.
    pub fn state(&self) -> Value {
        let r = Curl::get(format!("{}/_double/state", self.url()))
            .args(self.curl_tls_args())
            .run();
        r.expect_status(200);
        r.json()
    }

    /// The current resourceVersion.
    pub fn resource_version(&self) -> u64 {
        parse_rv(&self.state()["resourceVersion"])
    }

    /// Opens a watch on the slices of `ns` (all namespaces when `None`) with extra query
    /// parameters `query` (e.g. `resourceVersion=105&allowWatchBookmarks=true`). curl bounds it
    /// to 30 s.
    pub fn watch(&self, ns: Option<&str>, query: &str) -> WatchStream {
        let url = format!("{}{}?watch=1&{query}", self.url(), Self::slices_path(ns));
        let mut cmd = curl_command();
        cmd.args(["-sS", "-N", "-H", "Accept: application/json"]);
        cmd.args(self.curl_tls_args());
        if let Some(token) = &self.token {
            cmd.args(["-H", &format!("Authorization: Bearer {token}")]);
        }
        cmd.arg(&url);
        WatchStream {
            lines: LineStream::spawn(&format!("watch {url}"), cmd),
        }
    }

    /// The double's request log (stderr).
    pub fn stderr(&self) -> String {
        self.process.stderr()
    }

    fn curl_tls_args(&self) -> Vec<String> {
        match &self.ca_cert {
            Some(ca) => vec!["--cacert".to_string(), ca.to_string_lossy().into_owned()],
            None => Vec::new(),
        }
    }

    fn control(&self, what: &str) -> Value {
        let r = Curl::get(format!("{}/_double/{what}", self.url()))
            .args(self.curl_tls_args())
            .method("POST")
            .run();
        r.expect_status(200);
        r.json()
    }
}

/// Panics with the install command when `kubectl` is not on `PATH`: a missing tool fails.
fn require_kubectl() {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path).any(|dir| dir.join("kubectl").is_file());
    assert!(
        found,
        "kubectl is not installed: run `apt-get install kubectl` (or `bash scripts/install-test-deps.sh` as root)"
    );
}

fn parse_rv(value: &Value) -> u64 {
    value
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not a resourceVersion: {value}"))
}

/// An EndpointSlice `name` of `service` (labels [`SERVICE_NAME_LABEL`] and
/// [`MANAGED_BY_LABEL`]) with `endpoints` on TCP `port` named `http`, as the EndpointSlice
/// controller writes it. `addressType` is IPv6 when the first address contains a `:`.
pub fn endpoint_slice(name: &str, service: &str, endpoints: &[SliceEndpoint], port: u16) -> Value {
    let ipv6 = endpoints.first().is_some_and(|e| e.ip.contains(':'));
    let endpoints: Vec<Value> = endpoints.iter().map(SliceEndpoint::to_json).collect();
    json!({
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "labels": {
                SERVICE_NAME_LABEL: service,
                MANAGED_BY_LABEL: MANAGED_BY_CONTROLLER,
            },
        },
        "addressType": if ipv6 { "IPv6" } else { "IPv4" },
        "endpoints": endpoints,
        "ports": [{"name": "http", "port": port, "protocol": "TCP"}],
    })
}

// === impl SliceEndpoint ===

impl SliceEndpoint {
    /// A ready, serving, not terminating endpoint at `ip`.
    pub fn ready(ip: &str) -> SliceEndpoint {
        SliceEndpoint {
            ip: ip.to_string(),
            ready: true,
            serving: true,
            terminating: false,
            zone: None,
            node: None,
        }
    }

    /// An endpoint at `ip` that is neither ready nor serving (e.g. failing its readiness probe).
    pub fn not_ready(ip: &str) -> SliceEndpoint {
        SliceEndpoint {
            ready: false,
            serving: false,
            ..SliceEndpoint::ready(ip)
        }
    }

    /// Terminating, as the controller reports a pod being deleted: not ready, still serving.
    pub fn terminating(self) -> SliceEndpoint {
        SliceEndpoint {
            ready: false,
            terminating: true,
            ..self
        }
    }

    /// Sets `conditions.serving`.
    pub fn serving(self, serving: bool) -> SliceEndpoint {
        SliceEndpoint { serving, ..self }
    }

    /// Sets `zone`.
    pub fn zone(self, zone: &str) -> SliceEndpoint {
        SliceEndpoint {
            zone: Some(zone.to_string()),
            ..self
        }
    }

    /// Sets `nodeName`.
    pub fn node(self, node: &str) -> SliceEndpoint {
        SliceEndpoint {
            node: Some(node.to_string()),
            ..self
        }
    }

    /// The endpoint as EndpointSlice JSON.
    pub fn to_json(&self) -> Value {
        let mut endpoint = json!({
            "addresses": [self.ip],
            "conditions": {"ready": self.ready, "serving": self.serving, "terminating": self.terminating},
        });
        if let Some(node) = &self.node {
            endpoint["nodeName"] = json!(node);
        }
        if let Some(zone) = &self.zone {
            endpoint["zone"] = json!(zone);
        }
        endpoint
    }
}

// === impl LineStream ===

impl LineStream {
    /// Spawns `cmd` with stdout piped (read line by line on a thread) and stderr collected.
    pub fn spawn(what: &str, mut cmd: Command) -> LineStream {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {what}: {e}"));
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr_pipe = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(String::new()));
        let sink = Arc::clone(&stderr);
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stderr_pipe.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut text = sink.lock().unwrap_or_else(|e| e.into_inner());
                text.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        LineStream {
            what: what.to_string(),
            child,
            lines,
            seen: Vec::new(),
            ended: false,
            stderr,
        }
    }

    /// The next line, waiting at most `timeout`; `None` on timeout or once stdout is closed.
    pub fn next_line(&mut self, timeout: Duration) -> Option<String> {
        if self.ended {
            return None;
        }
        match self.lines.recv_timeout(timeout) {
            Ok(line) => {
                self.seen.push(line.clone());
                Some(line)
            }
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => {
                self.ended = true;
                None
            }
        }
    }

    /// Reads lines until one satisfies `pred` (returned), for at most `timeout`; panics naming
    /// `what` with everything seen otherwise.
    pub fn wait_for_line(&mut self, timeout: Duration, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.next_line(left) {
                Some(line) if pred(&line) => return line,
                Some(_) => continue,
                None => panic!(
                    "{}: no line showing {what} within {timeout:?}{}",
                    self.what,
                    self.describe()
                ),
            }
        }
    }

    /// Reads until stdout closes (at most `timeout`; panics otherwise) and returns the lines read
    /// by this call.
    pub fn lines_until_end(&mut self, timeout: Duration) -> Vec<String> {
        let deadline = Instant::now() + timeout;
        let from = self.seen.len();
        while !self.ended {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                panic!("{}: still open after {timeout:?}{}", self.what, self.describe());
            }
            self.next_line(left);
        }
        self.seen[from..].to_vec()
    }

    /// Waits (at most `timeout`) for the process to exit; panics otherwise.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        eventually(timeout, &format!("{} to exit", self.what), || {
            self.child
                .try_wait()
                .map_err(|e| e.to_string())?
                .ok_or_else(|| "still running".to_string())
        })
    }

    /// Every line read so far.
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// What the process wrote on stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn describe(&self) -> String {
        format!("; stdout so far:\n{}\nstderr:\n{}", self.seen.join("\n"), self.stderr())
    }
}

impl Drop for LineStream {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// === impl WatchStream ===

impl WatchStream {
    /// The next event, waiting at most `timeout`; `None` on timeout or at the end of the stream.
    pub fn next_event(&mut self, timeout: Duration) -> Option<Value> {
        self.lines.next_line(timeout).map(|line| parse_event(&line))
    }

    /// Reads events until one satisfies `pred` (returned), for at most `timeout`; panics naming
    /// `what` with every event seen otherwise.
    pub fn wait_for_event(&mut self, timeout: Duration, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let line = self.lines.wait_for_line(timeout, what, |line| pred(&parse_event(line)));
        parse_event(&line)
    }

    /// Reads until the server ends the stream (at most `timeout`; panics otherwise) and returns
    /// the events read by this call.
    pub fn events_until_end(&mut self, timeout: Duration) -> Vec<Value> {
        self.lines
            .lines_until_end(timeout)
            .iter()
            .map(|l| parse_event(l))
            .collect()
    }

    /// curl's exit status once the stream ended (0: the server closed it properly; 18: cut
    /// without the terminal chunk), waiting at most `timeout`.
    pub fn exit_status(&mut self, timeout: Duration) -> ExitStatus {
        self.lines.wait_exit(timeout)
    }

    /// Every event read so far.
    pub fn seen(&self) -> Vec<Value> {
        self.lines.seen().iter().map(|l| parse_event(l)).collect()
    }
}

fn parse_event(line: &str) -> Value {
    serde_json::from_str(line).unwrap_or_else(|e| panic!("watch line is not JSON ({e}): {line:?}"))
}
