//! Upstream clients below `route` and `balance`: today the HTTP/1.1 exchange driven in the
//! request's own task (`h1`), driven by `proxy::pool` for every HTTP/1.1 upstream request.

pub mod h1;
