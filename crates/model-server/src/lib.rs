//! A scripted model: a small HTTP server playing the Anthropic Messages API, so that the
//! REAL Claude Code CLI runs as the agent with no model and no network (point it at the
//! server with `ANTHROPIC_BASE_URL`). What the CLI sends and expects is in
//! `shared/contracts/claude-cli/real-2.1.328/README.md`:
//!
//! - `GET /api/hello` answers 404 (the CLI is fine with that);
//! - `POST /v1/messages` answers a streamed (SSE) turn. Each turn of the agent loop writes
//!   ONE file of the stage's artifacts with a `tool_use` block of the `Write` tool; once
//!   every file was written (as many `tool_result` blocks in the conversation as files),
//!   it answers text with `end_turn`. In `deploy` the first turn is a `Bash` tool use of
//!   `git rev-parse HEAD`, and `deploy.md` carries the commit it answered as
//!   `deployed_sha:` (the CLI needs `--allowedTools 'Bash(git rev-parse:*)'` for it);
//! - which files: the work item key and the stage are read from the conversation: the
//!   task's lines (`- work_item: KEY`, `- stage: STAGE`, or `- Work item:` / `- Stage:`) first, else
//!   `work_item: KEY` / `"work_item": "KEY"` and `stage: STAGE`; the checkout from the CLI's system prompt
//!   (`Primary working directory: ...`) so the `Write` paths are absolute;
//! - on demand ([`Control`]) it answers 429 (with `retry-after`), 529, 401 or the spend
//!   limit instead, for the storm tests;
//! - the [`Scenario::LazyUntilStopHook`] scenario first ends its turn WITHOUT writing,
//!   and writes only once the conversation holds the Stop hook's feedback;
//!   [`Scenario::LazyFirstRun`] is lazy in the first run only (a retry writes), and
//!   [`Scenario::NeverWrites`] never writes at all (runs are told apart by the CLI's
//!   session id);
//! - it records every agent turn it is asked for ([`Control::received`],
//!   [`Control::first_requests`]), so that a test asserts on what the model was told.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::{Value, json};

/// The model name the server reports.
pub const MODEL: &str = "claude-scripted-1";

/// An error the server answers instead of a turn.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// HTTP 429 `rate_limit_error` with `retry-after: <s>`.
    RateLimit { retry_after_s: u32 },
    /// HTTP 529 `overloaded_error`.
    Overloaded,
    /// HTTP 401 `authentication_error`.
    InvalidKey,
    /// HTTP 429 with the spend-limit text: must not be retried.
    SpendLimit,
}

impl Failure {
    /// The status, the extra headers and the Anthropic error body.
    pub fn response(&self) -> (StatusCode, Vec<(&'static str, String)>, Value) {
        let (status, kind, message, headers) = match self {
            Failure::RateLimit { retry_after_s } => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "Number of request tokens has exceeded your per-minute rate limit",
                vec![("retry-after", retry_after_s.to_string())],
            ),
            Failure::Overloaded => (
                StatusCode::from_u16(529).unwrap_or(StatusCode::SERVICE_UNAVAILABLE),
                "overloaded_error",
                "Overloaded",
                vec![],
            ),
            Failure::InvalidKey => (
                StatusCode::UNAUTHORIZED,
                "authentication_error",
                "invalid x-api-key",
                vec![],
            ),
            Failure::SpendLimit => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limit_error",
                "You have reached your specified API usage limits. You will regain access on 2026-12-01 at 00:00 UTC.",
                vec![],
            ),
        };
        let mut body = json!({"type": "error", "error": {"type": kind, "message": message}});
        if *self == Failure::SpendLimit {
            body["error_code"] = json!("enforced_spend_limit_reached");
        }
        (status, headers, body)
    }
}

/// How the model behaves when it is not told to fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Scenario {
    /// Writes the stage's artifacts, one `Write` per turn, then ends its turn.
    #[default]
    WriteArtifacts,
    /// Ends its first turn without writing anything; writes the artifacts only once the
    /// conversation holds `Stop hook feedback` (the quality gate as the Stop hook).
    LazyUntilStopHook,
    /// An agent that forgets its artifact once. Every run (CLI session) starts as a real
    /// agent does, by looking at the checkout (one `Read` of `README.md`): that is the
    /// context a new launch pays for again. In the FIRST run of a work item's stage it then
    /// ends its turn without writing, until the Stop hook's feedback arrives; every later
    /// run (the stage retried) writes the artifacts at once.
    LazyFirstRun,
    /// Never writes the artifact: every turn ends with text, whatever the Stop hook says.
    NeverWrites,
}

#[derive(Debug, Default)]
struct Inner {
    scenario: Scenario,
    /// Answered to every request while set.
    failure: Option<Failure>,
    /// Answered to this many next requests, before `failure`.
    fail_next: u32,
    fail_next_with: Option<Failure>,
    /// Stages whose verdict is negative on the first run per work item.
    reject_first: BTreeSet<String>,
    /// (work item, stage) already rejected once.
    rejected: BTreeSet<(String, String)>,
    requests: u32,
    failures_answered: u32,
    turns_answered: u32,
    /// (work item, stage) -> the CLI sessions (runs) seen for it, in order.
    runs: BTreeMap<(String, String), Vec<String>>,
    /// The distinct `Stop hook feedback` texts received.
    feedback: Vec<String>,
    /// Every agent turn asked for, in order.
    received: Vec<Received>,
    /// Commands the agent runs with its Bash tool, one per turn, before it ends its turn
    /// (set by [`Control::run_bash`]; the scenario is not consulted while set).
    bash: Vec<String>,
    /// The tool results of the latest agent turn, in order (their text).
    tool_outputs: Vec<String>,
}

/// A request for an agent turn (one with the `Write` tool), as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Received {
    pub key: String,
    pub stage: String,
    /// The CLI session (one per run).
    pub session: String,
    /// The system prompt and every text of the conversation, joined by newlines.
    pub text: String,
}

/// The shared handle a test flips.
#[derive(Debug, Clone, Default)]
pub struct Control(Arc<Mutex<Inner>>);

impl Control {
    fn with<T>(&self, f: impl FnOnce(&mut Inner) -> T) -> T {
        // A test that panicked while holding the lock must not hide its own failure.
        let mut g = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut g)
    }

    pub fn set_scenario(&self, s: Scenario) {
        self.with(|i| i.scenario = s);
    }

    /// The agent runs `commands` with its Bash tool, one per turn, then ends its turn with
    /// text: what a model probing its sandbox would do.
    pub fn run_bash(&self, commands: &[&str]) {
        self.with(|i| i.bash = commands.iter().map(|c| (*c).to_owned()).collect());
    }

    /// The text of each tool result the CLI sent back in the latest agent turn (the Bash
    /// commands' output, or their error), in order.
    pub fn tool_outputs(&self) -> Vec<String> {
        self.with(|i| i.tool_outputs.clone())
    }

    /// The Bash turn of [`Control::run_bash`] for an agent turn (`None`: not set, or a side
    /// request of the CLI).
    fn bash_turn(&self, request: &Value) -> Option<Turn> {
        let agent_turn = request["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "Bash"));
        self.with(|i| {
            if i.bash.is_empty() || !agent_turn {
                return None;
            }
            i.tool_outputs = tool_result_texts(request);
            let done = i.tool_outputs.len();
            Some(match i.bash.get(done) {
                Some(command) => Turn::Bash {
                    id: format!("toolu_scripted_bash_{done:02}"),
                    command: command.clone(),
                },
                None => Turn::Text(format!("Ran {done} command(s).")),
            })
        })
    }

    /// Every request fails with `f` until [`Control::clear_failure`].
    pub fn fail_always(&self, f: Failure) {
        self.with(|i| i.failure = Some(f));
    }

    /// The next `n` requests fail with `f`; then the model answers again.
    pub fn fail_next(&self, n: u32, f: Failure) {
        self.with(|i| {
            i.fail_next = n;
            i.fail_next_with = Some(f);
        });
    }

    pub fn clear_failure(&self) {
        self.with(|i| {
            i.failure = None;
            i.fail_next = 0;
            i.fail_next_with = None;
        });
    }

    /// The first run of `stage`'s agent for each work item gives the negative verdict
    /// (`CHANGES_REQUESTED` / `FAILED`); the run after the rollback passes.
    pub fn reject_first(&self, stage: &str) {
        self.with(|i| i.reject_first.insert(stage.to_owned()));
    }

    /// Whether this run of `stage` for `key` rejects (and remembers that it did).
    fn rejects(&self, key: &str, stage: &str) -> bool {
        self.with(|i| {
            i.reject_first.contains(stage) && i.rejected.insert((key.to_owned(), stage.to_owned()))
        })
    }

    /// Which run of `stage` for `key` the CLI session `session` is (0: the first); a new
    /// session is remembered.
    fn run_index(&self, key: &str, stage: &str, session: &str) -> usize {
        self.with(|i| {
            let runs = i
                .runs
                .entry((key.to_owned(), stage.to_owned()))
                .or_default();
            match runs.iter().position(|s| s == session) {
                Some(n) => n,
                None => {
                    runs.push(session.to_owned());
                    runs.len() - 1
                }
            }
        })
    }

    /// The runs (CLI sessions) of `stage` for `key` that asked for a turn with tools.
    pub fn runs(&self, key: &str, stage: &str) -> usize {
        self.with(|i| {
            i.runs
                .get(&(key.to_owned(), stage.to_owned()))
                .map_or(0, Vec::len)
        })
    }

    /// The distinct Stop hook feedback texts the model received, in order.
    pub fn stop_hook_feedback(&self) -> Vec<String> {
        self.with(|i| i.feedback.clone())
    }

    fn saw_feedback(&self, texts: Vec<String>) {
        self.with(|i| {
            for t in texts {
                if !i.feedback.contains(&t) {
                    i.feedback.push(t);
                }
            }
        });
    }

    /// The agent turns asked for in `stage` of `key`, in order.
    pub fn received(&self, key: &str, stage: &str) -> Vec<Received> {
        self.with(|i| {
            i.received
                .iter()
                .filter(|r| r.key == key && r.stage == stage)
                .cloned()
                .collect()
        })
    }

    /// The first request of each run (CLI session) of `stage` for `key`, in run order:
    /// what the agent was told when it started.
    pub fn first_requests(&self, key: &str, stage: &str) -> Vec<String> {
        let mut seen: Vec<String> = Vec::new();
        let mut out = Vec::new();
        for r in self.received(key, stage) {
            if !seen.contains(&r.session) {
                seen.push(r.session);
                out.push(r.text);
            }
        }
        out
    }

    fn record(&self, request: &Value, session: &str) {
        let has_write = request["tools"]
            .as_array()
            .is_some_and(|t| t.iter().any(|t| t["name"] == "Write"));
        if !has_write {
            return;
        }
        let text = texts(request).join("\n");
        let Some((key, stage)) = run_of(&text) else {
            return;
        };
        self.with(|i| {
            i.received.push(Received {
                key,
                stage,
                session: session.to_owned(),
                text,
            })
        });
    }

    /// `POST /v1/messages` requests received.
    pub fn requests(&self) -> u32 {
        self.with(|i| i.requests)
    }

    /// Requests answered with an error.
    pub fn failures_answered(&self) -> u32 {
        self.with(|i| i.failures_answered)
    }

    /// Requests answered with a turn.
    pub fn turns_answered(&self) -> u32 {
        self.with(|i| i.turns_answered)
    }

    /// What to answer now: an error, or a turn in the current scenario.
    fn next(&self) -> Result<Scenario, Failure> {
        self.with(|i| {
            i.requests += 1;
            let failure = if i.fail_next > 0 {
                i.fail_next -= 1;
                i.fail_next_with.clone()
            } else {
                i.failure.clone()
            };
            match failure {
                Some(f) => {
                    i.failures_answered += 1;
                    Err(f)
                }
                None => {
                    i.turns_answered += 1;
                    Ok(i.scenario)
                }
            }
        })
    }
}

/// A running server; stops when dropped.
pub struct ModelServer {
    pub addr: SocketAddr,
    pub control: Control,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ModelServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ModelServer {
    /// Binds `127.0.0.1:0` and serves in the background (needs a Tokio runtime).
    pub async fn start() -> std::io::Result<Self> {
        let control = Control::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let app = router(control.clone());
        let task = tokio::spawn(async move {
            // The server lives as long as the test holds it; an accept error ends it.
            let _ = axum::serve(listener, app).await;
        });
        Ok(ModelServer {
            addr,
            control,
            task,
        })
    }

    /// The value of `ANTHROPIC_BASE_URL`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }
}

/// The routes, over `control`.
pub fn router(control: Control) -> Router {
    Router::new()
        .route("/api/hello", get(|| async { StatusCode::NOT_FOUND }))
        .route("/v1/messages", post(messages))
        .with_state(control)
}

async fn messages(State(control): State<Control>, headers: HeaderMap, body: String) -> Response {
    let request: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
    control.saw_feedback(stop_hook_feedback(&request));
    let session = session_id(&headers, &request);
    control.record(&request, &session);
    match control.next() {
        Err(f) => {
            let (status, headers, body) = f.response();
            let mut h = HeaderMap::new();
            for (k, v) in headers {
                if let Ok(v) = HeaderValue::from_str(&v) {
                    h.insert(k, v);
                }
            }
            (status, h, axum::Json(body)).into_response()
        }
        Ok(scenario) => {
            let turn = control.bash_turn(&request).unwrap_or_else(|| {
                decide_in_run(
                    scenario,
                    &request,
                    &mut |k, s| control.rejects(k, s),
                    &mut |k, s| control.run_index(k, s, &session),
                )
            });
            let sse = if request["stream"].as_bool() == Some(false) {
                // Not streamed: the whole message as JSON (the CLI streams; kept for curl).
                return axum::Json(message_json(&turn)).into_response();
            } else {
                sse(&turn)
            };
            (
                [
                    (header::CONTENT_TYPE, "text/event-stream"),
                    (header::CACHE_CONTROL, "no-cache"),
                ],
                sse,
            )
                .into_response()
        }
    }
}

/// One answer of the model.
#[derive(Debug, Clone, PartialEq)]
pub enum Turn {
    /// `tool_use` of `Write` with this input, `stop_reason: tool_use`.
    Write {
        id: String,
        file_path: String,
        content: String,
    },
    /// `tool_use` of `Read` of this file, `stop_reason: tool_use`.
    Read { id: String, file_path: String },
    /// `tool_use` of `Bash` running `command`, `stop_reason: tool_use`.
    Bash { id: String, command: String },
    /// Text, `stop_reason: end_turn`.
    Text(String),
}

/// What the deployer runs first in `deploy`: the commit it deploys, for `deployed_sha:`.
pub const HEAD_COMMAND: &str = "git rev-parse HEAD";

/// A file the model writes: path relative to the checkout, and content.
pub type Artifact = (String, String);

/// The files of `stage` for work item `key` (relative paths), as docs/artifacts.md asks.
pub fn artifacts(key: &str, stage: &str) -> Vec<Artifact> {
    artifacts_with(key, stage, false)
}

/// Whether `stage` ends in a verdict (a negative one rolls back).
pub fn has_verdict(stage: &str) -> bool {
    matches!(stage, "review" | "testing" | "deploy-staging" | "deploy")
}

/// The finding a negative verdict of `stage` for `key` holds: a marker a test looks for in
/// what the next agent was told.
pub fn findings(key: &str, stage: &str) -> String {
    format!("FINDING-{key}-{stage}: the handler must answer HEAD requests too")
}

/// [`artifacts`], with the negative verdict when `negative`.
pub fn artifacts_with(key: &str, stage: &str, negative: bool) -> Vec<Artifact> {
    let pick = |pass: &'static str, fail: &'static str| if negative { fail } else { pass };
    let dir = format!("docs/work-items/{key}");
    let doc = |name: &str, title: &str, agent: &str| {
        (
            format!("{dir}/{name}"),
            format!(
                "---\nwork_item: {key}\nauthor: {agent}\n---\n# {title}\n\nWritten by the scripted model for {key}, stage {stage}.\n"
            ),
        )
    };
    let verdict = |name: &str, title: &str, field: &str, value: &str| {
        // A negative verdict names a finding, as a real reviewer would: the agent sent
        // back must be told it ([`findings`]).
        let finding = if negative {
            format!("\n## Findings\n\n- {}\n", findings(key, stage))
        } else {
            String::new()
        };
        (
            format!("{dir}/{name}"),
            format!(
                "---\nwork_item: {key}\n{field}: {value}\n---\n# {title}\n\nThe scripted model says {field}: {value}.\n{finding}"
            ),
        )
    };
    match stage {
        "analysis" => vec![doc("analysis.md", "Analysis", "analyst")],
        "architecture" => vec![doc("architecture.md", "Architecture", "architect")],
        "development" => {
            let module = key.to_ascii_lowercase().replace('-', "_");
            vec![
                (
                    format!("scripted/{module}.py"),
                    format!(
                        "\"\"\"Written by the scripted model for {key}.\"\"\"\n\n\ndef {module}():\n    return True\n"
                    ),
                ),
                doc("development.md", "Development notes", "developer"),
            ]
        }
        "review" => vec![verdict(
            "review.md",
            "Review",
            "review_verdict",
            pick("APPROVED", "CHANGES_REQUESTED"),
        )],
        "testing" => vec![verdict(
            "test-report.md",
            "Test report",
            "test_status",
            pick("PASSED", "FAILED"),
        )],
        "deploy-staging" => vec![verdict(
            "staging.md",
            "Staging",
            "staging_status",
            pick("SUCCESS", "FAILED"),
        )],
        "deploy" => vec![verdict(
            "deploy.md",
            "Deploy",
            "deploy_status",
            pick("SUCCESS", "FAILED"),
        )],
        _ => vec![],
    }
}

/// Every text of the request: the system prompt and the text of all messages.
fn texts(request: &Value) -> Vec<String> {
    let mut out = Vec::new();
    let mut push = |v: &Value| match v {
        Value::String(s) => out.push(s.clone()),
        Value::Array(blocks) => {
            for b in blocks {
                if let Some(t) = b["text"].as_str() {
                    out.push(t.to_owned());
                }
                // A tool_result's content may itself be text blocks or a string.
                match &b["content"] {
                    Value::String(s) => out.push(s.clone()),
                    Value::Array(inner) => out.extend(
                        inner
                            .iter()
                            .filter_map(|i| i["text"].as_str().map(str::to_owned)),
                    ),
                    _ => {}
                }
            }
        }
        _ => {}
    };
    push(&request["system"]);
    if let Some(msgs) = request["messages"].as_array() {
        for m in msgs {
            push(&m["content"]);
        }
    }
    out
}

/// The value after `name` in `text`: `name: value`, `"name": "value"`, `name=value`.
pub fn field(text: &str, name: &str) -> Option<String> {
    let mut from = 0;
    while let Some(i) = text[from..].find(name) {
        let start = from + i;
        from = start + name.len();
        // A whole word: not part of a longer name.
        let before_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !c.is_ascii_alphanumeric() && c != '_');
        if !before_ok {
            continue;
        }
        let rest = text[from..].trim_start_matches(['"', '\'']);
        let Some(rest) = rest
            .trim_start()
            .strip_prefix([':', '='])
            .map(|r| r.trim_start().trim_start_matches(['"', '\'', '`']))
        else {
            continue;
        };
        let value: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '_')
            .collect();
        if !value.is_empty() {
            return Some(value);
        }
    }
    None
}

/// The checkout, from the CLI's system prompt (`Primary working directory: /path`).
pub fn working_directory(texts: &[String]) -> Option<String> {
    for t in texts {
        for marker in ["Primary working directory:", "Working directory:"] {
            if let Some(i) = t.find(marker) {
                let rest = t[i + marker.len()..].trim_start();
                let dir: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
                if dir.starts_with('/') {
                    return Some(dir);
                }
            }
        }
    }
    None
}

/// The value of the launcher's task line `- <label>: VALUE` (its prompt's "Your task"
/// section), up to the first space.
pub fn task_line(text: &str, label: &str) -> Option<String> {
    let marker = format!("- {label}: ");
    text.lines().find_map(|l| {
        let v = l.trim_start().strip_prefix(&marker)?;
        let v: String = v.chars().take_while(|c| !c.is_whitespace()).collect();
        (!v.is_empty()).then_some(v)
    })
}

/// The work item and the stage a conversation works on: the task's own lines
/// (`- work_item: KEY` / `- stage: STAGE` at the start of a line, or the older
/// `- Work item:` / `- Stage:`) first, else the first `work_item:` / `stage:` anywhere.
pub fn run_of(all: &str) -> Option<(String, String)> {
    let key = task_line(all, "work_item")
        .or_else(|| task_line(all, "Work item"))
        .or_else(|| field(all, "work_item"))?;
    let stage = task_line(all, "stage")
        .or_else(|| task_line(all, "Stage"))
        .or_else(|| field(all, "stage"))?;
    Some((key, stage))
}

/// The CLI session a request belongs to (one per run): the `X-Claude-Code-Session-Id`
/// header, else `metadata.user_id`'s `session_id` (a JSON string), else "".
pub fn session_id(headers: &HeaderMap, request: &Value) -> String {
    if let Some(s) = headers
        .get("x-claude-code-session-id")
        .and_then(|v| v.to_str().ok())
    {
        return s.to_owned();
    }
    request["metadata"]["user_id"]
        .as_str()
        .and_then(|u| serde_json::from_str::<Value>(u).ok())
        .and_then(|u| u["session_id"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The Stop hook's feedback messages in the conversation (the CLI sends them as user text
/// starting `Stop hook feedback:`).
fn stop_hook_feedback(request: &Value) -> Vec<String> {
    texts(request)
        .into_iter()
        .filter(|t| t.contains("Stop hook feedback"))
        .collect()
}

/// The first full commit id (40 hex digits) in a `tool_result` of the conversation.
fn commit_in_tool_results(request: &Value) -> Option<String> {
    let msgs = request["messages"].as_array()?;
    let mut texts = Vec::new();
    for b in msgs
        .iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|b| b["type"] == "tool_result")
    {
        match &b["content"] {
            Value::String(s) => texts.push(s.clone()),
            Value::Array(inner) => texts.extend(
                inner
                    .iter()
                    .filter_map(|i| i["text"].as_str().map(str::to_owned)),
            ),
            _ => {}
        }
    }
    texts.iter().find_map(|t| {
        t.split(|c: char| !c.is_ascii_hexdigit())
            .find(|w| w.len() == 40)
            .map(str::to_owned)
    })
}

/// The text of every tool result in the conversation, in order (a string content, or its
/// text blocks joined).
fn tool_result_texts(request: &Value) -> Vec<String> {
    let Some(msgs) = request["messages"].as_array() else {
        return Vec::new();
    };
    msgs.iter()
        .filter(|m| m["role"] == "user")
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .filter(|b| b["type"] == "tool_result")
        .map(|b| match &b["content"] {
            Value::String(s) => s.clone(),
            Value::Array(parts) => parts
                .iter()
                .filter_map(|p| p["text"].as_str())
                .collect::<Vec<_>>()
                .join("\n"),
            _ => String::new(),
        })
        .collect()
}

fn tool_results(request: &Value) -> usize {
    request["messages"]
        .as_array()
        .map(|msgs| {
            msgs.iter()
                .filter(|m| m["role"] == "user")
                .filter_map(|m| m["content"].as_array())
                .flatten()
                .filter(|b| b["type"] == "tool_result")
                .count()
        })
        .unwrap_or(0)
}

/// The heading of the launcher's prompt when it resumes a session after a failed gate.
pub const RESUMED_HEADING: &str = "# The quality gate still lacks";

/// What the model answers to `request` in `scenario` (never a negative verdict).
pub fn decide(scenario: Scenario, request: &Value) -> Turn {
    decide_with(scenario, request, &mut |_, _| false)
}

/// What the model answers; `rejects(key, stage)` is asked once per run of a verdict stage
/// whether this run gives the negative verdict.
pub fn decide_with(
    scenario: Scenario,
    request: &Value,
    rejects: &mut dyn FnMut(&str, &str) -> bool,
) -> Turn {
    decide_in_run(scenario, request, rejects, &mut |_, _| 0)
}

/// [`decide_with`], and `run_index(key, stage)` tells which run of the stage this request
/// belongs to (0: the first), for [`Scenario::LazyFirstRun`].
pub fn decide_in_run(
    scenario: Scenario,
    request: &Value,
    rejects: &mut dyn FnMut(&str, &str) -> bool,
    run_index: &mut dyn FnMut(&str, &str) -> usize,
) -> Turn {
    // A side request of the CLI (no tools: a title, a summary): plain text.
    let has_write = request["tools"]
        .as_array()
        .is_some_and(|t| t.iter().any(|t| t["name"] == "Write"));
    if !has_write {
        return Turn::Text("Scripted model.".to_owned());
    }
    let texts = texts(request);
    let all = texts.join("\n");
    // The launcher's task lines name this run's item and stage; a role prompt may mention
    // other stages ("Your stages: deploy-staging, deploy").
    let Some((key, stage)) = run_of(&all) else {
        return Turn::Text(
            "The scripted model found no `work_item:` and `stage:` in the prompt; nothing written."
                .to_owned(),
        );
    };
    // Told that its work is not done — by the Stop hook, or by the launcher when it resumes
    // the session after the gate failed (its prompt is headed "# The quality gate still
    // lacks", services/launcher/src/resume.rs; the role prompts only mention it inline) —
    // the model does the work, as a real one would.
    let feedback = all.contains("Stop hook feedback")
        || texts.iter().any(|t| {
            t.trim_start().starts_with(RESUMED_HEADING)
                || t.contains(&format!("\n{RESUMED_HEADING}\n"))
        });
    let lazy = Turn::Text(format!("{stage} of {key} looks done to me."));
    let dir = working_directory(&texts);
    let in_checkout = |path: &str| match &dir {
        Some(dir) => format!("{}/{path}", dir.trim_end_matches('/')),
        None => path.to_owned(),
    };
    let mut done = tool_results(request);
    match scenario {
        Scenario::WriteArtifacts => {}
        Scenario::LazyUntilStopHook if !feedback => return lazy,
        Scenario::LazyUntilStopHook => {}
        Scenario::NeverWrites => return lazy,
        Scenario::LazyFirstRun => {
            let first_run = run_index(&key, &stage) == 0;
            if done == 0 {
                return Turn::Read {
                    id: "toolu_scripted_read".to_owned(),
                    file_path: in_checkout("README.md"),
                };
            }
            if first_run && !feedback {
                return lazy;
            }
            // The Read's result is not a file written.
            done -= 1;
        }
    }
    // In `deploy` the deployer first asks git which commit it deploys (`deployed_sha:`,
    // which PostDeploy.Arm needs), as a real model would with the Bash tool.
    let asks_head = stage == "deploy";
    if asks_head {
        if done == 0 {
            return Turn::Bash {
                id: "toolu_scripted_head".to_owned(),
                command: HEAD_COMMAND.to_owned(),
            };
        }
        // The Bash result is not a file written.
        done -= 1;
    }
    // The verdict is written on the run's first write: that is where the run decides.
    let negative = done == 0 && has_verdict(&stage) && rejects(&key, &stage);
    let mut files = artifacts_with(&key, &stage, negative);
    if asks_head && let Some(sha) = commit_in_tool_results(request) {
        for (_, content) in &mut files {
            *content = content.replacen("---\n", &format!("---\ndeployed_sha: {sha}\n"), 1);
        }
    }
    match files.get(done) {
        Some((path, content)) => Turn::Write {
            id: format!("toolu_scripted_{done:02}"),
            file_path: in_checkout(path),
            content: content.clone(),
        },
        None => Turn::Text(format!(
            "Stage {stage} of {key}: {} file(s) written.",
            files.len()
        )),
    }
}

impl Turn {
    /// A tool call's id, tool name and input; `None` for text.
    fn tool_use(&self) -> Option<(&str, &'static str, Value)> {
        match self {
            Turn::Write {
                id,
                file_path,
                content,
            } => Some((
                id,
                "Write",
                json!({"file_path": file_path, "content": content}),
            )),
            Turn::Read { id, file_path } => Some((id, "Read", json!({"file_path": file_path}))),
            Turn::Bash { id, command } => Some((
                id,
                "Bash",
                json!({"command": command, "description": "The commit being deployed"}),
            )),
            Turn::Text(_) => None,
        }
    }

    /// The text of a text turn ("" for a tool call).
    fn text(&self) -> &str {
        match self {
            Turn::Text(t) => t,
            _ => "",
        }
    }
}

fn usage(turn: &Turn) -> (Value, u64) {
    let out = match turn {
        Turn::Write { content, .. } => 40 + content.len() as u64 / 4,
        Turn::Read { file_path, .. } => 20 + file_path.len() as u64 / 4,
        Turn::Bash { command, .. } => 30 + command.len() as u64 / 4,
        Turn::Text(t) => 10 + t.len() as u64 / 4,
    };
    (
        json!({
            "input_tokens": 1200,
            "cache_creation_input_tokens": 300,
            "cache_read_input_tokens": 4000,
            "output_tokens": 1
        }),
        out,
    )
}

fn event(name: &str, data: &Value) -> String {
    format!("event: {name}\ndata: {data}\n\n")
}

/// The turn as the Messages API's Server-Sent Events.
pub fn sse(turn: &Turn) -> String {
    let (start_usage, out_tokens) = usage(turn);
    let mut s = event(
        "message_start",
        &json!({"type": "message_start", "message": {
            "id": "msg_scripted", "type": "message", "role": "assistant", "model": MODEL,
            "content": [], "stop_reason": null, "stop_sequence": null, "usage": start_usage
        }}),
    );
    let stop_reason = match turn.tool_use() {
        Some((id, name, input)) => {
            s += &event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "tool_use", "id": id, "name": name, "input": {}}}),
            );
            let input = input.to_string();
            // Streamed in pieces, as the API does: the client must join them.
            let cut = input
                .char_indices()
                .map(|(i, _)| i)
                .nth(input.chars().count() / 2)
                .unwrap_or(0);
            for part in [&input[..cut], &input[cut..]] {
                s += &event(
                    "content_block_delta",
                    &json!({"type": "content_block_delta", "index": 0,
                        "delta": {"type": "input_json_delta", "partial_json": part}}),
                );
            }
            "tool_use"
        }
        None => {
            s += &event(
                "content_block_start",
                &json!({"type": "content_block_start", "index": 0,
                    "content_block": {"type": "text", "text": ""}}),
            );
            s += &event(
                "content_block_delta",
                &json!({"type": "content_block_delta", "index": 0,
                    "delta": {"type": "text_delta", "text": turn.text()}}),
            );
            "end_turn"
        }
    };
    s += &event(
        "content_block_stop",
        &json!({"type": "content_block_stop", "index": 0}),
    );
    s += &event(
        "message_delta",
        &json!({"type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": null},
            "usage": {"output_tokens": out_tokens}}),
    );
    s += &event("message_stop", &json!({"type": "message_stop"}));
    s
}

/// The turn as one non-streamed message.
pub fn message_json(turn: &Turn) -> Value {
    let (mut usage, out) = usage(turn);
    usage["output_tokens"] = json!(out);
    let (content, stop) = match turn.tool_use() {
        Some((id, name, input)) => (
            json!([{"type": "tool_use", "id": id, "name": name, "input": input}]),
            "tool_use",
        ),
        None => (json!([{"type": "text", "text": turn.text()}]), "end_turn"),
    };
    json!({"id": "msg_scripted", "type": "message", "role": "assistant", "model": MODEL,
        "content": content, "stop_reason": stop, "stop_sequence": null, "usage": usage})
}

/// The pinned CLI's version, as `scripts/install-claude-cli` installs it.
pub const CLAUDE_CLI_VERSION: &str = "2.1.328";

/// Where the real Claude Code CLI is: `$ORCH_CLAUDE_CLI`, else
/// `$ORCH_CLAUDE_CLI_DIR/node_modules/.bin/claude`, else
/// `${XDG_CACHE_HOME:-$HOME/.cache}/orchestrator/claude-cli/node_modules/.bin/claude` (where
/// `scripts/install-claude-cli` puts it). `Err` says why it is not there.
pub fn claude_cli() -> Result<std::path::PathBuf, String> {
    use std::path::PathBuf;
    let path = if let Some(p) = std::env::var_os("ORCH_CLAUDE_CLI") {
        PathBuf::from(p)
    } else {
        let dir = std::env::var_os("ORCH_CLAUDE_CLI_DIR")
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("XDG_CACHE_HOME")
                    .map(PathBuf::from)
                    .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
                    .map(|c| c.join("orchestrator/claude-cli"))
            })
            .ok_or("neither ORCH_CLAUDE_CLI, ORCH_CLAUDE_CLI_DIR nor HOME is set")?;
        dir.join("node_modules/.bin/claude")
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "the Claude Code CLI {CLAUDE_CLI_VERSION} is not installed at {} (run scripts/install-claude-cli)",
            path.display()
        ))
    }
}

/// The CLI's path for test `test`, or `None` after printing `SKIPPED <test>: <why>`;
/// with `ORCH_REQUIRE_CLAUDE_CLI` set, a missing CLI panics instead.
pub fn claude_cli_or_skip(test: &str) -> Option<std::path::PathBuf> {
    match claude_cli() {
        Ok(p) => Some(p),
        Err(why) => {
            assert!(
                std::env::var_os("ORCH_REQUIRE_CLAUDE_CLI").is_none(),
                "{test}: ORCH_REQUIRE_CLAUDE_CLI is set but {why}"
            );
            // Straight to stderr, past the test harness's capture: a skip is never silent.
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "SKIPPED {test}: {why}");
            None
        }
    }
}

/// The environment for a CLI run against the server at `base_url`: a scripted key, one
/// retry, and nothing that would leave loopback. Add a throwaway `HOME` and `PATH`.
pub fn cli_env(base_url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ANTHROPIC_BASE_URL", base_url.to_owned()),
        ("ANTHROPIC_API_KEY", "sk-scripted-model".to_owned()),
        ("CLAUDE_CODE_MAX_RETRIES", "1".to_owned()),
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC", "1".to_owned()),
        ("DISABLE_AUTOUPDATER", "1".to_owned()),
        ("DISABLE_TELEMETRY", "1".to_owned()),
        ("DISABLE_ERROR_REPORTING", "1".to_owned()),
    ]
}

#[cfg(test)]
mod tests;
