//! CheckBranchMergeable, EnsurePr and FinalizeMerge over real git repositories on disk (the
//! local forge: bare repositories), through a bare mirror: no work tree is touched.

use std::path::Path;
use std::sync::Arc;

use merge_gate::{MergeGateService, TtlOnly};
use orchestrator_git::Git;
use orchestrator_proto::merge_gate::v1::merge_gate_server::MergeGate;
use orchestrator_proto::merge_gate::v1::{
    CheckBranchMergeableRequest, CheckBranchMergeableResponse, EnsurePrRequest,
    FinalizeMergeRequest, FinalizeOutcome, Mergeability,
};
use orchestrator_testkit::{TestStorage, on_both_backends};
use tonic::{Code, Request, Status};

use crate::fakes::{config, open_db};

const ID: [&str; 4] = ["-c", "user.name=t", "-c", "user.email=t@example.com"];

/// Clones `bare`, commits `files` on `branch` (created from `from` when new) and pushes.
async fn push(bare: &Path, branch: &str, from: &str, files: &[(&str, &str)]) -> String {
    let git = Git::new();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    git.ok(w, &["clone", "-q", &bare.display().to_string(), "."])
        .await
        .expect("clone");
    let exists = git
        .rev_parse(w, &format!("origin/{branch}"))
        .await
        .expect("rev-parse")
        .is_some();
    if exists {
        git.ok(w, &["checkout", "-q", branch])
            .await
            .expect("checkout");
    } else {
        git.ok(
            w,
            &["checkout", "-q", "-b", branch, &format!("origin/{from}")],
        )
        .await
        .expect("checkout -b");
    }
    for (path, text) in files {
        std::fs::write(w.join(path), text).expect("write");
        git.ok(w, &["add", path]).await.expect("add");
    }
    git.ok(
        w,
        &[ID[0], ID[1], ID[2], ID[3], "commit", "-q", "-m", "change"],
    )
    .await
    .expect("commit");
    git.ok(w, &["push", "-q", "origin", branch])
        .await
        .expect("push");
    git.rev_parse(w, "HEAD")
        .await
        .expect("rev-parse")
        .expect("head")
}

struct Repos {
    _dir: tempfile::TempDir,
    bare: std::path::PathBuf,
    mirrors: std::path::PathBuf,
    gate: MergeGateService,
}

async fn repos(storage: &TestStorage) -> Repos {
    let dir = tempfile::tempdir().expect("tempdir");
    let forge_dir = dir.path().join("forge");
    let mirrors = dir.path().join("mirrors");
    let forge_dir_s = forge_dir.display().to_string();
    let config = config(
        &mirrors,
        &[
            ("ORCH_FORGE", "local"),
            ("ORCH_FORGE_LOCAL_DIR", &forge_dir_s),
        ],
    );
    let local = orchestrator_forge::local::LocalForge::new(forge_dir.clone(), "main".into());
    let bare = local
        .init_repo(&orchestrator_forge::RepoName::parse("acme/app").expect("repo"))
        .await
        .expect("init");
    let forge = orchestrator_forge::build(&config.forge).expect("forge");
    let gate =
        MergeGateService::from_parts(open_db(storage).await, config, forge, Arc::new(TtlOnly));
    Repos {
        _dir: dir,
        bare,
        mirrors,
        gate,
    }
}

async fn check(
    gate: &MergeGateService,
    repo: &str,
    branch: &str,
) -> Result<CheckBranchMergeableResponse, Status> {
    MergeGate::check_branch_mergeable(
        gate,
        Request::new(CheckBranchMergeableRequest {
            repo: repo.into(),
            branch: branch.into(),
            base: String::new(),
        }),
    )
    .await
    .map(tonic::Response::into_inner)
}

async fn mergeability_on_real_repos(storage: TestStorage) {
    let r = repos(&storage).await;
    push(&r.bare, "main", "main", &[("a.txt", "one\n")]).await;
    let clean = push(&r.bare, "clean", "main", &[("b.txt", "b\n")]).await;
    push(&r.bare, "left", "main", &[("a.txt", "left\n")]).await;
    let main = push(&r.bare, "main", "main", &[("a.txt", "main\n")]).await;

    let c = check(&r.gate, "acme/app", "clean").await.expect("clean");
    assert_eq!(c.mergeability(), Mergeability::Mergeable, "{c:?}");
    assert!(c.conflicting_files.is_empty() && c.error.is_empty());
    assert_eq!(
        (c.head_sha.as_str(), c.base_sha.as_str()),
        (clean.as_str(), main.as_str())
    );

    let c = check(&r.gate, "acme/app", "left").await.expect("left");
    assert_eq!(c.mergeability(), Mergeability::Conflicts, "{c:?}");
    assert_eq!(c.conflicting_files, vec!["a.txt".to_owned()]);

    // The mirror is fetched before every check: a push that makes `clean` conflict shows.
    push(
        &r.bare,
        "clean",
        "main",
        &[("a.txt", "clean now conflicts\n")],
    )
    .await;
    let c = check(&r.gate, "acme/app", "clean")
        .await
        .expect("clean again");
    assert_eq!(c.mergeability(), Mergeability::Conflicts, "{c:?}");

    let c = check(&r.gate, "acme/app", "missing")
        .await
        .expect("missing");
    assert_eq!(c.mergeability(), Mergeability::Error);
    assert!(c.error.contains("branch missing not found"), "{c:?}");
    let c = check(&r.gate, "acme/none", "clean")
        .await
        .expect("unknown repo");
    assert_eq!(c.mergeability(), Mergeability::Error);
    assert!(c.error.contains("cannot clone"), "{c:?}");

    for (repo, branch) in [
        ("acme/app", "-x"),
        ("acme/app", "a/../b"),
        ("acme/app", ""),
        ("../app", "clean"),
    ] {
        let err = check(&r.gate, repo, branch).await.expect_err("refused");
        assert_eq!(
            err.code(),
            Code::InvalidArgument,
            "{repo} {branch}: {err:?}"
        );
    }

    // Only a bare mirror was written: no work tree anywhere.
    let mirror = r.mirrors.join("acme/app.git");
    let bare = Git::new()
        .ok(&mirror, &["rev-parse", "--is-bare-repository"])
        .await
        .expect("rev-parse");
    assert_eq!(bare.trim(), "true");
    assert!(!mirror.join("a.txt").exists());
}

async fn merge_on_real_repos(storage: TestStorage) {
    let r = repos(&storage).await;
    push(&r.bare, "main", "main", &[("a.txt", "one\n")]).await;
    let feature = push(&r.bare, "orch/ORCH-1", "main", &[("b.txt", "b\n")]).await;
    let ensure = |branch: &str| EnsurePrRequest {
        repo: "acme/app".into(),
        branch: branch.into(),
        base: String::new(),
        title: String::new(),
        body: "from the test".into(),
    };
    let pr = MergeGate::ensure_pr(&r.gate, Request::new(ensure("orch/ORCH-1")))
        .await
        .expect("ensure")
        .into_inner();
    assert!(pr.created);
    let pr = pr.pr.expect("pr");
    assert_eq!(
        (
            pr.head_sha.as_str(),
            pr.base_branch.as_str(),
            pr.state.as_str()
        ),
        (feature.as_str(), "main", "open")
    );
    let again = MergeGate::ensure_pr(&r.gate, Request::new(ensure("orch/ORCH-1")))
        .await
        .expect("ensure again")
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.pr.expect("pr").number, pr.number);
    let err = MergeGate::ensure_pr(&r.gate, Request::new(ensure("main")))
        .await
        .expect_err("head == base");
    assert_eq!(err.code(), Code::FailedPrecondition, "{err:?}");

    let finalize = |number: u64, tested: &str| FinalizeMergeRequest {
        work_item: "ORCH-1".into(),
        repo: "acme/app".into(),
        pr_number: number,
        tested_head_sha: tested.into(),
        job_id: String::new(),
    };
    let done = MergeGate::finalize_merge(&r.gate, Request::new(finalize(pr.number, &feature)))
        .await
        .expect("finalize")
        .into_inner();
    assert_eq!(done.outcome(), FinalizeOutcome::Merged, "{done:?}");
    let main = Git::new()
        .rev_parse(&r.bare, "main")
        .await
        .expect("rev-parse")
        .expect("main");
    assert_eq!(done.merge_sha, main);
    let again = MergeGate::finalize_merge(&r.gate, Request::new(finalize(pr.number, &feature)))
        .await
        .expect("finalize again")
        .into_inner();
    assert_eq!(again.outcome(), FinalizeOutcome::AlreadyMerged, "{again:?}");

    // A branch whose tested commit is already in the base (pushed there by hand) is done.
    let hotfix = push(&r.bare, "orch/ORCH-2", "main", &[("c.txt", "c\n")]).await;
    let hot = MergeGate::ensure_pr(&r.gate, Request::new(ensure("orch/ORCH-2")))
        .await
        .expect("ensure")
        .into_inner()
        .pr
        .expect("pr");
    Git::new()
        .ok(&r.bare, &["update-ref", "refs/heads/main", &hotfix])
        .await
        .expect("fast-forward main");
    let done = MergeGate::finalize_merge(
        &r.gate,
        Request::new(FinalizeMergeRequest {
            work_item: "ORCH-2".into(),
            ..finalize(hot.number, &hotfix)
        }),
    )
    .await
    .expect("finalize")
    .into_inner();
    assert_eq!(
        done.outcome(),
        FinalizeOutcome::AlreadyContained,
        "{done:?}"
    );
    assert_eq!(
        Git::new()
            .rev_parse(&r.bare, "main")
            .await
            .expect("rev-parse"),
        Some(hotfix)
    );
}

on_both_backends!(mergeability_on_real_repos, merge_on_real_repos);
