//! A retry budget (Envoy's `retry_budget`, Linkerd's budgets): retries in flight may be at most
//! a ratio of requests in flight, with a floor, so retries cannot multiply an outage's load.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_concurrency: usize,
    active_requests: AtomicUsize,
    active_retries: AtomicUsize,
}

/// Counts a request in flight until dropped.
#[derive(Debug)]
pub struct RequestToken(Arc<RetryBudget>);

/// Counts a retry in flight until dropped.
#[derive(Debug)]
pub struct RetryToken(Arc<RetryBudget>);

impl RetryBudget {
    pub fn new(ratio: f64, min_concurrency: usize) -> Arc<Self> {
        Arc::new(Self {
            ratio,
            min_concurrency,
            active_requests: AtomicUsize::new(0),
            active_retries: AtomicUsize::new(0),
        })
    }

    pub fn request(self: &Arc<Self>) -> RequestToken {
        self.active_requests.fetch_add(1, Ordering::Relaxed);
        RequestToken(self.clone())
    }

    /// A retry token if the budget allows one more retry in flight.
    pub fn try_retry(self: &Arc<Self>) -> Option<RetryToken> {
        let requests = self.active_requests.load(Ordering::Relaxed);
        let allowed = ((requests as f64 * self.ratio) as usize).max(self.min_concurrency);
        let prev = self.active_retries.fetch_add(1, Ordering::Relaxed);
        if prev < allowed {
            Some(RetryToken(self.clone()))
        } else {
            self.active_retries.fetch_sub(1, Ordering::Relaxed);
            None
        }
    }

    pub fn active_retries(&self) -> usize {
        self.active_retries.load(Ordering::Relaxed)
    }
}

impl Drop for RequestToken {
    fn drop(&mut self) {
        self.0.active_requests.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Drop for RetryToken {
    fn drop(&mut self) {
        self.0.active_retries.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn floor_applies_with_few_requests() {
        let b = RetryBudget::new(0.2, 3);
        let _r = b.request();
        let t: Vec<_> = (0..3).filter_map(|_| b.try_retry()).collect();
        assert_eq!(t.len(), 3);
        assert!(b.try_retry().is_none());
        drop(t);
        assert!(b.try_retry().is_some());
    }

    #[test]
    fn ratio_bounds_retries_under_load() {
        let b = RetryBudget::new(0.2, 3);
        let _reqs: Vec<_> = (0..100).map(|_| b.request()).collect();
        let t: Vec<_> = (0..100).filter_map(|_| b.try_retry()).collect();
        assert_eq!(t.len(), 20);
        assert_eq!(b.active_retries(), 20);
    }
}
