//! Job records, leases and step checkpoints.
//!
//! Every write that a lease guards checks owner, epoch, expiry and status in
//! the same statement as the write itself, so a worker that lost its lease
//! can never change the job, however late it wakes up, whichever machine it
//! runs on. A refused write reads the row afterwards only to tell the
//! caller why.
//!
//! The tenants' in-flight counters (`tenant_jobs`) are raised in the
//! transaction that stores a job and lowered in the statement that moves it
//! to a final status, so each job is counted out exactly once.

use std::borrow::Cow;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::PgExecutor;
use sqlx::postgres::PgRow;

use super::{PgBackend, col, db, int, is_unique_violation, parsed, priority_col, ucol};
use crate::answer::StepAnswer;
use crate::domain::{JobId, Micros, ModelName, OrgName, StepKey, TenantId, Usage, duration_micros};
use crate::storage::{
    Checkpoint, CheckpointPage, CreateOutcome, DeliveryReport, JobOutcome, JobRecord, JobStatus, JobStore, Lease,
    LeaseOutcome, NewJob, PageRequest, QueueMessage, StorageError, StorageResult,
};

/// Times a refused lease write is tried again because the row changed
/// between the write and the read that tells why (the lease lapsed or was
/// released, a checkpoint landed). Each retry means another writer moved
/// the job meanwhile, so a handful never runs out in practice.
const MAX_RACES: u32 = 8;

/// Binds `$1`, `$2` and `$3` of a statement a lease guards: the job, the
/// owner and the epoch its `WHERE` clause checks.
trait BindLease<'a> {
    fn bind_lease(self, lease: &'a Lease) -> Self;
}

impl<'a> BindLease<'a> for sqlx::query::Query<'_, sqlx::Postgres, sqlx::postgres::PgArguments> {
    fn bind_lease(self, lease: &'a Lease) -> Self {
        self.bind(lease.job_id.as_str()).bind(&lease.owner).bind(int(lease.epoch))
    }
}

impl<'q, O> BindLease<'q> for sqlx::query::QueryScalar<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    fn bind_lease(self, lease: &'q Lease) -> Self {
        self.bind(lease.job_id.as_str()).bind(&lease.owner).bind(int(lease.epoch))
    }
}

/// The columns `job_from_row` reads.
macro_rules! job_columns {
    () => {
        "id, tenant, name, priority, status, spec_json, steps_total, steps_done, calls, prompt_tokens, \
         completion_tokens, error, created_at, updated_at, finished_at, lease_owner, lease_expires_at, stalled_runs"
    };
}

/// The columns `checkpoint_from_row` reads.
macro_rules! checkpoint_columns {
    () => {
        "step_id, output, answer, calls, prompt_tokens, completion_tokens, org, model, attempts, started_at, \
         finished_at"
    };
}

/// A statement that moves jobs to a final status, `$ended` (an UPDATE of
/// `jobs` ... `RETURNING tenant`), and counts each of them out of its
/// tenant's in-flight count in the same statement, so in the same
/// transaction. Its one row is how many jobs it ended (`ended`): a job
/// already final is not matched by `$ended`, so it is never counted out
/// twice.
macro_rules! counting_out {
    ($ended:literal) => {
        concat!(
            "WITH ended AS (",
            $ended,
            "), counted AS (
                UPDATE tenant_jobs t SET in_flight = GREATEST(t.in_flight - 1, 0)
                  FROM ended WHERE t.tenant = ended.tenant)
             SELECT count(*) AS ended FROM ended"
        )
    };
}

fn job_from_row(r: &PgRow) -> StorageResult<JobRecord> {
    Ok(JobRecord {
        id: parsed(r, "id", JobId::parse)?,
        tenant: parsed(r, "tenant", TenantId::parse)?,
        name: col(r, "name")?,
        priority: priority_col(r, "priority")?,
        status: status_col(r, "status")?,
        spec_json: col(r, "spec_json")?,
        steps_total: ucol(r, "steps_total")?,
        steps_done: ucol(r, "steps_done")?,
        usage: Usage {
            calls: ucol(r, "calls")?,
            prompt_tokens: ucol(r, "prompt_tokens")?,
            completion_tokens: ucol(r, "completion_tokens")?,
        },
        error: col(r, "error")?,
        created_at: col(r, "created_at")?,
        updated_at: col(r, "updated_at")?,
        finished_at: col(r, "finished_at")?,
        lease_owner: col(r, "lease_owner")?,
        lease_expires_at: col(r, "lease_expires_at")?,
        stalled_runs: ucol(r, "stalled_runs")?,
    })
}

fn status_col(r: &PgRow, name: &str) -> StorageResult<JobStatus> {
    let s: String = col(r, name)?;
    JobStatus::parse(&s).ok_or_else(|| StorageError::Backend(format!("unknown job status {s:?}")))
}

fn checkpoint_from_row(r: &PgRow) -> StorageResult<Checkpoint> {
    let text = String::from_utf8(col(r, "output")?)
        .map_err(|e| StorageError::Backend(format!("column output is not UTF-8: {e}")))?;
    let rest: Option<String> = col(r, "answer")?;
    let answer = StepAnswer::join(text, rest.as_deref()).map_err(|e| StorageError::Backend(e.to_string()))?;
    Ok(Checkpoint {
        step: parsed(r, "step_id", |s| StepKey::parse(&s))?,
        answer,
        usage: Usage {
            calls: ucol(r, "calls")?,
            prompt_tokens: ucol(r, "prompt_tokens")?,
            completion_tokens: ucol(r, "completion_tokens")?,
        },
        org: parsed(r, "org", OrgName::parse)?,
        model: parsed(r, "model", ModelName::parse)?,
        attempts: ucol(r, "attempts")?,
        started_at: col(r, "started_at")?,
        finished_at: col(r, "finished_at")?,
    })
}

/// Text as a TEXT column holds it. PostgreSQL's text cannot hold U+0000,
/// which a job's name or an error (often a provider's own words) may
/// carry: each becomes U+FFFD, rather than the write failing as a backend
/// error that every retry would meet again.
fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') { Cow::Owned(s.replace('\0', "\u{FFFD}")) } else { Cow::Borrowed(s) }
}

/// The tenant's jobs in flight, from its counter row (none: 0).
async fn in_flight(e: impl PgExecutor<'_>, tenant: &TenantId) -> StorageResult<u64> {
    let n: Option<i64> = sqlx::query_scalar("SELECT in_flight FROM tenant_jobs WHERE tenant = $1")
        .bind(tenant.as_str())
        .fetch_optional(e)
        .await
        .map_err(db)?;
    Ok(u64::try_from(n.unwrap_or(0)).unwrap_or(0))
}

/// The job `tenant` created earlier with idempotency key `key`, if any;
/// `IdempotencyMismatch` if that request's hash was not `hash`.
async fn keyed_job(
    e: impl PgExecutor<'_>,
    tenant: &TenantId,
    key: &str,
    hash: &str,
) -> StorageResult<Option<JobRecord>> {
    let row = sqlx::query(concat!(
        "SELECT ",
        job_columns!(),
        ", request_hash FROM jobs WHERE tenant = $1 AND idempotency_key = $2"
    ))
    .bind(tenant.as_str())
    .bind(key)
    .fetch_optional(e)
    .await
    .map_err(db)?;
    let Some(row) = row else { return Ok(None) };
    let stored: Option<String> = col(&row, "request_hash")?;
    if stored.as_deref() == Some(hash) {
        Ok(Some(job_from_row(&row)?))
    } else {
        Err(StorageError::IdempotencyMismatch { key: key.to_owned() })
    }
}

#[async_trait]
impl JobStore for PgBackend {
    /// A new job whose id already exists (not via its idempotency key) is a
    /// `AlreadyExists`: ids are minted fresh, so that is a caller bug.
    ///
    /// One transaction, which first counts the job in: that upsert holds the
    /// tenant's counter row until the transaction ends, so a tenant's
    /// creates run one after the other from there, on every process, and
    /// the key lookup and the limit check see every job created before. A
    /// refusal or a replay rolls the count back.
    async fn create_job(&self, job: &NewJob) -> StorageResult<CreateOutcome> {
        let mut tx = self.pool().begin().await.map_err(db)?;
        let counted: i64 = sqlx::query_scalar(
            "INSERT INTO tenant_jobs (tenant, in_flight) VALUES ($1, 1)
             ON CONFLICT (tenant) DO UPDATE SET in_flight = tenant_jobs.in_flight + 1
             RETURNING in_flight",
        )
        .bind(job.tenant.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(db)?;
        if let Some((key, hash)) = &job.idempotency
            && let Some(record) = keyed_job(&mut *tx, &job.tenant, key, hash).await?
        {
            // Dropping `tx` rolls it back: nothing was written.
            return Ok(CreateOutcome::Existing(record));
        }
        if let Some(limit) = job.in_flight_limit {
            let in_flight = u64::try_from(counted.saturating_sub(1)).unwrap_or(0);
            if in_flight >= limit {
                return Ok(CreateOutcome::InFlightLimit { in_flight });
            }
        }
        let (key, hash) = match &job.idempotency {
            Some((k, h)) => (Some(k.as_str()), Some(h.as_str())),
            None => (None, None),
        };
        let name = pg_text(&job.name);
        let inserted = sqlx::query(
            "INSERT INTO jobs (id, tenant, name, priority, status, spec_json, steps_total,
                               created_at, updated_at, idempotency_key, request_hash)
             VALUES ($1, $2, $3, $4, 'queued', $5, $6, $7, $7, $8, $9)
             ON CONFLICT (id) DO NOTHING",
        )
        .bind(job.id.as_str())
        .bind(job.tenant.as_str())
        .bind(name.as_ref())
        .bind(job.priority.as_str())
        .bind(&job.spec_json)
        .bind(i64::from(job.steps_total))
        .bind(job.created_at)
        .bind(key)
        .bind(hash)
        .execute(&mut *tx)
        .await;
        match inserted {
            Ok(done) if done.rows_affected() == 0 => Err(StorageError::AlreadyExists(format!("job {}", job.id))),
            Ok(_) => {
                tx.commit().await.map_err(db)?;
                let mut record = job.queued_record();
                record.name = name.into_owned();
                Ok(CreateOutcome::Created(record))
            }
            // The key was taken after the lookup above: only a writer that
            // skipped the counter row could, but the request is answered
            // as the replay it is all the same, never as a failure.
            Err(e) if is_unique_violation(&e) => {
                let Some((key, hash)) = &job.idempotency else { return Err(db(e)) };
                tx.rollback().await.map_err(db)?;
                match keyed_job(self.pool(), &job.tenant, key, hash).await? {
                    Some(record) => Ok(CreateOutcome::Existing(record)),
                    None => Err(db(e)),
                }
            }
            Err(e) => Err(db(e)),
        }
    }

    async fn jobs_in_flight(&self, tenant: &TenantId) -> StorageResult<u64> {
        in_flight(self.pool(), tenant).await
    }

    async fn replay(&self, tenant: &TenantId, key: &str, hash: &str) -> StorageResult<Option<JobRecord>> {
        keyed_job(self.pool(), tenant, key, hash).await
    }

    async fn get_job(&self, id: &JobId) -> StorageResult<Option<JobRecord>> {
        let row = sqlx::query(concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = $1"))
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// A lease is valid while `now < lease_expires_at`; at the expiry instant
    /// it may be taken over. The same owner string does not get around an
    /// unexpired lease: a second acquisition by it is `Held` too.
    ///
    /// The acquisition is one conditional UPDATE, so of two processes taking
    /// the same job only one matches (the other waits for its row lock and
    /// then finds the lease held). A refused one reads the row to tell why;
    /// if the lease was freed in between, it tries again.
    async fn acquire_lease(&self, id: &JobId, owner: &str, ttl: Duration, now: Micros) -> StorageResult<LeaseOutcome> {
        let expires_at = now.saturating_add(duration_micros(ttl));
        for _ in 0..MAX_RACES {
            let taken = sqlx::query(
                "UPDATE jobs SET status = 'running', lease_owner = $2, lease_epoch = lease_epoch + 1,
                                 lease_expires_at = $3, updated_at = $4, stalled_runs = stalled_runs + 1
                  WHERE id = $1 AND status IN ('queued', 'running')
                    AND (lease_expires_at IS NULL OR lease_expires_at <= $4)
                  RETURNING lease_epoch",
            )
            .bind(id.as_str())
            .bind(owner)
            .bind(expires_at)
            .bind(now)
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
            if let Some(row) = taken {
                let epoch = ucol(&row, "lease_epoch")?;
                return Ok(LeaseOutcome::Acquired(Lease {
                    job_id: id.clone(),
                    owner: owner.to_owned(),
                    epoch,
                    expires_at,
                }));
            }
            let current = sqlx::query("SELECT status, lease_owner, lease_expires_at FROM jobs WHERE id = $1")
                .bind(id.as_str())
                .fetch_optional(self.pool())
                .await
                .map_err(db)?;
            let Some(current) = current else { return Ok(LeaseOutcome::Missing) };
            let status = status_col(&current, "status")?;
            if status.is_terminal() {
                return Ok(LeaseOutcome::Finished(status));
            }
            let held_by: Option<String> = col(&current, "lease_owner")?;
            let held_until: Option<Micros> = col(&current, "lease_expires_at")?;
            if let (Some(holder), Some(until)) = (held_by, held_until)
                && now < until
            {
                return Ok(LeaseOutcome::Held { owner: holder, expires_at: until });
            }
            // Released or lapsed since the UPDATE looked: try again.
        }
        Err(StorageError::Backend(format!("the lease of job {id} changed under {MAX_RACES} acquisitions in a row")))
    }

    /// No expiry check: a lease that lapsed but that nobody took over is
    /// still this worker's, and renewing it is how it recovers.
    async fn renew_lease(&self, lease: &Lease, ttl: Duration, now: Micros) -> StorageResult<Lease> {
        let mut renewed = lease.clone();
        renewed.expires_at = now.saturating_add(duration_micros(ttl));
        let changed = sqlx::query(
            "UPDATE jobs SET lease_expires_at = $4, updated_at = $5
              WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3 AND status = 'running'",
        )
        .bind_lease(lease)
        .bind(renewed.expires_at)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(db)?
        .rows_affected();
        if changed == 0 { Err(StorageError::LeaseLost) } else { Ok(renewed) }
    }

    /// Releasing a lease that is no longer held changes nothing and is not
    /// an error: the caller was giving it up anyway. The job stays `running`
    /// (it has started) until the next worker acquires it. The run is taken
    /// back off `stalled_runs` in the same statement: it ended without a crash.
    async fn release_lease(&self, lease: &Lease) -> StorageResult<()> {
        sqlx::query(
            "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL,
                             stalled_runs = GREATEST(stalled_runs - 1, 0)
              WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3",
        )
        .bind_lease(lease)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn put_checkpoint(&self, lease: &Lease, checkpoint: &Checkpoint, now: Micros) -> StorageResult<()> {
        let cp = checkpoint;
        let mut tx = self.pool().begin().await.map_err(db)?;
        // The lease check and the progress update are one statement, which
        // also holds the job's row until the commit, so the same job's
        // checkpoints are written one at a time; the insert below rolls it
        // back if the step was already written.
        let held = sqlx::query(
            "UPDATE jobs SET steps_done = steps_done + 1, stalled_runs = 0,
                             calls = calls + $5,
                             prompt_tokens = prompt_tokens + $6,
                             completion_tokens = completion_tokens + $7,
                             updated_at = $4
              WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
                AND lease_expires_at > $4 AND status = 'running'",
        )
        .bind_lease(lease)
        .bind(now)
        .bind(int(cp.usage.calls))
        .bind(int(cp.usage.prompt_tokens))
        .bind(int(cp.usage.completion_tokens))
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if held == 0 {
            return Err(StorageError::LeaseLost);
        }
        let (text, rest) = cp.answer.split();
        // DO NOTHING rather than a unique violation, which would abort the
        // transaction: a duplicate is told by the count.
        let inserted = sqlx::query(
            "INSERT INTO checkpoints (job_id, step_id, output, answer, calls, prompt_tokens, completion_tokens,
                                      org, model, attempts, started_at, finished_at)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12)
             ON CONFLICT (job_id, step_id) DO NOTHING",
        )
        .bind(lease.job_id.as_str())
        .bind(cp.step.to_string())
        .bind(text.as_bytes())
        .bind(rest)
        .bind(int(cp.usage.calls))
        .bind(int(cp.usage.prompt_tokens))
        .bind(int(cp.usage.completion_tokens))
        .bind(cp.org.as_str())
        .bind(cp.model.as_str())
        .bind(i64::from(cp.attempts))
        .bind(cp.started_at)
        .bind(cp.finished_at)
        .execute(&mut *tx)
        .await
        .map_err(db)?
        .rows_affected();
        if inserted == 0 {
            // Dropping `tx` rolls back the progress update.
            return Err(StorageError::CheckpointExists(cp.step.clone()));
        }
        tx.commit().await.map_err(db)
    }

    /// In the order they were written.
    async fn checkpoints(&self, id: &JobId) -> StorageResult<Vec<Checkpoint>> {
        sqlx::query(concat!("SELECT ", checkpoint_columns!(), " FROM checkpoints WHERE job_id = $1 ORDER BY seq"))
            .bind(id.as_str())
            .fetch_all(self.pool())
            .await
            .map_err(db)?
            .iter()
            .map(checkpoint_from_row)
            .collect()
    }

    /// Reads every step's key and stored size, then only the page's
    /// checkpoints: a page of a large fan-out does not carry the answers of
    /// all the others over the network.
    async fn checkpoint_page(&self, id: &JobId, page: &PageRequest) -> StorageResult<Option<CheckpointPage>> {
        let rows = sqlx::query(
            "SELECT step_id, octet_length(output)::BIGINT + COALESCE(octet_length(answer), 0) AS bytes
               FROM checkpoints WHERE job_id = $1 ORDER BY seq",
        )
        .bind(id.as_str())
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        let steps = rows
            .iter()
            .map(|r| Ok((parsed(r, "step_id", |s| StepKey::parse(&s))?, ucol::<u64>(r, "bytes")?)))
            .collect::<StorageResult<Vec<_>>>()?;
        let sizes: Vec<_> = steps.iter().map(|(step, bytes)| (step, *bytes)).collect();
        let Some((window, next)) = page.window(&sizes) else { return Ok(None) };
        let next = next.cloned();
        let wanted: Vec<String> = steps[window].iter().map(|(step, _)| step.to_string()).collect();
        let checkpoints = if wanted.is_empty() {
            Vec::new()
        } else {
            sqlx::query(concat!(
                "SELECT ",
                checkpoint_columns!(),
                " FROM checkpoints WHERE job_id = $1 AND step_id = ANY($2) ORDER BY seq"
            ))
            .bind(id.as_str())
            .bind(&wanted)
            .fetch_all(self.pool())
            .await
            .map_err(db)?
            .iter()
            .map(checkpoint_from_row)
            .collect::<StorageResult<Vec<_>>>()?
        };
        Ok(Some(CheckpointPage { checkpoints, next }))
    }

    async fn set_steps_total(&self, lease: &Lease, steps_total: u32, now: Micros) -> StorageResult<()> {
        let changed = sqlx::query(
            "UPDATE jobs SET steps_total = $5, updated_at = $4
              WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
                AND lease_expires_at > $4 AND status = 'running'",
        )
        .bind_lease(lease)
        .bind(now)
        .bind(i64::from(steps_total))
        .execute(self.pool())
        .await
        .map_err(db)?
        .rows_affected();
        if changed == 0 { Err(StorageError::LeaseLost) } else { Ok(()) }
    }

    /// Like `put_checkpoint`, requires the lease unexpired at `now`: a worker
    /// whose lease lapsed renews it first. One statement writes the final
    /// status, conditional on the lease and (for `succeeded`) on every step
    /// being checkpointed, and counts the job out; a refusal reads the row
    /// to tell a lost lease from missing steps.
    async fn finish_job(&self, lease: &Lease, outcome: &JobOutcome, now: Micros) -> StorageResult<()> {
        let (status, error) = match outcome {
            JobOutcome::Succeeded => (JobStatus::Succeeded, None),
            JobOutcome::Failed(e) => (JobStatus::Failed, Some(pg_text(e))),
        };
        for _ in 0..MAX_RACES {
            let ended: i64 = sqlx::query_scalar(counting_out!(
                "UPDATE jobs SET status = $5, error = $6, finished_at = $4, updated_at = $4,
                                 lease_owner = NULL, lease_expires_at = NULL
                  WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
                    AND lease_expires_at > $4 AND status = 'running'
                    AND ($5 <> 'succeeded' OR steps_done >= steps_total)
                  RETURNING tenant"
            ))
            .bind_lease(lease)
            .bind(now)
            .bind(status.as_str())
            .bind(error.as_deref())
            .fetch_one(self.pool())
            .await
            .map_err(db)?;
            if ended > 0 {
                return Ok(());
            }
            let progress = sqlx::query(
                "SELECT steps_done, steps_total FROM jobs
                  WHERE id = $1 AND lease_owner = $2 AND lease_epoch = $3
                    AND lease_expires_at > $4 AND status = 'running'",
            )
            .bind_lease(lease)
            .bind(now)
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
            let Some(progress) = progress else { return Err(StorageError::LeaseLost) };
            let (done, total): (u32, u32) = (ucol(&progress, "steps_done")?, ucol(&progress, "steps_total")?);
            if status == JobStatus::Succeeded && done < total {
                return Err(StorageError::StepsMissing { done, total });
            }
            // The lease holds now and nothing else refuses the write: the
            // job changed since the UPDATE looked (its holder renewed a
            // lapsed lease, or the missing checkpoint landed). Try again.
        }
        Err(StorageError::Backend(format!(
            "job {} changed under {MAX_RACES} attempts to finish it in a row",
            lease.job_id
        )))
    }

    async fn cancel_job(&self, id: &JobId, now: Micros) -> StorageResult<Option<JobStatus>> {
        let ended: i64 = sqlx::query_scalar(counting_out!(
            "UPDATE jobs SET status = 'cancelled', finished_at = $2, updated_at = $2,
                             lease_owner = NULL, lease_expires_at = NULL
              WHERE id = $1 AND status IN ('queued', 'running')
              RETURNING tenant"
        ))
        .bind(id.as_str())
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        if ended > 0 {
            return Ok(Some(JobStatus::Cancelled));
        }
        // Not queued or running: already final (which never changes again),
        // or no such job.
        let row = sqlx::query("SELECT status FROM jobs WHERE id = $1")
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
        row.map(|r| status_col(&r, "status")).transpose()
    }

    /// An unknown job is a no-op, like a finished one.
    async fn fail_unleased(&self, id: &JobId, reason: &str, now: Micros) -> StorageResult<()> {
        sqlx::query(counting_out!(
            "UPDATE jobs SET status = 'failed', error = $2, finished_at = $3, updated_at = $3,
                             lease_owner = NULL, lease_expires_at = NULL
              WHERE id = $1 AND status IN ('queued', 'running')
              RETURNING tenant"
        ))
        .bind(id.as_str())
        .bind(pg_text(reason).as_ref())
        .bind(now)
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    /// Nothing to record: the queue is in the same database, so a job's
    /// message is there or not (see `unsent_jobs`).
    async fn mark_sent(&self, _id: &JobId) -> StorageResult<()> {
        Ok(())
    }

    async fn unsent_jobs(&self, before: Micros, max: usize) -> StorageResult<Vec<QueueMessage>> {
        sqlx::query(
            "SELECT id, tenant, priority FROM jobs j
              WHERE status = 'queued' AND created_at <= $1
                AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.job_id = j.id)
              ORDER BY created_at LIMIT $2",
        )
        .bind(before)
        .bind(int(max))
        .fetch_all(self.pool())
        .await
        .map_err(db)?
        .iter()
        .map(|r| {
            Ok(QueueMessage {
                job_id: parsed(r, "id", JobId::parse)?,
                tenant: parsed(r, "tenant", TenantId::parse)?,
                priority: priority_col(r, "priority")?,
            })
        })
        .collect()
    }

    async fn put_webhook_report(&self, id: &JobId, report: &DeliveryReport, now: Micros) -> StorageResult<()> {
        let json = serde_json::to_string(report)
            .map_err(|e| StorageError::Backend(format!("encoding a webhook report: {e}")))?;
        sqlx::query(
            "INSERT INTO webhook_deliveries (job_id, report, updated_at) VALUES ($1, $2, $3)
             ON CONFLICT (job_id) DO UPDATE SET report = excluded.report, updated_at = excluded.updated_at",
        )
        .bind(id.as_str())
        .bind(json)
        .bind(now)
        .execute(self.pool())
        .await
        .map_err(db)?;
        Ok(())
    }

    async fn webhook_report(&self, id: &JobId) -> StorageResult<Option<DeliveryReport>> {
        let json: Option<String> = sqlx::query_scalar("SELECT report FROM webhook_deliveries WHERE job_id = $1")
            .bind(id.as_str())
            .fetch_optional(self.pool())
            .await
            .map_err(db)?;
        json.map(|j| {
            serde_json::from_str(&j).map_err(|e| StorageError::Backend(format!("unreadable webhook report: {e}")))
        })
        .transpose()
    }
}
