//! `GET /items/{key}`: a work item's page. Its timeline (every transition with its cause
//! and actor), its runs with their usage, the reason each job was given, the comments, the
//! dead letters of its outbox, and the live log of a running agent.

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use orchestrator_agent_output::Usage;
use orchestrator_kit::time::now_ms;
use orchestrator_proto::launcher::v1::{Job, JobStatus, ListJobsRequest};
use orchestrator_proto::post_deploy::v1::GetWatchRequest;
use orchestrator_proto::stage_engine::v1::{
    Artifact, GetWorkItemRequest, ListArtifactsRequest, ListCommentsRequest, ListOutboxRequest,
    ListTransitionsRequest, Transition, WorkItem,
};
use orchestrator_proto::usage_ledger::v1::{AgentRun, ListRunsRequest};
use usage_ledger::format;

use super::Access;
use super::html::{self, Esc, Url};
use crate::Shared;

pub(crate) async fn page(
    access: Access,
    State(shared): State<Arc<Shared>>,
    Path(key): Path<String>,
) -> Response {
    let item = shared
        .clients
        .stage_engine
        .clone()
        .get_work_item(GetWorkItemRequest { key: key.clone() })
        .await;
    let item = match item {
        Ok(i) => i.into_inner(),
        Err(s) => {
            let status = if s.code() == tonic::Code::NotFound {
                StatusCode::NOT_FOUND
            } else {
                StatusCode::BAD_GATEWAY
            };
            let body = format!(
                "<h1>{}</h1><p class=\"error\">{}</p><p><a href=\"/\">Back to the board</a></p>",
                Esc(&key),
                Esc(s.message())
            );
            return (status, html::page(&key, "", Some(&access), &body)).into_response();
        }
    };
    let body = render(&shared, &access, &item).await;
    html::page(&item.key, "", Some(&access), &body).into_response()
}

async fn render(shared: &Shared, access: &Access, item: &WorkItem) -> String {
    let now = now_ms();
    let key = item.key.clone();
    let (mut se1, mut se2, mut se3, mut se4) = (
        shared.clients.stage_engine.clone(),
        shared.clients.stage_engine.clone(),
        shared.clients.stage_engine.clone(),
        shared.clients.stage_engine.clone(),
    );
    let mut launcher = shared.clients.launcher.clone();
    let mut ledger = shared.clients.usage_ledger.clone();
    let mut post_deploy = shared.clients.post_deploy.clone();
    let (transitions, jobs, runs, comments, outbox, watch, artifacts) = tokio::join!(
        se1.list_transitions(ListTransitionsRequest {
            work_item: key.clone()
        }),
        launcher.list_jobs(ListJobsRequest {
            work_item: key.clone(),
            limit: 1000,
            ..Default::default()
        }),
        ledger.list_runs(ListRunsRequest {
            work_item: key.clone(),
            ..Default::default()
        }),
        se2.list_comments(ListCommentsRequest {
            work_item: key.clone()
        }),
        se3.list_outbox(ListOutboxRequest {
            work_item: key.clone(),
            state: "failed".to_owned(),
            limit: 100,
        }),
        post_deploy.get_watch(GetWatchRequest {
            work_item: key.clone()
        }),
        se4.list_artifacts(ListArtifactsRequest {
            work_item: key.clone()
        }),
    );
    let mut out = String::with_capacity(32 * 1024);
    let _ = write!(
        out,
        "<div class=\"titlebar\"><h1><span class=\"key\">{}</span> {}</h1>{}</div>\
         <p class=\"item-title\" id=\"item-title\">{}</p>",
        Esc(&item.key),
        html::status_badge(&item.status),
        actions(access, item),
        Esc(&item.title)
    );
    let _ = write!(
        out,
        "<dl class=\"facts\"><dt>stage</dt><dd id=\"stage\">{}</dd><dt>repository</dt><dd>{}</dd>\
         <dt>branch</dt><dd><code>{}</code></dd><dt>created</dt><dd>{}</dd><dt>last change</dt><dd>{}</dd>\
         <dt>rollbacks</dt><dd>{}</dd>",
        Esc(&item.stage),
        Esc(&item.repo),
        Esc(&item.branch),
        html::time(now, item.created_at_ms),
        html::time(now, item.updated_at_ms),
        item.rollback_count
    );
    if item.pr_number > 0 {
        let _ = write!(
            out,
            "<dt>PR</dt><dd class=\"pr\">{}</dd>",
            html::forge_link(&item.pr_url, &format!("#{}", item.pr_number))
        );
    }
    if !item.expected_agent.is_empty() {
        let _ = write!(
            out,
            "<dt>waiting for</dt><dd>{}</dd>",
            Esc(&item.expected_agent)
        );
    }
    out.push_str("</dl>");
    if !item.status_reason.is_empty() {
        let _ = write!(out, "<p class=\"reason\">{}</p>", Esc(&item.status_reason));
    }

    let jobs = match jobs {
        Ok(j) => j.into_inner().jobs,
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"error\">Cannot read the jobs (launcher): {}</p>",
                Esc(e.message())
            );
            Vec::new()
        }
    };
    // The live log: the running job's, followed; readable afterwards at its own address.
    if let Some(j) = jobs.iter().find(|j| j.status == JobStatus::Running as i32) {
        let _ = write!(
            out,
            "<section><h2>Live log · {} <span class=\"muted\">attempt {}</span></h2>\
             <pre class=\"log\" id=\"live-log\" data-stream=\"/jobs/{id}/log/stream\"></pre>\
             <p class=\"muted\"><a href=\"/jobs/{id}/log\">The whole log</a> (without JavaScript: reload it).</p></section>",
            Esc(&j.agent),
            j.attempt,
            id = Url(&j.id)
        );
    }

    out.push_str("<section><h2>Timeline</h2>");
    match transitions {
        Ok(t) => timeline(&mut out, &t.into_inner().transitions, now),
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"error\">Cannot read the transitions: {}</p>",
                Esc(e.message())
            );
        }
    }
    out.push_str("</section><section><h2>Runs</h2>");
    let runs = match runs {
        Ok(r) => r.into_inner().runs,
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"error\">Cannot read the runs (usage-ledger): {}</p>",
                Esc(e.message())
            );
            Vec::new()
        }
    };
    runs_table(&mut out, &jobs, &runs, now, access);
    out.push_str("</section>");

    match outbox {
        Ok(o) => {
            let dead = o.into_inner().entries;
            if !dead.is_empty() {
                out.push_str("<section><h2>Dead letters</h2><table><thead><tr><th>kind</th><th>channel</th><th>attempts</th><th>last error</th><th>created</th></tr></thead><tbody>");
                for e in &dead {
                    let _ = write!(
                        out,
                        "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                        Esc(&e.kind),
                        Esc(&e.channel),
                        e.attempts,
                        Esc(&e.last_error),
                        html::time(now, e.created_at_ms)
                    );
                }
                out.push_str("</tbody></table>");
                out.push_str(&html::action_button(
                    access,
                    &format!("/items/{}/outbox/retry", Url(&item.key)),
                    "Retry these dead letters",
                    "",
                ));
                out.push_str("</section>");
            }
        }
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"error\">Cannot read the outbox: {}</p>",
                Esc(e.message())
            );
        }
    }

    out.push_str("<section><h2>Artifacts</h2>");
    match artifacts {
        Ok(a) => artifacts_list(&mut out, &a.into_inner().artifacts),
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"error\">Cannot read the artifacts: {}</p>",
                Esc(e.message())
            );
        }
    }
    out.push_str("</section>");

    match watch {
        Ok(w) => {
            let w = w.into_inner();
            let _ = write!(
                out,
                "<section><h2>Post-deploy watch</h2><dl class=\"facts\"><dt>state</dt><dd>{}</dd>\
                 <dt>deployed</dt><dd><code>{}</code> (before: <code>{}</code>)</dd><dt>armed</dt><dd>{}</dd>\
                 <dt>window ends</dt><dd>{}</dd><dt>health failures in a row</dt><dd>{}</dd>\
                 <dt>last action</dt><dd>{}</dd></dl></section>",
                Esc(&w.state),
                Esc(&w.deployed_sha),
                Esc(&w.previous_sha),
                html::time(now, w.armed_at_ms),
                html::time(now, w.window_end_ms),
                w.consecutive_health_failures,
                Esc(&w.last_action)
            );
        }
        Err(e) if e.code() == tonic::Code::NotFound => {}
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"muted\">Post-deploy watch unavailable: {}</p>",
                Esc(e.message())
            );
        }
    }

    out.push_str("<section><h2>Comments</h2>");
    match comments {
        Ok(c) => {
            let comments = c.into_inner().comments;
            if comments.is_empty() {
                out.push_str("<p class=\"muted\">No comments.</p>");
            }
            for c in &comments {
                let _ = write!(
                    out,
                    "<article class=\"comment\"><header><strong>{}</strong> <span class=\"muted\">{}</span></header><div class=\"comment-body\">{}</div></article>",
                    Esc(&c.author),
                    Esc(&c.created_at),
                    Esc(&text_of_html(&c.html))
                );
            }
        }
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"muted\">Comments unavailable: {}</p>",
                Esc(e.message())
            );
        }
    }
    out.push_str("</section>");
    out
}

/// The buttons for what a human may do to the item now.
fn actions(access: &Access, item: &WorkItem) -> String {
    let key = Url(&item.key);
    let mut out = String::from("<div class=\"actions\">");
    if item.status == "awaiting_approval" {
        out.push_str(&html::action_button(
            access,
            &format!("/items/{key}/approve"),
            "Approve",
            "primary",
        ));
    }
    if item.status == "blocked" {
        out.push_str(&html::action_button(
            access,
            &format!("/items/{key}/retry"),
            "Retry",
            "primary",
        ));
    }
    if item.status != "done" && item.status != "cancelled" {
        out.push_str(&html::action_button(
            access,
            &format!("/items/{key}/cancel"),
            "Cancel item",
            "danger",
        ));
    }
    out.push_str("</div>");
    out
}

fn timeline(out: &mut String, transitions: &[Transition], now: i64) {
    if transitions.is_empty() {
        out.push_str("<p class=\"muted\">No transitions yet.</p>");
        return;
    }
    out.push_str("<table class=\"timeline\"><thead><tr><th>when</th><th>from</th><th>to</th><th>cause</th><th>by</th><th>checks</th></tr></thead><tbody>");
    for t in transitions {
        let failed: Vec<String> = t
            .qg_results
            .iter()
            .filter(|q| !q.passed)
            .map(|q| format!("{}: {}", q.check, q.detail))
            .collect();
        let checks = if t.qg_results.is_empty() {
            String::new()
        } else if failed.is_empty() {
            format!("{} passed", t.qg_results.len())
        } else {
            failed.join("; ")
        };
        let _ = write!(
            out,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            html::time(now, t.at_ms),
            Esc(&t.from_stage),
            Esc(&t.to_stage),
            Esc(&t.cause),
            Esc(&t.finished_agent),
            Esc(&checks)
        );
    }
    out.push_str("</tbody></table>");
}

/// One row per run the ledger recorded, and one for the attempt in flight; each with its
/// job's reason (what the job was asked to do).
fn runs_table(out: &mut String, jobs: &[Job], runs: &[AgentRun], now: i64, access: &Access) {
    if jobs.is_empty() && runs.is_empty() {
        out.push_str("<p class=\"muted\">No runs yet.</p>");
        return;
    }
    let by_id: HashMap<&str, &Job> = jobs.iter().map(|j| (j.id.as_str(), j)).collect();
    out.push_str("<table class=\"runs\"><thead><tr><th>agent</th><th>attempt</th><th>started</th><th>duration</th><th>usage</th><th>outcome</th><th>profile</th><th>task</th><th></th></tr></thead><tbody>");
    let mut rows: Vec<(i64, String)> = Vec::new();
    for r in runs {
        let job = by_id.get(r.job_id.as_str());
        let latest = job.filter(|j| j.attempt == r.attempt);
        let started = latest
            .map(|j| j.started_at_ms)
            .unwrap_or_else(|| r.recorded_at_ms - r.duration_ms.unwrap_or(0));
        let duration = latest
            .filter(|j| j.finished_at_ms > 0 && j.started_at_ms > 0)
            .map(|j| j.finished_at_ms - j.started_at_ms)
            .or(r.duration_ms);
        let usage = format::run_usage(
            Usage {
                input_tokens: r.input_tokens,
                output_tokens: r.output_tokens,
                cache_read_tokens: r.cache_read_tokens,
                cache_creation_tokens: r.cache_creation_tokens,
            },
            r.total_cost_usd,
        );
        let outcome = match (latest, r.is_error) {
            (Some(j), _) if !j.outcome.is_empty() => j.outcome.clone(),
            (_, Some(true)) => "error".to_owned(),
            (_, Some(false)) => "success".to_owned(),
            _ => "unknown".to_owned(),
        };
        rows.push((
            started,
            row(
                &r.agent,
                r.attempt,
                started,
                duration,
                &usage,
                &outcome,
                job.copied(),
                now,
                &r.job_id,
                access,
                false,
            ),
        ));
    }
    for j in jobs {
        let recorded = runs
            .iter()
            .any(|r| r.job_id == j.id && r.attempt == j.attempt);
        if recorded {
            continue;
        }
        let status = JobStatus::try_from(j.status)
            .map(|s| s.as_str_name().to_ascii_lowercase())
            .unwrap_or_else(|_| "unknown".to_owned());
        let live = j.status == JobStatus::Running as i32 || j.status == JobStatus::Queued as i32;
        let duration = match j.status {
            s if s == JobStatus::Running as i32 => Some(now - j.started_at_ms),
            _ if j.finished_at_ms > 0 && j.started_at_ms > 0 => {
                Some(j.finished_at_ms - j.started_at_ms)
            }
            _ => None,
        };
        let outcome = if j.outcome.is_empty() {
            status
        } else {
            j.outcome.clone()
        };
        let at = if j.started_at_ms > 0 {
            j.started_at_ms
        } else {
            j.enqueued_at_ms
        };
        rows.push((
            at,
            row(
                &j.agent,
                j.attempt,
                j.started_at_ms,
                duration,
                "—",
                &outcome,
                Some(j),
                now,
                &j.id,
                access,
                live,
            ),
        ));
    }
    rows.sort_by_key(|(at, _)| *at);
    for (_, r) in rows {
        out.push_str(&r);
    }
    out.push_str("</tbody></table>");
}

#[allow(clippy::too_many_arguments)]
fn row(
    agent: &str,
    attempt: u32,
    started: i64,
    duration: Option<i64>,
    usage: &str,
    outcome: &str,
    job: Option<&Job>,
    now: i64,
    job_id: &str,
    access: &Access,
    live: bool,
) -> String {
    // The job's payload: `task` is what stage-engine composed for the agent (it quotes the
    // tracker's description and comments, so it is escaped), `reason` why the job exists.
    let payload = job.and_then(|j| serde_json::from_str::<serde_json::Value>(&j.payload_json).ok());
    let field = |name: &str| {
        payload
            .as_ref()
            .and_then(|p| p.get(name))
            .and_then(|v| v.as_str())
            .filter(|v| !v.is_empty())
    };
    let mut task = String::new();
    if let Some(t) = field("task") {
        let _ = write!(
            task,
            "<details class=\"task\"><summary>task</summary><pre class=\"task\">{}</pre></details>",
            Esc(t)
        );
    }
    if let Some(r) = field("reason") {
        let _ = write!(task, "<details><summary>why</summary>{}</details>", Esc(r));
    }
    // The launcher keeps the profile of the job's latest attempt only.
    let profile = job
        .filter(|j| j.attempt == attempt && !j.profile_json.is_empty())
        .map(|j| profile_cell(&j.profile_json))
        .unwrap_or_else(|| "—".to_owned());
    let reason = job
        .filter(|j| !j.reason.is_empty())
        .map(|j| format!("<div class=\"muted small\">{}</div>", Esc(&j.reason)))
        .unwrap_or_default();
    let cancel = if live {
        html::action_button(
            access,
            &format!("/jobs/{}/cancel", Url(job_id)),
            "Cancel job",
            "danger small",
        )
    } else {
        String::new()
    };
    format!(
        "<tr><td>{}</td><td class=\"num\">{attempt}</td><td>{}</td><td class=\"num\">{}</td><td class=\"usage\">{}</td>\
         <td>{}{reason}</td><td>{profile}</td><td>{task}</td><td><a href=\"/jobs/{}/log\">log</a>{cancel}</td></tr>",
        Esc(agent),
        html::time(now, started),
        duration
            .map(html::duration)
            .unwrap_or_else(|| "—".to_owned()),
        Esc(usage),
        Esc(outcome),
        Url(job_id),
    )
}

/// The profile a run ran with (`Job.profile_json`): its name and model in the summary, the
/// whole of it, pretty-printed, when opened.
fn profile_cell(profile_json: &str) -> String {
    let Ok(p) = serde_json::from_str::<serde_json::Value>(profile_json) else {
        return format!("<code>{}</code>", Esc(profile_json));
    };
    let name = p
        .get("profile")
        .and_then(|v| v.as_str())
        .unwrap_or("profile");
    let summary = match p.get("model").and_then(|v| v.as_str()) {
        Some(model) if !model.is_empty() => format!("{name} · {model}"),
        _ => name.to_owned(),
    };
    let pretty = serde_json::to_string_pretty(&p).unwrap_or_else(|_| profile_json.to_owned());
    format!(
        "<details class=\"profile\"><summary>{}</summary><pre class=\"profile\">{}</pre></details>",
        Esc(&summary),
        Esc(&pretty)
    )
}

/// A comment's HTML as plain text: tags dropped, the few entities trackers use decoded.
/// The result is escaped again when shown, so nothing of the markup survives.
pub(crate) fn text_of_html(html: &str) -> String {
    let mut out = String::with_capacity(html.len());
    let mut in_tag = false;
    for c in html.chars() {
        match c {
            '<' => in_tag = true,
            '>' if in_tag => {
                in_tag = false;
                out.push(' ');
            }
            _ if !in_tag => out.push(c),
            _ => {}
        }
    }
    let out = out
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&#39;", "'")
        .replace("&nbsp;", " ")
        .replace("&amp;", "&");
    out.split_whitespace().collect::<Vec<_>>().join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_profile_cell_names_the_profile_and_escapes_it() {
        let cell = profile_cell(r#"{"profile":"dev<b>","model":"sonnet","max_turns":30}"#);
        assert!(
            cell.contains("<summary>dev&lt;b&gt; · sonnet</summary>"),
            "{cell}"
        );
        assert!(cell.contains("&quot;max_turns&quot;: 30"), "{cell}");
        assert!(!cell.contains("<b>"), "{cell}");
        let bad = profile_cell("not json <i>");
        assert_eq!(bad, "<code>not json &lt;i&gt;</code>");
    }

    #[test]
    fn comment_html_becomes_text() {
        assert_eq!(
            text_of_html("<p>Looks <b>good</b> &amp; :approved:</p>"),
            "Looks good & :approved:"
        );
        assert_eq!(text_of_html("&lt;script&gt;x"), "<script>x");
        assert_eq!(
            Esc(&text_of_html("&lt;script&gt;x")).to_string(),
            "&lt;script&gt;x"
        );
    }
}

/// The artifacts of the stages reached: a link to the forge's page of each, or — the local
/// forge, whose pages a browser cannot open — its text, collapsed.
fn artifacts_list(out: &mut String, artifacts: &[Artifact]) {
    if artifacts.is_empty() {
        out.push_str("<p class=\"muted\">No artifacts yet.</p>");
        return;
    }
    out.push_str("<ul class=\"artifacts\">");
    for a in artifacts {
        let _ = write!(
            out,
            "<li data-name=\"{}\"><span class=\"muted\">{}</span> ",
            Esc(&a.name),
            Esc(&a.stage)
        );
        match (a.read, a.exists) {
            (false, _) => out.push_str(&html::forge_link(&a.url, &a.name)),
            (true, false) => {
                let _ = write!(
                    out,
                    "<code>{}</code> <span class=\"muted\">not written yet</span>",
                    Esc(&a.name)
                );
            }
            (true, true) => {
                let _ = write!(
                    out,
                    "<details><summary><code>{}</code></summary><pre class=\"artifact\">{}</pre></details>",
                    Esc(&a.name),
                    Esc(&a.content)
                );
            }
        }
        out.push_str("</li>");
    }
    out.push_str("</ul>");
}

#[cfg(test)]
mod artifact_tests {
    use super::*;

    fn artifact(read: bool, exists: bool, content: &str) -> Artifact {
        Artifact {
            stage: "analysis".into(),
            name: "analysis.md".into(),
            path: "docs/work-items/ORCH-1/analysis.md".into(),
            url: "https://git.example/acme/app/src/branch/orch/ORCH-1/docs/work-items/ORCH-1/analysis.md"
                .into(),
            read,
            exists,
            content: content.into(),
        }
    }

    fn shown(a: Artifact) -> String {
        let mut out = String::new();
        artifacts_list(&mut out, &[a]);
        out
    }

    #[test]
    fn artifacts_link_to_the_forge_or_show_their_escaped_text() {
        let gitea = shown(artifact(false, false, ""));
        assert!(
            gitea.contains("<a class=\"forge\" href=\"https://git.example/acme/app/src/branch/orch/ORCH-1/docs/work-items/ORCH-1/analysis.md\">analysis.md</a>"),
            "{gitea}"
        );
        let local = shown(artifact(true, true, "# Analysis\n<script>x()</script>"));
        assert!(
            local.contains(
                "<pre class=\"artifact\"># Analysis\n&lt;script&gt;x()&lt;/script&gt;</pre>"
            ),
            "{local}"
        );
        assert!(!local.contains("<a "), "{local}");
        assert!(shown(artifact(true, false, "")).contains("not written yet"));
    }
}
