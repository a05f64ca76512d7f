//! The reaper, measured in this process against a launcher and a merge-gate faked at the
//! gRPC boundary (the generated server traits on 127.0.0.1:0): the real `ReaperService`,
//! its real SQLite storage and real gRPC clients; only the peers are fakes.
//!
//! - `reaper-tick`: the time of one tick with N running jobs (`ListRunning` and
//!   `ProbeProcesses` answering N jobs each);
//! - `reaper-zombie`: the time from SIGKILL of a real process to its job's flip, with the
//!   loop running at the given interval and dead ticks (the fake launcher judges the pid
//!   with `kill(pid, 0)`, as a launcher does for its own children).

use std::collections::HashSet;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use orchestrator_kit::clients::Clients;
use orchestrator_kit::db::Location;
use orchestrator_kit::time::now_ms;
use orchestrator_kit::{Config, Env, ServiceName};
use orchestrator_proto::launcher::v1::launcher_server::{Launcher, LauncherServer};
use orchestrator_proto::launcher::v1::{
    FlipTerminalRequest, FlipTerminalResponse, Job, JobKind, JobStatus, ListRunningRequest,
    ListRunningResponse, Liveness, ProbeProcessesRequest, ProbeProcessesResponse, ProcessProbe,
};
use orchestrator_proto::merge_gate::v1::merge_gate_server::{MergeGate, MergeGateServer};
use orchestrator_proto::merge_gate::v1::{ReclaimStaleLeasesRequest, ReclaimStaleLeasesResponse};
use reaper::{GrpcPeers, ReaperConfig, ReaperService};
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::stack::{median_range, percentile};

/// A launcher with a fixed set of running jobs.
#[derive(Clone, Default)]
struct FakeLauncher {
    jobs: Arc<Mutex<Vec<Job>>>,
    /// Jobs probed DEAD (the others ALIVE, or judged by pid when they have one).
    dead: Arc<Mutex<HashSet<String>>>,
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

#[tonic::async_trait]
impl Launcher for FakeLauncher {
    async fn list_running(
        &self,
        _request: Request<ListRunningRequest>,
    ) -> Result<Response<ListRunningResponse>, Status> {
        let jobs = self.jobs.lock().expect("lock").clone();
        Ok(Response::new(ListRunningResponse { jobs }))
    }

    async fn probe_processes(
        &self,
        _request: Request<ProbeProcessesRequest>,
    ) -> Result<Response<ProbeProcessesResponse>, Status> {
        let jobs = self.jobs.lock().expect("lock").clone();
        let dead = self.dead.lock().expect("lock").clone();
        let probes = jobs
            .iter()
            .map(|j| {
                let alive = match j.pid {
                    Some(pid) => pid_alive(pid),
                    None => !dead.contains(&j.id),
                };
                ProcessProbe {
                    job_id: j.id.clone(),
                    attempt: j.attempt,
                    instance_id: j.instance_id.clone(),
                    pid: j.pid,
                    liveness: if alive {
                        Liveness::Alive
                    } else {
                        Liveness::Dead
                    } as i32,
                    exit_code: None,
                    started_at_ms: j.started_at_ms,
                }
            })
            .collect();
        Ok(Response::new(ProbeProcessesResponse { probes }))
    }

    async fn flip_terminal(
        &self,
        request: Request<FlipTerminalRequest>,
    ) -> Result<Response<FlipTerminalResponse>, Status> {
        let r = request.into_inner();
        let mut jobs = self.jobs.lock().expect("lock");
        let before = jobs.len();
        jobs.retain(|j| !(j.id == r.job_id && j.attempt == r.attempt));
        Ok(Response::new(FlipTerminalResponse {
            flipped: jobs.len() < before,
            job: None,
        }))
    }
}

#[derive(Clone, Default)]
struct FakeMergeGate;

#[tonic::async_trait]
impl MergeGate for FakeMergeGate {
    async fn reclaim_stale_leases(
        &self,
        _request: Request<ReclaimStaleLeasesRequest>,
    ) -> Result<Response<ReclaimStaleLeasesResponse>, Status> {
        Ok(Response::new(ReclaimStaleLeasesResponse::default()))
    }
}

async fn serve(router: tonic::transport::server::Router) -> Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
    });
    Ok(format!("http://{addr}"))
}

struct World {
    launcher: FakeLauncher,
    clients: Clients,
    dir: tempfile::TempDir,
}

async fn world() -> Result<World> {
    let launcher = FakeLauncher::default();
    let launcher_url = serve(
        tonic::transport::Server::builder().add_service(LauncherServer::new(launcher.clone())),
    )
    .await?;
    let gate_url =
        serve(tonic::transport::Server::builder().add_service(MergeGateServer::new(FakeMergeGate)))
            .await?;
    let config = Config::from_env(Env::from_pairs([
        ("ORCH_LAUNCHER_URL", launcher_url),
        ("ORCH_MERGE_GATE_URL", gate_url),
    ]))?;
    Ok(World {
        launcher,
        clients: Clients::from_config(&config)?,
        dir: tempfile::tempdir()?,
    })
}

impl World {
    async fn reaper(&self, config: ReaperConfig) -> Result<ReaperService> {
        let db = orchestrator_kit::db::open(
            ServiceName::Reaper,
            &Location::SqliteDir(self.dir.path().to_path_buf()),
            &reaper::MIGRATOR,
        )
        .await
        .context("reaper storage")?;
        Ok(ReaperService::from_parts(
            db,
            config,
            Arc::new(GrpcPeers::new(self.clients.clone())),
        ))
    }
}

fn job(n: usize, now: i64) -> Job {
    Job {
        id: format!("job-{n:06}"),
        work_item: format!("BENCH-{}", n % 500),
        repo: format!("acme/repo-{}", n % 50),
        agent: "developer".into(),
        stage: "development".into(),
        kind: JobKind::Llm as i32,
        payload_json: format!(r#"{{"dedupe_key":"BENCH-{n}:t:developer"}}"#),
        status: JobStatus::Running as i32,
        attempt: 1,
        max_attempts: 3,
        instance_id: format!("launcher-{}", n % 4),
        pid: None,
        started_at_ms: now - 60_000,
        heartbeat_at_ms: now,
        log_path: format!("/var/orchestrator/logs/job-{n:06}.log"),
        ..Job::default()
    }
}

/// Tick time with `jobs` running jobs, of which `dead` are probed dead every tick (their
/// streaks are written each tick and never reach the flip).
pub async fn tick(jobs: usize, dead: usize, ticks: usize) -> Result<()> {
    let w = world().await?;
    let now = now_ms();
    *w.launcher.jobs.lock().expect("lock") = (0..jobs).map(|n| job(n, now)).collect();
    *w.launcher.dead.lock().expect("lock") = (0..dead).map(|n| format!("job-{n:06}")).collect();
    let config = ReaperConfig {
        // Never reached: the dead jobs stay, so every tick writes their streaks.
        dead_ticks: u32::MAX,
        ..ReaperConfig::default()
    };
    let interval = i64::try_from(config.interval.as_millis())?;
    let reaper = w.reaper(config).await?;
    let mut at = now;
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
            r.errors == 0 && r.jobs_seen as usize == jobs,
            "tick went wrong: {r:?}"
        );
        at += interval;
    }
    let mut sorted = ms.clone();
    sorted.sort_by(f64::total_cmp);
    // The share of the two lists alone: the fake answering and gRPC carrying them.
    let peers = GrpcPeers::new(w.clients.clone());
    let mut rpc_ms = Vec::new();
    for _ in 0..ticks {
        let started = Instant::now();
        let (jobs, probes) = tokio::join!(
            reaper::Peers::list_running(&peers),
            reaper::Peers::probe_processes(&peers)
        );
        jobs?;
        probes?;
        rpc_ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    println!(
        "reaper tick, {jobs} running jobs ({dead} probed dead), SQLite, {ticks} ticks: {}; p90 {:.1} ms; of which ListRunning + ProbeProcesses alone: {}",
        median_range(&mut ms, "ms"),
        percentile(&sorted, 0.90),
        median_range(&mut rpc_ms, "ms"),
    );
    Ok(())
}

/// Time from SIGKILL of a real process to its job's flip, with the loop at `interval_s`
/// and `dead_ticks`, over `runs` runs; each kill lands at a different phase of the tick.
pub async fn zombie(interval_s: u64, dead_ticks: u32, runs: usize) -> Result<()> {
    let config = ReaperConfig::from_env(&Env::from_pairs([
        ("ORCH_REAPER_INTERVAL_S", interval_s.to_string()),
        ("ORCH_REAPER_DEAD_TICKS", dead_ticks.to_string()),
    ]))?;
    let bound = config.zombie_to_freed_bound();
    let mut secs = Vec::new();
    for run in 0..runs {
        let w = world().await?;
        let reaper = w.reaper(config.clone()).await?;
        let mut child = Command::new("sleep").arg("100000").spawn()?;
        let mut j = job(run, now_ms());
        j.pid = Some(i64::from(child.id()));
        w.launcher.jobs.lock().expect("lock").push(j);
        let shutdown = CancellationToken::new();
        let handle = reaper
            .spawn_loop(shutdown.clone())
            .context("the loop must be enabled")?;
        // Kill at a different phase of the interval in each run.
        let phase = config.interval.mul_f64((run as f64 + 0.5) / runs as f64);
        tokio::time::sleep(config.interval + phase).await;
        child.kill()?;
        child.wait()?;
        let killed = Instant::now();
        while !w.launcher.jobs.lock().expect("lock").is_empty() {
            anyhow::ensure!(
                killed.elapsed() < bound * 3,
                "not freed after {:?}",
                killed.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        secs.push(killed.elapsed().as_secs_f64());
        shutdown.cancel();
        handle.await?;
    }
    let max = secs.iter().copied().fold(0.0, f64::max);
    println!(
        "zombie-to-freed (SIGKILL -> flip), ORCH_REAPER_INTERVAL_S={interval_s} ORCH_REAPER_DEAD_TICKS={dead_ticks}, {runs} runs: {}; max {max:.2} s; bound interval x (dead_ticks + 1) = {} s",
        median_range(&mut secs, "s"),
        bound.as_secs()
    );
    Ok(())
}
