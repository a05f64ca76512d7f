//! `GET /`: the board. Work items by stage, blocked and awaiting approval first; filters by
//! repository and status (query `repo`, `status`).

use std::collections::HashMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Query, State};
use axum::response::IntoResponse;
use axum::response::Response;
use orchestrator_kit::time::now_ms;
use orchestrator_proto::launcher::v1::ListRunningRequest;
use orchestrator_proto::stage_engine::v1::{ListWorkItemsRequest, SnapshotRequest, WorkItem};
use orchestrator_proto::usage_ledger::v1::WorkItemCostsRequest;
use serde::Deserialize;
use usage_ledger::format;

use super::Access;
use super::html::{self, Esc, Url};
use crate::Shared;

/// The pipeline's stages in order (stage-engine's `STAGE_TRANSITIONS`; a stage the board
/// does not know gets a column of its own at the end).
pub(crate) const STAGES: &[&str] = &[
    "analysis",
    "architecture",
    "development",
    "review",
    "testing",
    "deploy-staging",
    "deploy",
    "done",
];

/// The statuses in the order the board shows them, and how many of each it asks for: every
/// item a human may have to look at, the latest of the finished ones.
const STATUSES: &[(&str, u32)] = &[
    ("blocked", 1000),
    ("awaiting_approval", 1000),
    ("active", 1000),
    ("done", 100),
    ("cancelled", 100),
];

/// Cards shown per column; the rest are counted.
const CARDS_PER_COLUMN: usize = 200;

#[derive(Deserialize, Default)]
pub(crate) struct Filter {
    #[serde(default)]
    repo: String,
    #[serde(default)]
    status: String,
}

pub(crate) async fn page(
    access: Access,
    State(shared): State<Arc<Shared>>,
    Query(filter): Query<Filter>,
) -> Response {
    let body = render(&shared, &access, &filter).await;
    html::page("Board", "/", Some(&access), &body).into_response()
}

/// The board's HTML (without the page frame), read through the services' RPCs.
pub(crate) async fn render(shared: &Shared, access: &Access, filter: &Filter) -> String {
    let now = now_ms();
    let statuses: Vec<(&str, u32)> = STATUSES
        .iter()
        .copied()
        .filter(|(s, _)| filter.status.is_empty() || *s == filter.status)
        .collect();
    let lists = futures_join_all(shared, &statuses, &filter.repo);
    let mut launcher = shared.clients.launcher.clone();
    let mut stage_engine = shared.clients.stage_engine.clone();
    // `ListRunning`, not `QueueSnapshot`: the cards need the running jobs only, and the
    // snapshot also counts every job ever enqueued, the outbox, the ceilings' spend (calls
    // to usage-ledger) and searches the PATH for the agent command.
    let (lists, running, counts) = tokio::join!(
        lists,
        launcher.list_running(ListRunningRequest {}),
        stage_engine.snapshot(SnapshotRequest {}),
    );
    let mut errors = Vec::new();
    let mut items: Vec<WorkItem> = Vec::new();
    for (status, res) in lists {
        match res {
            Ok(mut list) => items.append(&mut list),
            Err(e) => errors.push(format!("work items ({status}): {}", e.message())),
        }
    }
    // Columns in pipeline order; within one, the order of STATUSES (blocked and awaiting
    // approval first), then the most recently changed.
    let rank = |s: &str| {
        STATUSES
            .iter()
            .position(|(x, _)| *x == s)
            .unwrap_or(STATUSES.len())
    };
    items.sort_by(|a, b| {
        rank(&a.status)
            .cmp(&rank(&b.status))
            .then(b.updated_at_ms.cmp(&a.updated_at_ms))
            .then(a.key.cmp(&b.key))
    });
    let mut columns: Vec<(String, Vec<&WorkItem>)> = STAGES
        .iter()
        .map(|s| ((*s).to_owned(), Vec::new()))
        .collect();
    for item in &items {
        match columns.iter_mut().find(|(s, _)| *s == item.stage) {
            Some((_, list)) => list.push(item),
            None => columns.push((item.stage.clone(), vec![item])),
        }
    }
    // The costs of the cards shown only (at most CARDS_PER_COLUMN a column): a read through
    // the ledger's index, not a sum over every run ever recorded.
    let shown_keys: Vec<String> = columns
        .iter()
        .flat_map(|(_, list)| list.iter().take(CARDS_PER_COLUMN))
        .map(|i| i.key.clone())
        .collect();
    let costs: HashMap<String, (u32, f64)> = if shown_keys.is_empty() {
        // No keys would ask for every item's cost.
        HashMap::new()
    } else {
        let costs = shared
            .clients
            .usage_ledger
            .clone()
            .work_item_costs(WorkItemCostsRequest {
                work_items: shown_keys,
            })
            .await;
        match costs {
            Ok(r) => r
                .into_inner()
                .costs
                .into_iter()
                .map(|c| (c.work_item, (c.runs, c.total_cost_usd)))
                .collect(),
            Err(e) => {
                errors.push(format!("costs (usage-ledger): {}", e.message()));
                HashMap::new()
            }
        }
    };
    let mut out = String::with_capacity(64 * 1024);
    // The agent actually running for an item, from the launcher (the item's expected
    // agent may still be queued).
    let running: HashMap<String, (String, i64)> = match running {
        Ok(r) => r
            .into_inner()
            .jobs
            .into_iter()
            .map(|j| (j.work_item, (j.agent, now - j.started_at_ms)))
            .collect(),
        Err(e) => {
            errors.push(format!("running jobs (launcher): {}", e.message()));
            HashMap::new()
        }
    };
    let totals: HashMap<String, u64> = counts
        .map(|r| {
            r.into_inner()
                .items
                .into_iter()
                .map(|c| (c.status, c.count))
                .collect()
        })
        .unwrap_or_default();

    out.push_str("<div class=\"titlebar\"><h1>Board</h1>");
    filters(&mut out, filter, &totals);
    out.push_str("</div>");
    for e in &errors {
        let _ = write!(out, "<p class=\"error\">Cannot read {}</p>", Esc(e));
    }
    if items.is_empty() && errors.is_empty() {
        out.push_str("<p class=\"muted\">No work items");
        if !filter.repo.is_empty() || !filter.status.is_empty() {
            out.push_str(" match these filters");
        }
        out.push_str(".</p>");
    }

    out.push_str("<div class=\"board\" id=\"board\" data-refresh=\"5\">");
    for (stage, list) in &columns {
        let _ = write!(
            out,
            "<section class=\"column\" data-stage=\"{s}\"><h2>{s} <span class=\"count\">{}</span></h2>",
            list.len(),
            s = Esc(stage)
        );
        for item in list.iter().take(CARDS_PER_COLUMN) {
            card(
                &mut out,
                item,
                now,
                costs.get(&item.key),
                running.get(&item.key),
                access,
            );
        }
        if list.len() > CARDS_PER_COLUMN {
            let _ = write!(
                out,
                "<p class=\"muted more\">and {} more (filter by repository or status)</p>",
                list.len() - CARDS_PER_COLUMN
            );
        }
        out.push_str("</section>");
    }
    out.push_str("</div>");
    let shown: HashMap<&str, usize> = items.iter().fold(HashMap::new(), |mut m, i| {
        *m.entry(i.status.as_str()).or_default() += 1;
        m
    });
    let mut partial = Vec::new();
    for (status, _) in &statuses {
        let total = totals.get(*status).copied().unwrap_or(0);
        let n = shown.get(status).copied().unwrap_or(0) as u64;
        if filter.repo.is_empty() && total > n {
            partial.push(format!(
                "the latest {n} of {total} {}",
                status.replace('_', " ")
            ));
        }
    }
    if !partial.is_empty() {
        let _ = write!(
            out,
            "<p class=\"muted\">Showing {}.</p>",
            Esc(&partial.join(", "))
        );
    }
    out
}

async fn futures_join_all(
    shared: &Shared,
    statuses: &[(&'static str, u32)],
    repo: &str,
) -> Vec<(&'static str, Result<Vec<WorkItem>, tonic::Status>)> {
    let mut set = tokio::task::JoinSet::new();
    for (i, (status, limit)) in statuses.iter().enumerate() {
        let mut client = shared.clients.stage_engine.clone();
        let req = ListWorkItemsRequest {
            status: (*status).to_owned(),
            repo: repo.to_owned(),
            limit: *limit,
            // The cards show no description; leaving them out keeps the 1,200 cards' read small.
            without_description: true,
            ..Default::default()
        };
        set.spawn(async move {
            (
                i,
                client
                    .list_work_items(req)
                    .await
                    .map(|r| r.into_inner().work_items),
            )
        });
    }
    let mut out: Vec<(usize, Result<Vec<WorkItem>, tonic::Status>)> = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(r) => out.push(r),
            Err(e) => tracing::warn!(error = %e, "a board read panicked"),
        }
    }
    out.sort_by_key(|(i, _)| *i);
    out.into_iter().map(|(i, r)| (statuses[i].0, r)).collect()
}

fn filters(out: &mut String, filter: &Filter, totals: &HashMap<String, u64>) {
    out.push_str("<form method=\"get\" action=\"/\" class=\"filters\">");
    let _ = write!(
        out,
        "<label>Repository <input name=\"repo\" value=\"{}\" placeholder=\"owner/name\"></label>",
        Esc(&filter.repo)
    );
    out.push_str("<label>Status <select name=\"status\"><option value=\"\">any</option>");
    for (s, _) in STATUSES {
        let selected = if filter.status == *s { " selected" } else { "" };
        let n = totals.get(*s).copied().unwrap_or(0);
        let _ = write!(
            out,
            "<option value=\"{s}\"{selected}>{} ({n})</option>",
            s.replace('_', " ")
        );
    }
    out.push_str("</select></label><button type=\"submit\">Filter</button></form>");
}

fn card(
    out: &mut String,
    item: &WorkItem,
    now: i64,
    cost: Option<&(u32, f64)>,
    running: Option<&(String, i64)>,
    access: &Access,
) {
    let _ = write!(
        out,
        "<article class=\"card {status}\" data-key=\"{key}\" data-status=\"{status}\">\
         <div class=\"card-head\"><a class=\"key\" href=\"/items/{url}\">{key}</a>{badge}</div>\
         <p class=\"title\">{title}</p><dl>",
        status = Esc(&item.status),
        key = Esc(&item.key),
        url = Url(&item.key),
        badge = html::status_badge(&item.status),
        title = Esc(&item.title),
    );
    match (running, item.expected_agent.as_str()) {
        (Some((agent, age)), _) => {
            let _ = write!(
                out,
                "<dt>agent</dt><dd class=\"agent running\">{} · running {}</dd>",
                Esc(agent),
                html::duration(*age)
            );
        }
        (None, "") => {}
        (None, agent) => {
            let _ = write!(
                out,
                "<dt>agent</dt><dd class=\"agent\">{} · queued</dd>",
                Esc(agent)
            );
        }
    }
    let _ = write!(
        out,
        "<dt>changed</dt><dd>{}</dd>",
        html::time(now, item.updated_at_ms)
    );
    if let Some((runs, usd)) = cost {
        let _ = write!(
            out,
            "<dt>cost</dt><dd>{} · {} run{}</dd>",
            format::cost(*usd),
            runs,
            if *runs == 1 { "" } else { "s" }
        );
    }
    if item.pr_number > 0 {
        let _ = write!(
            out,
            "<dt>PR</dt><dd class=\"pr\">{}</dd>",
            html::forge_link(&item.pr_url, &format!("#{}", item.pr_number))
        );
    }
    out.push_str("</dl>");
    if !item.status_reason.is_empty() {
        let _ = write!(out, "<p class=\"reason\">{}</p>", Esc(&item.status_reason));
    }
    if item.status == "awaiting_approval" {
        out.push_str(&html::action_button(
            access,
            &format!("/items/{}/approve", Url(&item.key)),
            "Approve",
            "primary",
        ));
    }
    out.push_str("</article>");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(pr_number: u64, pr_url: &str) -> WorkItem {
        WorkItem {
            key: "ORCH-9".into(),
            title: "a title".into(),
            stage: "review".into(),
            status: "active".into(),
            pr_number,
            pr_url: pr_url.into(),
            ..Default::default()
        }
    }

    fn card_of(item: &WorkItem) -> String {
        let access = Access {
            csrf: "c".into(),
            signed_in: false,
        };
        let mut out = String::new();
        card(&mut out, item, 0, None, None, &access);
        out
    }

    #[test]
    fn a_card_links_its_pr_on_the_forge() {
        let gitea = card_of(&item(12, "https://git.example/acme/app/pulls/12"));
        assert!(
            gitea.contains(
                "<dt>PR</dt><dd class=\"pr\"><a class=\"forge\" href=\"https://git.example/acme/app/pulls/12\">#12</a></dd>"
            ),
            "{gitea}"
        );
        // The local forge's PR has no web page: its number, as text.
        let local = card_of(&item(1, "file:///srv/forge/acme/app.git#pull/1"));
        assert!(
            local.contains("<dd class=\"pr\"><span class=\"forge\">#1</span></dd>"),
            "{local}"
        );
        assert!(!card_of(&item(0, "")).contains("<dt>PR</dt>"));
    }
}
