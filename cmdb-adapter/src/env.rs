//! Environment variables as the CMDB: a Kubernetes pod, whose spec (and the downward API) sets
//! the identity. The variables come in a map the caller captured, never from the process
//! environment, so that tests pass a map and only the agent's `config` module reads the env.

use std::collections::HashMap;

use crate::{BoxFuture, Cmdb, CmdbError, FieldMap, ServiceIdentity};

#[cfg(test)]
mod tests;

/// The identity read from variables, by default `VMESH_ID_SERVICE`, `VMESH_ID_ENVIRONMENT`,
/// `VMESH_ID_ZONE`, `VMESH_ID_VERSION`, `VMESH_ID_WEIGHT`, `VMESH_ID_COLOUR`, `VMESH_ID_OWNER`
/// and `VMESH_ID_TAGS` (comma-separated). Each field may name several variables: the first one
/// that is set and not blank wins (a downward API reference to a missing label gives `""`).
#[derive(Debug)]
pub struct EnvCmdb {
    fields: FieldMap,
    /// Only the variables the mapping names, so nothing else is kept.
    vars: HashMap<String, String>,
}

impl EnvCmdb {
    /// Prefix of the default names. A config override is `VMESH_<SECTION>__<KEY>` and always
    /// holds `__`; an identity name never does, so the two sets cannot meet, and the `ID_` keeps
    /// `VMESH_VERSION` from reading as the agent's own version.
    pub const PREFIX: &'static str = "VMESH_ID_";

    /// The variable names used when `[cmdb.fields]` leaves a field out.
    pub fn default_fields() -> FieldMap {
        let name = |field: &str| vec![format!("{}{field}", Self::PREFIX)];
        FieldMap {
            service: name("SERVICE"),
            environment: name("ENVIRONMENT"),
            zone: name("ZONE"),
            version: name("VERSION"),
            weight: name("WEIGHT"),
            colour: name("COLOUR"),
            owner: name("OWNER"),
            tags: name("TAGS"),
            status: Vec::new(),
        }
    }

    /// A backend reading `fields` (empty fields keep [`Self::default_fields`]) from `env`.
    ///
    /// Names must start with `VMESH_` (the agent captures only those) and must not hold `__`
    /// (that is a config override); `status` cannot be mapped (a pod has no CMDB status). Every
    /// bad name is reported at once, as `cmdb.fields.<field>`.
    pub fn new(fields: FieldMap, env: &HashMap<String, String>) -> Result<Self, CmdbError> {
        let fields = fields.or_defaults(Self::default_fields());
        let mut problems = Vec::new();
        for (field, names) in named(&fields) {
            for name in names {
                if !name.starts_with("VMESH_") {
                    problems.push(format!(
                        "cmdb.fields.{field}: {name:?} does not start with VMESH_ (the only variables vmesh reads)"
                    ));
                } else if name.contains("__") {
                    problems.push(format!(
                        "cmdb.fields.{field}: {name:?} contains \"__\", so it would be read as a config override"
                    ));
                }
            }
        }
        if !fields.status.is_empty() {
            problems.push("cmdb.fields.status: kind = \"env\" has no status to check; leave it out".to_owned());
        }
        if !problems.is_empty() {
            return Err(CmdbError::Config(problems.join("; ")));
        }
        let vars = named(&fields)
            .into_iter()
            .flat_map(|(_, names)| names)
            .filter_map(|name| Some((name.clone(), env.get(name)?.clone())))
            .collect();
        Ok(Self { fields, vars })
    }

    fn read(&self, vm: &str) -> Result<ServiceIdentity, CmdbError> {
        let err = |field: &str, problem: String| CmdbError::Field {
            vm: vm.to_owned(),
            field: field.to_owned(),
            problem,
        };
        let text = |field: &str, names: &[String], required: bool| match self.first(names) {
            Some((_, value)) => Ok(value.to_owned()),
            None if required => Err(err(field, self.absent(names))),
            None => Ok(String::new()),
        };
        let weight = match self.first(&self.fields.weight) {
            None => 100,
            Some((name, value)) => value
                .parse::<u32>()
                .ok()
                .filter(|w| (1..=100).contains(w))
                .ok_or_else(|| err("weight", format!("{name} = {value:?} is not an integer 1..=100")))?,
        };
        let tags = match self.first(&self.fields.tags) {
            None => Vec::new(),
            Some((_, value)) => value
                .split(',')
                .map(str::trim)
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .collect(),
        };
        let id = ServiceIdentity {
            service: text("service", &self.fields.service, true)?,
            environment: text("environment", &self.fields.environment, true)?,
            zone: text("zone", &self.fields.zone, false)?,
            version: text("version", &self.fields.version, false)?,
            weight,
            colour: text("colour", &self.fields.colour, false)?,
            owner: text("owner", &self.fields.owner, false)?,
            tags,
        };
        // The checks every backend shares (the service's characters); name the variable.
        id.check().map_err(|(field, problem)| {
            let from = named(&self.fields)
                .into_iter()
                .find(|(f, _)| *f == field)
                .and_then(|(_, names)| self.first(names));
            match from {
                Some((name, _)) => err(field, format!("{name}: {problem}")),
                None => err(field, problem),
            }
        })?;
        Ok(id)
    }

    /// The first of `names` that is set and not blank, trimmed, with its name.
    fn first<'a>(&'a self, names: &'a [String]) -> Option<(&'a str, &'a str)> {
        names.iter().find_map(|name| {
            let value = self.vars.get(name)?.trim();
            (!value.is_empty()).then_some((name.as_str(), value))
        })
    }

    /// Why none of `names` gave a value, e.g. `VMESH_ID_SERVICE is not set`.
    fn absent(&self, names: &[String]) -> String {
        let each: Vec<String> = names
            .iter()
            .map(|name| match self.vars.get(name) {
                Some(_) => format!("{name} is empty"),
                None => format!("{name} is not set"),
            })
            .collect();
        each.join(", ")
    }
}

impl Cmdb for EnvCmdb {
    fn identity<'a>(&'a self, vm: &'a str) -> BoxFuture<'a, Result<ServiceIdentity, CmdbError>> {
        Box::pin(async move { self.read(vm) })
    }

    fn describe(&self) -> String {
        format!("env {}", self.fields.service.join(","))
    }
}

/// Every field that names variables (all but `status`), with its names.
fn named(fields: &FieldMap) -> [(&'static str, &Vec<String>); 8] {
    [
        ("service", &fields.service),
        ("environment", &fields.environment),
        ("zone", &fields.zone),
        ("version", &fields.version),
        ("weight", &fields.weight),
        ("colour", &fields.colour),
        ("owner", &fields.owner),
        ("tags", &fields.tags),
    ]
}
