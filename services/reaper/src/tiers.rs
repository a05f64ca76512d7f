//! The three tiers as a pure function of one running job, its probe, its stored streak and
//! the time: what the tick must do about it, and the streak to keep.
//!
//! 1. dead-pid streak: the process is DEAD (or its launcher instance is gone) for
//!    `dead_ticks` consecutive ticks -> flip it failed (the launcher's attempt rules decide
//!    on a requeue);
//! 2. exit code known but still running (the launcher died between wait and finalize), once
//!    the same streak is reached: exit 0 -> `AdvanceStage` (the quality gate decides, not the
//!    exit code), then flip succeeded; non-zero -> flip failed. The streak is required here
//!    too: a live launcher finalizing the job also has its exit code, and must not be raced;
//! 3. backstop: running longer than `max_running` -> kill the process group and flip failed.
//!
//! A streak counts observations at least half an interval apart (a `TickNow` right after a
//! scheduled tick adds nothing) and at most three intervals apart (after a longer gap — the
//! reaper was down — the streak starts again): a restart or a manual tick may delay a flip,
//! never hasten one.

use orchestrator_proto::launcher::v1::Liveness;

/// A dead-pid streak as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Streak {
    pub job_id: String,
    pub attempt: u32,
    pub ticks: u32,
    pub first_dead_at_ms: i64,
    pub last_dead_at_ms: i64,
    /// `DEAD` or `INSTANCE_GONE`.
    pub liveness: String,
}

/// What the tick does about one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Nothing,
    /// Tier 1.
    FlipDeadPid {
        ticks: u32,
    },
    /// Tier 2.
    ExitCode {
        code: i32,
        ticks: u32,
    },
    /// Tier 3.
    Backstop {
        running_ms: i64,
    },
}

/// The decision for one job: the action and the streak to store (`None`: no streak).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub action: Action,
    pub streak: Option<Streak>,
}

/// What the tick knows of one running job.
#[derive(Debug, Clone, Copy)]
pub struct Seen<'a> {
    pub job_id: &'a str,
    pub attempt: u32,
    /// When the attempt started (0: unknown, no backstop).
    pub started_at_ms: i64,
    /// The launcher's probe; `None` when it gave none for this attempt (no evidence).
    pub liveness: Option<Liveness>,
    pub exit_code: Option<i32>,
}

/// The knobs the decision needs, in milliseconds.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub interval_ms: i64,
    pub dead_ticks: u32,
    pub max_running_ms: i64,
}

/// The streak after this tick's observation.
fn next_streak(
    seen: &Seen<'_>,
    previous: Option<&Streak>,
    now_ms: i64,
    rules: &Rules,
) -> Option<Streak> {
    let liveness = match seen.liveness {
        Some(Liveness::Dead) => "DEAD",
        Some(Liveness::InstanceGone) => "INSTANCE_GONE",
        // Alive resets the streak; no evidence (no probe, an unspecified answer) is not a
        // death either: the streak must be consecutive observations of death.
        Some(Liveness::Alive | Liveness::Unspecified) => return None,
        None => return previous.cloned(),
    };
    let fresh = || Streak {
        job_id: seen.job_id.to_owned(),
        attempt: seen.attempt,
        ticks: 1,
        first_dead_at_ms: now_ms,
        last_dead_at_ms: now_ms,
        liveness: liveness.to_owned(),
    };
    let Some(p) = previous else {
        return Some(fresh());
    };
    let gap = now_ms - p.last_dead_at_ms;
    if gap < rules.interval_ms / 2 {
        // Too soon after the last counted observation: it adds nothing.
        Some(p.clone())
    } else if gap <= rules.interval_ms * 3 {
        Some(Streak {
            ticks: p.ticks.saturating_add(1),
            last_dead_at_ms: now_ms,
            liveness: liveness.to_owned(),
            ..p.clone()
        })
    } else {
        // The reaper missed ticks: what happened meanwhile is unknown; start again.
        Some(fresh())
    }
}

/// Decides what to do about one running job.
pub fn decide(seen: &Seen<'_>, previous: Option<&Streak>, now_ms: i64, rules: &Rules) -> Decision {
    let streak = next_streak(seen, previous, now_ms, rules);
    let action = match &streak {
        Some(s) if s.ticks >= rules.dead_ticks => match seen.exit_code {
            Some(code) => Action::ExitCode {
                code,
                ticks: s.ticks,
            },
            None => Action::FlipDeadPid { ticks: s.ticks },
        },
        _ if seen.started_at_ms > 0 && now_ms - seen.started_at_ms > rules.max_running_ms => {
            Action::Backstop {
                running_ms: now_ms - seen.started_at_ms,
            }
        }
        _ => Action::Nothing,
    };
    Decision { action, streak }
}

#[cfg(test)]
mod tests {
    use super::*;

    const I: i64 = 30_000;
    const RULES: Rules = Rules {
        interval_ms: I,
        dead_ticks: 3,
        max_running_ms: 7_200_000,
    };
    const T0: i64 = 1_800_000_000_000;

    fn seen(
        liveness: Option<Liveness>,
        exit_code: Option<i32>,
        started_at_ms: i64,
    ) -> Seen<'static> {
        Seen {
            job_id: "j1",
            attempt: 2,
            started_at_ms,
            liveness,
            exit_code,
        }
    }

    fn streak(ticks: u32, last: i64) -> Streak {
        Streak {
            job_id: "j1".into(),
            attempt: 2,
            ticks,
            first_dead_at_ms: last - i64::from(ticks - 1) * I,
            last_dead_at_ms: last,
            liveness: "DEAD".into(),
        }
    }

    /// (case, probe, exit code, started, previous streak, now) -> (action, streak ticks).
    type Case = (
        &'static str,
        Option<Liveness>,
        Option<i32>,
        i64,
        Option<Streak>,
        i64,
        Action,
        Option<u32>,
    );

    #[test]
    fn the_tiers_as_a_table() {
        use Liveness::*;
        let recent = T0 - 60_000;
        let ancient = T0 - 7_300_000;
        let cases: Vec<Case> = vec![
            (
                "alive: nothing",
                Some(Alive),
                None,
                recent,
                None,
                T0,
                Action::Nothing,
                None,
            ),
            (
                "alive resets a streak",
                Some(Alive),
                None,
                recent,
                Some(streak(2, T0 - I)),
                T0,
                Action::Nothing,
                None,
            ),
            (
                "first death starts a streak",
                Some(Dead),
                None,
                recent,
                None,
                T0,
                Action::Nothing,
                Some(1),
            ),
            (
                "second death an interval later",
                Some(Dead),
                None,
                recent,
                Some(streak(1, T0 - I)),
                T0,
                Action::Nothing,
                Some(2),
            ),
            (
                "third death flips (tier 1)",
                Some(Dead),
                None,
                recent,
                Some(streak(2, T0 - I)),
                T0,
                Action::FlipDeadPid { ticks: 3 },
                Some(3),
            ),
            (
                "instance gone counts as dead",
                Some(InstanceGone),
                None,
                recent,
                Some(streak(2, T0 - I)),
                T0,
                Action::FlipDeadPid { ticks: 3 },
                Some(3),
            ),
            (
                "a tick too soon adds nothing",
                Some(Dead),
                None,
                recent,
                Some(streak(2, T0 - I / 3)),
                T0,
                Action::Nothing,
                Some(2),
            ),
            (
                "half an interval counts",
                Some(Dead),
                None,
                recent,
                Some(streak(2, T0 - I / 2)),
                T0,
                Action::FlipDeadPid { ticks: 3 },
                Some(3),
            ),
            (
                "a long gap starts again",
                Some(Dead),
                None,
                recent,
                Some(streak(2, T0 - 3 * I - 1)),
                T0,
                Action::Nothing,
                Some(1),
            ),
            (
                "three intervals still counts",
                Some(Dead),
                None,
                recent,
                Some(streak(2, T0 - 3 * I)),
                T0,
                Action::FlipDeadPid { ticks: 3 },
                Some(3),
            ),
            (
                "no probe: the streak stands still",
                None,
                None,
                recent,
                Some(streak(2, T0 - I)),
                T0,
                Action::Nothing,
                Some(2),
            ),
            (
                "unspecified is no evidence of death",
                Some(Unspecified),
                None,
                recent,
                Some(streak(2, T0 - I)),
                T0,
                Action::Nothing,
                None,
            ),
            (
                "exit 0 known waits for the streak",
                Some(Dead),
                Some(0),
                recent,
                None,
                T0,
                Action::Nothing,
                Some(1),
            ),
            (
                "exit 0 after the streak (tier 2)",
                Some(Dead),
                Some(0),
                recent,
                Some(streak(2, T0 - I)),
                T0,
                Action::ExitCode { code: 0, ticks: 3 },
                Some(3),
            ),
            (
                "exit 3 after the streak (tier 2)",
                Some(InstanceGone),
                Some(3),
                recent,
                Some(streak(5, T0 - I)),
                T0,
                Action::ExitCode { code: 3, ticks: 6 },
                Some(6),
            ),
            (
                "running too long (tier 3)",
                Some(Alive),
                None,
                ancient,
                None,
                T0,
                Action::Backstop {
                    running_ms: 7_300_000,
                },
                None,
            ),
            (
                "just under the backstop",
                Some(Alive),
                None,
                T0 - 7_200_000,
                None,
                T0,
                Action::Nothing,
                None,
            ),
            (
                "unknown start: no backstop",
                Some(Alive),
                None,
                0,
                None,
                T0,
                Action::Nothing,
                None,
            ),
            (
                "dead and too long: the streak decides first",
                Some(Dead),
                None,
                ancient,
                Some(streak(2, T0 - I)),
                T0,
                Action::FlipDeadPid { ticks: 3 },
                Some(3),
            ),
            (
                "dead below the streak but too long",
                Some(Dead),
                None,
                ancient,
                None,
                T0,
                Action::Backstop {
                    running_ms: 7_300_000,
                },
                Some(1),
            ),
        ];
        for (case, liveness, code, started, previous, now, action, ticks) in cases {
            let d = decide(
                &seen(liveness, code, started),
                previous.as_ref(),
                now,
                &RULES,
            );
            assert_eq!(d.action, action, "{case}");
            assert_eq!(d.streak.as_ref().map(|s| s.ticks), ticks, "{case}");
        }
    }

    #[test]
    fn a_counted_death_moves_the_last_time_and_keeps_the_first() {
        let d = decide(
            &seen(Some(Liveness::InstanceGone), None, 0),
            Some(&streak(1, T0 - I)),
            T0,
            &RULES,
        );
        let s = d.streak.expect("streak");
        assert_eq!((s.first_dead_at_ms, s.last_dead_at_ms), (T0 - I, T0));
        assert_eq!(s.liveness, "INSTANCE_GONE");
        let d = decide(
            &seen(Some(Liveness::Dead), None, 0),
            Some(&streak(1, T0 - I / 4)),
            T0,
            &RULES,
        );
        assert_eq!(d.streak.expect("streak").last_dead_at_ms, T0 - I / 4);
    }

    #[test]
    fn one_dead_tick_is_enough_when_configured_so() {
        let rules = Rules {
            dead_ticks: 1,
            ..RULES
        };
        let d = decide(&seen(Some(Liveness::Dead), None, 0), None, T0, &rules);
        assert_eq!(d.action, Action::FlipDeadPid { ticks: 1 });
    }
}
