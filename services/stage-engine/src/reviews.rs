//! PR reviews by people (ARCHITECTURE §3.16, issue #18), beside the ONE `advance_stage`:
//! a forge "PR reviewed" event is read back from the forge (the delivery carries neither the
//! review's id nor its line comments), then
//!
//! - a human's **changes requested** on the work item's PR, while the item is at `review` or
//!   later and the PR is not merged, rolls it back to `development` (a rollback: within
//!   `ORCH_MAX_ROLLBACKS`, else the item parks as blocked), cancels the job in flight and
//!   enqueues the developer with the review's text and line comments in its task;
//! - a human's **approval** is recorded on the item (the approvals table, by the review's id);
//! - a **comment** review, a **bot**'s review (`ORCH_BOT_AUTHORS` and the role names — the
//!   same list that keeps a bot's `:approved:` out), a review of a PR that is not the item's,
//!   and a review already handled change nothing.
//!
//! [`decide`] is the pure rule; [`Engine::on_pr_review`] gathers and writes, through the same
//! guarded commit as `park` (row, transition, the review's id, effects in one transaction).

use orchestrator_forge::{PrReview, RepoName, ReviewState};

use crate::engine::{Advanced, Applied, Engine, blocked_reason, dedupe_key, unchanged};
use crate::error::EngineError;
use crate::outbox::{self, Effect, escape};
use crate::park::{Change, stream_comment};
use crate::pipeline::{Limits, Outcome, Position, Stage, Status, get_agent_for_stage};
use crate::store::{self, ApprovalRow};
use crate::task::{ReviewVerdict, Verdict};

/// The stages at which a human's changes-requested sends the work back: from `review` on,
/// while the PR is not merged (before `review` there is nothing of the stage to redo).
pub const REVIEWED_STAGES: [Stage; 4] = [
    Stage::Review,
    Stage::Testing,
    Stage::DeployStaging,
    Stage::Deploy,
];

/// Where a changes-requested review sends the work.
pub const REVIEW_ROLLBACK_TO: Stage = Stage::Development;

/// A forge's "PR reviewed" event, as the gateway passes it on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewEvent {
    pub repo: RepoName,
    pub branch: String,
    pub pr_number: u64,
    pub reviewer: String,
    pub state: ReviewState,
    /// The delivery's copy of the text (the forge's is used when found).
    pub body: String,
}

/// What a review does to the item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReviewDecision {
    /// Nothing changes, for this reason.
    Ignore(String),
    /// A human's approval: recorded, no stage change.
    RecordApproval,
    /// Back to development (rollback `n` of the budget).
    RollBack { n: u32 },
    /// The rollback budget is spent: the item parks as blocked.
    Block(String),
}

/// Decides what a review by `reviewer` in `state` does to an item at `at`.
pub fn decide(
    at: Position,
    state: ReviewState,
    human: bool,
    pr_merged: bool,
    limits: Limits,
    reviewer: &str,
) -> ReviewDecision {
    use ReviewDecision::Ignore;
    if !human {
        return Ignore(format!(
            "'{reviewer}' is a bot: a bot's review changes nothing"
        ));
    }
    match state {
        ReviewState::Approved => {
            return if at.status == Status::Cancelled {
                Ignore("the work item is cancelled".into())
            } else {
                ReviewDecision::RecordApproval
            };
        }
        ReviewState::Comment | ReviewState::Pending => {
            return Ignore(format!(
                "a {} review asks for no change",
                state.as_str().replace('_', " ")
            ));
        }
        ReviewState::ChangesRequested => {}
    }
    if pr_merged {
        return Ignore("the PR is merged: a review cannot send the work back".into());
    }
    match at.status {
        Status::Active | Status::Blocked => {}
        Status::AwaitingApproval | Status::Done | Status::Cancelled => {
            return Ignore(format!("the work item is {}", at.status));
        }
    }
    if !REVIEWED_STAGES.contains(&at.stage) {
        return Ignore(format!(
            "the work item is at {}, before review: nothing to send back",
            at.stage
        ));
    }
    if at.rollback_count >= limits.max_rollbacks {
        return ReviewDecision::Block(format!(
            "{reviewer} requested changes on the PR and the rollback budget ({}) is spent",
            limits.max_rollbacks
        ));
    }
    ReviewDecision::RollBack {
        n: at.rollback_count + 1,
    }
}

/// The approvals-table key of a forge review: a redelivered review is applied once.
fn review_command_id(review_id: u64) -> String {
    format!("pr-review-{review_id}")
}

/// The newest review by `reviewer` in `state` that still counts (not dismissed).
fn pick<'a>(reviews: &'a [PrReview], reviewer: &str, state: ReviewState) -> Option<&'a PrReview> {
    reviews
        .iter()
        .filter(|r| r.state == state && !r.dismissed && r.author.eq_ignore_ascii_case(reviewer))
        .max_by_key(|r| r.id)
}

fn forge_error(what: &str, e: orchestrator_forge::ForgeError) -> EngineError {
    if e.is_transient() {
        EngineError::Unavailable(format!("the forge is unavailable ({what}): {e}"))
    } else {
        EngineError::Precondition(format!("the forge refused {what}: {e}"))
    }
}

impl Engine {
    /// `OnPrReview`: see the module's documentation. NOT_FOUND when no work item has the
    /// branch; UNAVAILABLE (nothing changed; the gateway retries) while the forge is down.
    #[tracing::instrument(skip_all, fields(repo = %ev.repo, branch = ev.branch, pr = ev.pr_number, reviewer = ev.reviewer))]
    pub async fn on_pr_review(&self, ev: &ReviewEvent) -> Result<Advanced, EngineError> {
        let item = store::find_by_branch(&self.db, &ev.repo.to_string(), &ev.branch)
            .await?
            .ok_or_else(|| {
                EngineError::NotFound(format!(
                    "no work item for branch {} of {}",
                    ev.branch, ev.repo
                ))
            })?;
        let human = !self.config.is_bot(&ev.reviewer);
        // Cheap refusals first: a bot's or a comment review needs no forge call.
        if let ReviewDecision::Ignore(why) = decide(
            item.position(),
            ev.state,
            human,
            false,
            self.config.limits,
            &ev.reviewer,
        ) {
            tracing::info!(reason = why, "pr review changes nothing");
            return Ok(unchanged(item, why));
        }
        let pr = self
            .forge
            .get_pr(&ev.repo, ev.pr_number)
            .await
            .map_err(|e| forge_error("reading the PR", e))?;
        let Some(pr) = pr.filter(|p| p.head_branch == item.branch) else {
            let why = format!(
                "PR #{} of {} is not the PR of {} (branch {})",
                ev.pr_number, ev.repo, item.key, item.branch
            );
            tracing::info!(reason = why, "pr review changes nothing");
            return Ok(unchanged(item, why));
        };
        let reviews = self
            .forge
            .list_pr_reviews(&ev.repo, ev.pr_number)
            .await
            .map_err(|e| forge_error("listing the PR's reviews", e))?;
        let Some(review) = pick(&reviews, &ev.reviewer, ev.state).cloned() else {
            let why = format!(
                "no {} review by {} is on PR #{} (dismissed or deleted since)",
                ev.state.as_str(),
                ev.reviewer,
                ev.pr_number
            );
            tracing::info!(reason = why, "pr review changes nothing");
            return Ok(unchanged(item, why));
        };
        let command_id = review_command_id(review.id);
        let comments = if ev.state == ReviewState::ChangesRequested {
            self.forge
                .list_review_comments(&ev.repo, ev.pr_number, review.id)
                .await
                .map_err(|e| forge_error("listing the review's comments", e))?
        } else {
            Vec::new()
        };
        let body = if review.body.trim().is_empty() {
            ev.body.clone()
        } else {
            review.body.clone()
        };
        for _ in 0..5 {
            let item = self.get_item(&item.key).await?;
            if store::approval_seen(&self.db, &item.key, &command_id).await? {
                return Ok(unchanged(
                    item,
                    format!("review {} was already handled", review.id),
                ));
            }
            let decision = decide(
                item.position(),
                ev.state,
                human,
                pr.merged,
                self.config.limits,
                &review.author,
            );
            let (outcome, why, next, effects, transition_id, enqueued) = match decision {
                ReviewDecision::Ignore(why) => {
                    tracing::info!(reason = why, "pr review changes nothing");
                    return Ok(unchanged(item, why));
                }
                ReviewDecision::RecordApproval => {
                    let why = format!(
                        "{} approved PR #{} (review {}) at {}",
                        review.author, ev.pr_number, review.id, item.stage
                    );
                    let row = ApprovalRow {
                        work_item: &item.key,
                        comment_id: &command_id,
                        author: &review.author,
                        accepted: true,
                        reason: &why,
                        at_ms: orchestrator_kit::time::now_ms(),
                    };
                    store::insert_approval(&self.db.pool, &row).await?;
                    tracing::info!(reason = why, "approving pr review recorded");
                    return Ok(unchanged(item, why));
                }
                ReviewDecision::Block(why) => {
                    let mut next = item.clone();
                    next.status = Status::Blocked;
                    next.expected_agent = String::new();
                    next.expected_dedupe_key = String::new();
                    next.latest_job_id = String::new();
                    next.status_reason = blocked_reason(&item.key, &why);
                    let html = format!(
                        "<p>Blocked at <strong>{}</strong>: {}.</p><p>A human must look at it; reply <code>:retry:</code> here or run <code>orchestrator item retry {}</code>.</p>",
                        item.stage,
                        escape(&why),
                        escape(&item.key)
                    );
                    let effects = vec![stream_comment(html)];
                    (Outcome::Blocked, why, next, effects, outbox::new_id(), None)
                }
                ReviewDecision::RollBack { n } => {
                    let agent = get_agent_for_stage(REVIEW_ROLLBACK_TO)
                        .ok_or_else(|| EngineError::Internal("no agent for development".into()))?;
                    let why = format!(
                        "{} requested changes on PR #{}: back to {} (rollback {n} of {})",
                        review.author,
                        ev.pr_number,
                        REVIEW_ROLLBACK_TO,
                        self.config.limits.max_rollbacks
                    );
                    let transition_id = outbox::new_id();
                    let dedupe = dedupe_key(&item.key, &transition_id, agent);
                    let mut next = item.clone();
                    next.stage = REVIEW_ROLLBACK_TO;
                    next.status = Status::Active;
                    next.rollback_count = n;
                    next.stage_retries = 0;
                    next.expected_agent = agent.to_owned();
                    next.expected_dedupe_key = dedupe.clone();
                    next.latest_job_id = String::new();
                    next.status_reason = String::new();
                    let verdict = Verdict {
                        from: item.stage,
                        rolled_back: true,
                        files: Vec::new(),
                        gate: Vec::new(),
                        review: Some(ReviewVerdict {
                            reviewer: review.author.clone(),
                            state: ev.state.as_str().to_owned(),
                            body: body.clone(),
                            comments: comments.clone(),
                        }),
                    };
                    let task = crate::task::gather_for_review(self, &next, verdict, &why).await;
                    let mut effects = vec![stream_comment(format!(
                        "<p>Rolled back <strong>{}</strong> → <strong>{}</strong>: {}. The <strong>{agent}</strong> is on it, with the review in its task.</p>",
                        item.stage,
                        REVIEW_ROLLBACK_TO,
                        escape(&why)
                    ))];
                    // The job in flight works a stage that no longer is: cancel it first (the
                    // launcher channel keeps order), so it cannot push over the developer.
                    if !item.latest_job_id.is_empty() || !item.expected_dedupe_key.is_empty() {
                        effects.push(Effect::CancelJob {
                            job_id: item.latest_job_id.clone(),
                            dedupe_key: item.expected_dedupe_key.clone(),
                            reason: why.clone(),
                        });
                    }
                    effects.push(crate::task::attach(
                        self.enqueue_effect(&next, agent, &dedupe, &why),
                        &task,
                    ));
                    (
                        Outcome::RolledBack,
                        why,
                        next,
                        effects,
                        transition_id,
                        Some(agent),
                    )
                }
            };
            let change = Change {
                transition_id,
                next,
                outcome,
                cause: why.clone(),
                finished_agent: String::new(),
                job: None,
                command: Some((command_id.clone(), review.author.clone())),
                effects,
            };
            match self.commit(&item, change).await? {
                Applied::Done(next) => {
                    tracing::info!(
                        outcome = outcome.as_str(),
                        reason = why,
                        "pr review applied"
                    );
                    return Ok(Advanced {
                        item: *next,
                        outcome,
                        qg: Vec::new(),
                        enqueued_agent: enqueued,
                        reason: why,
                    });
                }
                Applied::JobAlreadyConsumed | Applied::Moved => continue,
            }
        }
        Err(EngineError::Busy(item.key.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: Limits = Limits {
        max_rollbacks: 2,
        max_stage_retries: 2,
    };

    fn at(stage: Stage, status: Status, rollbacks: u32) -> Position {
        Position {
            stage,
            status,
            rollback_count: rollbacks,
            stage_retries: 1,
        }
    }

    #[test]
    fn every_review_decision() {
        use ReviewDecision as D;
        use ReviewState as S;
        let changes = S::ChangesRequested;
        let active = Status::Active;
        // (position, state, human, merged, what it does)
        let rows: Vec<(Position, S, bool, bool, &str)> = vec![
            (
                at(Stage::Review, active, 0),
                changes,
                true,
                false,
                "rollback 1",
            ),
            (
                at(Stage::Testing, active, 1),
                changes,
                true,
                false,
                "rollback 2",
            ),
            (
                at(Stage::DeployStaging, active, 0),
                changes,
                true,
                false,
                "rollback 1",
            ),
            (
                at(Stage::Deploy, active, 0),
                changes,
                true,
                false,
                "rollback 1",
            ),
            (
                at(Stage::Deploy, Status::Blocked, 0),
                changes,
                true,
                false,
                "rollback 1",
            ),
            (at(Stage::Testing, active, 2), changes, true, false, "block"),
            (
                at(Stage::Development, active, 0),
                changes,
                true,
                false,
                "ignore: the work item is at development, before review",
            ),
            (
                at(Stage::Analysis, Status::AwaitingApproval, 0),
                changes,
                true,
                false,
                "ignore: the work item is awaiting_approval",
            ),
            (
                at(Stage::Done, Status::Done, 0),
                changes,
                true,
                false,
                "ignore: the work item is done",
            ),
            (
                at(Stage::Testing, active, 0),
                changes,
                true,
                true,
                "ignore: the PR is merged",
            ),
            (
                at(Stage::Testing, active, 0),
                changes,
                false,
                false,
                "ignore: 'x' is a bot",
            ),
            (
                at(Stage::Testing, active, 0),
                S::Approved,
                false,
                false,
                "ignore: 'x' is a bot",
            ),
            (
                at(Stage::Testing, active, 0),
                S::Approved,
                true,
                false,
                "record",
            ),
            (
                at(Stage::Done, Status::Done, 0),
                S::Approved,
                true,
                true,
                "record",
            ),
            (
                at(Stage::Testing, Status::Cancelled, 0),
                S::Approved,
                true,
                false,
                "ignore: the work item is cancelled",
            ),
            (
                at(Stage::Testing, active, 0),
                S::Comment,
                true,
                false,
                "ignore: a comment review asks for no change",
            ),
            (
                at(Stage::Testing, active, 0),
                S::Pending,
                true,
                false,
                "ignore: a pending review",
            ),
        ];
        for (pos, state, human, merged, want) in rows {
            let got = match decide(pos, state, human, merged, LIMITS, "x") {
                D::Ignore(why) => format!("ignore: {why}"),
                D::RecordApproval => "record".to_owned(),
                D::RollBack { n } => format!("rollback {n}"),
                D::Block(why) => {
                    assert!(why.contains("rollback budget (2) is spent"), "{why}");
                    "block".to_owned()
                }
            };
            assert!(
                got.starts_with(want),
                "{pos:?} {state:?} human={human} merged={merged}: {got}"
            );
        }
    }

    #[test]
    fn the_newest_counting_review_of_the_reviewer_is_picked() {
        let r = |id, author: &str, state, dismissed| PrReview {
            id,
            author: author.into(),
            state,
            body: format!("review {id}"),
            commit_id: String::new(),
            dismissed,
            stale: false,
            submitted_at: String::new(),
        };
        let reviews = vec![
            r(1, "ada", ReviewState::ChangesRequested, false),
            r(2, "bob", ReviewState::ChangesRequested, false),
            r(3, "Ada", ReviewState::ChangesRequested, false),
            r(4, "ada", ReviewState::ChangesRequested, true),
            r(5, "ada", ReviewState::Approved, false),
        ];
        assert_eq!(
            pick(&reviews, "ada", ReviewState::ChangesRequested).map(|r| r.id),
            Some(3)
        );
        assert_eq!(
            pick(&reviews, "ada", ReviewState::Approved).map(|r| r.id),
            Some(5)
        );
        assert_eq!(pick(&reviews, "carol", ReviewState::Approved), None);
    }
}
