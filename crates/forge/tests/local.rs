//! The local forge on real bare repositories: a PR is a branch and a base, a merge is a real
//! three-way merge pinned to the tested head, never twice.

use std::path::Path;

use orchestrator_forge::local::LocalForge;
use orchestrator_forge::{Forge, ForgeError, MergeOutcome, PrState, RepoName};
use orchestrator_git::Git;

const ID: [&str; 4] = ["-c", "user.name=t", "-c", "user.email=t@example.com"];

/// Clones `bare`, commits `files` on `branch` (created from main when new) and pushes.
async fn push(bare: &Path, branch: &str, files: &[(&str, &str)]) -> String {
    let git = Git::new();
    let work = tempfile::tempdir().expect("tempdir");
    let w = work.path();
    git.ok(w, &["clone", "-q", &bare.display().to_string(), "."])
        .await
        .expect("clone");
    let exists = git
        .rev_parse(w, &format!("origin/{branch}"))
        .await
        .expect("rev-parse")
        .is_some();
    if exists {
        git.ok(w, &["checkout", "-q", branch])
            .await
            .expect("checkout");
    } else {
        git.ok(w, &["checkout", "-q", "-b", branch])
            .await
            .expect("checkout -b");
    }
    for (path, text) in files {
        let p = w.join(path);
        std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
        std::fs::write(&p, text).expect("write");
        git.ok(w, &["add", path]).await.expect("add");
    }
    git.ok(
        w,
        &[ID[0], ID[1], ID[2], ID[3], "commit", "-q", "-m", "change"],
    )
    .await
    .expect("commit");
    git.ok(w, &["push", "-q", "origin", branch])
        .await
        .expect("push");
    git.rev_parse(w, "HEAD")
        .await
        .expect("rev-parse")
        .expect("head")
}

async fn setup() -> (tempfile::TempDir, LocalForge, RepoName, std::path::PathBuf) {
    let dir = tempfile::tempdir().expect("tempdir");
    let forge = LocalForge::new(dir.path().join("forge"), "main".into());
    let repo = RepoName::parse("acme/app").expect("repo");
    let bare = forge.init_repo(&repo).await.expect("init");
    // init is idempotent.
    assert_eq!(forge.init_repo(&repo).await.expect("init again"), bare);
    (dir, forge, repo, bare)
}

#[tokio::test]
async fn a_pr_is_ensured_once_read_and_merged_once_at_the_tested_head() {
    let (_dir, forge, repo, bare) = setup().await;
    let head = push(
        &bare,
        "orch/ORCH-1",
        &[(
            "docs/work-items/ORCH-1/analysis.md",
            "---\nwork_item: ORCH-1\n---\nplan\n",
        )],
    )
    .await;

    let first = forge
        .ensure_pr(&repo, "orch/ORCH-1", "main", "ORCH-1", "")
        .await
        .expect("ensure");
    assert!(first.created);
    assert_eq!(first.pr.number, 1);
    assert_eq!(first.pr.head_sha, head);
    let again = forge
        .ensure_pr(&repo, "orch/ORCH-1", "main", "ORCH-1", "")
        .await
        .expect("ensure again");
    assert!(!again.created);
    assert_eq!(again.pr.number, 1);
    assert_eq!(
        forge
            .find_pr(&repo, "orch/ORCH-1", "main")
            .await
            .expect("find")
            .map(|p| p.number),
        Some(1)
    );
    assert_eq!(
        forge
            .find_pr(&repo, "orch/ORCH-2", "main")
            .await
            .expect("find"),
        None
    );

    let text = forge
        .read_file(&repo, "orch/ORCH-1", "docs/work-items/ORCH-1/analysis.md")
        .await
        .expect("read");
    assert_eq!(text.as_deref(), Some("---\nwork_item: ORCH-1\n---\nplan\n"));
    assert_eq!(
        forge
            .read_file(&repo, "orch/ORCH-1", "missing.md")
            .await
            .expect("read"),
        None
    );
    assert_eq!(
        forge
            .read_file(&repo, "no-such-branch", "a.md")
            .await
            .expect("read"),
        None
    );
    assert!(forge.read_file(&repo, "orch/ORCH-1", "../x").await.is_err());

    // Main moves on meanwhile (another file): the merge is a real three-way merge.
    push(&bare, "main", &[("other.txt", "x\n")]).await;
    // A head that is not the tested one is refused, and nothing is merged.
    let moved = forge
        .merge_pr(&repo, 1, "0000000000000000000000000000000000000001")
        .await
        .expect("merge");
    assert!(matches!(moved, MergeOutcome::HeadMoved { .. }), "{moved:?}");
    let merged = forge.merge_pr(&repo, 1, &head).await.expect("merge");
    let MergeOutcome::Merged {
        merge_sha: Some(sha),
    } = merged
    else {
        panic!("{merged:?}")
    };
    let git = Git::new();
    assert!(
        git.is_ancestor(&bare, &head, "main")
            .await
            .expect("ancestor")
    );
    assert_eq!(
        git.rev_parse(&bare, "main").await.expect("rev").as_deref(),
        Some(sha.as_str())
    );
    // Both parents' files are on main.
    assert!(
        forge
            .read_file(&repo, "main", "other.txt")
            .await
            .expect("read")
            .is_some()
    );
    assert!(
        forge
            .read_file(&repo, "main", "docs/work-items/ORCH-1/analysis.md")
            .await
            .expect("read")
            .is_some()
    );
    // Re-driving changes nothing.
    assert_eq!(
        forge.merge_pr(&repo, 1, &head).await.expect("again"),
        MergeOutcome::AlreadyMerged {
            merge_sha: Some(sha.clone())
        }
    );
    let pr = forge.get_pr(&repo, 1).await.expect("get").expect("pr");
    assert!(pr.merged);
    assert_eq!(pr.state, PrState::Closed);
    assert_eq!(pr.head_sha, head);
    assert_eq!(
        git.rev_parse(&bare, "main").await.expect("rev").as_deref(),
        Some(sha.as_str())
    );
}

#[tokio::test]
async fn conflicts_are_reported_and_nothing_is_merged() {
    let (_dir, forge, repo, bare) = setup().await;
    push(&bare, "main", &[("a.txt", "base\n")]).await;
    let head = push(&bare, "orch/ORCH-2", &[("a.txt", "branch\n")]).await;
    push(&bare, "main", &[("a.txt", "main\n")]).await;
    let before = Git::new().rev_parse(&bare, "main").await.expect("rev");
    forge
        .ensure_pr(&repo, "orch/ORCH-2", "main", "t", "")
        .await
        .expect("ensure");
    let out = forge.merge_pr(&repo, 1, &head).await.expect("merge");
    assert!(
        matches!(&out, MergeOutcome::Conflicts { detail } if detail.contains("a.txt")),
        "{out:?}"
    );
    assert_eq!(
        Git::new().rev_parse(&bare, "main").await.expect("rev"),
        before
    );
    assert!(
        !forge
            .get_pr(&repo, 1)
            .await
            .expect("get")
            .expect("pr")
            .merged
    );
}

#[tokio::test]
async fn concurrent_merges_of_one_pr_merge_once() {
    let (_dir, forge, repo, bare) = setup().await;
    let head = push(&bare, "orch/ORCH-3", &[("b.txt", "b\n")]).await;
    push(&bare, "main", &[("c.txt", "c\n")]).await;
    forge
        .ensure_pr(&repo, "orch/ORCH-3", "main", "t", "")
        .await
        .expect("ensure");
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let (f, r, h) = (forge.clone(), repo.clone(), head.clone());
        tasks.push(tokio::spawn(async move { f.merge_pr(&r, 1, &h).await }));
    }
    let mut merged = 0;
    for t in tasks {
        match t.await.expect("task").expect("merge") {
            MergeOutcome::Merged { .. } => merged += 1,
            MergeOutcome::AlreadyMerged { .. } => {}
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(merged, 1);
    // One merge commit on top of main: main's first parent is the old main.
    let parents = Git::new()
        .ok(&bare, &["rev-list", "--parents", "-n", "1", "main"])
        .await
        .expect("rev-list");
    assert_eq!(parents.split_whitespace().count(), 3, "{parents}");
}

#[tokio::test]
async fn unknown_repos_and_bad_names_are_refused() {
    let (_dir, forge, _repo, _bare) = setup().await;
    let other = RepoName::parse("acme/none").expect("repo");
    assert!(!forge.repo_exists(&other).await.expect("exists?"));
    assert!(
        forge
            .repo_exists(&RepoName::parse("acme/app").expect("repo"))
            .await
            .expect("exists?")
    );
    assert!(matches!(
        forge.get_pr(&other, 1).await,
        Err(ForgeError::NotFound(_))
    ));
    let repo = RepoName::parse("acme/app").expect("repo");
    assert!(matches!(
        forge.ensure_pr(&repo, "-x", "main", "t", "").await,
        Err(ForgeError::Invalid(_))
    ));
    assert!(matches!(
        forge.ensure_pr(&repo, "missing", "main", "t", "").await,
        Err(ForgeError::NotFound(_))
    ));
    assert!(forge.merge_pr(&repo, 1, "not-a-sha").await.is_err());
}

#[tokio::test]
async fn a_branch_head_is_read_from_loose_and_packed_refs_alike() {
    let (_dir, forge, repo, bare) = setup().await;
    let head = push(&bare, "orch/ORCH-9", &[("n.txt", "n\n")]).await;
    assert_eq!(
        forge.branch_head(&repo, "orch/ORCH-9").await.expect("head"),
        Some(head.clone())
    );
    // After `git pack-refs` the loose file is gone: packed-refs holds the answer.
    Git::new()
        .ok(&bare, &["pack-refs", "--all"])
        .await
        .expect("pack-refs");
    assert!(!bare.join("refs/heads/orch/ORCH-9").exists());
    assert_eq!(
        forge
            .branch_head(&repo, "orch/ORCH-9")
            .await
            .expect("packed"),
        Some(head)
    );
    assert_eq!(
        forge.branch_head(&repo, "orch/none").await.expect("none"),
        None
    );
    assert!(
        forge.branch_head(&repo, "../x").await.is_err(),
        "a bad name is refused"
    );
    let other = RepoName::parse("acme/none").expect("repo");
    assert!(forge.branch_head(&other, "main").await.is_err());
}
