//! SPIFFE workload identities: `spiffe://<trust-domain>/ns/<environment>/sa/<service>`, made
//! from the CMDB identity (service, environment) and read from a verified certificate's URI SAN;
//! Consul Connect's form `spiffe://<trust-domain>/ns/<namespace>/dc/<dc>/svc/<service>` is read
//! too (its namespace is the environment), so certificates from Connect's CA name services alike.

use std::sync::Arc;

use http::HeaderValue;
use rustls::pki_types::CertificateDer;

/// A workload identity.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SpiffeId {
    pub trust_domain: Box<str>,
    /// vmesh's `ns` (the CMDB environment), or Consul's namespace.
    pub environment: Box<str>,
    /// vmesh's `sa`, or Consul's `svc`.
    pub service: Box<str>,
    /// Consul Connect's form: the datacenter of `.../dc/<dc>/svc/<service>`; `None`: vmesh's
    /// `.../sa/<service>` form. Kept so the identity prints as the certificate wrote it.
    pub datacenter: Option<Box<str>>,
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
            datacenter: None,
        }
    }

    /// Consul Connect's identity of `service` in `namespace` of datacenter `dc`.
    pub fn connect(trust_domain: &str, namespace: &str, dc: &str, service: &str) -> Self {
        Self {
            datacenter: Some(dc.into()),
            ..Self::new(trust_domain, namespace, service)
        }
    }

    /// The identity of a CMDB service identity.
    pub fn of_workload(trust_domain: &str, id: &vmesh_cmdb::ServiceIdentity) -> Self {
        Self::new(trust_domain, &id.environment, &id.service)
    }

    /// Parses `spiffe://td/ns/env/sa/service` (vmesh's form) or
    /// `spiffe://td/ns/namespace/dc/dc/svc/service` (Consul Connect's); anything else (other
    /// paths, odd characters, Consul's admin-partition form) is `None`.
    pub fn parse(uri: &str) -> Option<Self> {
        let rest = uri.strip_prefix("spiffe://")?;
        let (td, path) = rest.split_once('/')?;
        if !valid_trust_domain(td) {
            return None;
        }
        let parts: Vec<&str> = path.split('/').take(7).collect();
        match parts[..] {
            ["ns", env, "sa", service] if valid_segment(env) && valid_segment(service) => {
                Some(Self::new(td, env, service))
            }
            ["ns", ns, "dc", dc, "svc", service] if [ns, dc, service].into_iter().all(valid_segment) => {
                Some(Self::connect(td, ns, dc, service))
            }
            _ => None,
        }
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
        match &self.datacenter {
            None => write!(
                f,
                "spiffe://{}/ns/{}/sa/{}",
                self.trust_domain, self.environment, self.service
            ),
            Some(dc) => write!(
                f,
                "spiffe://{}/ns/{}/dc/{}/svc/{}",
                self.trust_domain, self.environment, dc, self.service
            ),
        }
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
    fn consul_connect_identities_round_trip_with_the_namespace_as_environment() {
        let uri = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web";
        let id = SpiffeId::parse(uri).unwrap_or_else(|| panic!("not parsed"));
        assert_eq!(&*id.trust_domain, "11111111-2222-3333-4444-555555555555.consul");
        assert_eq!(&*id.environment, "default");
        assert_eq!(&*id.service, "web");
        assert_eq!(id.datacenter.as_deref(), Some("dc1"));
        assert_eq!(
            id,
            SpiffeId::connect("11111111-2222-3333-4444-555555555555.consul", "default", "dc1", "web")
        );
        assert_eq!(id.to_string(), uri);
        // The two forms of one service are not the same identity, but name the same service.
        let vmesh = SpiffeId::new(&id.trust_domain, "default", "web");
        assert_ne!(id, vmesh);
        assert_eq!(id.service, vmesh.service);
        assert_eq!(PeerIdentity::new(id).header, uri);
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
            "spiffe://td.consul/ns/default/dc/dc1/svc/web/extra",
            "spiffe://td.consul/ns/default/dc/dc1/sa/web",
            "spiffe://td.consul/ns/default/svc/web",
            "spiffe://td.consul/ns/default/dc//svc/web",
            "spiffe://td.consul/ap/part/ns/default/dc/dc1/svc/web",
            "spiffe://td.consul/ns/default/dc/dc1/svc/w%20eb",
            "spiffe://td.consul/agent/client/dc/dc1/id/0000",
            "spiffe://TD.consul/ns/default/dc/dc1/svc/web",
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
