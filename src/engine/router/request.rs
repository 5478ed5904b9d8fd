//! What a caller asks the router for, and what it gets back.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::domain::{Micros, ModelName, OrgName, TenantId, Usage};
use crate::provider::ProviderRequest;
use crate::storage::{CallEvent, CallOutcome, StorageError};
use crate::telemetry::Telemetry;

/// What the caller wants called.
#[derive(Clone)]
pub struct CallRequest {
    pub tenant: TenantId,
    pub request: ProviderRequest,
    /// Sent as `X-Client-Request-Id`: `{job}/{step}` for a job step.
    pub request_id: String,
    /// Asked before each attempt is sent, after its quota is charged.
    pub gate: Option<Arc<dyn SendGate>>,
    /// When the tenant's own rate quota has no room, answer
    /// [`CallError::TenantQuotaSpent`] at once instead of waiting: a job
    /// step, whose job is then handed back to the queue until then, so a
    /// throttled tenant holds no worker slot. The calls endpoint waits.
    pub yield_to_tenant_quota: bool,
    pub routing: Routing,
    /// How long the call may wait for capacity (and back off between
    /// failed attempts). Past it no attempt starts: admission answers
    /// [`CallError::NoCapacity`] with when capacity returns, charging
    /// nothing, and a retry budget cut short answers
    /// [`CallError::Exhausted`]. So a call lasts at most this plus one
    /// provider timeout. `None` (job steps) waits as long as it takes.
    pub max_wait: Option<Duration>,
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
            .field("request", &self.request)
            .field("request_id", &self.request_id)
            .field("gate", &self.gate.is_some())
            .field("yield_to_tenant_quota", &self.yield_to_tenant_quota)
            .field("routing", &self.routing)
            .field("max_wait", &self.max_wait)
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

/// A call answered whole.
#[derive(Debug, Clone)]
pub struct CallResult {
    /// The provider's JSON body, as it sent it.
    pub body: Bytes,
    pub usage: Usage,
    pub org: OrgName,
    pub attempts: u32,
    /// Time spent in provider calls (the rest of the step is our overhead).
    pub provider_time: Duration,
    /// Time spent waiting for capacity, over all attempts.
    pub waited: Duration,
}

/// A call whose successful answer's headers have arrived and whose body
/// (a stream) is for the caller to read. The call is counted in the
/// metrics when [`CallRecord::finish`] is given its usage, or with none if
/// the record is dropped first (the client went away mid-stream).
#[derive(Debug)]
pub struct OpenCall {
    pub response: reqwest::Response,
    pub org: OrgName,
    pub attempts: u32,
    pub waited: Duration,
    /// The org's timeout: the longest the reader should wait for each
    /// next piece of the body.
    pub read_timeout: Duration,
    pub record: CallRecord,
}

/// The metrics event of a streamed call, waiting for its usage.
pub struct CallRecord {
    pub(super) telemetry: Arc<Telemetry>,
    pub(super) event: Option<CallEvent>,
    pub(super) started: tokio::time::Instant,
}

impl CallRecord {
    pub(super) fn new(telemetry: Arc<Telemetry>, event: CallEvent, started: tokio::time::Instant) -> Self {
        debug_assert_eq!(event.outcome, CallOutcome::Ok);
        Self { telemetry, event: Some(event), started }
    }

    /// A record of `event` started now, for tests of what reads streams.
    #[cfg(test)]
    pub fn for_tests(telemetry: Arc<Telemetry>, event: CallEvent) -> Self {
        Self::new(telemetry, event, tokio::time::Instant::now())
    }

    /// Counts the call with the usage its stream reported.
    pub fn finish(mut self, usage: Usage) {
        self.record(usage);
    }

    fn record(&mut self, usage: Usage) {
        if let Some(mut event) = self.event.take() {
            event.usage = usage;
            event.latency = self.started.elapsed();
            self.telemetry.record_call(&event);
        }
    }
}

impl std::fmt::Debug for CallRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CallRecord").field("event", &self.event).finish()
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        self.record(Usage { calls: 1, ..Usage::default() });
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The provider refused the request itself (a 4xx other than a rate
    /// limit): the step fails with this; the OpenAI endpoint answers with
    /// the provider's status and body.
    #[error("provider rejected the request ({status}): {message}")]
    Request { status: u16, message: String, body: Bytes },
    /// No capacity within the call's `max_wait`; nothing was charged.
    /// Capacity returns at `retry_at` (as far as the ledger knows).
    #[error("no capacity before the call's wait ran out")]
    NoCapacity { retry_at: Micros },
    /// No healthy org within the call's `max_wait`: every one serving the
    /// model has its breaker open or is out of rotation until `retry_at`.
    #[error("{reason}")]
    Unavailable { retry_at: Micros, reason: String },
    /// Transient failures, or provider rate limits, exceeded the retry
    /// budget (`RetryPolicy`).
    #[error("gave up after {attempts} attempts: {last}")]
    Exhausted { attempts: u32, last: String },
    /// No org serves the call's model.
    #[error("{0}")]
    Unroutable(String),
    /// The call reserves more tokens than any org serving its model (of
    /// those it may use) admits in a minute, so no org can ever take it;
    /// nothing was charged.
    #[error(
        "a call reserving {tokens} tokens exceeds the per-minute limit of every org serving {model} (the largest is {largest} tokens)"
    )]
    TooLarge { tokens: u64, largest: u64, model: ModelName },
    /// The tenant's own rate quota has no room until `retry_at`, and the
    /// call asked not to wait for it (`yield_to_tenant_quota`).
    #[error("the tenant's rate quota is spent until {retry_at}")]
    TenantQuotaSpent { retry_at: Micros },
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("cancelled")]
    Cancelled,
}
