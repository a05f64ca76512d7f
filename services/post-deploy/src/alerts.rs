//! Where alerts and rollbacks are told to people. [`StageEngineSink`] (what `orchestrator
//! up` and `serve` wire, #18) hands each to stage-engine's `Notify`: the stream bot's
//! comment on the work item's tracker issue and the notify webhook, once per alert, through
//! stage-engine's outbox. [`LogSink`] writes them to the log only. Either way every alert is
//! first recorded in post-deploy's own `alerts` table (served by `GetWatch`), and one the
//! sink refused is offered again on later ticks.

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

/// Tells people through stage-engine's `Notify` (a tracker comment under the stream bot and
/// the notify webhook). An alert about a work item stage-engine does not know is logged and
/// taken as told: there is no issue to comment on.
#[derive(Clone)]
pub struct StageEngineSink {
    client: orchestrator_kit::clients::StageEngineClient,
}

impl StageEngineSink {
    pub fn new(client: orchestrator_kit::clients::StageEngineClient) -> Self {
        StageEngineSink { client }
    }
}

#[tonic::async_trait]
impl AlertSink for StageEngineSink {
    async fn post(&self, alert: &AlertNote) -> Result<(), String> {
        use orchestrator_proto::stage_engine::v1::NotifyRequest;
        let req = NotifyRequest {
            work_item: alert.work_item.clone(),
            event: format!("post_deploy_{}", alert.kind),
            text: format!("post-deploy of {}: {}", alert.repo, alert.text),
            // One alert, one event: offered again after an error, told once.
            event_id: format!(
                "post-deploy:{}:{}:{}",
                alert.work_item, alert.kind, alert.at_ms
            ),
        };
        match self.client.clone().notify(req).await {
            Ok(_) => Ok(()),
            Err(s) if s.code() == tonic::Code::NotFound => {
                LogSink.post(alert).await?;
                tracing::info!(work_item = %alert.work_item, "post-deploy alert for a work item stage-engine does not know: logged only");
                Ok(())
            }
            Err(s) => Err(format!(
                "stage-engine Notify: {:?}: {}",
                s.code(),
                s.message()
            )),
        }
    }
}
