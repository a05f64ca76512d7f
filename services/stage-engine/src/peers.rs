//! The other services stage-engine calls, behind one trait so that the engine can be tested
//! alone (mockall); the real implementation goes through the gRPC clients.

use async_trait::async_trait;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::launcher::v1::{
    CancelJobRequest, CancelJobResponse, EnqueueRequest, EnqueueResponse, Job, ListJobsRequest,
};
use orchestrator_proto::merge_gate::v1::{
    CheckBranchMergeableRequest, Mergeability as PbMergeability,
};
use orchestrator_proto::post_deploy::v1::{ArmRequest, ArmResponse};
use orchestrator_proto::usage_ledger::v1::WorkItemSummaryRequest;
use tonic::Status;

use crate::qg::Mergeability;

/// The services stage-engine depends on.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait Peers: Send + Sync + 'static {
    /// `MergeGate.CheckBranchMergeable`.
    async fn check_branch_mergeable(
        &self,
        repo: &str,
        branch: &str,
        base: &str,
    ) -> Result<Mergeability, Status>;

    /// `Launcher.Enqueue`.
    async fn enqueue(&self, request: EnqueueRequest) -> Result<EnqueueResponse, Status>;

    /// `UsageLedger.WorkItemSummary`: the summary's text.
    async fn work_item_summary(&self, work_item: &str) -> Result<String, Status>;

    /// `PostDeploy.Arm`.
    async fn arm(&self, request: ArmRequest) -> Result<ArmResponse, Status>;

    /// `Launcher.CancelJob`.
    async fn cancel_job(&self, request: CancelJobRequest) -> Result<CancelJobResponse, Status>;

    /// `Launcher.ListJobs` of one work item: its jobs, any status.
    async fn jobs_of(&self, work_item: &str) -> Result<Vec<Job>, Status>;
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
    async fn check_branch_mergeable(
        &self,
        repo: &str,
        branch: &str,
        base: &str,
    ) -> Result<Mergeability, Status> {
        let resp = self
            .clients
            .merge_gate
            .clone()
            .check_branch_mergeable(CheckBranchMergeableRequest {
                repo: repo.to_owned(),
                branch: branch.to_owned(),
                base: base.to_owned(),
            })
            .await?
            .into_inner();
        Ok(match resp.mergeability() {
            PbMergeability::Mergeable => Mergeability::Mergeable,
            PbMergeability::Conflicts => Mergeability::Conflicts(resp.conflicting_files),
            PbMergeability::Error | PbMergeability::Unspecified => {
                Mergeability::Error(if resp.error.is_empty() {
                    "merge-gate gave no answer".to_owned()
                } else {
                    resp.error
                })
            }
        })
    }

    async fn enqueue(&self, request: EnqueueRequest) -> Result<EnqueueResponse, Status> {
        Ok(self
            .clients
            .launcher
            .clone()
            .enqueue(request)
            .await?
            .into_inner())
    }

    async fn work_item_summary(&self, work_item: &str) -> Result<String, Status> {
        Ok(self
            .clients
            .usage_ledger
            .clone()
            .work_item_summary(WorkItemSummaryRequest {
                work_item: work_item.to_owned(),
            })
            .await?
            .into_inner()
            .text)
    }

    async fn arm(&self, request: ArmRequest) -> Result<ArmResponse, Status> {
        Ok(self
            .clients
            .post_deploy
            .clone()
            .arm(request)
            .await?
            .into_inner())
    }

    async fn cancel_job(&self, request: CancelJobRequest) -> Result<CancelJobResponse, Status> {
        Ok(self
            .clients
            .launcher
            .clone()
            .cancel_job(request)
            .await?
            .into_inner())
    }

    async fn jobs_of(&self, work_item: &str) -> Result<Vec<Job>, Status> {
        Ok(self
            .clients
            .launcher
            .clone()
            .list_jobs(ListJobsRequest {
                work_item: work_item.to_owned(),
                limit: 1000,
                ..ListJobsRequest::default()
            })
            .await?
            .into_inner()
            .jobs)
    }
}
