//! CI gates review -> testing (issue #18), through the whole stack in this process: the fake Gitea
//! holds the PR and the commit statuses a CI system posts, and sends their `status`
//! webhooks through the gateway's inbox to stage-engine's `OnCommitStatus`. The poll
//! (`ORCH_CI_POLL_S`) is set to an hour, so every re-check here is the webhook's. On SQLite
//! and on PostgreSQL.

use orchestrator_proto::launcher::v1::{JobStatus, ListJobsRequest};
use orchestrator_testkit::{TestStorage, on_both_backends};

use crate::reviews::{KEY, REPO, World, setup_with};

const CI_URL: &str = "https://ci.example.com/acme/app/builds/12";

impl World {
    /// The item's waiting row, once its gate waits for CI: (agent, detail).
    async fn ci_wait(&self) -> Option<(String, String)> {
        let db = orchestrator_kit::db::open(
            orchestrator_kit::ServiceName::StageEngine,
            &self.stack.storage_location(),
            &stage_engine::MIGRATOR,
        )
        .await
        .expect("stage-engine's database");
        sqlx::query_as("SELECT agent, detail FROM ci_waits WHERE work_item = $1")
            .bind(KEY)
            .fetch_optional(&db.pool)
            .await
            .expect("ci_waits")
    }

    async fn jobs_of(&self, agent: &str) -> Vec<orchestrator_proto::launcher::v1::Job> {
        self.stack
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
            .jobs
            .into_iter()
            .filter(|j| j.agent == agent)
            .collect()
    }

    async fn head(&self) -> String {
        let branch = self.item().await.branch;
        self.gitea
            .branch_sha(REPO, &branch)
            .await
            .expect("the branch exists")
    }
}

/// CI pending holds the item at review with no agent launched; CI failing rolls it back
/// with the failing context in the developer's task; CI green lets it through, to the merge.
async fn ci_pending_holds_failure_rolls_back_success_merges(storage: TestStorage) {
    let w = setup_with(
        storage,
        false,
        &[("ORCH_CI_REQUIRED_REPOS", REPO), ("ORCH_CI_POLL_S", "3600")],
    )
    .await;
    w.create_and_approve().await;

    // The reviewer approved, CI has not reported: the item waits at review.
    let (agent, detail) = w
        .wait("the gate to wait for CI", || async { w.ci_wait().await })
        .await;
    assert_eq!(agent, "reviewer");
    assert!(detail.contains("CI has not reported"), "{detail}");
    let item = w.item().await;
    assert_eq!(
        (item.stage.as_str(), item.status.as_str()),
        ("review", "active")
    );
    assert!(
        w.jobs_of("reviewer")
            .await
            .iter()
            .all(|j| j.status() == JobStatus::Succeeded)
    );
    // Held with no launch: no tester job, no tester run.
    assert!(w.jobs_of("tester").await.is_empty());
    assert!(!w.prompts().iter().any(|(a, _)| a == "tester"));

    // A running context: still waiting, still nothing launched.
    let head = w.head().await;
    let d = w
        .gitea
        .set_status(
            REPO,
            &head,
            "ci-bot",
            ["ci/build", "pending", "running", CI_URL],
        )
        .await
        .expect("a webhook");
    assert_eq!(d.status, Some(202), "{d:?}");
    w.wait("the pending status re-checked", || async {
        w.gateway_inbox_reasons()
            .await
            .iter()
            .any(|r| r.contains("ci/build pending"))
            .then_some(())
    })
    .await;
    let (_, detail) = w.ci_wait().await.expect("still waiting");
    assert!(
        detail.contains("CI is running") && detail.contains("ci/build"),
        "{detail}"
    );
    assert!(w.jobs_of("tester").await.is_empty());

    // CI fails: back to development, the failing context in the developer's task.
    w.gitea
        .set_status(
            REPO,
            &head,
            "ci-bot",
            ["ci/build", "failure", "2 tests failed", CI_URL],
        )
        .await;
    let task = w
        .wait("the developer's second run", || async {
            w.prompts()
                .into_iter()
                .filter(|(a, _)| a == "developer")
                .nth(1)
                .map(|(_, t)| t)
        })
        .await;
    assert!(
        task.contains(&format!("ci/build (failure): 2 tests failed <{CI_URL}>")),
        "{task}"
    );
    assert_eq!(w.item().await.rollback_count, 1);
    assert!(
        w.transitions()
            .await
            .iter()
            .any(|t| t.from_stage == "review"
                && t.to_stage == "development"
                && t.cause.contains("CI failed")),
        "{:#?}",
        w.transitions().await
    );

    // From now on CI passes every head it is asked about: the item walks to done and its PR
    // is merged.
    let mut green: Vec<String> = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while w.item().await.status != "done" {
        if w.ci_wait().await.is_some() {
            let head = w.head().await;
            if !green.contains(&head) {
                w.gitea
                    .set_status(
                        REPO,
                        &head,
                        "ci-bot",
                        ["ci/build", "success", "green", CI_URL],
                    )
                    .await;
                green.push(head);
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not done: {:#?} {:#?}",
            w.item().await,
            w.transitions().await
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    // The review after the rollback waited for CI once more, on the developer's new head.
    assert_eq!(green.len(), 1, "{green:?}");
    assert_ne!(green[0], head);
    let pr = w.pr_number();
    w.wait("the merge", || async {
        w.gitea.pr(REPO, pr).await.filter(|p| p.merged).map(|_| ())
    })
    .await;
    w.gitea.check();
}

on_both_backends!(ci_pending_holds_failure_rolls_back_success_merges);
