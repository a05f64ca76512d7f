//! usage-ledger: token and cost accounting per agent run (ARCHITECTURE §3.8).
//!
//! `RecordRun` reads the CLI's result out of the run log (never failing on garbage),
//! `FinishComment` renders one run's line, `WorkItemSummary` sums a work item's runs by agent.

mod error;
pub mod format;
mod group_commit;
mod service;
pub mod store;

pub use error::LedgerError;
pub use service::UsageLedgerService;

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
