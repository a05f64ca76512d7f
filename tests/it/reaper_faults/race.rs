//! The reaper's flip racing the launcher's own finalize of the same run — exactly one wins,
//! over 1,000 runs — through the real code on both sides: the real `LauncherService` with its
//! dispatcher running real agent processes, served over gRPC on loopback, and the real
//! `ReaperService` calling its `ProbeProcesses`, `GetJob` and `FlipTerminal`. The flip
//! is the backstop's (a job running longer than `max_running`, here zero, so every tick
//! flips every job it finds running): the race is the one where an agent exits while the
//! reaper flips it. The launcher's end of a run (`end_run`) and `FlipTerminal` both go
//! through the guarded write of the launcher's store; nothing here copies it.
//!
//! How a double win would show: both ends write the job `failed` (one attempt allowed) and
//! post the failure on the tracker with their own reason; the tracker's side is faked at
//! the launcher's peer boundary to count those posts raw (stage-engine's `AddComment` is
//! idempotent on the key, and would hide a second one).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use launcher::agent::AgentEnv;
use launcher::peers::Peers;
use launcher::store::{self, Status};
use launcher::{LauncherConfig, LauncherService};
use orchestrator_forge::local::LocalForge;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::{Config, Env, ServiceName};
use orchestrator_proto::launcher::v1::EnqueueRequest;
use orchestrator_proto::launcher::v1::launcher_server::LauncherServer;
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, FinalizeMergeRequest, FinalizeMergeResponse,
};
use orchestrator_proto::post_deploy::v1::TickResponse;
use orchestrator_proto::stage_engine::v1::{
    AddCommentRequest, AdvanceStageRequest, AdvanceStageResponse, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;
use orchestrator_testkit::{TestStorage, on_both_backends};
use reaper::{GrpcPeers, ReaperConfig, ReaperService};
use tokio_util::sync::CancellationToken;
use tonic::Status as RpcStatus;

/// Rounds of `PER_ROUND` jobs at once: 1,000 runs.
const ROUNDS: usize = 50;
const PER_ROUND: usize = 20;

/// The launcher's peers: every failure posted on the tracker, by job id; the rest answers
/// at once.
#[derive(Default)]
struct Tracker {
    failures: Mutex<HashMap<String, Vec<String>>>,
}

#[async_trait]
impl Peers for Tracker {
    async fn record_run(&self, _: RecordRunRequest) -> Result<(), RpcStatus> {
        Ok(())
    }
    async fn finish_comment(&self, _: &str, _: u32) -> Result<String, RpcStatus> {
        Ok(String::new())
    }
    async fn spent_usd(&self, _: &str) -> Result<f64, RpcStatus> {
        Ok(0.0)
    }
    async fn spent_since(&self, _: i64, _: &str) -> Result<f64, RpcStatus> {
        Ok(0.0)
    }
    async fn notify(
        &self,
        _: orchestrator_proto::stage_engine::v1::NotifyRequest,
    ) -> Result<bool, RpcStatus> {
        Ok(true)
    }
    async fn last_run(
        &self,
        _: &str,
    ) -> Result<Option<orchestrator_proto::usage_ledger::v1::AgentRun>, RpcStatus> {
        Ok(None)
    }
    async fn work_item(&self, key: &str) -> Result<WorkItem, RpcStatus> {
        Err(RpcStatus::not_found(key.to_owned()))
    }
    async fn add_comment(&self, r: AddCommentRequest) -> Result<(), RpcStatus> {
        // "launcher:<job id>:<attempt>:failed"
        let parts: Vec<&str> = r.idempotency_key.split(':').collect();
        if let ["launcher", job_id, _, "failed"] = parts.as_slice() {
            self.failures
                .lock()
                .expect("lock")
                .entry((*job_id).to_owned())
                .or_default()
                .push(r.html);
        }
        Ok(())
    }
    async fn advance_stage(
        &self,
        _: AdvanceStageRequest,
    ) -> Result<AdvanceStageResponse, RpcStatus> {
        Ok(AdvanceStageResponse::default())
    }
    async fn report_job_failed(
        &self,
        _: orchestrator_proto::stage_engine::v1::ReportJobFailedRequest,
    ) -> Result<AdvanceStageResponse, RpcStatus> {
        Ok(AdvanceStageResponse::default())
    }
    async fn acquire_lease(
        &self,
        _: AcquireLeaseRequest,
    ) -> Result<AcquireLeaseResponse, RpcStatus> {
        Err(RpcStatus::unimplemented("no deploys here"))
    }
    async fn release_lease(&self, _: &str, _: &str) -> Result<bool, RpcStatus> {
        Ok(false)
    }
    async fn finalize_merge(
        &self,
        _: FinalizeMergeRequest,
    ) -> Result<FinalizeMergeResponse, RpcStatus> {
        Err(RpcStatus::unimplemented("no deploys here"))
    }
    async fn tick(&self, _: &str) -> Result<TickResponse, RpcStatus> {
        Err(RpcStatus::unimplemented("no watches here"))
    }
}

/// Serves the launcher on 127.0.0.1:0; returns clients pointed at it.
async fn serve(svc: LauncherService) -> Clients {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(LauncherServer::new(svc))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    let config = Config::from_env(Env::from_pairs([("ORCH_LAUNCHER_URL", url)])).expect("config");
    Clients::from_config(&config).expect("clients")
}

async fn the_reapers_flip_races_the_launchers_own_finalize(storage: TestStorage) {
    orchestrator_kit::telemetry::init_for_tests();
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("agents")).expect("agents");
    std::fs::write(root.join("agents/developer.md"), "You are the developer.\n").expect("prompt");
    let s = |p: std::path::PathBuf| p.display().to_string();
    let env = Env::from_pairs([
        ("ORCH_WORKDIR", s(root.join("work"))),
        ("ORCH_AGENTS_DIR", s(root.join("agents"))),
        // One process per run that prints nothing: a permanent failure ("no result"). The
        // runs of a round start one after the other, so their exits spread over ~100 ms.
        // Through sh: the flags the launcher adds (the profile's) go to sh, not to sleep.
        ("ORCH_AGENT_COMMAND", "sh -c 'sleep 0.05'".into()),
        ("ORCH_LAUNCHER_GIT", "false".into()),
        ("ORCH_QG_HOOK_ENABLED", "false".into()),
        ("ORCH_MAX_CONCURRENCY", PER_ROUND.to_string()),
        ("ORCH_LAUNCHER_INSTANCE_ID", "race".into()),
        ("ORCH_LAUNCHER_POLL_MS", "50".into()),
        ("ORCH_FORGE", "local".into()),
        ("ORCH_FORGE_LOCAL_DIR", s(root.join("forge"))),
    ]);
    let config = LauncherConfig::from_env(&env).expect("launcher config");
    let db = orchestrator_kit::db::open(
        ServiceName::Launcher,
        &storage.location,
        &launcher::MIGRATOR,
    )
    .await
    .expect("launcher storage");
    let tracker = Arc::new(Tracker::default());
    let svc = LauncherService::from_parts(
        db.clone(),
        config,
        tracker.clone(),
        Arc::new(LocalForge::new(root.join("forge"), "main".into())),
        AgentEnv::from_env(&env, &[]),
    );
    let shutdown = CancellationToken::new();
    svc.supervisor().start(shutdown.clone());
    let clients = serve(svc.clone()).await;
    let reaper_db =
        orchestrator_kit::db::open(ServiceName::Reaper, &storage.location, &reaper::MIGRATOR)
            .await
            .expect("reaper storage");
    let reaper = ReaperService::from_parts(
        reaper_db,
        ReaperConfig {
            max_running: Duration::ZERO,
            lease_reclaim_enabled: false,
            ..ReaperConfig::default()
        },
        Arc::new(GrpcPeers::new(clients)),
    );

    let (mut reaper_won, mut reaper_won_after_exit, mut launcher_won) = (0, 0, 0);
    let (mut flipped, mut lost) = (0, 0);
    for round in 0..ROUNDS {
        let mut ids = Vec::new();
        for k in 0..PER_ROUND {
            let key = format!("RACE-{}", round * PER_ROUND + k);
            let (job, _) = svc
                .enqueue_job(EnqueueRequest {
                    work_item: key.clone(),
                    repo: "acme/app".into(),
                    agent: "developer".into(),
                    stage: "development".into(),
                    payload_json: format!(r#"{{"branch":"orch/{key}"}}"#),
                    max_attempts: 1,
                    ..EnqueueRequest::default()
                })
                .await
                .expect("enqueue");
            ids.push(job.id);
        }
        // The tick lands at a different point of the round each time: before, among and
        // after the agents' exits.
        tokio::time::sleep(Duration::from_millis(((round * 7) % 15) as u64 * 10)).await;
        let tick = reaper.tick().await;
        assert_eq!(tick.errors, 0, "round {round}: {tick:?}");
        flipped += tick.flips_backstop;
        lost += tick.flips_lost;

        let deadline = Instant::now() + Duration::from_secs(60);
        for id in &ids {
            // Ended, and its run's task over (the launcher's post, if it wrote the end, is
            // made by then; the reaper's were made before its tick returned).
            let job = loop {
                let job = store::get(&db, id).await.expect("get").expect("job");
                if job.status != Status::Running
                    && job.status != Status::Queued
                    && svc.supervisor().handle(id).is_none()
                {
                    break job;
                }
                assert!(Instant::now() < deadline, "round {round}: {job:#?}");
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            assert_eq!(job.status, Status::Failed, "{job:#?}");
            // The failure comment follows the end through the launcher's outbox.
            let posts = loop {
                let posts = tracker
                    .failures
                    .lock()
                    .expect("lock")
                    .get(id)
                    .cloned()
                    .unwrap_or_default();
                if !posts.is_empty() {
                    break posts;
                }
                assert!(
                    Instant::now() < deadline,
                    "round {round}: no post for {job:#?}"
                );
                tokio::time::sleep(Duration::from_millis(5)).await;
            };
            assert_eq!(
                posts.len(),
                1,
                "round {round}, job {id}: exactly one end is written, and posted: {posts:#?} {job:#?}"
            );
            let by_reaper = job.outcome == "flipped";
            assert_eq!(
                posts[0].contains("reaper: running for"),
                by_reaper,
                "the post is the winner's: {posts:?} {job:#?}"
            );
            if by_reaper {
                reaper_won += 1;
                // The agent had exited: the launcher was finalizing the run, and lost.
                let log = std::fs::read_to_string(&job.log_path).unwrap_or_default();
                if log.contains("== exit ") {
                    reaper_won_after_exit += 1;
                }
            } else {
                assert_eq!(job.outcome, "permanent", "{job:#?}");
                launcher_won += 1;
            }
        }
    }
    shutdown.cancel();
    let runs = ROUNDS * PER_ROUND;
    assert_eq!(reaper_won + launcher_won, runs);
    assert_eq!(
        flipped, reaper_won as u32,
        "every flip the reaper counts is a job it ended"
    );
    let summary = format!(
        "{runs} runs on {}: the reaper won {reaper_won} ({reaper_won_after_exit} after the agent had exited), \
         the launcher's finalize won {launcher_won} ({lost} of them over a flip that was already on its way)",
        storage.name
    );
    // Both orders happened, including both close calls: the test raced for real.
    assert!(
        reaper_won > 0 && launcher_won > 0 && reaper_won_after_exit > 0 && lost > 0,
        "{summary}"
    );
    println!("{summary}");
}

on_both_backends!(the_reapers_flip_races_the_launchers_own_finalize);
