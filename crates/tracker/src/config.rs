//! Which tracker to use, from the environment: `ORCH_TRACKER=plane|local`; unset means
//! Plane when `PLANE_BASE_URL` is set, else the local tracker.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use orchestrator_kit::{ConfigError, Env, Secret};

use crate::ROLES;

/// The tracker implementations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TrackerKind {
    Plane,
    Local,
}

impl TrackerKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TrackerKind::Plane => "plane",
            TrackerKind::Local => "local",
        }
    }
}

impl fmt::Display for TrackerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TrackerKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "plane" => Ok(TrackerKind::Plane),
            "local" => Ok(TrackerKind::Local),
            _ => Err("expected plane or local".to_owned()),
        }
    }
}

/// Plane's settings.
#[derive(Debug, Clone)]
pub struct PlaneConfig {
    /// `PLANE_BASE_URL`, e.g. `https://plane.example.com`.
    pub base_url: String,
    /// `PLANE_WORKSPACE_SLUG`.
    pub workspace_slug: String,
    /// `PLANE_API_TOKEN`: the shared orchestrator token (reads, state changes, fallback).
    pub api_token: Secret,
    /// `PLANE_BOT_TOKEN_<ROLE>`, by lower-case role; only the roles in [`ROLES`].
    pub bot_tokens: BTreeMap<String, Secret>,
    /// `PLANE_PROJECT_ID`: the project of work items created without one.
    pub project_id: Option<String>,
    /// `ORCH_TRACKER_TIMEOUT_MS`: the deadline of one API call.
    pub timeout: Duration,
}

impl PlaneConfig {
    /// Returns the token a comment by `author` is posted with, and whether it is the role's
    /// own bot token (an unknown or empty role, or a missing token, gives the shared one).
    pub fn token_for(&self, author: &str) -> (&Secret, bool) {
        let role = author.trim().to_ascii_lowercase();
        match self.bot_tokens.get(&role) {
            Some(t) => (t, true),
            None => (&self.api_token, false),
        }
    }
}

/// The tracker section of the configuration.
#[derive(Debug, Clone)]
pub struct TrackerConfig {
    pub kind: TrackerKind,
    pub plane: Option<PlaneConfig>,
}

impl TrackerConfig {
    /// Reads `ORCH_TRACKER`, `PLANE_*` and `ORCH_TRACKER_TIMEOUT_MS`.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let base_url = match env.get("PLANE_BASE_URL").map(str::trim) {
            None => None,
            Some(u) if u.starts_with("http://") || u.starts_with("https://") => {
                Some(u.trim_end_matches('/').to_owned())
            }
            Some(u) => {
                return Err(ConfigError::new(
                    "PLANE_BASE_URL",
                    format!("invalid URL '{u}': expected http(s)://HOST[:PORT]"),
                ));
            }
        };
        let kind = match env.get("ORCH_TRACKER") {
            Some(_) => env.parse("ORCH_TRACKER", TrackerKind::Local)?,
            None if base_url.is_some() => TrackerKind::Plane,
            None => TrackerKind::Local,
        };
        if kind == TrackerKind::Local {
            return Ok(TrackerConfig { kind, plane: None });
        }
        let need = |name: &str| {
            env.get(name)
                .map(|v| v.trim().to_owned())
                .ok_or_else(|| ConfigError::new(name, "is required when ORCH_TRACKER=plane"))
        };
        let base_url = base_url.ok_or_else(|| {
            ConfigError::new("PLANE_BASE_URL", "is required when ORCH_TRACKER=plane")
        })?;
        let workspace_slug = need("PLANE_WORKSPACE_SLUG")?;
        if !workspace_slug
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ConfigError::new(
                "PLANE_WORKSPACE_SLUG",
                "only letters, digits, '-' and '_' are allowed",
            ));
        }
        let api_token = env.secret("PLANE_API_TOKEN").ok_or_else(|| {
            ConfigError::new("PLANE_API_TOKEN", "is required when ORCH_TRACKER=plane")
        })?;
        let mut bot_tokens = BTreeMap::new();
        for (name, _) in env.with_prefix("PLANE_BOT_TOKEN_") {
            let role = name["PLANE_BOT_TOKEN_".len()..].to_ascii_lowercase();
            if !ROLES.contains(&role.as_str()) {
                tracing::warn!(variable = name, "ignoring a bot token for an unknown role");
                continue;
            }
            if let Some(secret) = env.secret(name) {
                bot_tokens.insert(role, secret);
            }
        }
        let project_id = env.get("PLANE_PROJECT_ID").map(|p| p.trim().to_owned());
        Ok(TrackerConfig {
            kind,
            plane: Some(PlaneConfig {
                base_url,
                workspace_slug,
                api_token,
                bot_tokens,
                project_id,
                timeout: Duration::from_millis(env.parse("ORCH_TRACKER_TIMEOUT_MS", 10_000u64)?),
            }),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plane_env() -> Env {
        Env::from_pairs([
            ("PLANE_BASE_URL", "http://plane:8000/"),
            ("PLANE_WORKSPACE_SLUG", "acme"),
            ("PLANE_API_TOKEN", "shared"),
            ("PLANE_BOT_TOKEN_REVIEWER", "rev"),
            ("PLANE_BOT_TOKEN_STREAM", "str"),
            ("PLANE_BOT_TOKEN_DEVELOPER", ""),
            ("PLANE_BOT_TOKEN_HACKER", "x"),
        ])
    }

    #[test]
    fn local_is_the_default_and_plane_follows_its_url() {
        let c = TrackerConfig::from_env(&Env::default()).expect("defaults");
        assert_eq!(c.kind, TrackerKind::Local);
        let c = TrackerConfig::from_env(&plane_env()).expect("plane");
        assert_eq!(c.kind, TrackerKind::Plane);
        let p = c.plane.expect("plane section");
        assert_eq!(p.base_url, "http://plane:8000");
        assert_eq!(
            p.bot_tokens.keys().collect::<Vec<_>>(),
            vec!["reviewer", "stream"]
        );
        let c = TrackerConfig::from_env(&plane_env().with("ORCH_TRACKER", "local")).expect("local");
        assert_eq!(c.kind, TrackerKind::Local);
    }

    #[test]
    fn each_role_gets_its_token_and_everything_else_the_shared_one() {
        let p = TrackerConfig::from_env(&plane_env())
            .expect("plane")
            .plane
            .expect("plane section");
        for (author, token, own) in [
            ("reviewer", "rev", true),
            ("Reviewer", "rev", true),
            ("stream", "str", true),
            ("developer", "shared", false), // empty token
            ("analyst", "shared", false),   // no token
            ("hacker", "shared", false),    // unknown role
            ("", "shared", false),          // empty role
        ] {
            let (t, is_own) = p.token_for(author);
            assert_eq!((t.expose(), is_own), (token, own), "{author:?}");
        }
    }

    #[test]
    fn missing_or_bad_values_name_their_variable() {
        for (env, var) in [
            (Env::from_pairs([("ORCH_TRACKER", "jira")]), "ORCH_TRACKER"),
            (
                Env::from_pairs([("ORCH_TRACKER", "plane")]),
                "PLANE_BASE_URL",
            ),
            (
                Env::from_pairs([("PLANE_BASE_URL", "plane")]),
                "PLANE_BASE_URL",
            ),
            (
                Env::from_pairs([("PLANE_BASE_URL", "http://p")]),
                "PLANE_WORKSPACE_SLUG",
            ),
            (
                Env::from_pairs([
                    ("PLANE_BASE_URL", "http://p"),
                    ("PLANE_WORKSPACE_SLUG", "a/b"),
                ]),
                "PLANE_WORKSPACE_SLUG",
            ),
            (
                Env::from_pairs([
                    ("PLANE_BASE_URL", "http://p"),
                    ("PLANE_WORKSPACE_SLUG", "a"),
                ]),
                "PLANE_API_TOKEN",
            ),
        ] {
            assert_eq!(TrackerConfig::from_env(&env).expect_err(var).var, var);
        }
    }

    #[test]
    fn tokens_never_print() {
        let c = TrackerConfig::from_env(&plane_env()).expect("plane");
        let shown = format!("{c:?}");
        assert!(
            !shown.contains("shared") && !shown.contains("rev\""),
            "{shown}"
        );
    }
}
