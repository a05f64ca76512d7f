//! A repository without a deploy target is never deployed (issue #16): with
//! `ORCH_DEPLOY_TARGETS_JSON` unset, the work item walks to `deploy-staging`, the deployer's
//! job fails for good (`no_deploy_target`) and the item parks blocked with "no deploy
//! target for <repo>" — no fake SUCCESS, and no rollback to development, which a missing
//! target could not fix. The whole stack in this process, the scripted agent, a fake
//! Gitea. On SQLite and on PostgreSQL.

use orchestrator_proto::launcher::v1::{JobStatus, ListJobsRequest};
use orchestrator_testkit::{TestStorage, on_both_backends};

use crate::reviews::{KEY, setup_with};

async fn without_a_target_the_item_parks_blocked_at_deploy_staging(storage: TestStorage) {
    // An empty value counts as unset: the shared harness's trivial target is gone.
    let w = setup_with(storage, false, &[("ORCH_DEPLOY_TARGETS_JSON", "")]).await;
    w.create_and_approve().await;
    let item = w
        .wait("the item to park blocked", || async {
            let i = w.item().await;
            (i.status == "blocked").then_some(i)
        })
        .await;
    assert_eq!(item.stage, "deploy-staging", "{item:#?}");
    assert!(
        item.status_reason.contains("no deploy target for acme/app")
            && item
                .status_reason
                .contains("ORCH_DEPLOY_TARGETS_JSON is not set"),
        "{item:#?}"
    );
    assert_eq!(item.rollback_count, 0, "{item:#?}");
    let jobs = w
        .stack
        .clients
        .launcher
        .clone()
        .list_jobs(ListJobsRequest {
            work_item: KEY.into(),
            limit: 100,
            ..Default::default()
        })
        .await
        .expect("jobs")
        .into_inner()
        .jobs;
    let deployer: Vec<_> = jobs.iter().filter(|j| j.agent == "deployer").collect();
    assert_eq!(deployer.len(), 1, "one deployer run, not a loop: {jobs:#?}");
    assert_eq!(
        deployer[0].status(),
        JobStatus::Failed,
        "{:#?}",
        deployer[0]
    );
    assert_eq!(
        deployer[0].outcome, "no_deploy_target",
        "{:#?}",
        deployer[0]
    );
}

on_both_backends!(without_a_target_the_item_parks_blocked_at_deploy_staging);
