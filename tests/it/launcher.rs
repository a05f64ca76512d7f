//! The launcher in the whole stack, over real gRPC: a work item created in stage-engine
//! is enqueued through its outbox, the launcher runs the analyst (a script that writes the
//! artifact and prints the real CLI output), commits and pushes into a real bare repo,
//! records the usage in usage-ledger, comments through stage-engine under the analyst's
//! bot, and advances the item to the human gate. On SQLite and on PostgreSQL.

use std::time::{Duration, Instant};

use orchestrator_forge::local::LocalForge;
use orchestrator_forge::{Forge, RepoName};
use orchestrator_proto::launcher::v1::{
    GetJobRequest, JobStatus, ListInstancesRequest, ListJobsRequest, QueueSnapshotRequest,
    TailLogRequest,
};
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, GetWorkItemRequest, ListCommentsRequest,
};
use orchestrator_proto::usage_ledger::v1::RunKey;
use orchestrator_testkit::{TestStorage, on_both_backends};
use tokio_stream::StreamExt;

use crate::common::{contracts_dir, start};

const KEY: &str = "ORCH-65";
const REPO: &str = "acme/app";

async fn the_analyst_runs_end_to_end(storage: TestStorage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let forge_dir = root.join("forge");
    LocalForge::new(forge_dir.clone(), "main".into())
        .init_repo(&RepoName::parse(REPO).expect("repo"))
        .await
        .expect("bare repo");
    std::fs::create_dir_all(root.join("agents")).expect("agents");
    // The launcher starts only with a prompt for every role.
    for role in stage_engine::pipeline::ROLES {
        std::fs::write(
            root.join(format!("agents/{role}.md")),
            format!("You are the {role}.\n"),
        )
        .expect("prompt");
    }
    let sample =
        contracts_dir().join("claude-cli/real-2.1.328/success-with-write-tool.stdout.json");
    let script = root.join("agent.sh");
    std::fs::write(
        &script,
        format!(
            r#"echo "$@" > {args}
mkdir -p "$ORCH_ARTIFACTS_DIR"
printf -- '---\nwork_item: %s\n---\n# Analysis\nScripted.\n' "$ORCH_WORK_ITEM" > "$ORCH_ARTIFACTS_DIR/analysis.md"
cat {sample}
"#,
            args = root.join("args").display(),
            sample = sample.display()
        ),
    )
    .expect("script");
    let s = |p: &std::path::Path| p.display().to_string();
    let (agents, work, forge, data) = (
        s(&root.join("agents")),
        s(&root.join("work")),
        s(&forge_dir),
        s(&root.join("data")),
    );
    let command = format!("sh {}", script.display());
    let stack = start(
        storage,
        &[
            ("ORCH_AGENT_COMMAND", &command),
            ("ORCH_AGENTS_DIR", &agents),
            ("ORCH_WORKDIR", &work),
            ("ORCH_FORGE", "local"),
            ("ORCH_FORGE_LOCAL_DIR", &forge),
            ("ORCH_DATA_DIR", &data),
            ("ORCH_OUTBOX_POLL_MS", "50"),
            ("ORCH_LAUNCHER_POLL_MS", "100"),
            // The agent writes its arguments under the test's root, outside its checkout,
            // which the sandbox forbids (services/launcher/tests/sandbox.rs runs inside it).
            ("ORCH_AGENT_SANDBOX", "off"),
        ],
    )
    .await;
    let c = &stack.clients;
    c.stage_engine
        .clone()
        .create_work_item(CreateWorkItemRequest {
            tracker_issue_id: KEY.into(),
            key: KEY.into(),
            title: "Wire up the merge webhook".into(),
            repo: REPO.into(),
            ..Default::default()
        })
        .await
        .expect("create");
    // The item reaches the human gate once the analyst's run is delivered and advanced.
    let deadline = Instant::now() + Duration::from_secs(60);
    let item = loop {
        let item = c
            .stage_engine
            .clone()
            .get_work_item(GetWorkItemRequest { key: KEY.into() })
            .await
            .expect("get")
            .into_inner();
        if item.status == "awaiting_approval" {
            break item;
        }
        assert!(
            Instant::now() < deadline,
            "the analyst never got through: {item:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let jobs = c
        .launcher
        .clone()
        .list_jobs(ListJobsRequest {
            work_item: KEY.into(),
            ..Default::default()
        })
        .await
        .expect("jobs")
        .into_inner()
        .jobs;
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    let job = c
        .launcher
        .clone()
        .get_job(GetJobRequest {
            job_id: jobs[0].id.clone(),
        })
        .await
        .expect("job")
        .into_inner();
    assert_eq!(job.status, JobStatus::Succeeded as i32, "{job:?}");
    assert_eq!(
        (job.agent.as_str(), job.attempt, job.exit_code),
        ("analyst", 1, Some(0))
    );
    assert!(job.pid.is_some());
    // The artifact is on the branch in the bare repo.
    let forge = LocalForge::new(forge_dir, "main".into());
    let text = forge
        .read_file(
            &RepoName::parse(REPO).expect("repo"),
            &item.branch,
            &format!("docs/work-items/{KEY}/analysis.md"),
        )
        .await
        .expect("read")
        .expect("analysis.md is pushed");
    assert!(text.contains("Scripted."));
    // Usage in usage-ledger, from the run's log.
    let run = c
        .usage_ledger
        .clone()
        .get_run(RunKey {
            job_id: job.id.clone(),
            attempt: 1,
        })
        .await
        .expect("run")
        .into_inner();
    assert!(run.result_found);
    assert_eq!(run.total_cost_usd, Some(0.017439999999999997));
    // The analyst's start and finish comments, under its own bot, on the local tracker.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let comments = c
            .stage_engine
            .clone()
            .list_comments(ListCommentsRequest {
                work_item: KEY.into(),
            })
            .await
            .expect("comments")
            .into_inner()
            .comments;
        let by_analyst: Vec<&str> = comments
            .iter()
            .filter(|c| c.author == "analyst")
            .map(|c| c.html.as_str())
            .collect();
        if by_analyst.len() >= 2 {
            assert!(
                by_analyst.iter().any(|h| h.contains("Analyst started")),
                "{by_analyst:?}"
            );
            assert!(
                by_analyst
                    .iter()
                    .any(|h| h.contains("Analyst done") && h.contains("analysis.md")),
                "{by_analyst:?}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "comments: {comments:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The quality gate went to the CLI as its Stop hook, with --settings (never --bare).
    let args = std::fs::read_to_string(root.join("args")).expect("args");
    assert!(
        args.contains("--settings")
            && args.contains("qg-hook")
            && args.contains("--work-item ORCH-65"),
        "{args}"
    );
    assert!(!args.contains("--bare"));
    // An operator's view: the log, the queue, the instance.
    let chunks: Vec<_> = c
        .launcher
        .clone()
        .tail_log(TailLogRequest {
            job_id: job.id.clone(),
            follow: true,
        })
        .await
        .expect("tail")
        .into_inner()
        .collect()
        .await;
    let log: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.as_ref().expect("chunk").data.clone())
        .collect();
    let log = String::from_utf8_lossy(&log);
    assert!(
        log.contains("Analysis written.") && log.contains("== exit 0"),
        "{log}"
    );
    assert!(chunks.last().expect("last").as_ref().expect("chunk").eof);
    let snap = c
        .launcher
        .clone()
        .queue_snapshot(QueueSnapshotRequest {})
        .await
        .expect("snapshot")
        .into_inner();
    let succeeded = snap
        .counts
        .iter()
        .find(|c| c.status == JobStatus::Succeeded as i32)
        .expect("count");
    assert_eq!(succeeded.count, 1);
    assert_eq!(snap.breaker.expect("breaker").state, "closed");
    let instances = c
        .launcher
        .clone()
        .list_instances(ListInstancesRequest {})
        .await
        .expect("instances")
        .into_inner()
        .instances;
    assert_eq!(instances.len(), 1);
}

on_both_backends!(the_analyst_runs_end_to_end);
