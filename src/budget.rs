//! `orchestrator budget ...`: the spending ceilings of a running stack, through the
//! launcher's `SetSpendingCeiling` (the configured `ORCH_LAUNCHER_URL`). A ceiling set here
//! replaces the environment's (`ORCH_BUDGET_*`) until cleared, restarts included; the jobs
//! waiting for a ceiling look again at once.

use std::fmt::Write as _;

use clap::Subcommand;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::time::rfc3339;
use orchestrator_proto::launcher::v1::{BudgetCeiling, SetSpendingCeilingRequest};

#[derive(Debug, Clone, Subcommand)]
pub enum BudgetCommand {
    /// Sets (or clears) a daily or monthly ceiling, e.g. `budget set --daily 50`,
    /// `budget set --monthly 200 --repo acme/app`, `budget set --daily 0` (no ceiling),
    /// `budget set --daily --clear` (the environment's again). Prints the ceilings in force.
    Set {
        /// Dollars per UTC day (0: no daily ceiling).
        #[arg(long, value_name = "USD", num_args = 0..=1, default_missing_value = "0", conflicts_with = "monthly", required_unless_present = "monthly")]
        daily: Option<f64>,
        /// Dollars per UTC month (0: no monthly ceiling).
        #[arg(long, value_name = "USD", num_args = 0..=1, default_missing_value = "0")]
        monthly: Option<f64>,
        /// Only this repository (`owner/name`); default: every repository together.
        #[arg(long)]
        repo: Option<String>,
        /// Forgets what was set: the environment's ceiling (or none) is in force again.
        #[arg(long)]
        clear: bool,
    },
    /// Shows the ceilings in force with what was spent against each.
    Show,
}

/// What went wrong; printed as `error: ...`.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    #[error("{0}: {1}")]
    Rpc(&'static str, String),
}

fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> BudgetError {
    move |s| BudgetError::Rpc(what, format!("{:?}: {}", s.code(), s.message()))
}

/// Runs one budget command; returns what to print on stdout.
pub async fn run(clients: &Clients, command: BudgetCommand) -> Result<String, BudgetError> {
    let mut launcher = clients.launcher.clone();
    match command {
        BudgetCommand::Set {
            daily,
            monthly,
            repo,
            clear,
        } => {
            let (period, usd) = match (daily, monthly) {
                (Some(usd), _) => ("daily", usd),
                (None, Some(usd)) => ("monthly", usd),
                // clap requires one of them.
                (None, None) => ("daily", 0.0),
            };
            let r = launcher
                .set_spending_ceiling(SetSpendingCeilingRequest {
                    period: period.to_owned(),
                    repo: repo.unwrap_or_default(),
                    usd,
                    clear,
                })
                .await
                .map_err(rpc("SetSpendingCeiling"))?
                .into_inner();
            let mut out = render(&r.ceilings);
            if r.woken > 0 {
                let _ = writeln!(out, "{} waiting job(s) look again now", r.woken);
            }
            Ok(out)
        }
        BudgetCommand::Show => {
            let s = launcher
                .queue_snapshot(orchestrator_proto::launcher::v1::QueueSnapshotRequest {})
                .await
                .map_err(rpc("QueueSnapshot"))?
                .into_inner();
            let mut out = render(&s.budget_ceilings);
            let _ = writeln!(out, "{} LLM job(s) waiting for a ceiling", s.budget_waiting);
            Ok(out)
        }
    }
}

/// One line per ceiling in force.
pub fn render(ceilings: &[BudgetCeiling]) -> String {
    if ceilings.is_empty() {
        return "no spending ceiling in force\n".to_owned();
    }
    let mut out = String::new();
    for c in ceilings {
        let whose = if c.repo.is_empty() {
            "every repository"
        } else {
            c.repo.as_str()
        };
        let spent = c
            .spent_usd
            .map_or_else(|| "spend unknown".to_owned(), |s| format!("${s:.4} spent"));
        let _ = writeln!(
            out,
            "{} ${:.2} for {whose} ({}): {spent}, resets at {}",
            c.period,
            c.ceiling_usd,
            c.source,
            rfc3339(c.resets_at_ms)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ceilings_read_one_a_line() {
        assert_eq!(render(&[]), "no spending ceiling in force\n");
        let c = BudgetCeiling {
            period: "daily".into(),
            repo: "acme/app".into(),
            ceiling_usd: 50.0,
            spent_usd: Some(1.5),
            resets_at_ms: 1_795_651_200_000,
            source: "SetSpendingCeiling".into(),
        };
        assert_eq!(
            render(&[c]),
            "daily $50.00 for acme/app (SetSpendingCeiling): $1.5000 spent, resets at 2026-11-26T00:00:00.000Z\n"
        );
    }
}
