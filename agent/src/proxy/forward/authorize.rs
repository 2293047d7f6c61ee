//! The authorize stage (inbound, with mutual TLS): the caller's verified identity against
//! `[[inbound.authz]]`, then that identity handed on as `x-vmesh-caller` (to the app, and as the
//! key of a rate limit with `by = "x-vmesh-caller"`). A client's own `x-vmesh-caller` never
//! gets this far: `prepare` strips `x-vmesh-*` request headers.

use http::request::Parts;
use http::HeaderName;

use super::super::ConnCtx;
use crate::route::Cluster;

/// The caller's SPIFFE identity, set by the inbound sidecar from the client certificate.
pub static X_VMESH_CALLER: HeaderName = HeaderName::from_static("x-vmesh-caller");

/// Whether the connection's caller may send this request to `cluster`.
pub fn allowed(ctx: &ConnCtx, cluster: &Cluster, parts: &Parts) -> bool {
    cluster
        .authz
        .as_deref()
        .is_none_or(|a| a.allows(ctx.peer.as_deref().map(|p| &p.id), &parts.method, parts.uri.path()))
}

/// Sets `x-vmesh-caller` to the connection's verified identity, when it has one.
pub fn stamp_caller(ctx: &ConnCtx, parts: &mut Parts) {
    if let Some(peer) = &ctx.peer {
        parts.headers.insert(X_VMESH_CALLER.clone(), peer.header.clone());
    }
}
