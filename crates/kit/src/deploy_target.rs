//! Deploy targets (`ORCH_DEPLOY_TARGETS_JSON`): per repo, the commands that deploy it to
//! staging and to production, and where the post-deploy watch probes it. One home for the
//! format, so that the launcher (which runs the commands) and post-deploy (which watches
//! and rolls back) read the same target.
//!
//! A command is a template of words: a JSON array of strings, or a string split on
//! whitespace. It is never given to a shell: each word becomes one argv element, and the
//! placeholders `{repo}`, `{sha}`, `{previous_sha}`, `{branch}`, `{work_item}` inside a
//! word are replaced by values validated first ([`Vars::validate`]), so a value with shell
//! metacharacters is refused rather than quoted. The rollback command (post-deploy's) is
//! rendered the same way, with [`ROLLBACK_PLACEHOLDERS`].

use std::collections::BTreeMap;

use serde::Deserialize;

/// The placeholders a staging or deploy command may use.
pub const PLACEHOLDERS: [&str; 5] = ["repo", "sha", "previous_sha", "branch", "work_item"];

/// The placeholders a rollback command may use: what post-deploy's watch knows (no branch;
/// `{deployed_sha}`, the commit being rolled back, is `{sha}` by its older name).
pub const ROLLBACK_PLACEHOLDERS: [&str; 5] =
    ["repo", "sha", "deployed_sha", "previous_sha", "work_item"];

/// What makes a one-line rollback command need a shell. Before #16 that line was run by
/// `sh -c`; it is argv now, so a line that used the shell is refused, not run differently.
const SHELL_SYNTAX: &[char] = &[
    ';', '|', '&', '<', '>', '$', '`', '\'', '"', '\\', '*', '?', '(', ')', '~', '#', '\n',
];

/// Whether `name` holds one of the orchestrator's own secrets, which no command the
/// orchestrator runs for a repo (staging, deploy, rollback) is given.
pub fn is_orchestrator_secret(name: &str) -> bool {
    matches!(
        name,
        "ORCH_INTERNAL_TOKEN"
            | "ORCH_DATABASE_URL"
            | "PLANE_API_TOKEN"
            | "PLANE_WEBHOOK_SECRET"
            | "GITEA_TOKEN"
            | "GITEA_WEBHOOK_SECRET"
    ) || name.starts_with("PLANE_BOT_TOKEN_")
}

/// One repo's deploy target.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployTarget {
    /// Deploys the branch's head to staging; its exit status is `staging_status`.
    #[serde(default, deserialize_with = "words")]
    pub staging_command: Vec<String>,
    /// Deploys the branch's head to production; its exit status is `deploy_status`.
    #[serde(default, deserialize_with = "words")]
    pub deploy_command: Vec<String>,
    /// A GET that answers 2xx while production is healthy (the post-deploy watch).
    #[serde(default)]
    pub health_url: String,
    /// A Prometheus text exposition with the request counter (the post-deploy watch).
    #[serde(default)]
    pub metrics_url: String,
    /// Puts `{previous_sha}` back in production (the post-deploy watch's rollback).
    #[serde(default)]
    pub rollback_command: CommandSpec,
    /// How long the staging or deploy command may run before it is killed (default 600).
    #[serde(default = "default_timeout_s")]
    pub timeout_s: u64,
}

fn default_timeout_s() -> u64 {
    600
}

fn words<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Words {
        One(String),
        Many(Vec<String>),
    }
    Ok(match Words::deserialize(d)? {
        Words::One(s) => s.split_whitespace().map(str::to_owned).collect(),
        Words::Many(v) => v,
    })
}

/// A command as configured: argv (a JSON array of strings), or one line of words split on
/// whitespace. Either way it is argv: no shell ever reads it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(untagged)]
pub enum CommandSpec {
    Line(String),
    Argv(Vec<String>),
}

impl Default for CommandSpec {
    fn default() -> Self {
        Self::Argv(Vec::new())
    }
}

impl CommandSpec {
    /// The command's words, its placeholders not yet replaced (empty: none configured).
    pub fn words(&self) -> Vec<String> {
        match self {
            Self::Line(s) => s.split_whitespace().map(str::to_owned).collect(),
            Self::Argv(v) => v.clone(),
        }
    }

    /// Whether no command is configured.
    pub fn is_empty(&self) -> bool {
        self.words().is_empty()
    }
}

/// Checks `repo`'s rollback command where it is read (start-up): only
/// [`ROLLBACK_PLACEHOLDERS`], and a one-line form without shell syntax — that line was
/// `sh -c`'s before #16, and a pipe or a redirection would now be passed as a plain word.
pub fn check_rollback(repo: &str, spec: &CommandSpec) -> Result<(), String> {
    if let CommandSpec::Line(line) = spec
        && let Some(c) = line.chars().find(|c| SHELL_SYNTAX.contains(c))
    {
        return Err(format!(
            "'{repo}'.rollback_command: '{line}' uses shell syntax ({c:?}), but the command \
             is run as argv, never by a shell: give it as a JSON array of words, \
             e.g. [\"deploy/rollback.sh\", \"{{previous_sha}}\"] (or [\"sh\", \"-c\", \"...\"] \
             with the values from $ORCH_ROLLBACK_*)"
        ));
    }
    check_placeholders(
        repo,
        "rollback_command",
        &spec.words(),
        &ROLLBACK_PLACEHOLDERS,
    )
}

/// Refuses a word with an unknown (or unclosed) placeholder, naming the repo and the key.
fn check_placeholders(
    repo: &str,
    key: &str,
    words: &[String],
    known: &[&str],
) -> Result<(), String> {
    for w in words {
        let mut rest = w.as_str();
        while let Some(i) = rest.find('{') {
            let after = &rest[i + 1..];
            let name = after.split('}').next().unwrap_or_default();
            if !after.contains('}') || !known.contains(&name) {
                return Err(format!(
                    "'{repo}'.{key}: unknown placeholder in '{w}' (known: {})",
                    known
                        .iter()
                        .map(|p| format!("{{{p}}}"))
                        .collect::<Vec<_>>()
                        .join(" ")
                ));
            }
            rest = &after[name.len() + 1..];
        }
    }
    Ok(())
}

/// Which of a target's two commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeployStep {
    Staging,
    Production,
}

impl DeployStep {
    /// The step a pipeline stage runs, if any: `deploy-staging` and `deploy`.
    pub fn for_stage(stage: &str) -> Option<Self> {
        match stage {
            "deploy-staging" => Some(Self::Staging),
            "deploy" => Some(Self::Production),
            _ => None,
        }
    }

    /// The artifact's file name (`staging.md`, `deploy.md`).
    pub fn artifact(self) -> &'static str {
        match self {
            Self::Staging => "staging.md",
            Self::Production => "deploy.md",
        }
    }

    /// The frontmatter key the command's exit status decides.
    pub fn status_key(self) -> &'static str {
        match self {
            Self::Staging => "staging_status",
            Self::Production => "deploy_status",
        }
    }

    /// The target's key for this step's command.
    pub fn command_key(self) -> &'static str {
        match self {
            Self::Staging => "staging_command",
            Self::Production => "deploy_command",
        }
    }
}

impl DeployTarget {
    /// The command template of `step` (empty: none configured).
    pub fn command(&self, step: DeployStep) -> &[String] {
        match step {
            DeployStep::Staging => &self.staging_command,
            DeployStep::Production => &self.deploy_command,
        }
    }
}

/// The values of the placeholders for one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vars<'a> {
    pub repo: &'a str,
    pub sha: &'a str,
    pub previous_sha: &'a str,
    pub branch: &'a str,
    pub work_item: &'a str,
}

impl Vars<'_> {
    /// Refuses any value that is not what its name says, naming it: a sha is 7 to 64 hex
    /// digits (`previous_sha` may be empty: a first deploy), a repo is `owner/name`, a
    /// branch a plain ref name (empty for a rollback, whose command may not use it), a
    /// work item a key.
    pub fn validate(&self) -> Result<(), String> {
        let hex = |s: &str| (7..=64).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_hexdigit());
        let plain = |s: &str, extra: &[u8]| {
            !s.is_empty()
                && !s.starts_with(['-', '.', '/'])
                && !s.contains("..")
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b) || extra.contains(&b))
        };
        let checks: [(&str, &str, bool); 5] = [
            ("sha", self.sha, hex(self.sha)),
            (
                "previous_sha",
                self.previous_sha,
                self.previous_sha.is_empty() || hex(self.previous_sha),
            ),
            (
                "repo",
                self.repo,
                plain(self.repo, b"/") && self.repo.matches('/').count() == 1,
            ),
            (
                "branch",
                self.branch,
                self.branch.is_empty() || plain(self.branch, b"/"),
            ),
            ("work_item", self.work_item, plain(self.work_item, b"")),
        ];
        for (name, value, ok) in checks {
            if !ok {
                return Err(format!("{{{name}}}: '{value}' is not a valid {name}"));
            }
        }
        Ok(())
    }

    fn get(&self, name: &str) -> &str {
        match name {
            "repo" => self.repo,
            "sha" | "deployed_sha" => self.sha,
            "previous_sha" => self.previous_sha,
            "branch" => self.branch,
            _ => self.work_item,
        }
    }
}

/// The argv of `template` with its placeholders replaced, after [`Vars::validate`].
pub fn render(template: &[String], vars: &Vars<'_>) -> Result<Vec<String>, String> {
    vars.validate()?;
    Ok(template
        .iter()
        .map(|w| {
            PLACEHOLDERS
                .iter()
                .chain(&ROLLBACK_PLACEHOLDERS)
                .fold(w.clone(), |w, p| {
                    w.replace(&format!("{{{p}}}"), vars.get(p))
                })
        })
        .collect())
}

/// Parses `{"owner/name": {"deploy_command": [..], ..}, ..}`; the error names the repo and
/// the key.
pub fn parse_targets(raw: &str) -> Result<BTreeMap<String, DeployTarget>, String> {
    let map: BTreeMap<String, DeployTarget> =
        serde_json::from_str(raw).map_err(|e| format!("invalid JSON: {e}"))?;
    for (repo, t) in &map {
        let probe = Vars {
            repo,
            sha: "0000000",
            previous_sha: "",
            branch: "main",
            work_item: "X-1",
        };
        if let Err(e) = probe.validate() {
            return Err(format!("'{repo}': not an owner/name repo ({e})"));
        }
        for step in [DeployStep::Staging, DeployStep::Production] {
            check_placeholders(repo, step.command_key(), t.command(step), &PLACEHOLDERS)?;
        }
        check_rollback(repo, &t.rollback_command)?;
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
        if t.timeout_s == 0 {
            return Err(format!("'{repo}'.timeout_s: must be at least 1"));
        }
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars<'a>(sha: &'a str) -> Vars<'a> {
        Vars {
            repo: "acme/shop",
            sha,
            previous_sha: "",
            branch: "orch/ORCH-1",
            work_item: "ORCH-1",
        }
    }

    #[test]
    fn a_command_is_words_and_placeholders_become_whole_argv_elements() {
        let m = parse_targets(
            r#"{"acme/shop":{"deploy_command":"deploy/ship.sh {repo} --sha={sha} $HOME;x",
                "staging_command":["a b","{branch}"]}}"#,
        )
        .expect("valid");
        let t = &m["acme/shop"];
        let argv = render(t.command(DeployStep::Production), &vars("abcdef1")).expect("valid");
        assert_eq!(
            argv,
            ["deploy/ship.sh", "acme/shop", "--sha=abcdef1", "$HOME;x"]
        );
        let argv = render(t.command(DeployStep::Staging), &vars("abcdef1")).expect("valid");
        assert_eq!(argv, ["a b", "orch/ORCH-1"]);
        assert_eq!(t.timeout_s, 600);
    }

    #[test]
    fn a_value_with_shell_metacharacters_is_refused_by_name() {
        let t = vec!["x".to_owned(), "{sha}".to_owned()];
        let e = render(&t, &vars("abc; rm -rf /")).expect_err("refused");
        assert!(e.contains("{sha}"), "{e}");
        let mut v = vars("abcdef1");
        v.branch = "main$(id)";
        assert!(render(&t, &v).expect_err("refused").contains("{branch}"));
        v.branch = "-delete";
        assert!(render(&t, &v).is_err());
        let mut v = vars("abcdef1");
        v.repo = "../etc";
        assert!(render(&t, &v).expect_err("refused").contains("{repo}"));
        let mut v = vars("abcdef1");
        v.previous_sha = "`id`";
        assert!(
            render(&t, &v)
                .expect_err("refused")
                .contains("{previous_sha}")
        );
    }

    #[test]
    fn the_orchestrator_secrets_are_named_once() {
        for v in [
            "GITEA_TOKEN",
            "ORCH_INTERNAL_TOKEN",
            "PLANE_BOT_TOKEN_DEPLOYER",
        ] {
            assert!(is_orchestrator_secret(v), "{v}");
        }
        for v in ["PATH", "HOME", "AWS_PROFILE", "ORCH_DEPLOY_TARGETS_JSON"] {
            assert!(!is_orchestrator_secret(v), "{v}");
        }
    }

    #[test]
    fn a_rollback_is_argv_with_its_own_placeholders_and_a_shell_line_is_refused() {
        let m = parse_targets(
            r#"{"a/b":{"rollback_command":"deploy/back.sh {repo} {previous_sha} {deployed_sha}"},
                "a/c":{"rollback_command":["sh","-c","echo $ORCH_ROLLBACK_PREVIOUS_SHA >> log","{sha}"]}}"#,
        )
        .expect("valid");
        let vars = Vars {
            repo: "a/b",
            sha: "def5678",
            previous_sha: "abc1234",
            branch: "",
            work_item: "SHOP-1",
        };
        assert_eq!(
            render(&m["a/b"].rollback_command.words(), &vars).expect("valid"),
            ["deploy/back.sh", "a/b", "abc1234", "def5678"]
        );
        assert_eq!(
            render(&m["a/c"].rollback_command.words(), &vars).expect("valid")[3],
            "def5678"
        );
        for (raw, needle) in [
            (
                r#"{"a/b":{"rollback_command":"back {previous_sha} >> log"}}"#,
                "shell syntax ('>')",
            ),
            (r#"{"a/b":{"rollback_command":"back; rm x"}}"#, "JSON array"),
            (
                r#"{"a/b":{"rollback_command":["back","{branch}"]}}"#,
                "'a/b'.rollback_command: unknown placeholder",
            ),
        ] {
            let e = parse_targets(raw).expect_err(raw);
            assert!(e.contains(needle), "{raw}: {e}");
        }
    }

    #[test]
    fn bad_targets_name_the_repo_and_the_key() {
        for (raw, needle) in [
            ("{", "invalid JSON"),
            (r#"{"shop":{}}"#, "'shop'"),
            (
                r#"{"a/b":{"deploy_command":"x {shaa}"}}"#,
                "'a/b'.deploy_command",
            ),
            (
                r#"{"a/b":{"staging_command":"x {sha"}}"#,
                "'a/b'.staging_command",
            ),
            (r#"{"a/b":{"health_url":"ftp://x"}}"#, "'a/b'.health_url"),
            (r#"{"a/b":{"timeout_s":0}}"#, "'a/b'.timeout_s"),
            (r#"{"a/b":{"deploy_comand":"x"}}"#, "deploy_comand"),
        ] {
            let e = parse_targets(raw).expect_err(raw);
            assert!(e.contains(needle), "{raw}: {e}");
        }
    }
}
