//! Reconciliation with the outside (ARCHITECTURE §3.15): every `ORCH_RECONCILE_INTERVAL_S`
//! stage-engine reads what Plane and the forge say and repairs what a lost webhook left:
//!
//! - a Plane issue in the trigger state or label without a work item (its delivery was made
//!   while the gateway was down, or never sent) gets one, through the same
//!   [`Engine::create_work_item`] as the webhook (idempotent on the issue id);
//! - a work item whose issue was deleted, or moved by a human to a cancelled or completed
//!   state, is cancelled (through [`cancel`], the one seam to the cancel path);
//! - the PR of a work item past development that was merged while its webhook was lost is
//!   applied as the webhook would have been: [`Engine::advance_stage`] with
//!   [`Trigger::PrMerged`], the BUG-8 rule included.
//!
//! Never-raise per unit of work: one issue or item that fails is counted and logged, and
//! the pass goes on; a pass that fails as a whole is logged and the loop lives on.

use std::collections::HashMap;
use std::time::Duration;

use orchestrator_forge::RepoName;
use orchestrator_tracker::{Issue, IssueRef, TrackerKind};
use tokio_util::sync::CancellationToken;

use crate::engine::{Engine, NewWorkItem};
use crate::error::EngineError;
use crate::pipeline::{Outcome, Stage, Status, Trigger};
use crate::store::{self, ListFilter, WorkItemRow};

/// How often, and what turns an issue into a work item.
#[derive(Debug, Clone, Default)]
pub struct ReconcileConfig {
    /// `ORCH_RECONCILE_INTERVAL_S` (default 300): the time between two passes; `None` (0)
    /// turns reconciliation off.
    pub interval: Option<Duration>,
    /// The trigger and the repositories (`ORCH_PLANE_TRIGGER_*`, `ORCH_PLANE_*_REPO*`),
    /// the gateway's own.
    pub intake: orchestrator_tracker::intake::Intake,
}

/// What one pass did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Pass {
    /// Work items created for issues that had none.
    pub created: u32,
    /// Work items handed to the cancel path.
    pub cancelled: u32,
    /// Merged PRs applied (the work item moved).
    pub merges_applied: u32,
    /// Units of work that failed (each logged).
    pub errors: u32,
    /// The work items to cancel, with why: `(key, reason)`.
    pub to_cancel: Vec<(String, String)>,
}

/// Stages whose PR may have been merged behind our back: those after development.
const PAST_DEVELOPMENT: [Stage; 4] = [
    Stage::Review,
    Stage::Testing,
    Stage::DeployStaging,
    Stage::Deploy,
];

/// Work items still in the pipeline (not done, not ended by a human).
const OPEN: [Status; 3] = [Status::Active, Status::AwaitingApproval, Status::Blocked];

/// Cancels `item` because its tracker issue is gone or closed: the ONE seam between
/// reconciliation and the cancel path (`Engine::cancel`, as `item cancel` does). Returns
/// whether the item was cancelled (false: it had ended meanwhile).
async fn cancel(engine: &Engine, item: &WorkItemRow, reason: &str) -> Result<bool, EngineError> {
    let done = engine.cancel(&item.key, "reconcile", reason).await?;
    Ok(done.outcome == Outcome::Cancelled)
}

/// Runs a pass every `interval` until `shutdown` (the first one after one interval, so a
/// starting stack is not slowed down). Does nothing when reconciliation is off.
pub async fn run(engine: Engine, shutdown: CancellationToken) {
    let Some(interval) = engine.config.reconcile.interval else {
        tracing::info!("reconciliation is off (ORCH_RECONCILE_INTERVAL_S=0)");
        return;
    };
    tracing::info!(
        interval_s = interval.as_secs(),
        "reconciliation with the tracker and the forge started"
    );
    if engine.tracker.kind() == TrackerKind::Plane && plane_projects(&engine).is_empty() {
        // Said once: without a project, a Plane delivery lost before the gateway stays lost.
        tracing::warn!(
            "reconciliation knows no Plane project to list: set PLANE_PROJECT_ID (with ORCH_PLANE_DEFAULT_REPO) or ORCH_PLANE_PROJECT_REPOS"
        );
    }
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(interval) => {}
        }
        match pass(&engine).await {
            Ok(p) => tracing::info!(
                created = p.created,
                cancelled = p.cancelled,
                merges_applied = p.merges_applied,
                errors = p.errors,
                "reconciliation pass"
            ),
            Err(e) => tracing::warn!(error = %e, "reconciliation pass failed"),
        }
    }
    tracing::info!("reconciliation stopped");
}

/// The Plane projects whose issues reconciliation lists: those of ORCH_PLANE_PROJECT_REPOS,
/// and PLANE_PROJECT_ID when ORCH_PLANE_DEFAULT_REPO maps it.
fn plane_projects(engine: &Engine) -> Vec<String> {
    let default = engine
        .config
        .tracker
        .plane
        .as_ref()
        .and_then(|c| c.project_id.clone());
    engine.config.reconcile.intake.projects(default.as_deref())
}

/// One pass: the tracker first (new and gone issues), then the forge (lost merges).
pub async fn pass(engine: &Engine) -> Result<Pass, EngineError> {
    let mut p = Pass::default();
    let open = open_items(engine).await?;
    if engine.tracker.kind() == TrackerKind::Plane {
        for project in plane_projects(engine) {
            if let Err(e) = tracker_project(engine, &project, &open, &mut p).await {
                p.errors += 1;
                tracing::warn!(project, error = %e, "reconciliation could not list the project's issues");
            }
        }
        for (key, reason) in p.to_cancel.clone() {
            let Some(item) = open.iter().find(|i| i.key == key) else {
                continue;
            };
            match cancel(engine, item, &reason).await {
                Ok(true) => p.cancelled += 1,
                Ok(false) => {}
                Err(e) => {
                    p.errors += 1;
                    tracing::warn!(work_item = %key, error = %e, "reconciliation could not cancel");
                }
            }
        }
    }
    for item in open.iter().filter(|i| PAST_DEVELOPMENT.contains(&i.stage)) {
        match lost_merge(engine, item).await {
            Ok(true) => p.merges_applied += 1,
            Ok(false) => {}
            Err(e) => {
                p.errors += 1;
                tracing::warn!(work_item = %item.key, error = %e, "reconciliation could not re-read the PR");
            }
        }
    }
    Ok(p)
}

async fn open_items(engine: &Engine) -> Result<Vec<WorkItemRow>, EngineError> {
    let all = ListFilter {
        limit: 100_000,
        ..ListFilter::default()
    };
    Ok(store::list(&engine.db, &all)
        .await?
        .into_iter()
        .filter(|i| OPEN.contains(&i.status))
        .collect())
}

/// One Plane project: creates the missing work items, and notes those to cancel.
async fn tracker_project(
    engine: &Engine,
    project: &str,
    open: &[WorkItemRow],
    p: &mut Pass,
) -> Result<(), EngineError> {
    let intake = &engine.config.reconcile.intake;
    let issues = engine.tracker.list_issues(project).await.map_err(|e| {
        EngineError::Unavailable(format!("list the issues of project {project}: {e}"))
    })?;
    for issue in issues.iter().filter(|i| intake.triggers(i)) {
        match missing_item(engine, project, issue).await {
            Ok(true) => p.created += 1,
            Ok(false) => {}
            Err(e) => {
                p.errors += 1;
                tracing::warn!(tracker_issue_id = %issue.id, error = %e, "reconciliation could not create the work item");
            }
        }
    }
    let by_id: HashMap<&str, &Issue> = issues.iter().map(|i| (i.id.as_str(), i)).collect();
    for item in open.iter().filter(|i| i.tracker_project_id == project) {
        let verdict = match by_id.get(item.tracker_issue_id.as_str()) {
            Some(issue) => Ok(Some(*issue).cloned()),
            // Not listed: deleted, or only hidden from the listing (archived, triage). Ask.
            None => {
                engine
                    .tracker
                    .get_issue(&IssueRef {
                        project_id: project.to_owned(),
                        issue_id: item.tracker_issue_id.clone(),
                    })
                    .await
            }
        };
        match verdict {
            Ok(None) => p
                .to_cancel
                .push((item.key.clone(), "its Plane issue was deleted".to_owned())),
            Ok(Some(issue)) if issue.is_closed() => {
                let state = issue.state.map(|s| s.name).unwrap_or_default();
                p.to_cancel.push((
                    item.key.clone(),
                    format!("its Plane issue was moved to {state}"),
                ));
            }
            Ok(Some(_)) => {}
            Err(e) => {
                p.errors += 1;
                tracing::warn!(work_item = %item.key, error = %e, "reconciliation could not read the work item's issue");
            }
        }
    }
    Ok(())
}

/// Creates the work item of a triggered issue that has none; returns whether it did.
async fn missing_item(engine: &Engine, project: &str, issue: &Issue) -> Result<bool, EngineError> {
    if store::get_by_tracker_issue(&engine.db, &issue.id)
        .await?
        .is_some()
    {
        return Ok(false);
    }
    let Some(repo) = engine.config.reconcile.intake.repos.repo_for(project) else {
        return Err(EngineError::Precondition(format!(
            "no repository for plane project {project}: set ORCH_PLANE_DEFAULT_REPO or \
             ORCH_PLANE_PROJECT_REPOS"
        )));
    };
    let (item, created) = engine
        .create_work_item(NewWorkItem {
            tracker_issue_id: issue.id.clone(),
            tracker_project_id: project.to_owned(),
            tracker_sequence_id: issue.sequence_id,
            title: issue.name.clone(),
            description: issue.description.clone(),
            repo: repo.to_owned(),
            ..NewWorkItem::default()
        })
        .await?;
    if created {
        tracing::info!(work_item = %item.key, tracker_issue_id = %issue.id, "reconciliation created a work item its webhook never brought");
    }
    Ok(created)
}

/// Re-reads the PR of `item`; a merged one is applied as `OnPrMerged` would. Returns
/// whether the item moved.
async fn lost_merge(engine: &Engine, item: &WorkItemRow) -> Result<bool, EngineError> {
    let repo = RepoName::parse(&item.repo)
        .map_err(|e| EngineError::Internal(format!("stored repo: {e}")))?;
    let pr = engine
        .forge
        .find_pr(&repo, &item.branch, &engine.config.base_branch)
        .await
        .map_err(|e| EngineError::Unavailable(format!("find the PR of {}: {e}", item.key)))?;
    if !pr.is_some_and(|pr| pr.merged) {
        return Ok(false);
    }
    let a = engine
        .advance_stage(&item.key, Trigger::PrMerged, None, None)
        .await?;
    let moved = a.outcome != Outcome::Unchanged;
    if moved {
        tracing::info!(work_item = %item.key, outcome = ?a.outcome, reason = %a.reason, "reconciliation applied a merge its webhook never brought");
    }
    Ok(moved)
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use orchestrator_forge::{ForgeKind, MockForge, PrState, PullRequest};
    use orchestrator_kit::{Env, ServiceName, db};
    use orchestrator_testkit::{TestStorage, on_both_backends};
    use orchestrator_tracker::{Label, MockTracker, State, TrackerKind};

    use super::*;
    use crate::peers::MockPeers;
    use crate::{StageEngineConfig, StageEngineService};

    const PROJECT: &str = "proj-1";

    /// What the mocks answer; tests change it between passes.
    #[derive(Default)]
    struct World {
        issues: Vec<Issue>,
        /// Branches whose PR is merged.
        merged: Vec<String>,
    }

    fn issue(id: &str, seq: u64, group: &str, label: &str) -> Issue {
        Issue {
            id: id.into(),
            project_id: PROJECT.into(),
            sequence_id: seq,
            name: format!("issue {seq}"),
            description: "<p>do it</p>".into(),
            state: Some(State {
                id: format!("state-{group}"),
                name: group.to_uppercase(),
                group: group.into(),
            }),
            labels: vec![Label {
                id: format!("label-{label}"),
                name: label.into(),
            }],
        }
    }

    async fn engine(storage: &TestStorage, world: Arc<Mutex<World>>) -> Engine {
        orchestrator_kit::telemetry::init_for_tests();
        let db = db::open(
            ServiceName::StageEngine,
            &storage.location,
            &crate::MIGRATOR,
        )
        .await
        .expect("db");
        let mut t = MockTracker::new();
        t.expect_kind().return_const(TrackerKind::Plane);
        // The agent's task reads the issue's comments when an item is created.
        t.expect_list_comments().returning(|_| Ok(Vec::new()));
        t.expect_project_identifier()
            .returning(|_| Ok("PROJ".to_owned()));
        let w = world.clone();
        t.expect_list_issues().returning(move |project| {
            assert_eq!(project, PROJECT);
            Ok(w.lock().expect("lock").issues.clone())
        });
        let w = world.clone();
        t.expect_get_issue().returning(move |r| {
            let w = w.lock().expect("lock");
            Ok(w.issues.iter().find(|i| i.id == r.issue_id).cloned())
        });
        let mut f = MockForge::new();
        f.expect_kind().return_const(ForgeKind::Local);
        f.expect_repo_exists().returning(|_| Ok(true));
        f.expect_branch_exists().returning(|_, _| Ok(true));
        f.expect_file_url()
            .returning(|_, b, p| format!("http://forge/{b}/{p}"));
        f.expect_pr_url()
            .returning(|r, n| format!("http://forge/{r}/pulls/{n}"));
        let w = world;
        f.expect_find_pr().returning(move |_, head, base| {
            let merged = w.lock().expect("lock").merged.iter().any(|b| b == head);
            Ok(Some(PullRequest {
                number: 1,
                url: "http://forge/pulls/1".into(),
                head_branch: head.into(),
                head_sha: "abc".into(),
                base_branch: base.into(),
                state: if merged {
                    PrState::Closed
                } else {
                    PrState::Open
                },
                merged,
                merge_sha: merged.then(|| "def".to_owned()),
            }))
        });
        let config = StageEngineConfig::from_env(&Env::from_pairs([
            ("ORCH_TRACKER", "plane"),
            ("PLANE_BASE_URL", "http://127.0.0.1:9"),
            ("PLANE_WORKSPACE_SLUG", "acme"),
            ("PLANE_API_TOKEN", "t"),
            ("PLANE_PROJECT_ID", PROJECT),
            ("ORCH_PLANE_DEFAULT_REPO", "acme/app"),
            ("ORCH_PLANE_TRIGGER_STATE", "Todo"),
        ]))
        .expect("config");
        let svc = StageEngineService::from_parts(
            db,
            config,
            Arc::new(f),
            Arc::new(MockPeers::new()),
            Some(Arc::new(t)),
        )
        .expect("service");
        svc.engine().clone()
    }

    async fn set_stage(engine: &Engine, key: &str, stage: Stage) {
        sqlx::query("UPDATE work_items SET stage = $1 WHERE key = $2")
            .bind(stage.as_str())
            .bind(key)
            .execute(&engine.db.pool)
            .await
            .expect("update");
    }

    async fn item(engine: &Engine, key: &str) -> WorkItemRow {
        store::get(&engine.db, key)
            .await
            .expect("get")
            .expect("exists")
    }

    async fn a_triggered_issue_without_a_work_item_gets_one_once(storage: TestStorage) {
        let world = Arc::new(Mutex::new(World::default()));
        let mut todo = issue("i-2", 2, "unstarted", "bug");
        todo.state = Some(State {
            id: "state-todo".into(),
            name: "Todo".into(),
            group: "unstarted".into(),
        });
        world.lock().expect("lock").issues = vec![
            // the trigger label, the trigger state, neither
            issue("i-1", 1, "backlog", "orchestrator"),
            todo,
            issue("i-3", 3, "backlog", "bug"),
        ];
        let e = engine(&storage, world.clone()).await;
        let p = pass(&e).await.expect("pass");
        assert_eq!((p.created, p.errors), (2, 0), "{p:?}");
        let one = item(&e, "PROJ-1").await;
        assert_eq!(
            (one.tracker_issue_id.as_str(), one.repo.as_str(), one.stage),
            ("i-1", "acme/app", Stage::Analysis)
        );
        assert_eq!(item(&e, "PROJ-2").await.title, "issue 2");
        assert!(store::get(&e.db, "PROJ-3").await.expect("get").is_none());
        // A second pass, and the webhook arriving late, create nothing more.
        let p = pass(&e).await.expect("pass");
        assert_eq!((p.created, p.errors), (0, 0), "{p:?}");
    }

    async fn deleted_or_closed_issues_cancel_their_items(storage: TestStorage) {
        let world = Arc::new(Mutex::new(World::default()));
        world.lock().expect("lock").issues = vec![
            issue("i-1", 1, "backlog", "orchestrator"),
            issue("i-2", 2, "backlog", "orchestrator"),
            issue("i-3", 3, "backlog", "orchestrator"),
        ];
        let e = engine(&storage, world.clone()).await;
        assert_eq!(pass(&e).await.expect("pass").created, 3);
        {
            let mut w = world.lock().expect("lock");
            w.issues.retain(|i| i.id != "i-1");
            w.issues[0].state = Some(State {
                id: "state-x".into(),
                name: "Cancelled".into(),
                group: "cancelled".into(),
            });
        }
        let p = pass(&e).await.expect("pass");
        let mut to_cancel = p.to_cancel.clone();
        to_cancel.sort();
        assert_eq!(
            to_cancel,
            [
                (
                    "PROJ-1".to_owned(),
                    "its Plane issue was deleted".to_owned()
                ),
                (
                    "PROJ-2".to_owned(),
                    "its Plane issue was moved to Cancelled".to_owned()
                ),
            ],
            "{p:?}"
        );
        assert_eq!((p.created, p.cancelled, p.errors), (0, 2, 0), "{p:?}");
        for key in ["PROJ-1", "PROJ-2"] {
            let item = e.get_item(key).await.expect("item");
            assert_eq!(item.status, Status::Cancelled, "{key}");
        }
        assert_eq!(
            e.get_item("PROJ-3").await.expect("item").status,
            Status::Active
        );
        // Cancelled items are no longer open: the next pass hands nothing to cancel.
        let p = pass(&e).await.expect("pass");
        assert!(p.to_cancel.is_empty() && p.cancelled == 0, "{p:?}");
    }

    async fn a_merge_nobody_reported_is_applied_as_the_webhook_would(storage: TestStorage) {
        let world = Arc::new(Mutex::new(World::default()));
        world.lock().expect("lock").issues = vec![
            issue("i-1", 1, "backlog", "orchestrator"),
            issue("i-2", 2, "backlog", "orchestrator"),
            issue("i-3", 3, "backlog", "orchestrator"),
        ];
        let e = engine(&storage, world.clone()).await;
        assert_eq!(pass(&e).await.expect("pass").created, 3);
        set_stage(&e, "PROJ-1", Stage::Review).await;
        set_stage(&e, "PROJ-2", Stage::Deploy).await;
        // PROJ-3 is still in analysis: its PR is not looked at.
        world.lock().expect("lock").merged = vec![
            "orch/PROJ-1".into(),
            "orch/PROJ-2".into(),
            "orch/PROJ-3".into(),
        ];
        let p = pass(&e).await.expect("pass");
        assert_eq!((p.merges_applied, p.errors), (1, 0), "{p:?}");
        let one = item(&e, "PROJ-1").await;
        assert_eq!((one.stage, one.status), (Stage::Done, Status::Done));
        // BUG-8: a merge at deploy does not complete the item.
        let two = item(&e, "PROJ-2").await;
        assert_eq!((two.stage, two.status), (Stage::Deploy, Status::Active));
        assert_eq!(item(&e, "PROJ-3").await.stage, Stage::Analysis);
        // Done is done: the next pass applies nothing again.
        let p = pass(&e).await.expect("pass");
        assert_eq!((p.merges_applied, p.errors), (0, 0), "{p:?}");
    }

    on_both_backends!(
        a_triggered_issue_without_a_work_item_gets_one_once,
        deleted_or_closed_issues_cancel_their_items,
        a_merge_nobody_reported_is_applied_as_the_webhook_would,
    );
}
