//! `orchestrator staging-check` as an operator runs it: against a real stack, and against a
//! stack whose gateway and sandbox-facing services are test doubles (real gRPC and HTTP
//! servers on loopback) so that each check can be made to pass or fail.

use std::path::Path;
use std::sync::{Arc, Mutex};

use orchestrator_kit::ServiceName;
use orchestrator_kit::config::url_var;
use orchestrator_proto::launcher::v1::launcher_server::{Launcher, LauncherServer};
use orchestrator_proto::launcher::v1::{Job, JobStatus, ListJobsRequest, ListJobsResponse};
use orchestrator_proto::merge_gate::v1::merge_gate_server::{MergeGate, MergeGateServer};
use orchestrator_proto::merge_gate::v1::{
    CheckBranchMergeableRequest, CheckBranchMergeableResponse, Mergeability,
};
use orchestrator_proto::stage_engine::v1::stage_engine_server::{StageEngine, StageEngineServer};
use orchestrator_proto::stage_engine::v1::{GetWorkItemRequest, WorkItem};
use orchestrator_testkit::{TestStorage, on_both_backends};
use tokio::net::TcpListener;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::{Request, Response, Status};

use crate::common::{Stack, start};

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");

/// What the sandbox looks like to the doubles.
#[derive(Debug, Clone, Copy)]
struct SandboxState {
    branch_exists: bool,
    analyst_launched: bool,
}

#[derive(Clone)]
struct Doubles(Arc<Mutex<SandboxState>>);

impl Doubles {
    fn state(&self) -> SandboxState {
        *self.0.lock().expect("lock")
    }
}

#[tonic::async_trait]
impl StageEngine for Doubles {
    async fn get_work_item(
        &self,
        request: Request<GetWorkItemRequest>,
    ) -> Result<Response<WorkItem>, Status> {
        if request.get_ref().key != "SANDBOX-1" {
            return Err(Status::not_found("no such work item"));
        }
        Ok(Response::new(WorkItem {
            key: "SANDBOX-1".into(),
            repo: "sandbox/app".into(),
            branch: "orch/SANDBOX-1".into(),
            stage: "analysis".into(),
            ..Default::default()
        }))
    }
}

#[tonic::async_trait]
impl MergeGate for Doubles {
    async fn check_branch_mergeable(
        &self,
        request: Request<CheckBranchMergeableRequest>,
    ) -> Result<Response<CheckBranchMergeableResponse>, Status> {
        assert_eq!(request.get_ref().branch, "orch/SANDBOX-1");
        Ok(Response::new(if self.state().branch_exists {
            CheckBranchMergeableResponse {
                mergeability: Mergeability::Mergeable.into(),
                head_sha: "abc1234".into(),
                base_sha: "def5678".into(),
                ..Default::default()
            }
        } else {
            CheckBranchMergeableResponse {
                mergeability: Mergeability::Error.into(),
                error: "branch orch/SANDBOX-1 not found".into(),
                ..Default::default()
            }
        }))
    }
}

#[tonic::async_trait]
impl Launcher for Doubles {
    async fn list_jobs(
        &self,
        request: Request<ListJobsRequest>,
    ) -> Result<Response<ListJobsResponse>, Status> {
        assert_eq!(request.get_ref().agent, "analyst");
        let launched = self.state().analyst_launched;
        Ok(Response::new(ListJobsResponse {
            jobs: vec![Job {
                id: "job-1".into(),
                work_item: "SANDBOX-1".into(),
                agent: "analyst".into(),
                status: if launched {
                    JobStatus::Succeeded
                } else {
                    JobStatus::Queued
                }
                .into(),
                started_at_ms: if launched { 1 } else { 0 },
                ..Default::default()
            }],
        }))
    }
}

/// Serves `routes` with a SERVING health for `service`, as our services do; returns its URL.
async fn serve_double(service: ServiceName, routes: tonic::service::Routes) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter
        .set_service_status(
            service.grpc_name().expect("grpc"),
            tonic_health::ServingStatus::Serving,
        )
        .await;
    tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_routes(routes)
            .add_service(health)
            .serve_with_incoming(TcpListenerStream::new(listener))
            .await
    });
    url
}

/// A gateway double that has `GET /queue`.
async fn gateway_double() -> String {
    let app = axum::Router::new()
        .route(
            "/healthz",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
        )
        .route(
            "/queue",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"jobs": []})) }),
        );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// A gateway that lost `GET /queue` (404): a REAL failure, never waived.
async fn gateway_without_queue() -> String {
    let app = axum::Router::new().route(
        "/healthz",
        axum::routing::get(|| async { axum::Json(serde_json::json!({"status": "ok"})) }),
    );
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    url
}

/// The variables that point the command at `stack`.
fn stack_env(stack: &Stack) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ServiceName::ALL
        .into_iter()
        .map(|s| (url_var(s), stack.config.url(s).to_owned()))
        .collect();
    env.push((
        "ORCH_DATA_DIR".into(),
        stack.config.data_dir.display().to_string(),
    ));
    if let Some(url) = &stack.config.database_url {
        env.push(("ORCH_DATABASE_URL".into(), url.expose().to_owned()));
    }
    env.push(("ORCH_STAGING_CHECK_TIMEOUT_MS".into(), "5000".into()));
    env
}

fn set(env: &mut Vec<(String, String)>, name: &str, value: &str) {
    env.retain(|(k, _)| k != name);
    env.push((name.to_owned(), value.to_owned()));
}

/// Runs `orchestrator staging-check ARGS` with exactly `env`; returns (exit code, stdout lines).
async fn staging_check(env: &[(String, String)], args: &[&str], cwd: &Path) -> (i32, Vec<String>) {
    let out = tokio::process::Command::new(BIN)
        .arg("staging-check")
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("ORCH_LOG", "warn")
        .current_dir(cwd)
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .expect("runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    (
        out.status.code().unwrap_or(-1),
        stdout.lines().map(str::to_owned).collect(),
    )
}

/// The line that reports check `id`.
fn line<'a>(lines: &'a [String], id: &str) -> &'a str {
    lines
        .iter()
        .find(|l| l.split_whitespace().nth(1) == Some(id))
        .unwrap_or_else(|| panic!("no line for {id} in {lines:#?}"))
}

fn frontmatter(path: &Path) -> String {
    let text = std::fs::read_to_string(path).expect("artifact");
    let end = text[4..].find("\n---").expect("closing") + 4;
    text[..end].to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn against_the_real_stack_a_missing_queue_fails_the_verdict() {
    let stack = start(TestStorage::sqlite(), &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let artifact = dir.path().join("staging.md");
    let mut env = stack_env(&stack);
    // The real gateway serves /queue now; a stand-in without it keeps a REAL failure here.
    let no_queue = gateway_without_queue().await;
    set(&mut env, "ORCH_GATEWAY_URL", &no_queue);
    let (code, lines) = staging_check(
        &env,
        &["--artifact", &artifact.display().to_string()],
        dir.path(),
    )
    .await;
    assert_eq!(code, 1, "{lines:#?}");
    assert_eq!(
        lines[0],
        "MODE: tolerant (sandbox-infra failures C9a, C9b are waived)"
    );
    assert!(line(&lines, "C1").starts_with("PASS C1 [real] every service SERVING: SERVING: usage-ledger, merge-gate, post-deploy, launcher, stage-engine, reaper"), "{lines:#?}");
    assert!(
        line(&lines, "C2").starts_with("PASS C2 [real] gateway /healthz"),
        "{lines:#?}"
    );
    assert!(
        line(&lines, "C3").starts_with("FAIL C3 [real] gateway GET /queue:")
            && line(&lines, "C3").ends_with("/queue answered 404 Not Found"),
        "{lines:#?}"
    );
    assert!(
        line(&lines, "C4").starts_with("PASS C4 [real] migrations applied"),
        "{lines:#?}"
    );
    assert!(
        line(&lines, "C9a")
            .starts_with("FAIL C9a [sandbox_infra] sandbox branch exists: no sandbox work item"),
        "{lines:#?}"
    );
    assert!(
        line(&lines, "C9b").starts_with("FAIL C9b [sandbox_infra]"),
        "{lines:#?}"
    );
    assert_eq!(lines[lines.len() - 2], "INFRA-WAIVED: none");
    assert_eq!(lines[lines.len() - 1], "VERDICT: FAILED");
    assert!(frontmatter(&artifact).contains("staging_status: FAILED"));

    // The sandbox named, the stack's stage-engine cannot answer yet: an internal error,
    // which is never waived.
    let gateway = gateway_double().await;
    set(&mut env, "ORCH_GATEWAY_URL", &gateway);
    set(&mut env, "ORCH_STAGING_SANDBOX_WORK_ITEM", "SANDBOX-1");
    let (code, lines) = staging_check(&env, &[], dir.path()).await;
    assert!(line(&lines, "C3").starts_with("PASS C3"), "{lines:#?}");
    // stage-engine answers now: the sandbox work item is simply missing, a waivable failure.
    assert!(
        line(&lines, "C9a").starts_with(
            "FAIL C9a [sandbox_infra] sandbox branch exists: the sandbox work item SANDBOX-1 does not exist"
        ),
        "{lines:#?}"
    );
    // C9b is ERROR while the launcher answers UNIMPLEMENTED (never waived), FAIL once it
    // answers (waived when tolerant): the verdict follows from the lines either way.
    let has_error = lines.iter().any(|l| l.starts_with("ERROR "));
    assert_eq!(code, if has_error { 1 } else { 0 }, "{lines:#?}");
    let verdict = if has_error {
        "VERDICT: FAILED"
    } else {
        "VERDICT: SUCCESS"
    };
    assert_eq!(lines[lines.len() - 1], verdict);

    // Storage that was never migrated.
    let empty = tempfile::tempdir().expect("tempdir");
    set(
        &mut env,
        "ORCH_DATA_DIR",
        &empty.path().display().to_string(),
    );
    let (code, lines) = staging_check(&env, &[], dir.path()).await;
    assert_eq!(code, 1);
    assert!(
        line(&lines, "C4")
            .starts_with("FAIL C4 [real] migrations applied: usage-ledger: no database at"),
        "{lines:#?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_failures_are_waived_only_when_tolerant() {
    let stack = start(TestStorage::sqlite(), &[]).await;
    let state = Arc::new(Mutex::new(SandboxState {
        branch_exists: true,
        analyst_launched: true,
    }));
    let doubles = Doubles(Arc::clone(&state));
    let mut env = stack_env(&stack);
    for (service, routes) in [
        (
            ServiceName::StageEngine,
            tonic::service::Routes::new(StageEngineServer::new(doubles.clone())),
        ),
        (
            ServiceName::MergeGate,
            tonic::service::Routes::new(MergeGateServer::new(doubles.clone())),
        ),
        (
            ServiceName::Launcher,
            tonic::service::Routes::new(LauncherServer::new(doubles.clone())),
        ),
    ] {
        let url = serve_double(service, routes).await;
        set(&mut env, &url_var(service), &url);
    }
    set(&mut env, "ORCH_GATEWAY_URL", &gateway_double().await);
    set(&mut env, "ORCH_STAGING_SANDBOX_WORK_ITEM", "SANDBOX-1");
    let dir = tempfile::tempdir().expect("tempdir");
    let artifact = dir.path().join("staging.md");
    std::fs::write(&artifact, "---\nwork_item: SANDBOX-1\n---\n# Staging\n").expect("write");
    let artifact_arg = artifact.display().to_string();

    // Everything passes.
    let (code, lines) = staging_check(&env, &["--artifact", &artifact_arg], dir.path()).await;
    assert_eq!(code, 0, "{lines:#?}");
    for id in ["C1", "C2", "C3", "C4", "C9a", "C9b"] {
        assert!(
            line(&lines, id).starts_with(&format!("PASS {id} ")),
            "{lines:#?}"
        );
    }
    assert_eq!(
        line(&lines, "C9a"),
        "PASS C9a [sandbox_infra] sandbox branch exists: sandbox/app orch/SANDBOX-1 at abc1234"
    );
    assert_eq!(
        line(&lines, "C9b"),
        "PASS C9b [sandbox_infra] sandbox analyst job launched: analyst job job-1 succeeded"
    );
    assert_eq!(lines[lines.len() - 2], "INFRA-WAIVED: none");
    assert_eq!(lines[lines.len() - 1], "VERDICT: SUCCESS");
    let fm = frontmatter(&artifact);
    assert!(
        fm.contains(
            "work_item: SANDBOX-1\nstaging_status: SUCCESS\nstaging_strict: false\ninfra_waived: []"
        ),
        "{fm}"
    );

    // The sandbox's branch and analyst job are missing: waived when tolerant...
    *state.lock().expect("lock") = SandboxState {
        branch_exists: false,
        analyst_launched: false,
    };
    let (code, lines) = staging_check(&env, &["--artifact", &artifact_arg], dir.path()).await;
    assert_eq!(code, 0, "{lines:#?}");
    assert_eq!(
        line(&lines, "C9a"),
        "FAIL C9a [sandbox_infra] sandbox branch exists: sandbox/app orch/SANDBOX-1 not found: branch orch/SANDBOX-1 not found"
    );
    assert_eq!(
        line(&lines, "C9b"),
        "FAIL C9b [sandbox_infra] sandbox analyst job launched: analyst job job-1 is queued and was never launched"
    );
    assert_eq!(lines[lines.len() - 2], "INFRA-WAIVED: C9a, C9b");
    assert_eq!(lines[lines.len() - 1], "VERDICT: SUCCESS");
    assert!(
        frontmatter(&artifact)
            .contains("staging_status: SUCCESS\nstaging_strict: false\ninfra_waived: [C9a, C9b]")
    );

    // ...and not with --strict...
    let (code, lines) =
        staging_check(&env, &["--strict", "--artifact", &artifact_arg], dir.path()).await;
    assert_eq!(code, 1, "{lines:#?}");
    assert_eq!(lines[0], "MODE: strict (--strict)");
    assert_eq!(lines[lines.len() - 2], "INFRA-WAIVED: none");
    assert_eq!(lines[lines.len() - 1], "VERDICT: FAILED");
    assert!(
        frontmatter(&artifact)
            .contains("staging_status: FAILED\nstaging_strict: true\ninfra_waived: []")
    );

    // ...nor with the tolerance switched off.
    let mut strict_env = env.clone();
    set(
        &mut strict_env,
        "ORCH_STAGING_INFRA_TOLERANCE_ENABLED",
        "false",
    );
    let (code, lines) = staging_check(&strict_env, &[], dir.path()).await;
    assert_eq!(code, 1, "{lines:#?}");
    assert_eq!(
        lines[0],
        "MODE: strict (ORCH_STAGING_INFRA_TOLERANCE_ENABLED=false)"
    );
    assert_eq!(lines[lines.len() - 1], "VERDICT: FAILED");

    // A REAL failure is never waived: the gateway loses /queue.
    *state.lock().expect("lock") = SandboxState {
        branch_exists: true,
        analyst_launched: true,
    };
    let no_queue = gateway_without_queue().await;
    set(&mut env, "ORCH_GATEWAY_URL", &no_queue);
    let (code, lines) = staging_check(&env, &[], dir.path()).await;
    assert_eq!(code, 1, "{lines:#?}");
    assert!(line(&lines, "C3").starts_with("FAIL C3"));
    assert_eq!(lines[lines.len() - 1], "VERDICT: FAILED");

    // A bad setting is an internal error: FAILED, and the artifact says so.
    set(&mut env, "ORCH_STAGING_CHECK_TIMEOUT_MS", "soon");
    let (code, lines) = staging_check(&env, &["--artifact", &artifact_arg], dir.path()).await;
    assert_eq!(code, 1);
    assert!(
        lines[0].starts_with("ERROR staging-check: ORCH_STAGING_CHECK_TIMEOUT_MS"),
        "{lines:#?}"
    );
    assert_eq!(lines[lines.len() - 1], "VERDICT: FAILED");
    assert!(frontmatter(&artifact).contains("staging_status: FAILED"));
}

async fn migrations_are_read_from_either_backend_without_applying_them(storage: TestStorage) {
    let backend = storage.name;
    let stack = start(storage, &[]).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let mut env = stack_env(&stack);
    let (_, lines) = staging_check(&env, &[], dir.path()).await;
    assert!(
        line(&lines, "C4").starts_with("PASS C4 [real] migrations applied: "),
        "{backend}: {lines:#?}"
    );

    // A database nothing was ever migrated in: reported, and left as it was.
    let _keep;
    match backend {
        "postgres" => {
            let empty = TestStorage::postgres("staging_check::empty")
                .await
                .expect("the cluster that served the stack");
            let url = match &empty.location {
                orchestrator_kit::db::Location::Postgres(u) => u.expose().to_owned(),
                orchestrator_kit::db::Location::SqliteDir(_) => unreachable!("a postgres storage"),
            };
            set(&mut env, "ORCH_DATABASE_URL", &url);
            _keep = empty;
        }
        _ => {
            let empty = TestStorage::sqlite();
            if let orchestrator_kit::db::Location::SqliteDir(d) = &empty.location {
                set(&mut env, "ORCH_DATA_DIR", &d.display().to_string());
            }
            _keep = empty;
        }
    }
    for _ in 0..2 {
        let (code, lines) = staging_check(&env, &[], dir.path()).await;
        assert_eq!(code, 1);
        let c4 = line(&lines, "C4");
        assert!(
            c4.starts_with("FAIL C4 [real] migrations applied: usage-ledger: "),
            "{backend}: {c4}"
        );
        assert!(
            c4.contains("no migration table") || c4.contains("no database at"),
            "{backend}: {c4}"
        );
    }
}

on_both_backends!(migrations_are_read_from_either_backend_without_applying_them);
