//! The reaper's world, faked at the gRPC boundary with the generated server traits:
//! - a launcher whose jobs live in a real table (SQLite or PostgreSQL, like the real one)
//!   and whose `FlipTerminal` is the guarded UPDATE of ARCHITECTURE §3.2
//!   (`WHERE id = ? AND status = 'running' AND attempt = ?`); liveness comes from what the
//!   test sets, or from a real pid (`kill(pid, 0)`, as a launcher judges its own children);
//! - a stage-engine answering `AdvanceStage` (down or refusing on demand);
//! - a merge-gate answering `ReclaimStaleLeases`.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use orchestrator_kit::clients::Clients;
use orchestrator_kit::time::now_ms;
use orchestrator_kit::{Config, Db, Env, ServiceName};
use orchestrator_proto::launcher::v1::launcher_server::{Launcher, LauncherServer};
use orchestrator_proto::launcher::v1::{
    FlipTerminalRequest, FlipTerminalResponse, GetJobRequest, Job, JobKind, JobStatus, Liveness,
    ProbeProcessesRequest, ProbeProcessesResponse, ProcessProbe,
};
use orchestrator_proto::merge_gate::v1::merge_gate_server::{MergeGate, MergeGateServer};
use orchestrator_proto::merge_gate::v1::{
    Lease, ReclaimStaleLeasesRequest, ReclaimStaleLeasesResponse,
};
use orchestrator_proto::stage_engine::v1::stage_engine_server::{StageEngine, StageEngineServer};
use orchestrator_proto::stage_engine::v1::{
    AdvanceOutcome, AdvanceStageRequest, AdvanceStageResponse,
};
use orchestrator_testkit::TestStorage;
use reaper::{GrpcPeers, MIGRATOR, ReaperConfig, ReaperService};
use sqlx::Row;
use tonic::{Request, Response, Status};

static FAKE_LAUNCHER: sqlx::migrate::Migrator = sqlx::migrate!("./tests/ticks/fake_launcher");

/// A job as the test creates it.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub attempt: u32,
    pub kind: JobKind,
    pub work_item: String,
    pub agent: String,
    pub payload_json: String,
    pub started_at_ms: i64,
    pub instance_id: String,
    /// A real process to judge (0: use the liveness the test sets).
    pub pid: i64,
}

impl NewJob {
    pub fn llm(id: &str) -> NewJob {
        NewJob {
            id: id.into(),
            attempt: 1,
            kind: JobKind::Llm,
            work_item: "ORCH-1".into(),
            agent: "developer".into(),
            payload_json: r#"{"dedupe_key":"ORCH-1:t1:developer","stage":"development"}"#.into(),
            started_at_ms: now_ms(),
            instance_id: "launcher-1".into(),
            pid: 0,
        }
    }
}

/// A job as the fake keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredJob {
    pub status: String,
    pub attempt: u32,
    pub outcome: String,
    pub reason: String,
    pub exit_code: String,
    pub killed: bool,
    pub finished_by: String,
}

#[derive(Default)]
pub struct Probes {
    /// job id -> (liveness, exit code) for jobs without a pid.
    pub set: HashMap<String, (Liveness, Option<i32>)>,
    /// Jobs whose FlipTerminal fails (INTERNAL).
    pub flip_fails: HashSet<String>,
    /// Jobs the launcher finishes itself right after it probed them.
    pub finish_after_probe: HashSet<String>,
    /// ProbeProcesses fails (UNAVAILABLE).
    pub down: bool,
}

#[derive(Clone)]
pub struct FakeLauncher {
    pub db: Db,
    pub probes: Arc<Mutex<Probes>>,
    /// Every FlipTerminal request received.
    pub flips: Arc<Mutex<Vec<FlipTerminalRequest>>>,
}

fn pid_alive(pid: i64) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks whether the pid exists.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0
}

fn kind_str(k: JobKind) -> &'static str {
    match k {
        JobKind::Reserved => "reserved",
        _ => "llm",
    }
}

impl FakeLauncher {
    pub async fn insert(&self, j: &NewJob) {
        sqlx::query(
            "INSERT INTO jobs (id, attempt, status, kind, work_item, agent, payload_json, \
               started_at_ms, instance_id, pid, outcome, reason, exit_code, killed, finished_by) \
             VALUES ($1, $2, 'running', $3, $4, $5, $6, $7, $8, $9, '', '', '', 0, '')",
        )
        .bind(&j.id)
        .bind(i64::from(j.attempt))
        .bind(kind_str(j.kind))
        .bind(&j.work_item)
        .bind(&j.agent)
        .bind(&j.payload_json)
        .bind(j.started_at_ms)
        .bind(&j.instance_id)
        .bind(j.pid)
        .execute(&self.db.pool)
        .await
        .expect("insert job");
    }

    pub fn set(&self, job_id: &str, liveness: Liveness, exit_code: Option<i32>) {
        self.probes
            .lock()
            .expect("lock")
            .set
            .insert(job_id.into(), (liveness, exit_code));
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut Probes) -> R) -> R {
        f(&mut self.probes.lock().expect("lock"))
    }

    /// The guarded terminal flip, as the launcher writes it. Returns whether it changed the
    /// job (one row).
    pub async fn guarded_flip(&self, r: &FlipTerminalRequest, by: &str) -> bool {
        let (status, outcome) = match r.outcome() {
            JobStatus::Succeeded => ("succeeded", "SUCCEEDED"),
            _ => ("failed", "FAILED"),
        };
        let done = sqlx::query(
            "UPDATE jobs SET status = $1, outcome = $2, reason = $3, exit_code = $4, \
               killed = $5, finished_by = $6 \
             WHERE id = $7 AND status = 'running' AND attempt = $8",
        )
        .bind(status)
        .bind(outcome)
        .bind(&r.reason)
        .bind(r.exit_code.map(|c| c.to_string()).unwrap_or_default())
        .bind(i64::from(r.kill_process_group))
        .bind(by)
        .bind(&r.job_id)
        .bind(i64::from(r.attempt))
        .execute(&self.db.pool)
        .await
        .expect("guarded flip");
        done.rows_affected() == 1
    }

    /// The launcher's own finalize of an attempt (the reaper's competitor).
    pub async fn finalize(&self, job_id: &str, attempt: u32) -> bool {
        let r = FlipTerminalRequest {
            job_id: job_id.into(),
            attempt,
            outcome: JobStatus::Succeeded as i32,
            reason: "finalized by the launcher".into(),
            exit_code: Some(0),
            kill_process_group: false,
        };
        self.guarded_flip(&r, "launcher").await
    }

    pub async fn job(&self, job_id: &str) -> StoredJob {
        let r = sqlx::query(
            "SELECT status, attempt, outcome, reason, exit_code, killed, finished_by FROM jobs WHERE id = $1",
        )
        .bind(job_id)
        .fetch_one(&self.db.pool)
        .await
        .expect("job");
        StoredJob {
            status: r.get("status"),
            attempt: u32::try_from(r.get::<i64, _>("attempt")).expect("attempt"),
            outcome: r.get("outcome"),
            reason: r.get("reason"),
            exit_code: r.get("exit_code"),
            killed: r.get::<i64, _>("killed") == 1,
            finished_by: r.get("finished_by"),
        }
    }

    async fn running(&self) -> Vec<(Job, i64)> {
        let rows = sqlx::query(
            "SELECT id, attempt, kind, work_item, agent, payload_json, started_at_ms, instance_id, pid \
             FROM jobs WHERE status = 'running' ORDER BY id",
        )
        .fetch_all(&self.db.pool)
        .await
        .expect("running");
        rows.iter()
            .map(|r| {
                let pid: i64 = r.get("pid");
                let job = Job {
                    id: r.get("id"),
                    attempt: u32::try_from(r.get::<i64, _>("attempt")).unwrap_or_default(),
                    kind: if r.get::<String, _>("kind") == "reserved" {
                        JobKind::Reserved
                    } else {
                        JobKind::Llm
                    } as i32,
                    work_item: r.get("work_item"),
                    agent: r.get("agent"),
                    payload_json: r.get("payload_json"),
                    status: JobStatus::Running as i32,
                    started_at_ms: r.get("started_at_ms"),
                    instance_id: r.get("instance_id"),
                    pid: (pid > 0).then_some(pid),
                    ..Job::default()
                };
                (job, pid)
            })
            .collect()
    }
}

#[tonic::async_trait]
impl Launcher for FakeLauncher {
    async fn probe_processes(
        &self,
        _request: Request<ProbeProcessesRequest>,
    ) -> Result<Response<ProbeProcessesResponse>, Status> {
        if self.probes.lock().expect("lock").down {
            return Err(Status::unavailable("launcher down"));
        }
        let running = self.running().await;
        let (out, finishing) = {
            let probes = self.probes.lock().expect("lock");
            let out: Vec<ProcessProbe> = running
                .into_iter()
                .filter_map(|(j, pid)| {
                    let (liveness, exit_code) = if pid > 0 {
                        (
                            if pid_alive(pid) {
                                Liveness::Alive
                            } else {
                                Liveness::Dead
                            },
                            None,
                        )
                    } else {
                        *probes.set.get(&j.id)?
                    };
                    Some(ProcessProbe {
                        job_id: j.id.clone(),
                        attempt: j.attempt,
                        instance_id: j.instance_id.clone(),
                        pid: j.pid,
                        liveness: liveness as i32,
                        exit_code,
                        started_at_ms: j.started_at_ms,
                    })
                })
                .collect();
            let finishing: Vec<String> = probes.finish_after_probe.iter().cloned().collect();
            (out, finishing)
        };
        for id in finishing {
            self.finalize(&id, 1).await;
        }
        Ok(Response::new(ProbeProcessesResponse { probes: out }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = request.into_inner().job_id;
        let r = sqlx::query(
            "SELECT id, attempt, status, kind, work_item, agent, payload_json, started_at_ms, \
               instance_id, pid FROM jobs WHERE id = $1",
        )
        .bind(&id)
        .fetch_optional(&self.db.pool)
        .await
        .map_err(|e| Status::internal(e.to_string()))?
        .ok_or_else(|| Status::not_found(format!("job {id} not found")))?;
        let pid: i64 = r.get("pid");
        Ok(Response::new(Job {
            id: r.get("id"),
            attempt: u32::try_from(r.get::<i64, _>("attempt")).unwrap_or_default(),
            status: match r.get::<String, _>("status").as_str() {
                "running" => JobStatus::Running,
                "succeeded" => JobStatus::Succeeded,
                _ => JobStatus::Failed,
            } as i32,
            kind: if r.get::<String, _>("kind") == "reserved" {
                JobKind::Reserved
            } else {
                JobKind::Llm
            } as i32,
            work_item: r.get("work_item"),
            agent: r.get("agent"),
            payload_json: r.get("payload_json"),
            started_at_ms: r.get("started_at_ms"),
            instance_id: r.get("instance_id"),
            pid: (pid > 0).then_some(pid),
            ..Job::default()
        }))
    }

    async fn flip_terminal(
        &self,
        request: Request<FlipTerminalRequest>,
    ) -> Result<Response<FlipTerminalResponse>, Status> {
        let r = request.into_inner();
        self.flips.lock().expect("lock").push(r.clone());
        if self
            .probes
            .lock()
            .expect("lock")
            .flip_fails
            .contains(&r.job_id)
        {
            return Err(Status::internal("launcher storage error"));
        }
        if !matches!(r.outcome(), JobStatus::Succeeded | JobStatus::Failed) {
            return Err(Status::invalid_argument(format!(
                "outcome {:?}",
                r.outcome()
            )));
        }
        let flipped = self.guarded_flip(&r, "reaper").await;
        Ok(Response::new(FlipTerminalResponse { flipped, job: None }))
    }
}

#[derive(Clone, Default)]
pub struct FakeStageEngine {
    pub advanced: Arc<Mutex<Vec<AdvanceStageRequest>>>,
    pub down: Arc<Mutex<bool>>,
}

#[tonic::async_trait]
impl StageEngine for FakeStageEngine {
    async fn advance_stage(
        &self,
        request: Request<AdvanceStageRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        if *self.down.lock().expect("lock") {
            return Err(Status::unavailable("stage-engine down"));
        }
        let r = request.into_inner();
        self.advanced.lock().expect("lock").push(r.clone());
        if r.work_item == "GONE-1" {
            return Err(Status::not_found("work item GONE-1 not found"));
        }
        if r.work_item == "LOST-1" {
            return Err(Status::data_loss("work item LOST-1 lost its row"));
        }
        if r.work_item == "TOKEN-1" {
            return Err(Status::unauthenticated("bad internal token"));
        }
        Ok(Response::new(AdvanceStageResponse {
            outcome: AdvanceOutcome::Advanced as i32,
            ..AdvanceStageResponse::default()
        }))
    }
}

#[derive(Clone, Default)]
pub struct FakeMergeGate {
    pub requests: Arc<Mutex<Vec<ReclaimStaleLeasesRequest>>>,
    /// job id -> repo of a lease it holds.
    pub holders: Arc<Mutex<HashMap<String, String>>>,
    pub down: Arc<Mutex<bool>>,
}

#[tonic::async_trait]
impl MergeGate for FakeMergeGate {
    async fn reclaim_stale_leases(
        &self,
        request: Request<ReclaimStaleLeasesRequest>,
    ) -> Result<Response<ReclaimStaleLeasesResponse>, Status> {
        if *self.down.lock().expect("lock") {
            return Err(Status::unavailable("merge-gate down"));
        }
        let r = request.into_inner();
        self.requests.lock().expect("lock").push(r.clone());
        let mut holders = self.holders.lock().expect("lock");
        let reclaimed = r
            .dead_job_ids
            .iter()
            .filter_map(|id| {
                holders.remove(id).map(|repo| Lease {
                    repo,
                    holder_job_id: id.clone(),
                    ..Lease::default()
                })
            })
            .collect();
        Ok(Response::new(ReclaimStaleLeasesResponse { reclaimed }))
    }
}

async fn serve(router: tonic::transport::server::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    format!("http://{addr}")
}

/// The fakes, served, and the reaper's own storage.
pub struct World {
    pub launcher: FakeLauncher,
    pub stage: FakeStageEngine,
    pub gate: FakeMergeGate,
    pub db: Db,
    pub clients: Clients,
    _storage: TestStorage,
}

impl World {
    pub async fn new(storage: TestStorage) -> World {
        orchestrator_kit::telemetry::init_for_tests();
        let db = orchestrator_kit::db::open(ServiceName::Reaper, &storage.location, &MIGRATOR)
            .await
            .expect("reaper db");
        let launcher_db =
            orchestrator_kit::db::open(ServiceName::Launcher, &storage.location, &FAKE_LAUNCHER)
                .await
                .expect("launcher db");
        let launcher = FakeLauncher {
            db: launcher_db,
            probes: Arc::default(),
            flips: Arc::default(),
        };
        let stage = FakeStageEngine::default();
        let gate = FakeMergeGate::default();
        let launcher_url = serve(
            tonic::transport::Server::builder().add_service(LauncherServer::new(launcher.clone())),
        )
        .await;
        let stage_url = serve(
            tonic::transport::Server::builder().add_service(StageEngineServer::new(stage.clone())),
        )
        .await;
        let gate_url = serve(
            tonic::transport::Server::builder().add_service(MergeGateServer::new(gate.clone())),
        )
        .await;
        let config = Config::from_env(Env::from_pairs([
            ("ORCH_LAUNCHER_URL", launcher_url),
            ("ORCH_STAGE_ENGINE_URL", stage_url),
            ("ORCH_MERGE_GATE_URL", gate_url),
        ]))
        .expect("config");
        World {
            launcher,
            stage,
            gate,
            db,
            clients: Clients::from_config(&config).expect("clients"),
            _storage: storage,
        }
    }

    /// A reaper over this world (a new one over the same storage is a restart).
    pub fn reaper(&self, config: ReaperConfig) -> ReaperService {
        ReaperService::from_parts(
            self.db.clone(),
            config,
            Arc::new(GrpcPeers::new(self.clients.clone())),
        )
    }
}

/// The defaults with `dead_ticks`.
pub fn rules(dead_ticks: u32) -> ReaperConfig {
    ReaperConfig {
        dead_ticks,
        ..ReaperConfig::default()
    }
}
