//! Registry discovery: for every outbound service without static endpoints, watch its
//! instances in Consul (blocking queries on passing instances) or etcd (prefix watch) and swap
//! the cluster's endpoint set. During a slow start the weights are interpolated from the ramp
//! metadata every second, between the few step writes the registry gets.
//!
//! Architecture invariant: the request path never waits for discovery; it reads the last set.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::balance::{Endpoint, EndpointSet};
use crate::config::{Config, RegistryKind};
use crate::registry::consul::{next_index, Consul};
use crate::registry::etcd::Etcd;
use crate::registry::{backoff, Discovered};
use crate::route::RouteTable;
use crate::store::unix_now;
use crate::telemetry::metrics::{ClusterLabels, Direction};
use crate::telemetry::Metrics;

/// Watches one service.
struct Watch {
    service: String,
    routes: Arc<ArcSwap<RouteTable>>,
    metrics: Arc<Metrics>,
    last: Option<Vec<Discovered>>,
}

/// Starts a watcher for each discovered service of `config` not in `watched`.
pub fn spawn_watchers(
    config: &Config,
    routes: &Arc<ArcSwap<RouteTable>>,
    metrics: &Arc<Metrics>,
    watched: &mut std::collections::HashSet<String>,
) -> Result<(), String> {
    if config.registry.kind == RegistryKind::None {
        return Ok(());
    }
    let token = match &config.registry.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| format!("registry.token_file {}: {e}", p.display()))?
                .trim()
                .to_owned(),
        ),
        None => None,
    };
    for out in config.outbound.iter().filter(|o| o.endpoints.is_empty()) {
        if !watched.insert(out.service.clone()) {
            continue;
        }
        let w = Watch {
            service: out.service.clone(),
            routes: routes.clone(),
            metrics: metrics.clone(),
            last: None,
        };
        let wait = config.registry.watch_wait.get();
        match config.registry.kind {
            RegistryKind::Consul => {
                let consul = Consul::new(&config.registry.address, token.clone()).map_err(|e| e.to_string())?;
                tokio::spawn(w.consul(consul, wait));
            }
            RegistryKind::Etcd => {
                let etcd = Etcd::new(&config.registry.address, config.registry.lease_ttl.get());
                tokio::spawn(w.etcd(etcd));
            }
            RegistryKind::None => {}
        }
        tracing::info!(service = %out.service, "discovering endpoints from the registry");
    }
    Ok(())
}

impl Watch {
    fn still_wanted(&self) -> bool {
        self.routes.load().services.contains_key(self.service.as_str())
    }

    async fn consul(mut self, consul: Consul, wait: Duration) {
        let mut index = 0u64;
        let mut errors = 0u32;
        let service = self.service.clone();
        let query = |index: u64| {
            let (c, s) = (consul.clone(), service.clone());
            Box::pin(async move { c.health_service(&s, index, wait).await })
        };
        let mut pending = query(index);
        let mut sent = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                result = &mut pending => {
                    if !self.still_wanted() {
                        return;
                    }
                    match result {
                        Ok((endpoints, returned)) => {
                            errors = 0;
                            let next = next_index(index, returned);
                            // Never spin: an answer that came back at once with the same index
                            // is a misbehaving server; pause before asking again.
                            if next == index && sent.elapsed() < Duration::from_millis(100) {
                                tokio::time::sleep(Duration::from_secs(1)).await;
                            }
                            index = next;
                            self.apply(endpoints);
                        }
                        Err(e) => {
                            errors += 1;
                            let pause = backoff(errors, Duration::from_secs(30));
                            tracing::warn!(service = %self.service, error = %e, ?pause, "discovery failed; keeping the last endpoints");
                            tokio::time::sleep(pause).await;
                        }
                    }
                    pending = query(index);
                    sent = Instant::now();
                }
                _ = tick.tick() => self.reapply_ramps(),
            }
        }
    }

    async fn etcd(mut self, etcd: Etcd) {
        let mut errors = 0u32;
        let etcd = Arc::new(etcd);
        loop {
            if !self.still_wanted() {
                return;
            }
            let revision = match etcd.list(&self.service).await {
                Ok((endpoints, rev)) => {
                    errors = 0;
                    self.apply(endpoints);
                    rev
                }
                Err(e) => {
                    errors += 1;
                    let pause = backoff(errors, Duration::from_secs(30));
                    tracing::warn!(service = %self.service, error = %e, ?pause, "discovery failed; keeping the last endpoints");
                    tokio::time::sleep(pause).await;
                    continue;
                }
            };
            let (e2, s2) = (etcd.clone(), self.service.clone());
            let mut change = Box::pin(async move { e2.wait_change(&s2, revision).await });
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    r = &mut change => {
                        if let Err(e) = r {
                            tracing::debug!(service = %self.service, error = %e, "etcd watch ended");
                            tokio::time::sleep(Duration::from_millis(500)).await;
                        }
                        break;
                    }
                    _ = tick.tick() => self.reapply_ramps(),
                }
            }
        }
    }

    fn reapply_ramps(&mut self) {
        let now = unix_now();
        if let Some(last) = self.last.clone() {
            // Interpolate while ramping, and once more right after the ramp ends.
            if last
                .iter()
                .any(|d| d.ramp.is_some_and(|r| now <= r.start + r.window + 1))
            {
                self.install(&last, false);
            }
        }
    }

    fn apply(&mut self, endpoints: Vec<Discovered>) {
        if self.last.as_ref() == Some(&endpoints) {
            return;
        }
        tracing::info!(service = %self.service, endpoints = endpoints.len(), "discovered endpoints changed");
        self.install(&endpoints, true);
        self.last = Some(endpoints);
    }

    /// Builds and swaps in the endpoint set, reusing endpoints (and their statistics).
    fn install(&self, found: &[Discovered], count: bool) {
        let routes = self.routes.load();
        let Some(cluster) = routes.services.get(self.service.as_str()) else {
            return;
        };
        let now = unix_now();
        let old = cluster.endpoints.load();
        let endpoints: Vec<Arc<Endpoint>> = found
            .iter()
            .map(|d| {
                let weight = d.effective_weight(now);
                match old.endpoints().iter().find(|e| e.addr == d.address && *e.env == *d.env) {
                    Some(e) if e.weight == weight => e.clone(),
                    Some(e) => Arc::new(e.reweighted(weight)),
                    None => Arc::new(Endpoint::new(
                        d.address,
                        weight,
                        d.env.as_str().into(),
                        self.metrics.request(Direction::Outbound, &self.service, &d.env),
                    )),
                }
            })
            .collect();
        let unchanged = endpoints.len() == old.endpoints().len()
            && endpoints.iter().zip(old.endpoints()).all(|(a, b)| Arc::ptr_eq(a, b));
        if unchanged {
            return;
        }
        cluster
            .endpoints
            .store(Arc::new(EndpointSet::new(cluster.balancer, endpoints)));
        // A reload may have swapped the route table meanwhile: install into the new one too.
        if !Arc::ptr_eq(&*routes, &*self.routes.load()) {
            drop(routes);
            return self.install(found, count);
        }
        if count {
            self.metrics
                .discovery_updates
                .get_or_create(&ClusterLabels {
                    direction: Direction::Outbound,
                    service: self.service.clone(),
                })
                .inc();
        }
    }
}
