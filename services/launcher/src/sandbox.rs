//! The agent's sandbox (ARCHITECTURE §3.13): bubblewrap around the agent process itself,
//! whatever `ORCH_AGENT_COMMAND` is, so that a wrong model or a prompt injection in a
//! repository cannot reach what the orchestrator keeps.
//!
//! Inside, the agent has its own PID namespace (a fresh `/proc`: no `/proc/<launcher>/environ`),
//! its checkout read-write, a private `/tmp` and `HOME` (the job's `home/`, where the CLI keeps
//! `~/.claude`), the rest of the file system read-only, and hidden under empty tmpfs: the
//! orchestrator's data and work directories (databases, the local forge, every other job),
//! its `.env`, `/root`, `/home` and `/run` (sockets: a container engine's, PostgreSQL's). What
//! the run needs from the hidden places is bound back, exactly: the checkout, the job's home,
//! the Stop hook's state file, the prompt file, and the agent's own program.
//!
//! `ORCH_AGENT_SANDBOX=auto|required|off` (default `auto`): `auto` sandboxes where bubblewrap
//! works and otherwise says so once at start-up and in `QueueSnapshot`; `required` refuses to
//! launch an LLM job without it; `off` runs agents bare.

use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use orchestrator_kit::{ConfigError, Env};

/// `ORCH_AGENT_SANDBOX`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxMode {
    /// Sandboxed where bubblewrap works; loud where it does not.
    Auto,
    /// No LLM job is launched without the sandbox.
    Required,
    /// Agents run bare (only when an operator says so).
    Off,
}

impl SandboxMode {
    fn parse(raw: &str) -> Result<Self, String> {
        match raw.trim().to_ascii_lowercase().as_str() {
            "auto" | "" => Ok(SandboxMode::Auto),
            "required" => Ok(SandboxMode::Required),
            "off" => Ok(SandboxMode::Off),
            other => Err(format!(
                "invalid value '{other}': expected auto, required or off"
            )),
        }
    }
}

/// `ORCH_AGENT_SANDBOX_NETWORK`: the sandbox's network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetworkMode {
    /// The host's network namespace: every host, and the services' loopback ports.
    Shared,
    /// Its own network namespace: only the model API and the profile's `network` hosts,
    /// through the launcher's egress proxy ([`crate::egress`]).
    Isolated,
}

/// The loopback port inside an isolated sandbox where the egress proxy answers
/// (`HTTPS_PROXY`, `HTTP_PROXY`).
pub const PROXY_PORT: u16 = 18080;

/// How an isolated run reaches out: the proxy's socket, the hosts it lets through, and the
/// loopback ports (the model API's, when it is on loopback) forwarded to it as they are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPlan {
    pub socket: PathBuf,
    pub allow: crate::egress::AllowList,
    pub forwards: Vec<u16>,
}

impl EgressPlan {
    /// The plan for a run whose model API is `model_url` (the agent's `ANTHROPIC_BASE_URL`,
    /// default `https://api.anthropic.com`) and whose profile allows `network`.
    pub fn new(socket: PathBuf, model_url: Option<&str>, network: &[String]) -> EgressPlan {
        let url = model_url.unwrap_or("https://api.anthropic.com");
        let mut allow = network.to_vec();
        let mut forwards = Vec::new();
        if let Some((host, port)) = crate::egress::host_port(url) {
            let loopback = matches!(host.as_str(), "127.0.0.1" | "localhost" | "::1");
            if loopback && url.starts_with("http://") && port != PROXY_PORT {
                forwards.push(port);
            }
            allow.push(host);
        }
        EgressPlan {
            socket,
            allow: crate::egress::AllowList(allow),
            forwards,
        }
    }
}

/// Whether agents run sandboxed on this machine.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Availability {
    /// bubblewrap works: every agent runs inside it.
    On,
    /// The mode wants it and bubblewrap does not work here: why.
    Unavailable(String),
    /// `ORCH_AGENT_SANDBOX=off`.
    Off,
}

/// The sandbox's settings, and (once probed) whether it works here.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub mode: SandboxMode,
    /// `ORCH_AGENT_SANDBOX_BWRAP`: the bubblewrap binary (default `bwrap`, looked up on PATH).
    pub bwrap: String,
    /// What the agent never sees (tmpfs over a directory, `/dev/null` over a file): the
    /// orchestrator's own places, the homes, `/run`, and `ORCH_AGENT_SANDBOX_HIDE`.
    pub hidden: Vec<PathBuf>,
    /// `ORCH_AGENT_SANDBOX_READ_ONLY`: paths inside a hidden place an agent may still read
    /// (a toolchain under `/root`, say).
    pub read_only: Vec<PathBuf>,
    /// `ORCH_AGENT_SANDBOX_NETWORK`: `auto` (default: `isolated` where socat is installed,
    /// else `shared`), `shared` or `isolated`.
    pub network: NetworkMode,
    availability: Arc<OnceLock<(Availability, Option<PathBuf>)>>,
}

/// Places hidden on every machine: every home, and `/run` (its sockets reach services
/// that no file permission guards from root: a container engine, PostgreSQL's peer auth).
pub const ALWAYS_HIDDEN: [&str; 3] = ["/root", "/home", "/run"];

fn csv_paths(env: &Env, name: &str) -> Result<Vec<PathBuf>, ConfigError> {
    let mut out = Vec::new();
    for p in env.get(name).unwrap_or_default().split(',') {
        let p = p.trim();
        if p.is_empty() {
            continue;
        }
        if !p.starts_with('/') {
            return Err(ConfigError::new(
                name,
                format!("'{p}' is not an absolute path"),
            ));
        }
        out.push(PathBuf::from(p));
    }
    Ok(out)
}

impl SandboxConfig {
    /// Reads `ORCH_AGENT_SANDBOX`, `ORCH_AGENT_SANDBOX_BWRAP`, `ORCH_AGENT_SANDBOX_HIDE` and
    /// `ORCH_AGENT_SANDBOX_READ_ONLY`; `own` are the orchestrator's places to hide (data
    /// dir, work dir, local forge).
    pub fn from_env(env: &Env, own: &[PathBuf]) -> Result<Self, ConfigError> {
        let mode = SandboxMode::parse(env.get("ORCH_AGENT_SANDBOX").unwrap_or("auto"))
            .map_err(|e| ConfigError::new("ORCH_AGENT_SANDBOX", e))?;
        let bwrap = env
            .get("ORCH_AGENT_SANDBOX_BWRAP")
            .map(str::trim)
            .filter(|b| !b.is_empty())
            .unwrap_or("bwrap")
            .to_owned();
        let mut hidden: Vec<PathBuf> = ALWAYS_HIDDEN.iter().map(PathBuf::from).collect();
        hidden.extend(own.iter().cloned());
        // The orchestrator's configuration where it was started (`orchestrator up` reads
        // ./.env), and the launcher's own HOME wherever it is.
        if let Ok(here) = std::env::current_dir() {
            hidden.push(here.join(".env"));
        }
        if let Some(home) = env
            .get("HOME")
            .map(str::to_owned)
            .or_else(|| std::env::var("HOME").ok())
            && home.starts_with('/')
            && home != "/"
        {
            hidden.push(PathBuf::from(home));
        }
        hidden.extend(csv_paths(env, "ORCH_AGENT_SANDBOX_HIDE")?);
        let network = match env
            .get("ORCH_AGENT_SANDBOX_NETWORK")
            .map(|v| v.trim().to_ascii_lowercase())
            .as_deref()
        {
            // `auto` (the default): isolated wherever it can work, i.e. where socat (the
            // bridge to the egress proxy inside the sandbox) is installed; said once when not.
            None | Some("" | "auto") => {
                // The agent command's search path (`LauncherConfig::search_path`).
                let path = env
                    .get("PATH")
                    .map(str::to_owned)
                    .or_else(|| std::env::var("PATH").ok());
                if crate::preflight::find_command("socat", path.as_deref()).is_some() {
                    NetworkMode::Isolated
                } else {
                    tracing::warn!(
                        "ORCH_AGENT_SANDBOX_NETWORK=auto: socat (Debian package `socat`) is not \
                         installed, so agents share the host's network (every host, and the \
                         services' loopback ports): install socat, or set ORCH_INTERNAL_TOKEN"
                    );
                    NetworkMode::Shared
                }
            }
            Some("shared") => NetworkMode::Shared,
            Some("isolated") => NetworkMode::Isolated,
            Some(other) => {
                return Err(ConfigError::new(
                    "ORCH_AGENT_SANDBOX_NETWORK",
                    format!("invalid value '{other}': expected auto, shared or isolated"),
                ));
            }
        };
        Ok(SandboxConfig {
            mode,
            bwrap,
            hidden: dedup(hidden),
            read_only: csv_paths(env, "ORCH_AGENT_SANDBOX_READ_ONLY")?,
            network,
            availability: Arc::new(OnceLock::new()),
        })
    }

    /// Whether agents run sandboxed here; probes bubblewrap once (the first call, at
    /// start-up) and says so at WARN when the mode wants it and it does not work.
    pub fn availability(&self, search_path: Option<&str>) -> Availability {
        self.probed(search_path).0.clone()
    }

    fn probed(&self, search_path: Option<&str>) -> &(Availability, Option<PathBuf>) {
        self.availability.get_or_init(|| {
            if self.mode == SandboxMode::Off {
                tracing::warn!("ORCH_AGENT_SANDBOX=off: agents run without a sandbox and can read what the launcher can");
                return (Availability::Off, None);
            }
            let Some(bwrap) = crate::preflight::find_command(&self.bwrap, search_path) else {
                let why = format!(
                    "{} (bubblewrap, Debian package `bubblewrap`) is not installed",
                    self.bwrap
                );
                warn_unavailable(self.mode, &why);
                return (Availability::Unavailable(why), None);
            };
            match probe(&bwrap) {
                Ok(()) => {
                    tracing::info!(bwrap = %bwrap.display(), "agents run in a bubblewrap sandbox");
                    (Availability::On, Some(bwrap))
                }
                Err(why) => {
                    warn_unavailable(self.mode, &why);
                    (Availability::Unavailable(why), None)
                }
            }
        })
    }

    /// What a launch does about the sandbox: `Ok(Some(bwrap))` wraps the agent,
    /// `Ok(None)` runs it bare (off, or auto where unavailable), `Err` refuses it
    /// (`required` where unavailable).
    pub fn for_launch(&self, search_path: Option<&str>) -> Result<Option<PathBuf>, String> {
        match self.probed(search_path) {
            (Availability::On, bwrap) => Ok(bwrap.clone()),
            (Availability::Off, _) => Ok(None),
            (Availability::Unavailable(why), _) => match self.mode {
                SandboxMode::Required => Err(format!(
                    "ORCH_AGENT_SANDBOX=required and the sandbox does not work here: {why}"
                )),
                _ => Ok(None),
            },
        }
    }
}

fn warn_unavailable(mode: SandboxMode, why: &str) {
    match mode {
        SandboxMode::Required => tracing::error!(
            reason = why,
            "ORCH_AGENT_SANDBOX=required and the sandbox does not work here: no LLM job will be launched"
        ),
        _ => tracing::warn!(
            reason = why,
            "the agent sandbox is unavailable: agents run WITHOUT it and can read what the launcher can (ORCH_AGENT_SANDBOX=required refuses that)"
        ),
    }
}

fn dedup(mut v: Vec<PathBuf>) -> Vec<PathBuf> {
    let mut seen = Vec::new();
    v.retain(|p| {
        let new = !seen.contains(p);
        if new {
            seen.push(p.clone());
        }
        new
    });
    v
}

/// The options every sandbox starts with, also the probe's: every namespace bubblewrap
/// can unshare, the agent dies with its launcher, the root file system read-only with a
/// fresh `/proc` (the PID namespace's own) and a minimal `/dev` whose `/dev/tty` is
/// `/dev/null`. Not `--new-session`: the agent must stay in the process group the watchdog
/// signals (SIGTERM first, so that it can stop cleanly); the controlling terminal a
/// launcher started by hand has (TIOCSTI) is out of reach without `/dev/tty`, since the
/// agent's stdin, stdout and stderr are files.
const BASE: [&str; 12] = [
    "--unshare-all",
    "--die-with-parent",
    "--ro-bind",
    "/",
    "/",
    "--proc",
    "/proc",
    "--dev",
    "/dev",
    "--ro-bind",
    "/dev/null",
    "/dev/tty",
];

/// Runs `true` in the sandbox's base: whether bubblewrap works on this machine (it needs
/// user namespaces, or root).
pub fn probe(bwrap: &Path) -> Result<(), String> {
    let mut child = std::process::Command::new(bwrap)
        .args(BASE)
        .arg("true")
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", bwrap.display()))?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                let mut err = String::new();
                if let Some(mut e) = child.stderr.take() {
                    use std::io::Read;
                    let _ = e.read_to_string(&mut err);
                }
                return Err(format!(
                    "{} does not work here ({status}): {}",
                    bwrap.display(),
                    err.trim()
                ));
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!("{} did not answer within 10 s", bwrap.display()));
            }
            Err(e) => return Err(format!("cannot wait for {}: {e}", bwrap.display())),
        }
    }
}

/// One run's places: what is bound into its sandbox.
#[derive(Debug, Clone)]
pub struct Jail {
    /// The bubblewrap binary.
    pub bwrap: PathBuf,
    /// The checkout, read-write, and the agent's working directory.
    pub checkout: PathBuf,
    /// The job's private HOME, read-write (created before the spawn).
    pub home: PathBuf,
    /// Files the run writes outside the checkout (the Stop hook's state file).
    pub writable_files: Vec<PathBuf>,
    /// Files the run reads outside the checkout (the prompt file).
    pub readable_files: Vec<PathBuf>,
    /// Programs the run executes that may live in a hidden place (the agent command's
    /// program and its path arguments, the Stop hook's program).
    pub programs: Vec<PathBuf>,
    /// The directories on the agent's PATH.
    pub path_dirs: Vec<PathBuf>,
    /// Set when the network is isolated: the run's way out.
    pub egress: Option<EgressPlan>,
}

/// The bubblewrap command around `argv`, and the variables the agent gets in place of the
/// launcher's (its HOME and TMPDIR).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrapped {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
}

fn under(p: &Path, dir: &Path) -> bool {
    p != dir && p.starts_with(dir)
}

/// A path as the kernel will resolve it (symlinks followed), when it exists.
fn real(p: &Path) -> Option<PathBuf> {
    std::fs::canonicalize(p).ok()
}

impl Jail {
    /// The places of one run in `job_dir`: `checkout`, the job's `home/`, the Stop hook's
    /// state file, the prompt, and the programs of `command` and of the hook (`hook`, a
    /// command line) as found on `path`.
    #[allow(clippy::too_many_arguments)]
    pub fn for_run(
        bwrap: PathBuf,
        job_dir: &Path,
        checkout: &Path,
        prompt: &Path,
        hook_state: Option<&Path>,
        command: &[String],
        hook: Option<&str>,
        path: Option<&str>,
    ) -> Jail {
        let mut programs: Vec<PathBuf> = Vec::new();
        if let Some(first) = command.first()
            && let Some(p) = crate::preflight::find_command(first, path)
        {
            programs.push(p);
        }
        // A script given by its path (`sh /opt/agents/run.sh`).
        programs.extend(
            command
                .iter()
                .filter(|w| w.starts_with('/'))
                .map(PathBuf::from),
        );
        if let Some(first) = hook
            .and_then(|h| crate::config::split_command(h).ok())
            .and_then(|w| w.into_iter().next())
            && first.starts_with('/')
        {
            programs.push(PathBuf::from(first));
        }
        Jail {
            bwrap,
            checkout: checkout.to_path_buf(),
            home: job_dir.join("home"),
            writable_files: hook_state.map(Path::to_path_buf).into_iter().collect(),
            readable_files: vec![prompt.to_path_buf()],
            programs,
            path_dirs: path
                .unwrap_or_default()
                .split(':')
                .filter(|d| d.starts_with('/'))
                .map(PathBuf::from)
                .collect(),
            egress: None,
        }
    }

    /// Creates what must exist before the spawn: the home and the writable files.
    pub fn prepare(&self) -> std::io::Result<()> {
        std::fs::create_dir_all(&self.home)?;
        for f in &self.writable_files {
            if !f.exists() {
                std::fs::write(f, "")?;
            }
        }
        Ok(())
    }

    /// Builds the bubblewrap command line. Order matters (later mounts cover earlier
    /// ones): the base, the private `/tmp`, the hidden places; then what the run needs from
    /// them read-only (its programs); then the hidden places again where those re-exposed
    /// paths contain one (a data dir below a re-exposed directory stays hidden); last the
    /// job's own places, read-write.
    pub fn wrap(&self, config: &SandboxConfig, argv: &[String]) -> Wrapped {
        let mut a: Vec<String> = vec![self.bwrap.display().to_string()];
        a.extend(BASE.iter().map(|s| (*s).to_owned()));
        // Shared, or its own (only loopback) with the egress proxy as the way out.
        if self.egress.is_none() {
            a.push("--share-net".to_owned());
        }
        a.extend(["--tmpfs".to_owned(), "/tmp".to_owned()]);
        let mut hidden: Vec<PathBuf> = vec![PathBuf::from("/tmp")];
        for h in &config.hidden {
            let Some(r) = real(h) else { continue };
            if hidden.iter().any(|d| r == *d || under(&r, d)) {
                continue;
            }
            hide(&mut a, &r);
            hidden.push(r);
        }
        let is_hidden = |p: &Path| hidden.iter().any(|d| p == d || under(p, d));
        // What the run executes or reads that a hidden place holds, read-only.
        let mut exposed: Vec<PathBuf> = Vec::new();
        let mut expose = |a: &mut Vec<String>, src: &Path, dest: &Path| {
            if !is_hidden(dest) || exposed.iter().any(|e| e == dest || under(dest, e)) {
                return;
            }
            a.extend([
                "--ro-bind".to_owned(),
                src.display().to_string(),
                dest.display().to_string(),
            ]);
            exposed.push(dest.to_path_buf());
        };
        // DNS: /etc/resolv.conf often points into /run.
        if let Some(r) = real(Path::new("/etc/resolv.conf")) {
            expose(&mut a, &r, &r);
        }
        for p in self.programs.iter().chain(&config.read_only) {
            let Some(r) = real(p) else { continue };
            expose(&mut a, &r, &r);
            // Called by the name it was given (a symlink such as node_modules/.bin/claude).
            expose(&mut a, &r, p);
        }
        // A PATH directory in a hidden place is a toolchain's (`~/.pyenv/shims`,
        // `~/.cargo/bin`): its shims need the rest of it, so the directory above it is
        // readable — never a whole home, and never the credentials a toolchain keeps.
        // The places as configured, also those that a hidden ancestor already covers (a
        // home under /tmp): the directory above a PATH dir is never one of them.
        let places: Vec<PathBuf> = config.hidden.iter().filter_map(|h| real(h)).collect();
        let mut tool_roots: Vec<PathBuf> = Vec::new();
        for p in &self.path_dirs {
            let Some(r) = real(p) else { continue };
            if !is_hidden(&r) {
                continue;
            }
            let root = match r.parent() {
                Some(up)
                    if hidden.iter().any(|d| under(up, d)) && !places.iter().any(|d| d == up) =>
                {
                    up.to_path_buf()
                }
                _ => r.clone(),
            };
            expose(&mut a, &root, &root);
            tool_roots.push(root);
        }
        for root in &tool_roots {
            for secret in TOOLCHAIN_SECRETS {
                let f = root.join(secret);
                if f.is_file() {
                    hide(&mut a, &f);
                }
            }
        }
        for h in &config.hidden {
            let Some(r) = real(h) else { continue };
            if exposed.iter().any(|e| under(&r, e)) {
                hide(&mut a, &r);
            }
        }
        for f in &self.readable_files {
            a.extend([
                "--ro-bind".to_owned(),
                f.display().to_string(),
                f.display().to_string(),
            ]);
        }
        for d in std::iter::once(&self.checkout)
            .chain(std::iter::once(&self.home))
            .chain(&self.writable_files)
        {
            a.extend([
                "--bind".to_owned(),
                d.display().to_string(),
                d.display().to_string(),
            ]);
        }
        if let Some(e) = &self.egress {
            let s = e.socket.display().to_string();
            a.extend(["--bind".to_owned(), s.clone(), s]);
        }
        // The tmpfs over each hidden place took the mount points of what was bound into
        // it; read-only now, so that a write there fails instead of vanishing.
        let mut emptied: Vec<&String> = Vec::new();
        for pair in a.windows(2) {
            if pair[0] == "--tmpfs" && pair[1] != "/tmp" && !emptied.contains(&&pair[1]) {
                emptied.push(&pair[1]);
            }
        }
        let remount: Vec<String> = emptied
            .into_iter()
            .flat_map(|d| ["--remount-ro".to_owned(), d.clone()])
            .collect();
        a.extend(remount);
        let mut env = vec![
            ("HOME".to_owned(), self.home.display().to_string()),
            ("TMPDIR".to_owned(), "/tmp".to_owned()),
        ];
        a.extend([
            "--chdir".to_owned(),
            self.checkout.display().to_string(),
            "--".to_owned(),
        ]);
        match &self.egress {
            None => a.extend(argv.iter().cloned()),
            Some(e) => {
                // socat bridges loopback ports inside to the proxy's socket; the agent
                // starts once the proxy's port answers.
                a.extend([
                    "/bin/sh".to_owned(),
                    "-c".to_owned(),
                    bridge_script(e),
                    "orchestrator-egress".to_owned(),
                ]);
                a.extend(argv.iter().cloned());
                let proxy = format!("http://127.0.0.1:{PROXY_PORT}");
                for k in ["HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"] {
                    env.push((k.to_owned(), proxy.clone()));
                }
                env.push(("NO_PROXY".to_owned(), String::new()));
                env.push(("no_proxy".to_owned(), String::new()));
            }
        }
        Wrapped { argv: a, env }
    }
}

/// The shell that starts the socat bridges, waits until the proxy's port answers (at most
/// 2 s), then becomes the agent (`exec "$@"`). The socket path is the job's, validated
/// names only; quoted all the same.
fn bridge_script(e: &EgressPlan) -> String {
    let sock = crate::config::shell_quote(&e.socket.display().to_string());
    let mut s = String::new();
    for port in std::iter::once(PROXY_PORT).chain(e.forwards.iter().copied()) {
        s.push_str(&format!(
            "socat TCP-LISTEN:{port},bind=127.0.0.1,fork,reuseaddr UNIX-CONNECT:{sock} 2>/dev/null &\n"
        ));
    }
    s.push_str(&format!(
        "i=0; while ! socat -u OPEN:/dev/null TCP:127.0.0.1:{PROXY_PORT} 2>/dev/null; do i=$((i+1)); [ $i -ge 200 ] && break; sleep 0.01; done\nexec \"$@\"\n"
    ));
    s
}

/// Files a toolchain root keeps that hold credentials (cargo's registry tokens), hidden even
/// when the root is readable.
const TOOLCHAIN_SECRETS: [&str; 2] = ["credentials.toml", "credentials"];

/// An empty tmpfs over a directory, `/dev/null` over a file.
fn hide(a: &mut Vec<String>, p: &Path) {
    if p.is_dir() {
        a.extend(["--tmpfs".to_owned(), p.display().to_string()]);
    } else {
        a.extend([
            "--ro-bind".to_owned(),
            "/dev/null".to_owned(),
            p.display().to_string(),
        ]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(hidden: &[&Path]) -> SandboxConfig {
        SandboxConfig {
            mode: SandboxMode::Auto,
            bwrap: "bwrap".into(),
            hidden: hidden.iter().map(|p| p.to_path_buf()).collect(),
            read_only: Vec::new(),
            network: NetworkMode::Shared,
            availability: Arc::new(OnceLock::new()),
        }
    }

    /// A directory outside /tmp (which the sandbox hides whole), removed on drop: under
    /// /var/tmp, not the repository's target/, which a CI clone puts under /tmp.
    fn outside_tmp() -> tempfile::TempDir {
        let base = Path::new("/var/tmp/orchestrator-tests");
        std::fs::create_dir_all(base).expect("/var/tmp/orchestrator-tests");
        tempfile::tempdir_in(base).expect("dir")
    }

    /// The (option, path) pairs of a command line, in order.
    fn mounts(argv: &[String]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < argv.len() && argv[i] != "--" {
            match argv[i].as_str() {
                "--tmpfs" | "--chdir" | "--remount-ro" => {
                    out.push((argv[i].clone(), argv[i + 1].clone()));
                    i += 2;
                }
                "--bind" | "--ro-bind" => {
                    out.push((
                        argv[i].clone(),
                        format!("{} -> {}", argv[i + 1], argv[i + 2]),
                    ));
                    i += 3;
                }
                _ => i += 1,
            }
        }
        out
    }

    #[test]
    fn modes_parse_and_a_bad_one_names_the_variable() {
        for (raw, mode) in [
            ("auto", SandboxMode::Auto),
            ("REQUIRED", SandboxMode::Required),
            (" off ", SandboxMode::Off),
        ] {
            let c = SandboxConfig::from_env(&Env::from_pairs([("ORCH_AGENT_SANDBOX", raw)]), &[])
                .expect(raw);
            assert_eq!(c.mode, mode, "{raw}");
        }
        assert_eq!(
            SandboxConfig::from_env(&Env::default(), &[])
                .expect("default")
                .mode,
            SandboxMode::Auto
        );
        let err = SandboxConfig::from_env(&Env::from_pairs([("ORCH_AGENT_SANDBOX", "maybe")]), &[])
            .expect_err("bad");
        assert_eq!(err.var, "ORCH_AGENT_SANDBOX");
        let err = SandboxConfig::from_env(
            &Env::from_pairs([("ORCH_AGENT_SANDBOX_READ_ONLY", "relative/dir")]),
            &[],
        )
        .expect_err("relative");
        assert_eq!(err.var, "ORCH_AGENT_SANDBOX_READ_ONLY");
    }

    #[test]
    fn the_network_is_isolated_by_default_where_socat_is_installed() {
        use std::os::unix::fs::PermissionsExt;
        let with = tempfile::tempdir().expect("bin");
        let socat = with.path().join("socat");
        std::fs::write(&socat, "#!/bin/sh\n").expect("socat");
        std::fs::set_permissions(&socat, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let without = tempfile::tempdir().expect("empty bin");
        let network = |pairs: &[(&str, &str)]| {
            SandboxConfig::from_env(&Env::from_pairs(pairs.iter().copied()), &[])
                .expect("valid")
                .network
        };
        let (w, wo) = (
            with.path().display().to_string(),
            without.path().display().to_string(),
        );
        assert_eq!(network(&[("PATH", &w)]), NetworkMode::Isolated);
        assert_eq!(
            network(&[("PATH", &w), ("ORCH_AGENT_SANDBOX_NETWORK", "auto")]),
            NetworkMode::Isolated
        );
        assert_eq!(network(&[("PATH", &wo)]), NetworkMode::Shared);
        assert_eq!(
            network(&[("PATH", &w), ("ORCH_AGENT_SANDBOX_NETWORK", "shared")]),
            NetworkMode::Shared
        );
        assert_eq!(
            network(&[("PATH", &wo), ("ORCH_AGENT_SANDBOX_NETWORK", "isolated")]),
            NetworkMode::Isolated
        );
        let err = SandboxConfig::from_env(
            &Env::from_pairs([("ORCH_AGENT_SANDBOX_NETWORK", "open")]),
            &[],
        )
        .expect_err("bad");
        assert_eq!(err.var, "ORCH_AGENT_SANDBOX_NETWORK");
    }

    #[test]
    fn the_job_sees_its_own_places_and_nothing_else_of_ours() {
        let root = outside_tmp();
        let root = std::fs::canonicalize(root.path()).expect("real");
        let var = root.join("var");
        let work = var.join("work");
        let job = work.join("jobs/j1");
        let checkout = job.join("checkout");
        std::fs::create_dir_all(&checkout).expect("checkout");
        let tools = root.join("tools");
        std::fs::create_dir_all(tools.join("bin")).expect("tools");
        std::fs::create_dir_all(tools.join("data")).expect("tools data");
        std::fs::write(tools.join("bin/agent"), "").expect("agent");
        let env_file = root.join(".env");
        std::fs::write(&env_file, "GITEA_TOKEN=x\n").expect(".env");
        let jail = Jail {
            bwrap: "/usr/bin/bwrap".into(),
            checkout: checkout.clone(),
            home: job.join("home"),
            writable_files: vec![job.join("qg-hook-blocks-1")],
            readable_files: vec![job.join("prompt-1.md")],
            programs: vec![tools.join("bin/agent")],
            path_dirs: vec![PathBuf::from("/nonexistent/bin")],
            egress: None,
        };
        // `tools` itself is hidden here (as a home would be), its program bound back; the
        // data dir below it stays hidden even so.
        let mut c = config(&[&var, &env_file, &tools, &tools.join("data")]);
        c.read_only = vec![tools.join("bin")];
        let w = jail.wrap(&c, &["agent".to_owned(), "-p".to_owned()]);
        assert_eq!(w.argv[0], "/usr/bin/bwrap");
        for flag in ["--unshare-all", "--die-with-parent", "--proc", "--dev"] {
            assert!(w.argv.contains(&flag.to_owned()), "{flag}");
        }
        assert_eq!(&w.argv[w.argv.len() - 3..], ["--", "agent", "-p"]);
        let d = |p: &Path| p.display().to_string();
        let pair = |src: &Path, dest: &Path| format!("{} -> {}", d(src), d(dest));
        assert_eq!(
            mounts(&w.argv),
            vec![
                ("--ro-bind".into(), "/ -> /".into()),
                ("--ro-bind".into(), "/dev/null -> /dev/tty".into()),
                ("--tmpfs".into(), "/tmp".into()),
                ("--tmpfs".into(), d(&var)),
                ("--ro-bind".into(), format!("/dev/null -> {}", d(&env_file))),
                ("--tmpfs".into(), d(&tools)),
                (
                    "--ro-bind".into(),
                    pair(&tools.join("bin/agent"), &tools.join("bin/agent"))
                ),
                (
                    "--ro-bind".into(),
                    pair(&tools.join("bin"), &tools.join("bin"))
                ),
                (
                    "--ro-bind".into(),
                    pair(&job.join("prompt-1.md"), &job.join("prompt-1.md"))
                ),
                ("--bind".into(), pair(&checkout, &checkout)),
                ("--bind".into(), pair(&job.join("home"), &job.join("home"))),
                (
                    "--bind".into(),
                    pair(&job.join("qg-hook-blocks-1"), &job.join("qg-hook-blocks-1"))
                ),
                ("--remount-ro".into(), d(&var)),
                ("--remount-ro".into(), d(&tools)),
                ("--chdir".into(), d(&checkout)),
            ]
        );
        assert_eq!(
            w.env,
            vec![
                ("HOME".to_owned(), d(&job.join("home"))),
                ("TMPDIR".to_owned(), "/tmp".to_owned())
            ]
        );
    }

    #[test]
    fn a_data_dir_below_a_re_exposed_directory_is_hidden_again() {
        let root = outside_tmp();
        let root = std::fs::canonicalize(root.path()).expect("real");
        let data = root.join("app/var");
        std::fs::create_dir_all(&data).expect("data");
        std::fs::create_dir_all(root.join("work/c")).expect("checkout");
        let jail = Jail {
            bwrap: "bwrap".into(),
            checkout: root.join("work/c"),
            home: root.join("work/h"),
            writable_files: vec![],
            readable_files: vec![],
            programs: vec![],
            path_dirs: vec![],
            egress: None,
        };
        let mut c = config(&[&root, &data]);
        c.read_only = vec![root.join("app")];
        let m = mounts(&jail.wrap(&c, &["a".to_owned()]).argv);
        let pos = |m: &[(String, String)], want: (&str, String)| {
            m.iter()
                .position(|(o, p)| o == want.0 && *p == want.1)
                .unwrap_or_else(|| panic!("{want:?} not in {m:?}"))
        };
        let app = root.join("app").display().to_string();
        let exposed = pos(&m, ("--ro-bind", format!("{app} -> {app}")));
        let rehidden = pos(&m, ("--tmpfs", data.display().to_string()));
        assert!(exposed < rehidden, "{m:?}");
    }

    #[test]
    fn a_toolchain_on_path_in_a_home_is_readable_but_not_the_home_nor_its_credentials() {
        // A home of its own, and one that a hidden ancestor (/tmp) already covers.
        let (outside, inside) = (outside_tmp(), tempfile::tempdir().expect("tempdir"));
        for root in [outside.path(), inside.path()] {
            toolchain_in_a_home(root);
        }
    }

    fn toolchain_in_a_home(root: &Path) {
        let root = std::fs::canonicalize(root).expect("real");
        let home = root.join("home");
        for d in [
            ".pyenv/shims",
            ".pyenv/libexec",
            ".cargo/bin",
            "bin",
            ".ssh",
        ] {
            std::fs::create_dir_all(home.join(d)).expect("dir");
        }
        std::fs::write(home.join(".cargo/credentials.toml"), "token").expect("credentials");
        let jail = Jail {
            bwrap: "bwrap".into(),
            checkout: root.join("c"),
            home: root.join("h"),
            writable_files: vec![],
            readable_files: vec![],
            programs: vec![],
            path_dirs: vec![
                home.join(".pyenv/shims"),
                home.join(".cargo/bin"),
                home.join("bin"),
            ],
            egress: None,
        };
        let m = mounts(&jail.wrap(&config(&[&home]), &["a".to_owned()]).argv);
        let d = |p: &Path| p.display().to_string();
        let ro = |p: &Path| ("--ro-bind".to_owned(), format!("{} -> {}", d(p), d(p)));
        assert!(m.contains(&ro(&home.join(".pyenv"))), "{m:?}");
        assert!(m.contains(&ro(&home.join(".cargo"))), "{m:?}");
        // A PATH dir right in the home: itself, not the home.
        assert!(m.contains(&ro(&home.join("bin"))), "{m:?}");
        assert!(!m.contains(&ro(&home)), "{m:?}");
        assert!(m.contains(&(
            "--ro-bind".to_owned(),
            format!("/dev/null -> {}", d(&home.join(".cargo/credentials.toml")))
        )));
    }
}
