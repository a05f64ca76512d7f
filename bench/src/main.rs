//! Benchmarks of the running system, measured from a second process against the real
//! `orchestrator` binary (build it first with `cargo build --release`).
//!
//! `cargo run --release -p orchestrator-bench -- all` prints every figure that
//! `docs/benchmarks.md` holds.

mod gateway;
mod launcher;
mod reaper;
mod stack;
mod stage_engine;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use orchestrator_kit::ServiceName;
use orchestrator_kit::clients::{ClientSettings, UsageLedgerClient, channel};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;

use crate::stack::{Stack, median_range};

#[derive(Parser)]
#[command(about = "Benchmarks of the running orchestrator")]
struct Cli {
    /// The orchestrator binary to measure.
    #[arg(long, global = true)]
    bin: Option<PathBuf>,
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// Time from exec to every service SERVING, over fresh data directories.
    Startup {
        #[arg(long, default_value_t = 20)]
        runs: usize,
    },
    /// Resident memory of `orchestrator up` once idle.
    Rss {
        #[arg(long, default_value_t = 5)]
        runs: usize,
    },
    /// RecordRun throughput over gRPC on SQLite, with latency percentiles.
    RecordRun {
        /// Concurrent callers.
        #[arg(long, default_value_t = 32)]
        concurrency: usize,
        /// Seconds of load per run.
        #[arg(long, default_value_t = 5)]
        seconds: u64,
        #[arg(long, default_value_t = 3)]
        runs: usize,
    },
    /// The stage engine over its real storage: create, advance, deliver (no gRPC).
    StageEngine {
        #[arg(long, default_value_t = 2000)]
        items: usize,
        /// A postgres:// URL, or `throwaway` for a cluster started from the machine's
        /// PostgreSQL binaries (as the tests do); default SQLite in a temp dir.
        #[arg(long)]
        postgres: Option<String>,
    },
    /// Signed webhook deliveries per second into the gateway's inbox (SQLite), with p50/p99
    /// latency, driven from this process against a gateway in a child process.
    Gateway(gateway::Args),
    /// The gateway under test (started by `gateway`; not meant to be run by hand).
    #[command(hide = true)]
    GatewayServer(gateway::ServerArgs),
    /// One reaper tick with N running jobs in the real launcher (in this process; no binary needed).
    ReaperTick {
        #[arg(long, default_value_t = 10_000)]
        jobs: usize,
        /// Jobs probed dead every tick (their streaks are written each tick).
        #[arg(long, default_value_t = 0)]
        dead: usize,
        #[arg(long, default_value_t = 30)]
        ticks: usize,
        /// The launcher on PostgreSQL: a postgres:// URL, or `throwaway`; default SQLite.
        #[arg(long)]
        postgres: Option<String>,
    },
    /// SIGKILL of a launcher replica (the release binary) mid-job -> the job flipped by the
    /// reaper through a surviving replica, on PostgreSQL. Defaults: the test settings.
    ReaperZombie {
        #[arg(long, default_value_t = 1)]
        interval_s: u64,
        #[arg(long, default_value_t = 2)]
        dead_ticks: u32,
        /// The killed replica's ORCH_LAUNCHER_HEARTBEAT_MS.
        #[arg(long, default_value_t = 200)]
        heartbeat_ms: u64,
        /// The survivor's ORCH_LAUNCHER_INSTANCE_STALE_MS.
        #[arg(long, default_value_t = 1500)]
        stale_ms: u64,
        #[arg(long, default_value_t = 5)]
        runs: usize,
        /// A postgres:// URL, or `throwaway` (a cluster from the machine's binaries).
        #[arg(long, default_value = "throwaway")]
        postgres: String,
    },
    /// The launcher over its real storage with real agent processes (no git, no gRPC):
    /// enqueue -> agent started latency, and no-op job throughput.
    Launcher {
        /// Jobs per throughput run.
        #[arg(long, default_value_t = 2000)]
        jobs: usize,
        /// Sequential jobs for the latency figure.
        #[arg(long, default_value_t = 500)]
        latency_jobs: usize,
        /// ORCH_MAX_CONCURRENCY (and reserved jobs in flight).
        #[arg(long, default_value_t = 10)]
        concurrency: u32,
        #[arg(long, default_value_t = 3)]
        runs: usize,
        /// A postgres:// URL, or `throwaway` (as for stage-engine); default SQLite.
        #[arg(long)]
        postgres: Option<String>,
    },
    /// Every benchmark of the foundation with its default size.
    All,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin = cli.bin.unwrap_or_else(default_bin);
    // Only the benchmarks that exec `orchestrator up` need the release binary.
    let needs_bin = matches!(
        cli.what,
        What::Startup { .. }
            | What::Rss { .. }
            | What::RecordRun { .. }
            | What::ReaperZombie { .. }
            | What::All
    );
    anyhow::ensure!(
        !needs_bin || bin.is_file(),
        "{} not found: run `cargo build --release` first",
        bin.display()
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.what {
        What::Gateway(args) => return rt.block_on(gateway::run(args)),
        What::GatewayServer(args) => return rt.block_on(gateway::server(args)),
        _ => {}
    }
    rt.block_on(async {
        println!("machine: {}", stack::machine());
        if needs_bin {
            println!("binary: {}", bin.display());
        }
        match cli.what {
            What::ReaperTick {
                jobs,
                dead,
                ticks,
                postgres,
            } => reaper::tick(jobs, dead, ticks, postgres).await,
            What::ReaperZombie {
                interval_s,
                dead_ticks,
                heartbeat_ms,
                stale_ms,
                runs,
                postgres,
            } => {
                let args = reaper::ZombieArgs {
                    interval_s,
                    dead_ticks,
                    heartbeat_ms,
                    stale_ms,
                    runs,
                    postgres,
                };
                reaper::zombie(&bin, args).await
            }
            What::Startup { runs } => startup(&bin, runs).await,
            What::Rss { runs } => rss(&bin, runs).await,
            What::RecordRun {
                concurrency,
                seconds,
                runs,
            } => record_run(&bin, concurrency, seconds, runs).await,
            What::StageEngine { items, postgres } => stage_engine::run(items, postgres).await,
            What::Gateway(_) | What::GatewayServer(_) => Ok(()),
            What::Launcher {
                jobs,
                latency_jobs,
                concurrency,
                runs,
                postgres,
            } => launcher::run(jobs, latency_jobs, concurrency, runs, postgres).await,
            What::All => {
                startup(&bin, 20).await?;
                rss(&bin, 5).await?;
                record_run(&bin, 32, 5, 3).await?;
                reaper::tick(10_000, 0, 30, None).await
            }
        }
    })
}

fn default_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release/orchestrator")
}

async fn startup(bin: &std::path::Path, runs: usize) -> Result<()> {
    let mut ms = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let stack = Stack::start(bin).await?;
        stack.wait_all_serving(Duration::from_secs(10)).await?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        stack.stop().await?;
    }
    println!(
        "startup: exec -> every service SERVING (fresh SQLite dir, {runs} runs): {}",
        median_range(&mut ms, "ms")
    );
    Ok(())
}

async fn rss(bin: &std::path::Path, runs: usize) -> Result<()> {
    let mut mb = Vec::new();
    for _ in 0..runs {
        let stack = Stack::start(bin).await?;
        stack.wait_all_serving(Duration::from_secs(10)).await?;
        // Idle: serving, one health check per service done, nothing else.
        tokio::time::sleep(Duration::from_secs(3)).await;
        mb.push(stack.rss_kib()? as f64 / 1024.0);
        stack.stop().await?;
    }
    println!(
        "idle RSS of `orchestrator up` ({runs} runs): {}",
        median_range(&mut mb, "MB")
    );
    Ok(())
}

async fn record_run(
    bin: &std::path::Path,
    concurrency: usize,
    seconds: u64,
    runs: usize,
) -> Result<()> {
    let sample = include_str!("sample_result.json");
    let mut rates = Vec::new();
    let mut p50s = Vec::new();
    let mut p99s = Vec::new();
    for run in 0..runs {
        let stack = Stack::start(bin).await?;
        stack.wait_all_serving(Duration::from_secs(10)).await?;
        let settings = ClientSettings {
            token: None,
            connect_timeout: Duration::from_secs(2),
            request_timeout: Duration::from_secs(10),
        };
        let url = stack.url(ServiceName::UsageLedger);
        let client = UsageLedgerClient::new(channel(ServiceName::UsageLedger, &url, &settings)?);
        let deadline = Instant::now() + Duration::from_secs(seconds);
        let mut tasks = Vec::new();
        for worker in 0..concurrency {
            let mut client = client.clone();
            tasks.push(tokio::spawn(async move {
                let mut lat = Vec::new();
                let mut n = 0u64;
                while Instant::now() < deadline {
                    let t = Instant::now();
                    client
                        .record_run(RecordRunRequest {
                            job_id: format!("bench-{run}-{worker}-{n}"),
                            attempt: 1,
                            work_item: format!("BENCH-{}", n % 50),
                            agent: "developer".into(),
                            output: sample.to_owned(),
                        })
                        .await
                        .context("RecordRun")?;
                    lat.push(t.elapsed().as_secs_f64() * 1000.0);
                    n += 1;
                }
                anyhow::Ok(lat)
            }));
        }
        let started = Instant::now();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await??);
        }
        let elapsed = started.elapsed().as_secs_f64();
        all.sort_by(f64::total_cmp);
        rates.push(all.len() as f64 / elapsed);
        p50s.push(stack::percentile(&all, 0.50));
        p99s.push(stack::percentile(&all, 0.99));
        stack.stop().await?;
    }
    println!(
        "RecordRun over gRPC on SQLite ({concurrency} callers, {seconds} s, {runs} runs): {}; latency p50 {}, p99 {}",
        median_range(&mut rates, "runs/s"),
        median_range(&mut p50s, "ms"),
        median_range(&mut p99s, "ms"),
    );
    Ok(())
}
