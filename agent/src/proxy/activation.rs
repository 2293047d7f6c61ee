//! systemd socket activation: listening sockets passed by the service manager (`LISTEN_FDS`)
//! are adopted instead of bound, so that they outlive an agent restart or upgrade. While the
//! agent restarts, new connections wait in the kernel's accept queue of the socket systemd
//! holds: none is refused.

use std::collections::HashMap;
use std::net::{SocketAddr, TcpListener};
use std::os::fd::FromRawFd;

/// Inherited listening sockets by local address.
#[derive(Debug, Default)]
pub struct Inherited {
    by_addr: HashMap<SocketAddr, TcpListener>,
}

impl Inherited {
    /// Takes the sockets systemd passed to this process. Call once, before any thread starts:
    /// it unsets `LISTEN_FDS`/`LISTEN_PID` so children do not inherit them.
    pub fn from_systemd() -> std::io::Result<Self> {
        let mut by_addr = HashMap::new();
        for fd in sd_notify::listen_fds()? {
            // SAFETY: systemd passes each fd in LISTEN_FDS to this process (LISTEN_PID is
            // checked by `listen_fds`) and nothing else in the process owns it yet; each is
            // wrapped exactly once.
            #[allow(unsafe_code)]
            let listener = unsafe { TcpListener::from_raw_fd(fd) };
            match listener.local_addr() {
                Ok(addr) => {
                    by_addr.insert(addr, listener);
                }
                Err(e) => tracing::warn!(fd, error = %e, "inherited fd is not a TCP listening socket: ignored"),
            }
        }
        Ok(Self { by_addr })
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
