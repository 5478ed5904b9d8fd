//! CloudWatch metrics in the embedded metric format (EMF): once a minute
//! the in-process [`Window`] (counters and statistic sets aggregated since
//! the last one) is written as JSON lines on stdout, which the task's log
//! driver sends to CloudWatch Logs, and CloudWatch extracts the metrics
//! from them. No API call, no IAM permission, and no CloudWatch SDK.
//!
//! Per-org metrics carry the dimension `Org`; job and worker metrics have
//! none. The dashboard and alarms of the CDK app read these names.
//!
//! EMF takes a metric's value as a number or an array of at most 100
//! numbers, and has no statistic set. A statistic set (count, sum, min,
//! max) is written as values that keep its minimum, maximum and average:
//! the minimum, the maximum, and the mean of the rest repeated (at most 98
//! times; past that the repeated value is chosen so the average stays the
//! window's). So `Minimum`, `Maximum` and `Average` — what the dashboard
//! and alarms read — are exact; `SampleCount` is at most 100 a window.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::telemetry::{StatSet, Telemetry, Window};

/// EMF's limit on one metric's values in one document.
const MAX_VALUES: usize = 100;

/// One EMF document under construction: its metric definitions and values.
struct Doc {
    definitions: Vec<Value>,
    members: Map<String, Value>,
}

impl Doc {
    fn new(org: Option<&str>) -> Self {
        let mut members = Map::new();
        if let Some(org) = org {
            members.insert("Org".into(), json!(org));
        }
        Self { definitions: Vec::new(), members }
    }

    fn put(&mut self, name: &str, unit: &str, value: Value) {
        self.definitions.push(json!({"Name": name, "Unit": unit}));
        self.members.insert(name.into(), value);
    }

    fn count(&mut self, name: &str, v: u64) {
        self.put(name, "Count", json!(v));
    }

    fn stats(&mut self, name: &str, unit: &str, s: &StatSet) {
        if let Some(values) = stat_values(s) {
            self.put(name, unit, json!(values));
        }
    }

    fn finish(mut self, namespace: &str, timestamp_ms: u64) -> Value {
        let dimensions: Vec<Vec<&str>> =
            if self.members.contains_key("Org") { vec![vec!["Org"]] } else { vec![vec![]] };
        self.members.insert(
            "_aws".into(),
            json!({
                "Timestamp": timestamp_ms,
                "CloudWatchMetrics": [{"Namespace": namespace, "Dimensions": dimensions, "Metrics": self.definitions}],
            }),
        );
        Value::Object(self.members)
    }
}

/// Values with the statistic set's minimum, maximum and average (see the
/// module's documentation); `None` for an empty set.
fn stat_values(s: &StatSet) -> Option<Vec<f64>> {
    let n = s.count.round();
    if n < 1.0 {
        return None;
    }
    if n < 2.0 || s.min == s.max {
        return Some(vec![s.sum / n; (n as usize).min(MAX_VALUES)]);
    }
    let k = (n as usize).min(MAX_VALUES);
    if k == 2 {
        return Some(vec![s.min, s.max]);
    }
    let mean = s.sum / n;
    let middle = ((k as f64 * mean - s.min - s.max) / (k - 2) as f64).clamp(s.min, s.max);
    let mut v = vec![s.min, s.max];
    v.extend(std::iter::repeat_n(middle, k - 2));
    Some(v)
}

/// The EMF documents of one window. Counters are written even when zero,
/// so alarms on rates see a 0 rather than missing data.
pub fn window_documents(namespace: &str, w: &Window, timestamp_ms: u64) -> Vec<Value> {
    let mut out = Vec::new();
    for (org, o) in &w.orgs {
        let mut d = Doc::new(Some(org.as_str()));
        let c = &o.counters;
        d.count("Calls", c.calls);
        d.count("PromptTokens", c.prompt_tokens);
        d.count("CompletionTokens", c.completion_tokens);
        d.count("RateLimited", c.rate_limited);
        d.count("InsufficientQuota", c.insufficient_quota);
        d.count("ServerErrors", c.server_errors);
        d.count("Timeouts", c.timeouts);
        d.count("ConnectionErrors", c.connection_errors);
        d.stats("LatencyMs", "Milliseconds", &o.latency_ms);
        d.stats("HeadroomRatio", "None", &o.headroom);
        out.push(d.finish(namespace, timestamp_ms));
    }
    let mut d = Doc::new(None);
    d.count("JobsSucceeded", w.jobs_succeeded);
    d.count("JobsFailed", w.jobs_failed);
    d.count("JobsCancelled", w.jobs_cancelled);
    d.stats("JobDurationSeconds", "Seconds", &w.job_duration_s);
    d.stats("InFlightJobs", "Count", &w.in_flight);
    d.count("LedgerRequests", w.ledger_requests);
    out.push(d.finish(namespace, timestamp_ms));
    out
}

/// Writes the window to stdout, a JSON line per document.
fn publish(namespace: &str, w: &Window) {
    let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64;
    let mut text = String::new();
    for doc in window_documents(namespace, w, now) {
        text.push_str(&doc.to_string());
        text.push('\n');
    }
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        tracing::warn!(error = %e, "could not write metrics to stdout");
    }
}

/// Publishes every `every` until `shutdown`, then once more.
pub async fn run_publisher(namespace: String, telemetry: Arc<Telemetry>, every: Duration, shutdown: CancellationToken) {
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = shutdown.cancelled() => true,
        };
        publish(&namespace, &telemetry.take_window());
        if stop {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ModelName, OrgName, TenantId, Usage};
    use crate::storage::{CallEvent, CallOutcome};

    fn metric_names(doc: &Value) -> Vec<String> {
        doc["_aws"]["CloudWatchMetrics"][0]["Metrics"]
            .as_array()
            .unwrap()
            .iter()
            .map(|m| m["Name"].as_str().unwrap().to_string())
            .collect()
    }

    fn stats_of(values: &Value) -> (usize, f64, f64, f64) {
        let v: Vec<f64> = values.as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
        let min = v.iter().copied().fold(f64::INFINITY, f64::min);
        let max = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        (v.len(), min, max, v.iter().sum::<f64>() / v.len() as f64)
    }

    /// A window of 1,000 calls over two orgs is three EMF documents: one
    /// per org under the `Org` dimension, one for the jobs without; every
    /// metric the dashboard reads is defined with its unit, each value
    /// array is within EMF's 100, and the latency keeps its minimum,
    /// maximum and average exactly.
    #[test]
    fn a_window_of_many_calls_is_a_document_per_org_and_one_for_jobs() {
        let t = Telemetry::new();
        for i in 0..1_000u64 {
            t.record_call(&CallEvent {
                tenant: TenantId::parse("t").unwrap(),
                org: OrgName::parse(if i % 2 == 0 { "org-a" } else { "org-b" }).unwrap(),
                model: ModelName::parse("m").unwrap(),
                outcome: if i % 100 == 0 { CallOutcome::RateLimited } else { CallOutcome::Ok },
                usage: Usage { calls: 1, prompt_tokens: 10, completion_tokens: 5 },
                latency: Duration::from_millis(100 + i % 50),
            });
        }
        let w = t.take_window();
        let docs = window_documents("Ratepool", &w, 1_700_000_000_000);
        assert_eq!(docs.len(), 3);
        let a = &docs[0];
        assert_eq!(a["Org"], "org-a");
        assert_eq!(a["_aws"]["Timestamp"], 1_700_000_000_000u64);
        let directive = &a["_aws"]["CloudWatchMetrics"][0];
        assert_eq!(directive["Namespace"], "Ratepool");
        assert_eq!(directive["Dimensions"], json!([["Org"]]));
        let names = metric_names(a);
        for name in ["Calls", "RateLimited", "LatencyMs", "PromptTokens", "ServerErrors"] {
            assert!(names.contains(&name.to_string()), "{name} in {names:?}");
            assert!(a.get(name).is_some(), "{name} has a value");
        }
        let calls: u64 = docs.iter().filter_map(|d| d["Calls"].as_u64()).sum();
        assert_eq!(calls, 990, "rate-limited calls are counted apart");
        // Latencies of org-a: 100 + (even i % 50) = 100, 102, … 148, 500 of them.
        let (n, min, max, mean) = stats_of(&a["LatencyMs"]);
        assert!(n <= MAX_VALUES);
        assert_eq!((min, max), (100.0, 148.0));
        assert!((mean - 124.0).abs() < 1e-9, "{mean}");
        let jobs = &docs[2];
        assert!(jobs.get("Org").is_none());
        assert_eq!(jobs["_aws"]["CloudWatchMetrics"][0]["Dimensions"], json!([[]]));
        assert_eq!(jobs["JobsSucceeded"], 0, "zero counters are written");
        // The next window starts empty: the jobs document only.
        assert_eq!(window_documents("Ratepool", &t.take_window(), 0).len(), 1);
    }

    #[test]
    fn a_statistic_set_keeps_its_minimum_maximum_and_average() {
        let set = |v: &[f64]| {
            let mut s = StatSet::default();
            v.iter().for_each(|x| s.observe(*x));
            s
        };
        assert_eq!(stat_values(&StatSet::default()), None);
        assert_eq!(stat_values(&set(&[7.0])), Some(vec![7.0]));
        assert_eq!(stat_values(&set(&[1.0, 9.0])), Some(vec![1.0, 9.0]));
        let (n, min, max, mean) = stats_of(&json!(stat_values(&set(&[1.0, 2.0, 3.0, 10.0])).unwrap()));
        assert_eq!((n, min, max), (4, 1.0, 10.0));
        assert!((mean - 4.0).abs() < 1e-9);
        // 10,000 samples: 100 values, the same minimum, maximum and average.
        let many: Vec<f64> = (0..10_000).map(|i| (i % 997) as f64).collect();
        let s = set(&many);
        let (n, min, max, mean) = stats_of(&json!(stat_values(&s).unwrap()));
        assert_eq!((n, min, max), (100, 0.0, 996.0));
        assert!((mean - s.sum / s.count).abs() < 1e-9);
    }
}
