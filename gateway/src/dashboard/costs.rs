//! `GET /costs`: what the agents cost, by day, by agent, by repository and by work item,
//! over the last 30 days (the runs usage-ledger recorded), and the most expensive items of
//! the week.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use orchestrator_agent_output::Usage;
use orchestrator_kit::time::{now_ms, rfc3339};
use orchestrator_proto::stage_engine::v1::ListWorkItemsRequest;
use orchestrator_proto::usage_ledger::v1::{AgentRun, ListRunsRequest};
use usage_ledger::format;

use super::Access;
use super::html::{self, Esc, Url};
use crate::Shared;

const DAY_MS: i64 = 86_400_000;
/// How far back the page looks.
const DAYS: i64 = 30;
/// How many items the "most expensive of the week" lists.
const TOP: usize = 20;

#[derive(Default, Clone, Copy)]
struct Sum {
    runs: u32,
    usd: f64,
    input: i64,
    cache_read: i64,
    cache_creation: i64,
    output: i64,
}

impl Sum {
    fn add(&mut self, r: &AgentRun) {
        self.runs += 1;
        self.usd += r.total_cost_usd.unwrap_or(0.0);
        self.input += r.input_tokens.unwrap_or(0);
        self.cache_read += r.cache_read_tokens.unwrap_or(0);
        self.cache_creation += r.cache_creation_tokens.unwrap_or(0);
        self.output += r.output_tokens.unwrap_or(0);
    }
}

pub(crate) async fn page(access: Access, State(shared): State<Arc<Shared>>) -> Response {
    let now = now_ms();
    let mut ledger = shared.clients.usage_ledger.clone();
    let mut stage_engine = shared.clients.stage_engine.clone();
    let (runs, items) = tokio::join!(
        ledger.list_runs(ListRunsRequest {
            since_ms: now - DAYS * DAY_MS,
            ..Default::default()
        }),
        stage_engine.list_work_items(ListWorkItemsRequest {
            limit: 1000,
            ..Default::default()
        }),
    );
    let mut out = String::from(
        "<div class=\"titlebar\"><h1>Costs</h1><p class=\"muted\">The last 30 days, as the agents' CLI reported them.</p></div>",
    );
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
    let repo_of: HashMap<String, String> = items
        .map(|r| {
            r.into_inner()
                .work_items
                .into_iter()
                .map(|i| (i.key, i.repo))
                .collect()
        })
        .unwrap_or_default();

    let mut by_day: BTreeMap<i64, Sum> = BTreeMap::new();
    let mut by_agent: BTreeMap<String, Sum> = BTreeMap::new();
    let mut by_repo: BTreeMap<String, Sum> = BTreeMap::new();
    let mut by_item_week: HashMap<String, Sum> = HashMap::new();
    let mut total = Sum::default();
    for r in &runs {
        total.add(r);
        by_day
            .entry(r.recorded_at_ms.div_euclid(DAY_MS))
            .or_default()
            .add(r);
        by_agent.entry(r.agent.clone()).or_default().add(r);
        by_repo
            .entry(
                repo_of
                    .get(&r.work_item)
                    .cloned()
                    .unwrap_or_else(|| "(unknown)".to_owned()),
            )
            .or_default()
            .add(r);
        if r.recorded_at_ms >= now - 7 * DAY_MS {
            by_item_week.entry(r.work_item.clone()).or_default().add(r);
        }
    }
    let _ = write!(
        out,
        "<p class=\"total\">Total: <strong>{}</strong> · {} runs · {}</p>",
        format::cost(total.usd),
        total.runs,
        Esc(&tokens(&total))
    );
    table(
        &mut out,
        "By day",
        "day",
        by_day
            .iter()
            .rev()
            .map(|(d, s)| (Esc(&rfc3339(d * DAY_MS)[..10]).to_string(), *s)),
    );
    table(
        &mut out,
        "By agent",
        "agent",
        by_agent.iter().map(|(a, s)| (Esc(a).to_string(), *s)),
    );
    table(
        &mut out,
        "By repository",
        "repository",
        by_repo.iter().map(|(a, s)| (Esc(a).to_string(), *s)),
    );
    let mut week: Vec<(String, Sum)> = by_item_week.into_iter().collect();
    week.sort_by(|a, b| b.1.usd.total_cmp(&a.1.usd).then(a.0.cmp(&b.0)));
    week.truncate(TOP);
    table(
        &mut out,
        "The most expensive items of the week",
        "work item",
        week.iter()
            .map(|(k, s)| (format!("<a href=\"/items/{}\">{}</a>", Url(k), Esc(k)), *s)),
    );
    html::page("Costs", "/costs", Some(&access), &out).into_response()
}

/// `45.2k in (38.0k cached) / 12.1k out`: the finish comments' formatter, without a cost.
fn tokens(s: &Sum) -> String {
    format::run_usage(
        Usage {
            input_tokens: Some(s.input),
            output_tokens: Some(s.output),
            cache_read_tokens: Some(s.cache_read),
            cache_creation_tokens: Some(s.cache_creation),
        },
        None,
    )
}

/// A table of sums; `rows` give their first cell as HTML (already escaped).
fn table(out: &mut String, title: &str, first: &str, rows: impl Iterator<Item = (String, Sum)>) {
    let _ = write!(
        out,
        "<section><h2>{title}</h2><table class=\"costs\"><thead><tr><th>{first}</th><th>runs</th><th>tokens</th><th>cost</th></tr></thead><tbody>"
    );
    let mut any = false;
    for (label, s) in rows {
        any = true;
        let _ = write!(
            out,
            "<tr><td>{label}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            s.runs,
            Esc(&tokens(&s)),
            format::cost(s.usd)
        );
    }
    if !any {
        out.push_str("<tr><td colspan=\"4\" class=\"muted\">No runs.</td></tr>");
    }
    out.push_str("</tbody></table></section>");
}
