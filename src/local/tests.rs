//! SQLite specifics the backend-agnostic conformance suite cannot see:
//! durability across a restart, the pragmas, the schema version, exact FIFO
//! order and the receive query's index.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::schema::SCHEMA_VERSION;
use super::*;
use crate::domain::{JobId, ManualClock, ModelName, OrgName, StepId, StepKey, TenantId, Usage};
use crate::storage::gcra::Rate;
use crate::storage::{
    Acquisition, BucketKey, BucketParams, CacheKey, CachedResponse, ChargeId, Checkpoint, Cost, CreateOutcome,
    JobStatus, LeaseOutcome, NewJob, OrgCounters, QueueMessage, UsageBatch,
};

const T0: Micros = 1_700_000_000_000_000;

fn open(path: &Path) -> SqliteBackend {
    let options = SqliteOptions { clock: Arc::new(ManualClock::new(T0)), ..SqliteOptions::default() };
    SqliteBackend::open(path, options).unwrap()
}

fn new_job() -> NewJob {
    NewJob {
        id: JobId::generate(),
        tenant: TenantId::parse("acme").unwrap(),
        name: "n".into(),
        priority: Priority::Interactive,
        spec_json: "{}".into(),
        steps_total: 2,
        idempotency: Some(("k".into(), "h".into())),
        created_at: T0,
        in_flight_limit: None,
    }
}

fn message(priority: Priority) -> QueueMessage {
    QueueMessage { job_id: JobId::generate(), tenant: TenantId::parse("acme").unwrap(), priority }
}

fn checkpoint() -> Checkpoint {
    Checkpoint {
        step: StepKey::Step(StepId::parse("s1").unwrap()),
        answer: crate::answer::StepAnswer::text("out".into()),
        usage: Usage { calls: 1, prompt_tokens: 10, completion_tokens: 5 },
        org: OrgName::parse("org-a").unwrap(),
        model: ModelName::parse("gpt-4o-mini").unwrap(),
        attempts: 1,
        started_at: T0,
        finished_at: T0 + 1,
    }
}

#[tokio::test]
async fn state_survives_a_restart_without_clean_close() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("r.db");
    let key = BucketKey::new(&OrgName::parse("org-a").unwrap(), &ModelName::parse("m").unwrap());
    let params = BucketParams { requests: Rate::per_minute(10), tokens: Rate::per_minute(1_000) };
    let job = new_job();
    let sent = message(Priority::Batch);
    let granted = {
        let db = open(&path);
        let b = db.backend();
        b.jobs.create_job(&job).await.unwrap();
        let LeaseOutcome::Acquired(lease) =
            b.jobs.acquire_lease(&job.id, "w", Duration::from_secs(30), T0).await.unwrap()
        else {
            panic!("lease")
        };
        b.jobs.put_checkpoint(&lease, &checkpoint(), T0 + 1).await.unwrap();
        b.queue.send(&sent).await.unwrap();
        let Acquisition::Granted(st) =
            b.ledger.acquire(&key, &params, Cost { requests: 1, tokens: 100 }, T0, ChargeId::new()).await.unwrap()
        else {
            panic!("grant")
        };
        b.usage
            .add(&UsageBatch::new(vec![(
                job.tenant.clone(),
                OrgName::parse("org-a").unwrap(),
                OrgCounters { calls: 4, ..Default::default() },
            )]))
            .await
            .unwrap();
        // Never closed, like a killed process: no final WAL checkpoint runs,
        // so what follows reads only what the commits themselves made durable.
        std::mem::forget(b);
        std::mem::forget(db);
        st
    };

    let b = open(&path).backend();
    let rec = b.jobs.get_job(&job.id).await.unwrap().unwrap();
    assert_eq!((rec.status, rec.steps_done, rec.lease_owner.as_deref()), (JobStatus::Running, 1, Some("w")));
    assert_eq!(b.jobs.checkpoints(&job.id).await.unwrap(), vec![checkpoint()]);
    assert!(matches!(b.jobs.create_job(&job).await.unwrap(), CreateOutcome::Existing(_)), "idempotency key kept");
    assert_eq!(b.ledger.state(&key).await.unwrap(), granted);
    let got = b.queue.receive(10, Duration::ZERO).await.unwrap();
    assert_eq!(got.iter().map(|d| &d.message).collect::<Vec<_>>(), vec![&sent]);
    assert_eq!(b.usage.usage(&job.tenant).await.unwrap()[0].1.calls, 4);
}

#[test]
fn pragmas_and_schema_version() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("p.db");
    let db = open(&path);
    {
        let w = db.shared.writer.lock().unwrap();
        let int = |name: &str| w.pragma_query_value(None, name, |r| r.get::<_, i64>(0)).unwrap();
        let mode: String = w.pragma_query_value(None, "journal_mode", |r| r.get(0)).unwrap();
        assert_eq!(mode, "wal");
        assert_eq!(int("synchronous"), 1, "NORMAL");
        assert_eq!(int("wal_autocheckpoint"), 0, "the checkpointer thread does it");
        assert_eq!(int("foreign_keys"), 1);
        assert_eq!(int("user_version"), SCHEMA_VERSION);
        let r = db.shared.reader.lock().unwrap();
        assert_eq!(r.pragma_query_value(None, "query_only", |r| r.get::<_, i64>(0)).unwrap(), 1);
    }
    drop(db);
    // The mode is stored in the file: any later connection sees WAL.
    let raw = Connection::open(&path).unwrap();
    assert_eq!(raw.pragma_query_value(None, "journal_mode", |r| r.get::<_, String>(0)).unwrap(), "wal");
    // Reopening an up-to-date file is a no-op.
    drop(open(&path));
}

/// Commits never checkpoint (`wal_autocheckpoint = 0`), so the WAL reaches
/// the database file only through the checkpointer thread. 2 MB is under
/// SQLite's default automatic checkpoint (1,000 pages, 4 MB), so without the
/// thread the file would not grow either way.
#[test]
fn the_checkpointer_copies_the_wal_into_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.db");
    let db = open(&path);
    let before = std::fs::metadata(&path).unwrap().len();
    {
        let w = db.shared.writer.lock().unwrap();
        w.execute_batch("CREATE TABLE filler(x BLOB)").unwrap();
        for _ in 0..32 {
            w.execute("INSERT INTO filler VALUES (zeroblob(65536))", []).unwrap();
        }
    }
    let wal = std::fs::metadata(dir.path().join("c.db-wal")).unwrap().len();
    assert!(wal >= 2 << 20, "the rows are in the WAL: {wal} bytes");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let size = std::fs::metadata(&path).unwrap().len();
        if size >= before + (2 << 20) {
            break;
        }
        assert!(Instant::now() < deadline, "database file still {size} bytes (was {before})");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("n.db");
    let raw = Connection::open(&path).unwrap();
    raw.pragma_update(None, "user_version", SCHEMA_VERSION + 1).unwrap();
    drop(raw);
    let err = SqliteBackend::open(&path, SqliteOptions::default()).err().expect("refused");
    assert!(matches!(&err, StorageError::Backend(m) if m.contains("newer")), "{err:?}");
}

#[tokio::test]
async fn each_lane_is_first_in_first_out() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("q.db")).backend();
    let batch: Vec<_> = (0..5).map(|_| message(Priority::Batch)).collect();
    let interactive: Vec<_> = (0..5).map(|_| message(Priority::Interactive)).collect();
    // Interleaved sends; each lane must still come out in its send order.
    for (x, y) in batch.iter().zip(&interactive) {
        b.queue.send(x).await.unwrap();
        b.queue.send(y).await.unwrap();
    }
    let got: Vec<_> = b.queue.receive(100, Duration::ZERO).await.unwrap().into_iter().map(|d| d.message).collect();
    let expected: Vec<_> = interactive.into_iter().chain(batch).collect();
    assert_eq!(got, expected);
}

#[test]
fn receive_scans_the_queue_index() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("i.db"));
    let w = db.shared.writer.lock().unwrap();
    let plan: Vec<String> = w
        .prepare("EXPLAIN QUERY PLAN SELECT id FROM queue WHERE visible_at <= ?1 ORDER BY lane, id LIMIT ?2")
        .unwrap()
        .query_map([0, 10], |r| r.get::<_, String>(3))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let plan = plan.join("; ");
    assert!(plan.contains("USING COVERING INDEX queue_order"), "{plan}");
    assert!(!plan.contains("TEMP B-TREE"), "no sort per receive: {plan}");
}

/// Per-operation cost on this machine; run with `--ignored --nocapture`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore]
async fn operation_latency() {
    let dir = tempfile::tempdir().unwrap();
    let b = open(&dir.path().join("l.db")).backend();
    let key = BucketKey::new(&OrgName::parse("org-a").unwrap(), &ModelName::parse("m").unwrap());
    let params = BucketParams { requests: Rate::per_minute(u64::MAX / 2), tokens: Rate::per_minute(u64::MAX / 2) };
    let mut samples: Vec<(&str, Vec<Duration>)> =
        vec![("put_checkpoint", vec![]), ("ledger.acquire", vec![]), ("get_job", vec![])];
    for i in 0..2_000 {
        let mut job = new_job();
        job.idempotency = None;
        b.jobs.create_job(&job).await.unwrap();
        let LeaseOutcome::Acquired(lease) =
            b.jobs.acquire_lease(&job.id, "w", Duration::from_secs(30), T0).await.unwrap()
        else {
            panic!("lease")
        };
        let mut cp = checkpoint();
        cp.step = StepKey::Instance { step: StepId::parse("s").unwrap(), index: i as u32 };
        let t = Instant::now();
        b.jobs.put_checkpoint(&lease, &cp, T0 + 1).await.unwrap();
        samples[0].1.push(t.elapsed());
        let t = Instant::now();
        b.ledger.acquire(&key, &params, Cost { requests: 1, tokens: 1 }, T0, ChargeId::new()).await.unwrap();
        samples[1].1.push(t.elapsed());
        let t = Instant::now();
        b.jobs.get_job(&job.id).await.unwrap();
        samples[2].1.push(t.elapsed());
    }
    for (name, mut s) in samples {
        s.sort();
        println!("{name}: p50 {:?} p99 {:?}", s[s.len() / 2], s[s.len() * 99 / 100]);
    }
}

fn cache_entry() -> CachedResponse {
    CachedResponse {
        answer: crate::answer::StepAnswer::text("cached".into()),
        usage: Usage { calls: 1, prompt_tokens: 10, completion_tokens: 5 },
        org: OrgName::parse("org-a").unwrap(),
        model: ModelName::parse("m").unwrap(),
        created_at: T0,
    }
}

fn cache_rows(db: &SqliteBackend) -> i64 {
    let r = db.shared.reader.lock().unwrap();
    r.query_row("SELECT count(*) FROM response_cache", [], |r| r.get(0)).unwrap()
}

#[tokio::test]
async fn a_version_1_file_upgrades_to_the_response_cache() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v1.db");
    let job = new_job();
    {
        let db = open(&path);
        db.backend().jobs.create_job(&job).await.unwrap();
    }
    // What a version 1 binary left behind: no cache table, version 1.
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch("DROP TABLE response_cache; PRAGMA user_version = 1;").unwrap();
    drop(raw);

    let db = open(&path);
    let version: i64 = db.shared.writer.lock().unwrap().pragma_query_value(None, "user_version", |r| r.get(0)).unwrap();
    assert_eq!(version, SCHEMA_VERSION);
    let b = db.backend();
    assert!(b.jobs.get_job(&job.id).await.unwrap().is_some(), "existing data kept");
    let key = CacheKey::of("m", &serde_json::json!({"messages": []}));
    b.cache.put(&key, &cache_entry(), Duration::from_secs(60), T0).await.unwrap();
    assert_eq!(b.cache.get(&key, T0).await.unwrap(), Some(cache_entry()));
}

#[tokio::test]
async fn a_version_2_file_upgrades_with_its_jobs_in_flight_counted() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v2.db");
    let acme = TenantId::parse("acme").unwrap();
    let fresh = || NewJob { id: JobId::generate(), idempotency: None, ..new_job() };
    let (queued, done) = (fresh(), fresh());
    {
        let b = open(&path).backend();
        for job in [&queued, &fresh(), &done] {
            b.jobs.create_job(job).await.unwrap();
        }
        b.jobs.cancel_job(&done.id, T0).await.unwrap();
    }
    // What a version 2 binary left behind: no counters, version 2.
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch("DROP TABLE tenant_jobs; PRAGMA user_version = 2;").unwrap();
    drop(raw);

    let b = open(&path).backend();
    assert_eq!(b.jobs.jobs_in_flight(&acme).await.unwrap(), 2, "the queued jobs, not the cancelled one");
    b.jobs.cancel_job(&queued.id, T0).await.unwrap();
    assert_eq!(b.jobs.jobs_in_flight(&acme).await.unwrap(), 1);
    // Opening an up-to-date file again does not count anything twice.
    drop(b);
    let b = open(&path).backend();
    assert_eq!(b.jobs.jobs_in_flight(&acme).await.unwrap(), 1);
}

#[tokio::test]
async fn a_version_6_file_upgrades_to_usage_batches_applied_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v6.db");
    let acme = TenantId::parse("acme").unwrap();
    let org = OrgName::parse("org-a").unwrap();
    let batch = |calls| UsageBatch::new(vec![(acme.clone(), org.clone(), OrgCounters { calls, ..Default::default() })]);
    {
        let b = open(&path).backend();
        b.usage.add(&batch(2)).await.unwrap();
    }
    // What a version 6 binary left behind: no batch ids, version 6.
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch("DROP TABLE usage_batches; PRAGMA user_version = 6;").unwrap();
    drop(raw);

    let b = open(&path).backend();
    let again = batch(3);
    b.usage.add(&again).await.unwrap();
    b.usage.add(&again).await.unwrap();
    assert_eq!(b.usage.usage(&acme).await.unwrap()[0].1.calls, 5, "existing usage kept, the batch added once");
}

#[tokio::test]
async fn puts_purge_expired_cache_rows_a_batch_at_a_time() {
    let dir = tempfile::tempdir().unwrap();
    let db = open(&dir.path().join("c.db"));
    let b = db.backend();
    let put = |i: u32, ttl: Duration, now: Micros| {
        let b = b.clone();
        async move {
            let key = CacheKey::of("m", &serde_json::json!({ "i": i }));
            b.cache.put(&key, &cache_entry(), ttl, now).await.unwrap();
        }
    };
    for i in 0..40 {
        put(i, Duration::from_secs(1), T0).await;
    }
    assert_eq!(cache_rows(&db), 40, "nothing expired yet");
    let later = T0 + 2_000_000;
    put(100, Duration::from_secs(60), later).await;
    assert_eq!(cache_rows(&db), 41 - 32, "one batch of expired rows went");
    put(101, Duration::from_secs(60), later).await;
    assert_eq!(cache_rows(&db), 2, "the rest went; live rows stay");
}

#[tokio::test]
async fn a_version_4_file_upgrades_and_its_checkpoints_read_as_their_text() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("v4.db");
    let job = new_job();
    {
        let b = open(&path).backend();
        b.jobs.create_job(&job).await.unwrap();
        let LeaseOutcome::Acquired(lease) =
            b.jobs.acquire_lease(&job.id, "w", Duration::from_secs(30), T0).await.unwrap()
        else {
            panic!("lease")
        };
        b.jobs.put_checkpoint(&lease, &checkpoint(), T0 + 1).await.unwrap();
    }
    // What a version 4 binary left behind: the text alone, version 4.
    let raw = Connection::open(&path).unwrap();
    raw.execute_batch("ALTER TABLE checkpoints DROP COLUMN answer; PRAGMA user_version = 4;").unwrap();
    drop(raw);

    let b = open(&path).backend();
    let cps = b.jobs.checkpoints(&job.id).await.unwrap();
    assert_eq!(cps.len(), 1);
    assert_eq!(cps[0].answer, crate::answer::StepAnswer::text("out".into()));
    assert_eq!(cps[0].answer.first().finish_reason, None, "nothing is made up for an old checkpoint");
}
