//! The in-process registry (`kind = "memory"`): a table in the agent's own memory, for the demo
//! and a single host. Nothing outside the process sees it and it dies with the process; the
//! agent's own discovery reads it (`discovery::memory`), so its outbound listeners can call the
//! instance it registered by service name, through the mesh, with nothing installed.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;

use super::{BoxFuture, Registration, Registry, RegistryError};

/// Every registered instance: service name -> instance ID -> registration.
pub type Instances = BTreeMap<String, BTreeMap<String, Registration>>;

/// The table, published whole on every change.
pub struct Memory {
    table: watch::Sender<Arc<Instances>>,
}

impl Default for Memory {
    fn default() -> Self {
        Self::new()
    }
}

impl Memory {
    pub fn new() -> Self {
        Self {
            table: watch::Sender::new(Arc::new(Instances::new())),
        }
    }

    /// The table as it changes (discovery).
    pub fn watch(&self) -> watch::Receiver<Arc<Instances>> {
        self.table.subscribe()
    }

    /// The instances of `service` now.
    pub fn instances(&self, service: &str) -> Vec<Registration> {
        self.table
            .borrow()
            .get(service)
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }

    /// Applies `f` to instance `r.id` of `r.service`; an instance not registered is an error.
    fn update(&self, r: &Registration, f: impl FnOnce(&mut Registration)) -> Result<(), RegistryError> {
        let mut found = false;
        self.table.send_if_modified(|t| {
            let Some(have) = t.get(&r.service).and_then(|m| m.get(&r.id)) else {
                return false;
            };
            found = true;
            let mut next = have.clone();
            f(&mut next);
            if next == *have {
                return false;
            }
            Arc::make_mut(t)
                .entry(r.service.clone())
                .or_default()
                .insert(r.id.clone(), next);
            true
        });
        found.then_some(()).ok_or_else(|| Self::not_registered(r))
    }

    fn not_registered(r: &Registration) -> RegistryError {
        RegistryError::BadResponse(format!("memory: instance {} of {} is not registered", r.id, r.service))
    }
}

impl Registry for Memory {
    fn register<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            self.table.send_if_modified(|t| {
                if t.get(&r.service).and_then(|m| m.get(&r.id)) == Some(r) {
                    return false;
                }
                Arc::make_mut(t)
                    .entry(r.service.clone())
                    .or_default()
                    .insert(r.id.clone(), r.clone());
                true
            });
            Ok(())
        })
    }

    fn set_health<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let healthy = r.healthy;
            self.update(r, |have| have.healthy = healthy)
        })
    }

    fn set_maintenance<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            let maintenance = r.maintenance;
            self.update(r, |have| have.maintenance = maintenance)
        })
    }

    fn deregister<'a>(&'a self, service: &'a str, id: &'a str) -> BoxFuture<'a, Result<(), RegistryError>> {
        Box::pin(async move {
            self.table.send_if_modified(|t| {
                if !t.get(service).is_some_and(|m| m.contains_key(id)) {
                    return false;
                }
                let t = Arc::make_mut(t);
                if let Some(m) = t.get_mut(service) {
                    m.remove(id);
                    if m.is_empty() {
                        t.remove(service);
                    }
                }
                true
            });
            Ok(())
        })
    }

    fn is_registered<'a>(&'a self, r: &'a Registration) -> BoxFuture<'a, Result<bool, RegistryError>> {
        Box::pin(async move { Ok(self.instances(&r.service).iter().any(|i| i.id == r.id)) })
    }

    fn describe(&self) -> String {
        "memory (in-process)".to_owned()
    }

    /// The table keeps the whole registration, health and maintenance included.
    fn register_sets_state(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn reg(id: &str, weight: u32) -> Registration {
        Registration {
            id: id.into(),
            service: "web".into(),
            address: "127.0.0.1".into(),
            port: 15006,
            tags: vec![],
            meta: BTreeMap::new(),
            weight,
            healthy: true,
            maintenance: false,
            check_ttl: Duration::from_secs(15),
            deregister_critical_after: Duration::from_secs(600),
        }
    }

    #[tokio::test]
    async fn register_update_and_deregister_are_seen_by_watchers() {
        let m = Memory::new();
        let mut rx = m.watch();
        rx.borrow_and_update();
        let a = reg("web-a", 1);
        assert!(!m.is_registered(&a).await.unwrap());
        assert_eq!(
            m.set_health(&a).await.unwrap_err().code(),
            "REGISTRY_BAD_RESPONSE",
            "health of an instance never registered"
        );

        m.register(&a).await.unwrap();
        assert!(rx.has_changed().unwrap());
        rx.borrow_and_update();
        assert!(m.is_registered(&a).await.unwrap());
        m.register(&a).await.unwrap();
        assert!(!rx.has_changed().unwrap(), "an identical write publishes nothing");

        m.register(&reg("web-a", 40)).await.unwrap();
        assert_eq!(m.instances("web")[0].weight, 40);
        let drained = Registration {
            maintenance: true,
            ..reg("web-a", 40)
        };
        m.set_maintenance(&drained).await.unwrap();
        assert!(m.instances("web")[0].maintenance);
        m.set_maintenance(&drained).await.unwrap();
        let sick = Registration {
            healthy: false,
            ..drained.clone()
        };
        m.set_health(&sick).await.unwrap();
        assert_eq!(
            (m.instances("web")[0].healthy, m.instances("web")[0].maintenance),
            (false, true)
        );

        m.register(&reg("web-b", 100)).await.unwrap();
        assert_eq!(m.instances("web").len(), 2);
        m.deregister("web", "web-a").await.unwrap();
        m.deregister("web", "web-a").await.unwrap();
        assert_eq!(
            m.instances("web").iter().map(|i| i.id.as_str()).collect::<Vec<_>>(),
            ["web-b"]
        );
        m.deregister("web", "web-b").await.unwrap();
        assert!(m.watch().borrow().is_empty(), "an empty service leaves the table");
        assert!(rx.has_changed().unwrap());
    }
}
