//! post-deploy: The observation window after deploy: probe, classify, decide, roll back or alert.
//!
//! The RPC surface is declared in `proto/orchestrator/post_deploy/v1/post_deploy.proto`. Until issue #6
//! builds it, every RPC answers UNIMPLEMENTED (see `docs/rpc-status.md`).

use orchestrator_kit::Db;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::post_deploy::v1::post_deploy_server::PostDeploy;

/// The service's own migrations, embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// The post-deploy gRPC service over its own storage and the clients of the services it calls.
#[derive(Clone)]
pub struct PostDeployService {
    #[allow(dead_code)]
    db: Db,
    #[allow(dead_code)]
    clients: Clients,
}

impl PostDeployService {
    pub fn new(db: Db, clients: Clients) -> Self {
        PostDeployService { db, clients }
    }
}

// Every RPC keeps the generated default: UNIMPLEMENTED.
#[tonic::async_trait]
impl PostDeploy for PostDeployService {}
