//! The admin API on its own port: liveness, readiness, status, config, clusters, metrics.

use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{json, Value};
use tokio::net::TcpListener;

use crate::balance::EndpointSet;
use crate::discovery::shift::{Policy, ShiftError, ShiftStatus};
use crate::route::Cluster;

mod doctor;
mod state;
mod tap;

pub use state::{AgentState, ReloadStatus};

/// Serves the admin API on TCP until the process exits; over TLS (the `[tls]` certificate)
/// with `tls`.
pub async fn serve(listener: TcpListener, state: Arc<AgentState>, tls: bool) {
    let mut backoff = Backoff::default();
    loop {
        let (stream, _) = backoff.accept("admin API", || listener.accept()).await;
        let socket = tap_handle(&stream);
        let state = state.clone();
        if !tls {
            tokio::spawn(serve_connection(stream, socket, state, false));
            continue;
        }
        tokio::spawn(async move {
            let Some(material) = crate::tls::current() else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(material.admin.clone());
            match tokio::time::timeout(ADMIN_HEAD_TIMEOUT, acceptor.accept(stream)).await {
                Ok(Ok(tls)) => serve_connection(tls, socket, state, false).await,
                Ok(Err(e)) => tracing::debug!(error = %e, "admin API: TLS handshake failed"),
                Err(_) => tracing::debug!("admin API: TLS handshake timed out"),
            }
        });
    }
}

/// Serves the admin API on the unix socket `agent.admin_socket` until the process exits: to
/// callers whose peer credentials are root, the agent's own user or one of `allowed`, which
/// need no token (the credentials are the authentication); others are closed unanswered.
pub async fn serve_unix(listener: tokio::net::UnixListener, state: Arc<AgentState>, allowed: Vec<u32>) {
    let own = own_uid();
    let mut backoff = Backoff::default();
    loop {
        let (stream, _) = backoff.accept("admin socket", || listener.accept()).await;
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if !uid.is_some_and(|u| u == 0 || Some(u) == own || allowed.contains(&u)) {
            tracing::warn!(?uid, "admin socket: caller refused by its peer credentials");
            continue;
        }
        let socket = tap_handle(&stream);
        tokio::spawn(serve_connection(stream, socket, state.clone(), true));
    }
}

/// The pause after a failed `accept` (EMFILE and friends), instead of spinning: 10 ms,
/// doubling to 1 s, back to 10 ms after a success.
struct Backoff(std::time::Duration);

impl Default for Backoff {
    fn default() -> Self {
        Self(std::time::Duration::from_millis(10))
    }
}

impl Backoff {
    /// The next connection `accept` gives, pausing after each failure.
    async fn accept<T, F, Fut>(&mut self, what: &str, mut accept: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = std::io::Result<T>>,
    {
        loop {
            match accept().await {
                Ok(conn) => {
                    *self = Self::default();
                    return conn;
                }
                Err(e) => {
                    let backoff = self.0;
                    tracing::warn!(error = %e, ?backoff, "{what}: accept failed");
                    tokio::time::sleep(backoff).await;
                    self.0 = (backoff * 2).min(std::time::Duration::from_secs(1));
                }
            }
        }
    }
}

/// A handle on a connection's socket for `/tap`, which bounds its send buffer.
fn tap_handle(stream: &impl std::os::fd::AsFd) -> Option<Arc<std::os::fd::OwnedFd>> {
    stream.as_fd().try_clone_to_owned().ok().map(Arc::new)
}

/// Binds the admin unix socket at `path` (a stale socket file from an earlier run is
/// replaced; any other file is not), readable and writable by the agent's user and group.
pub fn bind_unix(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            ));
        }
        std::fs::remove_file(path)?;
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o660))?;
    Ok(listener)
}

/// The agent's effective user id (the owner of `/proc/self`).
fn own_uid() -> Option<u32> {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/proc/self").ok().map(|m| m.uid())
}

/// How long an admin client has for its TLS handshake and each request head.
const ADMIN_HEAD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// One admin connection; `trusted` (the unix socket's checked peers) needs no token and no
/// browser checks (a browser cannot reach a unix socket).
async fn serve_connection<S>(
    stream: S,
    socket: Option<Arc<std::os::fd::OwnedFd>>,
    state: Arc<AgentState>,
    trusted: bool,
) where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let svc = hyper::service::service_fn(move |req| {
        let (state, socket) = (state.clone(), socket.clone());
        async move {
            // `/tap` streams; every other answer is whole.
            if req.uri().path() == "/tap" {
                return Ok::<_, Infallible>(tap::serve(&state, &req, socket.as_deref(), trusted));
            }
            Ok(route(&state, req, trusted).await.map(http_body_util::Either::Left))
        }
    });
    let _ = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(ADMIN_HEAD_TIMEOUT)
        .serve_connection(TokioIo::new(stream), svc)
        .await;
}

/// Browser-borne requests are refused: a `Host` that is not an IP address, `localhost` or the
/// node's name (DNS rebinding: a page on a hostile domain resolving to 127.0.0.1 could read the
/// GETs), and a call that is not a read with an `Origin` other than the admin address itself
/// (a page in a browser on the VM posting `/drain`, which needs no preflight).
fn check_origin(state: &AgentState, req: &Request<Incoming>) -> Result<(), Box<Response<Full<Bytes>>>> {
    let host = req.headers().get(header::HOST).and_then(|h| h.to_str().ok());
    if let Some(host) = host {
        let name = host_name(host);
        let node = state.config.load().node_name();
        let allowed = name.parse::<std::net::IpAddr>().is_ok()
            || name.eq_ignore_ascii_case("localhost")
            || name.eq_ignore_ascii_case(&node);
        if !allowed {
            return Err(Box::new(owned_text(
                StatusCode::FORBIDDEN,
                format!("ADMIN_HOST_REFUSED: Host {name:?} is not an IP address, localhost or the node name\n"),
            )));
        }
    }
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        let origin = req.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok());
        if let Some(origin) = origin {
            let same = host.is_some_and(|h| origin.split_once("://").is_some_and(|(_, a)| a.eq_ignore_ascii_case(h)));
            if !same {
                return Err(Box::new(owned_text(
                    StatusCode::FORBIDDEN,
                    format!("ADMIN_FOREIGN_ORIGIN: a call from {origin:?} is not a call from the admin page\n"),
                )));
            }
        }
    }
    Ok(())
}

/// `127.0.0.1:9901` -> `127.0.0.1`; `[::1]:9901` -> `::1`; `localhost` -> `localhost`.
fn host_name(host: &str) -> &str {
    if let Some(rest) = host.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    match host.rsplit_once(':') {
        Some((h, port)) if port.bytes().all(|b| b.is_ascii_digit()) && !h.contains(':') => h,
        _ => host,
    }
}

async fn route(state: &AgentState, req: Request<Incoming>, trusted: bool) -> Response<Full<Bytes>> {
    if trusted {
        return dispatch(state, req).await;
    }
    if let Err(r) = check_origin(state, &req) {
        return *r;
    }
    // Every call that is not a read needs the admin token when one is set.
    if !matches!(*req.method(), Method::GET | Method::HEAD) {
        if let Err(r) = authorize(state, &req) {
            return *r;
        }
    }
    dispatch(state, req).await
}

/// The answer of an admin call that passed the checks.
async fn dispatch(state: &AgentState, req: Request<Incoming>) -> Response<Full<Bytes>> {
    if let Some(service) = req.uri().path().strip_prefix("/shift/").filter(|s| !s.is_empty()) {
        let service = service.to_owned();
        return shift(state, req, &service).await;
    }
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/live") => text(StatusCode::OK, "live\n"),
        (&Method::GET, "/ready") => match not_ready(state) {
            None => text(StatusCode::OK, "ready\n"),
            Some(why) => owned_text(StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {why}\n")),
        },
        (&Method::POST, "/drain") => match state.lifecycle.drain().await {
            Ok(()) => {
                let mut r = json_response(lifecycle_json(state));
                *r.status_mut() = StatusCode::ACCEPTED;
                r
            }
            Err(e) => lifecycle_error(&e),
        },
        (&Method::POST, "/undrain") => {
            let timeout = query_param(&req, "timeout")
                .and_then(|t| humantime::parse_duration(&t).ok())
                .unwrap_or(std::time::Duration::from_secs(60))
                .min(std::time::Duration::from_secs(86_400));
            match state.lifecycle.undrain(timeout).await {
                Ok(()) => json_response(lifecycle_json(state)),
                Err(e) => lifecycle_error(&e),
            }
        }
        (_, "/drain" | "/undrain") => text(StatusCode::METHOD_NOT_ALLOWED, "use POST\n"),
        (&Method::GET, "/status") => json_response(status(state)),
        (&Method::GET, "/config") => json_response(config(state)),
        (&Method::GET, "/clusters") => json_response(clusters(state, query_param(&req, "service").as_deref())),
        (&Method::GET, "/metrics") => {
            // OpenMetrics for scrapers that ask for it, Prometheus text otherwise.
            let openmetrics = req
                .headers()
                .get(header::ACCEPT)
                .and_then(|a| a.to_str().ok())
                .is_some_and(|a| a.contains("application/openmetrics-text"));
            let (body, content_type) = if openmetrics {
                (
                    state.metrics.encode_openmetrics(),
                    "application/openmetrics-text; version=1.0.0; charset=utf-8",
                )
            } else {
                (
                    state.metrics.encode_prometheus(),
                    "text/plain; version=0.0.4; charset=utf-8",
                )
            };
            let mut r = Response::new(Full::new(Bytes::from(body)));
            r.headers_mut()
                .insert(header::CONTENT_TYPE, header::HeaderValue::from_static(content_type));
            r
        }
        (&Method::GET, "/shift" | "/shift/") => json_response(shift_all(state)),
        (&Method::GET, "/ui") => ui_page(),
        (&Method::GET, "/doctor") => json_response(doctor::report()),
        (_, "/doctor") => text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n"),
        (_, "/live" | "/ready" | "/status" | "/config" | "/clusters" | "/metrics" | "/shift" | "/ui") => {
            text(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n")
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// A failed drain or undrain: `<CODE>: <message>` and the code in `x-vmesh-error`, 500 when
/// nothing could change (the store), 503 otherwise (the app, the registry, a stopping agent).
fn lifecycle_error(e: &crate::lifecycle::LifecycleError) -> Response<Full<Bytes>> {
    use crate::lifecycle::LifecycleError;
    let status = match e {
        LifecycleError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::SERVICE_UNAVAILABLE,
    };
    let mut r = owned_text(status, format!("{}: {e}\n", e.code()));
    r.headers_mut()
        .insert("x-vmesh-error", header::HeaderValue::from_static(e.code()));
    r
}

/// `GET /ui`: the web console, one self-contained page (`admin/ui.html`) that calls this API.
/// Its CSP lets it run its own inline script and style and talk to this origin only.
fn ui_page() -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(include_str!("admin/ui.html").as_bytes())));
    for (name, value) in [
        (header::CONTENT_TYPE, "text/html; charset=utf-8"),
        (header::CACHE_CONTROL, "no-store"),
        (header::CONTENT_SECURITY_POLICY, "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ] {
        r.headers_mut().insert(name, header::HeaderValue::from_static(value));
    }
    r
}

/// Why the instance should not get traffic, if it should not.
fn not_ready(state: &AgentState) -> Option<String> {
    if state.draining.load(Ordering::SeqCst) {
        return Some("shutting down".into());
    }
    let s = state.lifecycle.status();
    let config = state.config.load();
    if let Some(e) = &s.store_error {
        return Some(format!("the state store cannot be read: {e}"));
    }
    if s.drain != crate::lifecycle::registrar::DrainPhase::Serving {
        return Some(format!("{:?}", s.drain).to_lowercase());
    }
    if let Some(app) = &s.app {
        if !app.healthy {
            return Some(format!(
                "application unhealthy: {}",
                app.last_error.as_deref().unwrap_or("no check yet")
            ));
        }
    }
    // A caller-only agent (no [inbound]) registers nothing: a registry is only its discovery.
    if config.registry.kind != crate::config::RegistryKind::None && config.inbound.is_some() && !s.registered {
        let why = s
            .identity_error
            .or(s.registry_error)
            .unwrap_or_else(|| "registration pending".into());
        return Some(format!("not registered: {why}"));
    }
    None
}

/// Mutating calls need the admin token when `agent.admin_token_file` is set.
fn authorize(state: &AgentState, req: &Request<Incoming>) -> Result<(), Box<Response<Full<Bytes>>>> {
    let config = state.config.load();
    let Some(path) = &config.agent.admin_token_file else {
        return Ok(());
    };
    let want = crate::config::read_secret("agent.admin_token_file", path).map_err(|e| {
        Box::new(owned_text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("ADMIN_TOKEN_UNREADABLE: {e}\n"),
        ))
    })?;
    let got = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    if got.is_some_and(|g| constant_time_eq(g.as_bytes(), want.as_bytes())) && !want.is_empty() {
        Ok(())
    } else {
        Err(Box::new(text(
            StatusCode::UNAUTHORIZED,
            "ADMIN_UNAUTHORIZED: send Authorization: Bearer <admin token>\n",
        )))
    }
}

/// Compares a presented token with the admin token in time that does not depend on where they
/// differ (only on the presented length), so the token cannot be guessed byte by byte.
fn constant_time_eq(got: &[u8], want: &[u8]) -> bool {
    let mut diff = u8::from(got.len() != want.len());
    for (i, g) in got.iter().enumerate() {
        diff |= g ^ want.get(i).copied().unwrap_or(0);
    }
    std::hint::black_box(diff) == 0
}

fn query_param(req: &Request<Incoming>, name: &str) -> Option<String> {
    req.uri().query()?.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_owned())
    })
}

fn owned_text(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn lifecycle_json(state: &AgentState) -> Value {
    serde_json::to_value(state.lifecycle.status()).unwrap_or(Value::Null)
}

fn text(status: StatusCode, body: &'static str) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn json_response(v: Value) -> Response<Full<Bytes>> {
    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    body.push(b'\n');
    let mut r = Response::new(Full::new(Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    r
}

fn reload_status(state: &AgentState) -> ReloadStatus {
    state.reload.lock().map(|s| s.clone()).unwrap_or_default()
}

fn status(state: &AgentState) -> Value {
    let config = state.config.load();
    let listeners: Vec<Value> = state
        .listeners
        .lock()
        .map(|l| {
            l.iter()
                .map(|s| json!({"name": s.name(), "address": s.addr.to_string(), "protocol": s.protocol}))
                .collect()
        })
        .unwrap_or_default();
    json!({
        "node": config.node_name(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": state.started.elapsed().as_secs(),
        "draining": state.draining.load(Ordering::SeqCst),
        "listeners": listeners,
        "reload": reload_status(state),
        "ready": not_ready(state).is_none(),
        "not_ready_reason": not_ready(state),
        "lifecycle": lifecycle_json(state),
        "discovery": {
            "stale": !state.discovery.stale_services().is_empty(),
            "stale_services": state.discovery.stale_services(),
        },
        "governance": central_policies_json(state),
    })
}

/// The central governance policies seen in the registry: per service, the key's index,
/// whether a policy is in force, and why the current value was refused (if it was).
fn central_policies_json(state: &AgentState) -> Value {
    let central = state.discovery.governance_policies().borrow().clone();
    let services: serde_json::Map<String, Value> = central
        .by_service
        .iter()
        .map(|(s, e)| {
            (
                s.clone(),
                json!({
                    "index": e.index,
                    "in_force": e.policy.is_some(),
                    "error": e.error,
                }),
            )
        })
        .collect();
    json!({ "policies": services, "error": central.error })
}

fn config(state: &AgentState) -> Value {
    let mut config = serde_json::to_value(&**state.config.load()).unwrap_or(Value::Null);
    redact(&mut config, None);
    let reload = reload_status(state);
    json!({
        "source": state.source.path.as_ref().map(|p| p.display().to_string()).unwrap_or_else(|| "embedded".into()),
        "config": config,
        "reloads": reload.reloads,
        "last_reload_error": reload.last_reload_error,
        "last_reload_at": reload.last_reload_at,
        "pending_restart": reload.pending_restart,
    })
}

/// Hides secret values (tokens, passwords) and credentials inside URLs; file paths stay.
fn redact(v: &mut Value, key: Option<&str>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m.iter_mut() {
                redact(child, Some(k));
            }
        }
        Value::Array(a) => a.iter_mut().for_each(|c| redact(c, key)),
        Value::String(s) => {
            let secret = key.is_some_and(|k| {
                let k = k.to_ascii_lowercase();
                !k.ends_with("_file") && ["token", "password", "secret"].iter().any(|w| k.contains(w))
            });
            if secret {
                *s = "[redacted]".to_owned();
            } else if let Some((scheme, rest)) = s.split_once("://") {
                if let Some((_, host)) = rest.split_once('@').filter(|(user, _)| !user.contains('/')) {
                    *s = format!("{scheme}://[redacted]@{host}");
                }
            }
        }
        _ => {}
    }
}

/// Every cluster, or only the outbound cluster of `service` (`/clusters?service=NAME`).
fn clusters(state: &AgentState, service: Option<&str>) -> Value {
    let routes = state.routes.load();
    let all = routes
        .inbound
        .iter()
        .chain(routes.services.values())
        .filter(|c| service.is_none_or(|s| c.direction.as_str() == "outbound" && &*c.service == s));
    let now = std::time::Instant::now();
    let clusters: Vec<Value> = all
        .map(|c| {
            let set = c.endpoints.load();
            let endpoints: Vec<Value> = set
                .endpoints()
                .iter()
                .map(|e| {
                    json!({
                        "address": e.addr.to_string(),
                        "weight": e.weight,
                        "env": e.env().as_str(),
                        "zone": &*e.labels.zone,
                        "version": &*e.labels.version,
                        "colour": &*e.labels.colour,
                        "source": e.labels.source.as_str(),
                        "in_flight": e.stats.in_flight(),
                        "ewma_ms": (e.stats.ewma_ns() / 1e6 * 1000.0).round() / 1000.0,
                        "healthy": !e.stats.is_ejected(),
                        "idle_connections": e.pool.idle(),
                        "ejection": ejection_json(e, now),
                    })
                })
                .collect();
            let discovery = state.discovery.status(&c.service);
            json!({
                "service": &*c.service,
                "direction": c.direction.as_str(),
                "protocol": c.protocol,
                "balancer": serde_json::to_value(c.balancer).unwrap_or(Value::Null),
                "timeout_ms": c.timeout.as_millis() as u64,
                "retries_in_flight": c.budget.active_retries(),
                "endpoints": endpoints,
                "shift": discovery.as_ref().map(|d| shift_json(&d.shift, &set)),
                "discovery": discovery.as_ref().map(|d| json!({
                    "stale": d.stale,
                    "last_update": d.last_update,
                    "error": d.error,
                    "sources": d.sources,
                    "ramp_suspended": d.ramp_suspended,
                })),
                "governance": governance_json(c, now),
            })
        })
        .collect();
    json!({ "clusters": clusters })
}

/// An endpoint's outlier state: time left in its ejection, times ejected, the last reason.
fn ejection_json(e: &crate::balance::Endpoint, now: std::time::Instant) -> Value {
    let ej = e.stats.ejection_status(now);
    json!({
        "remaining_ms": ej.remaining.map(|d| d.as_millis() as u64),
        "times_ejected": ej.times_ejected,
        "last_reason": ej.last_reason.map(|r| r.as_str()),
    })
}

/// A cluster's routes, breaker, limits and outlier settings, with their live state.
fn governance_json(c: &Cluster, now: std::time::Instant) -> Value {
    let routes: Vec<Value> = c
        .routes
        .iter()
        .map(|r| {
            json!({
                "name": &*r.name,
                "service": r.service.as_deref(),
                "split": r.split.as_ref().map(|s| s
                    .describe()
                    .into_iter()
                    .map(|(v, w)| json!({"version": &*v, "weight": w}))
                    .collect::<Vec<_>>()),
                "fault": r.fault.is_some(),
                "rate_limited": r.rate_limit.is_some(),
            })
        })
        .collect();
    json!({
        "routes": routes,
        "outlier": &c.policy.outlier,
        "breaker": c.breaker.as_ref().map(|b| json!({
            "config": &c.policy.breaker,
            "status": b.status(now),
        })),
        "fallback": c.fallback.is_some(),
        "rate_limit": &c.policy.rate_limit,
        "adaptive": c.adaptive.as_ref().map(|a| a.status()),
    })
}

// === /shift ===

/// The shift in force and the split it produces now.
fn shift_json(s: &ShiftStatus, set: &EndpointSet) -> Value {
    let split: Vec<Value> = set
        .split()
        .into_iter()
        .map(|(env, pct, n)| json!({"env": env.as_str(), "percent": pct, "endpoints": n}))
        .collect();
    json!({
        "policy": s.policy,
        "source": s.source,
        "index": s.index,
        "error": s.error,
        "split": split,
    })
}

/// The requests each environment of a cluster answered: the request counters of
/// (outbound, service, env), read through one endpoint of each environment in the set, and
/// `none` for requests that reached no endpoint.
fn observed(cluster: &Cluster, set: &EndpointSet) -> Value {
    let mut by_env = serde_json::Map::new();
    by_env.insert("none".into(), json!(cluster.metrics.no_endpoint.total()));
    for e in set.endpoints() {
        by_env
            .entry(e.env().as_str())
            .or_insert_with(|| json!(e.metrics.total()));
    }
    Value::Object(by_env)
}

fn shift_all(state: &AgentState) -> Value {
    let config = state.config.load();
    let routes = state.routes.load();
    let services: Vec<Value> = config
        .outbound
        .iter()
        .filter_map(|o| {
            let d = state.discovery.status(&o.service)?;
            let set = routes.services.get(o.service.as_str())?.endpoints.load();
            Some(json!({"service": o.service, "shift": shift_json(&d.shift, &set)}))
        })
        .collect();
    json!({ "services": services })
}

fn shift_error(e: &ShiftError) -> Response<Full<Bytes>> {
    let mut r = json_response(json!({"error": e.code(), "message": e.to_string()}));
    *r.status_mut() = StatusCode::from_u16(e.status()).unwrap_or(StatusCode::BAD_REQUEST);
    r
}

/// `GET /shift/<service>`: policy, source, index, and the observed split;
/// `PUT /shift/<service>[?cas=N]` with `{"vm": 80, "k8s": 20}`: writes the central policy with
/// compare-and-set (against the index this agent last saw when `cas` is absent).
async fn shift(state: &AgentState, req: Request<Incoming>, service: &str) -> Response<Full<Bytes>> {
    if state.discovery.status(service).is_none() {
        return shift_error(&ShiftError::UnknownService(service.to_owned()));
    }
    let current = |state: &AgentState| {
        let d = state.discovery.status(service).unwrap_or_default();
        let routes = state.routes.load();
        let cluster = routes.services.get(service);
        let set = cluster.map(|c| c.endpoints.load_full());
        json!({
            "service": service,
            "shift": set.as_ref().map(|s| shift_json(&d.shift, s)),
            "observed": cluster.zip(set.as_ref()).map(|(c, s)| observed(c, s)),
        })
    };
    match *req.method() {
        Method::GET => json_response(current(state)),
        Method::PUT => {
            let cas = match query_param(&req, "cas").map(|c| c.parse::<u64>()) {
                None => None,
                Some(Ok(c)) => Some(c),
                Some(Err(_)) => {
                    return shift_error(&ShiftError::Invalid("cas must be an unsigned integer index".into()))
                }
            };
            let body = match http_body_util::Limited::new(req.into_body(), 4096).collect().await {
                Ok(b) => b.to_bytes(),
                Err(e) => return shift_error(&ShiftError::Invalid(format!("cannot read the body: {e}"))),
            };
            let policy = match Policy::from_json(&body) {
                Ok(p) => p,
                Err(e) => return shift_error(&e),
            };
            match state.discovery.policies().write(service, policy, cas).await {
                Ok(()) => {
                    tracing::info!(service, vm = policy.vm, k8s = policy.k8s, "shift policy written");
                    // Answer with the new policy in force (the watch sees the write at once).
                    let _ = tokio::time::timeout(
                        std::time::Duration::from_secs(2),
                        state.discovery.policies().seen(service, policy),
                    )
                    .await;
                    // Let the service task pick it up too.
                    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), async {
                        while state.discovery.status(service).and_then(|d| d.shift.policy) != Some(policy) {
                            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                        }
                    })
                    .await;
                    json_response(current(state))
                }
                Err(e) => shift_error(&e),
            }
        }
        _ => text(StatusCode::METHOD_NOT_ALLOWED, "use GET or PUT\n"),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn token_comparison_is_exact() {
        for (got, want, same) in [
            ("s3cret", "s3cret", true),
            ("s3cres", "s3cret", false),
            ("s3cre", "s3cret", false),
            ("s3crett", "s3cret", false),
            ("", "s3cret", false),
            ("S3cret", "s3cret", false),
        ] {
            assert_eq!(
                super::constant_time_eq(got.as_bytes(), want.as_bytes()),
                same,
                "{got} vs {want}"
            );
        }
    }

    use super::*;

    #[test]
    fn secrets_and_url_credentials_are_redacted() {
        let mut v = json!({
            "registry": {"token": "s3cret", "token_file": "/etc/vmesh/token", "address": "http://u:p@127.0.0.1:8500"},
            "cmdb": {"url": "https://cmdb.example.com/api"},
        });
        redact(&mut v, None);
        assert_eq!(v["registry"]["token"], "[redacted]");
        assert_eq!(v["registry"]["token_file"], "/etc/vmesh/token");
        assert_eq!(v["registry"]["address"], "http://[redacted]@127.0.0.1:8500");
        assert_eq!(v["cmdb"]["url"], "https://cmdb.example.com/api");
    }
}
