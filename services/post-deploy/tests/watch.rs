//! Watches driven against a real HTTP server (axum on 127.0.0.1:0) standing in for
//! production: the test flips its health and its request counters between ticks, over a
//! shortened window, on SQLite and on PostgreSQL.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::db::{self, Location};
use orchestrator_kit::deploy_target::CommandSpec;
use orchestrator_kit::{Config, Db, Env, ServiceName};
use orchestrator_proto::post_deploy::v1::{ArmRequest, ListWatchesRequest};
use orchestrator_testkit::{TestStorage, on_both_backends};
use post_deploy::{
    Action, AlertNote, AlertSink, MIGRATOR, PostDeployConfig, PostDeployError, PostDeployService,
    Target,
};

const REPO: &str = "acme/shop";
const SELF_REPO: &str = "ops/orchestrator";
const PREVIOUS: &str = "1111111aaaaaaa";
const DEPLOYED: &str = "2222222bbbbbbb";

/// What the fake production answers; the test changes it between ticks.
#[derive(Debug)]
struct Prod {
    health: StatusCode,
    metrics_up: bool,
    /// Answered requests by status code.
    requests: BTreeMap<u16, u64>,
    /// Delay before the health answer.
    health_delay: Duration,
}

#[derive(Clone)]
struct ProdServer {
    url: String,
    state: Arc<Mutex<Prod>>,
}

impl ProdServer {
    async fn start() -> ProdServer {
        let state = Arc::new(Mutex::new(Prod {
            health: StatusCode::OK,
            metrics_up: true,
            requests: BTreeMap::new(),
            health_delay: Duration::ZERO,
        }));
        let app = axum::Router::new()
            .route("/healthz", get(healthz))
            .route("/metrics", get(metrics))
            .with_state(Arc::clone(&state));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        ProdServer { url, state }
    }

    fn set_health(&self, status: u16) {
        self.state.lock().expect("lock").health = StatusCode::from_u16(status).expect("status");
    }

    fn set_metrics_up(&self, up: bool) {
        self.state.lock().expect("lock").metrics_up = up;
    }

    fn serve(&self, status: u16, n: u64) {
        *self
            .state
            .lock()
            .expect("lock")
            .requests
            .entry(status)
            .or_default() += n;
    }

    fn slow_health(&self, delay: Duration) {
        self.state.lock().expect("lock").health_delay = delay;
    }

    fn target(&self, rollback_command: &[String]) -> Target {
        Target {
            health_url: format!("{}/healthz", self.url),
            metrics_url: format!("{}/metrics", self.url),
            rollback_command: CommandSpec::Argv(rollback_command.to_vec()),
            requests_metric: "http_requests_total".to_owned(),
            errors_metric: String::new(),
        }
    }
}

async fn healthz(State(s): State<Arc<Mutex<Prod>>>) -> StatusCode {
    let (status, delay) = {
        let p = s.lock().expect("lock");
        (p.health, p.health_delay)
    };
    tokio::time::sleep(delay).await;
    status
}

async fn metrics(State(s): State<Arc<Mutex<Prod>>>) -> (StatusCode, String) {
    let p = s.lock().expect("lock");
    if !p.metrics_up {
        return (StatusCode::SERVICE_UNAVAILABLE, "down".to_owned());
    }
    let mut text =
        "# HELP http_requests_total Requests answered.\n# TYPE http_requests_total counter\n"
            .to_owned();
    for (code, n) in &p.requests {
        text.push_str(&format!(
            "http_requests_total{{method=\"GET\",code=\"{code}\"}} {n}\n"
        ));
    }
    (StatusCode::OK, text)
}

/// Alerts as a tracker would receive them.
#[derive(Default)]
struct Recorder {
    posted: Mutex<Vec<AlertNote>>,
    refuse: Mutex<bool>,
}

#[tonic::async_trait]
impl AlertSink for Recorder {
    async fn post(&self, alert: &AlertNote) -> Result<(), String> {
        if *self.refuse.lock().expect("lock") {
            return Err("tracker unavailable".to_owned());
        }
        self.posted.lock().expect("lock").push(alert.clone());
        Ok(())
    }
}

impl Recorder {
    fn kinds(&self) -> Vec<String> {
        self.posted
            .lock()
            .expect("lock")
            .iter()
            .map(|a| a.kind.clone())
            .collect()
    }
}

/// A watch under test: storage, the fake production, a marker file the rollback writes.
struct Rig {
    storage: TestStorage,
    dir: tempfile::TempDir,
    prod: ProdServer,
    config: PostDeployConfig,
    alerts: Arc<Recorder>,
}

impl Rig {
    async fn new(storage: TestStorage) -> Rig {
        orchestrator_kit::telemetry::init_for_tests();
        let dir = tempfile::tempdir().expect("tempdir");
        let prod = ProdServer::start().await;
        let mut config = PostDeployConfig::new(dir.path().join("logs"));
        config.self_repo = Some(SELF_REPO.to_owned());
        config.repos = [REPO.to_owned(), SELF_REPO.to_owned()].into();
        config.window = Duration::from_secs(60);
        config.tick = Duration::from_secs(1);
        config.probe_timeout = Duration::from_secs(5);
        config.rollback_timeout = Duration::from_secs(20);
        // argv, never a shell of ours: the shell here is the operator's own script.
        let script = format!(
            "echo rollback $1 to $2 from \"$ORCH_ROLLBACK_DEPLOYED_SHA\" >> {}",
            dir.path().join("rollbacks").display()
        );
        let rollback: Vec<String> = ["sh", "-c", &script, "sh", "{repo}", "{previous_sha}"]
            .map(str::to_owned)
            .to_vec();
        config
            .targets
            .insert(REPO.to_owned(), prod.target(&rollback));
        config
            .targets
            .insert(SELF_REPO.to_owned(), prod.target(&rollback));
        Rig {
            storage,
            dir,
            prod,
            config,
            alerts: Arc::new(Recorder::default()),
        }
    }

    async fn db(&self) -> Db {
        open(&self.storage.location).await
    }

    async fn service(&self) -> PostDeployService {
        self.service_on(self.db().await)
    }

    fn service_on(&self, db: Db) -> PostDeployService {
        let clients = Clients::from_config(&Config::from_env(Env::default()).expect("config"))
            .expect("clients");
        PostDeployService::new(db, clients, self.config.clone())
            .with_alert_sink(Arc::clone(&self.alerts) as Arc<dyn AlertSink>)
    }

    /// The lines the rollback command wrote: one per run.
    fn rollbacks(&self) -> Vec<String> {
        std::fs::read_to_string(self.dir.path().join("rollbacks"))
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }

    fn log(&self, work_item: &str) -> Vec<String> {
        let path: PathBuf = self.config.log_dir.join(format!("{work_item}.log"));
        std::fs::read_to_string(path)
            .map(|t| t.lines().map(str::to_owned).collect())
            .unwrap_or_default()
    }
}

async fn open(location: &Location) -> Db {
    db::open(ServiceName::PostDeploy, location, &MIGRATOR)
        .await
        .expect("post-deploy storage")
}

fn arm_request(work_item: &str, repo: &str) -> ArmRequest {
    ArmRequest {
        work_item: work_item.to_owned(),
        repo: repo.to_owned(),
        deployed_sha: DEPLOYED.to_owned(),
        previous_sha: PREVIOUS.to_owned(),
    }
}

async fn arm(svc: &PostDeployService, work_item: &str, repo: &str) {
    let r = svc.arm(&arm_request(work_item, repo)).await.expect("arm");
    assert!(r.armed, "{r:?}");
    assert!(r.created, "{r:?}");
}

async fn tick(svc: &PostDeployService, work_item: &str) -> post_deploy::TickOutcome {
    svc.tick(work_item).await.expect("tick")
}

async fn healthy_traffic_closes_when_the_window_ends(storage: TestStorage) {
    let mut rig = Rig::new(storage).await;
    rig.config.window = Duration::from_millis(1_500);
    let svc = rig.service().await;
    arm(&svc, "SHOP-1", REPO).await;
    rig.prod.serve(200, 1_000);
    rig.prod.serve(500, 1);

    let t = tick(&svc, "SHOP-1").await;
    assert_eq!(t.action, Action::Continue, "{t:?}");
    assert!(
        t.reason.contains("no data"),
        "first reading is the baseline: {t:?}"
    );
    assert!(!t.done);
    assert!((1..=2).contains(&t.next_tick_in_s), "{t:?}");

    rig.prod.serve(200, 400);
    rig.prod.serve(500, 2);
    let t = tick(&svc, "SHOP-1").await;
    assert_eq!(t.action, Action::Continue, "{t:?}");
    assert_eq!(t.classification, "healthy");
    assert_eq!(t.watch.progress.window_requests, 402.0);
    assert_eq!(t.watch.progress.window_5xx, 2.0);

    // Keep ticking while traffic stays healthy, until the window ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    let last = loop {
        rig.prod.serve(200, 100);
        let t = tick(&svc, "SHOP-1").await;
        if t.done {
            break t;
        }
        assert_eq!(t.action, Action::Continue, "{t:?}");
        assert!(Instant::now() < deadline, "the window never closed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(last.action, Action::Close, "{last:?}");
    assert_eq!(last.watch.state, "closed");
    assert!(last.watch.closed_at_ms >= last.watch.window_end_ms);
    assert!(last.watch.rollback.is_none());
    assert!(rig.rollbacks().is_empty());
    assert!(rig.alerts.kinds().is_empty());

    // A closed watch stays closed: the monitor job stops.
    let again = tick(&svc, "SHOP-1").await;
    assert!(again.done);
    assert_eq!(again.action, Action::Close);
    assert_eq!(again.watch.ticks, last.watch.ticks);

    let w = svc.get_watch("SHOP-1").await.expect("get");
    assert_eq!(w.samples.len() as u32, w.ticks);
    assert!(
        w.samples
            .iter()
            .all(|s| s.health_ok && s.health_status == 200)
    );
    assert_eq!(w.samples[0].requests_delta, None);
    assert_eq!(w.samples[1].requests_delta, Some(402.0));
    assert_eq!(w.samples[1].errors_5xx_delta, Some(2.0));
    let log = rig.log("SHOP-1");
    assert!(
        log[0].contains("armed acme/shop at 2222222bbbbbbb"),
        "{log:?}"
    );
    assert_eq!(log.len() as u32, 1 + w.ticks, "{log:?}");
    assert!(log.last().expect("line").contains("CLOSE"), "{log:?}");
}

async fn consecutive_health_failures_roll_back_exactly_once(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let svc = rig.service().await;
    arm(&svc, "SHOP-2", REPO).await;
    rig.prod.serve(200, 10);

    assert_eq!(tick(&svc, "SHOP-2").await.action, Action::Continue);
    rig.prod.set_health(503);
    for failures in 1..=2 {
        let t = tick(&svc, "SHOP-2").await;
        assert_eq!(t.action, Action::Continue, "{t:?}");
        assert_eq!(t.watch.progress.consecutive_health_failures, failures);
    }
    assert!(rig.rollbacks().is_empty());
    let t = tick(&svc, "SHOP-2").await;
    assert_eq!(t.action, Action::Rollback, "{t:?}");
    assert_eq!(t.classification, "degraded");
    assert!(t.reason.contains("3 consecutive health failures"), "{t:?}");
    assert!(t.done);
    assert_eq!(t.next_tick_in_s, 0);
    assert_eq!(t.watch.state, "rolled_back");
    let rb = t.watch.rollback.as_ref().expect("rollback recorded");
    assert_eq!(rb.exit_code, Some(0), "{rb:?}");
    assert!(!rb.timed_out);
    assert!(
        rb.command.ends_with(" sh acme/shop 1111111aaaaaaa"),
        "{rb:?}"
    );
    assert_eq!(
        rig.rollbacks(),
        ["rollback acme/shop to 1111111aaaaaaa from 2222222bbbbbbb"]
    );

    // More ticks (a re-driven monitor job) never run it again.
    for _ in 0..3 {
        let t = tick(&svc, "SHOP-2").await;
        assert!(t.done);
        assert_eq!(t.action, Action::Rollback);
    }
    assert_eq!(rig.rollbacks().len(), 1);
    assert_eq!(rig.alerts.kinds(), ["rollback"]);
    let posted = rig.alerts.posted.lock().expect("lock")[0].clone();
    assert_eq!(posted.work_item, "SHOP-2");
    assert!(posted.text.contains("the rollback succeeded"), "{posted:?}");
    let w = svc.get_watch("SHOP-2").await.expect("get");
    assert_eq!(w.alerts.len(), 1);
    assert!(w.alerts[0].posted_at_ms > 0);
    assert_eq!(w.rollback.as_ref().and_then(|r| r.exit_code), Some(0));
    assert!(
        rig.log("SHOP-2")
            .last()
            .expect("line")
            .contains("rollback succeeded")
    );
}

async fn a_5xx_spike_rolls_back(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let svc = rig.service().await;
    arm(&svc, "SHOP-3", REPO).await;
    rig.prod.serve(200, 5_000);
    rig.prod.serve(503, 40);
    // Errors from before the deploy are the baseline, not the window's.
    assert_eq!(tick(&svc, "SHOP-3").await.action, Action::Continue);
    rig.prod.serve(200, 100);
    let t = tick(&svc, "SHOP-3").await;
    assert_eq!(t.action, Action::Continue, "{t:?}");
    assert!(t.reason.contains("ratio 0.0000"), "{t:?}");

    // The health URL stays green; the 5xx ratio of the window goes to 25/200.
    rig.prod.serve(200, 75);
    rig.prod.serve(502, 25);
    let t = tick(&svc, "SHOP-3").await;
    assert_eq!(t.action, Action::Rollback, "{t:?}");
    assert!(t.reason.contains("ratio 0.1250"), "{t:?}");
    assert_eq!(t.watch.progress.consecutive_health_failures, 0);
    assert_eq!(t.watch.state, "rolled_back");
    assert_eq!(rig.rollbacks().len(), 1);
}

async fn without_a_previous_sha_a_degraded_deploy_only_alerts(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let svc = rig.service().await;
    let armed = svc
        .arm(&ArmRequest {
            previous_sha: String::new(),
            ..arm_request("SHOP-5", REPO)
        })
        .await
        .expect("arm without previous_sha");
    assert!(armed.armed, "{armed:?}");
    rig.prod.set_health(500);
    for _ in 0..2 {
        assert_eq!(tick(&svc, "SHOP-5").await.action, Action::Continue);
    }
    let t = tick(&svc, "SHOP-5").await;
    assert_eq!(t.action, Action::AlertOnly, "{t:?}");
    assert!(
        rig.rollbacks().is_empty(),
        "nothing to roll back to: no rollback"
    );
}

async fn the_self_repo_degraded_only_alerts(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let svc = rig.service().await;
    let armed = svc
        .arm(&arm_request("ORCH-9", SELF_REPO))
        .await
        .expect("arm");
    assert!(armed.watch.as_ref().expect("watch").self_repo);
    rig.prod.set_health(500);
    rig.prod.serve(500, 1_000);
    assert_eq!(tick(&svc, "ORCH-9").await.action, Action::Continue);
    assert_eq!(tick(&svc, "ORCH-9").await.action, Action::Continue);
    let t = tick(&svc, "ORCH-9").await;
    assert_eq!(t.action, Action::AlertOnly, "{t:?}");
    assert_eq!(t.classification, "degraded");
    assert!(!t.done, "the window goes on");
    // Still degraded: ALERT_ONLY again, but one alert per episode.
    rig.prod.serve(500, 1_000);
    let t = tick(&svc, "ORCH-9").await;
    assert_eq!(t.action, Action::AlertOnly, "{t:?}");
    assert_eq!(rig.alerts.kinds(), ["degraded"]);
    assert!(
        rig.rollbacks().is_empty(),
        "the orchestrator never rolls itself back"
    );
    assert!(t.watch.rollback.is_none());
    assert_eq!(t.watch.state, "watching");
    // Recovery ends the episode; a new degradation alerts again.
    rig.prod.set_health(200);
    rig.prod.serve(200, 1_000_000);
    assert_eq!(tick(&svc, "ORCH-9").await.action, Action::Continue);
    rig.prod.set_health(500);
    for _ in 0..2 {
        assert_eq!(tick(&svc, "ORCH-9").await.action, Action::Continue);
    }
    assert_eq!(tick(&svc, "ORCH-9").await.action, Action::AlertOnly);
    assert_eq!(rig.alerts.kinds(), ["degraded", "degraded"]);
    assert!(rig.rollbacks().is_empty());
}

async fn a_metrics_endpoint_that_is_down_alerts_and_never_rolls_back(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let svc = rig.service().await;
    arm(&svc, "SHOP-4", REPO).await;
    rig.prod.serve(200, 100);
    assert_eq!(tick(&svc, "SHOP-4").await.action, Action::Continue);

    rig.prod.set_metrics_up(false);
    for errors in 1..=2 {
        let t = tick(&svc, "SHOP-4").await;
        assert_eq!(t.action, Action::Continue, "{t:?}");
        assert_eq!(t.watch.progress.consecutive_probe_errors, errors);
        assert!(
            t.reason.contains("probe error: metrics: answered 503"),
            "{t:?}"
        );
    }
    for _ in 0..5 {
        let t = tick(&svc, "SHOP-4").await;
        assert_eq!(t.action, Action::AlertOnly, "{t:?}");
        assert_eq!(t.classification, "healthy");
        assert_eq!(t.watch.state, "watching");
    }
    assert_eq!(rig.alerts.kinds(), ["probe_errors"]);
    assert!(rig.rollbacks().is_empty());

    // A metrics endpoint nobody listens on is the prober's problem too.
    let mut rig2 = Rig::new(TestStorage::sqlite()).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    if let Some(t) = rig2.config.targets.get_mut(REPO) {
        t.metrics_url = format!("http://127.0.0.1:{port}/metrics");
    }
    let svc2 = rig2.service().await;
    arm(&svc2, "SHOP-5", REPO).await;
    for _ in 0..6 {
        let t = tick(&svc2, "SHOP-5").await;
        assert_ne!(t.action, Action::Rollback, "{t:?}");
        assert_eq!(t.watch.progress.consecutive_health_failures, 0);
    }
    assert_eq!(rig2.alerts.kinds(), ["probe_errors"]);
    assert!(rig2.rollbacks().is_empty());
}

async fn a_restarted_post_deploy_resumes_the_watch(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let first_db = rig.db().await;
    let first = rig.service_on(first_db.clone());
    arm(&first, "SHOP-6", REPO).await;
    rig.prod.serve(200, 100);
    assert_eq!(tick(&first, "SHOP-6").await.action, Action::Continue);
    rig.prod.set_health(503);
    rig.prod.serve(200, 50);
    let before = tick(&first, "SHOP-6").await;
    assert_eq!(before.watch.progress.consecutive_health_failures, 1);
    let t = tick(&first, "SHOP-6").await;
    assert_eq!(t.watch.progress.consecutive_health_failures, 2);
    let window_end = t.watch.window_end_ms;
    // Stop it: the service goes away and its pool is closed.
    drop(first);
    first_db.pool.close().await;

    // A new post-deploy on the same storage picks the watch up where it was.
    let second = rig.service().await;
    let listed = second
        .list_watches(&ListWatchesRequest {
            state: "watching".into(),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(listed.watches.len(), 1);
    assert_eq!(listed.watches[0].consecutive_health_failures, 2);
    assert_eq!(listed.watches[0].window_end_ms, window_end);
    assert_eq!(listed.watches[0].window_requests, 50.0);
    rig.prod.serve(200, 10);
    let t = tick(&second, "SHOP-6").await;
    assert_eq!(
        t.action,
        Action::Rollback,
        "the third failure in a row: {t:?}"
    );
    assert_eq!(t.watch.ticks, 4);
    assert_eq!(t.watch.progress.window_requests, 60.0);
    assert_eq!(t.watch.window_end_ms, window_end);
    assert_eq!(rig.rollbacks().len(), 1);
}

async fn a_rollback_interrupted_by_a_stop_is_not_run_again(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let svc = rig.service().await;
    arm(&svc, "SHOP-7", REPO).await;
    // As left by a post-deploy killed while its rollback ran, long ago.
    let db = rig.db().await;
    sqlx::query(
        "UPDATE watches SET state = 'rolling_back', rollback_command = 'x', \
         rollback_started_at_ms = $1 WHERE work_item = 'SHOP-7'",
    )
    .bind(orchestrator_kit::time::now_ms() - 3_600_000)
    .execute(&db.pool)
    .await
    .expect("update");
    let t = tick(&svc, "SHOP-7").await;
    assert!(t.done, "{t:?}");
    assert_eq!(t.watch.state, "rolled_back");
    assert!(
        t.watch
            .rollback
            .as_ref()
            .is_some_and(|r| r.error.starts_with("interrupted")),
        "{t:?}"
    );
    assert!(rig.rollbacks().is_empty());
    assert_eq!(rig.alerts.kinds(), ["rollback_interrupted"]);

    // One started just now is still running somewhere: wait for it.
    arm(&svc, "SHOP-8", REPO).await;
    sqlx::query(
        "UPDATE watches SET state = 'rolling_back', rollback_command = 'x', \
         rollback_started_at_ms = $1 WHERE work_item = 'SHOP-8'",
    )
    .bind(orchestrator_kit::time::now_ms())
    .execute(&db.pool)
    .await
    .expect("update");
    let t = tick(&svc, "SHOP-8").await;
    assert!(!t.done, "{t:?}");
    assert_eq!(t.action, Action::Rollback);
    assert_eq!(t.watch.state, "rolling_back");
}

async fn concurrent_ticks_are_counted_once(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let svc = rig.service().await;
    arm(&svc, "SHOP-9", REPO).await;
    rig.prod.set_health(503);
    // Both ticks read the watch before either writes.
    rig.prod.slow_health(Duration::from_millis(300));
    let (a, b) = tokio::join!(svc.tick("SHOP-9"), svc.tick("SHOP-9"));
    let (a, b) = (a.expect("a"), b.expect("b"));
    let w = svc.get_watch("SHOP-9").await.expect("get");
    assert_eq!(w.ticks, 1, "{a:?} {b:?}");
    assert_eq!(w.consecutive_health_failures, 1);
    assert_eq!(w.samples.len(), 1);
    assert!(
        [&a.reason, &b.reason]
            .iter()
            .any(|r| r.contains("recorded first")),
        "{a:?} {b:?}"
    );
}

async fn arm_is_idempotent_per_work_item_and_checks_its_input(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let svc = rig.service().await;
    let first = svc.arm(&arm_request("SHOP-10", REPO)).await.expect("arm");
    assert!(first.armed && first.created);
    assert_eq!(first.next_tick_in_s, 1);
    let w1 = first.watch.expect("watch");
    assert_eq!(w1.state, "watching");
    assert_eq!(w1.window_end_ms - w1.armed_at_ms, 60_000);
    assert!(w1.log_path.ends_with("SHOP-10.log"), "{}", w1.log_path);
    let again = svc.arm(&arm_request("SHOP-10", REPO)).await.expect("arm");
    assert!(again.armed && !again.created, "{again:?}");
    assert_eq!(again.watch.expect("watch").armed_at_ms, w1.armed_at_ms);
    // Another commit while the window is open: the open watch stands.
    let other = svc
        .arm(&ArmRequest {
            deployed_sha: "3333333ccccccc".into(),
            ..arm_request("SHOP-10", REPO)
        })
        .await
        .expect("arm");
    assert!(!other.created);
    assert!(other.reason.contains("still watching"), "{other:?}");

    // Not watched, switched off, or without a target: not armed, and said why.
    let no = svc
        .arm(&arm_request("SHOP-11", "acme/other"))
        .await
        .expect("arm");
    assert!(!no.armed && no.reason.contains("not watched"), "{no:?}");
    let mut cfg = rig.config.clone();
    cfg.repos.insert("acme/other".into());
    let clients =
        Clients::from_config(&Config::from_env(Env::default()).expect("config")).expect("clients");
    let svc_no_target = PostDeployService::new(rig.db().await, clients.clone(), cfg.clone());
    let no = svc_no_target
        .arm(&arm_request("SHOP-11", "acme/other"))
        .await
        .expect("arm");
    assert!(
        !no.armed && no.reason.contains("ORCH_POST_DEPLOY_TARGETS_JSON"),
        "{no:?}"
    );
    cfg.enabled = false;
    let off = PostDeployService::new(rig.db().await, clients, cfg);
    let no = off.arm(&arm_request("SHOP-12", REPO)).await.expect("arm");
    assert!(
        !no.armed && no.reason.contains("ORCH_POST_DEPLOY_ENABLED"),
        "{no:?}"
    );
    // An open watch is closed by the next tick once watching is off.
    let closed = off.tick("SHOP-10").await.expect("tick");
    assert!(closed.done);
    assert_eq!(closed.action, Action::Close);
    assert_eq!(closed.watch.state, "closed");

    // Closed, then deployed again at another commit: a fresh window.
    let rearmed = svc
        .arm(&ArmRequest {
            deployed_sha: "3333333ccccccc".into(),
            ..arm_request("SHOP-10", REPO)
        })
        .await
        .expect("arm");
    assert!(rearmed.created, "{rearmed:?}");
    let w = rearmed.watch.expect("watch");
    assert_eq!((w.state.as_str(), w.ticks), ("watching", 0));
    assert_eq!(w.deployed_sha, "3333333ccccccc");

    for (req, field) in [
        (arm_request("", REPO), "work_item is required"),
        (arm_request("-rf", REPO), "work_item"),
        (arm_request("a/../b", REPO), "work_item"),
        (arm_request("SHOP-1", ""), "repo is required"),
        (arm_request("SHOP-1", "acme/shop;id"), "repo"),
        (
            ArmRequest {
                deployed_sha: "HEAD".into(),
                ..arm_request("SHOP-1", REPO)
            },
            "deployed_sha",
        ),
        (
            ArmRequest {
                previous_sha: "main~1".into(),
                ..arm_request("SHOP-1", REPO)
            },
            "previous_sha",
        ),
    ] {
        let err = svc.arm(&req).await.expect_err(field);
        assert!(
            matches!(
                err,
                PostDeployError::MissingField(_) | PostDeployError::InvalidField { .. }
            ),
            "{err:?}"
        );
        let status = tonic::Status::from(err);
        assert_eq!(status.code(), tonic::Code::InvalidArgument);
        assert!(status.message().starts_with(field), "{}", status.message());
    }
    let err = svc.tick("SHOP-404").await.expect_err("unknown");
    assert_eq!(tonic::Status::from(err).code(), tonic::Code::NotFound);
    let err = svc
        .list_watches(&ListWatchesRequest {
            state: "sleeping".into(),
            ..Default::default()
        })
        .await
        .expect_err("bad state");
    assert_eq!(
        tonic::Status::from(err).code(),
        tonic::Code::InvalidArgument
    );
    let by_repo = svc
        .list_watches(&ListWatchesRequest {
            repo: REPO.into(),
            ..Default::default()
        })
        .await
        .expect("list");
    assert_eq!(by_repo.watches.len(), 1);
}

async fn alerts_the_sink_refused_are_posted_on_a_later_tick(storage: TestStorage) {
    let rig = Rig::new(storage).await;
    let svc = rig.service().await;
    let _ = svc
        .arm(&arm_request("ORCH-1", SELF_REPO))
        .await
        .expect("arm");
    *rig.alerts.refuse.lock().expect("lock") = true;
    rig.prod.set_health(500);
    for _ in 0..3 {
        tick(&svc, "ORCH-1").await;
    }
    let w = svc.get_watch("ORCH-1").await.expect("get");
    assert_eq!(w.alerts.len(), 1);
    assert_eq!(w.alerts[0].posted_at_ms, 0, "refused: still pending");
    *rig.alerts.refuse.lock().expect("lock") = false;
    tick(&svc, "ORCH-1").await;
    assert_eq!(rig.alerts.kinds(), ["degraded"]);
    let w = svc.get_watch("ORCH-1").await.expect("get");
    assert!(w.alerts[0].posted_at_ms > 0);
}

on_both_backends!(
    healthy_traffic_closes_when_the_window_ends,
    consecutive_health_failures_roll_back_exactly_once,
    a_5xx_spike_rolls_back,
    without_a_previous_sha_a_degraded_deploy_only_alerts,
    the_self_repo_degraded_only_alerts,
    a_metrics_endpoint_that_is_down_alerts_and_never_rolls_back,
    a_restarted_post_deploy_resumes_the_watch,
    a_rollback_interrupted_by_a_stop_is_not_run_again,
    concurrent_ticks_are_counted_once,
    arm_is_idempotent_per_work_item_and_checks_its_input,
    alerts_the_sink_refused_are_posted_on_a_later_tick,
);
