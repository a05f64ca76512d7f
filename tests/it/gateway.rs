//! The gateway in the whole stack and as a process: a webhook accepted with 2xx is applied
//! exactly once, even when the gateway is SIGKILLed right after answering.

use std::process::{Child, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use orchestrator_kit::ServiceName;
use orchestrator_proto::stage_engine::v1::stage_engine_server::{StageEngine, StageEngineServer};
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, CreateWorkItemResponse, WorkItem,
};
use orchestrator_testkit::TestStorage;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::common::{contracts_dir, start};
use crate::process::{orchestrator, read_addrs};

const SECRET: &str = "contract-test-secret";

fn sample(name: &str) -> Vec<u8> {
    std::fs::read(contracts_dir().join(name)).expect("sample")
}

async fn post_plane(addr: &str, delivery: &str, body: &[u8]) -> (u16, Value) {
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/webhooks/plane"))
        .header("content-type", "application/json")
        .header("x-plane-delivery", delivery)
        .header("x-plane-event", "issue")
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

#[ignore = "stage-engine needs a key for a Plane issue (PROJ-42); deriving it from the delivery's project and sequence_id is still open (#7)"]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_the_stack_a_signed_delivery_reaches_stage_engine_and_is_never_lost() {
    let stack = start(
        TestStorage::sqlite(),
        &[
            ("PLANE_WEBHOOK_SECRET", SECRET),
            ("ORCH_PLANE_DEFAULT_REPO", "acme/app"),
            ("ORCH_GATEWAY_DISPATCH_BACKOFF_BASE_MS", "20"),
            ("ORCH_GATEWAY_DISPATCH_POLL_MS", "20"),
        ],
    )
    .await;
    let addr = stack.config.listen[&ServiceName::Gateway].to_string();
    let (status, v) = post_plane(
        &addr,
        "stack-1",
        &sample("plane-webhook-issue-created.json"),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    // The dispatcher calls the real stage-engine: applied, or (while stage-engine answers
    // UNIMPLEMENTED) kept pending and retried; never lost, never dead.
    eventually(Duration::from_secs(10), "a CreateWorkItem call", || async {
        let metrics = reqwest::get(format!("http://{addr}/metrics"))
            .await
            .expect("metrics")
            .text()
            .await
            .expect("text");
        metrics.contains("gateway_rpc_duration_seconds_count{rpc=\"CreateWorkItem\"")
    })
    .await;
    let q = queue(&addr).await;
    let (pending, applied) = (
        q["inbox"]["pending"].as_u64(),
        q["inbox"]["applied"].as_u64(),
    );
    assert_eq!(pending.unwrap_or(0) + applied.unwrap_or(0), 1, "{q}");
    assert_eq!(q["inbox"]["dead"], 0, "{q}");
    for part in ["launcher", "reaper", "post_deploy"] {
        assert!(q[part].is_object(), "{part}: {q}");
    }
}

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
