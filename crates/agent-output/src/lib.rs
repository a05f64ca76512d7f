//! Reads what an agent run printed: finds the CLI's result object in the run log and takes
//! the fields the orchestrator uses. Never fails: garbage in gives `None`, and every field
//! the output does not carry (or carries with the wrong type) is `None`, never zero.
//!
//! The result is the LAST well-formed JSON value in the log that is a result object —
//! alone (`claude -p --output-format json`), the last line of `stream-json`, or the last
//! `type: "result"` element of the JSON array that `--verbose` prints — with any text
//! before it (retry lines, warnings). See `shared/contracts/claude-cli/README.md`.

use serde_json::Value;

/// How much of the end of a log is searched; the result JSON is the last thing printed.
pub const TAIL_BYTES: usize = 512 * 1024;
/// Candidate JSON starts tried per line, so a garbage line cannot cost quadratic time.
const MAX_STARTS_PER_LINE: usize = 64;

/// The fields of a CLI result object that the orchestrator reads.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AgentResult {
    pub subtype: Option<String>,
    pub is_error: Option<bool>,
    pub api_error_status: Option<i32>,
    /// e.g. `enforced_spend_limit_reached`.
    pub api_error_code: Option<String>,
    /// e.g. `rate_limit_error`.
    pub api_error_type: Option<String>,
    pub result_text: Option<String>,
    pub terminal_reason: Option<String>,
    pub errors: Vec<String>,
    /// How many tool uses were denied; "success" with denials may mean no work was done.
    pub permission_denials: usize,
    pub num_turns: Option<i64>,
    pub duration_ms: Option<i64>,
    pub total_cost_usd: Option<f64>,
    pub usage: Usage,
    /// The CLI session the run was (`session_id`): what `--resume` takes. Only a plain id
    /// (letters, digits, `-`, `_`; at most 64): it becomes an argument and a file name.
    pub session_id: Option<String>,
}

/// Token counts as the CLI reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Usage {
    pub input_tokens: Option<i64>,
    pub output_tokens: Option<i64>,
    pub cache_read_tokens: Option<i64>,
    pub cache_creation_tokens: Option<i64>,
}

impl Usage {
    /// True when the output carried any token count at all.
    pub fn is_known(&self) -> bool {
        self.input_tokens.is_some()
            || self.output_tokens.is_some()
            || self.cache_read_tokens.is_some()
            || self.cache_creation_tokens.is_some()
    }
}

/// Finds the last result object in `log` and reads it; `None` when there is none.
pub fn parse_result(log: &str) -> Option<AgentResult> {
    find_result_value(log).map(|v| read_result(&v))
}

/// Finds the last result object in `log` as raw JSON.
pub fn find_result_value(log: &str) -> Option<Value> {
    let tail = tail_of(log, TAIL_BYTES);
    // Most logs print the result on its own line (json, stream-json, verbose array).
    for line in tail.lines().rev() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(v) = result_in_line(line) {
            return Some(v);
        }
    }
    // A pretty-printed result spans lines: try each line that opens a JSON value, last first.
    let mut offset = tail.len();
    for line in tail.lines().rev() {
        offset = offset.saturating_sub(line.len() + 1);
        let t = line.trim_start();
        if t.starts_with('{') || t.starts_with('[') {
            let start = tail[offset.min(tail.len())..]
                .find(['{', '['])
                .map(|i| i + offset);
            if let Some(v) = start
                .and_then(|s| first_value(&tail[s..]))
                .and_then(result_of)
            {
                return Some(v);
            }
        }
    }
    None
}

fn tail_of(log: &str, max: usize) -> &str {
    if log.len() <= max {
        return log;
    }
    let mut start = log.len() - max;
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}

fn result_in_line(line: &str) -> Option<Value> {
    line.char_indices()
        .filter(|(_, c)| *c == '{' || *c == '[')
        .take(MAX_STARTS_PER_LINE)
        .find_map(|(i, _)| first_value(&line[i..]).and_then(result_of))
}

fn first_value(s: &str) -> Option<Value> {
    serde_json::Deserializer::from_str(s)
        .into_iter::<Value>()
        .next()?
        .ok()
}

/// The value itself when it is a result object, or the last result element of an array.
fn result_of(v: Value) -> Option<Value> {
    match v {
        Value::Object(ref m) if m.get("type").and_then(Value::as_str) == Some("result") => Some(v),
        Value::Array(items) => items
            .into_iter()
            .rev()
            .find(|i| i.get("type").and_then(Value::as_str) == Some("result")),
        _ => None,
    }
}

fn count(v: &Value, key: &str) -> Option<i64> {
    v.get(key).and_then(Value::as_i64).filter(|n| *n >= 0)
}

fn text(v: &Value, key: &str) -> Option<String> {
    v.get(key).and_then(Value::as_str).map(str::to_owned)
}

/// Reads the fields of one result object; anything missing or mistyped is `None`.
pub fn read_result(v: &Value) -> AgentResult {
    let usage = v.get("usage").cloned().unwrap_or(Value::Null);
    AgentResult {
        subtype: text(v, "subtype"),
        is_error: v.get("is_error").and_then(Value::as_bool),
        api_error_status: v
            .get("api_error_status")
            .and_then(Value::as_i64)
            .and_then(|n| i32::try_from(n).ok()),
        api_error_code: text(v, "api_error_code"),
        api_error_type: text(v, "api_error_type"),
        result_text: text(v, "result"),
        terminal_reason: text(v, "terminal_reason"),
        errors: v
            .get("errors")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|e| e.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default(),
        permission_denials: v
            .get("permission_denials")
            .and_then(Value::as_array)
            .map_or(0, Vec::len),
        num_turns: count(v, "num_turns"),
        duration_ms: count(v, "duration_ms"),
        total_cost_usd: v
            .get("total_cost_usd")
            .and_then(Value::as_f64)
            .filter(|c| c.is_finite() && *c >= 0.0),
        usage: Usage {
            input_tokens: count(&usage, "input_tokens"),
            output_tokens: count(&usage, "output_tokens"),
            cache_read_tokens: count(&usage, "cache_read_input_tokens"),
            cache_creation_tokens: count(&usage, "cache_creation_input_tokens"),
        },
        session_id: text(v, "session_id").filter(|s| is_session_id(s)),
    }
}

/// A CLI session id as the orchestrator accepts one: 1 to 64 letters, digits, `-` or `_`,
/// starting with a letter or digit (the CLI's are UUIDs), so it is safe as an argument
/// (never taken for an option) and as a file name.
pub fn is_session_id(s: &str) -> bool {
    (1..=64).contains(&s.len())
        && s.as_bytes()[0].is_ascii_alphanumeric()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    const SUCCESS: &str = r#"{"type":"result","subtype":"success","is_error":false,"total_cost_usd":0.21,"usage":{"input_tokens":7200,"cache_read_input_tokens":38000,"cache_creation_input_tokens":0,"output_tokens":12100}}"#;

    #[test]
    fn a_lone_result_object_is_read() {
        let r = parse_result(SUCCESS).expect("result");
        assert_eq!(r.subtype.as_deref(), Some("success"));
        assert_eq!(r.is_error, Some(false));
        assert_eq!(r.usage.input_tokens, Some(7200));
        assert_eq!(r.usage.cache_read_tokens, Some(38000));
        assert_eq!(r.usage.output_tokens, Some(12100));
        assert_eq!(r.total_cost_usd, Some(0.21));
    }

    #[test]
    fn the_session_id_is_read_only_when_it_is_a_plain_id() {
        let with = |id: &str| {
            let v: Value = serde_json::from_str(SUCCESS).expect("json");
            let mut v = v;
            v["session_id"] = Value::String(id.to_owned());
            read_result(&v).session_id
        };
        assert_eq!(
            with("45deef7f-0fc5-4f26-9ab9-dea1bde1752a").as_deref(),
            Some("45deef7f-0fc5-4f26-9ab9-dea1bde1752a")
        );
        for hostile in [
            "",
            "../../etc/passwd",
            "a b",
            "--dangerously-skip-permissions",
            &"x".repeat(65),
        ] {
            assert_eq!(with(hostile), None, "{hostile}");
        }
        assert_eq!(parse_result(SUCCESS).expect("result").session_id, None);
    }

    #[test]
    fn text_before_the_result_is_tolerated() {
        let log = format!(
            "API Error (529 {{\"type\":\"error\"}}) · Retrying in 1 seconds…\nwarning: x\n{SUCCESS}\n"
        );
        assert_eq!(
            parse_result(&log).and_then(|r| r.usage.output_tokens),
            Some(12100)
        );
        let same_line = format!("done: {SUCCESS}");
        assert_eq!(
            parse_result(&same_line).and_then(|r| r.total_cost_usd),
            Some(0.21)
        );
    }

    #[test]
    fn the_last_result_wins_and_arrays_give_their_last_result_element() {
        let first = SUCCESS.replace("0.21", "0.01");
        let log = format!("{first}\n{SUCCESS}");
        assert_eq!(
            parse_result(&log).and_then(|r| r.total_cost_usd),
            Some(0.21)
        );
        let arr = format!(
            r#"[{{"type":"system"}},{first},{{"type":"assistant"}},{SUCCESS},{{"type":"user"}}]"#
        );
        assert_eq!(
            parse_result(&arr).and_then(|r| r.total_cost_usd),
            Some(0.21)
        );
    }

    #[test]
    fn a_pretty_printed_result_is_found() {
        let v: Value = serde_json::from_str(SUCCESS).expect("json");
        let pretty = format!(
            "noise\n{}\n",
            serde_json::to_string_pretty(&v).expect("pretty")
        );
        assert_eq!(
            parse_result(&pretty).and_then(|r| r.usage.input_tokens),
            Some(7200)
        );
    }

    #[test]
    fn missing_or_mistyped_fields_are_none_never_zero() {
        let r = parse_result(r#"{"type":"result","usage":{"input_tokens":"many","output_tokens":-3},"total_cost_usd":"x"}"#)
            .expect("result");
        assert_eq!(r.usage, Usage::default());
        assert!(!r.usage.is_known());
        assert_eq!(r.total_cost_usd, None);
        assert_eq!(r.is_error, None);
        assert_eq!(r.subtype, None);
    }

    #[test]
    fn garbage_gives_none() {
        for log in [
            "",
            "   \n",
            "no json here",
            "{",
            "[[[[",
            "{\"type\":\"assistant\"}",
            "null",
            "{\"type\":\"result\"",
            &"{[".repeat(10_000),
        ] {
            assert_eq!(parse_result(log), None, "{log:.40}");
        }
    }

    #[test]
    fn only_the_tail_is_searched() {
        let log = format!("{SUCCESS}\n{}", "x".repeat(TAIL_BYTES + 10));
        assert_eq!(parse_result(&log), None);
        let multibyte = format!("{}\n{SUCCESS}", "é".repeat(TAIL_BYTES));
        assert!(parse_result(&multibyte).is_some());
    }
}
