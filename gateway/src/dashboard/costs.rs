//! `GET /costs`: what the agents cost, by day, by agent, by repository and by work item,
//! over the last 30 days (the runs usage-ledger recorded), and the most expensive items of
//! the week; against the budgets: the daily and monthly ceilings with their spend, as the
//! launcher checks them (`QueueSnapshot`, the machine room's source too), and each listed
//! item's cost in all against the per-item budget.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use orchestrator_agent_output::Usage;
use orchestrator_kit::time::{now_ms, rfc3339};
use orchestrator_proto::launcher::v1::{QueueSnapshotRequest, QueueSnapshotResponse};
use orchestrator_proto::stage_engine::v1::ListWorkItemsRequest;
use orchestrator_proto::usage_ledger::v1::{AgentRun, ListRunsRequest, WorkItemCostsRequest};
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
    let mut launcher = shared.clients.launcher.clone();
    let (runs, items, queue) = tokio::join!(
        ledger.list_runs(ListRunsRequest {
            since_ms: now - DAYS * DAY_MS,
            ..Default::default()
        }),
        stage_engine.list_work_items(ListWorkItemsRequest {
            limit: 1000,
            without_description: true,
            ..Default::default()
        }),
        launcher.queue_snapshot(QueueSnapshotRequest {}),
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
    let queue = match queue {
        Ok(q) => Some(q.into_inner()),
        Err(e) => {
            let _ = write!(
                out,
                "<p class=\"error\">Cannot read the budgets (launcher): {}</p>",
                Esc(e.message())
            );
            None
        }
    };
    if let Some(q) = &queue {
        budgets(&mut out, q, now);
    }
    let item_budget = queue.as_ref().and_then(|q| q.work_item_budget_usd);
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
    // What each of them spent in all (the per-item budget counts every run, not the week's).
    let in_all: HashMap<String, f64> = if week.is_empty() {
        HashMap::new()
    } else {
        match ledger
            .work_item_costs(WorkItemCostsRequest {
                work_items: week.iter().map(|(k, _)| k.clone()).collect(),
            })
            .await
        {
            Ok(r) => r
                .into_inner()
                .costs
                .into_iter()
                .map(|c| (c.work_item, c.total_cost_usd))
                .collect(),
            Err(e) => {
                let _ = write!(
                    out,
                    "<p class=\"error\">Cannot read the items' costs in all (usage-ledger): {}</p>",
                    Esc(e.message())
                );
                HashMap::new()
            }
        }
    };
    top_items(&mut out, &week, &in_all, item_budget);
    html::page("Costs", "/costs", Some(&access), &out).into_response()
}

/// The spending ceilings the launcher checks before each LLM launch, each with what was
/// spent in its current period, and the per-item budget.
fn budgets(out: &mut String, q: &QueueSnapshotResponse, now: i64) {
    out.push_str("<section><h2>Budgets</h2>");
    if q.budget_ceilings.is_empty() {
        out.push_str(
            "<p class=\"muted\">No spending ceiling is set (<code>ORCH_BUDGET_DAILY_USD</code>, \
             <code>ORCH_BUDGET_MONTHLY_USD</code>, per repository their <code>_JSON</code>).</p>",
        );
    } else {
        out.push_str("<table class=\"budgets\"><thead><tr><th>ceiling</th><th>for</th><th>spent</th><th>used</th><th>resets</th></tr></thead><tbody>");
        for c in &q.budget_ceilings {
            let period = match c.period.as_str() {
                "daily" => "today",
                "monthly" => "this month",
                other => other,
            };
            let repo = if c.repo.is_empty() {
                "every repository".to_owned()
            } else {
                Esc(&c.repo).to_string()
            };
            let (reached, spent) = match c.spent_usd {
                Some(spent) => (spent >= c.ceiling_usd, against(spent, c.ceiling_usd)),
                None => (
                    false,
                    format!(
                        "unknown (usage-ledger did not say) of {}",
                        format::cost(c.ceiling_usd)
                    ),
                ),
            };
            let _ = write!(
                out,
                "<tr class=\"{}\" data-period=\"{}\"><td>{} · {}</td><td>{repo}</td><td class=\"num spent\">{}</td><td>{}</td><td>{}</td></tr>",
                if reached { "reached" } else { "" },
                Esc(&c.period),
                Esc(&c.period),
                format::cost(c.ceiling_usd),
                Esc(&spent),
                match c.spent_usd {
                    Some(spent) => meter(spent, c.ceiling_usd, reached),
                    None => String::new(),
                },
                if c.resets_at_ms > 0 {
                    format!("{period} ends {}", html::time_until(now, c.resets_at_ms))
                } else {
                    String::new()
                },
            );
        }
        out.push_str("</tbody></table>");
        if q.budget_waiting > 0 {
            let _ = write!(
                out,
                "<p class=\"reason\">{} LLM job{} waiting for a ceiling to reset.</p>",
                q.budget_waiting,
                if q.budget_waiting == 1 {
                    " is"
                } else {
                    "s are"
                }
            );
        }
    }
    let _ = write!(
        out,
        "<p class=\"item-budget\">Per work item: {}</p></section>",
        match q.work_item_budget_usd {
            Some(b) => format!(
                "<strong>{}</strong> in all (<code>ORCH_WORK_ITEM_BUDGET_USD</code>; an item that spent it is blocked)",
                format::cost(b)
            ),
            None => "no budget (<code>ORCH_WORK_ITEM_BUDGET_USD</code> is unset)".to_owned(),
        }
    );
}

/// `$1.20 of $5.00 · 24%`.
fn against(spent: f64, budget: f64) -> String {
    if budget > 0.0 {
        let pct = spent / budget * 100.0;
        // Under 10% a whole number would read 0% for a spend that is there.
        let digits = if pct < 10.0 { 1 } else { 0 };
        format!(
            "{} of {} · {pct:.digits$}%",
            format::cost(spent),
            format::cost(budget),
        )
    } else {
        format!("{} of {}", format::cost(spent), format::cost(budget))
    }
}

/// A bar of `spent` against `budget` (full, and marked, once reached).
fn meter(spent: f64, budget: f64, reached: bool) -> String {
    let share = if budget > 0.0 {
        (spent / budget).clamp(0.0, 1.0)
    } else {
        1.0
    };
    format!(
        "<span class=\"meter{}\"><span style=\"width:{:.0}%\"></span></span>{}",
        if reached { " reached" } else { "" },
        share * 100.0,
        if reached { " reached" } else { "" }
    )
}

/// The most expensive items of the week, each with its cost in all against the per-item
/// budget when there is one.
fn top_items(
    out: &mut String,
    week: &[(String, Sum)],
    in_all: &HashMap<String, f64>,
    budget: Option<f64>,
) {
    let _ = write!(
        out,
        "<section><h2>The most expensive items of the week</h2><table class=\"costs top\"><thead><tr><th>work item</th><th>runs</th><th>tokens</th><th>cost</th><th>in all{}</th></tr></thead><tbody>",
        if budget.is_some() {
            ", of its budget"
        } else {
            ""
        }
    );
    for (k, s) in week {
        let all = match (in_all.get(k), budget) {
            (Some(all), Some(b)) => {
                let reached = *all >= b;
                format!("{}{}", Esc(&against(*all, b)), meter(*all, b, reached))
            }
            (Some(all), None) => format::cost(*all),
            (None, _) => "<span class=\"muted\">—</span>".to_owned(),
        };
        let _ = write!(
            out,
            "<tr data-key=\"{}\"><td><a href=\"/items/{}\">{}</a></td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num in-all\">{all}</td></tr>",
            Esc(k),
            Url(k),
            Esc(k),
            s.runs,
            Esc(&tokens(s)),
            format::cost(s.usd)
        );
    }
    if week.is_empty() {
        out.push_str("<tr><td colspan=\"5\" class=\"muted\">No runs.</td></tr>");
    }
    out.push_str("</tbody></table></section>");
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

#[cfg(test)]
mod tests {
    use orchestrator_proto::launcher::v1::BudgetCeiling;

    use super::*;

    #[test]
    fn the_budgets_show_each_ceiling_against_its_spend() {
        let q = QueueSnapshotResponse {
            budget_ceilings: vec![
                BudgetCeiling {
                    period: "daily".into(),
                    ceiling_usd: 5.0,
                    spent_usd: Some(1.2),
                    resets_at_ms: 7_200_000,
                    ..Default::default()
                },
                BudgetCeiling {
                    period: "monthly".into(),
                    repo: "acme/<app>".into(),
                    ceiling_usd: 50.0,
                    spent_usd: Some(61.0),
                    ..Default::default()
                },
                BudgetCeiling {
                    period: "monthly".into(),
                    repo: String::new(),
                    ceiling_usd: 80.0,
                    spent_usd: None,
                    ..Default::default()
                },
            ],
            budget_waiting: 2,
            work_item_budget_usd: Some(3.0),
            ..Default::default()
        };
        let mut out = String::new();
        budgets(&mut out, &q, 0);
        assert!(out.contains("<td>daily · $5.00</td><td>every repository</td><td class=\"num spent\">$1.20 of $5.00 · 24%</td>"), "{out}");
        assert!(
            out.contains("today ends <time") && out.contains(">in 2 h 00 min</time>"),
            "{out}"
        );
        assert!(out.contains("<tr class=\"reached\" data-period=\"monthly\"><td>monthly · $50.00</td><td>acme/&lt;app&gt;</td><td class=\"num spent\">$61.00 of $50.00 · 122%</td>"), "{out}");
        assert!(
            out.contains("unknown (usage-ledger did not say) of $80.00"),
            "{out}"
        );
        assert!(out.contains("2 LLM jobs are waiting"), "{out}");
        assert_eq!(against(0.17, 100.0), "$0.17 of $100.00 · 0.2%");
        assert!(
            out.contains("Per work item: <strong>$3.00</strong> in all"),
            "{out}"
        );

        let mut none = String::new();
        budgets(&mut none, &QueueSnapshotResponse::default(), 0);
        assert!(none.contains("No spending ceiling is set"), "{none}");
        assert!(none.contains("no budget"), "{none}");
    }

    #[test]
    fn each_top_item_reads_against_the_per_item_budget() {
        let week = vec![(
            "ORCH-1".to_owned(),
            Sum {
                runs: 2,
                usd: 0.5,
                ..Default::default()
            },
        )];
        let in_all = HashMap::from([("ORCH-1".to_owned(), 2.5)]);
        let mut out = String::new();
        top_items(&mut out, &week, &in_all, Some(2.0));
        assert!(out.contains("in all, of its budget"), "{out}");
        assert!(out.contains("$2.50 of $2.00 · 125%"), "{out}");
        assert!(out.contains("meter reached"), "{out}");
        let mut unbounded = String::new();
        top_items(&mut unbounded, &week, &in_all, None);
        assert!(
            unbounded.contains("<td class=\"num in-all\">$2.50</td>"),
            "{unbounded}"
        );
    }
}
