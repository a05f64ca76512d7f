//! Validation at the door (#20): what cannot work is refused when it is asked for, naming
//! the culprit, instead of failing later in a job.

use std::process::Stdio;

use crate::process::{local_forge_repo, orchestrator, read_addrs, run};

#[test]
fn item_create_with_a_repo_the_forge_does_not_have_fails_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    local_forge_repo(dir.path(), "acme/app");
    let mut up = orchestrator(dir.path())
        .arg("up")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("up starts");
    let addrs = read_addrs(&mut up);
    let item = |args: &[&str]| {
        run(orchestrator(dir.path())
            .arg("item")
            .args(args)
            .env(
                "ORCH_STAGE_ENGINE_URL",
                format!("http://{}", addrs["stage-engine"]),
            )
            .env(
                "ORCH_USAGE_LEDGER_URL",
                format!("http://{}", addrs["usage-ledger"]),
            ))
    };
    let refused = item(&["create", "--repo", "qa/nosuch", "Nothing to work on"]);
    let created = item(&["create", "--repo", "acme/app", "Something to work on"]);
    let listed = item(&["list"]);
    let _ = up.kill();
    let _ = up.wait();
    assert_ne!(refused.0, 0, "{refused:?}");
    assert!(
        refused.2.contains("qa/nosuch") && refused.2.contains("does not exist"),
        "{refused:?}"
    );
    assert!(refused.1.is_empty(), "{refused:?}");
    assert_eq!(created.0, 0, "{created:?}");
    // The refused one took no key and left no item.
    assert!(created.1.starts_with("created LOCAL-1 "), "{created:?}");
    assert!(!listed.1.contains("Nothing to work on"), "{listed:?}");
}

/// Runs `cmd` for at most a minute: a start-up check that does not fire would leave `up`
/// serving, which is a failure here, not a hang.
fn exits_within_a_minute(cmd: &mut std::process::Command) -> (i32, String) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawns");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            let mut stderr = String::new();
            std::io::Read::read_to_string(&mut child.stderr.take().expect("stderr"), &mut stderr)
                .expect("stderr");
            return (status.code().unwrap_or(-1), stderr);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("still running after a minute: the start-up check did not fire");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

#[test]
fn up_with_a_prompt_missing_fails_naming_the_file_resolved_where_it_was_started() {
    let dir = tempfile::tempdir().expect("tempdir");
    let agents = dir.path().join("prompts");
    std::fs::create_dir_all(&agents).expect("agents");
    for role in ["analyst", "architect", "developer", "reviewer", "deployer"] {
        std::fs::write(agents.join(format!("{role}.md")), "You are it.\n").expect("prompt");
    }
    // Relative: resolved against the directory `up` was started in.
    let (code, stderr) = exits_within_a_minute(
        orchestrator(dir.path())
            .arg("up")
            .env("ORCH_AGENTS_DIR", "prompts"),
    );
    assert_ne!(code, 0, "{stderr}");
    let want = agents.join("tester.md");
    assert!(
        stderr.contains("ORCH_AGENTS_DIR") && stderr.contains(&want.display().to_string()),
        "{stderr}"
    );
    // No directory at all.
    let (code, stderr) = exits_within_a_minute(
        orchestrator(dir.path())
            .args(["serve", "launcher"])
            .env("ORCH_AGENTS_DIR", "nowhere"),
    );
    assert_ne!(code, 0, "{stderr}");
    let want = dir.path().join("nowhere");
    assert!(
        stderr.contains(&format!("{} is not a directory", want.display())),
        "{stderr}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_command_not_on_path_shows_in_the_queue_until_it_appears() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bin = dir.path().join("bin");
    std::fs::create_dir_all(&bin).expect("bin");
    let path = format!(
        "{}:{}",
        bin.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let mut up = orchestrator(dir.path())
        .arg("up")
        .env("ORCH_AGENT_COMMAND", "orch-test-agent-cli -p")
        .env("PATH", &path)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("up starts");
    let addrs = tokio::task::block_in_place(|| read_addrs(&mut up));
    let queue = format!("http://{}/queue", addrs["gateway"]);
    let agent_command = || async {
        let q: serde_json::Value = reqwest::get(&queue)
            .await
            .expect("queue")
            .json()
            .await
            .expect("json");
        q["launcher"]["agent_command"].clone()
    };
    let before = agent_command().await;
    // Installed after start-up: the next snapshot sees it.
    let tool = bin.join("orch-test-agent-cli");
    std::fs::write(&tool, "#!/bin/sh\nexit 0\n").expect("write");
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
    let after = agent_command().await;
    let _ = up.kill();
    let _ = up.wait();
    assert_eq!(before, "not found");
    assert_eq!(after, "found");
}

#[test]
fn up_prints_where_a_relative_agents_dir_resolved() {
    let dir = tempfile::tempdir().expect("tempdir");
    let prompts = dir.path().join("prompts");
    std::fs::create_dir_all(&prompts).expect("prompts");
    for role in stage_engine::pipeline::ROLES {
        std::fs::write(prompts.join(format!("{role}.md")), "You are it.\n").expect("prompt");
    }
    let mut up = orchestrator(dir.path())
        .arg("up")
        .env("ORCH_AGENTS_DIR", "prompts")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("up starts");
    let stdout = up.stdout.take().expect("stdout");
    let mut lines = Vec::new();
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line.expect("line");
        let ready = line.starts_with("ready");
        lines.push(line);
        if ready {
            break;
        }
    }
    let _ = up.kill();
    let _ = up.wait();
    let want = format!("agents        prompts from {}", prompts.display());
    assert!(lines.contains(&want), "{lines:#?}");
}
