//! Routing one provider call over the pool of organizations.
//!
//! For a call of a given model the router takes, among the orgs that serve
//! it and are in rotation, the one with the most headroom (from the bucket
//! state cached from every ledger write), charges its quota in the ledger,
//! and sends the call. When no org has room it sleeps until the earliest one
//! will — never spinning; a job step fails for it only at the job's
//! deadline, or after `RetryPolicy::max_rate_limited` provider 429s (a
//! limit that does not clear). Admissions of one model take turns through a
//! FIFO gate held to decide and charge, not while sleeping: waiting callers
//! do not stampede the ledger when capacity returns (the first to wake
//! charges, the rest see its charge in the cache), and one long wait does
//! not hold back calls that fit now.
//!
//! A caller's send gate (a job's lease) is asked before the charge, and the
//! call is sent right after it: a charge is dated for the provider's
//! arrival within the ledger's transit allowance.
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
//!
//! A 429 the ledger did not predict (it granted the call, and neither the
//! provider's headers nor a slow-down explained the refusal) shows that the
//! provider enforces a shorter window than the burst: the (org, model)'s
//! burst is cut, and grows back while calls succeed (see [`burst`]).

mod admit;
mod burst;
mod request;
mod settings;
mod sync;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use tokio_util::sync::CancellationToken;

use super::breaker::{Breaker, RateFactor, SlowDownPolicy};
use super::quota::TenantQuotas;
use super::window::{BurstPolicy, BurstWindow};
use crate::backoff::full_jitter;
use crate::domain::{Clock, Micros, ModelName, OrgName, TenantId, Usage};
use crate::provider::{Answer, Opened, ProviderClient, ProviderFailure, RateLimitHeaders};
use crate::storage::gcra::{BucketState, Cost, Rate};
use crate::storage::{CallEvent, CallOutcome, QuotaLedger};
use crate::telemetry::{BreakerGauge, Telemetry};
pub use admit::scaled;
pub use request::{CallError, CallRecord, CallRequest, CallResult, OpenCall, Routing, SendGate};
pub use settings::{OrgSettings, RetryPolicy};
pub use sync::provider_floor;

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
    /// Per model: the burst learned from 429s (absent: the configured one).
    /// Local to this process, like `rate`.
    burst: Mutex<HashMap<ModelName, BurstWindow>>,
}

/// Per-org status for `/v1/usage`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct OrgStatus {
    pub org: OrgName,
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub out_of_rotation: Option<OutOfRotation>,
    /// Per model: the burst, in seconds of refill, this process admits with
    /// (configured, or smaller once learned from 429s).
    pub burst_secs: BTreeMap<ModelName, f64>,
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
    burst_policy: BurstPolicy,
}

fn to_micros(d: Duration) -> i64 {
    d.as_micros().min(i64::MAX as u128) as i64
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
                    telemetry.set_burst(&settings.endpoint.name, model, settings.window.burst_secs as f64);
                }
                OrgState {
                    settings,
                    breaker: Mutex::new(Breaker::new(policy.breaker)),
                    out: Mutex::new(None),
                    cache: Mutex::new(HashMap::new()),
                    rate: Mutex::new(HashMap::new()),
                    burst: Mutex::new(HashMap::new()),
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
            burst_policy: BurstPolicy::default(),
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

    /// The same router with another way of learning bursts from 429s (a
    /// test turns learning off to show what it saves; production keeps
    /// [`BurstPolicy::default`]).
    pub fn with_burst_policy(mut self, policy: BurstPolicy) -> Self {
        self.burst_policy = policy;
        self
    }

    pub fn serves(&self, model: &ModelName) -> bool {
        self.by_model.contains_key(model)
    }

    /// The longest any org's call may take (its timeout): with a call's
    /// wait, how long a call can last at most.
    pub fn longest_timeout(&self) -> Duration {
        self.orgs.iter().map(|o| o.settings.endpoint.timeout).max().unwrap_or_default()
    }

    /// The pool's limits for `model` as OpenAI's `x-ratelimit-*` headers
    /// would state them: summed over the orgs serving it that are in
    /// rotation and whose breaker is not open, from the bucket states this
    /// process last saw (no ledger read). `reset` is when the last of them
    /// is full again. `None` if no org serves the model.
    pub fn pool_limits(&self, model: &ModelName) -> Option<RateLimitHeaders> {
        let candidates = self.by_model.get(model)?;
        let now = self.clock.now();
        let (mut requests, mut tokens) = (PoolTotal::default(), PoolTotal::default());
        for &i in candidates {
            let org = &self.orgs[i];
            let out = lock(&org.out).as_ref().is_some_and(|o| o.until > now);
            if out || lock(&org.breaker).gauge() == BreakerGauge::Open {
                continue;
            }
            let Some(params) = org.settings.models.get(model) else { continue };
            let params = self.windowed(i, model, params, Cost { requests: 0, tokens: 0 });
            let st = lock(&org.cache).get(model).copied().unwrap_or_default();
            requests.add(&params.requests, st.requests_tat, now);
            tokens.add(&params.tokens, st.tokens_tat, now);
        }
        Some(RateLimitHeaders {
            limit_requests: Some(requests.limit),
            limit_tokens: Some(tokens.limit),
            remaining_requests: Some(requests.remaining),
            remaining_tokens: Some(tokens.remaining),
            reset_requests: Some(Duration::from_micros(requests.reset_us)),
            reset_tokens: Some(Duration::from_micros(tokens.reset_us)),
        })
    }

    pub fn status(&self) -> Vec<OrgStatus> {
        let now = self.clock.now();
        self.orgs
            .iter()
            .enumerate()
            .map(|(i, o)| {
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
                OrgStatus {
                    org: o.settings.endpoint.name.clone(),
                    state,
                    out_of_rotation: out,
                    burst_secs: self.bursts(i),
                }
            })
            .collect()
    }

    /// Sends one call and reads its whole answer, routing and retrying as
    /// the module doc says.
    pub async fn call(&self, req: &CallRequest, cancel: &CancellationToken) -> Result<CallResult, CallError> {
        let done = self.attempts(req, cancel, Mode::Whole).await?;
        let Got::Whole(answer) = done.got else {
            return Err(CallError::Unroutable("internal: a whole answer was asked for".into()));
        };
        Ok(CallResult {
            body: answer.body,
            usage: answer.usage,
            org: done.org,
            attempts: done.attempts,
            provider_time: done.provider_time,
            waited: done.waited,
        })
    }

    /// Sends one call and returns once a successful answer's headers have
    /// arrived; its body (a stream) is the caller's to read. Failures before
    /// that are routed and retried as for [`Self::call`]; after it, the
    /// call belongs to the org that answered.
    pub async fn open(&self, req: &CallRequest, cancel: &CancellationToken) -> Result<OpenCall, CallError> {
        let done = self.attempts(req, cancel, Mode::Stream).await?;
        let Got::Stream(opened) = done.got else {
            return Err(CallError::Unroutable("internal: a stream was asked for".into()));
        };
        let (opened, record) = *opened;
        let read_timeout = self
            .orgs
            .iter()
            .find(|o| o.settings.endpoint.name == done.org)
            .map_or(Duration::ZERO, |o| o.settings.endpoint.timeout);
        Ok(OpenCall {
            response: opened.response,
            org: done.org,
            attempts: done.attempts,
            waited: done.waited,
            read_timeout,
            record,
        })
    }

    /// The attempt loop shared by [`Self::call`] and [`Self::open`].
    async fn attempts(&self, req: &CallRequest, cancel: &CancellationToken, mode: Mode) -> Result<Done, CallError> {
        let model = &req.request.model;
        let deadline = req.max_wait.map(|w| self.clock.now().saturating_add(to_micros(w)));
        let mut attempts = 0u32;
        let mut transient = 0u32;
        let mut rate_limited = 0u32;
        let mut provider_time = Duration::ZERO;
        let mut waited = Duration::ZERO;
        let mut last_failure: Option<String> = None;
        loop {
            let waiting = tokio::time::Instant::now();
            // The gate is asked before the charge: a charge is dated for
            // the provider's arrival, and one held for long at the gate
            // would be sent past the transit allowance (a 429 at the
            // provider, exactly when storage is slow).
            if let Some(gate) = &req.gate {
                let go = tokio::select! {
                    go = gate.ready() => go,
                    _ = cancel.cancelled() => false,
                };
                if !go {
                    return Err(CallError::Cancelled);
                }
            }
            let (idx, probe) = match self.admit(req, deadline, cancel).await {
                Ok(admitted) => admitted,
                // The orgs this call tried are failing: say what failed.
                Err(CallError::NoCapacity { .. } | CallError::Unavailable { .. }) if last_failure.is_some() => {
                    let last = last_failure.unwrap_or_default();
                    return Err(CallError::Exhausted { attempts, last });
                }
                Err(e) => return Err(e),
            };
            waited += waiting.elapsed();
            let org = &self.orgs[idx];
            let name = &org.settings.endpoint.name;
            // Hands the breaker's probe back if this call ends unanswered
            // (held by the gate, cancelled here, or the caller drops this
            // future).
            let probe = ProbeGuard(probe.then_some(&org.breaker));
            // The gate shut while admission waited: the charge is given up
            // (spent capacity, never more than the limit) rather than sent
            // late; the call waits at the gate and is charged again.
            if let Some(gate) = &req.gate
                && gate.ready().now_or_never() != Some(true)
            {
                tracing::debug!(org = %org.settings.endpoint.name, "send gate shut after the charge; charging again once it opens");
                continue;
            }
            attempts += 1;
            let sent_at = self.clock.now();
            let started = tokio::time::Instant::now();
            let endpoint = &org.settings.endpoint;
            let answer = tokio::select! {
                a = async {
                    match mode {
                        Mode::Whole => self.client.call(endpoint, &req.request, &req.request_id).await.map(Answered::Whole),
                        Mode::Stream => self.client.open(endpoint, &req.request, &req.request_id).await.map(Answered::Stream),
                    }
                } => a,
                _ = cancel.cancelled() => return Err(CallError::Cancelled),
            };
            probe.answered();
            let latency = started.elapsed();
            provider_time += latency;
            let event = |outcome, usage| CallEvent {
                tenant: req.tenant.clone(),
                org: name.clone(),
                model: model.clone(),
                outcome,
                usage,
                latency,
            };
            let failure = match answer {
                Ok(answered) => {
                    self.breaker_success(org);
                    let got = match answered {
                        Answered::Whole(answer) => {
                            self.telemetry.record_call(&event(CallOutcome::Ok, answer.usage));
                            self.learn_from_success(idx, model, sent_at, &answer.limits);
                            self.sync_headers(idx, model, &answer.limits, sent_at, None).await;
                            Got::Whole(answer)
                        }
                        Answered::Stream(opened) => {
                            self.learn_from_success(idx, model, sent_at, &opened.limits);
                            self.sync_headers(idx, model, &opened.limits, sent_at, None).await;
                            let record = CallRecord::new(
                                self.telemetry.clone(),
                                event(CallOutcome::Ok, Usage::default()),
                                started,
                            );
                            Got::Stream(Box::new((opened, record)))
                        }
                    };
                    return Ok(Done { got, org: name.clone(), attempts, provider_time, waited });
                }
                Err(failure) => failure,
            };
            match failure {
                ProviderFailure::RateLimited { retry_after, limits, message } => {
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::RateLimited, Usage::default()));
                    tracing::info!(org = %name, model = %model, %message, "rate limited by provider; re-routing");
                    rate_limited += 1;
                    if rate_limited >= self.policy.max_rate_limited {
                        tracing::warn!(org = %name, model = %model, rate_limited, "a call met only rate limits; giving it up");
                        return Err(CallError::Exhausted {
                            attempts,
                            last: format!(
                                "{rate_limited} rate limits for one call (a limit that does not clear), the last from {name}: {message}"
                            ),
                        });
                    }
                    let blocked_for = retry_after.unwrap_or(Duration::from_secs(1));
                    // Before the sync, so the block is set with the cut burst.
                    let cost = req.request.cost(org.settings.chars_per_token);
                    self.learn_from_429(idx, model, cost, sent_at, &limits, blocked_for);
                    self.sync_headers(idx, model, &limits, sent_at, Some(blocked_for)).await;
                }
                ProviderFailure::SlowDown { retry_after, limits, message } => {
                    // Healthy (it answered), but asking for fewer requests:
                    // the lowered rate is the backoff, and the call goes to
                    // whichever org now has the most headroom. Not counted
                    // against the transient budget, like a 429: the rate cut
                    // bounds how often this org is asked again.
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::ServerError, Usage::default()));
                    self.slowed_down(idx, model, &message);
                    self.sync_headers(idx, model, &limits, sent_at, retry_after).await;
                }
                ProviderFailure::InsufficientQuota { message } => {
                    // The org answered: healthy as far as the breaker goes
                    // (a half-open probe would otherwise wait forever).
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::InsufficientQuota, Usage::default()));
                    self.take_out(idx, format!("insufficient_quota: {message}"));
                }
                ProviderFailure::Unauthorized { status, message } => {
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::RequestError, Usage::default()));
                    self.take_out(idx, format!("credentials refused ({status}): {message}"));
                }
                ProviderFailure::Request { status, message, body } => {
                    self.breaker_success(org);
                    self.telemetry.record_call(&event(CallOutcome::RequestError, Usage::default()));
                    return Err(CallError::Request { status, message, body });
                }
                failure => {
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
                    last_failure = Some(format!("{name}: {failure}"));
                    let exhausted = || CallError::Exhausted { attempts, last: format!("{name}: {failure}") };
                    if transient >= self.policy.max_transient_failures {
                        return Err(exhausted());
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
                    if deadline.is_some_and(|d| self.clock.now().saturating_add(to_micros(wait)) > d) {
                        return Err(exhausted());
                    }
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
}

/// One kind of bucket (requests or tokens) summed over several orgs:
/// their limits, what is left, and the longest time until one is full.
#[derive(Default)]
struct PoolTotal {
    limit: u64,
    remaining: u64,
    reset_us: u64,
}

impl PoolTotal {
    fn add(&mut self, rate: &Rate, tat: Micros, now: Micros) {
        self.limit = self.limit.saturating_add(rate.limit);
        self.remaining = self.remaining.saturating_add(rate.remaining(tat, now));
        self.reset_us = self.reset_us.max((tat - now).max(0) as u64);
    }
}

/// Whether a call's answer is read whole or handed over as a stream.
#[derive(Debug, Clone, Copy)]
enum Mode {
    Whole,
    Stream,
}

/// One attempt's successful answer, as its mode asked.
enum Answered {
    Whole(Answer),
    Stream(Opened),
}

/// What a successful attempt leaves for the caller.
enum Got {
    Whole(Answer),
    Stream(Box<(Opened, CallRecord)>),
}

/// The end of a successful call.
struct Done {
    got: Got,
    org: OrgName,
    attempts: u32,
    provider_time: Duration,
    waited: Duration,
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

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
