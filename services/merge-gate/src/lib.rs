//! merge-gate: one merge at a time per repo, mergeability checks, idempotent merge
//! finalization (ARCHITECTURE §3.4).
//!
//! - leases (`AcquireLease`, `ReleaseLease`, `GetLease`, `ListLeases`,
//!   `ReclaimStaleLeases`): one holder per repo, taken in one atomic statement; a stale lease
//!   (TTL passed, or holder judged dead by the launcher) is taken over atomically;
//! - [`mirror`]: `check_branch_mergeable` with `git merge-tree --write-tree` in a bare mirror;
//! - `EnsurePr`, and `FinalizeMerge` ([`finalize`]): merged once, pinned to the tested head.

pub mod config;
mod error;
mod finalize;
pub mod liveness;
pub mod mirror;
mod service;
pub mod store;

pub use config::MergeGateConfig;
pub use error::GateError;
pub use finalize::Finalized;
pub use liveness::{HolderLiveness, LauncherLiveness, TtlOnly};
pub use service::{Acquired, MergeGateService, lease_to_proto};

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
