//! The gateway in the whole stack (with the fake Plane of `plane.rs`) and as a process: a
//! webhook accepted with 2xx is applied exactly once, even when stage-engine cannot apply
//! it yet or the gateway is SIGKILLed right after answering.

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use orchestrator_kit::ServiceName;
use orchestrator_proto::launcher::v1::ListJobsRequest;
use orchestrator_proto::stage_engine::v1::stage_engine_server::{StageEngine, StageEngineServer};
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, CreateWorkItemResponse, GetWorkItemRequest, WorkItem,
};
use orchestrator_testkit::{TestStorage, on_both_backends};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::common::{contracts_dir, start};
use crate::plane::{ISSUE, PROJECT, Plane, plane_env, serve_plane};
use crate::process::{orchestrator, read_addrs};

const SECRET: &str = "contract-test-secret";

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(contracts_dir().join(name)).expect("sample")
}

async fn post_plane(addr: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    post_plane_event(addr, "issue", delivery, body).await
}

/// A signed Plane delivery, headers as Plane sends them (plane-notes.md).
async fn post_plane_event(addr: &str, event: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/webhooks/plane"))
        .header("content-type", "application/json")
        .header("user-agent", "Autopilot")
        .header("x-plane-delivery", delivery)
        .header("x-plane-event", event)
        .header(
            "x-plane-signature",
            gateway::signature::sign(SECRET.as_bytes(), body),
        )
        .body(body.to_vec())
        .send()
        .await
        .expect("post");
    let status = res.status().as_u16();
    (status, res.json().await.expect("json"))
}

async fn metrics(addr: &str) -> String {
    reqwest::get(format!("http://{addr}/metrics"))
        .await
        .expect("metrics")
        .text()
        .await
        .expect("text")
}

async fn queue(addr: &str) -> Value {
    reqwest::get(format!("http://{addr}/queue"))
        .await
        .expect("queue")
        .json()
        .await
        .expect("json")
}

async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("timed out after {limit:?} waiting for: {what}");
}

/// The contract sample as Plane sends it, with another issue id and number when given.
fn issue_created(issue: &str, sequence_id: u64) -> Vec<u8> {
    let mut v: Value =
        serde_json::from_slice(&sample("plane-webhook-issue-created.json")).expect("json");
    v["data"]["id"] = Value::from(issue);
    v["data"]["sequence_id"] = Value::from(sequence_id);
    serde_json::to_vec(&v).expect("json")
}

/// A Plane issue created with the trigger label reaches the real stage-engine through
/// the real gateway, while Plane cannot name the project at first (stage-engine answers
/// UNAVAILABLE, the gateway keeps the delivery and retries): applied once, as work item
/// PROJ-42 (the project's identifier, read from Plane once, and the issue's sequence_id),
/// with its branch and its analyst job. A redelivery changes nothing, a second issue of
/// the project needs no second lookup, and a human's `:approved:` comment (which names
/// only the Plane issue) reaches the same work item.
async fn in_the_stack_a_signed_delivery_reaches_stage_engine_and_is_never_lost(
    storage: TestStorage,
) {
    let plane = Arc::new(Plane::default());
    *plane.project_down.lock().expect("lock") = true;
    let plane_url = serve_plane(plane.clone()).await;
    let mut env: Vec<(&str, String)> = plane_env(&plane_url);
    for (k, v) in [
        ("PLANE_WEBHOOK_SECRET", SECRET),
        ("ORCH_PLANE_DEFAULT_REPO", "acme/app"),
        ("ORCH_PLANE_BOT_USERS", "stream-bot"),
        ("ORCH_GATEWAY_DISPATCH_BACKOFF_BASE_MS", "20"),
        ("ORCH_GATEWAY_DISPATCH_BACKOFF_MAX_MS", "200"),
        ("ORCH_GATEWAY_DISPATCH_POLL_MS", "20"),
        // An analyst that runs for the whole test: its job stays the item's one job (with
        // the default `claude` missing it would fail, park the item, and the `:approved:`
        // below would then retry it).
        ("ORCH_AGENT_COMMAND", "sh -c 'sleep 300'"),
    ] {
        env.push((k, v.to_owned()));
    }
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let stack = start(storage, &env).await;
    let addr = stack.config.listen[&ServiceName::Gateway].to_string();
    let mut se = stack.clients.stage_engine.clone();
    let body = sample("plane-webhook-issue-created.json");

    let (status, v) = post_plane(&addr, "stack-1", &body).await;
    assert_eq!(status, 202, "{v}");
    // Plane is down: stage-engine cannot name the project and answers UNAVAILABLE; the
    // delivery stays pending and is retried, never dead.
    eventually(
        Duration::from_secs(20),
        "retries while Plane is down",
        || async {
            *plane.project_refused.lock().expect("lock") >= 2
            && metrics(&addr).await.contains(
                "gateway_rpc_duration_seconds_count{rpc=\"CreateWorkItem\",code=\"Unavailable\"}",
            )
        },
    )
    .await;
    let q = queue(&addr).await;
    assert_eq!(
        (q["inbox"]["pending"].as_u64(), q["inbox"]["dead"].as_u64()),
        (Some(1), Some(0)),
        "{q}"
    );
    let err = se
        .get_work_item(GetWorkItemRequest {
            key: "PROJ-42".into(),
        })
        .await
        .expect_err("nothing created while Plane is down");
    assert_eq!(err.code(), tonic::Code::NotFound);

    *plane.project_down.lock().expect("lock") = false;
    eventually(
        Duration::from_secs(20),
        "applied once Plane is back",
        || async { queue(&addr).await["inbox"]["applied"] == 1 },
    )
    .await;
    let item = se
        .get_work_item(GetWorkItemRequest {
            key: "PROJ-42".into(),
        })
        .await
        .expect("PROJ-42")
        .into_inner();
    assert_eq!(
        (
            item.tracker_issue_id.as_str(),
            item.tracker_project_id.as_str(),
            item.repo.as_str(),
            item.branch.as_str(),
            item.stage.as_str(),
        ),
        (ISSUE, PROJECT, "acme/app", "orch/PROJ-42", "analysis")
    );

    // Redelivered, and resent under a new id: nothing new anywhere.
    let (status, v) = post_plane(&addr, "stack-1", &body).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("duplicate")));
    let (status, v) = post_plane(&addr, "stack-1-resent", &body).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("duplicate")));

    // Another issue of the same project: its key without asking Plane again.
    let other = "0b0b0b0b-0000-4000-8000-000000000043";
    let (status, v) = post_plane(&addr, "stack-2", &issue_created(other, 43)).await;
    assert_eq!(status, 202, "{v}");
    eventually(
        Duration::from_secs(20),
        "the second issue applied",
        || async { queue(&addr).await["inbox"]["applied"] == 2 },
    )
    .await;
    let second = se
        .get_work_item(GetWorkItemRequest {
            key: "PROJ-43".into(),
        })
        .await
        .expect("PROJ-43")
        .into_inner();
    assert_eq!(second.tracker_issue_id, other);
    assert_eq!(
        *plane.project_gets.lock().expect("lock"),
        1,
        "the identifier is read once"
    );

    // A human's :approved: on the first issue: Approve reaches PROJ-42 by its Plane issue
    // (still at analysis, so stage-engine records it and changes nothing).
    let mut comment: Value =
        serde_json::from_slice(&sample("plane-webhook-issue_comment-created.json")).expect("json");
    comment["data"]["comment_html"] = Value::from("<p>:approved:</p>");
    let comment = serde_json::to_vec(&comment).expect("json");
    let (status, v) = post_plane_event(&addr, "issue_comment", "stack-3", &comment).await;
    assert_eq!(status, 202, "{v}");
    eventually(Duration::from_secs(20), "the approval applied", || async {
        queue(&addr).await["inbox"]["applied"] == 3
    })
    .await;
    assert!(
        metrics(&addr)
            .await
            .contains("gateway_rpc_duration_seconds_count{rpc=\"Approve\",code=\"Ok\"} 1\n")
    );

    // The whole way: the analyst of each work item is in the launcher's queue, once.
    for key in ["PROJ-42", "PROJ-43"] {
        let jobs = stack
            .clients
            .launcher
            .clone()
            .list_jobs(ListJobsRequest {
                work_item: key.into(),
                ..ListJobsRequest::default()
            })
            .await
            .expect("jobs")
            .into_inner()
            .jobs;
        assert_eq!(
            jobs.iter().map(|j| j.agent.as_str()).collect::<Vec<_>>(),
            ["analyst"],
            "{key}: {:#?}",
            jobs.iter()
                .map(|j| (&j.status, &j.outcome, &j.reason))
                .collect::<Vec<_>>()
        );
    }
    let q = queue(&addr).await;
    assert_eq!(
        (q["inbox"]["pending"].as_u64(), q["inbox"]["dead"].as_u64()),
        (Some(0), Some(0)),
        "{q}"
    );
    for part in ["launcher", "reaper", "post_deploy"] {
        assert!(q[part].is_object(), "{part}: {q}");
    }
    let errors = plane.errors.lock().expect("lock").clone();
    assert!(
        errors.is_empty(),
        "requests off the Plane contract: {errors:#?}"
    );
}

on_both_backends!(in_the_stack_a_signed_delivery_reaches_stage_engine_and_is_never_lost);

/// A stage-engine that is down (UNAVAILABLE) until told otherwise, counting creates.
#[derive(Clone, Default)]
struct Fake {
    up: Arc<AtomicBool>,
    creates: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
}

#[tonic::async_trait]
impl StageEngine for Fake {
    async fn create_work_item(
        &self,
        request: Request<CreateWorkItemRequest>,
    ) -> Result<Response<CreateWorkItemResponse>, Status> {
        if !self.up.load(Ordering::SeqCst) {
            self.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unavailable("down"));
        }
        let r = request.into_inner();
        let n = self.creates.fetch_add(1, Ordering::SeqCst);
        Ok(Response::new(CreateWorkItemResponse {
            work_item: Some(WorkItem {
                key: "PROJ-42".into(),
                tracker_issue_id: r.tracker_issue_id,
                repo: r.repo,
                ..WorkItem::default()
            }),
            created: n == 0,
        }))
    }
}

/// Kills the child when dropped, so that a failing test leaves no process behind.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn spawn_gateway(dir: &std::path::Path, stage_engine_url: &str) -> (Reaped, String) {
    let mut child = orchestrator(dir)
        .args(["serve", "gateway"])
        .env("ORCH_STAGE_ENGINE_URL", stage_engine_url)
        .env("PLANE_WEBHOOK_SECRET", SECRET)
        .env("ORCH_PLANE_DEFAULT_REPO", "acme/app")
        .env("ORCH_GATEWAY_DISPATCH_BACKOFF_BASE_MS", "20")
        .env("ORCH_GATEWAY_DISPATCH_BACKOFF_MAX_MS", "100")
        .env("ORCH_GATEWAY_DISPATCH_POLL_MS", "20")
        // A gateway killed mid-attempt leaves its claim to run out: keep that short here.
        .env("ORCH_GATEWAY_DISPATCH_CLAIM_LEASE_MS", "500")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let addrs = read_addrs(&mut child);
    (Reaped(child), addrs["gateway"].clone())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateway_process_sigkilled_right_after_its_2xx_applies_the_delivery_once_after_a_restart()
{
    let fake = Fake::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    let stop = CancellationToken::new();
    tokio::spawn(orchestrator_kit::grpc::serve(
        ServiceName::StageEngine,
        tonic::service::Routes::new(StageEngineServer::new(fake.clone())),
        listener,
        stop.clone(),
    ));
    let dir = tempfile::tempdir().expect("tempdir");
    let body = sample("plane-webhook-issue-created.json");

    let (mut first, addr) = spawn_gateway(dir.path(), &url);
    let (status, v) = post_plane(&addr, "sigkill-1", &body).await;
    assert_eq!(status, 202, "{v}");
    // SIGKILL at once: no graceful anything.
    first.0.kill().expect("kill");
    first.0.wait().expect("wait");
    assert_eq!(fake.creates.load(Ordering::SeqCst), 0);

    fake.up.store(true, Ordering::SeqCst);
    let (_second, addr) = spawn_gateway(dir.path(), &url);
    eventually(
        Duration::from_secs(15),
        "applied after the restart",
        || async { queue(&addr).await["inbox"]["applied"] == 1 },
    )
    .await;
    // The same delivery again, and the same bytes under a new id: nothing more happens.
    let (status, v) = post_plane(&addr, "sigkill-1", &body).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("duplicate")));
    let (status, v) = post_plane(&addr, "sigkill-1-resent", &body).await;
    assert_eq!((status, v["status"].as_str()), (200, Some("duplicate")));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        fake.creates.load(Ordering::SeqCst),
        1,
        "applied exactly once"
    );
    let q = queue(&addr).await;
    assert_eq!(
        (
            q["inbox"]["applied"].as_u64(),
            q["inbox"]["pending"].as_u64()
        ),
        (Some(1), Some(0)),
        "{q}"
    );
    stop.cancel();
}
