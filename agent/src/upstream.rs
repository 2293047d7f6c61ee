//! Upstream clients below `route` and `balance`: today the HTTP/1.1 exchange driven in the
//! request's own task (`h1`), not yet wired into the request path (`proxy::pool` still serves it).

pub mod h1;
