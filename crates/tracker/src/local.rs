//! The local tracker: issues, comments and states kept in stage-engine's database, for a
//! user without Plane. The tables (`tracker_issues`, `tracker_comments`) are created by
//! stage-engine's migrations; the project id of every local issue is `local`.

use async_trait::async_trait;
use orchestrator_kit::Db;
use orchestrator_kit::time::now_ms;
use sqlx::Row;

use crate::config::TrackerKind;
use crate::{Comment, CommentPosted, IssueRef, State, Tracker, TrackerError};

/// The project id of every local issue.
pub const LOCAL_PROJECT: &str = "local";

/// The local workflow: Plane's default states.
pub fn local_states() -> Vec<State> {
    [
        ("backlog", "Backlog", "backlog"),
        ("todo", "Todo", "unstarted"),
        ("in-progress", "In Progress", "started"),
        ("done", "Done", "completed"),
        ("cancelled", "Cancelled", "cancelled"),
    ]
    .into_iter()
    .map(|(id, name, group)| State {
        id: id.to_owned(),
        name: name.to_owned(),
        group: group.to_owned(),
    })
    .collect()
}

/// Comments and states in a database.
#[derive(Debug, Clone)]
pub struct LocalTracker {
    db: Db,
}

impl LocalTracker {
    pub fn new(db: Db) -> Self {
        LocalTracker { db }
    }

    /// Registers an issue (idempotent): a new work item's tracker side, in state In Progress.
    pub async fn register_issue(
        &self,
        issue_id: &str,
        key: &str,
    ) -> Result<IssueRef, TrackerError> {
        sqlx::query(
            "INSERT INTO tracker_issues (issue_id, key, state_id, updated_at_ms) \
             VALUES ($1, $2, 'in-progress', $3) ON CONFLICT (issue_id) DO NOTHING",
        )
        .bind(issue_id)
        .bind(key)
        .bind(now_ms())
        .execute(&self.db.pool)
        .await?;
        Ok(IssueRef {
            project_id: LOCAL_PROJECT.to_owned(),
            issue_id: issue_id.to_owned(),
        })
    }

    /// Returns an issue's current state id.
    pub async fn state_of(&self, issue_id: &str) -> Result<Option<String>, TrackerError> {
        let row = sqlx::query("SELECT state_id FROM tracker_issues WHERE issue_id = $1")
            .bind(issue_id)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row.map(|r| r.try_get("state_id")).transpose()?)
    }
}

#[async_trait]
impl Tracker for LocalTracker {
    fn kind(&self) -> TrackerKind {
        TrackerKind::Local
    }

    async fn find_issue(&self, key: &str) -> Result<Option<IssueRef>, TrackerError> {
        let row = sqlx::query("SELECT issue_id FROM tracker_issues WHERE key = $1")
            .bind(key)
            .fetch_optional(&self.db.pool)
            .await?;
        Ok(row
            .map(|r| r.try_get::<String, _>("issue_id"))
            .transpose()?
            .map(|issue_id| IssueRef {
                project_id: LOCAL_PROJECT.to_owned(),
                issue_id,
            }))
    }

    /// The local tracker has one project, `local`, and no identifier for it: its work items
    /// are created with their key.
    async fn project_identifier(&self, project_id: &str) -> Result<String, TrackerError> {
        Err(TrackerError::NotFound(format!(
            "the local tracker has no project '{}' to derive a key from; give the key (or set \
             PLANE_BASE_URL to use Plane)",
            project_id.escape_debug()
        )))
    }

    async fn add_comment(
        &self,
        issue: &IssueRef,
        html: &str,
        author: &str,
        idempotency_key: &str,
    ) -> Result<CommentPosted, TrackerError> {
        let id = uuid::Uuid::now_v7().to_string();
        let key = (!idempotency_key.is_empty()).then_some(idempotency_key);
        let done = sqlx::query(
            "INSERT INTO tracker_comments (id, issue_id, author, html, external_id, created_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (external_id) DO NOTHING",
        )
        .bind(&id)
        .bind(&issue.issue_id)
        .bind(author.trim())
        .bind(html)
        .bind(key)
        .bind(now_ms())
        .execute(&self.db.pool)
        .await?;
        Ok(if done.rows_affected() == 1 {
            CommentPosted {
                id: Some(id),
                duplicate: false,
            }
        } else {
            CommentPosted {
                id: None,
                duplicate: true,
            }
        })
    }

    async fn list_comments(&self, issue: &IssueRef) -> Result<Vec<Comment>, TrackerError> {
        let rows = sqlx::query(
            "SELECT id, author, html, external_id, created_at_ms FROM tracker_comments \
             WHERE issue_id = $1 ORDER BY id",
        )
        .bind(&issue.issue_id)
        .fetch_all(&self.db.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(Comment {
                    id: r.try_get("id")?,
                    author: r.try_get("author")?,
                    html: r.try_get("html")?,
                    external_id: r.try_get("external_id")?,
                    // Every comment here came through stage-engine; the author tells a
                    // role's from a person's.
                    external_source: None,
                    created_at: r.try_get::<i64, _>("created_at_ms")?.to_string(),
                })
            })
            .collect()
    }

    async fn list_states(&self, _project_id: &str) -> Result<Vec<State>, TrackerError> {
        Ok(local_states())
    }

    /// The local tracker's issues are made by stage-engine itself: there is nothing outside
    /// to reconcile with.
    async fn list_issues(&self, _project_id: &str) -> Result<Vec<crate::Issue>, TrackerError> {
        Ok(Vec::new())
    }

    async fn get_issue(&self, issue: &IssueRef) -> Result<Option<crate::Issue>, TrackerError> {
        Err(TrackerError::Rejected {
            status: 400,
            message: format!(
                "the local tracker does not read issue {} back (nothing to reconcile)",
                issue.issue_id.escape_debug()
            ),
        })
    }

    async fn set_state(&self, issue: &IssueRef, state_id: &str) -> Result<(), TrackerError> {
        if !local_states().iter().any(|s| s.id == state_id) {
            return Err(TrackerError::Rejected {
                status: 400,
                message: format!("unknown local state '{}'", state_id.escape_debug()),
            });
        }
        let done = sqlx::query(
            "UPDATE tracker_issues SET state_id = $1, updated_at_ms = $2 WHERE issue_id = $3",
        )
        .bind(state_id)
        .bind(now_ms())
        .bind(&issue.issue_id)
        .execute(&self.db.pool)
        .await?;
        if done.rows_affected() == 0 {
            return Err(TrackerError::NotFound(format!(
                "local issue {}",
                issue.issue_id
            )));
        }
        Ok(())
    }
}
