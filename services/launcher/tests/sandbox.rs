//! The agent sandbox (bubblewrap, ARCHITECTURE §3.13) with real processes: a hostile
//! shell-script agent, driven through the launcher like any other, tries what a wrong
//! model or a prompt injection would — the launcher's environment through /proc, a
//! service's SQLite file, another job's checkout, the operator's `~/.ssh`, writes outside
//! its checkout — and fails at each, while the same run builds and runs a project's tests
//! (`python3 -m unittest`) in its checkout and succeeds. The same script with
//! `ORCH_AGENT_SANDBOX=off` reaches every one of them: the probes can tell.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use common::{H, WRITE_ARTIFACT};
use launcher::store::Status;
use orchestrator_kit::ServiceName;
use orchestrator_kit::db::Location;
use orchestrator_proto::launcher::v1::Sandbox;
use orchestrator_testkit::TestStorage;

const SECS: Duration = Duration::from_secs(30);

/// What the agent tries to reach, by name, each a shell command that succeeds only when it
/// got there. `{pid}` is the launcher's pid (this test process: it runs the launcher).
const READS: [(&str, &str); 5] = [
    (
        "launcher_environ",
        "tr '\\0' '\\n' < /proc/{pid}/environ | grep -q CARGO_MANIFEST_DIR",
    ),
    (
        "any_environ",
        "cat /proc/[0-9]*/environ 2>/dev/null | tr '\\0' '\\n' | grep -q CARGO_MANIFEST_DIR",
    ),
    (
        "sqlite",
        "head -c 15 {root}/var/launcher.db | grep -q 'SQLite format'",
    ),
    (
        "other_job",
        "grep -q other-job-secret {root}/work/jobs/other-job/checkout/secret.txt",
    ),
    ("ssh", "grep -q ssh-secret {ssh}"),
];

/// Writes outside the checkout: the test's root, the job's own directory (beside its
/// prompt file).
const WRITES: [(&str, &str); 3] = [
    ("write_root", "echo x > {root}/escaped"),
    ("write_job_dir", "echo x > \"$ORCH_PROMPT_FILE.escaped\""),
    // The repository's mirror, whose objects the checkout borrows (and other jobs' too).
    (
        "write_mirror",
        "m=$(cat .git/objects/info/alternates) && [ -d \"$m\" ] && echo x > \"$m/escaped\"",
    ),
];

/// A canary in the operator's `~/.ssh` (this process's HOME: /root here), removed on drop.
struct Canary(PathBuf);

impl Drop for Canary {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn ssh_canary(test: &str) -> Canary {
    let home = std::env::var("HOME").unwrap_or_else(|_| "/root".to_owned());
    let dir = Path::new(&home).join(".ssh");
    std::fs::create_dir_all(&dir).expect("~/.ssh");
    let path = dir.join(format!(
        "orchestrator-sandbox-canary-{}-{test}",
        std::process::id()
    ));
    std::fs::write(&path, "ssh-secret\n").expect("canary");
    Canary(path)
}

fn script(root: &Path, ssh: &Path, host_tmp: &Path, sandboxed: bool) -> String {
    let fill = |c: &str| {
        c.replace("{pid}", &std::process::id().to_string())
            .replace("{root}", &root.display().to_string())
            .replace("{ssh}", &ssh.display().to_string())
            .replace("{host_tmp}", &host_tmp.display().to_string())
    };
    let mut s = String::from(
        "probe() { if sh -c \"$2\" >/dev/null 2>&1; then echo \"PROBE $1 REACHED\"; else echo \"PROBE $1 DENIED\"; fi; }\n",
    );
    for (name, cmd) in READS.iter().chain(&WRITES) {
        s.push_str(&format!(
            "probe {name} '{}'\n",
            fill(cmd).replace('\'', "'\\''")
        ));
    }
    // The agent's /tmp is its own: this write succeeds in the sandbox, and must not reach
    // the host's.
    s.push_str(&format!(
        "probe write_tmp 'echo x > {}'\n",
        host_tmp.display()
    ));
    if sandboxed {
        // Not tried bare: as root it would write into the host's /etc.
        s.push_str("probe write_etc 'echo x > /etc/orchestrator-sandbox-escaped'\n");
    }
    // git works in the checkout: its history is there (through the mirror's objects).
    s.push_str("probe git_log 'git log -1 --format=%H | grep -q .'\n");
    // The project's own tests, built and run in the checkout.
    s.push_str(
        r#"mkdir -p calc
printf 'def add(a, b):\n    return a + b\n' > calc/__init__.py
printf 'import unittest\nimport calc\n\nclass T(unittest.TestCase):\n    def test_add(self):\n        self.assertEqual(calc.add(2, 3), 5)\n' > test_calc.py
python3 -m unittest -v test_calc 2>&1
echo "PROBE unittest_exit $?"
"#,
    );
    s.push_str(WRITE_ARTIFACT);
    s.push_str("\ncat {contracts}/real-2.1.328/success-with-write-tool.stdout.json\n");
    s
}

struct Run {
    /// Kept alive: its drop removes the root.
    _h: H,
    log: String,
    status: Status,
    root: PathBuf,
    host_tmp: PathBuf,
    snapshot_sandbox: Sandbox,
}

/// One developer run of the hostile script under `mode`, with the orchestrator's places
/// laid out as a real one has them (outside /tmp, which the sandbox hides whole).
async fn run(mode: &str, ssh: &Path) -> Run {
    let dir = Arc::new(common::outside_tmp());
    let root = std::fs::canonicalize(dir.path()).expect("real root");
    // A service's real SQLite file in the data dir.
    orchestrator_kit::db::open(
        ServiceName::Launcher,
        &Location::SqliteDir(root.join("var")),
        &launcher::MIGRATOR,
    )
    .await
    .expect("a SQLite file in the data dir");
    let other = root.join("work/jobs/other-job/checkout");
    std::fs::create_dir_all(&other).expect("other job");
    std::fs::write(other.join("secret.txt"), "other-job-secret\n").expect("secret");
    let host_tmp = std::env::temp_dir().join(format!(
        "orchestrator-sandbox-escaped-{}-{mode}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&host_tmp);
    let body = script(&root, ssh, &host_tmp, mode != "off");
    let data_dir = root.join("var").display().to_string();
    let h = H::start_on(
        Arc::new(TestStorage::sqlite()),
        dir,
        "sandbox-test",
        &body,
        &[
            ("ORCH_AGENT_SANDBOX", mode),
            ("ORCH_DATA_DIR", &data_dir),
            // The system's python3, not a shim under a home (which the sandbox hides;
            // ORCH_AGENT_SANDBOX_READ_ONLY is how an operator would expose one).
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ],
    )
    .await;
    let job = h.enqueue("developer", "development", "{}").await;
    let done = h.wait_done(&job.id, SECS).await;
    let snapshot_sandbox = h.snapshot().await.sandbox();
    Run {
        log: h.log(&done),
        status: done.status,
        root,
        host_tmp,
        snapshot_sandbox,
        _h: h,
    }
}

fn probe<'a>(log: &'a str, name: &str) -> &'a str {
    let prefix = format!("PROBE {name} ");
    log.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no probe {name} in the log:\n{log}"))
}

/// Whether bubblewrap works here; otherwise SKIPPED (a failure where it must, as in CI).
fn sandbox_works(test: &str) -> bool {
    let c = launcher::LauncherConfig::from_env(&orchestrator_kit::Env::default()).expect("config");
    match c.sandbox.for_launch(c.search_path.as_deref()) {
        Ok(Some(_)) => true,
        _ => {
            orchestrator_testkit::skip(test, "bubblewrap does not work on this machine");
            false
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_agent_reaches_nothing_of_ours_and_runs_its_tests() {
    if !sandbox_works("a_hostile_agent_reaches_nothing_of_ours_and_runs_its_tests") {
        return;
    }
    let ssh = ssh_canary("required");
    let r = run("required", &ssh.0).await;
    for (name, _) in READS.iter().chain(&WRITES) {
        assert_eq!(probe(&r.log, name), "DENIED", "{name}:\n{}", r.log);
    }
    assert_eq!(probe(&r.log, "write_etc"), "DENIED", "{}", r.log);
    assert_eq!(probe(&r.log, "git_log"), "REACHED", "{}", r.log);
    assert!(!r.root.join("escaped").exists());
    assert!(
        std::fs::read_dir(r.root.join("work/jobs"))
            .expect("jobs")
            .flatten()
            .all(|j| !j.path().join("prompt-1.md.escaped").exists())
    );
    assert!(!r.host_tmp.exists(), "the agent's /tmp is its own");
    assert!(!Path::new("/etc/orchestrator-sandbox-escaped").exists());
    // Its own work: the tests ran and passed in the checkout, and the run succeeded.
    assert_eq!(probe(&r.log, "unittest_exit"), "0", "{}", r.log);
    assert!(r.log.contains("test_add (test_calc.T"), "{}", r.log);
    assert_eq!(r.status, Status::Succeeded, "{}", r.log);
    assert_eq!(r.snapshot_sandbox, Sandbox::On);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_sandbox_the_same_agent_reaches_everything() {
    let ssh = ssh_canary("off");
    let r = run("off", &ssh.0).await;
    for (name, _) in READS.iter().chain(&WRITES) {
        assert_eq!(probe(&r.log, name), "REACHED", "{name}:\n{}", r.log);
    }
    assert!(r.root.join("escaped").exists());
    assert!(
        r.root
            .join("work/mirrors/acme--app.git/objects/escaped")
            .exists()
    );
    assert_eq!(probe(&r.log, "write_tmp"), "REACHED");
    assert_eq!(probe(&r.log, "git_log"), "REACHED", "{}", r.log);
    assert!(r.host_tmp.exists());
    let _ = std::fs::remove_file(&r.host_tmp);
    assert_eq!(probe(&r.log, "unittest_exit"), "0", "{}", r.log);
    assert_eq!(r.status, Status::Succeeded, "{}", r.log);
    assert_eq!(r.snapshot_sandbox, Sandbox::Off);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_without_a_working_bubblewrap_launches_nothing() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let marker = dir.path().join("ran");
    let h = H::start_on(
        Arc::new(TestStorage::sqlite()),
        dir,
        "sandbox-test",
        &format!("touch {}\necho '{{}}'", marker.display()),
        &[
            ("ORCH_AGENT_SANDBOX", "required"),
            ("ORCH_AGENT_SANDBOX_BWRAP", "/nonexistent/bwrap"),
        ],
    )
    .await;
    let job = h.enqueue("developer", "development", "{}").await;
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Failed, "{done:#?}");
    assert_eq!(done.outcome, "sandbox_unavailable");
    assert!(
        done.reason.contains("ORCH_AGENT_SANDBOX=required")
            && done.reason.contains("/nonexistent/bwrap"),
        "{}",
        done.reason
    );
    assert!(!marker.exists(), "the agent must not have run");
    assert_eq!(h.snapshot().await.sandbox(), Sandbox::Unavailable);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auto_without_a_working_bubblewrap_runs_bare_and_says_so() {
    let dir = Arc::new(tempfile::tempdir().expect("tempdir"));
    let marker = dir.path().join("ran");
    let h = H::start_on(
        Arc::new(TestStorage::sqlite()),
        dir,
        "sandbox-test",
        &format!(
            "{WRITE_ARTIFACT}\ntouch {}\ncat {{contracts}}/real-2.1.328/success-with-write-tool.stdout.json",
            marker.display()
        ),
        &[
            ("ORCH_AGENT_SANDBOX", "auto"),
            ("ORCH_AGENT_SANDBOX_BWRAP", "/nonexistent/bwrap"),
        ],
    )
    .await;
    assert_eq!(h.snapshot().await.sandbox(), Sandbox::Unavailable);
    let job = h.enqueue("developer", "development", "{}").await;
    let done = h.wait_done(&job.id, SECS).await;
    assert_eq!(done.status, Status::Succeeded, "{}", h.log(&done));
    assert!(
        marker.exists(),
        "auto runs the agent bare where the sandbox does not work"
    );
}

/// `--die-with-parent`: the launcher's argv for a run, started by a parent that is then
/// SIGKILLed (as a launcher killed by the OOM killer would be): the agent inside stops at
/// once, where a bare one runs on as an orphan.
#[test]
fn a_sandboxed_agent_dies_with_its_launcher() {
    if !sandbox_works("a_sandboxed_agent_dies_with_its_launcher") {
        return;
    }
    let c = launcher::LauncherConfig::from_env(&orchestrator_kit::Env::default()).expect("config");
    let bwrap = c
        .sandbox
        .for_launch(c.search_path.as_deref())
        .expect("works")
        .expect("on");
    let dir = common::outside_tmp();
    let job = std::fs::canonicalize(dir.path()).expect("real");
    let checkout = job.join("checkout");
    std::fs::create_dir_all(&checkout).expect("checkout");
    let prompt = job.join("prompt-1.md");
    std::fs::write(&prompt, "x").expect("prompt");
    let agent = vec![
        "sh".to_owned(),
        "-c".to_owned(),
        "while true; do date +%s%N > beat; sleep 0.05; done".to_owned(),
    ];
    let jail = launcher::sandbox::Jail::for_run(
        bwrap,
        &job,
        &checkout,
        &prompt,
        None,
        &agent,
        None,
        c.search_path.as_deref(),
    );
    jail.prepare().expect("prepare");
    let w = jail.wrap(&c.sandbox, &agent);
    // The "launcher": a shell that starts the sandbox and waits; killed with SIGKILL.
    let quoted: Vec<String> = w
        .argv
        .iter()
        .map(|a| launcher::config::shell_quote(a))
        .collect();
    let mut parent = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{} & wait", quoted.join(" ")))
        .spawn()
        .expect("the parent");
    let beat = checkout.join("beat");
    let read = || std::fs::read_to_string(&beat).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read().is_empty() {
        assert!(std::time::Instant::now() < deadline, "the agent never beat");
        std::thread::sleep(Duration::from_millis(20));
    }
    // Alive: it beats.
    let first = read();
    std::thread::sleep(Duration::from_millis(300));
    assert_ne!(read(), first, "the agent beats while its launcher lives");
    parent.kill().expect("SIGKILL the launcher");
    let _ = parent.wait();
    std::thread::sleep(Duration::from_millis(500));
    let after = read();
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        read(),
        after,
        "the agent went on beating after its launcher died"
    );

    // The same agent bare: an orphan that beats on (then killed with its group here).
    use std::os::unix::process::CommandExt;
    let bare_beat = job.join("bare-beat");
    let mut parent = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "sh -c 'while true; do date +%s%N > {}; sleep 0.05; done' & wait",
            bare_beat.display()
        ))
        .process_group(0)
        .spawn()
        .expect("the bare parent");
    let group = i32::try_from(parent.id()).expect("pid");
    let read = || std::fs::read_to_string(&bare_beat).unwrap_or_default();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while read().is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "the bare agent never beat"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    parent.kill().expect("SIGKILL the bare launcher");
    let _ = parent.wait();
    std::thread::sleep(Duration::from_millis(300));
    let after = read();
    std::thread::sleep(Duration::from_millis(300));
    let beat_on = read() != after;
    let _ = launcher::proc::signal_group(group, launcher::proc::Signal::Kill);
    assert!(
        beat_on,
        "a bare agent outlives its launcher: the probe can tell"
    );
}

/// `ORCH_AGENT_SANDBOX_NETWORK=isolated`: the agent has only its own loopback and the
/// launcher's egress proxy, which lets through the profile's `network` hosts and nothing
/// else. A web server on the host's loopback is reached by an allowed name (`localhost`)
/// through the proxy; the same server by a name not allowed (`127.0.0.1`) is refused 403;
/// a direct connection to it (or to any of the services' ports) finds nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_isolated_agent_reaches_only_its_allow_list() {
    if !sandbox_works("an_isolated_agent_reaches_only_its_allow_list") {
        return;
    }
    if launcher::preflight::find_command("socat", std::env::var("PATH").ok().as_deref()).is_none() {
        orchestrator_testkit::skip(
            "an_isolated_agent_reaches_only_its_allow_list",
            "socat (the isolated network's bridge) is not installed",
        );
        return;
    }
    // The host's web server: answers every request with a marker.
    let server = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = server.local_addr().expect("addr").port();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        loop {
            let Ok((mut s, _)) = server.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let body = "host-web-server-marker\n";
                let _ = s
                    .write_all(
                        format!(
                            "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                            body.len()
                        )
                        .as_bytes(),
                    )
                    .await;
            });
        }
    });
    let dir = Arc::new(common::outside_tmp());
    std::fs::create_dir_all(dir.path().join("agents")).expect("agents");
    std::fs::write(
        dir.path().join("agents/profiles.toml"),
        "[developer]\nallowed_tools = [\"Bash\"]\nnetwork = [\"localhost\"]\n",
    )
    .expect("profiles");
    let fetch = "import sys, urllib.request\ntry:\n    print(urllib.request.urlopen(sys.argv[1], timeout=5).read().decode().strip())\nexcept Exception as e:\n    print('error', e)\n";
    let script = format!(
        r#"cat > fetch.py <<'PY'
{fetch}PY
echo "ALLOWED $(python3 fetch.py http://localhost:{port}/)"
echo "REFUSED $(python3 fetch.py http://127.0.0.1:{port}/)"
if python3 -c "import socket; socket.create_connection(('127.0.0.1', {port}), 2)" 2>/dev/null; then echo "DIRECT reached"; else echo "DIRECT none"; fi
rm fetch.py
{WRITE_ARTIFACT}
cat {{contracts}}/real-2.1.328/success-with-write-tool.stdout.json"#
    );
    let h = H::start_on(
        Arc::new(TestStorage::sqlite()),
        dir,
        "sandbox-test",
        &script,
        &[
            ("ORCH_AGENT_SANDBOX", "required"),
            ("ORCH_AGENT_SANDBOX_NETWORK", "isolated"),
            ("PATH", "/usr/local/bin:/usr/bin:/bin"),
        ],
    )
    .await;
    let job = h.enqueue("developer", "development", "{}").await;
    let done = h.wait_done(&job.id, SECS).await;
    let log = h.log(&done);
    let line = |p: &str| {
        log.lines()
            .find(|l| l.starts_with(p))
            .unwrap_or_else(|| panic!("no {p} line in:\n{log}"))
            .to_owned()
    };
    assert_eq!(line("ALLOWED "), "ALLOWED host-web-server-marker", "{log}");
    let refused = line("REFUSED ");
    assert!(
        refused.contains("403") && !refused.contains("marker"),
        "{log}"
    );
    assert_eq!(line("DIRECT "), "DIRECT none", "{log}");
    assert_eq!(done.status, Status::Succeeded, "{log}");
    let j = h.get_job(&job.id).await;
    let profile: serde_json::Value = serde_json::from_str(&j.profile_json).expect("profile");
    assert_eq!(profile["network"]["isolated"], true, "{profile}");
    assert_eq!(profile["network"]["allowed"][0], "localhost");
    assert_eq!(profile["network"]["allowed"][1], "api.anthropic.com");
}
