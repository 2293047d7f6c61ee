//! A generic HTTP JSON source for home-grown CMDBs: `GET <url with {vm}>`, fields mapped by
//! [`FieldMap`] paths.

use std::time::Duration;

use serde_json::Value;

use crate::rest::error_chain;
use crate::{BoxFuture, Cmdb, CmdbError, FieldMap, ServiceIdentity};

pub struct HttpJsonCmdb {
    /// URL with a `{vm}` placeholder, e.g. `http://cmdb.local/vms/{vm}`.
    url: String,
    token: Option<String>,
    fields: FieldMap,
    allowed_status: Vec<String>,
    client: reqwest::Client,
}

impl HttpJsonCmdb {
    pub fn new(
        url: String,
        token: Option<String>,
        fields: FieldMap,
        allowed_status: Vec<String>,
        timeout: Duration,
    ) -> Result<Self, CmdbError> {
        if !url.contains("{vm}") {
            return Err(CmdbError::Config(format!("url {url:?} has no {{vm}} placeholder")));
        }
        let client = reqwest::Client::builder()
            .timeout(timeout)
            // Requests carry the token: a redirect could hand it to another host.
            .redirect(reqwest::redirect::Policy::none())
            .build()
            .map_err(|e| CmdbError::Config(e.to_string()))?;
        Ok(Self {
            url,
            token,
            fields,
            allowed_status,
            client,
        })
    }

    async fn fetch(&self, vm: &str) -> Result<ServiceIdentity, CmdbError> {
        let encoded: String = vm
            .bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
                    (b as char).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect();
        let url = self.url.replace("{vm}", &encoded);
        let mut req = self.client.get(&url).header("Accept", "application/json");
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CmdbError::Unreachable(format!("{url}: {}", error_chain(&e))))?;
        let status = resp.status();
        match status.as_u16() {
            200..=299 => {}
            404 => return Err(CmdbError::NotFound { vm: vm.to_owned() }),
            401 | 403 => return Err(CmdbError::Auth(format!("{url}: HTTP {status}"))),
            500.. => return Err(CmdbError::Unreachable(format!("{url}: HTTP {status}"))),
            _ => return Err(CmdbError::BadResponse(format!("{url}: HTTP {status}"))),
        }
        let record: Value = resp
            .json()
            .await
            .map_err(|e| CmdbError::BadResponse(format!("{url}: not JSON: {e}")))?;
        if !self.fields.status.is_empty() {
            let status = self.fields.status_of(&record).unwrap_or_default();
            if !self.allowed_status.iter().any(|s| s.eq_ignore_ascii_case(&status)) {
                return Err(CmdbError::Decommissioned {
                    vm: vm.to_owned(),
                    status,
                });
            }
        }
        self.fields.identity(vm, &record)
    }
}

impl Cmdb for HttpJsonCmdb {
    fn identity<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<ServiceIdentity, CmdbError>> {
        Box::pin(self.fetch(vm))
    }

    fn describe(&self) -> String {
        format!("http {}", self.url)
    }
}
