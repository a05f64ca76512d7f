//! `orchestrator-bench gateway`: signed Plane deliveries per second into the gateway's
//! durable inbox on SQLite, with p50/p99 latency.
//!
//! The gateway runs in a child process (this binary's hidden `gateway-server`), on its own
//! SQLite file, with its dispatcher on and a stand-in stage-engine in this process that
//! answers at once, so the inbox is written AND drained while the load runs. This process
//! drives it over HTTP/1.1 keep-alive connections:
//!
//! 1. open loop: `--rate` deliveries per second for `--seconds`, each request due at its
//!    scheduled time; latency is measured from that time (a late start counts, so a
//!    stalled server cannot hide behind fewer requests);
//! 2. closed loop: `--connections` senders as fast as they can for `--seconds`: the most
//!    the gateway takes.
//!
//! Every delivery is a distinct, correctly signed `issue` `created` body (the contract
//! sample with a fresh issue id); every answer must be 202. At the end the inbox must hold
//! each delivery exactly once, and each must have been applied once.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use orchestrator_kit::clients::Clients;
use orchestrator_kit::db::{self, Location};
use orchestrator_kit::{Config, Env, ServiceName};
use orchestrator_proto::stage_engine::v1::stage_engine_server::{StageEngine, StageEngineServer};
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, CreateWorkItemResponse, WorkItem,
};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio_util::sync::CancellationToken;

const SECRET: &str = "bench-secret";
const SAMPLE_ISSUE_ID: &str = "9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d";

#[derive(clap::Args)]
pub struct Args {
    /// Deliveries per second in the open-loop phase.
    #[arg(long, default_value_t = 3000)]
    rate: u32,
    /// Seconds per phase.
    #[arg(long, default_value_t = 10)]
    seconds: u32,
    /// Concurrent connections.
    #[arg(long, default_value_t = 32)]
    connections: usize,
    /// The Plane issue-created sample (`shared/contracts/plane-webhook-issue-created.json`).
    #[arg(
        long,
        default_value = "tests/contracts/plane-webhook-issue-created.json"
    )]
    sample: PathBuf,
}

#[derive(clap::Args)]
pub struct ServerArgs {
    #[arg(long)]
    data_dir: PathBuf,
    #[arg(long)]
    stage_engine_url: String,
}

/// The child: a gateway on 127.0.0.1:0 over SQLite in `data_dir`; prints its address.
pub async fn server(args: ServerArgs) -> anyhow::Result<()> {
    let mut env = Env::from_pairs([
        ("ORCH_STAGE_ENGINE_URL", args.stage_engine_url.as_str()),
        ("PLANE_WEBHOOK_SECRET", SECRET),
        ("ORCH_PLANE_DEFAULT_REPO", "acme/app"),
        ("ORCH_PLANE_BOT_USERS", "stream-bot"),
    ]);
    // The gateway's own knobs (every `ORCH_GATEWAY_*` in .env.example) pass through, to
    // compare settings.
    for (k, v) in std::env::vars() {
        if k.strip_prefix("ORCH_")
            .is_some_and(|r| r.starts_with("GATEWAY_"))
        {
            env = env.with(k, v);
        }
    }
    let config = Config::from_env(env.clone())?;
    let gw_config = gateway::GatewayConfig::from_env(&env)?;
    let db = db::open(
        ServiceName::Gateway,
        &Location::SqliteDir(args.data_dir),
        &gateway::MIGRATOR,
    )
    .await?;
    let gw = gateway::Gateway::new(db, gw_config, Clients::from_config(&config)?);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    println!("listening on {}", listener.local_addr()?);
    let stop = orchestrator_kit::shutdown::on_signal()?;
    gateway::serve(listener, gw, stop).await?;
    Ok(())
}

/// Answers every CreateWorkItem at once, counting them.
#[derive(Clone, Default)]
struct InstantStageEngine {
    creates: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl StageEngine for InstantStageEngine {
    async fn create_work_item(
        &self,
        request: tonic::Request<CreateWorkItemRequest>,
    ) -> Result<tonic::Response<CreateWorkItemResponse>, tonic::Status> {
        let n = self.creates.fetch_add(1, Ordering::Relaxed);
        let r = request.into_inner();
        Ok(tonic::Response::new(CreateWorkItemResponse {
            work_item: Some(WorkItem {
                key: format!("BENCH-{n}"),
                tracker_issue_id: r.tracker_issue_id,
                repo: r.repo,
                ..WorkItem::default()
            }),
            created: true,
        }))
    }
}

/// A distinct issue id per delivery, shaped like Plane's.
fn issue_id(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

struct Load {
    template: String,
    client: reqwest::Client,
    url: String,
    next_id: AtomicU64,
}

impl Load {
    /// Sends one signed delivery; returns its status.
    async fn send(&self) -> anyhow::Result<u16> {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let body = self.template.replace(SAMPLE_ISSUE_ID, &issue_id(n));
        let sig = gateway::signature::sign(SECRET.as_bytes(), body.as_bytes());
        let res = self
            .client
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-plane-delivery", format!("bench-{n}"))
            .header("x-plane-event", "issue")
            .header("x-plane-signature", sig)
            .body(body)
            .send()
            .await?;
        let status = res.status().as_u16();
        let _ = res.bytes().await?;
        Ok(status)
    }
}

struct Phase {
    sent: usize,
    errors: usize,
    elapsed: Duration,
    latencies_us: Vec<u64>,
}

impl Phase {
    fn report(&self, name: &str) {
        let mut l = self.latencies_us.clone();
        l.sort_unstable();
        let pct = |p: f64| -> f64 {
            if l.is_empty() {
                return 0.0;
            }
            let i = ((l.len() as f64 * p).ceil() as usize).clamp(1, l.len()) - 1;
            l[i] as f64 / 1000.0
        };
        println!(
            "{name:<12} {:>7} deliveries in {:>6.2} s = {:>7.0}/s   p50 {:>6.2} ms   p99 {:>6.2} ms   max {:>7.2} ms   non-202: {}",
            self.sent,
            self.elapsed.as_secs_f64(),
            self.sent as f64 / self.elapsed.as_secs_f64(),
            pct(0.50),
            pct(0.99),
            pct(1.0),
            self.errors,
        );
    }
}

async fn open_loop(load: &Arc<Load>, rate: u32, seconds: u32, connections: usize) -> Phase {
    let total = (rate as usize) * (seconds as usize);
    let next = Arc::new(AtomicUsize::new(0));
    let start = tokio::time::Instant::now() + Duration::from_millis(50);
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (load, next) = (Arc::clone(load), Arc::clone(&next));
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= total {
                    break;
                }
                let due = start + Duration::from_secs_f64(i as f64 / f64::from(rate));
                tokio::time::sleep_until(due).await;
                match load.send().await {
                    Ok(202) => {}
                    _ => errors += 1,
                }
                lat.push(u64::try_from(due.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            (lat, errors)
        }));
    }
    collect(tasks, start.into_std()).await
}

async fn closed_loop(load: &Arc<Load>, seconds: u32, connections: usize) -> Phase {
    let start = Instant::now();
    let end = start + Duration::from_secs(u64::from(seconds));
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let load = Arc::clone(load);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0;
            while Instant::now() < end {
                let t = Instant::now();
                match load.send().await {
                    Ok(202) => {}
                    _ => errors += 1,
                }
                lat.push(u64::try_from(t.elapsed().as_micros()).unwrap_or(u64::MAX));
            }
            (lat, errors)
        }));
    }
    collect(tasks, start).await
}

async fn collect(tasks: Vec<tokio::task::JoinHandle<(Vec<u64>, usize)>>, start: Instant) -> Phase {
    let mut latencies_us = Vec::new();
    let mut errors = 0;
    for t in tasks {
        if let Ok((l, e)) = t.await {
            latencies_us.extend(l);
            errors += e;
        }
    }
    Phase {
        sent: latencies_us.len(),
        errors,
        elapsed: start.elapsed(),
        latencies_us,
    }
}

/// User + system CPU time of a process so far, in seconds (clock ticks of 10 ms).
fn cpu_seconds(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // After the command: state is field 3, utime 14 and stime 15 (1-based in proc(5)).
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / 100.0)
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// The 1-, 5- and 15-minute load averages: figures mean little without them on a machine
/// shared with other work.
fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".to_owned())
}

async fn queue(addr: SocketAddr) -> anyhow::Result<serde_json::Value> {
    Ok(reqwest::get(format!("http://{addr}/queue"))
        .await?
        .json()
        .await?)
}

/// The parent: starts the stand-in stage-engine and the gateway child, drives the load,
/// checks the inbox, prints the figures.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let template = std::fs::read_to_string(&args.sample)
        .with_context(|| format!("cannot read the sample {}", args.sample.display()))?;
    if !template.contains(SAMPLE_ISSUE_ID) {
        bail!("{} is not the issue-created sample", args.sample.display());
    }

    let stage_engine = InstantStageEngine::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let se_url = format!("http://{}", listener.local_addr()?);
    let stop = CancellationToken::new();
    tokio::spawn(orchestrator_kit::grpc::serve(
        ServiceName::StageEngine,
        tonic::service::Routes::new(StageEngineServer::new(stage_engine.clone())),
        listener,
        stop.clone(),
    ));

    let dir = tempfile::tempdir()?;
    let mut child = tokio::process::Command::new(std::env::current_exe()?)
        .arg("gateway-server")
        .arg("--data-dir")
        .arg(dir.path())
        .arg("--stage-engine-url")
        .arg(&se_url)
        .env("ORCH_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()?;
    let pid = child.id().context("gateway child pid")?;
    let mut lines = BufReader::new(child.stdout.take().context("stdout")?).lines();
    let addr: SocketAddr = loop {
        let line = lines
            .next_line()
            .await?
            .context("the gateway exited early")?;
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.trim().parse()?;
        }
    };

    let load = Arc::new(Load {
        template,
        client: reqwest::Client::builder()
            .pool_max_idle_per_host(args.connections)
            .tcp_nodelay(true)
            .build()?,
        url: format!("http://{addr}/webhooks/plane"),
        next_id: AtomicU64::new(0),
    });

    println!(
        "gateway pid {pid} on {addr}, SQLite in {}, {} connections; {} cpus, load average {}",
        dir.path().display(),
        args.connections,
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        load_average()
    );
    // Warm-up: connections, the SQLite page cache.
    let warm = open_loop(&load, 500, 1, args.connections.min(8)).await;
    warm.report("warm-up");
    let child_pid = pid.to_string();
    let cpu = || {
        (
            cpu_seconds(&child_pid).unwrap_or(0.0),
            cpu_seconds("self").unwrap_or(0.0),
        )
    };
    let (g0, s0) = cpu();
    let open = open_loop(&load, args.rate, args.seconds, args.connections).await;
    open.report(&format!("open {}/s", args.rate));
    let (g1, s1) = cpu();
    let closed = closed_loop(&load, args.seconds, args.connections).await;
    closed.report("closed loop");
    let (g2, s2) = cpu();
    for (name, n, g, s) in [
        ("open", open.sent, g1 - g0, s1 - s0),
        ("closed", closed.sent, g2 - g1, s2 - s1),
    ] {
        println!(
            "cpu {name:<7} gateway {:>5.1} s = {:>5.0} us/delivery (ingest + dispatch); load generator {:>5.1} s",
            g,
            g * 1e6 / n.max(1) as f64,
            s
        );
    }

    // Every delivery is in the inbox once, and is applied once.
    let sent = load.next_id.load(Ordering::Relaxed);
    let drain_start = Instant::now();
    let mut q = queue(addr).await?;
    while q["inbox"]["applied"].as_u64() != Some(sent)
        && drain_start.elapsed() < Duration::from_secs(120)
    {
        tokio::time::sleep(Duration::from_millis(200)).await;
        q = queue(addr).await?;
    }
    let inbox = &q["inbox"];
    let rows = ["pending", "applied", "ignored", "dead"]
        .iter()
        .map(|s| inbox[s].as_u64().unwrap_or(0))
        .sum::<u64>();
    println!(
        "inbox: {rows} rows for {sent} deliveries; applied {}, pending {}, dead {}; stage-engine saw {} creates; drained {:.1} s after the load",
        inbox["applied"],
        inbox["pending"],
        inbox["dead"],
        stage_engine.creates.load(Ordering::Relaxed),
        drain_start.elapsed().as_secs_f64()
    );
    if let Some(kib) = peak_rss_kib(pid) {
        println!("gateway peak RSS: {:.1} MiB", kib as f64 / 1024.0);
    }
    println!("load average after: {}", load_average());
    let _ = child.start_kill();
    let _ = child.wait().await;
    stop.cancel();
    let creates = stage_engine.creates.load(Ordering::Relaxed);
    if rows != sent || creates > sent {
        bail!("lost or doubled deliveries: {rows} rows and {creates} creates for {sent} sent");
    }
    if inbox["applied"].as_u64() != Some(sent) {
        bail!("the inbox did not drain within 120 s");
    }
    Ok(())
}
