//! Gitea's REST API v1, as described in `shared/contracts/gitea-notes.md`.

use async_trait::async_trait;
use orchestrator_git::{RepoName, validate_branch, validate_path};
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use crate::config::{ForgeKind, GiteaConfig};
use crate::{
    CiState, CombinedStatus, CommitStatus, EnsuredPr, Forge, ForgeError, MergeOutcome, PrReview,
    PrState, PullRequest, ReviewComment, ReviewState, validate_ref,
};

/// A Gitea instance.
#[derive(Debug, Clone)]
pub struct GiteaForge {
    config: GiteaConfig,
    http: reqwest::Client,
}

#[derive(Debug, Deserialize)]
struct GiteaBranchRef {
    #[serde(rename = "ref", default)]
    branch: String,
    #[serde(default)]
    sha: String,
}

#[derive(Debug, Deserialize)]
struct GiteaPr {
    number: u64,
    #[serde(default)]
    html_url: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    merged: bool,
    #[serde(default)]
    merge_commit_sha: Option<String>,
    head: GiteaBranchRef,
    base: GiteaBranchRef,
}

impl From<GiteaPr> for PullRequest {
    fn from(p: GiteaPr) -> Self {
        PullRequest {
            number: p.number,
            url: p.html_url,
            head_branch: p.head.branch,
            head_sha: p.head.sha,
            base_branch: p.base.branch,
            state: if p.state == "open" {
                PrState::Open
            } else {
                PrState::Closed
            },
            merged: p.merged,
            merge_sha: p.merge_commit_sha.filter(|s| !s.is_empty()),
        }
    }
}

#[derive(Debug, Deserialize, Default)]
struct GiteaUser {
    #[serde(default)]
    login: String,
}

/// A `PullReview` (swagger definitions; `gitea-api-pull-reviews.json`).
#[derive(Debug, Deserialize)]
struct GiteaReview {
    id: u64,
    #[serde(default)]
    user: Option<GiteaUser>,
    #[serde(default)]
    state: String,
    #[serde(default)]
    body: String,
    #[serde(default)]
    commit_id: String,
    #[serde(default)]
    dismissed: bool,
    #[serde(default)]
    stale: bool,
    #[serde(default)]
    submitted_at: String,
}

/// A `PullReviewComment` (`gitea-api-pull-review-comments.json`).
#[derive(Debug, Deserialize)]
struct GiteaReviewComment {
    #[serde(default)]
    user: Option<GiteaUser>,
    #[serde(default)]
    path: String,
    /// The line in the new file; `original_position` for a comment on an older diff.
    #[serde(default)]
    position: u64,
    #[serde(default)]
    original_position: u64,
    #[serde(default)]
    body: String,
}

/// A `CombinedStatus` (swagger definitions): the commit's latest status per context.
#[derive(Debug, Deserialize)]
struct GiteaCombinedStatus {
    #[serde(default)]
    sha: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    statuses: Vec<GiteaCommitStatus>,
}

/// A `CommitStatus`: its state is `status` in 1.27.1 (`state` in older servers).
#[derive(Debug, Deserialize)]
struct GiteaCommitStatus {
    #[serde(default)]
    context: String,
    #[serde(default, alias = "state")]
    status: String,
    #[serde(default)]
    description: String,
    #[serde(default)]
    target_url: String,
}

/// Gitea's page size cap (`MAX_RESPONSE_ITEMS` defaults to 50).
const PAGE_LIMIT: usize = 50;
/// A bound on the pages read, so that a forge that keeps answering full pages ends.
const MAX_PAGES: usize = 20;

/// The error body Gitea sends (`APIError`); other shapes are shown raw.
#[derive(Debug, Deserialize)]
struct ApiError {
    #[serde(default)]
    message: String,
}

fn message_of(body: &str) -> String {
    let m = serde_json::from_str::<ApiError>(body)
        .map(|e| e.message)
        .unwrap_or_else(|_| body.to_owned());
    m.chars().take(300).collect()
}

/// Maps an unexpected status to an error: 5xx and 429 (and 408) may pass, the rest will not.
fn status_error(what: &str, status: StatusCode, body: &str) -> ForgeError {
    let message = message_of(body);
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        ForgeError::Unavailable(format!("{what}: HTTP {}", status.as_u16()))
    } else if status == StatusCode::NOT_FOUND {
        ForgeError::NotFound(format!("{what}: {message}"))
    } else {
        ForgeError::Rejected {
            status: status.as_u16(),
            message: format!("{what}: {message}"),
        }
    }
}

impl GiteaForge {
    pub fn new(config: GiteaConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent("orchestrator")
            .build()?;
        Ok(GiteaForge { config, http })
    }

    /// `{base}/api/v1/repos/{owner}/{repo}` followed by `segments`, each percent-encoded.
    fn api_url(&self, repo: &RepoName, segments: &[&str]) -> Result<reqwest::Url, ForgeError> {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/", self.config.base_url))
            .map_err(|e| ForgeError::Protocol(format!("GITEA_BASE_URL: {e}")))?;
        {
            let mut path = url
                .path_segments_mut()
                .map_err(|()| ForgeError::Protocol("GITEA_BASE_URL cannot be a base".to_owned()))?;
            path.pop_if_empty()
                .extend(["repos", repo.owner.as_str(), repo.name.as_str()])
                .extend(segments);
        }
        Ok(url)
    }

    async fn send(
        &self,
        method: Method,
        url: reqwest::Url,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, String), ForgeError> {
        let mut req = self.http.request(method, url);
        if let Some(token) = &self.config.token {
            req = req.header("Authorization", format!("token {}", token.expose()));
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| ForgeError::Unavailable(without_url(e)))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| ForgeError::Unavailable(without_url(e)))?;
        Ok((status, text))
    }

    fn parse_pr(body: &str) -> Result<PullRequest, ForgeError> {
        serde_json::from_str::<GiteaPr>(body)
            .map(PullRequest::from)
            .map_err(|e| ForgeError::Protocol(format!("a pull request: {e}")))
    }
}

/// Describes a transport error without its URL (which may carry a query we keep out of logs).
fn without_url(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    format!("{kind}: {}", e.without_url())
}

#[async_trait]
impl Forge for GiteaForge {
    fn kind(&self) -> ForgeKind {
        ForgeKind::Gitea
    }

    async fn repo_exists(&self, repo: &RepoName) -> Result<bool, ForgeError> {
        let url = self.api_url(repo, &[])?;
        let (status, text) = self.send(Method::GET, url, None).await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(status_error("get repository", s, &text)),
        }
    }

    async fn branch_head(
        &self,
        repo: &RepoName,
        branch: &str,
    ) -> Result<Option<String>, ForgeError> {
        validate_branch(branch)?;
        let mut segments = vec!["branches"];
        segments.extend(branch.split('/'));
        let url = self.api_url(repo, &segments)?;
        let (status, text) = self.send(Method::GET, url, None).await?;
        match status {
            // The swagger's `Branch`: its head commit is a `PayloadCommit`.
            StatusCode::OK => {
                let v: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| ForgeError::Rejected {
                        status: 200,
                        message: format!("the branch is not JSON: {e}"),
                    })?;
                let sha = v["commit"]["id"].as_str().unwrap_or_default();
                if orchestrator_git::is_commit_id(sha) {
                    Ok(Some(sha.to_owned()))
                } else {
                    Err(ForgeError::Rejected {
                        status: 200,
                        message: format!("the branch names no commit id: '{}'", sha.escape_debug()),
                    })
                }
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error("get branch", s, &text)),
        }
    }

    async fn branch_exists(&self, repo: &RepoName, branch: &str) -> Result<bool, ForgeError> {
        validate_branch(branch)?;
        // Gitea's route is /branches/*: the branch's components are path segments.
        let mut segments = vec!["branches"];
        segments.extend(branch.split('/'));
        let url = self.api_url(repo, &segments)?;
        let (status, text) = self.send(Method::GET, url, None).await?;
        match status {
            StatusCode::OK => Ok(true),
            StatusCode::NOT_FOUND => Ok(false),
            s => Err(status_error("get branch", s, &text)),
        }
    }

    #[tracing::instrument(skip_all, fields(repo = %repo, head, base))]
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
        let url = self.api_url(repo, &["pulls"])?;
        let payload =
            serde_json::json!({ "head": head, "base": base, "title": title, "body": body });
        let (status, text) = self.send(Method::POST, url, Some(payload)).await?;
        match status {
            StatusCode::CREATED => Ok(EnsuredPr {
                pr: Self::parse_pr(&text)?,
                created: true,
            }),
            // An unmerged PR with this head and base exists: return it.
            StatusCode::CONFLICT => match self.find_pr(repo, head, base).await? {
                Some(pr) => Ok(EnsuredPr { pr, created: false }),
                None => Err(ForgeError::Protocol(format!(
                    "create PR answered 409 but no PR {head} -> {base} was found"
                ))),
            },
            s => Err(status_error("create PR", s, &text)),
        }
    }

    async fn find_pr(
        &self,
        repo: &RepoName,
        head: &str,
        base: &str,
    ) -> Result<Option<PullRequest>, ForgeError> {
        validate_branch(head)?;
        validate_branch(base)?;
        if base.contains('/') {
            // Gitea's route is /pulls/{base}/*head: a base with a slash cannot be named.
            return Err(ForgeError::Rejected {
                status: 400,
                message: format!(
                    "base branch '{base}' has a '/', which Gitea's lookup cannot take"
                ),
            });
        }
        let mut segments = vec!["pulls", base];
        segments.extend(head.split('/'));
        let url = self.api_url(repo, &segments)?;
        let (status, text) = self.send(Method::GET, url, None).await?;
        match status {
            StatusCode::OK => Ok(Some(Self::parse_pr(&text)?)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error("find PR", s, &text)),
        }
    }

    async fn get_pr(
        &self,
        repo: &RepoName,
        number: u64,
    ) -> Result<Option<PullRequest>, ForgeError> {
        let n = number.to_string();
        let url = self.api_url(repo, &["pulls", &n])?;
        let (status, text) = self.send(Method::GET, url, None).await?;
        match status {
            StatusCode::OK => Ok(Some(Self::parse_pr(&text)?)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error("get PR", s, &text)),
        }
    }

    #[tracing::instrument(skip_all, fields(repo = %repo, number, head_sha))]
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
        let n = number.to_string();
        let url = self.api_url(repo, &["pulls", &n, "merge"])?;
        // `Do` matches `do` too: Go decodes JSON keys case-insensitively (1.22 and 1.27).
        let payload = serde_json::json!({ "Do": "merge", "head_commit_id": head_sha });
        let (status, text) = self.send(Method::POST, url, Some(payload)).await?;
        // A merge API is not always idempotent: every answer but a clean 200 is read against
        // the PR as it is now.
        let reread = || async {
            self.get_pr(repo, number)
                .await?
                .ok_or_else(|| ForgeError::NotFound(format!("PR #{number} of {repo}")))
        };
        match status {
            StatusCode::OK | StatusCode::CREATED => {
                let pr = reread().await.ok();
                Ok(MergeOutcome::Merged {
                    merge_sha: pr.and_then(|p| p.merge_sha),
                })
            }
            StatusCode::METHOD_NOT_ALLOWED => {
                let pr = reread().await?;
                if pr.merged {
                    Ok(MergeOutcome::AlreadyMerged {
                        merge_sha: pr.merge_sha,
                    })
                } else {
                    Ok(MergeOutcome::NotMergeable {
                        reason: message_of(&text),
                    })
                }
            }
            StatusCode::CONFLICT => {
                let pr = reread().await?;
                if pr.merged {
                    Ok(MergeOutcome::AlreadyMerged {
                        merge_sha: pr.merge_sha,
                    })
                } else if pr.head_sha != head_sha {
                    Ok(MergeOutcome::HeadMoved {
                        expected: head_sha.to_owned(),
                        actual: pr.head_sha,
                    })
                } else {
                    Ok(MergeOutcome::Conflicts {
                        detail: message_of(&text),
                    })
                }
            }
            // 404: missing, or closed without a merge.
            StatusCode::NOT_FOUND => match self.get_pr(repo, number).await? {
                Some(pr) if pr.merged => Ok(MergeOutcome::AlreadyMerged {
                    merge_sha: pr.merge_sha,
                }),
                Some(pr) if pr.state == PrState::Closed => Ok(MergeOutcome::Closed),
                Some(_) => Err(ForgeError::Protocol(format!(
                    "merge of open PR #{number} answered 404"
                ))),
                None => Err(ForgeError::NotFound(format!("PR #{number} of {repo}"))),
            },
            s => Err(status_error("merge PR", s, &text)),
        }
    }

    async fn read_file(
        &self,
        repo: &RepoName,
        git_ref: &str,
        path: &str,
    ) -> Result<Option<String>, ForgeError> {
        validate_ref(git_ref)?;
        validate_path(path)?;
        let mut segments = vec!["raw"];
        segments.extend(path.split('/'));
        let mut url = self.api_url(repo, &segments)?;
        url.query_pairs_mut().append_pair("ref", git_ref);
        let (status, text) = self.send(Method::GET, url, None).await?;
        match status {
            StatusCode::OK => Ok(Some(text)),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error("read file", s, &text)),
        }
    }

    async fn list_pr_reviews(
        &self,
        repo: &RepoName,
        number: u64,
    ) -> Result<Vec<PrReview>, ForgeError> {
        let n = number.to_string();
        let mut out = Vec::new();
        for page in 1..=MAX_PAGES {
            let mut url = self.api_url(repo, &["pulls", &n, "reviews"])?;
            url.query_pairs_mut()
                .append_pair("page", &page.to_string())
                .append_pair("limit", &PAGE_LIMIT.to_string());
            let (status, text) = self.send(Method::GET, url, None).await?;
            if status != StatusCode::OK {
                return Err(status_error("list PR reviews", status, &text));
            }
            let batch: Vec<GiteaReview> = serde_json::from_str(&text)
                .map_err(|e| ForgeError::Protocol(format!("PR reviews: {e}")))?;
            let full = batch.len() >= PAGE_LIMIT;
            // A state we do not know (a newer Gitea's) is left out rather than guessed.
            out.extend(batch.into_iter().filter_map(|r| {
                Some(PrReview {
                    state: ReviewState::from_gitea(&r.state)?,
                    id: r.id,
                    author: r.user.unwrap_or_default().login,
                    body: r.body,
                    commit_id: r.commit_id,
                    dismissed: r.dismissed,
                    stale: r.stale,
                    submitted_at: r.submitted_at,
                })
            }));
            if !full {
                break;
            }
        }
        Ok(out)
    }

    async fn list_review_comments(
        &self,
        repo: &RepoName,
        number: u64,
        review_id: u64,
    ) -> Result<Vec<ReviewComment>, ForgeError> {
        let (n, id) = (number.to_string(), review_id.to_string());
        let url = self.api_url(repo, &["pulls", &n, "reviews", &id, "comments"])?;
        let (status, text) = self.send(Method::GET, url, None).await?;
        if status != StatusCode::OK {
            return Err(status_error("list review comments", status, &text));
        }
        let comments: Vec<GiteaReviewComment> = serde_json::from_str(&text)
            .map_err(|e| ForgeError::Protocol(format!("review comments: {e}")))?;
        Ok(comments
            .into_iter()
            .map(|c| ReviewComment {
                author: c.user.unwrap_or_default().login,
                path: c.path,
                line: if c.position > 0 {
                    c.position
                } else {
                    c.original_position
                },
                body: c.body,
            })
            .collect())
    }

    async fn combined_status(
        &self,
        repo: &RepoName,
        git_ref: &str,
    ) -> Result<CombinedStatus, ForgeError> {
        validate_ref(git_ref)?;
        let mut segments = vec!["commits"];
        segments.extend(git_ref.split('/'));
        segments.push("status");
        let mut url = self.api_url(repo, &segments)?;
        url.query_pairs_mut()
            .append_pair("limit", &PAGE_LIMIT.to_string());
        let (status, text) = self.send(Method::GET, url, None).await?;
        if status != StatusCode::OK {
            return Err(status_error("combined commit status", status, &text));
        }
        let c: GiteaCombinedStatus = serde_json::from_str(&text)
            .map_err(|e| ForgeError::Protocol(format!("combined status: {e}")))?;
        let statuses: Vec<CommitStatus> = c
            .statuses
            .into_iter()
            .map(|s| CommitStatus {
                state: CiState::from_gitea(&s.status),
                context: s.context,
                description: s.description,
                target_url: s.target_url,
            })
            .collect();
        // No context reported yet: Gitea leaves the state empty; nothing has passed.
        let state = if statuses.is_empty() {
            CiState::Pending
        } else {
            CiState::from_gitea(&c.state)
        };
        Ok(CombinedStatus {
            sha: c.sha,
            state,
            statuses,
        })
    }

    fn pr_url(&self, repo: &RepoName, number: u64) -> String {
        format!("{}/{repo}/pulls/{number}", self.config.public_url)
    }

    fn file_url(&self, repo: &RepoName, branch: &str, path: &str) -> String {
        format!(
            "{}/{repo}/src/branch/{branch}/{path}",
            self.config.public_url
        )
    }

    fn clone_url(&self, repo: &RepoName) -> String {
        format!("{}/{repo}.git", self.config.base_url)
    }

    fn git_auth_env(&self) -> Vec<(String, orchestrator_kit::Secret)> {
        use orchestrator_kit::Secret;
        match &self.config.token {
            Some(token) => vec![
                ("GIT_CONFIG_COUNT".to_owned(), Secret::new("1")),
                (
                    "GIT_CONFIG_KEY_0".to_owned(),
                    Secret::new("http.extraHeader"),
                ),
                (
                    "GIT_CONFIG_VALUE_0".to_owned(),
                    Secret::new(format!("Authorization: token {}", token.expose())),
                ),
            ],
            None => Vec::new(),
        }
    }
}
