//! Sending webhooks the way Plane and Gitea do: a POST of the exact bytes that were signed,
//! with the sender's headers, every attempt recorded so that a test can look at it and send
//! it again.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};

/// `shared/contracts`: `ORCH_CONTRACTS_DIR`, else beside the repository.
pub fn contracts_dir() -> PathBuf {
    orchestrator_testkit::contracts_dir()
}

/// The text of contract sample `name`.
pub fn sample(name: &str) -> String {
    let path = contracts_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The sample `name`, parsed in key order.
pub fn sample_json(name: &str) -> crate::Json {
    crate::Json::parse(&sample(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Lowercase hex HMAC-SHA256 of `body` keyed with `secret`: `X-Plane-Signature`,
/// `X-Gitea-Signature`.
pub fn hmac_sha256_hex(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// Lowercase hex HMAC-SHA1: Gitea's `X-Hub-Signature` (after `sha1=`).
pub fn hmac_sha1_hex(secret: &[u8], body: &[u8]) -> String {
    let mut mac = Hmac::<sha1::Sha1>::new_from_slice(secret).expect("HMAC takes any key");
    mac.update(body);
    hex(&mac.finalize().into_bytes())
}

/// Where a fake sends its webhooks.
#[derive(Debug, Clone)]
pub struct Hook {
    pub url: String,
    /// The signing secret; `None` sends unsigned (Plane: no header; Gitea: empty headers).
    pub secret: Option<String>,
}

/// One send attempt of a webhook.
#[derive(Debug, Clone)]
pub struct Delivery {
    /// The delivery id header's value (`X-Plane-Delivery`, `X-Gitea-Delivery`).
    pub id: String,
    /// The event header's value (`X-Plane-Event`, `X-Gitea-Event`).
    pub event: String,
    /// What happened, e.g. `issue created`, `pull_request closed`.
    pub what: String,
    pub headers: Vec<(String, String)>,
    /// The bytes sent (and signed).
    pub body: Vec<u8>,
    /// The receiver's HTTP status; `None` when the request failed (`error` says why).
    pub status: Option<u16>,
    pub answer: String,
    pub error: Option<String>,
}

impl Delivery {
    /// The body as JSON (sorted keys).
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// Whether the receiver answered 2xx.
    pub fn accepted(&self) -> bool {
        self.status.is_some_and(|s| (200..300).contains(&s))
    }
}

/// The deliveries of one fake, in sending order.
pub type Deliveries = Arc<Mutex<Vec<Delivery>>>;

/// A webhook about to be sent.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub url: String,
    pub id: String,
    pub event: String,
    pub what: String,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

/// Sends `delivery`'s bytes again, with its signature, under a new delivery id in the
/// headers that `is_id_header` names: both forges give every redelivery a new id.
pub async fn redeliver(
    http: &reqwest::Client,
    log: &Deliveries,
    url: String,
    delivery: &Delivery,
    is_id_header: impl Fn(&str) -> bool,
) -> Delivery {
    let id = uuid::Uuid::now_v7().to_string();
    let headers = delivery
        .headers
        .iter()
        .map(|(k, v)| {
            if is_id_header(k) {
                (k.clone(), id.clone())
            } else {
                (k.clone(), v.clone())
            }
        })
        .collect();
    let out = Outgoing {
        url,
        id,
        event: delivery.event.clone(),
        what: format!("{} (redelivered)", delivery.what),
        headers,
        body: delivery.body.clone(),
    };
    send(http, log, out).await
}

/// POSTs the webhook and records the attempt. Neither sender retries on an HTTP status
/// (Plane counts any answer as sent, Gitea does not retry by itself).
pub async fn send(http: &reqwest::Client, log: &Deliveries, out: Outgoing) -> Delivery {
    let mut req = http.post(&out.url).timeout(Duration::from_secs(30));
    for (k, v) in &out.headers {
        req = req.header(k.as_str(), v.as_str());
    }
    let (status, answer, error) = match req.body(out.body.clone()).send().await {
        Ok(resp) => {
            let status = resp.status().as_u16();
            let answer = resp.text().await.unwrap_or_default();
            (Some(status), answer, None)
        }
        Err(e) => (None, String::new(), Some(e.without_url().to_string())),
    };
    tracing::debug!(
        url = out.url,
        event = out.event,
        what = out.what,
        ?status,
        ?error,
        "fake webhook sent"
    );
    let d = Delivery {
        id: out.id,
        event: out.event,
        what: out.what,
        headers: out.headers,
        body: out.body,
        status,
        answer,
        error,
    };
    log.lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(d.clone());
    d
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_contract_test_vectors() {
        // gitea-notes.md: the exact bytes of gitea-webhook-push.json.
        let push = std::fs::read(contracts_dir().join("gitea-webhook-push.json")).expect("sample");
        assert_eq!(
            hmac_sha256_hex(b"contract-test-secret", &push),
            "807e921bbcaf02eb60a632ce8c1ef8946f2aba67c3b0f5a8ae9eac777db650e9"
        );
        assert_eq!(
            hmac_sha1_hex(b"contract-test-secret", &push),
            "d153c83b0dda9292d2784e15aaa4630387bc5eb6"
        );
        // plane-notes.md: Python's json.dumps of plane-webhook-issue-created.json, 1747 bytes.
        let dumped = sample_json("plane-webhook-issue-created.json").to_python();
        assert_eq!(dumped.len(), 1747);
        assert_eq!(
            hmac_sha256_hex(b"contract-test-secret", dumped.as_bytes()),
            "e151b46fd730423eb4533f24ead55e813d1cc1aa1f0f734f5403d84250b304c3"
        );
    }
}
