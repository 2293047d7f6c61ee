//! The one client of the local admin API that the commands share: GET, POST and PUT (with the
//! admin token on the calls that change something), a bounded wait, and the answer with the
//! stable error code the agent puts in `x-vmesh-error`.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;

use super::AdminArgs;

/// The admin API of the local agent.
#[derive(Clone, Debug)]
pub struct AdminClient {
    addr: SocketAddr,
    token: Option<String>,
}

/// One answer of the admin API.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    /// The stable code of a failure (`x-vmesh-error`, e.g. `APP_UNHEALTHY`), when the agent
    /// sent one.
    pub code: Option<String>,
    pub body: String,
}

impl Answer {
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_default()
    }

    /// What to show of a refusal: a JSON answer's `message`, else the text.
    pub fn message(&self) -> String {
        match self.json()["message"].as_str() {
            Some(m) => m.to_owned(),
            None => self.body.trim().to_owned(),
        }
    }
}

impl AdminClient {
    pub fn new(addr: SocketAddr, token: Option<String>) -> Self {
        Self { addr, token }
    }

    /// The address of `--admin` or the config's `agent.admin_listen`, and the config's admin
    /// token when it can be read.
    pub fn from_args(args: &AdminArgs) -> anyhow::Result<Self> {
        Ok(Self::new(args.admin_addr()?, super::admin_token(&args.config)))
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The admin token, for a request this client does not make itself (`/tap`'s stream).
    pub fn token(&self) -> Option<&str> {
        self.token.as_deref()
    }

    /// `GET path` (10 s at most).
    pub async fn get(&self, path: &str) -> anyhow::Result<Answer> {
        self.send(http::Method::GET, path, None, Duration::from_secs(10)).await
    }

    /// `POST path` with the admin token, waiting at most `wait` for the answer.
    pub async fn post(&self, path: &str, wait: Duration) -> anyhow::Result<Answer> {
        self.send(http::Method::POST, path, None, wait).await
    }

    /// `PUT path` with a JSON body and the admin token (15 s at most).
    pub async fn put_json(&self, path: &str, body: String) -> anyhow::Result<Answer> {
        self.send(http::Method::PUT, path, Some(body), Duration::from_secs(15))
            .await
    }

    async fn send(
        &self,
        method: http::Method,
        path: &str,
        body: Option<String>,
        wait: Duration,
    ) -> anyhow::Result<Answer> {
        let addr = self.addr;
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build_http();
        let mut req = http::Request::builder()
            .method(method.clone())
            .uri(format!("http://{addr}{path}"));
        if method != http::Method::GET {
            if let Some(t) = &self.token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = tokio::time::timeout(wait, client.request(req))
            .await
            .map_err(|_| anyhow::anyhow!("ADMIN_UNREACHABLE: admin API at {addr} did not answer in {wait:?}"))?
            .map_err(|e| anyhow::anyhow!("ADMIN_UNREACHABLE: admin API at {addr}: {e}"))?;
        let status = resp.status().as_u16();
        let code = resp
            .headers()
            .get("x-vmesh-error")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = resp.into_body().collect().await?.to_bytes();
        Ok(Answer {
            status,
            code,
            body: String::from_utf8_lossy(&body).into_owned(),
        })
    }
}
