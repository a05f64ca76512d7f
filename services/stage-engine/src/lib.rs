//! stage-engine: the pipeline state machine (ARCHITECTURE §3.3).
//!
//! - [`pipeline`]: `STAGE_TRANSITIONS`, `ROLLBACKS`, `get_agent_for_stage` and the pure
//!   decision of `advance_stage`;
//! - [`qg`]: the `QG_CHECKS` registry over the work item's artifacts, PR and mergeability;
//! - [`engine`]: `create_work_item` and the ONE `advance_stage`, behind `AdvanceStage`,
//!   `Approve` and `OnPrMerged`;
//! - [`outbox`]: side effects (comments, Done state, usage summary, enqueues, post-deploy
//!   Arm) written with the state change and delivered with retries;
//! - [`task`]: the agent's task, composed when a transition enqueues an agent.

pub mod config;
pub mod engine;
mod error;
pub mod hook;
pub mod outbox;
pub mod peers;
pub mod pipeline;
pub mod qg;
mod service;
pub mod store;
pub mod task;
#[cfg(test)]
mod tests;

pub use config::StageEngineConfig;
pub use error::EngineError;
pub use service::{StageEngineService, to_proto};

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
