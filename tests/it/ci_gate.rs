//! CI gates review -> testing and the merge (issue #18), through the whole stack in this process: the fake Gitea
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
/// with the failing context in the developer's task; CI green lets it through. The same at
/// the merge (deploy -> done): pending holds it (nothing merged, no finalizer, no agent),
/// failure rolls back with the context in the task (CI's second red verdict: one
/// `ci_failed_twice` notification), success merges the PR at the head CI passed.
async fn ci_pending_holds_failure_rolls_back_success_merges(storage: TestStorage) {
    let (url, got) = crate::notify::receiver().await;
    let w = setup_with(
        storage,
        false,
        &[
            ("ORCH_CI_REQUIRED_REPOS", REPO),
            ("ORCH_CI_POLL_S", "3600"),
            ("ORCH_NOTIFY_WEBHOOK_URL", url.as_str()),
        ],
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

    // CI passes the developer's new head at review: the item walks on to deploy, where
    // the merge waits for CI in its turn.
    let mut green: Vec<String> = Vec::new();
    let deploy_head = w.pass_ci_until_a_wait_of("deployer", &mut green).await;
    assert_eq!(green.len(), 1, "{green:?}");
    assert_ne!(green[0], head);
    assert_ne!(
        deploy_head, green[0],
        "the deployer's run delivered its own head"
    );
    // Held at the merge: the deployer's verdict is in, nothing is merged, no finalizer (nor
    // any other agent) is launched.
    let item = w.item().await;
    assert_eq!(
        (item.stage.as_str(), item.status.as_str()),
        ("deploy", "active")
    );
    let pr = w.pr_number();
    let launched = w.prompts().len();
    w.gitea
        .set_status(
            REPO,
            &deploy_head,
            "ci-bot",
            ["ci/build", "pending", "running", CI_URL],
        )
        .await;
    w.wait("the pending status at deploy re-checked", || async {
        let (_, detail) = w.ci_wait().await?;
        detail.contains("ci/build").then_some(())
    })
    .await;
    assert!(!w.gitea.pr(REPO, pr).await.expect("the PR").merged);
    assert!(w.jobs_of("deploy-finalizer").await.is_empty());
    assert_eq!(
        w.prompts().len(),
        launched,
        "no agent launched while CI runs"
    );
    assert_eq!(w.item().await.stage, "deploy");

    // CI fails the head to merge: back to development, the failing context in the task;
    // that is CI's second red verdict on the item, told once.
    w.gitea
        .set_status(
            REPO,
            &deploy_head,
            "ci-bot",
            ["ci/build", "error", "the build crashed", CI_URL],
        )
        .await;
    let task = w
        .wait("the developer's third run", || async {
            w.prompts()
                .into_iter()
                .filter(|(a, _)| a == "developer")
                .nth(2)
                .map(|(_, t)| t)
        })
        .await;
    assert!(
        task.contains(&format!("ci/build (error): the build crashed <{CI_URL}>")),
        "{task}"
    );
    assert!(
        w.transitions()
            .await
            .iter()
            .any(|t| t.from_stage == "deploy"
                && t.to_stage == "development"
                && t.cause.contains("CI failed")),
        "{:#?}",
        w.transitions().await
    );
    assert!(!w.gitea.pr(REPO, pr).await.expect("the PR").merged);
    assert!(w.jobs_of("deploy-finalizer").await.is_empty());
    let told = w
        .wait("the ci_failed_twice notification", || async {
            let n = notified(&got, "ci_failed_twice");
            (!n.is_empty()).then_some(n)
        })
        .await;
    assert_eq!(told.len(), 1, "{told:?}");
    assert!(
        told[0]["text"]
            .as_str()
            .is_some_and(|t| t.contains("the build crashed")),
        "{told:?}"
    );

    // From now on CI passes every head it is asked about: the item walks to done and its PR
    // is merged, at the head CI passed at deploy.
    let merge_head = w.pass_ci_until_a_wait_of("deployer", &mut green).await;
    w.gitea
        .set_status(
            REPO,
            &merge_head,
            "ci-bot",
            ["ci/build", "success", "green", CI_URL],
        )
        .await;
    w.wait("done", || async {
        (w.item().await.status == "done").then_some(())
    })
    .await;
    let merged = w
        .wait("the merge", || async {
            w.gitea.pr(REPO, pr).await.filter(|p| p.merged)
        })
        .await;
    assert_eq!(merged.head_sha, merge_head);
    assert_eq!(w.jobs_of("deploy-finalizer").await.len(), 1);
    // Told once per item: the later green runs add no other.
    assert_eq!(notified(&got, "ci_failed_twice").len(), 1);
    w.gitea.check();
}

/// The notifications the receiver got of `event`.
fn notified(got: &crate::notify::Got, event: &str) -> Vec<serde_json::Value> {
    got.lock()
        .expect("lock")
        .iter()
        .filter_map(|(_, b)| serde_json::from_slice::<serde_json::Value>(b).ok())
        .filter(|v| v["event"] == event)
        .collect()
}

impl World {
    /// Walks the item on with CI green on every head a gate waits for, until the gate after
    /// `agent`'s run waits; returns the head that wait pins (what that run delivered).
    async fn pass_ci_until_a_wait_of(&self, agent: &str, green: &mut Vec<String>) -> String {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
        loop {
            if let Some((who, _)) = self.ci_wait().await {
                let head = self.waiting_head().await;
                if who == agent && !green.contains(&head) {
                    return head;
                }
                if !green.contains(&head) {
                    self.gitea
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
                "no wait of {agent}: {:#?} {:#?}",
                self.item().await,
                self.transitions().await
            );
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
    }

    /// The head the item's CI wait reads: the one its job delivered, else the branch's.
    async fn waiting_head(&self) -> String {
        let db = orchestrator_kit::db::open(
            orchestrator_kit::ServiceName::StageEngine,
            &self.stack.storage_location(),
            &stage_engine::MIGRATOR,
        )
        .await
        .expect("stage-engine's database");
        let pinned: Option<(String,)> =
            sqlx::query_as("SELECT head_sha FROM ci_waits WHERE work_item = $1")
                .bind(KEY)
                .fetch_optional(&db.pool)
                .await
                .expect("ci_waits");
        match pinned {
            Some((h,)) if !h.is_empty() => h,
            _ => self.head().await,
        }
    }
}

on_both_backends!(ci_pending_holds_failure_rolls_back_success_merges);
