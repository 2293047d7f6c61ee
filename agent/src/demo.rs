//! `vmesh demo`: the embedded quickstart config, the identity and fresh state directory it runs
//! with, and the small upstreams it points at. Nothing to install: the identity comes from the
//! `env` CMDB backend's variables (defaults embedded here), the registry is the in-process
//! `memory` table, so the demo shows the whole lifecycle (identity, registration, slow start,
//! drain) on one machine.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

use crate::config::{Config, Source};

/// The quickstart config, embedded in the binary.
pub const QUICKSTART: &str = include_str!("../config/quickstart.toml");

/// The demo's service identity, as the variables of `[cmdb] kind = "env"`; a variable set in
/// the environment wins (`VMESH_ID_VERSION=v2 vmesh demo`).
pub const IDENTITY: &[(&str, &str)] = &[
    ("VMESH_ID_SERVICE", "local-app"),
    ("VMESH_ID_ENVIRONMENT", "demo"),
    ("VMESH_ID_ZONE", "z1"),
    ("VMESH_ID_VERSION", "v1"),
    ("VMESH_ID_OWNER", "quickstart"),
];

/// Moves every port of the quickstart config (admin, listeners, demo upstreams) by this much,
/// for a machine where one of them is taken (`VMESH_DEMO_PORT_OFFSET=1000`: admin on 10901).
pub const PORT_OFFSET_VAR: &str = "VMESH_DEMO_PORT_OFFSET";

/// Why the demo cannot start; each with a stable code.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    #[error("{PORT_OFFSET_VAR}={0:?}: {1}")]
    PortOffset(String, String),
    #[error("cannot create the demo's state directory {dir}: {source}", dir = .0.display(), source = .1)]
    DataDir(PathBuf, std::io::Error),
    #[error("the embedded quickstart config: {0}")]
    Embedded(String),
}

impl DemoError {
    pub fn code(&self) -> &'static str {
        match self {
            Self::PortOffset(..) => "DEMO_PORT_OFFSET",
            Self::DataDir(..) => "DEMO_DATA_DIR",
            Self::Embedded(_) => "DEMO_CONFIG",
        }
    }
}

/// A prepared demo: the config source to run, and its state directory, removed on drop so that
/// the next `vmesh demo` starts afresh (identity read again, a new registration, a ramp from 1).
pub struct Demo {
    pub source: Source,
    dir: PathBuf,
}

impl Demo {
    /// The quickstart with the process environment: ports moved by [`PORT_OFFSET_VAR`], a
    /// fresh state directory under the temporary directory, the [`IDENTITY`] defaults.
    pub fn prepare() -> Result<Self, DemoError> {
        let dir = std::env::temp_dir().join(format!("vmesh-demo-{}", std::process::id()));
        // A directory of this name is a leftover of a killed demo whose PID was reused.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(|e| DemoError::DataDir(dir.clone(), e))?;
        let demo = Self {
            source: source(Source::embedded(QUICKSTART).env, &dir)?,
            dir,
        };
        Ok(demo)
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The demo's config source for the environment `env`, keeping its state in `data_dir`.
fn source(mut env: HashMap<String, String>, data_dir: &Path) -> Result<Source, DemoError> {
    let offset = match env.get(PORT_OFFSET_VAR).map(|v| v.trim()) {
        None | Some("") => 0,
        Some(v) => v
            .parse::<u16>()
            .map_err(|_| DemoError::PortOffset(v.to_owned(), "not a whole number 0..=65535".into()))?,
    };
    let mut table: toml::Table = toml::from_str(QUICKSTART).map_err(|e| DemoError::Embedded(e.to_string()))?;
    shift_ports(&mut table, offset)?;
    let agent = table
        .get_mut("agent")
        .and_then(toml::Value::as_table_mut)
        .ok_or_else(|| DemoError::Embedded("no [agent] section".into()))?;
    agent.insert("data_dir".into(), data_dir.join("data").display().to_string().into());
    let text = toml::to_string(&table).map_err(|e| DemoError::Embedded(e.to_string()))?;
    for (k, v) in IDENTITY {
        env.entry((*k).to_owned()).or_insert_with(|| (*v).to_owned());
    }
    Ok(Source {
        path: None,
        text: Some(text),
        env,
    })
}

/// Adds `offset` to every address of the quickstart: `[agent] admin_listen`, `[inbound] listen`
/// and `app`, `[proxy] shared_outbound_listen`, each outbound's `listen` and `endpoints`.
fn shift_ports(table: &mut toml::Table, offset: u16) -> Result<(), DemoError> {
    if offset == 0 {
        return Ok(());
    }
    for (section, key) in [
        ("agent", "admin_listen"),
        ("inbound", "listen"),
        ("inbound", "app"),
        ("proxy", "shared_outbound_listen"),
    ] {
        if let Some(v) = table.get_mut(section).and_then(|s| s.get_mut(key)) {
            shift_port(&format!("{section}.{key}"), v, offset)?;
        }
    }
    let outbound = table.get_mut("outbound").and_then(toml::Value::as_array_mut);
    for (i, out) in outbound.into_iter().flatten().enumerate() {
        if let Some(v) = out.get_mut("listen") {
            shift_port(&format!("outbound[{i}].listen"), v, offset)?;
        }
        let endpoints = out.get_mut("endpoints").and_then(toml::Value::as_array_mut);
        for (j, v) in endpoints.into_iter().flatten().enumerate() {
            shift_port(&format!("outbound[{i}].endpoints[{j}]"), v, offset)?;
        }
    }
    Ok(())
}

/// Adds `offset` to the port of the address `v` (the config key `key`).
fn shift_port(key: &str, v: &mut toml::Value, offset: u16) -> Result<(), DemoError> {
    let addr: SocketAddr = v
        .as_str()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| DemoError::Embedded(format!("{key} is not an address")))?;
    let port = addr
        .port()
        .checked_add(offset)
        .ok_or_else(|| DemoError::PortOffset(offset.to_string(), format!("{key} {addr} moves past port 65535")))?;
    *v = SocketAddr::new(addr.ip(), port).to_string().into();
    Ok(())
}

/// The demo upstreams of `config`: the local app at `[inbound] app`, and each static endpoint
/// of an outbound service (`hello-1`, `hello-2`), each answering with its own name.
pub fn upstreams(config: &Config) -> Vec<(SocketAddr, String)> {
    let app = config.inbound.iter().map(|i| (i.app, "local-app".to_owned()));
    let endpoints = config.outbound.iter().flat_map(|o| {
        o.endpoints
            .iter()
            .enumerate()
            .map(|(i, e)| (e.address(), format!("{}-{}", o.service, i + 1)))
    });
    app.chain(endpoints).collect()
}

/// Starts a tiny HTTP server per address that answers with its own name.
pub async fn start_upstreams(addrs: &[(SocketAddr, String)]) -> std::io::Result<()> {
    for (addr, name) in addrs {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|e| std::io::Error::new(e.kind(), format!("demo upstream {name}: cannot bind {addr}: {e}")))?;
        let name: Arc<str> = name.as_str().into();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let name = name.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let name = name.clone();
                        async move {
                            let body = format!("hello from {name} ({} {})\n", req.method(), req.uri().path());
                            let mut r = Response::new(Full::new(Bytes::from(body)));
                            if let Ok(v) = http::HeaderValue::from_str(&name) {
                                r.headers_mut().insert("x-upstream-name", v);
                            }
                            Ok::<_, Infallible>(r)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{load, CmdbKind, RegistryKind};

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn quickstart_config_is_valid() {
        crate::config::load_str(QUICKSTART).unwrap_or_else(|e| panic!("{e}"));
    }

    /// The demo runs the quickstart with an identity, the memory registry, a fresh state
    /// directory and the upstreams its endpoints name.
    #[tokio::test]
    async fn the_demo_has_an_identity_a_registry_and_its_upstreams() {
        let src = source(env(&[("VMESH_ID_VERSION", "v2")]), Path::new("/tmp/d")).unwrap();
        let config = load(&src).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.agent.data_dir, Path::new("/tmp/d/data"));
        assert_eq!(
            (config.cmdb.kind, config.registry.kind),
            (CmdbKind::Env, RegistryKind::Memory)
        );
        let cmdb = crate::identity::cmdb(&config, &src.env)
            .unwrap()
            .expect("an identity source");
        let id = cmdb.identity(&crate::identity::vm_name(&config)).await.unwrap();
        assert_eq!(
            (id.service.as_str(), id.environment.as_str(), id.version.as_str()),
            ("local-app", "demo", "v2"),
            "the embedded identity, with the environment's variable winning"
        );
        assert!(
            config
                .outbound
                .iter()
                .any(|o| o.service == id.service && o.endpoints.is_empty()),
            "an outbound discovers the demo's own service from the registry"
        );
        let ups = upstreams(&config);
        let names: Vec<&str> = ups.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(names, ["local-app", "hello-1", "hello-2"]);
        assert_eq!(ups[0].0, config.inbound.as_ref().unwrap().app);
    }

    #[test]
    fn the_port_offset_moves_every_port() {
        let plain = load(&source(env(&[]), Path::new("/tmp/d")).unwrap()).unwrap();
        let moved = load(&source(env(&[(PORT_OFFSET_VAR, "1000")]), Path::new("/tmp/d")).unwrap()).unwrap();
        assert_eq!(moved.agent.admin_listen.port(), plain.agent.admin_listen.port() + 1000);
        let ports = |c: &Config| -> Vec<u16> {
            let inb = c.inbound.as_ref().unwrap();
            let mut v = vec![c.agent.admin_listen.port(), inb.listen.port(), inb.app.port()];
            v.extend(c.proxy.shared_outbound_listen.map(|a| a.port()));
            for o in &c.outbound {
                v.extend(o.listen.map(|a| a.port()));
                v.extend(o.endpoints.iter().map(|e| e.address().port()));
            }
            v
        };
        let (p, m) = (ports(&plain), ports(&moved));
        assert_eq!(p.len(), 8, "admin, 4 listeners, 3 upstreams: {p:?}");
        assert_eq!(m, p.iter().map(|p| p + 1000).collect::<Vec<_>>());

        for bad in ["x", "-1", "70000"] {
            let e = source(env(&[(PORT_OFFSET_VAR, bad)]), Path::new("/tmp/d"))
                .err()
                .unwrap();
            assert_eq!(e.code(), "DEMO_PORT_OFFSET", "{bad}");
        }
        let e = source(env(&[(PORT_OFFSET_VAR, "60000")]), Path::new("/tmp/d"))
            .err()
            .unwrap();
        assert_eq!(e.code(), "DEMO_PORT_OFFSET");
        assert!(e.to_string().contains("past port 65535"), "{e}");
    }
}
