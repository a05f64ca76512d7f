//! merge-gate and the reaper in the whole stack, configured from the environment as an
//! operator does it: mergeability and a merge on a local bare repository, leases over gRPC,
//! and the reaper reclaiming a stale lease through merge-gate. The same parts under faults,
//! with the launcher as a real process, are in `reaper_faults`.

use std::time::{Duration, Instant};

use orchestrator::Node;
use orchestrator_forge::RepoName;
use orchestrator_forge::local::LocalForge;
use orchestrator_git::Git;
use orchestrator_kit::{Config, ServiceName};
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, CheckBranchMergeableRequest, EnsurePrRequest, FinalizeMergeRequest,
    FinalizeOutcome, GetLeaseRequest, ListMergesRequest, Mergeability,
};
use orchestrator_proto::reaper::v1::{SnapshotRequest, TickNowRequest};
use orchestrator_testkit::{TestStorage, on_both_backends};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::common::{env_for, start};

const ID: [&str; 4] = ["-c", "user.name=t", "-c", "user.email=t@example.com"];

/// Commits `files` on a new `branch` from main and pushes it to `bare`.
async fn push_branch(bare: &std::path::Path, branch: &str, files: &[(&str, &str)]) -> String {
    let git = Git::new();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    git.ok(w, &["clone", "-q", &bare.display().to_string(), "."])
        .await
        .expect("clone");
    if branch != "main" {
        git.ok(w, &["checkout", "-q", "-b", branch])
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

async fn merge_gate_and_reaper_in_the_stack(storage: TestStorage) {
    let forge_dir = tempfile::tempdir().expect("tempdir");
    let forge_dir_s = forge_dir.path().display().to_string();
    let mirrors = tempfile::tempdir().expect("tempdir");
    let mirrors_s = mirrors.path().display().to_string();
    let stack = start(
        storage,
        &[
            ("ORCH_FORGE", "local"),
            ("ORCH_FORGE_LOCAL_DIR", &forge_dir_s),
            ("ORCH_MERGE_MIRROR_DIR", &mirrors_s),
            // The loop stays out of the way: the test ticks with TickNow.
            ("ORCH_REAPER_INTERVAL_S", "3600"),
        ],
    )
    .await;
    let local = LocalForge::new(forge_dir.path().to_path_buf(), "main".into());
    let bare = local
        .init_repo(&RepoName::parse("acme/app").expect("repo"))
        .await
        .expect("init");
    push_branch(&bare, "main", &[("a.txt", "one\n")]).await;
    let head = push_branch(&bare, "orch/ORCH-1", &[("b.txt", "b\n")]).await;
    push_branch(&bare, "orch/ORCH-2", &[("a.txt", "two\n")]).await;
    push_branch(&bare, "main", &[("a.txt", "main\n")]).await;

    let mut gate = stack.clients.merge_gate.clone();
    let check = |branch: &str| CheckBranchMergeableRequest {
        repo: "acme/app".into(),
        branch: branch.into(),
        base: String::new(),
    };
    let c = gate
        .check_branch_mergeable(check("orch/ORCH-1"))
        .await
        .expect("check")
        .into_inner();
    assert_eq!(c.mergeability(), Mergeability::Mergeable, "{c:?}");
    let c = gate
        .check_branch_mergeable(check("orch/ORCH-2"))
        .await
        .expect("check")
        .into_inner();
    assert_eq!(c.mergeability(), Mergeability::Conflicts, "{c:?}");
    assert_eq!(c.conflicting_files, vec!["a.txt".to_owned()]);

    let pr = gate
        .ensure_pr(EnsurePrRequest {
            repo: "acme/app".into(),
            branch: "orch/ORCH-1".into(),
            base: String::new(),
            title: "ORCH-1".into(),
            body: String::new(),
        })
        .await
        .expect("ensure")
        .into_inner()
        .pr
        .expect("pr");
    let finalize = FinalizeMergeRequest {
        work_item: "ORCH-1".into(),
        repo: "acme/app".into(),
        pr_number: pr.number,
        tested_head_sha: head.clone(),
        job_id: "deploy-finalizer-1".into(),
    };
    for expected in [FinalizeOutcome::Merged, FinalizeOutcome::AlreadyMerged] {
        let done = gate
            .finalize_merge(finalize.clone())
            .await
            .expect("finalize")
            .into_inner();
        assert_eq!(done.outcome(), expected, "{done:?}");
    }
    let merges = gate
        .list_merges(ListMergesRequest::default())
        .await
        .expect("list")
        .into_inner()
        .merges;
    assert_eq!(merges.len(), 1);
    assert_eq!(
        (merges[0].state.as_str(), merges[0].attempts),
        ("merged", 1)
    );

    // A lease of an unknown repo is refused; a short lease goes stale and the reaper has
    // merge-gate reclaim it.
    let lease = |repo: &str, ttl_s| AcquireLeaseRequest {
        repo: repo.into(),
        holder_job_id: "deploy-1".into(),
        instance_id: "launcher-1".into(),
        pid: 4242,
        ttl_s,
    };
    let err = gate
        .acquire_lease(lease("acme/none", 0))
        .await
        .expect_err("unknown repo");
    assert_eq!(err.code(), Code::NotFound, "{err:?}");
    assert!(
        gate.acquire_lease(lease("acme/app", 1))
            .await
            .expect("lease")
            .into_inner()
            .acquired
    );
    let mut reaper = stack.clients.reaper.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let tick = reaper
            .tick_now(TickNowRequest {})
            .await
            .expect("tick")
            .into_inner();
        // The launcher answers (no running jobs); the lease's holder is unknown to it, so
        // only the TTL applies.
        assert_eq!(tick.errors, 0, "{tick:?}");
        if tick.leases_reclaimed == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the stale lease was never reclaimed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let left = gate
        .get_lease(GetLeaseRequest {
            repo: "acme/app".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(left.lease, None);
    let s = reaper
        .snapshot(SnapshotRequest {})
        .await
        .expect("snapshot")
        .into_inner();
    assert!(s.enabled);
    assert_eq!(
        (s.interval_s, s.dead_ticks, s.leases_reclaimed),
        (3600, 3, 1)
    );
    assert_eq!(s.last_error, "", "{s:?}");
}

async fn bad_reaper_and_merge_gate_settings_stop_start_up(storage: TestStorage) {
    for (var, value) in [
        ("ORCH_REAPER_INTERVAL_S", "0"),
        ("ORCH_REAPER_DEAD_TICKS", "none"),
        ("ORCH_REAPER_ENABLED", "perhaps"),
        ("ORCH_MERGE_LEASE_TTL_S", "0"),
    ] {
        let config = Config::from_env(env_for(&storage, &[(var, value)])).expect("config");
        let err = Node::start(config, &ServiceName::ALL, CancellationToken::new())
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().starts_with(var), "{err}");
    }
}

on_both_backends!(
    merge_gate_and_reaper_in_the_stack,
    bad_reaper_and_merge_gate_settings_stop_start_up
);
