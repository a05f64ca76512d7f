//! `orchestrator item ...`: the local tracker's command line. Thin gRPC clients of a
//! running stack (the configured `ORCH_*_URL`s): stage-engine for the work items, their
//! history and comments, the human approval, retry and cancel; usage-ledger for what the
//! agents spent.

use std::fmt::Write as _;
use std::path::PathBuf;

use clap::Subcommand;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::time::rfc3339;
use orchestrator_proto::stage_engine::v1::{
    AdvanceOutcome, AdvanceStageResponse, ApproveRequest, CancelRequest, CreateWorkItemRequest,
    GetWorkItemRequest, ListCommentsRequest, ListTransitionsRequest, ListWorkItemsRequest,
    RetryRequest, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::WorkItemSummaryRequest;

/// The key prefix of items created here when no `--key` is given: `LOCAL-1`, `LOCAL-2`, ...
pub const LOCAL_KEY_PREFIX: &str = "LOCAL";

#[derive(Debug, Clone, Subcommand)]
pub enum ItemCommand {
    /// Creates a work item at `analysis` (the analyst is enqueued); prints its key.
    Create {
        /// The forge repository, `owner/name` (local forge: `ORCH_FORGE_LOCAL_DIR/<owner>/<name>.git`).
        #[arg(long)]
        repo: String,
        /// The title.
        title: String,
        /// A file holding the description (Markdown).
        #[arg(long, value_name = "FILE")]
        description: Option<PathBuf>,
        /// The key, e.g. DEMO-1 (default: the next free LOCAL-<n>).
        #[arg(long)]
        key: Option<String>,
    },
    /// Lists work items, newest first.
    List {
        /// Only this status (active, awaiting_approval, blocked, done, cancelled).
        #[arg(long)]
        status: Option<String>,
        /// Only this stage (e.g. review).
        #[arg(long)]
        stage: Option<String>,
        /// Only this repo (`owner/name`).
        #[arg(long)]
        repo: Option<String>,
    },
    /// Shows one work item: stage, status and why, description, history, comments, usage.
    Show {
        /// The work item key.
        key: String,
    },
    /// Approves a work item as a human (the `:approved:` of the human gate).
    Approve {
        /// The work item key.
        key: String,
        /// Who approves (default: $USER). A bot's name is refused by stage-engine.
        #[arg(long = "as", value_name = "NAME")]
        author: Option<String>,
    },
    /// Retries a blocked work item: its stage's agent runs again, with a fresh budget
    /// (the `:retry:` of the tracker).
    Retry {
        /// The work item key.
        key: String,
        /// Who retries (default: $USER). A bot's name is refused by stage-engine.
        #[arg(long = "as", value_name = "NAME")]
        author: Option<String>,
    },
    /// Cancels a work item that has not ended, and its queued or running job.
    Cancel {
        /// The work item key.
        key: String,
        /// Why (recorded on the item and in its comment).
        #[arg(long)]
        reason: Option<String>,
        /// Who cancels (default: $USER).
        #[arg(long = "as", value_name = "NAME")]
        author: Option<String>,
    },
}

/// `--as`, else $USER, else `human`.
fn author_or_user(author: Option<String>) -> String {
    author
        .or_else(|| std::env::var("USER").ok())
        .filter(|a| !a.trim().is_empty())
        .unwrap_or_else(|| "human".to_owned())
}

/// What went wrong; printed as `error: ...`.
#[derive(Debug, thiserror::Error)]
pub enum ItemError {
    #[error("{0}: {1}")]
    Rpc(&'static str, String),
    #[error("cannot read the description {0}: {1}")]
    Description(PathBuf, std::io::Error),
    #[error("no free {LOCAL_KEY_PREFIX}-<n> key after {0} tries; give --key")]
    NoKey(u32),
}

fn rpc(what: &'static str) -> impl FnOnce(tonic::Status) -> ItemError {
    move |s| {
        let msg = if s.message().is_empty() {
            format!("{:?}", s.code())
        } else {
            format!("{:?}: {}", s.code(), s.message())
        };
        ItemError::Rpc(what, msg)
    }
}

/// Runs one item command; returns what to print on stdout.
pub async fn run(clients: &Clients, command: ItemCommand) -> Result<String, ItemError> {
    match command {
        ItemCommand::Create {
            repo,
            title,
            description,
            key,
        } => {
            let description = match description {
                Some(p) => std::fs::read_to_string(&p).map_err(|e| ItemError::Description(p, e))?,
                None => String::new(),
            };
            create(clients, &repo, &title, &description, key.as_deref()).await
        }
        ItemCommand::List {
            status,
            stage,
            repo,
        } => list(clients, status, stage, repo).await,
        ItemCommand::Show { key } => show(clients, &key).await,
        ItemCommand::Approve { key, author } => {
            approve(clients, &key, &author_or_user(author)).await
        }
        ItemCommand::Retry { key, author } => retry(clients, &key, &author_or_user(author)).await,
        ItemCommand::Cancel {
            key,
            reason,
            author,
        } => {
            cancel(
                clients,
                &key,
                &author_or_user(author),
                reason.as_deref().unwrap_or(""),
            )
            .await
        }
    }
}

/// The next `LOCAL-<n>` after every LOCAL key that exists.
async fn next_local_key(clients: &Clients) -> Result<u64, ItemError> {
    let items = clients
        .stage_engine
        .clone()
        .list_work_items(ListWorkItemsRequest {
            limit: 1000,
            ..Default::default()
        })
        .await
        .map_err(rpc("ListWorkItems"))?
        .into_inner()
        .work_items;
    Ok(items
        .iter()
        .filter_map(|i| {
            i.key
                .strip_prefix(LOCAL_KEY_PREFIX)
                .and_then(|r| r.strip_prefix('-'))
                .and_then(|n| n.parse::<u64>().ok())
        })
        .max()
        .unwrap_or(0)
        + 1)
}

pub async fn create(
    clients: &Clients,
    repo: &str,
    title: &str,
    description: &str,
    key: Option<&str>,
) -> Result<String, ItemError> {
    const TRIES: u32 = 5;
    let mut se = clients.stage_engine.clone();
    let mut n = match key {
        Some(_) => 0,
        None => next_local_key(clients).await?,
    };
    for _ in 0..TRIES {
        // The local tracker's issue id is the key itself: CreateWorkItem is idempotent on it.
        let k = key.map_or_else(|| format!("{LOCAL_KEY_PREFIX}-{n}"), str::to_owned);
        let r = se
            .create_work_item(CreateWorkItemRequest {
                tracker_issue_id: k.clone(),
                key: k.clone(),
                title: title.to_owned(),
                description: description.to_owned(),
                repo: repo.to_owned(),
                ..Default::default()
            })
            .await
            .map_err(rpc("CreateWorkItem"))?
            .into_inner();
        let item = r.work_item.unwrap_or_default();
        if r.created {
            return Ok(format!(
                "created {} ({}) at {} on branch {}\n",
                item.key, item.repo, item.stage, item.branch
            ));
        }
        if key.is_some() {
            return Ok(format!(
                "{} already exists ({}, {} at {}): nothing created\n",
                item.key, item.title, item.status, item.stage
            ));
        }
        // Someone else took LOCAL-<n> meanwhile: the next one.
        n += 1;
    }
    Err(ItemError::NoKey(TRIES))
}

fn row(out: &mut String, i: &WorkItem) {
    let _ = writeln!(
        out,
        "{:<12} {:<15} {:<18} {:<20} {}",
        i.key, i.stage, i.status, i.repo, i.title
    );
}

pub async fn list(
    clients: &Clients,
    status: Option<String>,
    stage: Option<String>,
    repo: Option<String>,
) -> Result<String, ItemError> {
    let items = clients
        .stage_engine
        .clone()
        .list_work_items(ListWorkItemsRequest {
            status: status.unwrap_or_default(),
            stage: stage.unwrap_or_default(),
            repo: repo.unwrap_or_default(),
            limit: 1000,
            ..Default::default()
        })
        .await
        .map_err(rpc("ListWorkItems"))?
        .into_inner()
        .work_items;
    let mut out = format!(
        "{:<12} {:<15} {:<18} {:<20} {}\n",
        "KEY", "STAGE", "STATUS", "REPO", "TITLE"
    );
    for i in &items {
        row(&mut out, i);
    }
    if items.is_empty() {
        out.push_str("(no work items)\n");
    }
    Ok(out)
}

/// Comments are HTML on the tracker; the terminal gets the text, one line per paragraph,
/// line break or list item.
fn strip_tags(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut tag: Option<String> = None;
    for c in html.chars() {
        match (&mut tag, c) {
            (None, '<') => tag = Some(String::new()),
            (Some(t), '>') => {
                let name = t
                    .trim_start_matches('/')
                    .split([' ', '/'])
                    .next()
                    .unwrap_or("");
                match name.to_ascii_lowercase().as_str() {
                    "br" | "p" | "div" | "ul" | "ol" | "li" | "h1" | "h2" | "h3" | "pre"
                        if !out.is_empty() && !out.ends_with('\n') =>
                    {
                        out.push('\n')
                    }
                    _ => {}
                }
                if name.eq_ignore_ascii_case("li") && !t.starts_with('/') {
                    out.push_str("- ");
                }
                tag = None;
            }
            (Some(t), c) => t.push(c),
            (None, c) => out.push(c),
        }
    }
    out.trim_end()
        .replace("&amp;", "&")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
}

pub async fn show(clients: &Clients, key: &str) -> Result<String, ItemError> {
    let mut se = clients.stage_engine.clone();
    let item = se
        .get_work_item(GetWorkItemRequest {
            key: key.to_owned(),
        })
        .await
        .map_err(rpc("GetWorkItem"))?
        .into_inner();
    let mut out = String::new();
    let _ = writeln!(out, "{}  {}", item.key, item.title);
    let _ = writeln!(out, "  repo:      {} (branch {})", item.repo, item.branch);
    let _ = writeln!(out, "  stage:     {}", item.stage);
    let _ = writeln!(out, "  status:    {}", item.status);
    if !item.status_reason.is_empty() {
        let _ = writeln!(out, "  reason:    {}", item.status_reason);
    }
    if !item.expected_agent.is_empty() {
        let _ = writeln!(out, "  agent:     {}", item.expected_agent);
    }
    let _ = writeln!(
        out,
        "  rollbacks: {}  stage retries: {}",
        item.rollback_count, item.stage_retries
    );
    let _ = writeln!(out, "  created:   {}", rfc3339(item.created_at_ms));
    let _ = writeln!(out, "  updated:   {}", rfc3339(item.updated_at_ms));
    // As the agent's task shows it: Plane's HTML converted, no control characters.
    let description = if stage_engine::task::looks_like_html(&item.description) {
        stage_engine::task::html_to_text(&item.description)
    } else {
        item.description.clone()
    };
    if !description.trim().is_empty() {
        let _ = writeln!(out, "\nDescription:");
        for line in description.trim_end().lines() {
            let line: String = line
                .chars()
                .filter(|c| !c.is_control() || *c == '\t')
                .collect();
            let _ = writeln!(out, "  {line}");
        }
    }

    let transitions = se
        .list_transitions(ListTransitionsRequest {
            work_item: item.key.clone(),
        })
        .await
        .map_err(rpc("ListTransitions"))?
        .into_inner()
        .transitions;
    let _ = writeln!(out, "\nHistory:");
    for t in &transitions {
        let from = if t.from_stage.is_empty() {
            "(new)"
        } else {
            &t.from_stage
        };
        let by = if t.finished_agent.is_empty() {
            String::new()
        } else {
            format!(" by {}", t.finished_agent)
        };
        let _ = writeln!(
            out,
            "  {}  {from} -> {}  {}{by}",
            rfc3339(t.at_ms),
            t.to_stage,
            t.cause
        );
        for q in t.qg_results.iter().filter(|q| !q.passed) {
            let _ = writeln!(out, "      failed {}: {}", q.check, q.detail);
        }
    }

    let _ = writeln!(out, "\nComments:");
    match se
        .list_comments(ListCommentsRequest {
            work_item: item.key.clone(),
        })
        .await
    {
        Ok(c) => {
            let comments = c.into_inner().comments;
            if comments.is_empty() {
                let _ = writeln!(out, "  (none yet)");
            }
            for c in comments {
                // The local tracker stores epoch ms; Plane gives RFC 3339 already.
                let at = c
                    .created_at
                    .parse::<i64>()
                    .map_or_else(|_| c.created_at.clone(), rfc3339);
                let text = strip_tags(&c.html);
                let mut lines = text.lines();
                let _ = writeln!(out, "  [{at}] {}: {}", c.author, lines.next().unwrap_or(""));
                for line in lines.filter(|l| !l.trim().is_empty()) {
                    let _ = writeln!(out, "      {line}");
                }
            }
        }
        // The tracker being down must not hide the rest.
        Err(s) => {
            let _ = writeln!(out, "  unavailable: {}", s.message());
        }
    }

    let _ = writeln!(out, "\nUsage:");
    match clients
        .usage_ledger
        .clone()
        .work_item_summary(WorkItemSummaryRequest {
            work_item: item.key.clone(),
        })
        .await
    {
        Ok(s) => {
            let s = s.into_inner();
            if s.agents.is_empty() {
                let _ = writeln!(out, "  (no agent runs yet)");
            } else {
                for line in s.text.lines() {
                    let _ = writeln!(out, "  {line}");
                }
            }
        }
        Err(s) => {
            let _ = writeln!(out, "  unavailable: {}", s.message());
        }
    }
    Ok(out)
}

/// `StageEngine.Approve` as `author`: the human gate's `:approved:`, each call its own
/// comment. Returns stage-engine's answer (whether the item advanced, and why not).
pub async fn approve_as(
    clients: &Clients,
    key: &str,
    author: &str,
) -> Result<AdvanceStageResponse, ItemError> {
    Ok(clients
        .stage_engine
        .clone()
        .approve(ApproveRequest {
            work_item: key.to_owned(),
            author: author.to_owned(),
            comment_id: format!("cli-{}", orchestrator_kit::time::now_ms()),
            ..Default::default()
        })
        .await
        .map_err(rpc("Approve"))?
        .into_inner())
}

pub async fn approve(clients: &Clients, key: &str, author: &str) -> Result<String, ItemError> {
    let r = approve_as(clients, key, author).await?;
    let item = r.work_item.unwrap_or_default();
    let outcome = AdvanceOutcome::try_from(r.outcome)
        .map(|o| o.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| r.outcome.to_string());
    let mut out = format!(
        "{key} approved by {author}: {outcome}; now at {} ({})\n",
        item.stage, item.status
    );
    if !r.reason.is_empty() {
        let _ = writeln!(out, "  {}", r.reason);
    }
    if !r.enqueued_agent.is_empty() {
        let _ = writeln!(out, "  enqueued: {}", r.enqueued_agent);
    }
    Ok(out)
}

/// What a Retry or Cancel answered, as printed.
fn answered(key: &str, verb: &str, author: &str, r: AdvanceStageResponse) -> String {
    let item = r.work_item.unwrap_or_default();
    let outcome = AdvanceOutcome::try_from(r.outcome)
        .map(|o| o.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| r.outcome.to_string());
    let mut out = format!(
        "{key} {verb} by {author}: {outcome}; now at {} ({})\n",
        item.stage, item.status
    );
    if !r.reason.is_empty() {
        let _ = writeln!(out, "  {}", r.reason);
    }
    if !r.enqueued_agent.is_empty() {
        let _ = writeln!(out, "  enqueued: {}", r.enqueued_agent);
    }
    out
}

/// `StageEngine.Retry` as `author`: a blocked item's stage runs again.
pub async fn retry(clients: &Clients, key: &str, author: &str) -> Result<String, ItemError> {
    let r = clients
        .stage_engine
        .clone()
        .retry(RetryRequest {
            work_item: key.to_owned(),
            author: author.to_owned(),
            comment_id: format!("cli-retry-{}", orchestrator_kit::time::now_ms()),
            ..Default::default()
        })
        .await
        .map_err(rpc("Retry"))?
        .into_inner();
    Ok(answered(key, "retried", author, r))
}

/// `StageEngine.Cancel` as `author`: the item ends, and its job with it.
pub async fn cancel(
    clients: &Clients,
    key: &str,
    author: &str,
    reason: &str,
) -> Result<String, ItemError> {
    let r = clients
        .stage_engine
        .clone()
        .cancel(CancelRequest {
            work_item: key.to_owned(),
            author: author.to_owned(),
            reason: reason.to_owned(),
        })
        .await
        .map_err(rpc("Cancel"))?
        .into_inner();
    Ok(answered(key, "cancelled", author, r))
}

#[cfg(test)]
mod tests {
    use super::strip_tags;

    #[test]
    fn comment_html_becomes_lines_of_text() {
        for (html, text) in [
            ("plain", "plain"),
            ("<p>one</p><p>two &amp; three</p>", "one\ntwo & three"),
            ("a<br>b<br/>c", "a\nb\nc"),
            (
                "<p>Checks:</p><ul><li>x passed</li><li>y failed</li></ul>",
                "Checks:\n- x passed\n- y failed",
            ),
            ("<b>bold</b> <a href=\"u\">link</a>", "bold link"),
            ("&lt;tag&gt; &quot;q&quot;", "<tag> \"q\""),
        ] {
            assert_eq!(strip_tags(html), text, "{html}");
        }
    }
}
