//! The structural invariants of docs/ARCHITECTURE.md that a run cannot show, checked on the
//! source: who reads the environment, who writes the lifecycle records and the endpoint sets,
//! where `anyhow` is used, and that no test is skipped. Each check names the invariant.

use std::path::{Path, PathBuf};

use vmesh_tests::workspace_root;

/// Every `.rs` file under `dir`, with its text.
fn sources(dir: &str) -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<(PathBuf, String)>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                // Build output (a fuzz crate's own `target/`) is not source.
                if p.file_name().is_some_and(|n| n == "target") {
                    continue;
                }
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
                out.push((p, text));
            }
        }
    }
    let mut out = Vec::new();
    walk(&workspace_root().join(dir), &mut out);
    assert!(!out.is_empty(), "no sources under {dir}");
    out
}

/// The code of a file without its unit tests (`#[cfg(test)] mod tests` at the end, or a
/// sibling `tests.rs`/`tests/`): only what ships counts.
fn shipped(path: &Path, text: &str) -> Option<String> {
    let name = path.file_name()?.to_string_lossy();
    if name == "tests.rs" || path.components().any(|c| c.as_os_str() == "tests") {
        return None;
    }
    Some(match text.find("#[cfg(test)]") {
        Some(i) => text[..i].to_owned(),
        None => text.to_owned(),
    })
}

/// Files of `dir` whose shipped code contains any of `needles`, relative to `dir`.
fn files_using(dir: &str, needles: &[&str]) -> Vec<String> {
    let root = workspace_root().join(dir);
    let mut found: Vec<String> = sources(dir)
        .into_iter()
        .filter_map(|(p, text)| {
            let code = shipped(&p, &text)?;
            needles
                .iter()
                .any(|n| code.contains(n))
                .then(|| p.strip_prefix(&root).unwrap_or(&p).display().to_string())
        })
        .collect();
    found.sort();
    found
}

#[test]
fn only_config_and_the_named_exceptions_read_the_environment() {
    let readers = files_using(
        "agent/src",
        &["env::var(", "env::var_os(", "env::vars(", "env::vars_os("],
    );
    // config: the VMESH_<SECTION>__<KEY> overrides; the exceptions ARCHITECTURE.md names:
    // the watchdog (WATCHDOG_USEC/PID) and the in-pod Kubernetes defaults.
    let allowed = ["app.rs", "config/load.rs", "discovery/kubernetes.rs"];
    let extra: Vec<&String> = readers.iter().filter(|f| !allowed.contains(&f.as_str())).collect();
    assert!(extra.is_empty(), "environment read outside config: {extra:?}");
    assert!(
        readers.iter().any(|f| f == "config/load.rs"),
        "the check looks at the wrong tree: {readers:?}"
    );
}

#[test]
fn only_the_registrar_and_the_identity_keeper_write_the_lifecycle_records() {
    let writers = files_using("agent/src", &[".set_drained(", ".set_ramp(", ".set_registration("]);
    assert_eq!(writers, ["lifecycle/registrar.rs"]);
    let identity = files_using("agent/src", &[".set_identity(", ".clear_identity("]);
    assert_eq!(
        identity,
        ["identity/keeper.rs"],
        "the identity cache (the registrar's keeper)"
    );
}

#[test]
fn only_the_service_discovery_task_installs_endpoint_sets() {
    let writers = files_using("agent/src", &[".endpoints.store("]);
    assert_eq!(writers, ["discovery/service.rs"]);
}

#[test]
fn the_request_path_does_not_reach_the_registry_the_cmdb_or_the_store() {
    // The stages of the request path may not name the clients it must never await.
    let stages = files_using(
        "agent/src/proxy",
        &[
            "crate::registry",
            "vmesh_cmdb",
            "crate::store",
            "crate::discovery::Discovery",
        ],
    );
    assert!(
        stages.is_empty(),
        "request path stages import a control-plane client: {stages:?}"
    );
    let balance = files_using("agent/src/balance", &["crate::registry", "vmesh_cmdb", "crate::store"]);
    assert!(balance.is_empty(), "{balance:?}");
}

#[test]
fn anyhow_stays_at_the_binary_edge() {
    let users = files_using("agent/src", &["anyhow"]);
    let edge = |f: &String| f == "main.rs" || f == "cli.rs" || f.starts_with("cli/") || f == "app.rs";
    let inner: Vec<&String> = users.iter().filter(|f| !edge(f)).collect();
    assert!(inner.is_empty(), "anyhow in library modules: {inner:?}");
}

#[test]
fn no_test_is_skipped() {
    for dir in ["agent", "tests/tests", "tests/src", "cmdb-adapter"] {
        for (p, text) in sources(dir) {
            // Spelled in two pieces so that this file does not find itself.
            let ignore = concat!("#[", "ignore");
            assert!(!text.contains(ignore), "{} skips a test", p.display());
        }
    }
}

#[test]
fn the_composition_root_is_the_only_place_that_knows_everyone() {
    // app.rs puts admin, lifecycle, discovery and the proxy together; none of them reaches back.
    let back = files_using("agent/src", &["crate::app"]);
    assert!(back.is_empty(), "imports of the composition root: {back:?}");
    let lifecycle_to_admin = files_using("agent/src/lifecycle", &["crate::admin"]);
    assert!(
        lifecycle_to_admin.is_empty(),
        "lifecycle imports admin: {lifecycle_to_admin:?}"
    );
}
