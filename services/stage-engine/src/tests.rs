//! The engine alone, on SQLite and PostgreSQL: the forge and the other services are mocks
//! (mockall), the tracker is the local one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use orchestrator_forge::{ForgeKind, MockForge, PrState, PullRequest};
use orchestrator_kit::{Env, ServiceName, db};
use orchestrator_proto::launcher::v1::{
    CancelJobRequest, CancelJobResponse, EnqueueRequest, EnqueueResponse, Job, JobStatus,
};
use orchestrator_proto::post_deploy::v1::ArmResponse;
use orchestrator_proto::stage_engine::v1::{
    AdvanceOutcome, AdvanceStageRequest, ApproveRequest, CancelRequest, CreateWorkItemRequest,
    GetWorkItemRequest, ListCommentsRequest, ListOutboxRequest, ListTransitionsRequest,
    ListWorkItemsRequest, OnPrMergedRequest, ReportJobFailedRequest, RetryRequest, WorkItem,
    stage_engine_server::StageEngine,
};
use orchestrator_testkit::{TestStorage, on_both_backends};
use tonic::{Code, Request};

use crate::peers::MockPeers;
use crate::qg::Mergeability;
use crate::{StageEngineConfig, StageEngineService};

type Files = Arc<Mutex<HashMap<String, String>>>;
/// The combined CI state of each commit, as the forge answers it (pending when not set).
type CiStates = Arc<Mutex<HashMap<String, orchestrator_forge::CiState>>>;

struct Harness {
    svc: StageEngineService,
    files: Files,
    enqueued: Arc<Mutex<Vec<EnqueueRequest>>>,
    armed: Arc<Mutex<u32>>,
    /// The launcher's view of each job (by id; queued when not set), as `ListJobs` shows it.
    job_status: Arc<Mutex<HashMap<String, JobStatus>>>,
    /// Jobs the launcher lost (`ListJobs` does not show them).
    lost: Arc<Mutex<Vec<String>>>,
    cancelled: Arc<Mutex<Vec<CancelJobRequest>>>,
    ci: CiStates,
    _storage: TestStorage,
}

const KEY: &str = "ORCH-7";

fn forge(files: Files, forge_down: bool, ci: CiStates) -> MockForge {
    let mut f = MockForge::new();
    f.expect_combined_status().returning(move |_, sha| {
        let state = ci
            .lock()
            .expect("lock")
            .get(sha)
            .copied()
            .unwrap_or(orchestrator_forge::CiState::Pending);
        Ok(orchestrator_forge::CombinedStatus {
            sha: sha.into(),
            state,
            statuses: vec![orchestrator_forge::CommitStatus {
                context: "ci/build".into(),
                state,
                description: format!("{} on {sha}", state.as_str()),
                target_url: "https://ci.example.com/1".into(),
            }],
        })
    });
    f.expect_kind().return_const(ForgeKind::Local);
    f.expect_repo_exists().returning(|_| Ok(true));
    f.expect_branch_exists().returning(|_, _| Ok(true));
    f.expect_read_file().returning(move |_, _, path| {
        if forge_down {
            return Err(orchestrator_forge::ForgeError::Unavailable(
                "HTTP 503".into(),
            ));
        }
        Ok(files.lock().expect("lock").get(path).cloned())
    });
    f.expect_find_pr().returning(|_, head, base| {
        Ok(Some(PullRequest {
            number: 1,
            url: "http://forge/pulls/1".into(),
            head_branch: head.into(),
            head_sha: "abc".into(),
            base_branch: base.into(),
            state: PrState::Open,
            merged: false,
            merge_sha: None,
        }))
    });
    f.expect_file_url()
        .returning(|_, b, p| format!("http://forge/{b}/{p}"));
    f
}

async fn harness(storage: TestStorage, enqueue_failures: u32, forge_down: bool) -> Harness {
    harness_with(storage, enqueue_failures, forge_down, None, &[]).await
}

async fn harness_with(
    storage: TestStorage,
    enqueue_failures: u32,
    forge_down: bool,
    tracker: Option<Arc<dyn orchestrator_tracker::Tracker>>,
    extra_env: &[(&str, &str)],
) -> Harness {
    orchestrator_kit::telemetry::init_for_tests();
    let db = db::open(
        ServiceName::StageEngine,
        &storage.location,
        &crate::MIGRATOR,
    )
    .await
    .expect("db");
    let files: Files = Arc::default();
    let enqueued: Arc<Mutex<Vec<EnqueueRequest>>> = Arc::default();
    let armed: Arc<Mutex<u32>> = Arc::default();
    let mut peers = MockPeers::new();
    peers
        .expect_check_branch_mergeable()
        .returning(|_, _, _| Ok(Mergeability::Mergeable));
    let failures = Arc::new(Mutex::new(enqueue_failures));
    let log = enqueued.clone();
    peers.expect_enqueue().returning(move |req| {
        let mut left = failures.lock().expect("lock");
        if *left > 0 {
            *left -= 1;
            return Err(tonic::Status::unimplemented("launcher not built yet"));
        }
        let mut log = log.lock().expect("lock");
        // Idempotent on the dedupe key, as the launcher promises.
        let n = match log.iter().position(|r| r.dedupe_key == req.dedupe_key) {
            Some(i) => i + 1,
            None => {
                log.push(req.clone());
                log.len()
            }
        };
        Ok(EnqueueResponse {
            job: Some(Job {
                id: format!("job-{n}"),
                ..Job::default()
            }),
            created: true,
        })
    });
    peers
        .expect_work_item_summary()
        .returning(|k| Ok(format!("Usage for {k}\nTotal · 0 runs · usage unknown")));
    let a = armed.clone();
    peers.expect_arm().returning(move |_| {
        *a.lock().expect("lock") += 1;
        Ok(ArmResponse {
            armed: true,
            created: true,
            ..ArmResponse::default()
        })
    });
    let job_status: Arc<Mutex<HashMap<String, JobStatus>>> = Arc::default();
    let lost: Arc<Mutex<Vec<String>>> = Arc::default();
    let cancelled: Arc<Mutex<Vec<CancelJobRequest>>> = Arc::default();
    let (log, statuses, gone) = (enqueued.clone(), job_status.clone(), lost.clone());
    peers.expect_jobs_of().returning(move |work_item| {
        let statuses = statuses.lock().expect("lock");
        let gone = gone.lock().expect("lock");
        Ok(log
            .lock()
            .expect("lock")
            .iter()
            .enumerate()
            .map(|(i, r)| (format!("job-{}", i + 1), r))
            .filter(|(id, r)| r.work_item == work_item && !gone.contains(id))
            .map(|(id, r)| Job {
                status: statuses.get(&id).copied().unwrap_or(JobStatus::Queued) as i32,
                id,
                work_item: r.work_item.clone(),
                agent: r.agent.clone(),
                stage: r.stage.clone(),
                dedupe_key: r.dedupe_key.clone(),
                attempt: 1,
                outcome: "permanent".into(),
                reason: "claude: not found on PATH".into(),
                ..Job::default()
            })
            .collect())
    });
    let c = cancelled.clone();
    peers.expect_cancel_job().returning(move |req| {
        c.lock().expect("lock").push(req);
        Ok(CancelJobResponse {
            cancelled: true,
            job: None,
        })
    });
    let env = [
        ("ORCH_OUTBOX_BACKOFF_BASE_MS", "1"),
        ("ORCH_MAX_ROLLBACKS", "1"),
    ];
    let config =
        StageEngineConfig::from_env(&Env::from_pairs(env.iter().chain(extra_env).copied()))
            .expect("config");
    let ci: CiStates = Arc::default();
    let svc = StageEngineService::from_parts(
        db,
        config,
        Arc::new(forge(files.clone(), forge_down, ci.clone())),
        Arc::new(peers),
        tracker,
    )
    .expect("service");
    Harness {
        svc,
        files,
        enqueued,
        armed,
        job_status,
        lost,
        cancelled,
        ci,
        _storage: storage,
    }
}

impl Harness {
    async fn create(&self) {
        let r = self
            .svc
            .create_work_item(Request::new(CreateWorkItemRequest {
                tracker_issue_id: "issue-7".into(),
                key: KEY.into(),
                title: "Seven".into(),
                repo: "acme/app".into(),
                ..CreateWorkItemRequest::default()
            }))
            .await
            .expect("create")
            .into_inner();
        assert!(r.created);
    }

    async fn deliver(&self) {
        self.deliver_of(KEY).await;
    }

    /// Delivers until nothing of `key` is pending (every item's when `key` is empty).
    async fn deliver_of(&self, key: &str) {
        // Until nothing is pending: failed deliveries wait out their (1 ms based) backoff.
        let d = self.svc.engine().dispatcher();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            if d.deliver_due().await.expect("deliver") > 0 {
                continue;
            }
            let waiting = crate::outbox::list(&self.svc.engine().db, key, "pending", 1000)
                .await
                .expect("outbox");
            if waiting.is_empty() {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "outbox not drained: {waiting:?}"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    fn write(&self, name: &str, fields: &str) {
        self.files.lock().expect("lock").insert(
            format!("docs/work-items/{KEY}/{name}"),
            format!("---\nwork_item: {KEY}\n{fields}---\nSome text.\n"),
        );
    }

    async fn advance(&self, agent: &str, job: &str, dedupe: &str) -> (AdvanceOutcome, String) {
        let r = self
            .svc
            .advance_stage(Request::new(AdvanceStageRequest {
                work_item: KEY.into(),
                finished_agent: agent.into(),
                job_id: job.into(),
                attempt: 1,
                dedupe_key: dedupe.into(),
                ..Default::default()
            }))
            .await
            .expect("advance")
            .into_inner();
        (r.outcome(), r.reason)
    }

    async fn item(&self) -> crate::store::WorkItemRow {
        crate::store::get(&self.svc.engine().db, KEY)
            .await
            .expect("get")
            .expect("item")
    }

    async fn transitions(&self) -> usize {
        self.svc
            .list_transitions(Request::new(ListTransitionsRequest {
                work_item: KEY.into(),
            }))
            .await
            .expect("transitions")
            .into_inner()
            .transitions
            .len()
    }

    async fn outbox(&self, state: &str) -> Vec<orchestrator_proto::stage_engine::v1::OutboxEntry> {
        self.svc
            .list_outbox(Request::new(ListOutboxRequest {
                work_item: KEY.into(),
                state: state.into(),
                limit: 0,
            }))
            .await
            .expect("outbox")
            .into_inner()
            .entries
    }

    async fn approve(&self, author: &str, comment: &str) -> (AdvanceOutcome, String) {
        let r = self
            .svc
            .approve(Request::new(ApproveRequest {
                work_item: KEY.into(),
                author: author.into(),
                comment_id: comment.into(),
                ..ApproveRequest::default()
            }))
            .await
            .expect("approve")
            .into_inner();
        (r.outcome(), r.reason)
    }
    async fn report(&self, agent: &str, job: &str, dedupe: &str) -> (AdvanceOutcome, String) {
        let r = self
            .svc
            .report_job_failed(Request::new(ReportJobFailedRequest {
                work_item: KEY.into(),
                agent: agent.into(),
                job_id: job.into(),
                attempt: 3,
                dedupe_key: dedupe.into(),
                outcome: "permanent".into(),
                reason: "claude: not found on PATH".into(),
            }))
            .await
            .expect("report")
            .into_inner();
        (r.outcome(), r.reason)
    }

    async fn retry(
        &self,
        author: &str,
        comment: &str,
    ) -> Result<(AdvanceOutcome, String), tonic::Status> {
        let r = self
            .svc
            .retry(Request::new(RetryRequest {
                work_item: KEY.into(),
                author: author.into(),
                comment_id: comment.into(),
                ..RetryRequest::default()
            }))
            .await?
            .into_inner();
        Ok((r.outcome(), r.reason))
    }

    async fn cancel(&self, reason: &str) -> (AdvanceOutcome, String) {
        let r = self
            .svc
            .cancel(Request::new(CancelRequest {
                work_item: KEY.into(),
                author: "ada".into(),
                reason: reason.into(),
            }))
            .await
            .expect("cancel")
            .into_inner();
        (r.outcome(), r.reason)
    }

    async fn comments(&self) -> Vec<String> {
        self.svc
            .list_comments(Request::new(ListCommentsRequest {
                work_item: KEY.into(),
            }))
            .await
            .expect("comments")
            .into_inner()
            .comments
            .into_iter()
            .map(|c| c.html)
            .collect()
    }
}

/// A job that failed for good parks its item blocked, with the reason and the next step
/// (stored, returned, told to a human), once; a stale job and a duplicate change nothing.
async fn a_failed_job_parks_the_item_once(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    h.deliver().await;
    let item = h.item().await;
    assert_eq!(item.latest_job_id, "job-1");
    let dedupe = item.expected_dedupe_key.clone();

    for (agent, job, key, why) in [
        ("analyst", "job-0", dedupe.as_str(), "not the latest job"),
        (
            "analyst",
            "job-1",
            "ORCH-7/other/analyst",
            "not the latest enqueue",
        ),
        (
            "architect",
            "job-1",
            dedupe.as_str(),
            "not the agent ORCH-7 waits for",
        ),
    ] {
        let (o, reason) = h.report(agent, job, key).await;
        assert_eq!(o, AdvanceOutcome::Unchanged, "{job} {key}");
        assert!(reason.contains(why), "{reason}");
    }
    assert_eq!(h.item().await.status.as_str(), "active");

    let (o, reason) = h.report("analyst", "job-1", &dedupe).await;
    assert_eq!(o, AdvanceOutcome::Blocked, "{reason}");
    assert_eq!(
        reason,
        "the analyst's job job-1 failed for good (permanent: claude: not found on PATH)"
    );
    let w = h
        .svc
        .get_work_item(Request::new(GetWorkItemRequest { key: KEY.into() }))
        .await
        .expect("get")
        .into_inner();
    assert_eq!(
        (w.stage.as_str(), w.status.as_str()),
        ("analysis", "blocked")
    );
    assert_eq!(
        w.status_reason,
        "the analyst's job job-1 failed for good (permanent: claude: not found on PATH); fix the \
         cause, then `orchestrator item retry ORCH-7` or comment `:retry:` on the issue"
    );
    assert!(w.expected_agent.is_empty());
    // The same report again (the launcher's outbox redelivers): nothing more.
    let (o, reason) = h.report("analyst", "job-1", &dedupe).await;
    assert_eq!(o, AdvanceOutcome::Unchanged);
    assert!(reason.contains("already applied"), "{reason}");
    // The job's success arriving late changes nothing either.
    assert_eq!(
        h.advance("analyst", "job-1", &dedupe).await.0,
        AdvanceOutcome::Unchanged
    );
    assert_eq!(h.transitions().await, 2);
    h.deliver().await;
    let comments = h.comments().await;
    assert_eq!(comments.len(), 2);
    assert!(
        comments[1].contains("Blocked at <strong>analysis</strong>")
            && comments[1].contains("claude: not found on PATH")
            && comments[1].contains(":retry:")
            && comments[1].contains("orchestrator item retry ORCH-7"),
        "{}",
        comments[1]
    );
    let blocked = h
        .svc
        .list_work_items(Request::new(ListWorkItemsRequest {
            status: "blocked".into(),
            ..ListWorkItemsRequest::default()
        }))
        .await
        .expect("list")
        .into_inner()
        .work_items;
    assert_eq!(blocked.len(), 1);

    // Bad input names its field.
    for (req, field) in [
        (
            ReportJobFailedRequest {
                work_item: KEY.into(),
                agent: "hacker".into(),
                job_id: "j".into(),
                ..ReportJobFailedRequest::default()
            },
            "agent",
        ),
        (
            ReportJobFailedRequest {
                work_item: KEY.into(),
                agent: "analyst".into(),
                ..ReportJobFailedRequest::default()
            },
            "job_id",
        ),
    ] {
        let err = h
            .svc
            .report_job_failed(Request::new(req))
            .await
            .expect_err("bad");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().starts_with(field), "{}", err.message());
    }
}

/// Retry enqueues the stage's agent again (a new dedupe key, through the outbox), with a
/// fresh budget; a bot never retries; an item that is not blocked is refused.
async fn retry_enqueues_again_and_is_refused_when_not_blocked(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    h.deliver().await;
    let err = h.retry("ada", "c-0").await.expect_err("active");
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message()
            .contains("only a blocked work item can be retried"),
        "{}",
        err.message()
    );
    let first = h.item().await.expected_dedupe_key;
    assert_eq!(
        h.report("analyst", "job-1", &first).await.0,
        AdvanceOutcome::Blocked
    );
    sqlx::query("UPDATE work_items SET stage_retries = 2, rollback_count = 1")
        .execute(&h.svc.engine().db.pool)
        .await
        .expect("spent budgets");

    let (o, why) = h.retry("reviewer", "c-bot").await.expect("bot");
    assert_eq!(o, AdvanceOutcome::Unchanged);
    assert!(why.contains("a bot never retries"), "{why}");
    assert_eq!(h.item().await.status.as_str(), "blocked");

    let (o, why) = h.retry("ada", "c-1").await.expect("retry");
    assert_eq!(o, AdvanceOutcome::Retried);
    assert_eq!(
        why,
        "retried by ada: the analyst runs analysis again with a fresh budget"
    );
    let item = h.item().await;
    assert_eq!(
        (
            item.status.as_str(),
            item.expected_agent.as_str(),
            item.stage_retries,
            item.rollback_count
        ),
        ("active", "analyst", 0, 0)
    );
    assert!(item.status_reason.is_empty());
    assert_ne!(item.expected_dedupe_key, first);
    // The same comment redelivered: handled once.
    let (o, why) = h.retry("ada", "c-1").await.expect("again");
    assert_eq!(o, AdvanceOutcome::Unchanged);
    assert!(why.contains("already handled"), "{why}");
    h.deliver().await;
    let enqueued: Vec<(String, String)> = h
        .enqueued
        .lock()
        .expect("lock")
        .iter()
        .map(|r| (r.agent.clone(), r.dedupe_key.clone()))
        .collect();
    assert_eq!(
        enqueued,
        vec![
            ("analyst".to_owned(), first),
            ("analyst".to_owned(), item.expected_dedupe_key.clone())
        ]
    );
    // The retried agent is told its task, and why the item had been blocked.
    let retried: serde_json::Value =
        serde_json::from_str(&h.enqueued.lock().expect("lock")[1].payload_json).expect("payload");
    let task = retried["task"].as_str().expect("a task in the payload");
    assert!(task.contains("- stage: analysis"), "{task}");
    assert!(
        task.contains("retried by ada") && task.contains("it was blocked:"),
        "{task}"
    );
    assert!(!task.contains("## The verdict"), "{task}");
    assert_eq!(h.item().await.latest_job_id, "job-2");
    assert!(
        h.comments()
            .await
            .last()
            .expect("comment")
            .contains("Retried by <strong>ada</strong>")
    );
    // A retry found by the tracker issue (a Plane comment names only its issue).
    assert_eq!(
        h.report("analyst", "job-2", "").await.0,
        AdvanceOutcome::Blocked
    );
    let r = h
        .svc
        .retry(Request::new(RetryRequest {
            tracker_issue_id: "issue-7".into(),
            author: "ada".into(),
            comment_id: "c-2".into(),
            ..RetryRequest::default()
        }))
        .await
        .expect("by issue")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::Retried);
    // Unknown item: NOT_FOUND.
    let err = h
        .svc
        .retry(Request::new(RetryRequest {
            work_item: "ORCH-99".into(),
            author: "ada".into(),
            ..RetryRequest::default()
        }))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
}

/// Cancel ends the item and cancels its job through the outbox (the job found by its
/// dedupe key when the Enqueue answer was not recorded yet); a cancelled item ignores
/// AdvanceStage, Approve, OnPrMerged and Retry.
async fn cancel_ends_the_item_and_its_job(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    // Cancelled before the enqueue went out: the enqueue goes first, then its cancel.
    let dedupe = h.item().await.expected_dedupe_key;
    let (o, why) = h.cancel("not needed").await;
    assert_eq!(o, AdvanceOutcome::Cancelled);
    assert_eq!(why, "cancelled by ada: not needed");
    let item = h.item().await;
    assert_eq!(
        (item.status.as_str(), item.status_reason.as_str()),
        ("cancelled", "cancelled by ada: not needed")
    );
    let kinds: Vec<String> = h
        .outbox("pending")
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(kinds, vec!["comment", "enqueue", "comment", "cancel_job"]);
    h.deliver().await;
    let cancelled = h.cancelled.lock().expect("lock").clone();
    assert_eq!(cancelled.len(), 1);
    assert_eq!(cancelled[0].job_id, "job-1");
    assert_eq!(cancelled[0].reason, "cancelled by ada: not needed");
    assert_eq!(h.enqueued.lock().expect("lock")[0].dedupe_key, dedupe);

    h.write("analysis.md", "");
    assert_eq!(
        h.advance("analyst", "job-1", &dedupe).await.0,
        AdvanceOutcome::Unchanged
    );
    assert_eq!(h.approve("ada", "c-1").await.0, AdvanceOutcome::Unchanged);
    let r = h
        .svc
        .on_pr_merged(Request::new(OnPrMergedRequest {
            repo: "acme/app".into(),
            branch: "orch/ORCH-7".into(),
            ..OnPrMergedRequest::default()
        }))
        .await
        .expect("merged")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::Unchanged);
    assert_eq!(
        h.retry("ada", "c-2").await.expect_err("cancelled").code(),
        Code::FailedPrecondition
    );
    assert_eq!(
        h.report("analyst", "job-1", &dedupe).await.0,
        AdvanceOutcome::Unchanged
    );
    let (o, why) = h.cancel("again").await;
    assert_eq!(o, AdvanceOutcome::Unchanged);
    assert!(why.contains("already cancelled"), "{why}");
    assert_eq!(h.item().await.status.as_str(), "cancelled");
    assert_eq!(h.transitions().await, 2);
    assert_eq!(h.cancelled.lock().expect("lock").len(), 1);
    let listed = h
        .svc
        .list_work_items(Request::new(ListWorkItemsRequest {
            status: "cancelled".into(),
            ..ListWorkItemsRequest::default()
        }))
        .await
        .expect("list")
        .into_inner()
        .work_items;
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status_reason, "cancelled by ada: not needed");
}

/// A deploy-finalizer's failure after done parks the item back at deploy (the merge did
/// not happen); a retry runs the deployer again. A finalizer of another deploy is stale.
async fn a_failed_merge_after_done_parks_at_deploy(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    h.deliver().await;
    sqlx::query(
        "UPDATE work_items SET stage = 'deploy', expected_agent = 'deployer', latest_job_id = '', expected_dedupe_key = ''",
    )
    .execute(&h.svc.engine().db.pool)
    .await
    .expect("set up at deploy");
    h.write(
        "deploy.md",
        "deploy_status: SUCCESS\ndeployed_sha: 0123abcd\n",
    );
    assert_eq!(
        h.advance("deployer", "job-d", "").await.0,
        AdvanceOutcome::Done
    );
    let (o, why) = h
        .report("deploy-finalizer", "fin-0", "deploy-finalizer:job-other")
        .await;
    assert_eq!(o, AdvanceOutcome::Unchanged);
    assert!(why.contains("does not finalize the deploy"), "{why}");
    let (o, why) = h
        .report("deploy-finalizer", "fin-1", "deploy-finalizer:job-d")
        .await;
    assert_eq!(o, AdvanceOutcome::Blocked, "{why}");
    assert!(
        why.contains("the deploy-finalizer's merge (job fin-1) failed for good"),
        "{why}"
    );
    let item = h.item().await;
    assert_eq!(
        (item.stage.as_str(), item.status.as_str()),
        ("deploy", "blocked")
    );
    assert!(
        item.status_reason
            .contains("a retry runs the deployer again"),
        "{}",
        item.status_reason
    );
    assert_eq!(
        h.retry("ada", "c-1").await.expect("retry").0,
        AdvanceOutcome::Retried
    );
    let item = h.item().await;
    assert_eq!(
        (
            item.stage.as_str(),
            item.status.as_str(),
            item.expected_agent.as_str()
        ),
        ("deploy", "active", "deployer")
    );
}

/// The same finish twice changes nothing; a job that is not the latest is refused.
async fn idempotency_and_the_latest_job_rule(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    h.deliver().await;
    let item = h.item().await;
    assert_eq!(item.latest_job_id, "job-1");
    assert_eq!(item.expected_agent, "analyst");
    h.write("analysis.md", "");

    let (o, why) = h.advance("analyst", "job-0", "").await;
    assert_eq!(o, AdvanceOutcome::Unchanged);
    assert!(why.contains("not the latest job"), "{why}");
    let (o, why) = h.advance("analyst", "job-1", "ORCH-7/other/analyst").await;
    assert_eq!(o, AdvanceOutcome::Unchanged);
    assert!(why.contains("not the latest enqueue"), "{why}");
    let (o, _) = h
        .advance("analyst", "job-1", &item.expected_dedupe_key)
        .await;
    assert_eq!(o, AdvanceOutcome::AwaitingApproval);
    let (o, why) = h
        .advance("analyst", "job-1", &item.expected_dedupe_key)
        .await;
    assert_eq!(o, AdvanceOutcome::Unchanged);
    assert!(why.contains("already applied"), "{why}");
    assert_eq!(h.transitions().await, 2);
    h.deliver().await;
    assert_eq!(
        h.enqueued.lock().expect("lock").len(),
        1,
        "no second enqueue"
    );
    // The :approved: request was posted to the (local) tracker by the stream bot.
    let comments = h
        .svc
        .list_comments(Request::new(ListCommentsRequest {
            work_item: KEY.into(),
        }))
        .await
        .expect("comments")
        .into_inner()
        .comments;
    assert_eq!(comments.len(), 2);
    assert!(comments[1].html.contains(":approved:") && comments[1].author == "stream");

    // Unknown work item and bad input: NOT_FOUND / INVALID_ARGUMENT, nothing changes.
    let err = h
        .svc
        .advance_stage(Request::new(AdvanceStageRequest {
            work_item: "ORCH-99".into(),
            finished_agent: "analyst".into(),
            ..AdvanceStageRequest::default()
        }))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    for (agent, field) in [("", "finished_agent"), ("hacker", "finished_agent")] {
        let err = h
            .svc
            .advance_stage(Request::new(AdvanceStageRequest {
                work_item: KEY.into(),
                finished_agent: agent.into(),
                ..AdvanceStageRequest::default()
            }))
            .await
            .expect_err("bad agent");
        assert_eq!(err.code(), Code::InvalidArgument);
        assert!(err.message().contains(field), "{}", err.message());
    }
    for (repo, key, field) in [
        ("acme/../x", "ORCH-8", "repo"),
        ("acme/app", "-ORCH-8", "key"),
        ("", "ORCH-8", "repo"),
    ] {
        let err = h
            .svc
            .create_work_item(Request::new(CreateWorkItemRequest {
                tracker_issue_id: "i-8".into(),
                key: key.into(),
                repo: repo.into(),
                ..CreateWorkItemRequest::default()
            }))
            .await
            .expect_err("bad input");
        assert_eq!(err.code(), Code::InvalidArgument, "{repo} {key}");
        assert!(err.message().starts_with(field), "{}", err.message());
    }
    // Created twice: the same item.
    let again = h
        .svc
        .create_work_item(Request::new(CreateWorkItemRequest {
            tracker_issue_id: "issue-7".into(),
            key: KEY.into(),
            repo: "acme/app".into(),
            ..CreateWorkItemRequest::default()
        }))
        .await
        .expect("again")
        .into_inner();
    assert!(!again.created);
    assert_eq!(h.transitions().await, 2);
}

/// A human's :approved: advances; a bot's never does; the same comment twice counts once.
async fn approval_human_yes_bot_no(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    h.deliver().await;
    h.write("analysis.md", "");
    assert_eq!(
        h.advance("analyst", "job-1", "").await.0,
        AdvanceOutcome::AwaitingApproval
    );
    for bot in ["reviewer", "Stream", "analyst"] {
        let (o, why) = h.approve(bot, &format!("c-{bot}")).await;
        assert_eq!(o, AdvanceOutcome::Unchanged);
        assert!(why.contains("a bot never approves"), "{why}");
    }
    assert_eq!(h.item().await.status.as_str(), "awaiting_approval");
    let (o, _) = h.approve("ada", "c-1").await;
    assert_eq!(o, AdvanceOutcome::Advanced);
    let item = h.item().await;
    assert_eq!(
        (item.stage.as_str(), item.expected_agent.as_str()),
        ("architecture", "architect")
    );
    let (o, why) = h.approve("ada", "c-1").await;
    assert_eq!(o, AdvanceOutcome::Unchanged);
    assert!(why.contains("already handled"), "{why}");
    h.deliver().await;
    let agents: Vec<String> = h
        .enqueued
        .lock()
        .expect("lock")
        .iter()
        .map(|r| r.agent.clone())
        .collect();
    assert_eq!(agents, vec!["analyst", "architect"]);
    let rows = sqlx::query("SELECT author, accepted FROM approvals ORDER BY at_ms")
        .fetch_all(&h.svc.engine().db.pool)
        .await
        .expect("approvals");
    assert_eq!(rows.len(), 4);
}

/// BUG-8 through the RPC: a merge at deploy changes nothing; the deployer's SUCCESS
/// completes the item with the Done state, the usage summary and the post-deploy Arm.
async fn bug_8_and_deploy_to_done(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    h.deliver().await;
    sqlx::query(
        "UPDATE work_items SET stage = 'deploy', expected_agent = 'deployer', latest_job_id = ''",
    )
    .execute(&h.svc.engine().db.pool)
    .await
    .expect("set up at deploy");
    let merged = || OnPrMergedRequest {
        repo: "acme/app".into(),
        branch: "orch/ORCH-7".into(),
        pr_number: 1,
        merge_sha: "def".into(),
    };
    let r = h
        .svc
        .on_pr_merged(Request::new(merged()))
        .await
        .expect("merged")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::Unchanged);
    assert_eq!(h.item().await.stage.as_str(), "deploy");
    // A merge of a branch we do not know: NOT_FOUND; a bad branch: INVALID_ARGUMENT.
    let mut other = merged();
    other.branch = "feature/x".into();
    assert_eq!(
        h.svc
            .on_pr_merged(Request::new(other))
            .await
            .expect_err("unknown")
            .code(),
        Code::NotFound
    );
    let mut bad = merged();
    bad.branch = "--upload-pack=x".into();
    assert_eq!(
        h.svc
            .on_pr_merged(Request::new(bad))
            .await
            .expect_err("bad")
            .code(),
        Code::InvalidArgument
    );

    h.write(
        "deploy.md",
        "deploy_status: SUCCESS\ndeployed_sha: 0123abcd\n",
    );
    assert_eq!(h.advance("deployer", "", "").await.0, AdvanceOutcome::Done);
    h.deliver().await;
    let item = h.item().await;
    assert_eq!(
        (item.stage.as_str(), item.status.as_str()),
        ("done", "done")
    );
    let kinds: Vec<String> = h
        .outbox("delivered")
        .await
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        vec![
            "comment",
            "enqueue",
            "comment",
            "set_state_done",
            "usage_summary",
            "arm_watch"
        ]
    );
    assert_eq!(*h.armed.lock().expect("lock"), 1);
    // Armed: the launcher's reserved monitor ticks the watch from now on.
    let monitor = h
        .enqueued
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("enqueued");
    assert_eq!(
        (
            monitor.agent.as_str(),
            monitor.kind(),
            monitor.stage.as_str()
        ),
        (
            crate::outbox::POST_DEPLOY_MONITOR,
            orchestrator_proto::launcher::v1::JobKind::Reserved,
            "done"
        )
    );
    assert!(
        monitor.dedupe_key.starts_with("post-deploy-monitor:"),
        "{}",
        monitor.dedupe_key
    );
    let local = orchestrator_tracker::local::LocalTracker::new(h.svc.engine().db.clone());
    assert_eq!(
        local.state_of("issue-7").await.expect("state").as_deref(),
        Some("done")
    );
    // A merge after done changes nothing.
    let r = h
        .svc
        .on_pr_merged(Request::new(merged()))
        .await
        .expect("merged")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::Unchanged);
}

/// What follows a deploy is stage-engine's: the deployer's verdict completes the item and
/// enqueues the deploy-finalizer (reserved, deduped on the deployer's job) pinned to the PR
/// and head the launcher says the run delivered; where it did not say (the reaper's path),
/// to the branch's PR as the forge has it. The deploy's own job is enqueued holding the
/// merge lease; the analysis's announces its start; no other stage's does either.
async fn the_deploy_enqueues_its_finalizer_and_the_flags_ride_on_the_jobs(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    h.deliver().await;
    let analyst = h.enqueued.lock().expect("lock")[0].clone();
    let p: serde_json::Value = serde_json::from_str(&analyst.payload_json).expect("payload");
    assert_eq!(
        (
            p["announce_start"].as_bool(),
            p["needs_merge_lease"].as_bool()
        ),
        (Some(true), Some(false))
    );
    for (job_id, pr_number, head_sha, want_pr, want_sha) in [
        ("job-d1", 9_u64, "0123abcd", 9_u64, "0123abcd"),
        ("job-d2", 0, "", 1, "abc"),
    ] {
        sqlx::query(
            "UPDATE work_items SET stage = 'deploy', status = 'active', expected_agent = 'deployer', \
             expected_dedupe_key = '', latest_job_id = ''",
        )
        .execute(&h.svc.engine().db.pool)
        .await
        .expect("set up at deploy");
        h.write(
            "deploy.md",
            "deploy_status: SUCCESS\ndeployed_sha: 0123abcd\n",
        );
        let r = h
            .svc
            .advance_stage(Request::new(AdvanceStageRequest {
                work_item: KEY.into(),
                finished_agent: "deployer".into(),
                job_id: job_id.into(),
                attempt: 1,
                pr_number,
                head_sha: head_sha.into(),
                ..Default::default()
            }))
            .await
            .expect("advance")
            .into_inner();
        assert_eq!(r.outcome(), AdvanceOutcome::Done);
        h.deliver().await;
        let enqueued = h.enqueued.lock().expect("lock").clone();
        let finalizers: Vec<_> = enqueued
            .iter()
            .filter(|e| e.dedupe_key == format!("deploy-finalizer:{job_id}"))
            .collect();
        assert_eq!(finalizers.len(), 1, "{enqueued:#?}");
        let f = finalizers[0];
        assert_eq!(
            (f.kind(), f.stage.as_str(), f.dedupe_key.as_str()),
            (
                orchestrator_proto::launcher::v1::JobKind::Reserved,
                "deploy",
                format!("deploy-finalizer:{job_id}").as_str()
            )
        );
        let p: serde_json::Value = serde_json::from_str(&f.payload_json).expect("payload");
        assert_eq!(
            (
                p["pr_number"].as_u64(),
                p["tested_head_sha"].as_str(),
                p["deployer_job_id"].as_str()
            ),
            (Some(want_pr), Some(want_sha), Some(job_id))
        );
        // Not the item's latest job: nothing waits for its answer.
        assert_eq!(h.item().await.latest_job_id, "");
    }
    // A commit id that is not one is refused, naming the field.
    let e = h
        .svc
        .advance_stage(Request::new(AdvanceStageRequest {
            work_item: KEY.into(),
            finished_agent: "analyst".into(),
            job_id: "job-1".into(),
            attempt: 1,
            head_sha: "abc; rm -rf /".into(),
            ..Default::default()
        }))
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(e.message().contains("head_sha"), "{}", e.message());
    // The deploy's job holds the lease; every other stage's does not.
    for stage in crate::pipeline::Stage::ALL {
        let flags = crate::pipeline::job_flags(stage);
        assert_eq!(flags.needs_merge_lease, stage.as_str() == "deploy");
    }
}

/// A gate that fails sends the same agent back to the same stage with `resume` in its
/// payload: the run to resume, the head it delivered and what the gate lacks; the first
/// enqueue carries none.
async fn a_failed_gate_retries_the_same_agent_with_what_to_resume(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    h.deliver().await;
    let first = h.item().await.expected_dedupe_key;
    // The analyst delivered head 0123abcd but no analysis.md: the gate fails.
    let r = h
        .svc
        .advance_stage(Request::new(AdvanceStageRequest {
            work_item: KEY.into(),
            finished_agent: "analyst".into(),
            job_id: "job-1".into(),
            attempt: 1,
            dedupe_key: first,
            pr_number: 3,
            head_sha: "0123abcd".into(),
        }))
        .await
        .expect("advance")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::Retried);
    h.deliver().await;
    let enqueued = h.enqueued.lock().expect("lock").clone();
    assert_eq!(enqueued.len(), 2);
    let first: serde_json::Value =
        serde_json::from_str(&enqueued[0].payload_json).expect("payload");
    assert!(first.get("resume").is_none(), "{first}");
    let retry: serde_json::Value =
        serde_json::from_str(&enqueued[1].payload_json).expect("payload");
    assert_eq!(enqueued[1].agent, "analyst");
    assert_eq!(retry["resume"]["job_id"], "job-1");
    assert_eq!(retry["resume"]["head_sha"], "0123abcd");
    let lacks = retry["resume"]["gate_lacks"]
        .as_array()
        .expect("gate_lacks");
    assert_eq!(lacks.len(), 1, "{lacks:?}");
    assert!(
        lacks[0]
            .as_str()
            .is_some_and(|l| l.starts_with("check_analysis: ")),
        "{lacks:?}"
    );
    // The full task rides along too: a launcher that cannot resume starts cold with it.
    assert!(retry["task"].as_str().is_some_and(|t| !t.is_empty()));
}

/// A merge at any other stage completes the item (no post-deploy watch).
async fn a_merge_at_review_is_done(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    sqlx::query("UPDATE work_items SET stage = 'review', expected_agent = 'reviewer'")
        .execute(&h.svc.engine().db.pool)
        .await
        .expect("set up at review");
    let r = h
        .svc
        .on_pr_merged(Request::new(OnPrMergedRequest {
            repo: "acme/app".into(),
            branch: "orch/ORCH-7".into(),
            ..OnPrMergedRequest::default()
        }))
        .await
        .expect("merged")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::Done);
    h.deliver().await;
    let kinds: Vec<String> = h.outbox("").await.into_iter().map(|e| e.kind).collect();
    assert!(
        kinds.contains(&"set_state_done".to_owned()) && kinds.contains(&"usage_summary".to_owned())
    );
    assert!(!kinds.contains(&"arm_watch".to_owned()));
    assert_eq!(*h.armed.lock().expect("lock"), 0);
}

/// A launcher that answers UNIMPLEMENTED: the enqueue stays in the outbox, visible, and is
/// delivered once the launcher answers.
async fn an_unimplemented_launcher_is_retried(storage: TestStorage) {
    let h = harness(storage, 2, false).await;
    h.create().await;
    h.svc
        .engine()
        .dispatcher()
        .deliver_due()
        .await
        .expect("pass");
    let pending = h.outbox("pending").await;
    assert_eq!(pending.len(), 1);
    assert_eq!(
        (pending[0].kind.as_str(), pending[0].attempts),
        ("enqueue", 1)
    );
    assert!(
        pending[0].last_error.contains("Unimplemented"),
        "{}",
        pending[0].last_error
    );
    assert_eq!(
        h.outbox("delivered").await.len(),
        1,
        "the comment went out regardless"
    );
    h.deliver().await;
    let delivered = h.outbox("delivered").await;
    assert_eq!(delivered.len(), 2);
    assert_eq!(
        delivered
            .iter()
            .find(|e| e.kind == "enqueue")
            .expect("enqueue")
            .attempts,
        3
    );
    assert_eq!(h.item().await.latest_job_id, "job-1");
    assert_eq!(h.enqueued.lock().expect("lock").len(), 1);
}

/// A forge that is down: AdvanceStage answers UNAVAILABLE and nothing changes.
async fn a_forge_that_is_down_changes_nothing(storage: TestStorage) {
    let h = harness(storage, 0, true).await;
    h.create().await;
    let err = h
        .svc
        .advance_stage(Request::new(AdvanceStageRequest {
            work_item: KEY.into(),
            finished_agent: "analyst".into(),
            job_id: "job-1".into(),
            ..AdvanceStageRequest::default()
        }))
        .await
        .expect_err("forge down");
    assert_eq!(err.code(), Code::Unavailable);
    assert_eq!(h.transitions().await, 1);
    assert_eq!(h.item().await.stage.as_str(), "analysis");
    assert!(
        !crate::store::job_consumed(&h.svc.engine().db, "job-1")
            .await
            .expect("consumed")
    );
}

/// The rollback budget through the engine: the second negative verdict blocks the item
/// (budget 1), with a comment asking a human; a human's :approved: resumes it.
async fn the_budget_blocks_and_a_human_resumes(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    sqlx::query("UPDATE work_items SET stage = 'review', expected_agent = 'reviewer'")
        .execute(&h.svc.engine().db.pool)
        .await
        .expect("set up at review");
    h.write("review.md", "review_verdict: CHANGES_REQUESTED\n");
    assert_eq!(
        h.advance("reviewer", "", "").await.0,
        AdvanceOutcome::RolledBack
    );
    assert_eq!(h.item().await.stage.as_str(), "development");
    sqlx::query("UPDATE work_items SET stage = 'review', expected_agent = 'reviewer'")
        .execute(&h.svc.engine().db.pool)
        .await
        .expect("back at review");
    let (o, why) = h.advance("reviewer", "", "").await;
    assert_eq!(o, AdvanceOutcome::Blocked);
    assert!(why.contains("rollback budget (1) is spent"), "{why}");
    let reason = h.item().await.status_reason;
    assert!(
        reason.starts_with(&why)
            && reason
                .ends_with("`orchestrator item retry ORCH-7` or comment `:retry:` on the issue"),
        "{reason}"
    );
    assert_eq!(
        h.advance("reviewer", "", "").await.0,
        AdvanceOutcome::Unchanged
    );
    assert_eq!(h.approve("ada", "c-9").await.0, AdvanceOutcome::Advanced);
    let item = h.item().await;
    assert_eq!(
        (
            item.status.as_str(),
            item.rollback_count,
            item.expected_agent.as_str()
        ),
        ("active", 0, "reviewer")
    );
    assert!(item.status_reason.is_empty());
    h.deliver().await;
    let blocked = h
        .outbox("delivered")
        .await
        .into_iter()
        .filter(|e| e.kind == "comment" && e.payload_json.contains("Blocked at"))
        .count();
    assert_eq!(blocked, 1);
}

/// A comment the tracker refuses (403) fails at once, visibly; once the operator fixed the
/// token, RetryOutbox puts it back and it is delivered. The Plane project unknown at
/// creation is looked up by key at the first delivery, once.
async fn a_refused_comment_fails_and_an_operator_retries_it(storage: TestStorage) {
    use orchestrator_tracker::{CommentPosted, IssueRef, MockTracker, TrackerError, TrackerKind};
    let mut t = MockTracker::new();
    t.expect_kind().return_const(TrackerKind::Plane);
    // The agent's task quotes the issue's comments.
    t.expect_list_comments().returning(|_| Ok(Vec::new()));
    t.expect_find_issue()
        .withf(|k| k == KEY)
        .times(1)
        .returning(|_| {
            Ok(Some(IssueRef {
                project_id: "proj-1".into(),
                issue_id: "issue-7".into(),
            }))
        });
    let refused = Arc::new(Mutex::new(true));
    t.expect_add_comment()
        .withf(|issue, _, author, key| {
            issue.project_id == "proj-1"
                && issue.issue_id == "issue-7"
                && author == "stream"
                && !key.is_empty()
        })
        .times(2)
        .returning(move |_, _, _, _| {
            let mut r = refused.lock().expect("lock");
            if *r {
                *r = false;
                return Err(TrackerError::Rejected {
                    status: 403,
                    message: "Given API token is not valid".into(),
                });
            }
            Ok(CommentPosted {
                id: Some("c1".into()),
                duplicate: false,
            })
        });
    let h = harness_with(storage, 0, false, Some(Arc::new(t)), &[]).await;
    h.create().await;
    h.deliver().await;
    let failed = h.outbox("failed").await;
    assert_eq!(failed.len(), 1);
    assert!(
        failed[0].last_error.contains("403"),
        "{}",
        failed[0].last_error
    );
    assert_eq!(
        h.outbox("delivered").await.len(),
        1,
        "the enqueue went out regardless"
    );
    assert_eq!(h.item().await.tracker_project_id, "proj-1");

    let err = h
        .svc
        .retry_outbox(Request::new(
            orchestrator_proto::stage_engine::v1::RetryOutboxRequest::default(),
        ))
        .await
        .expect_err("nothing named");
    assert_eq!(err.code(), Code::InvalidArgument);
    let r = h
        .svc
        .retry_outbox(Request::new(
            orchestrator_proto::stage_engine::v1::RetryOutboxRequest {
                id: String::new(),
                work_item: KEY.into(),
            },
        ))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(r.retried, 1);
    h.deliver().await;
    assert_eq!(h.outbox("delivered").await.len(), 2);
    assert!(h.outbox("failed").await.is_empty());
}

/// A Plane issue names its project and its number, not its key: the key is the project's
/// identifier (asked of the tracker once it is needed, never for a repeat) and the number.
/// A tracker that is down is UNAVAILABLE and creates nothing; an identifier that is not
/// safe for a branch is refused. An approval finds its work item by the tracker issue.
async fn a_plane_issue_is_keyed_by_its_project_identifier(storage: TestStorage) {
    use orchestrator_tracker::{CommentPosted, MockTracker, TrackerError, TrackerKind};
    let mut t = MockTracker::new();
    t.expect_kind().return_const(TrackerKind::Plane);
    // The agent's task quotes the issue's comments.
    t.expect_list_comments().returning(|_| Ok(Vec::new()));
    let down = Arc::new(Mutex::new(true));
    t.expect_project_identifier()
        .withf(|p| p == "proj-1")
        .times(2)
        .returning(move |_| {
            let mut d = down.lock().expect("lock");
            if *d {
                *d = false;
                return Err(TrackerError::Unavailable("HTTP 503".into()));
            }
            Ok("ORCH".into())
        });
    t.expect_project_identifier()
        .withf(|p| p == "proj-bad")
        .returning(|_| Ok("../X".into()));
    t.expect_project_identifier()
        .withf(|p| p == "proj-gone")
        .returning(|_| Err(TrackerError::NotFound("HTTP 404".into())));
    t.expect_add_comment().returning(|_, _, _, _| {
        Ok(CommentPosted {
            id: Some("c".into()),
            duplicate: false,
        })
    });
    let h = harness_with(storage, 0, false, Some(Arc::new(t)), &[]).await;
    let create = |issue: &str, project: &str, seq: u64| CreateWorkItemRequest {
        tracker_issue_id: issue.into(),
        tracker_project_id: project.into(),
        tracker_sequence_id: seq,
        title: "Seven".into(),
        repo: "acme/app".into(),
        ..CreateWorkItemRequest::default()
    };

    let err = h
        .svc
        .create_work_item(Request::new(create("issue-7", "proj-1", 7)))
        .await
        .expect_err("plane down");
    assert_eq!(err.code(), Code::Unavailable, "{}", err.message());
    assert!(
        crate::store::get_by_tracker_issue(&h.svc.engine().db, "issue-7")
            .await
            .expect("get")
            .is_none()
    );
    for created in [true, false] {
        let r = h
            .svc
            .create_work_item(Request::new(create("issue-7", "proj-1", 7)))
            .await
            .expect("create")
            .into_inner();
        assert_eq!(r.created, created);
        let w = r.work_item.expect("item");
        assert_eq!(
            (
                w.key.as_str(),
                w.branch.as_str(),
                w.tracker_project_id.as_str()
            ),
            (KEY, "orch/ORCH-7", "proj-1")
        );
    }
    for (project, code, field) in [
        (
            "proj-bad",
            Code::InvalidArgument,
            "key: derived from tracker project proj-bad",
        ),
        (
            "proj-gone",
            Code::FailedPrecondition,
            "cannot derive a key from tracker project proj-gone",
        ),
    ] {
        let err = h
            .svc
            .create_work_item(Request::new(create("issue-8", project, 8)))
            .await
            .expect_err(project);
        assert_eq!(err.code(), code, "{}", err.message());
        assert!(err.message().starts_with(field), "{}", err.message());
    }

    h.deliver().await;
    h.write("analysis.md", "");
    assert_eq!(
        h.advance("analyst", "job-1", "").await.0,
        AdvanceOutcome::AwaitingApproval
    );
    let approve = |issue: &str| ApproveRequest {
        tracker_issue_id: issue.into(),
        author: "ada".into(),
        comment_id: "c-ada".into(),
        ..ApproveRequest::default()
    };
    let err = h
        .svc
        .approve(Request::new(approve("issue-unknown")))
        .await
        .expect_err("no such issue");
    assert_eq!(err.code(), Code::NotFound, "{}", err.message());
    let r = h
        .svc
        .approve(Request::new(approve("issue-7")))
        .await
        .expect("approve")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::Advanced, "{}", r.reason);
    assert_eq!(h.item().await.stage.as_str(), "architecture");
}

/// The task in the Enqueue payload (issue #15): the description (kept current by
/// UpdateDescription, which changes nothing else), the human comments but not the bots',
/// and after a rollback the reviewer's verdict as it stands on the branch.
async fn the_task_quotes_the_description_the_comments_and_the_verdict(storage: TestStorage) {
    use orchestrator_proto::stage_engine::v1::{AddCommentRequest, UpdateDescriptionRequest};
    let h = harness(storage, 0, false).await;
    h.svc
        .create_work_item(Request::new(CreateWorkItemRequest {
            tracker_issue_id: "issue-7".into(),
            key: KEY.into(),
            title: "Seven".into(),
            description: "DESC-MARKER: the whole story".into(),
            repo: "acme/app".into(),
            ..CreateWorkItemRequest::default()
        }))
        .await
        .expect("create");
    h.deliver().await;
    let task = |n: usize| -> String {
        let log = h.enqueued.lock().expect("lock");
        let payload: serde_json::Value =
            serde_json::from_str(&log[n].payload_json).expect("payload");
        payload["task"].as_str().expect("a task").to_owned()
    };
    let first = task(0);
    for want in [
        "- work_item: ORCH-7\n- stage: analysis\n",
        "> Seven",
        "> DESC-MARKER: the whole story",
        "- Why you run: new work item",
    ] {
        assert!(first.contains(want), "{want:?} missing in:\n{first}");
    }
    for (author, html) in [
        ("ada", "<p>ADA-NOTE: keep it <b>cheap</b></p>"),
        ("stream", "<p>STREAM-NOTE</p>"),
    ] {
        h.svc
            .add_comment(Request::new(AddCommentRequest {
                work_item: KEY.into(),
                html: html.into(),
                author: author.into(),
                idempotency_key: String::new(),
            }))
            .await
            .expect("comment");
    }
    h.deliver().await;

    let updated = h
        .svc
        .update_description(Request::new(UpdateDescriptionRequest {
            tracker_issue_id: "issue-7".into(),
            description: "DESC-MARKER-2: the story, revised".into(),
        }))
        .await
        .expect("update")
        .into_inner();
    assert_eq!(updated.description, "DESC-MARKER-2: the story, revised");
    let item = h.item().await;
    assert_eq!(
        (item.stage.as_str(), item.version, h.transitions().await),
        ("analysis", 0, 1),
        "a description update moves nothing"
    );
    let err = h
        .svc
        .update_description(Request::new(UpdateDescriptionRequest {
            tracker_issue_id: "issue-unknown".into(),
            description: "x".into(),
        }))
        .await
        .expect_err("no such issue");
    assert_eq!(err.code(), Code::NotFound);

    sqlx::query("UPDATE work_items SET stage = 'review', expected_agent = 'reviewer'")
        .execute(&h.svc.engine().db.pool)
        .await
        .expect("set up at review");
    h.write("review.md", "review_verdict: CHANGES_REQUESTED\n");
    assert_eq!(
        h.advance("reviewer", "", "").await.0,
        AdvanceOutcome::RolledBack
    );
    h.deliver().await;
    let n = h.enqueued.lock().expect("lock").len();
    let back = task(n - 1);
    for want in [
        "- stage: development\n",
        "> DESC-MARKER-2: the story, revised",
        "> ADA-NOTE: keep it **cheap**",
        "## The verdict (the review stage sent the work back)",
        "`docs/work-items/ORCH-7/review.md` as it stands on the branch (quoted):",
        "> review_verdict: CHANGES_REQUESTED\n> ---\n> Some text.",
        "rollback 1 of 1",
    ] {
        assert!(back.contains(want), "{want:?} missing in:\n{back}");
    }
    assert!(!back.contains("STREAM-NOTE"), "a bot's comment in:\n{back}");
}

/// A stage-engine SIGKILLed mid-delivery left an entry `delivering` under a long claim; when
/// it starts again its dispatcher takes back its own claims at once (the claim's 120 s was
/// the tail of the fault suite), while a claim held by another deliverer is left alone.
async fn a_restarted_dispatcher_takes_back_its_own_claims_at_once(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    let db = &h.svc.engine().db;
    let hour_later = orchestrator_kit::time::now_ms() + 3_600_000;
    sqlx::query(
        "UPDATE outbox SET state = 'delivering', claimed_until_ms = $1, claimed_by = 'stage-engine' \
         WHERE channel = 'launcher'",
    )
    .bind(hour_later)
    .execute(&db.pool)
    .await
    .expect("a claim left by a killed process");
    sqlx::query(
        "UPDATE outbox SET state = 'delivering', claimed_until_ms = $1, claimed_by = 'another' \
         WHERE channel = 'tracker'",
    )
    .bind(hour_later)
    .execute(&db.pool)
    .await
    .expect("a claim of another deliverer");
    // While the claims hold, nothing is due.
    assert_eq!(
        h.svc
            .engine()
            .dispatcher()
            .deliver_due()
            .await
            .expect("pass"),
        0
    );
    assert!(h.enqueued.lock().expect("lock").is_empty());

    let stop = tokio_util::sync::CancellationToken::new();
    let run = tokio::spawn(h.svc.engine().dispatcher().run(stop.clone()));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while h.enqueued.lock().expect("lock").is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the enqueue was not taken back"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    stop.cancel();
    run.await.expect("the dispatcher stops");
    let states: Vec<(String, String)> = crate::outbox::list(db, KEY, "", 100)
        .await
        .expect("list")
        .into_iter()
        .map(|e| (e.channel, e.state.as_str().to_owned()))
        .collect();
    assert!(
        states.contains(&("launcher".to_owned(), "delivered".to_owned())),
        "{states:?}"
    );
    assert!(
        states
            .iter()
            .filter(|(c, _)| c == "tracker")
            .all(|(_, st)| st == "delivering"),
        "another deliverer's claim is left alone: {states:?}"
    );
}

/// CI gates the merge on the head the deployer's run delivered, the one the finalizer is
/// pinned to — not on the PR's head, which may have moved on since: pending waits (in
/// `ci_waits`, keeping the pinned head and PR; nothing enqueued), green on that head
/// completes the item and enqueues the merge of exactly that head; red rolls back.
async fn ci_gates_the_merge_of_the_head_the_deployer_delivered(storage: TestStorage) {
    use orchestrator_forge::CiState;
    let h = harness_with(
        storage,
        0,
        false,
        None,
        &[("ORCH_CI_REQUIRED_REPOS", "acme/app")],
    )
    .await;
    h.create().await;
    h.deliver().await;
    let at_deploy = || async {
        sqlx::query(
            "UPDATE work_items SET stage = 'deploy', status = 'active', expected_agent = 'deployer', \
             expected_dedupe_key = '', latest_job_id = ''",
        )
        .execute(&h.svc.engine().db.pool)
        .await
        .expect("set up at deploy");
    };
    at_deploy().await;
    h.write(
        "deploy.md",
        "deploy_status: SUCCESS\ndeployed_sha: 0123abcd\n",
    );
    // The PR's head ("abc", the forge's) is green; the delivered head is not decided yet.
    h.ci.lock()
        .expect("lock")
        .insert("abc".into(), CiState::Success);
    let finished = || AdvanceStageRequest {
        work_item: KEY.into(),
        finished_agent: "deployer".into(),
        job_id: "job-d1".into(),
        attempt: 1,
        pr_number: 1,
        head_sha: "0123abcd".into(),
        ..Default::default()
    };
    let r = h
        .svc
        .advance_stage(Request::new(finished()))
        .await
        .expect("advance")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::Unchanged, "{r:?}");
    let waits = crate::ci::waits(h.svc.engine()).await.expect("waits");
    assert_eq!(waits.len(), 1, "{waits:?}");
    assert_eq!(
        (
            waits[0].agent.as_str(),
            waits[0].job.head_sha.as_str(),
            waits[0].job.pr_number
        ),
        ("deployer", "0123abcd", 1)
    );
    assert!(waits[0].detail.contains("0123abcd"), "{}", waits[0].detail);
    h.deliver().await;
    let finalizer = |h: &Harness| {
        h.enqueued
            .lock()
            .expect("lock")
            .iter()
            .filter(|e| e.dedupe_key == "deploy-finalizer:job-d1")
            .cloned()
            .collect::<Vec<_>>()
    };
    assert!(finalizer(&h).is_empty(), "nothing merges while CI runs");
    assert_eq!(h.item().await.stage.as_str(), "deploy");

    // CI passes the delivered head: the re-check completes the item and the merge is
    // pinned to that head.
    h.ci.lock()
        .expect("lock")
        .insert("0123abcd".into(), CiState::Success);
    let a = h
        .svc
        .engine()
        .recheck_ci(&waits[0])
        .await
        .expect("recheck")
        .expect("advanced");
    assert_eq!(a.outcome, crate::pipeline::Outcome::Done, "{}", a.reason);
    assert!(
        crate::ci::waits(h.svc.engine())
            .await
            .expect("waits")
            .is_empty()
    );
    h.deliver().await;
    let f = finalizer(&h);
    assert_eq!(f.len(), 1);
    let p: serde_json::Value = serde_json::from_str(&f[0].payload_json).expect("payload");
    assert_eq!(
        (p["pr_number"].as_u64(), p["tested_head_sha"].as_str()),
        (Some(1), Some("0123abcd"))
    );

    // Another deploy whose delivered head CI fails: back to development, with the context.
    at_deploy().await;
    h.ci.lock()
        .expect("lock")
        .insert("0bad".into(), CiState::Failure);
    let r = h
        .svc
        .advance_stage(Request::new(AdvanceStageRequest {
            job_id: "job-d2".into(),
            head_sha: "0bad".into(),
            ..finished()
        }))
        .await
        .expect("advance")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::RolledBack, "{r:?}");
    assert!(
        r.reason.contains("CI failed") && r.reason.contains("ci/build (failure): failure on 0bad"),
        "{}",
        r.reason
    );
    assert_eq!(h.item().await.stage.as_str(), "development");
}

on_both_backends!(
    ci_gates_the_merge_of_the_head_the_deployer_delivered,
    a_restarted_dispatcher_takes_back_its_own_claims_at_once,
    the_task_quotes_the_description_the_comments_and_the_verdict,
    a_plane_issue_is_keyed_by_its_project_identifier,
    a_refused_comment_fails_and_an_operator_retries_it,
    idempotency_and_the_latest_job_rule,
    approval_human_yes_bot_no,
    bug_8_and_deploy_to_done,
    the_deploy_enqueues_its_finalizer_and_the_flags_ride_on_the_jobs,
    a_failed_gate_retries_the_same_agent_with_what_to_resume,
    a_merge_at_review_is_done,
    an_unimplemented_launcher_is_retried,
    a_forge_that_is_down_changes_nothing,
    the_budget_blocks_and_a_human_resumes,
    a_failed_job_parks_the_item_once,
    retry_enqueues_again_and_is_refused_when_not_blocked,
    cancel_ends_the_item_and_its_job,
    a_failed_merge_after_done_parks_at_deploy,
    the_watchdog_repairs_what_a_seam_lost,
    the_loop_detector_parks_a_stage_that_fails_the_same_way_three_times,
    list_work_items_filters_and_leaves_descriptions_out_on_request,
);

/// ListWorkItems: each filter alone and together (the SQL holds only the filters given),
/// the latest first, the limit, and `without_description` empties only the description.
async fn list_work_items_filters_and_leaves_descriptions_out_on_request(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    for (n, repo) in [(1, "acme/app"), (2, "acme/web"), (3, "acme/app")] {
        let r = h
            .svc
            .create_work_item(Request::new(CreateWorkItemRequest {
                tracker_issue_id: format!("issue-{n}"),
                key: format!("ORCH-{n}"),
                title: format!("Item {n}"),
                description: format!("<p>the description of {n}</p>"),
                repo: repo.into(),
                ..CreateWorkItemRequest::default()
            }))
            .await
            .expect("create");
        assert!(r.into_inner().created);
        // Distinct updated_at_ms, so that "the latest first" has one answer.
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
    }
    async fn list_of(svc: &StageEngineService, req: ListWorkItemsRequest) -> Vec<WorkItem> {
        svc.list_work_items(Request::new(req))
            .await
            .expect("list")
            .into_inner()
            .work_items
    }
    let list = |req| list_of(&h.svc, req);
    let keys = |items: &[WorkItem]| items.iter().map(|i| i.key.clone()).collect::<Vec<_>>();
    let all = list(ListWorkItemsRequest::default()).await;
    assert_eq!(
        keys(&all),
        ["ORCH-3", "ORCH-2", "ORCH-1"],
        "the latest first"
    );
    assert_eq!(all[0].description, "<p>the description of 3</p>");
    let app = list(ListWorkItemsRequest {
        repo: "acme/app".into(),
        ..ListWorkItemsRequest::default()
    })
    .await;
    assert_eq!(keys(&app), ["ORCH-3", "ORCH-1"]);
    let both = list(ListWorkItemsRequest {
        status: "active".into(),
        stage: "analysis".into(),
        repo: "acme/web".into(),
        ..ListWorkItemsRequest::default()
    })
    .await;
    assert_eq!(keys(&both), ["ORCH-2"]);
    let none = list(ListWorkItemsRequest {
        status: "blocked".into(),
        repo: "acme/web".into(),
        ..ListWorkItemsRequest::default()
    })
    .await;
    assert!(none.is_empty());
    let short = list(ListWorkItemsRequest {
        limit: 1,
        without_description: true,
        ..ListWorkItemsRequest::default()
    })
    .await;
    assert_eq!(keys(&short), ["ORCH-3"]);
    assert_eq!(short[0].description, "", "left out on request");
    assert_eq!(
        (short[0].title.as_str(), short[0].repo.as_str()),
        ("Item 3", "acme/app")
    );
}

/// The loop detector (#18): the analysis gate failing on the same missing artifact three
/// times parks the item as blocked with that reason, even with stage retries left (the
/// retry budget is put back between the failures, as a human's retry would).
async fn the_loop_detector_parks_a_stage_that_fails_the_same_way_three_times(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    h.create().await;
    for n in 1..=2 {
        let (o, why) = h.advance("analyst", "", "").await;
        assert_eq!(o, AdvanceOutcome::Retried, "failure {n}: {why}");
        assert!(why.contains("check_analysis"), "{why}");
        sqlx::query("UPDATE work_items SET stage_retries = 0")
            .execute(&h.svc.engine().db.pool)
            .await
            .expect("a fresh retry budget");
    }
    let (o, why) = h.advance("analyst", "", "").await;
    assert_eq!(o, AdvanceOutcome::Blocked, "{why}");
    assert_eq!(
        why,
        "loop detected: the quality gate of analysis failed the same way 3 times (check_analysis)"
    );
    let item = h.item().await;
    assert_eq!(item.stage_retries, 0, "the budget was not what parked it");
    assert!(
        item.status_reason.starts_with(&why),
        "{}",
        item.status_reason
    );
}

/// The stall watchdog, one pass over items idle for longer than ORCH_STALL_S: a success
/// that never reached AdvanceStage is applied, a failure parks its item, a lost enqueue is
/// enqueued again; an item whose job runs, whose enqueue waits in the outbox, or that moved
/// recently is left alone. Each firing is counted by reason in the snapshot.
async fn the_watchdog_repairs_what_a_seam_lost(storage: TestStorage) {
    let h = harness(storage, 0, false).await;
    for (n, key) in ["ORCH-7", "ORCH-8", "ORCH-9", "ORCH-10", "ORCH-11"]
        .iter()
        .enumerate()
    {
        h.svc
            .create_work_item(Request::new(CreateWorkItemRequest {
                tracker_issue_id: format!("issue-{key}"),
                key: (*key).into(),
                repo: "acme/app".into(),
                ..CreateWorkItemRequest::default()
            }))
            .await
            .expect("create");
        // ORCH-11's enqueue stays in the outbox (the launcher is down, as far as it knows).
        if n < 4 {
            h.deliver_of(key).await;
        }
    }
    let db = &h.svc.engine().db;
    let job_of = |key: &str| {
        let log = h.enqueued.lock().expect("lock");
        format!(
            "job-{}",
            log.iter()
                .position(|r| r.work_item == key)
                .expect("enqueued")
                + 1
        )
    };
    {
        let mut st = h.job_status.lock().expect("lock");
        st.insert(job_of("ORCH-7"), JobStatus::Succeeded);
        st.insert(job_of("ORCH-8"), JobStatus::Failed);
        st.insert(job_of("ORCH-10"), JobStatus::Running);
    }
    h.lost.lock().expect("lock").push(job_of("ORCH-9"));
    h.write("analysis.md", "");
    // Everything but ORCH-10's twin ORCH-12 (created now) has been idle for 11 minutes.
    sqlx::query("UPDATE work_items SET updated_at_ms = updated_at_ms - 660000")
        .execute(&db.pool)
        .await
        .expect("idle");
    sqlx::query("UPDATE outbox SET next_attempt_at_ms = next_attempt_at_ms + 3600000 WHERE work_item = 'ORCH-11'")
        .execute(&db.pool)
        .await
        .expect("hold ORCH-11's enqueue");
    h.svc
        .create_work_item(Request::new(CreateWorkItemRequest {
            tracker_issue_id: "issue-ORCH-12".into(),
            key: "ORCH-12".into(),
            repo: "acme/app".into(),
            ..CreateWorkItemRequest::default()
        }))
        .await
        .expect("create");
    h.deliver_of("ORCH-12").await;
    h.lost.lock().expect("lock").push(job_of("ORCH-12"));

    // The candidates come a page at a time, every one once, the oldest first (items that
    // changed in the same millisecond included).
    sqlx::query("UPDATE work_items SET updated_at_ms = 1000 WHERE key IN ('ORCH-8', 'ORCH-9')")
        .execute(&db.pool)
        .await
        .expect("same millisecond");
    let before = orchestrator_kit::time::now_ms() - 600_000;
    let all: Vec<String> = crate::store::active_since(db, before, None, 100)
        .await
        .expect("all")
        .into_iter()
        .map(|i| i.key)
        .collect();
    assert_eq!(all.len(), 5, "{all:?}");
    assert_eq!(&all[..2], ["ORCH-8", "ORCH-9"]);
    let mut paged = Vec::new();
    let mut cursor: Option<(i64, String)> = None;
    loop {
        let page = crate::store::active_since(
            db,
            before,
            cursor.as_ref().map(|(t, k)| (*t, k.as_str())),
            2,
        )
        .await
        .expect("page");
        let Some(last) = page.last() else { break };
        cursor = Some((last.updated_at_ms, last.key.clone()));
        paged.extend(page.into_iter().map(|i| i.key));
    }
    assert_eq!(paged, all);

    let mut fired = h.svc.engine().stall_watchdog().tick().await.expect("tick");
    fired.sort_by(|a, b| a.0.cmp(&b.0));
    use crate::watchdog::StallReason;
    assert_eq!(
        fired,
        vec![
            ("ORCH-7".to_owned(), StallReason::LatestJobSucceeded),
            ("ORCH-8".to_owned(), StallReason::LatestJobFailed),
            ("ORCH-9".to_owned(), StallReason::NoJob),
        ]
    );
    let get = |key: &'static str| async move {
        crate::store::get(db, key)
            .await
            .expect("get")
            .expect("item")
    };
    assert_eq!(get("ORCH-7").await.status.as_str(), "awaiting_approval");
    let parked = get("ORCH-8").await;
    assert_eq!(parked.status.as_str(), "blocked");
    assert!(
        parked.status_reason.contains("claude: not found on PATH"),
        "{}",
        parked.status_reason
    );
    let again = get("ORCH-9").await;
    assert_eq!(
        (again.status.as_str(), again.expected_agent.as_str()),
        ("active", "analyst")
    );
    for key in ["ORCH-10", "ORCH-11", "ORCH-12"] {
        assert_eq!(get(key).await.status.as_str(), "active", "{key}");
    }
    h.deliver_of("ORCH-9").await;
    let enqueues = h
        .enqueued
        .lock()
        .expect("lock")
        .iter()
        .filter(|r| r.work_item == "ORCH-9")
        .count();
    assert_eq!(enqueues, 2, "ORCH-9 enqueued again");
    // Right after, nothing is stalled any more: the repaired items moved.
    assert!(
        h.svc
            .engine()
            .stall_watchdog()
            .tick()
            .await
            .expect("tick")
            .is_empty()
    );

    let snap = h
        .svc
        .snapshot(Request::new(
            orchestrator_proto::stage_engine::v1::SnapshotRequest {},
        ))
        .await
        .expect("snapshot")
        .into_inner();
    let firings: Vec<(String, u64)> = snap
        .stall_watchdog_firings
        .into_iter()
        .map(|f| (f.reason, f.count))
        .collect();
    assert_eq!(
        firings,
        vec![
            ("latest_job_succeeded".to_owned(), 1),
            ("latest_job_failed".to_owned(), 1),
            ("latest_job_cancelled".to_owned(), 0),
            ("no_job".to_owned(), 1),
        ]
    );
    let items: Vec<(String, u64)> = snap
        .items
        .into_iter()
        .map(|i| (i.status, i.count))
        .collect();
    assert_eq!(
        items,
        vec![
            ("active".to_owned(), 4),
            ("awaiting_approval".to_owned(), 1),
            ("blocked".to_owned(), 1),
            ("done".to_owned(), 0),
            ("cancelled".to_owned(), 0),
        ]
    );
}
