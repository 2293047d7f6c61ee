//! The agent's health check of the local application: HTTP GET, TCP connect, or gRPC
//! `grpc.health.v1.Health/Check`. Results are published on a watch channel.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, Bytes};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use tokio::sync::watch;

use crate::config::{InboundConfig, Protocol};

/// How to check the app.
#[derive(Clone, Debug)]
pub enum Check {
    Http { app: SocketAddr, path: String },
    Tcp { app: SocketAddr },
    Grpc { app: SocketAddr, service: String },
}

/// The latest verdict.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Health {
    pub healthy: bool,
    /// Why the last check failed.
    pub last_error: Option<String>,
    pub checks: u64,
}

impl Check {
    pub fn from_config(c: &InboundConfig) -> Self {
        match (&c.health.path, c.protocol) {
            (_, Protocol::Grpc) => Self::Grpc {
                app: c.app,
                service: c.health.grpc_service.clone(),
            },
            (Some(path), Protocol::Http | Protocol::Http2) => Self::Http {
                app: c.app,
                path: path.clone(),
            },
            _ => Self::Tcp { app: c.app },
        }
    }

    /// Runs one check.
    pub async fn run(&self, timeout: Duration) -> Result<(), String> {
        match tokio::time::timeout(timeout, self.run_inner()).await {
            Ok(r) => r,
            Err(_) => Err(format!("no answer within {timeout:?}")),
        }
    }

    async fn run_inner(&self) -> Result<(), String> {
        match self {
            Self::Tcp { app } => tokio::net::TcpStream::connect(app)
                .await
                .map(|_| ())
                .map_err(|e| format!("tcp connect {app}: {e}")),
            Self::Http { app, path } => {
                let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
                let uri: http::Uri = format!("http://{app}{path}").parse().map_err(|e| format!("{e}"))?;
                let resp = client
                    .get(uri)
                    .await
                    .map_err(|e| format!("GET http://{app}{path}: {e}"))?;
                let status = resp.status();
                if status.is_success() {
                    Ok(())
                } else {
                    Err(format!("GET http://{app}{path}: HTTP {status}"))
                }
            }
            Self::Grpc { app, service } => grpc_check(*app, service).await,
        }
    }
}

/// A protobuf base-128 varint (a length-delimited field's length).
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// `grpc.health.v1.Health/Check` by hand: the request and response are one-field protobuf
/// messages, too small to be worth generated code.
async fn grpc_check(app: SocketAddr, service: &str) -> Result<(), String> {
    let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).http2_only(true).build_http();
    // HealthCheckRequest { string service = 1; } in a gRPC length-prefixed frame.
    let mut msg = Vec::new();
    if !service.is_empty() {
        msg.push(0x0a);
        put_varint(&mut msg, service.len() as u64);
        msg.extend_from_slice(service.as_bytes());
    }
    let mut frame = vec![0u8];
    frame.extend_from_slice(&u32::try_from(msg.len()).unwrap_or(0).to_be_bytes());
    frame.extend_from_slice(&msg);
    let req = http::Request::post(format!("http://{app}/grpc.health.v1.Health/Check"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| format!("grpc health {app}: {e}"))?;
    let header_status = resp.headers().get("grpc-status").cloned();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("grpc health {app}: {e}"))?;
    let trailer_status = collected.trailers().and_then(|t| t.get("grpc-status")).cloned();
    let status = trailer_status.or(header_status);
    if status.as_ref().map(|s| s.as_bytes()) != Some(b"0") {
        return Err(format!("grpc health {app}: grpc-status {status:?}"));
    }
    let mut body = collected.to_bytes();
    if body.len() < 5 {
        return Err(format!("grpc health {app}: empty response"));
    }
    body.advance(5);
    // HealthCheckResponse { ServingStatus status = 1; } SERVING = 1.
    match body.as_ref() {
        [0x08, 1, ..] => Ok(()),
        [0x08, s, ..] => Err(format!("grpc health {app}: status {s} (not SERVING)")),
        _ => Err(format!("grpc health {app}: status UNKNOWN")),
    }
}

/// Checks every `interval`; the app is unhealthy after `threshold` failures in a row and
/// healthy again after one success.
pub fn spawn(check: Check, interval: Duration, timeout: Duration, threshold: u32) -> watch::Receiver<Health> {
    let (tx, rx) = watch::channel(Health::default());
    tokio::spawn(async move {
        let mut failures = 0u32;
        let mut checks = 0u64;
        loop {
            let result = check.run(timeout).await;
            checks += 1;
            let prev = tx.borrow().healthy;
            let next = match &result {
                Ok(()) => {
                    failures = 0;
                    true
                }
                Err(_) => {
                    failures += 1;
                    // A never-healthy app is unhealthy at once; a healthy one after the threshold.
                    prev && failures < threshold
                }
            };
            if next != prev {
                match &result {
                    Ok(()) => tracing::info!(?check, "application healthy"),
                    Err(e) => tracing::warn!(?check, error = %e, "application unhealthy"),
                }
            }
            let health = Health {
                healthy: next,
                last_error: result.err(),
                checks,
            };
            if tx.send(health).is_err() {
                return;
            }
            tokio::time::sleep(interval).await;
        }
    });
    rx
}

#[cfg(test)]
mod tests {
    #[test]
    fn varints_encode_lengths_past_one_byte() {
        for (n, want) in [
            (0u64, vec![0u8]),
            (127, vec![0x7f]),
            (128, vec![0x80, 0x01]),
            (300, vec![0xac, 0x02]),
        ] {
            let mut out = Vec::new();
            super::put_varint(&mut out, n);
            assert_eq!(out, want, "{n}");
        }
    }
}
