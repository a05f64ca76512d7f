//! A job's log: the whole of it as a page (`GET /jobs/{id}/log`, readable after the run
//! and without JavaScript), and followed live as server-sent events
//! (`GET /jobs/{id}/log/stream`), bridged from `Launcher.TailLog`.

use std::convert::Infallible;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use orchestrator_proto::launcher::v1::{GetJobRequest, TailLogRequest};
use tokio_stream::{Stream, StreamExt};

use super::Access;
use super::html::{self, Esc, Url};
use crate::Shared;

/// The most of a log the page shows (its end); the stream has no limit.
const PAGE_MAX_BYTES: usize = 2 * 1024 * 1024;

pub(crate) async fn page(
    access: Access,
    State(shared): State<Arc<Shared>>,
    Path(job_id): Path<String>,
) -> Response {
    let mut launcher = shared.clients.launcher.clone();
    let job = launcher
        .get_job(GetJobRequest {
            job_id: job_id.clone(),
        })
        .await
        .map(tonic::Response::into_inner);
    let mut body = format!("<h1>Log of job <code>{}</code></h1>", Esc(&job_id));
    if let Ok(j) = &job {
        body.push_str(&format!(
            "<p><a href=\"/items/{}\">{}</a> · {} · attempt {}</p>",
            Url(&j.work_item),
            Esc(&j.work_item),
            Esc(&j.agent),
            j.attempt
        ));
    }
    let text = match launcher
        .tail_log(TailLogRequest {
            job_id: job_id.clone(),
            follow: false,
        })
        .await
    {
        Ok(stream) => {
            let mut stream = stream.into_inner();
            let mut bytes = Vec::new();
            let mut error = None;
            while let Some(chunk) = stream.next().await {
                match chunk {
                    Ok(c) => {
                        bytes.extend_from_slice(&c.data);
                        if bytes.len() > PAGE_MAX_BYTES * 2 {
                            bytes.drain(..bytes.len() - PAGE_MAX_BYTES);
                        }
                        if c.eof {
                            break;
                        }
                    }
                    Err(e) => {
                        error = Some(e.message().to_owned());
                        break;
                    }
                }
            }
            let start = bytes.len().saturating_sub(PAGE_MAX_BYTES);
            let mut text = format!(
                "<pre class=\"log\">{}</pre>",
                Esc(&String::from_utf8_lossy(&bytes[start..]))
            );
            if let Some(e) = error {
                text.push_str(&format!(
                    "<p class=\"error\">The log was cut: {}</p>",
                    Esc(&e)
                ));
            }
            text
        }
        Err(e) => format!("<p class=\"error\">No log: {}</p>", Esc(e.message())),
    };
    body.push_str(&text);
    html::page("Log", "", Some(&access), &body).into_response()
}

pub(crate) async fn stream(
    _access: Access,
    State(shared): State<Arc<Shared>>,
    Path(job_id): Path<String>,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let answer = shared
        .clients
        .launcher
        .clone()
        .tail_log(TailLogRequest {
            job_id,
            follow: true,
        })
        .await;
    // A task bridges the gRPC stream to the events; it ends when either side does (the
    // browser gone: the send fails; the job ended: the last chunk says eof).
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(16);
    tokio::spawn(async move {
        let end = match answer {
            Ok(s) => {
                let mut chunks = s.into_inner();
                loop {
                    match chunks.next().await {
                        Some(Ok(c)) => {
                            if !c.data.is_empty() {
                                let text = String::from_utf8_lossy(&c.data).replace('\r', "");
                                if tx
                                    .send(Ok(Event::default().event("log").data(text)))
                                    .await
                                    .is_err()
                                {
                                    return;
                                }
                            }
                            if c.eof {
                                break "the job has ended".to_owned();
                            }
                        }
                        Some(Err(e)) => break format!("the log stream broke: {}", e.message()),
                        None => break "the log stream closed".to_owned(),
                    }
                }
            }
            Err(e) => format!("no log: {}", e.message()),
        };
        let _ = tx.send(Ok(Event::default().event("end").data(end))).await;
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx)).keep_alive(KeepAlive::default())
}
