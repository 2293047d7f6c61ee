//! Circuit breaking per upstream service (to be written).
