//! The HTTP gateway (axum): Plane and Gitea webhooks in through a durable inbox, the
//! operator's window (`GET /queue`, `/metrics`, `/healthz`) out.
//!
//! A webhook is checked (content type, size, HMAC-SHA256 signature), translated into one
//! stage-engine call or an "ignored" record, and committed to the `webhook_inbox` table —
//! deduplicated by delivery id and by body — before the sender gets its 2xx. The
//! dispatcher ([`dispatch`]) then applies pending deliveries in arrival order per work
//! item, retrying while stage-engine is unavailable and dead-lettering what cannot be
//! applied. See `docs/gateway.md`.

pub mod config;
mod dashboard;
pub mod dispatch;
mod http;
pub mod inbox;
pub mod metrics;
pub mod queue;
pub mod signature;
#[cfg(test)]
mod testdata;
#[cfg(test)]
mod tests;
pub mod translate;
pub mod validate;

use std::sync::Arc;

use axum::Router;
use orchestrator_kit::Db;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::group_commit::GroupWriter;
use tokio::net::TcpListener;
use tokio::sync::{Notify, Semaphore};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

pub use config::GatewayConfig;

/// The gateway's own migrations (`webhook_inbox`), embedded.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// What the handlers and the dispatcher share.
pub(crate) struct Shared {
    pub(crate) db: Db,
    /// Stores the verified deliveries, those that arrive together in one statement.
    pub(crate) inbox_writer: GroupWriter<inbox::InboxWriter>,
    /// Records the dispatcher's outcomes, those that end together in one statement.
    pub(crate) outcome_writer: GroupWriter<inbox::OutcomeWriter>,
    pub(crate) config: GatewayConfig,
    pub(crate) clients: Clients,
    pub(crate) metrics: metrics::Metrics,
    /// Wakes the dispatcher when a delivery is stored.
    pub(crate) wake: Notify,
    /// Requests handled at once (`ORCH_GATEWAY_MAX_CONCURRENT_REQUESTS`).
    pub(crate) limiter: Arc<Semaphore>,
    pub(crate) dashboard: dashboard::Dashboard,
}

/// A gateway over its storage, its configuration and the clients of the services.
#[derive(Clone)]
pub struct Gateway {
    shared: Arc<Shared>,
}

impl Gateway {
    /// Builds the gateway; must be called inside a tokio runtime (it starts the inbox's
    /// writer tasks, which end with the last clone).
    pub fn new(db: Db, config: GatewayConfig, clients: Clients) -> Self {
        let limiter = Arc::new(Semaphore::new(config.max_concurrent_requests));
        Gateway {
            shared: Arc::new(Shared {
                inbox_writer: GroupWriter::spawn(inbox::InboxWriter(db.clone()), inbox::MAX_BATCH),
                outcome_writer: GroupWriter::spawn(
                    inbox::OutcomeWriter(db.clone()),
                    inbox::MAX_BATCH,
                ),
                db,
                dashboard: dashboard::Dashboard::new(config.dashboard_token.clone()),
                config,
                clients,
                metrics: metrics::Metrics::default(),
                wake: Notify::new(),
                limiter,
            }),
        }
    }

    /// The routes, testable without a socket.
    pub fn router(&self) -> Router {
        http::router(Arc::clone(&self.shared))
    }

    /// Tells the dashboard the address the gateway serves on (`serve` does it): without
    /// `ORCH_DASHBOARD_TOKEN` it answers only on a loopback address.
    pub fn set_listen_addr(&self, addr: std::net::SocketAddr) {
        self.shared.dashboard.set_listen_addr(addr);
    }

    /// The gateway's storage.
    pub fn db(&self) -> &Db {
        &self.shared.db
    }

    /// Starts the inbox dispatcher; it stops when `shutdown` is cancelled.
    pub fn spawn_dispatcher(&self, shutdown: CancellationToken) -> JoinHandle<()> {
        tokio::spawn(dispatch::run(Arc::clone(&self.shared), shutdown))
    }

    /// Applies whatever is due now, once (tests and tools).
    pub async fn dispatch_once(&self) -> Result<usize, sqlx::Error> {
        dispatch::tick(&self.shared).await
    }
}

/// Serves the gateway on `listener`, with its dispatcher, until `shutdown` is cancelled.
pub async fn serve(
    listener: TcpListener,
    gateway: Gateway,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    gateway.shared.config.warn_at_start();
    gateway.set_listen_addr(listener.local_addr()?);
    let dispatcher = gateway.spawn_dispatcher(shutdown.clone());
    let stop = shutdown.clone();
    let served = axum::serve(listener, gateway.router())
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if served.is_err() {
        // The dispatcher must not outlive a server that failed.
        dispatcher.abort();
    }
    let _ = dispatcher.await;
    served
}
