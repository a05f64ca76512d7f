use orchestrator_forge::ForgeError;
use tonic::Status;

/// Everything that can go wrong in merge-gate; the one conversion to `Status` is below.
#[derive(Debug, thiserror::Error)]
pub enum GateError {
    #[error("{0} is required")]
    MissingField(&'static str),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    /// The forge refused what the caller asked (e.g. a PR whose head and base are the same).
    #[error("{0}")]
    Refused(String),
    /// The forge is down or slow: the same call may succeed later.
    #[error("{0}")]
    Unavailable(String),
    #[error("storage: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("{0}")]
    Internal(String),
}

impl From<ForgeError> for GateError {
    fn from(e: ForgeError) -> Self {
        match e {
            ForgeError::Invalid(n) => GateError::InvalidField {
                field: "repo/branch",
                reason: n.to_string(),
            },
            ForgeError::NotFound(what) => GateError::NotFound(what),
            ForgeError::Rejected { status, message } => {
                GateError::Refused(format!("the forge refused ({status}): {message}"))
            }
            e if e.is_transient() => GateError::Unavailable(e.to_string()),
            e => GateError::Internal(e.to_string()),
        }
    }
}

impl From<GateError> for Status {
    fn from(e: GateError) -> Status {
        match e {
            GateError::MissingField(_) | GateError::InvalidField { .. } => {
                Status::invalid_argument(e.to_string())
            }
            GateError::NotFound(_) => Status::not_found(e.to_string()),
            GateError::Refused(_) => Status::failed_precondition(e.to_string()),
            GateError::Unavailable(_) => Status::unavailable(e.to_string()),
            GateError::Storage(err) => {
                // Details stay in our log; the caller learns only that it was ours.
                tracing::error!(error = %err, "merge-gate storage error");
                Status::internal("merge-gate storage error")
            }
            GateError::Internal(err) => {
                tracing::error!(error = %err, "merge-gate internal error");
                Status::internal("merge-gate internal error")
            }
        }
    }
}
