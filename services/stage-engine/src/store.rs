//! stage-engine's tables: work_items, stage_transitions, approvals, consumed_jobs, outbox.

use orchestrator_kit::Db;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};

use crate::pipeline::{Position, Stage, Status};

/// One work item.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkItemRow {
    pub key: String,
    pub tracker_issue_id: String,
    pub tracker_project_id: String,
    pub title: String,
    pub description: String,
    pub repo: String,
    pub branch: String,
    pub stage: Stage,
    pub status: Status,
    pub rollback_count: u32,
    pub stage_retries: u32,
    pub expected_agent: String,
    pub expected_dedupe_key: String,
    pub latest_job_id: String,
    /// Why the item is blocked or cancelled, and the next step ('' otherwise).
    pub status_reason: String,
    /// The PR the item's branch is on, once known (0: none yet): the launcher's report of
    /// the run that pushed, or a quality gate's forge lookup.
    pub pr_number: u64,
    pub version: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl WorkItemRow {
    pub fn position(&self) -> Position {
        Position {
            stage: self.stage,
            status: self.status,
            rollback_count: self.rollback_count,
            stage_retries: self.stage_retries,
        }
    }
}

const ITEM_COLUMNS: &str = "key, tracker_issue_id, tracker_project_id, title, description, repo, branch, \
     stage, status, rollback_count, stage_retries, expected_agent, expected_dedupe_key, latest_job_id, \
     status_reason, pr_number, version, created_at_ms, updated_at_ms";

fn u32_of(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

fn decode_err(e: String) -> sqlx::Error {
    sqlx::Error::Decode(e.into())
}

fn item_from_row(row: &AnyRow) -> Result<WorkItemRow, sqlx::Error> {
    Ok(WorkItemRow {
        key: row.try_get("key")?,
        tracker_issue_id: row.try_get("tracker_issue_id")?,
        tracker_project_id: row.try_get("tracker_project_id")?,
        title: row.try_get("title")?,
        description: row.try_get("description")?,
        repo: row.try_get("repo")?,
        branch: row.try_get("branch")?,
        stage: row
            .try_get::<String, _>("stage")?
            .parse()
            .map_err(decode_err)?,
        status: row
            .try_get::<String, _>("status")?
            .parse()
            .map_err(decode_err)?,
        rollback_count: u32_of(row.try_get("rollback_count")?),
        stage_retries: u32_of(row.try_get("stage_retries")?),
        expected_agent: row.try_get("expected_agent")?,
        expected_dedupe_key: row.try_get("expected_dedupe_key")?,
        latest_job_id: row.try_get("latest_job_id")?,
        status_reason: row.try_get("status_reason")?,
        pr_number: u64::try_from(row.try_get::<i64, _>("pr_number")?).unwrap_or(0),
        version: row.try_get("version")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

pub async fn get(db: &Db, key: &str) -> Result<Option<WorkItemRow>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ITEM_COLUMNS} FROM work_items WHERE key = $1"
    )))
    .bind(key)
    .fetch_optional(&db.pool)
    .await?
    .as_ref()
    .map(item_from_row)
    .transpose()
}

pub async fn get_by_tracker_issue(
    db: &Db,
    issue_id: &str,
) -> Result<Option<WorkItemRow>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ITEM_COLUMNS} FROM work_items WHERE tracker_issue_id = $1"
    )))
    .bind(issue_id)
    .fetch_optional(&db.pool)
    .await?
    .as_ref()
    .map(item_from_row)
    .transpose()
}

/// The work item of a branch: the one not done, else the latest.
pub async fn find_by_branch(
    db: &Db,
    repo: &str,
    branch: &str,
) -> Result<Option<WorkItemRow>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ITEM_COLUMNS} FROM work_items WHERE repo = $1 AND branch = $2 ORDER BY created_at_ms DESC"
    )))
    .bind(repo)
    .bind(branch)
    .fetch_all(&db.pool)
    .await?;
    let items: Vec<WorkItemRow> = rows.iter().map(item_from_row).collect::<Result<_, _>>()?;
    Ok(items
        .iter()
        .find(|i| !i.status.is_terminal())
        .or_else(|| items.first())
        .cloned())
}

/// Filters of [`list`]; empty means any.
#[derive(Debug, Default)]
pub struct ListFilter<'a> {
    pub status: &'a str,
    pub stage: &'a str,
    pub repo: &'a str,
    pub limit: u32,
    /// The description read as '' (the board shows none, and each may hold 100 kB).
    pub without_description: bool,
}

pub async fn list(db: &Db, f: &ListFilter<'_>) -> Result<Vec<WorkItemRow>, sqlx::Error> {
    // Only the filters given reach the SQL: a `($1 = '' OR status = $1)` form keeps SQLite
    // from using `work_items_status`, and a list of the latest 100 done items then scans
    // and sorts every row (5.8 ms against 0.3 ms through the index at 10,000 items on
    // SQLite; the board's five lists 11.6 against 3.2 ms, docs/benchmarks.md).
    let mut conditions = Vec::new();
    let mut values = Vec::new();
    for (column, value) in [("status", f.status), ("stage", f.stage), ("repo", f.repo)] {
        if !value.is_empty() {
            values.push(value);
            conditions.push(format!("{column} = ${}", values.len()));
        }
    }
    let filter = if conditions.is_empty() {
        String::new()
    } else {
        format!("WHERE {}", conditions.join(" AND "))
    };
    let columns = if f.without_description {
        ITEM_COLUMNS.replacen("description,", "CAST('' AS TEXT) AS description,", 1)
    } else {
        ITEM_COLUMNS.to_owned()
    };
    let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {columns} FROM work_items {filter} \
         ORDER BY updated_at_ms DESC, key LIMIT ${}",
        values.len() + 1
    )));
    for value in values {
        q = q.bind(value);
    }
    let rows = q.bind(i64::from(f.limit)).fetch_all(&db.pool).await?;
    rows.iter().map(item_from_row).collect()
}

pub async fn insert_item(
    tx: &mut Transaction<'_, Any>,
    i: &WorkItemRow,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO work_items (key, tracker_issue_id, tracker_project_id, title, description, repo, branch, \
         stage, status, rollback_count, stage_retries, expected_agent, expected_dedupe_key, latest_job_id, \
         version, created_at_ms, updated_at_ms, status_reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&i.key)
    .bind(&i.tracker_issue_id)
    .bind(&i.tracker_project_id)
    .bind(&i.title)
    .bind(&i.description)
    .bind(&i.repo)
    .bind(&i.branch)
    .bind(i.stage.as_str())
    .bind(i.status.as_str())
    .bind(i64::from(i.rollback_count))
    .bind(i64::from(i.stage_retries))
    .bind(&i.expected_agent)
    .bind(&i.expected_dedupe_key)
    .bind(&i.latest_job_id)
    .bind(i.version)
    .bind(i.created_at_ms)
    .bind(i.updated_at_ms)
    .bind(&i.status_reason)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Writes the new position of `next` if the row is still at `expected_version`; returns
/// false (and changes nothing) when someone changed it meanwhile.
pub async fn update_item_guarded(
    tx: &mut Transaction<'_, Any>,
    next: &WorkItemRow,
    expected_version: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE work_items SET stage = $1, status = $2, rollback_count = $3, stage_retries = $4, \
         expected_agent = $5, expected_dedupe_key = $6, latest_job_id = $7, version = version + 1, \
         updated_at_ms = $8, status_reason = $11, pr_number = $12 WHERE key = $9 AND version = $10",
    )
    .bind(next.stage.as_str())
    .bind(next.status.as_str())
    .bind(i64::from(next.rollback_count))
    .bind(i64::from(next.stage_retries))
    .bind(&next.expected_agent)
    .bind(&next.expected_dedupe_key)
    .bind(&next.latest_job_id)
    .bind(next.updated_at_ms)
    .bind(&next.key)
    .bind(expected_version)
    .bind(&next.status_reason)
    .bind(i64::try_from(next.pr_number).unwrap_or(i64::MAX))
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records the job id the launcher gave the latest enqueue, if that enqueue is still the
/// latest and no job was recorded yet.
pub async fn record_latest_job(
    db: &Db,
    key: &str,
    dedupe_key: &str,
    job_id: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE work_items SET latest_job_id = $1 WHERE key = $2 AND expected_dedupe_key = $3 AND latest_job_id = ''",
    )
    .bind(job_id)
    .bind(key)
    .bind(dedupe_key)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Sets the description of the work item of tracker issue `issue_id`; false when there is
/// none. The state machine's columns (and `version`) are not touched.
pub async fn set_description(
    db: &Db,
    issue_id: &str,
    description: &str,
    now_ms: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE work_items SET description = $1, updated_at_ms = $2 WHERE tracker_issue_id = $3",
    )
    .bind(description)
    .bind(now_ms)
    .bind(issue_id)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

pub async fn set_tracker_project(db: &Db, key: &str, project_id: &str) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE work_items SET tracker_project_id = $1 WHERE key = $2")
        .bind(project_id)
        .bind(key)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// One row of the audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TransitionRow {
    pub id: String,
    pub work_item: String,
    pub from_stage: String,
    pub to_stage: String,
    pub from_status: String,
    pub to_status: String,
    pub outcome: String,
    pub cause: String,
    pub finished_agent: String,
    pub job_id: String,
    pub qg_results_json: String,
    pub at_ms: i64,
}

pub async fn insert_transition(
    tx: &mut Transaction<'_, Any>,
    t: &TransitionRow,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO stage_transitions (id, work_item, from_stage, to_stage, from_status, to_status, outcome, \
         cause, finished_agent, job_id, qg_results_json, at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)",
    )
    .bind(&t.id)
    .bind(&t.work_item)
    .bind(&t.from_stage)
    .bind(&t.to_stage)
    .bind(&t.from_status)
    .bind(&t.to_status)
    .bind(&t.outcome)
    .bind(&t.cause)
    .bind(&t.finished_agent)
    .bind(&t.job_id)
    .bind(&t.qg_results_json)
    .bind(t.at_ms)
    .execute(&mut **tx)
    .await?;
    Ok(())
}

pub async fn list_transitions(db: &Db, work_item: &str) -> Result<Vec<TransitionRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, work_item, from_stage, to_stage, from_status, to_status, outcome, cause, finished_agent, \
         job_id, qg_results_json, at_ms FROM stage_transitions WHERE work_item = $1 ORDER BY id",
    )
    .bind(work_item)
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(TransitionRow {
                id: r.try_get("id")?,
                work_item: r.try_get("work_item")?,
                from_stage: r.try_get("from_stage")?,
                to_stage: r.try_get("to_stage")?,
                from_status: r.try_get("from_status")?,
                to_status: r.try_get("to_status")?,
                outcome: r.try_get("outcome")?,
                cause: r.try_get("cause")?,
                finished_agent: r.try_get("finished_agent")?,
                job_id: r.try_get("job_id")?,
                qg_results_json: r.try_get("qg_results_json")?,
                at_ms: r.try_get("at_ms")?,
            })
        })
        .collect()
}

pub async fn job_consumed(db: &Db, job_id: &str) -> Result<bool, sqlx::Error> {
    Ok(
        sqlx::query("SELECT job_id FROM consumed_jobs WHERE job_id = $1")
            .bind(job_id)
            .fetch_optional(&db.pool)
            .await?
            .is_some(),
    )
}

/// Marks a job's finish as applied; false when it already was.
pub async fn consume_job(
    tx: &mut Transaction<'_, Any>,
    job_id: &str,
    work_item: &str,
    attempt: u32,
    outcome: &str,
    at_ms: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO consumed_jobs (job_id, work_item, attempt, outcome, at_ms) VALUES ($1, $2, $3, $4, $5) \
         ON CONFLICT (job_id) DO NOTHING",
    )
    .bind(job_id)
    .bind(work_item)
    .bind(i64::from(attempt))
    .bind(outcome)
    .bind(at_ms)
    .execute(&mut **tx)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// An approval as recorded.
#[derive(Debug, Clone)]
pub struct ApprovalRow<'a> {
    pub work_item: &'a str,
    pub comment_id: &'a str,
    pub author: &'a str,
    pub accepted: bool,
    pub reason: &'a str,
    pub at_ms: i64,
}

pub async fn approval_seen(
    db: &Db,
    work_item: &str,
    comment_id: &str,
) -> Result<bool, sqlx::Error> {
    Ok(
        sqlx::query("SELECT accepted FROM approvals WHERE work_item = $1 AND comment_id = $2")
            .bind(work_item)
            .bind(comment_id)
            .fetch_optional(&db.pool)
            .await?
            .is_some(),
    )
}

pub async fn insert_approval<'e, E>(executor: E, a: &ApprovalRow<'_>) -> Result<(), sqlx::Error>
where
    E: sqlx::Executor<'e, Database = Any>,
{
    sqlx::query(
        "INSERT INTO approvals (work_item, comment_id, author, accepted, reason, at_ms) VALUES ($1, $2, $3, $4, $5, $6) \
         ON CONFLICT (work_item, comment_id) DO NOTHING",
    )
    .bind(a.work_item)
    .bind(a.comment_id)
    .bind(a.author)
    .bind(i64::from(a.accepted))
    .bind(a.reason)
    .bind(a.at_ms)
    .execute(executor)
    .await?;
    Ok(())
}

/// Work items by status (every status, 0 included), for the snapshot.
pub async fn count_by_status(db: &Db) -> Result<Vec<(Status, u64)>, sqlx::Error> {
    let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM work_items GROUP BY status")
        .fetch_all(&db.pool)
        .await?;
    let mut counts: Vec<(Status, u64)> = Status::ALL.iter().map(|s| (*s, 0)).collect();
    for r in rows {
        let status: Status = r
            .try_get::<String, _>("status")?
            .parse()
            .map_err(decode_err)?;
        let n: i64 = r.try_get("n")?;
        if let Some(c) = counts.iter_mut().find(|(s, _)| *s == status) {
            c.1 = u64::try_from(n).unwrap_or(0);
        }
    }
    Ok(counts)
}

/// Active work items not changed since `before_ms`, oldest first, after `cursor` (the
/// `(updated_at_ms, key)` of the last one of the previous page): the stall watchdog's
/// candidates, a page at a time.
pub async fn active_since(
    db: &Db,
    before_ms: i64,
    cursor: Option<(i64, &str)>,
    limit: u32,
) -> Result<Vec<WorkItemRow>, sqlx::Error> {
    let (after_ms, after_key) = cursor.unwrap_or((i64::MIN, ""));
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {ITEM_COLUMNS} FROM work_items WHERE status = 'active' AND updated_at_ms <= $1 \
         AND (updated_at_ms > $2 OR (updated_at_ms = $2 AND key > $3)) \
         ORDER BY updated_at_ms, key LIMIT $4"
    )))
    .bind(before_ms)
    .bind(after_ms)
    .bind(after_key)
    .bind(i64::from(limit))
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(item_from_row).collect()
}

/// The outcome a consumed job was applied with, and its work item.
pub async fn consumed_job(db: &Db, job_id: &str) -> Result<Option<(String, String)>, sqlx::Error> {
    sqlx::query("SELECT work_item, outcome FROM consumed_jobs WHERE job_id = $1")
        .bind(job_id)
        .fetch_optional(&db.pool)
        .await?
        .map(|r| Ok((r.try_get("work_item")?, r.try_get("outcome")?)))
        .transpose()
}
