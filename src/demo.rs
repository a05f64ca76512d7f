//! `orchestrator demo`: one work item through every stage, on a throw-away stack, with
//! nothing configured.
//!
//! It makes a temp dir, a sample repository in the local forge and the agents' prompts and
//! scripted agent (built into this binary from `examples/agents/`), starts every part in
//! this process on SQLite (every listener on `127.0.0.1:0`, so it runs beside a running
//! `orchestrator up`), creates a work item, approves it as the demo's human, and prints a
//! live timeline built from the services' RPCs — `ListTransitions`, `ListJobs`, `GetRun`,
//! `GetWatch`, never their logs — through the real deploy to `<workspace>/prod` and the
//! post-deploy watch of its health endpoint ([`prod`]), then the usage summary
//! (`WorkItemSummary`) and the merge on main.
//!
//! What it reads from outside: nothing from `./.env` or `ORCH_*` for the stack it starts.
//! It honours `PATH` (git, python3), `TMPDIR` (where the temp dir goes), `ORCH_LOG` (the
//! services' logs on stderr, also shown with `--verbose`), and with `--real-cli`
//! `ORCH_CLAUDE_CLI` / `ORCH_CLAUDE_CLI_DIR` (where the Claude Code CLI is installed).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use clap::Args;
use launcher::config::{DEFAULT_AGENT_COMMAND, shell_quote, split_command};
use orchestrator_agent_output::Usage;
use orchestrator_git::Git;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::deploy_target::DeployStep;
use orchestrator_kit::time::now_ms;
use orchestrator_kit::{Config, Env, ServiceName};
use orchestrator_model_server::ModelServer;
use orchestrator_proto::launcher::v1::{Job, JobKind, JobStatus, ListJobsRequest};
use orchestrator_proto::merge_gate::v1::{ListMergesRequest, MergeRecord};
use orchestrator_proto::post_deploy::v1::{GetWatchRequest, ProbeSample, Watch};
use orchestrator_proto::stage_engine::v1::{
    AdvanceOutcome, GetWorkItemRequest, ListTransitionsRequest, Transition, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::{AgentRun, RunKey, WorkItemSummaryRequest};
use tokio_util::sync::CancellationToken;

use crate::Node;

mod prod;

/// The sample repository, a bare repository in the local forge.
pub const REPO: &str = "acme/greeter";
/// The demo's work item.
pub const KEY: &str = "DEMO-1";
/// Who approves at the human gate: the demo plays the human.
pub const HUMAN: &str = "demo-human";

const TITLE: &str = "Add a --shout option to the greeter";
const DESCRIPTION: &str = "`python3 greeter.py --shout Ada` should print `HELLO, ADA!`.\n\
The default output stays as it is. Add a test.\n";

/// The role prompts and the scripted agent, from `examples/agents/`: the demo works from
/// any directory and from an installed binary.
const AGENT_FILES: [(&str, &str); 7] = [
    ("analyst.md", include_str!("../examples/agents/analyst.md")),
    (
        "architect.md",
        include_str!("../examples/agents/architect.md"),
    ),
    (
        "developer.md",
        include_str!("../examples/agents/developer.md"),
    ),
    (
        "reviewer.md",
        include_str!("../examples/agents/reviewer.md"),
    ),
    ("tester.md", include_str!("../examples/agents/tester.md")),
    (
        "deployer.md",
        include_str!("../examples/agents/deployer.md"),
    ),
    (
        SCRIPTED_AGENT,
        include_str!("../examples/agents/scripted-agent.py"),
    ),
];
const SCRIPTED_AGENT: &str = "scripted-agent.py";

/// The sample project: small, real, and runnable.
const SAMPLE_FILES: [(&str, &str); 3] = [
    (
        "README.md",
        "# greeter\n\nA tiny command-line greeter.\n\n```sh\npython3 greeter.py Ada   # Hello, Ada!\npython3 -m unittest      # the tests\n```\n",
    ),
    (
        "greeter.py",
        "\"\"\"A tiny command-line greeter.\"\"\"\n\nimport sys\n\n\ndef greet(name: str) -> str:\n    return f\"Hello, {name}!\"\n\n\nif __name__ == \"__main__\":\n    print(greet(sys.argv[1] if len(sys.argv) > 1 else \"world\"))\n",
    ),
    (
        "test_greeter.py",
        "import unittest\n\nfrom greeter import greet\n\n\nclass GreetTest(unittest.TestCase):\n    def test_greets_by_name(self):\n        self.assertEqual(greet(\"Ada\"), \"Hello, Ada!\")\n\n\nif __name__ == \"__main__\":\n    unittest.main()\n",
    ),
];
const SAMPLE_COMMIT: &str = "Greeter: a tiny command-line program";

/// The launcher's no-LLM job that merges a deployed work item.
const DEPLOY_FINALIZER: &str = launcher::reserved::RESERVED[0];
/// How often the timeline asks the services what changed.
const POLL: Duration = Duration::from_millis(100);
/// How long a transition caused by an agent waits for that agent's run line (the launcher
/// calls `AdvanceStage` just before it ends the job) before it is shown anyway.
const HOLD_FOR_RUN: Duration = Duration::from_secs(10);
/// The post-deploy watch's window in the demo: seconds, not the default quarter hour.
const WATCH_WINDOW_S: u64 = 5;
/// The launcher's reserved job that ticks the post-deploy watch.
const POST_DEPLOY_MONITOR: &str = launcher::reserved::RESERVED[1];
/// How long the stack may take to drain when the demo ends.
const DRAIN_LIMIT: Duration = Duration::from_secs(3);

/// `orchestrator demo`'s options.
#[derive(Debug, Clone, Default, Args)]
pub struct DemoArgs {
    /// Leaves the stack up afterwards (for grpcurl and `GET /queue`) until Ctrl-C or SIGTERM,
    /// and keeps its temp dir.
    #[arg(long)]
    pub keep: bool,
    /// Runs the REAL Claude Code CLI as the agent, against a scripted model server started in
    /// this process (no model, no network). Install the CLI with scripts/install-claude-cli.
    #[arg(long)]
    pub real_cli: bool,
    /// Shows the services' logs on stderr (the ORCH_LOG filter, default info).
    #[arg(long)]
    pub verbose: bool,
    /// Stages (comma-separated) whose agent gives a negative verdict on its first run, to
    /// show a rollback: review, testing, deploy-staging or deploy.
    #[arg(long, value_name = "STAGES", value_delimiter = ',')]
    pub reject: Vec<String>,
    /// Rollbacks allowed before the work item is blocked (ORCH_MAX_ROLLBACKS); with
    /// --reject, 0 shows a blocked item (exit 1).
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub max_rollbacks: u32,
    /// Makes the deploy of the demo's change break production (its health answers 500),
    /// to show the post-deploy watch rolling back to the previous sha.
    #[arg(long)]
    pub break_prod: bool,
    /// Gives up (exit 1) after this many seconds [default: 120, 600 with --real-cli].
    #[arg(long, value_name = "SECONDS")]
    pub timeout: Option<u64>,
}

/// Why the demo did not end with its work item merged; printed as `error: ...`, exit 1.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// Something the demo needs is missing or could not be prepared.
    #[error("{0}")]
    Setup(String),
    /// The work item did not get to `done` and merged: where it stopped and why.
    #[error("{0}")]
    Pipeline(String),
    /// SIGINT or SIGTERM.
    #[error("interrupted")]
    Interrupted,
}

fn setup(what: &str) -> impl FnOnce(std::io::Error) -> DemoError + '_ {
    move |e| DemoError::Setup(format!("{what}: {e}"))
}

/// The agent that plays every role.
enum Agent {
    /// `examples/agents/scripted-agent.py`, run with python3.
    Scripted,
    /// The real Claude Code CLI against the scripted model server.
    RealCli { cli: PathBuf, model: ModelServer },
}

/// Runs the demo until its work item is merged, or fails. `stop` is cancelled by SIGINT
/// and SIGTERM; it also stops the stack.
pub async fn run(args: DemoArgs, stop: CancellationToken) -> Result<(), DemoError> {
    let clock = Instant::now();
    let reject = rejected_stages(&args.reject)?;
    require_tool("git", "the local forge and the agents' checkouts need git")?;
    let agent = if args.real_cli {
        let cli = orchestrator_model_server::claude_cli().map_err(|why| {
            DemoError::Setup(format!(
                "--real-cli: {why}; or install @anthropic-ai/claude-code@{} with npm and set ORCH_CLAUDE_CLI to its bin/claude",
                orchestrator_model_server::CLAUDE_CLI_VERSION
            ))
        })?;
        let model = ModelServer::start()
            .await
            .map_err(setup("cannot start the scripted model server"))?;
        for stage in &reject {
            model.control.reject_first(stage);
        }
        Agent::RealCli { cli, model }
    } else {
        require_tool(
            "python3",
            "the scripted agent is a Python 3 script: install python3, or use --real-cli",
        )?;
        Agent::Scripted
    };

    let workspace = tempfile::Builder::new()
        .prefix("orchestrator-demo-")
        .tempdir()
        .map_err(setup("cannot make the demo's temp dir"))?;
    let root = std::path::absolute(workspace.path()).map_err(setup("the temp dir"))?;
    let agents_dir = root.join("agents");
    write_files(&agents_dir, &AGENT_FILES).map_err(setup("cannot write the agents"))?;
    let data_dir = root.join("var");
    let bare = forge_repo_dir(&data_dir);
    let git = Git::new();
    let main_sha = create_sample_repo(&git, &root.join("sample"), &bare).await?;

    let prod_dir = root.join("prod");
    let health = prod::HealthEndpoint::start(prod_dir.clone())
        .await
        .map_err(setup("cannot start production's health endpoint"))?;
    let behaviour = prod::Behaviour {
        reject_staging: reject.iter().any(|r| r == "deploy-staging"),
        reject_prod: reject.iter().any(|r| r == "deploy"),
        break_prod: args.break_prod,
    };
    let targets = prod::targets(&root, &bare, &health.url, behaviour)
        .map_err(setup("cannot write the deploy script"))?;
    let env = demo_env(&data_dir, &agents_dir, &agent, &reject, args.max_rollbacks)?
        .with("ORCH_DEPLOY_TARGETS_JSON", targets);
    let config = Config::from_env(env).map_err(|e| DemoError::Setup(e.to_string()))?;
    let node = Node::start(config, &ServiceName::ALL, stop.clone())
        .await
        .map_err(|e| DemoError::Setup(format!("the stack did not start: {e}")))?;
    let config = node.config.clone();
    let addrs = node.addrs.clone();
    let stack = tokio::spawn(node.wait());
    let clients = Clients::from_config(&config).map_err(|e| DemoError::Setup(e.to_string()))?;

    println!("orchestrator demo: work item {KEY} through every stage, on a throw-away stack");
    println!(
        "  workspace   {} ({})",
        root.display(),
        if args.keep {
            "kept: --keep"
        } else {
            "deleted at the end; --keep keeps it"
        }
    );
    println!(
        "  repository  {REPO}: a bare git repository in the local forge, main at {} \"{SAMPLE_COMMIT}\"",
        short(&main_sha)
    );
    match &agent {
        Agent::Scripted => println!(
            "  agent       the scripted agent (python3 {}): no model, no network",
            agents_dir.join(SCRIPTED_AGENT).display()
        ),
        Agent::RealCli { cli, model } => println!(
            "  agent       the real Claude Code CLI ({}) against a scripted model server on {}: no network",
            cli.display(),
            model.addr
        ),
    }
    println!(
        "  stack       {} parts in this process on 127.0.0.1 (ports from the OS), SQLite in {}",
        addrs.len(),
        data_dir.display()
    );
    println!(
        "  production  <workspace>/prod, its health on {} (the post-deploy watch probes it{})",
        health.url,
        if args.break_prod {
            "; --break-prod: the demo's change breaks it"
        } else {
            ""
        }
    );
    for stage in &reject {
        let agent = stage
            .parse::<stage_engine::pipeline::Stage>()
            .ok()
            .and_then(stage_engine::pipeline::get_agent_for_stage)
            .unwrap_or("agent");
        println!(
            "  rejects     the {agent} says no on its first {stage} run (rollbacks allowed: {})",
            args.max_rollbacks
        );
    }
    println!();

    let deadline =
        Duration::from_secs(
            args.timeout
                .unwrap_or(if args.real_cli { 600 } else { 120 }),
        );
    let result = async {
        let created = crate::item::create(&clients, REPO, TITLE, DESCRIPTION, Some(KEY))
            .await
            .map_err(|e| DemoError::Setup(e.to_string()))?;
        print!("{created}");
        let t0 = now_ms();
        println!();
        println!("{}", header());
        let mut timeline = Timeline::new(&clients, t0, &prod_dir, (&git, &bare));
        let end = timeline.follow(clock + deadline, &stop, &stack).await?;
        report(&clients, &git, &bare, &end, clock).await?;
        let rolled_back = end.watch.state == "rolled_back";
        for (name, dir) in [("Staging", "staging"), ("Production", "prod")] {
            let sha = std::fs::read_to_string(root.join(dir).join("DEPLOYED_SHA"))
                .unwrap_or_else(|_| "nothing deployed".to_owned());
            let by = if dir == "prod" && rolled_back {
                "rollback"
            } else {
                "deploy"
            };
            println!(
                "{name} (<workspace>/{dir}, by its {by} command): {}",
                sha.trim()
            );
        }
        let (status, body) = prod::health(&prod_dir).await;
        println!("Production's health now: {status} {}", body.trim());
        Ok(())
    }
    .await;
    if let Err(e) = &result {
        // Said here too so that it shows above the --keep banner.
        if args.keep {
            eprintln!("error: {e}");
        }
    }

    if args.keep && !stop.is_cancelled() {
        keep_banner(&root, &addrs, &bare);
        stop.cancelled().await;
    }
    stop.cancel();
    let _ = tokio::time::timeout(DRAIN_LIMIT, stack).await;
    if args.keep {
        let kept = workspace.keep();
        println!(
            "stopped; the workspace stays at {} (rm -rf it when done)",
            kept.display()
        );
    }
    // Keep the model server up until the stack is down: a last agent may still call it.
    drop(agent);
    drop(health);
    result
}

/// The verdict stages `--reject` names, checked: a negative verdict needs a verdict.
fn rejected_stages(stages: &[String]) -> Result<Vec<String>, DemoError> {
    let mut out = Vec::new();
    for s in stages {
        let s = s.trim().to_ascii_lowercase();
        if s.is_empty() {
            continue;
        }
        if !orchestrator_model_server::has_verdict(&s) {
            return Err(DemoError::Setup(format!(
                "--reject: '{s}' is not a stage with a verdict (review, testing, deploy-staging, deploy)"
            )));
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

fn require_tool(program: &str, why: &str) -> Result<(), DemoError> {
    match std::process::Command::new(program)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
    {
        Ok(s) if s.success() => Ok(()),
        Ok(s) => Err(DemoError::Setup(format!(
            "{program} --version failed ({s}): {why}"
        ))),
        Err(e) => Err(DemoError::Setup(format!(
            "{program} is not on PATH ({e}): {why}"
        ))),
    }
}

fn write_files(dir: &Path, files: &[(&str, &str)]) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (name, text) in files {
        std::fs::write(dir.join(name), text)?;
    }
    Ok(())
}

/// Where the local forge keeps [`REPO`] (its default directory under the data dir).
fn forge_repo_dir(data_dir: &Path) -> PathBuf {
    let (owner, name) = REPO.split_once('/').unwrap_or(("acme", REPO));
    data_dir
        .join("forge")
        .join(owner)
        .join(format!("{name}.git"))
}

/// Commits the sample project in `work` and pushes it to the bare repository `bare`, on
/// main. Returns main's commit.
async fn create_sample_repo(git: &Git, work: &Path, bare: &Path) -> Result<String, DemoError> {
    let failed = |e: orchestrator_git::GitError| {
        DemoError::Setup(format!("cannot create the sample repository: {e}"))
    };
    write_files(work, &SAMPLE_FILES).map_err(setup("cannot write the sample project"))?;
    git.ok(work, &["init", "-q", "--initial-branch=main"])
        .await
        .map_err(failed)?;
    git.ok(work, &["add", "-A"]).await.map_err(failed)?;
    git.ok(
        work,
        &[
            "-c",
            "user.name=demo",
            "-c",
            "user.email=demo@localhost",
            "-c",
            "commit.gpgsign=false",
            "commit",
            "-q",
            "-m",
            SAMPLE_COMMIT,
        ],
    )
    .await
    .map_err(failed)?;
    let bare_str = bare.display().to_string();
    std::fs::create_dir_all(bare).map_err(setup("cannot create the forge's directory"))?;
    git.ok(bare, &["init", "--bare", "-q", "--initial-branch=main"])
        .await
        .map_err(failed)?;
    git.ok(work, &["push", "-q", &bare_str, "main"])
        .await
        .map_err(failed)?;
    let sha = git
        .rev_parse(bare, "refs/heads/main")
        .await
        .map_err(failed)?
        .ok_or_else(|| DemoError::Setup("the sample repository has no main".to_owned()))?;
    // Only the forge's copy matters from here on.
    let _ = std::fs::remove_dir_all(work);
    Ok(sha)
}

/// The stack's configuration: built here, never read from `./.env` or the environment.
/// Every part on port 0; the polls that pace a run made fast.
fn demo_env(
    data_dir: &Path,
    agents_dir: &Path,
    agent: &Agent,
    reject: &[String],
    max_rollbacks: u32,
) -> Result<Env, DemoError> {
    let mut env = Env::default();
    for part in ServiceName::ALL {
        env = env.with(part.addr_var(), "127.0.0.1:0");
    }
    let mut env = env
        .with("ORCH_DATA_DIR", data_dir.display().to_string())
        .with("ORCH_AGENTS_DIR", agents_dir.display().to_string())
        .with("ORCH_TRACKER", "local")
        .with("ORCH_FORGE", "local")
        .with("ORCH_MAX_ROLLBACKS", max_rollbacks.to_string())
        .with("ORCH_LAUNCHER_POLL_MS", "100")
        .with("ORCH_LAUNCHER_HEARTBEAT_MS", "1000")
        .with("ORCH_OUTBOX_POLL_MS", "100")
        .with("ORCH_OUTBOX_BACKOFF_BASE_MS", "200")
        .with("ORCH_OUTBOX_BACKOFF_MAX_MS", "2000")
        .with("ORCH_GATEWAY_DISPATCH_POLL_MS", "100")
        .with("ORCH_REAPER_INTERVAL_S", "2")
        .with("ORCH_BACKOFF_BASE_S", "1")
        .with("ORCH_BACKOFF_MAX_S", "5")
        .with("ORCH_BREAKER_COOLDOWN_S", "5")
        .with("ORCH_LEASE_RETRY_S", "1")
        // The post-deploy watch of the sample repo: a window of seconds, a tick a second,
        // two failed health probes in a row roll back.
        .with("ORCH_POST_DEPLOY_REPOS", REPO)
        .with("ORCH_POST_DEPLOY_WINDOW_S", WATCH_WINDOW_S.to_string())
        .with("ORCH_POST_DEPLOY_TICK_S", "1")
        .with("ORCH_POST_DEPLOY_FAIL_THRESHOLD", "2")
        .with("ORCH_POST_DEPLOY_PROBE_TIMEOUT_MS", "2000")
        .with("ORCH_POST_DEPLOY_ROLLBACK_TIMEOUT_S", "60")
        .with("ORCH_AGENT_TIMEOUT_SECONDS", "300")
        .with("ORCH_AGENT_KILL_GRACE_SECONDS", "2");
    let command: Vec<String> = match agent {
        Agent::Scripted => {
            let mut words = Vec::new();
            if !reject.is_empty() {
                // The launcher passes no ORCH_* variable to an agent: `env` sets it.
                words.push("env".to_owned());
                words.push(format!("ORCH_SCRIPTED_REJECT={}", reject.join(",")));
            }
            words.push("python3".to_owned());
            words.push(agents_dir.join(SCRIPTED_AGENT).display().to_string());
            words
        }
        Agent::RealCli { cli, model } => {
            // The default agent command, with the installed CLI for `claude`.
            let mut words = split_command(DEFAULT_AGENT_COMMAND).map_err(DemoError::Setup)?;
            words[0] = cli.display().to_string();
            // A throw-away HOME: the CLI keeps its state there, never in the user's.
            let home = data_dir.join("agent-home");
            std::fs::create_dir_all(&home).map_err(setup("cannot create the agents' HOME"))?;
            env = env.with("HOME", home.display().to_string());
            let mut passthrough = Vec::new();
            for (name, value) in orchestrator_model_server::cli_env(&model.base_url()) {
                // ANTHROPIC_* and CLAUDE_* reach the agent anyway; the others are listed.
                if !name.starts_with("ANTHROPIC_") && !name.starts_with("CLAUDE_") {
                    passthrough.push(name);
                }
                env = env.with(name, value);
            }
            env = env.with("ORCH_AGENT_ENV_PASSTHROUGH", passthrough.join(","));
            words
        }
    };
    let command = command
        .iter()
        .map(|w| shell_quote(w))
        .collect::<Vec<_>>()
        .join(" ");
    Ok(env.with("ORCH_AGENT_COMMAND", command))
}

/// How the timeline ended well: the work item done and its merge finalized.
struct Finished {
    item: WorkItem,
    llm_runs: u32,
    finalizer: Job,
    /// The post-deploy watch, over (closed or rolled back).
    watch: Watch,
}

/// The live timeline of one work item, from the services' RPCs.
struct Timeline<'a> {
    clients: &'a Clients,
    /// Times are shown relative to this (epoch ms): when the work item was created.
    t0_ms: i64,
    /// Runs already shown: (job id, attempt).
    shown_runs: HashSet<(String, u32)>,
    /// Successful runs shown per (agent, stage): the transitions they caused may follow.
    succeeded: HashMap<(String, String), usize>,
    /// Caused transitions shown per (agent, from stage).
    caused_shown: HashMap<(String, String), usize>,
    /// Transitions read so far (ListTransitions is in order and append-only).
    transitions_read: usize,
    /// Transitions read but not shown yet, with when they were read.
    held: VecDeque<(Transition, Instant)>,
    approved: bool,
    llm_runs: u32,
    last_transition: Option<Transition>,
    /// Production's directory, whose health is shown after a rollback.
    prod_dir: &'a Path,
    /// The forge's repository, where a deploy run's artifact is read.
    forge: (&'a Git, &'a Path),
    /// The work item's branch.
    branch: String,
    /// The post-deploy watch's probes shown so far (their `seq`).
    samples_shown: u32,
    /// The watch once it is over and its end is on screen.
    watch_over: Option<Watch>,
}

/// The column titles of the timeline.
fn header() -> String {
    format!(
        "  {:>7}  {:<15} {:<17} {:>6}  TOKENS (IN, CACHED, OUT) AND COST",
        "TIME", "STAGE", "AGENT", "TOOK"
    )
}

fn seconds(ms: i64) -> String {
    format!("{:.1}s", ms.max(0) as f64 / 1000.0)
}

fn short(sha: &str) -> &str {
    sha.get(..7).unwrap_or(sha)
}

/// One run's line: when it ended, its stage and agent, how long it took, what it used.
fn run_line(t0_ms: i64, end_ms: i64, job: &Job, took_ms: i64, usage: &str) -> String {
    format!(
        "  {:>7}  {:<15} {:<17} {:>6}  {usage}",
        format!("+{}", seconds(end_ms - t0_ms)),
        job.stage,
        job.agent,
        seconds(took_ms)
    )
}

/// One probe of the post-deploy watch: when, what production's health answered, and what
/// the watch made of it; the reason under it when the watch acts.
fn probe_line(t0_ms: i64, watch: &Watch, p: &ProbeSample) -> String {
    let health = if p.health_status == 0 {
        format!("health probe error: {}", p.probe_error)
    } else {
        format!(
            "GET /health {} in {} ms",
            p.health_status, p.health_latency_ms
        )
    };
    let mut out = format!(
        "  {:>7}  {:<15} {:<17} {:>6}  {health} · {} · {}",
        format!("+{}", seconds(p.at_ms - t0_ms)),
        "done",
        "post-deploy",
        format!("#{}", p.seq),
        p.classification,
        p.action
    );
    if p.action != "CONTINUE" {
        let _ = write!(out, "\n           {}: {}", watch.repo, p.reason);
    }
    out
}

/// A stage change under the run (or the approval) that caused it, with its failed checks.
fn transition_lines(t: &Transition) -> String {
    let mut out = if t.from_stage == t.to_stage {
        format!("           {}: {}", t.to_stage, t.cause)
    } else {
        format!("           {} -> {}: {}", t.from_stage, t.to_stage, t.cause)
    };
    for q in t.qg_results.iter().filter(|q| !q.passed) {
        let _ = write!(out, "\n             failed {}: {}", q.check, q.detail);
    }
    out
}

/// Whether the job's last attempt has ended (and is not running again yet).
fn attempt_ended(job: &Job) -> bool {
    match job.status() {
        JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled => job.attempt > 0,
        // A retry waiting for its time: the attempt ended with an outcome.
        JobStatus::Queued => job.attempt > 0 && !job.outcome.is_empty(),
        JobStatus::Running | JobStatus::Unspecified => false,
    }
}

fn is_terminal(job: &Job) -> bool {
    matches!(
        job.status(),
        JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
    )
}

fn status_name(job: &Job) -> String {
    job.status().as_str_name().to_ascii_lowercase()
}

fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> DemoError {
    move |s| DemoError::Pipeline(format!("{what}: {:?}: {}", s.code(), s.message()))
}

impl<'a> Timeline<'a> {
    fn new(
        clients: &'a Clients,
        t0_ms: i64,
        prod_dir: &'a Path,
        forge: (&'a Git, &'a Path),
    ) -> Self {
        Timeline {
            clients,
            t0_ms,
            shown_runs: HashSet::new(),
            succeeded: HashMap::new(),
            caused_shown: HashMap::new(),
            transitions_read: 0,
            held: VecDeque::new(),
            approved: false,
            llm_runs: 0,
            last_transition: None,
            prod_dir,
            forge,
            branch: String::new(),
            samples_shown: 0,
            watch_over: None,
        }
    }

    /// Polls until the work item is done and merged, blocked, failed, or out of time.
    async fn follow(
        &mut self,
        deadline: Instant,
        stop: &CancellationToken,
        stack: &tokio::task::JoinHandle<Result<(), String>>,
    ) -> Result<Finished, DemoError> {
        loop {
            let (item, jobs) = match self.step().await {
                Ok(look) => look,
                // A signal stops the stack too: its RPCs failing then is not the news.
                Err(_) if stop.is_cancelled() => return Err(DemoError::Interrupted),
                Err(e) => return Err(e),
            };
            if let Some(end) = self.ended(&item, jobs)? {
                return Ok(end);
            }
            if stack.is_finished() {
                return Err(DemoError::Pipeline(
                    "the stack stopped on its own (run with --verbose to see why)".to_owned(),
                ));
            }
            if Instant::now() >= deadline {
                let waiting = if item.expected_agent.is_empty() {
                    String::new()
                } else {
                    format!(", waiting for the {}", item.expected_agent)
                };
                return Err(DemoError::Pipeline(format!(
                    "gave up (--timeout): {KEY} is at stage {} ({}){waiting}",
                    item.stage, item.status
                )));
            }
            tokio::select! {
                () = stop.cancelled() => return Err(DemoError::Interrupted),
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }

    /// One look: shows the runs that ended and the transitions they caused, and approves
    /// at the human gate. Returns the work item and its jobs as they were.
    async fn step(&mut self) -> Result<(WorkItem, Vec<Job>), DemoError> {
        let mut se = self.clients.stage_engine.clone();
        // The item first: whatever state it is in, the transition that put it there is
        // in the list read next, so the gate and the end wait for it to be shown.
        let item = se
            .get_work_item(GetWorkItemRequest {
                key: KEY.to_owned(),
            })
            .await
            .map_err(rpc("GetWorkItem"))?
            .into_inner();
        self.branch.clone_from(&item.branch);
        let transitions = se
            .list_transitions(ListTransitionsRequest {
                work_item: KEY.to_owned(),
            })
            .await
            .map_err(rpc("ListTransitions"))?
            .into_inner()
            .transitions;
        for t in transitions.into_iter().skip(self.transitions_read) {
            self.transitions_read += 1;
            self.held.push_back((t, Instant::now()));
        }
        let jobs = self.jobs().await?;
        // A run's line waits for its end to reach the peers (the launcher's outbox delivers
        // RecordRun after the job ends), else its usage reads "no run recorded"; not for
        // long, should a peer be down.
        let settled = |j: &Job| j.pending_effects == 0 || now_ms() - j.finished_at_ms > 5_000;
        let mut ended: Vec<&Job> = jobs
            .iter()
            .filter(|j| {
                // The watch's ticks are shown from its probes, below.
                j.agent != POST_DEPLOY_MONITOR
                    && attempt_ended(j)
                    && settled(j)
                    && !self.shown_runs.contains(&(j.id.clone(), j.attempt))
            })
            .collect();
        ended.sort_by_key(|j| (j.finished_at_ms == 0, j.finished_at_ms));
        for job in ended {
            self.show_run(job).await;
            self.release(false);
        }
        self.release(false);
        if item.status == "done" && self.watch_over.is_none() {
            self.show_watch().await?;
        }

        // Once the analyst's run has ended and it and its gate are on screen: the human
        // reads, then approves.
        let running = jobs.iter().any(|j| j.status() == JobStatus::Running);
        if item.status == "awaiting_approval" && !self.approved && !running && self.held.is_empty()
        {
            self.approve().await?;
        }
        Ok((item, jobs))
    }

    async fn jobs(&self) -> Result<Vec<Job>, DemoError> {
        Ok(self
            .clients
            .launcher
            .clone()
            .list_jobs(ListJobsRequest {
                work_item: KEY.to_owned(),
                limit: 500,
                ..Default::default()
            })
            .await
            .map_err(rpc("ListJobs"))?
            .into_inner()
            .jobs)
    }

    /// Prints the line of the job's last attempt, which has ended.
    async fn show_run(&mut self, job: &Job) {
        self.shown_runs.insert((job.id.clone(), job.attempt));
        let end_ms = if job.finished_at_ms > 0 {
            job.finished_at_ms
        } else {
            now_ms()
        };
        let took = end_ms - job.started_at_ms;
        let llm = job.kind() == JobKind::Llm;
        let usage = if llm {
            self.llm_runs += 1;
            match self
                .clients
                .usage_ledger
                .clone()
                .get_run(RunKey {
                    job_id: job.id.clone(),
                    attempt: job.attempt,
                })
                .await
            {
                Ok(r) => usage_text(&r.into_inner()),
                Err(s) => format!("usage unavailable: {}", s.message()),
            }
        } else {
            format!("no model · {}: {}", job.outcome, job.reason)
        };
        println!("{}", run_line(self.t0_ms, end_ms, job, took, &usage));
        if llm && let Some(step) = DeployStep::for_stage(&job.stage) {
            self.show_deploy_command(step).await;
        }
        let succeeded = job.status() == JobStatus::Succeeded;
        if succeeded {
            *self
                .succeeded
                .entry((job.agent.clone(), job.stage.clone()))
                .or_default() += 1;
        }
        // A plain success is said by the stage change that follows; anything else here.
        if llm && !succeeded && !job.reason.is_empty() {
            let next = match job.status() {
                JobStatus::Queued => "; it runs again",
                _ => "",
            };
            println!(
                "           run {} {}: {}{next}",
                job.attempt, job.outcome, job.reason
            );
        }
    }

    /// The demo's workspace, shown as `<workspace>` in the commands' lines.
    fn workspace(&self) -> String {
        self.prod_dir
            .parent()
            .map(|p| p.display().to_string())
            .unwrap_or_default()
    }

    /// Under a deployer's run: the command the orchestrator ran for it and what it did, from
    /// the run's artifact on the work item's branch (the launcher pushes it before it ends
    /// the job).
    async fn show_deploy_command(&self, step: DeployStep) {
        let (git, bare) = self.forge;
        let spec = format!(
            "refs/heads/{}:docs/work-items/{KEY}/{}",
            self.branch,
            step.artifact()
        );
        let Ok(text) = git.ok(bare, &["show", &spec]).await else {
            return;
        };
        let field = |prefix: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(prefix))
                .map(|v| v.trim().trim_matches('`').to_owned())
        };
        let root = self.workspace();
        let argv = field("- argv: ")
            .unwrap_or_default()
            .replace(&root, "<workspace>");
        let result = field("- result: ").unwrap_or_else(|| "not run".to_owned());
        let status = field(&format!("{}: ", step.status_key())).unwrap_or_default();
        let mut line = format!(
            "           {} {argv}: {result}; {} {status}",
            step.command_key(),
            step.status_key()
        );
        if let Some(sha) = field("deployed_sha: ") {
            let _ = write!(line, ", deployed_sha {}", short(&sha));
        }
        if let Some(sha) = field("previous_sha: ").filter(|s| !s.is_empty()) {
            let _ = write!(line, ", previous_sha {}", short(&sha));
        }
        println!("{line}");
    }

    /// Shows the post-deploy watch's new probes, and its end once it is over: the rollback
    /// and production's health after it, or the window closing.
    async fn show_watch(&mut self) -> Result<(), DemoError> {
        let watch = match self
            .clients
            .post_deploy
            .clone()
            .get_watch(GetWatchRequest {
                work_item: KEY.to_owned(),
            })
            .await
        {
            Ok(w) => w.into_inner(),
            // Armed a moment after `deploy -> done`, through stage-engine's outbox.
            Err(s) if s.code() == tonic::Code::NotFound => return Ok(()),
            Err(s) => return Err(rpc("GetWatch")(s)),
        };
        let shown = self.samples_shown;
        for sample in watch.samples.iter().filter(|p| p.seq > shown) {
            self.samples_shown = sample.seq;
            println!("{}", probe_line(self.t0_ms, &watch, sample));
        }
        if !matches!(watch.state.as_str(), "closed" | "rolled_back") {
            return Ok(());
        }
        let root = self.workspace();
        if let Some(rb) = &watch.rollback {
            let result = match (rb.exit_code, rb.timed_out) {
                (_, true) => "timed out".to_owned(),
                (Some(c), _) => format!("exit {c}"),
                (None, _) => rb.error.clone(),
            };
            println!(
                "           rollback to {} (post-deploy, once): {}: {result} in {} ms",
                short(&watch.previous_sha),
                rb.command.replace(&root, "<workspace>"),
                rb.finished_at_ms - rb.started_at_ms
            );
            for line in rb.output.lines() {
                println!("             {}", line.replace(&root, "<workspace>"));
            }
            let (status, body) = prod::health(self.prod_dir).await;
            println!(
                "           production's health after the rollback: {status} {}",
                body.trim()
            );
        } else {
            println!(
                "           the watch closed after its {WATCH_WINDOW_S} s window: {} ({} probes)",
                watch.last_classification.to_ascii_uppercase(),
                watch.ticks
            );
        }
        self.watch_over = Some(watch);
        Ok(())
    }

    /// Shows the transitions read so far, in order; one caused by an agent waits for that
    /// agent's run line (or [`HOLD_FOR_RUN`]), unless `all`.
    fn release(&mut self, all: bool) {
        while let Some((t, read_at)) = self.held.front() {
            let caused = (!t.finished_agent.is_empty())
                .then(|| (t.finished_agent.clone(), t.from_stage.clone()));
            if let Some(k) = &caused {
                let runs = self.succeeded.get(k).copied().unwrap_or(0);
                let shown = self.caused_shown.get(k).copied().unwrap_or(0);
                if runs <= shown && !all && read_at.elapsed() < HOLD_FOR_RUN {
                    break;
                }
            }
            let Some((t, _)) = self.held.pop_front() else {
                break;
            };
            if let Some(k) = caused {
                *self.caused_shown.entry(k).or_default() += 1;
            }
            // The creation is the `created` line already.
            if !t.from_stage.is_empty() {
                println!("{}", transition_lines(&t));
            }
            self.last_transition = Some(t);
        }
    }

    /// The human gate: `Approve` as [`HUMAN`], said as such.
    async fn approve(&mut self) -> Result<(), DemoError> {
        self.approved = true;
        let r = crate::item::approve_as(self.clients, KEY, HUMAN)
            .await
            .map_err(|e| DemoError::Pipeline(e.to_string()))?;
        println!(
            "  {:>7}  human gate: approved by {HUMAN} (the demo plays the human here)",
            format!("+{}", seconds(now_ms() - self.t0_ms))
        );
        if r.outcome() != AdvanceOutcome::Advanced {
            return Err(DemoError::Pipeline(format!(
                "the approval did not advance {KEY}: {} ({})",
                r.outcome().as_str_name().to_ascii_lowercase(),
                r.reason
            )));
        }
        Ok(())
    }

    /// Whether the timeline is over: `Some` when done and merged, `Err` when it cannot get
    /// there (blocked, a failed job, a failed merge), `None` while it runs.
    fn ended(&mut self, item: &WorkItem, jobs: Vec<Job>) -> Result<Option<Finished>, DemoError> {
        // The run that blocked it and its gate go on screen first (or HOLD_FOR_RUN passes).
        if item.status == "blocked" && self.held.is_empty() {
            let mut why = format!("{KEY} is blocked at stage {}", item.stage);
            if let Some(t) = &self.last_transition {
                let _ = write!(why, ": {}", t.cause);
                for q in t.qg_results.iter().filter(|q| !q.passed) {
                    let _ = write!(why, "\n  failed {}: {}", q.check, q.detail);
                }
            }
            return Err(DemoError::Pipeline(why));
        }
        let shown = |j: &Job| self.shown_runs.contains(&(j.id.clone(), j.attempt));
        if let Some(j) = jobs.iter().find(|j| {
            j.kind() == JobKind::Llm
                && matches!(j.status(), JobStatus::Failed | JobStatus::Cancelled)
                && shown(j)
        }) {
            self.release(true);
            return Err(DemoError::Pipeline(format!(
                "stage {}: the {}'s job {} after {} run(s): {}: {}",
                j.stage,
                j.agent,
                status_name(j),
                j.attempt,
                j.outcome,
                j.reason
            )));
        }
        if item.status != "done" {
            return Ok(None);
        }
        // Done: the deploy-finalizer merges the tested head into main.
        let Some(finalizer) = jobs
            .iter()
            .find(|j| j.agent == DEPLOY_FINALIZER && is_terminal(j) && shown(j))
            .cloned()
        else {
            return Ok(None);
        };
        if finalizer.status() != JobStatus::Succeeded {
            self.release(true);
            return Err(DemoError::Pipeline(format!(
                "{KEY} is done but its merge is not: the {} job {}: {}: {}",
                finalizer.agent,
                status_name(&finalizer),
                finalizer.outcome,
                finalizer.reason
            )));
        }
        // Then the post-deploy watch, to the end of its window (or its rollback).
        if let Some(m) = jobs.iter().find(|j| {
            j.agent == POST_DEPLOY_MONITOR
                && matches!(j.status(), JobStatus::Failed | JobStatus::Cancelled)
        }) {
            return Err(DemoError::Pipeline(format!(
                "the post-deploy watch's {} job {}: {}: {}",
                m.agent,
                status_name(m),
                m.outcome,
                m.reason
            )));
        }
        let Some(watch) = self.watch_over.clone() else {
            return Ok(None);
        };
        self.release(true);
        Ok(Some(Finished {
            item: item.clone(),
            llm_runs: self.llm_runs,
            finalizer,
            watch,
        }))
    }
}

/// A run's tokens and cost as the finish comments show them (usage-ledger's format).
fn usage_text(r: &AgentRun) -> String {
    if !r.result_found {
        return "no result in the agent's output".to_owned();
    }
    usage_ledger::format::run_usage(
        Usage {
            input_tokens: r.input_tokens,
            output_tokens: r.output_tokens,
            cache_read_tokens: r.cache_read_tokens,
            cache_creation_tokens: r.cache_creation_tokens,
        },
        r.total_cost_usd,
    )
}

/// The end: how long it took, the usage summary, the merge on main.
async fn report(
    clients: &Clients,
    git: &Git,
    bare: &Path,
    end: &Finished,
    clock: Instant,
) -> Result<(), DemoError> {
    println!();
    println!(
        "{} is {}: {} agent runs, then the {} {}; {:.1}s in all",
        end.item.key,
        end.item.stage,
        end.llm_runs,
        end.finalizer.agent,
        end.finalizer.outcome,
        clock.elapsed().as_secs_f64()
    );
    let summary = clients
        .usage_ledger
        .clone()
        .work_item_summary(WorkItemSummaryRequest {
            work_item: KEY.to_owned(),
        })
        .await
        .map_err(rpc("WorkItemSummary"))?
        .into_inner();
    println!();
    println!("Usage (usage-ledger WorkItemSummary):");
    // The first line is the tracker comment's title ("Usage for DEMO-1").
    for line in summary
        .text
        .lines()
        .filter(|l| !l.starts_with("Usage for "))
    {
        println!("  {line}");
    }

    let merges = clients
        .merge_gate
        .clone()
        .list_merges(ListMergesRequest {
            repo: REPO.to_owned(),
            limit: 0,
        })
        .await
        .map_err(rpc("ListMerges"))?
        .into_inner()
        .merges;
    let merge: MergeRecord = merges
        .into_iter()
        .find(|m| m.work_item == KEY && !m.merge_sha.is_empty())
        .ok_or_else(|| {
            DemoError::Pipeline(format!("merge-gate has no merge of {KEY} on record"))
        })?;
    println!();
    println!(
        "Merged (merge-gate ListMerges): PR #{} of {REPO}, tested head {}, into main as {}",
        merge.pr_number,
        short(&merge.tested_head_sha),
        short(&merge.merge_sha)
    );
    let main = git
        .rev_parse(bare, "refs/heads/main")
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    if main != merge.merge_sha {
        return Err(DemoError::Pipeline(format!(
            "main is at {} in the forge, not at the merge {}",
            short(&main),
            short(&merge.merge_sha)
        )));
    }
    let log = git
        .ok(bare, &["log", "-1", "--format=%h %s", &merge.merge_sha])
        .await
        .unwrap_or_default();
    let first_parent = format!("{}^1", merge.merge_sha);
    let stat = git
        .ok(bare, &["diff", "--stat", &first_parent, &merge.merge_sha])
        .await
        .unwrap_or_default();
    println!("  main  {}", log.trim());
    for line in stat.lines() {
        println!("  {line}");
    }
    Ok(())
}

/// What to run against the stack that stays up.
fn keep_banner(
    root: &Path,
    addrs: &std::collections::BTreeMap<ServiceName, std::net::SocketAddr>,
    bare: &Path,
) {
    let addr = |s: ServiceName| addrs.get(&s).map(|a| a.to_string()).unwrap_or_default();
    let exe = std::env::current_exe()
        .map(|p| shell_quote(&p.display().to_string()))
        .unwrap_or_else(|_| "orchestrator".to_owned());
    println!();
    println!(
        "The stack stays up until Ctrl-C or SIGTERM; its data is in {}",
        root.display()
    );
    for (part, a) in addrs {
        println!("  {:<13} listening on {a}", part.as_str());
    }
    let se = addr(ServiceName::StageEngine);
    let ul = addr(ServiceName::UsageLedger);
    let body = format!("'{{\"work_item\":\"{KEY}\"}}'");
    println!(
        "The dashboard: http://{}/ (loopback only, no sign-in)",
        addr(ServiceName::Gateway)
    );
    println!("Try:");
    println!("  curl -s http://{}/queue", addr(ServiceName::Gateway));
    println!("  grpcurl -plaintext {se} list");
    println!(
        "  grpcurl -plaintext -d {body} {se} orchestrator.stage_engine.v1.StageEngine/ListTransitions"
    );
    println!(
        "  grpcurl -plaintext -d {body} {} orchestrator.launcher.v1.Launcher/ListJobs",
        addr(ServiceName::Launcher)
    );
    println!(
        "  grpcurl -plaintext -d {body} {ul} orchestrator.usage_ledger.v1.UsageLedger/WorkItemSummary"
    );
    println!(
        "  ORCH_STAGE_ENGINE_URL=http://{se} ORCH_USAGE_LEDGER_URL=http://{ul} {exe} item show {KEY}"
    );
    println!(
        "  git -C {} log --oneline --graph main",
        shell_quote(&bare.display().to_string())
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_proto::stage_engine::v1::QgResult;

    fn job(stage: &str, agent: &str, status: JobStatus, attempt: u32, outcome: &str) -> Job {
        Job {
            id: format!("{agent}-{stage}"),
            stage: stage.into(),
            agent: agent.into(),
            status: status as i32,
            attempt,
            outcome: outcome.into(),
            ..Default::default()
        }
    }

    #[test]
    fn an_attempt_has_ended_when_it_is_terminal_or_waits_for_a_retry() {
        use JobStatus::*;
        for (status, attempt, outcome, ended) in [
            (Queued, 0, "", false),
            (Running, 1, "", false),
            (Queued, 1, "transient", true),
            (Succeeded, 1, "succeeded", true),
            (Failed, 3, "permanent", true),
            (Cancelled, 0, "cancelled", false),
            (Cancelled, 1, "cancelled", true),
        ] {
            let j = job("review", "reviewer", status, attempt, outcome);
            assert_eq!(attempt_ended(&j), ended, "{status:?} {attempt} {outcome}");
        }
    }

    #[test]
    fn a_run_line_has_time_stage_agent_duration_and_usage() {
        let j = job("development", "developer", JobStatus::Succeeded, 1, "");
        assert_eq!(
            run_line(
                1_000,
                3_450,
                &j,
                420,
                "1.0k in (500 cached) / 20 out · $0.01"
            ),
            "    +2.5s  development     developer           0.4s  1.0k in (500 cached) / 20 out · $0.01"
        );
    }

    #[test]
    fn a_transition_shows_its_failed_checks() {
        let t = Transition {
            from_stage: "review".into(),
            to_stage: "development".into(),
            cause: "reviewer asked for changes".into(),
            finished_agent: "reviewer".into(),
            qg_results: vec![
                QgResult {
                    check: "check_review_verdict".into(),
                    passed: false,
                    detail: "review_verdict is CHANGES_REQUESTED".into(),
                },
                QgResult {
                    check: "other".into(),
                    passed: true,
                    detail: String::new(),
                },
            ],
            ..Default::default()
        };
        assert_eq!(
            transition_lines(&t),
            "           review -> development: reviewer asked for changes\n             failed check_review_verdict: review_verdict is CHANGES_REQUESTED"
        );
    }

    #[test]
    fn rejects_must_be_verdict_stages() {
        assert_eq!(
            rejected_stages(&["Review".into(), " testing".into(), "review".into()])
                .expect("verdict stages"),
            ["review", "testing"]
        );
        let e = rejected_stages(&["analysis".into()]).expect_err("no verdict");
        assert!(e.to_string().contains("'analysis'"), "{e}");
    }

    #[test]
    fn the_stack_has_its_own_settings_and_listens_on_port_0() {
        let dir = Path::new("/tmp/d");
        let env = demo_env(
            &dir.join("var"),
            &dir.join("agents"),
            &Agent::Scripted,
            &["review".to_owned()],
            0,
        )
        .expect("env");
        let config = Config::from_env(env.clone()).expect("config");
        for part in ServiceName::ALL {
            assert_eq!(config.listen[&part].port(), 0, "{part}");
        }
        assert!(config.database_url.is_none());
        assert!(config.internal_token.is_none());
        assert_eq!(env.get("ORCH_MAX_ROLLBACKS"), Some("0"));
        assert_eq!(
            split_command(env.get("ORCH_AGENT_COMMAND").expect("command")).expect("words"),
            [
                "env",
                "ORCH_SCRIPTED_REJECT=review",
                "python3",
                "/tmp/d/agents/scripted-agent.py"
            ]
        );
        // Every value parses the way the services read it.
        launcher::LauncherConfig::from_env(&env).expect("launcher config");
    }

    #[test]
    fn every_role_has_its_prompt_and_the_finalizer_is_named_right() {
        assert_eq!(DEPLOY_FINALIZER, "deploy-finalizer");
        for stage in stage_engine::pipeline::Stage::ALL {
            let Some(role) = stage_engine::pipeline::get_agent_for_stage(stage) else {
                continue;
            };
            let file = format!("{role}.md");
            assert!(
                AGENT_FILES
                    .iter()
                    .any(|(name, text)| *name == file && !text.trim().is_empty()),
                "{file}"
            );
        }
    }
}
