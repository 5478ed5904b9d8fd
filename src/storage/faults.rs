//! Storage that fails on purpose, for tests and drills: [`Faulty`] wraps
//! every role of any backend and, per call, may add latency, fail before
//! anything is written (an error, or throttling), or apply a write and then
//! lose its answer (the caller sees an error although the write committed,
//! as after a timeout on a request the store did carry out).
//!
//! Decisions come from a seeded RNG, so a run can be replayed; every fault
//! injected is counted in [`FaultCounts`], so a test can show that its storm
//! really hit the paths it claims to cover.

use std::future::Future;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde::Deserialize;

use super::*;

/// What to inject, each a per-call probability. Reads (gets, queries, ledger
/// state, queue stats) only ever get latency: the faults worth drilling are
/// the writes' (a failed read is retried like any backend error).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultPlan {
    /// A write fails before it is carried out.
    #[serde(default)]
    pub write_error: f64,
    /// A write is refused as throttled before it is carried out.
    #[serde(default)]
    pub throttle: f64,
    /// A write is carried out, then its answer is lost.
    #[serde(default)]
    pub lost_response: f64,
    /// Any call first waits `slow_ms`.
    #[serde(default)]
    pub slow: f64,
    #[serde(default)]
    pub slow_ms: u64,
    #[serde(default)]
    pub seed: u64,
    /// Which writes may fail (all, unless set); the others only get latency.
    #[serde(default)]
    pub only: Option<FaultScope>,
}

/// A family of writes that faults can be limited to, so a test can show
/// what one of them failing does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultScope {
    /// Step checkpoints (`put_checkpoint`).
    Checkpoints,
    /// Quota ledger writes (`acquire`, `raise`).
    Ledger,
}

impl FaultScope {
    fn covers(self, what: &str) -> bool {
        match self {
            Self::Checkpoints => what == "write checkpoint",
            Self::Ledger => what.starts_with("ledger "),
        }
    }
}

impl FaultPlan {
    /// Probabilities in `[0, 1]`, and the three write faults at most 1 together.
    pub fn check(&self) -> Result<(), String> {
        let named = [
            ("write_error", self.write_error),
            ("throttle", self.throttle),
            ("lost_response", self.lost_response),
            ("slow", self.slow),
        ];
        for (name, p) in named {
            if !(0.0..=1.0).contains(&p) {
                return Err(format!("{name} must be a probability in [0, 1], got {p}"));
            }
        }
        if self.write_error + self.throttle + self.lost_response > 1.0 {
            return Err("write_error + throttle + lost_response must be at most 1".into());
        }
        Ok(())
    }
}

/// How many faults were injected, by kind.
#[derive(Debug, Default)]
pub struct FaultCounts {
    pub write_errors: AtomicU64,
    pub throttled: AtomicU64,
    pub lost_responses: AtomicU64,
    pub slowed: AtomicU64,
    /// Writes that went through to the backend (lost answers included).
    pub writes_applied: AtomicU64,
}

impl FaultCounts {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
}

enum WriteFault {
    Error,
    Throttle,
    Lose,
}

struct Injector {
    plan: FaultPlan,
    rng: Mutex<StdRng>,
    counts: std::sync::Arc<FaultCounts>,
}

impl Injector {
    fn draw(&self) -> f64 {
        self.rng.lock().unwrap_or_else(|e| e.into_inner()).random()
    }

    async fn maybe_slow(&self) {
        if self.plan.slow > 0.0 && self.draw() < self.plan.slow {
            self.counts.slowed.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(Duration::from_millis(self.plan.slow_ms)).await;
        }
    }

    fn write_fault(&self, what: &str) -> Option<WriteFault> {
        let p = &self.plan;
        if p.only.is_some_and(|scope| !scope.covers(what)) {
            return None;
        }
        let u = self.draw();
        if u < p.write_error {
            Some(WriteFault::Error)
        } else if u < p.write_error + p.throttle {
            Some(WriteFault::Throttle)
        } else if u < p.write_error + p.throttle + p.lost_response {
            Some(WriteFault::Lose)
        } else {
            None
        }
    }

    async fn read<T>(&self, op: impl Future<Output = StorageResult<T>>) -> StorageResult<T> {
        self.maybe_slow().await;
        op.await
    }

    async fn write<T>(&self, what: &str, op: impl Future<Output = StorageResult<T>>) -> StorageResult<T> {
        self.maybe_slow().await;
        let fault = self.write_fault(what);
        match fault {
            Some(WriteFault::Error) => {
                self.counts.write_errors.fetch_add(1, Ordering::Relaxed);
                return Err(StorageError::Backend(format!("injected fault: {what} failed")));
            }
            Some(WriteFault::Throttle) => {
                self.counts.throttled.fetch_add(1, Ordering::Relaxed);
                return Err(StorageError::Throttled(format!("injected fault: {what} throttled")));
            }
            Some(WriteFault::Lose) | None => {}
        }
        let answer = op.await;
        if answer.is_ok() {
            self.counts.writes_applied.fetch_add(1, Ordering::Relaxed);
        }
        match (fault, answer) {
            (Some(WriteFault::Lose), Ok(_)) => {
                self.counts.lost_responses.fetch_add(1, Ordering::Relaxed);
                Err(StorageError::Backend(format!("injected fault: {what} committed, its answer was lost")))
            }
            (_, answer) => answer,
        }
    }
}

/// Every role of `inner`, with faults injected as `plan` says.
pub struct Faulty {
    inner: Backend,
    injector: Injector,
}

impl Faulty {
    /// Wraps `inner`; returns the backend to use and the fault counters.
    pub fn wrap(inner: Backend, plan: FaultPlan) -> (Backend, std::sync::Arc<FaultCounts>) {
        let counts = std::sync::Arc::new(FaultCounts::default());
        let injector = Injector { plan, rng: Mutex::new(StdRng::seed_from_u64(plan.seed)), counts: counts.clone() };
        let faulty = std::sync::Arc::new(Faulty { inner, injector });
        let backend = Backend {
            queue: faulty.clone(),
            jobs: faulty.clone(),
            ledger: faulty.clone(),
            usage: faulty.clone(),
            cache: faulty.clone(),
            calls: faulty,
        };
        (backend, counts)
    }
}

#[async_trait]
impl JobQueue for Faulty {
    async fn send(&self, message: &QueueMessage) -> StorageResult<()> {
        self.injector.write("queue send", self.inner.queue.send(message)).await
    }
    async fn receive(&self, max: usize, wait: Duration) -> StorageResult<Vec<Delivery>> {
        // A receive that fails after it took messages hides them for a
        // visibility timeout: the queue's own way of losing an answer.
        self.injector.write("queue receive", self.inner.queue.receive(max, wait)).await
    }
    async fn extend(&self, receipt: &str, timeout: Duration) -> StorageResult<()> {
        self.injector.write("queue extend", self.inner.queue.extend(receipt, timeout)).await
    }
    async fn delete(&self, receipt: &str) -> StorageResult<()> {
        self.injector.write("queue delete", self.inner.queue.delete(receipt)).await
    }
    async fn defer(&self, delivery: &Delivery, delay: Duration) -> StorageResult<()> {
        self.injector.write("queue defer", self.inner.queue.defer(delivery, delay)).await
    }
    async fn dead_letter(&self, delivery: &Delivery) -> StorageResult<()> {
        self.injector.write("queue dead letter", self.inner.queue.dead_letter(delivery)).await
    }
    async fn dead_letters(&self, max: usize) -> StorageResult<Vec<DeadLetter>> {
        self.injector.read(self.inner.queue.dead_letters(max)).await
    }
    async fn redrive_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>> {
        self.injector.write("queue redrive", self.inner.queue.redrive_dead_letters(job)).await
    }
    async fn remove_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>> {
        self.injector.write("queue remove dead letters", self.inner.queue.remove_dead_letters(job)).await
    }
    async fn stats(&self) -> StorageResult<QueueStats> {
        self.injector.read(self.inner.queue.stats()).await
    }
}

#[async_trait]
impl JobStore for Faulty {
    async fn create_job(&self, job: &NewJob) -> StorageResult<CreateOutcome> {
        self.injector.write("create job", self.inner.jobs.create_job(job)).await
    }
    async fn replay(&self, tenant: &TenantId, key: &str, hash: &str) -> StorageResult<Option<JobRecord>> {
        self.injector.read(self.inner.jobs.replay(tenant, key, hash)).await
    }
    async fn jobs_in_flight(&self, tenant: &TenantId) -> StorageResult<u64> {
        self.injector.read(self.inner.jobs.jobs_in_flight(tenant)).await
    }
    async fn get_job(&self, id: &JobId) -> StorageResult<Option<JobRecord>> {
        self.injector.read(self.inner.jobs.get_job(id)).await
    }
    async fn acquire_lease(&self, id: &JobId, owner: &str, ttl: Duration, now: Micros) -> StorageResult<LeaseOutcome> {
        self.injector.write("acquire lease", self.inner.jobs.acquire_lease(id, owner, ttl, now)).await
    }
    async fn renew_lease(&self, lease: &Lease, ttl: Duration, now: Micros) -> StorageResult<Lease> {
        self.injector.write("renew lease", self.inner.jobs.renew_lease(lease, ttl, now)).await
    }
    async fn release_lease(&self, lease: &Lease) -> StorageResult<()> {
        self.injector.write("release lease", self.inner.jobs.release_lease(lease)).await
    }
    async fn put_checkpoint(&self, lease: &Lease, checkpoint: &Checkpoint, now: Micros) -> StorageResult<()> {
        self.injector.write("write checkpoint", self.inner.jobs.put_checkpoint(lease, checkpoint, now)).await
    }
    async fn checkpoints(&self, id: &JobId) -> StorageResult<Vec<Checkpoint>> {
        self.injector.read(self.inner.jobs.checkpoints(id)).await
    }
    async fn set_steps_total(&self, lease: &Lease, steps_total: u32, now: Micros) -> StorageResult<()> {
        self.injector.write("set steps total", self.inner.jobs.set_steps_total(lease, steps_total, now)).await
    }
    async fn finish_job(&self, lease: &Lease, outcome: &JobOutcome, now: Micros) -> StorageResult<()> {
        self.injector.write("finish job", self.inner.jobs.finish_job(lease, outcome, now)).await
    }
    async fn cancel_job(&self, id: &JobId, now: Micros) -> StorageResult<Option<JobStatus>> {
        self.injector.write("cancel job", self.inner.jobs.cancel_job(id, now)).await
    }
    async fn fail_unleased(&self, id: &JobId, reason: &str, now: Micros) -> StorageResult<()> {
        self.injector.write("fail job", self.inner.jobs.fail_unleased(id, reason, now)).await
    }
    async fn mark_sent(&self, id: &JobId) -> StorageResult<()> {
        self.injector.write("mark job sent", self.inner.jobs.mark_sent(id)).await
    }
    async fn unsent_jobs(&self, before: Micros, max: usize) -> StorageResult<Vec<QueueMessage>> {
        self.injector.read(self.inner.jobs.unsent_jobs(before, max)).await
    }
    async fn put_webhook_report(&self, id: &JobId, report: &DeliveryReport, now: Micros) -> StorageResult<()> {
        self.injector.write("record webhook report", self.inner.jobs.put_webhook_report(id, report, now)).await
    }
    async fn webhook_report(&self, id: &JobId) -> StorageResult<Option<DeliveryReport>> {
        self.injector.read(self.inner.jobs.webhook_report(id)).await
    }
}

#[async_trait]
impl QuotaLedger for Faulty {
    async fn acquire(
        &self,
        key: &BucketKey,
        params: &BucketParams,
        cost: Cost,
        now: Micros,
        charge: ChargeId,
    ) -> StorageResult<Acquisition> {
        self.injector.write("ledger acquire", self.inner.ledger.acquire(key, params, cost, now, charge)).await
    }
    async fn raise(&self, key: &BucketKey, floor: BucketState) -> StorageResult<BucketState> {
        self.injector.write("ledger raise", self.inner.ledger.raise(key, floor)).await
    }
    async fn state(&self, key: &BucketKey) -> StorageResult<BucketState> {
        self.injector.read(self.inner.ledger.state(key)).await
    }
}

#[async_trait]
impl UsageStore for Faulty {
    async fn add(&self, batch: &UsageBatch) -> StorageResult<()> {
        self.injector.write("usage add", self.inner.usage.add(batch)).await
    }
    async fn usage(&self, tenant: &TenantId) -> StorageResult<Vec<(OrgName, OrgCounters)>> {
        self.injector.read(self.inner.usage.usage(tenant)).await
    }
}

#[async_trait]
impl ResponseCache for Faulty {
    async fn get(&self, key: &CacheKey, now: Micros) -> StorageResult<Option<CachedResponse>> {
        self.injector.read(self.inner.cache.get(key, now)).await
    }
    async fn put(&self, key: &CacheKey, value: &CachedResponse, ttl: Duration, now: Micros) -> StorageResult<()> {
        self.injector.write("cache put", self.inner.cache.put(key, value, ttl, now)).await
    }
}

#[async_trait]
impl CallStore for Faulty {
    async fn claim(&self, claim: &CallClaim, now: Micros) -> StorageResult<ClaimOutcome> {
        self.injector.write("durable call claim", self.inner.calls.claim(claim, now)).await
    }
    async fn renew(&self, claim: &CallClaim) -> StorageResult<()> {
        self.injector.write("durable call renew", self.inner.calls.renew(claim)).await
    }
    async fn complete(&self, claim: &CallClaim, answer: &StoredCall, expires_at: Micros) -> StorageResult<()> {
        self.injector.write("durable call answer", self.inner.calls.complete(claim, answer, expires_at)).await
    }
    async fn release(&self, claim: &CallClaim) -> StorageResult<()> {
        self.injector.write("durable call release", self.inner.calls.release(claim)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_are_checked() {
        assert!(FaultPlan { write_error: 0.05, lost_response: 0.05, ..FaultPlan::default() }.check().is_ok());
        assert!(FaultPlan { slow: 1.5, ..FaultPlan::default() }.check().is_err());
        assert!(FaultPlan { write_error: 0.6, throttle: 0.5, ..FaultPlan::default() }.check().is_err());
        let parsed: FaultPlan = toml::from_str("write_error = 0.05\nslow = 0.1\nslow_ms = 200\nseed = 3").unwrap();
        assert_eq!((parsed.write_error, parsed.slow_ms, parsed.seed), (0.05, 200, 3));
        assert!(toml::from_str::<FaultPlan>("writes = 1").is_err(), "unknown keys are refused");
    }
}
