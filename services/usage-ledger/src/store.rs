//! The `agent_runs` table.

use orchestrator_agent_output::Usage;
use orchestrator_kit::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

/// One recorded agent run.
#[derive(Debug, Clone, PartialEq)]
pub struct RunRecord {
    pub job_id: String,
    pub attempt: u32,
    pub work_item: String,
    pub agent: String,
    pub result_found: bool,
    pub usage: Usage,
    pub total_cost_usd: Option<f64>,
    pub is_error: Option<bool>,
    pub subtype: Option<String>,
    pub api_error_status: Option<i32>,
    pub num_turns: Option<i64>,
    pub duration_ms: Option<i64>,
    pub recorded_at_ms: i64,
    /// The CLI session of the run, when its result said (a plain id, checked on parse).
    pub session_id: Option<String>,
    /// The job's repository, `""` when the caller did not say (and before #18).
    pub repo: String,
}

const COLUMNS: &str = "job_id, attempt, work_item, agent, result_found, input_tokens, output_tokens, \
     cache_read_tokens, cache_creation_tokens, total_cost_usd, is_error, subtype, api_error_status, \
     num_turns, duration_ms, recorded_at_ms, session_id, repo";

/// Inserts each run unless its (job_id, attempt) is already recorded, in ONE statement.
/// Returns, per run, whether it was inserted; of two runs with the same key in one call,
/// only the first counts as inserted.
pub async fn insert_many(db: &Db, runs: &[RunRecord]) -> Result<Vec<bool>, sqlx::Error> {
    const COLS: usize = 18;
    let mut sql = String::from(
        "INSERT INTO agent_runs (job_id, attempt, work_item, agent, result_found, input_tokens, \
         output_tokens, cache_read_tokens, cache_creation_tokens, total_cost_usd, is_error, subtype, \
         api_error_status, num_turns, duration_ms, recorded_at_ms, session_id, repo) VALUES ",
    );
    sql.push_str(&db.backend.values_rows(runs.len(), COLS));
    sql.push_str(" ON CONFLICT (job_id, attempt) DO NOTHING RETURNING job_id, attempt");
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for run in runs {
        q = q
            .bind(run.job_id.clone())
            .bind(i64::from(run.attempt))
            .bind(run.work_item.clone())
            .bind(run.agent.clone())
            .bind(i64::from(run.result_found))
            .bind(run.usage.input_tokens)
            .bind(run.usage.output_tokens)
            .bind(run.usage.cache_read_tokens)
            .bind(run.usage.cache_creation_tokens)
            .bind(run.total_cost_usd.map(|c| c.to_string()))
            .bind(run.is_error.map(i64::from))
            .bind(run.subtype.clone())
            .bind(run.api_error_status.map(i64::from))
            .bind(run.num_turns)
            .bind(run.duration_ms)
            .bind(run.recorded_at_ms)
            .bind(run.session_id.clone())
            .bind(run.repo.clone());
    }
    let rows = q.fetch_all(&db.pool).await?;
    let mut inserted: Vec<(String, i64)> = rows
        .iter()
        .map(|r| {
            Ok((
                r.try_get::<String, _>("job_id")?,
                r.try_get::<i64, _>("attempt")?,
            ))
        })
        .collect::<Result<_, sqlx::Error>>()?;
    Ok(runs
        .iter()
        .map(|run| {
            let key = (run.job_id.clone(), i64::from(run.attempt));
            match inserted.iter().position(|k| *k == key) {
                Some(i) => {
                    inserted.swap_remove(i);
                    true
                }
                None => false,
            }
        })
        .collect())
}

/// Returns the run of (job_id, attempt); attempt 0 means the job's latest attempt.
pub async fn get(db: &Db, job_id: &str, attempt: u32) -> Result<Option<RunRecord>, sqlx::Error> {
    let row = if attempt == 0 {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM agent_runs WHERE job_id = $1 ORDER BY attempt DESC LIMIT 1"
        )))
        .bind(job_id)
        .fetch_optional(&db.pool)
        .await?
    } else {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {COLUMNS} FROM agent_runs WHERE job_id = $1 AND attempt = $2"
        )))
        .bind(job_id)
        .bind(i64::from(attempt))
        .fetch_optional(&db.pool)
        .await?
    };
    row.as_ref().map(from_row).transpose()
}

/// What the runs of CLI `session` other than (job_id, attempt) cost together: the part of
/// a resumed session's reported total that is not this run's.
pub async fn session_cost_before(
    db: &Db,
    session: &str,
    job_id: &str,
    attempt: u32,
) -> Result<f64, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT total_cost_usd FROM agent_runs WHERE session_id = $1 \
         AND NOT (job_id = $2 AND attempt = $3)",
    )
    .bind(session)
    .bind(job_id)
    .bind(i64::from(attempt))
    .fetch_all(&db.pool)
    .await?;
    Ok(rows
        .iter()
        .filter_map(|r| {
            r.try_get::<Option<String>, _>("total_cost_usd")
                .ok()
                .flatten()
        })
        .filter_map(|c| c.parse::<f64>().ok())
        .sum())
}

/// Returns a work item's runs in the order they were recorded.
pub async fn list_for_work_item(db: &Db, work_item: &str) -> Result<Vec<RunRecord>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM agent_runs WHERE work_item = $1 ORDER BY recorded_at_ms, job_id, attempt"
    )))
    .bind(work_item)
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Returns at most `limit` runs recorded at or after `since_ms`, of `work_item` (empty:
/// any), newest first.
pub async fn list_since(
    db: &Db,
    since_ms: i64,
    work_item: &str,
    limit: u32,
) -> Result<Vec<RunRecord>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM agent_runs WHERE recorded_at_ms >= $1 AND ($2 = '' OR work_item = $2) \
         ORDER BY recorded_at_ms DESC, job_id, attempt DESC LIMIT $3"
    )))
    .bind(since_ms)
    .bind(work_item)
    .bind(i64::from(limit))
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// One work item's run count and summed known cost.
#[derive(Debug, Clone, PartialEq)]
pub struct ItemCost {
    pub work_item: String,
    pub runs: u32,
    pub total_cost_usd: f64,
}

/// The run count and summed cost of each of `work_items` that has runs (every item's
/// when empty), summed by the database: one statement per 5,000 keys (the board asks for
/// at most 3,200: one statement), through the covering `(work_item, total_cost_usd)` index.
/// Both SQLite (32,766) and PostgreSQL (65,535) take that many bound values. `DOUBLE PRECISION` reads as REAL on SQLite (its
/// type-name rules) and as float8 on PostgreSQL, so one SQL text serves both.
pub async fn costs_by_work_item(
    db: &Db,
    work_items: &[String],
) -> Result<Vec<ItemCost>, sqlx::Error> {
    const SELECT: &str = "SELECT work_item, COUNT(*) AS runs, \
         COALESCE(SUM(CAST(total_cost_usd AS DOUBLE PRECISION)), 0.0) AS cost FROM agent_runs";
    let mut rows = Vec::new();
    if work_items.is_empty() {
        rows = sqlx::query(sqlx::AssertSqlSafe(format!("{SELECT} GROUP BY work_item")))
            .fetch_all(&db.pool)
            .await?;
    }
    for chunk in work_items.chunks(5_000) {
        let placeholders: Vec<String> = (1..=chunk.len()).map(|n| format!("${n}")).collect();
        let mut q = sqlx::query(sqlx::AssertSqlSafe(format!(
            "{SELECT} WHERE work_item IN ({}) GROUP BY work_item",
            placeholders.join(", ")
        )));
        for key in chunk {
            q = q.bind(key.clone());
        }
        rows.extend(q.fetch_all(&db.pool).await?);
    }
    rows.iter()
        .map(|r| {
            Ok(ItemCost {
                work_item: r.try_get("work_item")?,
                runs: u32::try_from(r.try_get::<i64, _>("runs")?).unwrap_or(u32::MAX),
                total_cost_usd: r.try_get("cost")?,
            })
        })
        .collect()
}

/// The run count and summed known cost of the runs recorded at or after `since_ms`, of
/// `repo` (empty: every repository), summed by the database through the
/// `recorded_at_ms` index.
pub async fn spent_since(db: &Db, since_ms: i64, repo: &str) -> Result<(u32, f64), sqlx::Error> {
    let row = sqlx::query(
        "SELECT COUNT(*) AS runs, COALESCE(SUM(CAST(total_cost_usd AS DOUBLE PRECISION)), 0.0) \
         AS cost FROM agent_runs WHERE recorded_at_ms >= $1 AND ($2 = '' OR repo = $2)",
    )
    .bind(since_ms)
    .bind(repo)
    .fetch_one(&db.pool)
    .await?;
    Ok((
        u32::try_from(row.try_get::<i64, _>("runs")?).unwrap_or(u32::MAX),
        row.try_get("cost")?,
    ))
}

fn from_row(row: &AnyRow) -> Result<RunRecord, sqlx::Error> {
    let attempt: i64 = row.try_get("attempt")?;
    Ok(RunRecord {
        job_id: row.try_get("job_id")?,
        attempt: u32::try_from(attempt).unwrap_or(u32::MAX),
        work_item: row.try_get("work_item")?,
        agent: row.try_get("agent")?,
        result_found: row.try_get::<i64, _>("result_found")? != 0,
        usage: Usage {
            input_tokens: row.try_get("input_tokens")?,
            output_tokens: row.try_get("output_tokens")?,
            cache_read_tokens: row.try_get("cache_read_tokens")?,
            cache_creation_tokens: row.try_get("cache_creation_tokens")?,
        },
        total_cost_usd: row
            .try_get::<Option<String>, _>("total_cost_usd")?
            .and_then(|c| c.parse().ok()),
        is_error: row.try_get::<Option<i64>, _>("is_error")?.map(|v| v != 0),
        subtype: row.try_get("subtype")?,
        api_error_status: row
            .try_get::<Option<i64>, _>("api_error_status")?
            .and_then(|v| i32::try_from(v).ok()),
        num_turns: row.try_get("num_turns")?,
        duration_ms: row.try_get("duration_ms")?,
        recorded_at_ms: row.try_get("recorded_at_ms")?,
        session_id: row.try_get("session_id")?,
        repo: row.try_get("repo")?,
    })
}
