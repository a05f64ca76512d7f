//! The figures of a run, printed at the end of `all` as ONE markdown table that pastes into
//! `docs/benchmarks.md`, with the machine, the date and the load it ran under.

use std::process::Command;

/// One figure of the suite.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured.
    pub figure: String,
    /// The figure: median [range], percentiles, a ratio.
    pub measured: String,
    /// Sizes, backend, configuration: what the figure depends on.
    pub conditions: String,
    /// The bench command that reproduces it.
    pub command: String,
}

impl Row {
    pub fn new(
        figure: impl Into<String>,
        measured: impl Into<String>,
        conditions: impl Into<String>,
        command: impl Into<String>,
    ) -> Row {
        Row {
            figure: figure.into(),
            measured: measured.into(),
            conditions: conditions.into(),
            command: command.into(),
        }
    }
}

/// `|` would end a markdown cell.
fn cell(s: &str) -> String {
    s.replace('|', "\\|").replace('\n', " ")
}

/// The table, one line per row.
pub fn table(rows: &[Row]) -> String {
    let mut out = String::from(
        "| figure | measured | conditions | reproduce with `cargo run --release -p orchestrator-bench --` |\n|---|---|---|---|\n",
    );
    for r in rows {
        out.push_str(&format!(
            "| {} | {} | {} | `{}` |\n",
            cell(&r.figure),
            cell(&r.measured),
            cell(&r.conditions),
            cell(&r.command)
        ));
    }
    out
}

fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_owned)
}

/// `PostgreSQL 15.18`, as the server says.
pub async fn postgres_version(cluster: &orchestrator_testkit::PgCluster) -> String {
    use sqlx::Connection;
    let version = async {
        let mut c = sqlx::PgConnection::connect(&cluster.url("postgres")).await?;
        let v: String = sqlx::query_scalar("SHOW server_version")
            .fetch_one(&mut c)
            .await?;
        anyhow::Ok(v.split_whitespace().next().unwrap_or_default().to_owned())
    };
    // A cluster that has just started may still refuse connections for a moment.
    let _ = cluster.fresh_database().await;
    match version.await {
        Ok(v) => format!("PostgreSQL {v}"),
        Err(e) => format!("PostgreSQL (version unknown: {e})"),
    }
}

/// The load average (1, 5, 15 minutes).
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// The machine, as `lscpu`, `nproc` and `/proc/meminfo` give it, and the date (UTC).
pub fn machine() -> String {
    let model = Command::new("lscpu")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find_map(|l| l.strip_prefix("Model name:").map(|m| m.trim().to_owned()))
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let nproc = first_line("nproc", &[]).unwrap_or_else(|| "?".into());
    let mem_gib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        })
        .map_or_else(|| "?".into(), |kib| format!("{:.0}", kib / 1024.0 / 1024.0));
    let kernel = first_line("uname", &["-r"]).unwrap_or_default();
    let date = first_line("date", &["-u", "+%Y-%m-%d %H:%M UTC"]).unwrap_or_default();
    format!("nproc {nproc}, {model}, {mem_gib} GiB, Linux {kernel}; {date}")
}

/// `median [min–max] unit` over `values` (sorted in place), or "no data".
pub fn median_range(values: &mut [f64], unit: &str) -> String {
    crate::stack::median_range(values, unit)
}

/// The median of `values` (sorted in place).
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    crate::stack::percentile(values, 0.5)
}

/// `12,345` for a count or a rate.
pub fn thousands(v: f64) -> String {
    let n = v.round() as i64;
    let s = n.abs().to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 { format!("-{out}") } else { out }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0.0), "0");
        assert_eq!(thousands(999.4), "999");
        assert_eq!(thousands(1_000.0), "1,000");
        assert_eq!(thousands(20_000.0), "20,000");
        assert_eq!(thousands(1_234_567.0), "1,234,567");
        assert_eq!(thousands(-4_321.0), "-4,321");
    }

    #[test]
    fn a_pipe_does_not_break_the_table() {
        let t = table(&[Row::new("a|b", "1", "c", "d")]);
        assert!(t.lines().nth(2).is_some_and(|l| l.contains("a\\|b")), "{t}");
        assert_eq!(t.lines().count(), 3);
    }
}
