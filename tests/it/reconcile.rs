//! Reconciliation with the outside (#20): what a lost webhook left is repaired by
//! stage-engine's periodic pass, against the fake Plane and the fake Gitea. The stack runs
//! in this process over real gRPC, on SQLite and on PostgreSQL.

use std::time::{Duration, Instant};

use orchestrator_fakes::Hook;
use orchestrator_fakes::gitea::FakeGitea;
use orchestrator_fakes::plane::{FakePlane, NewIssue};
use orchestrator_kit::ServiceName;
use orchestrator_proto::stage_engine::v1::{
    GetWorkItemRequest, ListTransitionsRequest, ListWorkItemsRequest, WorkItem,
};
use orchestrator_testkit::{TestStorage, on_both_backends};

use crate::common::{Stack, start};

const REPO: &str = "acme/app";
const SERVICE_TOKEN: &str = "plane_api_orchestrator";
const GITEA_TOKEN: &str = "gitea-token-orchestrator";
const PLANE_SECRET: &str = "plane_wh_reconcile0123456789";

struct World {
    stack: Stack,
    plane: FakePlane,
    gitea: FakeGitea,
    project_id: String,
    _dir: tempfile::TempDir,
}

/// A port nobody listens on: the gateway is down.
fn closed_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port()
}

async fn setup(storage: TestStorage) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let plane = FakePlane::start("acme").await;
    plane.add_user("orchestrator", Some(SERVICE_TOKEN));
    let mut env: Vec<(String, String)> = Vec::new();
    for role in orchestrator_tracker::ROLES {
        let token = format!("plane_bot_{role}");
        plane.add_user(&format!("orchestrator-{role}"), Some(&token));
        env.push((
            format!("PLANE_BOT_TOKEN_{}", role.to_ascii_uppercase()),
            token,
        ));
    }
    let project = plane.add_project("ORCH", "Orchestrator");
    let gitea = FakeGitea::start(&dir.path().join("gitea")).await;
    gitea.add_user("acme", None);
    gitea.add_user("orchestrator", Some(GITEA_TOKEN));
    gitea.add_user("ada", Some("gitea-token-ada"));
    gitea.create_repo(REPO).await;
    gitea
        .commit(REPO, "main", &[("README.md", "# app\n")], "initial")
        .await;
    for (k, v) in [
        ("ORCH_TRACKER", "plane".to_owned()),
        ("PLANE_BASE_URL", plane.url.clone()),
        ("PLANE_WORKSPACE_SLUG", "acme".into()),
        ("PLANE_API_TOKEN", SERVICE_TOKEN.into()),
        ("PLANE_PROJECT_ID", project.id.clone()),
        ("PLANE_WEBHOOK_SECRET", PLANE_SECRET.into()),
        ("ORCH_PLANE_DEFAULT_REPO", REPO.into()),
        ("GITEA_BASE_URL", gitea.url.clone()),
        ("GITEA_TOKEN", GITEA_TOKEN.into()),
        ("ORCH_RECONCILE_INTERVAL_S", "1".into()),
        ("ORCH_OUTBOX_POLL_MS", "100".into()),
        ("ORCH_GATEWAY_DISPATCH_POLL_MS", "50".into()),
        // No agent runs in this test: the analyst's job waits in the queue.
        ("ORCH_AGENT_COMMAND", "/nonexistent/agent".into()),
        ("ORCH_LAUNCHER_POLL_MS", "3600000".into()),
    ] {
        env.push((k.to_owned(), v));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stack = start(storage, &env).await;
    World {
        stack,
        plane,
        gitea,
        project_id: project.id,
        _dir: dir,
    }
}

impl World {
    async fn items(&self) -> Vec<WorkItem> {
        self.stack
            .clients
            .stage_engine
            .clone()
            .list_work_items(ListWorkItemsRequest {
                limit: 100,
                ..ListWorkItemsRequest::default()
            })
            .await
            .expect("list")
            .into_inner()
            .work_items
    }

    async fn item(&self, key: &str) -> WorkItem {
        self.stack
            .clients
            .stage_engine
            .clone()
            .get_work_item(GetWorkItemRequest { key: key.into() })
            .await
            .expect("get")
            .into_inner()
    }

    /// Polls `what` until it answers, for at most 30 s (a pass runs every second).
    async fn wait<T, F: std::future::Future<Output = Option<T>>>(
        &self,
        what: &str,
        mut f: impl FnMut() -> F,
    ) -> T {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// A Plane issue with the trigger label, created while the gateway is down (the delivery
/// fails to connect, and Plane gives up on it), becomes a work item at the next pass — once:
/// a later redelivery through the gateway, and further passes, add nothing.
async fn a_plane_delivery_made_while_the_gateway_is_down_still_becomes_a_work_item(
    storage: TestStorage,
) {
    let w = setup(storage).await;
    w.plane.set_webhook(Some(Hook {
        url: format!("http://127.0.0.1:{}/webhooks/plane", closed_port()),
        secret: Some(PLANE_SECRET.into()),
    }));
    let ada = w.plane.add_user("ada", None);
    let new = NewIssue {
        name: "Add a health endpoint".into(),
        description_html: "<p>GET /healthz answers 200.</p>".into(),
        state: String::new(),
        labels: vec!["orchestrator".into()],
    };
    let (issue, delivery) = w.plane.create_issue(&w.project_id, &new, &ada).await;
    let delivery = delivery.expect("a webhook was attempted");
    assert!(
        delivery.status.is_none(),
        "the gateway is down: {delivery:?}"
    );
    // An issue without the trigger is left alone.
    let plain = NewIssue {
        labels: vec![],
        name: "Not for the orchestrator".into(),
        ..new.clone()
    };
    w.plane.create_issue(&w.project_id, &plain, &ada).await;

    let items = w
        .wait("reconciliation to create the work item", || async {
            let items = w.items().await;
            (!items.is_empty()).then_some(items)
        })
        .await;
    assert_eq!(items.len(), 1, "{items:#?}");
    let item = &items[0];
    assert_eq!(
        (
            item.key.as_str(),
            item.tracker_issue_id.as_str(),
            item.repo.as_str(),
            item.title.as_str(),
            item.stage.as_str()
        ),
        (
            "ORCH-1",
            issue.id.as_str(),
            REPO,
            "Add a health endpoint",
            "analysis"
        )
    );

    // The gateway is back and Plane's delivery arrives after all: nothing new.
    let gateway = w.stack.config.listen[&ServiceName::Gateway].to_string();
    w.plane.set_webhook(Some(Hook {
        url: format!("http://{gateway}/webhooks/plane"),
        secret: Some(PLANE_SECRET.into()),
    }));
    let again = w.plane.redeliver(&delivery).await;
    assert_eq!(again.status, Some(202), "{again:?}");
    let settled = || async {
        let q: serde_json::Value = reqwest::get(format!("http://{gateway}/queue"))
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        (q["inbox"]["pending"] == 0).then_some(())
    };
    w.wait("the redelivery to be applied", settled).await;
    // Two more passes.
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    let items = w.items().await;
    assert_eq!(items.len(), 1, "{items:#?}");
    w.plane.check();
}

/// A PR merged on Gitea while its webhook is lost (no hook configured) is applied by the
/// next pass as `OnPrMerged` would: the item at review moves to done.
async fn a_pr_merged_without_a_webhook_is_applied(storage: TestStorage) {
    let w = setup(storage).await;
    let ada = w.plane.add_user("ada", None);
    let new = NewIssue {
        name: "Fix the login".into(),
        description_html: "<p>It fails.</p>".into(),
        state: String::new(),
        labels: vec!["orchestrator".into()],
    };
    w.plane.create_issue(&w.project_id, &new, &ada).await;
    w.wait("reconciliation to create the work item", || async {
        (!w.items().await.is_empty()).then_some(())
    })
    .await;
    let key = "ORCH-1";
    let branch = "orch/ORCH-1";
    // The walk from analysis to review is another test's (stage_engine.rs): here the item is
    // put at review directly in stage-engine's table, as if its agents had run.
    put_at_review(&w, key).await;
    w.gitea
        .commit(
            REPO,
            branch,
            &[("src/login.rs", "// fixed\n")],
            "fix the login",
        )
        .await;
    let pr: serde_json::Value = reqwest::Client::new()
        .post(format!("{}/api/v1/repos/{REPO}/pulls", w.gitea.url))
        .header("Authorization", format!("token {GITEA_TOKEN}"))
        .json(&serde_json::json!({"head": branch, "base": "main", "title": "ORCH-1"}))
        .send()
        .await
        .expect("create PR")
        .json()
        .await
        .expect("PR json");
    let number = pr["number"].as_u64().expect("PR number");
    let (status, delivery) = w.gitea.merge_as(REPO, number, "ada").await;
    assert_eq!(status, 200);
    assert!(
        delivery.is_none(),
        "no webhook is configured: the merge goes unreported"
    );

    let done = w
        .wait("reconciliation to apply the merge", || async {
            let item = w.item(key).await;
            (item.status == "done").then_some(item)
        })
        .await;
    assert_eq!(done.stage, "done");
    let transitions = w
        .stack
        .clients
        .stage_engine
        .clone()
        .list_transitions(ListTransitionsRequest {
            work_item: key.into(),
        })
        .await
        .expect("transitions")
        .into_inner()
        .transitions;
    let last = transitions.last().expect("a transition");
    assert!(
        last.from_stage == "review" && last.cause.contains("merged"),
        "{transitions:#?}"
    );
    w.gitea.check();
}

async fn put_at_review(w: &World, key: &str) {
    let db = orchestrator_kit::db::open(
        ServiceName::StageEngine,
        &w.stack.storage_location(),
        &stage_engine::MIGRATOR,
    )
    .await
    .expect("stage-engine's database");
    let done = sqlx::query("UPDATE work_items SET stage = 'review' WHERE key = $1")
        .bind(key)
        .execute(&db.pool)
        .await
        .expect("update");
    assert_eq!(done.rows_affected(), 1);
}

on_both_backends!(
    a_plane_delivery_made_while_the_gateway_is_down_still_becomes_a_work_item,
    a_pr_merged_without_a_webhook_is_applied,
);
