//! The registration this instance should have, and the smallest registry write that gets it
//! there. Pure functions: the registrar (registrar.rs) calls them and does the I/O.

use std::collections::BTreeMap;
use std::net::IpAddr;

use vmesh_cmdb::ServiceIdentity;

use crate::config::{Config, RegistryKind};
use crate::ramp::{self, RampBook};
use crate::registry::Registration;

/// What is known of the instance besides the config and its identity.
#[derive(Clone, Copy, Debug)]
pub struct Now {
    pub unix: u64,
    /// The app passes its health check.
    pub healthy: bool,
    /// Drained or draining: in maintenance.
    pub maintenance: bool,
}

/// The registration the registry should hold, or `None` when there is nothing to advertise
/// (no `[inbound]`: a caller-only agent).
pub fn desired(config: &Config, identity: &ServiceIdentity, ramp: &RampBook, now: Now) -> Option<Registration> {
    let inbound = config.inbound.as_ref()?;
    let node = config.node_name();
    let address = match (config.registry.advertise_address, inbound.listen.ip()) {
        (Some(a), _) => a.to_string(),
        (None, ip) if !ip.is_unspecified() => ip.to_string(),
        // etcd has no node address to fall back on.
        (None, _) if config.registry.kind == RegistryKind::Etcd => IpAddr::from([127, 0, 0, 1]).to_string(),
        // Consul: empty means the agent's node address.
        (None, _) => String::new(),
    };
    // The labels first, then the CMDB's tags; each tag once, in first-seen order.
    let mut tags: Vec<String> = Vec::new();
    for t in [
        &identity.environment,
        &identity.zone,
        &identity.version,
        &identity.colour,
    ]
    .into_iter()
    .chain(&identity.tags)
    {
        if !t.is_empty() && !tags.contains(t) {
            tags.push(t.clone());
        }
    }
    let mut meta = BTreeMap::from([
        ("vmesh-env".to_owned(), config.registry.advertise_env.clone()),
        ("vmesh-environment".to_owned(), identity.environment.clone()),
        ("vmesh-zone".to_owned(), identity.zone.clone()),
        ("vmesh-version".to_owned(), identity.version.clone()),
        ("vmesh-colour".to_owned(), identity.colour.clone()),
        ("vmesh-owner".to_owned(), identity.owner.clone()),
        ("vmesh-weight".to_owned(), identity.weight.to_string()),
        ("vmesh-node".to_owned(), node.clone()),
    ]);
    meta.extend(ramp.meta().into_iter().map(|(k, v)| (k.to_owned(), v)));
    Some(Registration {
        id: format!("{}-{node}", identity.service),
        service: identity.service.clone(),
        address,
        port: inbound.listen.port(),
        tags,
        meta,
        weight: ramp::scale(ramp.advertised(now.unix), identity.weight),
        healthy: now.healthy,
        maintenance: now.maintenance,
        check_ttl: config.registry.check_ttl.get(),
        deregister_critical_after: config.registry.deregister_critical_after.get(),
    })
}

/// One registry write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Write {
    /// The whole registration (new, or more than one thing changed, or the registry may have
    /// lost it).
    Register,
    /// Only the health state changed (Consul: the TTL check; etcd: the key).
    Health,
    /// Only the maintenance state changed.
    Maintenance,
}

impl Write {
    /// The `op` label of `vmesh_registry_writes_total`.
    pub fn label(self) -> &'static str {
        match self {
            Self::Register => "register",
            Self::Health => "health",
            Self::Maintenance => "maintenance",
        }
    }
}

/// The smallest write from `have` (what the registry holds as far as we know) to `want`, or
/// `None` when nothing is to be written. `dirty`: the registry may differ from `have` (a write
/// failed, or anti-entropy found the registration gone), so an unchanged one is written again.
pub fn write(have: Option<&Registration>, want: &Registration, dirty: bool) -> Option<Write> {
    let Some(have) = have else {
        return Some(Write::Register);
    };
    if have == want {
        return dirty.then_some(Write::Register);
    }
    let only = |w: &Registration| w == want;
    if only(&Registration {
        healthy: want.healthy,
        ..have.clone()
    }) {
        Some(Write::Health)
    } else if only(&Registration {
        maintenance: want.maintenance,
        ..have.clone()
    }) {
        Some(Write::Maintenance)
    } else {
        Some(Write::Register)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::load_str;
    use crate::store::RampRecord;

    fn config(extra: &str) -> Config {
        load_str(&format!(
            r#"
            [agent]
            node = "vm-1"
            [registry]
            kind = "consul"
            [inbound]
            listen = "10.0.0.5:15001"
            app = "127.0.0.1:8080"
            [inbound.ramp]
            window = "100s"
            {extra}
            "#
        ))
        .unwrap_or_else(|e| panic!("{e}"))
    }

    fn identity() -> ServiceIdentity {
        ServiceIdentity {
            service: "orders".into(),
            environment: "prod".into(),
            zone: "z1".into(),
            version: "v2".into(),
            colour: String::new(),
            owner: "team".into(),
            weight: 50,
            tags: vec!["prod".into(), "extra".into()],
        }
    }

    const NOW: Now = Now {
        unix: 1_000,
        healthy: true,
        maintenance: false,
    };

    #[test]
    fn the_registration_carries_the_identity_the_ramp_and_the_state() {
        let c = config("");
        let mut ramp = RampBook::new(c.inbound.as_ref(), None);
        let before = desired(&c, &identity(), &ramp, NOW).unwrap_or_else(|| panic!("a registration"));
        assert_eq!(before.id, "orders-vm-1");
        assert_eq!((before.address.as_str(), before.port), ("10.0.0.5", 15001));
        assert_eq!(
            before.tags,
            ["prod", "z1", "v2", "extra"],
            "empty colour dropped, each tag once"
        );
        assert_eq!(
            before.weight, 1,
            "before the ramp began: weight 1 (scaled to 50, at least 1)"
        );
        assert!(!before.meta.contains_key("vmesh-ramp-start"));
        ramp.set(RampRecord {
            start: 1_000 - 100,
            window_secs: 100,
        });
        let done = desired(&c, &identity(), &ramp, NOW).unwrap_or_else(|| panic!("a registration"));
        assert_eq!(done.weight, 50, "ramp over: the CMDB's weight");
        assert_eq!(done.meta["vmesh-ramp-start"], "900");
        assert_eq!(done.meta["vmesh-ramp-window"], "100");
        assert_eq!(done.meta["vmesh-weight"], "50");
        let drained = desired(
            &c,
            &identity(),
            &ramp,
            Now {
                maintenance: true,
                healthy: false,
                ..NOW
            },
        )
        .unwrap_or_else(|| panic!("a registration"));
        assert!(drained.maintenance && !drained.healthy);
    }

    #[test]
    fn the_advertised_address_follows_the_listener_the_override_and_the_registry() {
        let cases = [
            ("", "10.0.0.5"),
            ("[registry]\nadvertise_address = \"192.0.2.1\"", "192.0.2.1"),
        ];
        for (extra, want) in cases {
            let mut c = config("");
            if !extra.is_empty() {
                c.registry.advertise_address = Some(want.parse().unwrap_or_else(|e| panic!("{e}")));
            }
            let r = desired(&c, &identity(), &RampBook::default(), NOW).unwrap_or_else(|| panic!("registration"));
            assert_eq!(r.address, want);
        }
        let mut c = config("");
        if let Some(i) = c.inbound.as_mut() {
            i.listen = "0.0.0.0:15001".parse().unwrap_or_else(|e| panic!("{e}"));
        }
        let consul = desired(&c, &identity(), &RampBook::default(), NOW).map(|r| r.address);
        assert_eq!(consul.as_deref(), Some(""), "Consul: the node's address");
        c.registry.kind = RegistryKind::Etcd;
        let etcd = desired(&c, &identity(), &RampBook::default(), NOW).map(|r| r.address);
        assert_eq!(etcd.as_deref(), Some("127.0.0.1"));
        c.inbound = None;
        assert!(
            desired(&c, &identity(), &RampBook::default(), NOW).is_none(),
            "caller-only"
        );
    }

    #[test]
    fn the_smallest_write() {
        let c = config("");
        let have = desired(&c, &identity(), &RampBook::default(), NOW).unwrap_or_else(|| panic!("registration"));
        let with = |f: fn(&mut Registration)| {
            let mut r = have.clone();
            f(&mut r);
            r
        };
        // (name, written, desired, dirty, expected write)
        type Case<'a> = (&'a str, Option<&'a Registration>, Registration, bool, Option<Write>);
        let cases: [Case; 8] = [
            ("nothing written yet", None, have.clone(), false, Some(Write::Register)),
            ("in line", Some(&have), have.clone(), false, None),
            (
                "in line but dirty",
                Some(&have),
                have.clone(),
                true,
                Some(Write::Register),
            ),
            (
                "health only",
                Some(&have),
                with(|r| r.healthy = false),
                false,
                Some(Write::Health),
            ),
            (
                "maintenance only",
                Some(&have),
                with(|r| r.maintenance = true),
                false,
                Some(Write::Maintenance),
            ),
            (
                "health and maintenance",
                Some(&have),
                with(|r| {
                    r.maintenance = true;
                    r.healthy = false;
                }),
                false,
                Some(Write::Register),
            ),
            (
                "weight step",
                Some(&have),
                with(|r| r.weight = 99),
                false,
                Some(Write::Register),
            ),
            (
                "new id",
                Some(&have),
                with(|r| r.id = "orders-vm-2".into()),
                false,
                Some(Write::Register),
            ),
        ];
        for (name, have, want, dirty, expected) in cases {
            assert_eq!(write(have, &want, dirty), expected, "{name}");
        }
    }
}
