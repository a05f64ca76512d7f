//! The reaper: a loop every `ORCH_REAPER_INTERVAL_S` (and `TickNow`) that frees zombie jobs
//! through the launcher's guarded `FlipTerminal` and reclaims stale merge leases through
//! merge-gate. Each job is handled on its own: one that fails is logged, counted and skipped.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Instant;

use orchestrator_kit::clients::Clients;
use orchestrator_kit::retry;
use orchestrator_kit::time::now_ms;
use orchestrator_kit::{ConfigError, Db, Env};
use orchestrator_proto::launcher::v1::{
    FlipTerminalRequest, Job, JobKind, JobStatus, Liveness, ProcessProbe,
};
use orchestrator_proto::merge_gate::v1::ReclaimStaleLeasesRequest;
use orchestrator_proto::reaper::v1::{
    DeadStreak, ReaperSnapshot, SnapshotRequest, TickNowRequest, TickReport, reaper_server::Reaper,
};
use orchestrator_proto::stage_engine::v1::AdvanceStageRequest;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::config::ReaperConfig;
use crate::error::ReaperError;
use crate::peers::{GrpcPeers, Peers};
use crate::store::{self, TickRecord};
use crate::tiers::{Action, Rules, Seen, Streak, decide};

/// The reaper gRPC service; cheap to clone.
#[derive(Clone)]
pub struct ReaperService {
    inner: Arc<Inner>,
}

struct Inner {
    db: Db,
    config: ReaperConfig,
    peers: Arc<dyn Peers>,
    /// One tick at a time: the loop's and `TickNow`'s.
    tick_lock: tokio::sync::Mutex<()>,
}

/// Which tier acted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tier {
    DeadPid,
    ExitCode,
    Backstop,
}

impl Tier {
    fn of(action: Action) -> Tier {
        match action {
            Action::ExitCode { .. } => Tier::ExitCode,
            Action::Backstop { .. } => Tier::Backstop,
            Action::Nothing | Action::FlipDeadPid { .. } => Tier::DeadPid,
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Tier::DeadPid => "dead_pid",
            Tier::ExitCode => "exit_code",
            Tier::Backstop => "backstop",
        }
    }
}

/// What acting on one job came to.
struct Acted {
    key: (String, u32),
    tier: Tier,
    /// False: the job had already finished (someone else won the guarded flip).
    flipped: bool,
}

fn ms(d: std::time::Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// The `dedupe_key` stage-engine put in the job's payload, if any.
fn dedupe_key(job: &Job) -> String {
    serde_json::from_str::<serde_json::Value>(&job.payload_json)
        .ok()
        .and_then(|v| {
            v.get("dedupe_key")
                .and_then(|k| k.as_str())
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

impl ReaperService {
    /// Builds the service from the environment and starts its loop when
    /// `ORCH_REAPER_ENABLED`; the loop stops with `shutdown`.
    pub fn start(
        db: Db,
        clients: Clients,
        env: &Env,
        shutdown: CancellationToken,
    ) -> Result<Self, ConfigError> {
        let config = ReaperConfig::from_env(env)?;
        let service = Self::from_parts(db, config, Arc::new(GrpcPeers::new(clients)));
        service.spawn_loop(shutdown);
        Ok(service)
    }

    /// Builds the service from its parts, without a loop (tests drive the ticks).
    pub fn from_parts(db: Db, config: ReaperConfig, peers: Arc<dyn Peers>) -> Self {
        ReaperService {
            inner: Arc::new(Inner {
                db,
                config,
                peers,
                tick_lock: tokio::sync::Mutex::new(()),
            }),
        }
    }

    /// The settings in force.
    pub fn config(&self) -> &ReaperConfig {
        &self.inner.config
    }

    /// Starts the loop when enabled: a tick every interval (the first one interval after
    /// start), until `shutdown`. A tick in progress finishes first.
    pub fn spawn_loop(&self, shutdown: CancellationToken) -> Option<JoinHandle<()>> {
        let c = &self.inner.config;
        if !c.enabled {
            tracing::info!("reaper disabled (ORCH_REAPER_ENABLED=false): TickNow only");
            return None;
        }
        tracing::info!(
            interval_s = c.interval.as_secs(),
            dead_ticks = c.dead_ticks,
            max_running_s = c.max_running.as_secs(),
            lease_reclaim = c.lease_reclaim_enabled,
            "reaper started"
        );
        let service = self.clone();
        let interval = c.interval;
        Some(tokio::spawn(async move {
            let mut ticker =
                tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
            ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = ticker.tick() => {}
                }
                // A panic in a tick must not end the loop: run it as its own task.
                let one = service.clone();
                if let Err(e) = tokio::spawn(async move { one.tick().await }).await {
                    tracing::error!(error = %e, "reaper tick panicked; the loop goes on");
                }
            }
            tracing::info!("reaper stopped");
        }))
    }

    /// Runs one tick now.
    pub async fn tick(&self) -> TickRecord {
        self.tick_at(now_ms()).await
    }

    /// Runs one tick as if it were `now_ms` (tests move the clock).
    pub async fn tick_at(&self, now_ms: i64) -> TickRecord {
        let _one_at_a_time = self.inner.tick_lock.lock().await;
        let started = Instant::now();
        let mut rec = TickRecord {
            at_ms: now_ms,
            ..TickRecord::default()
        };
        let mut errors: Vec<String> = Vec::new();
        let mut dead_jobs: Vec<String> = Vec::new();
        let mut dead_instances: HashSet<String> = HashSet::new();
        if let Err(e) = self
            .jobs(
                now_ms,
                &mut rec,
                &mut errors,
                &mut dead_jobs,
                &mut dead_instances,
            )
            .await
        {
            tracing::warn!(error = %e, "reaper could not look at the running jobs");
            errors.push(e);
        }
        if self.inner.config.lease_reclaim_enabled {
            self.leases(&mut rec, &mut errors, dead_jobs, dead_instances)
                .await;
        }
        rec.errors = u32::try_from(errors.len()).unwrap_or(u32::MAX);
        rec.error = errors.into_iter().next().unwrap_or_default();
        rec.duration_ms = ms(started.elapsed());
        if let Err(e) = store::record_tick(&self.inner.db, &rec).await {
            tracing::error!(error = %e, "cannot record the reaper tick");
        }
        let flips = rec.flips_dead_pid + rec.flips_exit_code + rec.flips_backstop;
        if flips > 0 || rec.leases_reclaimed > 0 || rec.errors > 0 {
            tracing::info!(
                jobs_seen = rec.jobs_seen,
                flips_dead_pid = rec.flips_dead_pid,
                flips_exit_code = rec.flips_exit_code,
                flips_backstop = rec.flips_backstop,
                flips_lost = rec.flips_lost,
                leases_reclaimed = rec.leases_reclaimed,
                errors = rec.errors,
                duration_ms = rec.duration_ms,
                "reaper tick"
            );
        } else {
            tracing::debug!(
                jobs_seen = rec.jobs_seen,
                duration_ms = rec.duration_ms,
                "reaper tick"
            );
        }
        rec
    }

    /// The three tiers over every running job.
    async fn jobs(
        &self,
        now: i64,
        rec: &mut TickRecord,
        errors: &mut Vec<String>,
        dead_jobs: &mut Vec<String>,
        dead_instances: &mut HashSet<String>,
    ) -> Result<(), String> {
        let inner = &self.inner;
        let c = &inner.config;
        // One look at every running job: the launcher's probes carry what the tiers need
        // (attempt, start, liveness, exit code). The whole job is fetched only for the few
        // acted on: with thousands running, the full list costs the launcher several times
        // the probes (docs/benchmarks/reaper.md).
        let probes = inner
            .peers
            .probe_processes()
            .await
            .map_err(|s| format!("launcher ProbeProcesses: {:?}: {}", s.code(), s.message()))?;
        rec.jobs_seen = u32::try_from(probes.len()).unwrap_or(u32::MAX);
        for p in &probes {
            if p.liveness() == Liveness::InstanceGone && !p.instance_id.is_empty() {
                dead_instances.insert(p.instance_id.clone());
            }
        }
        let previous: HashMap<(String, u32), Streak> = store::load_streaks(&inner.db)
            .await
            .map_err(|e| format!("cannot read the streaks: {e}"))?
            .into_iter()
            .map(|s| ((s.job_id.clone(), s.attempt), s))
            .collect();
        let rules = Rules {
            interval_ms: ms(c.interval),
            dead_ticks: c.dead_ticks,
            max_running_ms: ms(c.max_running),
        };

        let mut upserts = Vec::new();
        let mut deletes = Vec::new();
        let mut running = HashSet::new();
        let mut actions = Vec::new();
        for probe in probes {
            if probe.job_id.trim().is_empty() || probe.attempt == 0 {
                let e = format!(
                    "a running job without an id or attempt ({:?}, attempt {}): skipped",
                    probe.job_id, probe.attempt
                );
                tracing::warn!(job_id = %probe.job_id, attempt = probe.attempt, "running job without an id or attempt: skipped");
                errors.push(e);
                continue;
            }
            let key = (probe.job_id.clone(), probe.attempt);
            running.insert(key.clone());
            let seen = Seen {
                job_id: &probe.job_id,
                attempt: probe.attempt,
                started_at_ms: probe.started_at_ms,
                liveness: Some(probe.liveness()),
                exit_code: probe.exit_code,
            };
            let prev = previous.get(&key);
            let d = decide(&seen, prev, now, &rules);
            match (&d.streak, prev) {
                (Some(s), p) if p != Some(s) => upserts.push(s.clone()),
                (None, Some(_)) => deletes.push(key.clone()),
                _ => {}
            }
            if d.action != Action::Nothing {
                let liveness = d
                    .streak
                    .as_ref()
                    .map(|s| s.liveness.clone())
                    .unwrap_or_default();
                actions.push((probe, d.action, liveness));
            }
        }
        deletes.extend(previous.keys().filter(|k| !running.contains(*k)).cloned());
        if let Err(e) = store::save_streaks(&inner.db, &upserts, &deletes).await {
            // The decisions stand on the stored streaks and this observation: act anyway.
            tracing::error!(error = %e, "cannot store the dead-pid streaks");
            errors.push(format!("cannot store the streaks: {e}"));
        }

        let limit = Arc::new(tokio::sync::Semaphore::new(c.concurrency.max(1)));
        let mut tasks = tokio::task::JoinSet::new();
        for (probe, action, liveness) in actions {
            let service = self.clone();
            let limit = Arc::clone(&limit);
            tasks.spawn(async move {
                let _slot = limit.acquire_owned().await;
                let id = probe.job_id.clone();
                let attempt = probe.attempt;
                service
                    .act(&probe, action, &liveness)
                    .await
                    .map_err(|e| (id, attempt, e))
            });
        }
        let mut finished = Vec::new();
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(Ok(a)) => {
                    if a.flipped {
                        match a.tier {
                            Tier::DeadPid => rec.flips_dead_pid += 1,
                            Tier::ExitCode => rec.flips_exit_code += 1,
                            Tier::Backstop => rec.flips_backstop += 1,
                        }
                    } else {
                        rec.flips_lost += 1;
                    }
                    dead_jobs.push(a.key.0.clone());
                    finished.push(a.key);
                }
                Ok(Err((job_id, attempt, e))) => {
                    tracing::warn!(job_id = %job_id, attempt, error = %e, "reaper could not handle a job; skipped");
                    errors.push(format!("job {job_id} attempt {attempt}: {e}"));
                }
                Err(e) => errors.push(format!("a job's task failed: {e}")),
            }
        }
        // Those attempts are over: their streaks go.
        if let Err(e) = store::save_streaks(&inner.db, &[], &finished).await {
            errors.push(format!("cannot clear the streaks: {e}"));
        }
        Ok(())
    }

    /// Acts on one job; its only mutating call is the launcher's guarded `FlipTerminal`.
    async fn act(
        &self,
        probe: &ProcessProbe,
        action: Action,
        liveness: &str,
    ) -> Result<Acted, String> {
        let c = &self.inner.config;
        let job = self
            .inner
            .peers
            .get_job(&probe.job_id)
            .await
            .map_err(|s| format!("launcher GetJob: {:?}: {}", s.code(), s.message()))?;
        if job.status() != JobStatus::Running || job.attempt != probe.attempt {
            // Ended (or run again) since the probe: someone else finished that attempt.
            tracing::info!(job_id = %job.id, attempt = probe.attempt, "job already finished by someone else: nothing flipped");
            return Ok(Acted {
                key: (probe.job_id.clone(), probe.attempt),
                tier: Tier::of(action),
                flipped: false,
            });
        }
        let (tier, outcome, reason, exit_code, kill) = match action {
            Action::Nothing => {
                return Err("nothing to do".to_owned());
            }
            Action::FlipDeadPid { ticks } => (
                Tier::DeadPid,
                JobStatus::Failed,
                if liveness == "INSTANCE_GONE" {
                    format!(
                        "reaper: the launcher instance that ran it was gone for {ticks} consecutive ticks"
                    )
                } else {
                    format!("reaper: its process was dead for {ticks} consecutive ticks")
                },
                None,
                false,
            ),
            Action::ExitCode { code: 0, ticks } => {
                self.advance(&job).await?;
                (
                    Tier::ExitCode,
                    JobStatus::Succeeded,
                    format!(
                        "reaper: the agent exited 0 but the launcher never finalized it ({ticks} ticks); advanced through the quality gate"
                    ),
                    Some(0),
                    false,
                )
            }
            Action::ExitCode { code, ticks } => (
                Tier::ExitCode,
                JobStatus::Failed,
                format!(
                    "reaper: the agent exited {code} but the launcher never finalized it ({ticks} ticks)"
                ),
                Some(code),
                false,
            ),
            Action::Backstop { running_ms } => (
                Tier::Backstop,
                JobStatus::Failed,
                format!(
                    "reaper: running for {}s, over ORCH_REAPER_MAX_RUNNING_S={}; process group killed",
                    running_ms / 1000,
                    c.max_running.as_secs()
                ),
                Some(-9),
                true,
            ),
        };
        let answer = self
            .inner
            .peers
            .flip_terminal(FlipTerminalRequest {
                job_id: job.id.clone(),
                attempt: job.attempt,
                outcome: outcome as i32,
                reason: reason.clone(),
                exit_code,
                kill_process_group: kill,
            })
            .await
            .map_err(|s| format!("launcher FlipTerminal: {:?}: {}", s.code(), s.message()))?;
        if answer.flipped {
            tracing::info!(job_id = %job.id, attempt = job.attempt, work_item = %job.work_item, agent = %job.agent, tier = tier.as_str(), reason, "reaper flipped a job terminal");
        } else {
            tracing::info!(job_id = %job.id, attempt = job.attempt, tier = tier.as_str(), "job already finished by someone else: nothing flipped");
        }
        Ok(Acted {
            key: (job.id, job.attempt),
            tier,
            flipped: answer.flipped,
        })
    }

    /// Tier 2, exit 0: the quality gate decides, through stage-engine's one
    /// `AdvanceStage`. A reserved (no-LLM) job advances nothing. A refusal that is final
    /// (the work item is gone, or the job is stale) does not keep the job running.
    async fn advance(&self, job: &Job) -> Result<(), String> {
        if job.kind() == JobKind::Reserved {
            return Ok(());
        }
        let request = AdvanceStageRequest {
            work_item: job.work_item.clone(),
            finished_agent: job.agent.clone(),
            job_id: job.id.clone(),
            attempt: job.attempt,
            dedupe_key: dedupe_key(job),
            ..Default::default()
        };
        match self.inner.peers.advance_stage(request).await {
            Ok(r) => {
                tracing::info!(job_id = %job.id, work_item = %job.work_item, outcome = ?r.outcome(), reason = %r.reason, "advanced a job the launcher never finalized");
                Ok(())
            }
            Err(s) if !retry::is_retryable_status(&s) => {
                tracing::warn!(job_id = %job.id, work_item = %job.work_item, code = ?s.code(), message = s.message(), "stage-engine refused the advance; the job is flipped anyway");
                Ok(())
            }
            Err(s) => Err(format!(
                "stage-engine AdvanceStage: {:?}: {}",
                s.code(),
                s.message()
            )),
        }
    }

    /// Stale merge leases: those of the launcher instances found gone and of the jobs just
    /// flipped, plus whatever merge-gate finds stale itself (TTL, holder dead).
    async fn leases(
        &self,
        rec: &mut TickRecord,
        errors: &mut Vec<String>,
        dead_jobs: Vec<String>,
        dead_instances: HashSet<String>,
    ) {
        let mut dead_instance_ids: Vec<String> = dead_instances.into_iter().collect();
        dead_instance_ids.sort();
        match self
            .inner
            .peers
            .reclaim_stale_leases(ReclaimStaleLeasesRequest {
                dead_instance_ids,
                dead_job_ids: dead_jobs,
            })
            .await
        {
            Ok(r) => {
                for l in &r.reclaimed {
                    tracing::info!(repo = %l.repo, holder_job_id = %l.holder_job_id, instance_id = %l.instance_id, "stale merge lease reclaimed");
                }
                rec.leases_reclaimed = u32::try_from(r.reclaimed.len()).unwrap_or(u32::MAX);
            }
            Err(s) => {
                tracing::warn!(code = ?s.code(), message = s.message(), "cannot reclaim stale merge leases");
                errors.push(format!(
                    "merge-gate ReclaimStaleLeases: {:?}: {}",
                    s.code(),
                    s.message()
                ));
            }
        }
    }

    /// `Snapshot`: the settings, the totals and the streaks being watched.
    pub async fn snapshot(&self) -> Result<ReaperSnapshot, ReaperError> {
        let c = &self.inner.config;
        let t = store::totals(&self.inner.db).await?;
        let streaks = store::load_streaks(&self.inner.db).await?;
        Ok(ReaperSnapshot {
            enabled: c.enabled,
            interval_s: u32::try_from(c.interval.as_secs()).unwrap_or(u32::MAX),
            dead_ticks: c.dead_ticks,
            max_running_s: u32::try_from(c.max_running.as_secs()).unwrap_or(u32::MAX),
            lease_reclaim_enabled: c.lease_reclaim_enabled,
            ticks: t.ticks,
            last_tick_at_ms: t.last_tick_at_ms,
            flips_dead_pid: t.flips_dead_pid,
            flips_exit_code: t.flips_exit_code,
            flips_backstop: t.flips_backstop,
            leases_reclaimed: t.leases_reclaimed,
            errors: t.errors,
            last_error: t.last_error,
            flips_lost: t.flips_lost,
            last_tick_duration_ms: t.last_tick_duration_ms,
            last_jobs_seen: t.last_jobs_seen,
            dead_streaks: streaks
                .into_iter()
                .take(1000)
                .map(|s| DeadStreak {
                    job_id: s.job_id,
                    attempt: s.attempt,
                    ticks: s.ticks,
                    first_dead_at_ms: s.first_dead_at_ms,
                    last_dead_at_ms: s.last_dead_at_ms,
                    liveness: s.liveness,
                })
                .collect(),
        })
    }
}

/// A tick as the proto shows it.
pub fn to_report(r: &TickRecord) -> TickReport {
    TickReport {
        jobs_seen: r.jobs_seen,
        flips_dead_pid: r.flips_dead_pid,
        flips_exit_code: r.flips_exit_code,
        flips_backstop: r.flips_backstop,
        leases_reclaimed: r.leases_reclaimed,
        errors: r.errors,
        duration_ms: r.duration_ms,
        flips_lost: r.flips_lost,
        error: r.error.clone(),
    }
}

#[tonic::async_trait]
impl Reaper for ReaperService {
    #[tracing::instrument(skip_all)]
    async fn snapshot(
        &self,
        _request: Request<SnapshotRequest>,
    ) -> Result<Response<ReaperSnapshot>, Status> {
        Ok(Response::new(ReaperService::snapshot(self).await?))
    }

    #[tracing::instrument(skip_all)]
    async fn tick_now(
        &self,
        _request: Request<TickNowRequest>,
    ) -> Result<Response<TickReport>, Status> {
        Ok(Response::new(to_report(&self.tick().await)))
    }
}
