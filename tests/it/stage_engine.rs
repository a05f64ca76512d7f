//! stage-engine over gRPC in the whole stack: a work item walked from analysis to done by
//! a scripted stand-in for the agents, on SQLite and on PostgreSQL — once with the local
//! tracker, once with the fake Plane (`plane.rs`) answering 503 for a while in the middle. The forge is
//! the local one (real bare repositories); the launcher, merge-gate and post-deploy are a
//! fake gRPC server (their real services are built by other issues): Enqueue hands the job
//! to the script, CheckBranchMergeable runs a real `git merge-tree`, Arm is counted.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orchestrator_forge::local::LocalForge;
use orchestrator_forge::{Forge, RepoName};
use orchestrator_git::{Git, MergeTree};
use orchestrator_proto::launcher::v1::launcher_server::{Launcher, LauncherServer};
use orchestrator_proto::launcher::v1::{EnqueueRequest, EnqueueResponse, Job, JobKind, JobStatus};
use orchestrator_proto::merge_gate::v1::merge_gate_server::{MergeGate, MergeGateServer};
use orchestrator_proto::merge_gate::v1::{
    CheckBranchMergeableRequest, CheckBranchMergeableResponse, Mergeability,
};
use orchestrator_proto::post_deploy::v1::post_deploy_server::{PostDeploy, PostDeployServer};
use orchestrator_proto::post_deploy::v1::{ArmRequest, ArmResponse};
use orchestrator_proto::stage_engine::v1::{
    AdvanceOutcome, AdvanceStageRequest, ApproveRequest, CreateWorkItemRequest, GetWorkItemRequest,
    ListCommentsRequest, ListOutboxRequest, ListTransitionsRequest, OnPrMergedRequest, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;
use orchestrator_testkit::{TestStorage, on_both_backends};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use tonic::{Request, Response, Status};

use crate::common::{Stack, contracts_dir, start};
use crate::plane::{ISSUE, PROJECT, Plane, plane_env, serve_plane};

const KEY: &str = "ORCH-65";
const REPO: &str = "acme/app";
const BRANCH: &str = "orch/ORCH-65";

// ---------------------------------------------------------------- the fake peers (gRPC)

#[derive(Clone)]
struct Peers {
    jobs: mpsc::UnboundedSender<EnqueueRequest>,
    /// dedupe_key -> job id: Enqueue is idempotent on it, as the launcher promises.
    by_dedupe: Arc<Mutex<BTreeMap<String, String>>>,
    arms: Arc<Mutex<Vec<ArmRequest>>>,
    forge_dir: std::path::PathBuf,
}

#[tonic::async_trait]
impl Launcher for Peers {
    async fn enqueue(
        &self,
        request: Request<EnqueueRequest>,
    ) -> Result<Response<EnqueueResponse>, Status> {
        let req = request.into_inner();
        let (id, created) = {
            let mut seen = self.by_dedupe.lock().expect("lock");
            match seen.get(&req.dedupe_key) {
                Some(id) => (id.clone(), false),
                None => {
                    let id = format!("job-{}", seen.len() + 1);
                    seen.insert(req.dedupe_key.clone(), id.clone());
                    (id, true)
                }
            }
        };
        if created {
            self.jobs.send(req.clone()).expect("the script listens");
        }
        Ok(Response::new(EnqueueResponse {
            job: Some(Job {
                id,
                work_item: req.work_item,
                agent: req.agent,
                stage: req.stage,
                payload_json: req.payload_json,
                status: JobStatus::Queued as i32,
                attempt: 1,
                ..Job::default()
            }),
            created,
        }))
    }
}

#[tonic::async_trait]
impl MergeGate for Peers {
    async fn check_branch_mergeable(
        &self,
        request: Request<CheckBranchMergeableRequest>,
    ) -> Result<Response<CheckBranchMergeableResponse>, Status> {
        let r = request.into_inner();
        let repo = RepoName::parse(&r.repo).map_err(|e| Status::invalid_argument(e.to_string()))?;
        let dir = LocalForge::new(self.forge_dir.clone(), "main".into()).repo_dir(&repo);
        let base = if r.base.is_empty() {
            "main".to_owned()
        } else {
            r.base
        };
        let out = Git::new()
            .merge_tree(
                &dir,
                &format!("refs/heads/{base}"),
                &format!("refs/heads/{}", r.branch),
            )
            .await;
        let mut resp = CheckBranchMergeableResponse::default();
        match out {
            Ok(MergeTree::Clean { .. }) => resp.set_mergeability(Mergeability::Mergeable),
            Ok(MergeTree::Conflicts { files, .. }) => {
                resp.set_mergeability(Mergeability::Conflicts);
                resp.conflicting_files = files;
            }
            Err(e) => {
                resp.set_mergeability(Mergeability::Error);
                resp.error = e.to_string();
            }
        }
        Ok(Response::new(resp))
    }
}

#[tonic::async_trait]
impl PostDeploy for Peers {
    async fn arm(&self, request: Request<ArmRequest>) -> Result<Response<ArmResponse>, Status> {
        let mut arms = self.arms.lock().expect("lock");
        let created = arms.is_empty();
        arms.push(request.into_inner());
        Ok(Response::new(ArmResponse {
            armed: true,
            created,
            ..ArmResponse::default()
        }))
    }
}

async fn serve_peers(peers: Peers) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(LauncherServer::new(peers.clone()))
            .add_service(MergeGateServer::new(peers.clone()))
            .add_service(PostDeployServer::new(peers))
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    format!("http://{addr}")
}

// ---------------------------------------------------------------- the scripted agents

/// Commits `files` on the work item's branch (created from main when new) and pushes.
async fn push(bare: &std::path::Path, files: &[(String, String)]) {
    let git = Git::new();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    git.ok(w, &["clone", "-q", &bare.display().to_string(), "."])
        .await
        .expect("clone");
    if git
        .rev_parse(w, &format!("origin/{BRANCH}"))
        .await
        .expect("rev-parse")
        .is_some()
    {
        git.ok(w, &["checkout", "-q", BRANCH])
            .await
            .expect("checkout");
    } else {
        git.ok(w, &["checkout", "-q", "-b", BRANCH])
            .await
            .expect("checkout -b");
    }
    for (path, text) in files {
        let p = w.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        git.ok(w, &["add", path]).await.expect("add");
    }
    git.ok(
        w,
        &[
            "-c",
            "user.name=agent",
            "-c",
            "user.email=agent@example.com",
            "commit",
            "-q",
            "-m",
            "agent",
        ],
    )
    .await
    .expect("commit");
    git.ok(w, &["push", "-q", "origin", BRANCH])
        .await
        .expect("push");
}

fn artifact(name: &str, fields: &str) -> (String, String) {
    (
        format!("docs/work-items/{KEY}/{name}"),
        format!("---\nwork_item: {KEY}\n{fields}---\n# {name}\n\nWritten by the scripted agent.\n"),
    )
}

/// What each agent writes, by (agent, stage, how often it ran before).
fn script(agent: &str, stage: &str, runs_before: usize) -> Vec<(String, String)> {
    match (agent, stage) {
        ("analyst", _) => vec![artifact("analysis.md", "")],
        ("architect", _) => vec![artifact("architecture.md", "")],
        ("developer", _) => vec![
            artifact("development.md", ""),
            (
                format!("src/feature_{runs_before}.rs"),
                "pub fn f() {}\n".to_owned(),
            ),
        ],
        // The first review asks for changes: one rollback to development.
        ("reviewer", _) if runs_before == 0 => {
            vec![artifact("review.md", "review_verdict: CHANGES_REQUESTED\n")]
        }
        ("reviewer", _) => vec![artifact("review.md", "review_verdict: APPROVED\n")],
        ("tester", _) => vec![artifact("test-report.md", "test_status: PASSED\n")],
        ("deployer", "deploy-staging") => vec![artifact("staging.md", "staging_status: SUCCESS\n")],
        ("deployer", "deploy") => vec![artifact(
            "deploy.md",
            "deploy_status: SUCCESS\ndeployed_sha: 0123456789abcdef\n",
        )],
        other => panic!("no script for {other:?}"),
    }
}

async fn work_item(stack: &Stack) -> WorkItem {
    stack
        .clients
        .stage_engine
        .clone()
        .get_work_item(GetWorkItemRequest { key: KEY.into() })
        .await
        .expect("get")
        .into_inner()
}

struct Walk {
    enqueued: Vec<(String, String)>,
}

/// Runs the scripted agents on every job the launcher receives until the item is done.
/// `on_job` is called before each job runs (the Plane test switches its outage there).
async fn walk(
    stack: &Stack,
    jobs: &mut mpsc::UnboundedReceiver<EnqueueRequest>,
    bare: &std::path::Path,
    forge: &LocalForge,
    mut on_job: impl FnMut(&str, &str, usize),
) -> Walk {
    let mut se = stack.clients.stage_engine.clone();
    let mut ledger = stack.clients.usage_ledger.clone();
    let output = std::fs::read_to_string(
        contracts_dir().join("claude-cli/real-2.1.328/success-with-write-tool.stdout.json"),
    )
    .expect("cli sample");
    let repo = RepoName::parse(REPO).expect("repo");
    let mut runs: BTreeMap<String, usize> = BTreeMap::new();
    let mut enqueued = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let job = tokio::time::timeout(Duration::from_secs(30), jobs.recv())
            .await
            .expect("the next job is enqueued in time")
            .expect("the launcher is up");
        assert!(Instant::now() < deadline, "the walk takes too long");
        let payload: Value = serde_json::from_str(&job.payload_json).expect("payload");
        assert_eq!(
            (payload["work_item"].as_str(), payload["branch"].as_str()),
            (Some(KEY), Some(BRANCH))
        );
        assert_eq!(
            payload["artifacts_dir"].as_str(),
            Some("docs/work-items/ORCH-65")
        );
        let before = *runs.get(&job.agent).unwrap_or(&0);
        runs.insert(job.agent.clone(), before + 1);
        enqueued.push((job.agent.clone(), job.stage.clone()));
        on_job(&job.agent, &job.stage, before);

        push(bare, &script(&job.agent, &job.stage, before)).await;
        if job.agent == "developer" {
            forge
                .ensure_pr(&repo, BRANCH, "main", KEY, "")
                .await
                .expect("ensure PR");
        }
        let job_id = stack
            .clients
            .stage_engine
            .clone()
            .get_work_item(GetWorkItemRequest { key: KEY.into() })
            .await
            .expect("get")
            .into_inner()
            .latest_job_id;
        let job_id = if job_id.is_empty() {
            format!("job-{}", enqueued.len())
        } else {
            job_id
        };
        ledger
            .record_run(RecordRunRequest {
                job_id: job_id.clone(),
                attempt: 1,
                work_item: KEY.into(),
                agent: job.agent.clone(),
                output: output.clone(),
                ..Default::default()
            })
            .await
            .expect("record run");
        let advance = || AdvanceStageRequest {
            work_item: KEY.into(),
            finished_agent: job.agent.clone(),
            job_id: job_id.clone(),
            attempt: 1,
            dedupe_key: job.dedupe_key.clone(),
            ..Default::default()
        };
        let r = se
            .advance_stage(advance())
            .await
            .expect("advance")
            .into_inner();
        // The launcher and the reaper may both report the same finish: nothing changes.
        let again = se
            .advance_stage(advance())
            .await
            .expect("advance again")
            .into_inner();
        assert_eq!(
            again.outcome(),
            AdvanceOutcome::Unchanged,
            "{}",
            again.reason
        );

        match r.outcome() {
            AdvanceOutcome::AwaitingApproval => {
                // A bot's :approved: never counts; a human's does.
                let bot = se
                    .approve(ApproveRequest {
                        work_item: KEY.into(),
                        author: "reviewer".into(),
                        comment_id: "c-bot".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("bot approve")
                    .into_inner();
                assert_eq!(bot.outcome(), AdvanceOutcome::Unchanged);
                let human = se
                    .approve(ApproveRequest {
                        work_item: KEY.into(),
                        author: "ada".into(),
                        comment_id: "c-ada".into(),
                        ..Default::default()
                    })
                    .await
                    .expect("approve")
                    .into_inner();
                assert_eq!(
                    human.outcome(),
                    AdvanceOutcome::Advanced,
                    "{}",
                    human.reason
                );
            }
            AdvanceOutcome::Done => break,
            AdvanceOutcome::Advanced | AdvanceOutcome::RolledBack => {}
            other => panic!("{} at {}: {other:?}: {}", job.agent, job.stage, r.reason),
        }
    }
    Walk { enqueued }
}

/// Polls until every outbox entry of the work item is delivered.
async fn outbox_drained(stack: &Stack) -> Vec<orchestrator_proto::stage_engine::v1::OutboxEntry> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let entries = stack
            .clients
            .stage_engine
            .clone()
            .list_outbox(ListOutboxRequest {
                work_item: KEY.into(),
                state: String::new(),
                limit: 1000,
            })
            .await
            .expect("outbox")
            .into_inner()
            .entries;
        if entries.iter().all(|e| e.state == "delivered") {
            return entries;
        }
        assert!(
            Instant::now() < deadline,
            "outbox not drained: {:?}",
            entries
                .iter()
                .filter(|e| e.state != "delivered")
                .map(|e| (&e.kind, &e.state, &e.last_error))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

const EXPECTED_JOBS: &[(&str, &str)] = &[
    ("analyst", "analysis"),
    ("architect", "architecture"),
    ("developer", "development"),
    ("reviewer", "review"),
    ("developer", "development"),
    ("reviewer", "review"),
    ("tester", "testing"),
    ("deployer", "deploy-staging"),
    ("deployer", "deploy"),
];

const EXPECTED_STAGES: &[(&str, &str)] = &[
    ("", "analysis"),
    ("analysis", "analysis"),
    ("analysis", "architecture"),
    ("architecture", "development"),
    ("development", "review"),
    ("review", "development"),
    ("development", "review"),
    ("review", "testing"),
    ("testing", "deploy-staging"),
    ("deploy-staging", "deploy"),
    ("deploy", "done"),
];

struct Setup {
    stack: Stack,
    jobs: mpsc::UnboundedReceiver<EnqueueRequest>,
    peers: Peers,
    bare: std::path::PathBuf,
    forge: LocalForge,
    _dir: tempfile::TempDir,
}

async fn setup(storage: TestStorage, extra: &[(&str, &str)]) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let forge_dir = dir.path().join("forge");
    let forge = LocalForge::new(forge_dir.clone(), "main".into());
    let bare = forge
        .init_repo(&RepoName::parse(REPO).expect("repo"))
        .await
        .expect("init repo");
    let (tx, jobs) = mpsc::unbounded_channel();
    let peers = Peers {
        jobs: tx,
        by_dedupe: Arc::default(),
        arms: Arc::default(),
        forge_dir: forge_dir.clone(),
    };
    let peers_url = serve_peers(peers.clone()).await;
    let forge_dir_s = forge_dir.display().to_string();
    let mut env: Vec<(&str, &str)> = vec![
        ("ORCH_LAUNCHER_URL", &peers_url),
        ("ORCH_MERGE_GATE_URL", &peers_url),
        ("ORCH_POST_DEPLOY_URL", &peers_url),
        ("ORCH_FORGE", "local"),
        ("ORCH_FORGE_LOCAL_DIR", &forge_dir_s),
        ("ORCH_OUTBOX_POLL_MS", "50"),
        ("ORCH_OUTBOX_BACKOFF_BASE_MS", "20"),
        ("ORCH_OUTBOX_BACKOFF_MAX_MS", "200"),
    ];
    env.extend_from_slice(extra);
    let stack = start(storage, &env).await;
    Setup {
        stack,
        jobs,
        peers,
        bare,
        forge,
        _dir: dir,
    }
}

async fn create(stack: &Stack, project: &str, issue: &str) {
    let r = stack
        .clients
        .stage_engine
        .clone()
        .create_work_item(CreateWorkItemRequest {
            tracker_issue_id: issue.into(),
            key: KEY.into(),
            title: "Wire up the merge webhook".into(),
            description: "From the tracker.".into(),
            repo: REPO.into(),
            branch: String::new(),
            tracker_project_id: project.into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner();
    assert!(r.created);
    let item = r.work_item.expect("item");
    assert_eq!(
        (
            item.stage.as_str(),
            item.status.as_str(),
            item.branch.as_str()
        ),
        ("analysis", "active", BRANCH)
    );
}

/// The checks every walk ends with: the right jobs once each, the right transitions, every
/// side effect delivered once, Arm once.
async fn check_the_end(
    s: &mut Setup,
    walk: &Walk,
) -> Vec<orchestrator_proto::stage_engine::v1::OutboxEntry> {
    let got: Vec<(&str, &str)> = walk
        .enqueued
        .iter()
        .map(|(a, st)| (a.as_str(), st.as_str()))
        .collect();
    assert_eq!(got, EXPECTED_JOBS);
    let item = work_item(&s.stack).await;
    assert_eq!(
        (
            item.stage.as_str(),
            item.status.as_str(),
            item.rollback_count
        ),
        ("done", "done", 1)
    );
    let transitions = s
        .stack
        .clients
        .stage_engine
        .clone()
        .list_transitions(ListTransitionsRequest {
            work_item: KEY.into(),
        })
        .await
        .expect("transitions")
        .into_inner()
        .transitions;
    let stages: Vec<(&str, &str)> = transitions
        .iter()
        .map(|t| (t.from_stage.as_str(), t.to_stage.as_str()))
        .collect();
    assert_eq!(stages, EXPECTED_STAGES);
    let dev = transitions
        .iter()
        .find(|t| t.from_stage == "development")
        .expect("development passed");
    let checks: Vec<(&str, bool)> = dev
        .qg_results
        .iter()
        .map(|q| (q.check.as_str(), q.passed))
        .collect();
    assert_eq!(
        checks,
        vec![
            ("check_development_notes", true),
            ("check_pr_exists", true),
            ("check_branch_mergeable", true)
        ]
    );
    let rollback = &transitions[5];
    assert!(
        rollback.cause.contains("the reviewer asked for changes"),
        "{}",
        rollback.cause
    );

    let entries = outbox_drained(&s.stack).await;
    let count = |kind: &str| entries.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count("enqueue"), EXPECTED_JOBS.len());
    assert_eq!(count("comment"), EXPECTED_STAGES.len());
    assert_eq!(
        (
            count("set_state_done"),
            count("usage_summary"),
            count("arm_watch")
        ),
        (1, 1, 1)
    );
    // deploy -> done enqueued the deploy-finalizer (stage-engine's, pinned to the deployer's
    // PR) and, once armed, the watch's monitor (reserved jobs; their channels do not wait
    // for each other); redelivered enqueues (if any) made no second job.
    assert_eq!(count("enqueue_reserved"), 1);
    let mut reserved: Vec<_> = [s.jobs.try_recv(), s.jobs.try_recv()]
        .into_iter()
        .map(|j| j.expect("two reserved jobs were enqueued"))
        .collect();
    reserved.sort_by(|a, b| a.agent.cmp(&b.agent));
    assert_eq!(
        reserved
            .iter()
            .map(|j| (j.agent.as_str(), j.kind(), j.work_item.as_str()))
            .collect::<Vec<_>>(),
        vec![
            ("deploy-finalizer", JobKind::Reserved, KEY),
            ("post-deploy-monitor", JobKind::Reserved, KEY)
        ]
    );
    let finalizer: serde_json::Value =
        serde_json::from_str(&reserved[0].payload_json).expect("payload");
    assert!(
        finalizer["pr_number"].as_u64().is_some_and(|n| n > 0)
            && finalizer["tested_head_sha"]
                .as_str()
                .is_some_and(|s| !s.is_empty()),
        "{finalizer}"
    );
    assert!(s.jobs.is_empty());
    let arms = s.peers.arms.lock().expect("lock").clone();
    assert_eq!(arms.len(), 1);
    assert_eq!(
        (
            arms[0].work_item.as_str(),
            arms[0].repo.as_str(),
            arms[0].deployed_sha.as_str()
        ),
        (KEY, REPO, "0123456789abcdef")
    );

    // After done, a merge event (the deploy-finalizer's) changes nothing.
    let r = s
        .stack
        .clients
        .stage_engine
        .clone()
        .on_pr_merged(OnPrMergedRequest {
            repo: REPO.into(),
            branch: BRANCH.into(),
            pr_number: 1,
            merge_sha: "x".into(),
        })
        .await
        .expect("merged")
        .into_inner();
    assert_eq!(r.outcome(), AdvanceOutcome::Unchanged);
    entries
}

async fn comments(stack: &Stack) -> Vec<orchestrator_proto::stage_engine::v1::Comment> {
    stack
        .clients
        .stage_engine
        .clone()
        .list_comments(ListCommentsRequest {
            work_item: KEY.into(),
        })
        .await
        .expect("comments")
        .into_inner()
        .comments
}

/// The walk with the local tracker.
async fn walk_from_analysis_to_done(storage: TestStorage) {
    let mut s = setup(storage, &[]).await;
    create(&s.stack, "", KEY).await;
    let walk = walk(&s.stack, &mut s.jobs, &s.bare, &s.forge, |_, _, _| {}).await;
    let entries = check_the_end(&mut s, &walk).await;
    let comments = comments(&s.stack).await;
    assert_eq!(
        comments.len(),
        entries
            .iter()
            .filter(|e| e.kind == "comment" || e.kind == "usage_summary")
            .count()
    );
    assert!(comments.iter().all(|c| c.author == "stream"));
    assert!(comments.iter().any(|c| c.html.contains(":approved:")));
    let summary = comments.last().expect("summary");
    assert!(
        summary.html.contains("Usage for ORCH-65") && summary.html.contains("Total · 9 runs"),
        "{}",
        summary.html
    );
}

/// The walk with Plane answering 503 from the first development run until the second
/// review: the transitions stand, the comments wait in the outbox and go out afterwards,
/// in order, each exactly once — including the one whose answer was lost.
async fn walk_with_plane_down_for_a_while(storage: TestStorage) {
    let p = Arc::new(Plane::default());
    let plane_url = serve_plane(p.clone()).await;
    let env = plane_env(&plane_url);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let mut s = setup(storage, &env).await;
    create(&s.stack, PROJECT, ISSUE).await;
    let outage = p.clone();
    let walk = walk(
        &s.stack,
        &mut s.jobs,
        &s.bare,
        &s.forge,
        move |agent, _stage, before| {
            if agent == "developer" && before == 0 {
                *outage.outage.lock().expect("lock") = true;
            }
            if agent == "tester" {
                *outage.outage.lock().expect("lock") = false;
            }
        },
    )
    .await;
    assert!(
        *p.answered_503.lock().expect("lock") > 0,
        "Plane was never down"
    );
    let entries = check_the_end(&mut s, &walk).await;
    let errors = p.errors.lock().expect("lock").clone();
    assert!(errors.is_empty(), "{errors:#?}");
    // Every comment entry reached Plane exactly once, keyed by its outbox id, in order.
    let comment_ids: Vec<String> = entries
        .iter()
        .filter(|e| e.kind == "comment" || e.kind == "usage_summary")
        .map(|e| e.id.clone())
        .collect();
    let posted: Vec<String> = p
        .comments
        .lock()
        .expect("lock")
        .iter()
        .map(|(e, _)| e.clone())
        .collect();
    assert_eq!(posted, comment_ids);
    let created = p.created_201.lock().expect("lock").clone();
    assert!(created.values().all(|n| *n == 1), "{created:?}");
    // The comment stored while its answer was lost came back as 409: counted as posted.
    assert!(*p.lost_one.lock().expect("lock"));
    assert_eq!(*p.answered_409.lock().expect("lock"), 1);
    // Done once, to the Done state of the contract sample.
    assert_eq!(
        p.state_patches.lock().expect("lock").clone(),
        vec!["3a8f5dbf-9e4c-4f6a-8b5d-4e7f8091a2b3".to_owned()]
    );
    let retried = entries.iter().filter(|e| e.attempts > 1).count();
    assert!(retried > 0, "no entry needed a retry");
    // ListComments reads Plane back.
    assert_eq!(comments(&s.stack).await.len(), comment_ids.len());
}

on_both_backends!(walk_from_analysis_to_done, walk_with_plane_down_for_a_while);

/// `orchestrator qg-hook` as the CLI runs it: the hook input of the contract sample on
/// stdin (its `cwd` pointed at a checkout), exit 2 with what is missing, then 0.
#[test]
fn qg_hook_blocks_the_agent_until_its_artifact_is_there() {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let checkout = tempfile::tempdir().expect("tempdir");
    let state = tempfile::tempdir().expect("tempdir");
    let mut input: Value = serde_json::from_str(
        &std::fs::read_to_string(
            contracts_dir().join("claude-cli/real-2.1.328/stop-hook-input.json"),
        )
        .expect("sample"),
    )
    .expect("json");
    input["cwd"] = json!(checkout.path());
    let run = || {
        let mut child = Command::new(env!("CARGO_BIN_EXE_orchestrator"))
            .args([
                "qg-hook",
                "--work-item",
                KEY,
                "--stage",
                "testing",
                "--state-file",
            ])
            .arg(state.path().join("blocks"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(input.to_string().as_bytes())
            .expect("write");
        let out = child.wait_with_output().expect("wait");
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, stderr) = run();
    assert_eq!(code, Some(2), "{stderr}");
    assert!(
        stderr.contains("check_test_status") && stderr.contains("test-report.md is missing"),
        "{stderr}"
    );
    let (path, text) = artifact("test-report.md", "test_status: PASSED\n");
    let p = checkout.path().join(path);
    std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
    std::fs::write(p, text).expect("write");
    let (code, stderr) = run();
    assert_eq!(code, Some(0), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
}
