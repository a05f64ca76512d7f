//! Storage: one sqlx pool per service with that service's own embedded migrations.
//!
//! Embedded default: one SQLite file per service under `ORCH_DATA_DIR`, in WAL mode. When
//! `ORCH_DATABASE_URL` is a `postgres://` URL: PostgreSQL, one schema per service. Queries
//! are runtime-checked (`sqlx::query` with `$1` binds) through the `Any` driver, so one
//! build and one SQL text serve both backends; times are epoch milliseconds (`BIGINT`).

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Once;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::migrate::Migrator;
use sqlx::postgres::PgConnectOptions;
use sqlx::{AnyConnection, AnyPool};
use sqlx::{AssertSqlSafe, Connection};

use crate::config::{Config, Secret};
use crate::service::ServiceName;

/// Which database engine a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Backend {
    /// The placeholders of a multi-row `VALUES` list of `rows` rows of `cols` values, to be
    /// bound row by row: on PostgreSQL `($1, $2), ($3, $4)`; on SQLite `(?, ?), (?, ?)`,
    /// because SQLite looks a numbered parameter's name up by a linear scan, which makes
    /// binding a statement of n `$N` parameters cost n² (sqlx asks for every name). One
    /// statement for many rows is how group commit ([`crate::group_commit`]) saves round
    /// trips. The rest of such a statement must have no parameters of its own.
    pub fn values_rows(self, rows: usize, cols: usize) -> String {
        let mut out = String::with_capacity(rows * cols * 6);
        for r in 0..rows {
            out.push_str(if r == 0 { "(" } else { ", (" });
            for c in 0..cols {
                if c > 0 {
                    out.push_str(", ");
                }
                match self {
                    Backend::Sqlite => out.push('?'),
                    Backend::Postgres => {
                        out.push('$');
                        out.push_str(&(r * cols + c + 1).to_string());
                    }
                }
            }
            out.push(')');
        }
        out
    }
}

/// A service's pool, migrated.
#[derive(Debug, Clone)]
pub struct Db {
    pub pool: AnyPool,
    pub backend: Backend,
    pub service: ServiceName,
}

/// Where a service's storage lives.
#[derive(Debug, Clone)]
pub enum Location {
    /// `<dir>/<schema>.db`.
    SqliteDir(PathBuf),
    /// A PostgreSQL database; the service uses its own schema in it.
    Postgres(Secret),
}

impl Location {
    /// Reads the location from the configuration.
    pub fn from_config(config: &Config) -> Self {
        match &config.database_url {
            Some(url) => Location::Postgres(url.clone()),
            None => Location::SqliteDir(config.data_dir.clone()),
        }
    }
}

/// Why storage could not be opened. Messages name the culprit and never print a password.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    #[error("ORCH_DATA_DIR: cannot write to '{path}': {source}")]
    DataDir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("ORCH_DATABASE_URL: cannot connect to PostgreSQL at {target}: {source}")]
    Connect { target: String, source: sqlx::Error },
    #[error("{service}: cannot open SQLite database '{path}': {source}")]
    Sqlite {
        service: ServiceName,
        path: PathBuf,
        source: sqlx::Error,
    },
    #[error("{service}: migrations failed: {source}")]
    Migrate {
        service: ServiceName,
        source: sqlx::migrate::MigrateError,
    },
    #[error("ORCH_DATABASE_URL: {0}")]
    BadUrl(String),
}

/// How long a caller waits for a pooled connection before the query fails.
const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(10);
/// PostgreSQL connections per service pool.
const PG_MAX_CONNECTIONS: u32 = 8;

fn install_drivers() {
    static ONCE: Once = Once::new();
    ONCE.call_once(sqlx::any::install_default_drivers);
}

/// Checks that the data directory exists (creating it) and can be written, before any
/// service touches it, so a bad directory fails start-up with nothing half-created.
pub fn ensure_data_dir(dir: &Path) -> Result<(), DbError> {
    let fail = |source| DbError::DataDir {
        path: dir.to_path_buf(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(fail)?;
    // Unique per call: several services check the same directory at once.
    static PROBES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = PROBES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = dir.join(format!(".write-probe-{}-{n}", std::process::id()));
    std::fs::write(&probe, b"").map_err(fail)?;
    std::fs::remove_file(&probe).map_err(fail)?;
    Ok(())
}

/// Opens `service`'s pool at `location` and runs its migrations.
pub async fn open(
    service: ServiceName,
    location: &Location,
    migrator: &Migrator,
) -> Result<Db, DbError> {
    install_drivers();
    let db = match location {
        Location::SqliteDir(dir) => open_sqlite(service, dir).await?,
        Location::Postgres(url) => open_postgres(service, url).await?,
    };
    migrator
        .run(&db.pool)
        .await
        .map_err(|source| DbError::Migrate { service, source })?;
    Ok(db)
}

async fn open_sqlite(service: ServiceName, dir: &Path) -> Result<Db, DbError> {
    ensure_data_dir(dir)?;
    let path =
        std::path::absolute(dir.join(format!("{}.db", service.schema()))).map_err(|source| {
            DbError::DataDir {
                path: dir.to_path_buf(),
                source,
            }
        })?;
    let url = format!("sqlite://{}?mode=rwc", path.display());
    // SQLite has one writer at a time: one connection per service queues writers in the
    // pool (fair, async) instead of in SQLite's sleeping busy handler, which would wreck
    // latency. WAL with synchronous=NORMAL survives a killed process; only a power loss
    // can cost the last commits.
    let pool = AnyPoolOptions::new()
        .max_connections(1)
        .min_connections(1)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .idle_timeout(None)
        .max_lifetime(None)
        .after_connect(|conn, _meta| {
            Box::pin(async move {
                sqlx::raw_sql(
                    "PRAGMA journal_mode = WAL; PRAGMA synchronous = NORMAL; \
                     PRAGMA busy_timeout = 5000; PRAGMA foreign_keys = ON;",
                )
                .execute(conn)
                .await?;
                Ok(())
            })
        })
        .connect(&url)
        .await
        .map_err(|source| DbError::Sqlite {
            service,
            path: path.clone(),
            source,
        })?;
    Ok(Db {
        pool,
        backend: Backend::Sqlite,
        service,
    })
}

async fn open_postgres(service: ServiceName, url: &Secret) -> Result<Db, DbError> {
    let opts = PgConnectOptions::from_str(url.expose())
        .map_err(|_| DbError::BadUrl("not a valid postgres:// URL".to_owned()))?;
    let target = format!(
        "{}:{}/{}",
        opts.get_host(),
        opts.get_port(),
        opts.get_database().unwrap_or_default()
    );
    let fail = |source| DbError::Connect {
        target: target.clone(),
        source,
    };

    // The schema must exist before a pool connection selects it. Several processes may
    // race here at start-up; IF NOT EXISTS can still collide on the catalog, so retry once.
    let schema = service.schema();
    let mut conn = tokio::time::timeout(ACQUIRE_TIMEOUT, AnyConnection::connect(url.expose()))
        .await
        .map_err(|_| fail(sqlx::Error::PoolTimedOut))?
        .map_err(fail)?;
    let create = format!("CREATE SCHEMA IF NOT EXISTS {schema}");
    if sqlx::raw_sql(AssertSqlSafe(create.clone()))
        .execute(&mut conn)
        .await
        .is_err()
    {
        sqlx::raw_sql(AssertSqlSafe(create))
            .execute(&mut conn)
            .await
            .map_err(fail)?;
    }
    let _ = conn.close().await;

    let sep = if url.expose().contains('?') { '&' } else { '?' };
    let pool_url = format!("{}{sep}options[search_path]={schema}", url.expose());
    let pool = AnyPoolOptions::new()
        .max_connections(PG_MAX_CONNECTIONS)
        .acquire_timeout(ACQUIRE_TIMEOUT)
        .connect(&pool_url)
        .await
        .map_err(fail)?;
    Ok(Db {
        pool,
        backend: Backend::Postgres,
        service,
    })
}

#[cfg(test)]
mod tests {
    use super::Backend;

    #[test]
    fn values_rows_are_bound_row_by_row() {
        assert_eq!(Backend::Postgres.values_rows(1, 1), "($1)");
        assert_eq!(
            Backend::Postgres.values_rows(2, 3),
            "($1, $2, $3), ($4, $5, $6)"
        );
        assert_eq!(Backend::Sqlite.values_rows(2, 2), "(?, ?), (?, ?)");
        assert_eq!(Backend::Sqlite.values_rows(0, 3), "");
    }
}
