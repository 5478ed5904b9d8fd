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
