//! CloudWatch metrics: the in-process [`Window`] (counters and statistic
//! sets aggregated since the last publish) written with PutMetricData once
//! a minute — never one API call per provider call.
//!
//! Per-org metrics carry the dimension `Org`; job and worker metrics have
//! none. The dashboard and alarms of the CDK app read these names.

use std::sync::Arc;
use std::time::Duration;

use aws_sdk_cloudwatch::types::{Dimension, MetricDatum, StandardUnit, StatisticSet};
use tokio_util::sync::CancellationToken;

use crate::telemetry::{StatSet, Telemetry, Window};

/// PutMetricData takes up to 1,000 data per request; stay well under.
const BATCH: usize = 500;

fn datum(name: &str, org: Option<&str>, unit: StandardUnit) -> aws_sdk_cloudwatch::types::builders::MetricDatumBuilder {
    let mut b = MetricDatum::builder().metric_name(name).unit(unit);
    if let Some(org) = org {
        b = b.dimensions(Dimension::builder().name("Org").value(org).build());
    }
    b
}

fn count(name: &str, org: Option<&str>, v: u64) -> MetricDatum {
    datum(name, org, StandardUnit::Count).value(v as f64).build()
}

fn stats(name: &str, org: Option<&str>, unit: StandardUnit, s: &StatSet) -> Option<MetricDatum> {
    (s.count > 0.0).then(|| {
        datum(name, org, unit)
            .statistic_values(
                StatisticSet::builder().sample_count(s.count).sum(s.sum).minimum(s.min).maximum(s.max).build(),
            )
            .build()
    })
}

/// The data of one window. Counters are sent even when zero, so alarms on
/// rates see a 0 rather than missing data.
pub fn window_data(w: &Window) -> Vec<MetricDatum> {
    let mut out = Vec::new();
    for (org, o) in &w.orgs {
        let org = Some(org.as_str());
        let c = &o.counters;
        out.push(count("Calls", org, c.calls));
        out.push(count("PromptTokens", org, c.prompt_tokens));
        out.push(count("CompletionTokens", org, c.completion_tokens));
        out.push(count("RateLimited", org, c.rate_limited));
        out.push(count("InsufficientQuota", org, c.insufficient_quota));
        out.push(count("ServerErrors", org, c.server_errors));
        out.push(count("Timeouts", org, c.timeouts));
        out.push(count("ConnectionErrors", org, c.connection_errors));
        out.extend(stats("LatencyMs", org, StandardUnit::Milliseconds, &o.latency_ms));
        out.extend(stats("HeadroomRatio", org, StandardUnit::None, &o.headroom));
    }
    out.push(count("JobsSucceeded", None, w.jobs_succeeded));
    out.push(count("JobsFailed", None, w.jobs_failed));
    out.push(count("JobsCancelled", None, w.jobs_cancelled));
    out.extend(stats("JobDurationSeconds", None, StandardUnit::Seconds, &w.job_duration_s));
    out.extend(stats("InFlightJobs", None, StandardUnit::Count, &w.in_flight));
    out.push(count("LedgerRequests", None, w.ledger_requests));
    out
}

/// Writes one window; returns the number of PutMetricData requests made.
pub async fn publish(client: &aws_sdk_cloudwatch::Client, namespace: &str, w: &Window) -> Result<usize, String> {
    let data = window_data(w);
    let mut requests = 0;
    for chunk in data.chunks(BATCH) {
        client
            .put_metric_data()
            .namespace(namespace)
            .set_metric_data(Some(chunk.to_vec()))
            .send()
            .await
            .map_err(|e| crate::aws::sdk_err("PutMetricData", e).to_string())?;
        requests += 1;
    }
    Ok(requests)
}

/// Publishes every `every` until `shutdown`, then once more.
pub async fn run_publisher(
    client: aws_sdk_cloudwatch::Client,
    namespace: String,
    telemetry: Arc<Telemetry>,
    every: Duration,
    shutdown: CancellationToken,
) {
    loop {
        let stop = tokio::select! {
            _ = tokio::time::sleep(every) => false,
            _ = shutdown.cancelled() => true,
        };
        let w = telemetry.take_window();
        if let Err(e) = publish(&client, &namespace, &w).await {
            tracing::warn!(error = %e, "could not publish metrics to CloudWatch");
        }
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

    #[test]
    fn a_window_of_many_calls_is_a_handful_of_data() {
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
        let data = window_data(&w);
        // 8 counters + latency per org, 4 job counters + in-flight sample.
        assert_eq!(data.len(), 2 * 9 + 5);
        let calls: f64 =
            data.iter().filter(|d| d.metric_name() == Some("Calls")).map(|d| d.value().unwrap_or_default()).sum();
        assert_eq!(calls, 990.0);
        let lat =
            data.iter().find(|d| d.metric_name() == Some("LatencyMs")).and_then(|d| d.statistic_values()).unwrap();
        assert_eq!(lat.sample_count(), Some(500.0));
        assert_eq!(lat.minimum(), Some(100.0));
        assert_eq!(lat.maximum(), Some(148.0));
        // The next window starts empty.
        assert!(t.take_window().orgs.is_empty());
    }
}
