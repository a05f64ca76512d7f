//! What a finished agent run came to, decided in ONE pure function over what the run left
//! behind: its exit, the CLI's result (read by `orchestrator_agent_output::parse_result`,
//! the one parser of it) and the tail of its log. See `shared/contracts/claude-cli/`.
//!
//! - **transient** — HTTP 429 (rate limit), 529 (overloaded), other 5xx: the same run may
//!   work later; retried on the `transient_attempts` budget after the wait the output gives,
//!   else after a backoff;
//! - **permanent** — anything else, timeouts and error subtypes included; retried while
//!   the job has attempts left, except a spend limit or an auth failure, which is never
//!   retried (it cannot heal by itself);
//! - **success** — the CLI's `success` without `is_error`, unless it exited non-zero or was
//!   denied tools and did nothing.

use std::time::Duration;

use orchestrator_agent_output::AgentResult;

/// How the agent's process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RunExit {
    /// The exit code; `None` when a signal ended it or it is not known (a launcher restart).
    pub code: Option<i32>,
    /// The watchdog killed it.
    pub timed_out: bool,
}

/// What a run came to.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Success,
    /// Retry after `wait` (what the output said) or a backoff.
    Transient {
        reason: String,
        wait: Option<Duration>,
    },
    /// `retry: false` for what cannot heal by itself (spend limit, auth).
    Permanent {
        reason: String,
        retry: bool,
    },
}

impl Verdict {
    /// A short name for logs and the job's `outcome`.
    pub fn kind(&self) -> &'static str {
        match self {
            Verdict::Success => "success",
            Verdict::Transient { .. } => "transient",
            Verdict::Permanent { retry: true, .. } => "permanent",
            Verdict::Permanent { retry: false, .. } => "permanent_no_retry",
        }
    }
}

/// Everything the verdict is drawn from.
#[derive(Debug, Clone, Copy)]
pub struct Evidence<'a> {
    pub exit: RunExit,
    pub result: Option<&'a AgentResult>,
    /// The end of the run log (where retry lines and rate-limit events are).
    pub log_tail: &'a str,
    /// Whether the run changed the checkout; `None` when unknown (no git).
    pub work_done: Option<bool>,
    /// Now, in epoch milliseconds (reset times are absolute).
    pub now_ms: i64,
}

/// The longest wait taken from the output; anything beyond is a misread.
const MAX_GIVEN_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Decides what a run came to.
pub fn classify(e: &Evidence<'_>) -> Verdict {
    if e.exit.timed_out {
        return Verdict::Permanent {
            reason: "timed out".to_owned(),
            retry: true,
        };
    }
    let Some(r) = e.result else {
        if let Some(reason) = transient_in_log(e.log_tail) {
            // The CLI died while it was still retrying by itself.
            return Verdict::Transient {
                reason,
                wait: given_wait(e.log_tail, e.now_ms),
            };
        }
        return Verdict::Permanent {
            reason: match e.exit.code {
                Some(c) => format!("no result (exit {c})"),
                None => "no result".to_owned(),
            },
            retry: true,
        };
    };
    let text = r.result_text.as_deref().unwrap_or_default();
    let errored = r.is_error == Some(true);
    if is_spend_limit(r) {
        return Verdict::Permanent {
            reason: format!("spend limit reached: {}", short(text)),
            retry: false,
        };
    }
    if errored && is_auth_failure(r) {
        return Verdict::Permanent {
            reason: format!("authentication failed: {}", short(text)),
            retry: false,
        };
    }
    if errored && let Some(what) = transient_result(r) {
        let searched = format!("{}\n{text}", e.log_tail);
        return Verdict::Transient {
            reason: format!("{what}: {}", short(text)),
            wait: given_wait(&searched, e.now_ms),
        };
    }
    let subtype = r.subtype.as_deref().unwrap_or_default();
    if subtype == "success" && !errored {
        if let Some(c) = e.exit.code.filter(|c| *c != 0) {
            return Verdict::Permanent {
                reason: format!("exit {c} despite a success result"),
                retry: true,
            };
        }
        if r.permission_denials > 0 && e.work_done == Some(false) {
            return Verdict::Permanent {
                reason: format!(
                    "success with {} permission denial(s) and no work done",
                    r.permission_denials
                ),
                retry: true,
            };
        }
        return Verdict::Success;
    }
    let detail = if !r.errors.is_empty() {
        r.errors.join("; ")
    } else {
        text.to_owned()
    };
    let what = if subtype.is_empty() || subtype == "success" {
        "error".to_owned()
    } else {
        subtype.to_owned()
    };
    Verdict::Permanent {
        reason: if detail.is_empty() {
            what
        } else {
            format!("{what}: {}", short(&detail))
        },
        retry: true,
    }
}

fn short(s: &str) -> String {
    let s = s.trim();
    if s.chars().count() <= 300 {
        return s.to_owned();
    }
    let mut out: String = s.chars().take(300).collect();
    out.push('…');
    out
}

/// A spend limit (the API's `enforced_spend_limit_reached`, or its text): never retried.
fn is_spend_limit(r: &AgentResult) -> bool {
    if r.api_error_code.as_deref() == Some("enforced_spend_limit_reached") {
        return true;
    }
    let text = r
        .result_text
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    r.is_error == Some(true)
        && (text.contains("reached your specified api usage limits")
            || text.contains("spend limit")
            || text.contains("credit balance is too low"))
}

/// An authentication failure (401/403, a bad key, not logged in): never retried.
fn is_auth_failure(r: &AgentResult) -> bool {
    if matches!(r.api_error_status, Some(401 | 403)) {
        return true;
    }
    if matches!(
        r.api_error_type.as_deref(),
        Some("authentication_error" | "permission_error")
    ) {
        return true;
    }
    let text = r
        .result_text
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    text.starts_with("not logged in")
        || text.contains("invalid api key")
        || text.contains("oauth token has expired")
}

/// Why an errored result is transient, if it is.
fn transient_result(r: &AgentResult) -> Option<&'static str> {
    match r.api_error_status {
        Some(429) => return Some("rate limited (429)"),
        Some(529) => return Some("overloaded (529)"),
        Some(s) if (500..600).contains(&s) => return Some("server error (5xx)"),
        _ => {}
    }
    match r.api_error_type.as_deref() {
        Some("rate_limit_error") => return Some("rate limited"),
        Some("overloaded_error") => return Some("overloaded"),
        _ => {}
    }
    let text = r
        .result_text
        .as_deref()
        .unwrap_or_default()
        .to_ascii_lowercase();
    if text.contains("usage limit reached") {
        return Some("usage limit reached");
    }
    if text.starts_with("api error") {
        if text.contains("429") || text.contains("rate limit") {
            return Some("rate limited");
        }
        if text.contains("529") || text.contains("overloaded") {
            return Some("overloaded");
        }
    }
    None
}

/// A transient API failure visible only in the log (no result was printed).
fn transient_in_log(log: &str) -> Option<String> {
    let last = log.lines().rev().find(|l| {
        l.contains("API Error") || l.contains("overloaded_error") || l.contains("rate_limit_error")
    })?;
    let l = last.to_ascii_lowercase();
    let what = if l.contains("529") || l.contains("overloaded") {
        "overloaded (529)"
    } else if l.contains("429") || l.contains("rate_limit") || l.contains("rate limit") {
        "rate limited (429)"
    } else {
        return None;
    };
    Some(format!(
        "{what}, and the CLI printed no result: {}",
        short(last)
    ))
}

/// The wait the output gives, if any: a `rate_limit_event`'s `resetsAt`, a
/// `usage limit reached|<epoch>` line, or a `retry-after: N` / `retry after N seconds`.
/// The LAST mention wins; a time in the past gives none.
pub fn given_wait(text: &str, now_ms: i64) -> Option<Duration> {
    let mut best: Option<(usize, Duration)> = None;
    let mut consider = |pos: usize, wait: Option<Duration>| {
        if let Some(w) = wait
            && best.is_none_or(|(p, _)| pos > p)
        {
            best = Some((pos, w));
        }
    };
    for (pos, n) in numbers_after(text, "\"resetsAt\":") {
        consider(pos, until_epoch(n, now_ms));
    }
    for (pos, n) in numbers_after(text, "usage limit reached|") {
        consider(pos, until_epoch(n, now_ms));
    }
    let lower = text.to_ascii_lowercase();
    for key in ["retry-after:", "retry-after\":", "retry after"] {
        for (pos, n) in numbers_after(&lower, key) {
            consider(pos, (n > 0).then(|| Duration::from_secs(n as u64)));
        }
    }
    best.map(|(_, w)| w.min(MAX_GIVEN_WAIT))
}

fn until_epoch(n: i64, now_ms: i64) -> Option<Duration> {
    // Seconds, or milliseconds when it is that large.
    let at_ms = if n > 100_000_000_000 {
        n
    } else {
        n.saturating_mul(1000)
    };
    let wait = at_ms - now_ms;
    (wait > 0).then(|| Duration::from_millis(wait as u64))
}

/// Every integer that follows `key` (after optional spaces and quotes), with its position.
fn numbers_after(text: &str, key: &str) -> Vec<(usize, i64)> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(key) {
        let start = from + i + key.len();
        let rest = text[start..].trim_start_matches([' ', '"']);
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        if let Ok(n) = digits.parse::<i64>() {
            out.push((start, n));
        }
        from = start;
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use orchestrator_agent_output::parse_result;

    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn contracts() -> PathBuf {
        orchestrator_testkit::contracts_dir().join("claude-cli")
    }

    /// The exact bytes a sample says the CLI printed.
    fn printed(name: &str) -> String {
        let path = contracts().join(name);
        let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{name}: {e}"));
        if name.starts_with("real-") {
            return text;
        }
        let v: serde_json::Value = serde_json::from_str(&text).expect("sample json");
        if let Some(raw) = v["raw"].as_str() {
            return raw.to_owned();
        }
        if let Some(lines) = v["raw_lines"].as_array() {
            return lines
                .iter()
                .filter_map(|l| l.as_str())
                .collect::<Vec<_>>()
                .join("\n");
        }
        v["data"].to_string()
    }

    fn verdict(log: &str, exit: Option<i32>, work_done: Option<bool>) -> Verdict {
        let result = parse_result(log);
        classify(&Evidence {
            exit: RunExit {
                code: exit,
                timed_out: false,
            },
            result: result.as_ref(),
            log_tail: log,
            work_done,
            now_ms: NOW,
        })
    }

    /// Every sample in `shared/contracts/claude-cli/`, with the exit code the CLI gives it
    /// (non-zero when `is_error`) and the verdict it must get.
    #[test]
    fn every_contract_sample_is_classified() {
        let cases: &[(&str, Option<i32>, &str, &str)] = &[
            (
                "real-2.1.328/success-with-write-tool.stdout.json",
                Some(0),
                "success",
                "",
            ),
            (
                "real-2.1.328/verbose-array.stdout.json",
                Some(0),
                "success",
                "",
            ),
            (
                "real-2.1.328/stream-json.stdout.jsonl",
                Some(0),
                "success",
                "",
            ),
            (
                "real-2.1.328/stop-hook-blocked-then-success.stdout.json",
                Some(0),
                "success",
                "",
            ),
            // Exit 0 and "success", yet the Write was denied and nothing changed.
            (
                "real-2.1.328/permission-denied.stdout.json",
                Some(0),
                "permanent",
                "permission denial",
            ),
            (
                "real-2.1.328/error-max-turns.stdout.json",
                Some(1),
                "permanent",
                "error_max_turns: Reached maximum number of turns (1)",
            ),
            (
                "real-2.1.328/error-max-budget.stdout.json",
                Some(1),
                "permanent",
                "error_max_budget_usd",
            ),
            (
                "real-2.1.328/rate-limit-429.stdout.json",
                Some(1),
                "transient",
                "rate limited (429)",
            ),
            (
                "real-2.1.328/overloaded-529.stdout.json",
                Some(1),
                "transient",
                "overloaded (529)",
            ),
            (
                "real-2.1.328/spend-limit-429.stdout.json",
                Some(1),
                "permanent_no_retry",
                "spend limit reached",
            ),
            (
                "real-2.1.328/invalid-key-401.stdout.json",
                Some(1),
                "permanent_no_retry",
                "authentication failed: Invalid API key",
            ),
            (
                "real-2.1.328/not-logged-in.stdout.json",
                Some(1),
                "permanent_no_retry",
                "authentication failed: Not logged in",
            ),
            ("success_full_fieldset.json", Some(0), "success", ""),
            ("success_truncated_by_reporter.json", Some(0), "success", ""),
            (
                "error_max_turns_real.json",
                Some(1),
                "permanent",
                "Reached maximum number of turns (30)",
            ),
            (
                "error_during_execution_fixture.json",
                Some(1),
                "permanent",
                "error_during_execution: Tool execution failed",
            ),
            (
                "api_error_529_fixture.json",
                Some(1),
                "transient",
                "overloaded (529)",
            ),
            // Only the retry lines: the CLI was killed while retrying by itself.
            (
                "cli_internal_529_retry_lines.json",
                None,
                "transient",
                "overloaded (529)",
            ),
            // A rate-limit event alone is no result.
            (
                "rate_limit_event_fixture.json",
                Some(1),
                "permanent",
                "no result (exit 1)",
            ),
        ];
        let mut seen: Vec<String> = cases.iter().map(|c| c.0.to_owned()).collect();
        for (name, exit, kind, reason) in cases {
            let v = verdict(&printed(name), *exit, Some(false));
            assert_eq!(v.kind(), *kind, "{name}: {v:?}");
            let got = match &v {
                Verdict::Success => String::new(),
                Verdict::Transient { reason, .. } | Verdict::Permanent { reason, .. } => {
                    reason.clone()
                }
            };
            assert!(got.contains(reason), "{name}: {got:?} lacks {reason:?}");
        }
        // Every sample is in the table: a new one must be classified here too.
        let mut on_disk = Vec::new();
        for sub in ["", "real-2.1.328/"] {
            for entry in std::fs::read_dir(contracts().join(sub))
                .expect("dir")
                .flatten()
            {
                let n = entry.file_name().to_string_lossy().into_owned();
                if (n.ends_with(".json") || n.ends_with(".jsonl")) && n != "stop-hook-input.json" {
                    on_disk.push(format!("{sub}{n}"));
                }
            }
        }
        on_disk.sort();
        seen.sort();
        assert_eq!(on_disk, seen);
    }

    #[test]
    fn permission_denials_with_work_done_are_a_success() {
        let log = printed("real-2.1.328/permission-denied.stdout.json");
        assert_eq!(verdict(&log, Some(0), Some(true)), Verdict::Success);
        // Unknown work (no git): the CLI's word stands.
        assert_eq!(verdict(&log, Some(0), None), Verdict::Success);
    }

    #[test]
    fn a_success_with_a_non_zero_exit_is_not_a_success() {
        let log = printed("real-2.1.328/success-with-write-tool.stdout.json");
        assert_eq!(verdict(&log, Some(3), Some(true)).kind(), "permanent");
    }

    #[test]
    fn nothing_or_garbage_is_no_result() {
        for log in ["", "garbage\n{not json", "Segmentation fault"] {
            match verdict(log, Some(0), None) {
                Verdict::Permanent {
                    reason,
                    retry: true,
                } => {
                    assert_eq!(reason, "no result (exit 0)")
                }
                other => panic!("{log:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_timeout_is_permanent_whatever_was_printed() {
        let log = printed("real-2.1.328/rate-limit-429.stdout.json");
        let result = parse_result(&log);
        let v = classify(&Evidence {
            exit: RunExit {
                code: None,
                timed_out: true,
            },
            result: result.as_ref(),
            log_tail: &log,
            work_done: None,
            now_ms: NOW,
        });
        assert_eq!(v.kind(), "permanent");
    }

    #[test]
    fn waits_given_by_the_output() {
        let reset_s = NOW / 1000 + 120;
        for (text, wait) in [
            (
                format!(
                    "{{\"type\":\"rate_limit_event\",\"rate_limit_info\":{{\"status\":\"rejected\",\"resetsAt\":{reset_s}}}}}"
                ),
                Some(120),
            ),
            (
                format!("Claude AI usage limit reached|{reset_s}"),
                Some(120),
            ),
            ("HTTP 429 retry-after: 37".to_owned(), Some(37)),
            ("please Retry after 5 seconds".to_owned(), Some(5)),
            // The last mention wins.
            (
                format!("retry-after: 9\n{{\"resetsAt\":{reset_s}}}"),
                Some(120),
            ),
            // In the past, or nothing: no given wait.
            ("{\"resetsAt\":1000}".to_owned(), None),
            ("Retrying in 2 seconds… (attempt 3/10)".to_owned(), None),
            (String::new(), None),
        ] {
            assert_eq!(given_wait(&text, NOW).map(|d| d.as_secs()), wait, "{text}");
        }
        assert_eq!(
            given_wait("retry-after: 99999999", NOW),
            Some(MAX_GIVEN_WAIT)
        );
    }

    #[test]
    fn a_429_result_takes_the_reset_from_a_rate_limit_event_before_it() {
        let reset_s = NOW / 1000 + 60;
        let log = format!(
            "{{\"type\":\"rate_limit_event\",\"rate_limit_info\":{{\"status\":\"rejected\",\"resetsAt\":{reset_s}}}}}\n{}",
            printed("real-2.1.328/rate-limit-429.stdout.json")
        );
        match verdict(&log, Some(1), None) {
            Verdict::Transient { wait, .. } => assert_eq!(wait, Some(Duration::from_secs(60))),
            other => panic!("{other:?}"),
        }
        match verdict(
            &printed("real-2.1.328/rate-limit-429.stdout.json"),
            Some(1),
            None,
        ) {
            Verdict::Transient { wait, .. } => assert_eq!(wait, None),
            other => panic!("{other:?}"),
        }
    }
}
