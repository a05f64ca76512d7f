//! The gRPC surface over the queue and the supervisor.

use std::path::PathBuf;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_forge::Forge;
use orchestrator_git::{validate_repo, validate_work_item_key};
use orchestrator_kit::clients::Clients;
use orchestrator_kit::outbox::State as OutboxState;
use orchestrator_kit::time::now_ms;
use orchestrator_kit::{ConfigError, Db, Env};
use orchestrator_proto::launcher::v1::{
    AgentCommand, BreakerState, BudgetCeiling, CancelJobRequest, CancelJobResponse, EnqueueRequest,
    EnqueueResponse, FlipTerminalRequest, FlipTerminalResponse, GetJobRequest, Job, JobKind,
    JobStatus, LauncherInstance, ListInstancesRequest, ListInstancesResponse, ListJobsRequest,
    ListJobsResponse, ListRunningRequest, ListRunningResponse, Liveness, LogChunk,
    ProbeProcessesRequest, ProbeProcessesResponse, ProcessProbe, QueueSnapshotRequest,
    QueueSnapshotResponse, RunningJob, Sandbox, SetSpendingCeilingRequest,
    SetSpendingCeilingResponse, StatusCount, TailLogRequest, launcher_server::Launcher,
};
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::agent::AgentEnv;
use crate::config::LauncherConfig;
use crate::error::LauncherError;
use crate::outbox::{Effect, OUTBOX};
use crate::peers::{GrpcPeers, Peers};
use crate::reserved::RESERVED;
use crate::rules::End;
use crate::sandbox::Availability;
use crate::store::{self, JobRow, Kind, NewJob, Status as JobState};
use crate::supervisor::{StopReason, Supervisor, job_dedupe_key};
use crate::workspace::Workspace;

/// The launcher gRPC service.
#[derive(Clone)]
pub struct LauncherService {
    sup: Supervisor,
}

/// A new job id: a UUIDv7, so ids sort in creation order.
pub fn new_job_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// Checks an agent name: it names a prompt file (`<agent>.md`), so only lower-case letters,
/// digits, `-` and `_`, starting with a letter.
pub fn validate_agent(agent: &str) -> Result<(), String> {
    let ok = !agent.is_empty()
        && agent.len() <= 64
        && agent.starts_with(|c: char| c.is_ascii_lowercase())
        && agent
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "agent '{}' is not valid: lower-case letters, digits, '-' and '_', starting with a letter",
            agent
                .chars()
                .take(64)
                .flat_map(char::escape_debug)
                .collect::<String>()
        ))
    }
}

fn required<'a>(field: &'static str, v: &'a str) -> Result<&'a str, LauncherError> {
    let v = v.trim();
    if v.is_empty() {
        Err(LauncherError::MissingField(field))
    } else {
        Ok(v)
    }
}

fn invalid(field: &'static str, reason: impl Into<String>) -> LauncherError {
    LauncherError::InvalidField {
        field,
        reason: reason.into(),
    }
}

impl LauncherService {
    /// Builds the service from the environment and starts its dispatcher, which stops (and
    /// hands its runs back to the queue) with `shutdown`. `roles`: the agents whose prompts
    /// must be there (stage-engine's `pipeline::ROLES`; the launcher keeps no list).
    pub fn start(
        db: Db,
        clients: Clients,
        env: &Env,
        roles: &[&str],
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        let config = LauncherConfig::from_env(env)?;
        config.check_at_start(roles)?;
        let forge = orchestrator_forge::build(&config.forge)?;
        let agent_env = AgentEnv::from_env(env, &config.env_passthrough);
        let svc = Self::from_parts(
            db,
            config,
            Arc::new(GrpcPeers::new(clients)),
            forge,
            agent_env,
        );
        svc.sup.start(shutdown);
        Ok(svc)
    }

    /// Builds the service from its parts without starting the dispatcher (see
    /// [`Supervisor::start`]).
    pub fn from_parts(
        db: Db,
        config: LauncherConfig,
        peers: Arc<dyn Peers>,
        forge: Arc<dyn Forge>,
        agent_env: AgentEnv,
    ) -> Self {
        let workspace =
            Workspace::new(forge, config.git_timeout).with_mirrors(config.workdir.join("mirrors"));
        tracing::info!(
            instance_id = config.instance_id,
            workdir = %config.workdir.display(),
            max_concurrency = config.max_concurrency,
            command = ?config.agent_command.first(),
            "launcher configured"
        );
        // Probed once, here at start-up: one WARN when it does not work.
        let _ = config.sandbox.availability(config.search_path.as_deref());
        if let Some(f) = config.failpoint {
            tracing::warn!(failpoint = ?f, "ORCH_TEST_FAILPOINT is set: this launcher will kill itself on purpose (fault tests only)");
        }
        LauncherService {
            sup: Supervisor::new(db, config, peers, workspace, agent_env),
        }
    }

    pub fn supervisor(&self) -> &Supervisor {
        &self.sup
    }

    /// Adds a job (idempotent on the dedupe key) and wakes the dispatcher.
    pub async fn enqueue_job(&self, r: EnqueueRequest) -> Result<(JobRow, bool), LauncherError> {
        let work_item = required("work_item", &r.work_item)?;
        validate_work_item_key(work_item).map_err(|e| invalid("work_item", e.to_string()))?;
        let repo = required("repo", &r.repo)?;
        validate_repo(repo).map_err(|e| invalid("repo", e.to_string()))?;
        let agent = required("agent", &r.agent)?;
        validate_agent(agent).map_err(|e| invalid("agent", e))?;
        let reserved = RESERVED.contains(&agent);
        let kind = match r.kind() {
            JobKind::Unspecified if reserved => Kind::Reserved,
            JobKind::Unspecified | JobKind::Llm if !reserved => Kind::Llm,
            JobKind::Reserved if reserved => Kind::Reserved,
            JobKind::Reserved => {
                return Err(invalid(
                    "agent",
                    format!(
                        "'{agent}' is not a reserved job (known: {})",
                        RESERVED.join(", ")
                    ),
                ));
            }
            _ => {
                return Err(invalid(
                    "kind",
                    format!("'{agent}' is a reserved job, not an LLM agent"),
                ));
            }
        };
        let payload = r.payload_json.trim();
        if !payload.is_empty() {
            let v: serde_json::Value = serde_json::from_str(payload)
                .map_err(|e| invalid("payload_json", format!("not JSON: {e}")))?;
            if !v.is_object() {
                return Err(invalid("payload_json", "must be a JSON object"));
            }
        }
        let stage = r.stage.trim();
        if stage.len() > 64 || stage.chars().any(char::is_control) {
            return Err(invalid("stage", "at most 64 printable characters"));
        }
        let dedupe = r.dedupe_key.trim();
        if dedupe.len() > 500 {
            return Err(invalid("dedupe_key", "at most 500 characters"));
        }
        let now = now_ms();
        let (row, created) = store::enqueue(
            self.sup.db(),
            &NewJob {
                id: new_job_id(),
                work_item: work_item.to_owned(),
                repo: repo.to_owned(),
                agent: agent.to_owned(),
                stage: stage.to_owned(),
                kind,
                payload_json: if payload.is_empty() {
                    "{}".to_owned()
                } else {
                    payload.to_owned()
                },
                dedupe_key: (!dedupe.is_empty()).then(|| dedupe.to_owned()),
                max_attempts: if r.max_attempts == 0 {
                    self.sup.config().max_attempts
                } else {
                    r.max_attempts
                },
                not_before_ms: if r.not_before_ms > 0 {
                    r.not_before_ms
                } else {
                    now
                },
                now_ms: now,
            },
        )
        .await?;
        if created {
            tracing::info!(
                job_id = row.id,
                work_item,
                agent,
                kind = kind.as_str(),
                "job enqueued"
            );
            self.sup.wake();
        }
        Ok((row, created))
    }

    async fn job(&self, id: &str) -> Result<JobRow, LauncherError> {
        let id = required("job_id", id)?;
        store::get(self.sup.db(), id)
            .await?
            .ok_or_else(|| LauncherError::NotFound(format!("job {id} not found")))
    }

    /// Liveness of running jobs: this instance checks its own processes; another
    /// instance's jobs are judged by that instance's heartbeats (it refreshes a job's
    /// heartbeat only while it still handles the run).
    pub async fn probe(&self, ids: &[String]) -> Result<Vec<ProcessProbe>, LauncherError> {
        let now = now_ms();
        let stale = i64::try_from(self.sup.config().instance_stale.as_millis()).unwrap_or(i64::MAX);
        let me = &self.sup.config().instance_id;
        let instances = store::instances(self.sup.db()).await?;
        let mut out = Vec::new();
        for job in store::running_runs(self.sup.db()).await? {
            if !ids.is_empty() && !ids.contains(&job.id) {
                continue;
            }
            let liveness = if &job.instance_id == me {
                let handled = self
                    .sup
                    .handle(&job.id)
                    .is_some_and(|h| h.attempt == job.attempt);
                // Our run is alive while we still handle it — finalizing included — so
                // that an exit code being finalized is not mistaken for a dead launcher.
                if handled {
                    Liveness::Alive
                } else {
                    Liveness::Dead
                }
            } else {
                match instances.iter().find(|i| i.id == job.instance_id) {
                    Some(i) if i.stopped_at_ms == 0 && now - i.heartbeat_at_ms <= stale => {
                        if now - job.heartbeat_at_ms <= stale {
                            Liveness::Alive
                        } else {
                            Liveness::Dead
                        }
                    }
                    _ => Liveness::InstanceGone,
                }
            };
            out.push(ProcessProbe {
                job_id: job.id.clone(),
                attempt: job.attempt,
                instance_id: job.instance_id.clone(),
                pid: job.pid,
                liveness: liveness as i32,
                exit_code: job.exit_code,
                started_at_ms: job.started_at_ms,
            });
        }
        Ok(out)
    }

    /// The guarded terminal flip (see the proto).
    pub async fn flip(&self, r: FlipTerminalRequest) -> Result<(bool, JobRow), LauncherError> {
        let job = self.job(&r.job_id).await?;
        if r.attempt == 0 {
            return Err(LauncherError::MissingField("attempt"));
        }
        let reason = if r.reason.trim().is_empty() {
            "flipped terminal".to_owned()
        } else {
            r.reason.trim().to_owned()
        };
        // A flip ends the run as its own finalize would have: a success advances the item
        // (the reaper's tier 2, exit 0), a failure for good is reported (in end_run_with).
        let mut effects = Vec::new();
        let end = match r.outcome() {
            JobStatus::Succeeded => {
                if job.kind == Kind::Llm {
                    effects = flip_success_effects(&job);
                }
                End::Succeeded {
                    outcome: "flipped".to_owned(),
                    note: reason,
                }
            }
            JobStatus::Failed => End::Permanent {
                outcome: "flipped",
                reason,
                retry: true,
            },
            JobStatus::Cancelled => End::Cancelled { reason },
            _ => {
                return Err(invalid("outcome", "must be SUCCEEDED, FAILED or CANCELLED"));
            }
        };
        if job.status != JobState::Running || job.attempt != r.attempt {
            return Ok((false, job));
        }
        let written = self
            .sup
            .end_run_with(&job, end, r.exit_code, None, effects)
            .await;
        let Some(row) = written else {
            let now = self.job(&job.id).await?;
            return Ok((false, now));
        };
        self.stop_process(&job, r.kill_process_group).await;
        if let Err(e) = store::breaker_release_probe(self.sup.db(), &job.id, now_ms()).await {
            tracing::warn!(error = %e, "cannot release the breaker probe");
        }
        Ok((true, row))
    }

    /// After a flip or a cancel by RPC: the run's process must go. Ours: through its
    /// handle (the run task kills the group). An orphan of our previous life: directly.
    /// Another instance's: its heartbeat sees the job ended and kills it.
    async fn stop_process(&self, job: &JobRow, kill_now: bool) {
        if let Some(h) = self
            .sup
            .handle(&job.id)
            .filter(|h| h.attempt == job.attempt)
        {
            h.stop(StopReason::EndedElsewhere);
            return;
        }
        if kill_now
            && job.instance_id == self.sup.config().instance_id
            && let Some(pgid) = job.pid.and_then(|p| i32::try_from(p).ok())
            && pgid > 1
        {
            crate::agent::kill_group(pgid, Duration::from_secs(1), None).await;
        }
    }

    pub async fn cancel(
        &self,
        job_id: &str,
        reason: &str,
    ) -> Result<(bool, JobRow), LauncherError> {
        let job = self.job(job_id).await?;
        let reason = if reason.trim().is_empty() {
            "cancelled by an operator".to_owned()
        } else {
            reason.trim().to_owned()
        };
        match job.status {
            JobState::Queued => {
                match store::cancel_queued(self.sup.db(), &job.id, &reason, now_ms()).await? {
                    Some(row) => Ok((true, row)),
                    // Claimed meanwhile: cancel the run instead.
                    None => Box::pin(self.cancel(job_id, &reason)).await,
                }
            }
            JobState::Running => {
                match self
                    .sup
                    .end_run(&job, End::Cancelled { reason }, None, None)
                    .await
                {
                    Some(row) => {
                        self.stop_process(&job, true).await;
                        let _ =
                            store::breaker_release_probe(self.sup.db(), &job.id, now_ms()).await;
                        Ok((true, row))
                    }
                    None => Ok((false, self.job(&job.id).await?)),
                }
            }
            _ => Ok((false, job)),
        }
    }
}

/// What a run flipped SUCCEEDED tells the others: its usage (from its log, when it has
/// one) and AdvanceStage — the quality gate decides, not the exit code.
fn flip_success_effects(job: &JobRow) -> Vec<Effect> {
    let mut effects = Vec::new();
    if !job.log_path.is_empty() {
        effects.push(Effect::RecordRun {
            job_id: job.id.clone(),
            attempt: job.attempt,
            agent: job.agent.clone(),
            output: crate::run::read_tail(std::path::Path::new(&job.log_path)),
            // Not known on the reaper's path: the reported cost stands (never less).
            resumed: false,
            repo: job.repo.clone(),
        });
    }
    effects.push(Effect::AdvanceStage {
        job_id: job.id.clone(),
        attempt: job.attempt,
        agent: job.agent.clone(),
        dedupe_key: job_dedupe_key(job),
        // The reaper's flip knows no PR: stage-engine looks it up where it needs one.
        pr_number: 0,
        head_sha: String::new(),
    });
    effects
}

/// A job as the proto shows it.
impl LauncherService {
    /// The launcher's outbox entries of `work_item` not yet delivered.
    async fn pending_effects(&self, work_item: &str) -> Result<u32, LauncherError> {
        let n = crate::outbox::OUTBOX
            .undelivered_of(self.sup.db(), work_item)
            .await?;
        Ok(u32::try_from(n).unwrap_or(u32::MAX))
    }
}

pub fn to_proto(j: &JobRow) -> Job {
    let status = match j.status {
        JobState::Queued => JobStatus::Queued,
        JobState::Running => JobStatus::Running,
        JobState::Succeeded => JobStatus::Succeeded,
        JobState::Failed => JobStatus::Failed,
        JobState::Cancelled => JobStatus::Cancelled,
    };
    let kind = match j.kind {
        Kind::Llm => JobKind::Llm,
        Kind::Reserved => JobKind::Reserved,
    };
    Job {
        id: j.id.clone(),
        work_item: j.work_item.clone(),
        repo: j.repo.clone(),
        agent: j.agent.clone(),
        stage: j.stage.clone(),
        kind: kind as i32,
        payload_json: j.payload_json.clone(),
        status: status as i32,
        attempt: j.attempt,
        max_attempts: j.max_attempts,
        transient_attempts: j.transient_attempts,
        not_before_ms: j.not_before_ms,
        instance_id: j.instance_id.clone(),
        pid: j.pid,
        exit_code: j.exit_code,
        enqueued_at_ms: j.enqueued_at_ms,
        started_at_ms: j.started_at_ms,
        heartbeat_at_ms: j.heartbeat_at_ms,
        finished_at_ms: j.finished_at_ms,
        log_path: j.log_path.clone(),
        outcome: j.outcome.clone(),
        reason: j.reason.clone(),
        qg_hook_blocks: j.qg_hook_blocks,
        failures: j.failures,
        dedupe_key: j.dedupe_key.clone().unwrap_or_default(),
        // Filled by GetJob and ListJobs, which read the outbox.
        pending_effects: 0,
        profile_json: j.profile_json.clone(),
    }
}

fn status_filter(s: JobStatus) -> &'static str {
    match s {
        JobStatus::Unspecified => "",
        JobStatus::Queued => "queued",
        JobStatus::Running => "running",
        JobStatus::Succeeded => "succeeded",
        JobStatus::Failed => "failed",
        JobStatus::Cancelled => "cancelled",
    }
}

type LogStream = Pin<Box<dyn Stream<Item = Result<LogChunk, Status>> + Send>>;

const CHUNK: usize = 64 * 1024;

#[tonic::async_trait]
impl Launcher for LauncherService {
    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, agent = %request.get_ref().agent))]
    async fn enqueue(
        &self,
        request: Request<EnqueueRequest>,
    ) -> Result<Response<EnqueueResponse>, Status> {
        let (job, created) = self.enqueue_job(request.into_inner()).await?;
        Ok(Response::new(EnqueueResponse {
            job: Some(to_proto(&job)),
            created,
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let job = self.job(&request.get_ref().job_id).await?;
        let mut out = to_proto(&job);
        out.pending_effects = self.pending_effects(&job.work_item).await?;
        Ok(Response::new(out))
    }

    #[tracing::instrument(skip_all)]
    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        let r = request.into_inner();
        let limit = if r.limit == 0 { 100 } else { r.limit.min(1000) };
        let jobs = store::list(
            self.sup.db(),
            &store::ListFilter {
                status: status_filter(r.status()),
                work_item: r.work_item.trim(),
                repo: r.repo.trim(),
                agent: r.agent.trim(),
                limit,
            },
        )
        .await
        .map_err(LauncherError::from)?;
        let mut pending: std::collections::HashMap<String, u32> = std::collections::HashMap::new();
        let mut out = Vec::with_capacity(jobs.len());
        for job in &jobs {
            let n = match pending.get(&job.work_item) {
                Some(n) => *n,
                None => {
                    let n = self.pending_effects(&job.work_item).await?;
                    pending.insert(job.work_item.clone(), n);
                    n
                }
            };
            let mut j = to_proto(job);
            j.pending_effects = n;
            out.push(j);
        }
        Ok(Response::new(ListJobsResponse { jobs: out }))
    }

    #[tracing::instrument(skip_all)]
    async fn queue_snapshot(
        &self,
        _request: Request<QueueSnapshotRequest>,
    ) -> Result<Response<QueueSnapshotResponse>, Status> {
        let db = self.sup.db();
        let counts = store::counts(db).await.map_err(LauncherError::from)?;
        let running = store::running(db).await.map_err(LauncherError::from)?;
        let breaker = store::breaker(db).await.map_err(LauncherError::from)?;
        let outbox = OUTBOX.counts(db).await.map_err(LauncherError::from)?;
        let outbox_count = |states: &[OutboxState]| -> u64 {
            outbox
                .iter()
                .filter(|(s, _)| states.contains(s))
                .map(|(_, n)| n)
                .sum()
        };
        let budget_waiting = store::count_queued_with_outcome(db, crate::ceilings::OUTCOME)
            .await
            .map_err(LauncherError::from)?;
        let budget_ceilings = self.budget_ceilings().await?;
        let config = self.sup.config().clone();
        let found = config.clone();
        let agent_command =
            match tokio::task::spawn_blocking(move || found.agent_command_found()).await {
                Ok(Some(_)) => AgentCommand::Found,
                Ok(None) => AgentCommand::NotFound,
                Err(_) => AgentCommand::Unspecified,
            };
        let now = now_ms();
        Ok(Response::new(QueueSnapshotResponse {
            counts: JobState::ALL
                .iter()
                .map(|s| StatusCount {
                    status: to_proto_status(*s) as i32,
                    count: counts.iter().find(|(c, _)| c == s).map_or(0, |(_, n)| *n),
                })
                .collect(),
            llm_running: u32::try_from(running.iter().filter(|j| j.kind == Kind::Llm).count())
                .unwrap_or(u32::MAX),
            running: running
                .iter()
                .map(|j| RunningJob {
                    job: Some(to_proto(j)),
                    age_ms: now - j.started_at_ms,
                })
                .collect(),
            agent_command: agent_command as i32,
            sandbox: match config.sandbox.availability(config.search_path.as_deref()) {
                Availability::On => Sandbox::On,
                Availability::Unavailable(_) => Sandbox::Unavailable,
                Availability::Off => Sandbox::Off,
            } as i32,
            max_concurrency: self.sup.config().max_concurrency,
            breaker: Some(BreakerState {
                state: breaker.state,
                consecutive_transient: breaker.consecutive_transient,
                open_until_ms: breaker.open_until_ms,
            }),
            outbox_pending: outbox_count(&[OutboxState::Pending, OutboxState::Delivering]),
            outbox_failed: outbox_count(&[OutboxState::Failed]),
            budget_ceilings,
            budget_waiting,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_running(
        &self,
        _request: Request<ListRunningRequest>,
    ) -> Result<Response<ListRunningResponse>, Status> {
        let jobs = store::running(self.sup.db())
            .await
            .map_err(LauncherError::from)?;
        Ok(Response::new(ListRunningResponse {
            jobs: jobs.iter().map(to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn probe_processes(
        &self,
        request: Request<ProbeProcessesRequest>,
    ) -> Result<Response<ProbeProcessesResponse>, Status> {
        let probes = self.probe(&request.get_ref().job_ids).await?;
        Ok(Response::new(ProbeProcessesResponse { probes }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id, attempt = request.get_ref().attempt))]
    async fn flip_terminal(
        &self,
        request: Request<FlipTerminalRequest>,
    ) -> Result<Response<FlipTerminalResponse>, Status> {
        let (flipped, job) = self.flip(request.into_inner()).await?;
        Ok(Response::new(FlipTerminalResponse {
            flipped,
            job: Some(to_proto(&job)),
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id))]
    async fn cancel_job(
        &self,
        request: Request<CancelJobRequest>,
    ) -> Result<Response<CancelJobResponse>, Status> {
        let r = request.into_inner();
        let (cancelled, job) = self.cancel(&r.job_id, &r.reason).await?;
        Ok(Response::new(CancelJobResponse {
            cancelled,
            job: Some(to_proto(&job)),
        }))
    }

    #[tracing::instrument(skip_all, fields(job_id = %request.get_ref().job_id, follow = request.get_ref().follow))]
    async fn tail_log(
        &self,
        request: Request<TailLogRequest>,
    ) -> Result<Response<LogStream>, Status> {
        let r = request.into_inner();
        let job = self.job(&r.job_id).await?;
        if job.log_path.is_empty() {
            return Err(LauncherError::Precondition(format!(
                "job {} has no log yet (it is {})",
                job.id, job.status
            ))
            .into());
        }
        let path = PathBuf::from(&job.log_path);
        let file = match tokio::fs::File::open(&path).await {
            Ok(f) => f,
            Err(e) if job.instance_id != self.sup.config().instance_id => {
                return Err(LauncherError::Precondition(format!(
                    "the log of job {} is on launcher instance {} ({e}); ask that instance",
                    job.id, job.instance_id
                ))
                .into());
            }
            Err(e) => {
                return Err(
                    LauncherError::NotFound(format!("the log of job {}: {e}", job.id)).into(),
                );
            }
        };
        let (tx, rx) = mpsc::channel(8);
        let sup = self.sup.clone();
        tokio::spawn(tail(sup, job, file, r.follow, tx));
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    #[tracing::instrument(skip_all, fields(period = %request.get_ref().period, repo = %request.get_ref().repo))]
    async fn set_spending_ceiling(
        &self,
        request: Request<SetSpendingCeilingRequest>,
    ) -> Result<Response<SetSpendingCeilingResponse>, Status> {
        let r = request.into_inner();
        let period = crate::ceilings::Period::parse(&r.period).ok_or_else(|| {
            LauncherError::InvalidField {
                field: "period",
                reason: format!("'{}' is not daily or monthly", r.period.escape_debug()),
            }
        })?;
        let repo = r.repo.trim();
        let repo = if repo.is_empty() {
            None
        } else {
            validate_repo(repo).map_err(|e| LauncherError::InvalidField {
                field: "repo",
                reason: e.to_string(),
            })?;
            Some(repo)
        };
        let usd = if r.clear {
            None
        } else if !r.usd.is_finite() || r.usd < 0.0 {
            return Err(LauncherError::InvalidField {
                field: "usd",
                reason: format!("{} is not a number of dollars >= 0", r.usd),
            }
            .into());
        } else {
            Some(r.usd)
        };
        let woken = self
            .sup
            .set_spending_ceiling(period, repo, usd)
            .await
            .map_err(LauncherError::from)?;
        Ok(Response::new(SetSpendingCeilingResponse {
            ceilings: self.budget_ceilings().await?,
            woken,
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_instances(
        &self,
        _request: Request<ListInstancesRequest>,
    ) -> Result<Response<ListInstancesResponse>, Status> {
        let instances = store::instances(self.sup.db())
            .await
            .map_err(LauncherError::from)?;
        Ok(Response::new(ListInstancesResponse {
            instances: instances
                .into_iter()
                .map(|i| LauncherInstance {
                    id: i.id,
                    host: i.host,
                    started_at_ms: i.started_at_ms,
                    heartbeat_at_ms: i.heartbeat_at_ms,
                    stopped_at_ms: i.stopped_at_ms,
                })
                .collect(),
        }))
    }
}

impl LauncherService {
    /// The ceilings in force with what was spent against each (the snapshot's, the RPC's).
    async fn budget_ceilings(&self) -> Result<Vec<BudgetCeiling>, LauncherError> {
        Ok(self
            .sup
            .ceiling_standings()
            .await?
            .into_iter()
            .map(|s| BudgetCeiling {
                period: s.ceiling.period.as_str().to_owned(),
                source: s.ceiling.source().to_owned(),
                repo: s.ceiling.repo.unwrap_or_default(),
                ceiling_usd: s.ceiling.usd,
                spent_usd: s.spent_usd,
                resets_at_ms: s.resets_at_ms,
            })
            .collect())
    }
}

fn to_proto_status(s: JobState) -> JobStatus {
    match s {
        JobState::Queued => JobStatus::Queued,
        JobState::Running => JobStatus::Running,
        JobState::Succeeded => JobStatus::Succeeded,
        JobState::Failed => JobStatus::Failed,
        JobState::Cancelled => JobStatus::Cancelled,
    }
}

/// Streams the log: what is there, then (when following) what is appended, until the run
/// ends; the last chunk says `eof` once the job has ended.
async fn tail(
    sup: Supervisor,
    job: JobRow,
    mut file: tokio::fs::File,
    follow: bool,
    tx: mpsc::Sender<Result<LogChunk, Status>>,
) {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; CHUNK];
    let mut last_check = std::time::Instant::now();
    let mut ended = false;
    loop {
        // Drain what is there now.
        loop {
            match file.read(&mut buf).await {
                Ok(0) => break,
                Ok(n) => {
                    let chunk = LogChunk {
                        data: buf[..n].to_vec(),
                        eof: false,
                    };
                    if tx.send(Ok(chunk)).await.is_err() {
                        return; // the client went away
                    }
                }
                Err(e) => {
                    let _ = tx
                        .send(Err(Status::internal(format!("reading the log: {e}"))))
                        .await;
                    return;
                }
            }
        }
        if ended {
            break;
        }
        let over = match sup.handle(&job.id).filter(|h| h.attempt == job.attempt) {
            Some(h) => *h.ended.borrow(),
            None => {
                // Not ours (or over): ask the queue now and then.
                if last_check.elapsed() >= Duration::from_millis(300) || !follow {
                    last_check = std::time::Instant::now();
                    match store::get(sup.db(), &job.id).await {
                        Ok(Some(j)) => j.status != JobState::Running || j.attempt != job.attempt,
                        Ok(None) => true,
                        Err(_) => false,
                    }
                } else {
                    false
                }
            }
        };
        if over {
            // One more pass for what was written before the end.
            ended = true;
            continue;
        }
        if !follow {
            break;
        }
        if tx.is_closed() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = tx
        .send(Ok(LogChunk {
            data: Vec::new(),
            eof: ended,
        }))
        .await;
}
