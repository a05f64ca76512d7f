//! The fake Plane against the contract (`shared/contracts/plane-notes.md`) and against the
//! real client (`orchestrator_tracker::plane::PlaneTracker`).

mod common;

use common::Receiver;
use orchestrator_fakes::plane::{FakePlane, NewIssue};
use orchestrator_fakes::webhook::{hmac_sha256_hex, sample_json};
use orchestrator_fakes::{Hook, Json};
use orchestrator_kit::Env;
use orchestrator_tracker::plane::PlaneTracker;
use orchestrator_tracker::{IssueRef, Tracker, TrackerConfig, TrackerError, move_to_done};
use serde_json::{Value, json};

const SECRET: &str = "plane_wh_0123456789abcdef";

fn tracker(plane: &FakePlane) -> PlaneTracker {
    let env = Env::from_pairs([
        ("PLANE_BASE_URL", plane.url.clone()),
        ("PLANE_WORKSPACE_SLUG", "acme".into()),
        ("PLANE_API_TOKEN", "plane_api_service".into()),
        ("PLANE_BOT_TOKEN_REVIEWER", "plane_api_reviewer".into()),
        ("ORCH_TRACKER_TIMEOUT_MS", "5000".into()),
    ]);
    let config = TrackerConfig::from_env(&env)
        .expect("config")
        .plane
        .expect("plane");
    PlaneTracker::new(config).expect("client")
}

async fn get(plane: &FakePlane, path: &str, key: Option<&str>) -> (u16, Value) {
    let mut req = reqwest::Client::new().get(format!("{}{path}", plane.url));
    if let Some(k) = key {
        req = req.header("X-API-Key", k);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn the_tracker_client_works_against_it_end_to_end() {
    let plane = FakePlane::start("acme").await;
    let service = plane.add_user("orchestrator", Some("plane_api_service"));
    let reviewer = plane.add_user("orchestrator-reviewer", Some("plane_api_reviewer"));
    let ada = plane.add_user("ada", None);
    let project = plane.add_project("ORCH", "Orchestrator");
    let hook = Receiver::start().await;
    plane.set_webhook(Some(Hook {
        url: hook.url.clone(),
        secret: Some(SECRET.into()),
    }));
    let (issue, delivery) = plane
        .create_issue(
            &project.id,
            &NewIssue {
                name: "Speed up start-up".into(),
                description_html: "<p>It is <b>slow</b>.</p>".into(),
                labels: vec!["orchestrator".into()],
                ..NewIssue::default()
            },
            &ada,
        )
        .await;
    assert_eq!(issue.sequence_id, 1);
    assert_eq!(plane.key(&issue.id), "ORCH-1");
    assert!(delivery.expect("a webhook").accepted());
    let t = tracker(&plane);
    let found = IssueRef {
        project_id: project.id.clone(),
        issue_id: issue.id.clone(),
    };
    assert_eq!(
        t.find_issue("ORCH-1").await.expect("find"),
        Some(found.clone())
    );
    assert_eq!(t.find_issue("ORCH-2").await.expect("find"), None);

    // The 5 default states; Done is the completed group; the PATCH moves the issue.
    let states = t.list_states(&project.id).await.expect("states");
    assert_eq!(
        states.iter().map(|s| s.name.as_str()).collect::<Vec<_>>(),
        ["Backlog", "Todo", "In Progress", "Done", "Cancelled"]
    );
    assert_eq!(plane.state_name(&issue.id), "Backlog");
    let done = move_to_done(&t, &found).await.expect("done");
    assert_eq!(done.name, "Done");
    assert_eq!(plane.state_name(&issue.id), "Done");
    assert!(plane.issue(&issue.id).completed_at_ms.is_some());

    // Comments under the role's token; the same external id again answers 409.
    let posted = t
        .add_comment(&found, "<p>LGTM</p>", "reviewer", "k1")
        .await
        .expect("comment");
    assert!(!posted.duplicate);
    let again = t
        .add_comment(&found, "<p>LGTM</p>", "reviewer", "k1")
        .await
        .expect("409 counts as posted");
    assert!(again.duplicate);
    t.add_comment(&found, "<p>note</p>", "analyst", "k2")
        .await
        .expect("comment");
    let views = plane.comments(&issue.id);
    assert_eq!(
        views
            .iter()
            .map(|c| (c.author.as_str(), c.html.as_str()))
            .collect::<Vec<_>>(),
        [
            ("orchestrator-reviewer", "<p>LGTM</p>"),
            ("orchestrator", "<p>note</p>")
        ]
    );
    let read = t.list_comments(&found).await.expect("list");
    assert_eq!(read.len(), 2);
    assert_eq!(read[0].author, reviewer.id);
    assert_eq!(read[1].author, service.id);

    // Webhooks: created, the state change (one delivery for the changed key), two comments.
    let got = hook.wait_for(4).await;
    let kinds: Vec<(String, String, Value)> = got
        .iter()
        .map(|r| {
            let v: Value = serde_json::from_slice(&r.body).expect("json");
            (
                r.header("x-plane-event"),
                v["action"].as_str().unwrap_or_default().to_owned(),
                v["activity"]["field"].clone(),
            )
        })
        .collect();
    assert_eq!(
        kinds,
        [
            ("issue".into(), "created".into(), Value::Null),
            ("issue".into(), "updated".into(), json!("state")),
            ("issue_comment".into(), "created".into(), Value::Null),
            ("issue_comment".into(), "created".into(), Value::Null),
        ]
    );
    plane.check();
}

#[tokio::test]
async fn webhooks_are_signed_python_json_in_the_contract_shape_and_can_be_resent() {
    let plane = FakePlane::start("acme").await;
    let ada = plane.add_user("ada", Some("plane_api_ada"));
    let project = plane.add_project("ORCH", "Orchestrator");
    let hook = Receiver::start().await;
    plane.set_webhook(Some(Hook {
        url: hook.url.clone(),
        secret: Some(SECRET.into()),
    }));
    let (issue, d) = plane
        .create_issue(
            &project.id,
            &NewIssue {
                name: "Café ☕".into(),
                state: "Todo".into(),
                ..NewIssue::default()
            },
            &ada,
        )
        .await;
    let d = d.expect("sent");
    let (_, c) = plane.comment(&issue.id, "<p>:approved:</p>", &ada).await;
    let c = c.expect("sent");
    let got = hook.wait_for(2).await;
    for (r, d) in got.iter().zip([&d, &c]) {
        assert_eq!(r.body, d.body, "the bytes sent are the bytes recorded");
        assert_eq!(r.header("content-type"), "application/json");
        assert_eq!(r.header("user-agent"), "Autopilot");
        assert_eq!(r.header("x-plane-delivery"), d.id);
        assert_eq!(
            r.header("x-plane-signature"),
            hmac_sha256_hex(SECRET.as_bytes(), &r.body)
        );
        // Python's json.dumps: one line, ", " and ": ", ASCII only.
        let text = std::str::from_utf8(&r.body).expect("ascii");
        assert!(text.is_ascii() && !text.contains('\n'), "{text}");
        assert!(text.starts_with("{\"event\": "), "{text}");
    }
    assert!(
        std::str::from_utf8(&got[0].body)
            .expect("text")
            .contains(r#""name": "Caf\u00e9 \u2615""#)
    );

    // The same keys, in the same order, as the contract samples.
    let keys = |j: &Json| match j {
        Json::Object(f) => f.iter().map(|(k, _)| k.clone()).collect::<Vec<_>>(),
        _ => Vec::new(),
    };
    for (r, sample) in got.iter().zip([
        "plane-webhook-issue-created.json",
        "plane-webhook-issue_comment-created.json",
    ]) {
        let sent = Json::parse(std::str::from_utf8(&r.body).expect("utf-8")).expect("json");
        let want = sample_json(sample);
        assert_eq!(keys(&sent), keys(&want), "{sample}");
        assert_eq!(
            keys(sent.get("data").expect("data")),
            keys(want.get("data").expect("data")),
            "{sample} data"
        );
        assert_eq!(
            keys(sent.get("activity").expect("activity")),
            keys(want.get("activity").expect("activity")),
            "{sample} activity"
        );
    }
    let issue_payload: Value = serde_json::from_slice(&got[0].body).expect("json");
    assert_eq!(issue_payload["data"]["state"]["name"], "Todo");
    assert_eq!(issue_payload["data"]["sequence_id"], 1);
    assert_eq!(issue_payload["data"]["project"], json!(project.id));
    assert_eq!(issue_payload["activity"]["actor"]["display_name"], "ada");
    let comment_payload: Value = serde_json::from_slice(&got[1].body).expect("json");
    assert_eq!(comment_payload["data"]["issue"], json!(issue.id));
    assert_eq!(comment_payload["data"]["comment_html"], "<p>:approved:</p>");

    // A resend: the same bytes and signature, a new delivery id.
    let again = plane.redeliver(&c).await;
    let got = hook.wait_for(3).await;
    assert_eq!(got[2].body, c.body);
    assert_eq!(
        got[2].header("x-plane-signature"),
        got[1].header("x-plane-signature")
    );
    assert_ne!(got[2].header("x-plane-delivery"), c.id);
    assert_eq!(got[2].header("x-plane-delivery"), again.id);

    // Without a secret: no signature header at all.
    plane.set_webhook(Some(Hook {
        url: hook.url.clone(),
        secret: None,
    }));
    plane.comment(&issue.id, "<p>hi</p>", &ada).await;
    let got = hook.wait_for(4).await;
    assert!(!got[3].headers.contains_key("x-plane-signature"));
}

#[tokio::test]
async fn auth_errors_pages_and_projects_follow_the_contract() {
    let plane = FakePlane::start("acme").await;
    let ada = plane.add_user("ada", Some("plane_api_ada"));
    let project = plane.add_project("WEB", "Website");
    let key = Some("plane_api_ada");

    let (s, b) = get(&plane, "/api/v1/workspaces/acme/projects/", None).await;
    assert_eq!(
        (s, b),
        (
            403,
            json!({"detail": "Authentication credentials were not provided."})
        )
    );
    let (s, b) = get(&plane, "/api/v1/workspaces/acme/projects/", Some("nope")).await;
    assert_eq!(
        (s, b),
        (403, json!({"detail": "Given API token is not valid"}))
    );
    assert_eq!(plane.errors().len(), 2, "both recorded as contract breaks");
    plane.with(|d| d.errors.clear());

    let (s, b) = get(&plane, "/api/v1/workspaces/acme/projects/", key).await;
    assert_eq!(s, 200);
    assert_eq!(b["results"][0]["identifier"], "WEB");
    assert_eq!(b["results"][0]["id"], json!(project.id));
    let (s, b) = get(
        &plane,
        &format!("/api/v1/workspaces/acme/projects/{}/", project.id),
        key,
    )
    .await;
    assert_eq!((s, b["identifier"].clone()), (200, json!("WEB")));
    let (s, b) = get(&plane, "/api/v1/workspaces/acme/projects/nope/", key).await;
    assert_eq!(
        (s, b),
        (
            404,
            json!({"error": "The requested resource does not exist."})
        )
    );

    // The states envelope has the sample's keys.
    let (_, states) = get(
        &plane,
        &format!("/api/v1/workspaces/acme/projects/{}/states/", project.id),
        key,
    )
    .await;
    let sample: Value = sample_json("plane-api-states-list.json").to_value();
    let names = |v: &Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(names(&states), names(&sample));
    assert_eq!(names(&states["results"][0]), names(&sample["results"][0]));

    // Work items by id and by key, and pages of a list.
    for i in 0..5 {
        plane
            .create_issue(
                &project.id,
                &NewIssue {
                    name: format!("item {i}"),
                    ..NewIssue::default()
                },
                &ada,
            )
            .await;
    }
    let (s, b) = get(&plane, "/api/v1/workspaces/acme/work-items/WEB-3/", key).await;
    assert_eq!(
        (s, b["name"].clone(), b["sequence_id"].clone()),
        (200, json!("item 2"), json!(3))
    );
    let sample: Value = sample_json("plane-api-work-item.json").to_value();
    assert_eq!(names(&b), names(&sample));
    let (s, _) = get(&plane, "/api/v1/workspaces/acme/issues/WEB-9/", key).await;
    assert_eq!(s, 404);
    let list = format!(
        "/api/v1/workspaces/acme/projects/{}/work-items/",
        project.id
    );
    let (_, p1) = get(&plane, &format!("{list}?per_page=2"), key).await;
    assert_eq!(
        (
            p1["count"].clone(),
            p1["total_results"].clone(),
            p1["next_page_results"].clone()
        ),
        (json!(2), json!(5), json!(true))
    );
    assert_eq!(p1["next_cursor"], "2:1:0");
    let (_, p3) = get(&plane, &format!("{list}?per_page=2&cursor=2%3A2%3A0"), key).await;
    assert_eq!(
        (
            p3["count"].clone(),
            p3["next_page_results"].clone(),
            p3["prev_page_results"].clone()
        ),
        (json!(1), json!(false), json!(true))
    );
    // Newest first: the last page holds the first item.
    assert_eq!(p3["results"][0]["name"], "item 0");
    plane.check();
}

#[tokio::test]
async fn faults_make_it_unavailable_and_a_lost_answer_still_stores() {
    let plane = FakePlane::start("acme").await;
    plane.add_user("orchestrator", Some("plane_api_service"));
    let ada = plane.add_user("ada", None);
    let project = plane.add_project("ORCH", "Orchestrator");
    let (issue, _) = plane
        .create_issue(
            &project.id,
            &NewIssue {
                name: "x".into(),
                ..NewIssue::default()
            },
            &ada,
        )
        .await;
    let t = tracker(&plane);
    let r = IssueRef {
        project_id: project.id.clone(),
        issue_id: issue.id.clone(),
    };
    plane.with(|d| d.faults.down = true);
    let e = t.list_states(&project.id).await.expect_err("down");
    assert!(e.is_transient(), "{e}");
    plane.with(|d| {
        d.faults.down = false;
        d.faults.lose_next_comment_answer = true;
    });
    let e = t
        .add_comment(&r, "<p>a</p>", "stream", "k")
        .await
        .expect_err("answer lost");
    assert!(matches!(e, TrackerError::Unavailable(_)), "{e}");
    assert_eq!(plane.comments(&issue.id).len(), 1, "stored all the same");
    let again = t
        .add_comment(&r, "<p>a</p>", "stream", "k")
        .await
        .expect("retry");
    assert!(again.duplicate, "the retry finds the stored one");
    assert_eq!(plane.comments(&issue.id).len(), 1);
    plane.with(|d| d.faults.fail_next = 1);
    assert!(t.list_states(&project.id).await.is_err());
    assert!(t.list_states(&project.id).await.is_ok());
    plane.check();
}
