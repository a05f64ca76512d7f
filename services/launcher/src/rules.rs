//! Where a job goes when a run ends: the attempt rules, in one pure function.
//!
//! - success -> `succeeded`;
//! - transient -> `queued` after the given wait or `backoff(n)`, while the job has had fewer
//!   than `ORCH_MAX_TRANSIENT_ATTEMPTS` transient failures, else `failed`;
//! - permanent -> `queued` after `backoff(failures)` while `failures < max_attempts` (and
//!   the failure can heal: not a spend limit, not an auth failure), else `failed`;
//! - bad input -> `failed` at once;
//! - "again" (a busy merge lease, a peer that is down, a reserved job's "call me in N s")
//!   -> `queued` after the wait, counting nothing;
//! - cancelled -> `cancelled`.

use std::time::Duration;

use orchestrator_kit::retry::Backoff;

use crate::store::{JobRow, Settle, Status};

/// How a run ended, as the launcher decided it.
#[derive(Debug, Clone, PartialEq)]
pub enum End {
    Succeeded {
        outcome: String,
        note: String,
    },
    /// A failure that a retry cannot fix: failed now.
    Failed {
        outcome: &'static str,
        reason: String,
    },
    /// Retried while the job has attempts left (and `retry`).
    Permanent {
        outcome: &'static str,
        reason: String,
        retry: bool,
    },
    /// Retried on the transient budget.
    Transient {
        reason: String,
        wait: Option<Duration>,
    },
    /// Back to the queue after `after`, counting no failure. `bump` counts it in
    /// `transient_attempts` (for the next backoff) without ever failing the job.
    Again {
        outcome: &'static str,
        reason: String,
        after: Duration,
        bump: bool,
    },
    Cancelled {
        reason: String,
    },
}

/// The limits the rules apply.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_transient_attempts: u32,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Limits {
    fn backoff(&self) -> Backoff {
        Backoff::new(self.backoff_base, self.backoff_max)
    }
}

fn after(now_ms: i64, d: Duration) -> i64 {
    now_ms.saturating_add(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The row a run's end writes, from the job as it was claimed.
pub fn next_state(job: &JobRow, end: &End, limits: Limits, now_ms: i64, jitter: f64) -> Settle {
    let mut s = Settle {
        status: Status::Failed,
        not_before_ms: job.not_before_ms,
        failures: job.failures,
        transient_attempts: job.transient_attempts,
        outcome: String::new(),
        reason: String::new(),
        exit_code: None,
        qg_hook_blocks: None,
        now_ms,
    };
    match end {
        End::Succeeded { outcome, note } => {
            s.status = Status::Succeeded;
            s.outcome = outcome.clone();
            s.reason = note.clone();
        }
        End::Failed { outcome, reason } => {
            s.failures += 1;
            s.outcome = (*outcome).to_owned();
            s.reason = reason.clone();
        }
        End::Permanent {
            outcome,
            reason,
            retry,
        } => {
            s.failures += 1;
            s.outcome = (*outcome).to_owned();
            if *retry && s.failures < job.max_attempts {
                s.status = Status::Queued;
                s.not_before_ms = after(now_ms, limits.backoff().spread(s.failures, jitter));
                s.reason = format!(
                    "{reason} (failure {} of {}; retrying)",
                    s.failures, job.max_attempts
                );
            } else if *retry {
                s.reason = format!("{reason} (failure {} of {})", s.failures, job.max_attempts);
            } else {
                s.reason = format!("{reason} (not retried)");
            }
        }
        End::Transient { reason, wait } => {
            s.transient_attempts += 1;
            s.outcome = "transient".to_owned();
            if s.transient_attempts >= limits.max_transient_attempts {
                s.reason = format!(
                    "transient budget exhausted after {} transient failures: {reason}",
                    s.transient_attempts
                );
            } else {
                s.status = Status::Queued;
                let d =
                    wait.unwrap_or_else(|| limits.backoff().spread(s.transient_attempts, jitter));
                s.not_before_ms = after(now_ms, d);
                s.reason = format!(
                    "{reason} (transient failure {} of {}; retrying in {} ms{})",
                    s.transient_attempts,
                    limits.max_transient_attempts,
                    d.as_millis(),
                    if wait.is_some() {
                        ", as the output said"
                    } else {
                        ""
                    }
                );
            }
        }
        End::Again {
            outcome,
            reason,
            after: d,
            bump,
        } => {
            s.status = Status::Queued;
            if *bump {
                s.transient_attempts += 1;
            }
            s.not_before_ms = after(now_ms, *d);
            s.outcome = (*outcome).to_owned();
            s.reason = reason.clone();
        }
        End::Cancelled { reason } => {
            s.status = Status::Cancelled;
            s.outcome = "cancelled".to_owned();
            s.reason = reason.clone();
        }
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Kind;

    fn job(failures: u32, transient: u32, max_attempts: u32) -> JobRow {
        JobRow {
            id: "j".into(),
            work_item: "ORCH-1".into(),
            repo: "acme/app".into(),
            agent: "developer".into(),
            stage: "development".into(),
            kind: Kind::Llm,
            payload_json: "{}".into(),
            dedupe_key: None,
            status: Status::Running,
            attempt: failures + transient + 1,
            max_attempts,
            failures,
            transient_attempts: transient,
            not_before_ms: 0,
            instance_id: "i".into(),
            pid: Some(42),
            exit_code: None,
            enqueued_at_ms: 0,
            started_at_ms: 0,
            heartbeat_at_ms: 0,
            finished_at_ms: 0,
            log_path: String::new(),
            outcome: String::new(),
            reason: String::new(),
            qg_hook_blocks: 0,
            profile_json: String::new(),
        }
    }

    const LIMITS: Limits = Limits {
        max_transient_attempts: 3,
        backoff_base: Duration::from_secs(10),
        backoff_max: Duration::from_secs(60),
    };
    const NOW: i64 = 1_000_000;

    fn perm(retry: bool) -> End {
        End::Permanent {
            outcome: "permanent",
            reason: "boom".into(),
            retry,
        }
    }

    fn transient(wait: Option<u64>) -> End {
        End::Transient {
            reason: "rate limited (429)".into(),
            wait: wait.map(Duration::from_secs),
        }
    }

    #[test]
    fn the_attempt_rules() {
        // (job: failures, transient, max_attempts), end -> (status, failures, transient, not_before - now)
        type Case = ((u32, u32, u32), End, (Status, u32, u32, i64));
        let cases: Vec<Case> = vec![
            ((0, 0, 3), perm(true), (Status::Queued, 1, 0, 10_000)),
            ((1, 0, 3), perm(true), (Status::Queued, 2, 0, 20_000)),
            ((2, 0, 3), perm(true), (Status::Failed, 3, 0, -NOW)),
            ((0, 0, 1), perm(true), (Status::Failed, 1, 0, -NOW)),
            // Spend limit, auth: never retried.
            ((0, 0, 3), perm(false), (Status::Failed, 1, 0, -NOW)),
            // Transient failures do not spend attempts, and the reverse.
            ((2, 0, 3), transient(None), (Status::Queued, 2, 1, 10_000)),
            ((0, 1, 3), transient(None), (Status::Queued, 0, 2, 20_000)),
            (
                (0, 1, 3),
                transient(Some(37)),
                (Status::Queued, 0, 2, 37_000),
            ),
            ((0, 2, 3), transient(Some(37)), (Status::Failed, 0, 3, -NOW)),
            (
                (1, 1, 3),
                End::Failed {
                    outcome: "bad_input",
                    reason: "missing prompt".into(),
                },
                (Status::Failed, 2, 1, -NOW),
            ),
            (
                (0, 5, 3),
                End::Again {
                    outcome: "lease_busy",
                    reason: "held".into(),
                    after: Duration::from_secs(5),
                    bump: false,
                },
                (Status::Queued, 0, 5, 5_000),
            ),
            (
                (0, 5, 3),
                End::Again {
                    outcome: "peer_unavailable",
                    reason: "down".into(),
                    after: Duration::from_secs(5),
                    bump: true,
                },
                (Status::Queued, 0, 6, 5_000),
            ),
            (
                (0, 0, 3),
                End::Succeeded {
                    outcome: "succeeded".into(),
                    note: String::new(),
                },
                (Status::Succeeded, 0, 0, -NOW),
            ),
            (
                (0, 0, 3),
                End::Cancelled {
                    reason: "by ada".into(),
                },
                (Status::Cancelled, 0, 0, -NOW),
            ),
        ];
        for ((f, t, m), end, (status, failures, transient_attempts, delay)) in cases {
            let s = next_state(&job(f, t, m), &end, LIMITS, NOW, 0.5);
            assert_eq!(
                (
                    s.status,
                    s.failures,
                    s.transient_attempts,
                    s.not_before_ms - NOW
                ),
                (status, failures, transient_attempts, delay),
                "{end:?} on ({f}, {t}, {m}): {}",
                s.reason
            );
            if status.is_terminal() && status != Status::Succeeded {
                assert!(!s.reason.is_empty());
            }
        }
    }

    #[test]
    fn reasons_say_what_happens_next() {
        let s = next_state(&job(0, 2, 3), &transient(None), LIMITS, NOW, 0.5);
        assert!(
            s.reason.starts_with("transient budget exhausted after 3"),
            "{}",
            s.reason
        );
        let s = next_state(&job(0, 0, 3), &transient(Some(37)), LIMITS, NOW, 0.5);
        assert!(s.reason.contains("as the output said"), "{}", s.reason);
        let s = next_state(&job(0, 0, 3), &perm(false), LIMITS, NOW, 0.5);
        assert!(s.reason.ends_with("(not retried)"), "{}", s.reason);
    }
}
