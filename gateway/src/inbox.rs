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
pub struct NewDelivery {
    pub source: &'static str,
    pub delivery_id: String,
    pub body_sha256: String,
    pub event: String,
    pub action: String,
    pub state: State,
    pub reason: String,
    pub command: Option<String>,
    pub ordering_key: String,
    pub body: String,
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
pub async fn insert(db: &Db, d: &NewDelivery) -> Result<Stored, sqlx::Error> {
    let mut stored = insert_many(db, std::slice::from_ref(d)).await?;
    Ok(stored.remove(0))
}

/// Deliveries written in one statement at most (17 binds each).
pub const MAX_BATCH: usize = 64;

/// Stores each delivery unless it is already there, in ONE statement (one commit);
/// returns what happened to each, in order. Of two deliveries in one call that are the
/// same (delivery id or body), the first is stored and the second is its duplicate.
pub async fn insert_many(db: &Db, batch: &[NewDelivery]) -> Result<Vec<Stored>, sqlx::Error> {
    const COLS: usize = 17;
    let ids: Vec<String> = batch
        .iter()
        .map(|_| uuid::Uuid::now_v7().to_string())
        .collect();
    let sql = format!(
        "INSERT INTO webhook_inbox (id, source, delivery_id, body_sha256, event, action, state, \
         reason, command, ordering_key, work_item, body, attempts, next_attempt_at_ms, \
         last_error, received_at_ms, finished_at_ms) VALUES {} \
         ON CONFLICT DO NOTHING RETURNING id",
        db.backend.values_rows(batch.len(), COLS)
    );
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for (id, d) in ids.iter().zip(batch) {
        let finished = if d.state == State::Pending {
            0
        } else {
            d.now_ms
        };
        q = q
            .bind(id.as_str())
            .bind(d.source)
            .bind(d.delivery_id.as_str())
            .bind(d.body_sha256.as_str())
            .bind(d.event.as_str())
            .bind(d.action.as_str())
            .bind(d.state.as_str())
            .bind(d.reason.as_str())
            .bind(d.command.as_deref())
            .bind(d.ordering_key.as_str())
            .bind("")
            .bind(d.body.as_str())
            .bind(0_i64)
            .bind(d.now_ms)
            .bind("")
            .bind(d.now_ms)
            .bind(finished);
    }
    let rows = q.fetch_all(&db.pool).await?;
    let inserted: std::collections::HashSet<String> = rows
        .iter()
        .map(|r| r.try_get::<String, _>("id"))
        .collect::<Result<_, _>>()?;
    let mut out = Vec::with_capacity(batch.len());
    for (id, d) in ids.into_iter().zip(batch) {
        if inserted.contains(&id) {
            out.push(Stored::New { id });
            continue;
        }
        // A redelivery: rare, so one more statement is fine.
        let row = sqlx::query(
            "SELECT id, state FROM webhook_inbox \
             WHERE source = $1 AND (delivery_id = $2 OR body_sha256 = $3) ORDER BY id LIMIT 1",
        )
        .bind(d.source)
        .bind(d.delivery_id.as_str())
        .bind(d.body_sha256.as_str())
        .fetch_one(&db.pool)
        .await?;
        out.push(Stored::Duplicate {
            id: row.try_get("id")?,
            state: State::parse(&row.try_get::<String, _>("state")?),
        });
    }
    Ok(out)
}

/// The group commit of the webhook handlers: the deliveries that arrive together are
/// written by one statement ([`insert_many`]) and each sender's 2xx waits for its commit.
#[derive(Debug)]
pub struct InboxWriter(pub Db);

impl orchestrator_kit::group_commit::BatchWrite for InboxWriter {
    type Item = NewDelivery;
    type Output = Stored;

    async fn write(&self, batch: &[NewDelivery]) -> Result<Vec<Stored>, sqlx::Error> {
        insert_many(&self.0, batch).await
    }
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

/// What one attempt leaves in the inbox. Both change only a delivery that is still
/// pending, so recording an outcome twice changes nothing the second time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempted {
    /// Ends the delivery as applied, ignored or dead, with the work item key it concerns
    /// when one is known ('' otherwise).
    Finished {
        id: String,
        state: State,
        reason: String,
        last_error: String,
        at_ms: i64,
        work_item: String,
    },
    /// Puts the delivery back in line for another attempt at `next_attempt_at_ms`.
    Retry {
        id: String,
        next_attempt_at_ms: i64,
        last_error: String,
    },
}

/// Records attempts' outcomes, at most one statement for the finished ones and one for
/// the retried ones (`UPDATE ... FROM (VALUES ...)`, whose columns are `column1`, ... on
/// both backends).
pub async fn record_many(db: &Db, outcomes: &[Attempted]) -> Result<Vec<()>, sqlx::Error> {
    let finished: Vec<&Attempted> = outcomes
        .iter()
        .filter(|o| matches!(o, Attempted::Finished { .. }))
        .collect();
    let retried: Vec<&Attempted> = outcomes
        .iter()
        .filter(|o| matches!(o, Attempted::Retry { .. }))
        .collect();
    if !finished.is_empty() {
        let sql = format!(
            "UPDATE webhook_inbox SET state = v.column2, reason = v.column3, \
             last_error = v.column4, finished_at_ms = v.column5, work_item = v.column6 \
             FROM (VALUES {}) AS v \
             WHERE webhook_inbox.id = v.column1 AND webhook_inbox.state = 'pending'",
            db.backend.values_rows(finished.len(), 6)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for o in finished {
            if let Attempted::Finished {
                id,
                state,
                reason,
                last_error,
                at_ms,
                work_item,
            } = o
            {
                q = q
                    .bind(id.as_str())
                    .bind(state.as_str())
                    .bind(reason.as_str())
                    .bind(last_error.as_str())
                    .bind(*at_ms)
                    .bind(work_item.as_str());
            }
        }
        q.execute(&db.pool).await?;
    }
    if !retried.is_empty() {
        let sql = format!(
            "UPDATE webhook_inbox SET next_attempt_at_ms = v.column2, last_error = v.column3 \
             FROM (VALUES {}) AS v \
             WHERE webhook_inbox.id = v.column1 AND webhook_inbox.state = 'pending'",
            db.backend.values_rows(retried.len(), 3)
        );
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
        for o in retried {
            if let Attempted::Retry {
                id,
                next_attempt_at_ms,
                last_error,
            } = o
            {
                q = q
                    .bind(id.as_str())
                    .bind(*next_attempt_at_ms)
                    .bind(last_error.as_str());
            }
        }
        q.execute(&db.pool).await?;
    }
    Ok(vec![(); outcomes.len()])
}

/// The group commit of the dispatcher: the outcomes of the attempts that end together are
/// recorded by [`record_many`].
#[derive(Debug)]
pub struct OutcomeWriter(pub Db);

impl orchestrator_kit::group_commit::BatchWrite for OutcomeWriter {
    type Item = Attempted;
    type Output = ();

    async fn write(&self, outcomes: &[Attempted]) -> Result<Vec<()>, sqlx::Error> {
        record_many(&self.0, outcomes).await
    }
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

/// Puts dead letter `id` back in line (after an operator fixed its cause): pending, due at
/// `now_ms`, its attempts counted from zero again (a dispatcher with a cap on attempts gives
/// it the whole cap), its last error kept until the next attempt writes its own. Being the
/// delivery it was (same id), it is applied in its arrival order for its work item. The one
/// way to retry an inbox dead letter: `orchestrator inbox retry` and the dashboard's machine
/// room both call it. Returns false, changing nothing, when `id` is no dead letter (unknown,
/// or pending, applied or ignored: a second retry of the same letter is refused).
pub async fn retry_dead(db: &Db, id: &str, now_ms: i64) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE webhook_inbox SET state = 'pending', reason = 'retried by an operator', attempts = 0, \
         next_attempt_at_ms = $1, finished_at_ms = 0 \
         WHERE id = $2 AND state = 'dead' AND command IS NOT NULL",
    )
    .bind(now_ms)
    .bind(id)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
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
