//! The agent's life: start-up, signals, config reload, graceful shutdown.

pub mod agent;
pub mod drain;
pub mod error;
pub mod health;
pub mod plan;
pub mod registrar;
pub mod signals;

pub use agent::{run, AgentState};
pub use error::LifecycleError;
