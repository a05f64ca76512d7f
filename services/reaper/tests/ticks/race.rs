//! The reaper's flip racing the launcher's own finalize of the same attempt: exactly one
//! wins, over 1,000 runs. The launcher is not built yet (issue #4), so the race is run
//! against the fake's table with the launcher's guarded UPDATE
//! (`WHERE id = ? AND status = 'running' AND attempt = ?`), on SQLite and on PostgreSQL:
//! it proves that the reaper goes only through that guard and counts a lost race as lost.

use orchestrator_kit::time::now_ms;
use orchestrator_proto::launcher::v1::Liveness;
use orchestrator_testkit::{TestStorage, on_both_backends};

use crate::world::{NewJob, World, rules};

const RUNS: usize = 1000;

async fn the_reapers_flip_races_the_launchers_finalize(storage: TestStorage) {
    let w = World::new(storage).await;
    // One dead tick is enough: every tick flips whatever it finds dead.
    let reaper = w.reaper(reaper::ReaperConfig {
        lease_reclaim_enabled: false,
        ..rules(1)
    });
    let (mut reaper_won, mut launcher_won, mut reaper_lost) = (0, 0, 0);
    let t0 = now_ms();
    for run in 0..RUNS {
        let id = format!("race-{run}");
        w.launcher.insert(&NewJob::llm(&id)).await;
        w.launcher.set(&id, Liveness::Dead, None);
        let launcher = w.launcher.clone();
        let job = id.clone();
        let finalize = tokio::spawn(async move {
            // Jitter across the span of a tick, so that the finalize lands before the
            // reaper lists the job, between its listing and its flip, or after the flip.
            let jitter = u64::try_from(run * 7919 % 60).expect("small") * 100;
            tokio::time::sleep(std::time::Duration::from_micros(jitter)).await;
            launcher.finalize(&job, 1).await
        });
        let tick = reaper.tick_at(t0 + i64::try_from(run).expect("run") * 60_000);
        let (tick, finalized) = tokio::join!(tick, finalize);
        let finalized = finalized.expect("finalize task");
        assert_eq!(tick.errors, 0, "run {run}: {tick:?}");
        let reaper_flipped = tick.flips_dead_pid == 1;
        assert!(
            reaper_flipped != finalized,
            "run {run}: exactly one must win (reaper {reaper_flipped}, launcher {finalized})"
        );
        let stored = w.launcher.job(&id).await;
        assert_ne!(stored.status, "running", "run {run}");
        assert_eq!(
            stored.finished_by,
            if finalized { "launcher" } else { "reaper" },
            "run {run}"
        );
        if finalized {
            launcher_won += 1;
            reaper_lost += tick.flips_lost;
        } else {
            reaper_won += 1;
        }
    }
    assert_eq!(reaper_won + launcher_won, RUNS);
    // Both orders happened: the test raced for real.
    assert!(
        reaper_won > 0 && launcher_won > 0,
        "reaper {reaper_won}, launcher {launcher_won} (lost flips {reaper_lost})"
    );
}

on_both_backends!(the_reapers_flip_races_the_launchers_finalize);
