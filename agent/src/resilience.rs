//! Resilience policies on the request path: retry decisions and budget, outlier ejection.

pub mod outlier;
pub mod retry;
pub mod retry_budget;

pub use outlier::Outlier;
pub use retry::{RetryPolicy, TryOutcome};
pub use retry_budget::RetryBudget;
