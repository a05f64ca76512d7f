//! The merge gate: leases, mergeability, PRs and merge finalization, and its gRPC surface.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use orchestrator_forge::{Forge, RepoName};
use orchestrator_git::{validate_branch, validate_work_item_key};
use orchestrator_kit::clients::Clients;
use orchestrator_kit::time::now_ms;
use orchestrator_kit::{ConfigError, Db, Env};
use orchestrator_proto::merge_gate::v1::{
    AcquireLeaseRequest, AcquireLeaseResponse, CheckBranchMergeableRequest,
    CheckBranchMergeableResponse, EnsurePrRequest, EnsurePrResponse, FinalizeMergeRequest,
    FinalizeMergeResponse, FinalizeOutcome, GetLeaseRequest, GetLeaseResponse, Lease,
    ListLeasesRequest, ListLeasesResponse, ListMergesRequest, ListMergesResponse, MergeRecord,
    Mergeability as PbMergeability, PullRequest as PbPullRequest, ReclaimStaleLeasesRequest,
    ReclaimStaleLeasesResponse, ReleaseLeaseRequest, ReleaseLeaseResponse,
    merge_gate_server::MergeGate,
};
use tonic::{Request, Response, Status};

use crate::config::MergeGateConfig;
use crate::error::GateError;
use crate::finalize::Finalizer;
use crate::liveness::{HolderLiveness, LauncherLiveness};
use crate::mirror::{Checked, Mergeability, Mirrors};
use crate::store::{self, LeaseRow};

/// One async lock per pull request, `(repo, number)`.
pub(crate) type PrLocks = Mutex<HashMap<(String, u64), Arc<tokio::sync::Mutex<()>>>>;

/// The merge-gate gRPC service; cheap to clone.
#[derive(Clone)]
pub struct MergeGateService {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) db: Db,
    pub(crate) config: MergeGateConfig,
    pub(crate) forge: Arc<dyn Forge>,
    pub(crate) liveness: Arc<dyn HolderLiveness>,
    pub(crate) mirrors: Mirrors,
    /// Repos the forge confirmed (a repo does not stop existing under a running gate).
    known_repos: Mutex<HashSet<String>>,
    /// One finalization at a time per PR in this process; the `merges` claim covers replicas.
    pub(crate) pr_locks: PrLocks,
}

/// What `AcquireLease` came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Acquired {
    pub acquired: bool,
    /// The lease in force: ours when acquired, the other holder's when not.
    pub lease: Option<LeaseRow>,
    pub took_over_stale: bool,
}

/// Checks an id that is required: present, short, printable.
pub(crate) fn required<'a>(field: &'static str, value: &'a str) -> Result<&'a str, GateError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(GateError::MissingField(field));
    }
    optional(field, v)
}

/// Checks an id that may be empty: short, printable.
pub(crate) fn optional<'a>(field: &'static str, value: &'a str) -> Result<&'a str, GateError> {
    let v = value.trim();
    if v.len() > 200 || v.chars().any(char::is_control) {
        return Err(GateError::InvalidField {
            field,
            reason: "must be at most 200 printable characters".to_owned(),
        });
    }
    Ok(v)
}

pub(crate) fn repo_arg(value: &str) -> Result<RepoName, GateError> {
    let v = required("repo", value)?;
    RepoName::parse(v).map_err(|e| GateError::InvalidField {
        field: "repo",
        reason: e.to_string(),
    })
}

fn branch_arg<'a>(field: &'static str, value: &'a str) -> Result<&'a str, GateError> {
    let v = required(field, value)?;
    validate_branch(v).map_err(|e| GateError::InvalidField {
        field,
        reason: e.to_string(),
    })
}

pub(crate) fn work_item_arg(value: &str) -> Result<&str, GateError> {
    let v = required("work_item", value)?;
    validate_work_item_key(v).map_err(|e| GateError::InvalidField {
        field: "work_item",
        reason: e.to_string(),
    })
}

impl MergeGateService {
    /// Builds the service from the environment: the forge section, mirrors, and the
    /// launcher as the judge of lease holders.
    pub fn start(db: Db, clients: Clients, env: &Env) -> Result<Self, ConfigError> {
        let config = MergeGateConfig::from_env(env)?;
        let forge = orchestrator_forge::build(&config.forge)?;
        tracing::info!(forge = %forge.kind(), mirrors = %config.mirror_dir.display(), lease_ttl_s = config.lease_ttl_s, "merge-gate configured");
        Ok(Self::from_parts(
            db,
            config,
            forge,
            Arc::new(LauncherLiveness::new(clients)),
        ))
    }

    /// Builds the service from its parts (tests pass their forge and judge).
    pub fn from_parts(
        db: Db,
        config: MergeGateConfig,
        forge: Arc<dyn Forge>,
        liveness: Arc<dyn HolderLiveness>,
    ) -> Self {
        let mirrors = Mirrors::new(config.mirror_dir.clone(), &config.forge);
        MergeGateService {
            inner: Arc::new(Inner {
                db,
                config,
                forge,
                liveness,
                mirrors,
                known_repos: Mutex::new(HashSet::new()),
                pr_locks: Mutex::new(HashMap::new()),
            }),
        }
    }

    /// The storage behind the service.
    pub fn db(&self) -> &Db {
        &self.inner.db
    }

    /// Refuses a repo the forge does not have. A forge that cannot be asked does not block
    /// a lease (deploys must not stop on a slow forge API): the doubt is logged.
    async fn ensure_known(&self, repo: &RepoName) -> Result<(), GateError> {
        let name = repo.to_string();
        if self
            .inner
            .known_repos
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(&name)
        {
            return Ok(());
        }
        match self.inner.forge.repo_exists(repo).await {
            Ok(true) => {
                self.inner
                    .known_repos
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(name);
                Ok(())
            }
            Ok(false) => {
                tracing::warn!(repo = %repo, forge = %self.inner.forge.kind(), "lease refused: unknown repo");
                Err(GateError::NotFound(format!(
                    "repo {repo} is unknown to the {} forge",
                    self.inner.forge.kind()
                )))
            }
            Err(e) => {
                tracing::warn!(repo = %repo, error = %e, "cannot confirm that the repo exists; leasing anyway");
                Ok(())
            }
        }
    }

    /// `AcquireLease`: one holder per repo. The lease is taken in one atomic statement; a
    /// lease held by another is taken over only when it is stale — its TTL passed, or its
    /// holder judged dead (then exactly that acquisition is replaced, compare-and-swap).
    pub async fn acquire_lease(&self, req: &AcquireLeaseRequest) -> Result<Acquired, GateError> {
        let repo = repo_arg(&req.repo)?;
        let holder = required("holder_job_id", &req.holder_job_id)?;
        let instance = optional("instance_id", &req.instance_id)?;
        if req.pid < 0 {
            return Err(GateError::InvalidField {
                field: "pid",
                reason: "must not be negative".to_owned(),
            });
        }
        self.ensure_known(&repo).await?;
        let ttl_s = if req.ttl_s == 0 {
            self.inner.config.lease_ttl_s
        } else {
            req.ttl_s
        };
        self.take_lease(&repo.to_string(), holder, instance, req.pid, ttl_s)
            .await
    }

    pub(crate) async fn take_lease(
        &self,
        repo: &str,
        holder: &str,
        instance: &str,
        pid: i64,
        ttl_s: u32,
    ) -> Result<Acquired, GateError> {
        let db = &self.inner.db;
        let now = now_ms();
        let previous = store::get(db, repo).await?;
        // Only a fresh lease of another holder needs a judgement; the statement itself
        // replaces an expired one.
        let mut takeover = String::new();
        if let Some(p) = &previous
            && p.holder_job_id != holder
            && !p.is_expired(now)
            && self
                .inner
                .liveness
                .dead_holders(std::slice::from_ref(&p.holder_job_id))
                .await
                .contains(&p.holder_job_id)
        {
            takeover = p.lease_id.clone();
        }
        let new = LeaseRow {
            repo: repo.to_owned(),
            lease_id: uuid::Uuid::now_v7().to_string(),
            holder_job_id: holder.to_owned(),
            instance_id: instance.to_owned(),
            pid,
            acquired_at_ms: now,
            ttl_s: i64::from(ttl_s),
        };
        match store::acquire(db, &new, &takeover).await? {
            Some(lease) => {
                let took_over = previous.as_ref().is_some_and(|p| p.holder_job_id != holder);
                if let Some(p) = previous.as_ref().filter(|_| took_over) {
                    let why = if p.is_expired(now) {
                        "ttl passed"
                    } else {
                        "holder dead"
                    };
                    tracing::info!(repo, holder_job_id = holder, previous_holder = %p.holder_job_id, why, "stale merge lease taken over");
                } else {
                    tracing::debug!(repo, holder_job_id = holder, "merge lease acquired");
                }
                Ok(Acquired {
                    acquired: true,
                    lease: Some(lease),
                    took_over_stale: took_over,
                })
            }
            None => Ok(Acquired {
                acquired: false,
                lease: store::get(db, repo).await?,
                took_over_stale: false,
            }),
        }
    }

    /// `ReclaimStaleLeases`: deletes every lease whose TTL passed, whose launcher instance or
    /// holder job the caller names as dead, or whose holder the launcher judges dead. Each
    /// deletion removes exactly the acquisition that was judged. No git operation.
    pub async fn reclaim_stale_leases(
        &self,
        req: &ReclaimStaleLeasesRequest,
    ) -> Result<Vec<(LeaseRow, &'static str)>, GateError> {
        let db = &self.inner.db;
        let now = now_ms();
        let dead_instances: HashSet<&str> = req
            .dead_instance_ids
            .iter()
            .map(|s| s.trim())
            .filter(|s| !s.is_empty())
            .collect();
        let dead_jobs: HashSet<&str> = req.dead_job_ids.iter().map(|s| s.trim()).collect();
        let leases = store::list(db).await?;
        let mut stale: Vec<(LeaseRow, &'static str)> = Vec::new();
        let mut to_judge = Vec::new();
        for l in leases {
            if l.is_expired(now) {
                stale.push((l, "ttl passed"));
            } else if dead_instances.contains(l.instance_id.as_str()) {
                stale.push((l, "launcher instance gone"));
            } else if dead_jobs.contains(l.holder_job_id.as_str()) {
                stale.push((l, "holder job dead"));
            } else {
                to_judge.push(l);
            }
        }
        if !to_judge.is_empty() {
            let ids: Vec<String> = to_judge.iter().map(|l| l.holder_job_id.clone()).collect();
            let dead = self.inner.liveness.dead_holders(&ids).await;
            stale.extend(
                to_judge
                    .into_iter()
                    .filter(|l| dead.contains(&l.holder_job_id))
                    .map(|l| (l, "holder dead")),
            );
        }
        let mut reclaimed = Vec::new();
        for (l, why) in stale {
            if let Some(gone) = store::delete_if(db, &l.repo, &l.lease_id).await? {
                tracing::info!(repo = %gone.repo, holder_job_id = %gone.holder_job_id, instance_id = %gone.instance_id, pid = gone.pid, why, "stale merge lease reclaimed");
                reclaimed.push((gone, why));
            }
        }
        Ok(reclaimed)
    }

    /// `CheckBranchMergeable`: Mergeable | Conflicts(files) | Error, from `git merge-tree
    /// --write-tree` in the repo's mirror. Bad names are the caller's fault (an error
    /// status); anything that goes wrong with git is an `Error` answer.
    pub async fn check_branch_mergeable(
        &self,
        repo: &str,
        branch: &str,
        base: &str,
    ) -> Result<Checked, GateError> {
        let repo = repo_arg(repo)?;
        let branch = branch_arg("branch", branch)?;
        let base = if base.trim().is_empty() {
            self.inner.config.forge.base_branch.as_str()
        } else {
            branch_arg("base", base)?
        };
        let source = self.inner.forge.clone_url(&repo);
        let checked = self.inner.mirrors.check(&repo, &source, branch, base).await;
        if let Mergeability::Error(e) = &checked.mergeability {
            tracing::warn!(repo = %repo, branch, base, error = %e, "check_branch_mergeable failed");
        }
        Ok(checked)
    }

    fn finalizer(&self) -> Finalizer<'_> {
        Finalizer { gate: self }
    }
}

/// A stored lease as the proto shows it.
pub fn lease_to_proto(l: &LeaseRow) -> Lease {
    Lease {
        repo: l.repo.clone(),
        holder_job_id: l.holder_job_id.clone(),
        instance_id: l.instance_id.clone(),
        pid: l.pid,
        acquired_at_ms: l.acquired_at_ms,
        ttl_s: u32::try_from(l.ttl_s).unwrap_or(u32::MAX),
        lease_id: l.lease_id.clone(),
        expires_at_ms: l.expires_at_ms(),
    }
}

fn pr_to_proto(p: &orchestrator_forge::PullRequest) -> PbPullRequest {
    PbPullRequest {
        number: p.number,
        url: p.url.clone(),
        head_branch: p.head_branch.clone(),
        head_sha: p.head_sha.clone(),
        base_branch: p.base_branch.clone(),
        state: p.state.as_str().to_owned(),
        merged: p.merged,
        merge_sha: p.merge_sha.clone().unwrap_or_default(),
    }
}

#[tonic::async_trait]
impl MergeGate for MergeGateService {
    #[tracing::instrument(skip_all, fields(repo = %request.get_ref().repo, holder_job_id = %request.get_ref().holder_job_id))]
    async fn acquire_lease(
        &self,
        request: Request<AcquireLeaseRequest>,
    ) -> Result<Response<AcquireLeaseResponse>, Status> {
        let a = MergeGateService::acquire_lease(self, request.get_ref()).await?;
        Ok(Response::new(AcquireLeaseResponse {
            acquired: a.acquired,
            lease: a.lease.as_ref().map(lease_to_proto),
            took_over_stale: a.took_over_stale,
        }))
    }

    #[tracing::instrument(skip_all, fields(repo = %request.get_ref().repo, holder_job_id = %request.get_ref().holder_job_id))]
    async fn release_lease(
        &self,
        request: Request<ReleaseLeaseRequest>,
    ) -> Result<Response<ReleaseLeaseResponse>, Status> {
        let req = request.get_ref();
        let repo = repo_arg(&req.repo)?;
        let holder = required("holder_job_id", &req.holder_job_id)?;
        let released = store::release(&self.inner.db, &repo.to_string(), holder)
            .await
            .map_err(GateError::from)?;
        if released {
            tracing::debug!("merge lease released");
        }
        Ok(Response::new(ReleaseLeaseResponse { released }))
    }

    #[tracing::instrument(skip_all, fields(repo = %request.get_ref().repo))]
    async fn get_lease(
        &self,
        request: Request<GetLeaseRequest>,
    ) -> Result<Response<GetLeaseResponse>, Status> {
        let repo = repo_arg(&request.get_ref().repo)?;
        let lease = store::get(&self.inner.db, &repo.to_string())
            .await
            .map_err(GateError::from)?;
        Ok(Response::new(GetLeaseResponse {
            lease: lease.as_ref().map(lease_to_proto),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn reclaim_stale_leases(
        &self,
        request: Request<ReclaimStaleLeasesRequest>,
    ) -> Result<Response<ReclaimStaleLeasesResponse>, Status> {
        let reclaimed = MergeGateService::reclaim_stale_leases(self, request.get_ref()).await?;
        Ok(Response::new(ReclaimStaleLeasesResponse {
            reclaimed: reclaimed.iter().map(|(l, _)| lease_to_proto(l)).collect(),
        }))
    }

    #[tracing::instrument(skip_all, fields(repo = %request.get_ref().repo, branch = %request.get_ref().branch))]
    async fn check_branch_mergeable(
        &self,
        request: Request<CheckBranchMergeableRequest>,
    ) -> Result<Response<CheckBranchMergeableResponse>, Status> {
        let req = request.get_ref();
        let c = MergeGateService::check_branch_mergeable(self, &req.repo, &req.branch, &req.base)
            .await?;
        let (mergeability, conflicting_files, error) = match c.mergeability {
            Mergeability::Mergeable => (PbMergeability::Mergeable, Vec::new(), String::new()),
            Mergeability::Conflicts(files) => (PbMergeability::Conflicts, files, String::new()),
            Mergeability::Error(e) => (PbMergeability::Error, Vec::new(), e),
        };
        Ok(Response::new(CheckBranchMergeableResponse {
            mergeability: mergeability as i32,
            conflicting_files,
            error,
            head_sha: c.head_sha,
            base_sha: c.base_sha,
        }))
    }

    #[tracing::instrument(skip_all, fields(repo = %request.get_ref().repo, branch = %request.get_ref().branch))]
    async fn ensure_pr(
        &self,
        request: Request<EnsurePrRequest>,
    ) -> Result<Response<EnsurePrResponse>, Status> {
        let req = request.get_ref();
        let repo = repo_arg(&req.repo)?;
        let branch = branch_arg("branch", &req.branch)?;
        let base = if req.base.trim().is_empty() {
            self.inner.config.forge.base_branch.as_str()
        } else {
            branch_arg("base", &req.base)?
        };
        let title = if req.title.trim().is_empty() {
            branch
        } else {
            req.title.trim()
        };
        let ensured = self
            .inner
            .forge
            .ensure_pr(&repo, branch, base, title, &req.body)
            .await
            .map_err(GateError::from)?;
        if ensured.created {
            tracing::info!(number = ensured.pr.number, "pull request opened");
        }
        Ok(Response::new(EnsurePrResponse {
            pr: Some(pr_to_proto(&ensured.pr)),
            created: ensured.created,
        }))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, repo = %request.get_ref().repo, pr = request.get_ref().pr_number))]
    async fn finalize_merge(
        &self,
        request: Request<FinalizeMergeRequest>,
    ) -> Result<Response<FinalizeMergeResponse>, Status> {
        let done = self.finalizer().finalize(request.get_ref()).await?;
        let reply = FinalizeMergeResponse {
            outcome: done.outcome as i32,
            merge_sha: done.merge_sha,
            reason: done.reason,
            retry_after_s: if done.outcome == FinalizeOutcome::RetryLater {
                done.retry_after_s
            } else {
                0
            },
        };
        Ok(Response::new(reply))
    }

    #[tracing::instrument(skip_all)]
    async fn list_leases(
        &self,
        _request: Request<ListLeasesRequest>,
    ) -> Result<Response<ListLeasesResponse>, Status> {
        let leases = store::list(&self.inner.db).await.map_err(GateError::from)?;
        Ok(Response::new(ListLeasesResponse {
            leases: leases.iter().map(lease_to_proto).collect(),
        }))
    }

    #[tracing::instrument(skip_all)]
    async fn list_merges(
        &self,
        request: Request<ListMergesRequest>,
    ) -> Result<Response<ListMergesResponse>, Status> {
        let req = request.get_ref();
        let repo = if req.repo.trim().is_empty() {
            None
        } else {
            Some(repo_arg(&req.repo)?.to_string())
        };
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit.min(1000)
        };
        let rows = store::list_merges(&self.inner.db, repo.as_deref(), i64::from(limit))
            .await
            .map_err(GateError::from)?;
        Ok(Response::new(ListMergesResponse {
            merges: rows
                .into_iter()
                .map(|r| MergeRecord {
                    repo: r.repo,
                    pr_number: u64::try_from(r.pr_number).unwrap_or_default(),
                    work_item: r.work_item,
                    tested_head_sha: r.tested_head_sha,
                    state: r.state.as_str().to_owned(),
                    outcome: r.outcome,
                    merge_sha: r.merge_sha,
                    attempts: u32::try_from(r.attempts).unwrap_or(u32::MAX),
                    last_error: r.last_error,
                    created_at_ms: r.created_at_ms,
                    updated_at_ms: r.updated_at_ms,
                })
                .collect(),
        }))
    }
}
