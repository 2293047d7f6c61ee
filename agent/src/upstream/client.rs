//! Upstream HTTP/2 clients: pooled multiplexed connections, h2c, or h2 over mutual TLS (ALPN)
//! for an upstream in `mode = "strict"`.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::{Client, ResponseFuture};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::RequestBody;
use crate::config::Protocol;
use crate::tls::MeshConnector;

/// A cluster's client: plaintext, or mutual TLS to endpoints that must prove to be the service.
#[derive(Clone)]
pub enum UpstreamClient {
    Plain(Client<HttpConnector, RequestBody>),
    Mesh(Client<MeshConnector, RequestBody>),
}

impl UpstreamClient {
    pub fn request(&self, req: Request<RequestBody>) -> ResponseFuture {
        match self {
            Self::Plain(c) => c.request(req),
            Self::Mesh(c) => c.request(req),
        }
    }
}

/// A pooled client for one cluster's protocol and connect timeout; with `mtls`, the service
/// the endpoints' certificates must name.
pub fn build(protocol: Protocol, connect_timeout: Duration, mtls: Option<Arc<str>>) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    connector.set_connect_timeout(Some(connect_timeout));
    connector.enforce_http(true);
    let mut builder = Client::builder(TokioExecutor::new());
    builder
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(1024)
        .retry_canceled_requests(true);
    if matches!(protocol, Protocol::Http2 | Protocol::Grpc) {
        builder
            .http2_only(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .http2_keep_alive_timeout(Duration::from_secs(10))
            .http2_adaptive_window(true);
    }
    match mtls {
        None => UpstreamClient::Plain(builder.build(connector)),
        Some(service) => UpstreamClient::Mesh(builder.build(MeshConnector::new(connector, service))),
    }
}
