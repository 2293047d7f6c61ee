//! CMDB errors, each with a stable operator-facing code.

/// Why an identity could not be read.
#[derive(Debug, thiserror::Error)]
pub enum CmdbError {
    #[error("vm {vm}: not found in the CMDB")]
    NotFound { vm: String },
    #[error("vm {vm}: status {status:?} is not active or staged (decommissioned?)")]
    Decommissioned { vm: String, status: String },
    #[error("vm {vm}: field {field}: {problem}")]
    Field { vm: String, field: String, problem: String },
    #[error("vm {vm}: {count} records match the name; expected one")]
    Ambiguous { vm: String, count: usize },
    #[error("cmdb unreachable: {0}")]
    Unreachable(String),
    #[error("cmdb refused the credentials: {0}")]
    Auth(String),
    #[error("cmdb answered something unexpected: {0}")]
    BadResponse(String),
    #[error("cmdb configuration: {0}")]
    Config(String),
}

impl CmdbError {
    /// The stable code: the same word in logs, metrics and CLI output.
    pub fn code(&self) -> &'static str {
        match self {
            Self::NotFound { .. } => "CMDB_VM_NOT_FOUND",
            Self::Decommissioned { .. } => "CMDB_VM_DECOMMISSIONED",
            Self::Field { .. } => "CMDB_BAD_FIELD",
            Self::Ambiguous { .. } => "CMDB_VM_AMBIGUOUS",
            Self::Unreachable(_) => "CMDB_UNREACHABLE",
            Self::Auth(_) => "CMDB_AUTH",
            Self::BadResponse(_) => "CMDB_BAD_RESPONSE",
            Self::Config(_) => "CMDB_CONFIG",
        }
    }

    /// Whether a cached identity may stand in: yes for outages and broken answers, no when
    /// the CMDB answered that this VM is not (or no longer) a serving instance.
    pub fn keeps_cache(&self) -> bool {
        !matches!(
            self,
            Self::NotFound { .. } | Self::Decommissioned { .. } | Self::Ambiguous { .. }
        )
    }

    /// Whether the CMDB could not be asked (as opposed to answering "no").
    pub fn is_outage(&self) -> bool {
        matches!(self, Self::Unreachable(_) | Self::BadResponse(_))
    }
}
