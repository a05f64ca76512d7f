//! The agents' profiles (ARCHITECTURE §3.13): what each agent may do, as data —
//! `<ORCH_AGENTS_DIR>/profiles.toml` (or `ORCH_AGENT_PROFILES`), one table per agent name:
//!
//! ```toml
//! [developer]
//! permission_mode = "acceptEdits"                 # --permission-mode
//! allowed_tools = ["Read", "Edit", "Write", "Bash"]  # --allowedTools
//! disallowed_tools = ["WebFetch"]                 # --disallowedTools
//! model = "sonnet"                                # --model
//! max_turns = 200                                 # --max-turns
//! timeout_s = 3600                                # the watchdog of its runs
//! budget_usd = 5.0                                # --max-budget-usd (per run)
//! network = ["pypi.org"]                          # hosts its sandbox may reach
//! ```
//!
//! The launcher knows no role: a profile is looked up by the job's agent name, a name
//! without a table gets the file's `[default]` table, and a file without one gets
//! [`Profile::safe`] (no shell). With no file at all the profiles shipped in
//! `examples/agents/profiles.toml` apply (embedded at build time). A bad file stops
//! start-up naming the file, the table and the key.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

/// The profiles shipped with the orchestrator: the fallback when the agents directory has
/// no `profiles.toml`.
pub const SHIPPED: &str = include_str!("../../../examples/agents/profiles.toml");

/// The table a name without its own table gets.
pub const DEFAULT_TABLE: &str = "default";

/// Claude Code's permission modes (`--permission-mode`).
pub const PERMISSION_MODES: [&str; 6] = [
    "default",
    "acceptEdits",
    "plan",
    "auto",
    "dontAsk",
    "bypassPermissions",
];

/// What one agent may do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Profile {
    /// The table it came from (`developer`, `default`, or `safe` for the built-in one).
    pub name: String,
    pub permission_mode: Option<String>,
    pub allowed_tools: Vec<String>,
    pub disallowed_tools: Vec<String>,
    pub model: Option<String>,
    pub max_turns: Option<u32>,
    pub timeout: Option<Duration>,
    pub budget_usd: Option<f64>,
    /// Hosts the agent's sandbox may reach besides the model API (recorded; see
    /// docs/security.md for what enforces it).
    pub network: Vec<String>,
    /// `dangerously_skip_permissions = true`: every tool without asking. Refused unless the
    /// sandbox is on.
    pub skip_permissions: bool,
}

impl Profile {
    /// The profile of a name without a table in a file without `[default]`: reads and edits
    /// files, no shell, no web.
    pub fn safe() -> Profile {
        Profile {
            name: "safe".to_owned(),
            permission_mode: Some("acceptEdits".to_owned()),
            disallowed_tools: vec!["Bash".into(), "WebFetch".into(), "WebSearch".into()],
            ..Profile::default()
        }
    }

    /// Whether this profile lets the agent do anything without asking
    /// (`--dangerously-skip-permissions`, `bypassPermissions`).
    pub fn allows_everything(&self) -> bool {
        self.skip_permissions || self.permission_mode.as_deref() == Some("bypassPermissions")
    }

    /// The Claude Code CLI flags that put this profile in force. The budget is the
    /// caller's (it is the smaller of this one and what the work item has left).
    pub fn cli_flags(&self) -> Vec<String> {
        let mut f = Vec::new();
        if let Some(m) = &self.permission_mode {
            f.extend(["--permission-mode".to_owned(), m.clone()]);
        }
        if self.skip_permissions {
            f.push("--dangerously-skip-permissions".to_owned());
        }
        if !self.allowed_tools.is_empty() {
            f.extend(["--allowedTools".to_owned(), self.allowed_tools.join(",")]);
        }
        if !self.disallowed_tools.is_empty() {
            f.extend([
                "--disallowedTools".to_owned(),
                self.disallowed_tools.join(","),
            ]);
        }
        if let Some(m) = &self.model {
            f.extend(["--model".to_owned(), m.clone()]);
        }
        if let Some(n) = self.max_turns {
            f.extend(["--max-turns".to_owned(), n.to_string()]);
        }
        f
    }

    /// The profile as recorded with a run (`GetJob.profile_json`).
    pub fn to_json(&self) -> Value {
        json!({
            "profile": self.name,
            "permission_mode": self.permission_mode,
            "allowed_tools": self.allowed_tools,
            "disallowed_tools": self.disallowed_tools,
            "model": self.model,
            "max_turns": self.max_turns,
            "timeout_s": self.timeout.map(|t| t.as_secs_f64()),
            "budget_usd": self.budget_usd,
            "network": self.network,
            "dangerously_skip_permissions": self.skip_permissions,
        })
    }
}

/// Every agent's profile, from one file.
#[derive(Debug, Clone, PartialEq)]
pub struct Profiles {
    /// Where they were read from (`None`: the shipped ones).
    pub source: Option<PathBuf>,
    by_name: BTreeMap<String, Profile>,
}

/// A bad profile: the file, the table and the key, and what is wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{file}: {place}: {reason}")]
pub struct ProfileError {
    pub file: String,
    /// `[developer] max_turns`, or the parser's position.
    pub place: String,
    pub reason: String,
}

impl Profiles {
    /// Reads `path`, or the shipped profiles when `path` is `None`.
    pub fn load(path: Option<&Path>) -> Result<Profiles, ProfileError> {
        match path {
            None => Profiles::parse(SHIPPED, "the shipped examples/agents/profiles.toml")
                .map(|p| Profiles { source: None, ..p }),
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| ProfileError {
                    file: p.display().to_string(),
                    place: "the file".to_owned(),
                    reason: format!("cannot read it: {e}"),
                })?;
                Profiles::parse(&text, &p.display().to_string()).map(|pr| Profiles {
                    source: Some(p.to_path_buf()),
                    ..pr
                })
            }
        }
    }

    /// Parses a profiles file; `file` names it in errors.
    pub fn parse(text: &str, file: &str) -> Result<Profiles, ProfileError> {
        let err = |place: String, reason: String| ProfileError {
            file: file.to_owned(),
            place,
            reason,
        };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            err("TOML".to_owned(), e.to_string().trim().to_owned())
        })?;
        let mut by_name = BTreeMap::new();
        for (name, value) in &table {
            if crate::service::validate_agent(name).is_err() {
                return Err(err(
                    format!("[{name}]"),
                    "a table is an agent's name: lower-case letters, digits, '-' and '_'"
                        .to_owned(),
                ));
            }
            let Some(t) = value.as_table() else {
                return Err(err(
                    name.clone(),
                    "expected a table ([name] with its keys)".to_owned(),
                ));
            };
            let profile = parse_profile(name, t)
                .map_err(|(key, reason)| err(format!("[{name}] {key}"), reason))?;
            by_name.insert(name.clone(), profile);
        }
        Ok(Profiles {
            source: None,
            by_name,
        })
    }

    /// The profile of `agent`: its table, else `[default]`, else [`Profile::safe`].
    pub fn for_agent(&self, agent: &str) -> Profile {
        self.by_name
            .get(agent)
            .or_else(|| self.by_name.get(DEFAULT_TABLE))
            .cloned()
            .unwrap_or_else(Profile::safe)
    }

    /// The profiles that allow everything, by table name.
    pub fn allowing_everything(&self) -> Vec<&str> {
        self.by_name
            .iter()
            .filter(|(_, p)| p.allows_everything())
            .map(|(n, _)| n.as_str())
            .collect()
    }
}

const KEYS: [&str; 9] = [
    "permission_mode",
    "allowed_tools",
    "disallowed_tools",
    "model",
    "max_turns",
    "timeout_s",
    "budget_usd",
    "network",
    "dangerously_skip_permissions",
];

fn parse_profile(name: &str, t: &toml::Table) -> Result<Profile, (String, String)> {
    let mut p = Profile {
        name: name.to_owned(),
        ..Profile::default()
    };
    for (key, v) in t {
        let bad = |reason: &str| (key.clone(), reason.to_owned());
        match key.as_str() {
            "permission_mode" => {
                let m = v.as_str().ok_or_else(|| bad("expected a string"))?;
                if !PERMISSION_MODES.contains(&m) {
                    return Err(bad(&format!(
                        "'{m}' is not one of {}",
                        PERMISSION_MODES.join(", ")
                    )));
                }
                p.permission_mode = Some(m.to_owned());
            }
            "allowed_tools" => p.allowed_tools = tools(v).map_err(|r| bad(&r))?,
            "disallowed_tools" => p.disallowed_tools = tools(v).map_err(|r| bad(&r))?,
            "model" => {
                let m = v.as_str().ok_or_else(|| bad("expected a string"))?;
                if m.is_empty()
                    || !m
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "-._[]:".contains(c))
                {
                    return Err(bad(
                        "expected a model name or alias (letters, digits, - . _ [ ] :)",
                    ));
                }
                p.model = Some(m.to_owned());
            }
            "max_turns" => {
                let n = v
                    .as_integer()
                    .filter(|n| (1..=100_000).contains(n))
                    .ok_or_else(|| bad("expected a whole number of turns, 1 to 100000"))?;
                p.max_turns = Some(n as u32);
            }
            "timeout_s" => {
                let s = number(v)
                    .filter(|s| s.is_finite() && *s > 0.0)
                    .ok_or_else(|| bad("expected a number of seconds above 0"))?;
                p.timeout = Some(Duration::from_secs_f64(s));
            }
            "budget_usd" => {
                let d = number(v)
                    .filter(|d| d.is_finite() && *d > 0.0)
                    .ok_or_else(|| bad("expected a number of dollars above 0"))?;
                p.budget_usd = Some(d);
            }
            "network" => {
                let hosts = strings(v).map_err(|r| bad(&r))?;
                if let Some(h) = hosts.iter().find(|h| !valid_host(h)) {
                    return Err(bad(&format!(
                        "'{h}' is not a host name (e.g. pypi.org, or *.example.com)"
                    )));
                }
                p.network = hosts;
            }
            "dangerously_skip_permissions" => {
                p.skip_permissions = v.as_bool().ok_or_else(|| bad("expected true or false"))?;
            }
            _ => {
                return Err(bad(&format!("unknown key (known: {})", KEYS.join(", "))));
            }
        }
    }
    Ok(p)
}

fn number(v: &toml::Value) -> Option<f64> {
    v.as_float().or_else(|| v.as_integer().map(|i| i as f64))
}

fn strings(v: &toml::Value) -> Result<Vec<String>, String> {
    let arr = v.as_array().ok_or("expected a list of strings")?;
    arr.iter()
        .map(|x| {
            x.as_str()
                .map(str::to_owned)
                .ok_or_else(|| "expected a list of strings".to_owned())
        })
        .collect()
}

/// A tool name as Claude Code takes it: `Bash`, `mcp__server__tool`, or a rule such as
/// `Bash(npm test:*)`. The list goes to the CLI joined by commas, so a rule holds none.
fn tools(v: &toml::Value) -> Result<Vec<String>, String> {
    let list = strings(v)?;
    for t in &list {
        let (head, rule) = match t.split_once('(') {
            Some((h, r)) => (h, Some(r)),
            None => (t.as_str(), None),
        };
        let head_ok = !head.is_empty()
            && head.starts_with(|c: char| c.is_ascii_alphabetic())
            && head.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        let rule_ok = rule.is_none_or(|r| {
            r.ends_with(')') && !r.contains(',') && !r.chars().any(char::is_control)
        });
        if !head_ok || !rule_ok {
            return Err(format!(
                "'{t}' is not a tool name (e.g. Read, Bash, or Bash(npm test:*), without commas)"
            ));
        }
    }
    Ok(list)
}

fn valid_host(h: &str) -> bool {
    let h = h.strip_prefix("*.").unwrap_or(h);
    !h.is_empty()
        && h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_without_default_gives_the_safe_profile() {
        let p = Profiles::parse("[developer]\nallowed_tools = [\"Bash\"]\n", "p.toml").expect("ok");
        assert_eq!(p.for_agent("reviewer"), Profile::safe());
        assert!(
            Profile::safe()
                .disallowed_tools
                .contains(&"Bash".to_owned())
        );
    }

    #[test]
    fn flags_are_the_cli_s_own() {
        let p = Profiles::parse(
            r#"[developer]
permission_mode = "acceptEdits"
allowed_tools = ["Read", "Edit", "Bash(python3 -m unittest:*)"]
disallowed_tools = ["WebFetch"]
model = "sonnet"
max_turns = 40
timeout_s = 90
budget_usd = 2
network = ["pypi.org", "*.pythonhosted.org"]
"#,
            "p.toml",
        )
        .expect("ok")
        .for_agent("developer");
        assert_eq!(
            p.cli_flags(),
            [
                "--permission-mode",
                "acceptEdits",
                "--allowedTools",
                "Read,Edit,Bash(python3 -m unittest:*)",
                "--disallowedTools",
                "WebFetch",
                "--model",
                "sonnet",
                "--max-turns",
                "40"
            ]
        );
        assert_eq!(p.timeout, Some(Duration::from_secs(90)));
        assert_eq!(p.budget_usd, Some(2.0));
        let j = p.to_json();
        assert_eq!(j["profile"], "developer");
        assert_eq!(j["network"][1], "*.pythonhosted.org");
        assert!(!p.allows_everything());
    }

    #[test]
    fn a_bad_profile_names_the_file_the_table_and_the_key() {
        for (text, place, says) in [
            (
                "[developer]\nmax_turns = 0\n",
                "[developer] max_turns",
                "whole number",
            ),
            (
                "[developer]\nmax_turn = 3\n",
                "[developer] max_turn",
                "unknown key",
            ),
            (
                "[tester]\npermission_mode = \"yolo\"\n",
                "[tester] permission_mode",
                "not one of",
            ),
            (
                "[tester]\nallowed_tools = \"Bash\"\n",
                "[tester] allowed_tools",
                "list of strings",
            ),
            (
                "[tester]\nallowed_tools = [\"Bash(a,b)\"]\n",
                "[tester] allowed_tools",
                "without commas",
            ),
            (
                "[tester]\nallowed_tools = [\"--dangerously-skip-permissions\"]\n",
                "[tester] allowed_tools",
                "not a tool name",
            ),
            (
                "[deployer]\nnetwork = [\"http://x\"]\n",
                "[deployer] network",
                "host name",
            ),
            (
                "[deployer]\ntimeout_s = -1\n",
                "[deployer] timeout_s",
                "above 0",
            ),
            (
                "[deployer]\nbudget_usd = \"lots\"\n",
                "[deployer] budget_usd",
                "dollars",
            ),
            (
                "[deployer]\nmodel = \"a b\"\n",
                "[deployer] model",
                "model name",
            ),
            ("[\"Bad Name\"]\n", "[Bad Name]", "agent's name"),
            ("developer = 3\n", "developer", "expected a table"),
            ("[developer\n", "TOML", ""),
        ] {
            let e = Profiles::parse(text, "/srv/agents/profiles.toml").expect_err(text);
            assert_eq!(e.file, "/srv/agents/profiles.toml", "{text}");
            assert_eq!(e.place, place, "{text}: {e}");
            assert!(e.reason.contains(says), "{text}: {e}");
        }
    }

    #[test]
    fn allowing_everything_is_seen() {
        let p = Profiles::parse(
            "[a]\ndangerously_skip_permissions = true\n[b]\npermission_mode = \"bypassPermissions\"\n[c]\n",
            "p.toml",
        )
        .expect("ok");
        assert_eq!(p.allowing_everything(), ["a", "b"]);
        assert!(
            p.for_agent("a")
                .cli_flags()
                .contains(&"--dangerously-skip-permissions".to_owned())
        );
    }
}
