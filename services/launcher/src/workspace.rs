//! A job's checkout: `git fetch` + checkout of the work item's branch in a fresh per-job
//! directory before the run; after a successful run, commit what the agent left, bring
//! in what the branch gained meanwhile, and push.
//!
//! Every name reaching git was validated first (repo, branch, base); the forge gives the
//! URL without credentials, and Gitea's token goes to git through the environment
//! (`GIT_CONFIG_*`), never into an argument, a URL or the checkout's config — where the
//! agent could read it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use orchestrator_forge::{Forge, RepoName};
use orchestrator_git::{Git, GitError};

/// Why a checkout or a delivery failed.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("cannot prepare the checkout directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot fetch {what}: {source}")]
    Fetch { what: String, source: GitError },
    #[error("the repository has neither the branch '{branch}' nor the base '{base}'")]
    NoBase { branch: String, base: String },
    #[error("git: {0}")]
    Git(#[from] GitError),
    #[error("the branch '{0}' moved on the forge and the agent's work does not rebase onto it")]
    Diverged(String),
}

/// A prepared checkout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkout {
    pub dir: PathBuf,
    pub branch: String,
    pub base: String,
    /// HEAD when the agent started: "work done" means HEAD moved or the tree changed.
    pub start_sha: String,
}

/// What a delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    /// A commit of the agent's uncommitted work was made.
    pub committed: bool,
    /// The branch was pushed (it moved, or did not exist on the forge yet).
    pub pushed: bool,
    pub head_sha: String,
    /// Files that differ between the start of the run and what was pushed.
    pub changed_files: Vec<String>,
}

/// Git over one forge, for job checkouts.
#[derive(Clone)]
pub struct Workspace {
    git: Git,
    forge: Arc<dyn Forge>,
}

impl Workspace {
    /// A workspace over `forge`; the forge's credentials (Gitea's token) authenticate
    /// fetch and push through git's environment.
    pub fn new(forge: Arc<dyn Forge>, timeout: Duration) -> Self {
        let git = Git::new()
            .with_timeout(timeout)
            .with_env(forge.git_auth_env());
        Workspace { git, forge }
    }

    pub fn forge(&self) -> &Arc<dyn Forge> {
        &self.forge
    }

    /// Makes `dir` a fresh checkout of `branch` (or, when the branch does not exist on the
    /// forge yet, a new branch from `base`).
    pub async fn prepare(
        &self,
        dir: &Path,
        repo: &RepoName,
        branch: &str,
        base: &str,
    ) -> Result<Checkout, WorkspaceError> {
        let io = |source| WorkspaceError::Io {
            path: dir.to_path_buf(),
            source,
        };
        if dir.exists() {
            std::fs::remove_dir_all(dir).map_err(io)?;
        }
        std::fs::create_dir_all(dir).map_err(io)?;
        let url = self.forge.clone_url(repo);
        self.git.ok(dir, &["init", "-q"]).await?;
        self.git.ok(dir, &["remote", "add", "origin", &url]).await?;
        let fetched = self.fetch_branch(dir, branch).await?;
        let start = if fetched {
            format!("refs/remotes/origin/{branch}")
        } else {
            if !self.fetch_branch(dir, base).await? {
                return Err(WorkspaceError::NoBase {
                    branch: branch.to_owned(),
                    base: base.to_owned(),
                });
            }
            format!("refs/remotes/origin/{base}")
        };
        self.git
            .ok(dir, &["checkout", "-q", "-B", branch, &start])
            .await?;
        let start_sha = self.head(dir).await?;
        Ok(Checkout {
            dir: dir.to_path_buf(),
            branch: branch.to_owned(),
            base: base.to_owned(),
            start_sha,
        })
    }

    /// Fetches `branch` into `refs/remotes/origin/<branch>`; false when the forge does not
    /// have it.
    async fn fetch_branch(&self, dir: &Path, branch: &str) -> Result<bool, WorkspaceError> {
        let head_ref = format!("refs/heads/{branch}");
        let listed = self
            .git
            .ok(dir, &["ls-remote", "--heads", "origin", &head_ref])
            .await
            .map_err(|source| WorkspaceError::Fetch {
                what: "the repository".to_owned(),
                source,
            })?;
        if listed.trim().is_empty() {
            return Ok(false);
        }
        let refspec = format!("+refs/heads/{branch}:refs/remotes/origin/{branch}");
        self.git
            .ok(dir, &["fetch", "-q", "--no-tags", "origin", &refspec])
            .await
            .map_err(|source| WorkspaceError::Fetch {
                what: format!("branch '{branch}'"),
                source,
            })?;
        Ok(true)
    }

    /// The commit `rev` names in the checkout, if any.
    pub async fn rev(&self, co: &Checkout, rev: &str) -> Option<String> {
        let out = self
            .git
            .ok(&co.dir, &["rev-parse", "--verify", "--quiet", rev])
            .await
            .ok()?;
        Some(out.trim().to_owned()).filter(|s| !s.is_empty())
    }

    async fn head(&self, dir: &Path) -> Result<String, WorkspaceError> {
        Ok(self
            .git
            .ok(dir, &["rev-parse", "HEAD"])
            .await?
            .trim()
            .to_owned())
    }

    /// Whether the run changed anything: a moved HEAD or a dirty tree.
    pub async fn work_done(&self, co: &Checkout) -> Result<bool, WorkspaceError> {
        if self.head(&co.dir).await? != co.start_sha {
            return Ok(true);
        }
        let status = self
            .git
            .ok(&co.dir, &["status", "--porcelain", "--untracked-files=all"])
            .await?;
        Ok(!status.trim().is_empty())
    }

    /// Commits what the agent left (as `author`), fetches the branch again and rebases onto
    /// what it gained meanwhile, then pushes. Nothing new is not an error.
    pub async fn deliver(
        &self,
        co: &Checkout,
        author: &str,
        message: &str,
    ) -> Result<Delivered, WorkspaceError> {
        let dir = &co.dir;
        let name = format!("user.name={author} (orchestrator)");
        let email = format!("user.email={author}@orchestrator.invalid");
        // The agent may have switched branches: what it did is on HEAD, pushed to ours.
        self.git.ok(dir, &["add", "-A"]).await?;
        let staged = self
            .git
            .ok(dir, &["status", "--porcelain", "--untracked-files=all"])
            .await?;
        let committed = !staged.trim().is_empty();
        if committed {
            self.git
                .ok(
                    dir,
                    &[
                        "-c",
                        &name,
                        "-c",
                        &email,
                        "commit",
                        "-q",
                        "--no-verify",
                        "-m",
                        message,
                    ],
                )
                .await?;
        }
        let remote = format!("refs/remotes/origin/{}", co.branch);
        let on_forge = self.fetch_branch(dir, &co.branch).await?;
        if on_forge {
            let remote_sha = self.git.rev_parse(dir, &remote).await?.unwrap_or_default();
            let head = self.head(dir).await?;
            if !remote_sha.is_empty() && !self.git.is_ancestor(dir, &remote_sha, &head).await? {
                let out = self
                    .git
                    .run(
                        dir,
                        &[
                            "-c",
                            &name,
                            "-c",
                            &email,
                            "rebase",
                            "-q",
                            "--no-autosquash",
                            &remote,
                        ],
                    )
                    .await?;
                if !out.success() {
                    let _ = self.git.run(dir, &["rebase", "--abort"]).await;
                    return Err(WorkspaceError::Diverged(co.branch.clone()));
                }
            }
        }
        let head_sha = self.head(dir).await?;
        let remote_sha = if on_forge {
            self.git.rev_parse(dir, &remote).await?.unwrap_or_default()
        } else {
            String::new()
        };
        let pushed = remote_sha != head_sha;
        if pushed {
            let dest = format!("HEAD:refs/heads/{}", co.branch);
            self.git.ok(dir, &["push", "-q", "origin", &dest]).await?;
        }
        let diff = self
            .git
            .ok(dir, &["diff", "--name-only", &co.start_sha, &head_sha])
            .await?;
        Ok(Delivered {
            committed,
            pushed,
            head_sha,
            changed_files: diff.lines().map(str::to_owned).collect(),
        })
    }
}
