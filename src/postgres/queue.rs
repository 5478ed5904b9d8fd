//! The job queue: a table of messages with visibility timeouts, like SQS,
//! shared by every process on the database.
//!
//! A receive hides a message until `now + visibility_timeout` (by the
//! injected clock) and gives it a fresh receipt; extend, delete and
//! dead-letter name that receipt, so a worker whose visibility lapsed and
//! whose message went to another worker gets `StaleReceipt`. Receivers take
//! rows with `FOR UPDATE SKIP LOCKED`, so concurrent receives never wait on
//! each other nor take the same message.
//!
//! Every write that makes a message visible at once notifies
//! [`QUEUE_CHANNEL`] in the same statement, so the notification is sent
//! exactly when the write commits; idle receivers on every machine wait on
//! it (through the listener task in `super`) instead of polling fast.

use std::sync::atomic::Ordering;
use std::time::Duration;

use async_trait::async_trait;
use sqlx::postgres::PgRow;

use super::{PgBackend, QUEUE_CHANNEL, col, db, int, lane, lane_priority, parsed, ucol};
use crate::domain::{JobId, Priority, TenantId, duration_micros};
use crate::storage::{
    DeadLetter, Delivery, JobQueue, QueueMessage, QueueStats, StorageError, StorageResult, receive_woken,
};

/// How often an idle receiver looks again even without a notification:
/// messages whose visibility or delay expires signal nothing, and a
/// notification sent while the listener was reconnecting is lost. Longer
/// than SQLite's 200 ms because every idle receiver of every process polls
/// the one shared server: a worker fleet polling five times a second would
/// load it for nothing, and every send already wakes receivers at once.
const FALLBACK_POLL: Duration = Duration::from_secs(1);

/// A message from columns `job_id`, `tenant` and `lane`.
fn message_of(row: &PgRow) -> StorageResult<QueueMessage> {
    Ok(QueueMessage {
        job_id: parsed(row, "job_id", JobId::parse)?,
        tenant: parsed(row, "tenant", TenantId::parse)?,
        priority: lane_priority(col(row, "lane")?)?,
    })
}

/// `Ok` if a write naming a receipt changed its row, else `StaleReceipt`.
fn held(changed: bool) -> StorageResult<()> {
    if changed { Ok(()) } else { Err(StorageError::StaleReceipt) }
}

impl PgBackend {
    /// One look at the queue: takes up to `max` visible messages.
    async fn take_visible(&self, max: usize) -> StorageResult<Vec<Delivery>> {
        let now = self.now();
        let hidden_until = now.saturating_add(duration_micros(self.shared.visibility_timeout));
        let turn = self.shared.takes.fetch_add(1, Ordering::Relaxed);
        let batch_turn = self.shared.batch_turn.load(Ordering::Relaxed).max(1);
        // Lane order for this take: batch first on its turn.
        let first = lane(if turn % batch_turn == batch_turn - 1 { Priority::Batch } else { Priority::Interactive });
        // One statement picks, hides and re-receipts the messages; the
        // receipt is random per row (gen_random_uuid is evaluated per row).
        // SKIP LOCKED passes over rows another receive is taking right now;
        // a row another receive took and committed meanwhile is read again
        // at its new version, no longer visible, and left out.
        let rows = sqlx::query(
            "UPDATE queue
                SET visible_at = $1,
                    receive_count = receive_count + 1,
                    receipt = gen_random_uuid()::text
              WHERE id IN (SELECT id FROM queue WHERE visible_at <= $2
                            ORDER BY lane <> $4, id LIMIT $3
                              FOR UPDATE SKIP LOCKED)
          RETURNING lane, id, job_id, tenant, receipt, receive_count",
        )
        .bind(hidden_until)
        .bind(now)
        .bind(int(max))
        .bind(first)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        let mut taken = rows
            .iter()
            .map(|r| {
                let key: (i16, i64) = (col(r, "lane")?, col(r, "id")?);
                let delivery = Delivery {
                    message: message_of(r)?,
                    receipt: col(r, "receipt")?,
                    receive_count: ucol(r, "receive_count")?,
                };
                Ok((key, delivery))
            })
            .collect::<StorageResult<Vec<_>>>()?;
        // RETURNING does not promise an order; restore the take's.
        taken.sort_by_key(|&((lane, id), _)| (lane != first, id));
        Ok(taken.into_iter().map(|(_, d)| d).collect())
    }
}

#[async_trait]
impl JobQueue for PgBackend {
    async fn send(&self, message: &QueueMessage) -> StorageResult<()> {
        sqlx::query(
            "WITH m AS (INSERT INTO queue (job_id, tenant, lane, visible_at, created_at)
                        VALUES ($1, $2, $3, $4, $4) RETURNING 1)
             SELECT pg_notify($5, '') FROM m",
        )
        .bind(message.job_id.as_str())
        .bind(message.tenant.as_str())
        .bind(lane(message.priority))
        .bind(self.now())
        .bind(QUEUE_CHANNEL)
        .execute(self.pool())
        .await
        .map_err(db)?;
        // The listener hears the notification too, a round trip later.
        self.shared.queue_ready.notify_waiters();
        Ok(())
    }

    /// If dropped while a look is running, the messages it took stay hidden
    /// until their visibility ends, as with a lost SQS response.
    async fn receive(&self, max: usize, wait: Duration) -> StorageResult<Vec<Delivery>> {
        if max == 0 {
            return Ok(Vec::new());
        }
        receive_woken(&self.shared.queue_ready, wait, FALLBACK_POLL, || self.take_visible(max)).await
    }

    /// Extending a message whose visibility already lapsed but that nobody
    /// received again succeeds (the receipt is still the latest); SQS would
    /// refuse that, but no other worker can hold it, so it is safe.
    async fn extend(&self, receipt: &str, timeout: Duration) -> StorageResult<()> {
        let visible_at = self.now().saturating_add(duration_micros(timeout));
        // A zero timeout hands the message back: wake the receivers. One
        // row comes back per row changed.
        let rows = sqlx::query(
            "WITH m AS (UPDATE queue SET visible_at = $1 WHERE receipt = $2 RETURNING 1)
             SELECT CASE WHEN $3 THEN pg_notify($4, '') END FROM m",
        )
        .bind(visible_at)
        .bind(receipt)
        .bind(timeout.is_zero())
        .bind(QUEUE_CHANNEL)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        held(!rows.is_empty())?;
        if timeout.is_zero() {
            self.shared.queue_ready.notify_waiters();
        }
        Ok(())
    }

    async fn delete(&self, receipt: &str) -> StorageResult<()> {
        let changed = sqlx::query("DELETE FROM queue WHERE receipt = $1")
            .bind(receipt)
            .execute(self.pool())
            .await
            .map_err(db)?
            .rows_affected();
        held(changed > 0)
    }

    /// One statement: the row is hidden, re-receipted and its count reset,
    /// so there is never a moment with two copies or none. A zero delay
    /// makes it visible at once, which notifies the receivers.
    async fn defer(&self, delivery: &Delivery, delay: Duration) -> StorageResult<()> {
        let visible_at = self.now().saturating_add(duration_micros(delay));
        // One row comes back per row changed.
        let rows = sqlx::query(
            "WITH m AS (UPDATE queue
                           SET visible_at = $1, receive_count = 0, receipt = gen_random_uuid()::text
                         WHERE receipt = $2 RETURNING 1)
             SELECT CASE WHEN $3 THEN pg_notify($4, '') END FROM m",
        )
        .bind(visible_at)
        .bind(&delivery.receipt)
        .bind(delay.is_zero())
        .bind(QUEUE_CHANNEL)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        held(!rows.is_empty())?;
        if delay.is_zero() {
            self.shared.queue_ready.notify_waiters();
        }
        Ok(())
    }

    /// Moves the row itself (not `delivery.message`), so what is
    /// dead-lettered is exactly what was queued; one statement, so the
    /// message is never in both tables or in neither.
    async fn dead_letter(&self, delivery: &Delivery) -> StorageResult<()> {
        let moved = sqlx::query(
            "WITH m AS (DELETE FROM queue WHERE receipt = $1
                        RETURNING job_id, tenant, lane, receive_count, created_at)
             INSERT INTO dead_letters (job_id, tenant, lane, receive_count, created_at, dead_at)
             SELECT job_id, tenant, lane, receive_count, created_at, $2 FROM m",
        )
        .bind(&delivery.receipt)
        .bind(self.now())
        .execute(self.pool())
        .await
        .map_err(db)?
        .rows_affected();
        held(moved > 0)
    }

    async fn dead_letters(&self, max: usize) -> StorageResult<Vec<DeadLetter>> {
        sqlx::query("SELECT job_id, tenant, lane, receive_count, dead_at FROM dead_letters ORDER BY id LIMIT $1")
            .bind(int(max))
            .fetch_all(self.pool())
            .await
            .map_err(db)?
            .iter()
            .map(|r| {
                Ok(DeadLetter {
                    message: message_of(r)?,
                    receive_count: ucol(r, "receive_count")?,
                    since: col(r, "dead_at")?,
                })
            })
            .collect()
    }

    /// One statement: the rows move, so there is never a moment with the
    /// message in both tables or in neither, and the receivers are
    /// notified when it commits (once, however many moved: PostgreSQL
    /// folds equal notifications of one transaction).
    async fn redrive_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>> {
        let rows = sqlx::query(
            "WITH moved AS (DELETE FROM dead_letters WHERE $1::text IS NULL OR job_id = $1
                            RETURNING id, job_id, tenant, lane, created_at),
                  queued AS (INSERT INTO queue (job_id, tenant, lane, visible_at, created_at)
                             SELECT job_id, tenant, lane, $2, created_at FROM moved ORDER BY id)
             SELECT job_id, tenant, lane, pg_notify($3, '') FROM moved ORDER BY id",
        )
        .bind(job.map(JobId::as_str))
        .bind(self.now())
        .bind(QUEUE_CHANNEL)
        .fetch_all(self.pool())
        .await
        .map_err(db)?;
        let moved = rows.iter().map(message_of).collect::<StorageResult<Vec<_>>>()?;
        if !moved.is_empty() {
            self.shared.queue_ready.notify_waiters();
        }
        Ok(moved)
    }

    async fn remove_dead_letters(&self, job: Option<&JobId>) -> StorageResult<Vec<QueueMessage>> {
        sqlx::query(
            "WITH gone AS (DELETE FROM dead_letters WHERE $1::text IS NULL OR job_id = $1
                           RETURNING id, job_id, tenant, lane)
             SELECT job_id, tenant, lane FROM gone ORDER BY id",
        )
        .bind(job.map(JobId::as_str))
        .fetch_all(self.pool())
        .await
        .map_err(db)?
        .iter()
        .map(message_of)
        .collect()
    }

    async fn stats(&self) -> StorageResult<QueueStats> {
        let row = sqlx::query(
            "SELECT count(*) FILTER (WHERE visible_at <= $1) AS visible,
                    count(*) FILTER (WHERE visible_at > $1) AS in_flight,
                    (SELECT count(*) FROM dead_letters) AS dead
               FROM queue",
        )
        .bind(self.now())
        .fetch_one(self.pool())
        .await
        .map_err(db)?;
        Ok(QueueStats {
            visible: ucol(&row, "visible")?,
            in_flight: ucol(&row, "in_flight")?,
            dead: ucol(&row, "dead")?,
        })
    }
}
