//! One job run: lease, heartbeat, load checkpoints, run the ready steps up
//! to the job's parallelism, checkpoint each as it finishes, finish.
//!
//! Control flow that is not a failure (lease lost, shutdown hand-back) is
//! kept apart from real failures: only a step the provider refused, or one
//! that cannot be routed, fails a job.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::Engine;
use super::plan::{Plan, StepScope, Unit};
use super::retry::{WriteRetry, retry_write};
use super::router::{CallError, CallRequest, Routing, SendGate};
use crate::answer::StepAnswer;
use crate::domain::Usage;
use crate::domain::{JobId, ModelName, TenantId};
use crate::provider::ProviderRequest;
use crate::spec::{JobSpec, Tier};
use crate::storage::{
    CacheKey, CachedResponse, Checkpoint, Delivery, DeliveryStatus, JobOutcome, JobStatus, Lease, LeaseOutcome,
    ResponseCache, StorageError,
};

/// Shutdown signals shared by every job of one engine.
#[derive(Clone, Default)]
pub(crate) struct Stop {
    /// Start no new steps; hand the job back once running steps are done.
    pub drain: CancellationToken,
    /// Abandon running steps and hand back now.
    pub abort: CancellationToken,
}

/// What to do with the queue message once the run ends.
enum Ack {
    Delete,
    /// Hand back to the queue now, as a fresh copy (shutdown; a lapsed
    /// lease on a job still running).
    HandBack,
    /// Another worker holds a live lease: put the message back for this
    /// long as a fresh one (see [`crate::storage::JobQueue::defer`]).
    Defer(Duration),
    /// Leave it: it reappears after its visibility timeout.
    Leave,
    /// The job is final and asked for a webhook: deliver it in the
    /// engine's delivery pool, then settle the message as that says.
    Notify,
}

pub(crate) async fn run_delivery(engine: &Arc<Engine>, delivery: Delivery, stop: Stop) {
    let job = delivery.message.job_id.clone();
    let ack = match run(engine, &delivery, &stop).await {
        Ok(ack) => ack,
        // Storage failing (an outage, throttling) is our failure, not the
        // job's: a fresh copy after a backoff, so these receives never
        // count towards the queue's redrive to the dead-letter queue.
        Err(e) if e.is_transient() => {
            tracing::warn!(job = %job, error = %e, "job run interrupted by a storage error; it will be retried");
            Ack::Defer(engine.config.lease_ttl)
        }
        Err(e) => {
            tracing::warn!(job = %job, error = %e, "job run interrupted by a storage error; it will be retried");
            Ack::Leave
        }
    };
    if let Ack::Notify = ack {
        match engine.deliveries.admit() {
            // The worker slot is free once this returns.
            Some(place) => {
                let engine = engine.clone();
                tokio::spawn(async move {
                    let ack = deliver_in_pool(&engine, &delivery).await;
                    acknowledge(&engine, &delivery, ack).await;
                    drop(place);
                });
            }
            // The pool is full: deliver here, holding the slot.
            None => {
                let ack = settle_webhook(engine, &delivery, &job).await;
                acknowledge(engine, &delivery, ack).await;
            }
        }
        return;
    }
    acknowledge(engine, &delivery, ack).await;
}

/// Delivers a finished job's webhook in the delivery pool: waits for a
/// slot with the message kept hidden, then settles it. Aborted at shutdown,
/// it hands the message back so another process delivers.
async fn deliver_in_pool(engine: &Engine, delivery: &Delivery) -> Ack {
    let pool = &engine.deliveries;
    let keep =
        tokio::spawn(keep_hidden(engine.backend.queue.clone(), delivery.receipt.clone(), engine.config.lease_ttl));
    let slot = tokio::select! {
        slot = pool.slot() => slot,
        _ = pool.aborted().cancelled() => None,
    };
    keep.abort();
    if slot.is_none() {
        return Ack::HandBack;
    }
    tokio::select! {
        ack = settle_webhook(engine, delivery, &delivery.message.job_id) => ack,
        _ = pool.aborted().cancelled() => Ack::HandBack,
    }
}

async fn acknowledge(engine: &Engine, delivery: &Delivery, ack: Ack) {
    let job = &delivery.message.job_id;
    let q = &engine.backend.queue;
    let res = match ack {
        // Settled by `run_delivery` before it gets here.
        Ack::Notify => Ok(()),
        Ack::Delete => q.delete(&delivery.receipt).await,
        // A fresh copy rather than a visibility change: a hand-back is not
        // a receive that failed, so it must not count towards the redrive.
        Ack::HandBack => q.defer(delivery, Duration::ZERO).await,
        Ack::Defer(d) => q.defer(delivery, d).await,
        Ack::Leave => Ok(()),
    };
    match res {
        Ok(()) => {}
        // Our receipt lapsed (a late heartbeat) and the message was passed
        // on: its next receiver finds the job finished or leased.
        Err(StorageError::StaleReceipt) => {
            tracing::info!(job = %job, "the queue message was already passed on; its next receiver settles it");
        }
        Err(e) => tracing::warn!(job = %job, error = %e, "could not acknowledge the queue message"),
    }
}

async fn run(engine: &Engine, delivery: &Delivery, stop: &Stop) -> Result<Ack, StorageError> {
    let jobs = &engine.backend.jobs;
    let cfg = &engine.config;
    let id = &delivery.message.job_id;
    // A tenant whose rate quota is spent would only wait in a worker slot
    // that other tenants' jobs could use: its job comes back when it fits.
    if let Some(retry_at) = engine.router.tenant_quota_retry_at(&delivery.message.tenant).await? {
        tracing::debug!(job = %id, tenant = %delivery.message.tenant, "tenant quota spent; job put back until it has room");
        return Ok(Ack::Defer(until(engine, retry_at)));
    }
    let lease = match jobs.acquire_lease(id, &cfg.owner, cfg.lease_ttl, engine.clock.now()).await? {
        LeaseOutcome::Acquired(l) => l,
        LeaseOutcome::Held { expires_at, .. } => {
            let left = (expires_at - engine.clock.now()).max(0) as u64;
            return Ok(Ack::Defer(Duration::from_micros(left) + Duration::from_secs(1)));
        }
        // Finished: its worker may have died before sending the webhook.
        LeaseOutcome::Finished(_) => return Ok(Ack::Notify),
        LeaseOutcome::Missing => return Ok(Ack::Delete),
    };
    let Some(record) = jobs.get_job(id).await? else { return Ok(Ack::Delete) };
    if record.stalled_runs > cfg.max_receives {
        let reason = format!(
            "dead-lettered: {} runs in a row ended without finishing a step (the job keeps stopping its worker)",
            record.stalled_runs - 1
        );
        tracing::error!(job = %id, %reason);
        finish(engine, &lease, &record.tenant, JobOutcome::Failed(reason), record.created_at).await?;
        // Best effort: the message is about to leave the queue for good.
        settle_webhook(engine, delivery, id).await;
        // The message moves to the dead-letter queue; nothing left to ack.
        engine.backend.queue.dead_letter(delivery).await?;
        return Ok(Ack::Leave);
    }
    let spec = match JobSpec::from_stored(&record.spec_json, &cfg.spec_limits) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            let outcome = JobOutcome::Failed(format!("stored spec is unreadable: {e}"));
            return finish(engine, &lease, &record.tenant, outcome, record.created_at).await;
        }
    };
    let deadline =
        spec.deadline_secs.map(Duration::from_secs).or(cfg.deadline).map(|d| Deadline::after(record.created_at, d));
    if let Some(d) = deadline
        && engine.clock.now() >= d.at
    {
        let outcome = JobOutcome::Failed(d.passed("a worker to run it"));
        return finish(engine, &lease, &record.tenant, outcome, record.created_at).await;
    }
    tracing::info!(job = %id, steps = spec.steps.len(), receive = delivery.receive_count, "job started");

    let lease = Arc::new(Mutex::new(lease));
    let lost = CancellationToken::new();
    let heartbeat = tokio::spawn(heartbeat(
        engine.backend.clone(),
        engine.clock.clone(),
        delivery.receipt.clone(),
        lease.clone(),
        lost.clone(),
        cfg.lease_ttl,
    ));
    let result = run_steps(engine, &record.tenant, id, &spec, record.steps_total, deadline, &lease, &lost, stop).await;
    heartbeat.abort();
    let lease = current(&lease);
    match result {
        Ok(StepsEnd::AllDone) => {
            match finish(engine, &lease, &record.tenant, JobOutcome::Succeeded, record.created_at).await? {
                Ack::Delete if spec.webhook_url.is_some() => Ok(Ack::Notify),
                other => Ok(other),
            }
        }
        Ok(StepsEnd::Failed(reason)) => {
            match finish(engine, &lease, &record.tenant, JobOutcome::Failed(reason), record.created_at).await? {
                Ack::Delete if spec.webhook_url.is_some() => Ok(Ack::Notify),
                other => Ok(other),
            }
        }
        Ok(StepsEnd::HandBack) => {
            jobs.release_lease(&lease).await?;
            tracing::info!(job = %id, "job handed back to the queue");
            Ok(Ack::HandBack)
        }
        Ok(StepsEnd::TenantQuotaSpent(retry_at)) => {
            jobs.release_lease(&lease).await?;
            tracing::info!(job = %id, tenant = %record.tenant, "tenant quota spent; job put back until it has room");
            Ok(Ack::Defer(until(engine, retry_at)))
        }
        Ok(StepsEnd::LeaseLost) | Err(StorageError::LeaseLost) => {
            // Cancelled, or another worker took over: ours is done either way.
            let status = jobs.get_job(id).await?.map(|j| j.status);
            tracing::info!(job = %id, ?status, "job lease lost; stopping this run");
            Ok(if status.is_none_or(JobStatus::is_terminal) { Ack::Delete } else { Ack::Leave })
        }
        Err(e) if e.is_transient() => {
            // Storage interrupted the run (an outage, throttling): it did
            // not crash, so it gives its run back (see `release_lease`),
            // and the next run need not wait for the lease to lapse. Best
            // effort: the store may still be down.
            if let Err(r) = jobs.release_lease(&lease).await {
                tracing::warn!(job = %id, error = %r, "could not release the lease of a run given up");
            }
            Err(e)
        }
        Err(e) => Err(e),
    }
}

async fn finish(
    engine: &Engine,
    lease: &Lease,
    tenant: &TenantId,
    outcome: JobOutcome,
    created_at: i64,
) -> Result<Ack, StorageError> {
    let now = engine.clock.now();
    match engine.backend.jobs.finish_job(lease, &outcome, now).await {
        Ok(()) => {}
        // Cancelled, taken over, or our lease lapsed while its renewals
        // stalled: the job may still be running, and then its message is
        // the only thing that will ever finish it.
        Err(StorageError::LeaseLost) => {
            let status = engine.backend.jobs.get_job(&lease.job_id).await?.map(|j| j.status);
            tracing::info!(job = %lease.job_id, ?status, "job lease lost before its final write");
            return Ok(if status.is_none_or(JobStatus::is_terminal) { Ack::Delete } else { Ack::HandBack });
        }
        // The run believed every step checkpointed, the store disagrees (a
        // write that answered success and did not land): not finished. The
        // message is left to come back when the lease lapses, and that run
        // loads the checkpoints and runs the missing steps. It counts as a
        // stalled run (the lease is not given back), so a disagreement that
        // persists ends in the poison check's failed job, not a loop.
        Err(StorageError::StepsMissing { done, total }) => {
            tracing::warn!(job = %lease.job_id, tenant = %tenant, done, total,
                "job ran every step but has fewer checkpointed; not finished, left to run the missing ones when its lease lapses");
            return Ok(Ack::Leave);
        }
        Err(e) => return Err(e),
    }
    let status = match &outcome {
        JobOutcome::Succeeded => JobStatus::Succeeded,
        JobOutcome::Failed(reason) => {
            tracing::warn!(job = %lease.job_id, tenant = %tenant, %reason, "job failed");
            JobStatus::Failed
        }
    };
    if status == JobStatus::Succeeded {
        tracing::info!(job = %lease.job_id, tenant = %tenant, "job succeeded");
    }
    engine.telemetry.job_finished(status, Duration::from_micros((now - created_at).max(0) as u64));
    Ok(Ack::Delete)
}

/// Sends a finished job's webhook if it asked for one and no delivery is
/// recorded yet, then records the report. Called by the worker that
/// finished the job and by whoever receives its message afterwards (the
/// finisher died first), so delivery is at least once; the message stays
/// hidden meanwhile. Cancelled jobs get no webhook. `Delete` once settled;
/// `Leave` if storage failed, so the message comes back and it is retried.
async fn settle_webhook(engine: &Engine, delivery: &Delivery, id: &JobId) -> Ack {
    match try_settle_webhook(engine, delivery, id).await {
        Ok(()) => Ack::Delete,
        Err(e) => {
            tracing::warn!(job = %id, error = %e, "could not settle the job's webhook; it will be retried");
            Ack::Leave
        }
    }
}

async fn try_settle_webhook(engine: &Engine, delivery: &Delivery, id: &JobId) -> Result<(), StorageError> {
    let jobs = &engine.backend.jobs;
    let Some(record) = jobs.get_job(id).await? else { return Ok(()) };
    if !matches!(record.status, JobStatus::Succeeded | JobStatus::Failed) {
        return Ok(());
    }
    let Some(url) = JobSpec::stored_webhook_url(&record.spec_json) else {
        return Ok(());
    };
    if jobs.webhook_report(id).await?.is_some() {
        return Ok(());
    }
    let keep =
        tokio::spawn(keep_hidden(engine.backend.queue.clone(), delivery.receipt.clone(), engine.config.lease_ttl));
    let report = engine.config.notifier.notify(&record, &url).await;
    keep.abort();
    match report.status {
        DeliveryStatus::Delivered => {
            engine.telemetry.webhook_delivery("delivered");
            tracing::info!(job = %id, attempts = report.attempts, "webhook delivered");
        }
        DeliveryStatus::Failed => {
            engine.telemetry.webhook_delivery("failed");
            tracing::warn!(job = %id, attempts = report.attempts, error = ?report.last_error, "webhook delivery failed");
        }
    }
    jobs.put_webhook_report(id, &report, engine.clock.now()).await
}

/// Keeps a message hidden while its job's webhook is being delivered.
async fn keep_hidden(queue: Arc<dyn crate::storage::JobQueue>, receipt: String, ttl: Duration) {
    loop {
        tokio::time::sleep(ttl / 3).await;
        if queue.extend(&receipt, ttl).await.is_err() {
            return;
        }
    }
}

/// How long to keep a job away until `retry_at`, plus up to a second of
/// jitter so a tenant's jobs do not all come back at once (at most 15 min,
/// SQS's longest delay; the job checks again then).
fn until(engine: &Engine, retry_at: crate::domain::Micros) -> Duration {
    let left = retry_at.saturating_sub(engine.clock.now()).clamp(0, 900_000_000) as u64;
    Duration::from_micros(left) + Duration::from_millis(rand::random_range(50..1_000))
}

fn current(lease: &Mutex<Lease>) -> Lease {
    lease.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// Keeps the queue message hidden and the lease alive every third of the
/// TTL; a lost lease (cancel, takeover) cancels `lost`.
async fn heartbeat(
    backend: crate::storage::Backend,
    clock: Arc<dyn crate::domain::Clock>,
    receipt: String,
    lease: Arc<Mutex<Lease>>,
    lost: CancellationToken,
    ttl: Duration,
) {
    // Once the receipt is stale (a heartbeat came after the visibility
    // timeout), the message is another worker's to defer while our lease
    // lives; the lease alone keeps the job ours.
    let mut receipt = Some(receipt);
    loop {
        tokio::time::sleep(ttl / 3).await;
        let held = current(&lease);
        // Side by side: a slow queue must not hold up the lease renewal.
        let extended = async {
            match &receipt {
                Some(r) => Some(backend.queue.extend(r, ttl).await),
                None => None,
            }
        };
        let (extended, renewed) = tokio::join!(extended, backend.jobs.renew_lease(&held, ttl, clock.now()));
        match extended {
            None | Some(Ok(())) => {}
            Some(Err(StorageError::StaleReceipt)) => {
                tracing::info!(
                    job = %held.job_id,
                    "heartbeat came after the message's visibility timeout; the lease keeps the job"
                );
                receipt = None;
            }
            Some(Err(e)) => tracing::warn!(error = %e, "heartbeat: could not extend the message's visibility"),
        }
        match renewed {
            Ok(renewed) => *lease.lock().unwrap_or_else(|e| e.into_inner()) = renewed,
            Err(StorageError::LeaseLost) => {
                lost.cancel();
                return;
            }
            Err(e) => tracing::warn!(job = %held.job_id, error = %e, "heartbeat: could not renew the lease"),
        }
    }
}

/// Holds a step's call, after its quota is charged and before it is sent,
/// while the lease renewal is overdue: less than a third of the TTL left,
/// where the heartbeat renews every third. Storage that slow may let the
/// lease lapse, and another worker would then make the same call. The call
/// goes as soon as a renewal lands, and is abandoned if the lease is lost.
struct LeaseGate {
    lease: Arc<Mutex<Lease>>,
    clock: Arc<dyn crate::domain::Clock>,
    ttl: Duration,
    lost: CancellationToken,
}

#[async_trait::async_trait]
impl SendGate for LeaseGate {
    async fn ready(&self) -> bool {
        let margin = i64::try_from((self.ttl / 3).as_micros()).unwrap_or(i64::MAX);
        let mut told = false;
        loop {
            if self.lost.is_cancelled() {
                return false;
            }
            let held = current(&self.lease);
            let left = held.expires_at - self.clock.now();
            if left > margin {
                return true;
            }
            if !told {
                tracing::info!(job = %held.job_id, left_ms = left / 1000, "holding a call until the overdue lease renewal lands");
                told = true;
            }
            tokio::select! {
                _ = tokio::time::sleep(self.ttl / 20) => {}
                _ = self.lost.cancelled() => return false,
            }
        }
    }
}

enum StepsEnd {
    AllDone,
    Failed(String),
    HandBack,
    /// The tenant's rate quota has no room until then: the job goes back
    /// to the queue (its running steps finished and checkpointed first).
    TenantQuotaSpent(crate::domain::Micros),
    LeaseLost,
}

struct StepDone {
    unit: Unit,
    checkpoint: Checkpoint,
    provider_time: Duration,
    started: tokio::time::Instant,
}

enum StepError {
    Failed(String),
    Cancelled,
    TenantQuotaSpent(crate::domain::Micros),
    Storage(StorageError),
}

#[allow(clippy::too_many_arguments)]
async fn run_steps(
    engine: &Engine,
    tenant: &TenantId,
    id: &JobId,
    spec: &Arc<JobSpec>,
    steps_total: u32,
    deadline: Option<Deadline>,
    lease: &Arc<Mutex<Lease>>,
    lost: &CancellationToken,
    stop: &Stop,
) -> Result<StepsEnd, StorageError> {
    let jobs = &engine.backend.jobs;
    let cap = spec.fan_out_cap(engine.config.spec_limits.max_fan_out);
    let mut plan = Plan::new(spec.clone(), cap, jobs.checkpoints(id).await?);
    let mut written_total = steps_total;
    let parallel = spec
        .max_parallel
        .map_or(engine.config.step_parallelism, |p| (p as usize).min(engine.config.step_parallelism))
        .max(1);
    let gate: Arc<dyn SendGate> = Arc::new(LeaseGate {
        lease: lease.clone(),
        clock: engine.clock.clone(),
        ttl: engine.config.lease_ttl,
        lost: lost.clone(),
    });
    let steps_cancel = CancellationToken::new();
    let _cancel_on_exit = steps_cancel.clone().drop_guard();
    let mut running = 0usize;
    let mut quota_spent: Option<crate::domain::Micros> = None;
    let mut tasks: JoinSet<Result<StepDone, StepError>> = JoinSet::new();
    loop {
        if !stop.drain.is_cancelled() && quota_spent.is_none() {
            if let Err(reason) = plan.expand_ready() {
                return Ok(StepsEnd::Failed(reason));
            }
            // A fan-out's size became known: the progress shows it before
            // its instances start. Absolute, so a resumed run rewrites the
            // same number.
            let total = plan.steps_total();
            if total != written_total {
                jobs.set_steps_total(&current(lease), total, engine.clock.now()).await?;
                written_total = total;
            }
            for unit in plan.take_ready(parallel.saturating_sub(running)) {
                running += 1;
                let ctx = StepCtx {
                    router: engine.router.clone(),
                    clock: engine.clock.clone(),
                    max_prompt_bytes: engine.config.spec_limits.max_rendered_bytes,
                    tenant: tenant.clone(),
                    job: id.clone(),
                    spec: spec.clone(),
                    scope: plan.scope(&unit),
                    unit,
                    cancel: steps_cancel.child_token(),
                    gate: gate.clone(),
                    cache: engine.backend.cache.clone(),
                    cache_ttl: spec.cache_ttl_secs.map_or(engine.config.cache_ttl, Duration::from_secs),
                    fallback_after: spec.fallback_after_secs.map_or(engine.config.fallback_after, Duration::from_secs),
                    deadline,
                    telemetry: engine.telemetry.clone(),
                };
                tasks.spawn(run_step(ctx));
            }
        }
        if running == 0 {
            if let Some(retry_at) = quota_spent {
                return Ok(StepsEnd::TenantQuotaSpent(retry_at));
            }
            return Ok(if plan.all_done() { StepsEnd::AllDone } else { StepsEnd::HandBack });
        }
        let joined = tokio::select! {
            j = tasks.join_next() => j,
            _ = lost.cancelled() => return Ok(StepsEnd::LeaseLost),
            _ = stop.abort.cancelled() => return Ok(StepsEnd::HandBack),
        };
        let Some(joined) = joined else { continue };
        let step = match joined {
            Ok(r) => r,
            Err(e) => return Ok(StepsEnd::Failed(format!("step task crashed: {e}"))),
        };
        match step {
            Ok(s) => {
                match write_checkpoint(engine, lease, lost, &s.checkpoint).await {
                    Ok(()) => {}
                    // The store will never hold this answer: calling the
                    // step again on every run would end the same way.
                    Err(StorageError::TooLarge(reason)) => return Ok(StepsEnd::Failed(reason)),
                    Err(e) => return Err(e),
                }
                let total = s.started.elapsed();
                engine.telemetry.step_done(total.saturating_sub(s.provider_time));
                running -= 1;
                plan.finish(&s.unit, s.checkpoint.answer);
            }
            Err(StepError::Failed(reason)) => return Ok(StepsEnd::Failed(reason)),
            // Start nothing more; hand the job back once the running steps end.
            Err(StepError::TenantQuotaSpent(retry_at)) => {
                running -= 1;
                quota_spent = Some(quota_spent.map_or(retry_at, |r| r.max(retry_at)));
            }
            // A gate gives up on a call only when the lease is lost.
            Err(StepError::Cancelled) if lost.is_cancelled() => return Ok(StepsEnd::LeaseLost),
            Err(StepError::Cancelled) => return Ok(StepsEnd::HandBack),
            Err(StepError::Storage(e)) => return Err(e),
        }
    }
}

/// Writes a finished step's checkpoint, retrying a failing or throttled
/// store while the lease holds: the call is paid for, and a run that ends
/// here would make it again. A retry that finds the checkpoint written
/// (the first answer was lost after the write landed) has succeeded.
async fn write_checkpoint(
    engine: &Engine,
    lease: &Mutex<Lease>,
    lost: &CancellationToken,
    checkpoint: &Checkpoint,
) -> Result<(), StorageError> {
    let jobs = &engine.backend.jobs;
    let holds = || !lost.is_cancelled() && current(lease).expires_at > engine.clock.now();
    retry_write("write checkpoint", WriteRetry::RUN, holds, |attempt| async move {
        match jobs.put_checkpoint(&current(lease), checkpoint, engine.clock.now()).await {
            Err(StorageError::CheckpointExists(_)) if attempt > 0 => Ok(()),
            other => other,
        }
    })
    .await
}

/// Exact match on everything the provider sees, and the tenant: one
/// tenant's answers are never served to another.
fn cache_key(tenant: &TenantId, model: &ModelName, body: &serde_json::Map<String, serde_json::Value>) -> CacheKey {
    let request = serde_json::json!({"tenant": tenant.as_str(), "body": body});
    CacheKey::of(model.as_str(), &request)
}

struct StepCtx {
    router: Arc<super::Router>,
    clock: Arc<dyn crate::domain::Clock>,
    max_prompt_bytes: usize,
    tenant: TenantId,
    job: JobId,
    spec: Arc<JobSpec>,
    /// The step, or the fan-out instance, this call is for.
    unit: Unit,
    /// What its templates may read.
    scope: StepScope,
    cancel: CancellationToken,
    gate: Arc<dyn SendGate>,
    cache: Arc<dyn ResponseCache>,
    cache_ttl: Duration,
    fallback_after: Duration,
    deadline: Option<Deadline>,
    telemetry: Arc<crate::telemetry::Telemetry>,
}

/// When a job must be done by: `deadline_secs` (the job's, or the
/// configured default) after it was submitted.
#[derive(Debug, Clone, Copy)]
struct Deadline {
    secs: u64,
    at: crate::domain::Micros,
}

impl Deadline {
    fn after(created_at: crate::domain::Micros, d: Duration) -> Self {
        let us = i64::try_from(d.as_micros()).unwrap_or(i64::MAX);
        Self { secs: d.as_secs(), at: created_at.saturating_add(us) }
    }

    /// The job's failure reason: the deadline passed while it waited for `what`.
    fn passed(&self, what: &str) -> String {
        format!("deadline of {} s passed while waiting for {what}", self.secs)
    }
}

async fn run_step(ctx: StepCtx) -> Result<StepDone, StepError> {
    let started = tokio::time::Instant::now();
    let started_at = ctx.clock.now();
    let step = &ctx.spec.steps[ctx.unit.step];
    let key = &ctx.unit.key;
    let mut messages = Vec::with_capacity(step.messages.len());
    // One budget for the whole step: what the provider is sent is bounded.
    let mut budget = ctx.max_prompt_bytes;
    for (m, msg) in step.messages.iter().enumerate() {
        let rendered = msg
            .render(&ctx.scope, &mut budget)
            .map_err(|e| StepError::Failed(format!("step {key}: messages[{m}]: {e}")))?;
        messages.push(rendered);
    }
    let body = step.body(messages);
    let cache_key = step.cache.then(|| cache_key(&ctx.tenant, &step.model, &body));
    let request = ProviderRequest::chat(body, u64::from(step.params.allowance()))
        .map_err(|e| StepError::Failed(format!("step {key}: {e}")))?;
    let checkpoint = |answer: StepAnswer, usage: Usage, org, attempts| Checkpoint {
        step: key.clone(),
        answer,
        usage,
        org,
        model: step.model.clone(),
        attempts,
        started_at,
        finished_at: ctx.clock.now(),
    };
    if let Some(key) = &cache_key {
        match ctx.cache.get(key, ctx.clock.now()).await {
            Ok(Some(hit)) => {
                ctx.telemetry.cache_lookup("hit");
                // No call, so no quota and no usage: the checkpoint says
                // which org first answered, with 0 attempts.
                return Ok(StepDone {
                    checkpoint: checkpoint(hit.answer, Usage::default(), hit.org, 0),
                    unit: ctx.unit.clone(),
                    provider_time: Duration::ZERO,
                    started,
                });
            }
            Ok(None) => ctx.telemetry.cache_lookup("miss"),
            Err(e) => {
                // Best effort: a cache that fails is a miss.
                ctx.telemetry.cache_lookup("error");
                tracing::warn!(job = %ctx.job, step = %ctx.unit.key, error = %e, "response cache read failed; calling the provider");
            }
        }
    }
    // The job's deadline bounds the call's wait for capacity and its retries.
    let max_wait = match ctx.deadline {
        None => None,
        Some(d) => {
            let left = d.at - ctx.clock.now();
            if left <= 0 {
                return Err(StepError::Failed(format!("step {key}: {}", d.passed("its turn to run"))));
            }
            Some(Duration::from_micros(left as u64))
        }
    };
    let req = CallRequest {
        tenant: ctx.tenant.clone(),
        request,
        request_id: format!("{}/{key}", ctx.job),
        gate: Some(ctx.gate.clone()),
        yield_to_tenant_quota: true,
        routing: Routing { cheap: step.tier == Tier::Cheap, fallback_after: ctx.fallback_after },
        max_wait,
    };
    let model = &step.model;
    let result = ctx.router.call(&req, &ctx.cancel).await.map_err(|e| match (e, ctx.deadline) {
        (CallError::Cancelled, _) => StepError::Cancelled,
        (CallError::TenantQuotaSpent { retry_at }, _) => StepError::TenantQuotaSpent(retry_at),
        (CallError::Storage(e), _) => StepError::Storage(e),
        (CallError::NoCapacity { .. }, Some(d)) => StepError::Failed(format!(
            "step {key}: {}",
            d.passed(&format!("capacity for {model} (the pool's, or the tenant's quota)"))
        )),
        (CallError::Unavailable { reason, .. }, Some(d)) => {
            StepError::Failed(format!("step {key}: {}: {reason}", d.passed(&format!("an org serving {model}"))))
        }
        (other, _) => StepError::Failed(format!("step {key}: {other}")),
    })?;
    let answer =
        StepAnswer::from_completion(&result.body).map_err(|e| StepError::Failed(format!("step {key}: {e}")))?;
    if let Some(cache_key) = &cache_key {
        let entry = CachedResponse {
            answer: answer.clone(),
            usage: result.usage,
            org: result.org.clone(),
            model: step.model.clone(),
            created_at: ctx.clock.now(),
        };
        if let Err(e) = ctx.cache.put(cache_key, &entry, ctx.cache_ttl, ctx.clock.now()).await {
            tracing::warn!(job = %ctx.job, step = %key, error = %e, "could not store the answer in the response cache");
        }
    }
    Ok(StepDone {
        checkpoint: checkpoint(answer, result.usage, result.org, result.attempts),
        unit: ctx.unit.clone(),
        provider_time: result.provider_time,
        started,
    })
}
