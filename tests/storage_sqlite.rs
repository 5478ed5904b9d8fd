//! The storage conformance suite against the SQLite backend, each test on
//! its own fresh database file.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use conformance::{Harness, QueueTime, T0};
use ratepool::domain::ManualClock;
use ratepool::local::{SqliteBackend, SqliteOptions};

const VISIBILITY: Duration = Duration::from_secs(30);

fn harness() -> Harness {
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

/// One named `#[tokio::test]` per conformance test, so a failure says which.
macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let h = harness();
                conformance::$name(&h).await;
            }
        )*
    };
}

conformance_tests!(
    queue_send_receive_delete,
    queue_visibility_timeout_redelivers,
    queue_extend_keeps_message_hidden,
    queue_extend_zero_hands_message_back,
    queue_stale_receipt_cannot_extend,
    queue_stale_receipt_cannot_delete,
    queue_dead_letter_moves_message,
    queue_interactive_before_batch,
    queue_receive_waits_when_empty,
    queue_receive_returns_early_when_sent,
    jobs_create_and_get,
    jobs_idempotent_create,
    stalled_runs_count_acquisitions_since_progress,
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
    cancel_queued_job,
    cancel_running_job_revokes_lease,
    cancel_finished_job_is_left_alone,
    fail_unleased_job,
    ledger_grants_up_to_limit_then_denies,
    ledger_never_for_oversized_cost,
    ledger_raise_never_lowers,
    ledger_concurrent_acquires_never_overgrant,
    usage_add_and_tenant_isolation,
);
