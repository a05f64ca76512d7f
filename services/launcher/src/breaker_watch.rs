//! People are told when the circuit breaker stays open (ARCHITECTURE §3.16, issue #18): an
//! opening that lasts longer than `ORCH_NOTIFY_BREAKER_OPEN_S` (half-open probes that fail
//! again included; it ends when the breaker closes) is one notification, `breaker_open`,
//! through stage-engine's `Notify` (the stream bot's comment on the issue of the job whose
//! outcome opened it, and the webhook), written to the launcher's outbox like the ceilings'.
//! Once per opening across replicas: the breaker row's `open_told` is taken by one UPDATE.

use std::time::Duration;

use orchestrator_kit::time::{now_ms, rfc3339};
use tokio_util::sync::CancellationToken;

use crate::outbox::Effect;
use crate::store;
use crate::supervisor::Supervisor;

/// The notification's `event`.
pub const EVENT: &str = "breaker_open";

/// How often the breaker is looked at: often against the threshold, but not busily.
pub fn every(open_for: Duration) -> Duration {
    (open_for / 4).clamp(Duration::from_millis(100), Duration::from_secs(30))
}

/// The text people read.
pub fn text(opened_at_ms: i64, open_for: Duration, work_item: &str) -> String {
    format!(
        "the launcher's circuit breaker has been open since {} (longer than {}s, \
         ORCH_NOTIFY_BREAKER_OPEN_S): LLM jobs are not launched while the model API keeps \
         failing transiently; {work_item}'s job was the one that opened it",
        rfc3339(opened_at_ms),
        open_for.as_secs_f64()
    )
}

impl Supervisor {
    /// Looks at the breaker until `shutdown`; a failed look is logged and tried again.
    pub(crate) async fn breaker_watch(&self, open_for: Duration, shutdown: CancellationToken) {
        let ms = i64::try_from(open_for.as_millis()).unwrap_or(i64::MAX);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = tokio::time::sleep(every(open_for)) => {}
            }
            match store::breaker_take_long_open(self.db(), now_ms(), ms).await {
                Ok(Some((opened_at_ms, work_item))) => {
                    tracing::warn!(
                        opened_at_ms,
                        work_item,
                        "circuit breaker open for long; people are told"
                    );
                    let effect = Effect::Notify {
                        event: EVENT.to_owned(),
                        event_id: format!("{EVENT}:{opened_at_ms}"),
                        text: text(opened_at_ms, open_for, &work_item),
                    };
                    self.write_effect(&work_item, &effect).await;
                }
                Ok(None) => {}
                Err(e) => tracing::warn!(error = %e, "cannot look at the circuit breaker"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_watch_looks_often_but_not_busily() {
        assert_eq!(every(Duration::from_secs(300)), Duration::from_secs(30));
        assert_eq!(every(Duration::from_secs(20)), Duration::from_secs(5));
        assert_eq!(
            every(Duration::from_millis(100)),
            Duration::from_millis(100)
        );
        let t = text(1_795_605_126_123, Duration::from_secs(300), "ORCH-7");
        assert!(
            t.contains("open since 2026-11-25T11:12:06.123Z (longer than 300s")
                && t.contains("ORCH-7"),
            "{t}"
        );
    }
}
