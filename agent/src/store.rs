//! The agent's local state (sled, under `agent.data_dir`): identity cache, registration record,
//! drain flag, ramp start. Every write is flushed before it is acted on: sled 0.34 makes a
//! write durable only after a flush. A store that will not open, or has a newer schema, is
//! moved aside and rebuilt from the registry and the CMDB.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use vmesh_cmdb::ServiceIdentity;

/// The schema this build writes; a store with another version is quarantined.
pub const SCHEMA_VERSION: u32 = 1;

/// A key-value store of small JSON records; writes are durable when `put` returns.
pub trait Store: Send + Sync {
    fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError>;
    fn put_raw(&self, key: &str, value: &[u8]) -> Result<(), StoreError>;
    fn delete(&self, key: &str) -> Result<(), StoreError>;
    /// Writes without waiting for durability (data that may be lost in a crash, such as the
    /// last known endpoints: sled flushes them within its flush interval).
    fn put_raw_lazy(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.put_raw(key, value)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("state store {path}: {source}")]
    Sled { path: String, source: sled::Error },
    #[error("state store record {key}: {source}")]
    Decode { key: String, source: serde_json::Error },
    #[error("state store {path}: {problem}")]
    Io { path: String, problem: String },
    #[error("state store {path}: schema version {found} is not {SCHEMA_VERSION}")]
    Schema { path: String, found: String },
}

impl StoreError {
    /// The stable code of the failure, for logs, metrics and the admin API's answers.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Sled { .. } | Self::Io { .. } => "STORE_ERROR",
            Self::Decode { .. } | Self::Schema { .. } => "STORE_CORRUPT",
        }
    }

    /// sled could not take the store's file lock: another process holds it (or, for a moment,
    /// the background threads of a store this process dropped). sled reports it as an I/O error
    /// whose text names the lock.
    fn is_locked(&self) -> bool {
        matches!(self, Self::Sled { .. }) && self.to_string().contains("lock")
    }

    /// The store's content cannot be used (as opposed to the disk under it failing): what
    /// `open_or_rebuild` moves aside.
    pub fn is_corruption(&self) -> bool {
        match self {
            Self::Sled { source, .. } => matches!(
                source,
                sled::Error::Corruption { .. } | sled::Error::Unsupported(_) | sled::Error::ReportableBug(_)
            ),
            Self::Decode { .. } | Self::Schema { .. } => true,
            Self::Io { .. } => false,
        }
    }
}

/// What a restarted agent needs to know.
pub mod keys {
    pub const SCHEMA: &str = "schema_version";
    pub const IDENTITY: &str = "identity";
    pub const REGISTRATION: &str = "registration";
    pub const DRAIN: &str = "drain";
    pub const RAMP: &str = "ramp";
}

/// The identity cache record.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct CachedIdentity {
    pub identity: ServiceIdentity,
    /// Unix seconds when the CMDB last confirmed it.
    pub fetched_at: u64,
}

/// What this agent registered, so that a restart removes or adopts it.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RegistrationRecord {
    pub registry: String,
    pub id: String,
    pub service: String,
}

/// The slow-start ramp in progress.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct RampRecord {
    /// Unix seconds when the ramp started.
    pub start: u64,
    pub window_secs: u64,
}

// === impl RampRecord ===

impl RampRecord {
    /// The longest ramp window: `inbound.ramp.window` is a duration, capped at a day like every
    /// duration, and callers ignore ramp metadata with a longer window.
    pub const MAX_WINDOW_SECS: u64 = 86_400;
    /// How far in the future a start may lie: a clock stepped back after the ramp began (NTP
    /// steps are seconds), or a caller whose clock is behind the instance's.
    pub const MAX_START_AHEAD_SECS: u64 = 300;

    /// Whether a run of the agent can have written this record by the clock `now_unix`: its
    /// window at most [`Self::MAX_WINDOW_SECS`], its start at most
    /// [`Self::MAX_START_AHEAD_SECS`] ahead. Anything else (a start of `u64::MAX` from
    /// registry metadata, a tampered store) is not a ramp.
    pub fn plausible_at(&self, now_unix: u64) -> bool {
        self.window_secs <= Self::MAX_WINDOW_SECS && self.start <= now_unix.saturating_add(Self::MAX_START_AHEAD_SECS)
    }
}

/// Typed access over any [`Store`].
pub struct State<S: ?Sized = dyn Store> {
    inner: std::sync::Arc<S>,
}

/// The sled implementation.
pub struct SledStore {
    db: sled::Db,
    path: PathBuf,
}

// === impl SledStore ===

impl SledStore {
    /// Opens `dir/state`. Only a store that is corrupt (sled reports corruption, or an
    /// unsupported format) or has an unknown schema is moved aside (`state.corrupt-<unix
    /// time>`) with an error log line, and a fresh one created; a plain I/O failure (a full,
    /// read-only or failing disk, a permission) and a store held by another process are errors
    /// that leave the files as they are.
    pub fn open_or_rebuild(dir: &Path) -> Result<Self, StoreError> {
        let path = dir.join("state");
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            path: dir.display().to_string(),
            problem: format!("cannot create: {e}"),
        })?;
        match Self::open_when_free(&path).and_then(|s| s.check_schema().map(|()| s)) {
            Ok(s) => Ok(s),
            // Another process holds the store: that is not corruption; never move it aside.
            Err(e) if e.is_locked() => Err(StoreError::Io {
                path: path.display().to_string(),
                problem: format!("in use by another process (is another vmesh running with this data_dir?): {e}"),
            }),
            Err(e) if !e.is_corruption() => Err(e),
            Err(e) => {
                let aside = dir.join(format!("state.corrupt-{}", unix_now()));
                tracing::error!(error = %e, moved_to = %aside.display(), code = "STORE_CORRUPT",
                    "state store unreadable: moved aside; rebuilding from the registry and the CMDB");
                std::fs::rename(&path, &aside).map_err(|e| StoreError::Io {
                    path: path.display().to_string(),
                    problem: format!("cannot move aside: {e}"),
                })?;
                let s = Self::open(&path)?;
                s.check_schema()?;
                Ok(s)
            }
        }
    }

    /// How long an open waits for the store's file lock before it calls the store in use. A
    /// store dropped in this process is unlocked only once sled's background threads let go of
    /// it (a reopen after an I/O error, or a test), which takes milliseconds.
    const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

    /// Opens `path`, trying again while its lock is held, up to [`Self::LOCK_WAIT`].
    fn open_when_free(path: &Path) -> Result<Self, StoreError> {
        let deadline = std::time::Instant::now() + Self::LOCK_WAIT;
        loop {
            match Self::open(path) {
                Err(e) if e.is_locked() && std::time::Instant::now() < deadline => {
                    tracing::debug!(error = %e, "state store locked; trying again");
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                other => return other,
            }
        }
    }

    fn open(path: &Path) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(4 << 20)
            // State changes flush themselves before they are acted on; this background flush
            // makes the lazy writes (the last known endpoint sets) durable within a second.
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|source| StoreError::Sled {
                path: path.display().to_string(),
                source,
            })?;
        Ok(Self {
            db,
            path: path.to_owned(),
        })
    }

    fn check_schema(&self) -> Result<(), StoreError> {
        match self.get_raw(keys::SCHEMA)? {
            None => self.put_raw(keys::SCHEMA, SCHEMA_VERSION.to_string().as_bytes()),
            Some(v) if v == SCHEMA_VERSION.to_string().as_bytes() => Ok(()),
            Some(v) => Err(StoreError::Schema {
                path: self.path.display().to_string(),
                found: String::from_utf8_lossy(&v).into_owned(),
            }),
        }
    }

    fn err(&self, source: sled::Error) -> StoreError {
        StoreError::Sled {
            path: self.path.display().to_string(),
            source,
        }
    }
}

impl Store for SledStore {
    fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.db.get(key).map(|v| v.map(|v| v.to_vec())).map_err(|e| self.err(e))
    }

    fn put_raw(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.db.insert(key, value).map_err(|e| self.err(e))?;
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.db.remove(key).map_err(|e| self.err(e))?;
        self.db.flush().map(|_| ()).map_err(|e| self.err(e))
    }

    fn put_raw_lazy(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.db.insert(key, value).map(|_| ()).map_err(|e| self.err(e))
    }
}

// === impl Reopening ===

/// The store as the agent uses it: opened when it can be, and opened again after a failure,
/// so a disk that was full, read-only or failing does not need a restart once it recovers.
/// While no store is open every call fails with `STORE_ERROR` (the registrar then keeps the
/// instance drained and unregistered; the proxy does not use the store on its request path).
pub struct Reopening {
    dir: PathBuf,
    db: std::sync::Mutex<Option<std::sync::Arc<SledStore>>>,
    /// When the next open may be tried (opening is not retried on every call).
    next_try: std::sync::Mutex<std::time::Instant>,
}

impl Reopening {
    /// How often an unusable store is opened again.
    pub const RETRY: std::time::Duration = std::time::Duration::from_secs(2);

    /// Opens the store in `dir`; a store held by another process is an error (two agents on
    /// one data_dir), any other failure is logged and retried on use.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        let s = Self {
            dir: dir.to_owned(),
            db: std::sync::Mutex::new(None),
            next_try: std::sync::Mutex::new(std::time::Instant::now()),
        };
        match SledStore::open_or_rebuild(dir) {
            Ok(db) => *s.lock_db() = Some(std::sync::Arc::new(db)),
            Err(e) if e.to_string().contains("in use by another process") => return Err(e),
            Err(e) => {
                tracing::error!(error = %e, code = e.code(),
                    "state store unusable: serving traffic, but not registering until it opens (retried every 2 s)");
                *s.next_try.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now() + Self::RETRY;
            }
        }
        Ok(s)
    }

    fn lock_db(&self) -> std::sync::MutexGuard<'_, Option<std::sync::Arc<SledStore>>> {
        self.db.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn with<T>(&self, op: impl FnOnce(&SledStore) -> Result<T, StoreError>) -> Result<T, StoreError> {
        let db = self.current()?;
        let result = op(&db);
        if let Err(e) = &result {
            if !e.is_corruption() {
                // sled keeps failing after an I/O error until it is opened again; not sooner
                // than RETRY, so that a full disk does not cost a reopen per write.
                tracing::warn!(error = %e, "state store write failed: reopening it");
                drop(db);
                *self.lock_db() = None;
                *self.next_try.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now() + Self::RETRY;
            }
        }
        result
    }

    fn current(&self) -> Result<std::sync::Arc<SledStore>, StoreError> {
        let mut db = self.lock_db();
        if let Some(d) = db.as_ref() {
            return Ok(d.clone());
        }
        let unavailable = |problem: String| StoreError::Io {
            path: self.dir.join("state").display().to_string(),
            problem,
        };
        {
            let mut next = self.next_try.lock().unwrap_or_else(|p| p.into_inner());
            if std::time::Instant::now() < *next {
                return Err(unavailable("unavailable (retrying)".into()));
            }
            *next = std::time::Instant::now() + Self::RETRY;
        }
        match SledStore::open_or_rebuild(&self.dir) {
            Ok(d) => {
                tracing::info!(dir = %self.dir.display(), "state store opened");
                let d = std::sync::Arc::new(d);
                *db = Some(d.clone());
                Ok(d)
            }
            Err(e) => Err(unavailable(format!("unavailable: {e}"))),
        }
    }
}

impl Store for Reopening {
    fn get_raw(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.with(|d| d.get_raw(key))
    }

    fn put_raw(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.with(|d| d.put_raw(key, value))
    }

    fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.with(|d| d.delete(key))
    }

    fn put_raw_lazy(&self, key: &str, value: &[u8]) -> Result<(), StoreError> {
        self.with(|d| d.put_raw_lazy(key, value))
    }
}

// === impl State ===

impl State {
    pub fn new(store: std::sync::Arc<dyn Store>) -> Self {
        Self { inner: store }
    }

    /// The store itself, shared with discovery (the last known endpoint sets).
    pub fn shared(&self) -> std::sync::Arc<dyn Store> {
        self.inner.clone()
    }

    fn get<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, StoreError> {
        match self.inner.get_raw(key)? {
            None => Ok(None),
            Some(v) => serde_json::from_slice(&v)
                .map(Some)
                .map_err(|source| StoreError::Decode {
                    key: key.to_owned(),
                    source,
                }),
        }
    }

    fn put<T: Serialize>(&self, key: &str, v: &T) -> Result<(), StoreError> {
        let bytes = serde_json::to_vec(v).map_err(|source| StoreError::Decode {
            key: key.to_owned(),
            source,
        })?;
        self.inner.put_raw(key, &bytes)
    }

    pub fn identity(&self) -> Result<Option<CachedIdentity>, StoreError> {
        self.get(keys::IDENTITY)
    }

    pub fn set_identity(&self, identity: &ServiceIdentity) -> Result<(), StoreError> {
        self.put(
            keys::IDENTITY,
            &CachedIdentity {
                identity: identity.clone(),
                fetched_at: unix_now(),
            },
        )
    }

    /// Forgets the cached identity (the CMDB said this VM must not serve).
    pub fn clear_identity(&self) -> Result<(), StoreError> {
        self.inner.delete(keys::IDENTITY)
    }

    pub fn registration(&self) -> Result<Option<RegistrationRecord>, StoreError> {
        self.get(keys::REGISTRATION)
    }

    pub fn set_registration(&self, r: Option<&RegistrationRecord>) -> Result<(), StoreError> {
        match r {
            Some(r) => self.put(keys::REGISTRATION, r),
            None => self.inner.delete(keys::REGISTRATION),
        }
    }

    pub fn drained(&self) -> Result<bool, StoreError> {
        Ok(self.get::<bool>(keys::DRAIN)?.unwrap_or(false))
    }

    pub fn set_drained(&self, drained: bool) -> Result<(), StoreError> {
        self.put(keys::DRAIN, &drained)
    }

    /// The stored ramp; a record no run of the agent could have written (see
    /// [`RampRecord::plausible_at`]) reads as none, so the agent starts a fresh ramp instead of
    /// acting on it (and a start of `u64::MAX` cannot come back after every restart).
    pub fn ramp(&self) -> Result<Option<RampRecord>, StoreError> {
        let now = unix_now();
        Ok(self.get::<RampRecord>(keys::RAMP)?.filter(|r| {
            let ok = r.plausible_at(now);
            if !ok {
                tracing::warn!(
                    start = r.start,
                    window_secs = r.window_secs,
                    now,
                    "ignoring an implausible ramp record in the store"
                );
            }
            ok
        }))
    }

    pub fn set_ramp(&self, r: Option<RampRecord>) -> Result<(), StoreError> {
        match r {
            Some(r) => self.put(keys::RAMP, &r),
            None => self.inner.delete(keys::RAMP),
        }
    }
}

pub use crate::clock::unix_now;

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> ServiceIdentity {
        toml::from_str("service = \"orders\"\nenvironment = \"prod\"\n").unwrap()
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = State::new(std::sync::Arc::new(SledStore::open_or_rebuild(dir.path()).unwrap()));
            s.set_identity(&identity()).unwrap();
            s.set_drained(true).unwrap();
            s.set_ramp(Some(RampRecord {
                start: 10,
                window_secs: 60,
            }))
            .unwrap();
            s.set_registration(Some(&RegistrationRecord {
                registry: "consul".into(),
                id: "orders-web-01".into(),
                service: "orders".into(),
            }))
            .unwrap();
        }
        let s = State::new(std::sync::Arc::new(SledStore::open_or_rebuild(dir.path()).unwrap()));
        assert_eq!(s.identity().unwrap().unwrap().identity, identity());
        assert!(s.drained().unwrap());
        assert_eq!(
            s.ramp().unwrap(),
            Some(RampRecord {
                start: 10,
                window_secs: 60
            })
        );
        assert_eq!(s.registration().unwrap().unwrap().id, "orders-web-01");
        s.set_registration(None).unwrap();
        assert_eq!(s.registration().unwrap(), None);
    }

    #[test]
    fn implausible_ramp_records_read_as_none() {
        let dir = tempfile::tempdir().unwrap();
        let s = State::new(std::sync::Arc::new(SledStore::open_or_rebuild(dir.path()).unwrap()));
        let now = unix_now();
        for (start, window_secs, kept) in [
            (now - 30, 60, true),
            (now + RampRecord::MAX_START_AHEAD_SECS, 60, true),
            (0, 0, true),
            (now + RampRecord::MAX_START_AHEAD_SECS + 60, 60, false),
            (u64::MAX, 60, false),
            (now, RampRecord::MAX_WINDOW_SECS + 1, false),
            (now, u64::MAX, false),
        ] {
            let rec = RampRecord { start, window_secs };
            s.set_ramp(Some(rec)).unwrap();
            assert_eq!(s.ramp().unwrap(), kept.then_some(rec), "{rec:?}");
        }
        // Straight from the bytes, as a tampered or foreign store has them.
        s.shared()
            .put_raw(keys::RAMP, br#"{"start":18446744073709551615,"window_secs":0}"#)
            .unwrap();
        assert_eq!(s.ramp().unwrap(), None);
    }

    #[test]
    fn a_corrupt_store_is_moved_aside_and_rebuilt() {
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        // Garbage where sled expects its files.
        std::fs::write(state.join("conf"), b"\xff\xfenot a sled config").unwrap();
        std::fs::write(state.join("db"), vec![0xAB; 4096]).unwrap();
        let s = State::new(std::sync::Arc::new(SledStore::open_or_rebuild(dir.path()).unwrap()));
        assert_eq!(s.identity().unwrap(), None);
        let moved = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().starts_with("state.corrupt-"));
        assert!(moved, "the corrupt store was moved aside");
    }

    #[test]
    fn an_unusable_store_is_left_in_place_and_reopened_when_it_can() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        // A file where the directory should be: an I/O failure, not corruption.
        std::fs::write(&data, b"not a directory").unwrap();
        let s = Reopening::open(&data).unwrap();
        let e = s.get_raw(keys::DRAIN).unwrap_err();
        assert_eq!(e.code(), "STORE_ERROR");
        assert!(!e.is_corruption());
        assert_eq!(std::fs::read(&data).unwrap(), b"not a directory", "left in place");
        std::fs::remove_file(&data).unwrap();
        // Not retried before its time, then opened.
        assert!(s.get_raw(keys::DRAIN).is_err());
        *s.next_try.lock().unwrap() = std::time::Instant::now();
        let state = State::new(std::sync::Arc::new(s));
        assert!(!state.drained().unwrap());
        state.set_drained(true).unwrap();
        assert!(state.drained().unwrap());
        assert!(!std::fs::read_dir(&data).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("state.corrupt-")));
    }

    #[test]
    fn a_store_held_elsewhere_is_in_use_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let held = SledStore::open_or_rebuild(dir.path()).unwrap();
        held.put_raw(keys::DRAIN, b"true").unwrap();
        let e = SledStore::open_or_rebuild(dir.path())
            .err()
            .expect("a held store does not open twice");
        assert!(e.to_string().contains("in use by another process"), "{e}");
        assert!(!std::fs::read_dir(dir.path()).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .starts_with("state.corrupt-")));
        assert_eq!(held.get_raw(keys::DRAIN).unwrap().as_deref(), Some(&b"true"[..]));
    }

    #[test]
    fn a_newer_schema_is_quarantined() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = SledStore::open_or_rebuild(dir.path()).unwrap();
            s.put_raw(keys::SCHEMA, b"99").unwrap();
            s.put_raw(keys::DRAIN, b"true").unwrap();
        }
        let s = State::new(std::sync::Arc::new(SledStore::open_or_rebuild(dir.path()).unwrap()));
        assert!(!s.drained().unwrap());
    }
}
