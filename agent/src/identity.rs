//! This VM's service identity: the CMDB backend the config names, and the VM name to ask for.

use std::time::Duration;

use vmesh_cmdb::{Cmdb, CmdbError, FieldMap, FileCmdb, Flavor, HttpJsonCmdb, RestCmdb, RestOptions};

use crate::config::{CmdbKind, Config};

/// The CMDB backend of `config`, or `None` when no identity source is configured
/// (`kind = "file"` without a `path`).
pub fn cmdb(config: &Config) -> Result<Option<Box<dyn Cmdb>>, CmdbError> {
    let c = &config.cmdb;
    let token = match &c.token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .map_err(|e| CmdbError::Config(format!("cmdb.token_file {}: {e}", p.display())))?
                .trim()
                .to_owned(),
        ),
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
        CmdbKind::Env => return Err(CmdbError::Config("cmdb.kind = \"env\" is being built".into())),
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
    }))
}

/// The VM name asked of the CMDB: `cmdb.vm_name`, else the node name.
pub fn vm_name(config: &Config) -> String {
    config.cmdb.vm_name.clone().unwrap_or_else(|| config.node_name())
}
