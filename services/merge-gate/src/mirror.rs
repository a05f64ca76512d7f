//! Bare mirrors of the forge's repositories, `<dir>/<owner>/<name>.git`, cloned from what
//! the forge says to clone (`Forge::clone_url`) and fetched before each read. Merges are
//! computed with `git merge-tree --write-tree` inside the mirror: no work tree is ever
//! checked out or touched.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use orchestrator_forge::{ForgeConfig, ForgeKind, RepoName};
use orchestrator_git::{Git, MergeTree};
use orchestrator_kit::Secret;

/// `check_branch_mergeable`'s answer: one signature and meaning everywhere.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mergeability {
    Mergeable,
    Conflicts(Vec<String>),
    Error(String),
}

/// A mergeability answer with the commits it was computed on (empty when unknown).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checked {
    pub mergeability: Mergeability,
    pub head_sha: String,
    pub base_sha: String,
}

/// The mirrors under one directory.
pub struct Mirrors {
    dir: PathBuf,
    git: Git,
    /// One update at a time per repo (in this process; git's ref locks cover the rest).
    locks: Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

impl Mirrors {
    /// Mirrors under `dir`. A Gitea token, when configured, reaches git as an HTTP header
    /// through the environment (`GIT_CONFIG_*`): never in a URL, an argument or a log.
    pub fn new(dir: PathBuf, forge: &ForgeConfig) -> Self {
        let mut git = Git::new();
        if forge.kind == ForgeKind::Gitea
            && let Some(token) = forge.gitea.as_ref().and_then(|g| g.token.as_ref())
        {
            git = git.with_env(vec![
                ("GIT_CONFIG_COUNT".into(), Secret::new("1")),
                ("GIT_CONFIG_KEY_0".into(), Secret::new("http.extraHeader")),
                (
                    "GIT_CONFIG_VALUE_0".into(),
                    Secret::new(format!("Authorization: token {}", token.expose())),
                ),
            ]);
        }
        Mirrors {
            dir,
            git,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// The mirror of `repo`.
    pub fn path(&self, repo: &RepoName) -> PathBuf {
        self.dir
            .join(&repo.owner)
            .join(format!("{}.git", repo.name))
    }

    fn lock(&self, repo: &RepoName) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        locks.entry(repo.to_string()).or_default().clone()
    }

    /// Clones the mirror of `repo` from `source` when missing, else fetches it (pruning
    /// branches deleted upstream). Returns its path.
    async fn update(&self, repo: &RepoName, source: &str) -> Result<PathBuf, String> {
        let path = self.path(repo);
        if path.join("HEAD").exists() {
            self.git
                .ok(&path, &["fetch", "--prune", "--quiet", "origin"])
                .await
                .map_err(|e| format!("cannot fetch {repo} into its mirror: {e}"))?;
            return Ok(path);
        }
        let parent = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| self.dir.clone());
        std::fs::create_dir_all(&parent)
            .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        // Cloned aside, then renamed: a half-made clone never looks like a mirror.
        let tmp = parent.join(format!(".{}.git.tmp-{}", repo.name, uuid::Uuid::now_v7()));
        let tmp_arg = tmp.display().to_string();
        let cloned = self
            .git
            .ok(
                &parent,
                &["clone", "--mirror", "--quiet", "--", source, &tmp_arg],
            )
            .await;
        if let Err(e) = cloned {
            let _ = std::fs::remove_dir_all(&tmp);
            return Err(format!("cannot clone {repo} into its mirror: {e}"));
        }
        if let Err(e) = std::fs::rename(&tmp, &path) {
            let _ = std::fs::remove_dir_all(&tmp);
            if !path.join("HEAD").exists() {
                return Err(format!("cannot move the mirror of {repo} in place: {e}"));
            }
        }
        Ok(path)
    }

    async fn branch_sha(&self, dir: &Path, branch: &str) -> Result<Option<String>, String> {
        self.git
            .rev_parse(dir, &format!("refs/heads/{branch}"))
            .await
            .map_err(|e| e.to_string())
    }

    /// `check_branch_mergeable`: merges `branch` into `base` with `git merge-tree
    /// --write-tree` (exit 0 clean, 1 conflicts, anything else an error) in the fetched
    /// mirror. Names must have been validated by the caller.
    pub async fn check(&self, repo: &RepoName, source: &str, branch: &str, base: &str) -> Checked {
        let lock = self.lock(repo);
        let _guard = lock.lock().await;
        let error = |e: String, head: &str, base: &str| Checked {
            mergeability: Mergeability::Error(e),
            head_sha: head.to_owned(),
            base_sha: base.to_owned(),
        };
        let dir = match self.update(repo, source).await {
            Ok(d) => d,
            Err(e) => return error(e, "", ""),
        };
        let base_sha = match self.branch_sha(&dir, base).await {
            Ok(Some(s)) => s,
            Ok(None) => return error(format!("base branch {base} not found in {repo}"), "", ""),
            Err(e) => return error(e, "", ""),
        };
        let head_sha = match self.branch_sha(&dir, branch).await {
            Ok(Some(s)) => s,
            Ok(None) => {
                return error(
                    format!("branch {branch} not found in {repo}"),
                    "",
                    &base_sha,
                );
            }
            Err(e) => return error(e, "", &base_sha),
        };
        let mergeability = match self.git.merge_tree(&dir, &base_sha, &head_sha).await {
            Ok(MergeTree::Clean { .. }) => Mergeability::Mergeable,
            Ok(MergeTree::Conflicts { files, .. }) => Mergeability::Conflicts(files),
            Err(e) => Mergeability::Error(format!("git merge-tree: {e}")),
        };
        Checked {
            mergeability,
            head_sha,
            base_sha,
        }
    }

    /// Returns whether commit `sha` is already contained in `base` (`git merge-base
    /// --is-ancestor`), in the fetched mirror.
    pub async fn is_contained(
        &self,
        repo: &RepoName,
        source: &str,
        sha: &str,
        base: &str,
    ) -> Result<bool, String> {
        let lock = self.lock(repo);
        let _guard = lock.lock().await;
        let dir = self.update(repo, source).await?;
        let Some(base_sha) = self.branch_sha(&dir, base).await? else {
            return Err(format!("base branch {base} not found in {repo}"));
        };
        self.git
            .is_ancestor(&dir, sha, &base_sha)
            .await
            .map_err(|e| e.to_string())
    }
}
