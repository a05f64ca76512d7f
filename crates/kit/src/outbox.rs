//! The one outbox mechanism: a side effect is written in the transaction of the state change
//! that causes it, then delivered at least once by a background dispatcher with
//! [`crate::retry::Backoff`] for as long as its receiver is down. A state change is never
//! half-applied (its effects are in the same commit) and an effect is never lost (it stays
//! `pending` until its receiver takes it). Entries of one (work item, channel) go out in
//! order; channels do not wait for each other. Only a permanent answer
//! ([`crate::retry::is_retryable`] says no) — or, where a service sets one, a spent attempt
//! budget — makes an entry `failed`: a dead letter, listed and put back by an operator.
//!
//! Each service owns its table (stage-engine's `outbox`, the launcher's `outbox`, each in
//! its own schema; the columns are in `services/stage-engine/migrations/0001_*.sql`) and
//! its effects: a kind, a channel and a JSON payload, delivered through its [`Deliver`].
//! Receivers are idempotent: a delivery whose outcome was not recorded (a crash, a lapsed
//! claim) is made again.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::any::AnyRow;
use sqlx::{Any, Row, Transaction};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::{ConfigError, Env};
use crate::db::Db;
use crate::retry::{Backoff, is_retryable_status};
use crate::time::now_ms;

/// An entry's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Pending,
    /// Claimed by a deliverer until its claim lapses.
    Delivering,
    Delivered,
    /// A dead letter: it waits for an operator (see [`Outbox::retry_failed`]).
    Failed,
}

impl State {
    pub const ALL: [State; 4] = [
        State::Pending,
        State::Delivering,
        State::Delivered,
        State::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            State::Pending => "pending",
            State::Delivering => "delivering",
            State::Delivered => "delivered",
            State::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        State::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

/// An entry as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    pub work_item: String,
    pub channel: String,
    pub kind: String,
    pub payload_json: String,
    pub state: String,
    pub attempts: u32,
    pub next_attempt_at_ms: i64,
    pub last_error: String,
    pub result_json: String,
    pub created_at_ms: i64,
    pub delivered_at_ms: i64,
}

const ENTRY_COLUMNS: &str = "id, work_item, channel, kind, payload_json, state, attempts, next_attempt_at_ms, \
     last_error, result_json, created_at_ms, delivered_at_ms";

fn entry_from_row(r: &AnyRow) -> Result<Entry, sqlx::Error> {
    Ok(Entry {
        id: r.try_get("id")?,
        work_item: r.try_get("work_item")?,
        channel: r.try_get("channel")?,
        kind: r.try_get("kind")?,
        payload_json: r.try_get("payload_json")?,
        state: r.try_get("state")?,
        attempts: u32::try_from(r.try_get::<i64, _>("attempts")?.max(0)).unwrap_or(u32::MAX),
        next_attempt_at_ms: r.try_get("next_attempt_at_ms")?,
        last_error: r.try_get("last_error")?,
        result_json: r.try_get("result_json")?,
        created_at_ms: r.try_get("created_at_ms")?,
        delivered_at_ms: r.try_get("delivered_at_ms")?,
    })
}

/// A new entry id: uuid v7, which sorts by creation (the delivery order).
pub fn new_id() -> String {
    uuid::Uuid::now_v7().to_string()
}

/// What to add: an effect of `kind` on `channel`, its payload as JSON.
#[derive(Debug, Clone, Copy)]
pub struct NewEntry<'a> {
    pub work_item: &'a str,
    pub channel: &'a str,
    pub kind: &'a str,
    pub payload_json: &'a str,
    /// A second insert with the same key adds nothing.
    pub idempotency_key: Option<&'a str>,
}

/// One service's outbox table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outbox {
    table: &'static str,
}

impl Outbox {
    /// The outbox in `table` (a plain SQL identifier: it is written into the queries).
    pub const fn new(table: &'static str) -> Self {
        assert!(!table.is_empty(), "an outbox table needs a name");
        let b = table.as_bytes();
        let mut i = 0;
        while i < b.len() {
            assert!(
                b[i].is_ascii_lowercase() || b[i] == b'_',
                "an outbox table name is lower-case letters and '_'"
            );
            i += 1;
        }
        Outbox { table }
    }

    pub fn table(&self) -> &'static str {
        self.table
    }

    /// Adds an entry in the caller's transaction, due now. Returns its id and whether it was
    /// added (false: an entry with the same idempotency key exists; the id is then unused).
    pub async fn insert(
        &self,
        tx: &mut Transaction<'_, Any>,
        e: NewEntry<'_>,
    ) -> Result<(String, bool), sqlx::Error> {
        let id = new_id();
        let now = now_ms();
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "INSERT INTO {} (id, work_item, channel, kind, payload_json, idempotency_key, state, attempts, \
             next_attempt_at_ms, created_at_ms) VALUES ($1, $2, $3, $4, $5, $6, 'pending', 0, $7, $7) \
             ON CONFLICT DO NOTHING",
            self.table
        )))
        .bind(&id)
        .bind(e.work_item)
        .bind(e.channel)
        .bind(e.kind)
        .bind(e.payload_json)
        .bind(e.idempotency_key)
        .bind(now)
        .execute(&mut **tx)
        .await?;
        Ok((id, done.rows_affected() == 1))
    }

    /// The entry that holds `idempotency_key`.
    pub async fn by_idempotency_key(
        &self,
        db: &Db,
        key: &str,
    ) -> Result<Option<Entry>, sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENTRY_COLUMNS} FROM {} WHERE idempotency_key = $1",
            self.table
        )))
        .bind(key)
        .fetch_optional(&db.pool)
        .await?
        .as_ref()
        .map(entry_from_row)
        .transpose()
    }

    /// Lists entries, oldest first; empty filters mean any.
    pub async fn list(
        &self,
        db: &Db,
        work_item: &str,
        state: &str,
        limit: u32,
    ) -> Result<Vec<Entry>, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENTRY_COLUMNS} FROM {} WHERE ($1 = '' OR work_item = $1) AND ($2 = '' OR state = $2) \
             ORDER BY id LIMIT $3",
            self.table
        )))
        .bind(work_item)
        .bind(state)
        .bind(i64::from(limit))
        .fetch_all(&db.pool)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// How many entries are in each state.
    pub async fn counts(&self, db: &Db) -> Result<Vec<(State, u64)>, sqlx::Error> {
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT state, COUNT(*) AS n FROM {} GROUP BY state",
            self.table
        )))
        .fetch_all(&db.pool)
        .await?;
        let mut out = Vec::new();
        for r in &rows {
            let state: String = r.try_get("state")?;
            let n: i64 = r.try_get("n")?;
            if let Some(s) = State::parse(&state) {
                out.push((s, u64::try_from(n).unwrap_or(0)));
            }
        }
        Ok(out)
    }

    /// Puts `failed` entries back to `pending`, due now: the one with `id`, or (with an empty
    /// id) every failed entry of `work_item`. Returns how many.
    pub async fn retry_failed(
        &self,
        db: &Db,
        id: &str,
        work_item: &str,
    ) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET state = 'pending', next_attempt_at_ms = $1, claimed_until_ms = 0 \
             WHERE state = 'failed' AND (($2 <> '' AND id = $2) OR ($2 = '' AND work_item = $3))",
            self.table
        )))
        .bind(now_ms())
        .bind(id)
        .bind(work_item)
        .execute(&db.pool)
        .await?;
        Ok(done.rows_affected())
    }

    /// The due entries, at most `limit`: per (work item, channel) only the oldest one not
    /// yet delivered, and only when it is due (a pending entry whose time has come, or one
    /// whose deliverer's claim lapsed).
    async fn due(&self, db: &Db, now: i64, limit: u32) -> Result<Vec<Entry>, sqlx::Error> {
        let t = self.table;
        let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {ENTRY_COLUMNS} FROM {t} o \
             WHERE ((o.state = 'pending' AND o.next_attempt_at_ms <= $1) \
                 OR (o.state = 'delivering' AND o.claimed_until_ms <= $1)) \
             AND NOT EXISTS (SELECT 1 FROM {t} p WHERE p.work_item = o.work_item AND p.channel = o.channel \
                 AND p.state IN ('pending', 'delivering') AND p.id < o.id) \
             ORDER BY o.id LIMIT $2"
        )))
        .bind(now)
        .bind(i64::from(limit))
        .fetch_all(&db.pool)
        .await?;
        rows.iter().map(entry_from_row).collect()
    }

    /// How many entries of `work_item` are still to deliver (pending or being delivered):
    /// while there are, the work item is moving, whatever else is idle.
    pub async fn undelivered_of(&self, db: &Db, work_item: &str) -> Result<u64, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
            "SELECT COUNT(*) FROM {} WHERE work_item = $1 AND state IN ('pending', 'delivering')",
            self.table
        )))
        .bind(work_item)
        .fetch_one(&db.pool)
        .await?;
        Ok(u64::try_from(n).unwrap_or(0))
    }

    /// Claims a due entry for `claimant` until `until`, counting the attempt. False: another
    /// deliverer took it first.
    async fn claim(
        &self,
        db: &Db,
        id: &str,
        claimant: &str,
        now: i64,
        until: i64,
    ) -> Result<bool, sqlx::Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET state = 'delivering', claimed_until_ms = $1, claimed_by = $4, attempts = attempts + 1 \
             WHERE id = $2 AND (state = 'pending' OR (state = 'delivering' AND claimed_until_ms <= $3))",
            self.table
        )))
        .bind(until)
        .bind(id)
        .bind(now)
        .bind(claimant)
        .execute(&db.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes back, due now, what `claimant` was delivering when it last stopped: a process
    /// that restarts knows its own deliveries died with it, so they need not wait out their
    /// claim (a SIGKILLed stage-engine used to hold an enqueue for the whole claim, 120 s).
    /// Deliveries held by another live deliverer are left alone. Returns how many.
    pub async fn release_claims_of(&self, db: &Db, claimant: &str) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET state = 'pending', claimed_until_ms = 0, next_attempt_at_ms = $1 \
             WHERE state = 'delivering' AND claimed_by = $2",
            self.table
        )))
        .bind(now_ms())
        .bind(claimant)
        .execute(&db.pool)
        .await?;
        Ok(done.rows_affected())
    }

    async fn mark_delivered(
        &self,
        db: &Db,
        id: &str,
        result_json: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET state = 'delivered', delivered_at_ms = $1, last_error = '', result_json = $2, \
             claimed_until_ms = 0 WHERE id = $3",
            self.table
        )))
        .bind(now_ms())
        .bind(result_json)
        .bind(id)
        .execute(&db.pool)
        .await?;
        Ok(())
    }

    async fn reschedule(&self, db: &Db, id: &str, error: &str, at: i64) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET state = 'pending', last_error = $1, next_attempt_at_ms = $2, claimed_until_ms = 0 \
             WHERE id = $3",
            self.table
        )))
        .bind(error)
        .bind(at)
        .bind(id)
        .execute(&db.pool)
        .await?;
        Ok(())
    }

    async fn mark_failed(&self, db: &Db, id: &str, error: &str) -> Result<(), sqlx::Error> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "UPDATE {} SET state = 'failed', last_error = $1, claimed_until_ms = 0 WHERE id = $2",
            self.table
        )))
        .bind(error)
        .bind(id)
        .execute(&db.pool)
        .await?;
        Ok(())
    }
}

/// Why a delivery failed, and whether to try again.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeliveryError {
    pub retryable: bool,
    pub message: String,
}

impl DeliveryError {
    pub fn retryable(message: impl Into<String>) -> Self {
        DeliveryError {
            retryable: true,
            message: message.into(),
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        DeliveryError {
            retryable: false,
            message: message.into(),
        }
    }
}

impl From<tonic::Status> for DeliveryError {
    fn from(s: tonic::Status) -> Self {
        DeliveryError {
            retryable: is_retryable_status(&s),
            message: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

impl From<sqlx::Error> for DeliveryError {
    fn from(e: sqlx::Error) -> Self {
        DeliveryError::retryable(format!("storage: {e}"))
    }
}

/// A service's delivery of its own effects.
#[async_trait]
pub trait Deliver: Send + Sync + 'static {
    /// Delivers one entry; returns what to keep as its result (JSON).
    async fn deliver(&self, entry: &Entry) -> Result<String, DeliveryError>;
}

/// How an outbox is delivered.
#[derive(Debug, Clone)]
pub struct OutboxConfig {
    /// `<prefix>POLL_MS`: how often due entries are looked for when nothing wakes the
    /// dispatcher (a state change wakes it at once).
    pub poll: Duration,
    /// `<prefix>BACKOFF_BASE_MS` / `<prefix>BACKOFF_MAX_MS`: a failed delivery waits
    /// `min(base * 2^(attempts-1), max)`, with jitter ([`Backoff`]).
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// After this many retryable failures an entry is `failed`; 0 means retry for as long
    /// as the receiver is down (nothing is given up while a service is down).
    pub max_attempts: u32,
    /// How long one delivery may hold an entry before another deliverer may take it.
    pub claim_ttl: Duration,
    /// Entries delivered concurrently per pass (each of a different work item and channel).
    pub batch: u32,
}

/// Default delays of [`OutboxConfig::from_env`], in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Defaults {
    pub poll_ms: u64,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
}

impl OutboxConfig {
    /// Reads `<prefix>POLL_MS`, `<prefix>BACKOFF_BASE_MS` and `<prefix>BACKOFF_MAX_MS`
    /// (`prefix` ends with `_`, e.g. `ORCH_OUTBOX_`)
    /// (max_attempts 0, a 120 s claim, batches of 32); a bad value fails naming it.
    pub fn from_env(env: &Env, prefix: &str, d: Defaults) -> Result<Self, ConfigError> {
        let ms = |suffix: &str, default: u64| -> Result<(String, Duration), ConfigError> {
            let name = format!("{prefix}{suffix}");
            let v = env.parse(&name, default)?;
            Ok((name, Duration::from_millis(v)))
        };
        let (poll_name, poll) = ms("POLL_MS", d.poll_ms)?;
        let (base_name, backoff_base) = ms("BACKOFF_BASE_MS", d.backoff_base_ms)?;
        let (max_name, backoff_max) = ms("BACKOFF_MAX_MS", d.backoff_max_ms)?;
        if poll.is_zero() {
            return Err(ConfigError::new(&poll_name, "must be at least 1"));
        }
        // A zero backoff would retry a down service in a hot loop.
        if backoff_base.is_zero() {
            return Err(ConfigError::new(&base_name, "must be at least 1"));
        }
        if backoff_max < backoff_base {
            return Err(ConfigError::new(
                &max_name,
                format!("must be at least {base_name}"),
            ));
        }
        Ok(OutboxConfig {
            poll,
            backoff_base,
            backoff_max,
            max_attempts: 0,
            claim_ttl: Duration::from_secs(120),
            batch: 32,
        })
    }

    pub fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff_base, self.backoff_max)
    }
}

/// What one pass of a dispatcher did.
#[derive(Debug, Default, Clone, Copy)]
struct Pass {
    attempted: usize,
    delivered: usize,
}

/// Delivers one outbox through `D`.
pub struct Dispatcher<D> {
    pub outbox: Outbox,
    /// Who delivers (a service, or a launcher instance): its claims are its own, and the
    /// ones it held when it last stopped are taken back when it starts again.
    pub claimant: String,
    pub db: Db,
    pub deliver: Arc<D>,
    pub config: OutboxConfig,
    /// Notified by whoever adds entries: a pass starts at once.
    pub notify: Arc<Notify>,
}

impl<D> Clone for Dispatcher<D> {
    fn clone(&self) -> Self {
        Dispatcher {
            outbox: self.outbox,
            claimant: self.claimant.clone(),
            db: self.db.clone(),
            deliver: self.deliver.clone(),
            config: self.config.clone(),
            notify: self.notify.clone(),
        }
    }
}

impl<D: Deliver> Dispatcher<D> {
    /// Runs until `shutdown`: a pass whenever a state change wakes it, or every poll
    /// interval. A pass never fails as a whole: each entry's error is recorded on it.
    pub async fn run(self, shutdown: CancellationToken) {
        let outbox = self.outbox.table();
        match self
            .outbox
            .release_claims_of(&self.db, &self.claimant)
            .await
        {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                outbox,
                claimant = self.claimant,
                released = n,
                "took back the deliveries a previous life left claimed"
            ),
            // Not fatal: those entries are delivered once their claims lapse.
            Err(e) => tracing::warn!(outbox, error = %e, "cannot take back earlier claims"),
        }
        tracing::info!(outbox, "outbox dispatcher started");
        loop {
            loop {
                match self.pass().await {
                    // A full batch: more may be due at once. A delivery: the next entry of
                    // its channel is due now (without this, a chain of k ordered entries
                    // would take k - 1 poll intervals). Otherwise every due entry was
                    // attempted (failures wait out their backoff): wait for a wake-up.
                    Ok(p)
                        if (p.attempted >= self.config.batch as usize || p.delivered > 0)
                            && !shutdown.is_cancelled() => {}
                    Ok(_) => break,
                    Err(e) => {
                        tracing::warn!(outbox, error = %e, "outbox pass failed");
                        break;
                    }
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = self.notify.notified() => {}
                () = tokio::time::sleep(self.config.poll) => {}
            }
        }
        tracing::info!(outbox, "outbox dispatcher stopped");
    }

    /// Delivers the entries that are due (one per work item and channel, the oldest), all
    /// at once; returns how many were attempted.
    pub async fn deliver_due(&self) -> Result<usize, sqlx::Error> {
        Ok(self.pass().await?.attempted)
    }

    async fn pass(&self) -> Result<Pass, sqlx::Error> {
        let now = now_ms();
        let entries = self.outbox.due(&self.db, now, self.config.batch).await?;
        let mut tasks = tokio::task::JoinSet::new();
        let mut pass = Pass::default();
        for entry in entries {
            let until =
                now_ms() + i64::try_from(self.config.claim_ttl.as_millis()).unwrap_or(i64::MAX);
            if !self
                .outbox
                .claim(&self.db, &entry.id, &self.claimant, now, until)
                .await?
            {
                continue;
            }
            pass.attempted += 1;
            let this = self.clone();
            tasks.spawn(async move { this.deliver_and_record(entry).await });
        }
        while let Some(joined) = tasks.join_next().await {
            match joined {
                Ok(true) => pass.delivered += 1,
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(outbox = self.outbox.table(), error = %e, "an outbox delivery panicked");
                }
            }
        }
        Ok(pass)
    }

    /// Delivers one claimed entry and records how it went; true when it was delivered.
    async fn deliver_and_record(&self, entry: Entry) -> bool {
        let outbox = self.outbox.table();
        let attempts = entry.attempts + 1;
        let result = self.deliver.deliver(&entry).await;
        let delivered = result.is_ok();
        let recorded = match result {
            Ok(result_json) => {
                tracing::debug!(
                    outbox,
                    id = entry.id,
                    work_item = entry.work_item,
                    kind = entry.kind,
                    attempts,
                    "outbox entry delivered"
                );
                self.outbox
                    .mark_delivered(&self.db, &entry.id, &result_json)
                    .await
            }
            Err(e) => {
                let give_up = !e.retryable
                    || (self.config.max_attempts > 0 && attempts >= self.config.max_attempts);
                if give_up {
                    tracing::error!(
                        outbox,
                        id = entry.id,
                        work_item = entry.work_item,
                        kind = entry.kind,
                        attempts,
                        error = e.message,
                        "outbox entry failed for good"
                    );
                    self.outbox
                        .mark_failed(&self.db, &entry.id, &e.message)
                        .await
                } else {
                    let delay = self.config.backoff().delay(attempts);
                    tracing::warn!(
                        outbox,
                        id = entry.id,
                        work_item = entry.work_item,
                        kind = entry.kind,
                        attempts,
                        retry_in_ms = delay.as_millis() as u64,
                        error = e.message,
                        "outbox delivery failed; will retry"
                    );
                    let at = now_ms() + i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                    self.outbox
                        .reschedule(&self.db, &entry.id, &e.message, at)
                        .await
                }
            }
        };
        if let Err(e) = recorded {
            // The claim lapses and the entry is delivered again: every receiver is idempotent.
            tracing::error!(outbox, id = entry.id, error = %e, "cannot record an outbox delivery");
            return false;
        }
        delivered
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_ids_sort_in_creation_order() {
        // The delivery order is the id order: ids made one after the other must sort so,
        // even within one millisecond.
        let ids: Vec<String> = (0..10_000).map(|_| new_id()).collect();
        assert!(ids.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn states_round_trip() {
        for s in State::ALL {
            assert_eq!(State::parse(s.as_str()), Some(s));
        }
        assert_eq!(State::parse("lost"), None);
    }

    #[test]
    fn the_config_names_a_bad_value() {
        let d = Defaults {
            poll_ms: 1_000,
            backoff_base_ms: 500,
            backoff_max_ms: 30_000,
        };
        let env = |pairs: &[(&str, &str)]| {
            Env::from_pairs(
                pairs
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), (*v).to_owned())),
            )
        };
        let c = OutboxConfig::from_env(&env(&[]), "TEST_OUTBOX_", d).expect("defaults");
        assert_eq!(
            (c.poll, c.backoff_base, c.backoff_max, c.max_attempts),
            (
                Duration::from_secs(1),
                Duration::from_millis(500),
                Duration::from_secs(30),
                0
            )
        );
        for (pairs, culprit) in [
            (vec![("TEST_OUTBOX_POLL_MS", "0")], "TEST_OUTBOX_POLL_MS"),
            (
                vec![("TEST_OUTBOX_BACKOFF_BASE_MS", "0")],
                "TEST_OUTBOX_BACKOFF_BASE_MS",
            ),
            (
                vec![("TEST_OUTBOX_BACKOFF_MAX_MS", "10")],
                "TEST_OUTBOX_BACKOFF_MAX_MS",
            ),
            (vec![("TEST_OUTBOX_POLL_MS", "soon")], "TEST_OUTBOX_POLL_MS"),
        ] {
            let e = OutboxConfig::from_env(&env(&pairs), "TEST_OUTBOX_", d).expect_err("bad");
            assert!(e.to_string().contains(culprit), "{e}");
        }
    }
}
