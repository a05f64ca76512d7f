//! Each tier through real gRPC against the fakes, with the clock moved by the test.

use orchestrator_kit::time::now_ms;
use orchestrator_proto::launcher::v1::{JobKind, Liveness};
use orchestrator_proto::reaper::v1::reaper_server::Reaper;
use orchestrator_proto::reaper::v1::{SnapshotRequest, TickNowRequest};
use orchestrator_testkit::{TestStorage, on_both_backends};
use reaper::ReaperService;
use tonic::Request;

use crate::world::{NewJob, World, rules};

const I: i64 = 30_000;

async fn snapshot(r: &ReaperService) -> orchestrator_proto::reaper::v1::ReaperSnapshot {
    Reaper::snapshot(r, Request::new(SnapshotRequest {}))
        .await
        .expect("snapshot")
        .into_inner()
}

async fn dead_pid_streak(storage: TestStorage) {
    let w = World::new(storage).await;
    for id in ["alive", "dead", "gone"] {
        let mut j = NewJob::llm(id);
        if id == "gone" {
            j.instance_id = "launcher-old".into();
        }
        w.launcher.insert(&j).await;
    }
    w.launcher.set("alive", Liveness::Alive, None);
    w.launcher.set("dead", Liveness::Dead, None);
    w.launcher.set("gone", Liveness::InstanceGone, None);
    w.gate
        .holders
        .lock()
        .expect("lock")
        .insert("dead".into(), "acme/app".into());
    let reaper = w.reaper(rules(3));
    let t0 = now_ms();

    for (n, t) in [t0, t0 + I].into_iter().enumerate() {
        let r = reaper.tick_at(t).await;
        assert_eq!(
            (r.jobs_seen, r.flips_dead_pid, r.errors),
            (3, 0, 0),
            "tick {n}: {r:?}"
        );
    }
    let s = snapshot(&reaper).await;
    let streaks: Vec<(String, u32, String)> = s
        .dead_streaks
        .iter()
        .map(|d| (d.job_id.clone(), d.ticks, d.liveness.clone()))
        .collect();
    assert_eq!(
        streaks,
        vec![
            ("dead".into(), 2, "DEAD".into()),
            ("gone".into(), 2, "INSTANCE_GONE".into())
        ]
    );
    assert_eq!(w.launcher.job("dead").await.status, "running");

    let r = reaper.tick_at(t0 + 2 * I).await;
    assert_eq!(
        (r.flips_dead_pid, r.flips_lost, r.errors),
        (2, 0, 0),
        "{r:?}"
    );
    let dead = w.launcher.job("dead").await;
    assert_eq!(
        (
            dead.status.as_str(),
            dead.outcome.as_str(),
            dead.finished_by.as_str()
        ),
        ("failed", "FAILED", "reaper")
    );
    assert!(
        dead.reason.contains("dead for 3 consecutive ticks"),
        "{dead:?}"
    );
    assert!(!dead.killed);
    let gone = w.launcher.job("gone").await;
    assert_eq!(gone.status, "failed");
    assert!(gone.reason.contains("launcher instance"), "{gone:?}");
    assert_eq!(w.launcher.job("alive").await.status, "running");

    // Leases: the gone instance and the flipped jobs are named to merge-gate.
    let last = w
        .gate
        .requests
        .lock()
        .expect("lock")
        .last()
        .cloned()
        .expect("a reclaim");
    assert_eq!(last.dead_instance_ids, vec!["launcher-old".to_owned()]);
    let mut dead_jobs = last.dead_job_ids.clone();
    dead_jobs.sort();
    assert_eq!(dead_jobs, vec!["dead".to_owned(), "gone".to_owned()]);
    assert_eq!(r.leases_reclaimed, 1);

    let s = snapshot(&reaper).await;
    assert_eq!(
        (s.ticks, s.flips_dead_pid, s.leases_reclaimed, s.errors),
        (3, 2, 1, 0)
    );
    assert!(s.dead_streaks.is_empty(), "{:?}", s.dead_streaks);
    assert_eq!(
        (s.enabled, s.interval_s, s.dead_ticks, s.max_running_s),
        (true, 30, 3, 7200)
    );
    let r = reaper.tick_at(t0 + 3 * I).await;
    assert_eq!(r.jobs_seen, 1);
}

async fn streak_resets_when_alive_again(storage: TestStorage) {
    let w = World::new(storage).await;
    w.launcher.insert(&NewJob::llm("flaky")).await;
    let reaper = w.reaper(rules(3));
    let t0 = now_ms();
    let plan = [
        (Liveness::Dead, 0),
        (Liveness::Dead, 0),
        (Liveness::Alive, 0),
        (Liveness::Dead, 0),
        (Liveness::Dead, 0),
        (Liveness::Dead, 1),
    ];
    for (n, (liveness, flips)) in plan.into_iter().enumerate() {
        w.launcher.set("flaky", liveness, None);
        let r = reaper.tick_at(t0 + I * i64::try_from(n).expect("n")).await;
        assert_eq!(r.flips_dead_pid, flips, "tick {n}: {r:?}");
    }
    assert_eq!(w.launcher.job("flaky").await.status, "failed");
}

async fn restart_keeps_streaks_and_never_hastens(storage: TestStorage) {
    let w = World::new(storage).await;
    let t0 = now_ms();

    // A restart between ticks keeps the streak: the third death flips.
    w.launcher.insert(&NewJob::llm("a")).await;
    w.launcher.set("a", Liveness::Dead, None);
    let first = w.reaper(rules(3));
    first.tick_at(t0).await;
    first.tick_at(t0 + I).await;
    drop(first);
    let second = w.reaper(rules(3));
    assert_eq!(second.tick_at(t0 + 2 * I).await.flips_dead_pid, 1);
    assert_eq!(w.launcher.job("a").await.status, "failed");

    // Ticks in quick succession (TickNow) add nothing to a streak.
    let t1 = t0 + 10 * I;
    w.launcher.insert(&NewJob::llm("b")).await;
    w.launcher.set("b", Liveness::Dead, None);
    for dt in [0, I / 4, I / 3, I / 3 + 1] {
        assert_eq!(second.tick_at(t1 + dt).await.flips_dead_pid, 0);
    }
    let s = snapshot(&second).await;
    assert_eq!(
        s.dead_streaks.iter().map(|d| d.ticks).collect::<Vec<_>>(),
        vec![1]
    );
    assert_eq!(second.tick_at(t1 + I).await.flips_dead_pid, 0);
    assert_eq!(second.tick_at(t1 + 2 * I).await.flips_dead_pid, 1);

    // A reaper that was down longer than three intervals starts the streak again.
    let t2 = t0 + 20 * I;
    w.launcher.insert(&NewJob::llm("c")).await;
    w.launcher.set("c", Liveness::Dead, None);
    second.tick_at(t2).await;
    second.tick_at(t2 + I).await;
    drop(second);
    let third = w.reaper(rules(3));
    for dt in [5 * I, 6 * I] {
        assert_eq!(third.tick_at(t2 + dt).await.flips_dead_pid, 0, "+{dt}");
    }
    assert_eq!(third.tick_at(t2 + 7 * I).await.flips_dead_pid, 1);
}

async fn exit_code_known_but_still_running(storage: TestStorage) {
    let w = World::new(storage).await;
    let mut reserved = NewJob::llm("finalizer");
    reserved.kind = JobKind::Reserved;
    reserved.agent = "deploy-finalizer".into();
    let mut gone_item = NewJob::llm("orphan");
    gone_item.work_item = "GONE-1".into();
    for j in [
        NewJob::llm("ok"),
        NewJob::llm("bad-exit"),
        NewJob::llm("finalizing"),
        reserved,
        gone_item,
    ] {
        w.launcher.insert(&j).await;
    }
    for (id, code) in [
        ("ok", 0),
        ("bad-exit", 2),
        ("finalizing", 0),
        ("finalizer", 0),
        ("orphan", 0),
    ] {
        w.launcher.set(id, Liveness::Dead, Some(code));
    }
    let reaper = w.reaper(rules(2));
    let t0 = now_ms();
    // Exit code known at once, but a live launcher may be finalizing: the streak applies.
    let r = reaper.tick_at(t0).await;
    assert_eq!((r.flips_exit_code, r.flips_dead_pid), (0, 0), "{r:?}");
    assert!(w.stage.advanced.lock().expect("lock").is_empty());
    // ...and the launcher does finalize one of them meanwhile.
    assert!(w.launcher.finalize("finalizing", 1).await);

    // Stage-engine is down when the streak is reached: the exit-0 LLM jobs wait, the
    // others go.
    *w.stage.down.lock().expect("lock") = true;
    let r = reaper.tick_at(t0 + I).await;
    assert_eq!(
        (r.jobs_seen, r.flips_exit_code, r.errors),
        (4, 2, 2),
        "{r:?}"
    );
    assert!(r.error.contains("AdvanceStage"), "{r:?}");
    assert_eq!(w.launcher.job("ok").await.status, "running");
    let bad = w.launcher.job("bad-exit").await;
    assert_eq!(
        (bad.status.as_str(), bad.exit_code.as_str()),
        ("failed", "2")
    );
    let fin = w.launcher.job("finalizer").await;
    assert_eq!(
        (fin.status.as_str(), fin.exit_code.as_str()),
        ("succeeded", "0")
    );

    *w.stage.down.lock().expect("lock") = false;
    let r = reaper.tick_at(t0 + 2 * I).await;
    assert_eq!((r.flips_exit_code, r.errors), (2, 0), "{r:?}");
    let ok = w.launcher.job("ok").await;
    assert_eq!(
        (
            ok.status.as_str(),
            ok.outcome.as_str(),
            ok.exit_code.as_str()
        ),
        ("succeeded", "SUCCEEDED", "0")
    );
    assert!(ok.reason.contains("quality gate"), "{ok:?}");
    // A work item stage-engine no longer knows does not keep its job running.
    assert_eq!(w.launcher.job("orphan").await.status, "succeeded");

    let mut advanced = w.stage.advanced.lock().expect("lock").clone();
    advanced.sort_by(|a, b| a.job_id.cmp(&b.job_id));
    let ids: Vec<&str> = advanced.iter().map(|a| a.job_id.as_str()).collect();
    assert_eq!(
        ids,
        vec!["ok", "orphan"],
        "only LLM jobs that exited 0, never one already finalized"
    );
    let a = &advanced[0];
    assert_eq!(
        (
            a.work_item.as_str(),
            a.finished_agent.as_str(),
            a.attempt,
            a.dedupe_key.as_str()
        ),
        ("ORCH-1", "developer", 1, "ORCH-1:t1:developer")
    );
    assert_eq!(w.launcher.job("finalizing").await.finished_by, "launcher");
}

/// The reaper decides retryability by the one rule (`kit::retry`): DATA_LOSS is final (the
/// job is flipped anyway), UNAUTHENTICATED is not (the job waits for the next tick).
async fn advance_refusals_follow_the_one_retry_rule(storage: TestStorage) {
    let w = World::new(storage).await;
    for (id, item) in [("lost", "LOST-1"), ("token", "TOKEN-1")] {
        let mut j = NewJob::llm(id);
        j.work_item = item.into();
        w.launcher.insert(&j).await;
        w.launcher.set(id, Liveness::Dead, Some(0));
    }
    let reaper = w.reaper(rules(2));
    let t0 = now_ms();
    reaper.tick_at(t0).await;
    let r = reaper.tick_at(t0 + I).await;
    assert_eq!((r.flips_exit_code, r.errors), (1, 1), "{r:?}");
    assert_eq!(w.launcher.job("lost").await.status, "succeeded");
    assert_eq!(w.launcher.job("token").await.status, "running");
}

async fn backstop(storage: TestStorage) {
    let w = World::new(storage).await;
    let t0 = now_ms();
    let mut long = NewJob::llm("long");
    long.started_at_ms = t0 - 7_201_000;
    let mut young = NewJob::llm("young");
    young.started_at_ms = t0 - 7_199_000;
    w.launcher.insert(&long).await;
    w.launcher.insert(&young).await;
    w.launcher.set("long", Liveness::Alive, None);
    w.launcher.set("young", Liveness::Alive, None);
    let reaper = w.reaper(rules(3));
    let r = reaper.tick_at(t0).await;
    assert_eq!((r.flips_backstop, r.flips_dead_pid), (1, 0), "{r:?}");
    let j = w.launcher.job("long").await;
    assert_eq!(
        (j.status.as_str(), j.killed, j.exit_code.as_str()),
        ("failed", true, "-9")
    );
    assert!(j.reason.contains("ORCH_REAPER_MAX_RUNNING_S=7200"), "{j:?}");
    assert_eq!(w.launcher.job("young").await.status, "running");
    let flip = w.launcher.flips.lock().expect("lock")[0].clone();
    assert!(flip.kill_process_group);
    assert_eq!(snapshot(&reaper).await.flips_backstop, 1);
}

async fn a_bad_job_is_skipped(storage: TestStorage) {
    let w = World::new(storage).await;
    let mut no_attempt = NewJob::llm("no-attempt");
    no_attempt.attempt = 0;
    for j in [
        NewJob::llm("bad"),
        no_attempt,
        NewJob::llm("ok-1"),
        NewJob::llm("ok-2"),
    ] {
        w.launcher.insert(&j).await;
    }
    for id in ["bad", "no-attempt", "ok-1", "ok-2"] {
        w.launcher.set(id, Liveness::Dead, None);
    }
    w.launcher.with(|p| p.flip_fails.insert("bad".into()));
    let reaper = w.reaper(rules(1));
    let t0 = now_ms();
    let r = reaper.tick_at(t0).await;
    assert_eq!(
        (r.jobs_seen, r.flips_dead_pid, r.errors),
        (4, 2, 2),
        "{r:?}"
    );
    for id in ["ok-1", "ok-2"] {
        assert_eq!(w.launcher.job(id).await.status, "failed", "{id}");
    }
    assert_eq!(w.launcher.job("bad").await.status, "running");
    let s = snapshot(&reaper).await;
    assert_eq!(s.errors, 2);
    assert!(!s.last_error.is_empty());

    // Once the launcher answers again, the skipped job is handled by the next tick.
    w.launcher.with(|p| p.flip_fails.clear());
    let r = reaper.tick_at(t0 + I).await;
    assert_eq!(r.flips_dead_pid, 1, "{r:?}");
    assert_eq!(w.launcher.job("bad").await.status, "failed");

    // A launcher that cannot probe its jobs: the tick fails as a whole, streaks stand still.
    w.launcher.insert(&NewJob::llm("later")).await;
    w.launcher.set("later", Liveness::Dead, None);
    let reaper = w.reaper(rules(2));
    reaper.tick_at(t0 + 2 * I).await;
    w.launcher.with(|p| p.down = true);
    let r = reaper.tick_at(t0 + 3 * I).await;
    assert_eq!((r.errors, r.flips_dead_pid), (1, 0), "{r:?}");
    assert!(r.error.contains("ProbeProcesses"), "{r:?}");
    assert_eq!(snapshot(&reaper).await.dead_streaks[0].ticks, 1);
    w.launcher.with(|p| p.down = false);
    assert_eq!(reaper.tick_at(t0 + 4 * I).await.flips_dead_pid, 1);
}

/// The launcher finishes a job right after the probe found it dead: the reaper, reading the
/// whole job before it acts, sees that and flips nothing (a lost flip, not an error).
async fn a_job_finished_after_the_probe_is_left_alone(storage: TestStorage) {
    let w = World::new(storage).await;
    w.launcher.insert(&NewJob::llm("finishing")).await;
    w.launcher.set("finishing", Liveness::Dead, Some(0));
    w.launcher
        .with(|p| p.finish_after_probe.insert("finishing".into()));
    let reaper = w.reaper(rules(1));
    let r = reaper.tick_at(now_ms()).await;
    assert_eq!(
        (r.jobs_seen, r.flips_exit_code, r.flips_lost, r.errors),
        (1, 0, 1, 0),
        "{r:?}"
    );
    assert!(w.launcher.flips.lock().expect("lock").is_empty());
    assert!(
        w.stage.advanced.lock().expect("lock").is_empty(),
        "nothing advanced for a job the launcher finished itself"
    );
    assert_eq!(w.launcher.job("finishing").await.finished_by, "launcher");
}

async fn lease_reclaim_switch(storage: TestStorage) {
    let w = World::new(storage).await;
    let off = w.reaper(reaper::ReaperConfig {
        lease_reclaim_enabled: false,
        ..rules(3)
    });
    off.tick_at(now_ms()).await;
    assert!(w.gate.requests.lock().expect("lock").is_empty());
    let on = w.reaper(rules(3));
    // TickNow over the RPC trait: merge-gate is asked even with no running job (TTLs).
    let r = Reaper::tick_now(&on, Request::new(TickNowRequest {}))
        .await
        .expect("tick now")
        .into_inner();
    assert_eq!((r.jobs_seen, r.errors), (0, 0));
    assert_eq!(w.gate.requests.lock().expect("lock").len(), 1);
    // Merge-gate down: counted, and the jobs are still handled.
    *w.gate.down.lock().expect("lock") = true;
    w.launcher.insert(&NewJob::llm("z")).await;
    w.launcher.set("z", Liveness::Dead, None);
    let one = w.reaper(rules(1));
    let r = one.tick_at(now_ms() + I).await;
    assert_eq!((r.flips_dead_pid, r.errors), (1, 1), "{r:?}");
    assert!(r.error.contains("ReclaimStaleLeases"), "{r:?}");
}

on_both_backends!(
    dead_pid_streak,
    streak_resets_when_alive_again,
    restart_keeps_streaks_and_never_hastens,
    exit_code_known_but_still_running,
    advance_refusals_follow_the_one_retry_rule,
    backstop,
    a_bad_job_is_skipped,
    a_job_finished_after_the_probe_is_left_alone,
    lease_reclaim_switch,
);
