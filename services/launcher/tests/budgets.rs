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
        let told: Vec<(&str, &str)> = s
            .notifications
            .iter()
            .map(|n| (n.event.as_str(), n.event_id.as_str()))
            .collect();
        assert_eq!(
            told,
            vec![
                (
                    "budget_ceiling_reached",
                    format!("budget_ceiling:daily:acme/app:{today}").as_str(),
                ),
                (
                    "budget_ceiling_reached",
                    format!("budget_ceiling:daily:*:{today}").as_str(),
                ),
            ]
        );
        assert_eq!(s.notifications[0].work_item, "ORCH-3");
        // The global ceiling is told by the first job that finds it reached: ORCH-5 at its
        // launch, or ORCH-3 at a recheck, whichever looks first once ORCH-4's run counts.
        assert!(
            ["ORCH-3", "ORCH-5"].contains(&s.notifications[1].work_item.as_str()),
            "{}",
            s.notifications[1].work_item
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

async fn set_ceiling(
    h: &H,
    period: &str,
    repo: &str,
    usd: f64,
    clear: bool,
) -> Result<orchestrator_proto::launcher::v1::SetSpendingCeilingResponse, tonic::Status> {
    use orchestrator_proto::launcher::v1::SetSpendingCeilingRequest;
    use orchestrator_proto::launcher::v1::launcher_server::Launcher;
    h.svc
        .set_spending_ceiling(tonic::Request::new(SetSpendingCeilingRequest {
            period: period.into(),
            repo: repo.into(),
            usd,
            clear,
        }))
        .await
        .map(tonic::Response::into_inner)
}

/// A daily ceiling reached mid-test queues the next launch with the reason; raising it
/// through `SetSpendingCeiling` resumes it at once, with no restart (the recheck is longer
/// than the test: only the RPC's wake-up can start it in time). What was set outlives a
/// restart (the environment is only the default); cleared, the environment's is in force
/// again. Bad input is refused naming the field and changes nothing.
async fn a_ceiling_raised_through_the_rpc_resumes_the_waiting_jobs_without_a_restart(
    storage: TestStorage,
) {
    let storage = Arc::new(storage);
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let peers = Arc::new(FakePeers::default());
    let env = [
        ("ORCH_LAUNCHER_GIT", "false"),
        ("ORCH_BUDGET_DAILY_USD", "0.025"),
        ("ORCH_BUDGET_RECHECK_S", "3600"),
    ];
    let h = H::start_with(
        storage.clone(),
        dir.clone(),
        "test-instance",
        AGENT,
        &env,
        peers.clone(),
    )
    .await;
    run_one(&h, "ORCH-1", REPO).await;
    run_one(&h, "ORCH-2", REPO).await;
    let waiting = enqueue(&h, "ORCH-3", REPO).await;
    waits(
        &h,
        &waiting,
        1,
        "the daily spending ceiling is reached: $0.0349 spent of $0.025 since",
    )
    .await;
    assert_eq!(runs(&h).len(), 2);

    // Bad input: refused naming the field; nothing changes.
    for (period, repo, usd, says) in [
        ("weekly", "", 1.0, "period"),
        ("daily", "../etc", 1.0, "repo"),
        ("daily", "", -1.0, "usd"),
        ("daily", "", f64::NAN, "usd"),
    ] {
        let e = set_ceiling(&h, period, repo, usd, false)
            .await
            .expect_err(says);
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        assert!(e.message().starts_with(says), "{says}: {}", e.message());
    }
    assert_eq!(h.job(&waiting.id).await.status, Status::Queued);

    // The operator raises the daily ceiling: the waiting job runs now.
    let r = set_ceiling(&h, "daily", "", 1.0, false)
        .await
        .expect("raised");
    assert_eq!(r.woken, 1, "{r:?}");
    let in_force: Vec<_> = r
        .ceilings
        .iter()
        .map(|c| {
            (
                c.period.as_str(),
                c.repo.as_str(),
                c.ceiling_usd,
                c.source.as_str(),
            )
        })
        .collect();
    assert_eq!(in_force, vec![("daily", "", 1.0, "SetSpendingCeiling")]);
    let j = h.wait_done(&waiting.id, SECS).await;
    assert_eq!((j.status, j.failures), (Status::Succeeded, 0), "{j:#?}");
    assert_eq!(runs(&h).len(), 3);
    // The queue's snapshot (GET /queue's launcher.budget) shows the ceiling in force.
    let s = h.snapshot().await;
    assert_eq!(s.budget_waiting, 0);
    let c = &s.budget_ceilings[0];
    assert_eq!(
        (c.ceiling_usd, c.source.as_str()),
        (1.0, "SetSpendingCeiling")
    );
    assert!((c.spent_usd.expect("a spend") - 3.0 * 0.01744).abs() < 1e-9);

    // A restart with the same environment keeps what was set.
    h.shutdown.cancel();
    h.svc.supervisor().stopped().cancelled().await;
    drop(h);
    let h = H::start_with(storage, dir, "test-instance", "", &env, peers).await;
    run_one(&h, "ORCH-4", REPO).await;
    assert_eq!(runs(&h).len(), 4);
    // Cleared: the environment's $0.025 is in force again, and the next launch waits.
    let r = set_ceiling(&h, "daily", "", 0.0, true)
        .await
        .expect("cleared");
    assert_eq!(r.ceilings.len(), 1);
    assert_eq!(
        (r.ceilings[0].ceiling_usd, r.ceilings[0].source.as_str()),
        (0.025, "ORCH_BUDGET_DAILY_USD")
    );
    let next = enqueue(&h, "ORCH-5", REPO).await;
    waits(&h, &next, 1, "(ORCH_BUDGET_DAILY_USD)").await;
    // usd 0 lifts the ceiling, whatever the environment says.
    let r = set_ceiling(&h, "daily", "", 0.0, false)
        .await
        .expect("lifted");
    assert!(r.ceilings.is_empty(), "{r:?}");
    assert_eq!(h.wait_done(&next.id, SECS).await.status, Status::Succeeded);
    assert_eq!(runs(&h).len(), 5);
}

on_both_backends!(
    a_ceiling_reached_mid_test_queues_launches_until_it_is_raised,
    a_ceiling_that_cannot_be_checked_holds_the_launch,
    a_ceiling_raised_through_the_rpc_resumes_the_waiting_jobs_without_a_restart,
);
