//! Validation at the door: a work item is created only for a repository the forge has and
//! a base branch (`ORCH_BASE_BRANCH`) that exists in it. Otherwise its first job would fail
//! at checkout and strand the item; the caller learns it at once instead (NOT_FOUND naming
//! the culprit), and nothing is stored. A forge that cannot answer is UNAVAILABLE, so that
//! the gateway's inbox retries rather than creating an item nobody checked.

use orchestrator_forge::{ForgeError, RepoName};

use crate::engine::Engine;
use crate::error::EngineError;

impl Engine {
    /// Checks that `repo` and the base branch exist on the forge.
    pub(crate) async fn check_repo_and_base(&self, repo: &RepoName) -> Result<(), EngineError> {
        let base = self.config.base_branch.as_str();
        let forge = self.forge.kind();
        let asked = |what: String| {
            move |e: ForgeError| {
                if e.is_transient() {
                    EngineError::Unavailable(format!("the {forge} forge cannot tell {what}: {e}"))
                } else {
                    EngineError::Precondition(format!(
                        "the {forge} forge refused to tell {what}: {e}"
                    ))
                }
            }
        };
        if !self
            .forge
            .repo_exists(repo)
            .await
            .map_err(asked(format!("whether repository {repo} exists")))?
        {
            return Err(EngineError::NotFound(format!(
                "repository {repo} does not exist on the {forge} forge"
            )));
        }
        if !self
            .forge
            .branch_exists(repo, base)
            .await
            .map_err(asked(format!("whether {repo} has branch {base}")))?
        {
            return Err(EngineError::NotFound(format!(
                "base branch {base} (ORCH_BASE_BRANCH) does not exist in repository {repo}"
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use orchestrator_forge::{ForgeError, ForgeKind, MockForge};
    use orchestrator_kit::{Env, ServiceName, db};
    use orchestrator_proto::stage_engine::v1::CreateWorkItemRequest;
    use orchestrator_proto::stage_engine::v1::stage_engine_server::StageEngine;
    use orchestrator_testkit::{TestStorage, on_both_backends};
    use tonic::{Code, Request};

    use crate::peers::MockPeers;
    use crate::store::{self, ListFilter};
    use crate::{StageEngineConfig, StageEngineService};

    /// What the mock forge answers: which repos exist, which branches they have, or down.
    #[derive(Clone, Copy)]
    enum Forge {
        Has(&'static str, &'static str),
        Down,
    }

    async fn service(storage: &TestStorage, answers: Forge) -> StageEngineService {
        orchestrator_kit::telemetry::init_for_tests();
        let db = db::open(
            ServiceName::StageEngine,
            &storage.location,
            &crate::MIGRATOR,
        )
        .await
        .expect("db");
        let mut f = MockForge::new();
        f.expect_kind().return_const(ForgeKind::Gitea);
        let down = || Err(ForgeError::Unavailable("cannot connect: refused".into()));
        f.expect_repo_exists().returning(move |r| match answers {
            Forge::Has(repo, _) => Ok(r.to_string() == repo),
            Forge::Down => down(),
        });
        f.expect_branch_exists()
            .returning(move |r, b| match answers {
                Forge::Has(repo, branch) => Ok(r.to_string() == repo && b == branch),
                Forge::Down => down(),
            });
        let config = StageEngineConfig::from_env(&Env::default()).expect("config");
        StageEngineService::from_parts(db, config, Arc::new(f), Arc::new(MockPeers::new()), None)
            .expect("service")
    }

    fn request(repo: &str) -> Request<CreateWorkItemRequest> {
        Request::new(CreateWorkItemRequest {
            tracker_issue_id: "issue-1".into(),
            key: "ORCH-1".into(),
            title: "One".into(),
            repo: repo.into(),
            ..CreateWorkItemRequest::default()
        })
    }

    async fn stored(svc: &StageEngineService) -> usize {
        let all = ListFilter {
            limit: 100,
            ..ListFilter::default()
        };
        let items = store::list(&svc.engine().db, &all).await.expect("list");
        let outbox = crate::outbox::list(&svc.engine().db, "", "", 100)
            .await
            .expect("outbox");
        items.len() + outbox.len()
    }

    async fn a_missing_repo_or_base_is_not_found_and_nothing_is_stored(storage: TestStorage) {
        let svc = service(&storage, Forge::Has("acme/app", "master")).await;
        let e = svc
            .create_work_item(request("qa/nosuch"))
            .await
            .expect_err("no such repo");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(e.message().contains("qa/nosuch"), "{}", e.message());
        // The repository exists, but its only branch is `master` and the base is `main`.
        let e = svc
            .create_work_item(request("acme/app"))
            .await
            .expect_err("no base branch");
        assert_eq!(e.code(), Code::NotFound, "{e:?}");
        assert!(
            e.message().contains("base branch main") && e.message().contains("acme/app"),
            "{}",
            e.message()
        );
        assert_eq!(stored(&svc).await, 0, "nothing created");

        let svc = service(&storage, Forge::Has("acme/app", "main")).await;
        let r = svc
            .create_work_item(request("acme/app"))
            .await
            .expect("created")
            .into_inner();
        assert!(r.created);
    }

    async fn a_forge_that_is_down_is_unavailable_never_created(storage: TestStorage) {
        let svc = service(&storage, Forge::Down).await;
        let e = svc
            .create_work_item(request("acme/app"))
            .await
            .expect_err("forge down");
        assert_eq!(e.code(), Code::Unavailable, "{e:?}");
        assert!(e.message().contains("acme/app"), "{}", e.message());
        assert_eq!(stored(&svc).await, 0, "nothing created");
    }

    on_both_backends!(
        a_missing_repo_or_base_is_not_found_and_nothing_is_stored,
        a_forge_that_is_down_is_unavailable_never_created,
    );
}
