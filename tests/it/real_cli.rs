//! The REAL Claude Code CLI as the agent, driven by the scripted model server, with
//! `orchestrator qg-hook` (the `QG_CHECKS` registry) as its Stop hook: a model that ends its
//! turn without the stage's artifact is kept working until the gate is met. Reports
//! `SKIPPED <name>: <why>` where the CLI is not installed (`scripts/install-claude-cli`).

use std::time::Duration;

use orchestrator_model_server::{ModelServer, Scenario, claude_cli_or_skip, cli_env};
use stage_engine::pipeline::Stage;

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");
const KEY: &str = "DEMO-2";

#[tokio::test]
async fn the_qg_hook_keeps_the_real_cli_working_until_the_gate_is_met() {
    let Some(cli) =
        claude_cli_or_skip("the_qg_hook_keeps_the_real_cli_working_until_the_gate_is_met")
    else {
        return;
    };
    let server = ModelServer::start().await.expect("server");
    server.control.set_scenario(Scenario::LazyUntilStopHook);
    let co = tempfile::tempdir().expect("checkout");
    let home = tempfile::tempdir().expect("home");
    let state = home.path().join("qg-blocks");
    let hook = format!(
        "{BIN} qg-hook --work-item {KEY} --stage review --max-blocks 2 --state-file {}",
        state.display()
    );
    let settings =
        serde_json::json!({"hooks": {"Stop": [{"hooks": [{"type": "command", "command": hook}]}]}})
            .to_string();
    let mut cmd = tokio::process::Command::new(cli);
    cmd.arg("-p")
        .arg(format!(
            "You are the reviewer.\nwork_item: {KEY}\nstage: review"
        ))
        .args(["--output-format", "json", "--allowedTools", "Write,Edit"])
        .args(["--settings", &settings])
        .current_dir(co.path())
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", home.path())
        .envs(cli_env(&server.base_url()))
        .kill_on_drop(true);
    let out = tokio::time::timeout(Duration::from_secs(120), cmd.output())
        .await
        .expect("the CLI finishes within 120 s")
        .expect("the CLI starts");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let why = format!(
        "exit {:?}\nstdout: {stdout}\nstderr: {}",
        out.status.code(),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{why}");
    // The hook blocked once (the lazy first turn), then let the agent stop.
    assert_eq!(
        std::fs::read_to_string(&state)
            .expect("the hook ran")
            .trim(),
        "1",
        "{why}"
    );
    assert_eq!(
        stage_engine::hook::missing_artifacts(Stage::Review, KEY, co.path()).expect("readable"),
        Vec::<String>::new(),
        "{why}"
    );
    let r = orchestrator_agent_output::parse_result(&stdout).expect("a result");
    assert_eq!(r.subtype.as_deref(), Some("success"), "{why}");
    assert_eq!(r.num_turns, Some(3), "{why}");
}
