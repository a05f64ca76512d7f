//! Whole-gateway tests: the routes without a socket (or on 127.0.0.1:0 where a socket is the
//! point), the inbox on SQLite and PostgreSQL, and stage-engine stood in for by a fake gRPC
//! server that counts every call.

pub(crate) mod fake;
mod fuzz;

use std::time::Duration;

use axum::body::Body;
use http::{Request, StatusCode};
use orchestrator_kit::clients::Clients;
use orchestrator_kit::retry::Backoff;
use orchestrator_kit::{Config, Env, ServiceName, db};
use orchestrator_testkit::{TestStorage, on_both_backends};
use serde_json::Value;
use tower::ServiceExt;

use crate::config::{DispatchConfig, GatewayConfig};
use crate::signature::sign;
use crate::testdata::{webhook_samples, wire_body};
use crate::{Gateway, inbox};
use fake::Fake;

pub const SECRET: &str = "contract-test-secret";

/// A port on loopback that nothing listens on.
pub async fn closed_port_url() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = l.local_addr().expect("addr");
    drop(l);
    format!("http://{addr}")
}

/// The gateway's test configuration: contract secrets, the sample's label as trigger, a
/// default repo, fast retries.
pub fn test_config() -> GatewayConfig {
    let mut c = GatewayConfig::from_env(&Env::from_pairs([
        ("PLANE_WEBHOOK_SECRET", SECRET),
        ("GITEA_WEBHOOK_SECRET", SECRET),
        ("ORCH_PLANE_DEFAULT_REPO", "acme/app"),
        ("ORCH_PLANE_BOT_USERS", "stream-bot"),
    ]))
    .expect("config");
    c.dispatch = DispatchConfig {
        max_attempts: 50,
        backoff: Backoff::new(Duration::from_millis(10), Duration::from_millis(50)),
        poll_interval: Duration::from_millis(10),
        batch: 16,
        claim_lease: Duration::from_secs(5),
        linger: Duration::ZERO,
    };
    c
}

/// Clients whose stage-engine is `stage_engine_url` and whose other services are down.
pub async fn clients(stage_engine_url: &str) -> Clients {
    let down = closed_port_url().await;
    let env = Env::from_pairs([
        ("ORCH_STAGE_ENGINE_URL", stage_engine_url),
        ("ORCH_LAUNCHER_URL", down.as_str()),
        ("ORCH_REAPER_URL", down.as_str()),
        ("ORCH_POST_DEPLOY_URL", down.as_str()),
        ("ORCH_MERGE_GATE_URL", down.as_str()),
        ("ORCH_USAGE_LEDGER_URL", down.as_str()),
        ("ORCH_RPC_CONNECT_TIMEOUT_MS", "1000"),
        ("ORCH_RPC_TIMEOUT_MS", "3000"),
    ]);
    Clients::from_config(&Config::from_env(env).expect("config")).expect("clients")
}

pub async fn gateway(
    storage: &TestStorage,
    config: GatewayConfig,
    stage_engine_url: &str,
) -> Gateway {
    orchestrator_kit::telemetry::init_for_tests();
    let db = db::open(ServiceName::Gateway, &storage.location, &crate::MIGRATOR)
        .await
        .expect("gateway storage");
    Gateway::new(db, config, clients(stage_engine_url).await)
}

/// How a test signs a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sig {
    Good,
    Wrong,
    Missing,
    Empty,
}

/// A webhook request as the sender builds it (headers per the contract notes).
pub fn hook(
    source: &str,
    event: &str,
    event_type: &str,
    delivery: &str,
    body: &[u8],
    sig: Sig,
) -> Request<Body> {
    let signature = match sig {
        Sig::Good => Some(sign(SECRET.as_bytes(), body)),
        Sig::Wrong => Some(sign(b"not-the-secret", body)),
        Sig::Empty => Some(String::new()),
        Sig::Missing => None,
    };
    let mut req =
        Request::post(format!("/webhooks/{source}")).header("content-type", "application/json");
    if source == "plane" {
        req = req
            .header("user-agent", "Autopilot")
            .header("x-plane-delivery", delivery)
            .header("x-plane-event", event);
        if let Some(s) = &signature {
            req = req.header("x-plane-signature", s);
        }
    } else {
        req = req
            .header("x-gitea-delivery", delivery)
            .header("x-gitea-event", event)
            .header("x-gitea-event-type", event_type)
            .header("x-gogs-delivery", delivery)
            .header("x-github-delivery", delivery);
        if let Some(s) = &signature {
            req = req
                .header("x-gitea-signature", s)
                .header("x-gogs-signature", s);
        }
    }
    req.body(Body::from(body.to_vec())).expect("request")
}

pub async fn send(gw: &Gateway, req: Request<Body>) -> (StatusCode, Value) {
    let res = gw.router().oneshot(req).await.expect("response");
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .expect("body");
    let value = serde_json::from_slice(&bytes)
        .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()));
    (status, value)
}

async fn get_text(gw: &Gateway, path: &str) -> (StatusCode, String) {
    let res = gw
        .router()
        .oneshot(Request::get(path).body(Body::empty()).expect("request"))
        .await
        .expect("response");
    let status = res.status();
    let bytes = axum::body::to_bytes(res.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

async fn total_rows(gw: &Gateway) -> u64 {
    let c = inbox::counts(gw.db()).await.expect("counts");
    c.pending + c.applied + c.ignored + c.dead
}

/// Polls `check` every 10 ms until it holds or `limit` passes.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let start = std::time::Instant::now();
    while start.elapsed() < limit {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out after {limit:?} waiting for: {what}");
}

/// What the dispatcher must make of each sample: the state it ends in.
fn expected_state(name: &str) -> &'static str {
    match name {
        "plane-webhook-issue-created.json"
        | "gitea-webhook-pull_request-closed-merged.json"
        | "gitea-webhook-pull_request_review-rejected.json"
        | "gitea-webhook-pull_request_review-approved.json"
        | "gitea-webhook-status.json"
        | "gitea-webhook-push.json" => "pending",
        _ => "ignored",
    }
}

#[test]
fn the_wire_bodies_match_the_contract_test_vectors() {
    assert_eq!(
        sign(
            SECRET.as_bytes(),
            &wire_body("plane-webhook-issue-created.json")
        ),
        "e151b46fd730423eb4533f24ead55e813d1cc1aa1f0f734f5403d84250b304c3"
    );
    assert_eq!(
        sign(SECRET.as_bytes(), &wire_body("gitea-webhook-push.json")),
        "807e921bbcaf02eb60a632ce8c1ef8946f2aba67c3b0f5a8ae9eac777db650e9"
    );
}

async fn every_sample_signed_is_stored_once_and_a_redelivery_changes_nothing(storage: TestStorage) {
    let gw = gateway(&storage, test_config(), &closed_port_url().await).await;
    for (i, (name, source, event, event_type)) in webhook_samples().into_iter().enumerate() {
        let body = wire_body(name);
        let delivery = format!("delivery-{i}");
        let (status, v) = send(
            &gw,
            hook(source, event, event_type, &delivery, &body, Sig::Good),
        )
        .await;
        let want = expected_state(name);
        let want_status = if want == "pending" {
            StatusCode::ACCEPTED
        } else {
            StatusCode::OK
        };
        assert_eq!(status, want_status, "{name}: {v}");
        assert_eq!(v["state"], want, "{name}: {v}");
        let stored = inbox::get(gw.db(), source, &delivery)
            .await
            .expect("get")
            .unwrap_or_else(|| panic!("{name} stored"));
        assert_eq!(stored.state, want, "{name}");
        assert_eq!(stored.event, event);
        if want == "ignored" {
            assert!(
                !stored.reason.is_empty(),
                "{name}: an ignored delivery says why"
            );
        }

        // The same delivery again: 2xx, nothing new.
        let (status, v) = send(
            &gw,
            hook(source, event, event_type, &delivery, &body, Sig::Good),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{name}: {v}");
        assert_eq!(v["status"], "duplicate", "{name}");
        assert_eq!(v["id"], stored.id.as_str());
        // The same bytes under a new delivery id (Plane gives every send attempt a new id).
        let (status, v) = send(
            &gw,
            hook(
                source,
                event,
                event_type,
                &format!("{delivery}-resent"),
                &body,
                Sig::Good,
            ),
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{name}: {v}");
        assert_eq!(v["status"], "duplicate", "{name}");
        assert_eq!(
            total_rows(&gw).await,
            i as u64 + 1,
            "{name}: one row per delivery"
        );
    }
}

async fn mis_signed_and_unsigned_deliveries_are_refused_and_nothing_is_stored(
    storage: TestStorage,
) {
    let gw = gateway(&storage, test_config(), &closed_port_url().await).await;
    for (name, source, event, event_type) in webhook_samples() {
        let body = wire_body(name);
        for sig in [Sig::Wrong, Sig::Missing, Sig::Empty] {
            let (status, v) = send(&gw, hook(source, event, event_type, "d-1", &body, sig)).await;
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{name} {sig:?}: {v}");
            assert!(
                v["error"].as_str().is_some_and(|e| e.contains("signature")),
                "{v}"
            );
        }
        // Signed, but one byte of the body changed on the way.
        let mut tampered = body.clone();
        let last = tampered.len() - 2;
        tampered[last] = b' ';
        let good_sig = sign(SECRET.as_bytes(), &body);
        let mut req = hook(source, event, event_type, "d-2", &tampered, Sig::Missing);
        req.headers_mut().insert(
            if source == "plane" {
                "x-plane-signature"
            } else {
                "x-gitea-signature"
            },
            good_sig.parse().expect("header"),
        );
        let (status, _) = send(&gw, req).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED, "{name} tampered");
    }
    assert_eq!(
        total_rows(&gw).await,
        0,
        "nothing stored for a refused request"
    );

    // No secret configured: refused too, unless the development flag is set.
    let mut no_secret = test_config();
    no_secret.plane_secret = None;
    let gw = gateway(&storage, no_secret.clone(), &closed_port_url().await).await;
    let body = wire_body("plane-webhook-issue-created.json");
    let (status, v) = send(&gw, hook("plane", "issue", "", "d-3", &body, Sig::Good)).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{v}");
    assert_eq!(total_rows(&gw).await, 0);
    no_secret.allow_unsigned = true;
    let gw = gateway(&storage, no_secret, &closed_port_url().await).await;
    let (status, _) = send(&gw, hook("plane", "issue", "", "d-4", &body, Sig::Missing)).await;
    assert_eq!(
        status,
        StatusCode::ACCEPTED,
        "ORCH_WEBHOOK_ALLOW_UNSIGNED accepts unsigned"
    );
    // The flag never lets a WRONG signature through.
    let mut dev = test_config();
    dev.allow_unsigned = true;
    let gw = gateway(&storage, dev, &closed_port_url().await).await;
    let other = wire_body("gitea-webhook-push.json");
    let (status, _) = send(
        &gw,
        hook("gitea", "push", "push", "d-5", &other, Sig::Wrong),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
}

async fn deliveries_made_while_stage_engine_is_down_are_applied_exactly_once_when_it_is_back(
    storage: TestStorage,
) {
    let fake = Fake::default();
    fake.set_up(false);
    let (url, _stop) = fake.serve().await;
    let gw = gateway(&storage, test_config(), &url).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let dispatcher = gw.spawn_dispatcher(shutdown.clone());

    let created = wire_body("plane-webhook-issue-created.json");
    let merged = wire_body("gitea-webhook-pull_request-closed-merged.json");
    let (s1, _) = send(&gw, hook("plane", "issue", "", "p-1", &created, Sig::Good)).await;
    let (s2, _) = send(
        &gw,
        hook(
            "gitea",
            "pull_request",
            "pull_request",
            "g-1",
            &merged,
            Sig::Good,
        ),
    )
    .await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));

    // Down: refused again and again, retried with backoff, still pending.
    eventually(
        Duration::from_secs(10),
        "several refused attempts",
        || async { fake.refused() >= 6 },
    )
    .await;
    let d = inbox::get(gw.db(), "plane", "p-1")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(d.state, "pending");
    assert!(d.attempts >= 2, "{d:?}");
    assert!(d.last_error.starts_with("Unavailable"), "{d:?}");
    // Redelivered while down: nothing new.
    let (s, v) = send(&gw, hook("plane", "issue", "", "p-1", &created, Sig::Good)).await;
    assert_eq!(
        (s, v["status"].as_str()),
        (StatusCode::OK, Some("duplicate"))
    );

    fake.set_up(true);
    eventually(Duration::from_secs(10), "both applied", || async {
        let a = inbox::get(gw.db(), "plane", "p-1")
            .await
            .expect("get")
            .expect("row");
        let b = inbox::get(gw.db(), "gitea", "g-1")
            .await
            .expect("get")
            .expect("row");
        a.state == "applied" && b.state == "applied"
    })
    .await;
    // Give a second application every chance to happen, then count.
    for _ in 0..5 {
        gw.dispatch_once().await.expect("dispatch");
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        fake.count("CreateWorkItem:9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d"),
        1,
        "{:?}",
        fake.calls()
    );
    assert_eq!(
        fake.count("OnPrMerged:anbraten/test-repo:anbraten-patch-1:1"),
        1,
        "{:?}",
        fake.calls()
    );
    assert_eq!(fake.calls().len(), 2, "{:?}", fake.calls());
    let created_row = inbox::get(gw.db(), "plane", "p-1")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(created_row.reason, "created work item PROJ-1 in acme/app");
    shutdown.cancel();
    dispatcher.await.expect("dispatcher stops");
}

async fn a_gateway_killed_right_after_its_2xx_applies_the_delivery_once_after_a_restart(
    storage: TestStorage,
) {
    let fake = Fake::default();
    let (url, _stop) = fake.serve().await;

    // The first gateway: a real socket, no dispatcher yet (it dies before getting to it).
    let first = gateway(&storage, test_config(), &url).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(axum::serve(listener, first.router()).into_future());
    let body = wire_body("plane-webhook-issue-created.json");
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/webhooks/plane"))
        .header("content-type", "application/json")
        .header("x-plane-delivery", "kill-1")
        .header("x-plane-event", "issue")
        .header("x-plane-signature", sign(SECRET.as_bytes(), &body))
        .body(body.clone())
        .send()
        .await
        .expect("post");
    assert_eq!(res.status(), reqwest::StatusCode::ACCEPTED);
    // Killed: the task is dropped mid-flight, nothing shuts down gracefully.
    server.abort();
    let _ = server.await;
    first.db().pool.close().await;
    drop(first);
    assert!(fake.calls().is_empty());

    // Restarted on the same storage.
    let second = gateway(&storage, test_config(), &url).await;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let dispatcher = second.spawn_dispatcher(shutdown.clone());
    eventually(
        Duration::from_secs(10),
        "applied after the restart",
        || async {
            inbox::get(second.db(), "plane", "kill-1")
                .await
                .expect("get")
                .expect("row")
                .state
                == "applied"
        },
    )
    .await;
    for _ in 0..3 {
        second.dispatch_once().await.expect("dispatch");
    }
    assert_eq!(
        fake.count("CreateWorkItem:9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d"),
        1,
        "{:?}",
        fake.calls()
    );
    shutdown.cancel();
    dispatcher.await.expect("dispatcher stops");
}

async fn deliveries_for_one_work_item_apply_in_arrival_order(storage: TestStorage) {
    let fake = Fake::default();
    let (url, _stop) = fake.serve().await;
    fake.fail_next(3);
    let gw = gateway(&storage, test_config(), &url).await;

    let created = wire_body("plane-webhook-issue-created.json");
    let mut comment: Value =
        serde_json::from_slice(&wire_body("plane-webhook-issue_comment-created.json"))
            .expect("json");
    comment["data"]["comment_html"] = Value::from("<p>:approved:</p>");
    let comment = serde_json::to_vec(&comment).expect("json");
    let (s1, _) = send(&gw, hook("plane", "issue", "", "o-1", &created, Sig::Good)).await;
    let (s2, _) = send(
        &gw,
        hook("plane", "issue_comment", "", "o-2", &comment, Sig::Good),
    )
    .await;
    assert_eq!((s1, s2), (StatusCode::ACCEPTED, StatusCode::ACCEPTED));

    let shutdown = tokio_util::sync::CancellationToken::new();
    let dispatcher = gw.spawn_dispatcher(shutdown.clone());
    eventually(Duration::from_secs(10), "approval applied", || async {
        inbox::get(gw.db(), "plane", "o-2")
            .await
            .expect("get")
            .expect("row")
            .state
            == "applied"
    })
    .await;
    // The approval waited for the create (which failed three times first), and went to the
    // work item created from its issue.
    assert_eq!(
        fake.calls(),
        [
            "CreateWorkItem:9b2d7c4a-1e3f-4a5b-8c6d-7e8f9a0b1c2d".to_owned(),
            "Approve:PROJ-1:8f3eac04-e391-4eaf-80a2-93a4b5c6d7e8:ada".to_owned(),
        ]
    );
    // The create names the issue's project and number, from which stage-engine derives the
    // key; the gateway sends no key of its own.
    let create = &fake.create_requests()[0];
    assert_eq!(
        (
            create.key.as_str(),
            create.tracker_project_id.as_str(),
            create.tracker_sequence_id,
            create.repo.as_str(),
        ),
        ("", "7c9e6679-7425-40de-944b-e07fc1f90ae7", 42, "acme/app")
    );
    let approved = inbox::get(gw.db(), "plane", "o-2")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(
        (approved.work_item.as_str(), approved.reason.as_str()),
        ("PROJ-1", "approve PROJ-1: ADVANCED")
    );

    // An :approved: on an issue that never became a work item (stage-engine: NOT_FOUND) is
    // recorded as ignored, not a dead letter.
    let mut stray: Value = serde_json::from_slice(&comment).expect("json");
    stray["data"]["id"] = Value::from("c-stray");
    stray["data"]["issue"] = Value::from("0b0b0b0b-0000-4000-8000-000000000001");
    let stray = serde_json::to_vec(&stray).expect("json");
    let (s3, _) = send(
        &gw,
        hook("plane", "issue_comment", "", "o-3", &stray, Sig::Good),
    )
    .await;
    assert_eq!(s3, StatusCode::ACCEPTED);
    eventually(Duration::from_secs(10), "stray approval done", || async {
        inbox::get(gw.db(), "plane", "o-3")
            .await
            .expect("get")
            .expect("row")
            .state
            != "pending"
    })
    .await;
    let d = inbox::get(gw.db(), "plane", "o-3")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(
        (d.state, d.reason.as_str()),
        (
            "ignored",
            "no work item for plane issue 0b0b0b0b-0000-4000-8000-000000000001"
        )
    );
    shutdown.cancel();
    dispatcher.await.expect("dispatcher stops");
}

async fn permanent_errors_dead_letter_at_once_and_retryable_ones_after_the_last_attempt(
    storage: TestStorage,
) {
    let fake = Fake::default();
    let (url, _stop) = fake.serve().await;
    fake.fail_with(Some(tonic::Code::InvalidArgument));
    let mut config = test_config();
    config.dispatch.max_attempts = 3;
    let gw = gateway(&storage, config, &url).await;

    let merged = wire_body("gitea-webhook-pull_request-closed-merged.json");
    send(
        &gw,
        hook(
            "gitea",
            "pull_request",
            "pull_request",
            "dead-1",
            &merged,
            Sig::Good,
        ),
    )
    .await;
    gw.dispatch_once().await.expect("dispatch");
    let d = inbox::get(gw.db(), "gitea", "dead-1")
        .await
        .expect("get")
        .expect("row");
    assert_eq!((d.state, d.attempts), ("dead", 1), "{d:?}");
    assert!(
        d.reason.starts_with("permanent error InvalidArgument"),
        "{d:?}"
    );

    fake.fail_with(None);
    fake.set_up(false);
    let created = wire_body("plane-webhook-issue-created.json");
    send(
        &gw,
        hook("plane", "issue", "", "dead-2", &created, Sig::Good),
    )
    .await;
    eventually(Duration::from_secs(10), "dead after 3 attempts", || async {
        gw.dispatch_once().await.expect("dispatch");
        inbox::get(gw.db(), "plane", "dead-2")
            .await
            .expect("get")
            .expect("row")
            .state
            == "dead"
    })
    .await;
    let d = inbox::get(gw.db(), "plane", "dead-2")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(d.attempts, 3, "{d:?}");
    assert_eq!(d.reason, "gave up after 3 attempts");
    assert!(fake.calls().is_empty());

    // Both show in GET /queue and /metrics.
    let (status, text) = get_text(&gw, "/queue").await;
    assert_eq!(status, StatusCode::OK);
    let q: Value = serde_json::from_str(&text).expect("json");
    assert_eq!(q["inbox"]["dead"], 2, "{q}");
    let ids: Vec<&str> = q["inbox"]["dead_letters"]
        .as_array()
        .expect("list")
        .iter()
        .map(|d| d["delivery_id"].as_str().expect("id"))
        .collect();
    assert_eq!(ids, ["dead-2", "dead-1"]);
    assert_eq!(
        q["inbox"]["dead_letters"][1]["command"]["rpc"],
        "OnPrMerged"
    );
    let (_, metrics) = get_text(&gw, "/metrics").await;
    assert!(
        metrics.contains("gateway_inbox_dead_letters 2\n"),
        "{metrics}"
    );
    assert!(
        metrics.contains("gateway_webhook_deliveries_total{source=\"gitea\",outcome=\"dead\"} 1\n"),
        "{metrics}"
    );
}

async fn a_create_without_a_configured_repo_is_a_dead_letter_naming_the_variables(
    storage: TestStorage,
) {
    let fake = Fake::default();
    let (url, _stop) = fake.serve().await;
    let mut config = test_config();
    config.repos = Default::default();
    let gw = gateway(&storage, config, &url).await;
    let created = wire_body("plane-webhook-issue-created.json");
    send(
        &gw,
        hook("plane", "issue", "", "norepo", &created, Sig::Good),
    )
    .await;
    gw.dispatch_once().await.expect("dispatch");
    let d = inbox::get(gw.db(), "plane", "norepo")
        .await
        .expect("get")
        .expect("row");
    assert_eq!(d.state, "dead");
    assert!(d.reason.contains("ORCH_PLANE_DEFAULT_REPO"), "{d:?}");
    assert!(fake.calls().is_empty());
}

async fn an_unreachable_stage_engine_is_retried(storage: TestStorage) {
    let gw = gateway(&storage, test_config(), &closed_port_url().await).await;
    let merged = wire_body("gitea-webhook-pull_request-closed-merged.json");
    send(
        &gw,
        hook(
            "gitea",
            "pull_request",
            "pull_request",
            "unreach",
            &merged,
            Sig::Good,
        ),
    )
    .await;
    gw.dispatch_once().await.expect("dispatch");
    let d = inbox::get(gw.db(), "gitea", "unreach")
        .await
        .expect("get")
        .expect("row");
    assert_eq!((d.state, d.attempts), ("pending", 1), "{d:?}");
    assert!(d.last_error.starts_with("Unavailable"), "{d:?}");
}

fn new_delivery(delivery_id: &str, body: &str) -> inbox::NewDelivery {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(body.as_bytes());
    inbox::NewDelivery {
        source: "plane",
        delivery_id: delivery_id.to_owned(),
        body_sha256: digest.iter().map(|b| format!("{b:02x}")).collect(),
        event: "issue".to_owned(),
        action: "created".to_owned(),
        state: inbox::State::Pending,
        reason: String::new(),
        command: Some(
            r#"{"rpc":"OnPrMerged","repo":"a/b","branch":"x","pr_number":1,"merge_sha":""}"#
                .to_owned(),
        ),
        ordering_key: format!("plane:{delivery_id}"),
        body: body.to_owned(),
        now_ms: 1_000,
    }
}

/// Deliveries written together in one statement are each stored once, a duplicate within
/// the same statement included; outcomes recorded together change only pending rows.
async fn a_batch_stores_each_delivery_once_and_records_outcomes_together(storage: TestStorage) {
    let gw = gateway(&storage, test_config(), &closed_port_url().await).await;
    let db = gw.db();
    let batch = [
        new_delivery("a", r#"{"n":1}"#),
        new_delivery("a", r#"{"n":2}"#),
        new_delivery("c", r#"{"n":1}"#),
        new_delivery("d", r#"{"n":4}"#),
    ];
    let stored = inbox::insert_many(db, &batch).await.expect("insert");
    let inbox::Stored::New { id: a } = &stored[0] else {
        panic!("{stored:?}");
    };
    let dup = inbox::Stored::Duplicate {
        id: a.clone(),
        state: inbox::State::Pending,
    };
    assert_eq!(stored[1], dup, "same delivery id in the same batch");
    assert_eq!(stored[2], dup, "same body in the same batch");
    let inbox::Stored::New { id: d } = &stored[3] else {
        panic!("{stored:?}");
    };
    assert_eq!(total_rows(&gw).await, 2);
    // Again, alone: a duplicate.
    assert_eq!(
        inbox::insert(db, &batch[3]).await.expect("again"),
        inbox::Stored::Duplicate {
            id: d.clone(),
            state: inbox::State::Pending
        }
    );

    let outcomes = [
        inbox::Attempted::Finished {
            id: a.clone(),
            state: inbox::State::Applied,
            reason: "done".into(),
            last_error: String::new(),
            at_ms: 2_000,
            work_item: "PROJ-1".into(),
        },
        inbox::Attempted::Retry {
            id: d.clone(),
            next_attempt_at_ms: 9_000,
            last_error: "Unavailable: down".into(),
        },
    ];
    inbox::record_many(db, &outcomes).await.expect("record");
    // A late outcome for a finished delivery changes nothing.
    inbox::record_many(
        db,
        &[inbox::Attempted::Finished {
            id: a.clone(),
            state: inbox::State::Dead,
            reason: "late".into(),
            last_error: "late".into(),
            at_ms: 3_000,
            work_item: String::new(),
        }],
    )
    .await
    .expect("record");
    let a_row = inbox::get(db, "plane", "a").await.expect("get").expect("a");
    assert_eq!(
        (
            a_row.state,
            a_row.reason.as_str(),
            a_row.work_item.as_str(),
            a_row.finished_at_ms
        ),
        ("applied", "done", "PROJ-1", 2_000)
    );
    let d_row = inbox::get(db, "plane", "d").await.expect("get").expect("d");
    assert_eq!(
        (
            d_row.state,
            d_row.next_attempt_at_ms,
            d_row.last_error.as_str()
        ),
        ("pending", 9_000, "Unavailable: down")
    );
}

/// Many senders at once (their deliveries share statements): every new delivery is 202
/// and stored once, every repeat is a duplicate of it.
async fn concurrent_deliveries_are_each_stored_once(storage: TestStorage) {
    let gw = gateway(&storage, test_config(), &closed_port_url().await).await;
    let template: Value =
        serde_json::from_slice(&wire_body("plane-webhook-issue-created.json")).expect("json");
    let mut sends = Vec::new();
    for i in 0..120_u32 {
        // 40 distinct issues, each delivered three times: twice under the same id, once
        // resent under a new one.
        let n = i % 40;
        let mut body = template.clone();
        body["data"]["id"] = Value::from(format!("00000000-0000-4000-8000-{n:012}"));
        let body = serde_json::to_vec(&body).expect("json");
        let delivery = if i < 80 {
            format!("c-{n}")
        } else {
            format!("c-{n}-resent")
        };
        let gw = gw.clone();
        sends.push(tokio::spawn(async move {
            send(&gw, hook("plane", "issue", "", &delivery, &body, Sig::Good)).await
        }));
    }
    let mut accepted = 0;
    let mut duplicates = 0;
    for s in sends {
        let (status, v) = s.await.expect("join");
        match (status, v["status"].as_str()) {
            (StatusCode::ACCEPTED, Some("accepted")) => accepted += 1,
            (StatusCode::OK, Some("duplicate")) => duplicates += 1,
            other => panic!("{other:?}: {v}"),
        }
    }
    assert_eq!((accepted, duplicates), (40, 80));
    assert_eq!(total_rows(&gw).await, 40);
}

/// With the default `ORCH_GATEWAY_DISPATCH_MAX_ATTEMPTS=0`, a delivery is retried for as
/// long as stage-engine is down — far past any fixed number of attempts — and applied once
/// it is back: an accepted delivery is never given up on an outage.
async fn an_outage_longer_than_any_attempt_count_loses_nothing(storage: TestStorage) {
    let fake = Fake::default();
    let (url, _stop) = fake.serve().await;
    fake.set_up(false);
    let mut config = test_config();
    config.dispatch.max_attempts = GatewayConfig::from_env(&Env::from_pairs([
        ("PLANE_WEBHOOK_SECRET", SECRET),
        ("GITEA_WEBHOOK_SECRET", SECRET),
    ]))
    .expect("config")
    .dispatch
    .max_attempts;
    assert_eq!(
        config.dispatch.max_attempts, 0,
        "the default retries for ever"
    );
    config.dispatch.backoff = Backoff::new(Duration::from_millis(1), Duration::from_millis(2));
    let gw = gateway(&storage, config, &url).await;
    let created = wire_body("plane-webhook-issue-created.json");
    send(
        &gw,
        hook("plane", "issue", "", "outage-1", &created, Sig::Good),
    )
    .await;
    eventually(Duration::from_secs(20), "60 failed attempts", || async {
        gw.dispatch_once().await.expect("dispatch");
        let d = inbox::get(gw.db(), "plane", "outage-1")
            .await
            .expect("get")
            .expect("row");
        assert_ne!(d.state, "dead", "given up: {d:?}");
        d.attempts >= 60
    })
    .await;
    fake.set_up(true);
    eventually(Duration::from_secs(10), "applied once back", || async {
        gw.dispatch_once().await.expect("dispatch");
        inbox::get(gw.db(), "plane", "outage-1")
            .await
            .expect("get")
            .expect("row")
            .state
            == "applied"
    })
    .await;
    assert_eq!(
        fake.calls()
            .iter()
            .filter(|c| c.starts_with("CreateWorkItem"))
            .count(),
        1,
        "{:?}",
        fake.calls()
    );
}

on_both_backends!(
    an_outage_longer_than_any_attempt_count_loses_nothing,
    a_batch_stores_each_delivery_once_and_records_outcomes_together,
    concurrent_deliveries_are_each_stored_once,
    every_sample_signed_is_stored_once_and_a_redelivery_changes_nothing,
    mis_signed_and_unsigned_deliveries_are_refused_and_nothing_is_stored,
    deliveries_made_while_stage_engine_is_down_are_applied_exactly_once_when_it_is_back,
    a_gateway_killed_right_after_its_2xx_applies_the_delivery_once_after_a_restart,
    deliveries_for_one_work_item_apply_in_arrival_order,
    permanent_errors_dead_letter_at_once_and_retryable_ones_after_the_last_attempt,
    a_create_without_a_configured_repo_is_a_dead_letter_naming_the_variables,
    an_unreachable_stage_engine_is_retried,
);

#[tokio::test]
async fn bad_input_is_a_short_4xx_and_never_stored() {
    let storage = TestStorage::sqlite();
    let mut config = test_config();
    config.max_body_bytes = 8192;
    let gw = gateway(&storage, config, &closed_port_url().await).await;
    let signed = |event: &str, body: &[u8]| hook("gitea", event, event, "bad-1", body, Sig::Good);
    let push = wire_body("gitea-webhook-push.json");

    let mut wrong_type = signed("push", &push);
    wrong_type.headers_mut().insert(
        "content-type",
        "application/x-www-form-urlencoded".parse().expect("h"),
    );
    let mut no_type = signed("push", &push);
    no_type.headers_mut().remove("content-type");
    let big = vec![b' '; 9000];
    let mut chunked_big = signed("push", &big);
    *chunked_big.body_mut() = chunked(vec![vec![b' '; 5000], vec![b' '; 5000]]);
    let mut no_delivery = signed("push", &push);
    no_delivery.headers_mut().remove("x-gitea-delivery");
    let mut bad_delivery = signed("push", &push);
    bad_delivery
        .headers_mut()
        .insert("x-gitea-delivery", "-rf".parse().expect("h"));
    let mut no_event = signed("push", &push);
    no_event.headers_mut().remove("x-gitea-event");

    let cases: Vec<(&str, Request<Body>, StatusCode, &str)> = vec![
        (
            "wrong content type",
            wrong_type,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content type",
        ),
        (
            "no content type",
            no_type,
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "content type",
        ),
        (
            "oversized",
            signed("push", &big),
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than 8192",
        ),
        (
            "oversized, chunked",
            chunked_big,
            StatusCode::PAYLOAD_TOO_LARGE,
            "larger than 8192",
        ),
        (
            "malformed JSON",
            signed("push", b"{\"a\": "),
            StatusCode::BAD_REQUEST,
            "malformed JSON",
        ),
        (
            "not UTF-8",
            signed("push", b"\"\xff\""),
            StatusCode::BAD_REQUEST,
            "UTF-8",
        ),
        (
            "not an object",
            signed("push", b"[1]"),
            StatusCode::BAD_REQUEST,
            "JSON object",
        ),
        (
            "unknown event",
            signed("launch_missiles", b"{}"),
            StatusCode::BAD_REQUEST,
            "unknown X-Gitea-Event",
        ),
        (
            "missing fields",
            signed("pull_request", b"{\"action\": \"closed\"}"),
            StatusCode::BAD_REQUEST,
            "pull_request is required",
        ),
        (
            "no delivery id",
            no_delivery,
            StatusCode::BAD_REQUEST,
            "x-gitea-delivery header is required",
        ),
        (
            "bad delivery id",
            bad_delivery,
            StatusCode::BAD_REQUEST,
            "x-gitea-delivery",
        ),
        (
            "no event",
            no_event,
            StatusCode::BAD_REQUEST,
            "x-gitea-event header is required",
        ),
        (
            "plane unknown event",
            hook("plane", "workitem.created", "", "bad-2", b"{}", Sig::Good),
            StatusCode::BAD_REQUEST,
            "unknown X-Plane-Event",
        ),
        (
            "plane missing id",
            hook(
                "plane",
                "issue",
                "",
                "bad-3",
                br#"{"action": "created", "data": {}}"#,
                Sig::Good,
            ),
            StatusCode::BAD_REQUEST,
            "data.id is required",
        ),
    ];
    for (what, req, want, reason) in cases {
        let (status, v) = send(&gw, req).await;
        assert_eq!(status, want, "{what}: {v}");
        let error = v["error"].as_str().unwrap_or_default();
        assert!(error.contains(reason), "{what}: {error}");
        assert!(error.len() < 120, "{what}: a short reason");
    }
    let (status, _) = send(
        &gw,
        Request::get("/webhooks/plane")
            .body(Body::empty())
            .expect("r"),
    )
    .await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(total_rows(&gw).await, 0);
}

/// A body sent in chunks, with no length announced.
fn chunked(chunks: Vec<Vec<u8>>) -> Body {
    Body::from_stream(tokio_stream::iter(
        chunks.into_iter().map(Ok::<_, std::convert::Infallible>),
    ))
}

#[tokio::test]
async fn queue_shows_each_parts_error_in_place_and_the_inbox() {
    let storage = TestStorage::sqlite();
    let gw = gateway(&storage, test_config(), &closed_port_url().await).await;
    let created = wire_body("plane-webhook-issue-created.json");
    send(&gw, hook("plane", "issue", "", "q-1", &created, Sig::Good)).await;
    let (status, text) = get_text(&gw, "/queue").await;
    assert_eq!(status, StatusCode::OK);
    let q: Value = serde_json::from_str(&text).expect("json");
    for part in ["launcher", "reaper", "stage_engine", "post_deploy"] {
        assert_eq!(q[part]["error"]["code"], "UNAVAILABLE", "{part}: {q}");
    }
    assert_eq!(q["inbox"]["pending"], 1, "{q}");
    assert_eq!(q["inbox"]["dead"], 0);
    assert!(
        q["inbox"]["oldest_pending_age_ms"].as_i64().is_some(),
        "{q}"
    );

    let (status, metrics) = get_text(&gw, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    for line in [
        "gateway_http_requests_total{route=\"/webhooks/plane\",status=\"202\"} 1\n",
        "gateway_http_requests_total{route=\"/queue\",status=\"200\"} 1\n",
        "gateway_webhook_deliveries_total{source=\"plane\",outcome=\"accepted\"} 1\n",
        "gateway_inbox_deliveries{state=\"pending\"} 1\n",
        "gateway_upstream_up{service=\"launcher\"} 0\n",
        "gateway_upstream_up{service=\"stage-engine\"} 0\n",
        "gateway_rpc_duration_seconds_count{rpc=\"QueueSnapshot\",code=\"Unavailable\"} 1\n",
        "# TYPE gateway_inbox_oldest_pending_age_seconds gauge\n",
    ] {
        assert!(metrics.contains(line), "missing {line:?} in\n{metrics}");
    }
    let (status, body) = get_text(&gw, "/healthz").await;
    assert_eq!(
        (status, body.as_str()),
        (StatusCode::OK, r#"{"status":"ok"}"#)
    );
}

#[tokio::test]
async fn a_flood_waits_for_a_slot_and_gets_503_after_the_timeout_without_reading_bodies() {
    let storage = TestStorage::sqlite();
    let mut config = test_config();
    config.max_concurrent_requests = 1;
    // Timeline (T = the request timeout, arrivals STEP apart): A holds the slot and gets
    // 408 at T; B, queued since STEP, takes it then (STEP before its own wait times out)
    // and gets 408 at 2T; C, queued since 2 STEP behind B, times out at 2 STEP + T with
    // 503 (T - 2 STEP before B lets go). Both margins are STEP = T/3: wide enough for a
    // loaded machine's late timers, which made a 50 ms margin flaky.
    const STEP: Duration = Duration::from_millis(800);
    config.request_timeout = STEP * 3;
    let gw = gateway(&storage, config, &closed_port_url().await).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tokio::spawn(axum::serve(listener, gw.router()).into_future());

    // Two senders that never finish their bodies: the first holds the one slot, the second
    // waits for it (a fair queue) and then holds it in turn...
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let head = b"POST /webhooks/gitea HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{";
    let mut slow = Vec::new();
    for _ in 0..2 {
        let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
        s.write_all(head).await.expect("write");
        slow.push(s);
        tokio::time::sleep(STEP).await;
    }
    // ...so a third request waits past its timeout and is turned away with 503; the slow
    // senders get 408. Nothing waited without bound and no body was buffered but theirs.
    let res = reqwest::Client::new()
        .get(format!("http://{addr}/queue"))
        .send()
        .await
        .expect("answer");
    assert_eq!(res.status(), reqwest::StatusCode::SERVICE_UNAVAILABLE);
    for mut s in slow {
        let mut answer = vec![0u8; 256];
        let n = s.read(&mut answer).await.expect("read");
        let answer = String::from_utf8_lossy(&answer[..n]);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    }
    server.abort();
}
