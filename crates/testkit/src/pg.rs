//! Throwaway PostgreSQL clusters, one of each kind per process, started on first use: the
//! tests' fast one (durability off) and the benchmarks' durable one (initdb's defaults).

// Spawning the server needs `pre_exec` (to tie its life to ours) and `geteuid`.
#![allow(unsafe_code)]

use std::net::TcpListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use sqlx::{AssertSqlSafe, Connection, PgConnection};

/// The unprivileged account that runs the server when the tests run as root.
const PG_USER: &str = "orch-pg";

/// A running cluster: superuser `postgres`, trust auth, loopback only.
#[derive(Debug)]
pub struct PgCluster {
    pub port: u16,
    pub data_dir: PathBuf,
    /// Whether commits are flushed to disk (`fsync`, `synchronous_commit` and
    /// `full_page_writes` at initdb's defaults).
    pub durable: bool,
}

/// Returns the process's test cluster, starting it on first use; `Err` says why there is
/// none. Durability is off (`fsync=off`, `synchronous_commit=off`,
/// `full_page_writes=off`): a test's data dies with it anyway.
pub fn cluster() -> Result<&'static PgCluster, String> {
    static CLUSTER: OnceLock<Result<PgCluster, String>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| start(false))
        .as_ref()
        .map_err(Clone::clone)
}

/// Returns the process's durable cluster (initdb's defaults: every commit flushed), for
/// benchmarks whose figures must compare with a production-like PostgreSQL.
pub fn durable_cluster() -> Result<&'static PgCluster, String> {
    static CLUSTER: OnceLock<Result<PgCluster, String>> = OnceLock::new();
    CLUSTER
        .get_or_init(|| start(true))
        .as_ref()
        .map_err(Clone::clone)
}

impl PgCluster {
    /// The URL of database `db`.
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub async fn fresh_database(&self) -> String {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        let mut conn = loop {
            match PgConnection::connect(&self.url("postgres")).await {
                Ok(c) => break c,
                // Right after start the server may still refuse ("starting up").
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => panic!(
                    "cannot connect to the test cluster on port {}: {e}",
                    self.port
                ),
            }
        };
        sqlx::raw_sql(AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await
            .expect("CREATE DATABASE in the test cluster");
        let _ = conn.close().await;
        self.url(&name)
    }
}

fn find_bin(name: &str) -> Option<PathBuf> {
    let from_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>());
    let debian = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"));
    from_path
        .chain(debian)
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

fn run(cmd: &mut Command, what: &str) -> Result<(), String> {
    let out = cmd.output().map_err(|e| format!("{what}: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "{what} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The uid/gid to run the server as: ours, or `PG_USER`'s (created if needed) when we are root.
fn server_identity() -> Result<Option<(u32, u32)>, String> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let exists = Command::new("id")
        .arg("-u")
        .arg(PG_USER)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if !exists {
        // Another test process may create it at the same moment; only the outcome matters.
        let _ = Command::new("useradd")
            .args([
                "--system",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                PG_USER,
            ])
            .output();
    }
    let id = |flag: &str| -> Result<u32, String> {
        let out = Command::new("id")
            .arg(flag)
            .arg(PG_USER)
            .output()
            .map_err(|e| format!("id {flag} {PG_USER}: {e}"))?;
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .map_err(|_| {
                format!("cannot create or find the user {PG_USER} to run PostgreSQL as non-root")
            })
    };
    Ok(Some((id("-u")?, id("-g")?)))
}

fn remove_stale_dirs(base: &Path) {
    for entry in std::fs::read_dir(base).into_iter().flatten().flatten() {
        let name = entry.file_name();
        // `orch-pg-<pid>` or `orch-pg-<pid>-durable`.
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix("orch-pg-"))
            .and_then(|p| p.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: kill with signal 0 only checks whether the pid exists.
        if unsafe { libc::kill(pid, 0) } != 0 {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

fn start(durable: bool) -> Result<PgCluster, String> {
    let initdb = find_bin("initdb").ok_or("initdb is not on PATH nor under /usr/lib/postgresql")?;
    let postgres =
        find_bin("postgres").ok_or("postgres is not on PATH nor under /usr/lib/postgresql")?;
    let identity = server_identity()?;

    let base = std::env::temp_dir();
    remove_stale_dirs(&base);
    let suffix = if durable { "-durable" } else { "" };
    let root = base.join(format!("orch-pg-{}{suffix}", std::process::id()));
    let data_dir = root.join("data");
    let sock_dir = root.join("sock");
    for d in [&root, &sock_dir] {
        std::fs::create_dir_all(d).map_err(|e| format!("cannot create {}: {e}", d.display()))?;
    }
    if let Some((uid, gid)) = identity {
        for d in [&root, &sock_dir] {
            std::os::unix::fs::chown(d, Some(uid), Some(gid))
                .map_err(|e| format!("chown {}: {e}", d.display()))?;
        }
    }

    let as_server = |cmd: &mut Command| {
        if let Some((uid, gid)) = identity {
            cmd.uid(uid).gid(gid);
        }
        cmd.env_remove("PGDATA").current_dir(&root);
    };
    let mut init = Command::new(&initdb);
    init.args([
        "--auth=trust",
        "--username=postgres",
        "--encoding=UTF8",
        "--no-sync",
        "-D",
    ])
    .arg(&data_dir);
    as_server(&mut init);
    run(&mut init, "initdb")?;

    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map_err(|e| format!("no free port: {e}"))?
        .port();
    let mut server = Command::new(&postgres);
    server
        .arg("-D")
        .arg(&data_dir)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-p",
            &port.to_string(),
            "-k",
        ])
        .arg(&sock_dir)
        .args(["-c", "max_connections=300"]);
    if !durable {
        // A test's cluster: durability buys nothing here.
        server.args([
            "-c",
            "fsync=off",
            "-c",
            "synchronous_commit=off",
            "-c",
            "full_page_writes=off",
        ]);
    }
    server
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(root.join("server.log"))
                .map_err(|e| format!("server.log: {e}"))?,
        ));
    as_server(&mut server);
    // SAFETY: prctl is async-signal-safe. SIGQUIT is PostgreSQL's immediate shutdown: when
    // the thread that spawned the server ends (with this process), the server goes too.
    unsafe {
        server.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }

    // The death signal follows the spawning THREAD, so spawn from one that lives as long
    // as the process.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("pg-test-cluster".into())
        .spawn(move || {
            let spawned = server
                .spawn()
                .map(|_child| ())
                .map_err(|e| format!("cannot start postgres: {e}"));
            let _ = tx.send(spawned);
            loop {
                std::thread::park();
            }
        })
        .map_err(|e| format!("cannot start the cluster thread: {e}"))?;
    rx.recv()
        .map_err(|_| "the cluster thread died".to_owned())??;

    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            let log = std::fs::read_to_string(root.join("server.log")).unwrap_or_default();
            return Err(format!(
                "postgres did not listen on port {port} within 30 s: {log}"
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(PgCluster {
        port,
        data_dir,
        durable,
    })
}
