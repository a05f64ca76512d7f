//! What every orchestrator service shares: typed configuration, telemetry, storage with
//! per-service migrations (and group commit), the gRPC server bootstrap, and the clients of
//! every service.

pub mod clients;
pub mod config;
pub mod db;
pub mod group_commit;
pub mod grpc;
pub mod service;
pub mod shutdown;
pub mod telemetry;
pub mod time;

pub use config::{Config, ConfigError, Env, Secret};
pub use db::{Backend, Db, DbError};
pub use service::ServiceName;
