//! The local forge: bare repositories under a directory, `<dir>/<owner>/<name>.git`. A PR is
//! a branch and a base, recorded in `<repo>.git/orchestrator/pulls.json`; a merge is a real
//! three-way merge (`git merge-tree --write-tree`) committed onto the base with a
//! compare-and-swap `update-ref`, so a base that moved meanwhile is never overwritten.
//! Every change of the PR record happens under an exclusive file lock, so several processes
//! (the launcher, merge-gate) can share one directory.

use std::fs::File;
use std::path::{Path, PathBuf};

use async_trait::async_trait;
use orchestrator_git::{Git, MergeTree, RepoName, validate_branch, validate_path};
use serde::{Deserialize, Serialize};

use crate::config::ForgeKind;
use crate::{EnsuredPr, Forge, ForgeError, MergeOutcome, PrState, PullRequest, validate_ref};

/// Bare repositories on disk.
#[derive(Debug, Clone)]
pub struct LocalForge {
    dir: PathBuf,
    base_branch: String,
    git: Git,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StoredPr {
    number: u64,
    head: String,
    base: String,
    title: String,
    body: String,
    /// open | closed
    state: String,
    merged: bool,
    merge_sha: Option<String>,
    /// The head commit when merged (the branch may move on afterwards).
    merged_head_sha: Option<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct PullsFile {
    pulls: Vec<StoredPr>,
}

/// Who the local forge's merge commits are by.
const IDENTITY: [&str; 4] = [
    "-c",
    "user.name=orchestrator",
    "-c",
    "user.email=orchestrator@localhost",
];

fn io(what: &str, e: impl std::fmt::Display) -> ForgeError {
    ForgeError::Io(format!("{what}: {e}"))
}

impl LocalForge {
    /// A forge over `dir`; `base_branch` is the branch new repositories start with.
    pub fn new(dir: PathBuf, base_branch: String) -> Self {
        LocalForge {
            dir,
            base_branch,
            git: Git::new(),
        }
    }

    /// The bare repository of `repo`.
    pub fn repo_dir(&self, repo: &RepoName) -> PathBuf {
        self.dir
            .join(&repo.owner)
            .join(format!("{}.git", repo.name))
    }

    /// Creates the bare repository of `repo` (if missing) with an initial empty commit on
    /// the base branch, so that branches have something to start from.
    pub async fn init_repo(&self, repo: &RepoName) -> Result<PathBuf, ForgeError> {
        let dir = self.repo_dir(repo);
        if dir.join("HEAD").exists() {
            return Ok(dir);
        }
        std::fs::create_dir_all(&dir).map_err(|e| io("create the repository directory", e))?;
        let head_ref = format!("--initial-branch={}", self.base_branch);
        self.git
            .ok(&dir, &["init", "--bare", "-q", &head_ref])
            .await?;
        // stdin is /dev/null: `mktree` reads nothing and writes the empty tree.
        let tree = self.git.ok(&dir, &["mktree"]).await?.trim().to_owned();
        let args = [
            IDENTITY[0],
            IDENTITY[1],
            IDENTITY[2],
            IDENTITY[3],
            "commit-tree",
            &tree,
            "-m",
            "initial commit",
        ];
        let commit = self.git.ok(&dir, &args).await?.trim().to_owned();
        let base_ref = format!("refs/heads/{}", self.base_branch);
        self.git
            .ok(&dir, &["update-ref", &base_ref, &commit])
            .await?;
        Ok(dir)
    }

    fn existing_repo(&self, repo: &RepoName) -> Result<PathBuf, ForgeError> {
        let dir = self.repo_dir(repo);
        if dir.join("HEAD").exists() {
            Ok(dir)
        } else {
            Err(ForgeError::NotFound(format!(
                "repository {repo} (no {})",
                dir.display()
            )))
        }
    }

    async fn branch_sha(&self, dir: &Path, branch: &str) -> Result<Option<String>, ForgeError> {
        Ok(self
            .git
            .rev_parse(dir, &format!("refs/heads/{branch}"))
            .await?)
    }

    async fn to_pr(
        &self,
        dir: &Path,
        repo: &RepoName,
        p: &StoredPr,
    ) -> Result<PullRequest, ForgeError> {
        let head_sha = match &p.merged_head_sha {
            Some(s) => s.clone(),
            None => self.branch_sha(dir, &p.head).await?.unwrap_or_default(),
        };
        Ok(PullRequest {
            number: p.number,
            url: self.pr_url(repo, p.number),
            head_branch: p.head.clone(),
            head_sha,
            base_branch: p.base.clone(),
            state: if p.state == "open" {
                PrState::Open
            } else {
                PrState::Closed
            },
            merged: p.merged,
            merge_sha: p.merge_sha.clone(),
        })
    }
}

/// The PR record of one repository, held under its exclusive lock until dropped.
struct Locked {
    _lock: File,
    path: PathBuf,
    file: PullsFile,
}

async fn lock(dir: &Path) -> Result<Locked, ForgeError> {
    let meta = dir.join("orchestrator");
    std::fs::create_dir_all(&meta).map_err(|e| io("create the PR directory", e))?;
    let lock_path = meta.join("pulls.lock");
    let lock = tokio::task::spawn_blocking(move || -> std::io::Result<File> {
        let f = File::options()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)?;
        f.lock()?;
        Ok(f)
    })
    .await
    .map_err(|e| io("lock the PR record", e))?
    .map_err(|e| io("lock the PR record", e))?;
    let path = meta.join("pulls.json");
    let file = match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| io("read pulls.json", e))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => PullsFile::default(),
        Err(e) => return Err(io("read pulls.json", e)),
    };
    Ok(Locked {
        _lock: lock,
        path,
        file,
    })
}

impl Locked {
    /// Writes the record atomically (temp file + rename).
    fn save(&self) -> Result<(), ForgeError> {
        let tmp = self.path.with_extension("json.tmp");
        let bytes =
            serde_json::to_vec_pretty(&self.file).map_err(|e| io("encode pulls.json", e))?;
        std::fs::write(&tmp, bytes).map_err(|e| io("write pulls.json", e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| io("write pulls.json", e))
    }
}

#[async_trait]
impl Forge for LocalForge {
    fn kind(&self) -> ForgeKind {
        ForgeKind::Local
    }

    async fn repo_exists(&self, repo: &RepoName) -> Result<bool, ForgeError> {
        Ok(self.repo_dir(repo).join("HEAD").exists())
    }

    /// Read from the bare repository's ref files, without a git process (a launch waits
    /// for it); git answers what those files do not hold (a symbolic or unusual ref).
    async fn branch_head(
        &self,
        repo: &RepoName,
        branch: &str,
    ) -> Result<Option<String>, ForgeError> {
        validate_branch(branch)?;
        let dir = self.existing_repo(repo)?;
        let name = format!("refs/heads/{branch}");
        if let Some(sha) = read_ref_file(&dir, &name) {
            return Ok(Some(sha));
        }
        self.branch_sha(&dir, branch).await
    }

    async fn branch_exists(&self, repo: &RepoName, branch: &str) -> Result<bool, ForgeError> {
        validate_branch(branch)?;
        if !self.repo_exists(repo).await? {
            return Ok(false);
        }
        Ok(self
            .branch_sha(&self.repo_dir(repo), branch)
            .await?
            .is_some())
    }

    async fn ensure_pr(
        &self,
        repo: &RepoName,
        head: &str,
        base: &str,
        title: &str,
        body: &str,
    ) -> Result<EnsuredPr, ForgeError> {
        validate_branch(head)?;
        validate_branch(base)?;
        let dir = self.existing_repo(repo)?;
        if head == base {
            return Err(ForgeError::Rejected {
                status: 422,
                message: "head and base are the same branch".to_owned(),
            });
        }
        for b in [head, base] {
            if self.branch_sha(&dir, b).await?.is_none() {
                return Err(ForgeError::NotFound(format!("branch {b} of {repo}")));
            }
        }
        let mut locked = lock(&dir).await?;
        if let Some(p) = locked
            .file
            .pulls
            .iter()
            .find(|p| p.head == head && p.base == base && p.state == "open")
        {
            let pr = self.to_pr(&dir, repo, p).await?;
            return Ok(EnsuredPr { pr, created: false });
        }
        let number = locked
            .file
            .pulls
            .iter()
            .map(|p| p.number)
            .max()
            .unwrap_or(0)
            + 1;
        let stored = StoredPr {
            number,
            head: head.to_owned(),
            base: base.to_owned(),
            title: title.to_owned(),
            body: body.to_owned(),
            state: "open".to_owned(),
            merged: false,
            merge_sha: None,
            merged_head_sha: None,
        };
        locked.file.pulls.push(stored.clone());
        locked.save()?;
        let pr = self.to_pr(&dir, repo, &stored).await?;
        Ok(EnsuredPr { pr, created: true })
    }

    async fn find_pr(
        &self,
        repo: &RepoName,
        head: &str,
        base: &str,
    ) -> Result<Option<PullRequest>, ForgeError> {
        validate_branch(head)?;
        validate_branch(base)?;
        let dir = self.existing_repo(repo)?;
        let locked = lock(&dir).await?;
        // The open one first, else the latest.
        let found = locked
            .file
            .pulls
            .iter()
            .filter(|p| p.head == head && p.base == base)
            .max_by_key(|p| (p.state == "open", p.number))
            .cloned();
        drop(locked);
        match found {
            Some(p) => Ok(Some(self.to_pr(&dir, repo, &p).await?)),
            None => Ok(None),
        }
    }

    async fn get_pr(
        &self,
        repo: &RepoName,
        number: u64,
    ) -> Result<Option<PullRequest>, ForgeError> {
        let dir = self.existing_repo(repo)?;
        let locked = lock(&dir).await?;
        let found = locked
            .file
            .pulls
            .iter()
            .find(|p| p.number == number)
            .cloned();
        drop(locked);
        match found {
            Some(p) => Ok(Some(self.to_pr(&dir, repo, &p).await?)),
            None => Ok(None),
        }
    }

    async fn merge_pr(
        &self,
        repo: &RepoName,
        number: u64,
        head_sha: &str,
    ) -> Result<MergeOutcome, ForgeError> {
        if head_sha.is_empty() || !head_sha.chars().all(|c| c.is_ascii_hexdigit()) {
            return Err(ForgeError::Rejected {
                status: 400,
                message: "head_sha must be a commit id".to_owned(),
            });
        }
        let dir = self.existing_repo(repo)?;
        let mut locked = lock(&dir).await?;
        let Some(idx) = locked.file.pulls.iter().position(|p| p.number == number) else {
            return Err(ForgeError::NotFound(format!("PR #{number} of {repo}")));
        };
        let p = locked.file.pulls[idx].clone();
        if p.merged {
            return Ok(MergeOutcome::AlreadyMerged {
                merge_sha: p.merge_sha,
            });
        }
        if p.state != "open" {
            return Ok(MergeOutcome::Closed);
        }
        let current = self.branch_sha(&dir, &p.head).await?.unwrap_or_default();
        if current != head_sha {
            return Ok(MergeOutcome::HeadMoved {
                expected: head_sha.to_owned(),
                actual: current,
            });
        }
        let Some(base_sha) = self.branch_sha(&dir, &p.base).await? else {
            return Err(ForgeError::NotFound(format!(
                "base branch {} of {repo}",
                p.base
            )));
        };
        let merge_sha = if self.git.is_ancestor(&dir, head_sha, &base_sha).await? {
            // Already contained in the base: nothing to commit.
            base_sha
        } else {
            let tree = match self.git.merge_tree(&dir, &base_sha, head_sha).await? {
                MergeTree::Clean { tree } => tree,
                MergeTree::Conflicts { files, .. } => {
                    return Ok(MergeOutcome::Conflicts {
                        detail: format!("conflicts in {}", files.join(", ")),
                    });
                }
            };
            let message = format!(
                "Merge pull request #{number} from {} into {}",
                p.head, p.base
            );
            let args = [
                IDENTITY[0],
                IDENTITY[1],
                IDENTITY[2],
                IDENTITY[3],
                "commit-tree",
                &tree,
                "-p",
                &base_sha,
                "-p",
                head_sha,
                "-m",
                &message,
            ];
            let commit = self.git.ok(&dir, &args).await?.trim().to_owned();
            let base_ref = format!("refs/heads/{}", p.base);
            // Compare-and-swap: fails if the base moved since we read it.
            self.git
                .ok(&dir, &["update-ref", &base_ref, &commit, &base_sha])
                .await?;
            commit
        };
        let stored = &mut locked.file.pulls[idx];
        stored.merged = true;
        stored.state = "closed".to_owned();
        stored.merge_sha = Some(merge_sha.clone());
        stored.merged_head_sha = Some(head_sha.to_owned());
        locked.save()?;
        tracing::info!(repo = %repo, number, merge_sha, "local forge merged a pull request");
        Ok(MergeOutcome::Merged {
            merge_sha: Some(merge_sha),
        })
    }

    async fn read_file(
        &self,
        repo: &RepoName,
        git_ref: &str,
        path: &str,
    ) -> Result<Option<String>, ForgeError> {
        validate_ref(git_ref)?;
        validate_path(path)?;
        let dir = self.existing_repo(repo)?;
        // One git process (a gate's evaluation waits for it): the ref resolved to its
        // commit and the path read in one `<rev>:<path>`; a missing ref or path alike is
        // `None`.
        let spec = format!("{git_ref}^{{commit}}:{path}");
        let out = self.git.run(&dir, &["cat-file", "blob", &spec]).await?;
        Ok(out.success().then_some(out.stdout))
    }

    fn pr_url(&self, repo: &RepoName, number: u64) -> String {
        format!("file://{}#pull/{number}", abs(&self.repo_dir(repo)))
    }

    fn file_url(&self, repo: &RepoName, branch: &str, path: &str) -> String {
        format!("file://{}#{branch}:{path}", abs(&self.repo_dir(repo)))
    }

    fn clone_url(&self, repo: &RepoName) -> String {
        abs(&self.repo_dir(repo))
    }

    fn git_auth_env(&self) -> Vec<(String, orchestrator_kit::Secret)> {
        Vec::new()
    }
}

/// `name`'s commit as git's files backend keeps it: the loose ref file, else its line in
/// `packed-refs` (gitrepository-layout(5)). `None` when neither names a commit id.
fn read_ref_file(dir: &Path, name: &str) -> Option<String> {
    if let Ok(text) = std::fs::read_to_string(dir.join(name)) {
        let sha = text.trim();
        return orchestrator_git::is_commit_id(sha).then(|| sha.to_owned());
    }
    let packed = std::fs::read_to_string(dir.join("packed-refs")).ok()?;
    packed
        .lines()
        .filter(|l| !l.starts_with('#') && !l.starts_with('^'))
        .filter_map(|l| l.split_once(' '))
        .find(|(_, r)| *r == name)
        .map(|(sha, _)| sha.to_owned())
        .filter(|sha| orchestrator_git::is_commit_id(sha))
}

fn abs(p: &Path) -> String {
    std::path::absolute(p)
        .unwrap_or_else(|_| p.to_path_buf())
        .display()
        .to_string()
}
