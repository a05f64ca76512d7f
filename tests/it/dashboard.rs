//! The operator's dashboard in a real headless Chromium (issue #17): the whole stack in
//! this process (every service, the local tracker and forge, the scripted agent), the
//! gateway serving the dashboard on loopback, and the browser driven over WebDriver.
//!
//! One work item walks analysis -> done while the test watches the board; its title holds
//! a `<script>`; an approve without its CSRF token is refused, a click on Approve passes the
//! human gate; the architect prints a line and waits, and the item page shows that line
//! while the agent is still running. With `ORCH_DASHBOARD_SCREENSHOTS=<dir>` the board,
//! the item page and the machine room are saved there as PNG (docs/dashboard.md's).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use orchestrator_kit::ServiceName;
use orchestrator_kit::clients::Clients;
use orchestrator_proto::launcher::v1::{
    JobStatus, ListJobsRequest, ListRunningRequest, QueueSnapshotRequest,
};
use orchestrator_proto::stage_engine::v1::{
    CreateWorkItemRequest, GetWorkItemRequest, ListWorkItemsRequest, SnapshotRequest, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::WorkItemCostsRequest;
use orchestrator_testkit::TestStorage;
use serde_json::Value;

use crate::common::start;
use crate::webdriver::{self, Browser};

const KEY: &str = "DASH-1";
const TITLE: &str = "Render <script>window.__owned = 1</script> as text";
/// What the architect prints before it waits for the test.
const LIVE_LINE: &str = "architect-is-thinking-about-DASH-1";
/// What it prints once released.
const RESUMED_LINE: &str = "architect-resumes-DASH-1";
/// The stack's per-call RPC deadline: the live log must outlive it.
const RPC_TIMEOUT_MS: &str = "1500";
/// How long one stage may take on a loaded machine.
const STEP: Duration = Duration::from_secs(120);

/// The agent: the scripted agent, behind a wrapper that, for the architecture stage,
/// prints [`LIVE_LINE`] first and waits until the test creates `<root>/release`.
fn agent(root: &Path) -> String {
    let scripted =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("examples/agents/scripted-agent.py");
    let release = root.join("release");
    let wrapper = root.join("agent.sh");
    std::fs::write(
        &wrapper,
        format!(
            r#"task=$(cat)
case "$task" in *"- stage: architecture"*)
  echo "{LIVE_LINE}"
  i=0; while [ ! -f {release} ] && [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done
  echo "{RESUMED_LINE}";;
esac
printf '%s' "$task" | exec python3 {scripted} "$@"
"#,
            release = release.display(),
            scripted = scripted.display()
        ),
    )
    .expect("wrapper");
    format!("sh {}", wrapper.display())
}

fn env(root: &Path) -> Vec<(String, String)> {
    let agents = root.join("agents");
    std::fs::create_dir_all(&agents).expect("agents");
    for role in [
        "analyst",
        "architect",
        "developer",
        "reviewer",
        "tester",
        "deployer",
    ] {
        std::fs::write(
            agents.join(format!("{role}.md")),
            format!("You are the {role}.\n"),
        )
        .expect("prompt");
    }
    let s = |p: &Path| p.display().to_string();
    vec![
        ("ORCH_AGENT_COMMAND".into(), agent(root)),
        // The wrapper runs the repository's scripted agent, which a clone under /tmp puts
        // behind the sandbox's own /tmp (launcher/tests/sandbox.rs tests the sandbox itself).
        ("ORCH_AGENT_SANDBOX".into(), "off".into()),
        ("ORCH_AGENTS_DIR".into(), s(&agents)),
        ("ORCH_WORKDIR".into(), s(&root.join("work"))),
        ("ORCH_TRACKER".into(), "local".into()),
        ("ORCH_FORGE".into(), "local".into()),
        ("ORCH_FORGE_LOCAL_DIR".into(), s(&root.join("forge"))),
        ("ORCH_DATA_DIR".into(), s(&root.join("data"))),
        ("ORCH_OUTBOX_POLL_MS".into(), "100".into()),
        ("ORCH_LAUNCHER_POLL_MS".into(), "100".into()),
        ("ORCH_LAUNCHER_HEARTBEAT_MS".into(), "1000".into()),
        ("ORCH_GATEWAY_DISPATCH_POLL_MS".into(), "100".into()),
        ("ORCH_LEASE_RETRY_S".into(), "1".into()),
        ("ORCH_BACKOFF_BASE_S".into(), "1".into()),
        ("ORCH_BACKOFF_MAX_S".into(), "5".into()),
        ("ORCH_RPC_TIMEOUT_MS".into(), RPC_TIMEOUT_MS.into()),
        // Budgets the scripted agent's few cents never reach: the costs page shows the
        // spend against them.
        ("ORCH_BUDGET_DAILY_USD".into(), "100".into()),
        ("ORCH_WORK_ITEM_BUDGET_USD".into(), "50".into()),
    ]
}

async fn item(c: &Clients) -> WorkItem {
    c.stage_engine
        .clone()
        .get_work_item(GetWorkItemRequest { key: KEY.into() })
        .await
        .expect("GetWorkItem")
        .into_inner()
}

/// Waits until `f` gives a value (polling the browser or the services).
async fn until<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(started.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// The card of [`KEY`] as the board shows it: (column, status), read from the DOM.
async fn card(b: &Browser, gateway: &str) -> Option<(String, String)> {
    b.goto(&format!("{gateway}/")).await;
    let v = b
        .run(&format!(
            "var c = document.querySelector('article.card[data-key=\"{KEY}\"]');\
             return c ? [c.closest('section.column').dataset.stage, c.dataset.status] : null;"
        ))
        .await;
    let a = v.as_array()?;
    Some((a[0].as_str()?.to_owned(), a[1].as_str()?.to_owned()))
}

/// Reloads the board until the card satisfies `done`, noting every (column, status) seen.
async fn watch(
    b: &Browser,
    gateway: &str,
    seen: &mut Vec<(String, String)>,
    limit: Duration,
    done: impl Fn(&(String, String)) -> bool,
) -> (String, String) {
    let started = Instant::now();
    loop {
        if let Some(c) = card(b, gateway).await {
            if seen.last() != Some(&c) {
                seen.push(c.clone());
            }
            if done(&c) {
                return c;
            }
        }
        assert!(
            started.elapsed() < limit,
            "timed out; the board showed {seen:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn save(b: &Browser, name: &str) {
    if let Some(dir) = std::env::var_os("ORCH_DASHBOARD_SCREENSHOTS") {
        let dir = PathBuf::from(dir);
        std::fs::create_dir_all(&dir).expect("screenshot dir");
        std::fs::write(dir.join(name), b.screenshot().await).expect("screenshot");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_item_walks_to_done_on_the_board_in_a_real_browser() {
    if !webdriver::available("an_item_walks_to_done_on_the_board_in_a_real_browser") {
        return;
    }
    let root = tempfile::tempdir().expect("root");
    let vars = env(root.path());
    let refs: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let stack = start(TestStorage::sqlite(), &refs).await;
    let gateway = stack.config.url(ServiceName::Gateway).to_owned();
    let browser = Browser::start().await;

    stack
        .clients
        .stage_engine
        .clone()
        .create_work_item(CreateWorkItemRequest {
            tracker_issue_id: KEY.into(),
            key: KEY.into(),
            title: TITLE.into(),
            description: "The dashboard must show this title as text.".into(),
            repo: "acme/app".into(),
            ..Default::default()
        })
        .await
        .expect("CreateWorkItem");

    // The board shows it in analysis first.
    let mut seen: Vec<(String, String)> = Vec::new();
    let first = until("the card on the board", STEP, || card(&browser, &gateway)).await;
    seen.push(first.clone());
    assert_eq!(first.0, "analysis", "{seen:?}");

    // The title is text: the markup shows, no script of it ran, no element came of it.
    let title = browser
        .run(&format!(
            "return document.querySelector('article.card[data-key=\"{KEY}\"] .title').textContent;"
        ))
        .await;
    assert_eq!(title, Value::from(TITLE));
    assert_eq!(
        browser.run("return window.__owned === undefined;").await,
        Value::Bool(true)
    );
    assert_eq!(
        browser
            .run("return document.querySelectorAll('main script').length;")
            .await,
        Value::from(0)
    );

    // The human gate: the item waits for approval after analysis.
    let waiting = watch(&browser, &gateway, &mut seen, STEP, |c| {
        c.1 == "awaiting_approval"
    })
    .await;
    assert_eq!(waiting.0, "analysis");
    save(&browser, "board.png").await;

    // An approve without its CSRF token is refused, and changes nothing.
    browser.goto(&format!("{gateway}/items/{KEY}")).await;
    browser
        .run("document.querySelector('form[action$=\"/approve\"] input[name=csrf]').remove(); return null;")
        .await;
    browser.click("form[action$=\"/approve\"] button").await;
    // The click returns before the refusal's page has landed, under load.
    let refused = browser
        .run_until(
            "return document.body.innerText.includes(\"without the page's CSRF token\");",
            &Value::Bool(true),
        )
        .await;
    assert_eq!(
        refused,
        Value::Bool(true),
        "{}",
        browser.run("return document.body.innerText;").await
    );
    assert_eq!(item(&stack.clients).await.status, "awaiting_approval");

    // A click on Approve passes the gate: the architect runs.
    browser.goto(&format!("{gateway}/items/{KEY}")).await;
    browser.click("form[action$=\"/approve\"] button").await;
    let started = Instant::now();
    while item(&stack.clients).await.stage != "architecture" {
        if started.elapsed() > STEP {
            let page = browser.run("return document.body.innerText;").await;
            panic!(
                "the approve did not pass the gate: {:?}; the page: {page}",
                item(&stack.clients).await
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The live log: the architect's line shows while it still runs (it waits for us).
    until("the architect running", STEP, || async {
        let jobs = stack
            .clients
            .launcher
            .clone()
            .list_jobs(ListJobsRequest {
                work_item: KEY.into(),
                agent: "architect".into(),
                ..Default::default()
            })
            .await
            .ok()?
            .into_inner()
            .jobs;
        jobs.iter()
            .any(|j| j.status == JobStatus::Running as i32)
            .then_some(())
    })
    .await;
    browser.goto(&format!("{gateway}/items/{KEY}")).await;
    until("the live line in the page", STEP, || async {
        let text = browser
            .run("var l = document.getElementById('live-log'); return l ? l.textContent : '';")
            .await;
        text.as_str()
            .is_some_and(|t| t.contains(LIVE_LINE))
            .then_some(())
    })
    .await;
    let architect = stack
        .clients
        .launcher
        .clone()
        .list_jobs(ListJobsRequest {
            work_item: KEY.into(),
            agent: "architect".into(),
            ..Default::default()
        })
        .await
        .expect("ListJobs")
        .into_inner()
        .jobs;
    assert!(
        architect
            .iter()
            .any(|j| j.status == JobStatus::Running as i32),
        "the line showed while the architect still ran: {architect:?}"
    );
    save(&browser, "item.png").await;
    // The stream outlives the RPC deadline (a log is followed for as long as the run lasts):
    // the agent is released only after it, and what it prints then still arrives.
    tokio::time::sleep(Duration::from_millis(
        RPC_TIMEOUT_MS.parse::<u64>().expect("ms") * 2,
    ))
    .await;
    std::fs::write(root.path().join("release"), "").expect("release");
    until("the line printed after the RPC deadline", STEP, || async {
        let text = browser
            .run("var l = document.getElementById('live-log'); return l ? l.textContent : '';")
            .await;
        text.as_str()
            .is_some_and(|t| t.contains(RESUMED_LINE))
            .then_some(())
    })
    .await;

    // The board follows the item to done.
    watch(&browser, &gateway, &mut seen, STEP * 6, |c| {
        c.0 == "done" && c.1 == "done"
    })
    .await;
    let stages: Vec<&str> = seen.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(stages.first(), Some(&"analysis"), "{seen:?}");
    assert_eq!(stages.last(), Some(&"done"), "{seen:?}");
    assert!(
        stages.iter().any(|s| !matches!(*s, "analysis" | "done")),
        "the test saw the item between analysis and done: {seen:?}"
    );

    // Its PR, as stage-engine recorded it when the developer's run opened it: on the card
    // and on the item page, as the number (the local forge's PR has no web page to link).
    let pr = item(&stack.clients).await.pr_number;
    assert!(pr > 0, "stage-engine knows the item's PR");
    let shown = browser
        .run(&format!(
            "var d = document.querySelector('article.card[data-key=\"{KEY}\"] dd.pr');\
             return d ? [d.textContent, d.querySelectorAll('a').length] : null;"
        ))
        .await;
    assert_eq!(
        shown,
        serde_json::json!([format!("#{pr}"), 0]),
        "the card's PR"
    );

    // The item page afterwards: every run with its usage, the log still readable.
    browser.goto(&format!("{gateway}/items/{KEY}")).await;
    let shown = browser
        .run("var d = document.querySelector('dl.facts dd.pr'); return d ? d.textContent : null;")
        .await;
    assert_eq!(shown, Value::from(format!("#{pr}")), "the item page's PR");
    // The artifacts every stage wrote, read through stage-engine from the local forge (no
    // web page to link): their text, as text.
    let artifacts = browser
        .run("return Array.from(document.querySelectorAll('ul.artifacts li')).map(l => [l.dataset.name, l.querySelector('pre.artifact') ? l.querySelector('pre.artifact').textContent : null]);")
        .await;
    let artifacts = artifacts.as_array().cloned().unwrap_or_default();
    assert_eq!(artifacts.len(), 7, "{artifacts:?}");
    assert!(
        artifacts.iter().all(|a| a[1]
            .as_str()
            .is_some_and(|t| t.contains(&format!("work_item: {KEY}")))),
        "{artifacts:?}"
    );
    let runs = browser
        .run("return Array.from(document.querySelectorAll('table.runs tbody tr')).map(r => r.innerText);")
        .await;
    let runs = runs.as_array().cloned().unwrap_or_default();
    assert!(runs.len() >= 7, "{runs:?}");
    assert!(
        runs.iter().any(|r| r
            .as_str()
            .is_some_and(|t| t.contains(" cached) / ") && t.contains('$'))),
        "{runs:?}"
    );
    // The task each run was given (collapsed; stage-engine's text, quoting the description)
    // and the profile it ran with.
    let tasks = browser
        .run("return Array.from(document.querySelectorAll('table.runs pre.task')).map(p => p.textContent);")
        .await;
    assert!(
        tasks.as_array().is_some_and(|t| !t.is_empty()
            && t.iter().all(|t| t
                .as_str()
                .is_some_and(|t| t.contains(&format!("work_item: {KEY}"))))
            && t.iter().any(|t| t
                .as_str()
                .is_some_and(|t| t.contains("The dashboard must show this title as text.")))),
        "{tasks}"
    );
    let profiles = browser
        .run("return Array.from(document.querySelectorAll('table.runs pre.profile')).map(p => p.textContent);")
        .await;
    assert!(
        profiles.as_array().is_some_and(|p| !p.is_empty()
            && p.iter().all(|p| p
                .as_str()
                .is_some_and(|p| p.contains("\"permission_mode\"")))),
        "{profiles}"
    );
    browser
        .click("table.runs tbody tr:nth-child(2) a[href$=\"/log\"]")
        .await;
    let log = browser
        .run("return document.querySelector('pre.log').textContent;")
        .await;
    assert!(log.as_str().is_some_and(|t| t.contains(LIVE_LINE)), "{log}");

    browser.goto(&format!("{gateway}/machine")).await;
    let health = browser
        .run("return Array.from(document.querySelectorAll('.service.up')).length;")
        .await;
    assert_eq!(health, Value::from(5), "every part answers");
    save(&browser, "machine.png").await;
    browser.goto(&format!("{gateway}/costs")).await;
    let total = browser
        .run("return document.querySelector('.total').innerText;")
        .await;
    assert!(
        total.as_str().is_some_and(|t| t.contains("runs")),
        "{total}"
    );
    // Against the budgets: today's spend (the launcher's count, as the machine room's) of
    // the daily ceiling, and the item's cost in all of the per-item budget.
    let budgets = browser
        .run(&format!(
            "var d = document.querySelector('table.budgets tr[data-period=daily] td.spent');\
             var i = document.querySelector('table.top tr[data-key=\"{KEY}\"] td.in-all');\
             return [d ? d.textContent : null, i ? i.textContent : null];"
        ))
        .await;
    let spent_of = |v: &Value, of: &str| {
        v.as_str().is_some_and(|t| {
            t.starts_with("$0.") && t.contains(&format!(" of {of} · ")) && t.ends_with('%')
        })
    };
    assert!(
        spent_of(&budgets[0], "$100.00") && spent_of(&budgets[1], "$50.00"),
        "{budgets}"
    );
    save(&browser, "costs.png").await;
}

/// A gateway alone, on `addr`, its peers down (the pages say so in place).
async fn lone_gateway(
    addr: &str,
    token: Option<&str>,
) -> (String, tokio_util::sync::CancellationToken, TestStorage) {
    use orchestrator_kit::{Config, Env};
    let storage = TestStorage::sqlite();
    let db =
        orchestrator_kit::db::open(ServiceName::Gateway, &storage.location, &gateway::MIGRATOR)
            .await
            .expect("gateway storage");
    let mut vars: Vec<(&str, &str)> = Vec::new();
    if let Some(t) = token {
        vars.push(("ORCH_DASHBOARD_TOKEN", t));
    }
    let config = gateway::GatewayConfig::from_env(&Env::from_pairs(vars)).expect("config");
    // Every peer on a port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        format!("http://{}", l.local_addr().expect("addr"))
    };
    let mut env = Env::default();
    for part in ServiceName::ALL {
        env = env.with(orchestrator_kit::config::url_var(part), closed.clone());
    }
    let clients = Clients::from_config(&Config::from_env(env).expect("config")).expect("clients");
    let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let stop = tokio_util::sync::CancellationToken::new();
    let gw = gateway::Gateway::new(db, config, clients);
    tokio::spawn(gateway::serve(listener, gw, stop.clone()));
    (format!("http://127.0.0.1:{port}"), stop, storage)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn off_loopback_the_dashboard_refuses_without_a_token_and_signs_in_with_one() {
    if !webdriver::available(
        "off_loopback_the_dashboard_refuses_without_a_token_and_signs_in_with_one",
    ) {
        return;
    }
    let browser = Browser::start().await;

    // No token, listening on every address (0.0.0.0 is not loopback): refused, and why.
    let (open, stop_open, _s1) = lone_gateway("0.0.0.0:0", None).await;
    browser.goto(&format!("{open}/")).await;
    let text = browser.run("return document.body.innerText;").await;
    let text = text.as_str().unwrap_or_default().to_owned();
    assert!(text.contains("Dashboard off"), "{text}");
    assert!(text.contains("ORCH_DASHBOARD_TOKEN"), "{text}");
    let heading = browser
        .run("return document.querySelector('h1').innerText;")
        .await;
    assert_eq!(heading, Value::from("Dashboard off"));
    // The rest of the gateway is unchanged.
    let health = reqwest::get(format!("{open}/healthz"))
        .await
        .expect("healthz");
    assert_eq!(health.status(), 200);
    let refused = reqwest::get(format!("{open}/costs")).await.expect("costs");
    assert_eq!(refused.status(), 403);
    stop_open.cancel();

    // A token: the sign-in page; a wrong token is refused; the right one opens the board
    // with a cookie that scripts cannot read.
    let (signed, stop_signed, _s2) =
        lone_gateway("0.0.0.0:0", Some("s3cret-dashboard-token")).await;
    browser.goto(&format!("{signed}/")).await;
    let url = browser.run("return window.location.pathname;").await;
    assert_eq!(url, Value::from("/signin"));
    browser
        .run("document.querySelector('input[name=token]').value = 'wrong'; return null;")
        .await;
    browser.click("form.signin button").await;
    let refused = browser
        .run_until(
            "return document.body.innerText.includes('That is not the token');",
            &Value::from(true),
        )
        .await;
    let text = browser.run("return document.body.innerText;").await;
    assert_eq!(refused, Value::from(true), "{text}");
    browser
        .run("document.querySelector('input[name=token]').value = 's3cret-dashboard-token'; return null;")
        .await;
    browser.click("form.signin button").await;
    let path = browser
        .run_until("return window.location.pathname;", &Value::from("/"))
        .await;
    assert_eq!(path, Value::from("/"));
    let heading = browser
        .run("return document.querySelector('h1').innerText;")
        .await;
    assert_eq!(heading, Value::from("Board"));
    assert_eq!(
        browser.run("return document.cookie;").await,
        Value::from(""),
        "HttpOnly"
    );
    // Without the cookie (a plain client), still the sign-in.
    let plain = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .expect("client");
    let r = plain
        .get(format!("{signed}/machine"))
        .send()
        .await
        .expect("GET");
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/signin");
    stop_signed.cancel();
}

/// The board's server time at scale (docs/benchmarks.md): 10,000 work items and 100,000
/// runs seeded on SQLite, then `GET /` timed from a client on loopback. Ignored by
/// default (a measurement, not a check):
/// `cargo test --release --test it dashboard::board_server_time -- --ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark: run it with --ignored"]
async fn board_server_time_with_10000_items_and_100000_runs() {
    const ITEMS: usize = 10_000;
    const RUNS_PER_ITEM: usize = 10;
    const REQUESTS: usize = 200;
    let storage = TestStorage::sqlite();
    let now = orchestrator_kit::time::now_ms();
    // The statuses of a system that has run for a while: most items finished.
    let status_of = |i: usize| match i % 100 {
        0..=79 => ("done", "done"),
        80..=89 => ("cancelled", "development"),
        90..=95 => (
            "active",
            [
                "analysis",
                "architecture",
                "development",
                "review",
                "testing",
                "deploy",
            ][i % 6],
        ),
        96..=97 => ("blocked", "development"),
        _ => ("awaiting_approval", "analysis"),
    };
    {
        let se = orchestrator_kit::db::open(
            ServiceName::StageEngine,
            &storage.location,
            &stage_engine::MIGRATOR,
        )
        .await
        .expect("stage-engine storage");
        let mut tx = se.pool.begin().await.expect("tx");
        for i in 0..ITEMS {
            let (status, stage) = status_of(i);
            let key = format!("BENCH-{i}");
            sqlx::query(
                "INSERT INTO work_items (key, tracker_issue_id, title, repo, branch, stage, status, \
                 created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
            )
            .bind(key.clone())
            .bind(key.clone())
            .bind(format!("Work item number {i}: make the thing do the other thing"))
            .bind(format!("acme/repo-{}", i % 5))
            .bind(format!("orch/{key}"))
            .bind(stage)
            .bind(status)
            .bind(now - (ITEMS - i) as i64 * 60_000)
            .bind(now - (ITEMS - i) as i64 * 30_000)
            .execute(&mut *tx)
            .await
            .expect("insert work item");
        }
        tx.commit().await.expect("commit");
        let ul = orchestrator_kit::db::open(
            ServiceName::UsageLedger,
            &storage.location,
            &usage_ledger::MIGRATOR,
        )
        .await
        .expect("usage-ledger storage");
        let mut tx = ul.pool.begin().await.expect("tx");
        for i in 0..ITEMS * RUNS_PER_ITEM {
            let item = i / RUNS_PER_ITEM;
            sqlx::query(
                "INSERT INTO agent_runs (job_id, attempt, work_item, agent, result_found, input_tokens, \
                 output_tokens, cache_read_tokens, cache_creation_tokens, total_cost_usd, is_error, \
                 duration_ms, recorded_at_ms) VALUES ($1, 1, $2, $3, 1, $4, $5, $6, $7, $8, 0, $9, $10)",
            )
            .bind(format!("job-{i}"))
            .bind(format!("BENCH-{item}"))
            .bind(["analyst", "architect", "developer", "reviewer", "tester"][i % 5])
            .bind(1_000 + (i % 900) as i64)
            .bind(2_000 + (i % 700) as i64)
            .bind(30_000 + (i % 5_000) as i64)
            .bind(500_i64)
            .bind(format!("0.{:04}", 100 + i % 9_000))
            .bind(20_000_i64)
            .bind(now - (ITEMS * RUNS_PER_ITEM - i) as i64 * 3_000)
            .execute(&mut *tx)
            .await
            .expect("insert run");
        }
        tx.commit().await.expect("commit");
    }
    let stack = start(
        storage,
        &[
            ("ORCH_STALL_S", "100000"),
            ("ORCH_RECONCILE_INTERVAL_S", "0"),
            ("ORCH_TRACKER", "local"),
        ],
    )
    .await;
    let url = format!("{}/", stack.config.url(ServiceName::Gateway));
    let http = reqwest::Client::new();
    let mut times = Vec::with_capacity(REQUESTS);
    let mut bytes = 0;
    for i in 0..REQUESTS + 10 {
        let started = Instant::now();
        let r = http.get(&url).send().await.expect("GET /");
        assert_eq!(r.status(), 200);
        let body = r.text().await.expect("body");
        let took = started.elapsed();
        assert!(
            body.contains("data-key=\"BENCH-9999\""),
            "the newest item is on the board"
        );
        assert!(!body.contains("class=\"error\""), "every part answered");
        bytes = body.len();
        if i >= 10 {
            times.push(took);
        }
    }
    times.sort();
    let pct = |p: f64| times[((times.len() as f64 * p).ceil() as usize).min(times.len()) - 1];
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load = load
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ");

    // Where the time goes: each read the board makes, alone, as the gateway makes it (the
    // five lists together, then the costs of the keys they gave); what is left of a GET is
    // the HTML and the HTTP round trip.
    let c = &stack.clients;
    let lists = || board_lists(c);
    let keys = lists().await;
    assert_eq!(keys.len(), 1200);
    let mut phases = Vec::new();
    macro_rules! phase {
        ($name:expr, $call:expr) => {{
            let mut t = Vec::with_capacity(REQUESTS);
            for i in 0..REQUESTS + 10 {
                let started = Instant::now();
                let _ = $call;
                if i >= 10 {
                    t.push(started.elapsed());
                }
            }
            t.sort();
            let p = |q: f64| t[((t.len() as f64 * q).ceil() as usize).min(t.len()) - 1];
            phases.push(format!(
                "  {:<44} p50 {:>10?} p99 {:>10?}",
                $name,
                p(0.50),
                p(0.99)
            ));
        }};
    }
    phase!("five ListWorkItems, together", lists().await);
    phase!(
        "StageEngine.Snapshot",
        c.stage_engine
            .clone()
            .snapshot(SnapshotRequest {})
            .await
            .expect("Snapshot")
    );
    phase!(
        "Launcher.ListRunning",
        c.launcher
            .clone()
            .list_running(ListRunningRequest {})
            .await
            .expect("ListRunning")
    );
    phase!(
        "Launcher.QueueSnapshot (what the board read before)",
        c.launcher
            .clone()
            .queue_snapshot(QueueSnapshotRequest {})
            .await
            .expect("QueueSnapshot")
    );
    phase!(
        "UsageLedger.WorkItemCosts, 1,200 keys",
        c.usage_ledger
            .clone()
            .work_item_costs(WorkItemCostsRequest {
                work_items: keys.clone()
            })
            .await
            .expect("WorkItemCosts")
    );
    println!("{}", phases.join("\n"));
    println!(
        "board: {ITEMS} items, {} runs, {REQUESTS} requests after 10 warm-ups, {bytes} bytes: \
         p50 {:?} p95 {:?} p99 {:?} max {:?}; load average {}",
        ITEMS * RUNS_PER_ITEM,
        pct(0.50),
        pct(0.95),
        pct(0.99),
        times[times.len() - 1],
        load
    );
}

/// The board's five lists, read together as the gateway reads them; the keys they gave.
async fn board_lists(c: &Clients) -> Vec<String> {
    let list = |status: &str, limit: u32| {
        let mut se = c.stage_engine.clone();
        let req = ListWorkItemsRequest {
            status: status.into(),
            limit,
            without_description: true,
            ..Default::default()
        };
        async move {
            se.list_work_items(req)
                .await
                .expect("ListWorkItems")
                .into_inner()
                .work_items
        }
    };
    let (a, b, d, e, f) = tokio::join!(
        list("blocked", 1000),
        list("awaiting_approval", 1000),
        list("active", 1000),
        list("done", 100),
        list("cancelled", 100),
    );
    [a, b, d, e, f]
        .into_iter()
        .flatten()
        .map(|i| i.key)
        .collect()
}
