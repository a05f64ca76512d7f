//! `examples/agents/scripted-agent.py`: for every stage, run in a git checkout, it writes
//! artifacts that pass that stage's quality gate (the ONE `QG_CHECKS` registry), and prints
//! a result that `orchestrator_agent_output::parse_result` reads with usage.

use std::path::{Path, PathBuf};
use std::process::Command;

use stage_engine::pipeline::Stage;
use stage_engine::qg::{CheckOutcome, Input, Inputs, artifacts_dir, checks_for};

const KEY: &str = "DEMO-7";

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/agents/scripted-agent.py")
}

fn python() -> Option<&'static str> {
    Command::new("python3")
        .arg("--version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|_| "python3")
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("git runs");
    assert!(out.status.success(), "git {args:?}: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn checkout() -> tempfile::TempDir {
    let d = tempfile::tempdir().expect("tempdir");
    git(d.path(), &["init", "-q", "-b", "main"]);
    std::fs::write(d.path().join("README.md"), "sample\n").expect("write");
    git(d.path(), &["add", "."]);
    git(
        d.path(),
        &[
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@t",
            "commit",
            "-qm",
            "init",
        ],
    );
    d
}

/// Runs the scripted agent for `stage`; its stdout and exit status.
fn run_agent(py: &str, dir: &Path, stage: Stage, extra: &[(&str, &str)]) -> (String, bool) {
    let out = Command::new(py)
        .arg(script())
        // The CLI's arguments are accepted and ignored.
        .args(["-p", "the prompt", "--output-format", "json"])
        .current_dir(dir)
        .env("ORCH_WORK_ITEM", KEY)
        .env("ORCH_STAGE", stage.as_str())
        .envs(extra.iter().copied())
        .output()
        .expect("the scripted agent runs");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.success(),
    )
}

/// The artifact checks of `stage` over the files in `dir`, through the registry.
fn gate(stage: Stage, dir: &Path) -> Vec<(&'static str, CheckOutcome)> {
    let mut inputs = Inputs {
        key: KEY.to_owned(),
        ..Inputs::default()
    };
    let checks: Vec<_> = checks_for(stage)
        .filter(|c| matches!(c.input, Input::Artifact(_)))
        .collect();
    for c in &checks {
        if let Input::Artifact(name) = c.input {
            let text = std::fs::read_to_string(dir.join(artifacts_dir(KEY)).join(name)).ok();
            inputs.artifacts.insert(name, text);
        }
    }
    checks.iter().map(|c| (c.name, (c.eval)(&inputs))).collect()
}

const STAGES: [Stage; 7] = [
    Stage::Analysis,
    Stage::Architecture,
    Stage::Development,
    Stage::Review,
    Stage::Testing,
    Stage::DeployStaging,
    Stage::Deploy,
];

#[test]
fn every_stage_passes_its_gate_and_prints_a_cli_result() {
    let Some(py) = python() else {
        orchestrator_testkit::skip(
            "every_stage_passes_its_gate_and_prints_a_cli_result",
            "python3 is not installed",
        );
        return;
    };
    let d = checkout();
    for stage in STAGES {
        // Nothing there yet: the gate fails (the test can fail).
        assert!(
            !gate(stage, d.path()).iter().all(|(_, o)| o.passed()),
            "{stage}: passes before the agent ran"
        );
        let (stdout, ok) = run_agent(py, d.path(), stage, &[]);
        assert!(ok, "{stage}: exit status; stdout {stdout}");
        for (check, outcome) in gate(stage, d.path()) {
            assert_eq!(outcome, CheckOutcome::Pass, "{stage}: {check}");
        }
        // The Stop hook's view agrees (same registry, over the checkout).
        assert_eq!(
            stage_engine::hook::missing_artifacts(stage, KEY, d.path()).expect("readable"),
            Vec::<String>::new(),
            "{stage}"
        );
        let r = orchestrator_agent_output::parse_result(&stdout)
            .unwrap_or_else(|| panic!("{stage}: no result in {stdout}"));
        assert_eq!(r.subtype.as_deref(), Some("success"), "{stage}");
        assert_eq!(r.is_error, Some(false), "{stage}");
        assert_eq!(r.permission_denials, 0);
        assert!(r.usage.is_known(), "{stage}: no usage");
        assert!(r.usage.input_tokens.unwrap_or(0) > 0, "{stage}");
        assert!(r.usage.output_tokens.unwrap_or(0) > 0, "{stage}");
        assert!(r.total_cost_usd.unwrap_or(0.0) > 0.0, "{stage}");
        if stage == Stage::Development {
            // A real code change outside the artifacts.
            let changed = git(
                d.path(),
                &["status", "--porcelain", "--untracked-files=all"],
            );
            assert!(
                changed
                    .lines()
                    .any(|l| !l.contains("docs/work-items/") && l.ends_with(".py")),
                "no code change: {changed}"
            );
        }
    }
    let deploy = std::fs::read_to_string(d.path().join(artifacts_dir(KEY)).join("deploy.md"))
        .expect("deploy.md");
    let head = git(d.path(), &["rev-parse", "HEAD"]);
    assert!(
        deploy.contains(&format!("deployed_sha: {}", head.trim())),
        "{deploy}"
    );
}

#[test]
fn a_rejecting_stage_rolls_back_once_then_passes() {
    let Some(py) = python() else {
        orchestrator_testkit::skip(
            "a_rejecting_stage_rolls_back_once_then_passes",
            "python3 is not installed",
        );
        return;
    };
    let d = checkout();
    let reject = [(
        "ORCH_SCRIPTED_REJECT",
        "review,testing,deploy-staging,deploy",
    )];
    for stage in [
        Stage::Review,
        Stage::Testing,
        Stage::DeployStaging,
        Stage::Deploy,
    ] {
        let (stdout, ok) = run_agent(py, d.path(), stage, &reject);
        assert!(ok, "{stdout}");
        let outcomes = gate(stage, d.path());
        assert!(
            outcomes
                .iter()
                .all(|(_, o)| matches!(o, CheckOutcome::Negative(_))),
            "{stage}: first run must be a negative verdict: {outcomes:?}"
        );
        // After the rollback, the same agent runs again and passes.
        let (_, ok) = run_agent(py, d.path(), stage, &reject);
        assert!(ok);
        for (check, outcome) in gate(stage, d.path()) {
            assert_eq!(outcome, CheckOutcome::Pass, "{stage}: {check}");
        }
    }
}

#[test]
fn bad_input_is_an_error_result_not_a_crash() {
    let Some(py) = python() else {
        orchestrator_testkit::skip(
            "bad_input_is_an_error_result_not_a_crash",
            "python3 is not installed",
        );
        return;
    };
    let d = checkout();
    for (key, stage, agent) in [
        ("../x-1", "review", ""),
        (KEY, "nowhere", ""),
        (KEY, "review", "tester"),
    ] {
        let out = Command::new(py)
            .arg(script())
            .current_dir(d.path())
            .env("ORCH_WORK_ITEM", key)
            .env("ORCH_STAGE", stage)
            .env("ORCH_AGENT", agent)
            .output()
            .expect("runs");
        assert!(!out.status.success(), "{key} {stage} {agent}");
        let r = orchestrator_agent_output::parse_result(&String::from_utf8_lossy(&out.stdout))
            .expect("an error result");
        assert_eq!(r.is_error, Some(true));
        assert!(
            !d.path().join("docs").exists(),
            "wrote something on bad input"
        );
    }
}

#[test]
fn without_the_variables_the_context_is_read_from_the_prompt_argument() {
    let Some(py) = python() else {
        orchestrator_testkit::skip(
            "without_the_variables_the_context_is_read_from_the_prompt_argument",
            "python3 is not installed",
        );
        return;
    };
    let d = checkout();
    let payload = serde_json::json!({"work_item": KEY, "stage": "testing", "repo": "acme/app", "branch": format!("orch/{KEY}")});
    let out = Command::new(py)
        .arg(script())
        .args([
            "-p",
            &format!("You are the tester.\n{payload}"),
            "--output-format",
            "json",
        ])
        .current_dir(d.path())
        .env_remove("ORCH_WORK_ITEM")
        .env_remove("ORCH_STAGE")
        .output()
        .expect("runs");
    assert!(out.status.success(), "{out:?}");
    for (check, outcome) in gate(Stage::Testing, d.path()) {
        assert_eq!(outcome, CheckOutcome::Pass, "{check}");
    }
}

/// With neither the variables nor the arguments, the key and the stage come from the task
/// on stdin, where the launcher writes it: its own `- work_item:` / `- stage:` lines, never
/// a quoted lookalike in the outside text before them.
#[test]
fn without_variables_or_arguments_the_context_is_read_from_the_task_on_stdin() {
    use std::io::Write;
    let Some(py) = python() else {
        orchestrator_testkit::skip(
            "without_variables_or_arguments_the_context_is_read_from_the_task_on_stdin",
            "python3 is not installed",
        );
        return;
    };
    let d = checkout();
    let task = format!(
        "You are the tester.\n> - work_item: EVIL-1\n> - stage: deploy\n\n---\n\n# Your task\n\n- work_item: {KEY}\n- stage: testing\n"
    );
    let mut child = Command::new(py)
        .arg(script())
        .args(["--output-format", "json"])
        .current_dir(d.path())
        .env_remove("ORCH_WORK_ITEM")
        .env_remove("ORCH_STAGE")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(task.as_bytes())
        .expect("write the task");
    let out = child.wait_with_output().expect("ends");
    assert!(out.status.success(), "{out:?}");
    for (check, outcome) in gate(Stage::Testing, d.path()) {
        assert_eq!(outcome, CheckOutcome::Pass, "{check}");
    }
}
