//! vmesh-agent: the per-VM service-mesh agent. The binary `vmesh` (src/main.rs) is a thin CLI
//! over this library.

pub mod admin;
pub mod app;
pub mod balance;
pub mod cli;
pub mod clock;
pub mod config;
pub mod demo;
pub mod discovery;
pub mod governance;
pub mod identity;
pub mod lifecycle;
pub mod proxy;
pub mod ramp;
pub mod registry;
pub mod resilience;
pub mod route;
pub mod store;
pub mod telemetry;
pub mod tls;
pub mod upstream;
