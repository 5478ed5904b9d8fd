//! The storage conformance suite against the SQLite backend, each test on
//! its own fresh database file.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use conformance::{Harness, QueueTime, T0};
use ratepool::domain::ManualClock;
use ratepool::local::{SqliteBackend, SqliteOptions};

const VISIBILITY: Duration = Duration::from_secs(30);

async fn harness() -> Harness {
    let dir = tempfile::tempdir().expect("temp dir");
    let clock = Arc::new(ManualClock::new(T0));
    let options = SqliteOptions { visibility_timeout: VISIBILITY, clock: clock.clone() };
    let db = SqliteBackend::open(&dir.path().join("ratepool.db"), options).expect("open sqlite");
    Harness {
        backend: db.backend(),
        clock,
        visibility_timeout: VISIBILITY,
        queue_time: QueueTime::Manual,
        keep_alive: Box::new(dir),
    }
}

conformance_suite!(harness);
calls_suite!(harness);

/// The fault-injecting wrapper does what it counts: a failed write leaves
/// nothing behind, a lost answer leaves the write behind, and every fault
/// it reports happened.
#[tokio::test]
async fn the_fault_wrapper_fails_before_or_loses_after_as_it_reports() {
    use std::sync::atomic::Ordering;

    use ratepool::domain::{JobId, Priority, TenantId};
    use ratepool::storage::faults::{FaultPlan, Faulty};
    use ratepool::storage::{CreateOutcome, NewJob};

    let h = harness().await;
    let job = |name: &str| NewJob {
        id: JobId::generate(),
        tenant: TenantId::parse("acme").unwrap(),
        name: name.into(),
        priority: Priority::Interactive,
        spec_json: "{}".into(),
        steps_total: 1,
        idempotency: None,
        created_at: T0,
        in_flight_limit: None,
    };
    let (failing, counts) = Faulty::wrap(h.backend.clone(), FaultPlan { write_error: 1.0, ..FaultPlan::default() });
    let refused = job("refused");
    assert!(failing.jobs.create_job(&refused).await.is_err());
    assert_eq!(h.backend.jobs.get_job(&refused.id).await.unwrap(), None, "nothing written");
    assert_eq!((counts.write_errors.load(Ordering::Relaxed), counts.writes_applied.load(Ordering::Relaxed)), (1, 0));

    let (losing, counts) = Faulty::wrap(h.backend.clone(), FaultPlan { lost_response: 1.0, ..FaultPlan::default() });
    let lost = job("lost");
    assert!(losing.jobs.create_job(&lost).await.is_err(), "the caller sees an error");
    assert!(h.backend.jobs.get_job(&lost.id).await.unwrap().is_some(), "but the write committed");
    assert_eq!((counts.lost_responses.load(Ordering::Relaxed), counts.writes_applied.load(Ordering::Relaxed)), (1, 1));
    // Reads are never failed, only slowed.
    assert!(losing.jobs.get_job(&lost.id).await.unwrap().is_some());

    let (calm, counts) = Faulty::wrap(h.backend.clone(), FaultPlan::default());
    assert!(matches!(calm.jobs.create_job(&job("calm")).await.unwrap(), CreateOutcome::Created(_)));
    assert_eq!(counts.writes_applied.load(Ordering::Relaxed), 1);
}
