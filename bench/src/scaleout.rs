//! The benchmarks of the whole system as an operator runs it, against the real
//! `orchestrator` binary:
//!
//! - `dispatch`: a signed Plane `:approved:` comment into the gateway (202) -> its inbox and
//!   dispatcher -> `StageEngine.Approve` (the analysis gate re-run over the branch in the
//!   forge) -> the outbox -> `Launcher.Enqueue(architect)` -> claim -> checkout of the
//!   branch -> the agent process, whose FIRST action writes `$EPOCHREALTIME`: latency =
//!   that time - the wall clock before the POST (the same clock). One approval at a time,
//!   each on a quiet stack (the previous architect's run has ended).
//! - `footprint`: VmRSS of every process idle, the most VmRSS seen while a load runs, and
//!   VmHWM after it — each service as `orchestrator serve` on PostgreSQL, and the
//!   all-in-one `orchestrator up` on SQLite.
//! - `exactly-once`: launcher replicas in their own processes on one PostgreSQL queue,
//!   thousands of no-op LLM jobs enqueued through all of them; the agent records each run
//!   in its job's file (`orchestrator_testkit::agent`), so a job that ran twice shows it.
//!
//! The scale-out stack is `orchestrator_testkit::procs::ProcStack` (every service its own
//! `serve` process) on the bench's durable PostgreSQL cluster (initdb's defaults); the
//! all-in-one is `orchestrator up` on SQLite files. The tracker is the local one; the forge
//! a bare repository on disk (`ORCH_FORGE=local`), so git runs for real.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail, ensure};
use orchestrator_forge::RepoName;
use orchestrator_forge::local::LocalForge;
use orchestrator_kit::clients::{ClientSettings, Clients, LauncherClient, channel};
use orchestrator_kit::{Config, Env, ServiceName};
use orchestrator_proto::launcher::v1::{
    EnqueueRequest, JobStatus, ListJobsRequest, QueueSnapshotRequest,
};
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, GetWorkItemRequest, ListTransitionsRequest, ListWorkItemsRequest,
};
use orchestrator_testkit::agent::{Behaviour, RecordingAgent};
use orchestrator_testkit::procs::{ProcStack, ProcStackSpec, launcher_name};

use crate::report::{Row, thousands};
use crate::stack::{Stack, percentile};

const REPO: &str = "acme/app";
const SECRET: &str = "bench-secret";
/// The gateway looks a Plane issue's work item up among the first 100 awaiting approval,
/// so approvals go in batches of at most this many items.
const BATCH: usize = 100;

/// What every stack of these benches shares: the agent, its prompts, the forge.
pub struct World {
    dir: tempfile::TempDir,
    /// The agent: it records every run (`orchestrator_testkit::agent`); its first action
    /// notes the time. The analyst writes what the analysis gate needs; the others write
    /// nothing, so an architect's gate fails and (no stage retries) its item parks as
    /// blocked.
    agent: RecordingAgent,
    env: Vec<(String, String)>,
}

impl World {
    /// Writes the agent and its prompts, creates the bare repository.
    pub async fn new(max_concurrency: u32) -> anyhow::Result<World> {
        let dir = tempfile::tempdir()?;
        let root = dir.path();
        let (agents, forge) = (root.join("agents"), root.join("forge"));
        std::fs::create_dir_all(&agents)?;
        // The launcher starts only with a prompt for every role.
        for role in stage_engine::pipeline::ROLES
            .iter()
            .copied()
            .chain(["noop"])
        {
            std::fs::write(agents.join(format!("{role}.md")), "Benchmark agent.\n")?;
        }
        LocalForge::new(forge.clone(), "main".into())
            .init_repo(&RepoName::parse(REPO).map_err(anyhow::Error::msg)?)
            .await
            .context("the bare repository")?;
        let agent = RecordingAgent::create(&root.join("agent"), &Behaviour::default())?;
        let s = |p: &Path| p.display().to_string();
        let env = [
            ("ORCH_AGENT_COMMAND", agent.command()),
            // The recording agent writes its records outside the checkout, which the
            // sandbox forbids.
            ("ORCH_AGENT_SANDBOX", "off".into()),
            ("ORCH_AGENTS_DIR", s(&agents)),
            ("ORCH_FORGE", "local".into()),
            ("ORCH_FORGE_LOCAL_DIR", s(&forge)),
            ("ORCH_TRACKER", "local".into()),
            ("PLANE_WEBHOOK_SECRET", SECRET.into()),
            ("ORCH_PLANE_BOT_USERS", "stream-bot".into()),
            ("ORCH_PLANE_DEFAULT_REPO", REPO.into()),
            ("GITEA_WEBHOOK_SECRET", SECRET.into()),
            ("ORCH_MAX_CONCURRENCY", max_concurrency.to_string()),
            ("ORCH_MAX_STAGE_RETRIES", "0".into()),
            ("ORCH_LOG", "warn".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
        Ok(World { dir, agent, env })
    }

    /// Where `ProcStack` keeps its processes' directories.
    fn stack_dir(&self) -> PathBuf {
        self.dir.path().join("stack")
    }
}

/// A running stack: its processes by name, its clients, its gateway.
pub struct Target {
    /// `serve` processes, or `None` for `up`.
    procs: Option<ProcStack>,
    up: Option<Stack>,
    pub clients: Clients,
    pub gateway: SocketAddr,
    /// What the figures name it: "`serve` processes, PostgreSQL" or "`up`, SQLite".
    pub shape: &'static str,
}

impl Target {
    /// Every service in its own `serve` process on a fresh database of the durable cluster,
    /// with `launchers` launcher replicas.
    pub async fn scale_out(bin: &Path, world: &World, launchers: usize) -> anyhow::Result<Target> {
        let cluster = orchestrator_testkit::durable_cluster().map_err(anyhow::Error::msg)?;
        let mut spec = ProcStackSpec::new(bin, world.stack_dir())
            .postgres(cluster.fresh_database().await)
            .launchers(launchers);
        for (k, v) in &world.env {
            spec = spec.var(k, v);
        }
        let stack = ProcStack::start(spec).await.map_err(anyhow::Error::msg)?;
        let config = Config::from_env(Env::from_pairs(stack.client_env()))?;
        Ok(Target {
            clients: Clients::from_config(&config)?,
            gateway: stack.addr(ServiceName::Gateway.as_str()),
            procs: Some(stack),
            up: None,
            shape: "`serve` processes, PostgreSQL",
        })
    }

    /// `orchestrator up` on SQLite.
    pub async fn all_in_one(bin: &Path, world: &World) -> anyhow::Result<Target> {
        let stack = Stack::start_with(bin, &world.env).await?;
        stack.wait_all_serving(Duration::from_secs(30)).await?;
        let mut env = Env::default();
        for part in ServiceName::ALL {
            env = env.with(orchestrator_kit::config::url_var(part), stack.url(part));
        }
        let config = Config::from_env(env)?;
        Ok(Target {
            clients: Clients::from_config(&config)?,
            gateway: stack.addr(ServiceName::Gateway).parse()?,
            procs: None,
            up: Some(stack),
            shape: "`up`, SQLite",
        })
    }

    /// The processes by name, with their pids.
    pub fn pids(&self) -> Vec<(String, u32)> {
        match (&self.procs, &self.up) {
            (Some(p), _) => p
                .names()
                .into_iter()
                .filter_map(|n| p.pid(&n).map(|pid| (n, pid)))
                .collect(),
            (None, Some(u)) => u.pid().map(|p| vec![("up".into(), p)]).unwrap_or_default(),
            (None, None) => Vec::new(),
        }
    }

    /// A client of each launcher replica.
    fn launchers(&self) -> anyhow::Result<Vec<LauncherClient>> {
        let Some(p) = &self.procs else {
            return Ok(vec![self.clients.launcher.clone()]);
        };
        let settings = ClientSettings {
            token: None,
            connect_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
        };
        p.names()
            .iter()
            .filter(|n| n.starts_with("launcher-"))
            .map(|n| {
                let url = format!("http://{}", p.addr(n));
                Ok(LauncherClient::new(channel(
                    ServiceName::Launcher,
                    &url,
                    &settings,
                )?))
            })
            .collect()
    }

    /// Stops every process (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(self) {
        if let Some(mut p) = self.procs {
            p.stop_all(Duration::from_secs(10));
        }
        if let Some(u) = self.up {
            let _ = u.stop().await;
        }
    }
}

fn now_s() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// A Plane issue id (a UUID) per work item.
fn issue_id(n: usize) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

fn key(n: usize) -> String {
    format!("BENCH-{}", n + 1)
}

/// `shared/contracts`, beside the repository (or `ORCH_CONTRACTS_DIR`).
pub fn contracts_dir() -> PathBuf {
    orchestrator_testkit::contracts_dir()
}

/// Signed Plane `issue_comment` deliveries, built from the contract's sample.
struct Webhooks {
    sample: serde_json::Value,
    http: reqwest::Client,
    url: String,
}

impl Webhooks {
    fn new(gateway: SocketAddr) -> anyhow::Result<Webhooks> {
        let path = contracts_dir().join("plane-webhook-issue_comment-created.json");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("the Plane comment sample {}", path.display()))?;
        Ok(Webhooks {
            sample: serde_json::from_str(&text)?,
            http: reqwest::Client::builder().tcp_nodelay(true).build()?,
            url: format!("http://{gateway}/webhooks/plane"),
        })
    }

    /// Posts a comment on issue `n` (`:approved:` by a human, or plain text); its status.
    async fn comment(&self, n: usize, delivery: &str, approve: bool) -> anyhow::Result<u16> {
        let mut body = self.sample.clone();
        body["data"]["id"] = serde_json::Value::String(format!("comment-{delivery}"));
        body["data"]["issue"] = issue_id(n).into();
        body["data"]["comment_html"] = if approve {
            "<p>:approved:</p>".into()
        } else {
            format!("<p>note {delivery}</p>").into()
        };
        let bytes = serde_json::to_vec(&body)?;
        let res = self
            .http
            .post(&self.url)
            .header("content-type", "application/json")
            .header("x-plane-delivery", delivery)
            .header("x-plane-event", "issue_comment")
            .header(
                "x-plane-signature",
                gateway::signature::sign(SECRET.as_bytes(), &bytes),
            )
            .body(bytes)
            .send()
            .await?;
        let status = res.status().as_u16();
        let _ = res.bytes().await;
        Ok(status)
    }
}

/// Creates work items `range` and waits until every one waits for approval (its analyst
/// ran, committed and pushed, and passed the gate).
async fn to_the_human_gate(t: &Target, range: std::ops::Range<usize>) -> anyhow::Result<()> {
    let want = range.len();
    for n in range {
        t.clients
            .stage_engine
            .clone()
            .create_work_item(CreateWorkItemRequest {
                tracker_issue_id: issue_id(n),
                key: key(n),
                title: format!("Benchmark item {}", n + 1),
                repo: REPO.into(),
                ..Default::default()
            })
            .await
            .context("CreateWorkItem")?;
    }
    let deadline = Instant::now() + Duration::from_secs(60 + 2 * want as u64);
    loop {
        let waiting = t
            .clients
            .stage_engine
            .clone()
            .list_work_items(ListWorkItemsRequest {
                status: "awaiting_approval".into(),
                limit: 1000,
                ..Default::default()
            })
            .await?
            .into_inner()
            .work_items
            .len();
        if waiting >= want {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "only {waiting} of {want} work items reached the human gate"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn status_of(t: &Target, key: &str) -> anyhow::Result<String> {
    Ok(t.clients
        .stage_engine
        .clone()
        .get_work_item(GetWorkItemRequest { key: key.into() })
        .await?
        .into_inner()
        .status)
}

/// One approval's way from the POST to the agent, in seconds from the POST; the middle
/// steps come from the services' own millisecond stamps.
#[derive(Debug, Default, Clone)]
struct Sample {
    /// The gateway's 202.
    acked: f64,
    /// stage-engine committed the move to architecture (its transition's time).
    approved: f64,
    /// The launcher stored the architect's job.
    enqueued: f64,
    /// The launcher claimed it.
    claimed: f64,
    /// The agent process ran its first line.
    started: f64,
}

/// The stamps of the architect's run of `key`, relative to `t0`.
async fn stamps(t: &Target, key: &str, t0: f64) -> anyhow::Result<(f64, f64, f64)> {
    let transitions = t
        .clients
        .stage_engine
        .clone()
        .list_transitions(ListTransitionsRequest {
            work_item: key.into(),
        })
        .await?
        .into_inner()
        .transitions;
    let approved = transitions
        .iter()
        .filter(|tr| tr.to_stage == "architecture")
        .map(|tr| tr.at_ms)
        .min()
        .context("no transition to architecture")?;
    let job = t
        .clients
        .launcher
        .clone()
        .list_jobs(ListJobsRequest {
            work_item: key.into(),
            agent: "architect".into(),
            ..Default::default()
        })
        .await?
        .into_inner()
        .jobs
        .into_iter()
        .next()
        .context("no architect job")?;
    let rel = |ms: i64| ms as f64 / 1e3 - t0;
    Ok((
        rel(approved),
        rel(job.enqueued_at_ms),
        rel(job.started_at_ms),
    ))
}

/// Dispatch latencies on `t`, `samples` approvals one at a time.
async fn dispatch_on(t: &Target, world: &World, samples: usize) -> anyhow::Result<Vec<Sample>> {
    let hooks = Webhooks::new(t.gateway)?;
    let mut out = Vec::new();
    let mut next = 0;
    while next < samples {
        let batch = next..(next + BATCH).min(samples);
        to_the_human_gate(t, batch.clone()).await?;
        for n in batch {
            let k = key(n);
            let t0 = now_s();
            let status = hooks.comment(n, &format!("approve-{n}"), true).await?;
            let acked = now_s() - t0;
            ensure!(status == 202, "the approval of {k} was answered {status}");
            let deadline = Instant::now() + Duration::from_secs(60);
            let started = loop {
                if let Some(at) = world.agent.first_start(&k, "architect") {
                    break at - t0;
                }
                ensure!(
                    Instant::now() < deadline,
                    "the architect of {k} never started"
                );
                tokio::time::sleep(Duration::from_micros(500)).await;
            };
            // A quiet stack for the next sample: the architect's run is over.
            while status_of(t, &k).await? != "blocked" {
                ensure!(
                    Instant::now() < deadline,
                    "{k} never parked after its architect"
                );
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let (approved, enqueued, claimed) = stamps(t, &k, t0).await?;
            out.push(Sample {
                acked,
                approved,
                enqueued,
                claimed,
                started,
            });
        }
        next += BATCH;
    }
    Ok(out)
}

fn ms(v: f64) -> String {
    format!("{:.1}", v * 1e3)
}

/// `p50 a / p90 b / p99 c ms (max d)`.
fn latency_summary(values: &mut [f64]) -> String {
    values.sort_by(f64::total_cmp);
    format!(
        "p50 {} / p90 {} / p99 {} ms (max {})",
        ms(percentile(values, 0.50)),
        ms(percentile(values, 0.90)),
        ms(percentile(values, 0.99)),
        ms(values.last().copied().unwrap_or_default())
    )
}

#[derive(clap::Args, Clone, Debug)]
pub struct DispatchArgs {
    /// Approvals measured per shape, one at a time.
    #[arg(long, default_value_t = 100)]
    pub samples: usize,
    /// Leave out the all-in-one `up` on SQLite.
    #[arg(long)]
    pub no_up: bool,
    /// Leave out the `serve` processes on PostgreSQL.
    #[arg(long)]
    pub no_scale_out: bool,
}

/// `dispatch`: webhook accepted -> agent process started, on each shape.
pub async fn dispatch(bin: &Path, args: DispatchArgs) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let command = format!("dispatch --samples {}", args.samples);
    for scale_out in [true, false] {
        if (scale_out && args.no_scale_out) || (!scale_out && args.no_up) {
            continue;
        }
        let world = World::new(4).await?;
        let t = if scale_out {
            Target::scale_out(bin, &world, 1).await?
        } else {
            Target::all_in_one(bin, &world).await?
        };
        let shape = t.shape;
        let samples = dispatch_on(&t, &world, args.samples).await?;
        t.stop().await;
        let column = |f: fn(&Sample) -> f64| samples.iter().map(f).collect::<Vec<f64>>();
        let started = latency_summary(&mut column(|s| s.started));
        let acked = latency_summary(&mut column(|s| s.acked));
        // Medians of each step (ms stamps of the services; steps can round to 0).
        let step = |f: fn(&Sample) -> f64| {
            let mut v = column(f);
            ms(crate::report::median(&mut v))
        };
        let split = format!(
            "medians: 202 {}; gateway -> Approve committed {}; -> job enqueued {}; -> claimed {}; -> agent's first line {} ms",
            step(|s| s.acked),
            step(|s| s.approved - s.acked),
            step(|s| s.enqueued - s.approved),
            step(|s| s.claimed - s.enqueued),
            step(|s| s.started - s.claimed),
        );
        println!(
            "dispatch ({shape}, {} approvals one at a time): webhook -> agent started {started}; webhook -> 202 {acked}; {split}",
            args.samples
        );
        rows.push(Row::new(
            format!("dispatch latency, signed `:approved:` webhook -> architect's process started ({shape})"),
            started,
            format!(
                "{} approvals one at a time, each on a quiet stack; the gate re-run over the forge and the git checkout of the branch included; the 202: {acked}; {split}",
                args.samples
            ),
            &command,
        ));
    }
    Ok(rows)
}

/// VmRSS and VmHWM of a process, in KiB.
fn rss_hwm(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

#[derive(clap::Args, Clone, Debug)]
pub struct FootprintArgs {
    /// Work items taken through the analyst and approved by webhook during the load.
    #[arg(long, default_value_t = 50)]
    pub items: usize,
    /// No-op LLM jobs enqueued straight into the launcher during the load.
    #[arg(long, default_value_t = 1000)]
    pub jobs: usize,
    /// Signed webhook deliveries (plain comments, stored and ignored) during the load.
    #[arg(long, default_value_t = 5000)]
    pub deliveries: usize,
}

/// The load of `footprint`: work items through the pipeline's first stages, no-op jobs and
/// a stream of webhooks, all at once. Waits until all of it has settled.
async fn load(t: &Target, args: &FootprintArgs) -> anyhow::Result<()> {
    let items = args.items.min(BATCH);
    let hooks = Arc::new(Webhooks::new(t.gateway)?);
    let launchers = t.launchers()?;
    let jobs = {
        let launchers = launchers.clone();
        let n = args.jobs;
        tokio::spawn(async move {
            for i in 0..n {
                launchers[i % launchers.len()]
                    .clone()
                    .enqueue(EnqueueRequest {
                        work_item: format!("LOAD-{}", i + 1),
                        repo: REPO.into(),
                        agent: "noop".into(),
                        stage: "development".into(),
                        payload_json: format!(r#"{{"branch":"orch/LOAD-{}"}}"#, i + 1),
                        ..Default::default()
                    })
                    .await?;
            }
            anyhow::Ok(())
        })
    };
    let mut senders = Vec::new();
    for s in 0..8 {
        let hooks = hooks.clone();
        let n = args.deliveries;
        senders.push(tokio::spawn(async move {
            for i in (s..n).step_by(8) {
                let status = hooks.comment(i % 1000, &format!("note-{i}"), false).await?;
                ensure!(status == 200, "a plain comment was answered {status}");
            }
            anyhow::Ok(())
        }));
    }
    to_the_human_gate(t, 0..items).await?;
    for n in 0..items {
        let status = hooks.comment(n, &format!("approve-{n}"), true).await?;
        ensure!(status == 202, "an approval was answered {status}");
    }
    jobs.await??;
    for s in senders {
        s.await??;
    }
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let snap = t
            .clients
            .launcher
            .clone()
            .queue_snapshot(QueueSnapshotRequest {})
            .await?
            .into_inner();
        let busy: u64 = snap
            .counts
            .iter()
            .filter(|c| {
                c.status == JobStatus::Queued as i32 || c.status == JobStatus::Running as i32
            })
            .map(|c| c.count)
            .sum();
        let mut parked = 0;
        for n in 0..items {
            if status_of(t, &key(n)).await? == "blocked" {
                parked += 1;
            }
        }
        if busy == 0 && parked == items {
            return Ok(());
        }
        ensure!(
            Instant::now() < deadline,
            "the load did not settle: {busy} jobs queued or running, {parked} of {items} items parked"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

fn mb(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// `footprint`: idle and busy RSS of each process of each shape.
pub async fn footprint(bin: &Path, args: FootprintArgs) -> anyhow::Result<Vec<Row>> {
    let mut rows = Vec::new();
    let command = format!(
        "footprint --items {} --jobs {} --deliveries {}",
        args.items, args.jobs, args.deliveries
    );
    for scale_out in [true, false] {
        let world = World::new(8).await?;
        let t = if scale_out {
            Target::scale_out(bin, &world, 1).await?
        } else {
            Target::all_in_one(bin, &world).await?
        };
        // Idle: every part answered (start-up waited for it), then a few quiet seconds.
        tokio::time::sleep(Duration::from_secs(3)).await;
        let pids = t.pids();
        let idle: BTreeMap<String, u64> = pids
            .iter()
            .filter_map(|(n, p)| rss_hwm(*p).map(|(rss, _)| (n.clone(), rss)))
            .collect();
        let peak = Arc::new(std::sync::Mutex::new(BTreeMap::<String, u64>::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let sampler = {
            let (peak, stop, pids) = (peak.clone(), stop.clone(), pids.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    for (n, p) in &pids {
                        if let Some((rss, _)) = rss_hwm(*p) {
                            let mut m = peak.lock().expect("lock");
                            let e = m.entry(n.clone()).or_default();
                            *e = (*e).max(rss);
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let started = Instant::now();
        let loaded = load(&t, &args).await;
        stop.store(true, Ordering::Relaxed);
        sampler.await?;
        let hwm: BTreeMap<String, u64> = pids
            .iter()
            .filter_map(|(n, p)| rss_hwm(*p).map(|(_, h)| (n.clone(), h)))
            .collect();
        let shape = t.shape;
        t.stop().await;
        loaded?;
        let took = started.elapsed().as_secs_f64();
        let peak = peak.lock().expect("lock").clone();
        let mut total = (0, 0);
        for (name, _) in &pids {
            let (i, b, h) = (
                idle.get(name).copied().unwrap_or(0),
                peak.get(name).copied().unwrap_or(0),
                hwm.get(name).copied().unwrap_or(0),
            );
            total = (total.0 + i, total.1 + b);
            println!(
                "footprint {shape:<32} {name:<14} idle {:>6} MB   busy {:>6} MB   VmHWM {:>6} MB",
                mb(i),
                mb(b),
                mb(h)
            );
            let what = if name == "up" {
                "`orchestrator up` (every part in one process)".to_owned()
            } else {
                format!("`orchestrator serve {}`", name.trim_end_matches("-0"))
            };
            rows.push(Row::new(
                format!("RSS of {what}, {shape}"),
                format!("idle {} MB; busy {} MB (VmHWM {} MB)", mb(i), mb(b), mb(h)),
                format!(
                    "idle: 3 s after ready; busy: most VmRSS sampled every 100 ms during the load ({} items through analyst + approval webhook, {} no-op LLM jobs, {} webhooks; {took:.0} s)",
                    args.items.min(BATCH),
                    thousands(args.jobs as f64),
                    thousands(args.deliveries as f64)
                ),
                &command,
            ));
        }
        if pids.len() > 1 {
            println!(
                "footprint {shape:<32} {:<14} idle {:>6} MB   busy {:>6} MB (sum of the processes' figures)",
                "all",
                mb(total.0),
                mb(total.1)
            );
            rows.push(Row::new(
                format!("RSS of all the `serve` processes together, {shape}"),
                format!("idle {} MB; busy {} MB", mb(total.0), mb(total.1)),
                "sums of the rows above",
                &command,
            ));
        }
    }
    Ok(rows)
}

#[derive(clap::Args, Clone, Debug)]
pub struct ExactlyOnceArgs {
    /// Launcher processes on the one queue.
    #[arg(long, default_value_t = 4)]
    pub replicas: usize,
    /// No-op LLM jobs (a process each).
    #[arg(long, default_value_t = 10_000)]
    pub jobs: usize,
    /// ORCH_MAX_CONCURRENCY: LLM jobs at once across the replicas.
    #[arg(long, default_value_t = 16)]
    pub concurrency: u32,
}

/// `exactly-once`: N jobs through several launcher processes, each run counted by the
/// agent itself.
pub async fn exactly_once(bin: &Path, args: ExactlyOnceArgs) -> anyhow::Result<Vec<Row>> {
    let mut world = World::new(args.concurrency).await?;
    // The queue is measured, not git: no checkout, commit or PR (as in `pg-queue`).
    world.env.push(("ORCH_LAUNCHER_GIT".into(), "false".into()));
    let t = Target::scale_out(bin, &world, args.replicas).await?;
    let launchers = t.launchers()?;
    ensure!(
        launchers.len() == args.replicas,
        "{} launchers",
        launchers.len()
    );
    let started = Instant::now();
    let mut tasks = Vec::new();
    for task in 0..16 {
        let launchers = launchers.clone();
        let n = args.jobs;
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (task..n).step_by(16) {
                let job = launchers[i % launchers.len()]
                    .clone()
                    .enqueue(EnqueueRequest {
                        work_item: format!("ONCE-{}", i + 1),
                        repo: REPO.into(),
                        agent: "noop".into(),
                        stage: "development".into(),
                        payload_json: format!(r#"{{"branch":"orch/ONCE-{}"}}"#, i + 1),
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .job
                    .context("Enqueue answered no job")?;
                ids.push(job.id);
            }
            anyhow::Ok(ids)
        }));
    }
    let mut ids = Vec::with_capacity(args.jobs);
    for task in tasks {
        ids.extend(task.await??);
    }
    let enqueued = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(3600);
    let mut max_llm = 0;
    loop {
        let snap = t
            .clients
            .launcher
            .clone()
            .queue_snapshot(QueueSnapshotRequest {})
            .await?
            .into_inner();
        max_llm = max_llm.max(snap.llm_running);
        let count = |s: JobStatus| {
            snap.counts
                .iter()
                .filter(|c| c.status == s as i32)
                .map(|c| c.count)
                .sum::<u64>()
        };
        ensure!(
            count(JobStatus::Failed) == 0 && count(JobStatus::Cancelled) == 0,
            "jobs failed: {:?}",
            snap.counts
        );
        if count(JobStatus::Succeeded) as usize == args.jobs {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "not done within an hour: {:?}",
            snap.counts
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let took = started.elapsed().as_secs_f64();
    t.stop().await;

    // The agent's own record: one run per job, of attempt 1, and where it ran.
    let mut per_replica: BTreeMap<String, usize> = BTreeMap::new();
    let mut not_once = Vec::new();
    for id in &ids {
        let runs = world.agent.runs_of(id)?;
        match runs.as_slice() {
            [run] if run.attempt == 1 && run.end.is_some() => {
                let replica = (0..args.replicas)
                    .map(launcher_name)
                    .find(|n| run.ran_under(&world.stack_dir().join(n)))
                    .unwrap_or_else(|| "?".into());
                *per_replica.entry(replica).or_default() += 1;
            }
            _ => not_once.push(format!("{id}: {runs:?}")),
        }
    }
    if !not_once.is_empty() {
        bail!(
            "{} of {} jobs did not run exactly once: {:?}",
            not_once.len(),
            ids.len(),
            &not_once[..not_once.len().min(10)]
        );
    }
    ensure!(
        max_llm as usize <= args.concurrency as usize,
        "{max_llm} LLM jobs ran at once; the cap is {}",
        args.concurrency
    );
    let spread: Vec<String> = per_replica
        .iter()
        .map(|(n, c)| format!("{n} {c}"))
        .collect();
    let rate = args.jobs as f64 / took;
    println!(
        "exactly-once: {} jobs on {} launcher processes, every one ran once ({}); {rate:.0} jobs/s (enqueue of all took {enqueued:.1} s, all done after {took:.1} s); most LLM jobs at once seen {max_llm} (cap {})",
        args.jobs,
        args.replicas,
        spread.join(", "),
        args.concurrency
    );
    Ok(vec![Row::new(
        format!(
            "exactly-once: {} launcher processes x {} no-op LLM jobs on one PostgreSQL queue",
            args.replicas,
            thousands(args.jobs as f64)
        ),
        format!(
            "{} of {} ran exactly once (per replica: {}); {:.0} jobs/s",
            thousands(args.jobs as f64),
            thousands(args.jobs as f64),
            spread.join(", "),
            rate
        ),
        format!(
            "each agent records its run in its job's file (`orchestrator_testkit::agent`); ORCH_MAX_CONCURRENCY {} across the replicas; jobs/s = N / (first Enqueue -> every job succeeded), enqueued through every replica by 16 callers; every service its own process, durable PostgreSQL",
            args.concurrency
        ),
        format!(
            "exactly-once --replicas {} --jobs {} --concurrency {}",
            args.replicas, args.jobs, args.concurrency
        ),
    )])
}
