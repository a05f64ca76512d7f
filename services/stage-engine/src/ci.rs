//! CI gates the pipeline (ARCHITECTURE §3.16, issue #18). For the repositories in
//! `ORCH_CI_REQUIRED_REPOS`, the `ci_green` check (the `QG_CHECKS` registry, at `review`:
//! before `review -> testing`) reads the combined commit status of the PR's head:
//!
//! - success passes;
//! - failure or error is a negative verdict: the item rolls back to development with each
//!   failing context's name, description and link in the developer's task (`ROLLBACKS`);
//! - pending leaves the finished job's end unapplied: the item waits where it is, no agent
//!   is launched, and the wait is recorded here (`ci_waits`). It is checked again on Gitea's
//!   `status` delivery for the repository (`OnCommitStatus`) and every `ORCH_CI_POLL_S` by
//!   [`run`], through the ONE `advance_stage` with the same job — so once CI has decided,
//!   the item moves exactly as if CI had been green (or red) when the job ended. The stall
//!   watchdog leaves a waiting item alone.
//!
//! The same check gates the merge: it is in the registry at `deploy` too, so `deploy -> done`
//! (whose transaction enqueues the deploy-finalizer, the merge) waits here the same way, and
//! a red CI there rolls back to development. There the head read is the one the deployer's
//! run delivered (`JobRef::head_sha`, kept in the wait), which is the head the finalizer is
//! pinned to: CI passes the very commit that merges, and a head that moved since is refused
//! by merge-gate's `FinalizeMerge`.

use std::time::Duration;

use orchestrator_forge::RepoName;
use orchestrator_kit::time::now_ms;
use orchestrator_kit::{ConfigError, Env};
use sqlx::Row;
use tokio_util::sync::CancellationToken;

use crate::engine::{Advanced, Engine, JobRef};
use crate::error::EngineError;
use crate::pipeline::{Outcome, Status, Trigger};
use crate::qg::{CheckOutcome, CheckResult, CiInput};
use crate::store::{self, WorkItemRow};

/// The name of the check in the registry.
pub const CI_CHECK: &str = "ci_green";

/// Which repositories' merges wait for CI.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum RequiredRepos {
    #[default]
    None,
    /// `*`.
    All,
    Listed(Vec<String>),
}

/// `ORCH_CI_REQUIRED_REPOS` and `ORCH_CI_POLL_S`.
#[derive(Debug, Clone)]
pub struct CiConfig {
    pub required: RequiredRepos,
    /// How often a waiting item's CI is read again (Gitea's `status` delivery is the fast
    /// path).
    pub poll: Duration,
}

impl Default for CiConfig {
    fn default() -> Self {
        CiConfig {
            required: RequiredRepos::None,
            poll: Duration::from_secs(30),
        }
    }
}

impl CiConfig {
    pub fn from_env(env: &Env) -> Result<CiConfig, ConfigError> {
        let raw = env.get("ORCH_CI_REQUIRED_REPOS").unwrap_or_default();
        let names: Vec<&str> = raw
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .collect();
        let required = if names.is_empty() {
            RequiredRepos::None
        } else if names == ["*"] {
            RequiredRepos::All
        } else {
            let mut repos = Vec::new();
            for n in names {
                let repo = RepoName::parse(n).map_err(|e| {
                    ConfigError::new(
                        "ORCH_CI_REQUIRED_REPOS",
                        format!("'{n}' is not owner/name or '*': {e}"),
                    )
                })?;
                repos.push(repo.to_string());
            }
            RequiredRepos::Listed(repos)
        };
        let poll = Duration::from_secs(env.parse("ORCH_CI_POLL_S", 30u64)?);
        if poll.is_zero() {
            return Err(ConfigError::new("ORCH_CI_POLL_S", "must be at least 1"));
        }
        Ok(CiConfig { required, poll })
    }

    /// Returns whether `repo`'s merges wait for CI.
    pub fn requires(&self, repo: &str) -> bool {
        match &self.required {
            RequiredRepos::None => false,
            RequiredRepos::All => true,
            RequiredRepos::Listed(repos) => repos.iter().any(|r| r.eq_ignore_ascii_case(repo)),
        }
    }
}

/// Reads what `ci_green` needs for `item`: the combined status of the head that would move
/// on — the one `job`'s run delivered when the launcher said it, else the PR's head. A forge
/// that is down makes the evaluation UNAVAILABLE (nothing changes; the caller retries).
pub(crate) async fn gather(
    engine: &Engine,
    item: &WorkItemRow,
    job: Option<&JobRef>,
) -> Result<CiInput, EngineError> {
    if !engine.config.ci.requires(&item.repo) {
        return Ok(CiInput::NotRequired);
    }
    let repo = RepoName::parse(&item.repo).map_err(|e| EngineError::Internal(e.to_string()))?;
    let pr = match engine
        .forge
        .find_pr(&repo, &item.branch, &engine.config.base_branch)
        .await
    {
        Ok(Some(pr)) => pr,
        Ok(None) => return Ok(CiInput::Unknown("no PR to read the CI status of".into())),
        Err(e) if e.is_transient() => {
            return Err(EngineError::Unavailable(format!(
                "the forge is unavailable (looking up the PR for CI): {e}"
            )));
        }
        Err(e) => return Ok(CiInput::Unknown(format!("the PR cannot be read: {e}"))),
    };
    // The PR's head, not the branch: the status read is the one of the commit that merges
    // (pinned to what the run delivered, which is what the deploy-finalizer merges).
    let head = match job {
        Some(j) if !j.head_sha.is_empty() => j.head_sha.clone(),
        _ => pr.head_sha,
    };
    match engine.forge.combined_status(&repo, &head).await {
        Ok(status) => Ok(CiInput::Status { head, status }),
        Err(e) if e.is_transient() => Err(EngineError::Unavailable(format!(
            "the forge is unavailable (reading the CI status): {e}"
        ))),
        Err(e) => Ok(CiInput::Unknown(format!(
            "the CI status of {head} cannot be read: {e}"
        ))),
    }
}

/// The detail of a pending `ci_green` in `qg`, if that is what the gate waits for.
pub fn pending_detail(qg: &[CheckResult]) -> Option<&str> {
    qg.iter().find_map(|r| match &r.outcome {
        CheckOutcome::Pending(d) if r.check == CI_CHECK => Some(d.as_str()),
        _ => None,
    })
}

/// One waiting item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CiWait {
    pub work_item: String,
    pub repo: String,
    pub agent: String,
    pub job: JobRef,
    pub detail: String,
    pub since_ms: i64,
}

fn wait_from_row(row: &sqlx::any::AnyRow) -> Result<CiWait, sqlx::Error> {
    Ok(CiWait {
        work_item: row.try_get("work_item")?,
        repo: row.try_get("repo")?,
        agent: row.try_get("agent")?,
        job: JobRef {
            job_id: row.try_get("job_id")?,
            attempt: u32::try_from(row.try_get::<i64, _>("attempt")?).unwrap_or_default(),
            dedupe_key: row.try_get("dedupe_key")?,
            pr_number: u64::try_from(row.try_get::<i64, _>("pr_number")?).unwrap_or_default(),
            head_sha: row.try_get("head_sha")?,
        },
        detail: row.try_get("detail")?,
        since_ms: row.try_get("since_ms")?,
    })
}

/// Every waiting item, the oldest first.
pub async fn waits(engine: &Engine) -> Result<Vec<CiWait>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT work_item, repo, agent, job_id, attempt, dedupe_key, pr_number, head_sha, detail, since_ms FROM ci_waits ORDER BY since_ms",
    )
    .fetch_all(&engine.db.pool)
    .await?;
    rows.iter().map(wait_from_row).collect()
}

/// Whether `key` waits for CI.
pub(crate) async fn waiting(engine: &Engine, key: &str) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query("SELECT 1 FROM ci_waits WHERE work_item = $1")
        .bind(key)
        .fetch_optional(&engine.db.pool)
        .await?
        .is_some())
}

async fn clear(engine: &Engine, key: &str) -> Result<(), sqlx::Error> {
    sqlx::query("DELETE FROM ci_waits WHERE work_item = $1")
        .bind(key)
        .execute(&engine.db.pool)
        .await?;
    Ok(())
}

/// Records (or clears) the wait after `advance_stage` answered `a` for `agent`'s `job`: an
/// unchanged answer whose gate found only CI pending waits; anything else does not.
pub(crate) async fn note(
    engine: &Engine,
    key: &str,
    agent: &str,
    job: Option<&JobRef>,
    a: &Advanced,
) -> Result<(), sqlx::Error> {
    let (Some(job), Outcome::Unchanged, Some(detail)) = (job, a.outcome, pending_detail(&a.qg))
    else {
        if a.outcome != Outcome::Unchanged {
            clear(engine, key).await?;
        }
        return Ok(());
    };
    let mut tx = engine.db.pool.begin().await?;
    sqlx::query("DELETE FROM ci_waits WHERE work_item = $1")
        .bind(key)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO ci_waits (work_item, repo, agent, job_id, attempt, dedupe_key, pr_number, head_sha, detail, since_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(key)
    .bind(&a.item.repo)
    .bind(agent)
    .bind(&job.job_id)
    .bind(i64::from(job.attempt))
    .bind(&job.dedupe_key)
    .bind(i64::try_from(job.pr_number).unwrap_or_default())
    .bind(&job.head_sha)
    .bind(detail)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    tracing::info!(work_item = key, detail, "waiting for CI: no agent launched");
    Ok(())
}

impl Engine {
    /// Checks one waiting item again: its job's end through `advance_stage`. The wait ends
    /// when the item moved (CI decided), or when it no longer waits on that job.
    pub async fn recheck_ci(&self, w: &CiWait) -> Result<Option<Advanced>, EngineError> {
        let Some(item) = store::get(&self.db, &w.work_item).await? else {
            clear(self, &w.work_item).await?;
            return Ok(None);
        };
        if item.status != Status::Active
            || (!item.latest_job_id.is_empty() && item.latest_job_id != w.job.job_id)
        {
            clear(self, &w.work_item).await?;
            return Ok(None);
        }
        let a = self
            .advance_stage(
                &w.work_item,
                Trigger::AgentFinished {
                    agent: w.agent.clone(),
                },
                Some(w.job.clone()),
                None,
            )
            .await?;
        if a.outcome == Outcome::Unchanged && pending_detail(&a.qg).is_some() {
            // Still waiting: what it waits for now (a context started running, say).
            note(self, &w.work_item, &w.agent, Some(&w.job), &a).await?;
        } else {
            clear(self, &w.work_item).await?;
        }
        Ok(Some(a))
    }

    /// `OnCommitStatus`: a CI status was posted in `repo`: every item of `repo` that waits
    /// for CI is checked again now. Returns how many were.
    pub async fn on_commit_status(&self, repo: &str) -> Result<u32, EngineError> {
        let mut n = 0;
        for w in waits(self).await? {
            if !w.repo.eq_ignore_ascii_case(repo) {
                continue;
            }
            n += 1;
            if let Err(e) = self.recheck_ci(&w).await {
                // The poll tries again; one item never stops the others.
                tracing::warn!(work_item = w.work_item, error = %e, "ci re-check failed");
            }
        }
        Ok(n)
    }
}

/// Checks every waiting item again every `ORCH_CI_POLL_S`, until `shutdown`. One item's
/// error is logged and tried at the next pass.
pub async fn run(engine: Engine, shutdown: CancellationToken) {
    let every = engine.config.ci.poll;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
        let all = match waits(&engine).await {
            Ok(all) => all,
            Err(e) => {
                tracing::warn!(error = %e, "ci poll cannot read its waits");
                continue;
            }
        };
        for w in all {
            match engine.recheck_ci(&w).await {
                Ok(Some(a)) if a.outcome != Outcome::Unchanged => {
                    tracing::info!(
                        work_item = w.work_item,
                        outcome = a.outcome.as_str(),
                        reason = a.reason,
                        "ci decided"
                    );
                }
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(work_item = w.work_item, error = %e, "ci re-check failed; the next poll tries again");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_required_repositories_come_from_the_variable() {
        let env = |v: &str| Env::default().with("ORCH_CI_REQUIRED_REPOS", v);
        let c = CiConfig::from_env(&Env::default()).expect("default");
        assert!(!c.requires("acme/app"));
        assert_eq!(c.poll, Duration::from_secs(30));
        let c = CiConfig::from_env(&env("*")).expect("all");
        assert!(c.requires("any/repo"));
        let c = CiConfig::from_env(&env(" acme/app , acme/web ")).expect("listed");
        assert!(c.requires("acme/app") && c.requires("ACME/web") && !c.requires("acme/other"));
        let e = CiConfig::from_env(&env("acme/app,--evil")).expect_err("bad name");
        assert!(e.to_string().contains("ORCH_CI_REQUIRED_REPOS"), "{e}");
        let e = CiConfig::from_env(&Env::default().with("ORCH_CI_POLL_S", "0")).expect_err("0");
        assert!(e.to_string().contains("ORCH_CI_POLL_S"), "{e}");
    }
}
