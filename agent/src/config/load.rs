//! Reading a config: the TOML text, overlaid with `VMESH_*` variables, into typed sections.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::locate::line_of;
use super::validate::validate;
use super::{Config, ConfigErrors, Problem};

/// Where a config comes from: a file (or embedded text) and an environment map.
#[derive(Clone, Debug)]
pub struct Source {
    pub path: Option<PathBuf>,
    /// Used when `path` is `None` (the embedded quickstart config).
    pub text: Option<String>,
    /// `VMESH_*` variables; the process environment in production, a map in tests. Those with
    /// `__` override config keys; the others are read by their users (the `env` identity
    /// backend's `VMESH_ID_*`), so that nothing else reads the process environment.
    pub env: HashMap<String, String>,
}

impl Source {
    pub fn file(path: impl Into<PathBuf>) -> Self {
        Self {
            path: Some(path.into()),
            text: None,
            env: process_env(),
        }
    }

    pub fn embedded(text: &str) -> Self {
        Self {
            path: None,
            text: Some(text.to_owned()),
            env: process_env(),
        }
    }

    fn origin(&self) -> String {
        match &self.path {
            Some(p) => p.display().to_string(),
            None => "embedded config".to_owned(),
        }
    }
}

fn process_env() -> HashMap<String, String> {
    // `vars_os`: `vars` panics on a variable that is not UTF-8, anywhere in the environment.
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .filter(|(k, _)| k.starts_with("VMESH_"))
        .collect()
}

/// Whether a variable overrides a config key: `VMESH_<SECTION>__<KEY>`.
fn is_override(name: &str) -> bool {
    name.starts_with("VMESH_") && name.contains("__")
}

/// Loads and validates a config; every problem is reported at once.
pub fn load(source: &Source) -> Result<Config, ConfigErrors> {
    let origin = source.origin();
    let text = match (&source.path, &source.text) {
        (Some(path), _) => read(path).map_err(|message| ConfigErrors {
            origin: origin.clone(),
            problems: vec![Problem {
                key: "(file)".to_owned(),
                line: None,
                message,
            }],
        })?,
        (None, Some(text)) => text.clone(),
        (None, None) => String::new(),
    };
    load_with_env(&origin, &text, &source.env)
}

/// Loads a config from TOML text with no environment overlay (tests, check of embedded files).
pub fn load_str(text: &str) -> Result<Config, ConfigErrors> {
    load_with_env("config", text, &HashMap::new())
}

fn read(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
}

fn load_with_env(origin: &str, text: &str, env: &HashMap<String, String>) -> Result<Config, ConfigErrors> {
    let fail = |problems| ConfigErrors {
        origin: origin.to_owned(),
        problems,
    };
    // Syntax first: the `toml` parser names the line of a syntax error.
    if let Err(e) = toml::from_str::<toml::Table>(text) {
        return Err(fail(vec![Problem {
            key: "(syntax)".to_owned(),
            line: e.span().map(|s| text[..s.start].lines().count().max(1)),
            message: e.message().trim().to_owned(),
        }]));
    }
    let merged = config::Config::builder()
        .add_source(config::File::from_str(text, config::FileFormat::Toml))
        .add_source(
            config::Environment::with_prefix("VMESH")
                .prefix_separator("_")
                .separator("__")
                .try_parsing(true)
                .source(Some(
                    env.iter()
                        .filter(|(k, _)| is_override(k))
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                )),
        )
        .build()
        .and_then(|c| c.try_deserialize::<Value>())
        .map_err(|e| {
            fail(vec![Problem {
                key: "(config)".to_owned(),
                line: None,
                message: e.to_string(),
            }])
        })?;
    let (config, mut problems) = deserialize_all(merged, text);
    if let Some(config) = &config {
        problems.extend(validate(config).into_iter().map(|(key, message)| Problem {
            line: line_of(text, &key),
            key,
            message,
        }));
    }
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(fail(problems)),
    }
}

/// Deserializes, and on a failure removes the offending key and tries again, so that every
/// shape error (unknown key, wrong type) is reported in one pass.
fn deserialize_all(mut value: Value, text: &str) -> (Option<Config>, Vec<Problem>) {
    let mut problems = Vec::new();
    for _ in 0..64 {
        match serde_path_to_error::deserialize::<_, Config>(&value) {
            Ok(config) => return (problems.is_empty().then_some(config), problems),
            Err(err) => {
                let mut path = path_segments(err.path());
                let message = err.inner().to_string();
                if let Some(field) = unknown_field(&message) {
                    if !matches!(path.last(), Some(Seg::Key(k)) if *k == field) {
                        path.push(Seg::Key(field));
                    }
                }
                let key = render(&path);
                problems.push(Problem {
                    line: line_of(text, &key),
                    key,
                    message: clean(&message),
                });
                if path.is_empty() || !remove(&mut value, &path) {
                    return (None, problems);
                }
            }
        }
    }
    (None, problems)
}

#[derive(Clone, Debug)]
enum Seg {
    Key(String),
    Index(usize),
}

fn path_segments(path: &serde_path_to_error::Path) -> Vec<Seg> {
    use serde_path_to_error::Segment;
    path.iter()
        .filter_map(|s| match s {
            Segment::Map { key } => Some(Seg::Key(key.clone())),
            Segment::Seq { index } => Some(Seg::Index(*index)),
            Segment::Enum { variant } => Some(Seg::Key(variant.clone())),
            Segment::Unknown => None,
        })
        .collect()
}

fn render(path: &[Seg]) -> String {
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(k) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(k);
            }
            Seg::Index(i) => out.push_str(&format!("[{i}]")),
        }
    }
    out
}

fn unknown_field(message: &str) -> Option<String> {
    let rest = message.strip_prefix("unknown field `")?;
    Some(rest[..rest.find('`')?].to_owned())
}

fn clean(message: &str) -> String {
    // serde's "unknown field `x`, expected one of ..." is long; keep it, it lists the valid keys.
    message.replace(
        "data did not match any variant of untagged enum EndpointConfig",
        "expected \"host:port\" or { address = \"host:port\", weight = N, env = \"vm\"|\"k8s\" }",
    )
}

fn remove(value: &mut Value, path: &[Seg]) -> bool {
    let Some((last, parents)) = path.split_last() else {
        return false;
    };
    let mut cur = value;
    for seg in parents {
        cur = match (seg, cur) {
            (Seg::Key(k), Value::Object(m)) => match m.get_mut(k) {
                Some(v) => v,
                None => return false,
            },
            (Seg::Index(i), Value::Array(a)) => match a.get_mut(*i) {
                Some(v) => v,
                None => return false,
            },
            _ => return false,
        };
    }
    match (last, cur) {
        (Seg::Key(k), Value::Object(m)) => m.remove(k).is_some(),
        // An array element cannot be removed without shifting indexes: replace it with a
        // value that is certain to fail again would loop, so drop the whole array instead.
        (Seg::Index(_), Value::Array(a)) => {
            a.clear();
            true
        }
        _ => false,
    }
}
