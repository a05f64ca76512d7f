//! The launcher's section of the configuration.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use orchestrator_forge::ForgeConfig;
use orchestrator_kit::deploy_target::{DeployTarget, parse_targets};
use orchestrator_kit::outbox::{self, OutboxConfig};
use orchestrator_kit::{ConfigError, Env};

use crate::profiles::Profiles;
use crate::sandbox::SandboxConfig;

/// The agent command when `ORCH_AGENT_COMMAND` is unset: the Claude Code CLI in print mode
/// with JSON output, allowed to edit files in its checkout. The prompt goes on stdin.
pub const DEFAULT_AGENT_COMMAND: &str =
    "claude -p --output-format json --permission-mode acceptEdits";

/// Variables an agent gets from the launcher's environment by default (besides the
/// `ANTHROPIC_*` and `CLAUDE_*` families): what a CLI needs to run, nothing that names a
/// service of ours.
pub const DEFAULT_PASSTHROUGH: [&str; 12] = [
    "PATH",
    "HOME",
    "USER",
    "LOGNAME",
    "SHELL",
    "LANG",
    "LC_ALL",
    "LC_CTYPE",
    "TERM",
    "TMPDIR",
    "TZ",
    "NODE_EXTRA_CA_CERTS",
];

/// Prefixes that never reach an agent, even when listed in `ORCH_AGENT_ENV_PASSTHROUGH`:
/// the orchestrator's own settings and tokens, the tracker's, the forge's, the database's.
pub const NEVER_PASSED: [&str; 5] = ["ORCH_", "PLANE_", "GITEA_", "DATABASE_", "PG"];

/// The quality gate as the agent's Stop hook (`orchestrator qg-hook`, issue #10).
#[derive(Debug, Clone)]
pub struct QgHookConfig {
    /// `ORCH_QG_HOOK_COMMAND`: the hook's command line before its arguments; default this
    /// executable followed by `qg-hook`.
    pub command: String,
    /// `ORCH_QG_HOOK_MAX_BLOCKS`: blocks allowed per run.
    pub max_blocks: u32,
}

/// The launcher's settings.
#[derive(Debug, Clone)]
pub struct LauncherConfig {
    /// `ORCH_LAUNCHER_INSTANCE_ID`: who this launcher is in `jobs.instance_id`. Stable
    /// across restarts (default: host name and a hash of the work directory), so that a
    /// launcher that comes back recognises the jobs of its previous life.
    pub instance_id: String,
    pub host: String,
    /// `ORCH_WORKDIR`: per-job checkouts and logs, `jobs/<job id>/`; default
    /// `<ORCH_DATA_DIR>/work`.
    pub workdir: PathBuf,
    /// `ORCH_AGENTS_DIR`: one prompt file per role, `<role>.md`.
    pub agents_dir: PathBuf,
    /// `ORCH_AGENT_COMMAND`, split into words (quotes group, no shell).
    pub agent_command: Vec<String>,
    /// `PATH` (the agents get it too): where the agent command is looked up.
    pub search_path: Option<String>,
    /// `ORCH_AGENT_ENV_PASSTHROUGH`: extra variable names (CSV) an agent may get.
    pub env_passthrough: Vec<String>,
    /// `ORCH_MAX_CONCURRENCY`: LLM jobs running at once, across every repo and replica.
    pub max_concurrency: u32,
    /// `ORCH_RESERVED_CONCURRENCY`: reserved (no-LLM) jobs in flight per launcher.
    pub reserved_concurrency: u32,
    /// `ORCH_LAUNCHER_LOCAL_QUEUE`: reserved jobs claimed ahead of a free slot and held
    /// here, so that a claim takes a batch rather than one job per ended run (0: claim only
    /// for a free slot). Held jobs are this instance's runs (heartbeated, handed back at
    /// shutdown); LLM jobs are never held: a held one would sit on a global LLM slot.
    pub local_queue: u32,
    /// `ORCH_LAUNCHER_POLL_MS`: the fallback poll of the queue (an enqueue or a finished
    /// job wakes the dispatcher at once).
    pub poll: Duration,
    /// `ORCH_LAUNCHER_HEARTBEAT_MS`: how often this instance and its live jobs heartbeat.
    pub heartbeat: Duration,
    /// `ORCH_LAUNCHER_INSTANCE_STALE_MS`: an instance silent this long counts as gone.
    pub instance_stale: Duration,
    /// `ORCH_AGENT_TIMEOUT_SECONDS`.
    pub agent_timeout: Duration,
    /// `ORCH_AGENT_TIMEOUT_OVERRIDES_JSON`, e.g. `{"reviewer":3600}`.
    pub timeout_overrides: BTreeMap<String, Duration>,
    /// `ORCH_AGENT_KILL_GRACE_SECONDS`: SIGTERM to SIGKILL.
    pub kill_grace: Duration,
    /// `ORCH_MAX_ATTEMPTS`: permanent failures a job may have before it is failed.
    pub max_attempts: u32,
    /// `ORCH_MAX_TRANSIENT_ATTEMPTS`: transient failures (429, 529) before it is failed.
    pub max_transient_attempts: u32,
    /// `ORCH_BACKOFF_BASE_S` / `ORCH_BACKOFF_MAX_S`: `min(2^n * base, max)`, with jitter.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// `ORCH_BREAKER_THRESHOLD`: consecutive transient outcomes that open the breaker (0: never).
    pub breaker_threshold: u32,
    /// `ORCH_BREAKER_COOLDOWN_S`.
    pub breaker_cooldown: Duration,
    /// `ORCH_NOTIFY_BREAKER_OPEN_S` (300; 0: off): an opening of the breaker that lasts
    /// longer is told to people, once (`breaker_watch`).
    pub notify_breaker_open: Option<Duration>,
    /// `ORCH_WORK_ITEM_BUDGET_USD`: what one work item may spend; none when unset.
    pub work_item_budget_usd: Option<f64>,
    /// The spending ceilings (`ORCH_BUDGET_*`), checked before every LLM launch.
    pub ceilings: crate::ceilings::Ceilings,
    /// `ORCH_QG_HOOK_ENABLED` (default true) and its settings.
    pub qg_hook: Option<QgHookConfig>,
    /// `ORCH_LAUNCHER_GIT`: check out the branch, then commit, push and ensure the PR.
    /// false: agents run in an empty per-job directory and nothing is committed.
    pub git: bool,
    /// `ORCH_GIT_TIMEOUT_S`: one git invocation.
    pub git_timeout: Duration,
    /// `ORCH_DEPLOY_LEASE_ENABLED`: deploy jobs hold the repo's merge lease.
    pub deploy_lease: bool,
    /// `ORCH_LEASE_RETRY_S`: how long a deploy job waits when another holds the lease.
    pub lease_retry: Duration,
    /// `ORCH_RESUME_MAX_AGE_S`: a retry of the same agent on the same stage resumes the
    /// previous run's CLI session when it is at most this old; 0: never (see
    /// [`crate::resume`]).
    pub resume_max_age: Duration,
    pub forge: ForgeConfig,
    /// `ORCH_LAUNCHER_OUTBOX_POLL_MS`, `ORCH_LAUNCHER_OUTBOX_BACKOFF_BASE_MS`,
    /// `ORCH_LAUNCHER_OUTBOX_BACKOFF_MAX_MS`: how the end of a run (RecordRun, the finish
    /// comment, AdvanceStage or ReportJobFailed) reaches the peers — for as long as they
    /// are down, never given up on (no attempt limit).
    pub outbox: OutboxConfig,
    /// `ORCH_TEST_FAILPOINT`: where the launcher kills itself, for the fault tests only;
    /// `None` (unset) in every real deployment.
    pub failpoint: Option<Failpoint>,
    /// `ORCH_AGENT_SANDBOX` and its settings (see [`crate::sandbox`]).
    pub sandbox: SandboxConfig,
    /// The agents' profiles: `ORCH_AGENT_PROFILES`, else `<ORCH_AGENTS_DIR>/profiles.toml`,
    /// else the shipped ones (see [`crate::profiles`]).
    pub profiles: Profiles,
    /// `ORCH_DEPLOY_TARGETS_JSON`: per repo, the staging and deploy commands the launcher
    /// runs after the deployer's run (see [`crate::deploy`]); `None` when unset.
    pub deploy_targets: Option<BTreeMap<String, DeployTarget>>,
}

/// A point in a run where a fault test makes the launcher die by SIGKILL — a real signal,
/// so the test sees what a crash at that point leaves behind. Inert unless
/// `ORCH_TEST_FAILPOINT` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failpoint {
    /// `launcher.before_finalize`: right after the agent's exit code is recorded, before
    /// anything of the finalize (usage, classification, delivery, the job's end).
    BeforeFinalize,
}

impl Failpoint {
    /// Every failpoint, by the name `ORCH_TEST_FAILPOINT` takes.
    pub const ALL: [(&'static str, Failpoint); 1] =
        [("launcher.before_finalize", Failpoint::BeforeFinalize)];

    fn from_env(env: &Env) -> Result<Option<Failpoint>, ConfigError> {
        let Some(raw) = env.get("ORCH_TEST_FAILPOINT") else {
            return Ok(None);
        };
        let raw = raw.trim();
        Self::ALL
            .iter()
            .find(|(name, _)| *name == raw)
            .map(|(_, f)| Some(*f))
            .ok_or_else(|| {
                ConfigError::new(
                    "ORCH_TEST_FAILPOINT",
                    format!(
                        "unknown failpoint '{raw}' (known: {})",
                        Self::ALL.map(|(n, _)| n).join(", ")
                    ),
                )
            })
    }
}

fn seconds(env: &Env, name: &str, default: f64) -> Result<Duration, ConfigError> {
    let v: f64 = env.parse(name, default)?;
    if !v.is_finite() || v < 0.0 {
        return Err(ConfigError::new(name, "must be a number of seconds >= 0"));
    }
    Ok(Duration::from_secs_f64(v))
}

fn ms(env: &Env, name: &str, default: u64) -> Result<Duration, ConfigError> {
    let v: u64 = env.parse(name, default)?;
    if v == 0 {
        return Err(ConfigError::new(name, "must be at least 1"));
    }
    Ok(Duration::from_millis(v))
}

impl LauncherConfig {
    /// Reads the launcher's variables (and the forge's).
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let data_dir = env.data_dir()?;
        let workdir = env.dir("ORCH_WORKDIR", || data_dir.join("work"))?;
        let host = crate::proc::hostname();
        let instance_id = match env.get("ORCH_LAUNCHER_INSTANCE_ID") {
            Some(id) => {
                let id = id.trim().to_owned();
                if id.len() > 200 || id.chars().any(|c| c.is_control() || c.is_whitespace()) {
                    return Err(ConfigError::new(
                        "ORCH_LAUNCHER_INSTANCE_ID",
                        "at most 200 characters, no spaces",
                    ));
                }
                id
            }
            None => default_instance_id(&host, &workdir),
        };
        let raw_command = env
            .get("ORCH_AGENT_COMMAND")
            .unwrap_or(DEFAULT_AGENT_COMMAND);
        let agent_command =
            split_command(raw_command).map_err(|e| ConfigError::new("ORCH_AGENT_COMMAND", e))?;
        if agent_command.is_empty() {
            return Err(ConfigError::new("ORCH_AGENT_COMMAND", "is empty"));
        }
        let env_passthrough = env
            .get("ORCH_AGENT_ENV_PASSTHROUGH")
            .unwrap_or_default()
            .split(',')
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty())
            .collect();
        let timeout_overrides = match env.get("ORCH_AGENT_TIMEOUT_OVERRIDES_JSON") {
            None => BTreeMap::new(),
            Some(raw) => parse_overrides(raw)
                .map_err(|e| ConfigError::new("ORCH_AGENT_TIMEOUT_OVERRIDES_JSON", e))?,
        };
        let max_concurrency: u32 = env.parse("ORCH_MAX_CONCURRENCY", 1u32)?;
        if max_concurrency == 0 {
            return Err(ConfigError::new(
                "ORCH_MAX_CONCURRENCY",
                "must be at least 1",
            ));
        }
        let reserved_concurrency: u32 = env.parse("ORCH_RESERVED_CONCURRENCY", 8u32)?;
        if reserved_concurrency == 0 {
            return Err(ConfigError::new(
                "ORCH_RESERVED_CONCURRENCY",
                "must be at least 1",
            ));
        }
        let max_attempts: u32 = env.parse("ORCH_MAX_ATTEMPTS", 3u32)?;
        if max_attempts == 0 {
            return Err(ConfigError::new("ORCH_MAX_ATTEMPTS", "must be at least 1"));
        }
        let work_item_budget_usd = match env.get("ORCH_WORK_ITEM_BUDGET_USD") {
            None => None,
            Some(_) => {
                let v: f64 = env.parse("ORCH_WORK_ITEM_BUDGET_USD", 0.0)?;
                if !v.is_finite() || v < 0.0 {
                    return Err(ConfigError::new(
                        "ORCH_WORK_ITEM_BUDGET_USD",
                        "must be a number of dollars >= 0",
                    ));
                }
                Some(v)
            }
        };
        let qg_hook = if env.bool("ORCH_QG_HOOK_ENABLED", true)? {
            let command = match env.get("ORCH_QG_HOOK_COMMAND") {
                Some(c) => c.trim().to_owned(),
                None => {
                    let exe = std::env::current_exe()
                        .map(|p| p.display().to_string())
                        .unwrap_or_else(|_| "orchestrator".to_owned());
                    format!("{} qg-hook", shell_quote(&exe))
                }
            };
            Some(QgHookConfig {
                command,
                max_blocks: env.parse("ORCH_QG_HOOK_MAX_BLOCKS", 3u32)?,
            })
        } else {
            None
        };
        let agent_timeout = seconds(env, "ORCH_AGENT_TIMEOUT_SECONDS", 1800.0)?;
        if agent_timeout.is_zero() {
            return Err(ConfigError::new(
                "ORCH_AGENT_TIMEOUT_SECONDS",
                "must be above 0",
            ));
        }
        let forge = ForgeConfig::from_env(env)?;
        // The orchestrator's own places, hidden from every agent.
        let sandbox = SandboxConfig::from_env(
            env,
            &[data_dir.clone(), workdir.clone(), forge.local_dir.clone()],
        )?;
        let agents_dir = env.dir("ORCH_AGENTS_DIR", || PathBuf::from("./examples/agents"))?;
        let profiles_path = match env.get("ORCH_AGENT_PROFILES") {
            Some(_) => Some(env.dir("ORCH_AGENT_PROFILES", PathBuf::new)?),
            None => Some(agents_dir.join("profiles.toml")).filter(|p| p.is_file()),
        };
        let profiles = Profiles::load(profiles_path.as_deref())
            .map_err(|e| ConfigError::new("ORCH_AGENT_PROFILES", e.to_string()))?;
        Ok(LauncherConfig {
            instance_id,
            host,
            workdir,
            agents_dir,
            agent_command,
            search_path: env
                .get("PATH")
                .map(str::to_owned)
                .or_else(|| std::env::var("PATH").ok()),
            env_passthrough,
            max_concurrency,
            reserved_concurrency,
            local_queue: env.parse("ORCH_LAUNCHER_LOCAL_QUEUE", reserved_concurrency)?,
            poll: ms(env, "ORCH_LAUNCHER_POLL_MS", 1_000)?,
            heartbeat: ms(env, "ORCH_LAUNCHER_HEARTBEAT_MS", 5_000)?,
            instance_stale: ms(env, "ORCH_LAUNCHER_INSTANCE_STALE_MS", 30_000)?,
            agent_timeout,
            timeout_overrides,
            kill_grace: seconds(env, "ORCH_AGENT_KILL_GRACE_SECONDS", 20.0)?,
            max_attempts,
            max_transient_attempts: env.parse("ORCH_MAX_TRANSIENT_ATTEMPTS", 5u32)?,
            backoff_base: seconds(env, "ORCH_BACKOFF_BASE_S", 30.0)?,
            backoff_max: seconds(env, "ORCH_BACKOFF_MAX_S", 900.0)?,
            breaker_threshold: env.parse("ORCH_BREAKER_THRESHOLD", 3u32)?,
            breaker_cooldown: seconds(env, "ORCH_BREAKER_COOLDOWN_S", 300.0)?,
            notify_breaker_open: Some(seconds(env, "ORCH_NOTIFY_BREAKER_OPEN_S", 300.0)?)
                .filter(|d| !d.is_zero()),
            work_item_budget_usd,
            ceilings: crate::ceilings::Ceilings::from_env(env)?,
            qg_hook,
            git: env.bool("ORCH_LAUNCHER_GIT", true)?,
            git_timeout: seconds(env, "ORCH_GIT_TIMEOUT_S", 300.0)?,
            deploy_lease: env.bool("ORCH_DEPLOY_LEASE_ENABLED", true)?,
            lease_retry: seconds(env, "ORCH_LEASE_RETRY_S", 10.0)?,
            resume_max_age: seconds(env, "ORCH_RESUME_MAX_AGE_S", 3600.0)?,
            deploy_targets: match env.get("ORCH_DEPLOY_TARGETS_JSON") {
                None => None,
                Some(raw) => Some(
                    parse_targets(raw)
                        .map_err(|e| ConfigError::new("ORCH_DEPLOY_TARGETS_JSON", e))?,
                ),
            },
            forge,
            outbox: OutboxConfig {
                // A delivery is at most two RPCs (FinishComment, then AddComment) of
                // ORCH_RPC_TIMEOUT_MS (10 s by default) each: a claim of a launcher killed
                // mid-delivery lapses after this, and its run's later effects go on (the
                // kit's default of 120 s would hold them up that long).
                claim_ttl: Duration::from_secs(30),
                ..OutboxConfig::from_env(
                    env,
                    "ORCH_LAUNCHER_OUTBOX_",
                    outbox::Defaults {
                        poll_ms: 1_000,
                        backoff_base_ms: 500,
                        backoff_max_ms: 30_000,
                    },
                )?
            },
            failpoint: Failpoint::from_env(env)?,
            sandbox,
            profiles,
        })
    }

    /// The timeout of `agent`'s runs: `ORCH_AGENT_TIMEOUT_OVERRIDES_JSON`, else its
    /// profile's `timeout_s`, else `ORCH_AGENT_TIMEOUT_SECONDS`.
    pub fn timeout_for(&self, agent: &str) -> Duration {
        self.timeout_overrides
            .get(agent)
            .copied()
            .or_else(|| self.profiles.for_agent(agent).timeout)
            .unwrap_or(self.agent_timeout)
    }

    /// The directory of one job: its checkout, logs, prompt and hook state.
    pub fn job_dir(&self, job_id: &str) -> PathBuf {
        self.workdir.join("jobs").join(job_id)
    }
}

fn default_instance_id(host: &str, workdir: &Path) -> String {
    // FNV-1a: stable across builds and runs (std's hasher is not).
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in workdir.as_os_str().as_encoded_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("{host}-{:08x}", h as u32)
}

fn parse_overrides(raw: &str) -> Result<BTreeMap<String, Duration>, String> {
    let v: serde_json::Value =
        serde_json::from_str(raw).map_err(|e| format!("invalid JSON: {e}"))?;
    let obj = v
        .as_object()
        .ok_or("expected an object of agent -> seconds, e.g. {\"reviewer\":3600}")?;
    let mut out = BTreeMap::new();
    for (agent, secs) in obj {
        let s = secs
            .as_f64()
            .filter(|s| s.is_finite() && *s > 0.0)
            .ok_or_else(|| format!("{agent}: expected a number of seconds above 0"))?;
        out.insert(agent.clone(), Duration::from_secs_f64(s));
    }
    Ok(out)
}

/// Splits a command line into words the way a shell would for plain words, single and
/// double quotes and backslashes — and nothing more: no variables, globs or pipes.
pub fn split_command(raw: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(ch) => cur.push(ch),
                        None => return Err("unclosed single quote".into()),
                    }
                }
            }
            '"' => {
                in_word = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(ch) => cur.push(ch),
                            None => return Err("unclosed double quote".into()),
                        },
                        Some(ch) => cur.push(ch),
                        None => return Err("unclosed double quote".into()),
                    }
                }
            }
            '\\' => {
                in_word = true;
                match chars.next() {
                    Some(ch) => cur.push(ch),
                    None => return Err("a trailing backslash".into()),
                }
            }
            c if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                in_word = true;
                cur.push(c);
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    Ok(words)
}

/// Quotes `s` for a POSIX shell (the CLI runs hook commands through one).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+".contains(c))
    {
        return s.to_owned();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = LauncherConfig::from_env(&Env::default()).expect("defaults");
        assert_eq!(c.max_concurrency, 1);
        assert_eq!(c.agent_timeout, Duration::from_secs(1800));
        assert_eq!(c.kill_grace, Duration::from_secs(20));
        assert_eq!(c.max_attempts, 3);
        assert_eq!(c.work_item_budget_usd, None);
        assert!(c.qg_hook.is_some());
        assert!(c.git && c.deploy_lease);
        assert_eq!(c.agent_command[0], "claude");
        assert!(c.agent_command.contains(&"json".to_owned()));
        assert!(c.workdir.ends_with("var/work"));
        assert!(c.instance_id.starts_with(&c.host));
        assert_eq!(c.failpoint, None, "no failpoint unless a test sets one");
    }

    #[test]
    fn the_failpoint_is_read_by_its_name() {
        let c = LauncherConfig::from_env(&Env::from_pairs([(
            "ORCH_TEST_FAILPOINT",
            "launcher.before_finalize",
        )]))
        .expect("config");
        assert_eq!(c.failpoint, Some(Failpoint::BeforeFinalize));
        let err = LauncherConfig::from_env(&Env::from_pairs([("ORCH_TEST_FAILPOINT", "x")]))
            .expect_err("unknown");
        assert!(
            err.to_string().contains("launcher.before_finalize"),
            "{err}"
        );
    }

    #[test]
    fn overrides_and_fractions() {
        let c = LauncherConfig::from_env(&Env::from_pairs([
            ("ORCH_AGENT_TIMEOUT_OVERRIDES_JSON", r#"{"reviewer":3600}"#),
            ("ORCH_AGENT_KILL_GRACE_SECONDS", "0.25"),
            ("ORCH_WORK_ITEM_BUDGET_USD", "2.5"),
            ("ORCH_QG_HOOK_ENABLED", "false"),
        ]))
        .expect("config");
        assert_eq!(c.timeout_for("reviewer"), Duration::from_secs(3600));
        assert_eq!(c.timeout_for("developer"), Duration::from_secs(1800));
        assert_eq!(c.kill_grace, Duration::from_millis(250));
        assert_eq!(c.work_item_budget_usd, Some(2.5));
        assert!(c.qg_hook.is_none());
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("ORCH_MAX_CONCURRENCY", "0"),
            ("ORCH_MAX_CONCURRENCY", "many"),
            ("ORCH_AGENT_TIMEOUT_SECONDS", "0"),
            ("ORCH_AGENT_TIMEOUT_OVERRIDES_JSON", "[1]"),
            (
                "ORCH_AGENT_TIMEOUT_OVERRIDES_JSON",
                r#"{"reviewer":"long"}"#,
            ),
            ("ORCH_AGENT_KILL_GRACE_SECONDS", "-1"),
            ("ORCH_WORK_ITEM_BUDGET_USD", "lots"),
            ("ORCH_AGENT_COMMAND", "claude 'oops"),
            ("ORCH_MAX_ATTEMPTS", "0"),
            ("ORCH_LAUNCHER_POLL_MS", "0"),
            ("ORCH_QG_HOOK_ENABLED", "maybe"),
            ("ORCH_TEST_FAILPOINT", "launcher.somewhere"),
            ("ORCH_LAUNCHER_OUTBOX_POLL_MS", "0"),
            ("ORCH_LAUNCHER_OUTBOX_BACKOFF_BASE_MS", "soon"),
            ("ORCH_LAUNCHER_OUTBOX_BACKOFF_MAX_MS", "1"),
        ] {
            let err = LauncherConfig::from_env(&Env::from_pairs([(var, value)])).expect_err(var);
            assert_eq!(err.var, var, "{value}");
        }
    }

    #[test]
    fn commands_split_like_a_shell_without_one() {
        for (raw, words) in [
            ("claude -p", vec!["claude", "-p"]),
            ("  a   b  ", vec!["a", "b"]),
            (
                r#"sh -c 'echo "$X"; exit 3'"#,
                vec!["sh", "-c", r#"echo "$X"; exit 3"#],
            ),
            (r#"a "b c" d\ e ''"#, vec!["a", "b c", "d e", ""]),
            ("a $(rm -rf /)", vec!["a", "$(rm", "-rf", "/)"]),
        ] {
            assert_eq!(split_command(raw).expect(raw), words, "{raw}");
        }
        for bad in ["'a", "\"a", "a\\"] {
            assert!(split_command(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_variable_is_in_env_example() {
        let example = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.env.example"),
        )
        .expect(".env.example");
        let source = include_str!("config.rs");
        let mut names: Vec<&str> = source
            .split('"')
            .filter(|w| {
                w.starts_with("ORCH_")
                    && !w.ends_with('_')
                    && w.chars().all(|c| c.is_ascii_uppercase() || c == '_')
            })
            .collect();
        names.sort();
        names.dedup();
        assert!(names.len() > 20, "{names:?}");
        for name in names {
            assert!(
                example.contains(&format!("\n{name}=")) || example.contains(&format!("\n#{name}=")),
                "{name} is missing from .env.example"
            );
        }
        // The default command parses the same from the file as in the code.
        let line = example
            .lines()
            .find(|l| l.starts_with("ORCH_AGENT_COMMAND="))
            .expect("ORCH_AGENT_COMMAND");
        assert_eq!(
            // dotenv takes the quotes off.
            split_command(
                line.trim_start_matches("ORCH_AGENT_COMMAND=")
                    .trim_matches('"')
            )
            .expect("split"),
            split_command(DEFAULT_AGENT_COMMAND).expect("split")
        );
    }

    #[test]
    fn shell_quoting_round_trips() {
        for s in ["plain", "/a b/c", "it's", "", "a;rm -rf /"] {
            let q = shell_quote(s);
            assert_eq!(split_command(&q).expect("split"), vec![s.to_owned()], "{q}");
        }
    }
}
