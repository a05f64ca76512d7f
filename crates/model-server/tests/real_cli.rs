//! The REAL Claude Code CLI (pinned 2.1.328, `scripts/install-claude-cli`) as the agent,
//! driven by the scripted model server: no model, no network. Where the CLI is not
//! installed, each test reports itself `SKIPPED <name>: <why>` on stderr.
//!
//! The binary: see `orchestrator_model_server::claude_cli`. `ORCH_REQUIRE_CLAUDE_CLI=1`
//! turns a skip into a failure (CI, where the script installed it).

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use orchestrator_model_server::{Failure, ModelServer, Scenario};

const KEY: &str = "DEMO-1";

fn cli_or_skip(test: &str) -> Option<PathBuf> {
    orchestrator_model_server::claude_cli_or_skip(test)
}

fn checkout() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    let ok = std::process::Command::new("git")
        .args(["init", "-q"])
        .current_dir(d.path())
        .status()
        .expect("git");
    assert!(ok.success());
    std::fs::write(d.path().join("README.md"), "sample\n").expect("write");
    d
}

fn prompt(stage: &str) -> String {
    format!(
        "You are the analyst of the orchestrator pipeline.\nwork_item: {KEY}\nstage: {stage}\nWrite the stage's artifact under docs/work-items/{KEY}/."
    )
}

/// Runs the CLI in `dir` against `server`, with a throwaway HOME and nothing else of ours.
async fn run_cli(
    bin: &Path,
    server: &ModelServer,
    dir: &Path,
    stage: &str,
    extra: &[&str],
) -> Output {
    let home = tempfile::tempdir().expect("home");
    let mut cmd = tokio::process::Command::new(bin);
    cmd.arg("-p")
        .arg(prompt(stage))
        .args(["--output-format", "json", "--allowedTools", "Write,Edit"])
        .args(extra)
        .current_dir(dir)
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .envs(orchestrator_model_server::cli_env(&server.base_url()))
        .kill_on_drop(true);
    tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the CLI finishes within 120 s")
        .expect("the CLI starts")
}

fn describe(out: &Output) -> String {
    format!(
        "exit {:?}\nstdout: {}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test]
async fn the_real_cli_writes_the_stage_artifact_and_prints_a_result() {
    let Some(bin) = cli_or_skip("the_real_cli_writes_the_stage_artifact_and_prints_a_result")
    else {
        return;
    };
    let server = ModelServer::start().await.expect("server");
    let co = checkout();
    let out = run_cli(&bin, &server, co.path(), "analysis", &[]).await;
    assert!(out.status.success(), "{}", describe(&out));
    let artifact = co.path().join(format!("docs/work-items/{KEY}/analysis.md"));
    let text = std::fs::read_to_string(&artifact)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", artifact.display(), describe(&out)));
    assert!(
        text.starts_with(&format!("---\nwork_item: {KEY}\n")),
        "{text}"
    );
    let r = orchestrator_agent_output::parse_result(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("no result: {}", describe(&out)));
    assert_eq!(r.subtype.as_deref(), Some("success"));
    assert_eq!(r.is_error, Some(false));
    assert_eq!(r.permission_denials, 0);
    assert_eq!(r.num_turns, Some(2));
    assert!(r.usage.input_tokens.unwrap_or(0) > 0, "{r:?}");
    assert!(r.total_cost_usd.unwrap_or(0.0) > 0.0, "{r:?}");
    assert!(server.control.turns_answered() >= 2);
}

#[tokio::test]
async fn an_overloaded_model_is_reported_as_api_error_529() {
    let Some(bin) = cli_or_skip("an_overloaded_model_is_reported_as_api_error_529") else {
        return;
    };
    let server = ModelServer::start().await.expect("server");
    server.control.fail_always(Failure::Overloaded);
    let co = checkout();
    let out = run_cli(&bin, &server, co.path(), "analysis", &[]).await;
    assert_eq!(out.status.code(), Some(1), "{}", describe(&out));
    let r = orchestrator_agent_output::parse_result(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("no result: {}", describe(&out)));
    assert_eq!(r.is_error, Some(true));
    assert_eq!(r.api_error_status, Some(529), "{r:?}");
    assert!(server.control.failures_answered() >= 1);
    assert!(!co.path().join("docs").exists());
}

#[tokio::test]
async fn a_stop_hook_keeps_a_lazy_model_working_until_the_artifact_exists() {
    let Some(bin) = cli_or_skip("a_stop_hook_keeps_a_lazy_model_working_until_the_artifact_exists")
    else {
        return;
    };
    let server = ModelServer::start().await.expect("server");
    server.control.set_scenario(Scenario::LazyUntilStopHook);
    let co = checkout();
    // A stand-in for `orchestrator qg-hook`: exit 2 with the reason while the file is missing.
    let hook = format!(
        "test -s docs/work-items/{KEY}/analysis.md || {{ echo 'MISSING ARTIFACT: docs/work-items/{KEY}/analysis.md' >&2; exit 2; }}"
    );
    let settings =
        serde_json::json!({"hooks": {"Stop": [{"hooks": [{"type": "command", "command": hook}]}]}})
            .to_string();
    let out = run_cli(
        &bin,
        &server,
        co.path(),
        "analysis",
        &["--settings", &settings],
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    assert!(
        co.path()
            .join(format!("docs/work-items/{KEY}/analysis.md"))
            .is_file(),
        "{}",
        describe(&out)
    );
    let r = orchestrator_agent_output::parse_result(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("no result: {}", describe(&out)));
    assert_eq!(r.subtype.as_deref(), Some("success"));
    assert_eq!(r.num_turns, Some(3), "{r:?}");
}

#[tokio::test]
async fn the_real_cli_writes_the_code_change_and_the_notes_in_development() {
    let Some(bin) = cli_or_skip("the_real_cli_writes_the_code_change_and_the_notes_in_development")
    else {
        return;
    };
    let server = ModelServer::start().await.expect("server");
    let co = checkout();
    let out = run_cli(&bin, &server, co.path(), "development", &[]).await;
    assert!(out.status.success(), "{}", describe(&out));
    for path in orchestrator_model_server::artifacts(KEY, "development")
        .iter()
        .map(|(p, _)| p)
    {
        assert!(co.path().join(path).is_file(), "{path}\n{}", describe(&out));
    }
    assert!(co.path().join("scripted/demo_1.py").is_file());
    let r = orchestrator_agent_output::parse_result(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("no result: {}", describe(&out)));
    assert_eq!(r.subtype.as_deref(), Some("success"));
    // Two Write turns, then the closing text.
    assert_eq!(r.num_turns, Some(3), "{r:?}");
}

#[tokio::test]
async fn in_deploy_the_real_cli_runs_git_through_bash_and_writes_the_deployed_sha() {
    let Some(bin) =
        cli_or_skip("in_deploy_the_real_cli_runs_git_through_bash_and_writes_the_deployed_sha")
    else {
        return;
    };
    let server = ModelServer::start().await.expect("server");
    let co = checkout();
    let git = |args: &[&str]| {
        let out = std::process::Command::new("git")
            .args(["-c", "user.name=t", "-c", "user.email=t@example.com"])
            .args(args)
            .current_dir(co.path())
            .output()
            .expect("git");
        assert!(out.status.success(), "{out:?}");
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    };
    git(&["add", "-A"]);
    git(&["commit", "-q", "-m", "sample"]);
    let head = git(&["rev-parse", "HEAD"]);
    let out = run_cli(
        &bin,
        &server,
        co.path(),
        "deploy",
        &["--allowedTools", "Bash(git rev-parse:*)"],
    )
    .await;
    assert!(out.status.success(), "{}", describe(&out));
    let deploy =
        std::fs::read_to_string(co.path().join(format!("docs/work-items/{KEY}/deploy.md")))
            .unwrap_or_else(|e| panic!("deploy.md: {e}\n{}", describe(&out)));
    assert!(
        deploy.contains(&format!("deployed_sha: {head}\n")),
        "{deploy}\n{}",
        describe(&out)
    );
    let r = orchestrator_agent_output::parse_result(&String::from_utf8_lossy(&out.stdout))
        .unwrap_or_else(|| panic!("no result: {}", describe(&out)));
    assert_eq!(r.permission_denials, 0, "{r:?}");
    // Bash, Write, then the closing text.
    assert_eq!(r.num_turns, Some(3), "{r:?}");
}
