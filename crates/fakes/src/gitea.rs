//! A fake Gitea on 127.0.0.1:0, as `shared/contracts/gitea-notes.md` and the 1.27.1 swagger
//! describe it, over REAL bare repositories on disk:
//!
//! - the REST API under `/api/v1` with `Authorization: token <T>` (or `Bearer`, or Basic
//!   with the token as password): repository get; pull requests create (201, 409 when an
//!   open one exists, 422 when head = base or nothing to merge, 404 for an unknown branch),
//!   get, list, find by base and head, is-merged (204/404), merge (pinned with
//!   `head_commit_id`: 200, 405 already merged / not ready, 409 conflicts / head out of
//!   date, 404 closed), PR comments (201); file contents (`raw/` and `contents/`). Objects
//!   are the captured samples' (`gitea-webhook-pull_request-*.json`) with this PR's values;
//! - git over smart HTTP at `/{owner}/{repo}.git/...`, served by running the real
//!   `git http-backend` (CGI), so that a real `git fetch`/`push` — with the token in an
//!   `http.extraHeader` — goes through it; a request without a known token is 401;
//! - pull requests and merges are the local forge's (`orchestrator_forge::local`): a PR is a
//!   branch and a base, a merge is a real three-way merge committed onto the base;
//! - webhooks: opening a PR sends `pull_request` `opened`, a merge sends `pull_request`
//!   `closed` with `merged: true` — Go's `json.MarshalIndent` of the payload, with
//!   `X-Gitea-Delivery`, `X-Gitea-Event`, `X-Gitea-Event-Type`, `X-Gitea-Signature` (and the
//!   `X-Gogs-*`, `X-GitHub-*`, `X-Hub-Signature*` copies).
//!
//! - PR reviews (#18): [`FakeGitea::submit_review`] stores a review with its line comments,
//!   as a person submits one in the UI, and sends its webhook — a `PullRequestPayload` with
//!   `action: reviewed` and `review: {type, content}`, under `X-Gitea-Event`
//!   `pull_request_approved` / `pull_request_rejected` / `pull_request_comment`
//!   (`gitea-webhook-pull_request_review-*.json`); the REST API lists them
//!   (`GET .../pulls/{n}/reviews`, `GET .../pulls/{n}/reviews/{id}/comments`, shapes of
//!   `gitea-api-pull-reviews.json` and `gitea-api-pull-review-comments.json`).
//!
//! - commit statuses (#18): [`FakeGitea::set_status`] records a CI context's status on a
//!   commit, as a CI system posts it, and sends the `status` webhook
//!   (`gitea-webhook-status.json`); `GET .../commits/{ref}/status` answers the combined
//!   status (`gitea-api-combined-status.json`; no status yet: `pending`, no contexts).
//!
//! Not modelled: push and `synchronized` webhooks, issues, merge styles other than `merge`,
//! branch protection, pending (draft) reviews.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use orchestrator_forge::local::LocalForge;
use orchestrator_forge::{Forge, MergeOutcome, PrState, PullRequest, RepoName, ReviewState};
use orchestrator_git::Git;
use orchestrator_kit::time::{now_ms, rfc3339};
use serde_json::json;
use tokio::io::AsyncWriteExt;

use crate::json::Json;
use crate::webhook::{self, Deliveries, Delivery, Hook, Outgoing, sample_json};

/// A Gitea account; `token` is its access token, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GiteaUser {
    pub id: u64,
    pub login: String,
    pub token: Option<String>,
}

/// What Gitea keeps about a PR beyond the branch and base (the local forge keeps those).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrMeta {
    pub id: u64,
    pub title: String,
    pub body: String,
    /// Who opened it.
    pub user: String,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub merged_at_ms: Option<i64>,
    pub merged_by: Option<String>,
}

/// A submitted PR review, as Gitea keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeReview {
    pub id: u64,
    pub user: String,
    pub state: ReviewState,
    pub body: String,
    /// The PR's head when the review was submitted.
    pub commit_id: String,
    pub dismissed: bool,
    pub submitted_at_ms: i64,
    pub comments: Vec<FakeReviewComment>,
}

/// A line comment of a review.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeReviewComment {
    pub id: u64,
    pub path: String,
    /// The line in the new file.
    pub line: u64,
    pub body: String,
}

/// Gitea's `ReviewStateType` of `state`.
fn gitea_review_state(state: ReviewState) -> &'static str {
    match state {
        ReviewState::Approved => "APPROVED",
        ReviewState::ChangesRequested => "REQUEST_CHANGES",
        ReviewState::Comment => "COMMENT",
        ReviewState::Pending => "PENDING",
    }
}

/// The webhook event type and event of a review (modules/webhook/type.go).
fn review_events(state: ReviewState) -> Option<(&'static str, &'static str)> {
    match state {
        ReviewState::Approved => Some(("pull_request_review_approved", "pull_request_approved")),
        ReviewState::ChangesRequested => {
            Some(("pull_request_review_rejected", "pull_request_rejected"))
        }
        ReviewState::Comment => Some(("pull_request_review_comment", "pull_request_comment")),
        ReviewState::Pending => None,
    }
}

/// A commit status as a CI system posted it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeStatus {
    pub id: u64,
    pub context: String,
    /// pending | success | error | failure | warning | skipped
    pub state: String,
    pub description: String,
    pub target_url: String,
    pub creator: String,
    pub at_ms: i64,
}

/// Faults for the next merge request.
#[derive(Debug, Clone, Default)]
pub struct GiteaFaults {
    /// Merge, but answer 500: the answer is lost on the way back.
    pub lose_merge_answer: bool,
    /// Someone merges the PR in the UI just before the request arrives (Gitea answers 405).
    pub merged_by_someone_else: bool,
    /// Someone pushes to the head branch just before the request arrives (409).
    pub push_before_merge: bool,
    /// Gitea is still checking mergeability (405 "Please try again later").
    pub not_ready: bool,
    /// Every REST request answers 503 while set.
    pub down: bool,
}

/// Everything the fake knows besides the repositories on disk.
#[derive(Debug, Default)]
pub struct GiteaData {
    pub users: Vec<GiteaUser>,
    /// `owner/name` -> repository id.
    pub repos: BTreeMap<String, u64>,
    /// (`owner/name`, number) -> what Gitea keeps about the PR.
    pub pulls: BTreeMap<(String, u64), PrMeta>,
    /// (`owner/name`, commit) -> its statuses, oldest first.
    pub statuses: BTreeMap<(String, String), Vec<FakeStatus>>,
    /// (`owner/name`, number) -> the PR's reviews, oldest first.
    pub reviews: BTreeMap<(String, u64), Vec<FakeReview>>,
    pub hook: Option<Hook>,
    pub faults: GiteaFaults,
    /// How long a merge takes (widens race windows).
    pub merge_delay: Duration,
    /// Merge requests received, and merges performed.
    pub merge_requests: u32,
    pub merges_done: u32,
    /// Every merge performed, in order: (`owner/name`, PR number, who merged it).
    pub merge_log: Vec<(String, u64, String)>,
    /// Every REST request: `METHOD path login` (`-` without a known token).
    pub requests: Vec<String>,
    /// Every git request: `service login` (`git-upload-pack`, `git-receive-pack`).
    pub git_requests: Vec<String>,
    /// Requests that broke the contract (no or unknown token, bad body): for `check`.
    pub errors: Vec<String>,
    next_id: u64,
}

impl GiteaData {
    fn user_by_token(&self, token: &str) -> Option<&GiteaUser> {
        self.users
            .iter()
            .find(|u| u.token.as_deref() == Some(token))
    }

    fn user(&self, login: &str) -> Option<&GiteaUser> {
        self.users.iter().find(|u| u.login == login)
    }

    fn next_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }
}

struct Inner {
    url: String,
    root: PathBuf,
    forge: LocalForge,
    git: Git,
    data: Mutex<GiteaData>,
    http: reqwest::Client,
    deliveries: Deliveries,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, GiteaData> {
        // A test that panicked while holding the lock must not hide its own failure.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake Gitea; stops when dropped (its repositories live in `root`, which the
/// caller owns).
pub struct FakeGitea {
    /// `GITEA_BASE_URL`.
    pub url: String,
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakeGitea {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The branch repositories start with.
pub const DEFAULT_BRANCH: &str = "main";

fn repo_name(full: &str) -> RepoName {
    RepoName::parse(full).unwrap_or_else(|e| panic!("repository {full}: {e}"))
}

impl FakeGitea {
    /// Serves an empty Gitea on 127.0.0.1:0, its bare repositories under `root`.
    pub async fn start(root: &Path) -> FakeGitea {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let url = format!("http://{addr}");
        let inner = Arc::new(Inner {
            url: url.clone(),
            root: root.to_path_buf(),
            forge: LocalForge::new(root.to_path_buf(), DEFAULT_BRANCH.to_owned()),
            git: Git::new(),
            data: Mutex::new(GiteaData::default()),
            http: reqwest::Client::new(),
            deliveries: Deliveries::default(),
        });
        let app = axum::Router::new()
            .fallback(handle)
            .layer(DefaultBodyLimit::max(512 * 1024 * 1024))
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            // Lives as long as the test holds the fake.
            let _ = axum::serve(listener, app).await;
        });
        FakeGitea {
            url,
            addr,
            inner,
            task,
        }
    }

    /// Adds an account with access token `token`.
    pub fn add_user(&self, login: &str, token: Option<&str>) -> GiteaUser {
        let mut d = self.inner.lock();
        let user = GiteaUser {
            id: d.next_id(),
            login: login.to_owned(),
            token: token.map(str::to_owned),
        };
        d.users.push(user.clone());
        user
    }

    /// Creates repository `owner/name`: a bare repository with an initial commit on
    /// `main`. Returns its directory.
    pub async fn create_repo(&self, full_name: &str) -> PathBuf {
        let dir = self
            .inner
            .forge
            .init_repo(&repo_name(full_name))
            .await
            .unwrap_or_else(|e| panic!("create {full_name}: {e}"));
        let mut d = self.inner.lock();
        let id = d.next_id();
        d.repos.entry(full_name.to_owned()).or_insert(id);
        dir
    }

    /// The bare repository of `owner/name`.
    pub fn repo_dir(&self, full_name: &str) -> PathBuf {
        self.inner.forge.repo_dir(&repo_name(full_name))
    }

    /// Commits `files` (path, content) onto `branch` (created from `main` when missing), as
    /// a push would; returns the new commit.
    pub async fn commit(
        &self,
        full_name: &str,
        branch: &str,
        files: &[(&str, &str)],
        message: &str,
    ) -> String {
        commit_files(
            &self.inner.git,
            &self.repo_dir(full_name),
            branch,
            files,
            message,
        )
        .await
        .unwrap_or_else(|e| panic!("commit to {full_name} {branch}: {e}"))
    }

    /// Where webhooks go from now on (`None`: nowhere).
    pub fn set_webhook(&self, hook: Option<Hook>) {
        self.inner.lock().hook = hook;
    }

    /// Reads or changes the fake's data (faults included).
    pub fn with<R>(&self, f: impl FnOnce(&mut GiteaData) -> R) -> R {
        f(&mut self.inner.lock())
    }

    /// PR `number` of `owner/name`, as the forge reports it.
    pub async fn pr(&self, full_name: &str, number: u64) -> Option<PullRequest> {
        self.inner
            .forge
            .get_pr(&repo_name(full_name), number)
            .await
            .expect("read the PR record")
    }

    /// The commit `branch` points at, if it exists.
    pub async fn branch_sha(&self, full_name: &str, branch: &str) -> Option<String> {
        self.inner
            .git
            .rev_parse(&self.repo_dir(full_name), &format!("refs/heads/{branch}"))
            .await
            .expect("git rev-parse")
    }

    /// The text of `path` at `git_ref`.
    pub async fn file(&self, full_name: &str, git_ref: &str, path: &str) -> Option<String> {
        self.inner
            .forge
            .read_file(&repo_name(full_name), git_ref, path)
            .await
            .expect("read a file")
    }

    /// Merges PR `number` as `login` would in Gitea's UI (the same path as the API), and
    /// waits for its webhook. Returns the API's status and the delivery.
    pub async fn merge_as(
        &self,
        full_name: &str,
        number: u64,
        login: &str,
    ) -> (u16, Option<Delivery>) {
        let (status, _, outs) = merge(
            &self.inner,
            full_name,
            number,
            login,
            &Json::Object(Vec::new()),
        )
        .await;
        let mut last = None;
        for out in outs {
            last = Some(webhook::send(&self.inner.http, &self.inner.deliveries, out).await);
        }
        (status.as_u16(), last)
    }

    /// Submits a review of PR `number` as `login` would in Gitea's UI — `comments` are
    /// line comments (path, line, text) — and waits for its webhook. Returns the review's
    /// id and the delivery (none without a hook, or for a pending review).
    pub async fn submit_review(
        &self,
        full_name: &str,
        number: u64,
        login: &str,
        state: ReviewState,
        body: &str,
        comments: &[(&str, u64, &str)],
    ) -> (u64, Option<Delivery>) {
        let pr = self
            .pr(full_name, number)
            .await
            .unwrap_or_else(|| panic!("no PR {full_name}#{number} to review"));
        let id = {
            let mut d = self.inner.lock();
            let id = d.next_id();
            let comments = comments
                .iter()
                .map(|(path, line, text)| FakeReviewComment {
                    id: d.next_id(),
                    path: (*path).to_owned(),
                    line: *line,
                    body: (*text).to_owned(),
                })
                .collect();
            d.reviews
                .entry((full_name.to_owned(), number))
                .or_default()
                .push(FakeReview {
                    id,
                    user: login.to_owned(),
                    state,
                    body: body.to_owned(),
                    commit_id: pr.head_sha.clone(),
                    dismissed: false,
                    submitted_at_ms: now_ms(),
                    comments,
                });
            id
        };
        let delivery = match review_webhook(&self.inner, full_name, number, login, state, body)
            .await
        {
            Some(out) => Some(webhook::send(&self.inner.http, &self.inner.deliveries, out).await),
            None => None,
        };
        (id, delivery)
    }

    /// Posts a status — `[context, state, description, target_url]` — on commit `sha` as
    /// `login` (a CI account), and waits for its `status` webhook (none without a hook).
    pub async fn set_status(
        &self,
        full_name: &str,
        sha: &str,
        login: &str,
        [context, state, description, target_url]: [&str; 4],
    ) -> Option<Delivery> {
        let status = {
            let mut d = self.inner.lock();
            let status = FakeStatus {
                id: d.next_id(),
                context: context.to_owned(),
                state: state.to_owned(),
                description: description.to_owned(),
                target_url: target_url.to_owned(),
                creator: login.to_owned(),
                at_ms: now_ms(),
            };
            d.statuses
                .entry((full_name.to_owned(), sha.to_owned()))
                .or_default()
                .push(status.clone());
            status
        };
        let out = status_webhook(&self.inner, full_name, sha, &status)?;
        Some(webhook::send(&self.inner.http, &self.inner.deliveries, out).await)
    }

    /// Sends `delivery`'s bytes again under a new delivery id (Gitea's "redeliver").
    pub async fn redeliver(&self, delivery: &Delivery) -> Delivery {
        let url = self.hook_url();
        // Gitea sends its id in X-Gitea-Delivery, X-Gogs-Delivery and X-GitHub-Delivery.
        webhook::redeliver(
            &self.inner.http,
            &self.inner.deliveries,
            url,
            delivery,
            |k| k.to_ascii_lowercase().ends_with("-delivery"),
        )
        .await
    }

    fn hook_url(&self) -> String {
        self.inner
            .lock()
            .hook
            .as_ref()
            .map(|h| h.url.clone())
            .expect("a webhook is configured")
    }

    /// Every webhook sent so far, in order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The requests that broke the contract so far.
    pub fn errors(&self) -> Vec<String> {
        self.inner.lock().errors.clone()
    }

    /// Asserts that no request broke the contract.
    pub fn check(&self) {
        let errors = self.errors();
        assert!(
            errors.is_empty(),
            "requests to the fake Gitea broke the contract: {errors:#?}"
        );
    }
}

/// Commits `files` onto `branch` of the bare repository `dir` without a work tree (a
/// private index: read-tree, update-index, write-tree, commit-tree, update-ref).
async fn commit_files(
    git: &Git,
    dir: &Path,
    branch: &str,
    files: &[(&str, &str)],
    message: &str,
) -> Result<String, String> {
    let err = |e: orchestrator_git::GitError| e.to_string();
    let parent = match git
        .rev_parse(dir, &format!("refs/heads/{branch}"))
        .await
        .map_err(err)?
    {
        Some(sha) => sha,
        None => git
            .rev_parse(dir, &format!("refs/heads/{DEFAULT_BRANCH}"))
            .await
            .map_err(err)?
            .ok_or("no main branch to start from")?,
    };
    let index = tempfile_path(dir, "index");
    let git = git.clone().with_env(vec![(
        "GIT_INDEX_FILE".to_owned(),
        orchestrator_kit::Secret::new(index.display().to_string()),
    )]);
    git.ok(dir, &["read-tree", &parent]).await.map_err(err)?;
    for (path, content) in files {
        let blob_file = tempfile_path(dir, "blob");
        std::fs::write(&blob_file, content).map_err(|e| e.to_string())?;
        let blob_path = blob_file.display().to_string();
        let blob = git
            .ok(dir, &["hash-object", "-w", "--", &blob_path])
            .await
            .map_err(err)?;
        let _ = std::fs::remove_file(&blob_file);
        let info = format!("100644,{},{path}", blob.trim());
        git.ok(dir, &["update-index", "--add", "--cacheinfo", &info])
            .await
            .map_err(err)?;
    }
    let tree = git.ok(dir, &["write-tree"]).await.map_err(err)?;
    let _ = std::fs::remove_file(&index);
    let commit = git
        .ok(
            dir,
            &[
                "-c",
                "user.name=Ada",
                "-c",
                "user.email=ada@example.com",
                "commit-tree",
                tree.trim(),
                "-p",
                &parent,
                "-m",
                message,
            ],
        )
        .await
        .map_err(err)?;
    let commit = commit.trim().to_owned();
    git.ok(
        dir,
        &["update-ref", &format!("refs/heads/{branch}"), &commit],
    )
    .await
    .map_err(err)?;
    Ok(commit)
}

fn tempfile_path(dir: &Path, what: &str) -> PathBuf {
    dir.join(format!("fake-{what}-{}", uuid::Uuid::now_v7()))
}

// --------------------------------------------------------------------- the JSON objects

fn time(ms: i64) -> Json {
    Json::from(rfc3339(ms))
}

fn user_json(base: &str, u: &GiteaUser) -> Json {
    let mut j = sample_json("gitea-webhook-pull_request-closed-merged.json")
        .get("sender")
        .cloned()
        .expect("the sample has a sender");
    j.set("id", u.id)
        .set("login", &u.login)
        .set("full_name", &u.login)
        .set("email", format!("{}@noreply.example.com", u.login))
        .set("avatar_url", format!("{base}/avatars/{}", u.login))
        .set("username", &u.login);
    j
}

fn repo_json(base: &str, d: &GiteaData, full: &str) -> Json {
    let mut j = sample_json("gitea-webhook-pull_request-closed-merged.json")
        .get("repository")
        .cloned()
        .expect("the sample has a repository");
    let (owner, name) = full.split_once('/').unwrap_or((full, full));
    let owner_user = d.user(owner).cloned().unwrap_or(GiteaUser {
        id: 1,
        login: owner.to_owned(),
        token: None,
    });
    let id = d.repos.get(full).copied().unwrap_or(0);
    j.set("id", id)
        .set("owner", user_json(base, &owner_user))
        .set("name", name)
        .set("full_name", full)
        .set("html_url", format!("{base}/{full}"))
        .set("url", format!("{base}/api/v1/repos/{full}"))
        .set("ssh_url", format!("git@127.0.0.1:{full}.git"))
        .set("clone_url", format!("{base}/{full}.git"))
        .set("default_branch", DEFAULT_BRANCH)
        .set("private", true)
        .set("empty", false);
    j
}

/// The PR object (the 1.21+ capture's field set) for `pr`, with `meta`.
async fn pr_json(inner: &Inner, full: &str, pr: &PullRequest, meta: &PrMeta) -> Json {
    let base_url = &inner.url;
    let dir = inner.forge.repo_dir(&repo_name(full));
    let base_sha = inner
        .git
        .rev_parse(&dir, &format!("refs/heads/{}", pr.base_branch))
        .await
        .ok()
        .flatten()
        .unwrap_or_default();
    let merge_base = if pr.head_sha.is_empty() || base_sha.is_empty() {
        String::new()
    } else {
        inner
            .git
            .ok(&dir, &["merge-base", &base_sha, &pr.head_sha])
            .await
            .map(|s| s.trim().to_owned())
            .unwrap_or_default()
    };
    let (additions, deletions, changed) =
        numstat(&inner.git, &dir, &merge_base, &pr.head_sha).await;
    let (user, merged_by, repo) = {
        let d = inner.lock();
        let user = |login: &str| {
            d.user(login).cloned().unwrap_or(GiteaUser {
                id: 0,
                login: login.to_owned(),
                token: None,
            })
        };
        (
            user_json(base_url, &user(&meta.user)),
            meta.merged_by
                .as_deref()
                .map(|l| user_json(base_url, &user(l))),
            repo_json(base_url, &d, full),
        )
    };
    let repo_id = repo.get("id").cloned().unwrap_or(Json::Null);
    let branch = |label: &str, sha: &str| {
        let mut b = Json::Object(Vec::new());
        b.set("label", label)
            .set("ref", label)
            .set("sha", sha)
            .set("repo_id", repo_id.clone())
            .set("repo", repo.clone());
        b
    };
    let n = pr.number;
    let mut j = sample_json("gitea-webhook-pull_request-closed-merged.json")
        .get("pull_request")
        .cloned()
        .expect("the sample has a pull_request");
    let closed_at = if pr.state == PrState::Closed {
        meta.merged_at_ms.or(Some(meta.updated_at_ms))
    } else {
        None
    };
    j.set("id", meta.id)
        .set("url", format!("{base_url}/{full}/pulls/{n}"))
        .set("number", n)
        .set("user", user)
        .set("title", &meta.title)
        .set("body", &meta.body)
        .set("labels", Json::Array(Vec::new()))
        .set("milestone", Json::Null)
        .set("assignee", Json::Null)
        .set("assignees", Json::Null)
        .set("requested_reviewers", Json::Null)
        .set("state", pr.state.as_str())
        .set("draft", false)
        .set("is_locked", false)
        .set("comments", 0_u64)
        .set("additions", additions)
        .set("deletions", deletions)
        .set("changed_files", changed)
        .set("html_url", format!("{base_url}/{full}/pulls/{n}"))
        .set("diff_url", format!("{base_url}/{full}/pulls/{n}.diff"))
        .set("patch_url", format!("{base_url}/{full}/pulls/{n}.patch"))
        .set("mergeable", pr.state == PrState::Open)
        .set("merged", pr.merged)
        .set("merged_at", meta.merged_at_ms.map(time))
        .set("merge_commit_sha", pr.merge_sha.clone())
        .set("merged_by", merged_by)
        .set("allow_maintainer_edit", false)
        .set("base", branch(&pr.base_branch, &base_sha))
        .set("head", branch(&pr.head_branch, &pr.head_sha))
        .set("merge_base", merge_base)
        .set("due_date", Json::Null)
        .set("created_at", time(meta.created_at_ms))
        .set("updated_at", time(meta.updated_at_ms))
        .set("closed_at", closed_at.map(time))
        .set("pin_order", 0_u64);
    j
}

/// Lines added, removed and files changed between `from` and `to`.
async fn numstat(git: &Git, dir: &Path, from: &str, to: &str) -> (u64, u64, u64) {
    if from.is_empty() || to.is_empty() {
        return (0, 0, 0);
    }
    let Ok(out) = git.ok(dir, &["diff", "--numstat", from, to]).await else {
        return (0, 0, 0);
    };
    out.lines().fold((0, 0, 0), |(a, d, f), line| {
        let mut cols = line.split('\t');
        let add = cols.next().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
        let del = cols.next().and_then(|c| c.parse::<u64>().ok()).unwrap_or(0);
        (a + add, d + del, f + 1)
    })
}

/// The `pull_request` webhook for `action`, sent by `sender`.
async fn pr_webhook(
    inner: &Inner,
    full: &str,
    number: u64,
    action: &str,
    sender: &str,
) -> Option<Outgoing> {
    // No hook: nothing to build.
    inner.lock().hook.as_ref()?;
    let pr = inner
        .forge
        .get_pr(&repo_name(full), number)
        .await
        .ok()
        .flatten()?;
    let meta = inner
        .lock()
        .pulls
        .get(&(full.to_owned(), number))
        .cloned()?;
    let pr_j = pr_json(inner, full, &pr, &meta).await;
    let d = inner.lock();
    let hook = d.hook.clone()?;
    let sender = d.user(sender).cloned().unwrap_or(GiteaUser {
        id: 0,
        login: sender.to_owned(),
        token: None,
    });
    let mut payload = sample_json("gitea-webhook-pull_request-closed-merged.json");
    payload
        .set("action", action)
        .set("number", number)
        .set("pull_request", pr_j)
        .set("requested_reviewer", Json::Null)
        .set("repository", repo_json(&inner.url, &d, full))
        .set("sender", user_json(&inner.url, &sender))
        .set("commit_id", "")
        .set("review", Json::Null);
    let body = payload.to_go_indented().into_bytes();
    Some(gitea_outgoing(
        &hook,
        "pull_request",
        "pull_request",
        format!("pull_request {action} #{number}"),
        body,
    ))
}

/// The review webhook (services/webhook/notifier.go `PullRequestReview`): the PR payload
/// with `action: reviewed`, the reviewer as `requested_reviewer` and `sender`, and
/// `review: {type: <event type>, content}`.
async fn review_webhook(
    inner: &Inner,
    full: &str,
    number: u64,
    reviewer: &str,
    state: ReviewState,
    content: &str,
) -> Option<Outgoing> {
    let (event_type, event) = review_events(state)?;
    let mut out = pr_webhook(inner, full, number, "reviewed", reviewer).await?;
    let d = inner.lock();
    let hook = d.hook.clone()?;
    let user = d.user(reviewer).cloned().unwrap_or(GiteaUser {
        id: 0,
        login: reviewer.to_owned(),
        token: None,
    });
    let mut payload = Json::parse(std::str::from_utf8(&out.body).ok()?).ok()?;
    payload
        .set("requested_reviewer", user_json(&inner.url, &user))
        .set(
            "review",
            crate::json::object([
                ("type", Json::from(event_type)),
                ("content", Json::from(content)),
            ]),
        );
    out = gitea_outgoing(
        &hook,
        event,
        event_type,
        format!("{event_type} #{number} by {reviewer}"),
        payload.to_go_indented().into_bytes(),
    );
    Some(out)
}

/// The `status` webhook (`CommitStatusPayload`, `gitea-webhook-status.json`'s keys).
fn status_webhook(inner: &Inner, full: &str, sha: &str, s: &FakeStatus) -> Option<Outgoing> {
    let d = inner.lock();
    let hook = d.hook.clone()?;
    let sender = d.user(&s.creator).cloned().unwrap_or(GiteaUser {
        id: 0,
        login: s.creator.clone(),
        token: None,
    });
    let mut payload = sample_json("gitea-webhook-status.json");
    let mut commit = payload.get("commit").cloned().unwrap_or(Json::Null);
    commit
        .set("id", sha)
        .set("url", format!("{}/{full}/commit/{sha}", inner.url));
    payload
        .set("commit", commit)
        .set("context", &s.context)
        .set("created_at", time(s.at_ms))
        .set("description", &s.description)
        .set("id", s.id)
        .set("repository", repo_json(&inner.url, &d, full))
        .set("sender", user_json(&inner.url, &sender))
        .set("sha", sha)
        .set("state", &s.state)
        .set("target_url", &s.target_url)
        .set("updated_at", time(s.at_ms));
    Some(gitea_outgoing(
        &hook,
        "status",
        "status",
        format!("status {} {} on {sha}", s.context, s.state),
        payload.to_go_indented().into_bytes(),
    ))
}

/// `GET .../commits/{ref}/status`: the latest status of each context on the commit `git_ref`
/// names, combined (an error or failure wins, then pending; none at all is pending).
async fn combined_status_answer(inner: &Inner, full: &str, git_ref: &str) -> Answer {
    let dir = inner.forge.repo_dir(&repo_name(full));
    let sha = if git_ref.len() == 40 && git_ref.bytes().all(|b| b.is_ascii_hexdigit()) {
        Some(git_ref.to_owned())
    } else {
        inner
            .git
            .rev_parse(&dir, &format!("refs/heads/{git_ref}"))
            .await
            .ok()
            .flatten()
    };
    let Some(sha) = sha else {
        return not_found();
    };
    let d = inner.lock();
    let mut latest: Vec<FakeStatus> = Vec::new();
    for s in d
        .statuses
        .get(&(full.to_owned(), sha.clone()))
        .cloned()
        .unwrap_or_default()
    {
        latest.retain(|l| l.context != s.context);
        latest.push(s);
    }
    let state = if latest.iter().any(|s| s.state == "error") {
        "error"
    } else if latest.iter().any(|s| s.state == "failure") {
        "failure"
    } else if latest.is_empty() || latest.iter().any(|s| s.state == "pending") {
        "pending"
    } else {
        "success"
    };
    let mut j = sample_json("gitea-api-combined-status.json");
    let template = match j.get("statuses") {
        Some(Json::Array(items)) => items.first().cloned().expect("a status in the sample"),
        _ => panic!("gitea-api-combined-status.json has statuses"),
    };
    let api = format!("{}/api/v1/repos/{full}", inner.url);
    let statuses: Vec<Json> = latest
        .iter()
        .map(|s| {
            let creator = d.user(&s.creator).cloned().unwrap_or(GiteaUser {
                id: 0,
                login: s.creator.clone(),
                token: None,
            });
            let mut t = template.clone();
            t.set("id", s.id)
                .set("status", &s.state)
                .set("target_url", &s.target_url)
                .set("description", &s.description)
                .set("url", format!("{api}/statuses/{sha}"))
                .set("context", &s.context)
                .set("creator", user_json(&inner.url, &creator))
                .set("created_at", time(s.at_ms))
                .set("updated_at", time(s.at_ms));
            t
        })
        .collect();
    j.set("state", state)
        .set("sha", &sha)
        .set("total_count", statuses.len() as u64)
        .set("statuses", Json::Array(statuses))
        .set("repository", repo_json(&inner.url, &d, full))
        .set("commit_url", format!("{api}/commits/{sha}"))
        .set("url", format!("{api}/commits/{sha}/status"));
    ok(StatusCode::OK, &j)
}

/// `PullReview` objects (`gitea-api-pull-reviews.json`'s field set) of PR `number`.
fn reviews_json(inner: &Inner, full: &str, number: u64) -> Json {
    let d = inner.lock();
    let template = match sample_json("gitea-api-pull-reviews.json") {
        Json::Array(items) => items.into_iter().next().expect("a review in the sample"),
        _ => panic!("gitea-api-pull-reviews.json is a list"),
    };
    let reviews = d
        .reviews
        .get(&(full.to_owned(), number))
        .cloned()
        .unwrap_or_default();
    Json::Array(
        reviews
            .iter()
            .map(|r| {
                let user = d.user(&r.user).cloned().unwrap_or(GiteaUser {
                    id: 0,
                    login: r.user.clone(),
                    token: None,
                });
                let mut j = template.clone();
                j.set("id", r.id)
                    .set("user", user_json(&inner.url, &user))
                    .set("state", gitea_review_state(r.state))
                    .set("body", &r.body)
                    .set("commit_id", &r.commit_id)
                    .set("stale", false)
                    .set("dismissed", r.dismissed)
                    .set("comments_count", r.comments.len() as u64)
                    .set("submitted_at", time(r.submitted_at_ms))
                    .set("updated_at", time(r.submitted_at_ms))
                    .set(
                        "html_url",
                        format!("{}/{full}/pulls/{number}#issuecomment-{}", inner.url, r.id),
                    )
                    .set(
                        "pull_request_url",
                        format!("{}/{full}/pulls/{number}", inner.url),
                    );
                j
            })
            .collect(),
    )
}

/// `PullReviewComment` objects of review `id` (`gitea-api-pull-review-comments.json`), or
/// `None` when PR `number` has no such review.
fn review_comments_json(inner: &Inner, full: &str, number: u64, id: u64) -> Option<Json> {
    let d = inner.lock();
    let review = d
        .reviews
        .get(&(full.to_owned(), number))?
        .iter()
        .find(|r| r.id == id)?
        .clone();
    let template = match sample_json("gitea-api-pull-review-comments.json") {
        Json::Array(items) => items.into_iter().next().expect("a comment in the sample"),
        _ => panic!("gitea-api-pull-review-comments.json is a list"),
    };
    let user = d.user(&review.user).cloned().unwrap_or(GiteaUser {
        id: 0,
        login: review.user.clone(),
        token: None,
    });
    Some(Json::Array(
        review
            .comments
            .iter()
            .map(|c| {
                let mut j = template.clone();
                j.set("id", c.id)
                    .set("body", &c.body)
                    .set("user", user_json(&inner.url, &user))
                    .set("pull_request_review_id", review.id)
                    .set("created_at", time(review.submitted_at_ms))
                    .set("updated_at", time(review.submitted_at_ms))
                    .set("path", &c.path)
                    .set("commit_id", &review.commit_id)
                    .set("original_commit_id", &review.commit_id)
                    .set("position", c.line)
                    .set("original_position", c.line)
                    .set(
                        "html_url",
                        format!(
                            "{}/{full}/pulls/{number}/files#issuecomment-{}",
                            inner.url, c.id
                        ),
                    )
                    .set(
                        "pull_request_url",
                        format!("{}/{full}/pulls/{number}", inner.url),
                    );
                j
            })
            .collect(),
    ))
}

/// Headers as services/webhook/deliver.go sets them (signature headers empty without a
/// secret).
fn gitea_outgoing(
    hook: &Hook,
    event: &str,
    event_type: &str,
    what: String,
    body: Vec<u8>,
) -> Outgoing {
    let id = uuid::Uuid::now_v7().to_string();
    let (sig256, sig1) = match &hook.secret {
        Some(s) => (
            webhook::hmac_sha256_hex(s.as_bytes(), &body),
            webhook::hmac_sha1_hex(s.as_bytes(), &body),
        ),
        None => (String::new(), String::new()),
    };
    let mut headers = vec![("Content-Type".to_owned(), "application/json".to_owned())];
    for prefix in ["X-Gitea", "X-Gogs", "X-GitHub"] {
        headers.push((format!("{prefix}-Delivery"), id.clone()));
        headers.push((format!("{prefix}-Event"), event.to_owned()));
        headers.push((format!("{prefix}-Event-Type"), event_type.to_owned()));
    }
    headers.push(("X-Gitea-Signature".to_owned(), sig256.clone()));
    headers.push(("X-Gogs-Signature".to_owned(), sig256.clone()));
    headers.push(("X-Hub-Signature".to_owned(), format!("sha1={sig1}")));
    headers.push(("X-Hub-Signature-256".to_owned(), format!("sha256={sig256}")));
    Outgoing {
        url: hook.url.clone(),
        id,
        event: event.to_owned(),
        what,
        headers,
        body,
    }
}

// ------------------------------------------------------------------------------ the API

type Answer = (StatusCode, String, Vec<Outgoing>);

fn api_error(status: StatusCode, message: &str) -> Answer {
    (
        status,
        json!({"message": message, "url": "https://gitea.example.com/api/swagger"}).to_string(),
        Vec::new(),
    )
}

fn not_found() -> Answer {
    (
        StatusCode::NOT_FOUND,
        json!({"message": "The target couldn't be found.", "url": "https://gitea.example.com/api/swagger", "errors": []}).to_string(),
        Vec::new(),
    )
}

fn ok(status: StatusCode, j: &Json) -> Answer {
    (status, j.to_value().to_string(), Vec::new())
}

/// The token of `Authorization: token X`, `Bearer X` or `Basic base64(user:X)`.
fn token_of(headers: &HeaderMap) -> Option<String> {
    let value = headers.get("authorization")?.to_str().ok()?.trim();
    let (scheme, rest) = value.split_once(' ')?;
    let rest = rest.trim();
    match scheme.to_ascii_lowercase().as_str() {
        "token" | "bearer" => Some(rest.to_owned()),
        "basic" => {
            let decoded = base64::engine::general_purpose::STANDARD
                .decode(rest)
                .ok()?;
            let text = String::from_utf8(decoded).ok()?;
            Some(
                text.split_once(':')
                    .map_or(text.clone(), |(_, p)| p.to_owned()),
            )
        }
        _ => None,
    }
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    if let Some(rest) = path.strip_prefix("/api/v1/") {
        let (status, text, outs) = rest_api(
            &inner,
            &method,
            rest,
            uri.query().unwrap_or_default(),
            &headers,
            &body,
        )
        .await;
        for out in outs {
            // Gitea delivers from a queue, after the API has answered.
            let inner = inner.clone();
            tokio::spawn(async move { webhook::send(&inner.http, &inner.deliveries, out).await });
        }
        let ctype = if status == StatusCode::OK && path.contains("/raw/") {
            "text/plain; charset=utf-8"
        } else {
            "application/json;charset=utf-8"
        };
        return (status, [("content-type", ctype)], text).into_response();
    }
    if path.contains(".git/") {
        return git_http(&inner, &method, &uri, &headers, body).await;
    }
    let (s, t, _) = not_found();
    (s, t).into_response()
}

async fn rest_api(
    inner: &Inner,
    method: &Method,
    rest: &str,
    query: &str,
    headers: &HeaderMap,
    body: &[u8],
) -> Answer {
    let login = {
        let mut d = inner.lock();
        let token = token_of(headers);
        let user = token
            .as_deref()
            .and_then(|t| d.user_by_token(t))
            .map(|u| u.login.clone());
        d.requests.push(format!(
            "{method} /api/v1/{rest} {}",
            user.as_deref().unwrap_or("-")
        ));
        if d.faults.down {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "<html>503 Service Unavailable</html>".to_owned(),
                Vec::new(),
            );
        }
        match user {
            Some(u) => u,
            None => {
                let why = if token.is_none() {
                    "without a token"
                } else {
                    "with an unknown token"
                };
                d.errors.push(format!("{method} /api/v1/{rest} {why}"));
                return api_error(StatusCode::UNAUTHORIZED, "token is required");
            }
        }
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let ["repos", owner, name, tail @ ..] = parts.as_slice() else {
        return not_found();
    };
    let full = format!("{owner}/{name}");
    if !inner.lock().repos.contains_key(&full) {
        return not_found();
    }
    let query: Vec<(String, String)> = reqwest::Url::parse(&format!("http://x/?{query}"))
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default();
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    let repo = repo_name(&full);
    match (method.clone(), tail) {
        (Method::GET, []) => {
            let j = repo_json(&inner.url, &inner.lock(), &full);
            ok(StatusCode::OK, &j)
        }
        (Method::POST, ["pulls"]) => create_pr(inner, &full, &login, body).await,
        (Method::GET, ["pulls"]) => {
            let want = get("state").unwrap_or_else(|| "open".to_owned());
            let mut out = Vec::new();
            for n in pr_numbers(inner, &full) {
                if let Some(j) = pr_answer(inner, &full, n).await
                    && (want == "all"
                        || j.get("state").and_then(Json::as_str) == Some(want.as_str()))
                {
                    out.push(j);
                }
            }
            out.reverse();
            ok(StatusCode::OK, &Json::Array(out))
        }
        (Method::GET, ["pulls", index]) => match index.parse::<u64>() {
            Ok(n) => match pr_answer(inner, &full, n).await {
                Some(j) => ok(StatusCode::OK, &j),
                None => not_found(),
            },
            Err(_) => not_found(),
        },
        (Method::GET, ["pulls", index, "merge"]) => match index.parse::<u64>() {
            Ok(n) => match inner.forge.get_pr(&repo, n).await.ok().flatten() {
                Some(pr) if pr.merged => (StatusCode::NO_CONTENT, String::new(), Vec::new()),
                _ => not_found(),
            },
            Err(_) => not_found(),
        },
        (Method::POST, ["pulls", index, "merge"]) => {
            let Ok(n) = index.parse::<u64>() else {
                return not_found();
            };
            let b = std::str::from_utf8(body)
                .ok()
                .and_then(|t| Json::parse(t).ok());
            let Some(b @ Json::Object(_)) = b else {
                inner.lock().errors.push(format!(
                    "merge of {full}#{n}: the body is not a JSON object"
                ));
                return api_error(StatusCode::UNPROCESSABLE_ENTITY, "[]: invalid json");
            };
            if headers
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_none_or(|c| !c.starts_with("application/json"))
            {
                inner.lock().errors.push(format!(
                    "merge of {full}#{n}: the body is not application/json"
                ));
            }
            merge(inner, &full, n, &login, &b).await
        }
        (Method::GET, ["pulls", index, "reviews"]) if index.parse::<u64>().is_ok() => {
            let n = index.parse::<u64>().unwrap_or_default();
            if !inner.lock().pulls.contains_key(&(full.clone(), n)) {
                return not_found();
            }
            // One page holds them all (Gitea's `limit` caps at 50; tests stay below it).
            ok(StatusCode::OK, &reviews_json(inner, &full, n))
        }
        (Method::GET, ["pulls", index, "reviews", id, "comments"]) => {
            match (index.parse::<u64>(), id.parse::<u64>()) {
                (Ok(n), Ok(id)) => match review_comments_json(inner, &full, n, id) {
                    Some(j) => ok(StatusCode::OK, &j),
                    None => not_found(),
                },
                _ => not_found(),
            }
        }
        (Method::GET, ["pulls", base, head @ ..]) if !head.is_empty() => {
            let head = head.join("/");
            match inner.forge.find_pr(&repo, &head, base).await {
                Ok(Some(pr)) => match pr_answer(inner, &full, pr.number).await {
                    Some(j) => ok(StatusCode::OK, &j),
                    None => not_found(),
                },
                _ => not_found(),
            }
        }
        (Method::POST, ["issues", index, "comments"]) => {
            let Ok(n) = index.parse::<u64>() else {
                return not_found();
            };
            let b: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
            let Some(text) = b["body"].as_str() else {
                return api_error(StatusCode::UNPROCESSABLE_ENTITY, "[Body]: Required");
            };
            if !inner.lock().pulls.contains_key(&(full.clone(), n)) {
                return not_found();
            }
            let (id, user) = {
                let mut d = inner.lock();
                let user = d.user(&login).cloned().expect("the caller's account");
                (d.next_id(), user)
            };
            let now = time(now_ms());
            let j = json!({
                "id": id, "html_url": format!("{}/{full}/pulls/{n}#issuecomment-{id}", inner.url),
                "pull_request_url": format!("{}/{full}/pulls/{n}", inner.url), "issue_url": "",
                "user": user_json(&inner.url, &user).to_value(), "original_author": "", "original_author_id": 0,
                "body": text, "assets": [], "created_at": now.to_value(), "updated_at": now.to_value()
            });
            (StatusCode::CREATED, j.to_string(), Vec::new())
        }
        (Method::GET, ["commits", git_ref @ .., "status"]) if !git_ref.is_empty() => {
            combined_status_answer(inner, &full, &git_ref.join("/")).await
        }
        (Method::GET, ["branches", branch @ ..]) if !branch.is_empty() => {
            branch_answer(inner, &full, &branch.join("/")).await
        }
        (Method::GET, ["raw", path @ ..]) if !path.is_empty() => {
            let git_ref = get("ref").unwrap_or_else(|| DEFAULT_BRANCH.to_owned());
            match inner
                .forge
                .read_file(&repo, &git_ref, &path.join("/"))
                .await
            {
                Ok(Some(text)) => (StatusCode::OK, text, Vec::new()),
                _ => not_found(),
            }
        }
        (Method::GET, ["contents", path @ ..]) if !path.is_empty() => {
            let git_ref = get("ref").unwrap_or_else(|| DEFAULT_BRANCH.to_owned());
            let path = path.join("/");
            match inner.forge.read_file(&repo, &git_ref, &path).await {
                Ok(Some(text)) => {
                    let name = path.rsplit('/').next().unwrap_or(&path).to_owned();
                    let j = json!({
                        "name": name, "path": path, "type": "file", "size": text.len(),
                        "encoding": "base64",
                        "content": base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
                        "url": format!("{}/api/v1/repos/{full}/contents/{path}?ref={git_ref}", inner.url),
                        "html_url": format!("{}/{full}/src/branch/{git_ref}/{path}", inner.url),
                        "download_url": format!("{}/{full}/raw/branch/{git_ref}/{path}", inner.url),
                    });
                    (StatusCode::OK, j.to_string(), Vec::new())
                }
                _ => not_found(),
            }
        }
        _ => not_found(),
    }
}

/// `GET /repos/{owner}/{repo}/branches/{branch}`: the swagger's `Branch`, with its head
/// commit as a `PayloadCommit`; 404 for a branch the repository does not have.
async fn branch_answer(inner: &Inner, full: &str, branch: &str) -> Answer {
    let dir = inner.forge.repo_dir(&repo_name(full));
    let Ok(Some(sha)) = inner
        .git
        .rev_parse(&dir, &format!("refs/heads/{branch}"))
        .await
    else {
        return api_error(StatusCode::NOT_FOUND, "branch does not exist");
    };
    let log = inner
        .git
        .ok(&dir, &["log", "-1", "--format=%an%n%ae%n%cI%n%B", &sha])
        .await
        .unwrap_or_default();
    let mut lines = log.lines();
    let (name, email, at) = (
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
        lines.next().unwrap_or_default(),
    );
    let message: Vec<&str> = lines.collect();
    let person = json!({"name": name, "email": email, "username": ""});
    let j = json!({
        "name": branch,
        "commit": {
            "id": sha, "message": message.join("\n").trim_end(),
            "url": format!("{}/{full}/commit/{sha}", inner.url),
            "author": person.clone(), "committer": person,
            "verification": null, "timestamp": at,
            "added": [], "removed": [], "modified": []
        },
        "protected": false, "required_approvals": 0, "enable_status_check": false,
        "status_check_contexts": [], "user_can_push": true, "user_can_merge": true,
        "effective_branch_protection_name": ""
    });
    (StatusCode::OK, j.to_string(), Vec::new())
}

fn pr_numbers(inner: &Inner, full: &str) -> Vec<u64> {
    inner
        .lock()
        .pulls
        .keys()
        .filter(|(r, _)| r == full)
        .map(|(_, n)| *n)
        .collect()
}

async fn pr_answer(inner: &Inner, full: &str, number: u64) -> Option<Json> {
    let pr = inner
        .forge
        .get_pr(&repo_name(full), number)
        .await
        .ok()
        .flatten()?;
    let meta = inner
        .lock()
        .pulls
        .get(&(full.to_owned(), number))
        .cloned()?;
    Some(pr_json(inner, full, &pr, &meta).await)
}

async fn create_pr(inner: &Inner, full: &str, login: &str, body: &[u8]) -> Answer {
    let b: serde_json::Value = serde_json::from_slice(body).unwrap_or_default();
    let (Some(head), Some(base), Some(title)) =
        (b["head"].as_str(), b["base"].as_str(), b["title"].as_str())
    else {
        inner.lock().errors.push(format!(
            "create PR in {full} without head, base and title: {b}"
        ));
        return api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "[Head Base Title]: Required",
        );
    };
    let repo = repo_name(full);
    let dir = inner.forge.repo_dir(&repo);
    let head_sha = inner
        .git
        .rev_parse(&dir, &format!("refs/heads/{head}"))
        .await
        .ok()
        .flatten();
    let base_sha = inner
        .git
        .rev_parse(&dir, &format!("refs/heads/{base}"))
        .await
        .ok()
        .flatten();
    let (Some(head_sha), Some(base_sha)) = (head_sha, base_sha) else {
        return not_found();
    };
    let contained = inner
        .git
        .is_ancestor(&dir, &head_sha, &base_sha)
        .await
        .unwrap_or(false);
    if head == base || contained {
        return api_error(
            StatusCode::UNPROCESSABLE_ENTITY,
            "Invalid PullRequest: There are no changes between the head and the base",
        );
    }
    match inner
        .forge
        .ensure_pr(
            &repo,
            head,
            base,
            title,
            b["body"].as_str().unwrap_or_default(),
        )
        .await
    {
        Ok(e) if !e.created => api_error(
            StatusCode::CONFLICT,
            &format!(
                "pull request already exists for these targets [id: {}, issue_id: {}, head_repo_id: 1, base_repo_id: 1, head_branch: {head}, base_branch: {base}]",
                e.pr.number, e.pr.number
            ),
        ),
        Ok(e) => {
            let now = now_ms();
            {
                let mut d = inner.lock();
                let id = d.next_id();
                d.pulls.insert(
                    (full.to_owned(), e.pr.number),
                    PrMeta {
                        id,
                        title: title.to_owned(),
                        body: b["body"].as_str().unwrap_or_default().to_owned(),
                        user: login.to_owned(),
                        created_at_ms: now,
                        updated_at_ms: now,
                        merged_at_ms: None,
                        merged_by: None,
                    },
                );
            }
            let j = pr_answer(inner, full, e.pr.number)
                .await
                .unwrap_or(Json::Null);
            let outs = pr_webhook(inner, full, e.pr.number, "opened", login)
                .await
                .into_iter()
                .collect();
            (StatusCode::CREATED, j.to_value().to_string(), outs)
        }
        Err(orchestrator_forge::ForgeError::NotFound(_)) => not_found(),
        Err(e) => api_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()),
    }
}

/// Records a merge by `login` and builds its webhook.
async fn merged(inner: &Inner, full: &str, number: u64, login: &str) -> Option<Outgoing> {
    {
        let mut d = inner.lock();
        d.merges_done += 1;
        d.merge_log
            .push((full.to_owned(), number, login.to_owned()));
        if let Some(meta) = d.pulls.get_mut(&(full.to_owned(), number)) {
            let now = now_ms();
            meta.merged_at_ms = Some(now);
            meta.updated_at_ms = now;
            meta.merged_by = Some(login.to_owned());
        }
    }
    pr_webhook(inner, full, number, "closed", login).await
}

/// `POST .../pulls/{n}/merge` (routers/api/v1/repo/pull.go with services/pull/check.go):
/// merged before -> 405, closed -> 404, not ready -> 405, `head_commit_id` not the head ->
/// 409, conflicts -> 409 (the Go error struct), merged -> 200.
async fn merge(inner: &Inner, full: &str, number: u64, login: &str, body: &Json) -> Answer {
    let repo = repo_name(full);
    let (faults, delay) = {
        let mut d = inner.lock();
        d.merge_requests += 1;
        if !d.pulls.contains_key(&(full.to_owned(), number)) {
            return not_found();
        }
        let style = body
            .get("Do")
            .or_else(|| body.get("do"))
            .and_then(Json::as_str)
            .unwrap_or("merge");
        if !style.is_empty() && style != "merge" {
            d.errors.push(format!(
                "merge of {full}#{number} with Do={style}: only merge is modelled"
            ));
            return api_error(
                StatusCode::METHOD_NOT_ALLOWED,
                "merge style not allowed for this repository",
            );
        }
        (std::mem::take(&mut d.faults), d.merge_delay)
    };
    // The merge takes a while: concurrent callers overlap here.
    tokio::time::sleep(delay).await;
    let mut outs = Vec::new();
    let Ok(Some(mut pr)) = inner.forge.get_pr(&repo, number).await else {
        return not_found();
    };
    if faults.merged_by_someone_else && pr.state == PrState::Open {
        if let Ok(MergeOutcome::Merged { .. }) =
            inner.forge.merge_pr(&repo, number, &pr.head_sha).await
        {
            outs.extend(merged(inner, full, number, "someone-else").await);
        }
        pr = inner
            .forge
            .get_pr(&repo, number)
            .await
            .ok()
            .flatten()
            .unwrap_or(pr);
    }
    if faults.push_before_merge && pr.state == PrState::Open {
        let dir = inner.forge.repo_dir(&repo);
        let files = [(
            "pushed-meanwhile.txt",
            "a commit pushed while the merge was on its way\n",
        )];
        if let Ok(sha) = commit_files(
            &inner.git,
            &dir,
            &pr.head_branch,
            &files,
            "pushed meanwhile",
        )
        .await
        {
            pr.head_sha = sha;
        }
    }
    // CheckPullMergeable tests HasMerged before IsClosed.
    if pr.merged {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            api_error(StatusCode::METHOD_NOT_ALLOWED, "").1,
            outs,
        );
    }
    if pr.state == PrState::Closed {
        let (s, t, _) = not_found();
        return (s, t, outs);
    }
    if faults.not_ready {
        return (
            StatusCode::METHOD_NOT_ALLOWED,
            api_error(StatusCode::METHOD_NOT_ALLOWED, "Please try again later").1,
            outs,
        );
    }
    let pinned = body
        .get("head_commit_id")
        .and_then(Json::as_str)
        .unwrap_or_default();
    if !pinned.is_empty() && pinned != pr.head_sha {
        return (
            StatusCode::CONFLICT,
            api_error(
                StatusCode::CONFLICT,
                "head out of date: the branch changed since head_commit_id",
            )
            .1,
            outs,
        );
    }
    match inner.forge.merge_pr(&repo, number, &pr.head_sha).await {
        Ok(MergeOutcome::Merged { .. }) => {
            outs.extend(merged(inner, full, number, login).await);
            if faults.lose_merge_answer {
                return (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    api_error(StatusCode::INTERNAL_SERVER_ERROR, "").1,
                    outs,
                );
            }
            (StatusCode::OK, String::new(), outs)
        }
        Ok(MergeOutcome::AlreadyMerged { .. }) => (
            StatusCode::METHOD_NOT_ALLOWED,
            api_error(StatusCode::METHOD_NOT_ALLOWED, "").1,
            outs,
        ),
        Ok(MergeOutcome::HeadMoved { .. }) => (
            StatusCode::CONFLICT,
            api_error(StatusCode::CONFLICT, "head out of date").1,
            outs,
        ),
        Ok(MergeOutcome::Conflicts { detail }) => (
            StatusCode::CONFLICT,
            // Not an APIError: the Go error struct (models.ErrMergeConflicts) as JSON.
            json!({"Style": "merge", "StdOut": "", "StdErr": detail, "Err": {}}).to_string(),
            outs,
        ),
        Ok(MergeOutcome::Closed) => {
            let (s, t, _) = not_found();
            (s, t, outs)
        }
        Ok(MergeOutcome::NotMergeable { reason }) => (
            StatusCode::METHOD_NOT_ALLOWED,
            api_error(StatusCode::METHOD_NOT_ALLOWED, &reason).1,
            outs,
        ),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            api_error(StatusCode::INTERNAL_SERVER_ERROR, &e.to_string()).1,
            outs,
        ),
    }
}

// ------------------------------------------------------------------ git over smart HTTP

/// Runs `git http-backend` for one request: the CGI variables from the request, the body on
/// its stdin, its headers (`Status:` included) and body back.
async fn git_http(
    inner: &Inner,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path();
    let query = uri.query().unwrap_or_default();
    let service =
        if path.ends_with("/git-receive-pack") || query.contains("service=git-receive-pack") {
            "git-receive-pack"
        } else {
            "git-upload-pack"
        };
    // /{owner}/{name}.git/...
    let repo_ok = path
        .trim_start_matches('/')
        .split_once(".git/")
        .map(|(r, _)| r.to_owned())
        .filter(|r| inner.lock().repos.contains_key(r));
    let login =
        token_of(headers).and_then(|t| inner.lock().user_by_token(&t).map(|u| u.login.clone()));
    let Some(login) = login else {
        let why = if headers.contains_key("authorization") {
            "an unknown token"
        } else {
            "no token"
        };
        inner
            .lock()
            .errors
            .push(format!("git {service} {path} with {why}"));
        return (
            StatusCode::UNAUTHORIZED,
            [("www-authenticate", "Basic realm=\"Gitea\"")],
            "Unauthorized\n",
        )
            .into_response();
    };
    inner.lock().git_requests.push(format!("{service} {login}"));
    if repo_ok.is_none() {
        return (StatusCode::NOT_FOUND, "Repository not found\n").into_response();
    }
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut cmd = tokio::process::Command::new("git");
    cmd.arg("http-backend")
        .env_clear()
        .env("PATH", std::env::var_os("PATH").unwrap_or_default())
        .env("HOME", &inner.root)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_PROJECT_ROOT", &inner.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REQUEST_METHOD", method.as_str())
        .env("PATH_INFO", path)
        .env("QUERY_STRING", query)
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("HTTP_GIT_PROTOCOL", header("git-protocol"))
        // A known user: receive-pack is allowed (http.receivepack defaults to "REMOTE_USER set").
        .env("REMOTE_USER", &login)
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("GATEWAY_INTERFACE", "CGI/1.1")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("cannot run git http-backend: {e}\n"),
            )
                .into_response();
        }
    };
    let mut stdin = child.stdin.take().expect("piped stdin");
    let writer = tokio::spawn(async move {
        // A backend that exits early closes its stdin: nothing more to say.
        let _ = stdin.write_all(&body).await;
    });
    let out = match tokio::time::timeout(Duration::from_secs(120), child.wait_with_output()).await {
        Ok(Ok(out)) => out,
        Ok(Err(e)) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("git http-backend: {e}\n"),
            )
                .into_response();
        }
        Err(_) => {
            return (StatusCode::GATEWAY_TIMEOUT, "git http-backend timed out\n").into_response();
        }
    };
    let _ = writer.await;
    cgi_response(&out.stdout, &out.stderr)
}

/// Splits a CGI answer into status, headers and body.
fn cgi_response(stdout: &[u8], stderr: &[u8]) -> Response {
    let split = stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| {
            stdout
                .windows(2)
                .position(|w| w == b"\n\n")
                .map(|i| (i, i + 2))
        });
    let Some((end, body_start)) = split else {
        let text = format!(
            "git http-backend answered no headers: {}\n",
            String::from_utf8_lossy(stderr)
        );
        return (StatusCode::INTERNAL_SERVER_ERROR, text).into_response();
    };
    let mut status = StatusCode::OK;
    let mut builder = Response::builder();
    for line in String::from_utf8_lossy(&stdout[..end]).lines() {
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let (k, v) = (k.trim(), v.trim());
        if k.eq_ignore_ascii_case("status") {
            status = v
                .split_whitespace()
                .next()
                .and_then(|c| c.parse::<u16>().ok())
                .and_then(|c| StatusCode::from_u16(c).ok())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        } else if let (Ok(name), Ok(value)) = (HeaderName::try_from(k), HeaderValue::try_from(v)) {
            builder = builder.header(name, value);
        }
    }
    builder
        .status(status)
        .body(Body::from(stdout[body_start..].to_vec()))
        .unwrap_or_else(|e| (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response())
}
