//! The fault-injection suite (issue #8): work items through the stack as separate
//! `orchestrator serve` processes on PostgreSQL (three launcher replicas), the scripted agent
//! (`examples/agents/scripted-agent.py`, no model, each run held 0.5 s so that kills find
//! agents mid-run) wrapped by the recording agent so that every run leaves its own record, the fake Plane and Gitea of `crates/fakes` sending signed
//! webhooks to the gateway — while random processes (any service, a launcher replica, the
//! gateway) are SIGKILLed at random moments and restarted after a short random delay.
//!
//! A human's `:approved:` comment goes through the real path: the fake Plane posts the signed
//! `issue_comment` webhook to the gateway, which applies `Approve`. A sender whose delivery
//! found the gateway down (a connection error or a 5xx) sends it again, as Plane does on a
//! connection error; a seeded share of accepted deliveries is sent twice on purpose.
//!
//! Afterwards it checks, and prints: every work item reached `done` or `blocked`; no job
//! attempt ran twice (the agents' own records: one run per (job, attempt)); no PR merged
//! twice (the fake Gitea's merge log) and every done item's change on `main`; no webhook
//! delivery applied twice (the gateway's inbox and stage-engine's effects: one accepted
//! approval and one `architecture` transition per approving comment, one `done` per item);
//! no job left running beyond the reaper's bound; no dead letter (inbox `dead`, outbox
//! `failed`) and no failed job that no kill explains.
//!
//! Besides the random kills, scripted faults (#20): one long outage (`ORCH_FAULT_OUTAGE_S`,
//! 60 s) of each of stage-engine, usage-ledger and merge-gate, begun while an agent runs so
//! that runs end while the peer is down; a work item whose agent command is missing (it
//! parks `blocked`, then the suite fixes the command and retries it as a human would); a
//! work item whose repository is removed from the forge once it reaches development (it
//! parks `blocked` with the reason); and a Plane issue created while the gateway is held
//! down, its delivery never sent again, which reconciliation must turn into a work item.
//! It also prints the stall watchdog's firings (from stage-engine's log: each one means a
//! seam lost something) and the tail: the time from the last fault's end to the last item's.
//!
//! Sizes and seed (docs/testing.md): `ORCH_FAULT_ITEMS` (5), `ORCH_FAULT_KILLS` (10),
//! `ORCH_FAULT_SEED` (random, printed), `ORCH_FAULT_KILL_GAP_MS` (1500, the mean gap between
//! kills), `ORCH_FAULT_TIMEOUT_S` (900), `ORCH_FAULT_OUTAGE_S` (60; 0: no long outages). Full size:
//! `ORCH_FAULT_ITEMS=50 ORCH_FAULT_KILLS=200 cargo test --test faults -- --nocapture`.
//! Without PostgreSQL's binaries it says `SKIPPED` (a failure under `ORCH_REQUIRE_POSTGRES`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use orchestrator_fakes::Hook;
use orchestrator_fakes::gitea::FakeGitea;
use orchestrator_fakes::plane::{FakePlane, NewIssue, User};
use orchestrator_kit::clients::Clients;
use orchestrator_kit::db::Location;
use orchestrator_kit::{Config, Env, ServiceName};
use orchestrator_proto::stage_engine::v1::CreateWorkItemRequest;
use orchestrator_testkit::TestStorage;
use orchestrator_testkit::agent::{Behaviour, RecordingAgent};
use orchestrator_testkit::procs::{ProcStack, ProcStackSpec};
use sqlx::Row;
use sqlx::postgres::{PgPool, PgPoolOptions};

const TEST: &str = "faults::work_items_survive_random_kills";
const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");
const REPOS: [&str; 3] = ["acme/app", "acme/api", "acme/web"];
const PLANE_SECRET: &str = "plane_wh_faults0123456789abcdef";
const GITEA_SECRET: &str = "gitea-webhook-secret-faults";
const GITEA_TOKEN: &str = "gitea-token-orchestrator";
const SERVICE_TOKEN: &str = "plane_api_orchestrator";
const LAUNCHERS: usize = 3;

/// The test-speed settings every process gets; printed with the figures.
const SETTINGS: [(&str, &str); 34] = [
    ("ORCH_MAX_CONCURRENCY", "4"),
    ("ORCH_MAX_ATTEMPTS", "5"),
    ("ORCH_AGENT_TIMEOUT_SECONDS", "45"),
    ("ORCH_AGENT_KILL_GRACE_SECONDS", "2"),
    ("ORCH_LAUNCHER_POLL_MS", "200"),
    ("ORCH_LAUNCHER_HEARTBEAT_MS", "500"),
    ("ORCH_LAUNCHER_INSTANCE_STALE_MS", "3000"),
    ("ORCH_REAPER_INTERVAL_S", "1"),
    ("ORCH_REAPER_DEAD_TICKS", "2"),
    ("ORCH_REAPER_MAX_RUNNING_S", "60"),
    ("ORCH_MERGE_LEASE_TTL_S", "20"),
    ("ORCH_LEASE_RETRY_S", "1"),
    ("ORCH_MERGE_RETRY_AFTER_S", "1"),
    ("ORCH_BACKOFF_BASE_S", "1"),
    ("ORCH_BACKOFF_MAX_S", "2"),
    ("ORCH_OUTBOX_POLL_MS", "100"),
    ("ORCH_OUTBOX_BACKOFF_BASE_MS", "100"),
    ("ORCH_OUTBOX_BACKOFF_MAX_MS", "1000"),
    ("ORCH_RECONCILE_INTERVAL_S", "2"),
    // A backstop: it should not fire (each firing means a seam lost something).
    ("ORCH_STALL_S", "30"),
    ("ORCH_STALL_CHECK_INTERVAL_S", "2"),
    ("ORCH_LAUNCHER_OUTBOX_POLL_MS", "100"),
    ("ORCH_LAUNCHER_OUTBOX_BACKOFF_BASE_MS", "100"),
    ("ORCH_LAUNCHER_OUTBOX_BACKOFF_MAX_MS", "1000"),
    ("ORCH_GATEWAY_DISPATCH_POLL_MS", "100"),
    ("ORCH_GATEWAY_DISPATCH_BACKOFF_BASE_MS", "100"),
    ("ORCH_GATEWAY_DISPATCH_BACKOFF_MAX_MS", "1000"),
    ("ORCH_GATEWAY_DISPATCH_CLAIM_LEASE_MS", "3000"),
    ("ORCH_POST_DEPLOY_WINDOW_S", "3"),
    ("ORCH_POST_DEPLOY_TICK_S", "1"),
    ("ORCH_QG_HOOK_ENABLED", "false"),
    // The recording agent writes its records outside the checkout, which the sandbox
    // forbids (services/launcher/tests/sandbox.rs runs agents inside it).
    ("ORCH_AGENT_SANDBOX", "off"),
    ("ORCH_RPC_CONNECT_TIMEOUT_MS", "1000"),
    ("ORCH_RPC_TIMEOUT_MS", "5000"),
];

/// A job may run no longer than the reaper's backstop plus the ticks it takes to see it.
fn running_bound() -> Duration {
    let get = |k: &str| -> u64 {
        SETTINGS
            .iter()
            .find(|(n, _)| *n == k)
            .and_then(|(_, v)| v.parse().ok())
            .unwrap_or_else(|| panic!("{k} is set in SETTINGS"))
    };
    Duration::from_secs(
        get("ORCH_REAPER_MAX_RUNNING_S")
            + (get("ORCH_REAPER_DEAD_TICKS") + 1) * get("ORCH_REAPER_INTERVAL_S"),
    )
}

/// The suite's own knobs, from the environment (a bad value names its variable).
#[derive(Debug, Clone)]
struct Size {
    seed: u64,
    items: usize,
    kills: usize,
    kill_gap: Duration,
    timeout: Duration,
    /// How long each long outage of a peer lasts (`ORCH_FAULT_OUTAGE_S`, 60; 0: none).
    outage: Duration,
}

fn var<T: std::str::FromStr>(name: &str, default: T) -> T {
    match std::env::var(name) {
        Ok(v) if !v.trim().is_empty() => v
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a valid number")),
        _ => default,
    }
}

impl Size {
    fn from_env() -> Size {
        let random = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(7);
        let size = Size {
            seed: var("ORCH_FAULT_SEED", random),
            items: var("ORCH_FAULT_ITEMS", 5usize),
            kills: var("ORCH_FAULT_KILLS", 10usize),
            kill_gap: Duration::from_millis(var("ORCH_FAULT_KILL_GAP_MS", 1500u64)),
            timeout: Duration::from_secs(var("ORCH_FAULT_TIMEOUT_S", 900u64)),
            outage: Duration::from_secs(var("ORCH_FAULT_OUTAGE_S", 60u64)),
        };
        assert!(size.items >= 1, "ORCH_FAULT_ITEMS must be at least 1");
        size
    }
}

/// SplitMix64: a small seeded generator, so that a seed replays the same choices.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// Uniform in `[lo, hi)` milliseconds.
    fn millis(&mut self, lo: u64, hi: u64) -> Duration {
        Duration::from_millis(lo + self.below(hi.saturating_sub(lo).max(1)))
    }

    fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }
}

/// A production that answers `GET /healthz` 200, for the post-deploy watches.
async fn healthy_production() -> String {
    let app = axum::Router::new().route("/healthz", axum::routing::get(|| async { "ok" }));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}/healthz")
}

/// What the killer did.
#[derive(Debug, Default)]
struct Kills {
    by_process: BTreeMap<String, usize>,
    down_ms_total: u128,
    /// When the last fault ended (a SIGKILL's moment, a long outage's restart): the tail is
    /// measured from here.
    last_kill: Option<Instant>,
    /// The long outages: (peer, how long it was down, epoch ms it went down and came back).
    outages: Vec<(String, Duration, i64, i64)>,
    /// Whether the gateway was held down while a Plane issue was created.
    gateway_held: bool,
}

/// The peers a long outage takes down, each once, while agent runs end.
const OUTAGE_PEERS: [&str; 3] = ["stage-engine", "usage-ledger", "merge-gate"];

/// What the killer and the driver tell each other about the scripted faults.
#[derive(Debug, Default)]
struct Cue {
    /// The gateway is down on purpose: the driver creates the Plane issue now.
    gateway_down: AtomicBool,
    /// The driver created it (its delivery found the gateway down).
    issue_created: AtomicBool,
}

/// SIGKILLs a random process after a random gap, restarts it after a random delay, until
/// `target` kills or `stop`. Returns the stack (for its logs) and what it did.
#[allow(clippy::too_many_arguments)]
async fn killer(
    mut stack: ProcStack,
    mut rng: Rng,
    target: usize,
    gap: Duration,
    outage: Duration,
    pool: PgPool,
    cue: Arc<Cue>,
    done: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
) -> (ProcStack, Kills) {
    let mut kills = Kills::default();
    let names = stack.names();
    let gap_ms = u64::try_from(gap.as_millis()).unwrap_or(1500);
    // The scripted faults, spread over the random kills: the gateway held down while a
    // Plane issue is created (a third of the way), and one long outage of each peer.
    let hold_gateway_at = target / 3;
    let mut outages: Vec<(usize, &str)> = if outage.is_zero() {
        Vec::new()
    } else {
        OUTAGE_PEERS
            .iter()
            .enumerate()
            .map(|(i, p)| ((i + 1) * target / (OUTAGE_PEERS.len() + 1), *p))
            .collect()
    };
    while done.load(Ordering::SeqCst) < target && !stop.load(Ordering::SeqCst) {
        let n = done.load(Ordering::SeqCst);
        if n == hold_gateway_at && !kills.gateway_held {
            kills.gateway_held = true;
            stack.kill("gateway");
            cue.gateway_down.store(true, Ordering::SeqCst);
            let asked = Instant::now();
            while !cue.issue_created.load(Ordering::SeqCst)
                && asked.elapsed() < Duration::from_secs(20)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            cue.gateway_down.store(false, Ordering::SeqCst);
            if let Err(e) = stack.restart("gateway").await {
                panic!("the gateway did not come back after its hold: {e}");
            }
            kills.last_kill = Some(Instant::now());
        }
        if let Some(i) = outages.iter().position(|(at, _)| *at <= n) {
            let (_, peer) = outages.remove(i);
            // Exactly when runs end: wait (a while) for an agent to be running, so that its
            // run ends while the peer is down.
            let asked = Instant::now();
            while count(
                &pool,
                "SELECT COUNT(*) FROM launcher.jobs WHERE status = 'running' AND kind = 'llm'",
            )
            .await
                == 0
                && asked.elapsed() < Duration::from_secs(30)
            {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            stack.kill(peer);
            let down_at = orchestrator_kit::time::now_ms();
            eprintln!("fault suite: {peer} down for {outage:?} (a long outage)");
            tokio::time::sleep(outage).await;
            if let Err(e) = stack.restart(peer).await {
                panic!("{peer} did not come back after its outage: {e}");
            }
            kills.outages.push((
                peer.to_owned(),
                outage,
                down_at,
                orchestrator_kit::time::now_ms(),
            ));
            kills.last_kill = Some(Instant::now());
        }
        tokio::time::sleep(rng.millis(gap_ms / 2, gap_ms * 3 / 2 + 1)).await;
        let victim = &names[usize::try_from(rng.below(names.len() as u64)).unwrap_or(0)];
        stack.kill(victim);
        kills.last_kill = Some(Instant::now());
        let down = rng.millis(100, 2000);
        tokio::time::sleep(down).await;
        if let Err(e) = stack.restart(victim).await {
            panic!("{victim} did not come back after its kill: {e}");
        }
        *kills.by_process.entry(victim.clone()).or_default() += 1;
        kills.down_ms_total += down.as_millis();
        done.fetch_add(1, Ordering::SeqCst);
    }
    (stack, kills)
}

/// What a work item of the suite goes through besides the random kills.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scenario {
    Normal,
    /// Its agent command is missing (exit 127, "not found"): the item parks `blocked`; the
    /// suite then fixes the command and retries it as a human would (`StageEngine.Retry`).
    MissingCommand,
    /// Its repository is removed from the forge once it reaches development: it parks
    /// `blocked` with the reason.
    RepoRemoved,
    /// Created on Plane (with the trigger label) while the gateway was down, its delivery
    /// never resent: reconciliation must create it.
    DeliveredWhileGatewayDown,
}

/// The repository removed mid-flight.
const DOOMED: &str = "acme/doomed";

/// One work item the suite created.
#[derive(Debug)]
struct Item {
    key: String,
    issue_id: String,
    repo: String,
    scenario: Scenario,
    /// MissingCommand: retried after the fix; RepoRemoved: the repository removed.
    acted: bool,
    created: bool,
    /// The approving comments posted, and when the last one was.
    approvals: Vec<String>,
    last_approval: Option<Instant>,
}

/// The webhooks a sender owes again, and what the suite did about deliveries.
#[derive(Debug, Default)]
struct Senders {
    plane_seen: usize,
    gitea_seen: usize,
    /// (source, delivery) owed again after a connection error or a 5xx.
    owed: Vec<(&'static str, orchestrator_fakes::Delivery)>,
    resent_after_failure: usize,
    duplicates_sent: usize,
    /// The gateway's answers to the deliberate duplicates: status -> count.
    duplicate_answers: BTreeMap<String, usize>,
}

fn failed(d: &orchestrator_fakes::Delivery) -> bool {
    d.status.is_none_or(|s| s >= 500)
}

/// Counts rows of `sql` (one BIGINT column) with two BIGINT parameters.
async fn count_between(pool: &PgPool, sql: &'static str, a: i64, b: i64) -> i64 {
    sqlx::query(sql)
        .bind(a)
        .bind(b)
        .fetch_one(pool)
        .await
        .map(|r| r.get::<i64, _>(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// A log line without its terminal colours.
fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Counts rows of `sql` (one BIGINT column).
async fn count(pool: &PgPool, sql: &'static str) -> i64 {
    sqlx::query(sql)
        .fetch_one(pool)
        .await
        .map(|r| r.get::<i64, _>(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn work_items_survive_random_kills() {
    let size = Size::from_env();
    let Some(storage) = TestStorage::postgres(TEST).await else {
        return;
    };
    let Location::Postgres(url) = &storage.location else {
        unreachable!("a PostgreSQL storage")
    };
    let url = url.expose().to_owned();
    let began = Instant::now();
    eprintln!(
        "fault suite: seed {} (ORCH_FAULT_SEED={} replays it), {} work items, {} kills, mean gap {:?}, {} launcher replicas",
        size.seed, size.seed, size.items, size.kills, size.kill_gap, LAUNCHERS
    );
    let mut rng = Rng(size.seed);
    let dir = tempfile::tempdir().expect("tempdir");

    // ---- The fakes.
    let plane = FakePlane::start("acme").await;
    plane.add_user("orchestrator", Some(SERVICE_TOKEN));
    let mut bots = vec!["orchestrator".to_owned()];
    let mut env: Vec<(String, String)> = Vec::new();
    for role in orchestrator_tracker::ROLES {
        let name = format!("orchestrator-{role}");
        let token = format!("plane_bot_{role}");
        plane.add_user(&name, Some(&token));
        bots.push(name);
        env.push((
            format!("PLANE_BOT_TOKEN_{}", role.to_ascii_uppercase()),
            token,
        ));
    }
    let ada: User = plane.add_user("ada", None);
    let project = plane.add_project("ORCH", "Orchestrator");
    let gitea = FakeGitea::start(&dir.path().join("gitea")).await;
    gitea.add_user("acme", None);
    gitea.add_user("orchestrator", Some(GITEA_TOKEN));
    for repo in REPOS.iter().chain([&DOOMED]) {
        gitea.create_repo(repo).await;
        gitea
            .commit(repo, "main", &[("README.md", "# app\n")], "initial")
            .await;
    }
    let health = healthy_production().await;
    // Each repo's deploy target: commands that deploy nothing and succeed (the suite is
    // about the orchestration, not a deploy), and the production the watch probes.
    let targets: serde_json::Map<String, serde_json::Value> = REPOS
        .iter()
        .map(|r| {
            let target = serde_json::json!({
                "staging_command": ["true"],
                "deploy_command": ["true"],
                "timeout_s": 60,
                "health_url": health,
            });
            ((*r).to_owned(), target)
        })
        .collect();

    // ---- The agent: the scripted agent, every run recorded by the recording agent.
    let examples = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/agents");
    // A work item with a marker file under `nocmd/` runs an agent command that is not
    // there (as a missing `claude` would: "not found", exit 127).
    let nocmd = dir.path().join("nocmd");
    std::fs::create_dir_all(&nocmd).expect("nocmd dir");
    let dispatch = dir.path().join("dispatch.sh");
    std::fs::write(
        &dispatch,
        format!(
            "if [ -e \"{}/$ORCH_WORK_ITEM\" ]; then exec /nonexistent/orchestrator-agent \"$@\"; fi\nexec python3 {} \"$@\"\n",
            nocmd.display(),
            examples.join("scripted-agent.py").display()
        ),
    )
    .expect("dispatch script");
    let agent = RecordingAgent::create(
        &dir.path().join("agent"),
        &Behaviour {
            then: Some(format!("sh {}", dispatch.display())),
            // Runs last a while, so that kills find agents mid-run.
            run_seconds: 0.5,
        },
    )
    .expect("agent");

    // ---- The stack.
    let pairs: Vec<(&str, String)> = vec![
        ("PLANE_BASE_URL", plane.url.clone()),
        ("PLANE_WORKSPACE_SLUG", "acme".into()),
        ("PLANE_API_TOKEN", SERVICE_TOKEN.into()),
        // The project reconciliation lists (with ORCH_PLANE_DEFAULT_REPO).
        ("PLANE_PROJECT_ID", project.id.clone()),
        ("PLANE_WEBHOOK_SECRET", PLANE_SECRET.into()),
        ("ORCH_PLANE_DEFAULT_REPO", REPOS[0].into()),
        ("ORCH_PLANE_BOT_USERS", bots.join(",")),
        ("GITEA_BASE_URL", gitea.url.clone()),
        ("GITEA_TOKEN", GITEA_TOKEN.into()),
        ("GITEA_WEBHOOK_SECRET", GITEA_SECRET.into()),
        ("ORCH_AGENT_COMMAND", agent.command()),
        ("ORCH_AGENTS_DIR", examples.display().to_string()),
        ("ORCH_POST_DEPLOY_REPOS", REPOS.join(",")),
        (
            "ORCH_DEPLOY_TARGETS_JSON",
            serde_json::Value::Object(targets).to_string(),
        ),
    ];
    env.extend(pairs.into_iter().map(|(k, v)| (k.to_owned(), v)));
    env.extend(
        SETTINGS
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
    );
    let mut spec = ProcStackSpec::new(BIN, dir.path().join("stack"))
        .launchers(LAUNCHERS)
        .postgres(&url);
    for (k, v) in &env {
        spec = spec.var(k, v);
    }
    let stack = ProcStack::start(spec).await.expect("the stack starts");
    let log_paths = stack.log_paths();
    let config = Config::from_env(Env::from_pairs(stack.client_env())).expect("client config");
    let clients = Clients::from_config(&config).expect("clients");
    let gateway = stack.url(ServiceName::Gateway);
    plane.set_webhook(Some(Hook {
        url: format!("{gateway}/webhooks/plane"),
        secret: Some(PLANE_SECRET.into()),
    }));
    gitea.set_webhook(Some(Hook {
        url: format!("{gateway}/webhooks/gitea"),
        secret: Some(GITEA_SECRET.into()),
    }));
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .connect(&url)
        .await
        .expect("the test's own connection");
    eprintln!(
        "fault suite: the stack is up ({} processes) after {:?}; test-speed settings: {}",
        log_paths.len(),
        began.elapsed(),
        SETTINGS
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // ---- The killer runs beside the driver.
    let kills_done = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let cue = Arc::new(Cue::default());
    let killer = tokio::spawn(killer(
        stack,
        Rng(rng.next()),
        size.kills,
        size.kill_gap,
        size.outage,
        pool.clone(),
        cue.clone(),
        kills_done.clone(),
        stop.clone(),
    ));
    // The Plane issue created while the gateway was held down: its delivery is never resent.
    let mut abandoned_issue: Option<String> = None;

    // ---- The driver: creates the items spread over the kills, approves as a human through
    // the webhook, resends what a sender owes, watches how long jobs run.
    let mut items: Vec<Item> = Vec::new();
    let mut senders = Senders::default();
    let mut longest_run_ms: i64 = 0;
    // When each item was first seen done or blocked.
    let mut ended_at: BTreeMap<String, Instant> = BTreeMap::new();
    let mut last_progress = Instant::now();
    let deadline = began + size.timeout;
    let settled = loop {
        let kills = kills_done.load(Ordering::SeqCst);
        // Item i arrives once i/items of the kills are done: items arrive all along.
        let planned = items
            .iter()
            .filter(|i| i.scenario != Scenario::DeliveredWhileGatewayDown)
            .count();
        if planned < size.items && planned * size.kills.max(1) <= kills * size.items {
            let n = planned;
            let scenario = match n {
                1 => Scenario::MissingCommand,
                2 => Scenario::RepoRemoved,
                _ => Scenario::Normal,
            };
            let (issue, _) = plane
                .create_issue(
                    &project.id,
                    &NewIssue {
                        name: format!("Fault item {}", n + 1),
                        ..NewIssue::default()
                    },
                    &ada,
                )
                .await;
            let key = plane.key(&issue.id);
            if scenario == Scenario::MissingCommand {
                std::fs::write(nocmd.join(&key), "").expect("marker");
            }
            items.push(Item {
                key,
                issue_id: issue.id,
                repo: if scenario == Scenario::RepoRemoved {
                    DOOMED.to_owned()
                } else {
                    REPOS[n % REPOS.len()].to_owned()
                },
                scenario,
                acted: false,
                created: false,
                approvals: Vec::new(),
                last_approval: None,
            });
        }
        // The gateway is held down: an issue with the trigger label is created now, and
        // its failed delivery is never sent again (Plane gives up on a refused connection).
        if cue.gateway_down.load(Ordering::SeqCst) && abandoned_issue.is_none() {
            let (issue, delivery) = plane
                .create_issue(
                    &project.id,
                    &NewIssue {
                        name: "Fault item made while the gateway was down".into(),
                        labels: vec!["orchestrator".into()],
                        ..NewIssue::default()
                    },
                    &ada,
                )
                .await;
            assert!(
                delivery.as_ref().is_none_or(failed),
                "the gateway is down, yet the delivery was accepted: {delivery:?}"
            );
            abandoned_issue = Some(issue.id.clone());
            items.push(Item {
                key: plane.key(&issue.id),
                issue_id: issue.id,
                repo: REPOS[0].to_owned(),
                scenario: Scenario::DeliveredWhileGatewayDown,
                acted: false,
                created: false,
                approvals: Vec::new(),
                last_approval: None,
            });
            cue.issue_created.store(true, Ordering::SeqCst);
        }
        // CreateWorkItem as the gateway makes it for a Plane issue (the project and the
        // sequence id; stage-engine derives the key through Plane): retried while
        // stage-engine is down.
        for item in items
            .iter_mut()
            .filter(|i| !i.created && i.scenario != Scenario::DeliveredWhileGatewayDown)
        {
            let sequence_id = item
                .key
                .rsplit_once('-')
                .and_then(|(_, n)| n.parse().ok())
                .expect("a Plane key ends in its sequence id");
            let r = clients
                .stage_engine
                .clone()
                .create_work_item(CreateWorkItemRequest {
                    tracker_issue_id: item.issue_id.clone(),
                    tracker_project_id: project.id.clone(),
                    tracker_sequence_id: sequence_id,
                    key: String::new(),
                    title: format!("Fault item {}", item.key),
                    description: String::new(),
                    repo: item.repo.clone(),
                    branch: String::new(),
                })
                .await;
            item.created = r.is_ok();
        }

        // The items as stage-engine's database has them.
        let states: BTreeMap<String, (String, String)> =
            sqlx::query("SELECT key, stage, status FROM stage_engine.work_items")
                .fetch_all(&pool)
                .await
                .unwrap_or_default()
                .into_iter()
                .map(|r| (r.get(0), (r.get(1), r.get(2))))
                .collect();
        for item in items.iter_mut() {
            let Some((stage, status)) = states.get(&item.key) else {
                continue;
            };
            item.created = true;
            match item.scenario {
                // Parked by the missing command: fixed, then retried as a human would.
                Scenario::MissingCommand if status == "blocked" && !item.acted => {
                    let _ = std::fs::remove_file(nocmd.join(&item.key));
                    let r = clients
                        .stage_engine
                        .clone()
                        .retry(orchestrator_proto::stage_engine::v1::RetryRequest {
                            work_item: item.key.clone(),
                            author: "ada".into(),
                            comment_id: format!("fault-retry-{}", item.key),
                            tracker_issue_id: String::new(),
                        })
                        .await;
                    item.acted = r.is_ok();
                }
                Scenario::RepoRemoved if stage == "development" && !item.acted => {
                    gitea.with(|d| d.repos.remove(DOOMED));
                    let _ = std::fs::remove_dir_all(gitea.repo_dir(DOOMED));
                    item.acted = true;
                }
                _ => {}
            }
        }
        for (key, (_, status)) in &states {
            let retry_pending = items
                .iter()
                .any(|i| i.key == *key && i.scenario == Scenario::MissingCommand && !i.acted);
            if (status == "done" || status == "blocked") && !retry_pending {
                ended_at.entry(key.clone()).or_insert_with(Instant::now);
            }
        }
        // A human approves what waits (again when an earlier approval was applied but the
        // item waits anew).
        for item in items.iter_mut() {
            let waiting = states
                .get(&item.key)
                .is_some_and(|(_, status)| status == "awaiting_approval");
            let due = item
                .last_approval
                .is_none_or(|t| t.elapsed() > Duration::from_secs(30));
            if waiting && due {
                let (comment, _) = plane
                    .comment(&item.issue_id, "<p>Looks right. :approved:</p>", &ada)
                    .await;
                item.approvals.push(comment.id);
                item.last_approval = Some(Instant::now());
            }
        }
        // Senders: what failed is sent again; a seeded share of what succeeded is sent twice.
        let plane_new: Vec<_> = plane.deliveries().split_off(senders.plane_seen);
        senders.plane_seen += plane_new.len();
        let gitea_new: Vec<_> = gitea.deliveries().split_off(senders.gitea_seen);
        senders.gitea_seen += gitea_new.len();
        let mut dups = Vec::new();
        for (source, d) in plane_new
            .into_iter()
            .map(|d| ("plane", d))
            .chain(gitea_new.into_iter().map(|d| ("gitea", d)))
        {
            if d.what.ends_with("(redelivered)") {
                continue;
            }
            let abandoned = source == "plane"
                && abandoned_issue.as_deref().is_some_and(|id| {
                    let v = d.json();
                    v["event"] == "issue" && v["action"] == "created" && v["data"]["id"] == id
                });
            if abandoned {
                continue;
            }
            if failed(&d) {
                senders.owed.push((source, d));
            } else if rng.chance(25) {
                dups.push((source, d));
            }
        }
        let owed = std::mem::take(&mut senders.owed);
        for (source, d) in owed {
            let again = match source {
                "plane" => plane.redeliver(&d).await,
                _ => gitea.redeliver(&d).await,
            };
            if failed(&again) {
                senders.owed.push((source, d));
            } else {
                senders.resent_after_failure += 1;
            }
        }
        for (source, d) in dups {
            let again = match source {
                "plane" => plane.redeliver(&d).await,
                _ => gitea.redeliver(&d).await,
            };
            if failed(&again) {
                // The gateway went down in between: owed like any failed send.
                senders.owed.push((source, d));
            } else {
                senders.duplicates_sent += 1;
                let answer: serde_json::Value =
                    serde_json::from_str(&again.answer).unwrap_or_default();
                *senders
                    .duplicate_answers
                    .entry(answer["status"].as_str().unwrap_or("?").to_owned())
                    .or_default() += 1;
            }
        }
        // How long the running jobs have been running.
        let now = orchestrator_kit::time::now_ms();
        for r in sqlx::query("SELECT started_at_ms FROM launcher.jobs WHERE status = 'running'")
            .fetch_all(&pool)
            .await
            .unwrap_or_default()
        {
            longest_run_ms = longest_run_ms.max(now - r.get::<i64, _>(0));
        }

        if last_progress.elapsed() > Duration::from_secs(30) {
            last_progress = Instant::now();
            let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
            for (_, status) in states.values() {
                *by_status.entry(status.as_str()).or_default() += 1;
            }
            eprintln!(
                "fault suite: {:.0?} in: {kills} kills, {} items created, by status {by_status:?}",
                began.elapsed(),
                items.len()
            );
        }
        let finished = items
            .iter()
            .filter(|i| i.scenario != Scenario::DeliveredWhileGatewayDown)
            .count()
            == size.items
            && items.iter().all(|i| {
                states.get(&i.key).is_some_and(|(_, s)| {
                    // The missing command's item is not finished while it waits for
                    // its retry.
                    s == "done"
                        || (s == "blocked" && (i.scenario != Scenario::MissingCommand || i.acted))
                })
            });
        if finished {
            stop.store(true, Ordering::SeqCst);
        }
        // Settled: every item finished, the killer done, nothing left to deliver or run.
        if finished && killer.is_finished() && senders.owed.is_empty() {
            let busy = count(
                &pool,
                "SELECT (SELECT COUNT(*) FROM launcher.jobs WHERE status IN ('queued', 'running'))
                      + (SELECT COUNT(*) FROM gateway.webhook_inbox WHERE state = 'pending')
                      + (SELECT COUNT(*) FROM stage_engine.outbox WHERE state IN ('pending', 'delivering'))
                      + (SELECT COUNT(*) FROM launcher.outbox WHERE state IN ('pending', 'delivering'))",
            )
            .await;
            if busy == 0 {
                break true;
            }
        }
        if Instant::now() > deadline {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    stop.store(true, Ordering::SeqCst);
    let (stack, kills) = killer.await.expect("the killer");
    let wall = began.elapsed();

    // ================= The figures =================
    let mut report = Vec::new();
    let mut failures = Vec::new();
    let mut check = |ok: bool, line: String| {
        report.push(format!("{} {line}", if ok { "ok  " } else { "FAIL" }));
        if !ok {
            failures.push(line);
        }
    };
    check(
        settled,
        format!("settled within {:?} (wall time {:.1?})", size.timeout, wall),
    );
    check(
        kills.by_process.values().sum::<usize>() == size.kills,
        format!(
            "kills: {} of {} (SIGKILL, restarted after 0.1-2 s; down {:.1} s in all): {:?}",
            kills.by_process.values().sum::<usize>(),
            size.kills,
            kills.down_ms_total as f64 / 1000.0,
            kills.by_process
        ),
    );

    // The tail: from the last kill to the last item's end (an item that needs long after
    // the faults stop is waiting for something it should not).
    let last_end = ended_at.iter().max_by_key(|(_, t)| **t);
    let tail = match (kills.last_kill, last_end) {
        (Some(k), Some((_, t))) => t.saturating_duration_since(k),
        _ => Duration::ZERO,
    };
    let mut tail_lines: Vec<String> = Vec::new();
    let tail_key = last_end.map(|(k, _)| k.clone()).unwrap_or_default();
    tail_lines.push(format!(
        "info tail: the last item ({tail_key}) ended {:.1} s after the last kill",
        tail.as_secs_f64()
    ));
    if tail > Duration::from_secs(15) {
        tail_lines.push(format!(
            "info {tail_key}'s jobs (s relative to the last kill: enqueued, not before, started, finished):"
        ));
        let base_ms = orchestrator_kit::time::now_ms()
            - i64::try_from(kills.last_kill.map_or(0, |k| k.elapsed().as_millis())).unwrap_or(0);
        for r in sqlx::query(
            "SELECT agent, stage, status, attempt, outcome, reason, enqueued_at_ms, not_before_ms, started_at_ms, finished_at_ms
               FROM launcher.jobs WHERE work_item = $1 ORDER BY enqueued_at_ms",
        )
        .bind(&tail_key)
        .fetch_all(&pool)
        .await
        .unwrap_or_default()
        {
            let at = |ms: i64| {
                if ms == 0 {
                    "-".to_owned()
                } else {
                    format!("{:+.1}", (ms - base_ms) as f64 / 1000.0)
                }
            };
            let reason: String = r.get(5);
            tail_lines.push(format!(
                "info   {} {} {} attempt {} {} [{} {} {} {}]: {}",
                r.get::<String, _>(0),
                r.get::<String, _>(1),
                r.get::<String, _>(2),
                r.get::<i64, _>(3),
                r.get::<String, _>(4),
                at(r.get(6)),
                at(r.get(7)),
                at(r.get(8)),
                at(r.get(9)),
                reason.chars().take(160).collect::<String>()
            ));
        }
        for r in sqlx::query(
            "SELECT from_stage, to_stage, cause, at_ms FROM stage_engine.stage_transitions WHERE work_item = $1 ORDER BY at_ms",
        )
        .bind(&tail_key)
        .fetch_all(&pool)
        .await
        .unwrap_or_default()
        {
            tail_lines.push(format!(
                "info   transition {} -> {} at {:+.1}: {}",
                r.get::<String, _>(0),
                r.get::<String, _>(1),
                (r.get::<i64, _>(3) - base_ms) as f64 / 1000.0,
                r.get::<String, _>(2).chars().take(120).collect::<String>()
            ));
        }
    }

    // Work items.
    let rows = sqlx::query(
        "SELECT key, stage, status, rollback_count, status_reason FROM stage_engine.work_items",
    )
    .fetch_all(&pool)
    .await
    .expect("work items");
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    let mut status_of: BTreeMap<String, String> = BTreeMap::new();
    let mut reason_of: BTreeMap<String, String> = BTreeMap::new();
    for r in &rows {
        let (key, status, reason): (String, String, String) = (r.get(0), r.get(2), r.get(4));
        *by_status.entry(status.clone()).or_default() += 1;
        status_of.insert(key.clone(), status);
        reason_of.insert(key, reason);
    }
    let done = by_status.get("done").copied().unwrap_or(0);
    let blocked = by_status.get("blocked").copied().unwrap_or(0);
    check(
        rows.len() == items.len() && done + blocked == items.len(),
        format!(
            "work items: {} of {}: done {done}, blocked {blocked}, by status {by_status:?}",
            rows.len(),
            items.len()
        ),
    );
    // Each scripted fault ends as it should: the removed repository's item blocked with its
    // reason; the missing command's item blocked, then fixed, retried and done; the item
    // whose delivery was lost created by reconciliation and done; every other item done.
    // Every blocked item says why.
    let mut wrong = Vec::new();
    for item in &items {
        let status = status_of.get(&item.key).map_or("missing", String::as_str);
        let reason = reason_of.get(&item.key).map_or("", String::as_str);
        let expected = if item.scenario == Scenario::RepoRemoved {
            "blocked"
        } else {
            "done"
        };
        let acted = match item.scenario {
            Scenario::MissingCommand | Scenario::RepoRemoved => item.acted,
            _ => true,
        };
        if status != expected || !acted || (status == "blocked" && reason.is_empty()) {
            wrong.push(format!(
                "{} {:?}: {status} ({reason})",
                item.key, item.scenario
            ));
        }
    }
    let scenario_lines: Vec<String> = items
        .iter()
        .filter(|i| i.scenario != Scenario::Normal)
        .map(|i| {
            format!(
                "{} {:?} -> {} {}",
                i.key,
                i.scenario,
                status_of.get(&i.key).map_or("missing", String::as_str),
                reason_of
                    .get(&i.key)
                    .filter(|r| !r.is_empty())
                    .map(|r| format!("({})", r.chars().take(140).collect::<String>()))
                    .unwrap_or_default()
            )
        })
        .collect();
    check(
        wrong.is_empty(),
        format!(
            "scripted faults: {}; wrong ends: {wrong:?}",
            scenario_lines.join("; ")
        ),
    );
    // The long outages: each peer down for the whole outage while runs ended.
    let mut outage_lines = Vec::new();
    let mut outage_ok = true;
    for (peer, down, from, to) in &kills.outages {
        let ended = count_between(
            &pool,
            "SELECT COUNT(*) FROM launcher.jobs WHERE finished_at_ms >= $1 AND finished_at_ms <= $2",
            *from,
            *to,
        )
        .await;
        outage_ok &= ended > 0;
        outage_lines.push(format!("{peer} {down:?} ({ended} runs ended meanwhile)"));
    }
    let outages_planned = if size.outage.is_zero() {
        0
    } else {
        OUTAGE_PEERS.len()
    };
    check(
        outage_ok && kills.outages.len() == outages_planned,
        format!("long outages: {}", outage_lines.join(", ")),
    );

    // Agent runs: one per (job, attempt).
    let runs = agent.runs().expect("the agent's records");
    let mut per_attempt: BTreeMap<(String, u32), usize> = BTreeMap::new();
    let mut unfinished = 0;
    for run in runs.values().flatten() {
        *per_attempt
            .entry((run.job_id.clone(), run.attempt))
            .or_default() += 1;
        unfinished += usize::from(run.end.is_none());
    }
    let twice: Vec<_> = per_attempt.iter().filter(|(_, n)| **n > 1).collect();
    check(
        twice.is_empty(),
        format!(
            "agent runs: {} in {} jobs, {} never reached their end (killed); (job, attempt) run twice: {} {:?}",
            per_attempt.values().sum::<usize>(),
            runs.len(),
            unfinished,
            twice.len(),
            twice.iter().take(5).collect::<Vec<_>>()
        ),
    );
    // The launcher agrees: no job's record holds an attempt it never claimed.
    let claimed: BTreeMap<String, i64> = sqlx::query("SELECT id, attempt FROM launcher.jobs")
        .fetch_all(&pool)
        .await
        .expect("jobs")
        .into_iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    let unknown: Vec<_> = per_attempt
        .keys()
        .filter(|(job, attempt)| claimed.get(job).is_none_or(|a| i64::from(*attempt) > *a))
        .collect();
    check(
        unknown.is_empty(),
        format!(
            "every recorded run is a claimed attempt of a launcher job ({} jobs): unknown {unknown:?}",
            claimed.len()
        ),
    );

    // No effect of a finished run lost to a peer's restart: its usage and its finish
    // comment, for the final attempt of every LLM job that succeeded.
    let lost: Vec<(String, String, i64, bool, bool)> = sqlx::query(
        "SELECT j.id, j.agent, j.attempt,
                EXISTS (SELECT 1 FROM usage_ledger.agent_runs u
                         WHERE u.job_id = j.id AND u.attempt = j.attempt),
                EXISTS (SELECT 1 FROM stage_engine.outbox o
                         WHERE o.idempotency_key = 'launcher:' || j.id || ':' || j.attempt || ':finish')
           FROM launcher.jobs j WHERE j.kind = 'llm' AND j.status = 'succeeded'",
    )
    .fetch_all(&pool)
    .await
    .expect("usage and comments")
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3), r.get(4)))
    .filter(|(_, _, _, usage, comment)| !usage || !comment)
    .collect();
    check(
        lost.is_empty(),
        format!(
            "succeeded runs whose usage or finish comment is missing: {} {:?}",
            lost.len(),
            lost.iter().take(5).collect::<Vec<_>>()
        ),
    );

    // Merges.
    let (merge_log, merge_requests) = gitea.with(|d| (d.merge_log.clone(), d.merge_requests));
    let mut per_pr: BTreeMap<(String, u64), usize> = BTreeMap::new();
    for (repo, number, _) in &merge_log {
        *per_pr.entry((repo.clone(), *number)).or_default() += 1;
    }
    let prs_opened: usize = gitea.with(|d| d.pulls.len());
    check(
        per_pr.values().all(|n| *n == 1),
        format!(
            "PRs: {prs_opened} opened, {} merges ({merge_requests} merge requests), PRs merged twice: {}",
            merge_log.len(),
            per_pr.values().filter(|n| **n > 1).count()
        ),
    );
    let mut merged_per_item: BTreeMap<String, usize> = BTreeMap::new();
    for item in &items {
        let branch = format!("orch/{}", item.key);
        let mut merged = 0;
        for ((repo, number), _) in per_pr.iter().filter(|((r, _), _)| *r == item.repo) {
            if gitea
                .pr(repo, *number)
                .await
                .is_some_and(|pr| pr.head_branch == branch)
            {
                merged += 1;
            }
        }
        merged_per_item.insert(item.key.clone(), merged);
    }
    let mut missing_on_main = Vec::new();
    for item in items
        .iter()
        .filter(|i| status_of.get(&i.key).is_some_and(|s| s == "done"))
    {
        let module = item.key.to_lowercase().replace('-', "_");
        if gitea
            .file(&item.repo, "main", &format!("scripted/{module}.py"))
            .await
            .is_none()
        {
            missing_on_main.push(item.key.clone());
        }
    }
    check(
        merged_per_item.values().all(|n| *n <= 1) && missing_on_main.is_empty(),
        format!(
            "each item's branch merged at most once ({} items merged once); done items whose change is not on main: {missing_on_main:?}",
            merged_per_item.values().filter(|n| **n == 1).count()
        ),
    );

    // Webhooks: the inbox, and stage-engine's effects of each.
    let inbox: BTreeMap<String, i64> =
        sqlx::query("SELECT state, COUNT(*) FROM gateway.webhook_inbox GROUP BY state")
            .fetch_all(&pool)
            .await
            .expect("inbox")
            .into_iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    // Each approving comment: accepted at most once, and at most one transition out of the
    // human gate per accepted approval.
    let accepted: BTreeMap<String, i64> = sqlx::query(
        "SELECT work_item, COUNT(*) FROM stage_engine.approvals WHERE accepted <> 0 GROUP BY work_item",
    )
    .fetch_all(&pool)
    .await
    .expect("approvals")
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let gates_passed: BTreeMap<String, i64> = sqlx::query(
        "SELECT work_item, COUNT(*) FROM stage_engine.stage_transitions
          WHERE from_status = 'awaiting_approval' AND to_stage = 'architecture' GROUP BY work_item",
    )
    .fetch_all(&pool)
    .await
    .expect("transitions")
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let dones: BTreeMap<String, i64> = sqlx::query(
        "SELECT work_item, COUNT(*) FROM stage_engine.stage_transitions WHERE to_stage = 'done' GROUP BY work_item",
    )
    .fetch_all(&pool)
    .await
    .expect("transitions")
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    let comments_posted: usize = items.iter().map(|i| i.approvals.len()).sum();
    let retries_issued = items
        .iter()
        .filter(|i| i.scenario == Scenario::MissingCommand && i.acted)
        .count();
    let applied_twice: Vec<&String> = gates_passed
        .iter()
        .filter(|(k, n)| **n > accepted.get(*k).copied().unwrap_or(0))
        .map(|(k, _)| k)
        .collect();
    check(
        applied_twice.is_empty()
            && senders.duplicate_answers.keys().all(|a| a == "duplicate")
            && dones.values().all(|n| *n == 1)
            // A human's retry is recorded beside the approvals (one per command id).
            && accepted.values().sum::<i64>() <= (comments_posted + retries_issued) as i64,
        format!(
            "webhooks: Plane sent {} (approving comments {comments_posted}), Gitea sent {}; resent after a failure {}, duplicates sent on purpose {} (answered {:?}); inbox {inbox:?}; approvals accepted {}, gates passed {}, items through the gate more often than approved: {applied_twice:?}; items done twice: {}",
            senders.plane_seen,
            senders.gitea_seen,
            senders.resent_after_failure,
            senders.duplicates_sent,
            senders.duplicate_answers,
            accepted.values().sum::<i64>(),
            gates_passed.values().sum::<i64>(),
            dones.values().filter(|n| **n > 1).count()
        ),
    );

    // Jobs left running, and the longest run seen.
    let running = count(
        &pool,
        "SELECT COUNT(*) FROM launcher.jobs WHERE status = 'running'",
    )
    .await;
    let bound = running_bound();
    check(
        running == 0 && longest_run_ms <= i64::try_from(bound.as_millis()).unwrap_or(i64::MAX),
        format!(
            "jobs running at the end: {running}; the longest a job was seen running: {:.1} s (the reaper's bound: {bound:?})",
            longest_run_ms as f64 / 1000.0
        ),
    );

    // Dead letters.
    let dead_inbox = inbox.get("dead").copied().unwrap_or(0);
    let failed_outbox = count(
        &pool,
        "SELECT (SELECT COUNT(*) FROM stage_engine.outbox WHERE state = 'failed')
              + (SELECT COUNT(*) FROM launcher.outbox WHERE state = 'failed')",
    )
    .await;
    let failed_jobs: Vec<(String, String, String, String)> = sqlx::query(
        "SELECT work_item, agent, outcome, reason FROM launcher.jobs WHERE status = 'failed' ORDER BY work_item",
    )
    .fetch_all(&pool)
    .await
    .expect("failed jobs")
    .into_iter()
    .map(|r| (r.get(0), r.get(1), r.get(2), r.get(3)))
    .collect();
    let job_outcomes: BTreeMap<String, i64> = sqlx::query(
        "SELECT status || '/' || outcome, COUNT(*) FROM launcher.jobs GROUP BY 1 ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .expect("outcomes")
    .into_iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect();
    // A job fails for good only where a scripted fault made it (the missing command, the
    // removed repository); any other failed job is one no fault explains.
    let expected_failure: Vec<&str> = items
        .iter()
        .filter(|i| matches!(i.scenario, Scenario::MissingCommand | Scenario::RepoRemoved))
        .map(|i| i.key.as_str())
        .collect();
    let unexplained: Vec<_> = failed_jobs
        .iter()
        .filter(|(w, ..)| !expected_failure.contains(&w.as_str()))
        .collect();
    check(
        dead_inbox == 0 && failed_outbox == 0 && unexplained.is_empty(),
        format!(
            "dead letters: inbox dead {dead_inbox}, outboxes failed {failed_outbox}, failed jobs {} ({} of them made by a scripted fault), unexplained {:?}; jobs by status/outcome {job_outcomes:?}",
            failed_jobs.len(),
            failed_jobs.len() - unexplained.len(),
            unexplained.iter().take(5).collect::<Vec<_>>()
        ),
    );
    // No effect applied twice on Plane: one comment per idempotency key.
    let mut per_external: BTreeMap<String, usize> = BTreeMap::new();
    let posted = plane.with(|d| {
        for c in &d.comments {
            if let Some(id) = &c.external_id {
                *per_external.entry(id.clone()).or_default() += 1;
            }
        }
        d.comments.len()
    });
    let twice: Vec<_> = per_external.iter().filter(|(_, n)| **n > 1).collect();
    check(
        twice.is_empty(),
        format!(
            "Plane comments: {posted}, of them the orchestrator's {}; posted twice: {} {:?}",
            per_external.len(),
            twice.len(),
            twice.iter().take(3).collect::<Vec<_>>()
        ),
    );
    // The stall watchdog is a backstop: each firing means a seam lost something. Read from
    // stage-engine's log (its counters restart with it).
    let mut firings: Vec<String> = Vec::new();
    for (name, path) in stack.log_paths() {
        if name != "stage-engine" {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        for line in text.lines().filter(|l| l.contains("stall watchdog fired")) {
            let plain = strip_ansi(line);
            let field = |k: &str| {
                plain
                    .split_whitespace()
                    .find_map(|w| w.strip_prefix(&format!("{k}=")).map(str::to_owned))
                    .unwrap_or_else(|| "?".to_owned())
                    .trim_matches('"')
                    .to_owned()
            };
            firings.push(format!("{} {}", field("work_item"), field("reason")));
        }
    }
    let firings_line = format!(
        "info stall watchdog firings: {} {:?}",
        firings.len(),
        firings
    );
    plane.check();
    gitea.check();

    eprintln!("fault suite figures (seed {}):", size.seed);
    report.push(firings_line);
    for line in report.iter().chain(&tail_lines) {
        eprintln!("  {line}");
    }
    if !failures.is_empty() {
        let mut diag = String::new();
        for item in &items {
            if status_of.get(&item.key).is_some_and(|s| s == "done") {
                continue;
            }
            diag.push_str(&format!(
                "item {} ({}): {:?}, approvals posted {}\n",
                item.key,
                item.repo,
                status_of.get(&item.key),
                item.approvals.len()
            ));
            for r in sqlx::query(
                "SELECT agent, stage, status, attempt, outcome, reason FROM launcher.jobs WHERE work_item = $1 ORDER BY enqueued_at_ms",
            )
            .bind(&item.key)
            .fetch_all(&pool)
            .await
            .unwrap_or_default()
            {
                let reason: String = r.get(5);
                diag.push_str(&format!(
                    "  job {} {} {} attempt {} {}: {}\n",
                    r.get::<String, _>(0),
                    r.get::<String, _>(1),
                    r.get::<String, _>(2),
                    r.get::<i64, _>(3),
                    r.get::<String, _>(4),
                    reason.chars().take(200).collect::<String>()
                ));
            }
        }
        for (name, path) in stack.log_paths() {
            diag.push_str(&format!("--- log of {name}: {}\n", path.display()));
        }
        // Keep the directory for a look at the logs.
        let kept = dir.keep();
        panic!(
            "fault suite (seed {}): {} invariant(s) failed:\n{}\n{diag}\nlogs kept under {}",
            size.seed,
            failures.len(),
            failures.join("\n"),
            kept.display()
        );
    }
    drop(stack);
}
