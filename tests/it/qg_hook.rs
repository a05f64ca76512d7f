//! The quality gate as the agent's Stop hook, end to end THROUGH THE LAUNCHER: the whole
//! stack in-process, the REAL Claude Code CLI as `ORCH_AGENT_COMMAND` (the launcher's own
//! flags: the prompt on stdin, `--settings` with `orchestrator qg-hook`), pointed at the
//! scripted model server, a real bare repository as the forge.
//!
//! - A model that forgets its artifact in its first run: with the hook, the hook blocks with
//!   the missing item, the model writes it, and the stage passes in ONE launch; with
//!   `ORCH_QG_HOOK_ENABLED=false` the gate fails after the run and the stage is retried: TWO
//!   launches, and more tokens (the numbers are printed: `--nocapture`).
//! - A model that never writes: blocked exactly `ORCH_QG_HOOK_MAX_BLOCKS` times, then the run
//!   ends and the gate fails the stage as before.
//!
//! Reports `SKIPPED <name>: <why>` where the CLI is not installed (`scripts/install-claude-cli`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrator_forge::RepoName;
use orchestrator_forge::local::LocalForge;
use orchestrator_model_server::{
    ModelServer, RESUMED_HEADING, Scenario, claude_cli_or_skip, cli_env,
};
use orchestrator_proto::launcher::v1::{GetJobRequest, Job, JobStatus, ListJobsRequest};
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, GetWorkItemRequest, ListCommentsRequest, ListTransitionsRequest,
    Transition,
};
use orchestrator_proto::usage_ledger::v1::{AgentUsage, WorkItemSummaryRequest};
use orchestrator_testkit::TestStorage;

use crate::common::{Stack, start};

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");
const KEY: &str = "DEMO-10";
const REPO: &str = "acme/app";

/// What one work item's analysis cost, read back from the services.
#[derive(Debug)]
struct Pass {
    /// The analyst's jobs, oldest first.
    jobs: Vec<Job>,
    /// Agent runs: every claim of every job (`attempt`), which is what a launch is.
    launches: u32,
    /// usage-ledger's total over the work item.
    usage: AgentUsage,
    transitions: Vec<Transition>,
    /// The analyst's finish comments.
    finish_comments: Vec<String>,
    /// What the model was told by the Stop hook.
    feedback: Vec<String>,
    /// Runs (CLI sessions) the model server saw for the stage.
    model_runs: usize,
    /// The text of every agent turn the model was asked for, in order.
    received: Vec<String>,
    /// Each job's log (its last attempt), read before the stack's directory goes.
    logs: Vec<String>,
    status: String,
}

impl Pass {
    fn tokens(&self) -> i64 {
        let u = &self.usage;
        u.input_tokens + u.output_tokens + u.cache_read_tokens + u.cache_creation_tokens
    }

    fn blocks(&self) -> Vec<u32> {
        self.jobs.iter().map(|j| j.qg_hook_blocks).collect()
    }

    fn line(&self, label: &str) -> String {
        format!(
            "{label:<16} launches {}  jobs {}  QG hook blocks {:?}  tokens {} (in {}, out {}, cache read {}, cache write {})  cost ${:.4}",
            self.launches,
            self.jobs.len(),
            self.blocks(),
            self.tokens(),
            self.usage.input_tokens,
            self.usage.output_tokens,
            self.usage.cache_read_tokens,
            self.usage.cache_creation_tokens,
            self.usage.total_cost_usd
        )
    }
}

/// Creates the work item on a fresh stack whose launcher runs the real CLI `cli` against
/// a model server playing `scenario`, and waits until the item is `until`.
async fn analysis_through_the_launcher(
    storage: TestStorage,
    cli: &Path,
    scenario: Scenario,
    extra: &[(&str, &str)],
    until: &str,
) -> Pass {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    let forge_dir = root.join("forge");
    LocalForge::new(forge_dir.clone(), "main".into())
        .init_repo(&RepoName::parse(REPO).expect("repo"))
        .await
        .expect("bare repo");
    let home = root.join("home");
    std::fs::create_dir_all(&home).expect("home");
    let server = ModelServer::start().await.expect("model server");
    server.control.set_scenario(scenario);
    let s = |p: &Path| p.display().to_string();
    let agents = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/agents");
    // The default agent command with the installed CLI's path; the launcher adds the rest.
    let command = format!(
        "{} -p --output-format json --permission-mode acceptEdits",
        cli.display()
    );
    let hook = format!("{BIN} qg-hook");
    let (agents, work, forge, home) = (s(&agents), s(&root.join("work")), s(&forge_dir), s(&home));
    // What the CLI needs to reach the scripted model and nothing else: ANTHROPIC_* and
    // CLAUDE_* reach the agent by prefix, the rest by ORCH_AGENT_ENV_PASSTHROUGH; a
    // throwaway HOME for its ~/.claude.
    let cli_vars = cli_env(&server.base_url());
    let passthrough: Vec<&str> = cli_vars
        .iter()
        .map(|(k, _)| *k)
        .filter(|k| !k.starts_with("ANTHROPIC_") && !k.starts_with("CLAUDE_"))
        .collect();
    let passthrough = passthrough.join(",");
    let mut vars: Vec<(&str, &str)> = vec![
        ("ORCH_AGENT_COMMAND", &command),
        ("ORCH_AGENTS_DIR", &agents),
        ("ORCH_WORKDIR", &work),
        ("ORCH_FORGE", "local"),
        ("ORCH_FORGE_LOCAL_DIR", &forge),
        ("ORCH_QG_HOOK_COMMAND", &hook),
        ("ORCH_AGENT_ENV_PASSTHROUGH", &passthrough),
        ("ORCH_AGENT_TIMEOUT_SECONDS", "180"),
        ("ORCH_BACKOFF_BASE_S", "1"),
        ("ORCH_OUTBOX_POLL_MS", "50"),
        ("ORCH_LAUNCHER_POLL_MS", "100"),
        ("HOME", &home),
    ];
    vars.extend(cli_vars.iter().map(|(k, v)| (*k, v.as_str())));
    vars.extend_from_slice(extra);
    let stack = start(storage, &vars).await;
    let c = &stack.clients;
    c.stage_engine
        .clone()
        .create_work_item(CreateWorkItemRequest {
            tracker_issue_id: KEY.into(),
            key: KEY.into(),
            title: "Document the cache settings".into(),
            repo: REPO.into(),
            ..Default::default()
        })
        .await
        .expect("create");
    let deadline = Instant::now() + Duration::from_secs(300);
    let status = loop {
        let item = c
            .stage_engine
            .clone()
            .get_work_item(GetWorkItemRequest { key: KEY.into() })
            .await
            .expect("get")
            .into_inner();
        if item.status == until {
            break item.status;
        }
        assert!(
            Instant::now() < deadline,
            "the item never became {until}: {item:?}\njobs: {:#?}",
            jobs(&stack).await
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let jobs = wait_for_ended_jobs(&stack).await;
    let launches = jobs.iter().map(|j| j.attempt).sum();
    let logs = jobs
        .iter()
        .map(|j| std::fs::read_to_string(&j.log_path).unwrap_or_default())
        .collect();
    let summary = c
        .usage_ledger
        .clone()
        .work_item_summary(WorkItemSummaryRequest {
            work_item: KEY.into(),
        })
        .await
        .expect("summary")
        .into_inner();
    let usage = summary.total.expect("a total");
    let transitions = c
        .stage_engine
        .clone()
        .list_transitions(ListTransitionsRequest {
            work_item: KEY.into(),
        })
        .await
        .expect("transitions")
        .into_inner()
        .transitions;
    let finish_comments = c
        .stage_engine
        .clone()
        .list_comments(ListCommentsRequest {
            work_item: KEY.into(),
        })
        .await
        .expect("comments")
        .into_inner()
        .comments
        .into_iter()
        .filter(|c| c.author == "analyst" && c.html.contains("Analyst done"))
        .map(|c| c.html)
        .collect();
    Pass {
        jobs,
        launches,
        usage,
        transitions,
        finish_comments,
        feedback: server.control.stop_hook_feedback(),
        model_runs: server.control.runs(KEY, "analysis"),
        logs,
        received: server
            .control
            .received(KEY, "analysis")
            .into_iter()
            .map(|r| r.text)
            .collect(),
        status,
    }
}

async fn jobs(stack: &Stack) -> Vec<Job> {
    let mut jobs = stack
        .clients
        .launcher
        .clone()
        .list_jobs(ListJobsRequest {
            work_item: KEY.into(),
            ..Default::default()
        })
        .await
        .expect("jobs")
        .into_inner()
        .jobs;
    jobs.sort_by_key(|j| j.enqueued_at_ms);
    jobs
}

/// The work item's jobs once every one has ended (GetJob: with `qg_hook_blocks`); the
/// item's status changes inside the last job's finalize, a moment before the job ends.
async fn wait_for_ended_jobs(stack: &Stack) -> Vec<Job> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let listed = jobs(stack).await;
        let mut out = Vec::new();
        for j in &listed {
            let job = stack
                .clients
                .launcher
                .clone()
                .get_job(GetJobRequest {
                    job_id: j.id.clone(),
                })
                .await
                .expect("job")
                .into_inner();
            out.push(job);
        }
        let ended =
            |j: &Job| j.status != JobStatus::Queued as i32 && j.status != JobStatus::Running as i32;
        if out.iter().all(ended) {
            return out;
        }
        assert!(Instant::now() < deadline, "jobs still running: {out:#?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// With the hook, the lazy first run is kept working and the stage passes in one launch;
/// without it, the gate fails after the run and a second launch writes the artifact.
async fn the_qg_hook_saves_a_launch(backend: &str) {
    let name = format!("qg_hook::{backend}::the_qg_hook_saves_a_launch");
    let Some(cli) = claude_cli_or_skip(&name) else {
        return;
    };
    let (Some(a), Some(b)) = (storage(backend, &name).await, storage(backend, &name).await) else {
        return;
    };
    let (hooked, unhooked) = tokio::join!(
        analysis_through_the_launcher(
            a,
            &cli,
            Scenario::LazyFirstRun,
            &[("ORCH_QG_HOOK_ENABLED", "true")],
            "awaiting_approval"
        ),
        analysis_through_the_launcher(
            b,
            &cli,
            Scenario::LazyFirstRun,
            // The retry starts cold here; resuming it is the next test.
            &[
                ("ORCH_QG_HOOK_ENABLED", "false"),
                ("ORCH_RESUME_MAX_AGE_S", "0")
            ],
            "awaiting_approval"
        ),
    );
    eprintln!(
        "QG hook, scripted lazy model (LazyFirstRun), analysis of {KEY} on {backend}:\n  {}\n  {}",
        hooked.line("with the hook"),
        unhooked.line("without the hook")
    );
    // With the hook: one job, one launch, blocked once with the missing item.
    assert_eq!(
        (hooked.jobs.len(), hooked.launches, hooked.model_runs),
        (1, 1, 1),
        "{hooked:#?}"
    );
    assert_eq!(hooked.blocks(), vec![1], "{hooked:#?}");
    assert_eq!(hooked.feedback.len(), 1, "{hooked:#?}");
    let fb = &hooked.feedback[0];
    assert!(
        fb.contains("QUALITY GATE of stage analysis for DEMO-10")
            && fb.contains("check_analysis: docs/work-items/DEMO-10/analysis.md is missing"),
        "{fb}"
    );
    assert_eq!(hooked.usage.runs, 1, "{hooked:#?}");
    assert!(
        hooked
            .finish_comments
            .iter()
            .any(|h| h.contains("QG hook blocked 1×")),
        "{:?}",
        hooked.finish_comments
    );
    let passed = |p: &Pass| {
        p.transitions
            .iter()
            .filter(|t| t.qg_results.iter().any(|r| r.check == "check_analysis"))
            .map(|t| {
                t.qg_results
                    .iter()
                    .find(|r| r.check == "check_analysis")
                    .is_some_and(|r| r.passed)
            })
            .collect::<Vec<bool>>()
    };
    assert_eq!(passed(&hooked), vec![true], "{:#?}", hooked.transitions);
    // Without it: the gate failed the first run, the stage was retried, the retry wrote.
    assert_eq!(
        (unhooked.jobs.len(), unhooked.launches, unhooked.model_runs),
        (2, 2, 2),
        "{unhooked:#?}"
    );
    assert_eq!(unhooked.blocks(), vec![0, 0], "{unhooked:#?}");
    assert!(unhooked.feedback.is_empty(), "{unhooked:#?}");
    assert_eq!(unhooked.usage.runs, 2, "{unhooked:#?}");
    assert_eq!(
        passed(&unhooked),
        vec![false, true],
        "{:#?}",
        unhooked.transitions
    );
    for p in [&hooked, &unhooked] {
        assert!(
            p.jobs
                .iter()
                .all(|j| j.status == JobStatus::Succeeded as i32),
            "{p:#?}"
        );
        assert_eq!(p.status, "awaiting_approval");
    }
    assert!(
        hooked.tokens() < unhooked.tokens(),
        "the hook saved no tokens: {} vs {}",
        hooked.tokens(),
        unhooked.tokens()
    );
}

/// The same lazy run without the hook, its retry resumed (#15): the gate fails the first
/// run, stage-engine sends the analyst back with `resume`, and the launcher resumes the
/// first run's CLI session (`--resume`, its transcript carried to the new checkout) with
/// only what the gate lacks. Shown on what the MODEL received: the retry's first request
/// holds the first run's own turn (the conversation went on) and "The quality gate still
/// lacks"; the cold retry's holds neither. Launches and tokens of both are printed.
async fn a_retry_resumes_the_session_instead_of_starting_cold(backend: &str) {
    let name = format!("qg_hook::{backend}::a_retry_resumes_the_session_instead_of_starting_cold");
    let Some(cli) = claude_cli_or_skip(&name) else {
        return;
    };
    let (Some(a), Some(b)) = (storage(backend, &name).await, storage(backend, &name).await) else {
        return;
    };
    let (resumed, cold) = tokio::join!(
        analysis_through_the_launcher(
            a,
            &cli,
            Scenario::LazyFirstRun,
            &[("ORCH_QG_HOOK_ENABLED", "false")],
            "awaiting_approval"
        ),
        analysis_through_the_launcher(
            b,
            &cli,
            Scenario::LazyFirstRun,
            &[
                ("ORCH_QG_HOOK_ENABLED", "false"),
                ("ORCH_RESUME_MAX_AGE_S", "0")
            ],
            "awaiting_approval"
        ),
    );
    eprintln!(
        "Retry after a failed gate, scripted lazy model (LazyFirstRun), analysis of {KEY} on {backend}:\n  {}\n  {}",
        resumed.line("resumed retry"),
        cold.line("cold retry")
    );
    for p in [&resumed, &cold] {
        assert_eq!((p.jobs.len(), p.launches), (2, 2), "{p:#?}");
        assert!(
            p.jobs
                .iter()
                .all(|j| j.status == JobStatus::Succeeded as i32),
            "{p:#?}"
        );
        assert_eq!(p.status, "awaiting_approval");
        assert_eq!(p.usage.runs, 2, "{p:#?}");
    }
    let log = |p: &Pass| p.logs[1].clone();
    assert!(
        log(&resumed).contains("== resuming CLI session "),
        "{}",
        log(&resumed)
    );
    assert!(
        log(&cold).contains("starting cold, not resuming job")
            && log(&cold).contains("ORCH_RESUME_MAX_AGE_S=0"),
        "{}",
        log(&cold)
    );
    let lazy_turn = format!("analysis of {KEY} looks done to me");
    let told = |p: &Pass| {
        p.received
            .iter()
            .find(|t| {
                t.contains(&format!("\n{RESUMED_HEADING}\n")) || t.starts_with(RESUMED_HEADING)
            })
            .cloned()
    };
    let retry_first = told(&resumed).expect("the resumed run was told what the gate lacks");
    assert!(
        retry_first.contains(&lazy_turn),
        "the resumed conversation lacks the first run's turn:\n{retry_first}"
    );
    assert!(
        retry_first.contains("check_analysis: docs/work-items/DEMO-10/analysis.md is missing"),
        "{retry_first}"
    );
    assert!(told(&cold).is_none(), "the cold retry was resumed");
    // The cold retry's first request: the whole task again, none of the first run's turns.
    let cold_first = cold
        .received
        .iter()
        .rev()
        .find(|t| !t.contains(&lazy_turn))
        .expect("the cold retry's requests");
    assert!(cold_first.contains("# Your task"), "{cold_first}");
}

/// A model that never writes: blocked exactly ORCH_QG_HOOK_MAX_BLOCKS times in its run,
/// then the run ends and the gate fails the stage (here blocked at once: no stage retry).
async fn a_model_that_never_writes_is_blocked_max_blocks_times(backend: &str) {
    let name = format!("qg_hook::{backend}::a_model_that_never_writes_is_blocked_max_blocks_times");
    let Some(cli) = claude_cli_or_skip(&name) else {
        return;
    };
    let Some(storage) = storage(backend, &name).await else {
        return;
    };
    let p = analysis_through_the_launcher(
        storage,
        &cli,
        Scenario::NeverWrites,
        &[
            ("ORCH_QG_HOOK_MAX_BLOCKS", "2"),
            ("ORCH_MAX_STAGE_RETRIES", "0"),
        ],
        "blocked",
    )
    .await;
    eprintln!("{}", p.line("never writes"));
    assert_eq!((p.jobs.len(), p.launches), (1, 1), "{p:#?}");
    assert_eq!(p.blocks(), vec![2], "{p:#?}");
    // The CLI feeds every block back; the two messages are the same text.
    assert_eq!(p.feedback.len(), 1, "{p:#?}");
    assert!(
        p.feedback[0].contains("analysis.md is missing"),
        "{:?}",
        p.feedback
    );
    assert_eq!(p.jobs[0].status, JobStatus::Succeeded as i32, "{p:#?}");
    assert!(
        p.finish_comments
            .iter()
            .any(|h| h.contains("QG hook blocked 2×")),
        "{:?}",
        p.finish_comments
    );
    let failed: Vec<&str> = p
        .transitions
        .iter()
        .flat_map(|t| &t.qg_results)
        .filter(|r| !r.passed)
        .map(|r| r.detail.as_str())
        .collect();
    assert!(
        failed
            .iter()
            .any(|d| d.contains("docs/work-items/DEMO-10/analysis.md is missing")),
        "{:#?}",
        p.transitions
    );
}

async fn storage(backend: &str, name: &str) -> Option<TestStorage> {
    match backend {
        "sqlite" => Some(TestStorage::sqlite()),
        _ => TestStorage::postgres(name).await,
    }
}

mod sqlite {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_qg_hook_saves_a_launch() {
        super::the_qg_hook_saves_a_launch("sqlite").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_that_never_writes_is_blocked_max_blocks_times() {
        super::a_model_that_never_writes_is_blocked_max_blocks_times("sqlite").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_resumes_the_session_instead_of_starting_cold() {
        super::a_retry_resumes_the_session_instead_of_starting_cold("sqlite").await;
    }
}

mod postgres {
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_qg_hook_saves_a_launch() {
        super::the_qg_hook_saves_a_launch("postgres").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_model_that_never_writes_is_blocked_max_blocks_times() {
        super::a_model_that_never_writes_is_blocked_max_blocks_times("postgres").await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_retry_resumes_the_session_instead_of_starting_cold() {
        super::a_retry_resumes_the_session_instead_of_starting_cold("postgres").await;
    }
}
