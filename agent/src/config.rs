//! Typed configuration: loading (TOML file + `VMESH_*` env), validation, and the reload source.
//!
//! Architecture invariant: only this module reads the config file and the environment.

mod load;
mod locate;
mod model;
pub mod reload;
mod secret;
mod units;
mod validate;

use std::fmt;

pub use load::{load, load_str, Source};
pub use model::*;
pub use secret::{read_secret, SecretError};
pub use units::{ByteSize, Cidr, Dur};
pub use validate::governance_problems;

/// One problem found in a config: the key it concerns and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Problem {
    /// Dotted key path, e.g. `outbound[0].balancer`.
    pub key: String,
    /// Line in the file, when the key came from the file.
    pub line: Option<usize>,
    pub message: String,
}

/// Every problem of a config, reported at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ConfigErrors {
    pub origin: String,
    pub problems: Vec<Problem>,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.line {
            Some(line) => write!(f, "{} (line {}): {}", self.key, line, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {} problem(s)", self.origin, self.problems.len())?;
        for p in &self.problems {
            write!(f, "; {p}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
