//! Checkouts from the repository's mirror (#19): each job's checkout is exactly the head
//! the forge has for its branch, borrows the mirror's objects instead of copying them, and
//! a mirror that is stale (someone else pushed), emptied or broken still gives the right
//! checkout. Real git, a real bare repository as the forge, real agent processes.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{H, KEY, REPO};
use launcher::store::Status;
use orchestrator_forge::RepoName;
use orchestrator_testkit::TestStorage;

const SECS: Duration = Duration::from_secs(30);
const BRANCH: &str = "orch/ORCH-1";

/// The agent reports what it was given, then adds a file of its own (so the run pushes).
const AGENT: &str = r#"echo "HEAD $(git rev-parse HEAD)"
echo "BRANCH $(git symbolic-ref --short HEAD)"
echo "ALT $(cat .git/objects/info/alternates 2>/dev/null || echo none)"
echo "OWN $(find .git/objects -type f ! -path '*/info/*' | wc -l)"
git status --porcelain >/dev/null && echo "STATUS ok"
echo "$ORCH_JOB_ID" > "work-$ORCH_JOB_ID.txt"
cat {contracts}/real-2.1.328/success-with-write-tool.stdout.json"#;

fn said<'a>(log: &'a str, what: &str) -> &'a str {
    let prefix = format!("{what} ");
    log.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("the agent did not say {what}:\n{log}"))
        .trim()
}

fn git(dir: &Path, args: &[&str]) -> String {
    let out = std::process::Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .expect("git");
    assert!(
        out.status.success(),
        "git {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn forge_dir(h: &H) -> PathBuf {
    h.forge.repo_dir(&RepoName::parse(REPO).expect("repo"))
}

fn forge_head(h: &H) -> String {
    git(
        &forge_dir(h),
        &["rev-parse", &format!("refs/heads/{BRANCH}")],
    )
}

fn mirror_dir(h: &H) -> PathBuf {
    h.root.join("work/mirrors/acme--app.git")
}

/// Runs one developer job to its end; its log.
async fn run_job(h: &H) -> String {
    let payload = format!(r#"{{"branch":"{BRANCH}"}}"#);
    let job = h
        .enqueue_for(KEY, "developer", "development", &payload)
        .await;
    let done = h.wait_done(&job.id, SECS).await;
    let log = h.log(&done);
    assert_eq!(done.status, Status::Succeeded, "{log}");
    log
}

/// Someone else (a human) pushes a commit to the branch on the forge.
fn push_from_outside(h: &H, file: &str) -> String {
    let clone = h.root.join(format!("outside-{file}"));
    git(
        &h.root,
        &[
            "clone",
            "-q",
            "-b",
            BRANCH,
            &forge_dir(h).display().to_string(),
            &clone.display().to_string(),
        ],
    );
    std::fs::write(clone.join(file), "by hand\n").expect("write");
    git(&clone, &["add", file]);
    git(
        &clone,
        &[
            "-c",
            "user.name=Ada",
            "-c",
            "user.email=ada@example.invalid",
            "commit",
            "-q",
            "-m",
            "by hand",
        ],
    );
    git(&clone, &["push", "-q", "origin", BRANCH]);
    git(&clone, &["rev-parse", "HEAD"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkout_borrows_the_mirror_and_is_exactly_the_forge_head() {
    let h = H::start(TestStorage::sqlite(), AGENT, &[]).await;
    // The first run: the branch is new, made from the base.
    let first = run_job(&h).await;
    let base = git(&forge_dir(&h), &["rev-parse", "refs/heads/main"]);
    assert_eq!(said(&first, "HEAD"), base, "{first}");
    assert_eq!(said(&first, "BRANCH"), BRANCH);
    let objects = std::fs::canonicalize(mirror_dir(&h).join("objects")).expect("a mirror");
    assert_eq!(
        std::fs::canonicalize(said(&first, "ALT")).expect("alternates"),
        objects
    );
    assert_eq!(said(&first, "OWN"), "0", "no object copied: {first}");
    assert_eq!(said(&first, "STATUS"), "ok");
    let pushed = forge_head(&h);
    assert_ne!(pushed, base, "the first run pushed its work");

    // The second: at what the first pushed, found in the mirror (given it at delivery).
    assert_eq!(
        git(
            &mirror_dir(&h),
            &["rev-parse", &format!("refs/heads/{BRANCH}")]
        ),
        pushed,
        "the delivery gave the mirror its head"
    );
    let second = run_job(&h).await;
    assert_eq!(said(&second, "HEAD"), pushed, "{second}");
    assert_eq!(said(&second, "OWN"), "0", "{second}");
    assert!(
        git(&forge_dir(&h), &["ls-tree", "--name-only", "-r", BRANCH])
            .lines()
            .filter(|f| f.starts_with("work-"))
            .count()
            == 2,
        "both runs' work is on the forge"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_by_someone_else_is_in_the_next_checkout() {
    let h = H::start(TestStorage::sqlite(), AGENT, &[]).await;
    run_job(&h).await;
    let by_hand = push_from_outside(&h, "by-hand.txt");
    // The mirror does not know it yet: the checkout must not start from the old head.
    assert_ne!(
        git(
            &mirror_dir(&h),
            &["rev-parse", &format!("refs/heads/{BRANCH}")]
        ),
        by_hand
    );
    let log = run_job(&h).await;
    assert_eq!(said(&log, "HEAD"), by_hand, "{log}");
    assert!(forge_dir(&h).exists());
    let pushed = forge_head(&h);
    assert_eq!(
        git(&forge_dir(&h), &["rev-parse", &format!("{pushed}^")]),
        by_hand,
        "the run's work is on top of the human's"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_emptied_or_broken_mirror_still_gives_the_right_checkout() {
    let h = H::start(TestStorage::sqlite(), AGENT, &[]).await;
    run_job(&h).await;
    // Emptied: every object gone (a disk cleaned by hand); the refs say otherwise.
    let objects = mirror_dir(&h).join("objects");
    std::fs::remove_dir_all(&objects).expect("empty the mirror");
    std::fs::create_dir_all(objects.join("info")).expect("objects dir");
    let head = forge_head(&h);
    let log = run_job(&h).await;
    assert_eq!(said(&log, "HEAD"), head, "{log}");
    assert_eq!(said(&log, "STATUS"), "ok", "{log}");
    eprintln!("EMPTIED {log}");

    // Broken: the mirror is not a repository at all; the checkout fetches for itself.
    std::fs::remove_dir_all(mirror_dir(&h)).expect("remove the mirror");
    std::fs::create_dir_all(objects.join("info")).expect("a hollow mirror");
    std::fs::write(mirror_dir(&h).join("HEAD"), "garbage\n").expect("garbage");
    let head = forge_head(&h);
    let log = run_job(&h).await;
    assert_eq!(said(&log, "HEAD"), head, "{log}");
    assert_eq!(said(&log, "STATUS"), "ok", "{log}");
    assert_eq!(said(&log, "ALT"), "none", "fetched for itself: {log}");
    assert_ne!(said(&log, "OWN"), "0", "{log}");
}
