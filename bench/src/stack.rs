//! Running the real `orchestrator up` as a child process on free loopback ports.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use orchestrator_kit::ServiceName;
use tokio::process::{Child, Command};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

/// A running `orchestrator up` with its own data directory.
pub struct Stack {
    child: Child,
    addrs: BTreeMap<ServiceName, String>,
    _dir: tempfile::TempDir,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

impl Stack {
    /// Execs the binary on free ports; returns at once (measure readiness separately).
    pub async fn start(bin: &Path) -> Result<Stack> {
        Stack::start_with(bin, &[]).await
    }

    /// As `start`, with extra variables (the agent command, the forge...).
    pub async fn start_with(bin: &Path, env: &[(String, String)]) -> Result<Stack> {
        let dir = tempfile::tempdir()?;
        let mut cmd = Command::new(bin);
        cmd.arg("up")
            .current_dir(dir.path())
            .env("ORCH_DATA_DIR", dir.path().join("var"))
            .env("ORCH_LOG", "warn")
            // Started in a temp dir: the checkout's prompts (the launcher needs every role's).
            .env(
                "ORCH_AGENTS_DIR",
                std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../examples/agents"),
            )
            .env_remove("ORCH_DATABASE_URL")
            .env_remove("ORCH_INTERNAL_TOKEN")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .kill_on_drop(true);
        let mut addrs = BTreeMap::new();
        for part in ServiceName::ALL {
            let addr = format!("127.0.0.1:{}", free_port()?);
            cmd.env(part.addr_var(), &addr);
            addrs.insert(part, addr);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("exec {}", bin.display()))?;
        Ok(Stack {
            child,
            addrs,
            _dir: dir,
        })
    }

    pub fn url(&self, part: ServiceName) -> String {
        format!("http://{}", self.addrs[&part])
    }

    /// Where `part` listens.
    pub fn addr(&self, part: ServiceName) -> &str {
        &self.addrs[&part]
    }

    /// The process id, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Polls every gRPC service's health and the gateway's /healthz until all answer.
    pub async fn wait_all_serving(&self, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        for part in ServiceName::ALL {
            loop {
                if self.is_ready(part).await {
                    break;
                }
                if Instant::now() > deadline {
                    bail!("{part} not serving within {limit:?}");
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        }
        Ok(())
    }

    async fn is_ready(&self, part: ServiceName) -> bool {
        let addr = &self.addrs[&part];
        let Some(grpc) = part.grpc_name() else {
            return http_ok(addr).await;
        };
        let Ok(channel) = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("valid url")
            .connect()
            .await
        else {
            return false;
        };
        HealthClient::new(channel)
            .check(HealthCheckRequest {
                service: grpc.to_owned(),
            })
            .await
            .map(|r| r.into_inner().status == ServingStatus::Serving as i32)
            .unwrap_or(false)
    }

    /// Resident set size of the process, in KiB.
    pub fn rss_kib(&self) -> Result<u64> {
        let pid = self.child.id().context("process gone")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS not found")
    }

    /// SIGTERM, then waits for the exit.
    pub async fn stop(mut self) -> Result<()> {
        if let Some(pid) = self.child.id() {
            // SAFETY: signalling our own child.
            #[allow(unsafe_code)]
            unsafe {
                libc::kill(pid as i32, libc::SIGTERM);
            }
        }
        tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await??;
        Ok(())
    }
}

/// A bare HTTP/1.1 GET of /healthz, so the bench needs no HTTP client crate.
async fn http_ok(addr: &str) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut s) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    let req = format!("GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    if s.write_all(req.as_bytes()).await.is_err() {
        return false;
    }
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf).await;
    buf.starts_with(b"HTTP/1.1 200")
}

/// `median [min–max] unit`.
pub fn median_range(values: &mut [f64], unit: &str) -> String {
    values.sort_by(f64::total_cmp);
    let (Some(min), Some(max)) = (values.first(), values.last()) else {
        return "no data".to_owned();
    };
    format!("{:.2} {unit} [{min:.2}–{max:.2}]", percentile(values, 0.5))
}

/// The p-th percentile of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}
