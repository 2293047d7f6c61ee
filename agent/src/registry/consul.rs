//! Consul's HTTP API on reqwest: agent service register/deregister/maintenance, TTL checks,
//! and blocking queries on health and KV (see shared/consul-api.md for the contract).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{backoff, BoxFuture, Discovered, Recovered, Registration, Registry, RegistryError};

/// A Consul client (one agent address).
#[derive(Clone)]
pub struct Consul {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

/// One entry of `/v1/health/service/:service`.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HealthEntry {
    node: Node,
    service: Service,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Node {
    #[serde(default)]
    address: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Service {
    #[serde(default)]
    address: String,
    port: u16,
    #[serde(default)]
    meta: Option<BTreeMap<String, String>>,
    #[serde(default)]
    weights: Option<Weights>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Weights {
    passing: u32,
}

/// Writes are retried this many times on transport errors and 5xx answers.
const WRITE_TRIES: u32 = 4;

impl Consul {
    pub fn new(address: &str, token: Option<String>) -> Result<Self, RegistryError> {
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .build()
            .map_err(|e| RegistryError::BadResponse(e.to_string()))?;
        Ok(Self {
            base: address.trim_end_matches('/').to_owned(),
            token,
            client,
        })
    }

    fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut req = self.client.request(method, format!("{}{path}", self.base));
        if let Some(t) = &self.token {
            req = req.header("X-Consul-Token", t);
        }
        req
    }

    /// A GET of a JSON document; 404 is `Ok(None)`.
    async fn get_json(&self, path: &str) -> Result<Option<Value>, RegistryError> {
        let resp = self
            .request(reqwest::Method::GET, path)
            .timeout(Duration::from_secs(10))
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable(format!("GET {path}: {e}")))?;
        match resp.status().as_u16() {
            200 => resp
                .json()
                .await
                .map(Some)
                .map_err(|e| RegistryError::BadResponse(format!("GET {path}: {e}"))),
            404 => Ok(None),
            403 => Err(RegistryError::Denied(format!("GET {path}: 403"))),
            s => Err(RegistryError::Unreachable(format!("GET {path}: HTTP {s}"))),
        }
    }

    /// A PUT with retries and backoff; 404 is returned to the caller as `Ok(404)`.
    async fn put(&self, path: &str, body: Option<&Value>) -> Result<u16, RegistryError> {
        let mut last = None;
        for attempt in 0..WRITE_TRIES {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt, Duration::from_secs(2))).await;
            }
            let mut req = self
                .request(reqwest::Method::PUT, path)
                .timeout(Duration::from_secs(10));
            if let Some(b) = body {
                req = req.json(b);
            }
            match req.send().await {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    match status {
                        200..=299 | 404 => return Ok(status),
                        403 => {
                            let text = resp.text().await.unwrap_or_default();
                            return Err(RegistryError::Denied(format!("PUT {path}: 403 {}", text.trim())));
                        }
                        500.. => last = Some(RegistryError::Unreachable(format!("PUT {path}: HTTP {status}"))),
                        _ => {
                            let text = resp.text().await.unwrap_or_default();
                            return Err(RegistryError::BadResponse(format!(
                                "PUT {path}: HTTP {status}: {}",
                                text.trim()
                            )));
                        }
                    }
                }
                Err(e) => last = Some(RegistryError::Unreachable(format!("PUT {path}: {e}"))),
            }
        }
        Err(last.unwrap_or_else(|| RegistryError::Unreachable(path.to_owned())))
    }

    fn check_id(r: &Registration) -> String {
        format!("service:{}", r.id)
    }

    fn body(r: &Registration) -> Value {
        let mut b = json!({
            "ID": r.id,
            "Name": r.service,
            "Tags": r.tags,
            "Port": r.port,
            "Meta": r.meta,
            "Weights": {"Passing": r.weight, "Warning": 1},
            "Check": {
                "CheckID": Self::check_id(r),
                "Name": "vmesh: application health",
                "TTL": format!("{}s", r.check_ttl.as_secs().max(1)),
                "DeregisterCriticalServiceAfter": format!("{}s", r.deregister_critical_after.as_secs().max(60)),
                "Status": if r.healthy && !r.maintenance { "passing" } else { "critical" },
            },
        });
        if !r.address.is_empty() {
            b["Address"] = json!(r.address);
        }
        b
    }

    /// One blocking query on the passing instances of `service`. Returns the endpoints and the
    /// index to pass next time.
    pub async fn health_service(
        &self,
        service: &str,
        index: u64,
        wait: Duration,
    ) -> Result<(Vec<Discovered>, u64), RegistryError> {
        let path = format!(
            "/v1/health/service/{service}?passing=1&index={index}&wait={}s",
            wait.as_secs().max(1)
        );
        // Consul adds up to wait/16 of jitter: the HTTP timeout must be above both.
        let timeout = wait + wait / 16 + Duration::from_secs(5);
        let resp = self
            .request(reqwest::Method::GET, &path)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable(format!("GET {path}: {e}")))?;
        let status = resp.status().as_u16();
        if status == 403 {
            return Err(RegistryError::Denied(format!("GET {path}: 403")));
        }
        if status != 200 {
            return Err(RegistryError::Unreachable(format!("GET {path}: HTTP {status}")));
        }
        let new_index = resp
            .headers()
            .get("X-Consul-Index")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| RegistryError::BadResponse(format!("GET {path}: no X-Consul-Index")))?;
        let entries: Vec<HealthEntry> = resp
            .json()
            .await
            .map_err(|e| RegistryError::BadResponse(format!("GET {path}: {e}")))?;
        let endpoints = entries.into_iter().filter_map(discovered).collect();
        Ok((endpoints, new_index))
    }
}

/// A health entry as an endpoint; the service address, else the node's.
fn discovered(e: HealthEntry) -> Option<Discovered> {
    let host = if e.service.address.is_empty() {
        e.node.address
    } else {
        e.service.address
    };
    let ip: std::net::IpAddr = host.parse().ok()?;
    let meta = e.service.meta.unwrap_or_default();
    let env = if meta.get("external-source").map(String::as_str) == Some("kubernetes") {
        "k8s".to_owned()
    } else {
        meta.get("vmesh-env").cloned().unwrap_or_else(|| "vm".to_owned())
    };
    let ramp = super::ramp_info(|k| meta.get(&format!("vmesh-{}", k.replace('_', "-"))).cloned());
    Some(Discovered {
        address: std::net::SocketAddr::new(ip, e.service.port),
        // Instances not registered by vmesh (no vmesh-weight meta, e.g. consul-k8s pods) carry
        // Consul's default weight 1: count them at vmesh's full weight instead.
        weight: if meta.contains_key("vmesh-weight") {
            e.service.weights.map_or(100, |w| w.passing).max(1)
        } else {
            100
        },
        env,
        ramp,
    })
}

/// The next index to block on: an index that went backwards is a reset (start over), and 0
/// is treated as 1 (shared/consul-api.md).
pub fn next_index(previous: u64, returned: u64) -> u64 {
    if returned < previous {
        0
    } else {
        returned.max(1)
    }
}

impl Registry for Consul {
    fn register<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            // Without replace-existing-checks: a maintenance check survives a re-registration,
            // so a drained instance never shows as passing in between.
            self.put("/v1/agent/service/register", Some(&Self::body(r))).await?;
            Ok(())
        })
    }

    fn set_health<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let verb = if r.healthy { "pass" } else { "fail" };
            let path = format!("/v1/agent/check/{verb}/{}?note=vmesh", Self::check_id(r));
            match self.put(&path, None).await? {
                404 => Err(RegistryError::BadResponse(format!(
                    "check {} is unknown to the agent",
                    Self::check_id(r)
                ))),
                _ => Ok(()),
            }
        })
    }

    fn set_maintenance<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let path = format!(
                "/v1/agent/service/maintenance/{}?enable={}&reason=vmesh%20drain",
                r.id, r.maintenance
            );
            match self.put(&path, None).await? {
                404 => Err(RegistryError::BadResponse(format!(
                    "service {} is unknown to the agent",
                    r.id
                ))),
                _ => Ok(()),
            }
        })
    }

    fn deregister<'a>(&'a self, _service: &'a str, id: &'a str) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            self.put(&format!("/v1/agent/service/deregister/{id}"), None).await?;
            Ok(())
        })
    }

    fn is_registered<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<bool, RegistryError>> {
        Box::pin(async move { Ok(self.get_json(&format!("/v1/agent/service/{}", r.id)).await?.is_some()) })
    }

    fn recover<'a>(&'a self, id: &'a str) -> BoxFuture<'a, Result<Option<Recovered>, RegistryError>> {
        Box::pin(async move {
            let Some(svc) = self.get_json(&format!("/v1/agent/service/{id}")).await? else {
                return Ok(None);
            };
            let meta = |k: &str| svc["Meta"][k].as_str().and_then(|v| v.parse::<u64>().ok());
            let ramp = meta("vmesh-ramp-start").zip(meta("vmesh-ramp-window"));
            // The maintenance check Consul adds for `/v1/agent/service/maintenance/:id`.
            let checks = self.get_json("/v1/agent/checks").await?.unwrap_or(Value::Null);
            let maintenance = checks.get(format!("_service_maintenance:{id}")).is_some();
            Ok(Some(Recovered { maintenance, ramp }))
        })
    }

    fn describe(&self) -> String {
        format!("consul {}", self.base)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, 0), 1);
        assert_eq!(next_index(10, 12), 12);
        assert_eq!(next_index(10, 10), 10);
        assert_eq!(next_index(10, 3), 0, "an index that goes backwards resets");
    }

    #[test]
    fn health_entries_map_to_endpoints() {
        let v: Vec<HealthEntry> = serde_json::from_value(json!([
            {"Node": {"Address": "127.0.0.5"}, "Service": {"Address": "", "Port": 80, "Meta": {"vmesh-weight": "100", "vmesh-ramp-start": "100", "vmesh-ramp-window": "60"}, "Weights": {"Passing": 10, "Warning": 1}}},
            {"Node": {"Address": "127.0.0.5"}, "Service": {"Address": "127.0.0.6", "Port": 81, "Meta": {"external-source": "kubernetes"}}},
        ]))
        .unwrap();
        let d: Vec<Discovered> = v.into_iter().filter_map(discovered).collect();
        assert_eq!(d[0].address.to_string(), "127.0.0.5:80");
        assert_eq!(d[0].weight, 10);
        assert_eq!(d[0].ramp.map(|r| (r.start, r.window, r.target)), Some((100, 60, 100)));
        assert_eq!(d[1].address.to_string(), "127.0.0.6:81");
        assert_eq!(d[1].env, "k8s");
    }
}
