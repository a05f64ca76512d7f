//! The launcher alone, against a real database, real agent processes (small shell scripts
//! that print the real CLI output from `shared/contracts/claude-cli/`) and a real bare git
//! repository (the local forge). The other services are a fake at their RPC boundary.

#![allow(dead_code)]

use std::collections::{BTreeMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use launcher::agent::AgentEnv;
use launcher::peers::Peers;
use launcher::store::{self, JobRow, Status as JobState};
use launcher::{LauncherConfig, LauncherService};
use orchestrator_forge::local::LocalForge;
use orchestrator_forge::{Forge, RepoName};
use orchestrator_kit::{Db, Env, ServiceName};
use orchestrator_proto::launcher::v1::EnqueueRequest;
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, FinalizeMergeRequest, FinalizeMergeResponse, Lease,
};
use orchestrator_proto::post_deploy::v1::TickResponse;
use orchestrator_proto::stage_engine::v1::{
    AddCommentRequest, AdvanceOutcome, AdvanceStageRequest, AdvanceStageResponse, NotifyRequest,
    ReportJobFailedRequest, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;
use orchestrator_testkit::TestStorage;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub const KEY: &str = "ORCH-1";
pub const REPO: &str = "acme/app";

/// What the fake peers were asked, and what they answer.
#[derive(Default)]
pub struct FakeState {
    pub record_runs: Vec<RecordRunRequest>,
    /// When each of `record_runs` was recorded (epoch ms), for `SpentSince`.
    pub recorded_at_ms: Vec<i64>,
    /// RecordRun answers UNAVAILABLE this many times first (usage-ledger restarting).
    pub record_run_unavailable: u32,
    pub record_run_calls: u32,
    /// AddComment answers UNAVAILABLE this many times first (stage-engine restarting).
    pub add_comment_unavailable: u32,
    pub comments: Vec<AddCommentRequest>,
    pub notifications: Vec<NotifyRequest>,
    pub advances: Vec<AdvanceStageRequest>,
    pub failures_reported: Vec<ReportJobFailedRequest>,
    /// The calls that succeeded, in order: record_run, add_comment:<key>, advance_stage,
    /// report_job_failed.
    pub calls: Vec<String>,
    /// usage-ledger answers UNAVAILABLE to everything (RecordRun, FinishComment) while set.
    pub usage_ledger_down: bool,
    /// stage-engine answers UNAVAILABLE to everything (AddComment, AdvanceStage,
    /// ReportJobFailed) while set.
    pub stage_engine_down: bool,
    /// Calls answered UNAVAILABLE because their peer was down.
    pub refused_while_down: u32,
    /// AdvanceStage answers this (a permanent refusal) instead, when set.
    pub advance_refusal: Option<tonic::Code>,
    pub spent_usd: f64,
    pub advance_outcome: Option<AdvanceOutcome>,
    /// repo -> holder job id.
    pub leases: BTreeMap<String, String>,
    pub lease_log: Vec<String>,
    pub ticks: VecDeque<Result<TickResponse, Status>>,
    /// While set, each Tick first waits for a permit of it (a slow post-deploy).
    pub tick_gate: Option<Arc<tokio::sync::Semaphore>>,
    pub tick_calls: u32,
    pub ticked: Vec<String>,
    pub finalizes: VecDeque<Result<FinalizeMergeResponse, Status>>,
    pub finalize_calls: Vec<FinalizeMergeRequest>,
}

impl FakeState {
    fn usage_ledger(&mut self) -> Result<(), Status> {
        if self.usage_ledger_down {
            self.refused_while_down += 1;
            return Err(Status::unavailable("usage-ledger: tcp connect error"));
        }
        Ok(())
    }

    fn stage_engine(&mut self) -> Result<(), Status> {
        if self.stage_engine_down {
            self.refused_while_down += 1;
            return Err(Status::unavailable("stage-engine: tcp connect error"));
        }
        Ok(())
    }
}

#[derive(Default)]
pub struct FakePeers(pub Mutex<FakeState>);

impl FakePeers {
    pub fn with<T>(&self, f: impl FnOnce(&mut FakeState) -> T) -> T {
        f(&mut self.0.lock().expect("lock"))
    }
}

#[async_trait]
impl Peers for FakePeers {
    async fn record_run(&self, request: RecordRunRequest) -> Result<(), Status> {
        self.with(|s| {
            s.record_run_calls += 1;
            s.usage_ledger()?;
            if s.record_run_unavailable > 0 {
                s.record_run_unavailable -= 1;
                return Err(Status::unavailable("tcp connect error"));
            }
            s.calls.push("record_run".to_owned());
            s.record_runs.push(request);
            s.recorded_at_ms.push(orchestrator_kit::time::now_ms());
            Ok(())
        })
    }

    async fn finish_comment(&self, _job_id: &str, _attempt: u32) -> Result<String, Status> {
        self.with(|s| s.usage_ledger())?;
        Ok("Agent done · 1.2k in (1.0k cached) / 0.1k out · $0.02".to_owned())
    }

    async fn spent_usd(&self, _work_item: &str) -> Result<f64, Status> {
        Ok(self.with(|s| s.spent_usd))
    }

    /// What the recorded runs cost, read from their output as usage-ledger reads it.
    async fn spent_since(&self, since_ms: i64, repo: &str) -> Result<f64, Status> {
        self.with(|s| {
            s.usage_ledger()?;
            Ok(s.record_runs
                .iter()
                .zip(&s.recorded_at_ms)
                .filter(|(r, at)| **at >= since_ms && (repo.is_empty() || r.repo == repo))
                .filter_map(|(r, _)| {
                    orchestrator_agent_output::parse_result(&r.output)
                        .and_then(|p| p.total_cost_usd)
                })
                .sum())
        })
    }

    /// The job's latest recorded run, its session read from the output as usage-ledger
    /// reads it.
    async fn last_run(
        &self,
        job_id: &str,
    ) -> Result<Option<orchestrator_proto::usage_ledger::v1::AgentRun>, Status> {
        self.with(|s| {
            s.usage_ledger()?;
            Ok(s.record_runs
                .iter()
                .rev()
                .find(|r| r.job_id == job_id)
                .map(|r| orchestrator_proto::usage_ledger::v1::AgentRun {
                    job_id: r.job_id.clone(),
                    attempt: r.attempt,
                    session_id: orchestrator_agent_output::parse_result(&r.output)
                        .and_then(|p| p.session_id),
                    recorded_at_ms: orchestrator_kit::time::now_ms(),
                    ..Default::default()
                }))
        })
    }

    async fn work_item(&self, key: &str) -> Result<WorkItem, Status> {
        Err(Status::not_found(format!("work item {key} not found")))
    }

    async fn add_comment(&self, request: AddCommentRequest) -> Result<(), Status> {
        self.with(|s| {
            s.stage_engine()?;
            if s.add_comment_unavailable > 0 {
                s.add_comment_unavailable -= 1;
                return Err(Status::unavailable("tcp connect error"));
            }
            s.calls
                .push(format!("add_comment:{}", request.idempotency_key));
            s.comments.push(request);
            Ok(())
        })
    }

    /// Records every call; `created` is false for an event id seen before, as stage-engine
    /// answers.
    async fn notify(&self, request: NotifyRequest) -> Result<bool, Status> {
        self.with(|s| {
            s.stage_engine()?;
            let created = !s
                .notifications
                .iter()
                .any(|n| n.event_id == request.event_id);
            s.calls.push(format!("notify:{}", request.event_id));
            s.notifications.push(request);
            Ok(created)
        })
    }

    async fn advance_stage(
        &self,
        request: AdvanceStageRequest,
    ) -> Result<AdvanceStageResponse, Status> {
        let outcome = self.with(|s| {
            s.stage_engine()?;
            if let Some(code) = s.advance_refusal {
                return Err(Status::new(code, "refused"));
            }
            s.calls.push("advance_stage".to_owned());
            s.advances.push(request);
            Ok(s.advance_outcome.unwrap_or(AdvanceOutcome::Advanced))
        })?;
        Ok(AdvanceStageResponse {
            outcome: outcome as i32,
            ..AdvanceStageResponse::default()
        })
    }

    async fn report_job_failed(
        &self,
        request: ReportJobFailedRequest,
    ) -> Result<AdvanceStageResponse, Status> {
        self.with(|s| {
            s.stage_engine()?;
            s.calls.push("report_job_failed".to_owned());
            s.failures_reported.push(request);
            Ok(AdvanceStageResponse {
                outcome: AdvanceOutcome::Blocked as i32,
                ..AdvanceStageResponse::default()
            })
        })
    }

    async fn acquire_lease(&self, r: AcquireLeaseRequest) -> Result<AcquireLeaseResponse, Status> {
        Ok(self.with(|s| {
            let holder = s.leases.get(&r.repo).cloned();
            let acquired = holder.is_none() || holder.as_deref() == Some(r.holder_job_id.as_str());
            if acquired {
                s.leases.insert(r.repo.clone(), r.holder_job_id.clone());
                s.lease_log.push(format!("acquire {}", r.holder_job_id));
            }
            AcquireLeaseResponse {
                acquired,
                lease: Some(Lease {
                    repo: r.repo.clone(),
                    holder_job_id: s.leases[&r.repo].clone(),
                    ..Lease::default()
                }),
                took_over_stale: false,
            }
        }))
    }

    async fn release_lease(&self, repo: &str, holder_job_id: &str) -> Result<bool, Status> {
        Ok(self.with(|s| {
            if s.leases.get(repo).map(String::as_str) == Some(holder_job_id) {
                s.leases.remove(repo);
                s.lease_log.push(format!("release {holder_job_id}"));
                true
            } else {
                false
            }
        }))
    }

    async fn finalize_merge(
        &self,
        request: FinalizeMergeRequest,
    ) -> Result<FinalizeMergeResponse, Status> {
        self.with(|s| {
            s.finalize_calls.push(request);
            s.finalizes
                .pop_front()
                .unwrap_or_else(|| Err(Status::unimplemented("merge-gate is not built")))
        })
    }

    async fn tick(&self, work_item: &str) -> Result<TickResponse, Status> {
        let gate = self.with(|s| {
            s.tick_calls += 1;
            s.ticked.push(work_item.to_owned());
            s.tick_gate.clone()
        });
        if let Some(gate) = gate {
            gate.acquire().await.expect("tick gate").forget();
        }
        self.with(|s| {
            s.ticks.pop_front().unwrap_or_else(|| {
                Ok(TickResponse {
                    done: true,
                    ..TickResponse::default()
                })
            })
        })
    }
}

/// `shared/contracts/claude-cli`, beside the repository (or `ORCH_CONTRACTS_DIR`).
pub fn contracts() -> PathBuf {
    orchestrator_testkit::contracts_dir().join("claude-cli")
}

/// A launcher over fresh storage, with its own work dir, prompts and local forge.
pub struct H {
    pub svc: LauncherService,
    pub peers: Arc<FakePeers>,
    pub db: Db,
    pub root: PathBuf,
    pub forge: LocalForge,
    pub shutdown: CancellationToken,
    pub storage: Arc<TestStorage>,
    _dir: Arc<tempfile::TempDir>,
}

impl Drop for H {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// The variables every test launcher runs with (short waits), before the test's own.
fn base_env(root: &Path, instance: &str) -> Vec<(String, String)> {
    [
        ("ORCH_WORKDIR", root.join("work").display().to_string()),
        ("ORCH_AGENTS_DIR", root.join("agents").display().to_string()),
        ("ORCH_FORGE", "local".to_owned()),
        (
            "ORCH_FORGE_LOCAL_DIR",
            root.join("forge").display().to_string(),
        ),
        (
            "ORCH_AGENT_COMMAND",
            format!("sh {}", root.join("agent.sh").display()),
        ),
        ("ORCH_QG_HOOK_ENABLED", "false".to_owned()),
        // These tests' agents report through files under the test's root, outside their
        // checkout, which the sandbox forbids: tests/sandbox.rs runs agents inside it.
        ("ORCH_AGENT_SANDBOX", "off".to_owned()),
        // What the scripted agents print: readable in the sandbox wherever the clone is
        // (under /tmp, which the sandbox replaces with the agent's own).
        (
            "ORCH_AGENT_SANDBOX_READ_ONLY",
            contracts().display().to_string(),
        ),
        ("ORCH_LAUNCHER_POLL_MS", "200".to_owned()),
        ("ORCH_LAUNCHER_HEARTBEAT_MS", "200".to_owned()),
        ("ORCH_LAUNCHER_INSTANCE_STALE_MS", "2000".to_owned()),
        ("ORCH_BACKOFF_BASE_S", "0.05".to_owned()),
        ("ORCH_BACKOFF_MAX_S", "0.2".to_owned()),
        ("ORCH_AGENT_KILL_GRACE_SECONDS", "0.5".to_owned()),
        ("ORCH_AGENT_TIMEOUT_SECONDS", "30".to_owned()),
        ("ORCH_LAUNCHER_INSTANCE_ID", instance.to_owned()),
        ("ORCH_LEASE_RETRY_S", "0.1".to_owned()),
        ("ORCH_LAUNCHER_OUTBOX_POLL_MS", "100".to_owned()),
        ("ORCH_LAUNCHER_OUTBOX_BACKOFF_BASE_MS", "10".to_owned()),
        ("ORCH_LAUNCHER_OUTBOX_BACKOFF_MAX_MS", "50".to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Writes the agent script: `{contracts}` and `{root}` are replaced by their paths.
pub fn write_script(root: &Path, name: &str, body: &str) -> PathBuf {
    let path = root.join(name);
    let text = body
        .replace("{contracts}", &contracts().display().to_string())
        .replace("{root}", &root.display().to_string());
    std::fs::write(&path, format!("#!/bin/sh\n{text}\n")).expect("write script");
    path
}

impl H {
    /// Starts a launcher whose agent is `script` (a sh body), with `vars` on top.
    pub async fn start(storage: TestStorage, script: &str, vars: &[(&str, &str)]) -> H {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        let storage = Arc::new(storage);
        Self::start_on(storage, dir, "test-instance", script, vars).await
    }

    /// Starts a launcher on shared storage and a shared root (several instances).
    pub async fn start_on(
        storage: Arc<TestStorage>,
        dir: Arc<tempfile::TempDir>,
        instance: &str,
        script: &str,
        vars: &[(&str, &str)],
    ) -> H {
        let peers = Arc::new(FakePeers::default());
        Self::start_with(storage, dir, instance, script, vars, peers).await
    }

    /// [`Self::start_on`] with peers set up beforehand (e.g. down from the start).
    pub async fn start_with(
        storage: Arc<TestStorage>,
        dir: Arc<tempfile::TempDir>,
        instance: &str,
        script: &str,
        vars: &[(&str, &str)],
        peers: Arc<FakePeers>,
    ) -> H {
        orchestrator_kit::telemetry::init_for_tests();
        let root = dir.path().to_path_buf();
        std::fs::create_dir_all(root.join("agents")).expect("agents dir");
        for role in [
            "analyst",
            "architect",
            "developer",
            "reviewer",
            "tester",
            "deployer",
            "noop",
        ] {
            std::fs::write(
                root.join("agents").join(format!("{role}.md")),
                format!("You are the {role}.\n"),
            )
            .expect("prompt");
        }
        if !script.is_empty() {
            write_script(&root, "agent.sh", script);
        }
        let forge = LocalForge::new(root.join("forge"), "main".into());
        forge
            .init_repo(&RepoName::parse(REPO).expect("repo"))
            .await
            .expect("bare repo");
        let mut env = Env::from_pairs(base_env(&root, instance));
        for (k, v) in vars {
            env = env.with(*k, *v);
        }
        let config = LauncherConfig::from_env(&env).expect("config");
        let db = orchestrator_kit::db::open(
            ServiceName::Launcher,
            &storage.location,
            &launcher::MIGRATOR,
        )
        .await
        .expect("storage");
        let svc = LauncherService::from_parts(
            db.clone(),
            config,
            peers.clone(),
            Arc::new(forge.clone()) as Arc<dyn Forge>,
            AgentEnv::from_env(&env, &[]),
        );
        let shutdown = CancellationToken::new();
        svc.supervisor().start(shutdown.clone());
        H {
            svc,
            peers,
            db,
            root,
            forge,
            shutdown,
            storage,
            _dir: dir,
        }
    }

    /// Enqueues `agent` for KEY on REPO with `payload` (JSON text).
    pub async fn enqueue(&self, agent: &str, stage: &str, payload: &str) -> JobRow {
        self.svc
            .enqueue_job(EnqueueRequest {
                work_item: KEY.into(),
                repo: REPO.into(),
                agent: agent.into(),
                stage: stage.into(),
                payload_json: payload.into(),
                ..EnqueueRequest::default()
            })
            .await
            .expect("enqueue")
            .0
    }

    pub async fn job(&self, id: &str) -> JobRow {
        store::get(&self.db, id)
            .await
            .expect("get")
            .expect("job exists")
    }

    /// Polls the job until `pred` holds (panics with the job at the deadline).
    pub async fn wait_for(
        &self,
        id: &str,
        within: Duration,
        pred: impl Fn(&JobRow) -> bool,
    ) -> JobRow {
        let deadline = Instant::now() + within;
        loop {
            let j = self.job(id).await;
            if pred(&j) {
                return j;
            }
            assert!(
                Instant::now() < deadline,
                "job did not get there within {within:?}: {j:#?}\nlog:\n{}",
                std::fs::read_to_string(&j.log_path).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits for the job to reach a terminal status.
    pub async fn wait_done(&self, id: &str, within: Duration) -> JobRow {
        self.wait_for(id, within, |j| j.status.is_terminal()).await
    }

    /// Waits until the outbox has delivered (or dead-lettered) every entry.
    pub async fn outbox_drained(&self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let mut waiting = Vec::new();
            for state in ["pending", "delivering"] {
                waiting.extend(
                    launcher::outbox::OUTBOX
                        .list(&self.db, "", state, 100)
                        .await
                        .expect("outbox"),
                );
            }
            if waiting.is_empty() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the outbox did not drain: {waiting:#?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self, j: &JobRow) -> String {
        std::fs::read_to_string(&j.log_path).unwrap_or_default()
    }
}

/// Waits until `f` holds.
pub async fn eventually(within: Duration, what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !f() {
        assert!(Instant::now() < deadline, "{what}: not within {within:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn is(s: JobState) -> impl Fn(&JobRow) -> bool {
    move |j| j.status == s
}

/// A script line that writes the analyst-style artifact of `name` for the work item.
pub const WRITE_ARTIFACT: &str = r#"mkdir -p "docs/work-items/$ORCH_WORK_ITEM" && printf -- '---\nwork_item: %s\n---\nwork\n' "$ORCH_WORK_ITEM" > "docs/work-items/$ORCH_WORK_ITEM/development.md""#;

impl H {
    /// Enqueues `agent` for work item `key` on REPO.
    pub async fn enqueue_for(&self, key: &str, agent: &str, stage: &str, payload: &str) -> JobRow {
        self.svc
            .enqueue_job(EnqueueRequest {
                work_item: key.into(),
                repo: REPO.into(),
                agent: agent.into(),
                stage: stage.into(),
                payload_json: payload.into(),
                ..EnqueueRequest::default()
            })
            .await
            .expect("enqueue")
            .0
    }

    /// `GetJob`, through the RPC (with what only the RPC fills, e.g. `pending_effects`).
    pub async fn get_job(&self, id: &str) -> orchestrator_proto::launcher::v1::Job {
        use orchestrator_proto::launcher::v1::launcher_server::Launcher;
        self.svc
            .get_job(tonic::Request::new(
                orchestrator_proto::launcher::v1::GetJobRequest {
                    job_id: id.to_owned(),
                },
            ))
            .await
            .expect("get job")
            .into_inner()
    }

    /// The queue's snapshot, through the RPC.
    pub async fn snapshot(&self) -> orchestrator_proto::launcher::v1::QueueSnapshotResponse {
        use orchestrator_proto::launcher::v1::launcher_server::Launcher;
        self.svc
            .queue_snapshot(tonic::Request::new(Default::default()))
            .await
            .expect("snapshot")
            .into_inner()
    }
}

/// A directory outside /tmp, removed on drop: the sandbox gives an agent a /tmp of its own,
/// so what a test hides from it must live elsewhere for the hiding to be what is tested —
/// under /var/tmp, not target/, which a CI clone puts under /tmp.
pub fn outside_tmp() -> tempfile::TempDir {
    let base = std::path::Path::new("/var/tmp/orchestrator-tests");
    std::fs::create_dir_all(base).expect("/var/tmp/orchestrator-tests");
    tempfile::tempdir_in(base).expect("a directory outside /tmp")
}
