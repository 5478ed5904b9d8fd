//! The HTTP API: submit, inspect, cancel and read jobs; usage; metrics;
//! and the OpenAI-compatible Calls door ([`calls`]).
//!
//! One `axum::Router` serves `ratepool serve` and (through the Lambda
//! adapter) API Gateway, so both answer the same routes with the same
//! validation, authentication and bodies.

pub mod calls;
mod error;
mod keyring;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use http_body_util::BodyExt;
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::TenantKey;
use crate::domain::{Clock, IdempotencyKey, JobId, Micros, ModelName, OrgName, StepKey, TenantId, Usage};
use crate::engine::quota::{QuotaKind, QuotaReport, TenantQuotas};
use crate::engine::router::OrgStatus;
use crate::spec::{JobSpec, SpecLimits};
use crate::storage::gcra::{self, BucketParams};
use crate::storage::{
    BucketKey, CreateOutcome, JobQueue, JobRecord, JobStatus, JobStore, NewJob, OrgCounters, PageRequest, QueueMessage,
    QuotaLedger, UsageStore,
};
use crate::telemetry::Telemetry;
pub use error::ApiError;
pub use keyring::{TENANT_KEYS_MAX_AGE, TenantKeySource, TenantKeyring};

/// One org of the pool and its ledger parameters, for `/v1/usage`.
#[derive(Debug, Clone)]
pub struct PoolOrg {
    pub name: OrgName,
    pub models: BTreeMap<ModelName, BucketParams>,
}

/// Where the live org states (breaker, rotation) come from, when workers
/// run in this process.
pub trait OrgStatusSource: Send + Sync {
    fn org_status(&self) -> Vec<OrgStatus>;
}

impl OrgStatusSource for crate::engine::Router {
    fn org_status(&self) -> Vec<OrgStatus> {
        self.status()
    }
}

pub struct ApiState {
    pub jobs: Arc<dyn JobStore>,
    pub queue: Arc<dyn JobQueue>,
    pub ledger: Arc<dyn QuotaLedger>,
    pub usage: Arc<dyn UsageStore>,
    pub tenants: Arc<TenantKeyring>,
    pub pool: Vec<PoolOrg>,
    pub limits: SpecLimits,
    pub quotas: TenantQuotas,
    pub clock: Arc<dyn Clock>,
    pub telemetry: Arc<Telemetry>,
    pub org_status: Option<Arc<dyn OrgStatusSource>>,
    pub webhooks: WebhookRules,
    /// The OpenAI-compatible routes' router, store and settings.
    pub calls: calls::CallsDoor,
}

/// Which webhook URLs a submission may carry.
#[derive(Debug, Clone, Default)]
pub struct WebhookRules {
    /// `[webhooks] allow_private`: loopback and private targets allowed.
    pub allow_private: bool,
    /// Tenants with a signing secret (`webhook_secret_env`); others cannot
    /// ask for webhooks.
    pub tenants: std::collections::BTreeSet<TenantId>,
}

impl ApiState {
    fn serves_model(&self, m: &ModelName) -> bool {
        self.pool.iter().any(|o| o.models.contains_key(m))
    }
}

pub fn router(state: Arc<ApiState>) -> Router {
    Router::new()
        .route("/v1/jobs", post(submit))
        .route("/v1/jobs/{id}", get(job_status))
        .route("/v1/jobs/{id}/result", get(job_result))
        .route("/v1/jobs/{id}/cancel", post(cancel))
        .route("/v1/usage", get(usage))
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .merge(calls::routes())
        .fallback(|| async { ApiError::NotFound("no such route".into()) })
        // `submit` and the calls enforce their body limits themselves (see `read_body`).
        .layer(DefaultBodyLimit::disable())
        .with_state(state)
}

/// The tenant whose key is in `Authorization: Bearer KEY`. Every tenant's
/// key is compared in constant time, and all of them are compared, so the
/// answer time does not say which tenant (or how much of a key) matched.
async fn authenticate(state: &ApiState, headers: &HeaderMap) -> Result<TenantId, ApiError> {
    state.tenants.authenticate(headers).await
}

pub(crate) fn authenticate_among(tenants: &[TenantKey], headers: &HeaderMap) -> Result<TenantId, ApiError> {
    let presented = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim)
        .ok_or(ApiError::Unauthorized)?;
    let mut found: Option<&TenantId> = None;
    for t in tenants {
        if keys_match(t.key.expose_secret(), presented) {
            found = Some(&t.tenant);
        }
    }
    found.cloned().ok_or(ApiError::Unauthorized)
}

/// Whether a presented key is a configured one, in time that depends on
/// neither's content nor length. Both are hashed to 32 bytes first because
/// `ct_eq` on slices of different lengths returns at once, which would tell
/// an attacker the key's length.
fn keys_match(configured: &str, presented: &str) -> bool {
    let (a, b) = (Sha256::digest(configured.as_bytes()), Sha256::digest(presented.as_bytes()));
    a[..].ct_eq(&b[..]).into()
}

fn rfc3339(us: Micros) -> String {
    let t = UNIX_EPOCH + Duration::from_micros(us.max(0) as u64);
    humantime::format_rfc3339_millis(t).to_string()
}

#[derive(Serialize)]
struct Accepted {
    id: JobId,
    status: JobStatus,
}

#[derive(Serialize)]
struct UsageView {
    calls: u64,
    prompt_tokens: u64,
    completion_tokens: u64,
    total_tokens: u64,
}

impl From<Usage> for UsageView {
    fn from(u: Usage) -> Self {
        Self {
            calls: u.calls,
            prompt_tokens: u.prompt_tokens,
            completion_tokens: u.completion_tokens,
            total_tokens: u.total_tokens(),
        }
    }
}

#[derive(Serialize)]
struct JobView {
    id: JobId,
    name: String,
    status: JobStatus,
    priority: crate::domain::Priority,
    steps_total: u32,
    steps_done: u32,
    usage: UsageView,
    error: Option<String>,
    created_at: String,
    updated_at: String,
    finished_at: Option<String>,
    /// Present when the job asked for a webhook.
    #[serde(skip_serializing_if = "Option::is_none")]
    webhook: Option<WebhookView>,
}

/// A job's webhook: `pending` until a delivery is recorded.
#[derive(Serialize)]
struct WebhookView {
    status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    attempts: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_status: Option<u16>,
}

impl From<Option<crate::storage::DeliveryReport>> for WebhookView {
    fn from(r: Option<crate::storage::DeliveryReport>) -> Self {
        use crate::storage::DeliveryStatus;
        match r {
            None => Self { status: "pending", attempts: None, last_error: None, last_status: None },
            Some(r) => Self {
                status: match r.status {
                    DeliveryStatus::Delivered => "delivered",
                    DeliveryStatus::Failed => "failed",
                },
                attempts: Some(r.attempts),
                last_error: r.last_error,
                last_status: r.last_status,
            },
        }
    }
}

impl From<JobRecord> for JobView {
    fn from(j: JobRecord) -> Self {
        Self {
            id: j.id,
            name: j.name,
            status: j.status,
            priority: j.priority,
            steps_total: j.steps_total,
            steps_done: j.steps_done,
            usage: j.usage.into(),
            error: j.error,
            created_at: rfc3339(j.created_at),
            updated_at: rfc3339(j.updated_at),
            finished_at: j.finished_at.map(rfc3339),
            webhook: None,
        }
    }
}

fn idempotency_key(headers: &HeaderMap) -> Result<Option<IdempotencyKey>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else { return Ok(None) };
    IdempotencyKey::parse(v.to_str().unwrap_or("")).map(Some).map_err(|e| ApiError::invalid("Idempotency-Key", e.0))
}

/// Bodies up to this size past the limit are read and discarded before the
/// 413 is sent, so the client (still writing) sees the answer instead of a
/// reset connection; larger ones are cut off.
const DRAIN_CAP: usize = 32 << 20;

/// Reads at most `limit` bytes; never holds more than that in memory.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Bytes, ApiError> {
    let too_large = || ApiError::TooLarge(format!("request body is larger than {limit} bytes"));
    let declared =
        headers.get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > DRAIN_CAP) {
        return Err(too_large());
    }
    let mut buf = Vec::with_capacity(declared.unwrap_or(0).min(limit));
    let mut seen = 0usize;
    let mut body = body;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| ApiError::invalid("body", format!("could not read the request body: {e}")))?;
        let Ok(chunk) = frame.into_data() else { continue };
        seen += chunk.len();
        if seen > DRAIN_CAP {
            return Err(too_large());
        }
        if seen <= limit {
            buf.extend_from_slice(&chunk);
        }
    }
    if seen > limit {
        return Err(too_large());
    }
    Ok(Bytes::from(buf))
}

async fn submit(State(state): State<Arc<ApiState>>, headers: HeaderMap, body: Body) -> Result<Response, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    let body = read_body(&headers, body, state.limits.max_body_bytes).await?;
    let key = idempotency_key(&headers)?;
    let spec = JobSpec::parse(&body, &state.limits, &|m| state.serves_model(m))
        .map_err(|e| ApiError::invalid(e.field, e.message))?;
    if let Some(url) = &spec.webhook_url {
        if !state.webhooks.tenants.contains(&tenant) {
            return Err(ApiError::invalid(
                "webhook_url",
                "this tenant has no webhook signing secret configured (webhook_secret_env)",
            ));
        }
        crate::ssrf::check_url(url, state.webhooks.allow_private)
            .map_err(|e| ApiError::invalid("webhook_url", e.to_string()))?;
    }
    let idempotency = key.map(|k| (String::from(k), hex::encode(Sha256::digest(&body))));
    let quota = state.quotas.get(&tenant);
    if quota.bucket_params().is_some() {
        // A read, never a charge: the calls are charged when they are made.
        let bucket = state.ledger.state(&BucketKey::tenant(&tenant)).await?;
        let now = state.clock.now();
        if let Some(spent) = quota.spent(&bucket, now) {
            // A retry of a request already accepted gets its job, not a 429.
            if let Some((key, hash)) = &idempotency
                && let Some(record) = state.jobs.replay(&tenant, key, hash).await?
            {
                return Ok(replayed(record));
            }
            let retry_after_secs = ((spent.retry_at - now).max(1) as u64).div_ceil(1_000_000).min(86_400);
            return Err(refuse(
                &state,
                &tenant,
                spent.kind,
                spent.limit,
                retry_after_secs,
                format!(
                    "tenant {tenant} has spent its {} quota ({}); retry in {retry_after_secs} s",
                    spent.kind.as_str(),
                    spent.limit
                ),
            ));
        }
    }
    let job = NewJob {
        id: JobId::generate(),
        tenant: tenant.clone(),
        name: spec.name.clone(),
        priority: spec.priority,
        spec_json: spec.to_stored(),
        steps_total: spec.steps.len() as u32,
        idempotency,
        created_at: state.clock.now(),
        in_flight_limit: quota.jobs_in_flight,
    };
    match state.jobs.create_job(&job).await? {
        CreateOutcome::Created(record) => {
            // The job is stored marked unsent: if the send or the mark fails
            // (or this process dies here), the workers' sweeper sends it.
            match state.queue.send(&queue_message(&record)).await {
                Ok(()) => {
                    if let Err(e) = state.jobs.mark_sent(&record.id).await {
                        tracing::warn!(job = %record.id, error = %e, "could not mark the job sent; the sweeper will send it again");
                    }
                }
                Err(e) => {
                    tracing::warn!(job = %record.id, error = %e, "could not enqueue the job; the sweeper will send it");
                }
            }
            tracing::info!(job = %record.id, tenant = %tenant, steps = record.steps_total, "job accepted");
            Ok((StatusCode::ACCEPTED, Json(Accepted { id: record.id, status: record.status })).into_response())
        }
        CreateOutcome::Existing(record) => Ok(replayed(record)),
        CreateOutcome::InFlightLimit { in_flight } => {
            let limit = quota.jobs_in_flight.unwrap_or(in_flight);
            Err(refuse(
                &state,
                &tenant,
                QuotaKind::JobsInFlight,
                limit,
                IN_FLIGHT_RETRY_AFTER_SECS,
                format!(
                    "tenant {tenant} has {in_flight} jobs queued or running, its jobs_in_flight quota ({limit}); \
                     submit again when one has finished"
                ),
            ))
        }
    }
}

fn queue_message(r: &JobRecord) -> QueueMessage {
    QueueMessage { job_id: r.id.clone(), tenant: r.tenant.clone(), priority: r.priority }
}

/// The answer to a retry of a request whose first answer was lost: the job
/// it created. Nothing is sent: a first send that failed is the sweeper's
/// to repeat (the job is marked unsent until it went), so replays never
/// pile up messages.
fn replayed(record: JobRecord) -> Response {
    let mut resp = (StatusCode::ACCEPTED, Json(Accepted { id: record.id, status: record.status })).into_response();
    resp.headers_mut().insert("idempotent-replayed", header::HeaderValue::from_static("true"));
    resp
}

/// The `Retry-After` of a submission refused for jobs in flight: when a job
/// finishes is not known, so this is only a polling interval.
const IN_FLIGHT_RETRY_AFTER_SECS: u64 = 5;

/// A 429 for the tenant's `quota`, logged and counted.
fn refuse(
    state: &ApiState,
    tenant: &TenantId,
    quota: QuotaKind,
    limit: u64,
    retry_after_secs: u64,
    message: String,
) -> ApiError {
    tracing::info!(tenant = %tenant, quota = quota.as_str(), limit, retry_after_secs, "submission refused by a tenant quota");
    state.telemetry.tenant_quota_refusal(tenant, quota.as_str());
    ApiError::QuotaExceeded { quota, limit, retry_after_secs, message }
}

/// The job, if it exists and belongs to `tenant`; another tenant's job is
/// answered exactly like a missing one.
async fn owned_job(state: &ApiState, tenant: &TenantId, id: &str) -> Result<JobRecord, ApiError> {
    let not_found = || ApiError::NotFound(format!("no job {id:?}"));
    let id = JobId::parse(id).map_err(|_| not_found())?;
    match state.jobs.get_job(&id).await? {
        Some(j) if &j.tenant == tenant => Ok(j),
        _ => Err(not_found()),
    }
}

async fn job_status(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<JobView>, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    let job = owned_job(&state, &tenant, &id).await?;
    let webhook = if JobSpec::stored_webhook_url(&job.spec_json).is_some() {
        Some(WebhookView::from(state.jobs.webhook_report(&job.id).await?))
    } else {
        None
    };
    Ok(Json(JobView { webhook, ..job.into() }))
}

#[derive(Serialize)]
struct ResultView {
    id: JobId,
    status: JobStatus,
    /// Step (or instance, `scene[3]`) → choice 0's text.
    outputs: BTreeMap<String, String>,
    /// Step → its whole answer: choice 0's message and finish reason, the
    /// parsed JSON of a step that asked for JSON, every choice of an
    /// `n > 1` step.
    messages: BTreeMap<String, serde_json::Value>,
    /// When the steps did not fit one page: the `after` of the next page's
    /// request. `null` on the last (for most jobs, the only) page.
    next: Option<String>,
}

/// Stored answer bytes on one page of `/result`. Each step's text shows
/// twice (`outputs` and `messages`) and JSON escapes it, so a page stays
/// well inside the API Lambda's 6 MB response, escaped again in its
/// envelope; a single step larger than this comes alone on its page.
pub const RESULT_PAGE_BYTES: u64 = 1 << 20;
/// The most steps one page may be asked for.
const MAX_RESULT_PAGE_STEPS: usize = 1_000;

/// `GET /v1/jobs/{id}/result?after=STEP&limit=N`.
#[derive(Deserialize)]
struct ResultQuery {
    /// The previous page's `next`.
    after: Option<String>,
    /// Steps per page, at most [`MAX_RESULT_PAGE_STEPS`].
    limit: Option<usize>,
}

/// One step's entry in `messages`. `wants_json`: its `response_format`
/// asked for JSON, so the content is parsed beside the text.
fn message_view(answer: &crate::answer::StepAnswer, wants_json: bool) -> serde_json::Value {
    let first = answer.first();
    let mut m = serde_json::json!({
        "role": "assistant",
        "content": first.content,
        "refusal": first.refusal,
        "finish_reason": first.finish_reason,
    });
    if !first.tool_calls.is_empty() {
        m["tool_calls"] = serde_json::json!(first.tool_calls);
    }
    if wants_json
        && let Some(parsed) = first.content.as_deref().and_then(|c| serde_json::from_str::<serde_json::Value>(c).ok())
    {
        m["parsed"] = parsed;
    }
    if answer.choices().len() > 1 {
        m["choices"] = serde_json::json!(answer.choices());
    }
    m
}

async fn job_result(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    query: Result<Query<ResultQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<ResultView>, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    let Query(query) = query.map_err(|e| ApiError::invalid("query", e.body_text()))?;
    let after = match query.after.as_deref() {
        None => None,
        Some(a) => Some(StepKey::parse(a).map_err(|e| ApiError::invalid("after", e.to_string()))?),
    };
    let max_steps = match query.limit {
        None => MAX_RESULT_PAGE_STEPS,
        Some(n @ 1..=MAX_RESULT_PAGE_STEPS) => n,
        Some(_) => return Err(ApiError::invalid("limit", format!("must be 1 to {MAX_RESULT_PAGE_STEPS}"))),
    };
    let job = owned_job(&state, &tenant, &id).await?;
    if job.status != JobStatus::Succeeded {
        return Err(ApiError::NotReady(format!(
            "job is {} ({}/{} steps done); the result is available once it has succeeded",
            job.status.as_str(),
            job.steps_done,
            job.steps_total
        )));
    }
    // Only to tell which steps asked for JSON; a spec that no longer reads
    // (limits changed) shows the answers without `parsed`.
    let spec = JobSpec::from_stored(&job.spec_json, &state.limits).ok();
    let wants_json = |step: &crate::domain::StepId| {
        spec.as_ref()
            .and_then(|s| s.step_index(step).map(|i| &s.steps[i]))
            .and_then(|s| s.params.response_format.as_ref())
            .is_some_and(|f| f.kind() != crate::spec::params::ResponseKind::Text)
    };
    let request = PageRequest { after, max_steps, max_bytes: RESULT_PAGE_BYTES };
    let Some(page) = state.jobs.checkpoint_page(&job.id, &request).await? else {
        return Err(ApiError::invalid("after", format!("job {} has no step {:?}", job.id, query.after)));
    };
    let mut outputs = BTreeMap::new();
    let mut messages = BTreeMap::new();
    for c in page.checkpoints {
        let key = c.step.to_string();
        messages.insert(key.clone(), message_view(&c.answer, wants_json(c.step.step())));
        outputs.insert(key, c.output().to_owned());
    }
    let next = page.next.map(|k| k.to_string());
    Ok(Json(ResultView { id: job.id, status: job.status, outputs, messages, next }))
}

async fn cancel(
    State(state): State<Arc<ApiState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<Accepted>, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    let job = owned_job(&state, &tenant, &id).await?;
    match state.jobs.cancel_job(&job.id, state.clock.now()).await? {
        Some(JobStatus::Cancelled) => {
            if !job.status.is_terminal() {
                // Counted once: a repeated cancel of a cancelled job lands here too.
                let age = Duration::from_micros((state.clock.now() - job.created_at).max(0) as u64);
                state.telemetry.job_finished(JobStatus::Cancelled, age);
            }
            tracing::info!(job = %job.id, tenant = %tenant, "job cancelled");
            Ok(Json(Accepted { id: job.id, status: JobStatus::Cancelled }))
        }
        Some(other) => Err(ApiError::NotReady(format!("job already {}; it cannot be cancelled", other.as_str()))),
        None => Err(ApiError::NotFound(format!("no job {id:?}"))),
    }
}

#[derive(Serialize)]
struct Headroom {
    requests_remaining: u64,
    tokens_remaining: u64,
    requests_per_minute: u64,
    tokens_per_minute: u64,
    ratio: f64,
    /// The burst, in seconds of refill, the router in this process admits
    /// with: the configured window, or less once 429s showed the
    /// provider's is shorter. Absent where no router runs (the AWS API).
    #[serde(skip_serializing_if = "Option::is_none")]
    burst_secs: Option<f64>,
}

#[derive(Serialize)]
struct OrgUsageView {
    org: OrgName,
    state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    out_of_rotation: Option<crate::engine::router::OutOfRotation>,
    /// This tenant's use of the org.
    #[serde(flatten)]
    counters: OrgCounters,
    /// The org's current headroom per model (pool-wide).
    headroom: BTreeMap<ModelName, Headroom>,
}

#[derive(Serialize)]
struct UsageReport {
    tenant: TenantId,
    /// What is left of the tenant's own limits, if it has any.
    #[serde(skip_serializing_if = "Option::is_none")]
    quota: Option<QuotaReport>,
    orgs: Vec<OrgUsageView>,
}

async fn usage(State(state): State<Arc<ApiState>>, headers: HeaderMap) -> Result<Json<UsageReport>, ApiError> {
    let tenant = authenticate(&state, &headers).await?;
    // Include what this process has not written yet.
    if let Err(e) = state.telemetry.flush(state.usage.as_ref()).await {
        tracing::warn!(error = %e, "usage flush failed; report may lag");
    }
    let mine: BTreeMap<OrgName, OrgCounters> = state.usage.usage(&tenant).await?.into_iter().collect();
    let statuses: BTreeMap<OrgName, OrgStatus> = state
        .org_status
        .as_ref()
        .map(|s| s.org_status().into_iter().map(|o| (o.org.clone(), o)).collect())
        .unwrap_or_default();
    let now = state.clock.now();
    let mut orgs = Vec::new();
    for org in &state.pool {
        let mut headroom = BTreeMap::new();
        for (model, params) in &org.models {
            let st = state.ledger.state(&BucketKey::new(&org.name, model)).await?;
            headroom.insert(
                model.clone(),
                Headroom {
                    requests_remaining: params.requests.remaining(st.requests_tat, now),
                    tokens_remaining: params.tokens.remaining(st.tokens_tat, now),
                    requests_per_minute: params.requests.limit,
                    tokens_per_minute: params.tokens.limit,
                    ratio: gcra::headroom(&st, params, now),
                    burst_secs: statuses.get(&org.name).and_then(|s| s.burst_secs.get(model).copied()),
                },
            );
        }
        let status = statuses.get(&org.name);
        orgs.push(OrgUsageView {
            org: org.name.clone(),
            state: status.map_or("unknown", |s| s.state),
            out_of_rotation: status.and_then(|s| s.out_of_rotation.clone()),
            counters: mine.get(&org.name).cloned().unwrap_or_default(),
            headroom,
        });
    }
    let limits = state.quotas.get(&tenant);
    let quota = if limits.is_limited() {
        let bucket = match limits.bucket_params() {
            Some(_) => state.ledger.state(&BucketKey::tenant(&tenant)).await?,
            None => Default::default(),
        };
        let in_flight = match limits.jobs_in_flight {
            Some(_) => state.jobs.jobs_in_flight(&tenant).await?,
            None => 0,
        };
        Some(limits.report(&bucket, now, in_flight))
    } else {
        None
    };
    Ok(Json(UsageReport { tenant, quota, orgs }))
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    match state.queue.stats().await {
        Ok(s) => state.telemetry.set_queue(s),
        Err(e) => tracing::warn!(error = %e, "queue stats unavailable for /metrics"),
    }
    ([(header::CONTENT_TYPE, "application/openmetrics-text; version=1.0.0; charset=utf-8")], state.telemetry.render())
        .into_response()
}

/// How long `/healthz` waits for the queue's depths.
const HEALTH_QUEUE_WAIT: Duration = Duration::from_secs(2);

/// 200 while the process serves: a load balancer's health check. The
/// queue's depths come along when the queue answers in time; a store or
/// queue outage shows as `"degraded"` and is not a failed check, since
/// replacing every process would not mend the store.
async fn healthz(State(state): State<Arc<ApiState>>) -> Json<serde_json::Value> {
    match tokio::time::timeout(HEALTH_QUEUE_WAIT, state.queue.stats()).await {
        Ok(Ok(q)) => Json(serde_json::json!({"status": "ok", "queue": q})),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "health check: queue unavailable");
            Json(serde_json::json!({"status": "degraded", "queue": null}))
        }
        Err(_) => Json(serde_json::json!({"status": "degraded", "queue": null})),
    }
}

/// Models served by the pool, for messages.
pub fn pool_models(pool: &[PoolOrg]) -> BTreeSet<ModelName> {
    pool.iter().flat_map(|o| o.models.keys().cloned()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_comparison_is_exact_for_equal_unequal_and_different_length_keys() {
        let key = "tenant-a-key-0123456789abcdef";
        assert!(keys_match(key, key));
        let copy = String::from(key);
        assert!(keys_match(key, &copy), "equal content at another address");
        assert!(!keys_match(key, "tenant-a-key-0123456789abcdeX"), "same length, last byte differs");
        assert!(!keys_match(key, "Xenant-a-key-0123456789abcdef"), "same length, first byte differs");
        assert!(!keys_match(key, &key[..key.len() - 1]), "a prefix");
        assert!(!keys_match(key, &format!("{key}0")), "an extension");
        assert!(!keys_match(key, ""));
        assert!(!keys_match("", key));
        assert!(keys_match("", ""), "the comparison itself; empty keys are refused at start");
        assert!(!keys_match(key, &key.to_uppercase()), "case matters");
    }

    #[test]
    fn authenticate_finds_the_tenant_of_a_bearer_key_and_nothing_else() {
        use crate::config::TenantKey;
        let tenants = vec![
            TenantKey {
                tenant: TenantId::parse("alpha").unwrap(),
                key: "alpha-key-0123456789abcdef".to_string().into(),
            },
            TenantKey {
                tenant: TenantId::parse("beta").unwrap(),
                key: "beta-key-0123456789abcdef0".to_string().into(),
            },
        ];
        let who = |auth: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::AUTHORIZATION, auth.parse().unwrap());
            authenticate_among(&tenants, &h).ok().map(|t| t.to_string())
        };
        assert_eq!(who("Bearer alpha-key-0123456789abcdef").as_deref(), Some("alpha"));
        assert_eq!(who("bearer beta-key-0123456789abcdef0").as_deref(), Some("beta"));
        assert_eq!(who("Bearer  beta-key-0123456789abcdef0 ").as_deref(), Some("beta"));
        assert_eq!(who("Bearer alpha-key-0123456789abcdeg"), None);
        assert_eq!(who("Basic alpha-key-0123456789abcdef"), None);
        assert_eq!(who("alpha-key-0123456789abcdef"), None);
        assert_eq!(who("Bearer "), None);
        assert!(authenticate_among(&tenants, &HeaderMap::new()).is_err());
    }
}
