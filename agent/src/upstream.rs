//! Upstream clients, below `route` and `balance` (they import nothing of `proxy` or `route`):
//! the HTTP/1.1 exchange driven in the request's own task (`h1`), the per-endpoint pools of
//! HTTP/1.1 connections that drive it (`pool`), the HTTP/2 clients (`client`), the request body
//! they send (`body`), and what both sides' head parsers reuse per thread: emptied header maps
//! (`maps`) and field names seen before (`names`).

pub mod body;
pub mod client;
pub mod h1;
pub mod maps;
pub mod names;
pub mod pool;
