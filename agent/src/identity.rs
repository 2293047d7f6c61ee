//! This VM's service identity: the CMDB backend the config names, the VM name to ask for, and
//! the identity kept across CMDB outages ([`IdentityKeeper`]).

mod keeper;

pub use keeper::IdentityKeeper;

use std::collections::HashMap;
use std::time::Duration;

use vmesh_cmdb::{Cmdb, CmdbError, EnvCmdb, FieldMap, FileCmdb, Flavor, HttpJsonCmdb, RestCmdb, RestOptions};

use crate::config::{CmdbKind, Config};

/// The CMDB backend of `config`, or `None` when no identity source is configured
/// (`kind = "file"` without a `path`). `env` is the environment the config was loaded with
/// (`config::Source::env`), read by `kind = "env"`.
pub fn cmdb(config: &Config, env: &HashMap<String, String>) -> Result<Option<Box<dyn Cmdb>>, CmdbError> {
    let c = &config.cmdb;
    let token = match &c.token_file {
        Some(p) => {
            Some(crate::config::read_secret("cmdb.token_file", p).map_err(|e| CmdbError::Config(e.to_string()))?)
        }
        None => None,
    };
    let url = || {
        c.url
            .clone()
            .ok_or_else(|| CmdbError::Config("cmdb.url is required".into()))
    };
    let timeout: Duration = c.timeout.get();
    Ok(Some(match c.kind {
        CmdbKind::File => match &c.path {
            Some(path) => Box::new(FileCmdb::new(path)),
            None => return Ok(None),
        },
        CmdbKind::Nautobot | CmdbKind::Netbox => {
            let flavor = if c.kind == CmdbKind::Nautobot {
                Flavor::Nautobot
            } else {
                Flavor::Netbox
            };
            Box::new(RestCmdb::new(
                flavor,
                RestOptions {
                    url: url()?,
                    token,
                    ca_file: c.ca_file.clone(),
                    timeout,
                    fields: c
                        .fields
                        .clone()
                        .unwrap_or_default()
                        .or_defaults(FieldMap::rest_default()),
                    allowed_status: c.allowed_status.clone(),
                },
            )?)
        }
        CmdbKind::Http => Box::new(HttpJsonCmdb::new(
            url()?,
            token,
            c.fields
                .clone()
                .unwrap_or_default()
                .or_defaults(FieldMap::http_default()),
            c.allowed_status.clone(),
            timeout,
        )?),
        CmdbKind::Env => Box::new(EnvCmdb::new(c.fields.clone().unwrap_or_default(), env)?),
    }))
}

/// The VM name asked of the CMDB: `cmdb.vm_name`, else the node name.
pub fn vm_name(config: &Config) -> String {
    config.cmdb.vm_name.clone().unwrap_or_else(|| config.node_name())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::config::{load, Source, SourceKind};

    fn source(text: &str, env: &[(&str, &str)]) -> Source {
        Source {
            path: None,
            text: Some(text.to_owned()),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
        }
    }

    /// A pod: config overrides (`__`) and identity variables (`VMESH_ID_*`) in one environment;
    /// each is read by its own reader and neither disturbs the other.
    #[tokio::test]
    async fn env_kind_reads_the_identity_next_to_config_overrides() {
        let text = "[cmdb]\nkind = \"env\"\n[registry]\nadvertise_env = \"k8s\"\n";
        for pod_ip in ["10.1.2.3", "fd00:10::5"] {
            let src = source(
                text,
                &[
                    ("VMESH_AGENT__NODE", "orders-7f9c"),
                    ("VMESH_REGISTRY__ADVERTISE_ADDRESS", pod_ip),
                    ("VMESH_ID_SERVICE", "orders"),
                    ("VMESH_ID_ENVIRONMENT", "prod"),
                    ("VMESH_ID_ZONE", "eu-west-1a"),
                    ("VMESH_ID_VERSION", "3"),
                    ("VMESH_ID_WEIGHT", "50"),
                    ("VMESH_LOG", "debug"),
                ],
            );
            let config = load(&src).unwrap_or_else(|e| panic!("{pod_ip}: {e}"));
            assert_eq!(config.registry.advertise_address, Some(pod_ip.parse().unwrap()));
            assert_eq!(config.registry.advertise_env, "k8s");
            let cmdb = cmdb(&config, &src.env).unwrap().expect("kind = env is a source");
            let vm = vm_name(&config);
            assert_eq!(vm, "orders-7f9c");
            let id = cmdb.identity(&vm).await.unwrap();
            assert_eq!(
                (id.service.as_str(), id.zone.as_str(), id.version.as_str(), id.weight),
                ("orders", "eu-west-1a", "3", 50)
            );
        }
    }

    /// docs/kubernetes.md: its ConfigMap, with values for exactly the `VMESH_*` variables its
    /// pod spec sets, loads and gives the pod its identity, so the page cannot drift.
    #[tokio::test]
    async fn the_kubernetes_page_example_loads() {
        let page = include_str!("../../docs/kubernetes.md");
        // The TOML under `vmesh.toml: |`, indented by four spaces, to the end of the block.
        let toml: String = page
            .lines()
            .skip_while(|l| l.trim() != "vmesh.toml: |")
            .skip(1)
            .take_while(|l| l.is_empty() || l.starts_with("    "))
            .map(|l| format!("{}\n", l.strip_prefix("    ").unwrap_or(l)))
            .collect();
        assert!(toml.contains("[cmdb]"), "no ConfigMap found: {toml:?}");
        let pod = [
            ("VMESH_ID_SERVICE", "orders"),
            ("VMESH_ID_ENVIRONMENT", "prod"),
            ("VMESH_ID_VERSION", "v4"),
            ("VMESH_ID_ZONE", "eu-west-1a"),
            ("VMESH_ID_OWNER", "team-orders"),
            ("VMESH_AGENT__NODE", "orders-eu-west-1a-7f9c5d8b6-x2l4p"),
            ("VMESH_REGISTRY__ADVERTISE_ADDRESS", "10.1.4.7"),
            ("VMESH_REGISTRY__ADDRESS", "http://10.0.3.17:8500"),
        ];
        let named: std::collections::BTreeSet<&str> = page
            .lines()
            .filter_map(|l| l.trim().strip_prefix("- name: ")?.split_whitespace().next())
            .filter(|n| n.starts_with("VMESH_"))
            .collect();
        assert_eq!(named, pod.iter().map(|(k, _)| *k).collect());

        let src = source(&toml, &pod);
        let config = load(&src).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.cmdb.kind, CmdbKind::Env);
        assert_eq!(config.registry.advertise_env, "k8s");
        assert_eq!(config.registry.address, "http://10.0.3.17:8500");
        assert_eq!(config.agent.admin_listen.port(), 9901);
        assert_eq!(
            (config.outbound.len(), config.outbound[0].sources.as_deref()),
            (1, Some(&[SourceKind::Consul, SourceKind::Kubernetes][..])),
            "the whole ConfigMap was read"
        );
        // Off loopback the admin API is locked down: TLS for the probes, and the preStop hook
        // goes through the admin socket the config names.
        assert!(config.agent.admin_tls && config.agent.admin_token_file.is_some());
        assert_eq!(
            config.agent.admin_socket.as_deref(),
            Some(std::path::Path::new("/run/vmesh/admin.sock"))
        );
        assert!(
            page.contains("\"drain\", \"--config\", \"/etc/vmesh/vmesh.toml\""),
            "the preStop hook reads the config (and so finds the admin socket)"
        );
        assert!(page.contains("scheme: HTTPS"), "the probe speaks TLS");
        let id = cmdb(&config, &src.env)
            .unwrap()
            .unwrap()
            .identity(&vm_name(&config))
            .await
            .unwrap();
        assert_eq!(
            (id.service.as_str(), id.zone.as_str(), id.version.as_str(), id.weight),
            ("orders", "eu-west-1a", "v4", 100)
        );
    }

    #[tokio::test]
    async fn env_kind_errors_name_the_variable_or_the_key() {
        let config = load(&source("[cmdb]\nkind = \"env\"\n", &[])).unwrap();
        let cmdb = cmdb(
            &config,
            &HashMap::from([("VMESH_ID_ENVIRONMENT".to_owned(), "prod".to_owned())]),
        )
        .unwrap()
        .unwrap();
        let e = cmdb.identity("orders-7f9c").await.unwrap_err();
        assert_eq!(
            (e.code(), e.to_string().as_str()),
            (
                "CMDB_BAD_FIELD",
                "vm orders-7f9c: field service: VMESH_ID_SERVICE is not set"
            )
        );

        let config = load(&source(
            "[cmdb]\nkind = \"env\"\n[cmdb.fields]\nzone = \"NODE_ZONE\"\n",
            &[],
        ))
        .unwrap();
        let e = super::cmdb(&config, &HashMap::new())
            .err()
            .expect("a name vmesh cannot see");
        assert_eq!(e.code(), "CMDB_CONFIG");
        assert!(e.to_string().contains("cmdb.fields.zone: \"NODE_ZONE\""), "{e}");
    }
}
