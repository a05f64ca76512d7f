//! The loop itself: started with the service, ticking every interval, freeing a real
//! process's job after it is SIGKILLed within interval × (dead_ticks + 1), and stopping
//! with the shutdown token.

use std::process::{Child, Command};
use std::time::{Duration, Instant};

use orchestrator_kit::Env;
use orchestrator_proto::reaper::v1::reaper_server::Reaper;
use orchestrator_proto::reaper::v1::{SnapshotRequest, TickNowRequest};
use orchestrator_testkit::{TestStorage, on_both_backends};
use reaper::ReaperConfig;
use tokio_util::sync::CancellationToken;
use tonic::Request;

use crate::world::{NewJob, World};

struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn a_sigkilled_agent_is_freed_within_the_bound(storage: TestStorage) {
    let w = World::new(storage).await;
    // The test settings: ORCH_REAPER_INTERVAL_S=1, ORCH_REAPER_DEAD_TICKS=2.
    let config = ReaperConfig::from_env(&Env::from_pairs([
        ("ORCH_REAPER_INTERVAL_S", "1"),
        ("ORCH_REAPER_DEAD_TICKS", "2"),
    ]))
    .expect("config");
    let bound = config.zombie_to_freed_bound();
    assert_eq!(bound, Duration::from_secs(3));
    let mut agent = Agent(Command::new("sleep").arg("600").spawn().expect("spawn"));
    let mut job = NewJob::llm("agent-1");
    job.pid = i64::from(agent.0.id());
    w.launcher.insert(&job).await;
    let reaper = w.reaper(config);
    let shutdown = CancellationToken::new();
    let handle = reaper
        .spawn_loop(shutdown.clone())
        .expect("the loop runs when enabled");

    // Alive: the loop ticks and leaves it alone.
    let deadline = Instant::now() + Duration::from_secs(10);
    while reaper.snapshot().await.expect("snapshot").ticks < 2 {
        assert!(Instant::now() < deadline, "the loop does not tick");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(w.launcher.job("agent-1").await.status, "running");

    agent.0.kill().expect("SIGKILL");
    agent.0.wait().expect("reap");
    let killed = Instant::now();
    while w.launcher.job("agent-1").await.status == "running" {
        assert!(
            killed.elapsed() < bound * 3,
            "not freed after {:?}",
            killed.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let freed = killed.elapsed();
    assert!(
        freed <= bound + Duration::from_millis(500),
        "freed after {freed:?}, bound {bound:?}"
    );
    // The tick records its totals once every job is handled.
    while reaper.snapshot().await.expect("snapshot").flips_dead_pid != 1 {
        assert!(killed.elapsed() < bound * 3, "the flip is not counted");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // The loop stops with the token.
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(5), handle)
        .await
        .expect("the loop stops on shutdown")
        .expect("the loop did not panic");
}

async fn disabled_means_no_loop_but_tick_now_works(storage: TestStorage) {
    let w = World::new(storage).await;
    let reaper = w.reaper(
        ReaperConfig::from_env(&Env::from_pairs([("ORCH_REAPER_ENABLED", "false")]))
            .expect("config"),
    );
    assert!(reaper.spawn_loop(CancellationToken::new()).is_none());
    let s = Reaper::snapshot(&reaper, Request::new(SnapshotRequest {}))
        .await
        .expect("snapshot")
        .into_inner();
    assert!(!s.enabled);
    assert_eq!(s.ticks, 0);
    let r = Reaper::tick_now(&reaper, Request::new(TickNowRequest {}))
        .await
        .expect("tick now")
        .into_inner();
    assert_eq!(r.errors, 0);
    let s = reaper.snapshot().await.expect("snapshot");
    assert_eq!(s.ticks, 1);
    assert!(s.last_tick_at_ms > 0);
}

on_both_backends!(
    a_sigkilled_agent_is_freed_within_the_bound,
    disabled_means_no_loop_but_tick_now_works
);
