//! `FinalizeMerge` (ARCHITECTURE §3.4): already merged -> success; the tested commit already
//! contained in the base -> success; else merge through the forge under the repo's lease,
//! pinned to the head commit that was tested, re-reading the PR after every error before a
//! retry. Re-driving it is always safe: one call per PR at a time (a per-PR lock here, a
//! claim in `merges` across replicas), a merged PR is never merged again, and a head that
//! moved since testing is refused.

use std::sync::Arc;

use orchestrator_forge::{ForgeError, MergeOutcome, PrState, RepoName};
use orchestrator_kit::time::now_ms;
use orchestrator_proto::merge_gate::v1::{FinalizeMergeRequest, FinalizeOutcome};

use crate::error::GateError;
use crate::service::{MergeGateService, optional, repo_arg, required, work_item_arg};
use crate::store::{self, Claim, ClaimRequest, Finish, MergeState};

/// What one finalization came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finalized {
    pub outcome: FinalizeOutcome,
    pub merge_sha: String,
    pub reason: String,
    pub retry_after_s: u32,
}

impl Finalized {
    fn new(
        outcome: FinalizeOutcome,
        merge_sha: impl Into<String>,
        reason: impl Into<String>,
    ) -> Self {
        Finalized {
            outcome,
            merge_sha: merge_sha.into(),
            reason: reason.into(),
            retry_after_s: 0,
        }
    }

    fn state(&self) -> MergeState {
        match self.outcome {
            FinalizeOutcome::Merged
            | FinalizeOutcome::AlreadyMerged
            | FinalizeOutcome::AlreadyContained => MergeState::Merged,
            FinalizeOutcome::Refused => MergeState::Refused,
            FinalizeOutcome::RetryLater | FinalizeOutcome::Unspecified => MergeState::Pending,
        }
    }
}

/// Checks a commit id: 40 (SHA-1) or 64 (SHA-256) hex digits, returned in lowercase.
fn commit_arg(field: &'static str, value: &str) -> Result<String, GateError> {
    let v = required(field, value)?;
    if !(v.len() == 40 || v.len() == 64) || !v.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(GateError::InvalidField {
            field,
            reason: "must be a full commit id (40 or 64 hex digits)".to_owned(),
        });
    }
    Ok(v.to_ascii_lowercase())
}

pub(crate) struct Finalizer<'a> {
    pub(crate) gate: &'a MergeGateService,
}

/// How the merge itself ended, before it is recorded.
enum Driven {
    Done(Finalized, u32),
    /// A caller's mistake found on the forge (the PR does not exist).
    Failed(GateError, u32),
}

impl Finalizer<'_> {
    pub(crate) async fn finalize(
        &self,
        req: &FinalizeMergeRequest,
    ) -> Result<Finalized, GateError> {
        let work_item = work_item_arg(&req.work_item)?;
        let repo = repo_arg(&req.repo)?;
        if req.pr_number == 0 {
            return Err(GateError::MissingField("pr_number"));
        }
        let pr_number = i64::try_from(req.pr_number).map_err(|_| GateError::InvalidField {
            field: "pr_number",
            reason: "too large".to_owned(),
        })?;
        let tested = commit_arg("tested_head_sha", &req.tested_head_sha)?;
        let job_id = optional("job_id", &req.job_id)?;
        let holder = if job_id.is_empty() {
            format!("finalize-merge:{work_item}")
        } else {
            job_id.to_owned()
        };
        let repo_s = repo.to_string();
        let inner = &self.gate.inner;

        let lock = {
            let mut locks = inner.pr_locks.lock().unwrap_or_else(|e| e.into_inner());
            Arc::clone(locks.entry((repo_s.clone(), req.pr_number)).or_default())
        };
        let result = {
            let _one_at_a_time = lock.lock().await;
            self.claimed(work_item, &repo, pr_number, &tested, &holder)
                .await
        };
        {
            // Forget the PR's lock once nobody waits on it.
            let mut locks = inner.pr_locks.lock().unwrap_or_else(|e| e.into_inner());
            if Arc::strong_count(&lock) == 2 {
                locks.remove(&(repo_s, req.pr_number));
            }
        }
        let done = result?;
        match done.outcome {
            FinalizeOutcome::Refused => {
                tracing::warn!(outcome = ?done.outcome, reason = %done.reason, "merge refused");
            }
            FinalizeOutcome::RetryLater => {
                tracing::info!(reason = %done.reason, retry_after_s = done.retry_after_s, "merge not finished; retry later");
            }
            _ => {
                tracing::info!(outcome = ?done.outcome, merge_sha = %done.merge_sha, "merge finalized");
            }
        }
        Ok(done)
    }

    async fn claimed(
        &self,
        work_item: &str,
        repo: &RepoName,
        pr_number: i64,
        tested: &str,
        holder: &str,
    ) -> Result<Finalized, GateError> {
        let inner = &self.gate.inner;
        let db = &inner.db;
        let repo_s = repo.to_string();
        let claim_id = uuid::Uuid::now_v7().to_string();
        let now = now_ms();
        let claim_ms = i64::try_from(inner.config.claim_ttl.as_millis()).unwrap_or(i64::MAX);
        let retry_after_s = inner.config.retry_after_s;
        let claim = store::claim(
            db,
            &ClaimRequest {
                repo: &repo_s,
                pr_number,
                work_item,
                tested_head_sha: tested,
                claim_id: &claim_id,
                now_ms: now,
                claim_until_ms: now.saturating_add(claim_ms),
            },
        )
        .await?;
        match claim {
            Claim::Claimed => {}
            Claim::Merged(row) => {
                let outcome = if row.outcome == "ALREADY_CONTAINED" {
                    FinalizeOutcome::AlreadyContained
                } else {
                    FinalizeOutcome::AlreadyMerged
                };
                return Ok(Finalized::new(outcome, row.merge_sha, "merged before"));
            }
            Claim::Busy(row) => {
                let left_s = (row.claim_until_ms - now).max(0) / 1000 + 1;
                let mut f = Finalized::new(
                    FinalizeOutcome::RetryLater,
                    "",
                    "another merge-gate is finalizing this pull request",
                );
                f.retry_after_s = u32::try_from(left_s)
                    .unwrap_or(u32::MAX)
                    .min(retry_after_s.max(1));
                return Ok(f);
            }
        }

        // Under the repo's lease: one deploy or merge per repo at a time. The caller's own
        // lease is used as it is; one taken here lives as long as the claim.
        let held = store::get(db, &repo_s)
            .await?
            .is_some_and(|l| l.holder_job_id == holder && !l.is_expired(now_ms()));
        let mut took_lease = false;
        let driven = if held {
            self.drive(repo, pr_number, tested).await
        } else {
            let ttl_s = u32::try_from(inner.config.claim_ttl.as_secs()).unwrap_or(u32::MAX);
            match self
                .gate
                .take_lease(&repo_s, holder, "merge-gate", 0, ttl_s)
                .await
            {
                Ok(a) if a.acquired => {
                    took_lease = true;
                    self.drive(repo, pr_number, tested).await
                }
                Ok(a) => {
                    let other = a.lease.map(|l| l.holder_job_id).unwrap_or_default();
                    let mut f = Finalized::new(
                        FinalizeOutcome::RetryLater,
                        "",
                        format!("the merge lease of {repo} is held by {other}"),
                    );
                    f.retry_after_s = retry_after_s;
                    Driven::Done(f, 0)
                }
                Err(e) => Driven::Failed(e, 0),
            }
        };
        if took_lease && let Err(e) = store::release(db, &repo_s, holder).await {
            // The lease runs out with the claim's TTL.
            tracing::warn!(error = %e, "cannot release the merge lease taken for the merge");
        }

        let (state, outcome, merge_sha, reason, attempts, result) = match driven {
            Driven::Done(mut f, attempts) => {
                if f.outcome == FinalizeOutcome::RetryLater && f.retry_after_s == 0 {
                    f.retry_after_s = retry_after_s;
                }
                let outcome = f.outcome.as_str_name().to_owned();
                let error = if f.state() == MergeState::Merged {
                    String::new()
                } else {
                    f.reason.clone()
                };
                (
                    f.state(),
                    outcome,
                    f.merge_sha.clone(),
                    error,
                    attempts,
                    Ok(f),
                )
            }
            Driven::Failed(e, attempts) => (
                MergeState::Pending,
                "ERROR".to_owned(),
                String::new(),
                e.to_string(),
                attempts,
                Err(e),
            ),
        };
        let recorded = store::finish(
            db,
            &repo_s,
            pr_number,
            &claim_id,
            &Finish {
                state,
                outcome: &outcome,
                merge_sha: &merge_sha,
                attempts: i64::from(attempts),
                last_error: &reason,
                now_ms: now_ms(),
            },
        )
        .await?;
        if !recorded {
            tracing::warn!(
                "the merge claim ran out before the merge was recorded; a re-drive re-reads the PR"
            );
        }
        result
    }

    /// Reads the PR, then merges it pinned to `tested`, up to `ORCH_MERGE_ATTEMPTS` times,
    /// reading the PR again after every error: a merge API is not always idempotent, and an
    /// answer lost on the way back may hide a merge that happened.
    async fn drive(&self, repo: &RepoName, number: i64, tested: &str) -> Driven {
        let inner = &self.gate.inner;
        let forge = &inner.forge;
        let number_u = u64::try_from(number).unwrap_or_default();
        let mut attempts: u32 = 0;
        let mut reads: u32 = 0;
        let mut last_error = String::new();
        let mut refusal: Option<String> = None;
        let mut checked_contained = false;
        loop {
            reads += 1;
            let pr = match forge.get_pr(repo, number_u).await {
                Ok(Some(pr)) => pr,
                Ok(None) => {
                    return Driven::Failed(
                        GateError::NotFound(format!("pull request #{number} of {repo} not found")),
                        attempts,
                    );
                }
                Err(e) => {
                    last_error = format!("cannot read the pull request: {e}");
                    tracing::warn!(error = %e, "cannot read the pull request");
                    if e.is_transient() && reads <= inner.config.merge_attempts {
                        tokio::time::sleep(inner.config.retry_pause).await;
                        continue;
                    }
                    return Driven::Done(
                        Finalized::new(FinalizeOutcome::RetryLater, "", last_error),
                        attempts,
                    );
                }
            };
            if pr.merged {
                // Our own earlier request may be what merged it (its answer was lost).
                let outcome = if attempts > 0 {
                    FinalizeOutcome::Merged
                } else {
                    FinalizeOutcome::AlreadyMerged
                };
                let mut reason = String::new();
                if !pr.head_sha.is_empty() && !pr.head_sha.eq_ignore_ascii_case(tested) {
                    reason = format!("merged at head {} (tested {tested})", pr.head_sha);
                }
                return Driven::Done(
                    Finalized::new(outcome, pr.merge_sha.unwrap_or_default(), reason),
                    attempts,
                );
            }
            if pr.state == PrState::Closed {
                return Driven::Done(
                    Finalized::new(
                        FinalizeOutcome::Refused,
                        "",
                        format!("pull request #{number} was closed without being merged"),
                    ),
                    attempts,
                );
            }
            if let Some(why) = refusal {
                return Driven::Done(Finalized::new(FinalizeOutcome::Refused, "", why), attempts);
            }
            if !checked_contained {
                checked_contained = true;
                let source = forge.clone_url(repo);
                match inner
                    .mirrors
                    .is_contained(repo, &source, tested, &pr.base_branch)
                    .await
                {
                    Ok(true) => {
                        return Driven::Done(
                            Finalized::new(
                                FinalizeOutcome::AlreadyContained,
                                "",
                                format!("{tested} is already contained in {}", pr.base_branch),
                            ),
                            attempts,
                        );
                    }
                    Ok(false) => {}
                    Err(e) => {
                        tracing::debug!(error = %e, "cannot tell whether the tested commit is in the base; merging through the forge")
                    }
                }
            }
            if !pr.head_sha.eq_ignore_ascii_case(tested) {
                return Driven::Done(
                    Finalized::new(
                        FinalizeOutcome::Refused,
                        "",
                        format!(
                            "head moved since testing: tested {tested}, the pull request's head is now {}",
                            pr.head_sha
                        ),
                    ),
                    attempts,
                );
            }
            if attempts >= inner.config.merge_attempts {
                return Driven::Done(
                    Finalized::new(FinalizeOutcome::RetryLater, "", last_error),
                    attempts,
                );
            }
            attempts += 1;
            match forge.merge_pr(repo, number_u, tested).await {
                Ok(MergeOutcome::Merged { merge_sha }) => {
                    return Driven::Done(
                        Finalized::new(FinalizeOutcome::Merged, merge_sha.unwrap_or_default(), ""),
                        attempts,
                    );
                }
                Ok(MergeOutcome::AlreadyMerged { merge_sha }) => {
                    let outcome = if attempts > 1 {
                        FinalizeOutcome::Merged
                    } else {
                        FinalizeOutcome::AlreadyMerged
                    };
                    return Driven::Done(
                        Finalized::new(outcome, merge_sha.unwrap_or_default(), ""),
                        attempts,
                    );
                }
                Ok(MergeOutcome::HeadMoved { expected, actual }) => {
                    return Driven::Done(
                        Finalized::new(
                            FinalizeOutcome::Refused,
                            "",
                            format!(
                                "head moved since testing: tested {expected}, the pull request's head is now {actual}"
                            ),
                        ),
                        attempts,
                    );
                }
                Ok(MergeOutcome::Conflicts { detail }) => {
                    return Driven::Done(
                        Finalized::new(
                            FinalizeOutcome::Refused,
                            "",
                            format!("conflicts with the base: {detail}"),
                        ),
                        attempts,
                    );
                }
                Ok(MergeOutcome::Closed) => {
                    return Driven::Done(
                        Finalized::new(
                            FinalizeOutcome::Refused,
                            "",
                            format!("pull request #{number} was closed without being merged"),
                        ),
                        attempts,
                    );
                }
                Ok(MergeOutcome::NotMergeable { reason }) => {
                    let reason = if reason.is_empty() {
                        "the forge will not merge it now".to_owned()
                    } else {
                        format!("the forge will not merge it now: {reason}")
                    };
                    return Driven::Done(
                        Finalized::new(FinalizeOutcome::RetryLater, "", reason),
                        attempts,
                    );
                }
                Err(e) => {
                    tracing::warn!(attempt = attempts, error = %e, "merge request failed; reading the pull request again");
                    last_error = format!("merge request failed: {e}");
                    if let ForgeError::Rejected { .. } | ForgeError::Invalid(_) = e {
                        // Retrying will not help, but the PR is read once more first.
                        refusal = Some(last_error.clone());
                    } else {
                        tokio::time::sleep(inner.config.retry_pause).await;
                    }
                }
            }
        }
    }
}
