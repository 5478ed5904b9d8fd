//! The storage roles the engine depends on, one trait each: the job queue,
//! the job store (records, step checkpoints, leases), the quota ledger, the
//! metrics sink, the response cache and the durable calls ([`calls`]).
//!
//! The engine sees only these traits. Backends live beside each other
//! (`crate::local` for one machine, `crate::aws` for production) and all pass
//! the same conformance suite in `tests/conformance/`.

pub mod calls;
pub mod faults;
pub mod gcra;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::answer::StepAnswer;
use crate::domain::{JobId, Micros, ModelName, OrgName, Priority, StepKey, TenantId, Usage};
pub use calls::{AnswerKind, CallClaim, CallStore, ClaimOutcome, RequestHash, StoredCall};
pub use gcra::{BucketParams, BucketState, Cost};

/// Errors a backend reports. The engine decides on the variant: a lost lease
/// stops the job run quietly, a backend error is retried, the rest fail.
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    /// The caller no longer holds the job's lease (it expired and another
    /// worker took it, or the job was cancelled or finished meanwhile).
    #[error("job lease lost")]
    LeaseLost,
    /// A queue receipt that no longer holds its message: its visibility
    /// timeout passed and the message was received again (or deferred), or
    /// it is not a receipt of this queue. Whoever holds the message now
    /// settles it.
    #[error("stale queue receipt")]
    StaleReceipt,
    /// An idempotency key was first used with a different request; nothing
    /// was written.
    #[error("idempotency key {key:?} was first used with a different request")]
    IdempotencyMismatch { key: String },
    /// The step already has a checkpoint; nothing was written. A retried
    /// write whose first response was lost lands here too.
    #[error("step {0} already has a checkpoint")]
    CheckpointExists(StepKey),
    /// `finish_job(Succeeded)` on a job with fewer steps checkpointed than
    /// its `steps_total`: nothing was written and the lease is still held.
    /// The run is not finished; the next one runs the missing steps.
    #[error("job has {done} of {total} steps checkpointed")]
    StepsMissing { done: u32, total: u32 },
    /// A record with this id is already stored. Ids are minted fresh, so
    /// this is a caller bug, never a client's.
    #[error("{0} already exists")]
    AlreadyExists(String),
    /// The record a write is about does not exist.
    #[error("{0} does not exist")]
    Missing(String),
    /// A record is larger than the backend stores.
    #[error("too large: {0}")]
    TooLarge(String),
    /// The backend itself failed (I/O, network). Retryable.
    #[error("storage backend error: {0}")]
    Backend(String),
    /// The backend refused the request for now (DynamoDB throughput
    /// exceeded or throttled); nothing was written. Retryable, after a
    /// backoff.
    #[error("storage throttled: {0}")]
    Throttled(String),
}

impl StorageError {
    /// Whether trying the same request again may succeed: the backend
    /// failed or throttled. A write whose answer was lost may have landed;
    /// its retry meets what the first one wrote (`CheckpointExists`, a
    /// ledger charged twice: never less than what was sent).
    pub fn is_transient(&self) -> bool {
        matches!(self, Self::Backend(_) | Self::Throttled(_))
    }
}

pub type StorageResult<T> = Result<T, StorageError>;

// ---------------------------------------------------------------- queue

/// What the queue carries: a pointer to the job record, never the spec.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueMessage {
    pub job_id: JobId,
    pub tenant: TenantId,
    pub priority: Priority,
}

/// One received message, invisible to other receivers until its visibility
/// timeout ends or it is deleted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    pub message: QueueMessage,
    /// Opaque handle for extend/delete (SQS receipt handle, SQLite row token).
    pub receipt: String,
    /// How many times this message has been received, this time included.
    pub receive_count: u32,
}

/// A message in the dead-letter queue, as an operator lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    pub message: QueueMessage,
    /// Receives before it was dead-lettered (on SQS, as far as it tells).
    pub receive_count: u32,
    /// When it was sent to the queue it is in now (SQS: its `SentTimestamp`,
    /// which for a message SQS's redrive moved is its first send).
    pub since: Micros,
}

/// Approximate queue depths, for metrics and scaling.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct QueueStats {
    pub visible: u64,
    pub in_flight: u64,
    pub dead: u64,
}

/// The receive loop of a queue that wakes `ready` when a message may have
/// become visible (a send, a hand-back): `look`s until one finds messages
/// or `wait` has passed, sleeping between looks until a wake-up or `poll`,
/// whichever comes first (messages whose visibility runs out, or that
/// another process sent unheard, signal nothing).
pub async fn receive_woken<F, Fut>(
    ready: &tokio::sync::Notify,
    wait: Duration,
    poll: Duration,
    mut look: F,
) -> StorageResult<Vec<Delivery>>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StorageResult<Vec<Delivery>>>,
{
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        // Registered before looking, so a send between the look and the
        // wait still wakes us (notify_waiters reaches every future that
        // exists, polled or not).
        let woken = ready.notified();
        let got = look().await?;
        if !got.is_empty() {
            return Ok(got);
        }
        let now = tokio::time::Instant::now();
        if now >= deadline {
            return Ok(got);
        }
        // Timing out is the fallback poll, not an error.
        let _ = tokio::time::timeout((deadline - now).min(poll), woken).await;
    }
}

#[async_trait]
pub trait JobQueue: Send + Sync + 'static {
    async fn send(&self, message: &QueueMessage) -> StorageResult<()>;
    /// Up to `max` messages, waiting up to `wait` for the first one. Each is
    /// hidden for the queue's visibility timeout and its receive count raised.
    async fn receive(&self, max: usize, wait: Duration) -> StorageResult<Vec<Delivery>>;
    /// Hides a received message for `timeout` from now (the heartbeat); a
    /// zero timeout hands it back at once.
    async fn extend(&self, receipt: &str, timeout: Duration) -> StorageResult<()>;
    /// Removes a received message for good.
    async fn delete(&self, receipt: &str) -> StorageResult<()>;
    /// Puts a received message back as if newly sent, visible after `delay`
    /// and with its receive count started again; the receipt is spent. For
    /// a job whose lease another worker still holds: that worker's receipt
    /// lapsed (its heartbeat came late), so this copy is the only handle on
    /// the message, and hiding it each time it comes round would count
    /// receives until the redrive dead-letters a healthy job.
    async fn defer(&self, delivery: &Delivery, delay: Duration) -> StorageResult<()>;
    /// Moves a received message to the dead-letter queue.
    async fn dead_letter(&self, delivery: &Delivery) -> StorageResult<()>;
    /// Messages in the dead-letter queue, oldest first (not removed).
    async fn dead_letters(&self, max: usize) -> StorageResult<Vec<DeadLetter>>;
    /// Moves the dead letters of `job` (every one if `None`) back to their
    /// work queue as new messages (receive count 0). Returns those moved.
    async fn redrive_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>>;
    /// Deletes the dead letters of `job` (every one if `None`). Returns
    /// those deleted.
    async fn remove_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>>;
    async fn stats(&self) -> StorageResult<QueueStats>;
}

// ---------------------------------------------------------------- jobs

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
        }
    }
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "running" => Self::Running,
            "succeeded" => Self::Succeeded,
            "failed" => Self::Failed,
            "cancelled" => Self::Cancelled,
            _ => return None,
        })
    }
}

/// A job as submitted, before it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewJob {
    pub id: JobId,
    pub tenant: TenantId,
    pub name: String,
    pub priority: Priority,
    /// The validated spec, serialized; the worker parses it again.
    pub spec_json: String,
    pub steps_total: u32,
    /// `(key, hash of the request body)`: a second submission with the same
    /// key returns the first job; with a different body it is a conflict.
    pub idempotency: Option<(String, String)>,
    pub created_at: Micros,
    /// The tenant's `jobs_in_flight` quota: the job is refused
    /// ([`CreateOutcome::InFlightLimit`]) if the tenant already has this
    /// many jobs queued or running.
    pub in_flight_limit: Option<u64>,
}

impl NewJob {
    /// The record a backend stores for it, as `create_job` returns it.
    pub fn queued_record(&self) -> JobRecord {
        JobRecord {
            id: self.id.clone(),
            tenant: self.tenant.clone(),
            name: self.name.clone(),
            priority: self.priority,
            status: JobStatus::Queued,
            spec_json: self.spec_json.clone(),
            steps_total: self.steps_total,
            steps_done: 0,
            usage: Usage::default(),
            error: None,
            created_at: self.created_at,
            updated_at: self.created_at,
            finished_at: None,
            lease_owner: None,
            lease_expires_at: None,
            stalled_runs: 0,
        }
    }
}

/// A job as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: JobId,
    pub tenant: TenantId,
    pub name: String,
    pub priority: Priority,
    pub status: JobStatus,
    pub spec_json: String,
    pub steps_total: u32,
    pub steps_done: u32,
    pub usage: Usage,
    pub error: Option<String>,
    pub created_at: Micros,
    pub updated_at: Micros,
    pub finished_at: Option<Micros>,
    /// Current lease holder and expiry, if any.
    pub lease_owner: Option<String>,
    pub lease_expires_at: Option<Micros>,
    /// Lease acquisitions since the last checkpoint, less the runs that
    /// released their lease (handed back). A job whose runs keep
    /// ending without progress (it takes its worker down) is poison; one
    /// that made progress between crashes is merely unlucky. Counting this
    /// rather than queue receives keeps the two apart.
    pub stalled_runs: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CreateOutcome {
    Created(JobRecord),
    /// The idempotency key was seen before with the same request.
    Existing(JobRecord),
    /// Not stored: the tenant already has `NewJob::in_flight_limit` jobs
    /// queued or running.
    InFlightLimit {
        in_flight: u64,
    },
}

/// Proof of holding a job: every checkpoint and the final status write are
/// conditional on it. `epoch` grows on every acquisition, so a worker whose
/// lease lapsed and was taken over cannot write even if its owner string
/// happens to repeat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub job_id: JobId,
    pub owner: String,
    pub epoch: u64,
    pub expires_at: Micros,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LeaseOutcome {
    Acquired(Lease),
    /// Another worker holds an unexpired lease.
    Held {
        owner: String,
        expires_at: Micros,
    },
    /// Nothing left to run.
    Finished(JobStatus),
    /// No such job.
    Missing,
}

/// One finished step (or fan-out instance), written before anything that
/// depends on it runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    pub step: StepKey,
    /// The whole assistant message of every choice. Backends store choice
    /// 0's text and the rest apart ([`StepAnswer::split`]); a checkpoint
    /// written before the rest was kept reads as that text alone.
    pub answer: StepAnswer,
    pub usage: Usage,
    pub org: OrgName,
    pub model: ModelName,
    /// Provider calls made for this step, retries included.
    pub attempts: u32,
    pub started_at: Micros,
    pub finished_at: Micros,
}

impl Checkpoint {
    /// Choice 0's text: what `{{steps.ID.output}}` and the result's
    /// `outputs` show.
    pub fn output(&self) -> &str {
        self.answer.output()
    }

    /// What its answer takes in a store: choice 0's text and the rest.
    pub fn answer_bytes(&self) -> u64 {
        let (text, rest) = self.answer.split();
        (text.len() + rest.len()) as u64
    }
}

/// Which checkpoints a page holds: those after the step `after` (from the
/// first when `None`), at most `max_steps` of them and as many as fit in
/// `max_bytes` of stored answers, but always at least one, so a step
/// larger than a page still comes out (alone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageRequest {
    pub after: Option<StepKey>,
    pub max_steps: usize,
    pub max_bytes: u64,
}

impl PageRequest {
    /// The page's range in `steps` (step and stored size, in order) and
    /// the step to continue after when more follow; `None` when `after`
    /// is not in `steps`.
    pub fn window<'a>(&self, steps: &[(&'a StepKey, u64)]) -> Option<(std::ops::Range<usize>, Option<&'a StepKey>)> {
        let start = match &self.after {
            None => 0,
            Some(a) => steps.iter().position(|(k, _)| *k == a)? + 1,
        };
        let mut end = start;
        let mut bytes = 0u64;
        while end < steps.len() && end - start < self.max_steps.max(1) {
            bytes = bytes.saturating_add(steps[end].1);
            if bytes > self.max_bytes && end > start {
                break;
            }
            end += 1;
        }
        let next = (end < steps.len() && end > start).then(|| steps[end - 1].0);
        Some((start..end, next))
    }
}

/// A page of a job's checkpoints.
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointPage {
    pub checkpoints: Vec<Checkpoint>,
    /// The last step of this page, when more follow: the next page's `after`.
    pub next: Option<StepKey>,
}

/// How a leased run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobOutcome {
    Succeeded,
    Failed(String),
}

/// Every job store keeps, per tenant, a count of its jobs in flight
/// (queued or running): raised by `create_job` in the same atomic write as
/// the job itself (conditional on `NewJob::in_flight_limit`), lowered by
/// the one write that moves a job to a final status (`finish_job`,
/// `cancel_job`, `fail_unleased`), so each job is counted out exactly once.
#[async_trait]
pub trait JobStore: Send + Sync + 'static {
    /// Stores a new job in `queued`, or returns the job an earlier request
    /// with the same idempotency key created (`IdempotencyMismatch` if its body differs;
    /// a replay is never refused for the in-flight limit).
    async fn create_job(&self, job: &NewJob) -> StorageResult<CreateOutcome>;
    /// The job an earlier request with idempotency key `key` created, if
    /// any, creating nothing: what a retry of that request is answered
    /// with when a new job would be refused. `IdempotencyMismatch` if its body's
    /// `hash` differs, as in `create_job`.
    async fn replay(&self, tenant: &TenantId, key: &str, hash: &str) -> StorageResult<Option<JobRecord>>;
    /// The tenant's jobs queued or running, as counted (see the trait doc).
    async fn jobs_in_flight(&self, tenant: &TenantId) -> StorageResult<u64>;
    async fn get_job(&self, id: &JobId) -> StorageResult<Option<JobRecord>>;
    /// Takes the job for `owner` until `now + ttl` if it is unleased or its
    /// lease expired, moving it to `running` and adding one to
    /// `stalled_runs` (which `put_checkpoint` resets to 0).
    async fn acquire_lease(&self, id: &JobId, owner: &str, ttl: Duration, now: Micros) -> StorageResult<LeaseOutcome>;
    /// Extends a held lease; `LeaseLost` if another epoch took it or the job
    /// is no longer running (cancelled). Returns the new lease.
    async fn renew_lease(&self, lease: &Lease, ttl: Duration, now: Micros) -> StorageResult<Lease>;
    /// Gives the lease up without finishing the job (shutdown hand-back, a
    /// run interrupted by storage), taking the run back off `stalled_runs`
    /// (never below 0) in the same write: only runs that end by crashing
    /// count towards poison. A lease no longer held is left alone.
    async fn release_lease(&self, lease: &Lease) -> StorageResult<()>;
    /// Writes one step's checkpoint and adds it to the job's progress and
    /// usage, only if `lease` is held and unexpired at `now` (else
    /// `LeaseLost`). Writing a step that already has a checkpoint is
    /// `CheckpointExists` and changes nothing.
    async fn put_checkpoint(&self, lease: &Lease, checkpoint: &Checkpoint, now: Micros) -> StorageResult<()>;
    async fn checkpoints(&self, id: &JobId) -> StorageResult<Vec<Checkpoint>>;
    /// One page of [`Self::checkpoints`], in the same order: see
    /// [`PageRequest`]. `None` when `after` is not one of the job's steps.
    /// This default reads every checkpoint; a backend whose answers cost a
    /// read each (DynamoDB's in S3) reads only the page's.
    async fn checkpoint_page(&self, id: &JobId, page: &PageRequest) -> StorageResult<Option<CheckpointPage>> {
        let mut all = self.checkpoints(id).await?;
        let sizes: Vec<_> = all.iter().map(|c| (&c.step, c.answer_bytes())).collect();
        let Some((window, next)) = page.window(&sizes) else { return Ok(None) };
        let next = next.cloned();
        Ok(Some(CheckpointPage { checkpoints: all.drain(window).collect(), next }))
    }
    /// Sets the job's `steps_total` (a fan-out step's size became known),
    /// only if `lease` is held and unexpired at `now` (else `LeaseLost`).
    /// An absolute value, so a resumed run that expands the same fan-out
    /// again writes the same number.
    async fn set_steps_total(&self, lease: &Lease, steps_total: u32, now: Micros) -> StorageResult<()>;
    /// Ends a leased run: `succeeded` or `failed`, conditional on the lease.
    /// `succeeded` is also conditional on `steps_done >= steps_total` (every
    /// step and instance checkpointed), else `StepsMissing` and nothing is
    /// written; a lost lease is `LeaseLost` first.
    async fn finish_job(&self, lease: &Lease, outcome: &JobOutcome, now: Micros) -> StorageResult<()>;
    /// Cancels a queued or running job; a finished job is left as it is.
    /// Returns the status after the call, `None` if there is no such job.
    async fn cancel_job(&self, id: &JobId, now: Micros) -> StorageResult<Option<JobStatus>>;
    /// Fails a job without holding its lease (dead-lettered after too many
    /// receives). A finished job is left as it is.
    async fn fail_unleased(&self, id: &JobId, reason: &str, now: Micros) -> StorageResult<()>;
    /// Records that the job's queue message was sent: `create_job` marks a
    /// job as not sent yet in the same write that stores it, so a crash or
    /// failure between storing and sending is found by [`Self::unsent_jobs`].
    async fn mark_sent(&self, id: &JobId) -> StorageResult<()>;
    /// Up to `max` jobs created at or before `before` whose message may never
    /// have been sent (not marked sent; on SQLite, whose queue is in the same
    /// file: still `queued` with no message), oldest first. The workers'
    /// sweeper sends them again; a second message is harmless (the lease).
    async fn unsent_jobs(&self, before: Micros, max: usize) -> StorageResult<Vec<QueueMessage>>;
    /// Records how the job's webhook delivery went (replacing an earlier
    /// report: a redelivery after a crash reports again). The job must exist.
    async fn put_webhook_report(&self, id: &JobId, report: &DeliveryReport, now: Micros) -> StorageResult<()>;
    /// The job's last webhook delivery report, if one was recorded.
    async fn webhook_report(&self, id: &JobId) -> StorageResult<Option<DeliveryReport>>;
}

// ---------------------------------------------------------------- ledger

/// What a pair of buckets (requests, tokens) limits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum BucketKey {
    /// One (org, model) of the pool: the provider's limits.
    Org { org: OrgName, model: ModelName },
    /// One tenant's own quota (calls per minute, tokens per day), over
    /// every org and model.
    Tenant(TenantId),
}

/// The first storage part of every tenant key. Org names never contain
/// `#`, so no (org, model) key can be stored under the same parts.
const TENANT_BUCKET_SCOPE: &str = "#tenant";

impl BucketKey {
    pub fn new(org: &OrgName, model: &ModelName) -> Self {
        Self::Org { org: org.clone(), model: model.clone() }
    }

    pub fn tenant(tenant: &TenantId) -> Self {
        Self::Tenant(tenant.clone())
    }

    /// The two strings a backend stores the key under: `(org, model)` for
    /// an org, `("#tenant", tenant)` for a tenant.
    pub fn parts(&self) -> (&str, &str) {
        match self {
            Self::Org { org, model } => (org.as_str(), model.as_str()),
            Self::Tenant(t) => (TENANT_BUCKET_SCOPE, t.as_str()),
        }
    }
}

impl std::fmt::Display for BucketKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Org { org, model } => write!(f, "org {org}, model {model}"),
            Self::Tenant(t) => write!(f, "tenant {t}"),
        }
    }
}

/// How many recent charges a bucket remembers (see [`ChargeId`]).
pub const CHARGE_SLOTS: u64 = 32;

/// One admission's mark on the buckets it charges. A bucket keeps the last
/// charge of each of [`CHARGE_SLOTS`] slots, so an acquisition sent again
/// with the same id after its answer was lost (a timeout after the commit,
/// an SDK's own retry) is answered `Granted` from what is stored and charges
/// nothing more. Only another charge landing in the same slot between the
/// lost answer and its retry (odds about 1 in 32 per charge in between)
/// makes the retry charge again: conservative, never a charge too few.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChargeId(u64);

impl ChargeId {
    /// A fresh random id: one per admission of one provider call, kept
    /// across that admission's retries and waits.
    pub fn new() -> Self {
        Self(rand::random())
    }

    pub fn from_raw(raw: u64) -> Self {
        Self(raw)
    }

    pub fn raw(self) -> u64 {
        self.0
    }

    /// The slot this charge is remembered in, below [`CHARGE_SLOTS`].
    pub fn slot(self) -> u64 {
        self.0 % CHARGE_SLOTS
    }
}

impl Default for ChargeId {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquisition {
    /// Charged; the bucket state after the charge.
    Granted(BucketState),
    /// Not charged; capacity returns at `retry_at`. `state` is the stored
    /// state the decision was made on, for the caller's cache.
    Denied { retry_at: Micros, state: BucketState },
    /// The cost exceeds a whole period's allowance of this bucket.
    Never,
}

#[async_trait]
pub trait QuotaLedger: Send + Sync + 'static {
    /// Checks and takes `cost` from both buckets of `key` in one atomic
    /// operation (GCRA, see [`gcra::decide`]), marking them with `charge`;
    /// when `key` already carries `charge` (this acquisition was granted
    /// before and its answer lost), answers `Granted` with the stored state
    /// and charges nothing.
    async fn acquire(
        &self,
        key: &BucketKey,
        params: &BucketParams,
        cost: Cost,
        now: Micros,
        charge: ChargeId,
    ) -> StorageResult<Acquisition>;
    /// Raises the stored TATs to at least `floor` (the provider showed less
    /// headroom than the ledger believed). Returns the state after.
    async fn raise(&self, key: &BucketKey, floor: BucketState) -> StorageResult<BucketState>;
    /// The stored state (default if never written).
    async fn state(&self, key: &BucketKey) -> StorageResult<BucketState>;
}

// ---------------------------------------------------------------- metrics

/// How one provider call ended, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallOutcome {
    Ok,
    RateLimited,
    InsufficientQuota,
    ServerError,
    Timeout,
    ConnectionError,
    RequestError,
}

impl CallOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ok => "ok",
            Self::RateLimited => "rate_limited",
            Self::InsufficientQuota => "insufficient_quota",
            Self::ServerError => "server_error",
            Self::Timeout => "timeout",
            Self::ConnectionError => "connection_error",
            Self::RequestError => "request_error",
        }
    }
}

/// One provider call as the metrics see it.
#[derive(Debug, Clone, PartialEq)]
pub struct CallEvent {
    pub tenant: TenantId,
    pub org: OrgName,
    pub model: ModelName,
    pub outcome: CallOutcome,
    pub usage: Usage,
    pub latency: Duration,
}

/// Per-org counters since the metrics store was created.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrgCounters {
    pub calls: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub rate_limited: u64,
    pub insufficient_quota: u64,
    pub server_errors: u64,
    pub timeouts: u64,
    pub connection_errors: u64,
    pub request_errors: u64,
}

impl OrgCounters {
    pub fn record(&mut self, ev: &CallEvent) {
        match ev.outcome {
            CallOutcome::Ok => {
                self.calls += 1;
                self.prompt_tokens += ev.usage.prompt_tokens;
                self.completion_tokens += ev.usage.completion_tokens;
            }
            CallOutcome::RateLimited => self.rate_limited += 1,
            CallOutcome::InsufficientQuota => self.insufficient_quota += 1,
            CallOutcome::ServerError => self.server_errors += 1,
            CallOutcome::Timeout => self.timeouts += 1,
            CallOutcome::ConnectionError => self.connection_errors += 1,
            CallOutcome::RequestError => self.request_errors += 1,
        }
    }
    pub fn merge(&mut self, o: &OrgCounters) {
        self.calls += o.calls;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.rate_limited += o.rate_limited;
        self.insufficient_quota += o.insufficient_quota;
        self.server_errors += o.server_errors;
        self.timeouts += o.timeouts;
        self.connection_errors += o.connection_errors;
        self.request_errors += o.request_errors;
    }
}

/// One flush of usage deltas. Its id makes it idempotent: a batch whose
/// answer was lost, or that failed part-way, is retried as it is (same id,
/// same deltas) and adds nothing that was already added.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageBatch {
    pub id: String,
    pub deltas: Vec<(TenantId, OrgName, OrgCounters)>,
}

impl UsageBatch {
    /// A batch with a fresh id.
    pub fn new(deltas: Vec<(TenantId, OrgName, OrgCounters)>) -> Self {
        Self { id: uuid::Uuid::new_v4().simple().to_string(), deltas }
    }
}

/// How long a backend remembers an applied batch id: far longer than a
/// process keeps retrying a failed flush.
pub const USAGE_BATCH_MEMORY: Duration = Duration::from_secs(24 * 3600);

/// Durable per-tenant, per-org usage counters. Events are aggregated in
/// memory and written in batches by `flush`, never one write per call.
#[async_trait]
pub trait UsageStore: Send + Sync + 'static {
    /// Adds a batch of per-(tenant, org) counter deltas, once: deltas of a
    /// batch id applied before (within [`USAGE_BATCH_MEMORY`]) add nothing.
    async fn add(&self, batch: &UsageBatch) -> StorageResult<()>;
    /// The tenant's totals per org.
    async fn usage(&self, tenant: &TenantId) -> StorageResult<Vec<(OrgName, OrgCounters)>>;
}

// ---------------------------------------------------------------- cache

/// What the hashed bytes start with. Bump it whenever the encoding below or
/// the meaning of a cached entry changes, so old entries become misses
/// instead of wrong hits.
const CACHE_KEY_VERSION: &[u8] = b"ratepool.response-cache.v3\n";

/// The exact-match key of one completion request: the hex SHA-256 digest of
/// a versioned, canonical encoding of the model and the request body.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey(String);

impl CacheKey {
    /// Equal requests give equal keys whatever the order of their object
    /// keys: objects are written with their keys sorted, at every depth.
    /// serde_json's `Map` is a `BTreeMap` (sorted) in this build, but only
    /// while no crate in the graph turns on its `preserve_order` feature, so
    /// the sort is done here rather than relied on. Everything else is
    /// serde_json's compact form: `1` and `1.0` are different requests.
    pub fn of(model: &str, request_json: &serde_json::Value) -> Self {
        let mut bytes = CACHE_KEY_VERSION.to_vec();
        write_canonical(&serde_json::Value::from(model), &mut bytes);
        bytes.push(b'\n');
        write_canonical(request_json, &mut bytes);
        Self(hex::encode(Sha256::digest(&bytes)))
    }

    /// The 64 lowercase hex digits.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for CacheKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Compact JSON with object keys in byte order.
fn write_canonical(v: &serde_json::Value, out: &mut Vec<u8>) {
    use serde_json::Value;
    match v {
        Value::Object(map) => write_canonical_object(map, out),
        Value::Array(items) => {
            out.push(b'[');
            for (i, v) in items.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                write_canonical(v, out);
            }
            out.push(b']');
        }
        // Scalars have one compact form, escaping included.
        scalar => out.extend_from_slice(scalar.to_string().as_bytes()),
    }
}

/// A JSON object as [`write_canonical`] writes it: keys in byte order.
fn write_canonical_object(map: &serde_json::Map<String, serde_json::Value>, out: &mut Vec<u8>) {
    let mut entries: Vec<_> = map.iter().collect();
    entries.sort_unstable_by(|a, b| a.0.cmp(b.0));
    out.push(b'{');
    for (i, (k, v)) in entries.into_iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        write_canonical(&serde_json::Value::from(k.as_str()), out);
        out.push(b':');
        write_canonical(v, out);
    }
    out.push(b'}');
}

/// One cached completion and what producing it cost. A hit is served
/// without a provider call, so it charges no quota; `usage` is what the
/// original call cost, for reporting what the cache saved.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CachedResponse {
    /// Every choice's message, as a checkpoint keeps it.
    pub answer: StepAnswer,
    pub usage: Usage,
    /// The org whose call produced it.
    pub org: OrgName,
    pub model: ModelName,
    pub created_at: Micros,
}

/// The exact-match response cache. Best effort by design: the engine treats
/// an error from either call as a miss and goes on.
#[async_trait]
pub trait ResponseCache: Send + Sync + 'static {
    /// The entry stored under `key`, unless it expired at or before `now`.
    async fn get(&self, key: &CacheKey, now: Micros) -> StorageResult<Option<CachedResponse>>;
    /// Stores `value` until `now + ttl`, replacing any entry under `key`
    /// (last write wins). `TooLarge` if the backend cannot hold it.
    async fn put(&self, key: &CacheKey, value: &CachedResponse, ttl: Duration, now: Micros) -> StorageResult<()>;
}

// ---------------------------------------------------------------- webhooks

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryStatus {
    Delivered,
    Failed,
}

/// How a job's webhook delivery went, stored on the job as its webhook
/// status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryReport {
    pub status: DeliveryStatus,
    /// Attempts made, failed DNS lookups and connects included; 0 if the
    /// URL was refused before the first.
    pub attempts: u32,
    /// Why the last attempt failed; `None` once delivered.
    pub last_error: Option<String>,
    /// HTTP status of the last answer, if there was one.
    pub last_status: Option<u16>,
}

/// A storage backend: one value of each role.
#[derive(Clone)]
pub struct Backend {
    pub queue: std::sync::Arc<dyn JobQueue>,
    pub jobs: std::sync::Arc<dyn JobStore>,
    pub ledger: std::sync::Arc<dyn QuotaLedger>,
    pub usage: std::sync::Arc<dyn UsageStore>,
    pub cache: std::sync::Arc<dyn ResponseCache>,
    pub calls: std::sync::Arc<dyn CallStore>,
}

impl Backend {
    /// Every role played by one value (a database that holds them all).
    pub fn all<T>(store: T) -> Self
    where
        T: JobQueue + JobStore + QuotaLedger + UsageStore + ResponseCache + CallStore,
    {
        let me = std::sync::Arc::new(store);
        Self {
            queue: me.clone(),
            jobs: me.clone(),
            ledger: me.clone(),
            usage: me.clone(),
            cache: me.clone(),
            calls: me,
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn cache_key_ignores_object_key_order_at_every_depth() {
        let a =
            json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0, "extra": {"x": 1, "y": [1, 2]}});
        let b =
            json!({"extra": {"y": [1, 2], "x": 1}, "temperature": 0, "messages": [{"content": "hi", "role": "user"}]});
        assert_eq!(CacheKey::of("m", &a), CacheKey::of("m", &b));
        assert_eq!(CacheKey::of("m", &a).as_str().len(), 64);
    }

    #[test]
    fn cache_key_tells_requests_apart() {
        let base = json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 0});
        let k = CacheKey::of("m", &base);
        assert_ne!(k, CacheKey::of("other", &base), "model");
        assert_ne!(k, CacheKey::of("m", &json!({"messages": [{"role": "user", "content": "hi"}], "temperature": 1})));
        // Array order is meaning (message order), never sorted.
        let two = |a: &str, b: &str| json!({"messages": [{"content": a}, {"content": b}]});
        assert_ne!(CacheKey::of("m", &two("a", "b")), CacheKey::of("m", &two("b", "a")));
    }

    #[test]
    fn cache_key_encoding_is_pinned() {
        // Changing the encoding must come with a new CACHE_KEY_VERSION; this
        // fails first to say so.
        let mut bytes = Vec::new();
        write_canonical(&serde_json::json!({"b": [1, "x\"y"], "a": null, "c": {"e": 1.5, "d": true}}), &mut bytes);
        assert_eq!(String::from_utf8(bytes).unwrap(), r#"{"a":null,"b":[1,"x\"y"],"c":{"d":true,"e":1.5}}"#);
    }
}
