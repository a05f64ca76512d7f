//! merge-gate's tables: `merge_leases` (one holder per repo) and `merges` (one row per PR
//! that `FinalizeMerge` was asked to merge). Every change that two callers could race on is
//! one statement: the lease is taken with an upsert whose WHERE says when an existing lease
//! may be replaced, and a PR's merge claim the same way.

use orchestrator_kit::Db;
use sqlx::Row;
use sqlx::any::AnyRow;

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseRow {
    pub repo: String,
    pub lease_id: String,
    pub holder_job_id: String,
    pub instance_id: String,
    pub pid: i64,
    pub acquired_at_ms: i64,
    pub ttl_s: i64,
}

impl LeaseRow {
    /// When the lease turns stale whoever holds it.
    pub fn expires_at_ms(&self) -> i64 {
        self.acquired_at_ms
            .saturating_add(self.ttl_s.saturating_mul(1000))
    }

    /// Returns whether the TTL has passed at `now_ms`.
    pub fn is_expired(&self, now_ms: i64) -> bool {
        self.expires_at_ms() <= now_ms
    }
}

const LEASE_COLUMNS: &str =
    "repo, lease_id, holder_job_id, instance_id, pid, acquired_at_ms, ttl_s";

fn lease_from(row: &AnyRow) -> Result<LeaseRow, sqlx::Error> {
    Ok(LeaseRow {
        repo: row.try_get("repo")?,
        lease_id: row.try_get("lease_id")?,
        holder_job_id: row.try_get("holder_job_id")?,
        instance_id: row.try_get("instance_id")?,
        pid: row.try_get("pid")?,
        acquired_at_ms: row.try_get("acquired_at_ms")?,
        ttl_s: row.try_get("ttl_s")?,
    })
}

/// Takes the lease of `new.repo` for `new`'s holder in ONE statement: it inserts when the
/// repo is free, and replaces an existing lease only when that lease is the same holder's
/// (a refresh), has expired at `new.acquired_at_ms`, or is exactly `takeover_lease_id` (a
/// lease whose holder was judged dead; naming it by id means that of two callers taking it
/// over, one wins). Returns the lease in force when it is ours, `None` when another holder
/// keeps it.
pub async fn acquire(
    db: &Db,
    new: &LeaseRow,
    takeover_lease_id: &str,
) -> Result<Option<LeaseRow>, sqlx::Error> {
    let sql = format!(
        "INSERT INTO merge_leases ({LEASE_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (repo) DO UPDATE SET lease_id = excluded.lease_id, \
           holder_job_id = excluded.holder_job_id, instance_id = excluded.instance_id, \
           pid = excluded.pid, acquired_at_ms = excluded.acquired_at_ms, ttl_s = excluded.ttl_s \
         WHERE merge_leases.holder_job_id = excluded.holder_job_id \
            OR merge_leases.acquired_at_ms + merge_leases.ttl_s * 1000 <= excluded.acquired_at_ms \
            OR merge_leases.lease_id = $8 \
         RETURNING {LEASE_COLUMNS}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(&new.repo)
        .bind(&new.lease_id)
        .bind(&new.holder_job_id)
        .bind(&new.instance_id)
        .bind(new.pid)
        .bind(new.acquired_at_ms)
        .bind(new.ttl_s)
        .bind(takeover_lease_id)
        .fetch_optional(&db.pool)
        .await?;
    row.as_ref().map(lease_from).transpose()
}

/// The lease of `repo`, stale or not.
pub async fn get(db: &Db, repo: &str) -> Result<Option<LeaseRow>, sqlx::Error> {
    let sql = format!("SELECT {LEASE_COLUMNS} FROM merge_leases WHERE repo = $1");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(repo)
        .fetch_optional(&db.pool)
        .await?;
    row.as_ref().map(lease_from).transpose()
}

/// Every lease, by repo.
pub async fn list(db: &Db) -> Result<Vec<LeaseRow>, sqlx::Error> {
    let sql = format!("SELECT {LEASE_COLUMNS} FROM merge_leases ORDER BY repo");
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .fetch_all(&db.pool)
        .await?;
    rows.iter().map(lease_from).collect()
}

/// Deletes the lease of `repo` if `holder_job_id` holds it.
pub async fn release(db: &Db, repo: &str, holder_job_id: &str) -> Result<bool, sqlx::Error> {
    let done = sqlx::query("DELETE FROM merge_leases WHERE repo = $1 AND holder_job_id = $2")
        .bind(repo)
        .bind(holder_job_id)
        .execute(&db.pool)
        .await?;
    Ok(done.rows_affected() > 0)
}

/// Deletes the lease of `repo` only if it is still the acquisition `lease_id` (a lease
/// re-taken meanwhile is someone else's and stays). Returns the deleted lease.
pub async fn delete_if(
    db: &Db,
    repo: &str,
    lease_id: &str,
) -> Result<Option<LeaseRow>, sqlx::Error> {
    let sql = format!(
        "DELETE FROM merge_leases WHERE repo = $1 AND lease_id = $2 RETURNING {LEASE_COLUMNS}"
    );
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(repo)
        .bind(lease_id)
        .fetch_optional(&db.pool)
        .await?;
    row.as_ref().map(lease_from).transpose()
}

/// The state of one PR's finalization.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MergeState {
    Pending,
    Merging,
    Merged,
    Refused,
}

impl MergeState {
    pub fn as_str(self) -> &'static str {
        match self {
            MergeState::Pending => "pending",
            MergeState::Merging => "merging",
            MergeState::Merged => "merged",
            MergeState::Refused => "refused",
        }
    }

    fn parse(s: &str) -> MergeState {
        match s {
            "merging" => MergeState::Merging,
            "merged" => MergeState::Merged,
            "refused" => MergeState::Refused,
            _ => MergeState::Pending,
        }
    }
}

/// A row of `merges`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MergeRow {
    pub repo: String,
    pub pr_number: i64,
    pub work_item: String,
    pub tested_head_sha: String,
    pub state: MergeState,
    pub outcome: String,
    pub merge_sha: String,
    pub attempts: i64,
    pub last_error: String,
    pub claim_id: String,
    pub claim_until_ms: i64,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

const MERGE_COLUMNS: &str = "repo, pr_number, work_item, tested_head_sha, state, outcome, \
     merge_sha, attempts, last_error, claim_id, claim_until_ms, created_at_ms, updated_at_ms";

fn merge_from(row: &AnyRow) -> Result<MergeRow, sqlx::Error> {
    Ok(MergeRow {
        repo: row.try_get("repo")?,
        pr_number: row.try_get("pr_number")?,
        work_item: row.try_get("work_item")?,
        tested_head_sha: row.try_get("tested_head_sha")?,
        state: MergeState::parse(&row.try_get::<String, _>("state")?),
        outcome: row.try_get("outcome")?,
        merge_sha: row.try_get("merge_sha")?,
        attempts: row.try_get("attempts")?,
        last_error: row.try_get("last_error")?,
        claim_id: row.try_get("claim_id")?,
        claim_until_ms: row.try_get("claim_until_ms")?,
        created_at_ms: row.try_get("created_at_ms")?,
        updated_at_ms: row.try_get("updated_at_ms")?,
    })
}

/// What claiming a PR's merge came to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This call now drives the merge, until it finishes or the claim runs out.
    Claimed,
    /// Merged before: nothing to do.
    Merged(MergeRow),
    /// Another call holds a live claim.
    Busy(MergeRow),
}

/// The identity of a finalization attempt.
#[derive(Debug, Clone)]
pub struct ClaimRequest<'a> {
    pub repo: &'a str,
    pub pr_number: i64,
    pub work_item: &'a str,
    pub tested_head_sha: &'a str,
    pub claim_id: &'a str,
    pub now_ms: i64,
    pub claim_until_ms: i64,
}

/// Claims the merge of one PR in ONE statement: creates its row, or takes it over unless it
/// is merged or another live claim holds it.
pub async fn claim(db: &Db, c: &ClaimRequest<'_>) -> Result<Claim, sqlx::Error> {
    let claimed = sqlx::query(
        "INSERT INTO merges (repo, pr_number, work_item, tested_head_sha, state, outcome, \
           merge_sha, attempts, last_error, claim_id, claim_until_ms, created_at_ms, updated_at_ms) \
         VALUES ($1, $2, $3, $4, 'merging', '', '', 0, '', $5, $6, $7, $7) \
         ON CONFLICT (repo, pr_number) DO UPDATE SET state = 'merging', \
           work_item = excluded.work_item, tested_head_sha = excluded.tested_head_sha, \
           claim_id = excluded.claim_id, claim_until_ms = excluded.claim_until_ms, \
           updated_at_ms = excluded.updated_at_ms \
         WHERE merges.state <> 'merged' \
           AND (merges.state <> 'merging' OR merges.claim_until_ms <= excluded.updated_at_ms) \
         RETURNING claim_id",
    )
    .bind(c.repo)
    .bind(c.pr_number)
    .bind(c.work_item)
    .bind(c.tested_head_sha)
    .bind(c.claim_id)
    .bind(c.claim_until_ms)
    .bind(c.now_ms)
    .fetch_optional(&db.pool)
    .await?;
    if claimed.is_some() {
        return Ok(Claim::Claimed);
    }
    match get_merge(db, c.repo, c.pr_number).await? {
        Some(row) if row.state == MergeState::Merged => Ok(Claim::Merged(row)),
        Some(row) => Ok(Claim::Busy(row)),
        // Deleted between the two statements (nothing deletes merges today): try later.
        None => Err(sqlx::Error::RowNotFound),
    }
}

/// How a claimed finalization ended.
#[derive(Debug, Clone)]
pub struct Finish<'a> {
    pub state: MergeState,
    pub outcome: &'a str,
    pub merge_sha: &'a str,
    pub attempts: i64,
    pub last_error: &'a str,
    pub now_ms: i64,
}

/// Records the end of a claimed finalization and lets the claim go; fenced by `claim_id`,
/// so a call whose claim ran out and was taken over writes nothing.
pub async fn finish(
    db: &Db,
    repo: &str,
    pr_number: i64,
    claim_id: &str,
    f: &Finish<'_>,
) -> Result<bool, sqlx::Error> {
    let done = sqlx::query(
        "UPDATE merges SET state = $1, outcome = $2, merge_sha = $3, attempts = attempts + $4, \
           last_error = $5, claim_id = '', claim_until_ms = 0, updated_at_ms = $6 \
         WHERE repo = $7 AND pr_number = $8 AND claim_id = $9",
    )
    .bind(f.state.as_str())
    .bind(f.outcome)
    .bind(f.merge_sha)
    .bind(f.attempts)
    .bind(f.last_error)
    .bind(f.now_ms)
    .bind(repo)
    .bind(pr_number)
    .bind(claim_id)
    .execute(&db.pool)
    .await?;
    Ok(done.rows_affected() > 0)
}

/// The row of one PR.
pub async fn get_merge(
    db: &Db,
    repo: &str,
    pr_number: i64,
) -> Result<Option<MergeRow>, sqlx::Error> {
    let sql = format!("SELECT {MERGE_COLUMNS} FROM merges WHERE repo = $1 AND pr_number = $2");
    let row = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(repo)
        .bind(pr_number)
        .fetch_optional(&db.pool)
        .await?;
    row.as_ref().map(merge_from).transpose()
}

/// The newest rows, of one repo or of all.
pub async fn list_merges(
    db: &Db,
    repo: Option<&str>,
    limit: i64,
) -> Result<Vec<MergeRow>, sqlx::Error> {
    let sql = format!(
        "SELECT {MERGE_COLUMNS} FROM merges WHERE ($1 = '' OR repo = $1) \
         ORDER BY updated_at_ms DESC, repo, pr_number LIMIT $2"
    );
    let rows = sqlx::query(sqlx::AssertSqlSafe(sql))
        .bind(repo.unwrap_or_default())
        .bind(limit)
        .fetch_all(&db.pool)
        .await?;
    rows.iter().map(merge_from).collect()
}
