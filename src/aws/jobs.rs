//! The DynamoDB job store and usage store: one table keyed `PK` (hash) and
//! `SK` (range), holding four kinds of item.
//!
//! | PK | SK | what |
//! | --- | --- | --- |
//! | `<job id>` | `job` | the job record, its lease (owner, epoch, expiry) and counters |
//! | `<job id>` | `step#<step id>` | one step checkpoint |
//! | `<job id>` | `webhook` | the job's last webhook delivery report (JSON) |
//! | `idem#<tenant>#<key>` | `idem` | an idempotency key: job id and request hash |
//! | `usage#<tenant>` | `org#<org>` | a tenant's usage counters for one org |
//! | `quota#<tenant>` | `in_flight` | the tenant's jobs queued or running (`in_flight`) |
//! | `cache#<key hex>` | `cache` | a response cache entry ([`super::cache`]) |
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
use super::sdk_err;
use crate::domain::{Clock, JobId, Micros, ModelName, OrgName, Priority, StepId, TenantId, Usage};
use crate::storage::{
    Checkpoint, CreateOutcome, DeliveryReport, JobOutcome, JobRecord, JobStatus, JobStore, Lease, LeaseOutcome, NewJob,
    OrgCounters, StorageError, StorageResult, UsageStore,
};

type Item = HashMap<String, AttributeValue>;

const JOB_SK: &str = "job";
const STEP_PREFIX: &str = "step#";
const IDEM_SK: &str = "idem";
const WEBHOOK_SK: &str = "webhook";
const USAGE_ORG_PREFIX: &str = "org#";
const IN_FLIGHT_SK: &str = "in_flight";
/// The TTL attribute, in epoch seconds as DynamoDB TTL wants.
pub(super) const TTL_ATTR: &str = "expires_at";

/// The largest step output or job spec stored. An item holds at most 400 KB,
/// attribute names and the other attributes included; this keeps the rest
/// (an error message, counters, ids) comfortably inside.
pub const MAX_PAYLOAD_BYTES: usize = 350_000;
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
}

impl DynamoJobs {
    /// Checks that the table exists; creates nothing (see [`ensure_tables`]).
    pub async fn connect(client: Client, cfg: &AwsConfig, clock: Arc<dyn Clock>) -> StorageResult<Self> {
        describe_status(&client, &cfg.jobs_table).await?.ok_or_else(|| missing_table(&cfg.jobs_table))?;
        let retention_secs = i64::try_from(cfg.retention_days.get()).unwrap_or(i64::MAX / 86_400 / 2) * 86_400;
        Ok(Self {
            client,
            table: cfg.jobs_table.clone(),
            retention_secs,
            clock,
            limited_creates: std::sync::Mutex::new(HashMap::new()),
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
                _ => return Err(TxError::Other(sdk_err(what, e))),
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
            return Err(TxError::Other(sdk_err(what, e)));
        }
    }

    /// The job and its count in the tenant's in-flight counter in one
    /// transaction.
    async fn create_plain(&self, job: &NewJob) -> StorageResult<CreateOutcome> {
        let items = vec![self.put_job(job)?, self.count_in(job)?];
        match self.transact(items, "creating a job").await {
            Ok(()) => Ok(CreateOutcome::Created(job.queued_record())),
            Err(TxError::Other(e)) => Err(e),
            Err(TxError::Cancelled(reasons)) if failed(&reasons, 1) => self.at_limit(&job.tenant, &reasons[1]).await,
            Err(TxError::Cancelled(_)) => Err(already_exists(&job.id)),
        }
    }

    fn put_job(&self, job: &NewJob) -> StorageResult<TransactWriteItem> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(self.job_item(job)))
            .condition_expression("attribute_not_exists(PK)")
            .build()
            .map_err(|e| sdk_err("building the job write", e))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// Adds the job to its tenant's in-flight counter, on condition that
    /// the counter is below the job's limit (if it has one).
    fn count_in(&self, job: &NewJob) -> StorageResult<TransactWriteItem> {
        let update = "ADD #in_flight :one";
        let mut add = Update::builder()
            .table_name(&self.table)
            .key("PK", s(&quota_pk(&job.tenant)))
            .key("SK", s(IN_FLIGHT_SK))
            .update_expression(update)
            .expression_attribute_values(":one", num(1));
        let mut exprs = vec![update];
        let condition = "attribute_not_exists(#in_flight) OR #in_flight < :limit";
        if let Some(limit) = job.in_flight_limit {
            add = add
                .condition_expression(condition)
                .expression_attribute_values(":limit", num(limit))
                .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld);
            exprs.push(condition);
        }
        let add = add
            .set_expression_attribute_names(Some(names(&exprs)))
            .build()
            .map_err(|e| sdk_err("building the in-flight count", e))?;
        Ok(TransactWriteItem::builder().update(add).build())
    }

    /// Takes a finished job of `tenant` off its in-flight counter.
    fn count_out(&self, tenant: &TenantId) -> StorageResult<TransactWriteItem> {
        let update = "ADD #in_flight :minus_one";
        let sub = Update::builder()
            .table_name(&self.table)
            .key("PK", s(&quota_pk(tenant)))
            .key("SK", s(IN_FLIGHT_SK))
            .update_expression(update)
            .set_expression_attribute_names(Some(names(&[update])))
            .expression_attribute_values(":minus_one", num(-1))
            .build()
            .map_err(|e| sdk_err("building the in-flight count", e))?;
        Ok(TransactWriteItem::builder().update(sub).build())
    }

    /// The refusal of a job whose in-flight count failed its condition.
    async fn at_limit(&self, tenant: &TenantId, reason: &CancellationReason) -> StorageResult<CreateOutcome> {
        let in_flight = match reason.item().filter(|i| !i.is_empty()) {
            Some(item) => in_flight_of(item)?,
            None => self.jobs_in_flight(tenant).await?,
        };
        Ok(CreateOutcome::InFlightLimit { in_flight })
    }

    /// The job's tenant (which never changes), or `None` if there is no
    /// such job item.
    async fn tenant_of(&self, id: &JobId) -> StorageResult<Option<TenantId>> {
        let out = self
            .client
            .get_item()
            .table_name(&self.table)
            .key("PK", s(id.as_str()))
            .key("SK", s(JOB_SK))
            .projection_expression("#tenant")
            .expression_attribute_names("#tenant", "tenant")
            .consistent_read(true)
            .send()
            .await
            .map_err(|e| sdk_err("reading a job's tenant", e))?;
        match out.item.filter(|i| !i.is_empty()) {
            Some(item) => Ok(Some(Fields::new(&item, "job item").parsed("tenant", TenantId::parse)?)),
            None => Ok(None),
        }
    }

    /// The job and its idempotency item in one transaction; when the key is
    /// taken, the earlier job (same request) or a conflict (different one).
    async fn create_keyed(&self, job: &NewJob, key: &str, hash: &str) -> StorageResult<CreateOutcome> {
        let now_s = secs(job.created_at);
        let idem_pk = idem_pk(&job.tenant, key);
        let put_idem = Put::builder()
            .table_name(&self.table)
            .item("PK", s(&idem_pk))
            .item("SK", s(IDEM_SK))
            .item("job_id", s(job.id.as_str()))
            .item("request_hash", s(hash))
            .item(TTL_ATTR, num(now_s.saturating_add(self.retention_secs)))
            // An expired key DynamoDB has not deleted yet is free again.
            .condition_expression("attribute_not_exists(PK) OR #ttl <= :now_s")
            .expression_attribute_names("#ttl", TTL_ATTR)
            .expression_attribute_values(":now_s", num(now_s))
            .return_values_on_condition_check_failure(ReturnValuesOnConditionCheckFailure::AllOld)
            .build()
            .map_err(|e| sdk_err("building the idempotency write", e))?;
        // The key before the count: a replay is answered even when the
        // tenant is at its in-flight limit.
        let items = vec![self.put_job(job)?, TransactWriteItem::builder().put(put_idem).build(), self.count_in(job)?];
        // A second round only if the key item vanished (TTL) between the
        // cancelled transaction and reading it.
        for _ in 0..2 {
            let reasons = match self.transact(items.clone(), "creating a job").await {
                Ok(()) => return Ok(CreateOutcome::Created(job.queued_record())),
                Err(TxError::Other(e)) => return Err(e),
                Err(TxError::Cancelled(r)) => r,
            };
            if !failed(&reasons, 1) {
                if failed(&reasons, 2) {
                    return self.at_limit(&job.tenant, &reasons[2]).await;
                }
                return Err(already_exists(&job.id));
            }
            let earlier = match reasons.get(1).and_then(|r| r.item()) {
                Some(item) if !item.is_empty() => Some(item.clone()),
                _ => self.read_item(&idem_pk, IDEM_SK).await?,
            };
            if let Some(record) = self.keyed_job(earlier, key, hash, now_s).await? {
                return Ok(CreateOutcome::Existing(record));
            }
        }
        Err(StorageError::Backend(format!("idempotency key {key:?} changed while the job was being created")))
    }

    /// The job an idempotency item names, unless the item is missing or
    /// expired; `IdempotencyMismatch` if it was made by a request other than `hash`.
    async fn keyed_job(
        &self,
        item: Option<Item>,
        key: &str,
        hash: &str,
        now_s: i64,
    ) -> StorageResult<Option<JobRecord>> {
        let Some(earlier) = item.filter(|i| !i.is_empty() && !expired(i, now_s)) else { return Ok(None) };
        let f = Fields::new(&earlier, "idempotency item");
        if f.s("request_hash")? != hash {
            return Err(StorageError::IdempotencyMismatch { key: key.to_owned() });
        }
        let first = JobId::parse(f.s("job_id")?).map_err(|e| corrupt("idempotency item", &e.0))?;
        match self.get_job_at(&first, now_s).await? {
            Some(record) => Ok(Some(record)),
            None => Err(StorageError::Missing(format!("job {first}, which idempotency key {key:?} names,"))),
        }
    }

    fn job_item(&self, job: &NewJob) -> Item {
        let mut item = Item::new();
        item.insert("PK".into(), s(job.id.as_str()));
        item.insert("SK".into(), s(JOB_SK));
        item.insert("tenant".into(), s(job.tenant.as_str()));
        item.insert("name".into(), s(&job.name));
        item.insert("priority".into(), s(priority_str(job.priority)));
        item.insert("status".into(), s(JobStatus::Queued.as_str()));
        item.insert("spec_json".into(), s(&job.spec_json));
        item.insert("steps_total".into(), num(job.steps_total));
        for zero in ["steps_done", "calls", "prompt_tokens", "completion_tokens", "lease_epoch", "stalled_runs"] {
            item.insert(zero.into(), num(0));
        }
        item.insert("created_at".into(), num(job.created_at));
        item.insert("updated_at".into(), num(job.created_at));
        item.insert(TTL_ATTR.into(), self.live_ttl(job.created_at));
        item
    }

    async fn get_job_at(&self, id: &JobId, now_s: i64) -> StorageResult<Option<JobRecord>> {
        match self.read_item(id.as_str(), JOB_SK).await? {
            Some(item) if !expired(&item, now_s) => Ok(Some(job_from_item(&item)?)),
            _ => Ok(None),
        }
    }
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
    /// until the next worker acquires it (as on SQLite).
    async fn release_lease(&self, lease: &Lease) -> StorageResult<()> {
        let update = "REMOVE #lease_owner, #lease_expires_at";
        let condition = "#lease_owner = :owner AND #lease_epoch = :epoch";
        let res = self
            .update(lease.job_id.as_str(), JOB_SK)
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[update, condition])))
            .set_expression_attribute_values(Some(values([(":owner", s(&lease.owner)), (":epoch", num(lease.epoch))])))
            .send()
            .await;
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
    /// fail it is `LeaseLost` (SQLite checks the lease first too). An output
    /// over [`MAX_PAYLOAD_BYTES`] is `TooLarge` and writes nothing.
    async fn put_checkpoint(&self, lease: &Lease, checkpoint: &Checkpoint, now: Micros) -> StorageResult<()> {
        let cp = checkpoint;
        if cp.output.len() > MAX_PAYLOAD_BYTES {
            return Err(StorageError::TooLarge(format!(
                "step {}: its output is {} bytes; the DynamoDB backend stores at most {MAX_PAYLOAD_BYTES} bytes per step",
                cp.step_id,
                cp.output.len()
            )));
        }
        let update = "SET #stalled_runs = :zero, #updated_at = :now, #ttl = :live \
                      ADD #steps_done :one, #calls :calls, #prompt_tokens :pt, #completion_tokens :ct";
        let condition = "#lease_owner = :owner AND #lease_epoch = :epoch AND #lease_expires_at > :now \
                         AND #status = :running";
        let progress = Update::builder()
            .table_name(&self.table)
            .key("PK", s(lease.job_id.as_str()))
            .key("SK", s(JOB_SK))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[update, condition])))
            .set_expression_attribute_values(Some(values([
                (":zero", num(0)),
                (":one", num(1)),
                (":now", num(now)),
                (":live", self.live_ttl(now)),
                (":calls", num(cp.usage.calls)),
                (":pt", num(cp.usage.prompt_tokens)),
                (":ct", num(cp.usage.completion_tokens)),
                (":owner", s(&lease.owner)),
                (":epoch", num(lease.epoch)),
                (":running", s(JobStatus::Running.as_str())),
            ])))
            .build()
            .map_err(|e| sdk_err("building the checkpoint's job update", e))?;
        let step = Put::builder()
            .table_name(&self.table)
            .item("PK", s(lease.job_id.as_str()))
            .item("SK", s(&format!("{STEP_PREFIX}{}", cp.step_id)))
            .item("output", s(&cp.output))
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
            Err(TxError::Cancelled(_)) => Err(StorageError::CheckpointExists(cp.step_id.clone())),
        }
    }

    /// In the order the steps finished (`finished_at`, then step id); steps
    /// whose retention ended are skipped.
    async fn checkpoints(&self, id: &JobId) -> StorageResult<Vec<Checkpoint>> {
        let now_s = secs(self.clock.now());
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
                .expression_attribute_values(":pk", s(id.as_str()))
                .expression_attribute_values(":prefix", s(STEP_PREFIX))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_err("reading checkpoints", e))?;
            for item in page.items() {
                if !expired(item, now_s) {
                    out.push(checkpoint_from_item(item)?);
                }
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        out.sort_by(|a, b| (a.finished_at, &a.step_id).cmp(&(b.finished_at, &b.step_id)));
        Ok(out)
    }

    /// Like `put_checkpoint`, requires the lease unexpired at `now` (as on
    /// SQLite): a worker whose lease lapsed renews it first. Starts the
    /// job's retention.
    async fn finish_job(&self, lease: &Lease, outcome: &JobOutcome, now: Micros) -> StorageResult<()> {
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
        let condition = "#lease_owner = :owner AND #lease_epoch = :epoch AND #lease_expires_at > :now \
                         AND #status = :running";
        let mut vals = values([
            (":status", s(status.as_str())),
            (":now", num(now)),
            (":ttl", self.finished_ttl(now)),
            (":owner", s(&lease.owner)),
            (":epoch", num(lease.epoch)),
            (":running", s(JobStatus::Running.as_str())),
        ]);
        if let Some(e) = error {
            vals.insert(":error".into(), s(&e));
        }
        let Some(tenant) = self.tenant_of(&lease.job_id).await? else { return Err(StorageError::LeaseLost) };
        let finish = Update::builder()
            .table_name(&self.table)
            .key("PK", s(lease.job_id.as_str()))
            .key("SK", s(JOB_SK))
            .update_expression(update)
            .condition_expression(condition)
            .set_expression_attribute_names(Some(names(&[update, condition])))
            .set_expression_attribute_values(Some(vals))
            .build()
            .map_err(|e| sdk_err("building the job's final write", e))?;
        let items = vec![TransactWriteItem::builder().update(finish).build(), self.count_out(&tenant)?];
        match self.transact(items, "finishing a job").await {
            Ok(()) => Ok(()),
            Err(TxError::Other(e)) => Err(e),
            Err(TxError::Cancelled(_)) => Err(StorageError::LeaseLost),
        }
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

#[async_trait]
impl UsageStore for DynamoJobs {
    /// One transaction of ADDs (deltas for the same tenant and org merged
    /// first), so a flush is counted whole or not at all and a caller that
    /// re-queues a failed batch never double counts. A batch over 100
    /// (tenant, org) pairs takes one transaction per 100.
    async fn add(&self, deltas: &[(TenantId, OrgName, OrgCounters)]) -> StorageResult<()> {
        let mut merged: Vec<((TenantId, OrgName), OrgCounters)> = Vec::new();
        for (tenant, org, c) in deltas {
            match merged.iter_mut().find(|((t, o), _)| t == tenant && o == org) {
                Some((_, total)) => total.merge(c),
                None => merged.push(((tenant.clone(), org.clone()), c.clone())),
            }
        }
        let update = "ADD #calls :calls, #prompt_tokens :pt, #completion_tokens :ct, #rate_limited :rl, \
                      #insufficient_quota :iq, #server_errors :se, #timeouts :to, #connection_errors :ce, \
                      #request_errors :re";
        for chunk in merged.chunks(TX_MAX_ITEMS) {
            let mut items = Vec::with_capacity(chunk.len());
            for ((tenant, org), c) in chunk {
                let add = Update::builder()
                    .table_name(&self.table)
                    .key("PK", s(&usage_pk(tenant)))
                    .key("SK", s(&format!("{USAGE_ORG_PREFIX}{org}")))
                    .update_expression(update)
                    .set_expression_attribute_names(Some(names(&[update])))
                    .set_expression_attribute_values(Some(values([
                        (":calls", num(c.calls)),
                        (":pt", num(c.prompt_tokens)),
                        (":ct", num(c.completion_tokens)),
                        (":rl", num(c.rate_limited)),
                        (":iq", num(c.insufficient_quota)),
                        (":se", num(c.server_errors)),
                        (":to", num(c.timeouts)),
                        (":ce", num(c.connection_errors)),
                        (":re", num(c.request_errors)),
                    ])))
                    .build()
                    .map_err(|e| sdk_err("building a usage update", e))?;
                items.push(TransactWriteItem::builder().update(add).build());
            }
            match self.transact(items, "adding usage").await {
                Ok(()) => {}
                Err(TxError::Other(e)) => return Err(e),
                // No item carries a condition, so this cannot happen.
                Err(TxError::Cancelled(r)) => {
                    return Err(StorageError::Backend(format!("usage update cancelled: {:?}", codes(&r))));
                }
            }
        }
        Ok(())
    }

    /// Ordered by org name.
    async fn usage(&self, tenant: &TenantId) -> StorageResult<Vec<(OrgName, OrgCounters)>> {
        let mut out = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .client
                .query()
                .table_name(&self.table)
                .key_condition_expression("PK = :pk AND begins_with(SK, :prefix)")
                .expression_attribute_values(":pk", s(&usage_pk(tenant)))
                .expression_attribute_values(":prefix", s(USAGE_ORG_PREFIX))
                .consistent_read(true)
                .set_exclusive_start_key(start.take())
                .send()
                .await
                .map_err(|e| sdk_err("reading usage", e))?;
            for item in page.items() {
                out.push(usage_from_item(item)?);
            }
            match page.last_evaluated_key {
                Some(k) if !k.is_empty() => start = Some(k),
                _ => break,
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

// ------------------------------------------------------------ tables

/// Creates the jobs and ledger tables that do not exist (on-demand
/// capacity), waits until both are ACTIVE and turns TTL on for the jobs
/// table. Returns the names it created.
pub async fn ensure_tables(client: &Client, cfg: &AwsConfig) -> StorageResult<Vec<String>> {
    let mut created = Vec::new();
    for (table, with_sort_key) in [(&cfg.jobs_table, true), (&cfg.ledger_table, false)] {
        if describe_status(client, table).await?.is_none() && create_table(client, table, with_sort_key).await? {
            created.push(table.clone());
        }
    }
    for table in [&cfg.jobs_table, &cfg.ledger_table] {
        wait_active(client, table).await?;
    }
    enable_ttl(client, &cfg.jobs_table).await?;
    Ok(created)
}

/// The table's status, `None` if it does not exist.
async fn describe_status(client: &Client, table: &str) -> StorageResult<Option<TableStatus>> {
    match client.describe_table().table_name(table).send().await {
        Ok(out) => Ok(Some(out.table.and_then(|t| t.table_status).unwrap_or(TableStatus::Creating))),
        Err(e) if matches!(e.as_service_error(), Some(DescribeTableError::ResourceNotFoundException(_))) => Ok(None),
        Err(e) => Err(sdk_err(&format!("describing table {table}"), e)),
    }
}

/// `false` if another process created it first.
async fn create_table(client: &Client, table: &str, with_sort_key: bool) -> StorageResult<bool> {
    let build = |e| sdk_err("building the table definition", e);
    let mut req = client
        .create_table()
        .table_name(table)
        .billing_mode(BillingMode::PayPerRequest)
        .attribute_definitions(
            AttributeDefinition::builder()
                .attribute_name("PK")
                .attribute_type(ScalarAttributeType::S)
                .build()
                .map_err(build)?,
        )
        .key_schema(KeySchemaElement::builder().attribute_name("PK").key_type(KeyType::Hash).build().map_err(build)?);
    if with_sort_key {
        req = req
            .attribute_definitions(
                AttributeDefinition::builder()
                    .attribute_name("SK")
                    .attribute_type(ScalarAttributeType::S)
                    .build()
                    .map_err(build)?,
            )
            .key_schema(
                KeySchemaElement::builder().attribute_name("SK").key_type(KeyType::Range).build().map_err(build)?,
            );
    }
    match req.send().await {
        Ok(_) => Ok(true),
        Err(e) if e.as_service_error().is_some_and(|s| s.is_resource_in_use_exception()) => Ok(false),
        Err(e) => Err(sdk_err(&format!("creating table {table}"), e)),
    }
}

async fn wait_active(client: &Client, table: &str) -> StorageResult<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match describe_status(client, table).await? {
            Some(TableStatus::Active) => return Ok(()),
            _ if tokio::time::Instant::now() >= deadline => {
                return Err(StorageError::Backend(format!("table {table} did not become ACTIVE within 120 s")));
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn enable_ttl(client: &Client, table: &str) -> StorageResult<()> {
    let out = client
        .describe_time_to_live()
        .table_name(table)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("reading the TTL setting of {table}"), e))?;
    let status = out.time_to_live_description.and_then(|d| d.time_to_live_status);
    if matches!(status, Some(TimeToLiveStatus::Enabled | TimeToLiveStatus::Enabling)) {
        return Ok(());
    }
    let spec = TimeToLiveSpecification::builder()
        .enabled(true)
        .attribute_name(TTL_ATTR)
        .build()
        .map_err(|e| sdk_err("building the TTL setting", e))?;
    client
        .update_time_to_live()
        .table_name(table)
        .time_to_live_specification(spec)
        .send()
        .await
        .map_err(|e| sdk_err(&format!("enabling TTL on {table}"), e))?;
    Ok(())
}

fn missing_table(table: &str) -> StorageError {
    StorageError::Backend(format!(
        "DynamoDB table {table} does not exist: create it with `ratepool aws init` or the CDK app"
    ))
}

// ------------------------------------------------------------ items

pub(super) fn s(v: &str) -> AttributeValue {
    AttributeValue::S(v.to_owned())
}

pub(super) fn num(v: impl ToString) -> AttributeValue {
    AttributeValue::N(v.to_string())
}

fn values<const N: usize>(pairs: [(&str, AttributeValue); N]) -> HashMap<String, AttributeValue> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

/// `#name` → `name` for every placeholder in the expressions. Every
/// attribute goes through one, so no name can hit DynamoDB's long list of
/// reserved words (`status`, `name`, `error`…).
fn names(exprs: &[&str]) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for expr in exprs {
        let mut rest = *expr;
        while let Some(at) = rest.find('#') {
            let tail = &rest[at + 1..];
            let len = tail.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(tail.len());
            let name = &tail[..len];
            let attr = if name == "ttl" { TTL_ATTR } else { name };
            out.insert(format!("#{name}"), attr.to_owned());
            rest = &tail[len..];
        }
    }
    out
}

fn secs(t: Micros) -> i64 {
    t.div_euclid(1_000_000)
}

pub(super) fn micros(d: Duration) -> Micros {
    Micros::try_from(d.as_micros()).unwrap_or(Micros::MAX)
}

/// Whether an item's TTL has passed at `now_s` (DynamoDB deletes such items
/// only eventually).
fn expired(item: &Item, now_s: i64) -> bool {
    item.get(TTL_ATTR).and_then(|v| v.as_n().ok()).and_then(|n| n.parse::<i64>().ok()).is_some_and(|t| t <= now_s)
}

fn idem_pk(tenant: &TenantId, key: &str) -> String {
    format!("idem#{tenant}#{key}")
}

fn usage_pk(tenant: &TenantId) -> String {
    format!("usage#{tenant}")
}

fn quota_pk(tenant: &TenantId) -> String {
    format!("quota#{tenant}")
}

/// An in-flight counter item's count; below zero reads as 0.
fn in_flight_of(item: &Item) -> StorageResult<u64> {
    let n = Fields::new(item, "in-flight counter").opt_n::<i64>("in_flight")?;
    Ok(n.unwrap_or(0).max(0) as u64)
}

fn priority_str(p: Priority) -> &'static str {
    match p {
        Priority::Interactive => "interactive",
        Priority::Batch => "batch",
    }
}

/// At most [`MAX_ERROR_BYTES`], cut at a character boundary.
fn clip(s: &str) -> String {
    if s.len() <= MAX_ERROR_BYTES {
        return s.to_owned();
    }
    let mut end = MAX_ERROR_BYTES - '…'.len_utf8();
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

fn already_exists(id: &JobId) -> StorageError {
    StorageError::AlreadyExists(format!("job {id}"))
}

fn corrupt(what: &str, detail: &str) -> StorageError {
    StorageError::Backend(format!("stored {what} is malformed: {detail}"))
}

fn codes(reasons: &[CancellationReason]) -> Vec<&str> {
    reasons.iter().map(|r| r.code().unwrap_or("?")).collect()
}

/// A refused conditional write on the job item is `LeaseLost`; anything
/// else is a backend error.
fn lease_lost_or<R: std::fmt::Debug + Send + Sync + 'static>(
    e: SdkError<UpdateItemError, R>,
    what: &str,
) -> StorageError {
    if matches!(e.as_service_error(), Some(UpdateItemError::ConditionalCheckFailedException(_))) {
        StorageError::LeaseLost
    } else {
        sdk_err(what, e)
    }
}

/// Why an acquisition was refused, from the item as it was.
fn refused_lease(old: Option<&Item>, now: Micros) -> StorageResult<LeaseOutcome> {
    let Some(item) = old.filter(|i| !i.is_empty() && !expired(i, secs(now))) else {
        return Ok(LeaseOutcome::Missing);
    };
    let f = Fields::new(item, "job item");
    let status = f.status()?;
    if status.is_terminal() {
        return Ok(LeaseOutcome::Finished(status));
    }
    match (f.opt_s("lease_owner")?, f.opt_n::<Micros>("lease_expires_at")?) {
        (Some(owner), Some(expires_at)) if now < expires_at => {
            Ok(LeaseOutcome::Held { owner: owner.to_owned(), expires_at })
        }
        _ => Err(StorageError::Backend("lease refused on a job that looks free; retry".into())),
    }
}

/// Typed reads of one item's attributes, naming the item in errors.
struct Fields<'a> {
    item: &'a Item,
    what: &'static str,
}

impl<'a> Fields<'a> {
    fn new(item: &'a Item, what: &'static str) -> Self {
        Self { item, what }
    }

    fn opt_s(&self, name: &str) -> StorageResult<Option<&'a str>> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::S(v)) => Ok(Some(v.as_str())),
            Some(_) => Err(corrupt(self.what, &format!("{name} is not a string"))),
        }
    }

    fn s(&self, name: &str) -> StorageResult<&'a str> {
        self.opt_s(name)?.ok_or_else(|| corrupt(self.what, &format!("{name} is missing")))
    }

    fn opt_n<T: std::str::FromStr>(&self, name: &str) -> StorageResult<Option<T>> {
        match self.item.get(name) {
            None | Some(AttributeValue::Null(_)) => Ok(None),
            Some(AttributeValue::N(v)) => {
                v.parse().map(Some).map_err(|_| corrupt(self.what, &format!("{name} = {v} is out of range")))
            }
            Some(_) => Err(corrupt(self.what, &format!("{name} is not a number"))),
        }
    }

    fn n<T: std::str::FromStr>(&self, name: &str) -> StorageResult<T> {
        self.opt_n(name)?.ok_or_else(|| corrupt(self.what, &format!("{name} is missing")))
    }

    fn parsed<T, E: std::fmt::Display>(
        &self,
        name: &str,
        parse: impl FnOnce(&'a str) -> Result<T, E>,
    ) -> StorageResult<T> {
        parse(self.s(name)?).map_err(|e| corrupt(self.what, &format!("{name}: {e}")))
    }

    fn status(&self) -> StorageResult<JobStatus> {
        self.parsed("status", |v| JobStatus::parse(v).ok_or(format!("unknown job status {v:?}")))
    }
}

fn job_from_item(item: &Item) -> StorageResult<JobRecord> {
    let f = Fields::new(item, "job item");
    Ok(JobRecord {
        id: f.parsed("PK", JobId::parse)?,
        tenant: f.parsed("tenant", TenantId::parse)?,
        name: f.s("name")?.to_owned(),
        priority: f.parsed("priority", |v| match v {
            "interactive" => Ok(Priority::Interactive),
            "batch" => Ok(Priority::Batch),
            other => Err(format!("unknown priority {other:?}")),
        })?,
        status: f.status()?,
        spec_json: f.s("spec_json")?.to_owned(),
        steps_total: f.n("steps_total")?,
        steps_done: f.n("steps_done")?,
        usage: Usage {
            calls: f.n("calls")?,
            prompt_tokens: f.n("prompt_tokens")?,
            completion_tokens: f.n("completion_tokens")?,
        },
        error: f.opt_s("error")?.map(str::to_owned),
        created_at: f.n("created_at")?,
        updated_at: f.n("updated_at")?,
        finished_at: f.opt_n("finished_at")?,
        lease_owner: f.opt_s("lease_owner")?.map(str::to_owned),
        lease_expires_at: f.opt_n("lease_expires_at")?,
        stalled_runs: f.n("stalled_runs")?,
    })
}

fn checkpoint_from_item(item: &Item) -> StorageResult<Checkpoint> {
    let f = Fields::new(item, "checkpoint item");
    Ok(Checkpoint {
        step_id: f.parsed("SK", |sk| StepId::parse(sk.strip_prefix(STEP_PREFIX).unwrap_or(sk)))?,
        output: f.s("output")?.to_owned(),
        usage: Usage {
            calls: f.n("calls")?,
            prompt_tokens: f.n("prompt_tokens")?,
            completion_tokens: f.n("completion_tokens")?,
        },
        org: f.parsed("org", OrgName::parse)?,
        model: f.parsed("model", ModelName::parse)?,
        attempts: f.n("attempts")?,
        started_at: f.n("started_at")?,
        finished_at: f.n("finished_at")?,
    })
}

fn usage_from_item(item: &Item) -> StorageResult<(OrgName, OrgCounters)> {
    let f = Fields::new(item, "usage item");
    let count = |name: &str| f.opt_n::<u64>(name).map(Option::unwrap_or_default);
    Ok((
        f.parsed("SK", |sk| OrgName::parse(sk.strip_prefix(USAGE_ORG_PREFIX).unwrap_or(sk)))?,
        OrgCounters {
            calls: count("calls")?,
            prompt_tokens: count("prompt_tokens")?,
            completion_tokens: count("completion_tokens")?,
            rate_limited: count("rate_limited")?,
            insufficient_quota: count("insufficient_quota")?,
            server_errors: count("server_errors")?,
            timeouts: count("timeouts")?,
            connection_errors: count("connection_errors")?,
            request_errors: count("request_errors")?,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_maps_every_placeholder_and_the_ttl_alias() {
        let n = names(&["SET #status = :s, #ttl = :t ADD #lease_epoch :one", "#lease_owner = :o AND #status = :r"]);
        let mut got: Vec<_> = n.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        got.sort();
        assert_eq!(
            got,
            vec![
                ("#lease_epoch", "lease_epoch"),
                ("#lease_owner", "lease_owner"),
                ("#status", "status"),
                ("#ttl", "expires_at")
            ]
        );
    }

    #[test]
    fn clip_keeps_short_messages_and_cuts_long_ones_on_a_char_boundary() {
        assert_eq!(clip("model refused"), "model refused");
        let long = "ü".repeat(MAX_ERROR_BYTES);
        let cut = clip(&long);
        assert!(cut.len() <= MAX_ERROR_BYTES, "{}", cut.len());
        assert!(cut.ends_with('…'));
    }

    #[test]
    fn expiry_is_in_epoch_seconds_and_inclusive() {
        let item: Item = [(TTL_ATTR.to_owned(), num(1_700_000_100))].into_iter().collect();
        assert!(!expired(&item, 1_700_000_099));
        assert!(expired(&item, 1_700_000_100));
        assert!(!expired(&Item::new(), i64::MAX), "an item without TTL never expires");
        assert_eq!(secs(1_700_000_000_999_999), 1_700_000_000);
    }
}
