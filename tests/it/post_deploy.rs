//! post-deploy over gRPC in the whole stack, configured from the environment as an operator
//! does it, against a real HTTP server standing in for production.

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use orchestrator::Node;
use orchestrator_kit::{Config, ServiceName};
use orchestrator_proto::post_deploy::v1::{
    Action, ArmRequest, GetWatchRequest, ListWatchesRequest, TickRequest,
};
use orchestrator_testkit::{TestStorage, on_both_backends};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::common::{env_for, start};

/// A production whose health answers the status the test sets.
async fn production() -> (String, Arc<AtomicU16>) {
    let health = Arc::new(AtomicU16::new(200));
    let app = axum::Router::new()
        .route(
            "/healthz",
            get(|State(h): State<Arc<AtomicU16>>| async move {
                StatusCode::from_u16(h.load(Ordering::SeqCst)).unwrap_or(StatusCode::OK)
            }),
        )
        .route(
            "/metrics",
            get(|| async {
                "# TYPE http_requests_total counter\nhttp_requests_total{code=\"200\"} 10\n"
            }),
        )
        .with_state(Arc::clone(&health));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("addr"));
    tokio::spawn(async move { axum::serve(listener, app).await });
    (url, health)
}

async fn a_degraded_deploy_is_rolled_back_through_grpc(storage: TestStorage) {
    let (url, health) = production().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let marker = dir.path().join("rolled-back");
    let targets = serde_json::json!({
        "acme/shop": {
            "health_url": format!("{url}/healthz"),
            "metrics_url": format!("{url}/metrics"),
            "rollback_command": ["sh", "-c", format!("echo \"$1\" >> {}", marker.display()), "sh", "{previous_sha}"],
        }
    })
    .to_string();
    let logs = dir.path().join("logs").display().to_string();
    let stack = start(
        storage,
        &[
            ("ORCH_SELF_REPO", "ops/orchestrator"),
            ("ORCH_POST_DEPLOY_REPOS", "acme/shop"),
            ("ORCH_POST_DEPLOY_TARGETS_JSON", &targets),
            ("ORCH_POST_DEPLOY_FAIL_THRESHOLD", "2"),
            ("ORCH_POST_DEPLOY_TICK_S", "5"),
            ("ORCH_POST_DEPLOY_LOG_DIR", &logs),
        ],
    )
    .await;
    let mut pd = stack.clients.post_deploy.clone();

    let armed = pd
        .arm(ArmRequest {
            work_item: "SHOP-1".into(),
            repo: "acme/shop".into(),
            deployed_sha: "2222222".into(),
            previous_sha: "1111111".into(),
        })
        .await
        .expect("arm")
        .into_inner();
    assert!(armed.armed && armed.created, "{armed:?}");
    assert_eq!(armed.next_tick_in_s, 5);
    let not_watched = pd
        .arm(ArmRequest {
            work_item: "ORCH-1".into(),
            repo: "ops/orchestrator".into(),
            deployed_sha: "2222222".into(),
            previous_sha: "1111111".into(),
        })
        .await
        .expect("arm")
        .into_inner();
    assert!(!not_watched.armed, "only ORCH_POST_DEPLOY_REPOS is watched");

    let tick = || {
        let mut pd = pd.clone();
        async move {
            pd.tick(TickRequest {
                work_item: "SHOP-1".into(),
            })
            .await
            .expect("tick")
            .into_inner()
        }
    };
    let t = tick().await;
    assert_eq!(t.action(), Action::Continue);
    assert_eq!((t.done, t.next_tick_in_s), (false, 5));
    health.store(503, Ordering::SeqCst);
    assert_eq!(tick().await.action(), Action::Continue);
    let t = tick().await;
    assert_eq!(t.action(), Action::Rollback, "{t:?}");
    assert!(t.done);
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker"),
        "1111111\n"
    );
    assert_eq!(tick().await.action(), Action::Rollback);
    assert_eq!(
        std::fs::read_to_string(&marker).expect("marker"),
        "1111111\n"
    );

    let w = pd
        .get_watch(GetWatchRequest {
            work_item: "SHOP-1".into(),
        })
        .await
        .expect("get")
        .into_inner();
    assert_eq!(w.state, "rolled_back");
    assert_eq!(w.last_action, "ROLLBACK");
    assert_eq!(w.samples.len(), 3);
    assert_eq!(w.alerts.len(), 1);
    assert_eq!(w.alerts[0].kind, "rollback");
    assert!(w.alerts[0].posted_at_ms > 0, "the log sink accepts it");
    let rb = w.rollback.expect("rollback");
    assert_eq!(rb.exit_code, Some(0));
    // Argv, as run: the placeholder is its own word, the shell is the test's own.
    assert_eq!(
        rb.command,
        format!("sh -c 'echo \"$1\" >> {}' sh 1111111", marker.display())
    );
    let log = std::fs::read_to_string(&w.log_path).expect("log");
    assert_eq!(
        log.lines().count(),
        5,
        "armed, three ticks, the rollback:\n{log}"
    );

    let list = pd
        .list_watches(ListWatchesRequest {
            state: "rolled_back".into(),
            ..Default::default()
        })
        .await
        .expect("list")
        .into_inner();
    assert_eq!(list.watches.len(), 1);
    let err = pd
        .get_watch(GetWatchRequest {
            work_item: "SHOP-404".into(),
        })
        .await
        .expect_err("unknown");
    assert_eq!(err.code(), Code::NotFound);
    let err = pd
        .tick(TickRequest {
            work_item: String::new(),
        })
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(err.message(), "work_item is required");
}

on_both_backends!(a_degraded_deploy_is_rolled_back_through_grpc);

#[tokio::test]
async fn a_bad_post_deploy_setting_stops_start_up_naming_the_variable() {
    let storage = TestStorage::sqlite();
    for (var, value) in [
        ("ORCH_POST_DEPLOY_5XX_THRESHOLD", "5%"),
        ("ORCH_POST_DEPLOY_TARGETS_JSON", "{\"acme/shop\": 1}"),
    ] {
        let config = Config::from_env(env_for(&storage, &[(var, value)])).expect("config");
        let err = Node::start(config, &ServiceName::ALL, CancellationToken::new())
            .await
            .err()
            .expect("refused");
        assert!(err.to_string().starts_with(var), "{err}");
    }
}
