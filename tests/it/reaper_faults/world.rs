//! What the fault tests run on:
//! - the services the launcher and the reaper talk to — stage-engine, usage-ledger,
//!   merge-gate and the reaper itself — started in this process by `Node::start`, the code
//!   `orchestrator up` runs, over real gRPC on loopback;
//! - launchers as child processes, `orchestrator serve launcher`, which a test can SIGKILL;
//! - between them, the launcher's Service: a TCP forwarder that sends each connection to
//!   the first launcher replica that accepts it, as a Kubernetes Service (or compose's DNS
//!   name) reaches whichever replica is up. `ORCH_LAUNCHER_URL` points there.

use std::os::unix::process::ExitStatusExt;
use std::path::PathBuf;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use orchestrator::Node;
use orchestrator_forge::RepoName;
use orchestrator_forge::local::LocalForge;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::{Config, Env, ServiceName};
use orchestrator_proto::launcher::v1::{EnqueueRequest, GetJobRequest, Job, JobStatus};
use orchestrator_proto::merge_gate::v1::GetLeaseRequest;
use orchestrator_proto::reaper::v1::{ReaperSnapshot, SnapshotRequest};
use orchestrator_testkit::TestStorage;
use tokio_util::sync::CancellationToken;

use crate::common::env_for;
use crate::process::{orchestrator, read_addrs};

/// The reaper's settings in these tests: a tick a second, two dead ticks.
pub const INTERVAL: Duration = Duration::from_secs(1);
pub const DEAD_TICKS: u32 = 2;
/// A launcher instance silent this long is gone (the judge's `ORCH_LAUNCHER_INSTANCE_STALE_MS`).
pub const INSTANCE_STALE: Duration = Duration::from_millis(1500);
/// Added to every computed bound: the 2 cores are shared with other builds and tests.
pub const LOAD_MARGIN: Duration = Duration::from_secs(10);

/// The launcher's Service: forwards each connection to the first replica that accepts it.
pub struct LauncherService {
    pub url: String,
    replicas: Arc<Mutex<Vec<String>>>,
}

impl LauncherService {
    async fn start() -> LauncherService {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind the launcher service");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        let replicas: Arc<Mutex<Vec<String>>> = Arc::default();
        let routes = replicas.clone();
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    continue;
                };
                let candidates = routes.lock().expect("lock").clone();
                tokio::spawn(async move {
                    for addr in candidates {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&addr).await {
                            let _ = inbound.set_nodelay(true);
                            let _ = outbound.set_nodelay(true);
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                            return;
                        }
                    }
                    // No replica is up: the connection is closed, the caller sees UNAVAILABLE.
                });
            }
        });
        LauncherService { url, replicas }
    }

    /// Routes new connections to these replicas, the first that accepts.
    pub fn route_to(&self, replicas: &[&LauncherProc]) {
        *self.replicas.lock().expect("lock") = replicas.iter().map(|r| r.addr.clone()).collect();
    }
}

/// `orchestrator serve launcher` as a child process.
pub struct LauncherProc {
    child: Child,
    pub addr: String,
    pub instance_id: String,
}

impl LauncherProc {
    /// SIGKILL, then reaps it.
    pub fn sigkill(&mut self) {
        self.child.kill().expect("SIGKILL the launcher");
        let status = self.child.wait().expect("reap the launcher");
        assert_eq!(status.signal(), Some(libc::SIGKILL), "{status}");
    }

    /// Waits for it to end by itself (a failpoint), up to `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "launcher {} still runs after {limit:?}",
                self.instance_id
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for LauncherProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The agent's process group: it leads its own group, so its pid names it.
pub fn agent_pgid(job: &Job) -> i32 {
    i32::try_from(job.pid.expect("the agent's pid is stamped")).expect("pid")
}

/// Sends SIGKILL to process group `pgid` (an agent and whatever it started).
pub fn sigkill_group(pgid: i32) {
    assert!(pgid > 1, "pgid {pgid}");
    // SAFETY: killpg takes two integers; pgid > 1 never names our own group or init.
    #[allow(unsafe_code)]
    let _ = unsafe { libc::killpg(pgid, libc::SIGKILL) };
}

/// Whether any process of group `pgid` exists.
pub fn group_alive(pgid: i32) -> bool {
    // SAFETY: signal 0 only checks for existence.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(-pgid, 0) };
    rc == 0
}

/// The services in this process, the launcher's Service, the forge and the agents.
pub struct World {
    pub dir: tempfile::TempDir,
    pub service: LauncherService,
    pub clients: Clients,
    config: Config,
    storage: TestStorage,
    shutdown: CancellationToken,
    /// Agent process groups seen running: none may outlive the test.
    agents: Mutex<Vec<i32>>,
}

impl Drop for World {
    fn drop(&mut self) {
        self.shutdown.cancel();
        for pgid in self.agents.lock().expect("lock").drain(..) {
            if group_alive(pgid) {
                sigkill_group(pgid);
            }
        }
    }
}

impl World {
    /// Starts stage-engine, usage-ledger, merge-gate and the reaper (a tick a second, two
    /// dead ticks) in this process, with a local forge holding `repos` and the agent
    /// `script` for every role.
    pub async fn start(storage: TestStorage, repos: &[&str], script: &str) -> World {
        orchestrator_kit::telemetry::init_for_tests();
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let forge = LocalForge::new(root.join("forge"), "main".into());
        for repo in repos {
            forge
                .init_repo(&RepoName::parse(repo).expect("repo"))
                .await
                .expect("bare repo");
        }
        std::fs::create_dir_all(root.join("agents")).expect("agents");
        // The launcher starts only with a prompt for every role.
        for role in stage_engine::pipeline::ROLES {
            std::fs::write(
                root.join(format!("agents/{role}.md")),
                format!("You are the {role}.\n"),
            )
            .expect("prompt");
        }
        std::fs::write(
            root.join("agent.sh"),
            script.replace("{root}", &root.display().to_string()),
        )
        .expect("script");
        let service = LauncherService::start().await;
        let (forge_dir, mirrors) = (s(&root.join("forge")), s(&root.join("mirrors")));
        let interval = INTERVAL.as_secs().to_string();
        let dead_ticks = DEAD_TICKS.to_string();
        let env = env_for(
            &storage,
            &[
                ("ORCH_LAUNCHER_URL", &service.url),
                ("ORCH_FORGE", "local"),
                ("ORCH_FORGE_LOCAL_DIR", &forge_dir),
                ("ORCH_MERGE_MIRROR_DIR", &mirrors),
                ("ORCH_OUTBOX_POLL_MS", "50"),
                ("ORCH_REAPER_INTERVAL_S", &interval),
                ("ORCH_REAPER_DEAD_TICKS", &dead_ticks),
            ],
        );
        let config = Config::from_env(env).expect("config");
        let shutdown = CancellationToken::new();
        let node = Node::start(
            config,
            &[
                ServiceName::StageEngine,
                ServiceName::UsageLedger,
                ServiceName::MergeGate,
                ServiceName::Reaper,
            ],
            shutdown.clone(),
        )
        .await
        .expect("the services start");
        let config = node.config.clone();
        tokio::spawn(node.wait());
        let clients = Clients::from_config(&config).expect("clients");
        World {
            dir,
            service,
            clients,
            config,
            storage,
            shutdown,
            agents: Mutex::default(),
        }
    }

    pub fn root(&self) -> PathBuf {
        self.dir.path().to_path_buf()
    }

    /// Starts launcher `instance_id` as a child process, against this world's storage and
    /// services: its own work directory (the same one again for a restart), one LLM job at
    /// a time, fast heartbeats, and `extra` on top.
    pub async fn launcher(&self, instance_id: &str, extra: &[(&str, &str)]) -> LauncherProc {
        let root = self.root();
        let mut cmd = orchestrator(&root);
        let storage = self.storage.apply(Env::default());
        for var in ["ORCH_DATA_DIR", "ORCH_DATABASE_URL"] {
            if let Some(v) = storage.get(var) {
                cmd.env(var, v);
            }
        }
        for part in [
            ServiceName::StageEngine,
            ServiceName::UsageLedger,
            ServiceName::MergeGate,
        ] {
            cmd.env(
                orchestrator_kit::config::url_var(part),
                self.config.url(part),
            );
        }
        let stale = INSTANCE_STALE.as_millis().to_string();
        cmd.env("ORCH_LAUNCHER_INSTANCE_ID", instance_id)
            .env("ORCH_WORKDIR", root.join(format!("work-{instance_id}")))
            .env("ORCH_AGENTS_DIR", root.join("agents"))
            .env(
                "ORCH_AGENT_COMMAND",
                format!("sh {}", root.join("agent.sh").display()),
            )
            .env("ORCH_FORGE", "local")
            .env("ORCH_FORGE_LOCAL_DIR", root.join("forge"))
            .env("ORCH_QG_HOOK_ENABLED", "false")
            // The agents record their pids under the test's root and must outlive a
            // SIGKILLed launcher, as bare processes do: the sandbox's --die-with-parent
            // would take them along (services/launcher/tests/sandbox.rs runs inside it).
            .env("ORCH_AGENT_SANDBOX", "off")
            .env("ORCH_MAX_CONCURRENCY", "1")
            .env("ORCH_LAUNCHER_POLL_MS", "100")
            .env("ORCH_LAUNCHER_HEARTBEAT_MS", "200")
            .env("ORCH_LAUNCHER_INSTANCE_STALE_MS", &stale)
            // A job sent back to the queue waits: the next queued job goes first.
            .env("ORCH_BACKOFF_BASE_S", "600")
            .env("ORCH_BACKOFF_MAX_S", "600")
            .env(
                "ORCH_LOG",
                std::env::var("TEST_LOG").unwrap_or_else(|_| "warn".into()),
            );
        for (k, v) in extra {
            cmd.env(k, v);
        }
        let quiet = std::env::var_os("TEST_LOG").is_none();
        let mut child = cmd
            .args(["serve", "launcher"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(if quiet {
                Stdio::null()
            } else {
                Stdio::inherit()
            })
            .spawn()
            .expect("spawn orchestrator serve launcher");
        let (child, addrs) = tokio::task::spawn_blocking(move || {
            let addrs = read_addrs(&mut child);
            (child, addrs)
        })
        .await
        .expect("read the launcher's address");
        LauncherProc {
            child,
            addr: addrs["launcher"].clone(),
            instance_id: instance_id.to_owned(),
        }
    }

    /// Enqueues an LLM job through the launcher's Service.
    pub async fn enqueue(
        &self,
        work_item: &str,
        repo: &str,
        agent: &str,
        stage: &str,
        max_attempts: u32,
    ) -> Job {
        // As stage-engine enqueues it: the stage's job flags ride on the payload (the
        // deploy's job holds the merge lease).
        let flags = stage
            .parse()
            .map(stage_engine::pipeline::job_flags)
            .unwrap_or_default();
        let payload = serde_json::json!({
            "branch": format!("orch/{work_item}"),
            "needs_merge_lease": flags.needs_merge_lease,
            "announce_start": flags.announce_start,
        });
        self.clients
            .launcher
            .clone()
            .enqueue(EnqueueRequest {
                work_item: work_item.into(),
                repo: repo.into(),
                agent: agent.into(),
                stage: stage.into(),
                payload_json: payload.to_string(),
                max_attempts,
                ..EnqueueRequest::default()
            })
            .await
            .expect("enqueue")
            .into_inner()
            .job
            .expect("job")
    }

    /// The job as the launcher's Service answers (`None` while no replica answers).
    pub async fn job(&self, id: &str) -> Option<Job> {
        self.clients
            .launcher
            .clone()
            .get_job(GetJobRequest { job_id: id.into() })
            .await
            .ok()
            .map(tonic::Response::into_inner)
    }

    /// Polls the job until `done` holds, up to `limit`.
    pub async fn wait_job(&self, id: &str, limit: Duration, done: impl Fn(&Job) -> bool) -> Job {
        let deadline = Instant::now() + limit;
        loop {
            let job = self.job(id).await;
            if let Some(j) = &job
                && done(j)
            {
                return j.clone();
            }
            assert!(
                Instant::now() < deadline,
                "job {id} not there after {limit:?}: {job:#?}"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// Waits until the job runs with its agent's pid stamped; returns it. Its process
    /// group is killed when the world ends, whatever the test did.
    pub async fn wait_running(&self, id: &str) -> Job {
        let job = self
            .wait_job(id, Duration::from_secs(30), |j| {
                j.status == JobStatus::Running as i32 && j.pid.is_some()
            })
            .await;
        self.agents.lock().expect("lock").push(agent_pgid(&job));
        job
    }

    pub async fn snapshot(&self) -> ReaperSnapshot {
        self.clients
            .reaper
            .clone()
            .snapshot(SnapshotRequest {})
            .await
            .expect("reaper snapshot")
            .into_inner()
    }

    /// The holder job of `repo`'s merge lease, if any.
    pub async fn lease_holder(&self, repo: &str) -> Option<String> {
        self.clients
            .merge_gate
            .clone()
            .get_lease(GetLeaseRequest { repo: repo.into() })
            .await
            .expect("get lease")
            .into_inner()
            .lease
            .map(|l| l.holder_job_id)
    }

    /// Polls until `repo`'s lease holder is `holder`, up to `limit`.
    pub async fn wait_lease(&self, repo: &str, holder: Option<&str>, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            let now = self.lease_holder(repo).await;
            if now.as_deref() == holder {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{repo}'s lease is held by {now:?}, not {holder:?}, after {limit:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn s(p: &std::path::Path) -> String {
    p.display().to_string()
}
