//! `launcher [--jobs N] [--latency-jobs N] [--concurrency C] [--postgres throwaway|URL]`:
//! the launcher over its real storage (SQLite in a temp dir, or PostgreSQL), spawning real
//! agent processes (a bash script that notes when it started and prints a CLI result), with
//! no git (`ORCH_LAUNCHER_GIT=false`) and peers that answer at once.
//!
//! - latency: `--latency-jobs` sequential enqueues, each timed from the Enqueue call to the
//!   moment the agent process runs its first line (`$EPOCHREALTIME`, the same clock);
//! - throughput: `--jobs` no-op jobs enqueued first (on PostgreSQL then `ANALYZE` and
//!   `CHECKPOINT`, as graphile-worker's side in `pg-queue`), then the dispatcher started;
//!   jobs/s is N / (first task start -> every job ended), each job checked to have run
//!   exactly once; once with LLM jobs (a process each; "first task start" is the
//!   dispatcher's start), once with reserved jobs (an RPC answered at once; the first
//!   `Tick`).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use async_trait::async_trait;
use launcher::agent::AgentEnv;
use launcher::peers::Peers;
use launcher::store::{self, Status};
use launcher::{LauncherConfig, LauncherService};
use orchestrator_forge::local::LocalForge;
use orchestrator_kit::db::{self, Location};
use orchestrator_kit::{Db, Env, Secret, ServiceName};
use orchestrator_proto::launcher::v1::EnqueueRequest;
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, FinalizeMergeRequest, FinalizeMergeResponse,
};
use orchestrator_proto::post_deploy::v1::TickResponse;
use orchestrator_proto::stage_engine::v1::{
    AddCommentRequest, AdvanceStageRequest, AdvanceStageResponse, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;
use tokio_util::sync::CancellationToken;

/// Peers that answer at once, counting the runs that reached their end (AdvanceStage for an
/// LLM job, Tick for a reserved one).
#[derive(Default)]
struct NoopPeers {
    ended: std::sync::atomic::AtomicUsize,
    /// When the first reserved job's task (its `Tick`) ran.
    first_tick: std::sync::OnceLock<Instant>,
}

impl NoopPeers {
    fn ended(&self) -> usize {
        self.ended.load(std::sync::atomic::Ordering::SeqCst)
    }

    fn end(&self) {
        self.ended.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

#[async_trait]
impl Peers for NoopPeers {
    async fn record_run(&self, _: RecordRunRequest) -> Result<(), tonic::Status> {
        Ok(())
    }
    async fn finish_comment(&self, _: &str, _: u32) -> Result<String, tonic::Status> {
        Ok("Noop done".into())
    }
    async fn spent_usd(&self, _: &str) -> Result<f64, tonic::Status> {
        Ok(0.0)
    }
    async fn spent_since(&self, _: i64, _: &str) -> Result<f64, tonic::Status> {
        Ok(0.0)
    }
    async fn notify(
        &self,
        _: orchestrator_proto::stage_engine::v1::NotifyRequest,
    ) -> Result<bool, tonic::Status> {
        Ok(true)
    }
    async fn last_run(
        &self,
        _: &str,
    ) -> Result<Option<orchestrator_proto::usage_ledger::v1::AgentRun>, tonic::Status> {
        Ok(None)
    }
    async fn work_item(&self, k: &str) -> Result<WorkItem, tonic::Status> {
        Err(tonic::Status::not_found(k.to_owned()))
    }
    async fn add_comment(&self, _: AddCommentRequest) -> Result<(), tonic::Status> {
        Ok(())
    }
    async fn advance_stage(
        &self,
        _: AdvanceStageRequest,
    ) -> Result<AdvanceStageResponse, tonic::Status> {
        self.end();
        Ok(AdvanceStageResponse::default())
    }
    async fn report_job_failed(
        &self,
        _: orchestrator_proto::stage_engine::v1::ReportJobFailedRequest,
    ) -> Result<AdvanceStageResponse, tonic::Status> {
        Ok(AdvanceStageResponse::default())
    }
    async fn acquire_lease(
        &self,
        _: AcquireLeaseRequest,
    ) -> Result<AcquireLeaseResponse, tonic::Status> {
        Ok(AcquireLeaseResponse {
            acquired: true,
            ..Default::default()
        })
    }
    async fn release_lease(&self, _: &str, _: &str) -> Result<bool, tonic::Status> {
        Ok(true)
    }
    async fn finalize_merge(
        &self,
        _: FinalizeMergeRequest,
    ) -> Result<FinalizeMergeResponse, tonic::Status> {
        Ok(FinalizeMergeResponse::default())
    }
    async fn tick(&self, _: &str) -> Result<TickResponse, tonic::Status> {
        self.first_tick.get_or_init(Instant::now);
        self.end();
        Ok(TickResponse {
            done: true,
            ..Default::default()
        })
    }
}

struct Launcher {
    svc: LauncherService,
    peers: Arc<NoopPeers>,
    db: Db,
    workdir: PathBuf,
    stop: CancellationToken,
}

impl Drop for Launcher {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn location(postgres: &Option<String>, dir: &Path) -> anyhow::Result<Location> {
    Ok(match postgres {
        Some(t) if t == "throwaway" => {
            let cluster = orchestrator_testkit::cluster().map_err(anyhow::Error::msg)?;
            Location::Postgres(Secret::new(cluster.fresh_database().await))
        }
        Some(url) => Location::Postgres(Secret::new(url.clone())),
        None => Location::SqliteDir(dir.join("data")),
    })
}

async fn launcher(
    dir: &Path,
    postgres: &Option<String>,
    concurrency: u32,
) -> anyhow::Result<Launcher> {
    let agents = dir.join("agents");
    std::fs::create_dir_all(&agents)?;
    std::fs::write(agents.join("noop.md"), "Do nothing.\n")?;
    let script = dir.join("agent.sh");
    // No fork before the first line: the start time is the agent's own. Written into its
    // working directory, the one place a sandboxed agent may write.
    std::fs::write(
        &script,
        "echo \"$EPOCHREALTIME\" > \"$PWD/started\"\n\
         echo '{\"type\":\"result\",\"subtype\":\"success\",\"is_error\":false,\"result\":\"ok\",\"total_cost_usd\":0}'\n",
    )?;
    let workdir = dir.join("work");
    let s = |p: &Path| p.display().to_string();
    let env = Env::from_pairs([
        ("ORCH_WORKDIR", s(&workdir)),
        ("ORCH_AGENTS_DIR", s(&agents)),
        ("ORCH_AGENT_COMMAND", format!("bash {}", s(&script))),
        ("ORCH_LAUNCHER_GIT", "false".into()),
        ("ORCH_QG_HOOK_ENABLED", "false".into()),
        ("ORCH_MAX_CONCURRENCY", concurrency.to_string()),
        ("ORCH_RESERVED_CONCURRENCY", concurrency.to_string()),
        // Reserved jobs claimed ahead of a free slot (default: as many as the slots; a
        // claim then takes up to twice the concurrency).
        (
            "ORCH_LAUNCHER_LOCAL_QUEUE",
            std::env::var("ORCH_LAUNCHER_LOCAL_QUEUE").unwrap_or_else(|_| concurrency.to_string()),
        ),
        ("ORCH_LAUNCHER_INSTANCE_ID", "bench".into()),
        ("ORCH_FORGE", "local".into()),
        ("ORCH_FORGE_LOCAL_DIR", s(&dir.join("forge"))),
        // The agent sandbox's cost per launch: `ORCH_AGENT_SANDBOX=off` against the default.
        (
            "ORCH_AGENT_SANDBOX",
            std::env::var("ORCH_AGENT_SANDBOX").unwrap_or_else(|_| "auto".into()),
        ),
        // And of its isolated network (the socat bridge, the egress proxy).
        (
            "ORCH_AGENT_SANDBOX_NETWORK",
            std::env::var("ORCH_AGENT_SANDBOX_NETWORK").unwrap_or_else(|_| "shared".into()),
        ),
    ]);
    let config = LauncherConfig::from_env(&env)?;
    let db = db::open(
        ServiceName::Launcher,
        &location(postgres, dir).await?,
        &launcher::MIGRATOR,
    )
    .await
    .context("open storage")?;
    let peers = Arc::new(NoopPeers::default());
    let svc = LauncherService::from_parts(
        db.clone(),
        config,
        peers.clone(),
        Arc::new(LocalForge::new(dir.join("forge"), "main".into())),
        AgentEnv::from_env(&env, &[]),
    );
    Ok(Launcher {
        svc,
        peers,
        db,
        workdir,
        stop: CancellationToken::new(),
    })
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

fn started_at(workdir: &Path, job_id: &str) -> Option<f64> {
    std::fs::read_to_string(workdir.join("jobs").join(job_id).join("checkout/started"))
        .ok()
        .and_then(|t| t.trim().parse().ok())
}

fn request(i: usize, agent: &str) -> EnqueueRequest {
    EnqueueRequest {
        work_item: format!("B-{}", i + 1),
        repo: "acme/app".into(),
        agent: agent.into(),
        stage: "development".into(),
        payload_json: format!(r#"{{"branch":"orch/B-{}"}}"#, i + 1),
        ..Default::default()
    }
}

fn ms(v: f64) -> String {
    format!("{:.2} ms", v * 1e3)
}

async fn latency(postgres: &Option<String>, n: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let l = launcher(dir.path(), postgres, 4).await?;
    l.svc.supervisor().start(l.stop.clone());
    // Let the instance register and reconcile before timing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut lat = Vec::with_capacity(n);
    for i in 0..n {
        let t0 = now_s();
        let (job, _) = l.svc.enqueue_job(request(i, "noop")).await?;
        let deadline = Instant::now() + Duration::from_secs(10);
        let at = loop {
            if let Some(at) = started_at(&l.workdir, &job.id) {
                break at;
            }
            anyhow::ensure!(Instant::now() < deadline, "job {} never started", job.id);
            tokio::time::sleep(Duration::from_micros(200)).await;
        };
        lat.push(at - t0);
    }
    lat.sort_by(f64::total_cmp);
    println!(
        "enqueue -> agent process started ({n} sequential jobs, sandbox {:?}): p50 {}  p90 {}  p99 {}  max {}",
        l.svc
            .supervisor()
            .config()
            .sandbox
            .availability(l.svc.supervisor().config().search_path.as_deref()),
        ms(crate::stack::percentile(&lat, 0.50)),
        ms(crate::stack::percentile(&lat, 0.90)),
        ms(crate::stack::percentile(&lat, 0.99)),
        ms(lat.last().copied().unwrap_or_default()),
    );
    Ok(())
}

/// No-op jobs per second: `n` jobs of `agent` (`noop`: an LLM job, a process each;
/// `post-deploy-monitor`: a reserved job) enqueued first, then run under `concurrency`.
pub(crate) async fn throughput(
    postgres: &Option<String>,
    n: usize,
    concurrency: u32,
    agent: &str,
) -> anyhow::Result<f64> {
    let dir = tempfile::tempdir()?;
    let l = launcher(dir.path(), postgres, concurrency).await?;
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(l.svc.enqueue_job(request(i, agent)).await?.0.id);
    }
    if l.db.backend == db::Backend::Postgres {
        // Fresh statistics and no checkpoint due mid-run, as on graphile-worker's side.
        sqlx::query("ANALYZE").execute(&l.db.pool).await?;
        sqlx::query("CHECKPOINT").execute(&l.db.pool).await?;
    }
    let started = Instant::now();
    l.svc.supervisor().start(l.stop.clone());
    let deadline = Instant::now() + Duration::from_secs(1800);
    // Cheap in-process progress first (no query competing with the launcher), then the
    // queue's own word that every job has ended.
    while l.peers.ended() < n {
        anyhow::ensure!(
            Instant::now() < deadline,
            "only {} of {n} ended",
            l.peers.ended()
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    loop {
        let counts = store::counts(&l.db).await?;
        let done = counts
            .iter()
            .filter(|(s, _)| s.is_terminal())
            .map(|(_, c)| *c)
            .sum::<u64>();
        if done as usize == n {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "not done: {counts:?}");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = l
        .peers
        .first_tick
        .get()
        .copied()
        .unwrap_or(started)
        .elapsed();
    // Exactly once: every job succeeded at its first attempt (and an LLM job's agent ran).
    for id in &ids {
        let j = store::get(&l.db, id).await?.context("job")?;
        anyhow::ensure!(
            j.status == Status::Succeeded && j.attempt == 1,
            "job {id}: {} attempt {} ({})",
            j.status,
            j.attempt,
            j.reason
        );
        if agent == "noop" {
            anyhow::ensure!(started_at(&l.workdir, id).is_some(), "job {id} never ran");
        }
    }
    Ok(n as f64 / took.as_secs_f64())
}

pub async fn run(
    jobs: usize,
    latency_jobs: usize,
    concurrency: u32,
    runs: usize,
    postgres: Option<String>,
) -> anyhow::Result<()> {
    let backend = if postgres.is_some() {
        "PostgreSQL"
    } else {
        "SQLite"
    };
    println!("launcher on {backend}, concurrency {concurrency}");
    latency(&postgres, latency_jobs).await?;
    for (agent, what) in [
        ("noop", "no-op LLM jobs (a process each)"),
        ("post-deploy-monitor", "no-op reserved jobs (an RPC each)"),
    ] {
        let mut rates = Vec::new();
        for _ in 0..runs {
            rates.push(throughput(&postgres, jobs, concurrency, agent).await?);
        }
        println!(
            "{what}: {jobs} jobs, {runs} runs: {}",
            crate::stack::median_range(&mut rates, "jobs/s")
        );
    }
    Ok(())
}
