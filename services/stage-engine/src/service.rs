//! The gRPC surface over the engine.

use std::sync::Arc;

use orchestrator_forge::Forge;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::{ConfigError, Db};
use orchestrator_proto::stage_engine::v1::{
    AddCommentRequest, AddCommentResponse, AdvanceOutcome, AdvanceStageRequest,
    AdvanceStageResponse, ApproveRequest, Comment, CreateWorkItemRequest, CreateWorkItemResponse,
    GetWorkItemRequest, ListCommentsRequest, ListCommentsResponse, ListOutboxRequest,
    ListOutboxResponse, ListTransitionsRequest, ListTransitionsResponse, ListWorkItemsRequest,
    ListWorkItemsResponse, NotifyRequest, NotifyResponse, OnCommitStatusRequest,
    OnCommitStatusResponse, OnPrMergedRequest, OnPrReviewRequest, OutboxEntry, QgResult,
    RetryOutboxRequest, RetryOutboxResponse, Transition, WorkItem,
    stage_engine_server::StageEngine,
};
use orchestrator_proto::stage_engine::v1::{
    Artifact, CancelRequest, ItemCount, ListArtifactsRequest, ListArtifactsResponse,
    ReportJobFailedRequest, RetryRequest, SnapshotRequest, StageEngineSnapshot, StallFiring,
};
use orchestrator_tracker::local::LocalTracker;
use orchestrator_tracker::plane::PlaneTracker;
use orchestrator_tracker::{IssueRef, Tracker, TrackerKind};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::config::StageEngineConfig;
use crate::engine::{Advanced, ApprovalRef, Engine, JobRef, NewWorkItem, required};
use crate::error::EngineError;
use crate::outbox::{self, Effect};
use crate::park::{DEPLOY_FINALIZER, FailedJob};
use crate::peers::{GrpcPeers, Peers};
use crate::pipeline::{Outcome, Stage, Status as ItemStatus, Trigger};
use crate::qg::CheckResult;
use crate::store::{self, WorkItemRow};

/// The stage-engine gRPC service.
#[derive(Clone)]
pub struct StageEngineService {
    engine: Engine,
}

impl StageEngineService {
    /// Builds the service from the environment (tracker, forge, budgets) and starts its
    /// outbox dispatcher and its stall watchdog, which stop with `shutdown`.
    pub fn start(
        db: Db,
        clients: Clients,
        env: &orchestrator_kit::Env,
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        let config = StageEngineConfig::from_env(env)?;
        let forge = orchestrator_forge::build(&config.forge)?;
        let service = Self::from_parts(db, config, forge, Arc::new(GrpcPeers::new(clients)), None)?;
        tokio::spawn(crate::reconcile::run(
            service.engine.clone(),
            shutdown.clone(),
        ));
        tokio::spawn(service.engine.dispatcher().run(shutdown.clone()));
        tokio::spawn(crate::ci::run(service.engine.clone(), shutdown.clone()));
        tokio::spawn(service.engine.stall_watchdog().run(shutdown));
        Ok(service)
    }

    /// Builds the service from its parts, without starting the dispatcher or the watchdog
    /// (tests drive them).
    /// The tracker is built from the configuration unless one is given.
    pub fn from_parts(
        db: Db,
        config: StageEngineConfig,
        forge: Arc<dyn Forge>,
        peers: Arc<dyn Peers>,
        tracker: Option<Arc<dyn Tracker>>,
    ) -> Result<Self, ConfigError> {
        let local_tracker =
            (config.tracker.kind == TrackerKind::Local).then(|| LocalTracker::new(db.clone()));
        let tracker: Arc<dyn Tracker> = match (tracker, &local_tracker, &config.tracker.plane) {
            (Some(t), _, _) => t,
            (None, Some(local), _) => Arc::new(local.clone()),
            (None, None, Some(plane)) => {
                Arc::new(PlaneTracker::new(plane.clone()).map_err(|e| {
                    ConfigError::new(
                        "PLANE_BASE_URL",
                        format!("cannot build the HTTP client: {e}"),
                    )
                })?)
            }
            (None, None, None) => {
                return Err(ConfigError::new(
                    "ORCH_TRACKER",
                    "plane needs PLANE_BASE_URL",
                ));
            }
        };
        tracing::info!(tracker = %tracker.kind(), forge = %forge.kind(), "stage-engine configured");
        Ok(StageEngineService {
            engine: Engine {
                db,
                config: Arc::new(config),
                tracker,
                forge,
                peers,
                notify: Arc::new(Notify::new()),
                local_tracker,
                watchdog: Arc::default(),
            },
        })
    }

    /// The engine behind the RPCs.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    async fn item(&self, key: &str) -> Result<WorkItemRow, EngineError> {
        let key = required("work_item", key)?;
        store::get(&self.engine.db, key)
            .await?
            .ok_or_else(|| EngineError::NotFound(format!("work item {key} not found")))
    }
}

/// The id a human's command (an approval, a retry) is deduplicated by: the tracker
/// comment's, or a fresh one for a command without a comment (the CLI's).
fn command_id(comment_id: &str) -> Result<String, EngineError> {
    if comment_id.trim().is_empty() {
        Ok(outbox::new_id())
    } else {
        Ok(required("comment_id", comment_id)?.to_owned())
    }
}

/// A work item as the proto shows it; `forge` names where its PR is seen.
pub fn to_proto(i: &WorkItemRow, forge: &dyn orchestrator_forge::Forge) -> WorkItem {
    let pr_url = match orchestrator_forge::RepoName::parse(&i.repo) {
        Ok(repo) if i.pr_number > 0 => forge.pr_url(&repo, i.pr_number),
        _ => String::new(),
    };
    WorkItem {
        key: i.key.clone(),
        tracker_issue_id: i.tracker_issue_id.clone(),
        title: i.title.clone(),
        repo: i.repo.clone(),
        branch: i.branch.clone(),
        stage: i.stage.as_str().to_owned(),
        status: i.status.as_str().to_owned(),
        rollback_count: i.rollback_count,
        created_at_ms: i.created_at_ms,
        updated_at_ms: i.updated_at_ms,
        tracker_project_id: i.tracker_project_id.clone(),
        expected_agent: i.expected_agent.clone(),
        latest_job_id: i.latest_job_id.clone(),
        stage_retries: i.stage_retries,
        expected_dedupe_key: i.expected_dedupe_key.clone(),
        description: i.description.clone(),
        status_reason: i.status_reason.clone(),
        pr_number: i.pr_number,
        pr_url,
    }
}

fn qg_proto(qg: &[CheckResult]) -> Vec<QgResult> {
    qg.iter()
        .map(|r| QgResult {
            check: r.check.to_owned(),
            passed: r.outcome.passed(),
            detail: r.outcome.detail().to_owned(),
        })
        .collect()
}

fn advance_response(a: Advanced, forge: &dyn orchestrator_forge::Forge) -> AdvanceStageResponse {
    let outcome = match a.outcome {
        Outcome::Advanced | Outcome::Unblocked => AdvanceOutcome::Advanced,
        Outcome::Retried => AdvanceOutcome::Retried,
        Outcome::RolledBack => AdvanceOutcome::RolledBack,
        Outcome::AwaitingApproval => AdvanceOutcome::AwaitingApproval,
        Outcome::Blocked => AdvanceOutcome::Blocked,
        Outcome::Done => AdvanceOutcome::Done,
        Outcome::Unchanged => AdvanceOutcome::Unchanged,
        Outcome::Cancelled => AdvanceOutcome::Cancelled,
    };
    AdvanceStageResponse {
        work_item: Some(to_proto(&a.item, forge)),
        outcome: outcome as i32,
        qg_results: qg_proto(&a.qg),
        enqueued_agent: a.enqueued_agent.unwrap_or_default().to_owned(),
        reason: a.reason,
    }
}

/// The work item a human's command names: by key, else by its tracker issue (a tracker
/// comment names only its issue).
async fn key_of(
    engine: &Engine,
    work_item: &str,
    tracker_issue_id: &str,
) -> Result<String, EngineError> {
    if work_item.trim().is_empty() && !tracker_issue_id.trim().is_empty() {
        let issue = required("tracker_issue_id", tracker_issue_id)?;
        return Ok(store::get_by_tracker_issue(&engine.db, issue)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!("no work item for tracker issue {issue}"))
            })?
            .key);
    }
    Ok(required("work_item", work_item)?.to_owned())
}

/// A request's `repo`, present and valid (the git layer's one rule).
fn repo_field(value: &str) -> Result<orchestrator_forge::RepoName, EngineError> {
    orchestrator_git::validate_repo(required("repo", value)?).map_err(|e| {
        EngineError::InvalidField {
            field: "repo",
            reason: e.to_string(),
        }
    })
}

/// A request's `branch`, present and valid (the git layer's one rule).
fn branch_field(value: &str) -> Result<&str, EngineError> {
    orchestrator_git::validate_branch(required("branch", value)?).map_err(|e| {
        EngineError::InvalidField {
            field: "branch",
            reason: e.to_string(),
        }
    })
}

/// The agents that finish stages (the ones `AdvanceStage` accepts).
const AGENTS: [&str; 6] = crate::pipeline::ROLES;

/// The launcher's reserved jobs (`ReportJobFailed` accepts them too).
const RESERVED: [&str; 2] = [DEPLOY_FINALIZER, outbox::POST_DEPLOY_MONITOR];

#[tonic::async_trait]
impl StageEngine for StageEngineService {
    #[tracing::instrument(skip_all, fields(tracker_issue_id = %request.get_ref().tracker_issue_id, key = %request.get_ref().key, tracker_sequence_id = request.get_ref().tracker_sequence_id))]
    async fn create_work_item(
        &self,
        request: Request<CreateWorkItemRequest>,
    ) -> Result<Response<CreateWorkItemResponse>, Status> {
        let r = request.into_inner();
        let (item, created) = self
            .engine
            .create_work_item(NewWorkItem {
                tracker_issue_id: r.tracker_issue_id,
                tracker_project_id: r.tracker_project_id,
                tracker_sequence_id: r.tracker_sequence_id,
                key: r.key,
                title: r.title,
                description: r.description,
                repo: r.repo,
                branch: r.branch,
            })
            .await?;
        Ok(Response::new(CreateWorkItemResponse {
            work_item: Some(to_proto(&item, &*self.engine.forge)),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(key = %request.get_ref().key))]
    async fn get_work_item(
        &self,
        request: Request<GetWorkItemRequest>,
    ) -> Result<Response<WorkItem>, Status> {
        let key = required("key", &request.get_ref().key)?;
        let item = store::get(&self.engine.db, key)
            .await
            .map_err(EngineError::from)?
            .ok_or_else(|| EngineError::NotFound(format!("work item {key} not found")))?;
        Ok(Response::new(to_proto(&item, &*self.engine.forge)))
    }

    #[tracing::instrument(skip_all, fields(tracker_issue_id = %request.get_ref().tracker_issue_id))]
    async fn update_description(
        &self,
        request: Request<orchestrator_proto::stage_engine::v1::UpdateDescriptionRequest>,
    ) -> Result<Response<WorkItem>, Status> {
        let r = request.into_inner();
        let item = self
            .engine
            .update_description(&r.tracker_issue_id, &r.description)
            .await?;
        Ok(Response::new(to_proto(&item, &*self.engine.forge)))
    }

    #[tracing::instrument(skip_all)]
    async fn list_work_items(
        &self,
        request: Request<ListWorkItemsRequest>,
    ) -> Result<Response<ListWorkItemsResponse>, Status> {
        let r = request.into_inner();
        if !r.status.is_empty() {
            r.status
                .parse::<ItemStatus>()
                .map_err(|e| EngineError::InvalidField {
                    field: "status",
                    reason: e,
                })?;
        }
        if !r.stage.is_empty() {
            r.stage
                .parse::<Stage>()
                .map_err(|e| EngineError::InvalidField {
                    field: "stage",
                    reason: e,
                })?;
        }
        let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) };
        let items = store::list(
            &self.engine.db,
            &store::ListFilter {
                status: &r.status,
                stage: &r.stage,
                repo: &r.repo,
                limit,
                without_description: r.without_description,
            },
        )
        .await
        .map_err(EngineError::from)?;
        Ok(Response::new(ListWorkItemsResponse {
            work_items: items
                .iter()
                .map(|i| to_proto(i, &*self.engine.forge))
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, finished_agent = %request.get_ref().finished_agent, job_id = %request.get_ref().job_id))]
    async fn advance_stage(
        &self,
        request: Request<AdvanceStageRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        let r = request.into_inner();
        let key = required("work_item", &r.work_item)?.to_owned();
        let agent = r.finished_agent.trim().to_ascii_lowercase();
        if agent.is_empty() {
            return Err(EngineError::MissingField("finished_agent").into());
        }
        if !AGENTS.contains(&agent.as_str()) {
            return Err(EngineError::InvalidField {
                field: "finished_agent",
                reason: format!(
                    "unknown agent '{}' (expected one of {})",
                    agent.escape_debug(),
                    AGENTS.join(", ")
                ),
            }
            .into());
        }
        let head_sha = r.head_sha.trim();
        if !head_sha.is_empty()
            && (head_sha.len() > 64 || !head_sha.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(EngineError::InvalidField {
                field: "head_sha",
                reason: format!("'{}' is not a commit id", head_sha.escape_debug()),
            }
            .into());
        }
        let job = if r.job_id.trim().is_empty() {
            None
        } else {
            Some(JobRef {
                job_id: required("job_id", &r.job_id)?.to_owned(),
                attempt: r.attempt,
                dedupe_key: r.dedupe_key.trim().to_owned(),
                pr_number: r.pr_number,
                head_sha: head_sha.to_owned(),
            })
        };
        let a = self
            .engine
            .advance_stage(
                &key,
                Trigger::AgentFinished {
                    agent: agent.clone(),
                },
                job.clone(),
                None,
            )
            .await?;
        crate::ci::note(&self.engine, &key, &agent, job.as_ref(), &a)
            .await
            .map_err(EngineError::from)?;
        Ok(Response::new(advance_response(a, &*self.engine.forge)))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, tracker_issue_id = %request.get_ref().tracker_issue_id, author = %request.get_ref().author))]
    async fn approve(
        &self,
        request: Request<ApproveRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        let r = request.into_inner();
        let key = key_of(&self.engine, &r.work_item, &r.tracker_issue_id).await?;
        let author = required("author", &r.author)?.to_owned();
        let comment_id = command_id(&r.comment_id)?;
        let human = !self.engine.config.is_bot(&author);
        let a = self
            .engine
            .advance_stage(
                &key,
                Trigger::Approval { author, human },
                None,
                Some(ApprovalRef { comment_id }),
            )
            .await?;
        Ok(Response::new(advance_response(a, &*self.engine.forge)))
    }

    #[tracing::instrument(skip_all, fields(repo = %request.get_ref().repo, branch = %request.get_ref().branch, pr = request.get_ref().pr_number))]
    async fn on_pr_merged(
        &self,
        request: Request<OnPrMergedRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        let r = request.into_inner();
        let repo = repo_field(&r.repo)?;
        let branch = branch_field(&r.branch)?;
        let item = store::find_by_branch(&self.engine.db, &repo.to_string(), branch)
            .await
            .map_err(EngineError::from)?
            .ok_or_else(|| {
                EngineError::NotFound(format!("no work item for branch {branch} of {repo}"))
            })?;
        let a = self
            .engine
            .advance_stage(&item.key, Trigger::PrMerged, None, None)
            .await?;
        Ok(Response::new(advance_response(a, &*self.engine.forge)))
    }

    #[tracing::instrument(skip_all, fields(repo = %request.get_ref().repo, branch = %request.get_ref().branch, pr = request.get_ref().pr_number))]
    async fn on_pr_review(
        &self,
        request: Request<OnPrReviewRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        let r = request.into_inner();
        let repo = repo_field(&r.repo)?;
        let branch = branch_field(&r.branch)?;
        if r.pr_number == 0 {
            return Err(EngineError::MissingField("pr_number").into());
        }
        let reviewer = required("reviewer", &r.reviewer)?.to_owned();
        let state = match r.state.as_str() {
            "approved" => orchestrator_forge::ReviewState::Approved,
            "changes_requested" => orchestrator_forge::ReviewState::ChangesRequested,
            "comment" => orchestrator_forge::ReviewState::Comment,
            other => {
                return Err(EngineError::InvalidField {
                    field: "state",
                    reason: format!(
                        "'{}' is not approved, changes_requested or comment",
                        other.chars().take(40).collect::<String>()
                    ),
                }
                .into());
            }
        };
        let ev = crate::reviews::ReviewEvent {
            repo,
            branch: branch.to_owned(),
            pr_number: r.pr_number,
            reviewer,
            state,
            body: r.body,
        };
        let a = self.engine.on_pr_review(&ev).await?;
        Ok(Response::new(advance_response(a, &*self.engine.forge)))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, event = %request.get_ref().event))]
    async fn notify(
        &self,
        request: Request<NotifyRequest>,
    ) -> Result<Response<NotifyResponse>, Status> {
        let r = request.into_inner();
        let item = self.item(&r.work_item).await?;
        let event = required("event", &r.event)?;
        let event_id = required("event_id", &r.event_id)?;
        let text = r.text.trim();
        if text.is_empty() {
            return Err(EngineError::MissingField("text").into());
        }
        if text.len() > 10_000 {
            return Err(EngineError::InvalidField {
                field: "text",
                reason: "longer than 10000 bytes".to_owned(),
            }
            .into());
        }
        let comment = Effect::Comment {
            html: format!("<p>{}</p>", outbox::escape(text)),
            author: "stream".to_owned(),
        };
        let mut tx = self
            .engine
            .db
            .pool
            .begin()
            .await
            .map_err(EngineError::from)?;
        let (_, created) = outbox::insert(
            &mut tx,
            &item.key,
            &comment,
            Some(&format!("{event_id}:comment")),
        )
        .await
        .map_err(EngineError::from)?;
        if let Some((n, key)) =
            crate::notify::for_event(&self.engine.config.notify, event_id, &item.key, event, text)
        {
            outbox::insert(&mut tx, &item.key, &n, Some(&key))
                .await
                .map_err(EngineError::from)?;
        }
        tx.commit().await.map_err(EngineError::from)?;
        if created {
            self.engine.notify.notify_one();
        }
        Ok(Response::new(NotifyResponse { created }))
    }

    #[tracing::instrument(skip_all, fields(repo = %request.get_ref().repo, sha = %request.get_ref().sha))]
    async fn on_commit_status(
        &self,
        request: Request<OnCommitStatusRequest>,
    ) -> Result<Response<OnCommitStatusResponse>, Status> {
        let r = request.into_inner();
        let repo = repo_field(&r.repo)?;
        let rechecked = self.engine.on_commit_status(&repo.to_string()).await?;
        Ok(Response::new(OnCommitStatusResponse { rechecked }))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item))]
    async fn list_transitions(
        &self,
        request: Request<ListTransitionsRequest>,
    ) -> Result<Response<ListTransitionsResponse>, Status> {
        let item = self.item(&request.get_ref().work_item).await?;
        let rows = store::list_transitions(&self.engine.db, &item.key)
            .await
            .map_err(EngineError::from)?;
        let transitions = rows
            .into_iter()
            .map(|t| {
                let qg: Vec<serde_json::Value> =
                    serde_json::from_str(&t.qg_results_json).unwrap_or_default();
                Transition {
                    work_item: t.work_item,
                    from_stage: t.from_stage,
                    to_stage: t.to_stage,
                    cause: t.cause,
                    finished_agent: t.finished_agent,
                    qg_results: qg
                        .iter()
                        .map(|v| QgResult {
                            check: v["check"].as_str().unwrap_or_default().to_owned(),
                            passed: v["passed"].as_bool().unwrap_or(false),
                            detail: v["detail"].as_str().unwrap_or_default().to_owned(),
                        })
                        .collect(),
                    at_ms: t.at_ms,
                }
            })
            .collect();
        Ok(Response::new(ListTransitionsResponse { transitions }))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, state = %request.get_ref().state))]
    async fn list_outbox(
        &self,
        request: Request<ListOutboxRequest>,
    ) -> Result<Response<ListOutboxResponse>, Status> {
        let r = request.into_inner();
        if !r.state.is_empty()
            && !["pending", "delivering", "delivered", "failed"].contains(&r.state.as_str())
        {
            return Err(EngineError::InvalidField {
                field: "state",
                reason: "expected pending, delivering, delivered or failed".to_owned(),
            }
            .into());
        }
        let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) };
        let entries = outbox::list(&self.engine.db, r.work_item.trim(), &r.state, limit)
            .await
            .map_err(EngineError::from)?;
        Ok(Response::new(ListOutboxResponse {
            entries: entries
                .into_iter()
                .map(|e| OutboxEntry {
                    id: e.id,
                    work_item: e.work_item,
                    kind: e.kind,
                    payload_json: e.payload_json,
                    state: e.state,
                    attempts: e.attempts,
                    next_attempt_at_ms: e.next_attempt_at_ms,
                    last_error: e.last_error,
                    created_at_ms: e.created_at_ms,
                    channel: e.channel,
                    delivered_at_ms: e.delivered_at_ms,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, author = %request.get_ref().author))]
    async fn add_comment(
        &self,
        request: Request<AddCommentRequest>,
    ) -> Result<Response<AddCommentResponse>, Status> {
        let r = request.into_inner();
        let item = self.item(&r.work_item).await?;
        if r.html.trim().is_empty() {
            return Err(EngineError::MissingField("html").into());
        }
        if r.html.len() > 100_000 {
            return Err(EngineError::InvalidField {
                field: "html",
                reason: "longer than 100000 bytes".to_owned(),
            }
            .into());
        }
        let key = r.idempotency_key.trim();
        let key = if key.is_empty() {
            None
        } else {
            Some(required("idempotency_key", key)?)
        };
        let effect = Effect::Comment {
            html: r.html,
            author: r.author.trim().to_ascii_lowercase(),
        };
        let mut tx = self
            .engine
            .db
            .pool
            .begin()
            .await
            .map_err(EngineError::from)?;
        let (id, created) = outbox::insert(&mut tx, &item.key, &effect, key)
            .await
            .map_err(EngineError::from)?;
        tx.commit().await.map_err(EngineError::from)?;
        if created {
            self.engine.notify.notify_one();
            return Ok(Response::new(AddCommentResponse {
                outbox_id: id,
                created,
            }));
        }
        let existing = match key {
            Some(k) => outbox::by_idempotency_key(&self.engine.db, k)
                .await
                .map_err(EngineError::from)?,
            None => None,
        };
        Ok(Response::new(AddCommentResponse {
            outbox_id: existing.map(|e| e.id).unwrap_or_default(),
            created: false,
        }))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item))]
    async fn list_comments(
        &self,
        request: Request<ListCommentsRequest>,
    ) -> Result<Response<ListCommentsResponse>, Status> {
        let item = self.item(&request.get_ref().work_item).await?;
        if item.tracker_project_id.is_empty() {
            return Ok(Response::new(ListCommentsResponse {
                comments: Vec::new(),
            }));
        }
        let issue = IssueRef {
            project_id: item.tracker_project_id.clone(),
            issue_id: item.tracker_issue_id.clone(),
        };
        let comments = self
            .engine
            .tracker
            .list_comments(&issue)
            .await
            .map_err(|e| {
                if e.is_transient() {
                    EngineError::Unavailable(format!("the tracker is unavailable: {e}"))
                } else {
                    EngineError::Precondition(format!("the tracker refused: {e}"))
                }
            })?;
        Ok(Response::new(ListCommentsResponse {
            comments: comments
                .into_iter()
                .map(|c| Comment {
                    id: c.id,
                    author: c.author,
                    html: c.html,
                    external_id: c.external_id.unwrap_or_default(),
                    created_at: c.created_at,
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(id = %request.get_ref().id, work_item = %request.get_ref().work_item))]
    async fn retry_outbox(
        &self,
        request: Request<RetryOutboxRequest>,
    ) -> Result<Response<RetryOutboxResponse>, Status> {
        let r = request.into_inner();
        let (id, work_item) = (r.id.trim(), r.work_item.trim());
        if id.is_empty() && work_item.is_empty() {
            return Err(EngineError::MissingField("id or work_item").into());
        }
        let n = outbox::retry_failed(&self.engine.db, id, work_item)
            .await
            .map_err(EngineError::from)?;
        if n > 0 {
            tracing::info!(retried = n, "failed outbox entries put back to pending");
            self.engine.notify.notify_one();
        }
        Ok(Response::new(RetryOutboxResponse {
            retried: u32::try_from(n).unwrap_or(u32::MAX),
        }))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, agent = %request.get_ref().agent, job_id = %request.get_ref().job_id))]
    async fn report_job_failed(
        &self,
        request: Request<ReportJobFailedRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        let r = request.into_inner();
        let key = required("work_item", &r.work_item)?.to_owned();
        let agent = required("agent", &r.agent)?.to_ascii_lowercase();
        if !AGENTS.contains(&agent.as_str()) && !RESERVED.contains(&agent.as_str()) {
            return Err(EngineError::InvalidField {
                field: "agent",
                reason: format!(
                    "unknown agent '{}' (expected one of {}, {})",
                    agent.escape_debug(),
                    AGENTS.join(", "),
                    RESERVED.join(", ")
                ),
            }
            .into());
        }
        if r.reason.len() > 10_000 || r.outcome.len() > 200 {
            return Err(EngineError::InvalidField {
                field: "reason",
                reason: "reason longer than 10000 bytes or outcome longer than 200".to_owned(),
            }
            .into());
        }
        let failed = FailedJob {
            agent,
            job: JobRef {
                job_id: required("job_id", &r.job_id)?.to_owned(),
                attempt: r.attempt,
                dedupe_key: r.dedupe_key.trim().to_owned(),
                ..JobRef::default()
            },
            outcome: r.outcome.trim().to_owned(),
            reason: r.reason.trim().to_owned(),
        };
        let a = self.engine.report_job_failed(&key, &failed).await?;
        Ok(Response::new(advance_response(a, &*self.engine.forge)))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, tracker_issue_id = %request.get_ref().tracker_issue_id, author = %request.get_ref().author))]
    async fn retry(
        &self,
        request: Request<RetryRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        let r = request.into_inner();
        let key = key_of(&self.engine, &r.work_item, &r.tracker_issue_id).await?;
        let author = required("author", &r.author)?.to_owned();
        let comment_id = command_id(&r.comment_id)?;
        let a = self.engine.retry(&key, &author, &comment_id).await?;
        Ok(Response::new(advance_response(a, &*self.engine.forge)))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, author = %request.get_ref().author))]
    async fn cancel(
        &self,
        request: Request<CancelRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        let r = request.into_inner();
        let key = required("work_item", &r.work_item)?.to_owned();
        let author = required("author", &r.author)?.to_owned();
        if r.reason.len() > 1000 || r.reason.chars().any(|c| c.is_control() && c != '\n') {
            return Err(EngineError::InvalidField {
                field: "reason",
                reason: "must be at most 1000 printable characters".to_owned(),
            }
            .into());
        }
        let a = self.engine.cancel(&key, &author, &r.reason).await?;
        Ok(Response::new(advance_response(a, &*self.engine.forge)))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item))]
    async fn list_artifacts(
        &self,
        request: Request<ListArtifactsRequest>,
    ) -> Result<Response<ListArtifactsResponse>, Status> {
        let artifacts = self
            .engine
            .list_artifacts(&request.get_ref().work_item)
            .await?;
        Ok(Response::new(ListArtifactsResponse {
            artifacts: artifacts
                .into_iter()
                .map(|a| Artifact {
                    stage: a.stage.as_str().to_owned(),
                    name: a.name.to_owned(),
                    path: a.path,
                    url: a.url,
                    read: a.content.is_some(),
                    exists: matches!(a.content, Some(Some(_))),
                    content: a.content.flatten().unwrap_or_default(),
                })
                .collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<StageEngineSnapshot>, Status> {
        let items = store::count_by_status(&self.engine.db)
            .await
            .map_err(EngineError::from)?;
        Ok(Response::new(StageEngineSnapshot {
            items: items
                .into_iter()
                .map(|(status, count)| ItemCount {
                    status: status.as_str().to_owned(),
                    count,
                })
                .collect(),
            stall_watchdog_firings: self
                .engine
                .stall_firings()
                .into_iter()
                .map(|(reason, count)| StallFiring {
                    reason: reason.as_str().to_owned(),
                    count,
                })
                .collect(),
        }))
    }
}
