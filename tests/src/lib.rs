//! Shared builders for vmesh end-to-end tests: the real `vmesh` binary, real upstreams, real clients.
//!
//! A test builds an [`Agent`] from typed pieces ([`Outbound`], [`Inbound`]), starts real peers
//! with [`Upstream`] or [`TcpEcho`], drives traffic with [`Curl`], `h2load`, or the Python
//! gRPC/WebSocket clients in `tests/fixtures/`, and waits with [`assert_eventually!`], never with
//! fixed sleeps. A missing tool fails the test with a message naming the install script.

pub mod abuse;
pub mod agent;
pub mod ansible;
pub mod binary;
pub mod clients;
pub mod cmdb;
pub mod consul;
pub mod drain_load;
pub mod etcd;
pub mod eventually;
pub mod governance;
pub mod h2raw;
pub mod http;
pub mod k8s;
pub mod keep_alive;
pub mod lifecycle;
pub mod nautobot;
pub mod nspawn;
pub mod packages;
pub mod pki;
pub mod ports;
pub mod process;
pub mod shift;
pub mod tcp_echo;
pub mod tools;
pub mod upstream;

pub use agent::{Agent, AgentBuilder, Inbound, Outbound};
pub use binary::{fixture, vmesh_bin, workspace_root};
pub use clients::{grpc_client, h2load, ws_client, ClientRun, H2loadSummary};
pub use eventually::{eventually, DEFAULT_WAIT};
pub use http::{raw_exchange, Curl, CurlResponse, HttpResponse};
pub use nix::sys::signal::Signal;
pub use ports::{free_addr, free_port};
pub use process::Process;
pub use tcp_echo::TcpEcho;
pub use upstream::{RunningUpstream, Upstream, UpstreamKind};
