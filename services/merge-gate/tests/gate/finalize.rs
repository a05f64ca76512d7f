//! FinalizeMerge against the fake Gitea: merged exactly once however often and however
//! concurrently it is driven; an error is read back against the PR before a retry; a moved
//! head or a PR closed unmerged is refused with a recorded reason.

use std::sync::Arc;
use std::time::{Duration, Instant};

use merge_gate::store::{self, MergeState};
use merge_gate::{MergeGateService, TtlOnly};
use orchestrator_proto::merge_gate::v1::merge_gate_server::MergeGate;
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, FinalizeMergeRequest, FinalizeMergeResponse, FinalizeOutcome,
    ListMergesRequest,
};
use orchestrator_testkit::{TestStorage, on_both_backends};
use tonic::{Code, Request, Status};

use crate::fakes::{FakeGitea, Faults, gate_over_gitea, gate_with, gitea_config, open_db};

const REPO: &str = "acme/app";
const HEAD: &str = "d555a5dd07f4d0148a58d4686ec381502ae6a2d4";
const MOVED: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fn request(pr: u64, tested: &str, job_id: &str) -> FinalizeMergeRequest {
    FinalizeMergeRequest {
        work_item: format!("ORCH-{pr}"),
        repo: REPO.into(),
        pr_number: pr,
        tested_head_sha: tested.into(),
        job_id: job_id.into(),
    }
}

async fn finalize(
    gate: &MergeGateService,
    req: FinalizeMergeRequest,
) -> Result<FinalizeMergeResponse, Status> {
    MergeGate::finalize_merge(gate, Request::new(req))
        .await
        .map(tonic::Response::into_inner)
}

async fn outcome(gate: &MergeGateService, pr: u64, tested: &str) -> FinalizeMergeResponse {
    finalize(gate, request(pr, tested, ""))
        .await
        .expect("finalize")
}

/// Re-drives a finalization while it answers RETRY_LATER, as the deploy-finalizer does.
async fn drive(gate: MergeGateService, pr: u64) -> FinalizeMergeResponse {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = outcome(&gate, pr, HEAD).await;
        if r.outcome() != FinalizeOutcome::RetryLater {
            return r;
        }
        assert!(r.retry_after_s > 0, "{r:?}");
        assert!(Instant::now() < deadline, "still RETRY_LATER: {r:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ten_concurrent_calls_merge_once(storage: TestStorage) {
    let db = open_db(&storage).await;
    let gitea = FakeGitea::start(&[REPO]).await;
    gitea.add_pr(REPO, 7, HEAD);
    gitea.with(|s| s.merge_delay = Duration::from_millis(150));
    let mirrors = tempfile::tempdir().expect("tempdir");
    // Two gates over one database: two replicas, each with its own in-process lock.
    let gates = [
        gate_over_gitea(db.clone(), &gitea, mirrors.path(), Arc::new(TtlOnly)),
        gate_over_gitea(db.clone(), &gitea, mirrors.path(), Arc::new(TtlOnly)),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10 {
        tasks.spawn(drive(gates[i % 2].clone(), 7));
    }
    let answers = tasks.join_all().await;
    let merged = answers
        .iter()
        .filter(|r| r.outcome() == FinalizeOutcome::Merged)
        .count();
    let already = answers
        .iter()
        .filter(|r| r.outcome() == FinalizeOutcome::AlreadyMerged)
        .count();
    assert_eq!((merged, already), (1, 9), "{answers:#?}");
    let sha = &answers[0].merge_sha;
    assert_eq!(sha.len(), 40, "{answers:#?}");
    assert!(answers.iter().all(|r| &r.merge_sha == sha), "{answers:#?}");
    gitea.with(|s| {
        assert_eq!(s.merges_done, 1);
        assert_eq!(s.merge_requests, 1, "one merge request reached Gitea");
    });

    // Re-driven later: still merged once, and Gitea is not asked to merge again.
    let again = outcome(&gates[1], 7, HEAD).await;
    assert_eq!(again.outcome(), FinalizeOutcome::AlreadyMerged);
    assert_eq!(&again.merge_sha, sha);
    gitea.with(|s| assert_eq!(s.merge_requests, 1));
    let row = store::get_merge(&db, REPO, 7)
        .await
        .expect("row")
        .expect("recorded");
    assert_eq!(row.state, MergeState::Merged);
    assert_eq!(row.attempts, 1);
    assert_eq!(&row.merge_sha, sha);
    assert_eq!(row.tested_head_sha, HEAD);
    gitea.check();
}

/// The same ten calls when the replicas' claims on the PR lapse mid-merge (a merge-gate
/// judged crashed while its merge was still on its way): more than one merge request then
/// reaches Gitea, and Gitea's own answer for an already merged PR (405, empty message) is
/// read as "already merged" — still exactly one merge.
async fn ten_concurrent_calls_merge_once_even_when_the_claims_lapse(storage: TestStorage) {
    let db = open_db(&storage).await;
    let gitea = FakeGitea::start(&[REPO]).await;
    gitea.add_pr(REPO, 7, HEAD);
    gitea.with(|s| s.merge_delay = Duration::from_millis(1000));
    let mirrors = tempfile::tempdir().expect("tempdir");
    let mut config = gitea_config(&gitea, mirrors.path());
    config.claim_ttl = Duration::from_millis(20);
    let gates = [
        gate_with(db.clone(), config.clone(), Arc::new(TtlOnly)),
        gate_with(db.clone(), config, Arc::new(TtlOnly)),
    ];
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..10 {
        tasks.spawn(drive(gates[i % 2].clone(), 7));
    }
    let answers = tasks.join_all().await;
    let count = |o: FinalizeOutcome| answers.iter().filter(|r| r.outcome() == o).count();
    assert_eq!(
        (
            count(FinalizeOutcome::Merged),
            count(FinalizeOutcome::AlreadyMerged)
        ),
        (1, 9),
        "{answers:#?}"
    );
    gitea.with(|s| {
        assert_eq!(s.merges_done, 1, "merged once");
        assert!(
            s.merge_requests >= 2,
            "the lapsed claims let a second merge request through, answered 405: {} requests",
            s.merge_requests
        );
    });
    let sha = &answers
        .iter()
        .find(|r| r.outcome() == FinalizeOutcome::Merged)
        .expect("merged")
        .merge_sha;
    assert!(
        answers
            .iter()
            .all(|r| r.merge_sha.is_empty() || &r.merge_sha == sha),
        "{answers:#?}"
    );
    let row = store::get_merge(&db, REPO, 7)
        .await
        .expect("row")
        .expect("recorded");
    assert_eq!(row.state, MergeState::Merged);
    gitea.check();
}

async fn refusals_and_recoveries(storage: TestStorage) {
    let db = open_db(&storage).await;
    let gitea = FakeGitea::start(&[REPO]).await;
    let mirrors = tempfile::tempdir().expect("tempdir");
    let gate = gate_over_gitea(db.clone(), &gitea, mirrors.path(), Arc::new(TtlOnly));
    let requests = || gitea.with(|s| s.merge_requests);

    // The head moved since testing: refused before any merge request, reason recorded.
    gitea.add_pr(REPO, 1, MOVED);
    let r = outcome(&gate, 1, HEAD).await;
    assert_eq!(r.outcome(), FinalizeOutcome::Refused);
    assert!(
        r.reason.contains("head moved") && r.reason.contains(MOVED),
        "{r:?}"
    );
    assert_eq!(requests(), 0);
    let row = store::get_merge(&db, REPO, 1)
        .await
        .expect("row")
        .expect("recorded");
    assert_eq!(row.state, MergeState::Refused);
    assert!(row.last_error.contains("head moved"), "{row:?}");

    // The head moves between our read and the merge: Gitea's 409 is read back as a move.
    gitea.add_pr(REPO, 2, HEAD);
    gitea.with(|s| {
        s.faults = Faults {
            push_before_merge: Some(MOVED.into()),
            ..Faults::default()
        }
    });
    let r = outcome(&gate, 2, HEAD).await;
    assert_eq!(r.outcome(), FinalizeOutcome::Refused);
    assert!(r.reason.contains("head moved"), "{r:?}");
    assert_eq!(gitea.with(|s| s.merges_done), 0);

    // Closed without a merge: refused, nothing sent.
    gitea.add_pr(REPO, 3, HEAD);
    gitea.with(|s| s.pulls.get_mut(&(REPO.into(), 3)).expect("pr").open = false);
    let before = requests();
    let r = outcome(&gate, 3, HEAD).await;
    assert_eq!(r.outcome(), FinalizeOutcome::Refused);
    assert!(r.reason.contains("closed without being merged"), "{r:?}");
    assert_eq!(requests(), before);

    // The merge happened but its answer was lost (500): the PR is read back, not merged again.
    gitea.add_pr(REPO, 4, HEAD);
    gitea.with(|s| {
        s.faults = Faults {
            lose_merge_answer: true,
            ..Faults::default()
        }
    });
    let before = requests();
    let r = outcome(&gate, 4, HEAD).await;
    assert_eq!(r.outcome(), FinalizeOutcome::Merged, "{r:?}");
    assert_eq!(r.merge_sha.len(), 40);
    assert_eq!(requests(), before + 1);

    // Merged in the UI just before our request: Gitea answers 405, which reads as merged.
    gitea.add_pr(REPO, 5, HEAD);
    gitea.with(|s| {
        s.faults = Faults {
            merged_by_someone_else: true,
            ..Faults::default()
        }
    });
    let done_before = gitea.with(|s| s.merges_done);
    let r = outcome(&gate, 5, HEAD).await;
    assert_eq!(r.outcome(), FinalizeOutcome::AlreadyMerged, "{r:?}");
    assert_eq!(gitea.with(|s| s.merges_done), done_before);

    // Gitea is not ready (405 "Please try again later"): retry later, then it merges.
    gitea.add_pr(REPO, 6, HEAD);
    gitea.with(|s| {
        s.faults = Faults {
            not_ready: true,
            ..Faults::default()
        }
    });
    let r = outcome(&gate, 6, HEAD).await;
    assert_eq!(r.outcome(), FinalizeOutcome::RetryLater, "{r:?}");
    assert_eq!(r.retry_after_s, 30);
    assert!(r.reason.contains("try again later"), "{r:?}");
    let r = outcome(&gate, 6, HEAD).await;
    assert_eq!(r.outcome(), FinalizeOutcome::Merged, "{r:?}");

    let listed = MergeGate::list_merges(
        &gate,
        Request::new(ListMergesRequest {
            repo: REPO.into(),
            limit: 0,
        }),
    )
    .await
    .expect("list")
    .into_inner()
    .merges;
    let mut states: Vec<(u64, String)> = listed
        .iter()
        .map(|m| (m.pr_number, m.state.clone()))
        .collect();
    states.sort();
    assert_eq!(
        states,
        [
            (1, "refused"),
            (2, "refused"),
            (3, "refused"),
            (4, "merged"),
            (5, "merged"),
            (6, "merged")
        ]
        .map(|(n, s)| (n, s.to_owned()))
    );
    gitea.check();
}

async fn bad_input_and_the_lease(storage: TestStorage) {
    let db = open_db(&storage).await;
    let gitea = FakeGitea::start(&[REPO]).await;
    gitea.add_pr(REPO, 8, HEAD);
    let mirrors = tempfile::tempdir().expect("tempdir");
    let gate = gate_over_gitea(db, &gitea, mirrors.path(), Arc::new(TtlOnly));

    for (req, code, words) in [
        (request(99, HEAD, ""), Code::NotFound, "#99"),
        (
            request(8, "d555a5d", ""),
            Code::InvalidArgument,
            "tested_head_sha",
        ),
        (
            request(8, "", ""),
            Code::InvalidArgument,
            "tested_head_sha is required",
        ),
        (
            request(0, HEAD, ""),
            Code::InvalidArgument,
            "pr_number is required",
        ),
        (
            FinalizeMergeRequest {
                repo: "acme/../x".into(),
                ..request(8, HEAD, "")
            },
            Code::InvalidArgument,
            "repo",
        ),
        (
            FinalizeMergeRequest {
                work_item: String::new(),
                ..request(8, HEAD, "")
            },
            Code::InvalidArgument,
            "work_item is required",
        ),
    ] {
        let err = finalize(&gate, req.clone()).await.expect_err("refused");
        assert_eq!(err.code(), code, "{req:?}: {err:?}");
        assert!(err.message().contains(words), "{req:?}: {err:?}");
    }

    // Another live holder has the repo's lease (a deploy in progress): retry later.
    let lease = |holder: &str| AcquireLeaseRequest {
        repo: REPO.into(),
        holder_job_id: holder.into(),
        instance_id: "launcher-1".into(),
        pid: 42,
        ttl_s: 0,
    };
    assert!(
        gate.acquire_lease(&lease("deploy-9"))
            .await
            .expect("lease")
            .acquired
    );
    let r = finalize(&gate, request(8, HEAD, "finalizer-1"))
        .await
        .expect("finalize");
    assert_eq!(r.outcome(), FinalizeOutcome::RetryLater, "{r:?}");
    assert!(r.reason.contains("held by deploy-9"), "{r:?}");
    assert_eq!(gitea.with(|s| s.merge_requests), 0);

    // The holder itself finalizes under its own lease, which it keeps.
    let r = finalize(&gate, request(8, HEAD, "deploy-9"))
        .await
        .expect("finalize");
    assert_eq!(r.outcome(), FinalizeOutcome::Merged, "{r:?}");
    let held = gate
        .acquire_lease(&lease("someone-else"))
        .await
        .expect("lease");
    assert!(!held.acquired);
    assert_eq!(held.lease.expect("lease").holder_job_id, "deploy-9");
    gitea.check();
}

on_both_backends!(
    ten_concurrent_calls_merge_once,
    ten_concurrent_calls_merge_once_even_when_the_claims_lapse,
    refusals_and_recoveries,
    bad_input_and_the_lease
);
