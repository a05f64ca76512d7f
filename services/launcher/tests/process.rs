//! Agent processes: the spawn and its pid stamp, the success path into a real bare repo,
//! the watchdog's kill sequence, TailLog on a live run, bad input, restart reconciliation.

mod common;

use std::time::{Duration, Instant};

use common::{H, KEY, REPO, WRITE_ARTIFACT, eventually, is};
use launcher::proc::process_alive;
use launcher::store::{self, ClaimFilter, Status};
use orchestrator_forge::{Forge, RepoName};
use orchestrator_proto::launcher::v1::TailLogRequest;
use orchestrator_proto::launcher::v1::launcher_server::Launcher;
use orchestrator_testkit::TestStorage;
use tokio_stream::StreamExt;

const SECS: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_is_spawned_stamped_and_delivered() {
    let script = format!(
        r#"echo $$ > {{root}}/agent.pid
read -r first_line
echo "prompt: $first_line"
echo "job $ORCH_JOB_ID attempt $ORCH_JOB_ATTEMPT agent $ORCH_AGENT on $ORCH_BRANCH"
env | sort > {{root}}/agent.env
{WRITE_ARTIFACT}
sleep 0.3
cat {{contracts}}/real-2.1.328/success-with-write-tool.stdout.json"#
    );
    let h = H::start(
        TestStorage::sqlite(),
        &script,
        &[
            ("ORCH_INTERNAL_TOKEN", "secret-internal"),
            ("PLANE_API_TOKEN", "secret-plane"),
        ],
    )
    .await;
    let job = h
        .enqueue(
            "developer",
            "development",
            r#"{"title":"Add a thing","artifacts_dir":"docs/work-items/ORCH-1"}"#,
        )
        .await;
    let running = h
        .wait_for(&job.id, SECS, |j| {
            j.status == Status::Running && j.pid.is_some()
        })
        .await;
    // The pid is stamped right after the spawn: it is the script's own.
    let pid_file = h.root.join("agent.pid");
    eventually(SECS, "the script wrote its pid", || pid_file.exists()).await;
    let script_pid: i64 = std::fs::read_to_string(&pid_file)
        .expect("pid")
        .trim()
        .parse()
        .expect("number");
    assert_eq!(running.pid, Some(script_pid));
    assert_eq!(running.instance_id, "test-instance");
    assert_eq!(running.attempt, 1);
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Succeeded, "{done:#?}");
    assert_eq!(done.exit_code, Some(0));
    let log = h.log(&done);
    assert!(log.contains("prompt: You are the developer."), "{log}");
    assert!(
        log.contains(&format!(
            "job {} attempt 1 agent developer on orch/{KEY}",
            job.id
        )),
        "{log}"
    );
    // A scrubbed environment: no orchestrator or tracker token reached the agent.
    let env = std::fs::read_to_string(h.root.join("agent.env")).expect("env");
    assert!(
        !env.contains("secret-internal") && !env.contains("secret-plane"),
        "{env}"
    );
    assert!(env.contains("PATH="), "{env}");

    // Committed and pushed to the bare repository, with a PR.
    let repo = RepoName::parse(REPO).expect("repo");
    let text = h
        .forge
        .read_file(
            &repo,
            &format!("orch/{KEY}"),
            &format!("docs/work-items/{KEY}/development.md"),
        )
        .await
        .expect("read")
        .expect("the artifact is on the branch");
    assert!(text.contains("work_item: ORCH-1"));
    let pr = h
        .forge
        .find_pr(&repo, &format!("orch/{KEY}"), "main")
        .await
        .expect("pr")
        .expect("a PR");
    // Usage recorded, finish comment under the agent's bot, then AdvanceStage.
    h.outbox_drained().await;
    h.peers.with(|s| {
        assert_eq!(s.record_runs.len(), 1);
        assert!(
            s.record_runs[0]
                .output
                .contains("\"total_cost_usd\":0.017439999999999997")
        );
        let finish = s
            .comments
            .iter()
            .find(|c| c.idempotency_key.ends_with(":finish"))
            .expect("finish comment");
        assert_eq!(finish.author, "developer");
        assert!(
            finish.html.contains(&format!("#{}", pr.number)),
            "{}",
            finish.html
        );
        assert!(finish.html.contains("development.md"), "{}", finish.html);
        assert_eq!(s.advances.len(), 1);
        assert_eq!(s.advances[0].finished_agent, "developer");
        assert_eq!(s.advances[0].job_id, job.id);
        assert_eq!(s.advances[0].attempt, 1);
        // What the run delivered, for stage-engine to pin what follows to.
        assert_eq!(s.advances[0].pr_number, pr.number);
        assert_eq!(s.advances[0].head_sha, pr.head_sha);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_agent_that_ignores_sigterm_is_killed_with_its_children() {
    let script = r#"trap '' TERM
sh -c 'trap "" TERM; echo $$ > {root}/child.pid; exec sleep 300' &
echo $$ > {root}/leader.pid
echo started
sleep 300"#;
    let h = H::start(
        TestStorage::sqlite(),
        script,
        &[
            ("ORCH_AGENT_TIMEOUT_SECONDS", "0.5"),
            ("ORCH_AGENT_KILL_GRACE_SECONDS", "1"),
            ("ORCH_MAX_ATTEMPTS", "1"),
        ],
    )
    .await;
    let job = h.enqueue("developer", "development", "").await;
    h.wait_for(&job.id, SECS, is(Status::Running)).await;
    // The background child can write its pid before the leader writes its own.
    let written = |f: &str| {
        std::fs::read_to_string(h.root.join(f)).is_ok_and(|t| t.trim().parse::<i32>().is_ok())
    };
    eventually(SECS, "the leader and the child started", || {
        written("child.pid") && written("leader.pid")
    })
    .await;
    let read_pid = |f: &str| -> i32 {
        std::fs::read_to_string(h.root.join(f))
            .expect("pid")
            .trim()
            .parse()
            .expect("pid")
    };
    let (leader, child) = (read_pid("leader.pid"), read_pid("child.pid"));
    assert!(process_alive(leader) && process_alive(child));
    let t0 = Instant::now();
    let done = h.wait_done(&job.id, SECS).await;
    let took = t0.elapsed();
    assert_eq!(done.status, Status::Failed);
    assert_eq!(done.outcome, "timeout");
    assert_eq!(done.exit_code, Some(-9));
    assert!(
        done.reason.starts_with("timed out after 0.5s"),
        "{}",
        done.reason
    );
    // SIGTERM was ignored: SIGKILL came only after the grace (1 s), and took the child too.
    assert!(took >= Duration::from_millis(900), "{took:?}");
    assert!(!process_alive(leader), "the leader survived");
    eventually(
        Duration::from_secs(2),
        "the child died with the group",
        || !process_alive(child),
    )
    .await;
    let log = h.log(&done);
    assert!(
        log.contains("started") && log.contains("timed out after 0.5s"),
        "{log}"
    );
    // A timeout is permanent: its failure is on the tracker.
    h.outbox_drained().await;
    h.peers.with(|s| {
        assert!(
            s.comments
                .iter()
                .any(|c| c.html.contains("failed") && c.html.contains("timed out"))
        );
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_that_obeys_sigterm_is_not_sigkilled() {
    let script = r#"trap 'echo got TERM; exit 143' TERM
sleep 300 &
wait"#;
    let h = H::start(
        TestStorage::sqlite(),
        script,
        &[
            ("ORCH_AGENT_TIMEOUT_SECONDS", "0.3"),
            ("ORCH_AGENT_KILL_GRACE_SECONDS", "10"),
            ("ORCH_MAX_ATTEMPTS", "1"),
        ],
    )
    .await;
    let job = h.enqueue("developer", "development", "").await;
    let t0 = Instant::now();
    let done = h.wait_done(&job.id, SECS).await;
    // Far less than the 10 s grace: it went at SIGTERM.
    assert!(t0.elapsed() < Duration::from_secs(5), "{:?}", t0.elapsed());
    assert_eq!(done.outcome, "timeout");
    assert!(h.log(&done).contains("got TERM"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_log_streams_a_live_run_until_it_ends() {
    let script = r#"echo line-1
sleep 0.4
echo line-2
sleep 0.4
cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json"#;
    let h = H::start(
        TestStorage::sqlite(),
        script,
        &[("ORCH_LAUNCHER_GIT", "false")],
    )
    .await;
    let job = h.enqueue("noop", "development", "").await;
    let running = h
        .wait_for(&job.id, SECS, |j| {
            j.status == Status::Running && !j.log_path.is_empty()
        })
        .await;
    let mut stream = h
        .svc
        .tail_log(tonic::Request::new(TailLogRequest {
            job_id: running.id.clone(),
            follow: true,
        }))
        .await
        .expect("tail")
        .into_inner();
    let mut text = String::new();
    let mut saw_line1_while_running = false;
    let mut last_eof = false;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.expect("chunk");
        text.push_str(&String::from_utf8_lossy(&chunk.data));
        if text.contains("line-1") && !text.contains("line-2") {
            saw_line1_while_running = h.job(&job.id).await.status == Status::Running;
        }
        last_eof = chunk.eof;
    }
    assert!(
        saw_line1_while_running,
        "the first line arrived while the job ran: {text}"
    );
    assert!(last_eof, "the last chunk says eof");
    assert!(
        text.contains("line-2") && text.contains("Analysis written."),
        "{text}"
    );
    assert!(text.contains("== exit 0"), "{text}");
    let done = h.job(&job.id).await;
    assert_eq!(done.status, Status::Succeeded);

    // Without follow, a finished job's whole log and eof.
    let chunks: Vec<_> = h
        .svc
        .tail_log(tonic::Request::new(TailLogRequest {
            job_id: job.id.clone(),
            follow: false,
        }))
        .await
        .expect("tail")
        .into_inner()
        .collect()
        .await;
    let all: Vec<u8> = chunks
        .iter()
        .flat_map(|c| c.as_ref().expect("chunk").data.clone())
        .collect();
    assert_eq!(String::from_utf8_lossy(&all), h.log(&done));
    assert!(chunks.last().expect("last").as_ref().expect("chunk").eof);
    // A job that never ran has no log yet.
    let queued = h
        .svc
        .enqueue_job(orchestrator_proto::launcher::v1::EnqueueRequest {
            work_item: KEY.into(),
            repo: REPO.into(),
            agent: "noop".into(),
            not_before_ms: orchestrator_kit::time::now_ms() + 3_600_000,
            ..Default::default()
        })
        .await
        .expect("enqueue")
        .0;
    let err = h
        .svc
        .tail_log(tonic::Request::new(TailLogRequest {
            job_id: queued.id,
            follow: true,
        }))
        .await
        .err()
        .expect("no log yet");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_fails_the_job_with_its_reason_and_the_queue_goes_on() {
    let script = r#"case "$ORCH_AGENT" in
  tester) echo 'garbage {not json' ;;
  *) cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json ;;
esac"#;
    let h = H::start(TestStorage::sqlite(), script, &[("ORCH_MAX_ATTEMPTS", "1")]).await;
    std::fs::remove_file(h.root.join("agents/reviewer.md")).expect("rm prompt");
    let cases = [
        ("reviewer", "{}", "missing prompt file"),
        ("developer", r#"{"branch":"-delete"}"#, "starts with '-'"),
        ("developer", r#"{"branch":"orch/../x"}"#, "holds '..'"),
        ("tester", "{}", "no result (exit 0)"),
    ];
    let mut jobs = Vec::new();
    for (agent, payload, _) in cases {
        jobs.push(h.enqueue(agent, "development", payload).await);
    }
    // A repository that cannot be fetched.
    let missing = h
        .svc
        .enqueue_job(orchestrator_proto::launcher::v1::EnqueueRequest {
            work_item: KEY.into(),
            repo: "acme/missing".into(),
            agent: "developer".into(),
            ..Default::default()
        })
        .await
        .expect("enqueue")
        .0;
    let good = h.enqueue("developer", "development", "").await;
    for (job, (_, _, reason)) in jobs.iter().zip(cases) {
        let done = h.wait_done(&job.id, SECS).await;
        assert_eq!(done.status, Status::Failed, "{done:#?}");
        assert!(done.reason.contains(reason), "{reason}: {}", done.reason);
    }
    let done = h.wait_done(&missing.id, SECS).await;
    assert_eq!(done.status, Status::Failed);
    assert_eq!(done.outcome, "checkout_failed");
    assert!(done.reason.contains("acme/missing"), "{}", done.reason);
    // The queue went on.
    assert_eq!(h.wait_done(&good.id, SECS).await.status, Status::Succeeded);
    // Each failure is on the tracker with its reason.
    h.outbox_drained().await;
    h.peers.with(|s| {
        for (_, _, reason) in cases {
            assert!(
                s.comments.iter().any(|c| c.html.contains(reason)),
                "no comment says {reason}: {:#?}",
                s.comments
            );
        }
    });

    // A command that does not exist.
    let h2 = H::start(
        TestStorage::sqlite(),
        "",
        &[
            ("ORCH_AGENT_COMMAND", "no-such-agent-binary -p"),
            ("ORCH_LAUNCHER_GIT", "false"),
        ],
    )
    .await;
    let job = h2.enqueue("developer", "development", "").await;
    let done = h2.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Failed);
    assert_eq!(done.reason, "command not found: no-such-agent-binary");
    assert_eq!(done.outcome, "bad_input");

    // A log that cannot be written (here: the work dir is a file, as good as a full disk).
    let blocker = tempfile::NamedTempFile::new().expect("file");
    let workdir = blocker.path().join("work").display().to_string();
    let h3 = H::start(
        TestStorage::sqlite(),
        "cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json",
        &[("ORCH_WORKDIR", &workdir), ("ORCH_MAX_ATTEMPTS", "1")],
    )
    .await;
    let job = h3.enqueue("developer", "development", "").await;
    let done = h3.wait_done(&job.id, SECS).await;
    assert_eq!(
        (done.status, done.outcome.as_str()),
        (Status::Failed, "log_failed")
    );
    assert!(
        done.reason.starts_with("cannot write the log"),
        "{}",
        done.reason
    );
    h3.outbox_drained().await;
    h3.peers.with(|s| {
        assert!(
            s.comments
                .iter()
                .any(|c| c.html.contains("cannot write the log"))
        )
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_launcher_reconciles_its_own_runs_at_once() {
    let storage = std::sync::Arc::new(TestStorage::sqlite());
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let db = orchestrator_kit::db::open(
        orchestrator_kit::ServiceName::Launcher,
        &storage.location,
        &launcher::MIGRATOR,
    )
    .await
    .expect("db");
    // The previous life of instance "it": two jobs claimed and left running — one whose
    // agent is still alive (an orphan), one whose process is gone.
    let now = orchestrator_kit::time::now_ms();
    let mut ids = Vec::new();
    for _ in 0..2 {
        let (job, _) = store::enqueue(
            &db,
            &store::NewJob {
                id: launcher::new_job_id(),
                work_item: KEY.into(),
                repo: REPO.into(),
                agent: "developer".into(),
                stage: "development".into(),
                kind: store::Kind::Llm,
                payload_json: "{}".into(),
                dedupe_key: None,
                max_attempts: 3,
                not_before_ms: now,
                now_ms: now,
            },
        )
        .await
        .expect("enqueue");
        ids.push(job.id);
    }
    let filter = ClaimFilter {
        llm: true,
        reserved: false,
        max_concurrency: 5,
    };
    let a = store::claim(&db, "it", now, filter)
        .await
        .expect("claim")
        .expect("a");
    let b = store::claim(&db, "it", now, filter)
        .await
        .expect("claim")
        .expect("b");
    let mut orphan = {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sleep")
            .arg("300")
            .process_group(0)
            .spawn()
            .expect("orphan")
    };
    let orphan_pid = orphan.id() as i32;
    store::stamp_pid(&db, &a.id, a.attempt, "it", i64::from(orphan_pid), now)
        .await
        .expect("stamp");
    store::stamp_pid(&db, &b.id, b.attempt, "it", 999_999_999, now)
        .await
        .expect("stamp");
    drop(db);

    let script = "cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json";
    let t0 = Instant::now();
    let h = H::start_on(
        storage,
        dir,
        "it",
        script,
        &[("ORCH_LAUNCHER_GIT", "false")],
    )
    .await;
    for id in [&a.id, &b.id] {
        let j = h.wait_done(id, SECS).await;
        assert_eq!(j.status, Status::Succeeded, "{j:#?}");
        assert_eq!(j.attempt, 2, "ran again after the reconciliation");
        assert_eq!(j.failures, 1);
    }
    // At once, not after a reaper's dead-pid streak.
    assert!(t0.elapsed() < Duration::from_secs(10));
    let _ = orphan.wait();
    assert!(!process_alive(orphan_pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_shutdown_running_jobs_go_back_to_the_queue() {
    let h = H::start(
        TestStorage::sqlite(),
        "echo $$ > {root}/pid; sleep 300",
        &[("ORCH_LAUNCHER_GIT", "false")],
    )
    .await;
    let job = h.enqueue("developer", "development", "").await;
    let running = h.wait_for(&job.id, SECS, |j| j.pid.is_some()).await;
    let pid = i32::try_from(running.pid.expect("pid")).expect("pid");
    h.shutdown.cancel();
    tokio::time::timeout(
        Duration::from_secs(5),
        h.svc.supervisor().stopped().cancelled(),
    )
    .await
    .expect("the launcher stopped within the drain");
    let j = h.job(&job.id).await;
    assert_eq!(
        (
            j.status,
            j.failures,
            j.transient_attempts,
            j.outcome.as_str()
        ),
        (Status::Queued, 0, 0, "handed_back")
    );
    assert!(!process_alive(pid));
    let instances = store::instances(&h.db).await.expect("instances");
    assert!(instances[0].stopped_at_ms > 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_quality_gate_hook_goes_in_with_settings_and_its_blocks_are_recorded() {
    // The script stands in for the CLI running the hook twice: it bumps the hook's counter.
    let script = r#"echo "$@" > {root}/args
echo 2 > "${ORCH_PROMPT_FILE%/*}/qg-hook-blocks-$ORCH_JOB_ATTEMPT"
cat {contracts}/real-2.1.328/stop-hook-blocked-then-success.stdout.json"#;
    let h = H::start(
        TestStorage::sqlite(),
        script,
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_QG_HOOK_ENABLED", "true"),
            ("ORCH_QG_HOOK_COMMAND", "/opt/orchestrator qg-hook"),
            ("ORCH_QG_HOOK_MAX_BLOCKS", "4"),
        ],
    )
    .await;
    let job = h.enqueue("reviewer", "review", "").await;
    let j = h.wait_done(&job.id, SECS).await;
    assert_eq!(j.status, Status::Succeeded, "{j:#?}");
    assert_eq!(j.qg_hook_blocks, 2);
    let args = std::fs::read_to_string(h.root.join("args")).expect("args");
    assert!(args.contains("--settings {\"hooks\":{\"Stop\""), "{args}");
    assert!(
        args.contains("/opt/orchestrator qg-hook --work-item ORCH-1 --stage review")
            && args.contains("--max-blocks 4")
            && args.contains("--state-file"),
        "{args}"
    );
    assert!(!args.contains("--bare"));
    h.outbox_drained().await;
    h.peers.with(|s| {
        let finish = s
            .comments
            .iter()
            .find(|c| c.idempotency_key.ends_with(":finish"))
            .expect("finish");
        assert!(
            finish.html.contains("QG hook blocked 2×"),
            "{}",
            finish.html
        );
    });
}

/// While a restarted launcher reconciles a run of its previous life (here: killing an
/// agent that ignores SIGTERM, for the kill grace), `ProbeProcesses` answers ALIVE for it,
/// so that the reaper's dead-pid streak does not race the launcher's own finalize.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_being_reconciled_is_alive_for_the_reaper() {
    use orchestrator_proto::launcher::v1::{Liveness, ProbeProcessesRequest};
    use tonic::Request;

    let storage = std::sync::Arc::new(TestStorage::sqlite());
    let dir = std::sync::Arc::new(tempfile::tempdir().expect("tempdir"));
    let db = orchestrator_kit::db::open(
        orchestrator_kit::ServiceName::Launcher,
        &storage.location,
        &launcher::MIGRATOR,
    )
    .await
    .expect("db");
    let now = orchestrator_kit::time::now_ms();
    let (job, _) = store::enqueue(
        &db,
        &store::NewJob {
            id: launcher::new_job_id(),
            work_item: KEY.into(),
            repo: REPO.into(),
            agent: "developer".into(),
            stage: "development".into(),
            kind: store::Kind::Llm,
            payload_json: "{}".into(),
            dedupe_key: None,
            max_attempts: 3,
            not_before_ms: now,
            now_ms: now,
        },
    )
    .await
    .expect("enqueue");
    let filter = ClaimFilter {
        llm: true,
        reserved: false,
        max_concurrency: 5,
    };
    let a = store::claim(&db, "it", now, filter)
        .await
        .expect("claim")
        .expect("a");
    assert_eq!(a.id, job.id);
    // The previous life's agent, alive and deaf to SIGTERM; killed when the test ends,
    // however it ends.
    struct Orphan(std::process::Child);
    impl Drop for Orphan {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut orphan = Orphan({
        use std::os::unix::process::CommandExt;
        std::process::Command::new("sh")
            .args(["-c", "trap '' TERM; while :; do sleep 0.1; done"])
            .process_group(0)
            .spawn()
            .expect("orphan")
    });
    let orphan_pid = orphan.0.id() as i32;
    store::stamp_pid(&db, &a.id, a.attempt, "it", i64::from(orphan_pid), now)
        .await
        .expect("stamp");
    drop(db);

    let h = H::start_on(
        storage,
        dir,
        "it",
        "cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json",
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_AGENT_KILL_GRACE_SECONDS", "3"),
        ],
    )
    .await;
    // Within the kill grace the orphan still lives, and the launcher handles its run.
    let start = Instant::now();
    let alive = loop {
        let probes = h
            .svc
            .probe_processes(Request::new(ProbeProcessesRequest::default()))
            .await
            .expect("probe")
            .into_inner()
            .probes;
        let mine = probes
            .iter()
            .find(|p| p.job_id == a.id && p.attempt == a.attempt);
        if mine.is_some_and(|p| p.liveness == Liveness::Alive as i32) {
            break true;
        }
        if start.elapsed() > Duration::from_millis(2500) {
            break false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        alive,
        "the run being reconciled was never ALIVE for the reaper"
    );
    assert!(process_alive(orphan_pid), "probed within the kill grace");
    // Then the reconciliation ends the run and it runs again.
    let j = h.wait_done(&a.id, SECS).await;
    assert_eq!(
        (j.status, j.attempt, j.failures),
        (Status::Succeeded, 2, 1),
        "{j:#?}"
    );
    // Killed by the reconciliation (reaped here: it is this test's child).
    let _ = orphan.0.wait();
    assert!(!process_alive(orphan_pid));
}
