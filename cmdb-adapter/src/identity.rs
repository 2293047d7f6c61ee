//! The service identity of one VM.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the CMDB says this VM runs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceIdentity {
    /// The service name registered in the registry.
    pub service: String,
    /// Deployment environment, e.g. `prod`, `staging`.
    pub environment: String,
    /// Failure zone (availability zone, rack row, site).
    #[serde(default)]
    pub zone: String,
    /// Application version.
    #[serde(default)]
    pub version: String,
    /// Target weight 1..=100 (the end of the slow-start ramp).
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// Traffic colour (e.g. `blue`, `canary`); empty for none.
    #[serde(default)]
    pub colour: String,
    /// Owning team.
    #[serde(default)]
    pub owner: String,
    /// Extra tags from the CMDB (tag names).
    #[serde(default)]
    pub tags: Vec<String>,
}

fn default_weight() -> u32 {
    100
}

impl ServiceIdentity {
    /// Field-by-field differences from `other`, as `field: old -> new` (for the change log).
    pub fn diff(&self, new: &Self) -> Vec<String> {
        let a = self.fields();
        let b = new.fields();
        a.iter()
            .filter(|(k, v)| b.get(*k) != Some(v))
            .map(|(k, v)| format!("{k}: {v:?} -> {:?}", b.get(k).map(String::as_str).unwrap_or("")))
            .collect()
    }

    fn fields(&self) -> BTreeMap<&'static str, String> {
        BTreeMap::from([
            ("service", self.service.clone()),
            ("environment", self.environment.clone()),
            ("zone", self.zone.clone()),
            ("version", self.version.clone()),
            ("weight", self.weight.to_string()),
            ("colour", self.colour.clone()),
            ("owner", self.owner.clone()),
            ("tags", self.tags.join(",")),
        ])
    }

    /// Checks the invariants every backend must guarantee; names the first bad field.
    pub(crate) fn check(&self) -> Result<(), (&'static str, String)> {
        if self.service.trim().is_empty() {
            return Err(("service", "is empty".into()));
        }
        if !self
            .service
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        {
            return Err(("service", format!("{:?} is not a valid service name", self.service)));
        }
        if self.environment.trim().is_empty() {
            return Err(("environment", "is empty".into()));
        }
        if !(1..=100).contains(&self.weight) {
            return Err(("weight", format!("{} is out of range 1..=100", self.weight)));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> ServiceIdentity {
        ServiceIdentity {
            service: "orders".into(),
            environment: "prod".into(),
            zone: "z1".into(),
            version: "v3".into(),
            weight: 100,
            colour: String::new(),
            owner: "team-a".into(),
            tags: vec![],
        }
    }

    #[test]
    fn diff_names_changed_fields() {
        let mut b = id();
        b.environment = "staging".into();
        assert_eq!(id().diff(&b), ["environment: \"prod\" -> \"staging\""]);
        assert!(id().diff(&id()).is_empty());
    }

    #[test]
    fn check_rejects_bad_records() {
        let mut b = id();
        b.weight = 0;
        assert_eq!(b.check().unwrap_err().0, "weight");
        let mut c = id();
        c.service = "a b".into();
        assert_eq!(c.check().unwrap_err().0, "service");
    }
}
