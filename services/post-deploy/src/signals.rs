//! `probe_signals`: what one tick sees of production — the health URL's answer and the
//! request and 5xx counters of the metrics URL. It never fails: whatever goes wrong is part
//! of what it saw, and it says whose fault it was.
//!
//! The line between the two kinds of trouble matters: a health URL that answers badly, or
//! refuses connections, or times out, is production's problem (a health failure); a name
//! that does not resolve, a URL we cannot use, or a metrics endpoint we cannot read is the
//! prober's own problem, which alerts when it persists but never rolls anything back.

use std::time::{Duration, Instant};

use reqwest::Url;

use crate::config::Target;

/// The health URL's side of one tick.
#[derive(Debug, Clone, PartialEq)]
pub enum HealthReading {
    /// It answered 2xx.
    Ok { status: u16, latency_ms: u32 },
    /// It answered otherwise, refused the connection or timed out: production's problem.
    Failed {
        status: Option<u16>,
        latency_ms: u32,
        detail: String,
    },
    /// No health URL is configured for the repo.
    NotConfigured,
    /// The prober could not ask (DNS, an unusable URL).
    ProbeError(String),
}

/// The metrics URL's side of one tick.
#[derive(Debug, Clone, PartialEq)]
pub enum MetricsReading {
    /// The counters' current values.
    Counters {
        requests_total: f64,
        errors_5xx_total: f64,
    },
    /// No metrics URL is configured for the repo.
    NotConfigured,
    /// The prober could not read them (DNS, refused, non-2xx, unparseable).
    ProbeError(String),
}

/// What one tick saw.
#[derive(Debug, Clone, PartialEq)]
pub struct Signals {
    pub health: HealthReading,
    pub metrics: MetricsReading,
}

impl Signals {
    /// The prober's own errors this tick, joined; empty when there were none.
    pub fn probe_error(&self) -> String {
        let mut errs = Vec::new();
        if let HealthReading::ProbeError(e) = &self.health {
            errs.push(format!("health: {e}"));
        }
        if let MetricsReading::ProbeError(e) = &self.metrics {
            errs.push(format!("metrics: {e}"));
        }
        errs.join("; ")
    }
}

/// The most of a metrics exposition we read.
const MAX_METRICS_BYTES: usize = 8 * 1024 * 1024;

/// Probes `target` once: the health URL and the metrics URL, concurrently. `None` (the repo
/// has no target configured) reads as the prober's own error on both sides.
pub async fn probe_signals(
    http: &reqwest::Client,
    target: Option<&Target>,
    timeout: Duration,
) -> Signals {
    let Some(target) = target else {
        let why = "no target configured for the repo in ORCH_POST_DEPLOY_TARGETS_JSON".to_owned();
        return Signals {
            health: HealthReading::ProbeError(why.clone()),
            metrics: MetricsReading::ProbeError(why),
        };
    };
    let (health, metrics) = tokio::join!(
        probe_health(http, &target.health_url, timeout),
        probe_metrics(http, target, timeout)
    );
    Signals { health, metrics }
}

async fn probe_health(http: &reqwest::Client, url: &str, timeout: Duration) -> HealthReading {
    if url.is_empty() {
        return HealthReading::NotConfigured;
    }
    let url = match resolvable(url, timeout).await {
        Ok(u) => u,
        Err(e) => return HealthReading::ProbeError(e),
    };
    let start = Instant::now();
    let result = http.get(url).timeout(timeout).send().await;
    let latency_ms = u32::try_from(start.elapsed().as_millis()).unwrap_or(u32::MAX);
    match result {
        Ok(resp) if resp.status().is_success() => HealthReading::Ok {
            status: resp.status().as_u16(),
            latency_ms,
        },
        Ok(resp) => HealthReading::Failed {
            status: Some(resp.status().as_u16()),
            latency_ms,
            detail: format!("answered {}", resp.status()),
        },
        // The name resolved, so a refused connection or a timeout is production not answering.
        Err(e) if e.is_connect() || e.is_timeout() => HealthReading::Failed {
            status: None,
            latency_ms,
            detail: error_chain(&e),
        },
        Err(e) => HealthReading::ProbeError(error_chain(&e)),
    }
}

async fn probe_metrics(
    http: &reqwest::Client,
    target: &Target,
    timeout: Duration,
) -> MetricsReading {
    if target.metrics_url.is_empty() {
        return MetricsReading::NotConfigured;
    }
    let read = async {
        let url = resolvable(&target.metrics_url, timeout).await?;
        let mut resp = http
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        if !resp.status().is_success() {
            return Err(format!("answered {}", resp.status()));
        }
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| error_chain(&e))? {
            if body.len() + chunk.len() > MAX_METRICS_BYTES {
                return Err(format!("exposition larger than {MAX_METRICS_BYTES} bytes"));
            }
            body.extend_from_slice(&chunk);
        }
        let text = String::from_utf8_lossy(&body);
        parse_counters(&text, &target.requests_metric, &target.errors_metric)
    };
    match read.await {
        Ok((requests_total, errors_5xx_total)) => MetricsReading::Counters {
            requests_total,
            errors_5xx_total,
        },
        Err(e) => MetricsReading::ProbeError(e),
    }
}

/// Parses `url` and resolves its host, so that a DNS failure is told apart (as the
/// prober's own error) from production refusing the connection.
async fn resolvable(url: &str, timeout: Duration) -> Result<Url, String> {
    let parsed = Url::parse(url).map_err(|e| format!("invalid URL: {e}"))?;
    let host = parsed
        .host_str()
        .ok_or_else(|| "the URL has no host".to_owned())?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_owned();
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(parsed);
    }
    let port = parsed.port_or_known_default().unwrap_or(80);
    match tokio::time::timeout(timeout, tokio::net::lookup_host((host.as_str(), port))).await {
        Ok(Ok(mut addrs)) => match addrs.next() {
            Some(_) => Ok(parsed),
            None => Err(format!("dns: no address for {host}")),
        },
        Ok(Err(e)) => Err(format!("dns: cannot resolve {host}: {e}")),
        Err(_) => Err(format!("dns: resolving {host} timed out")),
    }
}

/// An error with its causes, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// Reads the request counter and the 5xx counter out of a Prometheus text exposition.
///
/// The total is the sum of every sample of `requests_metric`. The 5xx count is the sum of
/// `errors_metric` when one is named, else of the `requests_metric` samples whose status
/// label (`code`, `status` or `status_code`) starts with `5`. A metric that is declared
/// (`# TYPE`/`# HELP`) but has no samples yet counts 0 — client libraries export labelled
/// counters only after their first increment; one that appears nowhere is an error, so a
/// misspelt name is reported instead of read as "no traffic".
pub fn parse_counters(
    text: &str,
    requests_metric: &str,
    errors_metric: &str,
) -> Result<(f64, f64), String> {
    let mut requests = 0.0;
    let mut errors = 0.0;
    let mut requests_seen = false;
    let mut errors_seen = errors_metric.is_empty();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(comment) = line.strip_prefix('#') {
            let mut words = comment.split_whitespace();
            if matches!(words.next(), Some("TYPE" | "HELP")) {
                match words.next() {
                    Some(name) if name == requests_metric => requests_seen = true,
                    Some(name) if name == errors_metric => errors_seen = true,
                    _ => {}
                }
            }
            continue;
        }
        let sample = parse_sample(line).map_err(|e| format!("line {}: {e}", n + 1))?;
        let is_requests = sample.name == requests_metric;
        let is_errors = !errors_metric.is_empty() && sample.name == errors_metric;
        if !is_requests && !is_errors {
            continue;
        }
        if !sample.value.is_finite() || sample.value < 0.0 {
            return Err(format!(
                "line {}: {} has the value {}, not a counter",
                n + 1,
                sample.name,
                sample.value
            ));
        }
        if is_requests {
            requests_seen = true;
            requests += sample.value;
            if errors_metric.is_empty() && sample.status_is_5xx() {
                errors += sample.value;
            }
        }
        if is_errors {
            errors_seen = true;
            errors += sample.value;
        }
    }
    if !requests_seen {
        return Err(format!("metric {requests_metric} not found"));
    }
    if !errors_seen {
        return Err(format!("metric {errors_metric} not found"));
    }
    Ok((requests, errors))
}

struct Sample<'a> {
    name: &'a str,
    labels: Labels<'a>,
    value: f64,
}

impl Sample<'_> {
    fn status_is_5xx(&self) -> bool {
        ["code", "status", "status_code"].iter().any(|key| {
            self.labels
                .iter()
                .any(|(k, v)| k == key && v.starts_with('5'))
        })
    }
}

/// Parses `name{label="value",...} value [timestamp]`.
fn parse_sample(line: &str) -> Result<Sample<'_>, String> {
    let name_end = line
        .find(|c: char| c == '{' || c.is_whitespace())
        .ok_or_else(|| "a sample without a value".to_owned())?;
    let name = &line[..name_end];
    let mut rest = &line[name_end..];
    let mut labels = Vec::new();
    if let Some(after) = rest.strip_prefix('{') {
        let (parsed, remainder) = parse_labels(after)?;
        labels = parsed;
        rest = remainder;
    }
    let value_text = rest
        .split_whitespace()
        .next()
        .ok_or_else(|| format!("{name} has no value"))?;
    let value = match value_text {
        "+Inf" | "Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v
            .parse::<f64>()
            .map_err(|_| format!("{name} has the value '{v}', not a number"))?,
    };
    Ok(Sample {
        name,
        labels,
        value,
    })
}

/// Label pairs as read: the name borrowed from the line, the value unescaped.
type Labels<'a> = Vec<(&'a str, String)>;

/// Parses labels up to the closing `}`; returns them and what follows.
fn parse_labels(s: &str) -> Result<(Labels<'_>, &str), String> {
    let mut labels = Vec::new();
    let mut rest = s.trim_start();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let eq = rest
            .find('=')
            .ok_or_else(|| "a label without '='".to_owned())?;
        let key = rest[..eq].trim();
        let after_eq = rest[eq + 1..].trim_start();
        let mut chars = after_eq.char_indices();
        if !matches!(chars.next(), Some((_, '"'))) {
            return Err(format!("label {key}: the value is not quoted"));
        }
        let mut value = String::new();
        let mut end = None;
        let mut escaped = false;
        for (i, c) in chars {
            if escaped {
                value.push(match c {
                    'n' => '\n',
                    other => other,
                });
                escaped = false;
            } else if c == '\\' {
                escaped = true;
            } else if c == '"' {
                end = Some(i);
                break;
            } else {
                value.push(c);
            }
        }
        let end = end.ok_or_else(|| format!("label {key}: unterminated value"))?;
        labels.push((key, value));
        rest = after_eq[end + 1..].trim_start();
        if let Some(after) = rest.strip_prefix(',') {
            rest = after.trim_start();
        } else if !rest.starts_with('}') {
            return Err(format!("after label {key}: expected ',' or '}}'"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EXPOSITION: &str = r#"# HELP http_requests_total Requests answered.
# TYPE http_requests_total counter
http_requests_total{method="GET",code="200"} 1027 1395066363000
http_requests_total{method="POST",code="200"} 3
http_requests_total{method="GET",code="503"} 12
http_requests_total{method="GET",code="500",path="/a\"b,c}"} 1
http_requests_total{method="GET",code="404"} 5
# TYPE process_cpu_seconds_total counter
process_cpu_seconds_total 12.5
app_errors_5xx_total 7
"#;

    #[test]
    fn counters_are_summed_and_5xx_read_from_the_status_label() {
        assert_eq!(
            parse_counters(EXPOSITION, "http_requests_total", ""),
            Ok((1048.0, 13.0))
        );
    }

    #[test]
    fn a_named_errors_metric_wins() {
        assert_eq!(
            parse_counters(EXPOSITION, "http_requests_total", "app_errors_5xx_total"),
            Ok((1048.0, 7.0))
        );
    }

    #[test]
    fn status_and_status_code_labels_count_too() {
        let text = "req{status=\"502\"} 2\nreq{status_code=\"500\"} 1\nreq{status=\"200\"} 7\n";
        assert_eq!(parse_counters(text, "req", ""), Ok((10.0, 3.0)));
    }

    #[test]
    fn a_declared_counter_without_samples_is_zero_but_a_missing_one_is_an_error() {
        let declared = "# TYPE http_requests_total counter\n";
        assert_eq!(
            parse_counters(declared, "http_requests_total", ""),
            Ok((0.0, 0.0))
        );
        let err = parse_counters("other 1\n", "http_requests_total", "").unwrap_err();
        assert!(err.contains("http_requests_total not found"), "{err}");
        let err = parse_counters(EXPOSITION, "http_requests_total", "nope_total").unwrap_err();
        assert!(err.contains("nope_total not found"), "{err}");
    }

    #[test]
    fn garbage_is_an_error_not_a_number() {
        for text in [
            "http_requests_total{code=\"200\" 5\n",
            "http_requests_total{code=200} 5\n",
            "http_requests_total abc\n",
            "http_requests_total\n",
            "http_requests_total NaN\n",
            "http_requests_total -3\n",
            "http_requests_total +Inf\n",
        ] {
            assert!(
                parse_counters(text, "http_requests_total", "").is_err(),
                "{text:?}"
            );
        }
    }

    #[test]
    fn probe_errors_are_named_by_side() {
        let s = Signals {
            health: HealthReading::ProbeError("dns: x".into()),
            metrics: MetricsReading::ProbeError("answered 503".into()),
        };
        assert_eq!(s.probe_error(), "health: dns: x; metrics: answered 503");
        let s = Signals {
            health: HealthReading::Failed {
                status: Some(500),
                latency_ms: 1,
                detail: "x".into(),
            },
            metrics: MetricsReading::NotConfigured,
        };
        assert_eq!(s.probe_error(), "");
    }

    #[tokio::test]
    async fn an_unresolvable_host_is_the_probers_error_and_a_refused_port_is_a_health_failure() {
        let http = reqwest::Client::new();
        let t = Target {
            health_url: "http://no-such-host.invalid/healthz".into(),
            metrics_url: "http://no-such-host.invalid/metrics".into(),
            rollback_command: Default::default(),
            requests_metric: "http_requests_total".into(),
            errors_metric: String::new(),
        };
        let s = probe_signals(&http, Some(&t), Duration::from_secs(5)).await;
        assert!(
            matches!(&s.health, HealthReading::ProbeError(e) if e.starts_with("dns")),
            "{s:?}"
        );
        assert!(matches!(s.metrics, MetricsReading::ProbeError(_)), "{s:?}");

        // A port nothing listens on: bind one, learn its number, close it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .expect("bind")
            .local_addr()
            .expect("addr")
            .port();
        let t = Target {
            health_url: format!("http://127.0.0.1:{port}/healthz"),
            metrics_url: format!("http://127.0.0.1:{port}/metrics"),
            ..t
        };
        let s = probe_signals(&http, Some(&t), Duration::from_secs(5)).await;
        assert!(
            matches!(s.health, HealthReading::Failed { status: None, .. }),
            "{s:?}"
        );
        assert!(matches!(s.metrics, MetricsReading::ProbeError(_)), "{s:?}");

        let s = probe_signals(&http, None, Duration::from_secs(1)).await;
        assert!(matches!(s.health, HealthReading::ProbeError(_)));
    }
}
