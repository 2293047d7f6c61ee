//! What a source that watches every service at once (etcd, Kubernetes) shares with the service
//! tasks: its data, a view sender per subscribed service, and the freshness of the whole watch.
//! A subscriber gets the current view at once; a publish sends only the views that changed.

use std::collections::HashMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Found, View};
use crate::store::unix_now;

/// The endpoints a source holds, by service.
pub trait Endpoints {
    fn endpoints(&self, service: &str) -> Vec<Found>;
}

/// A source's data and subscribers.
#[derive(Default)]
pub struct Hub<D> {
    pub data: D,
    subscribers: HashMap<String, watch::Sender<View>>,
    /// Everything has been read once.
    pub synced: bool,
    /// The watch's last error, until it works again (every view is then stale).
    pub error: Option<String>,
    /// Unix seconds of the last good answer.
    pub updated: Option<u64>,
}

impl<D: Endpoints> Hub<D> {
    pub fn view(&self, service: &str) -> View {
        View {
            endpoints: self.synced.then(|| Arc::new(self.data.endpoints(service))),
            error: self.error.clone(),
            updated: self.updated,
        }
    }

    /// A receiver of `service`'s view, sharing the sender of an earlier subscriber.
    pub fn subscribe(&mut self, service: &str) -> watch::Receiver<View> {
        if let Some(tx) = self.subscribers.get(service).filter(|tx| !tx.is_closed()) {
            return tx.subscribe();
        }
        let (tx, rx) = watch::channel(self.view(service));
        self.subscribers.insert(service.to_owned(), tx);
        rx
    }

    /// The watch is up: what the hub holds is current again.
    pub fn connected(&mut self) {
        if self.error.take().is_some() {
            self.updated = Some(unix_now());
            self.publish(None);
        }
    }

    /// Sends the views of `services` (or of all subscribers) that changed.
    pub fn publish(&mut self, services: Option<&[String]>) {
        self.subscribers.retain(|_, tx| !tx.is_closed());
        let names: Vec<String> = match services {
            Some(s) => s
                .iter()
                .filter(|s| self.subscribers.contains_key(*s))
                .cloned()
                .collect(),
            None => self.subscribers.keys().cloned().collect(),
        };
        for name in names {
            let view = self.view(&name);
            if let Some(tx) = self.subscribers.get(&name) {
                tx.send_if_modified(|v| {
                    let changed = v.endpoints != view.endpoints || v.error != view.error;
                    v.updated = view.updated;
                    if changed {
                        *v = view;
                    }
                    changed
                });
            }
        }
    }
}
