//! The `orchestrator` binary as an operator runs it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use orchestrator_kit::ServiceName;

const BIN: &str = env!("CARGO_BIN_EXE_orchestrator");

/// A command with a clean orchestrator environment: every part on port 0, data in `dir`.
pub(crate) fn orchestrator(dir: &std::path::Path) -> Command {
    let mut cmd = Command::new(BIN);
    cmd.current_dir(dir)
        .env("ORCH_DATA_DIR", dir.join("var"))
        .env(
            "ORCH_AGENTS_DIR",
            orchestrator_testkit::examples_agents_dir(),
        )
        .env_remove("ORCH_DATABASE_URL")
        .env_remove("ORCH_INTERNAL_TOKEN");
    for part in ServiceName::ALL {
        cmd.env(part.addr_var(), "127.0.0.1:0");
    }
    cmd
}

/// Runs to the end and returns (exit code, stdout, stderr).
pub(crate) fn run(cmd: &mut Command) -> (i32, String, String) {
    let out = cmd.stdin(Stdio::null()).output().expect("runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Creates `repo` (with a `main` branch) in the local forge that `orchestrator(dir)` uses.
pub(crate) fn local_forge_repo(dir: &std::path::Path, repo: &str) {
    let forge = orchestrator_forge::local::LocalForge::new(dir.join("var/forge"), "main".into());
    let repo = orchestrator_forge::RepoName::parse(repo).expect("repo");
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
        .block_on(forge.init_repo(&repo))
        .expect("init repo");
}

/// Waits for the "ready" line and returns the printed addresses.
pub(crate) fn read_addrs(child: &mut Child) -> BTreeMap<String, String> {
    let stdout = child.stdout.take().expect("stdout");
    let mut addrs = BTreeMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.expect("line");
        if line.starts_with("ready") {
            return addrs;
        }
        let mut words = line.split_whitespace();
        if let (Some(name), Some("listening"), Some("on"), Some(addr)) =
            (words.next(), words.next(), words.next(), words.next())
        {
            addrs.insert(name.to_owned(), addr.to_owned());
        }
    }
    panic!("the process ended before it was ready");
}

fn wait_with_deadline(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    None
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn up_serves_every_part_and_exits_zero_on_sigterm_within_two_seconds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = orchestrator(dir.path())
        .arg("up")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let addrs = read_addrs(&mut child);
    let names: Vec<&str> = addrs.keys().map(String::as_str).collect();
    assert_eq!(
        names,
        [
            "gateway",
            "launcher",
            "merge-gate",
            "post-deploy",
            "reaper",
            "stage-engine",
            "usage-ledger"
        ]
    );

    for part in ServiceName::ALL {
        let addr = &addrs[part.as_str()];
        assert!(
            !addr.ends_with(":0"),
            "{part} printed its real port: {addr}"
        );
        let Some(grpc) = part.grpc_name() else {
            let body = reqwest::get(format!("http://{addr}/healthz"))
                .await
                .expect("healthz")
                .text()
                .await
                .expect("body");
            assert_eq!(body, r#"{"status":"ok"}"#);
            continue;
        };
        let mut health = tonic_health::pb::health_client::HealthClient::new(
            crate::common::plain_channel(&format!("http://{addr}")).await,
        );
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: grpc.to_owned(),
            })
            .await
            .expect("health")
            .into_inner()
            .status;
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32,
            "{part}"
        );
        assert_eq!(
            crate::auth::reflected_services(&format!("http://{addr}")).await,
            vec!["grpc.health.v1.Health".to_owned(), grpc.to_owned()]
        );
    }
    assert!(
        dir.path().join("var/usage_ledger.db").is_file(),
        "one SQLite file per service under ORCH_DATA_DIR"
    );

    // SAFETY: sending a signal to our own child.
    #[allow(unsafe_code)]
    let sent = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(sent, 0);
    let status = wait_with_deadline(&mut child, Duration::from_secs(2)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("still running 2 s after SIGTERM");
    });
    assert!(status.success(), "{status}");
}

#[test]
fn grpcurl_lists_health_reflection_and_the_service_on_every_port() {
    let Ok(out) = Command::new("grpcurl").arg("-version").output() else {
        orchestrator_testkit::skip(
            "process::grpcurl_lists_health_reflection_and_the_service_on_every_port",
            "grpcurl is not on PATH",
        );
        return;
    };
    assert!(out.status.success() || !out.stderr.is_empty());
    let dir = tempfile::tempdir().expect("tempdir");
    let mut child = orchestrator(dir.path())
        .arg("up")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let addrs = read_addrs(&mut child);
    for part in ServiceName::ALL {
        let Some(grpc) = part.grpc_name() else {
            continue;
        };
        let addr = &addrs[part.as_str()];
        let (code, stdout, stderr) =
            run(Command::new("grpcurl").args(["-plaintext", addr, "list"]));
        assert_eq!(code, 0, "{part}: {stderr}");
        assert_eq!(
            stdout.lines().collect::<Vec<_>>(),
            ["grpc.health.v1.Health", grpc],
            "{part}"
        );
        let (code, stdout, stderr) =
            run(Command::new("grpcurl").args(["-plaintext", addr, "grpc.health.v1.Health/Check"]));
        assert_eq!(code, 0, "{part}: {stderr}");
        assert!(stdout.contains("\"SERVING\""), "{part}: {stdout}");
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// One line on stderr, naming the culprit, and a non-zero exit.
fn assert_fails_naming(cmd: &mut Command, culprit: &str) {
    let (code, _stdout, stderr) = run(cmd);
    assert_ne!(code, 0, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 1, "one line: {stderr}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(culprit),
        "{culprit}: {stderr}"
    );
}

#[test]
fn an_unknown_service_is_refused_by_name() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_fails_naming(
        orchestrator(dir.path()).args(["serve", "nosuch"]),
        "unknown service 'nosuch'",
    );
    assert!(!dir.path().join("var").exists(), "nothing created");
}

#[test]
fn an_unparsable_address_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    assert_fails_naming(
        orchestrator(dir.path())
            .arg("up")
            .env("ORCH_LAUNCHER_ADDR", "launcher:fifty"),
        "ORCH_LAUNCHER_ADDR: invalid address 'launcher:fifty'",
    );
    assert!(!dir.path().join("var").exists(), "nothing created");
}

#[test]
fn an_address_in_use_is_refused_before_anything_is_created() {
    let dir = tempfile::tempdir().expect("tempdir");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr").to_string();
    assert_fails_naming(
        orchestrator(dir.path())
            .arg("up")
            .env("ORCH_USAGE_LEDGER_ADDR", &addr),
        &format!("ORCH_USAGE_LEDGER_ADDR: cannot listen on {addr}"),
    );
    assert!(!dir.path().join("var").exists(), "nothing created");
}

#[test]
fn a_data_dir_that_cannot_be_written_is_named() {
    let dir = tempfile::tempdir().expect("tempdir");
    let file = dir.path().join("not-a-dir");
    std::fs::write(&file, "x").expect("write");
    assert_fails_naming(
        orchestrator(dir.path())
            .arg("up")
            .env("ORCH_DATA_DIR", &file),
        "ORCH_DATA_DIR: cannot write to",
    );
}

#[test]
fn an_unreachable_postgres_is_named_without_its_password() {
    let dir = tempfile::tempdir().expect("tempdir");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind")
        .local_addr()
        .expect("addr")
        .port();
    let url = format!("postgres://orch:hunter2@127.0.0.1:{closed}/orch");
    let (code, _, stderr) = run(orchestrator(dir.path())
        .args(["serve", "usage-ledger"])
        .env("ORCH_DATABASE_URL", &url));
    assert_ne!(code, 0);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.starts_with(&format!(
            "error: ORCH_DATABASE_URL: cannot connect to PostgreSQL at 127.0.0.1:{closed}/orch"
        )),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");
    assert!(
        !dir.path().join("var").exists(),
        "no SQLite fallback created"
    );
}

#[test]
fn item_commands_talk_to_a_running_stack() {
    let dir = tempfile::tempdir().expect("tempdir");
    local_forge_repo(dir.path(), "acme/app");
    let mut up = orchestrator(dir.path())
        .arg("up")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("up starts");
    let addrs = read_addrs(&mut up);
    let url = |part: &str| format!("http://{}", addrs[part]);
    let item = |args: &[&str]| {
        run(orchestrator(dir.path())
            .arg("item")
            .args(args)
            .env("ORCH_STAGE_ENGINE_URL", url("stage-engine"))
            .env("ORCH_USAGE_LEDGER_URL", url("usage-ledger")))
    };
    let created = item(&["create", "--repo", "acme/app", "Speed up startup"]);
    let listed = item(&["list"]);
    let shown = item(&["show", "LOCAL-1"]);
    let unknown = item(&["show", "NOPE-1"]);
    let _ = up.kill();
    let _ = up.wait();
    assert_eq!(created.0, 0, "{created:?}");
    assert!(created.1.starts_with("created LOCAL-1 "), "{created:?}");
    assert_eq!(listed.0, 0, "{listed:?}");
    assert!(listed.1.contains("Speed up startup"), "{listed:?}");
    assert_eq!(shown.0, 0, "{shown:?}");
    assert!(shown.1.contains("stage:     analysis"), "{shown:?}");
    assert_eq!(unknown.0, 1, "{unknown:?}");
    assert!(unknown.2.contains("NOPE-1"), "{unknown:?}");
}
