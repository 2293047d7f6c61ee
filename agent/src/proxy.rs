//! The sidecar proxy: listeners, HTTP/1.1 + HTTP/2 + gRPC serving and forwarding, TCP.
//!
//! Architecture invariant: the request path reads snapshots (route table, endpoint sets) and
//! never awaits the registry, the CMDB or the store.

pub mod activation;
pub mod body;
pub mod client;
mod complete;
pub mod error;
mod forward;
pub mod headers;
mod http;
pub mod listener;
pub mod pool;
mod record;
mod shutdown;
pub mod splice;
mod tcp;

use std::net::SocketAddr;
use std::sync::Arc;

use arc_swap::ArcSwap;

pub use http::server_builder as http_builder;
pub use listener::{ListenerKind, ListenerSpec};
pub use shutdown::{Drain, DrainWatch};

use crate::config::ProxyConfig;
use crate::route::{Cluster, RouteTable};
use crate::telemetry::metrics::Direction;
use crate::telemetry::{AccessLog, Metrics};

/// What every listener shares: the live route table, telemetry, and connection settings.
pub struct Shared {
    pub routes: Arc<ArcSwap<RouteTable>>,
    pub metrics: Arc<Metrics>,
    pub access_log: AccessLog,
    pub limits: ProxyConfig,
    /// Set when the agent starts draining: HTTP/1.1 responses then carry `Connection: close`.
    pub draining: std::sync::atomic::AtomicBool,
    /// The colour of this VM's identity (a test lane), stamped on its outbound calls.
    pub own_colour: arc_swap::ArcSwapOption<::http::HeaderValue>,
}

/// One listener's identity and target.
pub struct ListenerCtx {
    pub name: String,
    pub kind: ListenerKind,
    pub direction: Direction,
}

/// Requests in progress on one downstream connection, for its idle timeout.
pub struct ConnActivity {
    start: std::time::Instant,
    active: std::sync::atomic::AtomicU32,
    /// When the last request ended, in milliseconds since `start`.
    last_end_ms: std::sync::atomic::AtomicU64,
}

/// A request in progress; its drop stamps the connection's last activity.
pub struct ActiveRequest(Arc<ConnActivity>);

impl ConnActivity {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            start: std::time::Instant::now(),
            active: std::sync::atomic::AtomicU32::new(0),
            last_end_ms: std::sync::atomic::AtomicU64::new(0),
        })
    }

    pub fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ActiveRequest(self.clone())
    }

    /// How long the connection has had no request in progress (`None`: one is in progress).
    pub fn idle_for(&self) -> Option<std::time::Duration> {
        if self.active.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            return None;
        }
        let last = std::time::Duration::from_millis(self.last_end_ms.load(std::sync::atomic::Ordering::Relaxed));
        Some(self.start.elapsed().saturating_sub(last))
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        let ms = u64::try_from(self.0.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.0.last_end_ms.store(ms, std::sync::atomic::Ordering::Relaxed);
        self.0.active.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// One downstream connection.
pub struct ConnCtx {
    pub shared: Arc<Shared>,
    pub listener: Arc<ListenerCtx>,
    pub client: SocketAddr,
    /// The client's IP as a header value, built once per connection for `x-forwarded-for`.
    pub client_ip: ::http::HeaderValue,
    pub activity: Arc<ConnActivity>,
    /// The caller's verified identity (mutual TLS on the inbound listener), else `None`.
    pub peer: Option<Arc<crate::tls::PeerIdentity>>,
}

impl ListenerCtx {
    /// The cluster this listener sends to, for a request with `host` (shared port only).
    pub fn cluster(&self, routes: &RouteTable, host: Option<&str>) -> Option<Arc<Cluster>> {
        match &self.kind {
            ListenerKind::Inbound => routes.inbound.clone(),
            ListenerKind::Outbound(service) => routes.services.get(service.as_str()).cloned(),
            ListenerKind::SharedOutbound => routes.by_host(strip_port(host?)).cloned(),
        }
    }
}

/// `orders:8080` -> `orders`; IPv6 literals keep their brackets' content whole.
fn strip_port(host: &str) -> &str {
    match host.rsplit_once(':') {
        Some((h, port)) if !h.ends_with(']') && !h.contains(':') && port.bytes().all(|b| b.is_ascii_digit()) => h,
        _ => host,
    }
}

#[cfg(test)]
mod tests {
    use super::strip_port;

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("orders"), "orders");
        assert_eq!(strip_port("orders:80"), "orders");
        assert_eq!(strip_port("[::1]:80"), "[::1]:80");
        assert_eq!(strip_port("::1"), "::1");
    }
}
