//! `stage-engine [--items N] [--postgres URL]`: the engine over its real storage (SQLite
//!   in a temp dir, or PostgreSQL): CreateWorkItem, then AdvanceStage through the analysis
//!   gate (artifact read from an in-memory forge), then the outbox delivered (local tracker
//!   comments, enqueues to a no-op launcher). Prints throughput and per-call latency.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use async_trait::async_trait;
use orchestrator_forge::{
    EnsuredPr, Forge, ForgeError, ForgeKind, MergeOutcome, PullRequest, RepoName,
};
use orchestrator_kit::db::{self, Location};
use orchestrator_kit::{Env, Secret, ServiceName};
use orchestrator_proto::launcher::v1::{
    CancelJobRequest, CancelJobResponse, EnqueueRequest, EnqueueResponse, Job,
};
use orchestrator_proto::post_deploy::v1::{ArmRequest, ArmResponse};
use stage_engine::engine::{JobRef, NewWorkItem};
use stage_engine::peers::Peers;
use stage_engine::pipeline::{Outcome, Trigger};
use stage_engine::qg::Mergeability;
use stage_engine::{StageEngineConfig, StageEngineService};

/// A forge whose every branch holds a valid analysis.
struct StaticForge;

#[async_trait]
impl Forge for StaticForge {
    fn kind(&self) -> ForgeKind {
        ForgeKind::Local
    }
    async fn repo_exists(&self, _: &RepoName) -> Result<bool, ForgeError> {
        Ok(true)
    }
    async fn branch_exists(&self, _: &RepoName, _: &str) -> Result<bool, ForgeError> {
        Ok(true)
    }
    async fn ensure_pr(
        &self,
        _: &RepoName,
        _: &str,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<EnsuredPr, ForgeError> {
        Err(ForgeError::NotFound("not in this bench".into()))
    }
    async fn find_pr(
        &self,
        _: &RepoName,
        _: &str,
        _: &str,
    ) -> Result<Option<PullRequest>, ForgeError> {
        Ok(None)
    }
    async fn get_pr(&self, _: &RepoName, _: u64) -> Result<Option<PullRequest>, ForgeError> {
        Ok(None)
    }
    async fn merge_pr(&self, _: &RepoName, _: u64, _: &str) -> Result<MergeOutcome, ForgeError> {
        Err(ForgeError::NotFound("not in this bench".into()))
    }
    async fn read_file(
        &self,
        _: &RepoName,
        _: &str,
        path: &str,
    ) -> Result<Option<String>, ForgeError> {
        let key = path.split('/').nth(2).unwrap_or_default();
        Ok(Some(format!("---\nwork_item: {key}\n---\nThe plan.\n")))
    }
    fn pr_url(&self, _: &RepoName, n: u64) -> String {
        format!("bench://pulls/{n}")
    }
    fn file_url(&self, _: &RepoName, b: &str, p: &str) -> String {
        format!("bench://{b}/{p}")
    }
    fn clone_url(&self, r: &RepoName) -> String {
        format!("bench://{r}")
    }
    fn git_auth_env(&self) -> Vec<(String, Secret)> {
        Vec::new()
    }
}

/// Peers that answer at once.
struct NoopPeers;

#[async_trait]
impl Peers for NoopPeers {
    async fn check_branch_mergeable(
        &self,
        _: &str,
        _: &str,
        _: &str,
    ) -> Result<Mergeability, tonic::Status> {
        Ok(Mergeability::Mergeable)
    }
    async fn enqueue(&self, r: EnqueueRequest) -> Result<EnqueueResponse, tonic::Status> {
        Ok(EnqueueResponse {
            job: Some(Job {
                id: format!("job-{}", r.dedupe_key),
                ..Job::default()
            }),
            created: true,
        })
    }
    async fn work_item_summary(&self, k: &str) -> Result<String, tonic::Status> {
        Ok(format!("Usage for {k}"))
    }
    async fn arm(&self, _: ArmRequest) -> Result<ArmResponse, tonic::Status> {
        Ok(ArmResponse::default())
    }
    async fn cancel_job(&self, _: CancelJobRequest) -> Result<CancelJobResponse, tonic::Status> {
        Ok(CancelJobResponse::default())
    }
    async fn jobs_of(&self, _: &str) -> Result<Vec<Job>, tonic::Status> {
        Ok(Vec::new())
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted.get(i).copied().unwrap_or_default()
}

fn report(name: &str, mut lat: Vec<Duration>, total: Duration) {
    lat.sort();
    println!(
        "{name:<28} {:>7} calls  {:>8.0}/s  p50 {:>7.3} ms  p99 {:>7.3} ms",
        lat.len(),
        lat.len() as f64 / total.as_secs_f64(),
        percentile(&lat, 0.5).as_secs_f64() * 1e3,
        percentile(&lat, 0.99).as_secs_f64() * 1e3,
    );
}

pub async fn run(items: usize, postgres: Option<String>) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let location = match &postgres {
        Some(t) if t == "throwaway" => {
            let cluster = orchestrator_testkit::cluster().map_err(anyhow::Error::msg)?;
            Location::Postgres(Secret::new(cluster.fresh_database().await))
        }
        Some(url) => Location::Postgres(Secret::new(url.clone())),
        None => Location::SqliteDir(dir.path().to_path_buf()),
    };
    let db = db::open(ServiceName::StageEngine, &location, &stage_engine::MIGRATOR)
        .await
        .context("open storage")?;
    let config = StageEngineConfig::from_env(&Env::default())?;
    let svc = StageEngineService::from_parts(
        db,
        config,
        Arc::new(StaticForge),
        Arc::new(NoopPeers),
        None,
    )?;
    let engine = svc.engine().clone();
    let run = std::process::id();
    let keys: Vec<String> = (0..items).map(|i| format!("B{run}-{}", i + 1)).collect();

    let mut lat = Vec::with_capacity(items);
    let started = Instant::now();
    for key in &keys {
        let t = Instant::now();
        engine
            .create_work_item(NewWorkItem {
                tracker_issue_id: format!("issue-{key}"),
                key: key.clone(),
                repo: "acme/app".into(),
                title: "bench".into(),
                ..NewWorkItem::default()
            })
            .await?;
        lat.push(t.elapsed());
    }
    report("CreateWorkItem", lat, started.elapsed());

    let dispatcher = engine.dispatcher();
    let started = Instant::now();
    let mut delivered = 0;
    loop {
        let n = dispatcher.deliver_due().await?;
        if n == 0 {
            break;
        }
        delivered += n;
    }
    let total = started.elapsed();
    println!(
        "{:<28} {delivered:>7} entries {:>8.0}/s",
        "outbox delivery (2/item)",
        delivered as f64 / total.as_secs_f64()
    );

    let mut lat = Vec::with_capacity(items);
    let mut outcomes: BTreeMap<&str, usize> = BTreeMap::new();
    let started = Instant::now();
    for key in &keys {
        let t = Instant::now();
        let job_id = stage_engine::store::get(&engine.db_handle(), key)
            .await?
            .map(|i| i.latest_job_id)
            .unwrap_or_default();
        let a = engine
            .advance_stage(
                key,
                Trigger::AgentFinished {
                    agent: "analyst".into(),
                },
                Some(JobRef {
                    job_id,
                    attempt: 1,
                    dedupe_key: String::new(),
                    ..JobRef::default()
                }),
                None,
            )
            .await?;
        lat.push(t.elapsed());
        *outcomes.entry(a.outcome.as_str()).or_default() += 1;
    }
    report("AdvanceStage (analysis QG)", lat, started.elapsed());
    anyhow::ensure!(
        outcomes.get(Outcome::AwaitingApproval.as_str()) == Some(&items),
        "unexpected outcomes: {outcomes:?}"
    );
    Ok(())
}
