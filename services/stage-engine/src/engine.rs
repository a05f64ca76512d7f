//! The engine: `create_work_item` and the ONE `advance_stage`, over the store, the outbox,
//! the forge (quality-gate inputs) and the peers.

use std::collections::BTreeMap;
use std::sync::Arc;

use orchestrator_forge::{Forge, RepoName};
use orchestrator_git::{validate_branch, validate_repo, validate_work_item_key};
use orchestrator_kit::Db;
use orchestrator_kit::retry::is_retryable_status;
use orchestrator_kit::time::now_ms;
use orchestrator_tracker::Tracker;
use tokio::sync::Notify;

use crate::config::StageEngineConfig;
use crate::error::EngineError;
use crate::outbox::{self, Dispatcher, Effect, escape};
use crate::peers::Peers;
use crate::pipeline::{
    Decision, Outcome, Stage, Status, Trigger, decide, get_agent_for_stage, needs_qg,
};
use crate::qg::{
    self, CheckOutcome, CheckResult, Input, Inputs, PrInfo, artifacts_dir, checks_for,
};
use crate::store::{self, ApprovalRow, TransitionRow, WorkItemRow};
use crate::watchdog::WatchdogStats;

/// A finished launcher job, for idempotency and the latest-job rule.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct JobRef {
    pub job_id: String,
    pub attempt: u32,
    pub dedupe_key: String,
    /// What the run delivered, when the launcher says (`AdvanceStage`): the PR and its head
    /// after the push. 0 / empty: not said (the reaper's and the watchdog's paths).
    pub pr_number: u64,
    pub head_sha: String,
}

/// An approval's identity.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApprovalRef {
    pub comment_id: String,
}

/// What `advance_stage` answers.
#[derive(Debug, Clone)]
pub struct Advanced {
    pub item: WorkItemRow,
    pub outcome: Outcome,
    pub qg: Vec<CheckResult>,
    pub enqueued_agent: Option<&'static str>,
    pub reason: String,
}

/// The engine; cheap to clone.
#[derive(Clone)]
pub struct Engine {
    pub(crate) db: Db,
    pub(crate) config: Arc<StageEngineConfig>,
    pub(crate) tracker: Arc<dyn Tracker>,
    pub(crate) forge: Arc<dyn Forge>,
    pub(crate) peers: Arc<dyn Peers>,
    pub(crate) notify: Arc<Notify>,
    /// The local tracker, when that is the tracker: new work items register their issue.
    pub(crate) local_tracker: Option<orchestrator_tracker::local::LocalTracker>,
    /// The stall watchdog's firings since start, by reason.
    pub(crate) watchdog: Arc<WatchdogStats>,
}

/// Checks a required free-text id: present, at most 200 printable characters.
pub fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str, EngineError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(EngineError::MissingField(field));
    }
    if v.len() > 200 || v.chars().any(char::is_control) {
        return Err(EngineError::InvalidField {
            field,
            reason: "must be at most 200 printable characters".to_owned(),
        });
    }
    Ok(v)
}

fn invalid(field: &'static str, e: impl std::fmt::Display) -> EngineError {
    EngineError::InvalidField {
        field,
        reason: e.to_string(),
    }
}

/// The request of `CreateWorkItem`, validated by [`Engine::create_work_item`].
#[derive(Debug, Clone, Default)]
pub struct NewWorkItem {
    pub tracker_issue_id: String,
    pub tracker_project_id: String,
    /// The issue's number in its tracker project (0: unknown).
    pub tracker_sequence_id: u64,
    pub key: String,
    pub title: String,
    pub description: String,
    pub repo: String,
    pub branch: String,
}

impl Engine {
    /// The engine's storage (benchmarks and tests read it directly).
    pub fn db_handle(&self) -> Db {
        self.db.clone()
    }

    /// The dispatcher that delivers this engine's outbox.
    pub fn dispatcher(&self) -> Dispatcher {
        Dispatcher {
            outbox: outbox::OUTBOX,
            // stage-engine runs as one process per deployment: its claims are its own.
            claimant: "stage-engine".to_owned(),
            db: self.db.clone(),
            deliver: Arc::new(outbox::Delivery {
                db: self.db.clone(),
                tracker: self.tracker.clone(),
                peers: self.peers.clone(),
                default_project: self
                    .config
                    .tracker
                    .plane
                    .as_ref()
                    .and_then(|p| p.project_id.clone()),
                notify: self.config.notify.clone(),
                http: reqwest::Client::new(),
            }),
            config: self.config.outbox.clone(),
            notify: self.notify.clone(),
        }
    }

    /// The stall watchdog over this engine.
    pub fn stall_watchdog(&self) -> crate::watchdog::Watchdog {
        crate::watchdog::Watchdog {
            engine: self.clone(),
        }
    }

    /// The stall watchdog's firings since start, by reason.
    pub fn stall_firings(&self) -> Vec<(crate::watchdog::StallReason, u64)> {
        self.watchdog.firings()
    }

    /// Creates a work item at `analysis` and enqueues the analyst; idempotent on the
    /// tracker issue id. Returns the item and whether it is new.
    ///
    /// Without a key, the key is derived through the tracker from the project and the
    /// issue's sequence id (see [`Engine::derive_key`]); that lookup happens only for an
    /// issue that has no work item yet, so a repeat answers even while the tracker is down.
    pub async fn create_work_item(
        &self,
        req: NewWorkItem,
    ) -> Result<(WorkItemRow, bool), EngineError> {
        let issue_id = required("tracker_issue_id", &req.tracker_issue_id)?.to_owned();
        let repo = validate_repo(required("repo", &req.repo)?).map_err(|e| invalid("repo", e))?;
        let branch = req.branch.trim();
        if !branch.is_empty() {
            validate_branch(branch).map_err(|e| invalid("branch", e))?;
        }
        if req.title.len() > 1000 {
            return Err(invalid("title", "longer than 1000 bytes"));
        }
        let project = match (req.tracker_project_id.trim(), self.tracker.kind()) {
            (_, orchestrator_tracker::TrackerKind::Local) => {
                orchestrator_tracker::local::LOCAL_PROJECT.to_owned()
            }
            ("", _) => self
                .config
                .tracker
                .plane
                .as_ref()
                .and_then(|p| p.project_id.clone())
                .unwrap_or_default(),
            (p, _) => p.to_owned(),
        };
        let given_key = req.key.trim();
        let derive = given_key.is_empty() && req.tracker_sequence_id > 0;
        if !derive {
            let key = if given_key.is_empty() {
                issue_id.as_str()
            } else {
                given_key
            };
            validate_work_item_key(key).map_err(|e| {
                invalid(
                    "key",
                    format!(
                        "{e} (give key, or tracker_project_id and tracker_sequence_id, or a \
                         tracker_issue_id that is a key)"
                    ),
                )
            })?;
        }

        if let Some(existing) = store::get_by_tracker_issue(&self.db, &issue_id).await? {
            self.register_local_issue(&existing).await?;
            return Ok((existing, false));
        }
        self.check_repo_and_base(&repo).await?;
        let key = if derive {
            // The issue's own project, else the configured default (PLANE_PROJECT_ID).
            let of = match req.tracker_project_id.trim() {
                "" => project.as_str(),
                given => given,
            };
            let project_id = required("tracker_project_id", of)?;
            self.derive_key(project_id, req.tracker_sequence_id).await?
        } else if given_key.is_empty() {
            issue_id.clone()
        } else {
            given_key.to_owned()
        };
        let branch = if branch.is_empty() {
            let b = format!("orch/{key}");
            validate_branch(&b).map_err(|e| invalid("branch", e))?;
            b
        } else {
            branch.to_owned()
        };
        let now = now_ms();
        let transition_id = outbox::new_id();
        let agent = get_agent_for_stage(Stage::Analysis).unwrap_or("analyst");
        let dedupe_key = dedupe_key(&key, &transition_id, agent);
        let item = WorkItemRow {
            key: key.clone(),
            tracker_issue_id: issue_id.clone(),
            tracker_project_id: project,
            title: req.title.trim().to_owned(),
            description: crate::task::stored_description(&req.description),
            repo: repo.to_string(),
            branch,
            stage: Stage::Analysis,
            status: Status::Active,
            rollback_count: 0,
            stage_retries: 0,
            expected_agent: agent.to_owned(),
            expected_dedupe_key: dedupe_key.clone(),
            latest_job_id: String::new(),
            status_reason: String::new(),
            version: 0,
            created_at_ms: now,
            updated_at_ms: now,
        };
        let task = crate::task::gather(
            self,
            &item,
            Stage::Analysis,
            Outcome::Advanced,
            &[],
            &Inputs::default(),
            "new work item",
        )
        .await;
        let mut tx = self.db.pool.begin().await?;
        if !store::insert_item(&mut tx, &item).await? {
            tx.rollback().await?;
            // Lost a race on the tracker issue (idempotent), or the key belongs to another issue.
            if let Some(existing) = store::get_by_tracker_issue(&self.db, &issue_id).await? {
                return Ok((existing, false));
            }
            return Err(EngineError::Precondition(format!(
                "key {key} already belongs to another tracker issue"
            )));
        }
        store::insert_transition(
            &mut tx,
            &TransitionRow {
                id: transition_id,
                work_item: key.clone(),
                from_stage: String::new(),
                to_stage: Stage::Analysis.as_str().to_owned(),
                from_status: String::new(),
                to_status: Status::Active.as_str().to_owned(),
                outcome: "created".to_owned(),
                cause: "created from tracker issue".to_owned(),
                finished_agent: String::new(),
                job_id: String::new(),
                qg_results_json: "[]".to_owned(),
                at_ms: now,
            },
        )
        .await?;
        let html = format!(
            "<p>Work item <strong>{}</strong> picked up: stage <strong>analysis</strong>, branch <code>{}</code>. The analyst is on it.</p>",
            escape(&key),
            escape(&item.branch)
        );
        outbox::insert(
            &mut tx,
            &key,
            &Effect::Comment {
                html,
                author: "stream".to_owned(),
            },
            None,
        )
        .await?;
        outbox::insert(
            &mut tx,
            &key,
            &crate::task::attach(
                self.enqueue_effect(&item, agent, &dedupe_key, "new work item"),
                &task,
            ),
            None,
        )
        .await?;
        tx.commit().await?;
        self.notify.notify_one();
        self.register_local_issue(&item).await?;
        tracing::info!(work_item = key, repo = item.repo, "work item created");
        Ok((item, true))
    }

    /// Keeps the description of tracker issue `issue_id`'s work item current (see
    /// [`crate::task`]); changes nothing else.
    pub async fn update_description(
        &self,
        issue_id: &str,
        description: &str,
    ) -> Result<WorkItemRow, EngineError> {
        let issue_id = required("tracker_issue_id", issue_id)?;
        let stored = crate::task::stored_description(description);
        if !store::set_description(&self.db, issue_id, &stored, now_ms()).await? {
            return Err(EngineError::NotFound(format!(
                "no work item for tracker issue {issue_id}"
            )));
        }
        let item = store::get_by_tracker_issue(&self.db, issue_id)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!("no work item for tracker issue {issue_id}"))
            })?;
        tracing::info!(
            work_item = item.key,
            bytes = stored.len(),
            "description updated"
        );
        Ok(item)
    }

    /// The key of a new work item from its tracker project and sequence id, e.g. `PROJ-42`,
    /// validated (`IDENT-NUMBER`) because the identifier comes from the tracker and the key
    /// becomes a branch and a path. A tracker that is down is UNAVAILABLE (the caller
    /// retries); one that does not know the project, or refuses us, is a precondition to fix.
    async fn derive_key(&self, project_id: &str, sequence_id: u64) -> Result<String, EngineError> {
        let key = orchestrator_tracker::issue_key(self.tracker.as_ref(), project_id, sequence_id)
            .await
            .map_err(|e| {
                if e.is_transient() {
                    EngineError::Unavailable(format!(
                        "the tracker is unavailable to name project {project_id}: {e}"
                    ))
                } else {
                    EngineError::Precondition(format!(
                        "cannot derive a key from tracker project {project_id}: {e}"
                    ))
                }
            })?;
        validate_work_item_key(&key).map_err(|e| {
            invalid(
                "key",
                format!("derived from tracker project {project_id}: {e}"),
            )
        })?;
        Ok(key)
    }

    async fn register_local_issue(&self, item: &WorkItemRow) -> Result<(), EngineError> {
        if let Some(local) = &self.local_tracker {
            local
                .register_issue(&item.tracker_issue_id, &item.key)
                .await
                .map_err(|e| EngineError::Internal(format!("local tracker: {e}")))?;
        }
        Ok(())
    }

    pub(crate) fn enqueue_effect(
        &self,
        item: &WorkItemRow,
        agent: &str,
        dedupe_key: &str,
        reason: &str,
    ) -> Effect {
        let flags = crate::pipeline::job_flags(item.stage);
        let payload = serde_json::json!({
            "work_item": item.key,
            "stage": item.stage.as_str(),
            "repo": item.repo,
            "branch": item.branch,
            "base": self.config.base_branch,
            "artifacts_dir": artifacts_dir(&item.key),
            "needs_merge_lease": flags.needs_merge_lease,
            "announce_start": flags.announce_start,
            "tracker_issue_id": item.tracker_issue_id,
            "title": item.title,
            "rollback_count": item.rollback_count,
            "dedupe_key": dedupe_key,
            "reason": reason,
        });
        Effect::Enqueue {
            repo: item.repo.clone(),
            agent: agent.to_owned(),
            stage: item.stage.as_str().to_owned(),
            dedupe_key: dedupe_key.to_owned(),
            payload_json: payload.to_string(),
        }
    }

    /// The ONE way a stage changes. Runs the current stage's quality gate when the trigger
    /// calls for it, decides (see [`decide`]), and applies the decision with its side
    /// effects in one transaction. A duplicate or stale trigger changes nothing.
    #[tracing::instrument(skip_all, fields(work_item = key, trigger = ?trigger))]
    pub async fn advance_stage(
        &self,
        key: &str,
        trigger: Trigger,
        job: Option<JobRef>,
        approval: Option<ApprovalRef>,
    ) -> Result<Advanced, EngineError> {
        // Optimistic: decide on a snapshot, apply only if the row did not move meanwhile.
        for _ in 0..5 {
            let item = store::get(&self.db, key)
                .await?
                .ok_or_else(|| EngineError::NotFound(format!("work item {key} not found")))?;
            if let Some(job) = &job
                && let Some(reason) = self.job_refusal(&item, job).await?
            {
                tracing::info!(job_id = job.job_id, reason, "advance refused");
                return Ok(unchanged(item, reason));
            }
            if let Some(a) = &approval
                && store::approval_seen(&self.db, key, &a.comment_id).await?
            {
                return Ok(unchanged(
                    item,
                    format!("approval {} was already handled", a.comment_id),
                ));
            }
            let at = item.position();
            let (qg, inputs) = if needs_qg(at, &trigger) {
                let inputs = self.gather(&item, job.as_ref()).await?;
                (qg::evaluate(at.stage, &inputs), inputs)
            } else {
                (Vec::new(), Inputs::default())
            };
            let decision = decide(at, &trigger, &qg, self.config.limits);
            let decision = crate::loops::guard(self, &item, decision, &qg).await?;
            if decision.outcome == Outcome::Unchanged {
                if let (Some(a), Trigger::Approval { author, .. }) = (&approval, &trigger) {
                    let row = ApprovalRow {
                        work_item: key,
                        comment_id: &a.comment_id,
                        author,
                        accepted: false,
                        reason: &decision.reason,
                        at_ms: now_ms(),
                    };
                    store::insert_approval(&self.db.pool, &row).await?;
                }
                tracing::info!(reason = decision.reason, "advance changed nothing");
                return Ok(Advanced {
                    item,
                    outcome: Outcome::Unchanged,
                    qg,
                    enqueued_agent: None,
                    reason: decision.reason,
                });
            }
            match self
                .apply(
                    &item,
                    &trigger,
                    job.as_ref(),
                    approval.as_ref(),
                    &decision,
                    &qg,
                    &inputs,
                )
                .await?
            {
                Applied::Done(next) => {
                    self.notify.notify_one();
                    tracing::info!(
                        outcome = decision.outcome.as_str(),
                        from = %item.stage,
                        to = %next.stage,
                        status = %next.status,
                        reason = decision.reason,
                        "advance_stage applied"
                    );
                    return Ok(Advanced {
                        item: *next,
                        outcome: decision.outcome,
                        qg,
                        enqueued_agent: decision.enqueue,
                        reason: decision.reason,
                    });
                }
                Applied::JobAlreadyConsumed => {
                    let item = store::get(&self.db, key).await?.unwrap_or(item);
                    return Ok(unchanged(
                        item,
                        "the job's finish was already applied".to_owned(),
                    ));
                }
                Applied::Moved => continue,
            }
        }
        Err(EngineError::Busy(key.to_owned()))
    }

    /// Why a finished job must not move the item, if it must not.
    pub(crate) async fn job_refusal(
        &self,
        item: &WorkItemRow,
        job: &JobRef,
    ) -> Result<Option<String>, EngineError> {
        if store::job_consumed(&self.db, &job.job_id).await? {
            return Ok(Some(format!("job {} was already applied", job.job_id)));
        }
        if !item.latest_job_id.is_empty() && item.latest_job_id != job.job_id {
            return Ok(Some(format!(
                "job {} is not the latest job of {} (the latest is {})",
                job.job_id, item.key, item.latest_job_id
            )));
        }
        if !job.dedupe_key.is_empty() && job.dedupe_key != item.expected_dedupe_key {
            return Ok(Some(format!(
                "job {} was enqueued as {}, which is not the latest enqueue of {}",
                job.job_id, job.dedupe_key, item.key
            )));
        }
        Ok(None)
    }

    /// Reads what the current stage's checks need. A forge or merge-gate that is down makes
    /// the whole evaluation UNAVAILABLE (nothing changes; the caller retries).
    async fn gather(
        &self,
        item: &WorkItemRow,
        job: Option<&JobRef>,
    ) -> Result<Inputs, EngineError> {
        let repo = RepoName::parse(&item.repo).map_err(|e| EngineError::Internal(e.to_string()))?;
        let mut inputs = Inputs {
            key: item.key.clone(),
            artifacts: BTreeMap::new(),
            pr: None,
            mergeable: None,
            ci: None,
        };
        let forge_err = |what: &str, e: orchestrator_forge::ForgeError| {
            if e.is_transient() {
                EngineError::Unavailable(format!("the forge is unavailable ({what}): {e}"))
            } else {
                EngineError::Precondition(format!("the forge refused {what}: {e}"))
            }
        };
        for check in checks_for(item.stage) {
            match check.input {
                Input::Artifact(name) => {
                    let path = format!("{}/{name}", artifacts_dir(&item.key));
                    let text = self
                        .forge
                        .read_file(&repo, &item.branch, &path)
                        .await
                        .map_err(|e| forge_err(&format!("reading {path}"), e))?;
                    inputs.artifacts.insert(name, text);
                }
                Input::Pr => {
                    let pr = self
                        .forge
                        .find_pr(&repo, &item.branch, &self.config.base_branch)
                        .await
                        .map_err(|e| forge_err("looking up the PR", e))?;
                    inputs.pr = Some(pr.map(|p| PrInfo {
                        number: p.number,
                        open: p.state == orchestrator_forge::PrState::Open,
                        merged: p.merged,
                        head_sha: p.head_sha,
                    }));
                }
                Input::CiStatus => inputs.ci = Some(crate::ci::gather(self, item, job).await?),
                Input::Mergeable => {
                    let m = self
                        .peers
                        .check_branch_mergeable(&item.repo, &item.branch, &self.config.base_branch)
                        .await;
                    inputs.mergeable = Some(match m {
                        Ok(m) => m,
                        Err(s) if is_retryable_status(&s) => {
                            return Err(EngineError::Unavailable(format!(
                                "merge-gate is unavailable for check_branch_mergeable: {:?}: {}",
                                s.code(),
                                s.message()
                            )));
                        }
                        Err(s) => qg::Mergeability::Error(s.message().to_owned()),
                    });
                }
            }
        }
        Ok(inputs)
    }

    #[allow(clippy::too_many_arguments)]
    async fn apply(
        &self,
        item: &WorkItemRow,
        trigger: &Trigger,
        job: Option<&JobRef>,
        approval: Option<&ApprovalRef>,
        d: &Decision,
        qg: &[CheckResult],
        inputs: &Inputs,
    ) -> Result<Applied, EngineError> {
        let now = now_ms();
        let transition_id = outbox::new_id();
        let mut next = item.clone();
        next.stage = d.to.stage;
        next.status = d.to.status;
        next.rollback_count = d.to.rollback_count;
        next.stage_retries = d.to.stage_retries;
        next.updated_at_ms = now;
        next.version = item.version + 1;
        let dedupe = d
            .enqueue
            .map(|agent| dedupe_key(&item.key, &transition_id, agent));
        next.expected_agent = d.enqueue.unwrap_or_default().to_owned();
        next.expected_dedupe_key = dedupe.clone().unwrap_or_default();
        next.latest_job_id = String::new();
        next.status_reason = if next.status == Status::Blocked {
            blocked_reason(&item.key, &d.reason)
        } else {
            String::new()
        };

        let finished_agent = match trigger {
            Trigger::AgentFinished { agent } => agent.clone(),
            _ => String::new(),
        };
        let cause = match trigger {
            Trigger::AgentFinished { agent } => format!("{agent} finished: {}", d.reason),
            Trigger::Approval { .. } | Trigger::PrMerged => d.reason.clone(),
        };
        // Composed before the transaction: it reads the tracker.
        let task = match d.enqueue {
            Some(_) => {
                crate::task::gather(self, &next, item.stage, d.outcome, qg, inputs, &d.reason).await
            }
            None => String::new(),
        };
        // The deploy-finalizer merges what the deployer delivered; looked up before the
        // transaction when the launcher did not say (it reads the forge).
        let finalizer = if d.done_by_deploy {
            self.finalizer_effect(item, job).await?
        } else {
            None
        };
        // CI's second red verdict on the item tells a human (its audit is the count).
        let ci_failed_twice = if self.config.notify.webhook_url.is_some()
            && qg.iter().any(crate::notify::ci_red)
        {
            let history = store::list_transitions(&self.db, &item.key).await?;
            crate::notify::for_ci_failure(&self.config.notify, &item.key, item.stage, &history, qg)
        } else {
            None
        };
        let mut tx = self.db.pool.begin().await?;
        if !store::update_item_guarded(&mut tx, &next, item.version).await? {
            tx.rollback().await?;
            return Ok(Applied::Moved);
        }
        if let Some(job) = job
            && !store::consume_job(
                &mut tx,
                &job.job_id,
                &item.key,
                job.attempt,
                d.outcome.as_str(),
                now,
            )
            .await?
        {
            tx.rollback().await?;
            return Ok(Applied::JobAlreadyConsumed);
        }
        store::insert_transition(
            &mut tx,
            &TransitionRow {
                id: transition_id.clone(),
                work_item: item.key.clone(),
                from_stage: item.stage.as_str().to_owned(),
                to_stage: next.stage.as_str().to_owned(),
                from_status: item.status.as_str().to_owned(),
                to_status: next.status.as_str().to_owned(),
                outcome: d.outcome.as_str().to_owned(),
                cause,
                finished_agent,
                job_id: job.map(|j| j.job_id.clone()).unwrap_or_default(),
                qg_results_json: qg_json(qg),
                at_ms: now,
            },
        )
        .await?;
        if let (Some(a), Trigger::Approval { author, .. }) = (approval, trigger) {
            let row = ApprovalRow {
                work_item: &item.key,
                comment_id: &a.comment_id,
                author,
                accepted: true,
                reason: &d.reason,
                at_ms: now,
            };
            store::insert_approval(&mut *tx, &row).await?;
        }
        if let Some((n, key)) = crate::notify::for_transition(
            &self.config.notify,
            &transition_id,
            &item.key,
            item.stage,
            d.outcome,
            &d.reason,
        ) {
            outbox::insert(&mut tx, &item.key, &n, Some(&key)).await?;
        }
        if let Some((n, key)) = &ci_failed_twice {
            outbox::insert(&mut tx, &item.key, n, Some(key)).await?;
        }
        let html = self.transition_comment(item, &next, d, qg);
        outbox::insert(
            &mut tx,
            &item.key,
            &Effect::Comment {
                html,
                author: "stream".to_owned(),
            },
            None,
        )
        .await?;
        if let (Some(agent), Some(dedupe)) = (d.enqueue, &dedupe) {
            let mut effect =
                crate::task::attach(self.enqueue_effect(&next, agent, dedupe, &d.reason), &task);
            if let Some(resume) = resume_of(trigger, job, d, qg) {
                effect = crate::task::with_payload_field(effect, "resume", resume);
            }
            outbox::insert(&mut tx, &item.key, &effect, None).await?;
        }
        if d.outcome == Outcome::Done {
            outbox::insert(&mut tx, &item.key, &Effect::SetStateDone, None).await?;
            outbox::insert(&mut tx, &item.key, &Effect::UsageSummary, None).await?;
            if let Some(f) = &finalizer {
                outbox::insert(&mut tx, &item.key, f, None).await?;
            }
            if d.done_by_deploy && self.config.arm_post_deploy {
                let deploy_field = |name: &str| {
                    inputs
                        .artifacts
                        .get(qg::artifact::DEPLOY)
                        .and_then(|t| t.as_deref())
                        .and_then(qg::frontmatter)
                        .and_then(|(f, _)| f.get(name).cloned())
                        .unwrap_or_default()
                };
                let arm = Effect::ArmWatch {
                    repo: item.repo.clone(),
                    deployed_sha: deploy_field("deployed_sha"),
                    previous_sha: deploy_field("previous_sha"),
                };
                outbox::insert(&mut tx, &item.key, &arm, None).await?;
            }
        }
        tx.commit().await?;
        Ok(Applied::Done(Box::new(next)))
    }

    /// After the deployer's verdict completed `item`: the deploy-finalizer's enqueue, which
    /// merges the PR pinned to the head that was deployed (deduped on
    /// `deploy-finalizer:{deployer job}`, so a redelivered AdvanceStage enqueues it once).
    /// The PR is the one the launcher says the run delivered; on the paths that do not say
    /// (the reaper's, the watchdog's), the branch's open PR as the forge has it now. No PR:
    /// nothing to merge, said at WARN.
    async fn finalizer_effect(
        &self,
        item: &WorkItemRow,
        job: Option<&JobRef>,
    ) -> Result<Option<Effect>, EngineError> {
        let Some(job) = job else {
            return Ok(None);
        };
        let (pr_number, head_sha) = if job.pr_number > 0 && !job.head_sha.is_empty() {
            (job.pr_number, job.head_sha.clone())
        } else {
            let repo =
                orchestrator_forge::RepoName::parse(&item.repo).map_err(|e| invalid("repo", e))?;
            match self
                .forge
                .find_pr(&repo, &item.branch, &self.config.base_branch)
                .await
            {
                Ok(Some(pr)) => (pr.number, pr.head_sha),
                Ok(None) => {
                    tracing::warn!(
                        work_item = item.key,
                        branch = item.branch,
                        "the deploy completed the item but its branch has no PR: nothing to merge"
                    );
                    return Ok(None);
                }
                Err(e) if e.is_transient() => {
                    return Err(EngineError::Unavailable(format!(
                        "the forge is unavailable to find the PR to merge: {e}"
                    )));
                }
                Err(e) => {
                    return Err(EngineError::Precondition(format!(
                        "the forge refused the PR lookup: {e}"
                    )));
                }
            }
        };
        let payload = serde_json::json!({
            "work_item": item.key,
            "repo": item.repo,
            "branch": item.branch,
            "base": self.config.base_branch,
            "pr_number": pr_number,
            "tested_head_sha": head_sha,
            "deployer_job_id": job.job_id,
        });
        Ok(Some(Effect::EnqueueReserved {
            repo: item.repo.clone(),
            agent: crate::park::DEPLOY_FINALIZER.to_owned(),
            stage: item.stage.as_str().to_owned(),
            dedupe_key: format!("{}:{}", crate::park::DEPLOY_FINALIZER, job.job_id),
            payload_json: payload.to_string(),
        }))
    }

    /// The stream bot's comment on a transition.
    fn transition_comment(
        &self,
        from: &WorkItemRow,
        to: &WorkItemRow,
        d: &Decision,
        qg: &[CheckResult],
    ) -> String {
        let checks = if qg.is_empty() {
            String::new()
        } else {
            let items: Vec<String> = qg
                .iter()
                .map(|r| {
                    let mark = if r.outcome.passed() {
                        "passed"
                    } else {
                        "failed"
                    };
                    let detail = match &r.outcome {
                        CheckOutcome::Pass => String::new(),
                        o => format!(": {}", escape(o.detail())),
                    };
                    format!("<li><code>{}</code> {mark}{detail}</li>", r.check)
                })
                .collect();
            format!("<ul>{}</ul>", items.join(""))
        };
        let links = self.artifact_links(from);
        let (f, t, reason) = (from.stage.as_str(), to.stage.as_str(), escape(&d.reason));
        let head = match d.outcome {
            Outcome::Advanced => format!(
                "<p>Stage <strong>{f}</strong> → <strong>{t}</strong>: {reason}. Next: the <strong>{}</strong>.</p>",
                d.enqueue.unwrap_or("nobody")
            ),
            Outcome::AwaitingApproval => format!(
                "<p>Stage <strong>{f}</strong> passed its quality gate. A human must reply <code>:approved:</code> to start <strong>{}</strong>.</p>",
                crate::pipeline::transition_from(from.stage)
                    .map(|r| r.to.as_str())
                    .unwrap_or("the next stage")
            ),
            Outcome::Retried => format!(
                "<p>Stage <strong>{f}</strong>: {reason}. The <strong>{}</strong> runs again.</p>",
                d.enqueue.unwrap_or("agent")
            ),
            Outcome::RolledBack => format!(
                "<p>Rolled back <strong>{f}</strong> → <strong>{t}</strong>: {reason}. The <strong>{}</strong> is on it.</p>",
                d.enqueue.unwrap_or("agent")
            ),
            Outcome::Blocked => format!(
                "<p>Blocked at <strong>{f}</strong>: {reason}. A human must look at it; reply <code>:retry:</code> (or <code>:approved:</code>), or run <code>orchestrator item retry {}</code>, to retry the stage with a fresh budget.</p>",
                escape(&from.key)
            ),
            Outcome::Unblocked => format!("<p>Resumed at <strong>{t}</strong>: {reason}.</p>"),
            Outcome::Done => format!("<p>Done: {reason}.</p>"),
            Outcome::Unchanged | Outcome::Cancelled => format!("<p>{reason}</p>"),
        };
        format!("{head}{checks}{links}")
    }

    fn artifact_links(&self, item: &WorkItemRow) -> String {
        let Ok(repo) = RepoName::parse(&item.repo) else {
            return String::new();
        };
        let links: Vec<String> = checks_for(item.stage)
            .filter_map(|c| match c.input {
                Input::Artifact(name) => {
                    let url = self.forge.file_url(
                        &repo,
                        &item.branch,
                        &format!("{}/{name}", artifacts_dir(&item.key)),
                    );
                    Some(format!("<a href=\"{}\">{name}</a>", escape(&url)))
                }
                _ => None,
            })
            .collect();
        if links.is_empty() {
            String::new()
        } else {
            format!("<p>Artifacts: {}</p>", links.join(", "))
        }
    }
}

pub(crate) enum Applied {
    Done(Box<WorkItemRow>),
    /// Someone changed the item between our read and our write: decide again.
    Moved,
    JobAlreadyConsumed,
}

pub(crate) fn unchanged(item: WorkItemRow, reason: String) -> Advanced {
    Advanced {
        item,
        outcome: Outcome::Unchanged,
        qg: Vec::new(),
        enqueued_agent: None,
        reason,
    }
}

/// The status reason of a blocked item: why, and the next step.
pub fn blocked_reason(key: &str, why: &str) -> String {
    format!(
        "{why}; fix the cause, then `orchestrator item retry {key}` or comment `:retry:` on the issue"
    )
}

/// The dedupe key of an enqueue: one per transition and agent, so a redelivered enqueue
/// makes no second job. The launcher hands it back in AdvanceStage.
/// When the agent that just failed its stage's gate runs that stage again (a retry, not a
/// rollback to another agent), the payload's `resume`: the run to resume (`job_id`), the
/// head it delivered (`head_sha`: a checkout that is not there any more was reset, and the
/// launcher starts cold) and what the gate still lacks (`gate_lacks`, one line per failed
/// check) — the launcher resumes the CLI session of that run with just that. Whether it
/// can (the session, its age, the checkout) is the launcher's to find out.
fn resume_of(
    trigger: &Trigger,
    job: Option<&JobRef>,
    d: &Decision,
    qg: &[CheckResult],
) -> Option<serde_json::Value> {
    let Trigger::AgentFinished { agent } = trigger else {
        return None;
    };
    let job = job?;
    if d.outcome != Outcome::Retried || d.enqueue != Some(agent.as_str()) {
        return None;
    }
    let lacks: Vec<String> = qg
        .iter()
        .filter(|r| !r.outcome.passed())
        .map(|r| format!("{}: {}", r.check, r.outcome.detail()))
        .collect();
    Some(serde_json::json!({
        "job_id": job.job_id,
        "head_sha": job.head_sha,
        "gate_lacks": lacks,
    }))
}

pub fn dedupe_key(key: &str, transition_id: &str, agent: &str) -> String {
    format!("{key}/{transition_id}/{agent}")
}

/// QG results as stored in `stage_transitions.qg_results_json`.
pub fn qg_json(qg: &[CheckResult]) -> String {
    serde_json::Value::Array(
        qg.iter()
            .map(|r| serde_json::json!({"check": r.check, "passed": r.outcome.passed(), "negative": matches!(r.outcome, CheckOutcome::Negative(_)), "detail": r.outcome.detail()}))
            .collect(),
    )
    .to_string()
}
