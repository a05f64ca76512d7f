//! The tracker — where work items, comments and states live — behind one trait.
//!
//! - [`plane::PlaneTracker`]: Plane's REST API v1 (`X-API-Key`), as described in
//!   `shared/contracts/plane-notes.md`. A comment is posted under the bot token of its
//!   author's role (`PLANE_BOT_TOKEN_<ROLE>`); an unknown or empty role, or a role without a
//!   token, falls back to the shared `PLANE_API_TOKEN`. Reads and state changes always use
//!   the shared token.
//! - [`local::LocalTracker`]: comments and states kept in a database, for a user without
//!   Plane. Its tables belong to stage-engine (its migrations create them), and only
//!   stage-engine builds one; other processes post through `StageEngine.AddComment`.

pub mod config;
pub mod intake;
pub mod local;
pub mod plane;

use async_trait::async_trait;
pub use config::{TrackerConfig, TrackerKind};

/// The roles that may have their own bot account, as spelled in `PLANE_BOT_TOKEN_<ROLE>`
/// (upper case there, lower case everywhere else).
pub const ROLES: [&str; 7] = [
    "analyst",
    "architect",
    "developer",
    "reviewer",
    "tester",
    "deployer",
    "stream",
];

/// Returns whether `name` is one of [`ROLES`] (any case).
pub fn is_role(name: &str) -> bool {
    ROLES.iter().any(|r| r.eq_ignore_ascii_case(name.trim()))
}

/// Where an issue lives in the tracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IssueRef {
    /// Plane's project uuid (`local` for the local tracker).
    pub project_id: String,
    pub issue_id: String,
}

/// A workflow state of a project.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    pub id: String,
    pub name: String,
    /// backlog | unstarted | started | completed | cancelled | triage
    pub group: String,
}

/// A label as an issue carries it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Label {
    pub id: String,
    pub name: String,
}

/// An issue as a listing reads it (for reconciliation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub id: String,
    pub project_id: String,
    /// Its number in its project (`PROJ-<sequence_id>`).
    pub sequence_id: u64,
    pub name: String,
    /// The description as HTML.
    pub description: String,
    /// Its workflow state (`None` when the tracker gave none).
    pub state: Option<State>,
    pub labels: Vec<Label>,
}

impl Issue {
    /// Returns whether a human closed it: its state is in the `cancelled` or `completed`
    /// group.
    pub fn is_closed(&self) -> bool {
        self.state
            .as_ref()
            .is_some_and(|s| matches!(s.group.as_str(), "cancelled" | "completed"))
    }
}

/// A comment as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comment {
    pub id: String,
    pub html: String,
    /// Who posted it (Plane: the user id behind the token; local: the role).
    pub author: String,
    pub external_id: Option<String>,
    /// Who posted it through the API (`orchestrator` for our own comments, see
    /// `orchestrator_kit::COMMENT_EXTERNAL_SOURCE`); `None` for a person's.
    pub external_source: Option<String>,
    pub created_at: String,
}

/// The answer of [`Tracker::add_comment`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommentPosted {
    /// The new comment's id; `None` when it had been posted before.
    pub id: Option<String>,
    /// True when a comment with the same idempotency key already existed: nothing was added.
    pub duplicate: bool,
}

/// Why a tracker call gave no answer. [`TrackerError::is_transient`] tells what to retry.
#[derive(Debug, thiserror::Error)]
pub enum TrackerError {
    #[error("not found: {0}")]
    NotFound(String),
    /// Down, timing out, 5xx or 429: the same call may succeed later.
    #[error("tracker unavailable: {0}")]
    Unavailable(String),
    #[error("tracker refused ({status}): {message}")]
    Rejected { status: u16, message: String },
    #[error("tracker answered something unexpected: {0}")]
    Protocol(String),
    #[error("local tracker storage: {0}")]
    Storage(#[from] sqlx::Error),
}

impl TrackerError {
    /// Returns whether retrying the same call later can help.
    pub fn is_transient(&self) -> bool {
        matches!(self, TrackerError::Unavailable(_))
    }
}

/// A tracker.
#[cfg_attr(any(test, feature = "mock"), mockall::automock)]
#[async_trait]
pub trait Tracker: Send + Sync + 'static {
    /// `plane` or `local`.
    fn kind(&self) -> TrackerKind;

    /// Finds the issue of a human key such as `ORCH-65`.
    async fn find_issue(&self, key: &str) -> Result<Option<IssueRef>, TrackerError>;

    /// Returns the identifier of a project (the `PROJ` of `PROJ-42`), as the tracker
    /// spells it. A project it does not know is [`TrackerError::NotFound`].
    async fn project_identifier(&self, project_id: &str) -> Result<String, TrackerError>;

    /// Posts `html` on `issue` as `author` (a role: its bot token is used when it has one).
    /// A non-empty `idempotency_key` makes a repeated post a no-op (`duplicate: true`).
    async fn add_comment(
        &self,
        issue: &IssueRef,
        html: &str,
        author: &str,
        idempotency_key: &str,
    ) -> Result<CommentPosted, TrackerError>;

    /// Lists an issue's comments, oldest first.
    async fn list_comments(&self, issue: &IssueRef) -> Result<Vec<Comment>, TrackerError>;

    /// Lists a project's workflow states.
    async fn list_states(&self, project_id: &str) -> Result<Vec<State>, TrackerError>;

    /// Moves `issue` to the state `state_id`.
    async fn set_state(&self, issue: &IssueRef, state_id: &str) -> Result<(), TrackerError>;

    /// Lists every issue of a project (all pages), with its state and labels.
    async fn list_issues(&self, project_id: &str) -> Result<Vec<Issue>, TrackerError>;

    /// Returns one issue, or `None` when it no longer exists (deleted).
    async fn get_issue(&self, issue: &IssueRef) -> Result<Option<Issue>, TrackerError>;
}

/// Returns the human key of an issue from its project and its number in that project:
/// `<project identifier>-<sequence_id>`, e.g. `PROJ-42`. The caller validates it before it
/// reaches git or a path (the identifier comes from outside).
pub async fn issue_key(
    tracker: &dyn Tracker,
    project_id: &str,
    sequence_id: u64,
) -> Result<String, TrackerError> {
    let identifier = tracker.project_identifier(project_id).await?;
    Ok(format!("{identifier}-{sequence_id}"))
}

/// Picks the terminal Done state: the `completed` group, preferring one named "Done".
pub fn done_state(states: &[State]) -> Option<&State> {
    let completed = || states.iter().filter(|s| s.group == "completed");
    completed()
        .find(|s| s.name.eq_ignore_ascii_case("done"))
        .or_else(|| completed().next())
}

/// Moves `issue` to its project's terminal Done state; returns that state.
pub async fn move_to_done(tracker: &dyn Tracker, issue: &IssueRef) -> Result<State, TrackerError> {
    let states = tracker.list_states(&issue.project_id).await?;
    let done = done_state(&states).cloned().ok_or_else(|| {
        TrackerError::Protocol(format!(
            "project {} has no state in the completed group",
            issue.project_id
        ))
    })?;
    tracker.set_state(issue, &done.id).await?;
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn st(id: &str, name: &str, group: &str) -> State {
        State {
            id: id.into(),
            name: name.into(),
            group: group.into(),
        }
    }

    #[test]
    fn the_done_state_is_the_completed_group() {
        let states = vec![
            st("1", "Backlog", "backlog"),
            st("2", "Shipped", "completed"),
            st("3", "Done", "completed"),
            st("4", "Cancelled", "cancelled"),
        ];
        assert_eq!(done_state(&states).map(|s| s.id.as_str()), Some("3"));
        assert_eq!(done_state(&states[..2]).map(|s| s.id.as_str()), Some("2"));
        assert_eq!(done_state(&[st("4", "Done", "cancelled")]), None);
    }

    #[test]
    fn roles_are_matched_in_any_case() {
        assert!(is_role("Reviewer"));
        assert!(is_role("stream"));
        assert!(!is_role("ada"));
        assert!(!is_role(""));
    }

    #[tokio::test]
    async fn an_issue_key_is_the_project_identifier_and_the_sequence_id() {
        let mut t = MockTracker::new();
        t.expect_project_identifier()
            .withf(|p| p == "proj")
            .times(1)
            .returning(|_| Ok("PROJ".to_owned()));
        assert_eq!(issue_key(&t, "proj", 42).await.expect("key"), "PROJ-42");
        let mut down = MockTracker::new();
        down.expect_project_identifier()
            .returning(|_| Err(TrackerError::Unavailable("HTTP 503".into())));
        assert!(
            issue_key(&down, "proj", 42)
                .await
                .expect_err("down")
                .is_transient()
        );
    }

    #[tokio::test]
    async fn move_to_done_lists_then_sets() {
        let mut t = MockTracker::new();
        t.expect_list_states()
            .withf(|p| p == "proj")
            .times(1)
            .returning(|_| Ok(vec![st("d", "Done", "completed")]));
        t.expect_set_state()
            .withf(|i, s| i.issue_id == "iss" && s == "d")
            .times(1)
            .returning(|_, _| Ok(()));
        let issue = IssueRef {
            project_id: "proj".into(),
            issue_id: "iss".into(),
        };
        assert_eq!(move_to_done(&t, &issue).await.expect("done").id, "d");
    }
}
