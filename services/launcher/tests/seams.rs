//! The end of a run is durable (issue #20): RecordRun, the finish comment, AdvanceStage and
//! ReportJobFailed are written with the job's end and delivered by the launcher's outbox
//! for as long as usage-ledger or stage-engine is down — far longer than any finite number
//! of tries — across a restart of the launcher; a permanent answer dead-letters, visibly.
//! On SQLite and PostgreSQL; the peers are a fake at their RPC boundary that can be "down"
//! (UNAVAILABLE to every call).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakePeers, FakeState, H, KEY, eventually};
use launcher::outbox::OUTBOX;
use launcher::store::Status;
use orchestrator_proto::launcher::v1::launcher_server::Launcher;
use orchestrator_proto::launcher::v1::{FlipTerminalRequest, JobStatus};
use orchestrator_testkit::{TestStorage, on_both_backends};
use tonic::Request;

const SECS: Duration = Duration::from_secs(20);
const SUCCESS: &str = "cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json";
/// The old retry window was six tries; this is "longer than any finite number of tries".
const DOWN_FOR: u32 = 40;

fn finish_comments(s: &FakeState, job: &str) -> usize {
    let key = format!("launcher:{job}:1:finish");
    s.comments
        .iter()
        .filter(|c| c.idempotency_key == key)
        .count()
}

/// Waits until the down peers have refused `n` calls.
async fn refused(h: &H, n: u32) {
    eventually(SECS, "the peers refused calls while down", || {
        h.peers.with(|s| s.refused_while_down >= n)
    })
    .await;
}

async fn a_run_that_ends_while_its_peers_are_down_is_delivered_when_they_come_back(
    storage: TestStorage,
) {
    let h = H::start(storage, SUCCESS, &[("ORCH_LAUNCHER_GIT", "false")]).await;
    h.peers.with(|s| {
        s.usage_ledger_down = true;
        s.stage_engine_down = true;
    });
    let job = h.enqueue("analyst", "analysis", "").await;
    // The job's outcome is decided locally: it does not wait for the peers.
    let j = h.wait_done(&job.id, SECS).await;
    assert_eq!(
        (j.status, j.outcome.as_str()),
        (Status::Succeeded, "succeeded")
    );
    assert!(!j.reason.contains("advance_stage"), "{}", j.reason);
    refused(&h, DOWN_FOR).await;
    let snap = h.snapshot().await;
    assert!(snap.outbox_pending >= 3, "{snap:?}");
    assert_eq!(snap.outbox_failed, 0);
    // GetJob says the job's end still waits (stage-engine's watchdog reads it: moving).
    assert!(h.get_job(&job.id).await.pending_effects >= 3);
    h.peers.with(|s| {
        assert!(s.record_runs.is_empty() && s.advances.is_empty() && s.comments.is_empty());
        s.usage_ledger_down = false;
        s.stage_engine_down = false;
    });
    h.outbox_drained().await;
    h.peers.with(|s| {
        assert_eq!(s.record_runs.len(), 1);
        assert_eq!(
            (s.record_runs[0].job_id.as_str(), s.record_runs[0].attempt),
            (job.id.as_str(), 1)
        );
        assert_eq!(finish_comments(s, &job.id), 1);
        assert_eq!(s.advances.len(), 1);
        assert_eq!(
            (s.advances[0].job_id.as_str(), s.advances[0].attempt),
            (job.id.as_str(), 1)
        );
        assert_eq!(s.advances[0].finished_agent, "analyst");
        assert!(s.failures_reported.is_empty());
    });
    let snap = h.snapshot().await;
    assert_eq!((snap.outbox_pending, snap.outbox_failed), (0, 0));
    assert_eq!(h.get_job(&job.id).await.pending_effects, 0);
}

async fn a_restarted_launcher_delivers_what_its_previous_life_left(storage: TestStorage) {
    let storage = Arc::new(storage);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let vars = [("ORCH_LAUNCHER_GIT", "false")];
    let first = H::start_on(
        storage.clone(),
        dir.clone(),
        "test-instance",
        SUCCESS,
        &vars,
    )
    .await;
    first.peers.with(|s| {
        s.usage_ledger_down = true;
        s.stage_engine_down = true;
    });
    let job = first.enqueue("developer", "development", "").await;
    assert_eq!(
        first.wait_done(&job.id, SECS).await.status,
        Status::Succeeded
    );
    refused(&first, 10).await;
    first.shutdown.cancel();
    first.svc.supervisor().stopped().cancelled().await;
    drop(first);
    // A new life over the same storage, the peers still down; then they come back.
    let peers = Arc::new(FakePeers::default());
    peers.with(|s| {
        s.usage_ledger_down = true;
        s.stage_engine_down = true;
    });
    let second = H::start_with(storage, dir, "test-instance", "", &vars, peers).await;
    refused(&second, 10).await;
    second.peers.with(|s| {
        assert!(s.record_runs.is_empty() && s.advances.is_empty());
        s.usage_ledger_down = false;
        s.stage_engine_down = false;
    });
    second.outbox_drained().await;
    second.peers.with(|s| {
        assert_eq!(s.record_runs.len(), 1);
        assert_eq!(s.record_runs[0].job_id, job.id);
        assert_eq!(finish_comments(s, &job.id), 1);
        assert_eq!(s.advances.len(), 1);
        assert_eq!(s.advances[0].job_id, job.id);
    });
}

async fn a_job_that_fails_for_good_is_reported_once_and_a_requeue_is_not(storage: TestStorage) {
    let h = H::start(
        storage,
        "cat {contracts}/real-2.1.328/error-max-turns.stdout.json; exit 1",
        &[("ORCH_LAUNCHER_GIT", "false"), ("ORCH_MAX_ATTEMPTS", "2")],
    )
    .await;
    h.peers.with(|s| s.stage_engine_down = true);
    let job = h.enqueue("developer", "development", "").await;
    // The first failure requeues (reported to nobody); the second is for good.
    let j = h.wait_done(&job.id, SECS).await;
    assert_eq!((j.status, j.attempt), (Status::Failed, 2), "{j:#?}");
    refused(&h, DOWN_FOR).await;
    h.peers.with(|s| s.stage_engine_down = false);
    h.outbox_drained().await;
    h.peers.with(|s| {
        assert_eq!(s.failures_reported.len(), 1, "{:?}", s.failures_reported);
        let r = &s.failures_reported[0];
        assert_eq!(
            (
                r.work_item.as_str(),
                r.job_id.as_str(),
                r.attempt,
                r.agent.as_str()
            ),
            (KEY, job.id.as_str(), 2, "developer")
        );
        assert_eq!(r.outcome, "permanent");
        assert!(r.reason.contains("error_max_turns"), "{}", r.reason);
        assert!(r.reason.contains("failure 2 of 2"), "{}", r.reason);
        assert!(s.advances.is_empty());
        let failed: Vec<_> = s
            .comments
            .iter()
            .filter(|c| c.idempotency_key.ends_with(":failed"))
            .collect();
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert!(
            failed[0].html.contains("Developer failed"),
            "{}",
            failed[0].html
        );
        // Both runs are accounted for.
        assert_eq!(s.record_runs.len(), 2);
    });
}

async fn a_missing_prompt_is_reported(storage: TestStorage) {
    let h = H::start(storage, SUCCESS, &[("ORCH_LAUNCHER_GIT", "false")]).await;
    let job = h.enqueue("planner", "analysis", "").await;
    let j = h.wait_done(&job.id, SECS).await;
    assert_eq!(
        (j.status, j.outcome.as_str()),
        (Status::Failed, "bad_input")
    );
    h.outbox_drained().await;
    h.peers.with(|s| {
        assert_eq!(s.failures_reported.len(), 1);
        assert_eq!(s.failures_reported[0].outcome, "bad_input");
        assert!(
            s.failures_reported[0]
                .reason
                .contains("missing prompt file"),
            "{}",
            s.failures_reported[0].reason
        );
    });
}

async fn a_permanent_answer_dead_letters_the_entry_visibly(storage: TestStorage) {
    let h = H::start(storage, SUCCESS, &[("ORCH_LAUNCHER_GIT", "false")]).await;
    h.peers
        .with(|s| s.advance_refusal = Some(tonic::Code::FailedPrecondition));
    let job = h.enqueue("developer", "development", "").await;
    assert_eq!(h.wait_done(&job.id, SECS).await.status, Status::Succeeded);
    h.outbox_drained().await;
    let snap = h.snapshot().await;
    assert_eq!((snap.outbox_pending, snap.outbox_failed), (0, 1));
    let failed = OUTBOX.list(&h.db, KEY, "failed", 10).await.expect("list");
    assert_eq!(failed.len(), 1);
    assert_eq!(
        (failed[0].kind.as_str(), failed[0].attempts),
        ("advance_stage", 1)
    );
    assert!(
        failed[0].last_error.contains("FailedPrecondition"),
        "{}",
        failed[0].last_error
    );
    // What came before it went out: the usage and the finish comment.
    h.peers.with(|s| {
        assert_eq!(s.record_runs.len(), 1);
        assert_eq!(finish_comments(s, &job.id), 1);
        s.advance_refusal = None;
    });
    // An operator fixed the cause: the dead letter goes out.
    assert_eq!(OUTBOX.retry_failed(&h.db, "", KEY).await.expect("retry"), 1);
    h.outbox_drained().await;
    h.peers.with(|s| assert_eq!(s.advances.len(), 1));
    assert_eq!(h.snapshot().await.outbox_failed, 0);
}

async fn a_flip_advances_or_reports_like_the_run_would(storage: TestStorage) {
    let h = H::start(
        storage,
        "sleep 300",
        &[("ORCH_LAUNCHER_GIT", "false"), ("ORCH_MAX_ATTEMPTS", "1")],
    )
    .await;
    h.peers.with(|s| s.stage_engine_down = true);
    let mut jobs = Vec::new();
    for (key, outcome) in [
        ("ORCH-1", JobStatus::Succeeded),
        ("ORCH-2", JobStatus::Failed),
    ] {
        let job = h.enqueue_for(key, "developer", "development", "").await;
        let running = h.wait_for(&job.id, SECS, |j| j.pid.is_some()).await;
        let r = h
            .svc
            .flip_terminal(Request::new(FlipTerminalRequest {
                job_id: job.id.clone(),
                attempt: running.attempt,
                outcome: outcome as i32,
                reason: "reaper: tier test".into(),
                exit_code: Some(0),
                kill_process_group: true,
            }))
            .await
            .expect("flip")
            .into_inner();
        assert!(r.flipped);
        jobs.push(job.id);
    }
    refused(&h, DOWN_FOR).await;
    h.peers.with(|s| s.stage_engine_down = false);
    h.outbox_drained().await;
    h.peers.with(|s| {
        assert_eq!(s.advances.len(), 1);
        assert_eq!(
            (
                s.advances[0].work_item.as_str(),
                s.advances[0].job_id.as_str()
            ),
            ("ORCH-1", jobs[0].as_str())
        );
        assert_eq!(s.failures_reported.len(), 1);
        assert_eq!(
            (
                s.failures_reported[0].work_item.as_str(),
                s.failures_reported[0].job_id.as_str()
            ),
            ("ORCH-2", jobs[1].as_str())
        );
        assert_eq!(s.failures_reported[0].outcome, "flipped");
    });
}

/// A run's effects go out in the order they were written, each as soon as the one before
/// it is delivered: the fallback poll (an hour here) is never what moves the chain on.
async fn a_run_s_effects_go_out_in_order_without_waiting_for_the_poll(storage: TestStorage) {
    let h = H::start(
        storage,
        SUCCESS,
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_LAUNCHER_OUTBOX_POLL_MS", "3600000"),
        ],
    )
    .await;
    let job = h.enqueue("analyst", "analysis", "").await;
    assert_eq!(h.wait_done(&job.id, SECS).await.status, Status::Succeeded);
    h.outbox_drained().await;
    // The analyst's start comment is written while it runs, by another task: its place
    // before the end is not the point here.
    let calls: Vec<String> = h.peers.with(|s| {
        s.calls
            .iter()
            .filter(|c| !c.ends_with(":start"))
            .cloned()
            .collect()
    });
    assert_eq!(
        calls,
        [
            "record_run".to_owned(),
            format!("add_comment:launcher:{}:1:finish", job.id),
            "advance_stage".to_owned(),
        ]
    );
}

on_both_backends!(
    a_run_that_ends_while_its_peers_are_down_is_delivered_when_they_come_back,
    a_restarted_launcher_delivers_what_its_previous_life_left,
    a_job_that_fails_for_good_is_reported_once_and_a_requeue_is_not,
    a_missing_prompt_is_reported,
    a_permanent_answer_dead_letters_the_entry_visibly,
    a_flip_advances_or_reports_like_the_run_would,
    a_run_s_effects_go_out_in_order_without_waiting_for_the_poll,
);
