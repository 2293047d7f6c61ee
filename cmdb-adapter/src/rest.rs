//! Nautobot and NetBox REST: `GET /api/virtualization/virtual-machines/?name=<vm>` with token
//! auth, pagination, a custom CA, and the status and field mapping of [`FieldMap`].

use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;

use crate::{BoxFuture, Cmdb, CmdbError, FieldMap, ServiceIdentity};

/// Which product speaks the API (the payloads differ in details: status shape, depth).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flavor {
    Nautobot,
    Netbox,
}

/// How to reach a REST CMDB.
#[derive(Clone, Debug)]
pub struct RestOptions {
    /// API root host, e.g. `https://cmdb.example.com`.
    pub url: String,
    pub token: Option<String>,
    /// PEM file of a CA to trust in addition to the system's.
    pub ca_file: Option<PathBuf>,
    pub timeout: Duration,
    pub fields: FieldMap,
    /// Status values (case-insensitive) of a VM that may serve traffic.
    pub allowed_status: Vec<String>,
}

pub struct RestCmdb {
    flavor: Flavor,
    opts: RestOptions,
    client: reqwest::Client,
}

/// Pages followed at most (a name filter matches one record; this only bounds a bad server).
const MAX_PAGES: usize = 20;

/// The `next` link of a page, followed only to the origin (scheme, host, port) of the page that
/// gave it: the request carries the API token, and a link elsewhere would hand it over.
pub fn same_origin(page: &reqwest::Url, next: &str) -> Result<reqwest::Url, CmdbError> {
    let url = page
        .join(next)
        .map_err(|e| CmdbError::BadResponse(format!("next {next:?}: {e}")))?;
    if url.origin() != page.origin() {
        return Err(CmdbError::BadResponse(format!(
            "next {next:?} leaves the CMDB's origin {}: not followed (it would carry the API token)",
            page.origin().ascii_serialization()
        )));
    }
    Ok(url)
}

/// The HTTP client for a Nautobot/NetBox API (identity reads and `vmesh init`'s custom fields):
/// `opts.timeout`, the CA of `opts.ca_file` besides the system's, and no redirects (requests
/// carry the API token: a redirect could hand it to another host).
pub fn client(opts: &RestOptions) -> Result<reqwest::Client, CmdbError> {
    let mut b = reqwest::Client::builder()
        .timeout(opts.timeout)
        .connect_timeout(opts.timeout.min(Duration::from_secs(5)))
        .user_agent(concat!("vmesh/", env!("CARGO_PKG_VERSION")))
        .redirect(reqwest::redirect::Policy::none());
    if let Some(ca) = &opts.ca_file {
        let pem = std::fs::read(ca).map_err(|e| CmdbError::Config(format!("ca_file {}: {e}", ca.display())))?;
        for cert in reqwest::Certificate::from_pem_bundle(&pem)
            .map_err(|e| CmdbError::Config(format!("ca_file {}: {e}", ca.display())))?
        {
            b = b.add_root_certificate(cert);
        }
    }
    b.build().map_err(|e| CmdbError::Config(e.to_string()))
}

impl RestCmdb {
    pub fn new(flavor: Flavor, opts: RestOptions) -> Result<Self, CmdbError> {
        let client = client(&opts)?;
        Ok(Self { flavor, opts, client })
    }

    fn first_page(&self, vm: &str) -> Result<reqwest::Url, CmdbError> {
        let base = self.opts.url.trim_end_matches('/');
        let mut url = reqwest::Url::parse(&format!("{base}/api/virtualization/virtual-machines/"))
            .map_err(|e| CmdbError::Config(format!("url {:?}: {e}", self.opts.url)))?;
        url.query_pairs_mut().append_pair("name", vm);
        if self.flavor == Flavor::Nautobot {
            // Nautobot 2+ returns related objects as bare references unless asked for depth:
            // depth 1 names the status and cluster, depth 2 the cluster's location.
            url.query_pairs_mut().append_pair("depth", "2");
        }
        Ok(url)
    }

    async fn get(&self, url: reqwest::Url) -> Result<Value, CmdbError> {
        let mut req = self.client.get(url.clone()).header("Accept", "application/json");
        if let Some(t) = &self.opts.token {
            req = req.header("Authorization", format!("Token {t}"));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CmdbError::Unreachable(format!("{url}: {}", error_chain(&e))))?;
        let status = resp.status();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(CmdbError::Auth(format!("{url}: HTTP {status}")));
        }
        if status.is_server_error() {
            return Err(CmdbError::Unreachable(format!("{url}: HTTP {status}")));
        }
        if !status.is_success() {
            return Err(CmdbError::BadResponse(format!("{url}: HTTP {status}")));
        }
        resp.json::<Value>()
            .await
            .map_err(|e| CmdbError::BadResponse(format!("{url}: not JSON: {e}")))
    }

    async fn fetch(&self, vm: &str) -> Result<ServiceIdentity, CmdbError> {
        let mut url = self.first_page(vm)?;
        let mut matches = Vec::new();
        for _ in 0..MAX_PAGES {
            let page = self.get(url.clone()).await?;
            let results = page
                .get("results")
                .and_then(Value::as_array)
                .ok_or_else(|| CmdbError::BadResponse("no `results` array in the answer".into()))?;
            matches.extend(
                results
                    .iter()
                    .filter(|r| r.get("name").and_then(Value::as_str) == Some(vm))
                    .cloned(),
            );
            match page.get("next").and_then(Value::as_str) {
                Some(next) => url = same_origin(&url, next)?,
                None => break,
            }
        }
        let record = match matches.len() {
            0 => return Err(CmdbError::NotFound { vm: vm.to_owned() }),
            1 => &matches[0],
            n => {
                return Err(CmdbError::Ambiguous {
                    vm: vm.to_owned(),
                    count: n,
                })
            }
        };
        if !self.opts.fields.status.is_empty() {
            let status = self.opts.fields.status_of(record).unwrap_or_default();
            if !self.opts.allowed_status.iter().any(|s| s.eq_ignore_ascii_case(&status)) {
                return Err(CmdbError::Decommissioned {
                    vm: vm.to_owned(),
                    status,
                });
            }
        }
        self.opts.fields.identity(vm, record)
    }
}

impl Cmdb for RestCmdb {
    fn identity<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<ServiceIdentity, CmdbError>> {
        Box::pin(self.fetch(vm))
    }

    fn describe(&self) -> String {
        let kind = match self.flavor {
            Flavor::Nautobot => "nautobot",
            Flavor::Netbox => "netbox",
        };
        format!("{kind} {}", self.opts.url)
    }
}

/// An error with its sources, e.g. "error sending request: connection refused".
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    //! NetBox answers recorded after NetBox's documented API (`/api/virtualization/
    //! virtual-machines/`, paginated with `next`), served by a tiny local HTTP server.
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Serves `pages` by query `offset` (none -> page 0), requiring `Token secret`.
    async fn serve(pages: Vec<String>, status: u16) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let pages: Vec<String> = pages.into_iter().map(|p| p.replace("{{ADDR}}", &addr)).collect();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 8192];
                let n = s.read(&mut buf).await.unwrap_or(0);
                let req = String::from_utf8_lossy(&buf[..n]).to_string();
                let authed = req.contains("Authorization: Token secret") || req.contains("authorization: Token secret");
                let page = if req.contains("offset=1") { &pages[1] } else { &pages[0] };
                let (code, body) = if !authed {
                    (403, "{\"detail\":\"Invalid token\"}".to_owned())
                } else {
                    (status, page.clone())
                };
                let resp = format!(
                    "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = s.write_all(resp.as_bytes()).await;
            }
        });
        format!("http://{addr}")
    }

    fn opts(url: String, token: &str) -> RestOptions {
        RestOptions {
            url,
            token: Some(token.to_owned()),
            ca_file: None,
            timeout: Duration::from_secs(5),
            fields: FieldMap::rest_default(),
            allowed_status: vec!["active".into(), "staged".into()],
        }
    }

    fn pages() -> Vec<String> {
        vec![
            include_str!("../tests/fixtures/netbox-page1.json").to_owned(),
            include_str!("../tests/fixtures/netbox-page2.json").to_owned(),
        ]
    }

    #[tokio::test]
    async fn netbox_paginates_and_maps() {
        let url = serve(pages(), 200).await;
        let cmdb = RestCmdb::new(Flavor::Netbox, opts(url, "secret")).unwrap();
        let id = cmdb.identity("web-01").await.unwrap();
        assert_eq!(id.service, "orders");
        assert_eq!(id.version, "v3");
        assert_eq!(id.zone, "dc1-z1", "zone falls back to the site");
        assert_eq!(id.owner, "team-a", "owner falls back to the tenant");
        assert_eq!(id.weight, 40);
        assert_eq!(id.colour, "blue");
        assert_eq!(id.tags, ["pci"]);
    }

    #[tokio::test]
    async fn decommissioned_missing_and_auth_errors_are_typed() {
        let url = serve(pages(), 200).await;
        let cmdb = RestCmdb::new(Flavor::Netbox, opts(url.clone(), "secret")).unwrap();
        let e = cmdb.identity("web-01-old").await.unwrap_err();
        assert_eq!(e.code(), "CMDB_VM_DECOMMISSIONED", "{e}");
        assert!(e.to_string().contains("web-01-old"));
        let e = cmdb.identity("nope-01").await.unwrap_err();
        assert_eq!(e.code(), "CMDB_VM_NOT_FOUND");
        let bad = RestCmdb::new(Flavor::Netbox, opts(url, "wrong")).unwrap();
        assert_eq!(bad.identity("web-01").await.unwrap_err().code(), "CMDB_AUTH");
    }

    #[tokio::test]
    async fn outages_are_outages() {
        let url = serve(pages(), 503).await;
        let cmdb = RestCmdb::new(Flavor::Netbox, opts(url, "secret")).unwrap();
        assert!(cmdb.identity("web-01").await.unwrap_err().is_outage());
        let down = RestCmdb::new(Flavor::Netbox, opts("http://127.0.0.1:9".into(), "secret")).unwrap();
        let e = down.identity("web-01").await.unwrap_err();
        assert_eq!(e.code(), "CMDB_UNREACHABLE", "{e}");
    }

    #[test]
    fn next_links_are_followed_only_on_the_same_origin() {
        let page = reqwest::Url::parse("https://cmdb.example:8443/api/virtualization/virtual-machines/?name=vm")
            .unwrap_or_else(|e| panic!("{e}"));
        for ok in [
            "https://cmdb.example:8443/api/virtualization/virtual-machines/?name=vm&offset=50",
            "/api/virtualization/virtual-machines/?offset=100",
        ] {
            assert!(same_origin(&page, ok).is_ok(), "{ok}");
        }
        for bad in [
            "https://evil.example:8443/api/?offset=50",
            "http://cmdb.example:8443/api/?offset=50",
            "https://cmdb.example:9443/api/?offset=50",
            "file:///etc/passwd",
        ] {
            let e = same_origin(&page, bad).map(|u| u.to_string()).unwrap_err().to_string();
            assert!(e.contains("leaves the CMDB's origin"), "{bad}: {e}");
        }
    }
}
