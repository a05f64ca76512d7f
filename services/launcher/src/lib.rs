//! launcher: The durable job queue and the agent process supervisor.
//!
//! The RPC surface is declared in `proto/orchestrator/launcher/v1/launcher.proto`. Until issue #4
//! builds it, every RPC answers UNIMPLEMENTED (see `docs/rpc-status.md`).

use orchestrator_kit::Db;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::launcher::v1::launcher_server::Launcher;

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The launcher gRPC service over its own storage and the clients of the services it calls.
#[derive(Clone)]
pub struct LauncherService {
    #[allow(dead_code)]
    db: Db,
    #[allow(dead_code)]
    clients: Clients,
}

impl LauncherService {
    pub fn new(db: Db, clients: Clients) -> Self {
        LauncherService { db, clients }
    }
}

// Every RPC keeps the generated default: UNIMPLEMENTED.
#[tonic::async_trait]
impl Launcher for LauncherService {}
