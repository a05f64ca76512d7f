//! Start-up checks of the configuration that can only be made against the machine: the
//! agents directory and a prompt for every role (the roles are stage-engine's, handed in by
//! whoever starts the launcher), and the agent command on PATH. A missing
//! prompt fails start-up (every job of that role would fail at its first launch); a missing
//! command only warns, because it may be installed later — the queue snapshot looks again.

use std::path::{Path, PathBuf};

use orchestrator_kit::ConfigError;

use crate::config::LauncherConfig;

impl LauncherConfig {
    /// Checks the agents directory and its prompts (the first missing file is the error),
    /// says where the prompts are read from, and warns when the agent command is not found.
    pub fn check_at_start(&self, roles: &[&str]) -> Result<(), ConfigError> {
        let dir = &self.agents_dir;
        if !dir.is_dir() {
            return Err(ConfigError::new(
                "ORCH_AGENTS_DIR",
                format!(
                    "{} is not a directory (a relative path is resolved against the directory \
                     the orchestrator was started in)",
                    dir.display()
                ),
            ));
        }
        if let Some(missing) = missing_prompt(dir, roles) {
            let all: Vec<String> = roles.iter().map(|r| format!("{r}.md")).collect();
            return Err(ConfigError::new(
                "ORCH_AGENTS_DIR",
                format!(
                    "{} is missing: every role needs its prompt ({})",
                    missing.display(),
                    all.join(", ")
                ),
            ));
        }
        tracing::info!(agents_dir = %dir.display(), "the agents' prompts are read from here");
        self.check_profiles()?;
        // A newcomer's trap (docs/local-mode.md): the command runs in each job's checkout,
        // so `python3 examples/agents/scripted-agent.py` names a file of the repository being
        // worked on, not the one beside the orchestrator. Said, never rewritten: a command
        // may mean a script that the repository itself carries.
        if let Ok(here) = std::env::current_dir() {
            for (arg, abs) in relative_paths_here(&self.agent_command, &here) {
                tracing::warn!(
                    argument = %arg,
                    absolute = %abs.display(),
                    "ORCH_AGENT_COMMAND names a file by a relative path, which is resolved in \
                     each job's checkout, not where the orchestrator started; give the absolute \
                     path if this file is meant"
                );
            }
        }
        match &self.deploy_targets {
            None => tracing::warn!(
                "ORCH_DEPLOY_TARGETS_JSON is not set: no repo has a deploy target, so every \
                 deploy-staging and deploy run fails and parks its work item blocked with \
                 \"no deploy target for <repo>\" (docs/deploy.md)"
            ),
            Some(t) => tracing::info!(
                repos = %t.keys().cloned().collect::<Vec<_>>().join(","),
                "deploy targets: the launcher runs their staging and deploy commands"
            ),
        }
        if self.agent_command_found().is_none() {
            tracing::warn!(
                command = %self.agent_command[0],
                "the agent command (ORCH_AGENT_COMMAND) is not found on PATH: every job will \
                 fail until it is installed"
            );
        }
        Ok(())
    }

    /// Refuses a profile that allows everything unless the sandbox is on, and says where
    /// the profiles come from.
    fn check_profiles(&self) -> Result<(), ConfigError> {
        let file = self.profiles.source.as_ref().map_or_else(
            || "the shipped examples/agents/profiles.toml".to_owned(),
            |p| p.display().to_string(),
        );
        let everything = self.profiles.allowing_everything();
        if let Some(name) = everything.first() {
            let sandbox = self.sandbox.availability(self.search_path.as_deref());
            if sandbox != crate::sandbox::Availability::On {
                return Err(ConfigError::new(
                    "ORCH_AGENT_PROFILES",
                    format!(
                        "{file}: [{name}] allows everything (dangerously_skip_permissions or \
                         bypassPermissions), which is refused unless the agent sandbox is on \
                         (ORCH_AGENT_SANDBOX; here: {sandbox:?})"
                    ),
                ));
            }
        }
        tracing::info!(profiles = %file, "the agents' profiles are read from here");
        Ok(())
    }

    /// Where the agent command (the first word of `ORCH_AGENT_COMMAND`) is, if it exists: a
    /// path as given, else the first match on the launcher's PATH. A few `stat` calls.
    pub fn agent_command_found(&self) -> Option<PathBuf> {
        find_command(&self.agent_command[0], self.search_path.as_deref())
    }
}

/// The words of `command` that name, by a relative path (with a `/`), a file that exists
/// under `here`, with that file's absolute path.
fn relative_paths_here(command: &[String], here: &Path) -> Vec<(String, PathBuf)> {
    command
        .iter()
        .filter(|w| w.contains('/') && !w.starts_with('/') && !w.starts_with('-'))
        .filter_map(|w| {
            let abs = here.join(w);
            abs.exists().then(|| (w.clone(), abs))
        })
        .collect()
}

/// The first role prompt (`<role>.md`) missing from `dir`.
fn missing_prompt(dir: &Path, roles: &[&str]) -> Option<PathBuf> {
    roles
        .iter()
        .map(|r| dir.join(format!("{r}.md")))
        .find(|p| !p.is_file())
}

/// `command` as a shell would find it: a name with a `/` as a path, otherwise the first
/// executable file of that name in `path` (`:`-separated).
pub fn find_command(command: &str, path: Option<&str>) -> Option<PathBuf> {
    if command.contains('/') {
        let p = PathBuf::from(command);
        return is_executable(&p).then_some(p);
    }
    path?
        .split(':')
        .filter(|d| !d.is_empty())
        .map(|d| Path::new(d).join(command))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_found_as_a_shell_finds_them() {
        let dir = tempfile::tempdir().expect("tempdir");
        let bin = dir.path().join("bin");
        std::fs::create_dir_all(&bin).expect("bin");
        let tool = bin.join("agent-cli");
        std::fs::write(&tool, "#!/bin/sh\n").expect("write");
        let plain = bin.join("not-executable");
        std::fs::write(&plain, "").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        let path = format!("/nonexistent:{}", bin.display());
        assert_eq!(find_command("agent-cli", Some(&path)), Some(tool.clone()));
        assert_eq!(find_command("not-executable", Some(&path)), None);
        assert_eq!(find_command("claude-nowhere", Some(&path)), None);
        assert_eq!(find_command("agent-cli", None), None);
        assert_eq!(
            find_command(&tool.display().to_string(), None),
            Some(tool.clone())
        );
        assert_eq!(find_command("/nonexistent/agent-cli", Some(&path)), None);
    }

    #[test]
    fn relative_paths_that_exist_here_are_named() {
        let here = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir_all(here.path().join("examples/agents")).expect("dir");
        std::fs::write(here.path().join("examples/agents/scripted-agent.py"), "").expect("write");
        let words = |c: &str| c.split_whitespace().map(str::to_owned).collect::<Vec<_>>();
        assert_eq!(
            relative_paths_here(
                &words("python3 examples/agents/scripted-agent.py"),
                here.path()
            ),
            vec![(
                "examples/agents/scripted-agent.py".to_owned(),
                here.path().join("examples/agents/scripted-agent.py")
            )]
        );
        // Absolute, missing here, options, plain names: nothing to say.
        let abs = here.path().join("examples/agents/scripted-agent.py");
        for c in [
            format!("python3 {}", abs.display()),
            "python3 scripts/agent.py".to_owned(),
            "claude -p --output-format json --settings=a/b.json".to_owned(),
        ] {
            assert!(
                relative_paths_here(&words(&c), here.path()).is_empty(),
                "{c}"
            );
        }
    }

    #[test]
    fn a_missing_prompt_is_named() {
        let dir = tempfile::tempdir().expect("tempdir");
        let roles = ["writer", "checker"];
        for r in roles {
            std::fs::write(dir.path().join(format!("{r}.md")), "You are it.\n").expect("write");
        }
        assert_eq!(missing_prompt(dir.path(), &roles), None);
        std::fs::remove_file(dir.path().join("checker.md")).expect("rm");
        assert_eq!(
            missing_prompt(dir.path(), &roles),
            Some(dir.path().join("checker.md"))
        );
    }
}
