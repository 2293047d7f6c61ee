//! Certificate rotation: the `[tls]` files are checked every `reload_interval` (and on demand,
//! e.g. SIGHUP); a change loads them whole and puts the new material in force for handshakes
//! from then on. Connections already made keep going on the material they were made with. A
//! set that does not load (a half-written rotation: a new key beside the old certificate)
//! keeps the old material and is tried again at the next check.

use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use prometheus_client::metrics::counter::Counter;
use tokio::sync::Notify;

use super::{Material, TlsConfig, TLS_MATERIAL_INVALID};

/// What the watcher reports to `/metrics`.
#[derive(Clone, Default)]
pub struct ReloadCounters {
    pub ok: Counter,
    pub failed: Counter,
}

/// (mtime ns, inode, size) of each file: a rename, a rewrite in place or a touch changes it.
type Stamp = Vec<Option<(i128, u64, u64)>>;

fn stamp(files: &[PathBuf]) -> Stamp {
    files
        .iter()
        .map(|f| {
            std::fs::metadata(f).ok().map(|m| {
                (
                    i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
                    m.ino(),
                    m.size(),
                )
            })
        })
        .collect()
}

/// Starts watching the files of `config` (already loaded and in force); `now` makes it check at
/// once. The task lives as long as the runtime.
pub fn spawn_watcher(config: TlsConfig, counters: ReloadCounters, now: &'static Notify) {
    let files: Vec<PathBuf> = [&config.cert_file, &config.key_file, &config.ca_file]
        .into_iter()
        .flatten()
        .cloned()
        .collect();
    let mut seen = stamp(&files);
    tokio::spawn(async move {
        let interval = config.reload_interval.get();
        loop {
            tokio::select! {
                () = tokio::time::sleep(interval) => {}
                () = now.notified() => {}
            }
            let current = stamp(&files);
            if current == seen {
                continue;
            }
            match Material::load(&config) {
                Ok(m) => {
                    tracing::info!(serial = %m.serial, identity = ?m.own.as_ref().map(ToString::to_string), "tls: certificate material reloaded");
                    super::install(m);
                    counters.ok.inc();
                    seen = current;
                }
                Err(e) => {
                    // `seen` stays: the next check tries again (the rest of a rotation may land).
                    tracing::warn!(code = TLS_MATERIAL_INVALID, error = %e, "tls: reload failed; the previous certificate stays in force");
                    counters.failed.inc();
                }
            }
        }
    });
}
