//! Listeners: binding (with the limits of the config), the accept loop, and per-connection
//! bookkeeping (connection cap, metrics, drain).

use std::net::SocketAddr;
use std::sync::Arc;

use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};

use super::{http, tcp, ConnCtx, DrainWatch, ListenerCtx, Shared};
use crate::config::{Config, Protocol, TlsMode};
use crate::telemetry::metrics::Direction;
use crate::tls::Accepted;

/// What a listener serves.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ListenerKind {
    Inbound,
    Outbound(String),
    SharedOutbound,
}

/// A listener as the config describes it.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ListenerSpec {
    pub addr: SocketAddr,
    pub kind: ListenerKind,
    pub protocol: Protocol,
    /// TLS from clients (the inbound listener's `mode`; the app-facing outbound ones are
    /// plaintext).
    pub mode: TlsMode,
}

/// A running listener. `update` retargets it (same address, new kind or protocol) for the
/// connections it accepts next; `stop` ends its accept loop.
pub struct Running {
    pub spec: ListenerSpec,
    stop: watch::Sender<bool>,
    update: watch::Sender<Target>,
    builder: Arc<auto::Builder<TokioExecutor>>,
}

/// What the accept loop hands each new connection.
#[derive(Clone)]
struct Target {
    ctx: Arc<ListenerCtx>,
    protocol: Protocol,
    mode: TlsMode,
}

impl Target {
    fn new(spec: &ListenerSpec, builder: &Arc<auto::Builder<TokioExecutor>>) -> Self {
        let ctx = Arc::new(ListenerCtx {
            http: builder.clone(),
            name: spec.name(),
            direction: if spec.kind == ListenerKind::Inbound {
                Direction::Inbound
            } else {
                Direction::Outbound
            },
            kind: spec.kind.clone(),
        });
        Self {
            ctx,
            protocol: spec.protocol,
            mode: spec.mode,
        }
    }
}

impl ListenerSpec {
    /// Every listener a config asks for.
    pub fn from_config(c: &Config) -> Vec<Self> {
        let mut out = Vec::new();
        if let Some(inb) = &c.inbound {
            out.push(Self {
                addr: inb.listen,
                kind: ListenerKind::Inbound,
                protocol: inb.protocol,
                mode: inb.mode,
            });
        }
        if let Some(addr) = c.proxy.shared_outbound_listen {
            out.push(Self {
                addr,
                kind: ListenerKind::SharedOutbound,
                protocol: Protocol::Http,
                mode: TlsMode::Plaintext,
            });
        }
        for o in &c.outbound {
            if let Some(addr) = o.listen {
                out.push(Self {
                    addr,
                    kind: ListenerKind::Outbound(o.service.clone()),
                    protocol: o.protocol,
                    mode: TlsMode::Plaintext,
                });
            }
        }
        out
    }

    pub fn name(&self) -> String {
        match &self.kind {
            ListenerKind::Inbound => "inbound".to_owned(),
            ListenerKind::Outbound(s) => format!("outbound:{s}"),
            ListenerKind::SharedOutbound => "outbound:shared".to_owned(),
        }
    }
}

/// The listener for `addr`: the one systemd passed (socket activation), else a new one.
/// Unless a socket unit holds it, the socket also goes to systemd's fd store so that it
/// outlives a restart (`activation::keep`).
pub fn take_or_bind(inherited: &mut super::activation::Inherited, addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket_unit = inherited.from_socket_unit(addr);
    let listener = match inherited.take(addr) {
        Some(l) => {
            tracing::info!(%addr, "using the listening socket passed by systemd");
            l.set_nonblocking(true)?;
            TcpListener::from_std(l)?
        }
        None => bind(addr)?,
    };
    if !socket_unit {
        super::activation::keep(&listener, addr);
    }
    Ok(listener)
}

/// Binds a TCP listener with address reuse and a deep backlog.
pub fn bind(addr: SocketAddr) -> std::io::Result<TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    TcpListener::from_std(socket.into())
}

impl Running {
    /// Starts the accept loop of `spec` on an already bound `listener`.
    pub fn start(
        spec: ListenerSpec,
        listener: TcpListener,
        shared: Arc<Shared>,
        builder: Arc<auto::Builder<TokioExecutor>>,
        drain: DrainWatch,
    ) -> Self {
        let (stop, stop_rx) = watch::channel(false);
        let (update, target) = watch::channel(Target::new(&spec, &builder));
        tracing::info!(listener = %spec.name(), addr = %spec.addr, protocol = ?spec.protocol, "listening");
        tokio::spawn(accept_loop(listener, target, shared, drain, stop_rx));
        Self {
            spec,
            stop,
            update,
            builder,
        }
    }

    /// Serves `spec` (same address) for connections accepted from now on.
    pub fn retarget(&mut self, spec: ListenerSpec) {
        tracing::info!(listener = %spec.name(), addr = %spec.addr, protocol = ?spec.protocol, "listener retargeted");
        let _ = self.update.send(Target::new(&spec, &self.builder));
        self.spec = spec;
    }

    /// Stops accepting; open connections continue until they end.
    pub fn stop(self) {
        let _ = self.stop.send(true);
    }

    /// A reload removed this listener: stop it and take its socket out of systemd's fd store
    /// (at shutdown `stop` alone: the socket stays stored for the next run).
    pub fn remove(self) {
        super::activation::forget(self.spec.addr);
        self.stop();
    }
}

async fn accept_loop(
    listener: TcpListener,
    target: watch::Receiver<Target>,
    shared: Arc<Shared>,
    mut drain: DrainWatch,
    mut stop: watch::Receiver<bool>,
) {
    let limit = Arc::new(Semaphore::new(shared.limits.max_connections));
    let name = target.borrow().ctx.name.clone();
    let (active, total) = shared.metrics.listener(&name);
    loop {
        // At this listener's cap or the agent's, stop accepting: new clients wait in the
        // kernel's backlog.
        let permits = tokio::select! {
            p = async {
                let mine = limit.clone().acquire_owned().await?;
                let global = shared.connections.clone().acquire_owned().await?;
                Ok::<_, tokio::sync::AcquireError>((mine, global))
            } => match p { Ok(p) => p, Err(_) => break },
            () = drain.signaled() => break,
            () = stopped(&mut stop) => break,
        };
        let (stream, peer) = tokio::select! {
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(listener = %name, error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = drain.signaled() => break,
            () = stopped(&mut stop) => break,
        };
        let _ = stream.set_nodelay(true);
        total.inc();
        active.inc();
        let slot = ConnSlot::new(shared.in_flight.clone(), permits, active.clone(), drain.clone());
        let Target { ctx, protocol, mode } = target.borrow().clone();
        if protocol != Protocol::Tcp && mode == TlsMode::Plaintext {
            // A plaintext HTTP connection's task is `http::serve` itself: the future every idle
            // keep-alive connection holds, kept small.
            let conn = ConnCtx::new(shared.clone(), ctx, peer, None, slot);
            tokio::spawn(http::serve(stream, conn));
        } else {
            // Boxed: TCP forwarding and the TLS handshake hold more state than a plaintext
            // connection's whole future, which every idle connection would otherwise be sized for.
            let other = serve_other(stream, peer, protocol, mode, shared.clone(), ctx, slot);
            tokio::spawn(Box::pin(other));
        }
    }
    tracing::info!(listener = %name, "stopped accepting");
}

/// What one downstream connection holds while it lives, and an upgrade tunnel made from it
/// after it: its place under the listener's and the agent's connection caps, its count in
/// `vmesh_downstream_connections_active`, and a drain watch (shutdown waits for it). One
/// allocation with the connection's activity: the same type.
pub type ConnSlot = super::ConnActivity;

/// A TCP connection, or a connection on a TLS listener.
async fn serve_other(
    stream: TcpStream,
    peer: SocketAddr,
    protocol: Protocol,
    mode: TlsMode,
    shared: Arc<Shared>,
    listener: Arc<ListenerCtx>,
    slot: Arc<ConnSlot>,
) {
    if protocol == Protocol::Tcp {
        tcp::proxy(stream, peer, &shared, &listener, slot.drain.clone()).await;
        return;
    }
    serve_tls_conn(stream, peer, mode, shared, listener, slot).await;
}

/// A connection on a `permissive` or `strict` listener: mutual TLS (with the caller's
/// identity), or plaintext where permitted (counted), else closed with a counted code.
async fn serve_tls_conn(
    stream: TcpStream,
    peer: SocketAddr,
    mode: TlsMode,
    shared: Arc<Shared>,
    listener: Arc<ListenerCtx>,
    slot: Arc<ConnSlot>,
) {
    let accepted = crate::tls::accept(stream, mode, shared.limits.header_read_timeout.get()).await;
    // The slot moves into the connection's context (no copy kept here: an idle plaintext
    // connection parks only when nothing else holds its context and slot).
    match accepted {
        Ok(Accepted::Tls(tls, identity)) => {
            http::serve(tls, ConnCtx::new(shared, listener, peer, identity, slot)).await
        }
        Ok(Accepted::Plain(tcp)) => {
            shared
                .metrics
                .inbound_plaintext_connections
                .get_or_create(&crate::telemetry::metrics::ListenerLabels {
                    listener: listener.name.clone(),
                })
                .inc();
            http::serve(tcp, ConnCtx::new(shared, listener, peer, None, slot)).await;
        }
        Err(e) => {
            tracing::debug!(listener = %listener.name, client = %peer, error = %e, "connection refused");
            if let Some(code) = e.code() {
                shared
                    .metrics
                    .tls_refused
                    .get_or_create(&crate::telemetry::metrics::CodeLabels { code })
                    .inc();
            }
        }
    }
}

async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::route::RouteTable;
    use crate::telemetry::{AccessLog, Metrics};

    /// An idle keep-alive connection holds its task: the future of `http::serve` on a plaintext
    /// connection, its header and trailer (`tokio`'s task cell, in steps of 128 bytes). What only
    /// a request, the version detection, HTTP/2, TLS or TCP forwarding needs stays boxed.
    #[tokio::test]
    async fn a_plaintext_connection_future_stays_small() {
        let config = Config::default();
        let metrics = Metrics::new();
        let routes = Arc::new(arc_swap::ArcSwap::from_pointee(RouteTable::build(
            &config, None, &metrics,
        )));
        let shared = Arc::new(Shared::new(routes, metrics, AccessLog::off(), config.proxy.clone()));
        let builder = Arc::new(http::server_builder(&config.proxy));
        let (_drain, drain) = super::super::Drain::new();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let _client = TcpStream::connect(listener.local_addr().unwrap()).await.unwrap();
        let (stream, peer) = listener.accept().await.unwrap();
        let permits = (
            Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap(),
            Arc::new(Semaphore::new(1)).acquire_owned().await.unwrap(),
        );
        let slot = ConnSlot::new(shared.in_flight.clone(), permits, Default::default(), drain);
        let target = Target::new(
            &ListenerSpec {
                addr: peer,
                kind: ListenerKind::Inbound,
                protocol: Protocol::Http,
                mode: TlsMode::Plaintext,
            },
            &builder,
        );
        let conn = ConnCtx::new(shared, target.ctx, peer, None, slot);
        // A connection resumed after it parked has a task of its own, as small.
        let resumed = std::mem::size_of_val(&http::resume(
            TcpStream::connect(listener.local_addr().unwrap()).await.unwrap(),
            conn.clone(),
        ));
        assert!(resumed <= 408, "resumed: {resumed} bytes");
        let fut = http::serve(stream, conn);
        let size = std::mem::size_of_val(&fut);
        // With the task's header and trailer (104 bytes), a task cell of 512 bytes (tokio's cells
        // are 128-byte aligned: 8 bytes more would cost 128). It was 1,312 bytes (a cell of
        // 1,536) when the watches were a boxed future beside the connection with a timer each.
        assert!(size <= 408, "{size} bytes");
    }
}
