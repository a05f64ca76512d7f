use tonic::Status;

/// Everything that can go wrong in stage-engine; the one conversion to `Status` is below.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("{0} is required")]
    MissingField(&'static str),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    /// A service the decision depends on (forge, merge-gate) is down: nothing changed; the
    /// caller retries.
    #[error("{0}")]
    Unavailable(String),
    /// The work item kept changing under us: nothing changed; the caller retries.
    #[error("the work item {0} changed concurrently; try again")]
    Busy(String),
    #[error("storage: {0}")]
    Storage(#[from] sqlx::Error),
    #[error("internal: {0}")]
    Internal(String),
}

impl From<EngineError> for Status {
    fn from(e: EngineError) -> Status {
        match e {
            EngineError::MissingField(_) | EngineError::InvalidField { .. } => {
                Status::invalid_argument(e.to_string())
            }
            EngineError::NotFound(_) => Status::not_found(e.to_string()),
            EngineError::Precondition(_) => Status::failed_precondition(e.to_string()),
            EngineError::Unavailable(_) => Status::unavailable(e.to_string()),
            EngineError::Busy(_) => Status::aborted(e.to_string()),
            EngineError::Storage(err) => {
                // Details stay in our log; the caller learns only that it was ours.
                tracing::error!(error = %err, "stage-engine storage error");
                Status::internal("stage-engine storage error")
            }
            EngineError::Internal(msg) => {
                tracing::error!(error = %msg, "stage-engine internal error");
                Status::internal("stage-engine internal error")
            }
        }
    }
}
