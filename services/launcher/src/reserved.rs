//! Reserved (no-LLM) jobs: an RPC to the service that owns the work, re-enqueued as its
//! answer says. They never wait for an LLM slot.
//!
//! - `deploy-finalizer`: `MergeGate.FinalizeMerge` under the repo's merge lease, pinned to
//!   the deployed head; "retry later" comes back after the wait merge-gate gives;
//! - `post-deploy-monitor`: `PostDeploy.Tick` until it answers `done`, again after
//!   `next_tick_in_s` each time.
//!
//! A peer that is down or not built yet (UNAVAILABLE, UNIMPLEMENTED, a deadline) is waited
//! for with a backoff, without ever failing the job; a refusal (the caller's fault) fails it.

use std::time::Duration;

use orchestrator_git::RepoName;
use orchestrator_kit::retry::{Backoff, is_retryable_status};
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, FinalizeMergeRequest, FinalizeOutcome,
};
use serde_json::Value;
use tonic::Status;

use crate::rules::End;
use crate::store::JobRow;
use crate::supervisor::{RunHandle, StopReason, Supervisor};

/// The reserved jobs this launcher knows.
pub const RESERVED: [&str; 2] = ["deploy-finalizer", "post-deploy-monitor"];

/// The end of a held job given back because this launcher's heartbeat is lost.
fn held_back() -> End {
    End::Again {
        outcome: "handed_back",
        reason: "the launcher's heartbeat was lost while it held the job".to_owned(),
        after: Duration::ZERO,
        bump: false,
    }
}

impl Supervisor {
    pub(crate) async fn run_reserved(&self, job: JobRow, h: RunHandle) {
        let mut lease = false;
        let end = tokio::select! {
            // A job claimed ahead is held here until a slot is free.
            end = async {
                let slot = self.inner.reserved_slots.acquire().await;
                h.started.store(true, std::sync::atomic::Ordering::SeqCst);
                let end = if self.heartbeat_lost() {
                    held_back()
                } else {
                    self.reserved_call(&job, &mut lease).await
                };
                drop(slot);
                self.release_slot(h.kind, &h.slot_released);
                end
            } => end,
            () = h.stop.cancelled() => match h.reason() {
                Some(StopReason::Shutdown) => End::Again {
                    outcome: "handed_back",
                    reason: "the launcher shut down while it ran".to_owned(),
                    after: Duration::ZERO,
                    bump: false,
                },
                Some(StopReason::HeartbeatLost) => held_back(),
                _ => {
                    self.release_lease(&job, lease).await;
                    return;
                }
            },
        };
        self.end_run(&job, end, None, None).await;
        // Held from claim to the end of this run; a job that comes back takes it again.
        self.release_lease(&job, lease).await;
    }

    fn unavailable(&self, job: &JobRow, what: &str, s: &Status) -> End {
        End::Again {
            outcome: "peer_unavailable",
            reason: format!("{what} ({:?}): {}", s.code(), s.message()),
            after: Backoff::new(self.config().backoff_base, self.config().backoff_max)
                .delay(job.transient_attempts + 1),
            bump: true,
        }
    }

    async fn reserved_call(&self, job: &JobRow, lease: &mut bool) -> End {
        let payload: Value = serde_json::from_str(&job.payload_json).unwrap_or(Value::Null);
        match job.agent.as_str() {
            "post-deploy-monitor" => match self.inner.peers.tick(&job.work_item).await {
                Ok(t) if t.done => End::Succeeded {
                    outcome: "done".to_owned(),
                    note: format!("the post-deploy watch is over: {}", t.reason),
                },
                Ok(t) => End::Again {
                    outcome: "tick",
                    reason: format!(
                        "tick: {} {}; next in {} s",
                        t.classification, t.reason, t.next_tick_in_s
                    ),
                    after: Duration::from_secs(u64::from(t.next_tick_in_s.max(1))),
                    bump: false,
                },
                Err(s) if is_retryable_status(&s) => {
                    self.unavailable(job, "post-deploy cannot tick", &s)
                }
                Err(s) => End::Failed {
                    outcome: "refused",
                    reason: format!("post-deploy refused the tick: {}", s.message()),
                },
            },
            "deploy-finalizer" => {
                let (Some(pr_number), Some(sha)) = (
                    payload["pr_number"].as_u64(),
                    payload["tested_head_sha"].as_str(),
                ) else {
                    return End::Failed {
                        outcome: "bad_input",
                        reason: "payload_json needs pr_number and tested_head_sha".to_owned(),
                    };
                };
                let repo = match RepoName::parse(&job.repo) {
                    Ok(r) => r,
                    Err(e) => {
                        return End::Failed {
                            outcome: "bad_input",
                            reason: e.to_string(),
                        };
                    }
                };
                if self.config().deploy_lease {
                    let deployer = payload["deployer_job_id"].as_str().unwrap_or_default();
                    if let Err(end) = self.finalizer_lease(job, &repo, deployer).await {
                        return end;
                    }
                    *lease = true;
                }
                let req = FinalizeMergeRequest {
                    work_item: job.work_item.clone(),
                    repo: repo.to_string(),
                    pr_number,
                    tested_head_sha: sha.to_owned(),
                    job_id: job.id.clone(),
                };
                match self.inner.peers.finalize_merge(req).await {
                    Ok(r) => match r.outcome() {
                        o @ (FinalizeOutcome::Merged
                        | FinalizeOutcome::AlreadyMerged
                        | FinalizeOutcome::AlreadyContained) => End::Succeeded {
                            outcome: o.as_str_name().to_ascii_lowercase(),
                            note: format!("merge {}", r.merge_sha),
                        },
                        FinalizeOutcome::RetryLater => End::Again {
                            outcome: "retry_later",
                            reason: format!("merge-gate: {}", r.reason),
                            after: Duration::from_secs(u64::from(r.retry_after_s.max(1))),
                            bump: false,
                        },
                        FinalizeOutcome::Refused => End::Failed {
                            outcome: "refused",
                            reason: format!("merge-gate refused the merge: {}", r.reason),
                        },
                        FinalizeOutcome::Unspecified => self.unavailable(
                            job,
                            "merge-gate gave no outcome",
                            &Status::unknown(""),
                        ),
                    },
                    Err(s) if is_retryable_status(&s) => {
                        self.unavailable(job, "merge-gate cannot finalize the merge", &s)
                    }
                    Err(s) => End::Failed {
                        outcome: "refused",
                        reason: format!("merge-gate refused the merge: {}", s.message()),
                    },
                }
            }
            other => End::Failed {
                outcome: "bad_input",
                reason: format!("unknown reserved job '{other}'"),
            },
        }
    }

    async fn finalizer_lease(
        &self,
        job: &JobRow,
        repo: &RepoName,
        deployer: &str,
    ) -> Result<(), End> {
        let req = AcquireLeaseRequest {
            repo: repo.to_string(),
            holder_job_id: job.id.clone(),
            instance_id: self.config().instance_id.clone(),
            pid: i64::from(std::process::id()),
            ttl_s: 0,
        };
        match self.inner.peers.acquire_lease(req).await {
            Ok(r) if r.acquired => Ok(()),
            Ok(r) => {
                let holder = r.lease.map(|l| l.holder_job_id).unwrap_or_default();
                if holder == job.id {
                    return Ok(());
                }
                // Its own deployer is about to release it: come back at once.
                let after = if !deployer.is_empty() && holder == deployer {
                    Duration::from_millis(200)
                } else {
                    self.config().lease_retry
                };
                Err(End::Again {
                    outcome: "lease_busy",
                    reason: format!("the merge lease of {repo} is held by job {holder}"),
                    after,
                    bump: false,
                })
            }
            Err(s) if is_retryable_status(&s) => {
                Err(self.unavailable(job, "merge-gate cannot give the merge lease", &s))
            }
            Err(s) => Err(End::Failed {
                outcome: "refused",
                reason: format!("merge-gate refused the merge lease: {}", s.message()),
            }),
        }
    }
}
