//! The `memory` source: the instances of the agent's in-process registry
//! ([`crate::registry::memory`]), the same table its registrar writes, so an outbound listener
//! can call the agent's own service by name, through the mesh. An instance in maintenance
//! (drained) is never an endpoint; an unhealthy one is not with `passing_only` (the default).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use tokio::sync::watch;

use super::{EndpointSource, Found, RampInfo, View, Want};
use crate::registry::memory::{Instances, Memory};
use crate::registry::Registration;
use crate::store::unix_now;

/// Watches of the in-process table, one small task per subscribed service.
pub struct MemorySource {
    registry: Arc<Memory>,
}

impl MemorySource {
    pub fn new(registry: Arc<Memory>) -> Self {
        Self { registry }
    }
}

impl EndpointSource for MemorySource {
    fn subscribe(&self, want: &Want) -> watch::Receiver<View> {
        let mut table = self.registry.watch();
        let (tx, rx) = watch::channel(view(&table.borrow_and_update(), want));
        let want = want.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    changed = table.changed() => {
                        if changed.is_err() {
                            return;
                        }
                        let next = view(&table.borrow_and_update(), &want);
                        tx.send_if_modified(|v| {
                            let changed = v.endpoints != next.endpoints;
                            v.updated = next.updated;
                            if changed {
                                *v = next;
                            }
                            changed
                        });
                    }
                    () = tx.closed() => return,
                }
            }
        });
        rx
    }
}

/// What `want` sees of the table now.
fn view(table: &Instances, want: &Want) -> View {
    let found = table
        .get(&want.service)
        .into_iter()
        .flat_map(|m| m.values())
        .filter(|r| !r.maintenance && (r.healthy || !want.passing_only))
        .filter(|r| want.tag.as_ref().is_none_or(|t| r.tags.contains(t)))
        .map(found)
        .collect();
    View {
        endpoints: Some(Arc::new(found)),
        error: None,
        updated: Some(unix_now()),
    }
}

/// A registration as an endpoint, its metadata read as etcd's (`vmesh-ramp-start` is
/// `ramp_start`). An empty address is loopback: the table lives on this host.
fn found(r: &Registration) -> Found {
    let meta = |k: &str| r.meta.get(&format!("vmesh-{}", k.replace('_', "-"))).cloned();
    let ip = r.address.parse().unwrap_or(IpAddr::from([127, 0, 0, 1]));
    Found {
        address: SocketAddr::new(ip, r.port),
        weight: r.weight.clamp(1, 10_000),
        env: meta("env").unwrap_or_else(|| "vm".to_owned()),
        zone: meta("zone").unwrap_or_default(),
        version: meta("version").unwrap_or_default(),
        colour: meta("colour").unwrap_or_default(),
        ramp: RampInfo::from_meta(meta),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::time::Duration;

    use super::*;
    use crate::registry::Registry;

    fn reg(id: &str, port: u16) -> Registration {
        Registration {
            id: id.into(),
            service: "web".into(),
            address: "127.0.0.1".into(),
            port,
            tags: vec!["v1".into()],
            meta: BTreeMap::from([
                ("vmesh-env".to_owned(), "vm".to_owned()),
                ("vmesh-zone".to_owned(), "z1".to_owned()),
                ("vmesh-weight".to_owned(), "100".to_owned()),
                ("vmesh-ramp-start".to_owned(), unix_now().to_string()),
                ("vmesh-ramp-window".to_owned(), "60".to_owned()),
            ]),
            weight: 1,
            healthy: true,
            maintenance: false,
            check_ttl: Duration::from_secs(15),
            deregister_critical_after: Duration::from_secs(600),
        }
    }

    fn want(passing_only: bool, tag: Option<&str>) -> Want {
        Want {
            service: "web".into(),
            passing_only,
            tag: tag.map(str::to_owned),
        }
    }

    fn ports(rx: &watch::Receiver<View>) -> Vec<u16> {
        let v = rx.borrow();
        v.endpoints
            .iter()
            .flat_map(|e| e.iter())
            .map(|f| f.address.port())
            .collect()
    }

    /// Registration, drain (maintenance), health and deregistration reach a subscriber, which
    /// sees only the instances a caller may use.
    #[tokio::test]
    async fn the_registrars_writes_reach_subscribers() {
        let m = Arc::new(Memory::new());
        let src = MemorySource::new(m.clone());
        let mut rx = src.subscribe(&want(true, None));
        assert_eq!(ports(&rx), Vec::<u16>::new(), "answered at once, empty");
        assert!(rx.borrow().endpoints.is_some());

        m.register(&reg("web-a", 15006)).await.unwrap();
        rx.changed().await.unwrap();
        assert_eq!(ports(&rx), [15006]);
        let f = rx.borrow().endpoints.as_ref().unwrap()[0].clone();
        assert_eq!((f.env.as_str(), f.zone.as_str(), f.weight), ("vm", "z1", 1));
        let ramp = f.ramp.expect("ramp metadata is read");
        assert_eq!((ramp.window, ramp.target), (60, 100));

        let drained = Registration {
            maintenance: true,
            ..reg("web-a", 15006)
        };
        m.set_maintenance(&drained).await.unwrap();
        rx.changed().await.unwrap();
        assert_eq!(ports(&rx), Vec::<u16>::new(), "a drained instance is no endpoint");

        m.register(&Registration {
            healthy: false,
            ..reg("web-a", 15006)
        })
        .await
        .unwrap();
        m.register(&reg("web-b", 15007)).await.unwrap();
        tokio::time::timeout(
            Duration::from_secs(5),
            rx.wait_for(|v| v.endpoints.as_ref().is_some_and(|e| e.len() == 1)),
        )
        .await
        .unwrap()
        .unwrap();
        assert_eq!(
            ports(&rx),
            [15007],
            "an unhealthy instance is left out with passing_only"
        );
        let all = src.subscribe(&want(false, None));
        assert_eq!(ports(&all), [15006, 15007], "and kept without it");
        let tagged = src.subscribe(&want(false, Some("v2")));
        assert_eq!(ports(&tagged), Vec::<u16>::new(), "the tag filters");

        m.deregister("web", "web-b").await.unwrap();
        rx.changed().await.unwrap();
        assert_eq!(ports(&rx), Vec::<u16>::new());
    }
}
