//! The storage conformance suite against SQS + DynamoDB on the moto
//! emulator that `make test` starts (`AWS_ENDPOINT_URL`). Each test gets its
//! own tables and queues, so tests run in parallel without a reset.

mod conformance;

use std::sync::Arc;
use std::time::Duration;

use conformance::{Harness, QueueTime, T0};
use ratepool::aws::AwsConfig;
use ratepool::aws::{self, AwsClients};
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
    let backend = aws::connect(&clients, &cfg, VISIBILITY, std::num::NonZeroU64::new(3).unwrap(), clock.clone())
        .await
        .expect("connect");
    Harness { backend, clock, visibility_timeout: VISIBILITY, queue_time: QueueTime::Wall, keep_alive: Box::new(()) }
}

conformance_suite!(harness);
calls_suite!(harness);

/// DynamoDB-only: an item holds at most 400 KB, and the engine treats the
/// refused put as a miss.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cache_put_over_400_kb_is_too_large() {
    use ratepool::domain::{ModelName, OrgName, Usage};
    use ratepool::storage::{CacheKey, CachedResponse, StorageError};

    let h = harness().await;
    let key = CacheKey::of("m", &serde_json::json!({"messages": []}));
    let entry = |bytes: usize| CachedResponse {
        content: "x".repeat(bytes),
        usage: Usage::default(),
        org: OrgName::parse("org-a").expect("org"),
        model: ModelName::parse("m").expect("model"),
        created_at: T0,
    };
    let ttl = Duration::from_secs(60);
    let err = h.backend.cache.put(&key, &entry(401 * 1024), ttl, T0).await.expect_err("too large");
    assert!(matches!(err, StorageError::TooLarge(_)), "{err:?}");
    assert_eq!(h.backend.cache.get(&key, T0).await.expect("get"), None);
    // Just under the limit still fits.
    h.backend.cache.put(&key, &entry(390 * 1024), ttl, T0).await.expect("fits");
    assert_eq!(h.backend.cache.get(&key, T0).await.expect("get").map(|e| e.content.len()), Some(390 * 1024));
}
