//! Benchmarks of the running system, measured from a second process against the real
//! `orchestrator` binary (build it first with `cargo build --release`).
//!
//! `cargo run --release -p orchestrator-bench -- all` runs every benchmark of the suite and
//! ends with ONE markdown table (every figure, its conditions and the command that
//! reproduces it) for `docs/benchmarks.md`; `all --smoke` runs them all at a tiny size (the
//! test suite does, in `bench/tests/smoke.rs`). Each benchmark is also its own subcommand.

mod gateway;
mod launcher;
mod pg_queue;
mod reaper;
mod report;
mod scaleout;
mod stack;
mod stage_engine;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use orchestrator_kit::ServiceName;
use orchestrator_kit::clients::{ClientSettings, UsageLedgerClient, channel};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;
use tokio::io::{AsyncBufReadExt, BufReader};

use crate::report::Row;
use crate::stack::{Stack, median_range};

#[derive(Parser)]
#[command(about = "Benchmarks of the running orchestrator")]
struct Cli {
    /// The orchestrator binary to measure (default: target/release/orchestrator).
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
    /// No-op job throughput on a durable PostgreSQL: the launcher's queue side by side with
    /// graphile-worker 0.17.3 (npm), and the ratio (no binary needed).
    PgQueue(pg_queue::Args),
    /// Signed `:approved:` webhook -> the architect's process started, p50/p99, on `serve`
    /// processes (PostgreSQL) and on `up` (SQLite).
    Dispatch(scaleout::DispatchArgs),
    /// Idle and busy RSS of every `serve` process (PostgreSQL) and of `up` (SQLite).
    Footprint(scaleout::FootprintArgs),
    /// Launcher replicas in their own processes on one PostgreSQL queue: every job run
    /// exactly once, and the throughput.
    ExactlyOnce(scaleout::ExactlyOnceArgs),
    /// The whole suite, then one markdown table of every figure.
    All(AllArgs),
}

/// The sizes of `all`; `--smoke` makes every one tiny.
#[derive(clap::Args, Clone, Debug)]
struct AllArgs {
    /// Tiny sizes: checks that every benchmark runs, measures nothing worth quoting.
    #[arg(long)]
    smoke: bool,
    /// No-op jobs per `pg-queue` run (graphile-worker and ours).
    #[arg(long, default_value_t = 20_000)]
    jobs: usize,
    /// Runs of each side of `pg-queue`.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// No-op LLM jobs in `pg-queue` (a process each; one run).
    #[arg(long, default_value_t = 20_000)]
    llm_jobs: usize,
    /// Approvals measured by `dispatch`, per shape.
    #[arg(long, default_value_t = 100)]
    samples: usize,
    /// Running jobs in `reaper-tick`.
    #[arg(long, default_value_t = 10_000)]
    reaper_jobs: usize,
    /// Seconds per phase of `gateway`, and its open-loop rate.
    #[arg(long, default_value_t = 10)]
    gateway_seconds: u32,
    #[arg(long, default_value_t = 3000)]
    gateway_rate: u32,
    /// `exactly-once`: launcher processes and jobs.
    #[arg(long, default_value_t = 4)]
    replicas: usize,
    #[arg(long, default_value_t = 10_000)]
    once_jobs: usize,
    /// `footprint`'s load: work items, no-op jobs, webhooks.
    #[arg(long, default_value_t = 50)]
    items: usize,
    #[arg(long, default_value_t = 1000)]
    footprint_jobs: usize,
    #[arg(long, default_value_t = 5000)]
    deliveries: usize,
    /// Leave graphile-worker out of `pg-queue` (no Node.js here).
    #[arg(long)]
    no_graphile: bool,
    /// Benchmarks to leave out, by subcommand name (`--skip gateway --skip footprint`).
    #[arg(long)]
    skip: Vec<String>,
}

impl AllArgs {
    fn smoke(mut self) -> AllArgs {
        if self.smoke {
            self.jobs = 200;
            self.runs = 1;
            self.llm_jobs = 50;
            self.samples = 3;
            self.reaper_jobs = 200;
            self.gateway_seconds = 1;
            self.gateway_rate = 100;
            self.once_jobs = 100;
            self.items = 3;
            self.footprint_jobs = 20;
            self.deliveries = 40;
        }
        self
    }
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let bin = cli.bin.unwrap_or_else(default_bin);
    // Only the benchmarks that exec `orchestrator` need the binary.
    let needs_bin = matches!(
        cli.what,
        What::Startup { .. }
            | What::Rss { .. }
            | What::RecordRun { .. }
            | What::Dispatch(_)
            | What::Footprint(_)
            | What::ExactlyOnce(_)
            | What::ReaperZombie { .. }
            | What::All(_)
    );
    anyhow::ensure!(
        !needs_bin || bin.is_file(),
        "{} not found: run `cargo build --release` first",
        bin.display()
    );
    // The stacks run in their own directories.
    let bin = std::fs::canonicalize(&bin).unwrap_or(bin);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.what {
        What::Gateway(args) => return rt.block_on(gateway::run(args)),
        What::GatewayServer(args) => return rt.block_on(gateway::server(args)),
        _ => {}
    }
    rt.block_on(async {
        println!("machine: {}", report::machine());
        if needs_bin {
            println!("binary: {}", bin.display());
        }
        let rows = match cli.what {
            What::ReaperTick {
                jobs,
                dead,
                ticks,
                postgres,
            } => {
                reaper::tick(jobs, dead, ticks, postgres).await?;
                Vec::new()
            }
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
                reaper::zombie(&bin, args).await?;
                Vec::new()
            }
            What::Startup { runs } => startup(&bin, runs).await?,
            What::Rss { runs } => rss(&bin, runs).await?,
            What::RecordRun {
                concurrency,
                seconds,
                runs,
            } => record_run(&bin, concurrency, seconds, runs).await?,
            What::StageEngine { items, postgres } => {
                stage_engine::run(items, postgres).await?;
                Vec::new()
            }
            What::Gateway(_) | What::GatewayServer(_) => Vec::new(),
            What::Launcher {
                jobs,
                latency_jobs,
                concurrency,
                runs,
                postgres,
            } => {
                launcher::run(jobs, latency_jobs, concurrency, runs, postgres).await?;
                Vec::new()
            }
            What::PgQueue(args) => pg_queue::run(args).await?,
            What::Dispatch(args) => scaleout::dispatch(&bin, args).await?,
            What::Footprint(args) => scaleout::footprint(&bin, args).await?,
            What::ExactlyOnce(args) => scaleout::exactly_once(&bin, args).await?,
            What::All(args) => return all(&bin, args.smoke()).await,
        };
        if !rows.is_empty() {
            println!("\n{}", report::table(&rows));
        }
        Ok(())
    })
}

/// Runs every benchmark (a failure is recorded and the rest still run), then prints the
/// table; fails when any benchmark did.
async fn all(bin: &Path, a: AllArgs) -> Result<()> {
    let load_before = report::load_average();
    let started = Instant::now();
    let mut rows: Vec<Row> = Vec::new();
    let mut failed: Vec<String> = Vec::new();
    let skip = |name: &str| a.skip.iter().any(|s| s == name);
    let mut record = |name: &str, result: Result<Vec<Row>>| match result {
        Ok(r) => rows.extend(r),
        Err(e) => {
            eprintln!("{name} FAILED: {e:#}");
            rows.push(Row::new(name, format!("FAILED: {e:#}"), "", name));
            failed.push(name.to_owned());
        }
    };
    let (startup_runs, record_seconds, record_runs) = if a.smoke { (2, 1, 1) } else { (20, 5, 3) };
    if !skip("startup") {
        println!("\n== startup");
        record("startup", startup(bin, startup_runs).await);
    }
    if !skip("record-run") {
        println!("\n== record-run");
        record(
            "record-run",
            record_run(bin, 32, record_seconds, record_runs).await,
        );
    }
    if !skip("pg-queue") {
        println!("\n== pg-queue");
        let args = pg_queue::Args {
            jobs: a.jobs,
            runs: a.runs,
            llm_jobs: a.llm_jobs,
            llm_runs: 1,
            concurrency: 10,
            graphile_dir: None,
            no_graphile: a.no_graphile,
        };
        record("pg-queue", pg_queue::run(args).await);
    }
    if !skip("dispatch") {
        println!("\n== dispatch");
        let args = scaleout::DispatchArgs {
            samples: a.samples,
            no_up: false,
            no_scale_out: false,
        };
        record("dispatch", scaleout::dispatch(bin, args).await);
    }
    if !skip("reaper-tick") {
        println!("\n== reaper-tick");
        let ticks = if a.smoke { 3 } else { 30 };
        let args = [
            "reaper-tick".to_owned(),
            "--jobs".to_owned(),
            a.reaper_jobs.to_string(),
            "--ticks".to_owned(),
            ticks.to_string(),
        ];
        let headlines = [Headline {
            prefix: "reaper tick",
            label: "reaper tick with N running jobs (`reaper-tick`)",
            split: true,
        }];
        record(
            "reaper-tick",
            child_bench(&args, &args.join(" "), &headlines).await,
        );
    }
    if !skip("gateway") {
        println!("\n== gateway");
        let sample = scaleout::contracts_dir().join("plane-webhook-issue-created.json");
        let shown = format!(
            "gateway --rate {} --seconds {}",
            a.gateway_rate, a.gateway_seconds
        );
        let args = [
            "gateway".to_owned(),
            "--rate".to_owned(),
            a.gateway_rate.to_string(),
            "--seconds".to_owned(),
            a.gateway_seconds.to_string(),
            "--sample".to_owned(),
            sample.display().to_string(),
        ];
        let headlines = [
            Headline {
                prefix: "open ",
                label: "webhook ingest, open loop (signed deliveries into the inbox, SQLite)",
                split: false,
            },
            Headline {
                prefix: "closed loop",
                label: "webhook ingest, closed loop: the most it takes",
                split: false,
            },
            Headline {
                prefix: "inbox:",
                label: "webhook ingest: every delivery stored and applied once",
                split: false,
            },
        ];
        record("gateway", child_bench(&args, &shown, &headlines).await);
    }
    if !skip("footprint") {
        println!("\n== footprint");
        let args = scaleout::FootprintArgs {
            items: a.items,
            jobs: a.footprint_jobs,
            deliveries: a.deliveries,
        };
        record("footprint", scaleout::footprint(bin, args).await);
    }
    if !skip("exactly-once") {
        println!("\n== exactly-once");
        let args = scaleout::ExactlyOnceArgs {
            replicas: a.replicas,
            jobs: a.once_jobs,
            concurrency: 16,
        };
        record("exactly-once", scaleout::exactly_once(bin, args).await);
    }
    println!(
        "\n## orchestrator-bench all{}\n\nmachine: {}  \nload average (1/5/15 min): {load_before} before, {} after; {:.0} min in all  \nbinary: {}\n\n{}",
        if a.smoke {
            " --smoke (sizes too small to quote)"
        } else {
            ""
        },
        report::machine(),
        report::load_average(),
        started.elapsed().as_secs_f64() / 60.0,
        bin.display(),
        report::table(&rows)
    );
    anyhow::ensure!(failed.is_empty(), "failed: {}", failed.join(", "));
    Ok(())
}

/// How `child_bench` makes a row of a line the child printed.
struct Headline {
    /// The line starts with this.
    prefix: &'static str,
    /// The row's figure.
    label: &'static str,
    /// `<conditions>: <figure>` (split at the first ": "), or the whole line is the figure.
    split: bool,
}

/// Runs `orchestrator-bench <args>` as a child (a benchmark whose owner prints its figures),
/// echoes its output, and makes a row of each line that starts with a headline's prefix.
/// `shown` is the command as the table gives it.
async fn child_bench(args: &[String], shown: &str, headlines: &[Headline]) -> Result<Vec<Row>> {
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .context("cannot run the benchmark as a child")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let mut rows = Vec::new();
    while let Some(line) = lines.next_line().await? {
        println!("{line}");
        let Some(h) = headlines.iter().find(|h| line.trim().starts_with(h.prefix)) else {
            continue;
        };
        // Column padding means nothing in a table cell.
        let line = line.split_whitespace().collect::<Vec<_>>().join(" ");
        let (conditions, measured) = match line.split_once(": ") {
            Some((c, m)) if h.split => (c.to_owned(), m.to_owned()),
            _ => ("as printed by the benchmark".to_owned(), line.clone()),
        };
        rows.push(Row::new(h.label, measured, conditions, shown));
    }
    let status = child.wait().await?;
    anyhow::ensure!(status.success(), "`{shown}` exited with {status}");
    anyhow::ensure!(
        !rows.is_empty(),
        "`{shown}` printed none of its headline lines"
    );
    Ok(rows)
}

fn default_bin() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    target.join("release/orchestrator")
}

async fn startup(bin: &Path, runs: usize) -> Result<Vec<Row>> {
    let mut ms = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let stack = Stack::start(bin).await?;
        stack.wait_all_serving(Duration::from_secs(10)).await?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
        stack.stop().await?;
    }
    let measured = median_range(&mut ms, "ms");
    println!("startup: exec -> every service SERVING (fresh SQLite dir, {runs} runs): {measured}");
    Ok(vec![Row::new(
        "start-up of `orchestrator up`: exec -> every service SERVING",
        measured,
        format!("fresh SQLite dir (every migration runs), {runs} runs"),
        format!("startup --runs {runs}"),
    )])
}

async fn rss(bin: &Path, runs: usize) -> Result<Vec<Row>> {
    let mut mb = Vec::new();
    for _ in 0..runs {
        let stack = Stack::start(bin).await?;
        stack.wait_all_serving(Duration::from_secs(10)).await?;
        // Idle: serving, one health check per service done, nothing else.
        tokio::time::sleep(Duration::from_secs(3)).await;
        mb.push(stack.rss_kib()? as f64 / 1024.0);
        stack.stop().await?;
    }
    let measured = median_range(&mut mb, "MB");
    println!("idle RSS of `orchestrator up` ({runs} runs): {measured}");
    Ok(vec![Row::new(
        "idle RSS of `orchestrator up`",
        measured,
        format!("VmRSS 3 s after every part answered, {runs} runs"),
        format!("rss --runs {runs}"),
    )])
}

async fn record_run(bin: &Path, concurrency: usize, seconds: u64, runs: usize) -> Result<Vec<Row>> {
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
                            ..Default::default()
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
    let measured = format!(
        "{}; latency p50 {}, p99 {}",
        median_range(&mut rates, "runs/s"),
        median_range(&mut p50s, "ms"),
        median_range(&mut p99s, "ms"),
    );
    println!(
        "RecordRun over gRPC on SQLite ({concurrency} callers, {seconds} s, {runs} runs): {measured}"
    );
    Ok(vec![Row::new(
        "`RecordRun` over gRPC, `up` on SQLite",
        measured,
        format!(
            "{concurrency} concurrent callers, {seconds} s, {runs} runs, a real 1.7 KB CLI result each"
        ),
        format!("record-run --concurrency {concurrency} --seconds {seconds} --runs {runs}"),
    )])
}
