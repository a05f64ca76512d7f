//! `run_rollback`: runs a repo's rollback command once, with a timeout, and returns what
//! happened — exit code, output, timeout, or why it could not run. It never fails.
//!
//! The command is the operator's (`rollback_command` of the repo's deploy target), run as
//! argv — never by a shell — in its own process group so that a timeout kills everything it
//! started. Its placeholders (`{repo}`, `{previous_sha}`, `{deployed_sha}`, `{work_item}`)
//! are rendered by the one implementation the launcher's deploy commands use
//! ([`orchestrator_kit::deploy_target::render`]: values validated first, each placeholder
//! inside one argv word), and the same values are in the environment as
//! `ORCH_ROLLBACK_REPO`, `ORCH_ROLLBACK_PREVIOUS_SHA`, `ORCH_ROLLBACK_DEPLOYED_SHA` and
//! `ORCH_ROLLBACK_WORK_ITEM`. The orchestrator's own secrets are removed from its
//! environment.

use std::io::Read;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use orchestrator_kit::deploy_target::{Vars, render};
use orchestrator_kit::time::now_ms;

/// The most output kept: the last 64 KiB, where the error usually is.
pub const MAX_OUTPUT_BYTES: usize = 64 * 1024;

/// How long a timed-out command gets between SIGTERM and SIGKILL.
const KILL_GRACE: Duration = Duration::from_secs(2);

/// How long we wait for the output pipe to close once the command has ended.
const DRAIN_LIMIT: Duration = Duration::from_secs(2);

/// What the rollback is of.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackVars<'a> {
    pub repo: &'a str,
    pub previous_sha: &'a str,
    pub deployed_sha: &'a str,
    pub work_item: &'a str,
}

/// What running the rollback command did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RollbackOutcome {
    /// The command as run, after expansion.
    pub command: String,
    pub started_at_ms: i64,
    pub finished_at_ms: i64,
    /// `None` when it did not exit by itself (timeout, signal, could not start).
    pub exit_code: Option<i32>,
    pub timed_out: bool,
    /// stdout and stderr as they arrived, the last [`MAX_OUTPUT_BYTES`] of them.
    pub output: String,
    /// Why it could not run or finish cleanly.
    pub error: Option<String>,
}

impl RollbackOutcome {
    /// Returns whether the command ran and exited 0.
    pub fn succeeded(&self) -> bool {
        self.exit_code == Some(0) && !self.timed_out
    }
}

impl RollbackVars<'_> {
    fn deploy_vars(&self) -> Vars<'_> {
        Vars {
            repo: self.repo,
            sha: self.deployed_sha,
            previous_sha: self.previous_sha,
            // A watch knows no branch; `{branch}` is refused in a rollback at start-up.
            branch: "",
            work_item: self.work_item,
        }
    }
}

/// The argv of `template` for `vars` (validated, see the module's doc).
pub fn render_command(template: &[String], vars: &RollbackVars<'_>) -> Result<Vec<String>, String> {
    render(template, &vars.deploy_vars())
}

/// How an argv is shown in the watch's record and the log: words with a space or a quote
/// in single quotes, so that what ran reads unambiguously (nothing parses it again).
pub fn display_argv(argv: &[String]) -> String {
    argv.iter()
        .map(|w| {
            if !w.is_empty()
                && w.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./=:,+@%{}".contains(c))
            {
                w.clone()
            } else {
                format!("'{}'", w.replace('\'', r"'\''"))
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

/// Runs `template` once for `vars`, killing it (and its process group) after `timeout`.
pub async fn run_rollback(
    template: &[String],
    vars: &RollbackVars<'_>,
    timeout: Duration,
) -> RollbackOutcome {
    let inherited: Vec<_> = std::env::vars_os().collect();
    run_with_env(template, vars, timeout, inherited.into_iter()).await
}

/// Whether a variable holds one of the orchestrator's own secrets: the one list, shared
/// with the launcher's deploy commands.
fn is_secret(name: &str) -> bool {
    orchestrator_kit::deploy_target::is_orchestrator_secret(name)
}

/// [`run_rollback`] with the environment it inherits given explicitly.
async fn run_with_env(
    template: &[String],
    vars: &RollbackVars<'_>,
    timeout: Duration,
    inherited: impl Iterator<Item = (std::ffi::OsString, std::ffi::OsString)> + Send,
) -> RollbackOutcome {
    let rendered = render_command(template, vars);
    let argv = rendered.clone().unwrap_or_default();
    let started_at_ms = now_ms();
    let mut outcome = RollbackOutcome {
        command: display_argv(if argv.is_empty() { template } else { &argv }),
        started_at_ms,
        finished_at_ms: started_at_ms,
        exit_code: None,
        timed_out: false,
        output: String::new(),
        error: None,
    };
    let Some((program, args)) = argv.split_first() else {
        outcome.error = Some(match rendered {
            Err(e) => format!("the rollback command was not run: {e}"),
            Ok(_) => "no rollback command is configured".to_owned(),
        });
        return outcome;
    };

    // One pipe for stdout and stderr, so the output reads in the order it was written.
    let (reader, writer) = match std::io::pipe() {
        Ok(p) => p,
        Err(e) => {
            outcome.error = Some(format!("cannot create the output pipe: {e}"));
            return outcome;
        }
    };
    let stderr = match writer.try_clone() {
        Ok(w) => w,
        Err(e) => {
            outcome.error = Some(format!("cannot create the output pipe: {e}"));
            return outcome;
        }
    };
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(writer)
        .stderr(stderr)
        .process_group(0)
        .kill_on_drop(true)
        .env_clear()
        .envs(inherited.filter(|(k, _)| !k.to_str().is_some_and(is_secret)))
        .env("ORCH_ROLLBACK_REPO", vars.repo)
        .env("ORCH_ROLLBACK_PREVIOUS_SHA", vars.previous_sha)
        .env("ORCH_ROLLBACK_DEPLOYED_SHA", vars.deployed_sha)
        .env("ORCH_ROLLBACK_WORK_ITEM", vars.work_item);
    let spawned = cmd.spawn();
    // Our copies of the write ends must go, or the reader would never see the end.
    drop(cmd);
    let mut child = match spawned {
        Ok(c) => c,
        Err(e) => {
            outcome.finished_at_ms = now_ms();
            outcome.error = Some(format!("cannot start '{program}': {e}"));
            return outcome;
        }
    };

    let captured = Arc::new(Mutex::new(Tail::default()));
    let reading = {
        let captured = Arc::clone(&captured);
        tokio::task::spawn_blocking(move || read_tail(reader, &captured))
    };

    let status = match tokio::time::timeout(timeout, child.wait()).await {
        Ok(status) => status,
        Err(_) => {
            outcome.timed_out = true;
            kill_group(child.id(), "-TERM").await;
            match tokio::time::timeout(KILL_GRACE, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    kill_group(child.id(), "-KILL").await;
                    let _ = child.start_kill();
                    child.wait().await
                }
            }
        }
    };
    match status {
        Ok(s) if !outcome.timed_out => outcome.exit_code = s.code(),
        Ok(_) => {}
        Err(e) => outcome.error = Some(format!("cannot wait for the command: {e}")),
    }
    if outcome.timed_out {
        outcome.error = Some(format!("timed out after {}s", timeout.as_secs_f64()));
    } else if outcome.exit_code.is_none() && outcome.error.is_none() {
        outcome.error = Some("killed by a signal".to_owned());
    }
    // A background process the command left behind may hold the pipe open: stop waiting then.
    if tokio::time::timeout(DRAIN_LIMIT, reading).await.is_err() {
        tracing::warn!("rollback output still open after the command ended; not waiting for it");
    }
    outcome.output = captured
        .lock()
        .map(|t| t.text())
        .unwrap_or_else(|_| String::new());
    outcome.finished_at_ms = now_ms();
    outcome
}

/// Sends `signal` to the process group led by `pid` (the command runs in its own group).
async fn kill_group(pid: Option<u32>, signal: &str) {
    let Some(pid) = pid else { return };
    let result = tokio::process::Command::new("kill")
        .args([signal, "--", &format!("-{pid}")])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await;
    if let Err(e) = result {
        tracing::warn!(pid, signal, error = %e, "cannot signal the rollback's process group");
    }
}

/// The last [`MAX_OUTPUT_BYTES`] bytes written, and whether anything before them was dropped.
#[derive(Default)]
struct Tail {
    bytes: Vec<u8>,
    dropped: bool,
}

impl Tail {
    fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend_from_slice(chunk);
        if self.bytes.len() > MAX_OUTPUT_BYTES {
            let excess = self.bytes.len() - MAX_OUTPUT_BYTES;
            self.bytes.drain(..excess);
            self.dropped = true;
        }
    }

    fn text(&self) -> String {
        let text = String::from_utf8_lossy(&self.bytes);
        if self.dropped {
            format!("[... earlier output dropped]\n{text}")
        } else {
            text.into_owned()
        }
    }
}

fn read_tail(mut reader: std::io::PipeReader, tail: &Mutex<Tail>) {
    let mut buf = [0u8; 8192];
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                if let Ok(mut t) = tail.lock() {
                    t.push(&buf[..n]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const VARS: RollbackVars<'static> = RollbackVars {
        repo: "acme/shop",
        previous_sha: "abc1234",
        deployed_sha: "def5678",
        work_item: "SHOP-1",
    };

    fn argv(words: &[&str]) -> Vec<String> {
        words.iter().map(|w| (*w).to_owned()).collect()
    }

    #[test]
    fn placeholders_are_whole_argv_words_and_bad_values_are_refused() {
        assert_eq!(
            render_command(
                &argv(&[
                    "rollback",
                    "{repo}",
                    "--to={previous_sha}",
                    "{deployed_sha}",
                    "{work_item}"
                ]),
                &VARS
            )
            .expect("valid"),
            ["rollback", "acme/shop", "--to=abc1234", "def5678", "SHOP-1"]
        );
        let evil = RollbackVars {
            repo: "a'; rm -rf / #",
            ..VARS
        };
        let e = render_command(&argv(&["x", "{repo}"]), &evil).expect_err("refused");
        assert!(e.contains("{repo}"), "{e}");
        assert_eq!(
            display_argv(&argv(&["echo", "a b", "it's"])),
            r"echo 'a b' 'it'\''s'"
        );
    }

    #[tokio::test]
    async fn a_refused_value_runs_nothing_and_says_why() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("ran");
        let evil = RollbackVars {
            previous_sha: "abc1234; touch x",
            ..VARS
        };
        let out = run_rollback(
            &argv(&["touch", &marker.display().to_string(), "{previous_sha}"]),
            &evil,
            Duration::from_secs(10),
        )
        .await;
        assert!(!out.succeeded());
        assert!(
            out.error
                .as_deref()
                .unwrap_or_default()
                .contains("{previous_sha}"),
            "{out:?}"
        );
        assert!(!marker.exists(), "nothing ran");
    }

    #[tokio::test]
    async fn arguments_never_reach_a_shell() {
        let out = run_rollback(
            &argv(&["echo", "$HOME;", "`id`", "{previous_sha}"]),
            &VARS,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(out.output, "$HOME; `id` abc1234\n", "{out:?}");
        assert!(out.succeeded());
    }

    #[tokio::test]
    async fn runs_once_and_records_exit_code_and_output_in_order() {
        let out = run_rollback(
            &argv(&[
                "sh",
                "-c",
                "echo to-out $1; echo to-err $ORCH_ROLLBACK_REPO >&2; exit 3",
                "sh",
                "{previous_sha}",
            ]),
            &VARS,
            Duration::from_secs(10),
        )
        .await;
        assert_eq!(out.exit_code, Some(3), "{out:?}");
        assert!(!out.timed_out);
        assert_eq!(out.output, "to-out abc1234\nto-err acme/shop\n");
        assert!(!out.succeeded());
        assert!(out.finished_at_ms >= out.started_at_ms);
    }

    #[tokio::test]
    async fn a_command_that_hangs_is_killed_with_its_children() {
        let dir = tempfile::tempdir().expect("tempdir");
        let marker = dir.path().join("child-survived");
        // The child would write the marker after 2 s unless the whole group is killed.
        let template = format!(
            "echo started; (sleep 2; touch {}) & sleep 30",
            marker.display()
        );
        let start = std::time::Instant::now();
        let out = run_rollback(
            &argv(&["sh", "-c", &template]),
            &VARS,
            Duration::from_millis(500),
        )
        .await;
        assert!(out.timed_out, "{out:?}");
        assert_eq!(out.exit_code, None);
        assert!(
            out.error
                .as_deref()
                .unwrap_or_default()
                .contains("timed out")
        );
        assert_eq!(out.output, "started\n");
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            start.elapsed()
        );
        // Proving that something did not happen takes waiting past the moment it would have.
        tokio::time::sleep(Duration::from_millis(2_500)).await;
        assert!(
            !marker.exists(),
            "a child of the rollback outlived the timeout"
        );
    }

    #[tokio::test]
    async fn secrets_are_not_passed_on_and_nothing_configured_runs_nothing() {
        let env = [
            ("ORCH_INTERNAL_TOKEN", "s3cret"),
            ("PLANE_BOT_TOKEN_DEVELOPER", "s3cret"),
            ("GITEA_TOKEN", "s3cret"),
            ("KUBECONFIG", "/etc/kube"),
            ("PATH", "/usr/bin:/bin"),
        ]
        .map(|(k, v)| (k.into(), v.into()));
        let out = run_with_env(
            &argv(&[
                "sh",
                "-c",
                "echo \"[${ORCH_INTERNAL_TOKEN:-unset}/${PLANE_BOT_TOKEN_DEVELOPER:-unset}/${GITEA_TOKEN:-unset}/$KUBECONFIG]\"",
            ]),
            &VARS,
            Duration::from_secs(10),
            env.into_iter(),
        )
        .await;
        assert_eq!(out.output, "[unset/unset/unset//etc/kube]\n");
        let out = run_rollback(&[], &VARS, Duration::from_secs(1)).await;
        assert_eq!(out.exit_code, None);
        assert!(out.error.is_some());
    }

    #[test]
    fn the_output_keeps_its_tail() {
        let mut t = Tail::default();
        t.push(&vec![b'a'; MAX_OUTPUT_BYTES]);
        t.push(b"end");
        let text = t.text();
        assert!(text.starts_with("[... earlier output dropped]\n"));
        assert!(text.ends_with("aend"));
        assert_eq!(t.bytes.len(), MAX_OUTPUT_BYTES);
    }
}
