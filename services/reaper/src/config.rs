//! The reaper's section of the configuration.

use std::time::Duration;

use orchestrator_kit::{ConfigError, Env};

/// The reaper's settings.
#[derive(Debug, Clone)]
pub struct ReaperConfig {
    /// `ORCH_REAPER_ENABLED`: run the loop (`TickNow` works either way).
    pub enabled: bool,
    /// `ORCH_REAPER_INTERVAL_S`: the time between two ticks.
    pub interval: Duration,
    /// `ORCH_REAPER_DEAD_TICKS`: consecutive ticks a job's process must be seen dead before
    /// the job is flipped.
    pub dead_ticks: u32,
    /// `ORCH_REAPER_MAX_RUNNING_S`: the backstop; a job running longer is killed and flipped.
    pub max_running: Duration,
    /// `ORCH_LEASE_RECLAIM_ENABLED`: reclaim stale merge leases through merge-gate each tick.
    pub lease_reclaim_enabled: bool,
    /// Flips (and stage advances) in flight at once within one tick.
    pub concurrency: usize,
}

impl Default for ReaperConfig {
    fn default() -> Self {
        ReaperConfig {
            enabled: true,
            interval: Duration::from_secs(30),
            dead_ticks: 3,
            max_running: Duration::from_secs(7200),
            lease_reclaim_enabled: true,
            concurrency: 16,
        }
    }
}

impl ReaperConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let d = ReaperConfig::default();
        let interval_s: u64 = env.parse("ORCH_REAPER_INTERVAL_S", d.interval.as_secs())?;
        if interval_s == 0 {
            return Err(ConfigError::new(
                "ORCH_REAPER_INTERVAL_S",
                "must be at least 1",
            ));
        }
        let dead_ticks: u32 = env.parse("ORCH_REAPER_DEAD_TICKS", d.dead_ticks)?;
        if dead_ticks == 0 {
            return Err(ConfigError::new(
                "ORCH_REAPER_DEAD_TICKS",
                "must be at least 1",
            ));
        }
        let max_running_s: u64 = env.parse("ORCH_REAPER_MAX_RUNNING_S", d.max_running.as_secs())?;
        if max_running_s == 0 {
            return Err(ConfigError::new(
                "ORCH_REAPER_MAX_RUNNING_S",
                "must be at least 1",
            ));
        }
        Ok(ReaperConfig {
            enabled: env.bool("ORCH_REAPER_ENABLED", d.enabled)?,
            interval: Duration::from_secs(interval_s),
            dead_ticks,
            max_running: Duration::from_secs(max_running_s),
            lease_reclaim_enabled: env
                .bool("ORCH_LEASE_RECLAIM_ENABLED", d.lease_reclaim_enabled)?,
            concurrency: d.concurrency,
        })
    }

    /// The longest a dead process keeps its job running: the death is seen within one
    /// interval, then `dead_ticks` observations an interval apart; one more interval of slack.
    pub fn zombie_to_freed_bound(&self) -> Duration {
        self.interval * (self.dead_ticks + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = ReaperConfig::from_env(&Env::default()).expect("defaults");
        assert!(c.enabled && c.lease_reclaim_enabled);
        assert_eq!(c.interval, Duration::from_secs(30));
        assert_eq!(c.dead_ticks, 3);
        assert_eq!(c.max_running, Duration::from_secs(7200));
        assert_eq!(c.zombie_to_freed_bound(), Duration::from_secs(120));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("ORCH_REAPER_ENABLED", "maybe"),
            ("ORCH_REAPER_INTERVAL_S", "0"),
            ("ORCH_REAPER_INTERVAL_S", "fast"),
            ("ORCH_REAPER_DEAD_TICKS", "0"),
            ("ORCH_REAPER_MAX_RUNNING_S", "-5"),
            ("ORCH_LEASE_RECLAIM_ENABLED", "2"),
        ] {
            let err = ReaperConfig::from_env(&Env::from_pairs([(var, value)])).expect_err(var);
            assert_eq!(err.var, var);
        }
    }
}
