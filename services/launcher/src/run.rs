//! One run of an LLM job: look up the branch, check it out, build the command, spawn the
//! agent in its own group, stamp its pid, watch it, then finalize — classify, and on
//! success commit, push and ensure the PR (the launcher's own work, done here). What the
//! run tells its peers (RecordRun, the finish comment under the agent's bot, AdvanceStage
//! or ReportJobFailed) is written with the job's end and delivered by the outbox
//! ([`crate::outbox`]): the job's status never waits for a peer.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrator_agent_output::{TAIL_BYTES, parse_result};
use orchestrator_forge::{PullRequest, RepoName};
use orchestrator_git::{validate_branch, validate_work_item_key};
use orchestrator_kit::retry::{Backoff, is_retryable_status};
use orchestrator_kit::time::{now_ms, rfc3339};
use orchestrator_proto::merge_gate::v1::AcquireLeaseRequest;
use serde_json::{Value, json};

use crate::agent::{self, Ended, Launch};
use crate::classify::{Evidence, RunExit, Verdict, classify};
use crate::config::{Failpoint, shell_quote};
use crate::outbox::{Effect, Finalizer};
use crate::rules::End;
use crate::store::{self, JobRow};
use crate::supervisor::{RunHandle, StopReason, Supervisor, html_escape};
use crate::workspace::Checkout;

/// The agents that run stages (and have their own tracker bot).
pub const ROLES: [&str; 6] = [
    "analyst",
    "architect",
    "developer",
    "reviewer",
    "tester",
    "deployer",
];

/// The role as people read it: `developer` -> `Developer`, `deploy-finalizer` ->
/// `Deploy finalizer`.
pub fn role_title(agent: &str) -> String {
    let spaced = agent.replace(['-', '_'], " ");
    let mut chars = spaced.chars();
    match chars.next() {
        Some(c) => c.to_uppercase().chain(chars).collect(),
        None => "Agent".to_owned(),
    }
}

/// Where a work item's artifacts live on its branch.
pub fn artifacts_dir(key: &str) -> String {
    format!("docs/work-items/{key}")
}

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
}

impl RunFiles {
    fn to_json(&self) -> Value {
        json!({
            "work_item": self.ctx.key,
            "repo": self.ctx.repo.to_string(),
            "branch": self.ctx.branch,
            "base": self.ctx.base,
            "title": self.ctx.title,
            "dedupe_key": self.ctx.dedupe_key,
            "start_sha": self.checkout.as_ref().map(|c| c.start_sha.clone()),
            "cwd": self.cwd,
            "log": self.log,
            "hook_state": self.hook_state,
            "lease": self.lease,
        })
    }

    fn from_json(v: &Value) -> Option<RunFiles> {
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
        };
        let cwd = PathBuf::from(s("cwd")?);
        Some(RunFiles {
            checkout: s("start_sha").map(|start_sha| Checkout {
                dir: cwd.clone(),
                branch: ctx.branch.clone(),
                base: ctx.base.clone(),
                start_sha,
            }),
            ctx,
            cwd,
            log: PathBuf::from(s("log")?),
            hook_state: s("hook_state").map(PathBuf::from),
            lease: v["lease"].as_bool().unwrap_or(false),
        })
    }
}

fn bad_input(reason: impl Into<String>) -> End {
    End::Failed {
        outcome: "bad_input",
        reason: reason.into(),
    }
}

fn run_file(job_dir: &Path, attempt: u32) -> PathBuf {
    job_dir.join(format!("run-{attempt}.json"))
}

/// Appends a line to the run log (best effort: the log is for people).
fn log_line(log: &Path, line: &str) {
    if let Ok(mut f) = std::fs::OpenOptions::new().append(true).open(log) {
        let _ = writeln!(f, "== {line}");
    }
}

/// The last `TAIL_BYTES` of the log, lossily decoded.
pub(crate) fn read_tail(path: &Path) -> String {
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let start = len.saturating_sub(TAIL_BYTES as u64);
    if f.seek(SeekFrom::Start(start)).is_err() {
        return String::new();
    }
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

impl Supervisor {
    pub(crate) async fn run_llm(&self, job: JobRow, h: RunHandle) {
        let mut lease = false;
        let files = match self.prepare(&job, &mut lease).await {
            Ok(f) => f,
            Err(end) => {
                self.end_run(&job, end, None, None).await;
                self.release_lease(&job, lease).await;
                return;
            }
        };
        let started = Instant::now();
        let argv = self.argv(&job, &files).await;
        let argv = match argv {
            Ok(a) => a,
            Err(end) => {
                log_line(&files.log, &format!("not started: {end:?}"));
                self.end_run(&job, end, None, None).await;
                self.release_lease(&job, files.lease).await;
                return;
            }
        };
        let prompt = self
            .config()
            .job_dir(&job.id)
            .join(format!("prompt-{}.md", job.attempt));
        let job_vars = vec![
            ("ORCH_JOB_ID".to_owned(), job.id.clone()),
            ("ORCH_JOB_ATTEMPT".to_owned(), job.attempt.to_string()),
            ("ORCH_WORK_ITEM".to_owned(), files.ctx.key.clone()),
            ("ORCH_AGENT".to_owned(), job.agent.clone()),
            ("ORCH_STAGE".to_owned(), job.stage.clone()),
            ("ORCH_REPO".to_owned(), files.ctx.repo.to_string()),
            ("ORCH_BRANCH".to_owned(), files.ctx.branch.clone()),
            (
                "ORCH_ARTIFACTS_DIR".to_owned(),
                artifacts_dir(&files.ctx.key),
            ),
            ("ORCH_PROMPT_FILE".to_owned(), prompt.display().to_string()),
        ];
        let sandbox = match self.jail(&job, &files, &prompt) {
            Ok(s) => s,
            Err(reason) => {
                log_line(&files.log, &format!("not started: {reason}"));
                let end = End::Failed {
                    outcome: "sandbox_unavailable",
                    reason,
                };
                self.end_run(&job, end, None, None).await;
                self.release_lease(&job, files.lease).await;
                return;
            }
        };
        // The isolated sandbox's way out, for as long as the run lasts.
        let _egress = match sandbox.as_ref().and_then(|(_, j)| j.egress.as_ref()) {
            None => None,
            Some(plan) => {
                match crate::egress::Egress::start(&plan.socket, plan.allow.clone(), job.id.clone())
                {
                    Ok(e) => Some(e),
                    Err(e) => {
                        let reason = format!(
                            "cannot listen on the egress socket {}: {e}",
                            plan.socket.display()
                        );
                        log_line(&files.log, &format!("not started: {reason}"));
                        let end = End::Permanent {
                            outcome: "spawn_failed",
                            reason,
                            retry: true,
                        };
                        self.end_run(&job, end, None, None).await;
                        self.release_lease(&job, files.lease).await;
                        return;
                    }
                }
            }
        };
        let mut profile = self.config().profiles.for_agent(&job.agent).to_json();
        profile["sandbox"] = json!(if sandbox.is_some() { "on" } else { "off" });
        profile["network"] = match sandbox.as_ref().and_then(|(_, j)| j.egress.as_ref()) {
            Some(plan) => json!({"isolated": true, "allowed": plan.allow.0}),
            None => json!({"isolated": false, "allowed": profile["network"].clone()}),
        };
        let _ = store::set_profile(self.db(), &job.id, job.attempt, &profile.to_string()).await;
        let launch = Launch {
            argv: argv.clone(),
            cwd: &files.cwd,
            prompt: &prompt,
            log: &files.log,
            env: &self.inner.agent_env,
            job_vars,
            sandbox,
        };
        let mut child = match agent::spawn(&launch) {
            Ok(c) => c,
            Err(e) => {
                log_line(&files.log, &format!("cannot start the agent: {e}"));
                let end = match &e {
                    agent::SpawnError::NotFound(_) => bad_input(e.to_string()),
                    _ => End::Permanent {
                        outcome: "spawn_failed",
                        reason: e.to_string(),
                        retry: true,
                    },
                };
                self.end_run(&job, end, None, None).await;
                self.release_lease(&job, files.lease).await;
                return;
            }
        };
        let pid = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
        h.pid.store(pid, std::sync::atomic::Ordering::SeqCst);
        let stamped = store::stamp_pid(
            self.db(),
            &job.id,
            job.attempt,
            &self.config().instance_id,
            i64::from(pid),
            now_ms(),
        )
        .await;
        if !matches!(stamped, Ok(true)) {
            // Cancelled or flipped between the claim and the spawn (or storage is gone):
            // the process must not run unsupervised.
            tracing::warn!(job_id = job.id, pid, stamped = ?stamped, "could not stamp the pid; stopping the agent");
            agent::kill_group(pid, self.config().kill_grace, Some(&mut child)).await;
            self.release_lease(&job, files.lease).await;
            return;
        }
        tracing::info!(
            job_id = job.id,
            attempt = job.attempt,
            pid,
            agent = job.agent,
            "agent started"
        );
        if job.agent == "analyst" && job.attempt == 1 {
            let me = self.clone();
            let (key, id) = (files.ctx.key.clone(), job.id.clone());
            tokio::spawn(async move {
                let html = format!(
                    "<p>Analyst started on {} (job {}).</p>",
                    html_escape(&key),
                    html_escape(&id)
                );
                me.comment(&key, &html, "analyst", &format!("launcher:{id}:start"))
                    .await;
            });
        }
        let timeout = self.config().timeout_for(&job.agent);
        let ended = agent::watch(&mut child, pid, timeout, self.config().kill_grace, &h.stop).await;
        let took = started.elapsed();
        let exit = match ended {
            Ended::Stopped => {
                match h.reason() {
                    Some(StopReason::Shutdown) => {
                        log_line(
                            &files.log,
                            "stopped: the launcher is shutting down; the job goes back to the queue",
                        );
                        let end = End::Again {
                            outcome: "handed_back",
                            reason: "the launcher shut down while it ran".to_owned(),
                            after: Duration::ZERO,
                            bump: false,
                        };
                        self.end_run(&job, end, None, None).await;
                    }
                    _ => log_line(
                        &files.log,
                        "stopped: the job was ended elsewhere (cancelled or flipped)",
                    ),
                }
                self.release_lease(&job, files.lease).await;
                return;
            }
            Ended::TimedOut => {
                log_line(
                    &files.log,
                    &format!(
                        "timed out after {:.1}s: SIGTERM to the group, SIGKILL after {:.1}s if still alive",
                        timeout.as_secs_f64(),
                        self.config().kill_grace.as_secs_f64()
                    ),
                );
                RunExit {
                    code: Some(-9),
                    timed_out: true,
                }
            }
            Ended::Exited(code) => {
                log_line(
                    &files.log,
                    &format!(
                        "exit {} after {:.1}s",
                        code.map_or("?".to_owned(), |c| c.to_string()),
                        took.as_secs_f64()
                    ),
                );
                RunExit {
                    code,
                    timed_out: false,
                }
            }
        };
        let _ = store::stamp_exit(self.db(), &job.id, job.attempt, exit.code.unwrap_or(-1)).await;
        if self.config().failpoint == Some(Failpoint::BeforeFinalize) {
            tracing::warn!(
                job_id = job.id,
                attempt = job.attempt,
                "ORCH_TEST_FAILPOINT=launcher.before_finalize: the launcher kills itself (SIGKILL)"
            );
            crate::proc::sigkill_self();
        }
        self.finalize(&job, &files, exit, timeout).await;
    }

    /// The sandbox of this run (`None`: bare, as `ORCH_AGENT_SANDBOX` allows); `Err` when
    /// the sandbox is required and does not work here.
    fn jail(
        &self,
        job: &JobRow,
        files: &RunFiles,
        prompt: &Path,
    ) -> Result<Option<(&crate::sandbox::SandboxConfig, crate::sandbox::Jail)>, String> {
        let c = self.config();
        let profile = c.profiles.for_agent(&job.agent);
        let Some(bwrap) = c.sandbox.for_launch(c.search_path.as_deref())? else {
            if profile.allows_everything() {
                return Err(format!(
                    "the profile [{}] allows everything (dangerously_skip_permissions or \
                     bypassPermissions) and the agent sandbox is not on",
                    profile.name
                ));
            }
            return Ok(None);
        };
        let mut jail = crate::sandbox::Jail::for_run(
            bwrap,
            &c.job_dir(&job.id),
            &files.cwd,
            prompt,
            files.hook_state.as_deref(),
            &c.agent_command,
            c.qg_hook.as_ref().map(|h| h.command.as_str()),
            c.search_path.as_deref(),
        );
        if c.sandbox.network == crate::sandbox::NetworkMode::Isolated {
            let model_url = self
                .inner
                .agent_env
                .vars()
                .iter()
                .find(|(k, _)| k == "ANTHROPIC_BASE_URL")
                .map(|(_, v)| v.as_str());
            jail.egress = Some(crate::sandbox::EgressPlan::new(
                c.job_dir(&job.id).join("egress.sock"),
                model_url,
                &profile.network,
            ));
        }
        Ok(Some((&c.sandbox, jail)))
    }

    /// Everything before the spawn; an `Err` is how the run ends instead.
    async fn prepare(&self, job: &JobRow, lease: &mut bool) -> Result<RunFiles, End> {
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
        };
        let prompt_path = c.agents_dir.join(format!("{}.md", job.agent));
        let role_prompt = std::fs::read_to_string(&prompt_path).map_err(|e| {
            bad_input(format!(
                "missing prompt file {} for agent {}: {e}",
                prompt_path.display(),
                job.agent
            ))
        })?;
        if c.deploy_lease && job.stage == "deploy" {
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
        let cwd = job_dir.join("checkout");
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
        let files = RunFiles {
            ctx,
            checkout,
            cwd,
            log,
            hook_state,
            lease: *lease,
        };
        let prompt = job_dir.join(format!("prompt-{}.md", job.attempt));
        std::fs::write(&prompt, self.prompt_text(job, &files.ctx, &role_prompt))
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

    fn backoff(&self, job: &JobRow) -> Duration {
        Backoff::new(self.config().backoff_base, self.config().backoff_max)
            .delay(job.transient_attempts + 1)
    }

    async fn acquire_lease(&self, job: &JobRow, repo: &RepoName) -> Result<(), End> {
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

    /// The role's prompt and the job's task, fed to the agent on stdin (see [`crate::prompt`]).
    fn prompt_text(&self, job: &JobRow, ctx: &Ctx, role_prompt: &str) -> String {
        let run = crate::prompt::Run {
            ctx,
            stage: &job.stage,
            attempt: job.attempt,
            previous: &job.reason,
        };
        crate::prompt::prompt_text(&run, role_prompt)
    }

    /// The command and the flags the launcher adds: the agent's profile (its tools, model,
    /// turns), the budget (the smaller of the profile's and the work item's remaining) and
    /// the quality gate as the Stop hook (never `--bare`: it would skip hooks).
    async fn argv(&self, job: &JobRow, files: &RunFiles) -> Result<Vec<String>, End> {
        let c = self.config();
        let mut argv = c.agent_command.clone();
        let profile = c.profiles.for_agent(&job.agent);
        argv.extend(profile.cli_flags());
        let mut budget_usd = profile.budget_usd;
        if let Some(budget) = c.work_item_budget_usd {
            let spent = match self.inner.peers.spent_usd(&files.ctx.key).await {
                Ok(s) => s,
                Err(s) if is_retryable_status(&s) => {
                    return Err(again(
                        "peer_unavailable",
                        format!(
                            "usage-ledger is unavailable to tell what {} has spent: {}",
                            files.ctx.key,
                            s.message()
                        ),
                        self.backoff(job),
                    ));
                }
                Err(s) => return Err(bad_input(format!("usage-ledger refused: {}", s.message()))),
            };
            if spent >= budget {
                let reason = format!(
                    "the work item's budget is spent: ${spent:.2} of ${budget:.2} (ORCH_WORK_ITEM_BUDGET_USD)"
                );
                let html = format!(
                    "<p>{} is blocked: {}. Raise the budget or finish the work by hand.</p>",
                    html_escape(&files.ctx.key),
                    html_escape(&reason)
                );
                self.comment(
                    &files.ctx.key,
                    &html,
                    "stream",
                    &format!("launcher:{}:budget", job.id),
                )
                .await;
                return Err(End::Failed {
                    outcome: "budget_blocked",
                    reason,
                });
            }
            let rest = budget - spent;
            budget_usd = Some(budget_usd.map_or(rest, |b| b.min(rest)));
        }
        if let Some(b) = budget_usd {
            argv.push("--max-budget-usd".to_owned());
            argv.push(format!("{b:.4}"));
        }
        if let (Some(hook), Some(state)) = (&c.qg_hook, &files.hook_state) {
            let command = format!(
                "{} --work-item {} --stage {} --dir {} --state-file {} --max-blocks {}",
                hook.command,
                shell_quote(&files.ctx.key),
                shell_quote(&job.stage),
                shell_quote(&files.cwd.display().to_string()),
                shell_quote(&state.display().to_string()),
                hook.max_blocks
            );
            let settings =
                json!({"hooks": {"Stop": [{"hooks": [{"type": "command", "command": command}]}]}});
            argv.push("--settings".to_owned());
            argv.push(settings.to_string());
        }
        Ok(argv)
    }

    /// Finalizes a run of this launcher's previous life whose process is gone.
    pub(crate) async fn finalize_orphan(&self, job: JobRow) {
        let job_dir = self.config().job_dir(&job.id);
        let files = std::fs::read_to_string(run_file(&job_dir, job.attempt))
            .ok()
            .and_then(|t| serde_json::from_str::<Value>(&t).ok())
            .and_then(|v| RunFiles::from_json(&v));
        let Some(files) = files else {
            let end = End::Permanent {
                outcome: "orphaned",
                reason: "the launcher restarted before the agent started".to_owned(),
                retry: true,
            };
            self.end_run(&job, end, None, None).await;
            return;
        };
        log_line(
            &files.log,
            "the launcher restarted; finalizing this run from its log",
        );
        let exit = RunExit {
            code: job.exit_code,
            timed_out: false,
        };
        let timeout = self.config().timeout_for(&job.agent);
        self.finalize(&job, &files, exit, timeout).await;
    }

    async fn finalize(&self, job: &JobRow, files: &RunFiles, exit: RunExit, timeout: Duration) {
        let tail = read_tail(&files.log);
        let result = parse_result(&tail);
        // Every run that happened is accounted for, whatever it came to (RecordRun is
        // idempotent on the job and attempt); the run's outcome does not wait for it.
        let mut effects = vec![Effect::RecordRun {
            job_id: job.id.clone(),
            attempt: job.attempt,
            agent: job.agent.clone(),
            output: tail.clone(),
        }];
        let qg_hook_blocks = files.hook_state.as_deref().map(|p| {
            std::fs::read_to_string(p)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0)
        });
        let work_done = match &files.checkout {
            Some(co) => self.inner.workspace.work_done(co).await.ok(),
            None => None,
        };
        let verdict = classify(&Evidence {
            exit,
            result: result.as_ref(),
            log_tail: &tail,
            work_done,
            now_ms: now_ms(),
        });
        tracing::info!(job_id = job.id, attempt = job.attempt, verdict = verdict.kind(), exit = ?exit.code, "run classified");
        self.on_outcome(matches!(verdict, Verdict::Transient { .. }))
            .await;
        let end = match verdict {
            Verdict::Success => {
                let (end, success) = self.deliver_success(job, files, qg_hook_blocks).await;
                effects.extend(success);
                end
            }
            Verdict::Transient { reason, wait } => End::Transient { reason, wait },
            Verdict::Permanent { reason, retry } => {
                let (outcome, reason) = if exit.timed_out {
                    (
                        "timeout",
                        format!("timed out after {}s", timeout.as_secs_f64()),
                    )
                } else {
                    ("permanent", reason)
                };
                End::Permanent {
                    outcome,
                    reason,
                    retry,
                }
            }
        };
        let succeeded = matches!(end, End::Succeeded { .. });
        let written = self
            .end_run_with(job, end, exit.code, qg_hook_blocks, effects)
            .await;
        self.release_lease(job, files.lease).await;
        if succeeded
            && written.is_some()
            && let Some(co) = &files.checkout
        {
            // The work is on the forge now; the log stays for TailLog and people.
            let _ = std::fs::remove_dir_all(&co.dir);
        }
    }

    /// Feeds the circuit breaker (LLM outcomes only).
    async fn on_outcome(&self, transient: bool) {
        let c = self.config();
        let now = now_ms();
        let r = if transient {
            let cooldown = i64::try_from(c.breaker_cooldown.as_millis()).unwrap_or(i64::MAX);
            store::breaker_on_transient(self.db(), c.breaker_threshold, cooldown, now)
                .await
                .map(|b| {
                    if b.state == "open" {
                        tracing::warn!(
                            consecutive_transient = b.consecutive_transient,
                            open_until_ms = b.open_until_ms,
                            "circuit breaker open: LLM claims pause"
                        );
                    }
                })
        } else {
            store::breaker_on_other(self.db(), now).await
        };
        if let Err(e) = r {
            tracing::warn!(error = %e, "cannot update the circuit breaker");
        }
    }

    /// The success path: commit and push, ensure the PR; then the effects that follow the
    /// job's end: the finish comment and AdvanceStage (carrying the deploy-finalizer's
    /// payload after a deploy). A push or PR that fails is the run's failure.
    async fn deliver_success(
        &self,
        job: &JobRow,
        files: &RunFiles,
        qg_hook_blocks: Option<u32>,
    ) -> (End, Vec<Effect>) {
        let ctx = &files.ctx;
        let forge = self.inner.workspace.forge().clone();
        let mut notes: Vec<String> = Vec::new();
        let mut links: Vec<(String, String)> = Vec::new();
        let mut pr: Option<PullRequest> = None;
        if let Some(co) = &files.checkout {
            let message = format!(
                "{} {}: {} (job {}, attempt {})",
                ctx.key, job.stage, job.agent, job.id, job.attempt
            );
            let delivered = match self.inner.workspace.deliver(co, &job.agent, &message).await {
                Ok(d) => d,
                Err(e) => {
                    log_line(&files.log, &format!("delivery failed: {e}"));
                    let end = End::Permanent {
                        outcome: "push_failed",
                        reason: format!("cannot commit and push the agent's work: {e}"),
                        retry: true,
                    };
                    return (end, Vec::new());
                }
            };
            if !delivered.committed && delivered.changed_files.is_empty() {
                notes.push("no changes to commit".to_owned());
            }
            let prefix = format!("{}/", artifacts_dir(&ctx.key));
            for f in delivered
                .changed_files
                .iter()
                .filter(|f| f.starts_with(&prefix))
            {
                let name = f[prefix.len()..].to_owned();
                links.push((name, forge.file_url(&ctx.repo, &ctx.branch, f)));
            }
            log_line(
                &files.log,
                &format!(
                    "delivered: head {}{}",
                    delivered.head_sha,
                    if delivered.pushed {
                        ", pushed"
                    } else {
                        ", nothing new to push"
                    }
                ),
            );
            let title = if ctx.title.is_empty() {
                ctx.key.clone()
            } else {
                format!("{}: {}", ctx.key, ctx.title)
            };
            let body = format!("Work item {} — opened by the orchestrator.", ctx.key);
            // A short wait on a forge that hiccups; a forge that stays down fails the run,
            // whose attempt rules retry it.
            let wait = Backoff::new(Duration::from_secs(1), Duration::from_secs(4));
            let mut tries = 0;
            loop {
                tries += 1;
                match forge
                    .ensure_pr(&ctx.repo, &ctx.branch, &ctx.base, &title, &body)
                    .await
                {
                    Ok(p) => {
                        pr = Some(p.pr);
                        break;
                    }
                    Err(e) if e.is_transient() && tries < 4 => {
                        tokio::time::sleep(wait.delay(tries)).await;
                    }
                    Err(e) => {
                        let end = End::Permanent {
                            outcome: "pr_failed",
                            reason: format!("cannot ensure the PR: {e}"),
                            retry: true,
                        };
                        return (end, Vec::new());
                    }
                }
            }
        }
        let finalizer = match &pr {
            Some(pr) if job.stage == "deploy" && self.config().git => Some(Finalizer {
                repo: ctx.repo.to_string(),
                stage: job.stage.clone(),
                payload_json: json!({
                    "work_item": ctx.key,
                    "repo": ctx.repo.to_string(),
                    "branch": ctx.branch,
                    "base": ctx.base,
                    "pr_number": pr.number,
                    "tested_head_sha": pr.head_sha,
                    "deployer_job_id": job.id,
                })
                .to_string(),
                max_attempts: self.config().max_attempts,
            }),
            _ => None,
        };
        let effects = vec![
            Effect::FinishComment {
                job_id: job.id.clone(),
                attempt: job.attempt,
                agent: job.agent.clone(),
                rest_html: finish_rest_html(pr.as_ref(), &links, &notes, qg_hook_blocks),
            },
            Effect::AdvanceStage {
                job_id: job.id.clone(),
                attempt: job.attempt,
                agent: job.agent.clone(),
                dedupe_key: ctx.dedupe_key.clone(),
                finalizer,
            },
        ];
        let outcome = if notes.is_empty() {
            "succeeded"
        } else {
            "no_changes"
        };
        let end = End::Succeeded {
            outcome: outcome.to_owned(),
            note: notes.join("; "),
        };
        (end, effects)
    }
}

/// The finish comment after usage-ledger's line (added when the outbox delivers it): the
/// PR, the artifacts the run changed, how often the quality-gate hook kept the agent
/// working (`QG hook blocked N×`) and the notes, joined by ` · `.
fn finish_rest_html(
    pr: Option<&PullRequest>,
    links: &[(String, String)],
    notes: &[String],
    qg_hook_blocks: Option<u32>,
) -> String {
    let mut html = String::new();
    let mut parts: Vec<String> = Vec::new();
    if let Some(p) = pr {
        parts.push(format!(
            "PR <a href=\"{}\">#{}</a>",
            html_escape(&p.url),
            p.number
        ));
    }
    if !links.is_empty() {
        let l: Vec<String> = links
            .iter()
            .map(|(n, u)| format!("<a href=\"{}\">{}</a>", html_escape(u), html_escape(n)))
            .collect();
        parts.push(format!("artifacts: {}", l.join(", ")));
    }
    if let Some(b) = qg_hook_blocks.filter(|b| *b > 0) {
        parts.push(format!("QG hook blocked {b}×"));
    }
    for n in notes {
        parts.push(html_escape(n));
    }
    if !parts.is_empty() {
        html.push_str(&format!("<p>{}</p>", parts.join(" · ")));
    }
    html
}

fn again(outcome: &'static str, reason: String, after: Duration) -> End {
    End::Again {
        outcome,
        reason,
        after,
        bump: outcome == "peer_unavailable",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn role_titles() {
        assert_eq!(role_title("developer"), "Developer");
        assert_eq!(role_title("deploy-finalizer"), "Deploy finalizer");
        assert_eq!(role_title(""), "Agent");
    }

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
            },
            checkout: Some(Checkout {
                dir: "/w/jobs/j/checkout".into(),
                branch: "orch/ORCH-1".into(),
                base: "main".into(),
                start_sha: "abc".into(),
            }),
            cwd: "/w/jobs/j/checkout".into(),
            log: "/w/jobs/j/attempt-1.log".into(),
            hook_state: None,
            lease: true,
        };
        let back = RunFiles::from_json(&f.to_json()).expect("parse");
        assert_eq!(back.checkout, f.checkout);
        assert_eq!(back.log, f.log);
        assert!(back.lease);
        assert_eq!(back.ctx.dedupe_key, "d");
    }

    /// The finish comment as the outbox posts it.
    fn finish_comment_html(
        line: &str,
        pr: Option<&PullRequest>,
        links: &[(String, String)],
        notes: &[String],
        qg_hook_blocks: Option<u32>,
    ) -> String {
        format!(
            "<p>{}</p>{}",
            html_escape(line),
            finish_rest_html(pr, links, notes, qg_hook_blocks)
        )
    }

    #[test]
    fn the_finish_comment_shows_the_qg_hook_blocks() {
        let pr = PullRequest {
            number: 7,
            url: "https://git.example/acme/app/pulls/7".into(),
            head_branch: "orch/ORCH-1".into(),
            head_sha: "abc".into(),
            base_branch: "main".into(),
            state: orchestrator_forge::PrState::Open,
            merged: false,
            merge_sha: None,
        };
        let links = vec![(
            "review.md".to_owned(),
            "https://git.example/acme/app/src/branch/orch/ORCH-1/docs/work-items/ORCH-1/review.md"
                .to_owned(),
        )];
        let html = finish_comment_html(
            "Reviewer done · 1.2k tokens <in>",
            Some(&pr),
            &links,
            &["no changes to commit".to_owned()],
            Some(2),
        );
        assert_eq!(
            html,
            "<p>Reviewer done · 1.2k tokens &lt;in&gt;</p><p>PR <a href=\"https://git.example/acme/app/pulls/7\">#7</a> · artifacts: <a href=\"https://git.example/acme/app/src/branch/orch/ORCH-1/docs/work-items/ORCH-1/review.md\">review.md</a> · QG hook blocked 2× · no changes to commit</p>"
        );
        // No block (or no hook): nothing said about it.
        for blocks in [Some(0), None] {
            let html = finish_comment_html("Analyst done", None, &[], &[], blocks);
            assert_eq!(html, "<p>Analyst done</p>", "{blocks:?}");
        }
        assert_eq!(
            finish_comment_html("Analyst done", None, &[], &[], Some(1)),
            "<p>Analyst done</p><p>QG hook blocked 1×</p>"
        );
    }
}
