//! Resilience policies on the request path: retry decisions and budget, outlier ejection,
//! circuit breaking, rate limits and the adaptive concurrency limit.

pub mod adaptive;
pub mod breaker;
pub mod cpu;
pub mod outlier;
pub mod rate_limit;
pub mod retry;
pub mod retry_budget;

pub use outlier::Outlier;
pub use retry::{RetryPolicy, TryOutcome};
pub use retry_budget::RetryBudget;
