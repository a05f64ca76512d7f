//! The multi-process harness itself (`orchestrator_testkit::procs`): every service in its
//! own `orchestrator serve` process, two launcher replicas on one queue, a service SIGKILLed
//! and restarted on its address.

use std::time::Duration;

use orchestrator_kit::clients::Clients;
use orchestrator_kit::db::Location;
use orchestrator_kit::{Config, Env};
use orchestrator_proto::launcher::v1::ListInstancesRequest;
use orchestrator_proto::stage_engine::v1::ListWorkItemsRequest;
use orchestrator_testkit::procs::{ProcStack, ProcStackSpec, launcher_name};
use orchestrator_testkit::{TestStorage, on_both_backends};

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");

/// A stack of processes on `storage`, with `launchers` launcher replicas.
pub(crate) async fn start(
    storage: &TestStorage,
    dir: &std::path::Path,
    launchers: usize,
    env: &[(&str, &str)],
) -> (ProcStack, Clients) {
    let mut spec = ProcStackSpec::new(BIN, dir).launchers(launchers);
    if let Location::Postgres(url) = &storage.location {
        spec = spec.postgres(url.expose());
    }
    for (k, v) in env {
        spec = spec.var(*k, *v);
    }
    let stack = ProcStack::start(spec).await.expect("the stack starts");
    let config = Config::from_env(Env::from_pairs(stack.client_env())).expect("client config");
    let clients = Clients::from_config(&config).expect("clients");
    (stack, clients)
}

async fn a_killed_service_comes_back_on_its_address(storage: TestStorage) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (mut stack, clients) = start(&storage, dir.path(), 2, &[]).await;
    assert_eq!(
        stack.names(),
        [
            "gateway",
            "launcher-0",
            "launcher-1",
            "merge-gate",
            "post-deploy",
            "reaper",
            "stage-engine",
            "usage-ledger"
        ]
    );

    // Both replicas register themselves on the one queue (their first heartbeat may come
    // a moment after `ready`).
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut ids: Vec<String> = clients
            .launcher
            .clone()
            .list_instances(ListInstancesRequest {})
            .await
            .expect("ListInstances")
            .into_inner()
            .instances
            .into_iter()
            .filter(|i| i.stopped_at_ms == 0)
            .map(|i| i.id)
            .collect();
        ids.sort();
        if ids == [launcher_name(0), launcher_name(1)] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "both replicas registered: {ids:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let list = || async {
        clients
            .stage_engine
            .clone()
            .list_work_items(ListWorkItemsRequest::default())
            .await
    };
    list().await.expect("stage-engine answers");
    stack.kill("stage-engine");
    assert!(!stack.is_running("stage-engine"));
    let err = list().await.expect_err("a killed service does not answer");
    // A fresh connection is refused (UNAVAILABLE); the kept one can break mid-call first
    // (UNKNOWN, "broken pipe") or find itself closed under the call (CANCELLED): either
    // way, no answer from a dead process.
    assert!(
        matches!(
            err.code(),
            tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
        ),
        "{err}"
    );
    stack.restart("stage-engine").await.expect("restart");
    list()
        .await
        .expect("the restarted stage-engine answers on its old address");

    for name in stack.names() {
        assert_eq!(
            stack.stop(&name, Duration::from_secs(5)),
            Some(0),
            "{name} exits 0 on SIGTERM:\n{}",
            stack.log(&name)
        );
        assert!(
            stack.log(&name).contains("ready"),
            "{name} logged its start:\n{}",
            stack.log(&name)
        );
    }
}

on_both_backends!(a_killed_service_comes_back_on_its_address);
