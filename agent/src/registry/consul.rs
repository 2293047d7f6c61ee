//! Consul's HTTP API on reqwest: agent service register/deregister/maintenance, TTL checks,
//! blocking queries on health, catalog and KV, and Connect's CA (the service's leaf
//! certificate and the roots, for `tls.source = "consul"`) (see shared/consul-api.md for the
//! contract).

use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use super::{backoff, BoxFuture, Recovered, Registration, Registry, RegistryError};

/// A Consul client (one agent address).
#[derive(Clone)]
pub struct Consul {
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

/// Writes are retried this many times on transport errors and 5xx answers.
const WRITE_TRIES: u32 = 4;

impl Consul {
    /// A client of the Consul agent at `address`. `ca_pem`: CA certificates trusted besides the
    /// system's store (`registry.ca_file`). Redirects are not followed: a request carries the
    /// ACL token, and a redirect could take it to another host.
    pub fn new(address: &str, token: Option<String>, ca_pem: Option<&[u8]>) -> Result<Self, RegistryError> {
        let mut b = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(3))
            .redirect(reqwest::redirect::Policy::none());
        if let Some(pem) = ca_pem {
            for cert in reqwest::Certificate::from_pem_bundle(pem)
                .map_err(|e| RegistryError::BadResponse(format!("registry.ca_file: {e}")))?
            {
                b = b.add_root_certificate(cert);
            }
        }
        let client = b.build().map_err(|e| RegistryError::BadResponse(e.to_string()))?;
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

    /// One blocking GET of `path` (with its query, without `index`/`wait`): returns when the
    /// index moves past `index` or `wait` ends. The body is capped at [`MAX_ANSWER`] bytes.
    pub async fn blocking_get(&self, path: &str, index: u64, wait: Duration) -> Result<Blocking, RegistryError> {
        let mut body = Vec::new();
        let a = self.blocking_get_into(path, index, wait, MAX_ANSWER, &mut body).await?;
        Ok(Blocking {
            found: a.found,
            body,
            index: a.index,
            filtered_by_acls: a.filtered_by_acls,
        })
    }

    /// [`Consul::blocking_get`] into `body`, capped at `max` bytes. `body` is cleared first and
    /// keeps its capacity: a caller that reads a large answer again and again (the catalog-mode
    /// checks query, tens of MB) allocates it once.
    pub async fn blocking_get_into(
        &self,
        path: &str,
        index: u64,
        wait: Duration,
        max: usize,
        body: &mut Vec<u8>,
    ) -> Result<Answered, RegistryError> {
        body.clear();
        let sep = if path.contains('?') { '&' } else { '?' };
        let full = format!("{path}{sep}index={index}&wait={}s", wait.as_secs().max(1));
        // Consul adds up to wait/16 of jitter: the HTTP timeout must be above both.
        let timeout = wait + wait / 16 + Duration::from_secs(5);
        let mut resp = self
            .request(reqwest::Method::GET, &full)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable(format!("GET {path}: {e}")))?;
        let status = resp.status().as_u16();
        match status {
            200 | 404 => {}
            403 => return Err(RegistryError::Denied(format!("GET {path}: 403"))),
            s => return Err(RegistryError::Unreachable(format!("GET {path}: HTTP {s}"))),
        }
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let index = header("X-Consul-Index")
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| RegistryError::BadResponse(format!("GET {path}: no X-Consul-Index")))?;
        let filtered_by_acls = header("X-Consul-Results-Filtered-By-ACLs").is_some_and(|v| v == "true");
        if let Some(n) = resp.content_length() {
            body.reserve(usize::try_from(n).unwrap_or(max).min(max));
        }
        while let Some(chunk) = resp
            .chunk()
            .await
            .map_err(|e| RegistryError::Unreachable(format!("GET {path}: {e}")))?
        {
            if body.len() + chunk.len() > max {
                return Err(RegistryError::BadResponse(format!(
                    "GET {path}: answer larger than {} MiB",
                    max >> 20
                )));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(Answered {
            found: status == 200,
            index,
            filtered_by_acls,
        })
    }

    /// `PUT /v1/kv/<key>?cas=<cas>`: `Ok(true)` when written, `Ok(false)` when the index moved.
    pub async fn kv_cas(&self, key: &str, value: String, cas: u64) -> Result<bool, RegistryError> {
        let path = format!("/v1/kv/{key}?cas={cas}");
        let resp = self
            .request(reqwest::Method::PUT, &path)
            .timeout(Duration::from_secs(10))
            .body(value)
            .send()
            .await
            .map_err(|e| RegistryError::Unreachable(format!("PUT {path}: {e}")))?;
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        match status {
            200 => Ok(text.trim() == "true"),
            403 => Err(RegistryError::Denied(format!("PUT {path}: 403 {}", text.trim()))),
            s => Err(RegistryError::Unreachable(format!(
                "PUT {path}: HTTP {s}: {}",
                text.trim()
            ))),
        }
    }

    /// `GET /v1/agent/connect/ca/leaf/<service>` as a blocking query on `index` (0: answer at
    /// once): the leaf certificate of `service` and its key, which the Consul agent signs,
    /// caches and renews before it expires or when the roots change (the query returns then).
    pub async fn connect_leaf(
        &self,
        service: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Watched<ConnectLeaf>, RegistryError> {
        let path = format!("/v1/agent/connect/ca/leaf/{}", path_segment(service));
        self.connect_get(&path, index, wait).await
    }

    /// `GET /v1/agent/connect/ca/roots` as a blocking query on `index` (0: answer at once):
    /// the CA roots of the cluster and its trust domain.
    pub async fn connect_roots(&self, index: u64, wait: Duration) -> Result<Watched<ConnectRoots>, RegistryError> {
        self.connect_get("/v1/agent/connect/ca/roots", index, wait).await
    }

    async fn connect_get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
        index: u64,
        wait: Duration,
    ) -> Result<Watched<T>, RegistryError> {
        let mut body = Vec::new();
        let a = self
            .blocking_get_into(path, index, wait, MAX_CONNECT_ANSWER, &mut body)
            .await?;
        if !a.found {
            return Err(RegistryError::BadResponse(format!("GET {path}: 404")));
        }
        let value =
            serde_json::from_slice(&body).map_err(|e| RegistryError::BadResponse(format!("GET {path}: {e}")))?;
        Ok(Watched { value, index: a.index })
    }
}

/// Largest Connect CA answer read (a leaf or the roots: a few KiB each).
const MAX_CONNECT_ANSWER: usize = 1 << 20;

/// `service` as one URL path segment: characters outside `A-Za-z0-9-._~` percent-encoded.
fn path_segment(service: &str) -> String {
    use std::fmt::Write;
    service.bytes().fold(String::with_capacity(service.len()), |mut s, b| {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            s.push(char::from(b));
        } else {
            let _ = write!(s, "%{b:02X}");
        }
        s
    })
}

/// A blocking query's decoded answer and its `X-Consul-Index`.
pub struct Watched<T> {
    pub value: T,
    pub index: u64,
}

/// `GET /v1/agent/connect/ca/leaf/<service>` (the fields used). No `Debug`: it holds a key.
#[derive(Clone, Deserialize, PartialEq, Eq)]
pub struct ConnectLeaf {
    /// Colon-separated hex, e.g. `"3e:a1:..."`.
    #[serde(rename = "SerialNumber")]
    pub serial_number: String,
    /// The leaf, then the intermediates it needs.
    #[serde(rename = "CertPEM")]
    pub cert_pem: String,
    #[serde(rename = "PrivateKeyPEM")]
    pub private_key_pem: String,
    #[serde(rename = "Service", default)]
    pub service: String,
    /// `spiffe://<trust-domain>/ns/<namespace>/dc/<dc>/svc/<service>`.
    #[serde(rename = "ServiceURI", default)]
    pub service_uri: String,
    /// RFC 3339.
    #[serde(rename = "ValidAfter", default)]
    pub valid_after: String,
    /// RFC 3339.
    #[serde(rename = "ValidBefore", default)]
    pub valid_before: String,
}

/// `GET /v1/agent/connect/ca/roots` (the fields used).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ConnectRoots {
    #[serde(rename = "ActiveRootID", default)]
    pub active_root_id: String,
    /// e.g. `"7f42f496-fbc7-8692-05ed-334aa5340c1e.consul"`.
    #[serde(rename = "TrustDomain")]
    pub trust_domain: String,
    #[serde(rename = "Roots", default, deserialize_with = "null_as_empty")]
    pub roots: Vec<ConnectRoot>,
}

/// One CA root of [`ConnectRoots`].
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct ConnectRoot {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(rename = "RootCert")]
    pub root_cert: String,
    #[serde(rename = "IntermediateCerts", default, deserialize_with = "null_as_empty")]
    pub intermediate_certs: Vec<String>,
    #[serde(rename = "Active", default)]
    pub active: bool,
}

/// Go encodes an empty slice as `null`.
fn null_as_empty<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Ok(Option::<Vec<T>>::deserialize(d)?.unwrap_or_default())
}

/// Largest registry answer read (a bigger one is refused, the previous state kept).
pub const MAX_ANSWER: usize = 32 << 20;

/// One blocking query's answer.
pub struct Blocking {
    /// 200 (`false`: 404, e.g. an absent KV prefix).
    pub found: bool,
    pub body: Vec<u8>,
    pub index: u64,
    /// `X-Consul-Results-Filtered-By-ACLs: true`: the token may not see everything.
    pub filtered_by_acls: bool,
}

/// What a blocking query answered besides its body ([`Consul::blocking_get_into`]).
pub struct Answered {
    /// 200 (`false`: 404).
    pub found: bool,
    pub index: u64,
    /// `X-Consul-Results-Filtered-By-ACLs: true`.
    pub filtered_by_acls: bool,
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
    fn connect_answers_decode_as_consul_writes_them() {
        // The shapes of Consul's docs (agent/connect): `IntermediateCerts` null, extra fields.
        let roots: ConnectRoots = serde_json::from_str(
            r#"{"ActiveRootID": "15:bf", "TrustDomain": "a1499528-fbf6-df7b-05e5-ae81e1873fc4.consul",
                "Roots": [{"ID": "15:bf", "Name": "Consul CA Root Cert", "SerialNumber": 7,
                           "RootCert": "-----BEGIN CERTIFICATE-----\n", "IntermediateCerts": null,
                           "Active": true, "CreateIndex": 8, "ModifyIndex": 8}]}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(roots.trust_domain, "a1499528-fbf6-df7b-05e5-ae81e1873fc4.consul");
        assert_eq!(roots.roots.len(), 1);
        assert!(roots.roots[0].active && roots.roots[0].intermediate_certs.is_empty());
        let empty: ConnectRoots =
            serde_json::from_str(r#"{"TrustDomain": "", "Roots": null}"#).unwrap_or_else(|e| panic!("{e}"));
        assert!(empty.roots.is_empty());
        let leaf: ConnectLeaf = serde_json::from_str(
            r#"{"SerialNumber": "08", "CertPEM": "c", "PrivateKeyPEM": "k", "Service": "web",
                "ServiceURI": "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/web",
                "ValidAfter": "2018-05-21T16:33:28Z", "ValidBefore": "2018-05-24T16:33:28Z",
                "Namespace": "default", "CreateIndex": 5, "ModifyIndex": 5}"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (
                leaf.serial_number.as_str(),
                leaf.service.as_str(),
                leaf.valid_before.as_str()
            ),
            ("08", "web", "2018-05-24T16:33:28Z")
        );
        assert!(serde_json::from_str::<ConnectLeaf>(r#"{"SerialNumber": "08"}"#).is_err());
    }

    #[test]
    fn a_service_name_is_one_path_segment() {
        assert_eq!(path_segment("web-1.a_b~"), "web-1.a_b~");
        assert_eq!(path_segment("a/b?c d"), "a%2Fb%3Fc%20d");
    }
}
