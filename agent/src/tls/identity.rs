//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<environment>/sa/<service>`, made
//! from the CMDB identity (service, environment) and read from a verified certificate's URI SAN.

use std::sync::Arc;

use http::HeaderValue;
use rustls::pki_types::CertificateDer;

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: Box<str>,
    pub environment: Box<str>,
    pub service: Box<str>,
}

/// The verified identity of the peer of one connection, in the forms the request path uses.
#[derive(Debug)]
pub struct PeerIdentity {
    pub id: SpiffeId,
    /// `spiffe://...`, for the access log.
    pub uri: Arc<str>,
    /// The same as a header value (`x-vmesh-caller` to the app, rate-limit key).
    pub header: HeaderValue,
}

// === impl SpiffeId ===

impl SpiffeId {
    /// The identity of `service` in `environment` (as the CMDB names them).
    pub fn new(trust_domain: &str, environment: &str, service: &str) -> Self {
        Self {
            trust_domain: trust_domain.into(),
            environment: environment.into(),
            service: service.into(),
        }
    }

    /// The identity of a CMDB service identity.
    pub fn of_workload(trust_domain: &str, id: &vmesh_cmdb::ServiceIdentity) -> Self {
        Self::new(trust_domain, &id.environment, &id.service)
    }

    /// Parses `spiffe://td/ns/env/sa/service`; anything else (other paths, odd characters) is
    /// `None`.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        let mut parts = path.split('/');
        let (Some("ns"), Some(env), Some("sa"), Some(service), None) =
            (parts.next(), parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return None;
        };
        (valid_trust_domain(td) && valid_segment(env) && valid_segment(service)).then(|| Self::new(td, env, service))
    }

    /// The first SPIFFE identity among the URI SANs of `cert` (a certificate rustls verified).
    pub fn from_cert(cert: &CertificateDer<'_>) -> Option<Self> {
        let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
        let found = parsed.valid_uri_names().find_map(Self::parse);
        found
    }
}

impl std::fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "spiffe://{}/ns/{}/sa/{}",
            self.trust_domain, self.environment, self.service
        )
    }
}

/// Lower-case letters, digits, `.`, `-`, `_` (the SPIFFE trust-domain alphabet).
pub fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty()
        && td.len() <= 255
        && td
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_'))
}

/// A path segment: letters, digits, `.`, `-`, `_` (no escapes, nothing a log line must quote).
fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 128
        && s != "."
        && s != ".."
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

// === impl PeerIdentity ===

impl PeerIdentity {
    pub fn new(id: SpiffeId) -> Self {
        let uri: Arc<str> = id.to_string().into();
        // Every character of a parsed identity is visible ASCII.
        let header = HeaderValue::from_str(&uri).unwrap_or_else(|_| HeaderValue::from_static("invalid"));
        Self { id, uri, header }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identities_round_trip() {
        let id = SpiffeId::new("corp.example", "prod", "orders");
        assert_eq!(id.to_string(), "spiffe://corp.example/ns/prod/sa/orders");
        assert_eq!(SpiffeId::parse(&id.to_string()), Some(id));
    }

    #[test]
    fn other_shapes_are_not_identities() {
        for bad in [
            "https://corp.example/ns/prod/sa/orders",
            "spiffe://corp.example/ns/prod/sa/orders/extra",
            "spiffe://corp.example/sa/orders",
            "spiffe://Corp.Example/ns/prod/sa/orders",
            "spiffe://corp.example/ns/prod/sa/",
            "spiffe://corp.example/ns/../sa/orders",
            "spiffe://corp.example/ns/prod/sa/or\"ders",
            "spiffe:///ns/prod/sa/orders",
        ] {
            assert_eq!(SpiffeId::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_workload_identity_comes_from_the_cmdb_fields() {
        let cmdb: vmesh_cmdb::ServiceIdentity =
            serde_json::from_str(r#"{"service":"web","environment":"staging"}"#).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            SpiffeId::of_workload("td", &cmdb).to_string(),
            "spiffe://td/ns/staging/sa/web"
        );
    }
}
