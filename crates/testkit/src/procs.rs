//! The stack as separate processes, the way a team runs it: each service is
//! `orchestrator serve <service>` in its own process, on SQLite (one file per service) or
//! PostgreSQL (one schema per service), with any number of launcher replicas on one queue.
//! Processes can be SIGKILLed and restarted by name on the same address, so fault tests and
//! benchmarks drive real crashes.
//!
//! Every process gets a clean environment: the inherited `ORCH_*`, `PLANE_*`, `GITEA_*` and
//! `ANTHROPIC_*` variables are removed, then the stack's own are set. Ports are chosen
//! before start-up (bound on 127.0.0.1:0 and released), because the services must know each
//! other's URLs up front and a restarted process must come back where its peers look for it.
//! Each process writes stdout and stderr to `<dir>/logs/<name>.log` (appended across
//! restarts).

// Sending signals to our own children needs libc::kill.
#![allow(unsafe_code)]

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator_kit::ServiceName;
use orchestrator_kit::config::url_var;

/// Variable prefixes never inherited from the test's own environment.
const SCRUBBED_PREFIXES: [&str; 4] = ["ORCH_", "PLANE_", "GITEA_", "ANTHROPIC_"];

/// How long a process may take to print `ready`.
const READY_LIMIT: Duration = Duration::from_secs(30);

/// What to start.
#[derive(Debug, Clone)]
pub struct ProcStackSpec {
    /// The `orchestrator` binary (`env!("CARGO_BIN_EXE_orchestrator")` in the root
    /// package's tests).
    pub bin: PathBuf,
    /// Data, logs and per-replica work directories live here.
    pub dir: PathBuf,
    /// A `postgres://` URL for every service; `None` keeps each on its SQLite file in
    /// `<dir>/var`.
    pub database_url: Option<String>,
    /// How many launcher processes share the queue (at least 1).
    pub launcher_replicas: usize,
    /// The parts to start; the default is every service and the gateway.
    pub parts: Vec<ServiceName>,
    /// Extra variables for every process (`ORCH_AGENT_COMMAND`, tick settings, secrets...).
    pub env: Vec<(String, String)>,
}

impl ProcStackSpec {
    /// Every part, one launcher, SQLite under `dir`.
    pub fn new(bin: impl Into<PathBuf>, dir: impl Into<PathBuf>) -> Self {
        ProcStackSpec {
            bin: bin.into(),
            dir: dir.into(),
            database_url: None,
            launcher_replicas: 1,
            parts: ServiceName::ALL.to_vec(),
            // Later variables win: a test's own `var` replaces this one.
            env: vec![(
                "ORCH_DEPLOY_TARGETS_JSON".to_owned(),
                crate::trivial_deploy_targets(),
            )],
        }
    }

    /// Puts every service on the PostgreSQL database at `url`.
    pub fn postgres(mut self, url: impl Into<String>) -> Self {
        self.database_url = Some(url.into());
        self
    }

    /// Runs `n` launcher processes on one queue.
    pub fn launchers(mut self, n: usize) -> Self {
        self.launcher_replicas = n.max(1);
        self
    }

    /// Starts only `parts`.
    pub fn parts(mut self, parts: &[ServiceName]) -> Self {
        self.parts = parts.to_vec();
        self
    }

    /// Adds a variable for every process.
    pub fn var(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }
}

/// One process of the stack.
#[derive(Debug)]
struct Proc {
    service: ServiceName,
    addr: SocketAddr,
    /// Variables of this process alone (a launcher replica's work dir and instance id).
    own_env: Vec<(String, String)>,
    log: PathBuf,
    child: Option<Child>,
}

/// A running multi-process stack. Dropping it SIGKILLs every process.
#[derive(Debug)]
pub struct ProcStack {
    spec: ProcStackSpec,
    /// By name: the service's name (`stage-engine`), a launcher's `launcher-<i>`.
    procs: BTreeMap<String, Proc>,
    /// Every process's address variables and URLs.
    shared_env: Vec<(String, String)>,
}

/// Returns a port that was free a moment ago on 127.0.0.1.
fn free_addr() -> Result<SocketAddr, String> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))
}

/// The name of the `i`th launcher replica.
pub fn launcher_name(i: usize) -> String {
    format!("launcher-{i}")
}

impl ProcStack {
    /// Starts every process and waits until each has printed `ready`. The first launcher
    /// starts (and migrates the queue) before the other replicas.
    ///
    /// The ports are found free and then released for the process to bind: another test
    /// can take one in between. A stack that loses that race is torn down and started
    /// again on new ports (three tries), rather than failing the test.
    pub async fn start(spec: ProcStackSpec) -> Result<ProcStack, String> {
        let mut tries = 0;
        loop {
            tries += 1;
            match Self::start_once(spec.clone()).await {
                Err(e) if tries < 3 && e.contains("Address already in use") => {
                    eprintln!("a port was taken before its process bound it; starting again: {e}");
                }
                other => return other,
            }
        }
    }

    async fn start_once(spec: ProcStackSpec) -> Result<ProcStack, String> {
        let logs = spec.dir.join("logs");
        std::fs::create_dir_all(&logs)
            .map_err(|e| format!("cannot create {}: {e}", logs.display()))?;
        let mut procs = BTreeMap::new();
        let mut shared_env = Vec::new();
        for &service in &spec.parts {
            let replicas = if service == ServiceName::Launcher {
                spec.launcher_replicas.max(1)
            } else {
                1
            };
            for i in 0..replicas {
                let addr = free_addr()?;
                let name = if service == ServiceName::Launcher {
                    launcher_name(i)
                } else {
                    service.as_str().to_owned()
                };
                let mut own_env = Vec::new();
                if service == ServiceName::Launcher {
                    let work = spec.dir.join(&name).join("work");
                    own_env.push(("ORCH_WORKDIR".to_owned(), work.display().to_string()));
                    own_env.push(("ORCH_LAUNCHER_INSTANCE_ID".to_owned(), name.clone()));
                }
                own_env.push((service.addr_var().to_owned(), addr.to_string()));
                if i == 0 {
                    // Peers reach the first replica; every replica serves the same queue.
                    shared_env.push((url_var(service), format!("http://{addr}")));
                }
                procs.insert(
                    name.clone(),
                    Proc {
                        service,
                        addr,
                        own_env,
                        log: logs.join(format!("{name}.log")),
                        child: None,
                    },
                );
            }
        }
        let mut stack = ProcStack {
            spec,
            procs,
            shared_env,
        };
        let (first, rest): (Vec<String>, Vec<String>) = stack
            .names()
            .into_iter()
            .partition(|n| !n.starts_with("launcher-") || *n == launcher_name(0));
        for batch in [first, rest] {
            let mut waiting = Vec::new();
            for name in batch {
                waiting.push((name.clone(), stack.spawn(&name)?));
            }
            for (name, offset) in waiting {
                stack.wait_ready(&name, offset).await?;
            }
        }
        Ok(stack)
    }

    /// The names of the processes, sorted.
    pub fn names(&self) -> Vec<String> {
        self.procs.keys().cloned().collect()
    }

    /// Where process `name` listens.
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.procs
            .get(name)
            .unwrap_or_else(|| panic!("no process named {name}"))
            .addr
    }

    /// The URL the stack's peers use for `service` (the first launcher for the launcher).
    pub fn url(&self, service: ServiceName) -> String {
        let var = url_var(service);
        self.shared_env
            .iter()
            .find(|(k, _)| *k == var)
            .map(|(_, v)| v.clone())
            .unwrap_or_else(|| panic!("{service} is not part of this stack"))
    }

    /// The variables that point a client (or an `orchestrator item` command) at this stack.
    pub fn client_env(&self) -> Vec<(String, String)> {
        self.shared_env.clone()
    }

    /// The pid of process `name`, while it runs.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs
            .get(name)
            .and_then(|p| p.child.as_ref())
            .map(Child::id)
    }

    /// Whether process `name` is running (it may have exited on its own).
    pub fn is_running(&mut self, name: &str) -> bool {
        match self.procs.get_mut(name).and_then(|p| p.child.as_mut()) {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// The log of process `name` so far.
    pub fn log(&self, name: &str) -> String {
        let path = &self.procs[name].log;
        std::fs::read_to_string(path).unwrap_or_default()
    }

    /// The log files, by process name (for a failing test to print).
    pub fn log_paths(&self) -> BTreeMap<String, PathBuf> {
        self.procs
            .iter()
            .map(|(n, p)| (n.clone(), p.log.clone()))
            .collect()
    }

    /// SIGKILLs process `name` and reaps it. A process already gone is not an error.
    pub fn kill(&mut self, name: &str) {
        self.signal_and_reap(name, libc::SIGKILL, Duration::from_secs(10));
    }

    /// SIGTERMs process `name` and waits (up to `limit`) for it to exit; SIGKILL after.
    /// Returns its exit code when it exited on its own.
    pub fn stop(&mut self, name: &str, limit: Duration) -> Option<i32> {
        self.signal_and_reap(name, libc::SIGTERM, limit)
    }

    /// Starts process `name` again, on its address, and waits until it is ready.
    pub async fn restart(&mut self, name: &str) -> Result<(), String> {
        if self.is_running(name) {
            return Err(format!("{name} is still running"));
        }
        let offset = self.spawn(name)?;
        self.wait_ready(name, offset).await
    }

    /// SIGTERMs every process and waits for each.
    pub fn stop_all(&mut self, limit: Duration) {
        for name in self.names() {
            self.stop(&name, limit);
        }
    }

    fn signal_and_reap(&mut self, name: &str, signal: i32, limit: Duration) -> Option<i32> {
        let proc = self
            .procs
            .get_mut(name)
            .unwrap_or_else(|| panic!("no process named {name}"));
        let mut child = proc.child.take()?;
        if let Ok(Some(status)) = child.try_wait() {
            return status.code();
        }
        let pid = i32::try_from(child.id()).expect("pid fits i32");
        // SAFETY: signalling our own child, whose pid is not reaped yet.
        unsafe { libc::kill(pid, signal) };
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            if start.elapsed() > limit {
                let _ = child.kill();
                let _ = child.wait();
                return None;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Spawns process `name`; returns where its log stood, so that `wait_ready` reads only
    /// this run's lines.
    fn spawn(&mut self, name: &str) -> Result<u64, String> {
        let proc = &self.procs[name];
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&proc.log)
            .map_err(|e| format!("cannot open {}: {e}", proc.log.display()))?;
        let offset = log.metadata().map(|m| m.len()).unwrap_or(0);
        let err = log
            .try_clone()
            .map_err(|e| format!("cannot share {}: {e}", proc.log.display()))?;
        let mut cmd = Command::new(&self.spec.bin);
        for (k, _) in std::env::vars_os() {
            if let Some(k) = k.to_str()
                && SCRUBBED_PREFIXES.iter().any(|p| k.starts_with(p))
            {
                cmd.env_remove(k);
            }
        }
        cmd.current_dir(&self.spec.dir)
            .arg("serve")
            .arg(proc.service.as_str())
            .env("ORCH_DATA_DIR", self.spec.dir.join("var"))
            // The checkout's prompts, unless the test gives its own: the launcher refuses to
            // start without a prompt for every role.
            .env("ORCH_AGENTS_DIR", crate::examples_agents_dir())
            .env("ORCH_LOG_FORMAT", "text")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(err));
        if let Some(url) = &self.spec.database_url {
            cmd.env("ORCH_DATABASE_URL", url);
        }
        cmd.envs(self.shared_env.iter().map(|(k, v)| (k, v)));
        cmd.envs(self.spec.env.iter().map(|(k, v)| (k, v)));
        cmd.envs(proc.own_env.iter().map(|(k, v)| (k, v)));
        let child = cmd
            .spawn()
            .map_err(|e| format!("cannot start {} {name}: {e}", self.spec.bin.display()))?;
        self.procs
            .get_mut(name)
            .expect("known")
            .child
            .replace(child);
        Ok(offset)
    }

    async fn wait_ready(&mut self, name: &str, offset: u64) -> Result<(), String> {
        let path = self.procs[name].log.clone();
        let start = Instant::now();
        loop {
            let text = read_from(&path, offset);
            if text.lines().any(|l| l.starts_with("ready")) {
                return Ok(());
            }
            if !self.is_running(name) {
                return Err(format!("{name} exited before it was ready:\n{text}"));
            }
            if start.elapsed() > READY_LIMIT {
                self.kill(name);
                return Err(format!(
                    "{name} was not ready within {READY_LIMIT:?}:\n{text}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for ProcStack {
    fn drop(&mut self) {
        for proc in self.procs.values_mut() {
            if let Some(mut child) = proc.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
    }
}

fn read_from(path: &Path, offset: u64) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path)
        && f.seek(SeekFrom::Start(offset)).is_ok()
    {
        let _ = f.read_to_string(&mut text);
    }
    text
}
