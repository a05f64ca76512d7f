//! The `watches`, `probe_samples` and `alerts` tables.
//!
//! A tick writes its outcome with one guarded UPDATE: the watch's `seq` is a fencing token,
//! so of two ticks that read the same watch only the first one's outcome is written, and
//! only a tick that moved the watch from `watching` to `rolling_back` may run the rollback
//! — at most once per watch.

use orchestrator_kit::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::decide::Progress;

/// The states of a watch.
pub mod state {
    pub const WATCHING: &str = "watching";
    /// The rollback command has been started; it runs at most once.
    pub const ROLLING_BACK: &str = "rolling_back";
    pub const CLOSED: &str = "closed";
    pub const ROLLED_BACK: &str = "rolled_back";
    pub const ALL: [&str; 4] = [WATCHING, ROLLING_BACK, CLOSED, ROLLED_BACK];
}

/// A stored watch.
#[derive(Debug, Clone, PartialEq)]
pub struct WatchRow {
    pub work_item: String,
    pub repo: String,
    pub deployed_sha: String,
    pub previous_sha: String,
    pub self_repo: bool,
    pub armed_at_ms: i64,
    pub window_end_ms: i64,
    pub progress: Progress,
    pub state: String,
    pub last_action: String,
    pub closed_at_ms: i64,
    pub ticks: u32,
    pub seq: i64,
    pub last_classification: String,
    pub last_reason: String,
    pub last_tick_at_ms: i64,
    pub alerting: String,
    pub rollback: Option<RollbackRow>,
}

/// A rollback as recorded.
#[derive(Debug, Clone, PartialEq)]
pub struct RollbackRow {
    pub command: String,
    pub started_at_ms: i64,
    /// `None` while it runs, or forever when post-deploy stopped while it ran.
    pub finished_at_ms: Option<i64>,
    pub exit_code: Option<i64>,
    pub timed_out: bool,
    pub output: String,
    pub error: String,
}

/// A stored probe sample.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRow {
    pub seq: i64,
    pub at_ms: i64,
    pub health_ok: bool,
    pub health_status: u16,
    pub health_latency_ms: u32,
    pub requests_total: Option<f64>,
    pub errors_5xx_total: Option<f64>,
    pub requests_delta: Option<f64>,
    pub errors_5xx_delta: Option<f64>,
    pub probe_error: String,
    pub classification: String,
    pub action: String,
    pub reason: String,
}

/// A stored alert.
#[derive(Debug, Clone, PartialEq)]
pub struct AlertRow {
    pub work_item: String,
    pub seq: i64,
    pub at_ms: i64,
    pub kind: String,
    pub text: String,
    pub posted_at_ms: i64,
}

/// A watch to arm.
#[derive(Debug, Clone)]
pub struct NewWatch<'a> {
    pub work_item: &'a str,
    pub repo: &'a str,
    pub deployed_sha: &'a str,
    pub previous_sha: &'a str,
    pub self_repo: bool,
    pub armed_at_ms: i64,
    pub window_end_ms: i64,
}

/// What a tick writes to its watch.
#[derive(Debug, Clone)]
pub struct TickUpdate<'a> {
    pub progress: &'a Progress,
    pub state: &'a str,
    pub last_action: &'a str,
    pub closed_at_ms: i64,
    pub classification: &'a str,
    pub reason: &'a str,
    pub at_ms: i64,
    pub alerting: &'a str,
    /// Set when this tick starts the rollback.
    pub rollback_command: Option<&'a str>,
}

const WATCH_COLUMNS: &str = "work_item, repo, deployed_sha, previous_sha, self_repo, armed_at_ms, \
     window_end_ms, consecutive_health_failures, consecutive_probe_errors, state, last_action, \
     closed_at_ms, ticks, seq, last_classification, last_reason, last_tick_at_ms, \
     last_requests_total, last_errors_5xx_total, window_requests, window_5xx, alerting, \
     rollback_command, rollback_started_at_ms, rollback_finished_at_ms, rollback_exit_code, \
     rollback_timed_out, rollback_output, rollback_error";

fn float_text(v: f64) -> String {
    v.to_string()
}

fn parse_float(v: Option<String>) -> Option<f64> {
    v.and_then(|s| s.parse().ok())
}

/// Arms a watch unless the work item has one. A work item whose watch is over (closed or
/// rolled back) and that is deployed again at another commit gets a fresh window. Returns
/// the watch in force and whether this call armed it.
pub async fn arm(db: &Db, w: &NewWatch<'_>) -> Result<(WatchRow, bool), sqlx::Error> {
    let inserted = sqlx::query(
        "INSERT INTO watches (work_item, repo, deployed_sha, previous_sha, self_repo, armed_at_ms, \
         window_end_ms, consecutive_health_failures, consecutive_probe_errors, state, last_action, \
         closed_at_ms, ticks, seq, last_classification, last_reason, last_tick_at_ms, \
         window_requests, window_5xx, alerting, alert_seq) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 0, 0, $8, '', 0, 0, 0, '', '', 0, '0', '0', '', 0) \
         ON CONFLICT (work_item) DO NOTHING",
    )
    .bind(w.work_item)
    .bind(w.repo)
    .bind(w.deployed_sha)
    .bind(w.previous_sha)
    .bind(i64::from(w.self_repo))
    .bind(w.armed_at_ms)
    .bind(w.window_end_ms)
    .bind(state::WATCHING)
    .execute(&db.pool)
    .await?;
    let mut created = inserted.rows_affected() == 1;
    if !created {
        let rearmed = sqlx::query(
            "UPDATE watches SET repo = $2, deployed_sha = $3, previous_sha = $4, self_repo = $5, \
             armed_at_ms = $6, window_end_ms = $7, consecutive_health_failures = 0, \
             consecutive_probe_errors = 0, state = $8, last_action = '', closed_at_ms = 0, \
             ticks = 0, last_classification = '', last_reason = '', last_tick_at_ms = 0, \
             last_requests_total = NULL, last_errors_5xx_total = NULL, window_requests = '0', \
             window_5xx = '0', alerting = '', rollback_command = NULL, \
             rollback_started_at_ms = NULL, rollback_finished_at_ms = NULL, \
             rollback_exit_code = NULL, rollback_timed_out = NULL, rollback_output = NULL, \
             rollback_error = NULL \
             WHERE work_item = $1 AND state IN ($9, $10) AND deployed_sha <> $3",
        )
        .bind(w.work_item)
        .bind(w.repo)
        .bind(w.deployed_sha)
        .bind(w.previous_sha)
        .bind(i64::from(w.self_repo))
        .bind(w.armed_at_ms)
        .bind(w.window_end_ms)
        .bind(state::WATCHING)
        .bind(state::CLOSED)
        .bind(state::ROLLED_BACK)
        .execute(&db.pool)
        .await?;
        created = rearmed.rows_affected() == 1;
    }
    let watch = get(db, w.work_item)
        .await?
        .ok_or(sqlx::Error::RowNotFound)?;
    Ok((watch, created))
}

/// Returns the watch of `work_item`.
pub async fn get(db: &Db, work_item: &str) -> Result<Option<WatchRow>, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {WATCH_COLUMNS} FROM watches WHERE work_item = $1"
    )))
    .bind(work_item)
    .fetch_optional(&db.pool)
    .await?;
    row.as_ref().map(watch_from_row).transpose()
}

/// Lists watches, newest first; empty filters match anything.
pub async fn list(
    db: &Db,
    state: &str,
    repo: &str,
    limit: u32,
) -> Result<Vec<WatchRow>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {WATCH_COLUMNS} FROM watches WHERE ($1 = '' OR state = $1) AND ($2 = '' OR repo = $2) \
         ORDER BY armed_at_ms DESC, work_item LIMIT $3"
    )))
    .bind(state)
    .bind(repo)
    .bind(i64::from(limit))
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(watch_from_row).collect()
}

/// Writes a tick's outcome, its sample and (when one is due) its alert, if the watch is
/// still `watching` at `expected_seq`. Returns false when another tick got there first.
pub async fn record_tick(
    db: &Db,
    work_item: &str,
    expected_seq: i64,
    u: &TickUpdate<'_>,
    sample: &SampleRow,
    alert: Option<(&str, &str)>,
) -> Result<bool, sqlx::Error> {
    let mut tx = db.pool.begin().await?;
    let p = u.progress;
    let done = sqlx::query(
        "UPDATE watches SET consecutive_health_failures = $3, consecutive_probe_errors = $4, \
         state = $5, last_action = $6, closed_at_ms = $7, ticks = ticks + 1, seq = seq + 1, \
         last_classification = $8, last_reason = $9, last_tick_at_ms = $10, \
         last_requests_total = $11, last_errors_5xx_total = $12, window_requests = $13, \
         window_5xx = $14, alerting = $15, \
         rollback_command = COALESCE($16, rollback_command), \
         rollback_started_at_ms = CASE WHEN $16 IS NULL THEN rollback_started_at_ms ELSE $10 END \
         WHERE work_item = $1 AND seq = $2 AND state = 'watching'",
    )
    .bind(work_item)
    .bind(expected_seq)
    .bind(i64::from(p.consecutive_health_failures))
    .bind(i64::from(p.consecutive_probe_errors))
    .bind(u.state)
    .bind(u.last_action)
    .bind(u.closed_at_ms)
    .bind(u.classification)
    .bind(u.reason)
    .bind(u.at_ms)
    .bind(p.last_requests_total.map(float_text))
    .bind(p.last_errors_5xx_total.map(float_text))
    .bind(float_text(p.window_requests))
    .bind(float_text(p.window_5xx))
    .bind(u.alerting)
    .bind(u.rollback_command)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    sqlx::query(
        "INSERT INTO probe_samples (work_item, seq, at_ms, health_ok, health_status, \
         health_latency_ms, requests_total, errors_5xx_total, requests_delta, errors_5xx_delta, \
         probe_error, classification, action, reason) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
    )
    .bind(work_item)
    .bind(expected_seq + 1)
    .bind(sample.at_ms)
    .bind(i64::from(sample.health_ok))
    .bind(i64::from(sample.health_status))
    .bind(i64::from(sample.health_latency_ms))
    .bind(sample.requests_total.map(float_text))
    .bind(sample.errors_5xx_total.map(float_text))
    .bind(sample.requests_delta.map(float_text))
    .bind(sample.errors_5xx_delta.map(float_text))
    .bind(&sample.probe_error)
    .bind(&sample.classification)
    .bind(&sample.action)
    .bind(&sample.reason)
    .execute(&mut *tx)
    .await?;
    if let Some((kind, text)) = alert {
        insert_alert(&mut tx, work_item, u.at_ms, kind, text).await?;
    }
    tx.commit().await?;
    Ok(true)
}

async fn insert_alert(
    conn: &mut sqlx::AnyConnection,
    work_item: &str,
    at_ms: i64,
    kind: &str,
    text: &str,
) -> Result<i64, sqlx::Error> {
    let seq: i64 = sqlx::query(
        "UPDATE watches SET alert_seq = alert_seq + 1 WHERE work_item = $1 RETURNING alert_seq",
    )
    .bind(work_item)
    .fetch_one(&mut *conn)
    .await?
    .try_get("alert_seq")?;
    sqlx::query(
        "INSERT INTO alerts (work_item, seq, at_ms, kind, text, posted_at_ms) \
         VALUES ($1, $2, $3, $4, $5, 0)",
    )
    .bind(work_item)
    .bind(seq)
    .bind(at_ms)
    .bind(kind)
    .bind(text)
    .execute(&mut *conn)
    .await?;
    Ok(seq)
}

/// Records what the rollback did and closes the watch as rolled back, with its alert.
pub async fn finish_rollback(
    db: &Db,
    work_item: &str,
    r: &RollbackRow,
    alert_text: &str,
) -> Result<bool, sqlx::Error> {
    let finished_at_ms = r.finished_at_ms.unwrap_or(r.started_at_ms);
    let mut tx = db.pool.begin().await?;
    let done = sqlx::query(
        "UPDATE watches SET state = $2, closed_at_ms = $3, rollback_finished_at_ms = $4, \
         rollback_exit_code = $5, rollback_timed_out = $6, rollback_output = $7, \
         rollback_error = $8 WHERE work_item = $1 AND state = $9",
    )
    .bind(work_item)
    .bind(state::ROLLED_BACK)
    .bind(finished_at_ms)
    .bind(r.finished_at_ms)
    .bind(r.exit_code)
    .bind(i64::from(r.timed_out))
    .bind(&r.output)
    .bind(&r.error)
    .bind(state::ROLLING_BACK)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    insert_alert(
        &mut tx,
        work_item,
        finished_at_ms,
        crate::alerts::AlertKind::Rollback.as_str(),
        alert_text,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Closes a watch whose rollback was started by a post-deploy that stopped before recording
/// its end: the rollback is not run again (once per watch), and a human is told.
pub async fn close_interrupted_rollback(
    db: &Db,
    work_item: &str,
    at_ms: i64,
    alert_text: &str,
) -> Result<bool, sqlx::Error> {
    let mut tx = db.pool.begin().await?;
    let done = sqlx::query(
        "UPDATE watches SET state = $2, closed_at_ms = $3, \
         rollback_error = 'interrupted: post-deploy stopped while the rollback ran; its outcome is unknown' \
         WHERE work_item = $1 AND state = $4",
    )
    .bind(work_item)
    .bind(state::ROLLED_BACK)
    .bind(at_ms)
    .bind(state::ROLLING_BACK)
    .execute(&mut *tx)
    .await?;
    if done.rows_affected() != 1 {
        tx.rollback().await?;
        return Ok(false);
    }
    insert_alert(
        &mut tx,
        work_item,
        at_ms,
        crate::alerts::AlertKind::RollbackInterrupted.as_str(),
        alert_text,
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// Closes an open watch without a tick (post-deploy was switched off).
pub async fn close(
    db: &Db,
    work_item: &str,
    at_ms: i64,
    reason: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE watches SET state = $2, closed_at_ms = $3, last_action = 'CLOSE', last_reason = $4 \
         WHERE work_item = $1 AND state = $5",
    )
    .bind(work_item)
    .bind(state::CLOSED)
    .bind(at_ms)
    .bind(reason)
    .bind(state::WATCHING)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The samples of `work_item` taken since `since_ms`, oldest first.
pub async fn samples(
    db: &Db,
    work_item: &str,
    since_ms: i64,
) -> Result<Vec<SampleRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT seq, at_ms, health_ok, health_status, health_latency_ms, requests_total, \
         errors_5xx_total, requests_delta, errors_5xx_delta, probe_error, classification, action, \
         reason FROM probe_samples WHERE work_item = $1 AND at_ms >= $2 ORDER BY seq",
    )
    .bind(work_item)
    .bind(since_ms)
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|row| {
            Ok(SampleRow {
                seq: row.try_get("seq")?,
                at_ms: row.try_get("at_ms")?,
                health_ok: row.try_get::<i64, _>("health_ok")? != 0,
                health_status: u16::try_from(row.try_get::<i64, _>("health_status")?).unwrap_or(0),
                health_latency_ms: u32::try_from(row.try_get::<i64, _>("health_latency_ms")?)
                    .unwrap_or(u32::MAX),
                requests_total: parse_float(row.try_get("requests_total")?),
                errors_5xx_total: parse_float(row.try_get("errors_5xx_total")?),
                requests_delta: parse_float(row.try_get("requests_delta")?),
                errors_5xx_delta: parse_float(row.try_get("errors_5xx_delta")?),
                probe_error: row.try_get("probe_error")?,
                classification: row.try_get("classification")?,
                action: row.try_get("action")?,
                reason: row.try_get("reason")?,
            })
        })
        .collect()
}

/// The alerts of `work_item`, oldest first.
pub async fn alerts(db: &Db, work_item: &str) -> Result<Vec<AlertRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT work_item, seq, at_ms, kind, text, posted_at_ms FROM alerts \
         WHERE work_item = $1 ORDER BY seq",
    )
    .bind(work_item)
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(alert_from_row).collect()
}

/// The alerts of `work_item` that the sink has not accepted yet, oldest first.
pub async fn pending_alerts(db: &Db, work_item: &str) -> Result<Vec<AlertRow>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT work_item, seq, at_ms, kind, text, posted_at_ms FROM alerts \
         WHERE work_item = $1 AND posted_at_ms = 0 ORDER BY seq",
    )
    .bind(work_item)
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(alert_from_row).collect()
}

/// Marks an alert as accepted by the sink.
pub async fn mark_posted(
    db: &Db,
    work_item: &str,
    seq: i64,
    at_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE alerts SET posted_at_ms = $3 WHERE work_item = $1 AND seq = $2")
        .bind(work_item)
        .bind(seq)
        .bind(at_ms)
        .execute(&db.pool)
        .await?;
    Ok(())
}

fn alert_from_row(row: &AnyRow) -> Result<AlertRow, sqlx::Error> {
    Ok(AlertRow {
        work_item: row.try_get("work_item")?,
        seq: row.try_get("seq")?,
        at_ms: row.try_get("at_ms")?,
        kind: row.try_get("kind")?,
        text: row.try_get("text")?,
        posted_at_ms: row.try_get("posted_at_ms")?,
    })
}

fn count(row: &AnyRow, column: &str) -> Result<u32, sqlx::Error> {
    Ok(u32::try_from(row.try_get::<i64, _>(column)?.max(0)).unwrap_or(u32::MAX))
}

fn watch_from_row(row: &AnyRow) -> Result<WatchRow, sqlx::Error> {
    let rollback = match row.try_get::<Option<i64>, _>("rollback_started_at_ms")? {
        None => None,
        Some(started_at_ms) => Some(RollbackRow {
            command: row
                .try_get::<Option<String>, _>("rollback_command")?
                .unwrap_or_default(),
            started_at_ms,
            finished_at_ms: row.try_get("rollback_finished_at_ms")?,
            exit_code: row.try_get("rollback_exit_code")?,
            timed_out: row
                .try_get::<Option<i64>, _>("rollback_timed_out")?
                .is_some_and(|v| v != 0),
            output: row
                .try_get::<Option<String>, _>("rollback_output")?
                .unwrap_or_default(),
            error: row
                .try_get::<Option<String>, _>("rollback_error")?
                .unwrap_or_default(),
        }),
    };
    Ok(WatchRow {
        work_item: row.try_get("work_item")?,
        repo: row.try_get("repo")?,
        deployed_sha: row.try_get("deployed_sha")?,
        previous_sha: row.try_get("previous_sha")?,
        self_repo: row.try_get::<i64, _>("self_repo")? != 0,
        armed_at_ms: row.try_get("armed_at_ms")?,
        window_end_ms: row.try_get("window_end_ms")?,
        progress: Progress {
            consecutive_health_failures: count(row, "consecutive_health_failures")?,
            consecutive_probe_errors: count(row, "consecutive_probe_errors")?,
            last_requests_total: parse_float(row.try_get("last_requests_total")?),
            last_errors_5xx_total: parse_float(row.try_get("last_errors_5xx_total")?),
            window_requests: parse_float(row.try_get("window_requests")?).unwrap_or(0.0),
            window_5xx: parse_float(row.try_get("window_5xx")?).unwrap_or(0.0),
        },
        state: row.try_get("state")?,
        last_action: row.try_get("last_action")?,
        closed_at_ms: row.try_get("closed_at_ms")?,
        ticks: count(row, "ticks")?,
        seq: row.try_get("seq")?,
        last_classification: row.try_get("last_classification")?,
        last_reason: row.try_get("last_reason")?,
        last_tick_at_ms: row.try_get("last_tick_at_ms")?,
        alerting: row.try_get("alerting")?,
        rollback,
    })
}
