//! The agent's life: start-up, signals, config reload, graceful shutdown.

pub mod agent;
pub mod health;
pub mod ramp;
pub mod registrar;
pub mod signals;

pub use agent::{run, AgentState};
