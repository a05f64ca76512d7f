//! The text the tracker shows: one line per finished run, and the per-work-item summary.
//! "in" is the FULL input (input + cache_read + cache_creation) with the cached part — the
//! cache reads — broken out; cost is the CLI's own figure, never recomputed.

use orchestrator_agent_output::Usage;

use crate::store::RunRecord;

/// Sums of a set of runs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Totals {
    pub runs: u32,
    pub runs_without_usage: u32,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_creation_tokens: i64,
    pub total_cost_usd: f64,
    /// False when no run carried a cost.
    pub cost_known: bool,
}

impl Totals {
    /// Adds one run; a run without usage counts as a run, not as zero tokens.
    pub fn add(&mut self, run: &RunRecord) {
        self.runs += 1;
        let u = run.usage;
        if !u.is_known() {
            self.runs_without_usage += 1;
        }
        self.input_tokens += u.input_tokens.unwrap_or(0);
        self.output_tokens += u.output_tokens.unwrap_or(0);
        self.cache_read_tokens += u.cache_read_tokens.unwrap_or(0);
        self.cache_creation_tokens += u.cache_creation_tokens.unwrap_or(0);
        if let Some(c) = run.total_cost_usd {
            self.total_cost_usd += c;
            self.cost_known = true;
        }
    }

    /// Input + cache reads + cache creation.
    pub fn full_input(&self) -> i64 {
        self.input_tokens + self.cache_read_tokens + self.cache_creation_tokens
    }
}

/// Formats a token count: `449`, `45.2k`, `1.4M`.
pub fn tokens(n: i64) -> String {
    let f = n as f64;
    if n < 1_000 {
        n.to_string()
    } else if f < 999_950.0 {
        format!("{:.1}k", f / 1_000.0)
    } else {
        format!("{:.1}M", f / 1_000_000.0)
    }
}

/// Formats a cost: `$0.21`; sub-cent costs keep four decimals (`$0.0021`) so they do not read as free.
pub fn cost(usd: f64) -> String {
    if usd == 0.0 || usd >= 0.01 {
        format!("${usd:.2}")
    } else {
        format!("${usd:.4}")
    }
}

/// The role as people read it: `developer` -> `Developer`, `deploy-finalizer` -> `Deploy finalizer`.
pub fn role(agent: &str) -> String {
    let spaced = agent.replace(['-', '_'], " ");
    let mut chars = spaced.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => "Agent".to_owned(),
    }
}

/// `45.2k in (38.0k cached) / 12.1k out · $0.21`, or what is known of it.
fn usage_part(
    full_input: i64,
    cached: i64,
    output: i64,
    known: bool,
    cost_usd: Option<f64>,
) -> String {
    let mut s = if known {
        format!(
            "{} in ({} cached) / {} out",
            tokens(full_input),
            tokens(cached),
            tokens(output)
        )
    } else {
        "usage unknown".to_owned()
    };
    if let Some(c) = cost_usd {
        s.push_str(" · ");
        s.push_str(&cost(c));
    }
    s
}

/// The usage of one run, e.g. `45.2k in (38.0k cached) / 12.1k out · $0.21`, or
/// `usage unknown` (with the cost when known): the finish comment without its role, for
/// whoever shows runs one by one (`orchestrator demo`'s timeline).
pub fn run_usage(u: Usage, cost_usd: Option<f64>) -> String {
    let full = u.input_tokens.unwrap_or(0)
        + u.cache_read_tokens.unwrap_or(0)
        + u.cache_creation_tokens.unwrap_or(0);
    usage_part(
        full,
        u.cache_read_tokens.unwrap_or(0),
        u.output_tokens.unwrap_or(0),
        u.is_known(),
        cost_usd,
    )
}

/// The finish comment of one run, e.g. `Developer done · 45.2k in (38.0k cached) / 12.1k out · $0.21`.
pub fn finish_line(run: &RunRecord) -> String {
    let verb = if run.is_error == Some(true) {
        "failed"
    } else {
        "done"
    };
    format!(
        "{} {verb} · {}",
        role(&run.agent),
        run_usage(run.usage, run.total_cost_usd)
    )
}

/// One summary row, e.g. `Developer · 2 runs · 45.2k in (38.0k cached) / 12.1k out · $0.21`.
pub fn summary_line(label: &str, t: &Totals) -> String {
    let runs = if t.runs == 1 {
        "1 run".to_owned()
    } else {
        format!("{} runs", t.runs)
    };
    let known = t.runs_without_usage < t.runs;
    let mut line = format!(
        "{label} · {runs} · {}",
        usage_part(
            t.full_input(),
            t.cache_read_tokens,
            t.output_tokens,
            known,
            t.cost_known.then_some(t.total_cost_usd)
        )
    );
    if known && t.runs_without_usage > 0 {
        line.push_str(&format!(" · {} without usage", t.runs_without_usage));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(agent: &str, usage: Usage, cost: Option<f64>) -> RunRecord {
        RunRecord {
            job_id: "j".into(),
            attempt: 1,
            work_item: "ORCH-1".into(),
            agent: agent.into(),
            result_found: true,
            usage,
            total_cost_usd: cost,
            is_error: Some(false),
            subtype: Some("success".into()),
            api_error_status: None,
            num_turns: None,
            duration_ms: None,
            recorded_at_ms: 0,
            session_id: None,
            repo: String::new(),
        }
    }

    #[test]
    fn token_counts_read_like_people_write_them() {
        for (n, s) in [
            (0, "0"),
            (449, "449"),
            (999, "999"),
            (1_000, "1.0k"),
            (45_200, "45.2k"),
            (999_949, "999.9k"),
            (999_950, "1.0M"),
            (1_434_941, "1.4M"),
        ] {
            assert_eq!(tokens(n), s, "{n}");
        }
    }

    #[test]
    fn costs_keep_small_amounts_visible() {
        assert_eq!(cost(0.21), "$0.21");
        assert_eq!(cost(1.44179975), "$1.44");
        assert_eq!(cost(0.0), "$0.00");
        assert_eq!(cost(0.00213), "$0.0021");
    }

    #[test]
    fn the_finish_line_matches_the_design_example() {
        let u = Usage {
            input_tokens: Some(7_200),
            cache_read_tokens: Some(38_000),
            cache_creation_tokens: Some(0),
            output_tokens: Some(12_100),
        };
        assert_eq!(
            finish_line(&run("developer", u, Some(0.21))),
            "Developer done · 45.2k in (38.0k cached) / 12.1k out · $0.21"
        );
    }

    #[test]
    fn unknown_usage_is_said_not_zeroed() {
        assert_eq!(
            finish_line(&run("reviewer", Usage::default(), None)),
            "Reviewer done · usage unknown"
        );
        let mut failed = run("tester", Usage::default(), Some(0.0));
        failed.is_error = Some(true);
        assert_eq!(
            finish_line(&failed),
            "Tester failed · usage unknown · $0.00"
        );
    }

    #[test]
    fn summary_lines_sum_and_count_runs_without_usage() {
        let u = Usage {
            input_tokens: Some(1_000),
            cache_read_tokens: Some(500),
            cache_creation_tokens: Some(500),
            output_tokens: Some(100),
        };
        let mut t = Totals::default();
        t.add(&run("developer", u, Some(0.10)));
        t.add(&run("developer", u, Some(0.11)));
        t.add(&run("developer", Usage::default(), None));
        assert_eq!(
            summary_line("Developer", &t),
            "Developer · 3 runs · 4.0k in (1.0k cached) / 200 out · $0.21 · 1 without usage"
        );
    }

    #[test]
    fn roles_are_capitalised() {
        assert_eq!(role("developer"), "Developer");
        assert_eq!(role("deploy-finalizer"), "Deploy finalizer");
        assert_eq!(role(""), "Agent");
    }
}
