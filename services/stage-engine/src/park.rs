//! Parking and resuming, beside the ONE `advance_stage`: a job that failed for good parks
//! its item `blocked` with the reason and the next step (`report_job_failed`); a human's
//! `retry` enqueues the stage's agent again with a fresh budget; `cancel` ends the item and
//! its job. Each is one guarded transaction holding the row, its transition and its
//! effects (a comment to a human, an enqueue, a job cancel), like `advance_stage`.

use orchestrator_kit::time::now_ms;

use crate::engine::{Advanced, Applied, Engine, JobRef, blocked_reason, dedupe_key, unchanged};
use crate::error::EngineError;
use crate::outbox::{self, Effect, escape};
use crate::pipeline::{Outcome, Stage, Status, get_agent_for_stage};
use crate::store::{self, ApprovalRow, TransitionRow, WorkItemRow};

/// The launcher's reserved job that merges the deployed PR after `deploy -> done`.
pub const DEPLOY_FINALIZER: &str = "deploy-finalizer";

/// A launcher job that ended failed for good.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FailedJob {
    /// The agent, or the reserved job's name.
    pub agent: String,
    pub job: JobRef,
    /// The launcher's outcome (permanent, timeout, push_failed, ...).
    pub outcome: String,
    pub reason: String,
}

/// A change decided here (not by `decide`): the new row, its audit line and its effects.
/// `reviews` writes its changes the same way.
pub(crate) struct Change {
    pub(crate) transition_id: String,
    pub(crate) next: WorkItemRow,
    pub(crate) outcome: Outcome,
    pub(crate) cause: String,
    pub(crate) finished_agent: String,
    /// The job whose end this applies (consumed: the same end twice changes nothing).
    pub(crate) job: Option<JobRef>,
    /// A human's command, recorded by its comment id (a repeat changes nothing).
    pub(crate) command: Option<(String, String)>,
    pub(crate) effects: Vec<Effect>,
}

pub(crate) fn stream_comment(html: String) -> Effect {
    Effect::Comment {
        html,
        author: "stream".to_owned(),
    }
}

impl Engine {
    /// `ReportJobFailed`: the item's expected job failed for good, so the item parks as
    /// `blocked` with the reason and the next step, and a human is told. A duplicate report
    /// (the same job), or a job that is not the item's latest, changes nothing.
    ///
    /// A [`DEPLOY_FINALIZER`] runs after `deploy -> done`; when its merge fails for good the
    /// item goes back to `deploy`, blocked: a retry then runs the deployer again, whose
    /// SUCCESS verdict completes the item again and enqueues a new finalizer.
    #[tracing::instrument(skip_all, fields(work_item = key, agent = failed.agent, job_id = failed.job.job_id))]
    pub async fn report_job_failed(
        &self,
        key: &str,
        failed: &FailedJob,
    ) -> Result<Advanced, EngineError> {
        for _ in 0..5 {
            let item = self.get_item(key).await?;
            if let Some(reason) = self.failure_refusal(&item, failed).await? {
                tracing::info!(reason, "failed job changes nothing");
                return Ok(unchanged(item, reason));
            }
            let what = match (failed.outcome.trim(), failed.reason.trim()) {
                ("", "") => "no reason given".to_owned(),
                (o, "") => o.to_owned(),
                ("", r) => r.to_owned(),
                (o, r) => format!("{o}: {r}"),
            };
            let finalizer = failed.agent == DEPLOY_FINALIZER;
            let (stage, why) = if finalizer {
                (
                    Stage::Deploy,
                    format!(
                        "the deploy succeeded but the deploy-finalizer's merge (job {}) failed for good ({what}); a retry runs the deployer again",
                        failed.job.job_id
                    ),
                )
            } else {
                (
                    item.stage,
                    format!(
                        "the {}'s job {} failed for good ({what})",
                        failed.agent, failed.job.job_id
                    ),
                )
            };
            let mut next = item.clone();
            next.stage = stage;
            next.status = Status::Blocked;
            next.expected_agent = String::new();
            next.expected_dedupe_key = String::new();
            next.latest_job_id = String::new();
            next.status_reason = blocked_reason(key, &why);
            let html = format!(
                "<p>Blocked at <strong>{stage}</strong>: {}.</p><p>Fix the cause, then reply <code>:retry:</code> here or run <code>orchestrator item retry {}</code>.</p>",
                escape(&why),
                escape(key)
            );
            let change = Change {
                transition_id: outbox::new_id(),
                next,
                outcome: Outcome::Blocked,
                cause: why.clone(),
                finished_agent: failed.agent.clone(),
                job: Some(failed.job.clone()),
                command: None,
                effects: vec![stream_comment(html)],
            };
            match self.commit(&item, change).await? {
                Applied::Done(next) => {
                    tracing::info!(reason = why, "work item blocked: its job failed");
                    return Ok(Advanced {
                        item: *next,
                        outcome: Outcome::Blocked,
                        qg: Vec::new(),
                        enqueued_agent: None,
                        reason: why,
                    });
                }
                Applied::JobAlreadyConsumed => {
                    let item = self.get_item(key).await?;
                    return Ok(unchanged(
                        item,
                        format!("job {} was already applied", failed.job.job_id),
                    ));
                }
                Applied::Moved => continue,
            }
        }
        Err(EngineError::Busy(key.to_owned()))
    }

    /// Why a failed job must not park the item, if it must not.
    async fn failure_refusal(
        &self,
        item: &WorkItemRow,
        failed: &FailedJob,
    ) -> Result<Option<String>, EngineError> {
        if store::job_consumed(&self.db, &failed.job.job_id).await? {
            return Ok(Some(format!(
                "job {} was already applied",
                failed.job.job_id
            )));
        }
        if failed.agent == DEPLOY_FINALIZER {
            if item.status != Status::Done {
                return Ok(Some(format!(
                    "a deploy-finalizer runs after done; {} is {}",
                    item.key, item.status
                )));
            }
            // Its dedupe key names the deployer job whose verdict completed the item.
            if let Some(deployer) = failed.job.dedupe_key.strip_prefix("deploy-finalizer:") {
                let applied = store::consumed_job(&self.db, deployer).await?;
                if applied.as_ref().map(|(w, o)| (w.as_str(), o.as_str()))
                    != Some((item.key.as_str(), Outcome::Done.as_str()))
                {
                    return Ok(Some(format!(
                        "job {} does not finalize the deploy that completed {}",
                        failed.job.job_id, item.key
                    )));
                }
            }
            return Ok(None);
        }
        if item.status != Status::Active {
            return Ok(Some(format!(
                "{} is {}: a failed job changes nothing",
                item.key, item.status
            )));
        }
        if !item.expected_agent.is_empty() && failed.agent != item.expected_agent {
            return Ok(Some(format!(
                "'{}' is not the agent {} waits for ({})",
                failed.agent, item.key, item.expected_agent
            )));
        }
        self.job_refusal(item, &failed.job).await
    }

    /// `Retry`: a blocked item's stage runs again — its agent enqueued under a new dedupe
    /// key, with a fresh stage-retry and rollback budget (as a human's `:approved:` on a
    /// blocked item gives). Only a human retries; a repeat of the same comment changes
    /// nothing; an item that is not blocked is a precondition error.
    #[tracing::instrument(skip_all, fields(work_item = key, author))]
    pub async fn retry(
        &self,
        key: &str,
        author: &str,
        comment_id: &str,
    ) -> Result<Advanced, EngineError> {
        for _ in 0..5 {
            let item = self.get_item(key).await?;
            if self.config.is_bot(author) {
                return Ok(unchanged(
                    item,
                    format!("'{author}' is a bot: a bot never retries"),
                ));
            }
            if store::approval_seen(&self.db, key, comment_id).await? {
                return Ok(unchanged(
                    item,
                    format!("retry {comment_id} was already handled"),
                ));
            }
            if item.status != Status::Blocked {
                return Err(EngineError::Precondition(format!(
                    "{key} is {} at {}: only a blocked work item can be retried",
                    item.status, item.stage
                )));
            }
            let Some(agent) = get_agent_for_stage(item.stage) else {
                return Err(EngineError::Precondition(format!(
                    "{key} is at {}: no agent works it",
                    item.stage
                )));
            };
            let transition_id = outbox::new_id();
            let dedupe = dedupe_key(key, &transition_id, agent);
            let mut next = item.clone();
            next.status = Status::Active;
            next.stage_retries = 0;
            next.rollback_count = 0;
            next.expected_agent = agent.to_owned();
            next.expected_dedupe_key = dedupe.clone();
            next.latest_job_id = String::new();
            next.status_reason = String::new();
            let why = format!(
                "retried by {author}: the {agent} runs {} again with a fresh budget",
                item.stage
            );
            let html = format!(
                "<p>Retried by <strong>{}</strong>: the <strong>{agent}</strong> runs <strong>{}</strong> again, with a fresh budget.</p>",
                escape(author),
                item.stage
            );
            // The task: what a human retry is told. No gate verdict sent it back (the
            // job failed, or the budget ran out), so the reason — why it was blocked — says it.
            let told = if item.status_reason.is_empty() {
                why.clone()
            } else {
                format!("{why}; it was blocked: {}", item.status_reason)
            };
            let task = self.task_without_verdict(&next, &told).await;
            let enqueue =
                crate::task::attach(self.enqueue_effect(&next, agent, &dedupe, &why), &task);
            let change = Change {
                transition_id,
                next,
                outcome: Outcome::Retried,
                cause: why.clone(),
                finished_agent: String::new(),
                job: None,
                command: Some((comment_id.to_owned(), author.to_owned())),
                effects: vec![stream_comment(html), enqueue],
            };
            match self.commit(&item, change).await? {
                Applied::Done(next) => {
                    tracing::info!(agent, stage = %item.stage, "work item retried");
                    return Ok(Advanced {
                        item: *next,
                        outcome: Outcome::Retried,
                        qg: Vec::new(),
                        enqueued_agent: Some(agent),
                        reason: why,
                    });
                }
                Applied::JobAlreadyConsumed | Applied::Moved => continue,
            }
        }
        Err(EngineError::Busy(key.to_owned()))
    }

    /// `Cancel`: any item not yet ended becomes `cancelled` (terminal: nothing moves it
    /// again), and its queued or running job is cancelled through the outbox. An item
    /// already done or cancelled changes nothing (reconciliation may ask twice).
    #[tracing::instrument(skip_all, fields(work_item = key, author))]
    pub async fn cancel(
        &self,
        key: &str,
        author: &str,
        reason: &str,
    ) -> Result<Advanced, EngineError> {
        for _ in 0..5 {
            let item = self.get_item(key).await?;
            if item.status.is_terminal() {
                return Ok(unchanged(
                    item.clone(),
                    format!("{key} is already {}", item.status),
                ));
            }
            let why = match reason.trim() {
                "" => format!("cancelled by {author}"),
                r => format!("cancelled by {author}: {r}"),
            };
            let mut effects = vec![stream_comment(format!(
                "<p>Cancelled at <strong>{}</strong>: {}. Nothing more runs for this work item.</p>",
                item.stage,
                escape(&why)
            ))];
            if !item.latest_job_id.is_empty() || !item.expected_dedupe_key.is_empty() {
                effects.push(Effect::CancelJob {
                    job_id: item.latest_job_id.clone(),
                    dedupe_key: item.expected_dedupe_key.clone(),
                    reason: why.clone(),
                });
            }
            let mut next = item.clone();
            next.status = Status::Cancelled;
            next.expected_agent = String::new();
            next.expected_dedupe_key = String::new();
            next.latest_job_id = String::new();
            next.status_reason = why.clone();
            let change = Change {
                transition_id: outbox::new_id(),
                next,
                outcome: Outcome::Cancelled,
                cause: why.clone(),
                finished_agent: String::new(),
                job: None,
                command: None,
                effects,
            };
            match self.commit(&item, change).await? {
                Applied::Done(next) => {
                    tracing::info!(reason = why, "work item cancelled");
                    return Ok(Advanced {
                        item: *next,
                        outcome: Outcome::Cancelled,
                        qg: Vec::new(),
                        enqueued_agent: None,
                        reason: why,
                    });
                }
                Applied::JobAlreadyConsumed | Applied::Moved => continue,
            }
        }
        Err(EngineError::Busy(key.to_owned()))
    }

    /// The stall watchdog's repair when an active item has no job at all (its enqueue was
    /// lost): the stage's agent enqueued again under a new dedupe key. Budgets are not
    /// touched. `seen` is the row the watchdog judged: if it moved since, nothing happens.
    pub(crate) async fn reenqueue_stalled(
        &self,
        seen: &WorkItemRow,
        why: &str,
    ) -> Result<Advanced, EngineError> {
        let Some(agent) = get_agent_for_stage(seen.stage) else {
            return Ok(unchanged(seen.clone(), "no agent works this stage".into()));
        };
        let transition_id = outbox::new_id();
        let dedupe = dedupe_key(&seen.key, &transition_id, agent);
        let mut next = seen.clone();
        next.expected_agent = agent.to_owned();
        next.expected_dedupe_key = dedupe.clone();
        next.latest_job_id = String::new();
        let task = self.task_without_verdict(&next, why).await;
        let enqueue = crate::task::attach(self.enqueue_effect(&next, agent, &dedupe, why), &task);
        let change = Change {
            transition_id,
            next,
            outcome: Outcome::Retried,
            cause: why.to_owned(),
            finished_agent: String::new(),
            job: None,
            command: None,
            effects: vec![enqueue],
        };
        match self.commit(seen, change).await? {
            Applied::Done(next) => Ok(Advanced {
                item: *next,
                outcome: Outcome::Retried,
                qg: Vec::new(),
                enqueued_agent: Some(agent),
                reason: why.to_owned(),
            }),
            Applied::JobAlreadyConsumed | Applied::Moved => Ok(unchanged(
                self.get_item(&seen.key).await?,
                "the work item moved meanwhile".into(),
            )),
        }
    }

    /// The agent's task for an enqueue that no quality gate decided (a human's retry, the
    /// watchdog's re-enqueue): everything `task::gather` tells, without a verdict section.
    async fn task_without_verdict(&self, next: &WorkItemRow, reason: &str) -> String {
        let inputs = crate::qg::Inputs {
            key: next.key.clone(),
            ..crate::qg::Inputs::default()
        };
        // `Unblocked` is the outcome of an enqueue with no verdict behind it.
        crate::task::gather(
            self,
            next,
            next.stage,
            Outcome::Unblocked,
            &[],
            &inputs,
            reason,
        )
        .await
    }

    pub(crate) async fn get_item(&self, key: &str) -> Result<WorkItemRow, EngineError> {
        store::get(&self.db, key)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("work item {key} not found")))
    }

    /// Writes `c` if `item` is still at its version: the row, the consumed job, the
    /// transition, the human's command and the effects, in one transaction.
    pub(crate) async fn commit(
        &self,
        item: &WorkItemRow,
        c: Change,
    ) -> Result<Applied, EngineError> {
        let now = now_ms();
        let mut next = c.next;
        next.updated_at_ms = now;
        next.version = item.version + 1;
        let mut tx = self.db.pool.begin().await?;
        if !store::update_item_guarded(&mut tx, &next, item.version).await? {
            tx.rollback().await?;
            return Ok(Applied::Moved);
        }
        if let Some(job) = &c.job
            && !store::consume_job(
                &mut tx,
                &job.job_id,
                &item.key,
                job.attempt,
                c.outcome.as_str(),
                now,
            )
            .await?
        {
            tx.rollback().await?;
            return Ok(Applied::JobAlreadyConsumed);
        }
        let transition_id = c.transition_id.clone();
        store::insert_transition(
            &mut tx,
            &TransitionRow {
                id: c.transition_id,
                work_item: item.key.clone(),
                from_stage: item.stage.as_str().to_owned(),
                to_stage: next.stage.as_str().to_owned(),
                from_status: item.status.as_str().to_owned(),
                to_status: next.status.as_str().to_owned(),
                outcome: c.outcome.as_str().to_owned(),
                cause: c.cause.clone(),
                finished_agent: c.finished_agent,
                job_id: c.job.map(|j| j.job_id).unwrap_or_default(),
                qg_results_json: "[]".to_owned(),
                at_ms: now,
            },
        )
        .await?;
        if let Some((comment_id, author)) = &c.command {
            // The approvals table keeps every human command by its comment id (`:approved:`
            // and `:retry:` alike), so that a redelivered comment is applied once.
            let row = ApprovalRow {
                work_item: &item.key,
                comment_id,
                author,
                accepted: true,
                reason: &c.cause,
                at_ms: now,
            };
            store::insert_approval(&mut *tx, &row).await?;
        }
        for effect in &c.effects {
            outbox::insert(&mut tx, &item.key, effect, None).await?;
        }
        if let Some((n, key)) = crate::notify::for_transition(
            &self.config.notify,
            &transition_id,
            &item.key,
            item.stage,
            c.outcome,
            &c.cause,
        ) {
            outbox::insert(&mut tx, &item.key, &n, Some(&key)).await?;
        }
        tx.commit().await?;
        self.notify.notify_one();
        Ok(Applied::Done(Box::new(next)))
    }
}
