//! Whether a lease's holder is dead. A pid means something only on its own host, so the
//! judge is the launcher (the instance that spawned the holder's process): merge-gate never
//! probes a pid itself.

use std::collections::{HashMap, HashSet};

use async_trait::async_trait;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::launcher::v1::{GetJobRequest, JobStatus, Liveness, ProbeProcessesRequest};

/// Judges lease holders.
#[cfg_attr(test, mockall::automock)]
#[async_trait]
pub trait HolderLiveness: Send + Sync + 'static {
    /// Returns the holder job ids among `job_ids` that are dead. A holder that cannot be
    /// judged (the launcher is unreachable, or does not know the job) is not in the answer:
    /// its lease then goes stale by its TTL only.
    async fn dead_holders(&self, job_ids: &[String]) -> HashSet<String>;
}

/// The launcher as the judge:
/// - `ProbeProcesses` says ALIVE: alive; DEAD or INSTANCE_GONE: dead;
/// - the job is not among the running jobs probed: `GetJob` tells a finished or requeued job
///   (dead: the attempt that took the lease is over) from a job that runs again (alive) or
///   that the launcher does not know (no judgement: e.g. a lease an operator took by hand).
#[derive(Clone)]
pub struct LauncherLiveness {
    clients: Clients,
}

impl LauncherLiveness {
    pub fn new(clients: Clients) -> Self {
        LauncherLiveness { clients }
    }
}

#[async_trait]
impl HolderLiveness for LauncherLiveness {
    async fn dead_holders(&self, job_ids: &[String]) -> HashSet<String> {
        let mut dead = HashSet::new();
        if job_ids.is_empty() {
            return dead;
        }
        let mut launcher = self.clients.launcher.clone();
        let probes = match launcher
            .probe_processes(ProbeProcessesRequest {
                job_ids: job_ids.to_vec(),
            })
            .await
        {
            Ok(r) => r.into_inner().probes,
            Err(status) => {
                tracing::debug!(code = ?status.code(), message = status.message(), "cannot judge lease holders: the launcher did not answer");
                return dead;
            }
        };
        let by_job: HashMap<&str, Liveness> = probes
            .iter()
            .map(|p| (p.job_id.as_str(), p.liveness()))
            .collect();
        for id in job_ids {
            match by_job.get(id.as_str()) {
                Some(Liveness::Dead | Liveness::InstanceGone) => {
                    dead.insert(id.clone());
                }
                Some(_) => {}
                None => match launcher.get_job(GetJobRequest { job_id: id.clone() }).await {
                    Ok(job) if job.get_ref().status() != JobStatus::Running => {
                        dead.insert(id.clone());
                    }
                    Ok(_) => {}
                    Err(status) => {
                        tracing::debug!(holder_job_id = %id, code = ?status.code(), "lease holder unknown to the launcher: only its ttl applies");
                    }
                },
            }
        }
        dead
    }
}

/// A judge that never finds a holder dead: leases go stale by their TTL only.
#[derive(Debug, Clone, Copy, Default)]
pub struct TtlOnly;

#[async_trait]
impl HolderLiveness for TtlOnly {
    async fn dead_holders(&self, _job_ids: &[String]) -> HashSet<String> {
        HashSet::new()
    }
}
