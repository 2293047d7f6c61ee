//! Where each identity field lives in a CMDB record: dotted paths with fallbacks, e.g.
//! `zone = ["custom_fields.vmesh_zone", "location.name"]`.

use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use crate::{CmdbError, ServiceIdentity};

/// Paths of every identity field in a record; the first path that holds a non-null value wins.
/// In a config, a field left out (or an empty list) keeps the backend's default paths.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct FieldMap {
    #[serde(deserialize_with = "one_or_many")]
    pub service: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub environment: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub zone: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub version: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub weight: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub colour: Vec<String>,
    #[serde(deserialize_with = "one_or_many")]
    pub owner: Vec<String>,
    /// Tags: an array of strings or of objects with a `name`.
    #[serde(deserialize_with = "one_or_many")]
    pub tags: Vec<String>,
    /// Lifecycle status; empty: not checked.
    #[serde(deserialize_with = "one_or_many")]
    pub status: Vec<String>,
}

fn one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

fn paths(p: &[&str]) -> Vec<String> {
    p.iter().map(|s| (*s).to_owned()).collect()
}

impl FieldMap {
    /// Nautobot and NetBox: custom fields `vmesh_*`, zone falling back to the location/site.
    pub fn rest_default() -> Self {
        Self {
            service: paths(&["custom_fields.vmesh_service"]),
            environment: paths(&["custom_fields.vmesh_env"]),
            zone: paths(&[
                "custom_fields.vmesh_zone",
                "location.name",
                "site.name",
                "cluster.location.name",
                "cluster.site.name",
            ]),
            version: paths(&["custom_fields.vmesh_version"]),
            weight: paths(&["custom_fields.vmesh_weight"]),
            colour: paths(&["custom_fields.vmesh_colour"]),
            owner: paths(&["custom_fields.vmesh_owner", "tenant.name"]),
            tags: paths(&["tags"]),
            status: paths(&["status.value", "status.name", "status.display", "status"]),
        }
    }

    /// A generic JSON source: fields named as in the identity, at the top level.
    pub fn http_default() -> Self {
        Self {
            service: paths(&["service"]),
            environment: paths(&["environment"]),
            zone: paths(&["zone"]),
            version: paths(&["version"]),
            weight: paths(&["weight"]),
            colour: paths(&["colour"]),
            owner: paths(&["owner"]),
            tags: paths(&["tags"]),
            status: Vec::new(),
        }
    }

    /// These paths, with every field left empty taken from `defaults`.
    pub fn or_defaults(self, defaults: FieldMap) -> FieldMap {
        let pick = |mine: Vec<String>, theirs: Vec<String>| if mine.is_empty() { theirs } else { mine };
        FieldMap {
            service: pick(self.service, defaults.service),
            environment: pick(self.environment, defaults.environment),
            zone: pick(self.zone, defaults.zone),
            version: pick(self.version, defaults.version),
            weight: pick(self.weight, defaults.weight),
            colour: pick(self.colour, defaults.colour),
            owner: pick(self.owner, defaults.owner),
            tags: pick(self.tags, defaults.tags),
            status: pick(self.status, defaults.status),
        }
    }

    /// The lifecycle status string of a record, if mapped and present.
    pub fn status_of(&self, record: &Value) -> Option<String> {
        let v = first(record, &self.status)?.1;
        v.as_str().map(str::to_owned)
    }

    /// Builds the identity of `vm` from `record`; a wrong or missing field is named.
    pub fn identity(&self, vm: &str, record: &Value) -> Result<ServiceIdentity, CmdbError> {
        let err = |field: &str, problem: String| CmdbError::Field {
            vm: vm.to_owned(),
            field: field.to_owned(),
            problem,
        };
        let text = |name: &str, paths: &[String], required: bool| -> Result<String, CmdbError> {
            match first(record, paths) {
                Some((_, Value::String(s))) if !(required && s.trim().is_empty()) => Ok(s.trim().to_owned()),
                Some((path, Value::String(_))) => Err(err(name, format!("{path} is empty"))),
                Some((path, other)) => Err(err(name, format!("{path} is {}, expected a string", kind(other)))),
                None if required => Err(err(name, format!("missing (looked at {})", paths.join(", ")))),
                None => Ok(String::new()),
            }
        };
        let weight = match first(record, &self.weight) {
            None => 100,
            Some((path, v)) => match v.as_u64() {
                Some(w) => u32::try_from(w).map_err(|_| err("weight", format!("{path} = {w} is too large")))?,
                None => return Err(err("weight", format!("{path} is {}, expected an integer", kind(v)))),
            },
        };
        let tags = match first(record, &self.tags) {
            None => Vec::new(),
            Some((path, Value::Array(items))) => items
                .iter()
                .map(|t| match t {
                    Value::String(s) => Ok(s.clone()),
                    Value::Object(o) => o
                        .get("name")
                        .and_then(Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| err("tags", format!("{path}: a tag without a name"))),
                    other => Err(err("tags", format!("{path}: a tag is {}", kind(other)))),
                })
                .collect::<Result<_, _>>()?,
            Some((path, other)) => return Err(err("tags", format!("{path} is {}, expected an array", kind(other)))),
        };
        let id = ServiceIdentity {
            service: text("service", &self.service, true)?,
            environment: text("environment", &self.environment, true)?,
            zone: text("zone", &self.zone, false)?,
            version: text("version", &self.version, false)?,
            weight,
            colour: text("colour", &self.colour, false)?,
            owner: text("owner", &self.owner, false)?,
            tags,
        };
        id.check().map_err(|(field, problem)| err(field, problem))?;
        Ok(id)
    }
}

/// The first of `paths` that holds a non-null value.
fn first<'a>(record: &'a Value, paths: &'a [String]) -> Option<(&'a str, &'a Value)> {
    paths
        .iter()
        .find_map(|p| lookup(record, p).filter(|v| !v.is_null()).map(|v| (p.as_str(), v)))
}

fn lookup<'a>(mut v: &'a Value, path: &str) -> Option<&'a Value> {
    for seg in path.split('.') {
        v = match v {
            Value::Object(m) => m.get(seg)?,
            Value::Array(a) => a.get(seg.parse::<usize>().ok()?)?,
            _ => return None,
        };
    }
    Some(v)
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn rest_record_maps_with_zone_fallback() {
        let rec = json!({
            "name": "web-02",
            "status": {"value": "active", "label": "Active"},
            "site": {"name": "dc1-z1"},
            "tenant": {"name": "team-b"},
            "tags": [{"name": "pci"}],
            "custom_fields": {"vmesh_service": "orders", "vmesh_env": "prod", "vmesh_zone": null, "vmesh_weight": 50}
        });
        let id = FieldMap::rest_default().identity("web-02", &rec).unwrap();
        assert_eq!(id.zone, "dc1-z1");
        assert_eq!(id.owner, "team-b");
        assert_eq!(id.weight, 50);
        assert_eq!(id.tags, ["pci"]);
        assert_eq!(FieldMap::rest_default().status_of(&rec).as_deref(), Some("active"));
    }

    #[test]
    fn wrong_types_name_vm_and_field() {
        let rec = json!({"custom_fields": {"vmesh_service": "orders", "vmesh_env": "prod", "vmesh_weight": "heavy"}});
        let e = FieldMap::rest_default().identity("web-09", &rec).unwrap_err();
        assert_eq!(
            e.to_string(),
            "vm web-09: field weight: custom_fields.vmesh_weight is a string, expected an integer"
        );
        let rec = json!({"custom_fields": {"vmesh_env": "prod"}});
        let e = FieldMap::rest_default().identity("web-09", &rec).unwrap_err();
        assert!(
            matches!(e, CmdbError::Field { ref field, .. } if field == "service"),
            "{e}"
        );
        let rec = json!({"custom_fields": {"vmesh_service": 7, "vmesh_env": "prod"}});
        assert!(FieldMap::rest_default()
            .identity("v", &rec)
            .unwrap_err()
            .to_string()
            .contains("is a number"));
    }

    #[test]
    fn overrides_keep_the_other_defaults() {
        let m: FieldMap = toml::from_str("service = \"custom_fields.app\"\n").unwrap();
        let m = m.or_defaults(FieldMap::rest_default());
        assert_eq!(m.service, ["custom_fields.app"]);
        assert_eq!(m.environment, ["custom_fields.vmesh_env"]);
    }

    #[test]
    fn mapping_accepts_one_path_or_a_list() {
        let m: FieldMap = toml::from_str(
            "service = \"svc\"\nenvironment = [\"a.env\", \"env\"]\nzone = []\nversion = []\nweight = []\ncolour = []\nowner = []\ntags = []\nstatus = []\n",
        )
        .unwrap();
        let id = m.identity("v", &json!({"svc": "s", "env": "e"})).unwrap();
        assert_eq!(
            (id.service.as_str(), id.environment.as_str(), id.weight),
            ("s", "e", 100)
        );
    }
}
