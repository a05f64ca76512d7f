//! The launcher's tables: jobs, launcher_instances, breaker (the outbox is
//! [`crate::outbox`]'s, written here in the transaction that ends a run).
//!
//! Every write about a run is guarded by `status = 'running' AND attempt = $n`: the attempt
//! is the fencing token, so a late writer from an earlier run (or a second finalizer)
//! changes nothing and learns it from the row count.

use std::fmt;
use std::str::FromStr;

use orchestrator_kit::{Backend, Db};
use sqlx::Row;
use sqlx::any::AnyRow;

use crate::outbox::Effect;

/// A job's kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Runs an LLM agent; counts against `ORCH_MAX_CONCURRENCY`.
    Llm,
    /// A no-LLM job run as an RPC (deploy-finalizer, post-deploy-monitor).
    Reserved,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Llm => "llm",
            Kind::Reserved => "reserved",
        }
    }
}

impl FromStr for Kind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "llm" => Ok(Kind::Llm),
            "reserved" => Ok(Kind::Reserved),
            _ => Err(format!("unknown job kind '{s}'")),
        }
    }
}

/// A job's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl Status {
    pub const ALL: [Status; 5] = [
        Status::Queued,
        Status::Running,
        Status::Succeeded,
        Status::Failed,
        Status::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::Running => "running",
            Status::Succeeded => "succeeded",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Succeeded | Status::Failed | Status::Cancelled)
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Status {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Status::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown job status '{s}'"))
    }
}

/// One job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub work_item: String,
    pub repo: String,
    pub agent: String,
    pub stage: String,
    pub kind: Kind,
    pub payload_json: String,
    pub dedupe_key: Option<String>,
    pub status: Status,
    pub attempt: u32,
    pub max_attempts: u32,
    pub failures: u32,
    pub transient_attempts: u32,
    pub not_before_ms: i64,
    pub instance_id: String,
    pub pid: Option<i64>,
    pub exit_code: Option<i32>,
    pub enqueued_at_ms: i64,
    pub started_at_ms: i64,
    pub heartbeat_at_ms: i64,
    pub finished_at_ms: i64,
    pub log_path: String,
    pub outcome: String,
    pub reason: String,
    pub qg_hook_blocks: u32,
    /// The profile in force for the latest run (JSON), `""` before one started.
    pub profile_json: String,
}

const COLUMNS: &str = "id, work_item, repo, agent, stage, kind, payload_json, dedupe_key, status, attempt, \
     max_attempts, failures, transient_attempts, not_before_ms, instance_id, pid, exit_code, enqueued_at_ms, \
     started_at_ms, heartbeat_at_ms, finished_at_ms, log_path, outcome, reason, qg_hook_blocks, profile_json";

fn u32_of(v: i64) -> u32 {
    u32::try_from(v.max(0)).unwrap_or(u32::MAX)
}

fn decode(e: String) -> sqlx::Error {
    sqlx::Error::Decode(e.into())
}

fn from_row(row: &AnyRow) -> Result<JobRow, sqlx::Error> {
    Ok(JobRow {
        id: row.try_get("id")?,
        work_item: row.try_get("work_item")?,
        repo: row.try_get("repo")?,
        agent: row.try_get("agent")?,
        stage: row.try_get("stage")?,
        kind: row.try_get::<String, _>("kind")?.parse().map_err(decode)?,
        payload_json: row.try_get("payload_json")?,
        dedupe_key: row.try_get("dedupe_key")?,
        status: row
            .try_get::<String, _>("status")?
            .parse()
            .map_err(decode)?,
        attempt: u32_of(row.try_get("attempt")?),
        max_attempts: u32_of(row.try_get("max_attempts")?),
        failures: u32_of(row.try_get("failures")?),
        transient_attempts: u32_of(row.try_get("transient_attempts")?),
        not_before_ms: row.try_get("not_before_ms")?,
        instance_id: row.try_get("instance_id")?,
        pid: row.try_get("pid")?,
        exit_code: row
            .try_get::<Option<i64>, _>("exit_code")?
            .and_then(|c| i32::try_from(c).ok()),
        enqueued_at_ms: row.try_get("enqueued_at_ms")?,
        started_at_ms: row.try_get("started_at_ms")?,
        heartbeat_at_ms: row.try_get("heartbeat_at_ms")?,
        finished_at_ms: row.try_get("finished_at_ms")?,
        log_path: row.try_get("log_path")?,
        outcome: row.try_get("outcome")?,
        reason: row.try_get("reason")?,
        qg_hook_blocks: u32_of(row.try_get("qg_hook_blocks")?),
        profile_json: row.try_get("profile_json")?,
    })
}

/// A job to add.
#[derive(Debug, Clone)]
pub struct NewJob {
    pub id: String,
    pub work_item: String,
    pub repo: String,
    pub agent: String,
    pub stage: String,
    pub kind: Kind,
    pub payload_json: String,
    pub dedupe_key: Option<String>,
    pub max_attempts: u32,
    pub not_before_ms: i64,
    pub now_ms: i64,
}

/// The PostgreSQL channel an enqueue notifies and every replica listens on.
pub const JOBS_CHANNEL: &str = "launcher_jobs";

/// Adds a job; with a dedupe key already used, returns the first job and `false`.
pub async fn enqueue(db: &Db, j: &NewJob) -> Result<(JobRow, bool), sqlx::Error> {
    let done = sqlx::query(
        "INSERT INTO jobs (id, work_item, repo, agent, stage, kind, payload_json, dedupe_key, status, attempt, \
         max_attempts, failures, transient_attempts, not_before_ms, instance_id, pid, exit_code, enqueued_at_ms, \
         started_at_ms, heartbeat_at_ms, finished_at_ms, log_path, outcome, reason, qg_hook_blocks) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, 'queued', 0, $9, 0, 0, $10, '', NULL, NULL, $11, 0, 0, 0, '', '', '', 0) \
         ON CONFLICT (dedupe_key) DO NOTHING",
    )
    .bind(&j.id)
    .bind(&j.work_item)
    .bind(&j.repo)
    .bind(&j.agent)
    .bind(&j.stage)
    .bind(j.kind.as_str())
    .bind(&j.payload_json)
    .bind(j.dedupe_key.clone())
    .bind(i64::from(j.max_attempts))
    .bind(j.not_before_ms)
    .bind(j.now_ms)
    .execute(&db.pool)
    .await?;
    let created = done.rows_affected() == 1;
    if created && db.backend == Backend::Postgres {
        // Every replica's dispatcher hears of it at once (a hint: the poll stays the
        // fallback, so a lost notification only costs a poll).
        sqlx::query("SELECT pg_notify($1, '')")
            .bind(JOBS_CHANNEL)
            .execute(&db.pool)
            .await?;
    }
    let row = if created {
        get(db, &j.id).await?
    } else {
        match &j.dedupe_key {
            Some(k) => get_by_dedupe(db, k).await?,
            None => None,
        }
    };
    let row = row.ok_or_else(|| decode("the enqueued job vanished".into()))?;
    Ok((row, created))
}

pub async fn get(db: &Db, id: &str) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs WHERE id = $1"
    )))
    .bind(id)
    .fetch_optional(&db.pool)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

async fn get_by_dedupe(db: &Db, key: &str) -> Result<Option<JobRow>, sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs WHERE dedupe_key = $1"
    )))
    .bind(key)
    .fetch_optional(&db.pool)
    .await?
    .as_ref()
    .map(from_row)
    .transpose()
}

/// Filters of [`list`]; empty means any.
#[derive(Debug, Default)]
pub struct ListFilter<'a> {
    pub status: &'a str,
    pub work_item: &'a str,
    pub repo: &'a str,
    pub agent: &'a str,
    pub limit: u32,
}

/// Jobs matching the filter, newest first.
pub async fn list(db: &Db, f: &ListFilter<'_>) -> Result<Vec<JobRow>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs \
         WHERE ($1 = '' OR status = $1) AND ($2 = '' OR work_item = $2) AND ($3 = '' OR repo = $3) \
         AND ($4 = '' OR agent = $4) \
         ORDER BY enqueued_at_ms DESC, id DESC LIMIT $5"
    )))
    .bind(f.status)
    .bind(f.work_item)
    .bind(f.repo)
    .bind(f.agent)
    .bind(i64::from(f.limit))
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// Every running job, oldest start first.
pub async fn running(db: &Db) -> Result<Vec<JobRow>, sqlx::Error> {
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM jobs WHERE status = 'running' ORDER BY started_at_ms, id"
    )))
    .fetch_all(&db.pool)
    .await?;
    rows.iter().map(from_row).collect()
}

/// What judging a running job's liveness needs of it: a narrow row, because the reaper
/// asks for every running job each tick (the full row is several times larger).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningRun {
    pub id: String,
    pub attempt: u32,
    pub instance_id: String,
    pub pid: Option<i64>,
    pub exit_code: Option<i32>,
    pub started_at_ms: i64,
    pub heartbeat_at_ms: i64,
}

/// Every running run, narrow (see [`RunningRun`]), in the order of [`running`].
pub async fn running_runs(db: &Db) -> Result<Vec<RunningRun>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, attempt, instance_id, pid, exit_code, started_at_ms, heartbeat_at_ms \
         FROM jobs WHERE status = 'running' ORDER BY started_at_ms, id",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(RunningRun {
                id: r.try_get(0)?,
                attempt: u32_of(r.try_get(1)?),
                instance_id: r.try_get(2)?,
                pid: r.try_get(3)?,
                exit_code: r
                    .try_get::<Option<i64>, _>(4)?
                    .and_then(|c| i32::try_from(c).ok()),
                started_at_ms: r.try_get(5)?,
                heartbeat_at_ms: r.try_get(6)?,
            })
        })
        .collect()
}

/// Jobs per status.
pub async fn counts(db: &Db) -> Result<Vec<(Status, u64)>, sqlx::Error> {
    let rows = sqlx::query("SELECT status, COUNT(*) AS n FROM jobs GROUP BY status")
        .fetch_all(&db.pool)
        .await?;
    let mut out = Vec::new();
    for r in &rows {
        let s: Status = r.try_get::<String, _>("status")?.parse().map_err(decode)?;
        out.push((s, u64::try_from(r.try_get::<i64, _>("n")?).unwrap_or(0)));
    }
    Ok(out)
}

/// Queued jobs whose last run ended with `outcome` (e.g. the jobs waiting for a spending
/// ceiling).
pub async fn count_queued_with_outcome(db: &Db, outcome: &str) -> Result<u64, sqlx::Error> {
    let row =
        sqlx::query("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued' AND outcome = $1")
            .bind(outcome)
            .fetch_one(&db.pool)
            .await?;
    Ok(u64::try_from(row.try_get::<i64, _>("n")?).unwrap_or(0))
}

/// Makes the queued jobs whose last run ended with `outcome` runnable now (a launcher that
/// starts with a raised ceiling looks at once instead of at their next recheck).
pub async fn wake_queued_with_outcome(
    db: &Db,
    outcome: &str,
    now_ms: i64,
) -> Result<u64, sqlx::Error> {
    let r = sqlx::query(
        "UPDATE jobs SET not_before_ms = $2 WHERE status = 'queued' AND outcome = $1 \
         AND not_before_ms > $2",
    )
    .bind(outcome)
    .bind(now_ms)
    .execute(&db.pool)
    .await?;
    Ok(r.rows_affected())
}

/// The earliest `not_before` of a queued job that is not runnable yet, if any (the
/// dispatcher sleeps until then at most).
pub async fn next_due(db: &Db, now_ms: i64) -> Result<Option<i64>, sqlx::Error> {
    let row = sqlx::query(
        "SELECT MIN(not_before_ms) AS at FROM jobs WHERE status = 'queued' AND not_before_ms > $1",
    )
    .bind(now_ms)
    .fetch_one(&db.pool)
    .await?;
    row.try_get::<Option<i64>, _>("at")
}

/// Which kinds a claim may take.
#[derive(Debug, Clone, Copy)]
pub struct ClaimFilter {
    pub llm: bool,
    pub reserved: bool,
    pub max_concurrency: u32,
}

/// Claims the oldest runnable job this instance may take, in ONE statement: an LLM job only
/// while fewer than `max_concurrency` LLM jobs run (across every replica), a reserved job
/// whatever the LLM slots. Marks it running at the next attempt, owned by `instance_id`.
///
/// PostgreSQL: `FOR UPDATE SKIP LOCKED`, so replicas never claim the same row; claims that
/// may take an LLM job also take a transaction-scoped advisory lock first, so that two
/// replicas cannot both see the last free slot.
/// SQLite: one writer at a time; a single `UPDATE ... WHERE id = (SELECT ...) RETURNING`.
pub async fn claim(
    db: &Db,
    instance_id: &str,
    now_ms: i64,
    f: ClaimFilter,
) -> Result<Option<JobRow>, sqlx::Error> {
    if !f.llm && !f.reserved {
        return Ok(None);
    }
    let lock = if db.backend == Backend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let sql = format!(
        "UPDATE jobs SET status = 'running', attempt = attempt + 1, instance_id = $2, started_at_ms = $1, \
         heartbeat_at_ms = $1, pid = NULL, exit_code = NULL, finished_at_ms = 0, outcome = '', qg_hook_blocks = 0, \
         log_path = '' \
         WHERE id = (SELECT id FROM jobs WHERE status = 'queued' AND not_before_ms <= $1 \
           AND ((kind = 'reserved' AND $3 = 1) OR (kind = 'llm' AND $4 = 1 AND \
                (SELECT COUNT(*) FROM jobs r WHERE r.status = 'running' AND r.kind = 'llm') < $5)) \
           ORDER BY enqueued_at_ms, id LIMIT 1{lock}) \
         AND status = 'queued' RETURNING {COLUMNS}"
    );
    let q = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(now_ms)
        .bind(instance_id)
        .bind(i64::from(f.reserved))
        .bind(i64::from(f.llm))
        .bind(i64::from(f.max_concurrency));
    let row = if db.backend == Backend::Postgres && f.llm {
        let mut tx = db.pool.begin().await?;
        sqlx::query("SELECT pg_advisory_xact_lock(7274001)")
            .execute(&mut *tx)
            .await?;
        let row = q.fetch_optional(&mut *tx).await?;
        tx.commit().await?;
        row
    } else {
        q.fetch_optional(&db.pool).await?
    };
    row.as_ref().map(from_row).transpose()
}

/// Claims up to `limit` runnable LLM jobs at once, oldest first, within the LLM slots free
/// across every replica (`max_concurrency` minus the LLM jobs running): in one
/// transaction, the running count and then ONE claim statement with that many. On
/// PostgreSQL the transaction first takes the advisory lock every LLM claim takes, so two
/// replicas never both count the same free slot.
pub async fn claim_llm(
    db: &Db,
    instance_id: &str,
    now_ms: i64,
    max_concurrency: u32,
    limit: u32,
) -> Result<Vec<JobRow>, sqlx::Error> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let mut tx = db.pool.begin().await?;
    if db.backend == Backend::Postgres {
        sqlx::query("SELECT pg_advisory_xact_lock(7274001)")
            .execute(&mut *tx)
            .await?;
    }
    let running: i64 =
        sqlx::query("SELECT COUNT(*) FROM jobs WHERE status = 'running' AND kind = 'llm'")
            .fetch_one(&mut *tx)
            .await?
            .try_get(0)?;
    let free = max_concurrency.saturating_sub(u32::try_from(running).unwrap_or(u32::MAX));
    let n = free.min(limit);
    let jobs = claim_batch(&mut tx, db.backend, Kind::Llm, instance_id, now_ms, n).await?;
    tx.commit().await?;
    Ok(jobs)
}

/// Claims up to `limit` runnable reserved jobs at once, oldest first (no LLM slot
/// involved, so no advisory lock: `SKIP LOCKED` alone keeps replicas apart).
pub async fn claim_reserved(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    instance_id: &str,
    now_ms: i64,
    limit: u32,
) -> Result<Vec<JobRow>, sqlx::Error> {
    claim_batch(conn, backend, Kind::Reserved, instance_id, now_ms, limit).await
}

/// The one statement that claims up to `limit` runnable jobs of `kind`, oldest first.
async fn claim_batch(
    conn: &mut sqlx::AnyConnection,
    backend: Backend,
    kind: Kind,
    instance_id: &str,
    now_ms: i64,
    limit: u32,
) -> Result<Vec<JobRow>, sqlx::Error> {
    if limit == 0 {
        return Ok(Vec::new());
    }
    let lock = if backend == Backend::Postgres {
        " FOR UPDATE SKIP LOCKED"
    } else {
        ""
    };
    let kind = kind.as_str();
    // The limit is written into the statement (a number of ours, one prepared statement
    // per size): with it a parameter, PostgreSQL's generic plan is a sequential scan, so it
    // plans every claim afresh — a fifth of its time under a stream of claims. With it
    // literal, the generic plan is the index scan and is kept.
    // The pick is a materialized CTE: evaluated exactly once. (As a plain `IN (SELECT ...
    // LIMIT n FOR UPDATE SKIP LOCKED)`, PostgreSQL may run the subquery again for a
    // semi-join and so take more than `n` rows.)
    let rows = sqlx::query(sqlx::AssertSqlSafe(format!(
        "WITH picked AS MATERIALIZED (SELECT id FROM jobs WHERE status = 'queued' AND not_before_ms <= $1 \
           AND kind = '{kind}' ORDER BY enqueued_at_ms, id LIMIT {limit}{lock}) \
         UPDATE jobs SET status = 'running', attempt = attempt + 1, instance_id = $2, started_at_ms = $1, \
         heartbeat_at_ms = $1, pid = NULL, exit_code = NULL, finished_at_ms = 0, outcome = '', qg_hook_blocks = 0, \
         log_path = '' \
         WHERE id IN (SELECT id FROM picked) AND status = 'queued' RETURNING {COLUMNS}"
    )))
    .bind(now_ms)
    .bind(instance_id)
    .fetch_all(&mut *conn)
    .await?;
    let mut jobs: Vec<JobRow> = rows.iter().map(from_row).collect::<Result<_, _>>()?;
    jobs.sort_by(|a, b| (a.enqueued_at_ms, &a.id).cmp(&(b.enqueued_at_ms, &b.id)));
    Ok(jobs)
}

/// Records the profile in force for this run (before the spawn).
pub async fn set_profile(
    db: &Db,
    id: &str,
    attempt: u32,
    profile_json: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET profile_json = $3 WHERE id = $1 AND attempt = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(i64::from(attempt))
    .bind(profile_json)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Records where the run's log is (before the spawn, so a spawn failure can be read).
pub async fn set_log_path(
    db: &Db,
    id: &str,
    attempt: u32,
    path: &str,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET log_path = $3 WHERE id = $1 AND attempt = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(i64::from(attempt))
    .bind(path)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Stamps the agent's pid right after the spawn. False: the run was flipped meanwhile.
pub async fn stamp_pid(
    db: &Db,
    id: &str,
    attempt: u32,
    instance_id: &str,
    pid: i64,
    now_ms: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET pid = $3, instance_id = $4, heartbeat_at_ms = $5 \
         WHERE id = $1 AND attempt = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(i64::from(attempt))
    .bind(pid)
    .bind(instance_id)
    .bind(now_ms)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Stamps the exit code as soon as the agent is reaped, before anything slow: a job with
/// an exit code that is still running tells the reaper "the launcher died between wait
/// and finalize".
pub async fn stamp_exit(db: &Db, id: &str, attempt: u32, code: i32) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE jobs SET exit_code = $3 WHERE id = $1 AND attempt = $2 AND status = 'running'",
    )
    .bind(id)
    .bind(i64::from(attempt))
    .bind(i64::from(code))
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// The end of a run: where the job goes next.
#[derive(Debug, Clone)]
pub struct Settle {
    /// queued (a retry or a hand-back), or a terminal status.
    pub status: Status,
    pub not_before_ms: i64,
    pub failures: u32,
    pub transient_attempts: u32,
    pub outcome: String,
    pub reason: String,
    /// Overwrites the stamped exit code when set.
    pub exit_code: Option<i32>,
    pub qg_hook_blocks: Option<u32>,
    pub now_ms: i64,
}

/// Ends run `attempt` of job `id` — only if it is still running at that attempt. Returns
/// the job as written, or `None` when someone else ended that run first.
pub async fn settle(
    db: &Db,
    id: &str,
    attempt: u32,
    s: &Settle,
) -> Result<Option<JobRow>, sqlx::Error> {
    settle_with(db, id, attempt, s, &[]).await
}

/// [`settle`], and in the same transaction — only when this write ended the run — the
/// run's `effects` on its peers into the outbox ([`crate::outbox`]): the end of a run and
/// what it must tell the others commit together or not at all.
pub async fn settle_with(
    db: &Db,
    id: &str,
    attempt: u32,
    s: &Settle,
    effects: &[Effect],
) -> Result<Option<JobRow>, sqlx::Error> {
    let entry = SettleEntry {
        id: id.to_owned(),
        attempt,
        settle: s.clone(),
        effects: effects.to_vec(),
    };
    let mut tx = db.pool.begin().await?;
    let row = settle_in(&mut tx, &entry).await?;
    if row.is_some() {
        tx.commit().await?;
    }
    Ok(row)
}

type AnyQuery<'q> = sqlx::query::Query<'q, sqlx::Any, sqlx::any::AnyArguments>;

/// Binds one end's 13 parameters, in [`SETTLE_VALUES`]'s order.
fn bind_settle<'q>(q: AnyQuery<'q>, e: &'q SettleEntry) -> AnyQuery<'q> {
    let s = &e.settle;
    let finished = if s.status.is_terminal() { s.now_ms } else { 0 };
    q.bind(&e.id)
        .bind(i64::from(e.attempt))
        .bind(s.status.as_str())
        .bind(s.not_before_ms)
        .bind(i64::from(s.failures))
        .bind(i64::from(s.transient_attempts))
        .bind(&s.outcome)
        .bind(&s.reason)
        .bind(finished)
        .bind(i64::from(s.exit_code.is_some()))
        .bind(i64::from(s.exit_code.unwrap_or(0)))
        .bind(i64::from(s.qg_hook_blocks.is_some()))
        .bind(i64::from(s.qg_hook_blocks.unwrap_or(0)))
}

/// One guarded end and, when it ended the run, its effects, inside `tx`.
async fn settle_in(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    e: &SettleEntry,
) -> Result<Option<JobRow>, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET status = $3, not_before_ms = $4, failures = $5, transient_attempts = $6, \
         outcome = $7, reason = $8, finished_at_ms = $9, \
         exit_code = CASE WHEN $10 = 1 THEN $11 ELSE exit_code END, \
         qg_hook_blocks = CASE WHEN $12 = 1 THEN $13 ELSE qg_hook_blocks END \
         WHERE id = $1 AND attempt = $2 AND status = 'running' RETURNING {COLUMNS}"
    )));
    let row = bind_settle(row, e).fetch_optional(&mut **tx).await?;
    let Some(row) = row.as_ref().map(from_row).transpose()? else {
        return Ok(None);
    };
    for effect in &e.effects {
        crate::outbox::insert(tx, &row.work_item, effect).await?;
    }
    Ok(Some(row))
}

/// One run's end in a [`settle_many`] batch: [`settle_with`]'s arguments.
#[derive(Debug, Clone)]
pub struct SettleEntry {
    pub id: String,
    pub attempt: u32,
    pub settle: Settle,
    pub effects: Vec<Effect>,
}

/// The columns of one entry in [`settle_many`]'s `VALUES` (named apart from `jobs`'s own,
/// so that `RETURNING {COLUMNS}` stays unambiguous on PostgreSQL).
const SETTLE_VALUES: &str = "v_id, v_attempt, v_status, v_not_before_ms, v_failures, v_transient_attempts, \
     v_outcome, v_reason, v_finished_at_ms, v_set_exit, v_exit_code, v_set_qg, v_qg_hook_blocks";
const SETTLE_PARAMS: usize = 13;

/// [`settle_with`] for many runs at once — the group commit of run ends: ONE guarded
/// `UPDATE ... FROM (VALUES ...) RETURNING` for every entry and their outbox rows, in one
/// transaction (one commit, one WAL flush, however many runs ended meanwhile). Each entry's
/// answer is as [`settle_with`]'s, in order: the job as written, or `None` when that run had
/// already been ended by someone else. A job named twice (two ends of one run racing) is
/// written once in the statement and then again alone, after it in the same transaction, so
/// that the second sees the first's end exactly as it would have in two transactions.
pub async fn settle_many(
    conn: &mut sqlx::AnyConnection,
    entries: &[SettleEntry],
) -> Result<Vec<Option<JobRow>>, sqlx::Error> {
    let mut seen = std::collections::HashSet::new();
    let (first, repeats): (Vec<usize>, Vec<usize>) =
        (0..entries.len()).partition(|&i| seen.insert(entries[i].id.as_str()));
    let mut out: Vec<Option<JobRow>> = vec![None; entries.len()];
    if first.is_empty() {
        return Ok(out);
    }
    // Padded to a power of two (rows that match no job: the empty id): a handful of
    // statement shapes, each prepared once per connection, instead of one per batch size.
    let shape = first.len().next_power_of_two();
    let rows: Vec<String> = (0..shape)
        .map(|i| {
            let p: Vec<String> = (1..=SETTLE_PARAMS)
                .map(|k| format!("${}", i * SETTLE_PARAMS + k))
                .collect();
            format!("({})", p.join(", "))
        })
        .collect();
    let sql = format!(
        "WITH v ({SETTLE_VALUES}) AS (VALUES {}) \
         UPDATE jobs SET status = v_status, not_before_ms = v_not_before_ms, failures = v_failures, \
         transient_attempts = v_transient_attempts, outcome = v_outcome, reason = v_reason, \
         finished_at_ms = v_finished_at_ms, \
         exit_code = CASE WHEN v_set_exit = 1 THEN v_exit_code ELSE exit_code END, \
         qg_hook_blocks = CASE WHEN v_set_qg = 1 THEN v_qg_hook_blocks ELSE qg_hook_blocks END \
         FROM v WHERE id = v_id AND attempt = v_attempt AND status = 'running' RETURNING {COLUMNS}",
        rows.join(", ")
    );
    // Matches no job: no id is empty, and a running job's attempt is at least 1.
    let pad = SettleEntry {
        id: String::new(),
        attempt: 0,
        settle: Settle {
            status: Status::Queued,
            not_before_ms: 0,
            failures: 0,
            transient_attempts: 0,
            outcome: String::new(),
            reason: String::new(),
            exit_code: None,
            qg_hook_blocks: None,
            now_ms: 0,
        },
        effects: Vec::new(),
    };
    let mut q = sqlx::query(sqlx::AssertSqlSafe(sql));
    for e in first.iter().map(|&i| &entries[i]) {
        q = bind_settle(q, e);
    }
    for _ in first.len()..shape {
        q = bind_settle(q, &pad);
    }
    if repeats.is_empty() && entries.iter().all(|e| e.effects.is_empty()) {
        // Nothing else to write with them: one statement, its own transaction.
        let mut written = by_id(&q.fetch_all(&mut *conn).await?)?;
        for &i in &first {
            out[i] = written.remove(&entries[i].id);
        }
        return Ok(out);
    }
    let mut tx = sqlx::Connection::begin(&mut *conn).await?;
    let mut written = by_id(&q.fetch_all(&mut *tx).await?)?;
    for &i in &first {
        let row = written.remove(&entries[i].id);
        if let Some(row) = &row {
            for effect in &entries[i].effects {
                crate::outbox::insert(&mut tx, &row.work_item, effect).await?;
            }
        }
        out[i] = row;
    }
    for &i in &repeats {
        out[i] = settle_in(&mut tx, &entries[i]).await?;
    }
    tx.commit().await?;
    Ok(out)
}

/// The rows a statement returned, by job id.
fn by_id(rows: &[AnyRow]) -> Result<std::collections::HashMap<String, JobRow>, sqlx::Error> {
    rows.iter()
        .map(|r| from_row(r).map(|j| (j.id.clone(), j)))
        .collect()
}

/// Cancels a queued job (a running one is cancelled through [`settle`]).
pub async fn cancel_queued(
    db: &Db,
    id: &str,
    reason: &str,
    now_ms: i64,
) -> Result<Option<JobRow>, sqlx::Error> {
    let row = sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE jobs SET status = 'cancelled', outcome = 'cancelled', reason = $2, finished_at_ms = $3 \
         WHERE id = $1 AND status = 'queued' RETURNING {COLUMNS}"
    )))
    .bind(id)
    .bind(reason)
    .bind(now_ms)
    .fetch_optional(&db.pool)
    .await?;
    row.as_ref().map(from_row).transpose()
}

/// Heartbeats the runs this instance still sees alive; returns the ids still running at
/// their attempt (a missing id was ended by someone else: its process must go).
pub async fn heartbeat_jobs(
    db: &Db,
    runs: &[(String, u32)],
    now_ms: i64,
) -> Result<Vec<String>, sqlx::Error> {
    let mut alive = Vec::new();
    // Small batches keep the statement short on both backends.
    for chunk in runs.chunks(200) {
        let mut sql =
            String::from("UPDATE jobs SET heartbeat_at_ms = $1 WHERE status = 'running' AND (");
        for i in 0..chunk.len() {
            if i > 0 {
                sql.push_str(" OR ");
            }
            sql.push_str(&format!(
                "(id = ${} AND attempt = ${})",
                2 + 2 * i,
                3 + 2 * i
            ));
        }
        sql.push_str(") RETURNING id");
        let mut q = sqlx::query(sqlx::AssertSqlSafe(sql)).bind(now_ms);
        for (id, attempt) in chunk {
            q = q.bind(id.clone()).bind(i64::from(*attempt));
        }
        for r in q.fetch_all(&db.pool).await? {
            alive.push(r.try_get::<String, _>("id")?);
        }
    }
    Ok(alive)
}

/// A launcher instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub host: String,
    pub started_at_ms: i64,
    pub heartbeat_at_ms: i64,
    pub stopped_at_ms: i64,
}

/// Registers (or re-registers after a restart) an instance.
pub async fn register_instance(
    db: &Db,
    id: &str,
    host: &str,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO launcher_instances (id, host, started_at_ms, heartbeat_at_ms, stopped_at_ms) \
         VALUES ($1, $2, $3, $3, 0) \
         ON CONFLICT (id) DO UPDATE SET host = $2, started_at_ms = $3, heartbeat_at_ms = $3, stopped_at_ms = 0",
    )
    .bind(id)
    .bind(host)
    .bind(now_ms)
    .execute(&db.pool)
    .await?;
    Ok(())
}

pub async fn heartbeat_instance(db: &Db, id: &str, now_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE launcher_instances SET heartbeat_at_ms = $2 WHERE id = $1")
        .bind(id)
        .bind(now_ms)
        .execute(&db.pool)
        .await?;
    Ok(())
}

/// Marks an instance stopped (a clean shutdown): it counts as gone at once.
pub async fn stop_instance(db: &Db, id: &str, now_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query("UPDATE launcher_instances SET stopped_at_ms = $2 WHERE id = $1")
        .bind(id)
        .bind(now_ms)
        .execute(&db.pool)
        .await?;
    Ok(())
}

pub async fn instances(db: &Db) -> Result<Vec<Instance>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT id, host, started_at_ms, heartbeat_at_ms, stopped_at_ms FROM launcher_instances ORDER BY id",
    )
    .fetch_all(&db.pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(Instance {
                id: r.try_get("id")?,
                host: r.try_get("host")?,
                started_at_ms: r.try_get("started_at_ms")?,
                heartbeat_at_ms: r.try_get("heartbeat_at_ms")?,
                stopped_at_ms: r.try_get("stopped_at_ms")?,
            })
        })
        .collect()
}

/// The breaker row.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct BreakerRow {
    pub state: String,
    pub consecutive_transient: u32,
    pub open_until_ms: i64,
    pub probe_job_id: String,
    pub probe_started_ms: i64,
}

pub async fn breaker(db: &Db) -> Result<BreakerRow, sqlx::Error> {
    let r = sqlx::query(
        "SELECT state, consecutive_transient, open_until_ms, probe_job_id, probe_started_ms FROM breaker WHERE id = 'llm'",
    )
    .fetch_one(&db.pool)
    .await?;
    Ok(BreakerRow {
        state: r.try_get("state")?,
        consecutive_transient: u32_of(r.try_get("consecutive_transient")?),
        open_until_ms: r.try_get("open_until_ms")?,
        probe_job_id: r.try_get("probe_job_id")?,
        probe_started_ms: r.try_get("probe_started_ms")?,
    })
}

/// A transient outcome of `work_item`'s job: one more in a row; at `threshold` (0: never)
/// — or when it was the half-open probe — the breaker opens until `now + cooldown`. The
/// first opening since it was closed keeps its time and work item (`breaker_watch`).
pub async fn breaker_on_transient(
    db: &Db,
    threshold: u32,
    cooldown_ms: i64,
    now_ms: i64,
    work_item: &str,
) -> Result<BreakerRow, sqlx::Error> {
    // Every SET expression reads the row as it was before this UPDATE (SQLite and
    // PostgreSQL alike), so `opens` is the same condition in each.
    let opens = "(state = 'half_open' OR ($1 > 0 AND consecutive_transient + 1 >= $1))";
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "UPDATE breaker SET \
           state = CASE WHEN {opens} THEN 'open' ELSE state END, \
           open_until_ms = CASE WHEN {opens} THEN $2 ELSE open_until_ms END, \
           opened_at_ms = CASE WHEN {opens} AND opened_at_ms = 0 THEN $3 ELSE opened_at_ms END, \
           opened_work_item = CASE WHEN {opens} AND opened_at_ms = 0 THEN $4 ELSE opened_work_item END, \
           probe_job_id = CASE WHEN state = 'half_open' THEN '' ELSE probe_job_id END, \
           consecutive_transient = consecutive_transient + 1, updated_at_ms = $3 \
         WHERE id = 'llm'"
    )))
    .bind(i64::from(threshold))
    .bind(now_ms + cooldown_ms)
    .bind(now_ms)
    .bind(work_item)
    .execute(&db.pool)
    .await?;
    breaker(db).await
}

/// Takes the one notification of the current opening when it has lasted `open_for_ms`
/// (not closed since it opened at or before `now - open_for_ms`): exactly one caller across
/// replicas gets `(opened_at_ms, opened_work_item)`, once per opening.
pub async fn breaker_take_long_open(
    db: &Db,
    now_ms: i64,
    open_for_ms: i64,
) -> Result<Option<(i64, String)>, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE breaker SET open_told = 1 WHERE id = 'llm' AND state <> 'closed' \
         AND opened_at_ms > 0 AND opened_at_ms <= $1 AND open_told = 0",
    )
    .bind(now_ms - open_for_ms)
    .execute(&db.pool)
    .await?;
    if done.rows_affected() != 1 {
        return Ok(None);
    }
    let r = sqlx::query("SELECT opened_at_ms, opened_work_item FROM breaker WHERE id = 'llm'")
        .fetch_one(&db.pool)
        .await?;
    Ok(Some((
        r.try_get("opened_at_ms")?,
        r.try_get("opened_work_item")?,
    )))
}

/// Any other outcome (the API answered): the breaker closes.
pub async fn breaker_on_other(db: &Db, now_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE breaker SET state = 'closed', consecutive_transient = 0, open_until_ms = 0, probe_job_id = '', \
         probe_started_ms = 0, opened_at_ms = 0, opened_work_item = '', open_told = 0, \
         updated_at_ms = $1 WHERE id = 'llm' \
         AND (state <> 'closed' OR consecutive_transient <> 0)",
    )
    .bind(now_ms)
    .execute(&db.pool)
    .await?;
    Ok(())
}

/// Takes the half-open probe: succeeds for exactly one caller once the cooldown is over
/// (or when the previous probe was abandoned: `stale_before_ms`).
pub async fn breaker_take_probe(
    db: &Db,
    now_ms: i64,
    stale_before_ms: i64,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE breaker SET state = 'half_open', probe_job_id = '', probe_started_ms = $1, updated_at_ms = $1 \
         WHERE id = 'llm' AND ((state = 'open' AND open_until_ms <= $1) OR (state = 'half_open' AND probe_started_ms < $2))",
    )
    .bind(now_ms)
    .bind(stale_before_ms)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Names the probe job, or gives the probe back (`job_id` empty: nothing was claimed).
pub async fn breaker_set_probe(db: &Db, job_id: &str, now_ms: i64) -> Result<(), sqlx::Error> {
    if job_id.is_empty() {
        sqlx::query(
            "UPDATE breaker SET state = 'open', probe_job_id = '', updated_at_ms = $1 \
             WHERE id = 'llm' AND state = 'half_open' AND probe_job_id = ''",
        )
        .bind(now_ms)
        .execute(&db.pool)
        .await?;
    } else {
        sqlx::query(
            "UPDATE breaker SET probe_job_id = $1, updated_at_ms = $2 WHERE id = 'llm' AND state = 'half_open'",
        )
        .bind(job_id)
        .bind(now_ms)
        .execute(&db.pool)
        .await?;
    }
    Ok(())
}

/// The probe job ended without an API outcome (cancelled, killed): let another probe go.
pub async fn breaker_release_probe(db: &Db, job_id: &str, now_ms: i64) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE breaker SET state = 'open', probe_job_id = '', open_until_ms = $2, updated_at_ms = $2 \
         WHERE id = 'llm' AND state = 'half_open' AND probe_job_id = $1",
    )
    .bind(job_id)
    .bind(now_ms)
    .execute(&db.pool)
    .await?;
    Ok(())
}
