//! The inbound side: a connection on a `permissive` or `strict` listener is TLS or plaintext by
//! its first byte (a TLS record starts with 0x16, a handshake); TLS ones are accepted with the
//! material in force and yield the caller's verified identity.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::identity::{PeerIdentity, SpiffeId};
use super::TlsMode;

/// The first byte of a TLS handshake record.
const TLS_HANDSHAKE: u8 = 0x16;

/// A connection ready to serve.
pub enum Accepted {
    /// Plaintext on a permissive listener.
    Plain(TcpStream),
    /// Mutual TLS, with the caller's identity when its certificate carries one of this trust
    /// domain.
    Tls(Box<TlsStream<TcpStream>>, Option<Arc<PeerIdentity>>),
}

/// Why a connection was not served; each has a stable code (log, metric label).
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    #[error("TLS_PLAINTEXT_REFUSED: plaintext on a strict listener")]
    PlaintextRefused,
    #[error("TLS_NOT_CONFIGURED: no [tls] material loaded")]
    NotConfigured,
    #[error("TLS_HANDSHAKE_FAILED: {0}")]
    Handshake(std::io::Error),
    #[error("TLS_HANDSHAKE_TIMEOUT: no handshake within {0:?}")]
    Timeout(Duration),
    /// Closed before sending anything (a port probe): not counted.
    #[error("closed before the first byte")]
    Closed,
}

impl AcceptError {
    /// The code counted in `vmesh_tls_connections_refused_total`; `None`: not a refusal.
    pub fn code(&self) -> Option<&'static str> {
        match self {
            Self::PlaintextRefused => Some("TLS_PLAINTEXT_REFUSED"),
            Self::NotConfigured => Some("TLS_NOT_CONFIGURED"),
            Self::Handshake(_) => Some("TLS_HANDSHAKE_FAILED"),
            Self::Timeout(_) => Some("TLS_HANDSHAKE_TIMEOUT"),
            Self::Closed => None,
        }
    }
}

/// Accepts `tcp` on a listener in `mode` (not plaintext), within `timeout` for the first byte
/// and the handshake together.
pub async fn accept(tcp: TcpStream, mode: TlsMode, timeout: Duration) -> Result<Accepted, AcceptError> {
    match tokio::time::timeout(timeout, accept_inner(tcp, mode)).await {
        Ok(r) => r,
        Err(_) => Err(AcceptError::Timeout(timeout)),
    }
}

async fn accept_inner(tcp: TcpStream, mode: TlsMode) -> Result<Accepted, AcceptError> {
    let mut first = [0u8; 1];
    let n = tcp.peek(&mut first).await.map_err(AcceptError::Handshake)?;
    if n == 0 {
        return Err(AcceptError::Closed);
    }
    if first[0] != TLS_HANDSHAKE {
        return match mode {
            TlsMode::Permissive | TlsMode::Plaintext => Ok(Accepted::Plain(tcp)),
            TlsMode::Strict => Err(AcceptError::PlaintextRefused),
        };
    }
    let material = super::current().ok_or(AcceptError::NotConfigured)?;
    let tls = TlsAcceptor::from(material.server.clone())
        .accept(tcp)
        .await
        .map_err(AcceptError::Handshake)?;
    let peer = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .and_then(SpiffeId::from_cert)
        .filter(|id| *id.trust_domain == *material.trust_domain)
        .map(|id| Arc::new(PeerIdentity::new(id)));
    Ok(Accepted::Tls(Box::new(tls), peer))
}
