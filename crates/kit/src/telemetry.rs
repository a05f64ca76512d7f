//! Logging: readable on a terminal, or JSON with `ORCH_LOG_FORMAT=json`. Secrets never reach
//! a field because they are held as [`crate::Secret`], whose `Debug` and `Display` print `***`.

use tracing_subscriber::EnvFilter;

use crate::config::LogFormat;

/// Installs the global subscriber. Calling it twice is harmless (tests start many stacks).
pub fn init(format: LogFormat, filter: &str) {
    let filter = EnvFilter::try_new(filter).unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match format {
        LogFormat::Json => builder.json().with_current_span(false).try_init(),
        LogFormat::Text => builder.with_target(false).try_init(),
    };
}

/// Installs a subscriber for tests: silent unless `TEST_LOG` is set.
pub fn init_for_tests() {
    if std::env::var_os("TEST_LOG").is_some() {
        init(
            LogFormat::Text,
            &std::env::var("TEST_LOG").unwrap_or_else(|_| "debug".into()),
        );
    }
}
