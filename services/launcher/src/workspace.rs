//! A job's checkout: the branch's head as the forge has it now (`git ls-remote`), checked
//! out in a fresh per-job directory before the run; after a successful run, commit what the
//! agent left, bring in what the branch gained meanwhile, and push.
//!
//! The objects come from a per-repository mirror kept warm (`<workdir>/mirrors/`): the
//! checkout borrows them through `objects/info/alternates` (as `git clone --shared` does)
//! instead of fetching the history again, so a checkout is one `ls-remote` and one
//! `checkout`, and its disk use is the work tree and the objects the run adds. The mirror
//! is fetched when it lacks the head the forge names, and is given what a delivery pushed.
//! It is never garbage-collected by git (`gc.auto=0`): a running checkout may borrow any of
//! its objects. Any trouble with the mirror falls back to a plain fetch into the checkout.
//!
//! Every name reaching git was validated first (repo, branch, base); the forge gives the
//! URL without credentials, and Gitea's token goes to git through the environment
//! (`GIT_CONFIG_*`), never into an argument, a URL or the checkout's config — where the
//! agent could read it.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
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
    /// The mirror's object store the checkout borrows from (read-only to the agent), when
    /// it was made from the mirror.
    pub shared_objects: Option<PathBuf>,
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

/// The name a mirror has while it is being made (then `-<pid>`).
const MAKING: &str = ".making-";

/// Where `repo`'s mirror is: `<mirrors>/<owner>--<name>.git` (a validated name: neither
/// part holds a `/` or `..`).
fn mirror_dir(mirrors: &Path, repo: &RepoName) -> PathBuf {
    mirrors.join(format!("{}--{}.git", repo.owner, repo.name))
}

/// `--git-dir=<dir>`: a repository named, never discovered (a broken one must not send git
/// up to a repository above it).
fn git_dir_arg(dir: &Path) -> String {
    format!("--git-dir={}", dir.display())
}

/// Empties `dir` (a previous attempt's checkout) and makes it.
fn fresh_dir(dir: &Path) -> Result<(), WorkspaceError> {
    let io = |source| WorkspaceError::Io {
        path: dir.to_path_buf(),
        source,
    };
    if dir.exists() {
        std::fs::remove_dir_all(dir).map_err(io)?;
    }
    std::fs::create_dir_all(dir).map_err(io)
}

/// Writes the `.git` of a checkout that borrows `objects` (gitrepository-layout(5): `HEAD`,
/// `config`, `objects/`, `refs/`): `origin` is the forge (no credentials: those go through
/// git's environment), `refs/remotes/origin/<from>` the head the forge named. `from` was
/// validated as a branch name and `sha` as a commit id before they reach a path or a file.
fn write_git_dir(
    dir: &Path,
    url: &str,
    from: &str,
    sha: &str,
    objects: &Path,
) -> std::io::Result<()> {
    let git = dir.join(".git");
    std::fs::create_dir_all(git.join("objects/info"))?;
    std::fs::create_dir_all(git.join("refs/heads"))?;
    std::fs::create_dir_all(git.join("refs/tags"))?;
    let tracking = git.join("refs/remotes/origin").join(from);
    if let Some(parent) = tracking.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::write(&tracking, format!("{sha}\n"))?;
    std::fs::write(
        git.join("objects/info/alternates"),
        format!("{}\n", objects.display()),
    )?;
    std::fs::write(git.join("HEAD"), "ref: refs/heads/main\n")?;
    std::fs::write(
        git.join("config"),
        format!(
            "[core]\n\trepositoryformatversion = 0\n\tfilemode = true\n\tbare = false\n\
             \tlogallrefupdates = true\n\
             [remote \"origin\"]\n\turl = {}\n\tfetch = +refs/heads/*:refs/remotes/origin/*\n",
            config_value(url)
        ),
    )
}

/// A value for git's config file, quoted (the forge's URL or a path may hold `#`, `;` or
/// a backslash).
fn config_value(v: &str) -> String {
    format!("\"{}\"", v.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Git over one forge, for job checkouts.
#[derive(Clone)]
pub struct Workspace {
    git: Git,
    forge: Arc<dyn Forge>,
    /// Where the per-repository mirrors live; `None`: every checkout fetches for itself.
    mirrors: Option<PathBuf>,
    /// One fetch into a mirror at a time in this process (a ref lock taken by a concurrent
    /// fetch would fail the other).
    mirror_locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

impl Workspace {
    /// A workspace over `forge`; the forge's credentials (Gitea's token) authenticate
    /// fetch and push through git's environment.
    pub fn new(forge: Arc<dyn Forge>, timeout: Duration) -> Self {
        let git = Git::new()
            .with_timeout(timeout)
            .with_env(forge.git_auth_env());
        Workspace {
            git,
            forge,
            mirrors: None,
            mirror_locks: Arc::default(),
        }
    }

    /// Checkouts borrow their objects from per-repository mirrors under `dir`. A mirror
    /// half-made by a launcher that died making it is removed (it was never renamed into
    /// place, so no checkout borrows from it).
    pub fn with_mirrors(mut self, dir: PathBuf) -> Self {
        if let Ok(entries) = std::fs::read_dir(&dir) {
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(MAKING) {
                    let _ = std::fs::remove_dir_all(e.path());
                }
            }
        }
        self.mirrors = Some(dir);
        self
    }

    pub fn forge(&self) -> &Arc<dyn Forge> {
        &self.forge
    }

    /// Makes `dir` a fresh checkout of `branch` (or, when the branch does not exist on the
    /// forge yet, a new branch from `base`), exactly at the head the forge has now.
    pub async fn prepare(
        &self,
        dir: &Path,
        repo: &RepoName,
        branch: &str,
        base: &str,
    ) -> Result<Checkout, WorkspaceError> {
        fresh_dir(dir)?;
        if let Some(mirrors) = &self.mirrors {
            match self
                .prepare_from_mirror(mirrors, dir, repo, branch, base)
                .await
            {
                Ok(co) => return Ok(co),
                // The forge's answer is the answer: no branch and no base is not the mirror's fault.
                Err(e @ WorkspaceError::NoBase { .. }) => return Err(e),
                Err(e) => {
                    tracing::warn!(repo = %repo, branch, error = %e, "checkout from the mirror failed; fetching into the checkout instead");
                    fresh_dir(dir)?;
                }
            }
        }
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
            shared_objects: None,
        })
    }

    /// The checkout made from the repository's mirror: the forge names the head, the
    /// mirror is fetched only when it lacks it, and the checkout's `.git` is written here —
    /// `origin` the forge, its remote-tracking ref at the head, the mirror's objects as an
    /// alternate — then one `git checkout`.
    async fn prepare_from_mirror(
        &self,
        mirrors: &Path,
        dir: &Path,
        repo: &RepoName,
        branch: &str,
        base: &str,
    ) -> Result<Checkout, WorkspaceError> {
        let url = self.forge.clone_url(repo);
        let (from, sha) = match self.branch_head(dir, repo, branch).await? {
            Some(sha) => (branch, sha),
            None => match self.branch_head(dir, repo, base).await? {
                Some(sha) => (base, sha),
                None => {
                    return Err(WorkspaceError::NoBase {
                        branch: branch.to_owned(),
                        base: base.to_owned(),
                    });
                }
            },
        };
        let mirror = self.mirror(mirrors, repo).await?;
        let objects = mirror.join("objects");
        write_git_dir(dir, &url, from, &sha, &objects).map_err(|source| WorkspaceError::Io {
            path: dir.join(".git"),
            source,
        })?;
        // The directories named, never discovered: a `.git` git did not take for one must
        // not send it up to a repository above (the orchestrator's own checkout, say).
        let git_dir = git_dir_arg(&dir.join(".git"));
        let work_tree = format!("--work-tree={}", dir.display());
        let checkout = [
            git_dir.as_str(),
            work_tree.as_str(),
            "checkout",
            "-q",
            "-B",
            branch,
            sha.as_str(),
        ];
        if !self.git.run(dir, &checkout).await?.success() {
            // The mirror lacks the head (someone else pushed it): fetch it, then again.
            self.fetch_into_mirror(&mirror, &url, from).await?;
            self.git.ok(dir, &checkout).await?;
        }
        Ok(Checkout {
            dir: dir.to_path_buf(),
            branch: branch.to_owned(),
            base: base.to_owned(),
            start_sha: sha,
            shared_objects: Some(objects),
        })
    }

    /// The commit the forge's `branch` is at, or `None` when it has no such branch: the
    /// forge's answer (its API, or the local forge's ref files), else git's `ls-remote`.
    pub async fn branch_head(
        &self,
        cwd: &Path,
        repo: &RepoName,
        branch: &str,
    ) -> Result<Option<String>, WorkspaceError> {
        match self.forge.branch_head(repo, branch).await {
            Ok(head) => return Ok(head),
            Err(e) => {
                tracing::debug!(repo = %repo, branch, error = %e, "the forge did not name the head; asking git");
            }
        }
        let url = self.forge.clone_url(repo);
        let head_ref = format!("refs/heads/{branch}");
        let listed = self
            .git
            .ok(cwd, &["ls-remote", &url, &head_ref])
            .await
            .map_err(|source| WorkspaceError::Fetch {
                what: "the repository".to_owned(),
                source,
            })?;
        Ok(listed
            .lines()
            .filter_map(|l| l.split_once('\t'))
            .find(|(_, r)| *r == head_ref)
            .map(|(sha, _)| sha.trim().to_owned())
            .filter(|sha| orchestrator_git::is_commit_id(sha)))
    }

    /// The repository's mirror, made on first use (a bare repository, never gc'd).
    async fn mirror(&self, mirrors: &Path, repo: &RepoName) -> Result<PathBuf, WorkspaceError> {
        let dir = mirror_dir(mirrors, repo);
        if dir.join("objects").is_dir() {
            return Ok(dir);
        }
        let lock = self.mirror_lock(&dir);
        let _held = lock.lock().await;
        if dir.join("objects").is_dir() {
            return Ok(dir);
        }
        let io = |source| WorkspaceError::Io {
            path: dir.clone(),
            source,
        };
        std::fs::create_dir_all(mirrors).map_err(io)?;
        // Made aside and renamed into place: a half-made mirror is never seen.
        let making = mirrors.join(format!("{MAKING}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&making);
        std::fs::create_dir_all(&making).map_err(io)?;
        self.git.ok(&making, &["init", "-q", "--bare"]).await?;
        self.git
            .ok(&making, &[&git_dir_arg(&making), "config", "gc.auto", "0"])
            .await?;
        std::fs::rename(&making, &dir).map_err(io)?;
        Ok(dir)
    }

    /// Fetches `branch` into `repo`'s mirror, if there is one (the forge said it was
    /// pushed). `Ok(false)`: no mirror of that repository here, nothing to warm.
    pub async fn warm(&self, repo: &RepoName, branch: &str) -> Result<bool, WorkspaceError> {
        let Some(mirrors) = &self.mirrors else {
            return Ok(false);
        };
        let mirror = mirror_dir(mirrors, repo);
        if !mirror.join("objects").is_dir() {
            return Ok(false);
        }
        let url = self.forge.clone_url(repo);
        self.fetch_into_mirror(&mirror, &url, branch).await?;
        Ok(true)
    }

    fn mirror_lock(&self, mirror: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.mirror_locks.lock().unwrap_or_else(|p| p.into_inner());
        locks
            .entry(mirror.display().to_string())
            .or_default()
            .clone()
    }

    async fn fetch_into_mirror(
        &self,
        mirror: &Path,
        url: &str,
        branch: &str,
    ) -> Result<(), WorkspaceError> {
        let lock = self.mirror_lock(mirror);
        let _held = lock.lock().await;
        let refspec = format!("+refs/heads/{branch}:refs/heads/{branch}");
        self.git
            .ok(
                mirror,
                &[
                    &git_dir_arg(mirror),
                    "fetch",
                    "-q",
                    "--no-tags",
                    url,
                    &refspec,
                ],
            )
            .await
            .map_err(|source| WorkspaceError::Fetch {
                what: format!("branch '{branch}' into the mirror"),
                source,
            })?;
        Ok(())
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

    /// Gives the mirror what a delivery pushed, so that the next run's checkout finds it
    /// there. Best effort: a mirror that lacks a head is fetched at the next checkout.
    async fn warm_mirror(&self, co: &Checkout) {
        let Some(objects) = &co.shared_objects else {
            return;
        };
        let Some(mirror) = objects.parent() else {
            return;
        };
        let lock = self.mirror_lock(mirror);
        let _held = lock.lock().await;
        let dest = format!("+HEAD:refs/heads/{}", co.branch);
        let target = mirror.display().to_string();
        if let Err(e) = self.git.ok(&co.dir, &["push", "-q", &target, &dest]).await {
            tracing::debug!(branch = co.branch, error = %e, "cannot give the mirror the pushed head");
        }
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
            self.warm_mirror(co).await;
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
