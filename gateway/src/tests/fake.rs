//! A stand-in stage-engine: the generated trait, served over real gRPC on 127.0.0.1:0,
//! recording every call it applied. It can be "down" (UNAVAILABLE), flaky for the next n
//! calls, or fail every call with one code.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use orchestrator_kit::ServiceName;
use orchestrator_proto::stage_engine::v1::stage_engine_server::{StageEngine, StageEngineServer};
use orchestrator_proto::stage_engine::v1::{
    AdvanceOutcome, AdvanceStageResponse, ApproveRequest, CreateWorkItemRequest,
    CreateWorkItemResponse, OnCommitStatusRequest, OnCommitStatusResponse, OnPrMergedRequest,
    OnPrReviewRequest, WorkItem,
};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Request, Response, Status};

#[derive(Default)]
struct Inner {
    down: AtomicBool,
    refused: AtomicU64,
    flaky: AtomicU32,
    fail_with: Mutex<Option<Code>>,
    calls: Mutex<Vec<String>>,
    creates: Mutex<Vec<CreateWorkItemRequest>>,
    items: Mutex<Vec<WorkItem>>,
}

#[derive(Clone, Default)]
pub struct Fake {
    inner: Arc<Inner>,
}

/// Stops the fake's server when dropped.
pub struct Stop(CancellationToken);

impl Drop for Stop {
    fn drop(&mut self) {
        self.0.cancel();
    }
}

impl Fake {
    /// Serves the fake on 127.0.0.1:0; returns its URL.
    pub async fn serve(&self) -> (String, Stop) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let token = CancellationToken::new();
        let routes = tonic::service::Routes::new(StageEngineServer::new(self.clone()));
        tokio::spawn(orchestrator_kit::grpc::serve(
            ServiceName::StageEngine,
            routes,
            listener,
            token.clone(),
        ));
        (format!("http://{addr}"), Stop(token))
    }

    pub fn set_up(&self, up: bool) {
        self.inner.down.store(!up, Ordering::SeqCst);
    }

    /// The next `n` calls answer UNAVAILABLE.
    pub fn fail_next(&self, n: u32) {
        self.inner.flaky.store(n, Ordering::SeqCst);
    }

    /// Every call answers `code` (None: succeed).
    pub fn fail_with(&self, code: Option<Code>) {
        *self.inner.fail_with.lock().expect("lock") = code;
    }

    /// Calls refused while down or flaky.
    pub fn refused(&self) -> u64 {
        self.inner.refused.load(Ordering::SeqCst)
    }

    /// The calls applied, in order, e.g. `CreateWorkItem:<tracker issue id>`.
    pub fn calls(&self) -> Vec<String> {
        self.inner.calls.lock().expect("lock").clone()
    }

    /// The CreateWorkItem requests applied, as sent.
    pub fn create_requests(&self) -> Vec<CreateWorkItemRequest> {
        self.inner.creates.lock().expect("lock").clone()
    }

    pub fn count(&self, call: &str) -> usize {
        self.calls().iter().filter(|c| *c == call).count()
    }

    fn gate(&self) -> Result<(), Status> {
        if self.inner.down.load(Ordering::SeqCst) {
            self.inner.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unavailable("stage-engine is down"));
        }
        if self
            .inner
            .flaky
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            self.inner.refused.fetch_add(1, Ordering::SeqCst);
            return Err(Status::unavailable("stage-engine is flaky"));
        }
        if let Some(code) = *self.inner.fail_with.lock().expect("lock") {
            return Err(Status::new(code, "the fake says no"));
        }
        Ok(())
    }

    fn record(&self, call: String) {
        self.inner.calls.lock().expect("lock").push(call);
    }
}

#[tonic::async_trait]
impl StageEngine for Fake {
    async fn create_work_item(
        &self,
        request: Request<CreateWorkItemRequest>,
    ) -> Result<Response<CreateWorkItemResponse>, Status> {
        self.gate()?;
        let r = request.into_inner();
        self.record(format!("CreateWorkItem:{}", r.tracker_issue_id));
        self.inner.creates.lock().expect("lock").push(r.clone());
        let mut items = self.inner.items.lock().expect("lock");
        if let Some(w) = items
            .iter()
            .find(|w| w.tracker_issue_id == r.tracker_issue_id)
        {
            return Ok(Response::new(CreateWorkItemResponse {
                work_item: Some(w.clone()),
                created: false,
            }));
        }
        let w = WorkItem {
            key: format!("PROJ-{}", items.len() + 1),
            tracker_issue_id: r.tracker_issue_id,
            title: r.title,
            repo: r.repo,
            stage: "analysis".into(),
            status: "active".into(),
            ..WorkItem::default()
        };
        items.push(w.clone());
        Ok(Response::new(CreateWorkItemResponse {
            work_item: Some(w),
            created: true,
        }))
    }

    async fn approve(
        &self,
        request: Request<ApproveRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        self.gate()?;
        let r = request.into_inner();
        // As stage-engine: by key, or by the tracker issue the comment was on.
        let item = self
            .inner
            .items
            .lock()
            .expect("lock")
            .iter()
            .find(|w| {
                if r.work_item.is_empty() {
                    w.tracker_issue_id == r.tracker_issue_id
                } else {
                    w.key == r.work_item
                }
            })
            .cloned()
            .ok_or_else(|| Status::not_found("no such work item"))?;
        self.record(format!(
            "Approve:{}:{}:{}",
            item.key, r.comment_id, r.author
        ));
        Ok(Response::new(AdvanceStageResponse {
            work_item: Some(item),
            outcome: AdvanceOutcome::Advanced as i32,
            ..AdvanceStageResponse::default()
        }))
    }

    async fn on_pr_review(
        &self,
        request: Request<OnPrReviewRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        self.gate()?;
        let r = request.into_inner();
        self.record(format!(
            "OnPrReview:{}:{}:{}:{}:{}",
            r.repo, r.branch, r.pr_number, r.reviewer, r.state
        ));
        Ok(Response::new(AdvanceStageResponse {
            outcome: AdvanceOutcome::RolledBack as i32,
            ..AdvanceStageResponse::default()
        }))
    }

    async fn on_commit_status(
        &self,
        request: Request<OnCommitStatusRequest>,
    ) -> Result<Response<OnCommitStatusResponse>, Status> {
        self.gate()?;
        let r = request.into_inner();
        self.record(format!("OnCommitStatus:{}:{}", r.repo, r.sha));
        Ok(Response::new(OnCommitStatusResponse { rechecked: 0 }))
    }

    async fn on_pr_merged(
        &self,
        request: Request<OnPrMergedRequest>,
    ) -> Result<Response<AdvanceStageResponse>, Status> {
        self.gate()?;
        let r = request.into_inner();
        self.record(format!(
            "OnPrMerged:{}:{}:{}",
            r.repo, r.branch, r.pr_number
        ));
        Ok(Response::new(AdvanceStageResponse {
            outcome: AdvanceOutcome::Done as i32,
            ..AdvanceStageResponse::default()
        }))
    }
}
