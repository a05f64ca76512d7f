//! The `QG_CHECKS` registry: for each stage, named checks over the work item's artifacts on
//! its branch (`docs/work-items/<KEY>/`, see `docs/artifacts.md`), its PR and its
//! mergeability. Each check is a pure function of the inputs gathered for it; gathering is
//! the only I/O, done once per evaluation.

use std::collections::BTreeMap;

use crate::pipeline::Stage;

/// Where a work item's artifacts live on its branch.
pub fn artifacts_dir(key: &str) -> String {
    format!("docs/work-items/{key}")
}

/// The artifacts, by file name: the contract with the agents' prompts.
pub mod artifact {
    pub const ANALYSIS: &str = "analysis.md";
    pub const ARCHITECTURE: &str = "architecture.md";
    pub const DEVELOPMENT: &str = "development.md";
    pub const REVIEW: &str = "review.md";
    pub const TEST_REPORT: &str = "test-report.md";
    pub const STAGING: &str = "staging.md";
    pub const DEPLOY: &str = "deploy.md";
}

/// What a check found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    Pass,
    /// Something is missing or malformed: the stage is retried.
    Fail(String),
    /// The agent gave a negative verdict (changes requested, tests failed, FAILED): the
    /// agent-specific rollback branch applies.
    Negative(String),
    /// Not decided yet (CI still running): the item waits where it is, no agent is
    /// launched, and the gate is checked again (`ci`).
    Pending(String),
}

impl CheckOutcome {
    pub fn passed(&self) -> bool {
        matches!(self, CheckOutcome::Pass)
    }

    pub fn detail(&self) -> &str {
        match self {
            CheckOutcome::Pass => "ok",
            CheckOutcome::Fail(d) | CheckOutcome::Negative(d) | CheckOutcome::Pending(d) => d,
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub check: &'static str,
    pub outcome: CheckOutcome,
}

/// What a check reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Input {
    /// A file under `docs/work-items/<KEY>/`.
    Artifact(&'static str),
    /// The work item's PR (head = its branch, base = `ORCH_BASE_BRANCH`).
    Pr,
    /// `MergeGate.CheckBranchMergeable(repo, branch)`.
    Mergeable,
    /// The combined commit status of the PR's head (`ORCH_CI_REQUIRED_REPOS`).
    CiStatus,
}

/// What the CI gate found for the PR's head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CiInput {
    /// The repository is not in `ORCH_CI_REQUIRED_REPOS`.
    NotRequired,
    /// The combined status of `head` (the PR head the gate pins).
    Status {
        head: String,
        status: orchestrator_forge::CombinedStatus,
    },
    /// The status cannot be known (no PR, or a forge that keeps no statuses).
    Unknown(String),
}

/// The PR as the checks see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrInfo {
    pub number: u64,
    pub open: bool,
    pub merged: bool,
    pub head_sha: String,
}

/// `check_branch_mergeable`'s answer: Mergeable | Conflicts(files) | Error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mergeability {
    Mergeable,
    Conflicts(Vec<String>),
    Error(String),
}

/// Everything gathered for one evaluation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    pub key: String,
    /// File name -> text (`None`: absent on the branch).
    pub artifacts: BTreeMap<&'static str, Option<String>>,
    /// `None` inside: no PR. Outer `None`: not gathered.
    pub pr: Option<Option<PrInfo>>,
    pub mergeable: Option<Mergeability>,
    pub ci: Option<CiInput>,
}

/// One entry of the registry.
#[derive(Debug, Clone, Copy)]
pub struct QgCheck {
    pub name: &'static str,
    pub stage: Stage,
    pub input: Input,
    pub eval: fn(&Inputs) -> CheckOutcome,
}

/// The registry: every check of every stage, in the order they are reported.
pub const QG_CHECKS: &[QgCheck] = &[
    QgCheck {
        name: "check_analysis",
        stage: Stage::Analysis,
        input: Input::Artifact(artifact::ANALYSIS),
        eval: check_analysis,
    },
    QgCheck {
        name: "check_architecture",
        stage: Stage::Architecture,
        input: Input::Artifact(artifact::ARCHITECTURE),
        eval: check_architecture,
    },
    QgCheck {
        name: "check_development_notes",
        stage: Stage::Development,
        input: Input::Artifact(artifact::DEVELOPMENT),
        eval: check_development_notes,
    },
    QgCheck {
        name: "check_pr_exists",
        stage: Stage::Development,
        input: Input::Pr,
        eval: check_pr_exists,
    },
    QgCheck {
        name: "check_branch_mergeable",
        stage: Stage::Development,
        input: Input::Mergeable,
        eval: check_branch_mergeable,
    },
    QgCheck {
        name: "check_review_verdict",
        stage: Stage::Review,
        input: Input::Artifact(artifact::REVIEW),
        eval: check_review_verdict,
    },
    QgCheck {
        name: "ci_green",
        stage: Stage::Review,
        input: Input::CiStatus,
        eval: ci_green,
    },
    QgCheck {
        name: "check_test_status",
        stage: Stage::Testing,
        input: Input::Artifact(artifact::TEST_REPORT),
        eval: check_test_status,
    },
    QgCheck {
        name: "check_staging_status",
        stage: Stage::DeployStaging,
        input: Input::Artifact(artifact::STAGING),
        eval: check_staging_status,
    },
    QgCheck {
        name: "check_deploy_status",
        stage: Stage::Deploy,
        input: Input::Artifact(artifact::DEPLOY),
        eval: check_deploy_status,
    },
    // The same check again before `deploy -> done`, whose transaction enqueues the merge: CI
    // gates the merge of the head the deployer delivered, not only review -> testing.
    QgCheck {
        name: "ci_green",
        stage: Stage::Deploy,
        input: Input::CiStatus,
        eval: ci_green,
    },
];

/// The checks of `stage`, in registry order.
pub fn checks_for(stage: Stage) -> impl Iterator<Item = &'static QgCheck> {
    QG_CHECKS.iter().filter(move |c| c.stage == stage)
}

/// Runs the checks of `stage` over `inputs`.
pub fn evaluate(stage: Stage, inputs: &Inputs) -> Vec<CheckResult> {
    checks_for(stage)
        .map(|c| CheckResult {
            check: c.name,
            outcome: (c.eval)(inputs),
        })
        .collect()
}

/// A Markdown file's YAML-style frontmatter (`---` lines around `key: value` pairs) and
/// the body after it. Keys are lower-cased; values trimmed, surrounding quotes removed.
pub fn frontmatter(text: &str) -> Option<(BTreeMap<String, String>, &str)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let rest = text.strip_prefix("---")?;
    let rest = rest
        .strip_prefix("\r\n")
        .or_else(|| rest.strip_prefix('\n'))?;
    let mut fields = BTreeMap::new();
    let mut offset = 0;
    for line in rest.split_inclusive('\n') {
        offset += line.len();
        let l = line.trim_end_matches(['\n', '\r']);
        if l.trim_end() == "---" {
            return Some((fields, &rest[offset..]));
        }
        if let Some((k, v)) = l.split_once(':') {
            let v = v.trim();
            let v = v
                .strip_prefix('"')
                .and_then(|x| x.strip_suffix('"'))
                .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
                .unwrap_or(v);
            fields.insert(k.trim().to_ascii_lowercase(), v.to_owned());
        }
    }
    None
}

/// The artifact `name`, checked to exist, to carry frontmatter naming this work item.
/// `expected` says what the file must hold, for the message when it is missing.
fn artifact<'a>(
    inputs: &'a Inputs,
    name: &str,
    expected: &str,
) -> Result<(BTreeMap<String, String>, &'a str), CheckOutcome> {
    let path = format!("{}/{name}", artifacts_dir(&inputs.key));
    let Some(Some(text)) = inputs.artifacts.get(name) else {
        return Err(CheckOutcome::Fail(format!(
            "{path} is missing (expected: {expected})"
        )));
    };
    let Some((fields, body)) = frontmatter(text) else {
        return Err(CheckOutcome::Fail(format!(
            "{path} has no frontmatter (expected: {expected})"
        )));
    };
    match fields.get("work_item") {
        Some(k) if k == &inputs.key => Ok((fields, body)),
        Some(k) => Err(CheckOutcome::Fail(format!(
            "{path} is for work item '{k}', not {} (expected: work_item: {})",
            inputs.key, inputs.key
        ))),
        None => Err(CheckOutcome::Fail(format!(
            "{path} lacks work_item: {}",
            inputs.key
        ))),
    }
}

/// What a frontmatter block holding `lines` looks like, for the messages.
fn shape(key: &str, lines: &str) -> String {
    format!("a first line ---, work_item: {key}{lines}, a line ---")
}

/// A document artifact: present, for this work item, with a non-empty body.
fn document(inputs: &Inputs, name: &str) -> CheckOutcome {
    let expected = format!("{}, then a non-empty body", shape(&inputs.key, ""));
    match artifact(inputs, name, &expected) {
        Err(o) => o,
        Ok((_, body)) if body.trim().is_empty() => CheckOutcome::Fail(format!(
            "{}/{name} has an empty body (expected: text after the frontmatter)",
            artifacts_dir(&inputs.key)
        )),
        Ok(_) => CheckOutcome::Pass,
    }
}

/// A verdict artifact: `field` is `pass` (pass), `negative` (rollback) or anything else.
fn verdict(inputs: &Inputs, name: &str, field: &str, pass: &str, negative: &str) -> CheckOutcome {
    let expected = shape(&inputs.key, &format!(", {field}: {pass} or {negative}"));
    let (fields, _) = match artifact(inputs, name, &expected) {
        Ok(f) => f,
        Err(o) => return o,
    };
    let path = format!("{}/{name}", artifacts_dir(&inputs.key));
    match fields.get(field).map(|v| v.to_ascii_uppercase()) {
        Some(v) if v == pass => CheckOutcome::Pass,
        Some(v) if v == negative => CheckOutcome::Negative(format!("{path}: {field}: {v}")),
        Some(v) => CheckOutcome::Fail(format!(
            "{path}: {field}: '{v}' is neither {pass} nor {negative}"
        )),
        None => CheckOutcome::Fail(format!(
            "{path} lacks {field}: (expected: {field}: {pass} or {negative})"
        )),
    }
}

/// `ci_green`: the PR head's combined commit status, for the repositories that require CI.
/// Success passes; pending waits; failure or error is a negative verdict naming each failing
/// context with its description and link.
fn ci_green(i: &Inputs) -> CheckOutcome {
    use orchestrator_forge::CiState;
    match &i.ci {
        None => CheckOutcome::Fail("the CI status was not gathered".into()),
        Some(CiInput::NotRequired) => CheckOutcome::Pass,
        Some(CiInput::Unknown(why)) => CheckOutcome::Fail(why.clone()),
        Some(CiInput::Status { head, status }) => {
            let short = &head[..head.len().min(12)];
            match status.state {
                CiState::Success => CheckOutcome::Pass,
                CiState::Pending => {
                    let running: Vec<&str> = status
                        .statuses
                        .iter()
                        .filter(|s| s.state == CiState::Pending)
                        .map(|s| s.context.as_str())
                        .collect();
                    CheckOutcome::Pending(if running.is_empty() {
                        format!("CI has not reported on {short} yet")
                    } else {
                        format!("CI is running on {short}: {}", running.join(", "))
                    })
                }
                CiState::Failure | CiState::Error => {
                    let failing: Vec<String> = status
                        .statuses
                        .iter()
                        .filter(|s| matches!(s.state, CiState::Failure | CiState::Error))
                        .map(|s| {
                            format!(
                                "{} ({}): {} <{}>",
                                s.context,
                                s.state.as_str(),
                                s.description,
                                s.target_url
                            )
                        })
                        .collect();
                    CheckOutcome::Negative(format!(
                        "CI {} on {short}: {}",
                        status.state.as_str(),
                        if failing.is_empty() {
                            "no context named".to_owned()
                        } else {
                            failing.join("; ")
                        }
                    ))
                }
            }
        }
    }
}

fn check_analysis(i: &Inputs) -> CheckOutcome {
    document(i, artifact::ANALYSIS)
}

fn check_architecture(i: &Inputs) -> CheckOutcome {
    document(i, artifact::ARCHITECTURE)
}

fn check_development_notes(i: &Inputs) -> CheckOutcome {
    document(i, artifact::DEVELOPMENT)
}

fn check_pr_exists(i: &Inputs) -> CheckOutcome {
    match &i.pr {
        Some(Some(pr)) if pr.open || pr.merged => CheckOutcome::Pass,
        Some(Some(pr)) => {
            CheckOutcome::Fail(format!("PR #{} is closed without a merge", pr.number))
        }
        Some(None) => CheckOutcome::Fail("no PR for the branch".to_owned()),
        None => CheckOutcome::Fail("the PR was not looked up".to_owned()),
    }
}

fn check_branch_mergeable(i: &Inputs) -> CheckOutcome {
    match &i.mergeable {
        Some(Mergeability::Mergeable) => CheckOutcome::Pass,
        Some(Mergeability::Conflicts(files)) => {
            CheckOutcome::Fail(format!("conflicts with the base in {}", files.join(", ")))
        }
        Some(Mergeability::Error(e)) => CheckOutcome::Fail(format!("mergeability unknown: {e}")),
        None => CheckOutcome::Fail("mergeability was not checked".to_owned()),
    }
}

fn check_review_verdict(i: &Inputs) -> CheckOutcome {
    verdict(
        i,
        artifact::REVIEW,
        "review_verdict",
        "APPROVED",
        "CHANGES_REQUESTED",
    )
}

fn check_test_status(i: &Inputs) -> CheckOutcome {
    verdict(i, artifact::TEST_REPORT, "test_status", "PASSED", "FAILED")
}

fn check_staging_status(i: &Inputs) -> CheckOutcome {
    verdict(i, artifact::STAGING, "staging_status", "SUCCESS", "FAILED")
}

fn check_deploy_status(i: &Inputs) -> CheckOutcome {
    verdict(i, artifact::DEPLOY, "deploy_status", "SUCCESS", "FAILED")
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "ORCH-7";

    fn doc(fields: &str, body: &str) -> String {
        format!("---\nwork_item: {KEY}\n{fields}---\n{body}")
    }

    fn with_artifact(name: &'static str, text: Option<String>) -> Inputs {
        let mut i = Inputs {
            key: KEY.into(),
            ..Inputs::default()
        };
        i.artifacts.insert(name, text);
        i
    }

    fn eval(name: &str, inputs: &Inputs) -> CheckOutcome {
        let c = QG_CHECKS
            .iter()
            .find(|c| c.name == name)
            .expect("registered");
        (c.eval)(inputs)
    }

    #[test]
    fn the_registry_covers_every_working_stage_once_per_name() {
        for stage in Stage::ALL {
            let n = checks_for(stage).count();
            assert_eq!(n == 0, stage == Stage::Done, "{stage} has {n} checks");
        }
        // A name is once per stage; a name at two stages (`ci_green`) is one rule, read from
        // one input.
        let mut names: Vec<(Stage, &str)> = QG_CHECKS.iter().map(|c| (c.stage, c.name)).collect();
        names.sort_by_key(|(s, n)| (s.as_str(), *n));
        names.dedup();
        assert_eq!(names.len(), QG_CHECKS.len());
        for a in QG_CHECKS {
            for b in QG_CHECKS.iter().filter(|b| b.name == a.name) {
                assert!(
                    std::ptr::fn_addr_eq(a.eval, b.eval) && a.input == b.input,
                    "{}",
                    a.name
                );
            }
        }
        // The rollback rules name registered checks of their own stage.
        for rule in crate::pipeline::ROLLBACKS {
            assert!(
                checks_for(rule.stage).any(|c| c.name == rule.check),
                "{rule:?}"
            );
        }
    }

    /// Every document check: passing, and failing for each way it can fail.
    #[test]
    fn document_checks() {
        for (check, name) in [
            ("check_analysis", artifact::ANALYSIS),
            ("check_architecture", artifact::ARCHITECTURE),
            ("check_development_notes", artifact::DEVELOPMENT),
        ] {
            assert_eq!(
                eval(check, &with_artifact(name, Some(doc("", "The plan.\n")))),
                CheckOutcome::Pass,
                "{check}"
            );
            for (text, why) in [
                (None, "is missing"),
                (Some("no frontmatter".to_owned()), "has no frontmatter"),
                (
                    Some("---\ntitle: x\n---\nbody".to_owned()),
                    "lacks work_item",
                ),
                (
                    Some("---\nwork_item: ORCH-8\n---\nbody".to_owned()),
                    "is for work item 'ORCH-8'",
                ),
                (Some(doc("", "  \n")), "has an empty body"),
                (
                    Some(format!("---\nwork_item: {KEY}\nbody without end")),
                    "has no frontmatter",
                ),
            ] {
                match eval(check, &with_artifact(name, text)) {
                    CheckOutcome::Fail(d) => assert!(
                        d.contains(why) && d.contains(&format!("docs/work-items/{KEY}/{name}")),
                        "{check}: {d}"
                    ),
                    other => panic!("{check}: {other:?}"),
                }
            }
        }
    }

    /// Every verdict check: the pass value, the negative value (rollback), and failures.
    #[test]
    fn verdict_checks() {
        for (check, name, field, pass, negative) in [
            (
                "check_review_verdict",
                artifact::REVIEW,
                "review_verdict",
                "APPROVED",
                "CHANGES_REQUESTED",
            ),
            (
                "check_test_status",
                artifact::TEST_REPORT,
                "test_status",
                "PASSED",
                "FAILED",
            ),
            (
                "check_staging_status",
                artifact::STAGING,
                "staging_status",
                "SUCCESS",
                "FAILED",
            ),
            (
                "check_deploy_status",
                artifact::DEPLOY,
                "deploy_status",
                "SUCCESS",
                "FAILED",
            ),
        ] {
            let v =
                |value: &str| with_artifact(name, Some(doc(&format!("{field}: {value}\n"), "")));
            assert_eq!(eval(check, &v(pass)), CheckOutcome::Pass, "{check}");
            assert_eq!(
                eval(check, &v(&pass.to_ascii_lowercase())),
                CheckOutcome::Pass,
                "{check} any case"
            );
            assert_eq!(
                eval(check, &v(&format!("\"{pass}\""))),
                CheckOutcome::Pass,
                "{check} quoted"
            );
            assert!(
                matches!(eval(check, &v(negative)), CheckOutcome::Negative(_)),
                "{check}"
            );
            assert!(
                matches!(eval(check, &v("MAYBE")), CheckOutcome::Fail(d) if d.contains("neither")),
                "{check}"
            );
            assert!(
                matches!(eval(check, &with_artifact(name, Some(doc("", "")))), CheckOutcome::Fail(d) if d.contains(&format!("lacks {field}"))),
                "{check}"
            );
            assert!(
                matches!(eval(check, &with_artifact(name, None)), CheckOutcome::Fail(d) if d.contains("missing")),
                "{check}"
            );
        }
    }

    #[test]
    fn pr_and_mergeability_checks() {
        let pr = |p: Option<Option<PrInfo>>| Inputs {
            key: KEY.into(),
            pr: p,
            ..Inputs::default()
        };
        let info = |open, merged| {
            Some(PrInfo {
                number: 3,
                open,
                merged,
                head_sha: "abc".into(),
            })
        };
        assert_eq!(
            eval("check_pr_exists", &pr(Some(info(true, false)))),
            CheckOutcome::Pass
        );
        assert_eq!(
            eval("check_pr_exists", &pr(Some(info(false, true)))),
            CheckOutcome::Pass
        );
        assert!(
            matches!(eval("check_pr_exists", &pr(Some(info(false, false)))), CheckOutcome::Fail(d) if d.contains("closed"))
        );
        assert!(matches!(
            eval("check_pr_exists", &pr(Some(None))),
            CheckOutcome::Fail(_)
        ));
        assert!(matches!(
            eval("check_pr_exists", &pr(None)),
            CheckOutcome::Fail(_)
        ));

        let m = |m: Option<Mergeability>| Inputs {
            key: KEY.into(),
            mergeable: m,
            ..Inputs::default()
        };
        assert_eq!(
            eval("check_branch_mergeable", &m(Some(Mergeability::Mergeable))),
            CheckOutcome::Pass
        );
        assert!(
            matches!(eval("check_branch_mergeable", &m(Some(Mergeability::Conflicts(vec!["a.rs".into(), "b.rs".into()])))), CheckOutcome::Fail(d) if d.contains("a.rs, b.rs"))
        );
        assert!(
            matches!(eval("check_branch_mergeable", &m(Some(Mergeability::Error("boom".into())))), CheckOutcome::Fail(d) if d.contains("boom"))
        );
        assert!(matches!(
            eval("check_branch_mergeable", &m(None)),
            CheckOutcome::Fail(_)
        ));
    }

    #[test]
    fn frontmatter_parsing() {
        let (f, body) = frontmatter("---\r\nWork_Item: ORCH-1\r\nnote: 'a: b'\r\n---\r\nbody\r\n")
            .expect("parsed");
        assert_eq!(f.get("work_item").map(String::as_str), Some("ORCH-1"));
        assert_eq!(f.get("note").map(String::as_str), Some("a: b"));
        assert_eq!(body, "body\r\n");
        assert!(frontmatter("\u{feff}---\nk: v\n---\n").is_some());
        assert!(frontmatter("text\n---\nk: v\n---\n").is_none());
        assert!(frontmatter("---\nk: v\n").is_none());
    }

    #[test]
    fn evaluate_reports_every_check_of_the_stage_in_order() {
        let r = evaluate(
            Stage::Development,
            &Inputs {
                key: KEY.into(),
                ..Inputs::default()
            },
        );
        assert_eq!(
            r.iter().map(|c| c.check).collect::<Vec<_>>(),
            vec![
                "check_development_notes",
                "check_pr_exists",
                "check_branch_mergeable"
            ]
        );
        assert!(r.iter().all(|c| !c.outcome.passed()));
    }
}

#[cfg(test)]
mod ci_green_tests {
    use orchestrator_forge::{CiState, CombinedStatus, CommitStatus};

    use super::*;

    fn with_ci(ci: Option<CiInput>) -> CheckOutcome {
        ci_green(&Inputs {
            ci,
            ..Inputs::default()
        })
    }

    fn status(state: CiState, contexts: &[(&str, CiState)]) -> Option<CiInput> {
        Some(CiInput::Status {
            head: "0123456789abcdef0123".into(),
            status: CombinedStatus {
                sha: "0123456789abcdef0123".into(),
                state,
                statuses: contexts
                    .iter()
                    .map(|(c, s)| CommitStatus {
                        context: (*c).into(),
                        state: *s,
                        description: format!("{c} said {}", s.as_str()),
                        target_url: format!("https://ci.example.com/{c}"),
                    })
                    .collect(),
            },
        })
    }

    #[test]
    fn ci_green_over_every_state() {
        use CiState::*;
        assert_eq!(with_ci(Some(CiInput::NotRequired)), CheckOutcome::Pass);
        assert_eq!(
            with_ci(status(Success, &[("ci/build", Success)])),
            CheckOutcome::Pass
        );
        assert_eq!(
            with_ci(status(Pending, &[])),
            CheckOutcome::Pending("CI has not reported on 0123456789ab yet".into())
        );
        assert_eq!(
            with_ci(status(
                Pending,
                &[("ci/lint", Success), ("ci/build", Pending)]
            )),
            CheckOutcome::Pending("CI is running on 0123456789ab: ci/build".into())
        );
        assert_eq!(
            with_ci(status(
                Failure,
                &[("ci/lint", Success), ("ci/build", Failure), ("ci/e2e", Error)]
            )),
            CheckOutcome::Negative(
                "CI failure on 0123456789ab: ci/build (failure): ci/build said failure <https://ci.example.com/ci/build>; ci/e2e (error): ci/e2e said error <https://ci.example.com/ci/e2e>".into()
            )
        );
        assert!(matches!(
            with_ci(Some(CiInput::Unknown("no PR".into()))),
            CheckOutcome::Fail(_)
        ));
        assert!(matches!(with_ci(None), CheckOutcome::Fail(_)));
    }
}
