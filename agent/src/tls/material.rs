//! Loading `[tls]` files (or PEM text from Consul Connect) into the server and client configs
//! every handshake uses: TLS 1.3 on ring, client certificates required by the server, ALPN `h2`
//! and `http/1.1`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, UnixTime};
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
    /// Material from Consul Connect (the leaf or the roots) that cannot be used.
    #[error("consul connect: {0}")]
    Connect(String),
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
        Self::build(chain, key, Arc::new(roots), c.trust_domain())
    }

    /// The material of a Consul Connect leaf (`CertPEM`: the leaf, then any intermediates;
    /// `PrivateKeyPEM`) and of the roots' `RootCert`s, in `trust_domain` (the roots'
    /// `TrustDomain`).
    pub fn from_connect(
        cert_pem: &str,
        key_pem: &str,
        root_pems: &[&str],
        trust_domain: &str,
    ) -> Result<Self, LoadError> {
        let connect = |what: String| LoadError::Connect(what);
        let chain = rustls_pemfile::certs(&mut cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| connect(format!("the leaf's CertPEM: {e}")))?;
        if chain.is_empty() {
            return Err(connect("the leaf's CertPEM holds no PEM certificate".to_owned()));
        }
        let key = match rustls_pemfile::private_key(&mut key_pem.as_bytes()) {
            Ok(Some(k)) => k,
            Ok(None) => return Err(connect("the leaf's PrivateKeyPEM holds no PEM private key".to_owned())),
            Err(e) => return Err(connect(format!("the leaf's PrivateKeyPEM: {e}"))),
        };
        let mut roots = RootCertStore::empty();
        for (i, pem) in root_pems.iter().enumerate() {
            let certs = rustls_pemfile::certs(&mut pem.as_bytes())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| connect(format!("Roots[{i}].RootCert: {e}")))?;
            for ca in certs {
                roots
                    .add(ca)
                    .map_err(|e| connect(format!("Roots[{i}].RootCert: {e}")))?;
            }
        }
        if roots.is_empty() {
            return Err(connect("the CA roots hold no certificate".to_owned()));
        }
        // A leaf and roots from two moments of a CA rotation may not fit: install only a pair
        // that peers will accept (the roots stay in force until the leaf that fits arrives).
        let roots = Arc::new(roots);
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider())
            .build()
            .map_err(|e| LoadError::Tls(e.to_string()))?;
        verifier
            .verify_client_cert(&chain[0], &chain[1..], UnixTime::now())
            .map_err(|e| connect(format!("the leaf does not verify against the CA roots: {e}")))?;
        Self::build(chain, key, roots, trust_domain)
    }

    /// The configs of one certificate generation: `chain` (leaf first) with `key`, peers
    /// checked against `roots`.
    fn build(
        chain: Vec<CertificateDer<'static>>,
        key: PrivateKeyDer<'static>,
        roots: Arc<RootCertStore>,
        trust_domain: &str,
    ) -> Result<Self, LoadError> {
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
        // The callers checked that the chain is not empty.
        let leaf = chain
            .first()
            .ok_or_else(|| LoadError::Tls("no certificate".to_owned()))?;
        let own = SpiffeId::from_cert(leaf).filter(|id| *id.trust_domain == *trust_domain);
        Ok(Self {
            server: Arc::new(server),
            admin: Arc::new(admin),
            client_h1: client(b"http/1.1")?,
            client_h2: client(b"h2")?,
            trust_domain: trust_domain.into(),
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
