//! `[tracing]`: whether spans are recorded, how they are sampled and where they are exported.

use serde::{Deserialize, Serialize};

use crate::config::Dur;

/// `[tracing]` (docs/tracing.md).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// Record a span per proxied request and export the sampled ones. Off: the request path
    /// checks one `None` and passes every trace header through untouched.
    pub enabled: bool,
    /// Base URL of the OTLP/HTTP receiver; spans are POSTed to `<endpoint>/v1/traces`.
    pub endpoint: String,
    /// Share of new traces recorded, 0.0 to 1.0, decided from the trace ID (so every hop of
    /// a trace decides alike).
    pub sample_ratio: f64,
    /// `parent_based`: a caller's sampled flag (W3C `traceparent`, B3) decides, the ratio only
    /// for new traces; `ratio`: the ratio decides every request.
    pub sampler: Sampler,
    /// Spans sent in one export request at most.
    pub batch_size: usize,
    /// The longest a finished span waits for its batch to fill before it is sent.
    pub batch_interval: Dur,
    /// Finished spans waiting for the exporter at most; beyond it a span is dropped and
    /// counted (`vmesh_trace_spans_dropped_total{reason="queue_full"}`).
    pub queue_size: usize,
    /// How long one export request may take before its spans count as dropped.
    pub export_timeout: Dur,
    /// `service.name` of the exported resource; default: the identity's service, else `vmesh`.
    pub service_name: Option<String>,
}

/// How a request's sampling is decided.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Sampler {
    /// The caller's decision when it sent one, else the ratio.
    ParentBased,
    /// The ratio, whatever the caller decided.
    Ratio,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            endpoint: "http://127.0.0.1:4318".to_owned(),
            sample_ratio: 0.01,
            sampler: Sampler::ParentBased,
            batch_size: 512,
            batch_interval: Dur::secs(1),
            queue_size: 4096,
            export_timeout: Dur::secs(5),
            service_name: None,
        }
    }
}

/// Bounds of the sizes, far above what a sidecar needs and low enough to bound memory.
const MAX_QUEUE: usize = 1_000_000;

impl TracingConfig {
    /// Every problem of the section, keyed under `key` (`tracing`).
    pub fn validate(&self, key: &str) -> Vec<(String, String)> {
        let mut p = Vec::new();
        let url_ok = self
            .endpoint
            .strip_prefix("http://")
            .or_else(|| self.endpoint.strip_prefix("https://"))
            .is_some_and(|rest| !rest.is_empty() && !rest.contains(char::is_whitespace));
        if !url_ok {
            p.push((
                format!("{key}.endpoint"),
                format!("{:?} is not an http:// or https:// URL", self.endpoint),
            ));
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            p.push((
                format!("{key}.sample_ratio"),
                format!("{} is out of range 0.0..=1.0", self.sample_ratio),
            ));
        }
        if self.queue_size == 0 || self.queue_size > MAX_QUEUE {
            p.push((
                format!("{key}.queue_size"),
                format!("{} is out of range 1..={MAX_QUEUE}", self.queue_size),
            ));
        }
        if self.batch_size == 0 || self.batch_size > self.queue_size.max(1) {
            p.push((
                format!("{key}.batch_size"),
                format!(
                    "{} is out of range 1..=queue_size ({})",
                    self.batch_size, self.queue_size
                ),
            ));
        }
        let interval = self.batch_interval.get();
        if interval.is_zero() || interval > std::time::Duration::from_secs(60) {
            p.push((
                format!("{key}.batch_interval"),
                "must be greater than 0 and at most 60s".to_owned(),
            ));
        }
        if self.export_timeout.get().is_zero() {
            p.push((format!("{key}.export_timeout"), "must be greater than 0".to_owned()));
        }
        if self.service_name.as_deref().is_some_and(|s| s.trim().is_empty()) {
            p.push((format!("{key}.service_name"), "must not be empty".to_owned()));
        }
        p
    }
}
