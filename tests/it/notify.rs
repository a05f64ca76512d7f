//! People are told when they must act (issue #18): the whole stack in this process, a test
//! webhook receiver on 127.0.0.1:0 as `ORCH_NOTIFY_WEBHOOK_URL`. One signed notification per
//! event, beside the stream bot's tracker comment; an endpoint that never answers delays
//! nothing else. On SQLite and on PostgreSQL.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::http::HeaderMap;
use orchestrator_proto::stage_engine::v1::{ListCommentsRequest, ListOutboxRequest};
use orchestrator_testkit::{TestStorage, on_both_backends};
use serde_json::Value;

use crate::reviews::{KEY, World, setup_with};

const SECRET: &str = "notify-secret-for-the-test";

/// What the receiver got: (headers, body).
pub type Got = Arc<Mutex<Vec<(HeaderMap, Vec<u8>)>>>;

pub async fn receiver() -> (String, Got) {
    let got: Got = Arc::default();
    let keep = got.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: HeaderMap, body: Bytes| {
            let keep = keep.clone();
            async move {
                keep.lock().expect("lock").push((headers, body.to_vec()));
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}/hook", listener.local_addr().expect("addr"));
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (url, got)
}

async fn comments(w: &World) -> Vec<String> {
    w.stack
        .clients
        .stage_engine
        .clone()
        .list_comments(ListCommentsRequest {
            work_item: KEY.into(),
        })
        .await
        .expect("comments")
        .into_inner()
        .comments
        .into_iter()
        .map(|c| c.html)
        .collect()
}

/// Awaiting approval: one signed notification (Slack-compatible `text`, the event and its id)
/// and the stream bot's comment on the tracker issue; a second event, later, is its own.
async fn a_human_is_told_once_per_event_signed(storage: TestStorage) {
    let (url, got) = receiver().await;
    let w = setup_with(
        storage,
        true,
        &[
            ("ORCH_NOTIFY_WEBHOOK_URL", url.as_str()),
            ("ORCH_NOTIFY_WEBHOOK_SECRET", SECRET),
            ("ORCH_NOTIFY_DASHBOARD_URL", "https://orch.example.com"),
        ],
    )
    .await;
    w.create_and_approve().await;
    let (headers, body) = w
        .wait("the notification", || async {
            got.lock().expect("lock").first().cloned()
        })
        .await;
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert_eq!(v["event"], "awaiting_approval");
    assert_eq!(v["work_item"], KEY);
    let text = v["text"].as_str().expect("text");
    assert!(text.contains(KEY) && text.contains(":approved:"), "{text}");
    assert!(
        text.ends_with(&format!(
            "<https://orch.example.com/items/{KEY}|open {KEY}>"
        )),
        "{text}"
    );
    assert_eq!(
        headers["x-orchestrator-signature"].to_str().expect("ascii"),
        stage_engine::notify::signature(SECRET.as_bytes(), &body)
    );
    assert_eq!(
        headers["x-orchestrator-event-id"].to_str().expect("ascii"),
        v["event_id"].as_str().expect("id")
    );
    // The tracker comment of the same event, under the stream bot.
    assert!(
        comments(&w)
            .await
            .iter()
            .any(|c| c.contains("A human must reply <code>:approved:</code>")),
        "{:?}",
        comments(&w).await
    );
    // The walk goes on to review (held there): no other transition asked a human to act.
    w.wait("the reviewer's run", || async {
        w.prompts()
            .iter()
            .any(|(a, _)| a == "reviewer")
            .then_some(())
    })
    .await;
    assert_eq!(got.lock().expect("lock").len(), 1);
}

/// A notify endpoint that never answers (nobody listens): the item walks on as if there were
/// none; the notification waits in the outbox with its error, and is tried again.
async fn a_notify_endpoint_down_for_the_whole_test_delays_nothing(storage: TestStorage) {
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}/hook", l.local_addr().expect("addr"))
    };
    let w = setup_with(
        storage,
        true,
        &[
            ("ORCH_NOTIFY_WEBHOOK_URL", closed.as_str()),
            ("ORCH_OUTBOX_BACKOFF_BASE_MS", "200"),
            ("ORCH_OUTBOX_BACKOFF_MAX_MS", "1000"),
        ],
    )
    .await;
    w.create_and_approve().await;
    w.wait("the reviewer's run", || async {
        w.prompts()
            .iter()
            .any(|(a, _)| a == "reviewer")
            .then_some(())
    })
    .await;
    let entries = w
        .stack
        .clients
        .stage_engine
        .clone()
        .list_outbox(ListOutboxRequest {
            work_item: KEY.into(),
            ..ListOutboxRequest::default()
        })
        .await
        .expect("outbox")
        .into_inner()
        .entries;
    let notify: Vec<_> = entries.iter().filter(|e| e.channel == "notify").collect();
    assert_eq!(notify.len(), 1, "{entries:#?}");
    assert_ne!(notify[0].state, "delivered");
    assert!(notify[0].attempts >= 1, "{:?}", notify[0]);
    assert!(
        notify[0].last_error.contains("did not answer"),
        "{:?}",
        notify[0]
    );
    assert!(
        !notify[0].last_error.contains(&closed),
        "the URL stays out of the error"
    );
    // Everything else of the item was delivered.
    assert!(
        entries
            .iter()
            .filter(|e| e.channel != "notify")
            .all(|e| e.state == "delivered"),
        "{entries:#?}"
    );
}

/// post-deploy's alerts reach people (#18): a rollback of a degraded deploy is told through
/// stage-engine's `Notify` — the webhook, signed, and the stream bot's tracker comment.
async fn a_post_deploy_rollback_is_told_to_people(storage: TestStorage) {
    use orchestrator_proto::post_deploy::v1::{Action, ArmRequest, TickRequest};
    let (url, got) = receiver().await;
    // A production that is down from the start.
    let prod = axum::Router::new().route(
        "/healthz",
        axum::routing::get(|| async { axum::http::StatusCode::SERVICE_UNAVAILABLE }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let prod_url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, prod).await });
    let targets = serde_json::json!({
        crate::reviews::REPO: {
            "health_url": format!("{prod_url}/healthz"),
            "rollback_command": "true",
        }
    })
    .to_string();
    let logs = tempfile::tempdir().expect("logs");
    let logs_dir = logs.path().display().to_string();
    let w = setup_with(
        storage,
        true,
        &[
            ("ORCH_NOTIFY_WEBHOOK_URL", url.as_str()),
            ("ORCH_NOTIFY_WEBHOOK_SECRET", SECRET),
            ("ORCH_SELF_REPO", "ops/orchestrator"),
            ("ORCH_POST_DEPLOY_REPOS", crate::reviews::REPO),
            ("ORCH_POST_DEPLOY_TARGETS_JSON", &targets),
            ("ORCH_POST_DEPLOY_FAIL_THRESHOLD", "2"),
            ("ORCH_POST_DEPLOY_TICK_S", "5"),
            ("ORCH_POST_DEPLOY_LOG_DIR", &logs_dir),
        ],
    )
    .await;
    w.create_and_approve().await;
    let mut pd = w.stack.clients.post_deploy.clone();
    let armed = pd
        .arm(ArmRequest {
            work_item: KEY.into(),
            repo: crate::reviews::REPO.into(),
            deployed_sha: "2222222".into(),
            previous_sha: "1111111".into(),
        })
        .await
        .expect("arm")
        .into_inner();
    assert!(armed.armed, "{armed:?}");
    let mut action = Action::Continue;
    for _ in 0..5 {
        action = pd
            .tick(TickRequest {
                work_item: KEY.into(),
            })
            .await
            .expect("tick")
            .into_inner()
            .action();
        if action == Action::Rollback {
            break;
        }
    }
    assert_eq!(action, Action::Rollback);
    let (headers, body) = w
        .wait("the rollback's notification", || async {
            got.lock()
                .expect("lock")
                .iter()
                .find(|(_, b)| {
                    serde_json::from_slice::<Value>(b)
                        .is_ok_and(|v| v["event"] == "post_deploy_rollback")
                })
                .cloned()
        })
        .await;
    let v: Value = serde_json::from_slice(&body).expect("json");
    assert!(
        v["text"]
            .as_str()
            .is_some_and(|t| t.contains(KEY) && t.contains("post-deploy of acme/app")),
        "{v}"
    );
    assert_eq!(
        headers["x-orchestrator-signature"].to_str().expect("ascii"),
        stage_engine::notify::signature(SECRET.as_bytes(), &body)
    );
    w.wait("the rollback's tracker comment", || async {
        comments(&w)
            .await
            .iter()
            .any(|c| c.contains("post-deploy of acme/app"))
            .then_some(())
    })
    .await;
    // Told once, whatever the later ticks do.
    for _ in 0..2 {
        let _ = pd
            .tick(TickRequest {
                work_item: KEY.into(),
            })
            .await;
    }
    let rollbacks = got
        .lock()
        .expect("lock")
        .iter()
        .filter(|(_, b)| {
            serde_json::from_slice::<Value>(b).is_ok_and(|v| v["event"] == "post_deploy_rollback")
        })
        .count();
    assert_eq!(rollbacks, 1);
}

on_both_backends!(
    a_human_is_told_once_per_event_signed,
    a_notify_endpoint_down_for_the_whole_test_delays_nothing,
    a_post_deploy_rollback_is_told_to_people,
);
