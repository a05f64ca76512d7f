//! Where alerts and rollbacks are told to people. The tracker layer (Plane comments under
//! the `stream` bot) plugs in here as an [`AlertSink`]; until it does, [`LogSink`] writes
//! them to the log. Either way every alert is first recorded in post-deploy's own `alerts`
//! table (served by `GetWatch`), and one the sink refused is offered again on later ticks.

/// What an alert is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertKind {
    /// Production degraded where nothing is rolled back (the self repo, or no rollback command).
    Degraded,
    /// The prober's own errors persisted.
    ProbeErrors,
    /// A rollback ran; the work item needs a human.
    Rollback,
    /// A rollback was started and post-deploy stopped before it finished: its outcome is unknown.
    RollbackInterrupted,
}

impl AlertKind {
    pub fn as_str(self) -> &'static str {
        match self {
            AlertKind::Degraded => "degraded",
            AlertKind::ProbeErrors => "probe_errors",
            AlertKind::Rollback => "rollback",
            AlertKind::RollbackInterrupted => "rollback_interrupted",
        }
    }
}

/// One alert to post.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertNote {
    pub work_item: String,
    pub repo: String,
    /// One of [`AlertKind::as_str`].
    pub kind: String,
    pub text: String,
    pub at_ms: i64,
}

/// Posts alerts where people see them (the work item's tracker issue).
#[tonic::async_trait]
pub trait AlertSink: Send + Sync + 'static {
    /// Posts `alert`; an error leaves it pending, to be offered again on a later tick.
    async fn post(&self, alert: &AlertNote) -> Result<(), String>;
}

/// Writes alerts to the log only.
#[derive(Debug, Clone, Copy, Default)]
pub struct LogSink;

#[tonic::async_trait]
impl AlertSink for LogSink {
    async fn post(&self, alert: &AlertNote) -> Result<(), String> {
        tracing::warn!(
            work_item = %alert.work_item,
            repo = %alert.repo,
            kind = %alert.kind,
            text = %alert.text,
            "post-deploy alert"
        );
        Ok(())
    }
}
