//! Mutual TLS between sidecars: the `[tls]` settings and modes, the certificate material in
//! force (PEM files or Consul Connect's CA, swapped whole when they change), SPIFFE workload
//! identities, and the accept and connect hooks the proxy calls (docs/security.md).
//!
//! A process has one workload identity, so the material lives in one process-wide slot (as the
//! CPU gauge does): a handshake loads it once, the watcher swaps it, and a connection made keeps
//! the configs it was made with. Nothing here runs per request: only per connection.

mod accept;
mod connect;
mod consul;
pub mod identity;
mod material;
mod verify;
mod watch;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use serde::{Deserialize, Serialize};

pub use accept::{accept, AcceptError, Accepted};
pub use connect::{connect, identity_mismatch_in, ConnectError, MeshConnector};
pub use identity::{PeerIdentity, SpiffeId};
pub use material::{LoadError, Material};
pub use watch::{spawn_watcher, ReloadCounters};

use crate::config::Dur;
use crate::registry::RegistryClient;

/// Stable code: a certificate, key or CA file (or Consul Connect's leaf or roots) cannot be read
/// or used.
pub const TLS_MATERIAL_INVALID: &str = "TLS_MATERIAL_INVALID";
/// Stable code: Consul Connect's leaf nears its `ValidBefore` and Consul has not renewed it.
pub const TLS_CERT_EXPIRING: &str = "TLS_CERT_EXPIRING";
/// The trust domain of `source = "files"` when `trust_domain` is not set.
pub const DEFAULT_TRUST_DOMAIN: &str = "vmesh.local";
/// Stable code: the callee's certificate names another service (or trust domain).
pub const UPSTREAM_IDENTITY_MISMATCH: &str = "UPSTREAM_IDENTITY_MISMATCH";

/// The CMDB identity's service name, once known (the registrar's identity; `None` before).
pub type ServiceFn = Arc<dyn Fn() -> Option<String> + Send + Sync>;

/// `[tls]`: this workload's certificate, its key and the mesh CA, issued by the organisation's
/// CA (Ansible, Vault) and read from files, read again when they change; or fetched from
/// Consul Connect's CA and followed with blocking queries.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Where the certificate, its key and the CA roots come from.
    pub source: TlsSource,
    /// The SPIFFE trust domain: identities are `spiffe://<trust_domain>/ns/<env>/sa/<service>`
    /// (Consul's: `.../ns/<namespace>/dc/<dc>/svc/<service>`). Files: `"vmesh.local"` when not set. Consul: learned from Connect's roots; when set, it
    /// must be the one Consul names.
    pub trust_domain: Option<String>,
    /// PEM certificate chain of this workload (leaf first), presented to peers both ways.
    pub cert_file: Option<PathBuf>,
    /// PEM private key of `cert_file` (PKCS#8, SEC1 or PKCS#1).
    pub key_file: Option<PathBuf>,
    /// PEM bundle of the mesh CA: peers' certificates must chain to it.
    pub ca_file: Option<PathBuf>,
    /// How often the three files are checked for a change (mtime, inode, size); SIGHUP also
    /// reads them at once. Consul: the poll period of a leaf past its refresh point.
    pub reload_interval: Dur,
}

/// `tls.source`.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "kebab-case")]
pub enum TlsSource {
    /// `cert_file`, `key_file`, `ca_file`.
    #[default]
    Files,
    /// Consul Connect's CA through the registry's Consul client: the leaf of this workload's
    /// service (`/v1/agent/connect/ca/leaf/<service>`) and the roots (`/v1/agent/connect/ca/roots`).
    Consul,
}

/// How a listener (`[inbound] mode`) or an upstream (`[[outbound]] mode`) uses TLS.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq, Hash)]
#[serde(rename_all = "kebab-case")]
pub enum TlsMode {
    /// No TLS (the default: the app side of a sidecar, and upstreams outside the mesh).
    #[default]
    Plaintext,
    /// Inbound only: mutual TLS and plaintext on the same port (told apart by the first byte);
    /// plaintext connections are counted. For migrating callers to the mesh.
    Permissive,
    /// Mutual TLS only: a peer certificate from the mesh CA is required.
    Strict,
}

static MATERIAL: ArcSwapOption<Material> = ArcSwapOption::const_empty();
/// Wakes the certificate watcher (SIGHUP).
static RELOAD_NOW: tokio::sync::Notify = tokio::sync::Notify::const_new();

/// What [`start`] leaves for later: with `source = "consul"`, following Connect's CA, which needs
/// the registry client and the workload's identity ([`Pending::follow_connect`]).
#[must_use = "source = \"consul\" starts only with follow_connect"]
pub struct Pending(Option<(TlsConfig, ReloadCounters)>);

/// At start-up: loads `[tls]` (when its files are set), puts it in force and starts the
/// watcher. An unusable set of files fails the start (`TLS_MATERIAL_INVALID`). With
/// `source = "consul"` nothing is in force yet: see [`Pending::follow_connect`].
pub fn start(c: &TlsConfig, counters: ReloadCounters) -> Result<Pending, LoadError> {
    if !c.configured() {
        return Ok(Pending(None));
    }
    if c.source == TlsSource::Consul {
        return Ok(Pending(Some((c.clone(), counters))));
    }
    let m = Material::load(c)?;
    tracing::info!(
        serial = %m.serial,
        identity = ?m.own.as_ref().map(ToString::to_string),
        "tls: certificate material loaded"
    );
    if m.own.is_none() {
        tracing::warn!(
            trust_domain = %c.trust_domain(),
            "tls: the certificate carries no spiffe:// identity of the trust domain: callers with outbound mode \"strict\" will refuse this workload"
        );
    }
    install(m);
    spawn_watcher(c.clone(), counters, &RELOAD_NOW);
    Ok(Pending(None))
}

impl Pending {
    /// `source = "consul"`: fetches the leaf of the service `service` names (once it is known)
    /// and the roots from `registry`'s Consul client, puts them in force, and follows both with
    /// blocking queries of `wait` (`registry.watch_wait`). Nothing for `source = "files"`.
    pub fn follow_connect(self, registry: Option<&RegistryClient>, service: ServiceFn, wait: Duration) {
        let Some((config, counters)) = self.0 else {
            return;
        };
        match registry {
            Some(RegistryClient::Consul(client)) => consul::spawn(config, counters, client.clone(), service, wait),
            // `check-config` refuses this; kept as a log line rather than a panic.
            _ => tracing::error!(
                code = TLS_MATERIAL_INVALID,
                "tls: source \"consul\" without a Consul registry client: no certificate will be in force"
            ),
        }
    }
}

/// Makes the watcher check the files now (SIGHUP), besides its interval.
pub fn reload_now() {
    RELOAD_NOW.notify_one();
}

/// The material in force, if `[tls]` was loaded.
pub fn current() -> Option<Arc<Material>> {
    MATERIAL.load_full()
}

/// Puts `m` in force for every handshake from now on.
pub fn install(m: Material) {
    MATERIAL.store(Some(Arc::new(m)));
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            source: TlsSource::Files,
            trust_domain: None,
            cert_file: None,
            key_file: None,
            ca_file: None,
            reload_interval: Dur::secs(5),
        }
    }
}

impl TlsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Plaintext => "plaintext",
            Self::Permissive => "permissive",
            Self::Strict => "strict",
        }
    }
}

impl TlsConfig {
    /// Whether certificate material is configured: the files, or `source = "consul"`.
    pub fn configured(&self) -> bool {
        self.source == TlsSource::Consul
            || self.cert_file.is_some()
            || self.key_file.is_some()
            || self.ca_file.is_some()
    }

    /// The trust domain set, else the files' default (Consul's material brings its own).
    pub fn trust_domain(&self) -> &str {
        self.trust_domain.as_deref().unwrap_or(DEFAULT_TRUST_DOMAIN)
    }

    /// Problems of `[tls]`, each naming its key; `needed_by` names a key that uses TLS. (That
    /// `source = "consul"` has a Consul registry is checked with the whole config.)
    pub fn validate(&self, needed_by: Option<&str>, problems: &mut Vec<String>) {
        if let Some(td) = &self.trust_domain {
            if !identity::valid_trust_domain(td) {
                problems.push(format!(
                    "tls.trust_domain: {td:?} is not a trust domain (lower-case letters, digits, '.', '-', '_')"
                ));
            }
        }
        let files = [
            ("tls.cert_file", &self.cert_file),
            ("tls.key_file", &self.key_file),
            ("tls.ca_file", &self.ca_file),
        ];
        for (key, file) in files {
            match (file, needed_by, self.source) {
                (Some(_), _, TlsSource::Consul) => problems.push(format!(
                    "{key}: not used with tls.source = \"consul\" (Consul Connect's CA issues the certificate and the roots)"
                )),
                (_, _, TlsSource::Consul) => {}
                (None, Some(user), TlsSource::Files) => {
                    problems.push(format!("{key}: required because {user} is not plaintext"))
                }
                (None, None, TlsSource::Files) if self.configured() => {
                    problems.push(format!("{key}: required with the other [tls] files"))
                }
                _ => {}
            }
        }
        if self.reload_interval.get() < std::time::Duration::from_millis(100) {
            problems.push("tls.reload_interval: at least 100ms".to_owned());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(c: &TlsConfig, needed_by: Option<&str>) -> Vec<String> {
        let mut p = Vec::new();
        c.validate(needed_by, &mut p);
        p
    }

    #[test]
    fn a_tls_mode_needs_every_file() {
        let c = TlsConfig::default();
        assert!(problems(&c, None).is_empty());
        let p = problems(&c, Some("inbound.mode"));
        assert_eq!(p.len(), 3, "{p:?}");
        assert!(
            p[0].starts_with("tls.cert_file: required because inbound.mode"),
            "{p:?}"
        );
        let partial = TlsConfig {
            cert_file: Some("/x.pem".into()),
            ..TlsConfig::default()
        };
        assert_eq!(problems(&partial, None).len(), 2);
    }

    #[test]
    fn check_config_refuses_inconsistent_tls_settings() {
        let text = r#"
            [inbound]
            listen = "127.0.0.1:15001"
            app = "127.0.0.1:8080"
            mode = "strict"
            protocol = "tcp"
            [[inbound.authz]]
            action = "allow"
            caller = ""
            [[outbound]]
            service = "orders"
            endpoints = ["127.0.0.1:9001"]
            mode = "permissive"
        "#;
        let e = crate::config::load_str(text)
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        for key in [
            "inbound.mode",
            "inbound.authz[0].caller",
            "outbound[0].mode",
            "tls.cert_file",
            "tls.key_file",
            "tls.ca_file",
        ] {
            assert!(keys.contains(&key), "{key} not in {keys:?}");
        }
        let plaintext_authz = r#"
            [inbound]
            listen = "127.0.0.1:15001"
            app = "127.0.0.1:8080"
            [[inbound.authz]]
            action = "allow"
            caller = "web"
        "#;
        let e = crate::config::load_str(plaintext_authz)
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert_eq!(e.problems.len(), 1, "{e:?}");
        assert_eq!(e.problems[0].key, "inbound.authz");
        let fine = r#"
            [inbound]
            listen = "127.0.0.1:15001"
            app = "127.0.0.1:8080"
        "#;
        assert!(crate::config::load_str(fine).is_ok());
    }

    #[test]
    fn bad_trust_domains_are_named() {
        let c = TlsConfig {
            trust_domain: Some("Bad Domain/".into()),
            ..TlsConfig::default()
        };
        assert!(problems(&c, None)[0].starts_with("tls.trust_domain:"));
        assert_eq!(TlsConfig::default().trust_domain(), DEFAULT_TRUST_DOMAIN);
    }

    #[test]
    fn source_consul_takes_no_files_and_needs_a_consul_registry_and_an_identity() {
        let consul = TlsConfig {
            source: TlsSource::Consul,
            ..TlsConfig::default()
        };
        assert!(consul.configured());
        assert!(problems(&consul, Some("inbound.mode")).is_empty(), "no files needed");
        let with_files = TlsConfig {
            cert_file: Some("/x.pem".into()),
            ca_file: Some("/ca.pem".into()),
            ..consul.clone()
        };
        let p = problems(&with_files, None);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(
            p[0].starts_with("tls.cert_file: not used with tls.source = \"consul\""),
            "{p:?}"
        );

        let base = r#"
            [cmdb]
            kind = "file"
            path = "/etc/vmesh/identity.toml"
            [inbound]
            listen = "127.0.0.1:15001"
            app = "127.0.0.1:8080"
            mode = "strict"
            [tls]
            source = "consul"
        "#;
        let e = crate::config::load_str(base)
            .err()
            .unwrap_or_else(|| panic!("accepted without a Consul registry"));
        let keys: Vec<&str> = e.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["tls.source"], "{e:?}");
        assert!(e.problems[0].message.contains("[registry] kind = \"consul\""), "{e:?}");
        let with_consul = format!("{base}\n[registry]\nkind = \"consul\"\n");
        if let Err(e) = crate::config::load_str(&with_consul) {
            panic!("refused: {e:?}");
        }
        let no_identity = with_consul.replace("path = \"/etc/vmesh/identity.toml\"", "");
        let e = crate::config::load_str(&no_identity)
            .err()
            .unwrap_or_else(|| panic!("accepted without an identity"));
        assert!(
            e.problems
                .iter()
                .any(|p| p.key == "tls.source" && p.message.contains("[cmdb]")),
            "{e:?}"
        );
        // A trust domain set with consul must still be one.
        let bad_td = with_consul.replace("source = \"consul\"", "source = \"consul\"\ntrust_domain = \"Not One\"");
        let e = crate::config::load_str(&bad_td)
            .err()
            .unwrap_or_else(|| panic!("accepted a bad trust domain"));
        assert!(e.problems.iter().any(|p| p.key == "tls.trust_domain"), "{e:?}");
    }
}
