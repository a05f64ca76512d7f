//! The spending ceilings (ARCHITECTURE §3.16, issue #18): what every LLM run together may
//! spend in a UTC day (`ORCH_BUDGET_DAILY_USD`) and a UTC month (`ORCH_BUDGET_MONTHLY_USD`),
//! over every repository, and optionally per repository (`ORCH_BUDGET_DAILY_USD_JSON`,
//! `ORCH_BUDGET_MONTHLY_USD_JSON`, e.g. `{"acme/app": 5}`). Checked from usage-ledger
//! (`SpentSince`) before every LLM launch: over a ceiling, the job goes back to the queue
//! with outcome `budget_ceiling` and the reason, counting nothing, and is claimed again
//! every `ORCH_BUDGET_RECHECK_S` (and when the period rolls over), so that it starts once
//! the spend is under the ceiling again. A run already in flight is never stopped.
//!
//! The repository of a run is the job's own (`jobs.repo`), which the launcher records with
//! the run (`RecordRun.repo`); a per-repository ceiling sums that repository's runs.
//!
//! An operator changes a ceiling at run time with `SetSpendingCeiling` (the CLI's
//! `orchestrator budget set`): kept in the launcher's `spending_ceilings` table, it replaces
//! the environment's ceiling of that period and repository (usd 0 lifts it) until cleared,
//! restarts included — the environment is the default until one is set. The ceilings in
//! force ([`in_force`]) are read at every check, so every replica sees a change at its next
//! check, and the RPC wakes the jobs that wait at once.

use std::collections::BTreeMap;
use std::time::Duration;

use orchestrator_forge::RepoName;
use orchestrator_kit::retry::is_retryable_status;
use orchestrator_kit::time::{
    next_utc_day_start, next_utc_month_start, now_ms, rfc3339, utc_day_start, utc_month_start,
};
use orchestrator_kit::{ConfigError, Env};

use crate::outbox::Effect;
use crate::rules::End;
use crate::run::again;
use crate::store::JobRow;
use crate::supervisor::Supervisor;

/// The outcome of a job that waits for a spending ceiling (in `jobs.outcome`).
pub const OUTCOME: &str = "budget_ceiling";

/// The notification sent when a ceiling is reached (`event` of `StageEngine.Notify`).
pub const EVENT: &str = "budget_ceiling_reached";

/// The period a ceiling counts over, in UTC.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Period {
    Daily,
    Monthly,
}

impl Period {
    pub fn as_str(self) -> &'static str {
        match self {
            Period::Daily => "daily",
            Period::Monthly => "monthly",
        }
    }

    /// The variable of the ceiling over every repository.
    pub fn var(self) -> &'static str {
        match self {
            Period::Daily => "ORCH_BUDGET_DAILY_USD",
            Period::Monthly => "ORCH_BUDGET_MONTHLY_USD",
        }
    }

    /// The variable of the per-repository ceilings.
    pub fn json_var(self) -> &'static str {
        match self {
            Period::Daily => "ORCH_BUDGET_DAILY_USD_JSON",
            Period::Monthly => "ORCH_BUDGET_MONTHLY_USD_JSON",
        }
    }

    /// The start of the period that holds `now_ms`.
    pub fn start(self, now_ms: i64) -> i64 {
        match self {
            Period::Daily => utc_day_start(now_ms),
            Period::Monthly => utc_month_start(now_ms),
        }
    }

    /// When the period that holds `now_ms` rolls over.
    pub fn end(self, now_ms: i64) -> i64 {
        match self {
            Period::Daily => next_utc_day_start(now_ms),
            Period::Monthly => next_utc_month_start(now_ms),
        }
    }
}

/// One ceiling in force.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceiling {
    pub period: Period,
    /// `None`: over every repository.
    pub repo: Option<String>,
    pub usd: f64,
    /// When an operator set it (`SetSpendingCeiling`); `None`: from the environment.
    pub set_at_ms: Option<i64>,
}

/// The name of the RPC, as a ceiling's source.
pub const SET_BY_RPC: &str = "SetSpendingCeiling";

impl Ceiling {
    /// Where it was configured, for people.
    pub fn source(&self) -> &'static str {
        match (self.set_at_ms, &self.repo) {
            (Some(_), _) => SET_BY_RPC,
            (None, None) => self.period.var(),
            (None, Some(_)) => self.period.json_var(),
        }
    }
}

/// A ceiling an operator set at run time: `usd` 0 lifts the period's ceiling for `repo`.
#[derive(Debug, Clone, PartialEq)]
pub struct SetCeiling {
    pub period: Period,
    pub repo: Option<String>,
    pub usd: f64,
    pub set_at_ms: i64,
}

/// The ceilings in force: the environment's, each replaced by what an operator set for the
/// same period and repository (0: none), plus the ones set where the environment has none.
pub fn in_force(env: &[Ceiling], set: &[SetCeiling]) -> Vec<Ceiling> {
    let same = |c: &Ceiling, s: &SetCeiling| c.period == s.period && c.repo == s.repo;
    let mut out: Vec<Ceiling> = env
        .iter()
        .filter(|c| !set.iter().any(|s| same(c, s)))
        .cloned()
        .collect();
    out.extend(set.iter().filter(|s| s.usd > 0.0).map(|s| Ceiling {
        period: s.period,
        repo: s.repo.clone(),
        usd: s.usd,
        set_at_ms: Some(s.set_at_ms),
    }));
    out.sort_by_key(|c| (c.period.as_str(), c.repo.clone()));
    out
}

impl Period {
    /// `daily` / `monthly`, as the RPC and the CLI spell them.
    pub fn parse(s: &str) -> Option<Period> {
        match s.trim() {
            "daily" => Some(Period::Daily),
            "monthly" => Some(Period::Monthly),
            _ => None,
        }
    }
}

/// What operators set, from the launcher's table.
pub async fn set_ceilings(db: &orchestrator_kit::Db) -> Result<Vec<SetCeiling>, sqlx::Error> {
    use sqlx::Row;
    let rows = sqlx::query("SELECT period, repo, usd, set_at_ms FROM spending_ceilings")
        .fetch_all(&db.pool)
        .await?;
    let mut out = Vec::new();
    for r in rows {
        let period: String = r.try_get("period")?;
        let repo: String = r.try_get("repo")?;
        let usd: String = r.try_get("usd")?;
        // Only `store_ceiling` writes here; a row it did not write is skipped, loudly.
        let (Some(period), Ok(usd)) = (Period::parse(&period), usd.parse::<f64>()) else {
            tracing::warn!(
                period,
                repo,
                usd,
                "a spending_ceilings row that cannot be read is ignored"
            );
            continue;
        };
        out.push(SetCeiling {
            period,
            repo: (!repo.is_empty()).then_some(repo),
            usd,
            set_at_ms: r.try_get("set_at_ms")?,
        });
    }
    Ok(out)
}

/// Keeps what an operator set (`usd` `None`: clears it, the environment's is in force
/// again).
pub async fn store_ceiling(
    db: &orchestrator_kit::Db,
    period: Period,
    repo: Option<&str>,
    usd: Option<f64>,
    now_ms: i64,
) -> Result<(), sqlx::Error> {
    let mut tx = db.pool.begin().await?;
    sqlx::query("DELETE FROM spending_ceilings WHERE period = $1 AND repo = $2")
        .bind(period.as_str())
        .bind(repo.unwrap_or(""))
        .execute(&mut *tx)
        .await?;
    if let Some(usd) = usd {
        sqlx::query(
            "INSERT INTO spending_ceilings (period, repo, usd, set_at_ms) VALUES ($1, $2, $3, $4)",
        )
        .bind(period.as_str())
        .bind(repo.unwrap_or(""))
        .bind(usd.to_string())
        .bind(now_ms)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// The ceilings in force, from the environment.
#[derive(Debug, Clone, PartialEq)]
pub struct Ceilings {
    pub list: Vec<Ceiling>,
    /// `ORCH_BUDGET_RECHECK_S` (default 60): how often a job waiting for a ceiling is
    /// claimed again to look.
    pub recheck: Duration,
}

impl Default for Ceilings {
    fn default() -> Self {
        Ceilings {
            list: Vec::new(),
            recheck: Duration::from_secs(60),
        }
    }
}

fn dollars(var: &str, v: f64) -> Result<Option<f64>, ConfigError> {
    if !v.is_finite() || v < 0.0 {
        return Err(ConfigError::new(var, "must be a number of dollars >= 0"));
    }
    // 0 means no ceiling, as unset does.
    Ok((v > 0.0).then_some(v))
}

impl Ceilings {
    /// Reads the ceilings; a bad value fails naming its variable (and the repository).
    pub fn from_env(env: &Env) -> Result<Self, ConfigError> {
        let mut list = Vec::new();
        for period in [Period::Daily, Period::Monthly] {
            if env.get(period.var()).is_some_and(|v| !v.trim().is_empty()) {
                let v: f64 = env.parse(period.var(), 0.0)?;
                if let Some(usd) = dollars(period.var(), v)? {
                    list.push(Ceiling {
                        period,
                        repo: None,
                        usd,
                        set_at_ms: None,
                    });
                }
            }
            let Some(raw) = env.get(period.json_var()).filter(|v| !v.trim().is_empty()) else {
                continue;
            };
            let map: BTreeMap<String, f64> = serde_json::from_str(raw).map_err(|e| {
                ConfigError::new(
                    period.json_var(),
                    format!(
                        "must be a JSON object of repository to dollars, e.g. {{\"acme/app\": 5}}: {e}"
                    ),
                )
            })?;
            for (repo, v) in map {
                let name = RepoName::parse(&repo).map_err(|e| {
                    ConfigError::new(period.json_var(), format!("repository {repo:?}: {e}"))
                })?;
                let usd = dollars(period.json_var(), v).map_err(|e| {
                    ConfigError::new(period.json_var(), format!("{repo}: {}", e.reason))
                })?;
                if let Some(usd) = usd {
                    list.push(Ceiling {
                        period,
                        repo: Some(name.to_string()),
                        usd,
                        set_at_ms: None,
                    });
                }
            }
        }
        let recheck: f64 = env.parse("ORCH_BUDGET_RECHECK_S", 60.0)?;
        if !recheck.is_finite() || recheck <= 0.0 {
            return Err(ConfigError::new(
                "ORCH_BUDGET_RECHECK_S",
                "must be a number of seconds > 0",
            ));
        }
        Ok(Ceilings {
            list,
            recheck: Duration::from_secs_f64(recheck),
        })
    }

    /// The ceilings that a job of `repo` counts against: the global ones and the repo's.
    pub fn applying_to<'a>(&'a self, repo: &'a str) -> impl Iterator<Item = &'a Ceiling> + 'a {
        applying_to(&self.list, repo)
    }
}

/// Of `list`, the ceilings that a job of `repo` counts against: the global ones and the
/// repo's.
pub fn applying_to<'a>(
    list: &'a [Ceiling],
    repo: &'a str,
) -> impl Iterator<Item = &'a Ceiling> + 'a {
    list.iter()
        .filter(move |c| c.repo.as_deref().is_none_or(|r| r == repo))
}

/// A ceiling reached: what a job waits for.
#[derive(Debug, Clone, PartialEq)]
pub struct Reached {
    pub ceiling: Ceiling,
    pub spent_usd: f64,
    pub since_ms: i64,
    pub resets_at_ms: i64,
}

impl Reached {
    /// The job's reason, naming the ceiling, the spend and what ends the wait.
    pub fn reason(&self) -> String {
        let whose = match &self.ceiling.repo {
            None => String::new(),
            Some(r) => format!(" of {r}"),
        };
        format!(
            "the {} spending ceiling{whose} is reached: {} spent of {} since {} ({}); \
             waiting, not failed, until the period rolls over at {} or the ceiling is raised",
            self.ceiling.period.as_str(),
            usd(self.spent_usd),
            usd(self.ceiling.usd),
            rfc3339(self.since_ms),
            self.ceiling.source(),
            rfc3339(self.resets_at_ms),
        )
    }

    /// The notification's id: one per ceiling and period, e.g.
    /// `budget_ceiling:daily:*:2026-11-25` or `budget_ceiling:monthly:acme/app:2026-11`.
    pub fn event_id(&self) -> String {
        let start = rfc3339(self.since_ms);
        let period = match self.ceiling.period {
            Period::Daily => &start[..10],
            Period::Monthly => &start[..7],
        };
        format!(
            "{OUTCOME}:{}:{}:{period}",
            self.ceiling.period.as_str(),
            self.ceiling.repo.as_deref().unwrap_or("*")
        )
    }

    /// How long the job waits before it is claimed to look again: the recheck, or less
    /// when the period rolls over sooner.
    pub fn wait(&self, recheck: Duration, now_ms: i64) -> Duration {
        let to_reset = u64::try_from(self.resets_at_ms.saturating_sub(now_ms)).unwrap_or(0);
        recheck.min(Duration::from_millis(to_reset))
    }
}

/// Dollars as people read them: cents, and up to two digits more for small sums
/// (`$1.00`, `$0.025`, `$0.0349`).
pub fn usd(v: f64) -> String {
    let mut s = format!("{v:.4}");
    while s.ends_with('0') && s.len() - s.find('.').unwrap_or(0) > 3 {
        s.pop();
    }
    format!("${s}")
}

/// Whether `spent_usd` in the period reaches `ceiling` (a ceiling is a limit reached at
/// its value: a run would only go over it).
pub fn reached(ceiling: &Ceiling, spent_usd: f64, now_ms: i64) -> Option<Reached> {
    (spent_usd >= ceiling.usd).then(|| Reached {
        ceiling: ceiling.clone(),
        spent_usd,
        since_ms: ceiling.period.start(now_ms),
        resets_at_ms: ceiling.period.end(now_ms),
    })
}

/// A ceiling and what was spent against it, as the queue's snapshot shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Standing {
    pub ceiling: Ceiling,
    /// `None` when usage-ledger could not say.
    pub spent_usd: Option<f64>,
    pub resets_at_ms: i64,
}

impl Supervisor {
    /// The ceilings in force now: the environment's, as operators changed them.
    pub async fn ceilings_in_force(&self) -> Result<Vec<Ceiling>, sqlx::Error> {
        let set = set_ceilings(self.db()).await?;
        Ok(in_force(&self.config().ceilings.list, &set))
    }

    /// `SetSpendingCeiling`: keeps the change, then wakes the jobs that wait for a ceiling
    /// (they look again at once, against the ceilings in force). Returns how many woke.
    pub async fn set_spending_ceiling(
        &self,
        period: Period,
        repo: Option<&str>,
        usd: Option<f64>,
    ) -> Result<u64, sqlx::Error> {
        let now = now_ms();
        store_ceiling(self.db(), period, repo, usd, now).await?;
        tracing::info!(
            period = period.as_str(),
            repo = repo.unwrap_or(""),
            usd = ?usd,
            "spending ceiling set at run time"
        );
        let woken = crate::store::wake_queued_with_outcome(self.db(), OUTCOME, now).await?;
        self.wake();
        Ok(woken)
    }

    /// What was spent against `ceiling` in its current period.
    async fn spent_against(&self, ceiling: &Ceiling, now: i64) -> Result<f64, tonic::Status> {
        self.inner
            .peers
            .spent_since(
                ceiling.period.start(now),
                ceiling.repo.as_deref().unwrap_or(""),
            )
            .await
    }

    /// Checks the job against every ceiling that applies before its launch: `Ok` lets it
    /// go; `Err` is the job's way back to the queue (a ceiling reached, or usage-ledger
    /// unable to say), never a failure.
    pub(crate) async fn check_ceilings(&self, job: &JobRow) -> Result<(), End> {
        let ceilings = &self.config().ceilings;
        let list = match self.ceilings_in_force().await {
            Ok(list) => list,
            Err(e) => {
                tracing::warn!(job_id = job.id, error = %e, "cannot read the spending ceilings set at run time; the job waits");
                return Err(again(
                    OUTCOME,
                    format!("the spending ceilings set at run time cannot be read: {e}"),
                    ceilings.recheck,
                ));
            }
        };
        for ceiling in applying_to(&list, &job.repo) {
            let now = now_ms();
            let spent = match self.spent_against(ceiling, now).await {
                Ok(s) => s,
                Err(s) => {
                    let retryable = is_retryable_status(&s);
                    tracing::warn!(job_id = job.id, retryable, error = %s.message(), "usage-ledger cannot tell the spend for the ceilings; the job waits");
                    let after = if retryable {
                        self.backoff(job)
                    } else {
                        ceilings.recheck
                    };
                    return Err(again(
                        "peer_unavailable",
                        format!(
                            "usage-ledger cannot tell what was spent against the {} ceiling ({}): {}",
                            ceiling.period.as_str(),
                            ceiling.source(),
                            s.message()
                        ),
                        after,
                    ));
                }
            };
            if let Some(r) = reached(ceiling, spent, now) {
                tracing::info!(
                    job_id = job.id,
                    period = ceiling.period.as_str(),
                    repo = ceiling.repo.as_deref().unwrap_or(""),
                    spent_usd = spent,
                    ceiling_usd = ceiling.usd,
                    "spending ceiling reached; the job waits"
                );
                self.tell_reached(job, &r).await;
                return Err(End::Again {
                    outcome: OUTCOME,
                    reason: r.reason(),
                    after: r.wait(ceilings.recheck, now),
                    bump: false,
                });
            }
        }
        Ok(())
    }

    /// Tells people that a ceiling is reached, once per ceiling and period (the event id
    /// names both), through stage-engine's `Notify` on the job's work item.
    async fn tell_reached(&self, job: &JobRow, r: &Reached) {
        let event_id = r.event_id();
        let new = self
            .inner
            .ceilings_told
            .lock()
            .map(|mut told| told.insert(event_id.clone()))
            .unwrap_or(true);
        if !new {
            return;
        }
        let effect = Effect::Notify {
            event: EVENT.to_owned(),
            text: format!(
                "LLM jobs are waiting: {}. {} was the first to wait.",
                r.reason(),
                job.work_item
            ),
            event_id,
        };
        self.write_effect(&job.work_item, &effect).await;
    }

    /// Every ceiling in force with what was spent against it now (the queue's snapshot).
    pub async fn ceiling_standings(&self) -> Result<Vec<Standing>, sqlx::Error> {
        let now = now_ms();
        let mut out = Vec::new();
        for ceiling in &self.ceilings_in_force().await? {
            out.push(Standing {
                ceiling: ceiling.clone(),
                spent_usd: self.spent_against(ceiling, now).await.ok(),
                resets_at_ms: ceiling.period.end(now),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Env {
        Env::from_pairs(pairs.iter().map(|(k, v)| (*k, *v)))
    }

    #[test]
    fn ceilings_come_from_the_environment() {
        assert_eq!(
            Ceilings::from_env(&env(&[])).expect("none"),
            Ceilings::default()
        );
        let c = Ceilings::from_env(&env(&[
            ("ORCH_BUDGET_DAILY_USD", "5"),
            ("ORCH_BUDGET_MONTHLY_USD", "0"),
            (
                "ORCH_BUDGET_MONTHLY_USD_JSON",
                r#"{"acme/app": 40.5, "acme/web": 0}"#,
            ),
            ("ORCH_BUDGET_RECHECK_S", "0.5"),
        ]))
        .expect("config");
        assert_eq!(
            c.list,
            vec![
                Ceiling {
                    period: Period::Daily,
                    repo: None,
                    usd: 5.0,
                    set_at_ms: None,
                },
                Ceiling {
                    period: Period::Monthly,
                    repo: Some("acme/app".into()),
                    usd: 40.5,
                    set_at_ms: None,
                },
            ],
            "0 is no ceiling"
        );
        assert_eq!(c.recheck, Duration::from_millis(500));
        let for_app: Vec<_> = c.applying_to("acme/app").collect();
        assert_eq!(for_app.len(), 2);
        let for_web: Vec<_> = c.applying_to("acme/web").collect();
        assert_eq!(for_web.len(), 1);
        assert_eq!(for_web[0].repo, None);
    }

    #[test]
    fn bad_ceilings_name_their_variable() {
        for (var, value, says) in [
            ("ORCH_BUDGET_DAILY_USD", "lots", "ORCH_BUDGET_DAILY_USD"),
            ("ORCH_BUDGET_MONTHLY_USD", "-1", "dollars >= 0"),
            ("ORCH_BUDGET_DAILY_USD_JSON", "[5]", "JSON object"),
            (
                "ORCH_BUDGET_DAILY_USD_JSON",
                r#"{"../etc": 5}"#,
                "\"../etc\"",
            ),
            (
                "ORCH_BUDGET_DAILY_USD_JSON",
                r#"{"acme/app": -2}"#,
                "acme/app",
            ),
            ("ORCH_BUDGET_RECHECK_S", "0", "> 0"),
        ] {
            let e = Ceilings::from_env(&env(&[(var, value)])).expect_err(value);
            assert_eq!(e.var, var, "{value}");
            let text = e.to_string();
            assert!(text.contains(says), "{value}: {text}");
        }
    }

    #[test]
    fn what_an_operator_set_replaces_the_environments_ceiling() {
        let env_daily = Ceiling {
            period: Period::Daily,
            repo: None,
            usd: 5.0,
            set_at_ms: None,
        };
        let env_app = Ceiling {
            period: Period::Monthly,
            repo: Some("acme/app".into()),
            usd: 40.0,
            set_at_ms: None,
        };
        let set = |period, repo: Option<&str>, usd| SetCeiling {
            period,
            repo: repo.map(str::to_owned),
            usd,
            set_at_ms: 7,
        };
        let env = [env_daily.clone(), env_app.clone()];
        assert_eq!(
            in_force(&env, &[]),
            vec![env_daily.clone(), env_app.clone()]
        );
        // Raised: replaced, and said to come from the RPC.
        let raised = in_force(&env, &[set(Period::Daily, None, 50.0)]);
        assert_eq!(raised.len(), 2);
        assert_eq!((raised[0].usd, raised[0].source()), (50.0, SET_BY_RPC));
        assert_eq!(raised[1], env_app);
        // 0 lifts it; one set where the environment has none is added; a repository's
        // ceiling is not the global one.
        let got = in_force(
            &env,
            &[
                set(Period::Monthly, Some("acme/app"), 0.0),
                set(Period::Daily, Some("acme/web"), 2.0),
            ],
        );
        let brief: Vec<_> = got
            .iter()
            .map(|c| (c.period, c.repo.as_deref(), c.usd, c.source()))
            .collect();
        assert_eq!(
            brief,
            vec![
                (Period::Daily, None, 5.0, "ORCH_BUDGET_DAILY_USD"),
                (Period::Daily, Some("acme/web"), 2.0, SET_BY_RPC),
            ]
        );
        assert_eq!(Period::parse("monthly"), Some(Period::Monthly));
        assert_eq!(Period::parse("weekly"), None);
    }

    #[test]
    fn dollars_read_as_people_write_them() {
        for (v, s) in [
            (1.0, "$1.00"),
            (12.5, "$12.50"),
            (0.025, "$0.025"),
            (0.03488, "$0.0349"),
            (0.0, "$0.00"),
            (5.123456, "$5.1235"),
        ] {
            assert_eq!(usd(v), s, "{v}");
        }
    }

    #[test]
    fn a_ceiling_is_reached_at_its_value_and_waits_until_the_period_ends() {
        let daily = Ceiling {
            period: Period::Daily,
            repo: None,
            usd: 1.0,
            set_at_ms: None,
        };
        // 2026-11-25T11:12:06.123Z
        let now = 1_795_605_126_123;
        assert_eq!(reached(&daily, 0.99, now), None);
        let r = reached(&daily, 1.0, now).expect("reached at the ceiling");
        assert_eq!(
            r.reason(),
            "the daily spending ceiling is reached: $1.00 spent of $1.00 since \
             2026-11-25T00:00:00.000Z (ORCH_BUDGET_DAILY_USD); waiting, not failed, until the \
             period rolls over at 2026-11-26T00:00:00.000Z or the ceiling is raised"
        );
        assert_eq!(r.event_id(), "budget_ceiling:daily:*:2026-11-25");
        assert_eq!(
            r.wait(Duration::from_secs(60), now),
            Duration::from_secs(60)
        );
        let a_second_before = r.resets_at_ms - 1000;
        assert_eq!(
            r.wait(Duration::from_secs(60), a_second_before),
            Duration::from_secs(1)
        );
        let monthly = Ceiling {
            period: Period::Monthly,
            repo: Some("acme/app".into()),
            usd: 10.0,
            set_at_ms: None,
        };
        let r = reached(&monthly, 12.5, now).expect("over");
        assert_eq!(r.event_id(), "budget_ceiling:monthly:acme/app:2026-11");
        assert!(
            r.reason().starts_with(
                "the monthly spending ceiling of acme/app is reached: $12.50 spent of $10.00 \
                 since 2026-11-01T00:00:00.000Z (ORCH_BUDGET_MONTHLY_USD_JSON)"
            ),
            "{}",
            r.reason()
        );
    }
}
