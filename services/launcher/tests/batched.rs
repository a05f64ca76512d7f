//! The batched queue (#19), on SQLite and PostgreSQL: run ends group-committed in one
//! statement (each answer as a lone guarded settle would give it), reserved jobs claimed
//! ahead and held for a slot (and handed back at shutdown, or when the launcher's heartbeat
//! is lost), and — PostgreSQL — an idle replica woken by `LISTEN/NOTIFY` when another
//! process enqueues.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{H, KEY, REPO, eventually};
use launcher::outbox::Effect;
use launcher::store::{self, Kind, NewJob, Settle, SettleEntry, Status};
use orchestrator_kit::time::now_ms;
use orchestrator_kit::{Db, ServiceName};
use orchestrator_testkit::{TestStorage, on_both_backends};

const SECS: Duration = Duration::from_secs(20);

fn reserved(id: &str) -> NewJob {
    NewJob {
        id: id.to_owned(),
        work_item: KEY.to_owned(),
        repo: REPO.to_owned(),
        agent: "post-deploy-monitor".to_owned(),
        stage: "done".to_owned(),
        kind: Kind::Reserved,
        payload_json: "{}".to_owned(),
        dedupe_key: None,
        max_attempts: 3,
        not_before_ms: 0,
        now_ms: now_ms(),
    }
}

fn succeeded(outcome: &str) -> Settle {
    Settle {
        status: Status::Succeeded,
        not_before_ms: 0,
        failures: 0,
        transient_attempts: 0,
        outcome: outcome.to_owned(),
        reason: String::new(),
        exit_code: Some(0),
        qg_hook_blocks: None,
        now_ms: now_ms(),
    }
}

fn comment(key: &str) -> Effect {
    Effect::Comment {
        html: format!("<p>{key}</p>"),
        author: "orchestrator".to_owned(),
        idempotency_key: key.to_owned(),
    }
}

/// The launcher's storage on `storage`, as a process of its own opens it.
async fn open_storage(storage: &TestStorage) -> Db {
    orchestrator_kit::db::open(
        ServiceName::Launcher,
        &storage.location,
        &launcher::MIGRATOR,
    )
    .await
    .expect("storage")
}

async fn outbox_keys(db: &Db) -> Vec<String> {
    let rows: Vec<(String,)> =
        sqlx::query_as("SELECT idempotency_key FROM outbox ORDER BY idempotency_key")
            .fetch_all(&db.pool)
            .await
            .expect("outbox");
    rows.into_iter().map(|r| r.0).collect()
}

/// One batch: each entry answered as its own guarded settle would be — a run already ended
/// by someone else, a wrong attempt and a second end of the same run in the same batch
/// all come back `None` and write nothing; the effects of the runs it ended are in the
/// outbox, in the same transaction.
async fn a_batch_of_ends_is_answered_entry_by_entry(storage: TestStorage) {
    let db = open_storage(&storage).await;
    for id in ["a", "b", "c", "d"] {
        store::enqueue(&db, &reserved(id)).await.expect("enqueue");
    }
    let mut conn = db.pool.acquire().await.expect("conn");
    let claimed = store::claim_reserved(&mut conn, db.backend, "me", now_ms(), 10)
        .await
        .expect("claim");
    drop(conn);
    assert_eq!(claimed.len(), 4);
    assert!(
        claimed
            .iter()
            .all(|j| j.attempt == 1 && j.status == Status::Running)
    );
    // d was ended by someone else first.
    assert!(
        store::settle(&db, "d", 1, &succeeded("flipped"))
            .await
            .expect("settle d")
            .is_some()
    );
    let entry = |id: &str, attempt: u32, outcome: &str, effects: Vec<Effect>| SettleEntry {
        id: id.to_owned(),
        attempt,
        settle: succeeded(outcome),
        effects,
    };
    let mut conn = db.pool.acquire().await.expect("conn");
    let out = store::settle_many(
        &mut conn,
        &[
            entry("a", 1, "done", vec![comment("a-done")]),
            entry("b", 2, "done", vec![comment("b-wrong-attempt")]),
            entry("a", 1, "again", vec![comment("a-again")]),
            entry("c", 1, "done", vec![]),
            entry("d", 1, "late", vec![comment("d-late")]),
        ],
    )
    .await
    .expect("settle_many");
    drop(conn);
    let outcomes: Vec<Option<String>> = out
        .iter()
        .map(|r| r.as_ref().map(|j| j.outcome.clone()))
        .collect();
    assert_eq!(
        outcomes,
        [
            Some("done".to_owned()),
            None,
            None,
            Some("done".to_owned()),
            None
        ]
    );
    let a = store::get(&db, "a").await.expect("get").expect("a");
    assert_eq!((a.status, a.outcome.as_str()), (Status::Succeeded, "done"));
    let b = store::get(&db, "b").await.expect("get").expect("b");
    assert_eq!(b.status, Status::Running, "a wrong attempt changes nothing");
    let d = store::get(&db, "d").await.expect("get").expect("d");
    assert_eq!(d.outcome, "flipped", "the first end stands");
    assert_eq!(outbox_keys(&db).await, ["a-done"]);

    // A batch with no effect at all (one statement, no transaction of its own; three
    // entries, padded to four with a row that matches no job) answers the same way.
    let mut conn = db.pool.acquire().await.expect("conn");
    let out = store::settle_many(
        &mut conn,
        &[
            entry("b", 1, "done", vec![]),
            entry("c", 1, "again", vec![]),
            entry("d", 1, "again", vec![]),
        ],
    )
    .await
    .expect("settle_many");
    drop(conn);
    let outcomes: Vec<Option<String>> = out
        .iter()
        .map(|r| r.as_ref().map(|j| j.outcome.clone()))
        .collect();
    assert_eq!(outcomes, [Some("done".to_owned()), None, None]);
    let c = store::get(&db, "c").await.expect("get").expect("c");
    assert_eq!(c.outcome, "done", "an ended run is not written again");
}

/// With one slot and a local queue of two, a stream of reserved jobs is claimed ahead:
/// three at once are this instance's (running, heartbeated), one ticks, the others wait
/// here for the slot; at shutdown the held ones go back to the queue, and a new life runs
/// every job to its end.
async fn held_reserved_jobs_wait_for_a_slot_and_go_back_at_shutdown(storage: TestStorage) {
    let storage = Arc::new(storage);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let vars = [
        ("ORCH_RESERVED_CONCURRENCY", "1"),
        ("ORCH_LAUNCHER_LOCAL_QUEUE", "2"),
        ("ORCH_LAUNCHER_GIT", "false"),
    ];
    let h = H::start_on(storage.clone(), dir.clone(), "holder", "", &vars).await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    h.peers.with(|s| s.tick_gate = Some(gate.clone()));
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(
            h.enqueue_for(&format!("MON-{i}"), "post-deploy-monitor", "done", "")
                .await
                .id,
        );
    }
    eventually(SECS, "three claimed, one ticking", || {
        h.peers.with(|s| s.tick_calls) == 1
    })
    .await;
    // Claimed ahead, but only the slot's job called its peer.
    let mut running = Vec::new();
    for id in &ids {
        let j = h.job(id).await;
        if j.status == Status::Running {
            assert_eq!(j.instance_id, "holder");
            running.push(j.id);
        }
    }
    assert_eq!(running.len(), 3, "one slot + a local queue of two");
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.peers.with(|s| s.tick_calls),
        1,
        "held jobs wait for the slot"
    );
    // One tick through: the next held job takes the slot, a new one is claimed behind it.
    gate.add_permits(1);
    eventually(SECS, "the next held job ticks", || {
        h.peers.with(|s| s.tick_calls) == 2
    })
    .await;

    h.shutdown.cancel();
    eventually(SECS, "the launcher stopped", || {
        h.svc.supervisor().stopped().is_cancelled()
    })
    .await;
    let mut succeeded = 0;
    for id in &ids {
        let j = h.job(id).await;
        match j.status {
            Status::Succeeded => succeeded += 1,
            Status::Queued => {}
            other => panic!("job {id} is {other} after the hand-back ({})", j.reason),
        }
    }
    assert_eq!(succeeded, 1, "only the ticked-through job ended");
    drop(h);

    // A new life takes every job back and runs it through.
    let h = H::start_on(storage, dir, "holder", "", &vars).await;
    for id in &ids {
        let j = h.wait_done(id, SECS).await;
        assert_eq!(j.status, Status::Succeeded, "job {id}: {}", j.reason);
    }
}

/// LLM jobs are claimed as many at once as the global slots have room for: with 3 slots
/// and one job running, a claim asking for 10 takes the 2 oldest, and the next takes none.
async fn llm_jobs_are_claimed_a_batch_within_the_free_slots(storage: TestStorage) {
    let db = open_storage(&storage).await;
    for (i, id) in ["l1", "l2", "l3", "l4", "l5"].into_iter().enumerate() {
        let mut j = reserved(id);
        j.kind = Kind::Llm;
        j.agent = "developer".to_owned();
        j.now_ms = 1_000 + i as i64;
        store::enqueue(&db, &j).await.expect("enqueue");
    }
    let now = now_ms();
    let first = store::claim_llm(&db, "a", now, 3, 1).await.expect("claim");
    assert_eq!(
        first.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["l1"]
    );
    let batch = store::claim_llm(&db, "b", now, 3, 10).await.expect("claim");
    assert_eq!(
        batch.iter().map(|j| j.id.as_str()).collect::<Vec<_>>(),
        ["l2", "l3"],
        "the two free slots, oldest first"
    );
    assert!(
        batch
            .iter()
            .all(|j| j.status == Status::Running && j.instance_id == "b")
    );
    assert!(
        store::claim_llm(&db, "c", now, 3, 10)
            .await
            .expect("claim")
            .is_empty(),
        "no slot left"
    );
    assert_eq!(
        store::get(&db, "l4")
            .await
            .expect("get")
            .expect("l4")
            .status,
        Status::Queued
    );
}

/// Makes every heartbeat of a launcher instance fail (a storage that refuses its write),
/// or lets it through again.
async fn refuse_heartbeats(db: &Db, refuse: bool) {
    let sql = match (db.backend, refuse) {
        (orchestrator_kit::Backend::Sqlite, true) => {
            "CREATE TRIGGER refuse_heartbeats BEFORE UPDATE ON launcher_instances \
             BEGIN SELECT RAISE(ABORT, 'heartbeats refused by the test'); END"
        }
        (orchestrator_kit::Backend::Sqlite, false) => "DROP TRIGGER refuse_heartbeats",
        (orchestrator_kit::Backend::Postgres, true) => {
            "ALTER TABLE launcher_instances ADD CONSTRAINT refuse_heartbeats \
             CHECK (heartbeat_at_ms < 0) NOT VALID"
        }
        (orchestrator_kit::Backend::Postgres, false) => {
            "ALTER TABLE launcher_instances DROP CONSTRAINT refuse_heartbeats"
        }
    };
    sqlx::query(sql)
        .execute(&db.pool)
        .await
        .expect("heartbeat switch");
}

/// A launcher whose heartbeat no longer goes through stops taking work before the reaper
/// may count it gone: the jobs it holds go back to the queue (`handed_back`, never having
/// called their peer), it claims nothing new, and the run already under way goes on. Once
/// its heartbeat is back it claims again and every job ends.
async fn a_launcher_whose_heartbeat_is_lost_hands_back_what_it_holds(storage: TestStorage) {
    let h = H::start(
        storage,
        "",
        &[
            ("ORCH_RESERVED_CONCURRENCY", "1"),
            ("ORCH_LAUNCHER_LOCAL_QUEUE", "2"),
            ("ORCH_LAUNCHER_GIT", "false"),
            // Lost after 1 s without a heartbeat that went through.
            ("ORCH_LAUNCHER_INSTANCE_STALE_MS", "2000"),
        ],
    )
    .await;
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    h.peers.with(|s| s.tick_gate = Some(gate.clone()));
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            h.enqueue_for(&format!("MON-{i}"), "post-deploy-monitor", "done", "")
                .await
                .id,
        );
    }
    eventually(SECS, "one ticking", || h.peers.with(|s| s.tick_calls) == 1).await;
    let ticking = h.peers.with(|s| s.ticked[0].clone());
    let mut held = Vec::new();
    for id in &ids {
        let j = h.job(id).await;
        assert_eq!(j.status, Status::Running, "claimed: {id}");
        if j.work_item != ticking {
            held.push(j.id);
        }
    }
    assert_eq!(held.len(), 2);

    refuse_heartbeats(&h.db, true).await;
    for id in &held {
        let j = h.wait_for(id, SECS, |j| j.status == Status::Queued).await;
        assert_eq!(j.outcome, "handed_back", "{}", j.reason);
        assert!(j.reason.contains("heartbeat"), "{}", j.reason);
    }
    // Nothing new is claimed meanwhile, and the held jobs never called their peer.
    let late = h
        .enqueue_for("MON-9", "post-deploy-monitor", "done", "")
        .await
        .id;
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert_eq!(h.job(&late).await.status, Status::Queued);
    for id in &held {
        assert_eq!(h.job(id).await.status, Status::Queued, "{id} claimed again");
    }
    assert_eq!(h.peers.with(|s| s.tick_calls), 1);
    let running = ids
        .iter()
        .find(|id| !held.contains(id))
        .expect("the ticking job");
    assert_eq!(
        h.job(running).await.status,
        Status::Running,
        "the run under way goes on"
    );

    refuse_heartbeats(&h.db, false).await;
    gate.add_permits(100);
    ids.push(late);
    for id in &ids {
        let j = h.wait_done(id, SECS).await;
        assert_eq!(j.status, Status::Succeeded, "job {id}: {}", j.reason);
    }
    let mut ticked = h.peers.with(|s| s.ticked.clone());
    ticked.sort();
    assert_eq!(ticked.len(), 4, "each job ticked once: {ticked:?}");
}

on_both_backends!(
    a_batch_of_ends_is_answered_entry_by_entry,
    held_reserved_jobs_wait_for_a_slot_and_go_back_at_shutdown,
    a_launcher_whose_heartbeat_is_lost_hands_back_what_it_holds,
    llm_jobs_are_claimed_a_batch_within_the_free_slots,
);

/// An idle replica whose poll is a minute away hears of a job another process enqueued
/// (no in-process wake: straight into the table, as another replica's Enqueue writes it)
/// through `LISTEN launcher_jobs`, and runs it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_replica_is_woken_by_another_processs_enqueue() {
    let Some(storage) = TestStorage::postgres("batched::notify").await else {
        return;
    };
    let h = H::start(storage, "", &[("ORCH_LAUNCHER_POLL_MS", "60000")]).await;
    // Past its start-up claims: asleep until the poll.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let other = open_storage(&h.storage).await;
    store::enqueue(&other, &reserved("from-elsewhere"))
        .await
        .expect("enqueue");
    // Far sooner than the poll: only the notification can have woken it.
    let j = h.wait_done("from-elsewhere", Duration::from_secs(10)).await;
    assert_eq!(j.status, Status::Succeeded, "{}", j.reason);
}
