//! merge-gate: One merge at a time per repo, mergeability checks, idempotent merge finalization.
//!
//! The RPC surface is declared in `proto/orchestrator/merge_gate/v1/merge_gate.proto`. Until issue #5
//! builds it, every RPC answers UNIMPLEMENTED (see `docs/rpc-status.md`).

use orchestrator_kit::Db;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::merge_gate::v1::merge_gate_server::MergeGate;

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The merge-gate gRPC service over its own storage and the clients of the services it calls.
#[derive(Clone)]
pub struct MergeGateService {
    #[allow(dead_code)]
    db: Db,
    #[allow(dead_code)]
    clients: Clients,
}

impl MergeGateService {
    pub fn new(db: Db, clients: Clients) -> Self {
        MergeGateService { db, clients }
    }
}

// Every RPC keeps the generated default: UNIMPLEMENTED.
#[tonic::async_trait]
impl MergeGate for MergeGateService {}
