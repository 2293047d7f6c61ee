//! Adaptive concurrency limit on inbound (to be written).
