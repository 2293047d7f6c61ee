//! etcd: the instance is a key `/vmesh/services/<service>/<id>` bound to a lease the agent keeps
//! alive, so the key vanishes when the agent dies; callers watch the prefix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, PutOptions};
use serde::{Deserialize, Serialize};
use tokio::sync::Mutex;

use super::{BoxFuture, Registration, Registry, RegistryError};

/// The JSON value of an instance key (design.md §4 "Registry data").
#[derive(Debug, Serialize, Deserialize, PartialEq)]
pub struct EtcdEndpoint {
    pub address: String,
    pub port: u16,
    #[serde(default = "default_weight")]
    pub weight: u32,
    #[serde(default)]
    pub meta: BTreeMap<String, serde_json::Value>,
}

fn default_weight() -> u32 {
    100
}

pub struct Etcd {
    endpoints: Vec<String>,
    client: Mutex<Option<Client>>,
    lease: Arc<Mutex<Option<i64>>>,
    lease_ttl: Duration,
    /// etcd authentication: user and password.
    auth: Option<(String, String)>,
    /// CA certificates (PEM) for an `https://` cluster, besides the system's trust store.
    ca_pem: Option<Vec<u8>>,
}

pub fn service_prefix(service: &str) -> String {
    format!("/vmesh/services/{service}/")
}

fn err(e: etcd_client::Error) -> RegistryError {
    RegistryError::Unreachable(format!("etcd: {e}"))
}

impl Etcd {
    /// A client of the etcd cluster at `address` (comma-separated endpoints). `auth`: the user
    /// and password of etcd's authentication; `ca_pem`: the CA of an `https://` cluster (else
    /// the system's trust store).
    pub fn new(address: &str, lease_ttl: Duration, auth: Option<(String, String)>, ca_pem: Option<Vec<u8>>) -> Self {
        let endpoints = address.split(',').map(|a| a.trim().to_owned()).collect();
        Self {
            endpoints,
            auth,
            ca_pem,
            client: Mutex::new(None),
            lease: Arc::new(Mutex::new(None)),
            lease_ttl,
        }
    }

    /// The shared client (one gRPC channel), connecting on first use. HTTP/2 keep-alive
    /// pings every 10 s (also while idle) so a silently dead connection fails the watch stream
    /// within 20 s instead of never firing again.
    pub async fn client(&self) -> Result<Client, RegistryError> {
        let mut guard = self.client.lock().await;
        if let Some(c) = guard.as_ref() {
            return Ok(c.clone());
        }
        // No per-request timeout: it would also cut the watch stream.
        let mut opts = etcd_client::ConnectOptions::new()
            .with_connect_timeout(Duration::from_secs(3))
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(10))
            .with_keep_alive_while_idle(true);
        if let Some((user, password)) = &self.auth {
            opts = opts.with_user(user.clone(), password.clone());
        }
        if self.endpoints.iter().any(|e| e.starts_with("https://")) {
            let mut tls = etcd_client::TlsOptions::new();
            if let Some(pem) = &self.ca_pem {
                tls = tls.ca_certificate(etcd_client::Certificate::from_pem(pem));
            }
            opts = opts.with_tls(tls);
        }
        let c = Client::connect(&self.endpoints, Some(opts)).await.map_err(err)?;
        *guard = Some(c.clone());
        Ok(c)
    }

    /// The live lease, granting one (and starting its keep-alive task) if needed.
    async fn lease(&self) -> Result<i64, RegistryError> {
        let mut guard = self.lease.lock().await;
        if let Some(id) = *guard {
            return Ok(id);
        }
        let mut c = self.client().await?;
        let ttl = i64::try_from(self.lease_ttl.as_secs()).unwrap_or(10).max(2);
        let id = self.with_deadline("lease grant", c.lease_grant(ttl, None)).await?.id();
        let (mut keeper, mut stream) = c.lease_keep_alive(id).await.map_err(err)?;
        let slot = self.lease.clone();
        let every = self.lease_ttl / 3;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(every).await;
                let alive = match keeper.keep_alive().await {
                    Ok(()) => matches!(stream.message().await, Ok(Some(r)) if r.ttl() > 0),
                    Err(_) => false,
                };
                if !alive {
                    tracing::warn!(
                        lease = id,
                        "etcd lease lost: the instance key will be written again with a new lease"
                    );
                    let mut s = slot.lock().await;
                    if *s == Some(id) {
                        *s = None;
                    }
                    return;
                }
            }
        });
        *guard = Some(id);
        Ok(id)
    }

    fn key(r: &Registration) -> String {
        format!("{}{}", service_prefix(&r.service), r.id)
    }

    pub(crate) fn value(r: &Registration) -> String {
        let meta = r
            .meta
            .iter()
            .map(|(k, v)| {
                let key = k.strip_prefix("vmesh-").unwrap_or(k).replace('-', "_");
                // Numbers where design.md has numbers; every other value stays a string.
                let numeric = matches!(key.as_str(), "ramp_start" | "ramp_window" | "weight");
                let value = match v.parse::<u64>() {
                    Ok(n) if numeric => serde_json::Value::from(n),
                    _ => serde_json::Value::from(v.clone()),
                };
                (key, value)
            })
            .collect();
        let v = EtcdEndpoint {
            address: if r.address.is_empty() {
                "127.0.0.1".to_owned()
            } else {
                r.address.clone()
            },
            port: r.port,
            weight: r.weight,
            meta,
        };
        serde_json::to_string(&v).unwrap_or_default()
    }

    /// Puts the key when the instance should be visible, deletes it otherwise.
    async fn sync(&self, r: &Registration) -> Result<(), RegistryError> {
        let mut c = self.client().await?;
        if r.healthy && !r.maintenance {
            let lease = self.lease().await?;
            self.with_deadline(
                "put",
                c.put(Self::key(r), Self::value(r), Some(PutOptions::new().with_lease(lease))),
            )
            .await?;
        } else {
            self.with_deadline("delete", c.delete(Self::key(r), None)).await?;
        }
        Ok(())
    }

    /// Runs `op` with a deadline (the client itself has none, for the sake of the watch).
    pub async fn with_deadline<T>(
        &self,
        what: &str,
        op: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
    ) -> Result<T, RegistryError> {
        match tokio::time::timeout(Duration::from_secs(10), op).await {
            Ok(r) => r.map_err(err),
            Err(_) => Err(RegistryError::Unreachable(format!(
                "etcd: {what}: no answer within 10s"
            ))),
        }
    }
}

impl Registry for Etcd {
    fn register<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(self.sync(r))
    }

    fn set_health<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(self.sync(r))
    }

    fn set_maintenance<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(self.sync(r))
    }

    fn deregister<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let mut c = self.client().await?;
            self.with_deadline("delete", c.delete(format!("{}{id}", service_prefix(service)), None))
                .await?;
            Ok(())
        })
    }

    fn is_registered<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<bool, RegistryError>> {
        Box::pin(async move {
            if !r.healthy || r.maintenance {
                // Expected absent: nothing to repair.
                return Ok(true);
            }
            let mut c = self.client().await?;
            let resp = self.with_deadline("get", c.get(Self::key(r), None)).await?;
            Ok(!resp.kvs().is_empty())
        })
    }

    fn describe(&self) -> String {
        format!("etcd {}", self.endpoints.join(","))
    }

    fn register_sets_state(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_follow_the_design_shape() {
        let r = Registration {
            id: "orders-web-01".into(),
            service: "orders".into(),
            address: "127.0.0.1".into(),
            port: 15006,
            tags: vec![],
            meta: BTreeMap::from([
                ("vmesh-env".to_owned(), "vm".to_owned()),
                ("vmesh-zone".to_owned(), "z1".to_owned()),
                ("vmesh-ramp-start".to_owned(), "1764200000".to_owned()),
                ("vmesh-ramp-window".to_owned(), "60".to_owned()),
            ]),
            weight: 33,
            healthy: true,
            maintenance: false,
            check_ttl: Duration::from_secs(15),
            deregister_critical_after: Duration::from_secs(600),
        };
        let v: serde_json::Value = serde_json::from_str(&Etcd::value(&r)).unwrap();
        assert_eq!(v["address"], "127.0.0.1");
        assert_eq!(v["port"], 15006);
        assert_eq!(v["weight"], 33);
        assert_eq!(v["meta"]["env"], "vm");
        assert_eq!(v["meta"]["ramp_start"], 1764200000u64);
    }
}
