//! Runs git as a subprocess: an argument vector, never a shell; a timeout that kills it; a
//! fixed, quiet environment (no prompts, C locale, no system config).

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::Command;

/// What a git invocation printed and how it ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GitOutput {
    /// The exit code; `None` when a signal ended it.
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl GitOutput {
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

/// Why a git invocation did not give a usable answer.
#[derive(Debug, thiserror::Error)]
pub enum GitError {
    #[error("git argument refused: {0}")]
    BadArgument(String),
    #[error("cannot run git: {0}")]
    Spawn(std::io::Error),
    #[error("git {command} timed out after {seconds}s")]
    Timeout { command: String, seconds: u64 },
    #[error("git {command} failed (exit {code:?}): {stderr}")]
    Failed {
        command: String,
        code: Option<i32>,
        stderr: String,
    },
}

/// The result of `git merge-tree --write-tree`: a real three-way merge computed without a
/// work tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeTree {
    /// The merge is clean; this is the tree it produces.
    Clean { tree: String },
    /// The merge conflicts in these files.
    Conflicts { tree: String, files: Vec<String> },
}

/// A git runner. Cheap to clone.
#[derive(Clone)]
pub struct Git {
    program: PathBuf,
    timeout: Duration,
    /// Extra variables for every invocation (e.g. `GIT_CONFIG_*` carrying an auth header):
    /// kept out of the argument vector, which `ps` shows, and out of `Debug`.
    env: std::sync::Arc<Vec<(String, String)>>,
}

impl std::fmt::Debug for Git {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values may be credentials: only the names are shown.
        let names: Vec<&str> = self.env.iter().map(|(k, _)| k.as_str()).collect();
        f.debug_struct("Git")
            .field("program", &self.program)
            .field("timeout", &self.timeout)
            .field("env", &names)
            .finish()
    }
}

impl Default for Git {
    fn default() -> Self {
        Git::new()
    }
}

impl Git {
    /// `git` from the PATH, with a two-minute timeout per invocation.
    pub fn new() -> Self {
        Git {
            program: PathBuf::from("git"),
            timeout: Duration::from_secs(120),
            env: std::sync::Arc::new(Vec::new()),
        }
    }

    /// Sets a variable for every invocation (values never reach a log or `Debug`).
    pub fn with_env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        std::sync::Arc::make_mut(&mut self.env).push((name.into(), value.into()));
        self
    }

    /// Uses another git binary.
    pub fn with_program(mut self, program: impl Into<PathBuf>) -> Self {
        self.program = program.into();
        self
    }

    /// Sets the timeout of one invocation.
    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Runs `git <args>` in `dir` and returns its output whatever its exit code. The first
    /// argument is the subcommand and must not look like an option's value; no argument may
    /// hold a NUL or a newline. Values from outside must be validated first (see
    /// [`crate::validate`]) or passed after `--`.
    pub async fn run(&self, dir: &Path, args: &[&str]) -> Result<GitOutput, GitError> {
        check_args(args)?;
        let command = args.first().copied().unwrap_or_default().to_owned();
        let mut cmd = Command::new(&self.program);
        cmd.args(args)
            .current_dir(dir)
            .env("GIT_TERMINAL_PROMPT", "0")
            .env("GIT_CONFIG_NOSYSTEM", "1")
            .env("LC_ALL", "C")
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true);
        let child = cmd.spawn().map_err(GitError::Spawn)?;
        let out = match tokio::time::timeout(self.timeout, child.wait_with_output()).await {
            Ok(out) => out.map_err(GitError::Spawn)?,
            Err(_) => {
                return Err(GitError::Timeout {
                    command,
                    seconds: self.timeout.as_secs(),
                });
            }
        };
        let output = GitOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        };
        tracing::trace!(command, code = ?output.code, "git ran");
        Ok(output)
    }

    /// Runs `git <args>` and returns its stdout, or [`GitError::Failed`] on a non-zero exit.
    pub async fn ok(&self, dir: &Path, args: &[&str]) -> Result<String, GitError> {
        let out = self.run(dir, args).await?;
        if out.success() {
            Ok(out.stdout)
        } else {
            Err(GitError::Failed {
                command: args.first().copied().unwrap_or_default().to_owned(),
                code: out.code,
                stderr: out.stderr.trim().chars().take(2000).collect(),
            })
        }
    }

    /// Returns the commit `rev` names, or `None` when it names nothing.
    pub async fn rev_parse(&self, dir: &Path, rev: &str) -> Result<Option<String>, GitError> {
        let spec = format!("{rev}^{{commit}}");
        let out = self
            .run(
                dir,
                &[
                    "rev-parse",
                    "--verify",
                    "--quiet",
                    "--end-of-options",
                    &spec,
                ],
            )
            .await?;
        Ok(out
            .success()
            .then(|| out.stdout.trim().to_owned())
            .filter(|s| !s.is_empty()))
    }

    /// Returns whether `ancestor` is an ancestor of (or equal to) `descendant`.
    pub async fn is_ancestor(
        &self,
        dir: &Path,
        ancestor: &str,
        descendant: &str,
    ) -> Result<bool, GitError> {
        let out = self
            .run(dir, &["merge-base", "--is-ancestor", ancestor, descendant])
            .await?;
        match out.code {
            Some(0) => Ok(true),
            Some(1) => Ok(false),
            code => Err(GitError::Failed {
                command: "merge-base".to_owned(),
                code,
                stderr: out.stderr.trim().to_owned(),
            }),
        }
    }

    /// Merges `head` into `base` without a work tree (`git merge-tree --write-tree`): exit 0
    /// is clean, 1 is conflicts, anything else an error.
    pub async fn merge_tree(
        &self,
        dir: &Path,
        base: &str,
        head: &str,
    ) -> Result<MergeTree, GitError> {
        let out = self
            .run(
                dir,
                &[
                    "merge-tree",
                    "--write-tree",
                    "--name-only",
                    "--no-messages",
                    base,
                    head,
                ],
            )
            .await?;
        let mut lines = out.stdout.lines();
        let tree = lines.next().unwrap_or_default().trim().to_owned();
        match out.code {
            Some(0) if !tree.is_empty() => Ok(MergeTree::Clean { tree }),
            Some(1) if !tree.is_empty() => {
                let mut files: Vec<String> = lines
                    .take_while(|l| !l.is_empty())
                    .map(str::to_owned)
                    .collect();
                files.dedup();
                Ok(MergeTree::Conflicts { tree, files })
            }
            code => Err(GitError::Failed {
                command: "merge-tree".to_owned(),
                code,
                stderr: out.stderr.trim().to_owned(),
            }),
        }
    }
}

fn check_args(args: &[&str]) -> Result<(), GitError> {
    let Some(first) = args.first() else {
        return Err(GitError::BadArgument("no subcommand".to_owned()));
    };
    if first.is_empty() {
        return Err(GitError::BadArgument("empty subcommand".to_owned()));
    }
    if let Some(bad) = args.iter().find(|a| a.contains(['\0', '\n', '\r'])) {
        return Err(GitError::BadArgument(format!(
            "argument holds NUL or a newline: {}",
            bad.escape_debug()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn repo_with_conflict() -> (tempfile::TempDir, Git) {
        let dir = tempfile::tempdir().expect("tempdir");
        let git = Git::new();
        let d = dir.path();
        let id = ["-c", "user.name=t", "-c", "user.email=t@example.com"];
        git.ok(d, &["init", "-q", "-b", "main"])
            .await
            .expect("init");
        std::fs::write(d.join("a.txt"), "one\n").expect("write");
        git.ok(d, &["add", "a.txt"]).await.expect("add");
        git.ok(
            d,
            &[id[0], id[1], id[2], id[3], "commit", "-q", "-m", "base"],
        )
        .await
        .expect("commit");
        git.ok(d, &["checkout", "-q", "-b", "left"])
            .await
            .expect("left");
        std::fs::write(d.join("a.txt"), "left\n").expect("write");
        git.ok(
            d,
            &[id[0], id[1], id[2], id[3], "commit", "-q", "-am", "left"],
        )
        .await
        .expect("commit");
        git.ok(d, &["checkout", "-q", "-b", "clean", "main"])
            .await
            .expect("clean");
        std::fs::write(d.join("b.txt"), "b\n").expect("write");
        git.ok(d, &["add", "b.txt"]).await.expect("add");
        git.ok(
            d,
            &[id[0], id[1], id[2], id[3], "commit", "-q", "-m", "clean"],
        )
        .await
        .expect("commit");
        git.ok(d, &["checkout", "-q", "main"]).await.expect("main");
        std::fs::write(d.join("a.txt"), "main\n").expect("write");
        git.ok(
            d,
            &[id[0], id[1], id[2], id[3], "commit", "-q", "-am", "main"],
        )
        .await
        .expect("commit");
        (dir, git)
    }

    #[tokio::test]
    async fn merge_tree_tells_clean_from_conflicts() {
        let (dir, git) = repo_with_conflict().await;
        let d = dir.path();
        match git
            .merge_tree(d, "main", "clean")
            .await
            .expect("merge-tree")
        {
            MergeTree::Clean { tree } => assert_eq!(tree.len(), 40),
            other => panic!("expected clean, got {other:?}"),
        }
        match git.merge_tree(d, "main", "left").await.expect("merge-tree") {
            MergeTree::Conflicts { files, .. } => assert_eq!(files, vec!["a.txt".to_owned()]),
            other => panic!("expected conflicts, got {other:?}"),
        }
        assert!(git.merge_tree(d, "main", "nope").await.is_err());
    }

    #[tokio::test]
    async fn rev_parse_and_ancestry() {
        let (dir, git) = repo_with_conflict().await;
        let d = dir.path();
        let main = git
            .rev_parse(d, "main")
            .await
            .expect("rev-parse")
            .expect("main");
        assert_eq!(main.len(), 40);
        assert_eq!(git.rev_parse(d, "missing").await.expect("rev-parse"), None);
        // An option-looking revision is a revision after --end-of-options, not an option.
        assert_eq!(git.rev_parse(d, "--all").await.expect("rev-parse"), None);
        let base = git
            .rev_parse(d, "main~1")
            .await
            .expect("rev-parse")
            .expect("base");
        assert!(git.is_ancestor(d, &base, "main").await.expect("ancestor"));
        assert!(!git.is_ancestor(d, "main", "left").await.expect("ancestor"));
    }

    #[tokio::test]
    async fn arguments_with_newlines_are_refused_and_failures_carry_stderr() {
        let dir = tempfile::tempdir().expect("tempdir");
        let git = Git::new();
        assert!(matches!(
            git.run(dir.path(), &["status", "a\nb"]).await,
            Err(GitError::BadArgument(_))
        ));
        assert!(matches!(
            git.run(dir.path(), &[]).await,
            Err(GitError::BadArgument(_))
        ));
        let err = git.ok(dir.path(), &["log"]).await.expect_err("not a repo");
        assert!(err.to_string().contains("not a git repository"), "{err}");
    }

    #[tokio::test]
    async fn extra_variables_reach_git_but_not_debug() {
        let dir = tempfile::tempdir().expect("tempdir");
        let git = Git::new()
            .with_env("GIT_CONFIG_COUNT", "1")
            .with_env("GIT_CONFIG_KEY_0", "orch.probe")
            .with_env("GIT_CONFIG_VALUE_0", "hunter2");
        let got = git
            .ok(dir.path(), &["config", "--get", "orch.probe"])
            .await
            .expect("config from the environment");
        assert_eq!(got.trim(), "hunter2");
        let shown = format!("{git:?}");
        assert!(!shown.contains("hunter2"), "{shown}");
        assert!(shown.contains("GIT_CONFIG_VALUE_0"), "{shown}");
    }

    #[tokio::test]
    async fn a_hung_git_is_killed_at_the_timeout() {
        let dir = tempfile::tempdir().expect("tempdir");
        // `sleep` stands in for a git that hangs: the runner only cares about the process.
        let git = Git::new()
            .with_program("sleep")
            .with_timeout(Duration::from_millis(100));
        let started = std::time::Instant::now();
        let err = git.run(dir.path(), &["5"]).await.expect_err("timeout");
        assert!(matches!(err, GitError::Timeout { .. }), "{err}");
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
