//! The dashboard's guards over HTTP, without a browser (tests/it/dashboard.rs has the
//! browser's): loopback only without a token, the sign-in and its cookie, CSRF on every
//! action — against the fake stage-engine, which records the approvals that reach it.

use axum::body::Body;
use http::{Request, StatusCode, header};
use orchestrator_kit::Env;
use orchestrator_proto::stage_engine::v1::CreateWorkItemRequest;
use orchestrator_testkit::TestStorage;
use tower::ServiceExt;

use crate::config::GatewayConfig;
use crate::tests::fake::Fake;
use crate::tests::{clients, gateway, test_config};

async fn send(app: &axum::Router, req: Request<Body>) -> (StatusCode, http::HeaderMap, String) {
    let r = app.clone().oneshot(req).await.expect("answer");
    let (parts, body) = r.into_parts();
    let bytes = axum::body::to_bytes(body, 1 << 22).await.expect("body");
    (
        parts.status,
        parts.headers,
        String::from_utf8_lossy(&bytes).into_owned(),
    )
}

fn get(path: &str, cookie: Option<&str>) -> Request<Body> {
    let mut r = Request::get(path);
    if let Some(c) = cookie {
        r = r.header(header::COOKIE, c);
    }
    r.body(Body::empty()).expect("request")
}

fn post(path: &str, cookie: Option<&str>, form: &str) -> Request<Body> {
    let mut r =
        Request::post(path).header(header::CONTENT_TYPE, "application/x-www-form-urlencoded");
    if let Some(c) = cookie {
        r = r.header(header::COOKIE, c);
    }
    r.body(Body::from(form.to_owned())).expect("request")
}

/// The value of the CSRF field in a page.
fn csrf_of(page: &str) -> String {
    let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    page[at..].split('"').next().expect("value").to_owned()
}

fn approvals(fake: &Fake) -> usize {
    fake.calls()
        .iter()
        .filter(|c| c.starts_with("Approve:"))
        .count()
}

#[tokio::test]
async fn without_a_token_it_answers_on_loopback_only() {
    let fake = Fake::default();
    let (url, _stop) = fake.serve().await;
    let storage = TestStorage::sqlite();
    let gw = gateway(&storage, test_config(), &url).await;
    gw.set_listen_addr("0.0.0.0:8080".parse().expect("addr"));
    let app = gw.router();
    for path in ["/", "/machine", "/costs", "/items/PROJ-1", "/jobs/j/log"] {
        let (status, _, body) = send(&app, get(path, None)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{path}");
        assert!(
            body.contains("0.0.0.0:8080") && body.contains("ORCH_DASHBOARD_TOKEN"),
            "{body}"
        );
    }
    let (status, _, _) = send(&app, post("/items/PROJ-1/approve", None, "csrf=x")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let (status, _, _) = send(&app, get("/healthz", None)).await;
    assert_eq!(
        status,
        StatusCode::OK,
        "the rest of the gateway is unchanged"
    );
    assert!(fake.calls().is_empty(), "{:?}", fake.calls());

    let loopback = gateway(&storage, test_config(), &url).await;
    loopback.set_listen_addr("127.0.0.1:8080".parse().expect("addr"));
    let (status, _, body) = send(&loopback.router(), get("/", None)).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.contains("<h1>Board</h1>"), "{body}");
}

#[tokio::test]
async fn with_a_token_it_signs_in_and_every_action_needs_the_csrf_token() {
    let fake = Fake::default();
    let (url, _stop) = fake.serve().await;
    let item = clients(&url)
        .await
        .stage_engine
        .create_work_item(CreateWorkItemRequest {
            tracker_issue_id: "issue-1".into(),
            title: "an item".into(),
            repo: "acme/app".into(),
            ..Default::default()
        })
        .await
        .expect("create")
        .into_inner()
        .work_item
        .expect("item");
    let mut config = test_config();
    config.dashboard_token =
        GatewayConfig::from_env(&Env::from_pairs([("ORCH_DASHBOARD_TOKEN", "t0ken")]))
            .expect("config")
            .dashboard_token;
    let storage = TestStorage::sqlite();
    let gw = gateway(&storage, config, &url).await;
    // Even on a public address: the token is what guards it.
    gw.set_listen_addr("0.0.0.0:8080".parse().expect("addr"));
    let app = gw.router();

    let (status, headers, _) = send(&app, get("/", None)).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/signin");
    let (status, _, body) = send(&app, post("/signin", None, "token=nope")).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    let (status, headers, _) = send(&app, post("/signin", None, "token=t0ken")).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    let set = headers[header::SET_COOKIE]
        .to_str()
        .expect("cookie")
        .to_owned();
    assert!(
        set.contains("HttpOnly") && set.contains("SameSite=Strict"),
        "{set}"
    );
    let cookie = set.split(';').next().expect("pair").to_owned();
    let forged = format!("{}0", cookie);
    let (status, _, _) = send(&app, get("/", Some(&forged))).await;
    assert_eq!(
        status,
        StatusCode::SEE_OTHER,
        "a forged session signs nobody in"
    );

    let path = format!("/items/{}", item.key);
    // The fake answers only the webhooks' RPCs: the board says what it cannot read, in place.
    let (status, _, page) = send(&app, get("/", Some(&cookie))).await;
    assert_eq!(status, StatusCode::OK, "{page}");
    assert!(page.contains("Cannot read"), "{page}");
    let csrf = csrf_of(&page);

    let approve = format!("{path}/approve");
    for form in [String::new(), "csrf=".to_owned(), format!("csrf={csrf}x")] {
        let (status, _, body) = send(&app, post(&approve, Some(&cookie), &form)).await;
        assert_eq!(status, StatusCode::FORBIDDEN, "{form}: {body}");
        assert!(body.contains("CSRF"), "{body}");
    }
    let (status, _, _) = send(&app, post(&approve, None, &format!("csrf={csrf}"))).await;
    assert_eq!(status, StatusCode::SEE_OTHER, "no session: to the sign-in");
    assert_eq!(approvals(&fake), 0, "{:?}", fake.calls());

    let (status, headers, _) =
        send(&app, post(&approve, Some(&cookie), &format!("csrf={csrf}"))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], path.as_str());
    assert_eq!(approvals(&fake), 1, "{:?}", fake.calls());
    assert!(
        fake.calls().iter().any(|c| c.ends_with(":dashboard")),
        "{:?}",
        fake.calls()
    );
}

/// A real dead letter (a delivery stage-engine refused for good) is retried from the
/// machine room (#17): refused without the CSRF token, then put back in line with it, and
/// applied once its cause is gone; a second retry of the same letter is refused.
#[tokio::test]
async fn the_machine_room_retries_an_inbox_dead_letter() {
    use crate::inbox;
    use crate::testdata::wire_body;
    use crate::tests::{Sig, hook};

    let fake = Fake::default();
    let (url, _stop) = fake.serve().await;
    fake.fail_with(Some(tonic::Code::InvalidArgument));
    let storage = TestStorage::sqlite();
    let gw = gateway(&storage, test_config(), &url).await;
    gw.set_listen_addr("127.0.0.1:8080".parse().expect("addr"));
    let app = gw.router();
    let merged = wire_body("gitea-webhook-pull_request-closed-merged.json");
    let (status, _, _) = send(
        &app,
        hook(
            "gitea",
            "pull_request",
            "pull_request",
            "dl-1",
            &merged,
            Sig::Good,
        ),
    )
    .await;
    assert!(status.is_success(), "{status}");
    gw.dispatch_once().await.expect("dispatch");
    let state = |gw: &crate::Gateway| {
        let db = gw.db().clone();
        async move {
            let d = inbox::get(&db, "gitea", "dl-1")
                .await
                .expect("get")
                .expect("row");
            (d.id, d.state, d.attempts)
        }
    };
    let (id, st, _) = state(&gw).await;
    assert_eq!(st, "dead");

    let (status, _, page) = send(&app, get("/machine", None)).await;
    assert_eq!(status, StatusCode::OK);
    let action = format!("/inbox/{id}/retry");
    assert!(
        page.contains(&format!("action=\"{action}\"")),
        "the dead letter has its button: {page}"
    );
    let csrf = csrf_of(&page);

    let (status, _, _) = send(&app, post(&action, None, "csrf=forged")).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    assert_eq!(state(&gw).await.1, "dead", "nothing done without the token");

    let (status, headers, _) = send(&app, post(&action, None, &format!("csrf={csrf}"))).await;
    assert_eq!(status, StatusCode::SEE_OTHER);
    assert_eq!(headers[header::LOCATION], "/machine");
    let (_, st, attempts) = state(&gw).await;
    assert_eq!(
        (st, attempts),
        ("pending", 0),
        "back in line, attempts from zero"
    );
    let (status, _, body) = send(&app, post(&action, None, &format!("csrf={csrf}"))).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert!(body.contains("not a dead letter"), "{body}");

    // The cause fixed: the dispatcher applies it.
    fake.fail_with(None);
    gw.dispatch_once().await.expect("dispatch");
    assert_eq!(state(&gw).await.1, "applied");
    assert!(
        fake.calls().iter().any(|c| c.starts_with("OnPrMerged:")),
        "{:?}",
        fake.calls()
    );
}
