//! post-deploy's section of the configuration (`ORCH_POST_DEPLOY_*`, `ORCH_SELF_REPO`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

use orchestrator_kit::deploy_target::{self, CommandSpec};
use orchestrator_kit::{ConfigError, Env};
use serde::Deserialize;

use crate::validate;

/// Where one watched repo's production answers, and how to roll it back.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    /// A GET that answers 2xx while production is healthy.
    #[serde(default)]
    pub health_url: String,
    /// A Prometheus text exposition holding the request counter.
    #[serde(default)]
    pub metrics_url: String,
    /// Argv (a JSON array, or a line of words without shell syntax), never a shell;
    /// `{repo}`, `{previous_sha}`, `{deployed_sha}` (or `{sha}`) and `{work_item}` are
    /// replaced by validated values (`orchestrator_kit::deploy_target`, as the launcher's
    /// deploy commands). Empty: degradation only alerts.
    #[serde(default)]
    pub rollback_command: CommandSpec,
    /// The counter of answered requests (default `http_requests_total`).
    #[serde(default = "default_requests_metric")]
    pub requests_metric: String,
    /// A counter of 5xx answers. When empty, the 5xx answers are the samples of
    /// `requests_metric` whose status label (`code`, `status` or `status_code`) starts with 5.
    #[serde(default)]
    pub errors_metric: String,
}

fn default_requests_metric() -> String {
    "http_requests_total".to_owned()
}

impl Target {
    /// Returns whether a rollback can be run for this repo.
    pub fn has_rollback(&self) -> bool {
        !self.rollback_command.is_empty()
    }
}

/// The post-deploy configuration.
#[derive(Debug, Clone)]
pub struct PostDeployConfig {
    /// `ORCH_POST_DEPLOY_ENABLED`: when false, Arm arms nothing and Tick closes open watches.
    pub enabled: bool,
    /// `ORCH_SELF_REPO`: the orchestrator's own repo, which is only ever alerted on.
    pub self_repo: Option<String>,
    /// `ORCH_POST_DEPLOY_REPOS`: the repos watched after deploy; empty means the self repo only.
    pub repos: BTreeSet<String>,
    /// `ORCH_POST_DEPLOY_WINDOW_S`.
    pub window: Duration,
    /// `ORCH_POST_DEPLOY_TICK_S`: how long the monitor job waits between ticks.
    pub tick: Duration,
    /// `ORCH_POST_DEPLOY_FAIL_THRESHOLD`: consecutive health failures that mean DEGRADED.
    pub fail_threshold: u32,
    /// `ORCH_POST_DEPLOY_5XX_THRESHOLD`: a window 5xx ratio above this means DEGRADED.
    pub error_ratio_threshold: f64,
    /// `ORCH_POST_DEPLOY_PROBE_ERROR_ALERT_THRESHOLD`: consecutive prober errors that alert.
    pub probe_error_alert_threshold: u32,
    /// `ORCH_POST_DEPLOY_PROBE_TIMEOUT_MS`: the deadline of one health or metrics request.
    pub probe_timeout: Duration,
    /// `ORCH_POST_DEPLOY_ROLLBACK_TIMEOUT_S`: the rollback command is killed after this.
    pub rollback_timeout: Duration,
    /// `ORCH_POST_DEPLOY_TARGETS_JSON`: per repo, its health and metrics URLs and rollback.
    pub targets: BTreeMap<String, Target>,
    /// `ORCH_POST_DEPLOY_LOG_DIR`: one post-deploy log per work item (default `$ORCH_DATA_DIR/post-deploy`).
    pub log_dir: PathBuf,
}

impl PostDeployConfig {
    /// Defaults, with logs under `log_dir`; what tests start from.
    pub fn new(log_dir: impl Into<PathBuf>) -> Self {
        PostDeployConfig {
            enabled: true,
            self_repo: None,
            repos: BTreeSet::new(),
            window: Duration::from_secs(900),
            tick: Duration::from_secs(60),
            fail_threshold: 3,
            error_ratio_threshold: 0.05,
            probe_error_alert_threshold: 3,
            probe_timeout: Duration::from_secs(5),
            rollback_timeout: Duration::from_secs(600),
            targets: BTreeMap::new(),
            log_dir: log_dir.into(),
        }
    }

    /// Reads the section from `env`; `data_dir` is `ORCH_DATA_DIR`, the default home of the logs.
    pub fn from_env(env: &Env, data_dir: &Path) -> Result<Self, ConfigError> {
        let self_repo = match env.get("ORCH_SELF_REPO").map(str::trim) {
            None => None,
            Some(r) => Some(
                validate::repo(r)
                    .map_err(|e| ConfigError::new("ORCH_SELF_REPO", e))?
                    .to_owned(),
            ),
        };
        let mut repos = BTreeSet::new();
        for r in env
            .get("ORCH_POST_DEPLOY_REPOS")
            .unwrap_or_default()
            .split(',')
            .map(str::trim)
            .filter(|r| !r.is_empty())
        {
            let r = validate::repo(r)
                .map_err(|e| ConfigError::new("ORCH_POST_DEPLOY_REPOS", format!("'{r}': {e}")))?;
            repos.insert(r.to_owned());
        }

        let window_s: u64 = env.parse("ORCH_POST_DEPLOY_WINDOW_S", 900)?;
        if window_s == 0 {
            return Err(ConfigError::new(
                "ORCH_POST_DEPLOY_WINDOW_S",
                "must be at least 1",
            ));
        }
        let tick_s: u64 = env.parse("ORCH_POST_DEPLOY_TICK_S", 60)?;
        if tick_s == 0 {
            return Err(ConfigError::new(
                "ORCH_POST_DEPLOY_TICK_S",
                "must be at least 1",
            ));
        }
        let fail_threshold: u32 = env.parse("ORCH_POST_DEPLOY_FAIL_THRESHOLD", 3)?;
        if fail_threshold == 0 {
            return Err(ConfigError::new(
                "ORCH_POST_DEPLOY_FAIL_THRESHOLD",
                "must be at least 1",
            ));
        }
        let error_ratio_threshold: f64 = env.parse("ORCH_POST_DEPLOY_5XX_THRESHOLD", 0.05)?;
        if !(0.0..=1.0).contains(&error_ratio_threshold) {
            return Err(ConfigError::new(
                "ORCH_POST_DEPLOY_5XX_THRESHOLD",
                format!("{error_ratio_threshold} is not a ratio between 0 and 1"),
            ));
        }
        let probe_error_alert_threshold: u32 =
            env.parse("ORCH_POST_DEPLOY_PROBE_ERROR_ALERT_THRESHOLD", 3)?;
        if probe_error_alert_threshold == 0 {
            return Err(ConfigError::new(
                "ORCH_POST_DEPLOY_PROBE_ERROR_ALERT_THRESHOLD",
                "must be at least 1",
            ));
        }
        let probe_timeout_ms: u64 = env.parse("ORCH_POST_DEPLOY_PROBE_TIMEOUT_MS", 5_000)?;
        let rollback_timeout_s: u64 = env.parse("ORCH_POST_DEPLOY_ROLLBACK_TIMEOUT_S", 600)?;
        let mut targets = match env.get("ORCH_POST_DEPLOY_TARGETS_JSON") {
            None => BTreeMap::new(),
            Some(raw) => parse_targets(raw)
                .map_err(|e| ConfigError::new("ORCH_POST_DEPLOY_TARGETS_JSON", e))?,
        };
        if let Some(raw) = env.get("ORCH_DEPLOY_TARGETS_JSON") {
            let deploy = deploy_target::parse_targets(raw)
                .map_err(|e| ConfigError::new("ORCH_DEPLOY_TARGETS_JSON", e))?;
            merge_deploy_targets(&mut targets, deploy)
                .map_err(|e| ConfigError::new("ORCH_DEPLOY_TARGETS_JSON", e))?;
        }
        let log_dir = env.dir("ORCH_POST_DEPLOY_LOG_DIR", || data_dir.join("post-deploy"))?;

        Ok(PostDeployConfig {
            enabled: env.bool("ORCH_POST_DEPLOY_ENABLED", true)?,
            self_repo,
            repos,
            window: Duration::from_secs(window_s),
            tick: Duration::from_secs(tick_s),
            fail_threshold,
            error_ratio_threshold,
            probe_error_alert_threshold,
            probe_timeout: Duration::from_millis(probe_timeout_ms.max(1)),
            rollback_timeout: Duration::from_secs(rollback_timeout_s.max(1)),
            targets,
            log_dir,
        })
    }

    /// Returns whether `repo` is the orchestrator's own.
    pub fn is_self_repo(&self, repo: &str) -> bool {
        self.self_repo.as_deref() == Some(repo)
    }

    /// Returns whether a deploy of `repo` is watched: listed in `ORCH_POST_DEPLOY_REPOS`, or,
    /// when that list is empty, the orchestrator's own repo.
    pub fn watches(&self, repo: &str) -> bool {
        if self.repos.is_empty() {
            self.is_self_repo(repo)
        } else {
            self.repos.contains(repo)
        }
    }

    /// The repos watched, for the start-up log.
    pub fn watched_repos(&self) -> Vec<String> {
        if self.repos.is_empty() {
            self.self_repo.iter().cloned().collect()
        } else {
            self.repos.iter().cloned().collect()
        }
    }
}

/// Parses `{"owner/name": {"health_url": .., "metrics_url": .., "rollback_command": ..}, ..}`.
pub fn parse_targets(raw: &str) -> Result<BTreeMap<String, Target>, String> {
    let map: BTreeMap<String, Target> =
        serde_json::from_str(raw).map_err(|e| format!("invalid JSON: {e}"))?;
    for (repo, t) in &map {
        validate::repo(repo).map_err(|e| format!("'{repo}': {e}"))?;
        for (field, url) in [
            ("health_url", &t.health_url),
            ("metrics_url", &t.metrics_url),
        ] {
            if !(url.is_empty() || url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!(
                    "'{repo}'.{field}: '{url}' is not an http:// or https:// URL"
                ));
            }
        }
        if t.health_url.is_empty() && t.metrics_url.is_empty() {
            return Err(format!(
                "'{repo}': give at least one of health_url and metrics_url"
            ));
        }
        if t.requests_metric.trim().is_empty() {
            return Err(format!("'{repo}'.requests_metric: must not be empty"));
        }
        deploy_target::check_rollback(repo, &t.rollback_command)?;
    }
    Ok(map)
}

/// Adds the watch half of `ORCH_DEPLOY_TARGETS_JSON` (the one home of deploy targets) to
/// the targets of `ORCH_POST_DEPLOY_TARGETS_JSON`, which keeps working. A repo in both is
/// refused, by name: two answers to "where is production" would be a guess.
fn merge_deploy_targets(
    targets: &mut BTreeMap<String, Target>,
    deploy: BTreeMap<String, deploy_target::DeployTarget>,
) -> Result<(), String> {
    for (repo, t) in deploy {
        if t.health_url.is_empty() && t.metrics_url.is_empty() {
            continue; // deployed, not watched
        }
        if targets.contains_key(&repo) {
            return Err(format!(
                "'{repo}' is also in ORCH_POST_DEPLOY_TARGETS_JSON: give it in one of them"
            ));
        }
        let raw = serde_json::json!({
            repo.clone(): {
                "health_url": t.health_url,
                "metrics_url": t.metrics_url,
                "rollback_command": t.rollback_command,
            }
        });
        // The same checks as the older variable's, so both say the same of the same target.
        targets.extend(parse_targets(&raw.to_string())?);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs.iter().copied())
    }

    #[test]
    fn defaults_watch_only_the_self_repo() {
        let c = PostDeployConfig::from_env(&env(&[]), Path::new("/data")).expect("defaults");
        assert!(c.enabled);
        assert_eq!(c.window, Duration::from_secs(900));
        assert_eq!(c.tick, Duration::from_secs(60));
        assert_eq!(c.fail_threshold, 3);
        assert_eq!(c.error_ratio_threshold, 0.05);
        assert_eq!(c.log_dir, PathBuf::from("/data/post-deploy"));
        assert!(!c.watches("acme/shop"));

        let c = PostDeployConfig::from_env(
            &env(&[("ORCH_SELF_REPO", "ops/orchestrator")]),
            Path::new("/data"),
        )
        .expect("self");
        assert!(c.watches("ops/orchestrator"));
        assert!(!c.watches("acme/shop"));

        let c = PostDeployConfig::from_env(
            &env(&[
                ("ORCH_SELF_REPO", "ops/orchestrator"),
                ("ORCH_POST_DEPLOY_REPOS", " acme/shop , acme/api,"),
            ]),
            Path::new("/data"),
        )
        .expect("repos");
        assert!(c.watches("acme/shop"));
        assert!(c.watches("acme/api"));
        assert!(!c.watches("ops/orchestrator"));
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (var, value) in [
            ("ORCH_POST_DEPLOY_ENABLED", "maybe"),
            ("ORCH_POST_DEPLOY_WINDOW_S", "0"),
            ("ORCH_POST_DEPLOY_TICK_S", "soon"),
            ("ORCH_POST_DEPLOY_FAIL_THRESHOLD", "0"),
            ("ORCH_POST_DEPLOY_5XX_THRESHOLD", "1.5"),
            ("ORCH_POST_DEPLOY_5XX_THRESHOLD", "-0.1"),
            ("ORCH_POST_DEPLOY_PROBE_ERROR_ALERT_THRESHOLD", "0"),
            ("ORCH_POST_DEPLOY_REPOS", "acme/shop,../etc"),
            ("ORCH_SELF_REPO", "-rf/x"),
            ("ORCH_POST_DEPLOY_TARGETS_JSON", "{"),
            (
                "ORCH_POST_DEPLOY_TARGETS_JSON",
                r#"{"acme/shop":{"health_url":"ftp://x"}}"#,
            ),
            (
                "ORCH_POST_DEPLOY_TARGETS_JSON",
                r#"{"acme/shop":{"helth_url":"http://x"}}"#,
            ),
            (
                "ORCH_POST_DEPLOY_TARGETS_JSON",
                r#"{"acme/shop":{"health_url":"http://x","rollback_command":"back {previous_sha} | tee log"}}"#,
            ),
            ("ORCH_POST_DEPLOY_TARGETS_JSON", r#"{"acme/shop":{}}"#),
        ] {
            let err = PostDeployConfig::from_env(&env(&[(var, value)]), Path::new("/d"))
                .expect_err(value);
            assert_eq!(err.var, var, "{value}: {err}");
        }
    }

    #[test]
    fn the_deploy_targets_are_watched_too_and_a_repo_in_both_is_refused() {
        let deploy = r#"{"acme/shop":{"deploy_command":["ship","{sha}"],
            "health_url":"http://shop/healthz","rollback_command":"back {previous_sha}"},
            "acme/quiet":{"deploy_command":"ship"}}"#;
        let c = PostDeployConfig::from_env(
            &env(&[
                ("ORCH_DEPLOY_TARGETS_JSON", deploy),
                (
                    "ORCH_POST_DEPLOY_TARGETS_JSON",
                    r#"{"acme/old":{"health_url":"http://old/h"}}"#,
                ),
            ]),
            Path::new("/d"),
        )
        .expect("valid");
        let t = &c.targets["acme/shop"];
        assert_eq!(t.health_url, "http://shop/healthz");
        assert_eq!(t.rollback_command.words(), ["back", "{previous_sha}"]);
        assert_eq!(t.requests_metric, "http_requests_total");
        assert_eq!(c.targets["acme/old"].health_url, "http://old/h");
        // Deployed but with nothing to probe: not a watch target.
        assert!(!c.targets.contains_key("acme/quiet"));

        let e = PostDeployConfig::from_env(
            &env(&[
                ("ORCH_DEPLOY_TARGETS_JSON", deploy),
                (
                    "ORCH_POST_DEPLOY_TARGETS_JSON",
                    r#"{"acme/shop":{"health_url":"http://old/h"}}"#,
                ),
            ]),
            Path::new("/d"),
        )
        .expect_err("ambiguous");
        let e = e.to_string();
        assert!(
            e.contains("ORCH_DEPLOY_TARGETS_JSON") && e.contains("'acme/shop'"),
            "{e}"
        );
        let e = PostDeployConfig::from_env(
            &env(&[(
                "ORCH_DEPLOY_TARGETS_JSON",
                r#"{"acme/shop":{"health_url":"ftp://x"}}"#,
            )]),
            Path::new("/d"),
        )
        .expect_err("bad url");
        assert!(e.to_string().contains("'acme/shop'.health_url"), "{e}");
    }

    #[test]
    fn targets_are_read_per_repo_with_defaults() {
        let c = PostDeployConfig::from_env(
            &env(&[(
                "ORCH_POST_DEPLOY_TARGETS_JSON",
                r#"{"acme/shop":{"health_url":"http://shop/healthz","metrics_url":"http://shop/metrics",
                    "rollback_command":"deploy/rollback.sh {repo} {previous_sha}"}}"#,
            )]),
            Path::new("/d"),
        )
        .expect("targets");
        let t = &c.targets["acme/shop"];
        assert_eq!(t.health_url, "http://shop/healthz");
        assert_eq!(t.requests_metric, "http_requests_total");
        assert!(t.errors_metric.is_empty());
        assert!(t.has_rollback());
    }
}
