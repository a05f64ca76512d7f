//! The deploy target's command, run by the launcher right after the deployer's run of
//! `deploy-staging` or `deploy` and before its work is committed (see docs/deploy.md,
//! "Deploy targets").
//!
//! The command's exit status is the stage's status, not the model's word: the launcher
//! writes the artifact's frontmatter itself (`staging_status` / `deploy_status`,
//! `deployed_sha`, `previous_sha`), keeps the body the deployer agent wrote, and appends
//! the command, its exit and the tail of its output. Where the repo has no target (or no
//! command for the step) — `ORCH_DEPLOY_TARGETS_JSON` unset included — the artifact says
//! "no deploy target for <repo>" plainly, its status is `FAILED`, and the job fails for
//! good (outcome `no_deploy_target`), which parks the work item blocked with that reason:
//! nothing was deployed by the orchestrator, so nothing may pass for a success, and a
//! rollback to development could not fix a missing target.
//!
//! The command is argv (never a shell), its placeholders validated first
//! ([`orchestrator_kit::deploy_target`]); it runs in the job's checkout, in its own
//! process group (a timeout kills everything it started), without the orchestrator's
//! secrets, and outside the agents' sandbox: it is the operator's, and reaches production.

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use orchestrator_kit::deploy_target::{DeployStep, Vars, is_orchestrator_secret, render};

use crate::agent::kill_group;
use crate::prepare::Ctx;
use crate::run::log_line;
use crate::store::JobRow;
use crate::supervisor::Supervisor;
use crate::workspace::Checkout;

/// The most output kept in the artifact: the last 16 KiB, where the error usually is.
const MAX_OUTPUT_BYTES: u64 = 16 * 1024;

/// How long a timed-out command gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// What the deploy step did, for the finish comment and the job's end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeployNote {
    /// One line: the command, the sha and the result, or why nothing ran.
    pub note: String,
    /// The repo has no command for the step: the job fails for good with this note.
    pub no_target: bool,
}

/// What running a deploy target's command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct StepRun {
    pub argv: Vec<String>,
    /// `None` when it did not exit by itself (timeout, signal, could not start).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// stdout and stderr as they arrived, their last [`MAX_OUTPUT_BYTES`].
    pub output: String,
    /// Why it could not run or finish.
    pub error: Option<String>,
}

impl StepRun {
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out && self.error.is_none()
    }

    fn describe(&self) -> String {
        if self.timed_out {
            "killed after its timeout".to_owned()
        } else if let Some(e) = &self.error {
            e.clone()
        } else {
            match self.exit_code {
                Some(c) => format!("exit {c}"),
                None => "killed by a signal".to_owned(),
            }
        }
    }
}

/// Runs `argv` in `cwd`, its output (both streams) into `out`, killed with its process
/// group after `timeout`. Never fails: what went wrong is in the result.
pub(crate) async fn run_argv(
    argv: &[String],
    cwd: &Path,
    out: &Path,
    timeout: Duration,
) -> StepRun {
    let inherited: Vec<_> = std::env::vars_os().collect();
    run_argv_with_env(argv, cwd, out, timeout, inherited.into_iter()).await
}

/// [`run_argv`] with the environment it inherits (minus the orchestrator's secrets) given
/// explicitly.
async fn run_argv_with_env(
    argv: &[String],
    cwd: &Path,
    out: &Path,
    timeout: Duration,
    inherited: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)> + Send,
) -> StepRun {
    let mut run = StepRun {
        argv: argv.to_vec(),
        exit_code: None,
        timed_out: false,
        output: String::new(),
        error: None,
    };
    let Some((program, args)) = argv.split_first() else {
        run.error = Some("the command is empty".to_owned());
        return run;
    };
    // A file, not pipes: a background process the command leaves behind (a server it
    // started) would hold a pipe open forever.
    let file = match std::fs::File::create(out).and_then(|f| Ok((f.try_clone()?, f))) {
        Ok(f) => f,
        Err(e) => {
            run.error = Some(format!("cannot create {}: {e}", out.display()));
            return run;
        }
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .current_dir(cwd)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file.0))
        .stderr(Stdio::from(file.1))
        .process_group(0)
        .kill_on_drop(true)
        .env_clear()
        .envs(inherited.filter(|(k, _)| !k.to_str().is_some_and(is_orchestrator_secret)));
    match cmd.spawn() {
        Err(e) => run.error = Some(format!("cannot start '{program}': {e}")),
        Ok(mut child) => {
            let pid = child.id();
            match tokio::time::timeout(timeout, child.wait()).await {
                Ok(Ok(st)) => run.exit_code = st.code(),
                Ok(Err(e)) => run.error = Some(format!("cannot wait for '{program}': {e}")),
                Err(_) => {
                    run.timed_out = true;
                    match pid.and_then(|p| i32::try_from(p).ok()) {
                        // The agents' one way to end a group: SIGTERM, a grace, SIGKILL.
                        Some(pgid) => kill_group(pgid, KILL_GRACE, Some(&mut child)).await,
                        None => {
                            let _ = child.wait().await;
                        }
                    }
                }
            }
        }
    }
    run.output = read_tail(out);
    run
}

fn read_tail(path: &Path) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut f) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = f.metadata().map(|m| m.len()).unwrap_or(0);
    let _ = f.seek(SeekFrom::Start(len.saturating_sub(MAX_OUTPUT_BYTES)));
    let mut buf = Vec::new();
    let _ = f.read_to_end(&mut buf);
    String::from_utf8_lossy(&buf).into_owned()
}

/// The artifact as the launcher leaves it: its frontmatter the orchestrator's (the agent's
/// other keys kept), the agent's body, then what the command did (`run`, or why none ran).
pub(crate) fn stamp(
    agent_text: Option<&str>,
    key: &str,
    step: DeployStep,
    ok: bool,
    shas: (&str, &str),
    run: Result<&StepRun, &str>,
) -> String {
    let (deployed, previous) = shas;
    let (front, body) = split_frontmatter(agent_text.unwrap_or_default());
    let ours = [
        "work_item",
        step.status_key(),
        "deployed_sha",
        "previous_sha",
    ];
    let mut out = format!(
        "---\nwork_item: {key}\n{}: {}\n",
        step.status_key(),
        if ok { "SUCCESS" } else { "FAILED" }
    );
    if run.is_ok() {
        out.push_str(&format!("deployed_sha: {deployed}\n"));
        if step == DeployStep::Production {
            out.push_str(&format!("previous_sha: {previous}\n"));
        }
    }
    for line in front.lines() {
        let k = line.split(':').next().unwrap_or_default().trim();
        if !line.trim().is_empty() && !ours.contains(&k) {
            out.push_str(line);
            out.push('\n');
        }
    }
    out.push_str("---\n");
    let body = body.trim();
    if body.is_empty() {
        out.push_str("The deployer agent left no body.\n");
    } else {
        out.push_str(body);
        out.push('\n');
    }
    out.push_str(&format!(
        "\n## The {} (run by the orchestrator)\n\n",
        step.command_key().replace('_', " ")
    ));
    match run {
        Err(why) => out.push_str(&format!("{why}\n")),
        Ok(r) => {
            let output = r.output.replace("```", "'''");
            out.push_str(&format!(
                "- argv: `{}`\n- result: {}\n\n```text\n{}{}```\n",
                r.argv.join(" ").replace('`', "'"),
                r.describe(),
                output,
                if output.ends_with('\n') || output.is_empty() {
                    ""
                } else {
                    "\n"
                },
            ));
        }
    }
    out
}

/// The text between a leading `---` line and the next one, and what follows; no
/// frontmatter: all of it is the body.
fn split_frontmatter(text: &str) -> (&str, &str) {
    if let Some(rest) = text.strip_prefix("---\n")
        && let Some(end) = rest.find("\n---\n").map(|i| i + 1).or_else(|| {
            rest.strip_suffix("\n---")
                .map(|r| r.len() + 1)
                .or(rest.starts_with("---\n").then_some(0))
        })
    {
        let front = &rest[..end];
        let body = rest[end..].strip_prefix("---").unwrap_or_default();
        return (front, body.strip_prefix('\n').unwrap_or(body));
    }
    ("", text)
}

impl Supervisor {
    /// For a `deploy-staging` or `deploy` job: runs the repo's target command and writes
    /// the artifact (see the module's doc). Returns what it did, or `None` for any other
    /// stage.
    pub(crate) async fn run_deploy_target(
        &self,
        job: &JobRow,
        ctx: &Ctx,
        co: &Checkout,
        log: &Path,
    ) -> Option<DeployNote> {
        let step = DeployStep::for_stage(&job.stage)?;
        if ctx.artifacts_dir.is_empty() {
            return None;
        }
        let ws = &self.inner.workspace;
        let deployed = ws.rev(co, "HEAD").await.unwrap_or_default();
        // What production ran before: the base's head on the forge now (the deploy has not
        // merged yet), asked as a checkout asks for its branch's head.
        let previous = match ws.branch_head(&co.dir, &ctx.repo, &co.base).await {
            Ok(head) => head,
            Err(e) => {
                log_line(
                    log,
                    &format!("cannot read the head of the base {}: {e}", co.base),
                );
                None
            }
        };
        let previous = previous.unwrap_or_default();
        let repo = ctx.repo.to_string();
        let targets = self.config().deploy_targets.as_ref();
        let target = targets.and_then(|t| t.get(&repo));
        let template = target.map(|t| t.command(step)).unwrap_or_default();
        let no_target = template.is_empty();
        let (ok, run, note) = if no_target {
            let where_ = match (targets, target) {
                (None, _) => "ORCH_DEPLOY_TARGETS_JSON is not set".to_owned(),
                (Some(_), None) => "ORCH_DEPLOY_TARGETS_JSON has no target for it".to_owned(),
                (Some(_), Some(_)) => format!(
                    "its target in ORCH_DEPLOY_TARGETS_JSON has no {}",
                    step.command_key()
                ),
            };
            let why = format!(
                "no deploy target for {repo}: {where_} (docs/deploy.md); nothing was deployed \
                 by the orchestrator, so the status is FAILED whatever the agent wrote"
            );
            (false, Err(why.clone()), why)
        } else {
            let vars = Vars {
                repo: &repo,
                sha: &deployed,
                previous_sha: &previous,
                branch: &co.branch,
                work_item: &ctx.key,
            };
            match render(template, &vars) {
                Err(e) => {
                    let why = format!("The {} was not run: {e}.", step.command_key());
                    (false, Err(why.clone()), why)
                }
                Ok(argv) => {
                    let timeout = Duration::from_secs(target.map_or(600, |t| t.timeout_s));
                    let out = self.config().job_dir(&job.id).join(format!(
                        "{}-{}.out",
                        step.command_key(),
                        job.attempt
                    ));
                    log_line(log, &format!("{}: {}", step.command_key(), argv.join(" ")));
                    let r = run_argv(&argv, &co.dir, &out, timeout).await;
                    let note = format!("{} {}: {}", step.command_key(), &deployed, r.describe());
                    (r.succeeded(), Ok(r), note)
                }
            }
        };
        log_line(log, &note);
        let path = co.dir.join(&ctx.artifacts_dir).join(step.artifact());
        let agent_text = std::fs::read_to_string(&path).ok();
        let text = stamp(
            agent_text.as_deref(),
            &ctx.key,
            step,
            ok,
            (&deployed, &previous),
            run.as_ref().map_err(String::as_str),
        );
        let written = path
            .parent()
            .map_or(Ok(()), std::fs::create_dir_all)
            .and_then(|()| std::fs::write(&path, text));
        if let Err(e) = written {
            log_line(log, &format!("cannot write {}: {e}", path.display()));
        }
        Some(DeployNote { note, no_target })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn argv(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn the_exit_status_decides_and_the_output_is_kept() {
        let d = tempfile::tempdir().expect("tmp");
        let out = d.path().join("o");
        let r = run_argv(
            &argv(&["sh", "-c", "echo deployed; exit 0"]),
            d.path(),
            &out,
            Duration::from_secs(30),
        )
        .await;
        assert!(r.succeeded(), "{r:?}");
        assert_eq!(r.output, "deployed\n");
        let r = run_argv(
            &argv(&["sh", "-c", "echo boom >&2; exit 3"]),
            d.path(),
            &out,
            Duration::from_secs(30),
        )
        .await;
        assert!(!r.succeeded());
        assert_eq!((r.exit_code, r.output.as_str()), (Some(3), "boom\n"));
        let r = run_argv(
            &argv(&["/nonexistent/ship"]),
            d.path(),
            &out,
            Duration::from_secs(30),
        )
        .await;
        assert!(!r.succeeded());
        assert!(
            r.error
                .as_deref()
                .unwrap_or_default()
                .contains("/nonexistent/ship"),
            "{r:?}"
        );
    }

    #[tokio::test]
    async fn a_command_that_hangs_is_killed_with_what_it_started_and_counts_failed() {
        let d = tempfile::tempdir().expect("tmp");
        let out = d.path().join("o");
        let pidfile = d.path().join("pid");
        let script = format!(
            "sleep 300 & echo $! > {}; echo waiting; wait",
            pidfile.display()
        );
        let r = run_argv(
            &argv(&["sh", "-c", &script]),
            d.path(),
            &out,
            Duration::from_secs(1),
        )
        .await;
        assert!(r.timed_out && !r.succeeded(), "{r:?}");
        assert_eq!(r.output, "waiting\n");
        let pid: i32 = std::fs::read_to_string(&pidfile)
            .expect("pid")
            .trim()
            .parse()
            .expect("int");
        // The background sleep went with its group: reaped by init, gone (or a zombie).
        let mut gone = false;
        for _ in 0..50 {
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            if stat.is_empty() || stat.contains(") Z ") {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(gone, "the command's child {pid} outlived the timeout");
    }

    #[tokio::test]
    async fn arguments_never_reach_a_shell() {
        let d = tempfile::tempdir().expect("tmp");
        let out = d.path().join("o");
        let r = run_argv(
            &argv(&["echo", "$HOME;", "`id`", "a b"]),
            d.path(),
            &out,
            Duration::from_secs(30),
        )
        .await;
        assert_eq!(r.output, "$HOME; `id` a b\n");
    }

    #[tokio::test]
    async fn the_command_never_gets_the_orchestrator_s_secrets() {
        let d = tempfile::tempdir().expect("tmp");
        let out = d.path().join("o");
        let env = [
            ("ORCH_INTERNAL_TOKEN", "s3cret"),
            ("GITEA_TOKEN", "s3cret"),
            ("PLANE_BOT_TOKEN_DEPLOYER", "s3cret"),
            ("ORCH_DATABASE_URL", "postgres://u:s3cret@db/x"),
            ("KUBECONFIG", "/etc/kube"),
            ("PATH", "/usr/bin:/bin"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let r = run_argv_with_env(
            &argv(&[
                "sh",
                "-c",
                "echo \"${ORCH_INTERNAL_TOKEN:-unset} ${GITEA_TOKEN:-unset} ${PLANE_BOT_TOKEN_DEPLOYER:-unset} ${ORCH_DATABASE_URL:-unset} $KUBECONFIG\"",
            ]),
            d.path(),
            &out,
            Duration::from_secs(30),
            env.into_iter(),
        )
        .await;
        assert_eq!(r.output, "unset unset unset unset /etc/kube\n", "{r:?}");
    }

    #[test]
    fn the_orchestrator_owns_the_status_and_the_shas_the_agent_the_body() {
        let agent = "---\nwork_item: WRONG\ndeploy_status: SUCCESS\ndeployed_sha: made-up\nauthor: deployer\n---\n# Deploy\n\nAll fine.\n";
        let run = StepRun {
            argv: argv(&["ship", "abc1234"]),
            exit_code: Some(1),
            timed_out: false,
            output: "no space left\n".into(),
            error: None,
        };
        let t = stamp(
            Some(agent),
            "ORCH-1",
            DeployStep::Production,
            run.succeeded(),
            ("abc1234", "fff0000"),
            Ok(&run),
        );
        assert_eq!(
            t,
            "---\nwork_item: ORCH-1\ndeploy_status: FAILED\ndeployed_sha: abc1234\nprevious_sha: fff0000\nauthor: deployer\n---\n# Deploy\n\nAll fine.\n\n## The deploy command (run by the orchestrator)\n\n- argv: `ship abc1234`\n- result: exit 1\n\n```text\nno space left\n```\n"
        );
        let t = stamp(
            None,
            "ORCH-1",
            DeployStep::Staging,
            false,
            ("abc1234", ""),
            Err("No staging_command is configured."),
        );
        assert_eq!(
            t,
            "---\nwork_item: ORCH-1\nstaging_status: FAILED\n---\nThe deployer agent left no body.\n\n## The staging command (run by the orchestrator)\n\nNo staging_command is configured.\n"
        );
        assert_eq!(split_frontmatter("no front\n"), ("", "no front\n"));
    }
}
