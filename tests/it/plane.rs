//! A fake Plane on 127.0.0.1:0 for the stack tests, following
//! `shared/contracts/plane-notes.md`: the routes stage-engine calls, under the token each
//! must use, answering with the contract samples. It can be "down" (503) for comment posts
//! or for the project lookup, and it records what it was asked.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use crate::common::contracts_dir;

/// The project of the contract samples, and its identifier here.
pub const PROJECT: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
pub const IDENTIFIER: &str = "PROJ";
/// The issue of the contract samples (its `sequence_id` is 42).
pub const ISSUE: &str = "9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d";

#[derive(Default)]
pub struct Plane {
    /// While true, comment posts answer 503; the first one during an outage is stored
    /// anyway (its answer "lost"), as when Plane commits and the response never arrives.
    pub outage: Mutex<bool>,
    pub lost_one: Mutex<bool>,
    /// While true, `GET .../projects/{id}/` answers 503.
    pub project_down: Mutex<bool>,
    /// `GET .../projects/{id}/` answered 200, and 503.
    pub project_gets: Mutex<u32>,
    pub project_refused: Mutex<u32>,
    /// external_id -> comment JSON, in order (comments of every issue of the project).
    pub comments: Mutex<Vec<(String, Value)>>,
    pub created_201: Mutex<BTreeMap<String, u32>>,
    pub answered_503: Mutex<u32>,
    pub answered_409: Mutex<u32>,
    pub state_patches: Mutex<Vec<String>>,
    /// Requests that broke the contract or that no route expects.
    pub errors: Mutex<Vec<String>>,
}

fn count(n: &Mutex<u32>) {
    *n.lock().expect("lock") += 1;
}

/// The issue id of `{base}/work-items/{issue}/{tail}`, if `path` is that.
fn issue_of<'a>(path: &'a str, base: &str, tail: &str) -> Option<&'a str> {
    path.strip_prefix(base)?
        .strip_prefix("/work-items/")?
        .strip_suffix(tail)
        .filter(|id| !id.is_empty() && !id.contains('/'))
}

async fn plane(
    State(p): State<Arc<Plane>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let path = uri.path().to_owned();
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let base = format!("/api/v1/workspaces/acme/projects/{PROJECT}");
    let read = |name: &str| std::fs::read_to_string(contracts_dir().join(name)).expect("sample");
    if let Some(issue) = issue_of(&path, &base, "/comments/")
        && method == Method::POST
    {
        // Every comment is posted under its role's bot token (stage-engine's are the stream
        // bot's; an agent's job, now that the test repository exists, its role's), never
        // under the shared token.
        if !matches!(key.as_str(), "plane_api_stream" | "plane_api_analyst") {
            p.errors
                .lock()
                .expect("lock")
                .push(format!("comment posted with {key:?}"));
        }
        let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        let ext = b["external_id"].as_str().unwrap_or_default().to_owned();
        if b["external_source"] != "orchestrator"
            || ext.is_empty()
            || !b["comment_html"].is_string()
        {
            p.errors
                .lock()
                .expect("lock")
                .push(format!("bad comment body {b}"));
        }
        let exists = p
            .comments
            .lock()
            .expect("lock")
            .iter()
            .any(|(e, _)| *e == ext);
        let stored = |p: &Plane| {
            let mut c: Value =
                serde_json::from_str(&read("plane-api-comment-created.json")).expect("json");
            let mut comments = p.comments.lock().expect("lock");
            c["id"] = json!(format!("c-{}", comments.len() + 1));
            c["issue"] = json!(issue);
            c["comment_html"] = b["comment_html"].clone();
            c["external_id"] = json!(ext);
            c["external_source"] = json!("orchestrator");
            comments.push((ext.clone(), c.clone()));
            *p.created_201
                .lock()
                .expect("lock")
                .entry(ext.clone())
                .or_default() += 1;
            c
        };
        if *p.outage.lock().expect("lock") {
            count(&p.answered_503);
            let mut lost = p.lost_one.lock().expect("lock");
            if !*lost && !exists {
                *lost = true;
                stored(&p);
            }
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "<html>503 Service Unavailable</html>".to_owned(),
            );
        }
        if exists {
            count(&p.answered_409);
            return (
                StatusCode::CONFLICT,
                json!({"error": "Issue Comment with the same external id and external source already exists", "id": "x"}).to_string(),
            );
        }
        return (StatusCode::CREATED, stored(&p).to_string());
    }
    if let Some(issue) = issue_of(&path, &base, "/comments/")
        && method == Method::GET
    {
        let results: Vec<Value> = p
            .comments
            .lock()
            .expect("lock")
            .iter()
            .filter(|(_, c)| c["issue"] == issue)
            .map(|(_, c)| c.clone())
            .collect();
        let page = json!({"grouped_by": null, "sub_grouped_by": null, "total_count": results.len(), "next_cursor": "100:1:0",
            "prev_cursor": "100:-1:1", "next_page_results": false, "prev_page_results": false, "count": results.len(),
            "total_pages": 1, "total_results": results.len(), "extra_stats": null, "results": results});
        return (StatusCode::OK, page.to_string());
    }
    if key != "plane_api_shared" {
        p.errors
            .lock()
            .expect("lock")
            .push(format!("{method} {path} with {key:?}"));
    }
    if path == format!("{base}/") && method == Method::GET {
        if *p.project_down.lock().expect("lock") {
            count(&p.project_refused);
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "<html>503 Service Unavailable</html>".to_owned(),
            );
        }
        count(&p.project_gets);
        return (
            StatusCode::OK,
            orchestrator_testkit::plane_project_json(PROJECT, IDENTIFIER),
        );
    }
    if path == format!("{base}/states/") && method == Method::GET {
        return (StatusCode::OK, read("plane-api-states-list.json"));
    }
    if issue_of(&path, &base, "/").is_some() && method == Method::PATCH {
        let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        p.state_patches
            .lock()
            .expect("lock")
            .push(b["state"].as_str().unwrap_or_default().to_owned());
        return (StatusCode::OK, read("plane-api-work-item.json"));
    }
    p.errors
        .lock()
        .expect("lock")
        .push(format!("unexpected {method} {path}"));
    (
        StatusCode::NOT_FOUND,
        json!({"error": "The requested resource does not exist."}).to_string(),
    )
}

/// Serves `p` on 127.0.0.1:0; returns its base URL (`PLANE_BASE_URL`).
pub async fn serve_plane(p: Arc<Plane>) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let app = axum::Router::new().fallback(plane).with_state(p);
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// The variables that point stage-engine at the fake on `url`.
pub fn plane_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ORCH_TRACKER", "plane".to_owned()),
        ("PLANE_BASE_URL", url.to_owned()),
        ("PLANE_WORKSPACE_SLUG", "acme".to_owned()),
        ("PLANE_API_TOKEN", "plane_api_shared".to_owned()),
        ("PLANE_BOT_TOKEN_STREAM", "plane_api_stream".to_owned()),
        ("PLANE_BOT_TOKEN_ANALYST", "plane_api_analyst".to_owned()),
        ("ORCH_TRACKER_TIMEOUT_MS", "2000".to_owned()),
    ]
}
