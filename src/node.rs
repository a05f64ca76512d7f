//! Starts a set of parts (services and the gateway) in this process.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use orchestrator_kit::clients::Clients;
use orchestrator_kit::db::{self, Location};
use orchestrator_kit::grpc::{RequireToken, serve};
use orchestrator_kit::{Config, Db, ServiceName};
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::Routes;

/// Why a node could not start. Each message names its culprit on one line.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{var}: cannot listen on {addr}: {source}")]
    Listen {
        var: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Db(#[from] orchestrator_kit::DbError),
    #[error(transparent)]
    Client(#[from] orchestrator_kit::clients::BadUrl),
    #[error(transparent)]
    Config(#[from] orchestrator_kit::ConfigError),
}

/// A running set of parts.
pub struct Node {
    /// Where each part listens (the real port when 0 was asked for).
    pub addrs: BTreeMap<ServiceName, SocketAddr>,
    /// The configuration with the bound addresses filled in.
    pub config: Config,
    tasks: JoinSet<(ServiceName, Result<(), String>)>,
    shutdown: CancellationToken,
}

impl Node {
    /// Binds every listener, opens and migrates every store, then starts serving. Nothing
    /// serves unless everything could be prepared, so a bad address or an unreachable
    /// database fails start-up with nothing half-started.
    pub async fn start(
        mut config: Config,
        parts: &[ServiceName],
        shutdown: CancellationToken,
    ) -> Result<Node, NodeError> {
        // Service sections are read first: a bad value fails start-up before anything binds.
        let post_deploy_config = if parts.contains(&ServiceName::PostDeploy) {
            ::post_deploy::PostDeployConfig::from_env(&config.env, &config.data_dir)?
        } else {
            ::post_deploy::PostDeployConfig::new(config.data_dir.join("post-deploy"))
        };
        if parts.contains(&ServiceName::MergeGate) {
            ::merge_gate::MergeGateConfig::from_env(&config.env)?;
        }
        if parts.contains(&ServiceName::Reaper) {
            ::reaper::ReaperConfig::from_env(&config.env)?;
        }
        let mut listeners = Vec::new();
        for &part in parts {
            let addr = config.listen[&part];
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| NodeError::Listen {
                    var: part.addr_var(),
                    addr,
                    source,
                })?;
            let bound = listener.local_addr().map_err(|source| NodeError::Listen {
                var: part.addr_var(),
                addr,
                source,
            })?;
            config.set_bound(part, bound);
            listeners.push((part, listener));
        }

        let location = Location::from_config(&config);
        if let Location::SqliteDir(dir) = &location {
            db::ensure_data_dir(dir)?;
        }
        let gateway_config = if parts.contains(&ServiceName::Gateway) {
            Some(gateway::GatewayConfig::from_env(&config.env)?)
        } else {
            None
        };
        let mut stores = BTreeMap::new();
        let opened = futures_join(parts.iter().map(|&part| {
            let location = location.clone();
            async move { (part, db::open(part, &location, migrator(part)).await) }
        }))
        .await;
        for (part, db) in opened {
            stores.insert(part, db?);
        }
        let clients = Clients::from_config(&config)?;
        // Built before anything serves: a bad tracker or forge setting fails start-up.
        let launcher = match stores.remove(&ServiceName::Launcher) {
            Some(db) => Some(::launcher::LauncherService::start(
                db,
                clients.clone(),
                &config.env,
                &::stage_engine::pipeline::ROLES,
                shutdown.clone(),
            )?),
            None => None,
        };
        let mut stage_engine = match stores.remove(&ServiceName::StageEngine) {
            Some(db) => Some(::stage_engine::StageEngineService::start(
                db,
                clients.clone(),
                &config.env,
                shutdown.clone(),
            )?),
            None => None,
        };

        let mut merge_gate = match stores.remove(&ServiceName::MergeGate) {
            Some(db) => Some(::merge_gate::MergeGateService::start(
                db,
                clients.clone(),
                &config.env,
            )?),
            None => None,
        };

        // The reaper's loop starts here and stops with the node's shutdown token.
        let mut reaper = match stores.remove(&ServiceName::Reaper) {
            Some(db) => Some(::reaper::ReaperService::start(
                db,
                clients.clone(),
                &config.env,
                shutdown.clone(),
            )?),
            None => None,
        };

        let mut tasks = JoinSet::new();
        if let Some(svc) = &launcher {
            // The node is down only once the launcher has handed its running jobs back.
            let stopped = svc.supervisor().stopped();
            tasks.spawn(async move {
                stopped.cancelled().await;
                (ServiceName::Launcher, Ok(()))
            });
        }
        let mut launcher = launcher;
        let mut addrs = BTreeMap::new();
        for (part, listener) in listeners {
            addrs.insert(part, config.listen[&part]);
            let stop = shutdown.clone();
            if part == ServiceName::Gateway {
                let store = stores
                    .remove(&part)
                    .expect("a store was opened for every part");
                let gw = gateway::Gateway::new(
                    store,
                    gateway_config
                        .clone()
                        .expect("the gateway's configuration was read"),
                    clients.clone(),
                );
                tasks.spawn(async move {
                    (
                        part,
                        gateway::serve(listener, gw, stop)
                            .await
                            .map_err(|e| e.to_string()),
                    )
                });
                continue;
            }
            let auth = RequireToken::new(config.internal_token.as_ref());
            // The services built above (they own loops or need the configuration) are
            // served as they are; the others are built from their store here.
            let routes = match part {
                ServiceName::Launcher => {
                    use orchestrator_proto::launcher::v1::launcher_server::LauncherServer;
                    let svc = launcher
                        .take()
                        .expect("the launcher was built for its part");
                    Routes::new(LauncherServer::with_interceptor(svc, auth))
                }
                ServiceName::StageEngine => {
                    use orchestrator_proto::stage_engine::v1::stage_engine_server::StageEngineServer;
                    let svc = stage_engine
                        .take()
                        .expect("stage-engine was built for its part");
                    Routes::new(StageEngineServer::with_interceptor(svc, auth))
                }
                ServiceName::MergeGate => {
                    use orchestrator_proto::merge_gate::v1::merge_gate_server::MergeGateServer;
                    let svc = merge_gate
                        .take()
                        .expect("merge-gate was built for its part");
                    Routes::new(MergeGateServer::with_interceptor(svc, auth))
                }
                ServiceName::Reaper => {
                    use orchestrator_proto::reaper::v1::reaper_server::ReaperServer;
                    let svc = reaper.take().expect("the reaper was built for its part");
                    Routes::new(ReaperServer::with_interceptor(svc, auth))
                }
                _ => {
                    let store = stores
                        .remove(&part)
                        .expect("a store was opened for every gRPC part");
                    routes(part, store, clients.clone(), &auth, &post_deploy_config)
                }
            };
            tasks.spawn(async move {
                (
                    part,
                    serve(part, routes, listener, stop)
                        .await
                        .map_err(|e| e.to_string()),
                )
            });
        }
        Ok(Node {
            addrs,
            config,
            tasks,
            shutdown,
        })
    }

    /// The token that stops this node.
    pub fn shutdown_token(&self) -> CancellationToken {
        self.shutdown.clone()
    }

    /// Waits until every part has stopped. Returns the first part that failed, if any; a
    /// part that stops on its own while the others run brings the node down.
    pub async fn wait(mut self) -> Result<(), String> {
        let mut first_error = None;
        while let Some(joined) = self.tasks.join_next().await {
            let (part, result) = match joined {
                Ok(r) => r,
                Err(e) => (ServiceName::Gateway, Err(format!("task failed: {e}"))),
            };
            if let Err(e) = result {
                tracing::error!(service = part.as_str(), error = %e, "part failed");
                first_error.get_or_insert(format!("{part}: {e}"));
            }
            // One part ending means the node is no longer whole: stop the rest.
            self.shutdown.cancel();
        }
        first_error.map_or(Ok(()), Err)
    }
}

/// The migrations this build embeds for `part` (`staging-check` compares them with storage).
pub fn migrator(part: ServiceName) -> &'static sqlx::migrate::Migrator {
    match part {
        ServiceName::StageEngine => &stage_engine::MIGRATOR,
        ServiceName::Launcher => &launcher::MIGRATOR,
        ServiceName::Reaper => &reaper::MIGRATOR,
        ServiceName::MergeGate => &merge_gate::MIGRATOR,
        ServiceName::PostDeploy => &post_deploy::MIGRATOR,
        ServiceName::UsageLedger => &usage_ledger::MIGRATOR,
        ServiceName::Gateway => &gateway::MIGRATOR,
    }
}

fn routes(
    part: ServiceName,
    db: Db,
    clients: Clients,
    auth: &RequireToken,
    post_deploy_config: &::post_deploy::PostDeployConfig,
) -> Routes {
    use orchestrator_proto::post_deploy::v1::post_deploy_server::PostDeployServer;
    use orchestrator_proto::usage_ledger::v1::usage_ledger_server::UsageLedgerServer;

    let auth = auth.clone();
    match part {
        ServiceName::PostDeploy => Routes::new(PostDeployServer::with_interceptor(
            ::post_deploy::PostDeployService::new(db, clients.clone(), post_deploy_config.clone())
                .with_alert_sink(std::sync::Arc::new(::post_deploy::StageEngineSink::new(
                    clients.stage_engine.clone(),
                ))),
            auth,
        )),
        // The launcher, stage-engine, merge-gate and the reaper are built in `Node::start`
        // (they need the configuration, and the loops the shutdown token).
        ServiceName::UsageLedger
        | ServiceName::StageEngine
        | ServiceName::Launcher
        | ServiceName::MergeGate
        | ServiceName::Reaper
        | ServiceName::Gateway => Routes::new(UsageLedgerServer::with_interceptor(
            ::usage_ledger::UsageLedgerService::new(db),
            auth,
        )),
    }
}

/// Runs futures concurrently and returns their outputs in order.
async fn futures_join<F>(futs: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futs.map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await.expect("store opening does not panic"));
    }
    out
}
