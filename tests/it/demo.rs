//! `orchestrator demo` as a newcomer runs it: the built binary as a process, with nothing
//! configured (and with a hostile `./.env` and `ORCH_*` environment that it must ignore).
//! It must walk its work item through every stage of the pipeline's registry, in order,
//! to `done` and a merge on main, print the usage summary, and exit 0; a blocked item exits
//! 1 naming the stage and the failed gate check.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator_model_server::claude_cli_or_skip;
use stage_engine::pipeline::{Stage, get_agent_for_stage};

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");
/// A guard against a hung demo, far above what it takes (seconds) even on a loaded machine.
const LIMIT: Duration = Duration::from_secs(300);

/// The demo with `args`, its temp dir under `tmp`, run from `cwd`, with no ORCH_LOG.
fn demo(cwd: &Path, tmp: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.arg("demo")
        .args(args)
        .current_dir(cwd)
        .env("TMPDIR", tmp)
        .env_remove("ORCH_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

fn reader(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        if let Some(mut p) = pipe {
            let _ = p.read_to_string(&mut s);
        }
        s
    })
}

/// Runs to the end (killed after [`LIMIT`]): (exit code, stdout, stderr).
fn run(cmd: &mut Command) -> (i32, String, String) {
    let mut child = cmd.spawn().expect("the demo starts");
    let out = reader(child.stdout.take());
    let err = reader(child.stderr.take());
    let code = wait(&mut child, LIMIT);
    (
        code,
        out.join().expect("stdout"),
        err.join().expect("stderr"),
    )
}

fn wait(child: &mut Child, limit: Duration) -> i32 {
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status.code().unwrap_or(-1);
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            panic!("the demo did not end within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The timeline's events in order: `stage agent` for a run, `human gate` for the approval
/// (the post-deploy watch's probes are [`probes`]).
fn events(stdout: &str) -> Vec<String> {
    stdout
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let time = w.first()?;
            if !(time.starts_with('+') && time.ends_with('s') && w.len() >= 3)
                || w[2] == "post-deploy"
            {
                return None;
            }
            Some(if w[1] == "human" {
                "human gate".to_owned()
            } else {
                format!("{} {}", w[1], w[2])
            })
        })
        .collect()
}

/// The post-deploy watch's probes in order, after the merge: (health status, classification,
/// action), e.g. `("200", "healthy", "CONTINUE")`.
fn probes(stdout: &str) -> Vec<(String, String, String)> {
    let timeline = stdout.split("\nDEMO-1 is done").next().unwrap_or_default();
    let after_merge = timeline
        .split(" deploy-finalizer ")
        .nth(1)
        .unwrap_or_else(|| panic!("no merge before the watch: {stdout}"));
    after_merge
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            // +5.1s done post-deploy #2 GET /health 500 in 1 ms · degraded · ROLLBACK
            (w.len() == 14 && w[2] == "post-deploy" && w[4] == "GET")
                .then(|| (w[6].to_owned(), w[11].to_owned(), w[13].to_owned()))
        })
        .collect()
}

/// Every stage of the registry with its agent, the human gate after the first (analysis),
/// then the deploy-finalizer's merge; `rollbacks` inserted where a stage is rejected once.
fn expected(reject: Option<Stage>) -> Vec<String> {
    let mut out = Vec::new();
    for stage in Stage::ALL {
        let Some(agent) = get_agent_for_stage(stage) else {
            continue;
        };
        out.push(format!("{} {agent}", stage.as_str()));
        if stage == Stage::Analysis {
            out.push("human gate".to_owned());
        }
        if Some(stage) == reject {
            // Rolled back to development, which runs again, then the rejected stage passes.
            let mut again = vec![format!("development {}", dev_agent())];
            for s in Stage::ALL
                .iter()
                .skip_while(|s| **s != Stage::Development)
                .skip(1)
                .take_while(|s| **s != stage)
            {
                again.push(format!(
                    "{} {}",
                    s.as_str(),
                    get_agent_for_stage(*s).expect("agent")
                ));
            }
            again.push(format!("{} {agent}", stage.as_str()));
            out.extend(again);
        }
    }
    out.push("deploy deploy-finalizer".to_owned());
    out
}

fn dev_agent() -> &'static str {
    get_agent_for_stage(Stage::Development).expect("the developer")
}

/// What a finished demo prints after its timeline.
fn assert_done_and_summarised(stdout: &str, runs: usize) {
    assert!(
        stdout.contains("human gate: approved by demo-human (the demo plays the human here)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("deploy -> done: deployer finished"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("DEMO-1 is done: {runs} agent runs")),
        "{stdout}"
    );
    let summary = stdout
        .split("Usage (usage-ledger WorkItemSummary):\n")
        .nth(1)
        .unwrap_or_else(|| panic!("no usage summary: {stdout}"));
    for role in [
        "Analyst",
        "Architect",
        "Developer",
        "Reviewer",
        "Tester",
        "Deployer",
    ] {
        assert!(
            summary.contains(&format!("  {role} · ")),
            "{role}: {stdout}"
        );
    }
    assert!(
        summary.contains(&format!("  Total · {runs} runs · ")),
        "{stdout}"
    );
    assert!(
        stdout.contains("Merged (merge-gate ListMerges): PR #1 of acme/greeter"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Merge pull request #1 from orch/DEMO-1 into main"),
        "{stdout}"
    );
    // Staging and production were deployed for real, by the target's commands, and the
    // timeline shows each command, its exit and the shas the orchestrator filled in.
    assert!(
        stdout.contains("staging_command sh <workspace>/deploy.sh staging ")
            && stdout.contains("deploy_command sh <workspace>/deploy.sh prod "),
        "{stdout}"
    );
    assert!(
        stdout.contains("; deploy_status SUCCESS, deployed_sha "),
        "{stdout}"
    );
    assert!(stdout.contains(", previous_sha "), "{stdout}");
    for place in [
        "Staging (<workspace>/staging",
        "Production (<workspace>/prod",
    ] {
        let sha = stdout
            .lines()
            .find_map(|l| l.strip_prefix(place))
            .and_then(|l| l.strip_prefix(", by its deploy command): "))
            .unwrap_or_else(|| panic!("{place}: {stdout}"));
        assert!(
            sha.len() == 40 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
            "{place}: {sha}"
        );
    }
    // The merge brought the developer's real code change and every stage's artifact.
    for file in [
        "scripted/demo_1.py",
        "docs/work-items/DEMO-1/analysis.md",
        "docs/work-items/DEMO-1/deploy.md",
    ] {
        assert!(stdout.contains(file), "{file}: {stdout}");
    }
}

/// The post-deploy watch probed production's real endpoint, healthy, until its window
/// closed; production still runs what was deployed.
fn assert_watched_healthy(stdout: &str) {
    let probes = probes(stdout);
    assert!(!probes.is_empty(), "{stdout}");
    for (i, (status, class, action)) in probes.iter().enumerate() {
        let last = i + 1 == probes.len();
        assert_eq!(
            (status.as_str(), class.as_str(), action.as_str()),
            ("200", "healthy", if last { "CLOSE" } else { "CONTINUE" }),
            "{stdout}"
        );
    }
    assert!(
        stdout.contains("the watch closed after its 5 s window: HEALTHY"),
        "{stdout}"
    );
    assert!(
        stdout.contains("Production's health now: 200 ok: "),
        "{stdout}"
    );
}

/// The sha a line `<prefix><sha>` names.
fn sha_after<'a>(stdout: &'a str, prefix: &str) -> &'a str {
    stdout
        .lines()
        .find_map(|l| l.strip_prefix(prefix))
        .map(str::trim)
        .unwrap_or_else(|| panic!("no '{prefix}': {stdout}"))
}

fn leftovers(tmp: &Path) -> Vec<String> {
    std::fs::read_dir(tmp)
        .expect("tmp")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("orchestrator-demo-"))
        .collect()
}

#[test]
fn the_demo_walks_every_stage_to_done_with_nothing_configured() {
    let cwd = tempfile::tempdir().expect("cwd");
    let tmp = tempfile::tempdir().expect("tmp");
    // What `up` would read: the demo must ignore all of it.
    std::fs::write(
        cwd.path().join(".env"),
        "ORCH_DATA_DIR=/nonexistent/orchestrator\nORCH_AGENT_COMMAND=false\n",
    )
    .expect(".env");
    let (code, stdout, stderr) = run(demo(cwd.path(), tmp.path(), &[])
        .env("ORCH_LAUNCHER_ADDR", "not-an-address")
        .env("ORCH_DATABASE_URL", "postgres://u:p@127.0.0.1:1/nowhere")
        .env("ORCH_INTERNAL_TOKEN", "a-token-the-demo-does-not-use")
        .env("ORCH_TRACKER", "plane"));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(events(&stdout), expected(None), "{stdout}");
    assert_done_and_summarised(&stdout, 7);
    assert_watched_healthy(&stdout);
    // The services stay quiet without --verbose or ORCH_LOG.
    assert_eq!(stderr, "", "{stderr}");
    assert_eq!(
        leftovers(tmp.path()),
        Vec::<String>::new(),
        "the temp dir is removed"
    );
    assert!(
        !cwd.path().join("var").exists(),
        "nothing written where it was run"
    );
}

#[test]
fn a_blocked_work_item_exits_one_naming_the_stage_and_the_failed_check() {
    let cwd = tempfile::tempdir().expect("cwd");
    let tmp = tempfile::tempdir().expect("tmp");
    let (code, stdout, stderr) = run(&mut demo(
        cwd.path(),
        tmp.path(),
        &["--reject", "review", "--max-rollbacks", "0"],
    ));
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let ev = events(&stdout);
    assert_eq!(
        ev.last().map(String::as_str),
        Some("review reviewer"),
        "{stdout}"
    );
    assert!(
        stderr.starts_with("error: DEMO-1 is blocked at stage review: "),
        "{stderr}"
    );
    assert!(
        stderr.contains("\n  failed check_review_verdict: ")
            && stderr.contains("CHANGES_REQUESTED"),
        "{stderr}"
    );
    assert!(!stdout.contains("DEMO-1 is done"), "{stdout}");
    assert_eq!(
        leftovers(tmp.path()),
        Vec::<String>::new(),
        "the temp dir is removed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keep_leaves_the_stack_up_for_get_queue_until_sigterm() {
    use std::io::{BufRead, BufReader};

    let cwd = tempfile::tempdir().expect("cwd");
    let tmp = tempfile::tempdir().expect("tmp");
    let mut child = demo(cwd.path(), tmp.path(), &["--keep"])
        .spawn()
        .expect("the demo starts");
    let err = reader(child.stderr.take());
    let stdout = child.stdout.take().expect("stdout");
    // Read until the banner's last line, in a thread: the demo keeps running after it.
    let head = std::thread::spawn(move || {
        let mut lines = BufReader::new(stdout).lines();
        let mut head = String::new();
        for line in lines.by_ref() {
            let line = line.expect("line");
            head.push_str(&line);
            head.push('\n');
            if line.trim_start().starts_with("git -C ") {
                break;
            }
        }
        let rest = std::thread::spawn(move || {
            lines
                .map(|l| l.unwrap_or_default() + "\n")
                .collect::<String>()
        });
        (head, rest)
    });
    let start = Instant::now();
    while !head.is_finished() {
        if start.elapsed() > LIMIT || child.try_wait().expect("try_wait").is_some() {
            let _ = child.kill();
            panic!("no --keep banner: {}", err.join().expect("stderr"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (head, rest) = head.join().expect("head");
    assert!(head.contains("DEMO-1 is done: 7 agent runs"), "{head}");
    let gateway = head
        .lines()
        .find_map(|l| l.trim().strip_prefix("curl -s http://"))
        .and_then(|u| u.strip_suffix("/queue"))
        .unwrap_or_else(|| panic!("no GET /queue command: {head}"))
        .to_owned();
    let queue: serde_json::Value = reqwest::get(format!("http://{gateway}/queue"))
        .await
        .expect("GET /queue")
        .json()
        .await
        .expect("json");
    // 7 agent runs, the deploy-finalizer and the post-deploy watch's monitor.
    assert_eq!(queue["launcher"]["counts"]["SUCCEEDED"], 9, "{queue}");
    assert!(head.contains("orchestrator.usage_ledger.v1.UsageLedger/WorkItemSummary"));
    // The dashboard's address is printed, and it answers there (loopback, no sign-in).
    assert!(
        head.contains(&format!("The dashboard: http://{gateway}/")),
        "{head}"
    );
    let board = reqwest::get(format!("http://{gateway}/"))
        .await
        .expect("GET /");
    assert_eq!(board.status(), 200);
    let board = board.text().await.expect("board html");
    assert!(board.contains("data-key=\"DEMO-1\""), "{board}");

    // SAFETY: a signal to our own child.
    #[allow(unsafe_code)]
    let sent = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let code = wait(&mut child, Duration::from_secs(30));
    let rest = rest.join().expect("rest");
    assert_eq!(code, 0, "{rest}{}", err.join().expect("stderr"));
    assert!(rest.contains("the workspace stays at"), "{rest}");
    assert_eq!(leftovers(tmp.path()).len(), 1, "--keep keeps the temp dir");
}

#[test]
fn the_demo_runs_the_real_claude_cli_through_a_rollback() {
    let Some(cli) =
        claude_cli_or_skip("demo::the_demo_runs_the_real_claude_cli_through_a_rollback")
    else {
        return;
    };
    let cwd = tempfile::tempdir().expect("cwd");
    let tmp = tempfile::tempdir().expect("tmp");
    let (code, stdout, stderr) = run(demo(
        cwd.path(),
        tmp.path(),
        &["--real-cli", "--reject", "review"],
    )
    .env("ORCH_CLAUDE_CLI", &cli));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(stdout.contains("the real Claude Code CLI"), "{stdout}");
    assert_eq!(events(&stdout), expected(Some(Stage::Review)), "{stdout}");
    assert!(
        stdout.contains("review -> development: reviewer finished: the reviewer asked for changes"),
        "{stdout}"
    );
    assert_done_and_summarised(&stdout, 9);
    assert_eq!(stderr, "", "{stderr}");
}

#[test]
fn a_deploy_command_that_fails_rolls_back_and_the_next_deploy_ships() {
    let cwd = tempfile::tempdir().expect("cwd");
    let tmp = tempfile::tempdir().expect("tmp");
    // --reject deploy: the demo's deploy command refuses its first deploy (exit 1) and the
    // scripted deployer agrees; that the exit status alone decides is shown by
    // services/launcher/tests/deploy_targets.rs, where the agent claims SUCCESS.
    let (code, stdout, stderr) = run(&mut demo(cwd.path(), tmp.path(), &["--reject", "deploy"]));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let want = expected(Some(Stage::Deploy));
    assert_eq!(events(&stdout), want, "{stdout}");
    assert_done_and_summarised(&stdout, want.len() - 2);
    assert_eq!(stderr, "", "{stderr}");
}

#[test]
fn break_prod_fails_production_s_health_and_the_watch_rolls_back_to_the_previous_sha() {
    let cwd = tempfile::tempdir().expect("cwd");
    let tmp = tempfile::tempdir().expect("tmp");
    let (code, stdout, stderr) = run(&mut demo(cwd.path(), tmp.path(), &["--break-prod"]));
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(events(&stdout), expected(None), "{stdout}");
    // The deploy command itself succeeded: only production's health tells.
    assert!(
        stdout.contains("deploy_command sh <workspace>/deploy.sh prod ")
            && stdout.contains("break: exit 0; deploy_status SUCCESS"),
        "{stdout}"
    );
    // Two failed probes of the real endpoint in a row (the threshold), then the rollback.
    let probes = probes(&stdout);
    let want: Vec<(String, String, String)> = [
        ("500", "healthy", "CONTINUE"),
        ("500", "degraded", "ROLLBACK"),
    ]
    .iter()
    .map(|(a, b, c)| ((*a).to_owned(), (*b).to_owned(), (*c).to_owned()))
    .collect();
    assert_eq!(probes, want, "{stdout}");
    let previous = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("rollback to "))
        .and_then(|l| l.split(' ').next())
        .unwrap_or_else(|| panic!("no rollback line: {stdout}"));
    assert!(
        stdout.contains(&format!(
            "rollback to {previous} (post-deploy, once): sh <workspace>/deploy.sh prod {previous}"
        )) && stdout.contains(" rollback <workspace>/var/forge/acme/greeter.git: exit 0 in "),
        "{stdout}"
    );
    // The previous sha is main's before the merge: the sample commit.
    let main = sha_after(
        &stdout,
        "  repository  acme/greeter: a bare git repository in the local forge, main at ",
    );
    assert!(main.starts_with(previous), "{main} / {previous}");
    // Production holds it again, put back by the rollback command, and is healthy.
    let prod = sha_after(
        &stdout,
        "Production (<workspace>/prod, by its rollback command): ",
    );
    assert!(prod.starts_with(previous) && prod.len() == 40, "{prod}");
    assert!(
        stdout.contains(&format!(
            "production's health after the rollback: 200 ok: {prod} serves"
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("Production's health now: 200 ok: {prod} serves")),
        "{stdout}"
    );
    assert_eq!(stderr, "", "{stderr}");
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new());
}

#[test]
fn missing_tools_are_named_with_what_to_do() {
    let cwd = tempfile::tempdir().expect("cwd");
    let tmp = tempfile::tempdir().expect("tmp");
    let (code, _, stderr) = run(demo(cwd.path(), tmp.path(), &["--real-cli"])
        .env("ORCH_CLAUDE_CLI", cwd.path().join("no-such-claude")));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.starts_with("error: --real-cli: the Claude Code CLI")
            && stderr.contains("scripts/install-claude-cli"),
        "{stderr}"
    );

    // A PATH with git but no python3.
    let bin = tempfile::tempdir().expect("bin");
    let git = which("git").expect("git is installed");
    std::os::unix::fs::symlink(git, bin.path().join("git")).expect("symlink");
    let (code, _, stderr) = run(demo(cwd.path(), tmp.path(), &[]).env("PATH", bin.path()));
    assert_eq!(code, 1, "{stderr}");
    assert!(
        stderr.starts_with("error: python3 is not on PATH") && stderr.contains("--real-cli"),
        "{stderr}"
    );

    let (code, _, stderr) = run(&mut demo(cwd.path(), tmp.path(), &["--reject", "analysis"]));
    assert_eq!(code, 1, "{stderr}");
    assert!(stderr.contains("--reject: 'analysis'"), "{stderr}");
    assert_eq!(leftovers(tmp.path()), Vec::<String>::new(), "nothing made");
}

fn which(program: &str) -> Option<std::path::PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}
