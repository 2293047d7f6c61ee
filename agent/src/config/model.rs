//! The typed configuration: one struct per section, defaults in one place.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::units::{ByteSize, Cidr, Dur};
pub use crate::governance::authz::AuthzRule;
pub use crate::governance::colour::ColourConfig;
pub use crate::governance::routing::RouteConfig;
pub use crate::governance::FallbackConfig;
pub use crate::resilience::adaptive::AdaptiveConfig;
pub use crate::resilience::breaker::BreakerConfig;
pub use crate::resilience::outlier::OutlierConfig;
pub use crate::resilience::rate_limit::RateLimitConfig;
pub use crate::telemetry::trace::TracingConfig;
pub use crate::tls::{TlsConfig, TlsMode};

/// The whole agent configuration (`/etc/vmesh/vmesh.toml`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-wide settings: node name, state directory, admin API, threads.
    #[serde(default)]
    pub agent: AgentConfig,
    /// Where this VM's service identity comes from.
    #[serde(default)]
    pub cmdb: CmdbConfig,
    /// Where the service is registered and where upstream endpoints are discovered.
    #[serde(default)]
    pub registry: RegistryConfig,
    /// The listener that fronts the local application (absent: no inbound proxy).
    #[serde(default)]
    pub inbound: Option<InboundConfig>,
    /// Listener limits shared by every proxy listener, and the shared outbound port.
    #[serde(default)]
    pub proxy: ProxyConfig,
    /// Access log and metrics settings.
    #[serde(default)]
    pub telemetry: TelemetryConfig,
    /// Distributed tracing: spans, sampling, OTLP export (docs/tracing.md).
    #[serde(default)]
    pub tracing: TracingConfig,
    /// Upstream services the local application calls.
    #[serde(default)]
    pub outbound: Vec<OutboundConfig>,
    /// The Kubernetes API, for outbound services discovered from EndpointSlices.
    #[serde(default)]
    pub kubernetes: KubernetesConfig,
    /// Routing rules for outbound requests, first match wins (docs/governance.md).
    #[serde(default)]
    pub route: Vec<RouteConfig>,
    /// Colouring (染色) rules and the headers carried from inbound to outbound requests.
    #[serde(default)]
    pub colour: Option<ColourConfig>,
    /// This workload's certificate for mutual TLS between sidecars (docs/security.md).
    #[serde(default)]
    pub tls: TlsConfig,
}

/// `[agent]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AgentConfig {
    /// This VM's node name; default: the host name.
    pub node: Option<String>,
    /// Directory of the local state store.
    pub data_dir: PathBuf,
    /// Address of the admin API (keep it on loopback).
    pub admin_listen: SocketAddr,
    /// File holding the token that mutating admin calls must present (absent: none needed).
    pub admin_token_file: Option<PathBuf>,
    /// Serve the admin API over TLS with the `[tls]` certificate (clients are not asked for
    /// one). Required, with a token, for an `admin_listen` off loopback.
    pub admin_tls: bool,
    /// A unix socket serving the admin API too (mode 0660), to callers whose peer credentials
    /// are root, the agent's own user or one of `admin_socket_uids`; they need no token.
    pub admin_socket: Option<PathBuf>,
    /// Further user ids allowed on `admin_socket`.
    pub admin_socket_uids: Vec<u32>,
    /// Proxy worker threads; default: the number of CPUs. 1 runs a single-threaded runtime.
    pub worker_threads: Option<usize>,
    /// On SIGTERM, how long in-flight requests may take to finish before the agent exits.
    pub drain_timeout: Dur,
    /// After the instance is marked down in the registry, how long callers get to notice
    /// before the agent waits for in-flight requests to reach zero.
    pub drain_grace: Dur,
    /// Log filter (tracing `EnvFilter` syntax), e.g. "info" or "vmesh=debug".
    pub log_level: String,
}

/// `[cmdb]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CmdbConfig {
    /// Backend: `file`, `nautobot`, `netbox` or `http`.
    pub kind: CmdbKind,
    /// Identity file for `kind = "file"`.
    pub path: Option<PathBuf>,
    /// API root of the CMDB for the HTTP backends, e.g. `https://cmdb.example.com`.
    pub url: Option<String>,
    /// File holding the CMDB API token.
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signs the CMDB's certificate.
    pub ca_file: Option<PathBuf>,
    /// The VM's name in the CMDB; default: the node name.
    pub vm_name: Option<String>,
    /// How often the identity is read again.
    pub refresh: Dur,
    /// Timeout of one CMDB request.
    pub timeout: Dur,
    /// VM status values (case-insensitive) that may serve traffic; others are decommissioned.
    pub allowed_status: Vec<String>,
    /// Where each identity field is in the record (see docs/config.md); absent: the default
    /// for the backend (Nautobot/NetBox custom fields `vmesh_*`, or top-level names for http).
    pub fields: Option<vmesh_cmdb::FieldMap>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum CmdbKind {
    #[default]
    File,
    Nautobot,
    Netbox,
    Http,
    /// Environment variables (a Kubernetes pod: the downward API sets them).
    Env,
}

/// `[registry]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// `none`, `consul`, `etcd` or `memory` (in-process: the demo, a single host).
    pub kind: RegistryKind,
    /// The registry's address, e.g. `http://127.0.0.1:8500`.
    pub address: String,
    /// File holding the registry's ACL token (Consul), or the password of `username` (etcd).
    pub token_file: Option<PathBuf>,
    /// etcd: the user the agent authenticates as (etcd's auth), its password in `token_file`.
    pub username: Option<String>,
    /// A PEM file of CA certificates trusted for an `https://` registry address, besides the
    /// system's trust store.
    pub ca_file: Option<PathBuf>,
    /// Address registered for this instance; default: the inbound listen address, or (when
    /// that is a wildcard) none for Consul (the node's address applies) and 127.0.0.1 for etcd.
    pub advertise_address: Option<std::net::IpAddr>,
    /// Consul: the TTL of the check the agent passes while the app is healthy.
    pub check_ttl: Dur,
    /// Consul: a check critical this long deregisters the instance (a dead agent's leftovers).
    pub deregister_critical_after: Dur,
    /// How often the agent verifies its registration still exists (anti-entropy).
    pub anti_entropy: Dur,
    /// etcd: lease TTL of the instance key; the key vanishes this long after the agent dies.
    pub lease_ttl: Dur,
    /// Longest a blocking query waits (Consul `wait`).
    pub watch_wait: Dur,
    /// The environment this instance advertises to callers (`vm` or `k8s`).
    pub advertise_env: String,
    /// Consul: blocking queries in flight at once for discovery (Consul allows 200 HTTP
    /// connections per client by default; the registrar and the shift watch need a few more).
    pub max_watches: usize,
}

/// `[kubernetes]`: the API server EndpointSlices are read from. Inside a pod every key
/// defaults to the in-cluster service account.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct KubernetesConfig {
    /// API server URL; default `https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT`.
    pub api: Option<String>,
    /// Bearer token file; default the service account's token.
    pub token_file: Option<PathBuf>,
    /// PEM file of the CA that signs the API server's certificate; default the service
    /// account's `ca.crt` when present.
    pub ca_file: Option<PathBuf>,
    /// Namespace whose EndpointSlices are watched; default the service account's namespace,
    /// else `default`.
    pub namespace: Option<String>,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum RegistryKind {
    #[default]
    None,
    Consul,
    Etcd,
    /// An in-process table: the demo's registry, seen only by this agent's own discovery.
    Memory,
}

/// `[inbound]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// Address the inbound listener binds; the port registered for this service.
    pub listen: SocketAddr,
    /// The local application's address.
    pub app: SocketAddr,
    /// Protocol spoken to the application.
    #[serde(default)]
    pub protocol: Protocol,
    /// Deadline for the application's response headers.
    #[serde(default = "defaults::inbound_timeout")]
    pub timeout: Dur,
    /// How long to wait for a TCP connection to the application.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    /// The agent's health check of the local application.
    #[serde(default)]
    pub health: HealthConfig,
    /// Slow start after registration.
    #[serde(default)]
    pub ramp: RampConfig,
    /// A token bucket protecting the local application (per caller with `by`).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// The adaptive concurrency limit protecting the local application (latency and CPU).
    #[serde(default)]
    pub adaptive: Option<AdaptiveConfig>,
    /// TLS from callers: `plaintext` (default), `permissive` (mTLS and plaintext) or `strict`.
    #[serde(default)]
    pub mode: TlsMode,
    /// Authorization rules by caller identity, first match wins (none: every caller allowed).
    #[serde(default)]
    pub authz: Vec<AuthzRule>,
}

/// `[inbound.health]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// HTTP path to GET; absent: a TCP connect check.
    pub path: Option<String>,
    /// Time between checks.
    pub interval: Dur,
    /// Time a single check may take.
    pub timeout: Dur,
    /// gRPC apps (`protocol = "grpc"`): the service name asked of `grpc.health.v1.Health/Check`.
    pub grpc_service: String,
    /// Consecutive failures before the app counts as unhealthy.
    pub unhealthy_threshold: u32,
}

/// `[inbound.ramp]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RampConfig {
    /// Slow-start window (weight 1 -> 100); "0s" disables.
    pub window: Dur,
    /// Curve of the ramp, as Envoy's slow start `aggression`: weight follows
    /// (elapsed / window)^(1 / aggression); 1.0 is linear, larger values rise faster early.
    pub aggression: f64,
    /// Weights written to the registry during the ramp (callers interpolate between them).
    pub steps: Vec<u32>,
}

/// `[proxy]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// One outbound port for every service, routed by `Host`/`:authority` = service name.
    pub shared_outbound_listen: Option<SocketAddr>,
    /// Open downstream connections per listener; beyond this new connections wait in the backlog.
    pub max_connections: usize,
    /// Largest request head (request line + headers) accepted.
    pub max_header_bytes: ByteSize,
    /// Time a client has to send a complete request head (slowloris guard).
    pub header_read_timeout: Dur,
    /// An HTTP connection with no request in progress for this long is closed.
    pub idle_timeout: Dur,
    /// A connection with requests in progress on which no request or response body byte
    /// moves (and no request starts or ends) for this long is closed: a stalled upload, a
    /// client that stops reading, an HTTP/2 client that never opens its window. Envoy's
    /// `stream_idle_timeout`.
    pub stream_idle_timeout: Dur,
    /// A plaintext HTTP/1.1 connection idle this long between requests is parked: its task
    /// ends and its socket waits outside the runtime's reactor until the client sends (0: off).
    pub idle_park_after: Dur,
    /// Time a client has to send a whole request body, counted from the request's arrival;
    /// past it the request is answered 408 `REQUEST_BODY_TIMEOUT` (or cut, once the response
    /// has begun).
    pub request_body_timeout: Dur,
    /// Response bytes buffered per HTTP/2 stream for a client that reads slowly.
    pub h2_max_send_buffer: ByteSize,
    /// Open downstream connections over all listeners together; beyond this every listener
    /// stops accepting until one closes.
    pub max_connections_total: usize,
    /// Requests in progress over all listeners together; beyond this a request is answered
    /// 503 `AGENT_OVERLOADED` at once.
    pub max_requests_in_flight: usize,
    /// HTTP/2 streams per connection.
    pub h2_max_concurrent_streams: u32,
    /// HTTP/2 streams a client may reset before the connection is closed (rapid-reset guard).
    pub h2_max_pending_reset_streams: usize,
    /// Request bodies up to this size are buffered so the request can be retried.
    pub retry_buffer_bytes: ByteSize,
    /// Clients whose `x-forwarded-for` is kept (with their address appended); from any other
    /// client it is replaced by the client's address. Default: loopback (the local app, a
    /// front proxy on the same VM).
    pub trust_forwarded_for: Vec<Cidr>,
    /// HTTP/1.1 `Upgrade` protocols tunnelled (case-insensitive); any other upgrade request is
    /// forwarded as a plain request without its `Upgrade` header. Default: `websocket`.
    pub upgrades: Vec<String>,
}

/// `[telemetry]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `stdout`, `off`, or a file path: one JSON line per request.
    pub access_log: String,
    /// Access-log lines buffered between the request path and the writer; overflow is counted and dropped.
    pub access_log_buffer: usize,
}

/// `[[outbound]]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// The upstream service's name (also the `Host` that selects it on the shared port).
    pub service: String,
    /// A dedicated port for this service (absent: only through the shared port).
    #[serde(default)]
    pub listen: Option<SocketAddr>,
    /// Protocol spoken to the upstream endpoints.
    #[serde(default)]
    pub protocol: Protocol,
    /// Load-balancing algorithm.
    #[serde(default)]
    pub balancer: BalancerKind,
    /// Request header hashed by `ring-hash` (absent or missing header: random pick).
    #[serde(default)]
    pub hash_header: Option<String>,
    /// Deadline for the response headers, retries included.
    #[serde(default = "defaults::outbound_timeout")]
    pub timeout: Dur,
    /// Deadline of one try (absent: the whole `timeout`).
    #[serde(default)]
    pub per_try_timeout: Option<Dur>,
    /// How long to wait for a TCP connection to an endpoint.
    #[serde(default = "defaults::connect_timeout")]
    pub connect_timeout: Dur,
    /// Static endpoints; without them, discovered from the registry.
    #[serde(default)]
    pub endpoints: Vec<EndpointConfig>,
    /// Retry policy.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Where endpoints come from, merged in this order (an address found twice keeps the
    /// first source's entry): `static`, `consul`, `etcd`, `kubernetes`. Default: `static` when
    /// `endpoints` is set, else the configured registry.
    #[serde(default)]
    pub sources: Option<Vec<SourceKind>>,
    /// Consul: only instances whose checks all pass.
    #[serde(default = "defaults::yes")]
    pub passing_only: bool,
    /// Consul: only instances carrying this tag.
    #[serde(default)]
    pub tag: Option<String>,
    /// The local default split between environments; a central policy in the registry
    /// overrides it. Absent: no split (every endpoint in one pool).
    #[serde(default)]
    pub shift: Option<ShiftConfig>,
    /// Prefer endpoints in the caller's zone.
    #[serde(default)]
    pub locality: LocalityConfig,
    /// Outlier detection: when an endpoint is ejected, and for how long.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Circuit breaking: limits on connections and requests, and the error-rate breaker.
    #[serde(default)]
    pub breaker: Option<BreakerConfig>,
    /// The answer given instead of a proxy error (by default only `CIRCUIT_OPEN`).
    #[serde(default)]
    pub fallback: Option<FallbackConfig>,
    /// A token bucket on requests to this service (per caller with `by`).
    #[serde(default)]
    pub rate_limit: Option<RateLimitConfig>,
    /// TLS to the endpoints: `plaintext` (default: services outside the mesh) or `strict`
    /// (mutual TLS; the endpoint's certificate must name this service).
    #[serde(default)]
    pub mode: TlsMode,
}

/// Where an outbound service's endpoints come from.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[serde(rename_all = "kebab-case")]
pub enum SourceKind {
    Static,
    Consul,
    Etcd,
    Kubernetes,
    /// The in-process table of `[registry] kind = "memory"`.
    Memory,
}

/// `[outbound.shift]`: percent of requests per environment, integers summing to 100.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ShiftConfig {
    #[serde(default)]
    pub vm: u32,
    #[serde(default)]
    pub k8s: u32,
}

/// `[outbound.locality]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LocalityConfig {
    /// Prefer endpoints in the caller's own zone (from its identity).
    pub enabled: bool,
    /// Stay in the zone while at least this percent of its endpoints are healthy.
    pub min_healthy_percent: u32,
}

/// A static endpoint: `"127.0.0.1:8080"` or `{ address = "127.0.0.1:8080", weight = 3 }`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(untagged)]
pub enum EndpointConfig {
    Addr(SocketAddr),
    Weighted(WeightedEndpoint),
}

#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct WeightedEndpoint {
    pub address: SocketAddr,
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// Environment label: `vm` or `k8s`.
    #[serde(default = "defaults::env")]
    pub env: String,
    /// Zone label (locality).
    #[serde(default)]
    pub zone: String,
    /// Version label.
    #[serde(default)]
    pub version: String,
    /// Colour label.
    #[serde(default)]
    pub colour: String,
}

/// `[outbound.retry]`
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Retries after the first try.
    pub attempts: u32,
    /// Retry when the endpoint answers 503 (idempotent methods only).
    pub on_503: bool,
    /// Retry when the connection is reset before a response (idempotent methods only).
    pub on_reset: bool,
    /// Retries in flight may be at most this fraction of requests in flight...
    pub budget_ratio: f64,
    /// ...but this many retries are always allowed.
    pub budget_min_concurrency: usize,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum Protocol {
    /// HTTP/1.1 to the upstream; HTTP/1.1 or HTTP/2 (prior knowledge) from the client.
    #[default]
    Http,
    /// HTTP/2 (h2c) to the upstream.
    Http2,
    /// gRPC: HTTP/2 to the upstream, errors as `grpc-status`.
    Grpc,
    /// Plain TCP forwarding.
    Tcp,
}

#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum BalancerKind {
    RoundRobin,
    Weighted,
    Random,
    LeastRequest,
    #[default]
    P2cEwma,
    RingHash,
}

// === defaults ===

mod defaults {
    use super::Dur;

    pub fn inbound_timeout() -> Dur {
        Dur::secs(30)
    }
    pub fn outbound_timeout() -> Dur {
        Dur::secs(15)
    }
    pub fn connect_timeout() -> Dur {
        Dur::secs(1)
    }
    pub fn weight() -> u32 {
        100
    }
    pub fn env() -> String {
        "vm".to_owned()
    }
    pub fn yes() -> bool {
        true
    }
}

impl Default for AgentConfig {
    fn default() -> Self {
        Self {
            node: None,
            data_dir: PathBuf::from("/var/lib/vmesh"),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 9901)),
            admin_token_file: None,
            admin_tls: false,
            admin_socket: None,
            admin_socket_uids: Vec::new(),
            worker_threads: None,
            drain_timeout: Dur::secs(30),
            drain_grace: Dur::secs(5),
            log_level: "info".to_owned(),
        }
    }
}

impl Default for CmdbConfig {
    fn default() -> Self {
        Self {
            kind: CmdbKind::File,
            path: None,
            url: None,
            token_file: None,
            ca_file: None,
            vm_name: None,
            refresh: Dur::secs(300),
            timeout: Dur::secs(10),
            allowed_status: vec!["active".to_owned(), "staged".to_owned()],
            fields: None,
        }
    }
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            kind: RegistryKind::None,
            address: "http://127.0.0.1:8500".to_owned(),
            token_file: None,
            username: None,
            ca_file: None,
            advertise_address: None,
            check_ttl: Dur::secs(15),
            deregister_critical_after: Dur::secs(600),
            anti_entropy: Dur::secs(30),
            lease_ttl: Dur::secs(10),
            watch_wait: Dur::secs(30),
            advertise_env: "vm".to_owned(),
            max_watches: 128,
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            path: None,
            interval: Dur::secs(5),
            timeout: Dur::secs(2),
            grpc_service: String::new(),
            unhealthy_threshold: 2,
        }
    }
}

impl Default for RampConfig {
    fn default() -> Self {
        Self {
            window: Dur::secs(60),
            aggression: 1.0,
            steps: vec![1, 10, 33, 66, 100],
        }
    }
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            shared_outbound_listen: None,
            max_connections: 10_000,
            max_header_bytes: ByteSize(64 << 10),
            header_read_timeout: Dur::secs(10),
            idle_timeout: Dur::secs(60),
            stream_idle_timeout: Dur::secs(300),
            idle_park_after: Dur::secs(1),
            request_body_timeout: Dur::secs(300),
            h2_max_send_buffer: ByteSize(64 << 10),
            max_connections_total: 20_000,
            max_requests_in_flight: 20_000,
            h2_max_concurrent_streams: 256,
            h2_max_pending_reset_streams: 64,
            retry_buffer_bytes: ByteSize(64 << 10),
            trust_forwarded_for: loopback(),
            upgrades: vec!["websocket".to_owned()],
        }
    }
}

/// `127.0.0.0/8` and `::1/128`.
fn loopback() -> Vec<Cidr> {
    ["127.0.0.0/8", "::1/128"]
        .into_iter()
        .filter_map(|c| Cidr::parse(c).ok())
        .collect()
}

impl Default for LocalityConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_healthy_percent: 70,
        }
    }
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            access_log: "stdout".to_owned(),
            access_log_buffer: 8192,
        }
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            attempts: 2,
            on_503: true,
            on_reset: true,
            budget_ratio: 0.2,
            budget_min_concurrency: 3,
        }
    }
}

// === impl EndpointConfig ===

impl EndpointConfig {
    pub fn address(&self) -> SocketAddr {
        match self {
            Self::Addr(a) => *a,
            Self::Weighted(w) => w.address,
        }
    }

    pub fn weight(&self) -> u32 {
        match self {
            Self::Addr(_) => defaults::weight(),
            Self::Weighted(w) => w.weight,
        }
    }

    pub fn env(&self) -> &str {
        match self {
            Self::Addr(_) => "vm",
            Self::Weighted(w) => &w.env,
        }
    }

    /// `(zone, version, colour)` labels; empty when not set.
    pub fn labels(&self) -> (&str, &str, &str) {
        match self {
            Self::Addr(_) => ("", "", ""),
            Self::Weighted(w) => (&w.zone, &w.version, &w.colour),
        }
    }
}

// === impl OutboundConfig ===

impl OutboundConfig {
    /// The sources in merge order: configured, else `static` with endpoints, else the registry.
    pub fn sources(&self, registry: RegistryKind) -> Vec<SourceKind> {
        if let Some(s) = &self.sources {
            return s.clone();
        }
        if !self.endpoints.is_empty() {
            return vec![SourceKind::Static];
        }
        match registry {
            RegistryKind::Consul => vec![SourceKind::Consul],
            RegistryKind::Etcd => vec![SourceKind::Etcd],
            RegistryKind::Memory => vec![SourceKind::Memory],
            RegistryKind::None => vec![],
        }
    }
}

// === impl Config ===

impl Config {
    /// The node name: configured, else the host name.
    pub fn node_name(&self) -> String {
        self.agent.node.clone().unwrap_or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .map(|h| h.trim().to_owned())
                .unwrap_or_else(|_| "localhost".to_owned())
        })
    }
}
