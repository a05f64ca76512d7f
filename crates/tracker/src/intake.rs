//! What turns a tracker issue into a work item, and in which repository: read once from the
//! environment and used by both doors — the gateway (a webhook) and stage-engine's
//! reconciliation (a listing) — so the two never disagree.

use std::collections::BTreeMap;

use orchestrator_kit::{ConfigError, Env};

use crate::{Issue, State};

/// The trigger and the repositories.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Intake {
    /// `ORCH_PLANE_TRIGGER_STATE`: a state name (case-insensitive) or state id.
    pub trigger_state: Option<String>,
    /// `ORCH_PLANE_TRIGGER_LABEL`: a label name (case-insensitive) or label id; default
    /// `orchestrator`, `-` for none.
    pub trigger_label: Option<String>,
    pub repos: RepoMap,
}

/// Which repository a Plane project's work items go to.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RepoMap {
    /// `ORCH_PLANE_PROJECT_REPOS`: `<project id>=<owner/name>` pairs, comma-separated.
    pub by_project: BTreeMap<String, String>,
    /// `ORCH_PLANE_DEFAULT_REPO`: for projects not in the map.
    pub default: Option<String>,
}

impl RepoMap {
    /// Returns the repository of a Plane project, if one is configured.
    pub fn repo_for(&self, project_id: &str) -> Option<&str> {
        self.by_project
            .get(project_id)
            .or(self.default.as_ref())
            .map(String::as_str)
    }
}

impl Intake {
    /// Reads the trigger and the repositories; a bad repository or pair names its variable.
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let default = env
            .get("ORCH_PLANE_DEFAULT_REPO")
            .map(|r| checked_repo("ORCH_PLANE_DEFAULT_REPO", r))
            .transpose()?;
        let mut by_project = BTreeMap::new();
        if let Some(raw) = env.get("ORCH_PLANE_PROJECT_REPOS") {
            for pair in raw.split(',').map(str::trim).filter(|p| !p.is_empty()) {
                let Some((project, repo)) = pair.split_once('=') else {
                    return Err(ConfigError::new(
                        "ORCH_PLANE_PROJECT_REPOS",
                        format!("invalid pair '{pair}': expected <project id>=<owner/name>"),
                    ));
                };
                let project = project.trim();
                if project.is_empty() {
                    return Err(ConfigError::new(
                        "ORCH_PLANE_PROJECT_REPOS",
                        format!("invalid pair '{pair}': empty project id"),
                    ));
                }
                by_project.insert(
                    project.to_owned(),
                    checked_repo("ORCH_PLANE_PROJECT_REPOS", repo)?,
                );
            }
        }
        Ok(Intake {
            trigger_state: env
                .get("ORCH_PLANE_TRIGGER_STATE")
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty()),
            trigger_label: Some(
                env.get("ORCH_PLANE_TRIGGER_LABEL")
                    .unwrap_or("orchestrator")
                    .trim()
                    .to_owned(),
            )
            .filter(|l| l != "-" && !l.is_empty()),
            repos: RepoMap {
                by_project,
                default,
            },
        })
    }

    /// Returns whether `state` is the trigger state (by id, or by name in any case).
    pub fn is_trigger_state(&self, state: &State) -> bool {
        self.trigger_state
            .as_deref()
            .is_some_and(|want| state.id == want || state.name.eq_ignore_ascii_case(want))
    }

    /// Returns whether a listed issue is in the trigger state or carries the trigger label.
    pub fn triggers(&self, issue: &Issue) -> bool {
        let in_state = issue
            .state
            .as_ref()
            .is_some_and(|s| self.is_trigger_state(s));
        let has_label = self.trigger_label.as_deref().is_some_and(|want| {
            issue
                .labels
                .iter()
                .any(|l| l.id == want || l.name.eq_ignore_ascii_case(want))
        });
        in_state || has_label
    }

    /// The projects whose issues can become work items: the mapped ones, plus `default`
    /// (the tracker's own project) when a default repository takes it.
    pub fn projects(&self, default: Option<&str>) -> Vec<String> {
        let mut out: Vec<String> = self.repos.by_project.keys().cloned().collect();
        if let Some(p) = default.filter(|p| !p.is_empty())
            && self.repos.default.is_some()
            && !out.iter().any(|o| o == p)
        {
            out.push(p.to_owned());
        }
        out
    }
}

fn checked_repo(var: &str, repo: &str) -> Result<String, ConfigError> {
    let repo = repo.trim();
    orchestrator_git::validate_repo(repo)
        .map(|r| r.to_string())
        .map_err(|e| ConfigError::new(var, format!("invalid repository: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Label;

    fn issue(state: (&str, &str), labels: &[(&str, &str)]) -> Issue {
        Issue {
            id: "i".into(),
            project_id: "p".into(),
            sequence_id: 1,
            name: "n".into(),
            description: String::new(),
            state: Some(State {
                id: state.0.into(),
                name: state.1.into(),
                group: "unstarted".into(),
            }),
            labels: labels
                .iter()
                .map(|(id, name)| Label {
                    id: (*id).into(),
                    name: (*name).into(),
                })
                .collect(),
        }
    }

    #[test]
    fn the_trigger_is_a_state_or_a_label_by_id_or_name() {
        let i = Intake::from_env(&Env::from_pairs([("ORCH_PLANE_TRIGGER_STATE", "Todo")]))
            .expect("intake");
        assert_eq!(i.trigger_label.as_deref(), Some("orchestrator"));
        assert!(i.triggers(&issue(("s1", "todo"), &[])));
        assert!(i.triggers(&issue(("s2", "Backlog"), &[("l1", "Orchestrator")])));
        assert!(!i.triggers(&issue(("s2", "Backlog"), &[("l2", "bug")])));
        let by_id = Intake::from_env(&Env::from_pairs([
            ("ORCH_PLANE_TRIGGER_STATE", "s1"),
            ("ORCH_PLANE_TRIGGER_LABEL", "-"),
        ]))
        .expect("intake");
        assert!(by_id.triggers(&issue(("s1", "Todo"), &[])));
        assert!(!by_id.triggers(&issue(("s2", "Backlog"), &[("l1", "orchestrator")])));
    }

    #[test]
    fn repos_and_projects() {
        let i = Intake::from_env(&Env::from_pairs([
            ("ORCH_PLANE_PROJECT_REPOS", "p1=acme/one, p2=acme/two"),
            ("ORCH_PLANE_DEFAULT_REPO", "acme/app"),
        ]))
        .expect("intake");
        assert_eq!(i.repos.repo_for("p2"), Some("acme/two"));
        assert_eq!(i.repos.repo_for("p9"), Some("acme/app"));
        assert_eq!(i.projects(Some("p0")), ["p1", "p2", "p0"]);
        for (var, value) in [
            ("ORCH_PLANE_DEFAULT_REPO", "acme"),
            ("ORCH_PLANE_PROJECT_REPOS", "p1"),
            ("ORCH_PLANE_PROJECT_REPOS", "=acme/app"),
            ("ORCH_PLANE_PROJECT_REPOS", "p1=../x"),
        ] {
            let e = Intake::from_env(&Env::from_pairs([(var, value)])).expect_err(value);
            assert_eq!(e.var, var);
        }
    }
}
