//! `GET /queue`: the operator's window. It gathers the launcher's queue, the reaper's
//! snapshot, stage-engine's (work items by status, stall watchdog firings), the open
//! post-deploy watches and the inbox; a part that cannot be read shows
//! its error in place, and the rest is still served.

use std::time::Instant;

use orchestrator_kit::time::now_ms;
use orchestrator_proto::launcher::v1::{
    AgentCommand, Job, JobKind, JobStatus, QueueSnapshotRequest, QueueSnapshotResponse, Sandbox,
};
use orchestrator_proto::post_deploy::v1::{ListWatchesRequest, Watch};
use orchestrator_proto::reaper::v1::{ReaperSnapshot, SnapshotRequest};
use orchestrator_proto::stage_engine::v1::{
    SnapshotRequest as StageEngineSnapshotRequest, StageEngineSnapshot,
};
use serde_json::{Value, json};

use crate::Shared;
use crate::inbox;

/// How many dead letters `GET /queue` lists (the newest first).
pub const DEAD_LETTERS_SHOWN: u32 = 50;

/// The whole `GET /queue` document.
pub(crate) async fn snapshot(shared: &Shared) -> Value {
    let (launcher, reaper, stage_engine, watches, inbox) = tokio::join!(
        launcher_snapshot(shared),
        reaper_snapshot(shared),
        stage_engine_snapshot(shared),
        open_watches(shared),
        inbox_part(shared),
    );
    json!({
        "generated_at_ms": now_ms(),
        "launcher": launcher.map(|s| launcher_json(&s)).unwrap_or_else(|e| e),
        "reaper": reaper.map(|s| reaper_json(&s)).unwrap_or_else(|e| e),
        "stage_engine": stage_engine.map(|s| stage_engine_json(&s)).unwrap_or_else(|e| e),
        "post_deploy": watches
            .map(|w| json!({ "open_watches": w.iter().map(watch_json).collect::<Vec<_>>() }))
            .unwrap_or_else(|e| e),
        "inbox": inbox,
    })
}

/// The launcher's QueueSnapshot, or the error as JSON.
pub(crate) async fn launcher_snapshot(shared: &Shared) -> Result<QueueSnapshotResponse, Value> {
    let started = Instant::now();
    let res = shared
        .clients
        .launcher
        .clone()
        .queue_snapshot(QueueSnapshotRequest {})
        .await;
    record(shared, "QueueSnapshot", &res, started);
    res.map(tonic::Response::into_inner).map_err(error_json)
}

/// stage-engine's Snapshot, or the error as JSON.
pub(crate) async fn stage_engine_snapshot(shared: &Shared) -> Result<StageEngineSnapshot, Value> {
    let started = Instant::now();
    let res = shared
        .clients
        .stage_engine
        .clone()
        .snapshot(StageEngineSnapshotRequest {})
        .await;
    // Qualified: the reaper's `Snapshot` has the same name.
    record(shared, "StageEngine.Snapshot", &res, started);
    res.map(tonic::Response::into_inner).map_err(error_json)
}

async fn reaper_snapshot(shared: &Shared) -> Result<ReaperSnapshot, Value> {
    let started = Instant::now();
    let res = shared
        .clients
        .reaper
        .clone()
        .snapshot(SnapshotRequest {})
        .await;
    record(shared, "Snapshot", &res, started);
    res.map(tonic::Response::into_inner).map_err(error_json)
}

async fn open_watches(shared: &Shared) -> Result<Vec<Watch>, Value> {
    let started = Instant::now();
    let res = shared
        .clients
        .post_deploy
        .clone()
        .list_watches(ListWatchesRequest {
            state: "watching".to_owned(),
            ..Default::default()
        })
        .await;
    record(shared, "ListWatches", &res, started);
    res.map(|r| r.into_inner().watches).map_err(error_json)
}

async fn inbox_part(shared: &Shared) -> Value {
    let counts = inbox::counts(&shared.db).await;
    let dead = inbox::dead_letters(&shared.db, DEAD_LETTERS_SHOWN).await;
    match (counts, dead) {
        (Ok(c), Ok(dead)) => json!({
            "pending": c.pending,
            "applied": c.applied,
            "ignored": c.ignored,
            "dead": c.dead,
            "oldest_pending_age_ms": c.oldest_pending_received_at_ms.map(|t| (now_ms() - t).max(0)),
            "dead_letters": dead,
        }),
        (Err(e), _) | (_, Err(e)) => {
            tracing::warn!(error = %e, "cannot read the inbox for /queue");
            json!({ "error": { "code": "INTERNAL", "message": "gateway storage error" } })
        }
    }
}

fn record<T>(shared: &Shared, rpc: &'static str, res: &Result<T, tonic::Status>, started: Instant) {
    let code = match res {
        Ok(_) => tonic::Code::Ok,
        Err(s) => s.code(),
    };
    shared
        .metrics
        .rpc(rpc, format!("{code:?}"), started.elapsed());
}

/// `{"error": {"code": "UNIMPLEMENTED", "message": ...}}`.
pub fn error_json(s: tonic::Status) -> Value {
    json!({ "error": { "code": code_name(s.code()), "message": s.message() } })
}

/// The canonical gRPC name of a code, e.g. `DEADLINE_EXCEEDED`.
pub fn code_name(code: tonic::Code) -> String {
    let debug = format!("{code:?}");
    let mut out = String::with_capacity(debug.len() + 4);
    for (i, c) in debug.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

fn status_name(s: i32) -> &'static str {
    JobStatus::try_from(s)
        .map(|s| s.as_str_name())
        .unwrap_or("JOB_STATUS_UNSPECIFIED")
}

/// A job as JSON, enums by name.
pub fn job_json(j: &Job) -> Value {
    json!({
        "id": j.id,
        "work_item": j.work_item,
        "repo": j.repo,
        "agent": j.agent,
        "stage": j.stage,
        "kind": JobKind::try_from(j.kind).map(|k| k.as_str_name()).unwrap_or("JOB_KIND_UNSPECIFIED"),
        "status": status_name(j.status),
        "attempt": j.attempt,
        "max_attempts": j.max_attempts,
        "transient_attempts": j.transient_attempts,
        "not_before_ms": j.not_before_ms,
        "instance_id": j.instance_id,
        "pid": j.pid,
        "exit_code": j.exit_code,
        "enqueued_at_ms": j.enqueued_at_ms,
        "started_at_ms": j.started_at_ms,
        "heartbeat_at_ms": j.heartbeat_at_ms,
        "finished_at_ms": j.finished_at_ms,
        "outcome": j.outcome,
        "reason": j.reason,
        "qg_hook_blocks": j.qg_hook_blocks,
    })
}

/// The launcher's snapshot as JSON: counts by status name, running jobs with their age.
pub fn launcher_json(s: &QueueSnapshotResponse) -> Value {
    let counts: serde_json::Map<String, Value> = s
        .counts
        .iter()
        .map(|c| (status_name(c.status).to_owned(), json!(c.count)))
        .collect();
    json!({
        "counts": counts,
        "running": s.running.iter().map(|r| {
            let mut j = r.job.as_ref().map(job_json).unwrap_or_else(|| json!({}));
            j["age_ms"] = json!(r.age_ms);
            j
        }).collect::<Vec<_>>(),
        "llm_running": s.llm_running,
        "max_concurrency": s.max_concurrency,
        "agent_command": match s.agent_command() {
            AgentCommand::Found => "found",
            AgentCommand::NotFound => "not found",
            AgentCommand::Unspecified => "unknown",
        },
        "sandbox": match s.sandbox() {
            Sandbox::On => "on",
            Sandbox::Unavailable => "unavailable",
            Sandbox::Off => "off",
            Sandbox::Unspecified => "unknown",
        },
        "breaker": s.breaker.as_ref().map(|b| json!({
            "state": b.state,
            "consecutive_transient": b.consecutive_transient,
            "open_until_ms": b.open_until_ms,
        })),
        // The launcher's outbox: the end of runs waiting for a peer, and dead letters.
        "outbox": {"pending": s.outbox_pending, "failed": s.outbox_failed},
        // The spending ceilings (#18): each with its spend, and the LLM jobs waiting.
        "budget": {
            "ceilings": s.budget_ceilings.iter().map(|c| json!({
                "period": c.period,
                "repo": if c.repo.is_empty() { Value::Null } else { json!(c.repo) },
                "ceiling_usd": c.ceiling_usd,
                "spent_usd": c.spent_usd,
                "reached": c.spent_usd.map(|spent| spent >= c.ceiling_usd),
                "resets_at_ms": c.resets_at_ms,
                // The variable, or "SetSpendingCeiling" when raised (or set) at run time.
                "source": c.source,
            })).collect::<Vec<_>>(),
            "waiting": s.budget_waiting,
        },
    })
}

/// stage-engine's snapshot as JSON: work items by status, watchdog firings by reason.
pub fn stage_engine_json(s: &StageEngineSnapshot) -> Value {
    let items: serde_json::Map<String, Value> = s
        .items
        .iter()
        .map(|c| (c.status.clone(), json!(c.count)))
        .collect();
    let firings: serde_json::Map<String, Value> = s
        .stall_watchdog_firings
        .iter()
        .map(|f| (f.reason.clone(), json!(f.count)))
        .collect();
    json!({ "work_items": items, "stall_watchdog_firings": firings })
}

pub fn reaper_json(s: &ReaperSnapshot) -> Value {
    json!({
        "enabled": s.enabled,
        "interval_s": s.interval_s,
        "dead_ticks": s.dead_ticks,
        "max_running_s": s.max_running_s,
        "lease_reclaim_enabled": s.lease_reclaim_enabled,
        "ticks": s.ticks,
        "last_tick_at_ms": s.last_tick_at_ms,
        "flips_dead_pid": s.flips_dead_pid,
        "flips_exit_code": s.flips_exit_code,
        "flips_backstop": s.flips_backstop,
        "leases_reclaimed": s.leases_reclaimed,
        "errors": s.errors,
        "last_error": s.last_error,
    })
}

pub fn watch_json(w: &Watch) -> Value {
    json!({
        "work_item": w.work_item,
        "repo": w.repo,
        "deployed_sha": w.deployed_sha,
        "previous_sha": w.previous_sha,
        "armed_at_ms": w.armed_at_ms,
        "window_end_ms": w.window_end_ms,
        "consecutive_health_failures": w.consecutive_health_failures,
        "consecutive_probe_errors": w.consecutive_probe_errors,
        "state": w.state,
        "last_action": w.last_action,
        "closed_at_ms": w.closed_at_ms,
        "self_repo": w.self_repo,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use orchestrator_proto::launcher::v1::{BreakerState, BudgetCeiling, RunningJob, StatusCount};

    #[test]
    fn code_names_are_canonical() {
        assert_eq!(code_name(tonic::Code::Unimplemented), "UNIMPLEMENTED");
        assert_eq!(
            code_name(tonic::Code::DeadlineExceeded),
            "DEADLINE_EXCEEDED"
        );
        assert_eq!(code_name(tonic::Code::Ok), "OK");
    }

    #[test]
    fn the_launcher_snapshot_reads_by_name() {
        let s = QueueSnapshotResponse {
            counts: vec![StatusCount {
                status: JobStatus::Queued as i32,
                count: 3,
            }],
            running: vec![RunningJob {
                job: Some(Job {
                    id: "j1".into(),
                    status: JobStatus::Running as i32,
                    kind: JobKind::Llm as i32,
                    ..Job::default()
                }),
                age_ms: 1500,
            }],
            llm_running: 1,
            max_concurrency: 2,
            breaker: Some(BreakerState {
                state: "closed".into(),
                ..BreakerState::default()
            }),
            agent_command: AgentCommand::Unspecified as i32,
            sandbox: Sandbox::Unspecified as i32,
            outbox_pending: 2,
            outbox_failed: 1,
            budget_ceilings: vec![
                BudgetCeiling {
                    period: "daily".into(),
                    repo: String::new(),
                    ceiling_usd: 5.0,
                    spent_usd: Some(5.5),
                    resets_at_ms: 86_400_000,
                    source: "SetSpendingCeiling".into(),
                },
                BudgetCeiling {
                    period: "monthly".into(),
                    repo: "acme/app".into(),
                    ceiling_usd: 50.0,
                    spent_usd: None,
                    resets_at_ms: 2_678_400_000,
                    source: "ORCH_BUDGET_MONTHLY_USD_JSON".into(),
                },
            ],
            budget_waiting: 4,
        };
        let v = launcher_json(&s);
        assert_eq!(v["budget"]["waiting"], 4);
        assert_eq!(v["budget"]["ceilings"][0]["period"], "daily");
        assert_eq!(v["budget"]["ceilings"][0]["repo"], Value::Null);
        assert_eq!(v["budget"]["ceilings"][0]["spent_usd"], 5.5);
        assert_eq!(v["budget"]["ceilings"][0]["reached"], true);
        assert_eq!(v["budget"]["ceilings"][1]["repo"], "acme/app");
        assert_eq!(v["budget"]["ceilings"][1]["spent_usd"], Value::Null);
        assert_eq!(v["budget"]["ceilings"][0]["source"], "SetSpendingCeiling");
        assert_eq!(
            v["budget"]["ceilings"][1]["source"],
            "ORCH_BUDGET_MONTHLY_USD_JSON"
        );
        assert_eq!(v["budget"]["ceilings"][1]["reached"], Value::Null);
        assert_eq!(v["counts"]["QUEUED"], 3);
        assert_eq!(v["running"][0]["id"], "j1");
        assert_eq!(v["running"][0]["status"], "RUNNING");
        assert_eq!(v["running"][0]["kind"], "LLM");
        assert_eq!(v["running"][0]["age_ms"], 1500);
        assert_eq!(v["breaker"]["state"], "closed");
        assert_eq!(v["outbox"]["pending"], 2);
        assert_eq!(v["outbox"]["failed"], 1);
        assert_eq!(v["agent_command"], "unknown");
        let missing = QueueSnapshotResponse {
            agent_command: AgentCommand::NotFound as i32,
            ..s
        };
        assert_eq!(launcher_json(&missing)["agent_command"], "not found");
        assert_eq!(v["sandbox"], "unknown");
        for (state, shown) in [
            (Sandbox::On, "on"),
            (Sandbox::Unavailable, "unavailable"),
            (Sandbox::Off, "off"),
        ] {
            let s = QueueSnapshotResponse {
                sandbox: state as i32,
                ..missing.clone()
            };
            assert_eq!(launcher_json(&s)["sandbox"], shown);
        }
    }

    #[test]
    fn the_stage_engine_snapshot_reads_by_name() {
        use orchestrator_proto::stage_engine::v1::{ItemCount, StallFiring};
        let v = stage_engine_json(&StageEngineSnapshot {
            items: vec![ItemCount {
                status: "blocked".into(),
                count: 2,
            }],
            stall_watchdog_firings: vec![StallFiring {
                reason: "no_job".into(),
                count: 1,
            }],
        });
        assert_eq!(v["work_items"]["blocked"], 2);
        assert_eq!(v["stall_watchdog_firings"]["no_job"], 1);
    }
}
