//! The Kubernetes source: one list+watch of every EndpointSlice of one namespace that belongs
//! to a Service (label `kubernetes.io/service-name`), shared by every watched service, as
//! client-go's informers do. The full list happens at start and when the watch's resource
//! version is gone (410); otherwise a watch that ends or breaks resumes from the last resource
//! version seen (bookmarks move it too). Slices become endpoints by the rules of [`parse_slice`].
//!
//! Nothing the API server sends may panic the agent or lose what it holds: a malformed slice
//! keeps its previous version, an answer or line above [`MAX_ANSWER`] is refused, and while the
//! API is unreachable every view keeps its endpoints and carries the error (stale).

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use reqwest::Url;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::watch;

use super::hub::{Endpoints, Hub};
use super::{EndpointSource, Found, View, Want};
use crate::config::{read_secret, KubernetesConfig};
use crate::registry::backoff;
use crate::store::unix_now;

/// Where a pod's service account is mounted.
const SERVICE_ACCOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
/// The label that ties a slice to its Service.
const SERVICE_LABEL: &str = "kubernetes.io/service-name";
/// Slice labels copied onto the endpoints.
const VERSION_LABEL: &str = "app.kubernetes.io/version";
const COLOUR_LABEL: &str = "vmesh.io/colour";
/// Largest list page or watch line read. etcd refuses objects above 1.5 MiB by default and a
/// page holds at most [`PAGE`] slices, so only a broken or hostile server goes past it.
pub const MAX_ANSWER: usize = 16 << 20;
/// Slices per list page (client-go's informers ask for 500 too).
const PAGE: usize = 500;
/// Projected service-account tokens rotate (the kubelet renews them at 80 % of their life,
/// an hour by default): the file is read again this often.
const TOKEN_REREAD: Duration = Duration::from_secs(60);
/// A watch asks the server to end it after 270..330 s (client-go: 5..10 min); the jitter
/// spreads the re-watches of many agents.
const WATCH_SECONDS: std::ops::RangeInclusive<u64> = 270..=330;
/// A list page gets this long.
const LIST_TIMEOUT: Duration = Duration::from_secs(60);
/// Longest pause between attempts while the API fails.
const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// Follows the EndpointSlices of one namespace.
pub struct KubernetesSource {
    state: Arc<Mutex<State>>,
    task: tokio::task::AbortHandle,
}

/// Where the API server is and how to reach it, resolved once at start.
#[derive(Debug, PartialEq)]
struct Settings {
    api: String,
    namespace: String,
    /// The config key and file of the bearer token; `None`: no token is sent.
    token: Option<(&'static str, PathBuf)>,
    /// The config key and PEM file of the CA; `None`: the built-in roots.
    ca: Option<(&'static str, PathBuf)>,
}

/// The bearer token, read again every [`TOKEN_REREAD`].
struct Token {
    file: Option<(&'static str, PathBuf)>,
    value: Option<String>,
    read_at: Instant,
    /// A 401 came back: read the file before the next request.
    due: bool,
}

/// The API client: one namespace's EndpointSlices.
struct Client {
    http: reqwest::Client,
    /// `{api}/apis/discovery.k8s.io/v1/namespaces/{ns}/endpointslices`
    slices: Url,
    token: Token,
}

#[derive(Debug, thiserror::Error)]
enum KubeError {
    #[error("kubernetes API unreachable: {0}")]
    Unreachable(String),
    #[error("kubernetes API refused the request: {0}")]
    Denied(String),
    #[error("kubernetes API answered something unexpected: {0}")]
    BadAnswer(String),
    /// The resource version asked for is compacted away: list again.
    #[error("resource version expired (410)")]
    Gone,
}

/// Every slice the watch holds, by service.
#[derive(Clone, Debug, Default, PartialEq)]
struct Slices {
    /// service -> slice name -> its usable endpoints.
    services: HashMap<String, BTreeMap<String, Vec<Found>>>,
    /// slice name -> its service.
    owners: HashMap<String, String>,
}

/// One slice as [`Slices`] keeps it.
#[derive(Clone, Debug, PartialEq)]
struct Slice {
    name: String,
    service: String,
    endpoints: Vec<Found>,
    /// Why parts of the slice (or all of it) are not used, for the log.
    skipped: Vec<String>,
}

/// A slice refused as a whole: what the source held of it stays.
#[derive(Debug, PartialEq)]
struct Refused {
    /// `?` when the slice has no name.
    name: String,
    why: String,
}

/// What one watch line did.
#[derive(Debug, PartialEq)]
enum Step {
    /// These services' endpoints may have changed.
    Applied(Vec<String>),
    /// Nothing to publish (a bookmark, a refused slice, an unknown event).
    Nothing,
    /// The resource version is gone: list again.
    Relist(String),
    /// The server reported an error: resume from the last resource version after a pause.
    Failed(String),
}

/// How a watch ended without an error.
#[derive(Debug, PartialEq)]
enum WatchEnd {
    /// The server closed it (timeoutSeconds): watch again from the last resource version.
    Closed { events: usize, lasted: Duration },
    /// The resource version is gone (an ERROR event with 410): list again.
    Relist { why: String, events: usize },
}

/// What is published to subscribers.
type State = Hub<Slices>;

#[derive(Deserialize)]
struct RawList {
    #[serde(default)]
    metadata: RawListMeta,
    #[serde(default)]
    items: Option<Vec<Value>>,
}

#[derive(Default, Deserialize)]
struct RawListMeta {
    #[serde(default, rename = "resourceVersion")]
    resource_version: Option<String>,
    #[serde(default, rename = "continue")]
    next: Option<String>,
}

#[derive(Deserialize)]
struct RawSlice {
    #[serde(default)]
    metadata: RawMeta,
    #[serde(default, rename = "addressType")]
    address_type: Option<String>,
    #[serde(default)]
    endpoints: Option<Vec<RawEndpoint>>,
    #[serde(default)]
    ports: Option<Vec<RawPort>>,
}

#[derive(Default, Deserialize)]
struct RawMeta {
    #[serde(default)]
    labels: Option<HashMap<String, String>>,
}

#[derive(Deserialize)]
struct RawEndpoint {
    #[serde(default)]
    addresses: Option<Vec<String>>,
    #[serde(default)]
    conditions: Option<Conditions>,
    #[serde(default)]
    zone: Option<String>,
}

/// `conditions` of an endpoint; every field may be absent.
#[derive(Clone, Copy, Debug, Default, Deserialize)]
struct Conditions {
    #[serde(default)]
    ready: Option<bool>,
    #[serde(default)]
    serving: Option<bool>,
    #[serde(default)]
    terminating: Option<bool>,
}

#[derive(Deserialize)]
struct RawPort {
    #[serde(default)]
    protocol: Option<String>,
    #[serde(default)]
    port: Option<i64>,
}

// === impl KubernetesSource ===

impl KubernetesSource {
    /// Resolves the settings (in-cluster defaults under the `[kubernetes]` keys), reads the
    /// token and the CA, and starts the list+watch. Must run inside the tokio runtime.
    pub fn start(config: &KubernetesConfig) -> Result<Arc<Self>, String> {
        let env = |k: &str| std::env::var(k).ok();
        let settings = settings(config, &env, Path::new(SERVICE_ACCOUNT))?;
        let client = Client::new(&settings)?;
        tracing::info!(api = %settings.api, namespace = %settings.namespace,
            token = settings.token.is_some(), "kubernetes discovery: watching EndpointSlices");
        let state = Arc::new(Mutex::new(State::default()));
        let task = tokio::spawn(run(client, state.clone())).abort_handle();
        Ok(Arc::new(Self { state, task }))
    }
}

impl EndpointSource for KubernetesSource {
    fn subscribe(&self, want: &Want) -> watch::Receiver<View> {
        self.state
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .subscribe(&want.service)
    }
}

impl Drop for KubernetesSource {
    fn drop(&mut self) {
        self.task.abort();
    }
}

// === impl Settings ===

/// The in-cluster API address from `KUBERNETES_SERVICE_HOST`/`_PORT` as `lookup` gives them
/// (`std::env::var` in the agent, a map in tests); an IPv6 host gets brackets.
fn in_cluster_api(lookup: &dyn Fn(&str) -> Option<String>) -> Result<String, String> {
    let get = |k: &str| lookup(k).map(|v| v.trim().to_owned()).filter(|v| !v.is_empty());
    let missing = |var: &str| format!("kubernetes.api: not set and not running in a pod ({var} unset)");
    let host = get("KUBERNETES_SERVICE_HOST").ok_or_else(|| missing("KUBERNETES_SERVICE_HOST"))?;
    let port = get("KUBERNETES_SERVICE_PORT").ok_or_else(|| missing("KUBERNETES_SERVICE_PORT"))?;
    let host = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]")
    } else {
        host
    };
    Ok(format!("https://{host}:{port}"))
}

/// The settings: each `[kubernetes]` key, else the pod's service account under `sa_dir` (the
/// token and CA when their files exist, the namespace file else `default`), else the
/// in-cluster environment for the API.
fn settings(
    config: &KubernetesConfig,
    env: &dyn Fn(&str) -> Option<String>,
    sa_dir: &Path,
) -> Result<Settings, String> {
    let api = match &config.api {
        Some(api) => api.trim_end_matches('/').to_owned(),
        None => in_cluster_api(env)?,
    };
    let default_file = |name: &str| Some(sa_dir.join(name)).filter(|p| p.exists());
    let token = config
        .token_file
        .clone()
        .or_else(|| default_file("token"))
        .map(|p| ("kubernetes.token_file", p));
    let ca = config
        .ca_file
        .clone()
        .or_else(|| default_file("ca.crt"))
        .map(|p| ("kubernetes.ca_file", p));
    let namespace = match (&config.namespace, default_file("namespace")) {
        (Some(ns), _) => ns.clone(),
        (None, Some(file)) => read_secret("kubernetes.namespace", &file).map_err(|e| e.to_string())?,
        (None, None) => "default".to_owned(),
    };
    if !is_namespace(&namespace) {
        return Err(format!(
            "kubernetes.namespace: {namespace:?} is not a namespace name (lower-case letters, digits and '-', at most 63)"
        ));
    }
    Ok(Settings {
        api,
        namespace,
        token,
        ca,
    })
}

/// An RFC 1123 label, as namespace names are.
fn is_namespace(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

// === impl Token ===

impl Token {
    /// Reads the file once: at start a token that cannot be read is an error.
    fn new(file: Option<(&'static str, PathBuf)>) -> Result<Self, String> {
        let value = match &file {
            Some((key, path)) => Some(read_secret(key, path).map_err(|e| e.to_string())?),
            None => None,
        };
        Ok(Self {
            file,
            value,
            read_at: Instant::now(),
            due: false,
        })
    }

    /// The token, read again when [`TOKEN_REREAD`] has passed; a failed read keeps the last one.
    fn current(&mut self) -> Option<&str> {
        if let Some((key, path)) = &self.file {
            if self.due || self.read_at.elapsed() >= TOKEN_REREAD {
                self.read_at = Instant::now();
                self.due = false;
                match read_secret(key, path) {
                    Ok(t) => self.value = Some(t),
                    Err(e) => tracing::warn!(error = %e, "kubernetes token not read again: keeping the last one"),
                }
            }
        }
        self.value.as_deref()
    }

    /// After a 401: read the file again before the next request.
    fn expire(&mut self) {
        self.due = true;
    }
}

// === impl Client ===

impl Client {
    fn new(settings: &Settings) -> Result<Self, String> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            // A watch is silent between events: keep-alives notice a dead peer before the
            // request timeout does.
            .tcp_keepalive(Duration::from_secs(30))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_keep_alive_while_idle(true);
        if let Some((key, path)) = &settings.ca {
            let pem = read_secret(key, path).map_err(|e| e.to_string())?;
            let certs = reqwest::Certificate::from_pem_bundle(pem.as_bytes())
                .map_err(|e| format!("{key}: {}: not a PEM certificate: {e}", path.display()))?;
            if certs.is_empty() {
                return Err(format!("{key}: {}: no PEM certificate in the file", path.display()));
            }
            // Only the cluster's CA signs the API server's certificate.
            builder = builder.tls_built_in_root_certs(false);
            for c in certs {
                builder = builder.add_root_certificate(c);
            }
        }
        let http = builder.build().map_err(|e| format!("kubernetes: HTTP client: {e}"))?;
        let slices = Url::parse(&format!(
            "{}/apis/discovery.k8s.io/v1/namespaces/{}/endpointslices",
            settings.api, settings.namespace
        ))
        .map_err(|e| format!("kubernetes.api: {:?} is not a URL: {e}", settings.api))?;
        if slices.scheme() == "http" && settings.token.is_some() {
            tracing::warn!(api = %settings.api, "kubernetes.api is plain http: the bearer token travels unencrypted");
        }
        Ok(Self {
            http,
            slices,
            token: Token::new(settings.token.clone())?,
        })
    }

    /// The slices URL with the label selector and `query`.
    fn url(&self, query: &[(&str, &str)]) -> Url {
        let mut url = self.slices.clone();
        {
            let mut q = url.query_pairs_mut();
            q.append_pair("labelSelector", SERVICE_LABEL);
            for (k, v) in query {
                q.append_pair(k, v);
            }
        }
        url
    }

    /// Sends a GET; any answer but 200 is an error (410: [`KubeError::Gone`]).
    async fn get(&mut self, url: Url, timeout: Duration) -> Result<reqwest::Response, KubeError> {
        let what = describe(&url);
        let mut req = self
            .http
            .get(url)
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(timeout);
        if let Some(t) = self.token.current() {
            req = req.bearer_auth(t);
        }
        let mut resp = req
            .send()
            .await
            .map_err(|e| KubeError::Unreachable(format!("{what}: {}", error_chain(&e.without_url()))))?;
        let status = resp.status().as_u16();
        if status == 200 {
            return Ok(resp);
        }
        let body = read_capped(&mut resp, 64 << 10).await.unwrap_or_default();
        let message = status_message(&body);
        Err(match status {
            410 => KubeError::Gone,
            401 => {
                self.token.expire();
                KubeError::Denied(format!("{what}: HTTP 401 (check kubernetes.token_file): {message}"))
            }
            403 => KubeError::Denied(format!(
                "{what}: HTTP 403 (the service account needs list and watch on endpointslices.discovery.k8s.io): {message}"
            )),
            s => KubeError::Unreachable(format!("{what}: HTTP {s}: {message}")),
        })
    }

    /// Lists every slice of the namespace page by page; returns the items and the list's
    /// resource version.
    async fn list(&mut self) -> Result<(Vec<Value>, String), KubeError> {
        let limit = PAGE.to_string();
        let mut items = Vec::new();
        let mut next: Option<String> = None;
        loop {
            let mut query = vec![("limit", limit.as_str())];
            if let Some(c) = &next {
                query.push(("continue", c.as_str()));
            }
            let url = self.url(&query);
            let what = describe(&url);
            let mut resp = self.get(url, LIST_TIMEOUT).await?;
            let body = read_capped(&mut resp, MAX_ANSWER).await?;
            let page: RawList = serde_json::from_slice(&body)
                .map_err(|e| KubeError::BadAnswer(format!("{what}: not an EndpointSliceList: {e}")))?;
            items.extend(page.items.unwrap_or_default());
            match page.metadata.next.filter(|c| !c.is_empty()) {
                Some(c) => next = Some(c),
                None => {
                    let rv = page
                        .metadata
                        .resource_version
                        .filter(|rv| !rv.is_empty())
                        .ok_or_else(|| KubeError::BadAnswer(format!("{what}: the list has no resourceVersion")))?;
                    return Ok((items, rv));
                }
            }
        }
    }

    /// Watches from `rv`, applying events to `state` as they come and moving `rv`.
    async fn watch(&mut self, state: &Mutex<State>, rv: &mut String) -> Result<WatchEnd, KubeError> {
        let seconds = fastrand::u64(WATCH_SECONDS);
        let url = self.url(&[
            ("watch", "1"),
            ("resourceVersion", rv.as_str()),
            ("allowWatchBookmarks", "true"),
            ("timeoutSeconds", &seconds.to_string()),
        ]);
        let what = describe(&url);
        let started = Instant::now();
        let mut resp = self.get(url, Duration::from_secs(seconds + 30)).await?;
        state.lock().unwrap_or_else(|p| p.into_inner()).connected();
        let mut buf: Vec<u8> = Vec::new();
        let mut events = 0usize;
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| KubeError::Unreachable(format!("{what}: {}", error_chain(&e.without_url()))))?
        {
            buf.extend_from_slice(&chunk);
            let mut consumed = 0;
            let mut touched: Vec<String> = Vec::new();
            let mut end: Option<Result<WatchEnd, KubeError>> = None;
            {
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                while let Some(n) = buf[consumed..].iter().position(|b| *b == b'\n') {
                    let line = &buf[consumed..consumed + n];
                    consumed += n + 1;
                    if line.iter().all(u8::is_ascii_whitespace) {
                        continue;
                    }
                    events += 1;
                    match apply_event(&mut st.data, rv, line) {
                        Step::Applied(services) => touched.extend(services),
                        Step::Nothing => {}
                        Step::Relist(why) => {
                            end = Some(Ok(WatchEnd::Relist { why, events }));
                            break;
                        }
                        Step::Failed(why) => {
                            end = Some(Err(KubeError::BadAnswer(format!("{what}: {why}"))));
                            break;
                        }
                    }
                }
                st.updated = Some(unix_now());
                touched.sort();
                touched.dedup();
                st.publish(Some(&touched));
            }
            if let Some(end) = end {
                return end;
            }
            buf.drain(..consumed);
            if buf.len() > MAX_ANSWER {
                return Err(KubeError::BadAnswer(format!(
                    "{what}: a watch line is larger than {} MiB",
                    MAX_ANSWER >> 20
                )));
            }
        }
        if !buf.iter().all(u8::is_ascii_whitespace) {
            tracing::debug!(
                bytes = buf.len(),
                "kubernetes watch ended inside a line: the partial line is dropped"
            );
        }
        Ok(WatchEnd::Closed {
            events,
            lasted: started.elapsed(),
        })
    }
}

impl KubeError {
    /// The stable code in log lines.
    fn code(&self) -> &'static str {
        match self {
            Self::Unreachable(_) => "KUBERNETES_UNREACHABLE",
            Self::Denied(_) => "KUBERNETES_DENIED",
            Self::BadAnswer(_) => "KUBERNETES_BAD_ANSWER",
            Self::Gone => "KUBERNETES_GONE",
        }
    }
}

/// `GET <path>` for messages (the query is long and says little).
fn describe(url: &Url) -> String {
    if url.query_pairs().any(|(k, _)| k == "watch") {
        format!("watch {}", url.path())
    } else {
        format!("GET {}", url.path())
    }
}

/// reqwest's error with its sources (the top one alone often says only "error sending request";
/// the caller strips the URL, which names the request again).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// The body, refused above `cap` bytes.
async fn read_capped(resp: &mut reqwest::Response, cap: usize) -> Result<Vec<u8>, KubeError> {
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| KubeError::Unreachable(format!("reading an answer: {}", error_chain(&e.without_url()))))?
    {
        if body.len() + chunk.len() > cap {
            return Err(KubeError::BadAnswer(format!("an answer is larger than {cap} bytes")));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

/// The `message` of a Status body, else the body's start.
fn status_message(body: &[u8]) -> String {
    serde_json::from_slice::<Value>(body)
        .ok()
        .and_then(|v| v.get("message").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| String::from_utf8_lossy(&body[..body.len().min(200)]).trim().to_owned())
}

// === the watch loop ===

/// Lists, then follows; after an error, waits and resumes from the last resource version.
async fn run(mut client: Client, state: Arc<Mutex<State>>) {
    let mut rv: Option<String> = None;
    let mut errors = 0u32;
    // Lists in a row that a watch did not follow with anything: a server that answers every
    // watch with 410 must not be listed in a tight loop.
    let mut quick_relists = 0u32;
    loop {
        let began = Instant::now();
        let outcome = match rv.as_mut() {
            None => match client.list().await {
                Ok((items, new_rv)) => {
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    let (slices, refused) = relist(&st.data, &items);
                    log_refused(&refused);
                    st.data = slices;
                    st.synced = true;
                    st.error = None;
                    st.updated = Some(unix_now());
                    st.publish(None);
                    tracing::debug!(slices = items.len(), resource_version = %new_rv, "kubernetes EndpointSlices listed");
                    rv = Some(new_rv);
                    Ok(None)
                }
                Err(e) => Err(e),
            },
            Some(r) => client.watch(&state, r).await.map(Some),
        };
        let relist_because = match outcome {
            Ok(None) => {
                errors = 0;
                None
            }
            Ok(Some(WatchEnd::Closed { events, lasted })) => {
                errors = 0;
                if events > 0 || lasted > Duration::from_secs(5) {
                    quick_relists = 0;
                }
                // A server that ends every watch at once is asked again at most once a second.
                if events == 0 && lasted < Duration::from_secs(1) {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                None
            }
            Ok(Some(WatchEnd::Relist { why, events })) => {
                if events > 0 {
                    quick_relists = 0;
                }
                Some(why)
            }
            Err(KubeError::Gone) => Some("HTTP 410".to_owned()),
            Err(e) => {
                // A watch that worked for a while starts the backoff afresh.
                if began.elapsed() > Duration::from_secs(60) {
                    errors = 0;
                }
                errors += 1;
                let pause = backoff(errors, MAX_BACKOFF);
                tracing::warn!(code = e.code(), error = %e, ?pause,
                    "kubernetes discovery failed; keeping the last endpoints");
                {
                    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                    st.error = Some(format!("{}: {e}", e.code()));
                    st.publish(None);
                }
                tokio::time::sleep(pause).await;
                None
            }
        };
        if let Some(why) = relist_because {
            tracing::info!(reason = %why, "kubernetes resource version expired: listing the EndpointSlices again");
            rv = None;
            quick_relists += 1;
            if quick_relists > 1 {
                tokio::time::sleep(backoff(quick_relists, MAX_BACKOFF)).await;
            }
        }
    }
}

fn log_refused(refused: &[Refused]) {
    for r in refused {
        tracing::warn!(slice = %r.name, error = %r.why, "EndpointSlice refused: keeping what was known of it");
    }
}

// === impl Slices ===

impl Endpoints for Slices {
    fn endpoints(&self, service: &str) -> Vec<Found> {
        Slices::endpoints(self, service)
    }
}

impl Slices {
    /// Stores `slice` (replacing its previous version); returns the services touched.
    fn put(&mut self, slice: Slice) -> Vec<String> {
        let mut touched = self.delete(&slice.name);
        self.owners.insert(slice.name.clone(), slice.service.clone());
        self.services
            .entry(slice.service.clone())
            .or_default()
            .insert(slice.name, slice.endpoints);
        touched.push(slice.service);
        touched.dedup();
        touched
    }

    /// Forgets slice `name`; returns the service it belonged to.
    fn delete(&mut self, name: &str) -> Vec<String> {
        let Some(service) = self.owners.remove(name) else {
            return Vec::new();
        };
        if let Some(set) = self.services.get_mut(&service) {
            set.remove(name);
            if set.is_empty() {
                self.services.remove(&service);
            }
        }
        vec![service]
    }

    /// The slice `name` as held, to keep it when a new version is refused.
    fn get(&self, name: &str) -> Option<(&str, &Vec<Found>)> {
        let service = self.owners.get(name)?;
        let endpoints = self.services.get(service)?.get(name)?;
        Some((service.as_str(), endpoints))
    }

    /// Every endpoint of every slice of `service`, one per address, sorted.
    fn endpoints(&self, service: &str) -> Vec<Found> {
        let mut all: Vec<Found> = self
            .services
            .get(service)
            .map(|set| set.values().flatten().cloned().collect())
            .unwrap_or_default();
        // Stable: of two slices listing one address (while the controller moves an endpoint),
        // the first slice by name wins.
        all.sort_by_key(|f| f.address);
        all.dedup_by_key(|f| f.address);
        all
    }
}

/// The state a full list gives: every item, except that a refused item keeps what `old` held
/// of it. Returns the refusals for the log.
fn relist(old: &Slices, items: &[Value]) -> (Slices, Vec<Refused>) {
    let mut new = Slices::default();
    let mut refused = Vec::new();
    for item in items {
        match parse_slice(item) {
            Ok(slice) => {
                log_skipped(&slice);
                new.put(slice);
            }
            Err(r) => {
                if let Some((service, endpoints)) = old.get(&r.name) {
                    new.put(Slice {
                        name: r.name.clone(),
                        service: service.to_owned(),
                        endpoints: endpoints.clone(),
                        skipped: Vec::new(),
                    });
                }
                refused.push(r);
            }
        }
    }
    (new, refused)
}

fn log_skipped(slice: &Slice) {
    for why in &slice.skipped {
        tracing::warn!(slice = %slice.name, service = %slice.service, reason = %why, "EndpointSlice: part not used");
    }
}

/// Applies one watch line (a `WatchEvent`) to `slices`, moving `rv` to the event's resource
/// version. A line that is not a WatchEvent, or a slice that is refused, changes nothing.
fn apply_event(slices: &mut Slices, rv: &mut String, line: &[u8]) -> Step {
    let event: Value = match serde_json::from_slice(line) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            let start = String::from_utf8_lossy(&line[..line.len().min(120)]).into_owned();
            tracing::warn!(line = %start, "kubernetes watch line is not a WatchEvent: skipped");
            return Step::Nothing;
        }
    };
    let kind = event.get("type").and_then(Value::as_str).unwrap_or("");
    let object = event.get("object").unwrap_or(&Value::Null);
    let object_rv = object
        .pointer("/metadata/resourceVersion")
        .and_then(Value::as_str)
        .filter(|v| !v.is_empty());
    match kind {
        "ERROR" => {
            let code = object.get("code").and_then(Value::as_u64);
            let reason = object.get("reason").and_then(Value::as_str).unwrap_or("");
            let message = object.get("message").and_then(Value::as_str).unwrap_or("");
            if code == Some(410) || matches!(reason, "Expired" | "Gone") {
                Step::Relist(format!("{reason} {message}").trim().to_owned())
            } else {
                Step::Failed(format!(
                    "watch error {}: {reason} {message}",
                    code.map_or_else(|| "?".to_owned(), |c| c.to_string())
                ))
            }
        }
        "BOOKMARK" => {
            if let Some(v) = object_rv {
                *rv = v.to_owned();
            }
            Step::Nothing
        }
        "ADDED" | "MODIFIED" | "DELETED" => {
            if let Some(v) = object_rv {
                *rv = v.to_owned();
            }
            if kind == "DELETED" {
                return match object.pointer("/metadata/name").and_then(Value::as_str) {
                    Some(name) => Step::Applied(slices.delete(name)),
                    None => {
                        tracing::warn!("kubernetes DELETED event without a slice name: skipped");
                        Step::Nothing
                    }
                };
            }
            match parse_slice(object) {
                Ok(slice) => {
                    log_skipped(&slice);
                    Step::Applied(slices.put(slice))
                }
                Err(r) => {
                    log_refused(std::slice::from_ref(&r));
                    Step::Nothing
                }
            }
        }
        other => {
            tracing::warn!(event = %other, "kubernetes watch event of an unknown type: skipped");
            Step::Nothing
        }
    }
}

/// One EndpointSlice as endpoints.
///
/// Refused as a whole (what was held of it stays): not an object of the EndpointSlice shape,
/// no `metadata.name`, no `kubernetes.io/service-name` label, no `addressType`.
///
/// Used with no endpoints (and the reason logged): `addressType` other than `IPv4`/`IPv6`
/// (`FQDN` is deprecated and has no defined meaning), no usable port.
///
/// The port is the slice's first port whose protocol is TCP (or absent, TCP by default) and
/// that has a number (a nil port means "all ports"). Every endpoint of a slice has its ports.
///
/// An endpoint is used when `ready` (absent: ready, per the API), `serving` (absent: as
/// `ready`) and not `terminating` (absent: not terminating): a terminating endpoint gets no new
/// requests. Its first address is used (the controller writes exactly one; the API gives no
/// meaning to the others and kube-proxy ignores them); an endpoint with no address or one that
/// is not an IP is skipped (and logged). Labels: env `k8s`, the endpoint's `zone`, `version`
/// from the slice label `app.kubernetes.io/version`, colour from `vmesh.io/colour`, weight 100.
fn parse_slice(v: &Value) -> Result<Slice, Refused> {
    let name = v
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let refuse = |why: String| Refused {
        name: name.clone().unwrap_or_else(|| "?".to_owned()),
        why,
    };
    if !v.is_object() {
        return Err(refuse("not a JSON object".into()));
    }
    let raw = RawSlice::deserialize(v).map_err(|e| refuse(format!("not an EndpointSlice: {e}")))?;
    let Some(name) = name.clone() else {
        return Err(refuse("no metadata.name".into()));
    };
    let labels = raw.metadata.labels.unwrap_or_default();
    let service = labels
        .get(SERVICE_LABEL)
        .filter(|s| !s.is_empty())
        .cloned()
        .ok_or_else(|| refuse(format!("no {SERVICE_LABEL} label")))?;
    let address_type = raw.address_type.ok_or_else(|| refuse("no addressType".into()))?;
    let mut slice = Slice {
        name,
        service,
        endpoints: Vec::new(),
        skipped: Vec::new(),
    };
    let endpoints = raw.endpoints.unwrap_or_default();
    if endpoints.is_empty() {
        // A Service without pods: its slice has no endpoints (and often no ports).
        return Ok(slice);
    }
    if !matches!(address_type.as_str(), "IPv4" | "IPv6") {
        slice.skipped.push(format!(
            "addressType {address_type:?}: only IPv4 and IPv6 slices are used"
        ));
        return Ok(slice);
    }
    let port = raw.ports.unwrap_or_default().into_iter().find_map(|p| {
        let tcp = p.protocol.as_deref().is_none_or(|proto| proto == "TCP");
        p.port
            .filter(|_| tcp)
            .and_then(|n| u16::try_from(n).ok())
            .filter(|&n| n != 0)
    });
    let Some(port) = port else {
        slice
            .skipped
            .push("no TCP port with a number: the slice's endpoints are not used".into());
        return Ok(slice);
    };
    let version = labels.get(VERSION_LABEL).cloned().unwrap_or_default();
    let colour = labels.get(COLOUR_LABEL).cloned().unwrap_or_default();
    for (i, ep) in endpoints.into_iter().enumerate() {
        if !usable(ep.conditions.unwrap_or_default()) {
            continue;
        }
        let Some(first) = ep.addresses.as_ref().and_then(|a| a.first()) else {
            slice.skipped.push(format!("endpoints[{i}]: no addresses"));
            continue;
        };
        let Ok(ip) = first.parse::<IpAddr>() else {
            slice
                .skipped
                .push(format!("endpoints[{i}]: address {first:?} is not an IP"));
            continue;
        };
        slice.endpoints.push(Found {
            address: SocketAddr::new(ip, port),
            weight: 100,
            env: "k8s".to_owned(),
            zone: ep.zone.unwrap_or_default(),
            version: version.clone(),
            colour: colour.clone(),
            ramp: None,
        });
    }
    Ok(slice)
}

/// Whether an endpoint with these conditions gets new requests (see [`parse_slice`]).
fn usable(c: Conditions) -> bool {
    let ready = c.ready.unwrap_or(true);
    let serving = c.serving.unwrap_or(ready);
    ready && serving && !c.terminating.unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn slice(name: &str, service: &str, endpoints: Value) -> Value {
        json!({
            "metadata": {"name": name, "resourceVersion": "7", "labels": {SERVICE_LABEL: service}},
            "addressType": "IPv4",
            "endpoints": endpoints,
            "ports": [{"name": "http", "protocol": "TCP", "port": 8080}],
        })
    }

    fn addrs(s: &Slice) -> Vec<String> {
        s.endpoints.iter().map(|f| f.address.to_string()).collect()
    }

    #[test]
    fn conditions_follow_the_api_docs() {
        let c = |ready, serving, terminating| Conditions {
            ready,
            serving,
            terminating,
        };
        // (ready, serving, terminating) -> used
        let table = [
            (c(None, None, None), true),
            (c(Some(true), None, None), true),
            (c(Some(true), Some(true), Some(false)), true),
            (c(Some(false), None, None), false),
            (c(Some(false), Some(false), Some(false)), false),
            // Terminating but still serving: no new requests.
            (c(Some(false), Some(true), Some(true)), false),
            // publishNotReadyAddresses marks a terminating endpoint ready.
            (c(Some(true), Some(true), Some(true)), false),
            (c(None, None, Some(true)), false),
            // Serving absent defers to ready; an explicit serving=false wins over unknown ready.
            (c(None, Some(false), None), false),
            (c(Some(false), Some(true), Some(false)), false),
        ];
        for (cond, want) in table {
            assert_eq!(usable(cond), want, "{cond:?}");
        }
    }

    #[test]
    fn slices_become_endpoints() {
        let v = json!({
            "metadata": {"name": "web-abc", "labels": {SERVICE_LABEL: "web", VERSION_LABEL: "1.2", COLOUR_LABEL: "blue"}},
            "addressType": "IPv4",
            "endpoints": [
                {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "zone": "z1"},
                {"addresses": ["10.0.0.2", "10.9.9.9"], "conditions": {}},
                {"addresses": ["10.0.0.3"], "conditions": {"ready": false, "serving": true, "terminating": true}},
                {"addresses": ["10.0.0.4"], "conditions": null},
            ],
            "ports": [{"name": "dns", "protocol": "UDP", "port": 53}, {"name": "none", "port": null}, {"name": "http", "port": 8080}, {"port": 9090}],
        });
        let s = parse_slice(&v).unwrap();
        assert_eq!((s.name.as_str(), s.service.as_str()), ("web-abc", "web"));
        assert_eq!(addrs(&s), ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.4:8080"]);
        let f = &s.endpoints[0];
        assert_eq!(
            (
                f.env.as_str(),
                f.zone.as_str(),
                f.version.as_str(),
                f.colour.as_str(),
                f.weight,
                f.ramp
            ),
            ("k8s", "z1", "1.2", "blue", 100, None)
        );
        assert!(s.skipped.is_empty(), "{:?}", s.skipped);

        let v6 = json!({
            "metadata": {"name": "web-v6", "labels": {SERVICE_LABEL: "web"}},
            "addressType": "IPv6",
            "endpoints": [{"addresses": ["fd00::1"]}],
            "ports": [{"protocol": "TCP", "port": 80}],
        });
        assert_eq!(addrs(&parse_slice(&v6).unwrap()), ["[fd00::1]:80"]);
    }

    #[test]
    fn unusable_parts_are_skipped_and_said() {
        let fqdn = json!({
            "metadata": {"name": "ext", "labels": {SERVICE_LABEL: "web"}},
            "addressType": "FQDN",
            "endpoints": [{"addresses": ["db.example.com"]}],
            "ports": [{"port": 5432}],
        });
        let s = parse_slice(&fqdn).unwrap();
        assert!(s.endpoints.is_empty() && s.skipped[0].contains("FQDN"), "{s:?}");

        let no_port = json!({
            "metadata": {"name": "p", "labels": {SERVICE_LABEL: "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.0.1"]}],
            "ports": [{"protocol": "UDP", "port": 53}, {"port": 0}, {"port": 70000}],
        });
        let s = parse_slice(&no_port).unwrap();
        assert!(s.endpoints.is_empty() && s.skipped[0].contains("no TCP port"), "{s:?}");
        let mut without_ports = no_port.clone();
        without_ports["ports"] = Value::Null;
        assert!(parse_slice(&without_ports).unwrap().skipped[0].contains("no TCP port"));

        let bad = slice(
            "b",
            "web",
            json!([{"addresses": null}, {"addresses": []}, {"addresses": ["10.0.0.300"]}, {"addresses": ["10.0.0.5"]}]),
        );
        let s = parse_slice(&bad).unwrap();
        assert_eq!(addrs(&s), ["10.0.0.5:8080"]);
        assert_eq!(s.skipped.len(), 3, "{:?}", s.skipped);
        assert!(s.skipped[2].contains("not an IP"));

        // A Service scaled to zero: no endpoints and no ports is a valid, empty slice.
        let empty = json!({"metadata": {"name": "e", "labels": {SERVICE_LABEL: "web"}}, "addressType": "IPv4", "endpoints": null, "ports": null});
        let s = parse_slice(&empty).unwrap();
        assert!(s.endpoints.is_empty() && s.skipped.is_empty());
    }

    #[test]
    fn malformed_slices_are_refused_with_their_name() {
        let cases = [
            (json!("text"), "?", "not a JSON object"),
            (
                json!({"metadata": {"labels": {SERVICE_LABEL: "web"}}, "addressType": "IPv4"}),
                "?",
                "no metadata.name",
            ),
            (json!({"metadata": {"name": "a"}, "addressType": "IPv4"}), "a", "label"),
            (
                json!({"metadata": {"name": "a", "labels": {SERVICE_LABEL: ""}}, "addressType": "IPv4"}),
                "a",
                "label",
            ),
            (
                json!({"metadata": {"name": "a", "labels": {SERVICE_LABEL: "web"}}}),
                "a",
                "no addressType",
            ),
            (
                json!({"metadata": {"name": "a", "labels": {SERVICE_LABEL: "web"}}, "addressType": "IPv4", "endpoints": "x"}),
                "a",
                "not an EndpointSlice",
            ),
            (
                json!({"metadata": {"name": "a", "labels": {SERVICE_LABEL: "web"}}, "addressType": "IPv4", "endpoints": [{"addresses": "10.0.0.1"}]}),
                "a",
                "not an EndpointSlice",
            ),
            (
                json!({"metadata": {"name": "a", "labels": {SERVICE_LABEL: "web"}}, "addressType": "IPv4", "endpoints": [], "ports": [{"port": "80"}]}),
                "a",
                "not an EndpointSlice",
            ),
        ];
        for (v, name, why) in cases {
            let r = parse_slice(&v).unwrap_err();
            assert_eq!(r.name, name, "{v}");
            assert!(r.why.contains(why), "{v}: {}", r.why);
        }
    }

    fn event(kind: &str, object: &Value) -> Vec<u8> {
        serde_json::to_vec(&json!({"type": kind, "object": object})).unwrap()
    }

    fn with_rv(mut v: Value, rv: &str) -> Value {
        v["metadata"]["resourceVersion"] = json!(rv);
        v
    }

    #[test]
    fn watch_events_drive_the_state() {
        let mut s = Slices::default();
        let mut rv = "10".to_owned();
        let a1 = with_rv(
            slice(
                "web-a",
                "web",
                json!([{"addresses": ["10.0.0.2"]}, {"addresses": ["10.0.0.1"]}]),
            ),
            "11",
        );
        let b = with_rv(
            slice(
                "web-b",
                "web",
                json!([{"addresses": ["10.0.0.1"]}, {"addresses": ["10.0.0.3"]}]),
            ),
            "12",
        );
        let api = with_rv(slice("api-a", "api", json!([{"addresses": ["10.0.1.1"]}])), "13");
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("ADDED", &a1)),
            Step::Applied(vec!["web".into()])
        );
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("ADDED", &b)),
            Step::Applied(vec!["web".into()])
        );
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("ADDED", &api)),
            Step::Applied(vec!["api".into()])
        );
        assert_eq!(rv, "13");
        let web = |s: &Slices| {
            s.endpoints("web")
                .iter()
                .map(|f| f.address.to_string())
                .collect::<Vec<_>>()
        };
        // Both slices, one entry per address, sorted.
        assert_eq!(web(&s), ["10.0.0.1:8080", "10.0.0.2:8080", "10.0.0.3:8080"]);

        // MODIFIED: the endpoint 10.0.0.2 terminates.
        let a2 = with_rv(
            slice(
                "web-a",
                "web",
                json!([{"addresses": ["10.0.0.2"], "conditions": {"terminating": true, "serving": true, "ready": false}}, {"addresses": ["10.0.0.1"]}]),
            ),
            "14",
        );
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("MODIFIED", &a2)),
            Step::Applied(vec!["web".into()])
        );
        assert_eq!(web(&s), ["10.0.0.1:8080", "10.0.0.3:8080"]);

        // A malformed version of web-b is refused: the last good one stays, the rv moves on.
        let broken = json!({"metadata": {"name": "web-b", "resourceVersion": "15", "labels": {SERVICE_LABEL: "web"}}});
        assert_eq!(apply_event(&mut s, &mut rv, &event("MODIFIED", &broken)), Step::Nothing);
        assert_eq!((web(&s).len(), rv.as_str()), (2, "15"));

        // Not JSON: skipped, nothing moves.
        assert_eq!(
            apply_event(&mut s, &mut rv, b"{\"type\": \"ADDED\", \"obj"),
            Step::Nothing
        );
        assert_eq!(apply_event(&mut s, &mut rv, b"[1]"), Step::Nothing);
        assert_eq!(rv, "15");

        // BOOKMARK: only the resource version (its object is an empty slice).
        let bookmark = json!({"kind": "EndpointSlice", "metadata": {"resourceVersion": "20", "creationTimestamp": null}, "addressType": "", "endpoints": null, "ports": null});
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("BOOKMARK", &bookmark)),
            Step::Nothing
        );
        assert_eq!((rv.as_str(), web(&s).len()), ("20", 2));

        // DELETED (carries the last state and the deletion's rv).
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("DELETED", &with_rv(a2, "21"))),
            Step::Applied(vec!["web".into()])
        );
        assert_eq!(web(&s), ["10.0.0.1:8080", "10.0.0.3:8080"]);
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("DELETED", &with_rv(b, "22"))),
            Step::Applied(vec!["web".into()])
        );
        assert!(s.endpoints("web").is_empty() && !s.services.contains_key("web"));
        assert_eq!(rv, "22");
        // Deleting an unknown slice touches nothing.
        let gone = with_rv(slice("nope", "web", json!([])), "23");
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("DELETED", &gone)),
            Step::Applied(vec![])
        );

        // A slice that moves to another service touches both.
        let moved = with_rv(slice("api-a", "web", json!([{"addresses": ["10.0.1.1"]}])), "24");
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("MODIFIED", &moved)),
            Step::Applied(vec!["api".into(), "web".into()])
        );
        assert!(s.endpoints("api").is_empty());
    }

    #[test]
    fn errors_and_expiry() {
        let mut s = Slices::default();
        let mut rv = "5".to_owned();
        let expired = json!({"kind": "Status", "status": "Failure", "message": "too old resource version: 5 (9)", "reason": "Expired", "code": 410});
        assert!(
            matches!(apply_event(&mut s, &mut rv, &event("ERROR", &expired)), Step::Relist(m) if m.contains("too old"))
        );
        let gone = json!({"kind": "Status", "reason": "Gone", "code": 500});
        assert!(matches!(
            apply_event(&mut s, &mut rv, &event("ERROR", &gone)),
            Step::Relist(_)
        ));
        let other = json!({"kind": "Status", "reason": "InternalError", "message": "etcd down", "code": 500});
        assert!(
            matches!(apply_event(&mut s, &mut rv, &event("ERROR", &other)), Step::Failed(m) if m.contains("500") && m.contains("etcd down"))
        );
        assert!(matches!(
            apply_event(&mut s, &mut rv, &event("ERROR", &Value::Null)),
            Step::Failed(_)
        ));
        assert_eq!(
            apply_event(&mut s, &mut rv, &event("WHATEVER", &json!({}))),
            Step::Nothing
        );
        assert_eq!(rv, "5");
    }

    #[test]
    fn a_relist_replaces_the_state_but_keeps_refused_slices() {
        let mut old = Slices::default();
        old.put(parse_slice(&slice("web-a", "web", json!([{"addresses": ["10.0.0.1"]}]))).unwrap());
        old.put(parse_slice(&slice("web-b", "web", json!([{"addresses": ["10.0.0.2"]}]))).unwrap());
        old.put(parse_slice(&slice("api-a", "api", json!([{"addresses": ["10.0.1.1"]}]))).unwrap());
        let items = vec![
            slice("web-a", "web", json!([{"addresses": ["10.0.0.9"]}])),
            // web-b turned malformed: kept as it was.
            json!({"metadata": {"name": "web-b", "labels": {SERVICE_LABEL: "web"}}}),
            // A nameless item cannot keep anything.
            json!({"addressType": "IPv4"}),
        ];
        let (new, refused) = relist(&old, &items);
        let addrs: Vec<String> = new.endpoints("web").iter().map(|f| f.address.to_string()).collect();
        assert_eq!(addrs, ["10.0.0.2:8080", "10.0.0.9:8080"]);
        // api-a is gone from the list: gone from the state.
        assert!(new.endpoints("api").is_empty() && !new.owners.contains_key("api-a"));
        assert_eq!(
            refused.iter().map(|r| r.name.as_str()).collect::<Vec<_>>(),
            ["web-b", "?"]
        );
    }

    #[test]
    fn views_publish_changes_only() {
        let mut st = State::default();
        let mut rx = st.subscribe("web");
        assert!(rx.borrow_and_update().endpoints.is_none());
        st.synced = true;
        st.publish(None);
        assert!(rx.has_changed().unwrap());
        assert_eq!(rx.borrow_and_update().endpoints.as_deref().map(Vec::len), Some(0));
        let touched = st
            .data
            .put(parse_slice(&slice("web-a", "web", json!([{"addresses": ["10.0.0.1"]}]))).unwrap());
        st.publish(Some(&touched));
        assert_eq!(rx.borrow_and_update().endpoints.as_deref().map(Vec::len), Some(1));
        // The same content again: no wake-up.
        st.publish(Some(&touched));
        assert!(!rx.has_changed().unwrap());
        st.error = Some("down".into());
        st.publish(None);
        let v = rx.borrow_and_update().clone();
        assert_eq!(
            (v.error.as_deref(), v.endpoints.map(|e| e.len())),
            (Some("down"), Some(1))
        );
        st.connected();
        assert!(rx.borrow_and_update().error.is_none());
    }

    fn env(pairs: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        move |k| map.get(k).cloned()
    }

    #[test]
    fn in_cluster_defaults() {
        let pod = env(&[
            ("KUBERNETES_SERVICE_HOST", "10.96.0.1"),
            ("KUBERNETES_SERVICE_PORT", "443"),
        ]);
        assert_eq!(in_cluster_api(&pod).unwrap(), "https://10.96.0.1:443");
        let v6 = env(&[
            ("KUBERNETES_SERVICE_HOST", "fd00::1"),
            ("KUBERNETES_SERVICE_PORT", "6443"),
        ]);
        assert_eq!(in_cluster_api(&v6).unwrap(), "https://[fd00::1]:6443");
        assert_eq!(
            in_cluster_api(&env(&[])).unwrap_err(),
            "kubernetes.api: not set and not running in a pod (KUBERNETES_SERVICE_HOST unset)"
        );
        assert!(in_cluster_api(&env(&[("KUBERNETES_SERVICE_HOST", "10.96.0.1")]))
            .unwrap_err()
            .contains("KUBERNETES_SERVICE_PORT unset"));

        // A service account directory: token, CA and namespace come from it.
        let sa = tempfile::tempdir().unwrap();
        std::fs::write(sa.path().join("token"), "tok\n").unwrap();
        std::fs::write(sa.path().join("namespace"), "shop\n").unwrap();
        let s = settings(&KubernetesConfig::default(), &pod, sa.path()).unwrap();
        assert_eq!(
            s,
            Settings {
                api: "https://10.96.0.1:443".into(),
                namespace: "shop".into(),
                token: Some(("kubernetes.token_file", sa.path().join("token"))),
                ca: None,
            }
        );
        // Keys override; outside a pod without a service account: no token, `default`.
        let none = tempfile::tempdir().unwrap();
        let cfg = KubernetesConfig {
            api: Some("http://127.0.0.1:8001/".into()),
            ..KubernetesConfig::default()
        };
        let s = settings(&cfg, &env(&[]), none.path()).unwrap();
        assert_eq!(
            (s.api.as_str(), s.namespace.as_str(), s.token, s.ca),
            ("http://127.0.0.1:8001", "default", None, None)
        );
        let cfg = KubernetesConfig {
            namespace: Some("team-a".into()),
            token_file: Some("/t".into()),
            ..KubernetesConfig::default()
        };
        let s = settings(&cfg, &pod, sa.path()).unwrap();
        assert_eq!(
            (s.namespace.as_str(), s.token.map(|t| t.1)),
            ("team-a", Some(PathBuf::from("/t")))
        );
        // Errors name the key.
        assert!(settings(&KubernetesConfig::default(), &env(&[]), none.path())
            .unwrap_err()
            .starts_with("kubernetes.api: not set and not running in a pod"));
        let bad = KubernetesConfig {
            namespace: Some("Bad_NS".into()),
            ..cfg
        };
        assert!(settings(&bad, &pod, sa.path())
            .unwrap_err()
            .starts_with("kubernetes.namespace:"));
        std::fs::write(sa.path().join("namespace"), "\n").unwrap();
        assert!(settings(&KubernetesConfig::default(), &pod, sa.path())
            .unwrap_err()
            .starts_with("kubernetes.namespace: cannot read"));
    }

    #[test]
    fn unreadable_token_and_ca_fail_start_with_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let base = Settings {
            api: "http://127.0.0.1:1".into(),
            namespace: "default".into(),
            token: Some(("kubernetes.token_file", dir.path().join("absent"))),
            ca: None,
        };
        let e = Client::new(&base).err().unwrap();
        assert!(e.starts_with("kubernetes.token_file: cannot read"), "{e}");
        std::fs::write(dir.path().join("ca.pem"), "not a certificate\n").unwrap();
        let with_ca = Settings {
            token: None,
            ca: Some(("kubernetes.ca_file", dir.path().join("ca.pem"))),
            ..base
        };
        let e = Client::new(&with_ca).err().unwrap();
        assert!(e.starts_with("kubernetes.ca_file:"), "{e}");
    }

    #[test]
    fn token_is_read_again_after_a_while() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "one").unwrap();
        let mut t = Token::new(Some(("kubernetes.token_file", p.clone()))).unwrap();
        std::fs::write(&p, "two").unwrap();
        assert_eq!(t.current(), Some("one"));
        t.expire();
        assert_eq!(t.current(), Some("two"));
        // A failed read keeps the last token.
        std::fs::remove_file(&p).unwrap();
        t.expire();
        assert_eq!(t.current(), Some("two"));
        assert_eq!(Token::new(None).unwrap().current(), None);
    }

    #[test]
    fn status_messages() {
        assert_eq!(
            status_message(br#"{"kind":"Status","message":"forbidden: x"}"#),
            "forbidden: x"
        );
        assert_eq!(status_message(b"plain text\n"), "plain text");
        assert_eq!(status_message(b""), "");
    }
}
