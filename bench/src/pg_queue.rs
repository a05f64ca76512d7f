//! `pg-queue`: no-op job throughput on PostgreSQL, the launcher's queue side by side with
//! graphile-worker 0.17.3 (npm) in the same run, on the same PostgreSQL, with the same N and
//! counted the same way (`shared/design/BENCHMARKS.md`): N jobs enqueued first, `ANALYZE`
//! and `CHECKPOINT`, then the workers started with concurrency 10; jobs/s = N / (first task
//! start -> queue empty); every job checked to have run exactly once.
//!
//! PostgreSQL is one durable cluster this process starts (initdb's defaults: `fsync`,
//! `synchronous_commit` and `full_page_writes` on), a fresh database per run. The runs
//! interleave (graphile configs, then ours, again) so that a change of load on the machine
//! touches every side alike.
//!
//! graphile-worker is installed OUTSIDE the repository (`--graphile-dir`, by default
//! `~/.cache/orchestrator/graphile-worker`) with `npm install graphile-worker@0.17.3`, and
//! driven by our own script `bench/graphile/noop-throughput.js`.
//!
//! Ours: the launcher's queue over its real storage in this process, peers answering at
//! once (`launcher.rs`). A reserved job (`post-deploy-monitor`, whose `Tick` answers done)
//! is the queue alone: claim, an in-process call, settle — the counterpart of graphile's
//! in-process no-op task. An LLM job spawns a real agent process and does its whole
//! bookkeeping; it is shown for scale, not for the ratio.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use orchestrator_testkit::PgCluster;

use crate::report::{Row, median, median_range, thousands};

/// The graphile-worker version of the anchor in BENCHMARKS.md.
pub const GRAPHILE_VERSION: &str = "0.17.3";

/// graphile-worker's configurations: the default, and its batching ones.
pub const GRAPHILE_CONFIGS: [(&str, &str); 3] = [
    ("default", "default (no batching)"),
    ("local-queue-11", "localQueue.size 11, batch delays 0"),
    ("local-queue-500", "localQueue.size 500, batch delays 0"),
];

#[derive(clap::Args, Clone, Debug)]
pub struct Args {
    /// Jobs per run (graphile-worker and reserved jobs).
    #[arg(long, default_value_t = 20_000)]
    pub jobs: usize,
    /// Runs of each side.
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    /// Jobs per run of LLM no-op jobs (a process each); 0 leaves them out.
    #[arg(long, default_value_t = 20_000)]
    pub llm_jobs: usize,
    /// Runs of LLM no-op jobs.
    #[arg(long, default_value_t = 1)]
    pub llm_runs: usize,
    /// Jobs at once (graphile's `concurrency`; our ORCH_MAX_CONCURRENCY and reserved jobs
    /// in flight).
    #[arg(long, default_value_t = 10)]
    pub concurrency: u32,
    /// Where graphile-worker is installed (npm), outside the repository.
    #[arg(long)]
    pub graphile_dir: Option<PathBuf>,
    /// Leave graphile-worker out (no Node.js here): our side only.
    #[arg(long)]
    pub no_graphile: bool,
}

impl Args {
    /// The command line that reproduces a run with these sizes.
    fn command(&self) -> String {
        format!(
            "pg-queue --jobs {} --runs {} --llm-jobs {} --llm-runs {}",
            self.jobs, self.runs, self.llm_jobs, self.llm_runs
        )
    }
}

/// `~/.cache/orchestrator/graphile-worker`.
fn default_graphile_dir() -> PathBuf {
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("/tmp"), PathBuf::from);
    home.join(".cache/orchestrator/graphile-worker")
}

/// The committed driver script.
fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("graphile/noop-throughput.js")
}

fn installed_version(dir: &Path) -> Option<String> {
    let text =
        std::fs::read_to_string(dir.join("node_modules/graphile-worker/package.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["version"].as_str().map(str::to_owned)
}

/// Installs graphile-worker into `dir` unless that version is there already.
pub fn install_graphile(dir: &Path) -> anyhow::Result<()> {
    if installed_version(dir).as_deref() == Some(GRAPHILE_VERSION) {
        return Ok(());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    println!(
        "installing graphile-worker@{GRAPHILE_VERSION} into {} (npm)",
        dir.display()
    );
    let out = Command::new("npm")
        .args([
            "install",
            "--no-audit",
            "--no-fund",
            "--no-save",
            "--prefix",
        ])
        .arg(dir)
        .arg(format!("graphile-worker@{GRAPHILE_VERSION}"))
        .output()
        .context("cannot run npm (Node.js and npm are needed for graphile-worker)")?;
    if !out.status.success() {
        bail!(
            "npm install graphile-worker@{GRAPHILE_VERSION} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    match installed_version(dir) {
        Some(v) if v == GRAPHILE_VERSION => Ok(()),
        other => bail!("npm installed graphile-worker {other:?}, not {GRAPHILE_VERSION}"),
    }
}

/// One graphile-worker run on a fresh database: jobs/s.
async fn graphile_run(
    cluster: &PgCluster,
    dir: &Path,
    jobs: usize,
    config: &str,
) -> anyhow::Result<f64> {
    let url = cluster.fresh_database().await;
    let out = tokio::process::Command::new("node")
        .arg(script())
        .arg(&url)
        .arg(jobs.to_string())
        .arg(config)
        .env("NODE_PATH", dir.join("node_modules"))
        .output()
        .await
        .context("cannot run node")?;
    if !out.status.success() {
        bail!(
            "graphile-worker ({config}) failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let line = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(line.trim())
        .with_context(|| format!("graphile-worker's driver printed {line}"))?;
    anyhow::ensure!(
        v["exactly_once"] == true && v["jobs"].as_u64() == Some(jobs as u64),
        "graphile-worker's run is not exactly-once: {v}"
    );
    v["jobs_per_s"].as_f64().context("jobs_per_s")
}

/// Runs the comparison; prints each run as it ends and returns the figures.
pub async fn run(args: Args) -> anyhow::Result<Vec<Row>> {
    let cluster = orchestrator_testkit::durable_cluster().map_err(anyhow::Error::msg)?;
    anyhow::ensure!(cluster.durable, "the cluster must be durable");
    let pg_version = crate::report::postgres_version(cluster).await;
    let graphile_dir = args
        .graphile_dir
        .clone()
        .unwrap_or_else(default_graphile_dir);
    let with_graphile = !args.no_graphile;
    if with_graphile {
        install_graphile(&graphile_dir)?;
    }
    println!(
        "pg-queue: {} jobs x {} runs, concurrency {}, {pg_version} (durable: initdb defaults, fsync on), a fresh database per run",
        args.jobs, args.runs, args.concurrency
    );
    let mut graphile: Vec<Vec<f64>> = vec![Vec::new(); GRAPHILE_CONFIGS.len()];
    let mut reserved = Vec::new();
    for run in 1..=args.runs {
        if with_graphile {
            for (i, (config, _)) in GRAPHILE_CONFIGS.iter().enumerate() {
                let rate = graphile_run(cluster, &graphile_dir, args.jobs, config).await?;
                println!("  run {run}: graphile-worker {config:<16} {rate:>8.0} jobs/s");
                graphile[i].push(rate);
            }
        }
        let url = cluster.fresh_database().await;
        let rate = crate::launcher::throughput(
            &Some(url),
            args.jobs,
            args.concurrency,
            "post-deploy-monitor",
        )
        .await?;
        println!("  run {run}: launcher, reserved jobs  {rate:>8.0} jobs/s");
        reserved.push(rate);
    }
    let mut llm = Vec::new();
    let llm_runs = if args.llm_jobs == 0 { 0 } else { args.llm_runs };
    for run in 1..=llm_runs {
        let url = cluster.fresh_database().await;
        let rate = crate::launcher::throughput(&Some(url), args.llm_jobs, args.concurrency, "noop")
            .await?;
        println!("  run {run}: launcher, LLM jobs       {rate:>8.0} jobs/s");
        llm.push(rate);
    }

    let command = args.command();
    let conditions = |n: usize, runs: usize| {
        format!(
            "N = {}, concurrency {}, {runs} run(s), {pg_version} durable (fsync on), same cluster",
            thousands(n as f64),
            args.concurrency
        )
    };
    let mut rows = Vec::new();
    let ours = median(&mut reserved.clone());
    if with_graphile {
        for (i, (_, label)) in GRAPHILE_CONFIGS.iter().enumerate() {
            rows.push(Row::new(
                format!("no-op jobs/s, graphile-worker {GRAPHILE_VERSION}, {label}"),
                median_range(&mut graphile[i], "jobs/s"),
                conditions(args.jobs, args.runs),
                &command,
            ));
        }
    }
    rows.push(Row::new(
        "no-op jobs/s, launcher, reserved jobs (no process: comparable to graphile's in-process task)",
        median_range(&mut reserved, "jobs/s"),
        conditions(args.jobs, args.runs),
        &command,
    ));
    if with_graphile {
        let ratios: Vec<String> = GRAPHILE_CONFIGS
            .iter()
            .enumerate()
            .map(|(i, (config, _))| {
                format!("{:.2}x {config}", ours / median(&mut graphile[i].clone()))
            })
            .collect();
        rows.push(Row::new(
            "ratio launcher (reserved) / graphile-worker, medians",
            ratios.join("; "),
            conditions(args.jobs, args.runs),
            &command,
        ));
    }
    if !llm.is_empty() {
        rows.push(Row::new(
            "no-op jobs/s, launcher, LLM jobs (a real agent process each, full bookkeeping)",
            median_range(&mut llm, "jobs/s"),
            conditions(args.llm_jobs, args.llm_runs),
            &command,
        ));
    }
    Ok(rows)
}
