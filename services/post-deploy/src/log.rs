//! The post-deploy log: one file per work item under `ORCH_POST_DEPLOY_LOG_DIR`, one line
//! per tick (and per rollback), appended. Writing it never fails a tick.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The log file of `work_item` (a key already validated: no separators, no `..`).
pub fn path(dir: &Path, work_item: &str) -> PathBuf {
    dir.join(format!("{work_item}.log"))
}

/// Appends `line` (stamped with `at_ms`) to the work item's log; failures are logged.
pub fn append(dir: &Path, work_item: &str, at_ms: i64, line: &str) {
    let file = path(dir, work_item);
    let write = || -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&file)?;
        // One write per line, so concurrent appends never interleave within a line.
        let text = format!("{} {}\n", rfc3339(at_ms), line.replace('\n', " "));
        f.write_all(text.as_bytes())
    };
    if let Err(e) = write() {
        tracing::warn!(work_item, path = %file.display(), error = %e, "cannot append to the post-deploy log");
    }
}

/// Formats epoch milliseconds as `2026-11-25T11:12:06.123Z`.
pub fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let millis = ms.rem_euclid(1000);
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// The proleptic Gregorian date of a day count since 1970-01-01 (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_utc_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
        assert_eq!(rfc3339(1_795_605_126_123), "2026-11-25T11:12:06.123Z");
        assert_eq!(rfc3339(-1), "1969-12-31T23:59:59.999Z");
    }

    #[test]
    fn lines_are_appended_one_per_call() {
        let dir = tempfile::tempdir().expect("tempdir");
        let logs = dir.path().join("logs");
        append(&logs, "SHOP-1", 0, "first");
        append(&logs, "SHOP-1", 1_000, "second\nline");
        let text = std::fs::read_to_string(path(&logs, "SHOP-1")).expect("log");
        assert_eq!(
            text,
            "1970-01-01T00:00:00.000Z first\n1970-01-01T00:00:01.000Z second line\n"
        );
    }
}
