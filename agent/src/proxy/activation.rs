//! Listening sockets that outlive the agent under systemd, so that a restart or an upgrade
//! refuses no connection: while the agent restarts, new connections wait in the kernel's accept
//! queue of a socket systemd holds.
//!
//! Two ways, both passed back in `LISTEN_FDS`: the optional `vmesh.socket` unit binds the
//! sockets itself; and, with no socket unit, the agent hands every socket it binds to systemd's
//! file descriptor store (`FDSTORE=1`, named `vmesh-listen-<address>`; the unit sets
//! `FileDescriptorStoreMax=`), which keeps them across `systemctl restart` and gives them to the
//! next run. A listener a reload removes is taken out of the store (`FDSTOREREMOVE=1`).

use std::collections::{HashMap, HashSet};
use std::net::{SocketAddr, TcpListener};
use std::os::fd::{AsFd, FromRawFd};

/// The prefix of the names of the sockets the agent keeps in systemd's fd store.
const STORE_PREFIX: &str = "vmesh-listen-";

/// Inherited listening sockets by local address.
#[derive(Debug, Default)]
pub struct Inherited {
    by_addr: HashMap<SocketAddr, TcpListener>,
    /// The ones that came from the fd store (bound by an earlier run), not from a socket unit.
    stored: HashSet<SocketAddr>,
}

impl Inherited {
    /// Takes the sockets systemd passed to this process. Call once, before any thread starts:
    /// it unsets `LISTEN_FDS`/`LISTEN_PID` so children do not inherit them.
    pub fn from_systemd() -> std::io::Result<Self> {
        let mut by_addr = HashMap::new();
        let mut stored = HashSet::new();
        for (fd, name) in sd_notify::listen_fds_with_names(true)? {
            // SAFETY: systemd passes each fd in LISTEN_FDS to this process (LISTEN_PID is
            // checked by `listen_fds`) and nothing else in the process owns it yet; each is
            // wrapped exactly once.
            #[allow(unsafe_code)]
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            match listener.local_addr() {
                Ok(addr) => {
                    if name.starts_with(STORE_PREFIX) {
                        stored.insert(addr);
                    }
                    by_addr.insert(addr, listener);
                }
                Err(e) => tracing::warn!(fd, error = %e, "inherited fd is not a TCP listening socket: ignored"),
            }
        }
        Ok(Self { by_addr, stored })
    }

    /// Whether the socket of `addr` came from a socket unit (which keeps it itself), rather
    /// than from the fd store or a bind of this run.
    pub fn from_socket_unit(&self, addr: SocketAddr) -> bool {
        self.by_addr.contains_key(&addr) && !self.stored.contains(&addr)
    }

    /// Drops the sockets of the fd store that no listener claimed (the config no longer has
    /// them) and takes them out of the store; a socket unit's are kept for a reload.
    pub fn release_unclaimed_stored(&mut self) {
        let stale: Vec<SocketAddr> = self
            .by_addr
            .keys()
            .filter(|a| self.stored.contains(a))
            .copied()
            .collect();
        for addr in stale {
            tracing::info!(%addr, "dropping a listening socket an earlier run stored: no listener of the config uses it");
            self.by_addr.remove(&addr);
            forget(addr);
        }
    }

    /// The inherited socket listening on `addr`, if systemd passed one.
    pub fn take(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        self.by_addr.remove(&addr)
    }

    pub fn len(&self) -> usize {
        self.by_addr.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_addr.is_empty()
    }

    /// Addresses passed but not (yet) claimed by a listener of the config.
    pub fn unclaimed(&self) -> Vec<SocketAddr> {
        self.by_addr.keys().copied().collect()
    }
}

/// The fd store's name of the socket of `addr` (`:` is not allowed in a name).
fn store_name(addr: SocketAddr) -> String {
    format!("{STORE_PREFIX}{addr}").replace(':', "_")
}

/// Hands the listening socket of `addr` to systemd's fd store, so that it outlives this run
/// (no-op outside systemd; systemd ignores it when the unit has no `FileDescriptorStoreMax=`,
/// and keeps one copy of a socket stored twice).
pub fn keep(listener: &impl AsFd, addr: SocketAddr) {
    let name = store_name(addr);
    let state = [sd_notify::NotifyState::FdStore, sd_notify::NotifyState::FdName(&name)];
    if let Err(e) = sd_notify::notify_with_fds(false, &state, &[listener.as_fd()]) {
        tracing::debug!(%addr, error = %e, "cannot hand the listening socket to systemd");
    }
}

/// Takes the socket of `addr` out of systemd's fd store (a reload removed its listener).
pub fn forget(addr: SocketAddr) {
    let name = store_name(addr);
    let _ = sd_notify::notify(
        false,
        &[
            sd_notify::NotifyState::FdStoreRemove,
            sd_notify::NotifyState::FdName(&name),
        ],
    );
}
