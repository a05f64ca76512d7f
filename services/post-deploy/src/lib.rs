//! post-deploy: the observation window after deploy ("green deploy, red prod", ARCHITECTURE §3.7).
//!
//! `Arm` opens a watch when a work item reaches `deploy -> done`; the launcher's reserved
//! `post-deploy-monitor` job calls `Tick` until it answers `done`. A tick is
//! [`probe_signals`] -> [`fold`] -> [`classify`] -> [`decide_action`] -> act
//! ([`run_rollback`] at most once per watch, or an alert), and every step's state lives in
//! post-deploy's own tables, so a restarted post-deploy resumes each watch where it was.

pub mod alerts;
pub mod config;
pub mod decide;
mod error;
pub mod log;
pub mod rollback;
mod service;
pub mod signals;
pub mod store;
pub mod validate;

pub use alerts::{AlertKind, AlertNote, AlertSink, LogSink, StageEngineSink};
pub use config::{PostDeployConfig, Target};
pub use decide::{
    Action, Classification, DecideInput, Decision, Health, Progress, Thresholds, classify,
    decide_action, fold,
};
pub use error::PostDeployError;
pub use rollback::{RollbackOutcome, RollbackVars, run_rollback};
pub use service::{PostDeployService, TickOutcome};
pub use signals::{HealthReading, MetricsReading, Signals, probe_signals};

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
