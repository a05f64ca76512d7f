//! stage-engine: the pipeline state machine (ARCHITECTURE §3.3).
//!
//! - [`pipeline`]: `STAGE_TRANSITIONS`, `ROLLBACKS`, `get_agent_for_stage` and the pure
//!   decision of `advance_stage`;
//! - [`qg`]: the `QG_CHECKS` registry over the work item's artifacts, PR and mergeability;
//! - [`engine`]: `create_work_item` and the ONE `advance_stage`, behind `AdvanceStage`,
//!   `Approve` and `OnPrMerged`;
//! - [`outbox`]: side effects (comments, Done state, usage summary, enqueues, job cancels,
//!   post-deploy Arm) written with the state change and delivered with retries;
//! - [`park`]: a failed job parks its item `blocked`; `retry` and `cancel`;
//! - [`watchdog`]: the stall watchdog, the backstop for a lost job end or enqueue;
//! - [`reconcile`]: the periodic pass that repairs what lost webhooks left (Plane issues
//!   without a work item, deleted or closed issues, merges nobody reported).
//! - [`task`]: the agent's task, composed when a transition enqueues an agent.
//! - [`ci`]: `ci_green` for `ORCH_CI_REQUIRED_REPOS`, before review -> testing and before the
//!   merge: a pending CI holds the item with no agent launched, checked again on Gitea's
//!   `status` delivery and every `ORCH_CI_POLL_S`;
//! - [`loops`]: the loop detector: the same gate failure of a stage three times parks it;
//! - [`notify`]: the outgoing webhook when a human must act (awaiting approval, blocked,
//!   the rollback budget spent), once per event through the outbox;
//! - [`reviews`]: a human's PR review: changes requested roll the item back to development
//!   with the review in the developer's task; an approval is recorded; bots are ignored.

pub mod ci;
pub mod config;
mod door;
pub mod engine;
mod error;
pub mod hook;
pub mod loops;
pub mod notify;
pub mod outbox;
pub mod park;
pub mod peers;
pub mod pipeline;
pub mod qg;
pub mod reconcile;
pub mod reviews;
mod service;
pub mod store;
pub mod task;
#[cfg(test)]
mod tests;
pub mod watchdog;

pub use config::StageEngineConfig;
pub use error::EngineError;
pub use service::{StageEngineService, to_proto};

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");
