//! The agent process: its environment (scrubbed), its spawn (own process group, stdout and
//! stderr to the run log, the prompt on stdin) and its watchdog (timeout -> SIGTERM to the
//! group, poll for the grace, SIGKILL only if still alive).

use std::fmt;
use std::fs::File;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use orchestrator_kit::Env;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::config::{DEFAULT_PASSTHROUGH, NEVER_PASSED};
use crate::proc::{self, Signal};
use crate::sandbox::{Jail, SandboxConfig};

/// The variables every agent gets from the launcher's environment. Values may be secrets
/// the agent needs (`ANTHROPIC_API_KEY`): `Debug` shows the names only.
#[derive(Clone, Default)]
pub struct AgentEnv(Vec<(String, String)>);

impl fmt::Debug for AgentEnv {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.0.iter().map(|(k, _)| k))
            .finish()
    }
}

/// Families of variables an agent CLI reads for itself.
const PASSED_PREFIXES: [&str; 2] = ["ANTHROPIC_", "CLAUDE_"];

fn never_passed(name: &str) -> bool {
    NEVER_PASSED.iter().any(|p| name.starts_with(p))
}

impl AgentEnv {
    /// Picks the agent's variables from `env` (the configuration: `.env` and the process),
    /// falling back to the process environment: the defaults, `extra` names, and the
    /// `ANTHROPIC_*`/`CLAUDE_*` families — never the orchestrator's, the tracker's, the
    /// forge's or the database's.
    pub fn from_env(env: &Env, extra: &[String]) -> Self {
        let mut vars: Vec<(String, String)> = Vec::new();
        let mut put = |k: &str, v: String| {
            if !never_passed(k) && !vars.iter().any(|(n, _)| n == k) {
                vars.push((k.to_owned(), v));
            }
        };
        for name in DEFAULT_PASSTHROUGH
            .iter()
            .copied()
            .chain(extra.iter().map(String::as_str))
        {
            if let Some(v) = env
                .get(name)
                .map(str::to_owned)
                .or_else(|| std::env::var(name).ok())
            {
                put(name, v);
            }
        }
        for prefix in PASSED_PREFIXES {
            for (k, v) in env.with_prefix(prefix) {
                put(k, v.to_owned());
            }
            for (k, v) in std::env::vars() {
                if k.starts_with(prefix) {
                    put(&k, v);
                }
            }
        }
        vars.sort();
        AgentEnv(vars)
    }

    pub fn vars(&self) -> &[(String, String)] {
        &self.0
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct Launch<'a> {
    /// The command's words, then the flags the launcher adds.
    pub argv: Vec<String>,
    pub cwd: &'a Path,
    /// The prompt, fed on stdin.
    pub prompt: &'a Path,
    pub log: &'a Path,
    pub env: &'a AgentEnv,
    /// Variables describing the job (ORCH_JOB_ID, ...).
    pub job_vars: Vec<(String, String)>,
    /// The sandbox the agent runs in (`None`: bare, as `ORCH_AGENT_SANDBOX` allows).
    pub sandbox: Option<(&'a SandboxConfig, Jail)>,
}

/// Why the agent could not be started; the message names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("command not found: {0}")]
    NotFound(String),
    #[error("cannot run {program}: {source}")]
    Spawn {
        program: String,
        source: std::io::Error,
    },
    #[error("cannot open {what} {path}: {source}")]
    Open {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
}

/// Starts the agent as the leader of its own process group (inside its sandbox when there
/// is one), with only `env` and the job's variables, stdout and stderr appended to the log
/// and the prompt on stdin.
pub fn spawn(l: &Launch<'_>) -> Result<Child, SpawnError> {
    if l.argv.is_empty() {
        return Err(SpawnError::NotFound(String::new()));
    }
    let (argv, sandbox_env) = match &l.sandbox {
        Some((config, jail)) => {
            // Inside the sandbox a missing program is bubblewrap's exit 1; said here as
            // what it is.
            let program = &l.argv[0];
            let path = l.env.vars().iter().find(|(k, _)| k == "PATH");
            let found = if program.contains('/') {
                crate::preflight::find_command(&l.cwd.join(program).display().to_string(), None)
            } else {
                crate::preflight::find_command(program, path.map(|(_, v)| v.as_str()))
            };
            if found.is_none() {
                return Err(SpawnError::NotFound(program.clone()));
            }
            jail.prepare().map_err(|source| SpawnError::Open {
                what: "the sandbox's home",
                path: jail.home.display().to_string(),
                source,
            })?;
            let w = jail.wrap(config, &l.argv);
            (w.argv, w.env)
        }
        None => (l.argv.clone(), Vec::new()),
    };
    let (program, args) = argv.split_first().expect("not empty");
    let open = |what, path: &Path, f: std::io::Result<File>| {
        f.map_err(|source| SpawnError::Open {
            what,
            path: path.display().to_string(),
            source,
        })
    };
    let stdin = open("the prompt", l.prompt, File::open(l.prompt))?;
    let log = open(
        "the log",
        l.log,
        std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(l.log),
    )?;
    let log_err = open("the log", l.log, log.try_clone())?;
    let mut cmd = Command::new(program);
    cmd.args(args)
        .current_dir(l.cwd)
        .env_clear()
        .envs(l.env.vars().iter().map(|(k, v)| (k, v)))
        .envs(l.job_vars.iter().map(|(k, v)| (k, v)))
        .envs(sandbox_env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::from(stdin))
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        // Its own group: one signal reaches everything it starts, and the terminal's ^C
        // (or our own group's signals) never reach it.
        .process_group(0)
        .kill_on_drop(false);
    cmd.spawn().map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            SpawnError::NotFound(program.clone())
        } else {
            SpawnError::Spawn {
                program: program.clone(),
                source,
            }
        }
    })
}

/// How the watch of a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// It exited by itself: the code, or `None` when a signal ended it.
    Exited(Option<i32>),
    /// The watchdog killed it.
    TimedOut,
    /// Someone asked for it to stop (cancel, shutdown, a flip by the reaper).
    Stopped,
}

/// Waits for the agent, killing its group at `timeout` or when `stop` fires. Whatever
/// ends it, stragglers left in its group are killed too.
pub async fn watch(
    child: &mut Child,
    pgid: i32,
    timeout: Duration,
    grace: Duration,
    stop: &CancellationToken,
) -> Ended {
    let ended = tokio::select! {
        status = child.wait() => Ended::Exited(status.ok().and_then(|s| s.code())),
        () = tokio::time::sleep(timeout) => {
            kill_group(pgid, grace, Some(child)).await;
            Ended::TimedOut
        }
        () = stop.cancelled() => {
            // A cancel or a shutdown is waited for: keep it short.
            kill_group(pgid, grace.min(Duration::from_secs(1)), Some(child)).await;
            Ended::Stopped
        }
    };
    // Children it left behind (a background server, a stuck tool) go with it.
    let _ = proc::signal_group(pgid, Signal::Kill);
    ended
}

/// SIGTERM to the group; poll its liveness for `grace`; SIGKILL only if something is still
/// alive. A group that is already gone is not an error. `child`, when given, is reaped as
/// part of the liveness poll (an unreaped leader would look alive).
pub async fn kill_group(pgid: i32, grace: Duration, mut child: Option<&mut Child>) {
    match proc::signal_group(pgid, Signal::Term) {
        Ok(false) => {
            if let Some(c) = child {
                let _ = c.wait().await;
            }
            return;
        }
        Ok(true) => {}
        Err(e) => tracing::warn!(pgid, error = %e, "cannot signal the agent's group"),
    }
    let deadline = Instant::now() + grace;
    loop {
        if let Some(c) = child.as_deref_mut() {
            let _ = c.try_wait();
        }
        if !proc::group_alive(pgid) {
            return;
        }
        if Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    tracing::info!(
        pgid,
        grace_ms = grace.as_millis() as u64,
        "agent still alive after SIGTERM; sending SIGKILL"
    );
    if let Err(e) = proc::signal_group(pgid, Signal::Kill) {
        tracing::warn!(pgid, error = %e, "cannot SIGKILL the agent's group");
    }
    if let Some(c) = child {
        let _ = c.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_never_gets_our_tokens() {
        let env = Env::from_pairs([
            ("PATH", "/usr/bin"),
            ("ORCH_INTERNAL_TOKEN", "internal"),
            ("ORCH_DATABASE_URL", "postgres://u:pw@h/db"),
            ("PLANE_API_TOKEN", "plane"),
            ("PLANE_BOT_TOKEN_ANALYST", "bot"),
            ("GITEA_TOKEN", "gitea"),
            ("ANTHROPIC_API_KEY", "sk-agent"),
            ("CLAUDE_CODE_MAX_RETRIES", "1"),
            ("EXTRA_ONE", "x"),
        ]);
        let agent = AgentEnv::from_env(
            &env,
            &[
                "EXTRA_ONE".into(),
                "GITEA_TOKEN".into(),
                "ORCH_INTERNAL_TOKEN".into(),
            ],
        );
        let names: Vec<&str> = agent.vars().iter().map(|(k, _)| k.as_str()).collect();
        for must in [
            "PATH",
            "ANTHROPIC_API_KEY",
            "CLAUDE_CODE_MAX_RETRIES",
            "EXTRA_ONE",
        ] {
            assert!(names.contains(&must), "{must} missing from {names:?}");
        }
        for value in ["internal", "plane", "bot", "gitea", "pw@h"] {
            assert!(
                !agent.vars().iter().any(|(_, v)| v.contains(value)),
                "{value} leaked"
            );
        }
        assert!(!format!("{agent:?}").contains("sk-agent"));
    }
}
