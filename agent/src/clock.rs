//! Wall-clock time as Unix seconds: what ramp starts, registry metadata and stored records
//! carry (a monotonic `Instant` cannot cross a restart or a network).

use std::time::SystemTime;

/// Seconds since the Unix epoch; 0 for a clock set before it.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
