use tonic::Status;

/// Everything that can go wrong in the launcher's RPCs; the one conversion to `Status` is below.
#[derive(Debug, thiserror::Error)]
pub enum LauncherError {
    #[error("{0} is required")]
    MissingField(&'static str),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Precondition(String),
    #[error("storage: {0}")]
    Storage(#[from] sqlx::Error),
}

impl From<LauncherError> for Status {
    fn from(e: LauncherError) -> Status {
        match e {
            LauncherError::MissingField(_) | LauncherError::InvalidField { .. } => {
                Status::invalid_argument(e.to_string())
            }
            LauncherError::NotFound(_) => Status::not_found(e.to_string()),
            LauncherError::Precondition(_) => Status::failed_precondition(e.to_string()),
            LauncherError::Storage(err) => {
                // Details stay in our log; the caller learns only that it was ours.
                tracing::error!(error = %err, "launcher storage error");
                Status::internal("launcher storage error")
            }
        }
    }
}
