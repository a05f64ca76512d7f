//! stage-engine's outbox: its effects and how each is delivered, over the kit's one outbox
//! mechanism ([`orchestrator_kit::outbox`]): side effects written in the transaction of the
//! state change that causes them, then delivered by a background dispatcher with retries
//! and backoff. A transition
//! is never half-applied (the effects are in the same commit) and never lost (an effect
//! stays `pending` until its receiver takes it). Entries of one (work item, channel) go out
//! in order; channels do not wait for each other, so a Plane outage does not hold up the
//! launcher. Each effect is idempotent at its receiver: comments carry the entry id as
//! their idempotency key, enqueues a dedupe key, Arm is idempotent per work item.

use std::sync::Arc;

use async_trait::async_trait;
use orchestrator_kit::Db;
use orchestrator_kit::outbox::{self, Deliver, NewEntry, Outbox};
use orchestrator_kit::time::now_ms;
use orchestrator_proto::launcher::v1::{CancelJobRequest, EnqueueRequest, JobKind};
use orchestrator_proto::post_deploy::v1::ArmRequest;
use orchestrator_tracker::{IssueRef, Tracker, TrackerKind, move_to_done};
use serde::{Deserialize, Serialize};
use sqlx::{Any, Transaction};

use crate::peers::Peers;
use crate::store;

pub use orchestrator_kit::outbox::{Entry, new_id};

/// The launcher's reserved job that ticks a post-deploy watch until it is over.
pub const POST_DEPLOY_MONITOR: &str = "post-deploy-monitor";

/// A side effect.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Effect {
    /// A comment on the tracker issue, under `author`'s bot.
    Comment { html: String, author: String },
    /// The tracker issue to its terminal Done state.
    SetStateDone,
    /// usage-ledger's summary of the work item, posted as a comment by the stream bot.
    UsageSummary,
    /// `Launcher.Enqueue` of `agent` for `stage`.
    Enqueue {
        repo: String,
        agent: String,
        stage: String,
        dedupe_key: String,
        payload_json: String,
    },
    /// `Launcher.Enqueue` of a reserved (no-LLM) job: the deploy-finalizer after the
    /// deployer's verdict completed the item, pinned to the head the deployer delivered.
    /// Not the item's latest job: the stage is over, nothing waits for its answer.
    EnqueueReserved {
        repo: String,
        agent: String,
        stage: String,
        dedupe_key: String,
        payload_json: String,
    },
    /// `PostDeploy.Arm` after `deploy -> done`, then (when armed) `Launcher.Enqueue` of the
    /// [`POST_DEPLOY_MONITOR`] that ticks the watch. `previous_sha` (what production ran
    /// before) may be empty: entries written before it existed lack it.
    ArmWatch {
        repo: String,
        deployed_sha: String,
        #[serde(default)]
        previous_sha: String,
    },
    /// `Launcher.CancelJob` of the item's job: `job_id` when its Enqueue answer was
    /// recorded, else the job found by `dedupe_key` (the Enqueue goes out first: same
    /// channel). No job, or one already ended, is nothing to cancel.
    CancelJob {
        job_id: String,
        dedupe_key: String,
        reason: String,
    },
    /// The outgoing notify webhook (`notify`): a human must act.
    Notify {
        event_id: String,
        event: String,
        text: String,
    },
}

impl Effect {
    pub fn kind(&self) -> &'static str {
        match self {
            Effect::Comment { .. } => "comment",
            Effect::SetStateDone => "set_state_done",
            Effect::UsageSummary => "usage_summary",
            Effect::Enqueue { .. } => "enqueue",
            Effect::EnqueueReserved { .. } => "enqueue_reserved",
            Effect::ArmWatch { .. } => "arm_watch",
            Effect::CancelJob { .. } => "cancel_job",
            Effect::Notify { .. } => "notify",
        }
    }

    /// Effects of one channel are delivered in order.
    pub fn channel(&self) -> &'static str {
        match self {
            Effect::Comment { .. } | Effect::SetStateDone | Effect::UsageSummary => "tracker",
            Effect::Enqueue { .. } | Effect::EnqueueReserved { .. } | Effect::CancelJob { .. } => {
                "launcher"
            }
            Effect::ArmWatch { .. } => "post_deploy",
            // Its own channel: an endpoint that is down holds back nothing else.
            Effect::Notify { .. } => "notify",
        }
    }
}

/// stage-engine's outbox table (the kit's one mechanism, [`orchestrator_kit::outbox`]).
pub const OUTBOX: Outbox = Outbox::new("outbox");

/// Adds `effect` for `work_item`, in the caller's transaction. With an idempotency key, a
/// second insert with the same key adds nothing and returns false.
pub async fn insert(
    tx: &mut Transaction<'_, Any>,
    work_item: &str,
    effect: &Effect,
    idempotency_key: Option<&str>,
) -> Result<(String, bool), sqlx::Error> {
    let payload = serde_json::to_string(effect).map_err(|e| sqlx::Error::Encode(e.into()))?;
    OUTBOX
        .insert(
            tx,
            NewEntry {
                work_item,
                channel: effect.channel(),
                kind: effect.kind(),
                payload_json: &payload,
                idempotency_key,
            },
        )
        .await
}

/// The entry that holds `idempotency_key`.
pub async fn by_idempotency_key(db: &Db, key: &str) -> Result<Option<Entry>, sqlx::Error> {
    OUTBOX.by_idempotency_key(db, key).await
}

/// Lists entries, oldest first; empty filters mean any.
pub async fn list(
    db: &Db,
    work_item: &str,
    state: &str,
    limit: u32,
) -> Result<Vec<Entry>, sqlx::Error> {
    OUTBOX.list(db, work_item, state, limit).await
}

/// Puts `failed` entries back to `pending`, due now: the one with `id`, or (with an empty
/// id) every failed entry of `work_item`. Returns how many.
pub async fn retry_failed(db: &Db, id: &str, work_item: &str) -> Result<u64, sqlx::Error> {
    OUTBOX.retry_failed(db, id, work_item).await
}

/// Why a delivery failed, and whether to try again (the tracker's errors and the peers'
/// answers, converted with `?`).
#[derive(Debug)]
pub struct DeliveryError {
    pub transient: bool,
    pub message: String,
}

impl DeliveryError {
    pub(crate) fn permanent(message: impl Into<String>) -> Self {
        DeliveryError {
            transient: false,
            message: message.into(),
        }
    }

    pub(crate) fn transient(message: impl Into<String>) -> Self {
        DeliveryError {
            transient: true,
            message: message.into(),
        }
    }
}

impl From<orchestrator_tracker::TrackerError> for DeliveryError {
    fn from(e: orchestrator_tracker::TrackerError) -> Self {
        DeliveryError {
            transient: e.is_transient(),
            message: e.to_string(),
        }
    }
}

impl From<tonic::Status> for DeliveryError {
    fn from(s: tonic::Status) -> Self {
        let e = outbox::DeliveryError::from(s);
        DeliveryError {
            transient: e.retryable,
            message: e.message,
        }
    }
}

impl From<sqlx::Error> for DeliveryError {
    fn from(e: sqlx::Error) -> Self {
        DeliveryError {
            transient: true,
            message: format!("storage: {e}"),
        }
    }
}

impl From<DeliveryError> for outbox::DeliveryError {
    fn from(e: DeliveryError) -> Self {
        outbox::DeliveryError {
            retryable: e.transient,
            message: e.message,
        }
    }
}

/// Delivers stage-engine's outbox.
pub type Dispatcher = outbox::Dispatcher<Delivery>;

/// How stage-engine's effects reach their receivers.
pub struct Delivery {
    pub(crate) db: Db,
    pub(crate) tracker: Arc<dyn Tracker>,
    pub(crate) peers: Arc<dyn Peers>,
    /// `PLANE_PROJECT_ID`, for work items created without a project.
    pub(crate) default_project: Option<String>,
    pub(crate) notify: crate::notify::NotifyConfig,
    pub(crate) http: reqwest::Client,
}

#[async_trait]
impl Deliver for Delivery {
    async fn deliver(&self, entry: &Entry) -> Result<String, outbox::DeliveryError> {
        Ok(self.deliver_effect(entry).await?)
    }
}

impl Delivery {
    /// Delivers one entry; returns what to keep as its result.
    async fn deliver_effect(&self, entry: &Entry) -> Result<String, DeliveryError> {
        let effect: Effect = serde_json::from_str(&entry.payload_json)
            .map_err(|e| DeliveryError::permanent(format!("undecodable payload: {e}")))?;
        match effect {
            Effect::Comment { html, author } => {
                let issue = self.issue_of(&entry.work_item).await?;
                let posted = self
                    .tracker
                    .add_comment(&issue, &html, &author, &entry.id)
                    .await?;
                Ok(
                    serde_json::json!({"comment_id": posted.id, "duplicate": posted.duplicate})
                        .to_string(),
                )
            }
            Effect::UsageSummary => {
                let text = self.peers.work_item_summary(&entry.work_item).await?;
                let issue = self.issue_of(&entry.work_item).await?;
                let html = summary_html(&text);
                let posted = self
                    .tracker
                    .add_comment(&issue, &html, "stream", &entry.id)
                    .await?;
                Ok(
                    serde_json::json!({"comment_id": posted.id, "duplicate": posted.duplicate})
                        .to_string(),
                )
            }
            Effect::SetStateDone => {
                let issue = self.issue_of(&entry.work_item).await?;
                let state = move_to_done(self.tracker.as_ref(), &issue).await?;
                Ok(serde_json::json!({"state_id": state.id, "state": state.name}).to_string())
            }
            Effect::Enqueue {
                repo,
                agent,
                stage,
                dedupe_key,
                payload_json,
            } => {
                let resp = self
                    .peers
                    .enqueue(EnqueueRequest {
                        work_item: entry.work_item.clone(),
                        repo,
                        agent: agent.clone(),
                        stage,
                        kind: JobKind::Llm as i32,
                        payload_json,
                        dedupe_key: dedupe_key.clone(),
                        not_before_ms: 0,
                        max_attempts: 0,
                    })
                    .await?;
                let job_id = resp.job.map(|j| j.id).unwrap_or_default();
                if !job_id.is_empty() {
                    store::record_latest_job(&self.db, &entry.work_item, &dedupe_key, &job_id)
                        .await?;
                }
                tracing::info!(
                    work_item = entry.work_item,
                    agent,
                    job_id,
                    created = resp.created,
                    "agent enqueued"
                );
                Ok(serde_json::json!({"job_id": job_id, "created": resp.created}).to_string())
            }
            Effect::EnqueueReserved {
                repo,
                agent,
                stage,
                dedupe_key,
                payload_json,
            } => {
                let resp = self
                    .peers
                    .enqueue(EnqueueRequest {
                        work_item: entry.work_item.clone(),
                        repo,
                        agent: agent.clone(),
                        stage,
                        kind: JobKind::Reserved as i32,
                        payload_json,
                        dedupe_key,
                        not_before_ms: 0,
                        max_attempts: 0,
                    })
                    .await?;
                let job_id = resp.job.map(|j| j.id).unwrap_or_default();
                tracing::info!(
                    work_item = entry.work_item,
                    agent,
                    job_id,
                    created = resp.created,
                    "reserved job enqueued"
                );
                Ok(serde_json::json!({"job_id": job_id, "created": resp.created}).to_string())
            }
            Effect::ArmWatch {
                repo,
                deployed_sha,
                previous_sha,
            } => {
                let resp = self
                    .peers
                    .arm(ArmRequest {
                        work_item: entry.work_item.clone(),
                        repo: repo.clone(),
                        deployed_sha,
                        previous_sha,
                    })
                    .await?;
                // The watch is ticked by the launcher's reserved post-deploy-monitor job,
                // first after `next_tick_in_s`. Idempotent with Arm: a redelivered entry
                // arms the same watch and enqueues under the same dedupe key.
                let mut monitor = String::new();
                if resp.armed {
                    let first = i64::from(resp.next_tick_in_s).saturating_mul(1000);
                    let queued = self
                        .peers
                        .enqueue(EnqueueRequest {
                            work_item: entry.work_item.clone(),
                            repo: repo.clone(),
                            agent: POST_DEPLOY_MONITOR.to_owned(),
                            stage: "done".to_owned(),
                            kind: JobKind::Reserved as i32,
                            payload_json: "{}".to_owned(),
                            dedupe_key: format!("{POST_DEPLOY_MONITOR}:{}", entry.id),
                            not_before_ms: now_ms().saturating_add(first),
                            max_attempts: 0,
                        })
                        .await?;
                    monitor = queued.job.map(|j| j.id).unwrap_or_default();
                }
                Ok(serde_json::json!({"armed": resp.armed, "created": resp.created, "reason": resp.reason, "monitor_job_id": monitor}).to_string())
            }
            Effect::Notify {
                event_id,
                event,
                text,
            } => {
                crate::notify::send(
                    &self.http,
                    &self.notify,
                    &entry.work_item,
                    &event_id,
                    &event,
                    &text,
                )
                .await
            }
            Effect::CancelJob {
                job_id,
                dedupe_key,
                reason,
            } => {
                let job_id = if job_id.is_empty() && !dedupe_key.is_empty() {
                    let jobs = self.peers.jobs_of(&entry.work_item).await?;
                    match jobs.into_iter().find(|j| j.dedupe_key == dedupe_key) {
                        Some(j) => j.id,
                        None => String::new(),
                    }
                } else {
                    job_id
                };
                if job_id.is_empty() {
                    return Ok(serde_json::json!({"cancelled": false, "job_id": ""}).to_string());
                }
                let cancelled = match self
                    .peers
                    .cancel_job(CancelJobRequest {
                        job_id: job_id.clone(),
                        reason,
                    })
                    .await
                {
                    Ok(r) => r.cancelled,
                    // Gone, or already ended: nothing left to cancel.
                    Err(s)
                        if matches!(
                            s.code(),
                            tonic::Code::NotFound | tonic::Code::FailedPrecondition
                        ) =>
                    {
                        false
                    }
                    Err(s) => return Err(s.into()),
                };
                tracing::info!(
                    work_item = entry.work_item,
                    job_id,
                    cancelled,
                    "job cancel delivered"
                );
                Ok(serde_json::json!({"cancelled": cancelled, "job_id": job_id}).to_string())
            }
        }
    }

    /// The tracker issue of a work item; a Plane project unknown so far is looked up by key
    /// (then remembered).
    async fn issue_of(&self, key: &str) -> Result<IssueRef, DeliveryError> {
        let item = store::get(&self.db, key)
            .await?
            .ok_or_else(|| DeliveryError::permanent(format!("work item {key} is gone")))?;
        let mut project = item.tracker_project_id.clone();
        if project.is_empty() && self.tracker.kind() == TrackerKind::Plane {
            project = match &self.default_project {
                Some(p) => p.clone(),
                None => {
                    let found = self.tracker.find_issue(key).await?.ok_or_else(|| {
                        DeliveryError::permanent(format!(
                            "{key} is not in Plane and the work item has no project id"
                        ))
                    })?;
                    found.project_id
                }
            };
            store::set_tracker_project(&self.db, key, &project).await?;
        }
        Ok(IssueRef {
            project_id: project,
            issue_id: item.tracker_issue_id,
        })
    }
}

/// The usage summary's text as HTML: its first line as a heading, the rest as a list.
pub fn summary_html(text: &str) -> String {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let mut html = format!(
        "<p><strong>{}</strong></p><ul>",
        escape(lines.next().unwrap_or("Usage"))
    );
    for l in lines {
        html.push_str(&format!("<li>{}</li>", escape(l)));
    }
    html.push_str("</ul>");
    html
}

/// Escapes text for HTML.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn effects_keep_their_channels_and_round_trip() {
        for (e, kind, channel) in [
            (
                Effect::Comment {
                    html: "<p>x</p>".into(),
                    author: "stream".into(),
                },
                "comment",
                "tracker",
            ),
            (Effect::SetStateDone, "set_state_done", "tracker"),
            (Effect::UsageSummary, "usage_summary", "tracker"),
            (
                Effect::Enqueue {
                    repo: "a/b".into(),
                    agent: "developer".into(),
                    stage: "development".into(),
                    dedupe_key: "k".into(),
                    payload_json: "{}".into(),
                },
                "enqueue",
                "launcher",
            ),
            (
                Effect::EnqueueReserved {
                    repo: "a/b".into(),
                    agent: "deploy-finalizer".into(),
                    stage: "deploy".into(),
                    dedupe_key: "deploy-finalizer:j-1".into(),
                    payload_json: "{}".into(),
                },
                "enqueue_reserved",
                "launcher",
            ),
            (
                Effect::ArmWatch {
                    repo: "a/b".into(),
                    deployed_sha: "abc".into(),
                    previous_sha: String::new(),
                },
                "arm_watch",
                "post_deploy",
            ),
            (
                Effect::CancelJob {
                    job_id: "j-1".into(),
                    dedupe_key: "k".into(),
                    reason: "cancelled by ada".into(),
                },
                "cancel_job",
                "launcher",
            ),
        ] {
            assert_eq!((e.kind(), e.channel()), (kind, channel));
            let json = serde_json::to_string(&e).expect("encode");
            assert_eq!(serde_json::from_str::<Effect>(&json).expect("decode"), e);
        }
    }

    #[test]
    fn summaries_become_escaped_html() {
        assert_eq!(
            summary_html("Usage for ORCH-1\nDeveloper · 1 run · <b>\n\nTotal · 1 run"),
            "<p><strong>Usage for ORCH-1</strong></p><ul><li>Developer · 1 run · &lt;b&gt;</li><li>Total · 1 run</li></ul>"
        );
    }
}
