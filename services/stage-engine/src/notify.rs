//! People are told when they must act (ARCHITECTURE §3.16, issue #18): besides the stream
//! bot's comment on the tracker issue that every such transition already posts, an outgoing
//! webhook (`ORCH_NOTIFY_WEBHOOK_URL`), once per event, through stage-engine's outbox:
//! written in the transaction of the transition that causes it (idempotency key
//! `notify:<transition id>`), delivered on its own channel (`notify`) with the outbox's
//! retries and backoff, so an endpoint that is down delays nothing else.
//!
//! The body is Slack-compatible, `{"text": ...}` (plus `event`, `event_id`, `work_item` for
//! other receivers), signed in `X-Orchestrator-Signature` (lowercase hex HMAC-SHA256 of the
//! body with `ORCH_NOTIFY_WEBHOOK_SECRET`), with the event id in `X-Orchestrator-Event-Id`
//! so that a receiver can drop a redelivery.
//!
//! Events here: `awaiting_approval`, `blocked` (with the reason), `rollback_budget_spent`,
//! `ci_failed_twice` (once per item, on CI's second red verdict, counted in the audit
//! `stage_transitions`). Others report theirs through the `Notify` RPC (post-deploy's
//! alerts, the launcher's `breaker_open`).

use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use orchestrator_kit::{ConfigError, Env, Secret};
use sha2::Sha256;

use crate::outbox::{DeliveryError, Effect};
use crate::pipeline::{Outcome, Stage};
use crate::qg::{CheckOutcome, CheckResult};
use crate::store::TransitionRow;

/// `ORCH_NOTIFY_*`.
#[derive(Debug, Clone, Default)]
pub struct NotifyConfig {
    /// `ORCH_NOTIFY_WEBHOOK_URL`: where notifications are POSTed; unset: none are sent.
    pub webhook_url: Option<String>,
    /// `ORCH_NOTIFY_WEBHOOK_SECRET`: the key of `X-Orchestrator-Signature`.
    pub secret: Option<Secret>,
    /// `ORCH_NOTIFY_DASHBOARD_URL`: the dashboard's public address; each text links to the
    /// item's page there (`<url>/items/<KEY>`).
    pub dashboard_url: Option<String>,
}

impl NotifyConfig {
    pub fn from_env(env: &Env) -> Result<NotifyConfig, ConfigError> {
        let url = |name: &str| -> Result<Option<String>, ConfigError> {
            let Some(v) = env.get(name).map(str::trim).filter(|v| !v.is_empty()) else {
                return Ok(None);
            };
            let parsed = reqwest::Url::parse(v)
                .map_err(|e| ConfigError::new(name, format!("not a URL: {e}")))?;
            if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
                return Err(ConfigError::new(
                    name,
                    format!(
                        "must be an http(s) URL with a host, not '{}:'",
                        parsed.scheme()
                    ),
                ));
            }
            Ok(Some(v.trim_end_matches('/').to_owned()))
        };
        Ok(NotifyConfig {
            webhook_url: url("ORCH_NOTIFY_WEBHOOK_URL")?,
            secret: env.secret("ORCH_NOTIFY_WEBHOOK_SECRET"),
            dashboard_url: url("ORCH_NOTIFY_DASHBOARD_URL")?,
        })
    }
}

/// Why a human must act.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotifyEvent {
    AwaitingApproval,
    Blocked,
    RollbackBudgetSpent,
    /// CI gave its second red verdict on the item (`ci_green` negative twice).
    CiFailedTwice,
}

impl NotifyEvent {
    pub fn as_str(self) -> &'static str {
        match self {
            NotifyEvent::AwaitingApproval => "awaiting_approval",
            NotifyEvent::Blocked => "blocked",
            NotifyEvent::RollbackBudgetSpent => "rollback_budget_spent",
            NotifyEvent::CiFailedTwice => "ci_failed_twice",
        }
    }
}

/// The event a transition to `outcome` is, if a human must act on it.
pub fn event_of(outcome: Outcome, reason: &str) -> Option<NotifyEvent> {
    match outcome {
        Outcome::AwaitingApproval => Some(NotifyEvent::AwaitingApproval),
        // The rollback budget's wording is `pipeline::decide`'s and `reviews::decide`'s.
        Outcome::Blocked if reason.contains("rollback budget") => {
            Some(NotifyEvent::RollbackBudgetSpent)
        }
        Outcome::Blocked => Some(NotifyEvent::Blocked),
        _ => None,
    }
}

/// The notification of a transition of `key` (at `stage`, to `outcome`, because `reason`),
/// with its idempotency key; `None` when no webhook is configured or nobody must act.
pub fn for_transition(
    config: &NotifyConfig,
    transition_id: &str,
    key: &str,
    stage: Stage,
    outcome: Outcome,
    reason: &str,
) -> Option<(Effect, String)> {
    config.webhook_url.as_ref()?;
    let event = event_of(outcome, reason)?;
    let what = match event {
        NotifyEvent::AwaitingApproval => {
            format!("{key} passed {stage} and awaits a human's :approved: on its issue")
        }
        NotifyEvent::Blocked => format!("{key} is blocked at {stage}: {reason}"),
        NotifyEvent::RollbackBudgetSpent => {
            format!("{key} spent its rollback budget at {stage} and is blocked: {reason}")
        }
        NotifyEvent::CiFailedTwice => ci_failed_twice_text(key, stage, reason),
    };
    let text = with_link(config, key, what);
    let event_id = format!("notify:{transition_id}");
    Some((
        Effect::Notify {
            event_id: event_id.clone(),
            event: event.as_str().to_owned(),
            text,
        },
        event_id,
    ))
}

fn ci_failed_twice_text(key: &str, stage: Stage, why: &str) -> String {
    format!("CI failed twice on {key} (at {stage}): {why}")
}

fn with_link(config: &NotifyConfig, key: &str, what: String) -> String {
    match &config.dashboard_url {
        Some(base) => format!("{what} <{base}/items/{key}|open {key}>"),
        None => what,
    }
}

/// Whether `r` is CI's red verdict (failure or error), not a status that cannot be read.
pub(crate) fn ci_red(r: &CheckResult) -> bool {
    r.check == crate::ci::CI_CHECK && matches!(r.outcome, CheckOutcome::Negative(_))
}

/// CI's red verdicts on the item: the earlier ones in its audit `history` (stored as
/// `{"check": "ci_green", "negative": true}` by `qg_json`) and the one in `qg`, if any.
pub fn ci_failures(history: &[TransitionRow], qg: &[CheckResult]) -> u32 {
    let earlier = history
        .iter()
        .filter(|t| {
            let results: Vec<serde_json::Value> =
                serde_json::from_str(&t.qg_results_json).unwrap_or_default();
            results
                .iter()
                .any(|r| r["check"] == crate::ci::CI_CHECK && r["negative"] == true)
        })
        .count();
    let now = usize::from(qg.iter().any(ci_red));
    u32::try_from(earlier + now).unwrap_or(u32::MAX)
}

/// `ci_failed_twice` for `key`, when the transition whose gate found `qg` is CI's second red
/// verdict on it (`history`: the item's earlier transitions). Its idempotency key is the
/// item's, so it is sent once per item whatever happens next.
pub fn for_ci_failure(
    config: &NotifyConfig,
    key: &str,
    stage: Stage,
    history: &[TransitionRow],
    qg: &[CheckResult],
) -> Option<(Effect, String)> {
    config.webhook_url.as_ref()?;
    let red = qg.iter().find(|r| ci_red(r))?;
    if ci_failures(history, qg) != 2 {
        return None;
    }
    let event = NotifyEvent::CiFailedTwice;
    let what = ci_failed_twice_text(key, stage, red.outcome.detail());
    let event_id = format!("notify:{}:{key}", event.as_str());
    Some((
        Effect::Notify {
            event_id: event_id.clone(),
            event: event.as_str().to_owned(),
            text: with_link(config, key, what),
        },
        event_id,
    ))
}

/// The notification of an event another service reports (`Notify`: post-deploy's alerts),
/// with its idempotency key; `None` when no webhook is configured.
pub fn for_event(
    config: &NotifyConfig,
    event_id: &str,
    key: &str,
    event: &str,
    text: &str,
) -> Option<(Effect, String)> {
    config.webhook_url.as_ref()?;
    let text = match &config.dashboard_url {
        Some(base) => format!("{key}: {text} <{base}/items/{key}|open {key}>"),
        None => format!("{key}: {text}"),
    };
    let idempotency = format!("notify:{event_id}");
    Some((
        Effect::Notify {
            event_id: idempotency.clone(),
            event: event.to_owned(),
            text,
        },
        idempotency,
    ))
}

/// Lowercase hex HMAC-SHA256 of `body` keyed with `secret`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("any key length");
    mac.update(body);
    mac.finalize()
        .into_bytes()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// POSTs one notification. 2xx is delivered; a 5xx, 429, 408 or no answer is tried again
/// later (the outbox's backoff); another 4xx will not pass and is failed.
pub(crate) async fn send(
    http: &reqwest::Client,
    config: &NotifyConfig,
    work_item: &str,
    event_id: &str,
    event: &str,
    text: &str,
) -> Result<String, DeliveryError> {
    let Some(url) = &config.webhook_url else {
        return Ok(r#"{"sent":false,"why":"ORCH_NOTIFY_WEBHOOK_URL is not set"}"#.to_owned());
    };
    let body = serde_json::json!({
        "text": text,
        "event": event,
        "event_id": event_id,
        "work_item": work_item,
    })
    .to_string();
    let mut req = http
        .post(url)
        .timeout(Duration::from_secs(10))
        .header("content-type", "application/json")
        .header("x-orchestrator-event-id", event_id);
    if let Some(secret) = &config.secret {
        req = req.header(
            "x-orchestrator-signature",
            signature(secret.expose().as_bytes(), body.as_bytes()),
        );
    }
    // The URL may carry a token (Slack's do): never in an error or a log line.
    let resp = req.body(body).send().await.map_err(|e| {
        DeliveryError::transient(format!(
            "the notify webhook did not answer: {}",
            e.without_url()
        ))
    })?;
    let status = resp.status();
    if status.is_success() {
        return Ok(serde_json::json!({"sent": true, "status": status.as_u16()}).to_string());
    }
    let why = format!("the notify webhook answered HTTP {}", status.as_u16());
    if status.is_server_error()
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
    {
        Err(DeliveryError::transient(why))
    } else {
        Err(DeliveryError::permanent(why))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_notify_url_that_is_not_http_is_refused_naming_the_variable() {
        for bad in [
            "ftp://hooks.example.com/x",
            "file:///etc/passwd",
            "not a url",
            "http://",
        ] {
            let env = Env::default().with("ORCH_NOTIFY_WEBHOOK_URL", bad);
            let e = NotifyConfig::from_env(&env).expect_err(bad);
            assert!(
                e.to_string().contains("ORCH_NOTIFY_WEBHOOK_URL"),
                "{bad}: {e}"
            );
        }
        let env = Env::default().with("ORCH_NOTIFY_DASHBOARD_URL", "javascript:alert(1)");
        assert!(NotifyConfig::from_env(&env).is_err());
        let env = Env::default().with("ORCH_NOTIFY_WEBHOOK_URL", "https://hooks.example.com/T/B/");
        let c = NotifyConfig::from_env(&env).expect("https");
        assert_eq!(
            c.webhook_url.as_deref(),
            Some("https://hooks.example.com/T/B")
        );
        assert!(
            NotifyConfig::from_env(&Env::default())
                .expect("unset")
                .webhook_url
                .is_none()
        );
    }

    #[test]
    fn who_must_act_on_which_transition() {
        let rows = [
            (Outcome::AwaitingApproval, "", Some("awaiting_approval")),
            (
                Outcome::Blocked,
                "the analyst's job 1 failed for good",
                Some("blocked"),
            ),
            (
                Outcome::Blocked,
                "the tests failed (x) and the rollback budget (3) is spent",
                Some("rollback_budget_spent"),
            ),
            (Outcome::Advanced, "", None),
            (Outcome::RolledBack, "", None),
            (Outcome::Done, "", None),
        ];
        for (outcome, reason, want) in rows {
            assert_eq!(
                event_of(outcome, reason).map(NotifyEvent::as_str),
                want,
                "{outcome:?}"
            );
        }
        let config = NotifyConfig {
            webhook_url: Some("http://127.0.0.1:9/hook".into()),
            secret: None,
            dashboard_url: Some("https://orch.example.com".into()),
        };
        let (effect, key) = for_transition(
            &config,
            "t-1",
            "ORCH-7",
            Stage::Analysis,
            Outcome::AwaitingApproval,
            "",
        )
        .expect("a notification");
        assert_eq!(key, "notify:t-1");
        let Effect::Notify { text, event, .. } = effect else {
            panic!("not a notification");
        };
        assert_eq!(event, "awaiting_approval");
        assert!(
            text.ends_with("<https://orch.example.com/items/ORCH-7|open ORCH-7>"),
            "{text}"
        );
        // No webhook configured: nothing to send.
        let none = NotifyConfig::default();
        assert!(
            for_transition(&none, "t", "K-1", Stage::Analysis, Outcome::Blocked, "x").is_none()
        );
    }

    #[test]
    fn ci_failed_twice_is_told_on_the_second_red_verdict_only() {
        let config = NotifyConfig {
            webhook_url: Some("http://127.0.0.1:9/hook".into()),
            ..NotifyConfig::default()
        };
        let red = [CheckResult {
            check: crate::ci::CI_CHECK,
            outcome: CheckOutcome::Negative("ci/build (failure): 2 tests failed <u>".into()),
        }];
        // A status that cannot be read is no verdict of CI's; neither is a pending one.
        let unreadable = [CheckResult {
            check: crate::ci::CI_CHECK,
            outcome: CheckOutcome::Fail("no PR to read the CI status of".into()),
        }];
        let row = |qg: &[CheckResult]| TransitionRow {
            id: String::new(),
            work_item: "K-1".into(),
            from_stage: "review".into(),
            to_stage: "development".into(),
            from_status: "active".into(),
            to_status: "active".into(),
            outcome: "rolled_back".into(),
            cause: String::new(),
            finished_agent: "reviewer".into(),
            job_id: String::new(),
            qg_results_json: crate::engine::qg_json(qg),
            at_ms: 0,
        };
        let tell = |history: &[TransitionRow], qg: &[CheckResult]| {
            for_ci_failure(&config, "K-1", Stage::Deploy, history, qg)
        };
        assert!(tell(&[], &red).is_none(), "the first red verdict");
        assert!(tell(&[row(&unreadable)], &red).is_none());
        let (effect, key) = tell(&[row(&unreadable), row(&red)], &red).expect("the second");
        assert_eq!(key, "notify:ci_failed_twice:K-1");
        let Effect::Notify { event, text, .. } = effect else {
            panic!("not a notification");
        };
        assert_eq!(event, "ci_failed_twice");
        assert!(
            text.contains("2 tests failed") && text.contains("deploy"),
            "{text}"
        );
        assert!(tell(&[row(&red), row(&red)], &red).is_none(), "the third");
        assert!(
            tell(&[row(&red)], &unreadable).is_none(),
            "not a red verdict now"
        );
        assert_eq!(ci_failures(&[row(&red), row(&unreadable)], &red), 2);
        assert!(
            for_ci_failure(
                &NotifyConfig::default(),
                "K-1",
                Stage::Review,
                &[row(&red)],
                &red
            )
            .is_none(),
            "no webhook"
        );
    }

    #[test]
    fn the_signature_is_hmac_sha256_hex() {
        // RFC 4231 test case 2.
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
