//! Group commit: concurrent `RecordRun`s share one INSERT statement. SQLite has one writer
//! and sqlx sends each statement through its connection's worker thread, so one statement
//! per run caps throughput well below what the database can take; batching whatever is
//! waiting (never waiting for more) keeps latency at one statement and lifts the cap.

use orchestrator_kit::Db;
use tokio::sync::{mpsc, oneshot};

use crate::store::{self, RunRecord};

/// Runs written in one statement at most (16 binds each: well under both backends' limits).
const MAX_BATCH: usize = 128;

type Reply = oneshot::Sender<Result<bool, sqlx::Error>>;

/// The handle through which the service inserts runs.
#[derive(Debug, Clone)]
pub struct GroupWriter {
    tx: mpsc::Sender<(RunRecord, Reply)>,
}

impl GroupWriter {
    /// Starts the writer task; it ends when the last handle is dropped.
    pub fn spawn(db: Db) -> Self {
        let (tx, mut rx) = mpsc::channel::<(RunRecord, Reply)>(4 * MAX_BATCH);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < MAX_BATCH {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                write(&db, batch).await;
            }
        });
        GroupWriter { tx }
    }

    /// Inserts `run`; true when it was new.
    pub async fn insert(&self, run: RunRecord) -> Result<bool, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((run, reply))
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

async fn write(db: &Db, batch: Vec<(RunRecord, Reply)>) {
    let (runs, replies): (Vec<RunRecord>, Vec<Reply>) = batch.into_iter().unzip();
    match store::insert_many(db, &runs).await {
        Ok(inserted) => {
            for (reply, new) in replies.into_iter().zip(inserted) {
                let _ = reply.send(Ok(new));
            }
        }
        // One bad run must not fail the others: write them one by one.
        Err(e) if runs.len() > 1 => {
            tracing::warn!(error = %e, runs = runs.len(), "batched insert failed; writing runs one by one");
            for (run, reply) in runs.into_iter().zip(replies) {
                let _ = reply.send(
                    store::insert_many(db, std::slice::from_ref(&run))
                        .await
                        .map(|v| v[0]),
                );
            }
        }
        Err(e) => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
    }
}
