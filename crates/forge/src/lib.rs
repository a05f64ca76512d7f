//! The forge — where branches, pull requests and merges live — behind one trait, so that
//! merge-gate, the launcher and stage-engine call Gitea or a local bare repository the same
//! way, and tests can mock it.
//!
//! - [`gitea::GiteaForge`]: Gitea's REST API v1 (`Authorization: token ...`), status codes
//!   as in `shared/contracts/gitea-notes.md`.
//! - [`local::LocalForge`]: bare repositories under a directory; a PR is a branch and a
//!   base, a merge is a real three-way merge (`git merge-tree`) committed onto the base.

pub mod config;
pub mod gitea;
pub mod local;

use async_trait::async_trait;
pub use config::{ForgeConfig, ForgeKind, build};
pub use orchestrator_git::RepoName;
use orchestrator_git::{GitError, InvalidName};

/// A pull request as every forge reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub number: u64,
    /// Where a person sees it.
    pub url: String,
    pub head_branch: String,
    /// The commit the head branch points at now.
    pub head_sha: String,
    pub base_branch: String,
    pub state: PrState,
    pub merged: bool,
    pub merge_sha: Option<String>,
}

/// What a reviewer asked for (Gitea's `ReviewStateType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReviewState {
    Approved,
    /// "Request changes" (Gitea's `REQUEST_CHANGES`; its webhook says `rejected`).
    ChangesRequested,
    Comment,
    /// A review not yet submitted, or one requested and not given.
    Pending,
}

impl ReviewState {
    /// Parses Gitea's `state` of a `PullReview`; `None` for a state we do not know.
    pub fn from_gitea(state: &str) -> Option<ReviewState> {
        match state {
            "APPROVED" => Some(ReviewState::Approved),
            "REQUEST_CHANGES" => Some(ReviewState::ChangesRequested),
            "COMMENT" => Some(ReviewState::Comment),
            "PENDING" | "REQUEST_REVIEW" => Some(ReviewState::Pending),
            _ => None,
        }
    }

    /// The name used in our proto, logs and docs.
    pub fn as_str(self) -> &'static str {
        match self {
            ReviewState::Approved => "approved",
            ReviewState::ChangesRequested => "changes_requested",
            ReviewState::Comment => "comment",
            ReviewState::Pending => "pending",
        }
    }
}

/// A submitted review of a pull request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrReview {
    /// The forge's id of the review (the key a repeated delivery is recognised by).
    pub id: u64,
    /// The reviewer's login.
    pub author: String,
    pub state: ReviewState,
    pub body: String,
    /// The head commit the review was given on.
    pub commit_id: String,
    /// Dismissed by a maintainer: it no longer counts.
    pub dismissed: bool,
    /// The head moved since the review was given.
    pub stale: bool,
    /// RFC 3339, as the forge gives it.
    pub submitted_at: String,
}

/// A line comment of a review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReviewComment {
    pub author: String,
    /// The file, relative to the repository's root.
    pub path: String,
    /// The line in the new version of the file (0 when the forge gives none).
    pub line: u64,
    pub body: String,
}

/// A commit status's state (Gitea's `CommitStatusState`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CiState {
    Pending,
    Success,
    Failure,
    Error,
}

impl CiState {
    /// Parses Gitea's state; `warning` and `skipped` do not stop a merge (Gitea's own
    /// combination ranks them with success), an unknown state counts as pending.
    pub fn from_gitea(state: &str) -> CiState {
        match state {
            "success" | "warning" | "skipped" => CiState::Success,
            "failure" => CiState::Failure,
            "error" => CiState::Error,
            _ => CiState::Pending,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            CiState::Pending => "pending",
            CiState::Success => "success",
            CiState::Failure => "failure",
            CiState::Error => "error",
        }
    }
}

/// One CI context's status on a commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommitStatus {
    /// The CI job's name, e.g. `ci/build`.
    pub context: String,
    pub state: CiState,
    pub description: String,
    pub target_url: String,
}

/// The combined status of a commit: every context's latest status, and their combination.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CombinedStatus {
    pub sha: String,
    /// `Pending` when no context reported yet.
    pub state: CiState,
    pub statuses: Vec<CommitStatus>,
}

/// Whether a pull request is open.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrState {
    Open,
    Closed,
}

impl PrState {
    pub fn as_str(self) -> &'static str {
        match self {
            PrState::Open => "open",
            PrState::Closed => "closed",
        }
    }
}

/// The answer of [`Forge::ensure_pr`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnsuredPr {
    pub pr: PullRequest,
    /// False when an open PR for the same head and base already existed.
    pub created: bool,
}

/// What a merge pinned to a head commit came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MergeOutcome {
    /// Merged now.
    Merged { merge_sha: Option<String> },
    /// It had been merged before (a re-driven merge).
    AlreadyMerged { merge_sha: Option<String> },
    /// The head moved since the commit that was tested: not merged.
    HeadMoved { expected: String, actual: String },
    /// The branch conflicts with the base: not merged.
    Conflicts { detail: String },
    /// The forge will not merge it now (checks pending, not allowed, ...): try again later.
    NotMergeable { reason: String },
    /// Closed without being merged: not merged.
    Closed,
}

/// Why a forge call gave no answer. [`ForgeError::is_transient`] tells what to retry.
#[derive(Debug, thiserror::Error)]
pub enum ForgeError {
    #[error(transparent)]
    Invalid(#[from] InvalidName),
    #[error("not found: {0}")]
    NotFound(String),
    /// Down, timing out, 5xx or 429: the same call may succeed later.
    #[error("forge unavailable: {0}")]
    Unavailable(String),
    /// The forge refused the request (a 4xx other than 404/408/429).
    #[error("forge refused ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("forge answered something unexpected: {0}")]
    Protocol(String),
    #[error(transparent)]
    Git(#[from] GitError),
    #[error("local forge i/o: {0}")]
    Io(String),
}

impl ForgeError {
    /// Returns whether retrying the same call later can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, ForgeError::Unavailable(_))
            || matches!(self, ForgeError::Git(GitError::Timeout { .. }))
    }
}

/// A forge. Every method validates its repo, branch and path arguments before they reach a
/// URL, git or the file system.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Forge: Send + Sync + 'static {
    /// `gitea` or `local`.
    fn kind(&self) -> ForgeKind;

    /// Returns whether `repo` exists on this forge.
    async fn repo_exists(&self, repo: &RepoName) -> Result<bool, ForgeError>;

    /// Returns whether `branch` exists in `repo` (false when the repository does not).
    async fn branch_exists(&self, repo: &RepoName, branch: &str) -> Result<bool, ForgeError>;

    /// The commit `branch` of `repo` is at now, or `None` when it has no such branch. A
    /// forge that cannot say refuses, and the caller asks git (`ls-remote`).
    async fn branch_head(
        &self,
        _repo: &RepoName,
        branch: &str,
    ) -> Result<Option<String>, ForgeError> {
        Err(ForgeError::Rejected {
            status: 501,
            message: format!("this forge does not name branch heads (asked for {branch})"),
        })
    }

    /// Opens a PR from `head` into `base`, or returns the open one that exists.
    async fn ensure_pr(
        &self,
        repo: &RepoName,
        head: &str,
        base: &str,
        title: &str,
        body: &str,
    ) -> Result<EnsuredPr, ForgeError>;

    /// Returns the PR from `head` into `base` (open, or the latest closed one), if any.
    async fn find_pr(
        &self,
        repo: &RepoName,
        head: &str,
        base: &str,
    ) -> Result<Option<PullRequest>, ForgeError>;

    /// Returns PR `number`, if it exists.
    async fn get_pr(&self, repo: &RepoName, number: u64)
    -> Result<Option<PullRequest>, ForgeError>;

    /// Merges PR `number` only if its head is still `head_sha` (the commit that was tested).
    async fn merge_pr(
        &self,
        repo: &RepoName,
        number: u64,
        head_sha: &str,
    ) -> Result<MergeOutcome, ForgeError>;

    /// Returns the text of `path` at `git_ref` (a branch or a commit), or `None` when the
    /// file (or the ref) does not exist.
    async fn read_file(
        &self,
        repo: &RepoName,
        git_ref: &str,
        path: &str,
    ) -> Result<Option<String>, ForgeError>;

    /// Returns the submitted reviews of PR `number`, oldest first. A forge that has no
    /// reviews (the local forge) has none.
    async fn list_pr_reviews(
        &self,
        _repo: &RepoName,
        _number: u64,
    ) -> Result<Vec<PrReview>, ForgeError> {
        Ok(Vec::new())
    }

    /// Returns the line comments of review `review_id` of PR `number`.
    async fn list_review_comments(
        &self,
        _repo: &RepoName,
        _number: u64,
        _review_id: u64,
    ) -> Result<Vec<ReviewComment>, ForgeError> {
        Ok(Vec::new())
    }

    /// Returns the combined commit status of `git_ref` (a branch or a commit). A forge that
    /// keeps no commit statuses (the local forge) refuses: a repository that requires CI
    /// cannot pass there.
    async fn combined_status(
        &self,
        _repo: &RepoName,
        git_ref: &str,
    ) -> Result<CombinedStatus, ForgeError> {
        Err(ForgeError::Rejected {
            status: 501,
            message: format!("this forge keeps no commit statuses (asked for {git_ref})"),
        })
    }

    /// Where a person sees PR `number`.
    fn pr_url(&self, repo: &RepoName, number: u64) -> String;

    /// Where a person sees `path` on `branch` (links to artifacts in comments).
    fn file_url(&self, repo: &RepoName, branch: &str, path: &str) -> String;

    /// What `git clone`/`git fetch` take, without credentials.
    fn clone_url(&self, repo: &RepoName) -> String;

    /// The environment that lets git authenticate to this forge over HTTP (for
    /// `orchestrator_git::Git::with_env`): `GIT_CONFIG_*` setting `http.extraHeader`, so the
    /// token is neither in a URL nor on a command line. Empty when none is needed.
    fn git_auth_env(&self) -> Vec<(String, orchestrator_kit::Secret)>;
}

/// Checks a ref given to [`Forge::read_file`]: a branch name or a commit id.
pub(crate) fn validate_ref(git_ref: &str) -> Result<&str, InvalidName> {
    orchestrator_git::validate_branch(git_ref)
}
