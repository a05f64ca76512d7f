//! The registered staging checks, each against the stack named by the configuration:
//!
//! | id  | class         | what |
//! |-----|---------------|------|
//! | C1  | real          | every gRPC service answers `grpc.health.v1` SERVING |
//! | C2  | real          | the gateway's `GET /healthz` answers 2xx |
//! | C3  | real          | the gateway's `GET /queue` answers 2xx with JSON |
//! | C4  | real          | every service's storage has exactly this build's migrations applied |
//! | C9a | sandbox_infra | the sandbox work item's branch exists on the forge |
//! | C9b | sandbox_infra | the sandbox work item's analyst job was launched |

use std::path::PathBuf;
use std::time::Duration;

use orchestrator_kit::clients::Clients;
use orchestrator_kit::db::Location;
use orchestrator_kit::{Config, ServiceName};
use orchestrator_proto::launcher::v1::{JobStatus, ListJobsRequest};
use orchestrator_proto::merge_gate::v1::{CheckBranchMergeableRequest, Mergeability};
use orchestrator_proto::stage_engine::v1::GetWorkItemRequest;
use sqlx::migrate::Migrator;
use sqlx::{AnyConnection, Connection, Row};

use crate::verdict::CheckOutcome;

/// One named check.
#[tonic::async_trait]
pub trait Check: Send + Sync {
    /// The id the verdict classifies, e.g. `C9a`.
    fn id(&self) -> &str;
    /// What it checks, for people.
    fn name(&self) -> &str;
    /// Runs it. Errors are outcomes, never panics.
    async fn run(&self) -> CheckOutcome;
}

/// C1: every gRPC service answers its health check SERVING.
pub struct ServicesServing {
    pub services: Vec<(ServiceName, String)>,
    pub timeout: Duration,
}

#[tonic::async_trait]
impl Check for ServicesServing {
    fn id(&self) -> &str {
        "C1"
    }

    fn name(&self) -> &str {
        "every service SERVING"
    }

    async fn run(&self) -> CheckOutcome {
        use tonic_health::pb::HealthCheckRequest;
        use tonic_health::pb::health_check_response::ServingStatus;
        use tonic_health::pb::health_client::HealthClient;

        let mut serving = Vec::new();
        let mut not = Vec::new();
        for (service, url) in &self.services {
            let Some(grpc_name) = service.grpc_name() else {
                continue;
            };
            let endpoint = match tonic::transport::Endpoint::from_shared(url.clone()) {
                Ok(e) => e.connect_timeout(self.timeout).timeout(self.timeout),
                Err(e) => {
                    not.push(format!("{service} ({url}): invalid URL: {e}"));
                    continue;
                }
            };
            let mut client = HealthClient::new(endpoint.connect_lazy());
            let answer = client
                .check(HealthCheckRequest {
                    service: grpc_name.to_owned(),
                })
                .await;
            match answer {
                Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => {
                    serving.push(service.as_str())
                }
                Ok(r) => not.push(format!(
                    "{service} ({url}): {}",
                    ServingStatus::try_from(r.get_ref().status)
                        .map(|s| s.as_str_name())
                        .unwrap_or("unknown status")
                )),
                Err(e) => not.push(format!("{service} ({url}): {}", e.message())),
            }
        }
        if !not.is_empty() {
            CheckOutcome::Fail(format!("not SERVING: {}", not.join("; ")))
        } else {
            CheckOutcome::Pass(format!("SERVING: {}", serving.join(", ")))
        }
    }
}

/// C2 and C3: a gateway path answers 2xx (and, when `json`, with a JSON body).
pub struct GatewayGet {
    pub id: &'static str,
    pub name: &'static str,
    pub url: String,
    pub json: bool,
    pub http: reqwest::Client,
    pub timeout: Duration,
}

#[tonic::async_trait]
impl Check for GatewayGet {
    fn id(&self) -> &str {
        self.id
    }

    fn name(&self) -> &str {
        self.name
    }

    async fn run(&self) -> CheckOutcome {
        let resp = match self.http.get(&self.url).timeout(self.timeout).send().await {
            Ok(r) => r,
            Err(e) => return CheckOutcome::Fail(format!("{}: {}", self.url, error_chain(&e))),
        };
        let status = resp.status();
        if !status.is_success() {
            return CheckOutcome::Fail(format!("{} answered {status}", self.url));
        }
        if self.json {
            let body = match resp.bytes().await {
                Ok(b) => b,
                Err(e) => return CheckOutcome::Fail(format!("{}: {}", self.url, error_chain(&e))),
            };
            if serde_json::from_slice::<serde_json::Value>(&body).is_err() {
                return CheckOutcome::Fail(format!("{} answered {status} without JSON", self.url));
            }
        }
        CheckOutcome::Pass(format!("{} answered {status}", self.url))
    }
}

/// C4: each service's storage holds exactly the migrations this build embeds, all applied.
/// It only reads: opening the stores the normal way would apply them.
pub struct MigrationsApplied {
    pub location: Location,
    pub migrators: Vec<(ServiceName, &'static Migrator)>,
    pub timeout: Duration,
}

#[tonic::async_trait]
impl Check for MigrationsApplied {
    fn id(&self) -> &str {
        "C4"
    }

    fn name(&self) -> &str {
        "migrations applied"
    }

    async fn run(&self) -> CheckOutcome {
        sqlx::any::install_default_drivers();
        let mut problems = Vec::new();
        let mut applied = 0usize;
        for (service, migrator) in &self.migrators {
            match tokio::time::timeout(
                self.timeout,
                migration_gap(&self.location, *service, migrator),
            )
            .await
            {
                Ok(Ok(n)) => applied += n,
                Ok(Err(why)) => problems.push(format!("{service}: {why}")),
                Err(_) => problems.push(format!("{service}: timed out")),
            }
        }
        if problems.is_empty() {
            CheckOutcome::Pass(format!(
                "{applied} migration(s) applied across {} service(s)",
                self.migrators.len()
            ))
        } else {
            CheckOutcome::Fail(problems.join("; "))
        }
    }
}

/// Returns how many migrations `service` has applied, or what is missing or wrong.
async fn migration_gap(
    location: &Location,
    service: ServiceName,
    migrator: &Migrator,
) -> Result<usize, String> {
    let url = match location {
        Location::SqliteDir(dir) => {
            let path: PathBuf = dir.join(format!("{}.db", service.schema()));
            if !path.exists() {
                return Err(format!("no database at {}", path.display()));
            }
            // rw, not rwc: never create a database that is not there.
            format!("sqlite://{}?mode=rw", path.display())
        }
        Location::Postgres(url) => {
            let sep = if url.expose().contains('?') { '&' } else { '?' };
            format!(
                "{}{sep}options[search_path]={}",
                url.expose(),
                service.schema()
            )
        }
    };
    let mut conn = AnyConnection::connect(&url)
        .await
        // The URL may hold a password: say only which store.
        .map_err(|e| format!("cannot connect to its storage: {}", db_error(&e)))?;
    let rows = sqlx::query(
        "SELECT version, CAST(CASE WHEN success THEN 1 ELSE 0 END AS BIGINT) AS ok, checksum \
         FROM _sqlx_migrations ORDER BY version",
    )
    .fetch_all(&mut conn)
    .await;
    let _ = conn.close().await;
    let rows = rows.map_err(|e| format!("no migration table: {}", db_error(&e)))?;
    let mut in_db = Vec::new();
    for row in &rows {
        let version: i64 = row.try_get("version").map_err(|e| e.to_string())?;
        let ok: i64 = row.try_get("ok").map_err(|e| e.to_string())?;
        let checksum: Vec<u8> = row.try_get("checksum").map_err(|e| e.to_string())?;
        in_db.push((version, ok != 0, checksum));
    }
    let expected: Vec<_> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    let mut problems = Vec::new();
    for m in &expected {
        match in_db.iter().find(|(v, _, _)| *v == m.version) {
            None => problems.push(format!("{} not applied", m.version)),
            Some((_, false, _)) => problems.push(format!("{} failed half-way", m.version)),
            Some((_, true, sum)) if sum.as_slice() != m.checksum.as_ref() => {
                problems.push(format!("{} was changed after it was applied", m.version))
            }
            Some(_) => {}
        }
    }
    for (v, _, _) in &in_db {
        if !expected.iter().any(|m| m.version == *v) {
            problems.push(format!("{v} is applied but unknown to this build"));
        }
    }
    if problems.is_empty() {
        Ok(expected.len())
    } else {
        Err(problems.join(", "))
    }
}

/// A database error without anything that could echo a connection string.
fn db_error(e: &sqlx::Error) -> String {
    match e {
        sqlx::Error::Database(d) => d.message().to_owned(),
        sqlx::Error::Io(io) => io.to_string(),
        sqlx::Error::PoolTimedOut => "timed out".to_owned(),
        sqlx::Error::Configuration(_) => "invalid storage configuration".to_owned(),
        other => other.to_string(),
    }
}

/// What a sandbox probe found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Finding {
    pub ok: bool,
    pub detail: String,
}

/// The sandbox work item as the pipeline sees it. `Err` means the question could not be
/// answered (a service down or not implementing the RPC): an internal error, never waived.
#[tonic::async_trait]
pub trait Sandbox: Send + Sync {
    /// Whether the work item's branch exists on the forge.
    async fn branch_exists(&self, work_item: &str) -> Result<Finding, String>;
    /// Whether the work item's analyst job was launched (started, whatever its end).
    async fn analyst_job_launched(&self, work_item: &str) -> Result<Finding, String>;
}

/// The sandbox through the stack's RPCs: stage-engine names the work item's repo and
/// branch, merge-gate looks the branch up on the forge, the launcher lists its jobs.
pub struct GrpcSandbox {
    pub clients: Clients,
}

#[tonic::async_trait]
impl Sandbox for GrpcSandbox {
    async fn branch_exists(&self, work_item: &str) -> Result<Finding, String> {
        let item = match self
            .clients
            .stage_engine
            .clone()
            .get_work_item(GetWorkItemRequest {
                key: work_item.to_owned(),
            })
            .await
        {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::NotFound => {
                return Ok(Finding {
                    ok: false,
                    detail: format!("the sandbox work item {work_item} does not exist"),
                });
            }
            Err(s) => {
                return Err(format!(
                    "stage-engine GetWorkItem: {}: {}",
                    code(&s),
                    s.message()
                ));
            }
        };
        if item.branch.is_empty() {
            return Ok(Finding {
                ok: false,
                detail: format!("the sandbox work item {work_item} has no branch"),
            });
        }
        let answer = self
            .clients
            .merge_gate
            .clone()
            .check_branch_mergeable(CheckBranchMergeableRequest {
                repo: item.repo.clone(),
                branch: item.branch.clone(),
                base: String::new(),
            })
            .await
            .map_err(|s| {
                format!(
                    "merge-gate CheckBranchMergeable: {}: {}",
                    code(&s),
                    s.message()
                )
            })?
            .into_inner();
        let found = !answer.head_sha.is_empty()
            && answer.mergeability() != Mergeability::Error
            && answer.mergeability() != Mergeability::Unspecified;
        Ok(if found {
            Finding {
                ok: true,
                detail: format!("{} {} at {}", item.repo, item.branch, answer.head_sha),
            }
        } else {
            Finding {
                ok: false,
                detail: format!(
                    "{} {} not found: {}",
                    item.repo,
                    item.branch,
                    if answer.error.is_empty() {
                        "no head commit"
                    } else {
                        &answer.error
                    }
                ),
            }
        })
    }

    async fn analyst_job_launched(&self, work_item: &str) -> Result<Finding, String> {
        let jobs = self
            .clients
            .launcher
            .clone()
            .list_jobs(ListJobsRequest {
                work_item: work_item.to_owned(),
                agent: "analyst".to_owned(),
                limit: 20,
                ..Default::default()
            })
            .await
            .map_err(|s| format!("launcher ListJobs: {}: {}", code(&s), s.message()))?
            .into_inner()
            .jobs;
        let launched = jobs.iter().find(|j| {
            j.started_at_ms > 0
                || matches!(
                    j.status(),
                    JobStatus::Running | JobStatus::Succeeded | JobStatus::Failed
                )
        });
        Ok(match (launched, jobs.first()) {
            (Some(j), _) => Finding {
                ok: true,
                detail: format!(
                    "analyst job {} {}",
                    j.id,
                    j.status().as_str_name().to_lowercase()
                ),
            },
            (None, Some(j)) => Finding {
                ok: false,
                detail: format!(
                    "analyst job {} is {} and was never launched",
                    j.id,
                    j.status().as_str_name().to_lowercase()
                ),
            },
            (None, None) => Finding {
                ok: false,
                detail: format!("no analyst job for {work_item}"),
            },
        })
    }
}

fn code(s: &tonic::Status) -> &'static str {
    match s.code() {
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::Internal => "INTERNAL",
        _ => "error",
    }
}

/// Which sandbox question a [`SandboxCheck`] asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxQuestion {
    /// C9a.
    BranchExists,
    /// C9b.
    AnalystJobLaunched,
}

/// C9a and C9b: a question about the sandbox work item.
pub struct SandboxCheck {
    pub question: SandboxQuestion,
    /// `ORCH_STAGING_SANDBOX_WORK_ITEM`; `None` fails the check.
    pub work_item: Option<String>,
    pub sandbox: std::sync::Arc<dyn Sandbox>,
}

#[tonic::async_trait]
impl Check for SandboxCheck {
    fn id(&self) -> &str {
        match self.question {
            SandboxQuestion::BranchExists => "C9a",
            SandboxQuestion::AnalystJobLaunched => "C9b",
        }
    }

    fn name(&self) -> &str {
        match self.question {
            SandboxQuestion::BranchExists => "sandbox branch exists",
            SandboxQuestion::AnalystJobLaunched => "sandbox analyst job launched",
        }
    }

    async fn run(&self) -> CheckOutcome {
        let Some(work_item) = &self.work_item else {
            return CheckOutcome::Fail(
                "no sandbox work item: ORCH_STAGING_SANDBOX_WORK_ITEM is not set".to_owned(),
            );
        };
        let found = match self.question {
            SandboxQuestion::BranchExists => self.sandbox.branch_exists(work_item).await,
            SandboxQuestion::AnalystJobLaunched => {
                self.sandbox.analyst_job_launched(work_item).await
            }
        };
        match found {
            Ok(Finding { ok: true, detail }) => CheckOutcome::Pass(detail),
            Ok(Finding { ok: false, detail }) => CheckOutcome::Fail(detail),
            Err(e) => CheckOutcome::Error(e),
        }
    }
}

/// An error with its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// The registered checks for the stack `config` names, in the order they run.
pub fn registered(
    config: &Config,
    sandbox_work_item: Option<String>,
    sandbox: std::sync::Arc<dyn Sandbox>,
    migrators: Vec<(ServiceName, &'static Migrator)>,
    timeout: Duration,
) -> Vec<std::sync::Arc<dyn Check>> {
    let http = reqwest::Client::new();
    let gateway = config.url(ServiceName::Gateway).trim_end_matches('/');
    let services = ServiceName::ALL
        .into_iter()
        .filter(|s| s.grpc_name().is_some())
        .map(|s| (s, config.url(s).to_owned()))
        .collect();
    vec![
        std::sync::Arc::new(ServicesServing { services, timeout }),
        std::sync::Arc::new(GatewayGet {
            id: "C2",
            name: "gateway /healthz",
            url: format!("{gateway}/healthz"),
            json: false,
            http: http.clone(),
            timeout,
        }),
        std::sync::Arc::new(GatewayGet {
            id: "C3",
            name: "gateway GET /queue",
            url: format!("{gateway}/queue"),
            json: true,
            http,
            timeout,
        }),
        std::sync::Arc::new(MigrationsApplied {
            location: Location::from_config(config),
            migrators,
            timeout,
        }),
        std::sync::Arc::new(SandboxCheck {
            question: SandboxQuestion::BranchExists,
            work_item: sandbox_work_item.clone(),
            sandbox: std::sync::Arc::clone(&sandbox),
        }),
        std::sync::Arc::new(SandboxCheck {
            question: SandboxQuestion::AnalystJobLaunched,
            work_item: sandbox_work_item,
            sandbox,
        }),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_service_nobody_answers_for_is_not_serving() {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let c = ServicesServing {
            services: vec![(ServiceName::Launcher, format!("http://127.0.0.1:{port}"))],
            timeout: Duration::from_secs(2),
        };
        let out = c.run().await;
        assert!(
            matches!(&out, CheckOutcome::Fail(d) if d.starts_with("not SERVING: launcher")),
            "{out:?}"
        );
    }
}
