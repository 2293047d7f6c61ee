//! Certificates from Consul Connect's CA (`tls.source = "consul"`): the leaf of this workload's
//! service and the CA roots, fetched through the registry's Consul client and followed with
//! blocking queries. A new leaf (serial) or new roots put new material in force for handshakes
//! from then on; connections already made keep theirs, as with the files' rotation. Material
//! that cannot be used (another trust domain, a leaf of another service or not chaining to the
//! roots) and failed fetches keep the material in force (`vmesh_tls_reloads_total{result="failed"}`).
//!
//! Three tasks: one blocking query loop for the roots, one for the leaf (it waits until the
//! registrar knows the identity, and re-asks when the leaf nears its `ValidBefore`), and the one
//! that builds and installs the material from the last of each.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;

use super::{Material, ReloadCounters, ServiceFn, TlsConfig, TLS_CERT_EXPIRING, TLS_MATERIAL_INVALID};
use crate::registry::consul::{next_index, ConnectLeaf, ConnectRoots, Consul};
use crate::registry::{backoff, RegistryError};

/// How often the identity is looked for until the registrar knows it, for the first
/// `IDENTITY_FAST`, then every `IDENTITY_SLOW_POLL`.
const IDENTITY_POLL: Duration = Duration::from_millis(50);
const IDENTITY_FAST: Duration = Duration::from_secs(10);
const IDENTITY_SLOW_POLL: Duration = Duration::from_secs(1);
/// The longest pause after failed fetches.
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// The share of a leaf's lifetime after which Consul should have renewed it (its agent renews
/// between 60 % and 90 %): from then on the leaf is asked for afresh every `reload_interval`.
const REFRESH_AT: f64 = 0.9;
/// An answer quicker than this with an unchanged index is a server that does not block.
const TOO_QUICK: Duration = Duration::from_millis(100);
/// The pause after such an answer (never spin).
const SPIN_PAUSE: Duration = Duration::from_secs(1);

/// What the two query loops report.
enum Update {
    Roots(ConnectRoots),
    Leaf { service: String, leaf: ConnectLeaf },
    Failed { what: &'static str, error: RegistryError },
}

/// The next query of the leaf loop.
#[derive(Debug, PartialEq, Eq)]
enum Query {
    /// A blocking query on `index` for at most `wait`.
    Block { index: u64, wait: Duration },
    /// Past the refresh point: after `pause`, a query that answers at once with what the Consul
    /// agent has (a non-blocking query makes it check its leaf's expiry).
    Fresh { pause: Duration },
}

/// Starts following Connect's CA for the service `service` names (once known), through
/// `consul`, with blocking queries of at most `wait`. The tasks live as long as the runtime.
pub(super) fn spawn(
    config: TlsConfig,
    counters: ReloadCounters,
    consul: Arc<Consul>,
    service: ServiceFn,
    wait: Duration,
) {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(watch_roots(consul.clone(), wait, tx.clone()));
    tokio::spawn(watch_leaf(consul, service, wait, config.reload_interval.get(), tx));
    tokio::spawn(install_loop(config, counters, rx));
}

/// Builds material from the last roots and leaf each time one of them changes, and installs it.
async fn install_loop(config: TlsConfig, counters: ReloadCounters, mut rx: mpsc::Receiver<Update>) {
    let mut roots: Option<ConnectRoots> = None;
    let mut leaf: Option<(String, ConnectLeaf)> = None;
    let mut installed = false;
    while let Some(update) = rx.recv().await {
        match update {
            Update::Roots(r) => roots = Some(r),
            Update::Leaf { service, leaf: l } => leaf = Some((service, l)),
            Update::Failed { what, error } => {
                counters.failed.inc();
                tracing::warn!(
                    code = error.code(),
                    error = %error,
                    "tls: cannot fetch Consul Connect's {what}; the certificate in force stays"
                );
                continue;
            }
        }
        let (Some(r), Some((service, l))) = (&roots, &leaf) else {
            continue;
        };
        match material(&config, r, service, l) {
            Ok(m) => {
                tracing::info!(
                    serial = %m.serial,
                    identity = ?m.own.as_ref().map(ToString::to_string),
                    trust_domain = %m.trust_domain,
                    valid_before = %l.valid_before,
                    roots = r.roots.len(),
                    "tls: certificate material from Consul Connect in force"
                );
                super::install(m);
                if installed {
                    counters.ok.inc();
                }
                installed = true;
            }
            Err(e) => {
                counters.failed.inc();
                tracing::warn!(
                    code = TLS_MATERIAL_INVALID,
                    error = %e,
                    "tls: Consul Connect's certificate material refused; the certificate in force stays"
                );
            }
        }
    }
}

/// The material of `leaf` (asked for `service`) and `roots`, checked against `config`.
fn material(
    config: &TlsConfig,
    roots: &ConnectRoots,
    service: &str,
    leaf: &ConnectLeaf,
) -> Result<Material, super::LoadError> {
    let refuse = |what: String| super::LoadError::Connect(what);
    let td = roots.trust_domain.as_str();
    if !super::identity::valid_trust_domain(td) {
        return Err(refuse(format!("the roots' TrustDomain {td:?} is not a trust domain")));
    }
    if let Some(want) = config.trust_domain.as_deref().filter(|want| *want != td) {
        return Err(refuse(format!(
            "tls.trust_domain is {want:?} but Consul's CA names the trust domain {td:?}: set it to {td:?} or leave it out"
        )));
    }
    let pems: Vec<&str> = roots.roots.iter().map(|r| r.root_cert.as_str()).collect();
    let m = Material::from_connect(&leaf.cert_pem, &leaf.private_key_pem, &pems, td)?;
    match &m.own {
        Some(id) if *id.service == *service => Ok(m),
        other => Err(refuse(format!(
            "the leaf (serial {}) asked for service {service:?} carries {}, not an identity of {service:?} in trust domain {td:?}",
            leaf.serial_number,
            other.as_ref().map_or_else(|| format!("no spiffe:// identity of the trust domain (ServiceURI {:?})", leaf.service_uri), ToString::to_string),
        ))),
    }
}

/// The roots, with blocking queries.
async fn watch_roots(consul: Arc<Consul>, wait: Duration, tx: mpsc::Sender<Update>) {
    let mut index = 0;
    let mut last: Option<ConnectRoots> = None;
    let mut errors = 0;
    loop {
        let sent = Instant::now();
        match consul.connect_roots(index, wait).await {
            Ok(w) => {
                errors = 0;
                let next = next_index(index, w.index);
                let unchanged = next == index;
                index = next;
                if last.as_ref() != Some(&w.value) {
                    last = Some(w.value.clone());
                    if tx.send(Update::Roots(w.value)).await.is_err() {
                        return;
                    }
                } else if unchanged && sent.elapsed() < TOO_QUICK {
                    tokio::time::sleep(SPIN_PAUSE).await;
                }
            }
            Err(error) => {
                errors += 1;
                if tx
                    .send(Update::Failed {
                        what: "CA roots",
                        error,
                    })
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(backoff(errors, MAX_BACKOFF)).await;
            }
        }
    }
}

/// The leaf of the identity's service, with blocking queries; asked for afresh past its
/// refresh point, and from the start when the service name changes.
async fn watch_leaf(
    consul: Arc<Consul>,
    service_of: ServiceFn,
    wait: Duration,
    poll: Duration,
    tx: mpsc::Sender<Update>,
) {
    let looking = Instant::now();
    let mut service = loop {
        if let Some(s) = service_of() {
            break s;
        }
        // Quickly at first (a start has the identity within milliseconds), then gently (a CMDB
        // that does not answer).
        let pause = if looking.elapsed() < IDENTITY_FAST {
            IDENTITY_POLL
        } else {
            IDENTITY_SLOW_POLL
        };
        tokio::time::sleep(pause).await;
    };
    tracing::info!(%service, "tls: fetching the Consul Connect leaf of the service");
    let mut index = 0;
    let mut last: Option<ConnectLeaf> = None;
    let mut refresh_at = None;
    let mut warned = false;
    let mut errors = 0;
    loop {
        if let Some(s) = service_of().filter(|s| *s != service) {
            tracing::info!(from = %service, to = %s, "tls: the service changed: fetching its Consul Connect leaf");
            service = s;
            index = 0;
            last = None;
            refresh_at = None;
        }
        let (ask, ask_wait) = match next_query(SystemTime::now(), refresh_at, index, wait, poll) {
            Query::Block { index, wait } => (index, wait),
            Query::Fresh { pause } => {
                if !warned {
                    warned = true;
                    tracing::warn!(
                        code = TLS_CERT_EXPIRING,
                        %service,
                        valid_before = last.as_ref().map_or("", |l| l.valid_before.as_str()),
                        "tls: Consul has not renewed the Connect leaf near its ValidBefore; asking again every {poll:?}"
                    );
                }
                tokio::time::sleep(pause).await;
                (0, wait)
            }
        };
        let sent = Instant::now();
        match consul.connect_leaf(&service, ask, ask_wait).await {
            Ok(w) => {
                errors = 0;
                let next = next_index(index, w.index);
                let unchanged = next == index;
                index = next;
                let new = last
                    .as_ref()
                    .is_none_or(|l| l.serial_number != w.value.serial_number || l.cert_pem != w.value.cert_pem);
                if new {
                    refresh_at = refresh_point(&w.value);
                    warned = false;
                    last = Some(w.value.clone());
                    let update = Update::Leaf {
                        service: service.clone(),
                        leaf: w.value,
                    };
                    if tx.send(update).await.is_err() {
                        return;
                    }
                } else if unchanged && ask > 0 && sent.elapsed() < TOO_QUICK {
                    tokio::time::sleep(SPIN_PAUSE).await;
                }
            }
            Err(error) => {
                errors += 1;
                if tx.send(Update::Failed { what: "leaf", error }).await.is_err() {
                    return;
                }
                tokio::time::sleep(backoff(errors, MAX_BACKOFF)).await;
            }
        }
    }
}

/// The next leaf query: a blocking one that ends by the refresh point, or past it a fresh one.
fn next_query(now: SystemTime, refresh_at: Option<SystemTime>, index: u64, wait: Duration, poll: Duration) -> Query {
    match refresh_at.map(|at| at.duration_since(now)) {
        None => Query::Block { index, wait },
        // Consul's `wait` has a granularity of a second (the client sends whole seconds).
        Some(Ok(left)) => Query::Block {
            index,
            wait: wait.min(left).max(Duration::from_secs(1)),
        },
        Some(Err(_)) => Query::Fresh { pause: poll },
    }
}

/// When `leaf` should have been renewed: [`REFRESH_AT`] of the way from `ValidAfter` to
/// `ValidBefore`; `None` when they do not parse.
fn refresh_point(leaf: &ConnectLeaf) -> Option<SystemTime> {
    let after = parse_time(&leaf.valid_after)?;
    let before = parse_time(&leaf.valid_before)?;
    let life = before.duration_since(after).ok()?;
    Some(after + life.mul_f64(REFRESH_AT))
}

/// RFC 3339 as Go writes it: `2018-05-24T16:33:28Z`, with optional fractional seconds, or an
/// offset (`+02:00`) instead of `Z`.
fn parse_time(s: &str) -> Option<SystemTime> {
    let s = s.trim();
    let (base, offset) = match s.len().checked_sub(6).map(|i| s.split_at(i)) {
        Some((base, off)) if matches!(off.as_bytes(), [b'+' | b'-', _, _, b':', _, _]) => {
            let hours: u64 = off.get(1..3)?.parse().ok()?;
            let minutes: u64 = off.get(4..6)?.parse().ok()?;
            (
                base,
                Some((off.starts_with('-'), Duration::from_secs(hours * 3600 + minutes * 60))),
            )
        }
        _ => (s, None),
    };
    let t = humantime::parse_rfc3339_weak(base).ok()?;
    // Local time = UTC + offset.
    match offset {
        None => Some(t),
        Some((true, d)) => t.checked_add(d),
        Some((false, d)) => t.checked_sub(d),
    }
}

#[cfg(test)]
mod tests;
