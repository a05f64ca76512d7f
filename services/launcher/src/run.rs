//! One run of an LLM job, spawn and watch: build the command, spawn the agent in its own
//! group, stamp its pid, announce it when stage-engine asked, watch it to its end (or its
//! timeout, or a stop), then hand it to the end of the run ([`crate::finish`]). What comes
//! before the spawn is [`crate::prepare`]. The launcher decides nothing here by stage or
//! role: what a stage needs around its run comes with the job from stage-engine.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;
use std::time::{Duration, Instant};

use orchestrator_agent_output::TAIL_BYTES;
use orchestrator_kit::retry::{Backoff, is_retryable_status};
use orchestrator_kit::time::now_ms;
use serde_json::json;

use crate::agent::{self, Ended, Launch};
use crate::classify::RunExit;
use crate::config::{Failpoint, shell_quote};
use crate::prepare::{RunFiles, bad_input};
use crate::rules::End;
use crate::store::{self, JobRow};
use crate::supervisor::{RunHandle, StopReason, Supervisor, html_escape};

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

/// Appends a line to the run log (best effort: the log is for people).
pub(crate) fn log_line(log: &Path, line: &str) {
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
        // The spending ceilings first: a job that must wait costs no checkout.
        if let Err(end) = self.check_ceilings(&job).await {
            self.end_run(&job, end, None, None).await;
            // Had it gone as the half-open breaker's probe, it asked the model nothing:
            // another job may probe.
            if let Err(e) = store::breaker_release_probe(self.db(), &job.id, now_ms()).await {
                tracing::warn!(job_id = job.id, error = %e, "cannot release the breaker probe");
            }
            return;
        }
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
                files.ctx.artifacts_dir.clone(),
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
        if files.ctx.announce_start && job.attempt == 1 {
            let me = self.clone();
            let (key, id, agent) = (files.ctx.key.clone(), job.id.clone(), job.agent.clone());
            tokio::spawn(async move {
                let html = format!(
                    "<p>{} started on {} (job {}).</p>",
                    html_escape(&role_title(&agent)),
                    html_escape(&key),
                    html_escape(&id)
                );
                me.comment(&key, &html, &agent, &format!("launcher:{id}:start"))
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
        // The mirror's objects the checkout borrows: git in the checkout needs them, and
        // read-only they cannot be changed under another job's checkout.
        if let Some(objects) = files
            .checkout
            .as_ref()
            .and_then(|c| c.shared_objects.clone())
        {
            jail.readable_files.push(objects);
        }
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

    pub(crate) fn backoff(&self, job: &JobRow) -> Duration {
        Backoff::new(self.config().backoff_base, self.config().backoff_max)
            .delay(job.transient_attempts + 1)
    }

    /// The command and the flags the launcher adds: the agent's profile (its tools, model,
    /// turns), the budget (the smaller of the profile's and the work item's remaining), the
    /// session it resumes, and the quality gate as the Stop hook (never `--bare`: it would
    /// skip hooks).
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
        if let Some(session) = &files.resume_session {
            // A plain id (checked when parsed and before the plan): never taken for an option.
            argv.push("--resume".to_owned());
            argv.push(session.clone());
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
}

pub(crate) fn again(outcome: &'static str, reason: String, after: Duration) -> End {
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
}
