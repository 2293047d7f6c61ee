//! The span queue and the exporter task. The request path only `try_send`s a finished span
//! into a bounded channel (no lock, no wait; a full queue drops the span and counts it). One
//! tokio task takes spans in batches (`batch_size`, or what came within `batch_interval` of
//! the batch's first span), encodes them and POSTs them to `<endpoint>/v1/traces`. A failed or
//! slow export loses its batch (counted) and delays nothing but the next batch.
//!
//! The task wakes twice per batch, not once per span: on the batch's first span, and when the
//! interval ends or the queue holds a full batch (the request path then notifies it). Between
//! the two it does not poll the queue, so a queued span wakes nobody.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::{mpsc, Notify};

use super::otlp;
use super::span::Span;

/// The request path's end of the queue.
pub struct Queue {
    tx: mpsc::Sender<Box<Span>>,
    dropped_full: Counter,
    /// Spans queued at which the exporter is told a batch is full.
    batch_size: usize,
    full: Arc<Notify>,
}

/// How the exporter task runs.
pub struct Exporter {
    pub rx: mpsc::Receiver<Box<Span>>,
    /// Notified by the queue when it holds `batch_size` spans.
    pub full: Arc<Notify>,
    pub client: reqwest::Client,
    /// `<endpoint>/v1/traces`.
    pub url: String,
    pub batch_size: usize,
    pub batch_interval: Duration,
    pub export_timeout: Duration,
    /// The resource's attributes, asked again for every batch (the identity may arrive late).
    pub resource: Arc<dyn Fn() -> Vec<otlp::KeyValue> + Send + Sync>,
    pub exported: Counter,
    pub dropped_failed: Counter,
}

/// Why an export failed; `code` is the word in the log line.
#[derive(Debug, thiserror::Error)]
enum ExportError {
    #[error("{0}")]
    Transport(reqwest::Error),
    #[error("the receiver answered {0}")]
    Status(reqwest::StatusCode),
}

// === impl Queue ===

impl Queue {
    /// A queue of `bound` spans that notifies `full` when it holds `batch_size`; the other
    /// ends go to [`Exporter`].
    pub fn new(
        bound: usize,
        batch_size: usize,
        dropped_full: Counter,
    ) -> (Self, mpsc::Receiver<Box<Span>>, Arc<Notify>) {
        let (tx, rx) = mpsc::channel(bound.max(1));
        let full = Arc::new(Notify::new());
        let queue = Self {
            tx,
            dropped_full,
            batch_size: batch_size.max(1),
            full: full.clone(),
        };
        (queue, rx, full)
    }

    /// Queues a finished span, or drops it (counted) when the queue is full or the exporter
    /// has stopped.
    pub fn push(&self, span: Box<Span>) {
        if self.tx.try_send(span).is_err() {
            self.dropped_full.inc();
        } else if self.tx.max_capacity() - self.tx.capacity() >= self.batch_size {
            self.full.notify_one();
        }
    }
}

// === impl Exporter ===

impl Exporter {
    /// Runs until every queue sender is gone.
    pub async fn run(mut self) {
        let mut batch: Vec<Box<Span>> = Vec::with_capacity(self.batch_size);
        let mut failing = false;
        loop {
            let Some(first) = self.rx.recv().await else { return };
            batch.push(first);
            if batch.len() < self.batch_size {
                // Not polling the queue meanwhile: a span queued now wakes nobody.
                tokio::select! {
                    () = tokio::time::sleep(self.batch_interval) => {}
                    () = self.full.notified() => {}
                }
            }
            while batch.len() < self.batch_size {
                match self.rx.try_recv() {
                    Ok(span) => batch.push(span),
                    Err(_) => break,
                }
            }
            let n = batch.len() as u64;
            let body = otlp::encode_batch(&(self.resource)(), &batch);
            batch.clear();
            match self.send(body).await {
                Ok(()) => {
                    self.exported.inc_by(n);
                    if failing {
                        tracing::info!(url = %self.url, "trace export works again");
                        failing = false;
                    }
                }
                Err(e) => {
                    self.dropped_failed.inc_by(n);
                    // One warning per failing streak, not one per batch.
                    if !failing {
                        tracing::warn!(code = "TRACE_EXPORT_FAILED", url = %self.url, error = %e, dropped = n, "trace export failed: spans dropped");
                        failing = true;
                    } else {
                        tracing::debug!(code = "TRACE_EXPORT_FAILED", url = %self.url, error = %e, dropped = n, "trace export failed");
                    }
                }
            }
        }
    }

    async fn send(&self, body: Vec<u8>) -> Result<(), ExportError> {
        let resp = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/x-protobuf")
            .timeout(self.export_timeout)
            .body(body)
            .send()
            .await
            .map_err(ExportError::Transport)?;
        if resp.status().is_success() {
            Ok(())
        } else {
            Err(ExportError::Status(resp.status()))
        }
    }
}
