//! The custom fields an identity mapping reads from Nautobot or NetBox: which of them exist on
//! virtual machines (`GET /api/extras/custom-fields/`), and creating the missing ones (`POST`,
//! or a `PATCH` that adds the virtual-machine type to a field that exists elsewhere). Used by
//! `vmesh init`.

use serde_json::{json, Value};

use crate::rest::error_chain;
use crate::{CmdbError, FieldMap, Flavor, RestOptions};

/// The content type (Nautobot, NetBox < 4) or object type (NetBox 4) of virtual machines.
pub const VM_TYPE: &str = "virtualization.virtualmachine";

/// Pages of the custom-field list followed at most (1000 fields a page).
const MAX_PAGES: usize = 20;

/// A custom field the mapping reads: `custom_fields.<key>` in one of its paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WantedField {
    pub key: String,
    /// The type the mapping expects: `integer` for `weight`, else `text`.
    pub kind: FieldType,
    /// The identity fields that read it (`service`, `zone`, ...).
    pub used_by: Vec<&'static str>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FieldType {
    Text,
    Integer,
}

/// How a wanted field stands in the CMDB.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FieldState {
    /// Exists and applies to virtual machines; `kind` is the CMDB's type (e.g. `text`).
    Present { kind: String },
    /// No custom field with this key.
    Missing,
    /// Exists, but not on virtual machines.
    NotOnVms { id: String },
}

/// A custom field as the CMDB lists it.
#[derive(Clone, Debug)]
struct Listed {
    id: String,
    key: String,
    kind: String,
    /// The types it applies to, and the attribute that holds them (`content_types` or
    /// `object_types`), for a PATCH that adds one.
    types: Vec<String>,
    types_attr: &'static str,
}

/// The custom-field API of a Nautobot or NetBox instance.
pub struct CustomFields {
    flavor: Flavor,
    base: String,
    token: Option<String>,
    client: reqwest::Client,
}

// === impl FieldType ===

impl FieldType {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Integer => "integer",
        }
    }
}

// === impl FieldMap ===

impl FieldMap {
    /// The custom fields this mapping reads, in the order of the identity fields, each once.
    pub fn custom_fields(&self) -> Vec<WantedField> {
        let mut out: Vec<WantedField> = Vec::new();
        let fields: [(&'static str, &[String]); 7] = [
            ("service", &self.service),
            ("environment", &self.environment),
            ("zone", &self.zone),
            ("version", &self.version),
            ("weight", &self.weight),
            ("colour", &self.colour),
            ("owner", &self.owner),
        ];
        for (name, paths) in fields {
            for key in paths
                .iter()
                .filter_map(|p| p.strip_prefix("custom_fields."))
                .filter_map(|rest| rest.split('.').next())
                .filter(|k| !k.is_empty())
            {
                let kind = if name == "weight" {
                    FieldType::Integer
                } else {
                    FieldType::Text
                };
                match out.iter_mut().find(|w| w.key == key) {
                    Some(w) => w.used_by.push(name),
                    None => out.push(WantedField {
                        key: key.to_owned(),
                        kind,
                        used_by: vec![name],
                    }),
                }
            }
        }
        out
    }
}

// === impl CustomFields ===

impl CustomFields {
    /// A client for the instance of `opts` (its URL, token, CA and timeout).
    pub fn new(flavor: Flavor, opts: &RestOptions) -> Result<Self, CmdbError> {
        let client = crate::rest::client(opts)?;
        Ok(Self {
            flavor,
            base: opts.url.trim_end_matches('/').to_owned(),
            token: opts.token.clone(),
            client,
        })
    }

    /// Where each of `wanted` stands.
    pub async fn check(&self, wanted: &[WantedField]) -> Result<Vec<FieldState>, CmdbError> {
        let listed = self.list().await?;
        Ok(wanted
            .iter()
            .map(|w| match listed.iter().find(|l| l.key == w.key) {
                None => FieldState::Missing,
                Some(l) if l.types.iter().any(|t| t == VM_TYPE) => FieldState::Present { kind: l.kind.clone() },
                Some(l) => FieldState::NotOnVms { id: l.id.clone() },
            })
            .collect())
    }

    /// Makes `field` exist on virtual machines: creates it (`Missing`), or adds the
    /// virtual-machine type to it (`NotOnVms`). `Present` needs nothing.
    pub async fn ensure(&self, field: &WantedField, state: &FieldState) -> Result<(), CmdbError> {
        let url = format!("{}/api/extras/custom-fields/", self.base);
        match state {
            FieldState::Present { .. } => Ok(()),
            FieldState::Missing => {
                let (name_attr, types_attr) = match self.flavor {
                    Flavor::Nautobot => ("key", "content_types"),
                    Flavor::Netbox => ("name", "object_types"),
                };
                let mut body = json!({
                    "label": format!("vmesh {}", field.used_by.join("/")),
                    "type": field.kind.as_str(),
                    "required": false,
                    "description": format!(
                        "vmesh identity: {} (created by vmesh init)",
                        field.used_by.join(", ")
                    ),
                });
                body[name_attr] = json!(field.key);
                body[types_attr] = json!([VM_TYPE]);
                self.send(reqwest::Method::POST, &url, body).await.map(drop)
            }
            FieldState::NotOnVms { id } => {
                // Read it again: the PATCH replaces the whole list of types.
                let listed = self.list().await?;
                let l = listed
                    .iter()
                    .find(|l| &l.id == id)
                    .ok_or_else(|| CmdbError::BadResponse(format!("custom field {} vanished", field.key)))?;
                let mut types = l.types.clone();
                types.push(VM_TYPE.to_owned());
                let body = json!({ l.types_attr: types });
                self.send(reqwest::Method::PATCH, &format!("{url}{id}/"), body)
                    .await
                    .map(drop)
            }
        }
    }

    /// Every custom field of the instance.
    async fn list(&self) -> Result<Vec<Listed>, CmdbError> {
        let mut url = format!("{}/api/extras/custom-fields/?limit=1000", self.base);
        let mut out = Vec::new();
        for _ in 0..MAX_PAGES {
            let page = self.send(reqwest::Method::GET, &url, Value::Null).await?;
            let results = page
                .get("results")
                .and_then(Value::as_array)
                .ok_or_else(|| CmdbError::BadResponse(format!("{url}: no `results` array in the answer")))?;
            out.extend(results.iter().filter_map(listed));
            match page.get("next").and_then(Value::as_str) {
                Some(next) => {
                    let here = reqwest::Url::parse(&url).map_err(|e| CmdbError::Config(format!("url {url:?}: {e}")))?;
                    url = crate::rest::same_origin(&here, next)?.to_string();
                }
                None => return Ok(out),
            }
        }
        Err(CmdbError::BadResponse(format!(
            "more than {MAX_PAGES} pages of custom fields"
        )))
    }

    /// One request; `body` is sent unless it is null. Returns the JSON answer (null when empty).
    async fn send(&self, method: reqwest::Method, url: &str, body: Value) -> Result<Value, CmdbError> {
        let mut req = self
            .client
            .request(method.clone(), url)
            .header("Accept", "application/json");
        if let Some(t) = &self.token {
            req = req.header("Authorization", format!("Token {t}"));
        }
        if !body.is_null() {
            req = req.json(&body);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| CmdbError::Unreachable(format!("{method} {url}: {}", error_chain(&e))))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| CmdbError::Unreachable(format!("{method} {url}: {}", error_chain(&e))))?;
        let detail = || text.chars().take(500).collect::<String>();
        if status == reqwest::StatusCode::UNAUTHORIZED || status == reqwest::StatusCode::FORBIDDEN {
            return Err(CmdbError::Auth(format!("{method} {url}: HTTP {status}: {}", detail())));
        }
        if status.is_server_error() {
            return Err(CmdbError::Unreachable(format!("{method} {url}: HTTP {status}")));
        }
        if !status.is_success() {
            return Err(CmdbError::BadResponse(format!(
                "{method} {url}: HTTP {status}: {}",
                detail()
            )));
        }
        if text.trim().is_empty() {
            return Ok(Value::Null);
        }
        serde_json::from_str(&text).map_err(|e| CmdbError::BadResponse(format!("{method} {url}: not JSON: {e}")))
    }
}

/// A listed custom field: Nautobot names it by `key`, NetBox by `name`; the types it applies to
/// are `content_types` (Nautobot, NetBox < 4) or `object_types` (NetBox 4).
fn listed(r: &Value) -> Option<Listed> {
    let key = r.get("key").or_else(|| r.get("name"))?.as_str()?.to_owned();
    let (types_attr, types) = match (r.get("content_types"), r.get("object_types")) {
        (Some(Value::Array(t)), _) => ("content_types", t),
        (_, Some(Value::Array(t))) => ("object_types", t),
        _ => return None,
    };
    let id = match r.get("id")? {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    Some(Listed {
        id,
        key,
        kind: r
            .get("type")
            .and_then(|t| t.get("value").or(Some(t)))
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned(),
        types: types.iter().filter_map(Value::as_str).map(str::to_owned).collect(),
        types_attr,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn the_default_mapping_reads_seven_fields_weight_an_integer() {
        let wanted = FieldMap::rest_default().custom_fields();
        let keys: Vec<&str> = wanted.iter().map(|w| w.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "vmesh_service",
                "vmesh_env",
                "vmesh_zone",
                "vmesh_version",
                "vmesh_weight",
                "vmesh_colour",
                "vmesh_owner"
            ]
        );
        assert_eq!(wanted[4].kind, FieldType::Integer);
        assert_eq!(wanted[0].kind, FieldType::Text);
    }

    #[test]
    fn a_field_read_twice_is_wanted_once_and_other_paths_are_not_fields() {
        let m: FieldMap = toml::from_str(
            "service = [\"custom_fields.app.name\", \"name\"]\nenvironment = \"custom_fields.app\"\nowner = \"tenant.name\"\n",
        )
        .unwrap();
        let wanted = m.custom_fields();
        assert_eq!(
            wanted,
            [WantedField {
                key: "app".into(),
                kind: FieldType::Text,
                used_by: vec!["service", "environment"]
            }]
        );
    }

    #[test]
    fn nautobot_and_netbox_listings_parse() {
        let nautobot = json!({"id": "8ac4", "key": "vmesh_colour", "type": {"value": "text", "label": "Text"},
                              "content_types": ["virtualization.virtualmachine"]});
        let l = listed(&nautobot).unwrap();
        assert_eq!(
            (l.key.as_str(), l.kind.as_str(), l.types_attr),
            ("vmesh_colour", "text", "content_types")
        );
        let netbox = json!({"id": 7, "name": "vmesh_weight", "type": {"value": "integer", "label": "Integer"},
                            "object_types": ["dcim.device"]});
        let l = listed(&netbox).unwrap();
        assert_eq!(
            (
                l.id.as_str(),
                l.key.as_str(),
                l.kind.as_str(),
                l.types_attr,
                l.types.len()
            ),
            ("7", "vmesh_weight", "integer", "object_types", 1)
        );
    }
}
