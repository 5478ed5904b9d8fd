//! Routing one provider call over the pool of organizations.
//!
//! For a call of a given model the router takes, among the orgs that serve
//! it and are in rotation, the one with the most headroom (from the bucket
//! state cached from every ledger write), charges its quota in the ledger,
//! and sends the call. When no org has room it sleeps until the earliest one
//! will — never spinning, never failing the job for it. Admissions of one
//! model are serialized through a fair (FIFO) gate so that waiting callers
//! do not stampede the ledger when capacity returns: one ledger write per
//! admitted call.
//!
//! A tenant with a rate quota (calls per minute, tokens per day; see
//! [`super::quota`]) has its own bucket pair in the same ledger, charged
//! before the org's for every call attempt. When it is spent the call waits
//! until the GCRA says it fits, in a per-tenant FIFO gate taken before the
//! per-model one, so a throttled tenant holds back only its own calls.
//! The charge is not handed back when the call then goes unsent (cancelled,
//! or its gate shut): the tenant loses a call's worth of quota, it never
//! gets more than its limit.
//!
//! An org that answers 503 "Slow Down" has its admitted rate cut (see
//! [`RateFactor`]): the router charges its calls against limits scaled by
//! the factor, so the same ledger (whatever its backend) paces it slower,
//! and routing prefers the orgs with more headroom meanwhile.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::breaker::{Breaker, BreakerPolicy, RateFactor, SlowDownPolicy};
use super::quota::{QuotaKind, TenantQuota, TenantQuotas};
use crate::backoff::full_jitter;
use crate::domain::{Clock, Micros, ModelName, OrgName, TenantId, Usage};
use crate::provider::{ChatRequest, OrgEndpoint, ProviderClient, ProviderFailure, RateLimitHeaders};
use crate::storage::gcra::{self, BucketParams, BucketState, Cost, Rate};
use crate::storage::{Acquisition, BucketKey, CallEvent, CallOutcome, QuotaLedger, StorageError};
use crate::telemetry::{BreakerGauge, Telemetry};

/// Time between the ledger's charge and the provider's, allowed for in the
/// burst tolerance (see [`Rate::with_slack`]).
/// It covers the ledger write's round trip (a DynamoDB conditional write,
/// retried under contention) plus the request's way to the provider; a
/// second trims the burst by 1/60 and leaves the sustained rate untouched.
const TRANSIT_ALLOWANCE_US: i64 = 1_000_000;

/// One org as the router sees it.
#[derive(Debug, Clone)]
pub struct OrgSettings {
    pub endpoint: OrgEndpoint,
    /// Per model: the ledger's bucket parameters (limits less the safety margin).
    pub models: BTreeMap<ModelName, BucketParams>,
    /// The provider's own limits per model, used to read its headers.
    pub provider_limits: BTreeMap<ModelName, (u64, u64)>,
    pub chars_per_token: f64,
    pub header_sync: bool,
    /// Taken only by cheap steps, or after `Routing::fallback_after`.
    pub fallback: bool,
}

impl OrgSettings {
    /// An org whose ledger buckets are its provider limits (`(rpm, tpm)` per
    /// model) less `safety_margin`, with the provider's usual prompt
    /// estimate (4 characters a token), header sync on, and primary (not a
    /// fallback).
    pub fn new(endpoint: OrgEndpoint, provider_limits: BTreeMap<ModelName, (u64, u64)>, safety_margin: f64) -> Self {
        let keep = 1.0 - safety_margin;
        let scaled = |v: u64| ((v as f64 * keep).floor() as u64).max(1);
        let models = provider_limits
            .iter()
            .map(|(model, &(rpm, tpm))| {
                let params = BucketParams {
                    requests: Rate::per_minute(scaled(rpm)).with_slack(TRANSIT_ALLOWANCE_US),
                    tokens: Rate::per_minute(scaled(tpm)).with_slack(TRANSIT_ALLOWANCE_US),
                };
                (model.clone(), params)
            })
            .collect();
        Self { endpoint, models, provider_limits, chars_per_token: 4.0, header_sync: true, fallback: false }
    }
}

/// How the router retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Transient failures (5xx, timeout, dropped connection) one call may
    /// have before it is given up.
    pub max_transient_failures: u32,
    pub backoff_base: Duration,
    pub backoff_cap: Duration,
    pub breaker: BreakerPolicy,
    /// How long an org that answered `insufficient_quota` or refused its
    /// key stays out of rotation before it is tried again.
    pub out_of_rotation_for: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_transient_failures: 12,
            backoff_base: Duration::from_millis(200),
            backoff_cap: Duration::from_secs(20),
            breaker: BreakerPolicy::default(),
            out_of_rotation_for: Duration::from_secs(600),
        }
    }
}

/// Why an org is out of rotation.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct OutOfRotation {
    pub reason: String,
    pub until: Micros,
}

struct OrgState {
    settings: OrgSettings,
    breaker: Mutex<Breaker>,
    out: Mutex<Option<OutOfRotation>>,
    /// Last bucket state seen per model. TATs only grow, so a cached state
    /// is never more pessimistic than the stored one: skipping an org the
    /// cache calls full is safe.
    cache: Mutex<HashMap<ModelName, BucketState>>,
    /// Per model: the share of the configured rate admitted (503 Slow Down).
    /// Local to this process: each worker backs off on what it is told.
    rate: Mutex<HashMap<ModelName, RateFactor>>,
}

/// What the caller wants called.
#[derive(Clone)]
pub struct CallRequest {
    pub tenant: TenantId,
    pub chat: ChatRequest,
    /// Sent as `X-Client-Request-Id`: `{job}/{step}`.
    pub request_id: String,
    /// Asked before each attempt is sent, after its quota is charged.
    pub gate: Option<Arc<dyn SendGate>>,
    pub routing: Routing,
}

/// Which orgs a call may use: primary orgs, fallback orgs (`fallback =
/// true`, e.g. a self-hosted vLLM) or both.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Routing {
    /// A cheap step goes to the fallback orgs (to the primaries only if no
    /// fallback org serves its model).
    pub cheap: bool,
    /// A standard call waits this long for a primary org before fallback
    /// orgs may take it too.
    pub fallback_after: Duration,
}

impl Default for Routing {
    fn default() -> Self {
        Self { cheap: false, fallback_after: Duration::from_secs(30) }
    }
}

impl std::fmt::Debug for CallRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRequest")
            .field("tenant", &self.tenant)
            .field("chat", &self.chat)
            .field("request_id", &self.request_id)
            .field("gate", &self.gate.is_some())
            .field("routing", &self.routing)
            .finish()
    }
}

/// The caller's last word on an attempt, between charging its quota and
/// sending it. A job run uses it to hold calls while its lease renewal is
/// overdue: the lease may lapse and another worker make the same call.
#[async_trait::async_trait]
pub trait SendGate: Send + Sync {
    /// Returns once the attempt may be sent; false abandons the call
    /// (`CallError::Cancelled`).
    async fn ready(&self) -> bool;
}

#[derive(Debug, Clone)]
pub struct CallResult {
    pub content: String,
    pub usage: Usage,
    pub org: OrgName,
    pub attempts: u32,
    /// Time spent in provider calls (the rest of the step is our overhead).
    pub provider_time: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The provider refused the request itself; the step fails with this.
    #[error("{0}")]
    Request(String),
    /// Transient failures exceeded the retry budget.
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: String },
    /// No org can ever admit this call (cost above every org's limit, or
    /// no org serves the model).
    #[error("{0}")]
    Unroutable(String),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cancelled")]
    Cancelled,
}

/// Per-org status for `/v1/usage`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OrgStatus {
    pub org: OrgName,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_of_rotation: Option<OutOfRotation>,
}

pub struct Router {
    orgs: Vec<OrgState>,
    by_model: HashMap<ModelName, Vec<usize>>,
    gates: HashMap<ModelName, tokio::sync::Mutex<()>>,
    quotas: TenantQuotas,
    /// Per tenant with a rate quota, its FIFO admission gate (like `gates`:
    /// waiting calls take turns instead of stampeding the ledger).
    tenant_gates: HashMap<TenantId, tokio::sync::Mutex<()>>,
    ledger: Arc<dyn QuotaLedger>,
    client: ProviderClient,
    clock: Arc<dyn Clock>,
    telemetry: Arc<Telemetry>,
    policy: RetryPolicy,
    slow_down: SlowDownPolicy,
}

fn prompt_chars(chat: &ChatRequest) -> usize {
    chat.messages.iter().map(|m| m.content.chars().count()).sum()
}

/// The provider's reservation for a call: prompt estimated from its
/// character count, plus the whole `max_tokens`.
pub fn call_cost(chat: &ChatRequest, chars_per_token: f64) -> Cost {
    let prompt = (prompt_chars(chat) as f64 / chars_per_token).ceil() as u64;
    Cost { requests: 1, tokens: prompt + u64::from(chat.max_tokens) }
}

fn to_micros(d: Duration) -> i64 {
    d.as_micros().min(i64::MAX as u128) as i64
}

/// `params` with both limits scaled by `factor` (a slowed-down org): the
/// same burst window, a slower refill. Never scaled below what `cost`
/// needs, so a slowed org takes a call later, never refuses it for good.
pub fn scaled(params: &BucketParams, factor: f64, cost: Cost) -> BucketParams {
    if factor >= 1.0 {
        return *params;
    }
    let scale = |rate: Rate, n: u64| {
        // The smallest limit whose increment for `n` fits the tolerance.
        let needed = (u128::from(n) * rate.period_us.max(0) as u128).div_ceil(rate.tolerance_us.max(1) as u128);
        let cut = (rate.limit as f64 * factor.max(0.0)).ceil() as u64;
        Rate { limit: cut.max(needed.min(u128::from(u64::MAX)) as u64).min(rate.limit), ..rate }
    };
    BucketParams { requests: scale(params.requests, cost.requests), tokens: scale(params.tokens, cost.tokens) }
}

impl Router {
    pub fn new(
        orgs: Vec<OrgSettings>,
        ledger: Arc<dyn QuotaLedger>,
        client: ProviderClient,
        clock: Arc<dyn Clock>,
        telemetry: Arc<Telemetry>,
        policy: RetryPolicy,
    ) -> Self {
        let mut by_model: HashMap<ModelName, Vec<usize>> = HashMap::new();
        for (i, o) in orgs.iter().enumerate() {
            for m in o.models.keys() {
                by_model.entry(m.clone()).or_default().push(i);
            }
        }
        let gates = by_model.keys().map(|m| (m.clone(), tokio::sync::Mutex::new(()))).collect();
        let orgs = orgs
            .into_iter()
            .map(|settings| {
                telemetry.set_breaker(&settings.endpoint.name, BreakerGauge::Closed);
                telemetry.set_out_of_rotation(&settings.endpoint.name, false);
                for model in settings.models.keys() {
                    telemetry.set_rate_factor(&settings.endpoint.name, model, 1.0);
                }
                OrgState {
                    settings,
                    breaker: Mutex::new(Breaker::new(policy.breaker)),
                    out: Mutex::new(None),
                    cache: Mutex::new(HashMap::new()),
                    rate: Mutex::new(HashMap::new()),
                }
            })
            .collect();
        Self {
            orgs,
            by_model,
            gates,
            quotas: TenantQuotas::default(),
            tenant_gates: HashMap::new(),
            ledger,
            client,
            clock,
            telemetry,
            policy,
            slow_down: SlowDownPolicy::default(),
        }
    }

    /// The same router enforcing these tenants' rate quotas on every call
    /// (without, every tenant is unlimited).
    pub fn with_tenant_quotas(mut self, quotas: TenantQuotas) -> Self {
        self.tenant_gates = quotas
            .iter()
            .filter(|(_, q)| q.bucket_params().is_some())
            .map(|(t, _)| (t.clone(), tokio::sync::Mutex::new(())))
            .collect();
        self.quotas = quotas;
        self
    }

    /// The same router with another answer to 503 "Slow Down" (tests use a
    /// fast recovery; production keeps [`SlowDownPolicy::default`]).
    pub fn with_slow_down(mut self, policy: SlowDownPolicy) -> Self {
        self.slow_down = policy;
        self
    }

    pub fn serves(&self, model: &ModelName) -> bool {
        self.by_model.contains_key(model)
    }

    pub fn status(&self) -> Vec<OrgStatus> {
        let now = self.clock.now();
        self.orgs
            .iter()
            .map(|o| {
                let out = lock(&o.out).clone().filter(|x| x.until > now);
                let state = if out.is_some() {
                    "out_of_rotation"
                } else {
                    match lock(&o.breaker).gauge() {
                        BreakerGauge::Closed => "ok",
                        BreakerGauge::HalfOpen => "half_open",
                        BreakerGauge::Open => "breaker_open",
                    }
                };
                OrgStatus { org: o.settings.endpoint.name.clone(), state, out_of_rotation: out }
            })
            .collect()
    }

    /// Sends one call, routing and retrying as the module doc says.
    pub async fn call(&self, req: &CallRequest, cancel: &CancellationToken) -> Result<CallResult, CallError> {
        let mut attempts = 0u32;
        let mut transient = 0u32;
        let mut provider_time = Duration::ZERO;
        loop {
            let (idx, probe) = self.admit(req, cancel).await?;
            let org = &self.orgs[idx];
            let name = &org.settings.endpoint.name;
            // Hands the breaker's probe back if this call ends unanswered
            // (held by the gate, cancelled here, or the caller drops this
            // future).
            let probe = ProbeGuard(probe.then_some(&org.breaker));
            if let Some(gate) = &req.gate {
                let go = tokio::select! {
                    go = gate.ready() => go,
                    _ = cancel.cancelled() => false,
                };
                if !go {
                    return Err(CallError::Cancelled);
                }
            }
            attempts += 1;
            let sent_at = self.clock.now();
            let started = tokio::time::Instant::now();
            let answer = tokio::select! {
                a = self.client.chat(&org.settings.endpoint, &req.chat, &req.request_id) => a,
                _ = cancel.cancelled() => return Err(CallError::Cancelled),
            };
            probe.answered();
            let latency = started.elapsed();
            provider_time += latency;
            let event = |outcome, usage| CallEvent {
                tenant: req.tenant.clone(),
                org: name.clone(),
                model: req.chat.model.clone(),
                outcome,
                usage,
                latency,
            };
            match answer {
                Ok(ok) => {
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::Ok, ok.usage));
                    self.sync_headers(idx, &req.chat.model, &ok.limits, sent_at, None).await;
                    return Ok(CallResult {
                        content: ok.content,
                        usage: ok.usage,
                        org: name.clone(),
                        attempts,
                        provider_time,
                    });
                }
                Err(ProviderFailure::RateLimited { retry_after, limits, message }) => {
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::RateLimited, Usage::default()));
                    tracing::info!(org = %name, model = %req.chat.model, %message, "rate limited by provider; re-routing");
                    self.sync_headers(
                        idx,
                        &req.chat.model,
                        &limits,
                        sent_at,
                        Some(retry_after.unwrap_or(Duration::from_secs(1))),
                    )
                    .await;
                }
                Err(ProviderFailure::SlowDown { retry_after, limits, message }) => {
                    // Healthy (it answered), but asking for fewer requests:
                    // the lowered rate is the backoff, and the call goes to
                    // whichever org now has the most headroom. Not counted
                    // against the transient budget, like a 429: the rate cut
                    // bounds how often this org is asked again.
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::ServerError, Usage::default()));
                    self.slowed_down(idx, &req.chat.model, &message);
                    self.sync_headers(idx, &req.chat.model, &limits, sent_at, retry_after).await;
                }
                Err(ProviderFailure::InsufficientQuota { message }) => {
                    // The org answered: healthy as far as the breaker goes
                    // (a half-open probe would otherwise wait forever).
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::InsufficientQuota, Usage::default()));
                    self.take_out(idx, format!("insufficient_quota: {message}"));
                }
                Err(ProviderFailure::Unauthorized { status, message }) => {
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::RequestError, Usage::default()));
                    self.take_out(idx, format!("credentials refused ({status}): {message}"));
                }
                Err(ProviderFailure::Request { status, message }) => {
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::RequestError, Usage::default()));
                    return Err(CallError::Request(format!("provider rejected the request ({status}): {message}")));
                }
                Err(failure) => {
                    let outcome = match failure {
                        ProviderFailure::Timeout => CallOutcome::Timeout,
                        ProviderFailure::Connection(_) => CallOutcome::ConnectionError,
                        _ => CallOutcome::ServerError,
                    };
                    self.telemetry.record_call(&event(outcome, Usage::default()));
                    let opened = lock(&org.breaker).on_failure(self.clock.now());
                    if let Some(g) = opened {
                        tracing::warn!(org = %name, "circuit breaker opened after repeated failures");
                        self.telemetry.set_breaker(name, g);
                    }
                    transient += 1;
                    if transient >= self.policy.max_transient_failures {
                        return Err(CallError::Exhausted { attempts, last: failure.to_string() });
                    }
                    let hint = match &failure {
                        ProviderFailure::Server { retry_after, .. } => *retry_after,
                        _ => None,
                    };
                    let wait = full_jitter(
                        transient - 1,
                        self.policy.backoff_base,
                        self.policy.backoff_cap,
                        rand::random::<f64>(),
                    )
                    .max(hint.unwrap_or_default().min(self.policy.backoff_cap));
                    tracing::debug!(org = %name, error = %failure, ?wait, "transient provider failure; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = cancel.cancelled() => return Err(CallError::Cancelled),
                    }
                }
            }
        }
    }

    fn breaker_success(&self, org: &OrgState) {
        if let Some(g) = lock(&org.breaker).on_success() {
            tracing::info!(org = %org.settings.endpoint.name, "circuit breaker closed");
            self.telemetry.set_breaker(&org.settings.endpoint.name, g);
        }
    }

    /// Cuts the admitted rate of (org, model) after a 503 "Slow Down".
    fn slowed_down(&self, idx: usize, model: &ModelName, message: &str) {
        let org = &self.orgs[idx];
        let now = self.clock.now();
        let cut =
            lock(&org.rate).entry(model.clone()).or_insert_with(|| RateFactor::new(self.slow_down)).on_slow_down(now);
        if let Some(factor) = cut {
            tracing::warn!(
                org = %org.settings.endpoint.name, model = %model, factor, %message,
                "provider asked to slow down; admitted rate cut"
            );
            self.telemetry.set_rate_factor(&org.settings.endpoint.name, model, factor);
        }
    }

    /// The current rate factor of (org, model), refreshing its gauge.
    fn rate_factor(&self, idx: usize, model: &ModelName, now: Micros) -> f64 {
        let org = &self.orgs[idx];
        let mut rates = lock(&org.rate);
        let Some(rate) = rates.get_mut(model) else { return 1.0 };
        let factor = rate.get(now);
        if rate.take_restored(now) {
            tracing::info!(org = %org.settings.endpoint.name, model = %model, "admitted rate back to the full limit after a slow-down");
        }
        self.telemetry.set_rate_factor(&org.settings.endpoint.name, model, factor);
        factor
    }

    fn take_out(&self, idx: usize, reason: String) {
        let org = &self.orgs[idx];
        let until = self.clock.now() + to_micros(self.policy.out_of_rotation_for);
        tracing::error!(org = %org.settings.endpoint.name, %reason, "org taken out of rotation");
        *lock(&org.out) = Some(OutOfRotation { reason, until });
        self.telemetry.set_out_of_rotation(&org.settings.endpoint.name, true);
    }

    /// Waits for and charges capacity on the best org; returns its index
    /// and whether the call is that org's half-open breaker probe.
    async fn admit(&self, req: &CallRequest, cancel: &CancellationToken) -> Result<(usize, bool), CallError> {
        let model = &req.chat.model;
        let (Some(candidates), Some(gate)) = (self.by_model.get(model), self.gates.get(model)) else {
            return Err(CallError::Unroutable(format!("no configured org serves model {model}")));
        };
        self.charge_tenant(req, candidates, cancel).await?;
        let _turn = tokio::select! {
            g = gate.lock() => g,
            _ = cancel.cancelled() => return Err(CallError::Cancelled),
        };
        let is_fallback = |i: usize| self.orgs[i].settings.fallback;
        let has_fallback = candidates.iter().any(|&i| is_fallback(i));
        let has_primary = candidates.iter().any(|&i| !is_fallback(i));
        let cheap = req.routing.cheap && has_fallback;
        let started = self.clock.now();
        let opens_at =
            started.saturating_add(i64::try_from(req.routing.fallback_after.as_micros()).unwrap_or(i64::MAX));
        let mut forced_open = false;
        loop {
            let now = self.clock.now();
            // Cheap calls use the fallback orgs only; the rest the
            // primaries, and the fallbacks too once they waited long enough
            // (or no primary can ever take the call, or none serves it).
            let fallback_open = cheap || !has_primary || forced_open || now >= opens_at;
            let usable = |i: usize| if is_fallback(i) { fallback_open } else { !cheap };
            let considered = candidates.iter().filter(|&&i| usable(i)).count();
            // (headroom, index, cost, cached state) of every org that may take a call now.
            let mut ready = Vec::new();
            let mut wake_at: Option<Micros> = if fallback_open || !has_fallback { None } else { Some(opens_at) };
            let mut never = 0usize;
            for &i in candidates.iter().filter(|&&i| usable(i)) {
                let org = &self.orgs[i];
                // One guard for the check and the reset: a guard taken in an
                // `if let` scrutinee lives through its body, so locking again
                // there would deadlock the first admission after the time out.
                let mut out = lock(&org.out);
                if let Some(o) = out.as_ref() {
                    if o.until > now {
                        wake_at = min_opt(wake_at, o.until);
                        continue;
                    }
                    *out = None;
                    self.telemetry.set_out_of_rotation(&org.settings.endpoint.name, false);
                }
                drop(out);
                if let Some(until) = lock(&org.breaker).blocked_until(now) {
                    wake_at = min_opt(wake_at, until);
                    continue;
                }
                let Some(params) = org.settings.models.get(model) else { continue };
                let cost = call_cost(&req.chat, org.settings.chars_per_token);
                let params = scaled(params, self.rate_factor(i, model, now), cost);
                let cached = lock(&org.cache).get(model).copied().unwrap_or_default();
                match gcra::available_at(&cached, &params, cost, now) {
                    None => never += 1,
                    Some(at) if at > now => wake_at = min_opt(wake_at, at),
                    Some(_) => ready.push((gcra::headroom(&cached, &params, now), i, cost, params)),
                }
            }
            if never == considered && has_fallback && !fallback_open {
                forced_open = true;
                continue;
            }
            if never == considered {
                return Err(CallError::Unroutable(format!(
                    "a call of this size exceeds the per-minute limits of every org serving {model}"
                )));
            }
            ready.sort_by(|a, b| b.0.total_cmp(&a.0));
            for (_, i, cost, params) in ready {
                let org = &self.orgs[i];
                let key = BucketKey::new(&org.settings.endpoint.name, model);
                // Dated as late as possible: the provider charges on arrival.
                let now = self.clock.now();
                match self.ledger.acquire(&key, &params, cost, now).await? {
                    Acquisition::Granted(state) => {
                        self.telemetry.ledger_op("acquire");
                        self.remember(i, model, state, &params, now);
                        let probe = lock(&org.breaker).on_dispatch();
                        return Ok((i, probe));
                    }
                    Acquisition::Denied { retry_at, state } => {
                        self.telemetry.ledger_op("denied");
                        self.remember(i, model, state, &params, now);
                        wake_at = min_opt(wake_at, retry_at);
                    }
                    Acquisition::Never => {}
                }
            }
            // Nothing free: sleep until the earliest capacity. Out-of-rotation
            // orgs are looked at again at least once a minute.
            let wait = wake_at.map_or(60_000_000, |t| (t - now).clamp(1_000, 60_000_000));
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_micros(wait as u64)) => {}
                _ = cancel.cancelled() => return Err(CallError::Cancelled),
            }
        }
    }

    /// Waits for and charges one call attempt to the tenant's own quota
    /// (nothing to do for a tenant without a rate quota). The charge is the
    /// largest reservation any org serving the model would make, so the
    /// tenant's tokens are counted the same wherever the call goes.
    async fn charge_tenant(
        &self,
        req: &CallRequest,
        candidates: &[usize],
        cancel: &CancellationToken,
    ) -> Result<(), CallError> {
        let quota = self.quotas.get(&req.tenant);
        let (Some(params), Some(gate)) = (quota.bucket_params(), self.tenant_gates.get(&req.tenant)) else {
            return Ok(());
        };
        let call = candidates
            .iter()
            .map(|&i| call_cost(&req.chat, self.orgs[i].settings.chars_per_token))
            .max_by_key(|c| c.tokens)
            .unwrap_or(Cost { requests: 1, tokens: 0 });
        let cost = quota.charge(call);
        let key = BucketKey::tenant(&req.tenant);
        let _turn = tokio::select! {
            g = gate.lock() => g,
            _ = cancel.cancelled() => return Err(CallError::Cancelled),
        };
        let mut counted = false;
        loop {
            let now = self.clock.now();
            let retry_at = match self.ledger.acquire(&key, &params, cost, now).await? {
                Acquisition::Granted(_) => {
                    self.telemetry.ledger_op("acquire");
                    return Ok(());
                }
                Acquisition::Denied { retry_at, state } => {
                    self.telemetry.ledger_op("denied");
                    if !counted {
                        counted = true;
                        let kind = denied_by(&quota, &params, state, cost, now);
                        self.telemetry.tenant_quota_wait(&req.tenant, kind.as_str());
                        tracing::debug!(tenant = %req.tenant, quota = kind.as_str(), "call held by the tenant's quota");
                    }
                    retry_at
                }
                Acquisition::Never => {
                    return Err(CallError::Unroutable(format!(
                        "a call of this size ({} tokens) exceeds tenant {}'s whole tokens_per_day quota",
                        cost.tokens, req.tenant
                    )));
                }
            };
            let wait = (retry_at - now).clamp(1_000, 60_000_000);
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_micros(wait as u64)) => {}
                _ = cancel.cancelled() => return Err(CallError::Cancelled),
            }
        }
    }

    fn remember(&self, idx: usize, model: &ModelName, state: BucketState, params: &BucketParams, now: Micros) {
        let org = &self.orgs[idx];
        let mut cache = lock(&org.cache);
        let slot = cache.entry(model.clone()).or_default();
        *slot = gcra::raise(*slot, state);
        self.telemetry.set_headroom(&org.settings.endpoint.name, model, gcra::headroom(slot, params, now));
    }

    /// Moves the ledger to the provider's view when it shows less headroom.
    /// `sent_at` stands in for the provider's admission time: using it (not
    /// the time the answer arrived) never overstates the provider's usage.
    /// `blocked_for` (after a 429) keeps the org out until the provider's
    /// retry time even if its headers say nothing.
    async fn sync_headers(
        &self,
        idx: usize,
        model: &ModelName,
        h: &RateLimitHeaders,
        sent_at: Micros,
        blocked_for: Option<Duration>,
    ) {
        let org = &self.orgs[idx];
        if !org.settings.header_sync && blocked_for.is_none() {
            return;
        }
        let Some(params) = org.settings.models.get(model) else { return };
        let (prov_rpm, prov_tpm) =
            org.settings.provider_limits.get(model).copied().unwrap_or((params.requests.limit, params.tokens.limit));
        let mut floor = BucketState::default();
        if org.settings.header_sync {
            floor = provider_floor(params, h, prov_rpm, prov_tpm, sent_at);
        }
        if let Some(d) = blocked_for {
            // Available again (for one request) at now + retry-after.
            let again = self.clock.now() + to_micros(d);
            floor.requests_tat =
                floor.requests_tat.max(again + params.requests.tolerance() - params.requests.increment(1));
        }
        let cached = lock(&org.cache).get(model).copied().unwrap_or_default();
        // Write only when the provider is ahead by more than one request's
        // or a rounding's worth: the common case costs no ledger write.
        let slack_r = params.requests.increment(1);
        let slack_t = params.tokens.increment(params.tokens.limit / 1000 + 1);
        let ahead =
            floor.requests_tat > cached.requests_tat + slack_r || floor.tokens_tat > cached.tokens_tat + slack_t;
        if !ahead {
            return;
        }
        let key = BucketKey::new(&org.settings.endpoint.name, model);
        match self.ledger.raise(&key, floor).await {
            Ok(state) => {
                self.telemetry.ledger_op("raise");
                tracing::debug!(org = %org.settings.endpoint.name, model = %model, "ledger moved toward the provider's headers");
                self.remember(idx, model, state, params, self.clock.now());
            }
            Err(e) => {
                tracing::warn!(org = %org.settings.endpoint.name, error = %e, "could not sync the ledger to provider headers")
            }
        }
    }
}

/// The bucket state the provider's headers imply, at `at`.
pub fn provider_floor(
    params: &BucketParams,
    h: &RateLimitHeaders,
    prov_rpm: u64,
    prov_tpm: u64,
    at: Micros,
) -> BucketState {
    let tat = |rate: &Rate, limit: Option<u64>, default_limit: u64, remaining: Option<u64>, reset: Option<Duration>| {
        match (remaining, reset) {
            // Used = limit − remaining, with our own limit when the provider's
            // is lower (misconfigured, or its tier was cut): the ledger then
            // believes in no more than the provider says is left.
            (Some(rem), _) => rate.tat_for_remaining(limit.unwrap_or(default_limit).max(rate.limit), rem, at),
            (None, Some(reset)) => at + to_micros(reset),
            (None, None) => 0,
        }
    };
    BucketState {
        requests_tat: tat(&params.requests, h.limit_requests, prov_rpm, h.remaining_requests, h.reset_requests),
        tokens_tat: tat(&params.tokens, h.limit_tokens, prov_tpm, h.remaining_tokens, h.reset_tokens),
    }
}

/// The breaker of an org whose half-open probe is out, until the probe's
/// answer arrives ([`ProbeGuard::answered`]); dropped before that, it
/// releases the probe so the next call may probe instead.
struct ProbeGuard<'a>(Option<&'a Mutex<Breaker>>);

impl ProbeGuard<'_> {
    fn answered(mut self) {
        self.0 = None;
    }
}

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(breaker) = self.0 {
            lock(breaker).on_abandoned();
        }
    }
}

/// Which of a tenant's two limits refused `cost` at `now`.
fn denied_by(quota: &TenantQuota, params: &BucketParams, state: BucketState, cost: Cost, now: Micros) -> QuotaKind {
    let calls_only = Cost { tokens: 0, ..cost };
    let calls_fit = matches!(gcra::decide(state, params, calls_only, now), gcra::Decision::Allow(_));
    if quota.calls_per_minute.is_some() && !calls_fit { QuotaKind::CallsPerMinute } else { QuotaKind::TokensPerDay }
}

fn min_opt(a: Option<Micros>, b: Micros) -> Option<Micros> {
    Some(a.map_or(b, |a| a.min(b)))
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::ChatMessage;

    #[test]
    fn cost_is_prompt_estimate_plus_max_tokens() {
        let chat = ChatRequest {
            model: ModelName::parse("m").unwrap(),
            messages: vec![
                ChatMessage { role: "system".into(), content: "abcd".repeat(10) },
                ChatMessage { role: "user".into(), content: "x".repeat(3) },
            ],
            max_tokens: 100,
            temperature: 0.0,
        };
        // 43 characters / 4 → 11 tokens (rounded up) + 100.
        assert_eq!(call_cost(&chat, 4.0), Cost { requests: 1, tokens: 111 });
    }

    #[test]
    fn provider_floor_reads_remaining_in_our_units() {
        let p = BucketParams { requests: Rate::per_minute(60), tokens: Rate::per_minute(6_000) };
        let h = RateLimitHeaders { remaining_requests: Some(30), remaining_tokens: Some(1_500), ..Default::default() };
        let f = provider_floor(&p, &h, 60, 6_000, 0);
        assert_eq!(p.requests.remaining(f.requests_tat, 0), 30);
        assert_eq!(p.tokens.remaining(f.tokens_tat, 0), 1_500);
        // Reset only: the bucket is full again at `at + reset`.
        let h = RateLimitHeaders { reset_tokens: Some(Duration::from_secs(6)), ..Default::default() };
        assert_eq!(provider_floor(&p, &h, 60, 6_000, 10).tokens_tat, 10 + 6_000_000);
        assert_eq!(provider_floor(&p, &RateLimitHeaders::default(), 60, 6_000, 10), BucketState::default());
        // The provider's limit is below ours: what it has left is all we may use.
        let h = RateLimitHeaders { limit_requests: Some(3), remaining_requests: Some(2), ..Default::default() };
        assert_eq!(p.requests.remaining(provider_floor(&p, &h, 3, 6_000, 0).requests_tat, 0), 2);
    }

    #[test]
    fn a_slowed_org_is_paced_at_the_factor_and_still_takes_every_call() {
        let p = BucketParams {
            requests: Rate::per_minute(600).with_slack(TRANSIT_ALLOWANCE_US),
            tokens: Rate::per_minute(60_000).with_slack(TRANSIT_ALLOWANCE_US),
        };
        let call = Cost { requests: 1, tokens: 50 };
        assert_eq!(scaled(&p, 1.0, call), p);
        let half = scaled(&p, 0.5, call);
        assert_eq!((half.requests.limit, half.tokens.limit), (300, 30_000));
        assert_eq!(half.requests.tolerance_us, p.requests.tolerance_us, "same burst window");
        // A call the full rate admits stays admissible at any factor.
        let big = Cost { requests: 1, tokens: 50_000 };
        let tiny = scaled(&p, 0.01, big);
        assert!(tiny.tokens.limit < p.tokens.limit);
        assert!(gcra::available_at(&BucketState::default(), &tiny, big, 0).is_some());

        // Saturating demand, one attempt every 10 ms of injected time, from
        // a bucket already at the steady state: a minute admits the factor's
        // share of the rate (± one call of rounding).
        let admitted = |factor: f64| {
            let clock = crate::domain::ManualClock::new(1_000_000_000);
            let start = clock.now();
            let mut st = BucketState { requests_tat: start + p.requests.tolerance(), tokens_tat: 0 };
            let mut n = 0u64;
            while clock.now() < start + gcra::MINUTE_US {
                if let gcra::Decision::Allow(next) = gcra::decide(st, &scaled(&p, factor, call), call, clock.now()) {
                    st = next;
                    n += 1;
                }
                clock.advance(Duration::from_millis(10));
            }
            n
        };
        assert!(admitted(1.0).abs_diff(600) <= 1, "{}", admitted(1.0));
        assert!(admitted(0.5).abs_diff(300) <= 1, "{}", admitted(0.5));
        assert!(admitted(0.1).abs_diff(60) <= 1, "{}", admitted(0.1));
    }
}
