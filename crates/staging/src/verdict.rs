//! The staging verdict (ARCHITECTURE §3.5): checks are REAL (fail-closed) or SANDBOX_INFRA
//! (a narrow allow-list, `C9a` and `C9b`: failures caused by the sandbox's bot accounts,
//! not by the pipeline), and their results fold into one verdict that is never a false green.

use std::fmt;

/// Whether a check's failure can be waived.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckClass {
    /// Every pipeline check: its failure always fails the verdict.
    Real,
    /// A failure of the sandbox's own accounts; waived when the run is tolerant.
    SandboxInfra,
}

impl CheckClass {
    pub fn as_str(self) -> &'static str {
        match self {
            CheckClass::Real => "real",
            CheckClass::SandboxInfra => "sandbox_infra",
        }
    }
}

/// The checks whose failures may be waived — exactly these, spelled exactly so.
pub const SANDBOX_INFRA_CHECKS: [&str; 2] = ["C9a", "C9b"];

/// Classifies a check by its id. Anything not on the allow-list is REAL: an unknown or
/// misspelt id fails closed.
pub fn classify_check(id: &str) -> CheckClass {
    if SANDBOX_INFRA_CHECKS.contains(&id) {
        CheckClass::SandboxInfra
    } else {
        CheckClass::Real
    }
}

/// What running one check gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckOutcome {
    Pass(String),
    /// The check ran and what it checked is wrong.
    Fail(String),
    /// The check could not tell (it errored, timed out, panicked): an internal error.
    Error(String),
}

impl CheckOutcome {
    /// `PASS`, `FAIL` or `ERROR`.
    pub fn label(&self) -> &'static str {
        match self {
            CheckOutcome::Pass(_) => "PASS",
            CheckOutcome::Fail(_) => "FAIL",
            CheckOutcome::Error(_) => "ERROR",
        }
    }

    pub fn detail(&self) -> &str {
        match self {
            CheckOutcome::Pass(d) | CheckOutcome::Fail(d) | CheckOutcome::Error(d) => d,
        }
    }
}

/// One check's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckResult {
    pub id: String,
    pub name: String,
    pub outcome: CheckOutcome,
}

/// SUCCESS or FAILED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Success,
    Failed,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::Failed => "FAILED",
        }
    }
}

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// The verdict of a staging run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub status: Status,
    /// 0 on SUCCESS, 1 on FAILED.
    pub exit_code: i32,
    /// The SANDBOX_INFRA checks whose failures were waived (only ever on SUCCESS).
    pub waived: Vec<String>,
}

impl Verdict {
    fn failed() -> Verdict {
        Verdict {
            status: Status::Failed,
            exit_code: 1,
            waived: Vec::new(),
        }
    }
}

/// Folds check results into the verdict:
/// - any internal error (a check that errored, or no checks at all) -> FAILED, 1;
/// - any REAL failure -> FAILED, 1, whatever `tolerant` says;
/// - only SANDBOX_INFRA failures and `tolerant` -> SUCCESS, 0, with them in `waived`;
/// - only SANDBOX_INFRA failures and strict -> FAILED, 1;
/// - no failures -> SUCCESS, 0.
pub fn compute_staging_verdict(results: &[CheckResult], tolerant: bool) -> Verdict {
    if results.is_empty() {
        return Verdict::failed();
    }
    let mut waivable = Vec::new();
    for r in results {
        match (&r.outcome, classify_check(&r.id)) {
            (CheckOutcome::Pass(_), _) => {}
            (CheckOutcome::Error(_), _) | (CheckOutcome::Fail(_), CheckClass::Real) => {
                return Verdict::failed();
            }
            (CheckOutcome::Fail(_), CheckClass::SandboxInfra) => waivable.push(r.id.clone()),
        }
    }
    if !waivable.is_empty() && !tolerant {
        return Verdict::failed();
    }
    Verdict {
        status: Status::Success,
        exit_code: 0,
        waived: waivable,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_c9a_and_c9b_are_sandbox_infra() {
        for (id, class) in [
            ("C9a", CheckClass::SandboxInfra),
            ("C9b", CheckClass::SandboxInfra),
            ("C9", CheckClass::Real),
            ("C9c", CheckClass::Real),
            ("c9a", CheckClass::Real),
            ("C9A", CheckClass::Real),
            (" C9a", CheckClass::Real),
            ("C9a ", CheckClass::Real),
            ("C9ab", CheckClass::Real),
            ("C1", CheckClass::Real),
            ("C4", CheckClass::Real),
            ("", CheckClass::Real),
        ] {
            assert_eq!(classify_check(id), class, "{id:?}");
        }
    }

    fn r(id: &str, outcome: &str) -> CheckResult {
        CheckResult {
            id: id.to_owned(),
            name: id.to_owned(),
            outcome: match outcome {
                "pass" => CheckOutcome::Pass(String::new()),
                "fail" => CheckOutcome::Fail("wrong".to_owned()),
                _ => CheckOutcome::Error("could not tell".to_owned()),
            },
        }
    }

    #[test]
    fn every_row_of_the_verdict_table() {
        use Status::*;
        let all_pass = || vec![r("C1", "pass"), r("C9a", "pass"), r("C9b", "pass")];
        type Row = (
            &'static str,
            Vec<CheckResult>,
            bool,
            Status,
            i32,
            Vec<&'static str>,
        );
        let rows: Vec<Row> = vec![
            ("all pass, tolerant", all_pass(), true, Success, 0, vec![]),
            ("all pass, strict", all_pass(), false, Success, 0, vec![]),
            (
                "a REAL failure, tolerant",
                vec![r("C1", "fail"), r("C9a", "pass")],
                true,
                Failed,
                1,
                vec![],
            ),
            (
                "a REAL failure, strict",
                vec![r("C1", "fail"), r("C9a", "pass")],
                false,
                Failed,
                1,
                vec![],
            ),
            (
                "REAL and SANDBOX_INFRA failures, tolerant",
                vec![r("C1", "fail"), r("C9a", "fail"), r("C9b", "fail")],
                true,
                Failed,
                1,
                vec![],
            ),
            (
                "only C9a fails, tolerant",
                vec![r("C1", "pass"), r("C9a", "fail"), r("C9b", "pass")],
                true,
                Success,
                0,
                vec!["C9a"],
            ),
            (
                "only SANDBOX_INFRA failures, tolerant",
                vec![r("C1", "pass"), r("C9a", "fail"), r("C9b", "fail")],
                true,
                Success,
                0,
                vec!["C9a", "C9b"],
            ),
            (
                "only SANDBOX_INFRA failures, strict",
                vec![r("C1", "pass"), r("C9a", "fail"), r("C9b", "fail")],
                false,
                Failed,
                1,
                vec![],
            ),
            (
                "an internal error in a REAL check, tolerant",
                vec![r("C1", "error"), r("C9a", "pass")],
                true,
                Failed,
                1,
                vec![],
            ),
            (
                "an internal error in a SANDBOX_INFRA check, tolerant",
                vec![r("C1", "pass"), r("C9a", "error")],
                true,
                Failed,
                1,
                vec![],
            ),
            (
                "an internal error beside a waivable failure, tolerant",
                vec![r("C9a", "fail"), r("C9b", "error")],
                true,
                Failed,
                1,
                vec![],
            ),
            ("no checks at all", vec![], true, Failed, 1, vec![]),
            (
                "a misspelt sandbox id fails closed",
                vec![r("c9a", "fail")],
                true,
                Failed,
                1,
                vec![],
            ),
        ];
        for (name, results, tolerant, status, exit_code, waived) in rows {
            let v = compute_staging_verdict(&results, tolerant);
            assert_eq!(
                v,
                Verdict {
                    status,
                    exit_code,
                    waived: waived.iter().map(|s| s.to_string()).collect()
                },
                "{name}"
            );
        }
    }
}
