//! The gateway's section of the configuration, read once at start-up.

use std::time::Duration;

use orchestrator_kit::retry::Backoff;
use orchestrator_kit::{ConfigError, Env, Secret};

/// Everything the gateway reads from the environment. Tests build it with
/// [`GatewayConfig::from_env`] over their own [`Env`], or adjust the fields directly.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// `PLANE_WEBHOOK_SECRET`: the key of `X-Plane-Signature`.
    pub plane_secret: Option<Secret>,
    /// `GITEA_WEBHOOK_SECRET`: the key of `X-Gitea-Signature`.
    pub gitea_secret: Option<Secret>,
    /// `ORCH_WEBHOOK_ALLOW_UNSIGNED`: accept deliveries without a signature (local
    /// development only). A signature that is present is still checked.
    pub allow_unsigned: bool,
    /// `ORCH_GATEWAY_MAX_BODY_BYTES`: larger bodies are refused with 413.
    pub max_body_bytes: usize,
    /// `ORCH_GATEWAY_REQUEST_TIMEOUT_MS`: the whole request, body included.
    pub request_timeout: Duration,
    /// `ORCH_GATEWAY_MAX_CONCURRENT_REQUESTS`: requests handled at once; the rest wait
    /// (unread, in the kernel's socket buffers) until a slot frees or their timeout passes.
    /// With the body limit it bounds the memory a flood can take.
    pub max_concurrent_requests: usize,
    /// `ORCH_GATEWAY_INBOX_RETENTION_DAYS`: applied and ignored deliveries older than this
    /// are deleted (dead letters stay); `None` (0) keeps everything.
    pub retention_days: Option<u32>,
    /// `ORCH_DASHBOARD_TOKEN`: the dashboard's sign-in token; unset, the dashboard answers
    /// only when the gateway listens on a loopback address.
    pub dashboard_token: Option<Secret>,
    pub triggers: Triggers,
    pub repos: RepoMap,
    pub dispatch: DispatchConfig,
}

/// What turns a Plane issue into a work item, and who is a bot.
#[derive(Debug, Clone, Default)]
pub struct Triggers {
    /// `ORCH_PLANE_TRIGGER_STATE`: a state name (case-insensitive) or state id.
    pub state: Option<String>,
    /// `ORCH_PLANE_TRIGGER_LABEL`: a label name (case-insensitive) or label id.
    pub label: Option<String>,
    /// `ORCH_PLANE_BOT_USERS`: Plane accounts (user id, email or display name) whose
    /// `:approved:` never counts: the orchestrator's own bots.
    pub bot_users: Vec<String>,
}

pub use orchestrator_tracker::intake::RepoMap;

/// How the dispatcher retries.
#[derive(Debug, Clone)]
pub struct DispatchConfig {
    /// `ORCH_GATEWAY_DISPATCH_MAX_ATTEMPTS`: attempts on a retryable error before the
    /// delivery becomes a dead letter; 0 (the default) retries for as long as stage-engine
    /// is down, as the outboxes do — an accepted delivery is never given up on an outage.
    pub max_attempts: u32,
    /// `ORCH_GATEWAY_DISPATCH_BACKOFF_BASE_MS` (the first retry's delay; it doubles) and
    /// `ORCH_GATEWAY_DISPATCH_BACKOFF_MAX_MS` (the longest delay between two attempts).
    pub backoff: Backoff,
    /// `ORCH_GATEWAY_DISPATCH_POLL_MS`: how often the dispatcher looks for due retries (a
    /// new delivery wakes it at once).
    pub poll_interval: Duration,
    /// `ORCH_GATEWAY_DISPATCH_BATCH`: deliveries claimed and applied at once (each for a
    /// different work item).
    pub batch: u32,
    /// `ORCH_GATEWAY_DISPATCH_CLAIM_LEASE_MS`: how long a claimed delivery is reserved for
    /// the dispatcher that claimed it. One attempt is cut off at three quarters of it, so a
    /// live dispatcher never outlasts its claim; a gateway killed mid-attempt leaves the
    /// delivery to be picked up again when the lease runs out.
    pub claim_lease: Duration,
    /// `ORCH_GATEWAY_DISPATCH_LINGER_MS`: after applying fewer than a batch of deliveries,
    /// the dispatcher waits this long for more before it claims again, so that a stream is
    /// claimed and recorded together (a few statements per batch rather than per delivery).
    /// A delivery arriving at an idle dispatcher is applied at once; one arriving during a
    /// stream waits at most this much; the 2xx never does.
    pub linger: Duration,
}

impl Default for DispatchConfig {
    fn default() -> Self {
        DispatchConfig {
            max_attempts: 0,
            backoff: Backoff::new(Duration::from_millis(1_000), Duration::from_millis(300_000)),
            poll_interval: Duration::from_millis(500),
            batch: 32,
            claim_lease: Duration::from_secs(15),
            linger: Duration::from_millis(10),
        }
    }
}

impl GatewayConfig {
    /// Reads the gateway's variables; the first bad value is the error.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let max_body_bytes: usize = env.parse("ORCH_GATEWAY_MAX_BODY_BYTES", 1_048_576)?;
        if max_body_bytes == 0 {
            return Err(ConfigError::new(
                "ORCH_GATEWAY_MAX_BODY_BYTES",
                "must be greater than 0",
            ));
        }
        let max_concurrent_requests: usize =
            env.parse("ORCH_GATEWAY_MAX_CONCURRENT_REQUESTS", 64)?;
        if max_concurrent_requests == 0 {
            return Err(ConfigError::new(
                "ORCH_GATEWAY_MAX_CONCURRENT_REQUESTS",
                "must be greater than 0",
            ));
        }
        let max_attempts: u32 = env.parse("ORCH_GATEWAY_DISPATCH_MAX_ATTEMPTS", 0)?;
        let defaults = DispatchConfig::default();
        let dispatch = DispatchConfig {
            max_attempts,
            backoff: Backoff::new(
                ms(env, "ORCH_GATEWAY_DISPATCH_BACKOFF_BASE_MS", 1_000)?,
                ms(env, "ORCH_GATEWAY_DISPATCH_BACKOFF_MAX_MS", 300_000)?,
            ),
            poll_interval: ms(env, "ORCH_GATEWAY_DISPATCH_POLL_MS", 500)?
                .max(Duration::from_millis(10)),
            claim_lease: ms(env, "ORCH_GATEWAY_DISPATCH_CLAIM_LEASE_MS", 15_000)?
                .max(Duration::from_millis(200)),
            batch: env
                .parse("ORCH_GATEWAY_DISPATCH_BATCH", defaults.batch)?
                .clamp(1, 1_000),
            linger: ms(env, "ORCH_GATEWAY_DISPATCH_LINGER_MS", 10)?,
        };
        if dispatch.linger > Duration::from_secs(1) {
            return Err(ConfigError::new(
                "ORCH_GATEWAY_DISPATCH_LINGER_MS",
                "must be at most 1000 (it delays every delivery's application)",
            ));
        }

        // The trigger and the repositories are shared with stage-engine's reconciliation.
        let intake = orchestrator_tracker::intake::Intake::from_env(env)?;

        Ok(GatewayConfig {
            plane_secret: env.secret("PLANE_WEBHOOK_SECRET"),
            gitea_secret: env.secret("GITEA_WEBHOOK_SECRET"),
            allow_unsigned: env.bool("ORCH_WEBHOOK_ALLOW_UNSIGNED", false)?,
            max_body_bytes,
            request_timeout: ms(env, "ORCH_GATEWAY_REQUEST_TIMEOUT_MS", 10_000)?,
            max_concurrent_requests,
            retention_days: Some(env.parse("ORCH_GATEWAY_INBOX_RETENTION_DAYS", 30u32)?)
                .filter(|d| *d > 0),
            dashboard_token: env.secret("ORCH_DASHBOARD_TOKEN"),
            triggers: Triggers {
                state: intake.trigger_state,
                label: intake.trigger_label,
                bot_users: env
                    .get("ORCH_PLANE_BOT_USERS")
                    .unwrap_or_default()
                    .split(',')
                    .map(str::trim)
                    .filter(|u| !u.is_empty())
                    .map(str::to_owned)
                    .collect(),
            },
            repos: intake.repos,
            dispatch,
        })
    }

    /// Says loudly, once at start-up, what would make the gateway refuse or misread
    /// deliveries.
    pub fn warn_at_start(&self) {
        if self.allow_unsigned {
            tracing::warn!(
                "ORCH_WEBHOOK_ALLOW_UNSIGNED=true: UNSIGNED WEBHOOKS ARE ACCEPTED. anyone who can reach \
                 the gateway can create and approve work items. use this for local development only"
            );
        }
        for (var, secret) in [
            ("PLANE_WEBHOOK_SECRET", &self.plane_secret),
            ("GITEA_WEBHOOK_SECRET", &self.gitea_secret),
        ] {
            if secret.is_none() && !self.allow_unsigned {
                tracing::warn!(
                    var,
                    "webhook secret not set: these webhooks are refused (401)"
                );
            }
        }
        if self.repos.default.is_none() && self.repos.by_project.is_empty() {
            tracing::warn!(
                "neither ORCH_PLANE_DEFAULT_REPO nor ORCH_PLANE_PROJECT_REPOS is set: \
                 plane issues cannot become work items (they end as dead letters)"
            );
        }
        if self.triggers.bot_users.is_empty() {
            tracing::warn!(
                "ORCH_PLANE_BOT_USERS is empty: the gateway cannot tell the orchestrator's bots \
                 from humans, so an :approved: by a bot would be passed on"
            );
        }
        if self.triggers.state.is_none() && self.triggers.label.is_none() {
            tracing::warn!("no plane trigger (ORCH_PLANE_TRIGGER_STATE, ORCH_PLANE_TRIGGER_LABEL)");
        }
    }
}

fn ms(env: &Env, name: &str, default: u64) -> Result<Duration, ConfigError> {
    Ok(Duration::from_millis(env.parse(name, default)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_no_configuration() {
        let c = GatewayConfig::from_env(&Env::default()).expect("defaults");
        assert_eq!(c.max_body_bytes, 1_048_576);
        assert!(!c.allow_unsigned);
        assert!(c.plane_secret.is_none());
        assert_eq!(c.triggers.label.as_deref(), Some("orchestrator"));
        assert_eq!(c.triggers.state, None);
        assert_eq!(c.repos.repo_for("p"), None);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("ORCH_GATEWAY_MAX_BODY_BYTES", "big"),
            ("ORCH_GATEWAY_MAX_BODY_BYTES", "0"),
            ("ORCH_WEBHOOK_ALLOW_UNSIGNED", "sometimes"),
            ("ORCH_PLANE_DEFAULT_REPO", "../etc"),
            ("ORCH_PLANE_DEFAULT_REPO", "-x/y"),
            ("ORCH_PLANE_PROJECT_REPOS", "p1"),
            ("ORCH_PLANE_PROJECT_REPOS", "p1=a/b/c"),
            ("ORCH_GATEWAY_DISPATCH_MAX_ATTEMPTS", "-1"),
            ("ORCH_GATEWAY_DISPATCH_LINGER_MS", "5000"),
            ("ORCH_GATEWAY_DISPATCH_LINGER_MS", "-1"),
        ] {
            let err = GatewayConfig::from_env(&Env::from_pairs([(var, value)]))
                .expect_err(&format!("{var}={value}"));
            assert_eq!(err.var, var, "{err}");
        }
    }

    #[test]
    fn the_project_map_wins_over_the_default() {
        let c = GatewayConfig::from_env(&Env::from_pairs([
            ("ORCH_PLANE_DEFAULT_REPO", "acme/app"),
            ("ORCH_PLANE_PROJECT_REPOS", "p1=acme/one, p2 = acme/two"),
        ]))
        .expect("config");
        assert_eq!(c.repos.repo_for("p1"), Some("acme/one"));
        assert_eq!(c.repos.repo_for("p2"), Some("acme/two"));
        assert_eq!(c.repos.repo_for("p3"), Some("acme/app"));
    }

    #[test]
    fn the_label_trigger_can_be_switched_off() {
        let c = GatewayConfig::from_env(&Env::from_pairs([("ORCH_PLANE_TRIGGER_LABEL", "-")]))
            .expect("config");
        assert_eq!(c.triggers.label, None);
    }

    #[test]
    fn every_variable_read_here_is_in_env_example() {
        let example =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../.env.example"))
                .expect(".env.example");
        let listed: Vec<&str> = example
            .lines()
            .map(|l| l.trim_start_matches('#'))
            .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
            .collect();
        let src = include_str!("config.rs");
        let names: Vec<&str> = src
            .split('"')
            .filter(|w| {
                !["ORCH_", "PLANE_", "GITEA_"].contains(w)
                    && (w.starts_with("ORCH_")
                        || w.starts_with("PLANE_")
                        || w.starts_with("GITEA_"))
                    && w.bytes().all(|b| b.is_ascii_uppercase() || b == b'_')
            })
            .collect();
        assert!(names.len() >= 15, "{names:?}");
        for name in names {
            assert!(
                listed.contains(&name),
                "{name} is missing from .env.example"
            );
        }
    }
}
