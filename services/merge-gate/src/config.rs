//! merge-gate's section of the configuration. Which forge, where its repositories are
//! cloned from and the base branch come from the shared forge section
//! (`ORCH_FORGE`, `GITEA_*`, `ORCH_FORGE_LOCAL_DIR`, `ORCH_BASE_BRANCH`).

use std::path::PathBuf;
use std::time::Duration;

use orchestrator_forge::ForgeConfig;
use orchestrator_kit::{ConfigError, Env};

/// merge-gate's settings.
#[derive(Debug, Clone)]
pub struct MergeGateConfig {
    /// `ORCH_MERGE_LEASE_TTL_S`: a lease older than this is stale whoever holds it; also the
    /// TTL of an `AcquireLease` that asks for 0.
    pub lease_ttl_s: u32,
    /// `ORCH_MERGE_MIRROR_DIR`: the bare mirrors `check_branch_mergeable` and the "already
    /// contained" check read, `<dir>/<owner>/<name>.git`; default
    /// `<ORCH_DATA_DIR>/merge-gate/mirrors`.
    pub mirror_dir: PathBuf,
    /// `ORCH_MERGE_ATTEMPTS`: merge requests one `FinalizeMerge` sends on transient errors
    /// (the PR is re-read before each retry).
    pub merge_attempts: u32,
    /// `ORCH_MERGE_RETRY_AFTER_S`: what a `RETRY_LATER` answer suggests.
    pub retry_after_s: u32,
    /// How long one `FinalizeMerge` may hold a PR's merge claim before another replica may
    /// re-drive it (a crashed merge-gate's claim runs out).
    pub claim_ttl: Duration,
    /// The pause between two merge requests of one call.
    pub retry_pause: Duration,
    pub forge: ForgeConfig,
}

impl MergeGateConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let forge = ForgeConfig::from_env(env)?;
        let data_dir = env.data_dir()?;
        let mirror_dir = env.dir("ORCH_MERGE_MIRROR_DIR", || {
            data_dir.join("merge-gate").join("mirrors")
        })?;
        let lease_ttl_s: u32 = env.parse("ORCH_MERGE_LEASE_TTL_S", 3600)?;
        if lease_ttl_s == 0 {
            return Err(ConfigError::new(
                "ORCH_MERGE_LEASE_TTL_S",
                "must be at least 1",
            ));
        }
        let merge_attempts: u32 = env.parse("ORCH_MERGE_ATTEMPTS", 3)?;
        if merge_attempts == 0 {
            return Err(ConfigError::new(
                "ORCH_MERGE_ATTEMPTS",
                "must be at least 1",
            ));
        }
        let retry_after_s = env.parse("ORCH_MERGE_RETRY_AFTER_S", 30)?;
        // Every forge call of one finalize fits in the claim: a get, then per attempt a
        // merge, the forge's own re-read and ours.
        let forge_timeout = forge
            .gitea
            .as_ref()
            .map_or(Duration::from_secs(10), |g| g.timeout);
        let claim_ttl = (forge_timeout * (2 + 3 * merge_attempts)).max(Duration::from_secs(60));
        Ok(MergeGateConfig {
            lease_ttl_s,
            mirror_dir,
            merge_attempts,
            retry_after_s,
            claim_ttl,
            retry_pause: Duration::from_millis(500),
            forge,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults() {
        let c = MergeGateConfig::from_env(&Env::default()).expect("defaults");
        assert_eq!(c.lease_ttl_s, 3600);
        assert_eq!(
            c.mirror_dir,
            std::env::current_dir()
                .expect("cwd")
                .join("var/merge-gate/mirrors"),
            "relative directories are made absolute: git runs elsewhere"
        );
        assert_eq!(c.merge_attempts, 3);
        assert_eq!(c.retry_after_s, 30);
        assert_eq!(c.forge.kind, orchestrator_forge::ForgeKind::Local);
        assert_eq!(c.forge.base_branch, "main");
        let c = MergeGateConfig::from_env(&Env::from_pairs([
            ("ORCH_DATA_DIR", "/srv/orch"),
            ("ORCH_MERGE_LEASE_TTL_S", "60"),
        ]))
        .expect("config");
        assert_eq!(c.mirror_dir, PathBuf::from("/srv/orch/merge-gate/mirrors"));
        assert_eq!(c.lease_ttl_s, 60);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("ORCH_MERGE_LEASE_TTL_S", "soon"),
            ("ORCH_MERGE_LEASE_TTL_S", "0"),
            ("ORCH_MERGE_ATTEMPTS", "0"),
            ("ORCH_MERGE_RETRY_AFTER_S", "-1"),
            ("ORCH_FORGE", "github"),
        ] {
            let err = MergeGateConfig::from_env(&Env::from_pairs([(var, value)])).expect_err(var);
            assert_eq!(err.var, var);
        }
    }
}
