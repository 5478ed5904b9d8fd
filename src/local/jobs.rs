//! Job records, leases and step checkpoints.
//!
//! Every write that a lease guards checks owner, epoch, expiry and status in
//! the same statement or transaction as the write itself, so a worker that
//! lost its lease can never change the job, however late it wakes up.

use std::time::Duration;

use async_trait::async_trait;
use rusqlite::{OptionalExtension, TransactionBehavior};

use super::{OrBackend, SqliteBackend, int, parse_priority, parsed, uint};
use crate::answer::StepAnswer;
use crate::domain::{JobId, Micros, ModelName, OrgName, StepKey, TenantId, Usage, duration_micros};
use crate::storage::{
    Checkpoint, CreateOutcome, DeliveryReport, JobOutcome, JobRecord, JobStatus, JobStore, Lease, LeaseOutcome, NewJob,
    QueueMessage, StorageError, StorageResult,
};

/// The columns `job_from_row` reads, in its order (18 of them).
macro_rules! job_columns {
    () => {
        "id, tenant, name, priority, status, spec_json, steps_total, steps_done, calls, prompt_tokens, \
         completion_tokens, error, created_at, updated_at, finished_at, lease_owner, lease_expires_at, stalled_runs"
    };
}

fn job_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<JobRecord> {
    Ok(JobRecord {
        id: parsed(r, 0, JobId::parse)?,
        tenant: parsed(r, 1, TenantId::parse)?,
        name: r.get(2)?,
        priority: parse_priority(r, 3)?,
        status: status_of(r, 4)?,
        spec_json: r.get(5)?,
        steps_total: r.get(6)?,
        steps_done: r.get(7)?,
        usage: Usage { calls: uint(r, 8)?, prompt_tokens: uint(r, 9)?, completion_tokens: uint(r, 10)? },
        error: r.get(11)?,
        created_at: r.get(12)?,
        updated_at: r.get(13)?,
        finished_at: r.get(14)?,
        lease_owner: r.get(15)?,
        lease_expires_at: r.get(16)?,
        stalled_runs: r.get(17)?,
    })
}

fn status_of(r: &rusqlite::Row<'_>, idx: usize) -> rusqlite::Result<JobStatus> {
    let s: String = r.get(idx)?;
    JobStatus::parse(&s).ok_or_else(|| {
        rusqlite::Error::FromSqlConversionFailure(
            idx,
            rusqlite::types::Type::Text,
            format!("unknown job status {s:?}").into(),
        )
    })
}

/// The tenant's jobs in flight, from its counter row (none: 0).
fn in_flight(conn: &rusqlite::Connection, tenant: &TenantId) -> StorageResult<u64> {
    let n = conn
        .prepare_cached("SELECT in_flight FROM tenant_jobs WHERE tenant = ?1")
        .db()?
        .query_row([tenant.as_str()], |r| r.get::<_, i64>(0))
        .optional()
        .db()?;
    Ok(n.unwrap_or(0).max(0) as u64)
}

/// The job `tenant` created earlier with idempotency key `key`, if any;
/// `IdempotencyMismatch` if that request's hash was not `hash`.
fn keyed_job(
    conn: &rusqlite::Connection,
    tenant: &TenantId,
    key: &str,
    hash: &str,
) -> StorageResult<Option<JobRecord>> {
    let earlier = conn
        .prepare_cached(concat!(
            "SELECT ",
            job_columns!(),
            ", request_hash FROM jobs WHERE tenant = ?1 AND idempotency_key = ?2"
        ))
        .db()?
        .query_row(rusqlite::params![tenant.as_str(), key], |r| Ok((job_from_row(r)?, r.get::<_, Option<String>>(18)?)))
        .optional()
        .db()?;
    match earlier {
        Some((record, stored)) if stored.as_deref() == Some(hash) => Ok(Some(record)),
        Some(_) => Err(StorageError::IdempotencyMismatch { key: key.to_owned() }),
        None => Ok(None),
    }
}

/// Counts one job of `tenant` out, in the transaction that finished it.
fn count_out(tx: &rusqlite::Transaction<'_>, tenant: &str) -> StorageResult<()> {
    tx.prepare_cached("UPDATE tenant_jobs SET in_flight = max(in_flight - 1, 0) WHERE tenant = ?1")
        .db()?
        .execute([tenant])
        .db()?;
    Ok(())
}

fn checkpoint_from_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Checkpoint> {
    let text: String = r.get(1)?;
    let rest: Option<String> = r.get(10)?;
    let answer = StepAnswer::join(text, rest.as_deref())
        .map_err(|e| rusqlite::Error::FromSqlConversionFailure(10, rusqlite::types::Type::Text, e.into()))?;
    Ok(Checkpoint {
        step: parsed(r, 0, |s| StepKey::parse(&s))?,
        answer,
        usage: Usage { calls: uint(r, 2)?, prompt_tokens: uint(r, 3)?, completion_tokens: uint(r, 4)? },
        org: parsed(r, 5, OrgName::parse)?,
        model: parsed(r, 6, ModelName::parse)?,
        attempts: r.get(7)?,
        started_at: r.get(8)?,
        finished_at: r.get(9)?,
    })
}

#[async_trait]
impl JobStore for SqliteBackend {
    /// A new job whose id already exists (not via its idempotency key) is a
    /// `AlreadyExists`: ids are minted fresh, so that is a caller bug.
    async fn create_job(&self, job: &NewJob) -> StorageResult<CreateOutcome> {
        let job = job.clone();
        self.write(move |conn| {
            // IMMEDIATE: the key lookup and the insert see one state, even
            // with another process on the file.
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            if let Some((key, hash)) = &job.idempotency
                && let Some(record) = keyed_job(&tx, &job.tenant, key, hash)?
            {
                return Ok(CreateOutcome::Existing(record));
            }
            if let Some(limit) = job.in_flight_limit {
                let in_flight = in_flight(&tx, &job.tenant)?;
                if in_flight >= limit {
                    // Dropping `tx` ends it; nothing was written.
                    return Ok(CreateOutcome::InFlightLimit { in_flight });
                }
            }
            let (key, hash) = match &job.idempotency {
                Some((k, h)) => (Some(k.as_str()), Some(h.as_str())),
                None => (None, None),
            };
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO jobs (id, tenant, name, priority, status, spec_json, steps_total,
                                       created_at, updated_at, idempotency_key, request_hash)
                     VALUES (?1, ?2, ?3, ?4, 'queued', ?5, ?6, ?7, ?7, ?8, ?9)
                     ON CONFLICT DO NOTHING",
                )
                .db()?
                .execute(rusqlite::params![
                    job.id.as_str(),
                    job.tenant.as_str(),
                    job.name,
                    job.priority.as_str(),
                    job.spec_json,
                    job.steps_total,
                    job.created_at,
                    key,
                    hash,
                ])
                .db()?;
            if inserted == 0 {
                return Err(StorageError::AlreadyExists(format!("job {}", job.id)));
            }
            tx.prepare_cached(
                "INSERT INTO tenant_jobs (tenant, in_flight) VALUES (?1, 1)
                 ON CONFLICT (tenant) DO UPDATE SET in_flight = in_flight + 1",
            )
            .db()?
            .execute([job.tenant.as_str()])
            .db()?;
            tx.commit().db()?;
            Ok(CreateOutcome::Created(job.queued_record()))
        })
        .await
    }

    async fn jobs_in_flight(&self, tenant: &TenantId) -> StorageResult<u64> {
        let tenant = tenant.clone();
        self.read(move |conn| in_flight(conn, &tenant)).await
    }

    async fn replay(&self, tenant: &TenantId, key: &str, hash: &str) -> StorageResult<Option<JobRecord>> {
        let (tenant, key, hash) = (tenant.clone(), key.to_string(), hash.to_string());
        self.read(move |conn| keyed_job(conn, &tenant, &key, &hash)).await
    }

    async fn get_job(&self, id: &JobId) -> StorageResult<Option<JobRecord>> {
        let id = id.clone();
        self.read(move |conn| {
            conn.prepare_cached(concat!("SELECT ", job_columns!(), " FROM jobs WHERE id = ?1"))
                .db()?
                .query_row([id.as_str()], job_from_row)
                .optional()
                .db()
        })
        .await
    }

    /// A lease is valid while `now < lease_expires_at`; at the expiry instant
    /// it may be taken over. The same owner string does not get around an
    /// unexpired lease: a second acquisition by it is `Held` too.
    async fn acquire_lease(&self, id: &JobId, owner: &str, ttl: Duration, now: Micros) -> StorageResult<LeaseOutcome> {
        let id = id.clone();
        let owner = owner.to_owned();
        let expires_at = now.saturating_add(duration_micros(ttl));
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            let current = tx
                .prepare_cached("SELECT status, lease_owner, lease_expires_at, lease_epoch FROM jobs WHERE id = ?1")
                .db()?
                .query_row([id.as_str()], |r| {
                    Ok((
                        status_of(r, 0)?,
                        r.get::<_, Option<String>>(1)?,
                        r.get::<_, Option<Micros>>(2)?,
                        uint::<u64>(r, 3)?,
                    ))
                })
                .optional()
                .db()?;
            let Some((status, held_by, held_until, epoch)) = current else {
                return Ok(LeaseOutcome::Missing);
            };
            if status.is_terminal() {
                return Ok(LeaseOutcome::Finished(status));
            }
            if let (Some(holder), Some(until)) = (held_by, held_until)
                && now < until
            {
                return Ok(LeaseOutcome::Held { owner: holder, expires_at: until });
            }
            let epoch = epoch + 1;
            tx.prepare_cached(
                "UPDATE jobs SET status = 'running', lease_owner = ?2, lease_epoch = ?3,
                                 lease_expires_at = ?4, updated_at = ?5, stalled_runs = stalled_runs + 1
                  WHERE id = ?1",
            )
            .db()?
            .execute(rusqlite::params![id.as_str(), owner, int(epoch), expires_at, now])
            .db()?;
            tx.commit().db()?;
            Ok(LeaseOutcome::Acquired(Lease { job_id: id, owner, epoch, expires_at }))
        })
        .await
    }

    /// No expiry check: a lease that lapsed but that nobody took over is
    /// still this worker's, and renewing it is how it recovers.
    async fn renew_lease(&self, lease: &Lease, ttl: Duration, now: Micros) -> StorageResult<Lease> {
        let mut renewed = lease.clone();
        renewed.expires_at = now.saturating_add(duration_micros(ttl));
        let l = renewed.clone();
        let changed = self
            .write(move |conn| {
                conn.prepare_cached(
                    "UPDATE jobs SET lease_expires_at = ?4, updated_at = ?5
                      WHERE id = ?1 AND lease_owner = ?2 AND lease_epoch = ?3 AND status = 'running'",
                )
                .db()?
                .execute(rusqlite::params![l.job_id.as_str(), l.owner, int(l.epoch), l.expires_at, now])
                .db()
            })
            .await?;
        if changed == 0 { Err(StorageError::LeaseLost) } else { Ok(renewed) }
    }

    /// Releasing a lease that is no longer held changes nothing and is not
    /// an error: the caller was giving it up anyway. The job stays `running`
    /// (it has started) until the next worker acquires it. The run is taken
    /// back off `stalled_runs` in the same statement: it ended without a crash.
    async fn release_lease(&self, lease: &Lease) -> StorageResult<()> {
        let l = lease.clone();
        self.write(move |conn| {
            conn.prepare_cached(
                "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL,
                                 stalled_runs = max(stalled_runs - 1, 0)
                  WHERE id = ?1 AND lease_owner = ?2 AND lease_epoch = ?3",
            )
            .db()?
            .execute(rusqlite::params![l.job_id.as_str(), l.owner, int(l.epoch)])
            .db()?;
            Ok(())
        })
        .await
    }

    async fn put_checkpoint(&self, lease: &Lease, checkpoint: &Checkpoint, now: Micros) -> StorageResult<()> {
        let l = lease.clone();
        let cp = checkpoint.clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            // The lease check and the progress update are one statement; the
            // insert below rolls it back if the step was already written.
            let held = tx
                .prepare_cached(
                    "UPDATE jobs SET steps_done = steps_done + 1, stalled_runs = 0,
                                     calls = calls + ?5,
                                     prompt_tokens = prompt_tokens + ?6,
                                     completion_tokens = completion_tokens + ?7,
                                     updated_at = ?4
                      WHERE id = ?1 AND lease_owner = ?2 AND lease_epoch = ?3
                        AND lease_expires_at > ?4 AND status = 'running'",
                )
                .db()?
                .execute(rusqlite::params![
                    l.job_id.as_str(),
                    l.owner,
                    int(l.epoch),
                    now,
                    int(cp.usage.calls),
                    int(cp.usage.prompt_tokens),
                    int(cp.usage.completion_tokens),
                ])
                .db()?;
            if held == 0 {
                return Err(StorageError::LeaseLost);
            }
            let (text, rest) = cp.answer.split();
            let inserted = tx
                .prepare_cached(
                    "INSERT INTO checkpoints (job_id, step_id, output, calls, prompt_tokens, completion_tokens,
                                              org, model, attempts, started_at, finished_at, answer)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)
                     ON CONFLICT (job_id, step_id) DO NOTHING",
                )
                .db()?
                .execute(rusqlite::params![
                    l.job_id.as_str(),
                    cp.step.to_string(),
                    text,
                    int(cp.usage.calls),
                    int(cp.usage.prompt_tokens),
                    int(cp.usage.completion_tokens),
                    cp.org.as_str(),
                    cp.model.as_str(),
                    cp.attempts,
                    cp.started_at,
                    cp.finished_at,
                    rest,
                ])
                .db()?;
            if inserted == 0 {
                // Dropping `tx` rolls back the progress update.
                return Err(StorageError::CheckpointExists(cp.step.clone()));
            }
            tx.commit().db()
        })
        .await
    }

    /// In the order they were written.
    async fn checkpoints(&self, id: &JobId) -> StorageResult<Vec<Checkpoint>> {
        let id = id.clone();
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT step_id, output, calls, prompt_tokens, completion_tokens, org, model, attempts,
                        started_at, finished_at, answer
                   FROM checkpoints WHERE job_id = ?1 ORDER BY rowid",
            )
            .db()?
            .query_map([id.as_str()], checkpoint_from_row)
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }

    async fn set_steps_total(&self, lease: &Lease, steps_total: u32, now: Micros) -> StorageResult<()> {
        let l = lease.clone();
        let changed = self
            .write(move |conn| {
                conn.prepare_cached(
                    "UPDATE jobs SET steps_total = ?5, updated_at = ?4
                      WHERE id = ?1 AND lease_owner = ?2 AND lease_epoch = ?3
                        AND lease_expires_at > ?4 AND status = 'running'",
                )
                .db()?
                .execute(rusqlite::params![l.job_id.as_str(), l.owner, int(l.epoch), now, steps_total])
                .db()
            })
            .await?;
        if changed == 0 { Err(StorageError::LeaseLost) } else { Ok(()) }
    }

    /// Like `put_checkpoint`, requires the lease unexpired at `now`: a worker
    /// whose lease lapsed renews it first.
    async fn finish_job(&self, lease: &Lease, outcome: &JobOutcome, now: Micros) -> StorageResult<()> {
        let l = lease.clone();
        let (status, error) = match outcome {
            JobOutcome::Succeeded => (JobStatus::Succeeded, None),
            JobOutcome::Failed(e) => (JobStatus::Failed, Some(e.clone())),
        };
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            let progress = tx
                .prepare_cached(
                    "SELECT steps_done, steps_total FROM jobs
                      WHERE id = ?1 AND lease_owner = ?2 AND lease_epoch = ?3
                        AND lease_expires_at > ?4 AND status = 'running'",
                )
                .db()?
                .query_row(rusqlite::params![l.job_id.as_str(), l.owner, int(l.epoch), now], |r| {
                    Ok((r.get::<_, u32>(0)?, r.get::<_, u32>(1)?))
                })
                .optional()
                .db()?;
            let Some((done, total)) = progress else { return Err(StorageError::LeaseLost) };
            if status == JobStatus::Succeeded && done < total {
                return Err(StorageError::StepsMissing { done, total });
            }
            let tenant = tx
                .prepare_cached(
                    "UPDATE jobs SET status = ?2, error = ?3, finished_at = ?4, updated_at = ?4,
                                     lease_owner = NULL, lease_expires_at = NULL
                      WHERE id = ?1
                      RETURNING tenant",
                )
                .db()?
                .query_row(rusqlite::params![l.job_id.as_str(), status.as_str(), error, now], |r| r.get::<_, String>(0))
                .db()?;
            count_out(&tx, &tenant)?;
            tx.commit().db()?;
            Ok(())
        })
        .await
    }

    async fn cancel_job(&self, id: &JobId, now: Micros) -> StorageResult<Option<JobStatus>> {
        let id = id.clone();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            let cancelled = tx
                .prepare_cached(
                    "UPDATE jobs SET status = 'cancelled', finished_at = ?2, updated_at = ?2,
                                     lease_owner = NULL, lease_expires_at = NULL
                      WHERE id = ?1 AND status IN ('queued', 'running')
                      RETURNING tenant",
                )
                .db()?
                .query_row(rusqlite::params![id.as_str(), now], |r| r.get::<_, String>(0))
                .optional()
                .db()?;
            if let Some(tenant) = cancelled {
                count_out(&tx, &tenant)?;
            }
            let status = tx
                .prepare_cached("SELECT status FROM jobs WHERE id = ?1")
                .db()?
                .query_row([id.as_str()], |r| status_of(r, 0))
                .optional()
                .db()?;
            tx.commit().db()?;
            Ok(status)
        })
        .await
    }

    /// An unknown job is a no-op, like a finished one.
    async fn fail_unleased(&self, id: &JobId, reason: &str, now: Micros) -> StorageResult<()> {
        let id = id.clone();
        let reason = reason.to_owned();
        self.write(move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate).db()?;
            let failed = tx
                .prepare_cached(
                    "UPDATE jobs SET status = 'failed', error = ?2, finished_at = ?3, updated_at = ?3,
                                     lease_owner = NULL, lease_expires_at = NULL
                      WHERE id = ?1 AND status IN ('queued', 'running')
                      RETURNING tenant",
                )
                .db()?
                .query_row(rusqlite::params![id.as_str(), reason, now], |r| r.get::<_, String>(0))
                .optional()
                .db()?;
            if let Some(tenant) = failed {
                count_out(&tx, &tenant)?;
            }
            tx.commit().db()
        })
        .await
    }

    /// Nothing to record: the queue is in the same file, so a job's message
    /// is there or not (see `unsent_jobs`).
    async fn mark_sent(&self, _id: &JobId) -> StorageResult<()> {
        Ok(())
    }

    async fn unsent_jobs(&self, before: Micros, max: usize) -> StorageResult<Vec<QueueMessage>> {
        self.read(move |conn| {
            conn.prepare_cached(
                "SELECT id, tenant, priority FROM jobs j
                  WHERE status = 'queued' AND created_at <= ?1
                    AND NOT EXISTS (SELECT 1 FROM queue q WHERE q.job_id = j.id)
                  ORDER BY created_at LIMIT ?2",
            )
            .db()?
            .query_map(rusqlite::params![before, int(max)], |r| {
                Ok(QueueMessage {
                    job_id: parsed(r, 0, JobId::parse)?,
                    tenant: parsed(r, 1, TenantId::parse)?,
                    priority: parse_priority(r, 2)?,
                })
            })
            .db()?
            .collect::<rusqlite::Result<Vec<_>>>()
            .db()
        })
        .await
    }

    async fn put_webhook_report(&self, id: &JobId, report: &DeliveryReport, now: Micros) -> StorageResult<()> {
        let id = id.clone();
        let json = serde_json::to_string(report)
            .map_err(|e| StorageError::Backend(format!("encoding a webhook report: {e}")))?;
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO webhook_deliveries (job_id, report, updated_at) VALUES (?1, ?2, ?3)
                 ON CONFLICT (job_id) DO UPDATE SET report = excluded.report, updated_at = excluded.updated_at",
            )
            .db()?
            .execute(rusqlite::params![id.as_str(), json, now])
            .db()?;
            Ok(())
        })
        .await
    }

    async fn webhook_report(&self, id: &JobId) -> StorageResult<Option<DeliveryReport>> {
        let id = id.clone();
        let json: Option<String> = self
            .read(move |conn| {
                conn.prepare_cached("SELECT report FROM webhook_deliveries WHERE job_id = ?1")
                    .db()?
                    .query_row([id.as_str()], |r| r.get(0))
                    .optional()
                    .db()
            })
            .await?;
        json.map(|j| {
            serde_json::from_str(&j).map_err(|e| StorageError::Backend(format!("unreadable webhook report: {e}")))
        })
        .transpose()
    }
}
