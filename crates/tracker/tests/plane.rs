//! The Plane client against a fake Plane on 127.0.0.1:0 that answers from a script and
//! checks each request — method, path, `X-API-Key` (which token for which role) and JSON
//! body — against `shared/contracts/plane-notes.md`. Response bodies are the contract
//! samples `shared/contracts/plane-api-*.json`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use orchestrator_kit::Env;
use orchestrator_tracker::plane::PlaneTracker;
use orchestrator_tracker::{IssueRef, Tracker, TrackerConfig, TrackerError, move_to_done};
use serde_json::{Value, json};

fn contracts_dir() -> PathBuf {
    orchestrator_testkit::contracts_dir()
}

fn sample(name: &str) -> String {
    std::fs::read_to_string(contracts_dir().join(name)).expect("sample")
}

struct Step {
    method: Method,
    path_and_query: String,
    token: &'static str,
    body: Option<Value>,
    status: u16,
    answer: String,
}

fn step(
    method: Method,
    pq: &str,
    token: &'static str,
    body: Option<Value>,
    status: u16,
    answer: impl ToString,
) -> Step {
    Step {
        method,
        path_and_query: pq.to_owned(),
        token,
        body,
        status,
        answer: answer.to_string(),
    }
}

#[derive(Default)]
struct Script {
    steps: Mutex<VecDeque<Step>>,
    errors: Mutex<Vec<String>>,
}

async fn handle(
    State(script): State<Arc<Script>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> impl IntoResponse {
    let pq = uri
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_default();
    let Some(step) = script.steps.lock().expect("lock").pop_front() else {
        script
            .errors
            .lock()
            .expect("lock")
            .push(format!("unexpected {method} {pq}"));
        return (StatusCode::IM_A_TEAPOT, String::new());
    };
    let mut errors = Vec::new();
    if method != step.method || pq != step.path_and_query {
        errors.push(format!(
            "expected {} {}, got {method} {pq}",
            step.method, step.path_and_query
        ));
    }
    // Header names are case-insensitive; Plane reads X-Api-Key.
    let key = headers
        .get("x-api-key")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if key != step.token {
        errors.push(format!(
            "{pq}: X-API-Key {key:?}, expected {:?}",
            step.token
        ));
    }
    match (&step.body, body.is_empty()) {
        (None, true) => {}
        (None, false) => errors.push(format!("{pq}: unexpected body")),
        (Some(want), _) => {
            let got: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if &got != want {
                errors.push(format!("{pq}: body {got} != {want}"));
            }
        }
    }
    script.errors.lock().expect("lock").extend(errors);
    (
        StatusCode::from_u16(step.status).expect("status"),
        step.answer,
    )
}

struct Fake {
    script: Arc<Script>,
    tracker: PlaneTracker,
}

impl Fake {
    async fn start(steps: Vec<Step>) -> Fake {
        let script = Arc::new(Script::default());
        script.steps.lock().expect("lock").extend(steps);
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(script.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await });
        let env = Env::from_pairs([
            ("PLANE_BASE_URL", format!("http://{addr}")),
            ("PLANE_WORKSPACE_SLUG", "acme".into()),
            ("PLANE_API_TOKEN", "plane_api_shared".into()),
            ("PLANE_BOT_TOKEN_REVIEWER", "plane_api_reviewer".into()),
            ("PLANE_BOT_TOKEN_STREAM", "plane_api_stream".into()),
            ("PLANE_BOT_TOKEN_TESTER", "".into()),
            ("ORCH_TRACKER_TIMEOUT_MS", "3000".into()),
        ]);
        let config = TrackerConfig::from_env(&env)
            .expect("config")
            .plane
            .expect("plane");
        let tracker = PlaneTracker::new(config).expect("client");
        Fake { script, tracker }
    }

    fn check(&self) {
        let errors = self.script.errors.lock().expect("lock");
        assert!(errors.is_empty(), "{errors:#?}");
        let left = self.script.steps.lock().expect("lock").len();
        assert_eq!(left, 0, "{left} scripted requests never came");
    }
}

const PROJECT: &str = "7c9e6679-7425-40de-944b-e07fc1f90ae7";
const ISSUE: &str = "9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d";

fn issue() -> IssueRef {
    IssueRef {
        project_id: PROJECT.into(),
        issue_id: ISSUE.into(),
    }
}

fn comments_path() -> String {
    format!("/api/v1/workspaces/acme/projects/{PROJECT}/work-items/{ISSUE}/comments/")
}

#[tokio::test]
async fn comments_go_out_under_the_token_of_their_role() {
    let body = |html: &str, id: &str| json!({"comment_html": html, "external_source": "orchestrator", "external_id": id});
    let created = sample("plane-api-comment-created.json");
    let p = comments_path();
    let fake = Fake::start(vec![
        step(
            Method::POST,
            &p,
            "plane_api_reviewer",
            Some(body("<p>r</p>", "k1")),
            201,
            &created,
        ),
        step(
            Method::POST,
            &p,
            "plane_api_stream",
            Some(body("<p>s</p>", "k2")),
            201,
            &created,
        ),
        // No token for the analyst, an empty one for the tester, an unknown and an empty role:
        // all on the shared token.
        step(
            Method::POST,
            &p,
            "plane_api_shared",
            Some(body("<p>a</p>", "k3")),
            201,
            &created,
        ),
        step(
            Method::POST,
            &p,
            "plane_api_shared",
            Some(body("<p>t</p>", "k4")),
            201,
            &created,
        ),
        step(
            Method::POST,
            &p,
            "plane_api_shared",
            Some(body("<p>x</p>", "k5")),
            201,
            &created,
        ),
        step(
            Method::POST,
            &p,
            "plane_api_shared",
            Some(json!({"comment_html": "<p>e</p>"})),
            201,
            &created,
        ),
    ])
    .await;
    let t = &fake.tracker;
    for (html, author, key) in [
        ("<p>r</p>", "reviewer", "k1"),
        ("<p>s</p>", "Stream", "k2"),
        ("<p>a</p>", "analyst", "k3"),
        ("<p>t</p>", "tester", "k4"),
        ("<p>x</p>", "mallory", "k5"),
        ("<p>e</p>", "", ""),
    ] {
        let posted = t
            .add_comment(&issue(), html, author, key)
            .await
            .expect(author);
        assert_eq!(
            posted.id.as_deref(),
            Some("8f3eac04-e391-4eaf-80a2-93a4b5c6d7e8")
        );
        assert!(!posted.duplicate);
    }
    fake.check();
}

#[tokio::test]
async fn a_repeated_comment_answers_409_and_counts_as_posted() {
    let p = comments_path();
    let body =
        json!({"comment_html": "<p>x</p>", "external_source": "orchestrator", "external_id": "k"});
    let fake = Fake::start(vec![step(
        Method::POST,
        &p,
        "plane_api_stream",
        Some(body),
        409,
        json!({"error": "Issue Comment with the same external id and external source already exists", "id": "8f3eac04-e391-4eaf-80a2-93a4b5c6d7e8"}),
    )])
    .await;
    let posted = fake
        .tracker
        .add_comment(&issue(), "<p>x</p>", "stream", "k")
        .await
        .expect("409");
    assert!(posted.duplicate);
    fake.check();
}

#[tokio::test]
async fn reads_and_state_changes_use_the_shared_token() {
    let fake = Fake::start(vec![
        step(
            Method::GET,
            "/api/v1/workspaces/acme/work-items/ORCH-42/",
            "plane_api_shared",
            None,
            200,
            sample("plane-api-work-item.json"),
        ),
        step(
            Method::GET,
            "/api/v1/workspaces/acme/work-items/ORCH-43/",
            "plane_api_shared",
            None,
            404,
            json!({"error": "The requested resource does not exist."}),
        ),
        step(
            Method::GET,
            &format!("/api/v1/workspaces/acme/projects/{PROJECT}/states/"),
            "plane_api_shared",
            None,
            200,
            sample("plane-api-states-list.json"),
        ),
        step(
            Method::PATCH,
            &format!("/api/v1/workspaces/acme/projects/{PROJECT}/work-items/{ISSUE}/"),
            "plane_api_shared",
            Some(json!({"state": "3a8f5dbf-9e4c-4f6a-8b5d-4e7f8091a2b3"})),
            200,
            sample("plane-api-work-item.json"),
        ),
    ])
    .await;
    let t = &fake.tracker;
    assert_eq!(t.find_issue("ORCH-42").await.expect("found"), Some(issue()));
    assert_eq!(t.find_issue("ORCH-43").await.expect("404"), None);
    let done = move_to_done(t, &issue()).await.expect("done");
    assert_eq!(
        (done.name.as_str(), done.group.as_str()),
        ("Done", "completed")
    );
    fake.check();
}

#[tokio::test]
async fn a_project_identifier_is_read_once_and_remembered() {
    let other = "0f0f0f0f-1111-4222-8333-444455556666";
    let project_path = |id: &str| format!("/api/v1/workspaces/acme/projects/{id}/");
    let fake = Fake::start(vec![
        // Down at first: transient, and nothing is remembered.
        step(
            Method::GET,
            &project_path(PROJECT),
            "plane_api_shared",
            None,
            503,
            "<html>Service Unavailable</html>",
        ),
        step(
            Method::GET,
            &project_path(PROJECT),
            "plane_api_shared",
            None,
            200,
            orchestrator_testkit::plane_project_json(PROJECT, "PROJ"),
        ),
        // The token cannot see this one (Plane answers 404 for a project it hides).
        step(
            Method::GET,
            &project_path(other),
            "plane_api_shared",
            None,
            404,
            json!({"error": "The requested resource does not exist."}),
        ),
    ])
    .await;
    let t = &fake.tracker;
    let e = t.project_identifier(PROJECT).await.expect_err("503");
    assert!(e.is_transient(), "{e}");
    assert_eq!(t.project_identifier(PROJECT).await.expect("200"), "PROJ");
    // Remembered: no second request (the script would flag it), and the clones share it.
    assert_eq!(t.project_identifier(PROJECT).await.expect("cached"), "PROJ");
    assert_eq!(
        orchestrator_tracker::issue_key(&t.clone(), PROJECT, 42)
            .await
            .expect("key"),
        "PROJ-42"
    );
    let e = t.project_identifier(other).await.expect_err("404");
    assert!(matches!(e, TrackerError::NotFound(_)), "{e}");
    // An id that could climb out of the path is refused before any request.
    assert!(matches!(
        t.project_identifier("../x").await,
        Err(TrackerError::Rejected { status: 400, .. })
    ));
    fake.check();
}

#[tokio::test]
async fn outages_are_transient_and_refusals_are_not() {
    let p = comments_path();
    let body = json!({"comment_html": "<p>x</p>"});
    let fake = Fake::start(vec![
        step(
            Method::POST,
            &p,
            "plane_api_shared",
            Some(body.clone()),
            503,
            "<html>Service Unavailable</html>",
        ),
        step(
            Method::POST,
            &p,
            "plane_api_shared",
            Some(body.clone()),
            429,
            json!({"detail": "Request was throttled."}),
        ),
        step(
            Method::POST,
            &p,
            "plane_api_shared",
            Some(body.clone()),
            403,
            json!({"detail": "Given API token is not valid"}),
        ),
        step(
            Method::PATCH,
            &format!("/api/v1/workspaces/acme/projects/{PROJECT}/work-items/{ISSUE}/"),
            "plane_api_shared",
            Some(json!({"state": "nope"})),
            400,
            json!({"error": "State is not valid please pass a valid state_id"}),
        ),
    ])
    .await;
    let t = &fake.tracker;
    for _ in 0..2 {
        let e = t
            .add_comment(&issue(), "<p>x</p>", "", "")
            .await
            .expect_err("down");
        assert!(e.is_transient(), "{e}");
    }
    let e = t
        .add_comment(&issue(), "<p>x</p>", "", "")
        .await
        .expect_err("403");
    assert!(
        matches!(&e, TrackerError::Rejected { status: 403, message } if message.contains("not valid")),
        "{e}"
    );
    assert!(!e.is_transient());
    let e = t.set_state(&issue(), "nope").await.expect_err("400");
    assert!(
        matches!(e, TrackerError::Rejected { status: 400, .. }),
        "{e}"
    );
    // Ids that could climb out of the path are refused before any request.
    let bad = IssueRef {
        project_id: "../x".into(),
        issue_id: ISSUE.into(),
    };
    assert!(t.add_comment(&bad, "x", "", "").await.is_err());
    assert!(t.find_issue("../x-1").await.is_err());
    fake.check();
}

#[tokio::test]
async fn comments_are_listed_across_pages() {
    let page = |results: Value, next: bool| {
        json!({"grouped_by": null, "sub_grouped_by": null, "total_count": 2, "next_cursor": "100:1:0", "prev_cursor": "100:-1:1",
               "next_page_results": next, "prev_page_results": false, "count": 1, "total_pages": 2, "total_results": 2,
               "extra_stats": null, "results": results})
    };
    let mut c1: Value =
        serde_json::from_str(&sample("plane-api-comment-created.json")).expect("json");
    c1["is_member"] = json!(true);
    let mut c2 = c1.clone();
    c2["id"] = json!("c2");
    c2["created_at"] = json!("2026-05-19T11:03:00.000000Z");
    c2["external_id"] = json!("k2");
    let p = comments_path();
    let fake = Fake::start(vec![
        step(
            Method::GET,
            &format!("{p}?per_page=100"),
            "plane_api_shared",
            None,
            200,
            page(json!([c2]), true),
        ),
        step(
            Method::GET,
            &format!("{p}?per_page=100&cursor=100%3A1%3A0"),
            "plane_api_shared",
            None,
            200,
            page(json!([c1]), false),
        ),
    ])
    .await;
    let comments = fake.tracker.list_comments(&issue()).await.expect("list");
    assert_eq!(
        comments.iter().map(|c| c.id.as_str()).collect::<Vec<_>>(),
        vec!["8f3eac04-e391-4eaf-80a2-93a4b5c6d7e8", "c2"]
    );
    assert_eq!(comments[1].external_id.as_deref(), Some("k2"));
    fake.check();
}

#[tokio::test]
async fn a_plane_that_does_not_answer_in_time_is_transient() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    // Accepts and never answers.
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((s, _)) = listener.accept().await {
            held.push(s);
        }
    });
    let env = Env::from_pairs([
        ("PLANE_BASE_URL", format!("http://{addr}")),
        ("PLANE_WORKSPACE_SLUG", "acme".into()),
        ("PLANE_API_TOKEN", "t".into()),
        ("ORCH_TRACKER_TIMEOUT_MS", "200".into()),
    ]);
    let t = PlaneTracker::new(
        TrackerConfig::from_env(&env)
            .expect("config")
            .plane
            .expect("plane"),
    )
    .expect("client");
    let started = std::time::Instant::now();
    let e = t.list_states(PROJECT).await.expect_err("timeout");
    assert!(e.is_transient(), "{e}");
    assert!(started.elapsed() < Duration::from_secs(3));
}
