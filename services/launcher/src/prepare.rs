//! Everything before the agent's spawn: the job's payload validated into what the run works
//! on ([`Ctx`]: stage-engine says what the launcher must know — the task, the artifacts
//! directory, whether the run holds the merge lease or announces its start), the log, the
//! checkout, the prompt file the agent reads (the role's prompt and the task) and the
//! run file (`run-<attempt>.json`) that lets a later life of the launcher finalize the run.

use std::path::{Path, PathBuf};

use orchestrator_forge::RepoName;
use orchestrator_git::{validate_branch, validate_path, validate_work_item_key};
use orchestrator_kit::retry::is_retryable_status;
use orchestrator_kit::time::{now_ms, rfc3339};
use orchestrator_proto::merge_gate::v1::AcquireLeaseRequest;
use serde_json::{Value, json};

use crate::resume::ResumeAsk;
use crate::rules::End;
use crate::run::{again, log_line};
use crate::store::{self, JobRow};
use crate::supervisor::Supervisor;
use crate::workspace::Checkout;

/// What a run works on, validated.
#[derive(Debug, Clone)]
pub(crate) struct Ctx {
    pub key: String,
    pub repo: RepoName,
    pub branch: String,
    pub base: String,
    pub title: String,
    pub why: String,
    pub dedupe_key: String,
    /// The task stage-engine composed (the payload's `task`); not kept in `run-<n>.json`.
    pub task: Option<String>,
    /// Where the work item's artifacts live on its branch (the payload's `artifacts_dir`);
    /// empty when stage-engine did not say.
    pub artifacts_dir: String,
    /// Hold the repository's merge lease for the run (the payload's `needs_merge_lease`).
    pub needs_merge_lease: bool,
    /// Say on the tracker that the agent started (the payload's `announce_start`).
    pub announce_start: bool,
    /// The previous run to resume (the payload's `resume`), see [`crate::resume`].
    pub resume: Option<ResumeAsk>,
}

/// What a run left on disk: enough to finalize it, even from a later life of the launcher
/// (`run-<attempt>.json` in the job's directory).
#[derive(Debug, Clone)]
pub(crate) struct RunFiles {
    pub ctx: Ctx,
    pub checkout: Option<Checkout>,
    pub cwd: PathBuf,
    pub log: PathBuf,
    pub hook_state: Option<PathBuf>,
    pub lease: bool,
    /// The CLI session this run resumes (`--resume`), when it does.
    pub resume_session: Option<String>,
}

impl RunFiles {
    pub(crate) fn to_json(&self) -> Value {
        json!({
            "work_item": self.ctx.key,
            "repo": self.ctx.repo.to_string(),
            "branch": self.ctx.branch,
            "base": self.ctx.base,
            "title": self.ctx.title,
            "dedupe_key": self.ctx.dedupe_key,
            "artifacts_dir": self.ctx.artifacts_dir,
            "start_sha": self.checkout.as_ref().map(|c| c.start_sha.clone()),
            "shared_objects": self.checkout.as_ref().and_then(|c| c.shared_objects.clone()),
            "cwd": self.cwd,
            "log": self.log,
            "hook_state": self.hook_state,
            "lease": self.lease,
        })
    }

    pub(crate) fn from_json(v: &Value) -> Option<RunFiles> {
        let s = |k: &str| v[k].as_str().map(str::to_owned);
        let ctx = Ctx {
            key: s("work_item")?,
            repo: RepoName::parse(&s("repo")?).ok()?,
            branch: s("branch")?,
            base: s("base")?,
            title: s("title").unwrap_or_default(),
            why: String::new(),
            dedupe_key: s("dedupe_key").unwrap_or_default(),
            task: None,
            artifacts_dir: s("artifacts_dir").unwrap_or_default(),
            needs_merge_lease: v["lease"].as_bool().unwrap_or(false),
            announce_start: false,
            resume: None,
        };
        let cwd = PathBuf::from(s("cwd")?);
        Some(RunFiles {
            checkout: s("start_sha").map(|start_sha| Checkout {
                dir: cwd.clone(),
                branch: ctx.branch.clone(),
                base: ctx.base.clone(),
                start_sha,
                shared_objects: s("shared_objects").map(PathBuf::from),
            }),
            ctx,
            cwd,
            log: PathBuf::from(s("log")?),
            hook_state: s("hook_state").map(PathBuf::from),
            lease: v["lease"].as_bool().unwrap_or(false),
            resume_session: None,
        })
    }
}

pub(crate) fn bad_input(reason: impl Into<String>) -> End {
    End::Failed {
        outcome: "bad_input",
        reason: reason.into(),
    }
}

pub(crate) fn run_file(job_dir: &Path, attempt: u32) -> PathBuf {
    job_dir.join(format!("run-{attempt}.json"))
}

impl Supervisor {
    /// Everything before the spawn; an `Err` is how the run ends instead.
    pub(crate) async fn prepare(&self, job: &JobRow, lease: &mut bool) -> Result<RunFiles, End> {
        let c = self.inner.config.clone();
        let payload: Value = if job.payload_json.trim().is_empty() {
            json!({})
        } else {
            serde_json::from_str(&job.payload_json)
                .map_err(|e| bad_input(format!("payload_json is not JSON: {e}")))?
        };
        if !payload.is_object() {
            return Err(bad_input("payload_json is not a JSON object"));
        }
        let key = validate_work_item_key(&job.work_item)
            .map_err(|e| bad_input(e.to_string()))?
            .to_owned();
        let repo = RepoName::parse(&job.repo).map_err(|e| bad_input(e.to_string()))?;
        crate::service::validate_agent(&job.agent).map_err(bad_input)?;
        // The branch first: the payload's, else the work item's, else the convention.
        let branch = match payload["branch"].as_str().filter(|b| !b.is_empty()) {
            Some(b) => b.to_owned(),
            None => match self.inner.peers.work_item(&key).await {
                Ok(item) if !item.branch.is_empty() => item.branch,
                Ok(_) => format!("orch/{key}"),
                Err(s) if is_retryable_status(&s) => {
                    return Err(again(
                        "peer_unavailable",
                        format!(
                            "stage-engine is unavailable to look up the branch: {}",
                            s.message()
                        ),
                        self.backoff(job),
                    ));
                }
                Err(_) => format!("orch/{key}"),
            },
        };
        validate_branch(&branch).map_err(|e| bad_input(e.to_string()))?;
        let base = payload["base"]
            .as_str()
            .filter(|b| !b.is_empty())
            .map_or_else(|| c.forge.base_branch.clone(), str::to_owned);
        validate_branch(&base).map_err(|e| bad_input(format!("base: {e}")))?;
        let ctx = Ctx {
            key: key.clone(),
            repo: repo.clone(),
            branch,
            base,
            title: payload["title"].as_str().unwrap_or_default().to_owned(),
            why: payload["reason"].as_str().unwrap_or_default().to_owned(),
            dedupe_key: job
                .dedupe_key
                .clone()
                .or_else(|| payload["dedupe_key"].as_str().map(str::to_owned))
                .unwrap_or_default(),
            task: payload["task"]
                .as_str()
                .filter(|t| !t.trim().is_empty())
                .map(str::to_owned),
            artifacts_dir: match payload["artifacts_dir"].as_str().unwrap_or_default() {
                "" => String::new(),
                dir => validate_path(dir)
                    .map_err(|e| bad_input(format!("artifacts_dir: {e}")))?
                    .to_owned(),
            },
            needs_merge_lease: payload["needs_merge_lease"].as_bool().unwrap_or(false),
            announce_start: payload["announce_start"].as_bool().unwrap_or(false),
            resume: ResumeAsk::from_payload(&payload).map_err(bad_input)?,
        };
        let prompt_path = c.agents_dir.join(format!("{}.md", job.agent));
        let role_prompt = std::fs::read_to_string(&prompt_path).map_err(|e| {
            bad_input(format!(
                "missing prompt file {} for agent {}: {e}",
                prompt_path.display(),
                job.agent
            ))
        })?;
        if c.deploy_lease && ctx.needs_merge_lease {
            self.acquire_lease(job, &repo).await?;
            *lease = true;
        }
        let job_dir = c.job_dir(&job.id);
        let log = job_dir.join(format!("attempt-{}.log", job.attempt));
        let header = format!(
            "== orchestrator launcher: job {} attempt {}, agent {}, work item {}, branch {}, at {}\n",
            job.id,
            job.attempt,
            job.agent,
            key,
            ctx.branch,
            rfc3339(now_ms())
        );
        std::fs::create_dir_all(&job_dir)
            .and_then(|()| std::fs::write(&log, header))
            .map_err(|e| End::Permanent {
                outcome: "log_failed",
                reason: format!("cannot write the log {}: {e}", log.display()),
                retry: true,
            })?;
        let _ =
            store::set_log_path(self.db(), &job.id, job.attempt, &log.display().to_string()).await;
        // A run that may resume its agent's previous session works where that run worked:
        // the conversation it goes on with names that directory's files, and the CLI files
        // the session under that directory. Its checkout was removed when it delivered; it
        // is made again here, from the branch (a previous run of another machine: its own).
        let cwd = match &ctx.resume {
            Some(ask) if !c.resume_max_age.is_zero() && c.job_dir(&ask.job_id).is_dir() => {
                c.job_dir(&ask.job_id).join("checkout")
            }
            _ => job_dir.join("checkout"),
        };
        let checkout = if c.git {
            match self
                .inner
                .workspace
                .prepare(&cwd, &repo, &ctx.branch, &ctx.base)
                .await
            {
                Ok(co) => Some(co),
                Err(e) => {
                    log_line(&log, &format!("checkout failed: {e}"));
                    return Err(End::Permanent {
                        outcome: "checkout_failed",
                        reason: format!("cannot check out {repo} {}: {e}", ctx.branch),
                        retry: true,
                    });
                }
            }
        } else {
            if cwd.exists() {
                let _ = std::fs::remove_dir_all(&cwd);
            }
            std::fs::create_dir_all(&cwd).map_err(|e| End::Permanent {
                outcome: "checkout_failed",
                reason: format!("cannot create {}: {e}", cwd.display()),
                retry: true,
            })?;
            None
        };
        let hook_state = c
            .qg_hook
            .as_ref()
            .map(|_| job_dir.join(format!("qg-hook-blocks-{}", job.attempt)));
        let resume_session = match &ctx.resume {
            Some(ask) => {
                self.resume_plan(job, ask, checkout.as_ref(), &cwd, &log)
                    .await
            }
            None => None,
        };
        let files = RunFiles {
            ctx,
            checkout,
            cwd,
            log,
            hook_state,
            lease: *lease,
            resume_session,
        };
        let prompt = job_dir.join(format!("prompt-{}.md", job.attempt));
        std::fs::write(&prompt, self.prompt_text(job, &files, &role_prompt))
            .and_then(|()| {
                std::fs::write(run_file(&job_dir, job.attempt), files.to_json().to_string())
            })
            .map_err(|e| End::Permanent {
                outcome: "log_failed",
                reason: format!("cannot write into {}: {e}", job_dir.display()),
                retry: true,
            })?;
        Ok(files)
    }

    pub(crate) async fn acquire_lease(&self, job: &JobRow, repo: &RepoName) -> Result<(), End> {
        let req = AcquireLeaseRequest {
            repo: repo.to_string(),
            holder_job_id: job.id.clone(),
            instance_id: self.config().instance_id.clone(),
            pid: i64::from(std::process::id()),
            ttl_s: 0,
        };
        match self.inner.peers.acquire_lease(req).await {
            Ok(r) if r.acquired => Ok(()),
            Ok(r) => {
                let holder = r.lease.map(|l| l.holder_job_id).unwrap_or_default();
                if holder == job.id {
                    return Ok(());
                }
                Err(again(
                    "lease_busy",
                    format!("the merge lease of {repo} is held by job {holder}"),
                    self.config().lease_retry,
                ))
            }
            Err(s) if is_retryable_status(&s) => Err(End::Again {
                outcome: "peer_unavailable",
                reason: format!(
                    "merge-gate cannot give the merge lease ({:?}): {}",
                    s.code(),
                    s.message()
                ),
                after: self.backoff(job),
                bump: true,
            }),
            Err(s) => Err(bad_input(format!(
                "merge-gate refused the merge lease: {}",
                s.message()
            ))),
        }
    }

    pub(crate) async fn release_lease(&self, job: &JobRow, held: bool) {
        if !held {
            return;
        }
        if let Err(e) = self.inner.peers.release_lease(&job.repo, &job.id).await {
            // A lease left behind expires (TTL) or is reclaimed by the reaper.
            tracing::warn!(job_id = job.id, repo = job.repo, code = ?e.code(), error = e.message(), "cannot release the merge lease");
        }
    }

    /// The role's prompt and the job's task, fed to the agent on stdin (see [`crate::prompt`]);
    /// for a resumed run, only what the gate still lacks.
    fn prompt_text(&self, job: &JobRow, files: &RunFiles, role_prompt: &str) -> String {
        let run = crate::prompt::Run {
            ctx: &files.ctx,
            stage: &job.stage,
            attempt: job.attempt,
            previous: &job.reason,
        };
        match (&files.resume_session, &files.ctx.resume) {
            (Some(_), Some(ask)) => crate::prompt::resumed_prompt_text(
                &run,
                &crate::resume::resume_prompt(&files.ctx.key, &job.stage, ask),
            ),
            _ => crate::prompt::prompt_text(&run, role_prompt),
        }
    }

    /// Whether this run resumes the CLI session of the run stage-engine named, and if so
    /// the session, its transcript carried to where the CLI will look. Anything missing
    /// means a cold start with the whole task, said in the run's log; never a failed job.
    async fn resume_plan(
        &self,
        job: &JobRow,
        ask: &ResumeAsk,
        checkout: Option<&Checkout>,
        cwd: &Path,
        log: &Path,
    ) -> Option<String> {
        let run = match self.inner.peers.last_run(&ask.job_id).await {
            Ok(r) => r,
            Err(s) => {
                tracing::warn!(job_id = job.id, code = ?s.code(), error = s.message(), "usage-ledger cannot say which session to resume; starting cold");
                None
            }
        };
        let session = run
            .as_ref()
            .and_then(|r| r.session_id.as_deref().map(|s| (s, r.recorded_at_ms)));
        let facts = crate::resume::Facts {
            ask,
            max_age: self.config().resume_max_age,
            session,
            now_ms: now_ms(),
            checkout_head: checkout.map(|c| c.start_sha.as_str()),
        };
        let planned = match crate::resume::plan(&facts) {
            crate::resume::Plan::Resume { session } => {
                let real_cwd = std::fs::canonicalize(cwd).unwrap_or_else(|_| cwd.to_path_buf());
                // Where this run's CLI will look: a sandboxed run's HOME is its job's own.
                let sandboxed = matches!(
                    self.config()
                        .sandbox
                        .for_launch(self.config().search_path.as_deref()),
                    Ok(Some(_))
                );
                let carried = match (
                    self.cli_config_dir(&ask.job_id, None),
                    self.cli_config_dir(&job.id, Some(sandboxed)),
                ) {
                    (Some(from), Some(to)) => {
                        crate::resume::carry_transcript(&from, &to, &session, &real_cwd)
                    }
                    _ => Err("the agent's environment has no HOME for the CLI's sessions".into()),
                };
                carried.map(|_| session)
            }
            crate::resume::Plan::Cold { why } => Err(why),
        };
        match planned {
            Ok(session) => {
                log_line(
                    log,
                    &format!("resuming CLI session {session} of job {}", ask.job_id),
                );
                tracing::info!(
                    job_id = job.id,
                    resumed_job = ask.job_id,
                    session,
                    "resuming the previous run's CLI session"
                );
                Some(session)
            }
            Err(why) => {
                log_line(
                    log,
                    &format!("starting cold, not resuming job {}: {why}", ask.job_id),
                );
                tracing::info!(
                    job_id = job.id,
                    resumed_job = ask.job_id,
                    why,
                    "starting cold"
                );
                None
            }
        }
    }

    /// Where the agent CLI of `job_id` keeps (or kept) its state: `CLAUDE_CONFIG_DIR` when
    /// the agent's environment sets one; else `.claude` in its HOME — a sandboxed run's is its
    /// job's `home/` ([`crate::sandbox`]), a bare run's the agent environment's. `sandboxed`:
    /// whether the run is (`None`: a past run, found by what it left).
    pub(crate) fn cli_config_dir(&self, job_id: &str, sandboxed: Option<bool>) -> Option<PathBuf> {
        let env = self.inner.agent_env.vars();
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        if let Some(dir) = get("CLAUDE_CONFIG_DIR").filter(|v| !v.is_empty()) {
            return Some(PathBuf::from(dir));
        }
        let job_home = self.config().job_dir(job_id).join("home").join(".claude");
        let in_job_home = match sandboxed {
            Some(on) => on,
            None => job_home.is_dir(),
        };
        if in_job_home {
            return Some(job_home);
        }
        get("HOME")
            .filter(|v| !v.is_empty())
            .map(|h| Path::new(h).join(".claude"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_files_round_trip() {
        let f = RunFiles {
            ctx: Ctx {
                key: "ORCH-1".into(),
                repo: RepoName::parse("acme/app").expect("repo"),
                branch: "orch/ORCH-1".into(),
                base: "main".into(),
                title: "t".into(),
                why: String::new(),
                dedupe_key: "d".into(),
                task: None,
                artifacts_dir: "docs/work-items/ORCH-1".into(),
                needs_merge_lease: true,
                announce_start: false,
                resume: None,
            },
            checkout: Some(Checkout {
                dir: "/w/jobs/j/checkout".into(),
                branch: "orch/ORCH-1".into(),
                base: "main".into(),
                start_sha: "abc".into(),
                shared_objects: Some("/w/mirrors/o--r.git/objects".into()),
            }),
            cwd: "/w/jobs/j/checkout".into(),
            log: "/w/jobs/j/attempt-1.log".into(),
            hook_state: None,
            lease: true,
            resume_session: None,
        };
        let back = RunFiles::from_json(&f.to_json()).expect("parse");
        assert_eq!(back.checkout, f.checkout);
        assert_eq!(back.log, f.log);
        assert!(back.lease);
        assert_eq!(back.ctx.dedupe_key, "d");
        assert_eq!(back.ctx.artifacts_dir, "docs/work-items/ORCH-1");
    }
}
