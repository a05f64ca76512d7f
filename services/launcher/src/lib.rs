//! launcher: the durable job queue and the agent process supervisor (ARCHITECTURE §3.2).
//!
//! - [`store`]: the `jobs`, `launcher_instances` and `breaker` tables; the claim (oldest
//!   runnable first, LLM jobs capped across replicas, `FOR UPDATE SKIP LOCKED` on
//!   PostgreSQL) and the guarded writes (the attempt is the fencing token);
//! - [`supervisor`]: the event-driven dispatcher, heartbeats, restart reconciliation, the
//!   circuit breaker's gate;
//! - one LLM run, by responsibility: `prepare` (the payload validated, the checkout, the
//!   prompt and run files), [`run`] and [`agent`] (spawn in its own process group, pid
//!   stamp, watch), `finish` (classify; commit, push, PR; the job's end and its effects);
//! - [`ceilings`]: the daily and monthly spending ceilings, checked before every LLM launch;
//! - [`breaker_watch`]: people told when the circuit breaker stays open for long;
//! - `prompt`: the agent's prompt file: the role's prompt, then the task stage-engine
//!   composed for the job;
//! - [`outbox`]: the end of a run toward the peers (RecordRun, the finish comment,
//!   `AdvanceStage` or `ReportJobFailed`), written with the job's end and delivered for as
//!   long as a peer is down (the kit's one outbox mechanism);
//! - [`reserved`]: the no-LLM jobs (`deploy-finalizer`, `post-deploy-monitor`) as RPCs;
//! - [`deploy`]: the deploy target's staging or deploy command, run after the deployer's run;
//! - [`classify`] and [`rules`]: what a run came to and where the job goes next, as pure
//!   functions.

pub mod agent;
pub mod breaker_watch;
pub mod ceilings;
pub mod classify;
pub mod config;
mod deploy;
pub mod egress;
mod error;
mod finish;
pub mod outbox;
pub mod peers;
pub mod preflight;
mod prepare;
pub mod proc;
pub mod profiles;
mod prompt;
pub mod reserved;
mod resume;
pub mod rules;
pub mod run;
pub mod sandbox;
mod service;
pub mod store;
pub mod supervisor;
pub mod workspace;

pub use config::LauncherConfig;
pub use error::LauncherError;
pub use service::{LauncherService, new_job_id, to_proto, validate_agent};

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
