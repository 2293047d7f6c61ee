//! Free loopback ports chosen at run time, never handed out twice by one test process.
//!
//! A port is picked below the kernel's ephemeral range (`net.ipv4.ip_local_port_range`, 32768
//! and up by default), each test process starting at its own offset: a port taken from the
//! ephemeral range (`bind 127.0.0.1:0`) can become the source port of any outgoing connection
//! (another test binary's load, an upstream pool's dial) between the check and the agent's
//! bind, and the agent then fails with "Address already in use". Where the ephemeral range
//! leaves no room below it, ports come from `bind 127.0.0.1:0` as before.

use std::collections::HashSet;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// The lowest port picked, and the most below the ephemeral range the picks may span.
const LOW: u32 = 10_000;
const SPAN: u32 = 20_000;

/// A loopback port that nothing listens on right now.
///
/// Ports already returned by this process are skipped, so two parts of one test (or two tests
/// running in parallel threads) never get the same one.
pub fn free_port() -> u16 {
    static GIVEN: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let given = GIVEN.get_or_init(|| Mutex::new(HashSet::new()));
    for _ in 0..1000 {
        let Some(port) = candidate() else { break };
        if TcpListener::bind(("127.0.0.1", port)).is_err() {
            continue;
        }
        let mut set = given.lock().unwrap_or_else(|e| e.into_inner());
        if set.insert(port) {
            return port;
        }
    }
    for _ in 0..100 {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr of a bound socket").port();
        drop(listener);
        let mut set = given.lock().unwrap_or_else(|e| e.into_inner());
        if set.insert(port) {
            return port;
        }
    }
    panic!("no free loopback port after 100 tries");
}

/// The next port to try below the ephemeral range, from this process's own starting point;
/// `None` when the range leaves no room below it.
fn candidate() -> Option<u16> {
    static SPAN_BELOW: OnceLock<u32> = OnceLock::new();
    static NEXT: OnceLock<AtomicU32> = OnceLock::new();
    let span = *SPAN_BELOW.get_or_init(|| {
        let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32_768);
        low.saturating_sub(LOW).min(SPAN)
    });
    if span < 1000 {
        return None;
    }
    // Processes started together begin far apart (a multiplicative spread of the pid).
    let next = NEXT.get_or_init(|| AtomicU32::new(std::process::id().wrapping_mul(7919) % span));
    let offset = next.fetch_add(1, Ordering::Relaxed) % span;
    u16::try_from(LOW + offset).ok()
}

/// `127.0.0.1:<free port>`.
pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_bindable_and_below_the_ephemeral_range() {
        let ports: Vec<u16> = (0..50).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        let ephemeral_low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
            .unwrap_or(32_768);
        for p in &ports {
            if ephemeral_low >= LOW + 1000 {
                assert!(u32::from(*p) >= LOW && u32::from(*p) < ephemeral_low, "{p}");
            }
            TcpListener::bind(("127.0.0.1", *p)).expect("a free port binds");
        }
    }
}
