//! Loading `[tls]` files into the server and client configs every handshake uses: TLS 1.3 on
//! ring, client certificates required by the server, ALPN `h2` and `http/1.1`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

use super::identity::SpiffeId;
use super::verify::MeshServerVerifier;
use super::TlsConfig;

/// Everything one certificate generation gives: the configs and what to log about it.
pub struct Material {
    /// Inbound: requires a client certificate chaining to the mesh CA.
    pub server: Arc<ServerConfig>,
    /// The admin API (`agent.admin_tls`): the same certificate, no client certificate asked
    /// (operators and scrapers authenticate with the admin token), ALPN `http/1.1`.
    pub admin: Arc<ServerConfig>,
    /// Outbound HTTP/1.1 (ALPN `http/1.1`).
    pub client_h1: Arc<ClientConfig>,
    /// Outbound HTTP/2 and gRPC (ALPN `h2`).
    pub client_h2: Arc<ClientConfig>,
    pub trust_domain: Arc<str>,
    /// The SPIFFE identity the certificate carries in this trust domain, if any.
    pub own: Option<SpiffeId>,
    /// The leaf's serial number, hex (logged on every load).
    pub serial: String,
}

/// Why the files cannot be used; the running material stays.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{key}: {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{key}: {path}: {what}")]
    Content {
        key: &'static str,
        path: PathBuf,
        what: String,
    },
    #[error("tls: {0}")]
    Tls(String),
}

/// The crypto provider of every vmesh TLS config: ring (no aws-lc, no openssl).
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

const TLS13: &[&rustls::SupportedProtocolVersion] = &[&rustls::version::TLS13];

impl Material {
    /// Reads and checks the three files of `c` (the key must match the certificate).
    pub fn load(c: &TlsConfig) -> Result<Self, LoadError> {
        let cert_path = required("tls.cert_file", c.cert_file.as_deref())?;
        let key_path = required("tls.key_file", c.key_file.as_deref())?;
        let ca_path = required("tls.ca_file", c.ca_file.as_deref())?;
        let chain = certs("tls.cert_file", cert_path)?;
        let key = key("tls.key_file", key_path)?;
        let mut roots = RootCertStore::empty();
        for ca in certs("tls.ca_file", ca_path)? {
            roots.add(ca).map_err(|e| LoadError::Content {
                key: "tls.ca_file",
                path: ca_path.to_owned(),
                what: e.to_string(),
            })?;
        }
        let roots = Arc::new(roots);
        let tls = |e: rustls::Error| LoadError::Tls(e.to_string());

        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| LoadError::Tls(e.to_string()))?;
        let mut server = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(TLS13)
            .map_err(tls)?
            .with_client_cert_verifier(client_verifier)
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(tls)?;
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        // No resumption: every connection presents (and is checked with) the certificates in
        // force when it was made.
        server.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});

        let mut admin = ServerConfig::builder_with_provider(provider())
            .with_protocol_versions(TLS13)
            .map_err(tls)?
            .with_no_client_auth()
            .with_single_cert(chain.clone(), key.clone_key())
            .map_err(tls)?;
        admin.alpn_protocols = vec![b"http/1.1".to_vec()];

        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider())
            .build()
            .map_err(|e| LoadError::Tls(e.to_string()))?;
        let verifier = Arc::new(MeshServerVerifier(server_verifier));
        let client = |alpn: &[u8]| -> Result<Arc<ClientConfig>, LoadError> {
            let mut c = ClientConfig::builder_with_provider(provider())
                .with_protocol_versions(TLS13)
                .map_err(tls)?
                .dangerous()
                .with_custom_certificate_verifier(verifier.clone())
                .with_client_auth_cert(chain.clone(), key.clone_key())
                .map_err(tls)?;
            c.alpn_protocols = vec![alpn.to_vec()];
            c.resumption = rustls::client::Resumption::disabled();
            Ok(Arc::new(c))
        };
        let leaf = chain.first().ok_or_else(|| LoadError::Content {
            key: "tls.cert_file",
            path: cert_path.to_owned(),
            what: "no certificate".to_owned(),
        })?;
        let own = SpiffeId::from_cert(leaf).filter(|id| *id.trust_domain == *c.trust_domain);
        Ok(Self {
            server: Arc::new(server),
            admin: Arc::new(admin),
            client_h1: client(b"http/1.1")?,
            client_h2: client(b"h2")?,
            trust_domain: c.trust_domain.as_str().into(),
            own,
            serial: serial(leaf),
        })
    }
}

fn required<'a>(key: &'static str, p: Option<&'a Path>) -> Result<&'a Path, LoadError> {
    p.ok_or(LoadError::Content {
        key,
        path: PathBuf::new(),
        what: "not set".to_owned(),
    })
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, LoadError> {
    std::fs::read(path).map_err(|source| LoadError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

fn certs(key: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, LoadError> {
    let pem = read(key, path)?;
    let certs = rustls_pemfile::certs(&mut pem.as_slice())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| LoadError::Read {
            key,
            path: path.to_owned(),
            source,
        })?;
    if certs.is_empty() {
        return Err(LoadError::Content {
            key,
            path: path.to_owned(),
            what: "no PEM certificate".to_owned(),
        });
    }
    Ok(certs)
}

fn key(key: &'static str, path: &Path) -> Result<PrivateKeyDer<'static>, LoadError> {
    let pem = read(key, path)?;
    match rustls_pemfile::private_key(&mut pem.as_slice()) {
        Ok(Some(k)) => Ok(k),
        Ok(None) => Err(LoadError::Content {
            key,
            path: path.to_owned(),
            what: "no PEM private key".to_owned(),
        }),
        Err(source) => Err(LoadError::Read {
            key,
            path: path.to_owned(),
            source,
        }),
    }
}

fn serial(cert: &CertificateDer<'_>) -> String {
    use std::fmt::Write;
    let Ok(parsed) = webpki::EndEntityCert::try_from(cert) else {
        return String::new();
    };
    parsed.serial().iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02X}");
        s
    })
}
