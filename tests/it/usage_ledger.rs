//! usage-ledger over gRPC: every real CLI sample in `shared/contracts/claude-cli/` recorded
//! and summed back, on SQLite and on PostgreSQL.

use std::collections::BTreeSet;

use orchestrator_proto::usage_ledger::v1::{
    ListRunsRequest, RecordRunRequest, RunKey, SpentSinceRequest, WorkItemCostsRequest,
    WorkItemSummaryRequest,
};
use orchestrator_testkit::{TestStorage, on_both_backends};
use serde_json::Value;
use tonic::Code;

use crate::common::{contracts_dir, start};

/// What each sample must record, read off the files by hand (and cross-checked with
/// python's json module): (file, result found, input, output, cache read, cache creation,
/// cost, is_error, subtype, api_error_status).
type Expect = (
    &'static str,
    bool,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<i64>,
    Option<f64>,
    Option<bool>,
    Option<&'static str>,
    Option<i32>,
);

const SAMPLES: &[Expect] = &[
    (
        "api_error_529_fixture.json",
        true,
        None,
        None,
        None,
        None,
        None,
        Some(true),
        Some("success"),
        Some(529),
    ),
    (
        "cli_internal_529_retry_lines.json",
        false,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    ),
    (
        "error_during_execution_fixture.json",
        true,
        None,
        None,
        None,
        None,
        None,
        Some(true),
        Some("error_during_execution"),
        None,
    ),
    (
        "error_max_turns_real.json",
        true,
        Some(35),
        Some(17055),
        Some(1383485),
        Some(51421),
        Some(1.4417997500000002),
        Some(true),
        Some("error_max_turns"),
        None,
    ),
    (
        "rate_limit_event_fixture.json",
        false,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    ),
    (
        "success_full_fieldset.json",
        true,
        Some(25457),
        Some(449),
        Some(128),
        Some(0),
        Some(0.15095600000000003),
        Some(false),
        Some("success"),
        None,
    ),
    (
        "success_truncated_by_reporter.json",
        true,
        None,
        Some(13),
        None,
        None,
        Some(0.079),
        Some(false),
        Some("success"),
        None,
    ),
    (
        "real-2.1.328/error-max-budget.stdout.json",
        true,
        Some(0),
        Some(0),
        Some(0),
        Some(0),
        Some(0.0095),
        Some(true),
        Some("error_max_budget_usd"),
        None,
    ),
    (
        "real-2.1.328/error-max-turns.stdout.json",
        true,
        Some(1200),
        Some(120),
        Some(4000),
        Some(300),
        Some(0.0095),
        Some(true),
        Some("error_max_turns"),
        None,
    ),
    (
        "real-2.1.328/invalid-key-401.stdout.json",
        true,
        Some(0),
        Some(0),
        Some(0),
        Some(0),
        Some(0.0),
        Some(true),
        Some("success"),
        Some(401),
    ),
    (
        "real-2.1.328/not-logged-in.stdout.json",
        true,
        Some(0),
        Some(0),
        Some(0),
        Some(0),
        Some(0.0),
        Some(true),
        Some("success"),
        None,
    ),
    (
        "real-2.1.328/overloaded-529.stdout.json",
        true,
        Some(0),
        Some(0),
        Some(0),
        Some(0),
        Some(0.0),
        Some(true),
        Some("success"),
        Some(529),
    ),
    (
        "real-2.1.328/permission-denied.stdout.json",
        true,
        Some(2400),
        Some(162),
        Some(8000),
        Some(600),
        Some(0.017439999999999997),
        Some(false),
        Some("success"),
        None,
    ),
    (
        "real-2.1.328/rate-limit-429.stdout.json",
        true,
        Some(0),
        Some(0),
        Some(0),
        Some(0),
        Some(0.0),
        Some(true),
        Some("success"),
        Some(429),
    ),
    (
        "real-2.1.328/spend-limit-429.stdout.json",
        true,
        Some(0),
        Some(0),
        Some(0),
        Some(0),
        Some(0.0),
        Some(true),
        Some("success"),
        Some(429),
    ),
    (
        "real-2.1.328/stop-hook-blocked-then-success.stdout.json",
        true,
        Some(300),
        Some(60),
        Some(0),
        Some(0),
        Some(0.0024000000000000002),
        Some(false),
        Some("success"),
        None,
    ),
    (
        "real-2.1.328/stop-hook-input.json",
        false,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
        None,
    ),
    (
        "real-2.1.328/stream-json.stdout.jsonl",
        true,
        Some(2400),
        Some(162),
        Some(8000),
        Some(600),
        Some(0.017439999999999997),
        Some(false),
        Some("success"),
        None,
    ),
    (
        "real-2.1.328/success-with-write-tool.stdout.json",
        true,
        Some(2400),
        Some(162),
        Some(8000),
        Some(600),
        Some(0.017439999999999997),
        Some(false),
        Some("success"),
        None,
    ),
    (
        "real-2.1.328/verbose-array.stdout.json",
        true,
        Some(2400),
        Some(162),
        Some(8000),
        Some(600),
        Some(0.017439999999999997),
        Some(false),
        Some("success"),
        None,
    ),
];

/// The run log a sample stands for. The older samples wrap the output: terminal lines
/// printed before the result (`raw_lines`), then the exact bytes (`raw`) or the parsed
/// object (`data`); the real-2.1.328 files are the CLI's stdout as it was.
fn log_of(rel: &str) -> String {
    let text = std::fs::read_to_string(contracts_dir().join("claude-cli").join(rel))
        .expect("sample readable");
    if rel.starts_with("real-") {
        return text;
    }
    let v: Value = serde_json::from_str(&text).expect("sample is JSON");
    let mut log = String::new();
    for line in v
        .get("raw_lines")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        log.push_str(line.as_str().unwrap_or_default());
        log.push('\n');
    }
    match (v.get("raw").and_then(Value::as_str), v.get("data")) {
        (Some(raw), _) => log.push_str(raw),
        (None, Some(data)) => log.push_str(&data.to_string()),
        (None, None) => {}
    }
    log
}

fn sample_files() -> BTreeSet<String> {
    let base = contracts_dir().join("claude-cli");
    let mut files = BTreeSet::new();
    for dir in [base.clone(), base.join("real-2.1.328")] {
        for entry in std::fs::read_dir(&dir).expect("samples dir").flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.ends_with(".json") || name.ends_with(".jsonl") {
                let rel = if dir == base {
                    name
                } else {
                    format!("real-2.1.328/{name}")
                };
                files.insert(rel);
            }
        }
    }
    files
}

#[test]
fn every_sample_in_the_contracts_has_an_expectation() {
    let expected: BTreeSet<String> = SAMPLES.iter().map(|s| s.0.to_owned()).collect();
    assert_eq!(
        sample_files(),
        expected,
        "a sample was added or removed: give it an expectation"
    );
}

async fn records_every_cli_sample_and_sums_them(storage: TestStorage) {
    let stack = start(storage, &[]).await;
    let mut ledger = stack.clients.usage_ledger.clone();
    let agents = ["analyst", "developer", "reviewer"];
    for (i, s) in SAMPLES.iter().enumerate() {
        let (file, found, input, output, read, creation, cost, is_error, subtype, status) = *s;
        let run = ledger
            .record_run(RecordRunRequest {
                job_id: format!("job-{i}"),
                attempt: 1,
                work_item: "ORCH-7".into(),
                agent: agents[i % agents.len()].into(),
                output: log_of(file),
                ..Default::default()
            })
            .await
            .unwrap_or_else(|e| panic!("{file}: {e}"))
            .into_inner()
            .run
            .expect("run");
        assert_eq!(run.result_found, found, "{file}: result_found");
        assert_eq!(run.input_tokens, input, "{file}: input");
        assert_eq!(run.output_tokens, output, "{file}: output");
        assert_eq!(run.cache_read_tokens, read, "{file}: cache read");
        assert_eq!(
            run.cache_creation_tokens, creation,
            "{file}: cache creation"
        );
        assert_eq!(run.total_cost_usd, cost, "{file}: cost");
        assert_eq!(run.is_error, is_error, "{file}: is_error");
        assert_eq!(run.subtype.as_deref(), subtype, "{file}: subtype");
        assert_eq!(run.api_error_status, status, "{file}: api_error_status");

        // What was stored is what is read back.
        let back = ledger
            .get_run(RunKey {
                job_id: format!("job-{i}"),
                attempt: 1,
            })
            .await
            .expect("get_run")
            .into_inner();
        assert_eq!(back, run, "{file}: stored and read back");
    }

    let summary = ledger
        .work_item_summary(WorkItemSummaryRequest {
            work_item: "ORCH-7".into(),
        })
        .await
        .expect("summary")
        .into_inner();
    let total = summary.total.expect("total");
    let sum =
        |f: fn(&Expect) -> Option<i64>| SAMPLES.iter().map(|s| f(s).unwrap_or(0)).sum::<i64>();
    assert_eq!(total.runs as usize, SAMPLES.len());
    assert_eq!(total.input_tokens, sum(|s| s.2));
    assert_eq!(total.output_tokens, sum(|s| s.3));
    assert_eq!(total.cache_read_tokens, sum(|s| s.4));
    assert_eq!(total.cache_creation_tokens, sum(|s| s.5));
    let cost: f64 = SAMPLES.iter().map(|s| s.6.unwrap_or(0.0)).sum();
    assert!(
        (total.total_cost_usd - cost).abs() < 1e-9,
        "{} vs {cost}",
        total.total_cost_usd
    );
    let without = SAMPLES
        .iter()
        .filter(|s| s.2.is_none() && s.3.is_none() && s.4.is_none() && s.5.is_none())
        .count();
    assert_eq!(total.runs_without_usage as usize, without);
    assert_eq!(
        summary
            .agents
            .iter()
            .map(|a| a.agent.as_str())
            .collect::<Vec<_>>(),
        agents
    );
    assert_eq!(
        summary.agents.iter().map(|a| a.runs).sum::<u32>() as usize,
        SAMPLES.len()
    );
    assert!(
        summary
            .text
            .starts_with("Usage for ORCH-7\nAnalyst · 7 runs · "),
        "{}",
        summary.text
    );
    assert!(summary.text.ends_with(&total.line), "{}", summary.text);

    // The dashboard's reads: every run back, newest first, and the same sum per item.
    ledger
        .record_run(RecordRunRequest {
            job_id: "other-1".into(),
            attempt: 1,
            work_item: "ORCH-8".into(),
            agent: "analyst".into(),
            output: log_of(SAMPLES[SAMPLES.len() - 1].0),
            resumed: false,
            repo: String::new(),
        })
        .await
        .expect("another item's run");
    let runs = ledger
        .list_runs(ListRunsRequest::default())
        .await
        .expect("list_runs")
        .into_inner()
        .runs;
    assert_eq!(runs.len(), SAMPLES.len() + 1);
    assert_eq!(runs[0].job_id, "other-1", "newest first");
    assert!(
        runs.windows(2)
            .all(|w| w[0].recorded_at_ms >= w[1].recorded_at_ms)
    );
    let limited = ledger
        .list_runs(ListRunsRequest {
            limit: 2,
            ..Default::default()
        })
        .await
        .expect("list_runs limited")
        .into_inner()
        .runs;
    assert_eq!(limited.len(), 2);
    let future = ledger
        .list_runs(ListRunsRequest {
            since_ms: runs[0].recorded_at_ms + 1,
            ..Default::default()
        })
        .await
        .expect("list_runs since")
        .into_inner()
        .runs;
    assert!(future.is_empty(), "{future:?}");
    let of_item = ledger
        .list_runs(ListRunsRequest {
            work_item: "ORCH-8".into(),
            ..Default::default()
        })
        .await
        .expect("list_runs of an item")
        .into_inner()
        .runs;
    assert_eq!(
        of_item
            .iter()
            .map(|r| r.job_id.as_str())
            .collect::<Vec<_>>(),
        ["other-1"]
    );
    let mut costs = ledger
        .work_item_costs(WorkItemCostsRequest::default())
        .await
        .expect("work_item_costs")
        .into_inner()
        .costs;
    costs.sort_by(|a, b| a.work_item.cmp(&b.work_item));
    assert_eq!(
        costs
            .iter()
            .map(|c| (c.work_item.as_str(), c.runs))
            .collect::<Vec<_>>(),
        [("ORCH-7", SAMPLES.len() as u32), ("ORCH-8", 1)]
    );
    assert!(
        (costs[0].total_cost_usd - total.total_cost_usd).abs() < 1e-9,
        "{} vs {}",
        costs[0].total_cost_usd,
        total.total_cost_usd
    );
    assert!((costs[1].total_cost_usd - SAMPLES[SAMPLES.len() - 1].6.unwrap_or(0.0)).abs() < 1e-9);
}

async fn record_run_is_idempotent_per_attempt(storage: TestStorage) {
    let stack = start(storage, &[]).await;
    let mut ledger = stack.clients.usage_ledger.clone();
    let log = log_of("real-2.1.328/success-with-write-tool.stdout.json");
    let req = |output: String, attempt| RecordRunRequest {
        job_id: "job-1".into(),
        attempt,
        work_item: "ORCH-9".into(),
        agent: "developer".into(),
        output,
        ..Default::default()
    };
    let first = ledger
        .record_run(req(log.clone(), 1))
        .await
        .expect("first")
        .into_inner();
    assert!(first.created);
    // A re-driven finalize records the same attempt again, perhaps with other output: the
    // first record stands.
    let again = ledger
        .record_run(req("garbage".into(), 1))
        .await
        .expect("again")
        .into_inner();
    assert!(!again.created);
    assert_eq!(again.run, first.run);
    let second = ledger
        .record_run(req(log, 2))
        .await
        .expect("attempt 2")
        .into_inner();
    assert!(second.created);

    let latest = ledger
        .get_run(RunKey {
            job_id: "job-1".into(),
            attempt: 0,
        })
        .await
        .expect("latest")
        .into_inner();
    assert_eq!(latest.attempt, 2);
    // The CLI session, for a retry to resume (#15).
    let sid = serde_json::from_str::<serde_json::Value>(&log_of(
        "real-2.1.328/success-with-write-tool.stdout.json",
    ))
    .expect("json")["session_id"]
        .as_str()
        .map(str::to_owned);
    assert!(sid.is_some());
    assert_eq!(latest.session_id, sid);
    let comment = ledger
        .finish_comment(RunKey {
            job_id: "job-1".into(),
            attempt: 1,
        })
        .await
        .expect("finish comment")
        .into_inner();
    // 2400 + 8000 + 600 = 11.0k in, 8.0k of it cached; 162 out; $0.017...
    assert_eq!(
        comment.text,
        "Developer done · 11.0k in (8.0k cached) / 162 out · $0.02"
    );
    let summary = ledger
        .work_item_summary(WorkItemSummaryRequest {
            work_item: "ORCH-9".into(),
        })
        .await
        .expect("summary")
        .into_inner();
    assert_eq!(
        summary.text,
        "Usage for ORCH-9\nDeveloper · 2 runs · 22.0k in (16.0k cached) / 324 out · $0.03\nTotal · 2 runs · 22.0k in (16.0k cached) / 324 out · $0.03"
    );
}

async fn bad_requests_name_the_field(storage: TestStorage) {
    let stack = start(storage, &[]).await;
    let mut ledger = stack.clients.usage_ledger.clone();
    let ok = RecordRunRequest {
        job_id: "j".into(),
        attempt: 1,
        work_item: "ORCH-1".into(),
        agent: "tester".into(),
        output: String::new(),
        ..Default::default()
    };
    for (field, req) in [
        (
            "job_id",
            RecordRunRequest {
                job_id: " ".into(),
                ..ok.clone()
            },
        ),
        (
            "work_item",
            RecordRunRequest {
                work_item: String::new(),
                ..ok.clone()
            },
        ),
        (
            "agent",
            RecordRunRequest {
                agent: String::new(),
                ..ok.clone()
            },
        ),
    ] {
        let err = ledger.record_run(req).await.expect_err(field);
        assert_eq!(err.code(), Code::InvalidArgument, "{field}");
        assert_eq!(err.message(), format!("{field} is required"));
    }
    let err = ledger
        .record_run(RecordRunRequest {
            agent: "x\u{7}".into(),
            ..ok.clone()
        })
        .await
        .expect_err("control character");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("agent:"), "{}", err.message());

    // Empty output is garbage, not an error: the run is recorded with unknown usage.
    let run = ledger
        .record_run(ok)
        .await
        .expect("empty output")
        .into_inner()
        .run
        .expect("run");
    assert!(!run.result_found);
    assert_eq!(run.input_tokens, None);

    let err = ledger
        .get_run(RunKey {
            job_id: "nope".into(),
            attempt: 1,
        })
        .await
        .expect_err("missing");
    assert_eq!(err.code(), Code::NotFound);
    let err = ledger
        .get_run(RunKey {
            job_id: String::new(),
            attempt: 1,
        })
        .await
        .expect_err("no id");
    assert_eq!(err.code(), Code::InvalidArgument);
    let err = ledger
        .work_item_summary(WorkItemSummaryRequest {
            work_item: String::new(),
        })
        .await
        .expect_err("no item");
    assert_eq!(err.message(), "work_item is required");
}

async fn an_empty_work_item_sums_to_zero_runs(storage: TestStorage) {
    let stack = start(storage, &[]).await;
    let summary = stack
        .clients
        .usage_ledger
        .clone()
        .work_item_summary(WorkItemSummaryRequest {
            work_item: "ORCH-404".into(),
        })
        .await
        .expect("summary")
        .into_inner();
    assert!(summary.agents.is_empty());
    assert_eq!(summary.total.expect("total").runs, 0);
    assert_eq!(
        summary.text,
        "Usage for ORCH-404\nTotal · 0 runs · usage unknown"
    );
}

async fn concurrent_records_are_each_stored_once(storage: TestStorage) {
    let stack = start(storage, &[]).await;
    let log = log_of("real-2.1.328/stream-json.stdout.jsonl");
    // 200 calls at once over 50 keys: calls share statements (group commit), and of the
    // four calls per key exactly one creates the run.
    let calls = (0..200).map(|i| {
        let mut ledger = stack.clients.usage_ledger.clone();
        let output = log.clone();
        tokio::spawn(async move {
            let r = ledger
                .record_run(RecordRunRequest {
                    job_id: format!("job-{}", i % 50),
                    attempt: 1,
                    work_item: "ORCH-50".into(),
                    agent: "developer".into(),
                    output,
                    ..Default::default()
                })
                .await
                .expect("record")
                .into_inner();
            (i % 50, r.created)
        })
    });
    let mut created = [0u32; 50];
    for call in calls.collect::<Vec<_>>() {
        let (key, was_created) = call.await.expect("task");
        created[key] += u32::from(was_created);
    }
    assert!(created.iter().all(|c| *c == 1), "{created:?}");
    let total = stack
        .clients
        .usage_ledger
        .clone()
        .work_item_summary(WorkItemSummaryRequest {
            work_item: "ORCH-50".into(),
        })
        .await
        .expect("summary")
        .into_inner()
        .total
        .expect("total");
    assert_eq!(total.runs, 50);
    assert_eq!(total.output_tokens, 50 * 162);
}

/// A resumed CLI session reports its cost over the whole session (seen with the real CLI
/// 2.1.328 in `qg_hook`'s resumed retry: 0.01538, then 0.03136), its tokens per run: the
/// second run is recorded at what it cost itself, and the item's total is the session's.
async fn a_resumed_session_is_not_counted_twice(storage: TestStorage) {
    let stack = start(storage, &[]).await;
    let mut ledger = stack.clients.usage_ledger.clone();
    let sample = log_of("real-2.1.328/success-with-write-tool.stdout.json");
    let with_cost = |cost: &str| {
        let mut v: Value = serde_json::from_str(&sample).expect("json");
        v["total_cost_usd"] = serde_json::from_str(cost).expect("number");
        v.to_string()
    };
    for (job, cost, resumed) in [("job-1", "0.01538", false), ("job-2", "0.03136", true)] {
        ledger
            .record_run(RecordRunRequest {
                job_id: job.into(),
                attempt: 1,
                work_item: "ORCH-12".into(),
                agent: "analyst".into(),
                output: with_cost(cost),
                resumed,
                repo: String::new(),
            })
            .await
            .expect("record");
    }
    let second = ledger
        .get_run(RunKey {
            job_id: "job-2".into(),
            attempt: 1,
        })
        .await
        .expect("run")
        .into_inner();
    let cost = second.total_cost_usd.expect("a cost");
    assert!((cost - 0.01598).abs() < 1e-9, "{cost}");
    let total = ledger
        .work_item_summary(WorkItemSummaryRequest {
            work_item: "ORCH-12".into(),
        })
        .await
        .expect("summary")
        .into_inner()
        .total
        .expect("total");
    assert!((total.total_cost_usd - 0.03136).abs() < 1e-9, "{total:?}");
    // Tokens are per run: both runs' counts, summed.
    assert_eq!(total.output_tokens, 2 * 162);
    // The same session id on a run that did not resume (a command that prints one id
    // every time) is never taken for a resume: its whole reported cost counts.
    ledger
        .record_run(RecordRunRequest {
            job_id: "job-3".into(),
            attempt: 1,
            work_item: "ORCH-12".into(),
            agent: "analyst".into(),
            output: with_cost("0.03136"),
            resumed: false,
            repo: String::new(),
        })
        .await
        .expect("record");
    let third = ledger
        .get_run(RunKey {
            job_id: "job-3".into(),
            attempt: 1,
        })
        .await
        .expect("run")
        .into_inner();
    assert_eq!(third.total_cost_usd, Some(0.03136));
}

/// The spending ceilings' sum (#18): the runs since a time, of one repository or all; a run
/// without a cost counts as a run and adds nothing; a bad repo is refused by name.
async fn spent_since_sums_by_time_and_repository(storage: TestStorage) {
    let stack = start(storage, &[]).await;
    let mut ledger = stack.clients.usage_ledger.clone();
    let sample = log_of("real-2.1.328/success-with-write-tool.stdout.json");
    let with_cost = |cost: &str| {
        let mut v: Value = serde_json::from_str(&sample).expect("json");
        v["total_cost_usd"] = serde_json::from_str(cost).expect("number");
        v.to_string()
    };
    let reader = ledger.clone();
    let spent = |since_ms: i64, repo: &str| {
        let mut ledger = reader.clone();
        let repo = repo.to_owned();
        async move {
            let r = ledger
                .spent_since(SpentSinceRequest { since_ms, repo })
                .await
                .expect("spent_since")
                .into_inner();
            (r.runs, r.total_cost_usd)
        }
    };
    assert_eq!(spent(0, "").await, (0, 0.0));
    for (job, repo, output) in [
        ("job-1", "acme/app", with_cost("0.25")),
        ("job-2", "acme/app", with_cost("0.5")),
        ("job-3", "acme/web", with_cost("1.25")),
        ("job-4", "", with_cost("2")),
        ("job-5", "acme/web", "no result at all".to_owned()),
    ] {
        ledger
            .record_run(RecordRunRequest {
                job_id: job.into(),
                attempt: 1,
                work_item: "ORCH-30".into(),
                agent: "developer".into(),
                output,
                resumed: false,
                repo: repo.into(),
            })
            .await
            .expect("record");
    }
    let (runs, all) = spent(0, "").await;
    assert_eq!(runs, 5);
    assert!((all - 4.0).abs() < 1e-9, "{all}");
    let (runs, app) = spent(0, "acme/app").await;
    assert_eq!(runs, 2);
    assert!((app - 0.75).abs() < 1e-9, "{app}");
    let (runs, web) = spent(0, "acme/web").await;
    assert_eq!(runs, 2, "the run without a cost is counted");
    assert!((web - 1.25).abs() < 1e-9, "{web}");
    let recorded = ledger
        .get_run(RunKey {
            job_id: "job-3".into(),
            attempt: 1,
        })
        .await
        .expect("run")
        .into_inner();
    assert_eq!(recorded.repo, "acme/web");
    // Nothing was recorded after now.
    let later = recorded.recorded_at_ms + 60_000;
    assert_eq!(spent(later, "").await, (0, 0.0));
    let err = ledger
        .spent_since(SpentSinceRequest {
            since_ms: 0,
            repo: "a\nb".into(),
        })
        .await
        .expect_err("a control character");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("repo:"), "{}", err.message());
}

on_both_backends!(
    spent_since_sums_by_time_and_repository,
    a_resumed_session_is_not_counted_twice,
    concurrent_records_are_each_stored_once,
    records_every_cli_sample_and_sums_them,
    record_run_is_idempotent_per_attempt,
    bad_requests_name_the_field,
    an_empty_work_item_sums_to_zero_runs,
);
