//! The engine in-process over a SQLite store wrapped in the fault injector
//! (`storage::faults`) and an in-process simulator: what a job run does
//! when its store fails (issue #10, items 6 and 10).

use std::collections::{BTreeMap, HashSet};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use ratepool::config::Config;
use ratepool::domain::Micros;
use ratepool::domain::{Clock, JobId, SystemClock, TenantId};
use ratepool::engine::router::{RetryPolicy, Router};
use ratepool::engine::{Engine, EngineConfig};
use ratepool::local::{SqliteBackend, SqliteOptions};
use ratepool::provider::ProviderClient;
use ratepool::sim::{SimConfig, Simulator};
use ratepool::spec::JobSpec;
use ratepool::storage::faults::{FaultCounts, FaultPlan, FaultScope, Faulty};
use ratepool::storage::{
    Acquisition, Backend, BucketKey, BucketParams, BucketState, ChargeId, Cost, CreateOutcome, JobStatus, NewJob,
    QueueMessage, QuotaLedger, StorageResult,
};
use ratepool::telemetry::Telemetry;
use secrecy::SecretString;
use serde_json::{Value, json};
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

const MODEL: &str = "gpt-4o-mini";
const ONE_TENANT: &str = "[[tenants]]\nname = \"t\"\napi_key_env = \"UNUSED_TENANT\"\n";

struct Rig {
    base: String,
    /// The store without faults: what the test itself reads and writes.
    store: Backend,
    counts: Arc<FaultCounts>,
    /// Ledger charges the store committed, and those the router was told
    /// of: equal when no charge was lost and made again.
    charges: Charges,
    /// The ledger's own fault counts, when it had its own plan.
    ledger_counts: Option<Arc<FaultCounts>>,
    cfg: EngineConfig,
    shutdown: CancellationToken,
    engine: Option<tokio::task::JoinHandle<()>>,
    stop_sim: Option<oneshot::Sender<()>>,
    _dir: tempfile::TempDir,
}

impl Drop for Rig {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(stop) = self.stop_sim.take() {
            let _ = stop.send(());
        }
    }
}

/// Counts the charges a ledger grants: each (bucket, charge) once, however
/// often it is asked (an acquisition asked again after a lost answer is
/// granted again, charging nothing: the conformance suite checks that).
struct CountingLedger {
    inner: Arc<dyn QuotaLedger>,
    granted: Arc<Mutex<HashSet<(BucketKey, ChargeId)>>>,
}

#[async_trait]
impl QuotaLedger for CountingLedger {
    async fn acquire(
        &self,
        key: &BucketKey,
        params: &BucketParams,
        cost: Cost,
        now: Micros,
        charge: ChargeId,
    ) -> StorageResult<Acquisition> {
        let a = self.inner.acquire(key, params, cost, now, charge).await;
        if matches!(a, Ok(Acquisition::Granted(_))) {
            self.granted.lock().unwrap().insert((key.clone(), charge));
        }
        a
    }

    async fn raise(&self, key: &BucketKey, floor: BucketState) -> StorageResult<BucketState> {
        self.inner.raise(key, floor).await
    }

    async fn state(&self, key: &BucketKey) -> StorageResult<BucketState> {
        self.inner.state(key).await
    }
}

#[derive(Default, Clone)]
struct Charges {
    /// Granted by the store (below the fault injector).
    committed: Arc<Mutex<HashSet<(BucketKey, ChargeId)>>>,
    /// Granted as the router saw them (above it).
    delivered: Arc<Mutex<HashSet<(BucketKey, ChargeId)>>>,
}

/// One org (`rpm`, `tpm`), calls of `latency_ms`; `toml` adds to the
/// ratepool config (tenants with quotas); `tune` sets the engine.
async fn rig(latency_ms: u64, plan: FaultPlan, toml: &str, tune: impl FnOnce(&mut EngineConfig)) -> Rig {
    rig_with(latency_ms, plan, None, toml, tune).await
}

/// [`rig`], with the ledger's faults from `ledger_plan` when given (their
/// counts added to the rest) instead of `plan`.
async fn rig_with(
    latency_ms: u64,
    plan: FaultPlan,
    ledger_plan: Option<FaultPlan>,
    toml: &str,
    tune: impl FnOnce(&mut EngineConfig),
) -> Rig {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let sim_toml = format!(
        "seed = 7\n[latency]\nbase_ms = {latency_ms}\nper_token_ms = 0\ntime_scale = 1\n\
         [[orgs]]\nname = \"a\"\napi_key = \"sk-test-a-0123456789\"\nmodels.\"{MODEL}\" = {{ rpm = 100000, tpm = 100000000 }}\n"
    );
    let sim = Simulator::new(SimConfig::from_toml(&sim_toml).unwrap(), clock.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stop_sim, stopped) = oneshot::channel::<()>();
    tokio::spawn(ratepool::sim::serve(listener, sim, async move {
        let _ = stopped.await;
    }));
    let cfg = Config::parse(&format!(
        "[[orgs]]\nname = \"a\"\napi_key_env = \"UNUSED_KEY\"\ntimeout_secs = 5\n\
         models.\"{MODEL}\" = {{ rpm = 100000, tpm = 100000000 }}\n{toml}"
    ))
    .unwrap();
    let orgs = cfg
        .orgs
        .iter()
        .map(|o| o.settings(format!("{base}/v1"), SecretString::from("sk-test-a-0123456789".to_string())))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let lease = Duration::from_secs(3);
    let sqlite = SqliteBackend::open(
        &dir.path().join("ratepool.db"),
        SqliteOptions { visibility_timeout: lease, clock: clock.clone() },
    )
    .unwrap();
    let store = sqlite.backend();
    let charges = Charges::default();
    let mut counted = store.clone();
    counted.ledger = Arc::new(CountingLedger { inner: store.ledger.clone(), granted: charges.committed.clone() });
    let (mut faulty, counts) = Faulty::wrap(counted.clone(), plan);
    let mut ledger_counts = None;
    if let Some(ledger_plan) = ledger_plan {
        let (for_ledger, c) = Faulty::wrap(counted, ledger_plan);
        faulty.ledger = for_ledger.ledger;
        ledger_counts = Some(c);
    }
    faulty.ledger = Arc::new(CountingLedger { inner: faulty.ledger.clone(), granted: charges.delivered.clone() });
    let telemetry = Arc::new(Telemetry::new());
    let router = Arc::new(
        Router::new(orgs, faulty.ledger.clone(), ProviderClient::new().unwrap(), clock.clone(), telemetry.clone(), {
            RetryPolicy { backoff_base: Duration::from_millis(10), ..RetryPolicy::default() }
        })
        .with_tenant_quotas(cfg.tenant_quotas()),
    );
    let mut ecfg = ratepool::serve::engine_config(&cfg);
    ecfg.lease_ttl = lease;
    ecfg.poll_wait = Duration::from_millis(200);
    ecfg.shutdown_grace = Duration::from_millis(100);
    tune(&mut ecfg);
    let engine = Arc::new(Engine::new(faulty, router, telemetry, clock, ecfg.clone()));
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(engine.run(shutdown.clone()));
    Rig {
        base,
        store,
        counts,
        ledger_counts,
        charges,
        cfg: ecfg,
        shutdown,
        engine: Some(handle),
        stop_sim: Some(stop_sim),
        _dir: dir,
    }
}

impl Rig {
    /// Stores and enqueues a chain of `steps` steps for `tenant`.
    async fn submit(&self, tenant: &str, name: &str, steps: usize) -> JobId {
        self.submit_with(tenant, name, steps, json!({})).await
    }

    /// The same, with `extra` fields set on the spec.
    async fn submit_with(&self, tenant: &str, name: &str, steps: usize, extra: Value) -> JobId {
        let mut body: Value = serde_json::from_str(&ratepool::bench::chain_spec(name, steps, 16)).unwrap();
        for (k, v) in extra.as_object().unwrap() {
            body[k] = v.clone();
        }
        let spec = JobSpec::parse(body.to_string().as_bytes(), &self.cfg.spec_limits, &|_| true).unwrap();
        let job = NewJob {
            id: JobId::generate(),
            tenant: TenantId::parse(tenant).unwrap(),
            name: spec.name.clone(),
            priority: spec.priority,
            spec_json: spec.to_stored(),
            steps_total: spec.steps.len() as u32,
            idempotency: None,
            created_at: SystemClock.now(),
            in_flight_limit: None,
        };
        let CreateOutcome::Created(record) = self.store.jobs.create_job(&job).await.unwrap() else { panic!() };
        let message = QueueMessage { job_id: record.id.clone(), tenant: record.tenant, priority: record.priority };
        self.store.queue.send(&message).await.unwrap();
        record.id
    }

    /// Waits for every job to finish; their statuses and errors.
    async fn wait_all(&self, ids: &[JobId], within: Duration) -> Vec<(JobStatus, Option<String>)> {
        let deadline = Instant::now() + within;
        loop {
            let mut out = Vec::new();
            for id in ids {
                let r = self.store.jobs.get_job(id).await.unwrap().unwrap();
                out.push((r.status, r.error));
            }
            if out.iter().all(|(s, _)| s.is_terminal()) {
                return out;
            }
            assert!(Instant::now() < deadline, "jobs still running after {within:?}: {out:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Requests the simulator took per `{job}/{step}`, refused ones included.
    async fn attempts(&self) -> BTreeMap<String, u64> {
        let r = reqwest::Client::new().get(format!("{}/_sim/attempts", self.base)).send().await.unwrap();
        r.json().await.unwrap()
    }

    async fn control(&self, path: &str, body: Value) {
        let r = reqwest::Client::new().post(format!("{}{path}", self.base)).json(&body).send().await.unwrap();
        assert!(r.status().is_success(), "{path}: {}", r.text().await.unwrap_or_default());
    }

    async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(h) = self.engine.take() {
            let _ = h.await;
        }
    }
}

fn count(c: &std::sync::atomic::AtomicU64) -> u64 {
    FaultCounts::get(c)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_write_that_fails_or_loses_its_answer_does_not_call_the_step_again() {
    // Every checkpoint write's answer lost after it landed; then one write
    // in two failing before it lands.
    let plans = [
        FaultPlan { lost_response: 1.0, only: Some(FaultScope::Checkpoints), ..FaultPlan::default() },
        FaultPlan {
            write_error: 0.3,
            throttle: 0.2,
            only: Some(FaultScope::Checkpoints),
            seed: 3,
            ..FaultPlan::default()
        },
        FaultPlan { write_error: 0.3, throttle: 0.2, only: Some(FaultScope::Ledger), seed: 5, ..FaultPlan::default() },
    ];
    for plan in plans {
        let rig = rig(20, plan, ONE_TENANT, |_| {}).await;
        let mut ids = Vec::new();
        for n in 0..4 {
            ids.push(rig.submit("t", &format!("cp-{n}"), 3).await);
        }
        let done = rig.wait_all(&ids, Duration::from_secs(20)).await;
        assert!(done.iter().all(|(s, _)| *s == JobStatus::Succeeded), "{plan:?}: {done:?}");
        let attempts = rig.attempts().await;
        assert_eq!(attempts.len(), 12, "{attempts:?}");
        assert!(attempts.values().all(|&n| n == 1), "a step was called again under {plan:?}: {attempts:?}");
        let faults = count(&rig.counts.lost_responses) + count(&rig.counts.write_errors) + count(&rig.counts.throttled);
        assert!(faults >= 3, "the faults were injected: {faults}");
        rig.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_past_its_deadline_fails_naming_it_instead_of_waiting_on() {
    let rig = rig(10, FaultPlan::default(), ONE_TENANT, |_| {}).await;
    // Every call answered 429 "come back in 3 s", the deadline 2 s.
    rig.control("/_sim/orgs/a", json!({"day_limit_retry_ms": 3_000})).await;
    let id = rig.submit_with("t", "late", 2, json!({"deadline_secs": 2})).await;
    let done = rig.wait_all(&[id], Duration::from_secs(10)).await;
    let (status, error) = &done[0];
    assert_eq!(*status, JobStatus::Failed, "{error:?}");
    let error = error.as_deref().unwrap_or_default();
    assert!(error.contains("step s0: deadline of 2 s passed while waiting for capacity for gpt-4o-mini"), "{error}");
    rig.stop().await;
}

const TWO_TENANTS: &str = "[[tenants]]\nname = \"noisy\"\napi_key_env = \"UNUSED_NOISY\"\n\
     [tenants.quota]\ncalls_per_minute = 6\n\
     [[tenants]]\nname = \"quiet\"\napi_key_env = \"UNUSED_QUIET\"\n";

/// How long 8 four-step jobs of the quiet tenant take on 4 worker slots,
/// with or without 8 jobs of a tenant whose quota (6 calls a minute) is
/// spent after its first 6 calls submitted just before.
async fn quiet_makespan(with_noisy: bool) -> Duration {
    let rig = rig(200, FaultPlan::default(), TWO_TENANTS, |c| c.concurrency = 4).await;
    if with_noisy {
        for n in 0..8 {
            rig.submit("noisy", &format!("noisy-{n}"), 4).await;
        }
        tokio::time::sleep(Duration::from_millis(1_500)).await;
    }
    let started = Instant::now();
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(rig.submit("quiet", &format!("quiet-{n}"), 4).await);
    }
    let done = rig.wait_all(&ids, Duration::from_secs(60)).await;
    assert!(done.iter().all(|(s, _)| *s == JobStatus::Succeeded), "{done:?}");
    let took = started.elapsed();
    rig.stop().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_whose_quota_is_spent_does_not_slow_another_tenants_jobs() {
    let calm = quiet_makespan(false).await;
    let noisy = quiet_makespan(true).await;
    println!("quiet tenant's makespan: {calm:?} alone, {noisy:?} beside the throttled tenant");
    assert!(
        noisy.as_secs_f64() <= 1.5 * calm.as_secs_f64(),
        "the throttled tenant held the worker slots: {noisy:?} against {calm:?} alone"
    );
}

/// A webhook receiver that hangs for the tenant `slowhook` (as long as a
/// delivery's retries could take) and answers at once for the others.
#[derive(Debug)]
struct HangingReceiver;

#[async_trait::async_trait]
impl ratepool::engine::JobNotifier for HangingReceiver {
    async fn notify(&self, job: &ratepool::storage::JobRecord, _url: &str) -> ratepool::storage::DeliveryReport {
        if job.tenant.as_str() == "slowhook" {
            tokio::time::sleep(Duration::from_secs(120)).await;
        }
        ratepool::storage::DeliveryReport {
            status: ratepool::storage::DeliveryStatus::Delivered,
            attempts: 1,
            last_error: None,
            last_status: Some(200),
        }
    }
}

const HOOK_TENANTS: &str = "[[tenants]]\nname = \"slowhook\"\napi_key_env = \"UNUSED_SLOW\"\n\
     [[tenants]]\nname = \"quiet\"\napi_key_env = \"UNUSED_QUIET\"\n";

/// How long 8 four-step jobs of the quiet tenant take on 4 worker slots,
/// with or without 8 one-step jobs, finished just before, whose webhook
/// receiver hangs.
async fn makespan_beside_hanging_webhooks(with_hooks: bool) -> Duration {
    let rig = rig(200, FaultPlan::default(), HOOK_TENANTS, |c| {
        c.concurrency = 4;
        c.notifier = Arc::new(HangingReceiver);
    })
    .await;
    if with_hooks {
        let mut hooked = Vec::new();
        for n in 0..8 {
            let hook = json!({"webhook_url": "https://hooks.example.com/slow"});
            hooked.push(rig.submit_with("slowhook", &format!("hook-{n}"), 1, hook).await);
        }
        rig.wait_all(&hooked, Duration::from_secs(20)).await;
    }
    let started = Instant::now();
    let mut ids = Vec::new();
    for n in 0..8 {
        ids.push(rig.submit("quiet", &format!("quiet-{n}"), 4).await);
    }
    let done = rig.wait_all(&ids, Duration::from_secs(30)).await;
    assert!(done.iter().all(|(s, _)| *s == JobStatus::Succeeded), "{done:?}");
    let took = started.elapsed();
    rig.stop().await;
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_receiver_that_hangs_does_not_slow_another_tenants_jobs() {
    let calm = makespan_beside_hanging_webhooks(false).await;
    let hung = makespan_beside_hanging_webhooks(true).await;
    println!("quiet tenant's makespan: {calm:?} alone, {hung:?} beside 8 hanging webhook deliveries");
    assert!(
        hung.as_secs_f64() <= 1.5 * calm.as_secs_f64(),
        "the hanging deliveries held the worker slots: {hung:?} against {calm:?} alone"
    );
}

/// Issue 15's storm, smoke size, in process: 40 three-step chains on 8
/// slots while the store fails 5 % of its writes (errors, throttling,
/// answers lost after the write landed) and 2 % of its calls stall 1.5 s,
/// longer than the lease's renewal interval (1 s of a 3 s lease). Every
/// job succeeds, every step reaches the provider once, the jobs' usage
/// counts exactly the calls made, every ledger charge the store committed
/// is one the router was told of (none charged twice), and nothing is left
/// queued, running or dead-lettered. The ledger's writes fail, are
/// throttled, lose their answers and stall like the rest (8 % of them):
/// an acquisition asked again after a lost answer carries the same charge
/// id and is not charged again, so the router saw every charge the store
/// made.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_of_storage_faults_strands_nothing_and_calls_nothing_twice() {
    let plan = FaultPlan {
        write_error: 0.02,
        throttle: 0.015,
        lost_response: 0.015,
        slow: 0.02,
        slow_ms: 1_500,
        seed: 15,
        only: None,
    };
    let ledger_plan = FaultPlan { write_error: 0.03, throttle: 0.02, lost_response: 0.03, seed: 16, ..plan };
    let rig = rig_with(20, plan, Some(ledger_plan), ONE_TENANT, |c| c.concurrency = 8).await;
    let started = Instant::now();
    let mut ids = Vec::new();
    for n in 0..40 {
        ids.push(rig.submit("t", &format!("storm-{n}"), 3).await);
    }
    let done = rig.wait_all(&ids, Duration::from_secs(50)).await;
    let took = started.elapsed();
    assert!(done.iter().all(|(s, _)| *s == JobStatus::Succeeded), "{done:?}");
    let attempts = rig.attempts().await;
    let calls: u64 = attempts.values().sum();
    let twice: Vec<_> = attempts.iter().filter(|(_, n)| **n > 1).collect();
    let mut usage_calls = 0;
    for id in &ids {
        let job = rig.store.jobs.get_job(id).await.unwrap().unwrap();
        assert_eq!((job.steps_done, job.steps_total, job.lease_owner.as_deref()), (3, 3, None), "{job:?}");
        usage_calls += job.usage.calls;
    }
    // Messages of finished jobs are settled once their last ack lands.
    let deadline = Instant::now() + Duration::from_secs(15);
    let queue = loop {
        let q = rig.store.queue.stats().await.unwrap();
        if q == Default::default() || Instant::now() > deadline {
            break q;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let c = &rig.counts;
    let l = rig.ledger_counts.as_ref().expect("the ledger's own plan");
    let both = |f: fn(&FaultCounts) -> &AtomicU64| count(f(c)) + count(f(l));
    let distinct = |set: &Mutex<HashSet<(BucketKey, ChargeId)>>| set.lock().unwrap().len() as u64;
    let (committed, delivered) = (distinct(&rig.charges.committed), distinct(&rig.charges.delivered));
    println!(
        "storm: 40 jobs x 3 steps in {took:?}; {calls} provider calls for {} steps; {committed} ledger charges \
         committed, {delivered} seen by the router; injected {} errors ({} on the ledger), {} throttled ({}), \
         {} lost answers ({} on the ledger), {} stalls of 1.5 s over {} writes applied",
        attempts.len(),
        both(|c| &c.write_errors),
        count(&l.write_errors),
        both(|c| &c.throttled),
        count(&l.throttled),
        both(|c| &c.lost_responses),
        count(&l.lost_responses),
        both(|c| &c.slowed),
        both(|c| &c.writes_applied)
    );
    assert_eq!(committed, delivered, "a ledger charge was lost and made again");
    assert!(committed >= calls, "every call was charged: {committed} charges for {calls} calls");
    assert_eq!(attempts.len(), 120, "every step reached the provider");
    assert!(twice.is_empty(), "steps called again: {twice:?}");
    assert_eq!(usage_calls, calls, "the jobs' usage counts each call once");
    assert_eq!(queue, Default::default(), "nothing left queued or in flight, no dead letter");
    assert!(rig.store.queue.dead_letters(10).await.unwrap().is_empty());
    for (kind, n) in [
        ("errors", count(&c.write_errors)),
        ("throttling", count(&c.throttled)),
        ("lost answers", count(&c.lost_responses)),
        ("stalls", count(&c.slowed)),
        ("ledger errors or throttling", count(&l.write_errors) + count(&l.throttled)),
        ("ledger answers lost", count(&l.lost_responses)),
    ] {
        assert!(n > 0, "no {kind} injected");
    }
    rig.stop().await;
}
