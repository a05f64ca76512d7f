//! `orchestrator inbox ...`: the gateway inbox's dead letters, listed and retried. The
//! gateway owns the inbox and answers no RPC for it, so the command opens the gateway's own
//! storage (`ORCH_DATABASE_URL`, else `ORCH_DATA_DIR`, as `up` and `serve gateway` do) and
//! calls the inbox module's operations — the same ones the dashboard's machine room calls.
//! A running gateway's dispatcher takes a retried letter at its next poll
//! (`ORCH_GATEWAY_DISPATCH_POLL_MS`).

use std::fmt::Write as _;

use clap::Subcommand;
use gateway::inbox;
use orchestrator_kit::time::{now_ms, rfc3339};
use orchestrator_kit::{Config, Db, ServiceName, db};

/// How many dead letters `inbox dead` lists (the newest first).
const LISTED: u32 = 100;

#[derive(Debug, Clone, Subcommand)]
pub enum InboxCommand {
    /// Lists the inbox's dead letters, newest first (at most 100): id, when, source, event,
    /// work item, attempts and the last error.
    Dead,
    /// Puts a dead letter back in line (after its cause was fixed): the dispatcher applies it
    /// again, its attempts counted from zero.
    Retry {
        /// The dead letter's id (the first column of `inbox dead`).
        id: String,
    },
}

/// Runs `command` against the gateway's storage; returns what to print.
pub async fn run(config: &Config, command: InboxCommand) -> Result<String, String> {
    let db = open(config).await?;
    match command {
        InboxCommand::Dead => dead(&db).await,
        InboxCommand::Retry { id } => retry(&db, &id).await,
    }
}

async fn open(config: &Config) -> Result<Db, String> {
    let location = db::Location::from_config(config);
    db::open(
        ServiceName::Gateway,
        &location,
        crate::node::migrator(ServiceName::Gateway),
    )
    .await
    .map_err(|e| format!("cannot open the gateway's storage: {e}"))
}

/// The dead letters as a table.
pub async fn dead(db: &Db) -> Result<String, String> {
    let letters = inbox::dead_letters(db, LISTED)
        .await
        .map_err(|e| format!("cannot read the inbox: {e}"))?;
    if letters.is_empty() {
        return Ok("no dead letters in the inbox\n".to_owned());
    }
    let mut out = String::new();
    for d in &letters {
        let _ = writeln!(
            out,
            "{}  {}  {} {}  {}  {} attempt{}  {}",
            d.id,
            rfc3339(d.received_at_ms),
            d.source,
            d.event,
            if d.work_item.is_empty() {
                "-"
            } else {
                &d.work_item
            },
            d.attempts,
            if d.attempts == 1 { "" } else { "s" },
            if d.last_error.is_empty() {
                &d.reason
            } else {
                &d.last_error
            }
        );
    }
    Ok(out)
}

/// Retries dead letter `id` ([`inbox::retry_dead`]).
pub async fn retry(db: &Db, id: &str) -> Result<String, String> {
    match inbox::retry_dead(db, id, now_ms()).await {
        Ok(true) => Ok(format!(
            "dead letter {id} is back in line: the gateway applies it again\n"
        )),
        Ok(false) => Err(format!(
            "{id} is not a dead letter of the inbox (unknown, or already retried): see `orchestrator inbox dead`"
        )),
        Err(e) => Err(format!("cannot write the inbox: {e}")),
    }
}
