//! The Gitea client against a fake Gitea on 127.0.0.1:0 that answers from a script and
//! checks each request — method, path, query, `Authorization: token ...` and JSON body —
//! against `shared/contracts/gitea-notes.md`. Response bodies are the captured pull request
//! objects from `shared/contracts/gitea-webhook-pull_request-*.json`.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::IntoResponse;
use orchestrator_forge::config::GiteaConfig;
use orchestrator_forge::gitea::GiteaForge;
use orchestrator_forge::{Forge, ForgeError, MergeOutcome, PrState, RepoName};
use orchestrator_kit::Secret;
use serde_json::{Value, json};

fn contracts_dir() -> PathBuf {
    orchestrator_testkit::contracts_dir()
}

/// The captured pull request object of a contract sample, changed by `edit`.
fn pr_json(sample: &str, edit: impl FnOnce(&mut Value)) -> Value {
    let raw = std::fs::read(contracts_dir().join(sample)).expect("sample");
    let mut v: Value = serde_json::from_slice(&raw).expect("json");
    let mut pr = v["pull_request"].take();
    edit(&mut pr);
    pr
}

fn open_pr(number: u64, head_sha: &str) -> Value {
    pr_json("gitea-webhook-pull_request-opened.json", |pr| {
        pr["number"] = json!(number);
        pr["state"] = json!("open");
        pr["merged"] = json!(false);
        pr["merge_commit_sha"] = Value::Null;
        pr["head"]["ref"] = json!("orch/ORCH-7");
        pr["head"]["sha"] = json!(head_sha);
        pr["base"]["ref"] = json!("main");
        pr["html_url"] = json!(format!("https://git.example.com/acme/app/pulls/{number}"));
    })
}

fn merged_pr(number: u64, head_sha: &str, merge_sha: &str) -> Value {
    pr_json("gitea-webhook-pull_request-closed-merged.json", |pr| {
        pr["number"] = json!(number);
        pr["head"]["ref"] = json!("orch/ORCH-7");
        pr["head"]["sha"] = json!(head_sha);
        pr["merge_commit_sha"] = json!(merge_sha);
    })
}

/// One expected request and the answer to it.
struct Step {
    method: Method,
    path_and_query: String,
    body: Option<Value>,
    status: u16,
    answer: String,
}

fn step(method: Method, pq: &str, body: Option<Value>, status: u16, answer: impl ToString) -> Step {
    Step {
        method,
        path_and_query: pq.to_owned(),
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
    if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("token gitea-secret") {
        errors.push(format!("{pq}: missing or wrong 'Authorization: token ...'"));
    }
    match (&step.body, body.is_empty()) {
        (None, true) => {}
        (None, false) => errors.push(format!("{pq}: unexpected body")),
        (Some(want), _) => {
            let got: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            if &got != want {
                errors.push(format!("{pq}: body {got} != {want}"));
            }
            if headers.get("content-type").and_then(|v| v.to_str().ok()) != Some("application/json")
            {
                errors.push(format!("{pq}: content-type is not application/json"));
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
    forge: GiteaForge,
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
        let forge = GiteaForge::new(GiteaConfig {
            base_url: format!("http://{addr}"),
            public_url: "https://git.example.com".into(),
            token: Some(Secret::new("gitea-secret")),
            timeout: Duration::from_secs(5),
        })
        .expect("client");
        Fake { script, forge }
    }

    /// Every scripted step was asked for, exactly as expected.
    fn check(&self) {
        let errors = self.script.errors.lock().expect("lock");
        assert!(errors.is_empty(), "{errors:#?}");
        let left = self.script.steps.lock().expect("lock").len();
        assert_eq!(left, 0, "{left} scripted requests never came");
    }
}

fn repo() -> RepoName {
    RepoName::parse("acme/app").expect("repo")
}

const HEAD: &str = "d555a5dd07f4d0148a58d4686ec381502ae6a2d4";
const MERGE: &str = "f2440f050054df0f8ecabcace648f1683509064c";

#[tokio::test]
async fn ensure_pr_creates_then_finds_the_existing_one_on_409() {
    let create_body =
        json!({"head": "orch/ORCH-7", "base": "main", "title": "ORCH-7", "body": "b"});
    let fake = Fake::start(vec![
        step(Method::POST, "/api/v1/repos/acme/app/pulls", Some(create_body.clone()), 201, open_pr(3, HEAD)),
        step(
            Method::POST,
            "/api/v1/repos/acme/app/pulls",
            Some(create_body),
            409,
            json!({"message": "pull request already exists for these targets [id: 3, issue_id: 3, head_repo_id: 1, base_repo_id: 1, head_branch: orch/ORCH-7, base_branch: main]", "url": "https://git.example.com/api/swagger"}),
        ),
        step(Method::GET, "/api/v1/repos/acme/app/pulls/main/orch/ORCH-7", None, 200, open_pr(3, HEAD)),
    ])
    .await;
    let first = fake
        .forge
        .ensure_pr(&repo(), "orch/ORCH-7", "main", "ORCH-7", "b")
        .await
        .expect("create");
    assert!(first.created);
    assert_eq!(first.pr.number, 3);
    assert_eq!(first.pr.head_sha, HEAD);
    assert_eq!(first.pr.state, PrState::Open);
    let again = fake
        .forge
        .ensure_pr(&repo(), "orch/ORCH-7", "main", "ORCH-7", "b")
        .await
        .expect("exists");
    assert!(!again.created);
    assert_eq!(again.pr.number, 3);
    fake.check();
}

#[tokio::test]
async fn repo_exists_reads_the_repository() {
    let raw = std::fs::read(contracts_dir().join("gitea-webhook-pull_request-opened.json"))
        .expect("sample");
    let sample: Value = serde_json::from_slice(&raw).expect("json");
    let fake = Fake::start(vec![
        step(
            Method::GET,
            "/api/v1/repos/acme/app",
            None,
            200,
            &sample["repository"],
        ),
        step(
            Method::GET,
            "/api/v1/repos/acme/app",
            None,
            404,
            json!({"message": "The target couldn't be found.", "url": "u", "errors": []}),
        ),
        step(Method::GET, "/api/v1/repos/acme/app", None, 502, ""),
    ])
    .await;
    assert!(fake.forge.repo_exists(&repo()).await.expect("200"));
    assert!(!fake.forge.repo_exists(&repo()).await.expect("404"));
    let err = fake.forge.repo_exists(&repo()).await.expect_err("502");
    assert!(err.is_transient(), "{err}");
    fake.check();
}

#[tokio::test]
async fn ensure_pr_maps_refusals_and_outages() {
    let fake = Fake::start(vec![
        step(
            Method::POST,
            "/api/v1/repos/acme/app/pulls",
            None,
            422,
            json!({"message": "Invalid PullRequest: There are no changes between the head and the base", "url": "u"}),
        ),
        step(Method::POST, "/api/v1/repos/acme/app/pulls", None, 503, "down"),
        step(Method::POST, "/api/v1/repos/acme/app/pulls", None, 429, ""),
    ])
    .await;
    // The body is checked in the test above; here only the status mapping matters.
    for s in fake.script.steps.lock().expect("lock").iter_mut() {
        s.body = Some(json!({"head": "orch/ORCH-7", "base": "main", "title": "t", "body": ""}));
    }
    let err = fake
        .forge
        .ensure_pr(&repo(), "orch/ORCH-7", "main", "t", "")
        .await
        .expect_err("422");
    assert!(
        matches!(err, ForgeError::Rejected { status: 422, .. }),
        "{err}"
    );
    assert!(err.to_string().contains("no changes"), "{err}");
    assert!(!err.is_transient());
    for _ in 0..2 {
        let err = fake
            .forge
            .ensure_pr(&repo(), "orch/ORCH-7", "main", "t", "")
            .await
            .expect_err("5xx/429");
        assert!(err.is_transient(), "{err}");
    }
    fake.check();
}

#[tokio::test]
async fn get_and_find_answer_none_on_404() {
    let fake = Fake::start(vec![
        step(
            Method::GET,
            "/api/v1/repos/acme/app/pulls/9",
            None,
            404,
            json!({"message": "not found", "url": "u", "errors": []}),
        ),
        step(
            Method::GET,
            "/api/v1/repos/acme/app/pulls/main/orch/ORCH-7",
            None,
            404,
            json!({"message": "not found", "url": "u", "errors": []}),
        ),
        step(
            Method::GET,
            "/api/v1/repos/acme/app/pulls/1",
            None,
            200,
            merged_pr(1, HEAD, MERGE),
        ),
    ])
    .await;
    assert_eq!(fake.forge.get_pr(&repo(), 9).await.expect("404"), None);
    assert_eq!(
        fake.forge
            .find_pr(&repo(), "orch/ORCH-7", "main")
            .await
            .expect("404"),
        None
    );
    let pr = fake
        .forge
        .get_pr(&repo(), 1)
        .await
        .expect("200")
        .expect("pr");
    assert!(pr.merged);
    assert_eq!(pr.merge_sha.as_deref(), Some(MERGE));
    assert_eq!(pr.state, PrState::Closed);
    fake.check();
}

#[tokio::test]
async fn merge_is_pinned_to_the_head_and_reads_every_refusal_against_the_pr() {
    let body = json!({"Do": "merge", "head_commit_id": HEAD});
    let merge = "/api/v1/repos/acme/app/pulls/3/merge";
    let get = "/api/v1/repos/acme/app/pulls/3";
    let fake = Fake::start(vec![
        // 200: merged now; the merge sha comes from the PR read afterwards.
        step(Method::POST, merge, Some(body.clone()), 200, ""),
        step(Method::GET, get, None, 200, merged_pr(3, HEAD, MERGE)),
        // 405 with an empty message: already merged.
        step(
            Method::POST,
            merge,
            Some(body.clone()),
            405,
            json!({"message": "", "url": "u"}),
        ),
        step(Method::GET, get, None, 200, merged_pr(3, HEAD, MERGE)),
        // 405 while checks run: not mergeable yet.
        step(
            Method::POST,
            merge,
            Some(body.clone()),
            405,
            json!({"message": "Please try again later", "url": "u"}),
        ),
        step(Method::GET, get, None, 200, open_pr(3, HEAD)),
        // 409 and the head moved: refused, never merged.
        step(
            Method::POST,
            merge,
            Some(body.clone()),
            409,
            json!({"message": "head out of date", "url": "u"}),
        ),
        step(
            Method::GET,
            get,
            None,
            200,
            open_pr(3, "0000000000000000000000000000000000000001"),
        ),
        // 409 with the same head: conflicts.
        step(
            Method::POST,
            merge,
            Some(body.clone()),
            409,
            json!({"StatusCode": 1, "Stdout": "", "Stderr": "CONFLICT"}),
        ),
        step(Method::GET, get, None, 200, open_pr(3, HEAD)),
        // 404 on a closed, unmerged PR.
        step(
            Method::POST,
            merge,
            Some(body.clone()),
            404,
            json!({"message": "", "url": "u", "errors": []}),
        ),
        step(
            Method::GET,
            get,
            None,
            200,
            pr_json("gitea-webhook-pull_request-closed-unmerged.json", |pr| {
                pr["number"] = json!(3);
            }),
        ),
        // 500: unavailable (the caller re-reads before it retries).
        step(
            Method::POST,
            merge,
            Some(body),
            500,
            json!({"message": "", "url": "u"}),
        ),
    ])
    .await;
    let f = &fake.forge;
    assert_eq!(
        f.merge_pr(&repo(), 3, HEAD).await.expect("200"),
        MergeOutcome::Merged {
            merge_sha: Some(MERGE.into())
        }
    );
    assert_eq!(
        f.merge_pr(&repo(), 3, HEAD).await.expect("405"),
        MergeOutcome::AlreadyMerged {
            merge_sha: Some(MERGE.into())
        }
    );
    assert_eq!(
        f.merge_pr(&repo(), 3, HEAD).await.expect("405"),
        MergeOutcome::NotMergeable {
            reason: "Please try again later".into()
        }
    );
    assert!(matches!(
        f.merge_pr(&repo(), 3, HEAD).await.expect("409"),
        MergeOutcome::HeadMoved { .. }
    ));
    assert!(matches!(
        f.merge_pr(&repo(), 3, HEAD).await.expect("409"),
        MergeOutcome::Conflicts { .. }
    ));
    assert_eq!(
        f.merge_pr(&repo(), 3, HEAD).await.expect("404"),
        MergeOutcome::Closed
    );
    assert!(
        f.merge_pr(&repo(), 3, HEAD)
            .await
            .expect_err("500")
            .is_transient()
    );
    // Not a commit id: refused before any request.
    assert!(f.merge_pr(&repo(), 3, "--force").await.is_err());
    fake.check();
}

#[tokio::test]
async fn read_file_uses_the_raw_route_with_the_ref_and_none_on_404() {
    let fake = Fake::start(vec![
        step(
            Method::GET,
            "/api/v1/repos/acme/app/raw/docs/work-items/ORCH-7/review.md?ref=orch%2FORCH-7",
            None,
            200,
            "---\nreview_verdict: APPROVED\n---\n",
        ),
        step(
            Method::GET,
            "/api/v1/repos/acme/app/raw/docs/work-items/ORCH-7/test-report.md?ref=orch%2FORCH-7",
            None,
            404,
            json!({"message": "not found", "url": "u", "errors": []}),
        ),
    ])
    .await;
    let text = fake
        .forge
        .read_file(&repo(), "orch/ORCH-7", "docs/work-items/ORCH-7/review.md")
        .await
        .expect("200");
    assert_eq!(
        text.as_deref(),
        Some("---\nreview_verdict: APPROVED\n---\n")
    );
    assert_eq!(
        fake.forge
            .read_file(
                &repo(),
                "orch/ORCH-7",
                "docs/work-items/ORCH-7/test-report.md"
            )
            .await
            .expect("404"),
        None
    );
    // Validated before any request: nothing is sent for these.
    assert!(
        fake.forge
            .read_file(&repo(), "orch/ORCH-7", "../etc/passwd")
            .await
            .is_err()
    );
    assert!(
        fake.forge
            .read_file(&repo(), "--upload-pack=x", "a.md")
            .await
            .is_err()
    );
    fake.check();
}

#[tokio::test]
async fn git_authenticates_with_a_header_not_a_url() {
    let fake = Fake::start(vec![]).await;
    let env = fake.forge.git_auth_env();
    let shown: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.expose())).collect();
    assert_eq!(
        shown,
        vec![
            ("GIT_CONFIG_COUNT", "1"),
            ("GIT_CONFIG_KEY_0", "http.extraHeader"),
            ("GIT_CONFIG_VALUE_0", "Authorization: token gitea-secret"),
        ]
    );
    assert!(!fake.forge.clone_url(&repo()).contains("gitea-secret"));
    assert!(!format!("{env:?}").contains("gitea-secret"));
}

#[tokio::test]
async fn a_gitea_that_is_down_is_transient() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    let forge = GiteaForge::new(GiteaConfig {
        base_url: format!("http://{addr}"),
        public_url: "https://git.example.com".into(),
        token: None,
        timeout: Duration::from_secs(2),
    })
    .expect("client");
    let err = forge.get_pr(&repo(), 1).await.expect_err("down");
    assert!(err.is_transient(), "{err}");
    assert_eq!(
        forge.pr_url(&repo(), 4),
        "https://git.example.com/acme/app/pulls/4"
    );
    assert_eq!(
        forge.file_url(&repo(), "orch/ORCH-7", "docs/work-items/ORCH-7/review.md"),
        "https://git.example.com/acme/app/src/branch/orch/ORCH-7/docs/work-items/ORCH-7/review.md"
    );
}

#[tokio::test]
async fn branch_head_reads_the_branch_commit() {
    // The swagger's `Branch`: `commit` is a `PayloadCommit`, as the push delivery's
    // `head_commit` is (a real one).
    let raw = std::fs::read(contracts_dir().join("gitea-webhook-push.json")).expect("sample");
    let push: Value = serde_json::from_slice(&raw).expect("json");
    let sha = push["head_commit"]["id"].as_str().expect("id").to_owned();
    let branch = json!({"name": "orch/ORCH-7", "commit": push["head_commit"], "protected": false});
    let fake = Fake::start(vec![
        step(
            Method::GET,
            "/api/v1/repos/acme/app/branches/orch/ORCH-7",
            None,
            200,
            branch,
        ),
        step(
            Method::GET,
            "/api/v1/repos/acme/app/branches/orch/ORCH-8",
            None,
            404,
            json!({"message": "branch does not exist", "url": "u", "errors": []}),
        ),
        step(
            Method::GET,
            "/api/v1/repos/acme/app/branches/orch/ORCH-9",
            None,
            200,
            json!({"name": "orch/ORCH-9", "commit": {"id": "not-a-sha"}}),
        ),
        step(
            Method::GET,
            "/api/v1/repos/acme/app/branches/orch/ORCH-9",
            None,
            503,
            "",
        ),
    ])
    .await;
    let f = &fake.forge;
    assert_eq!(
        f.branch_head(&repo(), "orch/ORCH-7").await.expect("200"),
        Some(sha)
    );
    assert_eq!(
        f.branch_head(&repo(), "orch/ORCH-8").await.expect("404"),
        None
    );
    let bad = f
        .branch_head(&repo(), "orch/ORCH-9")
        .await
        .expect_err("no sha");
    assert!(bad.to_string().contains("not-a-sha"), "{bad}");
    let down = f
        .branch_head(&repo(), "orch/ORCH-9")
        .await
        .expect_err("503");
    assert!(down.is_transient(), "{down}");
    fake.check();
}
