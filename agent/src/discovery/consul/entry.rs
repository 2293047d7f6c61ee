//! The parts of Consul's answers that discovery reads, as typed structs borrowing from the
//! body: a `/v1/health/service` entry and a `/v1/health/state/any` check. Only the fields used
//! are kept; the rest of each object is skipped without being built.
//!
//! Health entries read leniently, as the `serde_json::Value` trees they replace did: a field
//! of another JSON type than expected reads as absent, so one malformed entry fails its own
//! checks (and is skipped alone) instead of failing the whole answer.

use std::borrow::Cow;
use std::fmt;
use std::marker::PhantomData;

use serde::de::{self, value::MapAccessDeserializer, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;

/// One element of a `/v1/health/service` answer.
#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct HealthEntry<'a> {
    #[serde(rename = "Node", borrow)]
    pub node: Obj<NodePart<'a>>,
    #[serde(rename = "Service", borrow)]
    pub service: Obj<ServicePart<'a>>,
    #[serde(rename = "Checks")]
    pub checks: Maintenance,
}

/// Whether an entry's `Checks` hold a maintenance check: Consul's `_node_maintenance`, or
/// `_service_maintenance:<id>` (what `vmesh drain` sets). A `Checks` that is not an array of
/// objects reads as "not in maintenance".
#[derive(Debug, Default)]
pub(super) struct Maintenance(pub bool);

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
struct CheckIdPart<'a> {
    #[serde(rename = "CheckID", borrow)]
    id: Leaf<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct NodePart<'a> {
    #[serde(rename = "Node", borrow)]
    pub name: Leaf<'a>,
    #[serde(rename = "Address", borrow)]
    pub address: Leaf<'a>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct ServicePart<'a> {
    #[serde(rename = "Address", borrow)]
    pub address: Leaf<'a>,
    #[serde(rename = "Port", borrow)]
    pub port: Leaf<'a>,
    #[serde(rename = "Meta", borrow)]
    pub meta: Obj<Meta<'a>>,
    #[serde(rename = "Weights", borrow)]
    pub weights: Obj<Weights<'a>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(default)]
pub(super) struct Weights<'a> {
    #[serde(rename = "Passing", borrow)]
    pub passing: Leaf<'a>,
}

/// A string map (`Service.Meta`) as its pairs, in the order given.
#[derive(Debug, Default)]
pub(super) struct Meta<'a>(Vec<(Leaf<'a>, Leaf<'a>)>);

/// A JSON value where a string or a non-negative integer is expected: anything else reads as
/// [`Leaf::Other`] (objects and arrays are skipped, not built).
#[derive(Debug, Default)]
pub(super) enum Leaf<'a> {
    #[default]
    Absent,
    Str(Cow<'a, str>),
    Num(u64),
    Other,
}

/// A JSON object read as `T`, or `None` when the value is not an object.
#[derive(Debug)]
pub(super) struct Obj<T>(pub Option<T>);

/// One element of a `/v1/health/state/any` answer (Consul's own output: read strictly).
#[derive(Clone, Debug, Deserialize)]
pub(super) struct CheckRow<'a> {
    #[serde(rename = "Node", borrow)]
    pub node: Cow<'a, str>,
    #[serde(rename = "CheckID", borrow)]
    pub check_id: Cow<'a, str>,
    #[serde(rename = "Status", borrow)]
    pub status: Cow<'a, str>,
    /// Empty for a node-level check (e.g. `serfHealth`).
    #[serde(rename = "ServiceID", borrow, default)]
    pub service_id: Cow<'a, str>,
    #[serde(rename = "ServiceName", borrow, default)]
    pub service_name: Cow<'a, str>,
    #[serde(rename = "CreateIndex", default)]
    pub create_index: u64,
    #[serde(rename = "ModifyIndex", default)]
    pub modify_index: u64,
}

// === impl Leaf ===

impl Leaf<'_> {
    pub fn as_str(&self) -> Option<&str> {
        match self {
            Leaf::Str(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u64(&self) -> Option<u64> {
        match self {
            Leaf::Num(n) => Some(*n),
            _ => None,
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Leaf<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Leaf<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(Leaf::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(Leaf::Str(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(Leaf::Str(Cow::Owned(v)))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
                Ok(Leaf::Num(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
                Ok(u64::try_from(v).map_or(Leaf::Other, Leaf::Num))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Leaf::Other)
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Leaf::Other)
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Leaf::Other)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| Leaf::Other)
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                skip_map(map).map(|()| Leaf::Other)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

// === impl Obj ===

impl<T> Default for Obj<T> {
    fn default() -> Self {
        Obj(None)
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Obj<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Obj<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(|t| Obj(Some(t)))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Obj(None))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Obj(None))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Obj(None))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Obj(None))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Obj(None))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Obj(None))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                skip_seq(seq).map(|()| Obj(None))
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

// === impl Maintenance ===

impl<'de> Deserialize<'de> for Maintenance {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Maintenance;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("any JSON value")
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
                let mut found = false;
                while let Some(check) = seq.next_element::<Obj<CheckIdPart<'de>>>()? {
                    if let Some(id) = check.0.as_ref().and_then(|c| c.id.as_str()) {
                        found |= id == "_node_maintenance" || id.starts_with("_service_maintenance:");
                    }
                }
                Ok(Maintenance(found))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(Maintenance(false))
            }
            fn visit_str<E: de::Error>(self, _: &str) -> Result<Self::Value, E> {
                Ok(Maintenance(false))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Self::Value, E> {
                Ok(Maintenance(false))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Self::Value, E> {
                Ok(Maintenance(false))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Self::Value, E> {
                Ok(Maintenance(false))
            }
            fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
                Ok(Maintenance(false))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
                Ok(Maintenance(false))
            }
        }
        d.deserialize_any(V)
    }
}

// === impl Meta ===

impl Meta<'_> {
    /// The value of `key` when it is a string (the last one if the key repeats, as a JSON
    /// object read into a map would keep).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .rev()
            .find(|(k, _)| k.as_str() == Some(key))
            .and_then(|(_, v)| v.as_str())
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Meta<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<'a>(PhantomData<&'a ()>);
        impl<'de: 'a, 'a> Visitor<'de> for V<'a> {
            type Value = Meta<'a>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut pairs = Vec::with_capacity(map.size_hint().unwrap_or(8));
                while let Some(pair) = map.next_entry::<Leaf<'a>, Leaf<'a>>()? {
                    pairs.push(pair);
                }
                Ok(Meta(pairs))
            }
        }
        d.deserialize_map(V(PhantomData))
    }
}

fn skip_seq<'de, A: SeqAccess<'de>>(mut seq: A) -> Result<(), A::Error> {
    while seq.next_element::<IgnoredAny>()?.is_some() {}
    Ok(())
}

fn skip_map<'de, A: MapAccess<'de>>(mut map: A) -> Result<(), A::Error> {
    while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wrong_types_read_as_absent_and_the_rest_still_reads() {
        let body = br#"[
            {"Node": {"Node": "n1", "Address": "10.0.0.1", "TaggedAddresses": {"lan": "x"}},
             "Service": {"Address": "", "Port": 80, "Tags": ["a"], "Meta": {"k": "v", "n": 1, "k": "w"},
                         "Weights": {"Passing": 10, "Warning": 1}},
             "Checks": [{"CheckID": "serfHealth"}]},
            {"Node": [], "Service": "junk"},
            {"Node": {"Address": 7}, "Service": {"Port": -1, "Meta": [], "Weights": null, "Address": {"x": 1}}},
            {"Service": {"Port": 1.5, "Address": "esc\u0061ped"}}
        ]"#;
        let entries: Vec<HealthEntry> = serde_json::from_slice(body).unwrap();
        assert_eq!(entries.len(), 4);
        let (node, svc) = (
            entries[0].node.0.as_ref().unwrap(),
            entries[0].service.0.as_ref().unwrap(),
        );
        assert_eq!(
            (node.name.as_str(), node.address.as_str()),
            (Some("n1"), Some("10.0.0.1"))
        );
        assert_eq!((svc.address.as_str(), svc.port.as_u64()), (Some(""), Some(80)));
        let meta = svc.meta.0.as_ref().unwrap();
        assert_eq!((meta.get("k"), meta.get("n"), meta.get("x")), (Some("w"), None, None));
        assert_eq!(svc.weights.0.as_ref().unwrap().passing.as_u64(), Some(10));
        assert!(entries[1].node.0.is_none() && entries[1].service.0.is_none());
        let svc = entries[2].service.0.as_ref().unwrap();
        assert_eq!(entries[2].node.0.as_ref().unwrap().address.as_str(), None);
        assert_eq!((svc.port.as_u64(), svc.address.as_str()), (None, None));
        assert!(svc.meta.0.is_none() && svc.weights.0.is_none());
        let svc = entries[3].service.0.as_ref().unwrap();
        assert_eq!((svc.port.as_u64(), svc.address.as_str()), (None, Some("escaped")));
    }

    #[test]
    fn a_syntax_error_fails_the_whole_answer() {
        assert!(serde_json::from_slice::<Vec<HealthEntry>>(br#"[{"Service": {"Port": 80}"#).is_err());
        assert!(serde_json::from_slice::<Vec<HealthEntry>>(br#"{"not": "an array"}"#).is_err());
    }

    #[test]
    fn checks_read_their_indexes() {
        let body = br#"[{"Node": "n1", "CheckID": "serfHealth", "Name": "Serf", "Status": "passing",
                        "Output": "ok", "ServiceID": "", "ServiceName": "", "ServiceTags": [],
                        "Definition": {}, "CreateIndex": 5, "ModifyIndex": 9}]"#;
        let rows: Vec<CheckRow> = serde_json::from_slice(body).unwrap();
        assert_eq!(
            (
                &*rows[0].node,
                &*rows[0].check_id,
                &*rows[0].status,
                rows[0].service_id.is_empty()
            ),
            ("n1", "serfHealth", "passing", true)
        );
        assert_eq!((rows[0].create_index, rows[0].modify_index), (5, 9));
    }
}
