//! The one client of the local admin API that the commands share: GET, POST and PUT (with the
//! admin token on the calls that change something), a bounded wait, and the answer with the
//! stable error code the agent puts in `x-vmesh-error`. With `agent.admin_socket` in the
//! config the calls go through the unix socket (where the caller's user, not a token, is
//! checked), falling back to `admin_listen` when the socket cannot be opened.

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// `agent.admin_socket`, when the config names one that exists.
    socket: Option<PathBuf>,
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
        Self {
            addr,
            socket: None,
            token,
        }
    }

    /// The address of `--admin`, else the config's `agent.admin_socket` (when it exists) and
    /// `agent.admin_listen`; and the config's admin token when it can be read.
    pub fn from_args(args: &AdminArgs) -> anyhow::Result<Self> {
        let token = super::admin_token(&args.config);
        if let Some(addr) = args.admin {
            return Ok(Self::new(addr, token));
        }
        let config =
            crate::config::load(&crate::config::Source::file(&args.config)).map_err(|e| anyhow::anyhow!("{e}"))?;
        Ok(Self {
            addr: config.agent.admin_listen,
            socket: config.agent.admin_socket.filter(|p| p.exists()),
            token,
        })
    }

    /// Sends `req` (a path-only URI) through the admin socket, or to `admin_listen` when
    /// there is none or it cannot be opened (another user's socket).
    pub async fn request<B>(&self, mut req: http::Request<B>) -> Result<http::Response<hyper::body::Incoming>, String>
    where
        B: http_body::Body + Send + Unpin + 'static,
        B::Data: Send,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        if let Some(path) = &self.socket {
            if let Ok(stream) = tokio::net::UnixStream::connect(path).await {
                req.headers_mut()
                    .insert(http::header::HOST, http::HeaderValue::from_static("localhost"));
                let (mut sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                    .await
                    .map_err(|e| e.to_string())?;
                tokio::spawn(conn);
                return sender.send_request(req).await.map_err(|e| e.to_string());
            }
        }
        let addr = self.addr;
        let path = req.uri().path_and_query().map_or("/", |p| p.as_str()).to_owned();
        *req.uri_mut() = format!("http://{addr}{path}")
            .parse()
            .map_err(|e: http::uri::InvalidUri| e.to_string())?;
        let client: Client<_, B> = Client::builder(TokioExecutor::new()).build_http();
        client.request(req).await.map_err(|e| e.to_string())
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
        let mut req = http::Request::builder().method(method.clone()).uri(path);
        if method != http::Method::GET {
            if let Some(t) = &self.token {
                req = req.header(http::header::AUTHORIZATION, format!("Bearer {t}"));
            }
        }
        if body.is_some() {
            req = req.header(http::header::CONTENT_TYPE, "application/json");
        }
        let req = req.body(Full::new(Bytes::from(body.unwrap_or_default())))?;
        let resp = tokio::time::timeout(wait, self.request(req))
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
