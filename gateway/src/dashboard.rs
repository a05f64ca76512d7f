//! The operator's dashboard (ARCHITECTURE §3.17): the board, a work item's page with its
//! live log, the machine room and the costs, served as HTML by the gateway on its own
//! address. Every page reads through the services' RPCs, as any client does; every action
//! is a POST that calls the RPC the CLI calls. See `docs/dashboard.md`.
//!
//! HTML is written by hand through [`html`]'s escaping helpers rather than a template
//! crate: the pages are few, one escape function covers everything that comes from
//! outside, and no dependency or macro language is added to the build.

mod actions;
mod auth;
mod board;
mod costs;
pub(crate) mod html;
mod item;
mod log;
mod machine;
#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::{get, post};
use orchestrator_kit::Secret;

use crate::Shared;

pub(crate) use auth::Access;

/// What the dashboard keeps beside the gateway's shared state.
pub(crate) struct Dashboard {
    /// `ORCH_DASHBOARD_TOKEN`: when set, a sign-in is required.
    token: Option<Secret>,
    /// Signs session cookies and CSRF tokens: derived from the token when there is one (so
    /// sessions outlive a restart), otherwise random for this process.
    key: Vec<u8>,
    /// The address the gateway listens on, once bound: without a token the dashboard
    /// answers only on a loopback address.
    listen: OnceLock<SocketAddr>,
}

impl Dashboard {
    pub(crate) fn new(token: Option<Secret>) -> Self {
        let key = match &token {
            Some(t) => crate::signature::sign(t.expose().as_bytes(), b"orchestrator dashboard key")
                .into_bytes(),
            None => auth::random_key(),
        };
        Dashboard {
            token,
            key,
            listen: OnceLock::new(),
        }
    }

    /// Records the address the gateway serves on (the first call wins).
    pub(crate) fn set_listen_addr(&self, addr: SocketAddr) {
        let _ = self.listen.set(addr);
    }
}

/// The dashboard's routes, merged into the gateway's router.
pub(crate) fn router() -> Router<Arc<Shared>> {
    Router::new()
        .route("/", get(board::page))
        .route("/items/{key}", get(item::page))
        .route("/jobs/{job_id}/log", get(log::page))
        .route("/jobs/{job_id}/log/stream", get(log::stream))
        .route("/machine", get(machine::page))
        .route("/costs", get(costs::page))
        .route("/signin", get(auth::signin_page).post(auth::signin))
        .route("/signout", post(auth::signout))
        .route("/items/{key}/approve", post(actions::approve))
        .route("/items/{key}/retry", post(actions::retry))
        .route("/items/{key}/cancel", post(actions::cancel))
        .route("/items/{key}/outbox/retry", post(actions::retry_outbox))
        .route("/jobs/{job_id}/cancel", post(actions::cancel_job))
        .route("/inbox/{id}/retry", post(actions::retry_inbox))
        .route("/assets/style.css", get(style))
        .route("/assets/app.js", get(script))
}

async fn style() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("dashboard/assets/style.css"),
    )
}

async fn script() -> impl IntoResponse {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        include_str!("dashboard/assets/app.js"),
    )
}
