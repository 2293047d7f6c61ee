//! The try stage: one request to one endpoint within the try's deadline, over the cluster's
//! HTTP/2 client or the endpoint's HTTP/1.1 keep-alive pool.

use std::time::Instant;

use http::header::{self, HeaderValue};
use http::request::Parts;
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};

use super::super::body::{is_body_timeout, UpstreamBody};
use crate::balance::Endpoint;
use crate::resilience::TryOutcome;
use crate::route::Cluster;
use crate::upstream::body::RequestBody;
use crate::upstream::h1::HeadRef;
use crate::upstream::pool::SendError;

/// An upstream response: HTTP/1.1 (its body hands the connection back to the endpoint's pool)
/// or HTTP/2.
pub type Answer = Response<UpstreamBody>;

/// What one try sends: the request's head (kept by the forward loop for another try), the
/// version for the upstream, and this try's body.
pub struct Outgoing<'a> {
    pub parts: &'a mut Parts,
    /// The head has a `Host` field (else this endpoint's authority is lent for the try).
    pub host: bool,
    pub version: Version,
    pub body: RequestBody,
    /// Another try may follow (the HTTP/2 client, which takes the head, gets a copy).
    pub keep: bool,
}

/// Sends `out` to `endpoint` (the target set here). A connect refused because the endpoint's
/// certificate names another service sets `identity_mismatch`.
#[allow(clippy::too_many_arguments)] // the try's inputs, each used once
pub async fn send(
    cluster: &Cluster,
    endpoint: &Endpoint,
    out: Outgoing<'_>,
    path: &PathAndQuery,
    h2: bool,
    try_deadline: Instant,
    deadline: Instant,
    identity_mismatch: &mut bool,
) -> Result<Answer, TryOutcome> {
    let Outgoing {
        parts,
        host,
        version,
        body,
        keep,
    } = out;
    let sent = if h2 {
        // One multiplexed connection per endpoint, from the cluster's HTTP/2 client, which takes
        // the head: a copy when another try may follow.
        let headers = if keep {
            parts.headers.clone()
        } else {
            std::mem::take(&mut parts.headers)
        };
        let mut req = Request::new(body);
        *req.method_mut() = parts.method.clone();
        *req.version_mut() = version;
        *req.headers_mut() = headers;
        *req.uri_mut() = upstream_uri(&endpoint.authority, path);
        tokio::time::timeout_at(try_deadline.into(), cluster.client.request(req))
            .await
            .map(|r| match r {
                Ok(resp) => Ok(resp.map(UpstreamBody::H2)),
                Err(e) => {
                    tracing::debug!(upstream = %endpoint.addr, error = %e, "upstream try failed");
                    if crate::tls::identity_mismatch_in(&e) {
                        *identity_mismatch = true;
                    }
                    Err(if is_body_timeout(&e) {
                        TryOutcome::ClientBodyTimeout
                    } else if e.is_connect() {
                        TryOutcome::ConnectFailed
                    } else {
                        TryOutcome::Reset
                    })
                }
            })
    } else {
        // HTTP/1.1: origin-form target on a pooled keep-alive connection. The head is lent,
        // not copied: the client encodes it at once, and it stays here for another try.
        let uri = Uri::from(path.clone());
        // This endpoint's authority when the request has no Host (taken out again after the
        // try: another endpoint may be next).
        let lent_host = !host
            && HeaderValue::from_str(endpoint.authority.as_str())
                .map(|h| parts.headers.insert(header::HOST, h))
                .is_ok();
        let head = HeadRef {
            method: &parts.method,
            uri: &uri,
            version,
            headers: &parts.headers,
        };
        let sent = tokio::time::timeout_at(
            try_deadline.into(),
            endpoint.pool.send(
                head,
                body,
                cluster.connect_timeout,
                cluster.breaker.as_ref(),
                cluster.mtls.as_ref(),
            ),
        )
        .await;
        if lent_host {
            parts.headers.remove(header::HOST);
        }
        sent.map(|r| match r {
            Ok(resp) => Ok(resp.map(UpstreamBody::H1)),
            Err(e) => {
                tracing::debug!(upstream = %endpoint.addr, error = %e, "upstream try failed");
                Err(match e {
                    SendError::Connect(_) => TryOutcome::ConnectFailed,
                    SendError::Http(e) if is_body_timeout(&e) => TryOutcome::ClientBodyTimeout,
                    // Closed, reset, or an answer that is not HTTP/1.1 (a 502 all the same).
                    SendError::Http(_) => TryOutcome::Reset,
                    SendError::Pending(_) => TryOutcome::Refused,
                    // Nothing was sent: like a refused connect, another endpoint may be tried.
                    SendError::Tls(e) => {
                        *identity_mismatch |= matches!(e, crate::tls::ConnectError::Identity { .. });
                        TryOutcome::ConnectFailed
                    }
                })
            }
        })
    };
    match sent {
        Ok(r) => r,
        Err(_) if try_deadline < deadline => Err(TryOutcome::PerTryTimeout),
        Err(_) => Err(TryOutcome::Timeout),
    }
}

fn upstream_uri(authority: &http::uri::Authority, path: &PathAndQuery) -> Uri {
    let mut p = http::uri::Parts::default();
    p.scheme = Some(Scheme::HTTP);
    p.authority = Some(authority.clone());
    p.path_and_query = Some(path.clone());
    // Scheme, authority and path are all present and valid.
    Uri::from_parts(p).unwrap_or_default()
}
