//! `orchestrator inbox dead` and `inbox retry` as an operator runs them (#17), on a real
//! dead letter: a Gitea delivery the gateway accepted and gave up on (stage-engine was
//! unreachable, one attempt allowed), in the gateway's own SQLite storage.

use std::time::{Duration, Instant};

use gateway::{Gateway, GatewayConfig, inbox};
use orchestrator_kit::clients::Clients;
use orchestrator_kit::db::{self, Location};
use orchestrator_kit::{Config, Env, ServiceName};
use tokio_util::sync::CancellationToken;

use crate::common::contracts_dir;
use crate::process::{orchestrator, run};

const SECRET: &str = "contract-test-secret";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_lists_and_retries_an_inbox_dead_letter() {
    let root = tempfile::tempdir().expect("root");
    let var = root.path().join("var");
    db::ensure_data_dir(&var).expect("data dir");
    let storage = db::open(
        ServiceName::Gateway,
        &Location::SqliteDir(var.clone()),
        &gateway::MIGRATOR,
    )
    .await
    .expect("gateway storage");
    // stage-engine on a port nobody listens on: every attempt fails, and one is allowed.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let env = Env::from_pairs([
        ("GITEA_WEBHOOK_SECRET", SECRET.to_owned()),
        ("ORCH_GATEWAY_DISPATCH_MAX_ATTEMPTS", "1".to_owned()),
        ("ORCH_STAGE_ENGINE_URL", format!("http://{closed}")),
        ("ORCH_RPC_TIMEOUT_MS", "500".to_owned()),
    ]);
    let config = GatewayConfig::from_env(&env).expect("gateway config");
    let clients = Clients::from_config(&Config::from_env(env).expect("config")).expect("clients");
    let gw = Gateway::new(storage.clone(), config, clients);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let stop = CancellationToken::new();
    let served = tokio::spawn(gateway::serve(listener, gw, stop.clone()));

    let body = std::fs::read(contracts_dir().join("gitea-webhook-pull_request-closed-merged.json"))
        .expect("sample");
    let res = reqwest::Client::new()
        .post(format!("http://{addr}/webhooks/gitea"))
        .header("content-type", "application/json")
        .header("x-gitea-delivery", "cli-dead-1")
        .header("x-gitea-event", "pull_request")
        .header("x-gitea-event-type", "pull_request")
        .header(
            "x-gitea-signature",
            gateway::signature::sign(SECRET.as_bytes(), &body),
        )
        .body(body)
        .send()
        .await
        .expect("post");
    assert!(res.status().is_success(), "{}", res.status());
    let started = Instant::now();
    let dead = loop {
        let d = inbox::get(&storage, "gitea", "cli-dead-1")
            .await
            .expect("get")
            .expect("stored");
        if d.state == "dead" {
            break d;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never dead: {d:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    stop.cancel();
    served.await.expect("join").expect("served");

    let dir = root.path().to_owned();
    let (code, out, err) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || run(orchestrator(&dir).args(["inbox", "dead"]))
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains(&dead.id) && out.contains("gitea pull_request") && out.contains("1 attempt"),
        "{out}"
    );

    let id = dead.id.clone();
    let (code, out, err) = tokio::task::spawn_blocking({
        let dir = dir.clone();
        move || run(orchestrator(&dir).args(["inbox", "retry", &id]))
    })
    .await
    .expect("join");
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("back in line"), "{out}");
    let d = inbox::get(&storage, "gitea", "cli-dead-1")
        .await
        .expect("get")
        .expect("stored");
    assert_eq!((d.state, d.attempts), ("pending", 0), "{d:?}");

    // The same letter twice: refused, naming it.
    let id = dead.id.clone();
    let (code, _, err) =
        tokio::task::spawn_blocking(move || run(orchestrator(&dir).args(["inbox", "retry", &id])))
            .await
            .expect("join");
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(&dead.id) && err.contains("not a dead letter"),
        "{err}"
    );
}
