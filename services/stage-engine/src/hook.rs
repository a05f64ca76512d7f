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
            "QUALITY GATE of stage {stage} for {key} is not met yet. Fix this before you stop:\n- {}\nSee docs/artifacts.md for the expected files and fields.",
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
            CheckOutcome::Pass | CheckOutcome::Negative(_) => None,
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
}
