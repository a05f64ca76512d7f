//! Group commit of `RecordRun`: concurrent calls share one INSERT statement
//! ([`orchestrator_kit::group_commit`]), which is what lifts throughput on SQLite's single
//! writer.

use orchestrator_kit::Db;
use orchestrator_kit::group_commit::{BatchWrite, GroupWriter};

use crate::store::{self, RunRecord};

/// Runs written in one statement at most (16 binds each: well under both backends' limits).
const MAX_BATCH: usize = 128;

/// Inserts runs, many at once; answers per run whether it was new.
#[derive(Debug)]
pub struct RunWriter(Db);

impl BatchWrite for RunWriter {
    type Item = RunRecord;
    type Output = bool;

    async fn write(&self, runs: &[RunRecord]) -> Result<Vec<bool>, sqlx::Error> {
        store::insert_many(&self.0, runs).await
    }
}

/// Starts the writer of `db`'s runs (inside a tokio runtime).
pub fn spawn(db: Db) -> GroupWriter<RunWriter> {
    GroupWriter::spawn(RunWriter(db), MAX_BATCH)
}
