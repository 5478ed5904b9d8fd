//! Logging set-up and the in-process metrics: Prometheus counters for
//! `/metrics`, and per-(tenant, org) usage aggregated in memory and written
//! to the durable [`UsageStore`] in batches.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::domain::{OrgName, TenantId};
use crate::storage::faults::FaultCounts;
use crate::storage::{CallEvent, OrgCounters, QueueStats, StorageResult, UsageBatch, UsageStore};

/// Logs go to stderr: as JSON lines when `json` (Fargate, CloudWatch Logs),
/// human-readable otherwise. `RUST_LOG` overrides the default level.
pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    // A second init (tests) is harmless; ignore its error.
    let _ = if json { builder.json().try_init() } else { builder.try_init() };
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabels {
    org: String,
    model: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrgLabels {
    org: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OrgModelLabels {
    org: String,
    model: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TokenLabels {
    org: String,
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TenantQuotaLabels {
    tenant: String,
    quota: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    op: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallsDoorLabels {
    endpoint: &'static str,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct EndpointLabels {
    endpoint: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// 50 µs to about 0.3 s in steps of 25%: fine enough to read a p99 against
/// the 5 ms target, where doubling buckets could not tell 4 ms from 6 ms.
fn overhead_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 1.25, 40))
}

/// Count, sum, minimum and maximum of samples, so a minute of latencies is
/// one metric value set, not one per sample (see `aws::metrics`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StatSet {
    pub count: f64,
    pub sum: f64,
    pub min: f64,
    pub max: f64,
}

impl StatSet {
    pub fn observe(&mut self, v: f64) {
        if self.count == 0.0 {
            self.min = v;
            self.max = v;
        } else {
            self.min = self.min.min(v);
            self.max = self.max.max(v);
        }
        self.count += 1.0;
        self.sum += v;
    }
}

/// One org's share of a publishing window.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OrgWindow {
    pub counters: OrgCounters,
    pub latency_ms: StatSet,
    /// Lowest headroom seen over the org's models.
    pub headroom: StatSet,
}

/// Everything that happened since the last publish, for push-style metric
/// backends (CloudWatch). Drained by [`Telemetry::take_window`].
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub orgs: std::collections::BTreeMap<OrgName, OrgWindow>,
    pub jobs_succeeded: u64,
    pub jobs_failed: u64,
    pub jobs_cancelled: u64,
    pub job_duration_s: StatSet,
    /// Samples of this process's jobs in flight.
    pub in_flight: StatSet,
    /// Ledger storage requests (acquire, denied, raise).
    pub ledger_requests: u64,
}

/// Circuit breaker states as gauge values.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerGauge {
    Closed = 0,
    HalfOpen = 1,
    Open = 2,
}

/// Every metric the process exports, and the pending usage deltas.
pub struct Telemetry {
    registry: Registry,
    calls: Family<CallLabels, Counter>,
    tokens: Family<TokenLabels, Counter>,
    latency: HistogramFamily<OrgLabels>,
    headroom: Family<OrgModelLabels, Gauge<f64, AtomicU64>>,
    breaker_state: Family<OrgLabels, Gauge>,
    breaker_opened: Family<OrgLabels, Counter>,
    out_of_rotation: Family<OrgLabels, Gauge>,
    rate_factor: Family<OrgModelLabels, Gauge<f64, AtomicU64>>,
    burst: Family<OrgModelLabels, Gauge<f64, AtomicU64>>,
    ledger_ops: Family<OpLabels, Counter>,
    tenant_quota_waits: Family<TenantQuotaLabels, Counter>,
    tenant_quota_refusals: Family<TenantQuotaLabels, Counter>,
    jobs_finished: Family<StatusLabels, Counter>,
    cache_lookups: Family<ResultLabels, Counter>,
    webhooks: Family<ResultLabels, Counter>,
    job_duration: HistogramFamily<StatusLabels>,
    steps_done: Counter,
    step_overhead: Histogram,
    jobs_in_flight: Gauge,
    door_calls: Family<CallsDoorLabels, Counter>,
    door_wait: HistogramFamily<EndpointLabels>,
    durable_store_failures: Counter,
    queue_visible: Gauge,
    queue_in_flight: Gauge,
    queue_dead: Gauge,
    /// A storage drill's fault counts, copied into `drill_faults` by `render`.
    drill: Mutex<Option<std::sync::Arc<FaultCounts>>>,
    drill_faults: Family<KindLabels, Gauge>,
    pending_usage: Mutex<HashMap<(TenantId, OrgName), OrgCounters>>,
    /// The last flush that failed, retried as it is by the next one.
    failed_usage: Mutex<Option<UsageBatch>>,
    window: Mutex<Window>,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

impl Telemetry {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("ratepool");
        let calls = Family::<CallLabels, Counter>::default();
        registry.register("provider_calls", "Provider calls by org, model and outcome", calls.clone());
        let tokens = Family::<TokenLabels, Counter>::default();
        registry.register("provider_tokens", "Tokens the provider reported, by org and kind", tokens.clone());
        let latency: HistogramFamily<OrgLabels> = Family::new_with_constructor(latency_histogram);
        registry.register("provider_latency_seconds", "Provider call latency by org", latency.clone());
        let headroom = Family::<OrgModelLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "org_headroom_ratio",
            "Free fraction of the tighter bucket, as the ledger last saw it",
            headroom.clone(),
        );
        let breaker_state = Family::<OrgLabels, Gauge>::default();
        registry.register("org_breaker_state", "Circuit breaker: 0 closed, 1 half-open, 2 open", breaker_state.clone());
        let breaker_opened = Family::<OrgLabels, Counter>::default();
        registry.register("org_breaker_opened", "Times the org's circuit breaker opened", breaker_opened.clone());
        let out_of_rotation = Family::<OrgLabels, Gauge>::default();
        registry.register(
            "org_out_of_rotation",
            "1 while the org is out of rotation (insufficient quota, bad key)",
            out_of_rotation.clone(),
        );
        let rate_factor = Family::<OrgModelLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "org_rate_factor",
            "Share of the configured rate admitted to the org: below 1 after a 503 Slow Down, climbing back",
            rate_factor.clone(),
        );
        let burst = Family::<OrgModelLabels, Gauge<f64, AtomicU64>>::default();
        registry.register(
            "org_burst_seconds",
            "Burst the ledger admits to the org, in seconds of refill: the configured window, smaller once 429s showed the provider's is",
            burst.clone(),
        );
        let ledger_ops = Family::<OpLabels, Counter>::default();
        registry.register("ledger_operations", "Quota ledger storage operations by kind", ledger_ops.clone());
        let tenant_quota_waits = Family::<TenantQuotaLabels, Counter>::default();
        registry.register(
            "tenant_quota_waits",
            "Provider calls held because their tenant's own quota was spent",
            tenant_quota_waits.clone(),
        );
        let tenant_quota_refusals = Family::<TenantQuotaLabels, Counter>::default();
        registry.register(
            "tenant_quota_refusals",
            "Job submissions answered 429 for a tenant quota, by quota",
            tenant_quota_refusals.clone(),
        );
        let jobs_finished = Family::<StatusLabels, Counter>::default();
        registry.register("jobs_finished", "Jobs that reached a final status", jobs_finished.clone());
        let cache_lookups = Family::<ResultLabels, Counter>::default();
        registry.register(
            "response_cache_lookups",
            "Response cache lookups by result: hit (no provider call, no quota), miss, error",
            cache_lookups.clone(),
        );
        let webhooks = Family::<ResultLabels, Counter>::default();
        registry.register("webhook_deliveries", "Webhook deliveries by result: delivered, failed", webhooks.clone());
        let job_duration: HistogramFamily<StatusLabels> =
            Family::new_with_constructor(|| Histogram::new(exponential_buckets(1.0, 2.0, 14)));
        registry.register("job_duration_seconds", "Submission to final status", job_duration.clone());
        let steps_done = Counter::default();
        registry.register("steps_checkpointed", "Steps finished and checkpointed", steps_done.clone());
        let step_overhead = overhead_histogram();
        registry.register(
            "step_overhead_seconds",
            "Time per step spent in ratepool (everything but the provider call)",
            step_overhead.clone(),
        );
        let jobs_in_flight = Gauge::default();
        registry.register("jobs_in_flight", "Jobs this process is running", jobs_in_flight.clone());
        let door_calls = Family::<CallsDoorLabels, Counter>::default();
        registry.register(
            "calls",
            "Calls to the OpenAI-compatible endpoints by endpoint and outcome (replayed: a durable call's stored answer)",
            door_calls.clone(),
        );
        let door_wait: HistogramFamily<EndpointLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "call_wait_seconds",
            "Time a call to the OpenAI-compatible endpoints waited for capacity",
            door_wait.clone(),
        );
        let durable_store_failures = Counter::default();
        registry.register(
            "durable_call_store_failures",
            "Durable calls answered without their answer stored (a replay would call the provider again)",
            durable_store_failures.clone(),
        );
        let queue_visible = Gauge::default();
        registry.register("queue_visible", "Jobs waiting in the queue", queue_visible.clone());
        let queue_in_flight = Gauge::default();
        registry.register("queue_in_flight", "Jobs received and not yet finished", queue_in_flight.clone());
        let queue_dead = Gauge::default();
        registry.register("queue_dead_letters", "Jobs in the dead-letter queue", queue_dead.clone());
        let drill_faults = Family::<KindLabels, Gauge>::default();
        registry.register(
            "drill_storage_faults",
            "Faults a [drill.storage_faults] drill injected into this process's storage calls, by kind",
            drill_faults.clone(),
        );
        Self {
            registry,
            calls,
            tokens,
            latency,
            headroom,
            breaker_state,
            breaker_opened,
            out_of_rotation,
            rate_factor,
            burst,
            ledger_ops,
            tenant_quota_waits,
            tenant_quota_refusals,
            jobs_finished,
            cache_lookups,
            webhooks,
            job_duration,
            steps_done,
            step_overhead,
            jobs_in_flight,
            door_calls,
            door_wait,
            durable_store_failures,
            queue_visible,
            queue_in_flight,
            queue_dead,
            drill: Mutex::new(None),
            drill_faults,
            pending_usage: Mutex::new(HashMap::new()),
            failed_usage: Mutex::new(None),
            window: Mutex::new(Window::default()),
        }
    }

    pub fn record_call(&self, ev: &CallEvent) {
        let org = ev.org.to_string();
        self.calls
            .get_or_create(&CallLabels { org: org.clone(), model: ev.model.to_string(), outcome: ev.outcome.as_str() })
            .inc();
        if ev.usage.prompt_tokens + ev.usage.completion_tokens > 0 {
            self.tokens.get_or_create(&TokenLabels { org: org.clone(), kind: "prompt" }).inc_by(ev.usage.prompt_tokens);
            self.tokens
                .get_or_create(&TokenLabels { org: org.clone(), kind: "completion" })
                .inc_by(ev.usage.completion_tokens);
        }
        self.latency.get_or_create(&OrgLabels { org }).observe(ev.latency.as_secs_f64());
        let mut pending = self.pending_usage.lock().unwrap_or_else(|e| e.into_inner());
        pending.entry((ev.tenant.clone(), ev.org.clone())).or_default().record(ev);
        drop(pending);
        let mut w = self.window();
        let o = w.orgs.entry(ev.org.clone()).or_default();
        o.counters.record(ev);
        o.latency_ms.observe(ev.latency.as_secs_f64() * 1000.0);
    }

    fn window(&self) -> std::sync::MutexGuard<'_, Window> {
        self.window.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes the window's aggregate and starts a new one; samples the
    /// in-flight gauge first so every window has at least one sample.
    pub fn take_window(&self) -> Window {
        let in_flight = self.jobs_in_flight.get() as f64;
        let mut w = self.window();
        w.in_flight.observe(in_flight);
        std::mem::take(&mut *w)
    }

    pub fn set_headroom(&self, org: &OrgName, model: &crate::domain::ModelName, ratio: f64) {
        self.headroom.get_or_create(&OrgModelLabels { org: org.to_string(), model: model.to_string() }).set(ratio);
        self.window().orgs.entry(org.clone()).or_default().headroom.observe(ratio);
    }

    pub fn set_breaker(&self, org: &OrgName, state: BreakerGauge) {
        self.breaker_state.get_or_create(&OrgLabels { org: org.to_string() }).set(state as i64);
        if state == BreakerGauge::Open {
            self.breaker_opened.get_or_create(&OrgLabels { org: org.to_string() }).inc();
        }
    }

    pub fn set_out_of_rotation(&self, org: &OrgName, out: bool) {
        self.out_of_rotation.get_or_create(&OrgLabels { org: org.to_string() }).set(i64::from(out));
    }

    pub fn set_rate_factor(&self, org: &OrgName, model: &crate::domain::ModelName, factor: f64) {
        self.rate_factor.get_or_create(&OrgModelLabels { org: org.to_string(), model: model.to_string() }).set(factor);
    }

    pub fn set_burst(&self, org: &OrgName, model: &crate::domain::ModelName, secs: f64) {
        self.burst.get_or_create(&OrgModelLabels { org: org.to_string(), model: model.to_string() }).set(secs);
    }

    /// Counts a ledger storage operation: "acquire", "denied", "raise".
    pub fn ledger_op(&self, op: &'static str) {
        self.ledger_ops.get_or_create(&OpLabels { op }).inc();
        self.window().ledger_requests += 1;
    }

    pub fn ledger_ops(&self, op: &'static str) -> u64 {
        self.ledger_ops.get_or_create(&OpLabels { op }).get()
    }

    /// Counts a response cache lookup: "hit", "miss" or "error".
    pub fn cache_lookup(&self, result: &'static str) {
        self.cache_lookups.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a finished webhook delivery: "delivered" or "failed".
    pub fn webhook_delivery(&self, result: &'static str) {
        self.webhooks.get_or_create(&ResultLabels { result }).inc();
    }

    /// Counts a call held for its tenant's `quota` ("calls_per_minute" or
    /// "tokens_per_day").
    pub fn tenant_quota_wait(&self, tenant: &TenantId, quota: &'static str) {
        self.tenant_quota_waits.get_or_create(&TenantQuotaLabels { tenant: tenant.to_string(), quota }).inc();
    }

    pub fn tenant_quota_waits(&self, tenant: &TenantId, quota: &'static str) -> u64 {
        self.tenant_quota_waits.get_or_create(&TenantQuotaLabels { tenant: tenant.to_string(), quota }).get()
    }

    /// Counts a submission refused for the tenant's `quota`.
    pub fn tenant_quota_refusal(&self, tenant: &TenantId, quota: &'static str) {
        self.tenant_quota_refusals.get_or_create(&TenantQuotaLabels { tenant: tenant.to_string(), quota }).inc();
    }

    pub fn job_finished(&self, status: crate::storage::JobStatus, duration: std::time::Duration) {
        let l = StatusLabels { status: status.as_str() };
        self.jobs_finished.get_or_create(&l).inc();
        self.job_duration.get_or_create(&l).observe(duration.as_secs_f64());
        let mut w = self.window();
        match status {
            crate::storage::JobStatus::Succeeded => w.jobs_succeeded += 1,
            crate::storage::JobStatus::Failed => w.jobs_failed += 1,
            crate::storage::JobStatus::Cancelled => w.jobs_cancelled += 1,
            _ => {}
        }
        w.job_duration_s.observe(duration.as_secs_f64());
    }

    pub fn step_done(&self, overhead: std::time::Duration) {
        self.steps_done.inc();
        self.step_overhead.observe(overhead.as_secs_f64());
    }

    /// Counts one call to an OpenAI-compatible `endpoint` by how it ended.
    pub fn door_call(&self, endpoint: &'static str, outcome: &'static str) {
        self.door_calls.get_or_create(&CallsDoorLabels { endpoint, outcome }).inc();
    }

    pub fn door_calls(&self, endpoint: &'static str, outcome: &'static str) -> u64 {
        self.door_calls.get_or_create(&CallsDoorLabels { endpoint, outcome }).get()
    }

    /// How long a call to `endpoint` waited for capacity before it was sent.
    pub fn door_wait(&self, endpoint: &'static str, waited: std::time::Duration) {
        self.door_wait.get_or_create(&EndpointLabels { endpoint }).observe(waited.as_secs_f64());
    }

    pub fn durable_store_failed(&self) {
        self.durable_store_failures.inc();
    }

    pub fn jobs_in_flight(&self) -> &Gauge {
        &self.jobs_in_flight
    }

    pub fn set_queue(&self, s: QueueStats) {
        self.queue_visible.set(s.visible as i64);
        self.queue_in_flight.set(s.in_flight as i64);
        self.queue_dead.set(s.dead as i64);
    }

    /// Shows a storage drill's fault counts (`[drill.storage_faults]`) as
    /// `ratepool_drill_storage_faults{kind}`.
    pub fn watch_drill(&self, counts: std::sync::Arc<FaultCounts>) {
        *self.drill.lock().unwrap_or_else(|e| e.into_inner()) = Some(counts);
    }

    /// Prometheus text exposition.
    pub fn render(&self) -> String {
        if let Some(c) = self.drill.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            for (kind, n) in [
                ("write_error", &c.write_errors),
                ("throttled", &c.throttled),
                ("lost_response", &c.lost_responses),
                ("slow", &c.slowed),
                ("writes_applied", &c.writes_applied),
            ] {
                self.drill_faults.get_or_create(&KindLabels { kind }).set(FaultCounts::get(n) as i64);
            }
        }
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Writes the pending usage deltas in one batch. A batch that failed
    /// (its answer may have been lost after it landed) is kept whole and
    /// retried as it is, with its id, before anything newer: the store adds
    /// a batch id once, so nothing is lost and nothing counted twice.
    pub async fn flush(&self, store: &dyn UsageStore) -> StorageResult<()> {
        let retry = self.failed_usage.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(batch) = retry
            && let Err(e) = store.add(&batch).await
        {
            *self.failed_usage.lock().unwrap_or_else(|e| e.into_inner()) = Some(batch);
            return Err(e);
        }
        let deltas: Vec<_> = {
            let mut pending = self.pending_usage.lock().unwrap_or_else(|e| e.into_inner());
            pending.drain().map(|((t, o), c)| (t, o, c)).collect()
        };
        if deltas.is_empty() {
            return Ok(());
        }
        let batch = UsageBatch::new(deltas);
        if let Err(e) = store.add(&batch).await {
            *self.failed_usage.lock().unwrap_or_else(|e| e.into_inner()) = Some(batch);
            return Err(e);
        }
        Ok(())
    }
}
