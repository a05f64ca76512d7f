//! `orchestrator item ...` (the local tracker's command line) against an in-process stack:
//! create, list, show (stage, history, comments, usage) and approve.

use orchestrator::item::{self, ItemCommand};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;
use orchestrator_testkit::{TestStorage, on_both_backends};

use crate::common::start;

const REPO: &str = "acme/app";

async fn create_list_show_and_approve(storage: TestStorage) {
    // The analyst keeps running while the test looks: the item stays active at analysis
    // (the default command, `claude`, is not on the tests' PATH: its run failed at once and
    // the item was blocked before the approvals below, sooner or later depending on speed).
    let stack = start(storage, &[("ORCH_AGENT_COMMAND", "sh -c 'sleep 30'")]).await;
    let c = &stack.clients;

    let out = item::list(c, None, None, None).await.expect("list");
    assert!(out.contains("(no work items)"), "{out}");

    let desc = tempfile::NamedTempFile::new().expect("tmp");
    std::fs::write(desc.path(), "Add a health endpoint.\n").expect("write");
    let out = item::run(
        c,
        ItemCommand::Create {
            repo: REPO.into(),
            title: "Health endpoint".into(),
            description: Some(desc.path().to_path_buf()),
            key: None,
        },
    )
    .await
    .expect("create");
    assert_eq!(
        out,
        "created LOCAL-1 (acme/app) at analysis on branch orch/LOCAL-1\n"
    );
    let out = item::create(c, REPO, "Second", "", None)
        .await
        .expect("create");
    assert!(out.starts_with("created LOCAL-2 "), "{out}");
    // An explicit key that exists creates nothing.
    let out = item::create(c, REPO, "Again", "", Some("LOCAL-1"))
        .await
        .expect("create");
    assert!(out.contains("already exists"), "{out}");
    // A bad repo is the caller's fault, named.
    let e = item::create(c, "../etc", "Bad", "", Some("DEMO-9"))
        .await
        .expect_err("bad repo");
    assert!(e.to_string().contains("repo"), "{e}");

    let out = item::list(c, None, None, None).await.expect("list");
    let keys: Vec<&str> = out
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .collect();
    assert_eq!(keys.len(), 2, "{out}");
    assert!(
        keys.contains(&"LOCAL-1") && keys.contains(&"LOCAL-2"),
        "{out}"
    );
    assert!(
        out.contains("Health endpoint") && out.contains("analysis"),
        "{out}"
    );
    let out = item::list(c, None, Some("review".into()), None)
        .await
        .expect("list");
    assert!(out.contains("(no work items)"), "{out}");

    // An agent run, as the launcher records it: show prints its usage.
    let output = r#"{"type":"result","subtype":"success","is_error":false,"total_cost_usd":0.0213,"usage":{"input_tokens":2400,"cache_read_input_tokens":8000,"cache_creation_input_tokens":600,"output_tokens":162}}"#;
    c.usage_ledger
        .clone()
        .record_run(RecordRunRequest {
            job_id: "job-1".into(),
            attempt: 1,
            work_item: "LOCAL-1".into(),
            agent: "analyst".into(),
            output: output.into(),
            ..Default::default()
        })
        .await
        .expect("record");

    // The stream bot's comment is delivered by the outbox: poll for it, with a deadline.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    let out = loop {
        let out = item::show(c, "LOCAL-1").await.expect("show");
        if out.contains("] stream: ") || std::time::Instant::now() > deadline {
            break out;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    };
    assert!(out.starts_with("LOCAL-1  Health endpoint\n"), "{out}");
    assert!(out.contains("stage:     analysis"), "{out}");
    assert!(
        out.contains("Description:\n  Add a health endpoint.\n"),
        "{out}"
    );
    assert!(
        out.contains("repo:      acme/app (branch orch/LOCAL-1)"),
        "{out}"
    );
    let history = out
        .split("\nHistory:\n")
        .nth(1)
        .and_then(|h| h.split("\nComments:").next())
        .expect("history section");
    assert!(history.contains("-> analysis"), "{out}");
    assert!(
        out.contains("Z] stream: "),
        "comment time as RFC 3339: {out}"
    );
    assert!(out.contains("Analyst"), "usage line missing: {out}");
    assert!(out.contains("$0.02"), "{out}");
    let e = item::show(c, "NOPE-1").await.expect_err("unknown");
    assert!(e.to_string().contains("NotFound"), "{e}");

    // A bot cannot approve; a human at `analysis` changes nothing either (the gate is not
    // waiting yet) — both answered, not errors, and the item stays where it is.
    let out = item::approve(c, "LOCAL-1", "reviewer")
        .await
        .expect("approve");
    assert!(out.contains("approved by reviewer: unchanged"), "{out}");
    let out = item::approve(c, "LOCAL-1", "ada").await.expect("approve");
    assert!(out.contains("approved by ada: unchanged"), "{out}");
    assert!(out.contains("now at analysis"), "{out}");
    let e = item::approve(c, "NOPE-1", "ada")
        .await
        .expect_err("unknown");
    assert!(e.to_string().starts_with("Approve: NotFound"), "{e}");
}

on_both_backends!(create_list_show_and_approve);
