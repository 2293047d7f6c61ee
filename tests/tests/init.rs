//! `vmesh init` against the real Nautobot (`scripts/nautobot.sh start` and `seed`): the config it
//! writes passes `vmesh check-config` and an agent starts on it and registers web-01 under its
//! Nautobot identity (Consul double); a second identical run changes nothing (same bytes, same
//! inode, same mtime); a run with other flags is refused without `--force` and shows the keys that
//! differ; the printed host vars parse as YAML and name only variables of the Ansible role;
//! custom fields the mapping reads that Nautobot lacks are reported (`CMDB_FIELDS_MISSING`, exit
//! 4), created by `--create-fields` (none by `--dry-run`), after which a re-check passes.
//!
//! The custom fields a test creates have names unique to the run (the seeded `vmesh_*` fields
//! that other tests read are never touched) and are deleted at the end, also when the test fails.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use serde_json::{json, Value};
use vmesh_tests::agent::{self, vmesh_command};
use vmesh_tests::consul::ConsulDouble;
use vmesh_tests::lifecycle::{wait_registered, CliRun};
use vmesh_tests::nautobot::Nautobot;
use vmesh_tests::{eventually, free_addr, workspace_root, Curl, Process, Signal, Upstream, DEFAULT_WAIT};

/// `vmesh init ARGS`.
fn init(args: &[String]) -> CliRun {
    vmesh_command()
        .arg("init")
        .args(args)
        .output()
        .expect("run vmesh init")
        .into()
}

fn strings(args: &[&str]) -> Vec<String> {
    args.iter().map(|s| (*s).to_owned()).collect()
}

/// Flags that point `vmesh init` at the test Nautobot for VM web-01, writing `dir/vmesh.toml`.
fn nautobot_flags(nb: &Nautobot, dir: &Path) -> Vec<String> {
    let token = nb.token_file(dir);
    strings(&[
        "--cmdb",
        "nautobot",
        "--cmdb-url",
        nb.url(),
        "--cmdb-token-file",
        &token.display().to_string(),
        "--node",
        "web-01",
        "--vm-name",
        "web-01",
        "--output",
        &dir.join("vmesh.toml").display().to_string(),
    ])
}

/// YAML text parsed by PyYAML, as JSON.
fn parse_yaml(text: &str) -> Value {
    let out = Command::new("python3")
        .args([
            "-c",
            "import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin.read())))",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().expect("stdin").write_all(text.as_bytes())?;
            child.wait_with_output()
        })
        .expect("run python3");
    assert!(
        out.status.success(),
        "PyYAML could not parse (PyYAML comes with ansible-core: bash scripts/install-ansible-deps.sh): {}\n--- text ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("python printed JSON")
}

/// The variable names of the Ansible role (its defaults file names every one).
fn role_variables() -> Vec<String> {
    let defaults = workspace_root().join("ansible/roles/vmesh/defaults/main.yml");
    let doc = parse_yaml(&std::fs::read_to_string(&defaults).expect("read the role defaults"));
    doc.as_object()
        .expect("the role defaults are a mapping")
        .keys()
        .cloned()
        .collect()
}

/// `vmesh check-config --config <path>`.
fn check_config(path: &Path) -> CliRun {
    agent::check_config(path).into()
}

/// (bytes, inode, mtime) of a file.
fn file_state(path: &Path) -> (Vec<u8>, u64, std::time::SystemTime) {
    let meta = std::fs::metadata(path).expect("stat the config");
    (
        std::fs::read(path).expect("read the config"),
        meta.ino(),
        meta.modified().expect("mtime"),
    )
}

/// Custom fields of Nautobot: key -> the field's JSON.
fn custom_fields(nb: &Nautobot) -> serde_json::Map<String, Value> {
    let r = nb.api_get("/api/extras/custom-fields/?limit=1000");
    r.expect_status(200);
    r.json()["results"]
        .as_array()
        .expect("a results array")
        .iter()
        .map(|f| (f["key"].as_str().unwrap_or_default().to_owned(), f.clone()))
        .collect()
}

/// Deletes the custom fields with these keys when dropped (also when the test fails).
struct FieldCleanup {
    nb: Nautobot,
    keys: Vec<String>,
}

impl FieldCleanup {
    fn delete(&self) -> Vec<String> {
        let mut problems = Vec::new();
        for (key, field) in custom_fields(&self.nb) {
            if !self.keys.contains(&key) {
                continue;
            }
            let id = field["id"].as_str().unwrap_or_default();
            let r = Curl::get(format!("{}/api/extras/custom-fields/{id}/", self.nb.url()))
                .method("DELETE")
                .header(&format!("Authorization: Token {}", self.nb.token()))
                .args(["--max-time", "20"])
                .run();
            if r.status != 204 {
                problems.push(format!("DELETE custom field {key}: {r}"));
            }
        }
        problems
    }
}

impl Drop for FieldCleanup {
    fn drop(&mut self) {
        for p in self.delete() {
            eprintln!("could not clean up: {p}");
        }
    }
}

#[test]
fn init_writes_a_config_an_agent_runs_on_and_a_second_run_changes_nothing() {
    let (_lock, nb) = Nautobot::exclusive_seeded();
    let dir = tempfile::tempdir().expect("tempdir");
    let consul = ConsulDouble::spawn();
    let app = Upstream::python("app").spawn();
    let inbound = free_addr();
    let admin = free_addr();
    let billing = free_addr();
    let config = dir.path().join("vmesh.toml");
    let mut flags = nautobot_flags(&nb, dir.path());
    flags.extend(strings(&[
        "--registry",
        "consul",
        "--registry-url",
        &consul.base_url(),
        "--app-port",
        &app.addr().port().to_string(),
        "--inbound-listen",
        &inbound.to_string(),
        "--health-path",
        "/healthz",
        "--outbound",
        &format!("billing={billing}"),
        "--admin-listen",
        &admin.to_string(),
        "--data-dir",
        &dir.path().join("data").display().to_string(),
    ]));

    // First run: written, valid, 0640, web-01's identity reported.
    let run = init(&flags);
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("written (new file)"), "{run}");
    assert!(
        run.stdout
            .contains("# vm web-01: service orders, environment prod, zone z1, version v3, weight 100"),
        "{run}"
    );
    assert!(run.stdout.contains("7 of 7 present"), "{run}");
    let meta = std::fs::metadata(&config).expect("the config was written");
    assert_eq!(meta.mode() & 0o777, 0o640, "mode 0640");
    let checked = check_config(&config);
    assert_eq!(checked.code, 0, "vmesh check-config accepts what init wrote: {checked}");

    // The whole output is YAML: comments, then host vars named as the role's variables.
    let vars = parse_yaml(&run.stdout);
    let role = role_variables();
    for key in vars.as_object().expect("host vars are a mapping").keys() {
        assert!(
            role.contains(key),
            "{key} is not a variable of ansible/roles/vmesh: {run}"
        );
    }
    assert_eq!(vars["vmesh_node"], "web-01", "{run}");
    assert_eq!(vars["vmesh_inbound_app"], format!("127.0.0.1:{}", app.addr().port()));
    assert_eq!(vars["vmesh_inbound_listen"], inbound.to_string());
    assert_eq!(vars["vmesh_inbound_health_path"], "/healthz");
    assert_eq!(vars["vmesh_registry_kind"], "consul");
    assert_eq!(vars["vmesh_registry_address"], consul.base_url());
    assert_eq!(
        vars["vmesh_cmdb"],
        json!({"kind": "nautobot", "url": nb.url(), "vm_name": "web-01",
               "token_file": dir.path().join("nautobot.token").display().to_string()})
    );
    assert_eq!(
        vars["vmesh_outbound"],
        json!([{"service": "billing", "listen": billing.to_string()}])
    );

    // Second identical run: nothing touched.
    let before = file_state(&config);
    let run = init(&flags);
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("unchanged"), "{run}");
    assert!(file_state(&config) == before, "bytes, inode and mtime unchanged: {run}");

    // Other flags over it: refused, with the keys that differ; the file is untouched.
    let payments = free_addr();
    let mut other = flags.clone();
    other.extend(strings(&["--outbound", &format!("payments={payments}")]));
    let run = init(&other);
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("CONFIG_EXISTS"), "{run}");
    assert!(run.stderr.contains("--force"), "{run}");
    assert!(
        run.stderr.contains("+ outbound[1].service = \"payments\"")
            && run.stderr.contains(&format!("+ outbound[1].listen = \"{payments}\"")),
        "the diff names the keys: {run}"
    );
    assert!(file_state(&config) == before, "a refused run writes nothing: {run}");

    // With --force: replaced, still 0640 and valid.
    other.push("--force".into());
    let run = init(&other);
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("replaced (2 key(s) changed)"), "{run}");
    assert!(
        std::fs::read_to_string(&config)
            .expect("read")
            .contains("service = \"payments\""),
        "{run}"
    );
    assert_eq!(std::fs::metadata(&config).expect("stat").mode() & 0o777, 0o640);

    // An agent starts on it: every listener up, web-01 registered in Consul under its Nautobot
    // identity on the inbound port init wrote.
    let mut cmd = vmesh_command();
    cmd.arg("run").arg("--config").arg(&config);
    let mut agent = Process::spawn("vmesh", cmd, dir.path());
    eventually(DEFAULT_WAIT, "the agent on init's config to be live", || {
        if let Some(status) = agent.try_exit() {
            panic!("vmesh exited with {status}: {}", agent.stderr_tail(40));
        }
        let r = vmesh_tests::http::get(admin, "/live")?;
        if r.status != 200 {
            return Err(format!("/live answered {}", r.status));
        }
        for addr in [inbound, billing, payments] {
            std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(1))
                .map_err(|e| format!("listener {addr}: {e}"))?;
        }
        Ok(())
    });
    let svc = wait_registered(&consul, "orders-web-01");
    assert_eq!(svc["Port"], inbound.port(), "{svc}");
    assert_eq!(svc["Meta"]["vmesh-version"], "v3", "{svc}");
    agent.signal(Signal::SIGTERM);
    let status = agent.wait_exit(Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{}", agent.stderr_tail(40));
}

#[test]
fn missing_custom_fields_are_reported_created_and_then_pass() {
    let (_lock, nb) = Nautobot::exclusive_seeded();
    let dir = tempfile::tempdir().expect("tempdir");
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let prefix = format!("vmt{}_{nanos}", std::process::id());
    // In the order of the identity fields, as init reports and creates them.
    let fields = ["version", "weight", "colour"];
    let keys: Vec<String> = fields.iter().map(|f| format!("{prefix}_{f}")).collect();
    let cleanup = FieldCleanup {
        nb: nb.clone(),
        keys: keys.clone(),
    };
    let mut flags = nautobot_flags(&nb, dir.path());
    for (field, key) in fields.iter().zip(&keys) {
        flags.extend(strings(&["--cmdb-field", &format!("{field}=custom_fields.{key}")]));
    }
    let existing = custom_fields(&nb);
    assert!(
        keys.iter().all(|k| !existing.contains_key(k)),
        "the test's fields exist before the test"
    );

    // Missing: reported with the stable code and exit 4; the config is written all the same.
    let run = init(&flags);
    assert_eq!(run.code, 4, "{run}");
    assert!(
        run.stderr.contains("error: CMDB_FIELDS_MISSING: 3 custom field(s)"),
        "{run}"
    );
    for key in &keys {
        assert!(run.stderr.contains(key.as_str()), "{key} named: {run}");
    }
    assert!(run.stderr.contains("--create-fields"), "{run}");
    assert!(run.stdout.contains("4 of 7 present"), "{run}");
    assert!(
        run.stdout
            .contains(&format!("#   {prefix}_weight (integer, read for weight): missing")),
        "{run}"
    );
    assert!(dir.path().join("vmesh.toml").exists(), "{run}");
    assert_eq!(check_config(&dir.path().join("vmesh.toml")).code, 0);

    // --dry-run creates nothing.
    let mut dry = flags.clone();
    dry.extend(strings(&["--create-fields", "--dry-run"]));
    let run = init(&dry);
    assert_eq!(run.code, 4, "{run}");
    assert!(run.stdout.contains("missing (would be created)"), "{run}");
    let now = custom_fields(&nb);
    assert!(keys.iter().all(|k| !now.contains_key(k)), "a dry run created a field");

    // --create-fields: created on virtual machines with the types the mapping reads.
    let mut create = flags.clone();
    create.extend(strings(&["--create-fields", "--json"]));
    let run = init(&create);
    assert_eq!(run.code, 0, "{run}");
    let doc: Value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("--json is not JSON ({e}): {run}"));
    assert_eq!(doc["config"]["result"], "unchanged", "{run}");
    assert_eq!(doc["cmdb"]["created"], json!(keys), "{run}");
    assert_eq!(doc["cmdb"]["missing"], json!([]), "{run}");
    assert_eq!(doc["cmdb"]["errors"], json!([]), "{run}");
    assert_eq!(doc["cmdb"]["identity"]["service"], "orders", "{run}");
    assert_eq!(
        doc["cmdb"]["identity"]["version"], "",
        "web-01 has no value in the new field yet: {run}"
    );
    let now = custom_fields(&nb);
    for (key, kind) in keys.iter().zip(["text", "integer", "text"]) {
        let f = now.get(key).unwrap_or_else(|| panic!("{key} was not created: {run}"));
        assert_eq!(f["type"]["value"], kind, "{f}");
        assert_eq!(f["content_types"], json!(["virtualization.virtualmachine"]), "{f}");
    }

    // The re-check passes, and creates nothing more.
    let run = init(&flags);
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("7 of 7 present"), "{run}");
    assert!(!run.stderr.contains("error"), "{run}");

    let problems = cleanup.delete();
    assert!(problems.is_empty(), "{problems:?}");
    let now = custom_fields(&nb);
    assert!(keys.iter().all(|k| !now.contains_key(k)), "cleaned up");
}

#[test]
fn unknown_vm_invalid_flags_stdout_and_the_packaged_default() {
    let _lock = Nautobot::exclusive();
    let nb = Nautobot::require();
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("vmesh.toml");

    // The package's commented-out default sets no key: init replaces it without --force.
    std::fs::copy(workspace_root().join("packaging/vmesh.toml"), &config).expect("copy the packaged config");
    let mut flags = nautobot_flags(&nb, dir.path());
    flags.extend(strings(&["--admin-listen", &free_addr().to_string()]));
    let run = init(&flags);
    assert_eq!(run.code, 0, "{run}");
    assert!(run.stdout.contains("replaced"), "{run}");
    assert_eq!(check_config(&config).code, 0);

    // A VM Nautobot does not know: exit 4, named.
    let mut unknown: Vec<String> = flags
        .iter()
        .map(|f| {
            if f == "web-01" {
                "no-such-vm-01".into()
            } else {
                f.clone()
            }
        })
        .collect();
    unknown.push("--force".into());
    let run = init(&unknown);
    assert_eq!(run.code, 4, "{run}");
    assert!(
        run.stderr
            .contains("error: CMDB_VM_NOT_FOUND: vm no-such-vm-01: not found in the CMDB"),
        "{run}"
    );
    assert!(
        run.stdout
            .contains("# vm no-such-vm-01: no identity (CMDB_VM_NOT_FOUND)"),
        "{run}"
    );

    // Flags that make an invalid config: every problem named, nothing written.
    let fresh = dir.path().join("invalid.toml");
    let run = init(&strings(&[
        "--cmdb",
        "nautobot",
        "--app-port",
        "8080",
        "--inbound-listen",
        "127.0.0.1:8080",
        "--output",
        &fresh.display().to_string(),
    ]));
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("INIT_INVALID"), "{run}");
    assert!(run.stderr.contains("cmdb.url"), "{run}");
    assert!(
        run.stderr.contains("inbound.app (line ") && run.stderr.contains("must differ from inbound.listen"),
        "{run}"
    );
    assert!(!fresh.exists(), "nothing written: {run}");

    // A malformed flag.
    let run = init(&strings(&["--cmdb", "env", "--outbound", "orders", "--output", "-"]));
    assert_eq!(run.code, 2, "{run}");
    assert!(run.stderr.contains("INIT_BAD_FLAG"), "{run}");

    // `--output -`: the config on stdout (a valid one), the report on stderr.
    let run = init(&strings(&[
        "--cmdb",
        "file",
        "--cmdb-path",
        "/nonexistent/identity.toml",
        "--output",
        "-",
    ]));
    assert_eq!(run.code, 4, "the identity file is missing: {run}");
    assert!(run.stderr.contains("config printed to stdout"), "{run}");
    let printed: PathBuf = dir.path().join("printed.toml");
    std::fs::write(&printed, &run.stdout).expect("write");
    let checked = check_config(&printed);
    assert_eq!(checked.code, 0, "{checked}\n{run}");
    assert!(run.stdout.contains("kind = \"file\""), "{run}");
}
