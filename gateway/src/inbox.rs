//! The `webhook_inbox` table: every statement the gateway runs.

use orchestrator_kit::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Waiting to be applied (or being applied, or waiting for a retry).
    Pending,
    Applied,
    /// Nothing to do; the reason says why.
    Ignored,
    /// Gave up: a permanent error, or too many retryable ones.
    Dead,
}

impl State {
    pub const ALL: [State; 4] = [State::Pending, State::Applied, State::Ignored, State::Dead];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Applied => "applied",
            State::Ignored => "ignored",
            State::Dead => "dead",
        }
    }

    fn parse(s: &str) -> State {
        match s {
            "applied" => State::Applied,
            "ignored" => State::Ignored,
            "dead" => State::Dead,
            _ => State::Pending,
        }
    }
}

/// A verified delivery, about to be stored.
#[derive(Debug, Clone)]
pub struct NewDelivery<'a> {
    pub source: &'static str,
    pub delivery_id: &'a str,
    pub body_sha256: &'a str,
    pub event: &'a str,
    pub action: &'a str,
    pub state: State,
    pub reason: &'a str,
    pub command: Option<String>,
    pub ordering_key: &'a str,
    pub body: &'a str,
    pub now_ms: i64,
}

/// What storing a delivery did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stored {
    New {
        id: String,
    },
    /// Already in the inbox (same delivery id, or the same bytes under a new id).
    Duplicate {
        id: String,
        state: State,
    },
}

/// Stores a delivery unless it is already there. The row is committed when this returns.
pub async fn insert(db: &Db, d: &NewDelivery<'_>) -> Result<Stored, sqlx::Error> {
    let id = uuid::Uuid::now_v7().to_string();
    let finished = if d.state == State::Pending {
        0
    } else {
        d.now_ms
    };
    let done = sqlx::query(
        "INSERT INTO webhook_inbox (id, source, delivery_id, body_sha256, event, action, state, \
         reason, command, ordering_key, work_item, body, attempts, next_attempt_at_ms, \
         last_error, received_at_ms, finished_at_ms) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, '', $11, 0, $12, '', $12, $13) \
         ON CONFLICT DO NOTHING",
    )
    .bind(&id)
    .bind(d.source)
    .bind(d.delivery_id)
    .bind(d.body_sha256)
    .bind(d.event)
    .bind(d.action)
    .bind(d.state.as_str())
    .bind(d.reason)
    .bind(d.command.as_deref())
    .bind(d.ordering_key)
    .bind(d.body)
    .bind(d.now_ms)
    .bind(finished)
    .execute(&db.pool)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(Stored::New { id });
    }
    let row = sqlx::query(
        "SELECT id, state FROM webhook_inbox \
         WHERE source = $1 AND (delivery_id = $2 OR body_sha256 = $3) ORDER BY id LIMIT 1",
    )
    .bind(d.source)
    .bind(d.delivery_id)
    .bind(d.body_sha256)
    .fetch_one(&db.pool)
    .await?;
    Ok(Stored::Duplicate {
        id: row.try_get("id")?,
        state: State::parse(&row.try_get::<String, _>("state")?),
    })
}

/// A pending delivery claimed for one attempt.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: String,
    pub source: String,
    pub delivery_id: String,
    pub command: Option<String>,
    /// This attempt's number (1 for the first).
    pub attempt: u32,
}

/// Claims up to `limit` pending deliveries that are due and first in line for their work
/// item (no earlier pending delivery shares their ordering key), oldest due first, in one
/// statement: each claimed row counts an attempt and is reserved until `lease_until_ms`,
/// so that another dispatcher (another gateway replica) skips it. The outer re-check of
/// `next_attempt_at_ms` makes a row claimed concurrently by another replica drop out
/// (claims, retries and leases all move it into the future); its unary `+` keeps SQLite
/// from answering the outer WHERE by scanning the whole backlog on that index instead of
/// looking the few ids up by primary key.
pub async fn claim_due(
    db: &Db,
    now_ms: i64,
    lease_until_ms: i64,
    limit: u32,
) -> Result<Vec<Claimed>, sqlx::Error> {
    let rows = sqlx::query(
        "UPDATE webhook_inbox SET attempts = attempts + 1, next_attempt_at_ms = $1 \
         WHERE +next_attempt_at_ms <= $2 AND id IN ( \
           SELECT w.id FROM webhook_inbox w \
           WHERE w.state = 'pending' AND w.next_attempt_at_ms <= $2 \
           AND NOT EXISTS (SELECT 1 FROM webhook_inbox e WHERE e.ordering_key = w.ordering_key \
                           AND e.state = 'pending' AND e.id < w.id) \
           ORDER BY w.next_attempt_at_ms, w.id LIMIT $3) \
         RETURNING id, source, delivery_id, command, attempts",
    )
    .bind(lease_until_ms)
    .bind(now_ms)
    .bind(i64::from(limit))
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Claimed {
                id: r.try_get("id")?,
                source: r.try_get("source")?,
                delivery_id: r.try_get("delivery_id")?,
                command: r.try_get("command")?,
                attempt: u32::try_from(r.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
            })
        })
        .collect()
}

/// Ends a pending delivery as applied, ignored or dead, with the work item key it
/// concerns when one is known ('' otherwise).
pub async fn finish(
    db: &Db,
    id: &str,
    state: State,
    reason: &str,
    last_error: &str,
    now_ms: i64,
    work_item: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_inbox SET state = $1, reason = $2, last_error = $3, finished_at_ms = $4, \
         work_item = $5 WHERE id = $6 AND state = 'pending'",
    )
    .bind(state.as_str())
    .bind(reason)
    .bind(last_error)
    .bind(now_ms)
    .bind(work_item)
    .bind(id)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Puts a delivery back in line for another attempt at `next_attempt_at_ms`.
pub async fn retry_at(
    db: &Db,
    id: &str,
    next_attempt_at_ms: i64,
    last_error: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE webhook_inbox SET next_attempt_at_ms = $1, last_error = $2 \
         WHERE id = $3 AND state = 'pending'",
    )
    .bind(next_attempt_at_ms)
    .bind(last_error)
    .bind(id)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Deliveries by state, and the oldest pending one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counts {
    pub pending: u64,
    pub applied: u64,
    pub ignored: u64,
    pub dead: u64,
    pub oldest_pending_received_at_ms: Option<i64>,
}

pub async fn counts(db: &Db) -> Result<Counts, sqlx::Error> {
    let rows = sqlx::query("SELECT state, COUNT(*) AS n FROM webhook_inbox GROUP BY state")
        .fetch_all(&db.pool)
        .await?;
    let mut c = Counts::default();
    for r in &rows {
        let n = u64::try_from(r.try_get::<i64, _>("n")?).unwrap_or(0);
        match State::parse(&r.try_get::<String, _>("state")?) {
            State::Pending => c.pending = n,
            State::Applied => c.applied = n,
            State::Ignored => c.ignored = n,
            State::Dead => c.dead = n,
        }
    }
    c.oldest_pending_received_at_ms =
        sqlx::query("SELECT MIN(received_at_ms) AS m FROM webhook_inbox WHERE state = 'pending'")
            .fetch_one(&db.pool)
            .await?
            .try_get("m")?;
    Ok(c)
}

/// One delivery as an operator sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Delivery {
    pub id: String,
    pub source: String,
    pub delivery_id: String,
    pub event: String,
    pub action: String,
    pub state: &'static str,
    pub reason: String,
    pub command: Option<serde_json::Value>,
    pub ordering_key: String,
    pub work_item: String,
    pub attempts: u32,
    pub next_attempt_at_ms: i64,
    pub last_error: String,
    pub received_at_ms: i64,
    pub finished_at_ms: i64,
}

const COLUMNS: &str = "id, source, delivery_id, event, action, state, reason, command, \
    ordering_key, work_item, attempts, next_attempt_at_ms, last_error, received_at_ms, finished_at_ms";

fn delivery(r: &AnyRow) -> Result<Delivery, sqlx::Error> {
    let command: Option<String> = r.try_get("command")?;
    Ok(Delivery {
        id: r.try_get("id")?,
        source: r.try_get("source")?,
        delivery_id: r.try_get("delivery_id")?,
        event: r.try_get("event")?,
        action: r.try_get("action")?,
        state: State::parse(&r.try_get::<String, _>("state")?).as_str(),
        reason: r.try_get("reason")?,
        command: command.and_then(|c| serde_json::from_str(&c).ok()),
        ordering_key: r.try_get("ordering_key")?,
        work_item: r.try_get("work_item")?,
        attempts: u32::try_from(r.try_get::<i64, _>("attempts")?).unwrap_or(u32::MAX),
        next_attempt_at_ms: r.try_get("next_attempt_at_ms")?,
        last_error: r.try_get("last_error")?,
        received_at_ms: r.try_get("received_at_ms")?,
        finished_at_ms: r.try_get("finished_at_ms")?,
    })
}

/// The newest dead letters, up to `limit`.
pub async fn dead_letters(db: &Db, limit: u32) -> Result<Vec<Delivery>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_inbox WHERE state = 'dead' ORDER BY id DESC LIMIT $1"
    )))
    .bind(i64::from(limit))
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(delivery).collect()
}

/// The delivery `delivery_id` of `source`, if stored.
pub async fn get(
    db: &Db,
    source: &str,
    delivery_id: &str,
) -> Result<Option<Delivery>, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM webhook_inbox WHERE source = $1 AND delivery_id = $2"
    )))
    .bind(source)
    .bind(delivery_id)
    .fetch_optional(&db.pool)
    .await?;
    row.as_ref().map(delivery).transpose()
}

/// Deletes applied and ignored deliveries finished before `before_ms`; dead letters and
/// pending ones stay. Returns how many went.
pub async fn prune(db: &Db, before_ms: i64) -> Result<u64, sqlx::Error> {
    let done = sqlx::query(
        "DELETE FROM webhook_inbox WHERE state IN ('applied', 'ignored') AND finished_at_ms < $1",
    )
    .bind(before_ms)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected())
}
