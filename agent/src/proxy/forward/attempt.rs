//! The try stage: one request to one endpoint within the try's deadline, over the cluster's
//! HTTP/2 client or the endpoint's HTTP/1.1 keep-alive pool.

use std::time::Instant;

use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};

use super::super::body::{is_body_timeout, RequestBody, UpstreamBody};
use super::super::pool::SendError;
use crate::balance::Endpoint;
use crate::resilience::TryOutcome;
use crate::route::Cluster;

/// An upstream response: HTTP/1.1 (its body hands the connection back to the endpoint's pool)
/// or HTTP/2.
pub type Answer = Response<UpstreamBody>;

/// Sends `req` (head and body set, URI not yet) to `endpoint`. A connect refused because the
/// endpoint's certificate names another service sets `identity_mismatch`.
#[allow(clippy::too_many_arguments)] // the try's inputs, each used once
pub async fn send(
    cluster: &Cluster,
    endpoint: &Endpoint,
    mut req: Request<RequestBody>,
    path: &PathAndQuery,
    h2: bool,
    try_deadline: Instant,
    deadline: Instant,
    identity_mismatch: &mut bool,
) -> Result<Answer, TryOutcome> {
    let sent = if h2 {
        // One multiplexed connection per endpoint, from the cluster's HTTP/2 client.
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
        // HTTP/1.1: origin-form target on a pooled keep-alive connection.
        *req.uri_mut() = Uri::from(path.clone());
        if !req.headers().contains_key(header::HOST) {
            if let Ok(h) = HeaderValue::from_str(endpoint.authority.as_str()) {
                req.headers_mut().insert(header::HOST, h);
            }
        }
        tokio::time::timeout_at(
            try_deadline.into(),
            endpoint.pool.send(
                req,
                cluster.connect_timeout,
                cluster.breaker.as_ref(),
                cluster.mtls.as_ref(),
            ),
        )
        .await
        .map(|r| match r {
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
