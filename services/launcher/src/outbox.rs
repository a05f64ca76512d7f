//! The launcher's end of a run, durable: the run's effects on its peers are written in the
//! transaction of the job's guarded terminal flip ([`crate::store::settle_with`]) and
//! delivered by the kit's one outbox mechanism ([`orchestrator_kit::outbox`]) for as long
//! as the peer is down — across restarts of either side. The job's own status never waits
//! for a peer: what the run came to is decided here; its effects follow.
//!
//! One channel per work item, delivered in order: `UsageLedger.RecordRun`, then the finish
//! comment (usage-ledger's line for the run, which needs the recorded run, posted through
//! `StageEngine.AddComment`), then `StageEngine.AdvanceStage` (a success) or
//! `StageEngine.ReportJobFailed` (a job failed for good). The order matters: the item's
//! usage summary (posted when it reaches done) must see the run that advanced it, and the
//! finish comment comes before what stage-engine says about the next stage. The
//! launcher's other comments (the analyst's start, a spent budget) go the same way.
//!
//! Every receiver dedupes: RecordRun on (job, attempt), AddComment on its idempotency key,
//! AdvanceStage and ReportJobFailed on (job, attempt). What follows a stage (the next
//! agent, the deploy-finalizer after a deploy) is stage-engine's to enqueue.

use async_trait::async_trait;
use orchestrator_kit::outbox::{self, Deliver, DeliveryError, Entry, NewEntry, Outbox};
use orchestrator_kit::retry::is_retryable_status;
use orchestrator_proto::stage_engine::v1::{
    AddCommentRequest, AdvanceStageRequest, NotifyRequest, ReportJobFailedRequest,
};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;
use serde::{Deserialize, Serialize};
use sqlx::{Any, Transaction};

use crate::supervisor::{Supervisor, html_escape};

/// The launcher's outbox table.
pub const OUTBOX: Outbox = Outbox::new("outbox");

/// An effect of a run on a peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Effect {
    /// `UsageLedger.RecordRun` of the run's output.
    RecordRun {
        job_id: String,
        attempt: u32,
        agent: String,
        output: String,
        /// The run resumed an earlier run's CLI session (its reported cost is the session's).
        #[serde(default)]
        resumed: bool,
        /// The job's repository (for the per-repository spending ceilings); `""` in
        /// entries written before #18.
        #[serde(default)]
        repo: String,
    },
    /// `UsageLedger.FinishComment`'s line for the run, then `rest_html` (the PR, the
    /// artifacts, the notes), posted under the agent's bot with the idempotency key
    /// `launcher:{job}:{attempt}:finish`.
    FinishComment {
        job_id: String,
        attempt: u32,
        agent: String,
        rest_html: String,
    },
    /// `StageEngine.AddComment`.
    Comment {
        html: String,
        author: String,
        idempotency_key: String,
    },
    /// `StageEngine.AdvanceStage` after a success, with what the run delivered: the PR and
    /// its head after the push (0 / empty: none). An entry written before these existed
    /// (it carried a `finalizer`, ignored now) gets them looked up by stage-engine.
    AdvanceStage {
        job_id: String,
        attempt: u32,
        agent: String,
        dedupe_key: String,
        #[serde(default)]
        pr_number: u64,
        #[serde(default)]
        head_sha: String,
    },
    /// `StageEngine.Notify`: people must act (a spending ceiling reached), told once per
    /// `event_id` by stage-engine (the issue comment and the webhook).
    Notify {
        event: String,
        text: String,
        event_id: String,
    },
    /// `StageEngine.ReportJobFailed`: the job ended failed for good.
    ReportJobFailed {
        job_id: String,
        attempt: u32,
        agent: String,
        dedupe_key: String,
        outcome: String,
        reason: String,
    },
}

impl Effect {
    pub fn kind(&self) -> &'static str {
        match self {
            Effect::RecordRun { .. } => "record_run",
            Effect::FinishComment { .. } => "finish_comment",
            Effect::Comment { .. } => "comment",
            Effect::AdvanceStage { .. } => "advance_stage",
            Effect::ReportJobFailed { .. } => "report_job_failed",
            Effect::Notify { .. } => "notify",
        }
    }

    /// Effects of one work item and channel are delivered in order.
    pub fn channel(&self) -> &'static str {
        match self {
            Effect::RecordRun { .. } | Effect::FinishComment { .. } => "run",
            Effect::Comment { .. }
            | Effect::AdvanceStage { .. }
            | Effect::ReportJobFailed { .. } => "run",
            // Its own channel: a notification waits for nothing of a run, nor a run for it.
            Effect::Notify { .. } => "notify",
        }
    }

    /// The effect's key in the outbox: written twice, it is added once.
    pub fn idempotency_key(&self) -> String {
        match self {
            Effect::Comment {
                idempotency_key, ..
            } => idempotency_key.clone(),
            Effect::Notify { event_id, .. } => format!("notify:{event_id}"),
            Effect::RecordRun {
                job_id, attempt, ..
            }
            | Effect::FinishComment {
                job_id, attempt, ..
            }
            | Effect::AdvanceStage {
                job_id, attempt, ..
            }
            | Effect::ReportJobFailed {
                job_id, attempt, ..
            } => {
                format!("{}:{job_id}:{attempt}", self.kind())
            }
        }
    }
}

/// Adds `effect` for `work_item` in the caller's transaction (once per idempotency key).
pub async fn insert(
    tx: &mut Transaction<'_, Any>,
    work_item: &str,
    effect: &Effect,
) -> Result<bool, sqlx::Error> {
    let payload = serde_json::to_string(effect).map_err(|e| sqlx::Error::Encode(e.into()))?;
    let key = effect.idempotency_key();
    let (_, added) = OUTBOX
        .insert(
            tx,
            NewEntry {
                work_item,
                channel: effect.channel(),
                kind: effect.kind(),
                payload_json: &payload,
                idempotency_key: Some(&key),
            },
        )
        .await?;
    Ok(added)
}

/// The launcher's outbox dispatcher.
pub type Dispatcher = outbox::Dispatcher<Delivery>;

/// How the launcher's effects reach the peers.
pub struct Delivery {
    pub(crate) sup: Supervisor,
}

#[async_trait]
impl Deliver for Delivery {
    async fn deliver(&self, entry: &Entry) -> Result<String, DeliveryError> {
        let effect: Effect = serde_json::from_str(&entry.payload_json)
            .map_err(|e| DeliveryError::permanent(format!("undecodable payload: {e}")))?;
        let peers = &self.sup.inner.peers;
        let work_item = entry.work_item.clone();
        match effect {
            Effect::RecordRun {
                job_id,
                attempt,
                agent,
                output,
                resumed,
                repo,
            } => {
                peers
                    .record_run(RecordRunRequest {
                        job_id,
                        attempt,
                        work_item,
                        agent,
                        output,
                        resumed,
                        repo,
                    })
                    .await?;
                Ok("{}".to_owned())
            }
            Effect::FinishComment {
                job_id,
                attempt,
                agent,
                rest_html,
            } => {
                let fallback = || format!("{} done", crate::run::role_title(&agent));
                let line = match peers.finish_comment(&job_id, attempt).await {
                    Ok(t) if !t.is_empty() => t,
                    Ok(_) => fallback(),
                    // usage-ledger down: wait for it (the line carries the run's usage).
                    Err(s) if is_retryable_status(&s) => return Err(s.into()),
                    Err(s) => {
                        tracing::warn!(job_id, attempt, code = ?s.code(), error = s.message(), "usage-ledger has no finish line for the run; posting the plain one");
                        fallback()
                    }
                };
                let html = format!("<p>{}</p>{rest_html}", html_escape(&line));
                peers
                    .add_comment(AddCommentRequest {
                        work_item,
                        html,
                        // Only an agent's run has a finish comment: its own bot says it.
                        author: agent,
                        idempotency_key: format!("launcher:{job_id}:{attempt}:finish"),
                    })
                    .await?;
                Ok(serde_json::json!({ "line": line }).to_string())
            }
            Effect::Notify {
                event,
                text,
                event_id,
            } => {
                let created = peers
                    .notify(NotifyRequest {
                        work_item,
                        event,
                        text,
                        event_id,
                    })
                    .await?;
                Ok(serde_json::json!({ "created": created }).to_string())
            }
            Effect::Comment {
                html,
                author,
                idempotency_key,
            } => {
                peers
                    .add_comment(AddCommentRequest {
                        work_item,
                        html,
                        author,
                        idempotency_key,
                    })
                    .await?;
                Ok("{}".to_owned())
            }
            Effect::AdvanceStage {
                job_id,
                attempt,
                agent,
                dedupe_key,
                pr_number,
                head_sha,
            } => {
                let r = peers
                    .advance_stage(AdvanceStageRequest {
                        work_item: work_item.clone(),
                        finished_agent: agent,
                        job_id: job_id.clone(),
                        attempt,
                        dedupe_key,
                        pr_number,
                        head_sha,
                    })
                    .await?;
                let outcome = r.outcome();
                tracing::info!(
                    job_id,
                    attempt,
                    work_item,
                    outcome = outcome.as_str_name(),
                    reason = r.reason,
                    "stage advanced"
                );
                Ok(serde_json::json!({
                    "outcome": outcome.as_str_name(),
                    "reason": r.reason,
                })
                .to_string())
            }
            Effect::ReportJobFailed {
                job_id,
                attempt,
                agent,
                dedupe_key,
                outcome,
                reason,
            } => {
                let r = peers
                    .report_job_failed(ReportJobFailedRequest {
                        work_item: work_item.clone(),
                        agent,
                        job_id: job_id.clone(),
                        attempt,
                        dedupe_key,
                        outcome,
                        reason,
                    })
                    .await?;
                let answer = r.outcome();
                tracing::info!(
                    job_id,
                    attempt,
                    work_item,
                    outcome = answer.as_str_name(),
                    "job failure reported"
                );
                Ok(
                    serde_json::json!({ "outcome": answer.as_str_name(), "reason": r.reason })
                        .to_string(),
                )
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_keep_their_channels_keys_and_round_trip() {
        for (e, kind, channel, key) in [
            (
                Effect::RecordRun {
                    job_id: "j".into(),
                    attempt: 2,
                    agent: "analyst".into(),
                    output: "{}".into(),
                    resumed: true,
                    repo: "acme/app".into(),
                },
                "record_run",
                "run",
                "record_run:j:2",
            ),
            (
                Effect::FinishComment {
                    job_id: "j".into(),
                    attempt: 2,
                    agent: "analyst".into(),
                    rest_html: String::new(),
                },
                "finish_comment",
                "run",
                "finish_comment:j:2",
            ),
            (
                Effect::Comment {
                    html: "<p>x</p>".into(),
                    author: "stream".into(),
                    idempotency_key: "launcher:j:start".into(),
                },
                "comment",
                "run",
                "launcher:j:start",
            ),
            (
                Effect::AdvanceStage {
                    job_id: "j".into(),
                    attempt: 2,
                    agent: "deployer".into(),
                    dedupe_key: "d".into(),
                    pr_number: 7,
                    head_sha: "abc".into(),
                },
                "advance_stage",
                "run",
                "advance_stage:j:2",
            ),
            (
                Effect::ReportJobFailed {
                    job_id: "j".into(),
                    attempt: 2,
                    agent: "analyst".into(),
                    dedupe_key: "d".into(),
                    outcome: "bad_input".into(),
                    reason: "missing prompt".into(),
                },
                "report_job_failed",
                "run",
                "report_job_failed:j:2",
            ),
        ] {
            assert_eq!(
                (e.kind(), e.channel(), e.idempotency_key().as_str()),
                (kind, channel, key)
            );
            let json = serde_json::to_string(&e).expect("encode");
            assert_eq!(serde_json::from_str::<Effect>(&json).expect("decode"), e);
        }
    }
}
