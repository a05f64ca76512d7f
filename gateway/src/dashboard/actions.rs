//! The actions: each a POST with the session's CSRF token, calling the RPC the CLI calls
//! (`orchestrator item approve / retry / cancel`), never a second implementation.

use std::sync::Arc;

use axum::Form;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Redirect, Response};
use orchestrator_proto::launcher::v1::CancelJobRequest;
use orchestrator_proto::stage_engine::v1::{
    ApproveRequest, CancelRequest, RetryOutboxRequest, RetryRequest,
};
use serde::Deserialize;

use super::Access;
use super::html::{self, Esc, Url};
use crate::Shared;

/// Who the services record as the actor of a dashboard action.
pub(crate) const AUTHOR: &str = "dashboard";

#[derive(Deserialize)]
pub(crate) struct ActionForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    reason: String,
}

/// The answer to a POST without its CSRF token (or with another session's).
pub(crate) fn csrf_refused() -> Response {
    tracing::info!("dashboard action refused: missing or wrong csrf token");
    (
        StatusCode::FORBIDDEN,
        html::page(
            "Refused",
            "",
            None,
            "<h1>Refused</h1><p class=\"error\">This action came without the page's CSRF token \
             (or with a stale one), so it was not carried out. Go back, reload the page and try again.</p>",
        ),
    )
        .into_response()
}

fn done(to: String) -> Response {
    Redirect::to(&to).into_response()
}

fn failed(access: &Access, what: &str, back: &str, s: tonic::Status) -> Response {
    let status = match s.code() {
        tonic::Code::NotFound => StatusCode::NOT_FOUND,
        tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
        tonic::Code::FailedPrecondition | tonic::Code::AlreadyExists => StatusCode::CONFLICT,
        tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
        tonic::Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_GATEWAY,
    };
    let body = format!(
        "<h1>{} failed</h1><p class=\"error\">{}</p><p><a href=\"{}\">Back</a></p>",
        Esc(what),
        Esc(s.message()),
        Esc(back)
    );
    (status, html::page(what, "", Some(access), &body)).into_response()
}

/// After an action the RPC took: said in the log, then back to the item's page.
fn done_for(key: &str, what: &str, back: String) -> Response {
    tracing::info!(work_item = %key, action = what, "done from the dashboard");
    done(back)
}

/// A cancel's reason as typed, or the dashboard's own when none was.
fn reason_or_default(typed: String) -> String {
    if typed.trim().is_empty() {
        "cancelled from the dashboard".to_owned()
    } else {
        typed
    }
}

pub(crate) async fn approve(
    access: Access,
    State(shared): State<Arc<Shared>>,
    Path(key): Path<String>,
    Form(f): Form<ActionForm>,
) -> Response {
    if !access.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let back = format!("/items/{}", Url(&key));
    match shared
        .clients
        .stage_engine
        .clone()
        .approve(ApproveRequest {
            work_item: key.clone(),
            author: AUTHOR.to_owned(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => done_for(&key, "approved", back),
        Err(s) => failed(&access, "Approve", &back, s),
    }
}

pub(crate) async fn retry(
    access: Access,
    State(shared): State<Arc<Shared>>,
    Path(key): Path<String>,
    Form(f): Form<ActionForm>,
) -> Response {
    if !access.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let back = format!("/items/{}", Url(&key));
    match shared
        .clients
        .stage_engine
        .clone()
        .retry(RetryRequest {
            work_item: key.clone(),
            author: AUTHOR.to_owned(),
            ..Default::default()
        })
        .await
    {
        Ok(_) => done_for(&key, "retried", back),
        Err(s) => failed(&access, "Retry", &back, s),
    }
}

pub(crate) async fn cancel(
    access: Access,
    State(shared): State<Arc<Shared>>,
    Path(key): Path<String>,
    Form(f): Form<ActionForm>,
) -> Response {
    if !access.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let back = format!("/items/{}", Url(&key));
    let reason = reason_or_default(f.reason);
    match shared
        .clients
        .stage_engine
        .clone()
        .cancel(CancelRequest {
            work_item: key.clone(),
            author: AUTHOR.to_owned(),
            reason,
        })
        .await
    {
        Ok(_) => done_for(&key, "cancelled", back),
        Err(s) => failed(&access, "Cancel", &back, s),
    }
}

pub(crate) async fn retry_outbox(
    access: Access,
    State(shared): State<Arc<Shared>>,
    Path(key): Path<String>,
    Form(f): Form<ActionForm>,
) -> Response {
    if !access.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let back = format!("/items/{}", Url(&key));
    match shared
        .clients
        .stage_engine
        .clone()
        .retry_outbox(RetryOutboxRequest {
            work_item: key.clone(),
            ..Default::default()
        })
        .await
    {
        Ok(r) => {
            tracing::info!(work_item = %key, retried = r.get_ref().retried, "outbox dead letters retried from the dashboard");
            done(back)
        }
        Err(s) => failed(&access, "Retry dead letters", &back, s),
    }
}

pub(crate) async fn cancel_job(
    access: Access,
    State(shared): State<Arc<Shared>>,
    Path(job_id): Path<String>,
    Form(f): Form<ActionForm>,
) -> Response {
    if !access.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let reason = reason_or_default(f.reason);
    match shared
        .clients
        .launcher
        .clone()
        .cancel_job(CancelJobRequest {
            job_id: job_id.clone(),
            reason,
        })
        .await
    {
        Ok(r) => {
            let job = r.into_inner().job;
            tracing::info!(job_id = %job_id, "job cancelled from the dashboard");
            done(job.map_or_else(
                || "/machine".to_owned(),
                |j| format!("/items/{}", Url(&j.work_item)),
            ))
        }
        Err(s) => failed(&access, "Cancel job", "/machine", s),
    }
}

/// Retries one of the gateway inbox's dead letters: [`crate::inbox::retry_dead`], the
/// operation `orchestrator inbox retry` calls too, then wakes the dispatcher.
pub(crate) async fn retry_inbox(
    access: Access,
    State(shared): State<Arc<Shared>>,
    Path(id): Path<String>,
    Form(f): Form<ActionForm>,
) -> Response {
    if !access.csrf_ok(&f.csrf) {
        return csrf_refused();
    }
    let back = "/machine";
    match crate::inbox::retry_dead(&shared.db, &id, orchestrator_kit::time::now_ms()).await {
        Ok(true) => {
            shared.wake.notify_one();
            tracing::info!(delivery = %id, "inbox dead letter retried from the dashboard");
            done(back.to_owned())
        }
        Ok(false) => failed(
            &access,
            "Retry dead letter",
            back,
            tonic::Status::failed_precondition(format!(
                "{id} is not a dead letter of the inbox (unknown, or already retried)"
            )),
        ),
        Err(e) => {
            tracing::error!(delivery = %id, error = %e, "cannot retry an inbox dead letter");
            failed(
                &access,
                "Retry dead letter",
                back,
                tonic::Status::internal("the gateway's inbox cannot be written now; see its log"),
            )
        }
    }
}
