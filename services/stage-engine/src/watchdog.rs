//! The stall watchdog: the backstop for any seam that loses a job's end or an enqueue.
//! Every `ORCH_STALL_CHECK_INTERVAL_S`, an `active` item that has had no queued or running
//! job for longer than `ORCH_STALL_S` is decided again from its latest launcher job: a
//! success is applied as the launcher would have (`advance_stage`), a failure parks the
//! item (`report_job_failed`), and no job at all (an enqueue lost) enqueues the stage's
//! agent again. Each firing is logged at WARN and counted by reason: it means a seam lost
//! something. One item's error never stops the loop; the next tick tries it again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use orchestrator_kit::time::now_ms;
use orchestrator_proto::launcher::v1::{Job, JobStatus};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, JobRef};
use crate::error::EngineError;
use crate::park::FailedJob;
use crate::pipeline::{Status, Trigger};
use crate::store::{self, WorkItemRow};

/// Why the watchdog fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StallReason {
    /// The latest job succeeded and its finish never reached `AdvanceStage`.
    LatestJobSucceeded,
    /// The latest job failed for good and its failure never reached `ReportJobFailed`.
    LatestJobFailed,
    /// The latest job was cancelled outside stage-engine (an operator on the launcher).
    LatestJobCancelled,
    /// No job of the expected enqueue exists: the enqueue was lost.
    NoJob,
}

impl StallReason {
    pub const ALL: [StallReason; 4] = [
        StallReason::LatestJobSucceeded,
        StallReason::LatestJobFailed,
        StallReason::LatestJobCancelled,
        StallReason::NoJob,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            StallReason::LatestJobSucceeded => "latest_job_succeeded",
            StallReason::LatestJobFailed => "latest_job_failed",
            StallReason::LatestJobCancelled => "latest_job_cancelled",
            StallReason::NoJob => "no_job",
        }
    }

    fn index(self) -> usize {
        StallReason::ALL
            .iter()
            .position(|r| *r == self)
            .unwrap_or_default()
    }
}

/// The watchdog's firings since start, by reason.
#[derive(Debug, Default)]
pub struct WatchdogStats {
    firings: [AtomicU64; 4],
}

impl WatchdogStats {
    pub fn record(&self, reason: StallReason) {
        self.firings[reason.index()].fetch_add(1, Ordering::Relaxed);
    }

    /// Every reason with its count (0 included).
    pub fn firings(&self) -> Vec<(StallReason, u64)> {
        StallReason::ALL
            .iter()
            .map(|r| (*r, self.firings[r.index()].load(Ordering::Relaxed)))
            .collect()
    }
}

/// What the watchdog does about one item.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Not stalled, and why.
    Wait(&'static str),
    Fire(StallReason),
}

/// The item's latest job among its jobs: the one of its expected enqueue.
pub fn latest_job<'a>(item: &WorkItemRow, jobs: &'a [Job]) -> Option<&'a Job> {
    jobs.iter().find(|j| {
        (!item.latest_job_id.is_empty() && j.id == item.latest_job_id)
            || (!item.expected_dedupe_key.is_empty() && j.dedupe_key == item.expected_dedupe_key)
    })
}

/// The watchdog's decision for one item, pure. `enqueue_pending`: the item's launcher
/// effects are still in the outbox (the outbox is on it, not a stall).
pub fn verdict(
    item: &WorkItemRow,
    now_ms: i64,
    stall: Duration,
    enqueue_pending: bool,
    latest: Option<&Job>,
) -> Verdict {
    if item.status != Status::Active {
        return Verdict::Wait("not active");
    }
    let stall_ms = i64::try_from(stall.as_millis()).unwrap_or(i64::MAX);
    // Idle since the later of its last change and its job's end.
    let since = item
        .updated_at_ms
        .max(latest.map_or(0, |j| j.finished_at_ms));
    if now_ms.saturating_sub(since) < stall_ms {
        return Verdict::Wait("changed recently");
    }
    if enqueue_pending {
        return Verdict::Wait("its enqueue is still in the outbox");
    }
    let Some(job) = latest else {
        return Verdict::Fire(StallReason::NoJob);
    };
    match job.status() {
        JobStatus::Queued | JobStatus::Running => Verdict::Wait("its job is queued or running"),
        JobStatus::Succeeded => Verdict::Fire(StallReason::LatestJobSucceeded),
        JobStatus::Failed => Verdict::Fire(StallReason::LatestJobFailed),
        JobStatus::Cancelled => Verdict::Fire(StallReason::LatestJobCancelled),
        JobStatus::Unspecified => Verdict::Wait("its job's status is unknown"),
    }
}

/// The watchdog loop over an engine.
#[derive(Clone)]
pub struct Watchdog {
    pub(crate) engine: Engine,
}

/// Items judged per tick at most (the oldest first); the rest wait for the next tick.
const BATCH: u32 = 100;

impl Watchdog {
    /// Runs until `shutdown`: one tick every check interval.
    pub async fn run(self, shutdown: CancellationToken) {
        let w = &self.engine.config.watchdog;
        tracing::info!(
            stall_s = w.stall.as_secs(),
            interval_s = w.interval.as_secs(),
            "stall watchdog started"
        );
        loop {
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(w.interval) => {}
            }
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "stall watchdog pass failed");
            }
        }
        tracing::info!("stall watchdog stopped");
    }

    /// One pass: judges the active items idle for longer than the stall time; returns the
    /// firings (work item and reason).
    pub async fn tick(&self) -> Result<Vec<(String, StallReason)>, sqlx::Error> {
        let now = now_ms();
        let stall = self.engine.config.watchdog.stall;
        let before = now.saturating_sub(i64::try_from(stall.as_millis()).unwrap_or(i64::MAX));
        let mut fired = Vec::new();
        for item in store::active_since(&self.engine.db, before, BATCH).await? {
            match self.check(&item, now).await {
                Ok(Some(reason)) => fired.push((item.key.clone(), reason)),
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(work_item = item.key, error = %e, "stall check failed; the next tick tries again");
                }
            }
        }
        Ok(fired)
    }

    async fn check(
        &self,
        item: &WorkItemRow,
        now: i64,
    ) -> Result<Option<StallReason>, EngineError> {
        let stall = self.engine.config.watchdog.stall;
        if launcher_effects_pending(&self.engine, &item.key).await? {
            return Ok(None);
        }
        let jobs = self.engine.peers.jobs_of(&item.key).await.map_err(|s| {
            EngineError::Unavailable(format!(
                "the launcher cannot list the jobs: {:?}: {}",
                s.code(),
                s.message()
            ))
        })?;
        let latest = latest_job(item, &jobs);
        let Verdict::Fire(reason) = verdict(item, now, stall, false, latest) else {
            return Ok(None);
        };
        tracing::warn!(
            work_item = item.key,
            stage = %item.stage,
            reason = reason.as_str(),
            job_id = latest.map(|j| j.id.as_str()).unwrap_or_default(),
            idle_s = (now - item.updated_at_ms) / 1000,
            "stall watchdog fired: a seam lost something"
        );
        self.engine.watchdog.record(reason);
        let applied = match (reason, latest) {
            (StallReason::LatestJobSucceeded, Some(job)) => {
                self.engine
                    .advance_stage(
                        &item.key,
                        Trigger::AgentFinished {
                            agent: job.agent.clone(),
                        },
                        Some(job_ref(job)),
                        None,
                    )
                    .await?
            }
            (StallReason::LatestJobFailed | StallReason::LatestJobCancelled, Some(job)) => {
                let outcome = if job.outcome.is_empty() {
                    job.status().as_str_name().to_ascii_lowercase()
                } else {
                    job.outcome.clone()
                };
                self.engine
                    .report_job_failed(
                        &item.key,
                        &FailedJob {
                            agent: job.agent.clone(),
                            job: job_ref(job),
                            outcome,
                            reason: job.reason.clone(),
                        },
                    )
                    .await?
            }
            _ => {
                let why = format!(
                    "stall watchdog: no job of the {} for {} after {} s (its enqueue was lost): enqueued again",
                    item.expected_agent,
                    item.stage,
                    stall.as_secs()
                );
                self.engine.reenqueue_stalled(item, &why).await?
            }
        };
        tracing::info!(
            work_item = item.key,
            outcome = applied.outcome.as_str(),
            reason = applied.reason,
            "stall watchdog applied"
        );
        Ok(Some(reason))
    }
}

fn job_ref(job: &Job) -> JobRef {
    JobRef {
        job_id: job.id.clone(),
        attempt: job.attempt,
        dedupe_key: job.dedupe_key.clone(),
    }
}

/// Whether an effect of the item's launcher channel (an enqueue, a cancel) waits in the
/// outbox: then the outbox is on it, and the item is not stalled.
async fn launcher_effects_pending(engine: &Engine, key: &str) -> Result<bool, EngineError> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS n FROM outbox WHERE work_item = $1 AND channel = 'launcher' \
         AND state IN ('pending', 'delivering')",
    )
    .bind(key)
    .fetch_one(&engine.db.pool)
    .await?;
    Ok(row.try_get::<i64, _>("n")? > 0)
}
