//! The staging verdict (ARCHITECTURE §3.5) and `orchestrator staging-check`.
//!
//! [`classify_check`] and [`compute_staging_verdict`] are the pure core. [`run_staging_check`]
//! runs [`checks::Check`]s (each under a timeout; a panic or a timeout is an internal
//! error), prints one line per check, `INFRA-WAIVED:` and `VERDICT:`, and writes
//! `staging_status:` frontmatter to the artifact. [`cli::main`] wires it to the
//! configuration for the `orchestrator staging-check` command.

pub mod checks;
pub mod cli;
mod verdict;

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use orchestrator_kit::{ConfigError, Env};

pub use verdict::{
    CheckClass, CheckOutcome, CheckResult, SANDBOX_INFRA_CHECKS, Status, Verdict, classify_check,
    compute_staging_verdict,
};

use crate::checks::Check;

/// The staging-check section of the configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StagingConfig {
    /// `ORCH_STAGING_INFRA_TOLERANCE_ENABLED` (default true): when false every run is strict.
    pub tolerant: bool,
    /// `ORCH_STAGING_SANDBOX_WORK_ITEM`: the sandbox work item C9a and C9b look at.
    pub sandbox_work_item: Option<String>,
    /// `ORCH_STAGING_CHECK_TIMEOUT_MS` (default 10000): the limit of one check.
    pub check_timeout: Duration,
}

impl StagingConfig {
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let timeout_ms: u64 = env.parse("ORCH_STAGING_CHECK_TIMEOUT_MS", 10_000)?;
        if timeout_ms == 0 {
            return Err(ConfigError::new(
                "ORCH_STAGING_CHECK_TIMEOUT_MS",
                "must be at least 1",
            ));
        }
        let sandbox_work_item = env
            .get("ORCH_STAGING_SANDBOX_WORK_ITEM")
            .map(|s| s.trim().to_owned());
        if let Some(key) = &sandbox_work_item
            && (key.starts_with('-')
                || key.contains("..")
                || key.contains('/')
                || key.chars().any(char::is_control))
        {
            return Err(ConfigError::new(
                "ORCH_STAGING_SANDBOX_WORK_ITEM",
                "must be a work item key (no leading '-', no '..', no '/')",
            ));
        }
        Ok(StagingConfig {
            tolerant: env.bool("ORCH_STAGING_INFRA_TOLERANCE_ENABLED", true)?,
            sandbox_work_item,
            check_timeout: Duration::from_millis(timeout_ms),
        })
    }
}

/// Runs `checks` in order, writes a line per check to `out`, then `INFRA-WAIVED:` and
/// `VERDICT:`, and writes the artifact when one is named. Returns the verdict, which is
/// FAILED when the artifact could not be written.
pub async fn run_staging_check(
    checks: Vec<Arc<dyn Check>>,
    tolerant: bool,
    timeout: Duration,
    artifact: Option<&Path>,
    out: &mut dyn Write,
) -> Verdict {
    let mut results = Vec::with_capacity(checks.len());
    for check in checks {
        let id = check.id().to_owned();
        let name = check.name().to_owned();
        let task = {
            let check = Arc::clone(&check);
            tokio::spawn(async move { check.run().await })
        };
        let abort = task.abort_handle();
        let outcome = match tokio::time::timeout(timeout, task).await {
            Ok(Ok(outcome)) => outcome,
            Ok(Err(e)) if e.is_panic() => CheckOutcome::Error("the check panicked".to_owned()),
            Ok(Err(e)) => CheckOutcome::Error(format!("the check did not finish: {e}")),
            Err(_) => {
                abort.abort();
                CheckOutcome::Error(format!("timed out after {} ms", timeout.as_millis()))
            }
        };
        let result = CheckResult { id, name, outcome };
        let _ = writeln!(out, "{}", check_line(&result));
        results.push(result);
    }
    let mut verdict = compute_staging_verdict(&results, tolerant);
    let _ = writeln!(out, "INFRA-WAIVED: {}", waived_text(&verdict.waived));
    if let Some(path) = artifact
        && let Err(e) = write_artifact(path, &verdict, tolerant, &results)
    {
        let _ = writeln!(out, "ERROR artifact: cannot write {}: {e}", path.display());
        verdict = Verdict {
            status: Status::Failed,
            exit_code: 1,
            waived: Vec::new(),
        };
    }
    let _ = writeln!(out, "VERDICT: {}", verdict.status);
    let _ = out.flush();
    verdict
}

/// `PASS C1 [real] every service SERVING: ...`
pub fn check_line(r: &CheckResult) -> String {
    format!(
        "{} {} [{}] {}: {}",
        r.outcome.label(),
        r.id,
        classify_check(&r.id).as_str(),
        r.name,
        one_line(r.outcome.detail())
    )
}

fn waived_text(waived: &[String]) -> String {
    if waived.is_empty() {
        "none".to_owned()
    } else {
        waived.join(", ")
    }
}

fn one_line(s: &str) -> String {
    s.replace(['\n', '\r'], " ")
}

/// The frontmatter keys this command owns.
const KEYS: [&str; 4] = [
    "staging_status",
    "staging_strict",
    "infra_waived",
    "staging_checked_at",
];

fn frontmatter_lines(verdict: &Verdict, tolerant: bool) -> Vec<String> {
    vec![
        format!("staging_status: {}", verdict.status),
        format!("staging_strict: {}", !tolerant),
        format!("infra_waived: [{}]", verdict.waived.join(", ")),
        format!(
            "staging_checked_at: {}",
            orchestrator_kit::time::rfc3339(orchestrator_kit::time::now_ms())
        ),
    ]
}

/// Writes `staging_status:` frontmatter to `path`: into the existing frontmatter (our keys
/// replaced, the rest kept), or before an existing body, or as a new report with the
/// results. Written to a temporary file and renamed, so a reader never sees half of it.
pub fn write_artifact(
    path: &Path,
    verdict: &Verdict,
    tolerant: bool,
    results: &[CheckResult],
) -> std::io::Result<()> {
    let ours = frontmatter_lines(verdict, tolerant);
    let text = match std::fs::read_to_string(path) {
        Ok(existing) => merge_frontmatter(&existing, &ours),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let mut t = format!("---\n{}\n---\n\n# Staging check\n\n", ours.join("\n"));
            t.push_str("| check | class | result | detail |\n|---|---|---|---|\n");
            for r in results {
                t.push_str(&format!(
                    "| {} {} | {} | {} | {} |\n",
                    r.id,
                    r.name,
                    classify_check(&r.id).as_str(),
                    r.outcome.label(),
                    one_line(r.outcome.detail()).replace('|', "\\|")
                ));
            }
            t.push_str(&format!(
                "\nINFRA-WAIVED: {}\n\nVERDICT: {}\n",
                waived_text(&verdict.waived),
                verdict.status
            ));
            t
        }
        Err(e) => return Err(e),
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| "artifact".to_owned());
    let tmp = path.with_file_name(format!(".{file_name}.tmp-{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// Puts `ours` into the frontmatter of `existing`, replacing our keys and keeping the rest.
fn merge_frontmatter(existing: &str, ours: &[String]) -> String {
    let lines: Vec<&str> = existing.lines().collect();
    let closing = (lines.first() == Some(&"---"))
        .then(|| {
            lines
                .iter()
                .skip(1)
                .position(|l| *l == "---")
                .map(|i| i + 1)
        })
        .flatten();
    let Some(closing) = closing else {
        return format!("---\n{}\n---\n\n{existing}", ours.join("\n"));
    };
    let is_ours = |l: &&str| {
        KEYS.iter().any(|k| {
            l.strip_prefix(k)
                .is_some_and(|rest| rest.trim_start().starts_with(':'))
        })
    };
    let mut out: Vec<String> = vec!["---".to_owned()];
    out.extend(
        lines[1..closing]
            .iter()
            .filter(|l| !is_ours(l))
            .map(|l| (*l).to_owned()),
    );
    out.extend(ours.iter().cloned());
    out.extend(lines[closing..].iter().map(|l| (*l).to_owned()));
    let mut text = out.join("\n");
    text.push('\n');
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed {
        id: &'static str,
        outcome: Option<CheckOutcome>,
        delay: Duration,
    }

    #[tonic::async_trait]
    impl Check for Fixed {
        fn id(&self) -> &str {
            self.id
        }
        fn name(&self) -> &str {
            "fixed"
        }
        async fn run(&self) -> CheckOutcome {
            tokio::time::sleep(self.delay).await;
            match &self.outcome {
                Some(o) => o.clone(),
                None => panic!("a check that panics"),
            }
        }
    }

    fn fixed(id: &'static str, outcome: Option<CheckOutcome>) -> Arc<dyn Check> {
        Arc::new(Fixed {
            id,
            outcome,
            delay: Duration::ZERO,
        })
    }

    async fn run(checks: Vec<Arc<dyn Check>>, tolerant: bool) -> (Verdict, Vec<String>) {
        let mut out = Vec::new();
        let v =
            run_staging_check(checks, tolerant, Duration::from_millis(500), None, &mut out).await;
        let text = String::from_utf8(out).expect("utf8");
        (v, text.lines().map(str::to_owned).collect())
    }

    #[tokio::test]
    async fn lines_per_check_then_waived_then_verdict() {
        let (v, lines) = run(
            vec![
                fixed("C1", Some(CheckOutcome::Pass("6 SERVING".into()))),
                fixed("C9a", Some(CheckOutcome::Fail("no branch\nat all".into()))),
            ],
            true,
        )
        .await;
        assert_eq!(v.exit_code, 0);
        assert_eq!(
            lines,
            [
                "PASS C1 [real] fixed: 6 SERVING",
                "FAIL C9a [sandbox_infra] fixed: no branch at all",
                "INFRA-WAIVED: C9a",
                "VERDICT: SUCCESS",
            ]
        );
    }

    #[tokio::test]
    async fn a_panicking_or_hanging_check_is_an_internal_error() {
        let (v, lines) = run(
            vec![
                fixed("C9a", None),
                Arc::new(Fixed {
                    id: "C9b",
                    outcome: Some(CheckOutcome::Pass(String::new())),
                    delay: Duration::from_secs(30),
                }),
            ],
            true,
        )
        .await;
        assert_eq!(v.status, Status::Failed);
        assert_eq!(
            lines[0],
            "ERROR C9a [sandbox_infra] fixed: the check panicked"
        );
        assert_eq!(
            lines[1],
            "ERROR C9b [sandbox_infra] fixed: timed out after 500 ms"
        );
        assert_eq!(lines[2], "INFRA-WAIVED: none");
        assert_eq!(lines[3], "VERDICT: FAILED");
    }

    #[tokio::test]
    async fn an_artifact_that_cannot_be_written_fails_the_verdict() {
        let dir = tempfile::tempdir().expect("tempdir");
        // A directory where the file should be.
        let path = dir.path().join("report.md");
        std::fs::create_dir(&path).expect("dir");
        let mut out = Vec::new();
        let v = run_staging_check(
            vec![fixed("C1", Some(CheckOutcome::Pass(String::new())))],
            true,
            Duration::from_secs(1),
            Some(&path),
            &mut out,
        )
        .await;
        assert_eq!(v.exit_code, 1);
        let text = String::from_utf8(out).expect("utf8");
        assert!(text.contains("ERROR artifact: cannot write"), "{text}");
        assert!(text.ends_with("VERDICT: FAILED\n"), "{text}");
    }

    #[test]
    fn frontmatter_is_created_merged_or_prepended() {
        let dir = tempfile::tempdir().expect("tempdir");
        let success = Verdict {
            status: Status::Success,
            exit_code: 0,
            waived: vec!["C9a".into()],
        };
        let results = [CheckResult {
            id: "C9a".into(),
            name: "sandbox branch exists".into(),
            outcome: CheckOutcome::Fail("a|b".into()),
        }];

        let new = dir.path().join("sub/new.md");
        write_artifact(&new, &success, true, &results).expect("write");
        let text = std::fs::read_to_string(&new).expect("read");
        assert!(text.starts_with("---\nstaging_status: SUCCESS\nstaging_strict: false\ninfra_waived: [C9a]\nstaging_checked_at: "), "{text}");
        assert!(
            text.contains("| C9a sandbox branch exists | sandbox_infra | FAIL | a\\|b |"),
            "{text}"
        );

        let existing = dir.path().join("deploy.md");
        std::fs::write(
            &existing,
            "---\nwork_item: SHOP-1\nstaging_status: FAILED\ninfra_waived: []\n---\n# Deploy\nbody\n",
        )
        .expect("write");
        write_artifact(&existing, &success, true, &results).expect("write");
        let text = std::fs::read_to_string(&existing).expect("read");
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0..5],
            [
                "---",
                "work_item: SHOP-1",
                "staging_status: SUCCESS",
                "staging_strict: false",
                "infra_waived: [C9a]"
            ]
        );
        assert!(lines[5].starts_with("staging_checked_at: "));
        assert_eq!(lines[6..], ["---", "# Deploy", "body"]);
        assert_eq!(text.matches("staging_status:").count(), 1);

        let plain = dir.path().join("plain.md");
        std::fs::write(&plain, "just text\n").expect("write");
        let failed = Verdict {
            status: Status::Failed,
            exit_code: 1,
            waived: vec![],
        };
        write_artifact(&plain, &failed, false, &results).expect("write");
        let text = std::fs::read_to_string(&plain).expect("read");
        assert!(
            text.starts_with(
                "---\nstaging_status: FAILED\nstaging_strict: true\ninfra_waived: []\n"
            ),
            "{text}"
        );
        assert!(text.ends_with("---\n\njust text\n"), "{text}");
    }

    #[test]
    fn configuration() {
        let c = StagingConfig::from_env(&Env::default()).expect("defaults");
        assert!(c.tolerant);
        assert_eq!(c.sandbox_work_item, None);
        assert_eq!(c.check_timeout, Duration::from_secs(10));
        let c = StagingConfig::from_env(&Env::from_pairs([
            ("ORCH_STAGING_INFRA_TOLERANCE_ENABLED", "false"),
            ("ORCH_STAGING_SANDBOX_WORK_ITEM", "SANDBOX-1"),
        ]))
        .expect("set");
        assert!(!c.tolerant);
        assert_eq!(c.sandbox_work_item.as_deref(), Some("SANDBOX-1"));
        for (var, value) in [
            ("ORCH_STAGING_INFRA_TOLERANCE_ENABLED", "perhaps"),
            ("ORCH_STAGING_SANDBOX_WORK_ITEM", "-x"),
            ("ORCH_STAGING_CHECK_TIMEOUT_MS", "0"),
        ] {
            let err = StagingConfig::from_env(&Env::from_pairs([(var, value)])).expect_err(value);
            assert_eq!(err.var, var);
        }
    }
}
