//! The agents' profiles (profiles.toml) through the launcher: the flags of an agent's
//! profile reach its command, the profile in force is recorded with the run (`GetJob`),
//! the shipped profiles give readers no shell and builders Bash, a bad file stops the
//! configuration naming the file, the table and the key, and a profile that allows
//! everything is refused without the sandbox.

mod common;

use std::time::Duration;

use common::{H, WRITE_ARTIFACT};
use launcher::LauncherConfig;
use launcher::profiles::Profiles;
use launcher::store::Status;
use orchestrator_kit::Env;
use orchestrator_testkit::TestStorage;

const SECS: Duration = Duration::from_secs(20);

fn script() -> String {
    format!(
        "printf '%s\\n' \"$@\" > {{root}}/args\n{WRITE_ARTIFACT}\ncat {{contracts}}/real-2.1.328/success-with-write-tool.stdout.json"
    )
}

#[test]
fn the_shipped_profiles_give_readers_no_shell_and_builders_bash() {
    let p = Profiles::load(None).expect("the shipped profiles");
    assert!(p.allowing_everything().is_empty());
    for reader in ["analyst", "architect", "reviewer"] {
        let r = p.for_agent(reader);
        assert_eq!(r.name, reader);
        assert!(
            r.disallowed_tools.contains(&"Bash".to_owned()),
            "{reader}: {r:?}"
        );
        assert!(
            !r.allowed_tools.iter().any(|t| t.starts_with("Bash")),
            "{reader}"
        );
    }
    for builder in ["developer", "tester", "deployer"] {
        let b = p.for_agent(builder);
        assert!(
            b.allowed_tools.contains(&"Bash".to_owned()),
            "{builder}: {b:?}"
        );
        assert!(
            !b.disallowed_tools.contains(&"Bash".to_owned()),
            "{builder}"
        );
    }
    let other = p.for_agent("someone-new");
    assert_eq!(other.name, "default");
    assert!(other.disallowed_tools.contains(&"Bash".to_owned()));
    // The file beside the prompts is the one embedded.
    let beside = Profiles::load(Some(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../examples/agents/profiles.toml"),
    ))
    .expect("examples/agents/profiles.toml");
    assert_eq!(beside.for_agent("developer"), p.for_agent("developer"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_profile_s_flags_reach_the_agent_and_are_recorded_with_the_run() {
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    std::fs::create_dir_all(dir.path().join("agents")).expect("agents");
    std::fs::write(
        dir.path().join("agents/profiles.toml"),
        r#"[developer]
permission_mode = "acceptEdits"
allowed_tools = ["Read", "Edit", "Bash(python3 -m unittest:*)"]
disallowed_tools = ["WebFetch"]
model = "sonnet"
max_turns = 12
timeout_s = 25
budget_usd = 0.5
network = ["pypi.org"]
"#,
    )
    .expect("profiles.toml");
    let h = H::start_on(
        std::sync::Arc::new(TestStorage::sqlite()),
        dir,
        "profiles-test",
        &script(),
        &[("ORCH_WORK_ITEM_BUDGET_USD", "2")],
    )
    .await;
    let job = h.enqueue("developer", "development", "").await;
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Succeeded, "{}", h.log(&done));
    let args: Vec<String> = std::fs::read_to_string(h.root.join("args"))
        .expect("args")
        .lines()
        .map(str::to_owned)
        .collect();
    let after = |flag: &str| {
        let i = args
            .iter()
            .position(|a| a == flag)
            .unwrap_or_else(|| panic!("{flag} not in {args:?}"));
        args[i + 1].clone()
    };
    assert_eq!(
        after("--allowedTools"),
        "Read,Edit,Bash(python3 -m unittest:*)"
    );
    assert_eq!(after("--disallowedTools"), "WebFetch");
    assert_eq!(after("--model"), "sonnet");
    assert_eq!(after("--max-turns"), "12");
    // The smaller of the profile's 0.50 and the work item's 2.00.
    assert_eq!(after("--max-budget-usd"), "0.5000");
    assert_eq!(
        h.svc.supervisor().config().timeout_for("developer"),
        Duration::from_secs(25)
    );
    let j = h.get_job(&job.id).await;
    let profile: serde_json::Value = serde_json::from_str(&j.profile_json).expect("profile_json");
    assert_eq!(profile["profile"], "developer");
    assert_eq!(profile["max_turns"], 12);
    assert_eq!(profile["network"]["allowed"][0], "pypi.org");
    assert_eq!(profile["network"]["isolated"], false);
    assert_eq!(profile["sandbox"], "off", "the harness runs agents bare");
    // A name the file has no table for, and no [default]: the safe profile, no shell.
    let other = h.enqueue_for("ORCH-2", "noop", "noop", "").await;
    let done = h.wait_done(&other.id, SECS).await;
    let j = h.get_job(&done.id).await;
    let profile: serde_json::Value = serde_json::from_str(&j.profile_json).expect("profile_json");
    assert_eq!(profile["profile"], "safe");
    assert_eq!(profile["disallowed_tools"][0], "Bash");
}

#[test]
fn a_bad_profiles_file_stops_the_configuration_naming_file_table_and_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("profiles.toml");
    std::fs::write(&file, "[tester]\nmax_turns = \"many\"\n").expect("write");
    let err = LauncherConfig::from_env(&Env::from_pairs([(
        "ORCH_AGENT_PROFILES",
        file.display().to_string(),
    )]))
    .expect_err("bad profile");
    assert_eq!(err.var, "ORCH_AGENT_PROFILES");
    let msg = err.to_string();
    assert!(
        msg.contains(&file.display().to_string()) && msg.contains("[tester] max_turns"),
        "{msg}"
    );
    // Beside the prompts, found without the variable.
    std::fs::write(
        dir.path().join("profiles.toml"),
        "[reviewer]\nallowed = [1]\n",
    )
    .expect("write");
    let err = LauncherConfig::from_env(&Env::from_pairs([(
        "ORCH_AGENTS_DIR",
        dir.path().display().to_string(),
    )]))
    .expect_err("bad profile");
    assert!(err.to_string().contains("[reviewer] allowed"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_profile_that_allows_everything_needs_the_sandbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let roles = ["analyst", "developer"];
    for r in roles {
        std::fs::write(dir.path().join(format!("{r}.md")), "x\n").expect("prompt");
    }
    std::fs::write(
        dir.path().join("profiles.toml"),
        "[developer]\ndangerously_skip_permissions = true\n",
    )
    .expect("write");
    let agents = dir.path().display().to_string();
    let config = LauncherConfig::from_env(&Env::from_pairs([
        ("ORCH_AGENTS_DIR", agents.as_str()),
        ("ORCH_AGENT_SANDBOX", "off"),
    ]))
    .expect("parses");
    let err = config
        .check_at_start(&roles)
        .expect_err("refused at start-up");
    assert_eq!(err.var, "ORCH_AGENT_PROFILES");
    assert!(
        err.to_string().contains("[developer] allows everything"),
        "{err}"
    );
    // And at launch, should it get that far.
    let h = H::start(
        TestStorage::sqlite(),
        &script(),
        &[("ORCH_AGENT_PROFILES", &format!("{agents}/profiles.toml"))],
    )
    .await;
    let job = h.enqueue("developer", "development", "").await;
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Failed);
    assert_eq!(done.outcome, "sandbox_unavailable");
    assert!(done.reason.contains("allows everything"), "{}", done.reason);
    assert!(!h.root.join("args").exists(), "the agent must not have run");
}
