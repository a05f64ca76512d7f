//! The REAL Claude Code CLI (pinned, `scripts/install-claude-cli`) as the agent, inside the
//! launcher's bubblewrap sandbox with its network isolated, against the scripted model
//! (reached through the egress proxy): the model's Bash tool calls run the project's tests
//! in the checkout (they pass), try to read a secret outside it (the call fails) and to
//! reach a host outside the allow-list (the proxy refuses it, 403), and the run succeeds. SKIPPED where the CLI or a working bubblewrap is
//! missing (`ORCH_REQUIRE_CLAUDE_CLI` / `ORCH_REQUIRE_POSTGRES` make that a failure).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::H;
use launcher::store::Status;
use orchestrator_model_server::{ModelServer, claude_cli_or_skip, cli_env};
use orchestrator_testkit::TestStorage;

const TEST: &str = "the_real_cli_runs_the_tests_in_its_sandbox_and_reads_no_secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_cli_runs_the_tests_in_its_sandbox_and_reads_no_secret() {
    let Some(cli) = claude_cli_or_skip(TEST) else {
        return;
    };
    let c = launcher::LauncherConfig::from_env(&orchestrator_kit::Env::default()).expect("config");
    if !matches!(c.sandbox.for_launch(c.search_path.as_deref()), Ok(Some(_))) {
        orchestrator_testkit::skip(TEST, "bubblewrap does not work on this machine");
        return;
    }
    if launcher::preflight::find_command("socat", std::env::var("PATH").ok().as_deref()).is_none() {
        orchestrator_testkit::skip(
            TEST,
            "socat (the isolated network's bridge) is not installed",
        );
        return;
    }
    let dir = Arc::new(common::outside_tmp());
    let root = std::fs::canonicalize(dir.path()).expect("real root");
    // A secret of the orchestrator's, outside the checkout: the data dir's .env-like file.
    std::fs::create_dir_all(root.join("var")).expect("data dir");
    let secret = root.join("var/secrets.env");
    std::fs::write(&secret, "GITEA_TOKEN=real-cli-sandbox-secret\n").expect("secret");
    let server = ModelServer::start().await.expect("the scripted model");
    server.control.run_bash(&[
        "printf 'def add(a, b):\\n    return a + b\\n' > calc.py && printf 'import unittest\\nimport calc\\n\\nclass T(unittest.TestCase):\\n    def test_add(self):\\n        self.assertEqual(calc.add(2, 3), 5)\\n' > test_calc.py && python3 -m unittest -v test_calc 2>&1; echo unittest-exit=$?",
        &format!("cat {} 2>&1; echo cat-exit=$?", secret.display()),
        // A host outside the allow-list, through the egress proxy (the only way out).
        "curl -sS -m 10 https://example.com/ 2>&1; echo curl-exit=$?",
    ]);
    let command = format!("{} -p --output-format json", cli.display());
    let data_dir = root.join("var").display().to_string();
    let mut vars: Vec<(String, String)> = cli_env(&server.base_url())
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect();
    vars.extend(
        [
            ("ORCH_AGENT_SANDBOX", "required"),
            // Its own network: the scripted model (on loopback) and nothing else.
            ("ORCH_AGENT_SANDBOX_NETWORK", "isolated"),
            ("ORCH_AGENT_COMMAND", command.as_str()),
            ("ORCH_DATA_DIR", data_dir.as_str()),
            ("ORCH_AGENT_TIMEOUT_SECONDS", "120"),
            // The system's python3 (a shim under a home is the operator's to expose).
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ]
        .map(|(k, v)| (k.to_owned(), v.to_owned())),
    );
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let h = H::start_on(
        Arc::new(TestStorage::sqlite()),
        dir,
        "real-cli-sandbox",
        "",
        &vars,
    )
    .await;
    let job = h.enqueue("developer", "development", "{}").await;
    let done = h.wait_done(&job.id, Duration::from_secs(150)).await;
    let outputs = server.control.tool_outputs();
    let why = format!("tool outputs: {outputs:#?}\nlog:\n{}", h.log(&done));
    assert_eq!(outputs.len(), 3, "{why}");
    assert!(
        outputs[0].contains("unittest-exit=0") && outputs[0].contains("OK"),
        "{why}"
    );
    assert!(outputs[1].contains("cat-exit=1"), "{why}");
    // Refused by the proxy (403), not merely unroutable.
    assert!(
        outputs[2].contains("403") && !outputs[2].contains("curl-exit=0"),
        "{why}"
    );
    assert!(
        !outputs
            .iter()
            .any(|o| o.contains("real-cli-sandbox-secret")),
        "{why}"
    );
    assert_eq!(done.status, Status::Succeeded, "{why}");
    let profile: serde_json::Value =
        serde_json::from_str(&h.get_job(&job.id).await.profile_json).expect("profile");
    assert_eq!(profile["sandbox"], "on");
    assert_eq!(profile["profile"], "developer");
}
