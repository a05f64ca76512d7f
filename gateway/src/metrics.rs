//! Counters and histograms kept in memory, written in the Prometheus text exposition
//! format (version 0.0.4) by `GET /metrics`. Hand-written: a few maps behind a mutex are
//! all the gateway needs, and the format is small.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::time::Duration;

/// The upper bounds of the RPC latency buckets, in seconds.
const BUCKETS: [f64; 12] = [
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

#[derive(Debug, Default, Clone)]
struct Histogram {
    counts: [u64; BUCKETS.len()],
    count: u64,
    sum: f64,
}

impl Histogram {
    fn observe(&mut self, seconds: f64) {
        for (i, le) in BUCKETS.iter().enumerate() {
            if seconds <= *le {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += seconds;
    }
}

/// The gateway's own metrics.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(&'static str, u16), u64>>,
    deliveries: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    rpcs: Mutex<BTreeMap<(&'static str, String), Histogram>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere while holding the lock leaves plain counters: still usable.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    /// Counts one HTTP request answered on `route` with `status`.
    pub fn request(&self, route: &'static str, status: u16) {
        *lock(&self.requests).entry((route, status)).or_default() += 1;
    }

    /// Counts one delivery of `source` ending in `outcome` (accepted, duplicate, ignored,
    /// unauthorized, rejected, applied, retried, dead).
    pub fn delivery(&self, source: &'static str, outcome: &'static str) {
        *lock(&self.deliveries).entry((source, outcome)).or_default() += 1;
    }

    /// Records one RPC made by the gateway, with its gRPC code (`Ok` on success).
    pub fn rpc(&self, rpc: &'static str, code: String, took: Duration) {
        lock(&self.rpcs)
            .entry((rpc, code))
            .or_default()
            .observe(took.as_secs_f64());
    }

    /// Appends the counters and histograms to `out`.
    pub fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP gateway_http_requests_total HTTP requests answered, by route and status.\n",
        );
        out.push_str("# TYPE gateway_http_requests_total counter\n");
        for ((route, status), n) in lock(&self.requests).iter() {
            let _ = writeln!(
                out,
                "gateway_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP gateway_webhook_deliveries_total Webhook deliveries, by source and outcome.\n",
        );
        out.push_str("# TYPE gateway_webhook_deliveries_total counter\n");
        for ((source, outcome), n) in lock(&self.deliveries).iter() {
            let _ = writeln!(
                out,
                "gateway_webhook_deliveries_total{{source=\"{source}\",outcome=\"{outcome}\"}} {n}"
            );
        }
        out.push_str(
            "# HELP gateway_rpc_duration_seconds RPCs made by the gateway, by RPC and gRPC code.\n",
        );
        out.push_str("# TYPE gateway_rpc_duration_seconds histogram\n");
        for ((rpc, code), h) in lock(&self.rpcs).iter() {
            let labels = format!("rpc=\"{rpc}\",code=\"{}\"", escape(code));
            for (le, n) in BUCKETS.iter().zip(h.counts) {
                let _ = writeln!(
                    out,
                    "gateway_rpc_duration_seconds_bucket{{{labels},le=\"{le}\"}} {n}"
                );
            }
            let _ = writeln!(
                out,
                "gateway_rpc_duration_seconds_bucket{{{labels},le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(
                out,
                "gateway_rpc_duration_seconds_sum{{{labels}}} {}",
                h.sum
            );
            let _ = writeln!(
                out,
                "gateway_rpc_duration_seconds_count{{{labels}}} {}",
                h.count
            );
        }
    }
}

/// Escapes a label value (backslash, quote, newline).
pub fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_text_format() {
        let m = Metrics::default();
        m.request("/webhooks/plane", 202);
        m.request("/webhooks/plane", 202);
        m.delivery("plane", "accepted");
        m.rpc("CreateWorkItem", "Ok".into(), Duration::from_millis(3));
        let mut out = String::new();
        m.render(&mut out);
        assert!(
            out.contains(
                "gateway_http_requests_total{route=\"/webhooks/plane\",status=\"202\"} 2\n"
            )
        );
        assert!(out.contains(
            "gateway_webhook_deliveries_total{source=\"plane\",outcome=\"accepted\"} 1\n"
        ));
        assert!(out.contains(
            "gateway_rpc_duration_seconds_bucket{rpc=\"CreateWorkItem\",code=\"Ok\",le=\"0.001\"} 0\n"
        ));
        assert!(out.contains(
            "gateway_rpc_duration_seconds_bucket{rpc=\"CreateWorkItem\",code=\"Ok\",le=\"0.005\"} 1\n"
        ));
        assert!(out.contains(
            "gateway_rpc_duration_seconds_count{rpc=\"CreateWorkItem\",code=\"Ok\"} 1\n"
        ));
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
