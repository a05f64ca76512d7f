use tonic::Status;

/// What can go wrong in the reaper's RPCs; the one conversion to `Status` is below. (A tick
/// never fails as a whole: its errors are counted and shown in the snapshot.)
#[derive(Debug, thiserror::Error)]
pub enum ReaperError {
    #[error("storage: {0}")]
    Storage(#[from] sqlx::Error),
}

impl From<ReaperError> for Status {
    fn from(e: ReaperError) -> Status {
        match e {
            ReaperError::Storage(err) => {
                // Details stay in our log; the caller learns only that it was ours.
                tracing::error!(error = %err, "reaper storage error");
                Status::internal("reaper storage error")
            }
        }
    }
}
