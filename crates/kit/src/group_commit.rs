//! Group commit: concurrent callers share one write. SQLite has one writer, and sqlx
//! sends each statement through its connection's worker thread, so one statement per
//! caller caps throughput well below what the database can take: the round trips and the
//! commits, not the rows, are the cost. A [`GroupWriter`] writes whatever is waiting when
//! it gets to it in one go (never waiting for more, so a lone caller pays one statement),
//! and answers each caller only once that write is committed.

use std::fmt;
use std::future::Future;

use tokio::sync::{mpsc, oneshot};

/// A write that takes many items at once.
pub trait BatchWrite: Send + Sync + 'static {
    /// What a caller writes.
    type Item: Send + Sync + 'static;
    /// What a caller learns of its item (e.g. whether it was new).
    type Output: Send + 'static;

    /// Writes `items` together and commits; returns one output per item, in order.
    fn write(
        &self,
        items: &[Self::Item],
    ) -> impl Future<Output = Result<Vec<Self::Output>, sqlx::Error>> + Send;
}

type Reply<T> = oneshot::Sender<Result<T, sqlx::Error>>;

/// The handle through which callers write; cheap to clone. The writer task ends when the
/// last handle is dropped.
pub struct GroupWriter<W: BatchWrite> {
    tx: mpsc::Sender<(W::Item, Reply<W::Output>)>,
}

impl<W: BatchWrite> Clone for GroupWriter<W> {
    fn clone(&self) -> Self {
        GroupWriter {
            tx: self.tx.clone(),
        }
    }
}

impl<W: BatchWrite> fmt::Debug for GroupWriter<W> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GroupWriter").finish_non_exhaustive()
    }
}

impl<W: BatchWrite> GroupWriter<W> {
    /// Starts the writer task (inside a tokio runtime), writing at most `max_batch` items
    /// at once.
    pub fn spawn(writer: W, max_batch: usize) -> Self {
        let max_batch = max_batch.max(1);
        let (tx, mut rx) = mpsc::channel::<(W::Item, Reply<W::Output>)>(4 * max_batch);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let mut batch = vec![first];
                while batch.len() < max_batch {
                    match rx.try_recv() {
                        Ok(more) => batch.push(more),
                        Err(_) => break,
                    }
                }
                write(&writer, batch).await;
            }
        });
        GroupWriter { tx }
    }

    /// Writes `item` with whatever else is waiting; returns once it is committed.
    pub async fn write(&self, item: W::Item) -> Result<W::Output, sqlx::Error> {
        let (reply, answer) = oneshot::channel();
        self.tx
            .send((item, reply))
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        answer.await.map_err(|_| sqlx::Error::PoolClosed)?
    }
}

async fn write<W: BatchWrite>(writer: &W, batch: Vec<(W::Item, Reply<W::Output>)>) {
    let (items, replies): (Vec<W::Item>, Vec<Reply<W::Output>>) = batch.into_iter().unzip();
    match checked(writer, &items).await {
        Ok(outputs) => {
            for (reply, output) in replies.into_iter().zip(outputs) {
                let _ = reply.send(Ok(output));
            }
        }
        // One bad item must not fail the others: write them one by one.
        Err(e) if items.len() > 1 => {
            tracing::warn!(error = %e, items = items.len(), "batched write failed; writing items one by one");
            for (item, reply) in items.iter().zip(replies) {
                let one = checked(writer, std::slice::from_ref(item))
                    .await
                    .map(|mut v| v.remove(0));
                let _ = reply.send(one);
            }
        }
        Err(e) => {
            if let Some(reply) = replies.into_iter().next() {
                let _ = reply.send(Err(e));
            }
        }
    }
}

/// The write, with one output per item or an error.
async fn checked<W: BatchWrite>(
    writer: &W,
    items: &[W::Item],
) -> Result<Vec<W::Output>, sqlx::Error> {
    let outputs = writer.write(items).await?;
    if outputs.len() != items.len() {
        return Err(sqlx::Error::Protocol(format!(
            "a batched write answered {} outputs for {} items",
            outputs.len(),
            items.len()
        )));
    }
    Ok(outputs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use tokio::sync::Semaphore;

    /// Records each batch and holds it until the test lets it through; fails a batch that
    /// holds a negative number.
    struct Recorder {
        batches: Arc<Mutex<Vec<Vec<i64>>>>,
        gate: Arc<Semaphore>,
    }

    impl BatchWrite for Recorder {
        type Item = i64;
        type Output = i64;

        async fn write(&self, items: &[i64]) -> Result<Vec<i64>, sqlx::Error> {
            self.batches.lock().expect("lock").push(items.to_vec());
            self.gate.acquire().await.expect("gate").forget();
            if items.iter().any(|i| *i < 0) {
                return Err(sqlx::Error::Protocol("negative".into()));
            }
            Ok(items.iter().map(|i| i * 10).collect())
        }
    }

    #[tokio::test]
    async fn waiting_callers_share_a_write_and_a_bad_item_fails_alone() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let gate = Arc::new(Semaphore::new(0));
        let w = GroupWriter::spawn(
            Recorder {
                batches: batches.clone(),
                gate: gate.clone(),
            },
            4,
        );
        let capacity = w.tx.capacity();
        let mut calls = Vec::new();
        // The first write runs alone (the writer was idle) and is held there.
        let first = w.clone();
        calls.push(tokio::spawn(async move { first.write(1).await }));
        while batches.lock().expect("lock").is_empty() {
            tokio::task::yield_now().await;
        }
        // Six more queue up behind it, in this order.
        for (n, i) in [2_i64, 3, -4, 5, 6, 7].into_iter().enumerate() {
            let w2 = w.clone();
            calls.push(tokio::spawn(async move { w2.write(i).await }));
            while w.tx.capacity() > capacity - (n + 1) {
                tokio::task::yield_now().await;
            }
        }
        gate.add_permits(100);
        let mut got = Vec::new();
        for c in calls {
            got.push(c.await.expect("join").ok());
        }
        assert_eq!(
            got,
            [
                Some(10),
                Some(20),
                Some(30),
                None,
                Some(50),
                Some(60),
                Some(70)
            ]
        );
        // Four that waited went together (at most four); that batch held -4, so it was
        // written again item by item; the last two went together.
        let batches = batches.lock().expect("lock").clone();
        let want: Vec<Vec<i64>> = vec![
            vec![1],
            vec![2, 3, -4, 5],
            vec![2],
            vec![3],
            vec![-4],
            vec![5],
            vec![6, 7],
        ];
        assert_eq!(batches, want);
    }
}
