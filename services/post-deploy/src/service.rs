use std::sync::Arc;
use std::time::Duration;

use orchestrator_kit::Db;
use orchestrator_kit::clients::Clients;
use orchestrator_kit::time::now_ms;
use orchestrator_proto::post_deploy::v1 as pb;
use orchestrator_proto::post_deploy::v1::post_deploy_server::PostDeploy;
use tonic::{Request, Response, Status};

use crate::alerts::{AlertKind, AlertNote, AlertSink, LogSink};
use crate::config::PostDeployConfig;
use crate::decide::{Action, DecideInput, Health, Thresholds, classify, decide_action, fold};
use crate::error::PostDeployError;
use crate::rollback::{RollbackVars, display_argv, render_command, run_rollback};
use crate::signals::{HealthReading, MetricsReading, probe_signals};
use crate::store::{self, RollbackRow, SampleRow, TickUpdate, WatchRow, state};
use crate::{log, validate};

/// How long past its timeout a started rollback may still be running somewhere (the kill
/// grace and the output drain); after that, one with no recorded end was interrupted.
const ROLLBACK_SLACK: Duration = Duration::from_secs(15);

/// The post-deploy gRPC service over its own storage.
#[derive(Clone)]
pub struct PostDeployService {
    db: Db,
    // Kept for the tracker and launcher wiring that will post alerts and flag work items.
    #[allow(dead_code)]
    clients: Clients,
    config: Arc<PostDeployConfig>,
    http: reqwest::Client,
    sink: Arc<dyn AlertSink>,
}

/// What one tick did, before it becomes a [`pb::TickResponse`].
#[derive(Debug, Clone)]
pub struct TickOutcome {
    pub action: Action,
    pub classification: String,
    pub reason: String,
    pub watch: WatchRow,
    pub done: bool,
    pub next_tick_in_s: u32,
}

impl PostDeployService {
    /// A service that writes alerts to the log ([`LogSink`]) until a tracker sink is given.
    pub fn new(db: Db, clients: Clients, config: PostDeployConfig) -> Self {
        let http = reqwest::Client::builder()
            .user_agent("orchestrator-post-deploy")
            .redirect(reqwest::redirect::Policy::limited(3))
            .build()
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "cannot build the probe client; using the default");
                reqwest::Client::new()
            });
        tracing::info!(
            enabled = config.enabled,
            repos = ?config.watched_repos(),
            window_s = config.window.as_secs(),
            tick_s = config.tick.as_secs(),
            "post-deploy configured"
        );
        for repo in config.watched_repos() {
            if !config.targets.contains_key(&repo) {
                tracing::warn!(
                    repo,
                    "watched repo has no target in ORCH_POST_DEPLOY_TARGETS_JSON; its deploys will not be armed"
                );
            }
        }
        PostDeployService {
            db,
            clients,
            config: Arc::new(config),
            http,
            sink: Arc::new(LogSink),
        }
    }

    /// Posts alerts through `sink` (the tracker) instead of the log.
    pub fn with_alert_sink(mut self, sink: Arc<dyn AlertSink>) -> Self {
        self.sink = sink;
        self
    }

    fn thresholds(&self) -> Thresholds {
        Thresholds {
            fail_threshold: self.config.fail_threshold,
            error_ratio_threshold: self.config.error_ratio_threshold,
        }
    }

    fn log_path(&self, work_item: &str) -> String {
        log::path(&self.config.log_dir, work_item)
            .display()
            .to_string()
    }

    /// Arms the watch of a work item after `deploy -> done`; idempotent per work item.
    pub async fn arm(&self, req: &pb::ArmRequest) -> Result<pb::ArmResponse, PostDeployError> {
        let work_item = required("work_item", &req.work_item, validate::work_item)?;
        let repo = required("repo", &req.repo, validate::repo)?;
        let deployed_sha = required("deployed_sha", &req.deployed_sha, validate::sha)?;
        // Optional: without it the watch still alerts, but never rolls back (to what?).
        let previous_sha = optional("previous_sha", &req.previous_sha, validate::sha)?;
        let not_armed = |reason: String| {
            tracing::info!(work_item, repo, reason, "watch not armed");
            Ok(pb::ArmResponse {
                armed: false,
                created: false,
                watch: None,
                reason,
                next_tick_in_s: 0,
            })
        };
        if !self.config.enabled {
            return not_armed(
                "post-deploy watching is off (ORCH_POST_DEPLOY_ENABLED=false)".into(),
            );
        }
        if !self.config.watches(repo) {
            return not_armed(format!(
                "{repo} is not watched (ORCH_POST_DEPLOY_REPOS; when empty, only ORCH_SELF_REPO)"
            ));
        }
        if !self.config.targets.contains_key(repo) {
            return not_armed(format!(
                "{repo} has no health or metrics URL in ORCH_POST_DEPLOY_TARGETS_JSON"
            ));
        }
        let now = now_ms();
        let window_ms = i64::try_from(self.config.window.as_millis()).unwrap_or(i64::MAX);
        let (watch, created) = store::arm(
            &self.db,
            &store::NewWatch {
                work_item,
                repo,
                deployed_sha,
                previous_sha,
                self_repo: self.config.is_self_repo(repo),
                armed_at_ms: now,
                window_end_ms: now.saturating_add(window_ms),
            },
        )
        .await?;
        let mut reason = String::new();
        if created {
            tracing::info!(
                work_item,
                repo,
                deployed_sha,
                self_repo = watch.self_repo,
                "watch armed"
            );
            log::append(
                &self.config.log_dir,
                work_item,
                now,
                &format!(
                    "armed {repo} at {deployed_sha} (previous {previous_sha}), window until {}{}",
                    log::rfc3339(watch.window_end_ms),
                    if watch.self_repo {
                        ", the orchestrator's own repo: alert only"
                    } else {
                        ""
                    }
                ),
            );
        } else if watch.deployed_sha != deployed_sha {
            reason = format!(
                "the work item's watch ({}) is still {} at {}",
                watch.repo, watch.state, watch.deployed_sha
            );
        }
        let next_tick_in_s = if watch.state == state::WATCHING {
            self.next_tick_in_s(&watch, now)
        } else {
            0
        };
        Ok(pb::ArmResponse {
            armed: true,
            created,
            watch: Some(self.to_proto(watch, Vec::new(), Vec::new())),
            reason,
            next_tick_in_s,
        })
    }

    /// Seconds until the next tick: the tick interval, or less when the window ends sooner.
    fn next_tick_in_s(&self, w: &WatchRow, now: i64) -> u32 {
        let tick = u32::try_from(self.config.tick.as_secs())
            .unwrap_or(u32::MAX)
            .max(1);
        let to_end_ms = (w.window_end_ms - now).max(0);
        let to_end_s = u32::try_from((to_end_ms + 999) / 1000).unwrap_or(u32::MAX);
        tick.min(to_end_s).max(1)
    }

    /// Probes, classifies, decides and acts once. Never fails because production or the
    /// prober misbehaved; only a bad request or our own storage make it an error.
    pub async fn tick(&self, work_item: &str) -> Result<TickOutcome, PostDeployError> {
        let key = required("work_item", work_item, validate::work_item)?;
        let w = store::get(&self.db, key)
            .await?
            .ok_or_else(|| PostDeployError::NotFound(key.to_owned()))?;
        let now = now_ms();
        match w.state.as_str() {
            state::WATCHING => {}
            state::ROLLING_BACK => return self.tick_rolling_back(w, now).await,
            _ => {
                let action = Action::parse(&w.last_action);
                return Ok(TickOutcome {
                    action,
                    classification: w.last_classification.clone(),
                    reason: format!("the watch is {}", w.state),
                    watch: w,
                    done: true,
                    next_tick_in_s: 0,
                });
            }
        }
        if !self.config.enabled {
            let reason = "post-deploy watching is off (ORCH_POST_DEPLOY_ENABLED=false)";
            store::close(&self.db, key, now, reason).await?;
            log::append(&self.config.log_dir, key, now, &format!("closed: {reason}"));
            let watch = self.reload(key).await?;
            return Ok(TickOutcome {
                action: Action::Close,
                classification: String::new(),
                reason: reason.to_owned(),
                watch,
                done: true,
                next_tick_in_s: 0,
            });
        }

        let target = self.config.targets.get(&w.repo);
        let signals = probe_signals(&self.http, target, self.config.probe_timeout).await;
        let now = now_ms();
        let (progress, deltas) = fold(&w.progress, &signals);
        let class = classify(&progress, &self.thresholds());
        let window_over = now >= w.window_end_ms;
        let self_repo = w.self_repo || self.config.is_self_repo(&w.repo);
        let rollback_template = target
            .filter(|t| t.has_rollback() && !self_repo && !w.previous_sha.is_empty())
            .map(|t| t.rollback_command.words());
        let decision = decide_action(&DecideInput {
            health: class.health,
            self_repo,
            rollback_configured: rollback_template.is_some(),
            consecutive_probe_errors: progress.consecutive_probe_errors,
            probe_error_alert_threshold: self.config.probe_error_alert_threshold,
            window_over,
        });
        let probe_error = signals.probe_error();

        // One alert per episode: a new one when the trouble starts or changes kind.
        let episode = match decision.action {
            Action::AlertOnly if class.health == Health::Degraded => AlertKind::Degraded.as_str(),
            Action::AlertOnly => AlertKind::ProbeErrors.as_str(),
            _ => "",
        };
        let alert_text = match decision.action {
            Action::AlertOnly if class.health == Health::Degraded => format!(
                "{} degraded after deploying {} ({}): {}; {}. Nothing was rolled back.",
                w.repo, w.deployed_sha, w.work_item, class.reason, decision.reason
            ),
            _ => format!(
                "post-deploy cannot probe {} ({}): {}; {}.",
                w.repo, w.work_item, probe_error, decision.reason
            ),
        };
        let alert = (!episode.is_empty() && episode != w.alerting)
            .then_some((episode, alert_text.as_str()));

        let vars = RollbackVars {
            repo: &w.repo,
            previous_sha: &w.previous_sha,
            deployed_sha: &w.deployed_sha,
            work_item: &w.work_item,
        };
        let rollback_command = match (&decision.action, &rollback_template) {
            // A refused value is recorded as the template: the run says why it did not start.
            (Action::Rollback, Some(t)) => Some(display_argv(
                &render_command(t, &vars).unwrap_or_else(|_| t.clone()),
            )),
            _ => None,
        };
        let new_state = match decision.action {
            Action::Rollback => state::ROLLING_BACK,
            Action::Close => state::CLOSED,
            _ if window_over => state::CLOSED,
            _ => state::WATCHING,
        };
        let reason = if probe_error.is_empty() {
            format!("{}; {}", class.reason, decision.reason)
        } else {
            format!(
                "{}; {}; probe error: {probe_error}",
                class.reason, decision.reason
            )
        };
        let (health_ok, health_status, health_latency_ms) = match &signals.health {
            HealthReading::Ok { status, latency_ms } => (true, *status, *latency_ms),
            HealthReading::Failed {
                status, latency_ms, ..
            } => (false, status.unwrap_or(0), *latency_ms),
            HealthReading::NotConfigured | HealthReading::ProbeError(_) => (false, 0, 0),
        };
        let (requests_total, errors_5xx_total) = match signals.metrics {
            MetricsReading::Counters {
                requests_total,
                errors_5xx_total,
            } => (Some(requests_total), Some(errors_5xx_total)),
            _ => (None, None),
        };
        let sample = SampleRow {
            seq: w.seq + 1,
            at_ms: now,
            health_ok,
            health_status,
            health_latency_ms,
            requests_total,
            errors_5xx_total,
            requests_delta: deltas.requests,
            errors_5xx_delta: deltas.errors_5xx,
            probe_error: probe_error.clone(),
            classification: class.health.as_str().to_owned(),
            action: decision.action.as_str().to_owned(),
            reason: reason.clone(),
        };
        let recorded = store::record_tick(
            &self.db,
            key,
            w.seq,
            &TickUpdate {
                progress: &progress,
                state: new_state,
                last_action: decision.action.as_str(),
                closed_at_ms: if new_state == state::CLOSED { now } else { 0 },
                classification: class.health.as_str(),
                reason: &reason,
                at_ms: now,
                alerting: episode,
                rollback_command: rollback_command.as_deref(),
            },
            &sample,
            alert,
        )
        .await?;
        if !recorded {
            // Another tick of this watch was written first; its outcome stands.
            let watch = self.reload(key).await?;
            tracing::info!(work_item = key, "concurrent tick: not recorded");
            let done = watch.state != state::WATCHING && watch.state != state::ROLLING_BACK;
            let next_tick_in_s = if done {
                0
            } else {
                self.next_tick_in_s(&watch, now)
            };
            return Ok(TickOutcome {
                action: Action::Continue,
                classification: String::new(),
                reason: "another tick of this watch was recorded first".to_owned(),
                watch,
                done,
                next_tick_in_s,
            });
        }
        tracing::info!(
            work_item = key,
            repo = %w.repo,
            classification = class.health.as_str(),
            action = decision.action.as_str(),
            reason,
            "tick"
        );
        log::append(
            &self.config.log_dir,
            key,
            now,
            &tick_line(w.ticks + 1, &sample, &progress),
        );

        if let (Action::Rollback, Some(template)) = (decision.action, &rollback_template) {
            self.roll_back(key, template, &vars, &class.reason).await?;
        }
        let watch = self.reload(key).await?;
        self.post_pending(&watch).await;
        let done = watch.state != state::WATCHING;
        Ok(TickOutcome {
            action: decision.action,
            classification: class.health.as_str().to_owned(),
            reason,
            next_tick_in_s: if done {
                0
            } else {
                self.next_tick_in_s(&watch, now)
            },
            watch,
            done,
        })
    }

    /// Runs the rollback this tick claimed, records it and closes the watch as rolled back.
    async fn roll_back(
        &self,
        key: &str,
        template: &[String],
        vars: &RollbackVars<'_>,
        why: &str,
    ) -> Result<(), PostDeployError> {
        tracing::warn!(
            work_item = key,
            repo = vars.repo,
            previous_sha = vars.previous_sha,
            "rolling back"
        );
        let outcome = run_rollback(template, vars, self.config.rollback_timeout).await;
        let verdict = if outcome.succeeded() {
            "succeeded".to_owned()
        } else if outcome.timed_out {
            "timed out".to_owned()
        } else if let Some(code) = outcome.exit_code {
            format!("failed with exit code {code}")
        } else {
            format!(
                "failed: {}",
                outcome.error.as_deref().unwrap_or("no exit code")
            )
        };
        tracing::warn!(work_item = key, repo = vars.repo, exit_code = ?outcome.exit_code, timed_out = outcome.timed_out, verdict, "rollback finished");
        let text = format!(
            "{} degraded after deploying {} ({}): {why}. Rolled back to {}: the rollback {verdict}. The work item needs a human.",
            vars.repo, vars.deployed_sha, vars.work_item, vars.previous_sha
        );
        let row = RollbackRow {
            command: outcome.command.clone(),
            started_at_ms: outcome.started_at_ms,
            finished_at_ms: Some(outcome.finished_at_ms),
            exit_code: outcome.exit_code.map(i64::from),
            timed_out: outcome.timed_out,
            output: outcome.output.clone(),
            error: outcome.error.clone().unwrap_or_default(),
        };
        store::finish_rollback(&self.db, key, &row, &text).await?;
        log::append(
            &self.config.log_dir,
            key,
            outcome.finished_at_ms,
            &format!(
                "rollback {verdict} in {} ms: {}",
                outcome.finished_at_ms - outcome.started_at_ms,
                outcome.command
            ),
        );
        Ok(())
    }

    /// A watch whose rollback has started: still running (somewhere), or interrupted by a
    /// stop of post-deploy — in which case it is closed without running it again.
    async fn tick_rolling_back(
        &self,
        w: WatchRow,
        now: i64,
    ) -> Result<TickOutcome, PostDeployError> {
        let started = w
            .rollback
            .as_ref()
            .map_or(w.last_tick_at_ms, |r| r.started_at_ms);
        let limit = self.config.rollback_timeout + ROLLBACK_SLACK;
        let limit_ms = i64::try_from(limit.as_millis()).unwrap_or(i64::MAX);
        if now < started.saturating_add(limit_ms) {
            return Ok(TickOutcome {
                action: Action::Rollback,
                classification: w.last_classification.clone(),
                reason: "the rollback is running".to_owned(),
                next_tick_in_s: u32::try_from(self.config.tick.as_secs())
                    .unwrap_or(u32::MAX)
                    .max(1),
                watch: w,
                done: false,
            });
        }
        let text = format!(
            "the rollback of {} ({}) to {} was started at {} and post-deploy stopped before it ended: its outcome is unknown and it is not run again. Check production by hand.",
            w.repo,
            w.work_item,
            w.previous_sha,
            log::rfc3339(started)
        );
        if store::close_interrupted_rollback(&self.db, &w.work_item, now, &text).await? {
            tracing::warn!(work_item = %w.work_item, repo = %w.repo, "rollback interrupted");
            log::append(
                &self.config.log_dir,
                &w.work_item,
                now,
                &format!("closed: {text}"),
            );
        }
        let watch = self.reload(&w.work_item).await?;
        self.post_pending(&watch).await;
        Ok(TickOutcome {
            action: Action::Rollback,
            classification: watch.last_classification.clone(),
            reason: "the rollback was interrupted; it is not run again".to_owned(),
            watch,
            done: true,
            next_tick_in_s: 0,
        })
    }

    /// Offers the watch's pending alerts to the sink, oldest first; never fails.
    async fn post_pending(&self, w: &WatchRow) {
        let pending = match store::pending_alerts(&self.db, &w.work_item).await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(work_item = %w.work_item, error = %e, "cannot read pending alerts");
                return;
            }
        };
        for a in pending {
            let note = AlertNote {
                work_item: a.work_item.clone(),
                repo: w.repo.clone(),
                kind: a.kind.clone(),
                text: a.text.clone(),
                at_ms: a.at_ms,
            };
            match self.sink.post(&note).await {
                Ok(()) => {
                    if let Err(e) =
                        store::mark_posted(&self.db, &a.work_item, a.seq, now_ms()).await
                    {
                        tracing::warn!(work_item = %a.work_item, seq = a.seq, error = %e, "cannot mark an alert posted");
                    }
                }
                Err(e) => {
                    // Later ticks offer it again, in order.
                    tracing::warn!(work_item = %a.work_item, seq = a.seq, error = %e, "alert not posted");
                    return;
                }
            }
        }
    }

    async fn reload(&self, key: &str) -> Result<WatchRow, PostDeployError> {
        store::get(&self.db, key)
            .await?
            .ok_or_else(|| PostDeployError::NotFound(key.to_owned()))
    }

    /// The watch of a work item with its alerts and this window's samples.
    pub async fn get_watch(&self, work_item: &str) -> Result<pb::Watch, PostDeployError> {
        let key = required("work_item", work_item, validate::work_item)?;
        let w = self.reload(key).await?;
        let alerts = store::alerts(&self.db, key).await?;
        let samples = store::samples(&self.db, key, w.armed_at_ms).await?;
        Ok(self.to_proto(w, alerts, samples))
    }

    /// Watches, newest first (without alerts and samples: GetWatch has them).
    pub async fn list_watches(
        &self,
        req: &pb::ListWatchesRequest,
    ) -> Result<pb::ListWatchesResponse, PostDeployError> {
        let state_filter = req.state.trim();
        if !state_filter.is_empty() && !state::ALL.contains(&state_filter) {
            return Err(PostDeployError::InvalidField {
                field: "state",
                reason: format!("must be empty or one of {}", state::ALL.join(", ")),
            });
        }
        let repo = req.repo.trim();
        if !repo.is_empty() {
            validate::repo(repo).map_err(|reason| PostDeployError::InvalidField {
                field: "repo",
                reason,
            })?;
        }
        let limit = if req.limit == 0 {
            100
        } else {
            req.limit.min(1000)
        };
        let watches = store::list(&self.db, state_filter, repo, limit).await?;
        Ok(pb::ListWatchesResponse {
            watches: watches
                .into_iter()
                .map(|w| self.to_proto(w, Vec::new(), Vec::new()))
                .collect(),
        })
    }

    fn to_proto(
        &self,
        w: WatchRow,
        alerts: Vec<store::AlertRow>,
        samples: Vec<SampleRow>,
    ) -> pb::Watch {
        let log_path = self.log_path(&w.work_item);
        pb::Watch {
            work_item: w.work_item,
            repo: w.repo,
            deployed_sha: w.deployed_sha,
            previous_sha: w.previous_sha,
            armed_at_ms: w.armed_at_ms,
            window_end_ms: w.window_end_ms,
            consecutive_health_failures: w.progress.consecutive_health_failures,
            consecutive_probe_errors: w.progress.consecutive_probe_errors,
            state: w.state,
            last_action: w.last_action,
            closed_at_ms: w.closed_at_ms,
            self_repo: w.self_repo,
            ticks: w.ticks,
            last_classification: w.last_classification,
            last_reason: w.last_reason,
            last_tick_at_ms: w.last_tick_at_ms,
            window_requests: w.progress.window_requests,
            window_5xx: w.progress.window_5xx,
            rollback: w.rollback.map(|r| pb::Rollback {
                command: r.command,
                started_at_ms: r.started_at_ms,
                finished_at_ms: r.finished_at_ms.unwrap_or(0),
                exit_code: r.exit_code.and_then(|c| i32::try_from(c).ok()),
                timed_out: r.timed_out,
                output: r.output,
                error: r.error,
            }),
            alerts: alerts
                .into_iter()
                .map(|a| pb::Alert {
                    seq: u32::try_from(a.seq).unwrap_or(u32::MAX),
                    at_ms: a.at_ms,
                    kind: a.kind,
                    text: a.text,
                    posted_at_ms: a.posted_at_ms,
                })
                .collect(),
            samples: samples
                .into_iter()
                .map(|s| pb::ProbeSample {
                    seq: u32::try_from(s.seq).unwrap_or(u32::MAX),
                    at_ms: s.at_ms,
                    health_ok: s.health_ok,
                    health_status: u32::from(s.health_status),
                    health_latency_ms: s.health_latency_ms,
                    requests_total: s.requests_total,
                    errors_5xx_total: s.errors_5xx_total,
                    requests_delta: s.requests_delta,
                    errors_5xx_delta: s.errors_5xx_delta,
                    probe_error: s.probe_error,
                    classification: s.classification,
                    action: s.action,
                    reason: s.reason,
                })
                .collect(),
            log_path,
        }
    }
}

/// One line of the post-deploy log for a tick.
fn tick_line(tick: u32, s: &SampleRow, p: &crate::decide::Progress) -> String {
    let health = if s.health_status == 0 {
        "health=none".to_owned()
    } else {
        format!("health={} {}ms", s.health_status, s.health_latency_ms)
    };
    let metrics = match (s.requests_total, s.requests_delta, s.errors_5xx_delta) {
        (None, _, _) => "metrics=unread".to_owned(),
        (Some(_), Some(r), Some(e)) => format!("requests+{r} 5xx+{e}"),
        (Some(_), _, _) => "metrics=baseline".to_owned(),
    };
    format!(
        "tick {tick} {health} {metrics} window 5xx {}/{} {} {}: {}",
        p.window_5xx, p.window_requests, s.classification, s.action, s.reason
    )
}

/// A required field, checked by `check`.
fn required<'a>(
    field: &'static str,
    value: &'a str,
    check: fn(&str) -> Result<&str, String>,
) -> Result<&'a str, PostDeployError> {
    let v = value.trim();
    if v.is_empty() {
        return Err(PostDeployError::MissingField(field));
    }
    check(v).map_err(|reason| PostDeployError::InvalidField { field, reason })?;
    Ok(v)
}

/// An optional field, checked by `check` when present.
fn optional<'a>(
    field: &'static str,
    value: &'a str,
    check: fn(&str) -> Result<&str, String>,
) -> Result<&'a str, PostDeployError> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(v);
    }
    check(v).map_err(|reason| PostDeployError::InvalidField { field, reason })?;
    Ok(v)
}

fn action_to_proto(a: Action) -> pb::Action {
    match a {
        Action::Continue => pb::Action::Continue,
        Action::Close => pb::Action::Close,
        Action::Rollback => pb::Action::Rollback,
        Action::AlertOnly => pb::Action::AlertOnly,
    }
}

#[tonic::async_trait]
impl PostDeploy for PostDeployService {
    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item, repo = %request.get_ref().repo))]
    async fn arm(
        &self,
        request: Request<pb::ArmRequest>,
    ) -> Result<Response<pb::ArmResponse>, Status> {
        Ok(Response::new(
            PostDeployService::arm(self, request.get_ref()).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item))]
    async fn tick(
        &self,
        request: Request<pb::TickRequest>,
    ) -> Result<Response<pb::TickResponse>, Status> {
        let t = PostDeployService::tick(self, &request.get_ref().work_item).await?;
        Ok(Response::new(pb::TickResponse {
            action: action_to_proto(t.action).into(),
            watch: Some(self.to_proto(t.watch, Vec::new(), Vec::new())),
            classification: t.classification,
            done: t.done,
            next_tick_in_s: t.next_tick_in_s,
            reason: t.reason,
        }))
    }

    #[tracing::instrument(skip_all, fields(work_item = %request.get_ref().work_item))]
    async fn get_watch(
        &self,
        request: Request<pb::GetWatchRequest>,
    ) -> Result<Response<pb::Watch>, Status> {
        Ok(Response::new(
            PostDeployService::get_watch(self, &request.get_ref().work_item).await?,
        ))
    }

    #[tracing::instrument(skip_all, fields(state = %request.get_ref().state))]
    async fn list_watches(
        &self,
        request: Request<pb::ListWatchesRequest>,
    ) -> Result<Response<pb::ListWatchesResponse>, Status> {
        Ok(Response::new(
            PostDeployService::list_watches(self, request.get_ref()).await?,
        ))
    }
}
