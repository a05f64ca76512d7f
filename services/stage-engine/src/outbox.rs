//! The outbox: side effects written in the transaction of the state change that causes
//! them, then delivered by a background dispatcher with retries and backoff. A transition
//! is never half-applied (the effects are in the same commit) and never lost (an effect
//! stays `pending` until its receiver takes it). Entries of one (work item, channel) go out
//! in order; channels do not wait for each other, so a Plane outage does not hold up the
//! launcher. Each effect is idempotent at its receiver: comments carry the entry id as
//! their idempotency key, enqueues a dedupe key, Arm is idempotent per work item.

use std::sync::Arc;
use std::time::Duration;

use orchestrator_kit::Db;
use orchestrator_kit::time::now_ms;
use orchestrator_proto::launcher::v1::{CancelJobRequest, EnqueueRequest, JobKind};
use orchestrator_proto::post_deploy::v1::ArmRequest;
use orchestrator_tracker::{IssueRef, Tracker, TrackerKind, move_to_done};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::OutboxConfig;
use crate::peers::Peers;
use crate::store;

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
}

impl Effect {
    pub fn kind(&self) -> &'static str {
        match self {
            Effect::Comment { .. } => "comment",
            Effect::SetStateDone => "set_state_done",
            Effect::UsageSummary => "usage_summary",
            Effect::Enqueue { .. } => "enqueue",
            Effect::ArmWatch { .. } => "arm_watch",
            Effect::CancelJob { .. } => "cancel_job",
        }
    }

    /// Effects of one channel are delivered in order.
    pub fn channel(&self) -> &'static str {
        match self {
            Effect::Comment { .. } | Effect::SetStateDone | Effect::UsageSummary => "tracker",
            Effect::Enqueue { .. } | Effect::CancelJob { .. } => "launcher",
            Effect::ArmWatch { .. } => "post_deploy",
        }
    }
}

/// An outbox entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub work_item: String,
    pub channel: String,
    pub kind: String,
    pub payload_json: String,
    pub state: String,
    pub attempts: u32,
    pub next_attempt_at_ms: i64,
    pub last_error: String,
    pub result_json: String,
    pub created_at_ms: i64,
    pub delivered_at_ms: i64,
}

const ENTRY_COLUMNS: &str = "id, work_item, channel, kind, payload_json, state, attempts, next_attempt_at_ms, \
     last_error, result_json, created_at_ms, delivered_at_ms";

fn entry_from_row(r: &AnyRow) -> Result<Entry, sqlx::Error> {
    Ok(Entry {
        id: r.try_get("id")?,
        work_item: r.try_get("work_item")?,
        channel: r.try_get("channel")?,
        kind: r.try_get("kind")?,
        payload_json: r.try_get("payload_json")?,
        state: r.try_get("state")?,
        attempts: u32::try_from(r.try_get::<i64, _>("attempts")?.max(0)).unwrap_or(u32::MAX),
        next_attempt_at_ms: r.try_get("next_attempt_at_ms")?,
        last_error: r.try_get("last_error")?,
        result_json: r.try_get("result_json")?,
        created_at_ms: r.try_get("created_at_ms")?,
        delivered_at_ms: r.try_get("delivered_at_ms")?,
    })
}

/// A new entry id: uuid v7, which sorts by creation (the delivery order).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Adds `effect` for `work_item`, in the caller's transaction. With an idempotency key, a
/// second insert with the same key adds nothing and returns false.
pub async fn insert(
    tx: &mut Transaction<'_, Any>,
    work_item: &str,
    effect: &Effect,
    idempotency_key: Option<&str>,
) -> Result<(String, bool), sqlx::Error> {
    let id = new_id();
    let payload = serde_json::to_string(effect).map_err(|e| sqlx::Error::Encode(e.into()))?;
    let now = now_ms();
    let done = sqlx::query(
        "INSERT INTO outbox (id, work_item, channel, kind, payload_json, idempotency_key, state, attempts, \
         next_attempt_at_ms, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&id)
    .bind(work_item)
    .bind(effect.channel())
    .bind(effect.kind())
    .bind(payload)
    .bind(idempotency_key)
    .bind(now)
    .execute(&mut **tx)
    .await?;
    Ok((id, done.rows_affected() == 1))
}

/// The entry that holds `idempotency_key`.
pub async fn by_idempotency_key(db: &Db, key: &str) -> Result<Option<Entry>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTRY_COLUMNS} FROM outbox WHERE idempotency_key = $1"
    )))
    .bind(key)
    .fetch_optional(&db.pool)
    .await?
    .as_ref()
    .map(entry_from_row)
    .transpose()
}

/// Lists entries, oldest first; empty filters mean any.
pub async fn list(
    db: &Db,
    work_item: &str,
    state: &str,
    limit: u32,
) -> Result<Vec<Entry>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ENTRY_COLUMNS} FROM outbox WHERE ($1 = '' OR work_item = $1) AND ($2 = '' OR state = $2) \
         ORDER BY id LIMIT $3"
    )))
    .bind(work_item)
    .bind(state)
    .bind(i64::from(limit))
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(entry_from_row).collect()
}

/// Puts `failed` entries back to `pending`, due now: the one with `id`, or (with an empty
/// id) every failed entry of `work_item`. Returns how many.
pub async fn retry_failed(db: &Db, id: &str, work_item: &str) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE outbox SET state = 'pending', next_attempt_at_ms = $1, claimed_until_ms = 0 \
         WHERE state = 'failed' AND (($2 <> '' AND id = $2) OR ($2 = '' AND work_item = $3))",
    )
    .bind(now_ms())
    .bind(id)
    .bind(work_item)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected())
}

/// Why a delivery failed, and whether to try again.
#[derive(Debug)]
pub struct DeliveryError {
    pub transient: bool,
    pub message: String,
}

impl DeliveryError {
    fn transient(message: impl Into<String>) -> Self {
        DeliveryError {
            transient: true,
            message: message.into(),
        }
    }

    fn permanent(message: impl Into<String>) -> Self {
        DeliveryError {
            transient: false,
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
        DeliveryError {
            transient: orchestrator_kit::retry::is_retryable_status(&s),
            message: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

impl From<sqlx::Error> for DeliveryError {
    fn from(e: sqlx::Error) -> Self {
        DeliveryError::transient(format!("storage: {e}"))
    }
}

/// Delivers the outbox.
#[derive(Clone)]
pub struct Dispatcher {
    pub(crate) db: Db,
    pub(crate) tracker: Arc<dyn Tracker>,
    pub(crate) peers: Arc<dyn Peers>,
    pub(crate) config: OutboxConfig,
    pub(crate) notify: Arc<Notify>,
    /// `PLANE_PROJECT_ID`, for work items created without a project.
    pub(crate) default_project: Option<String>,
}

impl Dispatcher {
    /// Runs until `shutdown`: a pass whenever a state change wakes it, or every poll
    /// interval. A pass never fails as a whole: each entry's error is recorded on it.
    pub async fn run(self, shutdown: CancellationToken) {
        tracing::info!("outbox dispatcher started");
        loop {
            loop {
                match self.deliver_due().await {
                    // A full batch: more may be due at once. Anything less: all due entries
                    // were attempted (failures wait out their backoff), so wait for a wake-up.
                    Ok(n) if n >= self.config.batch as usize && !shutdown.is_cancelled() => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(error = %e, "outbox pass failed");
                        break;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.notify.notified() => {}
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
        tracing::info!("outbox dispatcher stopped");
    }

    /// Delivers the entries that are due (one per work item and channel, the oldest), all
    /// at once; returns how many were attempted.
    pub async fn deliver_due(&self) -> Result<usize, sqlx::Error> {
        let now = now_ms();
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENTRY_COLUMNS} FROM outbox o \
             WHERE ((o.state = 'pending' AND o.next_attempt_at_ms <= $1) \
                 OR (o.state = 'delivering' AND o.claimed_until_ms <= $1)) \
             AND NOT EXISTS (SELECT 1 FROM outbox p WHERE p.work_item = o.work_item AND p.channel = o.channel \
                 AND p.state IN ('pending', 'delivering') AND p.id < o.id) \
             ORDER BY o.id LIMIT $2"
        )))
        .bind(now)
        .bind(i64::from(self.config.batch))
        .fetch_all(&self.db.pool)
        .await?;
        let entries: Vec<Entry> = rows.iter().map(entry_from_row).collect::<Result<_, _>>()?;
        let mut tasks = tokio::task::JoinSet::new();
        let mut attempted = 0;
        for entry in entries {
            let claim_until =
                now_ms() + i64::try_from(self.config.claim_ttl.as_millis()).unwrap_or(i64::MAX);
            let claimed = sqlx::query(
                "UPDATE outbox SET state = 'delivering', claimed_until_ms = $1, attempts = attempts + 1 \
                 WHERE id = $2 AND (state = 'pending' OR (state = 'delivering' AND claimed_until_ms <= $3))",
            )
            .bind(claim_until)
            .bind(&entry.id)
            .bind(now)
            .execute(&self.db.pool)
            .await?
            .rows_affected()
                == 1;
            if !claimed {
                continue;
            }
            attempted += 1;
            let this = self.clone();
            tasks.spawn(async move { this.deliver_and_record(entry).await });
        }
        while let Some(joined) = tasks.join_next().await {
            if let Err(e) = joined {
                tracing::error!(error = %e, "an outbox delivery panicked");
            }
        }
        Ok(attempted)
    }

    async fn deliver_and_record(&self, entry: Entry) {
        let attempts = entry.attempts + 1;
        let result = self.deliver(&entry).await;
        let now = now_ms();
        let recorded = match result {
            Ok(result_json) => {
                tracing::debug!(
                    id = entry.id,
                    work_item = entry.work_item,
                    kind = entry.kind,
                    attempts,
                    "outbox entry delivered"
                );
                sqlx::query(
                    "UPDATE outbox SET state = 'delivered', delivered_at_ms = $1, last_error = '', result_json = $2, \
                     claimed_until_ms = 0 WHERE id = $3",
                )
                .bind(now)
                .bind(result_json)
                .bind(&entry.id)
                .execute(&self.db.pool)
                .await
            }
            Err(e) => {
                let give_up = !e.transient
                    || (self.config.max_attempts > 0 && attempts >= self.config.max_attempts);
                if give_up {
                    tracing::error!(
                        id = entry.id,
                        work_item = entry.work_item,
                        kind = entry.kind,
                        attempts,
                        error = e.message,
                        "outbox entry failed for good"
                    );
                    sqlx::query("UPDATE outbox SET state = 'failed', last_error = $1, claimed_until_ms = 0 WHERE id = $2")
                        .bind(&e.message)
                        .bind(&entry.id)
                        .execute(&self.db.pool)
                        .await
                } else {
                    let delay = backoff(&self.config, attempts);
                    tracing::warn!(
                        id = entry.id,
                        work_item = entry.work_item,
                        kind = entry.kind,
                        attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        error = e.message,
                        "outbox delivery failed; will retry"
                    );
                    sqlx::query(
                        "UPDATE outbox SET state = 'pending', last_error = $1, next_attempt_at_ms = $2, claimed_until_ms = 0 \
                         WHERE id = $3",
                    )
                    .bind(&e.message)
                    .bind(now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX))
                    .bind(&entry.id)
                    .execute(&self.db.pool)
                    .await
                }
            }
        };
        if let Err(e) = recorded {
            // The claim lapses and the entry is delivered again: every receiver is idempotent.
            tracing::error!(id = entry.id, error = %e, "cannot record an outbox delivery");
        }
    }

    /// Delivers one entry; returns what to keep as its result.
    async fn deliver(&self, entry: &Entry) -> Result<String, DeliveryError> {
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

/// `min(base * 2^(attempts-1), max)`.
pub fn backoff(config: &OutboxConfig, attempts: u32) -> Duration {
    let exp = attempts.saturating_sub(1).min(30);
    config
        .backoff_base
        .saturating_mul(1u32 << exp)
        .min(config.backoff_max)
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
    fn entry_ids_sort_in_creation_order() {
        // The delivery order is the id order: ids made one after the other must sort so,
        // even within one millisecond.
        let ids: Vec<String> = (0..10_000).map(|_| new_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn backoff_doubles_up_to_the_max() {
        let c = OutboxConfig {
            poll: Duration::from_secs(1),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_millis(1_000),
            max_attempts: 0,
            claim_ttl: Duration::from_secs(1),
            batch: 1,
        };
        let got: Vec<u128> = (1..=6).map(|a| backoff(&c, a).as_millis()).collect();
        assert_eq!(got, vec![100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(backoff(&c, 500).as_millis(), 1_000);
    }

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
