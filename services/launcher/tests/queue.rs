//! The queue on SQLite and PostgreSQL: enqueue (idempotent, validated), the concurrency
//! cap, the guarded flip (a wrong attempt changes nothing), cancel, process probes, and
//! exactly-once claims with several launcher instances on one PostgreSQL queue.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{H, KEY, REPO};
use launcher::proc::process_alive;
use launcher::store::Status;
use orchestrator_proto::launcher::v1::launcher_server::Launcher;
use orchestrator_proto::launcher::v1::{
    CancelJobRequest, EnqueueRequest, FlipTerminalRequest, GetJobRequest, JobStatus,
    ListInstancesRequest, ListJobsRequest, ListRunningRequest, Liveness, ProbeProcessesRequest,
};
use orchestrator_testkit::{TestStorage, on_both_backends};
use tonic::{Code, Request};

const SECS: Duration = Duration::from_secs(20);
const SUCCESS: &str = "cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json";

async fn enqueue_is_idempotent_and_validated(storage: TestStorage) {
    let h = H::start(storage, SUCCESS, &[("ORCH_LAUNCHER_GIT", "false")]).await;
    let req = EnqueueRequest {
        work_item: KEY.into(),
        repo: REPO.into(),
        agent: "developer".into(),
        stage: "development".into(),
        dedupe_key: "ORCH-1:t1:developer".into(),
        payload_json: r#"{"branch":"orch/ORCH-1"}"#.into(),
        ..EnqueueRequest::default()
    };
    let first = h
        .svc
        .enqueue(Request::new(req.clone()))
        .await
        .expect("first")
        .into_inner();
    let second = h
        .svc
        .enqueue(Request::new(req.clone()))
        .await
        .expect("second")
        .into_inner();
    assert!(first.created && !second.created);
    let (a, b) = (first.job.expect("job"), second.job.expect("job"));
    assert_eq!(a.id, b.id);
    assert_eq!(a.dedupe_key, "ORCH-1:t1:developer");
    assert_eq!(a.max_attempts, 3);
    for (mutate, field) in [
        (
            Box::new(|r: &mut EnqueueRequest| r.work_item.clear())
                as Box<dyn Fn(&mut EnqueueRequest)>,
            "work_item is required",
        ),
        (
            Box::new(|r: &mut EnqueueRequest| r.work_item = "../x".into()),
            "work_item:",
        ),
        (
            Box::new(|r: &mut EnqueueRequest| r.repo = "-acme/app".into()),
            "repo:",
        ),
        (
            Box::new(|r: &mut EnqueueRequest| r.agent = "../../etc/passwd".into()),
            "agent:",
        ),
        (
            Box::new(|r: &mut EnqueueRequest| {
                r.agent = "deploy-finalizer".into();
                r.kind = 1;
            }),
            "kind:",
        ),
        (Box::new(|r: &mut EnqueueRequest| r.kind = 2), "agent:"),
        (
            Box::new(|r: &mut EnqueueRequest| r.payload_json = "[1]".into()),
            "payload_json:",
        ),
    ] {
        let mut r = req.clone();
        r.dedupe_key.clear();
        mutate(&mut r);
        let err = h.svc.enqueue(Request::new(r)).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert!(
            err.message().starts_with(field),
            "{field}: {}",
            err.message()
        );
    }
    let err = h
        .svc
        .get_job(Request::new(GetJobRequest {
            job_id: "nope".into(),
        }))
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let done = h.wait_done(&a.id, SECS).await;
    assert_eq!(done.status, Status::Succeeded);
    let listed = h
        .svc
        .list_jobs(Request::new(ListJobsRequest {
            status: JobStatus::Succeeded as i32,
            work_item: KEY.into(),
            ..Default::default()
        }))
        .await
        .expect("list")
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);
    let instances = h
        .svc
        .list_instances(Request::new(ListInstancesRequest {}))
        .await
        .expect("instances")
        .into_inner()
        .instances;
    assert_eq!(instances.len(), 1);
    assert_eq!(instances[0].id, "test-instance");
    assert!(instances[0].heartbeat_at_ms > 0);
}

async fn llm_jobs_are_capped_and_run_oldest_first(storage: TestStorage) {
    let script = r#"echo "$ORCH_JOB_ID start $(date +%s%N)" >> {root}/order
sleep 0.3
echo "$ORCH_JOB_ID end $(date +%s%N)" >> {root}/order
cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json"#;
    let h = H::start(
        storage,
        script,
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_MAX_CONCURRENCY", "2"),
        ],
    )
    .await;
    let mut ids = Vec::new();
    for i in 1..=5 {
        ids.push(
            h.enqueue_for(&format!("ORCH-{i}"), "developer", "development", "")
                .await
                .id,
        );
    }
    let deadline = Instant::now() + SECS;
    let mut max_seen = 0;
    loop {
        let s = h.snapshot().await;
        max_seen = max_seen.max(s.llm_running);
        assert!(s.llm_running <= 2, "{} LLM jobs ran at once", s.llm_running);
        let done = s
            .counts
            .iter()
            .find(|c| c.status == JobStatus::Succeeded as i32)
            .map_or(0, |c| c.count);
        if done == 5 {
            break;
        }
        assert!(Instant::now() < deadline, "not all done: {s:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(max_seen, 2);
    // Claimed oldest first: claim times never go down in enqueue order (the agents' own
    // first lines may swap under load, the claims may not).
    let mut claimed = Vec::new();
    for id in &ids {
        claimed.push(h.job(id).await.started_at_ms);
    }
    assert!(claimed.windows(2).all(|w| w[0] <= w[1]), "{claimed:?}");
    let order = std::fs::read_to_string(h.root.join("order")).expect("order");
    assert_eq!(order.lines().filter(|l| l.contains(" start ")).count(), 5);
}

async fn a_flip_with_the_wrong_attempt_changes_nothing(storage: TestStorage) {
    let h = H::start(
        storage,
        "echo $$ > {root}/pid; sleep 300",
        &[("ORCH_LAUNCHER_GIT", "false"), ("ORCH_MAX_ATTEMPTS", "1")],
    )
    .await;
    let job = h.enqueue("developer", "development", "").await;
    let running = h.wait_for(&job.id, SECS, |j| j.pid.is_some()).await;
    let pid = i32::try_from(running.pid.expect("pid")).expect("pid");
    let flip = |attempt: u32, kill: bool| FlipTerminalRequest {
        job_id: job.id.clone(),
        attempt,
        outcome: JobStatus::Failed as i32,
        reason: "dead-pid streak".into(),
        exit_code: Some(-9),
        kill_process_group: kill,
    };
    // A late writer from another attempt: nothing changes, the process lives on.
    for attempt in [
        running.attempt + 1,
        running.attempt.saturating_sub(1).max(7),
    ] {
        let r = h
            .svc
            .flip_terminal(Request::new(flip(attempt, true)))
            .await
            .expect("flip")
            .into_inner();
        assert!(!r.flipped);
        let j = h.job(&job.id).await;
        assert_eq!(
            (j.status, j.attempt, j.exit_code),
            (Status::Running, running.attempt, None)
        );
    }
    assert!(process_alive(pid));
    // Probes: our own live run.
    let probes = h
        .svc
        .probe_processes(Request::new(ProbeProcessesRequest::default()))
        .await
        .expect("probe")
        .into_inner()
        .probes;
    assert_eq!(probes.len(), 1);
    assert_eq!(probes[0].liveness, Liveness::Alive as i32);
    assert_eq!(probes[0].pid, Some(i64::from(pid)));
    let listed = h
        .svc
        .list_running(Request::new(ListRunningRequest {}))
        .await
        .expect("running")
        .into_inner()
        .jobs;
    assert_eq!(listed.len(), 1);
    // The store's own fence: a write for another attempt changes no row.
    let late = launcher::store::Settle {
        status: Status::Succeeded,
        not_before_ms: 0,
        failures: 0,
        transient_attempts: 0,
        outcome: "late".into(),
        reason: "a late writer".into(),
        exit_code: Some(0),
        qg_hook_blocks: None,
        now_ms: orchestrator_kit::time::now_ms(),
    };
    let written = launcher::store::settle(&h.db, &job.id, running.attempt + 1, &late)
        .await
        .expect("settle");
    assert!(written.is_none());
    assert_eq!(h.job(&job.id).await.status, Status::Running);
    // The right attempt flips exactly once, however many race for it, and kills the group.
    let svc = Arc::new(h.svc.clone());
    let racers: Vec<_> = (0..8)
        .map(|_| {
            let svc = svc.clone();
            let req = flip(running.attempt, true);
            tokio::spawn(async move {
                svc.flip_terminal(Request::new(req))
                    .await
                    .expect("flip")
                    .into_inner()
            })
        })
        .collect();
    let mut winners = Vec::new();
    for r in racers {
        let r = r.await.expect("racer");
        if r.flipped {
            winners.push(r);
        }
    }
    assert_eq!(winners.len(), 1, "exactly one flip wins");
    let j = winners.remove(0).job.expect("job");
    assert_eq!(j.status, JobStatus::Failed as i32);
    assert_eq!(j.exit_code, Some(-9));
    let again = h
        .svc
        .flip_terminal(Request::new(flip(running.attempt, true)))
        .await
        .expect("flip")
        .into_inner();
    assert!(!again.flipped);
    common::eventually(SECS, "the flipped run's process was killed", || {
        !process_alive(pid)
    })
    .await;
    let err = h
        .svc
        .flip_terminal(Request::new(FlipTerminalRequest {
            outcome: JobStatus::Running as i32,
            ..flip(running.attempt, false)
        }))
        .await
        .expect_err("bad outcome");
    assert_eq!(err.code(), Code::InvalidArgument);
}

async fn cancel_kills_a_running_job_and_drops_a_queued_one(storage: TestStorage) {
    let h = H::start(
        storage,
        "echo $$ > {root}/pid; sleep 300",
        &[("ORCH_LAUNCHER_GIT", "false")],
    )
    .await;
    let running = h
        .enqueue_for("ORCH-1", "developer", "development", "")
        .await;
    let queued = h
        .enqueue_for("ORCH-2", "developer", "development", "")
        .await;
    let r = h.wait_for(&running.id, SECS, |j| j.pid.is_some()).await;
    let pid = i32::try_from(r.pid.expect("pid")).expect("pid");
    for (id, status) in [
        (&queued.id, JobStatus::Cancelled),
        (&running.id, JobStatus::Cancelled),
    ] {
        let c = h
            .svc
            .cancel_job(Request::new(CancelJobRequest {
                job_id: id.clone(),
                reason: "by ada".into(),
            }))
            .await
            .expect("cancel")
            .into_inner();
        assert!(c.cancelled);
        assert_eq!(c.job.expect("job").status, status as i32);
    }
    common::eventually(SECS, "the cancelled run's process was killed", || {
        !process_alive(pid)
    })
    .await;
    let j = h.job(&running.id).await;
    assert_eq!((j.status, j.reason.as_str()), (Status::Cancelled, "by ada"));
    // Cancelling a finished job changes nothing.
    let c = h
        .svc
        .cancel_job(Request::new(CancelJobRequest {
            job_id: running.id.clone(),
            reason: String::new(),
        }))
        .await
        .expect("cancel")
        .into_inner();
    assert!(!c.cancelled);
}

/// A run of another instance (a dead replica's, say) flipped failed here frees the LLM
/// slot: the next queued job starts at once, not at the next fallback poll.
async fn a_slot_freed_by_a_flip_starts_the_next_job_at_once(storage: TestStorage) {
    let h = H::start(
        storage,
        "sleep 300",
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_LAUNCHER_POLL_MS", "120000"),
        ],
    )
    .await;
    // A job of replica "gone": due only in an hour, so that this instance's dispatcher
    // leaves it alone, and claimed by "gone" as of then.
    let later = orchestrator_kit::time::now_ms() + 3_600_000;
    let (gone, _) = launcher::store::enqueue(
        &h.db,
        &launcher::store::NewJob {
            id: launcher::new_job_id(),
            work_item: "ORCH-1".into(),
            repo: REPO.into(),
            agent: "developer".into(),
            stage: "development".into(),
            kind: launcher::store::Kind::Llm,
            payload_json: "{}".into(),
            dedupe_key: None,
            max_attempts: 1,
            not_before_ms: later,
            now_ms: later,
        },
    )
    .await
    .expect("enqueue");
    let filter = launcher::store::ClaimFilter {
        llm: true,
        reserved: false,
        max_concurrency: 1,
    };
    let claimed = launcher::store::claim(&h.db, "gone", later, filter)
        .await
        .expect("claim")
        .expect("claimed by gone");
    assert_eq!(claimed.id, gone.id);
    let next = h
        .enqueue_for("ORCH-2", "developer", "development", "")
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        h.job(&next.id).await.status,
        Status::Queued,
        "the slot is taken"
    );
    let r = h
        .svc
        .flip_terminal(Request::new(FlipTerminalRequest {
            job_id: gone.id.clone(),
            attempt: claimed.attempt,
            outcome: JobStatus::Failed as i32,
            reason: "reaper: its launcher instance was gone".into(),
            exit_code: None,
            kill_process_group: false,
        }))
        .await
        .expect("flip")
        .into_inner();
    assert!(r.flipped);
    let started = h
        .wait_for(&next.id, SECS, |j| j.status == Status::Running)
        .await;
    assert_eq!(started.instance_id, "test-instance");
}

on_both_backends!(
    enqueue_is_idempotent_and_validated,
    llm_jobs_are_capped_and_run_oldest_first,
    a_flip_with_the_wrong_attempt_changes_nothing,
    cancel_kills_a_running_job_and_drops_a_queued_one,
    a_slot_freed_by_a_flip_starts_the_next_job_at_once,
);

/// Several launcher instances share one PostgreSQL queue; thousands of no-op jobs (LLM and
/// reserved); every job runs exactly once (a per-job counter written by the agent itself), and the global
/// LLM cap holds across the instances.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn several_instances_on_one_postgres_queue_run_each_job_exactly_once() {
    // Per kind: 1,000 LLM jobs (a process each) and 1,000 reserved jobs.
    const JOBS: usize = 1_000;
    const INSTANCES: usize = 3;
    let Some(storage) = TestStorage::postgres("queue::exactly_once").await else {
        return;
    };
    let storage = Arc::new(storage);
    let script = r#"echo "$ORCH_LAUNCHER_SEEN" >> {root}/counts/$ORCH_JOB_ID
echo '{"type":"result","subtype":"success","is_error":false,"result":"ok"}'"#;
    let mut launchers = Vec::new();
    for i in 0..INSTANCES {
        let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
        std::fs::create_dir_all(dir.path().join("counts")).expect("counts");
        let h = H::start_on(
            storage.clone(),
            dir,
            &format!("replica-{i}"),
            &script.replace("$ORCH_LAUNCHER_SEEN", &format!("replica-{i}")),
            &[
                ("ORCH_LAUNCHER_GIT", "false"),
                ("ORCH_MAX_CONCURRENCY", "6"),
                ("ORCH_LAUNCHER_POLL_MS", "50"),
            ],
        )
        .await;
        launchers.push(h);
    }
    // Enqueued through every instance, 16 at a time; an instance also learns of the
    // others' jobs by polling.
    let t0 = Instant::now();
    let launchers = Arc::new(launchers);
    let mut tasks = Vec::new();
    for t in 0..16 {
        let launchers = launchers.clone();
        tasks.push(tokio::spawn(async move {
            let mut ids = Vec::new();
            for i in (t..JOBS).step_by(16) {
                ids.push(
                    launchers[i % INSTANCES]
                        .enqueue_for(&format!("ORCH-{}", i + 1), "noop", "development", "")
                        .await
                        .id,
                );
                // And as many reserved jobs, claimed in batches.
                launchers[(i + 1) % INSTANCES]
                    .enqueue_for(&format!("RES-{}", i + 1), "post-deploy-monitor", "done", "")
                    .await;
            }
            ids
        }));
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut max_llm = 0;
    let mut ids = Vec::with_capacity(JOBS);
    loop {
        let s = launchers[0].snapshot().await;
        max_llm = max_llm.max(s.llm_running);
        assert!(
            s.llm_running <= 6,
            "the global cap was exceeded: {}",
            s.llm_running
        );
        if tasks.iter().all(|t| t.is_finished()) {
            for t in tasks.drain(..) {
                ids.extend(t.await.expect("enqueuer"));
            }
        }
        let done = s
            .counts
            .iter()
            .find(|c| c.status == JobStatus::Succeeded as i32)
            .map_or(0, |c| c.count);
        if done as usize == 2 * JOBS && ids.len() == JOBS {
            break;
        }
        let failed = s
            .counts
            .iter()
            .find(|c| c.status == JobStatus::Failed as i32)
            .map_or(0, |c| c.count);
        assert_eq!(failed, 0, "{s:?}");
        assert!(Instant::now() < deadline, "not all done: {:?}", s.counts);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        max_llm > 1,
        "the instances ran jobs side by side: {max_llm}"
    );
    let took = t0.elapsed();
    let mut runs_per_job: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for h in launchers.iter() {
        for entry in std::fs::read_dir(h.root.join("counts"))
            .expect("counts")
            .flatten()
        {
            let text = std::fs::read_to_string(entry.path()).expect("count");
            runs_per_job
                .entry(entry.file_name().to_string_lossy().into_owned())
                .or_default()
                .extend(text.lines().map(str::to_owned));
        }
    }
    assert_eq!(runs_per_job.len(), JOBS);
    for id in &ids {
        let runs = &runs_per_job[id];
        assert_eq!(runs.len(), 1, "job {id} ran {runs:?}");
    }
    let per_instance: BTreeMap<&str, usize> =
        runs_per_job.values().fold(BTreeMap::new(), |mut m, r| {
            *m.entry(r[0].as_str()).or_default() += 1;
            m
        });
    assert_eq!(
        per_instance.len(),
        INSTANCES,
        "every replica took jobs: {per_instance:?}"
    );
    // Every reserved job ticked exactly once, across the replicas.
    let mut ticked: Vec<String> = launchers
        .iter()
        .flat_map(|h| h.peers.with(|s| s.ticked.clone()))
        .collect();
    ticked.sort();
    let before = ticked.len();
    ticked.dedup();
    assert_eq!(
        (before, ticked.len()),
        (JOBS, JOBS),
        "reserved jobs ran more than once"
    );
    eprintln!(
        "exactly-once: {JOBS} jobs on {INSTANCES} instances in {:.1}s, per instance {per_instance:?}, max LLM running {max_llm}",
        took.as_secs_f64()
    );
}
