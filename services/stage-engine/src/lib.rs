//! stage-engine: The pipeline state machine: stage transitions, quality gates, rollbacks, the human gate.
//!
//! The RPC surface is declared in `proto/orchestrator/stage_engine/v1/stage_engine.proto`. Until issue #3
//! builds it, every RPC answers UNIMPLEMENTED (see `docs/rpc-status.md`).

use orchestrator_kit::Db;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::stage_engine::v1::stage_engine_server::StageEngine;

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The stage-engine gRPC service over its own storage and the clients of the services it calls.
#[derive(Clone)]
pub struct StageEngineService {
    #[allow(dead_code)]
    db: Db,
    #[allow(dead_code)]
    clients: Clients,
}

impl StageEngineService {
    pub fn new(db: Db, clients: Clients) -> Self {
        StageEngineService { db, clients }
    }
}

// Every RPC keeps the generated default: UNIMPLEMENTED.
#[tonic::async_trait]
impl StageEngine for StageEngineService {}
