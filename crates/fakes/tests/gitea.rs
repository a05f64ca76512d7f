//! The fake Gitea against the contract (`shared/contracts/gitea-notes.md`), the real client
//! (`orchestrator_forge::gitea::GiteaForge`) and real git over HTTP.

mod common;

use std::path::Path;
use std::time::Duration;

use common::Receiver;
use orchestrator_fakes::Hook;
use orchestrator_fakes::gitea::FakeGitea;
use orchestrator_fakes::webhook::{hmac_sha1_hex, hmac_sha256_hex, sample_json};
use orchestrator_forge::config::GiteaConfig;
use orchestrator_forge::gitea::GiteaForge;
use orchestrator_forge::{
    CiState, CommitStatus, Forge, ForgeError, MergeOutcome, PrState, RepoName, ReviewComment,
    ReviewState,
};
use orchestrator_git::Git;
use orchestrator_kit::Secret;
use serde_json::{Value, json};

const TOKEN: &str = "gitea-token-orchestrator";
const REPO: &str = "acme/app";
const SECRET: &str = "gitea-webhook-secret";

fn client(gitea: &FakeGitea, token: Option<&str>) -> GiteaForge {
    GiteaForge::new(GiteaConfig {
        base_url: gitea.url.clone(),
        public_url: "https://git.example.com".into(),
        token: token.map(Secret::new),
        timeout: Duration::from_secs(10),
    })
    .expect("client")
}

fn repo() -> RepoName {
    RepoName::parse(REPO).expect("repo")
}

async fn started(dir: &Path) -> FakeGitea {
    let gitea = FakeGitea::start(dir).await;
    gitea.add_user("acme", None);
    gitea.add_user("orchestrator", Some(TOKEN));
    gitea.add_user("ada", Some("gitea-token-ada"));
    gitea.create_repo(REPO).await;
    gitea
}

#[tokio::test]
async fn the_forge_client_opens_reads_and_merges_pull_requests() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gitea = started(dir.path()).await;
    let hook = Receiver::start().await;
    gitea.set_webhook(Some(Hook {
        url: hook.url.clone(),
        secret: Some(SECRET.into()),
    }));
    let f = client(&gitea, Some(TOKEN));
    assert!(f.repo_exists(&repo()).await.expect("exists"));
    assert!(
        !f.repo_exists(&RepoName::parse("acme/nope").expect("name"))
            .await
            .expect("404")
    );

    // Nothing to merge yet: 422; an unknown branch: 404.
    gitea.commit(REPO, "orch/ORCH-1", &[], "empty").await;
    let e = f
        .ensure_pr(&repo(), "main", "main", "t", "b")
        .await
        .expect_err("422");
    assert!(
        matches!(
            e,
            orchestrator_forge::ForgeError::Rejected { status: 422, .. }
        ),
        "{e}"
    );
    let e = f
        .ensure_pr(&repo(), "orch/nope", "main", "t", "b")
        .await
        .expect_err("404");
    assert!(
        matches!(e, orchestrator_forge::ForgeError::NotFound(_)),
        "{e}"
    );

    let head = gitea
        .commit(REPO, "orch/ORCH-1", &[("docs/a.md", "# A\n")], "add a")
        .await;
    let opened = f
        .ensure_pr(&repo(), "orch/ORCH-1", "main", "ORCH-1", "body")
        .await
        .expect("201");
    assert!(opened.created);
    assert_eq!(
        (
            opened.pr.number,
            opened.pr.head_sha.as_str(),
            opened.pr.state
        ),
        (1, head.as_str(), PrState::Open)
    );
    // 409 for an open PR with the same head and base, read back.
    let again = f
        .ensure_pr(&repo(), "orch/ORCH-1", "main", "ORCH-1", "body")
        .await
        .expect("409");
    assert!(!again.created);
    assert_eq!(again.pr.number, 1);
    assert_eq!(
        f.find_pr(&repo(), "orch/ORCH-1", "main")
            .await
            .expect("find")
            .map(|p| p.number),
        Some(1)
    );
    assert_eq!(
        f.read_file(&repo(), "orch/ORCH-1", "docs/a.md")
            .await
            .expect("read")
            .as_deref(),
        Some("# A\n")
    );
    assert_eq!(
        f.read_file(&repo(), "main", "docs/a.md")
            .await
            .expect("read"),
        None
    );

    // A push after the head was read: the pinned merge is refused (409 head out of date).
    let moved = gitea
        .commit(REPO, "orch/ORCH-1", &[("docs/b.md", "# B\n")], "add b")
        .await;
    assert_eq!(
        f.merge_pr(&repo(), 1, &head).await.expect("answer"),
        MergeOutcome::HeadMoved {
            expected: head.clone(),
            actual: moved.clone()
        }
    );
    // The tested head: merged for real, into main.
    let MergeOutcome::Merged {
        merge_sha: Some(merge_sha),
    } = f.merge_pr(&repo(), 1, &moved).await.expect("merge")
    else {
        panic!("not merged");
    };
    assert_eq!(
        gitea.branch_sha(REPO, "main").await.as_deref(),
        Some(merge_sha.as_str())
    );
    assert_eq!(
        gitea.file(REPO, "main", "docs/b.md").await.as_deref(),
        Some("# B\n")
    );
    let pr = f.get_pr(&repo(), 1).await.expect("get").expect("pr");
    assert!(pr.merged && pr.state == PrState::Closed);
    // Merged before: 405, read back as already merged.
    assert_eq!(
        f.merge_pr(&repo(), 1, &moved).await.expect("answer"),
        MergeOutcome::AlreadyMerged {
            merge_sha: Some(merge_sha.clone())
        }
    );
    assert_eq!(gitea.with(|d| (d.merge_requests, d.merges_done)), (3, 1));
    assert_eq!(
        gitea.with(|d| d.merge_log.clone()),
        [(REPO.to_owned(), 1, "orchestrator".to_owned())]
    );

    // Webhooks: opened, then closed with merged: true, signed over the bytes sent.
    let got = hook.wait_for(2).await;
    for r in &got {
        assert_eq!(r.header("x-gitea-event"), "pull_request");
        assert_eq!(r.header("x-gitea-event-type"), "pull_request");
        assert_eq!(
            r.header("x-gitea-signature"),
            hmac_sha256_hex(SECRET.as_bytes(), &r.body)
        );
        assert_eq!(
            r.header("x-hub-signature-256"),
            format!("sha256={}", r.header("x-gitea-signature"))
        );
        assert_eq!(
            r.header("x-hub-signature"),
            format!("sha1={}", hmac_sha1_hex(SECRET.as_bytes(), &r.body))
        );
        assert_eq!(r.header("x-gogs-delivery"), r.header("x-gitea-delivery"));
        // Go's MarshalIndent with two spaces.
        assert!(
            r.body.starts_with(b"{\n  \"action\": "),
            "{}",
            String::from_utf8_lossy(&r.body)
        );
    }
    let opened: Value = serde_json::from_slice(&got[0].body).expect("json");
    assert_eq!(opened["action"], "opened");
    let closed: Value = serde_json::from_slice(&got[1].body).expect("json");
    assert_eq!(closed["action"], "closed");
    assert_eq!(closed["number"], 1);
    assert_eq!(closed["pull_request"]["merged"], true);
    assert_eq!(closed["pull_request"]["merge_commit_sha"], json!(merge_sha));
    assert_eq!(closed["pull_request"]["head"]["ref"], "orch/ORCH-1");
    assert_eq!(closed["pull_request"]["head"]["sha"], json!(moved));
    assert_eq!(closed["pull_request"]["merged_by"]["login"], "orchestrator");
    assert_eq!(closed["repository"]["full_name"], REPO);
    // The same keys as the captured merge.
    let sample = sample_json("gitea-webhook-pull_request-closed-merged.json").to_value();
    let names = |v: &Value| {
        v.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    assert_eq!(names(&closed), names(&sample));
    assert!(
        names(&sample["pull_request"])
            .iter()
            .all(|k| closed["pull_request"].get(k).is_some())
    );
    gitea.check();
}

#[tokio::test]
async fn conflicts_and_faults_answer_the_documented_status_codes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gitea = started(dir.path()).await;
    let f = client(&gitea, Some(TOKEN));
    gitea
        .commit(REPO, "main", &[("a.txt", "base\n")], "base")
        .await;
    let head = gitea
        .commit(REPO, "orch/ORCH-2", &[("a.txt", "theirs\n")], "theirs")
        .await;
    gitea
        .commit(REPO, "main", &[("a.txt", "ours\n")], "ours")
        .await;
    f.ensure_pr(&repo(), "orch/ORCH-2", "main", "t", "")
        .await
        .expect("pr");
    // 409 with the Go error struct (not an APIError), read back: the head did not move.
    let conflict = f.merge_pr(&repo(), 1, &head).await.expect("answer");
    assert!(
        matches!(conflict, MergeOutcome::Conflicts { .. }),
        "{conflict:?}"
    );
    assert!(!gitea.pr(REPO, 1).await.expect("pr").merged);

    let head3 = gitea
        .commit(REPO, "orch/ORCH-3", &[("c.txt", "c\n")], "c")
        .await;
    f.ensure_pr(&repo(), "orch/ORCH-3", "main", "t", "")
        .await
        .expect("pr");
    gitea.with(|d| d.faults.not_ready = true);
    assert!(matches!(
        f.merge_pr(&repo(), 2, &head3).await.expect("405"),
        MergeOutcome::NotMergeable { .. }
    ));
    // The answer is lost after a real merge: the client reads the PR back (an error here;
    // merge-gate reads the PR again before retrying).
    gitea.with(|d| d.faults.lose_merge_answer = true);
    let lost = f.merge_pr(&repo(), 2, &head3).await;
    assert!(lost.is_err(), "{lost:?}");
    assert!(gitea.pr(REPO, 2).await.expect("pr").merged);

    let head4 = gitea
        .commit(REPO, "orch/ORCH-4", &[("d.txt", "d\n")], "d")
        .await;
    f.ensure_pr(&repo(), "orch/ORCH-4", "main", "t", "")
        .await
        .expect("pr");
    gitea.with(|d| d.faults.merged_by_someone_else = true);
    assert!(matches!(
        f.merge_pr(&repo(), 3, &head4).await.expect("405"),
        MergeOutcome::AlreadyMerged { .. }
    ));

    let head5 = gitea
        .commit(REPO, "orch/ORCH-5", &[("e.txt", "e\n")], "e")
        .await;
    f.ensure_pr(&repo(), "orch/ORCH-5", "main", "t", "")
        .await
        .expect("pr");
    gitea.with(|d| d.faults.push_before_merge = true);
    assert!(matches!(
        f.merge_pr(&repo(), 4, &head5).await.expect("409"),
        MergeOutcome::HeadMoved { .. }
    ));

    // REST without a token, or with a wrong one: 401, recorded.
    let raw = reqwest::get(format!("{}/api/v1/repos/{REPO}", gitea.url))
        .await
        .expect("get");
    assert_eq!(raw.status().as_u16(), 401);
    let e = client(&gitea, Some("wrong"))
        .repo_exists(&repo())
        .await
        .expect_err("401");
    assert!(
        matches!(
            e,
            orchestrator_forge::ForgeError::Rejected { status: 401, .. }
        ),
        "{e}"
    );
    assert_eq!(gitea.errors().len(), 2, "{:?}", gitea.errors());
}

#[tokio::test]
async fn git_fetches_and_pushes_over_smart_http_with_the_token_header() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gitea = started(dir.path()).await;
    let f = client(&gitea, Some(TOKEN));
    gitea
        .commit(REPO, "main", &[("README.md", "hello\n")], "readme")
        .await;
    let work = tempfile::tempdir().expect("work");
    let w = work.path();
    // The forge's own credentials: an http.extraHeader through GIT_CONFIG_*.
    let git = Git::new()
        .with_env(f.git_auth_env())
        .with_timeout(Duration::from_secs(60));
    let url = f.clone_url(&repo());
    assert_eq!(url, format!("{}/{REPO}.git", gitea.url));
    git.ok(w, &["clone", "-q", &url, "co"])
        .await
        .expect("clone");
    let co = w.join("co");
    assert_eq!(
        std::fs::read_to_string(co.join("README.md")).expect("file"),
        "hello\n"
    );
    std::fs::write(co.join("new.txt"), "pushed\n").expect("write");
    let id = ["-c", "user.name=t", "-c", "user.email=t@example.com"];
    git.ok(&co, &["checkout", "-q", "-b", "orch/ORCH-9"])
        .await
        .expect("branch");
    git.ok(&co, &["add", "-A"]).await.expect("add");
    git.ok(
        &co,
        &[id[0], id[1], id[2], id[3], "commit", "-q", "-m", "push me"],
    )
    .await
    .expect("commit");
    git.ok(&co, &["push", "-q", "origin", "orch/ORCH-9"])
        .await
        .expect("push");
    assert_eq!(
        gitea.file(REPO, "orch/ORCH-9", "new.txt").await.as_deref(),
        Some("pushed\n")
    );
    let pushes = gitea.with(|d| {
        d.git_requests
            .iter()
            .filter(|r| r.starts_with("git-receive-pack orchestrator"))
            .count()
    });
    assert!(pushes >= 1, "{:?}", gitea.with(|d| d.git_requests.clone()));

    // Without the token, git is refused (401) and nothing is read.
    let out = Git::new()
        .with_timeout(Duration::from_secs(60))
        .run(w, &["clone", "-q", &url, "anon"])
        .await
        .expect("ran");
    assert!(!out.success(), "an anonymous clone must fail");
    assert!(!w.join("anon/README.md").exists());
    assert!(
        gitea
            .errors()
            .iter()
            .any(|e| e.starts_with("git git-upload-pack")),
        "{:?}",
        gitea.errors()
    );
}

#[tokio::test]
async fn reviews_are_sent_as_gitea_sends_them_and_read_back_by_the_forge_client() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gitea = started(dir.path()).await;
    let hook = Receiver::start().await;
    let f = client(&gitea, Some(TOKEN));
    let head = gitea
        .commit(
            REPO,
            "orch/ORCH-2",
            &[("greeter.py", "print('hi')\n")],
            "greet",
        )
        .await;
    f.ensure_pr(&repo(), "orch/ORCH-2", "main", "ORCH-2", "")
        .await
        .expect("PR");
    assert_eq!(f.list_pr_reviews(&repo(), 1).await.expect("none yet"), []);
    gitea.set_webhook(Some(Hook {
        url: hook.url.clone(),
        secret: Some(SECRET.into()),
    }));

    let (rejected, _) = gitea
        .submit_review(
            REPO,
            1,
            "ada",
            ReviewState::ChangesRequested,
            "Handle the empty name.",
            &[("greeter.py", 1, "An empty name falls through here.")],
        )
        .await;
    let (approved, _) = gitea
        .submit_review(
            REPO,
            1,
            "ada",
            ReviewState::Approved,
            "Now it is fine.",
            &[],
        )
        .await;

    let reviews = f.list_pr_reviews(&repo(), 1).await.expect("reviews");
    assert_eq!(reviews.len(), 2, "{reviews:?}");
    assert_eq!(
        (reviews[0].id, reviews[0].state, reviews[0].author.as_str()),
        (rejected, ReviewState::ChangesRequested, "ada")
    );
    assert_eq!(reviews[0].body, "Handle the empty name.");
    assert_eq!(reviews[0].commit_id, head);
    assert_eq!(
        (reviews[1].id, reviews[1].state),
        (approved, ReviewState::Approved)
    );
    let comments = f
        .list_review_comments(&repo(), 1, rejected)
        .await
        .expect("comments");
    assert_eq!(
        comments,
        [ReviewComment {
            author: "ada".into(),
            path: "greeter.py".into(),
            line: 1,
            body: "An empty name falls through here.".into(),
        }]
    );
    assert_eq!(
        f.list_review_comments(&repo(), 1, approved)
            .await
            .expect("none"),
        []
    );
    // An unknown review or PR is 404, as Gitea answers.
    assert!(matches!(
        f.list_review_comments(&repo(), 1, 999_999).await,
        Err(ForgeError::NotFound(_))
    ));
    assert!(matches!(
        f.list_pr_reviews(&repo(), 7).await,
        Err(ForgeError::NotFound(_))
    ));
    // The REST objects have the sample's keys.
    let raw: Value = reqwest::Client::new()
        .get(format!("{}/api/v1/repos/{REPO}/pulls/1/reviews", gitea.url))
        .header("Authorization", format!("token {TOKEN}"))
        .send()
        .await
        .expect("GET")
        .json()
        .await
        .expect("json");
    let sample = sample_json("gitea-api-pull-reviews.json").to_value();
    let keys = |v: &Value| {
        let mut k: Vec<String> = v
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default();
        k.sort();
        k
    };
    assert_eq!(keys(&raw[0]), keys(&sample[0]));

    // The webhooks: the event names of modules/webhook/type.go, signed, the sample's keys.
    let got = hook.wait_for(2).await;
    let want = [
        (
            "pull_request_rejected",
            "pull_request_review_rejected",
            "Handle the empty name.",
        ),
        (
            "pull_request_approved",
            "pull_request_review_approved",
            "Now it is fine.",
        ),
    ];
    let sample = sample_json("gitea-webhook-pull_request_review-rejected.json").to_value();
    for (r, (event, event_type, content)) in got.iter().zip(want) {
        assert_eq!(r.header("x-gitea-event"), event);
        assert_eq!(r.header("x-gitea-event-type"), event_type);
        assert_eq!(
            r.header("x-gitea-signature"),
            hmac_sha256_hex(SECRET.as_bytes(), &r.body)
        );
        let v: Value = serde_json::from_slice(&r.body).expect("json");
        assert_eq!(v["action"], "reviewed");
        assert_eq!(v["review"], json!({"type": event_type, "content": content}));
        assert_eq!(v["sender"]["login"], "ada");
        assert_eq!(v["requested_reviewer"]["login"], "ada");
        assert_eq!(v["pull_request"]["head"]["ref"], "orch/ORCH-2");
        assert_eq!(v["pull_request"]["merged"], false);
        assert_eq!(keys(&v), keys(&sample));
    }
    gitea.check();
}

#[tokio::test]
async fn commit_statuses_combine_as_gitea_combines_them_and_send_the_status_webhook() {
    let dir = tempfile::tempdir().expect("tempdir");
    let gitea = started(dir.path()).await;
    let hook = Receiver::start().await;
    let f = client(&gitea, Some(TOKEN));
    let head = gitea
        .commit(REPO, "orch/ORCH-3", &[("a.txt", "a\n")], "a")
        .await;
    // Nothing reported yet: pending, no contexts.
    let c = f
        .combined_status(&repo(), "orch/ORCH-3")
        .await
        .expect("status");
    assert_eq!((c.state, c.statuses.len()), (CiState::Pending, 0));
    assert_eq!(c.sha, head);
    gitea.set_webhook(Some(Hook {
        url: hook.url.clone(),
        secret: Some(SECRET.into()),
    }));
    let url = "https://ci.example.com/builds/1";
    gitea
        .set_status(
            REPO,
            &head,
            "ci-bot",
            ["ci/lint", "success", "lint ok", url],
        )
        .await;
    gitea
        .set_status(
            REPO,
            &head,
            "ci-bot",
            ["ci/build", "pending", "running", url],
        )
        .await;
    let c = f.combined_status(&repo(), &head).await.expect("status");
    assert_eq!(c.state, CiState::Pending);
    gitea
        .set_status(
            REPO,
            &head,
            "ci-bot",
            ["ci/build", "failure", "2 tests failed", url],
        )
        .await;
    let c = f
        .combined_status(&repo(), "orch/ORCH-3")
        .await
        .expect("status");
    assert_eq!(c.state, CiState::Failure);
    assert_eq!(
        c.statuses,
        [
            CommitStatus {
                context: "ci/lint".into(),
                state: CiState::Success,
                description: "lint ok".into(),
                target_url: url.into(),
            },
            CommitStatus {
                context: "ci/build".into(),
                state: CiState::Failure,
                description: "2 tests failed".into(),
                target_url: url.into(),
            },
        ]
    );
    gitea
        .set_status(REPO, &head, "ci-bot", ["ci/build", "success", "green", url])
        .await;
    let c = f.combined_status(&repo(), &head).await.expect("status");
    assert_eq!(c.state, CiState::Success);
    // The webhooks: `status`, signed, the sample's keys.
    let got = hook.wait_for(4).await;
    let sample = sample_json("gitea-webhook-status.json").to_value();
    let mut sample_keys: Vec<&String> = sample.as_object().expect("object").keys().collect();
    sample_keys.sort();
    for r in &got {
        assert_eq!(r.header("x-gitea-event"), "status");
        assert_eq!(
            r.header("x-gitea-signature"),
            hmac_sha256_hex(SECRET.as_bytes(), &r.body)
        );
        let v: Value = serde_json::from_slice(&r.body).expect("json");
        let mut keys: Vec<&String> = v.as_object().expect("object").keys().collect();
        keys.sort();
        assert_eq!(keys, sample_keys);
        assert_eq!(v["sha"], json!(head));
    }
    let last: Value = serde_json::from_slice(&got[3].body).expect("json");
    assert_eq!(
        (last["context"].as_str(), last["state"].as_str()),
        (Some("ci/build"), Some("success"))
    );
    gitea.check();
}
