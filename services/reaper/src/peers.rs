//! The services the reaper calls, behind one trait so that a tick can be driven against
//! fakes; the real implementation goes through the gRPC clients. Its only mutating call on
//! the launcher is the guarded `FlipTerminal`.

use async_trait::async_trait;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::launcher::v1::{
    FlipTerminalRequest, FlipTerminalResponse, GetJobRequest, Job, ProbeProcessesRequest,
    ProcessProbe,
};
use orchestrator_proto::merge_gate::v1::{ReclaimStaleLeasesRequest, ReclaimStaleLeasesResponse};
use orchestrator_proto::stage_engine::v1::{AdvanceStageRequest, AdvanceStageResponse};
use tonic::Status;

/// What the reaper needs from the launcher, stage-engine and merge-gate.
#[async_trait]
pub trait Peers: Send + Sync + 'static {
    /// `Launcher.ProbeProcesses` for every running job: each tick's one look at them.
    async fn probe_processes(&self) -> Result<Vec<ProcessProbe>, Status>;
    /// `Launcher.GetJob`: the whole job, for one the tick acts on.
    async fn get_job(&self, job_id: &str) -> Result<Job, Status>;
    /// `Launcher.FlipTerminal` (guarded by job id and attempt).
    async fn flip_terminal(
        &self,
        request: FlipTerminalRequest,
    ) -> Result<FlipTerminalResponse, Status>;
    /// `StageEngine.AdvanceStage`.
    async fn advance_stage(
        &self,
        request: AdvanceStageRequest,
    ) -> Result<AdvanceStageResponse, Status>;
    /// `MergeGate.ReclaimStaleLeases`.
    async fn reclaim_stale_leases(
        &self,
        request: ReclaimStaleLeasesRequest,
    ) -> Result<ReclaimStaleLeasesResponse, Status>;
}

/// The probes of every running job can be large (10,000 jobs are about 1 MB): room above
/// tonic's 4 MB default.
const MAX_LIST_BYTES: usize = 256 * 1024 * 1024;

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
    async fn probe_processes(&self) -> Result<Vec<ProcessProbe>, Status> {
        Ok(self
            .clients
            .launcher
            .clone()
            .max_decoding_message_size(MAX_LIST_BYTES)
            .probe_processes(ProbeProcessesRequest { job_ids: vec![] })
            .await?
            .into_inner()
            .probes)
    }

    async fn get_job(&self, job_id: &str) -> Result<Job, Status> {
        Ok(self
            .clients
            .launcher
            .clone()
            .get_job(GetJobRequest {
                job_id: job_id.to_owned(),
            })
            .await?
            .into_inner())
    }

    async fn flip_terminal(
        &self,
        request: FlipTerminalRequest,
    ) -> Result<FlipTerminalResponse, Status> {
        Ok(self
            .clients
            .launcher
            .clone()
            .flip_terminal(request)
            .await?
            .into_inner())
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

    async fn reclaim_stale_leases(
        &self,
        request: ReclaimStaleLeasesRequest,
    ) -> Result<ReclaimStaleLeasesResponse, Status> {
        Ok(self
            .clients
            .merge_gate
            .clone()
            .reclaim_stale_leases(request)
            .await?
            .into_inner())
    }
}
