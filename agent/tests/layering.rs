//! The module layering of the agent, read from its sources: the upstream clients sit below
//! `route` and `balance`, and neither of those (nor the governance, resilience and telemetry
//! modules they use) imports the proxy. An import across a forbidden edge fails here with the
//! file and line, before it can grow into an import loop (issue 10: `route -> proxy/client ->
//! proxy/body -> proxy/pool -> proxy/complete -> route` was one).

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};

/// (module, modules it must not import).
const FORBIDDEN: &[(&str, &[&str])] = &[
    (
        "upstream",
        &[
            "proxy",
            "route",
            "balance",
            "governance",
            "resilience",
            "discovery",
            "telemetry",
            "admin",
            "app",
            "lifecycle",
        ],
    ),
    (
        "balance",
        &["proxy", "route", "governance", "discovery", "admin", "app", "lifecycle"],
    ),
    ("route", &["proxy", "discovery", "admin", "app", "lifecycle"]),
    (
        "governance",
        &["proxy", "route", "discovery", "admin", "app", "lifecycle"],
    ),
    ("resilience", &["proxy", "route", "admin", "app", "lifecycle"]),
    ("telemetry", &["proxy", "route", "balance", "admin", "app", "lifecycle"]),
];

fn src() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// The files of module `m`: `src/m.rs` and everything below `src/m/`.
fn files(m: &str) -> Vec<PathBuf> {
    let mut out = vec![src().join(format!("{m}.rs"))];
    let mut dirs = vec![src().join(m)];
    while let Some(d) = dirs.pop() {
        let Ok(entries) = fs::read_dir(&d) else { continue };
        for e in entries {
            let p = e.expect("a directory entry").path();
            if p.is_dir() {
                dirs.push(p);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    out.retain(|p| p.exists());
    out
}

/// Every `crate::NAME` in `line` outside a `//` comment.
fn crate_refs(line: &str) -> BTreeSet<String> {
    let code = line.split("//").next().unwrap_or("");
    let mut found = BTreeSet::new();
    let mut rest = code;
    while let Some(at) = rest.find("crate::") {
        let after = &rest[at + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        let word_start = at == 0 || !rest[..at].ends_with(|c: char| c.is_ascii_alphanumeric() || c == '_');
        if word_start && !name.is_empty() {
            found.insert(name);
        }
        rest = after;
    }
    found
}

#[test]
fn upstream_route_and_balance_do_not_import_the_layers_above_them() {
    let mut broken = Vec::new();
    for (module, forbidden) in FORBIDDEN {
        let files = files(module);
        assert!(!files.is_empty(), "no sources for module {module}");
        for f in files {
            let text = fs::read_to_string(&f).unwrap();
            for (n, line) in text.lines().enumerate() {
                for r in crate_refs(line) {
                    if forbidden.contains(&r.as_str()) {
                        broken.push(format!("{}:{}: {module} imports crate::{r}", f.display(), n + 1));
                    }
                }
            }
        }
    }
    assert!(broken.is_empty(), "imports across the layering:\n{}", broken.join("\n"));
}

#[test]
fn the_scan_sees_an_import_and_skips_comments_and_longer_names() {
    assert_eq!(
        crate_refs("use crate::proxy::pool::ConnPool;"),
        BTreeSet::from(["proxy".to_string()])
    );
    assert!(crate_refs("// use crate::proxy::x").is_empty());
    assert!(crate_refs("use other_crate::proxy::x;").is_empty());
    assert_eq!(
        crate_refs("let a = crate::route::X; let b = crate::balance::Y; // crate::proxy"),
        BTreeSet::from(["route".to_string(), "balance".to_string()])
    );
}
