//! A failed job parks its work item, and a human resumes or ends it (issue #20): the whole
//! stack over real gRPC, a shell script as the agent, the `orchestrator` binary run as a
//! subprocess for `item show / list / retry / cancel`, and a fake Plane whose signed
//! `:retry:` comments reach stage-engine through the gateway's inbox. On SQLite and on
//! PostgreSQL.
//!
//! The launcher does not report a failed job yet (another part of #20): here the stall
//! watchdog (`ORCH_STALL_S=1`) applies the failed job's end; once the launcher reports it,
//! the same item ends blocked the same way, whichever comes first.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator_fakes::Hook;
use orchestrator_fakes::plane::{FakePlane, NewIssue};
use orchestrator_forge::RepoName;
use orchestrator_forge::local::LocalForge;
use orchestrator_kit::ServiceName;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::launcher::v1::{Job, JobStatus, ListJobsRequest};
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, GetWorkItemRequest, ListTransitionsRequest, WorkItem,
};
use orchestrator_testkit::{TestStorage, on_both_backends};
use serde_json::Value;

use crate::common::{Stack, contracts_dir, start};

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");
const REPO: &str = "acme/app";
/// How long one step may take on a loaded machine.
const STEP: Duration = Duration::from_secs(90);

/// The agent: fails permanently until `<dir>/fixed` exists (then it writes the analysis
/// and prints a real CLI result); for a `SLOW-*` item it runs until it is killed.
fn agent_script(root: &Path) -> String {
    let sample =
        contracts_dir().join("claude-cli/real-2.1.328/success-with-write-tool.stdout.json");
    let script = root.join("agent.sh");
    std::fs::write(
        &script,
        format!(
            r#"case "$ORCH_WORK_ITEM" in SLOW-*) exec sleep 300;; esac
if [ ! -f {fixed} ]; then
  echo "claude: command not found (test agent is broken)" >&2
  exit 127
fi
mkdir -p "$ORCH_ARTIFACTS_DIR"
printf -- '---\nwork_item: %s\n---\n# Analysis\nScripted.\n' "$ORCH_WORK_ITEM" > "$ORCH_ARTIFACTS_DIR/analysis.md"
cat {sample}
"#,
            fixed = root.join("fixed").display(),
            sample = sample.display()
        ),
    )
    .expect("script");
    format!("sh {}", script.display())
}

/// A local forge with `acme/app`, every role's prompt, and the agent; the stack's variables.
async fn workspace(root: &Path) -> Vec<(String, String)> {
    let forge_dir = root.join("forge");
    LocalForge::new(forge_dir.clone(), "main".into())
        .init_repo(&RepoName::parse(REPO).expect("repo"))
        .await
        .expect("bare repo");
    let agents = root.join("agents");
    std::fs::create_dir_all(&agents).expect("agents");
    for role in [
        "analyst",
        "architect",
        "developer",
        "reviewer",
        "tester",
        "deployer",
    ] {
        std::fs::write(
            agents.join(format!("{role}.md")),
            format!("You are the {role}.\n"),
        )
        .expect("prompt");
    }
    let s = |p: &Path| p.display().to_string();
    vec![
        ("ORCH_AGENT_COMMAND".into(), agent_script(root)),
        ("ORCH_AGENTS_DIR".into(), s(&agents)),
        ("ORCH_WORKDIR".into(), s(&root.join("work"))),
        ("ORCH_FORGE".into(), "local".into()),
        ("ORCH_FORGE_LOCAL_DIR".into(), s(&forge_dir)),
        ("ORCH_DATA_DIR".into(), s(&root.join("data"))),
        ("ORCH_OUTBOX_POLL_MS".into(), "50".into()),
        ("ORCH_LAUNCHER_POLL_MS".into(), "100".into()),
        // One attempt: the first failure is final.
        ("ORCH_MAX_ATTEMPTS".into(), "1".into()),
        // The agent is "fixed" by a file under the test's root, which the sandbox would
        // hide (services/launcher/tests/sandbox.rs runs agents inside it).
        ("ORCH_AGENT_SANDBOX".into(), "off".into()),
        ("ORCH_STALL_S".into(), "1".into()),
        ("ORCH_STALL_CHECK_INTERVAL_S".into(), "1".into()),
    ]
}

async fn start_with(storage: TestStorage, env: &[(String, String)]) -> Stack {
    let refs: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    start(storage, &refs).await
}

/// `orchestrator item <args>` against the stack: (exit code, stdout, stderr).
fn cli(stack: &Stack, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(BIN)
        .arg("item")
        .args(args)
        .env(
            "ORCH_STAGE_ENGINE_URL",
            stack.config.url(ServiceName::StageEngine),
        )
        .env(
            "ORCH_USAGE_LEDGER_URL",
            stack.config.url(ServiceName::UsageLedger),
        )
        .env_remove("ORCH_INTERNAL_TOKEN")
        .stdin(Stdio::null())
        .output()
        .expect("orchestrator runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

async fn item(c: &Clients, key: &str) -> WorkItem {
    c.stage_engine
        .clone()
        .get_work_item(GetWorkItemRequest { key: key.into() })
        .await
        .expect("get")
        .into_inner()
}

async fn jobs(c: &Clients, key: &str) -> Vec<Job> {
    c.launcher
        .clone()
        .list_jobs(ListJobsRequest {
            work_item: key.into(),
            limit: 100,
            ..ListJobsRequest::default()
        })
        .await
        .expect("jobs")
        .into_inner()
        .jobs
}

async fn causes(c: &Clients, key: &str) -> Vec<String> {
    c.stage_engine
        .clone()
        .list_transitions(ListTransitionsRequest {
            work_item: key.into(),
        })
        .await
        .expect("transitions")
        .into_inner()
        .transitions
        .into_iter()
        .map(|t| t.cause)
        .collect()
}

/// Polls `probe` until it gives a value; after [`STEP`] fails with `what` and `state()`.
async fn wait_for<T, F, Fut>(what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let start = Instant::now();
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(state) if start.elapsed() > STEP => {
                panic!("timed out after {STEP:?} waiting for {what}; last: {state}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

async fn reach(c: &Clients, key: &str, status: &str) -> WorkItem {
    wait_for(&format!("{key} {status}"), || async {
        let i = item(c, key).await;
        if i.status == status {
            Ok(i)
        } else {
            Err(format!("{i:?}; jobs {:?}", jobs(c, key).await))
        }
    })
    .await
}

async fn create(c: &Clients, key: &str) {
    c.stage_engine
        .clone()
        .create_work_item(CreateWorkItemRequest {
            tracker_issue_id: key.into(),
            key: key.into(),
            title: format!("{key} title"),
            description: "Line one.\nLine two.".into(),
            repo: REPO.into(),
            ..Default::default()
        })
        .await
        .expect("create");
}

/// An agent that fails for good parks the item blocked with the reason and the next step;
/// `orchestrator item retry` runs the stage again and, with the agent fixed, the item moves
/// on; `orchestrator item cancel` ends an item and kills its running job.
async fn a_failed_job_parks_and_the_cli_retries_and_cancels(storage: TestStorage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let env = workspace(dir.path()).await;
    let stack = start_with(storage, &env).await;
    let c = &stack.clients;

    create(c, "FAIL-1").await;
    let blocked = reach(c, "FAIL-1", "blocked").await;
    let job = jobs(c, "FAIL-1").await;
    assert_eq!(job.len(), 1, "{job:?}");
    assert_eq!(job[0].status(), JobStatus::Failed, "{job:?}");
    assert!(
        blocked.status_reason.starts_with(&format!(
            "the analyst's job {} failed for good (",
            job[0].id
        )) && blocked.status_reason.ends_with(
            "fix the cause, then `orchestrator item retry FAIL-1` or comment `:retry:` on the issue"
        ),
        "{}",
        blocked.status_reason
    );
    assert!(blocked.expected_agent.is_empty());

    let (code, out, err) = cli(&stack, &["show", "FAIL-1"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("status:    blocked"), "{out}");
    assert!(
        out.contains(&format!("reason:    {}", blocked.status_reason)),
        "{out}"
    );
    assert!(
        out.contains("Description:\n  Line one.\n  Line two.\n"),
        "{out}"
    );
    // The stream bot told a human why, and what to do.
    let shown = wait_for("the blocked comment", || async {
        let (_, out, _) = cli(&stack, &["show", "FAIL-1"]);
        if out.contains("Blocked at analysis") {
            Ok(out)
        } else {
            Err(out)
        }
    })
    .await;
    assert!(shown.contains("orchestrator item retry FAIL-1"), "{shown}");
    let (code, out, _) = cli(&stack, &["list", "--status", "blocked"]);
    assert_eq!(code, 0);
    assert!(out.contains("FAIL-1"), "{out}");
    // Exposed for operators: the watchdog's counter (it fired here, the launcher not yet
    // reporting failures) and the blocked item.
    let gateway = stack.config.listen[&ServiceName::Gateway].to_string();
    let metrics = reqwest::get(format!("http://{gateway}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text");
    assert!(
        metrics.contains("orchestrator_stall_watchdog_firings_total{reason=\"latest_job_failed\"}")
            && metrics.contains("orchestrator_work_items{status=\"blocked\"} 1\n"),
        "{metrics}"
    );

    // Fixed, then retried from the command line: the analyst runs again and gets through.
    std::fs::write(dir.path().join("fixed"), "").expect("fix the agent");
    let (code, out, err) = cli(&stack, &["retry", "FAIL-1", "--as", "ada"]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("FAIL-1 retried by ada: retried; now at analysis (active)\n"),
        "{out}"
    );
    assert!(out.contains("enqueued: analyst"), "{out}");
    let moved = reach(c, "FAIL-1", "awaiting_approval").await;
    assert!(moved.status_reason.is_empty(), "{moved:?}");
    assert_eq!(jobs(c, "FAIL-1").await.len(), 2);
    assert!(
        causes(c, "FAIL-1")
            .await
            .iter()
            .any(|t| t == "retried by ada: the analyst runs analysis again with a fresh budget"),
    );
    // Not blocked any more: a retry is refused, and says why.
    let (code, _, err) = cli(&stack, &["retry", "FAIL-1", "--as", "ada"]);
    assert_eq!(code, 1);
    assert!(
        err.contains("only a blocked work item can be retried"),
        "{err}"
    );

    // Cancelled while its agent runs: the item ends, the job is killed.
    create(c, "SLOW-1").await;
    wait_for("SLOW-1's agent running", || async {
        let j = jobs(c, "SLOW-1").await;
        if j.first().is_some_and(|j| j.status() == JobStatus::Running) {
            Ok(())
        } else {
            Err(format!("{j:?}"))
        }
    })
    .await;
    let (code, out, err) = cli(
        &stack,
        &["cancel", "SLOW-1", "--reason", "not needed", "--as", "ada"],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.starts_with("SLOW-1 cancelled by ada: cancelled; now at analysis (cancelled)\n"),
        "{out}"
    );
    wait_for("SLOW-1's job cancelled", || async {
        let j = jobs(c, "SLOW-1").await;
        if j.first()
            .is_some_and(|j| j.status() == JobStatus::Cancelled)
        {
            Ok(())
        } else {
            Err(format!("{j:?}"))
        }
    })
    .await;
    let ended = item(c, "SLOW-1").await;
    assert_eq!(
        (ended.status.as_str(), ended.status_reason.as_str()),
        ("cancelled", "cancelled by ada: not needed")
    );
    let (_, out, _) = cli(&stack, &["list", "--status", "cancelled"]);
    assert!(out.contains("SLOW-1") && !out.contains("FAIL-1"), "{out}");
    // Ended: a second cancel changes nothing.
    let (code, out, _) = cli(&stack, &["cancel", "SLOW-1"]);
    assert_eq!(code, 0);
    assert!(out.contains(": unchanged;"), "{out}");
}

const PLANE_SECRET: &str = "plane_wh_retry0123456789abcdef";
const SERVICE_TOKEN: &str = "plane_api_orchestrator";

/// What the gateway answered a fake Plane delivery: its `status` and `reason`.
fn answer(d: &Option<orchestrator_fakes::Delivery>) -> (String, String) {
    let d = d.as_ref().expect("a webhook was sent");
    let v: Value = serde_json::from_str(&d.answer).unwrap_or(Value::Null);
    (
        v["status"].as_str().unwrap_or_default().to_owned(),
        v["reason"].as_str().unwrap_or_default().to_owned(),
    )
}

/// On Plane, a human's `:retry:` comment (signed webhook, through the gateway's inbox)
/// retries the blocked item; a bot's — one the gateway knows, one only stage-engine knows —
/// and the orchestrator's own comment that names `:retry:` change nothing.
async fn a_humans_retry_comment_on_plane_retries_and_a_bots_does_not(storage: TestStorage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = workspace(dir.path()).await;
    let plane = FakePlane::start("acme").await;
    plane.add_user("orchestrator", Some(SERVICE_TOKEN));
    let mut bots = vec!["orchestrator".to_owned()];
    let mut stream_bot = None;
    for role in orchestrator_tracker::ROLES {
        let name = format!("orchestrator-{role}");
        let token = format!("plane_bot_{role}");
        let user = plane.add_user(&name, Some(&token));
        if role == "stream" {
            stream_bot = Some(user);
        }
        bots.push(name);
        env.push((
            format!("PLANE_BOT_TOKEN_{}", role.to_ascii_uppercase()),
            token,
        ));
    }
    let stream_bot = stream_bot.expect("the stream bot");
    let ada = plane.add_user("ada", None);
    let ci_bot = plane.add_user("ci-bot", None);
    let project = plane.add_project("ORCH", "Orchestrator");
    for (k, v) in [
        ("PLANE_BASE_URL", plane.url.clone()),
        ("PLANE_WORKSPACE_SLUG", "acme".into()),
        ("PLANE_API_TOKEN", SERVICE_TOKEN.into()),
        ("PLANE_WEBHOOK_SECRET", PLANE_SECRET.into()),
        ("ORCH_PLANE_DEFAULT_REPO", REPO.into()),
        ("ORCH_PLANE_BOT_USERS", bots.join(",")),
        // The gateway does not know ci-bot; stage-engine does (two layers of the gate).
        ("ORCH_BOT_AUTHORS", "ci-bot".into()),
        ("ORCH_GATEWAY_DISPATCH_POLL_MS", "50".into()),
    ] {
        env.push((k.to_owned(), v));
    }
    let stack = start_with(storage, &env).await;
    let c = &stack.clients;
    let gateway = stack.config.listen[&ServiceName::Gateway].to_string();
    let (issue, _) = plane
        .create_issue(
            &project.id,
            &NewIssue {
                name: "Add a health endpoint".into(),
                ..NewIssue::default()
            },
            &ada,
        )
        .await;
    plane.set_webhook(Some(Hook {
        url: format!("http://{gateway}/webhooks/plane"),
        secret: Some(PLANE_SECRET.into()),
    }));
    // The call the issue's webhook makes (the trigger rules are the gateway's own tests).
    let created = c
        .stage_engine
        .clone()
        .create_work_item(CreateWorkItemRequest {
            tracker_issue_id: issue.id.clone(),
            tracker_project_id: project.id.clone(),
            tracker_sequence_id: 1,
            repo: REPO.into(),
            title: "Add a health endpoint".into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    let key = created.work_item.expect("item").key;
    assert_eq!(key, "ORCH-1");
    reach(c, &key, "blocked").await;
    // The stream bot's comment says how to resume — `:retry:` — and came back as a
    // webhook: never a retry.
    let own = wait_for("the blocked comment back as a webhook", || async {
        plane
            .deliveries()
            .into_iter()
            .find(|d| {
                d.json()["data"]["comment_html"]
                    .as_str()
                    .is_some_and(|h| h.contains("Blocked at"))
            })
            .ok_or_else(|| format!("{:?}", plane.errors()))
    })
    .await;
    let (status, reason) = answer(&Some(own));
    assert_eq!(status, "ignored", "{reason}");
    assert!(
        reason.contains("in a comment the orchestrator posted never retries"),
        "{reason}"
    );

    // A bot the gateway knows: ignored at the door.
    let (_, d) = plane
        .comment(&issue.id, "<p>:retry:</p>", &stream_bot)
        .await;
    let (status, reason) = answer(&d);
    assert_eq!(status, "ignored", "{reason}");
    assert!(reason.contains("by a bot account"), "{reason}");
    // A bot only stage-engine knows: forwarded, and refused there.
    let (_, d) = plane.comment(&issue.id, "<p>:retry:</p>", &ci_bot).await;
    assert_eq!(answer(&d).0, "accepted");
    let inbox_settled = || async {
        let q: Value = reqwest::get(format!("http://{gateway}/queue"))
            .await
            .expect("queue")
            .json()
            .await
            .expect("json");
        if q["inbox"]["pending"] == 0 {
            Ok(q)
        } else {
            Err(q.to_string())
        }
    };
    let q = wait_for("the inbox settled", inbox_settled).await;
    assert_eq!(q["inbox"]["dead"], 0, "{q}");
    assert_eq!(item(c, &key).await.status, "blocked");
    assert_eq!(jobs(c, &key).await.len(), 1);
    assert!(
        !causes(c, &key)
            .await
            .iter()
            .any(|t| t.starts_with("retried by"))
    );

    // A human's: the analyst runs again (and, still broken, parks the item again).
    let (_, d) = plane
        .comment(&issue.id, "<p>Fixed the PATH. :retry:</p>", &ada)
        .await;
    assert_eq!(answer(&d).0, "accepted");
    wait_for("the second analyst job", || async {
        let j = jobs(c, &key).await;
        if j.len() == 2 {
            Ok(())
        } else {
            Err(format!("{j:?}"))
        }
    })
    .await;
    assert!(
        causes(c, &key)
            .await
            .iter()
            .any(|t| t == "retried by ada: the analyst runs analysis again with a fresh budget"),
    );
    let q = wait_for("the inbox settled", inbox_settled).await;
    assert_eq!(q["inbox"]["dead"], 0, "{q}");
    reach(c, &key, "blocked").await;
}

on_both_backends!(
    a_failed_job_parks_and_the_cli_retries_and_cancels,
    a_humans_retry_comment_on_plane_retries_and_a_bots_does_not,
);
