//! Host CPU usage from /proc or the cgroup (to be written).
