//! The pure half of a tick: `fold` what was seen into the watch's running counts,
//! `classify` them, and `decide_action`. No I/O, no clock, no way to fail.

use std::fmt;

use crate::signals::{HealthReading, MetricsReading, Signals};

/// What a watch carries from one tick to the next.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Progress {
    pub consecutive_health_failures: u32,
    pub consecutive_probe_errors: u32,
    /// The counters as last read; `None` until the first reading.
    pub last_requests_total: Option<f64>,
    pub last_errors_5xx_total: Option<f64>,
    /// Requests and 5xx answers counted since the watch was armed.
    pub window_requests: f64,
    pub window_5xx: f64,
}

/// The counters' increase this tick; `None` when there was no earlier reading to compare with.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Deltas {
    pub requests: Option<f64>,
    pub errors_5xx: Option<f64>,
}

/// The increase of a counter from `last` to `now`. A counter that went down was reset
/// (the deployed process restarted), so everything it holds now is new — Prometheus's
/// own rule for `increase()`.
fn increase(last: Option<f64>, now: f64) -> Option<f64> {
    let last = last?;
    Some(if now >= last { now - last } else { now })
}

/// Adds one tick's signals to the watch's progress.
pub fn fold(prev: &Progress, signals: &Signals) -> (Progress, Deltas) {
    let mut next = prev.clone();
    match &signals.health {
        HealthReading::Ok { .. } => next.consecutive_health_failures = 0,
        HealthReading::Failed { .. } => {
            next.consecutive_health_failures = prev.consecutive_health_failures.saturating_add(1)
        }
        // We did not learn anything about production: the streak neither grows nor breaks.
        HealthReading::NotConfigured | HealthReading::ProbeError(_) => {}
    }
    let probe_error = matches!(signals.health, HealthReading::ProbeError(_))
        || matches!(signals.metrics, MetricsReading::ProbeError(_));
    next.consecutive_probe_errors = if probe_error {
        prev.consecutive_probe_errors.saturating_add(1)
    } else {
        0
    };
    let mut deltas = Deltas::default();
    if let MetricsReading::Counters {
        requests_total,
        errors_5xx_total,
    } = signals.metrics
    {
        deltas.requests = increase(prev.last_requests_total, requests_total);
        deltas.errors_5xx = increase(prev.last_errors_5xx_total, errors_5xx_total);
        next.window_requests += deltas.requests.unwrap_or(0.0);
        next.window_5xx += deltas.errors_5xx.unwrap_or(0.0);
        next.last_requests_total = Some(requests_total);
        next.last_errors_5xx_total = Some(errors_5xx_total);
    }
    (next, deltas)
}

/// The thresholds that classify a watch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Thresholds {
    /// Consecutive health failures that mean DEGRADED (at least 1).
    pub fail_threshold: u32,
    /// A window 5xx ratio strictly above this means DEGRADED.
    pub error_ratio_threshold: f64,
}

/// HEALTHY or DEGRADED.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    Healthy,
    Degraded,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Degraded => "degraded",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// A classification and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Classification {
    pub health: Health,
    pub reason: String,
}

/// DEGRADED iff at least `fail_threshold` consecutive health failures, or the window's 5xx
/// ratio is above `error_ratio_threshold`. Anything else — no traffic, or numbers that make
/// no sense (a classifier error) — is HEALTHY: a rollback needs evidence.
pub fn classify(p: &Progress, t: &Thresholds) -> Classification {
    let fail_threshold = t.fail_threshold.max(1);
    if p.consecutive_health_failures >= fail_threshold {
        return Classification {
            health: Health::Degraded,
            reason: format!(
                "{} consecutive health failures (threshold {fail_threshold})",
                p.consecutive_health_failures
            ),
        };
    }
    let healthy = |reason: String| Classification {
        health: Health::Healthy,
        reason,
    };
    let (requests, errors) = (p.window_requests, p.window_5xx);
    if !requests.is_finite()
        || !errors.is_finite()
        || requests < 0.0
        || errors < 0.0
        || !t.error_ratio_threshold.is_finite()
    {
        return healthy(format!(
            "classifier error: window counts {errors} 5xx / {requests} requests, threshold {}",
            t.error_ratio_threshold
        ));
    }
    if requests == 0.0 {
        return healthy("no requests in the window: no data".to_owned());
    }
    let ratio = errors / requests;
    if !ratio.is_finite() {
        return healthy(format!(
            "classifier error: 5xx ratio {errors} / {requests} is not a number"
        ));
    }
    let ratio_text = format!(
        "window 5xx ratio {ratio:.4} ({errors} of {requests}), threshold {}",
        t.error_ratio_threshold
    );
    if ratio > t.error_ratio_threshold {
        Classification {
            health: Health::Degraded,
            reason: ratio_text,
        }
    } else {
        healthy(ratio_text)
    }
}

/// What a tick does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Keep watching.
    Continue,
    /// The window is over and nothing is wrong: stop watching.
    Close,
    /// Run the repo's rollback command, then stop watching.
    Rollback,
    /// Tell a human; roll nothing back.
    AlertOnly,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::Continue => "CONTINUE",
            Action::Close => "CLOSE",
            Action::Rollback => "ROLLBACK",
            Action::AlertOnly => "ALERT_ONLY",
        }
    }

    /// Reads the stored spelling back; anything else is CONTINUE.
    pub fn parse(s: &str) -> Action {
        match s {
            "CLOSE" => Action::Close,
            "ROLLBACK" => Action::Rollback,
            "ALERT_ONLY" => Action::AlertOnly,
            _ => Action::Continue,
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.as_str())
    }
}

/// Everything `decide_action` looks at.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DecideInput {
    pub health: Health,
    /// The orchestrator's own repo: a tick never restarts the orchestrator.
    pub self_repo: bool,
    /// A rollback command is configured for the repo.
    pub rollback_configured: bool,
    pub consecutive_probe_errors: u32,
    pub probe_error_alert_threshold: u32,
    /// The observation window has ended.
    pub window_over: bool,
}

/// An action and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub action: Action,
    pub reason: String,
}

/// DEGRADED rolls back, except the orchestrator's own repo (always ALERT_ONLY) and a repo
/// without a rollback command (nothing to run: ALERT_ONLY). The prober's own errors alert
/// once they reach their threshold and never roll back. Otherwise the window's end closes
/// the watch.
pub fn decide_action(i: &DecideInput) -> Decision {
    let decision = |action, reason: &str| Decision {
        action,
        reason: reason.to_owned(),
    };
    if i.health == Health::Degraded {
        if i.self_repo {
            return decision(
                Action::AlertOnly,
                "degraded; the orchestrator's own deployment is only alerted on",
            );
        }
        if !i.rollback_configured {
            return decision(
                Action::AlertOnly,
                "degraded; no rollback command is configured for the repo",
            );
        }
        return decision(Action::Rollback, "degraded");
    }
    if i.consecutive_probe_errors >= i.probe_error_alert_threshold.max(1) {
        return Decision {
            action: Action::AlertOnly,
            reason: format!(
                "{} consecutive probe errors (threshold {}); the prober's own errors never roll back",
                i.consecutive_probe_errors,
                i.probe_error_alert_threshold.max(1)
            ),
        };
    }
    if i.window_over {
        return decision(Action::Close, "window over");
    }
    decision(Action::Continue, "healthy")
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Thresholds = Thresholds {
        fail_threshold: 3,
        error_ratio_threshold: 0.05,
    };

    fn progress(failures: u32, requests: f64, errors: f64) -> Progress {
        Progress {
            consecutive_health_failures: failures,
            window_requests: requests,
            window_5xx: errors,
            ..Progress::default()
        }
    }

    #[test]
    fn classify_at_every_boundary() {
        use Health::*;
        let cases: &[(&str, Progress, Health, &str)] = &[
            (
                "no failures, no traffic",
                progress(0, 0.0, 0.0),
                Healthy,
                "no data",
            ),
            (
                "threshold - 1 failures",
                progress(2, 0.0, 0.0),
                Healthy,
                "no data",
            ),
            (
                "threshold failures",
                progress(3, 0.0, 0.0),
                Degraded,
                "3 consecutive",
            ),
            (
                "above threshold failures",
                progress(9, 100.0, 0.0),
                Degraded,
                "9 consecutive",
            ),
            (
                "failures win over a good ratio",
                progress(3, 1000.0, 0.0),
                Degraded,
                "consecutive",
            ),
            ("ratio 0", progress(0, 100.0, 0.0), Healthy, "ratio 0.0000"),
            (
                "ratio equal to the threshold",
                progress(0, 100.0, 5.0),
                Healthy,
                "ratio 0.0500",
            ),
            (
                "ratio equal, other scale",
                progress(0, 2000.0, 100.0),
                Healthy,
                "ratio 0.0500",
            ),
            (
                "ratio just above the threshold",
                progress(0, 100_000.0, 5_001.0),
                Degraded,
                "ratio 0.0500",
            ),
            (
                "ratio well above",
                progress(0, 100.0, 50.0),
                Degraded,
                "ratio 0.5000",
            ),
            ("all 5xx", progress(0, 3.0, 3.0), Degraded, "ratio 1.0000"),
            (
                "zero traffic with 5xx counted",
                progress(0, 0.0, 4.0),
                Healthy,
                "no data",
            ),
            (
                "zero traffic after threshold - 1 failures",
                progress(2, 0.0, 0.0),
                Healthy,
                "no data",
            ),
            (
                "NaN requests",
                progress(0, f64::NAN, 1.0),
                Healthy,
                "classifier error",
            ),
            (
                "infinite 5xx",
                progress(0, 10.0, f64::INFINITY),
                Healthy,
                "classifier error",
            ),
            (
                "negative requests",
                progress(0, -5.0, 1.0),
                Healthy,
                "classifier error",
            ),
            (
                "negative 5xx",
                progress(0, 5.0, -1.0),
                Healthy,
                "classifier error",
            ),
        ];
        for (name, p, want, reason) in cases {
            let c = classify(p, &T);
            assert_eq!(c.health, *want, "{name}: {c:?}");
            assert!(c.reason.contains(reason), "{name}: {:?}", c.reason);
        }
    }

    #[test]
    fn a_threshold_of_zero_reads_as_one_and_a_nan_threshold_is_a_classifier_error() {
        let t = Thresholds {
            fail_threshold: 0,
            error_ratio_threshold: 0.05,
        };
        assert_eq!(classify(&progress(0, 0.0, 0.0), &t).health, Health::Healthy);
        assert_eq!(
            classify(&progress(1, 0.0, 0.0), &t).health,
            Health::Degraded
        );
        let t = Thresholds {
            fail_threshold: 3,
            error_ratio_threshold: f64::NAN,
        };
        let c = classify(&progress(0, 10.0, 10.0), &t);
        assert_eq!(c.health, Health::Healthy);
        assert!(c.reason.contains("classifier error"));
    }

    fn signals(health: HealthReading, metrics: MetricsReading) -> Signals {
        Signals { health, metrics }
    }
    fn ok() -> HealthReading {
        HealthReading::Ok {
            status: 200,
            latency_ms: 3,
        }
    }
    fn failed() -> HealthReading {
        HealthReading::Failed {
            status: Some(503),
            latency_ms: 3,
            detail: "answered 503".into(),
        }
    }
    fn counters(r: f64, e: f64) -> MetricsReading {
        MetricsReading::Counters {
            requests_total: r,
            errors_5xx_total: e,
        }
    }

    #[test]
    fn fold_counts_streaks_and_window_deltas() {
        let p0 = Progress::default();
        // First reading: a baseline, no delta.
        let (p1, d1) = fold(&p0, &signals(ok(), counters(1000.0, 10.0)));
        assert_eq!(d1, Deltas::default());
        assert_eq!((p1.window_requests, p1.window_5xx), (0.0, 0.0));
        assert_eq!(p1.last_requests_total, Some(1000.0));

        let (p2, d2) = fold(&p1, &signals(failed(), counters(1100.0, 15.0)));
        assert_eq!(d2.requests, Some(100.0));
        assert_eq!(d2.errors_5xx, Some(5.0));
        assert_eq!(p2.consecutive_health_failures, 1);
        assert_eq!((p2.window_requests, p2.window_5xx), (100.0, 5.0));

        // A reset counter (the process restarted): everything it holds is new.
        let (p3, d3) = fold(&p2, &signals(failed(), counters(40.0, 2.0)));
        assert_eq!(d3.requests, Some(40.0));
        assert_eq!(d3.errors_5xx, Some(2.0));
        assert_eq!((p3.window_requests, p3.window_5xx), (140.0, 7.0));
        assert_eq!(p3.consecutive_health_failures, 2);

        // The prober's own errors neither grow nor break the health streak, and keep the counters.
        let (p4, d4) = fold(
            &p3,
            &signals(
                HealthReading::ProbeError("dns".into()),
                MetricsReading::ProbeError("refused".into()),
            ),
        );
        assert_eq!(d4, Deltas::default());
        assert_eq!(p4.consecutive_health_failures, 2);
        assert_eq!(p4.consecutive_probe_errors, 1);
        assert_eq!(p4.last_requests_total, Some(40.0));
        let (p5, _) = fold(
            &p4,
            &signals(failed(), MetricsReading::ProbeError("x".into())),
        );
        assert_eq!(p5.consecutive_health_failures, 3);
        assert_eq!(p5.consecutive_probe_errors, 2);

        // A clean tick breaks both streaks.
        let (p6, _) = fold(&p5, &signals(ok(), counters(50.0, 2.0)));
        assert_eq!(p6.consecutive_health_failures, 0);
        assert_eq!(p6.consecutive_probe_errors, 0);
        assert_eq!((p6.window_requests, p6.window_5xx), (150.0, 7.0));

        // Nothing configured on the health side is not an error.
        let (p7, _) = fold(
            &p6,
            &signals(HealthReading::NotConfigured, counters(50.0, 2.0)),
        );
        assert_eq!(p7.consecutive_probe_errors, 0);
    }

    fn input(health: Health, self_repo: bool, probe_errors: u32, window_over: bool) -> DecideInput {
        DecideInput {
            health,
            self_repo,
            rollback_configured: true,
            consecutive_probe_errors: probe_errors,
            probe_error_alert_threshold: 3,
            window_over,
        }
    }

    #[test]
    fn decide_action_table() {
        use Action::*;
        use Health::*;
        let cases: &[(&str, DecideInput, Action)] = &[
            (
                "healthy mid-window",
                input(Healthy, false, 0, false),
                Continue,
            ),
            (
                "healthy, window over",
                input(Healthy, false, 0, true),
                Close,
            ),
            (
                "degraded mid-window",
                input(Degraded, false, 0, false),
                Rollback,
            ),
            (
                "degraded, window over",
                input(Degraded, false, 0, true),
                Rollback,
            ),
            (
                "degraded self repo",
                input(Degraded, true, 0, false),
                AlertOnly,
            ),
            (
                "degraded self repo, window over",
                input(Degraded, true, 0, true),
                AlertOnly,
            ),
            (
                "healthy self repo",
                input(Healthy, true, 0, false),
                Continue,
            ),
            (
                "healthy self repo, window over",
                input(Healthy, true, 0, true),
                Close,
            ),
            (
                "probe errors below threshold",
                input(Healthy, false, 2, false),
                Continue,
            ),
            (
                "probe errors at threshold",
                input(Healthy, false, 3, false),
                AlertOnly,
            ),
            (
                "probe errors at threshold, window over",
                input(Healthy, false, 3, true),
                AlertOnly,
            ),
            (
                "probe errors and degraded",
                input(Degraded, false, 5, false),
                Rollback,
            ),
            (
                "degraded without a rollback command",
                DecideInput {
                    rollback_configured: false,
                    ..input(Degraded, false, 0, false)
                },
                AlertOnly,
            ),
        ];
        for (name, i, want) in cases {
            assert_eq!(decide_action(i).action, *want, "{name}");
        }
    }

    #[test]
    fn the_self_repo_is_never_rolled_back() {
        for health in [Health::Healthy, Health::Degraded] {
            for rollback_configured in [false, true] {
                for probe_errors in [0, 1, 3, 100] {
                    for window_over in [false, true] {
                        let d = decide_action(&DecideInput {
                            health,
                            self_repo: true,
                            rollback_configured,
                            consecutive_probe_errors: probe_errors,
                            probe_error_alert_threshold: 3,
                            window_over,
                        });
                        assert_ne!(
                            d.action,
                            Action::Rollback,
                            "{health} {probe_errors} {window_over}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn the_probers_own_errors_never_roll_back() {
        for probe_errors in 0..20 {
            let d = decide_action(&input(Health::Healthy, false, probe_errors, false));
            assert_ne!(d.action, Action::Rollback);
        }
        // Even when every tick is a prober error, the health streak does not move.
        let mut p = Progress::default();
        for _ in 0..20 {
            p = fold(
                &p,
                &signals(
                    HealthReading::ProbeError("dns".into()),
                    MetricsReading::ProbeError("refused".into()),
                ),
            )
            .0;
        }
        assert_eq!(classify(&p, &T).health, Health::Healthy);
    }

    #[test]
    fn actions_round_trip_through_their_spelling() {
        for a in [
            Action::Continue,
            Action::Close,
            Action::Rollback,
            Action::AlertOnly,
        ] {
            assert_eq!(Action::parse(a.as_str()), a);
        }
        assert_eq!(Action::parse(""), Action::Continue);
    }
}
