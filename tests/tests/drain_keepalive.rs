//! Drain, undrain and SIGTERM of an instance under keep-alive clients: the scenario of
//! `tests/src/drain_load.rs` (two instances behind a caller vmesh that discovers them) with
//! `wrk` holding 4 HTTP/1.1 keep-alive connections to the caller for the whole run, and with
//! back-to-back `h2load` runs of 4 HTTP/2 connections; on the Consul double and on etcd. No
//! request may fail.
//!
//! The scenarios run one at a time (each starts three agents, three apps and a load): side by
//! side on a 2-core machine they would measure the machine, not the drain.

use std::sync::Mutex;

use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::drain_load::{self, Client, Registry};
use vmesh_tests::etcd::Etcd;

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// The scenario with `client` on the Consul double.
fn on_consul(client: Client) {
    let _one = serial();
    let consul = ConsulDouble::spawn();
    drain_load::run(&Registry::Consul(&consul), client);
}

/// The scenario with `client` on etcd.
fn on_etcd(client: Client) {
    let _one = serial();
    let etcd = Etcd::spawn();
    drain_load::run(&Registry::Etcd(&etcd), client);
}

#[test]
fn http1_keep_alive_clients_lose_no_request_consul() {
    on_consul(Client::Http1KeepAlive);
}

#[test]
fn http2_clients_lose_no_request_consul() {
    on_consul(Client::Http2);
}

#[test]
fn http1_keep_alive_clients_lose_no_request_etcd() {
    on_etcd(Client::Http1KeepAlive);
}

#[test]
fn http2_clients_lose_no_request_etcd() {
    on_etcd(Client::Http2);
}
