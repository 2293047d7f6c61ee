//! `vmesh init`: onboards this VM in one command. Writes the config from a few flags (validated
//! by the loader `check-config` runs, written atomically, never over other settings without
//! `--force`), checks that the CMDB has the custom fields the identity mapping reads (and
//! creates them with `--create-fields`), reports the identity this VM would get, and prints the
//! Ansible host vars of the role `vmesh` that make the same config.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde_json::{json, Value};
use vmesh_cmdb::{CustomFields, FieldMap, FieldState, Flavor, RestOptions, WantedField};

use crate::config::{self, CmdbKind, Config, Source};

/// `vmesh init` options.
#[derive(Debug, clap::Args)]
pub struct InitArgs {
    /// Where this VM's identity comes from (`[cmdb] kind`).
    #[arg(long, value_parser = ["nautobot", "netbox", "http", "env", "file"])]
    pub cmdb: String,
    /// The CMDB's API root (`cmdb.url`), e.g. `https://cmdb.example.com`.
    #[arg(long)]
    pub cmdb_url: Option<String>,
    /// File holding the CMDB API token (`cmdb.token_file`).
    #[arg(long)]
    pub cmdb_token_file: Option<PathBuf>,
    /// PEM file of the CA that signs the CMDB's certificate (`cmdb.ca_file`).
    #[arg(long)]
    pub cmdb_ca_file: Option<PathBuf>,
    /// The identity file, for `--cmdb file` (`cmdb.path`).
    #[arg(long, required_if_eq("cmdb", "file"))]
    pub cmdb_path: Option<PathBuf>,
    /// Where an identity field is in the CMDB record (`[cmdb.fields]`), e.g.
    /// `service=custom_fields.app_name`; repeat a field for fallbacks.
    #[arg(long, value_name = "FIELD=PATH")]
    pub cmdb_field: Vec<String>,
    /// This VM's name in the CMDB (`cmdb.vm_name`); default: the node name.
    #[arg(long)]
    pub vm_name: Option<String>,
    /// The node name (`agent.node`); default: the host name.
    #[arg(long)]
    pub node: Option<String>,
    /// Where the service is registered (`[registry] kind`).
    #[arg(long, default_value = "none", value_parser = ["none", "consul", "etcd"])]
    pub registry: String,
    /// The registry's address (`registry.address`), e.g. `http://127.0.0.1:8500`.
    #[arg(long)]
    pub registry_url: Option<String>,
    /// File holding the registry's ACL token (`registry.token_file`).
    #[arg(long)]
    pub registry_token_file: Option<PathBuf>,
    /// The local application's port on 127.0.0.1 (`inbound.app`); absent: no inbound proxy.
    #[arg(long)]
    pub app_port: Option<u16>,
    /// The inbound listener, the port callers use (`inbound.listen`).
    #[arg(long, requires = "app_port", default_value = "0.0.0.0:15006")]
    pub inbound_listen: SocketAddr,
    /// Protocol spoken to the application (`inbound.protocol`).
    #[arg(long, requires = "app_port", default_value = "http", value_parser = ["http", "http2", "grpc", "tcp"])]
    pub protocol: String,
    /// The application's HTTP health path (`inbound.health.path`); absent: a TCP connect check.
    #[arg(long, requires = "app_port")]
    pub health_path: Option<String>,
    /// An upstream service the application calls, and the loopback port it calls it on:
    /// `orders=127.0.0.1:15001` or `orders=15001` (`[[outbound]]`). Repeatable.
    #[arg(long, value_name = "SERVICE=LISTEN")]
    pub outbound: Vec<String>,
    /// The admin API's address (`agent.admin_listen`).
    #[arg(long)]
    pub admin_listen: Option<SocketAddr>,
    /// The state directory (`agent.data_dir`).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The admin API token file (`agent.admin_token_file`); `none` for no token. Default: the
    /// one the package made, `/etc/vmesh/admin.token`, when it exists.
    #[arg(long, value_name = "PATH|none")]
    pub admin_token_file: Option<String>,
    /// The config file to write; `-` prints it to stdout (the report then goes to stderr).
    #[arg(long, short, default_value = "/etc/vmesh/vmesh.toml")]
    pub output: PathBuf,
    /// Replace an existing config that holds other settings.
    #[arg(long)]
    pub force: bool,
    /// Create the custom fields the identity mapping reads that the CMDB lacks (Nautobot, NetBox).
    #[arg(long)]
    pub create_fields: bool,
    /// Write nothing, create nothing: say what would be done.
    #[arg(long)]
    pub dry_run: bool,
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

/// Exit codes, as the other client commands (docs/cli.md).
const EXIT_FAILED: u8 = 2;
const EXIT_CMDB: u8 = 4;

/// The config the flags make: ordered sections of keys, rendered as TOML and as host vars.
#[derive(Debug, Default)]
struct Plan {
    agent: Vec<(&'static str, toml::Value)>,
    cmdb: Vec<(&'static str, toml::Value)>,
    cmdb_fields: Vec<(String, toml::Value)>,
    registry: Vec<(&'static str, toml::Value)>,
    inbound: Vec<(&'static str, toml::Value)>,
    inbound_health: Vec<(&'static str, toml::Value)>,
    outbound: Vec<Vec<(&'static str, toml::Value)>>,
}

/// A key whose value differs between the existing file and the new config (TOML text of each).
#[derive(Debug, PartialEq, Eq)]
struct Change {
    key: String,
    old: Option<String>,
    new: Option<String>,
}

/// What happened to the config file.
#[derive(Debug, PartialEq, Eq)]
enum FileOutcome {
    Printed,
    Written,
    /// Replaced a file that set no key (the packaged default) or, with `--force`, other settings.
    Replaced(Vec<Change>),
    Unchanged,
    WouldWrite(Vec<Change>),
    Refused(Vec<Change>),
}

/// The CMDB part of the report.
#[derive(Debug, Default)]
struct CmdbReport {
    describe: String,
    /// Custom fields (REST backends only): each wanted field and its state before any creation.
    fields: Option<Vec<(WantedField, FieldState)>>,
    created: Vec<String>,
    missing: Vec<String>,
    vm: String,
    identity: Option<vmesh_cmdb::ServiceIdentity>,
    /// `(code, message)` of every CMDB failure.
    errors: Vec<(String, String)>,
}

/// Where output goes.
#[derive(Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// Runs `vmesh init`; prints the report and returns the exit code.
pub async fn run(args: InitArgs) -> ExitCode {
    let plan = match Plan::from_args(&args) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("error: INIT_BAD_FLAG: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    let to_stdout = args.output.as_os_str() == "-";
    let text = plan.to_toml(&args.output);
    // The loader of `check-config`, `run` and SIGHUP, with the same `VMESH_*` environment.
    let source = Source::embedded(&text);
    let config = match config::load(&source) {
        Ok(c) => c,
        Err(e) => {
            eprintln!(
                "error: INIT_INVALID: the config these flags make is invalid: {} problem(s); nothing written",
                e.problems.len()
            );
            for p in &e.problems {
                eprintln!("error: {p}");
            }
            return ExitCode::from(EXIT_FAILED);
        }
    };

    let outcome = if to_stdout {
        emit(Stream::Stdout, &text);
        FileOutcome::Printed
    } else {
        match settle_file(&args.output, &text, args.force, args.dry_run) {
            Ok(o) => o,
            Err(e) => {
                eprintln!("error: INIT_WRITE_FAILED: {}: {e}", args.output.display());
                return ExitCode::from(EXIT_FAILED);
            }
        }
    };
    if let FileOutcome::Refused(changes) = &outcome {
        eprintln!(
            "error: CONFIG_EXISTS: {} holds other settings ({} key(s) differ); nothing written, nothing asked of the CMDB. Run again with --force to replace it:",
            args.output.display(),
            changes.len()
        );
        for c in changes {
            eprintln!("  {}", c.line());
        }
        if args.json {
            emit(
                Stream::Stdout,
                &format!("{:#}\n", report_json(&args, &outcome, None, &plan)),
            );
        }
        return ExitCode::from(EXIT_FAILED);
    }

    let cmdb = check_cmdb(&config, &source, args.create_fields && !args.dry_run).await;
    // With the config on stdout, the report goes to stderr.
    let report_to = if to_stdout { Stream::Stderr } else { Stream::Stdout };
    for (code, message) in &cmdb.errors {
        eprintln!("error: {code}: {message}");
    }
    if args.json {
        let doc = report_json(&args, &outcome, Some(&cmdb), &plan);
        emit(report_to, &format!("{doc:#}\n"));
    } else {
        emit(report_to, &report_text(&args, &outcome, &cmdb, &plan));
    }
    if cmdb.errors.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_CMDB)
    }
}

/// Writes `text` out; a reader that went away (`| head`) is not an error worth a panic.
fn emit(stream: Stream, text: &str) {
    let _ = match stream {
        Stream::Stdout => std::io::stdout().lock().write_all(text.as_bytes()),
        Stream::Stderr => std::io::stderr().lock().write_all(text.as_bytes()),
    };
}

// === impl Plan ===

impl Plan {
    fn from_args(a: &InitArgs) -> Result<Plan, String> {
        let s = |v: &str| toml::Value::String(v.to_owned());
        let p = |v: &Path| toml::Value::String(v.display().to_string());
        let mut plan = Plan::default();
        if let Some(n) = &a.node {
            plan.agent.push(("node", s(n)));
        }
        if let Some(d) = &a.data_dir {
            plan.agent.push(("data_dir", p(d)));
        }
        if let Some(l) = a.admin_listen {
            plan.agent.push(("admin_listen", s(&l.to_string())));
        }
        match a.admin_token_file.as_deref() {
            Some("none") => {}
            Some(t) => plan.agent.push(("admin_token_file", s(t))),
            None if Path::new(PACKAGED_TOKEN).exists() => plan.agent.push(("admin_token_file", s(PACKAGED_TOKEN))),
            None => {}
        }

        plan.cmdb.push(("kind", s(&a.cmdb)));
        if let Some(v) = &a.cmdb_path {
            plan.cmdb.push(("path", p(v)));
        }
        if let Some(v) = &a.cmdb_url {
            plan.cmdb.push(("url", s(v)));
        }
        if let Some(v) = &a.cmdb_token_file {
            plan.cmdb.push(("token_file", p(v)));
        }
        if let Some(v) = &a.cmdb_ca_file {
            plan.cmdb.push(("ca_file", p(v)));
        }
        if let Some(v) = &a.vm_name {
            plan.cmdb.push(("vm_name", s(v)));
        }
        let mut fields: Vec<(String, Vec<toml::Value>)> = Vec::new();
        for f in &a.cmdb_field {
            let (name, path) = f
                .split_once('=')
                .filter(|(n, p)| !n.trim().is_empty() && !p.trim().is_empty())
                .ok_or_else(|| format!("--cmdb-field {f:?}: expected FIELD=PATH, e.g. service=custom_fields.app"))?;
            let (name, path) = (name.trim(), s(path.trim()));
            match fields.iter_mut().find(|(n, _)| n == name) {
                Some((_, paths)) => paths.push(path),
                None => fields.push((name.to_owned(), vec![path])),
            }
        }
        plan.cmdb_fields = fields
            .into_iter()
            .map(|(n, mut paths)| {
                let v = if paths.len() == 1 {
                    paths.remove(0)
                } else {
                    toml::Value::Array(paths)
                };
                (n, v)
            })
            .collect();

        plan.registry.push(("kind", s(&a.registry)));
        if let Some(v) = &a.registry_url {
            plan.registry.push(("address", s(v)));
        }
        if let Some(v) = &a.registry_token_file {
            plan.registry.push(("token_file", p(v)));
        }

        if let Some(port) = a.app_port {
            plan.inbound.push(("listen", s(&a.inbound_listen.to_string())));
            plan.inbound.push(("app", s(&format!("127.0.0.1:{port}"))));
            plan.inbound.push(("protocol", s(&a.protocol)));
            if let Some(h) = &a.health_path {
                plan.inbound_health.push(("path", s(h)));
            }
        }

        for o in &a.outbound {
            let (service, listen) = o
                .split_once('=')
                .ok_or_else(|| format!("--outbound {o:?}: expected SERVICE=LISTEN, e.g. orders=127.0.0.1:15001"))?;
            let listen: SocketAddr = match listen.parse::<u16>() {
                Ok(port) => SocketAddr::from(([127, 0, 0, 1], port)),
                Err(_) => listen
                    .parse()
                    .map_err(|_| format!("--outbound {o:?}: {listen:?} is neither a port nor an IP:port address"))?,
            };
            plan.outbound
                .push(vec![("service", s(service.trim())), ("listen", s(&listen.to_string()))]);
        }
        Ok(plan)
    }

    /// The config file's text: a header, then the sections in the order of docs/config.md.
    fn to_toml(&self, output: &Path) -> String {
        let mut out = String::new();
        let check = if output.as_os_str() == "-" {
            "/etc/vmesh/vmesh.toml".to_owned()
        } else {
            output.display().to_string()
        };
        let _ = writeln!(
            out,
            "# vmesh agent configuration, written by `vmesh init` (docs/cli.md). Every key is\n\
             # described in docs/config.md; `vmesh check-config --config {check}` validates it."
        );
        let section = |out: &mut String, header: &str, keys: &[(&str, toml::Value)]| {
            let _ = writeln!(out, "\n{header}");
            for (k, v) in keys {
                let _ = writeln!(out, "{k} = {v}");
            }
        };
        if !self.agent.is_empty() {
            section(&mut out, "[agent]", &self.agent);
        }
        section(&mut out, "[cmdb]", &self.cmdb);
        if !self.cmdb_fields.is_empty() {
            let keys: Vec<(&str, toml::Value)> =
                self.cmdb_fields.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
            section(&mut out, "[cmdb.fields]", &keys);
        }
        section(&mut out, "[registry]", &self.registry);
        if !self.inbound.is_empty() {
            section(&mut out, "[inbound]", &self.inbound);
        }
        if !self.inbound_health.is_empty() {
            section(&mut out, "[inbound.health]", &self.inbound_health);
        }
        for o in &self.outbound {
            section(&mut out, "[[outbound]]", o);
        }
        out
    }

    /// The variables of the Ansible role `vmesh` (ansible/roles/vmesh/defaults/main.yml) that
    /// render this config, in the order of that file.
    fn host_vars(&self) -> Vec<(&'static str, Value)> {
        let mut vars = Vec::new();
        take(
            &mut vars,
            &self.agent,
            &[
                ("data_dir", "vmesh_data_dir"),
                ("node", "vmesh_node"),
                ("admin_listen", "vmesh_admin_listen"),
                ("admin_token_file", "vmesh_admin_token_file"),
            ],
        );
        let mut cmdb: serde_json::Map<String, Value> =
            self.cmdb.iter().map(|(k, v)| ((*k).to_owned(), json_of(v))).collect();
        if !self.cmdb_fields.is_empty() {
            let fields = self.cmdb_fields.iter().map(|(k, v)| (k.clone(), json_of(v)));
            cmdb.insert("fields".into(), Value::Object(fields.collect()));
        }
        vars.push(("vmesh_cmdb", Value::Object(cmdb)));
        take(
            &mut vars,
            &self.registry,
            &[
                ("kind", "vmesh_registry_kind"),
                ("address", "vmesh_registry_address"),
                ("token_file", "vmesh_registry_token_file"),
            ],
        );
        take(
            &mut vars,
            &self.inbound,
            &[
                ("app", "vmesh_inbound_app"),
                ("listen", "vmesh_inbound_listen"),
                ("protocol", "vmesh_inbound_protocol"),
            ],
        );
        take(
            &mut vars,
            &self.inbound_health,
            &[("path", "vmesh_inbound_health_path")],
        );
        if !self.outbound.is_empty() {
            let list = self
                .outbound
                .iter()
                .map(|o| Value::Object(o.iter().map(|(k, v)| ((*k).to_owned(), json_of(v))).collect()))
                .collect();
            vars.push(("vmesh_outbound", Value::Array(list)));
        }
        vars
    }
}

/// Appends the role variable `var` for each `(key, var)` of `map` that `keys` sets.
fn take(vars: &mut Vec<(&'static str, Value)>, keys: &[(&str, toml::Value)], map: &[(&str, &'static str)]) {
    for (key, var) in map {
        if let Some((_, v)) = keys.iter().find(|(k, _)| k == key) {
            vars.push((*var, json_of(v)));
        }
    }
}

fn json_of(v: &toml::Value) -> Value {
    // A TOML value of strings, numbers and arrays always has a JSON form.
    serde_json::to_value(v).unwrap_or(Value::Null)
}

// === impl Change ===

impl Change {
    fn line(&self) -> String {
        match (&self.old, &self.new) {
            (Some(o), Some(n)) => format!("~ {}: {o} -> {n}", self.key),
            (None, Some(n)) => format!("+ {} = {n}", self.key),
            (Some(o), None) => format!("- {} = {o}", self.key),
            (None, None) => format!("  {}", self.key),
        }
    }

    fn json(&self) -> Value {
        json!({"key": self.key, "old": self.old, "new": self.new})
    }
}

// === the config file ===

/// Compares `text` with the file at `path` and writes it when it should.
fn settle_file(path: &Path, text: &str, force: bool, dry_run: bool) -> std::io::Result<FileOutcome> {
    let existing = match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e),
    };
    let Some(existing) = existing else {
        if dry_run {
            return Ok(FileOutcome::WouldWrite(Vec::new()));
        }
        write_atomically(path, text, None)?;
        return Ok(FileOutcome::Written);
    };
    if existing == text {
        return Ok(FileOutcome::Unchanged);
    }
    let old = flat_keys(&existing);
    let changes = match &old {
        Some(old) => diff(old, &flat_keys(text).unwrap_or_default()),
        None => vec![Change {
            key: "(the whole file: not valid TOML)".into(),
            old: None,
            new: None,
        }],
    };
    // The same settings in another layout (comments, order, spacing): the operator's file stays.
    if changes.is_empty() {
        return Ok(FileOutcome::Unchanged);
    }
    // The packaged default (every key commented out but the admin token the package made) holds
    // nothing to lose.
    let sets_nothing = old
        .as_ref()
        .is_some_and(|o| o.keys().all(|k| PACKAGED_KEYS.contains(&k.as_str())));
    if !sets_nothing && !force {
        return Ok(FileOutcome::Refused(changes));
    }
    if dry_run {
        return Ok(FileOutcome::WouldWrite(changes));
    }
    let group = std::fs::metadata(path)
        .ok()
        .map(|m| std::os::unix::fs::MetadataExt::gid(&m))
        .filter(|g| *g != 0);
    write_atomically(path, text, group)?;
    Ok(FileOutcome::Replaced(changes))
}

/// The admin token file the packages make at install.
const PACKAGED_TOKEN: &str = "/etc/vmesh/admin.token";

/// The keys the packaged `vmesh.toml` sets (everything else is commented out).
const PACKAGED_KEYS: &[&str] = &["agent.admin_token_file"];

/// Every key the TOML `text` sets, as `section.key` (`outbound[0].service`) and the value's TOML;
/// `None` when `text` is not TOML.
fn flat_keys(text: &str) -> Option<BTreeMap<String, String>> {
    fn walk(prefix: &str, v: &toml::Value, out: &mut BTreeMap<String, String>) {
        let join = |k: &str| {
            if prefix.is_empty() {
                k.to_owned()
            } else {
                format!("{prefix}.{k}")
            }
        };
        match v {
            toml::Value::Table(t) => t.iter().for_each(|(k, v)| walk(&join(k), v, out)),
            toml::Value::Array(a) if !a.is_empty() && a.iter().all(toml::Value::is_table) => a
                .iter()
                .enumerate()
                .for_each(|(i, v)| walk(&format!("{prefix}[{i}]"), v, out)),
            other => {
                out.insert(prefix.to_owned(), other.to_string());
            }
        }
    }
    let table: toml::Table = toml::from_str(text).ok()?;
    let mut out = BTreeMap::new();
    walk("", &toml::Value::Table(table), &mut out);
    Some(out)
}

fn diff(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> Vec<Change> {
    let mut keys: Vec<&String> = old.keys().chain(new.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter(|k| old.get(*k) != new.get(*k))
        .map(|k| Change {
            key: k.clone(),
            old: old.get(k).cloned(),
            new: new.get(k).cloned(),
        })
        .collect()
}

/// Writes `text` to a temporary file beside `path` (mode 0640, group `group`, else the `vmesh`
/// group when it exists, so the agent's user can read it), flushes it and renames it over
/// `path`: a reader sees the old file or the new one, never a part.
fn write_atomically(path: &Path, text: &str, group: Option<u32>) -> std::io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidInput, "not a file name"))?;
    let tmp = dir.join(format!(".{name}.vmesh-init.{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)?;
        f.write_all(text.as_bytes())?;
        // The umask may have taken bits away from the mode above; 0640 is the contract.
        f.set_permissions(std::fs::Permissions::from_mode(0o640))?;
        if let Some(gid) = group.or_else(|| group_id("vmesh")) {
            // Only root (or a member of the group) may do this; the file is still written.
            let _ = std::os::unix::fs::chown(&tmp, None, Some(gid));
        }
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// The id of group `name` in /etc/group.
fn group_id(name: &str) -> Option<u32> {
    let groups = std::fs::read_to_string("/etc/group").ok()?;
    groups.lines().find_map(|l| {
        let mut parts = l.split(':');
        (parts.next()? == name).then_some(())?;
        parts.nth(1)?.parse().ok()
    })
}

// === the CMDB ===

/// Checks the custom fields (Nautobot, NetBox) and asks for this VM's identity.
async fn check_cmdb(config: &Config, source: &Source, create: bool) -> CmdbReport {
    let mut r = CmdbReport {
        vm: crate::identity::vm_name(config),
        ..CmdbReport::default()
    };
    if let Some(flavor) = match config.cmdb.kind {
        CmdbKind::Nautobot => Some(Flavor::Nautobot),
        CmdbKind::Netbox => Some(Flavor::Netbox),
        _ => None,
    } {
        if let Err(e) = check_fields(config, flavor, create, &mut r).await {
            r.errors.push(e);
        }
    }
    match crate::identity::cmdb(config, &source.env) {
        Ok(Some(cmdb)) => {
            r.describe = cmdb.describe();
            match cmdb.identity(&r.vm).await {
                Ok(id) => r.identity = Some(id),
                Err(e) => r.errors.push((e.code().to_owned(), e.to_string())),
            }
        }
        Ok(None) => r.errors.push((
            "CMDB_CONFIG".into(),
            "no identity source configured ([cmdb] kind = \"file\" needs a path)".into(),
        )),
        Err(e) => r.errors.push((e.code().to_owned(), e.to_string())),
    }
    r
}

async fn check_fields(
    config: &Config,
    flavor: Flavor,
    create: bool,
    r: &mut CmdbReport,
) -> Result<(), (String, String)> {
    let c = &config.cmdb;
    let fail = |e: vmesh_cmdb::CmdbError| (e.code().to_owned(), e.to_string());
    let token = match &c.token_file {
        Some(p) => {
            Some(config::read_secret("cmdb.token_file", p).map_err(|e| ("CMDB_CONFIG".to_owned(), e.to_string()))?)
        }
        None => None,
    };
    let fields = c
        .fields
        .clone()
        .unwrap_or_default()
        .or_defaults(FieldMap::rest_default());
    let opts = RestOptions {
        url: c.url.clone().unwrap_or_default(),
        token,
        ca_file: c.ca_file.clone(),
        timeout: c.timeout.get(),
        fields: fields.clone(),
        allowed_status: c.allowed_status.clone(),
    };
    let api = CustomFields::new(flavor, &opts).map_err(fail)?;
    let wanted = fields.custom_fields();
    let states = api.check(&wanted).await.map_err(fail)?;
    let mut pending: Vec<(WantedField, FieldState)> = wanted.into_iter().zip(states).collect();
    r.fields = Some(pending.clone());
    pending.retain(|(_, s)| !matches!(s, FieldState::Present { .. }));
    if create && !pending.is_empty() {
        for (w, s) in &pending {
            api.ensure(w, s).await.map_err(fail)?;
            r.created.push(w.key.clone());
        }
        // Read them back: the fields count as there only once the CMDB lists them on VMs.
        let wanted: Vec<WantedField> = pending.iter().map(|(w, _)| w.clone()).collect();
        let states = api.check(&wanted).await.map_err(fail)?;
        pending = wanted.into_iter().zip(states).collect();
        pending.retain(|(_, s)| !matches!(s, FieldState::Present { .. }));
    }
    r.missing = pending.iter().map(|(w, _)| w.key.clone()).collect();
    if r.missing.is_empty() {
        return Ok(());
    }
    Err((
        "CMDB_FIELDS_MISSING".into(),
        format!(
            "{} custom field(s) the identity mapping reads are not on {}: {}{}",
            r.missing.len(),
            vmesh_cmdb::VM_TYPE,
            r.missing.join(", "),
            if create {
                ""
            } else {
                " (run again with --create-fields)"
            }
        ),
    ))
}

// === the report ===

fn file_line(args: &InitArgs, o: &FileOutcome) -> String {
    let path = args.output.display();
    match o {
        FileOutcome::Printed => "config printed to stdout".to_owned(),
        FileOutcome::Written => format!("{path} written (new file)"),
        FileOutcome::Replaced(c) => format!("{path} replaced ({} key(s) changed)", c.len()),
        FileOutcome::Unchanged => format!("{path} unchanged (same settings)"),
        FileOutcome::WouldWrite(c) if c.is_empty() => format!("dry run: would write {path} (new file)"),
        FileOutcome::WouldWrite(c) => format!("dry run: would replace {path} ({} key(s) change)", c.len()),
        FileOutcome::Refused(c) => format!("{path} not written: {} key(s) differ (--force replaces it)", c.len()),
    }
}

fn file_changes(o: &FileOutcome) -> &[Change] {
    match o {
        FileOutcome::Replaced(c) | FileOutcome::WouldWrite(c) | FileOutcome::Refused(c) => c,
        _ => &[],
    }
}

/// The report for people: YAML comments, then the host vars, so the whole output pastes into
/// `host_vars/<vm>.yml`.
fn report_text(args: &InitArgs, outcome: &FileOutcome, cmdb: &CmdbReport, plan: &Plan) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "# vmesh init: {}", file_line(args, outcome));
    for c in file_changes(outcome) {
        let _ = writeln!(out, "#   {}", c.line());
    }
    if !cmdb.describe.is_empty() {
        let _ = writeln!(out, "# cmdb: {}", cmdb.describe);
    }
    if let Some(fields) = &cmdb.fields {
        let present = fields
            .iter()
            .filter(|(_, s)| matches!(s, FieldState::Present { .. }))
            .count();
        let _ = writeln!(
            out,
            "# custom fields on {}: {present} of {} present",
            vmesh_cmdb::VM_TYPE,
            fields.len()
        );
        for (w, s) in fields {
            let state = match s {
                FieldState::Present { kind } if kind != w.kind.as_str() => {
                    format!("present, but of type {kind} (the mapping reads {})", w.kind.as_str())
                }
                FieldState::Present { .. } => continue,
                FieldState::Missing if cmdb.created.contains(&w.key) => "created".to_owned(),
                FieldState::NotOnVms { .. } if cmdb.created.contains(&w.key) => "added to virtual machines".to_owned(),
                FieldState::Missing if args.create_fields && args.dry_run => "missing (would be created)".to_owned(),
                FieldState::Missing => "missing".to_owned(),
                FieldState::NotOnVms { .. } => "exists, but not on virtual machines".to_owned(),
            };
            let _ = writeln!(
                out,
                "#   {} ({}, read for {}): {state}",
                w.key,
                w.kind.as_str(),
                w.used_by.join(", ")
            );
        }
    }
    match &cmdb.identity {
        Some(id) => {
            let _ = writeln!(
                out,
                "# vm {}: service {}, environment {}, zone {}, version {}, weight {}, colour {}, owner {}",
                cmdb.vm,
                id.service,
                id.environment,
                dash(&id.zone),
                dash(&id.version),
                id.weight,
                dash(&id.colour),
                dash(&id.owner)
            );
        }
        None => {
            let why = cmdb.errors.last().map_or("-", |(code, _)| code.as_str());
            let _ = writeln!(out, "# vm {}: no identity ({why})", cmdb.vm);
        }
    }
    let _ = writeln!(
        out,
        "#\n# Ansible host vars of the role vmesh (ansible/roles/vmesh), e.g. host_vars/{}.yml:",
        cmdb.vm
    );
    for (k, v) in plan.host_vars() {
        yaml(&mut out, k, &v, 0);
    }
    out
}

fn dash(s: &str) -> &str {
    if s.is_empty() {
        "-"
    } else {
        s
    }
}

fn report_json(args: &InitArgs, outcome: &FileOutcome, cmdb: Option<&CmdbReport>, plan: &Plan) -> Value {
    let result = match outcome {
        FileOutcome::Printed => "printed",
        FileOutcome::Written => "written",
        FileOutcome::Replaced(_) => "replaced",
        FileOutcome::Unchanged => "unchanged",
        FileOutcome::WouldWrite(_) => "dry-run",
        FileOutcome::Refused(_) => "refused",
    };
    let cmdb = cmdb.map(|c| {
        json!({
            "source": c.describe,
            "fields": c.fields.as_ref().map(|f| f.iter().map(|(w, s)| field_json(w, s)).collect::<Vec<_>>()),
            "created": c.created,
            "missing": c.missing,
            "vm": c.vm,
            "identity": c.identity,
            "errors": c.errors.iter().map(|(code, message)| json!({"code": code, "message": message})).collect::<Vec<_>>(),
        })
    });
    json!({
        "config": {
            "path": args.output.display().to_string(),
            "result": result,
            "changes": file_changes(outcome).iter().map(Change::json).collect::<Vec<_>>(),
        },
        "cmdb": cmdb,
        "host_vars": Value::Object(plan.host_vars().into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
    })
}

/// A custom field in the JSON report: `type` is what the mapping reads, `cmdb_type` what the
/// CMDB has (when it has the field on virtual machines).
fn field_json(w: &WantedField, s: &FieldState) -> Value {
    let (state, cmdb_type) = match s {
        FieldState::Present { kind } => ("present", Some(kind.as_str())),
        FieldState::Missing => ("missing", None),
        FieldState::NotOnVms { .. } => ("not-on-virtual-machines", None),
    };
    json!({"key": w.key, "type": w.kind.as_str(), "used_by": w.used_by, "state": state, "cmdb_type": cmdb_type})
}

/// `key: value` in YAML block style; scalars as JSON (valid YAML double-quoted scalars).
fn yaml(out: &mut String, key: &str, v: &Value, indent: usize) {
    let pad = " ".repeat(indent);
    match v {
        Value::Object(m) if !m.is_empty() => {
            let _ = writeln!(out, "{pad}{key}:");
            for (k, v) in m {
                yaml(out, k, v, indent + 2);
            }
        }
        Value::Array(items)
            if !items.is_empty() && items.iter().all(|i| matches!(i, Value::Object(m) if !m.is_empty())) =>
        {
            let _ = writeln!(out, "{pad}{key}:");
            for item in items {
                let mut block = String::new();
                for (k, v) in item.as_object().into_iter().flatten() {
                    yaml(&mut block, k, v, indent + 4);
                }
                // The first line of the item carries the dash.
                let item_pad = " ".repeat(indent + 4);
                let block = block.replacen(&item_pad, &format!("{pad}  - "), 1);
                out.push_str(&block);
            }
        }
        other => {
            let _ = writeln!(out, "{pad}{key}: {other}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flat(text: &str) -> BTreeMap<String, String> {
        flat_keys(text).unwrap()
    }

    #[test]
    fn the_diff_names_changed_added_and_removed_keys() {
        let old = flat(
            "[inbound]\napp = \"127.0.0.1:8080\"\n[inbound.health]\npath = \"/h\"\n[[outbound]]\nservice = \"a\"\n",
        );
        let new =
            flat("[inbound]\napp = \"127.0.0.1:9090\"\n[[outbound]]\nservice = \"a\"\n[[outbound]]\nservice = \"b\"\n");
        let lines: Vec<String> = diff(&old, &new).iter().map(Change::line).collect();
        assert_eq!(
            lines,
            [
                "~ inbound.app: \"127.0.0.1:8080\" -> \"127.0.0.1:9090\"",
                "- inbound.health.path = \"/h\"",
                "+ outbound[1].service = \"b\""
            ]
        );
        assert!(
            flat("# only comments\n[agent]\n# node = \"x\"\n").is_empty(),
            "the packaged default sets no key"
        );
    }

    #[test]
    fn host_vars_render_as_block_yaml() {
        let mut out = String::new();
        yaml(
            &mut out,
            "vmesh_outbound",
            &json!([{"service": "orders", "listen": "127.0.0.1:15001"}, {"service": "b", "listen": "127.0.0.1:2"}]),
            0,
        );
        yaml(
            &mut out,
            "vmesh_cmdb",
            &json!({"kind": "nautobot", "fields": {"zone": ["a", "b"]}}),
            0,
        );
        assert_eq!(
            out,
            "vmesh_outbound:\n  - listen: \"127.0.0.1:15001\"\n    service: \"orders\"\n  - listen: \"127.0.0.1:2\"\n    service: \"b\"\n\
             vmesh_cmdb:\n  fields:\n    zone: [\"a\",\"b\"]\n  kind: \"nautobot\"\n"
        );
    }
}
