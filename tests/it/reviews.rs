//! PR reviews by people (issue #18), through the whole stack in this process over real
//! gRPC: the fake Gitea holds the repository, the PR the launcher opens and the reviews a
//! person submits; its signed `pull_request_review` webhooks go through the gateway's inbox
//! to stage-engine, which reads the review and its line comments back through the forge
//! client. The agent is the scripted agent, wrapped by a script that keeps every prompt it
//! was given (what the agent received) and holds the reviewer's first run until the test
//! has reviewed. On SQLite and on PostgreSQL.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrator_fakes::Hook;
use orchestrator_fakes::gitea::FakeGitea;
use orchestrator_forge::ReviewState;
use orchestrator_kit::ServiceName;
use orchestrator_proto::launcher::v1::{JobStatus, ListJobsRequest};
use orchestrator_proto::stage_engine::v1::{
    AdvanceOutcome, ApproveRequest, CreateWorkItemRequest, GetWorkItemRequest,
    ListTransitionsRequest, OnPrReviewRequest, Transition, WorkItem,
};
use orchestrator_testkit::{TestStorage, on_both_backends};

use crate::common::{Stack, start};

pub const REPO: &str = "acme/app";
pub const KEY: &str = "REV-1";
const GITEA_TOKEN: &str = "gitea-token-orchestrator";
const GITEA_SECRET: &str = "gitea-webhook-secret-reviews";
/// How long one step may take on a loaded machine.
const STEP: Duration = Duration::from_secs(120);

const REVIEW_TEXT: &str = "Please handle the empty name: greet(\"\") prints \"Hello, !\".";
const LINE_COMMENT: &str = "An empty name falls through here.";

pub struct World {
    pub stack: Stack,
    pub gitea: FakeGitea,
    root: PathBuf,
    _dir: tempfile::TempDir,
}

fn scripted_agent() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/agents/scripted-agent.py")
}

/// The wrapper: keeps the prompt as `prompts/<n>-<agent>.md`, holds a reviewer while
/// `hold-reviewer` exists, then runs the scripted agent.
fn agent_script(root: &Path) -> String {
    let r = root.display();
    let script = root.join("agent.sh");
    std::fs::create_dir_all(root.join("prompts")).expect("prompts dir");
    std::fs::write(
        &script,
        format!(
            r#"n=$(ls "{r}/prompts" | wc -l)
cp "$ORCH_PROMPT_FILE" "{r}/prompts/$(printf %03d "$n")-$ORCH_AGENT.md"
if [ "$ORCH_AGENT" = reviewer ]; then
  while [ -e "{r}/hold-reviewer" ]; do sleep 0.1; done
fi
exec python3 {agent} "$@"
"#,
            agent = scripted_agent().display()
        ),
    )
    .expect("script");
    format!("sh {}", script.display())
}

async fn setup(storage: TestStorage) -> World {
    setup_with(storage, true, &[]).await
}

/// The stack and the fake Gitea; `hold` holds the reviewer's runs; `extra` variables.
pub async fn setup_with(storage: TestStorage, hold: bool, extra: &[(&str, &str)]) -> World {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path().to_path_buf();
    let gitea = FakeGitea::start(&root.join("gitea")).await;
    gitea.add_user("acme", None);
    gitea.add_user("orchestrator", Some(GITEA_TOKEN));
    gitea.add_user("ada", Some("gitea-token-ada"));
    gitea.add_user("ci-bot", Some("gitea-token-ci-bot"));
    gitea.create_repo(REPO).await;
    gitea
        .commit(REPO, "main", &[("README.md", "# app\n")], "initial")
        .await;
    let agents = root.join("agents");
    std::fs::create_dir_all(&agents).expect("agents");
    for role in orchestrator_tracker::ROLES {
        std::fs::write(
            agents.join(format!("{role}.md")),
            format!("You are the {role}.\n"),
        )
        .expect("prompt");
    }
    if hold {
        std::fs::write(root.join("hold-reviewer"), "").expect("hold");
    }
    let s = |p: &Path| p.display().to_string();
    let env: Vec<(String, String)> = [
        ("GITEA_BASE_URL", gitea.url.clone()),
        ("GITEA_TOKEN", GITEA_TOKEN.into()),
        ("GITEA_WEBHOOK_SECRET", GITEA_SECRET.into()),
        // The Gitea account of a bot: its reviews never send work back.
        ("ORCH_BOT_AUTHORS", "ci-bot".into()),
        ("ORCH_AGENT_COMMAND", agent_script(&root)),
        // The wrapper keeps each prompt under the test's root, outside its checkout, which
        // the sandbox forbids (launcher/tests/sandbox.rs tests the sandbox itself).
        ("ORCH_AGENT_SANDBOX", "off".into()),
        ("ORCH_AGENTS_DIR", s(&agents)),
        ("ORCH_WORKDIR", s(&root.join("work"))),
        ("ORCH_DATA_DIR", s(&root.join("data"))),
        ("ORCH_OUTBOX_POLL_MS", "50".into()),
        ("ORCH_LAUNCHER_POLL_MS", "100".into()),
        ("ORCH_GATEWAY_DISPATCH_POLL_MS", "50".into()),
        ("ORCH_ARM_POST_DEPLOY", "false".into()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .chain(
        extra
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    )
    .collect();
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stack = start(storage, &refs).await;
    gitea.set_webhook(Some(Hook {
        url: format!("{}/webhooks/gitea", stack.config.url(ServiceName::Gateway)),
        secret: Some(GITEA_SECRET.into()),
    }));
    World {
        stack,
        gitea,
        root,
        _dir: dir,
    }
}

impl World {
    pub async fn item(&self) -> WorkItem {
        self.stack
            .clients
            .stage_engine
            .clone()
            .get_work_item(GetWorkItemRequest { key: KEY.into() })
            .await
            .expect("get")
            .into_inner()
    }

    pub async fn transitions(&self) -> Vec<Transition> {
        self.stack
            .clients
            .stage_engine
            .clone()
            .list_transitions(ListTransitionsRequest {
                work_item: KEY.into(),
            })
            .await
            .expect("transitions")
            .into_inner()
            .transitions
    }

    /// The prompts the agents were given, in order: (agent, text).
    pub fn prompts(&self) -> Vec<(String, String)> {
        let mut names: Vec<String> = std::fs::read_dir(self.root.join("prompts"))
            .expect("prompts")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|n| {
                let agent = n
                    .trim_end_matches(".md")
                    .split_once('-')
                    .map(|(_, a)| a.to_owned())
                    .unwrap_or_default();
                let text =
                    std::fs::read_to_string(self.root.join("prompts").join(&n)).expect("prompt");
                (agent, text)
            })
            .collect()
    }

    pub async fn wait<T, F: std::future::Future<Output = Option<T>>>(
        &self,
        what: &str,
        mut f: impl FnMut() -> F,
    ) -> T {
        let deadline = Instant::now() + STEP;
        loop {
            if let Some(v) = f().await {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for {what}; item {:#?}; transitions {:#?}",
                self.item().await,
                self.transitions().await
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// The stage-engine's approvals rows of the item: (comment id, author, accepted).
    pub async fn approvals(&self) -> Vec<(String, String, i64)> {
        let db = orchestrator_kit::db::open(
            ServiceName::StageEngine,
            &self.stack.storage_location(),
            &stage_engine::MIGRATOR,
        )
        .await
        .expect("stage-engine's database");
        sqlx::query_as(
            "SELECT comment_id, author, accepted FROM approvals WHERE work_item = $1 ORDER BY at_ms",
        )
        .bind(KEY)
        .fetch_all(&db.pool)
        .await
        .expect("approvals")
    }
}

impl World {
    /// Creates the work item and approves it at the human gate as a person.
    pub async fn create_and_approve(&self) {
        let se = self.stack.clients.stage_engine.clone();
        se.clone()
            .create_work_item(CreateWorkItemRequest {
                tracker_issue_id: KEY.into(),
                key: KEY.into(),
                title: "Greet by name".into(),
                description: "Say hello to the name given.".into(),
                repo: REPO.into(),
                ..Default::default()
            })
            .await
            .expect("create");
        self.wait("the human gate", || async {
            (self.item().await.status == "awaiting_approval").then_some(())
        })
        .await;
        se.clone()
            .approve(ApproveRequest {
                work_item: KEY.into(),
                author: "ada".into(),
                comment_id: "approve-1".into(),
                ..Default::default()
            })
            .await
            .expect("approve");
    }

    /// The PR the launcher opened.
    pub fn pr_number(&self) -> u64 {
        self.gitea
            .with(|d| d.pulls.keys().find(|(r, _)| r == REPO).map(|(_, n)| *n))
            .expect("the launcher opened a PR")
    }
}

/// A human's changes-requested review at review rolls the item back to development, with
/// the review's text and line comment in the developer's task; a bot's review before it
/// changes nothing; a repeat changes nothing; a human's approval is recorded.
async fn a_humans_changes_requested_review_sends_the_work_back_with_the_review(
    storage: TestStorage,
) {
    let w = setup(storage).await;
    let se = w.stack.clients.stage_engine.clone();
    w.create_and_approve().await;
    // The reviewer runs (held): the item is at review with its PR open.
    w.wait("the reviewer's run", || async {
        w.prompts()
            .iter()
            .any(|(a, _)| a == "reviewer")
            .then_some(())
    })
    .await;
    let item = w.item().await;
    assert_eq!(
        (item.stage.as_str(), item.status.as_str()),
        ("review", "active")
    );
    let pr = w.pr_number();
    let transitions_before = w.transitions().await.len();
    // A bot's changes-requested: accepted by the gateway, changes nothing.
    let (_, delivery) = w
        .gitea
        .submit_review(
            REPO,
            pr,
            "ci-bot",
            ReviewState::ChangesRequested,
            "lint failed",
            &[],
        )
        .await;
    let delivery = delivery.expect("a webhook");
    assert_eq!(delivery.status, Some(202), "{delivery:?}");
    w.wait("the bot's review to be dispatched", || async {
        let outbox = w.gateway_inbox_reasons().await;
        outbox.iter().any(|r| r.contains("by ci-bot")).then_some(())
    })
    .await;
    let item = w.item().await;
    assert_eq!((item.stage.as_str(), item.rollback_count), ("review", 0));
    assert_eq!(w.transitions().await.len(), transitions_before);

    // A human's changes-requested with a line comment: back to development.
    let (review_id, _) = w
        .gitea
        .submit_review(
            REPO,
            pr,
            "ada",
            ReviewState::ChangesRequested,
            REVIEW_TEXT,
            &[("scripted/rev_1.py", 2, LINE_COMMENT)],
        )
        .await;
    let developer_task = w
        .wait("the developer's second run", || async {
            w.prompts()
                .into_iter()
                .filter(|(a, _)| a == "developer")
                .nth(1)
                .map(|(_, t)| t)
        })
        .await;
    assert!(
        developer_task.contains("a human's review of the PR at review sent the work back: ada"),
        "{developer_task}"
    );
    assert!(
        developer_task.contains(&format!("> {REVIEW_TEXT}")),
        "{developer_task}"
    );
    assert!(
        developer_task.contains(&format!("> scripted/rev_1.py line 2: {LINE_COMMENT}")),
        "{developer_task}"
    );
    assert!(!developer_task.contains("lint failed"), "{developer_task}");
    let item = w.item().await;
    assert_eq!(item.rollback_count, 1, "{item:?}");
    let back = w
        .transitions()
        .await
        .into_iter()
        .find(|t| t.from_stage == "review" && t.to_stage == "development")
        .expect("the rollback's transition");
    assert!(back.cause.contains("ada requested changes"), "{back:?}");
    // The held reviewer's job was cancelled: it cannot push over the developer.
    w.wait("the reviewer's job cancelled", || async {
        let jobs = w
            .stack
            .clients
            .launcher
            .clone()
            .list_jobs(ListJobsRequest {
                work_item: KEY.into(),
                limit: 100,
                ..ListJobsRequest::default()
            })
            .await
            .expect("jobs")
            .into_inner()
            .jobs;
        jobs.iter()
            .any(|j| j.agent == "reviewer" && j.status() == JobStatus::Cancelled)
            .then_some(())
    })
    .await;

    // The same review again (a redelivery reaching stage-engine): nothing more.
    let again = se
        .clone()
        .on_pr_review(OnPrReviewRequest {
            repo: REPO.into(),
            branch: item.branch.clone(),
            pr_number: pr,
            reviewer: "ada".into(),
            state: "changes_requested".into(),
            body: REVIEW_TEXT.into(),
        })
        .await
        .expect("again")
        .into_inner();
    assert_eq!(again.outcome(), AdvanceOutcome::Unchanged, "{again:?}");
    assert_eq!(w.item().await.rollback_count, 1);
    let rollbacks = w
        .transitions()
        .await
        .into_iter()
        .filter(|t| t.cause.contains("requested changes"))
        .count();
    assert_eq!(rollbacks, 1);

    // A human's approval is recorded on the item, by its review id.
    let (approval_id, _) = w
        .gitea
        .submit_review(REPO, pr, "ada", ReviewState::Approved, "Fine now.", &[])
        .await;
    let approvals = w
        .wait("the approval recorded", || async {
            let a = w.approvals().await;
            a.iter()
                .any(|(id, _, _)| *id == format!("pr-review-{approval_id}"))
                .then_some(a)
        })
        .await;
    assert!(
        approvals.contains(&(format!("pr-review-{review_id}"), "ada".into(), 1)),
        "{approvals:?}"
    );
    assert!(
        approvals.contains(&(format!("pr-review-{approval_id}"), "ada".into(), 1)),
        "{approvals:?}"
    );
    w.gitea.check();
}

impl World {
    /// The reasons the gateway's inbox recorded for its deliveries.
    pub async fn gateway_inbox_reasons(&self) -> Vec<String> {
        let db = orchestrator_kit::db::open(
            ServiceName::Gateway,
            &self.stack.storage_location(),
            &gateway::MIGRATOR,
        )
        .await
        .expect("gateway's database");
        sqlx::query_scalar("SELECT reason FROM webhook_inbox")
            .fetch_all(&db.pool)
            .await
            .expect("inbox")
    }
}

on_both_backends!(a_humans_changes_requested_review_sends_the_work_back_with_the_review);
