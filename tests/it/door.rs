//! Validation at the door (#20): what cannot work is refused when it is asked for, naming
//! the culprit, instead of failing later in a job.

use std::process::Stdio;

use crate::process::{local_forge_repo, orchestrator, read_addrs, run};

#[test]
fn item_create_with_a_repo_the_forge_does_not_have_fails_naming_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    local_forge_repo(dir.path(), "acme/app");
    let mut up = orchestrator(dir.path())
        .arg("up")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("up starts");
    let addrs = read_addrs(&mut up);
    let item = |args: &[&str]| {
        run(orchestrator(dir.path())
            .arg("item")
            .args(args)
            .env(
                "ORCH_STAGE_ENGINE_URL",
                format!("http://{}", addrs["stage-engine"]),
            )
            .env(
                "ORCH_USAGE_LEDGER_URL",
                format!("http://{}", addrs["usage-ledger"]),
            ))
    };
    let refused = item(&["create", "--repo", "qa/nosuch", "Nothing to work on"]);
    let created = item(&["create", "--repo", "acme/app", "Something to work on"]);
    let listed = item(&["list"]);
    let _ = up.kill();
    let _ = up.wait();
    assert_ne!(refused.0, 0, "{refused:?}");
    assert!(
        refused.2.contains("qa/nosuch") && refused.2.contains("does not exist"),
        "{refused:?}"
    );
    assert!(refused.1.is_empty(), "{refused:?}");
    assert_eq!(created.0, 0, "{created:?}");
    // The refused one took no key and left no item.
    assert!(created.1.starts_with("created LOCAL-1 "), "{created:?}");
    assert!(!listed.1.contains("Nothing to work on"), "{listed:?}");
}
