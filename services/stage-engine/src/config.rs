//! stage-engine's section of the configuration.

use std::time::Duration;

use orchestrator_forge::ForgeConfig;
use orchestrator_kit::outbox;
use orchestrator_kit::{ConfigError, Env};
use orchestrator_tracker::TrackerConfig;

use crate::pipeline::Limits;
use crate::reconcile::ReconcileConfig;

/// How the outbox is delivered: `ORCH_OUTBOX_POLL_MS`, `ORCH_OUTBOX_BACKOFF_BASE_MS`,
/// `ORCH_OUTBOX_BACKOFF_MAX_MS`, and `ORCH_OUTBOX_MAX_ATTEMPTS` (0, the default: retry for
/// as long as the receiver is down).
pub use orchestrator_kit::outbox::OutboxConfig;

/// The stall watchdog's timing.
#[derive(Debug, Clone)]
pub struct WatchdogConfig {
    /// `ORCH_STALL_S`: an active item with no queued or running job for this long is
    /// decided again from its latest job.
    pub stall: Duration,
    /// `ORCH_STALL_CHECK_INTERVAL_S`: how often the watchdog looks.
    pub interval: Duration,
}

/// stage-engine's settings.
#[derive(Debug, Clone)]
pub struct StageEngineConfig {
    pub limits: Limits,
    /// `ORCH_BASE_BRANCH` (read by the forge section): where PRs go.
    pub base_branch: String,
    /// `ORCH_BOT_AUTHORS`: accounts (names or ids, any case) that are bots besides the role
    /// names: their `:approved:` never counts.
    pub bot_authors: Vec<String>,
    /// `ORCH_ARM_POST_DEPLOY`: arm the post-deploy watch on `deploy -> done`.
    pub arm_post_deploy: bool,
    /// `ORCH_TASK_MAX_BYTES`: the size budget of the agent's task (see `task::compose`).
    pub task_max_bytes: usize,
    pub outbox: OutboxConfig,
    pub watchdog: WatchdogConfig,
    pub reconcile: ReconcileConfig,
    pub ci: crate::ci::CiConfig,
    pub notify: crate::notify::NotifyConfig,
    pub tracker: TrackerConfig,
    pub forge: ForgeConfig,
}

impl StageEngineConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let forge = ForgeConfig::from_env(env)?;
        let mut outbox = OutboxConfig::from_env(
            env,
            "ORCH_OUTBOX_",
            outbox::Defaults {
                poll_ms: 1_000,
                backoff_base_ms: 1_000,
                backoff_max_ms: 300_000,
            },
        )?;
        outbox.max_attempts = env.parse("ORCH_OUTBOX_MAX_ATTEMPTS", 0u32)?;
        let watchdog = WatchdogConfig {
            stall: Duration::from_secs(env.parse("ORCH_STALL_S", 600u64)?),
            interval: Duration::from_secs(env.parse("ORCH_STALL_CHECK_INTERVAL_S", 30u64)?),
        };
        for (var, value) in [
            ("ORCH_STALL_S", watchdog.stall),
            ("ORCH_STALL_CHECK_INTERVAL_S", watchdog.interval),
        ] {
            if value.is_zero() {
                return Err(ConfigError::new(var, "must be at least 1"));
            }
        }
        let task_max_bytes = env.parse("ORCH_TASK_MAX_BYTES", crate::task::DEFAULT_MAX_BYTES)?;
        // The head of the description is never cut: a budget below it cannot be kept.
        if task_max_bytes < crate::task::DESCRIPTION_HEAD_BYTES {
            return Err(ConfigError::new(
                "ORCH_TASK_MAX_BYTES",
                format!(
                    "must be at least {} (the description's head is never cut)",
                    crate::task::DESCRIPTION_HEAD_BYTES
                ),
            ));
        }
        Ok(StageEngineConfig {
            task_max_bytes,
            limits: Limits {
                max_rollbacks: env.parse("ORCH_MAX_ROLLBACKS", 3u32)?,
                max_stage_retries: env.parse("ORCH_MAX_STAGE_RETRIES", 2u32)?,
            },
            base_branch: forge.base_branch.clone(),
            bot_authors: env
                .get("ORCH_BOT_AUTHORS")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_ascii_lowercase())
                .filter(|s| !s.is_empty())
                .collect(),
            arm_post_deploy: env.bool("ORCH_ARM_POST_DEPLOY", true)?,
            outbox,
            watchdog,
            reconcile: ReconcileConfig {
                interval: Some(Duration::from_secs(
                    env.parse("ORCH_RECONCILE_INTERVAL_S", 300u64)?,
                ))
                .filter(|d| !d.is_zero()),
                intake: orchestrator_tracker::intake::Intake::from_env(env)?,
            },
            ci: crate::ci::CiConfig::from_env(env)?,
            notify: crate::notify::NotifyConfig::from_env(env)?,
            tracker: TrackerConfig::from_env(env)?,
            forge,
        })
    }

    /// Returns whether `author` is a bot: one of the roles, or listed in `ORCH_BOT_AUTHORS`.
    pub fn is_bot(&self, author: &str) -> bool {
        let a = author.trim().to_ascii_lowercase();
        orchestrator_tracker::is_role(&a) || self.bot_authors.contains(&a)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = StageEngineConfig::from_env(&Env::default()).expect("defaults");
        assert_eq!(c.limits.max_rollbacks, 3);
        assert_eq!(c.limits.max_stage_retries, 2);
        assert_eq!(c.base_branch, "main");
        assert!(c.arm_post_deploy);
        assert_eq!(c.task_max_bytes, 65536);
        assert_eq!(c.outbox.max_attempts, 0);
        assert_eq!(c.watchdog.stall, Duration::from_secs(600));
        assert_eq!(c.watchdog.interval, Duration::from_secs(30));
        assert_eq!(c.reconcile.interval, Some(Duration::from_secs(300)));
        let off =
            StageEngineConfig::from_env(&Env::from_pairs([("ORCH_RECONCILE_INTERVAL_S", "0")]))
                .expect("config");
        assert_eq!(off.reconcile.interval, None);
        assert_eq!(c.tracker.kind, orchestrator_tracker::TrackerKind::Local);
        assert_eq!(c.forge.kind, orchestrator_forge::ForgeKind::Local);
    }

    #[test]
    fn bots_are_the_roles_and_the_listed_accounts() {
        let c = StageEngineConfig::from_env(&Env::from_pairs([(
            "ORCH_BOT_AUTHORS",
            "plane-bot, 3FA85F64-5717",
        )]))
        .expect("config");
        for (author, bot) in [
            ("reviewer", true),
            ("Stream", true),
            ("plane-bot", true),
            ("3fa85f64-5717", true),
            ("ada", false),
            ("", false),
        ] {
            assert_eq!(c.is_bot(author), bot, "{author}");
        }
    }

    #[test]
    fn bad_values_name_their_variable() {
        for var in [
            "ORCH_MAX_ROLLBACKS",
            "ORCH_MAX_STAGE_RETRIES",
            "ORCH_OUTBOX_POLL_MS",
            "ORCH_OUTBOX_MAX_ATTEMPTS",
            "ORCH_ARM_POST_DEPLOY",
            "ORCH_STALL_S",
            "ORCH_STALL_CHECK_INTERVAL_S",
            "ORCH_RECONCILE_INTERVAL_S",
            "ORCH_TASK_MAX_BYTES",
        ] {
            let err =
                StageEngineConfig::from_env(&Env::from_pairs([(var, "lots")])).expect_err(var);
            assert_eq!(err.var, var);
        }
        for (var, value) in [
            ("ORCH_OUTBOX_POLL_MS", "0"),
            ("ORCH_OUTBOX_BACKOFF_BASE_MS", "0"),
            ("ORCH_OUTBOX_BACKOFF_MAX_MS", "10"),
            ("ORCH_STALL_S", "0"),
            ("ORCH_STALL_CHECK_INTERVAL_S", "0"),
            ("ORCH_TASK_MAX_BYTES", "1000"),
        ] {
            let err = StageEngineConfig::from_env(&Env::from_pairs([(var, value)])).expect_err(var);
            assert_eq!(err.var, var);
        }
    }
}
