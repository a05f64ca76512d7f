//! What a run comes to: transient backoff (with and without a wait given by the output),
//! the transient budget, permanent attempts, spend limit and auth never retried, the
//! circuit breaker (open, half-open with one probe, closed), the no-changes note, the
//! work item's budget, and the reserved jobs.

mod common;

use std::time::{Duration, Instant};

use common::{H, KEY, REPO, WRITE_ARTIFACT, eventually, is};
use launcher::store::Status;
use orchestrator_forge::{Forge, RepoName};
use orchestrator_kit::time::now_ms;
use orchestrator_proto::merge_gate::v1::{FinalizeMergeResponse, FinalizeOutcome};
use orchestrator_proto::post_deploy::v1::TickResponse;
use orchestrator_proto::stage_engine::v1::AdvanceOutcome;
use orchestrator_testkit::TestStorage;

const SECS: Duration = Duration::from_secs(20);

/// Prints the real CLI output of `sample` and exits as the CLI does (1 when is_error).
fn prints(sample: &str, exit: u8) -> String {
    format!("cat {{contracts}}/real-2.1.328/{sample}.stdout.json\nexit {exit}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_429_waits_until_the_reset_the_output_gives() {
    let script = r#"reset=$(( $(date +%s) + 30 ))
echo $reset > {root}/reset
echo "{\"type\":\"rate_limit_event\",\"rate_limit_info\":{\"status\":\"rejected\",\"resetsAt\":$reset,\"rateLimitType\":\"five_hour\"}}"
cat {contracts}/real-2.1.328/rate-limit-429.stdout.json
exit 1"#;
    let h = H::start(
        TestStorage::sqlite(),
        script,
        &[("ORCH_LAUNCHER_GIT", "false")],
    )
    .await;
    let job = h.enqueue("developer", "development", "").await;
    let j = h
        .wait_for(&job.id, SECS, |j| {
            j.status == Status::Queued && j.attempt == 1
        })
        .await;
    let reset: i64 = std::fs::read_to_string(h.root.join("reset"))
        .expect("reset")
        .trim()
        .parse()
        .expect("n");
    assert_eq!(j.transient_attempts, 1);
    assert_eq!(j.failures, 0);
    assert_eq!(j.outcome, "transient");
    assert!(
        (j.not_before_ms - reset * 1000).abs() < 1_000,
        "{} vs {reset}",
        j.not_before_ms
    );
    assert!(
        j.reason.contains("rate limited (429)") && j.reason.contains("as the output said"),
        "{}",
        j.reason
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_529_without_a_given_wait_backs_off() {
    let h = H::start(
        TestStorage::sqlite(),
        &prints("overloaded-529", 1),
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_BACKOFF_BASE_S", "10"),
            ("ORCH_BACKOFF_MAX_S", "60"),
        ],
    )
    .await;
    let job = h.enqueue("developer", "development", "").await;
    let j = h
        .wait_for(&job.id, SECS, |j| {
            j.status == Status::Queued && j.attempt == 1
        })
        .await;
    let wait = j.not_before_ms - now_ms();
    // min(2^0 * 10 s, 60 s) with ±20 % jitter.
    assert!((7_000..=12_000).contains(&wait), "{wait}");
    assert_eq!(j.transient_attempts, 1);
    assert!(j.reason.contains("overloaded (529)"), "{}", j.reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_transient_budget_runs_out() {
    let h = H::start(
        TestStorage::sqlite(),
        &prints("rate-limit-429", 1),
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_MAX_TRANSIENT_ATTEMPTS", "3"),
            ("ORCH_BREAKER_THRESHOLD", "0"),
        ],
    )
    .await;
    let job = h.enqueue("developer", "development", "").await;
    let j = h.wait_done(&job.id, SECS).await;
    assert_eq!(j.status, Status::Failed);
    assert_eq!((j.attempt, j.transient_attempts, j.failures), (3, 3, 0));
    assert!(
        j.reason.starts_with(
            "transient budget exhausted after 3 transient failures: rate limited (429)"
        ),
        "{}",
        j.reason
    );
    h.outbox_drained().await;
    h.peers.with(|s| assert_eq!(s.record_runs.len(), 3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn permanent_failures_use_the_attempts_and_spend_limit_and_auth_are_never_retried() {
    let script = r#"case "$ORCH_WORK_ITEM" in
  ORCH-1) cat {contracts}/real-2.1.328/error-max-turns.stdout.json; exit 1 ;;
  ORCH-2) cat {contracts}/real-2.1.328/spend-limit-429.stdout.json; exit 1 ;;
  ORCH-3) cat {contracts}/real-2.1.328/invalid-key-401.stdout.json; exit 1 ;;
  ORCH-4) cat {contracts}/real-2.1.328/permission-denied.stdout.json ;;
esac"#;
    let h = H::start(
        TestStorage::sqlite(),
        script,
        &[("ORCH_MAX_CONCURRENCY", "4")],
    )
    .await;
    let turns = h
        .enqueue_for("ORCH-1", "developer", "development", "")
        .await;
    let spend = h
        .enqueue_for("ORCH-2", "developer", "development", "")
        .await;
    let auth = h
        .enqueue_for("ORCH-3", "developer", "development", "")
        .await;
    let denied = h
        .enqueue_for("ORCH-4", "developer", "development", "")
        .await;
    let j = h.wait_done(&turns.id, SECS).await;
    assert_eq!(j.status, Status::Failed);
    assert_eq!((j.attempt, j.failures, j.transient_attempts), (3, 3, 0));
    assert!(
        j.reason
            .contains("error_max_turns: Reached maximum number of turns (1) (failure 3 of 3)"),
        "{}",
        j.reason
    );
    for (job, reason) in [
        (&spend, "spend limit reached"),
        (&auth, "authentication failed: Invalid API key"),
    ] {
        let j = h.wait_done(&job.id, SECS).await;
        assert_eq!(j.status, Status::Failed);
        assert_eq!(j.attempt, 1, "never retried: {}", j.reason);
        assert!(
            j.reason.contains(reason) && j.reason.ends_with("(not retried)"),
            "{}",
            j.reason
        );
    }
    // Exit 0 and "success", but the Write was denied and nothing changed: not a success.
    let j = h.wait_done(&denied.id, SECS).await;
    assert_eq!(j.status, Status::Failed);
    assert!(
        j.reason.contains("permission denial(s) and no work done"),
        "{}",
        j.reason
    );
    h.peers
        .with(|s| assert!(s.advances.is_empty(), "nothing advanced"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_breaker_opens_on_transient_failures_and_half_opens_with_one_job() {
    let script = r#"if [ -f {root}/healed ]; then
  echo "$ORCH_JOB_ID" >> {root}/runs-after-heal
  sleep 0.6
  cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json
else
  cat {contracts}/real-2.1.328/overloaded-529.stdout.json
  exit 1
fi"#;
    let h = H::start(
        TestStorage::sqlite(),
        script,
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_BREAKER_THRESHOLD", "2"),
            ("ORCH_BREAKER_COOLDOWN_S", "2"),
            ("ORCH_MAX_CONCURRENCY", "2"),
            ("ORCH_MAX_TRANSIENT_ATTEMPTS", "10"),
        ],
    )
    .await;
    let a = h
        .enqueue_for("ORCH-1", "developer", "development", "")
        .await;
    // Two transient outcomes in a row open it.
    let deadline = Instant::now() + SECS;
    let open = loop {
        let s = h.snapshot().await;
        let b = s.breaker.expect("breaker");
        if b.state == "open" {
            break b;
        }
        assert!(Instant::now() < deadline, "the breaker never opened: {b:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert!(open.consecutive_transient >= 2);
    std::fs::write(h.root.join("healed"), "").expect("heal");
    let b = h
        .enqueue_for("ORCH-2", "developer", "development", "")
        .await;
    // Reserved jobs go on while it is open.
    let tick = h
        .enqueue_for("ORCH-3", "post-deploy-monitor", "done", "")
        .await;
    let t = h.wait_done(&tick.id, SECS).await;
    assert_eq!(t.status, Status::Succeeded);
    assert!(
        now_ms() < open.open_until_ms,
        "the reserved job ran while the breaker was open"
    );
    // No LLM claim while open.
    while now_ms() < open.open_until_ms - 100 {
        assert_eq!(h.job(&a.id).await.status, Status::Queued);
        assert_eq!(h.job(&b.id).await.status, Status::Queued);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Half-open: one job goes alone although two may run.
    let deadline = Instant::now() + SECS;
    loop {
        let s = h.snapshot().await;
        let state = s.breaker.expect("breaker").state;
        let count = |status: i32| {
            s.counts
                .iter()
                .find(|c| c.status == status)
                .map_or(0, |c| c.count)
        };
        // The in-memory running count moves just before the row is written running: wait
        // for the table to show the probe too (the snapshot is not one transaction).
        if state == "half_open" && s.llm_running == 1 && count(2) == 1 {
            assert_eq!(count(1), 1, "the other LLM job waits for the probe");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "never half-open with one probe: {state}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for id in [&a.id, &b.id] {
        assert_eq!(h.wait_done(id, SECS).await.status, Status::Succeeded);
    }
    let b = h.snapshot().await.breaker.expect("breaker");
    assert_eq!((b.state.as_str(), b.consecutive_transient), ("closed", 0));
    let runs = std::fs::read_to_string(h.root.join("runs-after-heal")).expect("runs");
    assert_eq!(runs.lines().count(), 2, "{runs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_changes_is_a_note_not_a_failure() {
    let h = H::start(
        TestStorage::sqlite(),
        &prints("success-with-write-tool", 0),
        &[],
    )
    .await;
    let job = h.enqueue("deployer", "deploy-staging", "").await;
    let j = h.wait_done(&job.id, SECS).await;
    assert_eq!(j.status, Status::Succeeded, "{j:#?}");
    assert_eq!(j.outcome, "no_changes");
    assert!(j.reason.contains("no changes to commit"), "{}", j.reason);
    // The effects follow the job's end, by the outbox.
    eventually(SECS, "the advance and the finish comment", || {
        h.peers.with(|s| {
            !s.advances.is_empty()
                && s.comments
                    .iter()
                    .any(|c| c.idempotency_key.ends_with(":finish"))
        })
    })
    .await;
    h.peers.with(|s| {
        assert_eq!(s.advances.len(), 1);
        let finish = s
            .comments
            .iter()
            .find(|c| c.idempotency_key.ends_with(":finish"))
            .expect("finish");
        assert!(
            finish.html.contains("no changes to commit"),
            "{}",
            finish.html
        );
        assert_eq!(finish.author, "deployer");
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_work_item_budget_blocks_or_caps_the_run() {
    let script = r#"echo "$@" > {root}/args
cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json"#;
    let h = H::start(
        TestStorage::sqlite(),
        script,
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_WORK_ITEM_BUDGET_USD", "1.0"),
        ],
    )
    .await;
    h.peers.with(|s| s.spent_usd = 1.5);
    let job = h.enqueue("developer", "development", "").await;
    let j = h.wait_done(&job.id, SECS).await;
    assert_eq!(j.status, Status::Failed);
    assert_eq!(j.outcome, "budget_blocked");
    assert!(j.reason.contains("$1.50 of $1.00"), "{}", j.reason);
    assert!(!h.root.join("args").exists(), "the agent was not launched");
    h.outbox_drained().await;
    h.peers.with(|s| {
        assert!(
            s.comments
                .iter()
                .any(|c| c.html.contains("is blocked") && c.author == "stream")
        );
    });
    // Under the budget: the remainder goes to the CLI's own budget flag.
    h.peers.with(|s| s.spent_usd = 0.25);
    let job = h.enqueue("developer", "development", "").await;
    assert_eq!(h.wait_done(&job.id, SECS).await.status, Status::Succeeded);
    let args = std::fs::read_to_string(h.root.join("args")).expect("args");
    assert!(args.contains("--max-budget-usd 0.7500"), "{args}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reserved_jobs_never_wait_for_an_llm_slot_and_come_back_as_answered() {
    let h = H::start(
        TestStorage::sqlite(),
        "sleep 3\ncat {contracts}/real-2.1.328/success-with-write-tool.stdout.json",
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_MAX_CONCURRENCY", "1"),
        ],
    )
    .await;
    let llm = h.enqueue("developer", "development", "").await;
    h.wait_for(&llm.id, SECS, is(Status::Running)).await;
    h.peers.with(|s| {
        s.ticks.push_back(Err(tonic::Status::unimplemented(
            "post-deploy is not built",
        )));
        for _ in 0..2 {
            s.ticks.push_back(Ok(TickResponse {
                done: false,
                next_tick_in_s: 1,
                classification: "healthy".into(),
                ..TickResponse::default()
            }));
        }
    });
    let t0 = Instant::now();
    let monitor = h.enqueue("post-deploy-monitor", "done", "").await;
    let m = h.wait_done(&monitor.id, SECS).await;
    assert_eq!(m.status, Status::Succeeded, "{m:#?}");
    assert_eq!(m.outcome, "done");
    assert_eq!(
        (m.attempt, m.failures),
        (4, 0),
        "unimplemented once, two ticks, then done"
    );
    assert!(
        t0.elapsed() >= Duration::from_secs(2),
        "each tick came back next_tick_in_s later"
    );
    assert_eq!(h.peers.with(|s| s.tick_calls), 4);
    // All of it while the LLM job held the only slot.
    assert_eq!(h.job(&llm.id).await.status, Status::Running);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deploy_holds_the_merge_lease_and_hands_over_to_the_finalizer() {
    let script = format!(
        "{}\ncat {{contracts}}/real-2.1.328/success-with-write-tool.stdout.json",
        WRITE_ARTIFACT.replace("development.md", "deploy.md")
    );
    let h = H::start(TestStorage::sqlite(), &script, &[]).await;
    h.peers.with(|s| {
        s.advance_outcome = Some(AdvanceOutcome::Done);
        // Another deploy of the repo holds the lease for a moment.
        s.leases.insert(REPO.into(), "other-job".into());
        s.finalizes.push_back(Ok(FinalizeMergeResponse {
            outcome: FinalizeOutcome::RetryLater as i32,
            retry_after_s: 1,
            reason: "checks pending".into(),
            ..Default::default()
        }));
        s.finalizes.push_back(Ok(FinalizeMergeResponse {
            outcome: FinalizeOutcome::Merged as i32,
            merge_sha: "m1".into(),
            ..Default::default()
        }));
    });
    // stage-engine marks the deploy's job: the run holds the repo's merge lease.
    let deploy = h
        .enqueue("deployer", "deploy", r#"{"needs_merge_lease": true}"#)
        .await;
    let waiting = h
        .wait_for(&deploy.id, SECS, |j| j.outcome == "lease_busy")
        .await;
    assert_eq!(waiting.status, Status::Queued);
    assert!(
        waiting.reason.contains("held by job other-job"),
        "{}",
        waiting.reason
    );
    h.peers.with(|s| s.leases.clear());
    let d = h.wait_done(&deploy.id, SECS).await;
    assert_eq!(d.status, Status::Succeeded, "{d:#?}");
    assert_eq!(d.outcome, "succeeded");
    // AdvanceStage tells stage-engine the PR and the head the run delivered; stage-engine
    // enqueues the finalizer pinned to them (as its outbox does, through Enqueue).
    let repo = RepoName::parse(REPO).expect("repo");
    let pr = h
        .forge
        .find_pr(&repo, "orch/ORCH-1", "main")
        .await
        .expect("pr")
        .expect("a PR");
    eventually(SECS, "AdvanceStage delivered", || {
        h.peers
            .with(|s| s.advances.iter().any(|a| a.job_id == deploy.id))
    })
    .await;
    let advance = h.peers.with(|s| {
        s.advances
            .iter()
            .find(|a| a.job_id == deploy.id)
            .cloned()
            .expect("advance")
    });
    assert_eq!(
        (advance.pr_number, advance.head_sha.as_str()),
        (pr.number, pr.head_sha.as_str())
    );
    let payload = serde_json::json!({
        "work_item": KEY,
        "pr_number": advance.pr_number,
        "tested_head_sha": advance.head_sha,
        "deployer_job_id": deploy.id,
    });
    let queued = h
        .svc
        .enqueue_job(orchestrator_proto::launcher::v1::EnqueueRequest {
            work_item: KEY.into(),
            repo: REPO.into(),
            agent: "deploy-finalizer".into(),
            stage: "deploy".into(),
            kind: orchestrator_proto::launcher::v1::JobKind::Reserved as i32,
            payload_json: payload.to_string(),
            dedupe_key: format!("deploy-finalizer:{}", deploy.id),
            ..Default::default()
        })
        .await
        .expect("enqueue the finalizer")
        .0;
    let deadline = Instant::now() + SECS;
    loop {
        let merged = h
            .peers
            .with(|s| s.finalize_calls.len() == 2 && s.leases.is_empty());
        if merged {
            break;
        }
        assert!(Instant::now() < deadline, "the finalizer did not finish");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    h.peers.with(|s| {
        let f = &s.finalize_calls[1];
        assert_eq!(f.pr_number, pr.number);
        assert_eq!(f.tested_head_sha, pr.head_sha);
        let d_id = &deploy.id;
        let log = s.lease_log.join(", ");
        assert!(
            log.starts_with(&format!("acquire {d_id}, release {d_id}, acquire ")),
            "{log}"
        );
        assert_eq!(
            s.lease_log
                .iter()
                .filter(|l| l.starts_with("acquire"))
                .count(),
            3,
            "{log}"
        );
        assert!(s.leases.is_empty());
    });
    let f = h.wait_done(&queued.id, SECS).await;
    assert_eq!(
        (f.status, f.outcome.as_str()),
        (Status::Succeeded, "merged")
    );
    eventually(SECS, "every lease released", || {
        h.peers.with(|s| s.leases.is_empty())
    })
    .await;
}

/// A run's usage and its finish comment outlive a restart of usage-ledger and
/// stage-engine: RecordRun (idempotent on the job and attempt) and AddComment (idempotent
/// on its key) are tried again while they answer UNAVAILABLE.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_usage_and_the_finish_comment_wait_for_restarting_peers() {
    let h = H::start(
        TestStorage::sqlite(),
        &prints("success-with-write-tool", 0),
        &[("ORCH_LAUNCHER_GIT", "false")],
    )
    .await;
    h.peers.with(|s| {
        s.record_run_unavailable = 2;
        s.add_comment_unavailable = 2;
    });
    let job = h.enqueue("developer", "development", "").await;
    h.wait_for(&job.id, SECS, |j| j.status == Status::Succeeded)
        .await;
    let finish = format!("launcher:{}:1:finish", job.id);
    eventually(SECS, "the usage and the finish comment", || {
        h.peers.with(|s| {
            !s.record_runs.is_empty() && s.comments.iter().any(|c| c.idempotency_key == finish)
        })
    })
    .await;
    h.peers.with(|s| {
        assert_eq!(s.record_run_calls, 3);
        assert_eq!(s.record_runs.len(), 1);
        assert_eq!(
            (s.record_runs[0].job_id.as_str(), s.record_runs[0].attempt),
            (job.id.as_str(), 1)
        );
        assert!(
            s.comments.iter().any(|c| c.idempotency_key == finish),
            "no finish comment: {:?}",
            s.comments
                .iter()
                .map(|c| &c.idempotency_key)
                .collect::<Vec<_>>()
        );
    });
}

/// The launcher announces a start when stage-engine's job says so (`announce_start`, the
/// first stage's), under the job's own agent's bot, once per job; a job without the flag
/// starts silently, whatever its agent is called. No role is known to the launcher.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_is_announced_when_the_job_asks_for_it() {
    let h = H::start(
        TestStorage::sqlite(),
        &prints("success-with-write-tool", 0),
        &[("ORCH_LAUNCHER_GIT", "false")],
    )
    .await;
    let loud = h
        .enqueue("architect", "architecture", r#"{"announce_start": true}"#)
        .await;
    let quiet = h.enqueue("analyst", "analysis", "").await;
    for id in [&loud.id, &quiet.id] {
        h.wait_for(id, SECS, |j| j.status == Status::Succeeded)
            .await;
    }
    h.outbox_drained().await;
    eventually(SECS, "the start comment", || {
        h.peers.with(|s| {
            s.comments
                .iter()
                .any(|c| c.idempotency_key == format!("launcher:{}:start", loud.id))
        })
    })
    .await;
    h.peers.with(|s| {
        let starts: Vec<_> = s
            .comments
            .iter()
            .filter(|c| c.idempotency_key.ends_with(":start"))
            .collect();
        assert_eq!(starts.len(), 1, "{starts:#?}");
        assert_eq!(starts[0].author, "architect");
        assert_eq!(
            starts[0].html,
            format!("<p>Architect started on {KEY} (job {}).</p>", loud.id)
        );
    });
}

/// A breaker open longer than `ORCH_NOTIFY_BREAKER_OPEN_S` is told once per opening: the
/// model API keeps failing, the half-open probes re-open it again and again, and the
/// receiver (stage-engine's `Notify`) gets exactly one `breaker_open`, on the work item whose
/// job opened it; once the breaker has closed, a new opening would be told anew.
async fn a_breaker_open_for_long_is_told_once_per_opening(storage: TestStorage) {
    let script = r#"if [ -f {root}/healed ]; then
  cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json
else
  echo x >> {root}/transients
  cat {contracts}/real-2.1.328/overloaded-529.stdout.json
  exit 1
fi"#;
    let h = H::start(
        storage,
        script,
        &[
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_BREAKER_THRESHOLD", "1"),
            ("ORCH_BREAKER_COOLDOWN_S", "0.3"),
            ("ORCH_BACKOFF_BASE_S", "0.1"),
            ("ORCH_BACKOFF_MAX_S", "0.2"),
            ("ORCH_MAX_TRANSIENT_ATTEMPTS", "1000"),
            ("ORCH_NOTIFY_BREAKER_OPEN_S", "1"),
        ],
    )
    .await;
    let job = h
        .enqueue_for("ORCH-9", "developer", "development", "")
        .await;
    let told = |h: &H| {
        h.peers.with(|s| {
            s.notifications
                .iter()
                .filter(|n| n.event == "breaker_open")
                .map(|n| (n.event_id.clone(), n.work_item.clone(), n.text.clone()))
                .collect::<Vec<_>>()
        })
    };
    eventually(SECS, "the breaker_open notification", || {
        !told(&h).is_empty()
    })
    .await;
    // The probes keep failing: the breaker re-opens, several times, and is not told again.
    let transients = || {
        std::fs::read_to_string(h.root.join("transients"))
            .unwrap_or_default()
            .lines()
            .count()
    };
    let seen = transients();
    eventually(SECS, "two more failed probes", || transients() >= seen + 2).await;
    h.outbox_drained().await;
    let t = told(&h);
    assert_eq!(t.len(), 1, "{t:#?}");
    let (event_id, work_item, text) = &t[0];
    assert!(event_id.starts_with("breaker_open:"), "{event_id}");
    assert_eq!(work_item, "ORCH-9");
    assert!(
        text.contains("circuit breaker has been open since") && text.contains("ORCH-9"),
        "{text}"
    );
    assert_ne!(h.snapshot().await.breaker.expect("breaker").state, "closed");
    // The API heals: the breaker closes and the job succeeds; nothing more is told.
    std::fs::write(h.root.join("healed"), "").expect("heal");
    assert_eq!(h.wait_done(&job.id, SECS).await.status, Status::Succeeded);
    let b = h.snapshot().await.breaker.expect("breaker");
    assert_eq!(b.state, "closed");
    h.outbox_drained().await;
    assert_eq!(told(&h).len(), 1);
}

orchestrator_testkit::on_both_backends!(a_breaker_open_for_long_is_told_once_per_opening);
