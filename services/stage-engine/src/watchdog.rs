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
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, JobRef};
use crate::error::EngineError;
use crate::outbox;
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
    // The launcher's outbox still holds the job's end (a peer it needs is down): moving.
    if job.pending_effects > 0 {
        return Verdict::Wait("its job's end is still in the launcher's outbox");
    }
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

/// Candidates read per page (the oldest first); a tick reads every page.
const PAGE: u32 = 100;

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
        let mut cursor: Option<(i64, String)> = None;
        loop {
            let page = store::active_since(
                &self.engine.db,
                before,
                cursor.as_ref().map(|(t, k)| (*t, k.as_str())),
                PAGE,
            )
            .await?;
            for item in &page {
                match self.check(item, now).await {
                    Ok(Some(reason)) => fired.push((item.key.clone(), reason)),
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(work_item = item.key, error = %e, "stall check failed; the next tick tries again");
                    }
                }
            }
            match page.last() {
                Some(last) if page.len() == PAGE as usize => {
                    cursor = Some((last.updated_at_ms, last.key.clone()));
                }
                _ => break,
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
        // Waiting for CI is waiting on purpose (`ci` checks it again), not a stall.
        if crate::ci::waiting(&self.engine, &item.key).await? {
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
                let a = self
                    .engine
                    .advance_stage(
                        &item.key,
                        Trigger::AgentFinished {
                            agent: job.agent.clone(),
                        },
                        Some(job_ref(job)),
                        None,
                    )
                    .await?;
                crate::ci::note(&self.engine, &item.key, &job.agent, Some(&job_ref(job)), &a)
                    .await?;
                a
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
        ..JobRef::default()
    }
}

/// Whether an effect of the item's launcher channel (an enqueue, a cancel) waits in the
/// outbox: then the outbox is on it, and the item is not stalled.
async fn launcher_effects_pending(engine: &Engine, key: &str) -> Result<bool, EngineError> {
    for state in ["pending", "delivering"] {
        let entries = outbox::list(&engine.db, key, state, 1000).await?;
        if entries.iter().any(|e| e.channel == "launcher") {
            return Ok(true);
        }
    }
    Ok(false)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipeline::Stage;

    const NOW: i64 = 10_000_000;
    const STALL: Duration = Duration::from_secs(600);

    fn item(status: Status, idle_s: i64) -> WorkItemRow {
        WorkItemRow {
            key: "ORCH-1".into(),
            tracker_issue_id: "i-1".into(),
            tracker_project_id: String::new(),
            title: String::new(),
            description: String::new(),
            repo: "acme/app".into(),
            branch: "orch/ORCH-1".into(),
            stage: Stage::Development,
            status,
            rollback_count: 0,
            stage_retries: 0,
            expected_agent: "developer".into(),
            expected_dedupe_key: "ORCH-1/t-2/developer".into(),
            latest_job_id: "job-2".into(),
            status_reason: String::new(),
            pr_number: 0,
            version: 3,
            created_at_ms: 0,
            updated_at_ms: NOW - idle_s * 1000,
        }
    }

    fn job(id: &str, dedupe: &str, status: JobStatus, finished_s_ago: Option<i64>) -> Job {
        Job {
            id: id.into(),
            dedupe_key: dedupe.into(),
            status: status as i32,
            finished_at_ms: finished_s_ago.map_or(0, |s| NOW - s * 1000),
            ..Job::default()
        }
    }

    #[test]
    fn the_latest_job_is_the_one_of_the_expected_enqueue() {
        let i = item(Status::Active, 700);
        let jobs = vec![
            job("job-1", "ORCH-1/t-1/developer", JobStatus::Succeeded, None),
            job("job-2", "ORCH-1/t-2/developer", JobStatus::Failed, None),
        ];
        assert_eq!(latest_job(&i, &jobs).map(|j| j.id.as_str()), Some("job-2"));
        // Before the Enqueue answer is recorded: found by its dedupe key.
        let mut unrecorded = i.clone();
        unrecorded.latest_job_id = String::new();
        assert_eq!(
            latest_job(&unrecorded, &jobs).map(|j| j.id.as_str()),
            Some("job-2")
        );
        // Only older jobs: none is the latest.
        assert_eq!(latest_job(&i, &jobs[..1]), None);
    }

    /// Every row: the item's status and idle time, its outbox, its latest job.
    #[test]
    fn the_verdict_table() {
        use JobStatus::*;
        use StallReason::*;
        let d = "ORCH-1/t-2/developer";
        let rows: Vec<(Status, i64, bool, Option<Job>, Verdict)> = vec![
            // Not active: never the watchdog's business.
            (
                Status::Blocked,
                9_999,
                false,
                None,
                Verdict::Wait("not active"),
            ),
            (
                Status::AwaitingApproval,
                9_999,
                false,
                None,
                Verdict::Wait("not active"),
            ),
            (
                Status::Done,
                9_999,
                false,
                None,
                Verdict::Wait("not active"),
            ),
            (
                Status::Cancelled,
                9_999,
                false,
                None,
                Verdict::Wait("not active"),
            ),
            // Active but moved recently (599 s < 600 s).
            (
                Status::Active,
                599,
                false,
                None,
                Verdict::Wait("changed recently"),
            ),
            // Its job ended recently, though the item is old: the launcher may be applying it.
            (
                Status::Active,
                9_999,
                false,
                Some(job("job-2", d, Succeeded, Some(10))),
                Verdict::Wait("changed recently"),
            ),
            // The outbox still holds its enqueue: the outbox is on it.
            (
                Status::Active,
                9_999,
                true,
                None,
                Verdict::Wait("its enqueue is still in the outbox"),
            ),
            // The job's end waits in the launcher's outbox (a peer down): moving, not stalled.
            (
                Status::Active,
                9_999,
                false,
                Some(Job {
                    pending_effects: 2,
                    ..job("job-2", d, Succeeded, Some(700))
                }),
                Verdict::Wait("its job's end is still in the launcher's outbox"),
            ),
            // A job that is queued or running: the launcher is on it (a long run is fine).
            (
                Status::Active,
                9_999,
                false,
                Some(job("job-2", d, Queued, None)),
                Verdict::Wait("its job is queued or running"),
            ),
            (
                Status::Active,
                9_999,
                false,
                Some(job("job-2", d, Running, None)),
                Verdict::Wait("its job is queued or running"),
            ),
            // Stalled: the job's end was lost, or the enqueue was.
            (
                Status::Active,
                600,
                false,
                Some(job("job-2", d, Succeeded, Some(700))),
                Verdict::Fire(LatestJobSucceeded),
            ),
            (
                Status::Active,
                9_999,
                false,
                Some(job("job-2", d, Failed, Some(601))),
                Verdict::Fire(LatestJobFailed),
            ),
            (
                Status::Active,
                9_999,
                false,
                Some(job("job-2", d, Cancelled, None)),
                Verdict::Fire(LatestJobCancelled),
            ),
            (Status::Active, 600, false, None, Verdict::Fire(NoJob)),
        ];
        for (status, idle, pending, latest, want) in rows {
            let got = verdict(&item(status, idle), NOW, STALL, pending, latest.as_ref());
            assert_eq!(
                got, want,
                "{status} idle {idle}s pending {pending} job {latest:?}"
            );
        }
    }

    #[test]
    fn firings_are_counted_per_reason() {
        let s = WatchdogStats::default();
        s.record(StallReason::NoJob);
        s.record(StallReason::NoJob);
        s.record(StallReason::LatestJobFailed);
        let got: Vec<(&str, u64)> = s.firings().iter().map(|(r, n)| (r.as_str(), *n)).collect();
        assert_eq!(
            got,
            vec![
                ("latest_job_succeeded", 0),
                ("latest_job_failed", 1),
                ("latest_job_cancelled", 0),
                ("no_job", 2)
            ]
        );
    }
}
