//! The reaper's tables: dead-pid streaks, one row per tick, and running totals.

use orchestrator_kit::Db;
use sqlx::Row;

use crate::tiers::Streak;

/// Every stored streak.
pub async fn load_streaks(db: &Db) -> Result<Vec<Streak>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT job_id, attempt, dead_streak, first_dead_at_ms, last_dead_at_ms, liveness \
         FROM reaper_observations ORDER BY first_dead_at_ms, job_id",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Streak {
                job_id: r.try_get("job_id")?,
                attempt: u32::try_from(r.try_get::<i64, _>("attempt")?).unwrap_or_default(),
                ticks: u32::try_from(r.try_get::<i64, _>("dead_streak")?).unwrap_or_default(),
                first_dead_at_ms: r.try_get("first_dead_at_ms")?,
                last_dead_at_ms: r.try_get("last_dead_at_ms")?,
                liveness: r.try_get("liveness")?,
            })
        })
        .collect()
}

/// Writes the streaks that changed and deletes those that ended, in one transaction.
pub async fn save_streaks(
    db: &Db,
    upserts: &[Streak],
    deletes: &[(String, u32)],
) -> Result<(), sqlx::Error> {
    if upserts.is_empty() && deletes.is_empty() {
        return Ok(());
    }
    let mut tx = db.pool.begin().await?;
    for s in upserts {
        sqlx::query(
            "INSERT INTO reaper_observations \
               (job_id, attempt, dead_streak, first_dead_at_ms, last_dead_at_ms, liveness) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (job_id, attempt) DO UPDATE SET dead_streak = excluded.dead_streak, \
               first_dead_at_ms = excluded.first_dead_at_ms, \
               last_dead_at_ms = excluded.last_dead_at_ms, liveness = excluded.liveness",
        )
        .bind(&s.job_id)
        .bind(i64::from(s.attempt))
        .bind(i64::from(s.ticks))
        .bind(s.first_dead_at_ms)
        .bind(s.last_dead_at_ms)
        .bind(&s.liveness)
        .execute(&mut *tx)
        .await?;
    }
    for (job_id, attempt) in deletes {
        sqlx::query("DELETE FROM reaper_observations WHERE job_id = $1 AND attempt = $2")
            .bind(job_id)
            .bind(i64::from(*attempt))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await
}

/// What one tick saw and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TickRecord {
    pub at_ms: i64,
    pub duration_ms: i64,
    pub jobs_seen: u32,
    pub flips_dead_pid: u32,
    pub flips_exit_code: u32,
    pub flips_backstop: u32,
    pub flips_lost: u32,
    pub leases_reclaimed: u32,
    pub errors: u32,
    /// The first error of the tick; empty when none.
    pub error: String,
}

/// Running totals.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    pub ticks: u64,
    pub last_tick_at_ms: i64,
    pub last_tick_duration_ms: i64,
    pub last_jobs_seen: u32,
    pub flips_dead_pid: u64,
    pub flips_exit_code: u64,
    pub flips_backstop: u64,
    pub flips_lost: u64,
    pub leases_reclaimed: u64,
    pub errors: u64,
    pub last_error: String,
}

/// How long tick rows are kept.
const KEEP_TICKS_MS: i64 = 3 * 24 * 3600 * 1000;

/// Records a tick, adds it to the totals and forgets ticks older than three days.
pub async fn record_tick(db: &Db, t: &TickRecord) -> Result<(), sqlx::Error> {
    let mut tx = db.pool.begin().await?;
    sqlx::query(
        "INSERT INTO reaper_ticks (id, at_ms, duration_ms, jobs_seen, flips_dead_pid, \
           flips_exit_code, flips_backstop, flips_lost, leases_reclaimed, errors, error) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
    )
    .bind(uuid::Uuid::now_v7().to_string())
    .bind(t.at_ms)
    .bind(t.duration_ms)
    .bind(i64::from(t.jobs_seen))
    .bind(i64::from(t.flips_dead_pid))
    .bind(i64::from(t.flips_exit_code))
    .bind(i64::from(t.flips_backstop))
    .bind(i64::from(t.flips_lost))
    .bind(i64::from(t.leases_reclaimed))
    .bind(i64::from(t.errors))
    .bind(&t.error)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO reaper_totals (id, ticks, last_tick_at_ms, last_tick_duration_ms, \
           last_jobs_seen, flips_dead_pid, flips_exit_code, flips_backstop, flips_lost, \
           leases_reclaimed, errors, last_error) \
         VALUES (1, 1, $1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (id) DO UPDATE SET ticks = reaper_totals.ticks + 1, \
           last_tick_at_ms = excluded.last_tick_at_ms, \
           last_tick_duration_ms = excluded.last_tick_duration_ms, \
           last_jobs_seen = excluded.last_jobs_seen, \
           flips_dead_pid = reaper_totals.flips_dead_pid + excluded.flips_dead_pid, \
           flips_exit_code = reaper_totals.flips_exit_code + excluded.flips_exit_code, \
           flips_backstop = reaper_totals.flips_backstop + excluded.flips_backstop, \
           flips_lost = reaper_totals.flips_lost + excluded.flips_lost, \
           leases_reclaimed = reaper_totals.leases_reclaimed + excluded.leases_reclaimed, \
           errors = reaper_totals.errors + excluded.errors, \
           last_error = CASE WHEN excluded.last_error = '' THEN reaper_totals.last_error \
                             ELSE excluded.last_error END",
    )
    .bind(t.at_ms)
    .bind(t.duration_ms)
    .bind(i64::from(t.jobs_seen))
    .bind(i64::from(t.flips_dead_pid))
    .bind(i64::from(t.flips_exit_code))
    .bind(i64::from(t.flips_backstop))
    .bind(i64::from(t.flips_lost))
    .bind(i64::from(t.leases_reclaimed))
    .bind(i64::from(t.errors))
    .bind(&t.error)
    .execute(&mut *tx)
    .await?;
    sqlx::query("DELETE FROM reaper_ticks WHERE at_ms < $1")
        .bind(t.at_ms - KEEP_TICKS_MS)
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}

fn count(v: i64) -> u64 {
    u64::try_from(v).unwrap_or_default()
}

/// The totals so far (zero before the first tick).
pub async fn totals(db: &Db) -> Result<Totals, sqlx::Error> {
    let Some(r) = sqlx::query(
        "SELECT ticks, last_tick_at_ms, last_tick_duration_ms, last_jobs_seen, flips_dead_pid, \
           flips_exit_code, flips_backstop, flips_lost, leases_reclaimed, errors, last_error \
         FROM reaper_totals WHERE id = 1",
    )
    .fetch_optional(&db.pool)
    .await?
    else {
        return Ok(Totals::default());
    };
    Ok(Totals {
        ticks: count(r.try_get("ticks")?),
        last_tick_at_ms: r.try_get("last_tick_at_ms")?,
        last_tick_duration_ms: r.try_get("last_tick_duration_ms")?,
        last_jobs_seen: u32::try_from(r.try_get::<i64, _>("last_jobs_seen")?).unwrap_or(u32::MAX),
        flips_dead_pid: count(r.try_get("flips_dead_pid")?),
        flips_exit_code: count(r.try_get("flips_exit_code")?),
        flips_backstop: count(r.try_get("flips_backstop")?),
        flips_lost: count(r.try_get("flips_lost")?),
        leases_reclaimed: count(r.try_get("leases_reclaimed")?),
        errors: count(r.try_get("errors")?),
        last_error: r.try_get("last_error")?,
    })
}
