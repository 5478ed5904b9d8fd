//! The storage conformance suite: what every backend must do, whatever it is
//! built on. Each test takes a fresh [`Harness`]; a backend's test file
//! (`tests/storage_sqlite.rs`, later the AWS one) runs each of them as its own
//! `#[tokio::test]`.
//!
//! Nothing here assumes SQLite. Job-store and ledger calls take `now`
//! explicitly; the queue's visibility runs on the backend's own clock, which
//! [`Harness::expire_visibility`] moves (a `ManualClock`) or waits out (a real
//! SQS), so the few tests that need it work either way. Receives that must
//! find a message go through [`receive_n`], because SQS may return fewer
//! messages than are available in one call.

pub mod calls;

use std::sync::Arc;
use std::time::Duration;

mod checkpoints;
pub use checkpoints::*;

use ratepool::answer::StepAnswer;
use ratepool::domain::{JobId, ManualClock, Micros, ModelName, OrgName, Priority, StepId, StepKey, TenantId, Usage};
use ratepool::storage::gcra::Rate;
use ratepool::storage::{
    Acquisition, Backend, BucketKey, BucketParams, BucketState, CacheKey, CachedResponse, ChargeId, Checkpoint,
    CreateOutcome, Delivery, JobOutcome, JobRecord, JobStatus, Lease, LeaseOutcome, NewJob, OrgCounters, QueueMessage,
    QueueStats, StorageError, UsageBatch,
};

/// A fixed, realistic epoch (Nov 2023) so stored times look like real ones.
pub const T0: Micros = 1_700_000_000_000_000;
const SEC: Micros = 1_000_000;
const TTL: Duration = Duration::from_secs(30);
const TTL_US: Micros = 30 * SEC;

/// How the backend under test measures queue visibility.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueTime {
    /// Visibility follows the harness's `ManualClock`.
    #[allow(dead_code)] // SQLite's; the AWS suite runs on wall-clock time
    Manual,
    /// Visibility is wall-clock time (a real or emulated SQS).
    #[allow(dead_code)] // the AWS suite's; SQLite runs on the manual clock
    Wall,
}

/// A fresh backend and the means to move its time.
pub struct Harness {
    pub backend: Backend,
    /// The clock the backend was built with; starts at [`T0`].
    pub clock: Arc<ManualClock>,
    /// The queue's visibility timeout the backend was built with.
    pub visibility_timeout: Duration,
    pub queue_time: QueueTime,
    /// Whatever must outlive the backend (a temp dir, an emulator handle);
    /// declared last so it is dropped after the backend. Only held.
    #[allow(dead_code)]
    pub keep_alive: Box<dyn std::any::Any + Send + Sync>,
}

impl Harness {
    /// Lets every message received so far become visible again.
    pub async fn expire_visibility(&self) {
        match self.queue_time {
            QueueTime::Manual => self.clock.advance(self.visibility_timeout + Duration::from_micros(1)),
            QueueTime::Wall => tokio::time::sleep(self.visibility_timeout + Duration::from_millis(1500)).await,
        }
    }
}

// ------------------------------------------------------------------ helpers

fn tenant(s: &str) -> TenantId {
    TenantId::parse(s).expect("tenant")
}
fn org(s: &str) -> OrgName {
    OrgName::parse(s).expect("org")
}
fn model(s: &str) -> ModelName {
    ModelName::parse(s).expect("model")
}

fn msg(priority: Priority) -> QueueMessage {
    QueueMessage { job_id: JobId::generate(), tenant: tenant("acme"), priority }
}

/// Receives until `n` messages arrived or 10 s passed.
pub async fn receive_n(h: &Harness, n: usize) -> Vec<Delivery> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let mut got = Vec::new();
    while got.len() < n && tokio::time::Instant::now() < deadline {
        got.extend(h.backend.queue.receive(n - got.len(), Duration::from_millis(500)).await.expect("receive"));
    }
    got
}

async fn nothing_visible(h: &Harness) -> bool {
    h.backend.queue.receive(10, Duration::ZERO).await.expect("receive").is_empty()
}

fn new_job(tenant_name: &str, idempotency: Option<(&str, &str)>) -> NewJob {
    NewJob {
        id: JobId::generate(),
        tenant: tenant(tenant_name),
        name: "summarise".into(),
        priority: Priority::Batch,
        spec_json: r#"{"steps":[{"id":"a"}]}"#.into(),
        steps_total: 3,
        idempotency: idempotency.map(|(k, h)| (k.to_owned(), h.to_owned())),
        created_at: T0,
        in_flight_limit: None,
    }
}

async fn create(h: &Harness) -> JobId {
    let job = new_job("acme", None);
    match h.backend.jobs.create_job(&job).await.expect("create_job") {
        CreateOutcome::Created(r) => r.id,
        other => panic!("expected Created, got {other:?}"),
    }
}

async fn get(h: &Harness, id: &JobId) -> JobRecord {
    h.backend.jobs.get_job(id).await.expect("get_job").expect("job exists")
}

async fn acquire(h: &Harness, id: &JobId, owner: &str, now: Micros) -> Lease {
    match h.backend.jobs.acquire_lease(id, owner, TTL, now).await.expect("acquire_lease") {
        LeaseOutcome::Acquired(l) => l,
        other => panic!("expected Acquired for {owner}, got {other:?}"),
    }
}

fn checkpoint(step: &str, output: &str, tokens: u64) -> Checkpoint {
    Checkpoint {
        step: StepKey::Step(StepId::parse(step).expect("step")),
        answer: StepAnswer::text(output.into()),
        usage: Usage { calls: 1, prompt_tokens: tokens, completion_tokens: tokens / 2 },
        org: org("org-a"),
        model: model("gpt-4o-mini"),
        attempts: 2,
        started_at: T0 + SEC,
        finished_at: T0 + 2 * SEC,
    }
}

/// Checkpoints every step of a [`new_job`] (its `steps_total` is 3), so
/// that it may finish `succeeded`.
async fn checkpoint_all(h: &Harness, lease: &Lease, now: Micros) {
    for step in ["s1", "s2", "s3"] {
        h.backend.jobs.put_checkpoint(lease, &checkpoint(step, "x", 1), now).await.expect("checkpoint");
    }
}

fn assert_lease_lost<T: std::fmt::Debug>(r: Result<T, StorageError>, what: &str) {
    assert!(matches!(r, Err(StorageError::LeaseLost)), "{what}: expected LeaseLost, got {r:?}");
}

fn assert_stale<T: std::fmt::Debug>(r: Result<T, StorageError>, what: &str) {
    assert!(matches!(r, Err(StorageError::StaleReceipt)), "{what}: expected StaleReceipt, got {r:?}");
}

fn assert_mismatch<T: std::fmt::Debug>(r: Result<T, StorageError>, what: &str) {
    assert!(
        matches!(r, Err(StorageError::IdempotencyMismatch { .. })),
        "{what}: expected IdempotencyMismatch, got {r:?}"
    );
}

// ------------------------------------------------------------------ queue

pub async fn queue_send_receive_delete(h: &Harness) {
    let q = &h.backend.queue;
    let m = msg(Priority::Interactive);
    q.send(&m).await.expect("send");
    let got = receive_n(h, 1).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message, m);
    assert_eq!(got[0].receive_count, 1);
    assert!(nothing_visible(h).await, "a received message is hidden");
    q.delete(&got[0].receipt).await.expect("delete");
    h.expire_visibility().await;
    assert!(nothing_visible(h).await, "a deleted message never comes back");
    assert_eq!(q.stats().await.expect("stats"), QueueStats::default());
}

pub async fn queue_visibility_timeout_redelivers(h: &Harness) {
    let m = msg(Priority::Interactive);
    h.backend.queue.send(&m).await.expect("send");
    let first = receive_n(h, 1).await;
    assert_eq!(first.len(), 1);
    h.expire_visibility().await;
    let again = receive_n(h, 1).await;
    assert_eq!(again.len(), 1, "an undeleted message comes back after its visibility timeout");
    assert_eq!(again[0].message, m);
    assert_eq!(again[0].receive_count, 2);
    assert_ne!(again[0].receipt, first[0].receipt, "each receive gets a fresh receipt");
}

pub async fn queue_extend_keeps_message_hidden(h: &Harness) {
    let q = &h.backend.queue;
    q.send(&msg(Priority::Interactive)).await.expect("send");
    let d = receive_n(h, 1).await;
    assert_eq!(d.len(), 1);
    q.extend(&d[0].receipt, h.visibility_timeout * 10).await.expect("extend");
    h.expire_visibility().await;
    assert!(nothing_visible(h).await, "an extended message stays hidden past the original timeout");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.visible, stats.in_flight), (0, 1));
}

pub async fn queue_extend_zero_hands_message_back(h: &Harness) {
    let q = &h.backend.queue;
    let m = msg(Priority::Batch);
    q.send(&m).await.expect("send");
    let d = receive_n(h, 1).await;
    assert_eq!(d.len(), 1);
    q.extend(&d[0].receipt, Duration::ZERO).await.expect("extend 0");
    let again = receive_n(h, 1).await;
    assert_eq!(again.len(), 1, "a handed-back message is visible at once");
    assert_eq!(again[0].message, m);
    assert_eq!(again[0].receive_count, 2);
}

pub async fn queue_stale_receipt_cannot_extend(h: &Harness) {
    let q = &h.backend.queue;
    q.send(&msg(Priority::Interactive)).await.expect("send");
    let old = receive_n(h, 1).await;
    h.expire_visibility().await;
    let new = receive_n(h, 1).await;
    assert_eq!((old.len(), new.len()), (1, 1));
    assert_stale(q.extend(&old[0].receipt, Duration::ZERO).await, "extend with a stale receipt");
    assert!(nothing_visible(h).await, "the stale extend did not hand the message back");
    q.extend(&new[0].receipt, h.visibility_timeout).await.expect("the current receipt still works");
}

pub async fn queue_stale_receipt_cannot_delete(h: &Harness) {
    let q = &h.backend.queue;
    let m = msg(Priority::Interactive);
    q.send(&m).await.expect("send");
    let old = receive_n(h, 1).await;
    h.expire_visibility().await;
    let new = receive_n(h, 1).await;
    assert_eq!((old.len(), new.len()), (1, 1));
    assert_stale(q.delete(&old[0].receipt).await, "delete with a stale receipt");
    // The message is still there: hand it back with the current receipt.
    q.extend(&new[0].receipt, Duration::ZERO).await.expect("current receipt");
    let third = receive_n(h, 1).await;
    assert_eq!(third.len(), 1, "the stale delete removed nothing");
    assert_eq!(third[0].message, m);
    assert_eq!(third[0].receive_count, 3);
}

pub async fn queue_defer_hides_and_starts_receive_count_again(h: &Harness) {
    let q = &h.backend.queue;
    let m = msg(Priority::Batch);
    q.send(&m).await.expect("send");
    let first = receive_n(h, 1).await;
    assert_eq!(first.len(), 1);
    h.expire_visibility().await;
    let second = receive_n(h, 1).await;
    assert_eq!(second.len(), 1);
    assert_eq!(second[0].receive_count, 2);
    q.defer(&second[0], h.visibility_timeout).await.expect("defer");
    assert!(nothing_visible(h).await, "a deferred message is hidden for its delay");
    assert_stale(q.extend(&second[0].receipt, Duration::ZERO).await, "extend with a deferred receipt");
    assert_stale(q.defer(&first[0], Duration::ZERO).await, "defer with a stale receipt");
    let stats = q.stats().await.expect("stats");
    assert_eq!((stats.visible + stats.in_flight, stats.dead), (1, 0), "one copy, not two: {stats:?}");
    h.expire_visibility().await;
    let again = receive_n(h, 1).await;
    assert_eq!(again.len(), 1, "a deferred message comes back after its delay");
    assert_eq!(again[0].message, m);
    assert_eq!(again[0].receive_count, 1, "deferring starts the receive count again");
    q.delete(&again[0].receipt).await.expect("delete");
}

pub async fn queue_dead_letter_moves_message(h: &Harness) {
    let q = &h.backend.queue;
    let (a, b) = (msg(Priority::Interactive), msg(Priority::Interactive));
    q.send(&a).await.expect("send a");
    q.send(&b).await.expect("send b");
    let got = receive_n(h, 2).await;
    assert_eq!(got.len(), 2);
    let da = got.iter().find(|d| d.message == a).expect("a received");
    let db = got.iter().find(|d| d.message == b).expect("b received");
    q.dead_letter(da).await.expect("dead_letter");
    let listed = q.dead_letters(10).await.expect("dead_letters");
    assert_eq!(listed.iter().map(|d| d.message.clone()).collect::<Vec<_>>(), vec![a.clone()]);
    assert_eq!(listed[0].receive_count, da.receive_count);
    assert_eq!(q.stats().await.expect("stats"), QueueStats { visible: 0, in_flight: 1, dead: 1 });
    q.delete(&db.receipt).await.expect("delete b");
    h.expire_visibility().await;
    assert!(nothing_visible(h).await, "a dead-lettered message is not delivered again");
    assert_eq!(q.stats().await.expect("stats"), QueueStats { visible: 0, in_flight: 0, dead: 1 });
    let listed = q.dead_letters(10).await.expect("dead_letters");
    assert_eq!(listed.into_iter().map(|d| d.message).collect::<Vec<_>>(), vec![a], "listing does not remove");
}

/// `ratepool dlq redrive` and `fail`: a dead letter goes back to its work
/// queue as a new message, or is deleted; the others stay where they are.
pub async fn queue_dead_letters_are_redriven_or_removed(h: &Harness) {
    let q = &h.backend.queue;
    let (a, b, c) = (msg(Priority::Interactive), msg(Priority::Batch), msg(Priority::Interactive));
    for m in [&a, &b, &c] {
        q.send(m).await.expect("send");
    }
    let got = receive_n(h, 3).await;
    assert_eq!(got.len(), 3);
    for d in &got {
        q.dead_letter(d).await.expect("dead_letter");
    }
    assert_eq!(q.stats().await.expect("stats"), QueueStats { visible: 0, in_flight: 0, dead: 3 });
    assert_eq!(q.redrive_dead_letters(Some(&b.job_id)).await.expect("redrive"), vec![b.clone()]);
    let again = receive_n(h, 1).await;
    assert_eq!(again.iter().map(|d| (&d.message, d.receive_count)).collect::<Vec<_>>(), vec![(&b, 1)]);
    q.delete(&again[0].receipt).await.expect("delete");
    assert_eq!(q.remove_dead_letters(Some(&a.job_id)).await.expect("remove"), vec![a.clone()]);
    assert_eq!(q.remove_dead_letters(Some(&a.job_id)).await.expect("remove again"), vec![], "nothing twice");
    let left = q.dead_letters(10).await.expect("dead_letters");
    assert_eq!(left.into_iter().map(|d| d.message).collect::<Vec<_>>(), vec![c.clone()], "the others stay");
    assert_eq!(q.redrive_dead_letters(None).await.expect("redrive all"), vec![c.clone()]);
    assert_eq!(receive_n(h, 1).await.into_iter().map(|d| d.message).collect::<Vec<_>>(), vec![c]);
    assert_eq!(q.stats().await.expect("stats").dead, 0);
}

pub async fn queue_interactive_before_batch(h: &Harness) {
    let q = &h.backend.queue;
    let batch = [msg(Priority::Batch), msg(Priority::Batch)];
    let interactive = [msg(Priority::Interactive), msg(Priority::Interactive)];
    for m in batch.iter().chain(&interactive) {
        q.send(m).await.expect("send");
    }
    let mut order = Vec::new();
    for _ in 0..4 {
        let d = receive_n(h, 1).await;
        assert_eq!(d.len(), 1);
        order.push(d[0].message.priority);
    }
    use Priority::{Batch, Interactive};
    assert_eq!(order, vec![Interactive, Interactive, Batch, Batch], "interactive lane first although sent last");
}

/// With both lanes full, every fourth take (the default weight 3) serves
/// the batch lane first, so a flood of interactive jobs cannot starve it.
pub async fn queue_batch_lane_gets_one_take_in_four(h: &Harness) {
    let q = &h.backend.queue;
    for _ in 0..8 {
        q.send(&msg(Priority::Batch)).await.expect("send");
        q.send(&msg(Priority::Interactive)).await.expect("send");
    }
    let mut order = Vec::new();
    for _ in 0..8 {
        let d = q.receive(1, Duration::from_millis(500)).await.expect("receive");
        assert_eq!(d.len(), 1, "a message waits in both lanes");
        order.push(d[0].message.priority);
    }
    use Priority::{Batch, Interactive};
    let i = Interactive;
    assert_eq!(order, vec![i, i, i, Batch, i, i, i, Batch], "one take in four looks at batch first");
}

pub async fn queue_receive_waits_when_empty(h: &Harness) {
    let start = std::time::Instant::now();
    let got = h.backend.queue.receive(1, Duration::from_secs(1)).await.expect("receive");
    let took = start.elapsed();
    assert!(got.is_empty());
    assert!(took >= Duration::from_millis(900), "returned after {took:?}, before `wait` passed");
    assert!(took < Duration::from_secs(5), "waited {took:?}, far beyond `wait`");
}

pub async fn queue_receive_returns_early_when_sent(h: &Harness) {
    let q = h.backend.queue.clone();
    let waiter = tokio::spawn(async move {
        let start = std::time::Instant::now();
        let got = q.receive(1, Duration::from_secs(20)).await;
        (got, start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let m = msg(Priority::Interactive);
    h.backend.queue.send(&m).await.expect("send");
    let (got, took) = waiter.await.expect("join");
    let got = got.expect("receive");
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].message, m);
    assert!(took < Duration::from_secs(3), "receive took {took:?}; it should return soon after the send");
}

// ------------------------------------------------------------------ jobs

pub async fn webhook_report_round_trips_and_needs_its_job(h: &Harness) {
    use ratepool::storage::{DeliveryReport, DeliveryStatus};
    let jobs = &h.backend.jobs;
    let (a, b) = (new_job("acme", None), new_job("acme", None));
    for j in [&a, &b] {
        jobs.create_job(j).await.expect("create");
    }
    assert_eq!(jobs.webhook_report(&a.id).await.expect("read"), None, "no report before a delivery");
    let failed = DeliveryReport {
        status: DeliveryStatus::Failed,
        attempts: 8,
        last_error: Some("HTTP 503 from hooks.example.com".into()),
        last_status: Some(503),
    };
    jobs.put_webhook_report(&a.id, &failed, T0).await.expect("put");
    assert_eq!(jobs.webhook_report(&a.id).await.expect("read"), Some(failed));
    let delivered =
        DeliveryReport { status: DeliveryStatus::Delivered, attempts: 1, last_error: None, last_status: Some(200) };
    jobs.put_webhook_report(&a.id, &delivered, T0 + SEC).await.expect("overwrite");
    assert_eq!(jobs.webhook_report(&a.id).await.expect("read"), Some(delivered.clone()), "the later report wins");
    assert_eq!(jobs.webhook_report(&b.id).await.expect("read"), None, "reports are per job");
    let ghost = JobId::generate();
    assert!(jobs.put_webhook_report(&ghost, &delivered, T0).await.is_err(), "a report needs its job");
    assert_eq!(jobs.webhook_report(&ghost).await.expect("read"), None, "the refused report left nothing");
    // The job record itself is unchanged by a report.
    assert_eq!(jobs.get_job(&a.id).await.expect("get").expect("job").status, JobStatus::Queued);
}

pub async fn jobs_create_and_get(h: &Harness) {
    let job = new_job("acme", Some(("key-1", "hash-1")));
    let created = match h.backend.jobs.create_job(&job).await.expect("create") {
        CreateOutcome::Created(r) => r,
        other => panic!("expected Created, got {other:?}"),
    };
    let expected = JobRecord {
        id: job.id.clone(),
        tenant: job.tenant.clone(),
        name: job.name.clone(),
        priority: job.priority,
        status: JobStatus::Queued,
        spec_json: job.spec_json.clone(),
        steps_total: 3,
        steps_done: 0,
        usage: Usage::default(),
        error: None,
        created_at: T0,
        updated_at: T0,
        finished_at: None,
        lease_owner: None,
        lease_expires_at: None,
        stalled_runs: 0,
    };
    assert_eq!(created, expected);
    assert_eq!(h.backend.jobs.get_job(&job.id).await.expect("get"), Some(expected));
    assert_eq!(h.backend.jobs.get_job(&JobId::generate()).await.expect("get"), None);
}

pub async fn jobs_idempotent_create(h: &Harness) {
    let jobs = &h.backend.jobs;
    let first = new_job("acme", Some(("key-1", "hash-1")));
    let first_id = match jobs.create_job(&first).await.expect("create") {
        CreateOutcome::Created(r) => r.id,
        other => panic!("expected Created, got {other:?}"),
    };

    let repeat = new_job("acme", Some(("key-1", "hash-1")));
    match jobs.create_job(&repeat).await.expect("repeat") {
        CreateOutcome::Existing(r) => {
            assert_eq!(r.id, first_id, "the repeat returns the first job")
        }
        other => panic!("expected Existing, got {other:?}"),
    }
    assert_eq!(jobs.get_job(&repeat.id).await.expect("get"), None, "the repeat stored nothing");

    let changed = new_job("acme", Some(("key-1", "hash-2")));
    assert_mismatch(jobs.create_job(&changed).await, "same key, different body");
    assert_eq!(jobs.get_job(&changed.id).await.expect("get"), None);

    let other_tenant = new_job("globex", Some(("key-1", "hash-1")));
    match jobs.create_job(&other_tenant).await.expect("other tenant") {
        CreateOutcome::Created(r) => {
            assert_eq!(r.id, other_tenant.id);
            assert_ne!(r.id, first_id);
        }
        other => panic!("keys are per tenant; expected Created, got {other:?}"),
    }
}

pub async fn jobs_replay_finds_a_keyed_job_and_creates_nothing(h: &Harness) {
    let jobs = &h.backend.jobs;
    let first = new_job("acme", Some(("key-1", "hash-1")));
    let acme = first.tenant.clone();
    assert_eq!(jobs.replay(&acme, "key-1", "hash-1").await.expect("unused key"), None);
    let created = match jobs.create_job(&first).await.expect("create") {
        CreateOutcome::Created(r) => r,
        other => panic!("expected Created, got {other:?}"),
    };
    assert_eq!(jobs.replay(&acme, "key-1", "hash-1").await.expect("replay"), Some(created));
    assert_mismatch(jobs.replay(&acme, "key-1", "hash-2").await, "same key, different body");
    assert_eq!(jobs.replay(&acme, "key-2", "hash-1").await.expect("another key"), None);
    let globex = tenant("globex");
    assert_eq!(jobs.replay(&globex, "key-1", "hash-1").await.expect("another tenant"), None, "keys are per tenant");
    // Asking created nothing.
    assert_eq!(jobs.jobs_in_flight(&acme).await.expect("count"), 1);
    assert_eq!(jobs.jobs_in_flight(&globex).await.expect("count"), 0);
}

pub async fn lease_acquire_held_and_takeover(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    assert_eq!((a.owner.as_str(), a.expires_at, &a.job_id), ("worker-a", T0 + TTL_US, &id));
    let rec = get(h, &id).await;
    assert_eq!(rec.status, JobStatus::Running);
    assert_eq!(rec.lease_owner.as_deref(), Some("worker-a"));
    assert_eq!(rec.lease_expires_at, Some(a.expires_at));

    let held = LeaseOutcome::Held { owner: "worker-a".into(), expires_at: a.expires_at };
    assert_eq!(jobs.acquire_lease(&id, "worker-b", TTL, T0 + 1).await.expect("acquire"), held);
    assert_eq!(
        jobs.acquire_lease(&id, "worker-a", TTL, a.expires_at - 1).await.expect("acquire"),
        held,
        "an unexpired lease is held even against the same owner string"
    );

    let b = acquire(h, &id, "worker-b", a.expires_at).await;
    assert!(b.epoch > a.epoch, "epoch grows on takeover ({} -> {})", a.epoch, b.epoch);
    assert_eq!(get(h, &id).await.lease_owner.as_deref(), Some("worker-b"));

    assert_eq!(
        jobs.acquire_lease(&JobId::generate(), "worker-a", TTL, T0).await.expect("acquire"),
        LeaseOutcome::Missing
    );
}

pub async fn lease_renew_extends(h: &Harness) {
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    let renewed = h.backend.jobs.renew_lease(&a, TTL, T0 + 10 * SEC).await.expect("renew");
    assert_eq!(renewed.epoch, a.epoch);
    assert_eq!(renewed.expires_at, T0 + 10 * SEC + TTL_US);
    assert_eq!(get(h, &id).await.lease_expires_at, Some(renewed.expires_at));
    // Past the original expiry, the renewed lease still writes.
    h.backend.jobs.put_checkpoint(&renewed, &checkpoint("s1", "x", 10), a.expires_at + 1).await.expect("checkpoint");
}

pub async fn lease_release_lets_another_worker_in(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    jobs.release_lease(&a).await.expect("release");
    assert_eq!(get(h, &id).await.lease_owner, None);
    let b = acquire(h, &id, "worker-b", T0 + 1).await;
    assert!(b.epoch > a.epoch);
    assert_lease_lost(jobs.put_checkpoint(&a, &checkpoint("s1", "x", 1), T0 + 2).await, "checkpoint after release");
    // Releasing again with the old lease must not free the new holder's.
    let _ = jobs.release_lease(&a).await;
    assert_eq!(get(h, &id).await.lease_owner.as_deref(), Some("worker-b"));
}

pub async fn checkpoint_with_held_lease(h: &Harness) {
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    let cp = checkpoint("s1", "hello", 100);
    h.backend.jobs.put_checkpoint(&a, &cp, T0 + 1).await.expect("checkpoint");
    let rec = get(h, &id).await;
    assert_eq!(rec.steps_done, 1);
    assert_eq!(rec.usage, cp.usage);
    assert_eq!(h.backend.jobs.checkpoints(&id).await.expect("checkpoints"), vec![cp]);
}

pub async fn stalled_runs_count_acquisitions_since_progress(h: &Harness) {
    let id = create(h).await;
    assert_eq!(get(h, &id).await.stalled_runs, 0);
    // Two runs die without progress (their leases lapse).
    acquire(h, &id, "worker-a", T0).await;
    acquire(h, &id, "worker-b", T0 + TTL_US).await;
    assert_eq!(get(h, &id).await.stalled_runs, 2);
    // A refused acquisition (lease held) is not a run.
    assert!(matches!(
        h.backend.jobs.acquire_lease(&id, "worker-c", TTL, T0 + TTL_US + 1).await.expect("acquire"),
        LeaseOutcome::Held { .. }
    ));
    assert_eq!(get(h, &id).await.stalled_runs, 2);
    // The third run makes progress: the count starts over.
    let c = acquire(h, &id, "worker-c", T0 + 2 * TTL_US).await;
    assert_eq!(get(h, &id).await.stalled_runs, 3);
    h.backend.jobs.put_checkpoint(&c, &checkpoint("s1", "x", 1), T0 + 2 * TTL_US + 1).await.expect("checkpoint");
    assert_eq!(get(h, &id).await.stalled_runs, 0);
    acquire(h, &id, "worker-d", T0 + 4 * TTL_US).await;
    assert_eq!(get(h, &id).await.stalled_runs, 1);
}

/// A run handed back (shutdown, a storage error) did not crash: releasing
/// its lease takes it back off `stalled_runs`, so many deploys during one
/// long step never make the job look poison; a crash (lapsed lease) still
/// counts, and a count already 0 stays 0.
pub async fn released_runs_are_not_stalled_runs(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    for i in 0..6 {
        let l = acquire(h, &id, &format!("worker-{i}"), T0 + i).await;
        assert_eq!(get(h, &id).await.stalled_runs, 1);
        jobs.release_lease(&l).await.expect("release");
        assert_eq!(get(h, &id).await.stalled_runs, 0, "hand-back {i}");
    }
    // Two crashes, then a hand-back: the crashes still count.
    acquire(h, &id, "crash-a", T0 + 10).await;
    acquire(h, &id, "crash-b", T0 + 10 + TTL_US).await;
    let c = acquire(h, &id, "handed-back", T0 + 10 + 2 * TTL_US).await;
    assert_eq!(get(h, &id).await.stalled_runs, 3);
    jobs.release_lease(&c).await.expect("release");
    assert_eq!(get(h, &id).await.stalled_runs, 2);
    // A run that made progress and then handed back: 0, never below.
    let d = acquire(h, &id, "progress", T0 + 11 + 2 * TTL_US).await;
    jobs.put_checkpoint(&d, &checkpoint("s1", "x", 1), T0 + 12 + 2 * TTL_US).await.expect("checkpoint");
    jobs.release_lease(&d).await.expect("release");
    let rec = get(h, &id).await;
    assert_eq!((rec.stalled_runs, rec.lease_owner), (0, None));
    // A stale lease's release changes nothing, the count included.
    let e = acquire(h, &id, "current", T0 + 13 + 2 * TTL_US).await;
    jobs.release_lease(&c).await.expect("stale release is not an error");
    let rec = get(h, &id).await;
    assert_eq!((rec.stalled_runs, rec.lease_owner.as_deref()), (1, Some(e.owner.as_str())));
}

/// A job is stored marked unsent; it is listed (past its grace) until its
/// message is sent and it is marked sent, so a crash or a failed send
/// between storing and sending never leaves a queued job nothing will run.
pub async fn unsent_jobs_are_listed_until_sent(h: &Harness) {
    let jobs = &h.backend.jobs;
    let a = create(h).await;
    let mut later = new_job("acme", None);
    later.created_at = T0 + 10 * SEC;
    let b = created(h, &later).await;
    let listed = |v: Vec<QueueMessage>| v.into_iter().map(|m| m.job_id).collect::<Vec<_>>();
    assert_eq!(listed(jobs.unsent_jobs(T0 + SEC, 10).await.expect("unsent")), vec![a.clone()], "only past the grace");
    assert_eq!(listed(jobs.unsent_jobs(T0 + 10 * SEC, 10).await.expect("unsent")), vec![a.clone(), b.clone()]);
    assert_eq!(listed(jobs.unsent_jobs(T0 + 10 * SEC, 1).await.expect("unsent")), vec![a.clone()], "oldest first");
    let rec = get(h, &a).await;
    h.backend
        .queue
        .send(&QueueMessage { job_id: a.clone(), tenant: rec.tenant, priority: rec.priority })
        .await
        .expect("send");
    jobs.mark_sent(&a).await.expect("mark sent");
    jobs.mark_sent(&a).await.expect("marking twice is harmless");
    assert_eq!(listed(jobs.unsent_jobs(T0 + 10 * SEC, 10).await.expect("unsent")), vec![b]);
}

pub async fn checkpoint_with_stale_epoch_is_lease_lost(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let old = acquire(h, &id, "worker-a", T0).await;
    // The same owner string takes the job again after its lease lapsed.
    let new = acquire(h, &id, "worker-a", old.expires_at).await;
    assert!(new.epoch > old.epoch);
    assert_lease_lost(
        jobs.put_checkpoint(&old, &checkpoint("s1", "stale", 1), old.expires_at + 1).await,
        "stale epoch",
    );
    assert!(jobs.checkpoints(&id).await.expect("checkpoints").is_empty(), "nothing written");
    let rec = get(h, &id).await;
    assert_eq!((rec.steps_done, rec.usage), (0, Usage::default()));
    jobs.put_checkpoint(&new, &checkpoint("s1", "fresh", 1), old.expires_at + 1).await.expect("current epoch writes");
}

pub async fn checkpoint_after_expiry_is_lease_lost(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    assert_lease_lost(jobs.put_checkpoint(&a, &checkpoint("s1", "x", 1), a.expires_at).await, "at expiry");
    assert!(jobs.checkpoints(&id).await.expect("checkpoints").is_empty());
    assert_eq!(get(h, &id).await.steps_done, 0);
    // Nobody took it over, so the holder may renew and carry on.
    let renewed = jobs.renew_lease(&a, TTL, a.expires_at + 5).await.expect("renew an expired, untaken lease");
    jobs.put_checkpoint(&renewed, &checkpoint("s1", "x", 1), a.expires_at + 6).await.expect("after renewal");
}

pub async fn checkpoint_duplicate_is_conflict(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    let first = checkpoint("s1", "first", 100);
    jobs.put_checkpoint(&a, &first, T0 + 1).await.expect("first");
    let dup = jobs.put_checkpoint(&a, &checkpoint("s1", "second", 7), T0 + 2).await;
    assert!(matches!(&dup, Err(StorageError::CheckpointExists(s)) if s.to_string() == "s1"), "duplicate step: {dup:?}");
    let rec = get(h, &id).await;
    assert_eq!(rec.steps_done, 1, "a duplicate does not count");
    assert_eq!(rec.usage, first.usage, "a duplicate adds no usage");
    assert_eq!(jobs.checkpoints(&id).await.expect("checkpoints"), vec![first]);
}

pub async fn checkpoints_round_trip(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    let one = checkpoint("alpha", "first output, with \"quotes\" and ünïcode\nand lines", 120);
    let two = Checkpoint {
        step: StepKey::Step(StepId::parse("beta.2").expect("step")),
        answer: StepAnswer::text(String::new()),
        usage: Usage { calls: 3, prompt_tokens: 4_000_000_000, completion_tokens: 17 },
        org: org("org-b"),
        model: model("gpt-4.1"),
        attempts: 5,
        started_at: T0 + 3 * SEC,
        finished_at: T0 + 9 * SEC + 123,
    };
    jobs.put_checkpoint(&a, &one, T0 + 1).await.expect("one");
    jobs.put_checkpoint(&a, &two, T0 + 2).await.expect("two");
    let mut stored = jobs.checkpoints(&id).await.expect("checkpoints");
    stored.sort_by(|x, y| x.step.cmp(&y.step));
    assert_eq!(stored, vec![one.clone(), two.clone()]);
    let rec = get(h, &id).await;
    let mut total = one.usage;
    total.add(&two.usage);
    assert_eq!((rec.steps_done, rec.usage), (2, total));
    assert!(jobs.checkpoints(&JobId::generate()).await.expect("checkpoints").is_empty());
}

pub async fn finish_job_succeeded_and_failed(h: &Harness) {
    let jobs = &h.backend.jobs;
    let ok = create(h).await;
    let a = acquire(h, &ok, "worker-a", T0).await;
    checkpoint_all(h, &a, T0 + 4).await;
    jobs.finish_job(&a, &JobOutcome::Succeeded, T0 + 5).await.expect("finish");
    let rec = get(h, &ok).await;
    assert_eq!(rec.status, JobStatus::Succeeded);
    assert_eq!(rec.finished_at, Some(T0 + 5));
    assert_eq!(rec.error, None);
    assert_eq!((rec.lease_owner, rec.lease_expires_at), (None, None), "finishing clears the lease");
    assert_eq!(
        jobs.acquire_lease(&ok, "worker-b", TTL, T0 + 6).await.expect("acquire"),
        LeaseOutcome::Finished(JobStatus::Succeeded)
    );

    let bad = create(h).await;
    let b = acquire(h, &bad, "worker-a", T0).await;
    jobs.finish_job(&b, &JobOutcome::Failed("step s3: model refused".into()), T0 + 7).await.expect("finish");
    let rec = get(h, &bad).await;
    assert_eq!(rec.status, JobStatus::Failed);
    assert_eq!(rec.error.as_deref(), Some("step s3: model refused"));
    assert_eq!(rec.finished_at, Some(T0 + 7));
    assert_eq!(rec.lease_owner, None);
}

pub async fn finish_job_with_lost_lease(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    let b = acquire(h, &id, "worker-b", a.expires_at).await;
    assert_lease_lost(jobs.finish_job(&a, &JobOutcome::Succeeded, a.expires_at + 1).await, "taken over");
    let rec = get(h, &id).await;
    assert_eq!(rec.status, JobStatus::Running);
    assert_eq!(rec.lease_owner.as_deref(), Some(b.owner.as_str()));
    assert_eq!(rec.finished_at, None);

    // Lapsed, even if nobody took it over: finishing needs a live lease.
    let other = create(h).await;
    let c = acquire(h, &other, "worker-c", T0).await;
    assert_lease_lost(jobs.finish_job(&c, &JobOutcome::Succeeded, c.expires_at).await, "expired");
    assert_eq!(get(h, &other).await.status, JobStatus::Running);
}

/// The final write is guarded: a job whose progress shows a step never
/// checkpointed (a write that answered success and did not land) is not
/// marked succeeded; it stays running under the same lease, so its run can
/// hand it back and the next one runs the missing step.
pub async fn finish_succeeded_needs_every_step_checkpointed(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    jobs.put_checkpoint(&a, &checkpoint("s1", "x", 1), T0 + 1).await.expect("s1");
    jobs.put_checkpoint(&a, &checkpoint("s3", "z", 1), T0 + 2).await.expect("s3");
    let r = jobs.finish_job(&a, &JobOutcome::Succeeded, T0 + 3).await;
    assert!(
        matches!(r, Err(StorageError::StepsMissing { done: 2, total: 3 })),
        "expected StepsMissing 2 of 3, got {r:?}"
    );
    let rec = get(h, &id).await;
    assert_eq!((rec.status, rec.steps_done, rec.finished_at), (JobStatus::Running, 2, None), "nothing written");
    assert_eq!(rec.lease_owner.as_deref(), Some("worker-a"), "the lease is still held");
    assert_eq!(in_flight(h, "acme").await, 1, "not counted out");

    // A lost lease is reported as such, whatever the progress.
    let b = acquire(h, &id, "worker-b", a.expires_at).await;
    assert_lease_lost(jobs.finish_job(&a, &JobOutcome::Succeeded, a.expires_at + 1).await, "taken over");
    // The next run writes the missing step and may finish.
    jobs.put_checkpoint(&b, &checkpoint("s2", "y", 1), a.expires_at + 2).await.expect("s2");
    jobs.finish_job(&b, &JobOutcome::Succeeded, a.expires_at + 3).await.expect("finish");
    assert_eq!(get(h, &id).await.status, JobStatus::Succeeded);
    assert_eq!(in_flight(h, "acme").await, 0);

    // A failure needs no progress.
    let other = create(h).await;
    let c = acquire(h, &other, "worker-c", T0).await;
    jobs.finish_job(&c, &JobOutcome::Failed("step s1: refused".into()), T0 + 1).await.expect("fail");
    assert_eq!(get(h, &other).await.status, JobStatus::Failed);
}

pub async fn cancel_queued_job(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    assert_eq!(jobs.cancel_job(&id, T0 + 3).await.expect("cancel"), Some(JobStatus::Cancelled));
    let rec = get(h, &id).await;
    assert_eq!(rec.status, JobStatus::Cancelled);
    assert_eq!(rec.finished_at, Some(T0 + 3));
    assert_eq!(
        jobs.acquire_lease(&id, "worker-a", TTL, T0 + 4).await.expect("acquire"),
        LeaseOutcome::Finished(JobStatus::Cancelled)
    );
    assert_eq!(jobs.cancel_job(&id, T0 + 5).await.expect("cancel again"), Some(JobStatus::Cancelled));
    assert_eq!(jobs.cancel_job(&JobId::generate(), T0).await.expect("cancel missing"), None);
}

pub async fn cancel_running_job_revokes_lease(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    jobs.put_checkpoint(&a, &checkpoint("s1", "x", 1), T0 + 1).await.expect("checkpoint");
    assert_eq!(jobs.cancel_job(&id, T0 + 2).await.expect("cancel"), Some(JobStatus::Cancelled));
    assert_lease_lost(jobs.renew_lease(&a, TTL, T0 + 3).await, "renew after cancel");
    assert_lease_lost(jobs.put_checkpoint(&a, &checkpoint("s2", "y", 1), T0 + 3).await, "checkpoint after cancel");
    assert_lease_lost(jobs.finish_job(&a, &JobOutcome::Succeeded, T0 + 3).await, "finish after cancel");
    let rec = get(h, &id).await;
    assert_eq!(rec.status, JobStatus::Cancelled);
    assert_eq!(rec.steps_done, 1);
    assert_eq!((rec.lease_owner, rec.lease_expires_at), (None, None));
}

pub async fn cancel_finished_job_is_left_alone(h: &Harness) {
    let jobs = &h.backend.jobs;
    let id = create(h).await;
    let a = acquire(h, &id, "worker-a", T0).await;
    checkpoint_all(h, &a, T0).await;
    jobs.finish_job(&a, &JobOutcome::Succeeded, T0 + 1).await.expect("finish");
    assert_eq!(jobs.cancel_job(&id, T0 + 2).await.expect("cancel"), Some(JobStatus::Succeeded));
    let rec = get(h, &id).await;
    assert_eq!(rec.status, JobStatus::Succeeded);
    assert_eq!(rec.finished_at, Some(T0 + 1));
}

pub async fn fail_unleased_job(h: &Harness) {
    let jobs = &h.backend.jobs;
    let queued = create(h).await;
    jobs.fail_unleased(&queued, "dead-lettered after 5 receives", T0 + 1).await.expect("fail queued");
    let rec = get(h, &queued).await;
    assert_eq!(rec.status, JobStatus::Failed);
    assert_eq!(rec.error.as_deref(), Some("dead-lettered after 5 receives"));
    assert_eq!(rec.finished_at, Some(T0 + 1));

    let running = create(h).await;
    let a = acquire(h, &running, "worker-a", T0).await;
    jobs.fail_unleased(&running, "worker crashed repeatedly", T0 + 2).await.expect("fail running");
    let rec = get(h, &running).await;
    assert_eq!(rec.status, JobStatus::Failed);
    assert_eq!(rec.lease_owner, None);
    assert_lease_lost(jobs.put_checkpoint(&a, &checkpoint("s1", "x", 1), T0 + 3).await, "holder after fail");

    let done = create(h).await;
    let b = acquire(h, &done, "worker-b", T0).await;
    checkpoint_all(h, &b, T0).await;
    jobs.finish_job(&b, &JobOutcome::Succeeded, T0 + 1).await.expect("finish");
    jobs.fail_unleased(&done, "too late", T0 + 4).await.expect("fail finished");
    let rec = get(h, &done).await;
    assert_eq!((rec.status, rec.error), (JobStatus::Succeeded, None), "a finished job is left as it is");
}

// ------------------------------------------------------------------ ledger

fn key() -> BucketKey {
    BucketKey::new(&org("org-a"), &model("gpt-4o-mini"))
}

fn params(rpm: u64, tpm: u64) -> BucketParams {
    BucketParams { requests: Rate::per_minute(rpm), tokens: Rate::per_minute(tpm) }
}

fn one_call(tokens: u64) -> ratepool::storage::Cost {
    ratepool::storage::Cost { requests: 1, tokens }
}

pub async fn ledger_grants_up_to_limit_then_denies(h: &Harness) {
    let ledger = &h.backend.ledger;
    let (k, p) = (key(), params(5, 1_000));
    for i in 0..5 {
        let r = ledger.acquire(&k, &p, one_call(100), T0, ChargeId::new()).await.expect("acquire");
        assert!(matches!(r, Acquisition::Granted(_)), "call {i} fits the burst: {r:?}");
    }
    // 5 rpm: 12 s per request; 1,000 tpm: 6 s per 100 tokens.
    let full = BucketState { requests_tat: T0 + 60 * SEC, tokens_tat: T0 + 30 * SEC };
    assert_eq!(ledger.state(&k).await.expect("state"), full);
    assert_eq!(
        ledger.acquire(&k, &p, one_call(100), T0, ChargeId::new()).await.expect("acquire"),
        Acquisition::Denied { retry_at: T0 + 12 * SEC, state: full },
    );
    assert_eq!(ledger.state(&k).await.expect("state"), full, "a denial charges nothing");
    assert!(matches!(
        ledger.acquire(&k, &p, one_call(100), T0 + 12 * SEC - 1, ChargeId::new()).await.expect("acquire"),
        Acquisition::Denied { .. }
    ));
    assert_eq!(
        ledger.acquire(&k, &p, one_call(100), T0 + 12 * SEC, ChargeId::new()).await.expect("acquire"),
        Acquisition::Granted(BucketState { requests_tat: T0 + 72 * SEC, tokens_tat: T0 + 36 * SEC }),
    );
    let other = BucketKey::new(&org("org-b"), &model("gpt-4o-mini"));
    assert_eq!(ledger.state(&other).await.expect("state"), BucketState::default(), "buckets are per (org, model)");
}

pub async fn ledger_never_for_oversized_cost(h: &Harness) {
    let ledger = &h.backend.ledger;
    assert_eq!(
        ledger.acquire(&key(), &params(5, 1_000), one_call(1_001), T0, ChargeId::new()).await.expect("acquire"),
        Acquisition::Never
    );
    assert_eq!(ledger.state(&key()).await.expect("state"), BucketState::default());
}

pub async fn ledger_raise_never_lowers(h: &Harness) {
    let ledger = &h.backend.ledger;
    let k = key();
    let high = BucketState { requests_tat: T0 + 5 * SEC, tokens_tat: T0 + 50 * SEC };
    assert_eq!(ledger.raise(&k, high).await.expect("raise"), high, "raise creates a missing row");
    let lower = BucketState { requests_tat: T0 + SEC, tokens_tat: T0 + SEC };
    assert_eq!(ledger.raise(&k, lower).await.expect("raise"), high);
    let mixed = BucketState { requests_tat: T0 + 9 * SEC, tokens_tat: T0 };
    let expected = BucketState { requests_tat: T0 + 9 * SEC, tokens_tat: T0 + 50 * SEC };
    assert_eq!(ledger.raise(&k, mixed).await.expect("raise"), expected);
    assert_eq!(ledger.state(&k).await.expect("state"), expected);
}

pub async fn ledger_concurrent_acquires_never_overgrant(h: &Harness) {
    const RPM: u64 = 50;
    let p = params(RPM, 1_000_000);
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let ledger = h.backend.ledger.clone();
            tokio::spawn(async move {
                let mut granted = 0u64;
                for _ in 0..20 {
                    match ledger.acquire(&key(), &p, one_call(10), T0, ChargeId::new()).await.expect("acquire") {
                        Acquisition::Granted(_) => granted += 1,
                        Acquisition::Denied { retry_at, .. } => assert!(retry_at > T0),
                        Acquisition::Never => panic!("a small cost is never Never"),
                    }
                }
                granted
            })
        })
        .collect();
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("join");
    }
    // All 160 attempts at one instant: exactly one minute's burst fits.
    assert_eq!(total, RPM, "160 concurrent attempts at one instant");
    assert_eq!(ledger_state(h).await.requests_tat, T0 + 60 * SEC);
}

pub async fn ledger_charge_asked_again_is_taken_once(h: &Harness) {
    let ledger = &h.backend.ledger;
    let (k, p) = (key(), params(5, 1_000));
    let charge = ChargeId::new();
    let once = BucketState { requests_tat: T0 + 12 * SEC, tokens_tat: T0 + 6 * SEC };
    assert_eq!(ledger.acquire(&k, &p, one_call(100), T0, charge).await.expect("acquire"), Acquisition::Granted(once));
    // The same charge again (its answer was lost), later: granted, not taken.
    let later = T0 + SEC;
    assert_eq!(
        ledger.acquire(&k, &p, one_call(100), later, charge).await.expect("acquire"),
        Acquisition::Granted(once)
    );
    assert_eq!(ledger_state(h).await, once, "asked twice, charged once");
    let twice = BucketState { requests_tat: T0 + 24 * SEC, tokens_tat: T0 + 12 * SEC };
    assert_eq!(
        ledger.acquire(&k, &p, one_call(100), later, ChargeId::new()).await.expect("acquire"),
        Acquisition::Granted(twice),
        "another charge is taken"
    );
    // The mark is per bucket: the same charge on another bucket is taken there.
    let other = BucketKey::tenant(&tenant("acme"));
    assert_eq!(
        ledger.acquire(&other, &p, one_call(100), T0, charge).await.expect("acquire"),
        Acquisition::Granted(once)
    );
}

pub async fn ledger_charges_count_once_when_answers_are_lost(h: &Harness) {
    use ratepool::storage::faults::{FaultCounts, FaultPlan, Faulty};

    let plan = FaultPlan { lost_response: 0.4, write_error: 0.2, seed: 5, ..FaultPlan::default() };
    let (faulty, counts) = Faulty::wrap(h.backend.clone(), plan);
    // 6,000 rpm: 10 ms a request; the burst holds all 60 at one instant.
    let p = params(6_000, 100_000_000);
    const CALLS: i64 = 60;
    for i in 0..CALLS {
        let charge = ChargeId::new();
        let mut tries = 0;
        loop {
            tries += 1;
            assert!(tries < 60, "charge {i} never went through");
            match faulty.ledger.acquire(&key(), &p, one_call(10), T0, charge).await {
                Ok(Acquisition::Granted(_)) => break,
                Ok(other) => panic!("charge {i}: the burst has room, got {other:?}"),
                Err(_) => continue,
            }
        }
    }
    let lost = FaultCounts::get(&counts.lost_responses);
    assert!(lost > 0, "some answers were lost after their charge committed");
    assert_eq!(
        ledger_state(h).await.requests_tat,
        T0 + CALLS * 10_000,
        "{CALLS} charges taken once each ({lost} answers lost)"
    );
}

async fn ledger_state(h: &Harness) -> BucketState {
    h.backend.ledger.state(&key()).await.expect("state")
}

pub async fn ledger_tenant_buckets_are_apart_from_org_buckets(h: &Harness) {
    let ledger = &h.backend.ledger;
    // Names chosen so that naive "a#b" keys would collide.
    let by_tenant = BucketKey::tenant(&tenant("org-a"));
    let orgs = [key(), BucketKey::new(&org("tenant"), &model("org-a")), BucketKey::new(&org("org-a"), &model("org-a"))];
    let p = params(5, 1_000);
    for i in 0..5 {
        let r = ledger.acquire(&by_tenant, &p, one_call(100), T0, ChargeId::new()).await.expect("acquire");
        assert!(matches!(r, Acquisition::Granted(_)), "tenant call {i}: {r:?}");
    }
    assert!(matches!(
        ledger.acquire(&by_tenant, &p, one_call(100), T0, ChargeId::new()).await.expect("acquire"),
        Acquisition::Denied { .. }
    ));
    for k in &orgs {
        assert_eq!(ledger.state(k).await.expect("state"), BucketState::default(), "{k} untouched by the tenant");
        assert!(matches!(
            ledger.acquire(k, &p, one_call(100), T0, ChargeId::new()).await.expect("acquire"),
            Acquisition::Granted(_)
        ));
    }
    let full = BucketState { requests_tat: T0 + 60 * SEC, tokens_tat: T0 + 30 * SEC };
    assert_eq!(ledger.state(&by_tenant).await.expect("state"), full, "org charges leave the tenant alone");
}

// ------------------------------------------------------------------ jobs in flight

/// 10–40 ms, different per call.
fn rand_ms() -> u64 {
    10 + u64::from(uuid::Uuid::new_v4().as_bytes()[0]) % 31
}

fn limited(tenant_name: &str, limit: u64) -> NewJob {
    NewJob { in_flight_limit: Some(limit), ..new_job(tenant_name, None) }
}

async fn in_flight(h: &Harness, tenant_name: &str) -> u64 {
    h.backend.jobs.jobs_in_flight(&tenant(tenant_name)).await.expect("jobs_in_flight")
}

async fn created(h: &Harness, job: &NewJob) -> JobId {
    match h.backend.jobs.create_job(job).await.expect("create_job") {
        CreateOutcome::Created(r) => r.id,
        other => panic!("expected Created, got {other:?}"),
    }
}

pub async fn in_flight_limit_refuses_and_stores_nothing(h: &Harness) {
    let jobs = &h.backend.jobs;
    assert_eq!(in_flight(h, "acme").await, 0);
    created(h, &limited("acme", 2)).await;
    created(h, &limited("acme", 2)).await;
    assert_eq!(in_flight(h, "acme").await, 2);
    let refused = limited("acme", 2);
    assert_eq!(jobs.create_job(&refused).await.expect("create_job"), CreateOutcome::InFlightLimit { in_flight: 2 });
    assert_eq!(jobs.get_job(&refused.id).await.expect("get_job"), None, "a refused job is not stored");
    assert_eq!(in_flight(h, "acme").await, 2, "nor counted");
    // Each tenant has its own count.
    created(h, &limited("globex", 2)).await;
    assert_eq!(in_flight(h, "globex").await, 1);
    // A job without a limit is counted, never refused.
    created(h, &new_job("acme", None)).await;
    assert_eq!(in_flight(h, "acme").await, 3);
    assert_eq!(
        jobs.create_job(&limited("acme", 3)).await.expect("create_job"),
        CreateOutcome::InFlightLimit { in_flight: 3 }
    );
}

pub async fn in_flight_counts_each_job_out_exactly_once(h: &Harness) {
    let jobs = &h.backend.jobs;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(created(h, &new_job("acme", None)).await);
    }
    let [done, queued, running, dead, waiting] = <[JobId; 5]>::try_from(ids).expect("five jobs");
    assert_eq!(in_flight(h, "acme").await, 5);

    let lease = acquire(h, &done, "w1", T0).await;
    assert_eq!(in_flight(h, "acme").await, 5, "running is still in flight");
    checkpoint_all(h, &lease, T0).await;
    jobs.finish_job(&lease, &JobOutcome::Succeeded, T0 + SEC).await.expect("finish");
    assert_eq!(in_flight(h, "acme").await, 4);
    assert_lease_lost(jobs.finish_job(&lease, &JobOutcome::Failed("again".into()), T0 + SEC).await, "second finish");
    assert_eq!(in_flight(h, "acme").await, 4, "a refused finish counts nothing out");

    assert_eq!(jobs.cancel_job(&queued, T0 + SEC).await.expect("cancel"), Some(JobStatus::Cancelled));
    assert_eq!(jobs.cancel_job(&queued, T0 + 2 * SEC).await.expect("cancel"), Some(JobStatus::Cancelled));
    assert_eq!(in_flight(h, "acme").await, 3, "a repeated cancel counts out once");

    let lease = acquire(h, &running, "w2", T0).await;
    assert_eq!(jobs.cancel_job(&running, T0 + SEC).await.expect("cancel"), Some(JobStatus::Cancelled));
    assert_lease_lost(jobs.finish_job(&lease, &JobOutcome::Succeeded, T0 + 2 * SEC).await, "finish after cancel");
    assert_eq!(in_flight(h, "acme").await, 2);

    jobs.fail_unleased(&dead, "dead-lettered", T0 + SEC).await.expect("fail");
    jobs.fail_unleased(&dead, "dead-lettered", T0 + 2 * SEC).await.expect("fail again");
    jobs.fail_unleased(&queued, "dead-lettered", T0 + 2 * SEC).await.expect("fail a cancelled job");
    assert_eq!(in_flight(h, "acme").await, 1);

    // Unknown jobs change nothing.
    let missing = JobId::generate();
    assert_eq!(jobs.cancel_job(&missing, T0).await.expect("cancel"), None);
    jobs.fail_unleased(&missing, "x", T0).await.expect("fail");
    assert_eq!(in_flight(h, "acme").await, 1);
    assert_eq!(get(h, &waiting).await.status, JobStatus::Queued);
}

pub async fn in_flight_limit_never_refuses_a_replay(h: &Harness) {
    let jobs = &h.backend.jobs;
    let first = NewJob { in_flight_limit: Some(1), ..new_job("acme", Some(("key-1", "hash-1"))) };
    created(h, &first).await;
    let retry = NewJob { id: JobId::generate(), ..first.clone() };
    match jobs.create_job(&retry).await.expect("create_job") {
        CreateOutcome::Existing(r) => assert_eq!(r.id, first.id),
        other => panic!("a replay at the limit should be answered, got {other:?}"),
    }
    assert_eq!(in_flight(h, "acme").await, 1);
    let other = NewJob { in_flight_limit: Some(1), ..new_job("acme", Some(("key-2", "hash-2"))) };
    assert_eq!(jobs.create_job(&other).await.expect("create_job"), CreateOutcome::InFlightLimit { in_flight: 1 });
    // The refused request did not take its key: once the first job is
    // finished the same request is created.
    jobs.cancel_job(&first.id, T0 + SEC).await.expect("cancel");
    assert_eq!(in_flight(h, "acme").await, 0);
    assert_eq!(created(h, &other).await, other.id);
    assert_eq!(in_flight(h, "acme").await, 1);
}

pub async fn in_flight_concurrent_creates_never_exceed_the_limit(h: &Harness) {
    const LIMIT: u64 = 5;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let jobs = h.backend.jobs.clone();
            tokio::spawn(async move {
                let job = limited("acme", LIMIT);
                // A backend error (contention) is retryable: retried, as a
                // client would on the 503.
                for _ in 0..10 {
                    match jobs.create_job(&job).await {
                        Ok(CreateOutcome::Created(_)) => return true,
                        Ok(CreateOutcome::InFlightLimit { in_flight }) => {
                            assert!(in_flight >= LIMIT, "refused below the limit: {in_flight}");
                            return false;
                        }
                        Ok(other) => panic!("unexpected {other:?}"),
                        Err(StorageError::Backend(_)) => {
                            tokio::time::sleep(Duration::from_millis(rand_ms())).await;
                        }
                        Err(e) => panic!("create_job: {e}"),
                    }
                }
                panic!("create_job kept failing")
            })
        })
        .collect();
    let mut admitted = 0;
    for t in tasks {
        admitted += u64::from(t.await.expect("join"));
    }
    assert_eq!(admitted, LIMIT, "16 concurrent submissions, limit {LIMIT}");
    assert_eq!(in_flight(h, "acme").await, LIMIT);
}

// ------------------------------------------------------------------ usage

pub async fn usage_add_and_tenant_isolation(h: &Harness) {
    let usage = &h.backend.usage;
    let c = |calls: u64, rate_limited: u64| OrgCounters {
        calls,
        prompt_tokens: calls * 100,
        completion_tokens: calls * 10,
        rate_limited,
        insufficient_quota: 1,
        server_errors: 2,
        timeouts: 3,
        connection_errors: 4,
        request_errors: 5,
    };
    let first = UsageBatch::new(vec![
        (tenant("acme"), org("org-b"), c(1, 0)),
        (tenant("acme"), org("org-a"), c(2, 1)),
        (tenant("globex"), org("org-a"), c(7, 0)),
    ]);
    usage.add(&first).await.expect("add");
    usage.add(&UsageBatch::new(vec![(tenant("acme"), org("org-a"), c(3, 2))])).await.expect("add");
    usage.add(&UsageBatch::new(vec![])).await.expect("empty batch");
    usage.add(&first).await.expect("the same batch again adds nothing");

    let mut acme = usage.usage(&tenant("acme")).await.expect("usage");
    acme.sort_by(|x, y| x.0.cmp(&y.0));
    let mut a_total = c(2, 1);
    a_total.merge(&c(3, 2));
    assert_eq!(acme, vec![(org("org-a"), a_total), (org("org-b"), c(1, 0))]);
    assert_eq!(usage.usage(&tenant("globex")).await.expect("usage"), vec![(org("org-a"), c(7, 0))]);
    assert!(usage.usage(&tenant("initech")).await.expect("usage").is_empty());
}

/// A usage flush whose answer is lost after it committed, or that failed
/// (on DynamoDB a batch of over 100 pairs is several transactions, some of
/// which may have landed), is retried as the same batch and counted once:
/// the totals are exactly what was recorded.
pub async fn usage_flushes_count_once_when_answers_are_lost(h: &Harness) {
    use ratepool::storage::faults::{FaultPlan, Faulty};
    use ratepool::storage::{CallEvent, CallOutcome};

    let plan = FaultPlan { lost_response: 0.4, write_error: 0.2, seed: 11, ..FaultPlan::default() };
    let (faulty, counts) = Faulty::wrap(h.backend.clone(), plan);
    let telemetry = ratepool::telemetry::Telemetry::new();
    let tenants = ["acme", "globex", "initech"];
    let orgs: Vec<OrgName> = (0..50).map(|i| org(&format!("org-{i}"))).collect();
    let mut expected: std::collections::BTreeMap<&str, std::collections::BTreeMap<OrgName, OrgCounters>> =
        Default::default();
    for round in 0..4u64 {
        for t in tenants {
            for (i, o) in orgs.iter().enumerate() {
                let ev = CallEvent {
                    tenant: tenant(t),
                    org: o.clone(),
                    model: model("gpt-4o-mini"),
                    outcome: if i % 7 == 0 { CallOutcome::RateLimited } else { CallOutcome::Ok },
                    usage: Usage { calls: 1, prompt_tokens: 10 + i as u64, completion_tokens: round + 1 },
                    latency: Duration::from_millis(5),
                };
                telemetry.record_call(&ev);
                expected.entry(t).or_default().entry(o.clone()).or_default().record(&ev);
            }
        }
        let mut failures = 0;
        while telemetry.flush(faulty.usage.as_ref()).await.is_err() {
            failures += 1;
            assert!(failures < 60, "round {round}: the flush never went through");
        }
    }
    let lost = ratepool::storage::faults::FaultCounts::get(&counts.lost_responses);
    assert!(lost > 0, "some answers were lost after their write committed");
    for t in tenants {
        let got = h.backend.usage.usage(&tenant(t)).await.expect("usage");
        let want: Vec<(OrgName, OrgCounters)> = expected[t].clone().into_iter().collect();
        assert_eq!(got.len(), want.len(), "{t}");
        for (g, w) in got.iter().zip(&want) {
            assert_eq!(g, w, "{t}: totals counted once ({lost} answers lost)");
        }
    }
}

// ------------------------------------------------------------------ cache

fn completion_request(temperature: f64) -> serde_json::Value {
    serde_json::json!({
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}],
        "temperature": temperature,
        "max_tokens": 64,
    })
}

fn cached(content: &str) -> CachedResponse {
    CachedResponse {
        answer: StepAnswer::text(content.into()),
        usage: Usage { calls: 1, prompt_tokens: 123, completion_tokens: 45 },
        org: org("org-b"),
        model: model("gpt-4o-mini"),
        created_at: T0 + 7,
    }
}

const CACHE_TTL: Duration = Duration::from_secs(3_600);

async fn cache_get(h: &Harness, key: &CacheKey, now: Micros) -> Option<CachedResponse> {
    h.backend.cache.get(key, now).await.expect("cache get")
}

pub async fn cache_miss_on_empty(h: &Harness) {
    assert_eq!(cache_get(h, &CacheKey::of("gpt-4o-mini", &completion_request(0.0)), T0).await, None);
}

pub async fn cache_put_then_get_round_trips(h: &Harness) {
    let key = CacheKey::of("gpt-4o-mini", &completion_request(0.0));
    // Multi-byte text and JSON-looking content come back unchanged.
    let value = cached("héllo ✓ {\"not\": \"parsed\"}\n");
    h.backend.cache.put(&key, &value, CACHE_TTL, T0).await.expect("put");
    assert_eq!(cache_get(h, &key, T0 + SEC).await, Some(value));
    // Another key stays a miss.
    assert_eq!(cache_get(h, &CacheKey::of("gpt-4o", &completion_request(0.0)), T0 + SEC).await, None);
}

pub async fn cache_key_ignores_key_order_not_parameters(h: &Harness) {
    let written =
        serde_json::json!({"model_params": {"top_p": 1, "seed": 7}, "messages": [{"role": "user", "content": "hi"}]});
    let reordered: serde_json::Value =
        serde_json::from_str(r#"{"messages":[{"content":"hi","role":"user"}],"model_params":{"seed":7,"top_p":1}}"#)
            .expect("json");
    let other =
        serde_json::json!({"model_params": {"top_p": 1, "seed": 8}, "messages": [{"role": "user", "content": "hi"}]});
    h.backend.cache.put(&CacheKey::of("m", &written), &cached("x"), CACHE_TTL, T0).await.expect("put");
    assert_eq!(CacheKey::of("m", &written), CacheKey::of("m", &reordered));
    assert_eq!(
        cache_get(h, &CacheKey::of("m", &reordered), T0).await,
        Some(cached("x")),
        "same request, keys reordered"
    );
    assert_ne!(CacheKey::of("m", &written), CacheKey::of("m", &other));
    assert_eq!(cache_get(h, &CacheKey::of("m", &other), T0).await, None, "a different seed");
}

pub async fn cache_entry_expires(h: &Harness) {
    let key = CacheKey::of("gpt-4o-mini", &completion_request(0.0));
    let ttl = Duration::from_millis(1_500);
    let ttl_us = 1_500 * 1_000;
    h.backend.cache.put(&key, &cached("x"), ttl, T0).await.expect("put");
    assert_eq!(cache_get(h, &key, T0 + ttl_us - 1).await, Some(cached("x")), "just before expiry");
    assert_eq!(cache_get(h, &key, T0 + ttl_us).await, None, "at expiry");
    assert_eq!(cache_get(h, &key, T0 + 10 * ttl_us).await, None, "long after");
    // A fresh put revives the key.
    h.backend.cache.put(&key, &cached("y"), ttl, T0 + 10 * ttl_us).await.expect("put again");
    assert_eq!(cache_get(h, &key, T0 + 10 * ttl_us + 1).await, Some(cached("y")));
}

pub async fn cache_overwrite_last_write_wins(h: &Harness) {
    let key = CacheKey::of("gpt-4o-mini", &completion_request(0.7));
    h.backend.cache.put(&key, &cached("first"), CACHE_TTL, T0).await.expect("put");
    let second = CachedResponse { org: org("org-c"), created_at: T0 + SEC, ..cached("second") };
    // A shorter TTL than the first write's: the expiry is replaced too.
    h.backend.cache.put(&key, &second, Duration::from_secs(10), T0 + SEC).await.expect("overwrite");
    assert_eq!(cache_get(h, &key, T0 + 2 * SEC).await, Some(second));
    assert_eq!(cache_get(h, &key, T0 + 11 * SEC).await, None, "the second write's TTL applies");
}

/// Runs every conformance test against a backend: one named
/// `#[tokio::test]` each (so a failure says which), with a fresh harness
/// from `$harness().await`. The list lives here, once, so a new test runs
/// on every backend.
#[macro_export]
macro_rules! conformance_suite {
    ($harness:ident) => {
        $crate::conformance_suite!(@tests $harness;
        queue_send_receive_delete,
        queue_visibility_timeout_redelivers,
        queue_extend_keeps_message_hidden,
        queue_extend_zero_hands_message_back,
        queue_stale_receipt_cannot_extend,
        queue_stale_receipt_cannot_delete,
        queue_defer_hides_and_starts_receive_count_again,
        queue_dead_letter_moves_message,
        queue_dead_letters_are_redriven_or_removed,
        queue_interactive_before_batch,
        queue_batch_lane_gets_one_take_in_four,
        queue_receive_waits_when_empty,
        queue_receive_returns_early_when_sent,
        jobs_create_and_get,
        webhook_report_round_trips_and_needs_its_job,
        jobs_idempotent_create,
        jobs_replay_finds_a_keyed_job_and_creates_nothing,
        stalled_runs_count_acquisitions_since_progress,
        released_runs_are_not_stalled_runs,
        unsent_jobs_are_listed_until_sent,
        lease_acquire_held_and_takeover,
        lease_renew_extends,
        lease_release_lets_another_worker_in,
        checkpoint_with_held_lease,
        checkpoint_with_stale_epoch_is_lease_lost,
        checkpoint_after_expiry_is_lease_lost,
        checkpoint_duplicate_is_conflict,
        checkpoints_round_trip,
        finish_job_succeeded_and_failed,
        finish_job_with_lost_lease,
        finish_succeeded_needs_every_step_checkpointed,
        cancel_queued_job,
        cancel_running_job_revokes_lease,
        cancel_finished_job_is_left_alone,
        fail_unleased_job,
        ledger_grants_up_to_limit_then_denies,
        ledger_never_for_oversized_cost,
        ledger_raise_never_lowers,
        ledger_charge_asked_again_is_taken_once,
        ledger_charges_count_once_when_answers_are_lost,
        ledger_concurrent_acquires_never_overgrant,
        ledger_tenant_buckets_are_apart_from_org_buckets,
        in_flight_limit_refuses_and_stores_nothing,
        in_flight_counts_each_job_out_exactly_once,
        in_flight_limit_never_refuses_a_replay,
        in_flight_concurrent_creates_never_exceed_the_limit,
        usage_add_and_tenant_isolation,
        usage_flushes_count_once_when_answers_are_lost,
        cache_miss_on_empty,
        cache_put_then_get_round_trips,
        cache_key_ignores_key_order_not_parameters,
        cache_entry_expires,
        cache_overwrite_last_write_wins,
        checkpoint_keeps_the_whole_answer_of_a_step_and_an_instance,
        steps_total_is_set_only_under_the_lease,
        a_checkpoint_of_about_a_megabyte_round_trips,
        checkpoint_pages_split_by_bytes_and_steps,
        );
    };
    (@tests $harness:ident; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let h = $harness().await;
                conformance::$name(&h).await;
            }
        )*
    };
}
