//! The outbound side: mutual TLS on a new upstream connection, then the callee's SPIFFE
//! identity checked against the service the caller meant to reach. The HTTP/1.1 pool calls
//! [`connect`] on each dial; the HTTP/2 client dials through [`MeshConnector`].

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use super::identity::SpiffeId;

/// Why an mTLS connection to an upstream failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("TLS_NOT_CONFIGURED: no [tls] material loaded")]
    NotConfigured,
    #[error("TLS_HANDSHAKE_FAILED: {0}")]
    Handshake(std::io::Error),
    #[error("UPSTREAM_IDENTITY_MISMATCH: expected service {expected:?} in trust domain {trust_domain:?}, the certificate names {presented}")]
    Identity {
        expected: Arc<str>,
        trust_domain: Arc<str>,
        presented: String,
    },
}

/// Whether `e` (or an error it wraps) is an identity mismatch.
pub fn identity_mismatch_in(e: &(dyn std::error::Error + 'static)) -> bool {
    std::iter::successors(Some(e), |e| e.source())
        .any(|e| matches!(e.downcast_ref::<ConnectError>(), Some(ConnectError::Identity { .. })))
}

/// Mutual TLS on `tcp` (connected to `addr`) for `service`; ALPN `h2` or `http/1.1`.
pub async fn connect(
    tcp: TcpStream,
    addr: SocketAddr,
    h2: bool,
    service: &Arc<str>,
) -> Result<TlsStream<TcpStream>, ConnectError> {
    let material = super::current().ok_or(ConnectError::NotConfigured)?;
    let config = if h2 {
        material.client_h2.clone()
    } else {
        material.client_h1.clone()
    };
    // An IP server name: no SNI is sent; the identity check below names the peer.
    let name = ServerName::IpAddress(addr.ip().into());
    let tls = TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .map_err(ConnectError::Handshake)?;
    let presented = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(SpiffeId::from_cert);
    match presented {
        Some(id) if *id.trust_domain == *material.trust_domain && *id.service == **service => Ok(tls),
        other => Err(ConnectError::Identity {
            expected: service.clone(),
            trust_domain: material.trust_domain.clone(),
            presented: other.map_or_else(|| "no SPIFFE identity".to_owned(), |id| id.to_string()),
        }),
    }
}

/// The HTTP/2 client's connector for an mTLS upstream: TCP as the plain client dials it, then
/// [`connect`].
#[derive(Clone)]
pub struct MeshConnector {
    http: HttpConnector,
    service: Arc<str>,
}

impl MeshConnector {
    pub fn new(http: HttpConnector, service: Arc<str>) -> Self {
        Self { http, service }
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl tower_service::Service<Uri> for MeshConnector {
    type Response = MeshIo;
    type Error = BoxError;
    type Future = Pin<Box<dyn Future<Output = Result<MeshIo, BoxError>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.http, cx).map_err(Into::into)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let mut http = self.http.clone();
        let service = self.service.clone();
        Box::pin(async move {
            let tcp = tower_service::Service::call(&mut http, uri).await?.into_inner();
            let addr = tcp.peer_addr()?;
            let tls = connect(tcp, addr, true, &service).await?;
            Ok(MeshIo(TokioIo::new(tls)))
        })
    }
}

/// An mTLS upstream connection as hyper's client reads and writes it.
pub struct MeshIo(TokioIo<TlsStream<TcpStream>>);

impl Connection for MeshIo {
    fn connected(&self) -> Connected {
        let h2 = self.0.inner().get_ref().1.alpn_protocol() == Some(b"h2");
        let c = Connected::new();
        if h2 {
            c.negotiated_h2()
        } else {
            c
        }
    }
}

impl hyper::rt::Read for MeshIo {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl hyper::rt::Write for MeshIo {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}
