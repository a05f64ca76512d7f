//! What every orchestrator service shares: typed configuration, telemetry, storage with
//! per-service migrations (and group commit), the one outbox mechanism, the one retry
//! policy, the gRPC server bootstrap, and the clients of every service.

pub mod clients;
pub mod config;
pub mod db;
pub mod deploy_target;
pub mod group_commit;
pub mod grpc;
pub mod outbox;
pub mod retry;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod time;

/// The `external_source` of every comment the orchestrator posts on the tracker: the tracker
/// client stamps it, and the gateway knows its own comments by it (their `:approved:`
/// prompts must never approve anything).
pub const COMMENT_EXTERNAL_SOURCE: &str = "orchestrator";

pub use config::{Config, ConfigError, Env, Secret};
pub use db::{Backend, Db, DbError};
pub use service::ServiceName;
