//! Scale-out on PostgreSQL: every service in its own `orchestrator serve` process and three
//! launcher replicas on one queue. `ORCH_MAX_CONCURRENCY` holds ACROSS the replicas (the
//! agents record their own start and end times; the most that ever overlapped is the cap,
//! never more), and every job runs exactly once (each run leaves one line per job).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use orchestrator_kit::ServiceName;
use orchestrator_kit::clients::{ClientSettings, LauncherClient, channel};
use orchestrator_proto::launcher::v1::{EnqueueRequest, GetJobRequest, JobStatus};
use orchestrator_testkit::TestStorage;
use orchestrator_testkit::agent::{Behaviour, RecordingAgent, max_overlap};
use orchestrator_testkit::procs::launcher_name;

/// LLM jobs at once across every replica.
const CAP: usize = 3;
const REPLICAS: usize = 3;
const JOBS: usize = 24;

/// A client of one replica (not the shared URL, which is the first replica's).
fn replica(addr: std::net::SocketAddr) -> LauncherClient {
    let settings = ClientSettings {
        token: None,
        connect_timeout: Duration::from_secs(2),
        request_timeout: Duration::from_secs(10),
    };
    LauncherClient::new(
        channel(ServiceName::Launcher, &format!("http://{addr}"), &settings).expect("url"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_launcher_replicas_share_the_cap_and_run_each_job_once() {
    let Some(storage) = TestStorage::postgres(
        "replicas::three_launcher_replicas_share_the_cap_and_run_each_job_once",
    )
    .await
    else {
        return;
    };
    let dir = tempfile::tempdir().expect("tempdir");
    let root = dir.path();
    std::fs::create_dir_all(root.join("agents")).expect("agents");
    // The launcher starts only with a prompt for every role (the jobs here are `noop`'s).
    for role in stage_engine::pipeline::ROLES
        .iter()
        .copied()
        .chain(["noop"])
    {
        std::fs::write(root.join(format!("agents/{role}.md")), "Do nothing.\n").expect("prompt");
    }
    // Long enough runs for the replicas to compete for the slots.
    let agent = RecordingAgent::create(
        &root.join("agent"),
        &Behaviour {
            run_seconds: 0.4,
            ..Behaviour::default()
        },
    )
    .expect("agent");
    let command = agent.command();
    let agents = root.join("agents").display().to_string();
    let cap = CAP.to_string();
    let (mut stack, _clients) = crate::procs::start(
        &storage,
        &root.join("stack"),
        REPLICAS,
        &[
            ("ORCH_AGENT_COMMAND", &command),
            ("ORCH_AGENTS_DIR", &agents),
            ("ORCH_LAUNCHER_GIT", "false"),
            ("ORCH_QG_HOOK_ENABLED", "false"),
            // The recording agent writes its records outside the checkout, which the
            // sandbox forbids (services/launcher/tests/sandbox.rs runs agents inside it).
            ("ORCH_AGENT_SANDBOX", "off"),
            ("ORCH_MAX_CONCURRENCY", &cap),
            // Every replica looks for work often, so they compete for every free slot.
            ("ORCH_LAUNCHER_POLL_MS", "20"),
        ],
    )
    .await;
    let started = Instant::now();

    // Round robin over the replicas: each wakes on its own enqueues and polls for the rest.
    let clients: Vec<LauncherClient> = (0..REPLICAS)
        .map(|i| replica(stack.addr(&launcher_name(i))))
        .collect();
    let mut ids = Vec::with_capacity(JOBS);
    for i in 0..JOBS {
        let job = clients[i % REPLICAS]
            .clone()
            .enqueue(EnqueueRequest {
                work_item: format!("REP-{}", i + 1),
                repo: "acme/app".into(),
                agent: "noop".into(),
                stage: "development".into(),
                payload_json: format!(r#"{{"branch":"orch/REP-{}"}}"#, i + 1),
                ..Default::default()
            })
            .await
            .expect("enqueue")
            .into_inner()
            .job
            .expect("job");
        ids.push(job.id);
    }

    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let job = clients[0]
                .clone()
                .get_job(GetJobRequest { job_id: id.clone() })
                .await
                .expect("get job")
                .into_inner();
            if job.status == JobStatus::Succeeded as i32 {
                assert_eq!(job.attempt, 1, "{job:?}");
                break;
            }
            assert!(
                job.status == JobStatus::Queued as i32 || job.status == JobStatus::Running as i32,
                "job {id} ended otherwise: {job:?}"
            );
            assert!(
                Instant::now() < deadline,
                "job {id} not done in time: {job:?}\nlogs: {:?}",
                stack.log_paths()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let took = started.elapsed();

    let runs = agent.runs().expect("the agent's record");
    assert_eq!(runs.len(), JOBS, "every job ran: {runs:?}");
    for id in &ids {
        let r = runs.get(id).unwrap_or_else(|| panic!("job {id} never ran"));
        assert_eq!(r.len(), 1, "job {id} ran more than once: {r:?}");
        assert_eq!(r[0].attempt, 1, "{id}: {r:?}");
        assert!(r[0].end.is_some(), "{id} never ended: {r:?}");
    }
    let most = max_overlap(runs.values().flatten(), f64::MAX);
    assert!(
        most <= CAP,
        "{most} agents ran at once across the replicas; the cap is {CAP}"
    );
    assert_eq!(
        most, CAP,
        "the cap was never reached: the test proves nothing"
    );
    let stack_dir = root.join("stack");
    let mut per_replica: BTreeMap<String, usize> = BTreeMap::new();
    for run in runs.values().flatten() {
        let replica = (0..REPLICAS)
            .map(launcher_name)
            .find(|n| run.ran_under(&stack_dir.join(n)))
            .unwrap_or_else(|| panic!("a run in no replica's work dir: {run:?}"));
        *per_replica.entry(replica).or_default() += 1;
    }
    assert!(
        per_replica.len() >= 2,
        "the replicas did not share the queue: {per_replica:?}"
    );
    eprintln!(
        "replicas: {JOBS} jobs on {REPLICAS} launcher processes in {:.1} s, per replica {per_replica:?}, at most {most} at once (cap {CAP})",
        took.as_secs_f64()
    );
    for name in stack.names() {
        stack.stop(&name, Duration::from_secs(10));
    }
}
