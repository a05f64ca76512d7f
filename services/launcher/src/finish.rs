//! The end of a run: read the log's result, classify it, and on success commit, push and
//! ensure the PR (the launcher's own work); then end the job with the effects that tell its
//! peers (RecordRun, the finish comment, AdvanceStage or, through the rules, a failure
//! report), written in the same transaction and delivered by the outbox.

use std::time::Duration;

use orchestrator_agent_output::parse_result;
use orchestrator_forge::PullRequest;
use orchestrator_kit::retry::Backoff;
use orchestrator_kit::time::now_ms;
use serde_json::Value;

use crate::classify::{Evidence, RunExit, Verdict, classify};
use crate::outbox::Effect;
use crate::prepare::{RunFiles, run_file};
use crate::rules::End;
use crate::run::{log_line, read_tail};
use crate::store::{self, JobRow};
use crate::supervisor::{Supervisor, html_escape};

impl Supervisor {
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

    pub(crate) async fn finalize(
        &self,
        job: &JobRow,
        files: &RunFiles,
        exit: RunExit,
        timeout: Duration,
    ) {
        let tail = read_tail(&files.log);
        let result = parse_result(&tail);
        // Every run that happened is accounted for, whatever it came to (RecordRun is
        // idempotent on the job and attempt); the run's outcome does not wait for it.
        let mut effects = vec![Effect::RecordRun {
            job_id: job.id.clone(),
            attempt: job.attempt,
            agent: job.agent.clone(),
            output: tail.clone(),
            resumed: files.resume_session.is_some(),
            repo: job.repo.clone(),
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
        self.on_outcome(matches!(verdict, Verdict::Transient { .. }), &job.work_item)
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

    /// Feeds the circuit breaker (LLM outcomes only) with the outcome of `work_item`'s job.
    async fn on_outcome(&self, transient: bool, work_item: &str) {
        let c = self.config();
        let now = now_ms();
        let r = if transient {
            let cooldown = i64::try_from(c.breaker_cooldown.as_millis()).unwrap_or(i64::MAX);
            store::breaker_on_transient(self.db(), c.breaker_threshold, cooldown, now, work_item)
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
    /// job's end: the finish comment and AdvanceStage (carrying the PR and head the run
    /// delivered: stage-engine decides what follows). A push or PR that fails is the run's
    /// failure.
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
        // A deploy stage without a target fails the job for good once its artifact (which
        // says so) is delivered: stage-engine then parks the item blocked with the reason.
        let mut no_deploy_target = None;
        if let Some(co) = &files.checkout {
            if let Some(d) = self.run_deploy_target(job, ctx, co, &files.log).await {
                if d.no_target {
                    no_deploy_target = Some(d.note.clone());
                }
                notes.push(d.note);
            }
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
            let prefix = format!("{}/", ctx.artifacts_dir);
            for f in delivered
                .changed_files
                .iter()
                .filter(|f| !ctx.artifacts_dir.is_empty() && f.starts_with(&prefix))
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
        if let Some(why) = no_deploy_target {
            let end = End::Failed {
                outcome: "no_deploy_target",
                reason: format!("{why}; add the repo's target, then retry the work item"),
            };
            return (end, Vec::new());
        }
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
                pr_number: pr.as_ref().map_or(0, |p| p.number),
                head_sha: pr.map(|p| p.head_sha).unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;

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
