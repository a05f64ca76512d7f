//! Nothing stays stuck at the seams (issue #20), with real processes: every service is its
//! own `orchestrator serve` process (`orchestrator_testkit::procs`), on SQLite. stage-engine
//! is SIGKILLed while the analyst runs and kept down for a minute after the run ended —
//! far past any finite retry window — then restarted: the launcher's outbox delivers the
//! run's end (RecordRun, the finish comment, AdvanceStage) and the item reaches the human
//! gate, with the finish comment posted once and the usage recorded once.

use std::time::{Duration, Instant};

use orchestrator_forge::RepoName;
use orchestrator_forge::local::LocalForge;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::launcher::v1::{Job, JobStatus, ListJobsRequest, QueueSnapshotRequest};
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, GetWorkItemRequest, ListCommentsRequest,
};
use orchestrator_proto::usage_ledger::v1::WorkItemSummaryRequest;
use orchestrator_testkit::TestStorage;

use crate::common::contracts_dir;

const KEY: &str = "SEAM-1";
const REPO: &str = "acme/app";
/// How long stage-engine stays down after the run ended.
const DOWN: Duration = Duration::from_secs(60);
/// A step on a loaded machine (2 cores shared with other builds).
const STEP: Duration = Duration::from_secs(60);

async fn jobs(c: &Clients) -> Vec<Job> {
    c.launcher
        .clone()
        .list_jobs(ListJobsRequest {
            work_item: KEY.into(),
            ..Default::default()
        })
        .await
        .map(|r| r.into_inner().jobs)
        .unwrap_or_default()
}

async fn until<T, F, Fut>(what: &str, limit: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stage_engine_down_for_a_minute_when_the_analyst_ends_loses_nothing() {
    let storage = TestStorage::sqlite();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let forge_dir = root.join("forge");
    LocalForge::new(forge_dir.clone(), "main".into())
        .init_repo(&RepoName::parse(REPO).expect("repo"))
        .await
        .expect("bare repo");
    std::fs::create_dir_all(root.join("agents")).expect("agents");
    // A prompt for every role: the launcher checks them at start-up.
    for role in stage_engine::pipeline::ROLES {
        std::fs::write(
            root.join("agents").join(format!("{role}.md")),
            format!("You are the {role}.\n"),
        )
        .expect("prompt");
    }
    let sample =
        contracts_dir().join("claude-cli/real-2.1.328/success-with-write-tool.stdout.json");
    // The analyst writes its artifact, then waits for the test's go (stage-engine is dead
    // by then) before it prints its result and ends.
    let go = root.join("go");
    let script = root.join("agent.sh");
    std::fs::write(
        &script,
        format!(
            r#"mkdir -p "$ORCH_ARTIFACTS_DIR"
printf -- '---\nwork_item: %s\n---\n# Analysis\nScripted.\n' "$ORCH_WORK_ITEM" > "$ORCH_ARTIFACTS_DIR/analysis.md"
while [ ! -f {go} ]; do sleep 0.1; done
cat {sample}
"#,
            go = go.display(),
            sample = sample.display()
        ),
    )
    .expect("script");
    let command = format!("sh {}", script.display());
    let agents = root.join("agents").display().to_string();
    let forge = forge_dir.display().to_string();
    let (mut stack, c) = crate::procs::start(
        &storage,
        &root.join("stack"),
        1,
        &[
            ("ORCH_AGENT_COMMAND", &command),
            ("ORCH_AGENTS_DIR", &agents),
            ("ORCH_FORGE", "local"),
            ("ORCH_FORGE_LOCAL_DIR", &forge),
            ("ORCH_QG_HOOK_ENABLED", "false"),
            // The agent waits for the test's go, a file under the test's root that the
            // sandbox would hide (services/launcher/tests/sandbox.rs runs inside it).
            ("ORCH_AGENT_SANDBOX", "off"),
            ("ORCH_LAUNCHER_POLL_MS", "100"),
            ("ORCH_OUTBOX_POLL_MS", "100"),
            ("ORCH_OUTBOX_BACKOFF_BASE_MS", "100"),
            ("ORCH_OUTBOX_BACKOFF_MAX_MS", "1000"),
            // A minute of backoff doubling from 100 ms to 2 s: dozens of refused tries.
            ("ORCH_LAUNCHER_OUTBOX_BACKOFF_BASE_MS", "100"),
            ("ORCH_LAUNCHER_OUTBOX_BACKOFF_MAX_MS", "2000"),
        ],
    )
    .await;
    c.stage_engine
        .clone()
        .create_work_item(CreateWorkItemRequest {
            tracker_issue_id: KEY.into(),
            key: KEY.into(),
            title: "Survive a stage-engine outage".into(),
            repo: REPO.into(),
            ..Default::default()
        })
        .await
        .expect("create");
    let job = until("the analyst runs", STEP, || async {
        jobs(&c)
            .await
            .into_iter()
            .find(|j| j.status == JobStatus::Running as i32 && j.pid.is_some())
    })
    .await;

    stack.kill("stage-engine");
    std::fs::write(&go, "").expect("go");
    let ended = until("the run ends while stage-engine is down", STEP, || async {
        jobs(&c)
            .await
            .into_iter()
            .find(|j| j.id == job.id && j.status != JobStatus::Running as i32)
    })
    .await;
    // Decided locally: the job does not wait for its peer (nor pretend it was told).
    assert_eq!(ended.status, JobStatus::Succeeded as i32, "{ended:?}");
    assert!(!ended.reason.contains("advance_stage"), "{ended:?}");

    tokio::time::sleep(DOWN).await;
    let snap = c
        .launcher
        .clone()
        .queue_snapshot(QueueSnapshotRequest {})
        .await
        .expect("snapshot")
        .into_inner();
    assert!(snap.outbox_pending >= 1, "the advance waits: {snap:?}");
    assert_eq!(snap.outbox_failed, 0, "{snap:?}");

    stack.restart("stage-engine").await.expect("restart");
    let item = until("the item reaches the human gate", STEP, || async {
        c.stage_engine
            .clone()
            .get_work_item(GetWorkItemRequest { key: KEY.into() })
            .await
            .ok()
            .map(|r| r.into_inner())
            .filter(|i| i.status == "awaiting_approval")
    })
    .await;
    assert_eq!(item.stage, "analysis", "{item:?}");

    // The finish comment, once, under the analyst's bot (the local tracker's comments).
    let finish = until("the finish comment", STEP, || async {
        let comments = c
            .stage_engine
            .clone()
            .list_comments(ListCommentsRequest {
                work_item: KEY.into(),
            })
            .await
            .ok()?
            .into_inner()
            .comments;
        let done: Vec<_> = comments
            .into_iter()
            .filter(|c| c.author == "analyst" && c.html.contains("Analyst done"))
            .collect();
        (!done.is_empty()).then_some(done)
    })
    .await;
    // Settle a moment more: a second delivery would have come by now.
    let snap = until("the launcher's outbox drains", STEP, || async {
        let s = c
            .launcher
            .clone()
            .queue_snapshot(QueueSnapshotRequest {})
            .await
            .ok()?
            .into_inner();
        (s.outbox_pending == 0).then_some(s)
    })
    .await;
    assert_eq!(snap.outbox_failed, 0, "{snap:?}");
    assert_eq!(finish.len(), 1, "{finish:?}");
    // The usage, once.
    let summary = c
        .usage_ledger
        .clone()
        .work_item_summary(WorkItemSummaryRequest {
            work_item: KEY.into(),
        })
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(
        summary.total.as_ref().map(|t| t.runs),
        Some(1),
        "{summary:?}"
    );
    assert_eq!(jobs(&c).await.len(), 1);
    assert!(
        stack
            .log("launcher-0")
            .contains("outbox delivery failed; will retry"),
        "the launcher retried while stage-engine was down"
    );
}
