//! Scale-out on PostgreSQL: every service in its own `orchestrator serve` process and three
//! launcher replicas on one queue. `ORCH_MAX_CONCURRENCY` holds ACROSS the replicas (the
//! agents record their own start and end times; the most that ever overlapped is the cap,
//! never more), and every job runs exactly once (each run leaves one line per job).

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use orchestrator_kit::ServiceName;
use orchestrator_kit::clients::{ClientSettings, LauncherClient, channel};
use orchestrator_proto::launcher::v1::{EnqueueRequest, GetJobRequest, JobStatus};
use orchestrator_testkit::TestStorage;
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

/// One agent run as the agent itself recorded it.
#[derive(Debug)]
struct Run {
    start: f64,
    end: f64,
    attempt: u32,
    /// The replica whose work directory held the run.
    replica: String,
}

/// Reads `runs/<job id>`: `start <t> <attempt> <prompt file>` and `end <t>` lines.
fn read_runs(dir: &Path) -> BTreeMap<String, Vec<Run>> {
    let mut runs: BTreeMap<String, Vec<Run>> = BTreeMap::new();
    for entry in std::fs::read_dir(dir).expect("runs dir").flatten() {
        let text = std::fs::read_to_string(entry.path()).expect("run file");
        let job = entry.file_name().to_string_lossy().into_owned();
        let mut lines = text.lines().map(|l| l.split(' ').collect::<Vec<_>>());
        let list = runs.entry(job.clone()).or_default();
        while let Some(start) = lines.next() {
            let end = lines
                .next()
                .unwrap_or_else(|| panic!("{job}: no end in {text}"));
            assert_eq!((start[0], end[0]), ("start", "end"), "{job}: {text}");
            let replica = (0..REPLICAS)
                .map(launcher_name)
                .find(|n| start[3].contains(&format!("/{n}/")))
                .unwrap_or_else(|| panic!("{job}: run in no replica's work dir: {text}"));
            list.push(Run {
                start: start[1].parse().expect("start time"),
                end: end[1].parse().expect("end time"),
                attempt: start[2].parse().expect("attempt"),
                replica,
            });
        }
    }
    runs
}

/// The most runs that were ever in progress at the same moment.
fn max_overlap(runs: &[&Run]) -> usize {
    let mut edges: Vec<(f64, i32)> = runs
        .iter()
        .flat_map(|r| [(r.start, 1), (r.end, -1)])
        .collect();
    // At equal times an end comes first: touching runs do not overlap.
    edges.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut now, mut most) = (0i32, 0i32);
    for (_, d) in edges {
        now += d;
        most = most.max(now);
    }
    usize::try_from(most).unwrap_or(0)
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
    let runs_dir = root.join("runs");
    std::fs::create_dir_all(&runs_dir).expect("runs");
    std::fs::create_dir_all(root.join("agents")).expect("agents");
    std::fs::write(root.join("agents/noop.md"), "Do nothing.\n").expect("prompt");
    // The agent notes its own start and end (no fork before the first line), long enough
    // for the replicas to compete for the slots.
    let script = root.join("agent.sh");
    std::fs::write(
        &script,
        format!(
            r#"f={runs}/$ORCH_JOB_ID
echo "start $EPOCHREALTIME $ORCH_JOB_ATTEMPT $ORCH_PROMPT_FILE" >> "$f"
sleep 0.4
echo "end $EPOCHREALTIME" >> "$f"
echo '{{"type":"result","subtype":"success","is_error":false,"result":"ok","total_cost_usd":0}}'
"#,
            runs = runs_dir.display()
        ),
    )
    .expect("script");
    let command = format!("bash {}", script.display());
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

    let runs = read_runs(&runs_dir);
    assert_eq!(runs.len(), JOBS, "every job ran: {runs:?}");
    for id in &ids {
        let r = runs.get(id).unwrap_or_else(|| panic!("job {id} never ran"));
        assert_eq!(r.len(), 1, "job {id} ran more than once: {r:?}");
        assert_eq!(r[0].attempt, 1, "{id}: {r:?}");
    }
    let all: Vec<&Run> = runs.values().flatten().collect();
    let most = max_overlap(&all);
    assert!(
        most <= CAP,
        "{most} agents ran at once across the replicas; the cap is {CAP}"
    );
    assert_eq!(
        most, CAP,
        "the cap was never reached: the test proves nothing"
    );
    let mut per_replica: BTreeMap<&str, usize> = BTreeMap::new();
    for r in &all {
        *per_replica.entry(r.replica.as_str()).or_default() += 1;
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

#[test]
fn overlap_counts_runs_in_progress_together() {
    let run = |start, end| Run {
        start,
        end,
        attempt: 1,
        replica: String::new(),
    };
    let (a, b, c, d) = (run(0.0, 1.0), run(0.5, 1.5), run(1.0, 2.0), run(1.2, 1.3));
    assert_eq!(max_overlap(&[&a]), 1);
    // `c` starts as `a` ends: they do not overlap.
    assert_eq!(max_overlap(&[&a, &c]), 1);
    assert_eq!(max_overlap(&[&a, &b, &c]), 2);
    assert_eq!(max_overlap(&[&a, &b, &c, &d]), 3);
    assert_eq!(max_overlap(&[]), 0);
}
