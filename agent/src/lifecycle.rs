//! This instance's life in the registry: identity, registration, health, slow start, drain and
//! shutdown (the registrar and its pure parts), and the signals that drive them. The process
//! itself is put together in `app.rs`.

pub mod drain;
pub mod error;
pub mod health;
pub mod plan;
pub mod registrar;
pub mod signals;

pub use error::LifecycleError;
