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

pub use orchestrator_kit::time::rfc3339;

#[cfg(test)]
mod tests {
    use super::*;

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
