//! Starting a stack for a test.

use std::path::PathBuf;

use orchestrator::Node;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::{Config, Env, ServiceName};
use orchestrator_testkit::TestStorage;
use tokio_util::sync::CancellationToken;

/// A running in-process stack; stops when dropped.
pub struct Stack {
    pub config: Config,
    pub clients: Clients,
    shutdown: CancellationToken,
    _storage: TestStorage,
}

impl Stack {
    /// Where the stack's services keep their tables (tests that set a row up directly).
    pub fn storage_location(&self) -> orchestrator_kit::db::Location {
        self._storage.location.clone()
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// Every part on `127.0.0.1:0`, storage from `storage`, the repo's trivial deploy target
/// (`orchestrator_testkit::trivial_deploy_targets`), plus `extra` variables (which win).
pub fn env_for(storage: &TestStorage, extra: &[(&str, &str)]) -> Env {
    let mut env = Env::default();
    for part in ServiceName::ALL {
        env = env.with(part.addr_var(), "127.0.0.1:0");
    }
    env = env.with(
        "ORCH_DEPLOY_TARGETS_JSON",
        orchestrator_testkit::trivial_deploy_targets(),
    );
    for (k, v) in extra {
        env = env.with(*k, *v);
    }
    storage.apply(env)
}

/// Starts every part in this process.
pub async fn start(storage: TestStorage, extra: &[(&str, &str)]) -> Stack {
    orchestrator_kit::telemetry::init_for_tests();
    let env = env_for(&storage, extra);
    // The repository the tests' work items name, with its base branch: stage-engine
    // refuses a work item for a repository the forge does not have.
    let forge = orchestrator_forge::ForgeConfig::from_env(&env).expect("forge config");
    if forge.kind == orchestrator_forge::ForgeKind::Local {
        orchestrator_forge::local::LocalForge::new(forge.local_dir.clone(), forge.base_branch)
            .init_repo(&orchestrator_forge::RepoName::parse("acme/app").expect("repo"))
            .await
            .expect("init acme/app in the local forge");
    }
    let config = Config::from_env(env).expect("test config");
    let shutdown = CancellationToken::new();
    let node = Node::start(config, &ServiceName::ALL, shutdown.clone())
        .await
        .expect("stack starts");
    let config = node.config.clone();
    tokio::spawn(node.wait());
    let clients = Clients::from_config(&config).expect("clients");
    Stack {
        config,
        clients,
        shutdown,
        _storage: storage,
    }
}

/// `shared/contracts`, beside the repository (or `ORCH_CONTRACTS_DIR`).
pub fn contracts_dir() -> PathBuf {
    orchestrator_testkit::contracts_dir()
}

/// A plain channel to `url`, with no token.
pub async fn plain_channel(url: &str) -> tonic::transport::Channel {
    tonic::transport::Endpoint::from_shared(url.to_owned())
        .expect("url")
        .connect()
        .await
        .unwrap_or_else(|e| panic!("connect {url}: {e}"))
}
