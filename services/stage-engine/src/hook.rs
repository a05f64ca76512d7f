//! The quality gate as the agent's Stop hook (`orchestrator qg-hook`): the same
//! `QG_CHECKS` registry, run inside the agent's run over its checkout, so that the agent is
//! told what its gate still lacks before it stops instead of the system paying for a new
//! launch. Only the artifact checks run here (the PR and mergeability come after the run);
//! a negative verdict is a legitimate way to finish and does not block.
//!
//! Exit codes, as the Claude Code CLI reads them: 0 lets the agent stop; 2 keeps it working
//! and feeds stderr back to the model; 1 is the hook's own error (the agent stops; the real
//! gate decides later). Blocks per run are bounded by a counter file.

use std::path::{Path, PathBuf};

use crate::pipeline::Stage;
use crate::qg::{CheckOutcome, Input, Inputs, artifacts_dir, checks_for};

/// What the hook was asked.
#[derive(Debug, Clone)]
pub struct HookRequest {
    pub work_item: String,
    pub stage: String,
    /// The checkout; when `None`, the `cwd` of the hook's stdin JSON, else the current dir.
    pub dir: Option<PathBuf>,
    /// Blocks allowed per run; once spent the hook lets the agent stop.
    pub max_blocks: u32,
    /// Where the number of blocks so far is kept (outside the checkout); none: unbounded.
    pub state_file: Option<PathBuf>,
}

/// The hook's answer: an exit code and what to print on stderr.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookAnswer {
    pub code: u8,
    pub stderr: String,
}

fn error(msg: impl Into<String>) -> HookAnswer {
    HookAnswer {
        code: 1,
        stderr: format!("qg-hook: {}", msg.into()),
    }
}

/// Runs the hook. `stdin` is the CLI's Stop-hook input (JSON; may be empty).
pub fn run_hook(req: &HookRequest, stdin: &str) -> HookAnswer {
    let key = match orchestrator_git::validate_work_item_key(req.work_item.trim()) {
        Ok(k) => k,
        Err(e) => return error(e.to_string()),
    };
    let stage: Stage = match req.stage.trim().parse() {
        Ok(s) => s,
        Err(e) => return error(e),
    };
    let input: serde_json::Value = serde_json::from_str(stdin).unwrap_or(serde_json::Value::Null);
    let dir = match (&req.dir, input["cwd"].as_str()) {
        (Some(d), _) => d.clone(),
        (None, Some(cwd)) if !cwd.is_empty() => PathBuf::from(cwd),
        _ => match std::env::current_dir() {
            Ok(d) => d,
            Err(e) => return error(format!("no checkout directory: {e}")),
        },
    };
    let missing = match missing_artifacts(stage, key, &dir) {
        Ok(m) => m,
        Err(e) => return error(e),
    };
    if missing.is_empty() {
        return HookAnswer {
            code: 0,
            stderr: String::new(),
        };
    }
    let blocks = req.state_file.as_deref().map(read_count).unwrap_or(0);
    if req.state_file.is_some() && blocks >= req.max_blocks {
        return HookAnswer {
            code: 0,
            stderr: format!(
                "qg-hook: the quality gate still fails after {blocks} blocks; letting the agent stop: {}",
                missing.join("; ")
            ),
        };
    }
    if let Some(f) = &req.state_file
        && let Err(e) = std::fs::write(f, (blocks + 1).to_string())
    {
        return error(format!("cannot write {}: {e}", f.display()));
    }
    HookAnswer {
        code: 2,
        stderr: format!(
            "QUALITY GATE of stage {stage} for {key} is not met yet. Fix this before you stop:\n- {}\nWrite or fix these files in the checkout (the orchestrator commits them), then finish.",
            missing.join("\n- ")
        ),
    }
}

fn read_count(path: &Path) -> u32 {
    std::fs::read_to_string(path)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// The artifact checks of `stage` that fail over the files in `dir` (negative verdicts
/// pass: they are an answer).
pub fn missing_artifacts(stage: Stage, key: &str, dir: &Path) -> Result<Vec<String>, String> {
    let mut inputs = Inputs {
        key: key.to_owned(),
        ..Inputs::default()
    };
    let mut checks = Vec::new();
    for c in checks_for(stage) {
        if let Input::Artifact(name) = c.input {
            let path = dir.join(artifacts_dir(key)).join(name);
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => Some(t),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
                Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
            };
            inputs.artifacts.insert(name, text);
            checks.push(c);
        }
    }
    Ok(checks
        .iter()
        .filter_map(|c| match (c.eval)(&inputs) {
            CheckOutcome::Fail(d) => Some(format!("{}: {d}", c.name)),
            CheckOutcome::Pass | CheckOutcome::Negative(_) | CheckOutcome::Pending(_) => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(dir: &Path, state: Option<PathBuf>) -> HookRequest {
        HookRequest {
            work_item: "ORCH-7".into(),
            stage: "review".into(),
            dir: Some(dir.to_path_buf()),
            max_blocks: 2,
            state_file: state,
        }
    }

    fn write(dir: &Path, name: &str, text: &str) {
        let p = dir.join("docs/work-items/ORCH-7").join(name);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(p, text).expect("write");
    }

    #[test]
    fn blocks_until_the_artifact_is_there_then_passes() {
        let d = tempfile::tempdir().expect("tempdir");
        let state = d.path().join("blocks");
        let a = run_hook(&req(d.path(), Some(state.clone())), "");
        assert_eq!(a.code, 2);
        assert!(
            a.stderr.contains("check_review_verdict") && a.stderr.contains("review.md is missing"),
            "{}",
            a.stderr
        );
        write(
            d.path(),
            "review.md",
            "---\nwork_item: ORCH-7\nreview_verdict: maybe\n---\n",
        );
        let a = run_hook(&req(d.path(), Some(state.clone())), "");
        assert_eq!(a.code, 2);
        assert!(
            a.stderr.contains("neither APPROVED nor CHANGES_REQUESTED"),
            "{}",
            a.stderr
        );
        // Bounded: the third block lets the agent stop.
        let a = run_hook(&req(d.path(), Some(state.clone())), "");
        assert_eq!(a.code, 0);
        assert!(a.stderr.contains("after 2 blocks"), "{}", a.stderr);
        // A negative verdict is an answer: the agent may stop.
        write(
            d.path(),
            "review.md",
            "---\nwork_item: ORCH-7\nreview_verdict: CHANGES_REQUESTED\n---\n",
        );
        assert_eq!(run_hook(&req(d.path(), None), "").code, 0);
        write(
            d.path(),
            "review.md",
            "---\nwork_item: ORCH-7\nreview_verdict: APPROVED\n---\n",
        );
        assert_eq!(
            run_hook(&req(d.path(), None), ""),
            HookAnswer {
                code: 0,
                stderr: String::new()
            }
        );
    }

    #[test]
    fn the_checkout_comes_from_the_hook_input_when_not_given() {
        let d = tempfile::tempdir().expect("tempdir");
        write(
            d.path(),
            "analysis.md",
            "---\nwork_item: ORCH-7\n---\nplan\n",
        );
        let mut r = req(d.path(), None);
        r.dir = None;
        r.stage = "analysis".into();
        let stdin = serde_json::json!({"hook_event_name": "Stop", "stop_hook_active": false, "cwd": d.path()}).to_string();
        assert_eq!(run_hook(&r, &stdin).code, 0);
    }

    #[test]
    fn its_own_errors_exit_1() {
        let d = tempfile::tempdir().expect("tempdir");
        let mut r = req(d.path(), None);
        r.stage = "nowhere".into();
        assert_eq!(run_hook(&r, "").code, 1);
        let mut r = req(d.path(), None);
        r.work_item = "../etc-1".into();
        assert_eq!(run_hook(&r, "").code, 1);
    }

    /// A stage's artifact check in the hook: the file, a passing text, failing texts with
    /// what the message must say, and the negative verdict (an answer: the agent may stop).
    struct Row {
        stage: Stage,
        check: &'static str,
        file: &'static str,
        pass: &'static str,
        fails: &'static [(&'static str, &'static str)],
        negative: Option<&'static str>,
    }

    const DOC_FAILS: &[(&str, &str)] = &[
        (
            "no frontmatter\n",
            "has no frontmatter (expected: a first line ---, work_item: ORCH-7",
        ),
        (
            "---\nwork_item: ORCH-8\n---\nplan\n",
            "is for work item 'ORCH-8', not ORCH-7 (expected: work_item: ORCH-7)",
        ),
        ("---\nauthor: x\n---\nplan\n", "lacks work_item: ORCH-7"),
        (
            "---\nwork_item: ORCH-7\n---\n  \n",
            "has an empty body (expected: text after the frontmatter)",
        ),
    ];

    fn rows() -> Vec<Row> {
        let doc = |stage, check, file| Row {
            stage,
            check,
            file,
            pass: "---\nwork_item: ORCH-7\n---\nThe plan.\n",
            fails: DOC_FAILS,
            negative: None,
        };
        vec![
            doc(Stage::Analysis, "check_analysis", "analysis.md"),
            doc(Stage::Architecture, "check_architecture", "architecture.md"),
            // The PR and mergeability checks of development are left to the real gate.
            doc(
                Stage::Development,
                "check_development_notes",
                "development.md",
            ),
            Row {
                stage: Stage::Review,
                check: "check_review_verdict",
                file: "review.md",
                pass: "---\nwork_item: ORCH-7\nreview_verdict: APPROVED\n---\n",
                fails: &[
                    (
                        "---\nwork_item: ORCH-7\n---\n",
                        "lacks review_verdict: (expected: review_verdict: APPROVED or CHANGES_REQUESTED)",
                    ),
                    (
                        "---\nwork_item: ORCH-7\nreview_verdict: LGTM\n---\n",
                        "review_verdict: 'LGTM' is neither APPROVED nor CHANGES_REQUESTED",
                    ),
                    (
                        "---\nwork_item: ORCH-8\nreview_verdict: APPROVED\n---\n",
                        "is for work item 'ORCH-8'",
                    ),
                ],
                negative: Some("---\nwork_item: ORCH-7\nreview_verdict: CHANGES_REQUESTED\n---\n"),
            },
            Row {
                stage: Stage::Testing,
                check: "check_test_status",
                file: "test-report.md",
                pass: "---\nwork_item: ORCH-7\ntest_status: passed\n---\n",
                fails: &[
                    (
                        "---\nwork_item: ORCH-7\n---\n",
                        "lacks test_status: (expected: test_status: PASSED or FAILED)",
                    ),
                    (
                        "---\nwork_item: ORCH-7\ntest_status: GREEN\n---\n",
                        "test_status: 'GREEN' is neither PASSED nor FAILED",
                    ),
                ],
                negative: Some("---\nwork_item: ORCH-7\ntest_status: FAILED\n---\n"),
            },
            Row {
                stage: Stage::DeployStaging,
                check: "check_staging_status",
                file: "staging.md",
                pass: "---\nwork_item: ORCH-7\nstaging_status: SUCCESS\n---\n",
                fails: &[
                    (
                        "---\nwork_item: ORCH-7\n---\n",
                        "lacks staging_status: (expected: staging_status: SUCCESS or FAILED)",
                    ),
                    (
                        "---\nwork_item: ORCH-7\nstaging_status: OK\n---\n",
                        "staging_status: 'OK' is neither SUCCESS nor FAILED",
                    ),
                ],
                negative: Some("---\nwork_item: ORCH-7\nstaging_status: FAILED\n---\n"),
            },
            Row {
                stage: Stage::Deploy,
                check: "check_deploy_status",
                file: "deploy.md",
                pass: "---\nwork_item: ORCH-7\ndeploy_status: SUCCESS\ndeployed_sha: abc\n---\n",
                fails: &[
                    (
                        "---\nwork_item: ORCH-7\n---\n",
                        "lacks deploy_status: (expected: deploy_status: SUCCESS or FAILED)",
                    ),
                    (
                        "---\nwork_item: ORCH-7\ndeploy_status: DONE\n---\n",
                        "deploy_status: 'DONE' is neither SUCCESS nor FAILED",
                    ),
                ],
                negative: Some("---\nwork_item: ORCH-7\ndeploy_status: FAILED\n---\n"),
            },
        ]
    }

    /// Every stage's checks through the hook: exit 2 with the check, the file and what is
    /// expected while the artifact is missing or wrong; exit 0 and silence once it passes;
    /// exit 0 on a negative verdict.
    #[test]
    fn every_stage_blocks_with_what_is_missing_and_passes_once_it_is_there() {
        let rows = rows();
        for stage in Stage::ALL {
            let expected = checks_for(stage)
                .filter(|c| matches!(c.input, Input::Artifact(_)))
                .count();
            let covered = rows.iter().filter(|r| r.stage == stage).count();
            assert_eq!(covered, expected, "{stage}: a row per artifact check");
        }
        for r in &rows {
            let d = tempfile::tempdir().expect("tempdir");
            let mut q = req(d.path(), None);
            q.stage = r.stage.as_str().into();
            let path = format!("docs/work-items/ORCH-7/{}", r.file);
            let a = run_hook(&q, "");
            assert_eq!(a.code, 2, "{}: {}", r.stage, a.stderr);
            let expect_missing = format!(
                "{}: {path} is missing (expected: a first line ---, work_item: ORCH-7",
                r.check
            );
            assert!(
                a.stderr.contains(&expect_missing),
                "{}: {}",
                r.stage,
                a.stderr
            );
            assert!(
                a.stderr.starts_with(&format!(
                    "QUALITY GATE of stage {} for ORCH-7 is not met yet",
                    r.stage
                )),
                "{}",
                a.stderr
            );
            for (text, why) in r.fails {
                write(d.path(), r.file, text);
                let a = run_hook(&q, "");
                assert_eq!(a.code, 2, "{}: {text:?}: {}", r.stage, a.stderr);
                assert!(
                    a.stderr.contains(r.check)
                        && a.stderr.contains(&path)
                        && a.stderr.contains(why),
                    "{}: {text:?}: want {why:?} in {}",
                    r.stage,
                    a.stderr
                );
            }
            write(d.path(), r.file, r.pass);
            assert_eq!(
                run_hook(&q, ""),
                HookAnswer {
                    code: 0,
                    stderr: String::new()
                },
                "{}",
                r.stage
            );
            if let Some(text) = r.negative {
                write(d.path(), r.file, text);
                assert_eq!(
                    run_hook(&q, "").code,
                    0,
                    "{}: a negative verdict is an answer",
                    r.stage
                );
            }
        }
        // `done` has no checks: nothing to keep the agent for.
        let d = tempfile::tempdir().expect("tempdir");
        let mut q = req(d.path(), None);
        q.stage = "done".into();
        assert_eq!(run_hook(&q, "").code, 0);
    }

    /// Exactly `max_blocks` blocks per run (counted in the state file), then exit 0 with
    /// what still fails; the count does not grow after that.
    #[test]
    fn the_hook_blocks_exactly_max_blocks_times_then_lets_the_agent_stop() {
        for max in [0u32, 1, 3] {
            let d = tempfile::tempdir().expect("tempdir");
            let state = d.path().join("state").join("blocks");
            std::fs::create_dir_all(state.parent().expect("parent")).expect("mkdir");
            let co = d.path().join("checkout");
            let mut q = req(&co, Some(state.clone()));
            q.max_blocks = max;
            q.stage = "analysis".into();
            let codes: Vec<u8> = (0..max + 3).map(|_| run_hook(&q, "").code).collect();
            let mut want = vec![2u8; max as usize];
            want.extend([0, 0, 0]);
            assert_eq!(codes, want, "max {max}");
            assert_eq!(read_count(&state), max, "max {max}");
            let last = run_hook(&q, "");
            assert!(
                last.stderr.contains(&format!("after {max} blocks"))
                    && last.stderr.contains("analysis.md is missing"),
                "{}",
                last.stderr
            );
        }
        // Without a state file nothing is counted: every call blocks.
        let d = tempfile::tempdir().expect("tempdir");
        let codes: Vec<u8> = (0..5)
            .map(|_| run_hook(&req(d.path(), None), "").code)
            .collect();
        assert_eq!(codes, vec![2; 5]);
    }

    /// The hook's own trouble is exit 1 (non-blocking: the real gate decides), naming it.
    #[test]
    fn an_unreadable_artifact_or_an_unwritable_state_file_is_exit_1() {
        let d = tempfile::tempdir().expect("tempdir");
        // A directory where the artifact should be.
        std::fs::create_dir_all(d.path().join("docs/work-items/ORCH-7/review.md")).expect("mkdir");
        let a = run_hook(&req(d.path(), None), "");
        assert_eq!(a.code, 1, "{}", a.stderr);
        assert!(
            a.stderr.starts_with("qg-hook: cannot read") && a.stderr.contains("review.md"),
            "{}",
            a.stderr
        );
        let d = tempfile::tempdir().expect("tempdir");
        let state = d.path().join("no-such-dir/blocks");
        let a = run_hook(&req(d.path(), Some(state)), "");
        assert_eq!(a.code, 1, "{}", a.stderr);
        assert!(
            a.stderr.contains("cannot write") && a.stderr.contains("no-such-dir"),
            "{}",
            a.stderr
        );
    }
}
