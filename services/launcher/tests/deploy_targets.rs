//! Deploy targets (`ORCH_DEPLOY_TARGETS_JSON`): after the deployer's run the launcher runs
//! the repo's real staging or deploy command in the job's checkout and writes the
//! artifact's status and shas from what the command did — whatever the agent claimed.
//! Real processes, a real bare repository; the agent is a script that claims SUCCESS.

mod common;

use std::time::Duration;

use common::{H, KEY, REPO};
use launcher::store::Status;
use orchestrator_forge::{Forge, RepoName};
use orchestrator_testkit::TestStorage;

const SECS: Duration = Duration::from_secs(30);

/// A deployer that commits a change (the work to deploy), then writes an artifact that
/// claims a success and makes up a sha.
const DEPLOYER: &str = r#"echo v2 > app.txt && git add app.txt && git -c user.name=t -c user.email=t@t.invalid commit -qm v2
for f in staging deploy; do
mkdir -p "docs/work-items/$ORCH_WORK_ITEM"
printf -- '---\nwork_item: %s\nauthor: deployer\nstaging_status: SUCCESS\ndeploy_status: SUCCESS\ndeployed_sha: made-up\n---\n# Notes\n\nThe agent body.\n' "$ORCH_WORK_ITEM" > "docs/work-items/$ORCH_WORK_ITEM/$f.md"
done
cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json"#;

const PAYLOAD: &str = r#"{"title":"Ship it","artifacts_dir":"docs/work-items/ORCH-1"}"#;

async fn start(targets: &str) -> H {
    H::start(
        TestStorage::sqlite(),
        DEPLOYER,
        &[
            ("ORCH_DEPLOY_TARGETS_JSON", targets),
            ("ORCH_DEPLOY_LEASE_ENABLED", "false"),
        ],
    )
    .await
}

async fn artifact(h: &H, name: &str) -> String {
    h.forge
        .read_file(
            &RepoName::parse(REPO).expect("repo"),
            &format!("orch/{KEY}"),
            &format!("docs/work-items/{KEY}/{name}"),
        )
        .await
        .expect("read")
        .expect("the artifact is on the branch")
}

fn field<'a>(text: &'a str, key: &str) -> &'a str {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}: ")))
        .unwrap_or_default()
}

fn is_sha(s: &str) -> bool {
    s.len() == 40 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_deploy_command_deploys_the_head_and_the_orchestrator_writes_the_shas() {
    let dir = tempfile::tempdir().expect("prod");
    let prod = dir.path().display().to_string();
    // The deploy command: a real script that "deploys" by recording its argv in prod/.
    let ship = dir.path().join("ship.sh");
    std::fs::write(
        &ship,
        "printf '%s\\n' \"$@\" > \"$(dirname \"$0\")/argv\"; cp app.txt \"$(dirname \"$0\")/\"; echo shipped $1\n",
    )
    .expect("ship");
    let targets = serde_json::json!({
        REPO: {"deploy_command": ["sh", ship.display().to_string(), "{sha}", "{previous_sha}", "{repo}", "{work_item}"]}
    })
    .to_string();
    let h = start(&targets).await;
    let job = h.enqueue("deployer", "deploy", PAYLOAD).await;
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Succeeded, "{done:#?}");

    let text = artifact(&h, "deploy.md").await;
    let (deployed, previous) = (field(&text, "deployed_sha"), field(&text, "previous_sha"));
    assert_eq!(field(&text, "deploy_status"), "SUCCESS", "{text}");
    assert!(
        is_sha(deployed) && is_sha(previous) && deployed != previous,
        "{text}"
    );
    // What production got is what the artifact says, passed as argv.
    let argv = std::fs::read_to_string(format!("{prod}/argv")).expect("the command ran");
    assert_eq!(argv, format!("{deployed}\n{previous}\n{REPO}\n{KEY}\n"));
    assert_eq!(
        std::fs::read_to_string(format!("{prod}/app.txt")).expect("deployed"),
        "v2\n"
    );
    assert!(text.contains("The agent body.") && text.contains(&format!("shipped {deployed}")));
    assert!(
        text.contains("author: deployer") && !text.contains("made-up"),
        "{text}"
    );
    // The finish comment says what ran.
    h.outbox_drained().await;
    h.peers.with(|s| {
        assert!(
            s.comments.iter().any(|c| c.html.contains("deploy_command")
                && c.html.contains(deployed)
                && c.html.contains("exit 0")),
            "{:?}",
            s.comments
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_or_hanging_command_is_failed_whatever_the_agent_said() {
    let targets = serde_json::json!({
        REPO: {
            "staging_command": ["sh", "-c", "echo hanging; sleep 300"],
            "deploy_command": ["sh", "-c", "echo disk full >&2; exit 4"],
            "timeout_s": 1
        }
    })
    .to_string();
    let h = start(&targets).await;
    let job = h.enqueue("deployer", "deploy-staging", PAYLOAD).await;
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Succeeded, "{done:#?}");
    let text = artifact(&h, "staging.md").await;
    assert_eq!(field(&text, "staging_status"), "FAILED", "{text}");
    assert!(
        text.contains("killed after its timeout") && text.contains("hanging"),
        "{text}"
    );

    let job = h.enqueue("deployer", "deploy", PAYLOAD).await;
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Succeeded, "{done:#?}");
    let text = artifact(&h, "deploy.md").await;
    assert_eq!(field(&text, "deploy_status"), "FAILED", "{text}");
    assert!(
        text.contains("exit 4") && text.contains("disk full"),
        "{text}"
    );
}

/// A repo without a target — `ORCH_DEPLOY_TARGETS_JSON` set without it, or unset — gets
/// "no deploy target for <repo>" in its artifact (delivered) and a job failed for good,
/// which parks the work item blocked (stage-engine), never a SUCCESS nor a rollback loop.
async fn without_a_target(h: &H, why: &str) {
    let job = h.enqueue("deployer", "deploy", PAYLOAD).await;
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Failed, "{done:#?}");
    assert_eq!(done.outcome, "no_deploy_target", "{done:#?}");
    assert!(
        done.reason.contains("no deploy target for acme/app") && done.reason.contains(why),
        "{done:#?}"
    );
    let text = artifact(h, "deploy.md").await;
    assert_eq!(field(&text, "deploy_status"), "FAILED", "{text}");
    assert!(
        text.contains("no deploy target for acme/app") && text.contains(why),
        "{text}"
    );
    assert!(!text.contains("deployed_sha"), "{text}");
    h.outbox_drained().await;
    h.peers.with(|s| {
        let f = s
            .failures_reported
            .iter()
            .find(|f| f.job_id == job.id)
            .unwrap_or_else(|| panic!("no failure reported: {:?}", s.failures_reported));
        assert_eq!(f.outcome, "no_deploy_target");
        assert!(
            s.comments
                .iter()
                .any(|c| c.html.contains("no deploy target for acme/app")),
            "{:?}",
            s.comments
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repo_without_a_target_is_said_plainly_never_a_success() {
    let h = start(r#"{"acme/other":{"deploy_command":"true"}}"#).await;
    without_a_target(&h, "ORCH_DEPLOY_TARGETS_JSON has no target for it").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_deploy_targets_at_all_is_no_success_either() {
    let h = H::start(
        TestStorage::sqlite(),
        DEPLOYER,
        &[("ORCH_DEPLOY_LEASE_ENABLED", "false")],
    )
    .await;
    without_a_target(&h, "ORCH_DEPLOY_TARGETS_JSON is not set").await;
}
