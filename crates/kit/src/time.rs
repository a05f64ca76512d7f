//! Wall-clock time as stored in every table: integer epoch milliseconds, the one time
//! type that SQLite and PostgreSQL share through sqlx's `Any` driver.

use std::time::{SystemTime, UNIX_EPOCH};

/// Returns the current time in epoch milliseconds.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
