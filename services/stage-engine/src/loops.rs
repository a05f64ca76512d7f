//! The loop detector (ARCHITECTURE §3.16, issue #18): the same stage of the same work item
//! failing its quality gate with the same failed checks [`LOOP_LIMIT`] times parks the item
//! as blocked with that reason, whatever retry or rollback budget is left — an agent that
//! keeps producing the same miss is spending money without progress.
//!
//! The history is the audit (`stage_transitions`: every retry and rollback keeps its QG
//! results); [`repeats`] is the pure count, [`guard`] turns a decision into the park.

use crate::engine::Engine;
use crate::error::EngineError;
use crate::pipeline::{Decision, Outcome, Position, Stage, Status};
use crate::qg::CheckResult;
use crate::store::{self, TransitionRow, WorkItemRow};

/// Identical gate failures of one stage that park the item.
pub const LOOP_LIMIT: u32 = 3;

/// The names of the checks that failed, sorted: what "the same failure" compares.
pub fn failed_checks(qg: &[CheckResult]) -> Vec<&str> {
    let mut names: Vec<&str> = qg
        .iter()
        .filter(|r| !r.outcome.passed())
        .map(|r| r.check)
        .collect();
    names.sort_unstable();
    names.dedup();
    names
}

/// How many earlier gate failures (retries and rollbacks) of `stage` in `history` failed
/// exactly the checks `failed`.
pub fn repeats(history: &[TransitionRow], stage: Stage, failed: &[&str]) -> u32 {
    let count = history
        .iter()
        .filter(|t| {
            t.from_stage == stage.as_str()
                && (t.outcome == Outcome::Retried.as_str()
                    || t.outcome == Outcome::RolledBack.as_str())
        })
        .filter(|t| {
            let results: Vec<serde_json::Value> =
                serde_json::from_str(&t.qg_results_json).unwrap_or_default();
            let mut names: Vec<&str> = results
                .iter()
                .filter(|r| r["passed"] == false)
                .filter_map(|r| r["check"].as_str())
                .collect();
            names.sort_unstable();
            names.dedup();
            names == failed
        })
        .count();
    u32::try_from(count).unwrap_or(u32::MAX)
}

/// `d` unless it is the [`LOOP_LIMIT`]th identical gate failure of this stage: then the
/// item parks as blocked, with the checks that keep failing.
pub(crate) async fn guard(
    engine: &Engine,
    item: &WorkItemRow,
    d: Decision,
    qg: &[CheckResult],
) -> Result<Decision, EngineError> {
    if !matches!(d.outcome, Outcome::Retried | Outcome::RolledBack) {
        return Ok(d);
    }
    let failed = failed_checks(qg);
    if failed.is_empty() {
        return Ok(d);
    }
    let history = store::list_transitions(&engine.db, &item.key).await?;
    let earlier = repeats(&history, item.stage, &failed);
    if earlier + 1 < LOOP_LIMIT {
        return Ok(d);
    }
    let reason = format!(
        "loop detected: the quality gate of {} failed the same way {} times ({})",
        item.stage,
        earlier + 1,
        failed.join(", ")
    );
    tracing::warn!(work_item = item.key, stage = %item.stage, checks = failed.join(","), "loop detected: parked as blocked");
    let at = item.position();
    Ok(Decision {
        outcome: Outcome::Blocked,
        to: Position {
            stage: at.stage,
            status: Status::Blocked,
            rollback_count: at.rollback_count,
            stage_retries: at.stage_retries,
        },
        enqueue: None,
        reason,
        done_by_deploy: false,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qg::CheckOutcome;

    fn t(stage: &str, outcome: &str, qg: serde_json::Value) -> TransitionRow {
        TransitionRow {
            id: String::new(),
            work_item: "K-1".into(),
            from_stage: stage.into(),
            to_stage: String::new(),
            from_status: String::new(),
            to_status: String::new(),
            outcome: outcome.into(),
            cause: String::new(),
            finished_agent: String::new(),
            job_id: String::new(),
            qg_results_json: qg.to_string(),
            at_ms: 0,
        }
    }

    #[test]
    fn only_the_same_stage_with_the_same_failed_checks_counts() {
        use serde_json::json;
        let miss = json!([{"check": "check_review_verdict", "passed": false, "detail": "x"}, {"check": "ci_green", "passed": true, "detail": "ok"}]);
        let other = json!([{"check": "ci_green", "passed": false, "detail": "y"}]);
        let both = json!([{"check": "check_review_verdict", "passed": false}, {"check": "ci_green", "passed": false}]);
        let history = vec![
            t("review", "rolled_back", miss.clone()),
            t("review", "retried", miss.clone()),
            t("review", "advanced", miss.clone()),
            t("testing", "retried", miss.clone()),
            t("review", "retried", other),
            t("review", "retried", both),
        ];
        assert_eq!(
            repeats(&history, Stage::Review, &["check_review_verdict"]),
            2
        );
        assert_eq!(repeats(&history, Stage::Review, &["ci_green"]), 1);
        assert_eq!(
            repeats(
                &history,
                Stage::Review,
                &["check_review_verdict", "ci_green"]
            ),
            1
        );
        assert_eq!(
            repeats(&history, Stage::Testing, &["check_review_verdict"]),
            1
        );
        let qg = [
            CheckResult {
                check: "ci_green",
                outcome: CheckOutcome::Fail("a".into()),
            },
            CheckResult {
                check: "check_review_verdict",
                outcome: CheckOutcome::Negative("b".into()),
            },
            CheckResult {
                check: "check_pr_exists",
                outcome: CheckOutcome::Pass,
            },
        ];
        assert_eq!(failed_checks(&qg), ["check_review_verdict", "ci_green"]);
    }
}
