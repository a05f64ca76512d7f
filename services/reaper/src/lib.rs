//! reaper: Background liveness: frees zombie jobs and reclaims stale merge leases.
//!
//! The RPC surface is declared in `proto/orchestrator/reaper/v1/reaper.proto`. Until issue #5
//! builds it, every RPC answers UNIMPLEMENTED (see `docs/rpc-status.md`).

use orchestrator_kit::Db;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::reaper::v1::reaper_server::Reaper;

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The reaper gRPC service over its own storage and the clients of the services it calls.
#[derive(Clone)]
pub struct ReaperService {
    #[allow(dead_code)]
    db: Db,
    #[allow(dead_code)]
    clients: Clients,
}

impl ReaperService {
    pub fn new(db: Db, clients: Clients) -> Self {
        ReaperService { db, clients }
    }
}

// Every RPC keeps the generated default: UNIMPLEMENTED.
#[tonic::async_trait]
impl Reaper for ReaperService {}
