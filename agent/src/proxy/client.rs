//! Upstream HTTP clients: pooled keep-alive connections, HTTP/1.1 or HTTP/2 (h2c).

use std::time::Duration;

use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::body::RequestBody;
use crate::config::Protocol;

pub type UpstreamClient = Client<HttpConnector, RequestBody>;

/// A pooled client for one cluster's protocol and connect timeout.
pub fn build(protocol: Protocol, connect_timeout: Duration) -> UpstreamClient {
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
    builder.build(connector)
}
