//! The DynamoDB job store and usage store: one table keyed `PK` (hash) and
//! `SK` (range), holding four kinds of item.
//!
//! | PK | SK | what |
//! | --- | --- | --- |
//! | `<job id>` | `job` | the job record, its lease (owner, epoch, expiry) and counters: small (a few hundred bytes), since every lease renewal, checkpoint and finish rewrites it and DynamoDB bills a write by the whole item |
//! | `<job id>` | `spec` | the job's spec, written once with the job and never again |
//! | `<job id>` | `step#<step key>` | one step checkpoint (`step#scene[3]` for a fan-out instance): `output` text and `answer` (the rest of the message), or both deflated in `packed` (binary) when that is smaller, or for an answer over [`MAX_PAYLOAD_BYTES`] a pointer into the outputs bucket ([`outputs`]) |
//! | `<job id>` | `webhook` | the job's last webhook delivery report (JSON) |
//! | `unsent` | `<job id>` | a job whose queue message is not known to be sent: written with the job, deleted once sent |
//! | `idem#<tenant>#<key>` | `idem` | an idempotency key: job id and request hash |
//! | `usage#<tenant>` | `org#<org>` | a tenant's usage counters for one org |
//! | `quota#<tenant>` | `in_flight` | the tenant's jobs queued or running (`in_flight`) |
//! | `cache#<key hex>` | `cache` | a response cache entry ([`super::cache`]) |
//! | `call#<tenant>#<key>` | `call`, `part#…` | a durable call and its answer ([`super::calls`]) |
//!
//! Job ids, tenant and org names never contain `#`, so the kinds cannot
//! collide. Every write is conditional and nothing is read before a write:
//! the lease guard (owner, epoch, expiry, status) is the condition of the
//! write itself, and a failed condition hands back the old item or the
//! transaction's cancellation reasons, which name the outcome.
//!
//! Expiry uses DynamoDB TTL on `expires_at` (epoch seconds). A finished job
//! keeps `retention_days` from the moment it finished. While it lives, its
//! item is pushed to `now + retention + LIVE_MARGIN` by every lease write;
//! steps get `written + retention + LIVE_MARGIN`, so they outlast their job
//! unless it runs longer than the margin; the idempotency item gets
//! `created + retention`, so it never outlives its job. TTL deletes late
//! (days on AWS, never on the emulator), so reads skip expired items.
//!
//! The in-flight counter is raised in the job's creating transaction
//! (conditional on the tenant's limit) and lowered in the transaction that
//! moves the job to a final status, so every job is counted in and out
//! once. It never expires. Two approximations, both toward admitting more:
//! jobs created before the counter existed are not counted (an upgraded
//! table's counters may go below zero until they finish), and a job that
//! never finishes and whose item TTL deletes (a month past its last lease
//! write) is never counted out.

mod admission;
mod items;
mod outputs;
mod tables;
mod usage;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::SdkError;
use aws_sdk_dynamodb::operation::describe_table::DescribeTableError;
use aws_sdk_dynamodb::operation::transact_write_items::TransactWriteItemsError;
use aws_sdk_dynamodb::operation::update_item::UpdateItemError;
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, CancellationReason, KeySchemaElement, KeyType, Put, ReturnValue,
    ReturnValuesOnConditionCheckFailure, ScalarAttributeType, TableStatus, TimeToLiveSpecification, TimeToLiveStatus,
    TransactWriteItem, Update,
};

use super::AwsConfig;
use super::{dynamo_err, sdk_err};
use crate::answer::StepAnswer;
use crate::domain::{Clock, JobId, Micros, ModelName, OrgName, Priority, StepKey, TenantId, Usage};
use crate::storage::{
    Checkpoint, CheckpointPage, CreateOutcome, DeliveryReport, JobOutcome, JobRecord, JobStatus, JobStore, Lease,
    LeaseOutcome, NewJob, OrgCounters, PageRequest, QueueMessage, StorageError, StorageResult, UsageBatch, UsageStore,
};

use items::*;
pub(super) use items::{micros, num, query_prefix, s, secs_ceil};
pub(super) use outputs::ensure_bucket;
use outputs::{OutputBucket, OutputRef};
pub use tables::ensure_tables;
use tables::{describe_status, missing_table};

type Item = HashMap<String, AttributeValue>;

const JOB_SK: &str = "job";
const SPEC_SK: &str = "spec";
const STEP_PREFIX: &str = "step#";
const IDEM_SK: &str = "idem";
const WEBHOOK_SK: &str = "webhook";
const USAGE_ORG_PREFIX: &str = "org#";
/// Partition of a usage batch's markers, one item per chunk applied.
const USAGE_BATCH_PREFIX: &str = "usagebatch#";
const IN_FLIGHT_SK: &str = "in_flight";
/// One partition for every unsent job: an entry lives from the job's
/// creation to its send (milliseconds), so the partition stays small; two
/// writes per submission bound it at about 500 submissions a second.
const UNSENT_PK: &str = "unsent";
/// The TTL attribute, in epoch seconds as DynamoDB TTL wants.
pub(super) const TTL_ATTR: &str = "expires_at";

/// The largest job spec, or step answer kept in its item, stored. An item
/// holds at most 400 KB, attribute names and the other attributes
/// included; this keeps the rest (an error message, counters, ids)
/// comfortably inside. A larger answer goes to the outputs bucket.
pub const MAX_PAYLOAD_BYTES: usize = 350_000;
/// S3 reads in flight at once while loading a job's answers.
const S3_READS: usize = 8;
/// Error messages are cut to this, so a long provider message can never make
/// the final status write fail.
const MAX_ERROR_BYTES: usize = 8_192;
/// How long past its retention a job that has not finished is kept: SQS keeps
/// a message at most 14 days, so a job still unfinished by then has no
/// message left to run it.
const LIVE_MARGIN_SECS: i64 = 14 * 86_400;
/// Tries of a transaction that DynamoDB cancelled only because another
/// transaction held one of its items at the same moment.
const TX_ATTEMPTS: u32 = 4;
/// Items per TransactWriteItems call (the service's limit).
const TX_MAX_ITEMS: usize = 100;

/// Jobs, checkpoints, idempotency keys and usage counters in one table.
pub struct DynamoJobs {
    client: Client,
    table: String,
    retention_secs: i64,
    /// Only `get_job` and `checkpoints`, which take no `now`, read it: to
    /// hide items whose TTL passed but that DynamoDB has not deleted yet.
    clock: Arc<dyn Clock>,
    /// One lock per tenant: this process's creates that check a tenant's
    /// in-flight limit go one at a time, each reading the count the last
    /// one wrote, as the ledger does per bucket. DynamoDB's conditional
    /// transaction keeps processes apart; this keeps one process exact on
    /// the moto emulator too, whose writes to one item are not atomic.
    limited_creates: std::sync::Mutex<HashMap<TenantId, Arc<tokio::sync::Mutex<()>>>>,
    /// `[aws] outputs_bucket`: where answers over [`MAX_PAYLOAD_BYTES`] go.
    outputs: Option<OutputBucket>,
}

impl DynamoJobs {
    /// Checks that the table exists; creates nothing (see [`ensure_tables`]).
    pub async fn connect(
        client: Client,
        s3: aws_sdk_s3::Client,
        cfg: &AwsConfig,
        clock: Arc<dyn Clock>,
    ) -> StorageResult<Self> {
        describe_status(&client, &cfg.jobs_table).await?.ok_or_else(|| missing_table(&cfg.jobs_table))?;
        let retention_secs = i64::try_from(cfg.retention_days.get()).unwrap_or(i64::MAX / 86_400 / 2) * 86_400;
        Ok(Self {
            client,
            table: cfg.jobs_table.clone(),
            retention_secs,
            clock,
            limited_creates: std::sync::Mutex::new(HashMap::new()),
            outputs: cfg.outputs_bucket.clone().map(|b| OutputBucket::new(s3, b)),
        })
    }

    /// When a finished job's items go.
    fn finished_ttl(&self, now: Micros) -> AttributeValue {
        num(secs(now).saturating_add(self.retention_secs))
    }

    /// When a job or step still in progress would go, were it abandoned.
    fn live_ttl(&self, now: Micros) -> AttributeValue {
        num(secs(now).saturating_add(self.retention_secs).saturating_add(LIVE_MARGIN_SECS))
    }

    fn update(
        &self,
        pk: &str,
        sk: &str,
    ) -> aws_sdk_dynamodb::operation::update_item::builders::UpdateItemFluentBuilder {
        self.client.update_item().table_name(&self.table).key("PK", s(pk)).key("SK", s(sk))
    }

    /// One UpdateItem on the job item under `lease` ([`UNDER_LEASE`], and
    /// `condition` when not empty), with `vals` besides the lease's own:
    /// false when a condition refused it.
    async fn update_leased<const N: usize>(
        &self,
        lease: &Lease,
        now: Micros,
        (update, condition): (&str, &str),
        vals: [(&str, AttributeValue); N],
        what: &str,
    ) -> StorageResult<bool> {
        let condition =
            if condition.is_empty() { UNDER_LEASE.to_string() } else { format!("{UNDER_LEASE} AND {condition}") };
        let res = self
            .update(lease.job_id.as_str(), JOB_SK)
            .update_expression(update)
            .condition_expression(&condition)
            .set_expression_attribute_names(Some(names(&[update, &condition])))
            .set_expression_attribute_values(Some(lease_values(lease, now, vals)))
            .send()
            .await;
        match res {
            Ok(_) => Ok(true),
            Err(e) if matches!(e.as_service_error(), Some(UpdateItemError::ConditionalCheckFailedException(_))) => {
                Ok(false)
            }
            Err(e) => Err(dynamo_err(what, e)),
        }
    }

    async fn read_item(&self, pk: &str, sk: &str) -> StorageResult<Option<Item>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(pk))
            .key("SK", s(sk))
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_err("reading a job table item", e))?;
        Ok(out.item)
    }

    /// One transaction, retried while DynamoDB cancels it only for a
    /// concurrent transaction on the same item (a checkpoint meeting the
    /// lease heartbeat, two parallel steps of one job). Any other
    /// cancellation comes back with its per-item reasons.
    async fn transact(&self, items: Vec<TransactWriteItem>, what: &str) -> Result<(), TxError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let res = self.client.transact_write_items().set_transact_items(Some(items.clone())).send().await;
            let e = match res {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            let reasons = match e.as_service_error() {
                Some(TransactWriteItemsError::TransactionCanceledException(c)) => c.cancellation_reasons().to_vec(),
                _ => return Err(TxError::Other(dynamo_err(what, e))),
            };
            let only_contention = reasons.iter().any(|r| r.code() == Some("TransactionConflict"))
                && !reasons.iter().any(|r| r.code() == Some("ConditionalCheckFailed"));
            if only_contention && attempt < TX_ATTEMPTS {
                tokio::time::sleep(Duration::from_millis(rand::random_range(5..=20u64) << attempt)).await;
                continue;
            }
            if reasons.iter().any(|r| r.code() == Some("ConditionalCheckFailed")) {
                return Err(TxError::Cancelled(reasons));
            }
            // Throttled items: the SDK does not retry a cancelled
            // transaction; the caller does, after a backoff.
            if reasons.iter().any(|r| r.code() == Some("ThrottlingError")) {
                return Err(TxError::Other(StorageError::Throttled(format!("{what}: transaction throttled"))));
            }
            return Err(TxError::Other(dynamo_err(what, e)));
        }
    }
    /// A job's unexpired checkpoint items, in the order the steps finished
    /// (`finished_at`, then step key), each with that order and its
    /// answer's stored size.
    async fn checkpoint_items(&self, id: &JobId) -> StorageResult<Vec<(Item, (Micros, StepKey, u64))>> {
        let now_s = secs(self.clock.now());
        let mut out = Vec::new();
        let mut items =
            query_prefix(&self.client, &self.table, id.as_str(), STEP_PREFIX).into_paginator().items().send();
        while let Some(item) = items.next().await {
            let item = item.map_err(|e| sdk_err("reading checkpoints", e))?;
            if !expired(&item, now_s) {
                let order = checkpoint_order(&item)?;
                out.push((item, order));
            }
        }
        out.sort_by(|(_, (at_a, a, _)), (_, (at_b, b, _))| (at_a, a).cmp(&(at_b, b)));
        Ok(out)
    }

    /// The checkpoints of `items`, in order, their S3 answers read a few
    /// at a time.
    async fn with_answers(&self, items: &[(Item, (Micros, StepKey, u64))]) -> StorageResult<Vec<Checkpoint>> {
        let mut out = Vec::with_capacity(items.len());
        for chunk in items.chunks(S3_READS) {
            out.extend(futures::future::try_join_all(chunk.iter().map(|(item, _)| self.with_answer(item))).await?);
        }
        Ok(out)
    }

    async fn with_answer(&self, item: &Item) -> StorageResult<Checkpoint> {
        let answer = match stored_answer(item)? {
            StoredAnswer::Inline(a) => a,
            StoredAnswer::InS3(r) => self.output_bucket(&r)?.get(&r).await?,
        };
        checkpoint_from_item(item, answer)
    }

    /// The bucket a pointer is read from: a checkpoint written with a
    /// bucket cannot be read by a process configured without one.
    fn output_bucket(&self, r: &OutputRef) -> StorageResult<&OutputBucket> {
        self.outputs.as_ref().ok_or_else(|| {
            StorageError::Backend(format!(
                "a checkpoint's answer is in S3 ({}), but this process has no [aws] outputs_bucket",
                r.key
            ))
        })
    }

    async fn get_job_at(&self, id: &JobId, now_s: i64) -> StorageResult<Option<JobRecord>> {
        let item = match self.read_item(id.as_str(), JOB_SK).await? {
            Some(item) if !expired(&item, now_s) => item,
            _ => return Ok(None),
        };
        // A job stored before specs had an item of their own keeps it inline.
        let spec = match item.get("spec_json").and_then(|v| v.as_s().ok()) {
            Some(inline) => inline.clone(),
            None => self.spec_of(id).await?,
        };
        Ok(Some(job_from_item(&item, spec)?))
    }

    /// The spec item's text. It never changes once written, so an
    /// eventually consistent read (half the read units) is tried first, and
    /// a strongly consistent one only if that missed a just-created job's.
    async fn spec_of(&self, id: &JobId) -> StorageResult<String> {
        for consistent in [false, true] {
            let out = self
                .client
                .get_item()
                .table_name(&self.table)
                .key("PK", s(id.as_str()))
                .key("SK", s(SPEC_SK))
                .consistent_read(consistent)
                .send()
                .await
                .map_err(|e| sdk_err("reading a job's spec", e))?;
            if let Some(item) = out.item {
                return Ok(Fields::new(&item, "spec item").s("spec_json")?.to_owned());
            }
        }
        Err(StorageError::Missing(format!("the spec of job {id}")))
    }

    /// `finish_job`; with `repair`, a refusal for missing steps first checks
    /// the counter against the checkpoint items ([`Self::recount_steps`])
    /// and, if only the counter was behind, finishes again (once).
    async fn finish(&self, lease: &Lease, outcome: &JobOutcome, now: Micros, repair: bool) -> StorageResult<()> {
        let (status, error) = match outcome {
            JobOutcome::Succeeded => (JobStatus::Succeeded, None),
            JobOutcome::Failed(e) => (JobStatus::Failed, Some(clip(e))),
        };
        let update = if error.is_some() {
            "SET #status = :status, #error = :error, #finished_at = :now, #updated_at = :now, #ttl = :ttl \
             REMOVE #lease_owner, #lease_expires_at"
        } else {
            "SET #status = :status, #finished_at = :now, #updated_at = :now, #ttl = :ttl \
             REMOVE #lease_owner, #lease_expires_at"
        };
        let condition = if error.is_some() {
            UNDER_LEASE.to_string()
        } else {
            format!("{UNDER_LEASE} AND #steps_done >= #steps_total")
        };
        let mut vals = lease_values(lease, now, [(":status", s(status.as_str())), (":ttl", self.finished_ttl(now))]);
        if let Some(e) = error {
            vals.insert(":error".into(), s(&e));
        }
        let Some(tenant) = self.tenant_of(&lease.job_id).await? else { return Err(StorageError::LeaseLost) };
        let finish = Update::builder()
            .table_name(&self.table)
            .key("PK", s(lease.job_id.as_str()))
            .key("SK", s(JOB_SK))
            .update_expression(update)
            .condition_expression(&condition)
            .set_expression_attribute_names(Some(names(&[update, &condition])))
            .set_expression_attribute_values(Some(vals))
            .build()
            .map_err(|e| sdk_err("building the job's final write", e))?;
        let items = vec![TransactWriteItem::builder().update(finish).build(), self.count_out(&tenant)?];
        match self.transact(items, "finishing a job").await {
            Ok(()) => Ok(()),
            Err(TxError::Other(e)) => Err(e),
            Err(TxError::Cancelled(_)) => {
                let job = self.get_job_at(&lease.job_id, secs(now)).await?;
                match job {
                    Some(j)
                        if j.status == JobStatus::Running
                            && j.lease_owner.as_deref() == Some(lease.owner.as_str())
                            && j.lease_expires_at.is_some_and(|t| t > now)
                            && j.steps_done < j.steps_total =>
                    {
                        if repair && self.recount_steps(lease, j.steps_done, j.steps_total, now).await? {
                            return Box::pin(self.finish(lease, outcome, now, false)).await;
                        }
                        Err(StorageError::StepsMissing { done: j.steps_done, total: j.steps_total })
                    }
                    _ => Err(StorageError::LeaseLost),
                }
            }
        }
    }

    /// `steps_done` is a counter beside the checkpoint items, raised in each
    /// checkpoint's transaction; the items are the truth. When the counter
    /// says fewer than `total` but the job has `total` checkpoint items (a
    /// consistent query), the counter is set from them, under the lease and
    /// only if it still reads `seen`: true when it was. (Seen on the moto
    /// emulator, whose transactions are not atomic against concurrent
    /// writes to one item: a job with 12 of 12 steps checkpointed and
    /// `steps_done` 11, which the final-write guard refused run after run
    /// until the poison check failed it.)
    async fn recount_steps(&self, lease: &Lease, seen: u32, total: u32, now: Micros) -> StorageResult<bool> {
        let Ok(items) = u32::try_from(self.checkpoint_items(&lease.job_id).await?.len()) else { return Ok(false) };
        if items < total {
            return Ok(false);
        }
        tracing::warn!(job = %lease.job_id, counted = seen, items, total,
            "the job's steps_done disagrees with its checkpoint items; set from the items");
        self.update_leased(
            lease,
            now,
            ("SET #steps_done = :items, #updated_at = :now", "#steps_done = :seen"),
            [(":items", num(items)), (":seen", num(seen))],
            "recounting a job's steps",
        )
        .await
    }
}

/// What every write under a lease requires of the job item: the lease held
/// by this owner and epoch, unexpired at `:now`, the job running.
const UNDER_LEASE: &str =
    "#lease_owner = :owner AND #lease_epoch = :epoch AND #lease_expires_at > :now AND #status = :running";

/// [`UNDER_LEASE`]'s values (`:now` among them), and `extra`.
fn lease_values<const N: usize>(
    lease: &Lease,
    now: Micros,
    extra: [(&str, AttributeValue); N],
) -> HashMap<String, AttributeValue> {
    let mut vals = values(extra);
    vals.extend(values([
        (":now", num(now)),
        (":owner", s(&lease.owner)),
        (":epoch", num(lease.epoch)),
        (":running", s(JobStatus::Running.as_str())),
    ]));
    vals
}

/// Why a transaction did not apply.
enum TxError {
    /// A condition failed; one reason per item, in request order.
    Cancelled(Vec<CancellationReason>),
    Other(StorageError),
}

/// Whether item `idx` of a cancelled transaction failed its condition.
fn failed(reasons: &[CancellationReason], idx: usize) -> bool {
    reasons.get(idx).and_then(|r| r.code()) == Some("ConditionalCheckFailed")
}

#[async_trait]
impl JobStore for DynamoJobs {
    /// A new job whose id already exists (not via its idempotency key) is
    /// `AlreadyExists`, as on SQLite. A spec over [`MAX_PAYLOAD_BYTES`] is
    /// `TooLarge`. The idempotency key expires `retention_days` after the
    /// first submission.
    async fn create_job(&self, job: &NewJob) -> StorageResult<CreateOutcome> {
        let size = job.spec_json.len() + job.name.len();
        if size > MAX_PAYLOAD_BYTES {
            return Err(StorageError::TooLarge(format!(
                "job {}: the spec is {size} bytes; the DynamoDB backend stores at most {MAX_PAYLOAD_BYTES}",
                job.id
            )));
        }
        let _turn = match job.in_flight_limit {
            Some(_) => {
                let lock = self
                    .limited_creates
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .entry(job.tenant.clone())
                    .or_default()
                    .clone();
                Some(lock.lock_owned().await)
            }
            None => None,
        };
        match &job.idempotency {
            None => self.create_plain(job).await,
            Some((key, hash)) => self.create_keyed(job, key, hash).await,
        }
    }

    async fn replay(&self, tenant: &TenantId, key: &str, hash: &str) -> StorageResult<Option<JobRecord>> {
        let item = self.read_item(&idem_pk(tenant, key), IDEM_SK).await?;
        self.keyed_job(item, key, hash, secs(self.clock.now())).await
    }

    /// A counter below zero (jobs created before counting began finishing)
    /// reads as 0.
    async fn jobs_in_flight(&self, tenant: &TenantId) -> StorageResult<u64> {
        match self.read_item(&quota_pk(tenant), IN_FLIGHT_SK).await? {
            Some(item) => in_flight_of(&item),
            None => Ok(0),
        }
    }

    /// `None` as well for a job whose retention ended (TTL passed, item not
    /// yet deleted).
    async fn get_job(&self, id: &JobId) -> StorageResult<Option<JobRecord>> {
        self.get_job_at(id, secs(self.clock.now())).await
    }

    /// One conditional UpdateItem; when it is refused, the old item it
    /// returns tells held from finished from missing. As on SQLite, the lease
    /// may be taken at its expiry instant, and the same owner string does not
    /// get around an unexpired lease.
    async fn acquire_lease(&self, id: &JobId, owner: &str, ttl: Duration, now: Micros) -> StorageResult<LeaseOutcome> {
        let expires_at = now.saturating_add(micros(ttl));
        let update = "SET #status = :running, #lease_owner = :owner, #lease_expires_at = :exp, \
                      #updated_at = :now, #ttl = :live ADD #lease_epoch :one, #stalled_runs :one";
        let condition = "#status IN (:queued, :running) AND #ttl > :now_s \
                         AND (attribute_not_exists(#lease_expires_at) OR #lease_expires_at <= :now)";
        let res = self
            .update(id.as_str(), JOB_SK)
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[update, condition])))
            .set_expression_attribute_values(Some(values([
                (":running", s(JobStatus::Running.as_str())),
                (":queued", s(JobStatus::Queued.as_str())),
                (":owner", s(owner)),
                (":exp", num(expires_at)),
                (":now", num(now)),
                (":now_s", num(secs(now))),
                (":live", self.live_ttl(now)),
                (":one", num(1)),
            ])))
            .return_values(ReturnValue::UpdatedNew)
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .send()
            .await;
        match res {
            Ok(out) => {
                let attrs = out.attributes.unwrap_or_default();
                let epoch = Fields::new(&attrs, "acquired lease").n::<u64>("lease_epoch")?;
                Ok(LeaseOutcome::Acquired(Lease { job_id: id.clone(), owner: owner.to_owned(), epoch, expires_at }))
            }
            Err(e) => match e.as_service_error() {
                Some(UpdateItemError::ConditionalCheckFailedException(c)) => refused_lease(c.item(), now),
                _ => Err(sdk_err("acquiring a job lease", e)),
            },
        }
    }

    /// No expiry check: a lease that lapsed but that nobody took over is
    /// still this worker's, and renewing it is how it recovers (as on SQLite).
    async fn renew_lease(&self, lease: &Lease, ttl: Duration, now: Micros) -> StorageResult<Lease> {
        let expires_at = now.saturating_add(micros(ttl));
        let update = "SET #lease_expires_at = :exp, #updated_at = :now, #ttl = :live";
        let condition = "#lease_owner = :owner AND #lease_epoch = :epoch AND #status = :running";
        let res = self
            .update(lease.job_id.as_str(), JOB_SK)
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[update, condition])))
            .set_expression_attribute_values(Some(values([
                (":exp", num(expires_at)),
                (":now", num(now)),
                (":live", self.live_ttl(now)),
                (":owner", s(&lease.owner)),
                (":epoch", num(lease.epoch)),
                (":running", s(JobStatus::Running.as_str())),
            ])))
            .send()
            .await;
        match res {
            Ok(_) => Ok(Lease { expires_at, ..lease.clone() }),
            Err(e) => Err(lease_lost_or(e, "renewing a job lease")),
        }
    }

    /// Releasing a lease that is no longer held changes nothing and is not an
    /// error: the caller was giving it up anyway. The job stays `running`
    /// until the next worker acquires it (as on SQLite). The run is taken
    /// back off `stalled_runs` in the same write (it ended without a crash);
    /// DynamoDB has no `max`, so a count already 0 (the run checkpointed) is
    /// released by a second write that leaves it alone.
    async fn release_lease(&self, lease: &Lease) -> StorageResult<()> {
        let release = |update: &str, condition: &str, give_back: bool| {
            let mut vals = values([(":owner", s(&lease.owner)), (":epoch", num(lease.epoch))]);
            if give_back {
                vals.extend(values([(":zero", num(0)), (":one", num(1))]));
            }
            self.update(lease.job_id.as_str(), JOB_SK)
                .update_expression(update)
                .condition_expression(condition)
                .set_expression_attribute_names(Some(names(&[update, condition])))
                .set_expression_attribute_values(Some(vals))
                .send()
        };
        let res = release(
            "SET #stalled_runs = #stalled_runs - :one REMOVE #lease_owner, #lease_expires_at",
            "#lease_owner = :owner AND #lease_epoch = :epoch AND #stalled_runs > :zero",
            true,
        )
        .await;
        let res = match res {
            // Not held any more, or nothing to give back: the plain
            // release tells which.
            Err(e) if matches!(e.as_service_error(), Some(UpdateItemError::ConditionalCheckFailedException(_))) => {
                release(
                    "REMOVE #lease_owner, #lease_expires_at",
                    "#lease_owner = :owner AND #lease_epoch = :epoch",
                    false,
                )
                .await
            }
            other => other,
        };
        match res {
            Ok(_) => Ok(()),
            Err(e) => match lease_lost_or(e, "releasing a job lease") {
                StorageError::LeaseLost => Ok(()),
                other => Err(other),
            },
        }
    }

    /// One transaction: the job's progress update, conditional on the lease,
    /// and the step item, conditional on not existing. When both conditions
    /// fail it is `LeaseLost` (SQLite checks the lease first too). An answer
    /// (text and message together) over [`MAX_PAYLOAD_BYTES`] is written to
    /// the outputs bucket first and the item points at it; without a
    /// bucket it is `TooLarge` and writes nothing.
    async fn put_checkpoint(&self, lease: &Lease, checkpoint: &Checkpoint, now: Micros) -> StorageResult<()> {
        let cp = checkpoint;
        let (text, rest) = cp.answer.split();
        let size = text.len() + rest.len();
        let offloaded = match (&self.outputs, size > MAX_PAYLOAD_BYTES) {
            (_, false) => None,
            (Some(bucket), true) => Some(bucket.put(&lease.job_id, &cp.step, text, &rest).await?),
            (None, true) => {
                return Err(StorageError::TooLarge(format!(
                    "step {}: its answer is {size} bytes; a DynamoDB item holds at most {MAX_PAYLOAD_BYTES} \
                     bytes of answer, and larger ones need an S3 bucket: set [aws] outputs_bucket",
                    cp.step
                )));
            }
        };
        let update = "SET #stalled_runs = :zero, #updated_at = :now, #ttl = :live \
                      ADD #steps_done :one, #calls :calls, #prompt_tokens :pt, #completion_tokens :ct";
        let progress = Update::builder()
            .table_name(&self.table)
            .key("PK", s(lease.job_id.as_str()))
            .key("SK", s(JOB_SK))
            .update_expression(update)
            .condition_expression(UNDER_LEASE)
            .set_expression_attribute_names(Some(names(&[update, UNDER_LEASE])))
            .set_expression_attribute_values(Some(lease_values(
                lease,
                now,
                [
                    (":zero", num(0)),
                    (":one", num(1)),
                    (":live", self.live_ttl(now)),
                    (":calls", num(cp.usage.calls)),
                    (":pt", num(cp.usage.prompt_tokens)),
                    (":ct", num(cp.usage.completion_tokens)),
                ],
            )))
            .build()
            .map_err(|e| sdk_err("building the checkpoint's job update", e))?;
        let step = Put::builder().table_name(&self.table);
        let step = match offloaded {
            None => match pack(text, &rest) {
                Some(z) => step
                    .item(PACKED_ATTR, AttributeValue::B(aws_sdk_dynamodb::primitives::Blob::new(z)))
                    .item("output_bytes", num(size)),
                None => step.item("output", s(text)).item("answer", s(&rest)),
            },
            Some(r) => step
                .item("output_ref", s(&r.key))
                .item("output_bytes", num(r.bytes))
                .item("output_sha256", s(&r.sha256)),
        };
        let step = step
            .item("PK", s(lease.job_id.as_str()))
            .item("SK", s(&format!("{STEP_PREFIX}{}", cp.step)))
            .item("calls", num(cp.usage.calls))
            .item("prompt_tokens", num(cp.usage.prompt_tokens))
            .item("completion_tokens", num(cp.usage.completion_tokens))
            .item("org", s(cp.org.as_str()))
            .item("model", s(cp.model.as_str()))
            .item("attempts", num(cp.attempts))
            .item("started_at", num(cp.started_at))
            .item("finished_at", num(cp.finished_at))
            .item(TTL_ATTR, self.live_ttl(now))
            .condition_expression("attribute_not_exists(SK)")
            .build()
            .map_err(|e| sdk_err("building the checkpoint write", e))?;
        let items =
            vec![TransactWriteItem::builder().update(progress).build(), TransactWriteItem::builder().put(step).build()];
        match self.transact(items, "writing a checkpoint").await {
            Ok(()) => Ok(()),
            Err(TxError::Other(e)) => Err(e),
            Err(TxError::Cancelled(reasons)) if failed(&reasons, 0) => Err(StorageError::LeaseLost),
            Err(TxError::Cancelled(_)) => Err(StorageError::CheckpointExists(cp.step.clone())),
        }
    }

    /// In the order the steps finished (`finished_at`, then step id); steps
    /// whose retention ended are skipped. Answers in S3 are read back.
    async fn checkpoints(&self, id: &JobId) -> StorageResult<Vec<Checkpoint>> {
        let items = self.checkpoint_items(id).await?;
        self.with_answers(&items).await
    }

    /// Reads every checkpoint item, but the S3 objects of the page's only.
    async fn checkpoint_page(&self, id: &JobId, page: &PageRequest) -> StorageResult<Option<CheckpointPage>> {
        let items = self.checkpoint_items(id).await?;
        let sizes: Vec<_> = items.iter().map(|(_, (_, step, bytes))| (step, *bytes)).collect();
        let Some((window, next)) = page.window(&sizes) else { return Ok(None) };
        let checkpoints = self.with_answers(&items[window]).await?;
        Ok(Some(CheckpointPage { checkpoints, next: next.cloned() }))
    }

    /// One conditional UpdateItem on the job item, guarded like a
    /// checkpoint's progress update.
    async fn set_steps_total(&self, lease: &Lease, steps_total: u32, now: Micros) -> StorageResult<()> {
        let set = ("SET #steps_total = :total, #updated_at = :now", "");
        match self.update_leased(lease, now, set, [(":total", num(steps_total))], "setting a job's steps_total").await?
        {
            true => Ok(()),
            false => Err(StorageError::LeaseLost),
        }
    }

    /// Like `put_checkpoint`, requires the lease unexpired at `now` (as on
    /// SQLite): a worker whose lease lapsed renews it first. Starts the
    /// job's retention. `succeeded` also requires `steps_done >=
    /// steps_total` (a step counted twice must not block the job: seen on
    /// moto); which condition failed is read back after a refusal.
    async fn finish_job(&self, lease: &Lease, outcome: &JobOutcome, now: Micros) -> StorageResult<()> {
        self.finish(lease, outcome, now, true).await
    }

    /// Conditional on the job being queued or running, so a finished job is
    /// never resurrected; a refused write returns the status it found.
    async fn cancel_job(&self, id: &JobId, now: Micros) -> StorageResult<Option<JobStatus>> {
        let update = "SET #status = :cancelled, #finished_at = :now, #updated_at = :now, #ttl = :ttl \
                      REMOVE #lease_owner, #lease_expires_at";
        let condition = "#status IN (:queued, :running) AND #ttl > :now_s";
        let Some(tenant) = self.tenant_of(id).await? else { return Ok(None) };
        let cancel = Update::builder()
            .table_name(&self.table)
            .key("PK", s(id.as_str()))
            .key("SK", s(JOB_SK))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[update, condition])))
            .set_expression_attribute_values(Some(values([
                (":cancelled", s(JobStatus::Cancelled.as_str())),
                (":queued", s(JobStatus::Queued.as_str())),
                (":running", s(JobStatus::Running.as_str())),
                (":now", num(now)),
                (":now_s", num(secs(now))),
                (":ttl", self.finished_ttl(now)),
            ])))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(|e| sdk_err("building the job's cancellation", e))?;
        let items = vec![TransactWriteItem::builder().update(cancel).build(), self.count_out(&tenant)?];
        let reasons = match self.transact(items, "cancelling a job").await {
            Ok(()) => return Ok(Some(JobStatus::Cancelled)),
            Err(TxError::Other(e)) => return Err(e),
            Err(TxError::Cancelled(reasons)) => reasons,
        };
        let old = match reasons.first().and_then(|r| r.item()).filter(|i| !i.is_empty()) {
            Some(item) => Some(item.clone()),
            None => self.read_item(id.as_str(), JOB_SK).await?,
        };
        match old {
            Some(item) if !expired(&item, secs(now)) => Ok(Some(Fields::new(&item, "job item").status()?)),
            _ => Ok(None),
        }
    }

    /// An unknown job is a no-op, like a finished one (as on SQLite).
    async fn fail_unleased(&self, id: &JobId, reason: &str, now: Micros) -> StorageResult<()> {
        let update = "SET #status = :failed, #error = :error, #finished_at = :now, #updated_at = :now, #ttl = :ttl \
                      REMOVE #lease_owner, #lease_expires_at";
        let condition = "#status IN (:queued, :running)";
        let Some(tenant) = self.tenant_of(id).await? else { return Ok(()) };
        let fail = Update::builder()
            .table_name(&self.table)
            .key("PK", s(id.as_str()))
            .key("SK", s(JOB_SK))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[update, condition])))
            .set_expression_attribute_values(Some(values([
                (":failed", s(JobStatus::Failed.as_str())),
                (":error", s(&clip(reason))),
                (":queued", s(JobStatus::Queued.as_str())),
                (":running", s(JobStatus::Running.as_str())),
                (":now", num(now)),
                (":ttl", self.finished_ttl(now)),
            ])))
            .build()
            .map_err(|e| sdk_err("building the job's failure", e))?;
        let items = vec![TransactWriteItem::builder().update(fail).build(), self.count_out(&tenant)?];
        match self.transact(items, "failing a job").await {
            Ok(()) | Err(TxError::Cancelled(_)) => Ok(()),
            Err(TxError::Other(e)) => Err(e),
        }
    }

    async fn mark_sent(&self, id: &JobId) -> StorageResult<()> {
        self.client
            .delete_item()
            .table_name(&self.table)
            .key("PK", s(UNSENT_PK))
            .key("SK", s(id.as_str()))
            .send()
            .await
            .map_err(|e| sdk_err("marking a job's message sent", e))?;
        Ok(())
    }

    /// One query of the unsent partition (a few entries, unless sends are
    /// failing), oldest first.
    async fn unsent_jobs(&self, before: Micros, max: usize) -> StorageResult<Vec<QueueMessage>> {
        let mut found = Vec::new();
        let mut items = self
            .client
            .query()
            .table_name(&self.table)
            .key_condition_expression("PK = :pk")
            .filter_expression("#created_at <= :before")
            .expression_attribute_names("#created_at", "created_at")
            .expression_attribute_values(":pk", s(UNSENT_PK))
            .expression_attribute_values(":before", num(before))
            .consistent_read(true)
            .into_paginator()
            .items()
            .send();
        while let Some(item) = items.next().await {
            let item = item.map_err(|e| sdk_err("reading unsent jobs", e))?;
            let f = Fields::new(&item, "unsent entry");
            let message = QueueMessage {
                job_id: f.parsed("SK", JobId::parse)?,
                tenant: f.parsed("tenant", TenantId::parse)?,
                priority: f.parsed("priority", |v| match v {
                    "interactive" => Ok(Priority::Interactive),
                    "batch" => Ok(Priority::Batch),
                    other => Err(format!("unknown priority {other:?}")),
                })?,
            };
            found.push((f.n::<Micros>("created_at")?, message));
        }
        found.sort_by_key(|(created_at, _)| *created_at);
        Ok(found.into_iter().take(max).map(|(_, m)| m).collect())
    }

    /// Conditional on the job item existing, so a report never makes an
    /// orphan item; kept as long as a finished job.
    async fn put_webhook_report(&self, id: &JobId, report: &DeliveryReport, now: Micros) -> StorageResult<()> {
        let json = serde_json::to_string(report)
            .map_err(|e| StorageError::Backend(format!("encoding a webhook report: {e}")))?;
        let job = aws_sdk_dynamodb::types::ConditionCheck::builder()
            .table_name(&self.table)
            .key("PK", s(id.as_str()))
            .key("SK", s(JOB_SK))
            .condition_expression("attribute_exists(PK)")
            .build()
            .map_err(|e| sdk_err("building a webhook report condition", e))?;
        let put = Put::builder()
            .table_name(&self.table)
            .item("PK", s(id.as_str()))
            .item("SK", s(WEBHOOK_SK))
            .item("report", s(&json))
            .item("updated_at", num(now))
            .item(TTL_ATTR, self.finished_ttl(now))
            .build()
            .map_err(|e| sdk_err("building a webhook report", e))?;
        let items = vec![
            TransactWriteItem::builder().condition_check(job).build(),
            TransactWriteItem::builder().put(put).build(),
        ];
        match self.transact(items, "recording a webhook report").await {
            Ok(()) => Ok(()),
            Err(TxError::Other(e)) => Err(e),
            Err(TxError::Cancelled(_)) => Err(StorageError::Missing(format!("job {id}"))),
        }
    }

    async fn webhook_report(&self, id: &JobId) -> StorageResult<Option<DeliveryReport>> {
        let Some(item) = self.read_item(id.as_str(), WEBHOOK_SK).await? else { return Ok(None) };
        let json = Fields::new(&item, "webhook report").s("report")?;
        serde_json::from_str(json)
            .map(Some)
            .map_err(|e| StorageError::Backend(format!("unreadable webhook report: {e}")))
    }
}
