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
        outputs_bucket: Some(format!("outputs-{suffix}")),
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
        answer: ratepool::answer::StepAnswer::text("x".repeat(bytes)),
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
    assert_eq!(h.backend.cache.get(&key, T0).await.expect("get").map(|e| e.answer.output().len()), Some(390 * 1024));
}

/// DynamoDB-only: a checkpoint written before the whole message was kept
/// (no `answer` attribute) still reads, as its text alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_checkpoint_without_its_answer_attribute_reads_as_its_text() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use ratepool::answer::{AssistantMessage, StepAnswer};
    use ratepool::domain::{StepId, StepKey};

    let cfg = unique_config();
    let answer = StepAnswer::new(vec![AssistantMessage {
        content: Some("an old answer".into()),
        finish_reason: Some("stop".into()),
        ..AssistantMessage::default()
    }])
    .unwrap();
    let (clients, backend, lease, cp) =
        lease_and_answer(&cfg, StepKey::Step(StepId::parse("s1").unwrap()), answer).await;
    backend.jobs.put_checkpoint(&lease, &cp, T0 + 1).await.unwrap();
    // What an older binary wrote: the same item without `answer`.
    clients
        .dynamodb
        .update_item()
        .table_name(&cfg.jobs_table)
        .key("PK", AttributeValue::S(lease.job_id.to_string()))
        .key("SK", AttributeValue::S("step#s1".into()))
        .update_expression("REMOVE answer")
        .send()
        .await
        .expect("remove the answer attribute");
    let read = backend.jobs.checkpoints(&lease.job_id).await.unwrap();
    assert_eq!(read.len(), 1);
    assert_eq!(read[0].answer, StepAnswer::text("an old answer".into()));
    assert_eq!(read[0].output(), "an old answer");
}

/// A step as a worker would checkpoint it: a lease on a fresh job in
/// `cfg`'s tables, and `step`'s checkpoint with `answer`.
async fn lease_and_answer(
    cfg: &AwsConfig,
    step: ratepool::domain::StepKey,
    answer: ratepool::answer::StepAnswer,
) -> (AwsClients, ratepool::storage::Backend, ratepool::storage::Lease, ratepool::storage::Checkpoint) {
    use ratepool::domain::{JobId, ModelName, OrgName, Priority, TenantId, Usage};
    use ratepool::storage::{Checkpoint, CreateOutcome, LeaseOutcome, NewJob};

    let clients = AwsClients::load(cfg).await;
    aws::init(&clients, cfg, VISIBILITY).await.expect("create tables, queues and bucket");
    let backend = aws::connect(&clients, cfg, VISIBILITY, std::num::NonZeroU64::MIN, Arc::new(ManualClock::new(T0)))
        .await
        .expect("connect");
    let job = NewJob {
        id: JobId::generate(),
        tenant: TenantId::parse("acme").unwrap(),
        name: "big".into(),
        priority: Priority::Batch,
        spec_json: "{}".into(),
        steps_total: 1,
        idempotency: None,
        created_at: T0,
        in_flight_limit: None,
    };
    assert!(matches!(backend.jobs.create_job(&job).await.unwrap(), CreateOutcome::Created(_)));
    let LeaseOutcome::Acquired(lease) =
        backend.jobs.acquire_lease(&job.id, "w", Duration::from_secs(30), T0).await.unwrap()
    else {
        panic!("lease")
    };
    let cp = Checkpoint {
        step,
        answer,
        usage: Usage { calls: 1, prompt_tokens: 3, completion_tokens: 4 },
        org: OrgName::parse("org-a").unwrap(),
        model: ModelName::parse("m").unwrap(),
        attempts: 1,
        started_at: T0,
        finished_at: T0 + 1,
    };
    (clients, backend, lease, cp)
}

fn scene_3() -> ratepool::domain::StepKey {
    use ratepool::domain::{StepId, StepKey};
    StepKey::Instance { step: StepId::parse("scene").unwrap(), index: 3 }
}

fn big(bytes: usize) -> ratepool::answer::StepAnswer {
    ratepool::answer::StepAnswer::text("x".repeat(bytes))
}

/// DynamoDB-only: an answer over the item limit is an S3 object named by
/// its content, and the item holds only the pointer; writing the object
/// again (a retried checkpoint) leaves one object with the same bytes.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_large_answer_is_an_s3_object_and_its_item_a_pointer() {
    use aws_sdk_dynamodb::types::AttributeValue;

    let cfg = unique_config();
    let (clients, backend, lease, cp) = lease_and_answer(&cfg, scene_3(), big(600 * 1024)).await;
    let bucket = cfg.outputs_bucket.clone().expect("a bucket");
    backend.jobs.put_checkpoint(&lease, &cp, T0 + 1).await.expect("stored through S3");
    let item = clients
        .dynamodb
        .get_item()
        .table_name(&cfg.jobs_table)
        .key("PK", AttributeValue::S(lease.job_id.to_string()))
        .key("SK", AttributeValue::S("step#scene[3]".into()))
        .send()
        .await
        .expect("read the item")
        .item
        .expect("the step item");
    assert!(!item.contains_key("output") && !item.contains_key("answer"), "no inline answer: {:?}", item.keys());
    let key = item["output_ref"].as_s().expect("a pointer").clone();
    assert!(key.starts_with(&format!("{}/scene[3]/", lease.job_id)), "{key}");
    let listed = clients.s3.list_objects_v2().bucket(&bucket).send().await.expect("list");
    assert_eq!(listed.contents().len(), 1);
    let size = listed.contents()[0].size();
    assert_eq!(item["output_bytes"].as_n().ok().and_then(|n| n.parse::<i64>().ok()), size);

    // The retried checkpoint writes the same object and is refused by the
    // item's condition: still one object, still readable.
    let again = backend.jobs.put_checkpoint(&lease, &cp, T0 + 2).await;
    assert!(matches!(again, Err(ratepool::storage::StorageError::CheckpointExists(_))), "{again:?}");
    assert_eq!(clients.s3.list_objects_v2().bucket(&bucket).send().await.expect("list").contents().len(), 1);
    let read = backend.jobs.checkpoints(&lease.job_id).await.expect("read back");
    assert_eq!(read.len(), 1);
    assert!(read[0] == cp, "the answer reads back whole");

    // An object that does not match its pointer is an error, never a wrong answer.
    clients
        .s3
        .put_object()
        .bucket(&bucket)
        .key(&key)
        .body(aws_sdk_s3::primitives::ByteStream::from_static(b"{\"output\":\"other\",\"answer\":\"{}\"}"))
        .send()
        .await
        .expect("overwrite");
    let err = backend.jobs.checkpoints(&lease.job_id).await.expect_err("mismatch");
    assert!(err.to_string().contains("do not match"), "{err}");
}

/// DynamoDB-only: without `[aws] outputs_bucket` an answer over the item
/// limit is `TooLarge` (which fails the step at once), naming its size and
/// the setting; nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn without_a_bucket_a_large_answer_is_too_large_and_names_the_setting() {
    let cfg = AwsConfig { outputs_bucket: None, ..unique_config() };
    let (_clients, backend, lease, cp) = lease_and_answer(&cfg, scene_3(), big(400 * 1024)).await;
    let err = backend.jobs.put_checkpoint(&lease, &cp, T0 + 1).await.expect_err("too large");
    let ratepool::storage::StorageError::TooLarge(msg) = &err else { panic!("{err:?}") };
    assert!(!err.is_transient());
    assert!(msg.contains(&format!("{} bytes", cp.answer_bytes())), "names the size: {msg}");
    assert!(msg.contains("[aws] outputs_bucket"), "{msg}");
    assert!(backend.jobs.checkpoints(&lease.job_id).await.unwrap().is_empty());
    assert_eq!(backend.jobs.get_job(&lease.job_id).await.unwrap().unwrap().steps_done, 0);
}

/// DynamoDB-only: the job item's `steps_done` counter fell behind its
/// checkpoint items (seen on moto, whose transactions are not atomic
/// against concurrent writes to one item). The final write is refused by
/// the counter, finds every checkpoint item, sets the counter from them and
/// finishes; a step really missing is still `StepsMissing`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_steps_done_counter_behind_its_checkpoints_is_recounted_at_the_final_write() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use ratepool::answer::StepAnswer;
    use ratepool::domain::{StepId, StepKey};
    use ratepool::storage::{JobOutcome, JobStatus, StorageError};

    let cfg = unique_config();
    let s1 = StepKey::Step(StepId::parse("s1").unwrap());
    let (clients, backend, lease, cp) = lease_and_answer(&cfg, s1, StepAnswer::text("one".into())).await;
    backend.jobs.set_steps_total(&lease, 2, T0 + 1).await.unwrap();
    backend.jobs.put_checkpoint(&lease, &cp, T0 + 1).await.unwrap();
    // One step of two: really missing, so refused.
    let err = backend.jobs.finish_job(&lease, &JobOutcome::Succeeded, T0 + 2).await.expect_err("a step is missing");
    assert!(matches!(err, StorageError::StepsMissing { done: 1, total: 2 }), "{err:?}");
    let s2 = ratepool::storage::Checkpoint { step: StepKey::Step(StepId::parse("s2").unwrap()), ..cp };
    backend.jobs.put_checkpoint(&lease, &s2, T0 + 3).await.unwrap();
    // The counter loses an increment, as a non-atomic transaction can.
    clients
        .dynamodb
        .update_item()
        .table_name(&cfg.jobs_table)
        .key("PK", AttributeValue::S(lease.job_id.to_string()))
        .key("SK", AttributeValue::S("job".into()))
        .update_expression("SET steps_done = :one")
        .expression_attribute_values(":one", AttributeValue::N("1".into()))
        .send()
        .await
        .expect("set the counter back");
    assert_eq!(backend.jobs.get_job(&lease.job_id).await.unwrap().unwrap().steps_done, 1);
    backend.jobs.finish_job(&lease, &JobOutcome::Succeeded, T0 + 4).await.expect("both steps are checkpointed");
    let job = backend.jobs.get_job(&lease.job_id).await.unwrap().unwrap();
    assert_eq!((job.status, job.steps_done, job.steps_total), (JobStatus::Succeeded, 2, 2));
}

/// The hot items stay small: the job item (rewritten by every lease
/// renewal, checkpoint and finish) holds no spec, which has an item of its
/// own, and a long answer is deflated in its step item, read back whole. A
/// job stored before specs had their own item (spec inline, no spec item)
/// still reads.
#[tokio::test]
async fn the_spec_has_its_own_item_answers_are_packed_and_an_inline_spec_still_reads() {
    use aws_sdk_dynamodb::types::AttributeValue;
    use ratepool::answer::StepAnswer;
    use ratepool::domain::{StepId, StepKey};

    let cfg = unique_config();
    let s1 = StepKey::Step(StepId::parse("s1").unwrap());
    let long = "INT. KITCHEN - NIGHT. The kettle screams; Mara does not move. ".repeat(40);
    let (clients, backend, lease, cp) = lease_and_answer(&cfg, s1, StepAnswer::text(long.clone())).await;
    backend.jobs.put_checkpoint(&lease, &cp, T0 + 1).await.unwrap();
    let item = |sk: &str| {
        let (clients, cfg, id) = (clients.clone(), cfg.clone(), lease.job_id.to_string());
        let sk = sk.to_string();
        async move {
            clients
                .dynamodb
                .get_item()
                .table_name(&cfg.jobs_table)
                .key("PK", AttributeValue::S(id))
                .key("SK", AttributeValue::S(sk))
                .consistent_read(true)
                .send()
                .await
                .unwrap()
                .item
                .unwrap_or_default()
        }
    };
    let job = item("job").await;
    assert!(!job.is_empty() && !job.contains_key("spec_json"), "{job:?}");
    assert_eq!(item("spec").await.get("spec_json").and_then(|v| v.as_s().ok()).map(String::as_str), Some("{}"));
    let step = item("step#s1").await;
    let packed = step.get("packed").and_then(|v| v.as_b().ok()).expect("a long answer is packed");
    assert!(packed.as_ref().len() < long.len() / 4, "{} bytes for {}", packed.as_ref().len(), long.len());
    assert!(!step.contains_key("output"));
    let read = backend.jobs.checkpoints(&lease.job_id).await.unwrap();
    assert_eq!(read[0].answer.first().content.as_deref(), Some(long.as_str()));

    // An item written by the layout before: the spec inline, no spec item.
    clients
        .dynamodb
        .update_item()
        .table_name(&cfg.jobs_table)
        .key("PK", AttributeValue::S(lease.job_id.to_string()))
        .key("SK", AttributeValue::S("job".into()))
        .update_expression("SET spec_json = :spec")
        .expression_attribute_values(":spec", AttributeValue::S(r#"{"inline":true}"#.into()))
        .send()
        .await
        .unwrap();
    clients
        .dynamodb
        .delete_item()
        .table_name(&cfg.jobs_table)
        .key("PK", AttributeValue::S(lease.job_id.to_string()))
        .key("SK", AttributeValue::S("spec".into()))
        .send()
        .await
        .unwrap();
    let record = backend.jobs.get_job(&lease.job_id).await.unwrap().unwrap();
    assert_eq!(record.spec_json, r#"{"inline":true}"#);
}
