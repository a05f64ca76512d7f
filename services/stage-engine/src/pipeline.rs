//! The pipeline as data — `STAGE_TRANSITIONS`, `ROLLBACKS`, `get_agent_for_stage` — and the
//! pure decision that `advance_stage` applies: given where a work item is, what happened
//! and what its quality gate said, where it goes next. No I/O here; the tables are tested
//! row by row.

use std::fmt;
use std::str::FromStr;

use crate::qg::{CheckOutcome, CheckResult};

/// A stage of the pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    Analysis,
    Architecture,
    Development,
    Review,
    Testing,
    DeployStaging,
    Deploy,
    Done,
}

impl Stage {
    pub const ALL: [Stage; 8] = [
        Stage::Analysis,
        Stage::Architecture,
        Stage::Development,
        Stage::Review,
        Stage::Testing,
        Stage::DeployStaging,
        Stage::Deploy,
        Stage::Done,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Analysis => "analysis",
            Stage::Architecture => "architecture",
            Stage::Development => "development",
            Stage::Review => "review",
            Stage::Testing => "testing",
            Stage::DeployStaging => "deploy-staging",
            Stage::Deploy => "deploy",
            Stage::Done => "done",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Stage {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Stage::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown stage '{}'", s.escape_debug()))
    }
}

/// A work item's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// An agent is expected to run (or is running) for the current stage.
    Active,
    /// The analysis passed; a human's `:approved:` is awaited.
    AwaitingApproval,
    /// Parked for a human: the rollback or retry budget is spent, or its job failed for
    /// good; `status_reason` says which and what to do.
    Blocked,
    Done,
    /// Ended by a human (or by reconciliation) before done; terminal like done.
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Active,
        Status::AwaitingApproval,
        Status::Blocked,
        Status::Done,
        Status::Cancelled,
    ];

    /// Nothing moves a work item out of a terminal status.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Done | Status::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Active => "active",
            Status::AwaitingApproval => "awaiting_approval",
            Status::Blocked => "blocked",
            Status::Done => "done",
            Status::Cancelled => "cancelled",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status '{}'", s.escape_debug()))
    }
}

/// What stands between a stage and the next one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The stage's quality gate.
    Qg,
    /// The quality gate, then a human's `:approved:`.
    QgThenHuman,
}

/// One row of [`STAGE_TRANSITIONS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransitionRow {
    pub from: Stage,
    pub to: Stage,
    pub gate: Gate,
}

/// The forward path: a stage whose gate passes moves to `to`.
pub const STAGE_TRANSITIONS: &[TransitionRow] = &[
    TransitionRow {
        from: Stage::Analysis,
        to: Stage::Architecture,
        gate: Gate::QgThenHuman,
    },
    TransitionRow {
        from: Stage::Architecture,
        to: Stage::Development,
        gate: Gate::Qg,
    },
    TransitionRow {
        from: Stage::Development,
        to: Stage::Review,
        gate: Gate::Qg,
    },
    TransitionRow {
        from: Stage::Review,
        to: Stage::Testing,
        gate: Gate::Qg,
    },
    TransitionRow {
        from: Stage::Testing,
        to: Stage::DeployStaging,
        gate: Gate::Qg,
    },
    TransitionRow {
        from: Stage::DeployStaging,
        to: Stage::Deploy,
        gate: Gate::Qg,
    },
    TransitionRow {
        from: Stage::Deploy,
        to: Stage::Done,
        gate: Gate::Qg,
    },
];

/// The row leaving `stage`, if any (`done` has none).
pub fn transition_from(stage: Stage) -> Option<&'static TransitionRow> {
    STAGE_TRANSITIONS.iter().find(|r| r.from == stage)
}

/// The agent that works a stage; `None` for `done`.
pub fn get_agent_for_stage(stage: Stage) -> Option<&'static str> {
    match stage {
        Stage::Analysis => Some("analyst"),
        Stage::Architecture => Some("architect"),
        Stage::Development => Some("developer"),
        Stage::Review => Some("reviewer"),
        Stage::Testing => Some("tester"),
        Stage::DeployStaging | Stage::Deploy => Some("deployer"),
        Stage::Done => None,
    }
}

/// Every agent that works a stage (each has its prompt `<role>.md`, its profile and its
/// tracker bot), in pipeline order: the distinct agents of [`get_agent_for_stage`]. The
/// launcher learns them from here (its start-up check of the prompts); it keeps no list.
pub const ROLES: [&str; 6] = [
    "analyst",
    "architect",
    "developer",
    "reviewer",
    "tester",
    "deployer",
];

/// What the launcher must do around a stage's run besides running it — set by stage-engine
/// on the job (its payload), so the launcher decides nothing by stage or role name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct JobFlags {
    /// Hold the repository's merge lease for the whole run (a deploy must not race a merge).
    pub needs_merge_lease: bool,
    /// Say on the tracker that the agent started (the first stage: a human waits for it).
    pub announce_start: bool,
}

/// The job flags of `stage`'s agent runs.
pub fn job_flags(stage: Stage) -> JobFlags {
    JobFlags {
        needs_merge_lease: stage == Stage::Deploy,
        announce_start: stage == Stage::Analysis,
    }
}

/// An agent-specific rollback branch: when `agent` finished `stage` and `check` gave a
/// negative verdict (not merely a missing one), the item goes back to `to`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RollbackRule {
    pub stage: Stage,
    pub agent: &'static str,
    pub check: &'static str,
    pub to: Stage,
    pub cause: &'static str,
}

/// Every rollback branch.
pub const ROLLBACKS: &[RollbackRule] = &[
    RollbackRule {
        stage: Stage::Review,
        agent: "reviewer",
        check: "check_review_verdict",
        to: Stage::Development,
        cause: "the reviewer asked for changes",
    },
    RollbackRule {
        stage: Stage::Review,
        agent: "reviewer",
        check: "ci_green",
        to: Stage::Development,
        cause: "CI failed",
    },
    RollbackRule {
        stage: Stage::Testing,
        agent: "tester",
        check: "check_test_status",
        to: Stage::Development,
        cause: "the tests failed",
    },
    RollbackRule {
        stage: Stage::DeployStaging,
        agent: "deployer",
        check: "check_staging_status",
        to: Stage::Development,
        cause: "staging FAILED",
    },
    RollbackRule {
        stage: Stage::Deploy,
        agent: "deployer",
        check: "check_deploy_status",
        to: Stage::Development,
        cause: "the deploy FAILED",
    },
    RollbackRule {
        stage: Stage::Deploy,
        agent: "deployer",
        check: "ci_green",
        to: Stage::Development,
        cause: "CI failed",
    },
];

/// What made `advance_stage` run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Trigger {
    /// An agent finished its run (the launcher's success path, the reaper's exit-0 path).
    AgentFinished { agent: String },
    /// A `:approved:` comment; `human` is false for a bot account.
    Approval { author: String, human: bool },
    /// The forge reported the work item's PR merged.
    PrMerged,
}

/// Where a work item is, as far as the decision needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub stage: Stage,
    pub status: Status,
    pub rollback_count: u32,
    pub stage_retries: u32,
}

/// The budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `ORCH_MAX_ROLLBACKS`: rollbacks allowed before the item parks as blocked.
    pub max_rollbacks: u32,
    /// `ORCH_MAX_STAGE_RETRIES`: quality-gate failures retried in one stage before it parks.
    pub max_stage_retries: u32,
}

/// What `advance_stage` reports, as in the proto's `AdvanceOutcome`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Advanced,
    Retried,
    RolledBack,
    AwaitingApproval,
    Blocked,
    Done,
    Unchanged,
    /// A blocked item resumed by a human (reported as ADVANCED over gRPC).
    Unblocked,
    /// Ended by `Cancel`.
    Cancelled,
}

impl Outcome {
    /// The name written in `stage_transitions.outcome`.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Advanced => "advanced",
            Outcome::Retried => "retried",
            Outcome::RolledBack => "rolled_back",
            Outcome::AwaitingApproval => "awaiting_approval",
            Outcome::Blocked => "blocked",
            Outcome::Done => "done",
            Outcome::Unchanged => "unchanged",
            Outcome::Unblocked => "unblocked",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// The decision: where the item goes and what to enqueue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub to: Position,
    /// The agent to enqueue for the new position.
    pub enqueue: Option<&'static str>,
    /// Why, in words (the transition's cause, the comment's text, the RPC's reason).
    pub reason: String,
    /// True when `done` was reached through the deploy gate (the post-deploy watch applies).
    pub done_by_deploy: bool,
}

impl Decision {
    fn unchanged(at: Position, reason: impl Into<String>) -> Self {
        Decision {
            outcome: Outcome::Unchanged,
            to: at,
            enqueue: None,
            reason: reason.into(),
            done_by_deploy: false,
        }
    }
}

/// Whether the quality gate of the current stage must be run for `trigger`. When false,
/// [`decide`] needs no QG results.
pub fn needs_qg(at: Position, trigger: &Trigger) -> bool {
    match trigger {
        Trigger::AgentFinished { agent } => {
            at.status == Status::Active && get_agent_for_stage(at.stage) == Some(agent.as_str())
        }
        Trigger::Approval { human, .. } => *human && at.status == Status::AwaitingApproval,
        Trigger::PrMerged => false,
    }
}

/// Decides where the item goes. `qg` holds the results of the current stage's checks when
/// [`needs_qg`] said so (it is ignored otherwise).
pub fn decide(at: Position, trigger: &Trigger, qg: &[CheckResult], limits: Limits) -> Decision {
    if at.status == Status::Cancelled {
        return Decision::unchanged(at, "the work item is cancelled");
    }
    if at.status == Status::Done || at.stage == Stage::Done {
        return Decision::unchanged(at, "the work item is already done");
    }
    match trigger {
        Trigger::PrMerged => {
            if at.stage == Stage::Deploy {
                // BUG-8: the deploy-finalizer's own merge arrives here; done at deploy is
                // gated only by the deployer's verdict (check_deploy_status).
                return Decision::unchanged(
                    at,
                    "a merge at deploy does not complete the work item: the deployer's verdict does",
                );
            }
            return done(at, format!("the PR was merged at {}", at.stage), false);
        }
        Trigger::Approval { author, human } => {
            if !human {
                return Decision::unchanged(
                    at,
                    format!("'{author}' is a bot: a bot never approves"),
                );
            }
            match at.status {
                Status::AwaitingApproval => {}
                Status::Blocked => {
                    let Some(agent) = get_agent_for_stage(at.stage) else {
                        return Decision::unchanged(at, "nothing to resume");
                    };
                    return Decision {
                        outcome: Outcome::Unblocked,
                        to: Position {
                            stage: at.stage,
                            status: Status::Active,
                            rollback_count: 0,
                            stage_retries: 0,
                        },
                        enqueue: Some(agent),
                        reason: format!(
                            "unblocked by {author}: {} retries {} with a fresh budget",
                            agent, at.stage
                        ),
                        done_by_deploy: false,
                    };
                }
                Status::Active | Status::Done | Status::Cancelled => {
                    return Decision::unchanged(at, "the work item is not awaiting approval");
                }
            }
        }
        Trigger::AgentFinished { agent } => match at.status {
            Status::Active => {
                if get_agent_for_stage(at.stage) != Some(agent.as_str()) {
                    return Decision::unchanged(
                        at,
                        format!("'{agent}' does not work stage {}", at.stage),
                    );
                }
            }
            Status::AwaitingApproval => {
                return Decision::unchanged(at, "the work item awaits a human's approval");
            }
            Status::Blocked => {
                return Decision::unchanged(
                    at,
                    "the work item is blocked: a human must look at it",
                );
            }
            Status::Done | Status::Cancelled => {
                return Decision::unchanged(at, "the work item has ended");
            }
        },
    }

    let Some(row) = transition_from(at.stage) else {
        return Decision::unchanged(at, "no transition leaves this stage");
    };
    let failed: Vec<&CheckResult> = qg.iter().filter(|r| !r.outcome.passed()).collect();
    if qg.is_empty() || failed.is_empty() {
        if row.gate == Gate::QgThenHuman && matches!(trigger, Trigger::AgentFinished { .. }) {
            return Decision {
                outcome: Outcome::AwaitingApproval,
                to: Position {
                    stage: at.stage,
                    status: Status::AwaitingApproval,
                    rollback_count: at.rollback_count,
                    stage_retries: 0,
                },
                enqueue: None,
                reason: format!(
                    "{} passed its quality gate: a human's :approved: is needed",
                    at.stage
                ),
                done_by_deploy: false,
            };
        }
        if row.to == Stage::Done {
            return done(at, "the deploy succeeded".to_owned(), true);
        }
        let reason = match trigger {
            Trigger::Approval { author, .. } => format!("approved by {author}"),
            _ => format!("{} passed its quality gate", at.stage),
        };
        return Decision {
            outcome: Outcome::Advanced,
            to: Position {
                stage: row.to,
                status: Status::Active,
                rollback_count: at.rollback_count,
                stage_retries: 0,
            },
            enqueue: get_agent_for_stage(row.to),
            reason,
            done_by_deploy: false,
        };
    }

    let what_failed = failed
        .iter()
        .map(|r| format!("{}: {}", r.check, r.outcome.detail()))
        .collect::<Vec<_>>()
        .join("; ");
    let finished = match trigger {
        Trigger::AgentFinished { agent } => Some(agent.as_str()),
        _ => None,
    };
    let rollback = ROLLBACKS.iter().find(|rule| {
        rule.stage == at.stage
            && Some(rule.agent) == finished
            && failed
                .iter()
                .any(|r| r.check == rule.check && matches!(r.outcome, CheckOutcome::Negative(_)))
    });
    if let Some(rule) = rollback {
        if at.rollback_count >= limits.max_rollbacks {
            return blocked(
                at,
                format!(
                    "{} ({what_failed}) and the rollback budget ({}) is spent",
                    rule.cause, limits.max_rollbacks
                ),
            );
        }
        return Decision {
            outcome: Outcome::RolledBack,
            to: Position {
                stage: rule.to,
                status: Status::Active,
                rollback_count: at.rollback_count + 1,
                stage_retries: 0,
            },
            enqueue: get_agent_for_stage(rule.to),
            reason: format!(
                "{} ({what_failed}): back to {} (rollback {} of {})",
                rule.cause,
                rule.to,
                at.rollback_count + 1,
                limits.max_rollbacks
            ),
            done_by_deploy: false,
        };
    }
    // Only a verdict still to come (CI running): wait, launch nothing; `ci` checks again.
    if failed
        .iter()
        .all(|r| matches!(r.outcome, CheckOutcome::Pending(_)))
    {
        return Decision::unchanged(at, format!("waiting: {what_failed}"));
    }
    if at.stage_retries >= limits.max_stage_retries {
        return blocked(
            at,
            format!(
                "the quality gate of {} failed ({what_failed}) and its retries ({}) are spent",
                at.stage, limits.max_stage_retries
            ),
        );
    }
    Decision {
        outcome: Outcome::Retried,
        to: Position {
            stage: at.stage,
            status: Status::Active,
            rollback_count: at.rollback_count,
            stage_retries: at.stage_retries + 1,
        },
        enqueue: get_agent_for_stage(at.stage),
        reason: format!(
            "the quality gate of {} failed ({what_failed}): retry {} of {}",
            at.stage,
            at.stage_retries + 1,
            limits.max_stage_retries
        ),
        done_by_deploy: false,
    }
}

fn done(at: Position, reason: String, by_deploy: bool) -> Decision {
    Decision {
        outcome: Outcome::Done,
        to: Position {
            stage: Stage::Done,
            status: Status::Done,
            rollback_count: at.rollback_count,
            stage_retries: 0,
        },
        enqueue: None,
        reason,
        done_by_deploy: by_deploy,
    }
}

fn blocked(at: Position, reason: String) -> Decision {
    Decision {
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
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::qg::{CheckOutcome, CheckResult, checks_for};

    const LIMITS: Limits = Limits {
        max_rollbacks: 3,
        max_stage_retries: 2,
    };

    fn at(stage: Stage, status: Status) -> Position {
        Position {
            stage,
            status,
            rollback_count: 0,
            stage_retries: 0,
        }
    }

    fn finished(agent: &str) -> Trigger {
        Trigger::AgentFinished {
            agent: agent.to_owned(),
        }
    }

    fn human() -> Trigger {
        Trigger::Approval {
            author: "ada".into(),
            human: true,
        }
    }

    fn bot() -> Trigger {
        Trigger::Approval {
            author: "reviewer".into(),
            human: false,
        }
    }

    /// Every check of `stage` passing.
    fn pass(stage: Stage) -> Vec<CheckResult> {
        checks_for(stage)
            .map(|c| CheckResult {
                check: c.name,
                outcome: CheckOutcome::Pass,
            })
            .collect()
    }

    /// Every check of `stage` passing except `check`, which has `outcome`.
    fn with(stage: Stage, check: &str, outcome: CheckOutcome) -> Vec<CheckResult> {
        let mut r = pass(stage);
        let c = r
            .iter_mut()
            .find(|c| c.check == check)
            .expect("check of the stage");
        c.outcome = outcome;
        r
    }

    #[test]
    fn the_forward_path_is_one_chain_from_analysis_to_done() {
        let mut stage = Stage::Analysis;
        let mut seen = vec![stage];
        while let Some(row) = transition_from(stage) {
            stage = row.to;
            seen.push(stage);
        }
        assert_eq!(seen, Stage::ALL.to_vec());
        assert_eq!(STAGE_TRANSITIONS.len(), Stage::ALL.len() - 1);
        // Only the analysis waits for a human.
        for row in STAGE_TRANSITIONS {
            assert_eq!(
                row.gate == Gate::QgThenHuman,
                row.from == Stage::Analysis,
                "{row:?}"
            );
        }
    }

    #[test]
    fn only_the_deploy_holds_the_merge_lease_and_only_the_analysis_announces_its_start() {
        for stage in Stage::ALL {
            let f = job_flags(stage);
            assert_eq!(f.needs_merge_lease, stage == Stage::Deploy, "{stage}");
            assert_eq!(f.announce_start, stage == Stage::Analysis, "{stage}");
        }
    }

    #[test]
    fn every_stage_has_its_agent() {
        for (stage, agent) in [
            (Stage::Analysis, Some("analyst")),
            (Stage::Architecture, Some("architect")),
            (Stage::Development, Some("developer")),
            (Stage::Review, Some("reviewer")),
            (Stage::Testing, Some("tester")),
            (Stage::DeployStaging, Some("deployer")),
            (Stage::Deploy, Some("deployer")),
            (Stage::Done, None),
        ] {
            assert_eq!(get_agent_for_stage(stage), agent, "{stage}");
            assert_eq!(stage.as_str().parse::<Stage>(), Ok(stage));
        }
        // ROLES is exactly the distinct agents of the stages, in order.
        let mut agents: Vec<&str> = Vec::new();
        for a in Stage::ALL.into_iter().filter_map(get_agent_for_stage) {
            if !agents.contains(&a) {
                agents.push(a);
            }
        }
        assert_eq!(agents, ROLES.to_vec());
        assert!("nope".parse::<Stage>().is_err());
        for s in Status::ALL {
            assert_eq!(s.as_str().parse::<Status>(), Ok(s));
        }
    }

    /// Every row of STAGE_TRANSITIONS: the stage's own agent finishes, its gate passes.
    #[test]
    fn every_transition_row_advances_on_a_passing_gate() {
        for row in STAGE_TRANSITIONS {
            let agent = get_agent_for_stage(row.from).expect("agent");
            let d = decide(
                at(row.from, Status::Active),
                &finished(agent),
                &pass(row.from),
                LIMITS,
            );
            let (outcome, stage, status, enqueue) = match (row.gate, row.to) {
                (Gate::QgThenHuman, _) => (
                    Outcome::AwaitingApproval,
                    row.from,
                    Status::AwaitingApproval,
                    None,
                ),
                (Gate::Qg, Stage::Done) => (Outcome::Done, Stage::Done, Status::Done, None),
                // The agent of the NEW stage, never the one after it.
                (Gate::Qg, to) => (
                    Outcome::Advanced,
                    to,
                    Status::Active,
                    get_agent_for_stage(to),
                ),
            };
            assert_eq!(
                (d.outcome, d.to.stage, d.to.status, d.enqueue),
                (outcome, stage, status, enqueue),
                "{row:?}: {}",
                d.reason
            );
            assert_eq!(d.done_by_deploy, row.to == Stage::Done, "{row:?}");
            assert_eq!(d.to.stage_retries, 0);
        }
    }

    #[test]
    fn the_human_gate_after_analysis() {
        let waiting = at(Stage::Analysis, Status::AwaitingApproval);
        // A human's approval re-runs the analysis gate and advances.
        assert!(needs_qg(waiting, &human()));
        let d = decide(waiting, &human(), &pass(Stage::Analysis), LIMITS);
        assert_eq!(
            (d.outcome, d.to.stage, d.to.status, d.enqueue),
            (
                Outcome::Advanced,
                Stage::Architecture,
                Status::Active,
                Some("architect")
            )
        );
        assert_eq!(d.reason, "approved by ada");
        // A bot's never does.
        assert!(!needs_qg(waiting, &bot()));
        let d = decide(waiting, &bot(), &[], LIMITS);
        assert_eq!((d.outcome, d.to), (Outcome::Unchanged, waiting));
        assert!(d.reason.contains("a bot never approves"), "{}", d.reason);
        // An agent's finish while waiting changes nothing.
        let d = decide(
            waiting,
            &finished("analyst"),
            &pass(Stage::Analysis),
            LIMITS,
        );
        assert_eq!(d.outcome, Outcome::Unchanged);
        // An approval when none is awaited changes nothing.
        for s in [Stage::Analysis, Stage::Review] {
            let d = decide(at(s, Status::Active), &human(), &[], LIMITS);
            assert_eq!(d.outcome, Outcome::Unchanged, "{s}");
        }
        // The approved analysis gate failing (the artifact vanished) retries the analyst.
        let d = decide(
            waiting,
            &human(),
            &with(
                Stage::Analysis,
                "check_analysis",
                CheckOutcome::Fail("missing".into()),
            ),
            LIMITS,
        );
        assert_eq!(
            (d.outcome, d.to.stage, d.to.status, d.enqueue),
            (
                Outcome::Retried,
                Stage::Analysis,
                Status::Active,
                Some("analyst")
            )
        );
    }

    /// Every rollback branch: the agent's negative verdict sends the item to development.
    #[test]
    fn every_rollback_branch() {
        for rule in ROLLBACKS {
            let qg = with(
                rule.stage,
                rule.check,
                CheckOutcome::Negative("FAILED".into()),
            );
            let d = decide(
                at(rule.stage, Status::Active),
                &finished(rule.agent),
                &qg,
                LIMITS,
            );
            assert_eq!(
                (
                    d.outcome,
                    d.to.stage,
                    d.to.status,
                    d.to.rollback_count,
                    d.enqueue
                ),
                (
                    Outcome::RolledBack,
                    Stage::Development,
                    Status::Active,
                    1,
                    Some("developer")
                ),
                "{rule:?}"
            );
            assert!(d.reason.starts_with(rule.cause), "{}", d.reason);
            // A missing verdict is not a negative one: the stage is retried instead.
            let qg = with(rule.stage, rule.check, CheckOutcome::Fail("missing".into()));
            let d = decide(
                at(rule.stage, Status::Active),
                &finished(rule.agent),
                &qg,
                LIMITS,
            );
            assert_eq!(
                (d.outcome, d.to.stage, d.enqueue, d.to.stage_retries),
                (Outcome::Retried, rule.stage, Some(rule.agent), 1),
                "{rule:?}"
            );
        }
        assert_eq!(
            ROLLBACKS.iter().map(|r| r.stage).collect::<Vec<_>>(),
            vec![
                Stage::Review,
                Stage::Review,
                Stage::Testing,
                Stage::DeployStaging,
                Stage::Deploy,
                Stage::Deploy
            ]
        );
    }

    /// A verdict still to come (CI running) waits: nothing changes, nothing is enqueued;
    /// beside a missing artifact the stage is retried, beside a negative verdict it rolls back.
    #[test]
    fn a_pending_check_waits_unless_something_else_failed() {
        let review = at(Stage::Review, Status::Active);
        let pending = CheckResult {
            check: "ci_green",
            outcome: CheckOutcome::Pending("CI is running on abc: ci/build".into()),
        };
        let verdict = |o: CheckOutcome| CheckResult {
            check: "check_review_verdict",
            outcome: o,
        };
        let d = decide(
            review,
            &finished("reviewer"),
            &[verdict(CheckOutcome::Pass), pending.clone()],
            LIMITS,
        );
        assert_eq!(
            (d.outcome, d.enqueue, d.to),
            (Outcome::Unchanged, None, review)
        );
        assert!(
            d.reason.starts_with("waiting: ci_green: CI is running"),
            "{}",
            d.reason
        );
        let d = decide(
            review,
            &finished("reviewer"),
            &[
                verdict(CheckOutcome::Fail("missing".into())),
                pending.clone(),
            ],
            LIMITS,
        );
        assert_eq!((d.outcome, d.enqueue), (Outcome::Retried, Some("reviewer")));
        let d = decide(
            review,
            &finished("reviewer"),
            &[
                verdict(CheckOutcome::Negative("CHANGES_REQUESTED".into())),
                pending,
            ],
            LIMITS,
        );
        assert_eq!(
            (d.outcome, d.to.stage),
            (Outcome::RolledBack, Stage::Development)
        );
        // CI failing is a rollback of its own.
        let d = decide(
            review,
            &finished("reviewer"),
            &[
                verdict(CheckOutcome::Pass),
                CheckResult {
                    check: "ci_green",
                    outcome: CheckOutcome::Negative("CI failure on abc".into()),
                },
            ],
            LIMITS,
        );
        assert_eq!(
            (d.outcome, d.to.stage),
            (Outcome::RolledBack, Stage::Development)
        );
        assert!(d.reason.starts_with("CI failed"), "{}", d.reason);
    }

    #[test]
    fn the_rollback_budget_parks_the_item_as_blocked() {
        let rule = &ROLLBACKS[0];
        let qg = with(
            rule.stage,
            rule.check,
            CheckOutcome::Negative("CHANGES_REQUESTED".into()),
        );
        for (count, outcome, status) in [
            (0, Outcome::RolledBack, Status::Active),
            (2, Outcome::RolledBack, Status::Active),
            (3, Outcome::Blocked, Status::Blocked),
            (7, Outcome::Blocked, Status::Blocked),
        ] {
            let mut p = at(rule.stage, Status::Active);
            p.rollback_count = count;
            let d = decide(p, &finished(rule.agent), &qg, LIMITS);
            assert_eq!((d.outcome, d.to.status), (outcome, status), "count {count}");
            if outcome == Outcome::Blocked {
                assert_eq!(
                    (d.to.stage, d.enqueue, d.to.rollback_count),
                    (rule.stage, None, count)
                );
                assert!(
                    d.reason.contains("rollback budget (3) is spent"),
                    "{}",
                    d.reason
                );
            } else {
                assert_eq!(d.to.rollback_count, count + 1);
            }
        }
        // A budget of 0 blocks at the first rollback.
        let d = decide(
            at(rule.stage, Status::Active),
            &finished(rule.agent),
            &qg,
            Limits {
                max_rollbacks: 0,
                max_stage_retries: 2,
            },
        );
        assert_eq!(d.outcome, Outcome::Blocked);
    }

    #[test]
    fn retries_of_a_stage_are_bounded_too() {
        let qg = with(
            Stage::Development,
            "check_pr_exists",
            CheckOutcome::Fail("no PR".into()),
        );
        for (retries, outcome) in [
            (0, Outcome::Retried),
            (1, Outcome::Retried),
            (2, Outcome::Blocked),
        ] {
            let mut p = at(Stage::Development, Status::Active);
            p.stage_retries = retries;
            let d = decide(p, &finished("developer"), &qg, LIMITS);
            assert_eq!(d.outcome, outcome, "retries {retries}");
        }
    }

    #[test]
    fn a_blocked_item_waits_for_a_human_who_resumes_it_with_a_fresh_budget() {
        let mut p = at(Stage::Review, Status::Blocked);
        p.rollback_count = 3;
        assert_eq!(
            decide(p, &finished("reviewer"), &pass(Stage::Review), LIMITS).outcome,
            Outcome::Unchanged
        );
        assert_eq!(decide(p, &bot(), &[], LIMITS).outcome, Outcome::Unchanged);
        let d = decide(p, &human(), &[], LIMITS);
        assert_eq!(
            (
                d.outcome,
                d.to.stage,
                d.to.status,
                d.to.rollback_count,
                d.enqueue
            ),
            (
                Outcome::Unblocked,
                Stage::Review,
                Status::Active,
                0,
                Some("reviewer")
            )
        );
    }

    /// BUG-8: a merge at deploy does not complete the item; at any other stage it does.
    #[test]
    fn bug_8_a_merge_completes_the_item_everywhere_but_at_deploy() {
        for stage in Stage::ALL {
            for status in [Status::Active, Status::AwaitingApproval, Status::Blocked] {
                if stage == Stage::Done {
                    continue;
                }
                assert!(!needs_qg(at(stage, status), &Trigger::PrMerged));
                let d = decide(at(stage, status), &Trigger::PrMerged, &[], LIMITS);
                if stage == Stage::Deploy {
                    assert_eq!(
                        (d.outcome, d.to),
                        (Outcome::Unchanged, at(stage, status)),
                        "{stage}"
                    );
                    assert!(d.reason.contains("deployer's verdict"), "{}", d.reason);
                } else {
                    assert_eq!(
                        (d.outcome, d.to.stage, d.to.status, d.done_by_deploy),
                        (Outcome::Done, Stage::Done, Status::Done, false),
                        "{stage} {status}"
                    );
                }
            }
        }
        let d = decide(
            at(Stage::Done, Status::Done),
            &Trigger::PrMerged,
            &[],
            LIMITS,
        );
        assert_eq!(d.outcome, Outcome::Unchanged);
    }

    #[test]
    fn an_agent_that_does_not_work_the_stage_changes_nothing() {
        for (stage, agent) in [
            (Stage::Review, "developer"),
            (Stage::Development, "reviewer"),
            (Stage::Testing, "deployer"),
        ] {
            let p = at(stage, Status::Active);
            assert!(!needs_qg(p, &finished(agent)));
            let d = decide(p, &finished(agent), &[], LIMITS);
            assert_eq!(
                (d.outcome, d.to),
                (Outcome::Unchanged, p),
                "{stage} {agent}"
            );
        }
        // Once done, nothing moves it.
        let done = at(Stage::Done, Status::Done);
        for t in [finished("deployer"), human(), Trigger::PrMerged] {
            assert_eq!(decide(done, &t, &[], LIMITS).outcome, Outcome::Unchanged);
        }
    }

    #[test]
    fn a_cancelled_item_ignores_every_trigger() {
        for stage in Stage::ALL {
            let p = at(stage, Status::Cancelled);
            for t in [
                finished(get_agent_for_stage(stage).unwrap_or("deployer")),
                human(),
                bot(),
                Trigger::PrMerged,
            ] {
                let d = decide(p, &t, &pass(stage), LIMITS);
                assert_eq!((d.outcome, d.to), (Outcome::Unchanged, p), "{stage} {t:?}");
                assert_eq!(d.reason, "the work item is cancelled");
            }
        }
        assert!(Status::Cancelled.is_terminal() && Status::Done.is_terminal());
        assert!(!Status::Blocked.is_terminal());
    }

    #[test]
    fn a_rollback_needs_the_rule_agent_and_the_rule_check() {
        // The deployer's FAILED at deploy-staging: rollback. The same check failing at deploy
        // is deploy's own rule.
        let qg = with(
            Stage::DeployStaging,
            "check_staging_status",
            CheckOutcome::Negative("FAILED".into()),
        );
        assert_eq!(
            decide(
                at(Stage::DeployStaging, Status::Active),
                &finished("deployer"),
                &qg,
                LIMITS
            )
            .outcome,
            Outcome::RolledBack
        );
        // Other failing checks alongside still roll back; the reason lists them all.
        let mut qg = with(
            Stage::Development,
            "check_branch_mergeable",
            CheckOutcome::Fail("conflicts".into()),
        );
        qg[0].outcome = CheckOutcome::Fail("missing".into());
        let d = decide(
            at(Stage::Development, Status::Active),
            &finished("developer"),
            &qg,
            LIMITS,
        );
        assert_eq!(d.outcome, Outcome::Retried);
        assert!(
            d.reason.contains("check_development_notes: missing")
                && d.reason.contains("check_branch_mergeable: conflicts"),
            "{}",
            d.reason
        );
    }
}
