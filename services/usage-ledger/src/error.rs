use tonic::Status;

/// Everything that can go wrong in usage-ledger; the one conversion to `Status` is below.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    #[error("{0} is required")]
    MissingField(&'static str),
    #[error("{field}: {reason}")]
    InvalidField { field: &'static str, reason: String },
    #[error("no run recorded for {0}")]
    NotFound(String),
    #[error("storage: {0}")]
    Storage(#[from] sqlx::Error),
}

impl From<LedgerError> for Status {
    fn from(e: LedgerError) -> Status {
        match e {
            LedgerError::MissingField(_) | LedgerError::InvalidField { .. } => {
                Status::invalid_argument(e.to_string())
            }
            LedgerError::NotFound(_) => Status::not_found(e.to_string()),
            LedgerError::Storage(err) => {
                // Details stay in our log; the caller learns only that it was ours.
                tracing::error!(error = %err, "usage-ledger storage error");
                Status::internal("usage-ledger storage error")
            }
        }
    }
}
