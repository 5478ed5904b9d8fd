//! Creating a job: the plain path, the idempotency key path, and the
//! tenant's in-flight counter that both raise in the same transaction.

use super::*;

impl DynamoJobs {
    /// The job and its count in the tenant's in-flight counter in one
    /// transaction.
    pub(super) async fn create_plain(&self, job: &NewJob) -> StorageResult<CreateOutcome> {
        let items = vec![self.put_job(job)?, self.count_in(job)?, self.put_unsent(job)?, self.put_spec(job)?];
        match self.transact(items, "creating a job").await {
            Ok(()) => Ok(CreateOutcome::Created(job.queued_record())),
            Err(TxError::Other(e)) => Err(e),
            Err(TxError::Cancelled(reasons)) if failed(&reasons, 1) => self.at_limit(&job.tenant, &reasons[1]).await,
            Err(TxError::Cancelled(_)) => Err(already_exists(&job.id)),
        }
    }

    pub(super) fn put_job(&self, job: &NewJob) -> StorageResult<TransactWriteItem> {
        let put = Put::builder()
            .table_name(&self.table)
            .set_item(Some(self.job_item(job)))
            .condition_expression("attribute_not_exists(PK)")
            .build()
            .map_err(|e| sdk_err("building the job write", e))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The spec in an item of its own, written once with the job: the job
    /// item, written at every lease renewal, checkpoint and finish, stays
    /// small, and DynamoDB bills a write by the whole item's size. Last in
    /// its transaction (the callers read cancellation reasons by index).
    /// It expires like a step item: `created + retention + LIVE_MARGIN`.
    pub(super) fn put_spec(&self, job: &NewJob) -> StorageResult<TransactWriteItem> {
        let put = Put::builder()
            .table_name(&self.table)
            .item("PK", s(job.id.as_str()))
            .item("SK", s(SPEC_SK))
            .item("spec_json", s(&job.spec_json))
            .item(TTL_ATTR, self.live_ttl(job.created_at))
            .build()
            .map_err(|e| sdk_err("building the spec write", e))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// The job's entry in the unsent list, until `mark_sent` deletes it.
    pub(super) fn put_unsent(&self, job: &NewJob) -> StorageResult<TransactWriteItem> {
        let put = Put::builder()
            .table_name(&self.table)
            .item("PK", s(UNSENT_PK))
            .item("SK", s(job.id.as_str()))
            .item("tenant", s(job.tenant.as_str()))
            .item("priority", s(priority_str(job.priority)))
            .item("created_at", num(job.created_at))
            .item(TTL_ATTR, self.live_ttl(job.created_at))
            .build()
            .map_err(|e| sdk_err("building the job's unsent entry", e))?;
        Ok(TransactWriteItem::builder().put(put).build())
    }

    /// Adds the job to its tenant's in-flight counter, on condition that
    /// the counter is below the job's limit (if it has one).
    pub(super) fn count_in(&self, job: &NewJob) -> StorageResult<TransactWriteItem> {
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
    pub(super) fn count_out(&self, tenant: &TenantId) -> StorageResult<TransactWriteItem> {
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
    pub(super) async fn at_limit(
        &self,
        tenant: &TenantId,
        reason: &CancellationReason,
    ) -> StorageResult<CreateOutcome> {
        let in_flight = match reason.item().filter(|i| !i.is_empty()) {
            Some(item) => in_flight_of(item)?,
            None => self.jobs_in_flight(tenant).await?,
        };
        Ok(CreateOutcome::InFlightLimit { in_flight })
    }

    /// The job's tenant (which never changes), or `None` if there is no
    /// such job item.
    pub(super) async fn tenant_of(&self, id: &JobId) -> StorageResult<Option<TenantId>> {
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
    pub(super) async fn create_keyed(&self, job: &NewJob, key: &str, hash: &str) -> StorageResult<CreateOutcome> {
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
        let items = vec![
            self.put_job(job)?,
            TransactWriteItem::builder().put(put_idem).build(),
            self.count_in(job)?,
            self.put_unsent(job)?,
            self.put_spec(job)?,
        ];
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
    pub(super) async fn keyed_job(
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

    pub(super) fn job_item(&self, job: &NewJob) -> Item {
        let mut item = Item::new();
        item.insert("PK".into(), s(job.id.as_str()));
        item.insert("SK".into(), s(JOB_SK));
        item.insert("tenant".into(), s(job.tenant.as_str()));
        item.insert("name".into(), s(&job.name));
        item.insert("priority".into(), s(priority_str(job.priority)));
        item.insert("status".into(), s(JobStatus::Queued.as_str()));
        item.insert("steps_total".into(), num(job.steps_total));
        for zero in ["steps_done", "calls", "prompt_tokens", "completion_tokens", "lease_epoch", "stalled_runs"] {
            item.insert(zero.into(), num(0));
        }
        item.insert("created_at".into(), num(job.created_at));
        item.insert("updated_at".into(), num(job.created_at));
        item.insert(TTL_ATTR.into(), self.live_ttl(job.created_at));
        item
    }
}
