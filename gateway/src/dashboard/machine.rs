//! `GET /machine`: the machine room. The same document as `GET /queue` (read by the same
//! code, `queue::snapshot`), laid out for people: the running jobs, the concurrency cap and
//! the breaker, the reaper, stage-engine, the open watches, the inbox and its dead letters.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::Access;
use super::html::{self, Esc, Url};
use crate::{Shared, queue};

pub(crate) async fn page(access: Access, State(shared): State<Arc<Shared>>) -> Response {
    let doc = queue::snapshot(&shared).await;
    let body = render(&doc, &access);
    html::page("Machine room", "/machine", Some(&access), &body).into_response()
}

fn render(doc: &Value, access: &Access) -> String {
    let now = doc["generated_at_ms"].as_i64().unwrap_or(0);
    let mut out = String::with_capacity(16 * 1024);
    out.push_str("<div class=\"titlebar\"><h1>Machine room</h1><p class=\"muted\">The same facts as <a href=\"/queue\">GET /queue</a>.</p></div>");

    out.push_str("<div class=\"health\">");
    for (part, name) in [
        ("launcher", "launcher"),
        ("stage_engine", "stage-engine"),
        ("reaper", "reaper"),
        ("post_deploy", "post-deploy"),
        ("inbox", "gateway inbox"),
    ] {
        let (class, text) = match doc[part].get("error") {
            Some(e) => (
                "down",
                format!(
                    "{}: {}",
                    e["code"].as_str().unwrap_or("ERROR"),
                    e["message"].as_str().unwrap_or("")
                ),
            ),
            None => ("up", "answering".to_owned()),
        };
        let _ = write!(
            out,
            "<div class=\"service {class}\" data-service=\"{name}\"><strong>{name}</strong><span>{}</span></div>",
            Esc(&text)
        );
    }
    out.push_str("</div>");

    let l = &doc["launcher"];
    if l.get("error").is_none() {
        out.push_str("<section><h2>Launcher</h2><dl class=\"facts\">");
        let _ = write!(
            out,
            "<dt>agents running</dt><dd id=\"llm-running\">{} of {}</dd>",
            l["llm_running"], l["max_concurrency"]
        );
        let b = &l["breaker"];
        let _ = write!(
            out,
            "<dt>breaker</dt><dd class=\"breaker {state}\">{state} · {} transient in a row{}</dd>",
            b["consecutive_transient"],
            match b["open_until_ms"].as_i64() {
                Some(t) if t > now =>
                    format!(" · open until {}", orchestrator_kit::time::rfc3339(t)),
                _ => String::new(),
            },
            state = Esc(b["state"].as_str().unwrap_or("unknown"))
        );
        let _ = write!(
            out,
            "<dt>agent command</dt><dd>{}</dd><dt>outbox</dt><dd>{} pending · {} dead letters</dd>",
            Esc(l["agent_command"].as_str().unwrap_or("")),
            l["outbox"]["pending"],
            l["outbox"]["failed"]
        );
        if let Some(counts) = l["counts"].as_object() {
            out.push_str("<dt>jobs</dt><dd>");
            let parts: Vec<String> = counts
                .iter()
                .map(|(k, v)| format!("{} {}", v, Esc(&k.to_ascii_lowercase())))
                .collect();
            out.push_str(&parts.join(" · "));
            out.push_str("</dd>");
        }
        out.push_str("</dl><h3>Running</h3>");
        let running = l["running"].as_array().cloned().unwrap_or_default();
        if running.is_empty() {
            out.push_str("<p class=\"muted\">Nothing is running.</p>");
        } else {
            out.push_str("<table><thead><tr><th>job</th><th>item</th><th>agent</th><th>stage</th><th>attempt</th><th>running for</th><th>pid</th><th></th></tr></thead><tbody>");
            for j in &running {
                let id = j["id"].as_str().unwrap_or("");
                let item = j["work_item"].as_str().unwrap_or("");
                let _ = write!(
                    out,
                    "<tr><td><a href=\"/jobs/{}/log\"><code>{}</code></a></td><td><a href=\"/items/{}\">{}</a></td><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                    Url(id),
                    Esc(id),
                    Url(item),
                    Esc(item),
                    Esc(j["agent"].as_str().unwrap_or("")),
                    Esc(j["stage"].as_str().unwrap_or("")),
                    j["attempt"],
                    html::duration(j["age_ms"].as_i64().unwrap_or(0)),
                    j["pid"].as_i64().map(|p| p.to_string()).unwrap_or_default(),
                    html::action_button(
                        access,
                        &format!("/jobs/{}/cancel", Url(id)),
                        "Cancel job",
                        "danger small"
                    ),
                );
            }
            out.push_str("</tbody></table>");
        }
        out.push_str("</section>");
    }

    for (part, title) in [("reaper", "Reaper"), ("stage_engine", "Stage engine")] {
        if doc[part].get("error").is_none() {
            let _ = write!(out, "<section><h2>{title}</h2>");
            facts(&mut out, &doc[part], now);
            out.push_str("</section>");
        }
    }

    let watches = doc["post_deploy"]["open_watches"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    out.push_str("<section><h2>Post-deploy watches</h2>");
    if watches.is_empty() {
        out.push_str("<p class=\"muted\">No watch is open.</p>");
    } else {
        out.push_str("<table><thead><tr><th>item</th><th>repo</th><th>deployed</th><th>window ends</th><th>health failures</th><th>state</th></tr></thead><tbody>");
        for w in &watches {
            let item = w["work_item"].as_str().unwrap_or("");
            let _ = write!(
                out,
                "<tr><td><a href=\"/items/{}\">{}</a></td><td>{}</td><td><code>{}</code></td><td>{}</td><td class=\"num\">{}</td><td>{}</td></tr>",
                Url(item),
                Esc(item),
                Esc(w["repo"].as_str().unwrap_or("")),
                Esc(w["deployed_sha"].as_str().unwrap_or("")),
                html::time(now, w["window_end_ms"].as_i64().unwrap_or(0)),
                w["consecutive_health_failures"],
                Esc(w["state"].as_str().unwrap_or("")),
            );
        }
        out.push_str("</tbody></table>");
    }
    out.push_str("</section>");

    let inbox = &doc["inbox"];
    out.push_str("<section><h2>Gateway inbox</h2>");
    if inbox.get("error").is_none() {
        let _ = write!(
            out,
            "<dl class=\"facts\"><dt>pending</dt><dd>{}</dd><dt>applied</dt><dd>{}</dd><dt>ignored</dt><dd>{}</dd><dt>dead letters</dt><dd>{}</dd>",
            inbox["pending"], inbox["applied"], inbox["ignored"], inbox["dead"]
        );
        if let Some(age) = inbox["oldest_pending_age_ms"].as_i64() {
            let _ = write!(
                out,
                "<dt>oldest pending</dt><dd>{}</dd>",
                html::duration(age)
            );
        }
        out.push_str("</dl>");
        let dead = inbox["dead_letters"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if !dead.is_empty() {
            out.push_str("<h3>Dead letters</h3><table class=\"inbox-dead\"><thead><tr><th>received</th><th>source</th><th>event</th><th>item</th><th>attempts</th><th>last error</th><th></th></tr></thead><tbody>");
            for d in &dead {
                let item = d["work_item"].as_str().unwrap_or("");
                let id = d["id"].as_str().unwrap_or("");
                let _ = write!(
                    out,
                    "<tr data-delivery=\"{}\"><td>{}</td><td>{}</td><td>{}</td><td><a href=\"/items/{}\">{}</a></td><td class=\"num\">{}</td><td>{}</td><td>{}</td></tr>",
                    Esc(d["delivery_id"].as_str().unwrap_or("")),
                    html::time(now, d["received_at_ms"].as_i64().unwrap_or(0)),
                    Esc(d["source"].as_str().unwrap_or("")),
                    Esc(d["event"].as_str().unwrap_or("")),
                    Url(item),
                    Esc(item),
                    d["attempts"],
                    Esc(d["last_error"].as_str().unwrap_or("")),
                    html::action_button(
                        access,
                        &format!("/inbox/{}/retry", Url(id)),
                        "Retry",
                        "small"
                    ),
                );
            }
            out.push_str("</tbody></table>");
        }
    }
    out.push_str("</section>");
    out
}

/// An object's fields as a definition list (nested objects flattened one level).
fn facts(out: &mut String, v: &Value, now: i64) {
    out.push_str("<dl class=\"facts\">");
    if let Some(map) = v.as_object() {
        for (k, v) in map {
            let text = match v {
                Value::Object(inner) if inner.is_empty() => "none".to_owned(),
                Value::Object(inner) => inner
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(" · "),
                Value::String(s) => s.clone(),
                Value::Number(n) if k.ends_with("_at_ms") => {
                    let _ = write!(
                        out,
                        "<dt>{}</dt><dd>{}</dd>",
                        Esc(&k.replace('_', " ")),
                        html::time(now, n.as_i64().unwrap_or(0))
                    );
                    continue;
                }
                other => other.to_string(),
            };
            let _ = write!(
                out,
                "<dt>{}</dt><dd>{}</dd>",
                Esc(&k.replace('_', " ")),
                Esc(&text)
            );
        }
    }
    out.push_str("</dl>");
}
