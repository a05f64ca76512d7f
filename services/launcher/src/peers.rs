//! The other services the launcher calls, behind one trait so that the launcher can be
//! tested alone; the real implementation goes through the gRPC clients.

use async_trait::async_trait;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, FinalizeMergeRequest, FinalizeMergeResponse,
    ReleaseLeaseRequest,
};
use orchestrator_proto::post_deploy::v1::{TickRequest, TickResponse};
use orchestrator_proto::stage_engine::v1::{
    AddCommentRequest, AdvanceStageRequest, AdvanceStageResponse, GetWorkItemRequest,
    NotifyRequest, ReportJobFailedRequest, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::{
    AgentRun, RecordRunRequest, RunKey, SpentSinceRequest, WorkItemSummaryRequest,
};
use tonic::Status;

/// The services the launcher depends on.
#[async_trait]
pub trait Peers: Send + Sync + 'static {
    /// `UsageLedger.RecordRun`.
    async fn record_run(&self, request: RecordRunRequest) -> Result<(), Status>;
    /// `UsageLedger.FinishComment`: the line of one run.
    async fn finish_comment(&self, job_id: &str, attempt: u32) -> Result<String, Status>;
    /// `UsageLedger.WorkItemSummary`: what the work item has spent so far, in USD.
    async fn spent_usd(&self, work_item: &str) -> Result<f64, Status>;
    /// `UsageLedger.SpentSince`: what the runs recorded since `since_ms` cost, of `repo`
    /// (empty: every repository), in USD.
    async fn spent_since(&self, since_ms: i64, repo: &str) -> Result<f64, Status>;
    /// `UsageLedger.GetRun` of the job's latest run; `None` when none is recorded.
    async fn last_run(&self, job_id: &str) -> Result<Option<AgentRun>, Status>;
    /// `StageEngine.GetWorkItem`.
    async fn work_item(&self, key: &str) -> Result<WorkItem, Status>;
    /// `StageEngine.AddComment`: a comment under the bot of `author`'s role, delivered by
    /// stage-engine's outbox (retried while the tracker is down).
    async fn add_comment(&self, request: AddCommentRequest) -> Result<(), Status>;
    /// `StageEngine.Notify`: tells people (once per event id); whether it was new.
    async fn notify(&self, request: NotifyRequest) -> Result<bool, Status>;
    /// `StageEngine.AdvanceStage`.
    async fn advance_stage(
        &self,
        request: AdvanceStageRequest,
    ) -> Result<AdvanceStageResponse, Status>;
    /// `StageEngine.ReportJobFailed`: a job ended failed for good.
    async fn report_job_failed(
        &self,
        request: ReportJobFailedRequest,
    ) -> Result<AdvanceStageResponse, Status>;
    /// `MergeGate.AcquireLease`.
    async fn acquire_lease(
        &self,
        request: AcquireLeaseRequest,
    ) -> Result<AcquireLeaseResponse, Status>;
    /// `MergeGate.ReleaseLease`.
    async fn release_lease(&self, repo: &str, holder_job_id: &str) -> Result<bool, Status>;
    /// `MergeGate.FinalizeMerge`.
    async fn finalize_merge(
        &self,
        request: FinalizeMergeRequest,
    ) -> Result<FinalizeMergeResponse, Status>;
    /// `PostDeploy.Tick`.
    async fn tick(&self, work_item: &str) -> Result<TickResponse, Status>;
}

/// The peers over gRPC.
#[derive(Clone)]
pub struct GrpcPeers {
    clients: Clients,
}

impl GrpcPeers {
    pub fn new(clients: Clients) -> Self {
        GrpcPeers { clients }
    }
}

#[async_trait]
impl Peers for GrpcPeers {
    async fn record_run(&self, request: RecordRunRequest) -> Result<(), Status> {
        self.clients
            .usage_ledger
            .clone()
            .record_run(request)
            .await?;
        Ok(())
    }

    async fn finish_comment(&self, job_id: &str, attempt: u32) -> Result<String, Status> {
        Ok(self
            .clients
            .usage_ledger
            .clone()
            .finish_comment(RunKey {
                job_id: job_id.to_owned(),
                attempt,
            })
            .await?
            .into_inner()
            .text)
    }

    async fn spent_usd(&self, work_item: &str) -> Result<f64, Status> {
        let s = self
            .clients
            .usage_ledger
            .clone()
            .work_item_summary(WorkItemSummaryRequest {
                work_item: work_item.to_owned(),
            })
            .await?
            .into_inner();
        Ok(s.total.map_or(0.0, |t| t.total_cost_usd))
    }

    async fn spent_since(&self, since_ms: i64, repo: &str) -> Result<f64, Status> {
        Ok(self
            .clients
            .usage_ledger
            .clone()
            .spent_since(SpentSinceRequest {
                since_ms,
                repo: repo.to_owned(),
            })
            .await?
            .into_inner()
            .total_cost_usd)
    }

    async fn last_run(&self, job_id: &str) -> Result<Option<AgentRun>, Status> {
        let r = self
            .clients
            .usage_ledger
            .clone()
            .get_run(RunKey {
                job_id: job_id.to_owned(),
                attempt: 0,
            })
            .await;
        match r {
            Ok(run) => Ok(Some(run.into_inner())),
            Err(s) if s.code() == tonic::Code::NotFound => Ok(None),
            Err(s) => Err(s),
        }
    }

    async fn work_item(&self, key: &str) -> Result<WorkItem, Status> {
        Ok(self
            .clients
            .stage_engine
            .clone()
            .get_work_item(GetWorkItemRequest {
                key: key.to_owned(),
            })
            .await?
            .into_inner())
    }

    async fn add_comment(&self, request: AddCommentRequest) -> Result<(), Status> {
        self.clients
            .stage_engine
            .clone()
            .add_comment(request)
            .await?;
        Ok(())
    }

    async fn notify(&self, request: NotifyRequest) -> Result<bool, Status> {
        Ok(self
            .clients
            .stage_engine
            .clone()
            .notify(request)
            .await?
            .into_inner()
            .created)
    }

    async fn advance_stage(
        &self,
        request: AdvanceStageRequest,
    ) -> Result<AdvanceStageResponse, Status> {
        Ok(self
            .clients
            .stage_engine
            .clone()
            .advance_stage(request)
            .await?
            .into_inner())
    }

    async fn report_job_failed(
        &self,
        request: ReportJobFailedRequest,
    ) -> Result<AdvanceStageResponse, Status> {
        Ok(self
            .clients
            .stage_engine
            .clone()
            .report_job_failed(request)
            .await?
            .into_inner())
    }

    async fn acquire_lease(
        &self,
        request: AcquireLeaseRequest,
    ) -> Result<AcquireLeaseResponse, Status> {
        Ok(self
            .clients
            .merge_gate
            .clone()
            .acquire_lease(request)
            .await?
            .into_inner())
    }

    async fn release_lease(&self, repo: &str, holder_job_id: &str) -> Result<bool, Status> {
        Ok(self
            .clients
            .merge_gate
            .clone()
            .release_lease(ReleaseLeaseRequest {
                repo: repo.to_owned(),
                holder_job_id: holder_job_id.to_owned(),
            })
            .await?
            .into_inner()
            .released)
    }

    async fn finalize_merge(
        &self,
        request: FinalizeMergeRequest,
    ) -> Result<FinalizeMergeResponse, Status> {
        Ok(self
            .clients
            .merge_gate
            .clone()
            .finalize_merge(request)
            .await?
            .into_inner())
    }

    async fn tick(&self, work_item: &str) -> Result<TickResponse, Status> {
        Ok(self
            .clients
            .post_deploy
            .clone()
            .tick(TickRequest {
                work_item: work_item.to_owned(),
            })
            .await?
            .into_inner())
    }
}
