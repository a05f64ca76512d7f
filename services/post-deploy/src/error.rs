use tonic::Status;

/// Everything that can go wrong in post-deploy's RPCs; the one conversion to `Status` is below.
#[derive(Debug, thiserror::Error)]
pub enum PostDeployError {
    #[error("{0} is required")]
    MissingField(&'static str),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("no watch for work item {0}")]
    NotFound(String),
    #[error("storage: {0}")]
    Storage(#[from] sqlx::Error),
}

impl From<PostDeployError> for Status {
    fn from(e: PostDeployError) -> Status {
        match e {
            PostDeployError::MissingField(_) | PostDeployError::InvalidField { .. } => {
                Status::invalid_argument(e.to_string())
            }
            PostDeployError::NotFound(_) => Status::not_found(e.to_string()),
            PostDeployError::Storage(err) => {
                // Details stay in our log; the caller learns only that it was ours.
                tracing::error!(error = %err, "post-deploy storage error");
                Status::internal("post-deploy storage error")
            }
        }
    }
}
