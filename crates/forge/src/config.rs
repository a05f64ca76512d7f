//! Which forge to use, from the environment: `ORCH_FORGE=gitea|local`; unset means Gitea
//! when `GITEA_BASE_URL` is set, else the local forge (nothing to configure).

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_kit::{ConfigError, Env, Secret};

use crate::Forge;
use crate::gitea::GiteaForge;
use crate::local::LocalForge;

/// The forge implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ForgeKind {
    Gitea,
    Local,
}

impl ForgeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ForgeKind::Gitea => "gitea",
            ForgeKind::Local => "local",
        }
    }
}

impl fmt::Display for ForgeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for ForgeKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gitea" => Ok(ForgeKind::Gitea),
            "local" => Ok(ForgeKind::Local),
            _ => Err("expected gitea or local".to_owned()),
        }
    }
}

/// Gitea's settings.
#[derive(Debug, Clone)]
pub struct GiteaConfig {
    /// `GITEA_BASE_URL`: where the API is reached, e.g. `http://gitea:3000`.
    pub base_url: String,
    /// `GITEA_PUBLIC_URL`: where people reach it (links in comments); default the base URL.
    pub public_url: String,
    /// `GITEA_TOKEN`.
    pub token: Option<Secret>,
    /// `ORCH_FORGE_TIMEOUT_MS`: the deadline of one API call.
    pub timeout: Duration,
}

/// The forge section of the configuration.
#[derive(Debug, Clone)]
pub struct ForgeConfig {
    pub kind: ForgeKind,
    pub gitea: Option<GiteaConfig>,
    /// `ORCH_FORGE_LOCAL_DIR`: the local forge's bare repositories, `<owner>/<name>.git`;
    /// default `<ORCH_DATA_DIR>/forge`.
    pub local_dir: PathBuf,
    /// `ORCH_BASE_BRANCH`: the branch PRs go into (default `main`).
    pub base_branch: String,
}

fn url(env: &Env, name: &str) -> Result<Option<String>, ConfigError> {
    match env.get(name).map(str::trim) {
        None => Ok(None),
        Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
            Ok(Some(u.trim_end_matches('/').to_owned()))
        }
        Some(u) => Err(ConfigError::new(
            name,
            format!("invalid URL '{u}': expected http(s)://HOST[:PORT]"),
        )),
    }
}

impl ForgeConfig {
    /// Reads `ORCH_FORGE`, `GITEA_*`, `ORCH_FORGE_LOCAL_DIR`, `ORCH_FORGE_TIMEOUT_MS` and
    /// `ORCH_BASE_BRANCH`.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let base_url = url(env, "GITEA_BASE_URL")?;
        let kind = match env.get("ORCH_FORGE") {
            Some(_) => env.parse("ORCH_FORGE", ForgeKind::Local)?,
            None if base_url.is_some() => ForgeKind::Gitea,
            None => ForgeKind::Local,
        };
        let gitea = match (kind, base_url) {
            (ForgeKind::Gitea, None) => {
                return Err(ConfigError::new(
                    "GITEA_BASE_URL",
                    "is required when ORCH_FORGE=gitea",
                ));
            }
            (_, Some(base_url)) => Some(GiteaConfig {
                public_url: url(env, "GITEA_PUBLIC_URL")?.unwrap_or_else(|| base_url.clone()),
                base_url,
                token: env.secret("GITEA_TOKEN"),
                timeout: Duration::from_millis(env.parse("ORCH_FORGE_TIMEOUT_MS", 10_000u64)?),
            }),
            (ForgeKind::Local, None) => None,
        };
        let data_dir = env.data_dir()?;
        let local_dir = env.dir("ORCH_FORGE_LOCAL_DIR", || data_dir.join("forge"))?;
        let base_branch = env
            .get("ORCH_BASE_BRANCH")
            .unwrap_or("main")
            .trim()
            .to_owned();
        orchestrator_git::validate_branch(&base_branch)
            .map_err(|e| ConfigError::new("ORCH_BASE_BRANCH", e.to_string()))?;
        Ok(ForgeConfig {
            kind,
            gitea,
            local_dir,
            base_branch,
        })
    }
}

/// Builds the configured forge.
pub fn build(config: &ForgeConfig) -> Result<Arc<dyn Forge>, ConfigError> {
    match (config.kind, &config.gitea) {
        (ForgeKind::Gitea, Some(g)) => Ok(Arc::new(GiteaForge::new(g.clone()).map_err(|e| {
            ConfigError::new(
                "GITEA_BASE_URL",
                format!("cannot build the HTTP client: {e}"),
            )
        })?)),
        (ForgeKind::Gitea, None) => Err(ConfigError::new(
            "GITEA_BASE_URL",
            "is required when ORCH_FORGE=gitea",
        )),
        (ForgeKind::Local, _) => Ok(Arc::new(LocalForge::new(
            config.local_dir.clone(),
            config.base_branch.clone(),
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_is_the_default_and_gitea_follows_its_url() {
        let c = ForgeConfig::from_env(&Env::default()).expect("defaults");
        assert_eq!(c.kind, ForgeKind::Local);
        assert_eq!(
            c.local_dir,
            std::env::current_dir().expect("cwd").join("var/forge")
        );
        assert_eq!(c.base_branch, "main");

        let c = ForgeConfig::from_env(&Env::from_pairs([
            ("GITEA_BASE_URL", "http://gitea:3000/"),
            ("GITEA_TOKEN", "t"),
        ]))
        .expect("gitea");
        assert_eq!(c.kind, ForgeKind::Gitea);
        let g = c.gitea.expect("gitea section");
        assert_eq!(g.base_url, "http://gitea:3000");
        assert_eq!(g.public_url, "http://gitea:3000");

        let c = ForgeConfig::from_env(&Env::from_pairs([
            ("GITEA_BASE_URL", "http://gitea:3000"),
            ("ORCH_FORGE", "local"),
        ]))
        .expect("explicit local");
        assert_eq!(c.kind, ForgeKind::Local);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (pairs, var) in [
            (vec![("ORCH_FORGE", "github")], "ORCH_FORGE"),
            (vec![("ORCH_FORGE", "gitea")], "GITEA_BASE_URL"),
            (vec![("GITEA_BASE_URL", "gitea:3000")], "GITEA_BASE_URL"),
            (
                vec![("GITEA_BASE_URL", "http://g"), ("GITEA_PUBLIC_URL", "g")],
                "GITEA_PUBLIC_URL",
            ),
            (vec![("ORCH_BASE_BRANCH", "-main")], "ORCH_BASE_BRANCH"),
        ] {
            let err = ForgeConfig::from_env(&Env::from_pairs(pairs)).expect_err(var);
            assert_eq!(err.var, var);
        }
    }
}
