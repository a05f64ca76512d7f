//! Routes, limits and the webhook handlers.

use std::fmt::Write;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, HttpBody};
use axum::extract::{Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use orchestrator_kit::time::now_ms;
use serde_json::json;
use sha2::{Digest, Sha256};

use crate::Shared;
use crate::inbox::{self, NewDelivery, State as InboxState, Stored};
use crate::metrics::escape;
use crate::queue;
use crate::signature::{self, SignatureError};
use crate::translate::{self, Translation};

pub(crate) fn router(shared: Arc<Shared>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/webhooks/plane", post(plane))
        .route("/webhooks/gitea", post(gitea))
        .route("/queue", get(queue_handler))
        .route("/metrics", get(metrics_handler))
        .merge(crate::dashboard::router())
        .layer(middleware::from_fn_with_state(Arc::clone(&shared), limits))
        .with_state(shared)
}

/// The route label of a request, from a fixed set (never the raw path: unbounded labels).
fn route_label(path: &str) -> &'static str {
    match path {
        "/healthz" => "/healthz",
        "/webhooks/plane" => "/webhooks/plane",
        "/webhooks/gitea" => "/webhooks/gitea",
        "/queue" => "/queue",
        "/metrics" => "/metrics",
        _ => "other",
    }
}

/// Bounds the work in flight: at most `max_concurrent_requests` handlers run at once (the
/// others wait, unread, up to the request timeout, then get 503), and a handler that runs
/// past twice the request timeout is abandoned with 503. Counts every answer for /metrics.
async fn limits(State(shared): State<Arc<Shared>>, req: Request, next: Next) -> Response {
    let route = route_label(req.uri().path());
    let timeout = shared.config.request_timeout;
    let response = match tokio::time::timeout(timeout, Arc::clone(&shared.limiter).acquire_owned())
        .await
    {
        Ok(Ok(_permit)) => match tokio::time::timeout(timeout * 2, next.run(req)).await {
            Ok(r) => r,
            Err(_) => reply(StatusCode::SERVICE_UNAVAILABLE, "request timed out"),
        },
        Ok(Err(_)) | Err(_) => reply(StatusCode::SERVICE_UNAVAILABLE, "gateway busy, try again"),
    };
    shared.metrics.request(route, response.status().as_u16());
    response
}

fn reply(status: StatusCode, error: &str) -> Response {
    (status, axum::Json(json!({ "error": error }))).into_response()
}

async fn healthz() -> axum::Json<serde_json::Value> {
    axum::Json(json!({ "status": "ok" }))
}

/// Why a webhook was refused. The one mapping to an HTTP status is in `into_response`:
/// the sender's mistakes are 4xx with a short reason, ours are 503 and logged.
#[derive(Debug, thiserror::Error)]
enum HookError {
    #[error("content type must be application/json")]
    ContentType,
    #[error("body larger than {0} bytes")]
    TooLarge(usize),
    #[error("body not received in time")]
    SlowBody,
    #[error("cannot read body")]
    BodyRead,
    #[error("{0}")]
    Signature(SignatureError),
    #[error("{0}")]
    BadRequest(String),
    #[error("storage unavailable")]
    Storage(#[from] sqlx::Error),
}

impl IntoResponse for HookError {
    fn into_response(self) -> Response {
        let status = match &self {
            HookError::ContentType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HookError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            HookError::SlowBody => StatusCode::REQUEST_TIMEOUT,
            HookError::BodyRead | HookError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HookError::Signature(_) => StatusCode::UNAUTHORIZED,
            HookError::Storage(e) => {
                tracing::error!(error = %e, "cannot store a webhook delivery");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        reply(status, &self.to_string())
    }
}

/// The headers that differ between the two senders.
struct Source {
    name: &'static str,
    delivery_header: &'static str,
    event_header: &'static str,
    signature_headers: &'static [&'static str],
}

const PLANE: Source = Source {
    name: "plane",
    delivery_header: "x-plane-delivery",
    event_header: "x-plane-event",
    signature_headers: &["x-plane-signature"],
};

const GITEA: Source = Source {
    name: "gitea",
    delivery_header: "x-gitea-delivery",
    event_header: "x-gitea-event",
    signature_headers: &["x-gitea-signature", "x-hub-signature-256"],
};

async fn plane(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    receive(&shared, &PLANE, &headers, body).await
}

async fn gitea(State(shared): State<Arc<Shared>>, headers: HeaderMap, body: Body) -> Response {
    receive(&shared, &GITEA, &headers, body).await
}

#[tracing::instrument(skip_all, fields(source = source.name, delivery_id))]
async fn receive(shared: &Shared, source: &Source, headers: &HeaderMap, body: Body) -> Response {
    match accept(shared, source, headers, body).await {
        Ok(r) => r,
        Err(e) => {
            let outcome = match &e {
                HookError::Signature(_) => "unauthorized",
                HookError::Storage(_) => "error",
                _ => "rejected",
            };
            tracing::info!(reason = %e, "webhook refused");
            shared.metrics.delivery(source.name, outcome);
            e.into_response()
        }
    }
}

async fn accept(
    shared: &Shared,
    source: &Source,
    headers: &HeaderMap,
    body: Body,
) -> Result<Response, HookError> {
    let cfg = &shared.config;
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
    if !is_json {
        return Err(HookError::ContentType);
    }
    let body = read_body(body, cfg.max_body_bytes, cfg.request_timeout).await?;

    // Nothing from an unverified request is looked at beyond this point.
    let secret = match source.name {
        "plane" => cfg.plane_secret.as_ref(),
        _ => cfg.gitea_secret.as_ref(),
    };
    let signature = source
        .signature_headers
        .iter()
        .find_map(|h| {
            headers
                .get(*h)
                .filter(|v| !v.as_bytes().trim_ascii().is_empty())
        })
        .map(|v| v.as_bytes());
    signature::verify(
        secret.map(|s| s.expose().as_bytes()),
        cfg.allow_unsigned,
        signature,
        &body,
    )
    .map_err(HookError::Signature)?;

    let delivery_id = header_str(headers, source.delivery_header)?;
    crate::validate::opaque_id(delivery_id)
        .map_err(|why| HookError::BadRequest(format!("{}: {why}", source.delivery_header)))?;
    tracing::Span::current().record("delivery_id", delivery_id);
    let event = header_str(headers, source.event_header)?;

    let text = std::str::from_utf8(&body)
        .map_err(|_| HookError::BadRequest("body is not UTF-8".to_owned()))?;
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        HookError::BadRequest(format!(
            "malformed JSON at line {} column {}",
            e.line(),
            e.column()
        ))
    })?;
    let translation = match source.name {
        "plane" => translate::plane(event, &value, &cfg.triggers),
        _ => translate::gitea(event, &value),
    }
    .map_err(|e| HookError::BadRequest(e.0))?;

    let action = value
        .get("action")
        .and_then(serde_json::Value::as_str)
        .unwrap_or_default();
    let (state, reason, command, ordering_key) =
        match &translation {
            Translation::Apply {
                command,
                ordering_key,
            } => (
                InboxState::Pending,
                String::new(),
                Some(serde_json::to_string(command).map_err(|e| {
                    HookError::BadRequest(format!("cannot encode the command: {e}"))
                })?),
                ordering_key.as_str(),
            ),
            Translation::Ignore { reason } => (InboxState::Ignored, reason.clone(), None, ""),
        };
    let digest = Sha256::digest(&body);
    let mut body_sha256 = String::with_capacity(64);
    for b in digest {
        let _ = write!(body_sha256, "{b:02x}");
    }
    // Committed together with the deliveries that arrive alongside (group commit); the
    // answer waits for that commit.
    let stored = shared
        .inbox_writer
        .write(NewDelivery {
            source: source.name,
            delivery_id: delivery_id.to_owned(),
            body_sha256,
            event: event.to_owned(),
            action: action.chars().take(64).collect(),
            state,
            reason: reason.clone(),
            command,
            ordering_key: ordering_key.to_owned(),
            body: text.to_owned(),
            now_ms: now_ms(),
        })
        .await?;

    Ok(match stored {
        Stored::New { id } => {
            if state == InboxState::Pending {
                shared.metrics.delivery(source.name, "accepted");
                shared.wake.notify_one();
                tracing::info!(inbox_id = %id, "webhook accepted");
                (
                    StatusCode::ACCEPTED,
                    axum::Json(json!({ "status": "accepted", "id": id, "state": "pending" })),
                )
                    .into_response()
            } else {
                shared.metrics.delivery(source.name, "ignored");
                tracing::info!(inbox_id = %id, %reason, "webhook ignored");
                axum::Json(
                    json!({ "status": "ignored", "id": id, "state": "ignored", "reason": reason }),
                )
                .into_response()
            }
        }
        Stored::Duplicate { id, state } => {
            shared.metrics.delivery(source.name, "duplicate");
            tracing::info!(inbox_id = %id, "webhook redelivered: nothing changes");
            axum::Json(json!({ "status": "duplicate", "id": id, "state": state.as_str() }))
                .into_response()
        }
    })
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, HookError> {
    headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| HookError::BadRequest(format!("{name} header is required")))
}

/// Reads at most `max` bytes, within `timeout`.
async fn read_body(body: Body, max: usize, timeout: Duration) -> Result<Vec<u8>, HookError> {
    if let Some(len) = body.size_hint().exact()
        && usize::try_from(len).map_or(true, |l| l > max)
    {
        return Err(HookError::TooLarge(max));
    }
    let read = async {
        let mut body = std::pin::pin!(body);
        let mut buf = Vec::new();
        while let Some(frame) = std::future::poll_fn(|cx| body.as_mut().poll_frame(cx)).await {
            let frame = frame.map_err(|_| HookError::BodyRead)?;
            if let Ok(data) = frame.into_data() {
                if buf.len() + data.len() > max {
                    return Err(HookError::TooLarge(max));
                }
                buf.extend_from_slice(&data);
            }
        }
        Ok(buf)
    };
    tokio::time::timeout(timeout, read)
        .await
        .map_err(|_| HookError::SlowBody)?
}

async fn queue_handler(State(shared): State<Arc<Shared>>) -> axum::Json<serde_json::Value> {
    axum::Json(queue::snapshot(&shared).await)
}

async fn metrics_handler(State(shared): State<Arc<Shared>>) -> Response {
    let mut out = String::with_capacity(4096);
    shared.metrics.render(&mut out);

    let (counts, launcher, stage_engine) = tokio::join!(
        inbox::counts(&shared.db),
        queue::launcher_snapshot(&shared),
        queue::stage_engine_snapshot(&shared)
    );
    out.push_str("# HELP gateway_inbox_deliveries Deliveries in the inbox, by state.\n");
    out.push_str("# TYPE gateway_inbox_deliveries gauge\n");
    match counts {
        Ok(c) => {
            for (state, n) in [
                ("pending", c.pending),
                ("applied", c.applied),
                ("ignored", c.ignored),
                ("dead", c.dead),
            ] {
                let _ = writeln!(out, "gateway_inbox_deliveries{{state=\"{state}\"}} {n}");
            }
            out.push_str("# HELP gateway_inbox_dead_letters Deliveries given up on.\n");
            out.push_str("# TYPE gateway_inbox_dead_letters gauge\n");
            let _ = writeln!(out, "gateway_inbox_dead_letters {}", c.dead);
            out.push_str("# HELP gateway_inbox_oldest_pending_age_seconds Age of the oldest pending delivery (0 when none).\n");
            out.push_str("# TYPE gateway_inbox_oldest_pending_age_seconds gauge\n");
            let age = c
                .oldest_pending_received_at_ms
                .map_or(0.0, |t| (now_ms() - t).max(0) as f64 / 1000.0);
            let _ = writeln!(out, "gateway_inbox_oldest_pending_age_seconds {age}");
        }
        Err(e) => tracing::warn!(error = %e, "cannot read the inbox for /metrics"),
    }
    out.push_str(
        "# HELP orchestrator_jobs Launcher jobs by status (from Launcher.QueueSnapshot).\n",
    );
    out.push_str("# TYPE orchestrator_jobs gauge\n");
    let launcher_up = match &launcher {
        Ok(s) => {
            for c in &s.counts {
                let status = orchestrator_proto::launcher::v1::JobStatus::try_from(c.status)
                    .map(|s| s.as_str_name().to_ascii_lowercase())
                    .unwrap_or_else(|_| "unspecified".to_owned());
                let _ = writeln!(
                    out,
                    "orchestrator_jobs{{status=\"{}\"}} {}",
                    escape(&status),
                    c.count
                );
            }
            out.push_str("# HELP orchestrator_llm_jobs_waiting_for_budget LLM jobs queued because a spending ceiling is reached.\n");
            out.push_str("# TYPE orchestrator_llm_jobs_waiting_for_budget gauge\n");
            let _ = writeln!(
                out,
                "orchestrator_llm_jobs_waiting_for_budget {}",
                s.budget_waiting
            );
            out.push_str("# HELP orchestrator_budget_ceiling_usd A spending ceiling in force, by period and repository (\"\" = every one).\n");
            out.push_str("# TYPE orchestrator_budget_ceiling_usd gauge\n");
            for c in &s.budget_ceilings {
                let _ = writeln!(
                    out,
                    "orchestrator_budget_ceiling_usd{{period=\"{}\",repo=\"{}\"}} {}",
                    escape(&c.period),
                    escape(&c.repo),
                    c.ceiling_usd
                );
            }
            out.push_str("# HELP orchestrator_budget_spent_usd What was spent against a ceiling in its current UTC period (absent when usage-ledger could not say).\n");
            out.push_str("# TYPE orchestrator_budget_spent_usd gauge\n");
            for c in &s.budget_ceilings {
                if let Some(spent) = c.spent_usd {
                    let _ = writeln!(
                        out,
                        "orchestrator_budget_spent_usd{{period=\"{}\",repo=\"{}\"}} {spent}",
                        escape(&c.period),
                        escape(&c.repo)
                    );
                }
            }
            1
        }
        Err(_) => 0,
    };
    let stage_engine_up = match &stage_engine {
        Ok(s) => {
            out.push_str("# HELP orchestrator_stall_watchdog_firings_total Stall watchdog firings since stage-engine started, by reason (each means a seam lost a job's end or an enqueue).\n");
            out.push_str("# TYPE orchestrator_stall_watchdog_firings_total counter\n");
            for f in &s.stall_watchdog_firings {
                let _ = writeln!(
                    out,
                    "orchestrator_stall_watchdog_firings_total{{reason=\"{}\"}} {}",
                    escape(&f.reason),
                    f.count
                );
            }
            out.push_str("# HELP orchestrator_work_items Work items by status (from StageEngine.Snapshot).\n");
            out.push_str("# TYPE orchestrator_work_items gauge\n");
            for c in &s.items {
                let _ = writeln!(
                    out,
                    "orchestrator_work_items{{status=\"{}\"}} {}",
                    escape(&c.status),
                    c.count
                );
            }
            1
        }
        Err(_) => 0,
    };
    out.push_str(
        "# HELP gateway_upstream_up Whether the last read of a service for /metrics succeeded.\n",
    );
    out.push_str("# TYPE gateway_upstream_up gauge\n");
    let _ = writeln!(
        out,
        "gateway_upstream_up{{service=\"launcher\"}} {launcher_up}"
    );
    let _ = writeln!(
        out,
        "gateway_upstream_up{{service=\"stage-engine\"}} {stage_engine_up}"
    );
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        out,
    )
        .into_response()
}
