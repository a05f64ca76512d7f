//! Fakes at the process boundary: a Gitea (axum on 127.0.0.1:0) that keeps its pull requests
//! as state and answers as `shared/contracts/gitea-notes.md` says, field for field (the PR
//! and repository objects are the captured ones from the contract samples); and a launcher
//! (the generated tonic trait on 127.0.0.1:0) that judges real pids the way a launcher does
//! on its own host.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use merge_gate::{MIGRATOR, MergeGateConfig, MergeGateService};
use orchestrator_kit::clients::Clients;
use orchestrator_kit::{Config, Db, Env, ServiceName};
use orchestrator_proto::launcher::v1::launcher_server::{Launcher, LauncherServer};
use orchestrator_proto::launcher::v1::{
    GetJobRequest, Job, JobStatus, Liveness, ProbeProcessesRequest, ProbeProcessesResponse,
    ProcessProbe,
};
use orchestrator_testkit::TestStorage;
use serde_json::{Value, json};
use tonic::{Request, Response, Status};

pub const TOKEN: &str = "gitea-secret";

pub fn contracts_dir() -> PathBuf {
    orchestrator_testkit::contracts_dir()
}

fn sample(name: &str) -> Value {
    let raw = std::fs::read(contracts_dir().join(name)).expect("sample");
    serde_json::from_slice(&raw).expect("json")
}

/// One pull request as the fake keeps it.
#[derive(Debug, Clone)]
pub struct FakePr {
    pub head_ref: String,
    pub head_sha: String,
    pub base_ref: String,
    pub open: bool,
    pub merged: bool,
    pub merge_sha: Option<String>,
}

/// Faults to inject into the next merge request.
#[derive(Debug, Default, Clone)]
pub struct Faults {
    /// Merge, but answer 500 (the answer is lost on the way back).
    pub lose_merge_answer: bool,
    /// Someone merges the PR in the UI just before our request arrives (Gitea answers 405).
    pub merged_by_someone_else: bool,
    /// Someone pushes to the head branch just before our request arrives (409).
    pub push_before_merge: Option<String>,
    /// Gitea is still checking mergeability (405 "Please try again later").
    pub not_ready: bool,
}

#[derive(Debug, Default)]
pub struct GiteaState {
    pub repos: Vec<String>,
    pub pulls: BTreeMap<(String, u64), FakePr>,
    pub faults: Faults,
    /// Every merge request received.
    pub merge_requests: u32,
    /// Merges actually performed.
    pub merges_done: u32,
    /// Requests that broke the contract (wrong auth, body).
    pub errors: Vec<String>,
    /// How long a merge takes (widens race windows).
    pub merge_delay: Duration,
    next_merge: u64,
}

#[derive(Clone)]
pub struct FakeGitea {
    pub url: String,
    pub state: Arc<Mutex<GiteaState>>,
}

fn pr_json(repo: &str, number: u64, pr: &FakePr) -> Value {
    let base = if pr.merged {
        "gitea-webhook-pull_request-closed-merged.json"
    } else if pr.open {
        "gitea-webhook-pull_request-opened.json"
    } else {
        "gitea-webhook-pull_request-closed-unmerged.json"
    };
    let mut v = sample(base)["pull_request"].take();
    v["number"] = json!(number);
    v["state"] = json!(if pr.open { "open" } else { "closed" });
    v["merged"] = json!(pr.merged);
    v["merge_commit_sha"] = pr.merge_sha.as_ref().map_or(Value::Null, |s| json!(s));
    v["head"]["ref"] = json!(pr.head_ref);
    v["head"]["sha"] = json!(pr.head_sha);
    v["head"]["label"] = json!(pr.head_ref);
    v["base"]["ref"] = json!(pr.base_ref);
    v["base"]["label"] = json!(pr.base_ref);
    v["html_url"] = json!(format!("https://git.example.com/{repo}/pulls/{number}"));
    v["url"] = json!(format!("https://git.example.com/{repo}/pulls/{number}"));
    v
}

fn api_error(message: &str) -> String {
    json!({"message": message, "url": "https://git.example.com/api/swagger"}).to_string()
}

fn not_found() -> (StatusCode, String) {
    (
        StatusCode::NOT_FOUND,
        json!({"message": "The target couldn't be found.", "url": "https://git.example.com/api/swagger", "errors": []}).to_string(),
    )
}

async fn handle(
    State(state): State<Arc<Mutex<GiteaState>>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    let path = uri.path().to_owned();
    let Some(rest) = path.strip_prefix("/api/v1/repos/") else {
        // e.g. a git clone over HTTP: this fake speaks only the REST API.
        return not_found();
    };
    if headers.get("authorization").and_then(|v| v.to_str().ok())
        != Some(format!("token {TOKEN}").as_str())
    {
        state.lock().expect("lock").errors.push(format!(
            "{method} {path}: missing or wrong 'Authorization: token ...'"
        ));
    }
    let parts: Vec<&str> = rest.split('/').collect();
    if parts.len() < 2 {
        return not_found();
    }
    let repo = format!("{}/{}", parts[0], parts[1]);
    let tail = &parts[2..];
    if !state.lock().expect("lock").repos.contains(&repo) {
        return not_found();
    }
    match (method.clone(), tail) {
        (Method::GET, []) => {
            let mut r = sample("gitea-webhook-pull_request-opened.json")["repository"].take();
            r["full_name"] = json!(repo);
            r["name"] = json!(parts[1]);
            (StatusCode::OK, r.to_string())
        }
        (Method::POST, ["pulls"]) => {
            let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let (Some(head), Some(base), Some(_title)) =
                (b["head"].as_str(), b["base"].as_str(), b["title"].as_str())
            else {
                return (
                    StatusCode::UNPROCESSABLE_ENTITY,
                    api_error("head, base and title are required"),
                );
            };
            let mut s = state.lock().expect("lock");
            if s.pulls
                .iter()
                .any(|((r, _), p)| *r == repo && p.head_ref == head && p.base_ref == base && p.open)
            {
                return (
                    StatusCode::CONFLICT,
                    api_error("pull request already exists for these targets"),
                );
            }
            let number = s
                .pulls
                .keys()
                .filter(|(r, _)| *r == repo)
                .map(|(_, n)| *n)
                .max()
                .unwrap_or(0)
                + 1;
            let pr = FakePr {
                head_ref: head.to_owned(),
                head_sha: "0123456789abcdef0123456789abcdef01234567".to_owned(),
                base_ref: base.to_owned(),
                open: true,
                merged: false,
                merge_sha: None,
            };
            let out = pr_json(&repo, number, &pr);
            s.pulls.insert((repo, number), pr);
            (StatusCode::CREATED, out.to_string())
        }
        (Method::GET, ["pulls", index]) => {
            let Ok(n) = index.parse::<u64>() else {
                return not_found();
            };
            let s = state.lock().expect("lock");
            match s.pulls.get(&(repo.clone(), n)) {
                Some(pr) => (StatusCode::OK, pr_json(&repo, n, pr).to_string()),
                None => not_found(),
            }
        }
        (Method::GET, ["pulls", base, head @ ..]) => {
            let head = head.join("/");
            let s = state.lock().expect("lock");
            let found = s
                .pulls
                .iter()
                .filter(|((r, _), p)| *r == repo && p.head_ref == head && p.base_ref == *base)
                .max_by_key(|((_, n), p)| (p.open, *n));
            match found {
                Some(((_, n), pr)) => (StatusCode::OK, pr_json(&repo, *n, pr).to_string()),
                None => not_found(),
            }
        }
        (Method::POST, ["pulls", index, "merge"]) => {
            let Ok(n) = index.parse::<u64>() else {
                return not_found();
            };
            let b: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            let delay = {
                let mut s = state.lock().expect("lock");
                s.merge_requests += 1;
                // `Do` is required (Go decodes keys case-insensitively).
                let style = b.get("Do").or_else(|| b.get("do")).and_then(Value::as_str);
                if style != Some("merge") {
                    s.errors.push(format!("merge body without Do=merge: {b}"));
                }
                if headers.get("content-type").and_then(|v| v.to_str().ok())
                    != Some("application/json")
                {
                    s.errors
                        .push("merge body is not application/json".to_owned());
                }
                s.merge_delay
            };
            // The merge takes a while: concurrent callers overlap here.
            tokio::time::sleep(delay).await;
            let mut s = state.lock().expect("lock");
            let faults = std::mem::take(&mut s.faults);
            s.next_merge += 1;
            let merge_sha = format!("{:040x}", 0xfeed_0000_u64 + s.next_merge);
            let Some(pr) = s.pulls.get_mut(&(repo.clone(), n)) else {
                return not_found();
            };
            if faults.merged_by_someone_else {
                pr.merged = true;
                pr.open = false;
                pr.merge_sha = Some(merge_sha.clone());
            }
            if let Some(sha) = faults.push_before_merge {
                pr.head_sha = sha;
            }
            // CheckPullMergeable tests HasMerged before IsClosed.
            if pr.merged {
                return (StatusCode::METHOD_NOT_ALLOWED, api_error(""));
            }
            if !pr.open {
                return not_found();
            }
            if faults.not_ready {
                return (
                    StatusCode::METHOD_NOT_ALLOWED,
                    api_error("Please try again later"),
                );
            }
            if let Some(pinned) = b["head_commit_id"].as_str()
                && !pinned.is_empty()
                && pinned != pr.head_sha
            {
                return (StatusCode::CONFLICT, api_error("head out of date"));
            }
            pr.merged = true;
            pr.open = false;
            pr.merge_sha = Some(merge_sha);
            s.merges_done += 1;
            if faults.lose_merge_answer {
                return (StatusCode::INTERNAL_SERVER_ERROR, api_error(""));
            }
            (StatusCode::OK, String::new())
        }
        _ => not_found(),
    }
}

impl FakeGitea {
    pub async fn start(repos: &[&str]) -> FakeGitea {
        let state = Arc::new(Mutex::new(GiteaState {
            repos: repos.iter().map(|r| (*r).to_owned()).collect(),
            ..GiteaState::default()
        }));
        let app = axum::Router::new()
            .fallback(handle)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let url = format!("http://{}", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        FakeGitea { url, state }
    }

    pub fn add_pr(&self, repo: &str, number: u64, head_sha: &str) {
        self.state.lock().expect("lock").pulls.insert(
            (repo.to_owned(), number),
            FakePr {
                head_ref: format!("orch/ORCH-{number}"),
                head_sha: head_sha.to_owned(),
                base_ref: "main".to_owned(),
                open: true,
                merged: false,
                merge_sha: None,
            },
        );
    }

    pub fn with<R>(&self, f: impl FnOnce(&mut GiteaState) -> R) -> R {
        f(&mut self.state.lock().expect("lock"))
    }

    /// No request broke the contract.
    pub fn check(&self) {
        let s = self.state.lock().expect("lock");
        assert!(s.errors.is_empty(), "{:#?}", s.errors);
    }
}

/// A launcher that judges pids on this host, as a real launcher instance does for the
/// processes it spawned: `kill(pid, 0)`.
#[derive(Clone, Default)]
pub struct FakeLauncher {
    /// job id -> pid of its process, for running jobs.
    pub running: Arc<Mutex<HashMap<String, i64>>>,
    /// job id -> status, for jobs that are not running any more.
    pub finished: Arc<Mutex<HashMap<String, JobStatus>>>,
}

fn pid_alive(pid: i64) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    // SAFETY: kill with signal 0 only checks whether the pid exists.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0
}

#[tonic::async_trait]
impl Launcher for FakeLauncher {
    async fn probe_processes(
        &self,
        request: Request<ProbeProcessesRequest>,
    ) -> Result<Response<ProbeProcessesResponse>, Status> {
        let running = self.running.lock().expect("lock").clone();
        let wanted = request.into_inner().job_ids;
        let probes = running
            .iter()
            .filter(|(id, _)| wanted.is_empty() || wanted.contains(id))
            .map(|(id, pid)| ProcessProbe {
                job_id: id.clone(),
                attempt: 1,
                instance_id: "launcher-1".into(),
                pid: Some(*pid),
                liveness: if pid_alive(*pid) {
                    Liveness::Alive
                } else {
                    Liveness::Dead
                } as i32,
                exit_code: None,
                started_at_ms: 0,
            })
            .collect();
        Ok(Response::new(ProbeProcessesResponse { probes }))
    }

    async fn get_job(&self, request: Request<GetJobRequest>) -> Result<Response<Job>, Status> {
        let id = request.into_inner().job_id;
        let status = if self.running.lock().expect("lock").contains_key(&id) {
            JobStatus::Running
        } else if let Some(s) = self.finished.lock().expect("lock").get(&id) {
            *s
        } else {
            return Err(Status::not_found(format!("job {id} not found")));
        };
        Ok(Response::new(Job {
            id,
            status: status as i32,
            ..Job::default()
        }))
    }
}

impl FakeLauncher {
    /// Serves it on 127.0.0.1:0; returns clients pointed at it.
    pub async fn serve(&self) -> Clients {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let svc = LauncherServer::new(self.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(svc)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
                .await
        });
        let config = Config::from_env(Env::from_pairs([(
            "ORCH_LAUNCHER_URL",
            format!("http://{addr}"),
        )]))
        .expect("config");
        Clients::from_config(&config).expect("clients")
    }
}

pub async fn open_db(storage: &TestStorage) -> Db {
    orchestrator_kit::telemetry::init_for_tests();
    orchestrator_kit::db::open(ServiceName::MergeGate, &storage.location, &MIGRATOR)
        .await
        .expect("db")
}

/// merge-gate's configuration for a test: `pairs` on top of a private mirror dir.
pub fn config(mirror_dir: &std::path::Path, pairs: &[(&str, &str)]) -> MergeGateConfig {
    let mut env = Env::from_pairs([("ORCH_MERGE_MIRROR_DIR", mirror_dir.display().to_string())]);
    for (k, v) in pairs {
        env = env.with(*k, *v);
    }
    let mut c = MergeGateConfig::from_env(&env).expect("config");
    c.retry_pause = Duration::from_millis(10);
    c
}

/// A gate over the fake Gitea, with `liveness` as the judge of holders.
pub fn gate_over_gitea(
    db: Db,
    gitea: &FakeGitea,
    mirror_dir: &std::path::Path,
    liveness: Arc<dyn merge_gate::HolderLiveness>,
) -> MergeGateService {
    gate_with(db, gitea_config(gitea, mirror_dir), liveness)
}

/// merge-gate's configuration over the fake Gitea.
pub fn gitea_config(gitea: &FakeGitea, mirror_dir: &std::path::Path) -> MergeGateConfig {
    config(
        mirror_dir,
        &[
            ("ORCH_FORGE", "gitea"),
            ("GITEA_BASE_URL", &gitea.url),
            ("GITEA_TOKEN", TOKEN),
            ("ORCH_FORGE_TIMEOUT_MS", "5000"),
        ],
    )
}

/// A gate with `config` (as changed by the test), with `liveness` as the judge of holders.
pub fn gate_with(
    db: Db,
    config: MergeGateConfig,
    liveness: Arc<dyn merge_gate::HolderLiveness>,
) -> MergeGateService {
    let forge = orchestrator_forge::build(&config.forge).expect("forge");
    MergeGateService::from_parts(db, config, forge, liveness)
}
