//! Plane's REST API v1, as described in `shared/contracts/plane-notes.md`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use reqwest::{Method, StatusCode};
use serde::Deserialize;

use crate::config::{PlaneConfig, TrackerKind};
use crate::{Comment, CommentPosted, IssueRef, State, Tracker, TrackerError};

/// The `external_source` of every comment we post; with `external_id` it makes a repeated
/// post answer 409 instead of adding a second comment.
pub const EXTERNAL_SOURCE: &str = orchestrator_kit::COMMENT_EXTERNAL_SOURCE;

/// A Plane workspace.
#[derive(Debug, Clone)]
pub struct PlaneTracker {
    config: PlaneConfig,
    http: reqwest::Client,
    /// Project id -> identifier, learned once per project: every new work item of a
    /// project needs it, and it is one GET that need not be repeated (see
    /// [`Tracker::project_identifier`]). Shared by the clones.
    identifiers: Arc<Mutex<HashMap<String, String>>>,
}

#[derive(Debug, Deserialize)]
struct WorkItem {
    id: String,
    project: String,
}

/// The part of a project (ProjectSerializer) we read.
/// A work item with `?expand=state,labels`: the state as a StateLite, labels as objects.
#[derive(Debug, Deserialize)]
struct ExpandedWorkItem {
    id: String,
    project: String,
    #[serde(default)]
    sequence_id: u64,
    #[serde(default)]
    name: String,
    #[serde(default)]
    description_html: Option<String>,
    #[serde(default)]
    state: Option<PlaneState>,
    #[serde(default)]
    labels: Vec<PlaneLabel>,
}

#[derive(Debug, Deserialize)]
struct PlaneLabel {
    id: String,
    #[serde(default)]
    name: String,
}

impl From<ExpandedWorkItem> for crate::Issue {
    fn from(w: ExpandedWorkItem) -> Self {
        crate::Issue {
            id: w.id,
            project_id: w.project,
            sequence_id: w.sequence_id,
            name: w.name,
            description: w.description_html.unwrap_or_default(),
            state: w.state.map(|s| State {
                id: s.id,
                name: s.name,
                group: s.group,
            }),
            labels: w
                .labels
                .into_iter()
                .map(|l| crate::Label {
                    id: l.id,
                    name: l.name,
                })
                .collect(),
        }
    }
}

/// The `expand` that gives an issue's state and labels by name.
const EXPAND: &str = "state,labels";

#[derive(Debug, Deserialize)]
struct Project {
    identifier: String,
}

#[derive(Debug, Deserialize)]
struct Page<T> {
    results: Vec<T>,
    #[serde(default)]
    next_cursor: Option<String>,
    #[serde(default)]
    next_page_results: bool,
}

#[derive(Debug, Deserialize)]
struct PlaneState {
    id: String,
    name: String,
    group: String,
}

#[derive(Debug, Deserialize)]
struct PlaneComment {
    id: String,
    #[serde(default)]
    comment_html: String,
    #[serde(default)]
    created_by: Option<String>,
    #[serde(default)]
    external_id: Option<String>,
    #[serde(default)]
    external_source: Option<String>,
    #[serde(default)]
    created_at: String,
}

#[derive(Debug, Deserialize)]
struct Created {
    id: String,
}

fn detail_of(body: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
    let m = v
        .get("detail")
        .or_else(|| v.get("error"))
        .and_then(|m| m.as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| body.to_owned());
    m.chars().take(300).collect()
}

fn status_error(what: &str, status: StatusCode, body: &str) -> TrackerError {
    if status.is_server_error()
        || status == StatusCode::TOO_MANY_REQUESTS
        || status == StatusCode::REQUEST_TIMEOUT
    {
        TrackerError::Unavailable(format!("{what}: HTTP {}", status.as_u16()))
    } else if status == StatusCode::NOT_FOUND {
        TrackerError::NotFound(format!("{what}: {}", detail_of(body)))
    } else {
        TrackerError::Rejected {
            status: status.as_u16(),
            message: format!("{what}: {}", detail_of(body)),
        }
    }
}

fn transport(e: reqwest::Error) -> TrackerError {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    TrackerError::Unavailable(format!("{kind}: {}", e.without_url()))
}

/// Checks an id that goes into a URL path: Plane's ids are uuids; we accept letters, digits
/// and dashes.
fn path_id<'a>(what: &str, id: &'a str) -> Result<&'a str, TrackerError> {
    if !id.is_empty()
        && id.len() <= 100
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        && !id.starts_with('-')
    {
        Ok(id)
    } else {
        Err(TrackerError::Rejected {
            status: 400,
            message: format!("{what} '{}' is not a valid id", id.escape_debug()),
        })
    }
}

impl PlaneTracker {
    pub fn new(config: PlaneConfig) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .user_agent("orchestrator")
            .build()?;
        Ok(PlaneTracker {
            config,
            http,
            identifiers: Arc::default(),
        })
    }

    /// `{base}/api/v1/workspaces/{slug}/` + `segments` + `/` (every Plane route ends with `/`).
    fn url(&self, segments: &[&str]) -> Result<reqwest::Url, TrackerError> {
        let mut url = reqwest::Url::parse(&format!("{}/api/v1/", self.config.base_url))
            .map_err(|e| TrackerError::Protocol(format!("PLANE_BASE_URL: {e}")))?;
        {
            let mut path = url.path_segments_mut().map_err(|()| {
                TrackerError::Protocol("PLANE_BASE_URL cannot be a base".to_owned())
            })?;
            path.pop_if_empty()
                .extend(["workspaces", self.config.workspace_slug.as_str()])
                .extend(segments)
                .push("");
        }
        Ok(url)
    }

    fn issue_url(&self, issue: &IssueRef, tail: &[&str]) -> Result<reqwest::Url, TrackerError> {
        let mut segments = vec![
            "projects",
            path_id("project id", &issue.project_id)?,
            "work-items",
            path_id("issue id", &issue.issue_id)?,
        ];
        segments.extend(tail);
        self.url(&segments)
    }

    async fn send(
        &self,
        method: Method,
        url: reqwest::Url,
        token: &orchestrator_kit::Secret,
        body: Option<serde_json::Value>,
    ) -> Result<(StatusCode, String), TrackerError> {
        let mut req = self
            .http
            .request(method, url)
            .header("X-API-Key", token.expose());
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.map_err(transport)?;
        let status = resp.status();
        let text = resp.text().await.map_err(transport)?;
        Ok((status, text))
    }

    fn decode<T: serde::de::DeserializeOwned>(what: &str, body: &str) -> Result<T, TrackerError> {
        serde_json::from_str(body).map_err(|e| TrackerError::Protocol(format!("{what}: {e}")))
    }
}

#[async_trait]
impl Tracker for PlaneTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Plane
    }

    async fn find_issue(&self, key: &str) -> Result<Option<IssueRef>, TrackerError> {
        // `{IDENT}-{SEQ}`: the route splits at the last '-'.
        let Some((ident, seq)) = key.rsplit_once('-') else {
            return Err(TrackerError::Rejected {
                status: 400,
                message: format!("'{}' is not a key like ORCH-65", key.escape_debug()),
            });
        };
        path_id("key", ident)?;
        if seq.is_empty() || !seq.chars().all(|c| c.is_ascii_digit()) {
            return Err(TrackerError::Rejected {
                status: 400,
                message: format!("'{}' is not a key like ORCH-65", key.escape_debug()),
            });
        }
        let url = self.url(&["work-items", key])?;
        let (status, text) = self
            .send(Method::GET, url, &self.config.api_token, None)
            .await?;
        match status {
            StatusCode::OK => {
                let w: WorkItem = Self::decode("a work item", &text)?;
                Ok(Some(IssueRef {
                    project_id: w.project,
                    issue_id: w.id,
                }))
            }
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error("find work item", s, &text)),
        }
    }

    /// `GET /api/v1/workspaces/{slug}/projects/{project_id}/`, once per project: a renamed
    /// identifier is seen after a restart (existing work items keep their keys anyway).
    async fn project_identifier(&self, project_id: &str) -> Result<String, TrackerError> {
        let project_id = path_id("project id", project_id)?;
        if let Some(known) = self
            .identifiers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(project_id)
        {
            return Ok(known.clone());
        }
        let url = self.url(&["projects", project_id])?;
        let (status, text) = self
            .send(Method::GET, url, &self.config.api_token, None)
            .await?;
        if status != StatusCode::OK {
            return Err(status_error(
                &format!("get project {project_id}"),
                status,
                &text,
            ));
        }
        let project: Project = Self::decode("a project", &text)?;
        tracing::info!(
            project_id,
            identifier = project.identifier,
            "plane project identifier learned"
        );
        self.identifiers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(project_id.to_owned(), project.identifier.clone());
        Ok(project.identifier)
    }

    #[tracing::instrument(skip_all, fields(issue = %issue.issue_id, author))]
    async fn add_comment(
        &self,
        issue: &IssueRef,
        html: &str,
        author: &str,
        idempotency_key: &str,
    ) -> Result<CommentPosted, TrackerError> {
        let url = self.issue_url(issue, &["comments"])?;
        let (token, own) = self.config.token_for(author);
        tracing::debug!(bot_token = own, "posting a comment");
        let mut body = serde_json::json!({ "comment_html": html });
        if !idempotency_key.is_empty() {
            body["external_source"] = EXTERNAL_SOURCE.into();
            body["external_id"] = idempotency_key.into();
        }
        let (status, text) = self.send(Method::POST, url, token, Some(body)).await?;
        match status {
            StatusCode::CREATED | StatusCode::OK => {
                let c: Created = Self::decode("a comment", &text)?;
                Ok(CommentPosted {
                    id: Some(c.id),
                    duplicate: false,
                })
            }
            // Same external_id + external_source: posted before (a redelivery).
            StatusCode::CONFLICT if !idempotency_key.is_empty() => Ok(CommentPosted {
                id: None,
                duplicate: true,
            }),
            s => Err(status_error("add comment", s, &text)),
        }
    }

    async fn list_comments(&self, issue: &IssueRef) -> Result<Vec<Comment>, TrackerError> {
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        // Bounded: 50 pages of 100 comments.
        for _ in 0..50 {
            let mut url = self.issue_url(issue, &["comments"])?;
            url.query_pairs_mut().append_pair("per_page", "100");
            if let Some(c) = &cursor {
                url.query_pairs_mut().append_pair("cursor", c);
            }
            let (status, text) = self
                .send(Method::GET, url, &self.config.api_token, None)
                .await?;
            if status != StatusCode::OK {
                return Err(status_error("list comments", status, &text));
            }
            let page: Page<PlaneComment> = Self::decode("a comment page", &text)?;
            out.extend(page.results.into_iter().map(|c| Comment {
                id: c.id,
                html: c.comment_html,
                author: c.created_by.unwrap_or_default(),
                external_id: c.external_id,
                external_source: c.external_source,
                created_at: c.created_at,
            }));
            match page.next_cursor {
                Some(next) if page.next_page_results => cursor = Some(next),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.created_at.cmp(&b.created_at));
        Ok(out)
    }

    async fn list_states(&self, project_id: &str) -> Result<Vec<State>, TrackerError> {
        let url = self.url(&["projects", path_id("project id", project_id)?, "states"])?;
        let (status, text) = self
            .send(Method::GET, url, &self.config.api_token, None)
            .await?;
        if status != StatusCode::OK {
            return Err(status_error("list states", status, &text));
        }
        let page: Page<PlaneState> = Self::decode("a state page", &text)?;
        Ok(page
            .results
            .into_iter()
            .map(|s| State {
                id: s.id,
                name: s.name,
                group: s.group,
            })
            .collect())
    }

    /// `GET .../projects/{id}/work-items/?expand=state,labels&per_page=100`, page after
    /// page as Plane's cursor says (`next_page_results`, `next_cursor`).
    async fn list_issues(&self, project_id: &str) -> Result<Vec<crate::Issue>, TrackerError> {
        let project_id = path_id("project id", project_id)?;
        let mut out = Vec::new();
        let mut cursor: Option<String> = None;
        // Bounded: 100 pages of 100 work items.
        for _ in 0..100 {
            let mut url = self.url(&["projects", project_id, "work-items"])?;
            url.query_pairs_mut()
                .append_pair("expand", EXPAND)
                .append_pair("per_page", "100");
            if let Some(c) = &cursor {
                url.query_pairs_mut().append_pair("cursor", c);
            }
            let (status, text) = self
                .send(Method::GET, url, &self.config.api_token, None)
                .await?;
            if status != StatusCode::OK {
                return Err(status_error("list work items", status, &text));
            }
            let page: Page<ExpandedWorkItem> = Self::decode("a work item page", &text)?;
            out.extend(page.results.into_iter().map(crate::Issue::from));
            match page.next_cursor {
                Some(next) if page.next_page_results => cursor = Some(next),
                _ => break,
            }
        }
        Ok(out)
    }

    async fn get_issue(&self, issue: &IssueRef) -> Result<Option<crate::Issue>, TrackerError> {
        let mut url = self.issue_url(issue, &[])?;
        url.query_pairs_mut().append_pair("expand", EXPAND);
        let (status, text) = self
            .send(Method::GET, url, &self.config.api_token, None)
            .await?;
        match status {
            StatusCode::OK => Ok(Some(
                Self::decode::<ExpandedWorkItem>("a work item", &text)?.into(),
            )),
            StatusCode::NOT_FOUND => Ok(None),
            s => Err(status_error("get work item", s, &text)),
        }
    }

    async fn set_state(&self, issue: &IssueRef, state_id: &str) -> Result<(), TrackerError> {
        let url = self.issue_url(issue, &[])?;
        let body = serde_json::json!({ "state": path_id("state id", state_id)? });
        let (status, text) = self
            .send(Method::PATCH, url, &self.config.api_token, Some(body))
            .await?;
        match status {
            StatusCode::OK => Ok(()),
            s => Err(status_error("set state", s, &text)),
        }
    }
}
