//! A fake Plane (open-source 1.3.1, REST API v1 and its webhooks) on 127.0.0.1:0, as
//! `shared/contracts/plane-notes.md` describes it:
//!
//! - every route under `/api/v1/workspaces/{slug}/`, ending with `/`; `X-API-Key` names the
//!   user (a missing key or an unknown one is 403 with Plane's `detail`);
//! - projects (list, get: `id` <-> `identifier`), states (the 5 default states of a new
//!   project), work items (list, create, get, PATCH, and by `IDENT-SEQ`), comments (list,
//!   POST 201, 409 on a repeated `external_id` + `external_source`), under `work-items/` and
//!   the legacy `issues/`; lists in Plane's paginated envelope (`per_page`, `cursor`);
//! - errors as Plane's views answer them (404 `error`, 400 field errors);
//! - webhooks: creating a work item or a comment (through the API or as a person, with
//!   [`FakePlane::create_issue`] / [`FakePlane::comment`]) and every changed field of a
//!   PATCH POSTs the contract payload — Python's `json.dumps` of it, signed with
//!   HMAC-SHA256 in `X-Plane-Signature`, with `X-Plane-Delivery` and `X-Plane-Event` — to
//!   the configured URL. Any answer counts as sent; [`FakePlane::redeliver`] sends the same
//!   bytes again under a new delivery id, as a Plane resend does.
//!
//! Everything is kept in memory and inspectable ([`FakePlane::with`], [`FakePlane::comments`]).
//! Faults ([`PlaneFaults`]) make it answer 503 as a Plane behind a proxy does when it is down.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use orchestrator_kit::time::{now_ms, rfc3339};
use serde_json::json;

use crate::json::{Json, object};
use crate::webhook::{self, Deliveries, Delivery, Hook, Outgoing, sample_json};

/// A Plane account; `token` is its API key, if it has one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    pub id: String,
    pub display_name: String,
    pub first_name: String,
    pub last_name: String,
    pub email: String,
    pub token: Option<String>,
}

/// A workflow state of a project.
#[derive(Debug, Clone, PartialEq)]
pub struct PlaneState {
    pub id: String,
    pub name: String,
    pub group: String,
    pub color: String,
    pub sequence: f64,
    pub default: bool,
}

/// A label of a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub id: String,
    pub name: String,
    pub color: String,
}

/// A project: `identifier` makes the work item keys (`IDENT-SEQ`).
#[derive(Debug, Clone, PartialEq)]
pub struct Project {
    pub id: String,
    pub identifier: String,
    pub name: String,
    pub states: Vec<PlaneState>,
    pub labels: Vec<Label>,
    pub created_by: String,
    next_sequence: u64,
}

impl Project {
    /// The state named `name` (any case).
    pub fn state(&self, name: &str) -> Option<&PlaneState> {
        self.states
            .iter()
            .find(|s| s.name.eq_ignore_ascii_case(name))
    }

    /// The label named `name` (any case).
    pub fn label(&self, name: &str) -> Option<&Label> {
        self.labels
            .iter()
            .find(|l| l.name.eq_ignore_ascii_case(name))
    }
}

/// A work item.
#[derive(Debug, Clone, PartialEq)]
pub struct Issue {
    pub id: String,
    pub project: String,
    pub sequence_id: u64,
    pub name: String,
    pub description_html: String,
    /// The state's id.
    pub state: String,
    pub labels: Vec<String>,
    pub assignees: Vec<String>,
    pub priority: String,
    pub created_by: String,
    pub updated_by: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
    pub completed_at_ms: Option<i64>,
    pub external_source: Option<String>,
    pub external_id: Option<String>,
}

/// A comment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comment {
    pub id: String,
    pub issue: String,
    pub project: String,
    pub comment_html: String,
    /// The user whose API key posted it (or who wrote it, for [`FakePlane::comment`]).
    pub created_by: String,
    pub external_source: Option<String>,
    pub external_id: Option<String>,
    pub created_at_ms: i64,
}

/// A comment as a test reads it: who wrote it, by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommentView {
    pub id: String,
    pub html: String,
    /// The author's display name.
    pub author: String,
    pub external_id: Option<String>,
}

/// Faults to inject.
#[derive(Debug, Clone, Default)]
pub struct PlaneFaults {
    /// Every API request answers 503 (an HTML page, as a proxy in front of a dead Plane).
    pub down: bool,
    /// The next comment POST is stored, then answered 503: the answer is "lost", as when
    /// Plane commits and the response never arrives. Applies before `down`.
    pub lose_next_comment_answer: bool,
    /// The next `n` API requests answer 503.
    pub fail_next: u32,
}

/// Everything the fake knows.
#[derive(Debug, Default)]
pub struct PlaneData {
    pub workspace_slug: String,
    pub workspace_id: String,
    pub users: Vec<User>,
    pub projects: Vec<Project>,
    pub issues: Vec<Issue>,
    pub comments: Vec<Comment>,
    pub hook: Option<Hook>,
    pub webhook_id: String,
    pub faults: PlaneFaults,
    /// Every API request: `METHOD path` and the display name of its key's user (or `-`).
    pub requests: Vec<String>,
    /// Requests that broke the contract (no key, unknown key, bad body): for `check`.
    pub errors: Vec<String>,
}

impl PlaneData {
    fn user_by_token(&self, token: &str) -> Option<&User> {
        self.users
            .iter()
            .find(|u| u.token.as_deref() == Some(token))
    }

    fn user(&self, id: &str) -> Option<&User> {
        self.users.iter().find(|u| u.id == id)
    }

    /// The project with this id.
    pub fn project(&self, id: &str) -> Option<&Project> {
        self.projects.iter().find(|p| p.id == id)
    }

    /// The work item with this id.
    pub fn issue(&self, id: &str) -> Option<&Issue> {
        self.issues.iter().find(|i| i.id == id)
    }
}

struct Inner {
    data: Mutex<PlaneData>,
    http: reqwest::Client,
    deliveries: Deliveries,
}

impl Inner {
    fn lock(&self) -> std::sync::MutexGuard<'_, PlaneData> {
        // A test that panicked while holding the lock must not hide its own failure.
        self.data.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A running fake Plane; stops when dropped.
pub struct FakePlane {
    /// `PLANE_BASE_URL`.
    pub url: String,
    pub addr: SocketAddr,
    inner: Arc<Inner>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for FakePlane {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// The five default states of a new project (plane-api-states-list.json), fresh ids.
fn default_states() -> Vec<PlaneState> {
    let sample = sample_json("plane-api-states-list.json");
    let Some(Json::Array(results)) = sample.get("results") else {
        panic!("plane-api-states-list.json has no results");
    };
    results
        .iter()
        .map(|s| PlaneState {
            id: new_id(),
            name: s
                .get("name")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_owned(),
            group: s
                .get("group")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_owned(),
            color: s
                .get("color")
                .and_then(Json::as_str)
                .unwrap_or_default()
                .to_owned(),
            sequence: match s.get("sequence") {
                Some(Json::Number(n)) => n.as_f64().unwrap_or(0.0),
                _ => 0.0,
            },
            default: matches!(s.get("default"), Some(Json::Bool(true))),
        })
        .collect()
}

fn user_lite(u: &User) -> Json {
    object([
        ("id", Json::from(&u.id)),
        ("first_name", Json::from(&u.first_name)),
        ("last_name", Json::from(&u.last_name)),
        ("email", Json::from(&u.email)),
        ("avatar", Json::from("")),
        ("avatar_url", Json::Null),
        ("display_name", Json::from(&u.display_name)),
    ])
}

fn time(ms: i64) -> Json {
    Json::from(rfc3339(ms))
}

fn state_json(ws: &str, project: &Project, s: &PlaneState) -> Json {
    let mut j = match sample_json("plane-api-states-list.json").get("results") {
        Some(Json::Array(r)) if !r.is_empty() => r[0].clone(),
        _ => panic!("plane-api-states-list.json has no results"),
    };
    j.set("id", &s.id)
        .set("name", &s.name)
        .set("color", &s.color)
        .set("sequence", serde_json::json!(s.sequence))
        .set("group", &s.group)
        .set("default", s.default)
        .set("created_by", &project.created_by)
        .set("project", &project.id)
        .set("workspace", ws);
    j
}

fn state_lite(s: &PlaneState) -> Json {
    object([
        ("id", Json::from(&s.id)),
        ("name", Json::from(&s.name)),
        ("color", Json::from(&s.color)),
        ("group", Json::from(&s.group)),
    ])
}

/// The text of `html`, tags dropped (Plane's `description_stripped`).
fn strip_tags(html: &str) -> String {
    let mut out = String::new();
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' => in_tag = false,
            c if !in_tag => out.push(c),
            _ => {}
        }
    }
    out
}

/// A project as `GET .../projects/{id}/` answers it. The notes name only `id` <->
/// `identifier`; the other keys are the Project model's common columns.
fn project_json(ws: &str, p: &Project) -> Json {
    let default_state = p.states.iter().find(|s| s.default).map(|s| s.id.clone());
    object([
        ("id", Json::from(&p.id)),
        ("created_at", time(0)),
        ("updated_at", time(0)),
        ("deleted_at", Json::Null),
        ("name", Json::from(&p.name)),
        ("description", Json::from("")),
        ("network", Json::from(2_u64)),
        ("identifier", Json::from(&p.identifier)),
        ("archived_at", Json::Null),
        ("external_source", Json::Null),
        ("external_id", Json::Null),
        ("created_by", Json::from(&p.created_by)),
        ("updated_by", Json::Null),
        ("workspace", Json::from(ws)),
        ("default_state", Json::from(default_state)),
    ])
}

/// A work item as the REST API answers it (IssueSerializer: plane-api-work-item.json).
fn issue_json(ws: &str, i: &Issue) -> Json {
    let mut j = sample_json("plane-api-work-item.json");
    fill_issue(&mut j, ws, i);
    j.set("state", &i.state)
        .set(
            "assignees",
            Json::Array(i.assignees.iter().map(Json::from).collect()),
        )
        .set(
            "labels",
            Json::Array(i.labels.iter().map(Json::from).collect()),
        );
    j
}

/// A work item as the REST API answers it with `?expand=`: `state` becomes a StateLite,
/// `labels` full Label objects (LabelSerializer), as plane-notes.md says; other keys of
/// `expand` are not served by the fake and stay ids.
fn issue_json_expanded(d: &PlaneData, i: &Issue, expand: &str) -> Json {
    let mut j = issue_json(&d.workspace_id, i);
    let wanted: Vec<&str> = expand.split(',').map(str::trim).collect();
    let project = d.project(&i.project);
    if wanted.contains(&"state") {
        let state = project
            .and_then(|p| p.states.iter().find(|s| s.id == i.state))
            .map_or(Json::Null, state_lite);
        j.set("state", state);
    }
    if wanted.contains(&"labels") {
        let labels = i
            .labels
            .iter()
            .filter_map(|id| project.and_then(|p| p.labels.iter().find(|l| l.id == *id)))
            .enumerate()
            .map(|(n, l)| label_json(&d.workspace_id, &i.project, l, n))
            .collect();
        j.set("labels", Json::Array(labels));
    }
    j
}

/// A label as LabelSerializer (`__all__`) answers it.
fn label_json(ws: &str, project: &str, l: &Label, n: usize) -> Json {
    object([
        ("id", Json::from(&l.id)),
        ("created_at", time(0)),
        ("updated_at", time(0)),
        ("deleted_at", Json::Null),
        ("name", Json::from(&l.name)),
        ("description", Json::from("")),
        ("color", Json::from(&l.color)),
        ("sort_order", Json::from(json!(65535.0 * (n as f64 + 1.0)))),
        ("external_source", Json::Null),
        ("external_id", Json::Null),
        ("created_by", Json::Null),
        ("updated_by", Json::Null),
        ("project", Json::from(project)),
        ("workspace", Json::from(ws)),
        ("parent", Json::Null),
    ])
}

fn fill_issue(j: &mut Json, ws: &str, i: &Issue) {
    j.set("id", &i.id)
        .set("created_at", time(i.created_at_ms))
        .set("updated_at", time(i.updated_at_ms))
        .set("name", &i.name)
        .set("description_html", &i.description_html)
        .set("priority", &i.priority)
        .set("start_date", Json::Null)
        .set("target_date", Json::Null)
        .set("sequence_id", i.sequence_id)
        .set("completed_at", i.completed_at_ms.map(time))
        .set("external_source", i.external_source.clone())
        .set("external_id", i.external_id.clone())
        .set("created_by", &i.created_by)
        .set("updated_by", i.updated_by.clone())
        .set("project", &i.project)
        .set("workspace", ws);
}

/// A work item as a webhook carries it (IssueExpandSerializer: the `data` of
/// plane-webhook-issue-created.json).
fn issue_expanded(d: &PlaneData, i: &Issue) -> Json {
    let mut j = sample_json("plane-webhook-issue-created.json")
        .get("data")
        .cloned()
        .expect("the sample has data");
    fill_issue(&mut j, &d.workspace_id, i);
    let project = d.project(&i.project);
    let labels = i
        .labels
        .iter()
        .filter_map(|id| project.and_then(|p| p.labels.iter().find(|l| l.id == *id)))
        .map(|l| {
            object([
                ("id", Json::from(&l.id)),
                ("name", Json::from(&l.name)),
                ("color", Json::from(&l.color)),
            ])
        })
        .collect();
    let assignees = i
        .assignees
        .iter()
        .filter_map(|id| d.user(id))
        .map(user_lite)
        .collect();
    let state = project
        .and_then(|p| p.states.iter().find(|s| s.id == i.state))
        .map_or(Json::Null, state_lite);
    j.set("labels", Json::Array(labels))
        .set("assignees", Json::Array(assignees))
        .set("state", state)
        .set("description_stripped", strip_tags(&i.description_html));
    j
}

fn comment_json(ws: &str, c: &Comment) -> Json {
    let mut j = sample_json("plane-api-comment-created.json");
    j.set("id", &c.id)
        .set("created_at", time(c.created_at_ms))
        .set("updated_at", time(c.created_at_ms))
        .set("comment_html", &c.comment_html)
        .set("external_source", c.external_source.clone())
        .set("external_id", c.external_id.clone())
        .set("created_by", &c.created_by)
        .set("project", &c.project)
        .set("workspace", ws)
        .set("issue", &c.issue)
        .set("actor", &c.created_by);
    j
}

/// The webhook envelope (keys in the order of webhook_task.py).
fn envelope(d: &PlaneData, event: &str, action: &str, data: Json, activity: Json) -> Json {
    object([
        ("event", Json::from(event)),
        ("action", Json::from(action)),
        ("webhook_id", Json::from(&d.webhook_id)),
        ("workspace_id", Json::from(&d.workspace_id)),
        ("data", data),
        ("activity", activity),
    ])
}

fn activity(field: Option<&str>, old: Json, new: Json, actor: Option<&User>) -> Json {
    object([
        ("field", Json::from(field)),
        ("new_value", new),
        ("old_value", old),
        ("actor", actor.map_or(Json::Null, user_lite)),
        ("old_identifier", Json::Null),
        ("new_identifier", Json::Null),
    ])
}

/// Builds the outgoing webhook for `payload`, if a hook is configured.
fn outgoing(d: &PlaneData, event: &str, what: String, payload: &Json) -> Option<Outgoing> {
    let hook = d.hook.as_ref()?;
    let body = payload.to_python().into_bytes();
    let mut headers = vec![
        ("Content-Type".to_owned(), "application/json".to_owned()),
        ("User-Agent".to_owned(), "Autopilot".to_owned()),
        (
            "X-Plane-Delivery".to_owned(),
            uuid::Uuid::now_v7().to_string(),
        ),
        ("X-Plane-Event".to_owned(), event.to_owned()),
    ];
    if let Some(secret) = &hook.secret {
        headers.push((
            "X-Plane-Signature".to_owned(),
            webhook::hmac_sha256_hex(secret.as_bytes(), &body),
        ));
    }
    Some(Outgoing {
        url: hook.url.clone(),
        id: headers[2].1.clone(),
        event: event.to_owned(),
        what,
        headers,
        body,
    })
}

/// What a person or a test asks the fake to create.
#[derive(Debug, Clone, Default)]
pub struct NewIssue {
    pub name: String,
    pub description_html: String,
    /// A state name; the project's default state when empty.
    pub state: String,
    /// Label names.
    pub labels: Vec<String>,
}

impl FakePlane {
    /// Serves an empty workspace `slug` on 127.0.0.1:0.
    pub async fn start(slug: &str) -> FakePlane {
        let data = PlaneData {
            workspace_slug: slug.to_owned(),
            workspace_id: new_id(),
            webhook_id: new_id(),
            ..PlaneData::default()
        };
        let inner = Arc::new(Inner {
            data: Mutex::new(data),
            http: reqwest::Client::new(),
            deliveries: Deliveries::default(),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local addr");
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(inner.clone());
        let task = tokio::spawn(async move {
            // Lives as long as the test holds the fake.
            let _ = axum::serve(listener, app).await;
        });
        FakePlane {
            url: format!("http://{addr}"),
            addr,
            inner,
            task,
        }
    }

    /// Adds an account; `token` is its API key (a bot's `PLANE_BOT_TOKEN_<ROLE>`, or
    /// `PLANE_API_TOKEN`).
    pub fn add_user(&self, display_name: &str, token: Option<&str>) -> User {
        let user = User {
            id: new_id(),
            display_name: display_name.to_owned(),
            first_name: display_name.to_owned(),
            last_name: String::new(),
            email: format!("{display_name}@example.com"),
            token: token.map(str::to_owned),
        };
        self.inner.lock().users.push(user.clone());
        user
    }

    /// Adds a project with Plane's five default states and an `orchestrator` label.
    pub fn add_project(&self, identifier: &str, name: &str) -> Project {
        let mut d = self.inner.lock();
        let project = Project {
            id: new_id(),
            identifier: identifier.to_owned(),
            name: name.to_owned(),
            states: default_states(),
            labels: vec![Label {
                id: new_id(),
                name: "orchestrator".to_owned(),
                color: "#3A86FF".to_owned(),
            }],
            created_by: d.users.first().map(|u| u.id.clone()).unwrap_or_default(),
            next_sequence: 1,
        };
        d.projects.push(project.clone());
        project
    }

    /// Where webhooks go from now on (`None`: nowhere).
    pub fn set_webhook(&self, hook: Option<Hook>) {
        self.inner.lock().hook = hook;
    }

    /// Reads or changes the fake's data (faults included).
    pub fn with<R>(&self, f: impl FnOnce(&mut PlaneData) -> R) -> R {
        f(&mut self.inner.lock())
    }

    /// Creates a work item in project `project_id` as `by` would in Plane's UI, and sends
    /// the `issue` `created` webhook (awaited: its answer is in the returned delivery).
    pub async fn create_issue(
        &self,
        project_id: &str,
        new: &NewIssue,
        by: &User,
    ) -> (Issue, Option<Delivery>) {
        let (issue, out) = {
            let mut d = self.inner.lock();
            let issue =
                create(&mut d, project_id, new, &by.id).expect("known project, state and labels");
            let payload = envelope(
                &d,
                "issue",
                "created",
                issue_expanded(&d, &issue),
                activity(None, Json::Null, Json::Null, Some(by)),
            );
            let out = outgoing(&d, "issue", "issue created".to_owned(), &payload);
            (issue, out)
        };
        let delivery = self.send(out).await;
        (issue, delivery)
    }

    /// Posts a comment on work item `issue_id` as `by` would in Plane's UI, and sends the
    /// `issue_comment` `created` webhook (awaited).
    pub async fn comment(
        &self,
        issue_id: &str,
        html: &str,
        by: &User,
    ) -> (Comment, Option<Delivery>) {
        let (comment, out) = {
            let mut d = self.inner.lock();
            let project = d.issue(issue_id).expect("known work item").project.clone();
            let comment = Comment {
                id: new_id(),
                issue: issue_id.to_owned(),
                project,
                comment_html: html.to_owned(),
                created_by: by.id.clone(),
                external_source: None,
                external_id: None,
                created_at_ms: now_ms(),
            };
            d.comments.push(comment.clone());
            let out = comment_webhook(&d, &comment);
            (comment, out)
        };
        let delivery = self.send(out).await;
        (comment, delivery)
    }

    /// Sends `delivery`'s bytes again, with its signature, under a new `X-Plane-Delivery`
    /// (Plane gives every send attempt a new one).
    pub async fn redeliver(&self, delivery: &Delivery) -> Delivery {
        let url = self
            .inner
            .lock()
            .hook
            .as_ref()
            .map(|h| h.url.clone())
            .expect("a webhook is configured");
        webhook::redeliver(
            &self.inner.http,
            &self.inner.deliveries,
            url,
            delivery,
            |k| k.eq_ignore_ascii_case("x-plane-delivery"),
        )
        .await
    }

    async fn send(&self, out: Option<Outgoing>) -> Option<Delivery> {
        match out {
            Some(out) => Some(webhook::send(&self.inner.http, &self.inner.deliveries, out).await),
            None => None,
        }
    }

    /// Every webhook sent so far, in order.
    pub fn deliveries(&self) -> Vec<Delivery> {
        self.inner
            .deliveries
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The comments of work item `issue_id`, oldest first, with their authors' names.
    pub fn comments(&self, issue_id: &str) -> Vec<CommentView> {
        let d = self.inner.lock();
        d.comments
            .iter()
            .filter(|c| c.issue == issue_id)
            .map(|c| CommentView {
                id: c.id.clone(),
                html: c.comment_html.clone(),
                author: d
                    .user(&c.created_by)
                    .map(|u| u.display_name.clone())
                    .unwrap_or_default(),
                external_id: c.external_id.clone(),
            })
            .collect()
    }

    /// A work item as it is now.
    pub fn issue(&self, issue_id: &str) -> Issue {
        self.inner
            .lock()
            .issue(issue_id)
            .cloned()
            .expect("known work item")
    }

    /// The name of work item `issue_id`'s state.
    pub fn state_name(&self, issue_id: &str) -> String {
        let d = self.inner.lock();
        let issue = d.issue(issue_id).expect("known work item");
        d.project(&issue.project)
            .and_then(|p| p.states.iter().find(|s| s.id == issue.state))
            .map(|s| s.name.clone())
            .unwrap_or_default()
    }

    /// The human key of a work item, `IDENT-SEQ`.
    pub fn key(&self, issue_id: &str) -> String {
        let d = self.inner.lock();
        let issue = d.issue(issue_id).expect("known work item");
        let ident = d
            .project(&issue.project)
            .map(|p| p.identifier.clone())
            .unwrap_or_default();
        format!("{ident}-{}", issue.sequence_id)
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
            "requests to the fake Plane broke the contract: {errors:#?}"
        );
    }
}

/// Creates a work item in `d`; `Err` is the 400 body.
fn create(
    d: &mut PlaneData,
    project_id: &str,
    new: &NewIssue,
    by: &str,
) -> Result<Issue, serde_json::Value> {
    let Some(project) = d.projects.iter_mut().find(|p| p.id == project_id) else {
        return Err(json!({"error": "The requested resource does not exist."}));
    };
    let state = if new.state.is_empty() {
        project
            .states
            .iter()
            .find(|s| s.default)
            .or(project.states.first())
    } else {
        project.state(&new.state)
    }
    .ok_or_else(|| json!({"error": "State is not valid please pass a valid state_id"}))?
    .id
    .clone();
    let labels = new
        .labels
        .iter()
        .map(|n| {
            project
                .label(n)
                .map(|l| l.id.clone())
                .ok_or_else(|| json!({"labels": [format!("Invalid label {n}")]}))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let now = now_ms();
    let issue = Issue {
        id: new_id(),
        project: project.id.clone(),
        sequence_id: project.next_sequence,
        name: new.name.clone(),
        description_html: new.description_html.clone(),
        state,
        labels,
        assignees: Vec::new(),
        priority: "none".to_owned(),
        created_by: by.to_owned(),
        updated_by: None,
        created_at_ms: now,
        updated_at_ms: now,
        completed_at_ms: None,
        external_source: None,
        external_id: None,
    };
    project.next_sequence += 1;
    d.issues.push(issue.clone());
    Ok(issue)
}

fn comment_webhook(d: &PlaneData, c: &Comment) -> Option<Outgoing> {
    let payload = envelope(
        d,
        "issue_comment",
        "created",
        comment_json(&d.workspace_id, c),
        activity(None, Json::Null, Json::Null, d.user(&c.created_by)),
    );
    outgoing(
        d,
        "issue_comment",
        "issue_comment created".to_owned(),
        &payload,
    )
}

// ------------------------------------------------------------------------------ the API

type Answer = (StatusCode, String);

fn answer(status: StatusCode, body: impl ToString) -> Answer {
    (status, body.to_string())
}

fn not_found() -> Answer {
    answer(
        StatusCode::NOT_FOUND,
        json!({"error": "The requested resource does not exist."}),
    )
}

/// `?per_page=&cursor=<per_page>:<page>:<is_prev>` over `items`, in Plane's envelope.
fn paginate(items: Vec<Json>, query: &[(String, String)]) -> Json {
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let mut per_page = get("per_page")
        .and_then(|v| v.parse::<usize>().ok())
        .unwrap_or(1000)
        .clamp(1, 1000);
    let mut page = 0_i64;
    if let Some(cursor) = get("cursor") {
        let parts: Vec<&str> = cursor.split(':').collect();
        if let [pp, p, _] = parts.as_slice() {
            per_page = pp.parse::<usize>().unwrap_or(per_page).clamp(1, 1000);
            page = p.parse::<i64>().unwrap_or(0).max(0);
        }
    }
    let total = items.len();
    let start = usize::try_from(page)
        .unwrap_or(0)
        .saturating_mul(per_page)
        .min(total);
    let end = (start + per_page).min(total);
    let results: Vec<Json> = items[start..end].to_vec();
    let count = results.len() as u64;
    object([
        ("grouped_by", Json::Null),
        ("sub_grouped_by", Json::Null),
        ("total_count", Json::from(total as u64)),
        (
            "next_cursor",
            Json::from(format!("{per_page}:{}:0", page + 1)),
        ),
        (
            "prev_cursor",
            Json::from(format!("{per_page}:{}:1", page - 1)),
        ),
        ("next_page_results", Json::from(end < total)),
        ("prev_page_results", Json::from(page > 0)),
        ("count", Json::from(count)),
        ("total_pages", Json::from(total.div_ceil(per_page) as u64)),
        ("total_results", Json::from(total as u64)),
        ("extra_stats", Json::Null),
        ("results", Json::Array(results)),
    ])
}

fn query_pairs(uri: &Uri) -> Vec<(String, String)> {
    let q = uri.query().unwrap_or_default();
    reqwest::Url::parse(&format!("http://x/?{q}"))
        .map(|u| {
            u.query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
        .unwrap_or_default()
}

async fn handle(
    State(inner): State<Arc<Inner>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let (status, text, outs) = api(&inner, &method, &uri, &headers, &body);
    for out in outs {
        // Plane sends from a Celery task, after the API has answered.
        let inner = inner.clone();
        tokio::spawn(async move { webhook::send(&inner.http, &inner.deliveries, out).await });
    }
    let ctype = if text.starts_with('<') {
        "text/html"
    } else {
        "application/json"
    };
    (status, [("content-type", ctype)], text).into_response()
}

/// One API request: the answer and the webhooks it causes.
fn api(
    inner: &Inner,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> (StatusCode, String, Vec<Outgoing>) {
    let mut d = inner.lock();
    let path = uri.path().to_owned();
    let token = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let user = d.user_by_token(&token).cloned();
    let who = user
        .as_ref()
        .map_or("-".to_owned(), |u| u.display_name.clone());
    d.requests.push(format!("{method} {path} {who}"));
    let lose = d.faults.lose_next_comment_answer
        && *method == Method::POST
        && path.ends_with("/comments/");
    if !lose && (d.faults.down || d.faults.fail_next > 0) {
        d.faults.fail_next = d.faults.fail_next.saturating_sub(1);
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "<html>503 Service Unavailable</html>".to_owned(),
            Vec::new(),
        );
    }
    if token.is_empty() {
        d.errors.push(format!("{method} {path} without X-API-Key"));
        let (s, t) = answer(
            StatusCode::FORBIDDEN,
            json!({"detail": "Authentication credentials were not provided."}),
        );
        return (s, t, Vec::new());
    }
    if user.is_none() {
        d.errors
            .push(format!("{method} {path} with an unknown X-API-Key"));
        let (s, t) = answer(
            StatusCode::FORBIDDEN,
            json!({"detail": "Given API token is not valid"}),
        );
        return (s, t, Vec::new());
    }
    if lose {
        d.faults.lose_next_comment_answer = false;
        // Stored (and its webhook sent); the answer never arrives.
        let (_, _, outs) = route(
            &mut d,
            method,
            &path,
            &query_pairs(uri),
            user.as_ref(),
            body,
        );
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "<html>503 Service Unavailable</html>".to_owned(),
            outs,
        );
    }
    route(
        &mut d,
        method,
        &path,
        &query_pairs(uri),
        user.as_ref(),
        body,
    )
}

fn route(
    d: &mut PlaneData,
    method: &Method,
    path: &str,
    query: &[(String, String)],
    user: Option<&User>,
    body: &[u8],
) -> (StatusCode, String, Vec<Outgoing>) {
    let plain = |(s, t): Answer| (s, t, Vec::new());
    let prefix = format!("/api/v1/workspaces/{}/", d.workspace_slug);
    let Some(rest) = path.strip_prefix(&prefix) else {
        return plain(not_found());
    };
    // Every route ends with '/'.
    let Some(rest) = rest.strip_suffix('/') else {
        return plain(not_found());
    };
    let parts: Vec<&str> = rest.split('/').collect();
    let ws = d.workspace_id.clone();
    let items = |p: &str| p == "work-items" || p == "issues";
    match (method.clone(), parts.as_slice()) {
        (Method::GET, ["projects"]) => {
            let list = d.projects.iter().map(|p| project_json(&ws, p)).collect();
            plain(answer(StatusCode::OK, paginate(list, query).to_python()))
        }
        (Method::GET, ["projects", pid]) => match d.project(pid) {
            Some(p) => plain(answer(StatusCode::OK, project_json(&ws, p).to_python())),
            None => plain(not_found()),
        },
        (Method::GET, ["projects", pid, "states"]) => match d.project(pid) {
            Some(p) => {
                let list = p.states.iter().map(|s| state_json(&ws, p, s)).collect();
                plain(answer(StatusCode::OK, paginate(list, query).to_python()))
            }
            None => plain(not_found()),
        },
        (Method::GET, ["projects", pid, "states", sid]) => {
            match d.project(pid).and_then(|p| {
                p.states
                    .iter()
                    .find(|s| s.id == *sid)
                    .map(|s| state_json(&ws, p, s))
            }) {
                Some(j) => plain(answer(StatusCode::OK, j.to_python())),
                None => plain(not_found()),
            }
        }
        (Method::GET, [kind, key]) if items(kind) => {
            // By human key: split at the last '-'.
            let found = key.rsplit_once('-').and_then(|(ident, seq)| {
                let seq: u64 = seq.parse().ok()?;
                let project = d.projects.iter().find(|p| p.identifier == ident)?;
                d.issues
                    .iter()
                    .find(|i| i.project == project.id && i.sequence_id == seq)
            });
            match found {
                Some(i) => plain(answer(StatusCode::OK, issue_json(&ws, i).to_python())),
                None => plain(not_found()),
            }
        }
        (Method::GET, ["projects", pid, kind]) if items(kind) => {
            if d.project(pid).is_none() {
                return plain(not_found());
            }
            let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
            let mut list: Vec<&Issue> = d.issues.iter().filter(|i| i.project == *pid).collect();
            if let (Some(eid), Some(src)) = (get("external_id"), get("external_source")) {
                // A single object instead of a page.
                return match list.iter().find(|i| {
                    i.external_id.as_deref() == Some(&eid)
                        && i.external_source.as_deref() == Some(&src)
                }) {
                    Some(i) => plain(answer(StatusCode::OK, issue_json(&ws, i).to_python())),
                    None => plain(not_found()),
                };
            }
            // Default order: newest first.
            list.sort_by_key(|i| std::cmp::Reverse((i.created_at_ms, i.sequence_id)));
            let expand = get("expand").unwrap_or_default();
            let list = list
                .into_iter()
                .map(|i| issue_json_expanded(d, i, &expand))
                .collect();
            plain(answer(StatusCode::OK, paginate(list, query).to_python()))
        }
        (Method::POST, ["projects", pid, kind]) if items(kind) => create_by_api(d, pid, user, body),
        (Method::GET, ["projects", pid, kind, id]) if items(kind) => {
            let expand = query
                .iter()
                .find(|(n, _)| n == "expand")
                .map(|(_, v)| v.as_str())
                .unwrap_or_default();
            match d.issue(id).filter(|i| i.project == *pid) {
                Some(i) => plain(answer(
                    StatusCode::OK,
                    issue_json_expanded(d, i, expand).to_python(),
                )),
                None => plain(not_found()),
            }
        }
        (Method::PATCH, ["projects", pid, kind, id]) if items(kind) => {
            patch(d, pid, id, user, body)
        }
        (Method::GET, ["projects", pid, kind, id, "comments"]) if items(kind) => {
            if d.issue(id).filter(|i| i.project == *pid).is_none() {
                return plain(not_found());
            }
            let list = d
                .comments
                .iter()
                .filter(|c| c.issue == *id)
                .map(|c| {
                    let mut j = comment_json(&ws, c);
                    j.set("is_member", true);
                    j
                })
                .collect();
            plain(answer(StatusCode::OK, paginate(list, query).to_python()))
        }
        (Method::POST, ["projects", pid, kind, id, "comments"]) if items(kind) => {
            add_comment(d, pid, id, user, body)
        }
        _ => plain(not_found()),
    }
}

fn parse_body(body: &[u8]) -> Option<Json> {
    std::str::from_utf8(body)
        .ok()
        .and_then(|t| Json::parse(t).ok())
        .filter(|j| matches!(j, Json::Object(_)))
}

fn create_by_api(
    d: &mut PlaneData,
    pid: &str,
    user: Option<&User>,
    body: &[u8],
) -> (StatusCode, String, Vec<Outgoing>) {
    let Some(b) = parse_body(body) else {
        d.errors
            .push("create work item: the body is not a JSON object".to_owned());
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": "The payload is not valid"}).to_string(),
            Vec::new(),
        );
    };
    let Some(name) = b
        .get("name")
        .and_then(Json::as_str)
        .filter(|n| !n.is_empty())
    else {
        return (
            StatusCode::BAD_REQUEST,
            json!({"name": ["This field is required."]}).to_string(),
            Vec::new(),
        );
    };
    let ext = (
        b.get("external_id")
            .and_then(Json::as_str)
            .map(str::to_owned),
        b.get("external_source")
            .and_then(Json::as_str)
            .map(str::to_owned),
    );
    if let (Some(eid), Some(src)) = &ext
        && let Some(dup) = d.issues.iter().find(|i| {
            i.project == pid
                && i.external_id.as_ref() == Some(eid)
                && i.external_source.as_ref() == Some(src)
        })
    {
        return (
            StatusCode::CONFLICT,
            json!({"error": "Issue with the same external id and external source already exists", "id": dup.id}).to_string(),
            Vec::new(),
        );
    }
    // The API takes a state id and label ids; NewIssue takes names.
    let state_id = b
        .get("state")
        .and_then(Json::as_str)
        .unwrap_or_default()
        .to_owned();
    let Some(project) = d.project(pid) else {
        return (StatusCode::NOT_FOUND, not_found().1, Vec::new());
    };
    let state = if state_id.is_empty() {
        String::new()
    } else {
        match project.states.iter().find(|s| s.id == state_id) {
            Some(s) => s.name.clone(),
            None => {
                return (
                    StatusCode::BAD_REQUEST,
                    json!({"error": "State is not valid please pass a valid state_id"}).to_string(),
                    Vec::new(),
                );
            }
        }
    };
    let labels = match b.get("labels") {
        Some(Json::Array(ids)) => ids
            .iter()
            .filter_map(Json::as_str)
            .filter_map(|id| {
                project
                    .labels
                    .iter()
                    .find(|l| l.id == id)
                    .map(|l| l.name.clone())
            })
            .collect(),
        _ => Vec::new(),
    };
    let new = NewIssue {
        name: name.to_owned(),
        description_html: b
            .get("description_html")
            .and_then(Json::as_str)
            .unwrap_or_default()
            .to_owned(),
        state,
        labels,
    };
    let by = user.map(|u| u.id.clone()).unwrap_or_default();
    match create(d, pid, &new, &by) {
        Ok(mut issue) => {
            issue.external_id = ext.0;
            issue.external_source = ext.1;
            if let Some(stored) = d.issues.iter_mut().find(|i| i.id == issue.id) {
                *stored = issue.clone();
            }
            let payload = envelope(
                d,
                "issue",
                "created",
                issue_expanded(d, &issue),
                activity(None, Json::Null, Json::Null, user),
            );
            let outs = outgoing(d, "issue", "issue created".to_owned(), &payload)
                .into_iter()
                .collect();
            (
                StatusCode::CREATED,
                issue_json(&d.workspace_id, &issue).to_python(),
                outs,
            )
        }
        Err(e) => (StatusCode::BAD_REQUEST, e.to_string(), Vec::new()),
    }
}

/// PATCH of a work item: one webhook per changed key of the body, named as the caller sent
/// it (`state` through REST v1), with the raw old and new values.
fn patch(
    d: &mut PlaneData,
    pid: &str,
    id: &str,
    user: Option<&User>,
    body: &[u8],
) -> (StatusCode, String, Vec<Outgoing>) {
    let Some(Json::Object(fields)) = parse_body(body) else {
        d.errors.push(format!(
            "PATCH work item {id}: the body is not a JSON object"
        ));
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": "The payload is not valid"}).to_string(),
            Vec::new(),
        );
    };
    let Some(project) = d.project(pid).cloned() else {
        return (StatusCode::NOT_FOUND, not_found().1, Vec::new());
    };
    let Some(before) = d.issue(id).filter(|i| i.project == pid).cloned() else {
        return (StatusCode::NOT_FOUND, not_found().1, Vec::new());
    };
    let mut after = before.clone();
    let mut changed: Vec<(String, Json, Json)> = Vec::new();
    for (key, value) in &fields {
        match key.as_str() {
            "state" => {
                let Some(state) = value
                    .as_str()
                    .and_then(|s| project.states.iter().find(|st| st.id == s))
                else {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"error": "State is not valid please pass a valid state_id"})
                            .to_string(),
                        Vec::new(),
                    );
                };
                if state.id != before.state {
                    changed.push((
                        key.clone(),
                        Json::from(&before.state),
                        Json::from(&state.id),
                    ));
                    after.state = state.id.clone();
                    after.completed_at_ms = (state.group == "completed").then(now_ms);
                }
            }
            "name" => {
                let Some(name) = value.as_str() else {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"name": ["Not a valid string."]}).to_string(),
                        Vec::new(),
                    );
                };
                if name != before.name {
                    changed.push((key.clone(), Json::from(&before.name), Json::from(name)));
                    after.name = name.to_owned();
                }
            }
            "description_html" => {
                let html = value.as_str().unwrap_or_default();
                if html != before.description_html {
                    changed.push((
                        key.clone(),
                        Json::from(&before.description_html),
                        Json::from(html),
                    ));
                    after.description_html = html.to_owned();
                }
            }
            "priority" => {
                let p = value.as_str().unwrap_or_default();
                if !["urgent", "high", "medium", "low", "none"].contains(&p) {
                    return (
                        StatusCode::BAD_REQUEST,
                        json!({"priority": [format!("\"{p}\" is not a valid choice.")]})
                            .to_string(),
                        Vec::new(),
                    );
                }
                if p != before.priority {
                    changed.push((key.clone(), Json::from(&before.priority), Json::from(p)));
                    after.priority = p.to_owned();
                }
            }
            // Other writable fields are accepted and not modelled.
            _ => {}
        }
    }
    after.updated_at_ms = now_ms();
    after.updated_by = user.map(|u| u.id.clone());
    if let Some(stored) = d.issues.iter_mut().find(|i| i.id == id) {
        *stored = after.clone();
    }
    let outs = changed
        .into_iter()
        .filter_map(|(field, old, new)| {
            let payload = envelope(
                d,
                "issue",
                "updated",
                issue_expanded(d, &after),
                activity(Some(&field), old, new, user),
            );
            outgoing(d, "issue", format!("issue updated {field}"), &payload)
        })
        .collect();
    (
        StatusCode::OK,
        issue_json(&d.workspace_id, &after).to_python(),
        outs,
    )
}

fn add_comment(
    d: &mut PlaneData,
    pid: &str,
    id: &str,
    user: Option<&User>,
    body: &[u8],
) -> (StatusCode, String, Vec<Outgoing>) {
    if d.issue(id).filter(|i| i.project == pid).is_none() {
        return (StatusCode::NOT_FOUND, not_found().1, Vec::new());
    }
    let Some(b) = parse_body(body) else {
        d.errors
            .push(format!("comment on {id}: the body is not a JSON object"));
        return (
            StatusCode::BAD_REQUEST,
            json!({"error": "The payload is not valid"}).to_string(),
            Vec::new(),
        );
    };
    let Some(html) = b.get("comment_html").and_then(Json::as_str) else {
        d.errors
            .push(format!("comment on {id} without comment_html"));
        return (
            StatusCode::BAD_REQUEST,
            json!({"comment_html": ["This field is required."]}).to_string(),
            Vec::new(),
        );
    };
    let eid = b
        .get("external_id")
        .and_then(Json::as_str)
        .map(str::to_owned);
    let src = b
        .get("external_source")
        .and_then(Json::as_str)
        .map(str::to_owned);
    if eid.is_some()
        && src.is_some()
        && let Some(dup) = d
            .comments
            .iter()
            .find(|c| c.issue == id && c.external_id == eid && c.external_source == src)
    {
        return (
            StatusCode::CONFLICT,
            json!({"error": "Issue Comment with the same external id and external source already exists", "id": dup.id}).to_string(),
            Vec::new(),
        );
    }
    let comment = Comment {
        id: new_id(),
        issue: id.to_owned(),
        project: pid.to_owned(),
        comment_html: html.to_owned(),
        created_by: user.map(|u| u.id.clone()).unwrap_or_default(),
        external_source: src,
        external_id: eid,
        created_at_ms: now_ms(),
    };
    d.comments.push(comment.clone());
    let outs = comment_webhook(d, &comment).into_iter().collect();
    // The 201 body has no is_member.
    (
        StatusCode::CREATED,
        comment_json(&d.workspace_id, &comment).to_python(),
        outs,
    )
}
