//! `vmesh demo`: the embedded quickstart config and the small upstreams it points at.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

/// The quickstart config, embedded in the binary.
pub const QUICKSTART: &str = include_str!("../config/quickstart.toml");

/// Starts a tiny HTTP server per address that answers with its own name.
pub async fn start_upstreams(addrs: &[(SocketAddr, &'static str)]) -> std::io::Result<()> {
    for &(addr, name) in addrs {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| async move {
                        let body = format!("hello from {name} ({} {})\n", req.method(), req.uri().path());
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        r.headers_mut()
                            .insert("x-upstream-name", http::HeaderValue::from_static(name));
                        Ok::<_, Infallible>(r)
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    Ok(())
}

/// The demo upstreams of the quickstart config.
pub fn quickstart_upstreams() -> Vec<(SocketAddr, &'static str)> {
    vec![
        (SocketAddr::from(([127, 0, 0, 1], 18080)), "local-app"),
        (SocketAddr::from(([127, 0, 0, 1], 18081)), "hello-1"),
        (SocketAddr::from(([127, 0, 0, 1], 18082)), "hello-2"),
    ]
}

#[cfg(test)]
mod tests {
    #[test]
    fn quickstart_config_is_valid() {
        crate::config::load_str(super::QUICKSTART).unwrap_or_else(|e| panic!("{e}"));
    }
}
