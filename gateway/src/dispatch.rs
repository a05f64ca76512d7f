//! The dispatcher: applies the inbox's pending deliveries to stage-engine, in arrival order
//! per work item, with retries and backoff, and a dead-letter state after too many failures.
//!
//! Retry rule: the project's one (`orchestrator_kit::retry`). A retryable code is retried
//! after `Backoff::delay(n)` and dead after `max_attempts` attempts; a permanent one (asking
//! again cannot help) is dead at once.
//!
//! Delivery to stage-engine is at least once: a gateway killed after a call succeeded and
//! before it recorded that success calls again after a restart. The calls are idempotent on
//! their own keys (CreateWorkItem on the tracker issue id, Approve and Retry on the comment id,
//! OnPrMerged on the PR and merge sha, OnPrReview on the forge's review id), so a repeat
//! changes nothing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use orchestrator_kit::retry;
use orchestrator_kit::time::now_ms;
use orchestrator_proto::stage_engine::v1::{
    AdvanceOutcome, ApproveRequest, CreateWorkItemRequest, OnCommitStatusRequest,
    OnPrMergedRequest, OnPrReviewRequest, RetryRequest, UpdateDescriptionRequest,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::Shared;
use crate::inbox::{self, Attempted, Claimed, State};
use crate::translate::Command;

/// What one attempt came to.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Outcome {
    /// Done, for `work_item` ('' when the answer named none).
    Applied {
        reason: String,
        work_item: String,
    },
    Ignored(String),
    Failed {
        code: Code,
        message: String,
    },
    /// Not a call's failure: something we cannot fix by retrying (bad stored command,
    /// missing configuration).
    Dead(String),
}

/// Runs until `shutdown`: applies what is due, then waits for a new delivery or the poll
/// interval. One bad delivery or a storage hiccup is logged and the loop goes on.
pub(crate) async fn run(shared: Arc<Shared>, shutdown: CancellationToken) {
    let mut last_prune = Instant::now();
    loop {
        if shutdown.is_cancelled() {
            break;
        }
        let worked = match tick(&shared).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "inbox dispatch failed; will retry");
                0
            }
        };
        if last_prune.elapsed() >= Duration::from_secs(3_600) {
            last_prune = Instant::now();
            prune(&shared).await;
        }
        let linger = shared.config.dispatch.linger;
        if worked >= shared.config.dispatch.batch as usize {
            // A backlog: claim the next batch at once.
            continue;
        }
        if worked > 0 {
            // More may be due (the next in line for the keys just applied) or arriving:
            // let them gather, so that the next batch is claimed and recorded together.
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(linger) => {}
            }
            continue;
        }
        // Idle: a new delivery is applied at once (a lone approval must not wait for
        // company); the ones that follow it while it is applied gather in the linger
        // above and go together.
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = shared.wake.notified() => {}
            _ = tokio::time::sleep(shared.config.dispatch.poll_interval) => {}
        }
    }
    tracing::debug!("inbox dispatcher stopped");
}

async fn prune(shared: &Shared) {
    let Some(days) = shared.config.retention_days else {
        return;
    };
    let before = now_ms() - i64::from(days) * 86_400_000;
    match inbox::prune(&shared.db, before).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deleted = n, days, "pruned old inbox deliveries"),
        Err(e) => tracing::warn!(error = %e, "inbox prune failed"),
    }
}

/// Applies every delivery that is due now (one per work item); returns how many it tried.
pub(crate) async fn tick(shared: &Arc<Shared>) -> Result<usize, sqlx::Error> {
    let now = now_ms();
    let lease = i64::try_from(shared.config.dispatch.claim_lease.as_millis()).unwrap_or(15_000);
    let claimed =
        inbox::claim_due(&shared.db, now, now + lease, shared.config.dispatch.batch).await?;
    let tried = claimed.len();
    let mut set = JoinSet::new();
    for d in claimed {
        let shared = Arc::clone(shared);
        set.spawn(async move { apply_one(&shared, d).await });
    }
    while let Some(joined) = set.join_next().await {
        if let Err(e) = joined {
            tracing::error!(error = %e, "inbox delivery task failed");
        }
    }
    Ok(tried)
}

#[tracing::instrument(skip_all, fields(inbox_id = %d.id, source = %d.source, delivery_id = %d.delivery_id, attempt = d.attempt))]
async fn apply_one(shared: &Shared, d: Claimed) {
    let attempt = d.attempt;
    let source = if d.source == "plane" {
        "plane"
    } else {
        "gitea"
    };
    let outcome = match d.command.as_deref().map(serde_json::from_str::<Command>) {
        Some(Ok(command)) => {
            // Never outlast the claim: past it, another dispatcher may take the delivery.
            let limit = shared.config.dispatch.claim_lease * 3 / 4;
            match tokio::time::timeout(limit, call(shared, &command)).await {
                Ok(outcome) => outcome,
                Err(_) => Outcome::Failed {
                    code: Code::DeadlineExceeded,
                    message: format!("no answer within {} ms", limit.as_millis()),
                },
            }
        }
        Some(Err(e)) => Outcome::Dead(format!("stored command is unreadable: {e}")),
        None => Outcome::Dead("pending delivery without a command".to_owned()),
    };
    let now = now_ms();
    let id = d.id.clone();
    let finished =
        |state: State, reason: String, last_error: String, work_item: String| Attempted::Finished {
            id: id.clone(),
            state,
            reason,
            last_error,
            at_ms: now,
            work_item,
        };
    let record = match outcome {
        Outcome::Applied { reason, work_item } => {
            tracing::info!(%reason, %work_item, "delivery applied");
            shared.metrics.delivery(source, "applied");
            finished(State::Applied, reason, String::new(), work_item)
        }
        Outcome::Ignored(reason) => {
            tracing::info!(%reason, "delivery ignored");
            shared.metrics.delivery(source, "ignored");
            finished(State::Ignored, reason, String::new(), String::new())
        }
        Outcome::Dead(reason) => {
            tracing::warn!(%reason, "delivery is a dead letter");
            shared.metrics.delivery(source, "dead");
            finished(State::Dead, reason.clone(), reason, String::new())
        }
        Outcome::Failed { code, message } => {
            let error = format!("{code:?}: {message}");
            let max = shared.config.dispatch.max_attempts;
            if !retry::is_retryable(code) {
                tracing::warn!(%error, "permanent error: delivery is a dead letter");
                shared.metrics.delivery(source, "dead");
                let reason = format!("permanent error {error}");
                finished(State::Dead, reason, error, String::new())
            } else if max > 0 && attempt >= max {
                tracing::warn!(%error, attempts = attempt, "gave up: delivery is a dead letter");
                shared.metrics.delivery(source, "dead");
                let reason = format!("gave up after {attempt} attempts");
                finished(State::Dead, reason, error, String::new())
            } else {
                let delay = shared.config.dispatch.backoff.delay(attempt);
                tracing::info!(%error, retry_in_ms = delay.as_millis() as u64, "delivery will be retried");
                shared.metrics.delivery(source, "retried");
                let at = now + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX / 2);
                Attempted::Retry {
                    id: d.id.clone(),
                    next_attempt_at_ms: at,
                    last_error: error,
                }
            }
        }
    };
    // Recorded with the outcomes of the attempts that end alongside (group commit).
    let written = shared.outcome_writer.write(record).await;
    if let Err(e) = written {
        // The claim's lease runs out and the delivery is tried again: at least once.
        tracing::warn!(error = %e, "could not record the delivery's outcome");
    }
}

fn outcome_name(o: i32) -> &'static str {
    AdvanceOutcome::try_from(o)
        .map(|o| o.as_str_name())
        .unwrap_or("UNKNOWN_OUTCOME")
}

async fn call(shared: &Shared, command: &Command) -> Outcome {
    let mut se = shared.clients.stage_engine.clone();
    match command {
        Command::CreateWorkItem {
            tracker_issue_id,
            project_id,
            sequence_id,
            title,
            description,
        } => {
            let Some(repo) = shared.config.repos.repo_for(project_id) else {
                return Outcome::Dead(format!(
                    "no repository for plane project {project_id}: set ORCH_PLANE_DEFAULT_REPO \
                     or ORCH_PLANE_PROJECT_REPOS"
                ));
            };
            // The key (PROJ-42) is stage-engine's to derive: the tracker knows the
            // project's identifier, the delivery only the project id and the number.
            let req = CreateWorkItemRequest {
                tracker_issue_id: tracker_issue_id.clone(),
                key: String::new(),
                title: title.clone(),
                description: description.clone(),
                repo: repo.to_owned(),
                branch: String::new(),
                tracker_project_id: project_id.clone(),
                tracker_sequence_id: *sequence_id,
            };
            let started = Instant::now();
            let res = se.create_work_item(req).await;
            observe(shared, "CreateWorkItem", &res, started);
            match res {
                Ok(r) => {
                    let r = r.into_inner();
                    let key = r.work_item.map(|w| w.key).unwrap_or_default();
                    Outcome::Applied {
                        reason: if r.created {
                            format!("created work item {key} in {repo}")
                        } else {
                            format!("work item {key} already existed")
                        },
                        work_item: key,
                    }
                }
                Err(s) => failed(s),
            }
        }
        Command::Approve {
            tracker_issue_id,
            author,
            comment_id,
        } => {
            // A Plane comment names only its issue: stage-engine finds the work item by it.
            let req = ApproveRequest {
                work_item: String::new(),
                author: author.clone(),
                comment_id: comment_id.clone(),
                tracker_issue_id: tracker_issue_id.clone(),
            };
            let started = Instant::now();
            let res = se.approve(req).await;
            observe(shared, "Approve", &res, started);
            match res {
                Ok(r) => {
                    let r = r.into_inner();
                    let key = r.work_item.map(|w| w.key).unwrap_or_default();
                    Outcome::Applied {
                        reason: format!("approve {key}: {}", outcome_name(r.outcome)),
                        work_item: key,
                    }
                }
                // An approval on an issue that never became a work item: nothing to do.
                Err(s) if s.code() == Code::NotFound => {
                    Outcome::Ignored(format!("no work item for plane issue {tracker_issue_id}"))
                }
                Err(s) => failed(s),
            }
        }
        Command::Retry {
            tracker_issue_id,
            author,
            comment_id,
        } => {
            let req = RetryRequest {
                work_item: String::new(),
                author: author.clone(),
                comment_id: comment_id.clone(),
                tracker_issue_id: tracker_issue_id.clone(),
            };
            let started = Instant::now();
            let res = se.retry(req).await;
            observe(shared, "Retry", &res, started);
            match res {
                Ok(r) => {
                    let r = r.into_inner();
                    let key = r.work_item.map(|w| w.key).unwrap_or_default();
                    Outcome::Applied {
                        reason: format!("retry {key}: {}", outcome_name(r.outcome)),
                        work_item: key,
                    }
                }
                Err(s) if s.code() == Code::NotFound => {
                    Outcome::Ignored(format!("no work item for plane issue {tracker_issue_id}"))
                }
                // A :retry: on an item that is not blocked asks for nothing: not a failure.
                Err(s) if s.code() == Code::FailedPrecondition => {
                    Outcome::Ignored(format!("retry refused: {}", s.message()))
                }
                Err(s) => failed(s),
            }
        }
        Command::UpdateDescription {
            tracker_issue_id,
            description,
        } => {
            let req = UpdateDescriptionRequest {
                tracker_issue_id: tracker_issue_id.clone(),
                description: description.clone(),
            };
            let started = Instant::now();
            let res = se.update_description(req).await;
            observe(shared, "UpdateDescription", &res, started);
            match res {
                Ok(r) => {
                    let key = r.into_inner().key;
                    Outcome::Applied {
                        reason: format!("description of {key} updated"),
                        work_item: key,
                    }
                }
                // An issue that never became a work item: nothing to keep current.
                Err(s) if s.code() == Code::NotFound => {
                    Outcome::Ignored(format!("no work item for plane issue {tracker_issue_id}"))
                }
                Err(s) => failed(s),
            }
        }
        Command::OnPrMerged {
            repo,
            branch,
            pr_number,
            merge_sha,
        } => {
            let req = OnPrMergedRequest {
                repo: repo.clone(),
                branch: branch.clone(),
                pr_number: *pr_number,
                merge_sha: merge_sha.clone(),
            };
            let started = Instant::now();
            let res = se.on_pr_merged(req).await;
            observe(shared, "OnPrMerged", &res, started);
            match res {
                Ok(r) => {
                    let r = r.into_inner();
                    let key = r.work_item.map(|w| w.key).unwrap_or_default();
                    Outcome::Applied {
                        reason: format!(
                            "pr merged {repo}#{pr_number} ({key}): {}",
                            outcome_name(r.outcome)
                        ),
                        work_item: key,
                    }
                }
                Err(s) => failed(s),
            }
        }
        Command::OnPrReview {
            repo,
            branch,
            pr_number,
            reviewer,
            state,
            body,
        } => {
            let req = OnPrReviewRequest {
                repo: repo.clone(),
                branch: branch.clone(),
                pr_number: *pr_number,
                reviewer: reviewer.clone(),
                state: state.clone(),
                body: body.clone(),
            };
            let started = Instant::now();
            let res = se.on_pr_review(req).await;
            observe(shared, "OnPrReview", &res, started);
            match res {
                Ok(r) => {
                    let r = r.into_inner();
                    let key = r.work_item.map(|w| w.key).unwrap_or_default();
                    Outcome::Applied {
                        reason: format!(
                            "pr review {repo}#{pr_number} by {reviewer} ({key}): {}",
                            outcome_name(r.outcome)
                        ),
                        work_item: key,
                    }
                }
                // A review of a PR that is not a work item's: nothing to do.
                Err(s) if s.code() == Code::NotFound => {
                    Outcome::Ignored(format!("no work item for {repo} branch {branch}"))
                }
                Err(s) => failed(s),
            }
        }
        Command::OnCommitStatus {
            repo,
            sha,
            context,
            state,
        } => {
            let req = OnCommitStatusRequest {
                repo: repo.clone(),
                sha: sha.clone(),
                context: context.clone(),
                state: state.clone(),
            };
            let started = Instant::now();
            let res = se.on_commit_status(req).await;
            observe(shared, "OnCommitStatus", &res, started);
            match res {
                Ok(r) => Outcome::Applied {
                    reason: format!(
                        "commit status {context} {state} on {repo}@{sha}: {} waiting item(s) checked again",
                        r.into_inner().rechecked
                    ),
                    work_item: String::new(),
                },
                Err(s) => failed(s),
            }
        }
    }
}

fn failed(s: tonic::Status) -> Outcome {
    let mut message = s.message().to_owned();
    message.truncate(500);
    Outcome::Failed {
        code: s.code(),
        message,
    }
}

fn observe<T>(
    shared: &Shared,
    rpc: &'static str,
    res: &Result<T, tonic::Status>,
    started: Instant,
) {
    let code = match res {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    };
    shared
        .metrics
        .rpc(rpc, format!("{code:?}"), started.elapsed());
}
