//! The storage conformance suite against SQS + DynamoDB on the moto
//! emulator that `make test` starts (`AWS_ENDPOINT_URL`). Each test gets its
//! own tables and queues, so tests run in parallel without a reset.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use conformance::{Harness, QueueTime, T0};
use ratepool::aws::{self, AwsClients};
use ratepool::config::AwsConfig;
use ratepool::domain::ManualClock;

/// Short, so the visibility tests (which really wait on SQS) stay quick.
const VISIBILITY: Duration = Duration::from_secs(2);

/// The emulator's address; these tests cannot run without one.
pub fn endpoint() -> String {
    std::env::var("AWS_ENDPOINT_URL").unwrap_or_else(|_| {
        panic!("AWS_ENDPOINT_URL is not set: run the AWS tests through `make test`, which starts the moto emulator")
    })
}

pub fn unique_config() -> AwsConfig {
    let suffix = uuid::Uuid::new_v4().simple().to_string();
    let suffix = &suffix[..12];
    AwsConfig {
        region: Some("us-east-1".into()),
        endpoint_url: Some(endpoint()),
        jobs_table: format!("jobs-{suffix}"),
        ledger_table: format!("ledger-{suffix}"),
        interactive_queue: format!("interactive-{suffix}"),
        batch_queue: format!("batch-{suffix}"),
        dead_letter_queue: format!("dlq-{suffix}"),
        ..AwsConfig::default()
    }
}

async fn harness() -> Harness {
    let cfg = unique_config();
    let clients = AwsClients::load(&cfg).await;
    aws::init(&clients, &cfg, VISIBILITY).await.expect("create tables and queues");
    let clock = Arc::new(ManualClock::new(T0));
    let backend = aws::connect(&clients, &cfg, VISIBILITY, clock.clone()).await.expect("connect");
    Harness { backend, clock, visibility_timeout: VISIBILITY, queue_time: QueueTime::Wall, keep_alive: Box::new(()) }
}

macro_rules! conformance_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
            async fn $name() {
                let h = harness().await;
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
