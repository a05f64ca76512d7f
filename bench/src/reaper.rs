//! The reaper against the REAL launcher: the real `ReaperService` (its SQLite storage, its
//! gRPC clients) asks a real `LauncherService` — its store, its `ProbeProcesses`, `GetJob`
//! and `FlipTerminal`, served the way `orchestrator up` serves it — and a real merge-gate
//! for the leases.
//!
//! - `reaper-tick`: the time of one tick with N running jobs in the launcher's own table
//!   (SQLite, or PostgreSQL with `--postgres`), spread over four launcher instances that
//!   heartbeat; `--dead D` of them have a stale heartbeat, so the launcher probes them DEAD
//!   and the reaper writes their streaks every tick (it never flips them here).
//! - `reaper-zombie`: a launcher replica — `orchestrator serve launcher`, the release
//!   binary, as a child process — is SIGKILLed in the middle of a job (its agent with it, as
//!   its container would go); the time is from the kill to the job's flip by the reaper's
//!   loop, which asks a surviving replica. The survivor judges the dead one gone once its
//!   heartbeat is `ORCH_LAUNCHER_INSTANCE_STALE_MS` old, then the reaper needs its dead
//!   ticks. PostgreSQL (replicas share a queue only there).

use std::path::Path;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use async_trait::async_trait;
use launcher::agent::AgentEnv;
use launcher::peers::Peers;
use launcher::store::{self, ClaimFilter, Kind, NewJob, Status};
use launcher::{LauncherConfig, LauncherService};
use orchestrator_forge::local::LocalForge;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::db::{self, Location};
use orchestrator_kit::time::now_ms;
use orchestrator_kit::{Config, Db, Env, Secret, ServiceName};
use orchestrator_proto::launcher::v1::EnqueueRequest;
use orchestrator_proto::launcher::v1::launcher_server::LauncherServer;
use orchestrator_proto::merge_gate::v1::merge_gate_server::MergeGateServer;
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, FinalizeMergeRequest, FinalizeMergeResponse,
};
use orchestrator_proto::post_deploy::v1::TickResponse;
use orchestrator_proto::stage_engine::v1::{
    AddCommentRequest, AdvanceStageRequest, AdvanceStageResponse, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;
use reaper::{GrpcPeers, ReaperConfig, ReaperService};
use tokio::io::AsyncBufReadExt;
use tokio_util::sync::CancellationToken;
use tonic::Status as RpcStatus;
use tonic::service::Routes;

use crate::stack::{median_range, percentile};

/// The surviving launcher's own peers. It runs no job here; a flip's failure comment is
/// the only call it may make.
struct QuietPeers;

#[async_trait]
impl Peers for QuietPeers {
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
    async fn add_comment(&self, _: AddCommentRequest) -> Result<(), RpcStatus> {
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
        Err(RpcStatus::unimplemented("not in this bench"))
    }
    async fn release_lease(&self, _: &str, _: &str) -> Result<bool, RpcStatus> {
        Ok(false)
    }
    async fn finalize_merge(
        &self,
        _: FinalizeMergeRequest,
    ) -> Result<FinalizeMergeResponse, RpcStatus> {
        Err(RpcStatus::unimplemented("not in this bench"))
    }
    async fn tick(&self, _: &str) -> Result<TickResponse, RpcStatus> {
        Err(RpcStatus::unimplemented("not in this bench"))
    }
}

/// SQLite under `dir`, or PostgreSQL (`throwaway`: a cluster from the machine's binaries,
/// as the tests start it).
async fn storage(postgres: &Option<String>, dir: &Path) -> Result<Location> {
    Ok(match postgres {
        Some(t) if t == "throwaway" => {
            let cluster = orchestrator_testkit::cluster().map_err(anyhow::Error::msg)?;
            Location::Postgres(Secret::new(cluster.fresh_database().await))
        }
        Some(url) => Location::Postgres(Secret::new(url.clone())),
        None => Location::SqliteDir(dir.join("data")),
    })
}

/// Serves `routes` as `part` on 127.0.0.1:0, the way `orchestrator up` does; returns its URL.
async fn serve(part: ServiceName, routes: Routes, stop: CancellationToken) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let url = format!("http://{}", listener.local_addr()?);
    tokio::spawn(orchestrator_kit::grpc::serve(part, routes, listener, stop));
    Ok(url)
}

fn clients(pairs: &[(&str, &str)]) -> Result<Clients> {
    let config = Config::from_env(Env::from_pairs(pairs.iter().copied()))?;
    Ok(Clients::from_config(&config)?)
}

/// A launcher replica in this process that answers RPCs (and dispatches nothing): the
/// judge of the other instances' jobs.
async fn survivor(
    dir: &Path,
    location: &Location,
    stale_ms: u64,
    stop: CancellationToken,
) -> Result<(Db, String)> {
    let s = |p: &Path| p.display().to_string();
    let env = Env::from_pairs([
        ("ORCH_LAUNCHER_INSTANCE_ID", "survivor".to_owned()),
        ("ORCH_LAUNCHER_INSTANCE_STALE_MS", stale_ms.to_string()),
        ("ORCH_WORKDIR", s(&dir.join("survivor"))),
        ("ORCH_FORGE", "local".into()),
        ("ORCH_FORGE_LOCAL_DIR", s(&dir.join("forge"))),
    ]);
    let db = db::open(ServiceName::Launcher, location, &launcher::MIGRATOR)
        .await
        .context("launcher storage")?;
    let svc = LauncherService::from_parts(
        db.clone(),
        LauncherConfig::from_env(&env)?,
        Arc::new(QuietPeers),
        Arc::new(LocalForge::new(dir.join("forge"), "main".into())),
        AgentEnv::default(),
    );
    let url = serve(
        ServiceName::Launcher,
        Routes::new(LauncherServer::new(svc)),
        stop,
    )
    .await?;
    Ok((db, url))
}

/// The reaper with its own SQLite storage, asking the launcher (and merge-gate) at these URLs.
async fn reaper_over(dir: &Path, config: ReaperConfig, peers: Clients) -> Result<ReaperService> {
    let db = db::open(
        ServiceName::Reaper,
        &Location::SqliteDir(dir.join("reaper")),
        &reaper::MIGRATOR,
    )
    .await
    .context("reaper storage")?;
    Ok(ReaperService::from_parts(
        db,
        config,
        Arc::new(GrpcPeers::new(peers)),
    ))
}

fn new_job(n: usize, agent: &str, at: i64) -> NewJob {
    NewJob {
        id: launcher::new_job_id(),
        work_item: format!("BENCH-{}", n % 500 + 1),
        repo: format!("acme/repo-{}", n % 50),
        agent: agent.into(),
        stage: "development".into(),
        kind: Kind::Llm,
        payload_json: format!(
            r#"{{"branch":"orch/BENCH-{}","dedupe_key":"BENCH-{n}/t/{agent}"}}"#,
            n % 500 + 1
        ),
        dedupe_key: Some(format!("BENCH-{n}/t/{agent}")),
        max_attempts: 3,
        not_before_ms: at,
        now_ms: at,
    }
}

/// `jobs` running LLM jobs in the launcher's table, through its own store: enqueued, then
/// claimed by four instances and their pids stamped; the first `dead` were claimed (and
/// last heartbeaten) ten minutes ago.
async fn fill(db: &Db, jobs: usize, dead: usize) -> Result<()> {
    let now = now_ms();
    let old = now - 600_000;
    for n in 0..jobs {
        store::enqueue(db, &new_job(n, "developer", old - 1000)).await?;
    }
    let instances: Vec<String> = (0..4).map(|i| format!("launcher-{i}")).collect();
    for i in &instances {
        store::register_instance(db, i, "bench-host", now).await?;
    }
    let filter = ClaimFilter {
        llm: true,
        reserved: false,
        max_concurrency: u32::MAX,
    };
    for n in 0..jobs {
        let at = if n < dead { old } else { now };
        let instance = &instances[n % instances.len()];
        let job = store::claim(db, instance, at, filter)
            .await?
            .context("a queued job to claim")?;
        store::stamp_pid(db, &job.id, job.attempt, instance, 100_000 + n as i64, at).await?;
    }
    Ok(())
}

/// Tick time with `jobs` running jobs in the real launcher, of which `dead` are probed dead
/// every tick (their streaks are written each tick and never reach the flip).
pub async fn tick(jobs: usize, dead: usize, ticks: usize, postgres: Option<String>) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let stop = CancellationToken::new();
    let location = storage(&postgres, dir.path()).await?;
    // Heartbeats stay fresh for the whole run; the dead ones are ten minutes old.
    let (launcher_db, launcher_url) =
        survivor(dir.path(), &location, 300_000, stop.clone()).await?;
    let filled = Instant::now();
    fill(&launcher_db, jobs, dead).await?;
    let fill_s = filled.elapsed().as_secs_f64();
    let s = |p: &Path| p.display().to_string();
    let gate_env = Env::from_pairs([
        ("ORCH_FORGE", "local".to_owned()),
        ("ORCH_FORGE_LOCAL_DIR", s(&dir.path().join("forge"))),
        ("ORCH_MERGE_MIRROR_DIR", s(&dir.path().join("mirrors"))),
    ]);
    let gate_db = db::open(ServiceName::MergeGate, &location, &merge_gate::MIGRATOR)
        .await
        .context("merge-gate storage")?;
    let gate = merge_gate::MergeGateService::start(
        gate_db,
        clients(&[("ORCH_LAUNCHER_URL", &launcher_url)])?,
        &gate_env,
    )?;
    let gate_url = serve(
        ServiceName::MergeGate,
        Routes::new(MergeGateServer::new(gate)),
        stop.clone(),
    )
    .await?;
    let peers = clients(&[
        ("ORCH_LAUNCHER_URL", &launcher_url),
        ("ORCH_MERGE_GATE_URL", &gate_url),
    ])?;
    let config = ReaperConfig {
        // Never reached: the dead jobs stay, so every tick writes their streaks.
        dead_ticks: u32::MAX,
        ..ReaperConfig::default()
    };
    let interval = i64::try_from(config.interval.as_millis())?;
    let reaper = reaper_over(dir.path(), config, peers.clone()).await?;
    // Each tick an interval after the last, as the loop runs them: streaks count.
    let mut at = now_ms();
    for _ in 0..3 {
        reaper.tick_at(at).await;
        at += interval;
    }
    let mut ms = Vec::new();
    for _ in 0..ticks {
        let started = Instant::now();
        let r = reaper.tick_at(at).await;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(
            r.errors == 0 && r.jobs_seen as usize == jobs && r.flips_dead_pid == 0,
            "tick went wrong: {r:?}"
        );
        at += interval;
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    // The share of the one list the tick asks for: the launcher answering ProbeProcesses
    // and gRPC carrying it. And, for comparison, ListRunning (the whole jobs), which the
    // tick no longer asks for.
    let probes = GrpcPeers::new(peers.clone());
    let (mut probe_ms, mut list_ms) = (Vec::new(), Vec::new());
    for _ in 0..ticks {
        let started = Instant::now();
        let all = reaper::Peers::probe_processes(&probes).await?;
        probe_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        let probed_dead = all
            .iter()
            .filter(|p| p.liveness() != orchestrator_proto::launcher::v1::Liveness::Alive)
            .count();
        anyhow::ensure!(
            all.len() == jobs && probed_dead == dead,
            "ProbeProcesses: {} probes, {probed_dead} not alive",
            all.len()
        );
        let started = Instant::now();
        let listed = peers
            .launcher
            .clone()
            .max_decoding_message_size(256 * 1024 * 1024)
            .list_running(orchestrator_proto::launcher::v1::ListRunningRequest {})
            .await?
            .into_inner()
            .jobs;
        list_ms.push(started.elapsed().as_secs_f64() * 1000.0);
        anyhow::ensure!(listed.len() == jobs, "ListRunning");
    }
    stop.cancel();
    println!(
        "reaper tick against the real launcher, {jobs} running jobs ({dead} probed dead), launcher on {}, {ticks} ticks: {}; p90 {:.1} ms; of which ProbeProcesses alone: {}; for comparison ListRunning (not asked by the tick): {} (filling the table took {fill_s:.1} s)",
        if postgres.is_some() {
            "PostgreSQL"
        } else {
            "SQLite"
        },
        median_range(&mut ms, "ms"),
        percentile(&sorted, 0.90),
        median_range(&mut probe_ms, "ms"),
        median_range(&mut list_ms, "ms"),
    );
    Ok(())
}

/// The settings of one zombie measurement.
pub struct ZombieArgs {
    pub interval_s: u64,
    pub dead_ticks: u32,
    /// The doomed replica's `ORCH_LAUNCHER_HEARTBEAT_MS`.
    pub heartbeat_ms: u64,
    /// The survivor's `ORCH_LAUNCHER_INSTANCE_STALE_MS`.
    pub stale_ms: u64,
    pub runs: usize,
    pub postgres: String,
}

/// `orchestrator serve launcher` as a child process; returns it and its address.
async fn doomed_replica(
    bin: &Path,
    dir: &Path,
    url: &str,
    heartbeat_ms: u64,
) -> Result<(tokio::process::Child, String)> {
    let agents = dir.join("agents");
    std::fs::create_dir_all(&agents)?;
    // The launcher starts only with a prompt for every role.
    for role in stage_engine::pipeline::ROLES {
        std::fs::write(agents.join(format!("{role}.md")), "You are it.\n")?;
    }
    let mut cmd = tokio::process::Command::new(bin);
    cmd.args(["serve", "launcher"])
        .current_dir(dir)
        .env("ORCH_DATABASE_URL", url)
        .env("ORCH_LAUNCHER_ADDR", "127.0.0.1:0")
        .env("ORCH_LAUNCHER_INSTANCE_ID", "doomed")
        .env("ORCH_LAUNCHER_HEARTBEAT_MS", heartbeat_ms.to_string())
        .env("ORCH_WORKDIR", dir.join("doomed"))
        .env("ORCH_AGENTS_DIR", &agents)
        // Through sh: the flags the launcher adds (the profile's) go to sh, not to sleep.
        .env("ORCH_AGENT_COMMAND", "sh -c 'sleep 100000'")
        .env("ORCH_LAUNCHER_GIT", "false")
        .env("ORCH_QG_HOOK_ENABLED", "false")
        .env("ORCH_FORGE", "local")
        .env("ORCH_FORGE_LOCAL_DIR", dir.join("forge"))
        .env("ORCH_LOG", "warn")
        // It calls no peer for this job; should it, nothing answers.
        .env("ORCH_STAGE_ENGINE_URL", "http://127.0.0.1:1")
        .env("ORCH_USAGE_LEDGER_URL", "http://127.0.0.1:1")
        .env("ORCH_MERGE_GATE_URL", "http://127.0.0.1:1")
        .env_remove("ORCH_INTERNAL_TOKEN")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true);
    let mut child = cmd
        .spawn()
        .with_context(|| format!("exec {}", bin.display()))?;
    let stdout = child.stdout.take().context("stdout")?;
    let mut lines = tokio::io::BufReader::new(stdout).lines();
    let mut addr = None;
    while let Some(line) = lines.next_line().await? {
        if line.starts_with("ready") {
            break;
        }
        if let Some(a) = line.strip_prefix("launcher") {
            addr = a.trim().strip_prefix("listening on ").map(str::to_owned);
        }
    }
    Ok((child, addr.context("the launcher printed no address")?))
}

/// Time from SIGKILL of a launcher replica in the middle of a job to the job's flip by the
/// reaper's loop, over `runs` runs; each kill lands at a different phase of the tick.
pub async fn zombie(bin: &Path, a: ZombieArgs) -> Result<()> {
    // The replica runs in its own directory: a relative --bin would point elsewhere.
    let bin = std::path::absolute(bin)?;
    let config = ReaperConfig::from_env(&Env::from_pairs([
        ("ORCH_REAPER_INTERVAL_S", a.interval_s.to_string()),
        ("ORCH_REAPER_DEAD_TICKS", a.dead_ticks.to_string()),
        ("ORCH_LEASE_RECLAIM_ENABLED", "false".to_owned()),
    ]))?;
    let bound = Duration::from_millis(a.stale_ms) + config.zombie_to_freed_bound();
    let mut secs = Vec::new();
    for run in 0..a.runs {
        let dir = tempfile::tempdir()?;
        let stop = CancellationToken::new();
        let location = storage(&Some(a.postgres.clone()), dir.path()).await?;
        let Location::Postgres(url) = &location else {
            anyhow::bail!("replicas share a queue on PostgreSQL only");
        };
        let (db, survivor_url) = survivor(dir.path(), &location, a.stale_ms, stop.clone()).await?;
        let (mut doomed, addr) =
            doomed_replica(&bin, dir.path(), url.expose(), a.heartbeat_ms).await?;
        let reaper = reaper_over(
            dir.path(),
            config.clone(),
            clients(&[("ORCH_LAUNCHER_URL", &survivor_url)])?,
        )
        .await?;
        let job = clients(&[("ORCH_LAUNCHER_URL", &format!("http://{addr}"))])?
            .launcher
            .enqueue(EnqueueRequest {
                work_item: "BENCH-1".into(),
                repo: "acme/app".into(),
                agent: "developer".into(),
                stage: "development".into(),
                payload_json: r#"{"branch":"orch/BENCH-1"}"#.into(),
                ..EnqueueRequest::default()
            })
            .await?
            .into_inner()
            .job
            .context("job")?;
        let deadline = Instant::now() + Duration::from_secs(30);
        let pgid = loop {
            let j = store::get(&db, &job.id).await?.context("job")?;
            if let (Status::Running, Some(pid)) = (j.status, j.pid) {
                break i32::try_from(pid)?;
            }
            anyhow::ensure!(Instant::now() < deadline, "the job never ran: {j:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        };
        let loop_handle = reaper
            .spawn_loop(stop.clone())
            .context("the loop must be enabled")?;
        // Kill at a different phase of the interval in each run.
        let phase = config.interval.mul_f64((run as f64 + 0.5) / a.runs as f64);
        tokio::time::sleep(config.interval + phase).await;
        doomed.start_kill()?;
        // SAFETY: SIGKILL to the agent's own process group (pgid > 1, never ours).
        #[allow(unsafe_code)]
        unsafe {
            libc::killpg(pgid, libc::SIGKILL);
        }
        let killed = Instant::now();
        doomed.wait().await?;
        loop {
            let j = store::get(&db, &job.id).await?.context("job")?;
            if j.status != Status::Running {
                anyhow::ensure!(j.outcome == "flipped", "not the reaper's flip: {j:?}");
                break;
            }
            anyhow::ensure!(
                killed.elapsed() < bound * 3,
                "not freed after {:?}",
                killed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        secs.push(killed.elapsed().as_secs_f64());
        stop.cancel();
        loop_handle.await?;
    }
    let max = secs.iter().copied().fold(0.0, f64::max);
    println!(
        "zombie-to-freed with the real launcher (SIGKILL of a replica -> the reaper's flip through the survivor), \
         ORCH_REAPER_INTERVAL_S={} ORCH_REAPER_DEAD_TICKS={} ORCH_LAUNCHER_HEARTBEAT_MS={} ORCH_LAUNCHER_INSTANCE_STALE_MS={}, {} runs: {}; max {max:.2} s; \
         bound stale + interval x (dead_ticks + 1) = {:.1} s",
        a.interval_s,
        a.dead_ticks,
        a.heartbeat_ms,
        a.stale_ms,
        a.runs,
        median_range(&mut secs, "s"),
        bound.as_secs_f64()
    );
    Ok(())
}
