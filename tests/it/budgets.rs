//! The spending ceilings (#18) in the whole stack: usage-ledger's real `SpentSince` over
//! the runs recorded with their repository, the launcher holding an LLM launch back with
//! the reason, and the gateway's `GET /queue` and `/metrics` showing each ceiling and its
//! spend; the operator's `orchestrator budget set` raising a ceiling at run time.

use std::time::{Duration, Instant};

use orchestrator_kit::ServiceName;
use orchestrator_proto::launcher::v1::{EnqueueRequest, GetJobRequest, JobStatus};
use orchestrator_proto::usage_ledger::v1::RecordRunRequest;
use orchestrator_testkit::{TestStorage, on_both_backends};
use serde_json::Value;

use crate::common::{contracts_dir, start};

async fn get(addr: &str, path: &str) -> String {
    reqwest::get(format!("http://{addr}{path}"))
        .await
        .expect(path)
        .text()
        .await
        .expect("text")
}

async fn a_reached_ceiling_holds_the_launch_and_shows_in_queue_and_metrics(storage: TestStorage) {
    let stack = start(
        storage,
        &[
            ("ORCH_BUDGET_DAILY_USD", "0.01"),
            ("ORCH_BUDGET_MONTHLY_USD_JSON", r#"{"acme/app": 1}"#),
            ("ORCH_BUDGET_RECHECK_S", "0.2"),
            // Were the launch not held, this agent would be running.
            ("ORCH_AGENT_COMMAND", "sh -c 'sleep 300'"),
        ],
    )
    .await;
    let addr = stack.config.listen[&ServiceName::Gateway].to_string();
    // One run of acme/app today, at $0.01744 (a real CLI result), over the $0.01 a day.
    let output = std::fs::read_to_string(
        contracts_dir().join("claude-cli/real-2.1.328/success-with-write-tool.stdout.json"),
    )
    .expect("sample");
    stack
        .clients
        .usage_ledger
        .clone()
        .record_run(RecordRunRequest {
            job_id: "earlier-1".into(),
            attempt: 1,
            work_item: "ORCH-1".into(),
            agent: "developer".into(),
            output,
            resumed: false,
            repo: "acme/app".into(),
        })
        .await
        .expect("record");
    let job = stack
        .clients
        .launcher
        .clone()
        .enqueue(EnqueueRequest {
            work_item: "ORCH-2".into(),
            repo: "acme/app".into(),
            agent: "developer".into(),
            stage: "development".into(),
            ..EnqueueRequest::default()
        })
        .await
        .expect("enqueue")
        .into_inner()
        .job
        .expect("job");
    let deadline = Instant::now() + Duration::from_secs(20);
    let waiting = loop {
        let j = stack
            .clients
            .launcher
            .clone()
            .get_job(GetJobRequest {
                job_id: job.id.clone(),
            })
            .await
            .expect("job")
            .into_inner();
        if j.outcome == "budget_ceiling" && j.attempt >= 2 {
            break j;
        }
        assert!(Instant::now() < deadline, "not held: {j:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(waiting.status, JobStatus::Queued as i32, "{waiting:#?}");
    assert!(
        waiting
            .reason
            .starts_with("the daily spending ceiling is reached: $0.0174 spent of $0.01 since "),
        "{}",
        waiting.reason
    );

    let q: Value = serde_json::from_str(&get(&addr, "/queue").await).expect("json");
    let budget = &q["launcher"]["budget"];
    assert_eq!(budget["waiting"], 1, "{q}");
    let ceilings = budget["ceilings"].as_array().expect("ceilings");
    assert_eq!(ceilings.len(), 2, "{budget}");
    let daily = &ceilings[0];
    assert_eq!(
        (&daily["period"], &daily["repo"], &daily["reached"]),
        (&Value::from("daily"), &Value::Null, &Value::from(true)),
        "{budget}"
    );
    assert!((daily["spent_usd"].as_f64().expect("spent") - 0.01744).abs() < 1e-9);
    let monthly = &ceilings[1];
    assert_eq!(
        (&monthly["period"], &monthly["repo"], &monthly["reached"]),
        (
            &Value::from("monthly"),
            &Value::from("acme/app"),
            &Value::from(false)
        ),
        "{budget}"
    );

    let m = get(&addr, "/metrics").await;
    for line in [
        "orchestrator_llm_jobs_waiting_for_budget 1\n",
        "orchestrator_budget_ceiling_usd{period=\"daily\",repo=\"\"} 0.01\n",
        "orchestrator_budget_ceiling_usd{period=\"monthly\",repo=\"acme/app\"} 1\n",
        "orchestrator_budget_spent_usd{period=\"monthly\",repo=\"acme/app\"} 0.017",
    ] {
        assert!(m.contains(line), "{line:?} not in\n{m}");
    }

    // The operator raises the daily ceiling at run time with the CLI (`orchestrator budget
    // set --daily 1`): the launch goes, no restart; `GET /queue` shows where it comes from.
    let out = orchestrator::budget::run(
        &stack.clients,
        orchestrator::budget::BudgetCommand::Set {
            daily: Some(1.0),
            monthly: None,
            repo: None,
            clear: false,
        },
    )
    .await
    .expect("budget set");
    assert!(
        out.contains("daily $1.00 for every repository (SetSpendingCeiling)"),
        "{out}"
    );
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let j = stack
            .clients
            .launcher
            .clone()
            .get_job(GetJobRequest {
                job_id: job.id.clone(),
            })
            .await
            .expect("job")
            .into_inner();
        if j.status == JobStatus::Running as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "not launched: {j:#?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let q: Value = serde_json::from_str(&get(&addr, "/queue").await).expect("json");
    let budget = &q["launcher"]["budget"];
    assert_eq!(budget["waiting"], 0, "{q}");
    let daily = &budget["ceilings"][0];
    assert_eq!(
        (&daily["ceiling_usd"], &daily["source"], &daily["reached"]),
        (
            &Value::from(1.0),
            &Value::from("SetSpendingCeiling"),
            &Value::from(false)
        ),
        "{budget}"
    );
    assert_eq!(
        budget["ceilings"][1]["source"],
        "ORCH_BUDGET_MONTHLY_USD_JSON"
    );
}

on_both_backends!(a_reached_ceiling_holds_the_launch_and_shows_in_queue_and_metrics);
