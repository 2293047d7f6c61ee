//! Where the `vmesh` binary and the test fixtures are on disk.

use std::path::{Path, PathBuf};

/// The workspace root: the parent of this crate's manifest directory.
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| manifest.to_path_buf())
}

/// The `vmesh` binary under test: `$VMESH_BIN`, or `<workspace>/target/debug/vmesh`.
///
/// Panics with the command to run when the binary is missing: a test without the binary under
/// test must fail, never pass silently.
pub fn vmesh_bin() -> PathBuf {
    let path = match std::env::var_os("VMESH_BIN") {
        Some(p) => PathBuf::from(p),
        None => {
            let target = std::env::var_os("CARGO_TARGET_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| workspace_root().join("target"));
            target.join("debug").join("vmesh")
        }
    };
    assert!(
        path.is_file(),
        "the vmesh binary is missing at {}: run `cargo build -p vmesh-agent` (or `bash scripts/test.sh`) \
         first, or point VMESH_BIN at it",
        path.display()
    );
    path
}

/// A file in `tests/fixtures/` (Python upstreams and clients).
pub fn fixture(name: &str) -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures").join(name);
    assert!(path.is_file(), "fixture {} is missing", path.display());
    path
}
