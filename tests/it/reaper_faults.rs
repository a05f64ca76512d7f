//! Faults with real processes: launchers run as `orchestrator serve launcher` (or the whole
//! `orchestrator up`) and die by a real SIGKILL, agents are real processes, the reaper is
//! the real one with its loop, and the other services are real too (see `world`).
//!
//! Which recovery is realistic depends on the shape of the deployment:
//! - **PostgreSQL, launcher replicas** (compose, Kubernetes): a replica dies with its pod,
//!   agents included. Nobody restarts it under the same instance id (a new pod has a new
//!   host name), so its jobs are the reaper's: the surviving replica answers
//!   `ProbeProcesses` with `INSTANCE_GONE` once the dead one's heartbeat is stale, the
//!   reaper flips (tier 1) or completes them through the gate (tier 2), and the survivor
//!   runs the next job.
//! - **SQLite, one launcher** (the all-in-one under systemd, `Restart=on-failure`): while it
//!   is down nothing answers for its jobs — the reaper is blind and flips nothing — and it
//!   comes back under the same instance id and work directory, where it reconciles its own
//!   jobs at once: an orphaned agent is killed and its job ends per its attempts, a run
//!   that had exited is finalized from what it left.
//!
//! A job that never ends is the reaper's backstop in either shape (tier 3), and the race
//! between the reaper's flip and the launcher's own finalize is in `race`.

mod race;
mod world;

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use orchestrator_forge::local::LocalForge;
use orchestrator_forge::{Forge, RepoName};
use orchestrator_kit::clients::Clients;
use orchestrator_kit::{Config, Env};
use orchestrator_proto::launcher::v1::{EnqueueRequest, Job, JobStatus, ListJobsRequest};
use orchestrator_proto::merge_gate::v1::AcquireLeaseRequest;
use orchestrator_proto::reaper::v1::SnapshotRequest;
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, GetWorkItemRequest, ListTransitionsRequest,
};
use orchestrator_testkit::{TestStorage, on_both_backends};

use crate::common::contracts_dir;
use crate::process::{orchestrator, read_addrs};
use world::{
    DEAD_TICKS, INSTANCE_STALE, INTERVAL, LOAD_MARGIN, World, agent_pgid, group_alive,
    sigkill_group,
};

/// An agent that runs until it is killed.
const SLEEPER: &str = "exec sleep 600\n";

const RUNNING: i32 = JobStatus::Running as i32;
const QUEUED: i32 = JobStatus::Queued as i32;
const SUCCEEDED: i32 = JobStatus::Succeeded as i32;
const FAILED: i32 = JobStatus::Failed as i32;

/// The longest a job of a SIGKILLed replica stays running: its instance is judged gone
/// once its heartbeat is `INSTANCE_STALE` old, then the reaper's usual bound.
fn freed_bound() -> Duration {
    INSTANCE_STALE + INTERVAL * (DEAD_TICKS + 1)
}

/// Two ticks and a half: long enough for the reaper to act on anything it would act on.
async fn a_few_ticks() {
    tokio::time::sleep(INTERVAL * 2 + Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_sigkilled_replica_s_job_is_freed_by_the_reaper_and_the_next_job_starts() {
    let Some(storage) = TestStorage::postgres(
        "reaper_faults::on_postgres_a_sigkilled_replica_s_job_is_freed_by_the_reaper_and_the_next_job_starts",
    )
    .await
    else {
        return;
    };
    let w = World::start(storage, &["acme/a", "acme/b", "acme/c", "acme/d"], SLEEPER).await;
    let no_git = [("ORCH_LAUNCHER_GIT", "false")];
    let mut a = w.launcher("replica-a", &no_git).await;
    w.service.route_to(&[&a]);
    // A deploy job: it holds its repo's merge lease while it runs.
    let job1 = w.enqueue("ORCH-1", "acme/a", "deployer", "deploy", 2).await;
    let job1 = w.wait_running(&job1.id).await;
    assert_eq!(job1.instance_id, "replica-a");
    w.wait_lease("acme/a", Some(&job1.id), Duration::from_secs(10))
        .await;
    // Another repo's job waits for the one LLM slot (ORCH_MAX_CONCURRENCY=1).
    let job2 = w.enqueue("ORCH-2", "acme/b", "deployer", "deploy", 2).await;
    // The survivor. Its fallback poll is a minute: only the freed slot's wake-up can start
    // the next job within this test's bounds.
    let poll = [
        ("ORCH_LAUNCHER_GIT", "false"),
        ("ORCH_LAUNCHER_POLL_MS", "60000"),
    ];
    let b = w.launcher("replica-b", &poll).await;
    w.service.route_to(&[&a, &b]);

    // Two leases taken by hand (holders the launcher does not know: only their TTL
    // judges them): one of a second, one of an hour.
    for (repo, holder, ttl_s) in [("acme/c", "ops-short", 1), ("acme/d", "ops-long", 3600)] {
        let taken = w
            .clients
            .merge_gate
            .clone()
            .acquire_lease(AcquireLeaseRequest {
                repo: repo.into(),
                holder_job_id: holder.into(),
                instance_id: "an-operator".into(),
                pid: 0,
                ttl_s,
            })
            .await
            .expect("lease")
            .into_inner();
        assert!(taken.acquired, "{taken:?}");
    }

    // Both replicas alive: the ticks flip nothing; the lease past its TTL goes, the fresh
    // ones (the live holder's, the hour-long one) stay.
    a_few_ticks().await;
    w.wait_lease("acme/c", None, Duration::from_secs(10)).await;
    assert_eq!(w.lease_holder("acme/d").await.as_deref(), Some("ops-long"));
    let s = w.snapshot().await;
    assert!(s.ticks >= 2, "{s:?}");
    assert_eq!(
        (
            s.flips_dead_pid,
            s.flips_exit_code,
            s.flips_backstop,
            s.leases_reclaimed
        ),
        (0, 0, 0, 1),
        "{s:?}"
    );
    assert_eq!(
        w.lease_holder("acme/a").await.as_deref(),
        Some(job1.id.as_str())
    );
    assert_eq!(w.job(&job2.id).await.expect("job2").status, QUEUED);

    // Replica A's pod dies: the launcher by SIGKILL, and its agent with it (a container or
    // a systemd unit takes the whole process tree down).
    a.sigkill();
    sigkill_group(agent_pgid(&job1));
    let killed = Instant::now();
    let freed = w
        .wait_job(&job1.id, freed_bound() + LOAD_MARGIN * 3, |j| {
            j.status != RUNNING
        })
        .await;
    let took = killed.elapsed();
    assert!(
        took <= freed_bound() + LOAD_MARGIN,
        "freed {took:?} after the SIGKILL; bound {:?}",
        freed_bound()
    );
    // Requeued per its attempts (1 failure of 2), after a backoff.
    assert_eq!(
        (
            freed.status,
            freed.attempt,
            freed.failures,
            freed.outcome.as_str()
        ),
        (QUEUED, 1, 1, "flipped"),
        "{freed:#?}"
    );
    assert!(
        freed
            .reason
            .contains("the launcher instance that ran it was gone"),
        "{}",
        freed.reason
    );
    // The next job, another repo's, starts on the survivor at once.
    let next = w.wait_running(&job2.id).await;
    assert_eq!(next.instance_id, "replica-b");
    // The dead holder's lease was reclaimed; the live one's stays through later ticks.
    w.wait_lease("acme/a", None, Duration::from_secs(10)).await;
    w.wait_lease("acme/b", Some(&job2.id), Duration::from_secs(10))
        .await;
    let before = w.snapshot().await;
    a_few_ticks().await;
    let after = w.snapshot().await;
    assert_eq!(
        w.lease_holder("acme/b").await.as_deref(),
        Some(job2.id.as_str())
    );
    assert!(after.ticks >= before.ticks + 2, "{after:?}");
    assert_eq!(
        (
            after.flips_dead_pid,
            after.flips_exit_code,
            after.flips_backstop
        ),
        (1, 0, 0),
        "{after:?}"
    );
    assert_eq!(before.leases_reclaimed, 2, "{before:?}");
    assert_eq!(after.leases_reclaimed, 2, "{after:?}");
    assert_eq!(w.lease_holder("acme/d").await.as_deref(), Some("ops-long"));
    assert_eq!(w.job(&job1.id).await.expect("job1").status, QUEUED);
    drop(b);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_sigkilled_launcher_frees_its_job_when_it_comes_back() {
    let w = World::start(TestStorage::sqlite(), &["acme/a", "acme/b"], SLEEPER).await;
    let no_git = [("ORCH_LAUNCHER_GIT", "false")];
    let mut launcher = w.launcher("launcher-1", &no_git).await;
    w.service.route_to(&[&launcher]);
    let job1 = w.enqueue("ORCH-1", "acme/a", "deployer", "deploy", 1).await;
    let job1 = w.wait_running(&job1.id).await;
    w.wait_lease("acme/a", Some(&job1.id), Duration::from_secs(10))
        .await;
    let job2 = w.enqueue("ORCH-2", "acme/b", "deployer", "deploy", 1).await;

    // Run bare (no unit, no container), the launcher dies alone: its agent runs on.
    launcher.sigkill();
    let agent = agent_pgid(&job1);
    let before = w.snapshot().await;
    a_few_ticks().await;
    let blind = w.snapshot().await;
    assert!(blind.errors >= before.errors + 2, "{blind:?}");
    assert!(blind.last_error.contains("launcher"), "{blind:?}");
    assert_eq!(
        (
            blind.flips_dead_pid,
            blind.flips_exit_code,
            blind.flips_backstop
        ),
        (0, 0, 0),
        "nothing is flipped while no launcher answers: {blind:?}"
    );
    assert!(group_alive(agent), "the orphaned agent still runs");

    // It comes back under the same instance id and work directory, as systemd restarts it.
    let launcher = w.launcher("launcher-1", &no_git).await;
    w.service.route_to(&[&launcher]);
    let restarted = Instant::now();
    let ended = w
        .wait_job(&job1.id, LOAD_MARGIN * 3, |j| j.status != RUNNING)
        .await;
    assert!(
        restarted.elapsed() <= LOAD_MARGIN,
        "reconciled {:?} after the restart",
        restarted.elapsed()
    );
    // Its reconciliation, not the reaper: the orphan is killed and the job fails per its
    // attempts (1 of 1).
    assert_eq!(
        (ended.status, ended.failures, ended.outcome.as_str()),
        (FAILED, 1, "orphaned"),
        "{ended:#?}"
    );
    assert!(!group_alive(agent), "the orphan was killed");
    let next = w.wait_running(&job2.id).await;
    assert_eq!(next.instance_id, "launcher-1");
    // The orphaned deploy's lease: its holder job has ended (the real launcher says so),
    // so the reaper's next tick has merge-gate reclaim it; the new holder keeps its own.
    w.wait_lease("acme/a", None, Duration::from_secs(10)).await;
    w.wait_lease("acme/b", Some(&job2.id), Duration::from_secs(10))
        .await;
    let s = w.snapshot().await;
    assert_eq!(
        (s.flips_dead_pid, s.flips_exit_code, s.flips_backstop),
        (0, 0, 0),
        "{s:?}"
    );
    assert!(s.leases_reclaimed >= 1, "{s:?}");
}

/// An analyst that waits for `{root}/go`, then writes its artifact and prints the real
/// CLI's result.
fn analyst_script() -> String {
    let sample =
        contracts_dir().join("claude-cli/real-2.1.328/success-with-write-tool.stdout.json");
    format!(
        r#"while [ ! -e {{root}}/go ]; do sleep 0.05; done
mkdir -p "$ORCH_ARTIFACTS_DIR"
printf -- '---\nwork_item: %s\n---\n# Analysis\nScripted.\n' "$ORCH_WORK_ITEM" > "$ORCH_ARTIFACTS_DIR/analysis.md"
cat {}
"#,
        sample.display()
    )
}

const KEY: &str = "ORCH-65";
const REPO: &str = "acme/app";

async fn create_work_item(w: &World) {
    w.clients
        .stage_engine
        .clone()
        .create_work_item(CreateWorkItemRequest {
            tracker_issue_id: KEY.into(),
            key: KEY.into(),
            title: "Wire up the merge webhook".into(),
            repo: REPO.into(),
            ..Default::default()
        })
        .await
        .expect("create the work item");
}

async fn jobs_of(w: &World) -> Vec<Job> {
    w.clients
        .launcher
        .clone()
        .list_jobs(ListJobsRequest {
            work_item: KEY.into(),
            ..Default::default()
        })
        .await
        .expect("list jobs")
        .into_inner()
        .jobs
}

/// The analyst job stage-engine enqueued, once it runs.
async fn running_analyst(w: &World) -> Job {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(j) = jobs_of(w).await.first() {
            return w.wait_running(&j.id).await;
        }
        assert!(Instant::now() < deadline, "the analyst was never enqueued");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

async fn wait_item_status(w: &World, status: &str, limit: Duration) {
    let deadline = Instant::now() + limit;
    loop {
        let item = w
            .clients
            .stage_engine
            .clone()
            .get_work_item(GetWorkItemRequest { key: KEY.into() })
            .await
            .expect("get")
            .into_inner();
        if item.status == status {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{KEY} is not {status} after {limit:?}: {item:#?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Lets the agent finish; the failpoint then kills its launcher right after the exit code
/// is recorded. Returns when the launcher died.
async fn die_between_exit_and_finalize(w: &World, launcher: &mut world::LauncherProc) -> Instant {
    std::fs::write(w.root().join("go"), "").expect("go");
    let status = tokio::task::block_in_place(|| launcher.wait_exit(Duration::from_secs(60)));
    let died = Instant::now();
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the failpoint kills with a real SIGKILL: {status}"
    );
    died
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_postgres_a_launcher_killed_between_exit_and_finalize_is_completed_through_the_gate() {
    let Some(storage) = TestStorage::postgres(
        "reaper_faults::on_postgres_a_launcher_killed_between_exit_and_finalize_is_completed_through_the_gate",
    )
    .await
    else {
        return;
    };
    let w = World::start(storage, &[REPO], &analyst_script()).await;
    let failpoint = [("ORCH_TEST_FAILPOINT", "launcher.before_finalize")];
    let mut a = w.launcher("replica-a", &failpoint).await;
    w.service.route_to(&[&a]);
    create_work_item(&w).await;
    let job = running_analyst(&w).await;
    assert_eq!(job.instance_id, "replica-a");
    let b = w.launcher("replica-b", &[]).await;
    w.service.route_to(&[&a, &b]);

    let died = die_between_exit_and_finalize(&w, &mut a).await;
    // The route may still pick the dead replica for a moment: the first answer counts.
    let left = w.wait_job(&job.id, LOAD_MARGIN, |_| true).await;
    assert_eq!(
        (left.status, left.exit_code),
        (RUNNING, Some(0)),
        "exit code known, still running: {left:#?}"
    );
    // Tier 2: the reaper advances it through stage-engine's gate, then flips it.
    let done = w
        .wait_job(&job.id, freed_bound() + LOAD_MARGIN * 3, |j| {
            j.status != RUNNING
        })
        .await;
    let took = died.elapsed();
    assert!(
        took <= freed_bound() + LOAD_MARGIN,
        "completed {took:?} after the launcher died; bound {:?}",
        freed_bound()
    );
    assert_eq!(
        (
            done.status,
            done.attempt,
            done.exit_code,
            done.outcome.as_str()
        ),
        (SUCCEEDED, 1, Some(0), "flipped"),
        "{done:#?}"
    );
    assert!(
        done.reason.contains("advanced through the quality gate"),
        "{}",
        done.reason
    );
    // The gate decided, not the exit code: the dead launcher never pushed the analysis, so
    // the stage is retried — on the survivor, which delivers it and reaches the human gate.
    wait_item_status(&w, "awaiting_approval", Duration::from_secs(60)).await;
    let transitions = w
        .clients
        .stage_engine
        .clone()
        .list_transitions(ListTransitionsRequest {
            work_item: KEY.into(),
        })
        .await
        .expect("transitions")
        .into_inner()
        .transitions;
    let finishes: Vec<_> = transitions
        .iter()
        .filter(|t| t.finished_agent == "analyst")
        .collect();
    assert_eq!(finishes.len(), 2, "{transitions:#?}");
    let failed_check = |t: &&orchestrator_proto::stage_engine::v1::Transition| {
        t.qg_results
            .iter()
            .any(|r| r.check == "check_analysis" && !r.passed)
    };
    assert!(failed_check(&finishes[0]), "{:#?}", finishes[0]);
    assert_eq!(finishes[0].to_stage, "analysis", "{:#?}", finishes[0]);
    assert!(!failed_check(&finishes[1]), "{:#?}", finishes[1]);
    let jobs = jobs_of(&w).await;
    assert_eq!(jobs.len(), 2, "{jobs:#?}");
    let rerun = jobs.iter().find(|j| j.id != job.id).expect("the rerun");
    assert_eq!(
        (rerun.status, rerun.instance_id.as_str()),
        (SUCCEEDED, "replica-b"),
        "{rerun:#?}"
    );
    let s = w.snapshot().await;
    assert_eq!(
        (s.flips_dead_pid, s.flips_exit_code, s.flips_backstop),
        (0, 1, 0),
        "{s:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_sqlite_a_launcher_killed_between_exit_and_finalize_finalizes_when_it_comes_back() {
    let w = World::start(TestStorage::sqlite(), &[REPO], &analyst_script()).await;
    let failpoint = [("ORCH_TEST_FAILPOINT", "launcher.before_finalize")];
    let mut launcher = w.launcher("launcher-1", &failpoint).await;
    w.service.route_to(&[&launcher]);
    create_work_item(&w).await;
    let job = running_analyst(&w).await;
    die_between_exit_and_finalize(&w, &mut launcher).await;

    // Back under the same instance id and work directory, without the failpoint: the
    // agent is gone, so the run is finalized from what it left (the recorded exit code,
    // the log, the checkout), delivered and advanced by the launcher itself.
    let launcher = w.launcher("launcher-1", &[]).await;
    w.service.route_to(&[&launcher]);
    let done = w
        .wait_job(&job.id, LOAD_MARGIN * 3, |j| j.status != RUNNING)
        .await;
    assert_eq!(
        (
            done.status,
            done.attempt,
            done.exit_code,
            done.outcome.as_str()
        ),
        (SUCCEEDED, 1, Some(0), "succeeded"),
        "{done:#?}"
    );
    wait_item_status(&w, "awaiting_approval", Duration::from_secs(30)).await;
    assert_eq!(jobs_of(&w).await.len(), 1, "no rerun was needed");
    let forge = LocalForge::new(w.root().join("forge"), "main".into());
    let analysis = forge
        .read_file(
            &RepoName::parse(REPO).expect("repo"),
            &format!("orch/{KEY}"),
            &format!("docs/work-items/{KEY}/analysis.md"),
        )
        .await
        .expect("read")
        .expect("the analysis was pushed by the restarted launcher");
    assert!(analysis.contains("Scripted."));
    let s = w.snapshot().await;
    assert_eq!(
        (s.flips_dead_pid, s.flips_exit_code, s.flips_backstop),
        (0, 0, 0),
        "{s:?}"
    );
}

/// `orchestrator up` as a child process on `storage`; returns it and clients of its parts.
async fn up(
    storage: &TestStorage,
    dir: &std::path::Path,
    extra: &[(&str, String)],
) -> (std::process::Child, Clients) {
    let mut cmd = orchestrator(dir);
    if let Some(url) = storage.apply(Env::default()).get("ORCH_DATABASE_URL") {
        cmd.env("ORCH_DATABASE_URL", url);
    }
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let mut child = cmd
        .arg("up")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(if std::env::var_os("TEST_LOG").is_some() {
            Stdio::inherit()
        } else {
            Stdio::null()
        })
        .spawn()
        .expect("spawn orchestrator up");
    let (child, addrs) = tokio::task::spawn_blocking(move || {
        let addrs = read_addrs(&mut child);
        (child, addrs)
    })
    .await
    .expect("ready");
    let url = |part: &str| format!("http://{}", addrs[part]);
    let config = Config::from_env(Env::from_pairs([
        ("ORCH_LAUNCHER_URL", url("launcher")),
        ("ORCH_REAPER_URL", url("reaper")),
    ]))
    .expect("config");
    (child, Clients::from_config(&config).expect("clients"))
}

async fn a_job_that_never_ends_is_killed_and_flipped_by_the_backstop(storage: TestStorage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("agents")).expect("agents");
    // The launcher starts only with a prompt for every role.
    for role in stage_engine::pipeline::ROLES {
        std::fs::write(root.join(format!("agents/{role}.md")), "You are it.\n").expect("prompt");
    }
    // Deaf to SIGTERM, with a child in its group: only SIGKILL to the group ends it.
    std::fs::write(root.join("agent.sh"), "trap '' TERM\nsleep 600 &\nwait\n").expect("script");
    let s = |p: std::path::PathBuf| p.display().to_string();
    let (mut child, clients) = up(
        &storage,
        root,
        &[
            (
                "ORCH_AGENT_COMMAND",
                format!("sh {}", s(root.join("agent.sh"))),
            ),
            ("ORCH_AGENTS_DIR", s(root.join("agents"))),
            ("ORCH_LAUNCHER_GIT", "false".into()),
            ("ORCH_QG_HOOK_ENABLED", "false".into()),
            // The agents record their pids under the test's root and must outlive a
            // SIGKILLed launcher, as bare processes do (see reaper_faults/world.rs).
            ("ORCH_AGENT_SANDBOX", "off".into()),
            ("ORCH_REAPER_INTERVAL_S", "1".into()),
            ("ORCH_REAPER_MAX_RUNNING_S", "2".into()),
            (
                "ORCH_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            ),
        ],
    )
    .await;
    let mut launcher = clients.launcher.clone();
    let job = launcher
        .enqueue(EnqueueRequest {
            work_item: "ORCH-7".into(),
            repo: "acme/app".into(),
            agent: "developer".into(),
            stage: "development".into(),
            payload_json: r#"{"branch":"orch/ORCH-7"}"#.into(),
            max_attempts: 1,
            ..EnqueueRequest::default()
        })
        .await
        .expect("enqueue")
        .into_inner()
        .job
        .expect("job");
    let get = |id: String| {
        let mut l = launcher.clone();
        async move {
            l.get_job(orchestrator_proto::launcher::v1::GetJobRequest { job_id: id })
                .await
                .expect("get")
                .into_inner()
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    let running = loop {
        let j = get(job.id.clone()).await;
        if j.status == RUNNING && j.pid.is_some() {
            break j;
        }
        assert!(Instant::now() < deadline, "never ran: {j:#?}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let pgid = agent_pgid(&running);
    let deadline = Instant::now() + Duration::from_secs(2) + INTERVAL * 2 + LOAD_MARGIN;
    let flipped = loop {
        let j = get(job.id.clone()).await;
        if j.status != RUNNING {
            break j;
        }
        if Instant::now() >= deadline {
            sigkill_group(pgid);
            panic!("the backstop never fired: {j:#?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let ran_ms = flipped.finished_at_ms - flipped.started_at_ms;
    assert!(
        ran_ms > 2000,
        "flipped after {ran_ms} ms, before the backstop"
    );
    assert_eq!(
        (flipped.status, flipped.exit_code, flipped.outcome.as_str()),
        (FAILED, Some(-9), "flipped"),
        "{flipped:#?}"
    );
    assert!(
        flipped.reason.contains("over ORCH_REAPER_MAX_RUNNING_S=2"),
        "{}",
        flipped.reason
    );
    // The launcher killed the whole group (SIGTERM ignored: SIGKILL after the grace).
    let deadline = Instant::now() + Duration::from_secs(5) + LOAD_MARGIN;
    while group_alive(pgid) {
        if Instant::now() >= deadline {
            sigkill_group(pgid);
            panic!("the agent's group outlived the backstop");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let s = clients
        .reaper
        .clone()
        .snapshot(SnapshotRequest {})
        .await
        .expect("snapshot")
        .into_inner();
    assert_eq!(
        (s.flips_dead_pid, s.flips_exit_code, s.flips_backstop),
        (0, 0, 1),
        "{s:?}"
    );
    let _ = child.kill();
    let _ = child.wait();
}

on_both_backends!(a_job_that_never_ends_is_killed_and_flipped_by_the_backstop);
