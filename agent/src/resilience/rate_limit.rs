//! Token-bucket rate limits (to be written).
