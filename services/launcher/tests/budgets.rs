//! The spending ceilings (#18) on SQLite and PostgreSQL, with real agent processes: a
//! ceiling reached mid-test makes the next LLM launches wait, queued with the reason and
//! never failed, re-checked while they wait; a launcher restarted with raised ceilings runs
//! them; people are told once per ceiling and day. The spend is what usage-ledger's fake sums from the runs the launcher recorded
//! (their real CLI output, each $0.01744).

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FakePeers, H, REPO};
use launcher::store::{JobRow, Status};
use orchestrator_proto::launcher::v1::EnqueueRequest;
use orchestrator_testkit::{TestStorage, on_both_backends};

const SECS: Duration = Duration::from_secs(20);
/// Each run appends a line to `{root}/runs`, then prints a real CLI result ($0.01744).
const AGENT: &str = r#"echo "$ORCH_JOB_ID $ORCH_REPO" >> {root}/runs
cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json"#;
const OTHER_REPO: &str = "acme/web";

async fn enqueue(h: &H, key: &str, repo: &str) -> JobRow {
    h.svc
        .enqueue_job(EnqueueRequest {
            work_item: key.into(),
            repo: repo.into(),
            agent: "developer".into(),
            stage: "development".into(),
            ..EnqueueRequest::default()
        })
        .await
        .expect("enqueue")
        .0
}

/// Runs one job to success and waits until its run is recorded (the spend that the next
/// check sees).
async fn run_one(h: &H, key: &str, repo: &str) -> JobRow {
    let job = enqueue(h, key, repo).await;
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Succeeded, "{done:#?}");
    h.outbox_drained().await;
    done
}

fn runs(h: &H) -> Vec<String> {
    std::fs::read_to_string(h.root.join("runs"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// A job waiting for a ceiling: queued, its reason naming the ceiling, claimed again to
/// look at least `rechecks` times, never failed.
async fn waits(h: &H, job: &JobRow, rechecks: u32, says: &str) -> JobRow {
    let j = h
        .wait_for(&job.id, SECS, |j| {
            j.status == Status::Queued && j.outcome == "budget_ceiling" && j.attempt >= rechecks
        })
        .await;
    assert_eq!(j.failures, 0, "{j:#?}");
    assert!(j.reason.contains(says), "{}", j.reason);
    j
}

async fn a_ceiling_reached_mid_test_queues_launches_until_it_is_raised(storage: TestStorage) {
    let storage = Arc::new(storage);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let peers = Arc::new(FakePeers::default());
    // acme/app may spend $0.025 a day (less than two runs), every repository $0.045 (less
    // than three); waiting jobs look again every 0.2 s.
    let tight = [
        ("ORCH_LAUNCHER_GIT", "false"),
        ("ORCH_BUDGET_DAILY_USD", "0.045"),
        ("ORCH_BUDGET_DAILY_USD_JSON", r#"{"acme/app": 0.025}"#),
        ("ORCH_BUDGET_RECHECK_S", "0.2"),
    ];
    let h = H::start_with(
        storage.clone(),
        dir.clone(),
        "test-instance",
        AGENT,
        &tight,
        peers.clone(),
    )
    .await;
    run_one(&h, "ORCH-1", REPO).await;
    run_one(&h, "ORCH-2", REPO).await;
    // acme/app has spent $0.03488 of $0.025: its next job waits, with the reason.
    let app = enqueue(&h, "ORCH-3", REPO).await;
    let w = waits(
        &h,
        &app,
        3,
        "the daily spending ceiling of acme/app is reached",
    )
    .await;
    assert!(
        w.reason.contains("$0.0349 spent of $0.025")
            && w.reason.contains("(ORCH_BUDGET_DAILY_USD_JSON)")
            && w.reason.contains("or the ceiling is raised"),
        "{}",
        w.reason
    );
    // Another repository is under its (global) ceiling still: it runs meanwhile.
    run_one(&h, "ORCH-4", OTHER_REPO).await;
    // Now every repository together has spent $0.05232 of $0.045.
    let web = enqueue(&h, "ORCH-5", OTHER_REPO).await;
    waits(
        &h,
        &web,
        2,
        "the daily spending ceiling is reached: $0.0523 spent of $0.045",
    )
    .await;
    assert_eq!(runs(&h).len(), 3, "no agent ran for a waiting job");
    // People are told once per ceiling and day, however often the jobs looked again.
    h.outbox_drained().await;
    let today = &orchestrator_kit::time::rfc3339(orchestrator_kit::time::now_ms())[..10];
    h.peers.with(|s| {
        let told: Vec<(&str, &str, &str)> = s
            .notifications
            .iter()
            .map(|n| (n.event.as_str(), n.event_id.as_str(), n.work_item.as_str()))
            .collect();
        assert_eq!(
            told,
            vec![
                (
                    "budget_ceiling_reached",
                    format!("budget_ceiling:daily:acme/app:{today}").as_str(),
                    "ORCH-3"
                ),
                (
                    "budget_ceiling_reached",
                    format!("budget_ceiling:daily:*:{today}").as_str(),
                    "ORCH-5"
                ),
            ]
        );
        assert!(
            s.notifications[0]
                .text
                .contains("the daily spending ceiling of acme/app is reached"),
            "{}",
            s.notifications[0].text
        );
    });
    // Shown in the queue's snapshot: each ceiling, its spend, the jobs waiting.
    let s = h.snapshot().await;
    assert_eq!(s.budget_waiting, 2, "{s:?}");
    let global = s
        .budget_ceilings
        .iter()
        .find(|c| c.repo.is_empty())
        .expect("the global ceiling");
    assert_eq!(
        (global.period.as_str(), global.ceiling_usd),
        ("daily", 0.045)
    );
    let spent = global.spent_usd.expect("a spend");
    assert!((spent - 3.0 * 0.01744).abs() < 1e-9, "{spent}");
    let per_app = s
        .budget_ceilings
        .iter()
        .find(|c| c.repo == REPO)
        .expect("acme/app's ceiling");
    assert!((per_app.spent_usd.expect("a spend") - 2.0 * 0.01744).abs() < 1e-9);
    assert!(per_app.resets_at_ms > orchestrator_kit::time::now_ms());

    // The operator raises the ceilings and restarts the launcher: both jobs run at once.
    h.shutdown.cancel();
    h.svc.supervisor().stopped().cancelled().await;
    drop(h);
    let raised = [
        ("ORCH_LAUNCHER_GIT", "false"),
        ("ORCH_BUDGET_DAILY_USD", "1"),
        ("ORCH_BUDGET_DAILY_USD_JSON", r#"{"acme/app": 0.5}"#),
        // Longer than the test: only the restart's wake-up can start them in time.
        ("ORCH_BUDGET_RECHECK_S", "3600"),
    ];
    let h = H::start_with(storage, dir, "test-instance", "", &raised, peers).await;
    for job in [&app, &web] {
        let j = h.wait_done(&job.id, SECS).await;
        assert_eq!(j.status, Status::Succeeded, "{j:#?}");
        assert_eq!(j.failures, 0);
    }
    let ran = runs(&h);
    assert_eq!(ran.len(), 5, "{ran:?}");
    assert!(ran.contains(&format!("{} {REPO}", app.id)), "{ran:?}");
    h.outbox_drained().await;
    h.peers.with(|s| {
        assert_eq!(s.record_runs.len(), 5);
        // Each run recorded with its job's repository (what the per-repo ceiling sums).
        let web_runs = s
            .record_runs
            .iter()
            .filter(|r| r.repo == OTHER_REPO)
            .count();
        assert_eq!(web_runs, 2);
        assert_eq!(s.notifications.len(), 2, "nothing more to tell");
    });
    assert_eq!(h.snapshot().await.budget_waiting, 0);
}

/// usage-ledger down: the job waits (with a backoff) rather than launching unchecked or
/// failing, and runs once it answers.
async fn a_ceiling_that_cannot_be_checked_holds_the_launch(storage: TestStorage) {
    let h = H::start(
        storage,
        AGENT,
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_BUDGET_MONTHLY_USD", "10"),
        ],
    )
    .await;
    h.peers.with(|s| s.usage_ledger_down = true);
    let job = enqueue(&h, "ORCH-1", REPO).await;
    let j = h
        .wait_for(&job.id, SECS, |j| {
            j.status == Status::Queued && j.outcome == "peer_unavailable" && j.attempt >= 2
        })
        .await;
    assert!(
        j.reason
            .contains("usage-ledger cannot tell what was spent against the monthly ceiling"),
        "{}",
        j.reason
    );
    assert!(runs(&h).is_empty());
    h.peers.with(|s| s.usage_ledger_down = false);
    let j = h.wait_done(&job.id, SECS).await;
    assert_eq!(j.status, Status::Succeeded, "{j:#?}");
    assert_eq!(runs(&h).len(), 1);
}

on_both_backends!(
    a_ceiling_reached_mid_test_queues_launches_until_it_is_raised,
    a_ceiling_that_cannot_be_checked_holds_the_launch,
);
