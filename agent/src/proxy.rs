//! The sidecar proxy: listeners, HTTP/1.1 + HTTP/2 + gRPC serving and forwarding, TCP.
//!
//! Architecture invariant: the request path reads snapshots (route table, endpoint sets) and
//! never awaits the registry, the CMDB or the store.

pub mod activation;
pub mod body;
mod complete;
pub mod downstream;
pub mod error;
mod forward;
pub mod headers;
mod http;
pub mod listener;
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
    /// Connection slots over all listeners (`proxy.max_connections_total`).
    pub connections: Arc<tokio::sync::Semaphore>,
    /// Requests in progress over all listeners (`proxy.max_requests_in_flight`).
    pub in_flight: Arc<InFlightCap>,
    /// Where idle HTTP/1.1 connections park (`downstream/park.rs`): made at the first park;
    /// `None` when it could not be made (connections then stay on their tasks).
    pub(crate) lot: std::sync::OnceLock<Option<Arc<downstream::park::Lot>>>,
}

/// Requests in progress over all listeners, and the cap on them.
#[derive(Debug)]
pub struct InFlightCap {
    count: std::sync::atomic::AtomicUsize,
    cap: usize,
}

impl InFlightCap {
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Self {
            count: std::sync::atomic::AtomicUsize::new(0),
            cap,
        })
    }

    /// Whether `cap` requests are in progress (a soft cap: two threads may both pass at
    /// `cap - 1`).
    pub fn full(&self) -> bool {
        self.count.load(std::sync::atomic::Ordering::Relaxed) >= self.cap
    }

    pub fn count(&self) -> usize {
        self.count.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Shared {
    pub fn new(
        routes: Arc<ArcSwap<RouteTable>>,
        metrics: Arc<Metrics>,
        access_log: AccessLog,
        limits: ProxyConfig,
    ) -> Self {
        Self {
            routes,
            metrics,
            access_log,
            connections: Arc::new(tokio::sync::Semaphore::new(limits.max_connections_total)),
            in_flight: InFlightCap::new(limits.max_requests_in_flight),
            limits,
            draining: std::sync::atomic::AtomicBool::new(false),
            own_colour: arc_swap::ArcSwapOption::empty(),
            lot: std::sync::OnceLock::new(),
        }
    }
}

/// One listener's identity and target.
pub struct ListenerCtx {
    pub name: String,
    pub kind: ListenerKind,
    pub direction: Direction,
    /// The HTTP/2 server's settings (hyper's builder), for the connections that open with the
    /// HTTP/2 preface.
    pub http: Arc<hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>>,
}

/// One downstream connection's shared part: its requests in progress (for its idle and stall
/// watches), and what it holds while it lives, as does an upgrade tunnel made from it after it
/// (`listener::ConnSlot` is this type): its places under the listener's and the agent's
/// connection caps, its count in `vmesh_downstream_connections_active`, and a drain watch
/// (shutdown waits for it). One allocation per connection for both.
#[derive(Debug)]
pub struct ConnActivity {
    start: std::time::Instant,
    /// The agent-wide count every request of this connection adds to.
    global: Arc<InFlightCap>,
    active: std::sync::atomic::AtomicU32,
    /// When the last request ended, in milliseconds since `start`.
    last_end_ms: std::sync::atomic::AtomicU64,
    /// Bumped whenever a request starts or ends or a body frame moves either way: the stall
    /// watch (`proxy.stream_idle_timeout`) compares it across its period.
    progress: std::sync::atomic::AtomicU64,
    /// Set when the stall watch closed the connection: the requests it cut log the reason.
    stalled: std::sync::atomic::AtomicBool,
    /// Set for a connection resumed after it parked, or that came to park and was served on
    /// (`downstream/park.rs`, only ever after a request): it is one that was served.
    parked_once: std::sync::atomic::AtomicBool,
    /// Its places under the caps and its count (`None` once handed to its parked entry,
    /// [`ConnActivity::into_held`]).
    held: Option<Held>,
    pub drain: DrainWatch,
}

/// A connection's places under the listener's connection cap and the agent's.
pub type Permits = (tokio::sync::OwnedSemaphorePermit, tokio::sync::OwnedSemaphorePermit);

/// What an open connection holds, with its activity or, parked, in its entry
/// (`downstream/park.rs`): its places under the caps, and its count in
/// `vmesh_downstream_connections_active` (decremented when this drops).
#[derive(Debug)]
pub struct Held {
    _permits: Permits,
    counted: prometheus_client::metrics::gauge::Gauge,
}

impl Drop for Held {
    fn drop(&mut self) {
        self.counted.dec();
    }
}

/// A request in progress; its drop stamps the connection's last activity.
pub struct ActiveRequest(Arc<ConnActivity>);

impl ConnActivity {
    /// A connection that starts now, holding `permits` (the listener's cap, the agent's), counted
    /// in `counted` (decremented when the last holder drops it) and holding `drain`.
    pub fn new(
        global: Arc<InFlightCap>,
        permits: Permits,
        counted: prometheus_client::metrics::gauge::Gauge,
        drain: DrainWatch,
    ) -> Arc<Self> {
        let held = Held {
            _permits: permits,
            counted,
        };
        Self::holding(global, held, drain, None)
    }

    /// A connection resumed after it parked (after a request), from what it held while parked;
    /// idle since `idle_since` (its last request's end).
    pub fn resumed(
        global: Arc<InFlightCap>,
        held: Held,
        drain: DrainWatch,
        idle_since: std::time::Instant,
    ) -> Arc<Self> {
        Self::holding(global, held, drain, Some(idle_since))
    }

    /// `idle_since`: a resumed connection's; none for a new one (idle since now).
    fn holding(
        global: Arc<InFlightCap>,
        held: Held,
        drain: DrainWatch,
        idle_since: Option<std::time::Instant>,
    ) -> Arc<Self> {
        Arc::new(Self {
            // (No request yet on this activity: idle since `start`.)
            start: idle_since.unwrap_or_else(std::time::Instant::now),
            global,
            active: std::sync::atomic::AtomicU32::new(0),
            last_end_ms: std::sync::atomic::AtomicU64::new(0),
            progress: std::sync::atomic::AtomicU64::new(0),
            stalled: std::sync::atomic::AtomicBool::new(false),
            parked_once: std::sync::atomic::AtomicBool::new(idle_since.is_some()),
            held: Some(held),
            drain,
        })
    }

    pub fn begin(self: &Arc<Self>) -> ActiveRequest {
        self.active.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.global.count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.moved();
        ActiveRequest(self.clone())
    }

    /// Something moved on the connection (a body frame, a request's start or end).
    pub fn moved(&self) {
        self.progress.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    fn progress(&self) -> u64 {
        self.progress.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether `proxy.max_requests_in_flight` requests are in progress on the agent.
    pub fn agent_full(&self) -> bool {
        self.global.full()
    }

    /// What the connection holds and its drain watch, for its parked entry; the activity back
    /// when something else still holds it.
    pub fn into_held(self: Arc<Self>) -> Result<(Held, DrainWatch), Arc<Self>> {
        let mut me = Arc::try_unwrap(self)?;
        match me.held.take() {
            Some(held) => Ok((held, me.drain)),
            None => Err(Arc::new(me)),
        }
    }

    /// Whether the connection parked (after a request) at least once.
    pub fn parked_once(&self) -> bool {
        self.parked_once.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Marks a connection that came to park after a request (and was served on instead).
    pub fn mark_parked_once(&self) {
        self.parked_once.store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// Whether the stall watch closed this connection.
    pub fn stalled(&self) -> bool {
        self.stalled.load(std::sync::atomic::Ordering::Relaxed)
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

impl ActiveRequest {
    /// The connection this request is on.
    pub fn conn(&self) -> &ConnActivity {
        &self.0
    }
}

impl Drop for ActiveRequest {
    fn drop(&mut self) {
        self.0.moved();
        self.0.global.count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
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
    /// When serving began (after the TLS handshake, or the wait for a first byte on a
    /// permissive listener; for a connection resumed after it parked, when it began to wait
    /// for the head it waits for): the first head is due `proxy.header_read_timeout` after it.
    pub opened: std::time::Instant,
    /// Its requests in progress and what it holds (`listener::ConnSlot`: its places under the
    /// caps, its count, its drain watch); an upgrade tunnel keeps it.
    pub activity: Arc<ConnActivity>,
    /// The caller's verified identity (mutual TLS on the inbound listener), else `None`.
    pub peer: Option<Arc<crate::tls::PeerIdentity>>,
}

impl ConnCtx {
    /// What the connection holds while parked, and its listener; the context back when something
    /// else still holds it or its activity.
    pub fn into_held(self: Arc<Self>) -> Result<(Held, DrainWatch, Arc<ListenerCtx>), Arc<Self>> {
        let Self {
            shared,
            listener,
            client,
            client_ip,
            opened,
            activity,
            peer,
        } = Arc::try_unwrap(self)?;
        match activity.into_held() {
            Ok((held, drain)) => Ok((held, drain, listener)),
            Err(activity) => Err(Arc::new(Self {
                shared,
                listener,
                client,
                client_ip,
                opened,
                activity,
                peer,
            })),
        }
    }

    /// This context for a connection resumed after it parked, whose next head is due at
    /// `head_due` (as before it parked): it began to wait `proxy.header_read_timeout` before.
    /// The same allocation when nothing else holds it, as is usual.
    pub fn head_due_at(mut self: Arc<Self>, head_due: std::time::Instant) -> Arc<Self> {
        let since = head_due
            .checked_sub(self.shared.limits.header_read_timeout.get())
            .unwrap_or(head_due);
        if let Some(me) = Arc::get_mut(&mut self) {
            me.opened = since;
            return self;
        }
        Arc::new(Self {
            shared: self.shared.clone(),
            listener: self.listener.clone(),
            client: self.client,
            client_ip: self.client_ip.clone(),
            opened: since,
            activity: self.activity.clone(),
            peer: self.peer.clone(),
        })
    }

    /// The context of a connection from `client`, accepted on `listener` and holding `slot`.
    pub fn new(
        shared: Arc<Shared>,
        listener: Arc<ListenerCtx>,
        client: SocketAddr,
        peer: Option<Arc<crate::tls::PeerIdentity>>,
        slot: Arc<listener::ConnSlot>,
    ) -> Arc<Self> {
        let client_ip = client_ip(client.ip());
        Arc::new(Self {
            shared,
            listener,
            client,
            client_ip,
            opened: std::time::Instant::now(),
            activity: slot,
            peer,
        })
    }
}

thread_local! {
    /// The last client IP seen on this thread, as a header value: a sidecar's clients are mostly
    /// the one local app, so its connections share these bytes instead of holding a copy each.
    static LAST_CLIENT_IP: std::cell::RefCell<Option<(std::net::IpAddr, ::http::HeaderValue)>> =
        const { std::cell::RefCell::new(None) };
}

/// `ip` as a header value (for `x-forwarded-for`), shared with the connection before when it
/// came from the same address.
fn client_ip(ip: std::net::IpAddr) -> ::http::HeaderValue {
    LAST_CLIENT_IP.with(|last| {
        let mut last = last.borrow_mut();
        if let Some((seen, value)) = &*last {
            if *seen == ip {
                return value.clone();
            }
        }
        let value = ::http::HeaderValue::from_str(&ip.to_string())
            .unwrap_or_else(|_| ::http::HeaderValue::from_static("unknown"));
        *last = Some((ip, value.clone()));
        value
    })
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
    fn a_client_ip_is_the_same_header_value_from_the_cache_or_not() {
        let v4: std::net::IpAddr = "10.1.2.3".parse().unwrap();
        let v6: std::net::IpAddr = "::1".parse().unwrap();
        assert_eq!(super::client_ip(v4), "10.1.2.3");
        assert_eq!(super::client_ip(v4), "10.1.2.3");
        assert_eq!(super::client_ip(v6), "::1");
        assert_eq!(super::client_ip(v4), "10.1.2.3");
    }

    #[test]
    fn ports_are_stripped_from_hosts() {
        assert_eq!(strip_port("orders"), "orders");
        assert_eq!(strip_port("orders:80"), "orders");
        assert_eq!(strip_port("[::1]:80"), "[::1]:80");
        assert_eq!(strip_port("::1"), "::1");
    }
}
