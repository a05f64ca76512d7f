//! reaper: background liveness (ARCHITECTURE §3.6). Every `ORCH_REAPER_INTERVAL_S` it looks
//! at every running job through the launcher and applies three tiers ([`tiers`]): a
//! dead-pid streak, an exit code the launcher never finalized, and a backstop on run time.
//! Its only mutating write is the launcher's guarded `FlipTerminal`; it also has merge-gate
//! reclaim stale merge leases. `Snapshot` and `TickNow` show and drive it.

pub mod config;
mod error;
pub mod peers;
mod service;
pub mod store;
pub mod tiers;

pub use config::ReaperConfig;
pub use error::ReaperError;
pub use peers::{GrpcPeers, Peers};
pub use service::{ReaperService, to_report};

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
